"""The policy parser: the shipped policies load, and every kind of mistake is reported with the
right line, key and a message that says how to fix it, while a file with any error loads nothing."""

import hashlib
import ipaddress
import re
from pathlib import Path

import pytest

from skyguard.errors import PolicyError
from skyguard.policy.model import PortRange
from skyguard.policy.parse import Problem, load_policy, parse_policy

REPO = Path(__file__).resolve().parents[2]
DATA = Path(__file__).parent / "data"
SHIPPED = sorted([REPO / "policies" / "keysystems.yaml", *(REPO / "policies" / "examples").glob("*.yaml")])


def test_default_policy_parses_with_its_meaning():
    path = REPO / "policies" / "keysystems.yaml"
    policy = load_policy(path)
    assert policy.name == "keysystems"
    assert list(policy.zones) == ["auth", "directory", "sdn", "firewall", "sandbox"]
    assert len(policy.workloads()) == 7 and len(policy.rules) == 10
    assert policy.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert policy.source == str(path)
    syslog = next(r for r in policy.rules if r.name == "syslog")
    assert syslog.from_zones == tuple(policy.zones)  # "*" expanded in policy order
    assert syslog.to.networks == ("logging",)
    first = policy.rules[0]
    assert PortRange("tcp", 49152, 65535) in first.ports and PortRange("icmp") in first.ports
    lines = path.read_text().splitlines()
    assert "- name: auth-to-directory" in lines[first.line - 1]  # where the rule starts, for messages
    deny = next(r for r in policy.rules if r.name == "no-metadata")
    assert deny.action == "deny" and deny.ports == ()  # absent ports = every port
    assert deny.to.cidrs == (ipaddress.ip_network("169.254.169.254/32"),)
    radius = policy.workload("radius1")
    assert radius.zone == "auth" and radius.mac == "02:00:00:00:01:02"
    assert radius.addresses == (ipaddress.ip_address("10.10.1.2"), ipaddress.ip_address("fd00:10:1::2"))
    assert policy.dns.upstreams == ("192.0.2.53",)
    assert policy.credentials[0].inject.format == "Bearer {secret}"
    assert policy.tls_termination[0].workload == "sdnctl1"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_policy_parses(path):
    policy = load_policy(path)
    assert policy.zones and policy.workloads()


def expected_problems(path: Path) -> set[tuple[int | None, str]]:
    found = set()
    for line in path.read_text().splitlines():
        match = re.match(r"^# expect: (\d+) ?(.*)$", line)
        if match:
            found.add((int(match.group(1)), match.group(2).strip()))
    assert found, f"{path} declares no '# expect:' lines"
    return found


@pytest.mark.parametrize("path", sorted(DATA.glob("*.yaml")), ids=lambda p: p.name)
def test_broken_files_report_exactly_their_problems(path):
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    got = {(p.line, p.key) for p in caught.value.problems}
    assert got == expected_problems(path)
    for problem in caught.value.problems:
        assert str(problem).startswith(f"{path}:{problem.line}: ")


def test_one_bad_rule_among_good_ones_loads_nothing():
    with pytest.raises(PolicyError) as caught:
        load_policy(DATA / "one-bad-rule.yaml")
    assert len(caught.value.problems) == 1
    assert str(caught.value.problems[0]).endswith("rules[7].ports[0]: 'tcp/65536' is not a port (1-65535)")


def test_problem_reads_file_line_key_message():
    problem = Problem("policies/x.yaml", 12, "rules[3].ports[1]", "'tcp/70000' is not a port (1-65535)")
    assert str(problem) == "policies/x.yaml:12: rules[3].ports[1]: 'tcp/70000' is not a port (1-65535)"


# Every case below is appended to HEADER at line 13: either a zone (indented) or top-level keys.
HEADER = """\
apiVersion: skyguard/v1
kind: Policy
metadata: {name: t}
networks:
  lan: [10.0.0.0/8]
zones:
  a:
    workloads:
      - {name: a1, interface: sg-a1, mac: "02:00:00:00:0a:02", addresses: [10.1.0.2, "fd00:1::2"]}
  b:
    workloads:
      - {name: b1, interface: sg-b1, mac: "02:00:00:00:0b:02", addresses: [10.2.0.2]}
"""


