//! Records that more than one service reads and writes, so they cannot live with one service.
//!
//! A port belongs to the network service (which creates it, allocates its addresses and MAC
//! and deletes it), but the compute agent binds it: it sets `device_id`, `device_owner` and
//! `binding_host_id` with a compare-and-set through `Table<PortRecord>`, and the network agent
//! watches the table to program the datapath. Field names are stored in every row: they do not
//! change once released; new fields come with `#[serde(default)]`.

use serde::{Deserialize, Serialize};

/// One address of a port: which subnet it comes from and the address itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FixedIp {
    pub subnet_id: String,
    /// Dotted IPv4 address, without a prefix length.
    pub ip_address: String,
}

/// Another address (and optionally MAC) the port may send from, as Neutron's
/// `allowed_address_pairs`: an address or a CIDR.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressPair {
    pub ip_address: String,
    /// The port's own MAC when the request gave none.
    pub mac_address: String,
}

/// A DHCP option the port's VM gets beyond what its subnet gives (Neutron's
/// `extra_dhcp_opts`): an option name as Neutron's DHCP backends know it (`tftp-server`,
/// `bootfile-name`, ...), its value as text, and the family it is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtraDhcpOpt {
    pub opt_name: String,
    pub opt_value: String,
    pub ip_version: u8,
}

/// A Neutron port, keyed by its id in table `ports`.
///
/// Who writes what:
/// - the network service creates and deletes the row, and owns `mac_address`, `fixed_ips`
///   (their `ip_allocations` and `port_macs` rows are written in the same transaction) and
///   `network_id`;
/// - the compute agent sets `device_id`, `device_owner` and `binding_host_id` when it plugs a
///   port into an instance and clears them when it unplugs it;
/// - the network agent sets `binding_vif_type` and `status` (`ACTIVE` once the datapath is
///   programmed, `DOWN` otherwise).
///
/// Every writer goes through a compare-and-set on the row's revision and calls [`touch`]
/// (`PortRecord::touch`) so that `revision_number` and `updated_at` move with each change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRecord {
    pub id: String,
    pub project_id: String,
    pub network_id: String,
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// `fa:16:3e:xx:xx:xx` unless an administrator chose another; unique in the cluster.
    pub mac_address: String,
    pub fixed_ips: Vec<FixedIp>,
    /// The instance (or router, DHCP server) using the port; empty when unused.
    pub device_id: String,
    /// `compute:<zone>` for an instance's port, `network:...` for the network's own.
    pub device_owner: String,
    /// The node the port is bound to; empty when unbound.
    pub binding_host_id: String,
    /// `unbound` until the network agent binds it.
    pub binding_vif_type: String,
    /// `normal` (a tap device) unless the request asked for another.
    pub binding_vnic_type: String,
    /// Security group ids; empty when port security is off.
    pub security_groups: Vec<String>,
    pub port_security_enabled: bool,
    pub allowed_address_pairs: Vec<AddressPair>,
    pub admin_state_up: bool,
    /// `DOWN` until the datapath serves the port, then `ACTIVE`.
    pub status: String,
    #[serde(default)]
    pub tags: Vec<String>,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    pub updated_at: u64,
    /// Neutron's `revision_number`: 1 at creation, one more at every change.
    pub revision_number: u64,
    #[serde(default)]
    pub extra_dhcp_opts: Vec<ExtraDhcpOpt>,
}

/// The host-side device of a VM's port: `tap` + the port id cut to 14 characters, as Nova and
/// Neutron name it. The compute agent creates it; the network agent programs it.
pub fn tap_device(port_id: &str) -> String {
    format!("tap{}", &port_id[..port_id.len().min(11)])
}

impl PortRecord {
    /// Marks a change made at `now` (seconds since the epoch).
    pub fn touch(&mut self, now: u64) {
        self.revision_number += 1;
        self.updated_at = now;
    }

    /// Whether an instance (or anything else) holds the port.
    pub fn is_bound(&self) -> bool {
        !self.device_id.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stored form is the record's field names: a row written today decodes tomorrow.
    #[test]
    fn port_rows_round_trip_and_keep_their_field_names() {
        let p = PortRecord {
            id: "p".into(),
            project_id: "proj".into(),
            network_id: "n".into(),
            name: "web".into(),
            description: String::new(),
            mac_address: "fa:16:3e:00:00:01".into(),
            fixed_ips: vec![FixedIp {
                subnet_id: "s".into(),
                ip_address: "10.0.0.5".into(),
            }],
            device_id: String::new(),
            device_owner: String::new(),
            binding_host_id: String::new(),
            binding_vif_type: "unbound".into(),
            binding_vnic_type: "normal".into(),
            security_groups: vec!["sg".into()],
            port_security_enabled: true,
            allowed_address_pairs: vec![],
            admin_state_up: true,
            status: "DOWN".into(),
            tags: vec![],
            extra_dhcp_opts: vec![],
            created_at: 1,
            updated_at: 1,
            revision_number: 1,
        };
        let v = serde_json::to_value(&p).unwrap();
        for field in [
            "device_id",
            "device_owner",
            "binding_host_id",
            "binding_vif_type",
            "fixed_ips",
            "mac_address",
            "revision_number",
        ] {
            assert!(v.get(field).is_some(), "{field} missing from {v}");
        }
        let back: PortRecord = serde_json::from_value(v).unwrap();
        assert_eq!(back, p);
        let mut q = back;
        q.touch(9);
        assert_eq!((q.revision_number, q.updated_at), (2, 9));
        assert!(!q.is_bound());
    }
}
