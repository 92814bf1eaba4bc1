"""The policy sections that grant access beyond the datapath: credentials (swap), tls_termination
and admin (SSH). A part of the checker (see parse.py), split off to keep one file per concern.
A credential's client_certificate names a key of the `keys:` section (skyguard/policy/keys.py);
parse.py checks that the policy has that section.

The placeholder is not a secret, but a user who mistakes the field pastes a real token into it:
messages about credentials therefore never quote the placeholder's value (nor a secret name that
looks like a value).
"""

from __future__ import annotations

import re

from skyguard.httpheaders import is_forwarding_header
from skyguard.keys.types import KEY_NAME_RE
from skyguard.policy import fqdn
from skyguard.policy.checker import CheckerBase, did_you_mean, quoted, type_name
from skyguard.policy.console import ConsoleSection
from skyguard.policy.model import AdminSsh, Credential, Injection, SshOperator, TlsTermination
from skyguard.policy.values import (
    HEADER_RE,
    PLACEHOLDER_RE,
    SECRET_NAME_RE,
    format_fields,
    format_hostport,
    parse_hostport,
    parse_ssh_public_key,
)

MIN_PLACEHOLDER = 16  # long enough that a placeholder never occurs in traffic by chance

# One word of an admin.ssh.commands entry: nothing a shell would expand or chain.
SSH_COMMAND_WORD = re.compile(r"[A-Za-z0-9_./:=,@%+\-*?\[\]!]+")


