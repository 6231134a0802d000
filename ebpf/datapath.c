// SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0)
/*
 * Shoal datapath: two entry points sharing one set of maps.
 *
 *   shoal_underlay  XDP on the node's underlay device: VXLAN decap for local ports,
 *                   inbound security groups, redirect to the VM's device.
 *   shoal_port      tc (TCX) ingress on each VM-facing device, i.e. the VM's egress:
 *                   anti-spoofing, ARP responder, outbound security groups, same-host
 *                   delivery or VXLAN encapsulation towards the remote VTEP, and
 *                   distributed routing between the subnets of a router.
 *
 * Each entry point only delegates to a function returning an action, so every parse
 * failure leaves through one counted exit. See docs/datapath.md.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/in.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "shoal_abi.h"
#include "maps.h"
#include "parse.h"
#include "policy.h"
#include "vxlan.h"

#ifndef AF_INET
#define AF_INET 2
#endif

#define ARPOP_REQUEST_BE bpf_htons(1)
#define ARPOP_REPLY_BE bpf_htons(2)

struct shoal_arp {
	__u16 htype;
	__u16 ptype;
	__u8 hlen;
	__u8 plen;
	__u16 op;
	__u8 sha[6];
	__u32 sip;
	__u8 tha[6];
	__u32 tip;
} __attribute__((packed));

static __always_inline int tc_drop(__u32 reason)
{
	shoal_count(reason);
	return TC_ACT_SHOT;
}

static __always_inline int xdp_drop(__u32 reason)
{
	shoal_count(reason);
	return XDP_DROP;
}

/* ARP request from a VM: answer from the endpoint table, never flood. */
static __always_inline int shoal_arp_reply(struct __sk_buff *skb, const struct shoal_port *port,
					   __u32 ifindex)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct shoal_arp *arp = (void *)(eth + 1);

	if ((void *)(arp + 1) > data_end)
		return tc_drop(SHOAL_CNT_DROP_MALFORMED);
	if (arp->htype != bpf_htons(1) || arp->ptype != bpf_htons(ETH_P_IP) || arp->hlen != 6 ||
	    arp->plen != 4)
		return tc_drop(SHOAL_CNT_DROP_MALFORMED);
	if (arp->op != ARPOP_REQUEST_BE)
		return tc_drop(SHOAL_CNT_DROP_ARP);
	if (!shoal_mac_eq(arp->sha, port->mac))
		return tc_drop(SHOAL_CNT_DROP_SPOOF_MAC);

	struct shoal_ep_key key = { .vni = port->vni, .ip_be = arp->sip };
	struct shoal_endpoint *src = bpf_map_lookup_elem(&shoal_endpoints, &key);

	if (!src) /* includes DAD probes from 0.0.0.0: nothing to defend here */
		return tc_drop(SHOAL_CNT_DROP_ARP);
	if (src->ifindex != ifindex)
		return tc_drop(SHOAL_CNT_DROP_SPOOF_IP);

	key.ip_be = arp->tip;
	const __u8 *target_mac;

	if (arp->tip == bpf_htonl(SHOAL_METADATA_IP)) {
		/* The node's own services answer on the VM's device itself. */
		if (shoal_mac_zero(port->host_mac))
			return tc_drop(SHOAL_CNT_DROP_ARP);
		target_mac = port->host_mac;
	} else {
		struct shoal_endpoint *target = bpf_map_lookup_elem(&shoal_endpoints, &key);

		if (!target || target->ifindex == ifindex)
			return tc_drop(SHOAL_CNT_DROP_ARP);
		target_mac = target->mac;
	}

	__u32 requester_ip = arp->sip;
	__u8 mac[ETH_ALEN];

	__builtin_memcpy(mac, target_mac, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, mac, ETH_ALEN);
	arp->op = ARPOP_REPLY_BE;
	__builtin_memcpy(arp->tha, arp->sha, ETH_ALEN);
	arp->tip = requester_ip;
	__builtin_memcpy(arp->sha, mac, ETH_ALEN);
	arp->sip = key.ip_be;

	shoal_count(SHOAL_CNT_ARP_REPLY);
	return bpf_redirect(ifindex, 0); /* back out of the same device, to the VM */
}

