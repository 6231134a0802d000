//! The `[network]` section of the node's configuration.

use std::{net::Ipv4Addr, path::PathBuf};

use serde::{Deserialize, Serialize};

/// The largest VXLAN network identifier (24 bits).
pub const MAX_VNI: u32 = (1 << 24) - 1;
/// What VXLAN over IPv4 adds to every frame: outer IPv4 (20) + UDP (8) + VXLAN (8) + inner
/// Ethernet (14) headers.
pub const VXLAN_OVERHEAD: u32 = 50;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// First VXLAN network identifier tenant networks are given (inclusive). Every node must
    /// be configured with the same range; uniqueness holds cluster-wide either way.
    pub vni_first: u32,
    /// Last VXLAN network identifier tenant networks are given (inclusive).
    pub vni_last: u32,
    /// MTU of the underlay network between nodes; VXLAN networks get this minus 50.
    pub underlay_mtu: u32,
    /// Physical networks an administrator may put a `flat` network on; `*` allows any name.
    pub flat_networks: Vec<String>,
    /// The datapath the network agent drives: `ebpf` (XDP + tc), `kernel` (Linux vxlan,
    /// bridge and nftables), or `auto` (eBPF, else the kernel path). The agent runs only when
    /// `underlay_device` and `vtep` are set.
    pub driver: Driver,
    /// The device VXLAN leaves through (the node's underlay).
    pub underlay_device: Option<String>,
    /// This node's VXLAN tunnel address on the underlay; other nodes send to it.
    pub vtep: Option<Ipv4Addr>,
    /// A named network namespace (`ip netns`) holding the underlay and the VMs' taps, when
    /// they are not in the node's own (several nodes on one machine, `shoal dev --netns`).
    pub netns: Option<String>,
    /// bpffs directory for pinned maps and links, so forwarding outlives a restart of the
    /// node; default `/sys/fs/bpf/shoal/<netns, else node name>`.
    pub pin_dir: Option<PathBuf>,
    /// The physical networks this node is attached to, each `physnet:interface` (as
    /// Neutron's `physical_interface_mappings`): a router's gateway and floating IPs on a
    /// flat network of `physnet` go out through that host interface (in `netns`, if set).
    pub physical_interface_mappings: Vec<String>,
    /// How often (milliseconds) the agent plans the whole state without a change: taps appear
    /// and vanish with their VMs without any row changing. 100 to 3,600,000.
    pub resync_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Driver {
    Auto,
    Ebpf,
    Kernel,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            vni_first: 1,
            vni_last: 65_535,
            underlay_mtu: 1500,
            flat_networks: vec!["*".into()],
            driver: Driver::Auto,
            underlay_device: None,
            vtep: None,
            netns: None,
            pin_dir: None,
            physical_interface_mappings: Vec::new(),
            resync_ms: 1000,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetworkConfigError {
    #[error("network.vni_first..vni_last ({first}..{last}) must lie within 1..{MAX_VNI} with first <= last")]
    VniRange { first: u32, last: u32 },
    #[error("network.underlay_mtu {0} must be 1280 to 9216: VXLAN networks get 50 bytes less")]
    Mtu(u32),
    #[error("network.flat_networks entry {0:?} must be 1 to 64 letters, digits, '-', '_' or '*'")]
    FlatNetwork(String),
    #[error("network.underlay_device and network.vtep go together: set both to run the network agent, or neither")]
    HalfUnderlay,
    #[error("network.{field} {value:?} is not a valid device or namespace name (1 to 15 letters, digits, '-', '_', '.')")]
    BadName { field: &'static str, value: String },
    #[error("network.physical_interface_mappings entry {0:?} must be PHYSNET:INTERFACE (a physical network name of 1 to 64 letters, digits, '-' or '_', and an interface name of 1 to 15 letters, digits, '-', '_', '.')")]
    BadMapping(String),
    #[error("network.physical_interface_mappings maps physical network {0:?} twice")]
    DuplicateMapping(String),
    #[error("network.resync_ms {0} must be 100 to 3600000")]
    Resync(u64),
}

fn valid_device(v: &str) -> bool {
    (1..=15).contains(&v.len())
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

impl NetworkConfig {
    pub fn validate(&self) -> Result<(), NetworkConfigError> {
        if self.vni_first == 0 || self.vni_first > self.vni_last || self.vni_last > MAX_VNI {
            return Err(NetworkConfigError::VniRange {
                first: self.vni_first,
                last: self.vni_last,
            });
        }
        if !(1280..=9216).contains(&self.underlay_mtu) {
            return Err(NetworkConfigError::Mtu(self.underlay_mtu));
        }
        for name in &self.flat_networks {
            let ok = (1..=64).contains(&name.len())
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_*".contains(c));
            if !ok {
                return Err(NetworkConfigError::FlatNetwork(name.clone()));
            }
        }
        if !(100..=3_600_000).contains(&self.resync_ms) {
            return Err(NetworkConfigError::Resync(self.resync_ms));
        }
        if self.underlay_device.is_some() != self.vtep.is_some() {
            return Err(NetworkConfigError::HalfUnderlay);
        }
        for (field, value) in [
            ("underlay_device", &self.underlay_device),
            ("netns", &self.netns),
        ] {
            if let Some(v) = value {
                if !valid_device(v) {
                    return Err(NetworkConfigError::BadName {
                        field,
                        value: v.clone(),
                    });
                }
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for entry in &self.physical_interface_mappings {
            let ok = entry.split_once(':').is_some_and(|(physnet, device)| {
                (1..=64).contains(&physnet.len())
                    && physnet
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
                    && valid_device(device)
            });
            if !ok {
                return Err(NetworkConfigError::BadMapping(entry.clone()));
            }
            let physnet = entry.split(':').next().unwrap_or_default();
            if !seen.insert(physnet) {
                return Err(NetworkConfigError::DuplicateMapping(physnet.to_string()));
            }
        }
        Ok(())
    }

    /// The host interface `physical_network` is mapped to on this node, if any.
    pub fn interface_for(&self, physical_network: &str) -> Option<&str> {
        self.physical_interface_mappings
            .iter()
            .filter_map(|m| m.split_once(':'))
            .find(|(p, _)| *p == physical_network)
            .map(|(_, d)| d)
    }

    /// Whether this node runs a network agent (it has an underlay).
    pub fn agent_enabled(&self) -> bool {
        self.underlay_device.is_some() && self.vtep.is_some()
    }

    /// The MTU of a network of `network_type` on this underlay.
    pub fn max_mtu(&self, network_type: &str) -> u32 {
        if network_type == "vxlan" {
            self.underlay_mtu - VXLAN_OVERHEAD
        } else {
            self.underlay_mtu
        }
    }

    pub fn allows_flat(&self, physical_network: &str) -> bool {
        self.flat_networks
            .iter()
            .any(|n| n == "*" || n == physical_network)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_bad_values_do_not() {
        let c = NetworkConfig::default();
        c.validate().unwrap();
        assert_eq!(c.max_mtu("vxlan"), 1450);
        assert_eq!(c.max_mtu("flat"), 1500);
        let bad = NetworkConfig {
            vni_last: MAX_VNI + 1,
            ..c.clone()
        };
        assert!(bad.validate().is_err());
        assert!(NetworkConfig {
            underlay_mtu: 100,
            ..c.clone()
        }
        .validate()
        .is_err());
        assert_eq!(
            NetworkConfig {
                resync_ms: 5,
                ..c.clone()
            }
            .validate(),
            Err(NetworkConfigError::Resync(5))
        );
        assert!(NetworkConfig {
            flat_networks: vec!["a b".into()],
            ..c.clone()
        }
        .validate()
        .is_err());
    }

    /// Mappings name a physical network and a host interface, each once.
    #[test]
    fn physical_interface_mappings() {
        let c = NetworkConfig {
            physical_interface_mappings: vec!["public:eth1".into(), "dmz:bond0.20".into()],
            ..NetworkConfig::default()
        };
        c.validate().unwrap();
        assert_eq!(c.interface_for("public"), Some("eth1"));
        assert_eq!(c.interface_for("dmz"), Some("bond0.20"));
        assert_eq!(c.interface_for("other"), None);
        for bad in [
            "public",
            "public:",
            ":eth1",
            "pub lic:eth1",
            "public:eth1/x",
        ] {
            let e = NetworkConfig {
                physical_interface_mappings: vec![bad.into()],
                ..NetworkConfig::default()
            }
            .validate();
            assert_eq!(e, Err(NetworkConfigError::BadMapping(bad.into())), "{bad}");
        }
        let twice = NetworkConfig {
            physical_interface_mappings: vec!["public:eth1".into(), "public:eth2".into()],
            ..NetworkConfig::default()
        };
        assert_eq!(
            twice.validate(),
            Err(NetworkConfigError::DuplicateMapping("public".into()))
        );
    }
}
