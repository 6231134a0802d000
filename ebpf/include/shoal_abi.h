/* SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0) */
/*
 * Map and struct layouts shared between the kernel programs and userspace.
 *
 * This is the ONE header whose layout is mirrored by `#[repr(C)]` types in
 * dataplane/src/abi.rs; a Rust test checks sizes and field offsets against the
 * values below (SHOAL_ABI_* asserts). Keep every struct free of implicit padding:
 * explicit `pad` fields make both sides agree without relying on compiler rules.
 *
 * Byte order: fields named *_be are network byte order; everything else is host order.
 */
#ifndef SHOAL_ABI_H
#define SHOAL_ABI_H

#include <linux/types.h>

#define SHOAL_VXLAN_PORT 4789
/* Outer Ethernet (14) + IPv4 (20) + UDP (8) + VXLAN (8). */
#define SHOAL_VXLAN_OVERHEAD 50

#define SHOAL_DIR_INGRESS 0 /* towards the VM */
#define SHOAL_DIR_EGRESS 1  /* from the VM */

/* Security-group LPM key: 64 fixed bits (port_id, direction, proto, dport) + CIDR bits. */
#define SHOAL_SG_FIXED_BITS 64
#define SHOAL_SG_PROTO_ANY 0
#define SHOAL_SG_PORT_ANY 0

#define SHOAL_MAX_PORTS 4096
#define SHOAL_MAX_ENDPOINTS 65536
#define SHOAL_MAX_SG_ENTRIES 262144
#define SHOAL_MAX_CT 262144
#define SHOAL_MAX_RIFS 4096
#define SHOAL_MAX_ROUTES 16384

/* Array `shoal_config`, one entry (index 0): this node's underlay. */
struct shoal_config {
	__u32 local_vtep_be;     /* VTEP IPv4 address of this node */
	__u32 underlay_ifindex;  /* where encapsulated packets leave */
	__u8 underlay_mac[6];    /* outer source MAC */
	__u8 pad[2];
};

/* The node-local services every VM reaches on its own device, never forwarded:
 * the metadata service (TCP 80) and the DHCP server's identity. */
#define SHOAL_METADATA_IP 0xa9fea9fe /* 169.254.169.254, host order */
#define SHOAL_METADATA_PORT 80

/* Hash `shoal_ports`: key = ifindex (__u32) of the VM-facing device. */
struct shoal_port {
	__u32 port_id;    /* dense id chosen by userspace; keys SG rules and conntrack */
	__u32 vni;        /* VXLAN network identifier of the port's network */
	__u8 mac[6];      /* the only source MAC the VM may use */
	__u8 host_mac[6]; /* the device's own MAC: where 169.254.169.254 answers; zero = none */
	__u32 leg_router_id; /* != 0: not a VM but this router's leg into its NAT namespace */
};

/* Hash `shoal_endpoints`: (VNI, IPv4) -> where that address lives. Serves as the
 * forwarding database (local device or remote VTEP), the ARP table of the
 * responder and the anti-spoofing table (a local address names its device). */
struct shoal_ep_key {
	__u32 vni;
	__u32 ip_be;
};

struct shoal_endpoint {
	__u8 mac[6];
	__u8 vtep_mac[6];  /* outer destination MAC; all zero = ask the kernel's neighbour table */
	__u32 port_id;     /* local ports only */
	__u32 ifindex;     /* != 0: local port on this node */
	__u32 vtep_be;     /* remote ports: the VTEP of their node */
};

/* Hash `shoal_rifs`: (VNI, MAC) of a router interface -> its router. Looked up only when
 * a VM's frame matches no port of its network (so the L2 path never pays for it): a frame
 * to a router interface's MAC is routed. The interface's address is also in
 * `shoal_endpoints` (MAC, no ifindex, no VTEP), which answers the VMs' ARP for it. */
struct shoal_rif_key {
	__u32 vni;
	__u8 mac[6];
	__u8 pad[2];
};

struct shoal_rif {
	__u32 router_id; /* dense id chosen by userspace; keys `shoal_routes` */
};

/* LPM trie `shoal_routes`: (router, destination prefix) -> the connected network the
 * router reaches it on and the router's MAC there (the routed frame's source MAC). The
 * router id is the fixed part of the key; the destination is the variable prefix. */
