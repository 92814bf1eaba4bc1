"""The lab, exercised for real: namespaces, routed veths, the sealed internet and its servers.

Uses the session `lab` (conftest.py). Traffic stays inside the lab's own namespaces.
"""

import ipaddress
import json
import os
import subprocess
import sys
import time

import pytest

from skyguard.lab import Lab, addresses_for_name
from support.client_waits import ANSWER_WAIT_S, curl_argv, dig_argv, ping_argv

VMS = ["radius1", "tacacs1", "dc1", "dc2", "sdnctl1", "vfw1", "agent1"]
# Never on any real network and not owned by the lab internet: RFC 2544 benchmarking and the
# RFC 9637 IPv6 documentation range. The sealed-lab checks aim only at these.
OUTSIDE_V4 = "198.18.0.1"
OUTSIDE_V6 = "3fff::1"


def run(lab, name, argv, **kw):
    return lab.exec(name, argv, capture_output=True, text=True, timeout=ANSWER_WAIT_S + 40, **kw)


def cli(lab_env, *args):
    return subprocess.run([sys.executable, "-m", "skyguard.cli.main", *args], capture_output=True,
                          text=True, env=lab_env, timeout=60)


def test_up_creates_every_namespace_and_each_vm_reaches_its_gateway(lab):
    status = lab.status()
    assert status["up"]
    assert set(status["namespaces"]) == {lab.prefix + n for n in VMS + ["host", "internet"]}
    assert all(status["namespaces"].values())
    for vm in VMS:
        out = run(lab, vm, ping_argv("-c1", "169.254.1.1"))
        assert out.returncode == 0, out.stdout + out.stderr
        out = run(lab, vm, ping_argv("-6", "-c1", "fe80::1%eth0"))
        assert out.returncode == 0, out.stdout + out.stderr


def test_vm_side_carries_the_workload_mac_and_addresses_host_side_its_interface(lab):
    links = json.loads(run(lab, "dc1", ["ip", "-j", "addr", "show", "eth0"]).stdout)[0]
    assert links["address"] == "02:00:00:00:02:02"
    addrs = {(a["local"], a["prefixlen"]) for a in links["addr_info"] if a.get("scope") == "global"}
    assert addrs == {("10.10.2.2", 32), ("fd00:10:2::2", 128)}
    host_links = {link["ifname"] for link in json.loads(run(lab, "host", ["ip", "-j", "link"]).stdout)}
    assert {f"sg-{vm}" for vm in VMS} | {"lo", "lab-uplink"} == host_links


@pytest.mark.parametrize("target, ttl_field", [("10.10.2.2", "ttl=63"), ("fd00:10:2::2", "ttl=63")])
def test_vm_to_vm_is_routed_through_the_host(lab, target, ttl_field):
    out = run(lab, "radius1", ping_argv("-c1", target))
    assert out.returncode == 0, out.stdout + out.stderr
    # One hop: the host namespace forwarded it (a bridge would leave the TTL at 64).
    assert ttl_field in out.stdout


@pytest.mark.parametrize("server, tcp", [("192.0.2.53", False), ("192.0.2.53", True),
                                         ("2001:db8::53", False), ("2001:db8::53", True)])
def test_dig_resolves_test_names_to_their_deterministic_addresses(lab, server, tcp):
    v4, v6 = addresses_for_name("foo.test")
    args = dig_argv("+short", f"@{server}", *(["+tcp"] if tcp else []))
    assert run(lab, "dc1", args + ["foo.test", "A"]).stdout.split() == [str(v4)]
    assert run(lab, "dc1", args + ["FOO.Test.", "AAAA"]).stdout.split() == [str(v6)]
    assert ipaddress.ip_address(str(v4)) in ipaddress.ip_network("203.0.113.0/24")


def test_names_outside_test_are_nxdomain(lab):
    out = run(lab, "agent1", dig_argv("@192.0.2.53", "example.com", "A"))
    assert "status: NXDOMAIN" in out.stdout


def _log_lines(lab):
    return [json.loads(line) for line in lab.requests_log.read_text().splitlines()]


