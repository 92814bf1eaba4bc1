"""Administrative access: the SSH access proxy (the one door into VMs) and session recording.

access.py decides who may reach which VM (no I/O); proxy.py is the asyncssh server that enforces
it and bridges to the VM; recording.py stores transcripts and metadata; decisionlog.py is the
interface to the signed log. This package is not the datapath rule that blocks direct SSH.
"""