def zone_c(**fields) -> str:
    workload = {"name": "c1", "interface": "sg-c1", "mac": '"02:00:00:00:0c:02"', "addresses": "[10.3.0.2]"}
    workload.update(fields)
    body = ", ".join(f"{k}: {v}" for k, v in workload.items())
    return f"  c:\n    workloads:\n      - {{{body}}}\n"


def rule(text: str) -> str:
    return f"rules:\n  - {{name: r, from: a, {text}}}\n"


KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIL3Bn450ZXB8e+M670v9a/bGPeCAylCnYQHGLc0Q/ZkV"
RSA_1024 = ("ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQDZ8iWjQaGQ7u3ZAVo91NSKpD9sUJ/Se5VhWAYrOyYFL1L9yaWbfa0VpCB"
            "rhHfVSbgbivrQW6a0lv8QXW6uo9YlgM5orGMZwLO9OCqTzJgdfCCmyAFpyoH6TC9QdkcjJEUX4apYdjbcSyYCqbNnWt3611F"
            "yKLtPsTMHHLH4eMi5xQ==")


def fqdn_rule(fqdns: str) -> str:
    return "dns: {upstreams: ['192.0.2.53']}\n" + rule(f"to: {{fqdns: {fqdns}}}")


def credential(**fields) -> str:
    item = {"name": "gh", "placeholder": "sg-placeholder-github-7f3a", "secret": "github", "zones": "[a]",
            "destinations": "[api.github.test]", "inject": "{header: Authorization, format: 'Bearer {secret}'}"}
    item.update(fields)
    body = ", ".join(f"{k}: {v}" for k, v in item.items() if v is not None)
    return f"credentials:\n  - {{{body}}}\n"


def ssh(**fields) -> str:
    settings = {"listen": "127.0.0.1:2222"}
    settings.update({k: v for k, v in fields.items() if k != "operator"})
    operator = {"name": "alice", "public_key": f'"{KEY}"', "may_access": "[a]"}
    operator.update(fields.get("operator", {}))
    ops = ", ".join(f"{k}: {v}" for k, v in operator.items())
    head = "".join(f"    {k}: {v}\n" for k, v in settings.items())
    return f"admin:\n  ssh:\n{head}    operators:\n      - {{{ops}}}\n"


