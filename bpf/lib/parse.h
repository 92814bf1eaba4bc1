/* parse.h: bounds-checked parsing of one frame into struct sg_pkt. Touches no map and decides
 * nothing: it only says what the frame is, or returns -SG_DROP_MALFORMED / another -reason when
 * it cannot or must not be understood (VLAN tags, IPv4 options, forbidden IPv6 extension headers).
 * Every read is checked against data_end before it happens (the verifier insists, and truncated
 * frames must drop cleanly at every length).
 */
#ifndef SG_PARSE_H
#define SG_PARSE_H

#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/in.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/icmp.h>
#include <uapi/linux/icmpv6.h>

/* Longest IPv6 extension-header chain we walk (headers before the transport header). A longer
 * chain is dropped (SG_DROP_IPV6_EXTHDR_CHAIN): attackers use long chains to push the transport
 * header out of reach of filters. Each step costs one bounded loop iteration. */
#ifndef SG_IPV6_MAX_EXT_HDRS
#define SG_IPV6_MAX_EXT_HDRS 4
#endif
/* Neighbour discovery options walked, up to the end of the packet: every SLLA/TLLA option is
 * checked, wherever it sits. A message with more options than this is malformed (real ones carry
 * one to three); each costs one bounded loop iteration, and the verifier explores each: 32 is
 * more than the TC program (which holds sg_handle twice) may take. */
#ifndef SG_ND_MAX_OPTS
#define SG_ND_MAX_OPTS 16
#endif
/* Longest ND message walked, in bytes (real ones fit a minimum MTU); also what bounds the
 * option offset for the verifier (packet offsets must stay under 64 KiB). */
#ifndef SG_ND_MAX_LEN
#define SG_ND_MAX_LEN 4096 /* < 0x1fff, the mask below */
#endif

#define SG_L3_ARP 1
#define SG_L3_IP 2

#define SG_FRAG_NONE 0
#define SG_FRAG_FIRST 1
#define SG_FRAG_LATER 2

#define SG_ICMP_PLAIN 0
#define SG_ICMP_ERROR 1 /* destination unreachable, time exceeded, ... : has an inner header */
#define SG_ICMP_ND 2    /* NS/NA/RS and MLD: link-local control the VM needs (nd_type says which) */
#define SG_ICMP_ND_FORBIDDEN 3 /* RA, redirect: a VM is not a router */

/* Laid out as struct sg_ct_key (abi.h): once sg_ct_find has set ifindex (and zeroed pad), a tuple
 * is its own forward conntrack key and is looked up in place, without a copy (issue 24). */
struct sg_tuple {
  __u32 ifindex; /* the interface, set by sg_ct_find */
  __u8 proto;
  __u8 pad[3];
  __u8 saddr[16];
  __u8 daddr[16];
  __u16 sport; /* network order */
  __u16 dport;
};
_Static_assert(sizeof(struct sg_tuple) == sizeof(struct sg_ct_key) &&
               __builtin_offsetof(struct sg_tuple, saddr) == __builtin_offsetof(struct sg_ct_key, saddr) &&
               __builtin_offsetof(struct sg_tuple, sport) == __builtin_offsetof(struct sg_ct_key, sport),
               "struct sg_tuple must be laid out as struct sg_ct_key");

struct sg_pkt {
  struct sg_tuple t;
  __u8 smac[6];
  __u8 l3;        /* SG_L3_* */
  __u8 family;    /* 4 or 6 */
  __u8 frag;      /* SG_FRAG_* */
  __u8 tcp_flags;
  __u8 icmp_kind; /* SG_ICMP_* */
  __u8 icmp_type;
  __u32 frag_id;
  /* ARP: sender. ND: target address, and link-layer option if has_lladdr. */
  __u8 arp_sha[6];
  __u8 has_lladdr;
  __u8 nd_type;        /* ICMPv6 type of an SG_ICMP_ND or SG_ICMP_ND_FORBIDDEN message */
  __u8 hop_limit;      /* IPv6 only */
  __u8 lladdr_differs; /* two SLLA/TLLA options of one ND message name different addresses */
  __u16 frag_offset8;  /* SG_FRAG_LATER: the fragment offset, in units of 8 bytes */
  /* Not zeroed per packet (the scratch is reused): everything from here is written before it is
   * read (arp_spa for ARP, nd_target for NS/NA, lladdr when has_lladdr, inner for ICMP errors). */
  __u8 arp_spa[16];
  __u8 nd_target[16];
  __u8 lladdr[6];
  __u16 pad;
  struct sg_tuple inner; /* the offending packet of an ICMP error */
  /* TCP (written by sg_parse_l4): the sequence and acknowledgment numbers, host order, and the
   * sequence space the segment takes (payload, plus 1 each for SYN and FIN). */
  __u32 tcp_seq;
  __u32 tcp_ack;
  __u32 tcp_seq_len;
};

