//! IP addresses and prefixes of both families as `u128`s, and the checks Neutron makes on them.
//!
//! An IPv4 address is held as its IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), so one integer
//! type, one pool arithmetic and one allocator serve both families; a prefix remembers its
//! family, and nothing of one family is ever inside a prefix of the other. IPv6 subnets inside
//! the mapped range `::ffff:0:0/96` are refused, so the two never meet.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// The IPv4-mapped range: `::ffff:0:0/96`.
const MAPPED: u128 = 0xffff_0000_0000;
const MAPPED_MASK: u128 = !0xffff_ffff;

/// An address of either family (IPv4 as IPv4-mapped).
pub type Addr = u128;

fn mask(prefix: u8) -> u128 {
    if prefix == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(prefix))
    }
}

/// Whether `ip` is an IPv4 address (held IPv4-mapped).
pub fn is_v4(ip: Addr) -> bool {
    ip & MAPPED_MASK == MAPPED
}

/// Parses an address of either family; the error says what was given. IPv6 text naming an
/// IPv4-mapped address is refused: write the IPv4 address.
pub fn parse_ip(text: &str) -> Result<Addr, String> {
    if let Ok(v4) = Ipv4Addr::from_str(text) {
        return Ok(MAPPED | u128::from(u32::from(v4)));
    }
    match Ipv6Addr::from_str(text) {
        Ok(v6) if !is_v4(u128::from(v6)) => Ok(u128::from(v6)),
        _ => Err(format!("'{}' is not a valid IP address", shown(text))),
    }
}

/// An address as Neutron shows it: dotted IPv4, or compressed IPv6.
pub fn ip_string(ip: Addr) -> String {
    if is_v4(ip) {
        Ipv4Addr::from(ip as u32).to_string()
    } else {
        Ipv6Addr::from(ip).to_string()
    }
}

/// At most 64 characters of user input, escaped, for error messages.
pub fn shown(text: &str) -> String {
    text.chars()
        .take(64)
        .flat_map(char::escape_default)
        .collect()
}

/// A prefix whose host bits are zero (`10.0.0.0/24`, `2001:db8::/64`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    network: Addr,
    /// In the 128-bit space: 96 more than the IPv4 prefix for IPv4.
    bits: u8,
    v4: bool,
}

