//! Ports: their addresses (IPAM), MAC, security groups and binding.
//!
//! A port create is one transaction: the port row, one `ip_allocations` row per address and a
//! `port_macs` row, each with an `Absent` precondition, plus `Present` preconditions on the
//! network, subnets and security groups it uses and `Absent` ones on their `network_deleting`
//! marks. Whichever node serves it, no address or MAC is ever held twice; an address or MAC
//! this node picked that a concurrent create took first is picked again.

use std::collections::{BTreeSet, HashMap, HashSet};

use serde::Deserialize;
use shoal_state::records::{AddressPair, ExtraDhcpOpt, FixedIp, PortRecord};
use shoal_state::{tables, Expect, Txn};

use crate::ip::{eui64, family_of, ip_string, parse_ip, shown, Addr, Cidr};
use crate::ipam;
use crate::networks::deleting_key;
use crate::quotas::{bypass_in, count_in, uncount_in};
use crate::records::{NetworkRecord, SubnetRecord};
use crate::{
    check_tags, check_text, new_id, now_secs, nullable, Caller, NetResult, NetworkError,
    NetworkService, Resource,
};

/// Rounds a create makes when an address or MAC it picked was taken meanwhile.
const PICK_ROUNDS: u32 = 30;
/// Neutron's `max_allowed_address_pair` and a bound on addresses per port.
const MAX_ADDRESS_PAIRS: usize = 10;
const MAX_FIXED_IPS: usize = 16;
/// A bound on security groups per port (each is two preconditions of the port's transaction).
const MAX_GROUPS: usize = 64;

#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixedIpRequest {
    pub subnet_id: Option<String>,
    pub ip_address: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddressPairRequest {
    pub ip_address: String,
    pub mac_address: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortCreate {
    pub network_id: String,
    pub name: Option<String>,
    pub description: Option<String>,
    pub admin_state_up: Option<bool>,
    pub mac_address: Option<String>,
    pub fixed_ips: Option<Vec<FixedIpRequest>>,
    pub device_id: Option<String>,
    pub device_owner: Option<String>,
    #[serde(rename = "binding:host_id")]
    pub binding_host_id: Option<String>,
    #[serde(rename = "binding:vnic_type")]
    pub binding_vnic_type: Option<String>,
    #[serde(rename = "binding:profile")]
    pub binding_profile: Option<serde_json::Value>,
    pub security_groups: Option<Vec<String>>,
    pub port_security_enabled: Option<bool>,
    pub allowed_address_pairs: Option<Vec<AddressPairRequest>>,
    pub tags: Option<Vec<String>>,
    pub project_id: Option<String>,
    pub tenant_id: Option<String>,
    // Accepted so that a request using them gets a clear answer rather than "unrecognized".
    pub qos_policy_id: Option<serde_json::Value>,
    pub dns_name: Option<serde_json::Value>,
    pub dns_domain: Option<serde_json::Value>,
    pub extra_dhcp_opts: Option<Vec<ExtraDhcpOptRequest>>,
}

/// One of `extra_dhcp_opts` as a request gives it; a `null` value (on update) removes the
/// option of that name and family.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtraDhcpOptRequest {
    pub opt_name: String,
    pub opt_value: Option<String>,
    pub ip_version: Option<serde_json::Value>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortUpdate {
    pub name: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub description: Option<Option<String>>,
    pub admin_state_up: Option<bool>,
    pub mac_address: Option<String>,
    pub fixed_ips: Option<Vec<FixedIpRequest>>,
    pub device_id: Option<String>,
    pub device_owner: Option<String>,
    #[serde(rename = "binding:host_id")]
    pub binding_host_id: Option<String>,
    #[serde(rename = "binding:vnic_type")]
    pub binding_vnic_type: Option<String>,
    #[serde(rename = "binding:profile")]
    pub binding_profile: Option<serde_json::Value>,
    pub security_groups: Option<Vec<String>>,
    pub port_security_enabled: Option<bool>,
    pub allowed_address_pairs: Option<Vec<AddressPairRequest>>,
    pub qos_policy_id: Option<serde_json::Value>,
    pub dns_name: Option<serde_json::Value>,
    pub dns_domain: Option<serde_json::Value>,
    pub extra_dhcp_opts: Option<Vec<ExtraDhcpOptRequest>>,
}

/// Neutron's `extra_dhcp_opts` merge: each requested option replaces the port's option of the
/// same name and family, is added when there is none, and a `null` value removes it. Names
/// are not checked against what the DHCP server sends (ML2/OVN logs and skips those too).
fn merge_dhcp_opts(
    current: &[ExtraDhcpOpt],
    req: &[ExtraDhcpOptRequest],
    create: bool,
) -> NetResult<Vec<ExtraDhcpOpt>> {
    let bad =
        |m: String| NetworkError::bad(format!("Invalid input for extra_dhcp_opts. Reason: {m}."));
    let mut out = current.to_vec();
    for o in req {
        let name = o.opt_name.trim();
        if name.is_empty() {
            return Err(bad("opt_name must not be empty".into()));
        }
        check_text("extra_dhcp_opts:opt_name", name)?;
        let version = match &o.ip_version {
            None | Some(serde_json::Value::Null) => 4,
            Some(v) => match v
                .as_u64()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            {
                Some(4) => 4,
                Some(6) => 6,
                _ => return Err(bad(format!("ip_version {v} is not in [4, 6]"))),
            },
        };
        let at = out
            .iter()
            .position(|x| x.opt_name == name && x.ip_version == version);
        match (&o.opt_value, at) {
            (Some(v), _) if v.trim().is_empty() => {
                return Err(bad(format!("the value of {name} must not be empty")))
            }
            (Some(_), Some(i)) if create => {
                return Err(bad(format!(
                    "{name} (IPv{version}) is given twice: {:?}",
                    out[i].opt_value
                )));
            }
            (Some(v), Some(i)) => {
                check_text("extra_dhcp_opts:opt_value", v)?;
                out[i].opt_value = v.clone();
            }
            (Some(v), None) => {
                check_text("extra_dhcp_opts:opt_value", v)?;
                out.push(ExtraDhcpOpt {
                    opt_name: name.to_owned(),
                    opt_value: v.clone(),
                    ip_version: version,
                });
            }
            (None, _) if create => {
                return Err(bad(format!("{name} has no value")));
            }
            (None, Some(i)) => {
                out.remove(i);
            }
            (None, None) => {}
        }
    }
    if out.len() > MAX_DHCP_OPTS {
        return Err(bad(format!(
            "a port carries at most {MAX_DHCP_OPTS} options"
        )));
    }
    Ok(out)
}

/// A bound on a port's `extra_dhcp_opts` (every option is sent in one reply).
const MAX_DHCP_OPTS: usize = 32;

/// The attributes of a create or update that policy and support are checked on.
struct Asks<'a> {
    fixed_ips: Option<&'a [FixedIpRequest]>,
    mac_address: Option<&'a str>,
    port_security_enabled: Option<bool>,
    allowed_address_pairs: bool,
    device_owner: Option<&'a str>,
    device_id: Option<&'a str>,
    binding_host_id: Option<&'a str>,
    binding_vnic_type: Option<&'a String>,
    unsupported: [(Option<&'a serde_json::Value>, &'static str); 4],
}

