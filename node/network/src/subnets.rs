//! IPv4 and IPv6 subnets: their layout (gateway, allocation pools, DNS servers, host routes,
//! IPv6 address modes) and the rule that subnets of one network never overlap, while subnets
//! of different networks may.

use std::collections::{BTreeSet, HashMap};

use serde::Deserialize;
use shoal_state::{tables, Expect, Txn};

use crate::ip::{family_of, ip_string, is_v4, parse_ip, shown, Cidr};
use crate::ipam::{self, LayoutError, Pool};
use crate::networks::{deleting_key, sees};
use crate::quotas::{count_in, uncount_in};
use crate::records::{HostRoute, NetworkRecord, SubnetRecord};
use crate::subnet_pools::PoolRequest;
use crate::{
    check_tags, check_text, new_id, now_secs, nullable, Caller, NetResult, NetworkError,
    NetworkService, Resource, Revisioned,
};

/// Neutron's `max_dns_nameservers` and `max_subnet_host_routes`.
const MAX_DNS: usize = 5;
const MAX_ROUTES: usize = 20;

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubnetCreate {
    pub network_id: String,
    pub name: Option<String>,
    pub description: Option<String>,
    pub cidr: Option<String>,
    pub ip_version: Option<u8>,
    /// Absent: the first host address; `null`: no gateway.
    #[serde(default, deserialize_with = "nullable")]
    pub gateway_ip: Option<Option<String>>,
    pub allocation_pools: Option<Vec<Pool>>,
    pub dns_nameservers: Option<Vec<String>>,
    pub host_routes: Option<Vec<HostRoute>>,
    pub enable_dhcp: Option<bool>,
    pub tags: Option<Vec<String>>,
    pub project_id: Option<String>,
    pub tenant_id: Option<String>,
    /// Carve the cidr from this subnet pool (by `prefixlen`, or the given `cidr`).
    pub subnetpool_id: Option<String>,
    #[serde(default, deserialize_with = "crate::subnet_pools::prefixlen")]
    pub prefixlen: Option<u8>,
    #[serde(alias = "use_default_subnet_pool")]
    pub use_default_subnetpool: Option<bool>,
    // Accepted so that a request using them gets a clear answer rather than "unrecognized".
    pub ipv6_ra_mode: Option<serde_json::Value>,
    pub ipv6_address_mode: Option<serde_json::Value>,
    pub segment_id: Option<serde_json::Value>,
    pub service_types: Option<Vec<String>>,
    pub dns_publish_fixed_ip: Option<bool>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubnetUpdate {
    pub name: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub description: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    pub gateway_ip: Option<Option<String>>,
    pub allocation_pools: Option<Vec<Pool>>,
    pub dns_nameservers: Option<Vec<String>>,
    pub host_routes: Option<Vec<HostRoute>>,
    pub enable_dhcp: Option<bool>,
    pub cidr: Option<serde_json::Value>,
    pub network_id: Option<serde_json::Value>,
    pub ip_version: Option<serde_json::Value>,
    pub ipv6_ra_mode: Option<serde_json::Value>,
    pub ipv6_address_mode: Option<serde_json::Value>,
}

/// Where a new subnet's cidr comes from.
enum Alloc {
    /// The request's own cidr, outside any pool.
    Fixed(Cidr),
    /// Carved from subnet pool `.0`.
    Pool(String, PoolRequest),
}

/// Neutron's IPv6 modes, for both `ipv6_ra_mode` and `ipv6_address_mode`.
const IPV6_MODES: [&str; 3] = ["slaac", "dhcpv6-stateful", "dhcpv6-stateless"];

/// One of the IPv6 mode attributes: absent or null, or one of [`IPV6_MODES`].
fn ipv6_mode(value: Option<&serde_json::Value>, attr: &str) -> NetResult<Option<String>> {
    match value {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(m)) if IPV6_MODES.contains(&m.as_str()) => {
            Ok(Some(m.clone()))
        }
        Some(other) => Err(NetworkError::bad(format!(
            "Invalid input for {attr}. Reason: '{}' is not in {IPV6_MODES:?}.",
            shown(&other.to_string())
        ))),
    }
}