class AccessSections(ConsoleSection, CheckerBase):
    """credentials, tls_termination, admin: methods of the policy checker."""

    def credentials(self, node, line, zones) -> tuple[Credential, ...]:
        if node is None or not self.seq(node, "credentials", line):
            return ()
        result = []
        names: dict[str, str] = {}
        placeholders: list[tuple[str, str]] = []
        keys = ("name", "placeholder", "secret", "zones", "destinations", "inject", "strip_response_headers",
                "client_certificate")
        required = ("name", "placeholder", "secret", "zones", "destinations", "inject")
        for index, item in enumerate(node):
            path, item_line = f"credentials[{index}]", self.line_of(node, index)
            if not self.mapping(item, path, item_line, keys, required=required):
                continue
            ok = all(key in item for key in required)
            name = None
            if "name" in item:
                name = self.unique_name(item, path, names, "credential")
            placeholder = None
            if "placeholder" in item:
                placeholder = self.placeholder(item["placeholder"], f"{path}.placeholder",
                                               self.line_of(item, "placeholder"), placeholders)
            secret = None
            if "secret" in item:
                secret = item["secret"]
                if not isinstance(secret, str) or not SECRET_NAME_RE.match(secret):
                    # Quote nothing: a user who confused the name with the value must not see
                    # the value echoed into a terminal or a CI log.
                    self.problem(self.line_of(item, "secret"), f"{path}.secret",
                                 "must be the NAME of a secret in skyguard's store (letters, digits, "
                                 "'.', '_', '-'; at most 64), never the secret itself; store the value "
                                 "with `skyguard secret set NAME`")
                    secret = None
            cred_zones: tuple[str, ...] = ()
            if "zones" in item:
                cred_zones = self.zone_refs(item["zones"], f"{path}.zones", self.line_of(item, "zones"),
                                            zones, allow_all=True)
            destinations: list[str] = []
            if "destinations" in item:
                d_node, d_line = item["destinations"], self.line_of(item, "destinations")
                if self.seq(d_node, f"{path}.destinations", d_line, non_empty=True):
                    for i, d in enumerate(d_node):
                        host = self.scalar(d, lambda v: fqdn.check_pattern(v, allow_wildcards=False),
                                           f"{path}.destinations[{i}]", self.line_of(d_node, i))
                        if host is None:
                            ok = False
                        elif host not in destinations:
                            destinations.append(host)
                else:
                    ok = False
            inject = None
            if "inject" in item:
                inject = self.injection(item["inject"], f"{path}.inject", self.line_of(item, "inject"))
            strip: list[str] = []
            if "strip_response_headers" in item:
                s_node, s_line = item["strip_response_headers"], self.line_of(item, "strip_response_headers")
                if self.seq(s_node, f"{path}.strip_response_headers", s_line):
                    for i, header in enumerate(s_node):
                        if not isinstance(header, str) or not HEADER_RE.match(header):
                            self.problem(self.line_of(s_node, i), f"{path}.strip_response_headers[{i}]",
                                         f"{quoted(header)} is not an HTTP header name")
                            ok = False
                        else:
                            strip.append(header)
            client_certificate = None
            if "client_certificate" in item:
                # The key, in the key backend, whose certificate the credential proxy presents to
                # this credential's destinations.
                client_certificate = item["client_certificate"]
                if not isinstance(client_certificate, str) or not KEY_NAME_RE.fullmatch(client_certificate):
                    self.problem(self.line_of(item, "client_certificate"), f"{path}.client_certificate",
                                 "must be the name of a key in skyguard's key backend (see `skyguard key list`)")
                    ok = False
            if ok and name and placeholder and secret and cred_zones and destinations and inject:
                result.append(Credential(name=name, placeholder=placeholder, secret=secret,
                                         zones=cred_zones, destinations=tuple(destinations),
                                         inject=inject, strip_response_headers=tuple(strip),
                                         client_certificate=client_certificate))
        return tuple(result)

    def placeholder(self, node, path, line, seen: list[tuple[str, str]]) -> str | None:
        if not isinstance(node, str):
            self.problem(line, path, f"must be a string, not {type_name(node)}")
            return None
        if len(node) < MIN_PLACEHOLDER:
            self.problem(line, path, f"is {len(node)} characters; a placeholder has at least "
                                     f"{MIN_PLACEHOLDER} so that it never occurs in traffic by chance")
            return None
        if not PLACEHOLDER_RE.match(node):
            self.problem(line, path, "may hold only letters, digits and . _ ~ + / = - (it is matched "
                                     "inside HTTP headers and bodies)")
            return None
        for other, other_path in seen:
            # One placeholder inside another would make the swap ambiguous.
            if node == other or node in other or other in node:
                self.problem(line, path, f"overlaps the placeholder of {other_path} (equal or one "
                                         f"contains the other); make each unique")
                return None
        seen.append((node, path))
        return node

    def injection(self, node, path, line) -> Injection | None:
        if not self.mapping(node, path, line, ("header", "body", "format", "max_occurrences")):
            return None
        header = None
        body = False
        ok = True
        if "header" in node:
            header = node["header"]
            if not isinstance(header, str) or not HEADER_RE.match(header):
                self.problem(self.line_of(node, "header"), f"{path}.header",
                             f"{quoted(header)} is not an HTTP header name")
                ok = False
            elif is_forwarding_header(header.encode()):
                self.problem(self.line_of(node, "header"), f"{path}.header",
                             f"{quoted(header)} is a forwarding header, which the proxy drops from every "
                             "request (a VM could aim the credential elsewhere with it); inject into another")
                ok = False
        if "body" in node:
            body = self.boolean(node["body"], f"{path}.body", self.line_of(node, "body"))
            ok = ok and body is not None
        if "header" not in node and not body:
            self.problem(line, path, "injects nowhere; give `header: NAME` and/or `body: true`")
            ok = False
        fmt = "{secret}"
        if "format" in node:
            fmt = node["format"]
            fmt_line = self.line_of(node, "format")
            if not isinstance(fmt, str):
                self.problem(fmt_line, f"{path}.format", f"must be a string, not {type_name(fmt)}")
                ok = False
            else:
                fields = format_fields(fmt)
                if fields is None or fields != {"secret"}:
                    self.problem(fmt_line, f"{path}.format",
                                 f"{quoted(fmt)} must contain {{secret}} and no other {{field}} "
                                 f"(write literal braces as {{{{ and }}}})")
                    ok = False
        occurrences = 1
        if "max_occurrences" in node:
            occurrences = self.integer(node["max_occurrences"], f"{path}.max_occurrences",
                                       self.line_of(node, "max_occurrences"), 1, 1000)
            ok = ok and occurrences is not None
        if not ok:
            return None
        return Injection(header=header, format=fmt, body=bool(body), max_occurrences=occurrences)

    def tls_termination(self, node, line, zones) -> tuple[TlsTermination, ...]:
        if node is None or not self.seq(node, "tls_termination", line):
            return ()
        workloads = [w.name for z in zones.values() for w in z.workloads]  # ordered, for hints
        result = []
        seen: dict[tuple[str, int], str] = {}
        for index, item in enumerate(node):
            path, item_line = f"tls_termination[{index}]", self.line_of(node, index)
            if not self.mapping(item, path, item_line, ("workload", "port", "forward_to", "certificate"),
                                required=("workload", "port", "forward_to", "certificate")):
                continue
            workload = item.get("workload")
            if "workload" in item and workload not in workloads:
                self.problem(self.line_of(item, "workload"), f"{path}.workload",
                             f"unknown workload {quoted(workload)}"
                             f"{did_you_mean(workload, workloads) if isinstance(workload, str) else ''}")
                workload = None
            port = forward_to = certificate = None
            if "port" in item:
                port = self.integer(item["port"], f"{path}.port", self.line_of(item, "port"), 1, 65535)
            if "forward_to" in item:
                forward_to = self.integer(item["forward_to"], f"{path}.forward_to",
                                          self.line_of(item, "forward_to"), 1, 65535)
            if "certificate" in item:
                certificate = item["certificate"]
                if not isinstance(certificate, str) or not SECRET_NAME_RE.match(certificate):
                    self.problem(self.line_of(item, "certificate"), f"{path}.certificate",
                                 "must be the name of a key in skyguard's key store (letters, digits, "
                                 "'.', '_', '-')")
                    certificate = None
            if workload and port:
                if (workload, port) in seen:
                    self.problem(item_line, path, f"{workload} port {port} is already terminated at "
                                                  f"{seen[(workload, port)]}")
                    continue
                seen[(workload, port)] = path
            if workload and port and forward_to and certificate:
                result.append(TlsTermination(workload, port, forward_to, certificate))
        return tuple(result)

    def admin(self, node, line, zones) -> AdminSsh | None:
        if node is None:
            return None
        if not self.mapping(node, "admin", line, ("ssh", "console")):
            return None
        if "console" in node:  # graphical consoles: skyguard/policy/console.py, read by parse.py
            self.console = self.admin_console(node["console"], self.line_of(node, "console"), zones)
        if "ssh" not in node:
            return None
        ssh, ssh_line = node["ssh"], self.line_of(node, "ssh")
        keys = ("listen", "operators", "port_forwarding", "agent_forwarding", "sftp", "commands")
        if not self.mapping(ssh, "admin.ssh", ssh_line, keys, required=("operators",)):
            return None
        defaults = AdminSsh()
        listen = defaults.listen
        if "listen" in ssh:
            parsed = self.scalar(ssh["listen"], parse_hostport, "admin.ssh.listen", self.line_of(ssh, "listen"))
            if parsed is not None and parsed[1] is None:
                self.problem(self.line_of(ssh, "listen"), "admin.ssh.listen",
                             f"{quoted(ssh['listen'])} has no port; write ADDR:PORT such as 0.0.0.0:2222")
                parsed = None
            listen = format_hostport(*parsed) if parsed else None
        flags = {}
        for flag in ("port_forwarding", "agent_forwarding", "sftp"):
            flags[flag] = getattr(defaults, flag)
            if flag in ssh:
                flags[flag] = self.boolean(ssh[flag], f"admin.ssh.{flag}", self.line_of(ssh, flag))
        operators: list[SshOperator] = []
        ops_ok = True
        if "operators" in ssh:
            ops_node, ops_line = ssh["operators"], self.line_of(ssh, "operators")
            if self.seq(ops_node, "admin.ssh.operators", ops_line, non_empty=True):
                names: dict[str, str] = {}
                keys_seen: dict[str, str] = {}
                for index, item in enumerate(ops_node):
                    operator = self.operator(item, f"admin.ssh.operators[{index}]",
                                             self.line_of(ops_node, index), zones, names, keys_seen)
                    if operator:
                        operators.append(operator)
                    else:
                        ops_ok = False
            else:
                ops_ok = False
        commands, commands_ok = None, True
        if "commands" in ssh:
            commands, commands_ok = self.ssh_commands(ssh["commands"], self.line_of(ssh, "commands"))
        if listen is None or any(v is None for v in flags.values()) or not ops_ok or not commands_ok:
            return None
        return AdminSsh(listen=listen, operators=tuple(operators), commands=commands, **flags)

    def ssh_commands(self, node, line) -> tuple[tuple[str, ...] | None, bool]:
        """admin.ssh.commands: the exec commands operators may run, as plain words."""
        if not self.seq(node, "admin.ssh.commands", line):
            return None, False
        result, ok = [], True
        for index, item in enumerate(node):
            words = item.split() if isinstance(item, str) else []
            if not words or not all(SSH_COMMAND_WORD.fullmatch(w) for w in words):
                self.problem(self.line_of(node, index), f"admin.ssh.commands[{index}]",
                             f"{quoted(item)} must be plain words: letters, digits, _ . / : = , @ % + - "
                             "and the wildcards * ? [ ] (no quotes or shell syntax)")
                ok = False
            else:
                result.append(" ".join(words))
        return tuple(result), ok

    def operator(self, node, path, line, zones, names, keys_seen) -> SshOperator | None:
        if not self.mapping(node, path, line, ("name", "public_key", "may_access"),
                            required=("name", "public_key", "may_access")):
            return None
        name = key = None
        access: tuple[str, ...] = ()
        if "name" in node:
            name = self.unique_name(node, path, names, "operator", max_length=32)
        if "public_key" in node:
            key_line = self.line_of(node, "public_key")
            key = self.scalar(node["public_key"], parse_ssh_public_key, f"{path}.public_key", key_line,
                              quote=False)
            if key and key in keys_seen:
                self.problem(key_line, f"{path}.public_key", f"the same key is already given to "
                                                             f"{keys_seen[key]}; one key per operator")
                key = None
            elif key:
                keys_seen[key] = path
        if "may_access" in node:
            access = self.zone_refs(node["may_access"], f"{path}.may_access",
                                    self.line_of(node, "may_access"), zones, allow_all=True)
        if name and key and access:
            return SshOperator(name=name, public_key=key, may_access=access)
        return None
