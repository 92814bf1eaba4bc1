/* sg_datapath.c: skyguard's enforcement programs, one translation unit so both directions share
 * their maps (bcc creates maps per BPF object). Entry points:
 *   sg_from_vm     XDP on the host side of a VM interface: what the VM sends.
 *   sg_from_vm_tc  the same check as a TC ingress classifier (the loader picks one; see README).
 *   sg_to_vm       TC egress on the host side: what the VM receives.
 * Each entry point calls sg_handle() and has ONE drop exit that counts and reports. Features live
 * in lib/ headers; everything userspace mirrors is in abi.h. The loader (skyguard/datapath/loader.py)
 * inlines the lib/ headers because bcc rewrites map calls only in its main text.
 */
#include <uapi/linux/pkt_cls.h>
#include "abi.h"
#include "lib/pin.h"
#include "lib/parse.h"
#include "lib/policy.h"
#include "lib/nd.h"
#include "lib/conntrack.h"
#include "lib/events.h"

/* DNS (UDP or TCP port 53, to any address) from a VM passes to the host, where skyguard's DNS
 * proxy answers it: the nftables steering (skyguard/dns/steering.py) redirects it there and drops
 * whatever of it it could not redirect, so none of it leaves the host. The proxy's replies carry
 * SG_MARK_DNS_REPLY (set by the same steering) and pass on that mark alone: steered DNS keeps no
 * conntrack state, so it costs no shared table entry and nothing a remote host sends (from port 53
 * or an ICMP error about a query) is ever related to it. Policy note: this bypasses the rules on
 * purpose, because every query is answered by skyguard or not at all.
 * Build with -DSG_DNS_PASSTHROUGH=0 to send DNS through the rules like any other flow. */
#ifndef SG_DNS_PASSTHROUGH
#define SG_DNS_PASSTHROUGH 1
#endif

struct sg_meta {
  __u16 zone;
  __u16 share; /* the workload id: its share of state and of drop events */
  __u32 cfg_flags;
  struct sg_pkt pkt;
  /* The clock (sg_now), never zeroed: the coarse clock at the last tick this CPU saw. */
  __u64 clock_jiffies;
  __u64 clock_ns;
  struct sg_ct_ended ended; /* written by sg_ct_create before it is read */
};

/* Per-CPU scratch for the packet being handled: struct sg_meta does not fit beside the map keys
 * in the 512-byte BPF stack. Programs only; one packet per CPU at a time (no preemption in XDP/TC). */
BPF_PERCPU_ARRAY(sg_scratch, struct sg_meta, 1);

static __always_inline struct sg_meta *sg_meta_get(void) {
  int zero = 0;
  struct sg_meta *m = sg_scratch.lookup(&zero);
  /* Zero only what parsing sets conditionally (the tuple, flags, ids); the fields after
   * arp_spa are written before they are read (see struct sg_pkt). */
  if (m)
    __builtin_memset(m, 0, __builtin_offsetof(struct sg_meta, pkt) + __builtin_offsetof(struct sg_pkt, arp_spa));
  return m;
}

/* CLOCK_MONOTONIC_COARSE, which only moves when jiffies do: bpf_jiffies64() is inlined by the
 * verifier into one load, while bpf_ktime_get_coarse_ns() is a helper call that measured ~30 ns
 * here (bench/run datapath-cost, issue 24). So the coarse clock is read once per tick per CPU and
 * kept in the scratch; the value is the one the helper would return (both advance at the tick). */
static __always_inline __u64 sg_now(struct sg_meta *m) {
  __u64 j = bpf_jiffies64();
  if (j != m->clock_jiffies || !m->clock_ns) {
    m->clock_ns = bpf_ktime_get_coarse_ns();
    m->clock_jiffies = j;
  }
  return m->clock_ns;
}

