//! Packet tables for the kernel programs, run through BPF_PROG_TEST_RUN.
//!
//! Each case names what it proves, builds its input field by field and states the
//! verdict and the exact output bytes. The programs are loaded (not attached) by the
//! eBPF driver and its maps are filled by `apply`, so the tables also cover the map
//! encoding of the userspace side. Devices are veths in a fresh namespace, because
//! the tc test context must name an interface that exists.

mod common;

use std::net::Ipv4Addr;

use common::*;
use shoal_dataplane::{
    abi::{self, Config},
    ebpf::EbpfDataplane,
    model::{
        Direction, EtherType, Ipv4Cidr, LocalPort, Mac, Remote, RemotePort, Router,
        RouterInterface, RouterRoute, SecurityGroup, SgRule,
    },
    netdev,
    testbed::{self, NetNs},
    Dataplane, DesiredState,
};

const TC_OK: u32 = 0;
const TC_SHOT: u32 = 2;
const TC_REDIRECT: u32 = 7;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;

const MAC_A: [u8; 6] = [0xfa, 0x16, 0x3e, 0, 0, 0x0a];
const MAC_B: [u8; 6] = [0xfa, 0x16, 0x3e, 0, 0, 0x0b];
const MAC_R: [u8; 6] = [0xfa, 0x16, 0x3e, 0, 0, 0x0c];
const MAC_UL: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const MAC_PEER: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const BCAST: [u8; 6] = [0xff; 6];
const VNI: u32 = 100;

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn state(with_a: bool) -> DesiredState {
    let any = Remote::Cidr(Ipv4Cidr::ANY);
    let rule = |direction, protocol, port_range| SgRule {
        direction,
        ethertype: EtherType::Ipv4,
        protocol,
        port_range,
        remote: any.clone(),
    };
    let mut ports = vec![LocalPort {
        id: "b".into(),
        device: "pb".into(),
        mac: Mac(MAC_B),
        ips: vec![ip("10.0.0.2")],
        vni: VNI,
        security_groups: vec!["web".into()],
    }];
    if with_a {
        ports.insert(
            0,
            LocalPort {
                id: "a".into(),
                device: "pa".into(),
                mac: Mac(MAC_A),
                ips: vec![ip("10.0.0.1")],
                vni: VNI,
                security_groups: vec!["web".into()],
            },
        );
    }
    DesiredState {
        ports,
        remote_ports: vec![RemotePort {
            id: "r".into(),
            mac: Mac(MAC_R),
            ips: vec![ip("10.0.0.3")],
            vni: VNI,
            vtep: ip("192.0.2.2"),
            security_groups: vec!["web".into()],
        }],
        routers: vec![],
        security_groups: vec![SecurityGroup {
            id: "web".into(),
            rules: vec![
                rule(Direction::Ingress, Some(TCP), Some((80, 80))),
                rule(Direction::Ingress, Some(ICMP), None),
                rule(Direction::Egress, None, None),
            ],
        }],
    }
}

struct Case {
    what: &'static str,
    input: Vec<u8>,
    verdict: u32,
    /// `None`: the output must equal the input.
    output: Option<Vec<u8>>,
}

fn tcp_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: &str,
    dst: &str,
    sport: u16,
    dport: u16,
) -> Vec<u8> {
    eth(
        dst_mac,
        src_mac,
        ETH_IP,
        &ipv4(ip(src), ip(dst), TCP, &tcp(sport, dport)),
    )
}

/// What the tc program must emit for `inner` sent to the remote port R.
fn expected_encap(inner: &[u8], sport: u16, dport: u16, proto: u8) -> Vec<u8> {
    let src = Ipv4Addr::from(<[u8; 4]>::try_from(&inner[26..30]).unwrap());
    let dst = Ipv4Addr::from(<[u8; 4]>::try_from(&inner[30..34]).unwrap());
    let outer_sport = abi::flow_sport(src, dst, sport, dport, proto);
    vxlan(
        MAC_PEER,
        MAC_UL,
        ip("192.0.2.1"),
        ip("192.0.2.2"),
        outer_sport,
        VNI,
        inner,
    )
}

