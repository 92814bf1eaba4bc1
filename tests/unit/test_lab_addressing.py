"""The deterministic name -> address mapping of the lab DNS server (pure, no privileges)."""

import ipaddress

import pytest

from skyguard.lab.addressing import addresses_for_name, is_test_name, owned_by_internet


def test_known_names_keep_their_addresses():
    # Pinned: demos, docs and other parts' tests may rely on these; a change must be deliberate.
    assert addresses_for_name("foo.test") == (ipaddress.ip_address("203.0.113.179"),
                                              ipaddress.ip_address("2001:db8:203:0:c777:c024:da59:9473"))
    assert str(addresses_for_name("api.github.test")[0]) == "203.0.113.195"


@pytest.mark.parametrize("variant", ["FOO.test", "foo.TEST.", " foo.test ", "Foo.Test."])
def test_case_and_trailing_dot_do_not_matter(variant):
    assert addresses_for_name(variant) == addresses_for_name("foo.test")


def test_every_answer_is_a_usable_host_in_the_name_ranges():
    v4_seen = set()
    for i in range(3000):
        v4, v6 = addresses_for_name(f"host{i}.example.test")
        assert v4 in ipaddress.ip_network("203.0.113.0/24")
        assert 1 <= int(v4) & 0xFF <= 254  # never the network or broadcast address
        assert v6 in ipaddress.ip_network("2001:db8:203::/64") and int(v6) & (2**64 - 1) != 0
        assert owned_by_internet(v4) and owned_by_internet(v6)
        v4_seen.add(v4)
    assert len(v4_seen) == 254  # the hash spreads names over the whole range


def test_different_names_get_different_ipv6_addresses():
    names = [f"n{i}.test" for i in range(2000)]
    assert len({addresses_for_name(n)[1] for n in names}) == len(names)


def test_default_policy_names_do_not_share_an_ipv4_address():
    names = ["deb.debian.test", "security.debian.test", "api.github.test", "pypi.sandbox.test",
             "files.pythonhosted.test"]
    assert len({addresses_for_name(n)[0] for n in names}) == len(names)


@pytest.mark.parametrize("name, expected", [("a.test", True), ("a.b.test.", True), ("test", False),
                                            (".test", False), ("a.example", False), ("atest", False)])
def test_only_names_strictly_under_test_are_test_names(name, expected):
    assert is_test_name(name) is expected
