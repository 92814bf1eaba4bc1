"""`skyguard flows`: recent and live flow records from the running daemon (control op "flows"),
and beside them the uploads and downloads the content filter blocked.

A thin command: the daemon's FlowLogger keeps the flow records and filters them; this prints them.
Content blocks are the proxies' decisions, not the datapath's: they are read from the tail of the
signed log (skyguard/content/record.py). Not the signed log itself (that is `skyguard log show
--type flow_start` and friends): these are the same records, for a quick look.
"""

from __future__ import annotations

import json
import time

import click

from skyguard import config
from skyguard.cli.common import emit_json, json_option, state_dir_option, warn
from skyguard.content.record import KIND as CONTENT_BLOCKED
from skyguard.errors import SkyguardError

FOLLOW_PERIOD_S = 1.0


def _when(ns) -> str:
    if not isinstance(ns, int):
        return "-"
    return time.strftime("%H:%M:%S", time.localtime(ns / 1e9)) + f".{ns // 1_000_000 % 1000:03d}"


def _end(addr, port) -> str:
    if addr is None:
        return "*"
    return f"[{addr}]:{port}" if ":" in str(addr) else f"{addr}:{port}"


def _who(zone, workload) -> str:
    if workload:
        return f"{zone}/{workload}"
    return zone or "outside"


def format_content_block(r: dict) -> str:
    """A blocked upload or download: who, where to, what (size, type, digest) and why."""
    what = f"{r.get('protocol')} {r.get('direction')} {r.get('size')} bytes"
    if r.get("mime"):
        what += f" {r['mime']}"
    what += f" sha256 {str(r.get('sha256') or '-')[:16]}"
    if r.get("path"):  # SFTP: the file's name on the VM, and the operator who sent it
        what += f" path {r['path']} by {r.get('operator')}"
    why = f"rule={r.get('rule')} engine={r.get('engine')} reason={r.get('reason')}"
    return (f"{_when(r.get('time'))} {'BLOCK':6} {'FILE':5} {_who(r.get('zone'), r.get('workload'))} -> "
            f"{r.get('destination') or '-'}  {what}  {why}")


def format_record(r: dict) -> str:
    kind = r.get("type", "?")
    if kind == CONTENT_BLOCKED:
        return format_content_block(r)
    if kind == "ring_loss":
        return (f"{_when(r.get('time'))} LOSS       the ring buffer could not take {r['lost']} events "
                f"({r['total']} in total): they are counted, not logged one by one")
    verdict = r.get("verdict", "?").upper()
    who = f"{_who(r.get('src_zone'), r.get('src_workload'))} -> {_who(r.get('dst_zone'), r.get('dst_workload'))}"
    if r.get("summary"):
        what = f"{r.get('flows')} flows on {r.get('interface')} ({r.get('direction')})"
    elif r.get("proto") in ("icmp", "icmpv6"):  # its "ports" are echo id and type: --json has them
        what = f"{r.get('proto')} {r.get('src')} -> {r.get('dst')}"
    else:
        what = f"{r.get('proto')} {_end(r.get('src'), r.get('sport'))} -> {_end(r.get('dst'), r.get('dport'))}"
    if not r.get("summary") and r.get("interface"):
        # a VM-to-VM flow is decided twice: where it leaves one VM and where it enters the other
        what += f"  at {r['interface']} ({'out of' if r.get('direction') == 'egress' else 'into'} the VM)"
    why = f"rule={r['rule']}" if r.get("rule") else ""
    why += f" reason={r.get('reason')}"
    counts = ""
    if "packets" in r:
        counts = f" packets={r['packets']}" + (f" bytes={r['bytes']}" if "bytes" in r else "")
    label = {"flow_start": "START", "flow_end": "END", "deny": "DENY"}.get(kind, kind)
    return f"{_when(r.get('time'))} {verdict:6} {label:5} {who}  {what}  {why.strip()}{counts}"


@click.command("flows")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new records as they come (Ctrl-C stops).")
@click.option("--zone", default=None, help="Only records whose source or destination is in this zone.")
@click.option("--verdict", type=click.Choice(["allow", "deny", "loss"]), default=None,
              help="Only allowed flows (start and end), denies, or ring buffer losses.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True,
              help="At most this many records (the newest) per reply.")
@state_dir_option
@json_option
def flows(follow, zone, verdict, limit, state_dir, as_json):
    """Recent and live flow records: verdict, rule, reason, zones, workloads, 5-tuple, counts;
    and files the content filter blocked (BLOCK FILE: zone, workload, rule, engine, protocol,
    destination, size, SHA-256), which count as denies for --verdict.

    Flow records come from the running daemon's memory (the newest few thousand), content blocks
    from the newest entries of the signed log, which holds them all (`skyguard log show`). With
    --json and --follow, one JSON object per line.

    \b
    Examples:
      skyguard flows
      skyguard flows --verdict deny --zone sandbox
      skyguard flows --follow --json | jq -c 'select(.rule == "syslog")'
    """
    from skyguard import control

    args = {"zone": zone, "verdict": verdict, "limit": limit, "state_dir": state_dir}
    reply = control.request("flows", sync=True, since=0, **args)
    blocks = ContentBlocks(state_dir, zone, verdict)
    records = merged(reply["records"], blocks.read(), limit)
    if as_json and not follow:
        emit_json({"records": records, "cursor": reply["cursor"]})
        return
    _print(records, as_json)
    cursor = reply["cursor"]
    if not follow:
        if not records and not as_json:
            warn("no flow records yet" + (" matching the filters" if zone or verdict else ""))
        return
    try:
        while True:
            time.sleep(FOLLOW_PERIOD_S)
            reply = control.request("flows", since=cursor, **args)
            if reply.get("missed"):
                warn(f"({reply['missed']} records were dropped from the daemon's memory before "
                     f"they could be shown; the signed log has them)")
            _print(merged(reply["records"], blocks.read(), 2 * limit), as_json)
            cursor = reply["cursor"]
    except KeyboardInterrupt:
        return


class ContentBlocks:
    """The content_blocked entries of the signed log, read from where the last read ended. A log
    this command cannot read is said once on stderr; the flow records are still shown."""

    def __init__(self, state_dir, zone: str | None, verdict: str | None):
        self.log_dir = (state_dir or config.STATE_DIR) / "log"
        self.zone = zone
        self.wanted = verdict in (None, "deny")  # a block is a deny
        self.next: int | None = None  # log index to read from; None: the newest entries

    def read(self) -> list[dict]:
        from skyguard.content.record import blocks_in_log

        if not self.wanted:
            return []
        try:
            found, self.next = blocks_in_log(self.log_dir, self.next)
        except (OSError, ValueError, SkyguardError) as error:
            warn(f"(content blocks not shown: cannot read the signed log in {self.log_dir}: {error})")
            self.wanted = False
            return []
        return [{**r, "verdict": "deny"} for r in found if self.zone is None or r.get("zone") == self.zone]


def merged(flow_records: list[dict], blocks: list[dict], limit: int) -> list[dict]:
    """Both kinds of record in time order, the newest `limit`."""
    records = sorted(flow_records + blocks, key=lambda r: r.get("time") if isinstance(r.get("time"), int) else 0)
    return records[-limit:]


def _print(records: list[dict], as_json: bool) -> None:
    for r in records:
        click.echo(json.dumps(r, sort_keys=True) if as_json else format_record(r))
