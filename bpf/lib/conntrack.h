/* conntrack.h: per-interface connection tracking and the fragment table. The programs write and
 * read both maps; userspace only reads them (flow listing) and may delete entries.
 *
 * Shares: one VM must never be able to push another VM's state out (a flood of new tuples would
 * otherwise evict every idle flow of every VM from a shared LRU). Each VM owns a share of slots,
 * picked by its workload id, in two halves: flows it opened and flows opened toward it (for
 * fragments: datagrams it sends and datagrams it receives), so a peer allowed to reach it cannot
 * use up its room for its own connections either. Creating an entry claims a slot of its own half: a slot whose entry is gone or expired is
 * reused (the expired entry is deleted; so is a closed TCP flow that has been quiet for a while,
 * see sg_ct_closed_and_quiet), a slot whose entry is live is skipped; when
 * SG_SHARE_PROBES slots in a row are live, that half is full and the new flow is refused
 * (SG_DROP_CT_FULL / SG_DROP_FRAG_FULL), live flows untouched (except a TCP flow closed both ways
 * among them, which gives way: see sg_ct_create). An entry the datapath ends this way is reported
 * as a flow_end event, since no scan saw it end. Every entry sits in one slot, so
 * the maps never hold more than the shares add up to; with SG_LRU_SLACK on top, the kernel's LRU
 * never has to evict anything. (Two VMs whose workload ids are equal modulo SG_CT_SHARES share
 * one share.)
 * Not here: the policy decision itself (policy.h).
 */
#ifndef SG_CONNTRACK_H
#define SG_CONNTRACK_H

#ifndef SG_CT_SHARES
#define SG_CT_SHARES 32 /* VMs with a share of their own (workload id modulo this); each ~2 x SG_CT_SHARE x 200 bytes */
#endif
#ifndef SG_CT_SHARE
#define SG_CT_SHARE 4096 /* live flows one VM may hold per direction (opened by it / toward it) */
#endif
#ifndef SG_FRAG_SHARE
#define SG_FRAG_SHARE 256 /* fragmented datagrams one VM may have in flight per direction (SG_FRAG_S each) */
#endif
#ifndef SG_SHARE_PROBES
#define SG_SHARE_PROBES 4 /* slots tried per new entry: more finds room in a nearly full share, costs more per new flow */
#endif
#ifndef SG_LRU_SLACK
#define SG_LRU_SLACK 32768 /* an LRU map evicts before it is full: each possible CPU parks up to 128 free entries */
#endif
#define SG_CT_SLOTS (SG_CT_SHARES * 2 * SG_CT_SHARE)
#define SG_FRAG_SLOTS (SG_CT_SHARES * 2 * SG_FRAG_SHARE)
#define SG_CT_MAX (SG_CT_SLOTS + SG_LRU_SLACK) /* ~150 bytes each, + 48 for its slot */
#define SG_FRAG_MAX (SG_FRAG_SLOTS + SG_LRU_SLACK)
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
/* A closed TCP flow quiet this long gives up its slot to a new flow (sg_ct_closed_and_quiet). */
#ifndef SG_CT_CLOSED_QUIET_MS
#define SG_CT_CLOSED_QUIET_MS 250 /* closed both ways (SG_FIN_BOTH): only a lost last ACK's FIN retransmit can follow */
#endif
#ifndef SG_CT_HALF_CLOSED_QUIET_S
#define SG_CT_HALF_CLOSED_QUIET_S 1 /* closed one way: the other side may still be sending */
#endif

/* How far (either way) from where its sender is a FIN or RST's sequence number may lie to close a
 * flow (sg_ct_may_close). Wide enough for every byte a sender can have in flight on paths these VMs
 * use; narrow enough that a blind guess lands in it once in 2^32 / (2 x 2^24) = 128 tries, on top
 * of guessing the ports. */
#ifndef SG_CT_SEQ_WINDOW
#define SG_CT_SEQ_WINDOW (1U << 24)
#endif

#define SG_SIDE_ORIG 0 /* sg_ct_val.seq_end index: the flow's creator (the other side: 1, is_reply) */
#define SG_SIDE_BIT(side) (1 << (side))

#define SG_NS 1000000000ULL
#define SG_TCP_FIN 0x01
#define SG_TCP_SYN 0x02
#define SG_TCP_RST 0x04
#define SG_TCP_ACK 0x10