/* The whole decision for one frame. Returns SG_VERDICT_* (pass) or -SG_DROP_* (drop). */
/* ctx: the program's context (for helpers that need it); mark: skb->mark (0 under XDP). */
static __always_inline int sg_handle(void *ctx, void *data, void *data_end, __u32 ifindex, __u32 len,
                                     __u8 direction, __u32 mark, struct sg_meta *m) {
  struct sg_pkt *pkt = &m->pkt;
  int zero = 0;
  struct sg_config_val *cfg = sg_config.lookup(&zero);
  if (!cfg || !cfg->gen)
    return -SG_DROP_NO_CONFIG;
  __u32 gen = cfg->gen;
  m->cfg_flags = cfg->flags;
  struct sg_workload_val *wl = sg_workload_of(ifindex, gen);
  if (!wl)
    return -SG_DROP_NO_WORKLOAD;
  m->zone = wl->zone;
  m->share = wl->workload;

  int err = sg_parse(data, data_end, len, pkt);
  if (err)
    return err;

  if (direction == SG_DIR_EGRESS && !sg_mac_eq(pkt->smac, wl->mac))
    return -SG_DROP_SPOOF_MAC;
  if (pkt->l3 == SG_L3_ARP) {
    if (direction == SG_DIR_EGRESS) {
      if (!sg_mac_eq(pkt->arp_sha, wl->mac))
        return -SG_DROP_ARP_SPOOF;
      /* 0.0.0.0 is an ARP probe (RFC 5227). */
      __u8 *spa = pkt->arp_spa;
      if (!(spa[12] == 0 && spa[13] == 0 && spa[14] == 0 && spa[15] == 0) && !sg_is_own(ifindex, gen, spa))
        return -SG_DROP_ARP_SPOOF;
    }
    return SG_VERDICT_CONTROL;
  }

  /* Set when a control message (ICMP error, ND/MLD) was not what passes without a rule: it then
   * goes through the policy like any ICMP packet, and a missing rule is counted as this reason. */
  int no_rule_reason = SG_DROP_NO_RULE;
  if (pkt->icmp_kind == SG_ICMP_ND || pkt->icmp_kind == SG_ICMP_ND_FORBIDDEN) {
    if (pkt->frag != SG_FRAG_NONE)
      return -SG_DROP_FRAG_CONTROL; /* SG_FRAG_LATER never has an icmp_kind */
    int verdict = direction == SG_DIR_EGRESS ? sg_nd_from_vm(ctx, ifindex, gen, wl, pkt, len) : sg_nd_to_vm(pkt);
    if (verdict)
      return verdict;
    no_rule_reason = SG_DROP_ND_NOT_LOCAL;
  }
  /* The source address check (egress) is done where it is needed: for packets that match no flow
   * of this generation. A conntrack entry at this interface was created for a tuple whose VM-side
   * address was checked in the generation it carries (egress: the source; ingress: the
   * destination), so a hit of the active generation needs no second look. */
  int own_src = direction == SG_DIR_INGRESS;

  /* The coarse clock (CLOCK_MONOTONIC_COARSE, jiffy resolution; sg_now): timeouts in seconds do
   * not need more. Userspace writes expiries on CLOCK_MONOTONIC, the same base. */
  __u64 now = sg_now(m);
  if (pkt->frag == SG_FRAG_LATER) {
    if (!own_src && !sg_is_own(ifindex, gen, pkt->t.saddr))
      return -SG_DROP_SPOOF_IP;
#if SG_DNS_PASSTHROUGH
    if (direction == SG_DIR_INGRESS && (mark & SG_MARK_DNS_REPLY) &&
        (pkt->t.proto == IPPROTO_UDP || pkt->t.proto == IPPROTO_TCP))
      return SG_VERDICT_DNS; /* a fragment of the DNS proxy's reply */
#endif
    if (!sg_frag_allowed(ifindex, pkt, now))
      return -SG_DROP_FRAG_NO_FLOW;
    /* of an allowed datagram, but overlapping the transport header its first fragment showed */
    return sg_later_fragment_ok(pkt->t.proto, pkt->frag_offset8) ? SG_VERDICT_ESTABLISHED : -SG_DROP_MALFORMED;
  }

  struct sg_ct_key rkey; /* a reversed key, written by sg_ct_find when it needs one */
  struct sg_ct_key *key = 0;
  int is_reply = 0;
  if (pkt->icmp_kind == SG_ICMP_ERROR) {
    if (pkt->frag != SG_FRAG_NONE)
      return -SG_DROP_FRAG_CONTROL;
    if (!own_src && !sg_is_own(ifindex, gen, pkt->t.saddr))
      return -SG_DROP_SPOOF_IP;
    /* Related only to a flow of this interface, and only as that flow seen from the VM: an error
     * the VM sends is about a packet it received (inner: peer -> VM) and goes to that peer; an
     * error it receives is about a packet it sent (inner: VM -> peer) and comes to the VM. Either
     * way the outer destination is the inner source. Steered DNS has no conntrack entry, so no
     * error is ever related to it. Anything else is an ICMP packet like any other: policy. */
    if (sg_addr_eq(pkt->t.daddr, pkt->inner.saddr) &&
        sg_ct_find(ifindex, &pkt->inner, direction ^ 1, now, &rkey, &key, &is_reply, SG_CT_EITHER))
      return SG_VERDICT_ESTABLISHED;
    no_rule_reason = SG_DROP_ICMP_ERR_NO_FLOW;
  }

  __u16 port = pkt->t.dport;
  if (pkt->t.proto == IPPROTO_ICMP || pkt->t.proto == IPPROTO_ICMPV6)
    port = pkt->icmp_type; /* type in the high (first) byte of the network-order port */

  struct sg_ct_val *ct = sg_ct_find(ifindex, &pkt->t, direction, now, &rkey, &key, &is_reply, sg_ct_orient(pkt));
  /* A new connection on a closed flow's tuple (sg_ct_reopened) is decided below as new. Opened
   * the same way round, it takes over the closed flow's entry in place (a fresh entry elsewhere
   * would leave the old slot naming a live key); the other way round, the entry goes now. */
  struct sg_ct_val *reopen = 0;
  if (ct && sg_ct_reopened(ct, pkt->t.proto, pkt->tcp_flags)) {
    if (is_reply) {
      sg_emit_flow_end(key, ct, m->cfg_flags); /* the closed flow ends here */
      sg_ct.delete(key);
    } else {
      reopen = ct;
    }
    ct = 0;
  }
  if (ct) {
    if (ct->gen != gen) {
      /* The policy changed since this flow was approved: decide again as its originator,
       * including whether its VM-side address is still the workload's. rule_id 0 is a DNS
       * passthrough entry an older datapath made: steered DNS keeps no state any more. */
      const __u8 *vm_addr = ct->direction == SG_DIR_EGRESS ? key->saddr : key->daddr;
      if (!sg_is_own(ifindex, gen, vm_addr) || ct->rule_id == 0) {
        sg_ct.delete(key);
        return -SG_DROP_POLICY_REVOKED;
      }
      const __u8 *remote = ct->direction == SG_DIR_EGRESS ? key->daddr : key->saddr;
      __u16 oport = key->dport;
      if (key->proto == IPPROTO_ICMP || key->proto == IPPROTO_ICMPV6)
        oport = port;
      int verdict = sg_policy_decide(gen, ct->direction, wl->zone, remote, key->proto, oport, now);
      if (verdict < 0) {
        sg_ct.delete(key);
        return -SG_DROP_POLICY_REVOKED;
      }
      ct->gen = gen;
      ct->rule_id = verdict;
    }
    sg_ct_touch(ct, pkt, is_reply, len, now);
    if (pkt->frag == SG_FRAG_FIRST) {
      int err = sg_frag_allow(ifindex, pkt, direction, now, wl->workload);
      if (err)
        return err;
    }
    return SG_VERDICT_ESTABLISHED;
  }

  /* A new flow: its VM-side address must be the workload's. */
  if (direction == SG_DIR_EGRESS && !sg_is_own(ifindex, gen, pkt->t.saddr))
    return -SG_DROP_SPOOF_IP;
  if (direction == SG_DIR_INGRESS && !sg_is_own(ifindex, gen, pkt->t.daddr))
    return -SG_DROP_DST_NOT_WORKLOAD;

#if SG_DNS_PASSTHROUGH
  if (pkt->t.proto == IPPROTO_UDP || pkt->t.proto == IPPROTO_TCP) {
    if (direction == SG_DIR_EGRESS && port == bpf_htons(53)) {
      if (pkt->frag != SG_FRAG_NONE)
        return -SG_DROP_FRAG_CONTROL;
      return SG_VERDICT_DNS; /* to the steering; no state (see the top of this file) */
    }
    if (direction == SG_DIR_INGRESS && (mark & SG_MARK_DNS_REPLY) && pkt->t.sport == bpf_htons(53))
      return SG_VERDICT_DNS; /* the DNS proxy's reply, marked by the steering */
  }
#endif

  const __u8 *remote = direction == SG_DIR_EGRESS ? pkt->t.daddr : pkt->t.saddr;
  /* A reopened tuple is decided again even under the policy that approved its closed flow: the
   * decision also depends on the time (a DNS answer's TTL may have run out since). */
  int rule = sg_policy_decide(gen, direction, wl->zone, remote, pkt->t.proto, port, now);
  if (reopen) {
    sg_emit_flow_end(key, reopen, m->cfg_flags); /* the closed flow ends here, whatever the policy says */
    if (rule < 0)
      sg_ct.delete(key);
    else
      sg_ct_restart(reopen, pkt, wl->zone, gen, rule, len, now);
  }
  if (rule == -SG_DROP_NO_RULE)
    return -no_rule_reason;
  if (rule < 0)
    return rule;
  if (!reopen) {
    err = sg_ct_create(ifindex, pkt, direction, wl->zone, gen, rule, len, now, wl->workload, &m->ended);
    if (err)
      return err;
    if (m->ended.key.ifindex)
      sg_emit_flow_end(&m->ended.key, &m->ended.val, m->cfg_flags);
  }
  if (pkt->frag == SG_FRAG_FIRST) {
    err = sg_frag_allow(ifindex, pkt, direction, now, wl->workload);
    if (err)
      return err;
  }
  sg_emit(SG_EVENT_FLOW_START, 0, ifindex, wl->zone, direction, &pkt->t, rule, len, m->cfg_flags, wl->workload,
          now);
  return SG_VERDICT_ALLOW;
}

