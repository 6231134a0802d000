/* SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0) */
/* VXLAN (RFC 7348) headers, outer IPv4 checksum and the outer UDP source port. */
#ifndef SHOAL_VXLAN_H
#define SHOAL_VXLAN_H

#include <linux/ip.h>
#include <linux/udp.h>
#include <linux/if_ether.h>
#include <bpf/bpf_endian.h>
#include "parse.h"

struct shoal_vxlanhdr {
	__u32 flags_be; /* 0x08000000: VNI present (I flag) */
	__u32 vni_be;   /* VNI << 8 */
};

#define SHOAL_VXLAN_FLAG_I 0x08000000

/* Everything inserted in front of the inner frame's IP header, after the outer
 * Ethernet header: outer IPv4, UDP, VXLAN, then a copy of the inner Ethernet header. */
struct shoal_encap_hdr {
	struct iphdr ip;
	struct udphdr udp;
	struct shoal_vxlanhdr vx;
	struct ethhdr inner_eth;
} __attribute__((packed));

/* Inserted room = outer IPv4 + UDP + VXLAN + inner Ethernet = the whole overhead. */
_Static_assert(sizeof(struct shoal_encap_hdr) == SHOAL_VXLAN_OVERHEAD, "VXLAN overhead");

/* RFC 1071 checksum of a 20-byte IPv4 header (checksum field zero on input). */
static __always_inline __u16 shoal_ipv4_csum(const struct iphdr *ip)
{
	const __u16 *p = (const __u16 *)ip;
	__u32 sum = 0;

#pragma unroll
	for (int i = 0; i < 10; i++)
		sum += p[i];
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

/* Outer UDP source port from the inner flow (RFC 7348 section 5: 49152-65535) so that
 * the underlay's ECMP and the receiver's RSS spread flows. Deterministic (no per-boot
 * seed) so tests can predict it; dataplane/src/abi.rs has the same function. */
static __always_inline __u16 shoal_flow_sport(const struct shoal_flow *f)
{
	__u32 h = f->saddr_be ^ f->daddr_be ^ (((__u32)f->sport_be << 16) | f->dport_be) ^ f->proto;

	h ^= h >> 16;
	h *= 0x7feb352d;
	h ^= h >> 15;
	h *= 0x846ca68b;
	h ^= h >> 16;
	return bpf_htons(49152 + (h & 0x3fff));
}

#endif /* SHOAL_VXLAN_H */