BPF_TABLE_PINNED("lru_hash", struct sg_ct_key, struct sg_ct_val, sg_ct, SG_CT_MAX, SG_PIN("sg_ct"));
BPF_TABLE_PINNED("lru_hash", struct sg_frag_key, struct sg_frag_val, sg_frag, SG_FRAG_MAX, SG_PIN("sg_frag"));
/* The shares: slot -> the key of the entry it holds (ifindex 0: empty), and per share the next
 * slot to try. Programs only; pinned so a restart keeps every entry owned. */
BPF_TABLE_PINNED("array", __u32, struct sg_ct_key, sg_ct_slots, SG_CT_SLOTS, SG_PIN("sg_ct_slots"));
BPF_TABLE_PINNED("array", __u32, struct sg_frag_key, sg_frag_slots, SG_FRAG_SLOTS, SG_PIN("sg_frag_slots"));
BPF_TABLE_PINNED("array", __u32, struct sg_share_hand, sg_share_hands, SG_CT_SHARES, SG_PIN("sg_share_hands"));

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

/* One orientation of sg_ct_find: the tuple as its own key (forward), or reversed into rkey. */
static __always_inline struct sg_ct_val *sg_ct_try(struct sg_tuple *t, int reversed, __u8 direction, __u64 now,
                                                   struct sg_ct_key *rkey, struct sg_ct_key **key) {
  struct sg_ct_key *k = (struct sg_ct_key *)t;
  if (reversed) {
    __builtin_memset(rkey, 0, sizeof(*rkey));
    sg_ct_key_of(rkey, t->ifindex, t, 1);
    k = rkey;
  }
  struct sg_ct_val *ct = sg_ct.lookup(k);
  if (ct && (ct->direction != direction) == reversed && ct->expires_ns > now) {
    *key = k;
    return ct;
  }
  return 0;
}

/* sg_ct_find's orient: which orientations a packet may match. ICMP has no ports, so its kind says
 * it: only a reply (echo, timestamp) is a reply; a request, an error or any other type can only be
 * its own flow's originator. Otherwise a tuple whose "ports" are both 0 (identifier 0, or a type
 * without one) matched the other side's entry reversed: a VM's ping let its peer send it any ICMP. */
#define SG_CT_EITHER 0
#define SG_CT_ORIG 1  /* forward only */
#define SG_CT_REPLY 2 /* reversed only */

static __always_inline int sg_ct_orient(const struct sg_pkt *pkt) {
  if (pkt->t.proto != IPPROTO_ICMP && pkt->t.proto != IPPROTO_ICMPV6)
    return SG_CT_EITHER;
  return sg_icmp_is_reply(pkt->t.proto, pkt->icmp_type) ? SG_CT_REPLY : SG_CT_ORIG;
}

/* The live entry of this tuple at this interface, in either orientation (orient: SG_CT_*).
 * *is_reply says whether the packet travels against the originator; *key points at the entry's
 * key: the tuple itself (forward: it is laid out as a key, so the lookup copies nothing) or rkey
 * (reversed). The likelier orientation is tried first, so most packets cost one lookup: a packet
 * from a lower port to a higher one (a service answering an ephemeral port) is taken for a reply.
 * Both are tried either way: the order changes the cost, not the answer (one tuple has one live
 * entry). Expired entries count as absent. */
static __always_inline struct sg_ct_val *sg_ct_find(__u32 ifindex, struct sg_tuple *t, __u8 direction, __u64 now,
                                                    struct sg_ct_key *rkey, struct sg_ct_key **key,
                                                    int *is_reply, int orient) {
  t->ifindex = ifindex;
  t->pad[0] = 0;
  t->pad[1] = 0;
  t->pad[2] = 0;
  int reply_first = orient ? orient == SG_CT_REPLY : bpf_ntohs(t->sport) < bpf_ntohs(t->dport);
  struct sg_ct_val *ct = sg_ct_try(t, reply_first, direction, now, rkey, key);
  if (ct) {
    *is_reply = reply_first;
    return ct;
  }
  if (orient)
    return 0;
  ct = sg_ct_try(t, !reply_first, direction, now, rkey, key);
  if (ct) {
    *is_reply = !reply_first;
    return ct;
  }
  return 0;
}

