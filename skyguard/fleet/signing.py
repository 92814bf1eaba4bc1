"""Signed policy distribution: what an admin signs when pushing a policy to the fleet, and the one
decision every host makes before applying one. Pure: no I/O but reading key files.

A pushed policy is stored as its text and a signed note (c2sp.org/signed-note, Ed25519, made and
checked by skyguard/tlog/checkpoint.py) whose text binds the policy's SHA-256, a revision and the
hosts it is for:

    skyguard.fleet/policy/v1
    revision 7
    sha256 3f0c...            (hex SHA-256 of the policy file's bytes: the "policy hash")
    hosts *                   (or a comma-separated list of fleet member names)

A host applies a policy only if the note is signed by one of its configured admin keys, the text
has that hash, the note names it (or *), and the revision is higher than the one it runs (the
same revision with the same hash is a no-op). So whoever can write etcd, without an admin key,
can neither push a policy nor roll a host back to an older signed one.

Not here: the store (store.py), applying a policy (the daemon's hot swap).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from skyguard.errors import BadInput
from skyguard.fleet.store import FleetError, load_value
from skyguard.tlog.checkpoint import Signer, Verifier, check_note_characters, split_note
from skyguard.tlog.errors import BadLogInput, VerificationError

HEADER = "skyguard.fleet/policy/v1"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class PolicyRefused(FleetError):
    """A pushed policy this host must not apply; `reason` is a short label for metrics."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def check_member_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise BadInput(f"fleet member name {name!r}: use letters, digits, '.', '_' and '-' "
                       f"(at most 63, starting with a letter or digit)")
    return name


@dataclass(frozen=True)
class SignedPolicy:
    revision: int
    sha256: str
    hosts: tuple[str, ...]   # ("*",) for every host
    text: str
    note: str

    def for_host(self, name: str) -> bool:
        return "*" in self.hosts or name in self.hosts

    def to_json(self) -> bytes:
        return json.dumps({"note": self.note, "text": self.text}).encode()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sign_policy(text: str, revision: int, signer: Signer, hosts: tuple[str, ...] = ("*",)) -> SignedPolicy:
    hosts = tuple(hosts) or ("*",)
    if hosts != ("*",):
        for host in hosts:
            check_member_name(host)
    body = f"{HEADER}\nrevision {revision}\nsha256 {sha256_text(text)}\nhosts {','.join(hosts)}\n"
    return SignedPolicy(revision, sha256_text(text), hosts, text, signer.sign(body))


def _parse_body(text: str) -> tuple[int, str, tuple[str, ...]]:
    lines = text.split("\n")
    if len(lines) != 5 or lines[0] != HEADER or lines[4] != "":
        raise PolicyRefused("malformed", f"not a {HEADER} statement")
    fields = {}
    for line in lines[1:4]:
        key, _, value = line.partition(" ")
        fields[key] = value
    try:
        revision = int(fields["revision"])
        sha = fields["sha256"]
        hosts = tuple(fields["hosts"].split(","))
    except (KeyError, ValueError):
        raise PolicyRefused("malformed", "the signed statement lacks revision, sha256 or hosts") from None
    if revision < 1 or not re.fullmatch(r"[0-9a-f]{64}", sha) or not all(hosts):
        raise PolicyRefused("malformed", "the signed statement has a bad revision, hash or host list")
    return revision, sha, hosts


def open_policy(value: bytes, admins: list[Verifier]) -> SignedPolicy:
    """The stored record, if signed by one of `admins` and matching its hash; PolicyRefused else."""
    try:
        record = load_value(value)
        note, text = record["note"], record["text"]
        if not isinstance(note, str) or not isinstance(text, str):
            raise TypeError
        text.encode("utf-8")   # JSON can carry lone surrogates: UnicodeEncodeError, a ValueError
    except (ValueError, KeyError, TypeError):
        raise PolicyRefused("malformed", "the stored policy record is not {note, text} JSON") from None
    revision, sha, hosts = open_note(note, admins)
    if sha256_text(text) != sha:
        raise PolicyRefused("hash_mismatch", "the policy text does not have the hash its signature covers")
    return SignedPolicy(revision, sha, hosts, text, note)


