"""Key custody without a token or sockets: the policy's keys: section (and credentials'
client_certificate), the crypto API's decisions (request shapes, zones, operations, rate limits),
and the file backend's keys checked with the public key alone."""

from __future__ import annotations

import hashlib

import pytest

from skyguard import config
from skyguard.custody.store import SecretStore
from skyguard.errors import BadInput, PolicyError
from skyguard.keys import api
from skyguard.keys.filebackend import FileBackend
from skyguard.keys.types import KeyCustodyError, KeyInputRefused, KeyOperationRefused, verify_signature
from skyguard.policy.keys import parse_rate
from skyguard.policy.parse import parse_policy

KEYS = """
keys:
  backend: pkcs11
  module: /usr/lib/softhsm/libsofthsm2.so
  token: skyguard
  pin_secret: hsm-pin
  keys:
    - {name: release, zones: [auth], operations: [sign, verify], rate_limit: 5/s}
    - {name: wrap, zones: "*", operations: [decrypt], rate_limit: 120/min}
"""


def policy_with(extra: str):
    return parse_policy(config.DEFAULT_POLICY.read_text() + extra)


def problems(extra: str) -> str:
    with pytest.raises(PolicyError) as caught:
        policy_with(extra)
    return str(caught.value)


def test_the_keys_section_parses():
    keys = policy_with(KEYS).keys
    assert (keys.backend, keys.module, keys.token, keys.pin_secret, keys.port) == \
        ("pkcs11", "/usr/lib/softhsm/libsofthsm2.so", "skyguard", "hsm-pin", 8200)
    release, wrap = keys.grants
    assert (release.zones, release.operations, release.rate, release.burst) == (("auth",), ("sign", "verify"), 5, 5)
    assert wrap.zones == tuple(policy_with(KEYS).zones) and wrap.rate == 2 and wrap.burst == 120
    assert policy_with("").keys is None


@pytest.mark.parametrize("change, expected", [
    (("backend: pkcs11", "backend: hsm"), "keys.backend: 'hsm' is not a key backend"),
    (("backend: pkcs11", "backend: tpm"), "keys.module: the tpm backend takes no `module:`"),
    (("  module: /usr/lib/softhsm/libsofthsm2.so\n", ""), "the pkcs11 backend needs `module:`"),
    (("module: /usr", "module: usr"), "must be an absolute path"),
    (("pin_secret: hsm-pin", "pin_secret: 'my pin 1234'"), "keys.pin_secret: must be the NAME of a secret"),
    (("[sign, verify]", "[sign, encrypt]"), "'encrypt' is not an operation; did you mean 'decrypt'?"),
    (("5/s", "fast"), "keys.keys[0].rate_limit: 'fast' is not a rate"),
    (("zones: [auth]", "zones: [nowhere]"), "keys.keys[0].zones"),
    (("name: wrap", "name: release"), "'release' is already granted at keys.keys[0]"),
    (("name: wrap", "name: Wrap!"), "'Wrap!' is not a key name"),
    (("name: wrap", 'name: "wrap\\n"'), "is not a key name"),  # as `skyguard key create` says too
    (("  keys:\n", "  keys:\n    - {name: x}\n"), "keys.keys[0]"),
])
def test_keys_section_errors_name_the_key_and_what_to_do(change, expected):
    text = problems(KEYS.replace(*change))
    assert expected in text, text
    assert "my pin 1234" not in text  # a PIN pasted into pin_secret is never echoed


def test_client_certificate_names_a_key_and_needs_a_keys_section():
    with_cert = config.DEFAULT_POLICY.read_text().replace(
        'inject: {header: Authorization, format: "Bearer {secret}"}',
        'inject: {header: Authorization, format: "Bearer {secret}"}\n    client_certificate: github-mtls', 1)
    assert "client_certificate" in with_cert
    github = next(c for c in parse_policy(with_cert + KEYS).credentials if c.name == "github")
    assert github.client_certificate == "github-mtls"
    assert "credentials[0].client_certificate: names a key but the policy has no `keys:` section" in \
        str(pytest.raises(PolicyError, parse_policy, with_cert).value)
    bad = with_cert.replace("client_certificate: github-mtls", "client_certificate: [1]")
    assert "must be the name of a key" in str(pytest.raises(PolicyError, parse_policy, bad + KEYS).value)
    newline = with_cert.replace("client_certificate: github-mtls", 'client_certificate: "github-mtls\\n"')
    assert "must be the name of a key" in str(pytest.raises(PolicyError, parse_policy, newline + KEYS).value)


