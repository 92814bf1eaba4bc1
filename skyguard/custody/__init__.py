"""Key custody: secrets and keys that skyguard holds so that VMs never do.

store.py is the sealed store every other part reads secrets from (the credential proxy, TLS
termination, the SSH access proxy's VM key). This package is not the credential-swap proxy.
"""

from skyguard.custody.store import Secret, SecretStore, validate_secret_name

__all__ = ["Secret", "SecretStore", "validate_secret_name"]
