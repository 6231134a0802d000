//! A server's NICs as its port, network and subnet rows say now: the one lookup behind
//! `network_data.json`, for the config drive (built by the agent at spawn) and for the
//! metadata service (`node/src/metadata.rs`, per request).
//!
//! The network service owns the `networks` and `subnets` records; this reads only the fields
//! it needs, through views of its own, so the compute service does not import the network
//! service (docs/architecture.md). Ports are the shared `shoal_state::records::PortRecord`.

use std::net::Ipv4Addr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use shoal_state::records::PortRecord;
use shoal_state::{tables, StateError, Store, Table};

use crate::metadata::{Nic, SubnetAddress};
use crate::server::ServerRecord;

/// What the lookup reads of a `networks` row.
#[derive(Debug, Deserialize, Serialize)]
struct NetworkView {
    #[serde(default)]
    mtu: Option<u32>,
}

/// What the lookup reads of a `subnets` row.
#[derive(Debug, Deserialize, Serialize)]
struct SubnetView {
    cidr: String,
    #[serde(default)]
    gateway_ip: Option<String>,
    #[serde(default)]
    dns_nameservers: Vec<String>,
    #[serde(default)]
    host_routes: Vec<RouteView>,
}

#[derive(Debug, Deserialize, Serialize)]
struct RouteView {
    destination: String,
    nexthop: String,
}

/// `a.b.c.d/len` with `len` at most 32.
pub fn parse_cidr(cidr: &str) -> Option<(Ipv4Addr, u8)> {
    let (net, len) = cidr.split_once('/')?;
    let len: u8 = len.parse().ok().filter(|l| *l <= 32)?;
    Some((net.parse().ok()?, len))
}

/// The server's NICs, in the order of its ports. `known` is a port the caller has already
/// read (the metadata service's asking port), used instead of reading it again. A port or
/// subnet gone meanwhile is left out; a network gone keeps the MTU the server row recorded.
pub async fn nics(
    store: Arc<dyn Store>,
    server: &ServerRecord,
    known: Option<PortRecord>,
) -> Result<Vec<Nic>, StateError> {
    let ports: Table<PortRecord> = Table::new(store.clone(), tables::PORTS);
    let networks: Table<NetworkView> = Table::new(store.clone(), tables::NETWORKS);
    let subnets: Table<SubnetView> = Table::new(store, tables::SUBNETS);
    let mut known = known;
    let mut nics = Vec::with_capacity(server.ports.len());
    for sp in &server.ports {
        let port = match known.take_if(|p| p.id == sp.port_id) {
            Some(p) => p,
            None => match ports.get(&sp.port_id).await? {
                Some(p) => p.value,
                None => continue,
            },
        };
        let mtu = networks
            .get(&port.network_id)
            .await?
            .and_then(|n| n.value.mtu)
            .unwrap_or(sp.mtu);
        let mut addresses = Vec::new();
        for f in &port.fixed_ips {
            let (Ok(address), Some(subnet)) = (
                f.ip_address.parse::<Ipv4Addr>(),
                subnets.get(&f.subnet_id).await?,
            ) else {
                continue;
            };
            let s = subnet.value;
            let Some((_, prefix_len)) = parse_cidr(&s.cidr) else {
                continue;
            };
            addresses.push(SubnetAddress {
                subnet_id: f.subnet_id.clone(),
                address,
                prefix_len,
                gateway: s.gateway_ip.as_deref().and_then(|g| g.parse().ok()),
                host_routes: s
                    .host_routes
                    .iter()
                    .filter_map(|r| {
                        let (dest, len) = parse_cidr(&r.destination)?;
                        Some((dest, len, r.nexthop.parse().ok()?))
                    })
                    .collect(),
                dns_nameservers: s.dns_nameservers,
            });
        }
        nics.push(Nic {
            device: crate::domain::tap_name(&port.id),
            port_id: port.id,
            mac: port.mac_address,
            network_id: port.network_id,
            mtu,
            // The agent binds the port with vif type `tap` before the guest runs.
            vif_type: match port.binding_vif_type.as_str() {
                "" | "unbound" => "tap".to_owned(),
                t => t.to_owned(),
            },
            addresses,
        });
    }
    Ok(nics)
}

#[cfg(test)]
mod tests {
    use shoal_state::State;

    use super::*;
    use crate::server::ServerPort;

