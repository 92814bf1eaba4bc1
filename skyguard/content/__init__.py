"""File and content filtering: what a zone may upload (or download), decided by what the bytes
are, over HTTP(S) and SFTP.

- clamd.py: the INSTREAM client for a real clamd on a Unix socket.
- engines.py: libmagic (types by content), YARA, regex patterns: pure functions over a buffer.
- inspector.py: one Inspector per file, fed incrementally, that decides block or allow with the
  rule and reason; ContentEngine builds inspectors for a policy's `content:` rules.
- http.py: request and response bodies to files (content codings undone with bounded
  expansion, multipart/form-data split into its parts).
- record.py: the decision log entry and Prometheus counters of a decision.

Not here: the policy section (skyguard/policy/content.py), where the bytes flow (the credential
proxy, the SSH access proxy's SFTP filter in skyguard/admin/sftp.py).
"""
