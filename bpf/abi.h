/* abi.h: everything userspace mirrors. Map keys and values, verdicts, directions and the ONE
 * table of drop reasons shared by C and Python (skyguard/datapath/reasons.py parses the
 * SG_DROP_REASONS lines below; skyguard/datapath/abi.py mirrors the structs and a test checks
 * sizes and offsets against the compiled layout). Nothing here is logic, and nothing here is
 * private to the programs: internal parsing state lives in lib/parse.h.
 *
 * Byte order: addresses and ports are stored as they are on the wire (network order). IPv4
 * addresses are stored IPv4-mapped (::ffff:a.b.c.d) so one 16-byte field serves both families.
 * Every other field is host order.
 */
#ifndef SG_ABI_H
#define SG_ABI_H

/* Direction relative to the VM. EGRESS: what the VM sends (sg_from_vm). INGRESS: what it
 * receives (sg_to_vm). */
#define SG_DIR_EGRESS 0
#define SG_DIR_INGRESS 1

/* Verdicts, as counted in sg_traffic. */
#define SG_VERDICT_ALLOW 1       /* a new flow the policy allows */
#define SG_VERDICT_ESTABLISHED 2 /* matched conntrack (either direction) or a related ICMP error */
#define SG_VERDICT_CONTROL 3     /* ARP / neighbour discovery the VM needs for its own addresses */
#define SG_VERDICT_DNS 4         /* DNS to any address, passed to the host (the DNS proxy), and its marked replies */
#define SG_VERDICT_DROP 5

/* skb->mark bit the DNS steering (skyguard/dns/steering.py, nftables) sets on the DNS proxy's
 * replies to a VM: packets of a connection it redirected from port 53, going back to the VM. Only
 * those pass sg_to_vm as DNS (SG_VERDICT_DNS); steered DNS keeps no conntrack state, so nothing
 * a remote host sends is ever related to a VM's query. skyguard/datapath/abi.py mirrors it. */
#define SG_MARK_DNS_REPLY 0x00400000

/* Policy map verdicts. */
#define SG_POLICY_ALLOW 1
#define SG_POLICY_DENY 2

/* sg_policy_key.proto of every IP protocol other than TCP, UDP, ICMP and ICMPv6. */
#define SG_PROTO_OTHER 0

/* Prefix lengths of the LPM keys below: the fields before the address (or port) are always
 * matched, so they count as bits of every prefix. */
#define SG_IPCACHE_FIXED_BITS 32 /* gen */
#define SG_IPCACHE_HOST_PREFIXLEN (SG_IPCACHE_FIXED_BITS + 128) /* a whole address: every sg_ipcache_host key */
#define SG_IPV4_MAPPED_BITS 96 /* an IPv4 prefix of length p is the first 96 + p bits of ::ffff:a.b.c.d */
#define SG_POLICY_FIXED_BITS 96 /* gen, direction, proto, zone, identity */
#define SG_POLICY_EXACT_PREFIXLEN (SG_POLICY_FIXED_BITS + 16) /* one port: every sg_policy_exact key */

/* The one drop-reason table. X(code, NAME, "what an operator reads").
 * Keep codes stable: they are in logs and metrics. Code 0 is never a drop. */
#define SG_DROP_REASONS(X) \
  X(1, MALFORMED, "truncated or malformed header") \
  X(2, UNKNOWN_ETHERTYPE, "ethertype other than IPv4, IPv6 or ARP") \
  X(3, VLAN, "VLAN or QinQ tagged frame") \
  X(4, NO_WORKLOAD, "interface has no workload in the active policy") \
  X(5, SPOOF_MAC, "source MAC is not the workload's") \
  X(6, SPOOF_IP, "source IP is not one of the workload's addresses") \
  X(7, ARP_SPOOF, "ARP sender MAC or IP is not the workload's") \
  X(8, ND_SPOOF, "IPv6 neighbour discovery target or link-layer address is not the workload's") \
  X(9, IP_OPTIONS, "IPv4 options (none are allowed)") \
  X(10, IPV6_EXTHDR, "unknown or forbidden IPv6 extension header") \
  X(11, IPV6_EXTHDR_CHAIN, "IPv6 extension header chain longer than SG_IPV6_MAX_EXT_HDRS") \
  X(12, FRAG_NO_FLOW, "non-first fragment without an allowed first fragment") \
  X(13, POLICY_DENY, "denied by a deny rule") \
  X(14, NO_RULE, "no rule allows this flow (default deny)") \
  X(15, POLICY_REVOKED, "established flow no longer allowed after a policy change") \
  X(16, ICMP_ERR_NO_FLOW, "ICMP error related to no flow of this VM and allowed by no rule") \
  X(17, UNKNOWN_L4, "IP protocol other than TCP, UDP, ICMP, ICMPv6") \
  X(18, ND_FORBIDDEN, "ICMPv6 router advertisement or redirect from a VM") \
  X(19, NO_CONFIG, "no policy generation active yet (fail closed)") \
  X(20, FRAG_CONTROL, "fragmented ARP, neighbour discovery, ICMP error or DNS") \
  X(21, DST_NOT_WORKLOAD, "new flow toward the VM for an address that is not the workload's") \
  X(22, ND_NOT_LOCAL, "neighbour discovery or MLD that is not link-local (destination, hop limit or source) and allowed by no rule") \
  X(23, CT_FULL, "the VM's share of the connection table is full of live flows") \
  X(24, FRAG_FULL, "the VM's share of the fragment table is full")

