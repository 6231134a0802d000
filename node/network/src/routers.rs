//! Routers (Neutron's L3 model): an external gateway on a `router:external` network, interfaces
//! on tenant subnets, and extra routes.
//!
//! A router's interfaces and gateway are ports (`network:router_interface`,
//! `network:router_gateway`, `device_id` = the router) that go through the port create loop, so
//! their addresses come from IPAM like any other port's. Every change of a router's interfaces,
//! gateway or routes rewrites the router row with a compare-and-set on its revision, which
//! serialises the checks that span them (no two interfaces on overlapping subnets, every nexthop
//! on a connected subnet). Removals that floating IPs depend on (an interface, the gateway, the
//! router) first write a `network_deleting` mark that every association has an `Absent`
//! precondition on, then look for users through a read barrier, as network deletes do.
//!
//! This is the model only: the datapath (east-west routing on the sender's node, SNAT and
//! floating IP NAT) does not read it yet.

use std::collections::BTreeSet;

use serde::Deserialize;
use shoal_state::records::{FixedIp, PortRecord};
use shoal_state::{tables, Expect, Txn};

use crate::ip::{family_of, ip_string, parse_ip, shown, Cidr};
use crate::networks::deleting_key;
use crate::ports::ServicePort;
use crate::quotas::{count_in, uncount_in};
use crate::records::{HostRoute, RouterGateway, RouterRecord, SubnetRecord};
use crate::{
    check_tags, check_text, new_id, now_secs, nullable, Caller, FixedIpRequest, NetResult,
    NetworkError, NetworkService, Resource, Revisioned,
};

pub const ROUTER_INTERFACE: &str = "network:router_interface";
pub const ROUTER_GATEWAY: &str = "network:router_gateway";
pub const FLOATING_IP_OWNER: &str = "network:floatingip";

/// Neutron's `max_routes`.
const MAX_ROUTES: usize = 30;
/// Rounds a router change makes when the router row moved under it.
const ROUTER_ROUNDS: u32 = 20;

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayRequest {
    pub network_id: Option<String>,
    pub enable_snat: Option<bool>,
    pub external_fixed_ips: Option<Vec<FixedIpRequest>>,
    pub qos_policy_id: Option<serde_json::Value>,
}

impl GatewayRequest {
    /// Whether the request says anything (`{}` says nothing: no gateway).
    fn names_any(&self) -> bool {
        self.network_id.is_some() || self.enable_snat.is_some() || self.external_fixed_ips.is_some()
    }
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterCreate {
    pub name: Option<String>,
    pub description: Option<String>,
    pub admin_state_up: Option<bool>,
    #[serde(default, deserialize_with = "nullable")]
    pub external_gateway_info: Option<Option<GatewayRequest>>,
    pub distributed: Option<bool>,
    pub ha: Option<bool>,
    pub tags: Option<Vec<String>>,
    pub project_id: Option<String>,
    pub tenant_id: Option<String>,
    // Accepted so that a request using them gets a clear answer rather than "unrecognized".
    pub routes: Option<serde_json::Value>,
    pub availability_zone_hints: Option<Vec<String>>,
    pub flavor_id: Option<serde_json::Value>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterUpdate {
    pub name: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub description: Option<Option<String>>,
    pub admin_state_up: Option<bool>,
    #[serde(default, deserialize_with = "nullable")]
    pub external_gateway_info: Option<Option<GatewayRequest>>,
    #[serde(default, deserialize_with = "nullable")]
    pub routes: Option<Option<Vec<HostRoute>>>,
    pub distributed: Option<bool>,
    pub ha: Option<bool>,
}

/// The body of `add_router_interface` and `remove_router_interface`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterfaceRequest {
    pub subnet_id: Option<String>,
    pub port_id: Option<String>,
}

/// What `add_router_interface` and `remove_router_interface` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceInfo {
    pub router_id: String,
    pub project_id: String,
    pub port_id: String,
    pub network_id: String,
    pub subnet_id: String,
    pub subnet_ids: Vec<String>,
}

/// Neutron's `BadRequest` for a resource: "Bad router request: ...".
pub(crate) fn bad_request(resource: &str, msg: impl std::fmt::Display) -> NetworkError {
    NetworkError::BadRequest {
        kind: "BadRequest",
        message: format!("Bad {resource} request: {msg}."),
    }
}

fn sees_router(caller: &Caller, r: &RouterRecord) -> bool {
    caller.admin || caller.owns(&r.project_id)
}

/// Whether `p` is one of router `router`'s interfaces.
pub(crate) fn is_interface_of(p: &PortRecord, router: &str) -> bool {
    p.device_owner == ROUTER_INTERFACE && p.device_id == router
}

/// Refuses what Shoal's routers do not have: `distributed` and `ha` may only be false, and only
/// admins may name them (Neutron's policy).
fn check_modes(
    caller: &Caller,
    action: &str,
    distributed: Option<bool>,
    ha: Option<bool>,
) -> NetResult<()> {
    for (value, attr) in [(distributed, "distributed"), (ha, "ha")] {
        let Some(v) = value else { continue };
        if !caller.admin {
            return Err(NetworkError::policy(&format!("{action}:{attr}")));
        }
        if v {
            return Err(NetworkError::invalid(format!(
                "{attr} routers are not supported: a Shoal router is one model routed on every node"
            )));
        }
    }
    Ok(())
}

/// Gateway attributes only admins may set, as Neutron's policy has it.
fn check_gateway_policy(caller: &Caller, action: &str, g: &GatewayRequest) -> NetResult<()> {
    if caller.admin {
        return Ok(());
    }
    if g.enable_snat.is_some() {
        return Err(NetworkError::policy(&format!(
            "{action}:external_gateway_info:enable_snat"
        )));
    }
    if g.external_fixed_ips.is_some() {
        return Err(NetworkError::policy(&format!(
            "{action}:external_gateway_info:external_fixed_ips"
        )));
    }
    Ok(())
}