/* Wrap the frame in VXLAN towards `dst`'s VTEP and send it out of the underlay. */
static __always_inline int shoal_encap(struct __sk_buff *skb, __u32 vni,
				       const struct shoal_endpoint *dst, const struct shoal_flow *f)
{
	struct shoal_config *cfg = shoal_get_config();

	if (!cfg || !cfg->underlay_ifindex)
		return tc_drop(SHOAL_CNT_DROP_ERROR);

	__u32 underlay = cfg->underlay_ifindex;
	__u32 vtep = dst->vtep_be;
	struct ethhdr outer_eth = { .h_proto = bpf_htons(ETH_P_IP) };
	struct shoal_encap_hdr h = {};
	__u32 inner_len = skb->len;

	__builtin_memcpy(outer_eth.h_dest, dst->vtep_mac, ETH_ALEN);
	__builtin_memcpy(outer_eth.h_source, cfg->underlay_mac, ETH_ALEN);
	if (bpf_skb_load_bytes(skb, 0, &h.inner_eth, sizeof(h.inner_eth)))
		return tc_drop(SHOAL_CNT_DROP_MALFORMED);

	struct iphdr oip = {
		.version = 4,
		.ihl = 5,
		.ttl = 64,
		.protocol = IPPROTO_UDP,
		.tot_len = bpf_htons(inner_len + sizeof(struct iphdr) + sizeof(struct udphdr) +
				     sizeof(struct shoal_vxlanhdr)),
		.saddr = cfg->local_vtep_be,
		.daddr = vtep,
	};

	oip.check = shoal_ipv4_csum(&oip); /* computed here: no offload for the outer header */
	h.ip = oip;
	h.udp.source = shoal_flow_sport(f);
	h.udp.dest = bpf_htons(SHOAL_VXLAN_PORT);
	h.udp.len = bpf_htons(inner_len + sizeof(struct udphdr) + sizeof(struct shoal_vxlanhdr));
	h.udp.check = 0; /* allowed for VXLAN over IPv4 (RFC 7348 section 5) */
	h.vx.flags_be = bpf_htonl(SHOAL_VXLAN_FLAG_I);
	h.vx.vni_be = bpf_htonl(vni << 8);

	/* Room after the MAC header: the original Ethernet header stays in front and
	 * becomes the outer one; the flags keep GSO and checksum offsets right. */
	if (bpf_skb_adjust_room(skb, SHOAL_VXLAN_OVERHEAD, BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP |
					BPF_F_ADJ_ROOM_ENCAP_L2_ETH |
					BPF_F_ADJ_ROOM_ENCAP_L2(sizeof(struct ethhdr))))
		return tc_drop(SHOAL_CNT_DROP_ERROR);
	if (bpf_skb_store_bytes(skb, 0, &outer_eth, sizeof(outer_eth), 0) ||
	    bpf_skb_store_bytes(skb, sizeof(struct ethhdr), &h, sizeof(h), 0))
		return tc_drop(SHOAL_CNT_DROP_ERROR);

	shoal_count(SHOAL_CNT_PASS_ENCAP);
	if (!shoal_mac_zero(outer_eth.h_dest))
		return bpf_redirect(underlay, 0);

	/* VTEP MAC unknown to userspace: the kernel resolves the neighbour (and ARPs). */
	struct bpf_redir_neigh nh = { .nh_family = AF_INET, .ipv4_nh = vtep };

	return bpf_redirect_neigh(underlay, &nh, sizeof(nh), 0);
}

/* An ICMP echo request to one of a router's own addresses is answered in place, as the
 * router would: type 8 -> 0 (the checksum grows by 0x0800, RFC 1624), addresses and MACs
 * swapped (neither changes a checksum), back out of the VM's device. The sender's egress
 * rules decide; the reply needs no ingress rule, as any reply to allowed traffic. Anything
 * else to those addresses is dropped. */
