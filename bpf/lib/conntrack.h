/* conntrack.h: per-interface connection tracking and the fragment table. The programs write and
 * read both maps; userspace only reads them (flow listing) and may delete entries. LRU-bounded:
 * under pressure the least recently used flows are evicted (an evicted allowed flow is simply
 * re-decided on its next packet; an evicted reply-only flow is dropped until the originator
 * sends again). Not here: the policy decision itself (policy.h).
 */
#ifndef SG_CONNTRACK_H
#define SG_CONNTRACK_H

#ifndef SG_CT_MAX
#define SG_CT_MAX 262144 /* flows x interfaces that saw them; ~100 bytes each */
#endif
#ifndef SG_FRAG_MAX
#define SG_FRAG_MAX 16384 /* fragmented datagrams in flight */
#endif
/* Timeouts in seconds: how long a flow stays known without packets. */
#ifndef SG_CT_TCP_NEW_S
#define SG_CT_TCP_NEW_S 60 /* handshake not answered yet */
#endif
#ifndef SG_CT_TCP_EST_S
#define SG_CT_TCP_EST_S 21600 /* 6 h, like conntrack's established TCP default is 5 days: shorter bounds the table */
#endif
#ifndef SG_CT_TCP_CLOSE_S
#define SG_CT_TCP_CLOSE_S 10 /* after FIN or RST */
#endif
#ifndef SG_CT_UDP_S
#define SG_CT_UDP_S 60
#endif
#ifndef SG_CT_ICMP_S
#define SG_CT_ICMP_S 30
#endif
#ifndef SG_FRAG_S
#define SG_FRAG_S 30 /* like the kernel's reassembly timeout */
#endif

#define SG_NS 1000000000ULL
#define SG_TCP_FIN 0x01
#define SG_TCP_SYN 0x02
#define SG_TCP_RST 0x04

BPF_TABLE_PINNED("lru_hash", struct sg_ct_key, struct sg_ct_val, sg_ct, SG_CT_MAX, SG_PIN("sg_ct"));
BPF_TABLE_PINNED("lru_hash", struct sg_frag_key, struct sg_frag_val, sg_frag, SG_FRAG_MAX, SG_PIN("sg_frag"));

static __always_inline void sg_ct_key_of(struct sg_ct_key *key, __u32 ifindex, const struct sg_tuple *t, int reversed) {
  key->ifindex = ifindex;
  key->proto = t->proto;
  if (!reversed) {
    __builtin_memcpy(key->saddr, t->saddr, 16);
    __builtin_memcpy(key->daddr, t->daddr, 16);
    key->sport = t->sport;
    key->dport = t->dport;
  } else {
    __builtin_memcpy(key->saddr, t->daddr, 16);
    __builtin_memcpy(key->daddr, t->saddr, 16);
    key->sport = t->dport;
    key->dport = t->sport;
  }
}

static __always_inline __u64 sg_ct_lifetime(__u8 proto, __u8 state) {
  if (proto == IPPROTO_TCP) {
    if (state == SG_CT_CLOSING)
      return SG_CT_TCP_CLOSE_S * SG_NS;
    return state == SG_CT_ESTABLISHED ? SG_CT_TCP_EST_S * SG_NS : SG_CT_TCP_NEW_S * SG_NS;
  }
  if (proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6)
    return SG_CT_ICMP_S * SG_NS;
  return SG_CT_UDP_S * SG_NS;
}

/* The live entry of this tuple at this interface, in either orientation. *is_reply says whether
 * the packet travels against the originator. Expired entries count as absent. */
static __always_inline struct sg_ct_val *sg_ct_find(__u32 ifindex, const struct sg_tuple *t, __u8 direction,
                                                    __u64 now, struct sg_ct_key *key, int *is_reply) {
  sg_ct_key_of(key, ifindex, t, 0);
  struct sg_ct_val *ct = sg_ct.lookup(key);
  if (ct && ct->direction == direction && ct->expires_ns > now) {
    *is_reply = 0;
    return ct;
  }
  sg_ct_key_of(key, ifindex, t, 1);
  ct = sg_ct.lookup(key);
  if (ct && ct->direction != direction && ct->expires_ns > now) {
    *is_reply = 1;
    return ct;
  }
  return 0;
}

static __always_inline void sg_ct_touch(struct sg_ct_val *ct, __u8 proto, __u8 tcp_flags, int is_reply,
                                        __u32 len, __u64 now) {
  __u8 state = ct->state;
  if (proto == IPPROTO_TCP && (tcp_flags & (SG_TCP_FIN | SG_TCP_RST)))
    state = SG_CT_CLOSING;
  else if (is_reply && state == SG_CT_NEW)
    state = SG_CT_ESTABLISHED;
  ct->state = state;
  ct->expires_ns = now + sg_ct_lifetime(proto, state);
  /* Plain adds: two CPUs touching one flow at once may lose a count; a locked add on every
   * packet costs more than flow statistics are worth. Verdicts never depend on these. */
  ct->packets += 1;
  ct->bytes += len;
}

static __always_inline void sg_ct_create(__u32 ifindex, const struct sg_tuple *t, __u8 direction, __u16 zone,
                                         __u32 gen, __u32 rule_id, __u32 len, __u64 now) {
  struct sg_ct_key key = {};
  sg_ct_key_of(&key, ifindex, t, 0);
  struct sg_ct_val val = {.packets = 1, .bytes = len, .gen = gen, .rule_id = rule_id, .zone = zone,
                          .direction = direction, .state = SG_CT_NEW};
  val.expires_ns = now + sg_ct_lifetime(t->proto, SG_CT_NEW);
  sg_ct.update(&key, &val);
}

static __always_inline void sg_frag_key_of(struct sg_frag_key *key, __u32 ifindex, const struct sg_pkt *pkt) {
  key->ifindex = ifindex;
  key->id = pkt->frag_id;
  key->proto = pkt->t.proto;
  __builtin_memcpy(key->saddr, pkt->t.saddr, 16);
  __builtin_memcpy(key->daddr, pkt->t.daddr, 16);
}

/* An allowed first fragment: remember its datagram so the later fragments pass. */
static __always_inline void sg_frag_allow(__u32 ifindex, const struct sg_pkt *pkt, __u64 now) {
  struct sg_frag_key key = {};
  sg_frag_key_of(&key, ifindex, pkt);
  struct sg_frag_val val = {.expires_ns = now + SG_FRAG_S * SG_NS};
  sg_frag.update(&key, &val);
}

static __always_inline int sg_frag_allowed(__u32 ifindex, const struct sg_pkt *pkt, __u64 now) {
  struct sg_frag_key key = {};
  sg_frag_key_of(&key, ifindex, pkt);
  struct sg_frag_val *v = sg_frag.lookup(&key);
  return v && v->expires_ns > now;
}

#endif