impl NetworkService {
    pub(crate) fn routers(&self) -> shoal_state::Table<RouterRecord> {
        self.state.table(tables::ROUTERS)
    }

    pub async fn router(&self, caller: &Caller, id: &str) -> NetResult<RouterRecord> {
        self.barrier().await?;
        match self.routers().get(id).await? {
            Some(r) if sees_router(caller, &r.value) => Ok(r.value),
            _ => Err(NetworkError::not_found(Resource::Router, id)),
        }
    }

    pub async fn list_routers(&self, caller: &Caller) -> NetResult<Vec<RouterRecord>> {
        self.barrier().await?;
        Ok(self
            .routers()
            .list("")
            .await?
            .into_values()
            .filter(|r| sees_router(caller, r))
            .collect())
    }

    /// Router `id` if `caller` may change it: 404 if it may not see it, 403 otherwise.
    async fn changeable_router(
        &self,
        caller: &Caller,
        id: &str,
        rule: &str,
    ) -> NetResult<RouterRecord> {
        let r = self.router(caller, id).await?;
        if !caller.may_change(&r.project_id) {
            return Err(NetworkError::policy(rule));
        }
        Ok(r)
    }

    /// The interface ports of router `id`.
    pub(crate) async fn interfaces(&self, id: &str) -> NetResult<Vec<PortRecord>> {
        Ok(self
            .ports()
            .list("")
            .await?
            .into_values()
            .filter(|p| is_interface_of(p, id))
            .collect())
    }

    pub async fn create_router(
        &self,
        caller: &Caller,
        req: RouterCreate,
    ) -> NetResult<RouterRecord> {
        let project =
            caller.project_for_create("create_router", &req.project_id, &req.tenant_id)?;
        if req.routes.is_some() {
            return Err(NetworkError::bad("Attribute 'routes' not allowed in POST"));
        }
        if req
            .availability_zone_hints
            .as_ref()
            .is_some_and(|z| !z.is_empty())
        {
            return Err(NetworkError::bad(
                "availability_zone_hints are not supported for routers",
            ));
        }
        if req.flavor_id.as_ref().is_some_and(|f| !f.is_null()) {
            return Err(NetworkError::bad("router flavors are not supported"));
        }
        check_modes(caller, "create_router", req.distributed, req.ha)?;
        let name = req.name.unwrap_or_default();
        check_text("name", &name)?;
        let description = req.description.unwrap_or_default();
        check_text("description", &description)?;
        let tags = check_tags(&req.tags.unwrap_or_default())?;
        // `{}` is no gateway, as `null` is.
        let gateway = req
            .external_gateway_info
            .flatten()
            .filter(GatewayRequest::names_any);
        if let Some(g) = &gateway {
            check_gateway_policy(caller, "create_router", g)?;
            self.check_gateway_network(caller, g).await?;
        }
        let now = now_secs();
        let rec = RouterRecord {
            id: new_id(),
            project_id: project.clone(),
            name,
            description,
            admin_state_up: req.admin_state_up.unwrap_or(true),
            status: "ACTIVE".into(),
            gateway: None,
            routes: Vec::new(),
            tags,
            created_at: now,
            updated_at: now,
            revision_number: 1,
        };
        let txn = Txn::new()
            .when(tables::ROUTERS, &rec.id, Expect::Absent)
            .put(tables::ROUTERS, &rec.id, self.routers().encode(&rec));
        let txn = count_in(txn, &project, "router", &rec.id);
        let resp = self.create_within_quota(&project, "router", txn).await?;
        if !resp.succeeded {
            return Err(shoal_state::StateError::Contended {
                table: tables::ROUTERS,
                key: rec.id,
                attempts: 1,
            }
            .into());
        }
        match gateway {
            Some(g) => match self.set_gateway(&rec.id, Some(&g)).await {
                Ok(r) => Ok(r),
                Err(e) => {
                    // Neutron creates the router and its gateway in one request: undo.
                    if let Err(undo) = self.finish_router_delete(&rec.id).await {
                        tracing::warn!(error = %undo, router = %rec.id, "undoing a router create");
                    }
                    Err(e)
                }
            },
            None => Ok(rec),
        }
    }

    /// The gateway's network must exist (404) and be external (400).
    async fn check_gateway_network(&self, caller: &Caller, g: &GatewayRequest) -> NetResult<()> {
        if g.qos_policy_id.as_ref().is_some_and(|q| !q.is_null()) {
            return Err(NetworkError::bad(
                "qos_policy_id is not supported by Shoal's network service",
            ));
        }
        let Some(net_id) = &g.network_id else {
            return Err(NetworkError::bad(
                "Invalid input for external_gateway_info. Reason: network_id is required.",
            ));
        };
        let net = self.network(caller, net_id).await?;
        if !net.external {
            return Err(bad_request(
                "router",
                format!("Network {} is not an external network", net.id),
            ));
        }
        Ok(())
    }

