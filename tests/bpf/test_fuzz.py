"""Mutation fuzzing of sg_from_vm through BPF_PROG_RUN: thousands of corrupted, truncated and
spliced variants of valid frames from a VM. Whatever the program decides, a frame it lets out
must satisfy the anti-spoofing contract (own MAC; own source IP or, for IPv6 neighbour discovery,
its link-local or ::; ARP only about itself; no VLAN tag; no IPv4 options). Deterministic seed.
"""

from __future__ import annotations

import ipaddress
import random

from bpf_support import MAC
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6ND_NS, ICMPv6NDOptSrcLLAddr, IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop
from scapy.layers.l2 import ARP
from scapy.packet import Raw
from test_verdicts import e_from, v4, v6

from skyguard.datapath import progrun
from skyguard.datapath.compile import eui64_link_local
from skyguard.errors import DatapathError

MUTATIONS = 10000


def _seeds():
    return [bytes(f) for f in (
        e_from("w1") / IP(src=v4("w1"), dst=v4("d1")) / TCP(sport=40000, dport=5432, flags="S"),
        e_from("w1") / IP(src=v4("w1"), dst="198.51.100.7") / TCP(dport=443),
        e_from("w1") / IP(src=v4("w1"), dst=v4("d1"), flags="MF", id=5) / UDP(dport=5000) / Raw(b"x" * 16),
        e_from("w1") / IP(src=v4("w1"), dst="8.8.8.8") / UDP(dport=53) / Raw(b"q" * 12),
        e_from("w1") / IP(src=v4("w1"), dst=v4("d1")) / ICMP(type=8, id=3),
        e_from("w1") / IP(src=v4("w1"), dst="198.51.100.9") / ICMP(type=3) / IP(src="198.51.100.9", dst=v4("w1")) / UDP(),
        e_from("w1") / IPv6(src=v6("w1"), dst=v6("d1")) / IPv6ExtHdrHopByHop() / TCP(dport=5432),
        e_from("w1") / IPv6(src=v6("w1"), dst=v6("d1")) / IPv6ExtHdrFragment(nh=17, m=1, id=9) / UDP(dport=5000),
        e_from("w1") / IPv6(src=v6("w1"), dst="ff02::1:ff00:1") / ICMPv6ND_NS(tgt="fd00:1::1") /
        ICMPv6NDOptSrcLLAddr(lladdr=MAC["w1"]),
        e_from("w1") / ARP(op=1, hwsrc=MAC["w1"], psrc=v4("w1"), pdst="10.1.0.1"),
    )]


SEEDS = _seeds()


def mutate(rnd: random.Random, frame: bytes) -> bytes:
    b = bytearray(frame)
    for _ in range(rnd.randint(1, 4)):
        op = rnd.random()
        if op < 0.55 and b:
            b[rnd.randrange(min(len(b), 96))] = rnd.randrange(256)
        elif op < 0.7:
            del b[rnd.randrange(14, max(15, len(b))):]
        elif op < 0.85:
            at = rnd.randrange(12, max(13, len(b)))
            b[at:at] = bytes(rnd.randrange(256) for _ in range(rnd.choice((2, 4, 8))))
        else:
            other = rnd.choice(SEEDS)
            cut = rnd.randrange(14, len(other))
            b = b[:cut] + bytearray(other[cut:])
    return bytes(b)


def allowed_out(frame: bytes) -> str | None:
    """What is wrong with a frame sg_from_vm let out (None if it honours the contract)."""
    own_mac = bytes.fromhex(MAC["w1"].replace(":", ""))
    if frame[6:12] != own_mac:
        return "foreign source MAC"
    ethertype = int.from_bytes(frame[12:14], "big")
    if ethertype == 0x0806:
        spa = ipaddress.ip_address(frame[28:32])
        if frame[22:28] != own_mac or str(spa) not in (v4("w1"), "0.0.0.0"):
            return "ARP about someone else"
        return None
    if ethertype == 0x0800:
        if frame[14] != 0x45:
            return "IPv4 with options or bad version"
        if str(ipaddress.ip_address(frame[26:30])) != v4("w1"):
            return "foreign IPv4 source"
        return None
    if ethertype == 0x86DD:
        src = ipaddress.ip_address(frame[22:38])
        if src not in (ipaddress.ip_address(v6("w1")), eui64_link_local(MAC["w1"]), ipaddress.ip_address("::")):
            return "foreign IPv6 source"
        return None
    return f"ethertype {ethertype:#06x} let out"


def test_mutated_frames_never_break_the_anti_spoofing_contract(h):
    rnd = random.Random(20261130)
    fd, ifindex = h.dp._loaded.from_vm_tc.fd, h.ifindex["w1"]
    passed = refused = 0
    for i in range(MUTATIONS):
        frame = mutate(rnd, rnd.choice(SEEDS))
        try:
            res = h.worker.call(progrun.run, fd, frame, kind="tc", ifindex=ifindex)
        except DatapathError:
            refused += 1  # the kernel refuses test runs of frames too short for their ethertype
            continue
        if res.retval == progrun.TC_ACT_OK:
            passed += 1
            problem = allowed_out(frame)
            assert problem is None, f"mutation {i} let out: {problem}: {frame.hex()}"
    # the corpus exercised both outcomes (a fuzzer that only ever drops tests nothing)
    assert passed > 50 and MUTATIONS - passed - refused > 50, (passed, refused)