fn check<E: std::fmt::Debug>(
    what_prog: &str,
    cases: Vec<Case>,
    mut runner: impl FnMut(&[u8]) -> Result<(u32, Vec<u8>), E>,
) {
    for case in cases {
        let (verdict, out) = runner(&case.input)
            .unwrap_or_else(|e| panic!("{what_prog}: {}: test run failed: {e:?}", case.what));
        assert_eq!(verdict, case.verdict, "{what_prog}: {}: verdict", case.what);
        let want = case.output.unwrap_or_else(|| case.input.clone());
        if verdict != TC_SHOT || what_prog == "xdp" {
            assert_eq!(out, want, "{what_prog}: {}: output bytes", case.what);
        }
    }
}

fn tables() {
    let dp_cfg = Config {
        local_vtep_be: abi::ip_be(ip("192.0.2.1")),
        underlay_ifindex: netdev::ifindex("ul").unwrap(),
        underlay_mac: MAC_UL,
        pad: [0; 2],
    };
    let mut dp = EbpfDataplane::load_detached(dp_cfg).unwrap();
    dp.apply(&state(true)).unwrap();
    dp.set_vtep_mac(ip("192.0.2.2"), Mac(MAC_PEER)).unwrap();
    // Applying the same state again changes nothing (and must not fail).
    dp.apply(&state(true)).unwrap();
    let pa = netdev::ifindex("pa").unwrap();
    let pb = netdev::ifindex("pb").unwrap();
    let ul = netdev::ifindex("ul").unwrap();
    let pa_mac = netdev::mac("pa").unwrap().0;

    let to_r_80 = tcp_frame(MAC_R, MAC_A, "10.0.0.1", "10.0.0.3", 40000, 80);
    let to_r_5555 = tcp_frame(MAC_R, MAC_A, "10.0.0.1", "10.0.0.3", 40001, 5555);
    let ping_r = eth(
        MAC_R,
        MAC_A,
        ETH_IP,
        &ipv4(ip("10.0.0.1"), ip("10.0.0.3"), ICMP, &icmp_echo(8, 7, 1)),
    );
    let arp_req = eth(
        BCAST,
        MAC_A,
        ETH_ARP,
        &arp(1, MAC_A, ip("10.0.0.1"), [0; 6], ip("10.0.0.3")),
    );
    let arp_reply = eth(
        MAC_A,
        MAC_R,
        ETH_ARP,
        &arp(2, MAC_R, ip("10.0.0.3"), MAC_A, ip("10.0.0.1")),
    );
    // (A truncated IPv4 header cannot reach tc through BPF_PROG_TEST_RUN: the kernel
    // refuses such an skb. The XDP table covers it for the inner header.)
    let mut truncated_l4 = tcp_frame(MAC_R, MAC_A, "10.0.0.1", "10.0.0.3", 1, 80);
    truncated_l4.truncate(14 + 20 + 2);
    let mut fragment = tcp_frame(MAC_R, MAC_A, "10.0.0.1", "10.0.0.3", 1, 80);
    fragment[14 + 6] = 0x00;
    fragment[14 + 7] = 0x10; // fragment offset 16 (x8 bytes)

    let tc_cases = vec![
        Case {
            what: "TCP to a remote port is VXLAN-encapsulated to its VTEP",
            input: to_r_80.clone(),
            verdict: TC_REDIRECT,
            output: Some(expected_encap(&to_r_80, 40000, 80, TCP)),
        },
        Case {
            what: "egress allows any port (default OpenStack egress)",
            input: to_r_5555.clone(),
            verdict: TC_REDIRECT,
            output: Some(expected_encap(&to_r_5555, 40001, 5555, TCP)),
        },
        Case {
            what: "ICMP echo is encapsulated, flow port from the echo id",
            input: ping_r.clone(),
            verdict: TC_REDIRECT,
            output: Some(expected_encap(&ping_r, 7, 0, ICMP)),
        },
        Case {
            what: "same-host TCP 80 is redirected unchanged",
            input: tcp_frame(MAC_B, MAC_A, "10.0.0.1", "10.0.0.2", 40002, 80),
            verdict: TC_REDIRECT,
            output: None,
        },
        Case {
            what: "same-host TCP 22 is denied by B's inbound rules",
            input: tcp_frame(MAC_B, MAC_A, "10.0.0.1", "10.0.0.2", 40003, 22),
            verdict: TC_SHOT,
            output: None,
        },
        Case {
            what: "spoofed source MAC is dropped",
            input: tcp_frame(MAC_R, [2, 9, 9, 9, 9, 9], "10.0.0.1", "10.0.0.3", 1, 80),
            verdict: TC_SHOT,
            output: None,
        },
        Case {
            what: "spoofed source IP (B's address from A) is dropped",
            input: tcp_frame(MAC_R, MAC_A, "10.0.0.2", "10.0.0.3", 1, 80),
            verdict: TC_SHOT,
            output: None,
        },
        Case {
            what: "ARP request for a known port is answered in place",
            input: arp_req,
            verdict: TC_REDIRECT,
            output: Some(arp_reply),
        },
        Case {
            what: "ARP for the metadata address is answered with the device's own MAC",
            input: eth(
                BCAST,
                MAC_A,
                ETH_ARP,
                &arp(1, MAC_A, ip("10.0.0.1"), [0; 6], ip("169.254.169.254")),
            ),
            verdict: TC_REDIRECT,
            output: Some(eth(
                MAC_A,
                pa_mac,
                ETH_ARP,
                &arp(2, pa_mac, ip("169.254.169.254"), MAC_A, ip("10.0.0.1")),
            )),
        },
        Case {
            what: "TCP to the metadata service goes up the node's stack on the device",
            input: tcp_frame(pa_mac, MAC_A, "10.0.0.1", "169.254.169.254", 40010, 80),
            verdict: TC_OK,
            output: None,
        },
        Case {
            what: "other ports of the metadata address are dropped",
            input: tcp_frame(pa_mac, MAC_A, "10.0.0.1", "169.254.169.254", 40011, 22),
            verdict: TC_SHOT,
            output: None,
        },
        Case {
            what: "the metadata address with another device's MAC is dropped",
            input: tcp_frame(MAC_R, MAC_A, "10.0.0.1", "169.254.169.254", 40012, 80),
            verdict: TC_SHOT,
            output: None,
        },
        Case {
            what: "a spoofed source cannot reach the metadata service",
            input: tcp_frame(pa_mac, MAC_A, "10.0.0.9", "169.254.169.254", 40013, 80),
            verdict: TC_SHOT,
            output: None,
        },
        Case {
            what: "ARP request for an unknown address is dropped, not flooded",
            input: eth(
                BCAST,
                MAC_A,
                ETH_ARP,
                &arp(1, MAC_A, ip("10.0.0.1"), [0; 6], ip("10.0.0.99")),
            ),
            verdict: TC_SHOT,
            output: None,
        },
        Case {
            what: "ARP with a spoofed sender address is dropped",
            input: eth(
                BCAST,
                MAC_A,
                ETH_ARP,
                &arp(1, MAC_A, ip("10.0.0.2"), [0; 6], ip("10.0.0.3")),
            ),
            verdict: TC_SHOT,
            output: None,
        },
        Case {
            what: "IPv4 broadcast (e.g. DHCP) is not flooded",
            input: eth(
                BCAST,
                MAC_A,
                ETH_IP,
                &ipv4(
                    ip("10.0.0.1"),
                    ip("255.255.255.255"),
                    UDP,
                    &udp(68, 67, &[0; 8]),
                ),
            ),
            verdict: TC_SHOT,
            output: None,
        },
        Case {
            what: "unknown destination address is dropped",
            input: tcp_frame(MAC_R, MAC_A, "10.0.0.1", "10.0.0.77", 1, 80),
            verdict: TC_SHOT,
            output: None,
        },
        Case {
            what: "known address with the wrong MAC (unknown unicast) is dropped",
            input: tcp_frame(MAC_B, MAC_A, "10.0.0.1", "10.0.0.3", 1, 80),
            verdict: TC_SHOT,
            output: None,
        },
        Case {
            what: "truncated TCP ports are dropped",
            input: truncated_l4,
            verdict: TC_SHOT,
            output: None,
        },
        Case {
            what: "IP fragment without ports is dropped",
            input: fragment,
            verdict: TC_SHOT,
            output: None,
        },
        Case {
            what: "IPv6 is dropped (datapath is IPv4-only)",
            input: eth(MAC_R, MAC_A, ETH_IPV6, &[0x60; 40]),
            verdict: TC_SHOT,
            output: None,
        },
    ];
    check("tc", tc_cases, |p| dp.test_run_port(pa, p));

    // A device that is not a port is left alone.
    let (v, _) = dp.test_run_port(ul, &to_r_80).unwrap();
    assert_eq!(v, TC_OK, "tc: unmanaged device passes");

    // Inbound: VXLAN from R's VTEP to A.
    let from_r = |sport: u16, dport: u16, vni: u32, dst_ip: &str| {
        let inner = tcp_frame(MAC_A, MAC_R, "10.0.0.3", dst_ip, sport, dport);
        (
            vxlan(
                MAC_UL,
                MAC_PEER,
                ip("192.0.2.2"),
                ip("192.0.2.1"),
                55555,
                vni,
                &inner,
            ),
            inner,
        )
    };
    let (in_80, in_80_inner) = from_r(33000, 80, VNI, "10.0.0.1");
    let (in_22, _) = from_r(33001, 22, VNI, "10.0.0.1");
    let (reply_before, _) = from_r(6666, 41000, VNI, "10.0.0.1");
    let (other_vni, _) = from_r(33002, 80, 200, "10.0.0.1");
    let mut truncated = in_80.clone();
    truncated.truncate(14 + 20 + 8 + 8 + 6);
    let mut truncated_ip = in_80.clone();
    truncated_ip.truncate(14 + 20 + 8 + 8 + 14 + 12);
    let mut no_i_flag = in_80.clone();
    no_i_flag[42] = 0;
    let dns = eth(
        MAC_UL,
        MAC_PEER,
        ETH_IP,
        &ipv4(ip("192.0.2.2"), ip("192.0.2.1"), UDP, &udp(5353, 53, b"q")),
    );
    let (not_my_vtep, _) = {
        let inner = tcp_frame(MAC_A, MAC_R, "10.0.0.3", "10.0.0.1", 1, 80);
        (
            vxlan(
                MAC_UL,
                MAC_PEER,
                ip("192.0.2.2"),
                ip("192.0.2.9"),
                1,
                VNI,
                &inner,
            ),
            (),
        )
    };
    let ping_in = {
        let inner = eth(
            MAC_A,
            MAC_R,
            ETH_IP,
            &ipv4(ip("10.0.0.3"), ip("10.0.0.1"), ICMP, &icmp_echo(8, 9, 1)),
        );
        (
            vxlan(
                MAC_UL,
                MAC_PEER,
                ip("192.0.2.2"),
                ip("192.0.2.1"),
                1,
                VNI,
                &inner,
            ),
            inner,
        )
    };

    let xdp_cases = vec![
        Case {
            what: "VXLAN TCP 80 to a local port is decapsulated (rule allows 80)",
            input: in_80.clone(),
            verdict: XDP_REDIRECT,
            output: Some(in_80_inner),
        },
        Case {
            what: "VXLAN ICMP echo to a local port is decapsulated (rule allows ICMP)",
            input: ping_in.0.clone(),
            verdict: XDP_REDIRECT,
            output: Some(ping_in.1.clone()),
        },
        Case {
            what: "VXLAN TCP 22 is denied by inbound rules",
            input: in_22,
            verdict: XDP_DROP,
            output: None,
        },
        Case {
            what: "an unsolicited 'reply' to an unopened port is denied",
            input: reply_before,
            verdict: XDP_DROP,
            output: None,
        },
        Case {
            what: "the same address in another VNI is not ours",
            input: other_vni,
            verdict: XDP_DROP,
            output: None,
        },
        Case {
            what: "VXLAN truncated inside the inner Ethernet header is dropped",
            input: truncated,
            verdict: XDP_DROP,
            output: None,
        },
        Case {
            what: "VXLAN with a truncated inner IPv4 header is dropped",
            input: truncated_ip,
            verdict: XDP_DROP,
            output: None,
        },
        Case {
            what: "VXLAN without the I flag is dropped",
            input: no_i_flag,
            verdict: XDP_DROP,
            output: None,
        },
        Case {
            what: "non-VXLAN UDP to the VTEP goes to the kernel untouched",
            input: dns,
            verdict: XDP_PASS,
            output: None,
        },
        Case {
            what: "VXLAN for another VTEP goes to the kernel untouched",
            input: not_my_vtep,
            verdict: XDP_PASS,
            output: None,
        },
        Case {
            what: "ARP on the underlay goes to the kernel untouched",
            input: eth(
                BCAST,
                MAC_PEER,
                ETH_ARP,
                &arp(1, MAC_PEER, ip("192.0.2.2"), [0; 6], ip("192.0.2.1")),
            ),
            verdict: XDP_PASS,
            output: None,
        },
    ];
    check("xdp", xdp_cases, |p| dp.test_run_underlay(p));

    // Stateful: A opens 41000 -> R:6666; R's reply, which no rule allows, now passes.
    let open = tcp_frame(MAC_R, MAC_A, "10.0.0.1", "10.0.0.3", 41000, 6666);
    assert_eq!(dp.test_run_port(pa, &open).unwrap().0, TC_REDIRECT);
    let (reply, reply_inner) = from_r(6666, 41000, VNI, "10.0.0.1");
    assert_eq!(
        dp.test_run_underlay(&reply).unwrap(),
        (XDP_REDIRECT, reply_inner),
        "reply of an allowed connection passes"
    );
    // And B's reply to a connection R opened on B's port 80 passes B's egress both ways.
    let ct_before = dp.conntrack_len().unwrap();
    assert!(ct_before >= 3, "connections are tracked: {ct_before}");

    // Same-host reply: B answers A's port-80 connection from 80 to A's ephemeral port,
    // which A's inbound rules do not allow.
    let b_reply = tcp_frame(MAC_A, MAC_B, "10.0.0.2", "10.0.0.1", 80, 40002);
    assert_eq!(
        dp.test_run_port(pb, &b_reply).unwrap().0,
        TC_REDIRECT,
        "same-host reply passes"
    );
    let b_unsolicited = tcp_frame(MAC_A, MAC_B, "10.0.0.2", "10.0.0.1", 80, 40999);
    assert_eq!(
        dp.test_run_port(pb, &b_unsolicited).unwrap().0,
        TC_SHOT,
        "same-host unsolicited denied"
    );

    let c = dp.counters().unwrap();
    for (name, at_least) in [
        ("pass_encap", 4),
        ("pass_local", 2),
        ("pass_decap", 3),
        ("arp_reply", 1),
        ("drop_spoof_mac", 1),
        ("drop_spoof_ip", 2),
        ("drop_sg_ingress", 4),
        ("drop_no_route", 3),
        ("drop_broadcast", 1),
        ("drop_malformed", 4),
        ("drop_unsupported", 2),
        ("xdp_not_ours", 3),
        ("tc_unmanaged", 1),
        ("ct_hit", 2),
    ] {
        assert!(
            c[name] >= at_least,
            "counter {name} = {} < {at_least}: {c:?}",
            c[name]
        );
    }

    // Removing port A: its traffic stops and its connections are forgotten.
    dp.apply(&state(false)).unwrap();
    assert_eq!(
        dp.test_run_underlay(&in_80).unwrap().0,
        XDP_DROP,
        "removed port gets nothing"
    );
    assert_eq!(
        dp.test_run_port(pa, &to_r_80).unwrap().0,
        TC_OK,
        "removed port's device is unmanaged"
    );
    assert!(
        dp.conntrack_len().unwrap() < ct_before,
        "removed port's connections are flushed"
    );
    dp.teardown().unwrap();
}

