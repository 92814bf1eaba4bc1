"""Prometheus collectors that read skyguard's state when Prometheus scrapes, and the HTTP server.

There is no polling loop: DatapathCollector sums the per-CPU counter maps at the moment of the
scrape (Datapath.counters()), so a scrape never shows numbers older than itself, and an idle
skyguard costs nothing. DaemonCollector does the same for the policy, the signed log and the
daemon's own facts.

Label values are bounded by construction (SPEC.md section 7): zone and workload come from the
policy (anything else becomes "unknown"), direction, verdict and reason from fixed kernel tables,
map names from the datapath's fixed set. Never an address, a domain name or a URL: a flood from
a million source addresses adds no series.

A collector that fails (the datapath is being swapped, a map is gone) must not break the scrape
of every other metric: it reports skyguard_<collector>_scrape_ok 0 and logs why.

Not here: what other parts count (DNS, credential and SSH proxies register their own metrics in
the registry handed to MetricsExporter), and how `skyguard status` prints (cli/render.py).
"""

from __future__ import annotations

import ipaddress
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

from skyguard import config
from skyguard.errors import BadInput, DaemonError

log = logging.getLogger("skyguard.metrics")

DIRECTIONS = ("egress", "ingress")
VERDICTS = ("allow", "established", "control", "dns", "drop")
UNKNOWN = "unknown"  # a zone, workload or value outside the bounded set: one series, not many
OTHER = "other"
# Drop reasons and map names come from fixed tables in bpf/abi.h; this shape check keeps a
# corrupted value from ever becoming a label (it cannot be an address or a name with a dot).
_TOKEN = re.compile(r"^[a-z][a-z0-9_]{0,47}$")


def _call(source):
    """A source is the object itself or a zero-argument callable returning it (or None)."""
    return source() if callable(source) and not hasattr(source, "counters") else source


def _bounded(value, allowed: Iterable[str], fallback: str = UNKNOWN) -> str:
    value = str(value)
    return value if value in allowed else fallback


def _token(value) -> str:
    value = str(value).lower()
    return value if _TOKEN.match(value) else OTHER


class _PolicyView:
    """What the collectors need from a Policy: its zone names and interface -> (workload, zone)."""

    def __init__(self, policy):
        self.zones: set[str] = set(policy.zones) if policy is not None else set()
        self.by_interface: dict[str, tuple[str, str]] = {}
        if policy is not None:
            for w in policy.workloads():
                self.by_interface[w.interface] = (w.name, w.zone)

    def zone(self, value) -> str:
        return _bounded(value, self.zones)


def _collector_up(name: str, up: bool) -> GaugeMetricFamily:
    # One family per collector: a metric name may appear only once in an exposition.
    g = GaugeMetricFamily(f"skyguard_{name}_scrape_ok",
                          f"1 if the {name} was read at this scrape, 0 if reading it failed (see the daemon log)")
    g.add_metric([], 1 if up else 0)
    return g


