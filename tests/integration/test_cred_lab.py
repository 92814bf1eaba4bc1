"""The credential proxy and TLS termination in real network namespaces, with real nftables
steering and SO_ORIGINAL_DST: crx-vm (the VM) -- crx-host (skyguard: proxy, terminator,
nftables) -- crx-up (an HTTPS echo server with its own CA on 203.0.113.10 = api.github.test and
203.0.113.30 = other.test, and the IPv6 2001:db8:203::10). curl inside crx-vm plays the VM.

The proxy runs in a thread of this process that entered crx-host's network namespace (setns
is per thread), so the test reads its decision log and metrics directly.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from skyguard.credproxy.interfaces import MemorySecretSource
from skyguard.credproxy.secretforms import SecretForms
from skyguard.credproxy.service import CredentialService
from skyguard.credproxy.steering import CredentialSteering
from skyguard.lab.ca import LabCA
from skyguard.parts import MemoryLog
from skyguard.policy.model import Credential, Injection, Policy, TlsTermination, Workload, Zone
from support.client_waits import curl_argv
from support.netns_support import NamespaceLoop, wait_for_port

# Namespaces named by this process (parallel runs never share them); links live inside them.
VM, HOST, UP = (f"crx{os.getpid()}-{role}" for role in ("vm", "host", "up"))
VM_IF = "crx-h-vm"  # the VM's host-side interface: what steering matches
SECRET = b"ghp_NamespaceSecret_9f8e7d6c"
PH = "sg-placeholder-github-7f3a"
AUTH = f"Authorization: Bearer {PH}"
API4, OTHER4, API6 = "203.0.113.10", "203.0.113.30", "2001:db8:203::10"
LEARNED = {("api.github.test", API4), ("api.github.test", API6), ("other.test", OTHER4)}


def sh(*cmd, check=True, **kw):
    return subprocess.run(cmd, check=check, capture_output=True, timeout=60, **kw)


def in_ns(ns, *cmd, **kw):
    return sh("ip", "netns", "exec", ns, *cmd, **kw)


def delete_namespaces():
    for ns in (VM, HOST, UP):
        sh("ip", "netns", "del", ns, check=False)


def build_namespaces():
    delete_namespaces()  # leftovers of a killed run
    for ns in (VM, HOST, UP):
        sh("ip", "netns", "add", ns)
        in_ns(ns, "ip", "link", "set", "lo", "up")
    sh("ip", "link", "add", "crx-vm0", "netns", VM, "type", "veth", "peer", "name", VM_IF, "netns", HOST)
    sh("ip", "link", "add", "crx-up0", "netns", UP, "type", "veth", "peer", "name", "crx-h-up", "netns", HOST)
    for ns, commands in {
        VM: [["addr", "add", "10.77.1.2/24", "dev", "crx-vm0"], ["addr", "add", "fd77:1::2/64", "dev", "crx-vm0", "nodad"],
             ["link", "set", "crx-vm0", "up"], ["route", "add", "default", "via", "10.77.1.1"],
             ["-6", "route", "add", "default", "via", "fd77:1::1"]],
        HOST: [["addr", "add", "10.77.1.1/24", "dev", VM_IF], ["addr", "add", "fd77:1::1/64", "dev", VM_IF, "nodad"],
               ["addr", "add", "10.77.2.1/24", "dev", "crx-h-up"], ["addr", "add", "fd77:2::1/64", "dev", "crx-h-up", "nodad"],
               ["link", "set", VM_IF, "up"], ["link", "set", "crx-h-up", "up"],
               ["route", "add", "203.0.113.0/24", "via", "10.77.2.2"],
               ["-6", "route", "add", "2001:db8:203::/64", "via", "fd77:2::2"]],
        UP: [["addr", "add", "10.77.2.2/24", "dev", "crx-up0"], ["addr", "add", "fd77:2::2/64", "dev", "crx-up0", "nodad"],
             ["addr", "add", f"{API4}/32", "dev", "crx-up0"], ["addr", "add", f"{OTHER4}/32", "dev", "crx-up0"],
             ["addr", "add", f"{API6}/128", "dev", "crx-up0", "nodad"],
             ["link", "set", "crx-up0", "up"], ["route", "add", "default", "via", "10.77.2.1"],
             ["-6", "route", "add", "default", "via", "fd77:2::1"]],
    }.items():
        for command in commands:
            in_ns(ns, "ip", *command)
    in_ns(HOST, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    in_ns(HOST, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")


def start_process(ns, *cmd):
    process = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return process


@pytest.fixture(scope="module")
def lab(root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("crx-lab")
    build_namespaces()
    processes = []
    loop = None
    state = {}
    try:
        upstream_ca = LabCA(tmp / "upstream-ca", "crx upstream")
        cert, key = upstream_ca.issue(["api.github.test", "other.test"])
        (tmp / "up.pem").write_bytes(cert)
        (tmp / "up.key").write_bytes(key)
        (tmp / "upca.pem").write_bytes(upstream_ca.cert_path.read_bytes())
        echo_log = tmp / "echo.jsonl"
        repo = str(Path(__file__).resolve().parents[2])
        env_cmd = ["env", f"PYTHONPATH={repo}", sys.executable, "-m", "skyguard.lab.serve", "echo"]  # the lab's echo
        processes.append(start_process(UP, *env_cmd, "--host", "0.0.0.0", "--host", "::", "--port", "443",
                                       "--cert", str(tmp / "up.pem"), "--key", str(tmp / "up.key"), "--log", str(echo_log)))
        # The VM's own service: plain HTTP only; TLS for it is skyguard's job.
        (tmp / "www").mkdir()
        (tmp / "www" / "index.html").write_text("served by the VM in plaintext\n")
        processes.append(start_process(VM, sys.executable, "-m", "http.server", "8080", "--bind", "10.77.1.2",
                                       "--directory", str(tmp / "www")))
        wait_for_port(UP, API4, 443)
        wait_for_port(VM, "10.77.1.2", 8080)

        service_ca = LabCA(tmp / "service-ca", "crx service")
        service_cert, service_key = service_ca.issue(["crxvm.test"])
        (tmp / "svcca.pem").write_bytes(service_ca.cert_path.read_bytes())

        vm = Workload("crxvm", "sdn", VM_IF, "02:00:00:77:01:02",
                      (ipaddress.ip_address("10.77.1.2"), ipaddress.ip_address("fd77:1::2")))
        policy = Policy(
            "crx", {"sdn": Zone("sdn", (vm,))}, {}, (),
            credentials=(Credential("github", PH, "github", ("sdn",), ("api.github.test",),
                                    Injection("Authorization", "Bearer {secret}")),),
            tls_termination=(TlsTermination("crxvm", 443, 8080, "crxvm-tls"),),
        )
        secrets = MemorySecretSource({"github": SECRET, "crxvm-tls": service_cert + service_key})
        log = MemoryLog()
        loop = NamespaceLoop(HOST, timeout=30)
        service = CredentialService(
            policy, secrets, state_dir=tmp / "state", decision_log=log, registry=None,
            address_matches=lambda n, ip: (n, ip) in LEARNED, upstream_ca_file=str(tmp / "upca.pem"),
            http_port=25080, https_port=25443, nft=("ip", "netns", "exec", HOST, "nft"),
        )
        loop.run(service.start())
        (tmp / "skyca.pem").write_bytes(service.ca.certificate_pem)
        for name, address in LEARNED:
            service.learned(name, address)  # as DNS learning would
        state.update(tmp=tmp, echo_log=echo_log, log=log, metrics=service.metrics, steering=service.steering,
                     loop=loop, service=service, policy=policy)
        yield state
    finally:
        if loop is not None:
            if "service" in state:
                loop.run(state["service"].stop())
                CredentialSteering([], 1, 1, nft=("ip", "netns", "exec", HOST, "nft")).remove()  # idempotent
            loop.close()
        for process in processes:
            process.terminate()
            process.wait(10)
        delete_namespaces()


def vm_curl(lab, url, *args, connect=API4, cacert="skyca.pem"):
    target = f"[{connect}]" if ":" in connect else connect
    result = in_ns(VM, *curl_argv("--cacert", str(lab["tmp"] / cacert), "--connect-to", f"::{target}:",
                                  "-w", "\n%{http_code}", *args, url), check=False)
    body, _, code = result.stdout.rpartition(b"\n")
    return int(code or 0), body, result.returncode


def echoed(lab):
    path = lab["echo_log"]
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def no_secret(blob: bytes) -> bool:
    return not SecretForms([SECRET]).found_in(blob)


def test_swap_from_the_vm_reaches_the_right_host_only(lab):
    before = len(echoed(lab))
    code, body, _ = vm_curl(lab, "https://api.github.test/user", "-H", AUTH)
    assert code == 200
    seen = echoed(lab)[before]
    assert ["authorization", "Bearer " + SECRET.decode()] in seen["headers"] and seen["sni"] == "api.github.test"
    assert no_secret(body)  # the echo held the secret; the VM got it scrubbed
    entry = [e for e in lab["log"].snapshot() if e["result"] == "swapped"][-1]
    assert (entry["credential"], entry["workload"], entry["zone"], entry["address"]) == ("github", "crxvm", "sdn", API4)


def test_swap_over_ipv6_uses_the_ipv6_original_destination(lab):
    before = len(echoed(lab))
    code, body, _ = vm_curl(lab, "https://api.github.test/v6", "-H", AUTH, connect=API6)
    assert code == 200 and no_secret(body)
    assert echoed(lab)[before]["path"] == "/v6"
    assert [e for e in lab["log"].snapshot() if e["result"] == "swapped"][-1]["address"] == API6


def test_placeholder_to_another_host_is_blocked_and_logged(lab):
    before = len(echoed(lab))
    code, body, _ = vm_curl(lab, "https://other.test/", "-H", AUTH, connect=OTHER4)
    assert code == 403 and len(echoed(lab)) == before
    entry = lab["log"].snapshot()[-1]
    assert (entry["credential"], entry["destination"], entry["result"]) == ("github", "other.test", "blocked_exfiltration")


def test_host_name_pointing_at_a_wrong_address_is_blocked(lab):
    # api.github.test's name, but the VM connected to other.test's address (not learned for it).
    code, _, _ = vm_curl(lab, "https://api.github.test/", "-H", AUTH, connect=OTHER4)
    assert code == 403
    assert "not learned" in lab["log"].snapshot()[-1]["reason"]


def test_sni_host_mismatch_is_blocked(lab):
    code, _, _ = vm_curl(lab, "https://api.github.test/", "-H", AUTH, "-H", "Host: other.test")
    assert code == 421


def test_direct_connection_bypassing_the_proxy_fails(lab):
    # Trusting the real upstream's CA does not help: every HTTPS connection to the destination
    # lands on skyguard, whose certificate that CA did not sign.
    code, _, rc = vm_curl(lab, "https://api.github.test/", "-H", AUTH, cacert="upca.pem")
    assert code == 0 and rc == 60  # curl: peer certificate cannot be authenticated


def test_malformed_http_gets_400_and_the_proxy_survives(lab):
    probe = ("import socket\ns=socket.create_connection(('203.0.113.10',80),5)\n"
             "s.sendall(b'GET / HTTP/1.1\\r\\nHost: api.github.test\\r\\nX: a\\r\\n folded\\r\\n\\r\\n')\n"
             "print(s.recv(100).split(b' ')[1].decode())")
    assert in_ns(VM, sys.executable, "-c", probe).stdout.strip() == b"400"
    code, _, _ = vm_curl(lab, "https://api.github.test/", "-H", AUTH)
    assert code == 200


def test_cleartext_http_never_gets_the_secret(lab):
    code, _, _ = vm_curl(lab, "http://api.github.test/", "-H", AUTH)
    assert code == 403


def test_tls_termination_serves_the_vm_with_a_key_the_vm_never_has(lab):
    result = in_ns(UP, *curl_argv("--cacert", str(lab["tmp"] / "svcca.pem"), "--resolve", "crxvm.test:443:10.77.1.2",
                                  "https://crxvm.test/index.html"), check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"served by the VM in plaintext\n"
    # The VM's port 443 is skyguard's: nothing listens there inside the VM.
    listening = in_ns(VM, "ss", "-Htln").stdout
    assert b":443 " not in listening
    entry = lab["log"].of_kind("tls_termination")[-1]
    assert (entry["workload"], entry["result"]) == ("crxvm", "terminated")


def test_steering_table_and_metrics_add_up(lab):
    ruleset = in_ns(HOST, "nft", "list", "table", "inet", "skyguard_cred").stdout.decode()
    assert 'iifname "crx-h-vm"' in ruleset and "redirect to :25443" in ruleset and API4 in ruleset
    value = lab["metrics"].registry.get_sample_value
    assert value("skyguard_credential_swaps_total", {"credential": "github", "result": "swapped"}) >= 2
    assert value("skyguard_credential_swaps_total", {"credential": "github", "result": "blocked_exfiltration"}) >= 1
    assert value("skyguard_tls_terminations_total", {"workload": "crxvm", "result": "terminated"}) >= 1
    assert all(no_secret(json.dumps(e).encode()) for e in lab["log"].snapshot())


def test_address_set_mode_steers_only_the_destinations(lab):
    steering = lab["steering"]
    steering.all_destinations = False
    try:
        steering.install([API4, API6])
        # other.test is not steered now: the VM reaches it directly (its real certificate), and
        # the placeholder goes out unswapped (it is worthless there).
        before = len(echoed(lab))
        code, body, _ = vm_curl(lab, "https://other.test/", "-H", AUTH, connect=OTHER4, cacert="upca.pem")
        assert code == 200 and PH.encode() in body and echoed(lab)[before]["sni"] == "other.test"
        code, _, _ = vm_curl(lab, "https://api.github.test/", "-H", AUTH)  # still swapped via skyguard
        assert code == 200 and ["authorization", "Bearer " + SECRET.decode()] in echoed(lab)[-1]["headers"]
    finally:
        steering.all_destinations = True
        steering.install([API4, API6, OTHER4])


# ---- hot swap: CredentialService.set_policy on the loop, with real steering -----------------------


def steered_table(lab) -> str | None:
    result = in_ns(HOST, "nft", "list", "table", "inet", "skyguard_cred", check=False)
    return result.stdout.decode() if result.returncode == 0 else None


def swapped_last(lab, before) -> bool | None:
    """Whether the upstream's last request (if a new one came) carried the secret."""
    seen = echoed(lab)[before:]
    if not seen:
        return None
    return ["authorization", "Bearer " + SECRET.decode()] in seen[-1]["headers"]


