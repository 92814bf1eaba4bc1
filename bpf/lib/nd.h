/* nd.h: the rules for IPv6 neighbour discovery and MLD, the one ICMPv6 that passes without a
 * policy rule (SG_VERDICT_CONTROL). Such a message passes only when it cannot leave the link:
 *   - hop limit 255 for ND (RFC 4861: a router never forwards one that still has it) and 1 for MLD
 *     (RFC 2710/3810: it dies at the first router);
 *   - from the VM: a link-local unicast destination, a link-scope multicast one (MLD: any
 *     multicast group), or a unicast address the host delivers to itself (bpf_fib_lookup says it
 *     is not forwarded: the host's own address on that link answering its NS); MLD from a
 *     link-local source or :: (RFC 3810 5.2.13);
 *   - toward the VM: router advertisements and redirects only from a link-local source (the
 *     host's gateway; nothing forwarded keeps a link-local source or hop limit 255).
 * Anything else is an ordinary ICMPv6 packet: it goes through the policy (and is counted as
 * SG_DROP_ND_NOT_LOCAL when no rule allows it), so ND cannot carry data to another host.
 * Spoofing rules (who a VM may claim to be) are applied first and drop outright. Include after
 * policy.h (sg_srcip).
 */
#ifndef SG_ND_H
#define SG_ND_H

#ifndef AF_INET6
#define AF_INET6 10
#endif

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

static __always_inline int sg_is_link_local(const __u8 *a) { return a[0] == 0xfe && (a[1] & 0xc0) == 0x80; }
static __always_inline int sg_is_multicast(const __u8 *a) { return a[0] == 0xff; }
static __always_inline int sg_is_link_multicast(const __u8 *a) { return a[0] == 0xff && (a[1] & 0x0f) == 0x02; }
static __always_inline int sg_is_mld(__u8 type) { return type == 130 || type == 131 || type == 132 || type == 143; }

/* Whether the host would deliver this packet to itself or drop it rather than forward it. Any
 * answer that is not "not forwarded" (an error included) counts as forwarded: fail closed. */
static __always_inline int sg_host_keeps(void *ctx, __u32 ifindex, const struct sg_pkt *pkt, __u32 len) {
  struct bpf_fib_lookup fib = {};
  fib.family = AF_INET6;
  fib.ifindex = ifindex;
  fib.l4_protocol = IPPROTO_ICMPV6;
  fib.tot_len = len > 14 ? len - 14 : 0;
  __builtin_memcpy(fib.ipv6_src, pkt->t.saddr, 16);
  __builtin_memcpy(fib.ipv6_dst, pkt->t.daddr, 16);
  long rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), 0);
  return rc == BPF_FIB_LKUP_RET_NOT_FWDED || rc == BPF_FIB_LKUP_RET_FWD_DISABLED ||
         rc == BPF_FIB_LKUP_RET_BLACKHOLE || rc == BPF_FIB_LKUP_RET_UNREACHABLE || rc == BPF_FIB_LKUP_RET_PROHIBIT;
}

/* ND/MLD the VM sends: only about itself (drops), and only on the link (else 0: policy). */
static __always_inline int sg_nd_from_vm(void *ctx, __u32 ifindex, __u32 gen, struct sg_workload_val *wl,
                                         struct sg_pkt *pkt, __u32 len) {
  if (pkt->icmp_kind == SG_ICMP_ND_FORBIDDEN)
    return -SG_DROP_ND_FORBIDDEN; /* a VM is not a router */
  /* The unspecified source is only for DAD and MLD before an address is configured. */
  const __u8 *src = pkt->t.saddr;
  if (!sg_is_unspecified(src) && !sg_is_own(ifindex, gen, src))
    return -SG_DROP_SPOOF_IP;
  if (pkt->has_lladdr && (pkt->lladdr_differs || !sg_mac_eq(pkt->lladdr, wl->mac)))
    return -SG_DROP_ND_SPOOF;
  if (pkt->nd_type == 136 && !sg_is_own(ifindex, gen, pkt->nd_target))
    return -SG_DROP_ND_SPOOF; /* NA: may only advertise its own addresses */
  if (pkt->nd_type == 135 && sg_is_unspecified(src) && !sg_is_own(ifindex, gen, pkt->nd_target))
    return -SG_DROP_ND_SPOOF; /* DAD: may only probe its own addresses */

  const __u8 *dst = pkt->t.daddr;
  if (sg_is_mld(pkt->nd_type)) {
    if (pkt->hop_limit == 1 && sg_is_multicast(dst) && (sg_is_unspecified(src) || sg_is_link_local(src)))
      return SG_VERDICT_CONTROL;
    return 0;
  }
  if (pkt->hop_limit != 255)
    return 0;
  if (sg_is_link_local(dst) || sg_is_link_multicast(dst))
    return SG_VERDICT_CONTROL;
  if (!sg_is_multicast(dst) && sg_host_keeps(ctx, ifindex, pkt, len))
    return SG_VERDICT_CONTROL;
  return 0;
}

/* ND/MLD toward the VM: only what was sent on the link (else 0: policy). */
static __always_inline int sg_nd_to_vm(struct sg_pkt *pkt) {
  if (sg_is_mld(pkt->nd_type))
    return pkt->hop_limit == 1 && sg_is_link_local(pkt->t.saddr) ? SG_VERDICT_CONTROL : 0;
  if (pkt->hop_limit != 255)
    return 0;
  if (pkt->icmp_kind == SG_ICMP_ND_FORBIDDEN && !sg_is_link_local(pkt->t.saddr))
    return 0; /* router advertisements and redirects: from the host's gateway only */
  return SG_VERDICT_CONTROL;
}

#endif
