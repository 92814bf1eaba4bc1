"""FQDN patterns: the matching semantics users rely on (exact, `*.` one label, `**.` one or more,
case-insensitive, trailing dot ignored), checked by table and by hypothesis against a naive
regular-expression reference; and FqdnMatcher checked against a loop over every rule."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from skyguard.policy.fqdn import FqdnGrant, FqdnMatcher, check_pattern, normalize_name, pattern_matches
from skyguard.policy.model import PortRange
from skyguard.policy.parse import parse_policy


@pytest.mark.parametrize("pattern,name,expected", [
    ("deb.debian.org", "deb.debian.org", True),
    ("deb.debian.org", "DEB.Debian.ORG.", True),
    ("deb.debian.org", "debian.org", False),
    ("deb.debian.org", "x.deb.debian.org", False),
    ("deb.debian.org", "deb.debian.org.evil.test", False),
    ("*.debian.org", "security.debian.org", True),
    ("*.debian.org", "Security.Debian.Org.", True),
    ("*.debian.org", "debian.org", False),
    ("*.debian.org", "a.b.debian.org", False),
    ("*.debian.org", "evildebian.org", False),
    ("*.debian.org", "x.debian.org.evil.test", False),
    ("**.cdn.example", "a.cdn.example", True),
    ("**.cdn.example", "a.b.c.cdn.example", True),
    ("**.cdn.example", "cdn.example", False),
    ("**.cdn.example", "xcdn.example", False),
    ("**.cdn.example", "a.xcdn.example", False),
    ("**.cdn.example", "a..cdn.example", False),  # an empty label is never a real name: fail closed
    ("a.example", "a.example..", False),  # only one trailing dot is ignored
    ("a.example", "", False),
    ("a.example", ".", False),
    ("*.example", ".example", False),
])
def test_pattern_semantics(pattern, name, expected):
    assert pattern_matches(pattern, name) is expected


@pytest.mark.parametrize("text,normal", [
    ("API.GitHub.com.", "api.github.com"),
    ("*.Example.COM", "*.example.com"),
    ("**.x.y", "**.x.y"),
    ("_ldap._tcp.dc.example", "_ldap._tcp.dc.example"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
])
def test_check_pattern_normalises(text, normal):
    assert check_pattern(text) == normal


@pytest.mark.parametrize("text", ["", " a.example", "*", "**", "*.", "a.*.b", "a*.b", "***.b", "*x.b",
                                  "a..b", ".a.b", "-a.b", "a-.b", "a b.c", "a/b.c", "a" * 64 + ".b",
                                  ".".join(["a" * 63] * 4) + ".bc", "bücher.example"])
def test_check_pattern_rejects(text):
    with pytest.raises(ValueError):
        check_pattern(text)


def test_host_names_refuse_wildcards():
    assert check_pattern("api.github.test", allow_wildcards=False) == "api.github.test"
    with pytest.raises(ValueError, match="host name is needed"):
        check_pattern("*.github.test", allow_wildcards=False)


# -- hypothesis against a naive reference ------------------------------------------------------

def reference_matches(pattern: str, name: str) -> bool:
    """The semantics written as one regular expression per pattern: the slow, obvious version."""
    pattern = pattern.lower()
    name = name.lower()
    if name.endswith("."):
        name = name[:-1]
    if pattern.startswith("**."):
        regex = r"(?:[^.]+\.)+" + re.escape(pattern[3:])
    elif pattern.startswith("*."):
        regex = r"[^.]+\." + re.escape(pattern[2:])
    else:
        regex = re.escape(pattern)
    return re.fullmatch(regex, name) is not None


# A tiny alphabet so that random names and patterns collide often enough to exercise matches.
labels = st.sampled_from(["a", "b", "A", "ab", "x-y", "_s"])
names = st.lists(labels, min_size=1, max_size=5).map(".".join)
name_inputs = st.one_of(names, names.map(lambda n: n + "."), st.sampled_from(["", ".", "a..b", "a.b.."]))
patterns = st.tuples(st.sampled_from(["", "*.", "**."]), names).map(lambda t: t[0] + t[1])


@settings(max_examples=2000, deadline=None)
@given(patterns, name_inputs)
def test_pattern_matches_agrees_with_reference(pattern, name):
    assert pattern_matches(pattern, name) == reference_matches(pattern, name)


@settings(max_examples=500, deadline=None)
@given(patterns, names)
def test_a_name_built_to_match_does(pattern, prefix):
    base = pattern.removeprefix("**.").removeprefix("*.")
    if pattern.startswith("**."):
        name = f"{prefix}.{base}"
    elif pattern.startswith("*."):
        name = f"{prefix.split('.')[0]}.{base}"
    else:
        name = base
    assert pattern_matches(pattern, name.upper() + ".")


@given(st.text(max_size=300))
def test_check_pattern_never_crashes_and_is_idempotent(text):
    try:
        normal = check_pattern(text)
    except ValueError:
        return
    assert check_pattern(normal) == normal
    assert normal == normalize_name(normal)


# -- FqdnMatcher ---------------------------------------------------------------------------------

HEADER = """\
apiVersion: skyguard/v1
kind: Policy
metadata: {name: t}
zones:
  a: {workloads: [{name: a1, interface: sg-a1, mac: "02:00:00:00:0a:02", addresses: [10.1.0.2]}]}
  b: {workloads: [{name: b1, interface: sg-b1, mac: "02:00:00:00:0b:02", addresses: [10.2.0.2]}]}
