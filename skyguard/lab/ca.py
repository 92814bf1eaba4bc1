"""The lab's certificate authority: a CA made once per lab and leaf certificates minted on demand
for any `.test` name (by SNI), so HTTPS in the lab verifies like the real thing. Tests and
benchmarks that run a server or an mTLS client outside a lab get their certificates here too
(`issue`, `certify`: any names, IP addresses, client auth).

This is test infrastructure for the sealed internet, not skyguard's own CA for intercepted TLS
(that lives in skyguard/custody and holds real keys). ECDSA P-256 keeps minting fast.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from skyguard import fsutil
from skyguard.errors import LabError
from skyguard.lab.addressing import is_test_name, normalize_name

# A host name we will put in a certificate and a file name: letters, digits, hyphens, dots.
_HOSTNAME = re.compile(r"^(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\.)+[a-z0-9-]{1,63}$")
# The name served when a client sends no SNI or a name outside `.test`.
DEFAULT_NAME = "lab.test"
LEAF_DAYS = 30


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _common_name(name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])


class LabCA:
    """Load the CA from `directory` or create it there; mint leaves into `directory`/leaves.

    Thread-safe: the HTTPS server mints from many connection threads.
    """

    def __init__(self, directory: Path, label: str = "default"):
        self.directory = Path(directory)
        self.cert_path = self.directory / "ca.pem"
        self.key_path = self.directory / "ca-key.pem"
        self.leaf_dir = self.directory / "leaves"
        self._lock = threading.Lock()
        self._leaf_key: Any = None  # the leaves' EC key, made or loaded on first use
        if self.cert_path.exists() and self.key_path.exists():
            self.cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
            self._key: Any = serialization.load_pem_private_key(self.key_path.read_bytes(), None)
        else:
            self._create(label)

    def _create(self, label: str) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "skyguard lab"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"skyguard lab CA ({label})"),
        ])
        ski = x509.SubjectKeyIdentifier.from_public_key(self._key.public_key())
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(days=1))
            .not_valid_after(_now() + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(self._key, hashes.SHA256())
        )
        fsutil.write_private(self.key_path, self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    @staticmethod
    def servable_name(sni: str | None) -> str:
        """The name whose certificate answers this SNI: itself for a valid `.test` host name,
        DEFAULT_NAME otherwise (the client's verification then fails, as it should)."""
        if sni:
            name = normalize_name(sni)
            if is_test_name(name) and _HOSTNAME.match(name):
                return name
        return DEFAULT_NAME

    def mint(self, name: str) -> x509.Certificate:
        """A fresh leaf for `name` (a valid host name), signed by the CA. No files written."""
        name = normalize_name(name)
        if not _HOSTNAME.match(name):
            raise LabError(f"cannot mint a certificate for {name!r}: not a valid host name")
        if self._leaf_key is None:
            # One key for every leaf: minting stays a signature, not a key generation.
            self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        return self._sign_leaf(self._leaf_key.public_key(), _common_name(name), [x509.DNSName(name)])

    def _sign_leaf(self, public_key: Any, subject: x509.Name, sans: list[x509.GeneralName],
                   client: bool = False) -> x509.Certificate:
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(hours=1))
            .not_valid_after(_now() + datetime.timedelta(days=LEAF_DAYS))
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return (
            builder
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                           critical=False)
            .sign(self._key, hashes.SHA256())
        )

    def certify(self, public_key: Any, names: Sequence[str] = (), *, subject: x509.Name | None = None,
                client: bool = False) -> bytes:
        """The PEM certificate of a key held elsewhere (a CSR's, a token's), signed by the CA:
        subject `subject` (default: common name names[0]), a SAN per name (an IP address or a DNS
        name; none when `names` is empty), for server auth or, with `client`, client auth.

        For servers and clients outside a lab (test upstreams, mTLS clients): the names are the
        caller's, not a client's SNI, so `.test` is not required."""
        if subject is None:
            if not names:
                raise LabError("a certificate needs a subject or at least one name")
            subject = _common_name(names[0])
        sans: list[x509.GeneralName] = []
        for name in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        return self._sign_leaf(public_key, subject, sans, client).public_bytes(serialization.Encoding.PEM)

    def issue(self, names: Sequence[str], *, client: bool = False) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM) with a fresh key of its own: see certify()."""
        key = ec.generate_private_key(ec.SECP256R1())
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return self.certify(key.public_key(), names, client=client), key_pem

    def leaf_files(self, name: str) -> tuple[Path, Path]:
        """(chain PEM, key PEM) for `name`, minted on first use. Python's ssl loads only files."""
        name = normalize_name(name)
        with self._lock:
            chain = self.leaf_dir / f"{name}.pem"
            key = self.leaf_dir / "leaf-key.pem"
            if self._leaf_key is None and key.exists():
                self._leaf_key = serialization.load_pem_private_key(key.read_bytes(), None)
            if chain.exists() and self._leaf_key is not None:
                return chain, key
            self.leaf_dir.mkdir(parents=True, exist_ok=True)
            leaf = self.mint(name)
            if not key.exists():
                fsutil.write_private(key, self._leaf_key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption()))
            chain.write_bytes(leaf.public_bytes(serialization.Encoding.PEM)
                              + self.cert.public_bytes(serialization.Encoding.PEM))
            return chain, key


def running_lab_ca() -> Path | None:
    """The CA certificate of the lab whose `host` namespace this process runs in, or None outside
    a lab. The daemon trusts it for upstream TLS, so credential swap works in the lab as the README
    shows it, with no --upstream-ca. A namespace is the lab's host when its inode is that of
    /run/netns/<prefix>host and that lab's folder holds a CA (nothing else is trusted that way)."""
    import os

    from skyguard import config
    from skyguard.lab.topology import LAB_NAMES

    host = LAB_NAMES[0]
    try:
        here = os.stat("/proc/self/ns/net").st_ino
        names = os.listdir("/run/netns")
    except OSError:
        return None
    for name in names:
        if not name.endswith(host):
            continue
        try:
            if os.stat(f"/run/netns/{name}").st_ino != here:
                continue
        except OSError:
            continue
        ca = config.LAB_DIR / (name[:-len(host)] or "default") / "ca" / "ca.pem"
        return ca if ca.is_file() else None
    return None
