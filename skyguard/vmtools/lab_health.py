"""The lab's health probe, run inside its internet namespace: DNS over UDP to DNS_SERVER, then TCP
connects to the echo services. Exit 0 when all answered.

    python -m skyguard.vmtools.lab_health DNS_SERVER
"""

import socket
import sys

from dnslib import DNSRecord


def main(argv: list[str]) -> None:
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(2)
    u.sendto(DNSRecord.question("health.test").pack(), (argv[0], 53))
    if not DNSRecord.parse(u.recv(4096)).rr:
        raise SystemExit("no DNS answer")
    for port in (80, 443, 7):
        socket.create_connection(("203.0.113.1", port), timeout=2).close()


if __name__ == "__main__":
    main(sys.argv[1:])