static __always_inline int sg_seq_near(__u32 seq, __u32 mark) {
  return seq - mark + SG_CT_SEQ_WINDOW <= 2 * SG_CT_SEQ_WINDOW; /* modulo 2^32 */
}

/* Whether this TCP segment is where its sender is: its sequence number near the side's seq_end;
 * from a side not seen yet, it must acknowledge near what the other side sent (a SYN-ACK
 * acknowledges the SYN). Only such a segment may move its side on (sg_ct_track) or close the flow:
 * an off-path host that spoofs a peer's address and guesses the ports could otherwise close any
 * flow with one RST (its entry CLOSING, its slot free to a new flow after SG_CT_CLOSED_QUIET_MS,
 * the VM's pooled connection refused on its next packet). A segment that is not passes all the
 * same: its receiver judges it (RFC 5961), the entry just does not follow it. */
static __always_inline int sg_ct_in_window(const struct sg_ct_val *ct, const struct sg_pkt *pkt, int side) {
  if (ct->seq_seen & SG_SIDE_BIT(side))
    return sg_seq_near(pkt->tcp_seq, ct->seq_end[side]);
  return (pkt->tcp_flags & SG_TCP_ACK) && (ct->seq_seen & SG_SIDE_BIT(side ^ 1)) &&
         sg_seq_near(pkt->tcp_ack, ct->seq_end[side ^ 1]);
}

/* The side's seq_end follows an in-window segment (only ever forward). */
static __always_inline void sg_ct_track(struct sg_ct_val *ct, const struct sg_pkt *pkt, int side) {
  __u32 end = pkt->tcp_seq + pkt->tcp_seq_len;
  if (!(ct->seq_seen & SG_SIDE_BIT(side)) || (__s32)(end - ct->seq_end[side]) > 0)
    ct->seq_end[side] = end;
  ct->seq_seen |= SG_SIDE_BIT(side);
}

static __always_inline void sg_ct_touch(struct sg_ct_val *ct, const struct sg_pkt *pkt, int is_reply, __u32 len,
                                        __u64 now) {
  __u8 proto = pkt->t.proto, tcp_flags = pkt->tcp_flags;
  __u8 state = ct->state;
  int in_window = proto == IPPROTO_TCP && sg_ct_in_window(ct, pkt, is_reply);
  if (in_window)
    sg_ct_track(ct, pkt, is_reply);
  if (proto == IPPROTO_TCP && (tcp_flags & (SG_TCP_FIN | SG_TCP_RST))) {
    if (in_window) {
      state = SG_CT_CLOSING;
      ct->fins |= (tcp_flags & SG_TCP_RST) ? SG_FIN_BOTH : is_reply ? SG_FIN_REPLY : SG_FIN_ORIG;
    }
  } else if (is_reply && state == SG_CT_NEW && (proto != IPPROTO_TCP || in_window)) {
    /* TCP: only an answer that acknowledges the SYN; a spoofed one would hold a half-open
     * connection's slot SG_CT_TCP_EST_S instead of SG_CT_TCP_NEW_S. */
    state = SG_CT_ESTABLISHED;
  }
  ct->state = state;
  ct->expires_ns = now + sg_ct_lifetime(proto, state);
  /* Plain adds: two CPUs touching one flow at once may lose a count; a locked add on every
   * packet costs more than flow statistics are worth. Verdicts never depend on these. */
  ct->packets += 1;
  ct->bytes += len;
}

/* A SYN without ACK on the tuple of a TCP flow closed both ways (a FIN from each side, or a RST)
 * opens a new connection on a reused port. Like Linux conntrack restarting a TIME_WAIT entry, the
 * caller ends the old flow and decides the SYN as a new one (the policy, the entry restarted or a
 * fresh one, a flow_start). Otherwise the new connection would ride the closed flow's entry: no
 * flow_start in the log, and its slot given away as soon as the entry looked quiet, since it still
 * reads as closed. Closed one way, the other side may still be sending (Linux conntrack ignores a
 * SYN then too): a SYN carries no sequence number to check, so anyone spoofing the peer could end
 * the flow with one. */
static __always_inline int sg_ct_reopened(const struct sg_ct_val *ct, __u8 proto, __u8 tcp_flags) {
  return proto == IPPROTO_TCP && ct->state == SG_CT_CLOSING && ct->fins == SG_FIN_BOTH &&
         (tcp_flags & (SG_TCP_SYN | SG_TCP_ACK)) == SG_TCP_SYN;
}