    pub async fn update_router(
        &self,
        caller: &Caller,
        id: &str,
        req: RouterUpdate,
    ) -> NetResult<RouterRecord> {
        self.changeable_router(caller, id, "update_router").await?;
        check_modes(caller, "update_router", req.distributed, req.ha)?;
        if let Some(n) = &req.name {
            check_text("name", n)?;
        }
        if let Some(Some(d)) = &req.description {
            check_text("description", d)?;
        }
        if let Some(Some(g)) = &req.external_gateway_info {
            check_gateway_policy(caller, "update_router", g)?;
            // `{}` clears the gateway, as `null` does.
            if g.names_any() {
                self.check_gateway_network(caller, g).await?;
            }
        }
        let routes = match &req.routes {
            Some(r) => Some(check_routes(id, r.as_deref().unwrap_or_default())?),
            None => None,
        };
        if let Some(g) = &req.external_gateway_info {
            let g = g.as_ref().filter(|g| g.network_id.is_some());
            self.set_gateway(id, g).await?;
        }
        let now = now_secs();
        for _ in 0..ROUTER_ROUNDS {
            self.barrier().await?;
            let Some(v) = self.routers().get(id).await? else {
                return Err(NetworkError::not_found(Resource::Router, id));
            };
            let mut r = v.value;
            if let Some(x) = &req.name {
                r.name = x.clone();
            }
            if let Some(x) = &req.description {
                r.description = x.clone().unwrap_or_default();
            }
            if let Some(x) = req.admin_state_up {
                r.admin_state_up = x;
            }
            if let Some(routes) = &routes {
                self.check_nexthops(&r, routes).await?;
                r.routes = routes.clone();
            }
            r.bump(now);
            let txn = Txn::new()
                .when(tables::ROUTERS, id, Expect::Revision(v.revision))
                .put(tables::ROUTERS, id, self.routers().encode(&r));
            if self.state.write(tables::ROUTERS, txn).await?.succeeded {
                return Ok(r);
            }
        }
        Err(contended(id))
    }

    /// Every nexthop must lie in a subnet the router is connected to and not be one of the
    /// router's own addresses (Neutron's extraroute checks).
    async fn check_nexthops(&self, r: &RouterRecord, routes: &[HostRoute]) -> NetResult<()> {
        let mut ports = self.interfaces(&r.id).await?;
        if let Some(g) = &r.gateway {
            if let Some(p) = self.ports().get(&g.port_id).await? {
                ports.push(p.value);
            }
        }
        let mut cidrs = Vec::new();
        let mut own = BTreeSet::new();
        for p in &ports {
            for f in &p.fixed_ips {
                own.insert(f.ip_address.clone());
                if let Some(s) = self.subnets().get(&f.subnet_id).await? {
                    if let Ok(c) = Cidr::parse(&s.value.cidr) {
                        cidrs.push(c);
                    }
                }
            }
        }
        for route in routes {
            let hop = parse_ip(&route.nexthop).map_err(NetworkError::bad)?;
            let reason = if own.contains(&route.nexthop) {
                "the nexthop is used by router"
            } else if !cidrs.iter().any(|c| c.contains(hop)) {
                "the nexthop is not connected with router"
            } else {
                continue;
            };
            return Err(NetworkError::BadRequest {
                kind: "InvalidRoutes",
                message: format!(
                    "Invalid format for routes: [{{'destination': '{}', 'nexthop': '{}'}}], {reason}.",
                    route.destination, route.nexthop
                ),
            });
        }
        Ok(())
    }

    /// Sets, changes or (with `None`) clears router `id`'s gateway. Changing the network or
    /// the addresses replaces the gateway port; only `enable_snat` changes in place.
    async fn set_gateway(
        &self,
        id: &str,
        want: Option<&GatewayRequest>,
    ) -> NetResult<RouterRecord> {
        self.barrier().await?;
        let current = self.routers().require(id).await?.value;
        let same_network = match (&current.gateway, want) {
            (Some(have), Some(w)) => {
                w.network_id.as_deref() == Some(have.network_id.as_str())
                    && w.external_fixed_ips.is_none()
            }
            _ => false,
        };
        if same_network {
            // Not given means the default again (`true`), as Neutron resets it.
            let snat = want.and_then(|w| w.enable_snat).unwrap_or(true);
            return self
                .rewrite_router(id, |r| {
                    if let Some(g) = r.gateway.as_mut() {
                        g.enable_snat = snat;
                    }
                    Ok(())
                })
                .await;
        }
        if current.gateway.is_some() {
            self.clear_gateway(id).await?;
        }
        let Some(w) = want else {
            return Ok(self.routers().require(id).await?.value);
        };
        let network_id = w.network_id.clone().unwrap_or_default();
        for _ in 0..ROUTER_ROUNDS {
            self.barrier().await?;
            let Some(v) = self.routers().get(id).await? else {
                return Err(NetworkError::not_found(Resource::Router, id));
            };
            let rev = v.revision;
            let router = v.value;
            let now = now_secs();
            let with_gateway = |p: &PortRecord| {
                let mut r = router.clone();
                r.gateway = Some(RouterGateway {
                    network_id: network_id.clone(),
                    enable_snat: w.enable_snat.unwrap_or(true),
                    port_id: p.id.clone(),
                    external_fixed_ips: p.fixed_ips.clone(),
                });
                r.bump(now);
                r
            };
            let spec = ServicePort {
                project: String::new(),
                network_id: network_id.clone(),
                fixed_ips: w.external_fixed_ips.clone(),
                device_owner: ROUTER_GATEWAY,
                device_id: id.to_owned(),
            };
            let routers = self.routers();
            let extra = |p: &PortRecord, txn: Txn| {
                txn.when(tables::ROUTERS, id, Expect::Revision(rev)).put(
                    tables::ROUTERS,
                    id,
                    routers.encode(&with_gateway(p)),
                )
            };
            if let Some(p) = self.create_service_port(spec, None, &extra).await? {
                return Ok(with_gateway(&p));
            }
        }
        Err(contended(id))
    }

