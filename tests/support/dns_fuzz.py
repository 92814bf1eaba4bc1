"""Coverage-guided fuzzing of the DNS proxy's parsers and policy engine with atheris.

The tier the issue asks for: a million hostile inputs, run on demand (it takes minutes, so not
in CI; CI runs the fixed corpus and the hypothesis properties in tests/unit/test_dns_hostile.py).
Each input is either a VM query (decide) or an upstream reply to a forwarded query (answer, with
the right ID patched in so the fuzzer reaches the record walk). Any exception is a crash.

    PYTHONPATH=tests python -m support.dns_fuzz -runs=1000000    # needs atheris (pip, test extra)
"""

from __future__ import annotations

import ipaddress
import sys

CLIENT = "10.0.0.2"
SEED_QUERY = bytes.fromhex("123401000001000000000000036465620664656269616e04746573740000010001")


class _NoLearner:
    def learn(self, zone, rule_name, ips, ttl):
        pass


def make_resolver():
    # imported here so that main() can import them under atheris' instrumentation
    from skyguard.dns.interfaces import PolicyDirectory
    from skyguard.dns.resolver import DnsPolicyResolver
    from skyguard.parts import NullLog
    from skyguard.policy.model import Destination, DnsConfig, Policy, PortRange, Rule, Workload, Zone

    vm = Workload("vm", "z", "sg-vm", "02:00:00:00:00:02", (ipaddress.ip_address(CLIENT),))
    rules = (Rule("any-test", "allow", ("z",), Destination(fqdns=("**.test",)),
                  (PortRange("tcp", 443, 443),)),
             Rule("no-evil", "deny", ("z",), Destination(fqdns=("evil.test",)), ()))
    policy = Policy("fuzz", {"z": Zone("z", (vm,))}, {}, rules, DnsConfig(("192.0.2.53",)))
    return DnsPolicyResolver(policy, PolicyDirectory(policy), _NoLearner(), log=NullLog())


def one_input(resolver, data: bytes) -> None:
    if not data:
        return
    if data[0] & 1:
        resolver.decide(data[1:], CLIENT)
        return
    decision = resolver.decide(SEED_QUERY, CLIENT)
    if decision.cached:  # an earlier input's reply, from the answer cache: replay it, then ask anew
        resolver.answer(decision, decision.cached)
        resolver.cache.clear()
        decision = resolver.decide(SEED_QUERY, CLIENT)
    if decision.action != "forward":
        return
    reply = data[1:]
    if len(reply) >= 2:
        reply = decision.upstream_id.to_bytes(2, "big") + reply[2:]
    end = decision.question.end
    asked = decision.upstream_query[12:end]
    if reply[12:end].lower() == asked.lower():  # our question: in the random case we drew (0x20)
        reply = reply[:12] + asked + reply[end:]
    resolver.answer(decision, reply)


def main() -> None:
    import atheris

    with atheris.instrument_imports(include=["skyguard.dns"]):
        import skyguard.dns.resolver  # noqa: F401 - instruments resolver, wire, tunnel, names
    resolver = make_resolver()
    atheris.Setup(sys.argv, lambda data: one_input(resolver, data))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
