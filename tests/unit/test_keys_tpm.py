"""Keys held by a real software TPM (swtpm, started here): `keys.backend: tpm`. A key made through
`skyguard key create` signs inside the TPM and the signature checks (cryptography and openssl)
against `skyguard key public`'s PEM; its private part cannot be exported; its blobs are useless
with another TPM; a power-cycled TPM still signs; the crypto proxy serves it; the policy takes the
backend and refuses what it cannot do (no lab: the proxy listens on loopback)."""

from __future__ import annotations

import base64
import hashlib
import http.client
import ipaddress
import json
import shutil
import subprocess

import pytest

from skyguard import config
from skyguard.errors import BadInput, PolicyError
from skyguard.keys.types import KeyCustodyError
from skyguard.policy.keys import KeyGrant, KeysConfig
from skyguard.policy.parse import parse_policy
from skyguard.tpm.device import TpmConfig
from support.swtpm_support import Swtpm

TPM_KEYS = "\nkeys:\n  backend: tpm\n  keys:\n    - {name: release, zones: [auth], operations: [sign, verify]}\n"


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    emu = Swtpm(tmp_path_factory.mktemp("swtpm-a"))
    emu.start()
    yield emu
    emu.stop()


@pytest.fixture(scope="module")
def made(emulator, tmp_path_factory):
    """A state dir whose TPM is the emulator (as `skyguard tpm init --tcti` saves it), a policy with
    the tpm backend, and key `release` made with `skyguard key create`."""
    tmp = tmp_path_factory.mktemp("tpmkeys")
    state = tmp / "state"
    TpmConfig(tcti=emulator.tcti).save(state)
    policy = tmp / "policy.yaml"
    policy.write_text(config.DEFAULT_POLICY.read_text() + TPM_KEYS)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("SKYGUARD_TPM_TCTI", raising=False)
        mp.setattr(config, "RUN_DIR", tmp / "run")  # no daemon answers here: the CLI writes the log
        out = cli("key", "create", "release", "--type", "ec-p256", policy=policy, state=state)
        assert out.exit_code == 0, out.output
        yield type("Made", (), {"state": state, "policy": policy, "tmp": tmp})
        shutil.rmtree(tmp, ignore_errors=True)


def cli(*args, policy, state):
    from click.testing import CliRunner

    from skyguard.cli.main import cli as main

    return CliRunner().invoke(main, [*args, "--policy", str(policy), "--state-dir", str(state)])


def backend_of(state):
    from skyguard.keys.backends import open_backend

    return open_backend(KeysConfig(backend="tpm"), state)


