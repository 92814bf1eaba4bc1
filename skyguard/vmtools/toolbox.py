"""The attacker's toolbox, run inside the sandbox VM by `skyguard attack`: ACTION and its arguments;
prints one JSON line {"sent": n, "answered": n}. Actions: tcp, udp (HOSTS... -- PORTS...), beacon,
flood, dns, curl, gso, and crafted frames with scapy (spoof-ip-mac, spoof-ip, arp-poison,
nd-poison, rogue-ra, evasion CASE ...). Every payload starts with MARK, which the sniffers count.

    python -m skyguard.vmtools.toolbox ACTION ARGS...
"""

import json
import logging
import os
import socket
import sys
import time

logging.getLogger("scapy.runtime").setLevel(logging.ERROR)

MARK = b"SG-ATTACK-"


def tcp_connect(host: str, port: int, timeout: float = 0.6) -> bool:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((host, port))
        s.sendall(MARK + b"tcp")
        return True
    except OSError:
        return False
    finally:
        s.close()


def traffic(action: str, args: list[str]) -> tuple[int, int]:
    """(sent, answered) of the actions that use sockets."""
    sent = answered = 0
    if action == "tcp":  # hosts... -- ports...
        i = args.index("--")
        hosts, ports = args[:i], [int(p) for p in args[i + 1:]]
        for h in hosts:
            for p in ports:
                sent += 1
                answered += tcp_connect(h, p)
    elif action == "udp":  # hosts... -- ports...
        i = args.index("--")
        hosts, ports = args[:i], [int(p) for p in args[i + 1:]]
        for h in hosts:
            fam = socket.AF_INET6 if ":" in h else socket.AF_INET
            s = socket.socket(fam, socket.SOCK_DGRAM)
            s.settimeout(0.3)
            for p in ports:
                s.sendto(MARK + b"udp", (h, p))
                sent += 1
                try:
                    s.recvfrom(100)
                    answered += 1
                except OSError:
                    pass
    elif action == "beacon":  # host port count interval
        host, port, count, interval = args[0], int(args[1]), int(args[2]), float(args[3])
        for _ in range(count):
            sent += 1
            answered += tcp_connect(host, port, timeout=0.4)
            time.sleep(interval)
    elif action == "flood":  # host port seconds: denied UDP as fast as one core sends it
        host, port, seconds = args[0], int(args[1]), float(args[2])
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_DGRAM)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for _ in range(100):
                s.sendto(MARK + b"flood", (host, port))
                sent += 1
    elif action == "dns":  # server proto names...: answered = replies with records
        from dnslib import DNSRecord

        server, proto, names = args[0], args[1], args[2:]
        if names and names[0] == "--tunnel":  # 40 random base32 labels under an allowed domain
            import base64

            names = [base64.b32encode(os.urandom(25)).decode().rstrip("=").lower() + "." + names[1] for _ in range(40)]
        for name in names:
            sent += 1
            try:
                reply = DNSRecord.parse(DNSRecord.question(name).send(server, 53, tcp=proto == "tcp", timeout=1.5))
                answered += int(reply.header.rcode == 0 and bool(reply.rr))
            except Exception:  # no answer, a bad one, a refused TCP connection: not answered
                pass
    elif action == "curl":  # curl arguments: answered = 1 if curl succeeded (HTTP < 400)
        import subprocess

        sent = 1
        answered = int(subprocess.run(["curl", "-sS", "-m", "5", "--fail", "-o", "/dev/null", *args],
                                      capture_output=True).returncode == 0)
    elif action == "gso":  # host port: UDP_SEGMENT super-packets (40 segments each) cross veth as one skb
        host, port = args[0], int(args[1])
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_UDP, 103, 1200)  # UDP_SEGMENT
        for _ in range(3):
            s.sendto(MARK + b"g" * (1200 * 40 - len(MARK)), (host, port))
            sent += 40
    else:
        raise KeyError(action)
    return sent, answered