def test_rates():
    assert parse_rate("20/s") == (20, 20) and parse_rate(7) == (7, 7) and parse_rate("60 / min") == (1.0, 60)
    for bad in ("0/s", "1/h", True, "x", None):
        with pytest.raises(ValueError):
            parse_rate(bad)


# ---- the API's decisions ---------------------------------------------------------------------

AUTH = api.Caller("radius1", "auth", "sg-radius1", "10.10.1.2")
SDN = api.Caller("sdnctl1", "sdn", "sg-sdnctl1", "10.10.3.2")
STRANGER = api.Caller(None, None, "lab-uplink", "100.64.0.2")
DIGEST = "ab" * 32


@pytest.mark.parametrize("method, target, body, status, outcome", [
    ("POST", "/v1/keys/release/sign", b'{"digest": "%s"}' % DIGEST.encode(), None, None),
    ("GET", "/v1/keys", b"", None, None),
    ("GET", "/v1/keys/release/public", b"", None, None),
    ("GET", "/v1/keys/release/sign", b"", 405, "bad-request"),
    ("POST", "/v1/keys/release/sign", b"{", 400, "bad-request"),
    ("POST", "/v1/keys/release/sign", b'{"digest": "zz"}', 400, "bad-request"),
    ("POST", "/v1/keys/release/sign", b'{"digest": "%s"}' % (b"ab" * 20), 400, "bad-request"),
    ("POST", "/v1/keys/release/sign", b"[]", 400, "bad-request"),
    pytest.param("POST", "/v1/keys/release/sign", b"[" * 10000, 400, "bad-request", id="nesting-past-the-recursion-limit"),
    ("POST", "/v1/keys/release/verify", b'{"digest": "%s", "signature": "***"}' % DIGEST.encode(), 400, "bad-request"),
    ("POST", "/v1/keys/wrap/decrypt", b'{"ciphertext": ""}', 400, "bad-request"),
    ("POST", "/v1/keys/release/export", b"{}", 404, "bad-request"),
    ("POST", "/v1/keys/../../etc/sign", b"{}", 404, "bad-request"),
    ("POST", "/v1/keys/A%2F/sign", b"{}", 400, "bad-request"),
    ("POST", "/v1/keys/release/sign", b"x" * (api.MAX_BODY + 1), 413, "too-large"),
    ("GET", "/admin", b"", 404, "bad-request"),
])
def test_request_shapes(method, target, body, status, outcome):
    parsed = api.parse(method, target, body)
    if status is None:
        assert isinstance(parsed, api.Operation)
    else:
        assert isinstance(parsed, api.Reply) and (parsed.status, parsed.outcome) == (status, outcome)
        assert "error" in parsed.body


def test_who_may_do_what():
    keys = policy_with(KEYS).keys
    limiter = api.RateLimiter()
    sign = api.parse("POST", "/v1/keys/release/sign", b'{"digest": "%s"}' % DIGEST.encode())
    decrypt = api.parse("POST", "/v1/keys/wrap/decrypt", b'{"ciphertext": "AAAA"}')
    unknown = api.parse("POST", "/v1/keys/nope/sign", b'{"digest": "%s"}' % DIGEST.encode())
    assert api.authorize(sign, AUTH, keys, limiter) is None
    assert (api.authorize(sign, SDN, keys, limiter).status, api.authorize(sign, SDN, keys, limiter).outcome) == \
        (403, "denied-zone")
    assert api.authorize(sign, STRANGER, keys, limiter).outcome == "not-a-workload"
    assert api.authorize(decrypt, SDN, keys, limiter) is None
    wrong_op = api.parse("POST", "/v1/keys/wrap/sign", b'{"digest": "%s"}' % DIGEST.encode())
    assert api.authorize(wrong_op, SDN, keys, limiter).outcome == "denied-operation"
    assert api.authorize(unknown, AUTH, keys, limiter).status == 404
    assert [k["name"] for k in api.listing(SDN, keys).body["keys"]] == ["wrap"]


