"""Flow logging: the datapath's ring buffer and conntrack turned into signed-log entries.

  flow_start  one per new allowed flow per interface (zones, workloads, 5-tuple, rule, reason)
  deny        denied traffic as counts per (flow, reason) per interval, bounded (denies.py)
  flow_end    from periodic conntrack scans: expired, closed or vanished flows (ctscan.py); and
              from the ring buffer for a flow whose entry the datapath removed itself before a
              scan saw it end (its slot given to a new flow, its tuple reopened by a SYN)
  ring_loss   whenever the kernel could not put events in the ring: no loss is silent

consumer.py holds the thread (FlowLogger) that wires these together; ring.py reads the ring
buffer's records in batches; names.py turns ids into names and encodes entries; recent.py keeps
what `skyguard flows` shows. Not here: the decisions themselves (bpf/), the log's format and
durability (skyguard.tlog), the daemon's wiring.
"""

from skyguard.datapath.flowlog.consumer import (
    DEFAULT_CT_SCAN_INTERVAL_S,
    DEFAULT_DENY_INTERVAL_S,
    DEFAULT_MAX_INFLIGHT,
    DEFAULT_RECENT,
    KERNEL_DENY_INTERVAL_NS,
    FlowLogger,
)
from skyguard.datapath.flowlog.denies import MAX_DENY_FLOWS_PER_INTERVAL
from skyguard.datapath.flowlog.names import PROTO_NAMES, FlowNames, encode_entry
from skyguard.datapath.flowlog.recent import MAX_QUERY_LIMIT, VERDICT_FILTERS, query_args

__all__ = ["DEFAULT_CT_SCAN_INTERVAL_S", "DEFAULT_DENY_INTERVAL_S", "DEFAULT_MAX_INFLIGHT", "DEFAULT_RECENT",
           "KERNEL_DENY_INTERVAL_NS", "MAX_DENY_FLOWS_PER_INTERVAL", "MAX_QUERY_LIMIT", "PROTO_NAMES",
           "VERDICT_FILTERS", "FlowLogger", "FlowNames", "encode_entry", "query_args"]
