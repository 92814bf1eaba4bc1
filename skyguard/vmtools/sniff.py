"""Counts the frames that reach this namespace from the attacker: its addresses, a spoofed one
carrying MARKER, or its MAC. Prints "ready", then, when stdin closes,
{"frames": n, "samples": [first bytes of up to 5, hex]}.

    python -m skyguard.vmtools.sniff ATTACKER_IPV4 ATTACKER_IPV6 ATTACKER_MAC MARKER
"""

import json
import select
import socket
import sys


def main(argv: list[str]) -> None:
    attacker = {socket.inet_pton(socket.AF_INET, argv[0]), socket.inet_pton(socket.AF_INET6, argv[1])}
    attacker_mac, marker = bytes.fromhex(argv[2].replace(":", "")), argv[3].encode()
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
    frames = 0
    samples: list[str] = []
    print("ready", flush=True)
    while True:
        r, _, _ = select.select([s, sys.stdin], [], [], 0.5)
        if sys.stdin in r and not sys.stdin.readline():
            break
        if s not in r:
            continue
        data, addr = s.recvfrom(65535)
        if addr[2] == socket.PACKET_OUTGOING:
            continue
        et = data[12:14]
        src = data[26:30] if et == b"\x08\x00" else data[22:38] if et == b"\x86\xdd" else b""
        if src in attacker or marker in data or data[6:12] == attacker_mac:
            frames += 1
            if len(samples) < 5:
                samples.append(data[:80].hex())
    print(json.dumps({"frames": frames, "samples": samples}))


if __name__ == "__main__":
    main(sys.argv[1:])