def test_the_rate_limit_is_per_vm_and_key():
    limiter = api.RateLimiter()
    allowed = [limiter.take("k", "vm1", rate=1.0, burst=3, now=100.0) for _ in range(5)]
    assert allowed == [True, True, True, False, False]
    assert limiter.take("k", "vm2", 1.0, 3, now=100.0)  # another VM's bucket is full
    assert limiter.take("k", "vm1", 1.0, 3, now=101.0) and not limiter.take("k", "vm1", 1.0, 3, now=101.0)
    assert limiter.refusals_to_log("k", "vm1", now=101.0) == 3
    assert limiter.refusals_to_log("k", "vm1", now=101.5) == 0  # at most one entry a second


def test_other_refusals_are_summarised_by_kind_and_their_kinds_stay_bounded():
    refusals = api.Refusals()
    kind = ("vm1", "release", "sign", "denied-zone")
    assert [refusals.refused(kind, now=100.0 + i / 10) for i in range(5)] == [1, 0, 0, 0, 0]
    assert refusals.refused(("vm2",) + kind[1:], now=100.5) == 1  # another VM's kind
    assert refusals.to_log(kind, now=100.6) == 0 and refusals.to_log(kind, now=100.6, force=True) == 4
    assert refusals.refused(kind, now=101.0) == 0 and refusals.refused(kind, now=101.7) == 2
    for n in range(api.MAX_REFUSAL_KINDS * 2):  # addresses that are no VM, each refused once
        refusals.refused((f"10.0.{n // 256}.{n % 256}", "-", "-", "not-a-workload"), now=200.0 + n / 100)
    assert len(refusals.kinds) <= api.MAX_REFUSAL_KINDS


# ---- the file backend --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def file_backend(tmp_path_factory):
    """One key of each type, made once (an RSA-3072 key takes a second or two)."""
    backend = FileBackend(SecretStore(tmp_path_factory.mktemp("file-keys") / "secrets"))
    for key_type in ("ec-p256", "ed25519", "rsa-3072"):
        backend.create(key_type, key_type)
    return backend


@pytest.mark.parametrize("key_type", ["ec-p256", "ed25519", "rsa-3072"])
def test_file_backend_signs_what_the_public_key_verifies(file_backend, key_type):
    backend = file_backend
    digest = hashlib.sha256(b"payload").digest()
    signature = backend.sign(key_type, digest)
    pem = backend.public_pem(key_type)
    assert verify_signature(pem, key_type, digest, signature)
    assert not verify_signature(pem, key_type, hashlib.sha256(b"other").digest(), signature)
    assert backend.info(key_type).type == key_type
    with pytest.raises(KeyCustodyError, match="does not export"):
        backend.export_private(key_type)
    assert "PRIVATE" not in repr(backend.private_pem(key_type))


def test_file_backend_lists_and_removes(tmp_path):
    backend = FileBackend(SecretStore(tmp_path / "secrets"))
    backend.create("k1", "ed25519")
    assert [k.name for k in backend.list()] == ["k1"]
    backend.remove("k1")
    with pytest.raises(KeyCustodyError, match="no key named 'k1'"):
        backend.public_pem("k1")


def test_file_backend_refuses_bad_names_and_decrypts_only_with_rsa(file_backend):
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    backend = file_backend
    with pytest.raises(BadInput):
        backend.create("../x", "ec-p256")
    with pytest.raises(BadInput):
        backend.create("x", "dsa-1024")
    with pytest.raises(KeyOperationRefused, match="it signs, it does not decrypt") as refused:
        backend.decrypt("ec-p256", b"x")
    assert not isinstance(refused.value, KeyInputRefused)  # the key's type: the proxy answers 403
    wrapped = load_pem_public_key(backend.public_pem("rsa-3072")).encrypt(
        b"wrapped key", padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None))
    assert backend.decrypt("rsa-3072", wrapped) == b"wrapped key"
    with pytest.raises(KeyInputRefused, match="could not decrypt"):  # the VM's input: the proxy answers 400
        backend.decrypt("rsa-3072", b"\0" * 384)
    with pytest.raises(KeyCustodyError, match="exists"):
        backend.create("rsa-3072", "rsa-3072")