/// Checks the IPv6 modes of a subnet of `cidr` as Neutron's `_validate_ipv6_attributes`.
fn check_ipv6_modes(
    cidr: &Cidr,
    enable_dhcp: bool,
    ra: &Option<String>,
    address: &Option<String>,
) -> NetResult<()> {
    if ra.is_none() && address.is_none() {
        return Ok(());
    }
    if cidr.is_v4() {
        return Err(NetworkError::bad(
            "Invalid input for operation: ipv6_ra_mode and ipv6_address_mode are not valid \
             when ip_version is 4.",
        ));
    }
    if !enable_dhcp {
        return Err(NetworkError::bad(
            "Invalid input for operation: ipv6_ra_mode or ipv6_address_mode cannot be set when \
             enable_dhcp is set to False.",
        ));
    }
    if let (Some(r), Some(a)) = (ra, address) {
        if r != a {
            return Err(NetworkError::bad(format!(
                "Invalid input for operation: ipv6_ra_mode set to '{r}' with ipv6_address_mode \
                 set to '{a}' is not valid. If both attributes are set, they must be the same \
                 value."
            )));
        }
    }
    if matches!(address.as_deref(), Some("slaac" | "dhcpv6-stateless")) && cidr.prefix() != 64 {
        return Err(NetworkError::bad(format!(
            "Invalid input for operation: Invalid CIDR {cidr} for IPv6 address mode. OpenStack \
             uses the EUI-64 address format, which requires the prefix to be /64."
        )));
    }
    Ok(())
}

impl From<LayoutError> for NetworkError {
    fn from(e: LayoutError) -> Self {
        if e.conflict {
            NetworkError::conflict(e.kind, e.message)
        } else {
            NetworkError::BadRequest {
                kind: e.kind,
                message: e.message,
            }
        }
    }
}

fn check_dns(servers: &[String]) -> NetResult<Vec<String>> {
    if servers.len() > MAX_DNS {
        return Err(NetworkError::bad(format!(
            "Number of DNS nameservers exceeds the limit {MAX_DNS}"
        )));
    }
    let mut seen = BTreeSet::new();
    for s in servers {
        if family_of(s).is_none() || s.contains('/') {
            return Err(NetworkError::bad(format!(
                "Invalid input for dns_nameservers. Reason: '{}' is not a valid nameserver.",
                shown(s)
            )));
        }
        if !seen.insert(s.as_str()) {
            return Err(NetworkError::bad(format!(
                "Invalid input for dns_nameservers. Reason: Duplicate nameserver '{}'.",
                shown(s)
            )));
        }
    }
    Ok(servers.to_vec())
}

fn check_routes(routes: &[HostRoute], subnet: &Cidr) -> NetResult<Vec<HostRoute>> {
    if routes.len() > MAX_ROUTES {
        return Err(NetworkError::bad(format!(
            "Number of host routes exceeds the limit {MAX_ROUTES}"
        )));
    }
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(routes.len());
    for r in routes {
        let dest = Cidr::parse(&r.destination).map_err(|m| {
            NetworkError::bad(format!("Invalid input for host_routes. Reason: {m}."))
        })?;
        let hop = parse_ip(&r.nexthop).map_err(|m| {
            NetworkError::bad(format!("Invalid input for host_routes. Reason: {m}."))
        })?;
        if dest.is_v4() != subnet.is_v4() || is_v4(hop) != subnet.is_v4() {
            return Err(NetworkError::bad(format!(
                "Invalid input for host_routes. Reason: the route {dest} via {} is not of the \
                 subnet's IP version {}.",
                ip_string(hop),
                subnet.version()
            )));
        }
        let route = HostRoute {
            destination: dest.to_string(),
            nexthop: ip_string(hop),
        };
        if !seen.insert((route.destination.clone(), route.nexthop.clone())) {
            return Err(NetworkError::bad(format!(
                "Invalid input for host_routes. Reason: Duplicate hostroute '{} via {}'.",
                route.destination, route.nexthop
            )));
        }
        out.push(route);
    }
    Ok(out)
}

