"""The lab: network namespaces standing in for VMs, a lab `host` namespace where skyguard runs,
and a sealed `internet` namespace (DNS, HTTP/HTTPS echo, TCP/UDP echo). See ../shared/SPEC.md
section 5. Not part of enforcement: it only builds what skyguard attaches to and talks to.

Public API: `Lab` (skyguard.lab.lab), `addresses_for_name` (skyguard.lab.addressing).
"""

from skyguard.lab.addressing import addresses_for_name
from skyguard.lab.lab import Lab

__all__ = ["Lab", "addresses_for_name"]