/* Count the verdict; on a drop, the single drop exit. Returns 1 to pass, 0 to drop. */
static __always_inline int sg_finish(int verdict, __u32 ifindex, __u32 len, __u8 direction, struct sg_meta *m) {
  if (verdict < 0) {
    /* sg_now: a drop before sg_handle read the clock (or on the VLAN path) reads it here. */
    sg_report_drop(m->zone, direction, (__u8)(-verdict), ifindex, &m->pkt.t, len, m->cfg_flags, m->share,
                   sg_now(m));
    return 0;
  }
  sg_count_traffic(m->zone, direction, (__u8)verdict, len);
  return 1;
}

int sg_from_vm(struct xdp_md *ctx) {
  void *data = (void *)(long)ctx->data;
  void *data_end = (void *)(long)ctx->data_end;
  __u32 len = data_end - data;
  struct sg_meta *m = sg_meta_get();
  if (!m)
    return XDP_DROP; /* cannot happen (a one-entry array); fail closed */
  int verdict = sg_handle(ctx, data, data_end, ctx->ingress_ifindex, len, SG_DIR_EGRESS, 0, m);
  return sg_finish(verdict, ctx->ingress_ifindex, len, SG_DIR_EGRESS, m) ? XDP_PASS : XDP_DROP;
}

