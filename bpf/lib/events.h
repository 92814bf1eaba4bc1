/* events.h: counters and the event ring buffer. The programs write; userspace reads counters on
 * scrape (summing CPUs) and consumes sg_events (the flow-log part builds on it). Events are only
 * emitted while userspace sets SG_CFG_EVENTS (a consumer is running), so a ring nobody reads
 * costs nothing. Every event that does not fit is counted in sg_ev_lost, never silently lost.
 * Drop events are aggregated per denied flow (sg_deny_agg). Include after conntrack.h (tuple keys).
 */
#ifndef SG_EVENTS_H
#define SG_EVENTS_H

#ifndef SG_EVENTS_PAGES
#define SG_EVENTS_PAGES 1024 /* ring size in 4 KiB pages (4 MiB, ~50k events) */
#endif

/* Per-CPU: no atomic contention on the hot path. Pinned, so counters survive a daemon restart
 * like the rest of the state. */
BPF_TABLE_PINNED("percpu_array", __u32, struct sg_counter_val, sg_traffic,
                 SG_MAX_ZONES * 2 * SG_VERDICT_SLOTS, SG_PIN("sg_traffic"));
BPF_TABLE_PINNED("percpu_array", __u32, struct sg_counter_val, sg_drops, SG_MAX_ZONES * 2 * SG_DROP_SLOTS,
                 SG_PIN("sg_drops"));
/* Not pinned: a ring buffer belongs to the program generation that writes it; a restarted
 * consumer reads the new one. */
BPF_RINGBUF_OUTPUT(sg_events, SG_EVENTS_PAGES);
BPF_PERCPU_ARRAY(sg_ev_lost, __u64, 1);
/* Deny aggregation: the programs write and read it; nobody else. One entry per denied
 * (interface, reason, tuple); LRU-evicted (an evicted entry only means an extra event). */
#ifndef SG_DENY_AGG_MAX
#define SG_DENY_AGG_MAX 65536
#endif
#ifndef SG_DENY_EVENT_INTERVAL_NS
#define SG_DENY_EVENT_INTERVAL_NS 1000000000ULL /* at most one event per denied flow per second */
#endif
struct sg_deny_agg_key {
  struct sg_ct_key flow;
  __u32 reason;
};
struct sg_deny_agg_val {
  __u64 last_ns;
  __u32 suppressed;
  __u32 pad;
};
BPF_TABLE("lru_hash", struct sg_deny_agg_key, struct sg_deny_agg_val, sg_deny_agg, SG_DENY_AGG_MAX);
/* Drop events per VM: a flood of distinct denied tuples is one event per tuple, so one VM could
 * fill the ring and blind the flow log to every other VM (issue 15, shared state). Each VM's share
 * (lib/conntrack.h) may put SG_DROP_EVENTS_PER_S drop events in the ring per second; the rest are
 * counted in sg_ev_lost like events that did not fit (its drop counters still count every packet).
 * Programs only; a fixed one-second window with plain adds (two CPUs may let one extra through). */
#ifndef SG_DROP_EVENTS_PER_S
#define SG_DROP_EVENTS_PER_S 1000
#endif
struct sg_ev_budget {
  __u64 window_ns;
  __u32 used;
  __u32 pad;
};
BPF_ARRAY(sg_ev_budgets, struct sg_ev_budget, SG_CT_SHARES);

static __always_inline int sg_ev_budget_spent(__u32 share, __u64 now) {
  share %= SG_CT_SHARES;
  struct sg_ev_budget *b = sg_ev_budgets.lookup(&share);
  if (!b)
    return 1;
  if (now - b->window_ns >= 1000000000ULL) {
    b->window_ns = now;
    b->used = 0;
  }
  if (b->used >= SG_DROP_EVENTS_PER_S)
    return 1;
  b->used += 1;
  return 0;
}

/* Never written: it exists so the compiled layout of struct sg_event is visible to userspace
 * (bcc describes a map's value type), which tests/bpf/test_abi.py checks abi.Event against. */
BPF_ARRAY(sg_ev_layout, struct sg_event, 1);

static __always_inline void sg_count(struct sg_counter_val *v, __u32 len) {
  v->packets += 1;
  v->bytes += len;
}

static __always_inline void sg_count_traffic(__u16 zone, __u8 direction, __u8 verdict, __u32 len) {
  __u32 idx = SG_TRAFFIC_IDX(zone < SG_MAX_ZONES ? zone : 0, direction & 1, verdict & (SG_VERDICT_SLOTS - 1));
  struct sg_counter_val *v = sg_traffic.lookup(&idx);
  if (v)
    sg_count(v, len);
}