static __always_inline int shoal_router_echo(struct __sk_buff *skb, __u32 port_id,
					     const struct shoal_flow *f, __u32 ifindex)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);

	if ((void *)(ip + 1) > data_end)
		return tc_drop(SHOAL_CNT_DROP_MALFORMED);

	struct shoal_icmp *icmp = (void *)ip + ((__u32)ip->ihl & 0xf) * 4;

	if ((void *)(icmp + 1) > data_end)
		return tc_drop(SHOAL_CNT_DROP_MALFORMED);
	if (f->proto != IPPROTO_ICMP || icmp->type != ICMP_ECHO_T || icmp->code != 0)
		return tc_drop(SHOAL_CNT_DROP_NO_ROUTE);
	if (!shoal_policy(port_id, SHOAL_DIR_EGRESS, f))
		return tc_drop(SHOAL_CNT_DROP_SG_EGRESS);

	__u32 sum = (__u32)icmp->csum + bpf_htons(0x0800);
	__u32 addr = ip->saddr;
	__u8 mac[ETH_ALEN];

	icmp->csum = (__u16)(sum + (sum >> 16));
	icmp->type = ICMP_ECHOREPLY_T;
	ip->saddr = ip->daddr;
	ip->daddr = addr;
	__builtin_memcpy(mac, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, mac, ETH_ALEN);
	shoal_count(SHOAL_CNT_ROUTER_ECHO);
	return bpf_redirect(ifindex, 0);
}

/* A frame that matched no port of the sender's network: if it is addressed to a router
 * interface's MAC, route it here, on the sender's node (distributed routing): look the
 * destination up in the router's connected networks, check the sender's egress and (same
 * node) the receiver's ingress groups, decrement the TTL, rewrite the MACs (source = the
 * router's MAC on the destination network, destination = the port's) and deliver the frame
 * as L2 on the destination network: into the local device, or VXLAN with that network's
 * VNI to the node hosting the port, whose XDP program checks ingress as for any frame.
 * A TTL that runs out drops the packet without an ICMP time-exceeded. */
static __always_inline int shoal_route(struct __sk_buff *skb, __u32 vni, __u32 port_id,
				       const struct shoal_flow *f, __u32 ifindex)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);

	if ((void *)(ip + 1) > data_end)
		return tc_drop(SHOAL_CNT_DROP_MALFORMED);

	struct shoal_rif_key rk = { .vni = vni };

	__builtin_memcpy(rk.mac, eth->h_dest, ETH_ALEN);
	struct shoal_rif *rif = bpf_map_lookup_elem(&shoal_rifs, &rk);

	if (!rif)
		return tc_drop(SHOAL_CNT_DROP_NO_ROUTE);

	struct shoal_route_key qk = {
		.prefixlen = SHOAL_ROUTE_FIXED_BITS + 32,
		.router_id = rif->router_id,
		.dst_be = f->daddr_be,
	};
	struct shoal_route *route = bpf_map_lookup_elem(&shoal_routes, &qk);

	if (!route)
		return tc_drop(SHOAL_CNT_DROP_NO_ROUTE);
	if (route->leg_ifindex) {
		/* No connected or extra route: the router's default, towards the external
		 * network through its NAT namespace, whose kernel routes (TTL included) and
		 * translates. The sender's egress rules decide and open the connection that
		 * lets the replies back in. */
		__u32 leg = route->leg_ifindex;

		if (!shoal_policy(port_id, SHOAL_DIR_EGRESS, f))
			return tc_drop(SHOAL_CNT_DROP_SG_EGRESS);
		__builtin_memcpy(eth->h_dest, route->mac, ETH_ALEN);
		shoal_count(SHOAL_CNT_PASS_TO_NAT);
		return bpf_redirect(leg, 0);
	}

	__u32 out_vni = route->vni;
	/* Connected: the destination itself; extra route: its next hop, which gets the frame
	 * with the destination address unchanged (a VM acting as a router). */
	struct shoal_ep_key key = {
		.vni = out_vni,
		.ip_be = route->nexthop_be ? route->nexthop_be : f->daddr_be,
	};
	struct shoal_endpoint *dst = bpf_map_lookup_elem(&shoal_endpoints, &key);

	if (!dst)
		return tc_drop(SHOAL_CNT_DROP_NO_ROUTE);
	if (!dst->ifindex && !dst->vtep_be) /* the router's address on that subnet */
		return shoal_router_echo(skb, port_id, f, ifindex);
	if (ip->ttl <= 1)
		return tc_drop(SHOAL_CNT_DROP_TTL);
	if (!shoal_policy(port_id, SHOAL_DIR_EGRESS, f))
		return tc_drop(SHOAL_CNT_DROP_SG_EGRESS);
	if (dst->ifindex && !shoal_policy(dst->port_id, SHOAL_DIR_INGRESS, f))
		return tc_drop(SHOAL_CNT_DROP_SG_INGRESS);

	/* TTL - 1 with the header checksum updated incrementally (RFC 1624), as the
	 * kernel's ip_decrease_ttl does. */
	__u32 check = ip->check;

	check += bpf_htons(0x0100);
	ip->check = (__u16)(check + (check >= 0xFFFF));
	ip->ttl--;
	__builtin_memcpy(eth->h_source, route->mac, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, dst->mac, ETH_ALEN);
	shoal_count(SHOAL_CNT_PASS_ROUTED);
	if (dst->ifindex)
		return bpf_redirect(dst->ifindex, 0);
	return shoal_encap(skb, out_vni, dst, f);
}