    /// Removes router `id`'s gateway port, unless floating IPs reach their ports through it.
    async fn clear_gateway(&self, id: &str) -> NetResult<()> {
        self.with_delete_mark("router_gateway", Resource::Router, id, || async {
            let mark = deleting_key("router_gateway", id);
            for _ in 0..ROUTER_ROUNDS {
                self.barrier().await?;
                let v = self.routers().require(id).await?;
                let mut r = v.value;
                let Some(g) = r.gateway.take() else {
                    self.index(tables::NETWORK_DELETING).delete(&mark).await?;
                    return Ok(());
                };
                if self.floating_ips_via(id).await?.next().is_some() {
                    return Err(NetworkError::conflict(
                        "RouterExternalGatewayInUseByFloatingIp",
                        format!(
                            "Gateway cannot be updated for router {id}, since a gateway to \
                             external network {} is required by one or more floating IPs.",
                            g.network_id
                        ),
                    ));
                }
                r.bump(now_secs());
                let mut txn = Txn::new()
                    .when(tables::ROUTERS, id, Expect::Revision(v.revision))
                    .put(tables::ROUTERS, id, self.routers().encode(&r))
                    .delete(tables::NETWORK_DELETING, &mark);
                if let Some(p) = self.ports().get(&g.port_id).await? {
                    txn = txn.when(tables::PORTS, &g.port_id, Expect::Revision(p.revision));
                    txn = self.without_port(txn, &p.value);
                }
                if self.state.write(tables::ROUTERS, txn).await?.succeeded {
                    return Ok(());
                }
            }
            Err(contended(id))
        })
        .await
    }

    /// Rewrites router `id` with `change` (compare-and-set on its revision).
    async fn rewrite_router(
        &self,
        id: &str,
        change: impl Fn(&mut RouterRecord) -> NetResult<()>,
    ) -> NetResult<RouterRecord> {
        let now = now_secs();
        let v = self
            .routers()
            .update(id, |r| {
                change(r)?;
                r.bump(now);
                Ok::<(), NetworkError>(())
            })
            .await?;
        Ok(v.value)
    }

    pub async fn delete_router(&self, caller: &Caller, id: &str) -> NetResult<()> {
        self.changeable_router(caller, id, "delete_router").await?;
        self.with_delete_mark("router", Resource::Router, id, || {
            self.finish_router_delete(id)
        })
        .await
    }

    /// Deletes router `id` with its gateway port; 409 `RouterInUse` while it has interfaces.
    async fn finish_router_delete(&self, id: &str) -> NetResult<()> {
        let mark = deleting_key("router", id);
        shoal_state::retry(
            tables::ROUTERS,
            id,
            shoal_state::DEFAULT_ATTEMPTS,
            || async {
                self.barrier().await?;
                let Some(v) = self.routers().get(id).await? else {
                    return Err(NetworkError::not_found(Resource::Router, id));
                };
                if !self.interfaces(id).await?.is_empty()
                    || self.floating_ips_via(id).await?.next().is_some()
                {
                    return Err(NetworkError::conflict(
                        "RouterInUse",
                        format!("Router {id} still has ports"),
                    ));
                }
                let r = v.value;
                let mut txn = Txn::new()
                    .when(tables::ROUTERS, id, Expect::Revision(v.revision))
                    .delete(tables::ROUTERS, id)
                    .delete(tables::NETWORK_DELETING, &mark);
                if let Some(g) = &r.gateway {
                    if let Some(p) = self.ports().get(&g.port_id).await? {
                        txn = txn.when(tables::PORTS, &g.port_id, Expect::Revision(p.revision));
                        txn = self.without_port(txn, &p.value);
                    }
                }
                let txn = uncount_in(txn, &r.project_id, "router", id);
                Ok(self
                    .state
                    .write(tables::ROUTERS, txn)
                    .await?
                    .succeeded
                    .then_some(()))
            },
        )
        .await
    }

    /// The subnets router `r` is connected to (interfaces and gateway), with the port of each.
    async fn connected(&self, r: &RouterRecord) -> NetResult<Vec<(SubnetRecord, String)>> {
        let mut ports = self.interfaces(&r.id).await?;
        if let Some(g) = &r.gateway {
            if let Some(p) = self.ports().get(&g.port_id).await? {
                ports.push(p.value);
            }
        }
        let mut out = Vec::new();
        for p in ports {
            for f in &p.fixed_ips {
                if let Some(s) = self.subnets().get(&f.subnet_id).await? {
                    out.push((s.value, p.id.clone()));
                }
            }
        }
        Ok(out)
    }

    /// Refuses a new interface on `subnet` when the router has one there or on an overlapping
    /// subnet.
    fn check_new_subnet(
        router: &str,
        connected: &[(SubnetRecord, String)],
        subnet: &SubnetRecord,
    ) -> NetResult<()> {
        let cidr = Cidr::parse(&subnet.cidr).map_err(NetworkError::bad)?;
        for (s, _) in connected {
            if s.id == subnet.id {
                return Err(bad_request(
                    "router",
                    format!("Router {router} already has a port on subnet {}", s.id),
                ));
            }
            if Cidr::parse(&s.cidr).is_ok_and(|c| c.overlaps(&cidr)) {
                return Err(bad_request(
                    "router",
                    format!(
                        "Cidr {} of subnet {} overlaps with cidr {} of subnet {}",
                        subnet.cidr, subnet.id, s.cidr, s.id
                    ),
                ));
            }
        }
        Ok(())
    }