def test_key_cli_with_the_file_backend_logs_each_change(tmp_path, monkeypatch):
    """key create/list/public/csr/cert/rm through click, no daemon: the CLI writes the signed log."""
    import json as _json

    from click.testing import CliRunner
    from cryptography import x509

    from skyguard.cli.main import cli
    from skyguard.lab.ca import LabCA
    from skyguard.tlog.entries import decode
    from skyguard.tlog.store import LogReader

    monkeypatch.setattr(config, "RUN_DIR", tmp_path / "run")  # no daemon answers here
    policy = tmp_path / "policy.yaml"
    policy.write_text(config.DEFAULT_POLICY.read_text() + "\nkeys:\n  backend: file\n")
    state = tmp_path / "state"
    run = CliRunner().invoke
    common = ["--policy", str(policy), "--state-dir", str(state)]
    assert run(cli, ["key", "create", "client", "--type", "ec-p256", *common]).exit_code == 0
    listed = _json.loads(run(cli, ["key", "list", "--json", *common]).output)
    assert listed == [{"name": "client", "type": "ec-p256", "backend": "file", "extractable": False}]
    request = x509.load_pem_x509_csr(run(cli, ["key", "csr", "client", "--subject", "vm1", *common]).output.encode())
    assert request.is_signature_valid
    ca = LabCA(tmp_path / "ca")
    (tmp_path / "cert.pem").write_bytes(ca.certify(request.public_key(), subject=request.subject, client=True))
    stored = run(cli, ["key", "cert", "client", "--file", str(tmp_path / "cert.pem"), *common])
    assert stored.exit_code == 0, stored.output
    other = ca.issue(["someone-else"], client=True)[0]
    (tmp_path / "other.pem").write_bytes(other)
    refused = run(cli, ["key", "cert", "client", "--file", str(tmp_path / "other.pem"), *common])
    # (errors reach main()'s edge as exceptions: BadInput exits 2, KeyCustodyError 1)
    assert isinstance(refused.exception, BadInput) and "not for key 'client'" in str(refused.exception)
    assert "BEGIN PUBLIC KEY" in run(cli, ["key", "public", "client", *common]).output
    assert run(cli, ["key", "rm", "client", *common]).exit_code == 0
    kinds = [(e["type"], e["name"]) for e in (decode(raw) for _, raw in LogReader(state / "log").entries())]
    assert kinds == [("key_create", "client"), ("key_certificate", "client"), ("key_remove", "client")]
    missing = run(cli, ["key", "public", "client", *common])
    assert isinstance(missing.exception, KeyCustodyError) and "no key named 'client'" in str(missing.exception)
    no_keys = tmp_path / "nokeys.yaml"
    no_keys.write_text(config.DEFAULT_POLICY.read_text())
    unset = run(cli, ["key", "list", "--policy", str(no_keys), "--state-dir", str(state)])
    assert isinstance(unset.exception, BadInput) and "has no `keys:` section" in str(unset.exception)


def test_a_hot_swapped_policy_brings_its_client_certificates(tmp_path):
    """The daemon swaps parts with set_policy(policy) alone: the credential service takes the
    client certificates from the policy it is given (the one it starts with, and each new one),
    presenting the one the new policy names and none the old one named."""
    import dataclasses

    from skyguard.credproxy.interfaces import MemorySecretSource
    from skyguard.credproxy.service import CredentialService
    from skyguard.parts import LoopThread, MemoryLog

    policy = dataclasses.replace(policy_with(KEYS), tls_termination=())  # no certificate in this store
    github = next(c for c in policy.credentials if c.name == "github")
    with_cert = dataclasses.replace(policy, credentials=tuple(
        dataclasses.replace(c, client_certificate="github-mtls") if c is github else c for c in policy.credentials))
    # `true` stands in for nft (the steering is tested in namespaces); nothing is served here.
    service = CredentialService(with_cert, MemorySecretSource({"github": b"ghp_x"}), state_dir=tmp_path,
                                decision_log=MemoryLog(), registry=None, address_matches=lambda n, ip: True,
                                listen=["127.0.0.1"], nft=("true",))
    loop = LoopThread()
    try:
        loop.call(service.start())
        assert service.proxy.state.client_certificate_for("api.github.test", "sdn") == "key:github-mtls"
        assert service.proxy.state.client_certificate_for("api.github.test", "sandbox") is None  # not its zone
        loop.call(service.set_policy(policy))
        assert service.proxy.state.client_certificate_for("api.github.test", "sdn") is None
        loop.call(service.set_policy(with_cert))
        assert service.proxy.state.client_certificate_for("api.github.test", "sdn") == "key:github-mtls"
    finally:
        loop.call(service.stop())
        loop.stop()