/* A frame from a router's NAT namespace (its leg's end in the node's namespace): what the
 * namespace's kernel routed to one of the router's subnets, translated (a floating IP's
 * inbound traffic, replies to SNAT). Only the router's own routes are looked up, so the leg
 * reaches the networks of its router and nothing else; it has no address of its own to
 * spoof and no egress rules. The destination port's ingress rules decide here on a local
 * port, in the XDP program of its node on a remote one; the frame is delivered as a routed
 * one (source MAC = the router's on that network) without touching the TTL, which the
 * namespace already decremented. */
static __always_inline int shoal_from_leg(struct __sk_buff *skb, __u32 router_id)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return tc_drop(SHOAL_CNT_DROP_MALFORMED);
	if (eth->h_proto == bpf_htons(ETH_P_ARP)) /* its neighbours are permanent entries */
		return tc_drop(SHOAL_CNT_DROP_ARP);
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return tc_drop(SHOAL_CNT_DROP_UNSUPPORTED);
	if (eth->h_dest[0] & 1)
		return tc_drop(SHOAL_CNT_DROP_BROADCAST);

	struct shoal_flow f;
	int r = shoal_parse_ipv4((void *)(eth + 1), data_end, &f);

	if (r == -2)
		return tc_drop(SHOAL_CNT_DROP_UNSUPPORTED);
	if (r < 0)
		return tc_drop(SHOAL_CNT_DROP_MALFORMED);

	struct shoal_route_key qk = {
		.prefixlen = SHOAL_ROUTE_FIXED_BITS + 32,
		.router_id = router_id,
		.dst_be = f.daddr_be,
	};
	struct shoal_route *route = bpf_map_lookup_elem(&shoal_routes, &qk);

	if (!route || route->leg_ifindex) /* nothing goes back into the namespace */
		return tc_drop(SHOAL_CNT_DROP_NO_ROUTE);

	__u32 out_vni = route->vni;
	struct shoal_ep_key key = {
		.vni = out_vni,
		.ip_be = route->nexthop_be ? route->nexthop_be : f.daddr_be,
	};
	struct shoal_endpoint *dst = bpf_map_lookup_elem(&shoal_endpoints, &key);

	if (!dst || (!dst->ifindex && !dst->vtep_be))
		return tc_drop(SHOAL_CNT_DROP_NO_ROUTE);
	if (dst->ifindex && !shoal_policy(dst->port_id, SHOAL_DIR_INGRESS, &f))
		return tc_drop(SHOAL_CNT_DROP_SG_INGRESS);

	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	eth = data;
	if ((void *)(eth + 1) > data_end)
		return tc_drop(SHOAL_CNT_DROP_MALFORMED);
	__builtin_memcpy(eth->h_source, route->mac, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, dst->mac, ETH_ALEN);
	shoal_count(SHOAL_CNT_PASS_FROM_NAT);
	if (dst->ifindex)
		return bpf_redirect(dst->ifindex, 0);
	return shoal_encap(skb, out_vni, dst, &f);
}