def open_note(note: str, admins: list[Verifier]) -> tuple[int, str, tuple[str, ...]]:
    """(revision, policy hash, hosts) of a policy's signed note, if one of `admins` signed it;
    PolicyRefused else. What open_policy checks but the text: a host reports the note of the
    policy it runs (agent.py), so what it claims to run is checked without the policy."""
    try:
        if not isinstance(note, str):
            raise TypeError
        check_note_characters(note)
    except (ValueError, TypeError, BadLogInput):
        raise PolicyRefused("malformed", "the policy's note is not text") from None
    try:
        _, signatures = split_note(note)
    except BadLogInput:
        raise PolicyRefused("unsigned", "the stored policy carries no signed note") from None
    body = None
    for admin in admins:
        try:
            body = admin.verify(note)
            break
        except VerificationError:
            continue
    if body is None:
        names = ", ".join(sorted({n for n, _ in signatures})) or "none"
        raise PolicyRefused("not_admin", f"the policy is not signed by a configured admin key "
                                         f"(it carries signatures by: {names})")
    return _parse_body(body)


def claimed(value: bytes) -> tuple[int | None, str | None]:
    """The revision and policy hash the stored record `value` claims, read without checking its
    signature (None where it claims none): to name a refused record, never to decide anything."""
    try:
        lines = load_value(value)["note"].split("\n")[:8]
    except (ValueError, KeyError, TypeError, AttributeError):
        return None, None
    revision = sha = None
    for line in lines:
        key, _, field = line.partition(" ")
        if key == "revision" and re.fullmatch(r"[0-9]{1,18}", field):
            revision = int(field)
        elif key == "sha256" and re.fullmatch(r"[0-9a-f]{64}", field):
            sha = field
    return revision, sha


def claimed_hosts(value: bytes) -> tuple[str, ...]:
    """The hosts the stored record `value` claims to be for, read without checking its signature
    (* when it names none): to show a claim, never to decide anything."""
    try:
        lines = load_value(value)["note"].split("\n")[:8]
    except (ValueError, KeyError, TypeError, AttributeError):
        return ("*",)
    for line in lines:
        key, _, field = line.partition(" ")
        if key == "hosts" and field:
            return tuple(field.split(","))
    return ("*",)


def decide(signed: SignedPolicy, name: str, running_revision: int, running_sha: str | None) -> bool:
    """True: apply it. False: nothing to do (not for this host, or the one already running).
    PolicyRefused: an older revision, or another policy under the running revision."""
    if not signed.for_host(name):
        return False
    if signed.revision == running_revision and signed.sha256 == running_sha:
        return False
    if signed.revision <= running_revision:
        raise PolicyRefused("rollback", f"revision {signed.revision} is not newer than the revision "
                                        f"{running_revision} this host runs (rollback refused)")
    return True


def load_admin_verifiers(values: list[str] | tuple[str, ...]) -> list[Verifier]:
    """Admin verifier keys (vkey text or files holding one per line)."""
    out = []
    for value in values:
        path = Path(value)
        lines = path.read_text().split() if path.is_file() else [value]
        for line in lines:
            try:
                out.append(Verifier.from_vkey(line.strip()))
            except BadLogInput as e:
                raise BadInput(f"admin key {line[:60]!r}: {e}") from None
    return out


def admin_signer(path: Path, name: str | None = None) -> Signer:
    """The admin's signing key: a PEM Ed25519 private key file (`skyguard fleet admin-key`)."""
    from skyguard.tlog.hostkey import load_or_create_key_file

    key = load_or_create_key_file(Path(path), "admin key", create=False,
                                  missing_hint="; make one with `skyguard fleet admin-key FILE`")
    return Signer(name or "skyguard-admin", key)