impl Asks<'_> {
    /// Neutron's default policy on port attributes for `action` (`create_port`,
    /// `update_port`): what only the network's owner or an admin (`privileged`) may set, what
    /// only an admin may set, and what Shoal does not support.
    fn check(&self, action: &str, admin: bool, privileged: bool) -> NetResult<()> {
        let named_ip = self
            .fixed_ips
            .is_some_and(|l| l.iter().any(|f| f.ip_address.is_some()));
        let network_owner = self.device_owner.is_some_and(|o| o.starts_with("network:"));
        for (asked, attr) in [
            (named_ip, "fixed_ips:ip_address"),
            (self.mac_address.is_some(), "mac_address"),
            (
                self.port_security_enabled.is_some(),
                "port_security_enabled",
            ),
            (self.allowed_address_pairs, "allowed_address_pairs"),
            (network_owner, "device_owner"),
        ] {
            if asked && !privileged {
                return Err(NetworkError::policy(&format!("{action}:{attr}")));
            }
        }
        if self.binding_host_id.is_some_and(|h| !h.is_empty()) && !admin {
            return Err(NetworkError::policy(&format!("{action}:binding:host_id")));
        }
        check_vnic(self.binding_vnic_type)?;
        for (value, attr) in self.unsupported {
            unsupported(value, attr)?;
        }
        for (v, f) in [
            (self.device_id, "device_id"),
            (self.device_owner, "device_owner"),
            (self.binding_host_id, "binding:host_id"),
        ] {
            check_text(f, v.unwrap_or(""))?;
        }
        Ok(())
    }
}

macro_rules! asks {
    ($t:ty) => {
        impl $t {
            fn asks(&self) -> Asks<'_> {
                Asks {
                    fixed_ips: self.fixed_ips.as_deref(),
                    mac_address: self.mac_address.as_deref(),
                    port_security_enabled: self.port_security_enabled,
                    allowed_address_pairs: self.allowed_address_pairs.is_some(),
                    device_owner: self.device_owner.as_deref(),
                    device_id: self.device_id.as_deref(),
                    binding_host_id: self.binding_host_id.as_deref(),
                    binding_vnic_type: self.binding_vnic_type.as_ref(),
                    unsupported: [
                        (self.binding_profile.as_ref(), "binding:profile"),
                        (self.qos_policy_id.as_ref(), "qos_policy_id"),
                        (self.dns_name.as_ref(), "dns_name"),
                        (self.dns_domain.as_ref(), "dns_domain"),
                    ],
                }
            }
        }
    };
}

asks!(PortCreate);
asks!(PortUpdate);

/// What a precondition of a port's transaction guards, to tell a failure's cause.
#[derive(Debug, Clone)]
enum Guard {
    Network,
    NetworkDeleting,
    Subnet(String),
    SubnetDeleting(String),
    Address {
        subnet: String,
        ip: String,
        chosen: bool,
    },
    Mac {
        chosen: bool,
    },
    Group(String),
    GroupDeleting(String),
    Port,
}

/// A transaction with a record of what each precondition guards.
struct Guarded {
    txn: Txn,
    guards: Vec<Guard>,
}

impl Guarded {
    fn new() -> Self {
        Self {
            txn: Txn::new(),
            guards: Vec::new(),
        }
    }

    fn when(mut self, table: &str, key: &str, expect: Expect, guard: Guard) -> Self {
        self.txn = self.txn.when(table, key, expect);
        self.guards.push(guard);
        self
    }
}

/// A port create after its policy checks: the record (addresses, MAC and address pairs still
/// to choose) and what the request asked of them.
struct NewPort {
    rec: PortRecord,
    fixed_ips: Option<Vec<FixedIpRequest>>,
    chosen_mac: Option<String>,
    pairs: Vec<AddressPairRequest>,
}

/// A port the service makes for one of its own resources.
pub(crate) struct ServicePort {
    /// The router's project for an interface; empty for a gateway or a floating IP's port, as
    /// Neutron leaves them (only admins see them).
    pub project: String,
    pub network_id: String,
    pub fixed_ips: Option<Vec<FixedIpRequest>>,
    pub device_owner: &'static str,
    pub device_id: String,
}

/// Who the service acts as when it makes its own ports: it sees every network.
fn service_caller() -> Caller {
    Caller {
        project_id: None,
        admin: true,
        member: true,
    }
}

/// What a request asks of one address.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Want {
    /// Any address from the network's subnets of this IP version that hand addresses out of
    /// their pools: a port created without fixed_ips gets one IPv4 and one stateful IPv6
    /// address, as in Neutron.
    Any(u8),
    /// An address from this subnet.
    From(String),
    /// This address, on this subnet.
    Exactly(String, Addr),
    /// The port's EUI-64 address on this auto-address (SLAAC, DHCPv6-stateless) subnet.
    Auto(String),
}

fn unsupported(value: Option<&serde_json::Value>, attr: &str) -> NetResult<()> {
    let given = value.is_some_and(|v| match v {
        serde_json::Value::Null => false,
        serde_json::Value::String(s) => !s.is_empty(),
        serde_json::Value::Array(a) => !a.is_empty(),
        serde_json::Value::Object(o) => !o.is_empty(),
        _ => true,
    });
    if given {
        Err(NetworkError::bad(format!(
            "{attr} is not supported by Shoal's network service"
        )))
    } else {
        Ok(())
    }
}

fn check_vnic(v: Option<&String>) -> NetResult<()> {
    match v.map(String::as_str) {
        None | Some("normal") => Ok(()),
        Some(other) => Err(NetworkError::invalid(format!(
            "binding:vnic_type '{}' is not supported: ports are tap devices (normal)",
            shown(other)
        ))),
    }
}

/// A MAC address Neutron accepts: six hex octets separated by ':', unicast, not all zero.
/// Returned in lower case.
pub fn check_mac(mac: &str) -> NetResult<String> {
    let octets: Vec<&str> = mac.split(':').collect();
    let parsed: Option<Vec<u8>> = (octets.len() == 6)
        .then(|| {
            octets
                .iter()
                .map(|o| {
                    (o.len() == 2)
                        .then(|| u8::from_str_radix(o, 16).ok())
                        .flatten()
                })
                .collect()
        })
        .flatten();
    match parsed {
        Some(b) if b[0] & 1 == 0 && b.iter().any(|x| *x != 0) => Ok(mac.to_ascii_lowercase()),
        _ => Err(NetworkError::bad(format!(
            "Invalid input for mac_address. Reason: '{}' is not a valid unicast MAC address.",
            shown(mac)
        ))),
    }
}

