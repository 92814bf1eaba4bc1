"""A tiny client: connect (tcp) or send-and-await-echo (udp); prints "ok" or the error's type.
Exit status 0 means the traffic got through.

    python -m skyguard.vmtools.probe tcp|udp HOST PORT [SOURCE_ADDRESS]
"""

import socket
import sys


def main(argv: list[str]) -> int:
    proto, host, port = argv[0], argv[1], int(argv[2])
    src = argv[3] if len(argv) > 3 else None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    s = socket.socket(family, kind)
    s.settimeout(1.5)
    try:
        if src:
            s.bind((src, 0))
        if proto == "tcp":
            s.connect((host, port))  # the handshake crossed skyguard both ways
        else:
            s.sendto(b"demo", (host, port))
            s.recvfrom(16)
        print("ok")
    except OSError as e:
        print(type(e).__name__)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
