"""The policy's `keys:` section: where skyguard's keys live (a file backend in the sealed store, a
PKCS#11 token whose PIN is a sealed secret, or this host's TPM: no other field) and which zones may
use which key through the crypto proxy, for which operations, how often. A part of the checker (see parse.py), like access.py.

    keys:
      backend: pkcs11                        # file | pkcs11 | tpm
      module: /usr/lib/softhsm/libsofthsm2.so
      token: skyguard                        # the token's label
      pin_secret: hsm-pin                    # a name in the sealed store, never the PIN
      port: 8200                             # the crypto proxy, on every VM's gateway address
      keys:
        - name: release
          zones: [sdn]
          operations: [sign, verify]
          rate_limit: 20/s                   # per VM and key: N/s or N/min (burst N)

Not here: the keys themselves (skyguard/keys/), the proxy. The datapath lets the zones some key
names (and only those) reach `port` on the host's addresses, the gateway among them, with no rule
of the operator's (the synthetic keys-proxy rule, skyguard/datapath/compile.py); the proxy then
checks each key's zones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from skyguard.keys.types import KEY_NAME_RE
from skyguard.policy.checker import CheckerBase, did_you_mean, quoted, type_name
from skyguard.policy.values import SECRET_NAME_RE

BACKENDS = ("file", "pkcs11", "tpm")
OPERATIONS = ("sign", "verify", "decrypt")
DEFAULT_PORT = 8200
DEFAULT_RATE = "10/s"
_RATE = re.compile(r"^(\d{1,6})\s*/\s*(s|sec|second|m|min|minute)$")


@dataclass(frozen=True)
class KeyGrant:
    """One key VMs may use through the crypto proxy."""

    name: str
    zones: tuple[str, ...]
    operations: tuple[str, ...]  # of OPERATIONS
    rate: float  # operations per second, per VM
    burst: int  # operations a VM may make at once after a pause

    def allows(self, zone: str | None) -> bool:
        return zone is not None and zone in self.zones


@dataclass(frozen=True)
class KeysConfig:
    backend: str = "file"
    module: str | None = None  # pkcs11: the module's path
    token: str | None = None  # pkcs11: the token's label
    pin_secret: str | None = None  # pkcs11: the sealed secret holding the user PIN
    port: int = DEFAULT_PORT
    grants: tuple[KeyGrant, ...] = ()

    def grant(self, name: str) -> KeyGrant | None:
        return next((g for g in self.grants if g.name == name), None)


def parse_rate(text) -> tuple[float, int]:
    """`20/s`, `600/min` or a bare number (per second) -> (per second, burst)."""
    if isinstance(text, bool):
        raise ValueError("is not a rate; write N/s or N/min")
    if isinstance(text, int):
        text = f"{text}/s"
    match = _RATE.match(text.strip().lower()) if isinstance(text, str) else None
    if not match or int(match.group(1)) < 1:
        raise ValueError("is not a rate; write N/s or N/min with N at least 1 (e.g. 20/s)")
    count = int(match.group(1))
    per_second = count if match.group(2).startswith("s") else count / 60.0
    return per_second, count


def rate_text(rate: float, burst: int) -> str:
    """(per second, burst) back to what parse_rate reads: N/s when both are N, else N/min."""
    return f"{burst}/s" if rate == burst else f"{burst}/min"


def keys_to_dict(keys: KeysConfig) -> dict:
    """The `keys:` section in canonical form (skyguard/policy/canonical.py): defaults spelled out,
    "*" expanded; parsing it again gives the same KeysConfig. The PIN is a secret's name only."""
    out: dict = {"backend": keys.backend}
    for name in ("module", "token", "pin_secret"):
        if getattr(keys, name) is not None:
            out[name] = getattr(keys, name)
    out["port"] = keys.port
    out["keys"] = [{"name": g.name, "zones": list(g.zones), "operations": list(g.operations),
                    "rate_limit": rate_text(g.rate, g.burst)} for g in keys.grants]
    return out


