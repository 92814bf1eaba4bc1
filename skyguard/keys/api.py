"""The crypto proxy's HTTP API as decisions without I/O: which request is this, may this VM make
it, and what is answered. proxy.py does the sockets and runs the key operation; tests drive this
module directly.

    GET  /v1/keys                      the keys this VM may use, with their operations
    GET  /v1/keys/NAME/public          the public key (PEM)
    POST /v1/keys/NAME/sign            {"digest": HEX}                   -> {"signature": BASE64}
    POST /v1/keys/NAME/verify          {"digest": HEX, "signature": B64} -> {"valid": true|false}
    POST /v1/keys/NAME/decrypt         {"ciphertext": BASE64}            -> {"plaintext": BASE64}

A digest is SHA-256, -384 or -512 (32, 48 or 64 bytes). ECDSA signatures are DER, RSA is PKCS#1
v1.5, Ed25519 signs the digest bytes; decrypt is RSA-OAEP (SHA-1). Who asks is the caller the
proxy identified from the datapath (interface and source address), never anything in the request.

Refusals: 400 malformed (or input the key cannot use), 403 zone or operation not allowed (or one
the key's type cannot do), 404 unknown key, 405 wrong method, 413 too large, 429 over the key's
rate limit, or over LIST_RATE for listing. Not here: sockets, the key backends.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
from dataclasses import dataclass, field

from skyguard.keys.types import DIGEST_SIZES, KEY_NAME_RE

MAX_BODY = 16 * 1024  # an RSA-3072 ciphertext in base64 is ~512 bytes; nothing bigger is a request
OPERATIONS = ("sign", "verify", "decrypt")
# GET /v1/keys reads no backend but is still work a VM can ask for in a loop: it has its own bucket
# per VM in the same limiter, under LIST_BUCKET (never a key's name: those start with a-z or 0-9).
LIST_RATE = 10.0  # listings per second, per VM
LIST_BURST = 20  # listings a VM may make at once after a pause
LIST_BUCKET = "-"


@dataclass(frozen=True)
class Caller:
    """A VM as the datapath identified it."""

    workload: str | None
    zone: str | None
    interface: str | None
    address: str


@dataclass
class Reply:
    status: int
    body: dict
    outcome: str  # a bounded word for metrics and the log: ok, denied-zone, rate-limited, ...

    def payload(self) -> bytes:
        return json.dumps(self.body, sort_keys=True).encode() + b"\n"


@dataclass(frozen=True)
class Operation:
    """A request that passed every check: the proxy runs it on the key backend."""

    key: str
    operation: str  # sign | verify | decrypt | public | list
    data: bytes = b""  # the digest, or the ciphertext
    signature: bytes = b""
    digest_hex: str = ""  # what the log records: the digest signed, or SHA-256 of the ciphertext


def refuse(status: int, outcome: str, message: str) -> Reply:
    return Reply(status, {"error": message}, outcome)


def parse(method: str, target: str, body: bytes) -> Operation | Reply:
    """The request's shape only (no policy)."""
    path = target.split("?", 1)[0]
    parts = [p for p in path.split("/") if p]
    if parts[:2] != ["v1", "keys"] or len(parts) > 4:
        return refuse(404, "bad-request", "no such endpoint; see GET /v1/keys")
    if len(parts) == 2:
        if method != "GET":
            return refuse(405, "bad-request", "use GET /v1/keys")
        return Operation("", "list")
    name = parts[2]
    if not KEY_NAME_RE.fullmatch(name):
        return refuse(400, "bad-request", "a key name is 1-59 characters of a-z, 0-9, '.', '_', '-'")
    if len(parts) == 3:
        return refuse(404, "bad-request", f"use /v1/keys/{name}/sign, verify, decrypt or public")
    operation = parts[3]
    if operation == "public":
        if method != "GET":
            return refuse(405, "bad-request", "use GET for the public key")
        return Operation(name, "public")
    if operation not in OPERATIONS:
        return refuse(404, "bad-request", f"unknown operation; use one of {', '.join(OPERATIONS)} or public")
    if method != "POST":
        return refuse(405, "bad-request", f"use POST /v1/keys/{name}/{operation} with a JSON body")
    if len(body) > MAX_BODY:
        return refuse(413, "too-large", f"the body is over {MAX_BODY} bytes")
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: deep nesting, within MAX_BODY
        return refuse(400, "bad-request", "the body is not JSON")
    if not isinstance(request, dict):
        return refuse(400, "bad-request", "the body must be a JSON object")
    if operation == "decrypt":
        ciphertext = _base64(request.get("ciphertext"))
        if not ciphertext:
            return refuse(400, "bad-request", "give {\"ciphertext\": BASE64}")
        return Operation(name, operation, data=ciphertext, digest_hex=hashlib.sha256(ciphertext).hexdigest())
    digest = _hex(request.get("digest"))
    if digest is None or len(digest) not in DIGEST_SIZES:
        return refuse(400, "bad-request", "give {\"digest\": HEX} of 32, 48 or 64 bytes (SHA-256/384/512)")
    if operation == "verify":
        signature = _base64(request.get("signature"))
        if not signature:
            return refuse(400, "bad-request", "give {\"digest\": HEX, \"signature\": BASE64}")
        return Operation(name, operation, data=digest, signature=signature, digest_hex=digest.hex())
    return Operation(name, operation, data=digest, digest_hex=digest.hex())