CASES = [
    # (id, appended text, line, key, fragment of the message)
    ("address-reused", zone_c(addresses="[10.1.0.2]"), 15, "zones.c.workloads[0].addresses[0]",
     "already used by zones.a.workloads[0].addresses[0]"),
    ("v6-address-reused-other-spelling", zone_c(addresses='["fd00:1:0::2"]'), 15,
     "zones.c.workloads[0].addresses[0]", "already used"),
    ("workload-name-reused", zone_c(name="a1"), 15, "zones.c.workloads[0].name", "unique across zones"),
    ("workload-name-too-long", zone_c(name="abcdefghijklmnop"), 15, "zones.c.workloads[0].name",
     "at most 15"),
    ("workload-name-upper", zone_c(name="Web1"), 15, "zones.c.workloads[0].name", "not a valid workload name"),
    ("interface-reused", zone_c(interface="sg-a1"), 15, "zones.c.workloads[0].interface", "already used"),
    ("interface-too-long", zone_c(interface="sg-interface-16c"), 15, "zones.c.workloads[0].interface",
     "at most 15"),
    ("interface-slash", zone_c(interface="sg/1"), 15, "zones.c.workloads[0].interface",
     "not a valid interface name"),
    ("mac-reused-upper-case", zone_c(mac='"02:00:00:00:0A:02"'), 15, "zones.c.workloads[0].mac",
     "already used"),
    ("mac-broadcast", zone_c(mac='"ff:ff:ff:ff:ff:ff"'), 15, "zones.c.workloads[0].mac", "multicast"),
    ("mac-zero", zone_c(mac='"00:00:00:00:00:00"'), 15, "zones.c.workloads[0].mac", "all-zero"),
    ("mac-short", zone_c(mac='"02:00:00:00:0c"'), 15, "zones.c.workloads[0].mac", "six hex bytes"),
    ("mac-number", zone_c(mac="12"), 15, "zones.c.workloads[0].mac", "quote it"),
    ("address-is-network", zone_c(addresses="[10.3.0.0/24]"), 15, "zones.c.workloads[0].addresses[0]",
     "is a network"),
    ("address-link-local", zone_c(addresses='["fe80::1"]'), 15, "zones.c.workloads[0].addresses[0]",
     "link-local"),
    ("address-invalid", zone_c(addresses="[300.1.1.1]"), 15, "zones.c.workloads[0].addresses[0]",
     "not an IPv4 or IPv6 address"),
    ("address-multicast", zone_c(addresses="[224.0.0.1]"), 15, "zones.c.workloads[0].addresses[0]",
     "not a usable host address"),
    ("addresses-empty", zone_c(addresses="[]"), 15, "zones.c.workloads[0].addresses", "must not be empty"),
    ("workload-key-typo", zone_c(adresses="[10.3.0.3]"), 15, "zones.c.workloads[0].adresses",
     "did you mean 'addresses'?"),
    ("workload-missing-mac", zone_c(mac=None).replace(", mac: None", ""), 15, "zones.c.workloads[0].mac",
     "is required"),
    ("zone-name-invalid", "  Bad_Zone:\n    workloads: []\n", 13, "zones.Bad_Zone", "not a valid zone name"),
    ("zone-not-mapping", "  c: [c1]\n", 13, "zones.c", "must be a mapping"),
    ("rule-from-unknown-zone", rule("from: c, to: {zones: [b]}").replace("from: a, ", ""), 14,
     "rules[0].from", "unknown zone 'c'"),
    ("rule-from-typo-hint", rule("from: [auth], to: {zones: [b]}").replace("from: a, ", ""), 14,
     "rules[0].from[0]", "known: a, b"),
    ("rule-star-in-list", rule("from: ['*', a], to: {zones: [b]}").replace("from: a, ", ""), 14,
     "rules[0].from[0]", "list it alone"),
    ("rule-to-empty", rule("to: {}"), 14, "rules[0].to", "names no destination"),
    ("rule-to-unknown-zone", rule("to: {zones: [c]}"), 14, "rules[0].to.zones[0]", "unknown zone 'c'"),
    ("rule-to-unknown-network", rule("to: {networks: [wan]}"), 14, "rules[0].to.networks[0]",
     "did you mean 'lan'?"),
    ("rule-to-typo", rule("to: {zone: [b]}"), 14, "rules[0].to.zone", "did you mean 'zones'?"),
    ("allow-private-alone", rule("to: {allow_private: true}"), 14, "rules[0].to", "names no destination"),
    ("allow-private-without-fqdns", rule("to: {cidrs: [10.0.0.0/8], allow_private: true}"), 14,
     "rules[0].to.allow_private", "name private networks in cidrs"),
    ("allow-private-not-boolean", "dns: {upstreams: ['192.0.2.53']}\n"
     + rule("to: {fqdns: [a.test], allow_private: yes please}"), 15, "rules[0].to.allow_private",
     "must be true or false"),
    ("allow-private-on-deny", "dns: {upstreams: ['192.0.2.53']}\n"
     + rule("action: deny, to: {fqdns: [a.test], allow_private: true}"), 15,
     "rules[0].to.allow_private", "means nothing on a deny rule"),
    ("rule-cidr-host-bits", rule("to: {cidrs: [10.0.0.1/8]}"), 14, "rules[0].to.cidrs[0]",
     "host bits set; did you mean 10.0.0.0/8?"),
    ("rule-cidr-garbage", rule("to: {cidrs: [10.0.0.0/33]}"), 14, "rules[0].to.cidrs[0]", "not a CIDR"),
    ("fqdn-wildcard-not-leftmost", fqdn_rule("['a.*.example']"), 15, "rules[0].to.fqdns[0]",
     "only allowed as the whole leftmost label"),
    ("fqdn-partial-wildcard", fqdn_rule("['foo*.example']"), 15, "rules[0].to.fqdns[0]",
     "whole leftmost label"),
    ("fqdn-triple-star", fqdn_rule("['***.example']"), 15, "rules[0].to.fqdns[0]",
     "whole leftmost label"),
    ("fqdn-bare-star", fqdn_rule("['*']"), 15, "rules[0].to.fqdns[0]", "matches every name"),
    ("fqdn-long-label", fqdn_rule(f"[{'a' * 64}.example]"), 15, "rules[0].to.fqdns[0]",
     "at most 63"),
    ("fqdn-too-long", fqdn_rule(f"[{'.'.join(['a' * 62] * 4)}.example]"), 15,
     "rules[0].to.fqdns[0]", "at most 253"),
    ("fqdn-empty-label", fqdn_rule("['a..example']"), 15, "rules[0].to.fqdns[0]", "empty label"),
    ("fqdn-hyphen-edge", fqdn_rule("['-a.example']"), 15, "rules[0].to.fqdns[0]", "invalid label"),
    ("fqdn-unicode", fqdn_rule("['bücher.example']"), 15, "rules[0].to.fqdns[0]",
     "xn--bcher-kva.example"),
    ("port-too-high", rule("to: {zones: [b]}, ports: [tcp/70000]"), 14, "rules[0].ports[0]",
     "'tcp/70000' is not a port (1-65535)"),
    ("port-zero", rule("to: {zones: [b]}, ports: [udp/0]"), 14, "rules[0].ports[0]", "not a port (1-65535)"),
    ("port-range-reversed", rule("to: {zones: [b]}, ports: ['tcp/90-80']"), 14, "rules[0].ports[0]",
     "write tcp/80-90"),
    ("port-no-protocol", rule("to: {zones: [b]}, ports: [tcp/22, 443]"), 14, "rules[0].ports[1]",
     "write tcp/443 or udp/443"),
    ("port-unknown-protocol", rule("to: {zones: [b]}, ports: [sctp/5]"), 14, "rules[0].ports[0]",
     "not a port"),
    ("port-icmp-type", rule("to: {zones: [b]}, ports: [icmp/8]"), 14, "rules[0].ports[0]",
     "ICMP is allowed as a whole"),
    ("ports-empty", rule("to: {zones: [b]}, ports: []"), 14, "rules[0].ports", "omit `ports`"),
    ("rule-action-invalid", rule("to: {zones: [b]}, action: permit"), 14, "rules[0].action",
     "write allow or deny"),
    ("rule-key-typo", rule("to: {zones: [b]}, port: [tcp/1]"), 14, "rules[0].port", "did you mean 'ports'?"),
    ("rule-missing-name", "rules:\n  - {from: a, to: {zones: [b]}}\n", 14, "rules[0].name", "is required"),
    ("rule-name-reused", "rules:\n  - {name: r, from: a, to: {zones: [b]}}\n  - {name: r, from: b, to: "
     "{zones: [a]}}\n", 15, "rules[1].name", "already defined at rules[0]"),
    ("rules-not-list", "rules: {name: r}\n", 13, "rules", "must be a list"),
    ("dns-upstream-hostname", "dns: {upstreams: [dns.example]}\n", 13, "dns.upstreams[0]",
     "not an IP address"),
    ("dns-upstream-port", "dns: {upstreams: ['192.0.2.53:0']}\n", 13, "dns.upstreams[0]", "invalid port"),
    ("dns-ttl-order", "dns:\n  min_ttl: 600\n  max_ttl: 60\n", 14, "dns.min_ttl", "above max_ttl 60"),
    ("dns-ttl-bool", "dns:\n  min_ttl: true\n", 14, "dns.min_ttl", "whole number"),
    ("dns-ttl-negative", "dns:\n  max_ttl: -1\n", 14, "dns.max_ttl", "out of range"),
    ("dns-refuse-with", "dns:\n  refuse_with: drop\n", 14, "dns.refuse_with", "not refused or nxdomain"),
    ("dns-tunnel-action", "dns:\n  tunnel_detection: {action: maybe}\n", 14, "dns.tunnel_detection.action",
     "block, alert or off"),
    ("dns-missing-for-fqdns", rule("to: {fqdns: [a.example]}"), 14, "dns.upstreams", "names domains"),
    ("cred-placeholder-short", credential(placeholder="short"), 14, "credentials[0].placeholder",
     "at least 16"),
    ("cred-placeholder-space", credential(placeholder="'sg placeholder github 7f3a'"), 14,
     "credentials[0].placeholder", "may hold only"),
    ("cred-placeholder-overlap", credential() + credential(name="gh2", placeholder="sg-placeholder-github-7f3a-2")
     .replace("credentials:\n", ""), 15, "credentials[1].placeholder", "overlaps the placeholder"),
    ("cred-name-reused", credential() + credential(placeholder="sg-placeholder-other-1234")
     .replace("credentials:\n", ""), 15, "credentials[1].name", "already defined"),
    ("cred-unknown-zone", credential(zones="[c]"), 14, "credentials[0].zones[0]", "unknown zone 'c'"),
    ("cred-destination-pattern", credential(destinations="['*.github.test']"), 14,
     "credentials[0].destinations[0]", "a host name is needed"),
    ("cred-format-no-secret", credential(inject="{header: Authorization, format: 'Bearer token'}"), 14,
     "credentials[0].inject.format", "must contain {secret}"),
    ("cred-format-other-field", credential(inject="{header: Authorization, format: '{secret} {user}'}"), 14,
     "credentials[0].inject.format", "no other {field}"),
    ("cred-inject-nowhere", credential(inject="{format: '{secret}'}"), 14, "credentials[0].inject",
     "injects nowhere"),
    ("cred-header-invalid", credential(inject="{header: 'Bad Header'}"), 14, "credentials[0].inject.header",
     "not an HTTP header name"),
    ("cred-missing-inject", credential(inject=None), 14, "credentials[0].inject", "is required"),
    ("cred-header-forwarding", credential(inject="{header: X_Forwarded_Token}"), 14, "credentials[0].inject.header",
     "is a forwarding header"),
    ("tls-unknown-workload", "tls_termination:\n  - {workload: a2, port: 443, forward_to: 8080, "
     "certificate: web}\n", 14, "tls_termination[0].workload", "unknown workload 'a2'; known: a1, b1"),
    ("tls-port-range", "tls_termination:\n  - {workload: a1, port: 70000, forward_to: 8080, "
     "certificate: web}\n", 14, "tls_termination[0].port", "out of range (1-65535)"),
    ("tls-port-string", "tls_termination:\n  - {workload: a1, port: '443', forward_to: 8080, "
     "certificate: web}\n", 14, "tls_termination[0].port", "whole number"),
    ("ssh-listen-no-port", ssh(listen="0.0.0.0"), 15, "admin.ssh.listen", "has no port"),
    ("ssh-listen-hostname", ssh(listen="localhost:22"), 15, "admin.ssh.listen", "not an IP address"),
    ("ssh-flag-not-bool", ssh(sftp="'yes'"), 16, "admin.ssh.sftp", "true or false"),
    ("ssh-key-garbage", ssh(operator={"public_key": "'ssh-ed25519 AAAAnotakey'"}), 17,
     "admin.ssh.operators[0].public_key", "not a valid OpenSSH public key"),
    ("ssh-key-rsa-1024", ssh(operator={"public_key": f'"{RSA_1024}"'}), 17,
     "admin.ssh.operators[0].public_key", "at least 2048"),
    ("ssh-key-one-word", ssh(operator={"public_key": "AAAAC3Nza"}), 17,
     "admin.ssh.operators[0].public_key", "not an OpenSSH public key line"),
    ("ssh-unknown-zone", ssh(operator={"may_access": "[c]"}), 17, "admin.ssh.operators[0].may_access[0]",
     "unknown zone 'c'"),
    ("ssh-operator-typo", ssh(operator={"may_acess": "[a]"}), 17, "admin.ssh.operators[0].may_acess",
     "did you mean 'may_access'?"),
    ("top-level-typo", "rule: []\n", 13, "rule", "did you mean 'rules'?"),
]


