"""Token-held keys in TLS: the credential proxy's client certificates (outbound mTLS) and TLS
termination certificates whose private key stays in the PKCS#11 token.

Python's ssl module loads private keys only from files, so a token key enters an SSLContext
through OpenSSL itself: the pkcs11 ENGINE of libp11 (Debian: libengine-pkcs11-openssl; Debian 12
has no pkcs11-provider) loads an EVP_PKEY that signs inside the token, and SSL_CTX_use_PrivateKey
puts it into the context, both called with ctypes on the libcrypto/libssl the ssl module uses. The
context's SSL_CTX pointer is read from CPython's PySSLContext object (the first field after the
object header); a check against the context's options refuses any other layout (fail closed).
The PIN reaches the engine in-process (ENGINE_ctrl "PIN"), never on a command line; a python-pkcs11
login is held alongside, so closing another backend on the token never logs the engine out.

Certificates are public and live in the sealed store as `cert.<key name>` (`skyguard key cert`).
File-backend keys load from the store through pemload (memory, never a file). Ed25519 keys are not
offered for TLS, and a token that holds any Ed25519 key cannot serve TLS keys at all: libp11 0.4.12
(Debian 12) fails to list its keys. Not here: which request gets which certificate (the
credential proxy), the key API.

Layering: the credential proxy imports this module (and so pkcs11.py, which it uses), so both stand
below it, in the services layer of tests/unit/test_import_graph.py, and import nothing of
credproxy: the ClientCertificate value the proxy is configured with is defined here.
"""

from __future__ import annotations

import ctypes
import os
import threading
import urllib.parse
from dataclasses import dataclass

from skyguard.keys.types import KeyCustodyError, validate_key_name

CERT_PREFIX = "cert."
KEY_REFERENCE = "key:"  # ClientCertificate.store_name of a token key: never a valid secret name
ENGINE_PATHS = ("/usr/lib/x86_64-linux-gnu/engines-3/pkcs11.so", "/usr/lib/aarch64-linux-gnu/engines-3/pkcs11.so",
                "/usr/lib/engines-3/pkcs11.so")

_engines: dict = {}
_lock = threading.Lock()


@dataclass(frozen=True)
class ClientCertificate:
    """Outbound mutual TLS toward one destination name: a PEM bundle (certificate chain and
    key) in the store, or a key in the key backend (store_name KEY_REFERENCE + key name),
    presented only for requests from these zones."""

    store_name: str
    zones: tuple[str, ...]


def client_certificates_of(policy) -> dict[str, ClientCertificate]:
    """credentials[].client_certificate as the credential proxy's {destination: ClientCertificate}."""
    out = {}
    for credential in policy.credentials:
        if credential.client_certificate:
            for destination in credential.destinations:
                out[destination] = ClientCertificate(KEY_REFERENCE + credential.client_certificate, credential.zones)
    return out


def certificate_of(secrets, name: str) -> bytes | None:
    """The certificate chain stored for key `name`, or None."""
    try:
        return bytes(secrets.get(CERT_PREFIX + name))
    except Exception:  # noqa: BLE001 - a missing certificate is the caller's message to give
        return None


def install_key(context, secrets, name: str, keys_config) -> bytes:
    """Present key `name` (and its stored certificate) in `context`, under the policy's `keys:`
    section `keys_config` (None: the policy has none). Returns the chain PEM."""
    if keys_config is None:
        raise KeyCustodyError(f"key {name!r} is named for TLS but the policy has no `keys:` section")
    validate_key_name(name)
    chain = certificate_of(secrets, name)
    if chain is None:
        raise KeyCustodyError(f"no certificate for key {name!r}; get one for `skyguard key csr {name}` "
                              f"and store it with `skyguard key cert {name} --file CERT.pem`")
    if keys_config.backend == "file":
        from skyguard.custody.pemload import load_cert_chain_from_memory

        try:
            private = secrets.get("key." + name)
        except Exception:  # noqa: BLE001
            raise KeyCustodyError(f"no key named {name!r} in the store") from None
        load_cert_chain_from_memory(context, chain, bytes(private))
        return chain
    if keys_config.backend == "tpm":
        raise KeyCustodyError(f"key {name!r} is a TPM key: TLS (client certificates, termination) takes keys of "
                              f"the file or pkcs11 backend only")
    engine = _engine(keys_config, secrets)
    _use_in_context(context, chain, engine.private_key(name))
    return chain


