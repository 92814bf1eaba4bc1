"""`skyguard top`: a live terminal view of zones, workloads, flows and drops, refreshed in place.

It reads the running daemon's control socket (operations "status" and "flows.active") once per interval
and turns two consecutive counter readings into rates. Built for a terminal over SSH: plain ANSI
through rich, no mouse, keys read in cbreak mode (q quits, Ctrl-C too). `--once` prints one frame
(totals, no rates) and exits, for scripts and logs.

Not here: what the numbers are (the daemon's status and flows replies) or how `skyguard status`
prints (cli/render.py, whose helpers this reuses).
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import time
from collections.abc import Collection
from dataclasses import dataclass, field

import click
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from skyguard.cli.render import _table, human_bytes, human_count, human_duration, reason_text
from skyguard.datapath import abi
from skyguard.errors import BadInput, DaemonError

MIN_INTERVAL = 0.2  # seconds; faster than this the daemon spends more time answering than enforcing


@dataclass
class Snapshot:
    """One reading of the daemon: its status reply, its flows reply and when they were taken."""

    status: dict
    flows: dict
    at: float  # time.monotonic()
    error: str | None = None


@dataclass
class Rates:
    """Per-second rates between two snapshots, keyed like the counters."""

    traffic: dict = field(default_factory=dict)  # (zone, direction, verdict) -> (pps, Bps)
    drops: dict = field(default_factory=dict)  # (zone, reason) -> pps


def read_snapshot(limit: int) -> Snapshot:
    from skyguard import control

    status = control.request("status", timeout=10)
    try:
        flows = control.request("flows.active", timeout=10, limit=limit)
    except BadInput as e:  # a daemon without the "flows.active" operation still has counters to show
        if "unknown operation" not in str(e):
            raise
        flows = {"flows": [], "total": 0, "by_zone": {}, "workloads": {}, "missing": True}
    return Snapshot(status, flows, time.monotonic())


def _traffic_totals(status: dict) -> dict:
    out: dict = {}
    for r in (status.get("counters") or {}).get("traffic", ()):
        key = (r["zone"], r["direction"], r["verdict"])
        p, b = out.get(key, (0, 0))
        out[key] = (p + int(r.get("packets", 0)), b + int(r.get("bytes", 0)))
    return out


def _drop_totals(status: dict) -> dict:
    out: dict = {}
    for r in (status.get("counters") or {}).get("drops", ()):
        key = (r["zone"], r["reason"])
        out[key] = out.get(key, 0) + int(r.get("packets", 0))
    return out


def rates_between(old: Snapshot | None, new: Snapshot) -> Rates | None:
    if old is None or old.error or new.error or new.at <= old.at:
        return None
    dt = new.at - old.at
    rates = Rates()
    before = _traffic_totals(old.status)
    for key, (p, b) in _traffic_totals(new.status).items():
        p0, b0 = before.get(key, (0, 0))
        rates.traffic[key] = (max(0, p - p0) / dt, max(0, b - b0) / dt)
    dropped_before = _drop_totals(old.status)
    for key, p in _drop_totals(new.status).items():
        rates.drops[key] = max(0, p - dropped_before.get(key, 0)) / dt
    return rates


def _zones(snap: Snapshot) -> list[str]:
    zones = set(snap.flows.get("by_zone") or {})
    zones |= {w.get("zone") for w in (snap.flows.get("workloads") or {}).values() if w.get("zone")}
    zones |= {k[0] for k in _traffic_totals(snap.status)}
    zones |= {k[0] for k in _drop_totals(snap.status)}
    return sorted(zones)


def _rate(value: float | None, unit: str = "/s") -> str:
    return "-" if value is None else f"{human_count(value)}{unit}"


def zones_table(snap: Snapshot, rates: Rates | None, only: Collection[str]) -> Table:
    table = _table("Zones", "zone", "workloads", "flows", "allowed out", "allowed in", "dropped", "drops",
                   "top drop reason", right=["workloads", "flows", "allowed out", "allowed in", "dropped", "drops"])
    workloads = snap.flows.get("workloads") or {}
    by_zone = snap.flows.get("by_zone") or {}
    traffic = _traffic_totals(snap.status)
    drops = _drop_totals(snap.status)
    for zone in _zones(snap):
        if only and zone not in only:
            continue
        n_workloads = sum(1 for w in workloads.values() if w.get("zone") == zone)
        zone_drops = {reason: p for (z, reason), p in drops.items() if z == zone}
        top_reason = max(zone_drops, key=zone_drops.get) if zone_drops else ""
        if rates is not None:
            out = sum(pps for (z, d, v), (pps, _b) in rates.traffic.items() if z == zone and d == "egress" and v != "drop")
            inn = sum(pps for (z, d, v), (pps, _b) in rates.traffic.items() if z == zone and d == "ingress" and v != "drop")
            dropped = sum(pps for (z, _r), pps in rates.drops.items() if z == zone)
            cells = (_rate(out, " pps"), _rate(inn, " pps"), Text(_rate(dropped, " pps"), style="bold red" if dropped else ""))
        else:  # --once: totals since the datapath started
            out = sum(p for (z, d, v), (p, _b) in traffic.items() if z == zone and d == "egress" and v != "drop")
            inn = sum(p for (z, d, v), (p, _b) in traffic.items() if z == zone and d == "ingress" and v != "drop")
            cells = (human_count(out), human_count(inn), Text("-"))
        table.add_row(zone, str(n_workloads), str(by_zone.get(zone, 0)), *cells,
                      Text(human_count(sum(zone_drops.values())), style="red" if zone_drops else ""),
                      Text(top_reason, style="red"))
    return table


def workloads_table(snap: Snapshot, only: Collection[str]) -> Table:
    table = _table("Workloads", "workload", "zone", "interface", "programs", "flows", "bytes",
                   right=["programs", "flows", "bytes"])
    attached = snap.status.get("interfaces") or {}
    per_if: dict[str, list[int]] = {}
    for f in snap.flows.get("flows") or ():
        acc = per_if.setdefault(f.get("interface", ""), [0, 0])
        acc[0] += 1
        acc[1] += int(f.get("bytes", 0))
    for ifname, w in sorted((snap.flows.get("workloads") or {}).items(), key=lambda kv: (kv[1]["zone"], kv[1]["workload"])):
        if only and w.get("zone") not in only:
            continue
        hooks = attached.get(ifname) or {}
        n = sum(1 for v in hooks.values() if isinstance(v, dict) and v.get("id") is not None)
        flows, nbytes = per_if.get(ifname, (0, 0))
        table.add_row(w["workload"], w["zone"], ifname, Text(f"{n}/2", style="green" if n >= 2 else "bold red"),
                      str(flows), human_bytes(nbytes))
    return table


def flows_table(snap: Snapshot, only: Collection[str], limit: int) -> Table:
    total = snap.flows.get("total", 0)
    title = f"Flows (largest {min(limit, total)} of {total})"
    if snap.flows.get("missing"):
        title = "Flows (this daemon has no \"flows.active\" operation; upgrade it)"
    # The workload names the zone; addresses and rule names may wrap on a narrow terminal
    # (a wrapped address is still whole, an ellipsised one is not).
    table = _table(title, "workload", "dir", "proto", "source", "destination", "state", "rule", "packets", "bytes",
                   right=["packets", "bytes"], wrap=("source", "destination", "rule"))
    shown = 0
    for f in snap.flows.get("flows") or ():
        if only and f.get("zone") not in only:
            continue
        if shown >= limit:
            break
        shown += 1
        proto = abi.PROTO_NAMES.get(f.get("proto"), str(f.get("proto")))
        table.add_row(f.get("workload") or f.get("interface", ""), f.get("direction", "")[:3],
                      proto, _endpoint(f.get("src"), f.get("sport")), _endpoint(f.get("dst"), f.get("dport")),
                      f.get("state", ""), f.get("rule", ""), human_count(f.get("packets", 0)),
                      human_bytes(f.get("bytes", 0)))
    return table


def _endpoint(addr, port) -> str:
    if not port:
        return str(addr)
    return f"[{addr}]:{port}" if ":" in str(addr) else f"{addr}:{port}"


def drops_table(snap: Snapshot, rates: Rates | None, only: Collection[str]) -> Table:
    table = _table("Drops", "zone", "reason", "packets", "rate", "meaning", right=["packets", "rate"])
    drops = _drop_totals(snap.status)
    for (zone, reason), p in sorted(drops.items(), key=lambda kv: -kv[1]):
        if only and zone not in only:
            continue
        rate = rates.drops.get((zone, reason)) if rates is not None else None
        table.add_row(zone, Text(reason, style="red"), human_count(p), _rate(rate), reason_text(reason))
    if not drops:
        table.add_row(Text("no drops", style="dim"), "", "", "", "")
    return table


def frame(snap: Snapshot, rates: Rates | None, only: Collection[str] = frozenset(), limit: int = 15) -> Group:
    """One screen of `skyguard top`, from a snapshot and the rates since the previous one."""
    if snap.error:
        return Group(Text(f"skyguard top: {snap.error}", style="bold red"),
                     Text("retrying; q quits", style="dim"))
    policy = snap.status.get("policy") or {}
    lost = (snap.status.get("counters") or {}).get("events_lost", 0)
    header = Text.assemble(("skyguard top", "bold"), f"  policy {policy.get('name', '?')} ",
                           (str(policy.get("sha256", ""))[:12], "dim"),
                           f"  pid {snap.status.get('pid', '?')}  up {human_duration(snap.status.get('uptime_s'))}  ",
                           (f"events lost {lost}", "bold red" if lost else "dim"),
                           ("   q quits", "dim"))
    return Group(header, zones_table(snap, rates, only), workloads_table(snap, only), drops_table(snap, rates, only),
                 flows_table(snap, only, limit))


@contextlib.contextmanager
def _keys():
    """stdin in cbreak mode (keys arrive one by one, unechoed; Ctrl-C still interrupts), restored on exit."""
    if not sys.stdin.isatty():
        yield None
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _wait_for_quit(fd: int | None, seconds: float) -> bool:
    """Sleep up to `seconds`; True if q was pressed (or stdin closed)."""
    if fd is None:
        time.sleep(seconds)
        return False
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            data = os.read(fd, 64)
            if not data or b"q" in data.lower():
                return True
    return False


@click.command("top", epilog="""\b
Examples:
  skyguard top                       live view, refreshed every second (q or Ctrl-C quits)
  skyguard top --zone sandbox        only the sandbox zone
  skyguard top --once                one frame of totals, then exit (for scripts and logs)
  ssh admin@host -t sudo skyguard top
