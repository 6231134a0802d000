//! Sets of addresses held as prefixes, as Neutron's subnet pools keep them (netaddr's
//! `IPSet`): a pool's prefixes are stored compacted, an update may only grow them, and a
//! subnet is carved from what its allocated subnets leave free.

use crate::ip::{Addr, Cidr};

/// A set of addresses of one family: sorted, disjoint, non-adjacent inclusive ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrefixSet {
    ranges: Vec<(Addr, Addr)>,
}

impl PrefixSet {
    pub fn new<'a>(cidrs: impl IntoIterator<Item = &'a Cidr>) -> Self {
        let mut ranges: Vec<(Addr, Addr)> =
            cidrs.into_iter().map(|c| (c.first(), c.last())).collect();
        ranges.sort_unstable();
        let mut merged: Vec<(Addr, Addr)> = Vec::with_capacity(ranges.len());
        for (lo, hi) in ranges {
            match merged.last_mut() {
                Some((_, last)) if last.checked_add(1).is_none_or(|next| lo <= next) => {
                    *last = (*last).max(hi);
                }
                _ => merged.push((lo, hi)),
            }
        }
        Self { ranges: merged }
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Whether every address of `self` is in `other`.
    pub fn is_subset(&self, other: &PrefixSet) -> bool {
        self.ranges.iter().all(|&(lo, hi)| {
            other
                .ranges
                .iter()
                .any(|&(olo, ohi)| olo <= lo && hi <= ohi)
        })
    }

    /// Whether `cidr` lies wholly inside the set.
    pub fn contains(&self, cidr: &Cidr) -> bool {
        PrefixSet::new([cidr]).is_subset(self)
    }

    /// The addresses of `self` that are not in `other`.
    pub fn difference(&self, other: &PrefixSet) -> PrefixSet {
        let mut out = Vec::new();
        for &(lo, hi) in &self.ranges {
            let mut start = Some(lo);
            for &(olo, ohi) in &other.ranges {
                let Some(s) = start else { break };
                if ohi < s || olo > hi {
                    continue;
                }
                if olo > s {
                    out.push((s, olo - 1));
                }
                start = ohi.checked_add(1).filter(|n| *n <= hi);
            }
            if let Some(s) = start {
                out.push((s, hi));
            }
        }
        PrefixSet { ranges: out }
    }

    /// The fewest prefixes that cover the set exactly (netaddr's `iter_cidrs` after
    /// `compact`), in address order. `v4` is the set's family.
    pub fn cidrs(&self, v4: bool) -> Vec<Cidr> {
        let mut out = Vec::new();
        for &(lo, hi) in &self.ranges {
            let mut start = lo;
            loop {
                // The largest aligned block from `start` that ends by `hi`.
                let mut size_bits = start.trailing_zeros().min(128);
                while size_bits > 0 && block_last(start, size_bits).is_none_or(|l| l > hi) {
                    size_bits -= 1;
                }
                let bits = 128 - size_bits as u8;
                let bits = if v4 { bits.max(96) } else { bits };
                let c = Cidr::block(start, bits, v4);
                out.push(c);
                match c.last().checked_add(1) {
                    Some(next) if next <= hi => start = next,
                    _ => break,
                }
            }
        }
        out
    }
}

/// The last address of the block of `2^size_bits` addresses from `start`, if it fits in u128.
fn block_last(start: Addr, size_bits: u32) -> Option<Addr> {
    if size_bits >= 128 {
        return (start == 0).then_some(Addr::MAX);
    }
    start.checked_add((1u128 << size_bits) - 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn set(cidrs: &[&str]) -> PrefixSet {
        let cs: Vec<Cidr> = cidrs.iter().map(|c| Cidr::parse(c).unwrap()).collect();
        PrefixSet::new(&cs)
    }

    fn shown(s: &PrefixSet, v4: bool) -> Vec<String> {
        s.cidrs(v4).iter().map(|c| c.to_string()).collect()
    }

    #[test]
    fn prefixes_compact_as_neutron_stores_them() {
        let s = set(&[
            "10.10.1.0/24",
            "10.10.0.0/24",
            "10.10.0.128/25",
            "10.12.0.0/16",
        ]);
        assert_eq!(shown(&s, true), ["10.10.0.0/23", "10.12.0.0/16"]);
        assert_eq!(shown(&set(&["0.0.0.0/0"]), true), ["0.0.0.0/0"]);
        assert_eq!(shown(&set(&["::/0"]), false), ["::/0"]);
        assert_eq!(
            shown(&set(&["2001:db8::/64", "2001:db8:0:1::/64"]), false),
            ["2001:db8::/63"]
        );
    }

    #[test]
    fn difference_leaves_what_allocations_do_not_hold() {
        let pool = set(&["10.0.0.0/16"]);
        let used = set(&["10.0.0.0/24", "10.0.2.0/24"]);
        let free = pool.difference(&used);
        assert_eq!(
            shown(&free, true),
            [
                "10.0.1.0/24",
                "10.0.3.0/24",
                "10.0.4.0/22",
                "10.0.8.0/21",
                "10.0.16.0/20",
                "10.0.32.0/19",
                "10.0.64.0/18",
                "10.0.128.0/17"
            ]
        );
        assert!(free.contains(&Cidr::parse("10.0.1.0/24").unwrap()));
        assert!(!free.contains(&Cidr::parse("10.0.0.0/23").unwrap()));
        assert!(used.is_subset(&pool) && !pool.is_subset(&used));
        assert!(pool.difference(&pool).is_empty());
    }

    proptest! {
        /// The prefixes cover exactly the set's addresses: each address of a random sample is
        /// in the cover iff it is in one of the input prefixes and not a removed one.
        #[test]
        fn cover_is_exact(
            parts in proptest::collection::vec((0u32..=0xffff, 16u8..=32), 1..6),
            holes in proptest::collection::vec((0u32..=0xffff, 18u8..=32), 0..4),
            probes in proptest::collection::vec(0u32..=0xffff, 32),
        ) {
            let cidr = |(x, p): (u32, u8)| {
                Cidr::parse_normalized(&format!("{}/{p}", std::net::Ipv4Addr::from(0x0a00_0000 | (x << 8)))).unwrap()
            };
            let ins: Vec<Cidr> = parts.iter().copied().map(cidr).collect();
            let outs: Vec<Cidr> = holes.iter().copied().map(cidr).collect();
            let s = PrefixSet::new(&ins).difference(&PrefixSet::new(&outs));
            let cover = s.cidrs(true);
            prop_assert_eq!(PrefixSet::new(&cover), s.clone());
            for p in probes {
                let ip = crate::ip::parse_ip(&std::net::Ipv4Addr::from(0x0a00_0000 | (p << 8)).to_string()).unwrap();
                let want = ins.iter().any(|c| c.contains(ip)) && !outs.iter().any(|c| c.contains(ip));
                prop_assert_eq!(cover.iter().any(|c| c.contains(ip)), want);
            }
        }
    }
}