#define SHOAL_ROUTE_FIXED_BITS 32

struct shoal_route_key {
	__u32 prefixlen;
	__u32 router_id;
	__u32 dst_be;
};

struct shoal_route {
	__u32 vni;
	__u8 mac[6];
	__u8 pad[2];
	__u32 nexthop_be; /* extra route: the next hop's address in `vni`; 0 = connected */
	__u32 leg_ifindex; /* != 0: the router's leg into its NAT namespace (the default route
			    * of a router with an external gateway); `mac` is then the MAC of
			    * the leg's end in that namespace, `vni` is 0 */
};

/* LPM trie `shoal_sg`: prefixlen counts bits after the prefixlen field. */
struct shoal_sg_key {
	__u32 prefixlen;
	__u32 port_id;
	__u8 direction;
	__u8 proto;       /* IPPROTO_*, or SHOAL_SG_PROTO_ANY */
	__u16 dport_be;   /* destination port of the flow's first packet, or SHOAL_SG_PORT_ANY */
	__u32 remote_be;  /* remote CIDR address (source for ingress, destination for egress) */
};

/* LRU hash `shoal_ct`: one entry per (port, connection), seen from the port. */
struct shoal_ct_key {
	__u32 port_id;
	__u32 local_be;
	__u32 remote_be;
	__u16 local_port_be;  /* TCP/UDP port of the VM, or ICMP echo id */
	__u16 remote_port_be; /* TCP/UDP port of the peer, 0 for ICMP */
	__u8 proto;
	__u8 pad[3];
};

struct shoal_ct_val {
	__u64 created_ns;
	__u8 origin; /* SHOAL_DIR_* of the packet that opened the connection */
	__u8 pad[7];
};

/* Per-CPU array `shoal_counters`: one __u64 per verdict reason. */
enum shoal_counter {
	SHOAL_CNT_XDP_NOT_OURS = 0,   /* XDP_PASS: not VXLAN to our VTEP */
	SHOAL_CNT_TC_UNMANAGED,       /* device not in shoal_ports */
	SHOAL_CNT_PASS_LOCAL,         /* same-host delivery, no encapsulation */
	SHOAL_CNT_PASS_ENCAP,         /* encapsulated to a remote VTEP */
	SHOAL_CNT_PASS_DECAP,         /* decapsulated to a local port */
	SHOAL_CNT_ARP_REPLY,          /* ARP answered from the endpoint table */
	SHOAL_CNT_CT_HIT,             /* packet matched an existing connection */
	SHOAL_CNT_DROP_MALFORMED,     /* truncated or invalid headers */
	SHOAL_CNT_DROP_SPOOF_MAC,
	SHOAL_CNT_DROP_SPOOF_IP,
	SHOAL_CNT_DROP_SG_EGRESS,
	SHOAL_CNT_DROP_SG_INGRESS,
	SHOAL_CNT_DROP_NO_ROUTE,      /* unknown destination (no unicast flooding) */
	SHOAL_CNT_DROP_BROADCAST,     /* broadcast/multicast other than ARP: not flooded */
	SHOAL_CNT_DROP_ARP,           /* ARP we do not answer */
	SHOAL_CNT_DROP_UNSUPPORTED,   /* IPv6, other ethertypes, IP fragments */
	SHOAL_CNT_DROP_ERROR,         /* a helper failed (e.g. no headroom) */
	SHOAL_CNT_PASS_METADATA,      /* TCP to 169.254.169.254:80, up to the node's stack */
	SHOAL_CNT_PASS_ROUTED,        /* routed by a router on the sender's node */
	SHOAL_CNT_DROP_TTL,           /* routed packet whose TTL ran out (no ICMP sent) */
	SHOAL_CNT_ROUTER_ECHO,        /* ICMP echo to a router's address, answered in place */
	SHOAL_CNT_PASS_TO_NAT,        /* routed to the router's NAT namespace (external network) */
	SHOAL_CNT_PASS_FROM_NAT,      /* from the router's NAT namespace to a port of its networks */
	SHOAL_CNT_MAX,
};

#endif /* SHOAL_ABI_H */