static __always_inline void sg_count_lost_event(void) {
  int zero = 0;
  __u64 *lost = sg_ev_lost.lookup(&zero);
  if (lost)
    *lost += 1;
}

/* share: the VM's share (workload id), for the drop-event budget. now: the coarse clock the
 * caller already has (sg_now), so a flood of drops pays no clock helper call per packet. */
static __always_inline void sg_emit(__u8 type, __u8 reason, __u32 ifindex, __u16 zone, __u8 direction,
                                    const struct sg_tuple *t, __u32 rule_id, __u32 len, __u32 cfg_flags,
                                    __u32 share, __u64 now) {
  if (!(cfg_flags & SG_CFG_EVENTS))
    return;
  __u32 count = 1;
  if (type == SG_EVENT_DROP) {
    /* A flood of one denied flow is one event per interval, carrying how many it stands for. */
    struct sg_deny_agg_key akey = {.reason = reason};
    sg_ct_key_of(&akey.flow, ifindex, t, 0);
    struct sg_deny_agg_val *agg = sg_deny_agg.lookup(&akey);
    if (agg && now - agg->last_ns < SG_DENY_EVENT_INTERVAL_NS) {
      agg->suppressed += 1;
      return;
    }
    if (agg) {
      count += agg->suppressed;
      agg->suppressed = 0;
      agg->last_ns = now;
    } else {
      struct sg_deny_agg_val fresh = {.last_ns = now};
      sg_deny_agg.update(&akey, &fresh);
    }
    if (sg_ev_budget_spent(share, now)) {
      sg_count_lost_event();
      return;
    }
  }
  struct sg_event *ev = sg_events.ringbuf_reserve(sizeof(struct sg_event));
  if (!ev) {
    sg_count_lost_event();
    return;
  }
  ev->ts_ns = bpf_ktime_get_ns();
  ev->ifindex = ifindex;
  ev->rule_id = rule_id;
  ev->zone = zone;
  ev->type = type;
  ev->direction = direction;
  ev->reason = reason;
  ev->proto = t->proto;
  ev->pad = 0;
  __builtin_memcpy(ev->saddr, t->saddr, 16);
  __builtin_memcpy(ev->daddr, t->daddr, 16);
  ev->sport = t->sport;
  ev->dport = t->dport;
  ev->len = len;
  ev->count = count;
  ev->packets = 0;
  ev->bytes = 0;
  sg_events.ringbuf_submit(ev, 0);
}

/* A flow whose entry the datapath removed before a conntrack scan logged its end (its slot went to
 * a new flow, or its tuple was reopened by a SYN): a flow_end event with its counts, so that every
 * flow of the log has its end at any rate of new connections. key: the entry's (the creator's view). */
static __always_inline void sg_emit_flow_end(const struct sg_ct_key *key, const struct sg_ct_val *val,
                                             __u32 cfg_flags) {
  if (!(cfg_flags & SG_CFG_EVENTS))
    return;
  struct sg_event *ev = sg_events.ringbuf_reserve(sizeof(struct sg_event));
  if (!ev) {
    sg_count_lost_event();
    return;
  }
  ev->ts_ns = bpf_ktime_get_ns();
  ev->ifindex = key->ifindex;
  ev->rule_id = val->rule_id;
  ev->zone = val->zone;
  ev->type = SG_EVENT_FLOW_END;
  ev->direction = val->direction;
  ev->reason = val->state; /* closing: the flow closed; else it expired */
  ev->proto = key->proto;
  ev->pad = 0;
  __builtin_memcpy(ev->saddr, key->saddr, 16);
  __builtin_memcpy(ev->daddr, key->daddr, 16);
  ev->sport = key->sport;
  ev->dport = key->dport;
  ev->len = 0;
  ev->count = 1;
  ev->packets = val->packets;
  ev->bytes = val->bytes;
  sg_events.ringbuf_submit(ev, 0);
}

/* The hook every drop goes through (one per entry point): counts, then reports. */
static __always_inline void sg_report_drop(__u16 zone, __u8 direction, __u8 reason, __u32 ifindex,
                                           const struct sg_tuple *t, __u32 len, __u32 cfg_flags, __u32 share,
                                           __u64 now) {
  __u32 idx = SG_DROP_IDX(zone < SG_MAX_ZONES ? zone : 0, direction & 1, reason & (SG_DROP_SLOTS - 1));
  struct sg_counter_val *v = sg_drops.lookup(&idx);
  if (v)
    sg_count(v, len);
  sg_count_traffic(zone, direction, SG_VERDICT_DROP, len);
  sg_emit(SG_EVENT_DROP, reason, ifindex, zone, direction, t, 0, len, cfg_flags, share, now);
}

#endif