@pytest.mark.parametrize("text,line,key,fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_error_names_line_key_and_fix(text, line, key, fragment):
    with pytest.raises(PolicyError) as caught:
        parse_policy(HEADER + text, source="case.yaml")
    problems = caught.value.problems
    matching = [p for p in problems if (p.line, p.key) == (line, key)]
    assert matching, f"no problem at {line} {key}; got:\n{caught.value}"
    assert any(fragment in p.message for p in matching), str(caught.value)
    assert len(problems) == 1, f"expected exactly one problem, got:\n{caught.value}"


def test_header_alone_is_valid():
    policy = parse_policy(HEADER)
    assert [w.name for w in policy.workloads()] == ["a1", "b1"]
    assert policy.rules == ()


def test_secret_like_values_are_never_echoed():
    pasted_token = "ghp_16C7e42F292c6912E7710c838347Ae178B4a"
    text = HEADER + credential(secret=f"'{pasted_token} x'", placeholder="'short token'")
    with pytest.raises(PolicyError) as caught:
        parse_policy(text)
    assert pasted_token not in str(caught.value)
    assert "short token" not in str(caught.value)
    assert len(caught.value.problems) == 2


def test_values_are_normalised():
    text = HEADER.replace('"02:00:00:00:0a:02"', '"02-00-00-00-0A-02"') + (
        "dns: {upstreams: ['192.0.2.53', '[2001:db8::53]:5353', '2001:DB8::54']}\n"
        "rules:\n  - {name: r, from: a, to: {fqdns: [API.Example.COM., '*.Example.com'], "
        "cidrs: ['2001:DB8::/32']}, ports: [TCP/443, tcp/443, 'udp/1-65535']}\n")
    policy = parse_policy(text)
    assert policy.workload("a1").mac == "02:00:00:00:0a:02"
    assert policy.dns.upstreams == ("192.0.2.53", "[2001:db8::53]:5353", "2001:db8::54")
    (r,) = policy.rules
    assert r.to.fqdns == ("api.example.com", "*.example.com")
    assert r.to.cidrs == (ipaddress.ip_network("2001:db8::/32"),)
    assert r.ports == (PortRange("tcp", 443, 443), PortRange("udp", 1, 65535))


def test_extensions_under_x_keys_are_kept():
    policy = parse_policy(HEADER + "x-owner: {team: netsec}\n")
    assert policy.extra == {"x-owner": {"team": "netsec"}}


@pytest.mark.parametrize("text,fragment", [
    ("", "is empty"),
    ("apiVersion: skyguard/v1\n---\nkind: Policy\n", "2 YAML documents"),
    ("- just\n- a list\n", "must be a mapping"),
])
def test_not_a_policy_document(text, fragment):
    with pytest.raises(PolicyError) as caught:
        parse_policy(text)
    assert fragment in str(caught.value)


def test_unreadable_inputs_are_policy_errors(tmp_path):
    with pytest.raises(PolicyError, match="no such file"):
        load_policy(tmp_path / "missing.yaml")
    with pytest.raises(PolicyError, match="is a directory"):
        load_policy(tmp_path)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"apiVersion: skyguard/v1\nkind: \xff\xfe\n")
    with pytest.raises(PolicyError, match=r"binary.yaml:2: is not valid UTF-8"):
        load_policy(binary)


