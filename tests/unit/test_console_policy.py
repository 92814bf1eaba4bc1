"""admin.console (skyguard/policy/console.py): console targets and who may open them, parsed with
file:line problems; the credential is a name and is never echoed back."""

import pytest

from skyguard import config
from skyguard.policy.parse import parse_policy
from skyguard.policy.source import PolicyError

BASE = config.DEFAULT_POLICY.read_text()

GOOD = """
admin:
  console:
    listen: "0.0.0.0:5999"
    targets:
      - {name: dc1-desktop, workload: dc1, protocol: vnc, port: 5901, credential: dc1-vnc,
         clipboard: to_vm}
      - {name: dc2-rdp, workload: dc2, protocol: rdp, port: 3389, credential: dc2-rdp, recording: false}
    operators:
      - {name: alice, may_access: [directory]}
    groups:
      - {name: admins, may_access: "*"}
"""


def problems(text: str) -> str:
    with pytest.raises(PolicyError) as e:
        parse_policy(BASE + text)
    return str(e.value)


def test_targets_operators_and_groups_are_parsed():
    console = parse_policy(BASE + GOOD).admin_console
    assert console.listen == "0.0.0.0:5999"
    vnc = console.target("dc1-desktop")
    assert (vnc.workload, vnc.protocol, vnc.port, vnc.credential) == ("dc1", "vnc", 5901, "dc1-vnc")
    assert vnc.clipboard_to_vm and not vnc.clipboard_from_vm and vnc.recording
    rdp = console.target("dc2-rdp")
    assert rdp.clipboard == "none" and not rdp.recording
    assert console.zones_of("alice") == {"directory"}
    assert console.zones_of("bob") == set()
    assert "sandbox" in console.zones_of("bob", ("admins",))


def test_console_alone_without_ssh():
    policy = parse_policy(BASE + GOOD)
    assert policy.admin_ssh is None and policy.admin_console is not None




BAD = [
    ("protocol: vnc", "protocol: spice", "'spice' is not one of: vnc, rdp"),
    ("clipboard: to_vm", "clipboard: sideways", "'sideways' is not one of: none, to_vm, from_vm, both"),
    ("workload: dc1", "workload: dc9", "unknown workload 'dc9'"),
    ("port: 5901", "port: 70000", "70000 is out of range"),
    ("may_access: [directory]", "may_access: [dirctory]", "unknown zone 'dirctory'"),
    ('listen: "0.0.0.0:5999"', 'listen: "0.0.0.0"', "has no port"),
    ("name: dc2-rdp", "name: dc1-desktop", "already defined"),
    ("port: 3389", "port: 3389, colour: red", "admin.console.targets[1].colour: unknown key"),
    ('listen: "0.0.0.0:5999"', 'listen: "0.0.0.0:5999"\n    web_app: wiki', "needs web: ADDR:PORT"),
    ('listen: "0.0.0.0:5999"', 'listen: "0.0.0.0:5999"\n    web: "0.0.0.0:5999"', "the same address as listen"),
]


@pytest.mark.parametrize("old,new,message", BAD)
def test_bad_input_is_refused_with_a_reason(old, new, message):
    assert message in problems(GOOD.replace(old, new, 1))


def test_a_password_given_as_credential_is_refused_and_not_echoed():
    text = problems(GOOD.replace("credential: dc1-vnc", "credential: 'hunter2 secret!'", 1))
    assert "credential" in text and "hunter2" not in text


def test_the_same_vm_port_twice_is_refused():
    text = problems(GOOD.replace("workload: dc2, protocol: rdp, port: 3389",
                                 "workload: dc1, protocol: rdp, port: 5901", 1))
    assert "dc1 port 5901 is already the target" in text


def test_a_console_port_is_kept_for_the_host_and_denied_to_every_zone():
    """directory-replication lets dc2 reach dc1; with a console target on dc1:5901 only the host
    (skyguard's console proxy) may reach that port, so no VM bypasses the stored password."""
    from skyguard.datapath import abi
    from skyguard.datapath.compile import CONSOLE_RULE, compile_policy

    compiled = compile_policy(parse_policy(BASE + GOOD), host_addresses=["10.10.2.1"])
    directory, console_rule = compiled.zone_ids["directory"], compiled.rule_ids[CONSOLE_RULE]

    def identity(address):
        return compiled.ipcache[next(n for n in compiled.ipcache if str(n) == f"{address}/32")]

    def verdict(source, port):
        return [(e.verdict, e.rule_id) for e in compiled.policy
                if (e.direction, e.zone, e.identity, e.proto) ==
                (abi.DIR_INGRESS, directory, identity(source), abi.IPPROTO["tcp"])
                and e.port <= port < e.port + (1 << (16 - e.port_prefixlen))]

    assert verdict("10.10.2.1", 5901) == [(abi.POLICY_ALLOW, console_rule)]
    assert verdict("10.10.2.3", 5901) == [(abi.POLICY_DENY, console_rule)]
    assert verdict("10.10.1.2", 5901) == [(abi.POLICY_DENY, console_rule)]
    assert verdict("10.10.2.1", 5902) == []  # the host gets the target's port, nothing more


def test_status_counts_the_console_credentials_and_the_web_certificate_as_used(tmp_path):
    """`skyguard status` lists stored secrets no policy names (for `skyguard secret rm`): a console
    target's credential and the web console's certificate are named, so neither is listed as
    unused; one not stored is listed as missing. An app the web console does not use does not
    make its certificate the console's."""
    from skyguard.custody.store import SecretStore
    from skyguard.storenames import secrets_status

    listen = '    listen: "0.0.0.0:5999"\n'
    web = GOOD.replace(listen, listen + '    web: "0.0.0.0:5980"\n    web_app: wiki\n', 1)
    apps = """
identity:
  issuer: https://idp.test
  client_id: skyguard
  client_secret: idp-client-secret
apps:
  - {name: wiki, workload: vfw1, port: 443, host: wiki.apps.test, listen: "0.0.0.0:8443", certificate: wiki-tls,
     users: [alice]}
"""
    policy = parse_policy(BASE + apps + web)
    store = SecretStore(tmp_path / "state" / "secrets")
    for name in ("dc1-vnc", "wiki-tls", "left-over"):
        store.set(name, b"value")
    secrets = secrets_status(policy, tmp_path / "state" / "secrets")
    assert secrets["unused"] == ["left-over"]
    assert "dc2-rdp" in secrets["missing"] and "dc1-vnc" not in secrets["missing"]
    assert "idp-client-secret" in secrets["missing"]  # the apps part's own names count too
    policy = parse_policy(BASE + GOOD)  # no apps: a certificate only an app would use is unused
    assert "wiki-tls" in secrets_status(policy, tmp_path / "state" / "secrets")["unused"]
