//! Packet builders for the packet tables, field by field.
#![allow(dead_code)]

use std::net::Ipv4Addr;

pub const ETH_IP: u16 = 0x0800;
pub const ETH_ARP: u16 = 0x0806;
pub const ETH_IPV6: u16 = 0x86dd;
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;

pub fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(14 + payload.len());
    p.extend_from_slice(&dst);
    p.extend_from_slice(&src);
    p.extend_from_slice(&ethertype.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

pub fn csum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in bytes.chunks(2) {
        let word = if chunk.len() == 2 {
            [chunk[0], chunk[1]]
        } else {
            [chunk[0], 0]
        };
        sum += u32::from(u16::from_be_bytes(word));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// IPv4 header (no options, TTL 64, id 0, no fragmentation) with a valid checksum.
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0u8; 20];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    let c = csum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

/// Minimal TCP header: ports, SYN flag, window; checksum left 0 (not checked by BPF).
pub fn tcp(sport: u16, dport: u16) -> Vec<u8> {
    let mut h = vec![0u8; 20];
    h[0..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h[12] = 5 << 4;
    h[13] = 0x02;
    h[14..16].copy_from_slice(&64240u16.to_be_bytes());
    h
}

pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0u8; 8];
    h[0..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    h.extend_from_slice(payload);
    h
}

pub fn icmp_echo(kind: u8, id: u16, seq: u16) -> Vec<u8> {
    let mut h = vec![kind, 0, 0, 0];
    h.extend_from_slice(&id.to_be_bytes());
    h.extend_from_slice(&seq.to_be_bytes());
    let c = csum(&h);
    h[2..4].copy_from_slice(&c.to_be_bytes());
    h
}

pub fn arp(op: u16, sha: [u8; 6], sip: Ipv4Addr, tha: [u8; 6], tip: Ipv4Addr) -> Vec<u8> {
    let mut a = vec![0, 1, 0x08, 0x00, 6, 4];
    a.extend_from_slice(&op.to_be_bytes());
    a.extend_from_slice(&sha);
    a.extend_from_slice(&sip.octets());
    a.extend_from_slice(&tha);
    a.extend_from_slice(&tip.octets());
    a
}

/// A whole VXLAN packet around `inner` (an Ethernet frame), UDP checksum 0.
#[allow(clippy::too_many_arguments)]
pub fn vxlan(
    outer_dst: [u8; 6],
    outer_src: [u8; 6],
    src_vtep: Ipv4Addr,
    dst_vtep: Ipv4Addr,
    sport: u16,
    vni: u32,
    inner: &[u8],
) -> Vec<u8> {
    let mut vx = vec![0x08, 0, 0, 0];
    vx.extend_from_slice(&(vni << 8).to_be_bytes());
    vx.extend_from_slice(inner);
    let u = udp(sport, 4789, &vx);
    eth(
        outer_dst,
        outer_src,
        ETH_IP,
        &ipv4(src_vtep, dst_vtep, UDP, &u),
    )
}
