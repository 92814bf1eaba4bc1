"""Load PEM certificates and private keys into an ssl.SSLContext without writing them to disk.

Python's ssl module only reads key material from paths; custody material must never land in a
file a VM-facing process (or a backup) could pick up, so it goes through an anonymous memfd
that exists only for the duration of the call. Not a key store (that is store.py).
"""

from __future__ import annotations

import os
import re
import ssl

from skyguard.errors import CredentialError


def load_cert_chain_from_memory(context: ssl.SSLContext, certificate_pem: bytes, key_pem: bytes) -> None:
    """context.load_cert_chain, from bytes. Raises CredentialError without echoing the PEM."""
    fd = os.memfd_create("skyguard-keypair", os.MFD_CLOEXEC)
    try:
        os.write(fd, certificate_pem.rstrip(b"\n") + b"\n" + key_pem)
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    except (ssl.SSLError, OSError) as error:
        raise CredentialError(
            "the certificate and key do not load (expect PEM: certificate chain then private key, "
            f"matching each other): {type(error).__name__}"
        ) from None
    finally:
        os.close(fd)


def split_pem(bundle: bytes) -> tuple[bytes, bytes]:
    """(certificate chain, private key) from one PEM bundle holding both, as the store keeps them."""
    certs: list[bytes] = []
    keys: list[bytes] = []
    for match in _PEM_BLOCK.finditer(bundle):
        (keys if b"PRIVATE KEY" in match.group(1) else certs).append(match.group(0))
    if not certs or len(keys) != 1:
        raise CredentialError("the PEM bundle needs certificates and exactly one private key")
    return b"\n".join(certs) + b"\n", keys[0] + b"\n"


_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----.*?-----END \1-----", re.S)