/// Every table row: verdict and exact output bytes of both programs.
#[test]
fn packet_tables() {
    if !testbed::privileged_or_skip("packet_tables") {
        return;
    }
    let ns = NetNs::new("shpt").unwrap();
    for (a, b) in [("pa", "pa0"), ("pb", "pb0"), ("ul", "ul0")] {
        testbed::veth(&ns, a, &ns, b).unwrap();
        ns.ip(&["link", "set", a, "up"]).unwrap();
    }
    ns.run(tables).unwrap();
}

const MAC_C: [u8; 6] = [0xfa, 0x16, 0x3e, 0, 1, 0x0c];
const MAC_R2: [u8; 6] = [0xfa, 0x16, 0x3e, 0, 1, 0x0d];
const MAC_GA: [u8; 6] = [0xfa, 0x16, 0x3e, 0xaa, 0, 1];
const MAC_GB: [u8; 6] = [0xfa, 0x16, 0x3e, 0xbb, 0, 1];
const VNI_B: u32 = 101;

/// `state(true)` plus network B (VNI 101, 10.1.0.0/24) with local port C and remote port R2,
/// and (with `router`) a router joining A's subnet (gateway 10.0.0.254) and B's (10.1.0.1).
fn routed_state(router: bool) -> DesiredState {
    let mut s = state(true);
    s.ports.push(LocalPort {
        id: "c".into(),
        device: "pc".into(),
        mac: Mac(MAC_C),
        ips: vec![ip("10.1.0.5")],
        vni: VNI_B,
        security_groups: vec!["web".into()],
    });
    s.remote_ports.push(RemotePort {
        id: "r2".into(),
        mac: Mac(MAC_R2),
        ips: vec![ip("10.1.0.7")],
        vni: VNI_B,
        vtep: ip("192.0.2.2"),
        security_groups: vec!["web".into()],
    });
    if router {
        let rif = |port_id: &str, vni, mac, addr: &str| RouterInterface {
            port_id: port_id.into(),
            vni,
            mac: Mac(mac),
            ip: ip(addr),
            subnet: Ipv4Cidr::new(ip(addr), 24),
        };
        s.routers.push(Router {
            id: "rt".into(),
            // A VM acting as a router: 192.168.50.0/24 lies behind port C.
            routes: vec![RouterRoute {
                destination: Ipv4Cidr::new(ip("192.168.50.0"), 24),
                nexthop: ip("10.1.0.5"),
            }],
            interfaces: vec![
                rif("ga", VNI, MAC_GA, "10.0.0.254"),
                rif("gb", VNI_B, MAC_GB, "10.1.0.1"),
            ],
            ..Default::default()
        });
    }
    s
}