    pub async fn add_router_interface(
        &self,
        caller: &Caller,
        id: &str,
        req: InterfaceRequest,
    ) -> NetResult<InterfaceInfo> {
        let router = self
            .changeable_router(caller, id, "add_router_interface")
            .await?;
        match (&req.subnet_id, &req.port_id) {
            (Some(_), Some(_)) => Err(bad_request(
                "router",
                "Cannot specify both subnet-id and port-id",
            )),
            (None, None) => Err(bad_request(
                "router",
                "Either subnet_id or port_id must be specified",
            )),
            (Some(sid), None) => self.add_interface_by_subnet(caller, &router, sid).await,
            (None, Some(pid)) => self.add_interface_by_port(caller, &router, pid).await,
        }
    }

    async fn add_interface_by_subnet(
        &self,
        caller: &Caller,
        router: &RouterRecord,
        sid: &str,
    ) -> NetResult<InterfaceInfo> {
        let subnet = self.subnet(caller, sid).await?;
        let Some(gateway) = subnet.gateway_ip.clone() else {
            return Err(bad_request(
                "router",
                "Subnet for router interface must have a gateway IP",
            ));
        };
        let id = router.id.as_str();
        for _ in 0..ROUTER_ROUNDS {
            self.barrier().await?;
            let Some(v) = self.routers().get(id).await? else {
                return Err(NetworkError::not_found(Resource::Router, id));
            };
            Self::check_new_subnet(id, &self.connected(&v.value).await?, &subnet)?;
            let mut r = v.value;
            r.bump(now_secs());
            let spec = ServicePort {
                project: r.project_id.clone(),
                network_id: subnet.network_id.clone(),
                fixed_ips: Some(vec![FixedIpRequest {
                    subnet_id: Some(sid.to_owned()),
                    ip_address: Some(gateway.clone()),
                }]),
                device_owner: ROUTER_INTERFACE,
                device_id: id.to_owned(),
            };
            let row = self.routers().encode(&r);
            let rev = v.revision;
            let extra = |_: &PortRecord, txn: Txn| {
                txn.when(tables::ROUTERS, id, Expect::Revision(rev))
                    .when(
                        tables::NETWORK_DELETING,
                        &deleting_key("router", id),
                        Expect::Absent,
                    )
                    .put(tables::ROUTERS, id, row.clone())
            };
            if let Some(p) = self.create_service_port(spec, None, &extra).await? {
                return Ok(interface_info(&r, &p, sid));
            }
        }
        Err(contended(id))
    }

    async fn add_interface_by_port(
        &self,
        caller: &Caller,
        router: &RouterRecord,
        pid: &str,
    ) -> NetResult<InterfaceInfo> {
        let first = self.port(caller, pid).await?;
        if !caller.may_change(&first.project_id) {
            return Err(NetworkError::not_found(Resource::Port, pid));
        }
        let id = router.id.as_str();
        for _ in 0..ROUTER_ROUNDS {
            self.barrier().await?;
            let Some(pv) = self.ports().get(pid).await? else {
                return Err(NetworkError::not_found(Resource::Port, pid));
            };
            let mut p = pv.value;
            if !p.device_id.is_empty() {
                return Err(NetworkError::conflict(
                    "PortInUse",
                    format!(
                        "Unable to complete operation on port {pid} for network {}. Port already \
                         has an attached device {}.",
                        p.network_id, p.device_id
                    ),
                ));
            }
            let v4: Vec<&FixedIp> = p
                .fixed_ips
                .iter()
                .filter(|f| family_of(&f.ip_address) == Some(true))
                .collect();
            // The IPv4 address if the port has one (at most one IPv4 subnet), else its first
            // IPv6 address: Neutron allows several IPv6 subnets on one router port.
            let Some(fixed) = v4.first().copied().or(p.fixed_ips.first()).cloned() else {
                return Err(bad_request(
                    "router",
                    "Router port must have at least one fixed IP",
                ));
            };
            if v4.iter().any(|f| f.subnet_id != fixed.subnet_id) {
                return Err(bad_request(
                    "router",
                    "Cannot have multiple IPv4 subnets on router port",
                ));
            }
            let subnet = self
                .subnets()
                .get(&fixed.subnet_id)
                .await?
                .ok_or_else(|| NetworkError::not_found(Resource::Subnet, &fixed.subnet_id))?
                .value;
            let Some(v) = self.routers().get(id).await? else {
                return Err(NetworkError::not_found(Resource::Router, id));
            };
            Self::check_new_subnet(id, &self.connected(&v.value).await?, &subnet)?;
            let now = now_secs();
            let mut r = v.value;
            r.bump(now);
            p.device_id = id.to_owned();
            p.device_owner = ROUTER_INTERFACE.to_owned();
            p.touch(now);
            let txn = Txn::new()
                .when(tables::ROUTERS, id, Expect::Revision(v.revision))
                .when(
                    tables::NETWORK_DELETING,
                    &deleting_key("router", id),
                    Expect::Absent,
                )
                .when(tables::PORTS, pid, Expect::Revision(pv.revision))
                .put(tables::ROUTERS, id, self.routers().encode(&r))
                .put(tables::PORTS, pid, self.ports().encode(&p));
            if self.state.write(tables::ROUTERS, txn).await?.succeeded {
                return Ok(interface_info(&r, &p, &fixed.subnet_id));
            }
        }
        Err(contended(id))
    }

