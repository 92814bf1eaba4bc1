"""Connection tracking against a reference model, on packet sequences hypothesis generates: every
TCP flag combination, with sequence and acknowledgment numbers in and out of the window, on every
flow in either orientation, policy swaps and the passing of time, in any order. The model
(ConntrackModel below) is bpf/README.md's conntrack written as plainly as it can be: a dict of
entries per interface, the first-packet decision taken from
tests/support/refmodel.py (a linear scan of the rules). Each step runs the real programs with
BPF_PROG_RUN at every interface the packet crosses (the sender's egress, then the receiver's
ingress if it got that far), and must give the model's verdict and drop reason at each, and leave
the model's live entries in sg_ct (state, closes seen, packets, each side's sequence mark).

The fixed tests (test_stateful.py, test_ct_reclaim.py) each check one sequence someone thought
of; this one finds the sequences nobody did. Not here: slot reuse when a share is full
(test_ct_reclaim.py: these runs never fill one), fragments and ICMP errors (test_verdicts.py).
SKYGUARD_FUZZ_SCALE scales the number of sequences (the long tier: tests/fuzz); without it the
sequences are the same every run.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import time
from dataclasses import dataclass, field, replace

import pytest
from bpf_support import ADDR, IFACES, Harness, P, make_policy
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule
from scapy.layers.inet import IP, TCP, UDP
from test_verdicts import e_from, e_to

from skyguard.datapath import abi
from skyguard.policy.model import Destination, Rule
from support.refmodel import EGRESS, INGRESS, Packet, decide

pytestmark = pytest.mark.bpf

LONG_TIER = os.environ.get("SKYGUARD_FUZZ_SCALE")
SCALE = float(LONG_TIER or "1.0")
TCP_NO, UDP_NO = 6, 17
OUTSIDE = "198.51.100.7"  # web-out allows tcp/443 to it; no interface of ours
NS_PER_S = 1_000_000_000

# Policies the sequences swap between: the base, the base without web -> db (flows of it are
# revoked), and the base plus db -> web on the web side's client ports (the reversed tuples of
# web's own flows become allowed connections of their own).
DB_TO_WEB = Rule("db-to-web", "allow", ("db",), Destination(zones=("web",)), (P("tcp/40000-40003"), P("udp/41000")))
POLICIES = {
    "base": make_policy(),
    "no-web-to-db": make_policy(drop_rules=("web-to-db",)),
    "db-to-web": make_policy(extra_rules=(DB_TO_WEB,)),
}


@dataclass(frozen=True)
class Flow:
    """A tuple as its sender sends it. `src`/`dst` are workload names, or OUTSIDE (no interface)."""

    src: str
    sport: int
    dst: str
    dport: int
    proto: int = TCP_NO

    def addr(self, end: str) -> str:
        return end if end == OUTSIDE else ADDR[end][0]

    def reversed(self) -> Flow:
        return Flow(self.dst, self.dport, self.src, self.sport, self.proto)


# Each flow and its reverse: allowed, denied by a deny rule, allowed by a port range, to and
# from outside, UDP; the reverses are the replies AND, sent first, connections the other way.
_FORWARD = [
    Flow("w1", 40000, "d1", 5432),
    Flow("w1", 40001, "d1", 8050),
    Flow("w1", 40003, "d1", 8080),
    Flow("w1", 40002, OUTSIDE, 443),
    Flow("w1", 41000, "d1", 5000, UDP_NO),
]
FLOWS = _FORWARD + [f.reversed() for f in _FORWARD]
TCP_FLAGS = ["S", "SA", "A", "PA", "F", "FA", "R", "RA", "SF", "SR", ""]
AGES = [0.5, 5, 11, 30, 61, 100_000]  # seconds since every entry's last packet, away from any lifetime
SEQ_WINDOW = 1 << 24  # bpf/lib/conntrack.h SG_CT_SEQ_WINDOW
# Sequence and acknowledgment numbers: a side's mark is one of these plus 1 or 2 (SYN, FIN), so
# 1 << 24 and its neighbours sit on the window's edges, 1 << 31 is as far as it gets.
SEQS = [0, 1, 2, SEQ_WINDOW, SEQ_WINDOW + 2, 1 << 31, (1 << 32) - SEQ_WINDOW]


def lifetime(proto: int, state: int) -> float:
    """bpf/lib/conntrack.h sg_ct_lifetime, in seconds."""
    if proto == TCP_NO:
        return {abi.CT_NEW: 60, abi.CT_ESTABLISHED: 21600, abi.CT_CLOSING: 10}[state]
    return 60


@dataclass
class Entry:
    direction: str  # of the packet that created it, at its interface
    state: int = abi.CT_NEW
    fins: int = 0
    packets: int = 1
    policy: str = "base"  # the policy that approved it (the datapath's generation)
    age: float = 0.0
    seq_seen: int = 0  # TCP: bit 0 the creator's seq_end known, bit 1 the other side's
    seq_end: list[int] = field(default_factory=lambda: [0, 0])

    def live(self, proto: int) -> bool:
        return self.age < lifetime(proto, self.state)

    def in_window(self, side: int, flags: str, seq: int, ack: int) -> bool:
        """Whether a segment is where its sender is, so it may move the entry (close it)."""
        if self.seq_seen & (1 << side):
            return near(seq, self.seq_end[side])
        other = 1 - side
        return "A" in flags and bool(self.seq_seen & (1 << other)) and near(ack, self.seq_end[other])

    def track(self, side: int, flags: str, seq: int) -> None:
        end = (seq + ("S" in flags) + ("F" in flags)) % (1 << 32)  # no payload in these sequences
        if not self.seq_seen & (1 << side) or 0 < (end - self.seq_end[side]) % (1 << 32) < (1 << 31):
            self.seq_end[side] = end
        self.seq_seen |= 1 << side


def near(seq: int, mark: int) -> bool:
    return (seq - mark + SEQ_WINDOW) % (1 << 32) <= 2 * SEQ_WINDOW


@dataclass
class ConntrackModel:
    """bpf/README.md "Decision path", steps 7, 8 and 10, for TCP and UDP packets of workloads'
    own addresses. entries[(interface, flow as its creator sent it)]."""

    policy: str = "base"
    entries: dict[tuple[str, Flow], Entry] = field(default_factory=dict)

    def decide(self, workload: str, direction: str, flow: Flow):
        packet = Packet(workload, direction, ipaddress.ip_address(flow.addr(flow.src)),
                        ipaddress.ip_address(flow.addr(flow.dst)), flow.proto, flow.dport)
        return decide(POLICIES[self.policy], packet)

    def packet(self, workload: str, direction: str, flow: Flow, flags: str, seq: int = 0,
               ack: int = 0) -> tuple[bool, str | None]:
        """The verdict at `workload`'s interface; updates the entries as the datapath must."""
        found = None
        for key, reply in (((workload, flow), False), ((workload, flow.reversed()), True)):
            entry = self.entries.get(key)
            if entry and entry.live(flow.proto) and (entry.direction != direction) == reply:
                found = (key, entry, reply)
                break
        syn_only = flow.proto == TCP_NO and "S" in flags and "A" not in flags
        if found:
            key, entry, reply = found
            if entry.state == abi.CT_CLOSING and entry.fins == abi.FIN_BOTH and syn_only:  # a new connection
                del self.entries[key]
                found = None
        if found:
            key, entry, reply = found
            if entry.policy != self.policy:  # decided again as its originator under the policy in force
                creator = key[1]
                if not self.decide(workload, entry.direction, creator).allowed:
                    del self.entries[key]
                    return False, "policy_revoked"
                entry.policy = self.policy
            in_window = flow.proto == TCP_NO and entry.in_window(int(reply), flags, seq, ack)
            if in_window:
                entry.track(int(reply), flags, seq)
            if flow.proto == TCP_NO and ("F" in flags or "R" in flags):
                if in_window:
                    entry.state = abi.CT_CLOSING
                    entry.fins |= abi.FIN_BOTH if "R" in flags else abi.FIN_REPLY if reply else abi.FIN_ORIG
            elif reply and entry.state == abi.CT_NEW and (flow.proto != TCP_NO or in_window):
                entry.state = abi.CT_ESTABLISHED
            entry.packets += 1
            entry.age = 0.0
            return True, None
        verdict = self.decide(workload, direction, flow)
        if not verdict.allowed:
            return False, verdict.reason
        entry = self.entries[(workload, flow)] = Entry(direction, policy=self.policy)
        if flow.proto == TCP_NO:
            entry.track(0, flags, seq)
        return True, None

    def send(self, flow: Flow, flags: str, seq: int = 0, ack: int = 0) -> list[tuple[str, str, tuple]]:
        """The hops of one packet: (workload, direction, verdict) at each interface it reaches."""
        hops = []
        for workload, direction in ((flow.src, EGRESS), (flow.dst, INGRESS)):
            if workload == OUTSIDE:
                continue
            verdict = self.packet(workload, direction, flow, flags, seq, ack)
            hops.append((workload, direction, verdict))
            if not verdict[0]:
                break
        return hops

    def live(self) -> dict:
        return {key: (e.state, e.fins, e.packets, e.direction, e.seq_seen, tuple(e.seq_end))
                for key, e in self.entries.items() if e.live(key[1].proto)}