/* A reopened tuple's entry, opened the same way round: now the new connection's, in place. */
static __always_inline void sg_ct_restart(struct sg_ct_val *ct, const struct sg_pkt *pkt, __u16 zone, __u32 gen,
                                          __u32 rule_id, __u32 len, __u64 now) {
  __u8 proto = pkt->t.proto;
  ct->seq_seen = 0;
  ct->seq_end[SG_SIDE_ORIG ^ 1] = 0; /* the old connection's, as a fresh entry has it */
  sg_ct_track(ct, pkt, SG_SIDE_ORIG);
  ct->packets = 1;
  ct->bytes = len;
  ct->gen = gen;
  ct->rule_id = rule_id;
  ct->zone = zone;
  ct->state = SG_CT_NEW;
  ct->fins = 0;
  ct->expires_ns = now + sg_ct_lifetime(proto, SG_CT_NEW);
}

/* Whether a new flow may take this entry's slot although it has not expired: a TCP flow that saw
 * FIN or RST (SG_CT_CLOSING) and no packet since for SG_CT_CLOSED_QUIET_MS when closed both ways,
 * SG_CT_HALF_CLOSED_QUIET_S when one way. Otherwise every closed connection would hold its slot
 * SG_CT_TCP_CLOSE_S, capping a VM at SG_CT_SHARE / SG_CT_TCP_CLOSE_S (410) new connections per
 * second: every slot full of closed flows, CT_FULL (issue 24); and with one quiet time of 1 s,
 * at about 4,096 per second (bench/run conn-rate on a quiet machine offers ~10,000). The hand
 * reaches a slot again only after as many new flows as the share holds, so this takes the oldest
 * closed flows first, like Linux conntrack's early drop of closing TCP connections. A late
 * retransmission of such a flow is then a new flow, decided by the policy. */
static __always_inline int sg_ct_closed_and_quiet(const struct sg_ct_val *v, __u64 now) {
  if (v->state != SG_CT_CLOSING)
    return 0;
  __u64 quiet = v->fins == SG_FIN_BOTH ? SG_CT_CLOSED_QUIET_MS * 1000000ULL : SG_CT_HALF_CLOSED_QUIET_S * SG_NS;
  /* last packet = expires - SG_CT_TCP_CLOSE_S; quiet when last packet + quiet <= now */
  return v->expires_ns + quiet <= now + SG_CT_TCP_CLOSE_S * SG_NS;
}

/* The next slot number of a share. Two CPUs may read the same number at once (bcc builds for a
 * BPF CPU version without fetching atomics); they then write one slot and the entry written first
 * is held by no slot: such strays are rare, and SG_LRU_SLACK has room for them. */
static __always_inline __u32 sg_hand_next(__u32 *hand) {
  __u32 n = *hand;
  __sync_fetch_and_add(hand, 1);
  return n;
}

/* An entry the datapath removed itself before a conntrack scan could log the flow's end (its slot
 * went to a new flow): the caller reports it as a flow_end event (lib/events.h). Per-CPU scratch. */
struct sg_ct_ended {
  struct sg_ct_key key; /* ifindex 0: nothing ended */
  struct sg_ct_val val;
};

/* A new entry in the VM's share (see the top of this file). 0, or -SG_DROP_CT_FULL. The entry
 * whose slot it took, if one was still there, is copied to *ended. */