dns: {upstreams: ["192.0.2.53"]}
"""


def matcher_for(rules_yaml: str) -> FqdnMatcher:
    return FqdnMatcher(parse_policy(HEADER + "rules:\n" + rules_yaml))


def test_matcher_grants_per_zone_with_ports():
    matcher = matcher_for(
        "  - {name: updates, from: [a, b], to: {fqdns: [deb.debian.test, '*.debian.test']}, ports: [tcp/443]}\n"
        "  - {name: cdn, from: a, to: {fqdns: ['**.cdn.test']}}\n")
    answer = matcher.match("a", "Security.Debian.Test.")
    assert answer.allowed and answer.grants == (FqdnGrant("updates", (PortRange("tcp", 443, 443),)),)
    assert matcher.match("b", "x.y.cdn.test").grants == ()  # cdn is only for zone a
    cdn = matcher.match("a", "x.y.cdn.test")
    assert cdn.allowed and cdn.grants == (FqdnGrant("cdn", ()),)  # no ports = every port
    assert not matcher.match("a", "cdn.test").allowed
    assert not matcher.match("a", "evil.test").allowed


def test_deny_rule_naming_a_name_beats_allow():
    matcher = matcher_for(
        "  - {name: all-cdn, from: a, to: {fqdns: ['**.cdn.test']}, ports: [tcp/443]}\n"
        "  - {name: no-exfil, action: deny, from: '*', to: {fqdns: [drop.cdn.test]}}\n")
    answer = matcher.match("a", "drop.cdn.test")
    assert answer.denied_by == ("no-exfil",) and not answer.allowed
    assert [g.rule for g in answer.grants] == ["all-cdn"]
    assert matcher.match("a", "ok.cdn.test").allowed


def test_a_rule_naming_a_name_twice_is_listed_once():
    matcher = matcher_for("  - {name: r, from: a, to: {fqdns: [x.test, '*.test', '**.test']}}\n")
    assert [g.rule for g in matcher.match("a", "x.test").grants] == ["r"]


rule_specs = st.lists(
    st.tuples(st.sampled_from(["allow", "deny"]), st.sampled_from([["a"], ["b"], ["a", "b"]]),
              st.lists(patterns, min_size=1, max_size=3)),
    min_size=1, max_size=6)


@settings(max_examples=300, deadline=None)
@given(rule_specs, st.sampled_from(["a", "b"]), names)
def test_matcher_agrees_with_a_loop_over_rules(specs, zone, qname):
    lines = []
    for i, (action, zones, fqdns) in enumerate(specs):
        quoted = ", ".join(f"'{p}'" for p in fqdns)
        lines.append(f"  - {{name: r{i}, action: {action}, from: [{', '.join(zones)}], to: {{fqdns: [{quoted}]}}}}\n")
    policy = parse_policy(HEADER + "rules:\n" + "".join(lines))
    answer = FqdnMatcher(policy).match(zone, qname)
    hits = [r for r in policy.rules
            if zone in r.from_zones and any(pattern_matches(p, qname) for p in r.to.fqdns)]
    assert [g.rule for g in answer.grants] == [r.name for r in hits if r.action == "allow"]
    assert list(answer.denied_by) == [r.name for r in hits if r.action == "deny"]
