"""The policy generator of the lifecycle tests (tests/policygen.py) against the one parser, without
privileges: what it calls valid parses (and the lab could build), its invalidating mutations are
refused with a file:line problem, and `skyguard policy validate` says exactly what the parser says.
If the generator drifted from the parser, the lifecycle tests would test the generator instead of
skyguard.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: policygen

import policygen  # noqa: E402

from skyguard.cli.main import cli  # noqa: E402
from skyguard.errors import PolicyError, SkyguardError  # noqa: E402
from skyguard.lab.topology import read_workloads  # noqa: E402
from skyguard.policy.parse import parse_policy  # noqa: E402

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def documents(draw):
    topology = draw(policygen.topologies())
    return topology, draw(policygen.policies(topology))


def _validate(path: Path) -> tuple[int, dict]:
    """`skyguard policy validate FILE --json` in-process: (exit code as main() sets it, JSON)."""
    result = CliRunner().invoke(cli, ["policy", "validate", str(path), "--json"], standalone_mode=False)
    code = result.exception.exit_code if isinstance(result.exception, SkyguardError) else result.exit_code
    if result.exception is not None and not isinstance(result.exception, SkyguardError):
        raise result.exception
    return code, json.loads(result.stdout)


@FAST
@given(documents())
def test_generated_policies_parse_and_keep_their_vms(tmp_path_factory, generated):
    topology, doc = generated
    text = policygen.to_yaml(doc)
    policy = parse_policy(text)
    by_name = {w.name: w for w in policy.workloads()}
    for vm in topology:
        w = by_name[vm.name]
        assert (w.interface, w.mac, [str(a) for a in w.addresses]) == \
            (vm.interface, vm.mac.lower().replace("-", ":"), list(vm.addresses))
    # the lab can build it (its own reserved names and ranges are avoided)
    path = tmp_path_factory.mktemp("gen") / "p.yaml"
    path.write_text(text)
    assert {w.name for w in read_workloads(path)} >= {vm.name for vm in topology}


@FAST
@given(documents(), st.data())
def test_invalidating_mutations_are_refused_with_a_line(generated, data):
    _, doc = generated
    name, text = data.draw(policygen.mutants(doc, maybe_valid=False))
    with pytest.raises(PolicyError) as refused:
        parse_policy(text, source="m.yaml")
    assert refused.value.problems, name
    assert all(p.file == "m.yaml" for p in refused.value.problems)
    assert any(p.line for p in refused.value.problems), (name, [str(p) for p in refused.value.problems])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents(), st.data())
def test_validate_says_what_the_parser_says(tmp_path_factory, generated, data):
    _, doc = generated
    name, text = data.draw(policygen.mutants(doc))
    path = tmp_path_factory.mktemp("mut") / "p.yaml"
    path.write_text(text)
    try:
        parse_policy(text, source=str(path))
        parsed_ok = True
    except PolicyError:
        parsed_ok = False
    code, out = _validate(path)
    assert (code == 0) == parsed_ok == out["valid"], (name, code, out)
    if not parsed_ok:
        assert code == 2 and out["problems"], out


def test_dns_names_instantiate_every_pattern_kind():
    doc = {"rules": [{"to": {"fqdns": ["**.A.test.", "*.b.test", "c.test"]}}]}
    names = policygen.dns_names(doc)
    assert {"a.a.test", "b.c.a.test", "w.b.test", "x.y.b.test", "c.test", "nobody-names-this.test"} <= set(names)


def _rules(d):
    return d[1].get("rules") or []


def _ports(d):
    return [p for r in _rules(d) for p in r.get("ports", [])]


def _fqdns(d):
    return [f for r in _rules(d) for f in r["to"].get("fqdns", [])]


# What issue 14 asks the generator to reach; each must show up in generated policies.
FEATURES = {
    "several zones": lambda d: len(d[1]["zones"]) >= 3,
    "several workloads": lambda d: len(d[0]) >= 3,
    "IPv4 and IPv6": lambda d: any(":" in a for vm in d[0] for a in vm.addresses)
    and any("." in a for vm in d[0] for a in vm.addresses),
    "IPv6 only": lambda d: any(all(":" in a for a in vm.addresses) for vm in d[0]),
    "to zones": lambda d: any("zones" in r["to"] for r in _rules(d)),
    "to networks": lambda d: any("networks" in r["to"] for r in _rules(d)),
    "to cidrs": lambda d: any("cidrs" in r["to"] for r in _rules(d)),
    "*. pattern": lambda d: any(f.startswith("*.") for f in _fqdns(d)),
    "**. pattern": lambda d: any(f.startswith("**.") for f in _fqdns(d)),
    "single port": lambda d: any("-" not in p and "/" in p for p in _ports(d)),
    "port range": lambda d: any("-" in p for p in _ports(d)),
    "icmp": lambda d: any(p.lower().startswith("icmp") for p in _ports(d)),
    "every port": lambda d: any("ports" not in r for r in _rules(d)),
    "deny rule": lambda d: any(r.get("action") == "deny" for r in _rules(d)),
    "from *": lambda d: any(r["from"] == "*" for r in _rules(d)),
    "no dns section": lambda d: "dns" not in d[1],
    "dns section": lambda d: "upstreams" in (d[1].get("dns") or {}),
    "credentials": lambda d: bool(d[1].get("credentials")),
    "tls_termination": lambda d: bool(d[1].get("tls_termination")),
    "admin": lambda d: "admin" in d[1],
    "phantom workload": lambda d: len([w for z in d[1]["zones"].values() for w in z["workloads"]]) > len(d[0]),
}


def test_the_generator_reaches_every_feature_issue_14_names():
    from hypothesis import find
    from hypothesis.errors import NoSuchExample

    seen: set[str] = set()

    def covers_all(generated) -> bool:
        seen.update(name for name, has in FEATURES.items() if name not in seen and has(generated))
        return len(seen) == len(FEATURES)

    try:
        find(documents(), covers_all, settings=settings(max_examples=3000, database=None, deadline=None,
                                                        phases=[Phase.generate],
                                                        suppress_health_check=list(HealthCheck)))
    except NoSuchExample:
        pytest.fail(f"never generated: {sorted(set(FEATURES) - seen)}")
