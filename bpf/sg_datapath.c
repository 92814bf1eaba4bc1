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
#include "lib/conntrack.h"
#include "lib/events.h"

/* DNS (UDP or TCP port 53, to any address) from a VM passes to the host, where skyguard's DNS
 * proxy answers it (nftables steers it there); replies come back through conntrack. Policy note:
 * this bypasses the rules on purpose, because every query is answered by skyguard or not at all.
 * Build with -DSG_DNS_PASSTHROUGH=0 to send DNS through the rules like any other flow. */
#ifndef SG_DNS_PASSTHROUGH
#define SG_DNS_PASSTHROUGH 1
#endif

struct sg_meta {
  __u16 zone;
  __u32 cfg_flags;
  struct sg_pkt pkt;
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

static __always_inline int sg_is_own(__u32 ifindex, __u32 gen, const __u8 *addr) {
  struct sg_srcip_key key = {.ifindex = ifindex, .gen = gen};
  __builtin_memcpy(key.addr, addr, 16);
  return sg_srcip.lookup(&key) != 0;
}

static __always_inline int sg_is_unspecified(const __u8 *a) {
  __u64 hi, lo;
  __builtin_memcpy(&hi, a, 8);
  __builtin_memcpy(&lo, a + 8, 8);
  return (hi | lo) == 0;
}

static __always_inline int sg_mac_eq(const __u8 *a, const __u8 *b) {
  __u32 a4, b4;
  __u16 a2, b2;
  __builtin_memcpy(&a4, a, 4);
  __builtin_memcpy(&b4, b, 4);
  __builtin_memcpy(&a2, a + 4, 2);
  __builtin_memcpy(&b2, b + 4, 2);
  return a4 == b4 && a2 == b2;
}

/* Neighbour discovery / MLD the VM sends: only about itself. */
static __always_inline int sg_check_nd(__u32 ifindex, __u32 gen, struct sg_workload_val *wl, struct sg_pkt *pkt) {
  if (pkt->has_lladdr && !sg_mac_eq(pkt->lladdr, wl->mac))
    return -SG_DROP_ND_SPOOF;
  if (pkt->nd_type == 136 && !sg_is_own(ifindex, gen, pkt->nd_target))
    return -SG_DROP_ND_SPOOF; /* NA: may only advertise its own addresses */
  if (pkt->nd_type == 135 && sg_is_unspecified(pkt->t.saddr) && !sg_is_own(ifindex, gen, pkt->nd_target))
    return -SG_DROP_ND_SPOOF; /* DAD: may only probe its own addresses */
  return SG_VERDICT_CONTROL;
}

/* The whole decision for one frame. Returns SG_VERDICT_* (pass) or -SG_DROP_* (drop). */
static __always_inline int sg_handle(void *data, void *data_end, __u32 ifindex, __u32 len, __u8 direction,
                                     struct sg_meta *m) {
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

  if (pkt->frag == SG_FRAG_NONE || pkt->frag == SG_FRAG_FIRST) {
    if (pkt->icmp_kind == SG_ICMP_ND_FORBIDDEN && direction == SG_DIR_EGRESS)
      return -SG_DROP_ND_FORBIDDEN;
    if (pkt->icmp_kind == SG_ICMP_ND || pkt->icmp_kind == SG_ICMP_ND_FORBIDDEN) {
      if (pkt->frag != SG_FRAG_NONE)
        return -SG_DROP_FRAG_CONTROL;
      if (direction == SG_DIR_INGRESS)
        return SG_VERDICT_CONTROL;
      /* The unspecified source is only for DAD and MLD before an address is configured. */
      if (!sg_is_unspecified(pkt->t.saddr) && !sg_is_own(ifindex, gen, pkt->t.saddr))
        return -SG_DROP_SPOOF_IP;
      return sg_check_nd(ifindex, gen, wl, pkt);
    }
  }
  /* The source address check (egress) is done where it is needed: for packets that match no flow
   * of this generation. A conntrack entry at this interface was created for a tuple whose VM-side
   * address was checked in the generation it carries (egress: the source; ingress: the
   * destination), so a hit of the active generation needs no second look. */
  int own_src = direction == SG_DIR_INGRESS;

  /* The coarse clock (CLOCK_MONOTONIC_COARSE, jiffy resolution) is a memory read; timeouts in
   * seconds do not need more. Userspace writes expiries on CLOCK_MONOTONIC, the same base. */
  __u64 now = bpf_ktime_get_coarse_ns();
  if (pkt->frag == SG_FRAG_LATER) {
    if (!own_src && !sg_is_own(ifindex, gen, pkt->t.saddr))
      return -SG_DROP_SPOOF_IP;
    return sg_frag_allowed(ifindex, pkt, now) ? SG_VERDICT_ESTABLISHED : -SG_DROP_FRAG_NO_FLOW;
  }

  struct sg_ct_key key = {};
  int is_reply = 0;
  if (pkt->icmp_kind == SG_ICMP_ERROR) {
    /* Related to an allowed flow at this interface, whichever side opened it. */
    if (pkt->frag != SG_FRAG_NONE)
      return -SG_DROP_FRAG_CONTROL;
    if (!own_src && !sg_is_own(ifindex, gen, pkt->t.saddr))
      return -SG_DROP_SPOOF_IP;
    struct sg_ct_val *rel = sg_ct_find(ifindex, &pkt->inner, direction ^ 1, now, &key, &is_reply);
    if (!rel)
      rel = sg_ct_find(ifindex, &pkt->inner, direction, now, &key, &is_reply);
    return rel ? SG_VERDICT_ESTABLISHED : -SG_DROP_ICMP_ERR_NO_FLOW;
  }

