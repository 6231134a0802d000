//! IP address management, the pure part: a subnet's gateway and allocation pools, and the
//! choice of a free address.
//!
//! Uniqueness does not come from here: every address a port holds is a row
//! `ip_allocations/{subnet}/{address}` written with an `Absent` precondition in the port's
//! transaction, so two ports can never commit the same address whatever this module picks.
//! What this module owes is to pick only addresses that are inside the pools and not already
//! taken as far as the caller knows, and to spread concurrent picks so that creates through
//! different nodes seldom collide (Neutron also picks at random from a window of free addresses).

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::ip::{ip_string, parse_ip, shown, Addr, Cidr};

/// How many free addresses, from the start of the pools, a pick chooses among.
pub const PICK_WINDOW: usize = 64;

/// An inclusive range of addresses handed out automatically, as Neutron's `allocation_pools`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    pub start: String,
    pub end: String,
}

/// Why a subnet's layout was refused: the Neutron error type and its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutError {
    pub kind: &'static str,
    pub message: String,
    /// Neutron answers a gateway inside a pool with 409, every other layout error with 400.
    pub conflict: bool,
}

fn bad(kind: &'static str, message: String) -> LayoutError {
    LayoutError {
        kind,
        message,
        conflict: false,
    }
}

/// The first host address: Neutron's default gateway, when the subnet has room for one
/// (`x.x.x.1` in IPv4, `prefix::1` in IPv6).
pub fn default_gateway(cidr: &Cidr) -> Option<Addr> {
    let room = if cidr.is_v4() { 30 } else { 127 };
    (cidr.prefix() <= room).then(|| cidr.first() + 1)
}

/// Checks a gateway chosen by the request: a host address of the subnet, or for IPv6 a
/// link-local address (`fe80::/64`), as routers advertise themselves.
pub fn check_gateway(cidr: &Cidr, gateway: &str) -> Result<Addr, LayoutError> {
    let ip = parse_ip(gateway).map_err(|m| bad("HTTPBadRequest", m))?;
    let link_local = !cidr.is_v4() && ip >> 64 == 0xfe80 << 48;
    if !cidr.is_host(ip) && !link_local {
        return Err(bad(
            "InvalidInput",
            format!(
                "Gateway is not valid on subnet: {} is not a host address of {cidr}",
                shown(gateway)
            ),
        ));
    }
    Ok(ip)
}

/// The pools of a subnet that names none: every host address but the gateway.
pub fn default_pools(cidr: &Cidr, gateway: Option<Addr>) -> Vec<(Addr, Addr)> {
    let (lo, hi) = cidr.hosts();
    match gateway {
        Some(g) if (lo..=hi).contains(&g) => {
            let mut pools = Vec::new();
            if g > lo {
                pools.push((lo, g - 1));
            }
            if g < hi {
                pools.push((g + 1, hi));
            }
            pools
        }
        _ => vec![(lo, hi)],
    }
}

/// A bound on the pools of one subnet (Neutron sets none; every pool is stored in the row).
pub const MAX_POOLS: usize = 100;

/// Checks pools a request names: at most [`MAX_POOLS`], each inside the subnet's host
/// addresses, start ≤ end, no two overlapping, the gateway in none. Returns them sorted.
pub fn check_pools(
    cidr: &Cidr,
    gateway: Option<Addr>,
    pools: &[Pool],
) -> Result<Vec<(Addr, Addr)>, LayoutError> {
    if pools.len() > MAX_POOLS {
        return Err(bad(
            "HTTPBadRequest",
            format!("A subnet may have at most {MAX_POOLS} allocation pools."),
        ));
    }
    let mut ranges = Vec::with_capacity(pools.len());
    for p in pools {
        let start = parse_ip(&p.start).map_err(|m| bad("HTTPBadRequest", m))?;
        let end = parse_ip(&p.end).map_err(|m| bad("HTTPBadRequest", m))?;
        if start > end {
            return Err(bad(
                "InvalidAllocationPool",
                format!(
                    "The allocation pool {}-{} is not valid: its start is after its end.",
                    ip_string(start),
                    ip_string(end)
                ),
            ));
        }
        if !cidr.is_host(start) || !cidr.is_host(end) {
            return Err(bad(
                "OutOfBoundsAllocationPool",
                format!(
                    "The allocation pool {}-{} spans beyond the subnet cidr {cidr}.",
                    ip_string(start),
                    ip_string(end)
                ),
            ));
        }
        ranges.push((start, end));
    }
    ranges.sort_unstable();
    for w in ranges.windows(2) {
        if w[1].0 <= w[0].1 {
            return Err(bad(
                "OverlappingAllocationPools",
                format!(
                    "Found overlapping allocation pools: {}-{} and {}-{} for subnet {cidr}.",
                    ip_string(w[0].0),
                    ip_string(w[0].1),
                    ip_string(w[1].0),
                    ip_string(w[1].1)
                ),
            ));
        }
    }
    if let Some(g) = gateway {
        if let Some((s, e)) = ranges.iter().find(|(s, e)| (*s..=*e).contains(&g)) {
            return Err(LayoutError {
                kind: "GatewayConflictWithAllocationPools",
                message: format!(
                    "Gateway ip {} conflicts with allocation pool {}-{}",
                    ip_string(g),
                    ip_string(*s),
                    ip_string(*e)
                ),
                conflict: true,
            });
        }
    }
    Ok(ranges)
}