impl Cidr {
    /// Parses `a.b.c.d/n` or `x::/n`. Host bits must be zero, as Neutron requires of a subnet's
    /// cidr.
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let (net, cidr) = Self::parse_loose(text)?;
        if cidr.network != net {
            return Err(format!(
                "'{}' isn't a recognized IP subnet cidr, '{cidr}' is recommended",
                shown(text)
            ));
        }
        Ok(cidr)
    }

    /// Parses a prefix (or a bare address, as a host prefix) and clears any host bits.
    pub fn parse_normalized(text: &str) -> Result<Cidr, String> {
        Self::parse_loose(text).map(|(_, c)| c)
    }

    /// The address as given and the prefix with host bits cleared.
    fn parse_loose(text: &str) -> Result<(Addr, Cidr), String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let v4 = !addr.contains(':');
        let bad = || {
            if v4 {
                format!(
                    "'{}' is not a valid IPv4 CIDR (expected a.b.c.d/n with n from 0 to 32)",
                    shown(text)
                )
            } else {
                format!(
                    "'{}' is not a valid IPv6 CIDR (expected x:x::x/n with n from 0 to 128)",
                    shown(text)
                )
            }
        };
        let ip = parse_ip(addr).map_err(|_| bad())?;
        if is_v4(ip) != v4 {
            return Err(bad());
        }
        let max: u8 = if v4 { 32 } else { 128 };
        let prefix: u8 = match prefix {
            None => max,
            Some(p) => p
                .parse()
                .ok()
                .filter(|n| *n <= max && !p.starts_with('+'))
                .ok_or_else(bad)?,
        };
        let bits = if v4 { prefix + 96 } else { prefix };
        let cidr = Cidr {
            network: ip & mask(bits),
            bits,
            v4,
        };
        Ok((ip, cidr))
    }

    pub fn is_v4(&self) -> bool {
        self.v4
    }

    /// 4 or 6.
    pub fn version(&self) -> u8 {
        if self.v4 {
            4
        } else {
            6
        }
    }

    /// The prefix length as written (0-32 for IPv4, 0-128 for IPv6).
    pub fn prefix(&self) -> u8 {
        if self.v4 {
            self.bits - 96
        } else {
            self.bits
        }
    }

    pub fn first(&self) -> Addr {
        self.network
    }

    /// The aligned block of `2^(128 - bits)` addresses from `first` (`bits` in the 128-bit
    /// space, at least 96 for IPv4), as prefix sets cut them.
    pub(crate) fn block(first: Addr, bits: u8, v4: bool) -> Cidr {
        debug_assert!(first & !mask(bits) == 0 && (!v4 || bits >= 96));
        Cidr {
            network: first,
            bits,
            v4,
        }
    }

    pub fn last(&self) -> Addr {
        self.network | !mask(self.bits)
    }

    /// Whether this IPv6 prefix reaches into the IPv4-mapped range, which Shoal keeps for
    /// IPv4 (see the module's note).
    pub fn touches_mapped(&self) -> bool {
        !self.v4 && self.first() <= MAPPED | 0xffff_ffff && self.last() >= MAPPED
    }

    pub fn contains(&self, ip: Addr) -> bool {
        is_v4(ip) == self.v4 && ip & mask(self.bits) == self.network
    }

    pub fn overlaps(&self, other: &Cidr) -> bool {
        self.contains(other.first()) || other.contains(self.first())
    }

    /// The addresses a port may hold. IPv4: all but the network and broadcast addresses,
    /// except in a /31 or /32, where every address is a host (RFC 3021). IPv6: all but the
    /// subnet-router anycast address (the first), except in a /128.
    pub fn hosts(&self) -> (Addr, Addr) {
        if self.v4 {
            if self.bits >= 127 {
                (self.first(), self.last())
            } else {
                (self.first() + 1, self.last() - 1)
            }
        } else if self.bits == 128 {
            (self.first(), self.last())
        } else {
            (self.first() + 1, self.last())
        }
    }

    pub fn is_host(&self, ip: Addr) -> bool {
        let (lo, hi) = self.hosts();
        self.contains(ip) && (lo..=hi).contains(&ip)
    }

    /// Number of host addresses, saturating.
    pub fn size(&self) -> u128 {
        let (lo, hi) = self.hosts();
        (hi - lo).saturating_add(1)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", ip_string(self.network), self.prefix())
    }
}

/// The modified EUI-64 address of `mac` in the /64 `cidr` (RFC 4291 appendix A), as Neutron
/// gives ports on SLAAC and DHCPv6-stateless subnets. `None` for a malformed MAC.
pub fn eui64(cidr: &Cidr, mac: &str) -> Option<Addr> {
    let octets: Vec<u8> = mac
        .split(':')
        .map(|o| u8::from_str_radix(o, 16).ok())
        .collect::<Option<_>>()?;
    let [a, b, c, d, e, f] = <[u8; 6]>::try_from(octets).ok()?;
    let iid = u64::from_be_bytes([a ^ 0x02, b, c, 0xff, 0xfe, d, e, f]);
    Some(cidr.first() | u128::from(iid))
}

/// A remote prefix of a security group rule, for either address family, normalised (host
/// bits cleared) as Neutron's `normalized_cidr` shows it.
pub fn normalize_prefix(text: &str, ipv6: bool) -> Result<String, String> {
    if !ipv6 {
        return Cidr::parse_normalized(text).map(|c| c.to_string());
    }
    let bad = || format!("'{}' is not a valid IPv6 CIDR", shown(text));
    let (addr, prefix) = text.split_once('/').unwrap_or((text, "128"));
    let addr = Ipv6Addr::from_str(addr).map_err(|_| bad())?;
    let prefix: u32 = prefix.parse().ok().filter(|p| *p <= 128).ok_or_else(bad)?;
    let bits = u128::from(addr);
    let masked = if prefix == 0 {
        0
    } else {
        bits & (u128::MAX << (128 - prefix))
    };
    Ok(format!("{}/{prefix}", Ipv6Addr::from(masked)))
}