class DatapathCollector(Collector):
    """Reads the eBPF datapath at scrape time.

    datapath: a Datapath (counters(), active_flows_by_zone(), attached(), occupancy(), optionally
    learned()) or a
    callable returning
    one (or None while there is none). policy: the active Policy or a callable returning it; it
    bounds zone labels and maps interfaces to workloads.
    """

    def __init__(self, datapath, policy=None):
        self._datapath = datapath
        self._policy = policy

    def describe(self):
        # Registration must not touch the kernel; describe nothing so collect() runs only on scrape.
        return []

    def collect(self):
        dp = _call(self._datapath)
        if dp is None:
            yield _collector_up("datapath", False)
            return
        policy = _PolicyView(self._policy() if callable(self._policy) else self._policy)
        # Each reading stands alone: `tc` failing while an interface is re-attached must not take
        # the packet counters out of this scrape (Prometheus would mark them stale).
        ok = True
        for read in (self._counters, self._flows, self._programs, self._maps, self._learned, self._cleanup):
            try:
                families = read(dp, policy)
            except Exception:  # a failing reading must not break the scrape of the others
                log.exception("metrics scrape: %s failed", read.__name__.strip("_"))
                ok = False
                continue
            yield from families
        yield _collector_up("datapath", ok)

    @staticmethod
    def _counters(dp, policy: _PolicyView) -> list:
        counters = dp.counters()
        packets = CounterMetricFamily("skyguard_packets", "Packets seen by the datapath, by zone, direction "
                                      "(egress: from the VM; ingress: to the VM) and verdict",
                                      labels=["zone", "direction", "verdict"])
        nbytes = CounterMetricFamily("skyguard_bytes", "Bytes seen by the datapath, by zone, direction and verdict",
                                     labels=["zone", "direction", "verdict"])
        traffic: dict[tuple, list[int]] = {}
        for row in counters.get("traffic", ()):
            key = (policy.zone(row["zone"]), _bounded(row["direction"], DIRECTIONS, OTHER),
                   _bounded(row["verdict"], VERDICTS, OTHER))
            acc = traffic.setdefault(key, [0, 0])
            acc[0] += int(row["packets"])
            acc[1] += int(row["bytes"])
        for key, (p, b) in sorted(traffic.items()):
            packets.add_metric(list(key), p)
            nbytes.add_metric(list(key), b)

        drops = CounterMetricFamily("skyguard_drops", "Packets dropped by the datapath, by zone, direction and "
                                    "reason (SG_DROP_* in bpf/abi.h, lower case)",
                                    labels=["zone", "direction", "reason"])
        drop_bytes = CounterMetricFamily("skyguard_drop_bytes", "Bytes dropped by the datapath, by zone, "
                                         "direction and reason", labels=["zone", "direction", "reason"])
        dropped: dict[tuple, list[int]] = {}
        for row in counters.get("drops", ()):
            key = (policy.zone(row["zone"]), _bounded(row["direction"], DIRECTIONS, OTHER), _token(row["reason"]))
            acc = dropped.setdefault(key, [0, 0])
            acc[0] += int(row["packets"])
            acc[1] += int(row.get("bytes", 0))
        for key, (p, b) in sorted(dropped.items()):
            drops.add_metric(list(key), p)
            drop_bytes.add_metric(list(key), b)

        lost = CounterMetricFamily("skyguard_ringbuf_events_lost", "Flow and drop events the datapath could not "
                                   "put in the ring buffer (full): each is missing from flow logs")
        lost.add_metric([], int(counters.get("events_lost", 0)))
        return [packets, nbytes, drops, drop_bytes, lost]

    @staticmethod
    def _flows(dp, policy: _PolicyView) -> list:
        flows = GaugeMetricFamily("skyguard_active_flows", "Unexpired connection-tracking entries, by zone",
                                  labels=["zone"])
        per_zone = {z: 0 for z in policy.zones}
        for zone, n in dp.active_flows_by_zone().items():
            zone = policy.zone(zone)
            per_zone[zone] = per_zone.get(zone, 0) + n
        for zone, n in sorted(per_zone.items()):
            flows.add_metric([zone], n)
        return [flows]

    @staticmethod
    def _programs(dp, policy: _PolicyView) -> list:
        programs = GaugeMetricFamily("skyguard_programs_attached", "skyguard programs attached to a workload's "
                                     "interface (2 when enforced: XDP or TC from the VM, TC to the VM; 0 means "
                                     "the workload is not protected)", labels=["workload", "zone"])
        per_workload = {wz: 0 for wz in policy.by_interface.values()}
        for ifname, hooks in (dp.attached() or {}).items():
            wz = policy.by_interface.get(ifname, (UNKNOWN, UNKNOWN))
            n = sum(1 for v in hooks.values() if isinstance(v, dict) and str(v.get("name") or "").startswith("sg_"))
            per_workload[wz] = per_workload.get(wz, 0) + n
        for (workload, zone), n in sorted(per_workload.items()):
            programs.add_metric([workload, zone], n)
        return [programs]

    @staticmethod
    def _maps(dp, policy: _PolicyView) -> list:
        entries = GaugeMetricFamily("skyguard_map_entries", "Entries in each pinned eBPF map (array maps: "
                                    "always their size)", labels=["map"])
        for name, n in sorted((dp.occupancy() or {}).items()):
            entries.add_metric([_token(name)], int(n))
        return [entries]

    @staticmethod
    def _learned(dp, policy: _PolicyView) -> list:
        if not hasattr(dp, "learned"):
            return []
        learned = GaugeMetricFamily("skyguard_learned_ips", "Addresses DNS answers have opened now (unexpired), "
                                    "by zone", labels=["zone"])
        current = _learned_snapshot(dp)
        now = time.monotonic_ns()  # the datapath stamps expiry with the same clock
        per_zone_ips = {z: 0 for z in policy.zones}
        for selectors in current.values():
            for zone in {policy.zone(key.split("/", 1)[0]) for key, expiry in selectors.items() if expiry > now}:
                per_zone_ips[zone] = per_zone_ips.get(zone, 0) + 1
        for zone, n in sorted(per_zone_ips.items()):
            learned.add_metric([zone], n)
        return [learned]


    @staticmethod
    def _cleanup(dp, policy: _PolicyView) -> list:
        failures = getattr(dp, "cleanup_failures", None)
        if failures is None:
            return []
        counter = CounterMetricFamily("skyguard_datapath_cleanup_failures", "Policy swaps after which entries of "
                                      "the previous generation could not all be deleted (the swap stands; they "
                                      "match no packet and the next swap deletes them)")
        counter.add_metric([], int(failures))
        return [counter]