static __always_inline int sg_ct_create(__u32 ifindex, const struct sg_pkt *pkt, __u8 direction, __u16 zone,
                                        __u32 gen, __u32 rule_id, __u32 len, __u64 now, __u32 share,
                                        struct sg_ct_ended *ended) {
  const struct sg_tuple *t = &pkt->t;
  ended->key.ifindex = 0;
  struct sg_ct_key key = {};
  sg_ct_key_of(&key, ifindex, t, 0);
  share %= SG_CT_SHARES;
  struct sg_share_hand *hand = sg_share_hands.lookup(&share);
  if (!hand)
    return -SG_DROP_CT_FULL; /* cannot happen (share < SG_CT_SHARES) */
  struct sg_ct_key *take = 0, *spare = 0; /* spare: closed both ways, not yet quiet (below) */
  struct sg_ct_val *take_held = 0, *spare_held = 0; /* the entries they hold, if still there */
  for (int i = 0; i < SG_SHARE_PROBES; i++) {
    __u32 idx = (share * 2 + (direction & 1)) * SG_CT_SHARE + sg_hand_next(&hand->ct[direction & 1]) % SG_CT_SHARE;
    struct sg_ct_key *slot = sg_ct_slots.lookup(&idx);
    if (!slot)
      return -SG_DROP_CT_FULL;
    struct sg_ct_val *held = 0;
    if (slot->ifindex) {
      held = sg_ct.lookup(slot);
      if (held && held->expires_ns > now && !sg_ct_closed_and_quiet(held, now)) {
        /* a live flow of this share: keep it. One closed both ways (only its last ACK may still
         * come) gives way when a burst of new flows finds the share otherwise full. */
        if (!spare && held->state == SG_CT_CLOSING && held->fins == SG_FIN_BOTH) {
          spare = slot;
          spare_held = held;
        }
        continue;
      }
    }
    take = slot;
    take_held = held;
    break;
  }
  if (!take) {
    take = spare;
    take_held = spare_held;
  }
  if (!take)
    return -SG_DROP_CT_FULL;
  if (take_held) { /* its flow ends here, unlogged so far: the caller reports it */
    __builtin_memcpy(&ended->key, take, sizeof(ended->key));
    __builtin_memcpy(&ended->val, take_held, sizeof(ended->val));
    sg_ct.delete(take);
  }
  __builtin_memcpy(take, &key, sizeof(key));
  struct sg_ct_val val = {.packets = 1, .bytes = len, .gen = gen, .rule_id = rule_id, .zone = zone,
                          .direction = direction, .state = SG_CT_NEW};
  val.expires_ns = now + sg_ct_lifetime(t->proto, SG_CT_NEW);
  if (t->proto == IPPROTO_TCP)
    sg_ct_track(&val, pkt, SG_SIDE_ORIG);
  sg_ct.update(&key, &val);
  return 0;
}

static __always_inline void sg_frag_key_of(struct sg_frag_key *key, __u32 ifindex, const struct sg_pkt *pkt) {
  key->ifindex = ifindex;
  key->id = pkt->frag_id;
  key->proto = pkt->t.proto;
  __builtin_memcpy(key->saddr, pkt->t.saddr, 16);
  __builtin_memcpy(key->daddr, pkt->t.daddr, 16);
}

/* An allowed first fragment: remember its datagram (in the VM's share) so the later fragments
 * pass. 0, or -SG_DROP_FRAG_FULL. */
static __always_inline int sg_frag_allow(__u32 ifindex, const struct sg_pkt *pkt, __u8 direction, __u64 now,
                                         __u32 share) {
  struct sg_frag_key key = {};
  sg_frag_key_of(&key, ifindex, pkt);
  share %= SG_CT_SHARES;
  struct sg_share_hand *hand = sg_share_hands.lookup(&share);
  if (!hand)
    return -SG_DROP_FRAG_FULL;
  for (int i = 0; i < SG_SHARE_PROBES; i++) {
    __u32 idx = (share * 2 + (direction & 1)) * SG_FRAG_SHARE +
                sg_hand_next(&hand->frag[direction & 1]) % SG_FRAG_SHARE;
    struct sg_frag_key *slot = sg_frag_slots.lookup(&idx);
    if (!slot)
      return -SG_DROP_FRAG_FULL;
    if (slot->ifindex) {
      struct sg_frag_val *held = sg_frag.lookup(slot);
      if (held && held->expires_ns > now)
        continue;
      if (held)
        sg_frag.delete(slot);
    }
    __builtin_memcpy(slot, &key, sizeof(key));
    struct sg_frag_val val = {.expires_ns = now + SG_FRAG_S * SG_NS};
    sg_frag.update(&key, &val);
    return 0;
  }
  return -SG_DROP_FRAG_FULL;
}

static __always_inline int sg_frag_allowed(__u32 ifindex, const struct sg_pkt *pkt, __u64 now) {
  struct sg_frag_key key = {};
  sg_frag_key_of(&key, ifindex, pkt);
  struct sg_frag_val *v = sg_frag.lookup(&key);
  return v && v->expires_ns > now;
}

#endif
