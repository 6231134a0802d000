/* SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0) */
/* Header parsing with explicit bounds checks. Every parser returns 0 on success and
 * -1 when the packet is too short or invalid, so callers have one failure path. */
#ifndef SHOAL_PARSE_H
#define SHOAL_PARSE_H

#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/in.h>
#include <bpf/bpf_endian.h>

/* The 5-tuple the policy needs, everything in network order. */
struct shoal_flow {
	__u32 saddr_be;
	__u32 daddr_be;
	__u16 sport_be; /* TCP/UDP source port; ICMP echo id (request and reply) */
	__u16 dport_be; /* TCP/UDP destination port; 0 for ICMP */
	__u8 proto;
	__u8 icmp_reply; /* ICMP echo reply: the id belongs to the receiver */
};

struct shoal_icmp {
	__u8 type;
	__u8 code;
	__u16 csum;
	__u16 id;
	__u16 seq;
};

#define ICMP_ECHOREPLY_T 0
#define ICMP_ECHO_T 8

/* Parse an IPv4 header at `ip` and its L4 ports into `flow`. Non-first fragments
 * carry no ports and are rejected with -2 (they cannot be matched against rules). */
static __always_inline int shoal_parse_ipv4(struct iphdr *ip, void *data_end, struct shoal_flow *flow)
{
	if ((void *)(ip + 1) > data_end)
		return -1;
	if (ip->version != 4 || ip->ihl < 5)
		return -1;
	if (ip->frag_off & bpf_htons(0x3fff)) /* MF set or offset != 0 */
		return -2;

	flow->saddr_be = ip->saddr;
	flow->daddr_be = ip->daddr;
	flow->proto = ip->protocol;
	flow->sport_be = 0;
	flow->dport_be = 0;
	flow->icmp_reply = 0;

	void *l4 = (void *)ip + ((__u32)ip->ihl & 0xf) * 4;

	switch (ip->protocol) {
	case IPPROTO_TCP:
	case IPPROTO_UDP: {
		__u16 *ports = l4;

		if ((void *)(ports + 2) > data_end)
			return -1;
		flow->sport_be = ports[0];
		flow->dport_be = ports[1];
		break;
	}
	case IPPROTO_ICMP: {
		struct shoal_icmp *icmp = l4;

		if ((void *)(icmp + 1) > data_end)
			return -1;
		if (icmp->type == ICMP_ECHO_T || icmp->type == ICMP_ECHOREPLY_T) {
			flow->sport_be = icmp->id;
			flow->icmp_reply = icmp->type == ICMP_ECHOREPLY_T;
		}
		break;
	}
	default:
		break;
	}
	return 0;
}

static __always_inline int shoal_mac_eq(const __u8 *a, const __u8 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] && a[4] == b[4] &&
	       a[5] == b[5];
}

static __always_inline int shoal_mac_zero(const __u8 *a)
{
	return (a[0] | a[1] | a[2] | a[3] | a[4] | a[5]) == 0;
}

#endif /* SHOAL_PARSE_H */
