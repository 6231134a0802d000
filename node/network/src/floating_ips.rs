//! Floating IPs: an address of an external network, held by a port of its own
//! (`network:floatingip`), that may be associated with a fixed address of a tenant port reachable
//! from that network through a router.
//!
//! A create is the port create loop with the floating IP's row, its usage row and (when it comes
//! with a port) its association in the same transaction, checked against the `floatingip` quota.
//! An association carries preconditions on what makes the port reachable (the port, the router,
//! the router's interface on the port's subnet, and the absence of the `network_deleting` marks
//! that removing the router, its gateway or the interface writes first), and claims a
//! `floating_ip_bindings/{network}/{port}/{address}` row, so one fixed address gets at most one
//! floating IP per external network whichever node serves the requests.

use serde::Deserialize;
use shoal_state::records::PortRecord;
use shoal_state::{tables, Expect, Table, Txn};

use crate::ip::{family_of, parse_ip, shown};
use crate::networks::deleting_key;
use crate::ports::ServicePort;
use crate::quotas::{count_in, uncount_in};
use crate::records::FloatingIpRecord;
use crate::routers::{bad_request, is_interface_of, FLOATING_IP_OWNER};
use crate::{
    check_tags, check_text, new_id, now_secs, nullable, Caller, FixedIpRequest, NetResult,
    NetworkError, NetworkService, Resource, Revisioned,
};

