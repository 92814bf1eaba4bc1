"""`skyguard ca`: the interception CA that VMs must trust for intercepted HTTPS. Thin over
skyguard.credproxy.ca; only the certificate is ever printed, never the key."""

from __future__ import annotations

from pathlib import Path

import click

from skyguard import config
from skyguard.cli.common import emit_json, json_option, state_dir_option
from skyguard.credproxy.ca import CertificateAuthority

CA_SUBDIR = "ca"


def ca_directory(state_dir: Path | None = None) -> Path:
    return Path(state_dir or config.STATE_DIR) / CA_SUBDIR


@click.group("ca")
def ca():
    """The skyguard CA that signs intercepted HTTPS for credential swaps.

    \b
    Examples:
      skyguard ca export > skyguard-ca.pem     then install it in each VM's trust store
      skyguard ca export --json                certificate, fingerprint and where it lives
    """


@ca.command("export")
@state_dir_option
@json_option
def export(state_dir, as_json):
    """Print the CA certificate (PEM), creating the CA on first use (key mode 0600).

    \b
    Example:
      skyguard ca export > /tmp/skyguard-ca.pem
      curl --cacert /tmp/skyguard-ca.pem https://api.github.test/    (inside a VM)
    """
    authority = CertificateAuthority(ca_directory(state_dir))
    pem = authority.certificate_pem.decode()
    if as_json:
        from cryptography.hazmat.primitives import hashes

        emit_json({
            "certificate": pem,
            "sha256_fingerprint": authority.certificate.fingerprint(hashes.SHA256()).hex(":"),
            "directory": str(authority.directory),
        })
    else:
        click.echo(pem, nl=False)
