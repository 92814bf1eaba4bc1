"""Credential-swap proxy: the VM holds placeholders, skyguard puts the real secret on the wire.

swap.py decides (no I/O), secretforms.py knows how a secret can be spelled, ca.py mints the
interception certificates, proxy.py moves bytes, steering.py points the VMs' traffic at it.
The sealed store itself is skyguard/custody/store.py; this package only reads secrets through
the SecretSource protocol in interfaces.py.
"""
