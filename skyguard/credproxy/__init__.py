"""Credential-swap proxy: the VM holds placeholders, skyguard puts the real secret on the wire.

swap.py decides (no I/O) and secretforms.py knows how a secret can be spelled; http1.py frames
HTTP/1.1 (sans-io); proxy.py is the proxy and client.py one VM connection; tlsaccept.py reads
the SNI before the TLS handshake and ca.py mints the interception certificates; upstream.py
holds the upstream connections and whom they trust; fairness.py keeps per-VM shares;
termination.py terminates TLS for the VMs' own services; steering.py points the VMs' traffic
at all this; service.py is the one part the daemon hosts. The sealed store itself is
skyguard/custody/store.py; this package only reads secrets through the SecretSource protocol in
interfaces.py.
"""