/// `frame` as a router forwards it: new MACs, TTL - 1, header checksum recomputed.
fn routed(frame: &[u8], dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
    let mut out = frame.to_vec();
    out[0..6].copy_from_slice(&dst);
    out[6..12].copy_from_slice(&src);
    out[14 + 8] -= 1;
    out[14 + 10] = 0;
    out[14 + 11] = 0;
    let c = csum(&out[14..34]);
    out[14 + 10..14 + 12].copy_from_slice(&c.to_be_bytes());
    out
}

fn routing_rows() {
    let dp_cfg = Config {
        local_vtep_be: abi::ip_be(ip("192.0.2.1")),
        underlay_ifindex: netdev::ifindex("ul").unwrap(),
        underlay_mac: MAC_UL,
        pad: [0; 2],
    };
    let mut dp = EbpfDataplane::load_detached(dp_cfg).unwrap();
    dp.apply(&routed_state(true)).unwrap();
    dp.set_vtep_mac(ip("192.0.2.2"), Mac(MAC_PEER)).unwrap();
    dp.apply(&routed_state(true)).unwrap();
    let pa = netdev::ifindex("pa").unwrap();

    let to_c_80 = tcp_frame(MAC_GA, MAC_A, "10.0.0.1", "10.1.0.5", 42000, 80);
    let to_r2_80 = tcp_frame(MAC_GA, MAC_A, "10.0.0.1", "10.1.0.7", 42001, 80);
    let to_r2_routed = routed(&to_r2_80, MAC_R2, MAC_GB);
    let mut ttl1 = tcp_frame(MAC_GA, MAC_A, "10.0.0.1", "10.1.0.5", 42002, 80);
    ttl1[14 + 8] = 1;
    ttl1[14 + 10] = 0;
    ttl1[14 + 11] = 0;
    let c = csum(&ttl1[14..34]);
    ttl1[14 + 10..14 + 12].copy_from_slice(&c.to_be_bytes());

    let cases = vec![
        Case {
            what: "ARP for the gateway is answered with the router interface's MAC",
            input: eth(
                BCAST,
                MAC_A,
                ETH_ARP,
                &arp(1, MAC_A, ip("10.0.0.1"), [0; 6], ip("10.0.0.254")),
            ),
            verdict: TC_REDIRECT,
            output: Some(eth(
                MAC_A,
                MAC_GA,
                ETH_ARP,
                &arp(2, MAC_GA, ip("10.0.0.254"), MAC_A, ip("10.0.0.1")),
            )),
        },
        Case {
            what: "to the router, for a local port of the other subnet: routed in place",
            input: to_c_80.clone(),
            verdict: TC_REDIRECT,
            output: Some(routed(&to_c_80, MAC_C, MAC_GB)),
        },
        Case {
            what: "routed traffic meets the destination port's inbound rules (22 denied)",
            input: tcp_frame(MAC_GA, MAC_A, "10.0.0.1", "10.1.0.5", 42003, 22),
            verdict: TC_SHOT,
            output: None,
        },
        Case {
            what: "to the router, for a remote port: routed, then VXLAN with B's VNI",
            input: to_r2_80,
            verdict: TC_REDIRECT,
            output: Some(vxlan(
                MAC_PEER,
                MAC_UL,
                ip("192.0.2.1"),
                ip("192.0.2.2"),
                abi::flow_sport(ip("10.0.0.1"), ip("10.1.0.7"), 42001, 80, TCP),
                VNI_B,
                &to_r2_routed,
            )),
        },
        Case {
            what: "an extra route delivers to its next hop's MAC, destination unchanged",
            input: tcp_frame(MAC_GA, MAC_A, "10.0.0.1", "192.168.50.9", 42009, 80),
            verdict: TC_REDIRECT,
            output: Some(routed(
                &tcp_frame(MAC_GA, MAC_A, "10.0.0.1", "192.168.50.9", 42009, 80),
                MAC_C,
                MAC_GB,
            )),
        },
        Case {
            what: "TTL 1 is not routed",
            input: ttl1,
            verdict: TC_SHOT,
            output: None,
        },
        Case {
            what: "a destination in no subnet of the router is dropped",
            input: tcp_frame(MAC_GA, MAC_A, "10.0.0.1", "10.9.0.5", 42004, 80),
            verdict: TC_SHOT,
            output: None,
        },
        Case {
            what: "an address of the other subnet without a port is dropped",
            input: tcp_frame(MAC_GA, MAC_A, "10.0.0.1", "10.1.0.99", 42005, 80),
            verdict: TC_SHOT,
            output: None,
        },
        Case {
            what: "TCP to the router's own address is dropped",
            input: tcp_frame(MAC_GA, MAC_A, "10.0.0.1", "10.0.0.254", 42006, 80),
            verdict: TC_SHOT,
            output: None,
        },
        Case {
            what: "ping to the gateway is answered by the router, in place",
            input: eth(
                MAC_GA,
                MAC_A,
                ETH_IP,
                &ipv4(ip("10.0.0.1"), ip("10.0.0.254"), ICMP, &icmp_echo(8, 5, 1)),
            ),
            verdict: TC_REDIRECT,
            output: Some(eth(
                MAC_A,
                MAC_GA,
                ETH_IP,
                &ipv4(ip("10.0.0.254"), ip("10.0.0.1"), ICMP, &icmp_echo(0, 5, 1)),
            )),
        },
        Case {
            what: "ping to the router's address on the other subnet is answered too",
            input: eth(
                MAC_GA,
                MAC_A,
                ETH_IP,
                &ipv4(ip("10.0.0.1"), ip("10.1.0.1"), ICMP, &icmp_echo(8, 6, 1)),
            ),
            verdict: TC_REDIRECT,
            output: Some(eth(
                MAC_A,
                MAC_GA,
                ETH_IP,
                &ipv4(ip("10.1.0.1"), ip("10.0.0.1"), ICMP, &icmp_echo(0, 6, 1)),
            )),
        },
        Case {
            what: "the router's MAC on another network is not a router here",
            input: tcp_frame(MAC_GB, MAC_A, "10.0.0.1", "10.1.0.5", 42007, 80),
            verdict: TC_SHOT,
            output: None,
        },
        Case {
            what: "the L2 path is unchanged next to a router",
            input: tcp_frame(MAC_B, MAC_A, "10.0.0.1", "10.0.0.2", 42008, 80),
            verdict: TC_REDIRECT,
            output: None,
        },
    ];
    check("tc routed", cases, |p| dp.test_run_port(pa, p));

    let c = dp.counters().unwrap();
    assert!(c["pass_routed"] >= 2, "{c:?}");
    assert!(c["drop_ttl"] >= 1, "{c:?}");
    assert!(c["pass_router_echo"] >= 2, "{c:?}");

    // Without the router, the same frame goes nowhere.
    dp.apply(&routed_state(false)).unwrap();
    assert_eq!(dp.test_run_port(pa, &to_c_80).unwrap().0, TC_SHOT);
    dp.teardown().unwrap();
}

/// Distributed routing in the tc program: verdicts and exact output bytes.
#[test]
fn routing_tables() {
    if !testbed::privileged_or_skip("routing_tables") {
        return;
    }
    let ns = NetNs::new("shrt").unwrap();
    for (a, b) in [("pa", "pa0"), ("pb", "pb0"), ("pc", "pc0"), ("ul", "ul0")] {
        testbed::veth(&ns, a, &ns, b).unwrap();
        ns.ip(&["link", "set", a, "up"]).unwrap();
    }
    ns.run(routing_rows).unwrap();
}
