"""Keys in a PKCS#11 token (SoftHSM, a smart card, an HSM) through python-pkcs11, against any
module path. Private keys are generated inside the token, marked sensitive and non-extractable,
and used only by handle: no private key byte ever reaches this process.

Sessions: PKCS#11 logs in an application, not a session, and python-pkcs11 logs out on closing a
session opened with a PIN. So one session per token and process holds the login while any backend
on that token is open (_login), and each thread that signs opens its own session without a PIN
(the login covers it). A session is used by one
thread only, as PKCS#11 asks. Handles are cached per thread for a moment (finding a key by label
costs about as much as an EC signature) and looked up again after any failure, so a key removed
by `skyguard key rm` in another process is noticed on its next use.

Not here: which VM may use which key (the crypto proxy), the file backend, the PIN's storage (the
sealed store; the caller passes the value).
"""

from __future__ import annotations

import ctypes
import threading
import time

from skyguard.keys.types import (
    DECRYPTING_TYPES,
    DIGEST_INFO,
    KeyCustodyError,
    KeyInfo,
    KeyInputRefused,
    KeyOperationRefused,
    digest_algorithm,
    ecdsa_raw_to_der,
    validate_key_name,
    validate_key_type,
)

HANDLE_CACHE_SECONDS = 2.0  # how long a thread trusts a handle it found before looking again
OID_ED25519 = "1.3.101.112"


def _pkcs11():
    try:
        import pkcs11
    except ImportError:  # pragma: no cover - a dependency of the project
        raise KeyCustodyError("python-pkcs11 is not installed; run scripts/setup") from None
    return pkcs11


