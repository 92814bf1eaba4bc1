"""A legitimate session: one TCP connection to HOST:PORT kept open, a round trip every 50 ms (a
failed one reconnects). Prints "ready", then, when stdin closes, {"ok": n, "failed": n}.

    python -m skyguard.vmtools.legit HOST PORT
"""

import json
import select
import socket
import sys


def main(argv: list[str]) -> None:
    host, port = argv[0], int(argv[1])
    ok = failed = 0

    def connect() -> socket.socket:
        c = socket.create_connection((host, port), timeout=2)
        c.settimeout(1.0)
        return c

    s = connect()
    print("ready", flush=True)
    while True:
        r, _, _ = select.select([sys.stdin], [], [], 0.05)
        if r and not sys.stdin.readline():
            break
        try:
            s.sendall(b"ldap-bind")
            if s.recv(64) != b"ldap-bind":
                raise AssertionError("echo differs")
            ok += 1
        except (OSError, AssertionError):
            failed += 1
            try:
                s.close()
                s = connect()
            except OSError:
                pass
    print(json.dumps({"ok": ok, "failed": failed}))


if __name__ == "__main__":
    main(sys.argv[1:])
