//! External events (Nova's `os-server-external-events`): what the network (or volume) service
//! tells the compute service about a server, and what Shoal does with each.
//!
//! Nova hands every accepted event to the compute manager of the server's host. Shoal's agents
//! need none of them: a spawn waits on the port rows the network agent writes (Nova waits for
//! `network-vif-plugged`), and the domain's NICs follow the server row. What Nova's manager
//! does for `network-changed` (refresh the instance's network info cache from Neutron) Shoal
//! does where the request lands, in the same write that records the event: the server row's
//! ports are its network info cache. Every accepted event goes into the server's action log.

use std::collections::BTreeMap;

use shoal_state::records::PortRecord;

use crate::server::{ActionEvent, ServerRecord};

/// Nova's event names (`InstanceExternalEvent`'s `name` enum).
pub const NAMES: &[&str] = &[
    "network-changed",
    "network-vif-plugged",
    "network-vif-unplugged",
    "network-vif-deleted",
    "volume-extended",
    "power-update",
    "accelerator-request-bound",
    "volume-reimaged",
];

/// Nova's event statuses; `completed` when the caller names none.
pub const STATUSES: &[&str] = &["failed", "completed", "in-progress"];

/// Records an accepted event in the server's action log: an action named after the event,
/// with one finished event carrying the tag and the status the caller gave.
pub fn record(
    r: &mut ServerRecord,
    name: &str,
    tag: Option<&str>,
    status: &str,
    request_id: &str,
    user_id: &str,
    now: &str,
) {
    r.record_action(name, request_id, user_id, now);
    if let Some(a) = r.actions.last_mut() {
        a.events.push(ActionEvent {
            event: match tag {
                Some(t) => format!("external_event {name}:{t}"),
                None => format!("external_event {name}"),
            },
            start_time: now.to_owned(),
            finish_time: Some(now.to_owned()),
            result: Some(
                if status == "failed" {
                    "Error"
                } else {
                    "Success"
                }
                .to_owned(),
            ),
        });
    }
}

/// `network-changed`: the server's ports (its network info cache) refreshed from the port rows
/// `ports` holds, only the port named by `tag` when there is one. A port whose row is gone is
/// left as it is (Neutron sends `network-vif-deleted` for it). Returns whether anything changed.
pub fn refresh_ports(
    r: &mut ServerRecord,
    tag: Option<&str>,
    ports: &BTreeMap<String, PortRecord>,
) -> bool {
    let mut changed = false;
    for p in &mut r.ports {
        if tag.is_some_and(|t| t != p.port_id) {
            continue;
        }
        let Some(row) = ports.get(&p.port_id) else {
            continue;
        };
        let ips: Vec<String> = row.fixed_ips.iter().map(|f| f.ip_address.clone()).collect();
        if p.ips != ips || p.mac != row.mac_address {
            p.ips = ips;
            p.mac = row.mac_address.clone();
            changed = true;
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::tests::record as server;
    use crate::server::ServerPort;
    use shoal_state::records::FixedIp;

    #[test]
    fn events_go_into_the_action_log() {
        let mut r = server();
        record(
            &mut r,
            "network-changed",
            Some("port-1"),
            "completed",
            "req-1",
            "nova",
            "t",
        );
        let a = r.actions.last().unwrap();
        assert_eq!(a.action, "network-changed");
        assert_eq!(a.request_id, "req-1");
        assert_eq!(a.events[0].event, "external_event network-changed:port-1");
        assert_eq!(a.events[0].result.as_deref(), Some("Success"));
        record(
            &mut r,
            "network-vif-plugged",
            None,
            "failed",
            "req-2",
            "nova",
            "t",
        );
        let a = r.actions.last().unwrap();
        assert_eq!(a.events[0].event, "external_event network-vif-plugged");
        assert_eq!(a.events[0].result.as_deref(), Some("Error"));
    }

    #[test]
    fn network_changed_refreshes_the_named_port_from_its_row() {
        let mut r = server();
        for id in ["p1", "p2"] {
            r.ports.push(ServerPort {
                port_id: id.into(),
                network_id: "n".into(),
                network_name: "net".into(),
                mac: "fa:16:3e:00:00:01".into(),
                ips: vec!["10.0.0.5".into()],
                mtu: 1450,
                created: true,
            });
        }
        let row = |ip: &str| {
            let mut p: PortRecord = serde_json::from_value(serde_json::json!({
                "id": "x", "project_id": "p", "network_id": "n", "name": "",
                "mac_address": "fa:16:3e:00:00:01", "fixed_ips": [],
                "device_id": "", "device_owner": "", "binding_host_id": "",
                "binding_vif_type": "unbound", "binding_vnic_type": "normal",
                "security_groups": [], "port_security_enabled": true,
                "allowed_address_pairs": [], "admin_state_up": true, "status": "DOWN",
                "created_at": 0, "updated_at": 0, "revision_number": 1
            }))
            .unwrap();
            p.fixed_ips = vec![FixedIp {
                subnet_id: "s".into(),
                ip_address: ip.into(),
            }];
            p
        };
        let rows: BTreeMap<String, PortRecord> = [
            ("p1".to_owned(), row("10.0.0.9")),
            ("p2".to_owned(), row("10.0.0.7")),
        ]
        .into();
        assert!(refresh_ports(&mut r, Some("p2"), &rows));
        assert_eq!(r.ports[0].ips, ["10.0.0.5"]);
        assert_eq!(r.ports[1].ips, ["10.0.0.7"]);
        assert!(refresh_ports(&mut r, None, &rows));
        assert_eq!(r.ports[0].ips, ["10.0.0.9"]);
        assert!(!refresh_ports(&mut r, None, &rows));
        assert!(!refresh_ports(&mut r, Some("p3"), &BTreeMap::new()));
    }
}