def _learned_snapshot(dp) -> dict:
    """Datapath.learned() copies a dict the DNS thread may be changing; a copy that raced with a
    change raises RuntimeError, and trying again is cheaper than failing the whole scrape."""
    for _attempt in range(3):
        try:
            return dp.learned() or {}
        except RuntimeError:
            continue
    return dp.learned() or {}


def log_facts(directory: Path | str | None, entries: int | None = None) -> dict:
    """Size and checkpoint age of a signed-log directory, from the files alone (cheap: a few stats).

    entries: the writer's tree size if known (LogWriter.size); otherwise left out.
    """
    facts: dict = {}
    if directory is None:
        return facts
    directory = Path(directory)
    total = 0
    try:
        for child in directory.iterdir():
            if child.is_file():
                total += child.stat().st_size
    except FileNotFoundError:
        return facts
    facts["bytes"] = total
    if entries is not None:
        facts["size"] = int(entries)
    try:
        facts["checkpoint_age_s"] = max(0.0, time.time() - (directory / "checkpoints.log").stat().st_mtime)
    except FileNotFoundError:
        pass
    return facts


class DaemonCollector(Collector):
    """The daemon's own facts at scrape time: policy, signed log, tamper events, start time.

    facts: a callable returning a dict (daemon_facts(daemon) builds it from a Daemon):
      {"started_at": epoch seconds, "policy": {"name", "sha256"} or None,
       "log": {"size": entries, "checkpointed_size": entries, "bytes": on disk,
               "checkpoint_age_s": seconds, "filesystem_free_bytes", "reserve_bytes",
               "refused_entries", "stall_refused_entries", "queued_entries", "write_wait_s",
               "refusing": why or None} (every key optional; LogWriter.head() gives them),
       "tamper_events": int}
    """

    def __init__(self, facts: Callable[[], dict]):
        self._facts = facts

    def describe(self):
        return []

    def collect(self):
        try:
            families = self._families(self._facts() or {})
        except Exception:  # a failing source must not break the scrape of the other metrics
            log.exception("reading the daemon's facts for a metrics scrape failed")
            yield _collector_up("daemon", False)
            return
        yield from families
        yield _collector_up("daemon", True)

    @staticmethod
    def _families(facts: dict) -> list:
        out: list[GaugeMetricFamily | CounterMetricFamily | InfoMetricFamily] = []
        started = GaugeMetricFamily("skyguard_daemon_start_time_seconds",
                                    "When the running skyguard daemon started (Unix time)")
        started.add_metric([], float(facts.get("started_at", 0.0)))
        out.append(started)
        policy = facts.get("policy")
        if policy:
            # One series at a time: the policy's own name and hash, bounded by definition.
            info = InfoMetricFamily("skyguard_policy", "The active policy: its metadata name and the "
                                    "SHA-256 of its file")
            info.add_metric([], {"name": _token_or_other(policy.get("name")),
                                 "sha256": _hex_or_other(policy.get("sha256"))})
            out.append(info)
        log_info = facts.get("log") or {}
        if "size" in log_info:
            out.append(_one(GaugeMetricFamily, "skyguard_log_entries", "Entries in the signed log",
                            int(log_info["size"])))
        if "checkpointed_size" in log_info:
            out.append(_one(GaugeMetricFamily, "skyguard_log_checkpointed_entries",
                            "Entries covered by the signed log's latest checkpoint", int(log_info["checkpointed_size"])))
        if "bytes" in log_info:
            out.append(_one(GaugeMetricFamily, "skyguard_log_size_bytes", "Bytes the signed log occupies on disk",
                            int(log_info["bytes"])))
        if "filesystem_free_bytes" in log_info:  # what one VM's events fill: alert before the reserve
            out.append(_one(GaugeMetricFamily, "skyguard_log_filesystem_free_bytes",
                            "Free bytes on the filesystem that holds the signed log",
                            int(log_info["filesystem_free_bytes"])))
            out.append(_one(GaugeMetricFamily, "skyguard_log_reserve_bytes", "Free bytes the signed log keeps on "
                            "its filesystem: below them it refuses new entries until space is back",
                            int(log_info.get("reserve_bytes", 0))))
            out.append(_one(CounterMetricFamily, "skyguard_log_refused_entries", "Entries the signed log refused "
                            "because its filesystem was below its reserve", int(log_info.get("refused_entries", 0))))
            out.append(_one(GaugeMetricFamily, "skyguard_log_accepting", "1 while the signed log accepts entries, 0 "
                            "while it refuses them (no space, a stalled disk, or a write failed: `skyguard status` "
                            "says which)",
                            0 if log_info.get("refusing") else 1))
        if "write_wait_s" in log_info:  # a disk that stops answering: the wait grows, entries queue, then refusals
            out.append(_one(GaugeMetricFamily, "skyguard_log_write_wait_seconds", "Seconds the signed log's current "
                            "write has waited on its disk (0 between writes; a healthy disk answers in milliseconds)",
                            float(log_info["write_wait_s"])))
            out.append(_one(GaugeMetricFamily, "skyguard_log_queued_entries", "Entries waiting to be written to the "
                            "signed log", int(log_info.get("queued_entries", 0))))
            out.append(_one(CounterMetricFamily, "skyguard_log_stall_refused_entries", "Entries the signed log refused "
                            "while behind (its disk stalled, or its bound of entries waiting reached)",
                            int(log_info.get("stall_refused_entries", 0))))
        if "checkpoint_age_s" in log_info and log_info["checkpoint_age_s"] is not None:
            out.append(_one(GaugeMetricFamily, "skyguard_log_checkpoint_age_seconds",
                            "Seconds since the signed log's last checkpoint was written", float(log_info["checkpoint_age_s"])))
        tamper = CounterMetricFamily("skyguard_tamper_events", "Times the daemon found its programs replaced or "
                                     "detached behind its back (it re-attaches and logs each)")
        tamper.add_metric([], int(facts.get("tamper_events", 0)))
        out.append(tamper)
        return out