/* Headers we read: Ethernet + the longest IPv4 header + L4 ports/ICMP echo. */
#define SHOAL_PULL_LEN (sizeof(struct ethhdr) + 60 + 8)

static __always_inline int shoal_from_vm(struct __sk_buff *skb)
{
	__u32 want = skb->len < SHOAL_PULL_LEN ? skb->len : SHOAL_PULL_LEN;

	/* Frames from packet sockets (trafgen's TX ring) or GSO paths may keep their
	 * headers in page fragments; direct access needs them in the linear part. */
	if ((void *)(long)skb->data + want > (void *)(long)skb->data_end)
		bpf_skb_pull_data(skb, want);

	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u32 ifindex = skb->ifindex;
	struct shoal_port *port = bpf_map_lookup_elem(&shoal_ports, &ifindex);

	if (!port) {
		shoal_count(SHOAL_CNT_TC_UNMANAGED);
		return TC_ACT_OK;
	}

	if (port->leg_router_id)
		return shoal_from_leg(skb, port->leg_router_id);

	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return tc_drop(SHOAL_CNT_DROP_MALFORMED);
	if (!shoal_mac_eq(eth->h_source, port->mac))
		return tc_drop(SHOAL_CNT_DROP_SPOOF_MAC);
	if (eth->h_proto == bpf_htons(ETH_P_ARP))
		return shoal_arp_reply(skb, port, ifindex);
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return tc_drop(SHOAL_CNT_DROP_UNSUPPORTED);
	if (eth->h_dest[0] & 1)
		return tc_drop(SHOAL_CNT_DROP_BROADCAST);

	struct shoal_flow f;
	int r = shoal_parse_ipv4((void *)(eth + 1), data_end, &f);

	if (r == -2)
		return tc_drop(SHOAL_CNT_DROP_UNSUPPORTED);
	if (r < 0)
		return tc_drop(SHOAL_CNT_DROP_MALFORMED);

	__u32 vni = port->vni;
	__u32 port_id = port->port_id;
	struct shoal_ep_key key = { .vni = vni, .ip_be = f.saddr_be };
	struct shoal_endpoint *src = bpf_map_lookup_elem(&shoal_endpoints, &key);

	if (!src || src->ifindex != ifindex)
		return tc_drop(SHOAL_CNT_DROP_SPOOF_IP);

	if (f.daddr_be == bpf_htonl(SHOAL_METADATA_IP)) {
		/* Up the node's stack on this device, where the metadata service listens
		 * bound to it: the device, not the packet, tells the service who asks. */
		if (f.proto == IPPROTO_TCP && f.dport_be == bpf_htons(SHOAL_METADATA_PORT) &&
		    !shoal_mac_zero(port->host_mac) && shoal_mac_eq(eth->h_dest, port->host_mac)) {
			shoal_count(SHOAL_CNT_PASS_METADATA);
			return TC_ACT_OK;
		}
		return tc_drop(SHOAL_CNT_DROP_NO_ROUTE);
	}

	key.ip_be = f.daddr_be;
	struct shoal_endpoint *dst = bpf_map_lookup_elem(&shoal_endpoints, &key);

	/* The L2 path pays nothing for routing: only a frame that matches no port of its
	 * network (unknown address, or a MAC that is not the address's) tries the routers. */
	if (!dst || !shoal_mac_eq(eth->h_dest, dst->mac))
		return shoal_route(skb, vni, port_id, &f, ifindex);
	if (!shoal_policy(port_id, SHOAL_DIR_EGRESS, &f))
		return tc_drop(SHOAL_CNT_DROP_SG_EGRESS);

	if (dst->ifindex) {
		__u32 out = dst->ifindex;

		if (!shoal_policy(dst->port_id, SHOAL_DIR_INGRESS, &f))
			return tc_drop(SHOAL_CNT_DROP_SG_INGRESS);
		shoal_count(SHOAL_CNT_PASS_LOCAL);
		return bpf_redirect(out, 0);
	}
	if (!dst->vtep_be) /* a router interface's own address */
		return shoal_router_echo(skb, port_id, &f, ifindex);
	return shoal_encap(skb, vni, dst, &f);
}

