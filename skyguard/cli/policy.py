"""`skyguard policy validate | show | diff`: thin commands over skyguard.policy.

Printing a policy is `format_policy(policy)`, a function of a Policy, so `show` can print the
running policy once the daemon serves it. `policy load` (hot swap in a running daemon) belongs to
the daemon's CLI and is registered on this group from there.
"""

from __future__ import annotations

from pathlib import Path

import click

from skyguard.cli.common import emit_json, json_option, state_dir_option, warn
from skyguard.errors import BadInput, PolicyError
from skyguard.policy.canonical import policy_summary, policy_to_dict, summary_line
from skyguard.policy.diff import diff_policies, format_diff
from skyguard.policy.lint import policy_warnings
from skyguard.policy.model import Policy
from skyguard.policy.parse import load_policy

POLICY_FILE = click.Path(dir_okay=False, path_type=str)  # existence is checked by load_policy


@click.group("policy")
def policy():
    """Check, print and compare policy files.

    \b
    Examples:
      skyguard policy validate policies/keysystems.yaml
      skyguard policy show policies/keysystems.yaml
      skyguard policy diff old.yaml new.yaml --json
    """


@policy.command("validate")
@click.argument("file", type=POLICY_FILE)
@json_option
def validate(file: str, as_json: bool) -> None:
    """Check FILE and print a summary, or every problem with its file, line and key.

    Exit status 0 when the policy is valid, 2 when it has any problem (and then nothing of it
    would be loaded). A valid policy that probably does not do what was meant (an allow rule to
    a network holding a workload's address, which that workload's own interface drops) gets a
    warning on stderr ("warnings" in --json); warnings never change the exit status.

    \b
    Examples:
      skyguard policy validate policies/keysystems.yaml
      skyguard policy validate new.yaml --json | jq .problems
    """
    try:
        parsed = load_policy(file)
    except PolicyError as e:
        count = len(e.problems)
        if as_json:
            emit_json({"valid": False, "file": file, "problems": [p.to_dict() for p in e.problems]})
        else:
            for problem in e.problems:
                click.echo(str(problem), err=True)
        # Raised, not click's Exit: main() turns SkyguardError into the exit code (2, bad input).
        raise BadInput(f"{file}: {count} problem{'s' if count != 1 else ''}; nothing loaded") from None
    warnings = policy_warnings(parsed)
    if as_json:
        emit_json({"valid": True, "file": file, **policy_summary(parsed),
                   "warnings": [w.to_dict() for w in warnings]})
    else:
        click.echo(summary_line(parsed))
        _warn_about(file, warnings)


def _warn_about(file: str, warnings) -> None:
    for warning in warnings:
        warn(f"warning: {file}:{warning.line}: {warning.message}" if warning.line else
             f"warning: {file}: {warning.message}")


@policy.command("show")
@click.argument("file", type=POLICY_FILE, required=False)
@state_dir_option
@json_option
def show(file: str | None, state_dir: Path | None, as_json: bool) -> None:
    """Print the zones, workloads, networks, rules and the other sections (credentials, content
    rules, keys, SSH access) of the policy in FILE (default: the one the running daemon enforces).

    --json prints the canonical form (every default spelled out, "*" expanded), which is itself a
    valid policy, with the file's sha256.

    \b
    Examples:
      skyguard policy show
      skyguard policy show policies/keysystems.yaml
      skyguard policy show policies/keysystems.yaml --json | jq '.policy.rules[].name'
    """
    from skyguard import control

    parsed = load_policy(file) if file else control.running_policy(state_dir)
    if as_json:
        emit_json({"source": parsed.source, "sha256": parsed.sha256, "summary": policy_summary(parsed),
                   "policy": policy_to_dict(parsed)})
    else:
        click.echo(format_policy(parsed))


