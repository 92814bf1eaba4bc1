"""The lab CA: created once, reloaded from disk, leaves minted per name that verify for that name."""

import datetime

import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from skyguard.errors import LabError
from skyguard.lab.ca import DEFAULT_NAME, LabCA


@pytest.fixture
def ca(tmp_path):
    return LabCA(tmp_path / "ca", label="unit")


def _verify(ca, chain_pem: bytes, name: str):
    certs = x509.load_pem_x509_certificates(chain_pem)
    verifier = (PolicyBuilder().store(Store([ca.cert]))
                .time(datetime.datetime.now(datetime.UTC))
                .build_server_verifier(x509.DNSName(name)))
    return verifier.verify(certs[0], certs[1:])


def test_ca_is_a_ca_and_its_key_is_private(ca):
    constraints = ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca is True
    assert (ca.key_path.stat().st_mode & 0o777) == 0o600


def test_ca_is_reloaded_not_recreated(ca, tmp_path):
    again = LabCA(tmp_path / "ca")
    assert again.cert == ca.cert


def test_leaf_for_a_name_verifies_for_that_name_only(ca):
    chain, key = ca.leaf_files("Api.GitHub.test.")
    assert chain.name == "api.github.test.pem" and (key.stat().st_mode & 0o777) == 0o600
    _verify(ca, chain.read_bytes(), "api.github.test")
    with pytest.raises(VerificationError):
        _verify(ca, chain.read_bytes(), "evil.test")


def test_a_leaf_from_another_ca_does_not_verify(ca, tmp_path):
    other = LabCA(tmp_path / "other")
    chain, _ = other.leaf_files("foo.test")
    with pytest.raises(VerificationError):
        _verify(ca, chain.read_bytes(), "foo.test")


def test_leaves_minted_after_a_reload_share_the_key_file(ca, tmp_path):
    first_chain, key = ca.leaf_files("a.test")
    key_bytes = key.read_bytes()
    reloaded = LabCA(tmp_path / "ca")
    second_chain, key2 = reloaded.leaf_files("b.test")
    assert key2.read_bytes() == key_bytes
    from cryptography.hazmat.primitives import serialization
    leaf_key = serialization.load_pem_private_key(key_bytes, None)
    for chain in (first_chain, second_chain):
        cert = x509.load_pem_x509_certificates(chain.read_bytes())[0]
        assert cert.public_key() == leaf_key.public_key()


@pytest.mark.parametrize("sni, expected", [("foo.test", "foo.test"), ("FOO.test.", "foo.test"),
                                           (None, DEFAULT_NAME), ("example.com", DEFAULT_NAME),
                                           ("../../etc.test", DEFAULT_NAME), ("a b.test", DEFAULT_NAME)])
def test_servable_name_only_accepts_clean_test_host_names(sni, expected):
    assert LabCA.servable_name(sni) == expected


@pytest.mark.parametrize("bad", ["", "a/b.test", "x" * 300 + ".test", "a..test"])
def test_minting_refuses_bad_names(ca, bad):
    with pytest.raises(LabError):
        ca.mint(bad)