#define SG_X_ENUM(code, name, text) SG_DROP_##name = code,
enum sg_drop_reason { SG_DROP_REASONS(SG_X_ENUM) SG_DROP_MAX };
#undef SG_X_ENUM

/* sg_config[0]: the active policy generation and feature flags. Userspace writes it (the ONLY
 * write the programs see as a policy swap); the programs read it once per packet. */
#define SG_CFG_EVENTS 0x1 /* emit ring buffer events (set by the flow-log consumer) */
struct sg_config_val {
  __u32 gen;   /* 0 = nothing loaded: every packet drops with SG_DROP_NO_CONFIG */
  __u32 flags; /* SG_CFG_* */
};

/* Remote address -> identity (a set of selectors, numbered by compile). Host addresses (/32,
 * /128: workloads, learned FQDN answers, host CIDRs) live in the sg_ipcache_host hash, looked up
 * first, so their cost does not grow with their number; shorter prefixes live in the sg_ipcache
 * LPM trie. sg_ipcache_host reuses struct sg_ipcache_key with prefixlen = 160. */
struct sg_ipcache_key {
  __u32 prefixlen; /* SG_IPCACHE_FIXED_BITS + address prefix length (IPv4: SG_IPV4_MAPPED_BITS + v4 length) */
  __u32 gen;
  __u8 addr[16]; /* network order, IPv4-mapped for IPv4 */
};
struct sg_ipcache_val {
  __u32 identity;
  __u32 prefixlen;   /* this entry's own prefixlen (informational) */
  __u64 expires_ns;  /* CLOCK_MONOTONIC; 0 = never. Learned FQDN addresses carry their TTL: an
                      * expired host entry no longer counts and the address falls back to the LPM */
};

/* One new-flow decision: sg_policy_exact (hash, single ports: prefixlen = 112) first, then
 * sg_policy (LPM over the port: ranges as port prefixes). Compile puts every single-port block in
 * the hash; blocks are disjoint, so at most one of the two matches. */
struct sg_policy_key {
  __u32 prefixlen; /* SG_POLICY_FIXED_BITS + port prefix length */
  __u32 gen;
  __u8 direction;  /* SG_DIR_* */
  __u8 proto;      /* IPPROTO_*, or SG_PROTO_OTHER */
  __u16 zone;      /* the local zone: the workload's whose interface this is */
  __u32 identity;  /* the remote identity from sg_ipcache (0: no ipcache entry) */
  __u16 port;      /* network order: destination port; ICMP: type in the high byte */
  __u16 pad;
};
struct sg_policy_val {
  __u32 rule_id; /* index of the rule in the policy, + 1 */
  __u8 verdict;  /* SG_POLICY_* */
  __u8 pad[3];
};

/* sg_workload (array): the workload behind an interface, at index SG_WORKLOAD_IDX(ifindex, gen).
 * Two slots per interface (generation parity) so a swap writes the new generation beside the
 * live one; a slot counts only if its gen is the active one (stale slots need no deletion). An
 * array, not a hash: it is read on every packet. Interfaces with ifindex >= SG_MAX_IFINDEX cannot
 * be attached (the loader refuses them). */
#define SG_MAX_IFINDEX 65536
#define SG_WORKLOAD_IDX(ifindex, gen) ((ifindex) * 2 + ((gen) & 1))
struct sg_workload_val {
  __u32 gen;      /* 0 = empty slot */
  __u16 zone;     /* compile's zone id (1-based) */
  __u16 workload; /* compile's workload id (1-based) */
  __u8 mac[6];    /* the only source MAC it may send */
  __u16 pad;
};

