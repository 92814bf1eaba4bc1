"""Who may reach which VM (access.py) and the brute-force brake (ratelimit.py): the SSH access
proxy's decisions, without sockets."""

from ipaddress import ip_address

import pytest

from skyguard.admin import access
from skyguard.admin.ratelimit import AuthFailureLimiter
from skyguard.conncap import RefusalBrake, UnauthenticatedConnections, source_of
from skyguard.errors import BadInput
from skyguard.policy.model import AdminSsh, Policy, SshOperator, Workload, Zone


def workload(name, zone, *addresses):
    return Workload(name, zone, f"sg-{name}", "02:00:00:00:00:01", tuple(ip_address(a) for a in addresses))


POLICY = Policy(
    name="t",
    zones={
        "auth": Zone("auth", (workload("radius1", "auth", "fd00::2", "10.0.1.2"),)),
        "directory": Zone("directory", (workload("dc1", "directory", "10.0.2.2"),)),
        "empty": Zone("empty", (workload("bare", "empty"),)),
    },
    networks={}, rules=(),
    admin_ssh=AdminSsh(operators=(SshOperator("alice", "ssh-ed25519 AAAA", ("directory", "empty")),
                                  SshOperator("nobody", "ssh-ed25519 BBBB", ()))),
)
ALICE = access.find_operator(POLICY.admin_ssh, "alice")


@pytest.mark.parametrize("username,expected", [
    ("alice+dc1", access.Login("alice", "dc1")),
    ("alice", access.Login("alice", None)),
    ("bob.smith+web-1.prod", access.Login("bob.smith", "web-1.prod")),
])
def test_parse_login(username, expected):
    assert access.parse_login(username) == expected


@pytest.mark.parametrize("username", ["", "+dc1", "alice+", "alice+dc1+x", "al ice+dc1", "alice+../x",
                                      "alice+dc1\n", "a" * 65 + "+dc1", "alice+-dc1"])
def test_parse_login_rejects_odd_names(username):
    with pytest.raises(BadInput, match="OPERATOR\\+WORKLOAD"):
        access.parse_login(username)


@pytest.mark.parametrize("operator,target,reason,shown", [
    ("alice", "radius1", "not_allowed", "zone auth is not in their may_access"),
    ("alice", "nosuch", "unknown_workload", "no workload named 'nosuch'"),
    ("alice", None, "no_target", "alice+WORKLOAD"),
    ("nobody", "dc1", "not_allowed", "you may reach no workload"),
])
def test_authorize_refusals_say_why_and_what_is_allowed(operator, target, reason, shown):
    op = access.find_operator(POLICY.admin_ssh, operator)
    with pytest.raises(access.AccessRefused) as refused:
        access.authorize(POLICY, op, access.Login(operator, target))
    assert refused.value.reason == reason and shown in str(refused.value)
    if operator == "alice":
        assert "dc1" in str(refused.value)


def test_authorize_allows_zones_in_may_access():
    assert access.authorize(POLICY, ALICE, access.Login("alice", "dc1")).name == "dc1"


def test_workload_address_prefers_ipv4_and_requires_one():
    assert access.workload_address(POLICY.workload("radius1")) == "10.0.1.2"
    with pytest.raises(access.AccessRefused, match="no address"):
        access.workload_address(POLICY.workload("bare"))


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_limiter_blocks_after_failures_in_window_and_releases_later():
    clock = Clock()
    limiter = AuthFailureLimiter(max_failures=3, window=60, block_for=300, clock=clock)
    assert not limiter.failure("192.0.2.1")
    clock.now += 61  # the first failure leaves the window
    assert not limiter.failure("192.0.2.1")
    assert not limiter.failure("192.0.2.1")
    assert limiter.failure("192.0.2.1")
    assert limiter.is_blocked("192.0.2.1") and not limiter.is_blocked("192.0.2.2")
    clock.now += 301
    assert not limiter.is_blocked("192.0.2.1")


