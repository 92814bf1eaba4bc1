"""The readable `skyguard status`: the daemon's status dict as rich tables (programs per interface,
policy, map occupancy, counters by zone/direction/verdict, drops by reason, signed-log head).

Pure presentation: it reads the dict the daemon's "status" control operation returns and prints;
it asks nothing of the daemon and decides nothing. `status_tables(status)` returns the renderables
(tested without a terminal); `print_status(status)` prints them. `skyguard top` reuses the helpers.
"""

from __future__ import annotations

from collections.abc import Iterable

from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

HOOKS = ("xdp", "tc_ingress", "tc_egress")
VERDICT_ORDER = ("allow", "established", "control", "dns", "drop")


def human_count(n) -> str:
    n = float(n or 0)
    for unit in ("", "k", "M", "G", "T"):
        if abs(n) < 1000:
            if unit == "":  # whole counts stay whole; a small rate keeps one decimal (0.5 pps)
                return f"{n:.0f}" if n == int(n) or n >= 10 else f"{n:.1f}"
            return f"{n:.0f}{unit}" if n >= 100 else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}P"


def human_bytes(n) -> str:
    n = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def human_duration(seconds) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def reason_text(reason: str) -> str:
    """What a drop reason means, from the datapath's table when it is available."""
    try:
        from skyguard.datapath.reasons import BY_NAME
    except Exception:  # the table is optional for printing; the reason name is still shown
        return ""
    r = BY_NAME.get(str(reason).upper())
    return r.text if r else ""


def _table(title: str, *columns: str, right: Iterable[str] = (), wrap: Iterable[str] = ("meaning",)) -> Table:
    table = Table(title=title, title_justify="left", title_style="bold", box=box.SIMPLE_HEAD,
                  header_style="bold cyan", pad_edge=False)
    right = set(right)
    for c in columns:
        # Names and numbers never wrap (a cut name misleads); long descriptive cells may.
        table.add_column(c, justify="right" if c in right else "left", no_wrap=c not in wrap,
                         min_width=min(len(c), 12))
    return table


def summary_table(status: dict) -> Table:
    policy = status.get("policy") or {}
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    table.add_row("daemon", f"pid {status.get('pid', '?')}, up {human_duration(status.get('uptime_s'))}")
    table.add_row("policy", f"{policy.get('name', '?')}  sha256 {str(policy.get('sha256', '?'))[:16]}…"
                  if policy.get("sha256") else str(policy.get("name", "none loaded")))
    if policy.get("source"):
        table.add_row("source", str(policy["source"]))
    lost = (status.get("counters") or {}).get("events_lost", 0)
    table.add_row("events lost", Text(str(lost), style="bold red" if lost else ""))
    tamper = status.get("tamper_events", 0)
    table.add_row("tamper events", Text(str(tamper), style="bold red" if tamper else ""))
    parts = status.get("parts") or {}
    if parts:
        table.add_row("parts", Text(", ".join(f"{name} {state}" for name, state in parts.items()),
                                    style="bold red" if {"failed", "degraded", "pending"} & set(parts.values()) else ""))
    dns = status.get("dns") or {}
    if dns.get("log_refused_after_answer"):
        table.add_row("dns", Text(f"{dns['log_refused_after_answer']} answer(s) left before the log refused their "
                                  f"entries; {dns.get('unlearned', 0)} address(es) only they opened closed again "
                                  f"(last: {dns.get('last_refusal')})", style="bold red"))
    secrets = status.get("secrets") or {}
    if secrets.get("problem"):
        table.add_row("secrets", Text(secrets["problem"], style="bold red"))
    if secrets.get("missing"):
        table.add_row("secrets missing", Text(", ".join(secrets["missing"]), style="bold red"))
    if secrets.get("unused"):
        table.add_row("secrets unused", ", ".join(secrets["unused"]) + "  (no policy names them; "
                      "`skyguard secret rm NAME`)")
    tpm = status.get("tpm")
    if tpm:  # skyguard/tpm/hook.py DaemonTpm.status()
        table.add_row("store key", {"tpm": "sealed by the TPM", "none": "none yet",
                                    "file": "a file (`skyguard tpm seal-store` seals it to the TPM)"}
                      .get(tpm.get("store_key"), "?"))
        if tpm.get("available"):  # a problem then: measurements wait for the TPM lock (quotes fail meanwhile)
            last = (tpm.get("last_quote") or {}).get("result", "none yet")
            table.add_row("TPM", Text(f"PCR {tpm.get('pcr')}, {tpm.get('event_log_lines', 0)} measurements, "
                                      f"{tpm.get('measurements_pending', 0)} pending, last quote {last}"
                                      + (f"; {tpm['problem']}" if tpm.get("problem") else ""),
                                      style="" if last in ("ok", "none yet") and not tpm.get("problem") else "bold red"))
        else:
            table.add_row("TPM", Text(str(tpm.get("problem", "none")), style="bold red" if tpm.get("configured") else ""))
    return table