# -- robustness: whatever the YAML, the parser returns a Policy or raises PolicyError -----------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from skyguard.policy.canonical import policy_to_dict  # noqa: E402

CANONICAL = policy_to_dict(load_policy(REPO / "policies" / "keysystems.yaml"))
odd_values = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
    st.text(max_size=30), st.sampled_from(["*", "", "tcp/0", "::", "0.0.0.0/0", "auth", "{secret}"]),
    st.lists(st.text(max_size=5), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))


def paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from paths(v, prefix + (i,))


ALL_PATHS = [p for p in paths(CANONICAL) if p]


def replaced(doc, path, value):
    import copy
    doc = copy.deepcopy(doc)
    node = doc
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    return doc


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(ALL_PATHS), odd_values)
def test_any_single_odd_value_is_a_policy_error_or_a_policy(path, value):
    import json
    text = json.dumps(replaced(CANONICAL, path, value), default=str)
    try:
        parse_policy(text)
    except PolicyError as e:
        assert e.problems and all(p.message for p in e.problems)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab:-[]{}*&!|>'\"\n #,.?%@`\t0"), max_size=80))
def test_arbitrary_text_is_a_policy_error(text):
    with pytest.raises(PolicyError):
        parse_policy(text)


def test_yaml_anchors_merge_keys_and_tags_do_not_crash():
    text = HEADER + ("base: &base {from: a, to: {zones: [b]}}\n"
                     "rules:\n  - {<<: *base, name: r}\n  - !!python/object:os.system {name: x}\n")
    with pytest.raises(PolicyError) as caught:
        parse_policy(text)
    keys = {p.key for p in caught.value.problems}
    assert "base" in keys  # an unknown top-level key, anchor or not


