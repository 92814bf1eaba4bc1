"""How many bytes a quiet DNS tunnel gets out of one VM in 10 minutes, with and without detection.

The detector (skyguard.dns.tunnel.TunnelDetector, action block) is driven directly with simulated
time: it is sans-io, and the names and times it is given are exactly what it sees behind the
proxy, so 10 minutes of attack take a second and no timing noise enters the figures.

The attacker: for each encoder (hex, base32, base36, base64url with case preserved, a
letters-only 16-letter alphabet, a 256-word list taken from the GPL's own words, which is the
text alphabet.py's letter model was built from, so these words look as English as it gets),
every strategy in a grid of label length, labels per name, names per minute and number of base
domains (rotated). A refused name is retried at the next slot (the attacker sees REFUSED). The
figure for an encoder is its best strategy: payload bytes delivered in 10 minutes with detection
on, next to what that strategy delivers with detection off, and what the encoder carries with
detection off at the grid's fastest strategy (the anchor).

False positives: one VM resolves the real names of bench/dns_tunnel_names.txt (host names from
the installed software's documentation, see its header) in a fixed random order, every one a
name it never asked before, at FP_RATE per second; every detection is a false positive. The
target: under 1 KB per 10 minutes per VM for every encoder, and no false positive.
"""

from __future__ import annotations

import base64
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import plot, progress, result  # noqa: E402

from skyguard.dns import tunnel, wire  # noqa: E402

WINDOW = 600.0  # the 10 minutes the target is stated in
TARGET_BYTES = 1024
CORPUS = Path(__file__).resolve().parent / "dns_tunnel_names.txt"
FP_RATES = (0.1, 0.2)  # never-seen real names per second per VM: the target's design point
FP_RATES_BEYOND = (0.5,)  # reported, not judged: past the budget's design point
LABEL_LENGTHS = (8, 12, 16, 20, 30, 40, 63)
LABELS_PER_NAME = (1, 2, 3)
NAMES_PER_MINUTE = (2, 5, 10, 20, 39, 60)
BASES = (1, 4, 16, 64)
B36 = "0123456789abcdefghijklmnopqrstuvwxyz"
LETTERS16 = "abcdefghijklmnop"


def _words() -> list[str]:
    text = Path("/usr/share/common-licenses/GPL-3").read_text().lower()
    return sorted(set(re.findall(r"\b[a-z]{3,7}\b", text)))[:256]


WORDS = _words()


class Encoder:
    """bits per output character, and how to write payload bytes as name characters."""

    def __init__(self, name, bits_per_char, encode):
        self.name, self.bits_per_char, self.encode = name, bits_per_char, encode


def _b36(data: bytes) -> str:
    number, out = int.from_bytes(b"\x01" + data, "big"), ""
    while number:
        number, digit = divmod(number, 36)
        out = B36[digit] + out
    return out


ENCODERS = [
    Encoder("hex", 4.0, lambda d: d.hex()),
    Encoder("base32", 5.0, lambda d: base64.b32encode(d).decode().lower().rstrip("=")),
    Encoder("base36", 5.17, _b36),
    Encoder("base64url", 6.0, lambda d: base64.urlsafe_b64encode(d).decode().rstrip("=")
            .replace("_", "0")),  # '_' is fine in a label but not in every stub: one symbol less
    Encoder("letters16", 4.0, lambda d: "".join(LETTERS16[b >> 4] + LETTERS16[b & 15] for b in d)),
    Encoder("words256", None, lambda d: "-".join(WORDS[b] for b in d)),
]