/// Rounds a floating IP write makes when something it depends on moved under it.
const FIP_ROUNDS: u32 = 20;

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FloatingIpCreate {
    pub floating_network_id: Option<String>,
    pub floating_ip_address: Option<String>,
    pub subnet_id: Option<String>,
    pub port_id: Option<String>,
    pub fixed_ip_address: Option<String>,
    pub description: Option<String>,
    pub tags: Option<Vec<String>>,
    pub project_id: Option<String>,
    pub tenant_id: Option<String>,
    // Accepted so that a request using them gets a clear answer rather than "unrecognized".
    pub qos_policy_id: Option<serde_json::Value>,
    pub dns_name: Option<serde_json::Value>,
    pub dns_domain: Option<serde_json::Value>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FloatingIpUpdate {
    /// Absent: unchanged; `null`: disassociate; an id: associate with that port.
    #[serde(default, deserialize_with = "nullable")]
    pub port_id: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    pub fixed_ip_address: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    pub description: Option<Option<String>>,
    pub qos_policy_id: Option<serde_json::Value>,
}

/// What associating a floating IP with a port depends on.
#[derive(Debug, Clone)]
struct Association {
    port_id: String,
    fixed_ip: String,
    router_id: String,
    interface_id: String,
    binding: String,
}

impl Association {
    /// Adds the association's preconditions and its binding row (for floating IP `fip`).
    fn guard(&self, txn: Txn, fip: &str) -> Txn {
        txn.when(tables::PORTS, &self.port_id, Expect::Present)
            .when(tables::ROUTERS, &self.router_id, Expect::Present)
            .when(tables::PORTS, &self.interface_id, Expect::Present)
            .when(
                tables::NETWORK_DELETING,
                &deleting_key("router_gateway", &self.router_id),
                Expect::Absent,
            )
            .when(
                tables::NETWORK_DELETING,
                &deleting_key("router", &self.router_id),
                Expect::Absent,
            )
            .when(
                tables::NETWORK_DELETING,
                &deleting_key("port", &self.interface_id),
                Expect::Absent,
            )
            .when(tables::FLOATING_IP_BINDINGS, &self.binding, Expect::Absent)
            .put(
                tables::FLOATING_IP_BINDINGS,
                &self.binding,
                serde_json::to_vec(fip).expect("a string serialises"),
            )
    }

    fn apply(&self, f: &mut FloatingIpRecord) {
        f.port_id = Some(self.port_id.clone());
        f.fixed_ip_address = Some(self.fixed_ip.clone());
        f.router_id = Some(self.router_id.clone());
    }
}

fn binding_key(network: &str, port: &str, fixed: &str) -> String {
    format!("{network}/{port}/{fixed}")
}

/// The binding row of an associated floating IP.
fn binding_of(f: &FloatingIpRecord) -> Option<String> {
    Some(binding_key(
        &f.floating_network_id,
        f.port_id.as_deref()?,
        f.fixed_ip_address.as_deref()?,
    ))
}

fn clear_association(f: &mut FloatingIpRecord) {
    f.port_id = None;
    f.fixed_ip_address = None;
    f.router_id = None;
}

fn sees_fip(caller: &Caller, f: &FloatingIpRecord) -> bool {
    caller.admin || caller.owns(&f.project_id)
}

fn unsupported(value: Option<&serde_json::Value>, attr: &str) -> NetResult<()> {
    if value.is_some_and(|v| !v.is_null() && *v != serde_json::json!("")) {
        return Err(NetworkError::bad(format!(
            "{attr} is not supported by Shoal's network service"
        )));
    }
    Ok(())
}

impl NetworkService {
    pub(crate) fn floating_ips(&self) -> Table<FloatingIpRecord> {
        self.state.table(tables::FLOATING_IPS)
    }

    pub async fn floating_ip(&self, caller: &Caller, id: &str) -> NetResult<FloatingIpRecord> {
        self.barrier().await?;
        match self.floating_ips().get(id).await? {
            Some(f) if sees_fip(caller, &f.value) => Ok(f.value),
            _ => Err(NetworkError::not_found(Resource::FloatingIp, id)),
        }
    }

    pub async fn list_floating_ips(&self, caller: &Caller) -> NetResult<Vec<FloatingIpRecord>> {
        self.barrier().await?;
        Ok(self
            .floating_ips()
            .list("")
            .await?
            .into_values()
            .filter(|f| sees_fip(caller, f))
            .collect())
    }

    /// The floating IPs associated through router `router`.
    pub(crate) async fn floating_ips_via(
        &self,
        router: &str,
    ) -> NetResult<impl Iterator<Item = FloatingIpRecord> + '_> {
        let router = router.to_owned();
        Ok(self
            .floating_ips()
            .list("")
            .await?
            .into_values()
            .filter(move |f| f.router_id.as_deref() == Some(router.as_str())))
    }

    /// Checks that port `port_id` can take a floating IP of `network` for `project` and finds
    /// the router that reaches it (Neutron's `_get_assoc_data`).
    async fn association(
        &self,
        caller: &Caller,
        project: &str,
        network: &str,
        port_id: &str,
        fixed: Option<&str>,
    ) -> NetResult<Association> {
        let port = self.port(caller, port_id).await?;
        if !caller.admin && port.project_id != project {
            return Err(bad_request(
                "floatingip",
                format!(
                    "Cannot process floating IP association with Port {port_id}, since that port \
                     is owned by a different tenant"
                ),
            ));
        }
        let v4: Vec<_> = port
            .fixed_ips
            .iter()
            .filter(|f| family_of(&f.ip_address) == Some(true))
            .collect();
        let chosen = match fixed {
            Some(ip) => v4.iter().find(|f| f.ip_address == ip).ok_or_else(|| {
                bad_request(
                    "floatingip",
                    format!("Port {port_id} does not have fixed ip {}", shown(ip)),
                )
            })?,
            None => match v4.as_slice() {
                [one] => one,
                [] => {
                    return Err(bad_request(
                        "floatingip",
                        format!("Port {port_id} does not have any IPv4 address"),
                    ))
                }
                _ => {
                    return Err(bad_request(
                        "floatingip",
                        format!(
                            "Port {port_id} has multiple fixed IPv4 addresses.  Must provide a \
                             specific IPv4 address when assigning a floating IP"
                        ),
                    ))
                }
            },
        };
        let unreachable = || NetworkError::Missing {
            kind: "ExternalGatewayForFloatingIPNotFound",
            message: format!(
                "External network {network} is not reachable from subnet {}.  Therefore, cannot \
                 associate Port {port_id} with a Floating IP.",
                chosen.subnet_id
            ),
        };
        if port.network_id == network {
            return Err(unreachable());
        }
        let mut routers: Vec<_> = self
            .routers()
            .list("")
            .await?
            .into_values()
            .filter(|r| r.gateway.as_ref().is_some_and(|g| g.network_id == network))
            .collect();
        routers.sort_by(|a, b| a.id.cmp(&b.id));
        let ports = self
            .ports()
            .list("")
            .await?
            .into_values()
            .collect::<Vec<_>>();
        for r in routers {
            let via = ports.iter().find(|p| {
                is_interface_of(p, &r.id)
                    && p.fixed_ips.iter().any(|f| f.subnet_id == chosen.subnet_id)
            });
            if let Some(i) = via {
                return Ok(Association {
                    port_id: port_id.to_owned(),
                    fixed_ip: chosen.ip_address.clone(),
                    router_id: r.id.clone(),
                    interface_id: i.id.clone(),
                    binding: binding_key(network, port_id, &chosen.ip_address),
                });
            }
        }
        Err(unreachable())
    }

    /// 409 when the fixed address already has a floating IP on the network.
    async fn check_binding_free(&self, a: &Association, fip: Option<&str>) -> NetResult<()> {
        if let Some(other) = self
            .index(tables::FLOATING_IP_BINDINGS)
            .get(&a.binding)
            .await?
        {
            if Some(other.value.as_str()) != fip {
                let addr = self
                    .floating_ips()
                    .get(&other.value)
                    .await?
                    .map(|f| f.value.floating_ip_address)
                    .unwrap_or_default();
                return Err(NetworkError::conflict(
                    "FloatingIPPortAlreadyAssociated",
                    format!(
                        "Cannot associate floating IP {addr} ({}) with port {} using fixed IP {}, \
                         as that fixed IP already has a floating IP on external network {}.",
                        other.value,
                        a.port_id,
                        a.fixed_ip,
                        a.binding.split('/').next().unwrap_or_default()
                    ),
                ));
            }
        }
        Ok(())
    }

    pub async fn create_floating_ip(
        &self,
        caller: &Caller,
        req: FloatingIpCreate,
    ) -> NetResult<FloatingIpRecord> {
        let project =
            caller.project_for_create("create_floatingip", &req.project_id, &req.tenant_id)?;
        unsupported(req.qos_policy_id.as_ref(), "qos_policy_id")?;
        unsupported(req.dns_name.as_ref(), "dns_name")?;
        unsupported(req.dns_domain.as_ref(), "dns_domain")?;
        let Some(network_id) = req.floating_network_id.clone() else {
            return Err(NetworkError::bad(
                "Invalid input for floating_network_id. Reason: a floating_network_id is required.",
            ));
        };
        if req.floating_ip_address.is_some() && !caller.admin {
            return Err(NetworkError::policy(
                "create_floatingip:floating_ip_address",
            ));
        }
        let description = req.description.clone().unwrap_or_default();
        check_text("description", &description)?;
        let tags = check_tags(&req.tags.clone().unwrap_or_default())?;
        let net = self.network(caller, &network_id).await?;
        if !net.external {
            return Err(bad_request(
                "floatingip",
                format!("Network {network_id} is not a valid external network"),
            ));
        }
        if net.subnets.is_empty() {
            return Err(bad_request(
                "floatingip",
                format!("Network {network_id} has no subnet to take a floating IP address from"),
            ));
        }
        if let Some(sid) = &req.subnet_id {
            if !net.subnets.contains(sid) {
                return Err(bad_request(
                    "floatingip",
                    format!("Subnet {} is not on network {network_id}", shown(sid)),
                ));
            }
        }
        if let Some(ip) = &req.floating_ip_address {
            let addr = parse_ip(ip).map_err(|m| {
                NetworkError::bad(format!(
                    "Invalid input for floating_ip_address. Reason: {m}."
                ))
            })?;
            if !crate::ip::is_v4(addr) {
                return Err(NetworkError::bad(format!(
                    "Invalid input for floating_ip_address. Reason: '{}' is not an IPv4 \
                     address: floating IPs are IPv4.",
                    shown(ip)
                )));
            }
        }
        if req.fixed_ip_address.is_some() && req.port_id.is_none() {
            return Err(bad_request(
                "floatingip",
                "fixed_ip_address cannot be specified without a port_id",
            ));
        }
        let fixed_ips = match (&req.subnet_id, &req.floating_ip_address) {
            (None, None) => None,
            (s, ip) => Some(vec![FixedIpRequest {
                subnet_id: s.clone(),
                ip_address: ip.clone(),
            }]),
        };
        let now = now_secs();
        let id = new_id();
        let base = FloatingIpRecord {
            id: id.clone(),
            project_id: project.clone(),
            description,
            floating_network_id: network_id.clone(),
            floating_ip_address: String::new(),
            floating_port_id: String::new(),
            port_id: None,
            fixed_ip_address: None,
            router_id: None,
            status: "DOWN".into(),
            tags,
            created_at: now,
            updated_at: now,
            revision_number: 1,
        };
        for _ in 0..FIP_ROUNDS {
            let assoc = match &req.port_id {
                Some(pid) => {
                    let a = self
                        .association(
                            caller,
                            &project,
                            &network_id,
                            pid,
                            req.fixed_ip_address.as_deref(),
                        )
                        .await?;
                    self.check_binding_free(&a, None).await?;
                    Some(a)
                }
                None => None,
            };
            let record = |p: &PortRecord| {
                let mut f = base.clone();
                f.floating_port_id = p.id.clone();
                f.floating_ip_address = p
                    .fixed_ips
                    .first()
                    .map(|x| x.ip_address.clone())
                    .unwrap_or_default();
                if let Some(a) = &assoc {
                    a.apply(&mut f);
                }
                f
            };
            let table = self.floating_ips();
            let extra = |p: &PortRecord, txn: Txn| {
                let mut txn = txn.when(tables::FLOATING_IPS, &id, Expect::Absent);
                if let Some(a) = &assoc {
                    txn = a.guard(txn, &id);
                }
                let txn = txn.put(tables::FLOATING_IPS, &id, table.encode(&record(p)));
                count_in(txn, &project, "floatingip", &id)
            };
            let spec = ServicePort {
                project: String::new(),
                network_id: network_id.clone(),
                fixed_ips: fixed_ips.clone(),
                device_owner: FLOATING_IP_OWNER,
                device_id: id.clone(),
            };
            if let Some(p) = self
                .create_service_port(spec, Some((&project, "floatingip")), &extra)
                .await?
            {
                return Ok(record(&p));
            }
            // What the association depends on moved: read it all again.
            self.barrier().await?;
        }
        Err(contended(&id))
    }

    pub async fn update_floating_ip(
        &self,
        caller: &Caller,
        id: &str,
        req: FloatingIpUpdate,
    ) -> NetResult<FloatingIpRecord> {
        let first = self.floating_ip(caller, id).await?;
        if !caller.may_change(&first.project_id) {
            return Err(NetworkError::policy("update_floatingip"));
        }
        unsupported(req.qos_policy_id.as_ref(), "qos_policy_id")?;
        if let Some(Some(d)) = &req.description {
            check_text("description", d)?;
        }
        let fixed = req.fixed_ip_address.clone().flatten();
        if fixed.is_some() && !matches!(req.port_id, Some(Some(_))) {
            return Err(bad_request(
                "floatingip",
                "fixed_ip_address cannot be specified without a port_id",
            ));
        }
        for _ in 0..FIP_ROUNDS {
            self.barrier().await?;
            let Some(v) = self.floating_ips().get(id).await? else {
                return Err(NetworkError::not_found(Resource::FloatingIp, id));
            };
            let mut f = v.value;
            let old_binding = binding_of(&f);
            let assoc = match &req.port_id {
                Some(Some(pid)) => {
                    let a = self
                        .association(
                            caller,
                            &f.project_id,
                            &f.floating_network_id,
                            pid,
                            fixed.as_deref(),
                        )
                        .await?;
                    self.check_binding_free(&a, Some(id)).await?;
                    Some(a)
                }
                _ => None,
            };
            let mut txn = Txn::new().when(tables::FLOATING_IPS, id, Expect::Revision(v.revision));
            if req.port_id.is_some() {
                if let Some(b) = &old_binding {
                    txn = txn.delete(tables::FLOATING_IP_BINDINGS, b);
                }
                clear_association(&mut f);
            }
            if let Some(a) = &assoc {
                if old_binding.as_deref() == Some(a.binding.as_str()) {
                    // The same association again: keep the binding row as it is.
                    txn = Txn::new().when(tables::FLOATING_IPS, id, Expect::Revision(v.revision));
                    txn = txn.when(tables::PORTS, &a.port_id, Expect::Present).when(
                        tables::ROUTERS,
                        &a.router_id,
                        Expect::Present,
                    );
                } else {
                    txn = a.guard(txn, id);
                }
                a.apply(&mut f);
            }
            if let Some(d) = &req.description {
                f.description = d.clone().unwrap_or_default();
            }
            f.bump(now_secs());
            let txn = txn.put(tables::FLOATING_IPS, id, self.floating_ips().encode(&f));
            if self.state.write(tables::FLOATING_IPS, txn).await?.succeeded {
                return Ok(f);
            }
        }
        Err(contended(id))
    }

    /// Deletes a floating IP; its address goes back to the external network's pool in the same
    /// transaction.
    pub async fn delete_floating_ip(&self, caller: &Caller, id: &str) -> NetResult<()> {
        let first = self.floating_ip(caller, id).await?;
        if !caller.may_change(&first.project_id) {
            return Err(NetworkError::policy("delete_floatingip"));
        }
        shoal_state::retry(
            tables::FLOATING_IPS,
            id,
            shoal_state::DEFAULT_ATTEMPTS,
            || async {
                self.barrier().await?;
                let Some(v) = self.floating_ips().get(id).await? else {
                    return Err(NetworkError::not_found(Resource::FloatingIp, id));
                };
                let f = v.value;
                let mut txn = Txn::new()
                    .when(tables::FLOATING_IPS, id, Expect::Revision(v.revision))
                    .delete(tables::FLOATING_IPS, id);
                if let Some(b) = binding_of(&f) {
                    txn = txn.delete(tables::FLOATING_IP_BINDINGS, &b);
                }
                if let Some(p) = self.ports().get(&f.floating_port_id).await? {
                    txn = txn.when(tables::PORTS, &p.value.id, Expect::Revision(p.revision));
                    txn = self.without_port(txn, &p.value);
                }
                let txn = uncount_in(txn, &f.project_id, "floatingip", id);
                Ok(self
                    .state
                    .write(tables::FLOATING_IPS, txn)
                    .await?
                    .succeeded
                    .then_some(()))
            },
        )
        .await
    }

    /// If port `p` holds the address of an unassociated floating IP (or of none left), adds the
    /// removal of both to `txn`; `None` when the port is anything else.
    pub(crate) async fn releasable_floating_ip(
        &self,
        txn: Txn,
        p: &shoal_state::Versioned<PortRecord>,
    ) -> NetResult<Option<Txn>> {
        if p.value.device_owner != FLOATING_IP_OWNER {
            return Ok(None);
        }
        let mut txn = txn.when(tables::PORTS, &p.value.id, Expect::Revision(p.revision));
        let fip_id = &p.value.device_id;
        match self.floating_ips().get(fip_id).await? {
            Some(f) if f.value.port_id.is_some() => return Ok(None),
            Some(f) => {
                txn = txn
                    .when(tables::FLOATING_IPS, fip_id, Expect::Revision(f.revision))
                    .delete(tables::FLOATING_IPS, fip_id);
                txn = uncount_in(txn, &f.value.project_id, "floatingip", fip_id);
            }
            None => {}
        }
        Ok(Some(self.without_port(txn, &p.value)))
    }

    /// Adds to `txn` the disassociation of every floating IP associated with port `port`.
    pub(crate) async fn disassociate_in(&self, mut txn: Txn, port: &str) -> NetResult<Txn> {
        for (key, v) in self.floating_ips().list("").await?.rows {
            let mut f = v.value;
            if f.port_id.as_deref() != Some(port) {
                continue;
            }
            if let Some(b) = binding_of(&f) {
                txn = txn.delete(tables::FLOATING_IP_BINDINGS, &b);
            }
            clear_association(&mut f);
            f.bump(now_secs());
            txn = txn
                .when(tables::FLOATING_IPS, &key, Expect::Revision(v.revision))
                .put(tables::FLOATING_IPS, &key, self.floating_ips().encode(&f));
        }
        Ok(txn)
    }

    /// Disassociates the floating IPs still associated with port `port` (deleted).
    pub(crate) async fn disassociate_port(&self, port: &str) -> NetResult<()> {
        shoal_state::retry(
            tables::FLOATING_IPS,
            port,
            shoal_state::DEFAULT_ATTEMPTS,
            || async {
                let txn = self.disassociate_in(Txn::new(), port).await?;
                if txn.ops.is_empty() {
                    return Ok(Some(()));
                }
                let done = self.state.write(tables::FLOATING_IPS, txn).await?.succeeded;
                if !done {
                    self.barrier().await?;
                }
                Ok(done.then_some(()))
            },
        )
        .await
    }
}

fn contended(id: &str) -> NetworkError {
    shoal_state::StateError::Contended {
        table: tables::FLOATING_IPS,
        key: id.to_owned(),
        attempts: FIP_ROUNDS,
    }
    .into()
}