@policy.command("diff")
@click.argument("old", type=POLICY_FILE)
@click.argument("new", type=POLICY_FILE, required=False)
@state_dir_option
@json_option
def diff(old: str, new: str | None, state_dir: Path | None, as_json: bool) -> None:
    """Show what NEW adds, removes and changes relative to OLD, by name. With one FILE, compare
    the running daemon's policy (OLD) with FILE (NEW): what `policy load FILE` would change.

    Zones, workloads, networks, rules, credentials, TLS terminations, SSH operators, content rules,
    keys and settings are compared in canonical form: reordering, comments and spelling are not changes.

    \b
    Examples:
      skyguard policy diff new.yaml                 # running policy -> new.yaml
      skyguard policy diff policies/keysystems.yaml new.yaml
      skyguard policy diff a.yaml b.yaml --json | jq '.changes[] | select(.kind == "rule")'
    """
    from skyguard import control

    if new is None:
        result = diff_policies(control.running_policy(state_dir), load_policy(old))
    else:
        result = diff_policies(load_policy(old), load_policy(new))
    if as_json:
        emit_json(result.to_dict())
    else:
        click.echo(format_diff(result))


@policy.command("load")
@click.argument("file", type=POLICY_FILE)
@state_dir_option
@json_option
def load(file: str, state_dir: Path | None, as_json: bool) -> None:
    """Hot-swap the running daemon's policy with FILE, atomically.

    FILE is validated first: with any error nothing is sent and the running policy stays. The
    swap itself has no moment without a policy and no moment with a mix of two; established flows
    the new policy still allows keep going, newly denied ones are cut. Every part follows: DNS,
    credential swap and TLS termination, SSH access. A part that cannot take the new policy is
    stopped, so what needs it is denied: the exit status is then 1 and stderr says which part and
    why. A part that runs without some of it (one TLS key missing from the store) is a warning.
    A part still taking the policy after 120 s goes on in the daemon (status shows it "pending",
    and no other load starts until it is done): exit status 1, stderr names it.

    \b
    Examples:
      skyguard policy diff new.yaml && skyguard policy load new.yaml
      skyguard policy load new.yaml --json
    """
    from skyguard import control

    parsed = load_policy(file)  # exit 2 with every problem before the daemon is asked
    with open(file, "rb") as f:
        text = f.read().decode("utf-8")
    # The daemon gives its parts up to 120 s to take a policy: wait longer than it does.
    reply = control.request("policy.load", timeout=180, text=text, source=str(file), state_dir=state_dir)
    reply.pop("ok", None)
    if as_json:
        emit_json(reply)
    else:
        click.echo(f"loaded {parsed.name} (sha256 {reply['sha256'][:16]}...), replacing "
                   f"{(reply.get('previous') or 'nothing')[:16]}...")
    _warn_about(file, policy_warnings(parsed))
    problems = reply.get("part_problems") or {}
    for part, problem in sorted(problems.items()):
        if problem["state"] == "failed":
            warn(f"{part} is NOT running under the new policy (what needs it is denied): {problem['problem']}")
        elif problem["state"] == "pending":
            warn(f"{part} has not finished taking the new policy, which the datapath enforces (what needs "
                 f"{part} may be refused until it has): {problem['problem']}")
        else:
            warn(f"warning: {part} runs without some of the policy (that stays off): {problem['problem']}")
    if any(problem["state"] in ("failed", "pending") for problem in problems.values()):
        raise SystemExit(1)  # the policy is in force, but a part it needs is not (or not yet)


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*headers).rstrip(), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row).rstrip() for row in rows]
    return lines


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"


def _content_lines(policy: Policy) -> list[str]:
    """The `content:` section: one row per rule, and what every block says (any engine that
    finds something blocks the file)."""
    content = policy.content
    lines = [f"Content rules (clamd at {content.clamd_socket}, {content.scan_timeout:g} s per scan; files over "
             f"{_size(content.max_inspect_bytes)} are refused unscanned, over "
             f"{_size(content.clamd_max_file_bytes)} when a clamav rule covers them)"]
    every_zone = tuple(policy.zones)
    rows = []
    for rule in content.rules:
        block = rule.block
        blocks = [f"types {', '.join(block.mime_types)}"] if block.mime_types else []
        if block.max_size is not None:
            blocks.append(f"over {_size(block.max_size)}")
        if block.clamav:
            blocks.append("ClamAV finds")
        blocks += [f"YARA {Path(f).name}" for f in block.yara]
        if block.patterns:
            blocks.append(f"{len(block.patterns)} pattern{'s' if len(block.patterns) != 1 else ''}")
        zones = "*" if rule.zones == every_zone and len(every_zone) > 1 else ", ".join(rule.zones)
        rows.append([rule.name, zones, ", ".join(rule.directions), ", ".join(rule.protocols),
                     "; ".join(blocks) or "(nothing)"])
    return lines + _table(["rule", "zones", "direction", "protocols", "blocks"], rows)


