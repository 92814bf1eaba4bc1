"""The `admin.console` policy section: graphical consoles (VNC, RDP) that operators open through
skyguard, and who may open which. Dataclasses and the checker mixin that parses them; the proxy
that enforces them is skyguard/console/. A part of the checker (see parse.py and access.py).

    admin:
      console:
        listen: "0.0.0.0:5999"          # native VNC clients (one-time passwords); optional
        web: "0.0.0.0:5980"             # the web console (noVNC in the browser); optional
        web_app: wiki                   # sign-in: that app's (apps:) host name, certificate and
                                        # identity-aware proxy session; optional
        targets:
          - name: dc1-desktop
            workload: dc1
            protocol: vnc                 # vnc | rdp
            port: 5901                    # on the VM
            credential: dc1-vnc           # NAME of the VM-side password in the sealed store
            clipboard: none               # none | to_vm | from_vm | both (default none)
            recording: true               # default true
        operators:
          - {name: alice, may_access: [directory]}
        groups:                           # groups the identity-aware proxy signs users in with
          - {name: admins, may_access: "*"}

The credential is a name, never the password: operators never learn it (the proxy alone uses it
on the skyguard -> VM leg), so messages never quote it either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from skyguard.policy.checker import CheckerBase, did_you_mean, quoted
from skyguard.policy.values import SECRET_NAME_RE, format_hostport, parse_hostport

ConsoleProtocol = Literal["vnc", "rdp"]
Clipboard = Literal["none", "to_vm", "from_vm", "both"]
PROTOCOLS = ("vnc", "rdp")
CLIPBOARD = ("none", "to_vm", "from_vm", "both")


@dataclass(frozen=True)
class ConsoleTarget:
    name: str
    workload: str
    protocol: ConsoleProtocol
    port: int
    credential: str  # a name in the sealed store, never the value
    clipboard: Clipboard = "none"
    recording: bool = True

    @property
    def clipboard_to_vm(self) -> bool:
        return self.clipboard in ("to_vm", "both")

    @property
    def clipboard_from_vm(self) -> bool:
        return self.clipboard in ("from_vm", "both")


@dataclass(frozen=True)
class ConsoleGrant:
    """An operator (kind "operator") or a group (kind "group") and the zones they may open."""

    name: str
    may_access: tuple[str, ...]


@dataclass(frozen=True)
class AdminConsole:
    listen: str | None = None  # native VNC clients; None: none
    web: str | None = None  # the web console's HTTP and WebSocket listener; None: none
    # An app of `apps:` whose host name and certificate the web console answers with (HTTPS) and
    # whose signed-in users it lists targets for; None: tickets from the CLI only (plain HTTP).
    web_app: str | None = None
    targets: tuple[ConsoleTarget, ...] = ()
    operators: tuple[ConsoleGrant, ...] = ()
    groups: tuple[ConsoleGrant, ...] = ()

    def target(self, name: str) -> ConsoleTarget | None:
        return next((t for t in self.targets if t.name == name), None)

    def zones_of(self, operator: str, groups: tuple[str, ...] = ()) -> set[str]:
        """Every zone `operator` (member of `groups`) may open a console in."""
        zones = {z for g in self.operators if g.name == operator for z in g.may_access}
        return zones | {z for g in self.groups if g.name in groups for z in g.may_access}


def console_ports(console: AdminConsole | None, zone_of: dict[str, str]) -> dict[str, set[int]]:
    """zone -> the VM ports skyguard's console proxy must reach there (for the datapath's
    host grant; `zone_of` maps workload -> zone)."""
    out: dict[str, set[int]] = {}
    for t in console.targets if console is not None else ():
        if t.workload in zone_of:
            out.setdefault(zone_of[t.workload], set()).add(t.port)
    return out


class ConsoleSection(CheckerBase):
    """admin.console: a method of the policy checker (mixed into AccessSections)."""

    console: AdminConsole | None = None  # set by admin_console(), read by parse.py

    if TYPE_CHECKING:  # the checker's (parse.py), which mixes this section in
        def unique_name(self, node, path, seen: dict, kind: str, scope: str = "", **limits) -> str | None: ...

    def admin_console(self, node, line, zones) -> AdminConsole | None:
        path = "admin.console"
        if not self.mapping(node, path, line, ("listen", "web", "web_app", "targets", "operators", "groups"),
                            required=("targets",)):
            return None
        ok = True
        addresses: dict[str, str | None] = {"listen": None, "web": None}
        for key in addresses:
            if key not in node:
                continue
            key_line = self.line_of(node, key)
            parsed = self.scalar(node[key], parse_hostport, f"{path}.{key}", key_line)
            if parsed is not None and parsed[1] is None:
                self.problem(key_line, f"{path}.{key}",
                             f"{quoted(node[key])} has no port; write ADDR:PORT such as 0.0.0.0:5999")
                parsed = None
            ok = ok and parsed is not None
            addresses[key] = format_hostport(*parsed) if parsed else None
        if addresses["listen"] is not None and addresses["listen"] == addresses["web"]:
            self.problem(self.line_of(node, "web"), f"{path}.web", "is the same address as listen; give each its own port")
            ok = False
        web_app = None
        if "web_app" in node:
            web_app = self.name(node["web_app"], f"{path}.web_app", self.line_of(node, "web_app"), "app name")
            ok = ok and web_app is not None
            if web_app and "web" not in node:
                self.problem(self.line_of(node, "web_app"), f"{path}.web_app", "needs web: ADDR:PORT to listen on")
                ok = False
        targets = self._console_targets(node.get("targets"), f"{path}.targets", self.line_of(node, "targets"),
                                        zones)
        ok = ok and targets is not None
        grants = {}
        for kind in ("operators", "groups"):
            grants[kind] = self._console_grants(node.get(kind, []), f"{path}.{kind}",
                                                self.line_of(node, kind), zones, kind[:-1])
            ok = ok and grants[kind] is not None
        if not ok:
            return None
        return AdminConsole(listen=addresses["listen"], web=addresses["web"], web_app=web_app, targets=targets,
                            operators=grants["operators"], groups=grants["groups"])

    def _console_targets(self, node, path, line, zones) -> tuple[ConsoleTarget, ...] | None:
        if not self.seq(node, path, line, non_empty=True):
            return None
        workloads = [w.name for z in zones.values() for w in z.workloads]
        keys = ("name", "workload", "protocol", "port", "credential", "clipboard", "recording")
        required = ("name", "workload", "protocol", "port", "credential")
        names: dict[str, str] = {}
        endpoints: dict[tuple[str, int], str] = {}
        result, ok = [], True
        for index, item in enumerate(node):
            item_path, item_line = f"{path}[{index}]", self.line_of(node, index)
            if not self.mapping(item, item_path, item_line, keys, required=required) or \
                    not all(k in item for k in required):
                ok = False
                continue
            name = self.unique_name(item, item_path, names, "console target")
            workload = item["workload"]
            if workload not in workloads:
                self.problem(self.line_of(item, "workload"), f"{item_path}.workload",
                             f"unknown workload {quoted(workload)}"
                             f"{did_you_mean(workload, workloads) if isinstance(workload, str) else ''}")
                workload = None
            protocol = self._one_of(item, "protocol", item_path, PROTOCOLS)
            clipboard = self._one_of(item, "clipboard", item_path, CLIPBOARD, default="none")
            port = self.integer(item["port"], f"{item_path}.port", self.line_of(item, "port"), 1, 65535)
            if workload and port:
                if (workload, port) in endpoints:
                    self.problem(item_line, item_path, f"{workload} port {port} is already the target "
                                                       f"{endpoints[(workload, port)]}")
                    port = None
                else:
                    endpoints[(workload, port)] = item_path
            credential = item["credential"]
            if not isinstance(credential, str) or not SECRET_NAME_RE.match(credential):
                # Quote nothing: a user who confused the name with the password must not see it echoed.
                self.problem(self.line_of(item, "credential"), f"{item_path}.credential",
                             "must be the NAME of the VM's password in skyguard's store (letters, digits, "
                             "'.', '_', '-'; at most 64), never the password itself; store it with "
                             "`skyguard secret set NAME`")
                credential = None
            recording = True
            if "recording" in item:
                recording = self.boolean(item["recording"], f"{item_path}.recording",
                                         self.line_of(item, "recording"))
            if None in (name, workload, protocol, clipboard, port, credential, recording):
                ok = False
                continue
            result.append(ConsoleTarget(name=name, workload=workload, protocol=protocol, port=port,
                                        credential=credential, clipboard=clipboard, recording=recording))
        return tuple(result) if ok else None

    def _one_of(self, item, key, path, allowed, default=None):
        if key not in item:
            return default
        value = item[key]
        if value not in allowed:
            self.problem(self.line_of(item, key), f"{path}.{key}",
                         f"{quoted(value)} is not one of: {', '.join(allowed)}")
            return None
        return value

    def _console_grants(self, node, path, line, zones, kind) -> tuple[ConsoleGrant, ...] | None:
        if not self.seq(node, path, line):
            return None
        names: dict[str, str] = {}
        result, ok = [], True
        for index, item in enumerate(node):
            item_path, item_line = f"{path}[{index}]", self.line_of(node, index)
            if not self.mapping(item, item_path, item_line, ("name", "may_access"),
                                required=("name", "may_access")) or "name" not in item \
                    or "may_access" not in item:
                ok = False
                continue
            name = self.unique_name(item, item_path, names, kind, max_length=32)
            access = self.zone_refs(item["may_access"], f"{item_path}.may_access",
                                    self.line_of(item, "may_access"), zones, allow_all=True)
            if not (name and access):
                ok = False
                continue
            result.append(ConsoleGrant(name=name, may_access=access))
        return tuple(result) if ok else None


def console_to_dict(console: AdminConsole) -> dict:
    """admin.console in canonical form (every default spelled out; `*` already expanded):
    parsing it again gives the same values (skyguard/policy/canonical.py)."""
    out: dict = {}
    for key in ("listen", "web", "web_app"):
        if getattr(console, key) is not None:
            out[key] = getattr(console, key)
    out["targets"] = [{"name": t.name, "workload": t.workload, "protocol": t.protocol, "port": t.port,
                       "credential": t.credential, "clipboard": t.clipboard, "recording": t.recording}
                      for t in console.targets]
    for kind in ("operators", "groups"):
        if getattr(console, kind):
            out[kind] = [{"name": g.name, "may_access": list(g.may_access)} for g in getattr(console, kind)]
    return out
