"""Key custody: secrets and keys that skyguard holds so that VMs never do.

store.py is the sealed store every other part reads secrets from (the credential proxy, TLS
termination, the SSH access proxy's VM key); pemload.py loads PEM key material into TLS
contexts without touching the disk. A leaf: it imports no other part. TLS termination lives
with the proxy whose listeners and steering it shares (skyguard/credproxy/termination.py).
"""

from skyguard.custody.store import Secret, SecretStore, validate_secret_name

__all__ = ["Secret", "SecretStore", "validate_secret_name"]
