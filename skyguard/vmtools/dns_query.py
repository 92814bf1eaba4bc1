"""A DNS client (the VM's resolver is the lab's 192.0.2.53; skyguard answers whatever address is
asked). Exit 0 if every query got an answer with records; prints "ok", or the failure.

    python -m skyguard.vmtools.dns_query NAME...
    python -m skyguard.vmtools.dns_query --tunnel DOMAIN   # 40 random base32 labels under DOMAIN
"""

import base64
import os
import sys

from dnslib import DNSRecord


def main(argv: list[str]) -> int:
    names = argv
    if names[0] == "--tunnel":  # exfiltrate random bytes, base32-encoded, as subdomains
        names = [base64.b32encode(os.urandom(20)).decode().rstrip("=").lower() + "." + names[1]
                 for _ in range(40)]
    for name in names:
        try:
            reply = DNSRecord.parse(DNSRecord.question(name).send("192.0.2.53", 53, timeout=2))
        except Exception as e:  # any failure of the exchange is the answer: print it
            print(type(e).__name__)
            return 1
        if reply.header.rcode != 0 or not reply.rr:
            print("rcode", reply.header.rcode)
            return 1
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