    pub async fn remove_router_interface(
        &self,
        caller: &Caller,
        id: &str,
        req: InterfaceRequest,
    ) -> NetResult<InterfaceInfo> {
        self.changeable_router(caller, id, "remove_router_interface")
            .await?;
        let ports = self.interfaces(id).await?;
        let port = match (&req.port_id, &req.subnet_id) {
            (None, None) => {
                return Err(bad_request(
                    "router",
                    "Either subnet_id or port_id must be specified",
                ))
            }
            (Some(pid), sid) => {
                let p = ports.into_iter().find(|p| p.id == *pid).ok_or_else(|| {
                    NetworkError::Missing {
                        kind: "RouterInterfaceNotFound",
                        message: format!(
                            "Router {id} does not have an interface with id {}",
                            shown(pid)
                        ),
                    }
                })?;
                if let Some(sid) = sid {
                    if !p.fixed_ips.iter().any(|f| f.subnet_id == *sid) {
                        return Err(bad_request(
                            "router",
                            format!("Subnet {} is not associated with port {pid}", shown(sid)),
                        ));
                    }
                }
                p
            }
            (None, Some(sid)) => {
                self.subnet(caller, sid).await?;
                ports
                    .into_iter()
                    .find(|p| p.fixed_ips.iter().any(|f| f.subnet_id == *sid))
                    .ok_or_else(|| NetworkError::Missing {
                        kind: "RouterInterfaceNotFoundForSubnet",
                        message: format!("Router {id} has no interface on subnet {sid}"),
                    })?
            }
        };
        let subnet_id = port
            .fixed_ips
            .first()
            .map(|f| f.subnet_id.clone())
            .unwrap_or_default();
        let pid = port.id.clone();
        let mut answer = None;
        self.with_delete_mark("port", Resource::Port, &pid, || async {
            let mark = deleting_key("port", &pid);
            for _ in 0..ROUTER_ROUNDS {
                self.barrier().await?;
                let v = self.routers().require(id).await?;
                let Some(pv) = self.ports().get(&pid).await? else {
                    return Err(NetworkError::not_found(Resource::Port, &pid));
                };
                let p = pv.value;
                let mut cidrs = Vec::new();
                for f in &p.fixed_ips {
                    if let Some(s) = self.subnets().get(&f.subnet_id).await? {
                        cidrs.push((
                            s.value.id.clone(),
                            Cidr::parse(&s.value.cidr).map_err(NetworkError::bad)?,
                        ));
                    }
                }
                let mut r = v.value;
                for route in &r.routes {
                    let hop = parse_ip(&route.nexthop).unwrap_or_default();
                    if let Some((sid, _)) = cidrs.iter().find(|(_, c)| c.contains(hop)) {
                        return Err(NetworkError::conflict(
                            "RouterInterfaceInUseByRoute",
                            format!(
                                "Router interface for subnet {sid} on router {id} cannot be \
                                 deleted, as it is required by one or more routes."
                            ),
                        ));
                    }
                }
                for fip in self.floating_ips_via(id).await? {
                    let Some(fixed) = fip
                        .fixed_ip_address
                        .as_deref()
                        .and_then(|a| parse_ip(a).ok())
                    else {
                        continue;
                    };
                    if let Some((sid, _)) = cidrs.iter().find(|(_, c)| c.contains(fixed)) {
                        return Err(NetworkError::conflict(
                            "RouterInterfaceInUseByFloatingIP",
                            format!(
                                "Router interface for subnet {sid} on router {id} cannot be \
                                 deleted, as it is required by one or more floating IPs."
                            ),
                        ));
                    }
                }
                r.bump(now_secs());
                let txn = Txn::new()
                    .when(tables::ROUTERS, id, Expect::Revision(v.revision))
                    .when(tables::PORTS, &pid, Expect::Revision(pv.revision))
                    .put(tables::ROUTERS, id, self.routers().encode(&r))
                    .delete(tables::NETWORK_DELETING, &mark);
                let txn = self.without_port(txn, &p);
                if self.state.write(tables::ROUTERS, txn).await?.succeeded {
                    answer = Some(interface_info(&r, &p, &subnet_id));
                    return Ok(());
                }
            }
            Err(contended(id))
        })
        .await?;
        answer.ok_or_else(|| contended(id))
    }

    /// Why port `p` may not be deleted through the port API: it is a router's interface or
    /// gateway, or holds a floating IP's address, and that router or floating IP exists.
    pub(crate) async fn service_port_owner(&self, p: &PortRecord) -> NetResult<Option<String>> {
        let owned = match p.device_owner.as_str() {
            ROUTER_INTERFACE | ROUTER_GATEWAY => self.routers().get(&p.device_id).await?.is_some(),
            FLOATING_IP_OWNER => self.floating_ips().get(&p.device_id).await?.is_some(),
            _ => false,
        };
        Ok(owned.then(|| format!("has device owner {}", p.device_owner)))
    }
}

fn interface_info(r: &RouterRecord, p: &PortRecord, subnet: &str) -> InterfaceInfo {
    InterfaceInfo {
        router_id: r.id.clone(),
        project_id: r.project_id.clone(),
        port_id: p.id.clone(),
        network_id: p.network_id.clone(),
        subnet_id: subnet.to_owned(),
        subnet_ids: p.fixed_ips.iter().map(|f| f.subnet_id.clone()).collect(),
    }
}

fn contended(id: &str) -> NetworkError {
    shoal_state::StateError::Contended {
        table: tables::ROUTERS,
        key: id.to_owned(),
        attempts: ROUTER_ROUNDS,
    }
    .into()
}

