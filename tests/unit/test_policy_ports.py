"""`ports:` items: every valid spelling parses to the right PortRange and prints back canonically;
everything else is refused with a ValueError (never another exception)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from skyguard.policy.model import PortRange
from skyguard.policy.parse import parse_port

valid_port = st.integers(min_value=1, max_value=65535)
any_int = st.integers(min_value=-10, max_value=200000)


@pytest.mark.parametrize("text,expected", [
    ("tcp/1", PortRange("tcp", 1, 1)),
    ("udp/65535", PortRange("udp", 65535, 65535)),
    ("tcp/1-65535", PortRange("tcp", 1, 65535)),
    ("tcp/80-80", PortRange("tcp", 80, 80)),
    ("TCP/443", PortRange("tcp", 443, 443)),
    ("icmp", PortRange("icmp")),
    ("ICMPv6", PortRange("icmpv6")),
])
def test_valid_ports(text, expected):
    assert parse_port(text) == expected


@pytest.mark.parametrize("value", ["tcp/0", "tcp/65536", "tcp/-1", "tcp/", "tcp/a", "tcp/1-", "tcp/-5",
                                   "tcp/5-4", "tcp/1-2-3", "tcp/ 80", "sctp/1", "tcp:80", "80", 80, True,
                                   None, 1.5, ["tcp/1"], "icmp/8", "tcp/123456", "udp/1-70000", ""])
def test_invalid_ports(value):
    with pytest.raises(ValueError):
        parse_port(value)


@given(st.sampled_from(["tcp", "udp"]), valid_port, valid_port)
def test_valid_ranges_parse_and_print_back(protocol, a, b):
    lo, hi = min(a, b), max(a, b)
    parsed = parse_port(f"{protocol}/{lo}-{hi}")
    assert (parsed.protocol, parsed.lo, parsed.hi) == (protocol, lo, hi)
    assert parse_port(str(parsed)) == parsed  # canonical text round-trips
    assert parse_port(f"{protocol.upper()}/{lo}") == PortRange(protocol, lo, lo)


@given(st.sampled_from(["tcp", "udp"]), any_int, any_int)
def test_out_of_range_or_reversed_is_refused(protocol, lo, hi):
    text = f"{protocol}/{lo}-{hi}"
    valid = 1 <= lo <= hi <= 65535
    try:
        parse_port(text)
    except ValueError:
        assert not valid
    else:
        assert valid


@given(st.one_of(st.text(max_size=20), st.integers(), st.none(), st.booleans(), st.floats()))
def test_anything_else_is_a_value_error_or_a_port(value):
    try:
        parsed = parse_port(value)
    except ValueError:
        return
    assert parsed.protocol in ("tcp", "udp", "icmp", "icmpv6")
    assert parsed.protocol.startswith("icmp") or 1 <= parsed.lo <= parsed.hi <= 65535