class Pkcs11Backend:
    """Keys in one token of one PKCS#11 module. Thread-safe (see the module's note on sessions)."""

    name = "pkcs11"

    def __init__(self, module: str, token_label: str, pin: bytes):
        pkcs11 = _pkcs11()
        self.module, self.token_label = module, token_label
        lib = _load_module(module)
        try:
            self.token = lib.get_token(token_label=token_label)
        except pkcs11.NoSuchToken:
            raise KeyCustodyError(f"no token labelled {token_label!r} in {module}; create it (SoftHSM: "
                                  f"softhsm2-util --init-token --free --label {token_label}) or fix keys.token") from None
        except pkcs11.MultipleTokensReturned:
            raise KeyCustodyError(f"more than one token is labelled {token_label!r} in {module}; "
                                  "give each token its own label") from None
        self._login_key = _login(self.token, module, token_label, pin)
        self._local = threading.local()
        self._sessions: list = []  # every session opened, closed together
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Pkcs11Backend(module={self.module!r}, token={self.token_label!r})"

    def close(self) -> None:
        with self._lock:
            sessions, self._sessions = self._sessions, []
            for session in sessions:
                _quietly(session.close)
            if self._login_key is not None:
                _logout(self._login_key)
                self._login_key = None

    # ---- management (CLI) ----------------------------------------------------------------------

    def create(self, name: str, key_type: str) -> KeyInfo:
        pkcs11 = _pkcs11()
        from pkcs11 import Attribute, KeyType, Mechanism
        from pkcs11.util.ec import encode_named_curve_parameters

        validate_key_name(name)
        validate_key_type(key_type)
        if self._find(self._session(), name) is not None:
            raise KeyCustodyError(f"token {self.token_label!r} already holds a key named {name!r}; "
                                  f"`skyguard key rm {name}` first, or choose another name")
        decrypts = key_type in DECRYPTING_TYPES
        private = {Attribute.EXTRACTABLE: False, Attribute.SENSITIVE: True, Attribute.SIGN: True,
                   Attribute.DECRYPT: decrypts, Attribute.UNWRAP: False, Attribute.DERIVE: False,
                   Attribute.PRIVATE: True, Attribute.TOKEN: True}
        public = {Attribute.VERIFY: True, Attribute.ENCRYPT: decrypts, Attribute.WRAP: False,
                  Attribute.TOKEN: True}
        session = self._session()
        try:
            if key_type == "rsa-3072":
                session.generate_keypair(KeyType.RSA, 3072, store=True, label=name, id=name.encode(),
                                         private_template=private, public_template=public)
            else:
                kind, curve, mech = ((KeyType.EC, "secp256r1", Mechanism.EC_KEY_PAIR_GEN) if key_type == "ec-p256"
                                     else (KeyType.EC_EDWARDS, OID_ED25519, Mechanism.EC_EDWARDS_KEY_PAIR_GEN))
                params = session.create_domain_parameters(
                    kind, {Attribute.EC_PARAMS: encode_named_curve_parameters(curve)}, local=True)
                params.generate_keypair(store=True, label=name, id=name.encode(), mechanism=mech,
                                        private_template=private, public_template=public)
        except pkcs11.PKCS11Error as e:
            raise KeyCustodyError(f"token {self.token_label!r} could not generate a {key_type} key: "
                                  f"{type(e).__name__} (does the token support it?)") from None
        self._forget()
        return self.info(name)

    def list(self) -> list[KeyInfo]:
        from pkcs11 import Attribute, ObjectClass

        keys = {}
        for obj in self._session().get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}):
            label = obj.label
            if label and label not in keys:
                keys[label] = self._describe(label, obj)
        return [keys[k] for k in sorted(keys)]

    def info(self, name: str) -> KeyInfo:
        return self._describe(name, self._private(name))

    def public_pem(self, name: str) -> bytes:
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        return self._public_key(name).public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)

    def remove(self, name: str) -> None:
        validate_key_name(name)
        session = self._session()
        found = list(session.get_objects({_pkcs11().Attribute.LABEL: name}))
        if not found:
            raise KeyCustodyError(f"no key named {name!r} in token {self.token_label!r}; `skyguard key list` shows them")
        for obj in found:
            obj.destroy()
        self._forget()

    def export_private(self, name: str) -> bytes:
        """What an attacker with the PIN would try: read the private key's secret value. The token
        refuses (sensitive, non-extractable); this raises KeyCustodyError saying so. Used by tests."""
        pkcs11 = _pkcs11()
        key = self._private(name)
        secret = pkcs11.Attribute.PRIVATE_EXPONENT if key.key_type == pkcs11.KeyType.RSA else pkcs11.Attribute.VALUE
        try:
            return bytes(key[secret])
        except pkcs11.PKCS11Error as e:
            raise KeyCustodyError(f"the token refuses to export private key {name!r} ({type(e).__name__})") from None

    # ---- use (crypto proxy) ----------------------------------------------------------------------

    def sign(self, name: str, digest: bytes) -> bytes:
        """Sign a digest: ECDSA (DER), Ed25519 over the digest bytes, or RSA PKCS#1 v1.5."""
        from pkcs11 import Mechanism

        algorithm = digest_algorithm(digest)

        def run(key, key_type):
            if key_type == "ec-p256":
                return ecdsa_raw_to_der(key.sign(digest, mechanism=Mechanism.ECDSA))
            if key_type == "ed25519":
                return key.sign(digest, mechanism=Mechanism.EDDSA)
            return key.sign(DIGEST_INFO[algorithm] + digest, mechanism=Mechanism.RSA_PKCS)

        return self._use(name, run)

    def decrypt(self, name: str, ciphertext: bytes) -> bytes:
        """RSA-OAEP with SHA-1 and MGF1-SHA-1 (OAEP's default, still sound for OAEP; SoftHSM 2.6
        decrypts with no other hash), the usual way to wrap a key for an RSA key."""
        from pkcs11 import MGF, Mechanism

        def run(key, key_type):
            if key_type not in DECRYPTING_TYPES:
                raise KeyOperationRefused(f"key {name!r} is {key_type}: it signs, it does not decrypt")
            return key.decrypt(ciphertext, mechanism=Mechanism.RSA_PKCS_OAEP,
                               mechanism_param=(Mechanism.SHA_1, MGF.SHA1, None))

        return self._use(name, run)

    def key_type(self, name: str) -> str:
        return self._cached(name)[1]

    def _use(self, name: str, run):
        pkcs11 = _pkcs11()
        for attempt in (0, 1):
            key, key_type = self._cached(name, fresh=attempt == 1)
            try:
                return run(key, key_type)
            except pkcs11.PKCS11Error as e:
                if isinstance(e, (pkcs11.DataLenRange, pkcs11.EncryptedDataInvalid,
                                  pkcs11.EncryptedDataLenRange, pkcs11.DataInvalid)):  # the caller's input
                    raise KeyInputRefused(f"key {name!r} could not use the input: {type(e).__name__}") from None
                if attempt == 1:
                    raise KeyCustodyError(f"token {self.token_label!r} refused the operation with key "
                                          f"{name!r}: {type(e).__name__}") from None
                self._forget()  # a stale handle (key removed or the session gone): look again once

    # ---- internals -------------------------------------------------------------------------------

    def _session(self):
        session = getattr(self._local, "session", None)
        if session is None:
            with self._lock:
                if self._login_key is None:
                    raise KeyCustodyError("the key backend is closed")
                session = self.token.open(rw=True)  # no PIN: the login session covers it
                self._sessions.append(session)
            self._local.session = session
            self._local.handles = {}
        return session

    def _forget(self) -> None:
        if getattr(self._local, "handles", None) is not None:
            self._local.handles.clear()

    def _cached(self, name: str, fresh: bool = False):
        session = self._session()
        now = time.monotonic()
        hit = None if fresh else self._local.handles.get(name)
        if hit is not None and now - hit[2] < HANDLE_CACHE_SECONDS:
            return hit[0], hit[1]
        key = self._private(name, session)
        key_type = self._type_of(key)
        self._local.handles[name] = (key, key_type, now)
        return key, key_type

    def _find(self, session, name: str):
        from pkcs11 import Attribute, ObjectClass

        for obj in session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: name}):
            return obj
        return None

    def _private(self, name: str, session=None):
        validate_key_name(name)
        key = self._find(session or self._session(), name)
        if key is None:
            raise KeyCustodyError(f"no key named {name!r} in token {self.token_label!r}; "
                                  f"create it with `skyguard key create {name} --type TYPE`")
        return key

    def _public_key(self, name: str):
        from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
        from pkcs11 import Attribute, ObjectClass

        validate_key_name(name)
        pub = next(iter(self._session().get_objects({Attribute.CLASS: ObjectClass.PUBLIC_KEY,
                                                      Attribute.LABEL: name})), None)
        if pub is None:
            raise KeyCustodyError(f"no public key named {name!r} in token {self.token_label!r}")
        key_type = self._type_of(pub)
        if key_type == "rsa-3072":
            return rsa.RSAPublicNumbers(int.from_bytes(pub[Attribute.PUBLIC_EXPONENT], "big"),
                                        int.from_bytes(pub[Attribute.MODULUS], "big")).public_key()
        point = _unwrap_octet_string(bytes(pub[Attribute.EC_POINT]), 65 if key_type == "ec-p256" else 32)
        if key_type == "ec-p256":
            return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
        return ed25519.Ed25519PublicKey.from_public_bytes(point)

    def _type_of(self, obj) -> str:
        from pkcs11 import Attribute, KeyType
        from pkcs11.util.ec import encode_named_curve_parameters

        kind = obj.key_type
        if kind == KeyType.RSA:
            bits = obj.key_length
            if bits != 3072:
                return f"rsa-{bits}"
            return "rsa-3072"
        if kind == KeyType.EC_EDWARDS:
            return "ed25519"
        if kind == KeyType.EC:
            params = bytes(obj[Attribute.EC_PARAMS])
            return "ec-p256" if params == encode_named_curve_parameters("secp256r1") else "ec-other"
        return str(kind)

    def _describe(self, name: str, private) -> KeyInfo:
        from pkcs11 import Attribute

        try:
            extractable = bool(private[Attribute.EXTRACTABLE])
        except _pkcs11().PKCS11Error:
            extractable = False
        return KeyInfo(name=name, type=self._type_of(private), backend=self.name, extractable=extractable)