def test_alias_bomb_in_an_extension_is_refused_quickly():
    levels = ["l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 9)]
    text = HEADER + "x-bomb:\n" + "".join(f"  {line}\n" for line in levels)
    with pytest.raises(PolicyError, match="x-bomb: holds more than 10000 values"):
        parse_policy(text)


@pytest.mark.parametrize("where", ["addresses", "ports", "key", "nested-key"])
def test_alias_bombs_in_values_are_reported_not_expanded(where):
    levels = ["l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 9)]
    bombs = "x-bombs:\n" + "".join(f"  {line}\n" for line in levels)
    if where == "addresses":
        tail = zone_c(addresses="*l8")
    elif where == "ports":
        tail = rule("to: {zones: [b]}, ports: *l8")
    elif where == "key":
        tail = "? *l8\n: 1\n"
    else:
        tail = "? [[a], {b: c}]\n: 1\n"
    text = HEADER.replace("zones:\n", "zones:\n" + tail, 1) if where == "addresses" else HEADER + tail
    text = bombs + text
    with pytest.raises(PolicyError):
        parse_policy(text)


@pytest.mark.parametrize("text, line, fragment", [
    # found by the long fuzz tier: ruamel raised NotImplementedError("overlap in comment ...")
    ("#\n&a #\na", 2, "comment"),
    ("x: " + "[" * 400 + "]" * 400 + "\n", None, "nested too deep"),  # RecursionError inside ruamel
], ids=["comment-overlap", "deep-nesting"])
def test_whatever_the_yaml_library_raises_is_a_policy_error_with_its_line(text, line, fragment):
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, source="f.yaml")
    problem = caught.value.problems[0]
    assert fragment in problem.message
    if line is not None:
        assert problem.line == line and str(problem).startswith(f"f.yaml:{line}: not valid YAML")


def test_allow_private_lets_a_rule_s_names_resolve_privately():
    policy = parse_policy(HEADER + fqdn_rule("[intranet.corp.test], allow_private: true"))
    assert policy.rules[0].to.allow_private is True
    assert parse_policy(HEADER + fqdn_rule("[a.test]")).rules[0].to.allow_private is False


@pytest.mark.parametrize("reserved", ["admin-ssh", "apps-proxy", "admin-console", "keys-proxy", "tls-termination"])
def test_a_rule_may_not_take_the_name_of_a_rule_skyguard_adds(reserved):
    """The datapath adds these rules itself (skyguard/datapath/compile.py); a policy rule of the
    same name took over its rule id, so flows were attributed to the wrong rule."""
    text = (REPO / "policies" / "keysystems.yaml").read_text().replace("- name: directory-replication",
                                                                   f"- name: {reserved}", 1)
    with pytest.raises(PolicyError) as error:
        parse_policy(text)
    assert f"'{reserved}' is the name of a rule skyguard adds itself" in str(error.value)
