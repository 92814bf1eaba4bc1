"""The policy sections of the identity-aware proxy: `identity:` (the OpenID Connect issuer people
sign in at) and `apps:` (the web apps in VMs that people reach only through skyguard). The
dataclasses and a part of the checker (see parse.py), in one module so model.py and parse.py
change by a field and a call. Not here: the proxy (skyguard/apps), the datapath's share of it
(skyguard/datapath/compile.py keeps an app's port for the proxy).

    identity:
      issuer: https://idp.test:9443         # https only; its discovery document is fetched
      client_id: skyguard
      client_secret: idp-client-secret      # a NAME in the sealed store, never the value
      groups_claim: groups                  # default "groups"
      session_lifetime: 28800               # seconds a sign-in lasts (default 8 h)
      session_check: 60                     # seconds between re-checks at the issuer (userinfo)
    apps:
      - name: wiki
        workload: vfw1
        port: 443                           # the app's plaintext HTTP port in the VM
        host: wiki.apps.test                # the name people type
        listen: 0.0.0.0:8443                # where skyguard's TLS listener for it is
        certificate: wiki-tls               # chain + key in the sealed store
        users: [alice]                      # who may use it: these users ...
        groups: [wiki-editors]              # ... and members of these groups
        websockets: true                    # default false
        identity_header: X-Skyguard-Assertion   # the signed JWT's header (default this)

Secret names are never quoted back in messages (a user who confused name and value would see
the value in a CI log).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from skyguard.policy.checker import CheckerBase, did_you_mean, quoted, type_name
from skyguard.policy.values import HEADER_RE, SECRET_NAME_RE, format_hostport, parse_hostport

DEFAULT_HEADER = "X-Skyguard-Assertion"
# Both used with fullmatch: `$` also matches before a trailing newline.
HOST_NAME_RE = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z][a-z0-9-]{0,62}$")
PRINCIPAL_RE = re.compile(r"^[^\x00-\x20\x7f]{1,128}$")  # a user or group name as the issuer spells it
# Headers an identity header must never be: the proxy writes them itself or HTTP frames with them.
RESERVED_HEADERS = frozenset({"host", "cookie", "connection", "content-length", "transfer-encoding",
                              "upgrade", "te", "trailer", "keep-alive", "authorization"})


@dataclass(frozen=True)
class Identity:
    issuer: str  # https URL, exactly as the issuer's discovery document names itself
    client_id: str
    client_secret: str  # a name in the sealed store, never the value
    groups_claim: str = "groups"
    session_lifetime: int = 8 * 3600  # seconds from sign-in until the user signs in again
    session_check: int = 60  # seconds between re-checks of a session's user at the issuer


@dataclass(frozen=True)
class App:
    name: str
    workload: str
    port: int  # the app's plaintext port in the VM
    host: str  # lower-case host name people type
    listen: str  # ADDR:PORT of the TLS listener on the host
    certificate: str  # a name in the sealed store (chain + key PEM)
    users: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    websockets: bool = False
    identity_header: str = DEFAULT_HEADER

    @property
    def listen_port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])

    @property
    def origin(self) -> str:
        """What a browser sees as this app's origin (the callback and logout live under it)."""
        port = self.listen_port
        return f"https://{self.host}" + ("" if port == 443 else f":{port}")