def frame(flow: Flow, at: str, flags: str, seq: int = 0, ack: int = 0) -> bytes:
    """The frame as the interface of `at` sees it (leaving the sender, or entering the receiver)."""
    ether = e_from(at) if at == flow.src else e_to(at)
    ip = IP(src=flow.addr(flow.src), dst=flow.addr(flow.dst))
    l4 = TCP(sport=flow.sport, dport=flow.dport, flags=flags, seq=seq, ack=ack) if flow.proto == TCP_NO else \
        UDP(sport=flow.sport, dport=flow.dport)
    return bytes(ether / ip / l4)


@pytest.fixture(scope="module")
def harness(datapath, worker):
    h = Harness(datapath, worker)
    h.ifindex = {wl: worker.call(socket.if_nametoindex, ifname) for wl, ifname in IFACES.items()}
    return h


def sequences(h: Harness) -> type[RuleBasedStateMachine]:
    """The state machine: packets, swaps and time passing, each step checked against the model."""
    workload_of = {index: wl for wl, index in h.ifindex.items()}
    address_of = {ipaddress.ip_address(a): wl for wl, (a, _) in ADDR.items()} | {ipaddress.ip_address(OUTSIDE): OUTSIDE}

    def datapath_live() -> dict:
        now = time.monotonic_ns()
        out = {}
        for key, val in h.dp.map("sg_ct").items():
            if val.expires_ns <= now:
                continue
            src = address_of[ipaddress.ip_address(bytes(key.saddr)).ipv4_mapped]
            dst = address_of[ipaddress.ip_address(bytes(key.daddr)).ipv4_mapped]
            flow = Flow(src, socket.ntohs(key.sport), dst, socket.ntohs(key.dport), key.proto)
            direction = EGRESS if val.direction == abi.DIR_EGRESS else INGRESS
            out[(workload_of[key.ifindex], flow)] = (val.state, val.fins, val.packets, direction, val.seq_seen,
                                                     tuple(val.seq_end))
        return out

    class Sequences(RuleBasedStateMachine):
        @initialize()
        def start(self):
            h.dp.map("sg_ct").clear()
            h.apply(POLICIES["base"])
            self.model = ConntrackModel()

        @rule(flow=st.sampled_from(FLOWS), flags=st.sampled_from(TCP_FLAGS), seq=st.sampled_from(SEQS),
              ack=st.sampled_from(SEQS))
        def send(self, flow, flags, seq=0, ack=0):
            for workload, direction, expected in self.model.send(flow, flags, seq, ack):
                got = h.run(frame(flow, workload, flags, seq, ack), workload, direction)
                assert got == expected, f"{flow} flags {flags!r} seq {seq} ack {ack} at {workload} {direction}"
            assert datapath_live() == self.model.live()

        @rule(policy=st.sampled_from(sorted(POLICIES)))
        def swap(self, policy):
            h.apply(POLICIES[policy])
            self.model.policy = policy

        @rule(seconds=st.sampled_from(AGES))
        def age(self, seconds):
            """Every live entry's last packet `seconds` ago (expiries are on the datapath's clock).
            An expired entry stays expired: bringing it back would make a state no clock can, both
            orientations of one tuple live, each the other's reply."""
            table = h.dp.map("sg_ct")
            now = time.monotonic_ns()
            last = now - int(seconds * NS_PER_S)
            for key, val in list(table.items()):
                if val.expires_ns > now:
                    val.expires_ns = max(1, last + int(lifetime(key.proto, val.state) * NS_PER_S))
                    table[key] = val
            for (_, flow), entry in self.model.entries.items():
                if entry.live(flow.proto):
                    entry.age = seconds

    return Sequences