/// Whether `text` is an address or a prefix of the IPv4 family (`None` if neither family).
pub fn family_of(text: &str) -> Option<bool> {
    let addr = text.split_once('/').map_or(text, |(a, _)| a);
    if Ipv4Addr::from_str(addr).is_ok() {
        Some(true)
    } else if Ipv6Addr::from_str(addr).is_ok() {
        Some(false)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_strictly() {
        let c = Cidr::parse("10.0.0.0/24").unwrap();
        assert_eq!(c.to_string(), "10.0.0.0/24");
        assert_eq!(
            c.hosts(),
            (
                parse_ip("10.0.0.1").unwrap(),
                parse_ip("10.0.0.254").unwrap()
            )
        );
        let e = Cidr::parse("10.0.0.1/24").unwrap_err();
        assert!(e.contains("'10.0.0.0/24' is recommended"), "{e}");
        for bad in [
            "10.0.0.0/33",
            "10.0.0/24",
            "banana",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "2001:db8::/129",
            "2001:db8::/-1",
            "::ffff:10.0.0.0/120",
        ] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Cidr::parse("10.0.0.7").unwrap().prefix(), 32);
        assert_eq!(
            Cidr::parse("192.168.1.0/31").unwrap().hosts().1,
            parse_ip("192.168.1.1").unwrap()
        );
    }

    #[test]
    fn ipv6_prefixes_and_their_hosts() {
        let c = Cidr::parse("2001:db8:0:1::/64").unwrap();
        assert_eq!(c.to_string(), "2001:db8:0:1::/64");
        assert_eq!((c.version(), c.prefix()), (6, 64));
        let (lo, hi) = c.hosts();
        assert_eq!(ip_string(lo), "2001:db8:0:1::1");
        assert_eq!(ip_string(hi), "2001:db8:0:1:ffff:ffff:ffff:ffff");
        assert!(!c.is_host(c.first()), "the subnet-router anycast address");
        let e = Cidr::parse("2001:db8::1/64").unwrap_err();
        assert!(e.contains("'2001:db8::/64' is recommended"), "{e}");
        // The families never contain each other's addresses.
        let v4 = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(!c.contains(parse_ip("10.0.0.1").unwrap()));
        assert!(!Cidr::parse("::/0")
            .unwrap()
            .contains(parse_ip("10.0.0.1").unwrap()));
        assert!(!v4.contains(parse_ip("2001:db8::1").unwrap()));
        assert!(!v4.overlaps(&Cidr::parse("::/0").unwrap()));
        assert!(Cidr::parse("::/0").unwrap().touches_mapped());
        assert!(!c.touches_mapped());
        assert!(parse_ip("::ffff:10.0.0.1").is_err());
    }

    #[test]
    fn eui64_follows_rfc_4291() {
        // Tempest's get_ipv6_addr_by_EUI64 and Neutron's netutils give the same.
        let c = Cidr::parse("2003::/64").unwrap();
        let ip = eui64(&c, "fa:16:3e:33:44:55").unwrap();
        assert_eq!(ip_string(ip), "2003::f816:3eff:fe33:4455");
        assert_eq!(eui64(&c, "fa:16:3e:33:44"), None);
    }

    #[test]
    fn overlap_and_containment() {
        let a = Cidr::parse("10.0.0.0/16").unwrap();
        let b = Cidr::parse("10.0.5.0/24").unwrap();
        let c = Cidr::parse("10.1.0.0/24").unwrap();
        assert!(a.overlaps(&b) && b.overlaps(&a));
        assert!(!a.overlaps(&c));
        assert!(a.contains(parse_ip("10.0.255.255").unwrap()));
        assert!(!a.is_host(parse_ip("10.0.255.255").unwrap()));
    }

    #[test]
    fn prefixes_normalise_in_both_families() {
        assert_eq!(normalize_prefix("10.1.2.3/8", false).unwrap(), "10.0.0.0/8");
        assert_eq!(
            normalize_prefix("2001:db8::1/32", true).unwrap(),
            "2001:db8::/32"
        );
        assert_eq!(normalize_prefix("::/0", true).unwrap(), "::/0");
        assert!(normalize_prefix("10.0.0.0/8", true).is_err());
        assert_eq!(family_of("10.0.0.0/8"), Some(true));
        assert_eq!(family_of("fe80::/64"), Some(false));
        assert_eq!(family_of("x"), None);
    }
}
