"""HTTP message bodies to the files a content rule judges, sans-io.

A body arrives de-chunked (the proxy's llhttp reader undoes Transfer-Encoding). Here:
- Content-Encoding gzip, x-gzip, deflate and identity are undone, with the expansion bounded by
  the inspection buffer: a decompression bomb stops at the bound and is refused, it never grows
  in memory. Any other coding cannot be inspected: refused.
- multipart/form-data (and other multipart/*) is split into its parts, each a file of its own
  (a part's Content-Transfer-Encoding base64 is undone; a part's file name and Content-Type
  never decide a type, which comes from the bytes, but a part that is JSON, by its Content-Type or
  by parsing as an object or array, is also decoded as a JSON body is, below). Every part needs a
  header block ended by CRLF CRLF, with no bare CR or LF (upstreams that end headers at a bare
  blank line would otherwise read a file the filter took for headers). Parts are not split
  further; a body that does not parse as the multipart it claims to be is refused. The boundary
  is read as RFC 2045 parameters are (so `xboundary=` or a quoted "boundary=" is not it), and a
  message with two Content-Type headers or two boundary parameters is refused: upstreams
  disagree on which one counts, and the form judged must be the form the upstream reads.
- application/x-www-form-urlencoded (curl's default for any --data): the body, and besides it
  every field name and value that has percent-escapes or '+' to undo, undone (as the upstream's
  form parser hands them to the application): the first MAX_PARTS with a percent-escape each a
  file of its own (a file sent as a form field is judged as the file it is: its type, its
  signatures), the others joined in one file (a key escaped in a field is still the key). Fields
  are split at '&', at ';' and at both (parsers differ), each way judged. A binary body sent under this type has a few
  pieces with an escape (a '%' that happens to be followed by two hex digits).
- JSON (application/json, */*+json, or any body that parses as a JSON object or array, since
  APIs read JSON whatever its Content-Type): the body, and besides it, when it has escapes, its
  strings (keys and values) with the escapes undone, joined into one file; and every string of at
  least MIN_BASE64 characters that is base64 (standard or URL-safe, line breaks allowed),
  decoded, each a file of its own: a file in a JSON API travels as base64 in a string (GitHub's
  contents API stores it decoded). A body named JSON that does not parse (or nests deeper than
  Python's parser goes) is refused; base64 strings past the first MAX_PARTS are joined in one
  file (a list of hashes is base64 too). Other encodings
  an application applies itself (hex, encryption, ...) are not undone: content rules judge what
  HTTP and its usual formats carry, not what a VM chooses to disguise.
- anything else is one file: the decoded body.

Not here: judging the files (inspector.py), moving bytes (the credential proxy).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from urllib.parse import unquote_to_bytes

from skyguard.httpcodings import decode_body

Headers = tuple[tuple[bytes, bytes], ...]
MAX_PARTS = 1000  # parts of one multipart body; more is refused (each part costs an inspection)
MIN_BASE64 = 16  # shorter strings in a JSON body are not tried as base64
_URL_SAFE = str.maketrans("-_", "+/")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,200}")  # RFC 9110 token
_ESCAPE = re.compile(rb"%[0-9A-Fa-f]{2}")
_BLANK_LINE = re.compile(rb"\r\n\r\n|\r\r|\n\n")
_QUOTED = re.compile(rb'"((?:[^"\\\r\n]|\\[^\r\n]){1,200})"')  # quoted-string


class Uninspectable(Exception):
    """The body cannot be turned into files to inspect: refuse it (fail closed)."""


def body_files(headers: Headers, body: bytes, limit: int) -> list[bytes]:
    """The files inside one message body (`headers` lower-case names). At least one entry;
    Uninspectable when the body cannot be decoded within `limit` bytes."""
    body = decode_content(headers, body, limit)
    content_types = [v for n, v in headers if n == b"content-type"]
    if len(content_types) > 1:
        raise Uninspectable("more than one Content-Type header")
    content_type = content_types[0] if content_types else b""
    media_type = content_type.split(b";", 1)[0].strip().lower()
    if media_type.startswith(b"multipart/"):
        return multipart_parts(content_type, body)
    if media_type == b"application/x-www-form-urlencoded":
        # Each way of splitting (FORM_SEPARATORS) adds the pieces it reads that another did not:
        # the escaped ones each a file (MAX_PARTS in all), the others joined, a file per way (so
        # none is larger than the body: a size rule holds for what a parser can read).
        files, seen = [body], set()
        for separators in FORM_SEPARATORS:
            rest: list[bytes] = []
            for raw in form_pieces(body, separators):
                if raw not in seen:
                    seen.add(raw)
                    decoded = unquote_to_bytes(raw.replace(b"+", b" "))
                    (files if len(files) <= MAX_PARTS and _ESCAPE.search(raw) else rest).append(decoded)
            if rest:
                files.append(b"\n".join(rest))
        return files
    return [body, *json_files(body, declared=_names_json(media_type))]


def _names_json(media_type: bytes) -> bool:
    return media_type in (b"application/json", b"text/json") or media_type.endswith(b"+json")


def json_files(body: bytes, declared: bool) -> list[bytes]:
    """What a JSON body carries besides its bytes as sent (see the module's opening): [] for a
    body not named JSON that is not an object or array, or does not parse."""
    if not declared and body.lstrip()[:1] not in (b"{", b"["):
        return []
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        if declared:
            raise Uninspectable("a body or form part named JSON that does not parse") from None
        return []
    strings, pending = [], [document]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            strings.append(item)
        elif isinstance(item, dict):
            strings.extend(item)
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    files = [b"\n".join(s.encode("utf-8", "surrogatepass") for s in strings)] if b"\\" in body else []
    rest: list[bytes] = []
    for text in strings:
        decoded = _base64(text) if len(text) >= MIN_BASE64 else None
        if decoded is not None:
            (files if len(files) <= MAX_PARTS else rest).append(decoded)
    return files + ([b"\n".join(rest)] if rest else [])


def _base64(text: str) -> bytes | None:
    """`text` decoded when it is base64 (standard or URL-safe, whitespace allowed), else None.
    Checked by binascii's strict mode, in C: a regular expression held the GIL for a second on
    48 MiB, stalling every other thread; whitespace is only looked for when it did not decode."""
    if "-" in text or "_" in text:
        text = text.translate(_URL_SAFE)
    decoded = _strict_base64(text)
    if decoded is None:
        spaceless = "".join(text.split())
        decoded = _strict_base64(spaceless) if len(spaceless) < len(text) else None
    return decoded


def _strict_base64(text: str) -> bytes | None:
    try:
        return binascii.a2b_base64(text, strict_mode=True)
    except ValueError:  # binascii.Error, or characters that are not ASCII
        return None


# How form parsers split fields: at '&' and ';' (older ones), at '&' only (Python since 3.10, most
# frameworks), at ';' only (a separator some take). Each way is judged, so a value a parser reads
# whole is never judged only in pieces (a file cut by a bare ';' reached an '&'-only parser whole
# while the filter, splitting at both, judged its halves apart).
FORM_SEPARATORS = (rb"[&;]", rb"&", rb";")


def form_pieces(data: bytes, separators: bytes = FORM_SEPARATORS[0]) -> list[bytes]:
    """The names and values of a form body or query string, split at `separators`, that a form
    parser changes ('+' or percent-escapes to undo), as sent (the others are in `data` as they are)."""
    return [piece for field in re.split(separators, data) for piece in field.split(b"=", 1)
            if b"%" in piece or b"+" in piece]


def form_fields(data: bytes) -> list[bytes]:
    """form_pieces(data) split each way a parser does, as a parser reads them ('+' and
    percent-escapes undone), each piece once."""
    pieces = dict.fromkeys(p for separators in FORM_SEPARATORS for p in form_pieces(data, separators))
    return [unquote_to_bytes(piece.replace(b"+", b" ")) for piece in pieces]


def decode_content(headers: Headers, body: bytes, limit: int) -> bytes:
    body = decode_body(headers, body, limit, Uninspectable, "the inspection buffer")  # never more is allocated
    if len(body) > limit:
        raise Uninspectable(f"body larger than the inspection buffer ({limit} bytes)")
    return body


def _boundary(content_type: bytes) -> bytes:
    """The one boundary parameter of `content_type` (RFC 2045 5.1: `; name=value`, the value a
    token or a quoted-string); Uninspectable when there is none, more than one, or the
    parameters do not parse (where parsers may part ways)."""
    rest = content_type.partition(b";")[2]
    found = []
    while rest.strip():
        name, eq, rest = rest.partition(b"=")
        name = name.strip()
        if not eq or not _TOKEN.fullmatch(name):
            raise Uninspectable("a Content-Type whose parameters do not parse")
        rest = rest.lstrip(b" \t")
        match = _QUOTED.match(rest) or _TOKEN.match(rest)
        if not match:
            raise Uninspectable("a Content-Type whose parameters do not parse")
        value = re.sub(rb"\\(.)", rb"\1", match.group(1)) if match.re is _QUOTED else match.group(0)
        rest = rest[match.end():].lstrip(b" \t")
        if rest and not rest.startswith(b";"):
            raise Uninspectable("a Content-Type whose parameters do not parse")
        rest = rest[1:]
        if name.lower().split(b"*", 1)[0] == b"boundary":
            if b"*" in name:  # RFC 2231 (`boundary*=''x`, continuations): decoded by some parsers only
                raise Uninspectable("a multipart boundary in RFC 2231 form")
            found.append(value)
    if not found:
        raise Uninspectable("multipart body without a boundary")
    if len(found) > 1:
        raise Uninspectable("multipart body with more than one boundary parameter")
    return found[0]


def multipart_parts(content_type: bytes, body: bytes) -> list[bytes]:
    delimiter = b"--" + _boundary(content_type)
    pieces = body.split(delimiter)
    # pieces[0] is the preamble, the last starts with "--" (the close delimiter).
    if len(pieces) < 3 or not pieces[-1].startswith(b"--"):
        raise Uninspectable("multipart body without its closing boundary")
    if len(pieces) - 2 > MAX_PARTS:
        raise Uninspectable(f"more than {MAX_PARTS} multipart parts")
    parts: list[bytes] = []
    decoded: list[bytes] = []  # what the JSON parts carry (json_files)
    for piece in pieces[1:-1]:
        if not piece.startswith(b"\r\n") or not piece.endswith(b"\r\n"):
            raise Uninspectable("malformed multipart part")
        # Where the headers end is where parsers part ways: werkzeug ends them at the first
        # \r\n\r\n, \r\r or \n\n, Go's at a line that is empty with or without its CR. So
        # the first blank line of any kind must be a CRLF one, after at least one header, with
        # no bare CR or LF before it; anything else could hide the file in its "headers".
        inner = piece[2:-2]
        blank = _BLANK_LINE.search(inner)
        if blank is None or blank.group() != b"\r\n\r\n" or blank.start() == 0:
            raise Uninspectable("a multipart part without a header block ended by CRLF CRLF")
        head, content = inner[:blank.start()], inner[blank.end():]
        if b"\r" in head.replace(b"\r\n", b"") or b"\n" in head.replace(b"\r\n", b""):
            raise Uninspectable("a multipart part whose headers have a bare CR or LF")
        encoding, declared_json = b"", False
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-transfer-encoding":
                encoding = value.strip().lower()
            elif name == b"content-type":  # any of them naming JSON: the part must parse as JSON
                declared_json |= _names_json(value.split(b";", 1)[0].strip().lower())
        if encoding == b"base64":
            try:
                content = base64.b64decode(re.sub(rb"\s+", b"", content), validate=True)
            except binascii.Error:
                raise Uninspectable("a base64 multipart part that does not decode") from None
        elif encoding not in (b"", b"7bit", b"8bit", b"binary"):
            raise Uninspectable("a multipart part in a transfer encoding the filter cannot decode")
        parts.append(content)
        decoded += json_files(content, declared_json)
    # Bounded as one JSON body's are: past MAX_PARTS, what the parts' JSON carries is one file.
    return parts + decoded[:MAX_PARTS] + ([b"\n".join(decoded[MAX_PARTS:])] if len(decoded) > MAX_PARTS else [])
