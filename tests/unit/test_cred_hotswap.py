"""Policy hot swap in the credential proxy, and whom it trusts upstream, over real loopback
sockets (no privileges). A kept-alive TLS connection from the VM carries requests before and
after set_policy: each is decided wholly under the policy in force when it arrived. The service
as a whole (listeners, nftables steering, TLS termination) swaps in tests/integration/
test_cred_lab.py."""

from __future__ import annotations

import dataclasses
import json
import socket
import ssl

import pytest
from test_cred_proxy import AUTH, SECRET, Rig

from skyguard.lab.ca import LabCA
from skyguard.lab.internet import EchoServer


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    r = Rig(tmp_path_factory.mktemp("crx-swap"))
    yield r
    r.close()


def with_zones(policy, zones):
    credential = dataclasses.replace(policy.credentials[0], zones=tuple(zones))
    return dataclasses.replace(policy, credentials=(credential,))


class KeptAlive:
    """One TLS connection to the proxy, as a VM's HTTP client keeps it."""

    def __init__(self, rig, port):
        context = ssl.create_default_context(cafile=str(rig.tmp / "skyca.pem"))
        self.sock = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                                        server_hostname="api.github.test")
        self.buffer = b""

    def get(self, path: str) -> tuple[int, bytes]:
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: api.github.test\r\n{AUTH}\r\n\r\n".encode())
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self.sock.recv(65536)
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
        while len(rest) < length:
            rest += self.sock.recv(65536)
        self.buffer = rest[length:]
        return int(head.split(b" ")[1]), rest[:length]

    def close(self):
        self.sock.close()


def test_removing_a_zone_stops_the_swap_on_the_next_request_even_on_an_open_connection(rig):
    proxy = rig.make_proxy(lambda s: ("127.0.0.1", rig.echo_port))
    _, https = rig.run(proxy.start("127.0.0.1"))
    client = KeptAlive(rig, https)
    try:
        before = len(rig.echoed())
        assert client.get("/1")[0] == 200
        assert ["authorization", "Bearer " + SECRET.decode()] in rig.echoed()[before]["headers"]

        rig.run(proxy.set_policy(with_zones(rig.policy, ["sandbox"])))  # sdn may no longer use it
        code, body = client.get("/2")  # same connection, next request: the new policy
        assert code == 403 and b"zone sdn may not use credential github" in body
        assert len(rig.echoed()) == before + 1  # nothing went upstream
        entry = rig.log.snapshot()[-1]
        assert (entry["credential"], entry["zone"], entry["result"]) == ("github", "sdn", "blocked_exfiltration")
    finally:
        client.close()

    rig.run(proxy.set_policy(with_zones(rig.policy, ["sdn"])))  # and back: swapped again
    client = KeptAlive(rig, https)
    try:
        before = len(rig.echoed())
        assert client.get("/3")[0] == 200
        assert ["authorization", "Bearer " + SECRET.decode()] in rig.echoed()[before]["headers"]
    finally:
        client.close()
        rig.run(proxy.stop())


def test_a_policy_without_the_credential_forwards_the_placeholder_untouched(rig):
    proxy = rig.make_proxy(lambda s: ("127.0.0.1", rig.echo_port))
    _, https = rig.run(proxy.start("127.0.0.1"))
    try:
        rig.run(proxy.set_policy(dataclasses.replace(rig.policy, credentials=())))
        before = len(rig.echoed())
        code, _ = rig.curl("https://api.github.test/none", "-H", AUTH, port=https)
        assert code == 200
        headers = dict((k.lower(), v) for k, v in rig.echoed()[before]["headers"])
        assert headers["authorization"] == AUTH.split(": ", 1)[1]  # the placeholder: worthless upstream
    finally:
        rig.run(proxy.stop())


def test_upstreams_are_verified_against_the_system_store_and_the_extra_ca(rig, tmp_path, monkeypatch):
    """--upstream-ca (or the lab's CA) adds to the system's trust store, never replaces it.
    OpenSSL reads the system store's location from SSL_CERT_FILE, so a second test CA stands
    in for the system's here."""
    system_ca = LabCA(tmp_path / "system-ca", "stand-in for a system CA")
    cert, key = system_ca.issue(["api.github.test"])
    (tmp_path / "sys.pem").write_bytes(system_ca.cert_path.read_bytes())
    (tmp_path / "up2.pem").write_bytes(cert)
    (tmp_path / "up2.key").write_bytes(key)
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "sys.pem"))
    second = EchoServer(cert=tmp_path / "up2.pem", key=tmp_path / "up2.key").start()
    second_port = second.port
    ports = {"extra": rig.echo_port, "system": second_port}
    target = {"port": rig.echo_port}
    proxy = rig.make_proxy(lambda s: ("127.0.0.1", target["port"]))  # upstream_ca_file = the rig's CA
    _, https = rig.run(proxy.start("127.0.0.1"))
    try:
        for which, port in ports.items():
            target["port"] = port
            code, body = rig.curl(f"https://api.github.test/{which}", "-H", AUTH, port=https)
            assert code == 200, (which, body)
            assert json.loads(body)["path"] == f"/{which}"
    finally:
        rig.run(proxy.stop())
        second.close()


def service_for(rig, tmp_path, policy, **kw):
    from skyguard.credproxy.service import CredentialService

    # `true` stands in for nft: the steering rules themselves are tested in namespaces
    # (tests/integration/test_cred_lab.py); here, what listens and what is decided.
    return CredentialService(policy, rig.secrets, state_dir=tmp_path, decision_log=rig.log, registry=None,
                             address_matches=lambda n, ip: True, listen=["127.0.0.1"], nft=("true",), **kw)


def test_an_unusable_upstream_ca_degrades_the_service_and_serves_no_credential(rig, tmp_path):
    from skyguard.parts import Degraded

    service = service_for(rig, tmp_path, rig.policy, upstream_ca_file=str(tmp_path / "missing.pem"))
    with pytest.raises(Degraded, match="missing.pem"):
        rig.run(service.start())
    try:
        assert service.proxy is None and service.proxy_ports is None and service.steering is None
    finally:
        rig.run(service.stop())


def test_the_service_follows_the_policy_from_nothing_to_credentials_and_back(rig, tmp_path):
    bare = dataclasses.replace(rig.policy, credentials=())
    service = service_for(rig, tmp_path, bare, upstream_ca_file=str(rig.tmp / "upca.pem"))
    rig.run(service.start())
    try:
        assert service.proxy_ports is None and service.steering is None  # nothing to do: nothing runs
        rig.run(service.set_policy(rig.policy))
        assert service.proxy_ports is not None and service.steering.interfaces == ["sg-x"]  # sdnctl1's
        rig.run(service.set_policy(with_zones(rig.policy, ["sandbox"])))
        assert service.steering.interfaces == ["sg-y"]  # agent1's now
        rig.run(service.set_policy(bare))
        assert service.proxy_ports is None and service.steering is None
    finally:
        rig.run(service.stop())