def _keys_lines(policy: Policy) -> list[str]:
    """The `keys:` section: where keys live, and one row per key VMs may use (the proxy checks
    zones and operations; the datapath lets only those zones reach its port)."""
    from skyguard.policy.keys import rate_text

    keys = policy.keys
    assert keys is not None
    where = {"pkcs11": f"token {keys.token} through {keys.module}, PIN in secret {keys.pin_secret}",
             "tpm": "in this host's TPM (wrapped blobs in <state dir>/keys/tpm)"}.get(keys.backend, "sealed in the store")
    lines = [f"Keys ({keys.backend} backend: {where}; crypto proxy on the VMs' gateway, tcp/{keys.port})"]
    every_zone = tuple(policy.zones)
    rows = [[g.name, "*" if g.zones == every_zone and len(every_zone) > 1 else ", ".join(g.zones),
             ", ".join(g.operations), rate_text(g.rate, g.burst)] for g in keys.grants]
    return lines + _table(["key", "zones", "operations", "rate limit (per VM)"], rows)


def format_policy(policy: Policy) -> str:
    """A readable, plain-text view of a policy (what `policy show` prints)."""
    lines = [summary_line(policy), f"source {policy.source}" if policy.source else "", ""]
    lines.append("Workloads")
    lines += _table(["zone", "workload", "interface", "mac", "addresses"],
                    [[w.zone, w.name, w.interface, w.mac, ", ".join(str(a) for a in w.addresses)]
                     for w in policy.workloads()])
    if policy.networks:
        lines += ["", "Networks"]
        lines += _table(["network", "cidrs"],
                        [[name, ", ".join(str(c) for c in cidrs)] for name, cidrs in policy.networks.items()])
    lines += ["", "Rules (default deny; deny beats allow)"]
    every_zone = tuple(policy.zones)
    rows = []
    for rule in policy.rules:
        source = "*" if rule.from_zones == every_zone and len(every_zone) > 1 else ", ".join(rule.from_zones)
        targets = [f"zone {z}" for z in rule.to.zones] + [f"net {n}" for n in rule.to.networks]
        targets += [str(c) for c in rule.to.cidrs] + list(rule.to.fqdns)
        if rule.to.allow_private:
            targets.append("(names may resolve to private addresses)")
        ports = ", ".join(str(p) for p in rule.ports) or "any"
        rows.append([rule.name, rule.action, source, ", ".join(targets), ports])
    lines += _table(["rule", "action", "from", "to", "ports"], rows)
    dns = policy.dns
    lines += ["", f"DNS: upstreams {', '.join(dns.upstreams) or '(none)'}; refuse with {dns.refuse_with}; "
                  f"ttl {dns.min_ttl}-{dns.max_ttl}s; tunnel detection {dns.tunnel_detection.action}"]
    if policy.credentials:
        lines += ["", "Credentials (placeholders only; secrets stay in the store)"]
        lines += _table(["credential", "secret name", "zones", "destinations", "inject"],
                        [[c.name, c.secret, ", ".join(c.zones), ", ".join(c.destinations),
                          (f"header {c.inject.header}" if c.inject.header else "")
                          + (" + body" if c.inject.body else "")]
                         for c in policy.credentials])
    if policy.tls_termination:
        lines += ["", "TLS termination"]
        lines += _table(["workload", "port", "forward to", "certificate"],
                        [[t.workload, str(t.port), str(t.forward_to), t.certificate]
                         for t in policy.tls_termination])
    if policy.content.rules:
        lines += ["", *_content_lines(policy)]
    if policy.keys is not None:
        lines += ["", *_keys_lines(policy)]
    if policy.admin_ssh:
        ssh = policy.admin_ssh
        lines += ["", f"Admin SSH on {ssh.listen} (port forwarding {'on' if ssh.port_forwarding else 'off'}, "
                      f"agent forwarding {'on' if ssh.agent_forwarding else 'off'}, "
                      f"sftp {'on' if ssh.sftp else 'off'})"]
        lines += _table(["operator", "key type", "may access"],
                        [[o.name, o.public_key.split()[0], ", ".join(o.may_access)] for o in ssh.operators])
    return "\n".join(line for i, line in enumerate(lines) if line or i > 1)