def test_a_tpm_key_signs_what_key_public_verifies(made, tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec, utils
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    listed = json.loads(cli("key", "list", "--json", policy=made.policy, state=made.state).output)
    assert listed == [{"name": "release", "type": "ec-p256", "backend": "tpm", "extractable": False}]
    pem = cli("key", "public", "release", policy=made.policy, state=made.state).output.encode()
    public = load_pem_public_key(pem)
    assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp256r1"
    backend = backend_of(made.state)
    try:
        for digest in (hashlib.sha256(b"release 1.0").digest(), hashlib.sha384(b"x").digest(),
                       hashlib.sha512(b"y").digest()):
            signature = backend.sign("release", digest)
            algorithm = {32: "SHA256", 48: "SHA384", 64: "SHA512"}[len(digest)]
            from cryptography.hazmat.primitives import hashes

            public.verify(signature, digest, ec.ECDSA(utils.Prehashed(getattr(hashes, algorithm)())))  # raises if bad
        # and openssl, as an operator would check it
        (tmp_path / "pub.pem").write_bytes(pem)
        (tmp_path / "digest").write_bytes(hashlib.sha256(b"release 1.0").digest())
        (tmp_path / "sig").write_bytes(backend.sign("release", hashlib.sha256(b"release 1.0").digest()))
        checked = subprocess.run(["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(tmp_path / "pub.pem"),
                                  "-in", str(tmp_path / "digest"), "-sigfile", str(tmp_path / "sig")],
                                 capture_output=True, text=True)
        assert checked.returncode == 0 and "Verified Successfully" in checked.stdout, checked.stdout + checked.stderr
        with pytest.raises(BadInput, match="a digest is 32, 48 or 64 bytes"):
            backend.sign("release", b"short")
    finally:
        backend.close()


def test_a_tpm_key_never_leaves_the_tpm(made, emulator):
    from skyguard.tpm.device import Tpm

    backend = backend_of(made.state)
    with pytest.raises(KeyCustodyError, match="never leaves it"):
        backend.export_private("release")
    with pytest.raises(KeyCustodyError, match="it signs, it does not decrypt"):
        backend.decrypt("release", b"\x00" * 256)
    for other in ("rsa-3072", "ed25519"):
        with pytest.raises(KeyCustodyError, match="ec-p256 keys only"):
            backend.create("other", other)
    # The TPM itself says the private part is fixed to it and was born inside it.
    record = json.loads((made.state / "keys" / "tpm" / "release.json").read_text())
    public_blob = made.tmp / "release.pub"
    public_blob.write_bytes(base64.b64decode(record["public"]))
    shown = Tpm(emulator.tcti).run("tpm2_print", "-t", "TPM2B_PUBLIC", str(public_blob), flush=False)
    attributes = next(line for line in shown.splitlines() if "value:" in line and "fixedtpm" in line)
    assert {"fixedtpm", "fixedparent", "sensitivedataorigin", "sign"} <= set(attributes.split(":")[1].strip().split("|"))
    assert "decrypt" not in attributes
    # Nothing in the state dir is the key in the clear: no PEM private key, no PKCS#8.
    stored = (made.state / "keys" / "tpm" / "release.json").read_bytes()
    assert b"PRIVATE KEY" not in stored


def test_a_key_made_in_one_tpm_is_useless_with_another(made, tmp_path):
    copy = tmp_path / "copied-state"
    shutil.copytree(made.state, copy)
    with Swtpm(tmp_path / "swtpm-b") as other:
        TpmConfig(tcti=other.tcti).save(copy)
        backend = backend_of(copy)
        try:
            assert backend.public_pem("release") == backend_of(made.state).public_pem("release")  # only public data
            with pytest.raises(KeyCustodyError, match="this TPM cannot load key 'release': it was made by another TPM"):
                backend.sign("release", hashlib.sha256(b"stolen").digest())
        finally:
            backend.close()


def test_a_power_cycled_tpm_still_signs_with_its_keys(made, emulator):
    from skyguard.keys.types import verify_signature

    backend = backend_of(made.state)
    try:
        digest = hashlib.sha256(b"before").digest()
        assert verify_signature(backend.public_pem("release"), "ec-p256", digest, backend.sign("release", digest))
        emulator.reboot()  # the saved context of the loaded key is void now: the backend loads the blobs again
        digest = hashlib.sha256(b"after").digest()
        assert verify_signature(backend.public_pem("release"), "ec-p256", digest, backend.sign("release", digest))
    finally:
        backend.close()


class Recorded:
    def __init__(self):
        self.entries = []

    def record(self, kind, /, **fields):
        self.entries.append(dict(fields, type=kind))


def test_the_crypto_proxy_signs_with_a_tpm_key(made):
    from skyguard.keys.proxy import CryptoProxy
    from skyguard.keys.types import verify_signature
    from skyguard.parts import LoopThread
    from skyguard.policy.model import Policy, Workload, Zone

    vm1 = Workload("vm1", "auth", "lo", "02:00:00:00:00:01", (ipaddress.ip_address("127.0.0.1"),))
    grants = (KeyGrant("release", ("auth",), ("sign", "verify", "decrypt"), 1000, 1000),)
    policy = Policy(name="t", zones={"auth": Zone("auth", (vm1,))}, networks={}, rules=(),
                    keys=KeysConfig(backend="tpm", port=0, grants=grants))
    loop, recorded = LoopThread(), Recorded()
    part = CryptoProxy(policy, made.state, recorded, hosts=("127.0.0.1",))
    loop.call(part.start())
    try:
        def post(path, body):
            conn = http.client.HTTPConnection("127.0.0.1", part.port, timeout=30)
            try:
                conn.request("POST", path, body=json.dumps(body), headers={"content-type": "application/json"})
                response = conn.getresponse()
                return response.status, json.loads(response.read())
            finally:
                conn.close()

        digest = hashlib.sha256(b"through the proxy").digest()
        status, reply = post("/v1/keys/release/sign", {"digest": digest.hex()})
        assert status == 200, reply
        signature = base64.b64decode(reply["signature"])
        assert verify_signature(part.backend.public_pem("release"), "ec-p256", digest, signature)
        status, reply = post("/v1/keys/release/verify", {"digest": digest.hex(),
                                                         "signature": base64.b64encode(signature).decode()})
        assert (status, reply["valid"]) == (200, True)
        status, reply = post("/v1/keys/release/decrypt", {"ciphertext": base64.b64encode(b"\x01" * 64).decode()})
        assert status == 403 and "it does not decrypt" in reply["error"] and "plaintext" not in reply
        assert [e["outcome"] for e in recorded.entries if e["digest"] == digest.hex()][:1] == ["ok"]
    finally:
        loop.call(part.stop())
        loop.stop()


def test_key_rm_deletes_a_tpm_key_and_each_change_is_logged(made):
    from skyguard.tlog.entries import decode
    from skyguard.tlog.store import LogReader

    assert cli("key", "create", "scratch", "--type", "ec-p256", policy=made.policy, state=made.state).exit_code == 0
    refused = cli("key", "create", "wide", "--type", "rsa-3072", policy=made.policy, state=made.state)
    assert isinstance(refused.exception, KeyCustodyError) and "ec-p256 keys only" in str(refused.exception)
    assert cli("key", "rm", "scratch", policy=made.policy, state=made.state).exit_code == 0
    names = [k["name"] for k in json.loads(cli("key", "list", "--json", policy=made.policy, state=made.state).output)]
    assert names == ["release"]
    gone = cli("key", "public", "scratch", policy=made.policy, state=made.state)
    assert isinstance(gone.exception, KeyCustodyError) and "no key named 'scratch'" in str(gone.exception)
    kinds = [(e["type"], e["name"]) for e in (decode(raw) for _, raw in LogReader(made.state / "log").entries())]
    assert kinds == [("key_create", "release"), ("key_create", "scratch"), ("key_remove", "scratch")]


def test_the_policy_takes_the_tpm_backend_and_refuses_what_it_cannot_do():
    base = config.DEFAULT_POLICY.read_text()
    keys = parse_policy(base + TPM_KEYS).keys
    assert (keys.backend, keys.module, keys.token, keys.pin_secret) == ("tpm", None, None, None)
    with pytest.raises(PolicyError, match="key 'release': the tpm backend's keys .ec-p256. only sign"):
        parse_policy(base + TPM_KEYS.replace("[sign, verify]", "[sign, decrypt]"))
    with pytest.raises(PolicyError, match="keys.token: the tpm backend takes no `token:`"):
        parse_policy(base + TPM_KEYS.replace("backend: tpm\n", "backend: tpm\n  token: skyguard\n"))


def test_a_tpm_key_rotated_by_another_process_is_not_signed_with_from_its_loaded_context(made):
    """The proxy keeps each key loaded in the TPM (a saved context); `skyguard key rm` and `key
    create` of the same name in another process make a new key: the proxy must sign with the new
    key, never with the removed one's context (that key is gone for good)."""
    from skyguard.keys.types import verify_signature

    proxy = backend_of(made.state)
    try:
        assert cli("key", "create", "rotated", "--type", "ec-p256", policy=made.policy, state=made.state).exit_code == 0
        digest = hashlib.sha256(b"before").digest()
        assert verify_signature(proxy.public_pem("rotated"), "ec-p256", digest, proxy.sign("rotated", digest))
        assert cli("key", "rm", "rotated", policy=made.policy, state=made.state).exit_code == 0
        assert cli("key", "create", "rotated", "--type", "ec-p256", policy=made.policy, state=made.state).exit_code == 0
        digest = hashlib.sha256(b"after").digest()
        assert verify_signature(proxy.public_pem("rotated"), "ec-p256", digest, proxy.sign("rotated", digest))
    finally:
        proxy.close()
        cli("key", "rm", "rotated", policy=made.policy, state=made.state)


def test_a_failing_tpm_backend_tells_the_vm_nothing_of_the_host_and_logs_why(made, tmp_path, caplog):
    """A TPM that does not answer (its TCTI names a loopback port nothing listens on) and a key
    whose record the proxy cannot read: the VM gets 503 with a generic error, not the TCTI address
    or the state dir's paths; the host's log says which key, which operation and why."""
    import logging
    import socket

    from skyguard.keys.proxy import CryptoProxy
    from skyguard.parts import LoopThread
    from skyguard.policy.model import Policy, Workload, Zone

    state = tmp_path / "state"
    shutil.copytree(made.state, state)
    with socket.socket() as s:  # a free port: nothing answers there
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    tcti = f"swtpm:host=127.0.0.1,port={dead}"
    TpmConfig(tcti=tcti).save(state)
    shutil.copy(state / "keys" / "tpm" / "release.json", state / "keys" / "tpm" / "broken.json")
    vm1 = Workload("vm1", "auth", "lo", "02:00:00:00:00:01", (ipaddress.ip_address("127.0.0.1"),))
    grants = tuple(KeyGrant(name, ("auth",), ("sign", "verify"), 1000, 1000) for name in ("release", "broken"))
    policy = Policy(name="t", zones={"auth": Zone("auth", (vm1,))}, networks={}, rules=(),
                    keys=KeysConfig(backend="tpm", port=0, grants=grants))
    loop, recorded = LoopThread(), Recorded()
    part = CryptoProxy(policy, state, recorded, hosts=("127.0.0.1",))
    loop.call(part.start())
    (state / "keys" / "tpm" / "broken.json").write_text("{not json")  # damaged after the proxy started
    try:
        def request(method, path, body=None):
            conn = http.client.HTTPConnection("127.0.0.1", part.port, timeout=60)
            try:
                conn.request(method, path, body=None if body is None else json.dumps(body))
                response = conn.getresponse()
                return response.status, response.read().decode()
            finally:
                conn.close()

        with caplog.at_level(logging.WARNING, logger="skyguard.keys"):
            signed = request("POST", "/v1/keys/release/sign", {"digest": "ab" * 32})
            public = request("GET", "/v1/keys/broken/public")
        for status, text in (signed, public):
            assert status == 503 and json.loads(text) == {"error": "key backend unavailable"}, text
            assert str(dead) not in text and str(state) not in text and "swtpm" not in text
        logged = caplog.text
        assert "'release'" in logged and "sign" in logged and "cannot reach the TPM" in logged and tcti in logged
        assert "'broken'" in logged and "public" in logged and "cannot read TPM key" in logged
        assert [(e["key"], e["operation"], e["outcome"], e["status"]) for e in recorded.entries] == \
            [("release", "sign", "error", 503), ("broken", "public", "error", 503)]
    finally:
        loop.call(part.stop())
        loop.stop()