""")
@click.option("--interval", type=float, default=1.0, show_default=True, help="Seconds between refreshes.")
@click.option("--zone", "zones", multiple=True, help="Show only this zone (repeatable).")
@click.option("--flows", "flow_limit", type=click.IntRange(1, 1000), default=15, show_default=True,
              help="How many of the largest flows to list.")
@click.option("--once", is_flag=True, help="Print one frame and exit.")
def top(interval, zones, flow_limit, once):
    """Live view of zones, workloads, flows and drops from the running daemon.

    Rates (packets per second allowed and dropped per zone) come from two consecutive readings
    of the datapath's counters. Works over SSH in any ANSI terminal; no mouse needed.
    """
    from rich.live import Live

    if interval < MIN_INTERVAL:
        raise BadInput(f"--interval {interval} is too short; use at least {MIN_INTERVAL} seconds")
    only = set(zones)
    console = Console(highlight=False)
    if once:
        console.print(frame(read_snapshot(flow_limit * 4), None, only, flow_limit))
        return
    previous = None
    live = Live(console=console, screen=True, auto_refresh=False) if console.is_terminal else None
    try:
        with _keys() as fd, (live or contextlib.nullcontext()):
            while True:
                try:
                    snap = read_snapshot(flow_limit * 4)
                except DaemonError as e:
                    if previous is None:
                        raise  # no daemon (or no permission) from the start: say so and exit
                    # The daemon went away after we saw it (a restart): keep the view up, say so.
                    snap = Snapshot({}, {}, time.monotonic(), error=str(e))
                view = frame(snap, rates_between(previous, snap), only, flow_limit)
                if live is not None:
                    live.update(view, refresh=True)
                else:  # piped: one frame after another, nothing redrawn
                    console.print(view)
                previous = snap
                if _wait_for_quit(fd, interval):
                    break
    except KeyboardInterrupt:
        pass