/// Checks the shape of extra routes (destination a CIDR, nexthop an address, no duplicates, at
/// most `MAX_ROUTES`); where the nexthops lie is checked against the router's subnets.
fn check_routes(router: &str, routes: &[HostRoute]) -> NetResult<Vec<HostRoute>> {
    if routes.len() > MAX_ROUTES {
        return Err(NetworkError::BadRequest {
            kind: "RoutesExhausted",
            message: format!(
                "Unable to complete operation for {router}. The number of routes exceeds the \
                 maximum {MAX_ROUTES}."
            ),
        });
    }
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(routes.len());
    for r in routes {
        let invalid = |reason: String| NetworkError::BadRequest {
            kind: "InvalidRoutes",
            message: format!(
                "Invalid format for routes: [{{'destination': '{}', 'nexthop': '{}'}}], {reason}.",
                shown(&r.destination),
                shown(&r.nexthop)
            ),
        };
        let dest = Cidr::parse(&r.destination).map_err(invalid)?;
        let hop = parse_ip(&r.nexthop).map_err(invalid)?;
        if dest.is_v4() != crate::ip::is_v4(hop) {
            return Err(invalid(
                "the destination and the nexthop are of different IP versions".into(),
            ));
        }
        let route = HostRoute {
            destination: dest.to_string(),
            nexthop: ip_string(hop),
        };
        if !seen.insert((route.destination.clone(), route.nexthop.clone())) {
            return Err(invalid("the route is given twice".into()));
        }
        out.push(route);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{admin, member, service};
    use crate::{ErrorClass, FloatingIpCreate, FloatingIpUpdate, NetworkUpdate, PortCreate};

    /// A network with one subnet of `cidr`, external (made by an admin) or `who`'s own.
    async fn net(s: &NetworkService, who: &Caller, external: bool, cidr: &str) -> (String, String) {
        let (n, sub) = crate::ports::tests::net_with_subnet(s, who, cidr).await;
        if external {
            let ext = NetworkUpdate {
                external: Some(true),
                ..Default::default()
            };
            s.update_network(&admin(), &n, ext).await.unwrap();
        }
        (n, sub)
    }

    fn by_subnet(sid: &str) -> InterfaceRequest {
        InterfaceRequest {
            subnet_id: Some(sid.into()),
            port_id: None,
        }
    }

    fn with_gateway(network: &str) -> RouterUpdate {
        RouterUpdate {
            external_gateway_info: Some(Some(GatewayRequest {
                network_id: Some(network.into()),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    /// Interfaces take the subnet's gateway address; a subnet is on one router by subnet_id,
    /// overlapping subnets are refused, and a router in use cannot go.
    #[tokio::test]
    async fn interfaces_gateways_and_routes() {
        let s = service();
        let p = member("p");
        let (ext, _) = net(&s, &admin(), true, "203.0.113.0/24").await;
        let (_, a) = net(&s, &p, false, "10.0.0.0/24").await;
        let (_, b) = net(&s, &p, false, "10.0.0.128/25").await;
        let r = s.create_router(&p, RouterCreate::default()).await.unwrap();
        let i = s
            .add_router_interface(&p, &r.id, by_subnet(&a))
            .await
            .unwrap();
        let port = s.port(&p, &i.port_id).await.unwrap();
        assert_eq!(port.fixed_ips[0].ip_address, "10.0.0.1");
        assert_eq!(
            (port.device_owner.as_str(), port.device_id.as_str()),
            (ROUTER_INTERFACE, r.id.as_str())
        );
        let again = s
            .add_router_interface(&p, &r.id, by_subnet(&a))
            .await
            .unwrap_err();
        assert_eq!(again.class(), ErrorClass::BadRequest);
        let overlap = s
            .add_router_interface(&p, &r.id, by_subnet(&b))
            .await
            .unwrap_err();
        assert!(overlap.to_string().contains("overlaps"), "{overlap}");
        let r2 = s.create_router(&p, RouterCreate::default()).await.unwrap();
        let taken = s
            .add_router_interface(&p, &r2.id, by_subnet(&a))
            .await
            .unwrap_err();
        assert_eq!(taken.neutron_type(), "IpAddressAlreadyAllocated");
        // The gateway's address comes from the external subnet.
        let g = s
            .update_router(&p, &r.id, with_gateway(&ext))
            .await
            .unwrap();
        let gw = g.gateway.unwrap();
        assert!(gw.external_fixed_ips[0]
            .ip_address
            .starts_with("203.0.113."));
        assert!(gw.enable_snat);
        // Routes: a nexthop on a connected subnet only.
        let routes = |hop: &str| RouterUpdate {
            routes: Some(Some(vec![HostRoute {
                destination: "10.9.0.0/24".into(),
                nexthop: hop.into(),
            }])),
            ..Default::default()
        };
        s.update_router(&p, &r.id, routes("10.0.0.7"))
            .await
            .unwrap();
        let off = s
            .update_router(&p, &r.id, routes("192.0.2.1"))
            .await
            .unwrap_err();
        assert_eq!(off.neutron_type(), "InvalidRoutes");
        let own = s
            .update_router(&p, &r.id, routes("10.0.0.1"))
            .await
            .unwrap_err();
        assert!(own.to_string().contains("used by router"), "{own}");
        let used = s
            .remove_router_interface(&p, &r.id, by_subnet(&a))
            .await
            .unwrap_err();
        assert_eq!(used.neutron_type(), "RouterInterfaceInUseByRoute");
        s.update_router(
            &p,
            &r.id,
            RouterUpdate {
                routes: Some(None),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        // In use: the router, its interface port, the subnet.
        assert_eq!(
            s.delete_router(&p, &r.id).await.unwrap_err().neutron_type(),
            "RouterInUse"
        );
        assert_eq!(
            s.delete_port(&admin(), &i.port_id)
                .await
                .unwrap_err()
                .neutron_type(),
            "ServicePortInUse"
        );
        assert_eq!(
            s.delete_subnet(&p, &a).await.unwrap_err().neutron_type(),
            "SubnetInUse"
        );
        // Another project sees nothing.
        assert_eq!(
            s.router(&member("q"), &r.id)
                .await
                .unwrap_err()
                .neutron_type(),
            "RouterNotFound"
        );
        s.remove_router_interface(&p, &r.id, by_subnet(&a))
            .await
            .unwrap();
        assert!(s.port(&p, &i.port_id).await.is_err());
        s.delete_router(&p, &r.id).await.unwrap();
        // The gateway port went with the router.
        assert!(s.list_ports(&admin()).await.unwrap().is_empty());
    }

    /// A floating IP associates only with a port a router reaches from its network; one fixed
    /// address gets one floating IP; what it depends on stays; deletes release.
    #[tokio::test]
    async fn floating_ips_follow_neutrons_rules() {
        let s = service();
        let p = member("p");
        let (ext, _) = net(&s, &admin(), true, "203.0.113.0/29").await;
        let (inner, a) = net(&s, &p, false, "10.0.0.0/24").await;
        let vm = s
            .create_port(
                &p,
                PortCreate {
                    network_id: inner.clone(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let create = || FloatingIpCreate {
            floating_network_id: Some(ext.clone()),
            ..Default::default()
        };
        let bad = s
            .create_floating_ip(
                &p,
                FloatingIpCreate {
                    floating_network_id: Some(inner.clone()),
                    ..Default::default()
                },
            )
            .await
            .unwrap_err();
        assert_eq!(bad.class(), ErrorClass::BadRequest);
        let f = s.create_floating_ip(&p, create()).await.unwrap();
        assert!(f.floating_ip_address.starts_with("203.0.113."));
        let assoc = || FloatingIpUpdate {
            port_id: Some(Some(vm.id.clone())),
            ..Default::default()
        };
        let e = s.update_floating_ip(&p, &f.id, assoc()).await.unwrap_err();
        assert_eq!(e.neutron_type(), "ExternalGatewayForFloatingIPNotFound");
        assert_eq!(e.class(), ErrorClass::NotFound);
        let r = s.create_router(&p, RouterCreate::default()).await.unwrap();
        s.update_router(&p, &r.id, with_gateway(&ext))
            .await
            .unwrap();
        s.add_router_interface(&p, &r.id, by_subnet(&a))
            .await
            .unwrap();
        let f = s.update_floating_ip(&p, &f.id, assoc()).await.unwrap();
        assert_eq!(f.router_id.as_deref(), Some(r.id.as_str()));
        assert_eq!(
            f.fixed_ip_address.as_deref(),
            Some(vm.fixed_ips[0].ip_address.as_str())
        );
        // A second floating IP for the same fixed address is refused.
        let g = s.create_floating_ip(&p, create()).await.unwrap();
        let dup = s.update_floating_ip(&p, &g.id, assoc()).await.unwrap_err();
        assert_eq!(dup.neutron_type(), "FloatingIPPortAlreadyAssociated");
        // What the association goes through stays.
        let e = s
            .remove_router_interface(&p, &r.id, by_subnet(&a))
            .await
            .unwrap_err();
        assert_eq!(e.neutron_type(), "RouterInterfaceInUseByFloatingIP");
        let clear = RouterUpdate {
            external_gateway_info: Some(None),
            ..Default::default()
        };
        let e = s.update_router(&p, &r.id, clear.clone()).await.unwrap_err();
        assert_eq!(e.neutron_type(), "RouterExternalGatewayInUseByFloatingIp");
        // Deleting the port disassociates; then the gateway may go.
        s.delete_port(&p, &vm.id).await.unwrap();
        let f = s.floating_ip(&p, &f.id).await.unwrap();
        assert!(f.port_id.is_none() && f.router_id.is_none());
        s.update_router(&p, &r.id, clear).await.unwrap();
        // The two floating IPs hold two addresses of the external network, the gateway none.
        let held = || async {
            let ports = s.list_ports(&admin()).await.unwrap();
            ports.into_iter().filter(|x| x.network_id == ext).count()
        };
        assert_eq!(held().await, 2);
        s.delete_floating_ip(&p, &g.id).await.unwrap();
        assert!(s.floating_ip(&member("q"), &f.id).await.is_err());
        assert_eq!(held().await, 1);
    }

    /// Concurrent associations of one fixed address with different floating IPs: one wins.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn one_fixed_address_one_floating_ip_under_races() {
        let s = service();
        let p = member("p");
        let (ext, _) = net(&s, &admin(), true, "203.0.113.0/24").await;
        let (inner, a) = net(&s, &p, false, "10.0.0.0/24").await;
        let r = s.create_router(&p, RouterCreate::default()).await.unwrap();
        s.update_router(&p, &r.id, with_gateway(&ext))
            .await
            .unwrap();
        s.add_router_interface(&p, &r.id, by_subnet(&a))
            .await
            .unwrap();
        let vm = s
            .create_port(
                &p,
                PortCreate {
                    network_id: inner,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let mut fips = Vec::new();
        for _ in 0..6 {
            let f = FloatingIpCreate {
                floating_network_id: Some(ext.clone()),
                ..Default::default()
            };
            fips.push(s.create_floating_ip(&p, f).await.unwrap().id);
        }
        let tasks: Vec<_> = fips
            .into_iter()
            .map(|id| {
                let (s, p, port) = (s.clone(), p.clone(), vm.id.clone());
                tokio::spawn(async move {
                    let u = FloatingIpUpdate {
                        port_id: Some(Some(port)),
                        ..Default::default()
                    };
                    s.update_floating_ip(&p, &id, u).await
                })
            })
            .collect();
        let mut won = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => won += 1,
                Err(e) => assert_eq!(e.neutron_type(), "FloatingIPPortAlreadyAssociated", "{e}"),
            }
        }
        assert_eq!(won, 1);
        let associated = s
            .list_floating_ips(&p)
            .await
            .unwrap()
            .into_iter()
            .filter(|f| f.port_id.is_some())
            .count();
        assert_eq!(associated, 1);
    }
}
