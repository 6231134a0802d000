//! `#[repr(C)]` mirrors of `ebpf/include/shoal_abi.h`. The layout test at the bottom
//! checks sizes and field offsets; change both files together.

use std::net::Ipv4Addr;

/// The compiled datapath object (XDP on the underlay, tc on each port).
pub static DATAPATH_OBJ: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/datapath.o"));
/// The XDP_DROP program (benchmark ceiling).
pub static AUX_OBJ: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/aux.o"));

pub const VXLAN_PORT: u16 = 4789;
pub const VXLAN_OVERHEAD: usize = 50;
pub const DIR_INGRESS: u8 = 0;
pub const DIR_EGRESS: u8 = 1;
pub const SG_FIXED_BITS: u32 = 64;
pub const SG_PROTO_ANY: u8 = 0;
pub const SG_PORT_ANY: u16 = 0;
pub const ROUTE_FIXED_BITS: u32 = 32;

pub const MAP_CONFIG: &str = "shoal_config";
pub const MAP_PORTS: &str = "shoal_ports";
pub const MAP_ENDPOINTS: &str = "shoal_endpoints";
pub const MAP_SG: &str = "shoal_sg";
pub const MAP_CT: &str = "shoal_ct";
pub const MAP_RIFS: &str = "shoal_rifs";
pub const MAP_ROUTES: &str = "shoal_routes";
pub const MAP_COUNTERS: &str = "shoal_counters";
pub const PROG_UNDERLAY: &str = "shoal_underlay";
pub const PROG_PORT: &str = "shoal_port";
pub const PROG_XDP_DROP: &str = "shoal_xdp_drop";

