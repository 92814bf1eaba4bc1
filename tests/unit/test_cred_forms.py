"""Every spelling of a secret in secretforms.py's list, one case each: found in a request (so it
is blocked) and scrubbed from a response, embedded in other text, and with the fixed forms
wrapped as MIME and PEM wrap them. Through the real proxy and a hostile upstream (the secret
split across chunks and TCP writes): test_cred_hostile.py."""

from __future__ import annotations

import base64
import binascii
import quopri
import urllib.parse

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from skyguard.credproxy.secretforms import REDACTED, SecretForms

SECRET = b"ghp_L00pbackSecret/42+=="
OTHER = b"an-unrelated-token-0123456789"


def html_decimal(data: bytes) -> bytes:
    return b"".join(b"&#%d;" % b for b in data)


def html_hex(data: bytes) -> bytes:
    return b"".join(b"&#x%02X;" % b for b in data)


def html_mixed(data: bytes) -> bytes:  # what an HTML escaper does: only some bytes, some by name
    named = {ord("/"): b"&sol;", ord("+"): b"&plus;", ord("="): b"&equals;", ord("_"): b"&lowbar;"}
    return b"".join(named.get(b, bytes([b])) for b in data)


def backslash_x(data: bytes) -> bytes:
    return b"".join(b"\\x%02x" % b for b in data)


def mime_base64(data: bytes) -> bytes:  # prefixed, so the secret is not at a 3-byte boundary
    return base64.encodebytes(b"user:" + data * 4)  # lines of 76 characters and LF


def pem_like(data: bytes) -> bytes:
    encoded = base64.b64encode(b"xy" + data)
    return b"\r\n".join(encoded[i:i + 8] for i in range(0, len(encoded), 8))  # CRLF every 8 characters


def quoted_printable(data: bytes) -> bytes:
    return quopri.encodestring(data, quotetabs=True)


def quoted_printable_all(data: bytes) -> bytes:  # every byte escaped, soft breaks between them
    return b"=\r\n".join(b"=%02X" % b for b in data)


def double_percent(data: bytes) -> bytes:
    return urllib.parse.quote(urllib.parse.quote(data, safe=b""), safe=b"").encode()


def triple_percent(data: bytes) -> bytes:
    return double_percent(urllib.parse.quote(data, safe=b"").encode())


def base32(data: bytes) -> bytes:
    return base64.b32encode(b"abc" + data)


def base32_lower_wrapped(data: bytes) -> bytes:
    encoded = base64.b32encode(b"a" + data).lower()
    return b"\n".join(encoded[i:i + 16] for i in range(0, len(encoded), 16))


def base32hex(data: bytes) -> bytes:
    return base64.b32hexencode(b"ab" + data)


FORMS = {
    "raw": lambda d: d,
    "percent": lambda d: urllib.parse.quote(d, safe=b"").encode(),
    "double-percent": double_percent,
    "triple-percent": triple_percent,
    "json-u": lambda d: b"".join(b"\\u%04x" % b for b in d),
    "backslash-x": backslash_x,
    "html-decimal": html_decimal,
    "html-decimal-no-semicolon": lambda d: b"".join(b"&#%03d" % b for b in d),
    "html-hex": html_hex,
    "html-named": html_mixed,
    "quoted-printable": quoted_printable,
    "quoted-printable-every-byte": quoted_printable_all,
    "hex": lambda d: binascii.hexlify(d).upper(),
    "base64": lambda d: base64.b64encode(b"me:" + d),
    "base64url": lambda d: base64.urlsafe_b64encode(b"m:" + d),
    "base64-mime-wrapped": mime_base64,
    "base64-pem-wrapped": pem_like,
    "base32": base32,
    "base32-lower-wrapped": base32_lower_wrapped,
    "base32hex": base32hex,
    "utf-16-le": lambda d: d.decode().encode("utf-16-le"),
    "utf-16-be": lambda d: d.decode().encode("utf-16-be"),
    "utf-16-with-bom": lambda d: d.decode().encode("utf-16"),
}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_every_listed_form_is_found_and_scrubbed(form):
    encoded = FORMS[form](SECRET)
    forms = SecretForms([SECRET, OTHER])
    for blob in (encoded, b'{"echo": "' + encoded + b'", "n": 1}', b"<p>" + encoded + b"</p>\n" * 3):
        assert forms.found_in(blob), form
        scrubbed, count = forms.scrub(blob)
        assert count >= 1 and REDACTED in scrubbed
        assert not forms.found_in(scrubbed), (form, scrubbed)
        assert SECRET not in scrubbed and encoded not in scrubbed


def test_scrubbing_keeps_the_text_around_and_counts_each_occurrence():
    forms = SecretForms([SECRET])
    blob = b"a " + html_hex(SECRET) + b" b\n" + base64.encodebytes(SECRET * 30) + b" c " + SECRET
    scrubbed, count = forms.scrub(blob)
    assert scrubbed.startswith(b"a " + REDACTED + b" b\n") and scrubbed.endswith(b" c " + REDACTED)
    assert count >= 3 and not forms.found_in(scrubbed)


def test_ordinary_text_is_left_alone():
    forms = SecretForms([SECRET])
    text = (b'{"name": "repo", "url": "https://example.test/a?b=1&c=%2F", "html": "&amp;&#47;&lt;",\n'
            b'"quoted": "=3D=20", "escaped": "\\x41\\u0042", "b64": "aGVsbG8gd29ybGQ="}' * 50)
    assert not forms.found_in(text)
    assert forms.scrub(text) == (text, 0)


def test_short_secrets_are_matched_raw_and_per_byte_only():
    forms = SecretForms([b"ab1"])
    assert forms.found_in(b"x ab1 y") and forms.found_in(b"x %61%62%31 y")
    assert not forms.found_in(base64.b64encode(b"ab1"))  # too short to match encoded safely


def test_repr_never_shows_a_secret():
    assert repr(SecretForms([SECRET])) == "SecretForms(1 secrets)"


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7e), min_size=12, max_size=48),
       st.sampled_from(sorted(FORMS)), st.binary(max_size=40), st.binary(max_size=40))
def test_any_ascii_secret_in_any_listed_form_is_found_and_scrubbed(secret, form, before, after):
    secret = secret.encode()
    blob = before + FORMS[form](secret) + after
    forms = SecretForms([secret])
    assert forms.found_in(blob)
    assert not forms.found_in(forms.scrub(blob)[0])


@pytest.mark.parametrize("form", sorted(FORMS))
def test_every_form_is_found_at_every_offset_of_a_large_body(form):
    """Bodies above ALTERNATION_BELOW take the other search, behind a sampling prefilter: no
    offset may fall between its samples."""
    from skyguard.credproxy.secretforms import ALTERNATION_BELOW

    forms = SecretForms([SECRET])
    encoded = FORMS[form](SECRET)
    filler = b"lorem ipsum 0123456789 abcdef ABCDEF =3D %20 &amp; \\x41\n" * (ALTERNATION_BELOW // 50 + 2)
    for offset in range(48):
        blob = filler[:offset] + encoded + filler
        assert len(blob) > ALTERNATION_BELOW
        assert forms.found_in(blob), offset
        scrubbed, _ = forms.scrub(blob)
        assert not forms.found_in(scrubbed) and REDACTED in scrubbed and scrubbed.startswith(filler[:offset])
