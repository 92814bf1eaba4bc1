"""How surprising a host name's letters are: the bit cost of its characters under a letter-pair
(bigram) model of English, the alphabet score of tunnelling detection (tunnel.py).

Encoders that avoid digits (a 16-letter alphabet, base32's letters, lower-cased base64) still
draw their letters uniformly, so their letter pairs are ones English rarely writes ("pf", "jq",
"kx"): they cost ~6-7.5 bits per character here, where real host names cost ~3.5-5 (short
abbreviations cost more, but they are short). Word lists look like English and cost little per
character: they are left to the per-VM budget, which this cost also feeds (an upper estimate of
the information a name can carry).

The model: 28 symbols (a-z, '#' for any digit, '^' for a label boundary), costs in 1/16 bit,
from the letter pairs of the words of the GNU GPL version 3 (/usr/share/common-licenses/GPL-3 on
Debian; add-one-half smoothing), with digit costs set by hand (digits come in runs; each digit adds
log2(10) for which one). It is a table, not a file read at run time. Pure; no I/O.
"""

from __future__ import annotations

SYMBOLS = "abcdefghijklmnopqrstuvwxyz#^"
_TABLE = bytes.fromhex("""
bf514559bf785bbf528763344728bf58bf344629656271bf54bf5a365096967d2c9696963c3e961e9696
50719655557d2e9696962f965a583fb356b321b3b33d46b3814ab3b31bb38e78b33150b3b3b3b3b35a4d
52aeae5524ae89ae28aeae77aeae44aeae896fae4b8989ae7bae5a1358cb4839576e73a564cbcb625c33
9e6e6b293c67cb6a84605dcb5a1953a8a8a84148a8a837a8a88fa8a826a8a8378f4856a8a8a852a85a16
38a1a1a12ea1743248a1a16ea1417460a12988a16aa1a1a1a1a15a1a2db1b1b113b1b1b130b1b1b1b184
37b1b17384428cb1b1b16db15a3456582f5b48444ec1c1c1955256253171c15132348651c19cc1795a9c
666666660e6666666666666666662f66666666664d66666666665a66648989892b89898939898989894e
898989893a898989898989895a0d39ae954f2f7c95ae1faeae36aeae4daeae955e664d95aeae36ae5a28
265ca6a629a6a6a633a6a68d5c8d373fa6a63ba6546fa6a6a6a65a2552be5731406834be60be92719271
40a5bebe2d2e5f54bebe50be5a26c66776497a35558e99c6c65b4b278747c6265b4535515f9393c65a35
2daaaa9133aaaa6448aaaa3991aa3a43aa1e734f40aaaaaa3baa5a736a6a6a6a6a6a6a6a6a6a6a6a6a6a
6a6a6a6a6a6a076a6a6a6a6a5a6a398a516526746ec23ac2428f457e3676c2544b4d747986c26cc25a21
62bc75bc267dbc5c3cbc8f8997bc3d50bca2443d49bca2bc80bc5a154cc4c4c433abc41b30c4c47c979f
3786c452507078c45fc458c45a245e434252678670ab4aabab474d34926dab2b2f32abababababab5a27
3f979797089797972997979797975f97979797979797979797975a972d9c9c9c449c9c2e269c9c779c69
1c9c9c616f9c9c9c619c9c9c5a343772267228727272597272727272722e72727228727272724d725a59
73a6a6a664a6a6a64ba6a68c8c8c1f73a6454e73a6a6a6a6a6a65a0d235a5a5a235a5a5a415a5a5a5a5a
5a5a5a5a5a5a5a5a5a5a5a5a5a5a71717171717171717171717171717171717171717171717171710c25
31583c585a4b5f693ebe884d4e55373eb251452b586a44d751d75ad7
""".replace("\n", ""))
assert len(_TABLE) == len(SYMBOLS) ** 2

_INDEX = {c: i for i, c in enumerate(SYMBOLS.encode())}
for _digit in b"0123456789":
    _INDEX[_digit] = SYMBOLS.index("#")
_BOUNDARY = SYMBOLS.index("^")
_DIGIT = SYMBOLS.index("#")
_DIGIT_CHOICE = 53  # log2(10) bits in 1/16 bit
_WIDTH = len(SYMBOLS)


def bits(name: bytes) -> float:
    """Cost in bits of a lower-case name (or part of one): each character given the one before,
    with label boundaries at both ends and at every dot; any other byte counts as a boundary."""
    previous = _BOUNDARY
    total = 0
    for byte in name:
        current = _INDEX.get(byte, _BOUNDARY)
        total += _TABLE[previous * _WIDTH + current]
        if current == _DIGIT:
            total += _DIGIT_CHOICE  # the table says "a digit"; which of ten is news too
        previous = current
    total += _TABLE[previous * _WIDTH + _BOUNDARY]
    return total / 16


def bits_per_char(name: bytes) -> float:
    return bits(name) / (len(name) + 1) if name else 0.0