def test_http_echo_returns_headers_and_body_and_logs_the_request(lab):
    marker = f"http-{time.monotonic_ns()}"
    v4, _ = addresses_for_name("deb.debian.test")
    out = run(lab, "radius1", curl_argv("-H", f"X-Marker: {marker}", "--data-binary", "payload-1",
                                        "http://deb.debian.test/pool/x?y=1"))
    assert out.returncode == 0, out.stderr
    echoed = json.loads(out.stdout)
    assert ["X-Marker", marker] in echoed["headers"]
    assert echoed["body"] == "payload-1" and echoed["path"] == "/pool/x?y=1"
    logged = [r for r in _log_lines(lab) if ["X-Marker", marker] in r["headers"]]
    assert len(logged) == 1
    record = logged[0]
    assert record["client"] == "10.10.1.2" and record["server"] == str(v4)
    assert record["method"] == "POST" and record["body"] == "payload-1" and record["sni"] is None
    assert isinstance(record["time"], float)


@pytest.mark.parametrize("family", ["-4", "-6"])
def test_https_echo_presents_a_lab_ca_certificate_for_the_sni_name(lab, family):
    marker = f"https{family}-{time.monotonic_ns()}"
    url = "https://api.github.test/user"
    base = curl_argv(family, "-H", f"X-Marker: {marker}")
    untrusted = run(lab, "sdnctl1", base + [url])
    assert untrusted.returncode == 60, untrusted.stderr  # not trusted without the lab CA
    out = run(lab, "sdnctl1", base + ["--cacert", str(lab.ca_cert), url])
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["sni"] == "api.github.test"
    logged = [r for r in _log_lines(lab) if ["X-Marker", marker] in r["headers"]]
    assert [(r["scheme"], r["sni"], r["path"]) for r in logged] == [("https", "api.github.test", "/user")]
    v4, v6 = addresses_for_name("api.github.test")
    assert logged[0]["server"] == str(v4 if family == "-4" else v6)


ECHO_CLIENT = r"""
import socket, sys
WAIT = float(sys.argv[1])
for addr in sys.argv[2:]:
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    for port in (7, 514, 6514, 5001):
        u = socket.socket(fam, socket.SOCK_DGRAM); u.settimeout(WAIT); u.connect((addr, port))
        u.send(b"udp-%d" % port); assert u.recv(100) == b"udp-%d" % port, (addr, port)
        t = socket.create_connection((addr, port), timeout=WAIT); t.sendall(b"tcp-%d" % port)
        assert t.recv(100) == b"tcp-%d" % port, (addr, port)
        print(addr, port, "ok")
"""


def test_udp_and_tcp_echo_on_every_port_and_internet_address(lab):
    targets = ["192.0.2.10", "2001:db8::10", "198.51.100.7", "203.0.113.200", "2001:db8:203::9"]
    out = run(lab, "vfw1", [sys.executable, "-c", ECHO_CLIENT, str(ANSWER_WAIT_S), *targets])
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(" ok") == len(targets) * 4


@pytest.mark.parametrize("member", ["radius1", "agent1", "host"])
def test_sealed_nothing_outside_the_lab_is_reachable(lab, member):
    for target in (OUTSIDE_V4, OUTSIDE_V6):
        out = run(lab, member, ping_argv("-c1", target))  # the "unreachable" must come
        assert out.returncode != 0
        assert "unreachable" in (out.stdout + out.stderr).lower(), out.stdout + out.stderr


def _root_ns_addresses():
    found = []
    for link in json.loads(subprocess.run(["ip", "-j", "addr"], capture_output=True, text=True,
                                          check=True).stdout):
        for a in link.get("addr_info", []):
            addr = ipaddress.ip_address(a["local"])
            if not (addr.is_loopback or addr.is_link_local):
                found.append(str(addr))
    return found


def test_sealed_the_internet_has_no_route_to_the_machine_or_beyond(lab):
    routes = run(lab, "internet", ["ip", "-j", "route", "show", "table", "all"]).stdout
    assert all(r["dst"] != "default" for r in json.loads(routes))
    targets = _root_ns_addresses() + [OUTSIDE_V4, OUTSIDE_V6, "8.8.8.8", "2001:4860:4860::8888"]
    for target in targets:
        out = run(lab, "internet", ["ip", "route", "get", target])
        if out.returncode == 0:
            # The machine's own address may fall inside a range the lab internet owns (this
            # machine's eth0 is in 192.0.2.0/24): then the lab answers it itself, on its loopback.
            assert out.stdout.startswith(f"local {target} dev lo"), (target, out.stdout)
        else:
            assert "unreachable" in out.stderr.lower(), (target, out.stderr)