class AppsSections(CheckerBase):
    """identity and apps: methods of the policy checker."""

    def identity(self, node, line) -> Identity | None:
        if node is None:
            return None
        keys = ("issuer", "client_id", "client_secret", "groups_claim", "session_lifetime", "session_check")
        if not self.mapping(node, "identity", line, keys, required=("issuer", "client_id", "client_secret")):
            return None
        values: dict = {}
        ok = all(k in node for k in ("issuer", "client_id", "client_secret"))
        if "issuer" in node:
            issuer = node["issuer"]
            parts = urlsplit(issuer) if isinstance(issuer, str) else None
            if parts is None or parts.scheme != "https" or not parts.hostname or parts.query or parts.fragment:
                self.problem(self.line_of(node, "issuer"), "identity.issuer",
                             f"{quoted(issuer)} is not an https URL without query or fragment, such as "
                             f"https://idp.example.com (the issuer exactly as its discovery document names it)")
                ok = False
            else:
                values["issuer"] = issuer
        if "client_id" in node:
            values["client_id"] = self.string(node["client_id"], "identity.client_id",
                                              self.line_of(node, "client_id"), "a client id")
            ok = ok and values["client_id"] is not None
        if "client_secret" in node:
            secret = node["client_secret"]
            if not isinstance(secret, str) or not SECRET_NAME_RE.match(secret):
                self.problem(self.line_of(node, "client_secret"), "identity.client_secret",
                             "must be the NAME of a secret in skyguard's store (letters, digits, '.', '_', "
                             "'-'; at most 64), never the secret itself; store it with `skyguard secret set NAME`")
                ok = False
            else:
                values["client_secret"] = secret
        if "groups_claim" in node:
            values["groups_claim"] = self.string(node["groups_claim"], "identity.groups_claim",
                                                 self.line_of(node, "groups_claim"), "a claim name")
            ok = ok and values["groups_claim"] is not None
        for key, lo, hi in (("session_lifetime", 60, 30 * 86400), ("session_check", 1, 3600)):
            if key in node:
                values[key] = self.integer(node[key], f"identity.{key}", self.line_of(node, key), lo, hi)
                ok = ok and values[key] is not None
        return Identity(**values) if ok else None

    def apps(self, node, line, zones, identity: Identity | None, has_identity: bool) -> tuple[App, ...]:
        if node is None or not self.seq(node, "apps", line):
            return ()
        if node and not has_identity:
            self.problem(line, "apps", "needs an identity: section (the OpenID Connect issuer people sign "
                                       "in at); without it nobody could be let in")
        workloads = [w.name for z in zones.values() for w in z.workloads]
        keys = ("name", "workload", "port", "host", "listen", "certificate", "users", "groups", "websockets",
                "identity_header")
        required = ("name", "workload", "port", "host", "listen", "certificate")
        seen: dict[str, dict] = {"name": {}, "host": {}, "listen": {}, "target": {}}
        result = []
        for index, item in enumerate(node):
            path, item_line = f"apps[{index}]", self.line_of(node, index)
            if not self.mapping(item, path, item_line, keys, required=required):
                continue
            ok = all(k in item for k in required)
            v: dict = {}
            if "name" in item:
                v["name"] = self.name(item["name"], f"{path}.name", self.line_of(item, "name"), "app name")
            if "workload" in item:
                workload = item["workload"]
                if workload not in workloads:
                    self.problem(self.line_of(item, "workload"), f"{path}.workload",
                                 f"unknown workload {quoted(workload)}"
                                 f"{did_you_mean(workload, workloads) if isinstance(workload, str) else ''}")
                else:
                    v["workload"] = workload
            if "port" in item:
                v["port"] = self.integer(item["port"], f"{path}.port", self.line_of(item, "port"), 1, 65535)
            if "host" in item:
                host = item["host"].lower().rstrip(".") if isinstance(item["host"], str) else item["host"]
                if not isinstance(host, str) or not HOST_NAME_RE.fullmatch(host):
                    self.problem(self.line_of(item, "host"), f"{path}.host",
                                 f"{quoted(item['host'])} is not a host name such as wiki.example.com")
                else:
                    v["host"] = host
            if "listen" in item:
                parsed = self.scalar(item["listen"], parse_hostport, f"{path}.listen", self.line_of(item, "listen"))
                if parsed is not None and parsed[1] is None:
                    self.problem(self.line_of(item, "listen"), f"{path}.listen",
                                 f"{quoted(item['listen'])} has no port; write ADDR:PORT such as 0.0.0.0:8443")
                elif parsed is not None:
                    v["listen"] = format_hostport(*parsed)
            if "certificate" in item:
                certificate = item["certificate"]
                if not isinstance(certificate, str) or not SECRET_NAME_RE.match(certificate):
                    self.problem(self.line_of(item, "certificate"), f"{path}.certificate",
                                 "must be the name of a key in skyguard's key store (letters, digits, '.', '_', '-')")
                else:
                    v["certificate"] = certificate
            for key in ("users", "groups"):
                if key in item:
                    v[key] = self._principals(item[key], f"{path}.{key}", self.line_of(item, key))
            if not v.get("users") and not v.get("groups"):
                self.problem(item_line, path, "lets nobody in: name the users or groups who may use it")
                ok = False
            if "websockets" in item:
                v["websockets"] = self.boolean(item["websockets"], f"{path}.websockets", self.line_of(item, "websockets"))
            if "identity_header" in item:
                header = item["identity_header"]
                if not isinstance(header, str) or not HEADER_RE.match(header) or header.lower() in RESERVED_HEADERS:
                    self.problem(self.line_of(item, "identity_header"), f"{path}.identity_header",
                                 f"{quoted(header)} is not a header name skyguard may write (an HTTP token, "
                                 f"not one of {', '.join(sorted(RESERVED_HEADERS))})")
                else:
                    v["identity_header"] = header
            for what, value in (("name", v.get("name")), ("host", v.get("host")), ("listen", v.get("listen")),
                                ("target", (v.get("workload"), v.get("port")))):
                if value is None or (what == "target" and None in value):
                    continue
                if value in seen[what]:
                    shown = f"{value[0]} port {value[1]}" if what == "target" else quoted(value)
                    self.problem(item_line, path, f"{what} {shown} is already used by {seen[what][value]}")
                    ok = False
                seen[what][value] = path
            keys_needed = ("name", "workload", "port", "host", "listen", "certificate")
            if ok and all(v.get(k) is not None for k in keys_needed) and None not in (v.get("websockets", False),):
                result.append(App(**{k: val for k, val in v.items() if val is not None}))
        return tuple(result) if identity is not None else ()

    def _principals(self, node, path, line) -> tuple[str, ...]:
        if not self.seq(node, path, line):
            return ()
        names = []
        for index, item in enumerate(node):
            if not isinstance(item, str) or not PRINCIPAL_RE.fullmatch(item):
                self.problem(self.line_of(node, index), f"{path}[{index}]",
                             f"must be a user or group name as the issuer spells it, not {type_name(item)} {quoted(item)}")
                continue
            names.append(item)
        return tuple(names)


def apps_to_dict(policy) -> dict:
    """The identity and apps sections in canonical form (every default spelled out), as
    skyguard/policy/canonical.py writes the other sections: {} when the policy has none. Parsing
    the result again gives the same values."""
    out: dict = {}
    if policy.identity is not None:
        i = policy.identity
        out["identity"] = {"issuer": i.issuer, "client_id": i.client_id, "client_secret": i.client_secret,
                           "groups_claim": i.groups_claim, "session_lifetime": i.session_lifetime,
                           "session_check": i.session_check}
    if policy.apps:
        out["apps"] = [{"name": a.name, "workload": a.workload, "port": a.port, "host": a.host, "listen": a.listen,
                        "certificate": a.certificate, "users": list(a.users), "groups": list(a.groups),
                        "websockets": a.websockets, "identity_header": a.identity_header}
                       for a in policy.apps]
    return out