def test_removing_a_credentials_zone_stops_the_swap_and_adding_it_restores_it(lab):
    service, loop, policy = lab["service"], lab["loop"], lab["policy"]
    credential = policy.credentials[0]
    without = dataclasses.replace(policy, credentials=(dataclasses.replace(credential, zones=("elsewhere",)),))
    try:
        loop.run(service.set_policy(without))
        # sdn is no credential zone now: its HTTPS is not steered to the proxy any more, and
        # what reaches the upstream directly carries the placeholder, never the secret.
        assert 'iifname "crx-h-vm"' not in (steered_table(lab) or "")
        before = len(echoed(lab))
        code, body, _ = vm_curl(lab, "https://api.github.test/after-removal", "-H", AUTH, cacert="upca.pem")
        assert code == 200 and swapped_last(lab, before) is False and PH.encode() in body
    finally:
        loop.run(service.set_policy(policy))
    for name, address in LEARNED:
        service.learned(name, address)
    before = len(echoed(lab))
    code, body, _ = vm_curl(lab, "https://api.github.test/after-restore", "-H", AUTH)
    assert code == 200 and swapped_last(lab, before) is True and no_secret(body)


def test_a_policy_with_nothing_to_do_stops_everything_and_the_next_one_starts_it_again(lab):
    service, loop, policy = lab["service"], lab["loop"], lab["policy"]
    bare = dataclasses.replace(policy, credentials=(), tls_termination=())
    try:
        loop.run(service.set_policy(bare))
        assert steered_table(lab) is None  # no steering left behind
        listening = in_ns(HOST, "ss", "-Htln").stdout.decode()
        assert ":25443 " not in listening and ":25080 " not in listening  # the proxy closed its ports
        result = in_ns(UP, *curl_argv("--cacert", str(lab["tmp"] / "svcca.pem"), "--resolve", "crxvm.test:443:10.77.1.2",
                                      "https://crxvm.test/index.html", answer=False), check=False)
        assert result.returncode != 0  # TLS termination is gone with its entry
    finally:
        loop.run(service.set_policy(policy))
    for name, address in LEARNED:
        service.learned(name, address)
    assert "redirect to :25443" in (steered_table(lab) or "")
    before = len(echoed(lab))
    code, _, _ = vm_curl(lab, "https://api.github.test/started-again", "-H", AUTH)
    assert code == 200 and swapped_last(lab, before) is True
    result = in_ns(UP, *curl_argv("--cacert", str(lab["tmp"] / "svcca.pem"), "--resolve", "crxvm.test:443:10.77.1.2",
                                  "https://crxvm.test/index.html"), check=False)
    assert result.returncode == 0 and result.stdout == b"served by the VM in plaintext\n"

