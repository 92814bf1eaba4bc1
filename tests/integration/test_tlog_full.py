"""The signed log's filesystem fills up, or its disk stalls, under a real `skyguard up` in the lab.

Full (one VM's events can do it): the writer refuses entries below its reserve, before writing
anything; DNS then answers nothing (fail closed), enforcement goes on, status and metrics say why,
the daemon lives, and once the space is back logging resumes on its own and `skyguard log verify`
passes. Stalled (a hung disk, frozen with fsfreeze): after the writer has waited on it for a
bound, the same refusal, and the same recovery once it answers; `skyguard down` returns while it
is still frozen, and `up` fails while it does not answer.

Its daemon also holds sdnctl1's TLS key and sdnctl1 serves HTTP on 8080, so TLS termination runs
as deployed: a terminated connection reaches sdnctl1's service through the datapath (and is what
the log must hold before it does).

The log directory is a small ext4 image this module mounts and unmounts (tests/support/frozen_disk.py),
never the machine's disk. The down test stops the module's daemon: it and the up test come last.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from daemon_support import PY, RunningDaemon, Stream, connects, reaches, stop_process, wait_for
from prometheus_client.parser import text_string_to_metric_families

from skyguard.dns.learned import FILE_NAME, LearnedStore
from skyguard.lab.addressing import addresses_for_name
from skyguard.lab.ca import LabCA
from support.client_waits import curl_argv, dig_argv
from support.frozen_disk import FrozenDisk, blocked_in_the_kernel

EXPORTER = "127.0.0.1:26031"  # loopback of the lab's host namespace
SECRET = "ghp-logfull-real-token"  # the github credential's secret (policies/keysystems.yaml)
PLACEHOLDER = "sg-placeholder-github-7f3a"
LOG_FS_BYTES = 8 << 20  # its reserve is then 1/50 of it (skyguard/tlog/intake.py)
SDNCTL1 = ("10.10.3.2", "fd00:10:3::2")
# sdnctl1's own service on its tls_termination forward_to port (8080): plain HTTP on both families.
VM_SERVICE = """import http.server, socket
class Service(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"served by sdnctl1 in plaintext\\n"
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args): pass
class DualStack(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()
server = DualStack(("::", 8080), Service)
print("ready", flush=True)
server.serve_forever()
"""


@pytest.fixture(scope="module")
def daemon(lab, tmp_path_factory):
    work = tmp_path_factory.mktemp("logfull-daemon")
    (work / "state").mkdir(mode=0o700)
    with FrozenDisk(work / "state" / "log", size=f"{LOG_FS_BYTES}") as disk:
        d = RunningDaemon(lab, work, metrics=EXPORTER, wait_attached=True)
        d.disk = disk
        d.env["SKYGUARD_LAB_DIR"] = str(lab.lab_dir.parent)  # the daemon trusts this lab's CA upstream
        service = lab.popen("sdnctl1", [PY, "-c", VM_SERVICE], lab_resolver=False, stdout=subprocess.PIPE, text=True)
        try:
            assert service.stdout.readline().strip() == "ready", "sdnctl1's service on 8080 did not start"
            d.cli("secret", "set", "github", input=SECRET, check=True)
            cert, key = LabCA(work / "sdnctl1-ca", "sdnctl1").issue(["sdnctl1.test"])  # sdnctl1's TLS termination
            (work / "sdnctl1.pem").write_bytes(cert + key)
            d.cli("secret", "set", "sdnctl1", "--file", str(work / "sdnctl1.pem"), check=True)
            d.start()
            d.trust = work / "trust.pem"
            d.trust.write_text(d.cli("ca", "export", check=True).stdout)
            yield d
        finally:
            disk.thaw()
            d.cleanup()
            stop_process(service)


def dig(lab, vm: str, name: str, qtype: str = "A", answer: bool = True) -> str:
    """dig's header lines for one question of `name` from `vm`; answer=False: the test expects none."""
    return lab.exec(vm, dig_argv("+noall", "+comments", name, qtype, answer=answer), capture_output=True,
                    text=True, timeout=60).stdout


def metrics(daemon, prefix: str = "skyguard_log_") -> dict[str, float]:
    out = subprocess.run(["nsenter", f"--net={daemon.host_netns}", "--", "curl", "-sf", f"http://{EXPORTER}/metrics"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return {line.split()[0]: float(line.split()[1]) for line in out.splitlines()
            if line.startswith(prefix)}


def metric_of(daemon, name: str, **labels) -> float:
    """One sample's value (summed over the labels not given) from the daemon's exposition."""
    out = subprocess.run(["nsenter", f"--net={daemon.host_netns}", "--", "curl", "-sf", f"http://{EXPORTER}/metrics"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return sum(s.value for family in text_string_to_metric_families(out) for s in family.samples
               if s.name == name and labels.items() <= s.labels.items())


def fill_below_reserve(lab, daemon):
    """Another file (a VM's disk image, say) leaves half the log's reserve free; returns it once
    the log refuses entries (unlink it to give the space back)."""
    log_dir = daemon.state_dir / "log"
    filler = log_dir / "filler"
    space = os.statvfs(log_dir)
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, space.f_bavail * space.f_frsize - daemon.status()["log"]["reserve_bytes"] // 2)
    dig(lab, "agent1", "payroll.corp.test", answer=False)  # its entry finds the log below its reserve
    refusing = wait_for(lambda: daemon.status()["log"]["refusing"], 30, "the log refusing entries")
    assert "refuses new entries: its filesystem has" in refusing
    return filler


def test_a_full_log_filesystem_refuses_entries_fails_dns_closed_and_recovers_without_a_restart(lab, daemon):
    assert "status: NOERROR" in dig(lab, "agent1", "pypi.sandbox.test")
    head = daemon.status()["log"]
    reserve = head["reserve_bytes"]
    assert head["refusing"] is None and 0 < reserve <= LOG_FS_BYTES // 50

    filler = fill_below_reserve(lab, daemon)

    # Fail closed: a decision that cannot be logged gives no address (SERVFAIL once forwarded) or no answer.
    assert "status: SERVFAIL" in dig(lab, "agent1", "pypi.sandbox.test")
    assert "status:" not in dig(lab, "agent1", "payroll.corp.test", answer=False)
    assert reaches(lab, "radius1", "icmp", "10.10.2.2")  # enforcement does not need the log
    assert daemon.running()
    status = daemon.status()
    assert status["parts"]["dns"] == "running" and status["log"]["refused_entries"] >= 2
    seen = metrics(daemon)
    assert seen["skyguard_log_accepting"] == 0 and seen["skyguard_log_refused_entries_total"] >= 2
    assert seen["skyguard_log_filesystem_free_bytes"] < seen["skyguard_log_reserve_bytes"] == reserve
    said = daemon.log_tail(1 << 20)
    assert said.count("CRITICAL skyguard.tlog") == 1 and "Traceback" not in said and "failed to write" not in said

    filler.unlink()  # space is back: no restart
    wait_for(lambda: "status: NOERROR" in dig(lab, "agent1", "pypi.sandbox.test"), 60, "DNS answering again")
    assert daemon.status()["log"]["refusing"] is None
    assert metrics(daemon)["skyguard_log_accepting"] == 1
    kinds = [(e["type"], e.get("refused")) for e in daemon.log_entries()]
    low, restored = kinds.index(("log_space_low", None)), [k for k in kinds if k[0] == "log_space_restored"]
    assert len(restored) == 1 and restored[0][1] >= 2 and kinds.index(restored[0]) > low
    assert ("dns", None) in kinds[kinds.index(restored[0]):]  # the answered query is on record
    daemon.cli("log", "verify", check=True)


def test_an_answer_the_log_refuses_opens_nothing_in_the_datapath_and_closes_no_logged_one(lab, daemon):
    # Allowed names of the sandbox (rule sandbox-packages, tcp/443) no other test of this module asks.
    logged, refused = (str(addresses_for_name(n)[0]) for n in ("mirror.pythonhosted.test", "wheels.pythonhosted.test"))
    assert "status: NOERROR" in dig(lab, "agent1", "mirror.pythonhosted.test")  # decided and logged
    filler = fill_below_reserve(lab, daemon)
    try:
        # Fail closed: the VM gets no address, and the datapath does not open it behind its back.
        assert "status: SERVFAIL" in dig(lab, "agent1", "wheels.pythonhosted.test")
        assert "status: SERVFAIL" in dig(lab, "agent1", "mirror.pythonhosted.test")  # asked again: refused too
        assert not connects(lab, "agent1", refused, 443, expected=False)
        assert connects(lab, "agent1", logged, 443, expected=True)  # the earlier, logged decision still holds
    finally:
        filler.unlink()
    wait_for(lambda: "status: NOERROR" in dig(lab, "agent1", "wheels.pythonhosted.test"), 60, "DNS answering again")
    assert connects(lab, "agent1", refused, 443, expected=True)  # logged now: open


def taken_back(daemon) -> dict | None:
    """What status says of answers whose queued entry the log refused after they left, once any."""
    dns = daemon.status()["dns"] or {}
    return dns if dns.get("log_refused_after_answer") else None


def test_an_answer_whose_queued_entry_the_log_refuses_later_is_closed_again(lab, daemon):
    # DNS does not wait for the disk: an allowed answer's entry is queued and the answer leaves at
    # once. The first entry to find the log below its reserve is refused after its answer went out.
    logged, refused = "simple.pythonhosted.test", "blobs.pythonhosted.test"  # same IPv4 address
    shared, v6 = (str(a) for a in addresses_for_name(refused))
    assert str(addresses_for_name(logged)[0]) == shared
    assert "status: NOERROR" in dig(lab, "agent1", logged)
    wait_for(lambda: any(e.get("name") == logged for e in daemon.log_entries("dns")), 30, "the logged answer on record")
    log_dir = daemon.state_dir / "log"
    filler = log_dir / "filler"
    space = os.statvfs(log_dir)
    with open(filler, "wb") as f:  # nothing has found the log below its reserve yet
        os.posix_fallocate(f.fileno(), 0, space.f_bavail * space.f_frsize - daemon.status()["log"]["reserve_bytes"] // 2)
    try:
        assert daemon.status()["log"]["refusing"] is None
        answer = dig(lab, "agent1", refused, "ANY")  # its A and AAAA learned, the answer released
        assert "status: NOERROR" in answer, answer
        wait_for(lambda: daemon.status()["log"]["refusing"], 30, "the log refusing the queued entry")
        dns = wait_for(lambda: taken_back(daemon), 30, "DNS taking the refused answer back")
        assert not connects(lab, "agent1", v6, 443, expected=False)  # only the refused decision opened it: closed again
        assert connects(lab, "agent1", shared, 443, expected=True)  # the logged decision for the other name still holds
        assert dns["log_refused_after_answer"] == 1 and dns["unlearned"] == 1
        assert "refuses new entries" in dns["last_refusal"]
        seen = metrics(daemon, "skyguard_dns_")
        assert sum(v for k, v in seen.items() if k.startswith("skyguard_dns_log_refused_after_answer_total")) == 1
        assert sum(v for k, v in seen.items() if k.startswith("skyguard_dns_unlearned_ips_total")) == 1
        assert "DNS answers released before the signed log refused their entries: 1 (" in daemon.log_tail(1 << 20)
        assert "1 answer(s) left before the log refused" in daemon.cli("status", check=True).stdout
    finally:
        filler.unlink()
    wait_for(lambda: "status: NOERROR" in dig(lab, "agent1", refused, "ANY"), 60, "DNS answering again")
    assert connects(lab, "agent1", v6, 443, expected=True)  # logged now: open


def swap(lab, daemon, path: str, resolve: bool = False) -> tuple[int, str]:
    """curl from sdnctl1 (zone sdn) to api.github.test with the credential's placeholder:
    (HTTP status, body). With resolve, no DNS query (the address it was answered before)."""
    pinned = ["--resolve", f"api.github.test:443:{addresses_for_name('api.github.test')[0]}"] if resolve else []
    out = lab.exec("sdnctl1", ["curl", "-sS", "--max-time", "20", "--cacert", str(daemon.trust), *pinned,
                               "-H", f"Authorization: Bearer {PLACEHOLDER}", "-w", "\n%{http_code}",
                               f"https://api.github.test{path}"], capture_output=True, text=True, timeout=60)
    body, _, code = out.stdout.rpartition("\n")
    return int(code or 0), body + out.stderr


def upstream_got(lab, path: str) -> list[dict]:
    lines = lab.requests_log.read_text().splitlines() if lab.requests_log.exists() else []
    return [r for r in map(json.loads, lines) if r.get("path") == path]


MALFORMED = """import socket, ssl, sys
tls = ssl.create_default_context(cafile=sys.argv[2])
s = tls.wrap_socket(socket.create_connection((sys.argv[1], 443), 5), server_hostname="api.github.test")
s.sendall(b"GET / HTTP/1.1\\r\\nHost: api.github.test\\r\\nX: a\\r\\n folded\\r\\n\\r\\n")
print(s.recv(100).split(b" ")[1].decode())
"""


def carried_secret(request: dict) -> bool:
    return any(n.lower() == "authorization" and v == f"Bearer {SECRET}" for n, v in request["headers"])


def test_a_credential_swap_the_log_refuses_is_refused_with_503_and_never_forwarded(lab, daemon):
    """With the log refusing, the proxy's swap entry raised inside its answer: the connection
    closed unanswered (curl: empty reply), a traceback in the host's log, and nothing counted."""
    assert swap(lab, daemon, "/logfull-before")[0] == 200  # learned (DNS) and swapped
    assert [carried_secret(r) for r in upstream_got(lab, "/logfull-before")] == [True]
    counted = metric_of(daemon, "skyguard_credential_swaps_total", result="log_refused")
    part = daemon.status()["parts"]["credentials"]  # degraded: sdnctl1's TLS key is not in the store
    filler = fill_below_reserve(lab, daemon)
    try:
        code, body = swap(lab, daemon, "/logfull-refused", resolve=True)
        assert code == 503, body + daemon.log_tail(2000)
        answer = json.loads(body)
        assert answer["error"] == "log_refused" and "signed log" in answer["reason"], answer
        assert SECRET not in body and not upstream_got(lab, "/logfull-refused")  # fail closed
        assert metric_of(daemon, "skyguard_credential_swaps_total", result="log_refused") == counted + 1
        # A malformed request is still refused with its 400 (its entry refused too), not dropped.
        malformed = lab.exec("sdnctl1", [sys.executable, "-c", MALFORMED, str(addresses_for_name("api.github.test")[0]),
                                         str(daemon.trust)],
                             lab_resolver=False, capture_output=True, text=True, timeout=30)
        assert malformed.stdout.strip() == "400", malformed.stdout + malformed.stderr
        assert daemon.status()["parts"]["credentials"] == part
        said = daemon.log_tail(1 << 20)
        assert "Traceback" not in said and "credential proxy connection failed" not in said, said[-3000:]
    finally:
        filler.unlink()
    wait_for(lambda: "status: NOERROR" in dig(lab, "agent1", "pypi.sandbox.test"), 60, "DNS answering again")
    assert swap(lab, daemon, "/logfull-after", resolve=True)[0] == 200  # the proxy kept serving
    assert any(e["result"] == "swapped" for e in daemon.log_entries("credential"))


def test_a_swap_waits_for_its_entry_so_no_secret_leaves_while_the_log_disk_stalls(lab, daemon):
    """A swap's entry was queued and the secret forwarded at once: in the first seconds of a stall
    (before the writer refuses new entries) the secret went out with its entry written nowhere (a
    crash then, and no record of it). Now a swap waits until its entry is durable: with the disk
    frozen it is refused with 503 and the upstream never sees the request."""
    assert swap(lab, daemon, "/stall-before")[0] == 200  # learned (DNS) and swapped
    refused = metric_of(daemon, "skyguard_credential_swaps_total", result="log_refused")
    before = daemon.status()["log"]["size"]
    daemon.disk.freeze()
    try:
        code, body = swap(lab, daemon, "/stall-swap", resolve=True)  # at once: the log is not refusing yet
        assert code == 503 and json.loads(body)["error"] == "log_refused", body
        assert not upstream_got(lab, "/stall-swap") and SECRET not in body
        assert metric_of(daemon, "skyguard_credential_swaps_total", result="log_refused") == refused + 1
    finally:
        daemon.disk.thaw()
    wait_for(lambda: daemon.status()["log"]["refusing"] is None, 60, "the log accepting again")
    assert swap(lab, daemon, "/stall-after", resolve=True)[0] == 200
    # Its entry, queued before the refusal, is written once the disk answers: a withdrawal follows it,
    # so the log does not claim a swap that never happened.
    def withdrawn() -> list[dict]:
        rows = [json.loads(line) for line in daemon.cli("log", "show", "--json", check=True).stdout.splitlines()]
        entries = {row["index"]: row["entry"] for row in rows}
        return [entries[e["index"]] for e in entries.values() if e["type"] == "decision_withdrawn" and e["index"] >= before]
    [late] = wait_for(withdrawn, 30, "the late swap entry withdrawn")
    assert late["type"] == "credential" and late["result"] == "swapped", late


def test_a_terminated_connection_reaches_the_vms_service_and_no_one_else_its_plaintext_port(lab, daemon):
    """sdnctl1's TLS is terminated by skyguard, which carries the plaintext to sdnctl1:8080
    (forward_to) from the host. The datapath let nothing reach that port, the host included: every
    terminated connection ended vm_unreachable; and the terminator listened on IPv4 only, so an IPv6
    client steered to it was reset. Now curl from the internet, through the termination, gets
    sdnctl1's own answer on both families, its flow allowed by the tls-termination rule; a VM or the
    internet connecting straight to 8080 is still dropped."""
    ca, before = daemon.work_dir / "sdnctl1-ca" / "ca.pem", len(daemon.log_entries("tls_termination"))
    for address in SDNCTL1:
        target = f"[{address}]" if ":" in address else address
        out = lab.exec("internet", curl_argv("--cacert", str(ca), "--resolve", f"sdnctl1.test:443:{target}",
                                             "https://sdnctl1.test/"), lab_resolver=False,
                       capture_output=True, text=True, timeout=60)
        assert (out.returncode, out.stdout) == (0, "served by sdnctl1 in plaintext\n"), (address, out.stderr)
        ends = wait_for(lambda seen=before: daemon.log_entries("tls_termination")[seen:], 30, "the connection's end entry")
        assert [(e["workload"], e["result"]) for e in ends] == [("sdnctl1", "terminated")], ends
        before += 1

    def to_the_service():
        out = daemon.cli("flows", "--json", "--limit", "10000", "--verdict", "allow", check=True).stdout
        return [r for r in json.loads(out)["records"]
                if r["type"] == "flow_start" and r["dport"] == 8080 and r["dst_workload"] == "sdnctl1"]

    assert {r["rule"] for r in wait_for(to_the_service, 30, "the flows to sdnctl1:8080")} == {"tls-termination"}
    for client in ("vfw1", "agent1", "internet"):
        for address in SDNCTL1:
            assert not connects(lab, client, address, 8080, expected=False), f"{client} reached {address}:8080"


# A client of sdnctl1's terminated TLS service (tcp/443, steered to skyguard from anywhere, the host
# included): prints whether the handshake completed and what came back before the connection ended.
TLS_CLIENT = """import socket, ssl, sys
tls = ssl.create_default_context(cafile=sys.argv[2])
s = tls.wrap_socket(socket.create_connection((sys.argv[1], 443), 20), server_hostname="sdnctl1.test")
print("handshake", s.version())
s.sendall(b"GET / HTTP/1.0\\r\\nHost: sdnctl1.test\\r\\n\\r\\n")
got = b""
try:
    while chunk := s.recv(4096):
        got += chunk
except (OSError, ssl.SSLError):
    pass
print("received", len(got))
"""


def terminated(lab, daemon) -> str:
    """sdnctl1.test's TLS service asked from the lab host, as TLS_CLIENT prints it."""
    out = lab.exec("host", [sys.executable, "-c", TLS_CLIENT, "10.10.3.2", str(daemon.work_dir / "sdnctl1-ca" / "ca.pem")],
                   lab_resolver=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_a_tls_termination_the_log_refuses_never_reaches_the_vm(lab, daemon):
    """TLS termination (sdnctl1:443) wrote one entry per connection, at its end: nothing said a
    connection had begun (who, what name) while it ran, and with the log refusing entries the end
    entry raised out of the connection's task after it had been carried to the VM. Now a
    connection's start is on record (durable) before a byte reaches the VM: client, SNI, TLS
    version; with the log below its reserve, or its disk stalled, the connection is closed after
    the handshake, counted log_refused and said in the host's log."""
    answered = terminated(lab, daemon).split()  # sdnctl1's service answers through the termination
    assert answered[0] == "handshake" and answered[-2] == "received" and int(answered[-1]) > 0, answered
    start = daemon.log_entries("tls_termination_start")[-1]
    assert (start["workload"], start["zone"], start["destination"], start["sni"]) == (
        "sdnctl1", "sdn", "sdnctl1:443", "sdnctl1.test"), start
    assert start["client"] and start["client_port"] and start["tls_version"].startswith("TLS")
    end = wait_for(lambda: [e for e in daemon.log_entries("tls_termination") if e["connection"] == start["connection"]],
                   30, "the connection's end entry")[-1]
    assert (end["client"], end["result"]) == (start["client"], "terminated"), end
    refused = metric_of(daemon, "skyguard_tls_terminations_total", workload="sdnctl1", result="log_refused")
    filler = fill_below_reserve(lab, daemon)
    try:
        assert terminated(lab, daemon).split()[-2:] == ["received", "0"]
        assert metric_of(daemon, "skyguard_tls_terminations_total", workload="sdnctl1", result="log_refused") == refused + 1
    finally:
        filler.unlink()
    wait_for(lambda: daemon.status()["log"]["refusing"] is None, 60, "the log accepting again")
    daemon.disk.freeze()
    try:
        assert terminated(lab, daemon).split()[-2:] == ["received", "0"]  # at once: the log is not refusing yet
        assert metric_of(daemon, "skyguard_tls_terminations_total", workload="sdnctl1", result="log_refused") == refused + 2
    finally:
        daemon.disk.thaw()
    wait_for(lambda: daemon.status()["log"]["refusing"] is None, 60, "the log accepting again")
    said = daemon.log_tail(1 << 20)
    assert said.count(f"a TLS connection from {start['client']} to sdnctl1:443 is refused") == 2, said[-4000:]
    assert "Traceback" not in said, said[-4000:]


def frozen_log(daemon):
    """Freeze the log's disk and make the writer wait on it (a DNS decision's entry)."""
    daemon.disk.freeze()
    dig(daemon.lab, "agent1", "pypi.sandbox.test")
    wait_for(lambda: blocked_in_the_kernel(daemon.proc.pid), 60, "the log writer waiting on the frozen disk")


def test_a_stalled_log_disk_fails_closed_keeps_the_daemon_answering_and_resumes_on_thaw(lab, daemon):
    """The log's disk frozen under a running daemon: the writer queued every entry behind it
    without a bound and never refused one, so DNS went on answering on entries that could not be
    written, and status said nothing. Now it refuses once a write has waited past its bound."""
    assert "status: NOERROR" in dig(lab, "agent1", "pypi.sandbox.test")
    assert swap(lab, daemon, "/logstall-before")[0] == 200  # its address learned (the refused swap below pins it)
    stalls_before = len(daemon.log_entries("log_stall_ended"))
    stream = Stream(lab, "radius1", "dc1", "10.10.2.2", 50011)  # decided before the stall
    try:
        frozen_log(daemon)
        refusing = wait_for(lambda: daemon.status()["log"]["refusing"], 60, "the log refusing entries")
        assert "has waited on its disk" in refusing, refusing
        # Fail closed: nothing new is answered that cannot be logged; the loop still answers.
        assert "status: SERVFAIL" in dig(lab, "agent1", "pypi.sandbox.test")
        assert "status:" not in dig(lab, "agent1", "payroll.corp.test", answer=False)
        assert stream.flowing()  # what was decided keeps its decision
        assert reaches(lab, "radius1", "icmp", "10.10.2.2")  # the datapath decides without the log
        status = daemon.status()
        assert status["parts"]["dns"] == "running" and status["log"]["queued_entries"] >= 1
        assert status["log"]["write_wait_s"] > 0 and status["log"]["stall_refused_entries"] >= 2
        seen = metrics(daemon)
        assert seen["skyguard_log_accepting"] == 0 and seen["skyguard_log_write_wait_seconds"] > 0
        assert seen["skyguard_log_queued_entries"] >= 1 and seen["skyguard_log_stall_refused_entries_total"] >= 2
        assert daemon.cli("flows", "--json").returncode == 0
        code, body = swap(lab, daemon, "/logstall-refused", resolve=True)
        assert code == 503, body + daemon.log_tail(3000)  # no secret out without its entry
        assert not upstream_got(lab, "/logstall-refused")
        # A policy load must be on record: refused, nothing changed (the datapath flipped first, before).
        variant = daemon.work_dir / "policy-variant.yaml"
        variant.write_text(daemon.policy_path.read_text() + "\n# another revision\n")
        load = daemon.cli("policy", "load", str(variant))
        assert load.returncode == 1 and "was not loaded (nothing changed)" in load.stderr, load.stderr
        assert daemon.status()["policy"]["sha256"] == status["policy"]["sha256"]
        # A tamper is repaired, counted and said even though its entry cannot be written.
        tampered = lab.exec("host", ["tc", "filter", "del", "dev", "sg-vfw1", "ingress"], lab_resolver=False,
                            capture_output=True, text=True)
        assert tampered.returncode == 0, tampered.stderr
        wait_for(lambda: daemon.status()["tamper_events"] == 1, 60, "the tamper counted while the log is stalled")
        assert "tamper on sg-vfw1" in daemon.log_tail(1 << 20)
        assert daemon.disk.frozen and daemon.running()
    finally:
        daemon.disk.thaw()
        stream.close()
    wait_for(lambda: "status: NOERROR" in dig(lab, "agent1", "pypi.sandbox.test"), 60, "DNS answering again")
    assert daemon.status()["log"]["refusing"] is None
    ended = daemon.log_entries("log_stall_ended")
    assert len(ended) == stalls_before + 1 and ended[-1]["refused"] >= 2, ended
    daemon.cli("log", "verify", check=True)


def test_an_answer_a_crash_kept_from_the_log_is_not_opened_again_by_the_restarted_daemon(lab, daemon):
    """An answer's entry is queued and the answer leaves at once (learning.py holds what it opened
    until the entry settles). Killed before the entry was written, the daemon had saved the answer
    to its learned state, and the restarted one opened the address again with no entry in the log
    for it."""
    daemon.ensure_running()
    wait_for(lambda: daemon.status()["log"]["refusing"] is None, 60, "the log accepting entries")
    name = "crash.pythonhosted.test"  # allowed to agent1 (sandbox-packages), asked by no other test
    address = str(addresses_for_name(name)[1])  # its AAAA: no other name of the lab answers it
    daemon.disk.freeze()
    try:
        assert "status: NOERROR" in dig(lab, "agent1", name, "AAAA")  # its entry queued, not written
        wait_for(lambda: blocked_in_the_kernel(daemon.proc.pid), 60, "the log writer waiting on the frozen disk")
        assert connects(lab, "agent1", address, 443, expected=True)  # open, under the queued entry
        daemon.proc.send_signal(signal.SIGKILL)  # it dies once its writer's write returns
    finally:
        daemon.disk.thaw()
    daemon.proc.wait(60)
    daemon.start()
    assert not connects(lab, "agent1", address, 443, expected=False)
    assert not [e for e in daemon.log_entries("dns") if e.get("name") == name]
    daemon.cli("log", "verify", check=True)
    assert "status: NOERROR" in dig(lab, "agent1", name, "AAAA")  # asked again: on record, open
    wait_for(lambda: [e for e in daemon.log_entries("dns") if e.get("name") == name], 30, "the answer on record")
    assert connects(lab, "agent1", address, 443, expected=True)
    wait_for(lambda: saved_answer(daemon, name, address), 30, "the answer saved once its entry is written")
    daemon.kill()
    daemon.start()
    assert connects(lab, "agent1", address, 443, expected=True)  # on record: a restart opens it again


def saved_answer(daemon, name: str, address: str) -> bool:
    """Does the daemon's saved learned state (what a restart opens) hold `address` for `name`?"""
    saved = LearnedStore(daemon.state_dir / FILE_NAME)
    saved.load()
    return saved.answered(name, address, time.time())


def test_down_returns_while_the_log_disk_is_stalled(lab, daemon):
    """`skyguard down` waited for the daemon_stop entry and the final checkpoint without a bound:
    with the log's disk frozen it never returned. Now the programs are detached and the pins
    removed while the disk is still frozen; what could not be written is named in the host's log;
    once thawed the log verifies and holds what was acknowledged before.

    Its process then holds the log until the disk answers: `down`, `status`, a new `up` and a
    second `down` said nothing of it (`up`: "another writer (a running skyguard daemon?) has the
    log open"); each now names that process and the disk it waits on."""
    daemon.ensure_running()
    assert "status: NOERROR" in dig(lab, "agent1", "pypi.sandbox.test")
    acknowledged = daemon.status()["log"]["checkpointed_size"]  # under the head: acknowledged
    before = daemon.log_entries()[:acknowledged]
    log_dir, pid = daemon.state_dir / "log", daemon.proc.pid
    waiting = f"the previous skyguard daemon's process (pid {pid}) is still waiting on the log's disk at {log_dir}"
    try:
        frozen_log(daemon)
        down = daemon.cli("down", timeout=120)
        assert down.returncode == 0 and "programs detached" in down.stdout, down.stderr + daemon.log_tail()
        assert f"its process (pid {pid}) is still waiting on the log's disk at {log_dir}" in down.stderr, down.stderr
        assert daemon.disk.frozen and not daemon.pin_dir.exists()
        said = daemon.log_tail(1 << 20)
        assert "daemon_stop was not written to the signed log" in said, said[-4000:]
        assert "its final checkpoint was not written" in said, said[-4000:]
        status = daemon.cli("status", timeout=60)
        assert status.returncode == 1 and "no skyguard daemon is running" in status.stderr, status.stderr
        assert waiting in status.stderr, status.stderr
        up = daemon.cli("up", "--policy", str(daemon.policy_path), "--metrics", "off", timeout=60)
        assert up.returncode == 1 and waiting in up.stderr, up.stderr[-4000:]
        assert not daemon.pin_dir.exists()
        again = daemon.cli("down", timeout=60)
        assert again.returncode == 0 and "nothing was attached" in again.stdout, again.stdout + again.stderr
        assert waiting in again.stderr, again.stderr
    finally:
        daemon.disk.thaw()
    daemon.proc.wait(60)  # the process ends once the kernel lets its write return
    daemon.cli("log", "verify", check=True)
    assert daemon.log_entries()[:acknowledged] == before


def test_up_fails_while_the_log_disk_does_not_answer(lab, daemon):
    """The log's disk frozen before `skyguard up`: opening the log (its tail, its last checkpoint)
    had no bound, so `up` waited silently for ever, nothing answered status and nothing was
    attached. Now it fails once the disk has not answered for the log's stall bound, naming the
    log's path; nothing is started or attached, and once the disk answers the log verifies and
    `up` starts."""
    if daemon.running():  # stopped by the test before, unless this one runs alone
        daemon.stop()
    log_dir = daemon.state_dir / "log"
    daemon.disk.freeze()
    try:
        up = daemon.cli("up", "--policy", str(daemon.policy_path), "--metrics", "off", timeout=60)
        assert up.returncode == 1, up.stderr[-4000:]
        assert f"the signed log at {log_dir}: its disk does not answer" in up.stderr, up.stderr[-4000:]
        assert not daemon.pin_dir.exists()
        attached = lab.exec("host", ["tc", "filter", "show", "dev", "sg-vfw1", "ingress"], lab_resolver=False,
                            capture_output=True, text=True)
        assert attached.returncode == 0 and not attached.stdout.strip(), attached.stdout
        status = daemon.cli("status", timeout=60)
        assert status.returncode == 1 and "no skyguard daemon is running" in status.stderr, status.stderr
        down = daemon.cli("down", timeout=60)  # no daemon half-started ("a daemon is starting" and a wait)
        assert down.returncode == 0 and "nothing was attached" in down.stdout, down.stdout + down.stderr
        assert "starting" not in down.stderr, down.stderr
    finally:
        daemon.disk.thaw()
    daemon.cli("log", "verify", check=True)
    assert daemon.start()["policy"]["name"]
