"""The policy as typed, validated, immutable values: what every other part consumes.

This module only defines shapes. Parsing YAML into them (with file:line errors) is parse.py's
job; turning them into BPF map entries is the datapath compiler's. Names here follow
../shared/SPEC.md section 3.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from skyguard.policy.content import ContentPolicy

if TYPE_CHECKING:
    from skyguard.policy.console import AdminConsole

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

Protocol = Literal["tcp", "udp", "icmp", "icmpv6"]
Action = Literal["allow", "deny"]

ALL_ZONES = "*"

# The rules skyguard adds itself (skyguard/datapath/compile.py) so its own proxies reach VMs and
# keep their ports; a policy rule may not take one of these names (flows would be misattributed).
ADMIN_SSH_RULE = "admin-ssh"  # skyguard's SSH access proxy -> tcp/22 of the zones operators may access
APPS_RULE = "apps-proxy"  # an app's port is the identity-aware proxy's alone
CONSOLE_RULE = "admin-console"  # a console target's VNC/RDP port is the console proxy's alone
KEYS_RULE = "keys-proxy"  # the zones a key names -> the crypto proxy on the gateway addresses
TLS_TERMINATION_RULE = "tls-termination"  # skyguard's TLS terminator -> a terminated VM's forward_to port
SYNTHETIC_RULES = (ADMIN_SSH_RULE, APPS_RULE, CONSOLE_RULE, KEYS_RULE, TLS_TERMINATION_RULE)

if TYPE_CHECKING:  # the keys section's shapes live with its checker (keys.py imports this module)
    from skyguard.policy.keys import KeysConfig

if TYPE_CHECKING:  # the apps sections' shapes live with their checker (apps.py imports this module)
    from skyguard.policy.apps import App, Identity


@dataclass(frozen=True)
class Workload:
    name: str
    zone: str
    interface: str  # host-side interface of the VM (veth or tap)
    mac: str  # lower-case "aa:bb:cc:dd:ee:ff": the only source MAC the VM may send
    addresses: tuple[IPAddress, ...]  # the only source IPs the VM may send


@dataclass(frozen=True)
class Zone:
    name: str
    workloads: tuple[Workload, ...]


@dataclass(frozen=True)
class PortRange:
    """One `ports:` item. tcp/udp carry an inclusive port range; icmp/icmpv6 carry none
    (lo = hi = 0) and mean every ICMP type of that family."""

    protocol: Protocol
    lo: int = 0
    hi: int = 0

    def __str__(self) -> str:
        if self.protocol in ("icmp", "icmpv6"):
            return self.protocol
        return f"{self.protocol}/{self.lo}" if self.lo == self.hi else f"{self.protocol}/{self.lo}-{self.hi}"


@dataclass(frozen=True)
class Destination:
    """`to:` of a rule. Any combination; at least one part is non-empty."""

    zones: tuple[str, ...] = ()
    networks: tuple[str, ...] = ()  # names from Policy.networks
    cidrs: tuple[IPNetwork, ...] = ()
    fqdns: tuple[str, ...] = ()  # lower-case patterns without trailing dot: "a.b", "*.b", "**.b"
    # The fqdns may resolve to private addresses (RFC 1918, CGNAT, ULA, NAT64/6to4 wrapping
    # those); without it such answers are stripped as DNS rebinding. Never loopback, link-local
    # or multicast: only `cidrs`/`networks` naming those let a name resolve there.
    allow_private: bool = False


@dataclass(frozen=True)
class Rule:
    name: str
    action: Action
    from_zones: tuple[str, ...]  # "*" already expanded to every zone, in policy order
    to: Destination
    ports: tuple[PortRange, ...]  # empty means every protocol and port
    line: int = 0  # where the rule starts in the file, for messages


@dataclass(frozen=True)
class TunnelDetection:
    action: Literal["block", "alert", "off"] = "block"


@dataclass(frozen=True)
class DnsConfig:
    upstreams: tuple[str, ...] = ()
    refuse_with: Literal["refused", "nxdomain"] = "refused"
    min_ttl: int = 5
    max_ttl: int = 3600
    tunnel_detection: TunnelDetection = TunnelDetection()


@dataclass(frozen=True)
class Injection:
    header: str | None = "Authorization"
    format: str = "{secret}"
    body: bool = False  # also swap in request bodies
    max_occurrences: int = 1  # body swaps per request


@dataclass(frozen=True)
class Credential:
    name: str
    placeholder: str  # not secret: the only thing the VM ever knows
    secret: str  # a name in the sealed store, never the value
    zones: tuple[str, ...]
    destinations: tuple[str, ...]  # host names (lower-case)
    inject: Injection = Injection()
    strip_response_headers: tuple[str, ...] = ()
    client_certificate: str | None = None  # a key (skyguard/policy/keys.py) presented for mTLS


@dataclass(frozen=True)
class TlsTermination:
    workload: str
    port: int
    forward_to: int
    certificate: str  # a name in the key store


@dataclass(frozen=True)
class SshOperator:
    name: str
    public_key: str
    may_access: tuple[str, ...]  # zone names


@dataclass(frozen=True)
class AdminSsh:
    listen: str = "0.0.0.0:2222"
    operators: tuple[SshOperator, ...] = ()
    port_forwarding: bool = False
    agent_forwarding: bool = False
    sftp: bool = False
    # The exec commands that may run (plain words, fnmatch wildcards; skyguard/admin/commands.py
    # matches them). None: any command, and shells; when set, shells are refused.
    commands: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Policy:
    name: str
    zones: dict[str, Zone]
    networks: dict[str, tuple[IPNetwork, ...]]
    rules: tuple[Rule, ...]
    dns: DnsConfig = DnsConfig()
    credentials: tuple[Credential, ...] = ()
    tls_termination: tuple[TlsTermination, ...] = ()
    admin_ssh: AdminSsh | None = None
    content: ContentPolicy = ContentPolicy()  # skyguard/policy/content.py: what zones may upload
    admin_console: AdminConsole | None = None  # VNC/RDP consoles (skyguard/policy/console.py)
    identity: Identity | None = None  # skyguard/policy/apps.py: the OpenID issuer people sign in at
    apps: tuple[App, ...] = ()  # ... and the web apps in VMs reached only through skyguard
    keys: KeysConfig | None = None  # skyguard/policy/keys.py: key custody and the crypto proxy
    source: str = ""  # the file it came from
    sha256: str = ""  # hex digest of the file's bytes: the "policy hash" everywhere
    extra: dict = field(default_factory=dict)

    def workloads(self) -> list[Workload]:
        return [w for z in self.zones.values() for w in z.workloads]

    def workload(self, name: str) -> Workload | None:
        return next((w for w in self.workloads() if w.name == name), None)