  __u16 port = pkt->t.dport;
  if (pkt->t.proto == IPPROTO_ICMP || pkt->t.proto == IPPROTO_ICMPV6)
    port = pkt->icmp_type; /* type in the high (first) byte of the network-order port */

  struct sg_ct_val *ct = sg_ct_find(ifindex, &pkt->t, direction, now, &key, &is_reply);
  if (ct) {
    if (ct->gen != gen) {
      /* The policy changed since this flow was approved: decide again as its originator,
       * including whether its VM-side address is still the workload's. */
      const __u8 *vm_addr = ct->direction == SG_DIR_EGRESS ? key.saddr : key.daddr;
      if (!sg_is_own(ifindex, gen, vm_addr)) {
        sg_ct.delete(&key);
        return -SG_DROP_POLICY_REVOKED;
      }
      int verdict = 0;
      if (ct->rule_id == 0) {
        verdict = 0; /* DNS passthrough flows stay */
      } else {
        const __u8 *remote = ct->direction == SG_DIR_EGRESS ? key.daddr : key.saddr;
        __u16 oport = key.dport;
        if (key.proto == IPPROTO_ICMP || key.proto == IPPROTO_ICMPV6)
          oport = port;
        verdict = sg_policy_decide(gen, ct->direction, wl->zone, remote, key.proto, oport, now);
      }
      if (verdict < 0) {
        sg_ct.delete(&key);
        return -SG_DROP_POLICY_REVOKED;
      }
      ct->gen = gen;
      if (verdict > 0)
        ct->rule_id = verdict;
    }
    sg_ct_touch(ct, pkt->t.proto, pkt->tcp_flags, is_reply, len, now);
    if (pkt->frag == SG_FRAG_FIRST)
      sg_frag_allow(ifindex, pkt, now);
    return SG_VERDICT_ESTABLISHED;
  }

  /* A new flow: its VM-side address must be the workload's. */
  if (direction == SG_DIR_EGRESS && !sg_is_own(ifindex, gen, pkt->t.saddr))
    return -SG_DROP_SPOOF_IP;
  if (direction == SG_DIR_INGRESS && !sg_is_own(ifindex, gen, pkt->t.daddr))
    return -SG_DROP_DST_NOT_WORKLOAD;

#if SG_DNS_PASSTHROUGH
  if (direction == SG_DIR_EGRESS && port == bpf_htons(53) &&
      (pkt->t.proto == IPPROTO_UDP || pkt->t.proto == IPPROTO_TCP)) {
    if (pkt->frag != SG_FRAG_NONE)
      return -SG_DROP_FRAG_CONTROL;
    sg_ct_create(ifindex, &pkt->t, direction, wl->zone, gen, 0, len, now);
    return SG_VERDICT_DNS;
  }
#endif

  const __u8 *remote = direction == SG_DIR_EGRESS ? pkt->t.daddr : pkt->t.saddr;
  int rule = sg_policy_decide(gen, direction, wl->zone, remote, pkt->t.proto, port, now);
  if (rule < 0)
    return rule;
  sg_ct_create(ifindex, &pkt->t, direction, wl->zone, gen, rule, len, now);
  if (pkt->frag == SG_FRAG_FIRST)
    sg_frag_allow(ifindex, pkt, now);
  sg_emit(SG_EVENT_FLOW_START, 0, ifindex, wl->zone, direction, &pkt->t, rule, len, m->cfg_flags);
  return SG_VERDICT_ALLOW;
}

/* Count the verdict; on a drop, the single drop exit. Returns 1 to pass, 0 to drop. */
static __always_inline int sg_finish(int verdict, __u32 ifindex, __u32 len, __u8 direction, struct sg_meta *m) {
  if (verdict < 0) {
    sg_report_drop(m->zone, direction, (__u8)(-verdict), ifindex, &m->pkt.t, len, m->cfg_flags);
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
  int verdict = sg_handle(data, data_end, ctx->ingress_ifindex, len, SG_DIR_EGRESS, m);
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
    verdict = sg_handle((void *)(long)skb->data, (void *)(long)skb->data_end, skb->ifindex, skb->len, direction, m);
    __u32 linear = (long)skb->data_end - (long)skb->data;
    if (verdict == -SG_DROP_MALFORMED && skb->len > linear) {
      bpf_skb_pull_data(skb, skb->len < SG_PULL_LEN ? skb->len : SG_PULL_LEN);
      m = sg_meta_get();
      if (!m)
        return TC_ACT_SHOT;
      verdict = sg_handle((void *)(long)skb->data, (void *)(long)skb->data_end, skb->ifindex, skb->len, direction, m);
    }
  }
  if (verdict == -SG_DROP_VLAN && !m->zone) {
    int zero = 0;
    struct sg_config_val *cfg = sg_config.lookup(&zero);
    if (cfg) {
      struct sg_workload_val *wl = sg_workload_of(skb->ifindex, cfg->gen);
      if (wl)
        m->zone = wl->zone;
    }
  }
  return sg_finish(verdict, skb->ifindex, skb->len, direction, m) ? TC_ACT_OK : TC_ACT_SHOT;
}

int sg_from_vm_tc(struct __sk_buff *skb) { return sg_tc(skb, SG_DIR_EGRESS); }

int sg_to_vm(struct __sk_buff *skb) { return sg_tc(skb, SG_DIR_INGRESS); }