def chunk_name(encoder: Encoder, payload: bytes, label_len: int, labels: int):
    """As many payload bytes as fit in `labels` labels of at most label_len characters: the
    labels (bytes) and how many payload bytes they carry."""
    if encoder.bits_per_char is None:  # words: whole words per label
        out, used, current = [], 0, ""
        for byte in payload:
            word = WORDS[byte]
            add = word if not current else current + "-" + word
            if len(add) <= label_len:
                current, used = add, used + 1
                continue
            if not current or len(out) + 1 >= labels:
                break
            out.append(current)
            current, used = word, used + 1
        if current:
            out.append(current)
        return [label.encode() for label in out], used
    room = label_len * labels
    n = max(1, int(room * encoder.bits_per_char // 8))
    while n > 1 and len(encoder.encode(payload[:n])) > room:
        n -= 1
    text = encoder.encode(payload[:n])
    return [text[i:i + label_len].lower().encode() for i in range(0, len(text), label_len)], n


def attack(encoder, label_len, labels, per_minute, bases, detect=True) -> int:
    """Payload bytes delivered in WINDOW by one strategy."""
    detector = tunnel.TunnelDetector()
    rng = random.Random(f"{encoder.name}{label_len}{labels}{per_minute}{bases}")
    payload = rng.randbytes(256 * 1024)  # more than any strategy can send in 10 minutes
    base_names = [f"x{i}q.test".encode().split(b".") for i in range(bases)]
    delivered, slot, t = 0, 0, 0.0
    while t < WINDOW and delivered < len(payload) - 400:
        chunk, used = chunk_name(encoder, payload[delivered:], label_len, labels)
        base = base_names[slot % bases]
        slot += 1
        refused = False
        if detect:
            verdict = detector.observe("vm1", chunk + base, wire.QTYPE_A, t)
            refused = verdict.detected or verdict.flagged
        if not refused:
            delivered += used
        t += 60.0 / per_minute
    return delivered


def best(encoder):
    """(bytes with detection, bytes of that strategy without, the strategy) at its best."""
    top = (-1, 0, None)
    for label_len in LABEL_LENGTHS:
        for labels in LABELS_PER_NAME:
            for per_minute in NAMES_PER_MINUTE:
                for bases in BASES:
                    got = attack(encoder, label_len, labels, per_minute, bases)
                    if got > top[0]:
                        top = (got, attack(encoder, label_len, labels, per_minute, bases,
                                           detect=False),
                               {"label_len": label_len, "labels": labels,
                                "names_per_minute": per_minute, "bases": bases})
    return top


def false_positives(rate: float) -> tuple[int, int]:
    names = [line.strip() for line in CORPUS.read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    random.Random(7).shuffle(names)
    detector = tunnel.TunnelDetector()
    hits = 0
    for i, name in enumerate(names):
        verdict = detector.observe("vm1", [label.encode() for label in name.split(".")],
                                   wire.QTYPE_A, i / rate)
        if verdict.detected or verdict.flagged:
            hits += 1
            if hits <= 3:
                progress(f"false positive at {rate}/s: {name} {verdict.parts}")
    return hits, len(names)


def main() -> None:
    rows = {}
    for encoder in ENCODERS:
        with_detection, without, strategy = best(encoder)
        capacity = attack(encoder, 63, 3, 60, 1, detect=False)  # the grid's fastest strategy
        rows[encoder.name] = {"with_detection": with_detection, "without_detection": without,
                              "strategy": strategy, "capacity_without_detection": capacity}
        progress(f"{encoder.name:10s} {with_detection:6d} B / 10 min with detection "
                 f"({without} B without) at {strategy}; {capacity} B with detection off at "
                 f"60 names of 3 x 63 characters a minute")
    quiet = Encoder("letters16", 4.0, ENCODERS[4].encode)
    issue_case = {"with_detection": attack(quiet, 40, 1, 39, 1),
                  "without_detection": attack(quiet, 40, 1, 39, 1, detect=False)}
    progress(f"issue 15's quiet tunnel (letters16, 40-char labels, 39/min, one base): "
             f"{issue_case['with_detection']} B with detection, {issue_case['without_detection']} B without")
    fp, beyond = {}, {}
    for rate in FP_RATES + FP_RATES_BEYOND:
        hits, total = false_positives(rate)
        (fp if rate in FP_RATES else beyond)[str(rate)] = {"false_positives": hits, "names": total}
        progress(f"real names at {rate}/s per VM: {hits} false positives in {total} names"
                 f"{'' if rate in FP_RATES else ' (beyond the design point, not judged)'}")
    worst = max(r["with_detection"] for r in rows.values())
    # the anchor: what the same worst encoder gets out with detection off, at its fastest
    anchor = max(r["capacity_without_detection"] for r in rows.values()
                 if r["with_detection"] == worst)
    plot("dns-tunnel", {name: r["with_detection"] for name, r in rows.items()},
         xlabel="encoder (its best strategy)", ylabel="bytes out per 10 min per VM, detection on",
         kind="bar")
    no_fp = all(v["false_positives"] == 0 for v in fp.values())
    result("dns-tunnel", "bytes per 10 min per VM (worst encoder, its best strategy)",
           worst, anchor, target=TARGET_BYTES, higher_is_better=False,
           target_applies_to="skyguard", encoders=rows, issue_quiet_tunnel=issue_case,
           false_positives=fp, false_positives_beyond_design=beyond, no_false_positives=no_fp,
           meets_all=worst < TARGET_BYTES and no_fp,
           method="simulated time through the sans-io TunnelDetector (what it sees behind the proxy)")


if __name__ == "__main__":
    main()