def _links(lab, member):
    return [link for link in json.loads(run(lab, member, ["ip", "-j", "link"]).stdout) if link["ifname"] != "lo"]


def _peer_namespaces(lab, member):
    """Names of the namespaces the member's links lead to (veth peers), from the kernel's own
    netns ids: a link into the machine's namespace, or anywhere else, would show up here."""
    ids = {e["nsid"]: e.get("name") for e in json.loads(
        run(lab, member, ["ip", "-j", "netns", "list-id"]).stdout or "[]")}
    return {link["ifname"]: ids.get(link.get("link_netnsid"), "<not a lab veth>") for link in _links(lab, member)}


def test_sealed_every_lab_link_leads_only_to_another_lab_namespace(lab):
    host_peers = _peer_namespaces(lab, "host")
    assert host_peers == {**{f"sg-{vm}": lab.prefix + vm for vm in VMS},
                          "lab-uplink": lab.prefix + "internet"}
    assert _peer_namespaces(lab, "internet") == {"lab-downlink": lab.prefix + "host"}
    for vm in VMS:
        assert _peer_namespaces(lab, vm) == {"eth0": lab.prefix + "host"}


def test_a_second_up_changes_nothing(lab):
    before = lab.status()
    inodes = {n: os.stat(f"/run/netns/{n}").st_ino for n in before["namespaces"]}
    messages = []
    again = Lab(policy_path=lab.policy_path, prefix=lab.prefix, lab_dir=lab.lab_dir,
                progress=messages.append).up()
    assert again["internet"]["servers"]["pid"] == before["internet"]["servers"]["pid"]
    assert {n: os.stat(f"/run/netns/{n}").st_ino for n in again["namespaces"]} == inodes
    assert any("nothing changed" in m for m in messages)


def test_cli_status_json_names_the_ca_and_requests_log(lab, lab_env):
    out = cli(lab_env, "lab", "status", "--json")
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["ca_cert"] == str(lab.ca_cert) and status["requests_log"] == str(lab.requests_log)
    assert status["internet"]["servers"]["healthy"] and status["internet"]["servers"]["pid"]
    assert [vm["name"] for vm in status["vms"]] == VMS


def test_cli_exec_passes_the_exit_status_through(lab_env):
    assert cli(lab_env, "lab", "exec", "dc2", "--", "sh", "-c", "exit 7").returncode == 7
    out = cli(lab_env, "lab", "exec", "dc2", "--", "ip", "-br", "addr", "show", "eth0")
    assert out.returncode == 0 and "10.10.2.3/32" in out.stdout
    bad = cli(lab_env, "lab", "exec", "nosuchvm", "--", "true")
    assert bad.returncode == 2 and "nosuchvm" in bad.stderr


def test_exec_gives_vms_the_lab_resolver(lab):
    v4, _ = addresses_for_name("files.pythonhosted.test")
    out = run(lab, "agent1", dig_argv("+short", "files.pythonhosted.test"))
    assert out.stdout.split() == [str(v4)]


def test_exec_keeps_bpffs_visible(lab):
    # skyguard runs in the host namespace and pins its maps: `ip netns exec` would hide bpffs.
    out = run(lab, "host", ["stat", "-f", "-c", "%T", "/sys/fs/bpf"])
    assert out.stdout.strip() == "bpf_fs", out.stdout + out.stderr


def test_the_host_namespace_reaches_the_internet_servers(lab):
    # skyguard's DNS and credential proxies run in the host namespace and talk to the internet.
    v4, _ = addresses_for_name("api.github.test")
    out = run(lab, "host", dig_argv("+short", "@192.0.2.53", "api.github.test"))
    assert out.stdout.split() == [str(v4)]
    out = run(lab, "host", curl_argv("--cacert", str(lab.ca_cert), "https://api.github.test/from-host"))
    assert out.returncode == 0 and json.loads(out.stdout)["client"] == "100.64.0.1"


@pytest.mark.parametrize("target", ["203.0.113.5", "2001:db8:203::5", "198.51.100.1", "192.0.2.53"])
def test_internet_addresses_answer_ping(lab, target):
    out = run(lab, "tacacs1", ping_argv("-c1", target))
    assert out.returncode == 0, out.stdout + out.stderr