pub fn to_pools(ranges: &[(Addr, Addr)]) -> Vec<Pool> {
    ranges
        .iter()
        .map(|(s, e)| Pool {
            start: ip_string(*s),
            end: ip_string(*e),
        })
        .collect()
}

/// Parses stored pools (already checked when the subnet was written).
pub fn ranges_of(pools: &[Pool]) -> Vec<(Addr, Addr)> {
    pools
        .iter()
        .filter_map(|p| Some((parse_ip(&p.start).ok()?, parse_ip(&p.end).ok()?)))
        .collect()
}

/// Picks a free address: one of the first [`PICK_WINDOW`] addresses of `pools` (in order)
/// that are not in `used`, the `choice`-th modulo how many there are. `None` when every
/// address of the pools is used.
pub fn pick(pools: &[(Addr, Addr)], used: &BTreeSet<Addr>, choice: u64) -> Option<Addr> {
    let mut window = Vec::with_capacity(PICK_WINDOW);
    'pools: for &(start, end) in pools {
        let mut ip = start;
        loop {
            if !used.contains(&ip) {
                window.push(ip);
                if window.len() == PICK_WINDOW {
                    break 'pools;
                }
            }
            if ip == end {
                break;
            }
            ip += 1;
        }
    }
    if window.is_empty() {
        None
    } else {
        Some(window[(choice % window.len() as u64) as usize])
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn ip(s: &str) -> Addr {
        parse_ip(s).unwrap()
    }

    fn pool(s: &str, e: &str) -> Pool {
        Pool {
            start: s.into(),
            end: e.into(),
        }
    }

    #[test]
    fn defaults_leave_out_network_broadcast_and_gateway() {
        let c = Cidr::parse("10.0.0.0/24").unwrap();
        let g = default_gateway(&c);
        assert_eq!(g, Some(ip("10.0.0.1")));
        assert_eq!(
            default_pools(&c, g),
            vec![(ip("10.0.0.2"), ip("10.0.0.254"))]
        );
        let mid = ip("10.0.0.100");
        assert_eq!(
            default_pools(&c, Some(mid)),
            vec![
                (ip("10.0.0.1"), ip("10.0.0.99")),
                (ip("10.0.0.101"), ip("10.0.0.254"))
            ]
        );
        assert_eq!(
            default_pools(&c, None),
            vec![(ip("10.0.0.1"), ip("10.0.0.254"))]
        );
        assert_eq!(default_gateway(&Cidr::parse("10.0.0.0/31").unwrap()), None);
    }

    #[test]
    fn pools_are_checked_against_the_subnet() {
        let c = Cidr::parse("10.0.0.0/24").unwrap();
        let g = Some(ip("10.0.0.1"));
        let ok = check_pools(
            &c,
            g,
            &[
                pool("10.0.0.50", "10.0.0.60"),
                pool("10.0.0.10", "10.0.0.20"),
            ],
        );
        assert_eq!(ok.unwrap()[0], (ip("10.0.0.10"), ip("10.0.0.20")));
        let out = check_pools(&c, g, &[pool("10.0.0.10", "10.0.1.5")]).unwrap_err();
        assert_eq!(out.kind, "OutOfBoundsAllocationPool");
        let bcast = check_pools(&c, g, &[pool("10.0.0.10", "10.0.0.255")]).unwrap_err();
        assert_eq!(bcast.kind, "OutOfBoundsAllocationPool");
        let over = check_pools(
            &c,
            g,
            &[
                pool("10.0.0.10", "10.0.0.20"),
                pool("10.0.0.20", "10.0.0.30"),
            ],
        );
        assert_eq!(over.unwrap_err().kind, "OverlappingAllocationPools");
        let backwards = check_pools(&c, g, &[pool("10.0.0.20", "10.0.0.10")]);
        assert_eq!(backwards.unwrap_err().kind, "InvalidAllocationPool");
        let gw = check_pools(&c, g, &[pool("10.0.0.1", "10.0.0.10")]).unwrap_err();
        assert!(gw.conflict && gw.kind == "GatewayConflictWithAllocationPools");
        assert!(check_pools(&c, g, &[pool("x", "10.0.0.10")]).is_err());
        assert!(check_gateway(&c, "10.0.0.0").is_err());
        assert!(check_gateway(&c, "10.0.1.1").is_err());
        assert_eq!(check_gateway(&c, "10.0.0.254").unwrap(), ip("10.0.0.254"));
    }

    #[test]
    fn pick_skips_used_and_reports_exhaustion() {
        let pools = [(ip("10.0.0.2"), ip("10.0.0.4"))];
        let mut used = BTreeSet::new();
        for _ in 0..3 {
            let got = pick(&pools, &used, 0).unwrap();
            assert!(used.insert(got));
        }
        assert_eq!(pick(&pools, &used, 7), None);
        // The last address of the address space does not overflow.
        let top = [(u128::MAX - 1, u128::MAX)];
        assert_eq!(
            pick(&top, &BTreeSet::from([u128::MAX - 1]), 3),
            Some(u128::MAX)
        );
        // An IPv6 pool of 2^64 addresses: the pick looks at the window only.
        let c = Cidr::parse("2001:db8::/64").unwrap();
        let pools = default_pools(&c, default_gateway(&c));
        let got = pick(&pools, &BTreeSet::new(), 5).unwrap();
        assert!(c.is_host(got) && got != c.first() + 1);
    }

    fn layout() -> impl Strategy<Value = (Cidr, Vec<(Addr, Addr)>)> {
        (
            20u8..=29,
            any::<u32>(),
            prop::collection::vec((any::<u16>(), any::<u16>()), 1..4),
        )
            .prop_map(|(prefix, base, raw)| {
                let base = std::net::Ipv4Addr::from(base);
                let cidr = Cidr::parse_normalized(&format!("{base}/{prefix}")).unwrap();
                let (lo, hi) = cidr.hosts();
                let span = hi - lo + 1;
                let mut ranges: Vec<(Addr, Addr)> = raw
                    .into_iter()
                    .map(|(a, b)| {
                        let (a, b) = (lo + u128::from(a) % span, lo + u128::from(b) % span);
                        (a.min(b), a.max(b))
                    })
                    .collect();
                ranges.sort_unstable();
                // Merge overlaps: valid pools never overlap.
                let mut merged: Vec<(Addr, Addr)> = Vec::new();
                for r in ranges {
                    match merged.last_mut() {
                        Some(last) if r.0 <= last.1 => last.1 = last.1.max(r.1),
                        _ => merged.push(r),
                    }
                }
                (cidr, merged)
            })
    }

    proptest! {
        /// IPAM never hands out an address twice: over any sequence of allocations and
        /// releases, every pick is inside the pools and not held, and a pick fails only when
        /// every pool address is held.
        #[test]
        fn never_hands_out_an_address_twice(
            (cidr, pools) in layout(),
            ops in prop::collection::vec((any::<bool>(), any::<u64>()), 1..300),
        ) {
            let capacity: u128 = pools.iter().map(|(s, e)| e - s + 1).sum();
            let mut held: BTreeSet<Addr> = BTreeSet::new();
            let mut order: Vec<Addr> = Vec::new();
            for (allocate, r) in ops {
                if allocate || order.is_empty() {
                    match pick(&pools, &held, r) {
                        Some(ip) => {
                            prop_assert!(cidr.is_host(ip));
                            prop_assert!(pools.iter().any(|(s, e)| (*s..=*e).contains(&ip)));
                            prop_assert!(held.insert(ip), "{} handed out twice", ip_string(ip));
                            order.push(ip);
                        }
                        None => prop_assert_eq!(held.len() as u128, capacity),
                    }
                } else {
                    // A deleted port's address goes back to the pool.
                    let ip = order.swap_remove((r % order.len() as u64) as usize);
                    held.remove(&ip);
                    prop_assert!(pick(&pools, &held, 0).is_some());
                }
            }
        }

        /// Checked pools always lie within the subnet's hosts and never hold the gateway.
        #[test]
        fn checked_pools_stay_in_bounds((cidr, pools) in layout(), g in any::<u32>()) {
            let (lo, hi) = cidr.hosts();
            let gateway = lo + u128::from(g) % (hi - lo + 1);
            if let Ok(ranges) = check_pools(&cidr, Some(gateway), &to_pools(&pools)) {
                for (s, e) in ranges {
                    prop_assert!(cidr.is_host(s) && cidr.is_host(e) && s <= e);
                    prop_assert!(!(s..=e).contains(&gateway));
                }
            }
        }
    }
}
