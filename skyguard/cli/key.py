"""`skyguard key`: keys held in a PKCS#11 token (or sealed in the store), used by VMs only through
the crypto proxy. Thin commands over skyguard.keys; each change is an entry in the signed log.

Where keys live comes from the policy's `keys:` section: the running daemon's policy, or the file
given with --policy. No command prints or exports a private key.
"""

from __future__ import annotations

from pathlib import Path

import click

from skyguard import config
from skyguard.cli.common import emit_json, json_option, state_dir_option
from skyguard.errors import BadInput
from skyguard.keys.types import KEY_TYPES

policy_option = click.option(
    "--policy", "policy_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
    help="Read the `keys:` section from this policy [default: the running daemon's policy].")


def _keys_config(policy_file: Path | None, state_dir: Path | None):
    from skyguard import control
    from skyguard.policy.parse import load_policy

    if policy_file is not None:
        policy = load_policy(policy_file)
    elif control.daemon_running():
        policy = control.running_policy(state_dir)
    else:
        raise BadInput("no skyguard daemon is running to say where keys live; give --policy FILE "
                       "(its `keys:` section names the backend)")
    if policy.keys is None:
        raise BadInput(f"policy {policy.name!r} has no `keys:` section; add one (backend: pkcs11, tpm or file)")
    return policy.keys


def _open(policy_file, state_dir):
    from skyguard.keys.backends import open_backend

    state = state_dir or config.STATE_DIR
    return open_backend(_keys_config(policy_file, state_dir), state), state


@click.group("key")
def key():
    """Keys in a PKCS#11 token (SoftHSM or hardware) that VMs use through the crypto proxy.

    \b
    Examples:
      skyguard key create release --type ec-p256
      skyguard key list --json
      skyguard key public release > release.pub.pem
      skyguard key rm release
      skyguard key csr github-mtls --subject sdnctl1 > req.pem    # signed inside the token
      skyguard key cert github-mtls --file issued.pem             # for credentials[].client_certificate
    """


@key.command("create")
@click.argument("name")
@click.option("--type", "key_type", type=click.Choice(KEY_TYPES), required=True,
              help="The key's algorithm: ECDSA P-256, Ed25519 or RSA 3072 (RSA also decrypts).")
@policy_option
@json_option
@state_dir_option
def create_command(name, key_type, policy_file, as_json, state_dir):
    """Generate the key NAME inside the token (non-extractable, sensitive).

    \b
    Examples:
      skyguard key create release --type ed25519
      skyguard key create wrap --type rsa-3072 --policy site.yaml
    """
    from skyguard.keys.record import record_key_event

    backend, state = _open(policy_file, state_dir)
    try:
        info = backend.create(name, key_type)
    finally:
        backend.close()
    record_key_event(state, "key_create", name=info.name, key_type=info.type, backend=info.backend,
                     extractable=info.extractable)
    if as_json:
        emit_json(info.as_dict())
    else:
        click.echo(f"created {info.name} ({info.type}) in the {info.backend} backend", err=True)


@key.command("list")
@policy_option
@json_option
@state_dir_option
def list_command(policy_file, as_json, state_dir):
    """List the keys: name, type, backend, whether the token would let the key out."""
    backend, _ = _open(policy_file, state_dir)
    try:
        keys = backend.list()
    finally:
        backend.close()
    if as_json:
        emit_json([k.as_dict() for k in keys])
        return
    if not keys:
        click.echo("no keys (create one with `skyguard key create NAME --type ec-p256`)", err=True)
        return
    width = max(len(k.name) for k in keys)
    click.echo(f"{'NAME':<{width}}  {'TYPE':<9}  {'BACKEND':<7}  EXTRACTABLE")
    for k in keys:
        click.echo(f"{k.name:<{width}}  {k.type:<9}  {k.backend:<7}  {'yes' if k.extractable else 'no'}")


@key.command("public")
@click.argument("name")
@policy_option
@state_dir_option
def public_command(name, policy_file, state_dir):
    """Print the public key of NAME as PEM (SubjectPublicKeyInfo), for `openssl` and verifiers.

    \b
    Example:
      skyguard key public release > release.pem
      openssl pkeyutl -verify -pubin -inkey release.pem -in digest.bin -sigfile sig.der
    """
    backend, _ = _open(policy_file, state_dir)
    try:
        pem = backend.public_pem(name)
    finally:
        backend.close()
    click.echo(pem.decode(), nl=False)


@key.command("rm")
@click.argument("name")
@policy_option
@state_dir_option
def rm_command(name, policy_file, state_dir):
    """Destroy the key NAME in the token (its public half too). This cannot be undone."""
    from skyguard.keys.record import record_key_event

    backend, state = _open(policy_file, state_dir)
    try:
        kind = backend.name
        backend.remove(name)
    finally:
        backend.close()
    record_key_event(state, "key_remove", name=name, backend=kind)
    click.echo(f"removed {name}", err=True)


@key.command("csr")
@click.argument("name")
@click.option("--subject", required=True, help="The common name (CN) to ask for.")
@policy_option
@state_dir_option
def csr_command(name, subject, policy_file, state_dir):
    """Print a certificate request (PKCS#10 PEM) for key NAME, signed inside the token.

    A CA issues the certificate; store it with `skyguard key cert NAME --file CERT.pem` so the
    credential proxy can present it (credentials[].client_certificate: NAME) or TLS termination
    can serve it (tls_termination[].certificate: NAME). ec-p256 and rsa-3072 keys only.
    """
    from skyguard.keys.tlskey import certificate_request

    if not subject or len(subject) > 64:
        raise BadInput("--subject is a common name of 1-64 characters")
    backend, _ = _open(policy_file, state_dir)
    try:
        click.echo(certificate_request(backend, name, subject).decode(), nl=False)
    finally:
        backend.close()


@key.command("cert")
@click.argument("name")
@click.option("--file", "cert_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="The certificate (chain, PEM) issued for the key's request.")
@policy_option
@state_dir_option
def cert_command(name, cert_file, policy_file, state_dir):
    """Store the certificate of key NAME (checked against the key) for TLS: outbound mTLS and
    TLS termination. It is kept in the sealed store as `cert.NAME`."""
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from skyguard.keys.backends import secret_store
    from skyguard.keys.record import record_key_event
    from skyguard.keys.tlskey import CERT_PREFIX

    data = cert_file.read_bytes()
    try:
        leaf = x509.load_pem_x509_certificates(data)[0]
    except ValueError:
        raise BadInput(f"{cert_file} is not a PEM certificate (chain)") from None
    if b"PRIVATE KEY" in data:
        raise BadInput(f"{cert_file} holds a private key; give the certificate (chain) alone")
    backend, state = _open(policy_file, state_dir)
    try:
        public, kind = backend.public_pem(name), backend.name
    finally:
        backend.close()
    spki = PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(Encoding.PEM, spki) != public:
        raise BadInput(f"the certificate in {cert_file} is not for key {name!r} (its public key differs)")
    secret_store(state).set(CERT_PREFIX + name, data, {"kind": "skyguard-key-certificate"})
    record_key_event(state, "key_certificate", name=name, backend=kind, sha256=hashlib.sha256(data).hexdigest())
    click.echo(f"stored the certificate of {name} (subject {leaf.subject.rfc4514_string()})", err=True)