class _Engine:
    """libp11's pkcs11 engine for one token, loaded once per process and never finished (finishing
    it would C_Finalize the module under python-pkcs11's feet)."""

    def __init__(self, module: str, label: str, pin: bytes):
        from skyguard.keys.pkcs11 import Pkcs11Backend

        self.holder = Pkcs11Backend(module, label, pin)  # checks the PIN; keeps the token logged in
        self.label = label
        path = next((p for p in ENGINE_PATHS if os.path.exists(p)), None)
        if path is None:
            raise KeyCustodyError("OpenSSL's pkcs11 engine is not installed (Debian: libengine-pkcs11-openssl); "
                                  "run scripts/setup")
        crypto = _libcrypto()
        engine = crypto.ENGINE_by_id(b"dynamic")
        steps = ((b"SO_PATH", path.encode()), (b"ID", b"pkcs11"), (b"LIST_ADD", b"1"), (b"LOAD", None),
                 (b"MODULE_PATH", module.encode()), (b"PIN", pin))
        if not engine or not all(crypto.ENGINE_ctrl_cmd_string(engine, k, v, 0) == 1 for k, v in steps) \
                or crypto.ENGINE_init(engine) != 1:
            crypto.ERR_clear_error()
            raise KeyCustodyError(f"OpenSSL's pkcs11 engine did not load for token {label!r}")
        self.engine = engine
        self.keys: dict[str, int] = {}

    def private_key(self, name: str) -> int:
        pkey = self.keys.get(name)
        if pkey is None:
            uri = (f"pkcs11:token={urllib.parse.quote(self.label, safe='')};"
                   f"object={urllib.parse.quote(name, safe='')};type=private")
            pkey = _libcrypto().ENGINE_load_private_key(self.engine, uri.encode(), None, None)
            if not pkey:
                _libcrypto().ERR_clear_error()
                if any(k.type == "ed25519" for k in self.holder.list()):
                    # libp11 0.4.12 (Debian 12) fails to enumerate a token holding any Ed25519 key.
                    raise KeyCustodyError(f"token {self.label!r} holds Ed25519 keys, which OpenSSL's pkcs11 "
                                          "engine on this system cannot list: keep TLS keys in a token without "
                                          "Ed25519 keys (or use the file backend)")
                raise KeyCustodyError(f"the token has no private key {name!r} usable for TLS")
            self.keys[name] = pkey
        return pkey


def _engine(keys_config, secrets) -> _Engine:
    key = (keys_config.module, keys_config.token)
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            try:
                pin = bytes(secrets.get(keys_config.pin_secret))
            except Exception:  # noqa: BLE001
                raise KeyCustodyError(f"the token PIN (keys.pin_secret {keys_config.pin_secret!r}) is not "
                                      "in the store") from None
            engine = _engines[key] = _Engine(keys_config.module, keys_config.token, pin)
        return engine


def _use_in_context(context, chain: bytes, pkey: int) -> None:
    ssl_lib = _libssl()
    ctx = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    if not ctx or ssl_lib.SSL_CTX_get_options(ctx) != context.options:
        raise KeyCustodyError("this Python's ssl module is not laid out as expected (PySSLContext); "
                              "token keys cannot be used in TLS here")
    fd = os.memfd_create("skyguard-chain", os.MFD_CLOEXEC)  # the public chain; still, no file on disk
    try:
        os.write(fd, chain)
        ok = ssl_lib.SSL_CTX_use_certificate_chain_file(ctx, f"/proc/self/fd/{fd}".encode()) == 1 \
            and ssl_lib.SSL_CTX_use_PrivateKey(ctx, pkey) == 1 and ssl_lib.SSL_CTX_check_private_key(ctx) == 1
    finally:
        os.close(fd)
    if not ok:
        _libcrypto().ERR_clear_error()
        raise KeyCustodyError("the stored certificate does not match the token key (or is not PEM)")


_libs: dict = {}


def _libcrypto():
    if "crypto" not in _libs:
        import ssl  # noqa: F401 - load the libcrypto the ssl module uses before opening it by name

        lib = ctypes.CDLL("libcrypto.so.3")
        lib.ENGINE_by_id.restype = ctypes.c_void_p
        lib.ENGINE_by_id.argtypes = [ctypes.c_char_p]
        lib.ENGINE_ctrl_cmd_string.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int]
        lib.ENGINE_init.argtypes = [ctypes.c_void_p]
        lib.ENGINE_load_private_key.restype = ctypes.c_void_p
        lib.ENGINE_load_private_key.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p]
        _libs["crypto"] = lib
    return _libs["crypto"]


def _libssl():
    if "ssl" not in _libs:
        lib = ctypes.CDLL("libssl.so.3")
        lib.SSL_CTX_get_options.restype = ctypes.c_uint64
        lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
        lib.SSL_CTX_use_certificate_chain_file.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.SSL_CTX_use_PrivateKey.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        lib.SSL_CTX_check_private_key.argtypes = [ctypes.c_void_p]
        _libs["ssl"] = lib
    return _libs["ssl"]


# ---- certificate requests (skyguard key csr) -------------------------------------------------------

def certificate_request(backend, name: str, common_name: str) -> bytes:
    """A PKCS#10 request for key `name`, signed inside the backend. PEM."""
    import hashlib

    from asn1crypto import csr, keys, pem
    from asn1crypto import x509 as ax
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_public_key

    key_type = backend.key_type(name)
    algorithm = {"ec-p256": "sha256_ecdsa", "rsa-3072": "sha256_rsa"}.get(key_type)
    if algorithm is None:
        raise KeyCustodyError(f"key {name!r} is {key_type}; TLS certificates need an ec-p256 or rsa-3072 key")
    spki = load_pem_public_key(backend.public_pem(name)).public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    info = csr.CertificationRequestInfo({
        "version": "v1", "subject": ax.Name.build({"common_name": common_name}),
        "subject_pk_info": keys.PublicKeyInfo.load(spki), "attributes": []})
    signature = backend.sign(name, hashlib.sha256(info.dump()).digest())
    request = csr.CertificationRequest({"certification_request_info": info,
                                        "signature_algorithm": {"algorithm": algorithm}, "signature": signature})
    return pem.armor("CERTIFICATE REQUEST", request.dump())
