"""Content rules end to end in network namespaces: cnt-vm (the VM, curl) -- cnt-host (skyguard's
credential service with a content-only policy, its nftables steering, a real clamd) -- cnt-net
(the internet: an HTTPS echo server on 198.51.100.20 that records what it receives). The
destination is no credential destination: a content rule alone steers every HTTPS connection of
its zone to the proxy, and the VM trusts skyguard's CA as exported by `skyguard ca export`.

The service runs in a thread of this process that entered cnt-host's network namespace.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from skyguard.credproxy.interfaces import MemorySecretSource
from skyguard.credproxy.service import CredentialService
from skyguard.credproxy.steering import CredentialSteering
from skyguard.lab.ca import LabCA
from skyguard.lab.internet import request_body
from skyguard.parts import MemoryLog
from skyguard.policy.content import ContentBlock, ContentPolicy, ContentRule
from skyguard.policy.model import Policy, Workload, Zone
from support.content_support import EICAR, LocalClamd, gzip_bomb, harmless_bytes, zipped
from support.netns_support import NamespaceLoop, wait_for_port

VM, HOST, NET = (f"cnt{os.getpid()}-{role}" for role in ("vm", "host", "net"))
VM_IF = "cnt-h-vm"
SERVER = "198.51.100.20"
REPO = str(Path(__file__).resolve().parents[2])


def sh(*cmd, check=True, **kw):
    return subprocess.run(cmd, check=check, capture_output=True, timeout=60, **kw)


def in_ns(ns, *cmd, **kw):
    return sh("ip", "netns", "exec", ns, *cmd, **kw)


def delete_namespaces():
    for ns in (VM, HOST, NET):
        sh("ip", "netns", "del", ns, check=False)


def build_namespaces():
    delete_namespaces()
    for ns in (VM, HOST, NET):
        sh("ip", "netns", "add", ns)
        in_ns(ns, "ip", "link", "set", "lo", "up")
    sh("ip", "link", "add", "cnt-vm0", "netns", VM, "type", "veth", "peer", "name", VM_IF, "netns", HOST)
    sh("ip", "link", "add", "cnt-net0", "netns", NET, "type", "veth", "peer", "name", "cnt-h-net", "netns", HOST)
    for ns, commands in {
        VM: [["addr", "add", "10.78.1.2/24", "dev", "cnt-vm0"], ["link", "set", "cnt-vm0", "up"],
             ["route", "add", "default", "via", "10.78.1.1"]],
        HOST: [["addr", "add", "10.78.1.1/24", "dev", VM_IF], ["addr", "add", "10.78.2.1/24", "dev", "cnt-h-net"],
               ["link", "set", VM_IF, "up"], ["link", "set", "cnt-h-net", "up"],
               ["route", "add", "198.51.100.0/24", "via", "10.78.2.2"]],
        NET: [["addr", "add", "10.78.2.2/24", "dev", "cnt-net0"], ["addr", "add", f"{SERVER}/32", "dev", "cnt-net0"],
              ["link", "set", "cnt-net0", "up"], ["route", "add", "default", "via", "10.78.2.1"]],
    }.items():
        for command in commands:
            in_ns(ns, "ip", *command)
    in_ns(HOST, "sysctl", "-qw", "net.ipv4.ip_forward=1")


def policy_for(clamd_socket: str) -> Policy:
    vm = Workload("cntvm", "web", VM_IF, "02:00:00:78:01:02", (ipaddress.ip_address("10.78.1.2"),))
    rule = ContentRule("no-malware", ("web",), ("upload",), ("http",), ContentBlock(clamav=True, max_size=3 << 20))
    return Policy("cnt", {"web": Zone("web", (vm,))}, {}, (),
                  content=ContentPolicy((rule,), clamd_socket=clamd_socket, scan_timeout=5, max_inspect_bytes=4 << 20))


@pytest.fixture(scope="module")
def lab(root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cnt-lab")
    build_namespaces()
    server, loop, service, clamd = None, None, None, None
    try:
        clamd = LocalClamd(tmp / "clamd").start()  # a Unix socket: reachable from any namespace
        upstream_ca = LabCA(tmp / "upstream-ca", "cnt upstream")
        cert, key = upstream_ca.issue(["files.example"])
        (tmp / "up.pem").write_bytes(cert)
        (tmp / "up.key").write_bytes(key)
        (tmp / "upca.pem").write_bytes(upstream_ca.cert_path.read_bytes())
        echo_log = tmp / "echo.jsonl"
        server = subprocess.Popen(
            ["ip", "netns", "exec", NET, "env", f"PYTHONPATH={REPO}", sys.executable, "-m",
             "skyguard.lab.serve", "echo", "--host", "0.0.0.0", "--port", "443", "--cert", str(tmp / "up.pem"),
             "--key", str(tmp / "up.key"), "--log", str(echo_log)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(NET, SERVER, 443)
        loop = NamespaceLoop(HOST)
        service = CredentialService(
            policy_for(clamd.socket), MemorySecretSource(), state_dir=tmp / "state", decision_log=MemoryLog(),
            registry=None, address_matches=lambda n, ip: False, upstream_ca_file=str(tmp / "upca.pem"),
            http_port=26080, https_port=26443, steer_all_destinations=False, nft=("ip", "netns", "exec", HOST, "nft"))
        loop.run(service.start())
        # The VM's trust: the CA as an operator exports it.
        exported = sh(sys.executable, "-m", "skyguard.cli.main", "ca", "export", "--state-dir", str(tmp / "state"),
                      env=dict(os.environ, PYTHONPATH=REPO))
        (tmp / "skyguard-ca.pem").write_bytes(exported.stdout)
        yield {"tmp": tmp, "echo_log": echo_log, "service": service, "loop": loop, "clamd": clamd}
    finally:
        if service is not None:
            loop.run(service.stop())
            CredentialSteering([], 1, 1, nft=("ip", "netns", "exec", HOST, "nft")).remove()
        if loop is not None:
            loop.close()
        if server is not None:
            server.terminate()
            server.wait(10)
        if clamd is not None:
            clamd.stop()
        delete_namespaces()


def vm_upload(lab, data: bytes, *headers: str):
    path = lab["tmp"] / "upload.bin"
    path.write_bytes(data)
    args = [a for h in headers for a in ("-H", h)]
    result = in_ns(VM, "curl", "-sS", "--max-time", "20", "--cacert", str(lab["tmp"] / "skyguard-ca.pem"),
                   "--resolve", f"files.example:443:{SERVER}", "--data-binary", f"@{path}", *args,
                   "-w", "\n%{http_code}", "https://files.example/upload", check=False)
    body, _, code = result.stdout.rpartition(b"\n")
    return int(code or 0), body


def echoed(lab):
    path = lab["echo_log"]
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def blocks(lab):
    return lab["service"].decision_log.of_kind("content_blocked")


def test_the_content_zone_is_steered_without_any_credential(lab):
    steering = lab["service"].steering
    assert steering is not None and steering.content_interfaces == [VM_IF] and not steering.interfaces


def test_a_clean_file_reaches_the_internet_byte_exact(lab):
    data = harmless_bytes(100_000)
    before = len(echoed(lab))
    code, _ = vm_upload(lab, data)
    assert code == 200
    got = echoed(lab)[before:]
    assert len(got) == 1 and request_body(got[0]) == data and got[0]["sni"] == "files.example"


@pytest.mark.parametrize("data,headers", [
    (EICAR, ()),
    (zipped("holiday.jpg", EICAR), ("Content-Type: image/jpeg",)),
    (gzip_bomb(), ("Content-Encoding: gzip",)),
], ids=["eicar", "eicar-in-zip-as-jpeg", "gzip-bomb"])
def test_blocked_uploads_from_the_vm_never_leave(lab, data, headers):
    before = len(echoed(lab))
    code, body = vm_upload(lab, data, *headers)
    assert code == 403, body
    answer = json.loads(body)
    assert answer["error"] == "content_blocked" and answer["rule"] == "no-malware"
    assert len(echoed(lab)) == before
    entry = blocks(lab)[-1]
    assert (entry["zone"], entry["workload"], entry["destination"], entry["address"]) == ("web", "cntvm", "files.example", SERVER)


def test_clamd_killed_mid_run_means_refusals(lab):
    lab["clamd"].kill()
    try:
        before = len(echoed(lab))
        code, body = vm_upload(lab, b"harmless words\n")
        assert code == 403 and "unavailable" in json.loads(body)["reason"]
        assert len(echoed(lab)) == before
    finally:
        lab["clamd"].start()


def test_a_content_zone_uploads_files_up_to_the_inspection_buffer(lab):
    """Past the proxy's own 1 MiB request limit, up to content.max_inspect_bytes (4 MiB here):
    judged and forwarded byte-exact; past the buffer, refused before the upstream sees a byte."""
    data = harmless_bytes(2 << 20)
    before = len(echoed(lab))
    code, body = vm_upload(lab, data)
    assert code == 200, body[:300]
    assert request_body(echoed(lab)[before]) == data
    code, _ = vm_upload(lab, os.urandom((4 << 20) + 1))
    assert code == 413 and len(echoed(lab)) == before + 1