def _hex(value) -> bytes | None:
    if not isinstance(value, str) or len(value) > 256:
        return None
    try:
        return bytes.fromhex(value)
    except ValueError:
        return None


def _base64(value) -> bytes | None:
    if not isinstance(value, str) or len(value) > MAX_BODY:
        return None
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None


@dataclass
class _Bucket:
    tokens: float
    at: float
    refused: int = 0  # refusals not yet in the log
    logged_at: float = 0.0


@dataclass
class RateLimiter:
    """A token bucket per (key, workload): one VM's flood empties its own bucket only."""

    buckets: dict = field(default_factory=dict)

    def take(self, key: str, workload: str, rate: float, burst: int, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        bucket = self.buckets.get((key, workload))
        if bucket is None:
            bucket = self.buckets[(key, workload)] = _Bucket(float(burst), now)
        bucket.tokens = min(float(burst), bucket.tokens + (now - bucket.at) * rate)
        bucket.at = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return True
        bucket.refused += 1
        return False

    def refusals_to_log(self, key: str, workload: str, now: float | None = None, force: bool = False) -> int:
        """How many refusals the next log entry stands for; 0 while one was logged in the last second
        (a flood over the limit writes about one entry per second, not one per request). force:
        those not logged yet, now (the proxy's entry a second after a flood's last one)."""
        now = time.monotonic() if now is None else now
        bucket = self.buckets.get((key, workload))
        if bucket is None or (now - bucket.logged_at < 1.0 and not force):
            return 0
        count, bucket.refused, bucket.logged_at = bucket.refused, 0, now
        return count

    def forget_except(self, keys: set[str]) -> None:
        for k in [k for k in self.buckets if k[0] not in keys and k[0] != LIST_BUCKET]:
            del self.buckets[k]


MAX_REFUSAL_KINDS = 4096  # past this, kinds with nothing left to log are forgotten


@dataclass
class Refusals:
    """The refusals a rate limit does not count (RateLimiter does those) by kind, a tuple of
    bounded words (VM, offered key or "-", operation, outcome): the log takes about one entry a
    second of each kind, and an entry's count covers every refusal since the previous one."""

    kinds: dict = field(default_factory=dict)  # kind -> [refusals not yet in the log, when the last entry was]

    def refused(self, kind: tuple, now: float | None = None) -> int:
        """Count one refusal; how many the entry to make now stands for (0: one was made in the
        last second, and this one waits for the next)."""
        now = time.monotonic() if now is None else now
        counts = self.kinds.get(kind)
        if counts is None:
            if len(self.kinds) >= MAX_REFUSAL_KINDS:
                self.kinds = {k: c for k, c in self.kinds.items() if c[0] or now - c[1] < 1.0}
            counts = self.kinds[kind] = [0, float("-inf")]
        counts[0] += 1
        return self.to_log(kind, now)

    def to_log(self, kind: tuple, now: float | None = None, force: bool = False) -> int:
        """As RateLimiter.refusals_to_log, for one kind."""
        now = time.monotonic() if now is None else now
        counts = self.kinds.get(kind)
        if counts is None or (now - counts[1] < 1.0 and not force):
            return 0
        count, counts[0], counts[1] = counts[0], 0, now
        return count


def authorize(op: Operation, caller: Caller, keys_config, limiter: RateLimiter) -> Reply | None:
    """None when `caller` may run `op` now; else the refusal."""
    if caller.workload is None:
        return refuse(403, "not-a-workload", "this address is not a VM of the policy")
    if op.operation == "list":
        if not limiter.take(LIST_BUCKET, caller.workload, LIST_RATE, LIST_BURST):
            return refuse(429, "rate-limited", "over the rate limit of listing keys; slow down")
        return None
    grant = keys_config.grant(op.key)
    if grant is None:
        return refuse(404, "unknown-key", f"no key {op.key!r} is offered to VMs")
    if not grant.allows(caller.zone):
        return refuse(403, "denied-zone", f"zone {caller.zone!r} may not use key {op.key!r}")
    if op.operation != "public" and op.operation not in grant.operations:
        return refuse(403, "denied-operation", f"key {op.key!r} does not allow {op.operation}")
    # Every operation on a key, `public` too (it reads the backend): one bucket per VM and key.
    if not limiter.take(op.key, caller.workload, grant.rate, grant.burst):
        return refuse(429, "rate-limited", f"over the rate limit of key {op.key!r}; slow down")
    return None


def bucket_of(op: Operation) -> str:
    """The rate limiter's bucket name for `op` (with the VM's workload): its key, or LIST_BUCKET."""
    return LIST_BUCKET if op.operation == "list" else op.key


def listing(caller: Caller, keys_config) -> Reply:
    keys = [{"name": g.name, "operations": list(g.operations)} for g in keys_config.grants if g.allows(caller.zone)]
    return Reply(200, {"keys": keys, "workload": caller.workload, "zone": caller.zone}, "ok")
