"""Key management in the signed log: `skyguard key create`, `key rm` and `key cert` each append
one entry (`key_create`, `key_remove`, `key_certificate`) naming the key, its type (`key_type`),
backend and, for a certificate, its SHA-256. The daemon owns the log while it runs, so the CLI
hands the entry to it over the control socket (operation `key.record`);
without a daemon the CLI opens the log itself (the writer's lock keeps the two apart).

Only these kinds, with these fields, pass through the control operation: it is not a general way
to write the log. Not here: the crypto proxy's per-operation entries (proxy.py).
"""

from __future__ import annotations

from pathlib import Path

from skyguard.errors import BadInput
from skyguard.keys.types import KEY_TYPES, validate_key_name

KINDS = ("key_create", "key_remove", "key_certificate")
BACKENDS = ("file", "pkcs11", "tpm")  # skyguard.policy.keys.BACKENDS


def checked_fields(kind: str, fields: dict) -> dict:
    if kind not in KINDS:
        raise BadInput(f"key.record takes {' or '.join(KINDS)}, not {str(kind)[:40]!r}")
    name = validate_key_name(fields.get("name"))
    backend = fields.get("backend")
    if backend not in BACKENDS:
        raise BadInput(f"key.record: unknown backend {str(backend)[:20]!r}")
    out = {"name": name, "backend": backend}
    if kind == "key_create":
        if fields.get("key_type") not in KEY_TYPES:
            raise BadInput(f"key.record: unknown key type {str(fields.get('key_type'))[:20]!r}")
        out["key_type"] = fields["key_type"]  # `type` names the log entry's kind
        out["extractable"] = bool(fields.get("extractable", False))
    if kind == "key_certificate":
        digest = fields.get("sha256")
        if not isinstance(digest, str) or len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
            raise BadInput("key.record: key_certificate needs the certificate's sha256 (hex)")
        out["sha256"] = digest
    return out


def control_handler(record):
    """The daemon's `key.record` operation over its durable record(kind, **fields)."""
    def handle(args: dict) -> dict:
        kind = args.get("kind")
        record(kind, **checked_fields(kind, args.get("fields") or {}))
        return {"recorded": kind}
    return handle


def record_key_event(state_dir: Path, kind: str, **fields) -> str:
    """Append the entry through the running daemon, or directly when none runs. Returns how."""
    from skyguard import control

    fields = checked_fields(kind, fields)
    if control.daemon_running():
        control.request("key.record", kind=kind, fields=fields, state_dir=state_dir)
        return "daemon"
    from skyguard.tlog import LogWriter, entry, host_signer

    with LogWriter(Path(state_dir) / "log", host_signer(state_dir)) as writer:
        writer.append(entry(kind, **fields))
    return "log"