def test_the_datapath_lets_only_the_zones_a_key_names_reach_the_proxy():
    """With no rule of the operator's, the zones some key names (auth, sdn) reach the crypto
    proxy's port on the host's addresses (the VMs' gateway, IPv4 and IPv6) through the synthetic
    keys-proxy rule; a zone no key names (sandbox) and any other port get nothing."""
    from skyguard.datapath import abi
    from skyguard.datapath.compile import KEYS_RULE, compile_policy

    gateways = ("169.254.1.1", "fe80::1")
    only_sdn = KEYS.replace('zones: "*"', "zones: [sdn]")

    def verdict(compiled, zone, address, port):
        identity = compiled.ipcache[next(n for n in compiled.ipcache if str(n.network_address) == address
                                         and n.prefixlen == n.max_prefixlen)]
        return [(e.verdict, e.rule_id) for e in compiled.policy
                if (e.direction, e.zone, e.identity, e.proto) ==
                (abi.DIR_EGRESS, compiled.zone_ids[zone], identity, abi.IPPROTO["tcp"])
                and e.port <= port < e.port + (1 << (16 - e.port_prefixlen))]

    compiled = compile_policy(policy_with(only_sdn), host_addresses=gateways)
    allowed = [(abi.POLICY_ALLOW, compiled.rule_ids[KEYS_RULE])]
    for gateway in gateways:
        assert verdict(compiled, "auth", gateway, 8200) == allowed
        assert verdict(compiled, "sdn", gateway, 8200) == allowed
        assert verdict(compiled, "sandbox", gateway, 8200) == []  # no key names it
        assert verdict(compiled, "directory", gateway, 8200) == []
        assert verdict(compiled, "auth", gateway, 8201) == []  # the proxy's port, nothing more
    moved = compile_policy(policy_with(only_sdn.replace("  pin_secret: hsm-pin\n", "  pin_secret: hsm-pin\n  port: 9300\n")),
                           host_addresses=gateways)
    assert verdict(moved, "sdn", "169.254.1.1", 9300) == allowed and verdict(moved, "sdn", "169.254.1.1", 8200) == []
    bare = compile_policy(policy_with(""), host_addresses=gateways)  # no keys: nothing opened to the host
    assert KEYS_RULE not in bare.rule_ids
    assert not [(z, g) for z in bare.zone_ids for g in gateways if verdict(bare, z, g, 8200)]


def test_status_counts_the_pin_keys_and_certificates_as_used(tmp_path):
    """`skyguard status` lists stored secrets no policy names (for `skyguard secret rm`): the token
    PIN, the certificate of a key named for TLS and, with the file backend, the keys themselves are
    the keys: section's, never listed as unused; one the policy needs and lacks is missing. A
    tls_termination certificate that is a key (it has `cert.<name>`) is no secret of its own."""
    from skyguard.storenames import secrets_status

    with_cert = config.DEFAULT_POLICY.read_text().replace(
        'inject: {header: Authorization, format: "Bearer {secret}"}',
        'inject: {header: Authorization, format: "Bearer {secret}"}\n    client_certificate: github-mtls', 1)
    store = SecretStore(tmp_path / "state" / "secrets")
    for name in ("github", "cert.github-mtls", "cert.sdnctl1", "cert.old-one", "left-over"):
        store.set(name, b"value")

    policy = parse_policy(with_cert + KEYS)  # pkcs11, PIN not stored yet
    secrets = secrets_status(policy, tmp_path / "state" / "secrets")
    assert secrets["unused"] == ["cert.old-one", "left-over"]
    assert "hsm-pin" in secrets["missing"] and "sdnctl1" not in secrets["missing"]  # sdnctl1 is a key
    store.set("hsm-pin", b"1234")
    assert "hsm-pin" not in secrets_status(policy, tmp_path / "state" / "secrets")["missing"]

    store.set("key.release", b"pem")
    store.set("key.not-granted", b"pem")
    policy = parse_policy(with_cert + KEYS.replace("backend: pkcs11", "backend: file"))
    secrets = secrets_status(policy, tmp_path / "state" / "secrets")
    assert secrets["unused"] == ["cert.old-one", "hsm-pin", "left-over"]  # no key.* among them
    assert {"key.wrap", "key.github-mtls", "key.sdnctl1"} <= set(secrets["missing"])
    assert "key.release" not in secrets["missing"]

    policy = parse_policy(config.DEFAULT_POLICY.read_text())  # no keys: section
    secrets = secrets_status(policy, tmp_path / "state" / "secrets")
    assert "sdnctl1" in secrets["missing"] and "cert.sdnctl1" in secrets["unused"]