/// Whether `caller` may see subnet `s` of network `net`.
fn sees_subnet(caller: &Caller, s: &SubnetRecord, net: Option<&NetworkRecord>) -> bool {
    caller.admin || caller.owns(&s.project_id) || net.is_some_and(|n| sees(caller, n))
}

/// May change subnet `s`: admins, its project, and the network's owner.
fn may_change_subnet(caller: &Caller, s: &SubnetRecord, net: Option<&NetworkRecord>) -> bool {
    caller.may_change(&s.project_id) || net.is_some_and(|n| caller.may_change(&n.project_id))
}

impl NetworkService {
    pub async fn subnet(&self, caller: &Caller, id: &str) -> NetResult<SubnetRecord> {
        self.barrier().await?;
        self.visible_subnet(caller, id).await
    }

    async fn visible_subnet(&self, caller: &Caller, id: &str) -> NetResult<SubnetRecord> {
        if let Some(s) = self.subnets().get(id).await? {
            let net = self
                .networks()
                .get(&s.value.network_id)
                .await?
                .map(|n| n.value);
            if sees_subnet(caller, &s.value, net.as_ref()) {
                return Ok(SubnetRecord {
                    router_external: net.is_some_and(|n| n.external),
                    ..s.value
                });
            }
        }
        Err(NetworkError::not_found(Resource::Subnet, id))
    }

    /// Subnet `id` if `caller` may change it: 404 if it may not see it, 403 (`rule`) if it
    /// may see but not change it.
    async fn changeable_subnet(
        &self,
        caller: &Caller,
        id: &str,
        rule: &str,
    ) -> NetResult<SubnetRecord> {
        let current = self.subnet(caller, id).await?;
        let net = self.networks().get(&current.network_id).await?;
        if !may_change_subnet(caller, &current, net.map(|n| n.value).as_ref()) {
            return Err(NetworkError::policy(rule));
        }
        Ok(current)
    }

    pub async fn list_subnets(&self, caller: &Caller) -> NetResult<Vec<SubnetRecord>> {
        self.barrier().await?;
        let nets: HashMap<String, NetworkRecord> = self
            .networks()
            .list("")
            .await?
            .into_values()
            .map(|n| (n.id.clone(), n))
            .collect();
        Ok(self
            .subnets()
            .list("")
            .await?
            .into_values()
            .filter(|s| sees_subnet(caller, s, nets.get(&s.network_id)))
            .map(|s| SubnetRecord {
                router_external: nets.get(&s.network_id).is_some_and(|n| n.external),
                ..s
            })
            .collect())
    }

