"""`skyguard doctor`'s check of key custody in a PKCS#11 token (skyguard/doctor.py runs it).

What a token needs here: python-pkcs11, the token's module (SoftHSM's unless the policy names
another), softhsm2-util to make and inspect SoftHSM tokens, and OpenSSL's pkcs11 engine for token
keys in TLS (client certificates, TLS termination: skyguard/keys/tlskey.py). Like the TPM, it is an
optional capability: a host whose policy in force (the running daemon's) does not use
`keys.backend: pkcs11` passes whatever is missing, and is told what pkcs11 would need. When the
policy does use it, a missing piece fails, and so does a token that does not open with the PIN in
the sealed store (the message never holds the PIN). The file backend needs nothing more.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
from pathlib import Path

NAME = "PKCS#11 keys"
FIX_PACKAGES = "apt-get install softhsm2 libengine-pkcs11-openssl (or run ./scripts/setup)"


def _policy_in_force(state_dir: Path | None):
    """The running daemon's policy, or None (no daemon, or it does not answer)."""
    from skyguard import control

    try:
        return control.running_policy(state_dir, timeout=5) if control.daemon_running() else None
    except Exception:  # noqa: BLE001 - a daemon that does not answer: no policy to check against
        return None


def check_key_custody(state_dir: Path | None = None):
    """The check for the running daemon's policy (or for none)."""
    return check_pkcs11(_policy_in_force(state_dir), state_dir)


def check_pkcs11(policy, state_dir: Path | None = None):
    """A doctor Check of the PKCS#11 pieces, strict when `policy` keeps its keys in a token."""
    from skyguard import config
    from skyguard.checks import Check
    from skyguard.keys.softhsm import MODULE_CANDIDATES
    from skyguard.keys.tlskey import ENGINE_PATHS

    keys = policy.keys if policy is not None else None
    in_use = keys is not None and keys.backend == "pkcs11"
    module = keys.module if in_use else next((p for p in MODULE_CANDIDATES if os.path.exists(p)), MODULE_CANDIDATES[0])
    softhsm = "softhsm" in Path(module).name.lower()
    engine = next((p for p in ENGINE_PATHS if os.path.exists(p)), None)
    tls_keys = in_use and any(c.client_certificate for c in policy.credentials)

    have, missing, fixes = [], [], []  # missing: (what, whether it fails the check)
    if importlib.util.find_spec("pkcs11") is None:
        missing.append(("python-pkcs11", True))
        fixes.append("reinstall skyguard's Python dependencies (pyproject.toml: python-pkcs11)")
    else:
        have.append(f"python-pkcs11 {importlib.metadata.version('python-pkcs11')}")
    if os.path.exists(module):
        have.append(f"module {module}")
    else:
        missing.append((f"the PKCS#11 module {module}", True))
        fixes.append(FIX_PACKAGES if softhsm else "install the token's PKCS#11 module or fix keys.module")
    if shutil.which("softhsm2-util"):
        have.append("softhsm2-util")
    elif softhsm:
        missing.append(("softhsm2-util (to make and inspect SoftHSM tokens)", True))
        fixes.append("apt-get install softhsm2")
    if engine:
        have.append(f"OpenSSL pkcs11 engine {engine} (token keys in TLS)")
    else:
        missing.append(("OpenSSL's pkcs11 engine (token keys in TLS: client certificates, TLS termination)", tls_keys))
        fixes.append("apt-get install libengine-pkcs11-openssl")
    if not in_use:
        detail = "optional (no policy in force keeps keys in a token): " + ", ".join(have)
        if missing:
            detail += "; keys.backend pkcs11 would need " + ", ".join(what for what, _ in missing) + \
                f": {'; '.join(dict.fromkeys(fixes))}"
        return Check(NAME, True, detail)
    failing = [what for what, fails in missing if fails]
    notes = [f"without {what}, token keys serve no TLS" for what, fails in missing if not fails]
    if failing:
        return Check(NAME, False, f"the policy keeps keys in token {keys.token!r}, but {', '.join(failing)} "
                     "is missing", "; ".join(dict.fromkeys(fixes)))
    opened = _open_token(keys, Path(state_dir or config.STATE_DIR))
    if isinstance(opened, str):
        return Check(NAME, False, f"token {keys.token!r} does not open: {opened}",
                     f"initialise the token (softhsm2-util --init-token --free --label {keys.token}) and store "
                     f"its user PIN with `skyguard secret set {keys.pin_secret}`; run doctor as root")
    return Check(NAME, True, f"token {keys.token!r} opens with the PIN in secret {keys.pin_secret!r} "
                 f"({opened} keys); " + ", ".join(have + notes))


def _open_token(keys, state_dir: Path) -> int | str:
    """The number of keys in the token, or why it does not open (never the PIN)."""
    from skyguard.keys.backends import open_backend

    try:
        backend = open_backend(keys, state_dir)
    except PermissionError:
        return f"cannot read the sealed store in {state_dir}"
    except Exception as e:  # noqa: BLE001 - any failure is the check's answer (KeyCustodyError names the fix)
        return str(e)
    try:
        return len(backend.list())
    finally:
        backend.close()
