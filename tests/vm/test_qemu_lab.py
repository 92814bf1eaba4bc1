"""The vm tier: skyguard's core scenarios against real QEMU guests on taps (SPEC.md section 5
with `lab up --vms qemu`). radius1, dc1, sdnctl1 and agent1 are guests (Debian's cloud kernel,
busybox, software emulation unless KVM works); tacacs1, dc2 and vfw1 stay namespaces, so the
daemon enforces both kinds of interface at once. Guests boot once for the module and one daemon
serves it; the tests that kill things restore them. Timeouts are bounds against hangs.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time

import pytest
from guest_support import (
    PY,
    RunningDaemon,
    attached_programs,
    drop_count,
    gsh,
    probe,
    start_listener,
    start_tcp_echo,
    stop_process,
    vm_lab,
    wait_for,
)

from skyguard import config

GUESTS = ("radius1", "dc1", "sdnctl1", "agent1")
ADDR = {"radius1": ("10.10.1.2", "fd00:10:1::2"), "dc1": ("10.10.2.2", "fd00:10:2::2"),
        "sdnctl1": ("10.10.3.2", "fd00:10:3::2"), "agent1": ("10.10.5.2", "fd00:10:5::2"),
        "vfw1": ("10.10.4.2", "fd00:10:4::2")}
MAC = {"radius1": "02:00:00:00:01:02", "agent1": "02:00:00:00:05:02"}
SYSLOG = ("192.0.2.10", "2001:db8::10")
TOKEN = "ghp-vm-tier-token-only-skyguard-holds"
PLACEHOLDER = "sg-placeholder-github-7f3a"
SSH_PORT = 24322


@pytest.fixture(scope="module")
def lab(root, tmp_path_factory):
    yield from vm_lab(tmp_path_factory, "q", "qemu=" + ",".join(GUESTS))


@pytest.fixture(scope="module")
def daemon(lab, tmp_path_factory):
    d = RunningDaemon(lab, tmp_path_factory.mktemp("vmdaemon"))
    d.env["SKYGUARD_LAB_DIR"] = str(lab.lab_dir.parent)  # the daemon finds (and trusts) the lab's CA
    secret = subprocess.run(d._in_host([PY, "-m", "skyguard.cli.main", "secret", "set", "github"]),
                            input=TOKEN, text=True, capture_output=True, env=d.env, cwd="/", timeout=60)
    assert secret.returncode == 0, secret.stderr
    start_tcp_echo(lab, "dc1", [389, 636])
    start_tcp_echo(lab, "radius1", [389, 49])
    listener = start_listener(lab, "vfw1", [443], [])  # a namespace VM: the integration tier's listener
    try:
        d.start()
        yield d
    finally:
        d.cleanup()
        stop_process(listener)


def test_each_guest_has_its_workload_identity_on_a_tap(lab, daemon):
    status = lab.status(probe=True)
    guests = {vm["name"]: vm for vm in status["vms"] if vm.get("kind") == "qemu"}
    assert set(guests) == set(GUESTS)
    for name, vm in guests.items():
        assert vm["state"] == "running" and vm["answering"], vm
        inside = gsh(lab, name, "cat /sys/class/net/eth0/address; ip -o addr show dev eth0; ip route; ip -6 route")
        assert vm["mac"] in inside.stdout
        for addr in vm["addresses"]:
            assert addr in inside.stdout
        assert "default via 169.254.1.1" in inside.stdout and "default via fe80::1" in inside.stdout
        # the host side: a tap (tun driver) named by the workload's interface, the guest's gateway
        link = lab.exec("host", ["ip", "-d", "-j", "addr", "show", "dev", vm["interface"]], capture_output=True,
                        text=True, lab_resolver=False)
        info = json.loads(link.stdout)[0]
        assert info["linkinfo"]["info_kind"] == "tun"
        assert {"169.254.1.1", "fe80::1"} <= {a["local"] for a in info["addr_info"]}
    # the CLI: `lab exec` passes the guest's output and exit status through; `lab status` shows it
    env = dict(os.environ, SKYGUARD_LAB_PREFIX=lab.prefix, SKYGUARD_LAB_DIR=str(lab.lab_dir.parent),
               PYTHONPATH=str(config.REPO_ROOT))
    cli = [PY, "-m", "skyguard.cli.main", "lab"]
    out = subprocess.run(cli + ["exec", "dc1", "--", "sh", "-c", "hostname; echo oops >&2; exit 3"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert (out.returncode, out.stdout, out.stderr) == (3, "dc1\n", "oops\n")
    shown = subprocess.run(cli + ["status"], capture_output=True, text=True, env=env, timeout=60)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert f"agent1    QEMU guest pid {guests['agent1']['pid']} running, answering" in shown.stdout
    # the daemon attached its programs to every tap exactly as to the veths
    attached = attached_programs(daemon.status())
    assert {f"sg-{g}" for g in GUESTS} | {"sg-tacacs1", "sg-dc2", "sg-vfw1"} == set(attached)
    assert all(ids[0] and ids[1] for ids in attached.values()), attached


@pytest.mark.parametrize("fam", [0, 1], ids=["v4", "v6"])
def test_allowed_and_denied_flows_both_ways(lab, daemon, fam):
    results = probe(lab, "radius1", [("tcp", ADDR["dc1"][fam], 389), ("icmp", ADDR["dc1"][fam], 0),
                                     ("udp", SYSLOG[fam], 514), ("udp", SYSLOG[fam], 7),
                                     ("tcp", ADDR["vfw1"][fam], 443)])
    # auth-to-directory, syslog; not udp/7, not the firewall
    assert results == [True, True, True, False, False]
    # not the other way round: directory -> auth is not a rule
    assert probe(lab, "dc1", [("tcp", ADDR["radius1"][fam], 389), ("icmp", ADDR["radius1"][fam], 0)]) == [False, False]
    # the sandbox reaches nothing in corp, guests and namespaces alike; syslog it may
    assert probe(lab, "agent1", [("tcp", ADDR["dc1"][fam], 389), ("icmp", ADDR["vfw1"][fam], 0),
                                 ("udp", SYSLOG[fam], 514)]) == [False, False, True]
    # a namespace VM and a guest talk through the same daemon: vfw1 (namespace) -> radius1 tcp/49
    out = lab.exec("vfw1", ["sh", "-c", f"printf probe | timeout 5 nc -N {ADDR['radius1'][fam]} 49"],
                   capture_output=True, text=True, lab_resolver=False)
    assert out.stdout == "probe", out.stderr


def test_flow_records_name_the_guests(lab, daemon):
    assert probe(lab, "radius1", [("tcp", ADDR["dc1"][0], 636)]) == [True]

    def starts():
        records = json.loads(daemon.cli("flows", "--json", "--limit", "10000", "--verdict", "allow",
                                        check=True).stdout)["records"]
        return {(r["interface"], r["direction"]) for r in records
                if r["type"] == "flow_start" and r["dport"] == 636 and r["src"] == ADDR["radius1"][0]
                and r["rule"] == "auth-to-directory"}
    assert wait_for(lambda: starts() == {("sg-radius1", "egress"), ("sg-dc1", "ingress")} and True, 15,
                    "flow_start records of radius1 -> dc1 tcp/636")


def test_a_guest_that_spoofs_its_address_or_mac_is_dropped(lab, daemon):
    foreign = "10.10.2.99"  # an address of the directory zone
    assert gsh(lab, "agent1", f"ip addr add {foreign}/32 dev eth0").returncode == 0
    try:
        before = drop_count(daemon.status(), "sandbox", "spoof_ip")
        assert probe(lab, "agent1", [("udp", SYSLOG[0], 514, ADDR["agent1"][0]),
                                     ("udp", SYSLOG[0], 514, foreign)]) == [True, False]
        assert drop_count(daemon.status(), "sandbox", "spoof_ip") > before
    finally:
        gsh(lab, "agent1", f"ip addr del {foreign}/32 dev eth0")
    before = drop_count(daemon.status(), "sandbox", "spoof_mac")
    assert gsh(lab, "agent1", "ip link set eth0 address 02:00:00:00:05:99").returncode == 0
    try:
        assert probe(lab, "agent1", [("udp", SYSLOG[0], 514)]) == [False]
        assert drop_count(daemon.status(), "sandbox", "spoof_mac") > before
    finally:
        gsh(lab, "agent1", f"ip link set eth0 address {MAC['agent1']}")
    assert probe(lab, "agent1", [("udp", SYSLOG[0], 514)]) == [True]


def test_dns_by_name_from_a_guest(lab, daemon):
    ca = lab.ca_cert.read_text()
    assert gsh(lab, "agent1", "cat > /tmp/lab-ca.pem", input=ca).returncode == 0
    # the sandbox may fetch packages by name; the name resolves through skyguard's DNS proxy
    ok = gsh(lab, "agent1", "curl -sS -m 10 --cacert /tmp/lab-ca.pem https://pypi.sandbox.test/")
    assert ok.returncode == 0 and json.loads(ok.stdout)["sni"] == "pypi.sandbox.test", ok.stderr
    # a name no rule names is refused, and its address (if learned some other way) is not open
    refused = gsh(lab, "agent1", "nslookup other.sandbox.test")
    assert refused.returncode != 0
    from skyguard.lab.addressing import addresses_for_name
    other = str(addresses_for_name("other.sandbox.test")[0])
    assert probe(lab, "agent1", [("tcp", other, 443)]) == [False]


def test_credential_swap_from_inside_a_guest(lab, daemon):
    ca = daemon.cli("ca", "export", check=True).stdout
    assert gsh(lab, "sdnctl1", "cat > /tmp/skyguard-ca.pem", input=ca).returncode == 0
    out = gsh(lab, "sdnctl1", "curl -sS -m 20 --cacert /tmp/skyguard-ca.pem "
                              f"-H 'Authorization: Bearer {PLACEHOLDER}' https://api.github.test/")
    assert out.returncode == 0, out.stderr
    assert TOKEN not in out.stdout  # scrubbed from the answer
    assert json.loads(out.stdout)["sni"] == "api.github.test", out.stdout

    def upstream_saw():  # what the lab's HTTPS server logged of requests to api.github.test
        seen = [json.loads(line) for line in lab.requests_log.read_text().splitlines() if line.strip()]
        return [r for r in seen if r.get("sni") == "api.github.test"]
    ours = wait_for(upstream_saw, 10, "the upstream's record of the swapped request")
    assert any([k.lower(), v] == ["authorization", f"Bearer {TOKEN}"] for r in ours for k, v in r["headers"]), ours
    assert not any(PLACEHOLDER in json.dumps(r["headers"]) for r in ours)


def test_garbage_and_a_mac_flood_from_a_guest_change_nothing_for_the_others(lab, daemon):
    before = drop_count(daemon.status(), "sandbox", "spoof_mac")
    flood = gsh(lab, "agent1", "rawsend eth0 garbage 3000 && rawsend eth0 macflood 3000", timeout=120)
    assert flood.returncode == 0 and flood.stdout.split() == ["3000", "3000"], flood.stderr
    assert daemon.running()
    assert drop_count(daemon.status(), "sandbox", "spoof_mac") >= before + 3000
    assert probe(lab, "radius1", [("tcp", ADDR["dc1"][0], 389), ("tcp", ADDR["vfw1"][0], 443)]) == [True, False]
    assert probe(lab, "agent1", [("udp", SYSLOG[0], 514), ("tcp", ADDR["dc1"][0], 389)]) == [True, False]


def test_qemu_killed_under_the_daemon_and_a_new_guest_on_the_same_tap_name(lab, daemon):
    vm = next(v for v in lab.status()["vms"] if v["name"] == "agent1")
    subprocess.run(["kill", "-9", str(vm["pid"])], check=True)
    wait_for(lambda: "sg-agent1" not in attached_programs(daemon.status()), 10,
             "the daemon to forget sg-agent1 once its tap is gone")
    assert lab.exec("host", ["ip", "link", "show", "sg-agent1"], capture_output=True,
                    lab_resolver=False).returncode != 0
    assert lab.status()["up"] is False  # the lab reports the stopped guest
    seen = {}
    watching = threading.Event()

    def watch():  # when the new tap appears, and when the daemon's program is on it
        host = ["nsenter", f"--net={daemon.host_netns}", "--"]
        while not watching.is_set() and "attached" not in seen:
            now = time.monotonic()
            if "tap" not in seen and subprocess.run(host + ["ip", "link", "show", "sg-agent1"],
                                                    capture_output=True).returncode == 0:
                seen["tap"] = now
            if "tap" in seen and "sg_from_vm" in subprocess.run(
                    host + ["tc", "filter", "show", "dev", "sg-agent1", "ingress"], capture_output=True,
                    text=True).stdout:
                seen["attached"] = now
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        lab.restart_guest("agent1")
        booted = time.monotonic()
        wait_for(lambda: "attached" in seen, 10, "the daemon's program on the new sg-agent1")
    finally:
        watching.set()
        watcher.join()
    # The daemon enforced the new tap before the guest's agent first answered (so before it
    # could send anything of its own); how fast is reported, not asserted.
    assert seen["attached"] < booted
    print(f"new tap attached {seen['attached'] - seen['tap']:.2f}s after it appeared")
    ids = wait_for(lambda: attached_programs(daemon.status()).get("sg-agent1"), 10, "status to list sg-agent1")
    assert all(ids)
    assert probe(lab, "agent1", [("udp", SYSLOG[0], 514), ("tcp", ADDR["dc1"][0], 389)]) == [True, False]
    assert lab.status()["up"] is True


def test_ssh_through_skyguard_to_a_guests_sshd(lab, daemon, tmp_path):
    """An operator's OpenSSH client -> skyguard's SSH proxy (in the host namespace) -> dropbear
    in the guest, logged into with skyguard's own VM key."""
    key = tmp_path / "alice"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    vm_key = daemon.cli("admin", "vm-key", check=True).stdout.strip()
    assert gsh(lab, "radius1", "mkdir -p -m 700 /root/.ssh && cat > /root/.ssh/authorized_keys && "
                               "chmod 600 /root/.ssh/authorized_keys", input=vm_key + "\n").returncode == 0
    policy = tmp_path / "with-admin.yaml"
    policy.write_text(lab.policy_path.read_text() + f"""
admin:
  ssh:
    listen: 127.0.0.1:{SSH_PORT}
    operators:
      - name: alice
        public_key: "{(tmp_path / 'alice.pub').read_text().strip()}"
        may_access: [auth]
""")
    daemon.cli("policy", "load", str(policy), check=True)
    try:
        ssh = ["nsenter", f"--net={daemon.host_netns}", "ssh", "-F", "/dev/null", "-i", str(key),
               "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
               "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=20", "-p", str(SSH_PORT)]
        command = ["alice+radius1@127.0.0.1", "hostname; cat /sys/class/net/eth0/address"]
        out = wait_for(lambda: (r := subprocess.run(ssh + command,
                                                    capture_output=True, text=True, timeout=60)).returncode == 0 and r,
                       30, "an SSH session through skyguard to radius1")
        assert out.stdout.split() == ["radius1", MAC["radius1"]], out.stderr
        # a zone alice may not access: refused by skyguard, never reaching the guest
        denied = subprocess.run(ssh + ["alice+agent1@127.0.0.1", "true"], capture_output=True, text=True, timeout=60)
        assert denied.returncode != 0
    finally:
        daemon.cli("policy", "load", str(lab.policy_path), check=True)


def test_fail_closed_across_a_sigkill_of_the_daemon(lab, daemon):
    """Last: the daemon stays dead (a restart costs a compile; the integration tier covers it),
    and the module's cleanup detaches what it left."""
    daemon.ensure_running()
    daemon.kill()
    # the programs stay attached on the taps with the last policy: denied stays denied
    assert probe(lab, "agent1", [("tcp", ADDR["dc1"][0], 389), ("udp", SYSLOG[0], 514),
                                 ("tcp", ADDR["dc1"][1], 389)]) == [False, True, False]
    assert probe(lab, "radius1", [("tcp", ADDR["dc1"][1], 389), ("tcp", ADDR["vfw1"][0], 443)]) == [True, False]
