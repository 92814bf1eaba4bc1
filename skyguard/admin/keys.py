"""The SSH keys skyguard holds for administrative access, kept in the sealed store.

- the VM key (`admin-ssh-vm-key`): what skyguard logs into every VM with. Only its public half
  leaves skyguard (`skyguard admin vm-key`), for the VMs' authorized_keys.
- the proxy host key (`admin-ssh-host-key`): what the proxy proves itself to operators with
  (`skyguard admin host-key` prints the line for their known_hosts).
Both are Ed25519 and generated on first use. Not the operators' keys (those are in the policy).
"""

from __future__ import annotations

import socket

import asyncssh

from skyguard.custody.store import SecretStore
from skyguard.errors import AdminError

VM_KEY_NAME = "admin-ssh-vm-key"
HOST_KEY_NAME = "admin-ssh-host-key"


def _load_or_generate(store: SecretStore, name: str, purpose: str) -> asyncssh.SSHKey:
    sealed = store.get_or_create(
        name, lambda: asyncssh.generate_private_key("ssh-ed25519").export_private_key(),
        metadata={"kind": "ssh-ed25519", "purpose": purpose},
    )
    try:
        key = asyncssh.import_private_key(sealed.reveal())
    except (asyncssh.KeyImportError, ValueError):
        # The message of KeyImportError may quote key material: never pass it on.
        raise AdminError(f"secret {name!r} is not an OpenSSH private key; remove it with "
                         f"`skyguard secret rm {name}` and a new one will be generated") from None
    key.set_comment(f"skyguard-{purpose}@{socket.gethostname()}")
    return key


def vm_key(store: SecretStore) -> asyncssh.SSHKey:
    return _load_or_generate(store, VM_KEY_NAME, "vm-access")


def proxy_host_key(store: SecretStore) -> asyncssh.SSHKey:
    return _load_or_generate(store, HOST_KEY_NAME, "ssh-proxy")


def public_line(key: asyncssh.SSHKey) -> str:
    return key.export_public_key("openssh").decode().strip()


def fingerprint(key: asyncssh.SSHKey) -> str:
    return key.get_fingerprint("sha256")
