//! IPv4 addresses and prefixes as plain `u32`s, and the checks Neutron makes on them.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// An IPv4 prefix whose host bits are zero (`10.0.0.0/24`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    network: u32,
    prefix: u8,
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

/// Parses a dotted IPv4 address; the error says what was given.
pub fn parse_ip(text: &str) -> Result<u32, String> {
    Ipv4Addr::from_str(text)
        .map(u32::from)
        .map_err(|_| format!("'{}' is not a valid IPv4 address", shown(text)))
}

pub fn ip_string(ip: u32) -> String {
    Ipv4Addr::from(ip).to_string()
}

/// At most 64 characters of user input, escaped, for error messages.
pub fn shown(text: &str) -> String {
    text.chars()
        .take(64)
        .flat_map(char::escape_default)
        .collect()
}

impl Cidr {
    /// Parses `a.b.c.d/n`. Host bits must be zero, as Neutron requires of a subnet's cidr.
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let (net, prefix) = Self::parse_loose(text)?;
        let cidr = Cidr {
            network: net & mask(prefix),
            prefix,
        };
        if cidr.network != net {
            return Err(format!(
                "'{}' isn't a recognized IP subnet cidr, '{cidr}' is recommended",
                shown(text)
            ));
        }
        Ok(cidr)
    }

    /// Parses `a.b.c.d/n` (or a bare address, as `/32`) and clears any host bits.
    pub fn parse_normalized(text: &str) -> Result<Cidr, String> {
        let (net, prefix) = Self::parse_loose(text)?;
        Ok(Cidr {
            network: net & mask(prefix),
            prefix,
        })
    }

    fn parse_loose(text: &str) -> Result<(u32, u8), String> {
        let bad = || {
            format!(
                "'{}' is not a valid IPv4 CIDR (expected a.b.c.d/n with n from 0 to 32)",
                shown(text)
            )
        };
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, p),
            None => (text, "32"),
        };
        let net = Ipv4Addr::from_str(addr).map_err(|_| bad())?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= 32 && !prefix.starts_with('+'))
            .ok_or_else(bad)?;
        Ok((u32::from(net), prefix))
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn first(&self) -> u32 {
        self.network
    }

    pub fn last(&self) -> u32 {
        self.network | !mask(self.prefix)
    }

    pub fn contains(&self, ip: u32) -> bool {
        ip & mask(self.prefix) == self.network
    }

    pub fn overlaps(&self, other: &Cidr) -> bool {
        self.contains(other.first()) || other.contains(self.first())
    }

    /// The addresses a host may hold: all but the network and broadcast addresses, except in
    /// a /31 or /32, where every address is a host (RFC 3021).
    pub fn hosts(&self) -> (u32, u32) {
        if self.prefix >= 31 {
            (self.first(), self.last())
        } else {
            (self.first() + 1, self.last() - 1)
        }
    }

    pub fn is_host(&self, ip: u32) -> bool {
        let (lo, hi) = self.hosts();
        (lo..=hi).contains(&ip)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.network), self.prefix)
    }
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
            "::/0",
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