/// OpenStack's prefix, as Neutron's `base_mac` default: `fa:16:3e` and three random octets.
fn generate_mac() -> String {
    let b: [u8; 3] = rand::random();
    format!("fa:16:3e:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
}

fn check_pairs(pairs: &[AddressPairRequest], own_mac: &str) -> NetResult<Vec<AddressPair>> {
    if pairs.len() > MAX_ADDRESS_PAIRS {
        return Err(NetworkError::bad(format!(
            "Exceeded maximum amount of allowed address pairs {MAX_ADDRESS_PAIRS}"
        )));
    }
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(pairs.len());
    for p in pairs {
        let ip = match family_of(&p.ip_address) {
            Some(true) => Cidr::parse_normalized(&p.ip_address)
                .map(|c| if c.prefix() == 32 { ip_string(c.first()) } else { c.to_string() })
                .map_err(|m| NetworkError::bad(format!("Invalid input for allowed_address_pairs. Reason: {m}.")))?,
            Some(false) => crate::ip::normalize_prefix(&p.ip_address, true)
                .map(|c| c.strip_suffix("/128").map(str::to_owned).unwrap_or(c))
                .map_err(|m| NetworkError::bad(format!("Invalid input for allowed_address_pairs. Reason: {m}.")))?,
            None => {
                return Err(NetworkError::bad(format!(
                    "Invalid input for allowed_address_pairs. Reason: '{}' is not a valid IP address or CIDR.",
                    shown(&p.ip_address)
                )))
            }
        };
        let mac = match &p.mac_address {
            Some(m) => check_mac(m)?,
            None => own_mac.to_owned(),
        };
        if !seen.insert((ip.clone(), mac.clone())) {
            return Err(NetworkError::bad("Request contains duplicate address pair"));
        }
        out.push(AddressPair {
            ip_address: ip,
            mac_address: mac,
        });
    }
    Ok(out)
}

/// May see port `p`: admins, its project, and the owner of its network.
fn sees_port(caller: &Caller, p: &PortRecord, net: Option<&NetworkRecord>) -> bool {
    caller.admin || caller.owns(&p.project_id) || net.is_some_and(|n| caller.owns(&n.project_id))
}

fn may_change_port(caller: &Caller, p: &PortRecord, net: Option<&NetworkRecord>) -> bool {
    caller.may_change(&p.project_id) || net.is_some_and(|n| caller.may_change(&n.project_id))
}

impl NetworkService {
    pub async fn port(&self, caller: &Caller, id: &str) -> NetResult<PortRecord> {
        self.barrier().await?;
        if let Some(p) = self.ports().get(id).await? {
            let net = self
                .networks()
                .get(&p.value.network_id)
                .await?
                .map(|n| n.value);
            if sees_port(caller, &p.value, net.as_ref()) {
                return Ok(p.value);
            }
        }
        Err(NetworkError::not_found(Resource::Port, id))
    }

    pub async fn list_ports(&self, caller: &Caller) -> NetResult<Vec<PortRecord>> {
        self.barrier().await?;
        let owned: HashSet<String> = if caller.admin {
            HashSet::new()
        } else {
            self.networks()
                .list("")
                .await?
                .into_values()
                .filter(|n| caller.owns(&n.project_id))
                .map(|n| n.id)
                .collect()
        };
        Ok(self
            .ports()
            .list("")
            .await?
            .into_values()
            .filter(|p| caller.admin || caller.owns(&p.project_id) || owned.contains(&p.network_id))
            .collect())
    }

    /// Checks requested addresses against the network's subnets and says what to allocate
    /// for a port with `device_owner` `owner`. Every port but a router's or a floating IP's
    /// also gets its address on each auto-address subnet, named or not (Neutron's rule; a
    /// router takes the gateway address there instead). A floating IP's port takes one IPv4
    /// address only.
    fn wants(
        &self,
        net: &NetworkRecord,
        subnets: &HashMap<String, SubnetRecord>,
        req: &Option<Vec<FixedIpRequest>>,
        owner: &str,
    ) -> NetResult<Vec<Want>> {
        let router = owner.starts_with("network:router");
        let floating = owner == crate::routers::FLOATING_IP_OWNER;
        let ordered = || net.subnets.iter().filter_map(|id| subnets.get(id));
        let auto = |named: &[Want]| -> Vec<Want> {
            if router || floating {
                return Vec::new();
            }
            ordered()
                .filter(|s| s.auto_address())
                .filter(|s| {
                    !named
                        .iter()
                        .any(|w| matches!(w, Want::Auto(x) if *x == s.id))
                })
                .map(|s| Want::Auto(s.id.clone()))
                .collect()
        };
        let Some(list) = req else {
            let versions: &[u8] = if floating { &[4] } else { &[4, 6] };
            let mut out: Vec<Want> = versions
                .iter()
                .copied()
                .filter(|v| ordered().any(|s| s.ip_version == *v && (router || !s.auto_address())))
                .map(Want::Any)
                .collect();
            out.extend(auto(&out));
            return Ok(out);
        };
        if list.len() > MAX_FIXED_IPS {
            return Err(NetworkError::bad(format!(
                "Exceeded maximum amount of fixed ips per port ({MAX_FIXED_IPS})"
            )));
        }
        let mut out = Vec::with_capacity(list.len());
        let mut exact = BTreeSet::new();
        for f in list {
            let subnet = match &f.subnet_id {
                Some(id) => Some(subnets.get(id).ok_or_else(|| {
                    NetworkError::invalid(format!(
                        "Failed to create port on network {}, because fixed_ips included \
                         invalid subnet {}.",
                        net.id,
                        shown(id)
                    ))
                })?),
                None => None,
            };
            let want = match &f.ip_address {
                None => match subnet {
                    Some(s) if s.auto_address() && !router => Want::Auto(s.id.clone()),
                    Some(s) => Want::From(s.id.clone()),
                    None => {
                        return Err(NetworkError::invalid(
                            "a fixed_ips entry needs a subnet_id, an ip_address or both",
                        ))
                    }
                },
                Some(text) => {
                    let ip = parse_ip(text).map_err(|m| {
                        NetworkError::bad(format!("Invalid input for fixed_ips. Reason: {m}."))
                    })?;
                    let s = match subnet {
                        Some(s) => s,
                        None => subnets
                            .values()
                            .find(|s| Cidr::parse(&s.cidr).is_ok_and(|c| c.contains(ip)))
                            .ok_or_else(|| {
                                NetworkError::invalid(format!(
                                    "IP address {} is not a valid IP for any subnet of network {}.",
                                    ip_string(ip),
                                    net.id
                                ))
                            })?,
                    };
                    let cidr = Cidr::parse(&s.cidr).map_err(NetworkError::bad)?;
                    if !cidr.is_host(ip) {
                        return Err(NetworkError::invalid(format!(
                            "IP address {} is not a valid IP for the specified subnet.",
                            ip_string(ip)
                        )));
                    }
                    if s.auto_address() && !router {
                        return Err(NetworkError::invalid(format!(
                            "IPv6 address {} cannot be directly assigned to a port on subnet {} \
                             since the subnet is configured for automatic addresses",
                            ip_string(ip),
                            s.id
                        )));
                    }
                    if !exact.insert(ip) {
                        return Err(NetworkError::bad(format!(
                            "Invalid input for fixed_ips. Reason: Duplicate IP address '{}'.",
                            ip_string(ip)
                        )));
                    }
                    Want::Exactly(s.id.clone(), ip)
                }
            };
            out.push(want);
        }
        let implied = auto(&out);
        out.extend(implied);
        Ok(out)
    }

    /// Chooses the addresses of `wants` against what is allocated now, for a port with MAC
    /// `mac`. An address the request names that is held (or is the gateway, unless `router`
    /// says a router asks) is a 409.
    async fn choose_addresses(
        &self,
        net: &NetworkRecord,
        subnets: &HashMap<String, SubnetRecord>,
        wants: &[Want],
        (router, mac): (bool, &str),
        keep: &BTreeSet<(String, String)>,
    ) -> NetResult<Vec<(FixedIp, bool)>> {
        let mut used: HashMap<String, BTreeSet<Addr>> = HashMap::new();
        for s in subnets.values() {
            let held: BTreeSet<Addr> = self
                .index(tables::IP_ALLOCATIONS)
                .list(&format!("{}/", s.id))
                .await?
                .rows
                .iter()
                .filter_map(|(k, _)| parse_ip(k.rsplit('/').next()?).ok())
                .collect();
            used.insert(s.id.clone(), held);
        }
        // Addresses named anywhere in the request are not picked for another entry.
        for w in wants {
            if let Want::Exactly(sid, ip) = w {
                let addr = ip_string(*ip);
                let held = used.entry(sid.clone()).or_default();
                let is_gateway = subnets[sid].gateway_ip.as_deref() == Some(addr.as_str());
                let kept = keep.contains(&(sid.clone(), addr.clone()));
                if !kept && (held.contains(ip) || (is_gateway && !router)) {
                    return Err(NetworkError::conflict(
                        "IpAddressAlreadyAllocated",
                        format!("IP address {addr} already allocated in subnet {sid}"),
                    ));
                }
                held.insert(*ip);
            }
        }
        let mut out = Vec::with_capacity(wants.len());
        for w in wants {
            match w {
                Want::Exactly(sid, ip) => out.push((
                    FixedIp {
                        subnet_id: sid.clone(),
                        ip_address: ip_string(*ip),
                    },
                    false,
                )),
                Want::From(sid) => {
                    let s = &subnets[sid];
                    let held = used.entry(sid.clone()).or_default();
                    let ip =
                        ipam::pick(&ipam::ranges_of(&s.allocation_pools), held, rand::random())
                            .ok_or_else(|| {
                                NetworkError::conflict(
                                    "IpAddressGenerationFailure",
                                    format!("No more IP addresses available for subnet {sid}."),
                                )
                            })?;
                    held.insert(ip);
                    out.push((
                        FixedIp {
                            subnet_id: sid.clone(),
                            ip_address: ip_string(ip),
                        },
                        true,
                    ));
                }
                Want::Auto(sid) => {
                    let s = &subnets[sid];
                    let cidr = Cidr::parse(&s.cidr).map_err(NetworkError::bad)?;
                    let ip = eui64(&cidr, mac).ok_or_else(|| {
                        NetworkError::bad(format!("'{}' is not a valid MAC address", shown(mac)))
                    })?;
                    let addr = ip_string(ip);
                    let held = used.entry(sid.clone()).or_default();
                    if held.contains(&ip) && !keep.contains(&(sid.clone(), addr.clone())) {
                        return Err(NetworkError::conflict(
                            "IpAddressAlreadyAllocated",
                            format!("IP address {addr} already allocated in subnet {sid}"),
                        ));
                    }
                    held.insert(ip);
                    out.push((
                        FixedIp {
                            subnet_id: sid.clone(),
                            ip_address: addr,
                        },
                        true,
                    ));
                }
                Want::Any(version) => {
                    let mut got = None;
                    for sid in &net.subnets {
                        let Some(s) = subnets.get(sid) else { continue };
                        if s.ip_version != *version || (s.auto_address() && !router) {
                            continue;
                        }
                        let held = used.entry(sid.clone()).or_default();
                        let ranges = ipam::ranges_of(&s.allocation_pools);
                        if let Some(ip) = ipam::pick(&ranges, held, rand::random()) {
                            held.insert(ip);
                            got = Some(FixedIp {
                                subnet_id: sid.clone(),
                                ip_address: ip_string(ip),
                            });
                            break;
                        }
                    }
                    match got {
                        Some(f) => out.push((f, true)),
                        None => {
                            return Err(NetworkError::conflict(
                                "IpAddressGenerationFailure",
                                format!("No more IP addresses available on network {}.", net.id),
                            ))
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// The subnets of `net`, by id.
    async fn subnets_of(&self, net: &NetworkRecord) -> NetResult<HashMap<String, SubnetRecord>> {
        let mut out = HashMap::new();
        for sid in &net.subnets {
            if let Some(s) = self.subnets().get(sid).await? {
                out.insert(sid.clone(), s.value);
            }
        }
        Ok(out)
    }

    /// Checks the security groups a port of `project` names: each must exist and be the
    /// project's (or the caller an admin).
    async fn check_groups(
        &self,
        caller: &Caller,
        project: &str,
        ids: &[String],
    ) -> NetResult<Vec<String>> {
        if ids.len() > MAX_GROUPS {
            return Err(NetworkError::bad(format!(
                "A port may have at most {MAX_GROUPS} security groups."
            )));
        }
        let mut out: Vec<String> = Vec::with_capacity(ids.len());
        for id in ids {
            match self.groups().get(id).await? {
                Some(g) if caller.admin || g.value.project_id == project => {
                    if !out.contains(id) {
                        out.push(id.clone());
                    }
                }
                _ => return Err(NetworkError::not_found(Resource::SecurityGroup, id)),
            }
        }
        Ok(out)
    }

    pub async fn create_port(&self, caller: &Caller, req: PortCreate) -> NetResult<PortRecord> {
        let net = self.network(caller, &req.network_id).await?;
        let project = caller.project_for_create("create_port", &req.project_id, &req.tenant_id)?;
        let privileged = caller.admin || caller.owns(&net.project_id);
        req.asks().check("create_port", caller.admin, privileged)?;
        let name = req.name.clone().unwrap_or_default();
        check_text("name", &name)?;
        let description = req.description.clone().unwrap_or_default();
        check_text("description", &description)?;
        let chosen_mac = req.mac_address.as_deref().map(check_mac).transpose()?;
        let port_security = req
            .port_security_enabled
            .unwrap_or(net.port_security_enabled);
        let groups = match (&req.security_groups, port_security) {
            (Some(g), false) if !g.is_empty() => {
                return Err(NetworkError::BadRequest {
                    kind: "PortSecurityAndIPRequiredForSecurityGroups",
                    message: "Port security must be enabled and port must have an IP address in \
                              order to use security groups."
                        .into(),
                })
            }
            (_, false) => Vec::new(),
            (Some(g), true) => {
                self.barrier().await?;
                self.check_groups(caller, &project, g).await?
            }
            (None, true) => vec![self.ensure_default_group(&project).await?],
        };
        let pairs_req = req.allowed_address_pairs.clone().unwrap_or_default();
        if !port_security && !pairs_req.is_empty() {
            return Err(NetworkError::conflict(
                "AddressPairAndPortSecurityRequired",
                "Port Security must be enabled in order to have allowed address pairs on a port.",
            ));
        }
        let tags = check_tags(req.tags.as_deref().unwrap_or_default())?;
        let now = now_secs();
        let rec = PortRecord {
            id: new_id(),
            project_id: project.clone(),
            network_id: net.id.clone(),
            name,
            description,
            mac_address: String::new(),
            fixed_ips: Vec::new(),
            device_id: req.device_id.clone().unwrap_or_default(),
            device_owner: req.device_owner.clone().unwrap_or_default(),
            binding_host_id: req.binding_host_id.clone().unwrap_or_default(),
            binding_vif_type: "unbound".into(),
            binding_vnic_type: "normal".into(),
            security_groups: groups,
            port_security_enabled: port_security,
            allowed_address_pairs: Vec::new(),
            admin_state_up: req.admin_state_up.unwrap_or(true),
            status: "DOWN".into(),
            tags,
            created_at: now,
            updated_at: now,
            revision_number: 1,
            extra_dhcp_opts: merge_dhcp_opts(
                &[],
                req.extra_dhcp_opts.as_deref().unwrap_or_default(),
                true,
            )?,
        };
        let new = NewPort {
            rec,
            fixed_ips: req.fixed_ips,
            chosen_mac,
            pairs: pairs_req,
        };
        let quota = Some((project.as_str(), "port"));
        self.commit_port(caller, new, quota, &|_, txn| txn)
            .await?
            .ok_or_else(|| NetworkError::not_found(Resource::Network, &net.id))
    }

    /// Makes a port the service needs for itself (a router's interface or gateway, the port
    /// holding a floating IP's address): no policy, no security groups, counted but not checked
    /// against the port quota (Neutron checks quotas at its API only). `extra` adds what
    /// commits with the port; `quota` names the resource checked instead, if any. `None` when
    /// one of `extra`'s preconditions failed: the caller reads again and retries.
    pub(crate) async fn create_service_port(
        &self,
        spec: ServicePort,
        quota: Option<(&str, &'static str)>,
        extra: &(dyn Fn(&PortRecord, Txn) -> Txn + Send + Sync),
    ) -> NetResult<Option<PortRecord>> {
        let now = now_secs();
        let rec = PortRecord {
            id: new_id(),
            project_id: spec.project,
            network_id: spec.network_id,
            name: String::new(),
            description: String::new(),
            mac_address: String::new(),
            fixed_ips: Vec::new(),
            device_id: spec.device_id,
            device_owner: spec.device_owner.to_owned(),
            binding_host_id: String::new(),
            binding_vif_type: "unbound".into(),
            binding_vnic_type: "normal".into(),
            security_groups: Vec::new(),
            port_security_enabled: false,
            allowed_address_pairs: Vec::new(),
            admin_state_up: true,
            status: "DOWN".into(),
            tags: Vec::new(),
            created_at: now,
            updated_at: now,
            revision_number: 1,
            extra_dhcp_opts: Vec::new(),
        };
        let new = NewPort {
            rec,
            fixed_ips: spec.fixed_ips,
            chosen_mac: None,
            pairs: Vec::new(),
        };
        self.commit_port(&service_caller(), new, quota, extra).await
    }

    /// The create loop every port goes through: choose addresses and a MAC against what is
    /// held now, commit with `Absent` rows for each, choose again when a concurrent create took
    /// one first.
    async fn commit_port(
        &self,
        caller: &Caller,
        new: NewPort,
        quota: Option<(&str, &'static str)>,
        extra: &(dyn Fn(&PortRecord, Txn) -> Txn + Send + Sync),
    ) -> NetResult<Option<PortRecord>> {
        let id = new.rec.id.clone();
        let project = new.rec.project_id.clone();
        let router = new.rec.device_owner.starts_with("network:router");
        let net_id = new.rec.network_id.clone();
        for round in 0..PICK_ROUNDS {
            if round > 0 {
                self.barrier().await?;
            }
            let net = self.visible_network(caller, &net_id).await?;
            let subnets = self.subnets_of(&net).await?;
            let wants = self.wants(&net, &subnets, &new.fixed_ips, &new.rec.device_owner)?;
            let mac = new.chosen_mac.clone().unwrap_or_else(generate_mac);
            let addresses = self
                .choose_addresses(&net, &subnets, &wants, (router, &mac), &BTreeSet::new())
                .await?;
            let rec = PortRecord {
                mac_address: mac.clone(),
                fixed_ips: addresses.iter().map(|(f, _)| f.clone()).collect(),
                allowed_address_pairs: check_pairs(&new.pairs, &mac)?,
                ..new.rec.clone()
            };
            let mut g = Guarded::new()
                .when(tables::NETWORKS, &net.id, Expect::Present, Guard::Network)
                .when(
                    tables::NETWORK_DELETING,
                    &deleting_key("network", &net.id),
                    Expect::Absent,
                    Guard::NetworkDeleting,
                )
                .when(tables::PORTS, &id, Expect::Absent, Guard::Port);
            g = self.claim_addresses(g, &id, &addresses);
            g = g.when(
                tables::PORT_MACS,
                &mac,
                Expect::Absent,
                Guard::Mac {
                    chosen: new.chosen_mac.is_none(),
                },
            );
            g = guard_groups(g, &rec.security_groups);
            let guarded = g.guards.len();
            let txn = extra(&rec, g.txn.clone())
                .put(tables::PORTS, &id, self.ports().encode(&rec))
                .put(
                    tables::PORT_MACS,
                    &mac,
                    self.index(tables::PORT_MACS).encode(&id),
                );
            let txn = count_in(txn, &project, "port", &id);
            let resp = match quota {
                Some((p, resource)) => {
                    let txn = if resource == "port" {
                        txn
                    } else {
                        bypass_in(txn, &project, "port")
                    };
                    self.create_within_quota(p, resource, txn).await?
                }
                None => {
                    let txn = bypass_in(txn, &project, "port");
                    self.state.write(tables::PORTS, txn).await?
                }
            };
            if resp.succeeded {
                return Ok(Some(rec));
            }
            let failed = resp.failed_precondition.map(|i| i as usize);
            if failed.is_some_and(|i| i >= guarded) {
                return Ok(None);
            }
            if self.retry_after(failed.and_then(|i| g.guards.get(i).cloned()), &net.id)? {
                continue;
            }
        }
        Err(shoal_state::StateError::Contended {
            table: tables::IP_ALLOCATIONS,
            key: net_id,
            attempts: PICK_ROUNDS,
        }
        .into())
    }

    /// Adds the `ip_allocations` rows of `addresses` (with their `Absent` preconditions) and
    /// the preconditions on their subnets to a port's transaction.
    fn claim_addresses(
        &self,
        mut g: Guarded,
        port: &str,
        addresses: &[(FixedIp, bool)],
    ) -> Guarded {
        let mut seen = BTreeSet::new();
        for (f, chosen) in addresses {
            if seen.insert(f.subnet_id.clone()) {
                g = g
                    .when(
                        tables::SUBNETS,
                        &f.subnet_id,
                        Expect::Present,
                        Guard::Subnet(f.subnet_id.clone()),
                    )
                    .when(
                        tables::NETWORK_DELETING,
                        &deleting_key("subnet", &f.subnet_id),
                        Expect::Absent,
                        Guard::SubnetDeleting(f.subnet_id.clone()),
                    );
            }
            let key = format!("{}/{}", f.subnet_id, f.ip_address);
            g = g.when(
                tables::IP_ALLOCATIONS,
                &key,
                Expect::Absent,
                Guard::Address {
                    subnet: f.subnet_id.clone(),
                    ip: f.ip_address.clone(),
                    chosen: *chosen,
                },
            );
            g.txn = g.txn.put(
                tables::IP_ALLOCATIONS,
                &key,
                self.index(tables::IP_ALLOCATIONS).encode(&port.to_owned()),
            );
        }
        g
    }

    /// After a port write failed on `failed`: `Ok(true)` to pick again, or the error to answer.
    fn retry_after(&self, failed: Option<Guard>, network: &str) -> NetResult<bool> {
        match failed {
            Some(Guard::Address { chosen: true, .. }) | Some(Guard::Mac { chosen: true }) => Ok(true),
            Some(Guard::Address { subnet, ip, chosen: false }) => Err(NetworkError::conflict(
                "IpAddressAlreadyAllocated",
                format!("IP address {ip} already allocated in subnet {subnet}"),
            )),
            Some(Guard::Mac { chosen: false }) => Err(NetworkError::conflict(
                "MacAddressInUse",
                format!("Unable to complete operation for network {network}. The mac address is in use."),
            )),
            Some(Guard::Network) => Err(NetworkError::not_found(Resource::Network, network)),
            Some(Guard::NetworkDeleting) => Err(NetworkError::conflict(
                "NetworkInUse",
                format!("Network {network} is being deleted."),
            )),
            Some(Guard::Subnet(s)) => Err(NetworkError::not_found(Resource::Subnet, &s)),
            Some(Guard::SubnetDeleting(s)) => Err(NetworkError::conflict(
                "SubnetInUse",
                format!("Subnet {s} is being deleted."),
            )),
            Some(Guard::Group(s)) => Err(NetworkError::not_found(Resource::SecurityGroup, &s)),
            Some(Guard::GroupDeleting(s)) => Err(NetworkError::conflict(
                "SecurityGroupInUse",
                format!("Security Group {s} is being deleted."),
            )),
            // The port itself changed (an update) or its id was taken: read again.
            Some(Guard::Port) | None => Ok(true),
        }
    }

    pub async fn update_port(
        &self,
        caller: &Caller,
        id: &str,
        req: PortUpdate,
    ) -> NetResult<PortRecord> {
        let first = self.port(caller, id).await?;
        let net = self
            .networks()
            .get(&first.network_id)
            .await?
            .map(|n| n.value);
        if !may_change_port(caller, &first, net.as_ref()) {
            return Err(NetworkError::policy("update_port"));
        }
        let privileged = caller.admin || net.as_ref().is_some_and(|n| caller.owns(&n.project_id));
        req.asks().check("update_port", caller.admin, privileged)?;
        if req.mac_address.is_some() && !caller.admin {
            return Err(NetworkError::policy("update_port:mac_address"));
        }
        if let Some(n) = &req.name {
            check_text("name", n)?;
        }
        if let Some(Some(d)) = &req.description {
            check_text("description", d)?;
        }
        let new_mac = req.mac_address.as_deref().map(check_mac).transpose()?;
        let groups = match &req.security_groups {
            Some(g) => Some(self.check_groups(caller, &first.project_id, g).await?),
            None => None,
        };
        for round in 0..PICK_ROUNDS {
            if round > 0 {
                self.barrier().await?;
            }
            let current = self.ports().require(id).await?;
            let old = current.value.clone();
            let mut p = current.value;
            if let Some(x) = &req.name {
                p.name = x.clone();
            }
            if let Some(x) = &req.description {
                p.description = x.clone().unwrap_or_default();
            }
            if let Some(x) = req.admin_state_up {
                p.admin_state_up = x;
            }
            if let Some(x) = &req.device_id {
                p.device_id = x.clone();
            }
            if let Some(x) = &req.device_owner {
                p.device_owner = x.clone();
            }
            if let Some(x) = &req.binding_host_id {
                p.binding_host_id = x.clone();
            }
            if let Some(x) = req.port_security_enabled {
                p.port_security_enabled = x;
            }
            if let Some(x) = &groups {
                p.security_groups = x.clone();
            }
            if let Some(m) = &new_mac {
                if p.is_bound() && *m != p.mac_address {
                    return Err(NetworkError::conflict(
                        "PortBound",
                        format!("Unable to complete operation on port {id}: the MAC address of a bound port cannot change."),
                    ));
                }
                p.mac_address = m.clone();
            }
            if !p.port_security_enabled && !p.security_groups.is_empty() {
                return Err(NetworkError::conflict(
                    "PortSecurityPortHasSecurityGroup",
                    "Port has security group associated. Cannot disable port security or ip \
                     address until security group is removed",
                ));
            }
            if let Some(pairs) = &req.allowed_address_pairs {
                p.allowed_address_pairs = check_pairs(pairs, &p.mac_address)?;
            }
            if let Some(opts) = &req.extra_dhcp_opts {
                p.extra_dhcp_opts = merge_dhcp_opts(&p.extra_dhcp_opts, opts, false)?;
            }
            if !p.port_security_enabled && !p.allowed_address_pairs.is_empty() {
                return Err(NetworkError::conflict(
                    "AddressPairAndPortSecurityRequired",
                    "Port Security must be enabled in order to have allowed address pairs on a port.",
                ));
            }
            let mut g = Guarded::new().when(
                tables::PORTS,
                id,
                Expect::Revision(current.revision),
                Guard::Port,
            );
            if let Some(fixed) = &req.fixed_ips {
                let net = self.networks().require(&p.network_id).await?.value;
                let subnets = self.subnets_of(&net).await?;
                let keep: BTreeSet<(String, String)> = old
                    .fixed_ips
                    .iter()
                    .map(|f| (f.subnet_id.clone(), f.ip_address.clone()))
                    .collect();
                let router = p.device_owner.starts_with("network:router");
                let wants = self.wants(&net, &subnets, &Some(fixed.clone()), &p.device_owner)?;
                let chosen = self
                    .choose_addresses(&net, &subnets, &wants, (router, &p.mac_address), &keep)
                    .await?;
                // Kept: the old addresses chosen again (named, or the same EUI-64 address).
                let wanted: BTreeSet<(String, String)> = chosen
                    .iter()
                    .map(|(f, _)| (f.subnet_id.clone(), f.ip_address.clone()))
                    .collect();
                let new: Vec<(FixedIp, bool)> = chosen
                    .into_iter()
                    .filter(|(f, _)| !keep.contains(&(f.subnet_id.clone(), f.ip_address.clone())))
                    .collect();
                // Kept: the old addresses the request names again. Released: the rest.
                let mut fixed_ips: Vec<FixedIp> = old
                    .fixed_ips
                    .iter()
                    .filter(|f| wanted.contains(&(f.subnet_id.clone(), f.ip_address.clone())))
                    .cloned()
                    .collect();
                for f in &old.fixed_ips {
                    if !fixed_ips.contains(f) {
                        g.txn = g.txn.delete(
                            tables::IP_ALLOCATIONS,
                            &format!("{}/{}", f.subnet_id, f.ip_address),
                        );
                    }
                }
                g = self.claim_addresses(g, id, &new);
                fixed_ips.extend(new.into_iter().map(|(f, _)| f));
                p.fixed_ips = fixed_ips;
            }
            if p.mac_address != old.mac_address {
                g = g.when(
                    tables::PORT_MACS,
                    &p.mac_address,
                    Expect::Absent,
                    Guard::Mac { chosen: false },
                );
                g.txn = g.txn.delete(tables::PORT_MACS, &old.mac_address).put(
                    tables::PORT_MACS,
                    &p.mac_address,
                    self.index(tables::PORT_MACS).encode(&id.to_owned()),
                );
            }
            if groups.is_some() {
                g = guard_groups(g, &p.security_groups);
            }
            p.touch(now_secs());
            let txn = g.txn.put(tables::PORTS, id, self.ports().encode(&p));
            let resp = self.state.write(tables::PORTS, txn).await?;
            if resp.succeeded {
                return Ok(p);
            }
            let failed = resp
                .failed_precondition
                .and_then(|i| g.guards.get(i as usize).cloned());
            if self.retry_after(failed, &p.network_id)? {
                continue;
            }
        }
        Err(shoal_state::StateError::Contended {
            table: tables::PORTS,
            key: id.to_owned(),
            attempts: PICK_ROUNDS,
        }
        .into())
    }

    /// Deletes a port; its addresses and MAC go back to the pool in the same transaction.
    pub async fn delete_port(&self, caller: &Caller, id: &str) -> NetResult<()> {
        let first = self.port(caller, id).await?;
        let net = self
            .networks()
            .get(&first.network_id)
            .await?
            .map(|n| n.value);
        if !may_change_port(caller, &first, net.as_ref()) {
            return Err(NetworkError::policy("delete_port"));
        }
        if let Some(reason) = self.service_port_owner(&first).await? {
            return Err(NetworkError::conflict(
                "ServicePortInUse",
                format!("Port {id} cannot be deleted directly via the port API: {reason}."),
            ));
        }
        shoal_state::retry(tables::PORTS, id, shoal_state::DEFAULT_ATTEMPTS, || async {
            let Some(current) = self.ports().get(id).await? else {
                return Err(NetworkError::not_found(Resource::Port, id));
            };
            let txn = Txn::new().when(tables::PORTS, id, Expect::Revision(current.revision));
            let txn = self.without_port(txn, &current.value);
            let txn = self.disassociate_in(txn, id).await?;
            let resp = self.state.write(tables::PORTS, txn).await?;
            if !resp.succeeded {
                self.barrier().await?;
            }
            Ok(resp.succeeded.then_some(()))
        })
        .await?;
        // A floating IP associated while the delete was under way (its write requires the
        // port, so only before the delete committed) is released now.
        self.barrier().await?;
        self.disassociate_port(id).await
    }

    /// Adds the removal of port `p` to `txn`: its row, MAC, addresses and usage.
    pub(crate) fn without_port(&self, mut txn: Txn, p: &PortRecord) -> Txn {
        txn = txn
            .delete(tables::PORTS, &p.id)
            .delete(tables::PORT_MACS, &p.mac_address);
        for f in &p.fixed_ips {
            txn = txn.delete(
                tables::IP_ALLOCATIONS,
                &format!("{}/{}", f.subnet_id, f.ip_address),
            );
        }
        uncount_in(txn, &p.project_id, "port", &p.id)
    }
}

/// Adds to a port's transaction that each of its security groups exists and is not being
/// deleted.
fn guard_groups(mut g: Guarded, groups: &[String]) -> Guarded {
    for sg in groups {
        g = g
            .when(
                tables::SECURITY_GROUPS,
                sg,
                Expect::Present,
                Guard::Group(sg.clone()),
            )
            .when(
                tables::NETWORK_DELETING,
                &deleting_key("security_group", sg),
                Expect::Absent,
                Guard::GroupDeleting(sg.clone()),
            );
    }
    g
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::testing::{admin, member, service};
    use crate::{NetworkCreate, SubnetCreate};

    /// A network of `who`'s with one subnet of `cidr`: their ids.
    pub(crate) async fn net_with_subnet(
        s: &NetworkService,
        who: &Caller,
        cidr: &str,
    ) -> (String, String) {
        let n = s
            .create_network(who, NetworkCreate::default())
            .await
            .unwrap()
            .id;
        let sub = s
            .create_subnet(
                who,
                SubnetCreate {
                    network_id: n.clone(),
                    cidr: Some(cidr.into()),
                    ip_version: Some(4),
                    ..Default::default()
                },
            )
            .await
            .unwrap()
            .id;
        (n, sub)
    }

    fn port(n: &str) -> PortCreate {
        PortCreate {
            network_id: n.into(),
            ..Default::default()
        }
    }

    /// Adds an IPv6 subnet of `cidr` with both IPv6 modes `mode` (None: no modes) to `n`.
    async fn v6_subnet(
        s: &NetworkService,
        who: &Caller,
        n: &str,
        cidr: &str,
        mode: Option<&str>,
    ) -> String {
        let mode = mode.map(|m| serde_json::Value::String(m.into()));
        s.create_subnet(
            who,
            SubnetCreate {
                network_id: n.into(),
                cidr: Some(cidr.into()),
                ip_version: Some(6),
                ipv6_ra_mode: mode.clone(),
                ipv6_address_mode: mode,
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .id
    }

    #[tokio::test]
    async fn dual_stack_ports_get_one_address_of_each_kind() {
        let s = service();
        let p = member("p");
        let (n, v4) = net_with_subnet(&s, &p, "10.0.0.0/24").await;
        let stateful = v6_subnet(&s, &p, &n, "2001:db8:1::/64", Some("dhcpv6-stateful")).await;
        let slaac = v6_subnet(&s, &p, &n, "2001:db8:2::/64", Some("slaac")).await;
        let a = s.create_port(&p, port(&n)).await.unwrap();
        let on = |sub: &str| -> Vec<String> {
            a.fixed_ips
                .iter()
                .filter(|f| f.subnet_id == sub)
                .map(|f| f.ip_address.clone())
                .collect()
        };
        assert_eq!(a.fixed_ips.len(), 3, "{:?}", a.fixed_ips);
        assert_eq!(on(&v4).len(), 1);
        let from_pool = parse_ip(&on(&stateful)[0]).unwrap();
        assert!(Cidr::parse("2001:db8:1::/64").unwrap().is_host(from_pool));
        let eui = eui64(&Cidr::parse("2001:db8:2::/64").unwrap(), &a.mac_address).unwrap();
        assert_eq!(on(&slaac), vec![ip_string(eui)]);
        // Naming only the IPv4 subnet still gives the SLAAC address, not a stateful one.
        let b = s
            .create_port(
                &p,
                PortCreate {
                    fixed_ips: Some(vec![FixedIpRequest {
                        subnet_id: Some(v4.clone()),
                        ip_address: None,
                    }]),
                    ..port(&n)
                },
            )
            .await
            .unwrap();
        let subnets: BTreeSet<&str> = b.fixed_ips.iter().map(|f| f.subnet_id.as_str()).collect();
        assert_eq!(subnets, BTreeSet::from([v4.as_str(), slaac.as_str()]));
        // An address of its own on a SLAAC subnet is refused, as in Neutron.
        let e = s
            .create_port(
                &p,
                PortCreate {
                    fixed_ips: Some(vec![FixedIpRequest {
                        subnet_id: Some(slaac.clone()),
                        ip_address: Some("2001:db8:2::99".into()),
                    }]),
                    ..port(&n)
                },
            )
            .await
            .unwrap_err();
        assert!(e.to_string().contains("automatic addresses"), "{e}");
        // An update that names other addresses keeps the EUI-64 one.
        let c = s
            .update_port(
                &p,
                &a.id,
                PortUpdate {
                    fixed_ips: Some(vec![FixedIpRequest {
                        subnet_id: Some(stateful.clone()),
                        ip_address: Some("2001:db8:1::42".into()),
                    }]),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let kept: BTreeSet<&str> = c.fixed_ips.iter().map(|f| f.ip_address.as_str()).collect();
        assert_eq!(
            kept,
            BTreeSet::from(["2001:db8:1::42", ip_string(eui).as_str()])
        );
    }

    #[tokio::test]
    async fn a_slaac_subnet_goes_with_its_ports_addresses() {
        let s = service();
        let p = member("p");
        let n = s
            .create_network(&p, NetworkCreate::default())
            .await
            .unwrap()
            .id;
        let slaac = v6_subnet(&s, &p, &n, "2001:db8::/64", Some("slaac")).await;
        let a = s.create_port(&p, port(&n)).await.unwrap();
        assert_eq!(a.fixed_ips.len(), 1);
        s.delete_subnet(&p, &slaac).await.unwrap();
        assert!(s.port(&p, &a.id).await.unwrap().fixed_ips.is_empty());
        // A stateful subnet with a port on it stays.
        let stateful = v6_subnet(&s, &p, &n, "2001:db8:5::/64", None).await;
        let b = s.create_port(&p, port(&n)).await.unwrap();
        assert_eq!(b.fixed_ips[0].subnet_id, stateful);
        assert_eq!(
            s.delete_subnet(&p, &stateful)
                .await
                .unwrap_err()
                .neutron_type(),
            "SubnetInUse"
        );
    }

    #[tokio::test]
    async fn a_port_gets_an_address_a_mac_and_the_default_group() {
        let s = service();
        let p = member("p");
        let (n, sub) = net_with_subnet(&s, &p, "10.0.0.0/24").await;
        let port1 = s.create_port(&p, port(&n)).await.unwrap();
        assert_eq!(port1.fixed_ips.len(), 1);
        assert_eq!(port1.fixed_ips[0].subnet_id, sub);
        let ip = parse_ip(&port1.fixed_ips[0].ip_address).unwrap();
        assert!((parse_ip("10.0.0.2").unwrap()..=parse_ip("10.0.0.254").unwrap()).contains(&ip));
        assert!(port1.mac_address.starts_with("fa:16:3e:"));
        assert_eq!(port1.status, "DOWN");
        assert_eq!(port1.binding_vif_type, "unbound");
        let default = s.ensure_default_group("p").await.unwrap();
        assert_eq!(port1.security_groups, vec![default]);
    }

    #[tokio::test]
    async fn named_addresses_conflict_and_return_on_delete() {
        let s = service();
        let p = member("p");
        let (n, sub) = net_with_subnet(&s, &p, "10.0.0.0/24").await;
        let at = |ip: &str| PortCreate {
            fixed_ips: Some(vec![FixedIpRequest {
                subnet_id: Some(sub.clone()),
                ip_address: Some(ip.into()),
            }]),
            ..port(&n)
        };
        let a = s.create_port(&p, at("10.0.0.50")).await.unwrap();
        let e = s.create_port(&p, at("10.0.0.50")).await.unwrap_err();
        assert_eq!(e.neutron_type(), "IpAddressAlreadyAllocated");
        assert_eq!(e.class(), crate::ErrorClass::Conflict);
        let gw = s.create_port(&p, at("10.0.0.1")).await.unwrap_err();
        assert_eq!(gw.neutron_type(), "IpAddressAlreadyAllocated");
        let outside = s.create_port(&p, at("10.9.0.5")).await.unwrap_err();
        assert_eq!(outside.class(), crate::ErrorClass::BadRequest);
        s.delete_port(&p, &a.id).await.unwrap();
        s.create_port(&p, at("10.0.0.50")).await.unwrap();
        let mac = PortCreate {
            mac_address: Some("fa:16:3e:00:00:01".into()),
            ..port(&n)
        };
        s.create_port(&p, mac.clone()).await.unwrap();
        assert_eq!(
            s.create_port(&p, mac).await.unwrap_err().neutron_type(),
            "MacAddressInUse"
        );
    }

    #[tokio::test]
    async fn a_full_subnet_says_so() {
        let s = service();
        let p = member("p");
        let (n, _) = net_with_subnet(&s, &p, "10.0.0.0/30").await;
        // A /30 has two hosts; the gateway takes one.
        s.create_port(&p, port(&n)).await.unwrap();
        let e = s.create_port(&p, port(&n)).await.unwrap_err();
        assert_eq!(e.neutron_type(), "IpAddressGenerationFailure");
    }

    #[tokio::test]
    async fn ports_on_shared_networks_and_policy() {
        let s = service();
        let (n, sub) = net_with_subnet(&s, &admin(), "10.0.0.0/24").await;
        s.update_network(
            &admin(),
            &n,
            crate::NetworkUpdate {
                shared: Some(true),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let q = member("q");
        let mine = s.create_port(&q, port(&n)).await.unwrap();
        assert_eq!(mine.project_id, "q");
        let named = PortCreate {
            fixed_ips: Some(vec![FixedIpRequest {
                subnet_id: Some(sub),
                ip_address: Some("10.0.0.9".into()),
            }]),
            ..port(&n)
        };
        assert!(matches!(
            s.create_port(&q, named).await,
            Err(NetworkError::Forbidden(_))
        ));
        let bound = PortCreate {
            binding_host_id: Some("node1".into()),
            ..port(&n)
        };
        assert!(matches!(
            s.create_port(&q, bound).await,
            Err(NetworkError::Forbidden(_))
        ));
        // Another project sees neither the port nor, with the network unshared, the network.
        assert!(s.port(&member("r"), &mine.id).await.is_err());
        assert_eq!(s.list_ports(&member("r")).await.unwrap().len(), 0);
        assert_eq!(s.list_ports(&admin()).await.unwrap().len(), 1);
        // The network can be deleted only once its ports are gone.
        let e = s.delete_network(&admin(), &n).await.unwrap_err();
        assert_eq!(e.neutron_type(), "NetworkInUse");
        s.delete_port(&q, &mine.id).await.unwrap();
        s.delete_network(&admin(), &n).await.unwrap();
        assert!(s.list_subnets(&admin()).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn updates_change_groups_addresses_and_binding() {
        let s = service();
        let p = member("p");
        let (n, sub) = net_with_subnet(&s, &p, "10.0.0.0/24").await;
        let a = s.create_port(&p, port(&n)).await.unwrap();
        let off = PortUpdate {
            port_security_enabled: Some(false),
            ..Default::default()
        };
        assert_eq!(
            s.update_port(&p, &a.id, off)
                .await
                .unwrap_err()
                .neutron_type(),
            "PortSecurityPortHasSecurityGroup"
        );
        let off = PortUpdate {
            port_security_enabled: Some(false),
            security_groups: Some(vec![]),
            ..Default::default()
        };
        let b = s.update_port(&p, &a.id, off).await.unwrap();
        assert!(b.security_groups.is_empty() && !b.port_security_enabled);
        assert_eq!(b.revision_number, 2);
        let moved = PortUpdate {
            fixed_ips: Some(vec![FixedIpRequest {
                subnet_id: Some(sub.clone()),
                ip_address: Some("10.0.0.77".into()),
            }]),
            ..Default::default()
        };
        let c = s.update_port(&p, &a.id, moved).await.unwrap();
        assert_eq!(c.fixed_ips[0].ip_address, "10.0.0.77");
        // The old address is free again; the new one is held.
        let old = format!("{sub}/{}", a.fixed_ips[0].ip_address);
        assert!(s
            .index(tables::IP_ALLOCATIONS)
            .get(&old)
            .await
            .unwrap()
            .is_none());
        assert!(s
            .index(tables::IP_ALLOCATIONS)
            .get(&format!("{sub}/10.0.0.77"))
            .await
            .unwrap()
            .is_some());
        let bind = PortUpdate {
            binding_host_id: Some("node2".into()),
            device_id: Some("vm".into()),
            ..Default::default()
        };
        assert!(matches!(
            s.update_port(&p, &a.id, bind.clone()).await,
            Err(NetworkError::Forbidden(_))
        ));
        let d = s.update_port(&admin(), &a.id, bind).await.unwrap();
        assert_eq!(
            (d.binding_host_id.as_str(), d.device_id.as_str()),
            ("node2", "vm")
        );
    }

    /// Many concurrent creates on a small subnet: no address or MAC is held twice, and the
    /// ones that could not get an address say the subnet is full.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_creates_never_share_an_address() {
        let s = service();
        let p = member("p");
        let (n, _) = net_with_subnet(&s, &p, "10.0.0.0/27").await;
        let tasks: Vec<_> = (0..40)
            .map(|_| {
                let (s, p, n) = (s.clone(), p.clone(), n.clone());
                tokio::spawn(async move { s.create_port(&p, port(&n)).await })
            })
            .collect();
        let (mut ips, mut macs, mut full) = (BTreeSet::new(), BTreeSet::new(), 0);
        for t in tasks {
            match t.await.unwrap() {
                Ok(port) => {
                    assert!(ips.insert(port.fixed_ips[0].ip_address.clone()));
                    assert!(macs.insert(port.mac_address));
                }
                Err(e) => {
                    assert_eq!(e.neutron_type(), "IpAddressGenerationFailure", "{e}");
                    full += 1;
                }
            }
        }
        // A /27 has 30 hosts, one of them the gateway.
        assert_eq!(ips.len(), 29);
        assert_eq!(full, 11);
    }

    #[test]
    fn macs_are_checked() {
        assert_eq!(check_mac("FA:16:3E:00:00:0A").unwrap(), "fa:16:3e:00:00:0a");
        for bad in [
            "01:00:5e:00:00:01",
            "00:00:00:00:00:00",
            "fa:16:3e:00:00",
            "fa:16:3e:00:00:0g",
            "fa-16-3e-00-00-01",
        ] {
            assert!(check_mac(bad).is_err(), "{bad}");
        }
        assert!(generate_mac().starts_with("fa:16:3e:"));
    }
}