# ---- the module, initialised for threads ---------------------------------------------------------
# python-pkcs11 calls C_Initialize(NULL), which tells the module that no two threads will call it
# at once; SoftHSM then turns its locks off, and the crypto proxy's workers and OpenSSL's pkcs11
# engine (tlskey.py) do call it from several threads (GeneralError from C_FindObjectsInit, found by
# bench/crypto.py). So the module is initialised here with CKF_OS_LOCKING_OK, and python-pkcs11's
# lib object is made without its own C_Initialize (lib.__new__ loads the module and its function
# list; __init__ would initialise). Every backend in the process shares it.
_MODULES: dict[str, object] = {}
CKF_OS_LOCKING_OK = 0x2
CKR_CRYPTOKI_ALREADY_INITIALIZED = 0x191


class _InitArgs(ctypes.Structure):
    _fields_ = [("CreateMutex", ctypes.c_void_p), ("DestroyMutex", ctypes.c_void_p), ("LockMutex", ctypes.c_void_p),
                ("UnlockMutex", ctypes.c_void_p), ("flags", ctypes.c_ulong), ("pReserved", ctypes.c_void_p)]


class _FunctionListHead(ctypes.Structure):  # CK_FUNCTION_LIST: the version, then C_Initialize first
    _fields_ = [("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte),
                ("C_Initialize", ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_void_p))]