def test_the_keys_section_in_policy_show_and_diff():
    """policy show --json writes keys: (and credentials' client_certificate) in canonical form that
    parses to the same policy; policy diff names each key's change and the custody settings';
    policy show prints a Keys table."""
    import json

    from skyguard.cli.policy import format_policy
    from skyguard.policy.canonical import policy_to_dict
    from skyguard.policy.diff import diff_policies, format_diff

    with_cert = config.DEFAULT_POLICY.read_text().replace(
        'inject: {header: Authorization, format: "Bearer {secret}"}',
        'inject: {header: Authorization, format: "Bearer {secret}"}\n    client_certificate: github-mtls', 1)
    policy = parse_policy(with_cert + KEYS)
    canonical = policy_to_dict(policy)
    assert canonical["keys"] == {
        "backend": "pkcs11", "module": "/usr/lib/softhsm/libsofthsm2.so", "token": "skyguard", "pin_secret": "hsm-pin",
        "port": 8200, "keys": [
            {"name": "release", "zones": ["auth"], "operations": ["sign", "verify"], "rate_limit": "5/s"},
            {"name": "wrap", "zones": list(policy.zones), "operations": ["decrypt"], "rate_limit": "120/min"}]}
    assert canonical["credentials"][0]["client_certificate"] == "github-mtls"
    again = parse_policy(json.dumps(canonical), source="canonical.json")
    assert (again.keys, again.credentials) == (policy.keys, policy.credentials)
    assert policy_to_dict(again) == canonical
    assert "keys" not in policy_to_dict(policy_with(""))

    changed = parse_policy(with_cert + KEYS.replace("5/s", "7/s").replace("  pin_secret: hsm-pin\n",
                                                                          "  pin_secret: hsm-pin\n  port: 8300\n")
                           .replace("    - {name: wrap, zones: \"*\", operations: [decrypt], rate_limit: 120/min}\n",
                                    "    - {name: deploy, zones: [sdn], operations: [sign]}\n"))
    diff = diff_policies(policy, changed)
    assert {(c.kind, c.name, c.status) for c in diff.changes} == {
        ("key", "release", "changed"), ("key", "wrap", "removed"), ("key", "deploy", "added"),
        ("setting", "keys", "changed")}
    text = format_diff(diff)
    assert "rate_limit: 5/s -> 7/s" in text and "port: 8200 -> 8300" in text
    assert diff_policies(policy, parse_policy(with_cert + KEYS.replace("  module:", "  # a comment\n  module:"))).empty

    shown = format_policy(policy)
    assert "Keys (pkcs11 backend: token skyguard through /usr/lib/softhsm/libsofthsm2.so, PIN in secret hsm-pin" in shown
    assert any(line.split() == ["release", "auth", "sign,", "verify", "5/s"] for line in shown.splitlines())
    assert any(line.split() == ["wrap", "*", "decrypt", "120/min"] for line in shown.splitlines())


def test_a_file_key_removed_or_replaced_by_another_process_is_not_used_from_memory(tmp_path):
    """The crypto proxy's backend and `skyguard key rm`/`key create` (another process) share the
    sealed store: once the CLI removed a key, the proxy must stop signing with it; once it made a
    new key of that name, the proxy signs with the new one (no private key lives on in a cache)."""
    store_dir = tmp_path / "secrets"
    proxy, cli = FileBackend(SecretStore(store_dir)), FileBackend(SecretStore(store_dir))
    cli.create("release", "ec-p256")
    digest = hashlib.sha256(b"payload").digest()
    assert verify_signature(proxy.public_pem("release"), "ec-p256", digest, proxy.sign("release", digest))
    cli.remove("release")
    with pytest.raises(KeyCustodyError, match="no key named 'release'"):
        proxy.sign("release", digest)
    cli.create("release", "ec-p256")  # the old key's name, a new key (rotation)
    assert verify_signature(cli.public_pem("release"), "ec-p256", digest, proxy.sign("release", digest))
    assert proxy.public_pem("release") == cli.public_pem("release")
