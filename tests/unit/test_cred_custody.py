"""The interception CA, `skyguard ca export`, PEM handling without disk, TLS termination's
configuration checks and the steering ruleset text. No privileges needed."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import stat

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store

from skyguard.cli.main import cli
from skyguard.credproxy.ca import CertificateAuthority
from skyguard.credproxy.interfaces import CredentialMetrics, MemorySecretSource
from skyguard.credproxy.steering import CredentialSteering, TerminationSteer
from skyguard.credproxy.termination import TlsTerminator
from skyguard.custody.pemload import load_cert_chain_from_memory, split_pem
from skyguard.errors import CredentialError
from skyguard.lab.ca import LabCA
from skyguard.parts import MemoryLog
from skyguard.policy.model import Policy, TlsTermination, Workload, Zone


def test_ca_is_created_once_private_and_reused(tmp_path):
    first = CertificateAuthority(tmp_path / "ca")
    assert stat.S_IMODE(os.stat(tmp_path / "ca").st_mode) == 0o700
    for name in ("ca-key.pem", "ca-cert.pem"):
        assert stat.S_IMODE(os.stat(tmp_path / "ca" / name).st_mode) == 0o600
    again = CertificateAuthority(tmp_path / "ca")
    assert again.certificate_pem == first.certificate_pem
    assert b"PRIVATE" not in first.certificate_pem and "PRIVATE" not in repr(first)


def test_leaf_chains_to_the_ca_for_exactly_its_name(tmp_path):
    authority = CertificateAuthority(tmp_path / "ca")
    leaf = x509.load_pem_x509_certificate(authority.mint("api.github.test"))
    verifier = PolicyBuilder().store(Store([authority.certificate])).build_server_verifier(
        x509.DNSName("api.github.test"))
    verifier.verify(leaf, [])
    other = PolicyBuilder().store(Store([authority.certificate])).build_server_verifier(x509.DNSName("other.test"))
    with pytest.raises(x509.verification.VerificationError):
        other.verify(leaf, [])
    assert authority.server_context("api.github.test") is authority.server_context("api.github.test")  # cached


def test_half_written_ca_is_an_error_not_a_silent_new_ca(tmp_path):
    CertificateAuthority(tmp_path / "ca")
    (tmp_path / "ca" / "ca-cert.pem").unlink()
    with pytest.raises(CredentialError, match="incomplete"):
        CertificateAuthority(tmp_path / "ca")


def test_cli_ca_export_prints_only_the_certificate(tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["ca", "export", "--state-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("-----BEGIN CERTIFICATE-----") and "PRIVATE" not in result.output
    assert x509.load_pem_x509_certificate(result.output.encode()).subject.rfc4514_string().endswith("O=skyguard")
    as_json = runner.invoke(cli, ["ca", "export", "--state-dir", str(tmp_path), "--json"])
    assert '"sha256_fingerprint"' in as_json.output and result.output.strip() in as_json.output.replace("\\n", "\n")


def test_pem_split_and_load_from_memory(tmp_path):
    import ssl

    ca = LabCA(tmp_path / "ca")
    cert, key = ca.issue(["svc.test"])
    chain, private = split_pem(key + cert)
    assert chain.startswith(b"-----BEGIN CERTIFICATE") and b"PRIVATE KEY" in private
    load_cert_chain_from_memory(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), chain, private)
    with pytest.raises(CredentialError) as error:
        split_pem(cert)
    with pytest.raises(CredentialError) as mismatch:
        load_cert_chain_from_memory(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), chain, ca.issue(["x"])[1])
    assert b"PRIVATE" not in str(error.value).encode() + str(mismatch.value).encode()


def _policy(forward_to=8080):
    vm = Workload("web1", "web", "sg-web1", "02:00:00:00:09:02", (ipaddress.ip_address("10.9.0.2"),))
    return Policy("t", {"web": Zone("web", (vm,))}, {}, (),
                  tls_termination=(TlsTermination("web1", 443, forward_to, "web1-tls"),))


def test_termination_refuses_missing_certificate_and_loops(tmp_path):
    async def start(policy, secrets):
        terminator = TlsTerminator(policy, secrets, decision_log=MemoryLog(), metrics=CredentialMetrics())
        try:
            return await terminator.start("127.0.0.1")
        finally:
            await terminator.stop()

    with pytest.raises(CredentialError, match="skyguard secret set web1-tls"):
        asyncio.run(start(_policy(), MemorySecretSource({})))
    cert, key = LabCA(tmp_path / "ca").issue(["web1.test"])
    with pytest.raises(CredentialError, match="must differ"):
        asyncio.run(start(_policy(forward_to=443), MemorySecretSource({"web1-tls": cert + key})))
    listeners = asyncio.run(start(_policy(), MemorySecretSource({"web1-tls": cert + key})))
    assert listeners[0].vm_addresses == ("10.9.0.2",) and listeners[0].listen_port > 0


def test_steering_ruleset_is_atomic_and_validates_names():
    steering = CredentialSteering(["sg-sdnctl1"], 25080, 25443, [TerminationSteer(("10.1.0.2", "fd00::2"), 443, 25500)])
    text = steering.ruleset(["203.0.113.10", "2001:db8::10"])
    assert text.startswith("table inet skyguard_cred {}\ndelete table inet skyguard_cred\n")  # replace in one go
    assert 'iifname { "sg-sdnctl1" } ip daddr @cred_v4 tcp dport 443 redirect to :25443' in text
    assert "add element inet skyguard_cred cred_v6 { 2001:db8::10 }" in text
    assert "ip6 daddr { fd00::2 } tcp dport 443 redirect to :25500" in text
    with pytest.raises(CredentialError):
        CredentialSteering(['x"; flush ruleset; "'], 1, 2).ruleset()
    with pytest.raises(CredentialError):
        steering.ruleset(["not-an-ip"])


def test_termination_set_policy_keeps_unchanged_listeners_and_replaces_changed_ones(tmp_path):
    import dataclasses

    cert, key = LabCA(tmp_path / "ca").issue(["web1.test"])
    other_cert, other_key = LabCA(tmp_path / "other-ca").issue(["web1.test"])
    secrets = MemorySecretSource({"web1-tls": cert + key, "web1-tls-2": other_cert + other_key})

    async def run():
        terminator = TlsTerminator(_policy(), secrets, decision_log=MemoryLog(), metrics=CredentialMetrics())
        try:
            [first] = await terminator.start("127.0.0.1")
            [same] = await terminator.set_policy(_policy())
            entry = dataclasses.replace(_policy().tls_termination[0], certificate="web1-tls-2")
            [changed] = await terminator.set_policy(dataclasses.replace(_policy(), tls_termination=(entry,)))
            served = await served_certificate(changed.listen_port)
            gone = await terminator.set_policy(dataclasses.replace(_policy(), tls_termination=()))
            refused = None
            try:
                await asyncio.open_connection("127.0.0.1", changed.listen_port)
            except OSError as error:
                refused = error
            return first, same, served, gone, refused
        finally:
            await terminator.stop()

    async def served_certificate(port):
        import ssl

        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="web1.test")
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        return x509.load_der_x509_certificate(der)

    first, same, served, gone, refused = asyncio.run(run())
    assert same.listen_port == first.listen_port  # untouched: its connections go on
    assert served == x509.load_pem_x509_certificate(other_cert)  # another certificate: served at once
    assert gone == [] and isinstance(refused, ConnectionRefusedError)  # removed: nothing listens


def test_one_client_cannot_hold_every_termination_connection(tmp_path):
    cert, key = LabCA(tmp_path / "ca").issue(["web1.test"])
    policy = Policy("t", {"web": Zone("web", (Workload("web1", "web", "sg-web1", "02:00:00:00:09:02",
                                                           (ipaddress.ip_address("127.0.0.1"),)),))}, {}, (),
                    tls_termination=(TlsTermination("web1", 443, 18443, "web1-tls"),))

    async def echo(reader, writer):  # the VM's plaintext service
        while data := await reader.read(100):
            writer.write(data)

    async def run():
        import ssl

        vm = await asyncio.start_server(echo, "127.0.0.1", 18443)
        terminator = TlsTerminator(policy, MemorySecretSource({"web1-tls": cert + key}), decision_log=MemoryLog(),
                                   metrics=CredentialMetrics(), max_connections_per_client=2)
        [listener] = await terminator.start("127.0.0.1")
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE

        async def exchange(source):
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.listen_port, ssl=context,
                                                           server_hostname="web1.test", local_addr=(source, 0))
            writer.write(b"ping")
            try:
                return await asyncio.wait_for(reader.read(4), 5), writer
            except (ConnectionResetError, ssl.SSLError):
                return b"", writer

        try:
            held = [await exchange("127.0.0.2") for _ in range(2)]
            third, _ = await exchange("127.0.0.2")  # the same client's third: closed at once
            other, _ = await exchange("127.0.0.3")  # another client still gets through
            return [answer for answer, _ in held], third, other
        finally:
            await terminator.stop()
            vm.close()

    held, third, other = asyncio.run(run())
    assert held == [b"ping", b"ping"] and third == b"" and other == b"ping"