def interfaces_table(status: dict, workloads: dict | None = None) -> Table:
    """workloads: optional {ifname: {"workload", "zone"}} to name the VM behind each interface."""
    columns = ["interface", "workload", "from VM", "to VM", "state"] if workloads else \
        ["interface", "from VM", "to VM", "state"]
    table = _table("Interfaces and programs", *columns, wrap=("from VM", "to VM"))
    interfaces = status.get("interfaces") or {}
    for ifname in sorted(interfaces):
        hooks = interfaces[ifname] or {}
        w = (workloads or {}).get(ifname, {})

        def prog(*names, hooks=hooks):
            for name in names:
                p = hooks.get(name)
                if isinstance(p, dict) and p.get("id") is not None:
                    mode = f" {p['mode']}" if p.get("mode") else ""
                    return f"{name.split('_')[0]}{mode} #{p['id']} {p.get('name', '')} tag {str(p.get('tag', ''))[:8]}"
            return Text("none", style="bold red")

        intact = hooks.get("intact", True)
        cells = [ifname, w.get("workload", "")] if workloads else [ifname]
        table.add_row(*cells, prog("xdp", "tc_ingress"), prog("tc_egress"),
                      Text("ok", style="green") if intact else Text("tampered", style="bold red"))
    if not interfaces:
        table.add_row(Text("no interface carries skyguard programs", style="yellow"), *[""] * (len(columns) - 1))
    return table


def maps_table(status: dict) -> Table:
    table = _table("Map occupancy", "map", "entries", right=["entries"])
    for name, n in sorted((status.get("maps") or {}).items()):
        table.add_row(name, human_count(n) if n >= 10000 else str(n))
    return table


def traffic_table(status: dict) -> Table:
    rows: dict[tuple, list[int]] = {}
    for r in (status.get("counters") or {}).get("traffic", ()):
        acc = rows.setdefault((r["zone"], r["direction"], r["verdict"]), [0, 0])
        acc[0] += int(r.get("packets", 0))
        acc[1] += int(r.get("bytes", 0))
    table = _table("Traffic by zone, direction (egress = from the VM) and verdict",
                   "zone", "direction", "verdict", "packets", "bytes", right=["packets", "bytes"])
    order = {v: i for i, v in enumerate(VERDICT_ORDER)}
    for (zone, direction, verdict), (p, b) in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                                                                     order.get(kv[0][2], 99))):
        table.add_row(zone, direction, Text(verdict, style="red" if verdict == "drop" else ""),
                      human_count(p), human_bytes(b))
    if not rows:
        table.add_row(Text("no traffic yet", style="dim"), "", "", "", "")
    return table


def drops_table(status: dict) -> Table:
    rows: dict[tuple, int] = {}
    for r in (status.get("counters") or {}).get("drops", ()):
        key = (r["reason"], r["zone"], r["direction"])
        rows[key] = rows.get(key, 0) + int(r.get("packets", 0))
    table = _table("Drops by reason", "reason", "zone", "direction", "packets", "meaning", right=["packets"])
    for (reason, zone, direction), p in sorted(rows.items(), key=lambda kv: -kv[1]):
        table.add_row(Text(reason, style="bold red"), zone, direction, human_count(p), reason_text(reason))
    if not rows:
        table.add_row(Text("no drops", style="dim"), "", "", "", "")
    return table


LOG_FIELDS = (  # (key in the log head, label, how to show it)
    ("size", "entries", str),
    ("checkpointed_size", "covered by the last checkpoint", str),
    ("history_size", "covered by checkpoints.log", str),
    ("checkpoint_age_s", "last checkpoint", lambda v: f"{human_duration(v)} ago"),
    ("bytes", "on disk", human_bytes),
    ("origin", "origin", str),
    ("filesystem_free_bytes", "free on its filesystem", human_bytes),
    ("reserve_bytes", "kept free (below it: refused)", human_bytes),
    ("refused_entries", "refused for space", str),
    ("queued_entries", "waiting to be written", str),
    ("write_wait_s", "current write waiting for", lambda v: f"{v:.3f} s"),
    ("stall_refused_entries", "refused while behind (disk stalled)", str),
    ("refusing", "accepts no entries", str),
)


def log_table(status: dict) -> Table:
    head = status.get("log") or {}
    table = _table("Signed log", "field", "value")
    if not head:
        table.add_row(Text("no log information", style="yellow"), "")
        return table
    known = {key for key, _label, _show in LOG_FIELDS}
    for key, label, show in LOG_FIELDS:
        if head.get(key) is not None:
            table.add_row(label, show(head[key]))
    for key in sorted(set(head) - known):  # fields a newer log adds still show
        table.add_row(key, str(head[key]))
    size, covered = head.get("size"), head.get("checkpointed_size")
    if isinstance(size, int) and isinstance(covered, int) and size > covered:
        table.add_row("", Text(f"{size - covered} entries not yet under a signed checkpoint", style="yellow"))
    return table


def status_tables(status: dict, workloads: dict | None = None) -> Group:
    return Group(summary_table(status), interfaces_table(status, workloads), traffic_table(status),
                 drops_table(status), maps_table(status), log_table(status))


def print_status(status: dict, console: Console | None = None) -> None:
    """Print the daemon's status dict (the "status" control reply) as tables on stdout."""
    (console or Console(highlight=False)).print(status_tables(status, status.get("workloads")))