def test_conntrack_follows_the_model(harness):
    machine = sequences(harness)
    # The default run is the same 30 sequences every time (CI gets what a developer saw); the long
    # tier draws new ones each run.
    machine.TestCase.settings = settings(max_examples=max(1, int(30 * SCALE)), stateful_step_count=40,
                                         derandomize=LONG_TIER is None, deadline=None,
                                         suppress_health_check=list(HealthCheck))
    machine.TestCase().runTest()


def test_an_expired_flow_and_its_reverse_connection(harness):
    """Found by the test above in CI: a flow expires, a swap allows the other way, the peer
    connects on the reversed tuple, and its retransmitted SYN rides its own entry."""
    state = sequences(harness)()
    state.start()
    web_to_db = _FORWARD[0]
    state.send(web_to_db, "S")
    state.age(61)
    state.swap("db-to-web")
    state.send(web_to_db.reversed(), "S")
    state.age(0.5)
    state.send(web_to_db.reversed(), "S")
    state.teardown()


def test_a_reopened_flow_keeps_nothing_of_the_old_ones_sequence(harness):
    """Found by the long tier: the peer's FIN closes a flow, the same SYN reopens its tuple, and
    the reopened entry still held the peer's old mark (unused, since not seen, but not fresh)."""
    state = sequences(harness)()
    state.start()
    web_to_db = _FORWARD[0]
    state.send(web_to_db, "S")
    state.send(web_to_db.reversed(), "FA")
    state.send(web_to_db, "S")
    state.teardown()


def test_the_model_is_not_vacuous():
    """The model allows and denies, opens and closes: a sequence the test above can tell apart."""
    model = ConntrackModel()
    first = _FORWARD[0]
    assert model.send(first, "S") == [("w1", EGRESS, (True, None)), ("d1", INGRESS, (True, None))]
    assert model.send(first.reversed(), "SA")[0] == ("d1", EGRESS, (True, None))
    assert model.send(_FORWARD[1], "S") == [("w1", EGRESS, (False, "policy_deny"))]
    assert model.send(first, "FA") and model.live()[("w1", first)][:2] == (abi.CT_CLOSING, abi.FIN_ORIG)
    model.policy = "no-web-to-db"
    assert model.send(first, "A")[0] == ("w1", EGRESS, (False, "policy_revoked"))
    # closed one way, a SYN rides the flow, decided again under the new policy
    assert model.send(first.reversed(), "S") == [("d1", EGRESS, (False, "policy_revoked"))]
    assert replace(Entry(EGRESS), age=11).live(UDP_NO) and not replace(Entry(EGRESS, abi.CT_CLOSING), age=11).live(TCP_NO)