/// Network-order IPv4 address as the kernel stores it in a `__u32`.
pub fn ip_be(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// Network-order port as stored in a `__u16`.
pub fn port_be(port: u16) -> u16 {
    u16::from_ne_bytes(port.to_be_bytes())
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub local_vtep_be: u32,
    pub underlay_ifindex: u32,
    pub underlay_mac: [u8; 6],
    pub pad: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortVal {
    pub port_id: u32,
    pub vni: u32,
    pub mac: [u8; 6],
    pub host_mac: [u8; 6],
    /// Not 0: the device is this router's leg into its NAT namespace, not a VM's.
    pub leg_router_id: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EpKey {
    pub vni: u32,
    pub ip_be: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub mac: [u8; 6],
    pub vtep_mac: [u8; 6],
    pub port_id: u32,
    pub ifindex: u32,
    pub vtep_be: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RifKey {
    pub vni: u32,
    pub mac: [u8; 6],
    pub pad: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Rif {
    pub router_id: u32,
}

/// The data part of the route LPM key (aya's `lpm_trie::Key` adds the prefix length).
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteKeyData {
    pub router_id: u32,
    pub dst_be: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RouteVal {
    pub vni: u32,
    pub mac: [u8; 6],
    pub pad: [u8; 2],
    pub nexthop_be: u32,
    /// Not 0: the router's leg into its NAT namespace (`mac` = the leg's peer there).
    pub leg_ifindex: u32,
}

/// The data part of the LPM key (aya's `lpm_trie::Key` adds the prefix length).
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SgKeyData {
    pub port_id: u32,
    pub direction: u8,
    pub proto: u8,
    pub dport_be: u16,
    pub remote_be: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub port_id: u32,
    pub local_be: u32,
    pub remote_be: u32,
    pub local_port_be: u16,
    pub remote_port_be: u16,
    pub proto: u8,
    pub pad: [u8; 3],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtVal {
    pub created_ns: u64,
    pub origin: u8,
    pub pad: [u8; 7],
}

// SAFETY: all-integer `repr(C)` structs without implicit padding; any bit pattern is valid.
unsafe impl aya::Pod for Config {}
// SAFETY: as above.
unsafe impl aya::Pod for PortVal {}
// SAFETY: as above.
unsafe impl aya::Pod for EpKey {}
// SAFETY: as above.
unsafe impl aya::Pod for Endpoint {}
// SAFETY: as above (packed, so no padding at all).
unsafe impl aya::Pod for SgKeyData {}
// SAFETY: as above.
unsafe impl aya::Pod for CtKey {}
// SAFETY: as above.
unsafe impl aya::Pod for CtVal {}
// SAFETY: as above.
unsafe impl aya::Pod for RifKey {}
// SAFETY: as above.
unsafe impl aya::Pod for Rif {}
// SAFETY: as above (packed, so no padding at all).
unsafe impl aya::Pod for RouteKeyData {}
// SAFETY: as above.
unsafe impl aya::Pod for RouteVal {}

/// Verdict counters, in the order of `enum shoal_counter`.
pub const COUNTER_NAMES: [&str; 23] = [
    "xdp_not_ours",
    "tc_unmanaged",
    "pass_local",
    "pass_encap",
    "pass_decap",
    "arp_reply",
    "ct_hit",
    "drop_malformed",
    "drop_spoof_mac",
    "drop_spoof_ip",
    "drop_sg_egress",
    "drop_sg_ingress",
    "drop_no_route",
    "drop_broadcast",
    "drop_arp",
    "drop_unsupported",
    "drop_error",
    "pass_metadata",
    "pass_routed",
    "drop_ttl",
    "pass_router_echo",
    "pass_to_nat",
    "pass_from_nat",
];

/// Outer UDP source port for an inner flow: the same function as `shoal_flow_sport`
/// in `ebpf/include/vxlan.h` (inputs in network order, as the kernel reads them).
pub fn flow_sport(saddr: Ipv4Addr, daddr: Ipv4Addr, sport: u16, dport: u16, proto: u8) -> u16 {
    let mut h = ip_be(saddr)
        ^ ip_be(daddr)
        ^ ((u32::from(port_be(sport)) << 16) | u32::from(port_be(dport)))
        ^ u32::from(proto);
    h ^= h >> 16;
    h = h.wrapping_mul(0x7feb_352d);
    h ^= h >> 15;
    h = h.wrapping_mul(0x846c_a68b);
    h ^= h >> 16;
    49152 + (h & 0x3fff) as u16
}

#[cfg(test)]
mod tests {
    use std::mem::{offset_of, size_of};

    use super::*;

    /// The C compiler's sizes and offsets of `shoal_abi.h` (printed by a probe that
    /// build.rs compiles against the header).
    mod c {
        include!(concat!(env!("OUT_DIR"), "/abi_layout.rs"));
    }

    /// Every mirrored struct has the C compiler's size and field offsets.
    #[test]
    fn layouts_match_the_c_header() {
        assert_eq!(size_of::<Config>(), c::SHOAL_CONFIG_SIZE);
        assert_eq!(
            offset_of!(Config, local_vtep_be),
            c::SHOAL_CONFIG_LOCAL_VTEP_BE
        );
        assert_eq!(
            offset_of!(Config, underlay_ifindex),
            c::SHOAL_CONFIG_UNDERLAY_IFINDEX
        );
        assert_eq!(
            offset_of!(Config, underlay_mac),
            c::SHOAL_CONFIG_UNDERLAY_MAC
        );

        assert_eq!(size_of::<PortVal>(), c::SHOAL_PORT_SIZE);
        assert_eq!(offset_of!(PortVal, port_id), c::SHOAL_PORT_PORT_ID);
        assert_eq!(offset_of!(PortVal, vni), c::SHOAL_PORT_VNI);
        assert_eq!(offset_of!(PortVal, mac), c::SHOAL_PORT_MAC);
        assert_eq!(offset_of!(PortVal, host_mac), c::SHOAL_PORT_HOST_MAC);
        assert_eq!(
            offset_of!(PortVal, leg_router_id),
            c::SHOAL_PORT_LEG_ROUTER_ID
        );

        assert_eq!(size_of::<EpKey>(), c::SHOAL_EP_KEY_SIZE);
        assert_eq!(offset_of!(EpKey, vni), c::SHOAL_EP_KEY_VNI);
        assert_eq!(offset_of!(EpKey, ip_be), c::SHOAL_EP_KEY_IP_BE);

        assert_eq!(size_of::<Endpoint>(), c::SHOAL_ENDPOINT_SIZE);
        assert_eq!(offset_of!(Endpoint, mac), c::SHOAL_ENDPOINT_MAC);
        assert_eq!(offset_of!(Endpoint, vtep_mac), c::SHOAL_ENDPOINT_VTEP_MAC);
        assert_eq!(offset_of!(Endpoint, port_id), c::SHOAL_ENDPOINT_PORT_ID);
        assert_eq!(offset_of!(Endpoint, ifindex), c::SHOAL_ENDPOINT_IFINDEX);
        assert_eq!(offset_of!(Endpoint, vtep_be), c::SHOAL_ENDPOINT_VTEP_BE);

        // struct shoal_sg_key = { __u32 prefixlen; <SgKeyData> }: aya's LPM Key adds
        // the 4-byte prefix length in front of the data.
        assert_eq!(
            size_of::<aya::maps::lpm_trie::Key<SgKeyData>>(),
            c::SHOAL_SG_KEY_SIZE
        );
        assert_eq!(c::SHOAL_SG_KEY_PREFIXLEN, 0);
        let d = c::SHOAL_SG_KEY_PORT_ID;
        assert_eq!(d, 4);
        assert_eq!(offset_of!(SgKeyData, port_id) + d, c::SHOAL_SG_KEY_PORT_ID);
        assert_eq!(
            offset_of!(SgKeyData, direction) + d,
            c::SHOAL_SG_KEY_DIRECTION
        );
        assert_eq!(offset_of!(SgKeyData, proto) + d, c::SHOAL_SG_KEY_PROTO);
        assert_eq!(
            offset_of!(SgKeyData, dport_be) + d,
            c::SHOAL_SG_KEY_DPORT_BE
        );
        assert_eq!(
            offset_of!(SgKeyData, remote_be) + d,
            c::SHOAL_SG_KEY_REMOTE_BE
        );

        assert_eq!(size_of::<CtKey>(), c::SHOAL_CT_KEY_SIZE);
        assert_eq!(offset_of!(CtKey, port_id), c::SHOAL_CT_KEY_PORT_ID);
        assert_eq!(offset_of!(CtKey, local_be), c::SHOAL_CT_KEY_LOCAL_BE);
        assert_eq!(offset_of!(CtKey, remote_be), c::SHOAL_CT_KEY_REMOTE_BE);
        assert_eq!(
            offset_of!(CtKey, local_port_be),
            c::SHOAL_CT_KEY_LOCAL_PORT_BE
        );
        assert_eq!(
            offset_of!(CtKey, remote_port_be),
            c::SHOAL_CT_KEY_REMOTE_PORT_BE
        );
        assert_eq!(offset_of!(CtKey, proto), c::SHOAL_CT_KEY_PROTO);

        assert_eq!(size_of::<RifKey>(), c::SHOAL_RIF_KEY_SIZE);
        assert_eq!(offset_of!(RifKey, vni), c::SHOAL_RIF_KEY_VNI);
        assert_eq!(offset_of!(RifKey, mac), c::SHOAL_RIF_KEY_MAC);
        assert_eq!(size_of::<Rif>(), c::SHOAL_RIF_SIZE);
        assert_eq!(offset_of!(Rif, router_id), c::SHOAL_RIF_ROUTER_ID);

        assert_eq!(
            size_of::<aya::maps::lpm_trie::Key<RouteKeyData>>(),
            c::SHOAL_ROUTE_KEY_SIZE
        );
        assert_eq!(c::SHOAL_ROUTE_KEY_PREFIXLEN, 0);
        assert_eq!(
            offset_of!(RouteKeyData, router_id) + 4,
            c::SHOAL_ROUTE_KEY_ROUTER_ID
        );
        assert_eq!(
            offset_of!(RouteKeyData, dst_be) + 4,
            c::SHOAL_ROUTE_KEY_DST_BE
        );
        assert_eq!(size_of::<RouteVal>(), c::SHOAL_ROUTE_SIZE);
        assert_eq!(offset_of!(RouteVal, vni), c::SHOAL_ROUTE_VNI);
        assert_eq!(offset_of!(RouteVal, mac), c::SHOAL_ROUTE_MAC);
        assert_eq!(offset_of!(RouteVal, nexthop_be), c::SHOAL_ROUTE_NEXTHOP_BE);
        assert_eq!(
            offset_of!(RouteVal, leg_ifindex),
            c::SHOAL_ROUTE_LEG_IFINDEX
        );

        assert_eq!(size_of::<CtVal>(), c::SHOAL_CT_VAL_SIZE);
        assert_eq!(offset_of!(CtVal, created_ns), c::SHOAL_CT_VAL_CREATED_NS);
        assert_eq!(offset_of!(CtVal, origin), c::SHOAL_CT_VAL_ORIGIN);
    }

    /// Every counter of the C enum has a name.
    #[test]
    fn counter_table_matches_enum_size() {
        assert_eq!(COUNTER_NAMES.len(), c::SHOAL_CNT_MAX);
    }
}