def _one(family, name: str, documentation: str, value):
    """A metric family of one unlabelled sample."""
    metric = family(name, documentation)
    metric.add_metric([], value)
    return metric


_POLICY_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _token_or_other(value) -> str:
    value = str(value or "")
    return value if _POLICY_NAME.match(value) else OTHER


def _hex_or_other(value) -> str:
    value = str(value or "")
    return value if re.fullmatch(r"[0-9a-f]{64}", value) else OTHER


def daemon_facts(daemon) -> dict:
    """The DaemonCollector's facts read from a running Daemon's attributes (nothing is computed
    in the daemon for it). Reads: started_at, policy, tlog (LogWriter.head(), or its directory and
    size) and the optional tamper_events count."""
    policy = getattr(daemon, "policy", None)
    tlog = getattr(daemon, "tlog", None)
    return {
        "started_at": getattr(daemon, "started_at", 0.0),
        "policy": {"name": policy.name, "sha256": policy.sha256} if policy is not None else None,
        "log": _log_head(tlog),
        "tamper_events": getattr(daemon, "tamper_events", 0),
    }


def _log_head(tlog) -> dict:
    if tlog is None:
        return {}
    if hasattr(tlog, "head"):  # LogWriter.head(): size, checkpointed_size, checkpoint_age_s, bytes
        return tlog.head()
    return log_facts(getattr(tlog, "directory", None), getattr(tlog, "size", None))


def daemon_sources(daemon) -> list[Collector]:
    """The collectors for one Daemon: its datapath and policy as they are at each scrape."""
    return [DatapathCollector(lambda: getattr(daemon, "datapath", None), lambda: getattr(daemon, "policy", None)),
            DaemonCollector(lambda: daemon_facts(daemon))]


def parse_address(address: str) -> tuple[str, int]:
    """'127.0.0.1:9464', '[::1]:9464' or ':9464' (loopback) -> (host, port); BadInput otherwise."""
    host, sep, port = str(address).rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise BadInput(f"metrics address {address!r} must be HOST:PORT, e.g. {config.DEFAULT_METRICS_ADDR} "
                       "(or 'off' to disable metrics)")
    host = host.strip("[]") or "127.0.0.1"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise BadInput(f"metrics address {address!r}: {host!r} is not an IP address; give one, e.g. "
                       f"{config.DEFAULT_METRICS_ADDR}") from None
    return host, int(port)


class MetricsExporter:
    """Serves the registry (with `sources` registered in it) as Prometheus text on one address.

    The HTTP server is prometheus_client's (threaded WSGI, GET /metrics or any path). start()
    binds; with port 0 the kernel picks one and `address` tells which. stop() closes the socket.
    """

    def __init__(self, registry: CollectorRegistry, sources: Iterable[Collector] = (),
                 address: str = config.DEFAULT_METRICS_ADDR):
        self.registry = registry
        self.host, self.port = parse_address(address)
        self.sources = list(sources)
        for source in self.sources:
            registry.register(source)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}/metrics"

    def start(self) -> MetricsExporter:
        try:
            self._server, self._thread = start_http_server(self.port, addr=self.host, registry=self.registry)
        except OSError as e:
            raise DaemonError(f"cannot serve metrics on {self.address}: {e.strerror or e}; choose another "
                              "address with --metrics HOST:PORT, or --metrics off") from None
        self.port = self._server.server_address[1]
        log.info("metrics on %s", self.url)
        return self

    def render(self) -> bytes:
        """The exposition text exactly as a scrape would get it."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        for source in self.sources:
            try:
                self.registry.unregister(source)
            except KeyError:
                pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

