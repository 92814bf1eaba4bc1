#!/usr/bin/env python3
"""Check a skyguard inclusion proof (`skyguard log prove N --json`) knowing only RFC 6962.

Standalone on purpose: Python's standard library only (hashlib), no skyguard import, so an
auditor can read all of it. Checks that the entry hashes to the leaf hash, that the proof leads
from the leaf to the root (RFC 9162 2.1.3.2), that the root and size are those of the signed
checkpoint, and, given the log's verifier key (--key name+hash+base64), the checkpoint's Ed25519
signature (RFC 8032 verification in pure Python below: slow, ~10 ms, but dependency-free).

Usage: verify_inclusion.py PROOF.json [--key VKEY]      exit 0 valid, 1 invalid, 2 bad input
Not here: consistency proofs or checking a whole log (`skyguard log verify` does that).
"""

import base64
import binascii
import hashlib
import json
import sys


def hash_leaf(entry: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + entry).digest()


def hash_children(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def root_from_inclusion_proof(index, size, leaf_hash, proof):
    if not 0 <= index < size:
        raise ValueError(f"index {index} outside tree of size {size}")
    fn, sn, r = index, size - 1, leaf_hash
    for p in proof:
        if len(p) != 32:
            raise ValueError("a proof hash is not 32 bytes")
        if sn == 0:
            raise ValueError("proof too long")
        if fn & 1 or fn == sn:
            r = hash_children(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = hash_children(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ValueError("proof too short")
    return r


# --- Ed25519 verification, RFC 8032 section 6 (reference code, verification only) ---------
_P = 2 ** 255 - 19
_L = 2 ** 252 + 27742317777372353535851937790883648493
_D = -121665 * pow(121666, _P - 2, _P) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)


def _add(a, b):
    A, B = (a[1] - a[0]) * (b[1] - b[0]) % _P, (a[1] + a[0]) * (b[1] + b[0]) % _P
    C, D = 2 * a[3] * b[3] * _D % _P, 2 * a[2] * b[2] % _P
    E, F, G, H = B - A, D - C, D + C, B + A
    return (E * F, G * H, F * G, E * H)


def _mul(s, point):
    q = (0, 1, 1, 0)
    while s > 0:
        if s & 1:
            q = _add(q, point)
        point = _add(point, point)
        s >>= 1
    return q


def _equal(a, b):
    return (a[0] * b[2] - b[0] * a[2]) % _P == 0 and (a[1] * b[2] - b[1] * a[2]) % _P == 0


def _recover_x(y, sign):
    if y >= _P:
        return None
    x2 = (y * y - 1) * pow(_D * y * y + 1, _P - 2, _P)
    if x2 == 0:
        return None if sign else 0
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P:
        x = x * _SQRT_M1 % _P
    if (x * x - x2) % _P:
        return None
    if (x & 1) != sign:
        x = _P - x
    return x


def _decompress(s):
    if len(s) != 32:
        return None
    y = int.from_bytes(s, "little")
    sign = y >> 255
    y &= (1 << 255) - 1
    x = _recover_x(y, sign)
    return None if x is None else (x, y, 1, x * y % _P)


_GY = 4 * pow(5, _P - 2, _P) % _P
_G = (_recover_x(_GY, 0), _GY, 1, _recover_x(_GY, 0) * _GY % _P)


def ed25519_verify(public: bytes, message: bytes, signature: bytes) -> bool:
    if len(public) != 32 or len(signature) != 64:
        return False
    a, r = _decompress(public), _decompress(signature[:32])
    if a is None or r is None:
        return False
    s = int.from_bytes(signature[32:], "little")
    if s >= _L:
        return False
    h = int.from_bytes(hashlib.sha512(signature[:32] + public + message).digest(), "little") % _L
    return _equal(_mul(s, _G), _add(r, _mul(h, a)))


def check_note_signature(note: str, vkey: str) -> None:
    """C2SP signed-note: key hash = SHA-256(name || 0x0A || 0x01 || key)[:4]."""
    name, hash_hex, blob = vkey.strip().split("+", 2)
    raw = base64.b64decode(blob, validate=True)
    if len(raw) != 33 or raw[0] != 1:
        raise ValueError("verifier key is not Ed25519")
    key_hash = hashlib.sha256(name.encode() + b"\n" + raw).digest()[:4]
    if key_hash.hex() != hash_hex:
        raise ValueError("verifier key hash does not match")
    cut = note.rindex("\n\n")
    text, lines = note[:cut + 1], note[cut + 2:].rstrip("\n").split("\n")
    for line in lines:
        fields = line[2:].split(" ") if line.startswith("\u2014 ") else []
        if len(fields) == 2 and fields[0] == name:
            sig = base64.b64decode(fields[1])
            if sig[:4] == key_hash and ed25519_verify(raw[1:], text.encode(), sig[4:]):
                return
    raise ValueError(f"checkpoint is not validly signed by {name}")


def verify(proof: dict, vkey: str | None = None) -> None:
    """Raises ValueError naming what does not hold."""
    entry = proof["entry"].encode("utf-8")
    leaf = base64.b64decode(proof["leaf_hash"], validate=True)
    if hash_leaf(entry) != leaf:
        raise ValueError("the entry does not hash to leaf_hash")
    hashes = [base64.b64decode(h, validate=True) for h in proof["hashes"]]
    root = root_from_inclusion_proof(int(proof["index"]), int(proof["size"]), leaf, hashes)
    if root != base64.b64decode(proof["root"], validate=True):
        raise ValueError("the proof does not lead to the stated root")
    note = proof["checkpoint"]
    body = note[:note.index("\n\n") + 1].split("\n")
    if body[1] != str(proof["size"]) or base64.b64decode(body[2]) != root:
        raise ValueError("the checkpoint is for another size or root than the proof")
    if body[0] != proof["origin"]:
        raise ValueError("the checkpoint is for another log origin")
    if vkey:
        check_note_signature(note, vkey)


def main(argv) -> int:
    args = argv[1:]
    vkey = None
    if "--key" in args:
        i = args.index("--key")
        vkey = args[i + 1] if i + 1 < len(args) else None
        del args[i:i + 2]
    if len(args) != 1 or (vkey is None and "--key" in argv):
        print(__doc__.split("\n\n")[2], file=sys.stderr)
        return 2
    try:
        with open(args[0], encoding="utf-8") as f:
            proof = json.load(f)
    except (OSError, ValueError) as e:
        print(f"cannot read proof {args[0]}: {e}", file=sys.stderr)
        return 2
    try:
        verify(proof, vkey)
    except (ValueError, KeyError, TypeError, IndexError, binascii.Error) as e:
        print(f"INVALID: {e}", file=sys.stderr)
        return 1
    signed = "signature checked" if vkey else "signature NOT checked (pass --key)"
    print(f"valid: entry {proof['index']} is in {proof['origin']} at size {proof['size']} "
          f"({signed})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