/* sg_srcip (hash): the source addresses a workload may send, per generation. */
struct sg_srcip_key {
  __u32 ifindex;
  __u32 gen;
  __u8 addr[16];
};

/* sg_ct (LRU hash): one entry per flow per interface, keyed by the tuple as the originator sent
 * it, so A's approval at its egress is not B's at its ingress. Replies look up the reversed
 * tuple at the same interface. */
struct sg_ct_key {
  __u32 ifindex;
  __u8 proto;
  __u8 pad[3];
  __u8 saddr[16];
  __u8 daddr[16];
  __u16 sport; /* network order; ICMP echo: the identifier as sport of a request, dport of a reply */
  __u16 dport;
};
#define SG_CT_NEW 0
#define SG_CT_ESTABLISHED 1 /* a reply was seen */
#define SG_CT_CLOSING 2     /* FIN or RST seen */
#define SG_FIN_ORIG 0x1  /* the flow's creator sent FIN */
#define SG_FIN_REPLY 0x2 /* the other side sent FIN */
#define SG_FIN_BOTH 0x3  /* both did, or either sent RST: nothing more is coming */
struct sg_ct_val {
  __u64 expires_ns;
  __u64 packets; /* both directions */
  __u64 bytes;
  __u32 gen;       /* the policy generation that last approved it */
  __u32 rule_id;
  __u16 zone;
  __u8 direction;  /* who created it: SG_DIR_EGRESS (VM opened) or SG_DIR_INGRESS */
  __u8 state;      /* SG_CT_* */
  __u8 fins;       /* TCP: which sides closed (SG_FIN_*), so a flow closed both ways frees its slot sooner */
  __u8 seq_seen;   /* TCP: the sides whose seq_end is known (bit 0 the creator, bit 1 the other side) */
  __u32 seq_end[2]; /* TCP, per side (0 the creator): the sequence number after the last it sent (SYN, FIN count 1) */
};

/* sg_share_hands (array, one per share): the next slot each share's new entries try, per
 * direction (lib/conntrack.h). Programs only. */
struct sg_share_hand {
  __u32 ct[2];   /* by direction of the flow's creator (SG_DIR_*) */
  __u32 frag[2];
};

/* sg_frag (LRU hash): allowed first fragments, so their followers pass. */
struct sg_frag_key {
  __u32 ifindex;
  __u32 id; /* IPv4 identification (host order, zero-extended) or IPv6 fragment id */
  __u8 proto;
  __u8 pad[3];
  __u8 saddr[16];
  __u8 daddr[16];
};
struct sg_frag_val {
  __u64 expires_ns;
};

/* Counters: per-CPU arrays (an array lookup is a few instructions; a hash lookup is a hash).
 * userspace sums CPUs. Index: sg_traffic[SG_TRAFFIC_IDX(zone, direction, verdict)],
 * sg_drops[SG_DROP_IDX(zone, direction, reason)]. Zone ids >= SG_MAX_ZONES count as zone 0
 * (compile refuses policies with that many zones). */
#define SG_MAX_ZONES 256
#define SG_VERDICT_SLOTS 8
#define SG_DROP_SLOTS 32
#define SG_TRAFFIC_IDX(zone, dir, verdict) ((((zone) * 2 + (dir)) * SG_VERDICT_SLOTS) + (verdict))
#define SG_DROP_IDX(zone, dir, reason) ((((zone) * 2 + (dir)) * SG_DROP_SLOTS) + (reason))
struct sg_counter_val {
  __u64 packets;
  __u64 bytes;
};

/* Ring buffer events (lib/events.h). */
#define SG_EVENT_FLOW_START 1
#define SG_EVENT_DROP 2
#define SG_EVENT_FLOW_END 3 /* the datapath removed a flow's entry before a scan logged its end */
struct sg_event {
  __u64 ts_ns;
  __u32 ifindex;
  __u32 rule_id;
  __u16 zone;
  __u8 type;      /* SG_EVENT_* */
  __u8 direction;
  __u8 reason;    /* SG_DROP_* for drops */
  __u8 proto;
  __u16 pad;
  __u8 saddr[16];
  __u8 daddr[16];
  __u16 sport;
  __u16 dport;
  __u32 len;
  __u32 count; /* drops: packets this event stands for (the same denied flow is reported at most
                * once per SG_DENY_EVENT_INTERVAL_NS; the rest are counted into the next event) */
  __u64 packets; /* flow_end: the flow's packets and bytes, both directions (reason: its SG_CT_* state) */
  __u64 bytes;
};

#endif