static __always_inline void sg_v4_mapped(__u8 *dst, __be32 addr) {
  __builtin_memset(dst, 0, 10);
  dst[10] = 0xff;
  dst[11] = 0xff;
  __builtin_memcpy(dst + 12, &addr, 4);
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

static __always_inline int sg_addr_eq(const __u8 *a, const __u8 *b) {
  __u64 a0, a1, b0, b1;
  __builtin_memcpy(&a0, a, 8);
  __builtin_memcpy(&a1, a + 8, 8);
  __builtin_memcpy(&b0, b, 8);
  __builtin_memcpy(&b1, b + 8, 8);
  return a0 == b0 && a1 == b1;
}

/* A later fragment must begin after its first fragment's transport header, which is the only one
 * this datapath reads (RFC 1858): a TCP header is 20 bytes, so a first fragment (a multiple of 8
 * bytes) that holds it is at least 24, and a fragment at offset 8 or 16 overlaps it. A receiver
 * that keeps the later bytes of an overlap would reassemble flags the datapath never saw (an ACK
 * riding a closed flow, overwritten into a SYN). UDP and ICMP headers are 8 bytes: any later
 * offset is past them. offset8: the fragment offset in units of 8 bytes. */
static __always_inline int sg_later_fragment_ok(__u8 proto, __u16 offset8) {
  return proto != IPPROTO_TCP || offset8 >= 3;
}

static __always_inline int sg_is_v6_error(__u8 type) { return type >= 1 && type <= 4; }
static __always_inline int sg_is_v4_error(__u8 type) { return type == 3 || type == 11 || type == 12; }

/* ICMP messages exchanged as a request and its reply, with an identifier: echo and timestamp. */
static __always_inline int sg_icmp_is_request(__u8 proto, __u8 type) {
  return proto == IPPROTO_ICMP ? type == 8 || type == 13 : type == 128;
}
static __always_inline int sg_icmp_is_reply(__u8 proto, __u8 type) {
  return proto == IPPROTO_ICMP ? type == 0 || type == 14 : type == 129;
}

/* The first 8 bytes of a transport header: ports; for an ICMP echo or timestamp the identifier as
 * the source "port" of a request and the destination "port" of a reply, so a reply's reversed
 * tuple is its request's. Identifier 0 and every other ICMP type give both "ports" 0, a tuple that
 * reads the same either way round: the caller tells a reply from a request by its type, never by
 * which orientation matches (sg_ct_find's orient). */
static __always_inline int sg_parse_l4_ports(void *l4, void *data_end, __u8 proto, struct sg_tuple *t,
                                             __u8 *icmp_type) {
  if (l4 + 8 > data_end)
    return -SG_DROP_MALFORMED;
  if (proto == IPPROTO_TCP || proto == IPPROTO_UDP) {
    __builtin_memcpy(&t->sport, l4, 2);
    __builtin_memcpy(&t->dport, l4 + 2, 2);
  } else if (proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6) {
    __u8 type = *(__u8 *)l4;
    *icmp_type = type;
    if (sg_icmp_is_request(proto, type))
      __builtin_memcpy(&t->sport, l4 + 4, 2);
    else if (sg_icmp_is_reply(proto, type))
      __builtin_memcpy(&t->dport, l4 + 4, 2);
  }
  return 0;
}

/* ICMP error: the inner IP header and the first 8 bytes of its transport header, all within the
 * error's own length (len: bytes from p to the end of the outer IP packet). */
static __always_inline int sg_parse_inner(void *p, void *data_end, __u32 len, __u8 family, struct sg_tuple *in) {
  __u8 ignored = 0;
  in->sport = 0;
  in->dport = 0;
  if (family == 4) {
    struct iphdr *ip = p;
    if ((void *)(ip + 1) > data_end)
      return -SG_DROP_MALFORMED;
    if (ip->version != 4 || ip->ihl < 5 || len < ip->ihl * 4 + 8)
      return -SG_DROP_MALFORMED;
    sg_v4_mapped(in->saddr, ip->saddr);
    sg_v4_mapped(in->daddr, ip->daddr);
    in->proto = ip->protocol;
    return sg_parse_l4_ports(p + ip->ihl * 4, data_end, in->proto, in, &ignored);
  }
  struct ipv6hdr *ip6 = p;
  if ((void *)(ip6 + 1) > data_end || len < sizeof(*ip6) + 8)
    return -SG_DROP_MALFORMED;
  __builtin_memcpy(in->saddr, &ip6->saddr, 16);
  __builtin_memcpy(in->daddr, &ip6->daddr, 16);
  in->proto = ip6->nexthdr;
  return sg_parse_l4_ports(ip6 + 1, data_end, in->proto, in, &ignored);
}

/* Transport header of a first (or only) fragment. */
/* l4_len: bytes from the transport header to the end of the IP packet (from the IP header, so
 * it may run past data_end when a TC program sees only the linear part). Every header read must
 * lie within l4_len, not only before data_end: bytes after the IP packet (Ethernet padding, which
 * a VM writes as it likes) are no part of it, and a first fragment that carries only part of its
 * transport header (8 bytes of TCP: ports and sequence number) leaves the rest (the flags) to a
 * later fragment the receiver reassembles, which this datapath never reads (RFC 1858: such first
 * fragments are dropped). Otherwise a SYN hid its flag and rode a closed flow's entry. */
static __always_inline int sg_parse_l4(void *l4, void *data_end, __u32 l4_len, struct sg_pkt *pkt) {
  __u8 proto = pkt->t.proto;
  if (proto == IPPROTO_TCP) {
    struct tcphdr *th = l4;
    if ((void *)(th + 1) > data_end || l4_len < sizeof(*th))
      return -SG_DROP_MALFORMED;
    if (th->doff < 5)
      return -SG_DROP_MALFORMED;
    pkt->t.sport = th->source;
    pkt->t.dport = th->dest;
    pkt->tcp_flags = ((__u8 *)th)[13];
    pkt->tcp_seq = bpf_ntohl(th->seq);
    pkt->tcp_ack = bpf_ntohl(th->ack_seq);
    /* a data offset past the packet's end is the receiver's to refuse; it carries no data here */
    __u32 payload = l4_len > th->doff * 4u ? l4_len - th->doff * 4u : 0;
    pkt->tcp_seq_len = payload + !!th->syn + !!th->fin;
    return 0;
  }
  if (proto == IPPROTO_UDP) {
    struct udphdr *uh = l4;
    if ((void *)(uh + 1) > data_end || l4_len < sizeof(*uh))
      return -SG_DROP_MALFORMED;
    pkt->t.sport = uh->source;
    pkt->t.dport = uh->dest;
    return 0;
  }
  if ((proto == IPPROTO_ICMP && pkt->family == 6) || (proto == IPPROTO_ICMPV6 && pkt->family == 4))
    return -SG_DROP_UNKNOWN_L4;
  if (proto != IPPROTO_ICMP && proto != IPPROTO_ICMPV6)
    return 0; /* another protocol: no ports; policy decides with proto 0 */

  if (l4_len < 8)
    return -SG_DROP_MALFORMED;
  int err = sg_parse_l4_ports(l4, data_end, proto, &pkt->t, &pkt->icmp_type);
  if (err)
    return err;
  __u8 type = pkt->icmp_type;
  if ((proto == IPPROTO_ICMP && sg_is_v4_error(type)) || (proto == IPPROTO_ICMPV6 && sg_is_v6_error(type))) {
    pkt->icmp_kind = SG_ICMP_ERROR;
    return sg_parse_inner(l4 + 8, data_end, l4_len - 8, pkt->family, &pkt->inner);
  }
  if (proto != IPPROTO_ICMPV6)
    return 0;
  pkt->nd_type = type;
  if (type == 134 || type == 137) {
    pkt->icmp_kind = SG_ICMP_ND_FORBIDDEN;
    return 0;
  }
  if (type == 130 || type == 131 || type == 132 || type == 143) {
    pkt->icmp_kind = SG_ICMP_ND; /* MLD: the VM joins its solicited-node groups */
    return 0;
  }
  if (type < 133 || type > 136)
    return 0;
  pkt->icmp_kind = SG_ICMP_ND;
  __u32 off = 8; /* RS: options follow 4 reserved bytes */
  if (type == 135 || type == 136) {
    if (l4 + 24 > data_end)
      return -SG_DROP_MALFORMED;
    __builtin_memcpy(pkt->nd_target, l4 + 8, 16);
    off = 24;
  }
  /* Every option up to the end of the packet: an SLLA/TLLA hidden behind others is still seen,
   * and bytes that do not form whole options make the message malformed. */
  for (int i = 0; i < SG_ND_MAX_OPTS; i++) { /* a bounded loop: olen varies, so no unrolling */
    if (off >= l4_len)
      return 0;
    if (off > SG_ND_MAX_LEN)
      return -SG_DROP_MALFORMED;
    /* The mask (in asm, which the compiler cannot drop) is what the verifier sees bound the
     * offset: clang otherwise re-reads off from before the check. */
    __u32 masked = off;
    asm volatile("%0 &= 0x1fff" : "+r"(masked));
    void *opt = l4 + masked;
    if (opt + 8 > data_end)
      return -SG_DROP_MALFORMED; /* every option is a multiple of 8 bytes (or beyond the linear part) */
    __u8 otype = *(__u8 *)opt;
    __u8 olen = *(__u8 *)(opt + 1);
    if (olen == 0 || off + olen * 8 > l4_len)
      return -SG_DROP_MALFORMED;
    if (otype == 1 || otype == 2) {
      if (pkt->has_lladdr && !sg_mac_eq(pkt->lladdr, opt + 2))
        pkt->lladdr_differs = 1;
      __builtin_memcpy(pkt->lladdr, opt + 2, 6);
      pkt->has_lladdr = 1;
    }
    off += olen * 8;
  }
  return off >= l4_len ? 0 : -SG_DROP_MALFORMED; /* more than SG_ND_MAX_OPTS options */
}

/* l3_len: bytes of the frame after the Ethernet header (the whole packet, not only the linear
 * part a TC program can read): an IP header that claims more than the frame holds is truncated. */
static __always_inline int sg_parse_ipv4(void *p, void *data_end, __u32 l3_len, struct sg_pkt *pkt) {
  struct iphdr *ip = p;
  if ((void *)(ip + 1) > data_end)
    return -SG_DROP_MALFORMED;
  __u16 tot_len = bpf_ntohs(ip->tot_len);
  if (ip->version != 4 || ip->ihl < 5 || tot_len < 20 || tot_len > l3_len)
    return -SG_DROP_MALFORMED;
  /* No IPv4 option is allowed: none is needed by a VM's ordinary traffic, and source routing,
   * record route and router alert are evasion or attack surface. */
  if (ip->ihl != 5)
    return -SG_DROP_IP_OPTIONS;
  pkt->family = 4;
  pkt->l3 = SG_L3_IP;
  sg_v4_mapped(pkt->t.saddr, ip->saddr);
  sg_v4_mapped(pkt->t.daddr, ip->daddr);
  pkt->t.proto = ip->protocol;
  __u16 frag = bpf_ntohs(ip->frag_off);
  pkt->frag_id = bpf_ntohs(ip->id);
  if (frag & 0x1fff) {
    pkt->frag = SG_FRAG_LATER;
    pkt->frag_offset8 = frag & 0x1fff;
    return 0;
  }
  if (frag & 0x2000)
    pkt->frag = SG_FRAG_FIRST;
  return sg_parse_l4(ip + 1, data_end, tot_len - 20, pkt);
}

/* IPv4-mapped IPv6 (::ffff:a.b.c.d, RFC 4291 2.5.5.2) never belongs on the wire, and it is how
 * this datapath stores IPv4 addresses: an IPv6 packet carrying one would be matched against IPv4
 * rules (found by tests/adversarial/test_differential.py). Such packets are malformed. */
static __always_inline int sg_is_v4_mapped(const struct in6_addr *a) {
  return a->s6_addr32[0] == 0 && a->s6_addr32[1] == 0 && a->s6_addr32[2] == bpf_htonl(0xffff);
}

static __always_inline int sg_parse_ipv6(void *p, void *data_end, __u32 l3_len, struct sg_pkt *pkt) {
  struct ipv6hdr *ip6 = p;
  if ((void *)(ip6 + 1) > data_end)
    return -SG_DROP_MALFORMED;
  /* payload_len 0 is a jumbogram / BIG TCP super-packet: its length is the skb's. */
  if (ip6->version != 6 || (__u32)bpf_ntohs(ip6->payload_len) + 40 > l3_len)
    return -SG_DROP_MALFORMED;
  if (sg_is_v4_mapped(&ip6->saddr) || sg_is_v4_mapped(&ip6->daddr))
    return -SG_DROP_MALFORMED;
  pkt->family = 6;
  pkt->l3 = SG_L3_IP;
  pkt->hop_limit = ip6->hop_limit;
  /* Where the packet ends: payload_len 0 (jumbogram / BIG TCP) ends with the frame. */
  __u32 ip_len = ip6->payload_len ? (__u32)bpf_ntohs(ip6->payload_len) + 40 : l3_len;
  __builtin_memcpy(pkt->t.saddr, &ip6->saddr, 16);
  __builtin_memcpy(pkt->t.daddr, &ip6->daddr, 16);
  __u8 next = ip6->nexthdr;
  void *cur = ip6 + 1;
  for (int i = 0; i <= SG_IPV6_MAX_EXT_HDRS; i++) { /* bounded loop (the verifier checks the bound) */
    if (next == IPPROTO_HOPOPTS || next == IPPROTO_DSTOPTS) {
      if (i == SG_IPV6_MAX_EXT_HDRS)
        return -SG_DROP_IPV6_EXTHDR_CHAIN;
      if (cur + 2 > data_end)
        return -SG_DROP_MALFORMED;
      __u8 hlen = *(__u8 *)(cur + 1);
      next = *(__u8 *)cur;
      cur += (hlen + 1) * 8;
      continue;
    }
    if (next == IPPROTO_FRAGMENT) {
      if (i == SG_IPV6_MAX_EXT_HDRS)
        return -SG_DROP_IPV6_EXTHDR_CHAIN;
      if (cur + 8 > data_end)
        return -SG_DROP_MALFORMED;
      __u16 off;
      __u32 id;
      __builtin_memcpy(&off, cur + 2, 2);
      __builtin_memcpy(&id, cur + 4, 4);
      off = bpf_ntohs(off);
      next = *(__u8 *)cur;
      cur += 8;
      pkt->frag_id = bpf_ntohl(id);
      if (off & 0xfff8) {
        pkt->frag = SG_FRAG_LATER;
        pkt->t.proto = next;
        pkt->frag_offset8 = off >> 3;
        return 0;
      }
      if (off & 1)
        pkt->frag = SG_FRAG_FIRST;
      continue;
    }
    break;
  }
  pkt->t.proto = next;
  switch (next) {
  case IPPROTO_TCP:
  case IPPROTO_UDP:
  case IPPROTO_ICMPV6: {
    __u32 hdrs = cur - (void *)ip6;
    if (hdrs > ip_len)
      return -SG_DROP_MALFORMED; /* extension headers claim more than the packet holds */
    return sg_parse_l4(cur, data_end, ip_len - hdrs, pkt);
  }
  case IPPROTO_HOPOPTS:
  case IPPROTO_DSTOPTS:
  case IPPROTO_FRAGMENT:
    return -SG_DROP_IPV6_EXTHDR_CHAIN;
  default:
    /* Routing headers (source routing, SRv6), AH, ESP, mobility, HIP, shim6, experimental
     * and anything unknown: none is needed by a VM and each can hide where a packet goes. */
    return -SG_DROP_IPV6_EXTHDR;
  }
}

static __always_inline int sg_parse_arp(void *p, void *data_end, struct sg_pkt *pkt) {
  /* Ethernet/IPv4 ARP only: 8-byte header, sha(6) spa(4) tha(6) tpa(4). */
  if (p + 28 > data_end)
    return -SG_DROP_MALFORMED;
  __u8 *a = p;
  if (a[0] != 0 || a[1] != 1 || a[2] != 0x08 || a[3] != 0x00 || a[4] != 6 || a[5] != 4)
    return -SG_DROP_MALFORMED;
  pkt->l3 = SG_L3_ARP;
  __builtin_memcpy(pkt->arp_sha, a + 8, 6);
  __be32 spa;
  __builtin_memcpy(&spa, a + 14, 4);
  sg_v4_mapped(pkt->arp_spa, spa);
  return 0;
}

/* Whole frame of len bytes (data..data_end may be only its linear part). 0 on success (pkt filled), -SG_DROP_* otherwise. */
static __always_inline int sg_parse(void *data, void *data_end, __u32 len, struct sg_pkt *pkt) {
  struct ethhdr *eth = data;
  if ((void *)(eth + 1) > data_end)
    return -SG_DROP_MALFORMED;
  __builtin_memcpy(pkt->smac, eth->h_source, 6);
  __u16 proto = bpf_ntohs(eth->h_proto);
  switch (proto) {
  case ETH_P_IP:
    return sg_parse_ipv4(eth + 1, data_end, len - sizeof(*eth), pkt);
  case ETH_P_IPV6:
    return sg_parse_ipv6(eth + 1, data_end, len - sizeof(*eth), pkt);
  case ETH_P_ARP:
    return sg_parse_arp(eth + 1, data_end, pkt);
  case ETH_P_8021Q:
  case ETH_P_8021AD:
  case 0x9100: /* old QinQ outer tag */
    return -SG_DROP_VLAN;
  default:
    return -SG_DROP_UNKNOWN_ETHERTYPE;
  }
}

#endif