class KeysSection(CheckerBase):
    """keys: a method of the policy checker."""

    def keys(self, node, line, zones) -> KeysConfig | None:
        if node is None:
            return None
        allowed = ("backend", "module", "token", "pin_secret", "port", "keys")
        if not self.mapping(node, "keys", line, allowed, required=("backend",)):
            return None
        ok = True
        backend = node.get("backend")
        if "backend" in node and backend not in BACKENDS:
            self.problem(self.line_of(node, "backend"), "keys.backend",
                         f"{quoted(backend)} is not a key backend{did_you_mean(backend, BACKENDS)}")
            ok = False
        module = token = pin_secret = None
        for field_name in ("module", "token", "pin_secret"):
            if field_name in node:
                value = node[field_name]
                where = self.line_of(node, field_name)
                if backend == "tpm":
                    self.problem(where, f"keys.{field_name}", f"the tpm backend takes no `{field_name}:` (its keys "
                                 "live in this host's TPM, found as `skyguard tpm` finds it); it is for pkcs11")
                    ok = False
                    continue
                if not isinstance(value, str) or not value.strip():
                    self.problem(where, f"keys.{field_name}", f"must be a string, not {type_name(value)}")
                    ok = False
                    continue
                if field_name == "module" and not value.startswith("/"):
                    self.problem(where, "keys.module", f"{quoted(value)} must be an absolute path to a "
                                                       "PKCS#11 module (.so)")
                    ok = False
                    continue
                if field_name == "pin_secret" and not SECRET_NAME_RE.match(value):
                    # Quote nothing: a user who confused the name with the value must not see it echoed.
                    self.problem(where, "keys.pin_secret", "must be the NAME of a secret in skyguard's "
                                 "store, never the PIN itself; store the PIN with `skyguard secret set NAME`")
                    ok = False
                    continue
                module, token, pin_secret = (value if field_name == "module" else module,
                                             value if field_name == "token" else token,
                                             value if field_name == "pin_secret" else pin_secret)
            elif backend == "pkcs11":
                self.problem(line, "keys", f"the pkcs11 backend needs `{field_name}:`")
                ok = False
        port = DEFAULT_PORT
        if "port" in node:
            port = self.integer(node["port"], "keys.port", self.line_of(node, "port"), 1, 65535)
            ok = ok and port is not None
        grants = []
        if "keys" in node:
            k_node, k_line = node["keys"], self.line_of(node, "keys")
            if self.seq(k_node, "keys.keys", k_line):
                names: dict[str, str] = {}
                for index, item in enumerate(k_node):
                    grant = self.key_grant(item, f"keys.keys[{index}]", self.line_of(k_node, index), zones, names)
                    if grant is None:
                        ok = False
                    else:
                        grants.append(grant)
            else:
                ok = False
        for index, grant in enumerate(grants):
            if backend == "tpm" and "decrypt" in grant.operations:
                self.problem(self.line_of(node["keys"], index), f"keys.keys[{index}].operations",
                             f"key {grant.name!r}: the tpm backend's keys (ec-p256) only sign; decrypt needs "
                             "an rsa-3072 key of the pkcs11 or file backend")
                ok = False
        if not ok:
            return None
        return KeysConfig(backend=backend, module=module, token=token, pin_secret=pin_secret, port=port,
                          grants=tuple(grants))

    def key_grant(self, node, path, line, zones, names) -> KeyGrant | None:
        if not self.mapping(node, path, line, ("name", "zones", "operations", "rate_limit"),
                            required=("name", "zones", "operations")):
            return None
        name = node.get("name")
        ok = True
        if "name" in node:
            if not isinstance(name, str) or not KEY_NAME_RE.fullmatch(name):  # as `skyguard key create` checks it
                self.problem(self.line_of(node, "name"), f"{path}.name",
                             f"{quoted(name)} is not a key name (a-z, 0-9, '.', '_', '-'; at most 59)")
                ok = False
            elif name in names:
                self.problem(self.line_of(node, "name"), f"{path}.name", f"{quoted(name)} is already "
                                                                         f"granted at {names[name]}")
                ok = False
            else:
                names[name] = path
        key_zones: tuple[str, ...] = ()
        if "zones" in node:
            key_zones = self.zone_refs(node["zones"], f"{path}.zones", self.line_of(node, "zones"), zones,
                                       allow_all=True)
            ok = ok and bool(key_zones)
        operations: list[str] = []
        if "operations" in node:
            o_node, o_line = node["operations"], self.line_of(node, "operations")
            if self.seq(o_node, f"{path}.operations", o_line, non_empty=True):
                for i, op in enumerate(o_node):
                    if op not in OPERATIONS:
                        self.problem(self.line_of(o_node, i), f"{path}.operations[{i}]",
                                     f"{quoted(op)} is not an operation{did_you_mean(op, OPERATIONS)}")
                        ok = False
                    elif op not in operations:
                        operations.append(op)
            else:
                ok = False
        rate, burst = parse_rate(DEFAULT_RATE)
        if "rate_limit" in node:
            parsed = self.scalar(node["rate_limit"], parse_rate, f"{path}.rate_limit", self.line_of(node, "rate_limit"))
            if parsed is None:
                ok = False
            else:
                rate, burst = parsed
        if not ok:
            return None
        return KeyGrant(name=name, zones=key_zones, operations=tuple(operations), rate=rate, burst=burst)