def test_limiter_success_forgets_and_memory_is_bounded():
    clock = Clock()
    limiter = AuthFailureLimiter(max_failures=2, window=60, block_for=300, max_tracked=100, clock=clock)
    limiter.failure("192.0.2.1")
    limiter.success("192.0.2.1")
    assert not limiter.failure("192.0.2.1")
    for i in range(1000):
        limiter.failure(f"198.51.100.{i % 256}-{i}")
    assert len(limiter._failures) <= 100


def test_unauthenticated_connections_capped_per_source_and_in_all_and_refusals_summarised():
    pending = UnauthenticatedConnections(per_source=2, total=3)
    assert pending.admit("192.0.2.1") is None and pending.admit("192.0.2.1") is None
    assert pending.admit("192.0.2.1") == "source"
    assert pending.admit("192.0.2.2") is None and pending.admit("192.0.2.3") == "total"
    pending.release("192.0.2.1")
    assert pending.admit("192.0.2.3") is None and pending.count() == 3
    assert [pending.refusals.to_log("192.0.2.9", t) for t in (0.0, 0.2, 0.5, 1.1)] == [1, 0, 0, 3]


def test_an_ipv6_64_is_one_source_and_an_ipv4_mapped_address_is_its_ipv4_address():
    """A host owns its /64: counted per address, it got a fresh share from each of its
    addresses. An IPv4 client on a dual-stack listener (::ffff:a.b.c.d) is its IPv4 address."""
    assert source_of("2001:db8:1:2:aaaa::1") == source_of("2001:db8:1:2::ffff") == "2001:db8:1:2::/64"
    assert source_of("2001:db8:1:3::1") == "2001:db8:1:3::/64"
    assert source_of("::ffff:192.0.2.7") == source_of("192.0.2.7") == "192.0.2.7"
    assert source_of("?") == "?"
    pending = UnauthenticatedConnections(per_source=2, total=10)
    assert pending.admit("2001:db8::1") is None and pending.admit("2001:db8::2") is None
    assert pending.admit("2001:db8::3") == "source" and pending.held("2001:db8::99") == 2
    assert pending.admit("2001:db8:0:1::1") is None  # the next /64: another host
    assert pending.admit("::ffff:192.0.2.7") is None and pending.admit("192.0.2.7") is None
    assert pending.admit("::ffff:192.0.2.7") == "source"
    pending.release("2001:db8::2")  # any address of the /64 counts it out
    assert pending.admit("2001:db8::4") is None
    assert [pending.refusals.to_log(f"2001:db8::{n}", 0.0) for n in range(5)] == [1, 0, 0, 0, 0]


def test_the_signed_logs_brake_lets_a_burst_through_then_one_summary_a_second_per_source_and_kind():
    brake = RefusalBrake(burst=3, per_second=1.0, max_tracked=8)
    kind = ("wiki", "host_mismatch")
    # Two addresses of one IPv6 /64 are one source: their refusals share the burst.
    got = [brake.refused(f"2001:db8::{i}", kind, 100.0) for i in range(6)]
    assert got == [True, True, True, False, False, False]
    assert brake.refused("2001:db8:1::1", kind, 100.0)  # another /64
    assert brake.refused("2001:db8::1", ("wiki", "state_mismatch"), 100.0)  # another kind
    assert brake.wait("2001:db8::9", kind, 100.0) == 1.0
    assert brake.held("2001:db8::9", kind, 101.0) == 3  # one summary entry for the three held
    assert brake.held("2001:db8::9", kind, 101.0) == 0
    assert not brake.refused("2001:db8::1", kind, 101.5)  # the summary spent the second's entry
    for n in range(100):  # many sources: the table stays bounded, no held count is dropped
        brake.refused(f"10.0.0.{n}", kind, 200.0)
    assert len(brake.kinds) <= 9
    assert brake.held("2001:db8::1", kind, 300.0) == 1
