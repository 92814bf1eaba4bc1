"""`skyguard doctor`: print each prerequisite check as ok or FAIL with its fix; exit 0 only if all pass.

A thin command over skyguard.doctor, which holds the checks themselves.
"""

from __future__ import annotations

import sys

import click

from skyguard import doctor as checks
from skyguard.cli.common import emit_json, json_option


@click.command("doctor", epilog="""\b
Examples:
  sudo skyguard doctor           check this machine, one line per prerequisite
  sudo skyguard doctor --json    the same as JSON: {"ok": ..., "checks": [{name, ok, detail, fix}]}
""")
@json_option
def doctor(as_json: bool) -> None:
    """Check every prerequisite and say how to fix what is missing.

    Privileges, the bpf syscall, bpffs, Debian's bcc, kernel headers (by compiling a tiny XDP
    program), libbpf, network namespaces, XDP (generic and native) and TC attach on a throwaway
    veth pair in a throwaway namespace, and nftables. Exit status 0 only if every check passes.
    """
    results = checks.run_checks()
    all_ok = all(c.ok for c in results)
    if as_json:
        emit_json({"ok": all_ok, "checks": [c.as_dict() for c in results]})
    else:
        width = max(len(c.name) for c in results)
        for c in results:
            click.echo(f"{'ok  ' if c.ok else 'FAIL'}  {c.name:<{width}}  {c.detail}")
            if not c.ok:
                click.echo(f"      {'':<{width}}  fix: {c.fix}")
        failed = [c.name for c in results if not c.ok]
        click.echo("all checks passed" if all_ok else
                   f"{len(failed)} of {len(results)} checks failed: {', '.join(failed)}")
    if not all_ok:
        # SystemExit, not ctx.exit(1): main() runs click with standalone_mode=False, where
        # ctx.exit's code is returned rather than used as the exit status.
        sys.exit(1)
