/* SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0) */
/* Stateful security groups: conntrack first, then a constant number of LPM lookups.
 *
 * A connection is tracked per port, keyed as seen from that port (local address/port,
 * remote address/port), so the packet that opens it and every reply map to the same
 * key. Only a packet allowed by the rules of its direction creates an entry; any packet
 * of a tracked connection passes in both directions. This mirrors Neutron's per-port
 * conntrack zones with "ct state established,related accept" ahead of the rules. */
#ifndef SHOAL_POLICY_H
#define SHOAL_POLICY_H

#include "maps.h"
#include "parse.h"

/* At most three lookups whatever the number of rules: (proto, dport), (proto, any
 * port), (any proto). Each is an LPM lookup on the remote address, whose cost is
 * bounded by the key length, not by the number of entries. */
static __always_inline int shoal_sg_match(__u32 port_id, __u8 dir, __u8 proto, __u16 dport_be,
					  __u32 remote_be)
{
	struct shoal_sg_key k = {
		.prefixlen = SHOAL_SG_FIXED_BITS + 32,
		.port_id = port_id,
		.direction = dir,
		.proto = proto,
		.dport_be = dport_be,
		.remote_be = remote_be,
	};

	if (bpf_map_lookup_elem(&shoal_sg, &k))
		return 1;
	if (dport_be != SHOAL_SG_PORT_ANY) {
		k.dport_be = SHOAL_SG_PORT_ANY;
		if (bpf_map_lookup_elem(&shoal_sg, &k))
			return 1;
	}
	if (proto != SHOAL_SG_PROTO_ANY) {
		k.proto = SHOAL_SG_PROTO_ANY;
		k.dport_be = SHOAL_SG_PORT_ANY;
		if (bpf_map_lookup_elem(&shoal_sg, &k))
			return 1;
	}
	return 0;
}

/* Returns 1 when the packet may pass port `port_id` in direction `dir`. */
static __always_inline int shoal_policy(__u32 port_id, __u8 dir, const struct shoal_flow *f)
{
	struct shoal_ct_key k = {};
	__u16 rule_port;

	k.port_id = port_id;
	k.proto = f->proto;
	if (dir == SHOAL_DIR_EGRESS) {
		k.local_be = f->saddr_be;
		k.remote_be = f->daddr_be;
	} else {
		k.local_be = f->daddr_be;
		k.remote_be = f->saddr_be;
	}
	if (f->proto == IPPROTO_ICMP) {
		/* Echo request and reply carry the same id: key on it alone. */
		k.local_port_be = f->sport_be;
		rule_port = SHOAL_SG_PORT_ANY;
	} else if (dir == SHOAL_DIR_EGRESS) {
		k.local_port_be = f->sport_be;
		k.remote_port_be = f->dport_be;
		rule_port = f->dport_be;
	} else {
		k.local_port_be = f->dport_be;
		k.remote_port_be = f->sport_be;
		rule_port = f->dport_be;
	}

	if (bpf_map_lookup_elem(&shoal_ct, &k)) {
		shoal_count(SHOAL_CNT_CT_HIT);
		return 1;
	}
	if (!shoal_sg_match(port_id, dir, f->proto, rule_port, k.remote_be))
		return 0;

	struct shoal_ct_val v = {
		.created_ns = bpf_ktime_get_ns(),
		.origin = dir,
	};
	bpf_map_update_elem(&shoal_ct, &k, &v, BPF_NOEXIST);
	return 1;
}

#endif /* SHOAL_POLICY_H */