def crafted(action: str, args: list[str]) -> list:
    """The frames of the actions that forge them (scapy)."""
    from scapy.arch import get_if_hwaddr
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.inet6 import (
        ICMPv6ND_NA,
        ICMPv6ND_RA,
        ICMPv6NDOptDstLLAddr,
        ICMPv6NDOptPrefixInfo,
        ICMPv6NDOptSrcLLAddr,
        IPv6,
    )
    from scapy.layers.l2 import ARP, Ether
    from scapy.packet import Raw

    me_mac = get_if_hwaddr("eth0")  # an ioctl in this netns (/sys may be another namespace's)
    gw_mac = os.environ.get("SG_GATEWAY_MAC", "ff:ff:ff:ff:ff:ff")  # the host side of eth0: frames get routed
    if action == "spoof-ip-mac":  # victim_mac victim_ip dst_ip dport
        vmac, vip, dst, dport = args[0], args[1], args[2], int(args[3])
        return [Ether(src=vmac, dst=gw_mac) / IP(src=vip, dst=dst) / UDP(sport=1812, dport=dport) / Raw(MARK + b"spoof")]
    if action == "spoof-ip":  # victim_ip dst_ip dport (own MAC)
        vip, dst, dport = args[0], args[1], int(args[2])
        l3 = IPv6(src=vip, dst=dst) if ":" in vip else IP(src=vip, dst=dst)
        return [Ether(src=me_mac, dst=gw_mac) / l3 / TCP(sport=40000, dport=dport, flags="S") / Raw(MARK + b"spoof")]
    if action == "arp-poison":  # claimed_ip...
        bcast = "ff:ff:ff:ff:ff:ff"
        return [Ether(src=me_mac, dst=bcast) / ARP(op=op, hwsrc=me_mac, psrc=ip, hwdst=bcast, pdst=ip)
                for ip in args for op in (1, 2)]
    if action == "nd-poison":  # claimed_ipv6...
        return [Ether(src=me_mac, dst="33:33:00:00:00:01") / IPv6(src=src, dst="ff02::1") /
                ICMPv6ND_NA(tgt=ip, R=0, S=0, O=1) / ICMPv6NDOptDstLLAddr(lladdr=me_mac)
                for ip in args for src in (ip, "fe80::ff:fe00:502")]
    if action == "rogue-ra":
        return [Ether(src=me_mac, dst="33:33:00:00:00:01") / IPv6(src="fe80::ff:fe00:502", dst="ff02::1") /
                ICMPv6ND_RA(routerlifetime=1800, prf=1) / ICMPv6NDOptSrcLLAddr(lladdr=me_mac) /
                ICMPv6NDOptPrefixInfo(prefix="2001:db8:bad::", prefixlen=64)]
    if action == "evasion":  # case dst_v4 dst_v6 denied_port
        return evasion(args, me_mac, gw_mac)
    return []


def evasion(args: list[str], me_mac: str, gw_mac: str) -> list:
    from scapy.layers.inet import IP, TCP, IPOption_LSRR
    from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, IPv6ExtHdrRouting
    from scapy.layers.l2 import Dot1AD, Dot1Q, Ether
    from scapy.packet import Raw

    case, d4, d6, port = args[0], args[1], args[2], int(args[3])
    src4 = [a for a in os.popen("ip -4 -o addr show dev eth0").read().split() if a.count(".") == 3][0].split("/")[0]
    words6 = os.popen("ip -6 -o addr show dev eth0 scope global").read().split()
    src6 = [a for a in words6 if ":" in a and "/" in a][0].split("/")[0]
    e = Ether(src=me_mac, dst=gw_mac)

    def v4(**kw):
        return IP(**{"src": src4, "dst": d4, **kw})

    def v6(**kw):
        return IPv6(**{"src": src6, "dst": d6, **kw})

    pay = Raw(MARK + case.encode())
    return {
        "frag-nonfirst": [e / v4(proto=6, frag=100, id=9) / pay],
        "frag-tiny-first": [e / v4(flags="MF", id=10, proto=6) / Raw(b"\x9c\x40"), e / v4(id=10, frag=1, proto=6) / pay],
        "frag-overlap": [e / v4(flags="MF", id=11) / TCP(dport=port) / pay, e / v4(flags="MF", id=11) / TCP(dport=389) / pay,
                         e / v4(id=11, frag=4, proto=6) / pay],
        "frag-v6": [e / v6() / IPv6ExtHdrFragment(nh=6, m=1, id=12) / TCP(dport=port) / pay,
                    e / v6() / IPv6ExtHdrFragment(nh=6, offset=4, id=12) / pay],
        "v6-long-chain": [e / v6() / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() /
                          IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / TCP(dport=port) / pay],
        "v6-unknown-header": [e / v6(nh=253) / pay],
        "v6-routing-header": [e / v6() / IPv6ExtHdrRouting(addresses=[d6]) / TCP(dport=port) / pay],
        "vlan": [Ether(src=me_mac, dst=gw_mac) / Dot1Q(vlan=7) / v4() / TCP(dport=port) / pay],
        "qinq": [Ether(src=me_mac, dst=gw_mac) / Dot1AD(vlan=7) / Dot1Q(vlan=8) / v4() / TCP(dport=port) / pay],
        "ip-options": [e / v4(options=[IPOption_LSRR(routers=[d4])]) / TCP(dport=port) / pay],
        "tcp-flags": [e / v4() / TCP(dport=port, flags=f) / pay for f in ("SF", "", "FPU", "A", "R")],
        "bad-checksums": [e / v4(chksum=0x1234) / TCP(dport=port) / pay, e / v4() / TCP(dport=port, chksum=1) / pay],
        "truncated": [e / v4(len=1400) / TCP(dport=port) / pay, e / v6(plen=1400) / TCP(dport=port) / pay,
                      e / v4(ihl=15) / pay],
    }[case]


SOCKET_ACTIONS = ("tcp", "udp", "beacon", "flood", "dns", "curl", "gso")


def main(argv: list[str]) -> None:
    action, args = argv[0], argv[1:]
    if action in SOCKET_ACTIONS:
        sent, answered = traffic(action, args)
    else:  # crafted frames with scapy, each sent 3 times
        from scapy.sendrecv import sendp

        sent, answered = 0, 0
        for f in crafted(action, args):
            sendp(f, iface="eth0", verbose=False, count=3)
            sent += 3
    print(json.dumps({"sent": sent, "answered": answered}))


if __name__ == "__main__":
    main(sys.argv[1:])