static __always_inline int shoal_from_underlay(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct udphdr *udp = (void *)(ip + 1);
	struct shoal_config *cfg;

	/* Anything that is not VXLAN to our VTEP goes to the kernel untouched. */
	if ((void *)(udp + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP) ||
	    ip->version != 4 || ip->ihl != 5 || ip->protocol != IPPROTO_UDP ||
	    (ip->frag_off & bpf_htons(0x3fff)) || udp->dest != bpf_htons(SHOAL_VXLAN_PORT))
		goto not_ours;
	cfg = shoal_get_config();
	if (!cfg || ip->daddr != cfg->local_vtep_be)
		goto not_ours;

	struct shoal_vxlanhdr *vx = (void *)(udp + 1);
	struct ethhdr *ieth = (void *)(vx + 1);

	if ((void *)(ieth + 1) > data_end)
		return xdp_drop(SHOAL_CNT_DROP_MALFORMED);
	if (!(vx->flags_be & bpf_htonl(SHOAL_VXLAN_FLAG_I)))
		return xdp_drop(SHOAL_CNT_DROP_MALFORMED);
	if (ieth->h_proto != bpf_htons(ETH_P_IP))
		return xdp_drop(SHOAL_CNT_DROP_UNSUPPORTED); /* ARP is answered on each node */
	if (ieth->h_dest[0] & 1)
		return xdp_drop(SHOAL_CNT_DROP_BROADCAST);

	struct shoal_flow f;
	int r = shoal_parse_ipv4((void *)(ieth + 1), data_end, &f);

	if (r == -2)
		return xdp_drop(SHOAL_CNT_DROP_UNSUPPORTED);
	if (r < 0)
		return xdp_drop(SHOAL_CNT_DROP_MALFORMED);

	struct shoal_ep_key key = { .vni = bpf_ntohl(vx->vni_be) >> 8, .ip_be = f.daddr_be };
	struct shoal_endpoint *ep = bpf_map_lookup_elem(&shoal_endpoints, &key);

	if (!ep || !ep->ifindex || !shoal_mac_eq(ieth->h_dest, ep->mac))
		return xdp_drop(SHOAL_CNT_DROP_NO_ROUTE);

	__u32 out = ep->ifindex;

	if (!shoal_policy(ep->port_id, SHOAL_DIR_INGRESS, &f))
		return xdp_drop(SHOAL_CNT_DROP_SG_INGRESS);
	if (bpf_xdp_adjust_head(ctx, SHOAL_VXLAN_OVERHEAD))
		return xdp_drop(SHOAL_CNT_DROP_ERROR);
	shoal_count(SHOAL_CNT_PASS_DECAP);
	return bpf_redirect(out, 0);

not_ours:
	shoal_count(SHOAL_CNT_XDP_NOT_OURS);
	return XDP_PASS;
}

SEC("xdp")
int shoal_underlay(struct xdp_md *ctx)
{
	return shoal_from_underlay(ctx);
}

SEC("classifier")
int shoal_port(struct __sk_buff *skb)
{
	return shoal_from_vm(skb);
}

char _license[] SEC("license") = "Dual BSD/GPL";