    pub async fn create_subnet(
        &self,
        caller: &Caller,
        req: SubnetCreate,
    ) -> NetResult<SubnetRecord> {
        let net = self.network(caller, &req.network_id).await?;
        if !caller.may_change(&net.project_id) {
            return Err(NetworkError::policy("create_subnet"));
        }
        let project =
            caller.project_for_create("create_subnet", &req.project_id, &req.tenant_id)?;
        if req.segment_id.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(NetworkError::bad(
                "segment_id is not supported: Shoal has no segments",
            ));
        }
        if req.service_types.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(NetworkError::bad("service_types are not supported"));
        }
        if let Some(v) = req.ip_version.filter(|v| *v != 4 && *v != 6) {
            return Err(NetworkError::bad(format!(
                "Invalid input for ip_version. Reason: {v} is not in [4, 6]."
            )));
        }
        let ra_mode = ipv6_mode(req.ipv6_ra_mode.as_ref(), "ipv6_ra_mode")?;
        let address_mode = ipv6_mode(req.ipv6_address_mode.as_ref(), "ipv6_address_mode")?;
        let name = req.name.unwrap_or_default();
        check_text("name", &name)?;
        let description = req.description.unwrap_or_default();
        check_text("description", &description)?;
        let given = req
            .cidr
            .as_deref()
            .map(|text| {
                Cidr::parse(text)
                    .map_err(|m| NetworkError::bad(format!("Invalid input for cidr. Reason: {m}.")))
            })
            .transpose()?;
        if given.is_some() && req.prefixlen.is_some() {
            return Err(NetworkError::bad(
                "cidr and prefixlen must not be supplied together",
            ));
        }
        let pool = self
            .pool_for_subnet(
                caller,
                req.subnetpool_id.as_deref(),
                req.use_default_subnetpool.unwrap_or(false),
                given.map(|c| c.version()).or(req.ip_version),
            )
            .await?;
        let alloc = match (pool, given) {
            (None, None) => {
                return Err(NetworkError::bad(
                    "a subnetpool must be specified in the absence of a cidr",
                ))
            }
            (None, Some(c)) => Alloc::Fixed(c),
            (Some(p), Some(c)) => Alloc::Pool(p, PoolRequest::Specific(c)),
            (Some(p), None) => {
                if req.allocation_pools.is_some() {
                    return Err(NetworkError::bad(
                        "allocation_pools allowed only for specific subnet requests.",
                    ));
                }
                Alloc::Pool(
                    p,
                    PoolRequest::Any {
                        prefixlen: req.prefixlen,
                    },
                )
            }
        };
        let dns = check_dns(&req.dns_nameservers.clone().unwrap_or_default())?;
        let tags = check_tags(&req.tags.clone().unwrap_or_default())?;
        let id = new_id();
        let now = now_secs();
        // Everything that depends on the cidr, which a pool chooses only when the transaction
        // is built.
        let record = |cidr: Cidr, subnetpool_id: Option<String>| -> NetResult<SubnetRecord> {
            if cidr.prefix() == 0 {
                return Err(NetworkError::bad(format!(
                    "Invalid input for cidr. Reason: {cidr} is not a subnet."
                )));
            }
            let version = req.ip_version.unwrap_or(cidr.version());
            if version != cidr.version() {
                return Err(NetworkError::bad(format!(
                    "Invalid input for operation: the cidr {cidr} is not an IPv{version} prefix."
                )));
            }
            if cidr.touches_mapped() {
                return Err(NetworkError::bad(format!(
                    "Invalid input for cidr. Reason: {cidr} overlaps the IPv4-mapped range \
                 ::ffff:0:0/96, which is not a subnet."
                )));
            }
            let enable_dhcp = req.enable_dhcp.unwrap_or(true);
            check_ipv6_modes(&cidr, enable_dhcp, &ra_mode, &address_mode)?;
            let gateway = match &req.gateway_ip {
                None => ipam::default_gateway(&cidr),
                Some(None) => None,
                Some(Some(g)) => Some(ipam::check_gateway(&cidr, g)?),
            };
            let pools = match &req.allocation_pools {
                Some(p) => ipam::check_pools(&cidr, gateway, p)?,
                None => ipam::default_pools(&cidr, gateway),
            };
            let routes = check_routes(&req.host_routes.clone().unwrap_or_default(), &cidr)?;
            Ok(SubnetRecord {
                id: id.clone(),
                project_id: project.clone(),
                network_id: net.id.clone(),
                name: name.clone(),
                description: description.clone(),
                cidr: cidr.to_string(),
                gateway_ip: gateway.map(ip_string),
                allocation_pools: ipam::to_pools(&pools),
                dns_nameservers: dns.clone(),
                host_routes: routes,
                enable_dhcp,
                tags: tags.clone(),
                created_at: now,
                updated_at: now,
                revision_number: 1,
                ip_version: version,
                ipv6_ra_mode: ra_mode.clone(),
                ipv6_address_mode: address_mode.clone(),
                router_external: net.external,
                subnetpool_id,
            })
        };
        if let Alloc::Fixed(c) = alloc {
            // A bad layout is refused before anything is read.
            record(c, None)?;
        }
        let net_id = net.id.clone();
        shoal_state::retry(
            tables::NETWORKS,
            &net_id,
            shoal_state::DEFAULT_ATTEMPTS,
            || async {
                self.barrier().await?;
                let Some(current) = self.networks().get(&net_id).await? else {
                    return Err(NetworkError::not_found(Resource::Network, &net_id));
                };
                let (cidr, pool) = match &alloc {
                    Alloc::Fixed(c) => (*c, None),
                    Alloc::Pool(id, request) => {
                        let (c, p) = self.carve(id, &project, req.ip_version, *request).await?;
                        (c, Some(p))
                    }
                };
                let rec = record(cidr, pool.as_ref().map(|p| p.value.id.clone()))?;
                for sid in &current.value.subnets {
                    let Some(other) = self.subnets().get(sid).await? else {
                        continue;
                    };
                    if Cidr::parse(&other.value.cidr).is_ok_and(|c| c.overlaps(&cidr)) {
                        return Err(NetworkError::invalid(format!(
                        "Requested subnet with cidr: {cidr} for network: {net_id} overlaps with \
                         another subnet."
                    )));
                    }
                }
                let mut n = current.value;
                n.subnets.push(rec.id.clone());
                n.bump(now);
                let txn = Txn::new()
                    .when(
                        tables::NETWORKS,
                        &net_id,
                        Expect::Revision(current.revision),
                    )
                    .when(tables::SUBNETS, &rec.id, Expect::Absent)
                    .put(tables::NETWORKS, &net_id, self.networks().encode(&n))
                    .put(tables::SUBNETS, &rec.id, self.subnets().encode(&rec));
                let txn = match &pool {
                    Some(p) => self.hold_pool(txn, p),
                    None => txn,
                };
                let txn = count_in(txn, &project, "subnet", &rec.id);
                let resp = self.create_within_quota(&project, "subnet", txn).await?;
                Ok(resp.succeeded.then_some(rec))
            },
        )
        .await
    }

    pub async fn update_subnet(
        &self,
        caller: &Caller,
        id: &str,
        req: SubnetUpdate,
    ) -> NetResult<SubnetRecord> {
        let current = self.changeable_subnet(caller, id, "update_subnet").await?;
        for (given, attr) in [
            (req.cidr.is_some(), "cidr"),
            (req.network_id.is_some(), "network_id"),
            (req.ip_version.is_some(), "ip_version"),
            (req.ipv6_ra_mode.is_some(), "ipv6_ra_mode"),
            (req.ipv6_address_mode.is_some(), "ipv6_address_mode"),
        ] {
            if given {
                return Err(NetworkError::bad(format!(
                    "Cannot update read-only attribute {attr}"
                )));
            }
        }
        if let Some(n) = &req.name {
            check_text("name", n)?;
        }
        if let Some(Some(d)) = &req.description {
            check_text("description", d)?;
        }
        let cidr = Cidr::parse(&current.cidr).map_err(NetworkError::bad)?;
        let gateway = match &req.gateway_ip {
            None => current.gateway_ip.as_deref().and_then(|g| parse_ip(g).ok()),
            Some(None) => None,
            Some(Some(g)) => Some(ipam::check_gateway(&cidr, g)?),
        };
        let pools = match &req.allocation_pools {
            Some(p) => ipam::check_pools(&cidr, gateway, p)?,
            None => ipam::check_pools(&cidr, gateway, &current.allocation_pools)?,
        };
        if let Some(Some(g)) = &req.gateway_ip {
            // A gateway may not take an address a port already holds.
            let key = format!("{id}/{g}");
            if let Some(holder) = self.index(tables::IP_ALLOCATIONS).get(&key).await? {
                return Err(NetworkError::conflict(
                    "GatewayIpInUse",
                    format!(
                        "Current gateway ip {g} already in use by port {}. Unable to update.",
                        holder.value
                    ),
                ));
            }
        }
        let dns = req.dns_nameservers.as_deref().map(check_dns).transpose()?;
        let routes = req
            .host_routes
            .as_deref()
            .map(|r| check_routes(r, &cidr))
            .transpose()?;
        if req.enable_dhcp == Some(false) {
            check_ipv6_modes(
                &cidr,
                false,
                &current.ipv6_ra_mode,
                &current.ipv6_address_mode,
            )?;
        }
        let now = now_secs();
        let v = self
            .subnets()
            .update(id, |s| {
                if let Some(x) = &req.name {
                    s.name = x.clone();
                }
                if let Some(x) = &req.description {
                    s.description = x.clone().unwrap_or_default();
                }
                s.gateway_ip = gateway.map(ip_string);
                s.allocation_pools = ipam::to_pools(&pools);
                if let Some(x) = &dns {
                    s.dns_nameservers = x.clone();
                }
                if let Some(x) = &routes {
                    s.host_routes = x.clone();
                }
                if let Some(x) = req.enable_dhcp {
                    s.enable_dhcp = x;
                }
                s.bump(now);
                Ok::<(), NetworkError>(())
            })
            .await?;
        Ok(SubnetRecord {
            router_external: current.router_external,
            ..v.value
        })
    }

    /// Deletes a subnet no port holds an address of (the `network_deleting` mark keeps port
    /// creates from taking one meanwhile, as for networks).
    pub async fn delete_subnet(&self, caller: &Caller, id: &str) -> NetResult<()> {
        let current = self.changeable_subnet(caller, id, "delete_subnet").await?;
        self.with_delete_mark("subnet", Resource::Subnet, id, || {
            self.finish_subnet_delete(&current)
        })
        .await
    }

    async fn finish_subnet_delete(&self, s: &SubnetRecord) -> NetResult<()> {
        let mark = deleting_key("subnet", &s.id);
        shoal_state::retry(
            tables::SUBNETS,
            &s.id,
            shoal_state::DEFAULT_ATTEMPTS,
            || async {
                self.barrier().await?;
                let held = self
                    .index(tables::IP_ALLOCATIONS)
                    .list(&format!("{}/", s.id))
                    .await?;
                let in_use = || {
                    NetworkError::conflict(
                        "SubnetInUse",
                        format!(
                            "Unable to complete operation on subnet {}: One or more ports have \
                             an IP allocation from this subnet.",
                            s.id
                        ),
                    )
                };
                if !held.rows.is_empty() && !s.auto_address() {
                    return Err(in_use());
                }
                // The subnet's precondition comes first: a failure of it means "gone".
                let mut txn = Txn::new().when(tables::SUBNETS, &s.id, Expect::Present);
                // An auto-address (SLAAC, DHCPv6-stateless) subnet goes even while ports hold
                // its addresses, as in Neutron: they lose them with it. A router's port keeps
                // it in use.
                for (key, holder) in &held.rows {
                    let Some(port) = self.ports().get(&holder.value).await? else {
                        continue;
                    };
                    if port.value.device_owner.starts_with("network:router") {
                        return Err(in_use());
                    }
                    let mut p = port.value;
                    p.fixed_ips.retain(|f| f.subnet_id != s.id);
                    p.bump(now_secs());
                    txn = txn
                        .when(tables::PORTS, &p.id, Expect::Revision(port.revision))
                        .put(tables::PORTS, &p.id, self.ports().encode(&p))
                        .delete(tables::IP_ALLOCATIONS, key);
                }
                let mut txn = txn
                    .delete(tables::SUBNETS, &s.id)
                    .delete(tables::NETWORK_DELETING, &mark);
                if let Some(net) = self.networks().get(&s.network_id).await? {
                    let mut n = net.value;
                    n.subnets.retain(|x| x != &s.id);
                    n.bump(now_secs());
                    txn = txn
                        .when(tables::NETWORKS, &n.id, Expect::Revision(net.revision))
                        .put(tables::NETWORKS, &n.id, self.networks().encode(&n));
                }
                let txn = uncount_in(txn, &s.project_id, "subnet", &s.id);
                let resp = self.state.write(tables::SUBNETS, txn).await?;
                if !resp.succeeded && resp.failed_precondition == Some(0) {
                    return Err(NetworkError::not_found(Resource::Subnet, &s.id));
                }
                Ok(resp.succeeded.then_some(()))
            },
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{admin, member, service};
    use crate::NetworkCreate;

    async fn net(s: &NetworkService, who: &Caller) -> String {
        s.create_network(who, NetworkCreate::default())
            .await
            .unwrap()
            .id
    }

    fn req(network_id: &str, cidr: &str) -> SubnetCreate {
        SubnetCreate {
            network_id: network_id.into(),
            cidr: Some(cidr.into()),
            ip_version: Some(4),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn defaults_and_layout() {
        let s = service();
        let p = member("p");
        let n = net(&s, &p).await;
        let sub = s.create_subnet(&p, req(&n, "10.0.0.0/24")).await.unwrap();
        assert_eq!(sub.gateway_ip.as_deref(), Some("10.0.0.1"));
        assert_eq!(
            sub.allocation_pools,
            vec![Pool {
                start: "10.0.0.2".into(),
                end: "10.0.0.254".into()
            }]
        );
        assert!(sub.enable_dhcp);
        assert_eq!(
            s.network(&p, &n).await.unwrap().subnets,
            vec![sub.id.clone()]
        );
        let none = s
            .create_subnet(
                &p,
                SubnetCreate {
                    gateway_ip: Some(None),
                    ..req(&n, "10.1.0.0/24")
                },
            )
            .await
            .unwrap();
        assert_eq!(none.gateway_ip, None);
        assert_eq!(none.allocation_pools[0].start, "10.1.0.1");
    }

    #[tokio::test]
    async fn bad_layouts_are_refused_clearly() {
        let s = service();
        let p = member("p");
        let n = net(&s, &p).await;
        let e = s
            .create_subnet(&p, req(&n, "10.0.0.5/24"))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("10.0.0.0/24' is recommended"), "{e}");
        let e = s
            .create_subnet(&p, req(&n, "300.0.0.0/24"))
            .await
            .unwrap_err();
        assert!(matches!(e, NetworkError::BadRequest { .. }));
        let pools = SubnetCreate {
            allocation_pools: Some(vec![Pool {
                start: "10.0.0.10".into(),
                end: "10.0.1.10".into(),
            }]),
            ..req(&n, "10.0.0.0/24")
        };
        let e = s.create_subnet(&p, pools).await.unwrap_err();
        assert_eq!(e.neutron_type(), "OutOfBoundsAllocationPool");
        let v6 = SubnetCreate {
            ip_version: Some(6),
            ..req(&n, "10.0.0.0/24")
        };
        assert!(s.create_subnet(&p, v6).await.is_err());
        let dns = SubnetCreate {
            dns_nameservers: Some(vec!["8.8.8.8".into(), "8.8.8.8".into()]),
            ..req(&n, "10.0.0.0/24")
        };
        assert!(s
            .create_subnet(&p, dns)
            .await
            .unwrap_err()
            .to_string()
            .contains("Duplicate"));
        let missing = s
            .create_subnet(&p, req("nope", "10.0.0.0/24"))
            .await
            .unwrap_err();
        assert_eq!(missing.neutron_type(), "NetworkNotFound");
    }

    #[tokio::test]
    async fn ipv6_subnets_and_their_modes() {
        let s = service();
        let p = member("p");
        let n = net(&s, &p).await;
        let v6 = |cidr: &str, ra: Option<&str>, addr: Option<&str>| SubnetCreate {
            ip_version: Some(6),
            ipv6_ra_mode: ra.map(|m| serde_json::Value::String(m.into())),
            ipv6_address_mode: addr.map(|m| serde_json::Value::String(m.into())),
            ..req(&n, cidr)
        };
        let sub = s
            .create_subnet(&p, v6("2001:db8::/64", Some("slaac"), Some("slaac")))
            .await
            .unwrap();
        assert_eq!(sub.gateway_ip.as_deref(), Some("2001:db8::1"));
        assert_eq!(sub.allocation_pools[0].start, "2001:db8::2");
        assert_eq!(sub.allocation_pools[0].end, "2001:db8::ffff:ffff:ffff:ffff");
        assert_eq!(
            (sub.ip_version, sub.ipv6_address_mode.as_deref()),
            (6, Some("slaac"))
        );
        // Overlaps are per family: an IPv4 subnet beside it is fine, an IPv6 one inside is not.
        s.create_subnet(&p, req(&n, "10.0.0.0/24")).await.unwrap();
        let e = s
            .create_subnet(&p, v6("2001:db8::/80", None, None))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("overlaps"), "{e}");
        for (bad, says) in [
            (
                v6("2001:db9::/64", Some("slaac"), Some("dhcpv6-stateful")),
                "must be the same",
            ),
            (v6("2001:db9::/80", None, Some("slaac")), "prefix to be /64"),
            (v6("2001:db9::/64", Some("sleepy"), None), "is not in"),
            (
                SubnetCreate {
                    ip_version: Some(4),
                    ..v6("2001:db9::/64", None, None)
                },
                "not an IPv4 prefix",
            ),
            (v6("::/64", None, None), "IPv4-mapped"),
            (
                SubnetCreate {
                    enable_dhcp: Some(false),
                    ..v6("2001:db9::/64", Some("slaac"), None)
                },
                "enable_dhcp",
            ),
            (
                SubnetCreate {
                    host_routes: Some(vec![HostRoute {
                        destination: "10.9.0.0/16".into(),
                        nexthop: "2001:db9::5".into(),
                    }]),
                    ..v6("2001:db9::/64", None, None)
                },
                "IP version",
            ),
        ] {
            let e = s.create_subnet(&p, bad).await.unwrap_err();
            assert!(matches!(e, NetworkError::BadRequest { .. }), "{e}");
            assert!(e.to_string().contains(says), "{e} lacks {says}");
        }
        let e = s
            .update_subnet(
                &p,
                &sub.id,
                SubnetUpdate {
                    ipv6_ra_mode: Some(serde_json::json!("slaac")),
                    ..Default::default()
                },
            )
            .await
            .unwrap_err();
        assert!(e.to_string().contains("read-only"), "{e}");
    }

    #[tokio::test]
    async fn overlaps_are_refused_on_one_network_only() {
        let s = service();
        let p = member("p");
        let a = net(&s, &p).await;
        let b = net(&s, &p).await;
        s.create_subnet(&p, req(&a, "10.0.0.0/16")).await.unwrap();
        let e = s
            .create_subnet(&p, req(&a, "10.0.5.0/24"))
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("overlaps with another subnet"),
            "{e}"
        );
        s.create_subnet(&p, req(&b, "10.0.5.0/24")).await.unwrap();
    }

    /// Concurrent creates of overlapping subnets on one network: exactly one wins.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_overlapping_subnets_one_wins() {
        let s = service();
        let p = member("p");
        let n = net(&s, &p).await;
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let (s, p, n) = (s.clone(), p.clone(), n.clone());
                tokio::spawn(async move {
                    s.create_subnet(&p, req(&n, &format!("10.0.{}.0/24", i % 2)))
                        .await
                })
            })
            .collect();
        let mut ok = 0;
        for t in tasks {
            if t.await.unwrap().is_ok() {
                ok += 1;
            }
        }
        assert_eq!(ok, 2, "one per distinct CIDR");
        assert_eq!(s.list_subnets(&p).await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn only_the_network_owner_adds_subnets() {
        let s = service();
        let shared = s
            .create_network(
                &admin(),
                NetworkCreate {
                    shared: Some(true),
                    ..Default::default()
                },
            )
            .await
            .unwrap()
            .id;
        let e = s
            .create_subnet(&member("q"), req(&shared, "10.0.0.0/24"))
            .await
            .unwrap_err();
        assert!(matches!(e, NetworkError::Forbidden(_)));
        let sub = s
            .create_subnet(&admin(), req(&shared, "10.0.0.0/24"))
            .await
            .unwrap();
        // Visible to all through the shared network.
        s.subnet(&member("q"), &sub.id).await.unwrap();
        assert!(matches!(
            s.delete_subnet(&member("q"), &sub.id).await,
            Err(NetworkError::Forbidden(_))
        ));
        s.delete_subnet(&admin(), &sub.id).await.unwrap();
        assert!(s
            .network(&admin(), &shared)
            .await
            .unwrap()
            .subnets
            .is_empty());
    }
}