    fn port(id: &str, network: &str, ips: &[(&str, &str)]) -> PortRecord {
        let fixed: Vec<_> = ips
            .iter()
            .map(|(subnet, ip)| serde_json::json!({"subnet_id": subnet, "ip_address": ip}))
            .collect();
        serde_json::from_value(serde_json::json!({
            "id": id, "project_id": "p1", "network_id": network, "name": "",
            "mac_address": format!("fa:16:3e:00:00:{}", &id[id.len() - 2..]),
            "fixed_ips": fixed, "device_id": "d", "device_owner": "compute:nova",
            "binding_host_id": "node1", "binding_vif_type": "", "binding_vnic_type": "normal",
            "security_groups": [], "port_security_enabled": true, "allowed_address_pairs": [],
            "admin_state_up": true, "status": "ACTIVE", "created_at": 0, "updated_at": 0,
            "revision_number": 1
        }))
        .unwrap()
    }

    fn server_port(id: &str, network: &str, mtu: u32) -> ServerPort {
        ServerPort {
            port_id: id.into(),
            network_id: network.into(),
            network_name: network.into(),
            mac: String::new(),
            ips: Vec::new(),
            mtu,
            created: true,
        }
    }

    /// The NICs follow the server's ports: the port the caller holds is used as it is, the
    /// others are read; the network's MTU wins over the one the server recorded, which stays
    /// when the network row is gone; a subnet or port that is gone is left out; an unbound
    /// port reports vif type `tap`.
    #[tokio::test]
    async fn nics_come_from_the_rows_as_they_are_now() {
        let state = State::in_memory();
        let put = |table: &'static str, key: &str, v: serde_json::Value| {
            let t = state.table::<serde_json::Value>(table);
            let key = key.to_owned();
            async move { t.put(&key, &v).await.unwrap() }
        };
        put(tables::NETWORKS, "net-1", serde_json::json!({"mtu": 1400})).await;
        put(
            tables::SUBNETS,
            "sub-1",
            serde_json::json!({"cidr": "10.0.0.0/24", "gateway_ip": "10.0.0.1",
                "dns_nameservers": ["10.0.0.2"],
                "host_routes": [{"destination": "192.168.0.0/16", "nexthop": "10.0.0.9"}]}),
        )
        .await;
        let p2 = port(
            "port-02",
            "net-2",
            &[("sub-1", "10.0.0.7"), ("sub-gone", "10.1.0.7")],
        );
        state
            .table::<PortRecord>(tables::PORTS)
            .put("port-02", &p2)
            .await
            .unwrap();
        let mut server = crate::metadata::tests::server();
        server.ports = vec![
            server_port("port-01", "net-1", 1450),
            server_port("port-02", "net-2", 1450),
            server_port("port-03", "net-1", 1450),
        ];
        // port-01 is not in the table: only the caller's copy knows it.
        let known = port("port-01", "net-1", &[("sub-1", "10.0.0.5")]);
        let got = nics(state.store().clone(), &server, Some(known))
            .await
            .unwrap();
        assert_eq!(
            got.iter().map(|n| n.port_id.as_str()).collect::<Vec<_>>(),
            vec!["port-01", "port-02"]
        );
        assert_eq!((got[0].mtu, got[1].mtu), (1400, 1450));
        assert_eq!(got[0].vif_type, "tap");
        assert_eq!(got[0].device, crate::domain::tap_name("port-01"));
        let a = &got[1].addresses;
        assert_eq!(
            a.len(),
            1,
            "the address on a subnet that is gone is left out"
        );
        assert_eq!(a[0].address, Ipv4Addr::new(10, 0, 0, 7));
        assert_eq!(a[0].prefix_len, 24);
        assert_eq!(a[0].gateway, Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(
            a[0].host_routes,
            vec![(
                Ipv4Addr::new(192, 168, 0, 0),
                16,
                Ipv4Addr::new(10, 0, 0, 9)
            )]
        );
        assert_eq!(a[0].dns_nameservers, vec!["10.0.0.2"]);
        // Without the caller's copy, port-01 is read, and it is not in the table.
        let got = nics(state.store().clone(), &server, None).await.unwrap();
        assert_eq!(got.len(), 1);
    }

    #[test]
    fn cidrs_parse() {
        assert_eq!(
            parse_cidr("10.0.0.0/24"),
            Some((Ipv4Addr::new(10, 0, 0, 0), 24))
        );
        assert_eq!(parse_cidr("10.0.0.0/33"), None);
        assert_eq!(parse_cidr("10.0.0.0"), None);
        assert_eq!(parse_cidr("10.0.0/8"), None);
    }
}
