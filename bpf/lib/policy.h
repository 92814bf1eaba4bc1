/* policy.h: the policy maps and the one new-flow decision (ipcache LPM + policy LPM). Userspace
 * (skyguard/datapath/compile.py via datapath.py) writes every map here; the programs only read.
 * Atomic swap: every key carries the generation; userspace writes the new generation's entries,
 * flips sg_config[0].gen, then deletes the old generation's entries. Not here: conntrack, counters.
 */
#ifndef SG_POLICY_H
#define SG_POLICY_H

/* Sizes. LPM tries are not preallocated, so these are ceilings, not memory. */
#ifndef SG_IPCACHE_MAX
#define SG_IPCACHE_MAX (1 << 20) /* prefixes: workload addresses, CIDRs, learned FQDN addresses; x2 during a swap */
#endif
#ifndef SG_POLICY_MAX
#define SG_POLICY_MAX (1 << 21) /* (direction, zone, identity, proto, port prefix) entries; x2 during a swap */
#endif
#ifndef SG_SRCIP_MAX
#define SG_SRCIP_MAX 65536 /* (interface, source address) pairs x 2 generations */
#endif

/* Written by userspace (the swap), read by both programs on every packet. */
BPF_TABLE_PINNED("array", __u32, struct sg_config_val, sg_config, 1, SG_PIN("sg_config"));
/* Written by userspace (compile + learn), read on new flows and conntrack re-checks. */
BPF_TABLE_PINNED("lpm_trie", struct sg_ipcache_key, struct sg_ipcache_val, sg_ipcache, SG_IPCACHE_MAX,
                 SG_PIN("sg_ipcache"), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct sg_ipcache_key, struct sg_ipcache_val, sg_ipcache_host, SG_IPCACHE_MAX,
                 SG_PIN("sg_ipcache_host"), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct sg_policy_key, struct sg_policy_val, sg_policy, SG_POLICY_MAX,
                 SG_PIN("sg_policy"), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct sg_policy_key, struct sg_policy_val, sg_policy_exact, SG_POLICY_MAX,
                 SG_PIN("sg_policy_exact"), BPF_F_NO_PREALLOC);
/* Written by userspace on attach and on every swap, read on every packet. */
BPF_TABLE_PINNED("array", __u32, struct sg_workload_val, sg_workload, SG_MAX_IFINDEX * 2, SG_PIN("sg_workload"));

static __always_inline struct sg_workload_val *sg_workload_of(__u32 ifindex, __u32 gen) {
  if (ifindex >= SG_MAX_IFINDEX)
    return 0;
  __u32 idx = SG_WORKLOAD_IDX(ifindex, gen);
  struct sg_workload_val *wl = sg_workload.lookup(&idx);
  return wl && wl->gen == gen ? wl : 0;
}
BPF_TABLE_PINNED("hash", struct sg_srcip_key, __u8, sg_srcip, SG_SRCIP_MAX, SG_PIN("sg_srcip"));

/* The remote address's identity: host entry first (unless expired: a DNS answer's TTL ran out),
 * then the longest prefix. */
static __always_inline __u32 sg_identity_of(__u32 gen, const __u8 *addr, __u64 now) {
  struct sg_ipcache_key key = {.prefixlen = SG_IPCACHE_HOST_PREFIXLEN, .gen = gen};
  __builtin_memcpy(key.addr, addr, 16);
  struct sg_ipcache_val *v = sg_ipcache_host.lookup(&key);
  if (v && (!v->expires_ns || v->expires_ns > now))
    return v->identity;
  v = sg_ipcache.lookup(&key);
  return v ? v->identity : 0;
}

/* One decision for a flow as its originator sent it. Returns the rule id (> 0) when allowed,
 * -SG_DROP_POLICY_DENY or -SG_DROP_NO_RULE otherwise. */
static __always_inline int sg_policy_decide(__u32 gen, __u8 direction, __u16 zone, const __u8 *remote,
                                            __u8 proto, __u16 port_be, __u64 now) {
  struct sg_policy_key key = {.prefixlen = SG_POLICY_EXACT_PREFIXLEN, .gen = gen, .direction = direction, .zone = zone};
  if (proto != IPPROTO_TCP && proto != IPPROTO_UDP && proto != IPPROTO_ICMP && proto != IPPROTO_ICMPV6)
    proto = SG_PROTO_OTHER;
  key.proto = proto;
  key.port = port_be;
  key.identity = sg_identity_of(gen, remote, now);
  struct sg_policy_val *v = sg_policy_exact.lookup(&key);
  if (!v)
    v = sg_policy.lookup(&key);
  if (!v)
    return -SG_DROP_NO_RULE;
  if (v->verdict != SG_POLICY_ALLOW)
    return -SG_DROP_POLICY_DENY;
  return v->rule_id ? v->rule_id : 1;
}

#endif