def _load_module(module: str):
    from pkcs11 import _pkcs11

    with _LOGINS_LOCK:
        lib = _MODULES.get(module)
        if lib is not None:
            return lib
        hint = "check keys.module (for SoftHSM: /usr/lib/softhsm/libsofthsm2.so)"
        try:
            lib = _pkcs11.lib.__new__(_pkcs11.lib, module)  # type: ignore[call-arg]  # dlopen, C_GetFunctionList
            functions = ctypes.POINTER(_FunctionListHead)()
            ctypes.CDLL(module).C_GetFunctionList(ctypes.byref(functions))
        except Exception as e:  # noqa: BLE001 - python-pkcs11 and ctypes raise a few unrelated types here
            raise KeyCustodyError(f"cannot load the PKCS#11 module {module}: {type(e).__name__}: {e}; {hint}") from None
        args = _InitArgs(None, None, None, None, CKF_OS_LOCKING_OK, None)
        rv = functions.contents.C_Initialize(ctypes.cast(ctypes.pointer(args), ctypes.c_void_p))
        if rv not in (0, CKR_CRYPTOKI_ALREADY_INITIALIZED):
            raise KeyCustodyError(f"the PKCS#11 module {module} failed to initialise (CKR 0x{rv:x}); {hint}")
        _MODULES[module] = lib
        return lib


# One login per token and process, shared by every backend open on it: PKCS#11 logs in the
# application, so a second C_Login fails (UserAlreadyLoggedIn) and any C_Logout logs out everyone.
# {(module, label): [login session, holders, SHA-256 of the PIN it was opened with]}
_LOGINS: dict[tuple[str, str], list] = {}
_LOGINS_LOCK = threading.Lock()


def _login(token, module: str, label: str, pin: bytes) -> tuple[str, str]:
    import hashlib

    pkcs11 = _pkcs11()
    key, pin_hash = (module, label), hashlib.sha256(pin).digest()
    with _LOGINS_LOCK:
        held = _LOGINS.get(key)
        if held is not None:
            if held[2] != pin_hash:  # the token would refuse it too: never let a wrong PIN ride along
                raise KeyCustodyError(f"token {label!r} refused the PIN (wrong PIN in the sealed store?); "
                                      "set it again with `skyguard secret set NAME`")
            held[1] += 1
            return key
        try:
            session = token.open(user_pin=pin.decode("utf-8"), rw=True)
        except pkcs11.PinIncorrect:
            raise KeyCustodyError(f"token {label!r} refused the PIN (wrong PIN in the sealed store?); "
                                  "set it again with `skyguard secret set NAME`") from None
        except pkcs11.PinLocked:
            raise KeyCustodyError(f"token {label!r} has locked its user PIN; unlock it with the SO PIN") from None
        except UnicodeDecodeError:
            raise KeyCustodyError("the token PIN in the sealed store is not UTF-8 text") from None
        except pkcs11.PKCS11Error as e:
            raise KeyCustodyError(f"cannot log in to token {label!r}: {type(e).__name__}") from None
        _LOGINS[key] = [session, 1, pin_hash]
        return key


def _logout(key: tuple[str, str]) -> None:
    with _LOGINS_LOCK:
        held = _LOGINS.get(key)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            del _LOGINS[key]
            _quietly(held[0].close)


def _unwrap_octet_string(value: bytes, raw_length: int) -> bytes:
    """CKA_EC_POINT is a DER OCTET STRING around the point (PKCS#11 2.40); some tokens give it bare."""
    if len(value) == raw_length:
        return value
    if len(value) == raw_length + 2 and value[0] == 0x04 and value[1] == raw_length:
        return value[2:]
    raise KeyCustodyError(f"the token returned an EC point of {len(value)} bytes; expected {raw_length}")


def _quietly(close) -> None:
    try:
        close()
    except Exception:  # noqa: BLE001 - closing a session the token already dropped
        pass
