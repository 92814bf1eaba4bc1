"""Graphical consoles (VNC; RDP drawn by FreeRDP into a private Xvnc, rdp.py) through skyguard:
operators never learn a VM's console password, reach only the targets their zones allow, and every
session is recorded and hashed into the signed log.

access.py decides who may open which target (no I/O); tickets.py holds the one-time passwords
that admit an operator; rfb.py is the protocol (no I/O); session.py relays one session and
recording.py stores and renders it; proxy.py is the daemon part that listens. Not here: the
policy section (skyguard/policy/console.py), the SSH door (skyguard/admin/).
"""