/* Headers we read must be in the linear part of an skb. Pulling costs a head reallocation (and a
 * copy of a clone) per GSO packet, so it is done only when the linear part was not enough: a
 * frame that parses as malformed but is longer than its linear part is pulled and decided again
 * (parsing writes no map before it fails, so the retry is clean). */
#ifndef SG_PULL_LEN
#define SG_PULL_LEN 256 /* bytes made linear on retry: Ethernet + IPv6 + a full extension chain + TCP */
#endif

static __always_inline int sg_tc(struct __sk_buff *skb, __u8 direction) {
  struct sg_meta *m = sg_meta_get();
  if (!m)
    return TC_ACT_SHOT; /* cannot happen (a one-entry array); fail closed */
  int verdict;
  if (skb->vlan_present) {
    verdict = -SG_DROP_VLAN; /* the tag was offloaded into skb metadata: not in the data */
  } else {
    verdict = sg_handle(skb, (void *)(long)skb->data, (void *)(long)skb->data_end, skb->ifindex, skb->len, direction,
                        skb->mark, m);
    __u32 linear = (long)skb->data_end - (long)skb->data;
    if (verdict == -SG_DROP_MALFORMED && skb->len > linear) {
      bpf_skb_pull_data(skb, skb->len < SG_PULL_LEN ? skb->len : SG_PULL_LEN);
      m = sg_meta_get();
      if (!m)
        return TC_ACT_SHOT;
      verdict = sg_handle(skb, (void *)(long)skb->data, (void *)(long)skb->data_end, skb->ifindex, skb->len, direction,
                        skb->mark, m);
    }
  }
  if (verdict == -SG_DROP_VLAN && !m->zone) {
    int zero = 0;
    struct sg_config_val *cfg = sg_config.lookup(&zero);
    if (cfg) {
      struct sg_workload_val *wl = sg_workload_of(skb->ifindex, cfg->gen);
      if (wl) {
        m->zone = wl->zone;
        m->share = wl->workload;
      }
    }
  }
  return sg_finish(verdict, skb->ifindex, skb->len, direction, m) ? TC_ACT_OK : TC_ACT_SHOT;
}

int sg_from_vm_tc(struct __sk_buff *skb) { return sg_tc(skb, SG_DIR_EGRESS); }

int sg_to_vm(struct __sk_buff *skb) { return sg_tc(skb, SG_DIR_INGRESS); }
