"""The credential-swap decision, without I/O: given one parsed HTTP request and the facts of the
connection it came on, decide swap, pass or block, and rewrite the request; given a response,
make it safe to hand back to the VM.

This is the whole security logic of the proxy, so it is small, pure and table-tested. It does
not parse HTTP (proxy.py does, with llhttp), open sockets, or frame messages: it never touches
Content-Length / Transfer-Encoding, because the proxy re-frames every message it forwards.

Rules (SPEC: credentials):
- A placeholder is swapped only when the TLS SNI, the Host header and the address the VM
  connected to (learned from DNS for that name) all agree with one of the credential's
  destinations, the client's zone is one of the credential's zones, and the placeholder sits
  only where `inject` says. Anything else carrying a placeholder is blocked as attempted
  exfiltration. Cleartext HTTP never carries a real secret.
- A request carrying a real secret in any form, or matching a configured pattern, is blocked.
- Responses lose every form of every secret and the auth-bearing headers named in policy.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import chain

from skyguard.credproxy.interfaces import (
    BLOCKED_CONTENT,
    BLOCKED_EXFILTRATION,
    BLOCKED_PROTOCOL,
    PASSED,
    SWAPPED,
    SecretSource,
)
from skyguard.credproxy.secretforms import SecretForms
from skyguard.httpheaders import is_forwarding_header
from skyguard.policy.model import Credential

Headers = tuple[tuple[bytes, bytes], ...]

# Headers that only concern one hop; the proxy drops them from what it forwards. Upgrade is
# refused outright (see decide): a WebSocket or h2c stream could not be inspected.
HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"proxy-authorization",
     b"proxy-authenticate", b"te", b"trailer", b"transfer-encoding", b"content-length", b"upgrade"}
)
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# Headers a client's Connection header may never remove: the decision reads them (Host, the
# placeholders' headers), the swap writes them (each credential's injection header, added per
# engine), the proxy sets them (Accept-Encoding), they frame the message, or their presence is
# refused (Upgrade). Dropping one after the decision would forward something never decided on.
_NEVER_CONNECTION_TOKENS = frozenset(
    {b"host", b"authorization", b"proxy-authorization", b"cookie", b"accept-encoding", b"content-length",
     b"transfer-encoding", b"content-type", b"content-encoding", b"expect", b"upgrade", b"connection"})
# Response headers never handed back: the proxy re-frames and decodes every body.
_ALWAYS_STRIPPED = HOP_BY_HOP | {b"content-encoding"}
_HOST_NAME = re.compile(r"[a-z0-9._:-]+")
_PORT = re.compile(r"[0-9]{1,5}")
_ABSOLUTE_TARGET = re.compile(rb"(?i)https?://([^/?#]*)")
# Joins the parts of a request for one-pass scans. A match inside any part is still a match in
# the joined bytes, so a joined scan finds everything a per-part scan finds (and at worst blocks
# a form split across two parts: fail closed). NUL cannot occur in a target or header.
_PART_SEPARATOR = b"\0"
# Longest destination name we put in a log entry (the Host header is the client's to choose).
MAX_LOGGED_NAME = 253


@dataclass(frozen=True)
class HttpRequest:
    method: bytes
    target: bytes
    headers: Headers  # as received, names lower-case (the proxy lowers them)
    body: bytes = b""
    http_version: bytes = b"1.1"

    def __repr__(self) -> str:  # bodies and header values may hold secrets after a swap
        return (f"HttpRequest({self.method.decode('latin-1')} <target hidden>, {len(self.headers)} headers, "
                f"{len(self.body)} body bytes)")


@dataclass(frozen=True)
class ConnectionFacts:
    """What the proxy knows about the connection, independent of what the request claims."""

    workload: str | None  # None: the client address belongs to no workload of the policy
    zone: str | None
    sni: str | None  # None for cleartext HTTP or a ClientHello without SNI
    address: str  # the address the VM connected to (SO_ORIGINAL_DST)
    port: int
    tls: bool
    address_matches: Callable[[str, str], bool]  # (name, ip) -> was ip learned from DNS for name


@dataclass(frozen=True)
class Verdict:
    action: str  # "swap" | "pass" | "block"
    status: int  # HTTP status to answer with when blocked (0 otherwise)
    reason: str  # human-readable, never a secret
    request: HttpRequest | None  # what to forward (None when blocked)
    entries: tuple[dict, ...] = ()  # fields of "credential" decision-log entries, one per credential concerned
    results: tuple[tuple[str | None, str], ...] = ()  # (credential, result) for the metrics
    host: str | None = None  # normalised destination name the request was for

    def __repr__(self) -> str:
        return f"Verdict({self.action}, {self.status}, {self.reason!r})"


# The Host's normalised name, remembered: a client sends the same Host on every request (issue
# 24). Bounded, since the bytes are the client's to choose: emptied when full, long keys never kept.
_MEMO_ENTRIES = 1024
_MEMO_KEY_BYTES = 255
_host_memo: dict[bytes, str | None] = {}  # Host header value -> normalise_name(value)


def _remember(memo: dict, key: bytes, value):
    if len(key) <= _MEMO_KEY_BYTES:
        if len(memo) >= _MEMO_ENTRIES:
            memo.clear()
        memo[key] = value
    return value


def _normalised_host(value: bytes) -> str | None:
    try:
        return _host_memo[value]
    except KeyError:
        return _remember(_host_memo, value, normalise_name(value))


def _without_forwarding_headers(request: HttpRequest) -> HttpRequest:
    """The request without what the VM claims about forwarding (httpheaders): the upstream gets
    the real credential for the Host the decision checked, and no other host, scheme or path
    to act for. Done before the decision, so it is made on exactly the headers forwarded."""
    for name, _ in request.headers:
        if is_forwarding_header(name):
            break
    else:
        return request
    headers = tuple((n, v) for n, v in request.headers if not is_forwarding_header(n))
    return HttpRequest(request.method, request.target, headers, request.body, request.http_version)


def normalise_name(name: str | bytes | None) -> str | None:
    """Lower-case, no trailing dot, no port. None when empty or not a plausible host name."""
    if name is None:
        return None
    if isinstance(name, bytes):
        try:
            name = name.decode("ascii")
        except UnicodeDecodeError:
            return None
    name = name.strip().lower()
    port = ""
    if name.startswith("["):  # [v6]:port
        end = name.find("]")
        name, rest = (name[1:end], name[end + 1:]) if end > 0 else ("", "")
        if rest:
            if not rest.startswith(":"):
                return None
            port = rest[1:]
    elif name.count(":") == 1:
        name, port = name.split(":", 1)
    # Only digits after the colon: "a.test:443@evil.test" is a.test to this function but names
    # the host evil.test (with userinfo) to a server reading it as an authority.
    if port and not _PORT.fullmatch(port):
        return None
    name = name.rstrip(".")
    if not name or len(name) > 253 or not _HOST_NAME.fullmatch(name):
        return None
    return name


def _authority_of(target: bytes) -> bytes | None:
    """The authority of an absolute-form target (http://host/...), else None."""
    match = _ABSOLUTE_TARGET.match(target)
    return match.group(1) if match else None


class SwapEngine:
    """Decides for every request of the proxy. Thread-safe after construction (read-only state).

    Secrets are read once from the SecretSource at construction (call reload() after the store
    or the policy changes). A credential whose secret cannot be read stays in force for
    blocking: its placeholder is still recognised, and a would-be swap fails closed."""

    def __init__(
        self,
        credentials: Sequence[Credential],
        secrets: SecretSource,
        content_patterns: Iterable[str | bytes] = (),
    ):
        self.credentials = tuple(credentials)
        self._source = secrets
        self._patterns = tuple(
            re.compile(p if isinstance(p, bytes) else p.encode()) for p in content_patterns
        )
        self.reload()

    def reload(self) -> None:
        values: dict[str, bytes] = {}
        self.unavailable: tuple[str, ...] = ()
        missing = []
        for credential in self.credentials:
            try:
                value = self._source.get(credential.secret)
                values[credential.name] = bytes(value)
            except Exception:  # fail closed per credential; the message could hold anything
                missing.append(credential.name)
        self._values = values
        self.unavailable = tuple(missing)
        self.forms = SecretForms(values.values())
        # Header names are lowered as they are read: a secret as a name is looked for lowered.
        self.name_forms = SecretForms(v.lower() for v in values.values())
        # Per credential, computed once per load: what decide() needs of it for every request.
        self._placeholders = tuple(_Swap(c, values.get(c.name)) for c in self.credentials)
        strip_by_destination: dict[str, set[bytes]] = {}
        for credential in self.credentials:
            for destination in credential.destinations:
                strip_by_destination.setdefault(destination, set(_ALWAYS_STRIPPED)).update(
                    h.lower().encode() for h in credential.strip_response_headers)
        self._strip_by_destination = {d: frozenset(names) for d, names in strip_by_destination.items()}
        self._kept_despite_connection = _NEVER_CONNECTION_TOKENS | {
            c.inject.header.lower().encode() for c in self.credentials if c.inject.header}

    def __repr__(self) -> str:
        return f"SwapEngine(credentials={[c.name for c in self.credentials]})"

    # ---- requests -------------------------------------------------------------------------

    def decide(self, request: HttpRequest, facts: ConnectionFacts) -> Verdict:
        sent = request
        sent_names = [n for n, _ in request.headers]
        if b"connection" in sent_names:  # (without one, there are no tokens to drop)
            request = self._without_connection_tokens(request)
        request = _without_forwarding_headers(request)
        names = sent_names if request is sent else [n for n, _ in request.headers]
        host = _normalised_host(request.headers[names.index(b"host")][1]) if names.count(b"host") == 1 else None
        authority = _authority_of(request.target)
        if authority is not None and normalise_name(authority) != host:
            host = None
        # The name as logged: never a secret (a VM holding one may send it as Host; it is blocked below).
        destination = host if host and not self.forms.found_in(host.encode()) else "-"

        block = _Blocker(facts, destination, host)  # not a closure: no cells in this hot function

        if host is None:
            return block(400, "missing, repeated or malformed Host header", BLOCKED_PROTOCOL)
        if b"upgrade" in names or request.method == b"CONNECT":
            return block(501, "protocol upgrades and CONNECT cannot be inspected", BLOCKED_PROTOCOL)
        if authority is None and not request.target.startswith(b"/") and request.target != b"*":
            # Absolute-form with another scheme (ftp://evil.test/): its authority was never
            # compared with Host, yet servers route on it (RFC 9112 3.2.2).
            return block(400, "request target is neither a path nor an http(s) URI", BLOCKED_PROTOCOL)
        if facts.tls and facts.sni != host:
            return block(421, "TLS SNI and Host header disagree", BLOCKED_EXFILTRATION)

        sent_parts = _parts(sent)
        joined = _PART_SEPARATOR.join(sent_parts)
        # As sent: a secret in a header the Connection header drops is still an attempt.
        if self.forms.found_in(joined) or self.name_forms.found_in(_PART_SEPARATOR.join(sent_names)):
            return block(403, "request carries a real secret value", BLOCKED_CONTENT)
        for pattern in self._patterns:
            if any(pattern.search(part) for part in sent_parts):
                return block(403, "request matches a content-filter pattern", BLOCKED_CONTENT)

        headers = list(request.headers)
        body = request.body
        swapped: list[str] = []
        lowered = _LoweredRequest(request, joined if request is sent else None)
        for swap in self._placeholders:
            credential, placeholder, needle = swap.credential, swap.placeholder, swap.needle
            if needle not in lowered.joined:  # the common case: one search, no per-part work
                continue
            where = lowered.locations(needle)
            body_count = lowered.body.count(needle)
            refusal = self._refusal(swap, facts, host, where, body_count)
            if refusal:
                return block(403, refusal, BLOCKED_EXFILTRATION, credential.name)
            secret = self._values[credential.name]
            if credential.inject.header:
                headers = _swap_header(headers, swap)
                if headers is None:
                    return block(403, f"placeholder in an unexpected form in {credential.inject.header}",
                                 BLOCKED_EXFILTRATION, credential.name)
            if "body" in where:
                if body.count(placeholder) != body_count:
                    return block(403, "placeholder in an unexpected form in the body",
                                 BLOCKED_EXFILTRATION, credential.name)
                body = body.replace(placeholder, secret)
            swapped.append(credential.name)

        # The proxy speaks identity to upstreams: it must see response bodies to scrub them.
        headers = [(n, v) for n, v in headers if n != b"accept-encoding"] + [(b"accept-encoding", b"identity")]
        rewritten = HttpRequest(request.method, request.target, tuple(headers), body, request.http_version)
        if not swapped:
            return Verdict("pass", 0, "no placeholder", rewritten, (), ((None, PASSED),), host)
        entries = tuple([self._entry(name, facts, destination, SWAPPED, "swapped") for name in swapped])
        return Verdict("swap", 0, "swapped", rewritten, entries,
                       tuple([(name, SWAPPED) for name in swapped]), host)

    def _without_connection_tokens(self, request: HttpRequest) -> HttpRequest:
        """The request without the headers its Connection header names (RFC 9110 7.6.1), except
        those the decision or the swap relies on, which stay. Done first, so the decision is
        made on exactly the headers that are forwarded."""
        tokens = {t.strip().lower() for n, v in request.headers if n == b"connection" for t in v.split(b",")}
        tokens -= self._kept_despite_connection
        tokens.discard(b"")
        if not tokens:
            return request
        headers = tuple((n, v) for n, v in request.headers if n not in tokens)
        return HttpRequest(request.method, request.target, headers, request.body, request.http_version)

    def _refusal(self, swap: _Swap, facts: ConnectionFacts, host: str, where: set[str],
                 body_count: int) -> str | None:
        """Why this credential must not be swapped here, or None when every check passes."""
        credential = swap.credential
        if facts.zone not in credential.zones:
            return f"zone {facts.zone or 'unknown'} may not use credential {credential.name}"
        if host not in credential.destinations:
            return f"{host[:MAX_LOGGED_NAME]} is not a destination of credential {credential.name}"
        if not facts.tls:
            return "a real secret is never sent over cleartext HTTP"
        if facts.sni != host:
            return "TLS SNI and Host header disagree"
        if not facts.address_matches(host, facts.address):
            return f"the connected address was not learned from DNS for {host}"
        stray = sorted(where - swap.allowed)
        if stray:
            return f"placeholder of {credential.name} in {', '.join(stray)}"
        if "body" in where and body_count > credential.inject.max_occurrences:
            return (f"placeholder of {credential.name} appears {body_count} times in the body "
                    f"(at most {credential.inject.max_occurrences} allowed)")
        if credential.name in self.unavailable:
            return f"secret of credential {credential.name} is not available in the store"
        if credential.inject.header and swap.control_in_secret:
            # A CR or LF in a header value would let the secret's bytes forge headers upstream.
            return f"secret of credential {credential.name} holds control characters and cannot go in a header"
        return None

    @staticmethod
    def _entry(credential, facts: ConnectionFacts, destination: str, result: str, reason: str) -> dict:
        return {  # the fields of a "credential" decision-log entry
            "credential": credential,
            "zone": facts.zone,
            "workload": facts.workload,
            "destination": destination[:MAX_LOGGED_NAME],
            "address": facts.address,
            "port": facts.port,
            "result": result,
            "reason": reason,
        }

    # ---- responses ------------------------------------------------------------------------

    def response_headers_to_strip(self, host: str | None) -> frozenset[bytes]:
        """Every response header dropped for `host`: hop-by-hop, framing, content coding, and
        the auth-bearing headers policy names for the credentials of that destination."""
        strip = self._strip_by_destination.get(host)
        if strip is None:  # not a credential destination (the cache holds only those: bounded)
            strip = _ALWAYS_STRIPPED
        return strip

    def scrub_response(self, host: str | None, headers: Headers, body: bytes) -> tuple[Headers, bytes, int]:
        """Headers and body safe for the VM, and how many secret occurrences were removed.
        A header whose name holds a secret is dropped; values and the body are redacted.

        The body must already be decoded (decode_body); framing headers are dropped here and
        re-created by the proxy. The reason phrase: scrub it with self.forms.scrub."""
        strip = self.response_headers_to_strip(host)
        body, scrubbed = self.forms.scrub(body)
        kept = [(name, value) for name, value in headers if name not in strip]
        # One scan of every name and value first (NUL cannot occur in a header, so a match never
        # spans two of them); field by field only when something is there.
        if not self.forms.found_in(_PART_SEPARATOR.join([part for pair in kept for part in pair])) and \
                not self.name_forms.found_in(_PART_SEPARATOR.join([name for name, _ in kept])):
            return tuple(kept), body, scrubbed
        headers, kept = kept, []  # type: ignore[assignment]
        for name, value in headers:
            if self.forms.found_in(name) or self.name_forms.found_in(name):
                scrubbed += 1  # a header name is a token: it cannot be redacted, so it goes
                continue
            value, n = self.forms.scrub(value)
            scrubbed += n
            kept.append((name, value))
        return tuple(kept), body, scrubbed


def _parts(request: HttpRequest) -> list[bytes]:
    return [request.target, request.body, *chain.from_iterable(request.headers)]


class _Blocker:
    """decide()'s block verdicts for one request: call with (status, reason, result, credential)."""

    __slots__ = ("facts", "destination", "host")

    def __init__(self, facts: ConnectionFacts, destination: str, host: str | None):
        self.facts, self.destination, self.host = facts, destination, host

    def __call__(self, status: int, reason: str, result: str, credential: str | None = None) -> Verdict:
        entry = SwapEngine._entry(credential, self.facts, self.destination, result, reason)
        return Verdict("block", status, reason, None, (entry,), ((credential, result),), self.host)


class _LoweredRequest:
    """A request's parts in lower case, computed once per request for placeholder searches."""

    __slots__ = ("target", "headers", "body", "joined")

    def __init__(self, request: HttpRequest, joined: bytes | None = None):
        """`joined`: _PART_SEPARATOR.join(_parts(request)) when the caller has it already."""
        self.target = request.target.lower()
        self.headers = [(name, name.lower(), value.lower()) for name, value in request.headers]
        self.body = request.body.lower()
        # Lower-casing the joined parts is joining the lower-cased parts (the separator is NUL).
        self.joined = joined.lower() if joined is not None else _PART_SEPARATOR.join(
            [self.target, self.body] + [part for _, name, value in self.headers for part in (name, value)])

    def locations(self, needle: bytes) -> set[str]:
        """Where the (lower-case) placeholder appears, as "target", "header:<name>", "body".
        Case-insensitive match (so a case-mangled copy is still caught), raw only: the
        placeholder is no secret, so encoded copies of it leak nothing and are left alone."""
        where = set()
        if needle in self.target:
            where.add("target")
        for name, name_lower, value in self.headers:
            if needle in value or needle in name_lower:
                where.add("header:" + name.decode("latin-1"))
        if needle in self.body:
            where.add("body")
        return where


class _Swap:
    """One credential as decide() uses it, computed once per load (not per request): its
    placeholder, the header values it may take, the injected value, where it may appear."""

    __slots__ = ("credential", "placeholder", "needle", "header", "expected", "injected", "allowed",
                 "control_in_secret")

    def __init__(self, credential: Credential, secret: bytes | None):
        inject = credential.inject
        self.credential = credential
        self.placeholder = credential.placeholder.encode()
        self.needle = self.placeholder.lower()  # searched in the lower-cased request
        self.header = inject.header.lower().encode() if inject.header else None
        template = inject.format.format(secret="\0").encode()
        self.expected = frozenset({self.placeholder, template.replace(b"\0", self.placeholder)})
        # None while the secret cannot be read: the swap is then refused before it is needed.
        self.injected = template.replace(b"\0", secret) if secret is not None else None
        self.allowed = frozenset(({"header:" + inject.header.lower()} if inject.header else set()) |
                                 ({"body"} if inject.body else set()))
        self.control_in_secret = secret is not None and _CONTROL.search(secret) is not None

    def __repr__(self) -> str:  # `injected` holds the secret
        return f"_Swap({self.credential.name})"


def _swap_header(headers: list, swap: _Swap):
    """Headers with the injection header's value replaced, or None when the placeholder is in
    the header in a shape other than the placeholder itself or `format` applied to it."""
    target, expected, injected, needle = swap.header, swap.expected, swap.injected, swap.needle
    out = []
    done = 0
    for name, value in headers:
        if name == target and needle in value.lower():
            if value.strip() not in expected:
                return None
            out.append((name, injected))
            done += 1
        else:
            out.append((name, value))
    if done > 1:
        return None
    return out
