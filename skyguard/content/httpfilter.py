"""The content filter as the credential proxy uses it: one HTTP body (a request's on the way out,
a response's on the way in) judged under the policy's content rules, the block recorded, and the
body of the 403 the VM gets instead (the proxy frames it with its own HTTP/1 writer, so this
module does not import the credential proxy, which imports it).

The proxy holds whole messages before it forwards them (credproxy/http1.py), so a request whose
body is blocked never leaves: the upstream receives no byte of it, let alone a complete file.
Empty bodies are not inspected (nothing is uploaded; a GET must not depend on clamd), but a
request's target and header names and values are always held to the rules' patterns. Not here:
which connections reach the proxy (steering), the engines (inspector.py).

Off the event loop: decoding a body (content codings, multipart, JSON and its base64 strings:
http.py) costs CPU in proportion to its size, up to seconds at max_inspect_bytes, and the loop
carries every VM's traffic. Bodies past bodywork.INLINE_BYTES, or with a content coding (a small
body may expand to the whole buffer), are decoded and hashed in skyguard.bodywork's threads, the
ones the credential proxy scrubs bodies in (a few at once; json and base64 hold the GIL, so more
would only contend). Memory is as before: a judged body and its files, a few times
max_inspect_bytes at most, for each body being judged.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import unquote_to_bytes

from skyguard import bodywork
from skyguard.content.http import Uninspectable, body_files, form_fields
from skyguard.content.inspector import PATTERN, UNINSPECTABLE, ContentEngine, ContentVerdict, inspect_bytes
from skyguard.content.record import ContentMetrics, record_block

_T = TypeVar("_T")


async def judge_body(engine: ContentEngine, facts, host: str | None, direction: str, headers, body: bytes,
                     decision_log, metrics: ContentMetrics, target: bytes | None = None) -> ContentVerdict | None:
    """The blocking verdict for this body, or None when it may pass. `facts` is the proxy's
    ConnectionFacts (zone, workload). A request's `target`, header names and header values are
    held to the rules' patterns too (a key in a query string or a header name is an upload), the
    target also with its escapes undone. Every verdict is counted; a
    block is logged."""
    rules = engine.content.rules_for(facts.zone, direction, "http")
    if not rules:
        return None
    verdicts = []
    rule = engine.pattern_hit(facts.zone, direction, "http", [*_target_forms(target), *(v for _, v in headers)],
                              [n for n, _ in headers]) \
        if target is not None else None
    inline = bodywork.is_small(headers, body)
    if rule is not None:
        verdicts = [ContentVerdict(True, rule, PATTERN, f"request target or headers match a blocked pattern (rule {rule})",
                                   len(body), await _run(inline, _digest, body))]
    elif not body:
        return None
    limit = engine.content.max_inspect_bytes
    try:
        # body_files is looked up here, at each call: tests hold it to show the loop is free meanwhile
        files = await _run(inline, body_files, headers, body, limit) if not verdicts else []
    except Uninspectable as error:
        verdicts = [ContentVerdict(True, rules[0].name, UNINSPECTABLE, f"refused unscanned: {error}", len(body),
                                   await _run(inline, _digest, body))]
        files = []
    for data in files:
        verdict = await inspect_bytes(engine, facts.zone, direction, "http", data)
        if verdict is not None:
            verdicts.append(verdict)
            if verdict.blocked:
                break
    if not verdicts:
        return None
    verdict = verdicts[-1]
    metrics.count(facts.zone, "http", verdict)
    if not verdict.blocked:
        return None
    record_block(decision_log, verdict, zone=facts.zone, workload=facts.workload, protocol="http",
                 direction=direction, destination=host, address=facts.address, port=facts.port)
    return verdict


async def _run(inline: bool, function: Callable[..., _T], *args) -> _T:
    """function(*args), here when `inline`, else in a bodywork thread (see the module's opening)."""
    if inline:
        return function(*args)
    return await bodywork.off_loop(function, *args)


def _digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def _target_forms(target: bytes) -> list[bytes]:
    """The target as sent, its path with percent-escapes undone and its query's fields as a form
    parser reads them: a key escaped in the URL reaches the application unescaped."""
    path, _, query = target.partition(b"?")
    return [target, unquote_to_bytes(path), *form_fields(query)]


BLOCKED_STATUS = (403, b"Forbidden")
BLOCKED_CONTENT_TYPE = b"application/json"


def blocked_body(verdict: ContentVerdict) -> bytes:
    """The body of the 403 (BLOCKED_STATUS): the reason as JSON (the content is never echoed)."""
    return json.dumps({"error": "content_blocked", "rule": verdict.rule, "engine": verdict.engine,
                       "reason": verdict.reason, "sha256": verdict.sha256 or None}).encode() + b"\n"
