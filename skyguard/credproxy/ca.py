"""skyguard's interception CA: created on first use under the state directory, and the leaf
certificates it mints for each name a VM connects to (cached in memory, as ready SSL contexts).

VMs trust this CA (`skyguard ca export`) so the proxy can read their HTTPS requests to the
credentials' destinations. Not used for anything else: upstream verification uses the system
or a configured bundle, and terminated services use certificates from the store.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import threading
from collections import OrderedDict
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from skyguard import fsutil
from skyguard.custody.pemload import load_cert_chain_from_memory
from skyguard.errors import CredentialError

CA_KEY_FILE = "ca-key.pem"
CA_CERT_FILE = "ca-cert.pem"
CA_VALIDITY = datetime.timedelta(days=3650)
LEAF_VALIDITY = datetime.timedelta(days=30)
LEAF_CACHE_SIZE = 1024  # names; the set is small (credential destinations), this bounds abuse


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class CertificateAuthority:
    """The CA in `directory` (created 0700, files 0600 on first use)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._lock = threading.Lock()
        self._contexts: OrderedDict[str, ssl.SSLContext] = OrderedDict()
        self._key, self.certificate = self._load_or_create()
        # One key for every leaf: minting is then a signature, not a key generation.
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        self._leaf_key_pem = self._leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def __repr__(self) -> str:
        return f"CertificateAuthority({str(self.directory)!r})"

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def _load_or_create(self):
        key_path = self.directory / CA_KEY_FILE
        cert_path = self.directory / CA_CERT_FILE
        if key_path.exists() != cert_path.exists():
            raise CredentialError(
                f"the CA in {self.directory} is incomplete (one of {CA_KEY_FILE}, {CA_CERT_FILE} is "
                "missing); remove both to have a new CA created (VMs must then trust the new one)"
            )
        if key_path.exists() and cert_path.exists():
            try:
                # regular files only: a FIFO put there is refused, never waited on (the part would hang)
                key = serialization.load_pem_private_key(fsutil.read_regular_file(key_path), password=None)
                cert = x509.load_pem_x509_certificate(fsutil.read_regular_file(cert_path))
            except (ValueError, OSError) as error:
                reason = error.strerror if isinstance(error, OSError) and error.strerror else type(error).__name__
                raise CredentialError(
                    f"the CA in {self.directory} is unreadable ({reason}); "
                    "move it away to have a new one created (VMs must then trust the new one)"
                ) from None
            return key, cert
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(self.directory, 0o700)
        except OSError as error:
            raise CredentialError(f"cannot create the CA directory {self.directory}: {error.strerror}") from None
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "skyguard"),
            x509.NameAttribute(NameOID.COMMON_NAME, "skyguard interception CA"),
        ])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(hours=1))
            .not_valid_after(_now() + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                              content_commitment=False, key_encipherment=False, data_encipherment=False,
                              key_agreement=False, encipher_only=False, decipher_only=False),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        # Written under temporary names and renamed cert-last, so a concurrent reader sees either
        # no CA or a whole one; if another process won the race, use its CA.
        suffix = f".tmp-{os.getpid()}"
        fsutil.create_private(key_path.with_name(CA_KEY_FILE + suffix), key_pem)
        fsutil.create_private(cert_path.with_name(CA_CERT_FILE + suffix), cert.public_bytes(serialization.Encoding.PEM))
        if key_path.exists() or cert_path.exists():
            for name in (CA_KEY_FILE, CA_CERT_FILE):
                (self.directory / (name + suffix)).unlink(missing_ok=True)
            return self._load_or_create() if key_path.exists() and cert_path.exists() else (key, cert)
        os.replace(key_path.with_name(CA_KEY_FILE + suffix), key_path)
        os.replace(cert_path.with_name(CA_CERT_FILE + suffix), cert_path)
        return key, cert

    def mint(self, name: str) -> bytes:
        """A leaf certificate (PEM) for one DNS name or IP address, signed by this CA."""
        try:
            san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            san = x509.DNSName(name)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64])]))
            .issuer_name(self.certificate.subject)
            .public_key(self._leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(hours=1))
            .not_valid_after(_now() + LEAF_VALIDITY)
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM)

    def cached_context(self, name: str) -> ssl.SSLContext | None:
        """The server context for `name` if one is cached (no minting), else None."""
        with self._lock:
            context = self._contexts.get(name)
            if context is not None:
                self._contexts.move_to_end(name)
            return context

    def server_context(self, name: str) -> ssl.SSLContext:
        """A ready server-side context presenting a leaf for `name` (cached, LRU-bounded).
        Minting costs a signature: the proxy calls this from a worker thread."""
        context = self.cached_context(name)
        if context is not None:
            return context
        context = new_server_context()
        load_cert_chain_from_memory(context, self.mint(name) + self.certificate_pem, self._leaf_key_pem)
        context.skyguard_name = name  # type: ignore[attr-defined]  # read back by the proxy: the SNI this handshake presented

        def same_name(_ssl_object, server_name, _context):
            # The proxy chose this context from the SNI it read itself (tlsaccept.py); OpenSSL's
            # own reading of the same ClientHello must agree, or the handshake is refused.
            if (server_name or "").lower().rstrip(".") != name:
                return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
            return None

        context.sni_callback = same_name
        with self._lock:
            self._contexts[name] = context
            while len(self._contexts) > LEAF_CACHE_SIZE:
                self._contexts.popitem(last=False)
        return context


def new_server_context() -> ssl.SSLContext:
    """Server-side TLS settings shared by interception and termination: TLS 1.2+, HTTP/1.1 only
    (an h2 stream could not be inspected, so it is never negotiated)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    return context


