//! Security groups and their rules, and each project's `default` group.
//!
//! The `default` group is created on a project's first use (its first network, port, or
//! listing of groups) by one transaction conditioned on the project's `default_security_groups`
//! row being absent, so concurrent first uses through different nodes make exactly one. A rule
//! is unique within its group through a `security_group_rule_keys` row keyed by the rule's
//! normalised fields: a duplicate fails its `Absent` precondition and gets Neutron's 409.

use std::collections::HashMap;

use serde::Deserialize;
use shoal_state::{tables, Expect, Txn};

use crate::ip::{family_of, normalize_prefix, shown};
use crate::networks::deleting_key;
use crate::quotas::{bypass_in, count_in, uncount_in};
use crate::records::{RuleRecord, SecurityGroupRecord};
use crate::{
    check_tags, check_text, new_id, now_secs, nullable, Caller, NetResult, NetworkError,
    NetworkService, Resource, Revisioned,
};

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecurityGroupCreate {
    pub name: Option<String>,
    pub description: Option<String>,
    pub stateful: Option<bool>,
    pub tags: Option<Vec<String>>,
    pub project_id: Option<String>,
    pub tenant_id: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecurityGroupUpdate {
    pub name: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub description: Option<Option<String>>,
    pub stateful: Option<bool>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleCreate {
    pub security_group_id: String,
    pub direction: Option<String>,
    pub ethertype: Option<String>,
    /// A protocol name or number, as a string or a JSON number; `null` for any.
    pub protocol: Option<serde_json::Value>,
    pub port_range_min: Option<i64>,
    pub port_range_max: Option<i64>,
    pub remote_ip_prefix: Option<String>,
    pub remote_group_id: Option<String>,
    pub remote_address_group_id: Option<String>,
    pub description: Option<String>,
    pub project_id: Option<String>,
    pub tenant_id: Option<String>,
}

/// IANA protocol numbers of the names Neutron accepts.
const PROTOCOLS: [(&str, u8); 22] = [
    ("ah", 51),
    ("dccp", 33),
    ("egp", 8),
    ("esp", 50),
    ("gre", 47),
    ("hopopt", 0),
    ("icmp", 1),
    ("igmp", 2),
    ("ipip", 4),
    ("ipv6-encap", 41),
    ("ipv6-frag", 44),
    ("ipv6-icmp", 58),
    ("icmpv6", 58),
    ("ipv6-nonxt", 59),
    ("ipv6-opts", 60),
    ("ipv6-route", 43),
    ("ospf", 89),
    ("pgm", 113),
    ("rsvp", 46),
    ("sctp", 132),
    ("tcp", 6),
    ("udp", 17),
];
const UDPLITE: u8 = 136;
const VRRP: u8 = 112;

/// Protocols whose port range is a range of ports.
fn has_ports(number: u8) -> bool {
    matches!(number, 6 | 17 | 33 | 132 | UDPLITE)
}

/// The protocol of a rule: `None` for any, else (as given, its number).
fn parse_protocol(v: &Option<serde_json::Value>) -> NetResult<Option<(String, u8)>> {
    let text = match v {
        None | Some(serde_json::Value::Null) => return Ok(None),
        Some(serde_json::Value::String(s)) => s.to_ascii_lowercase(),
        Some(serde_json::Value::Number(n)) => n.to_string(),
        Some(other) => {
            return Err(NetworkError::bad(format!(
                "Invalid input for protocol. Reason: {other} is not a protocol name or number."
            )))
        }
    };
    if text == "any" || text.is_empty() {
        return Ok(None);
    }
    let number = match text.parse::<u16>() {
        Ok(n) if n <= 255 => Some(n as u8),
        Ok(_) => None,
        Err(_) => PROTOCOLS
            .iter()
            .find(|(name, _)| *name == text)
            .map(|(_, n)| *n)
            .or(match text.as_str() {
                "udplite" => Some(UDPLITE),
                "vrrp" => Some(VRRP),
                _ => None,
            }),
    };
    match number {
        Some(n) => Ok(Some((text, n))),
        None => Err(NetworkError::BadRequest {
            kind: "SecurityGroupRuleInvalidProtocol",
            message: format!(
                "Security group rule protocol {} not supported. Only protocol values [{}, \
                 udplite, vrrp] and integer representations [0 to 255] are supported.",
                shown(&text),
                PROTOCOLS
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
    }
}

/// A rule's identity for duplicate detection: protocol by number, `0.0.0.0/0` (or `::/0`)
/// the same as no prefix, as Neutron compares them.
fn fingerprint(r: &RuleRecord, protocol: Option<u8>) -> String {
    let prefix = match r.remote_ip_prefix.as_deref() {
        Some("0.0.0.0/0") | Some("::/0") | None => "any".to_owned(),
        Some(p) => p.to_owned(),
    };
    let opt = |v: Option<u32>| v.map_or("-".to_owned(), |n| n.to_string());
    format!(
        "{}|{}|{}|{}|{}|{}|{}",
        r.direction,
        r.ethertype,
        protocol.map_or("any".to_owned(), |n| n.to_string()),
        opt(r.port_range_min),
        opt(r.port_range_max),
        prefix,
        r.remote_group_id.as_deref().unwrap_or("-")
    )
}

fn rule_key(r: &RuleRecord) -> NetResult<String> {
    let protocol =
        parse_protocol(&r.protocol.clone().map(serde_json::Value::String))?.map(|(_, n)| n);
    Ok(format!(
        "{}/{}",
        r.security_group_id,
        fingerprint(r, protocol)
    ))
}

/// Neutron's rules for a new group: egress anywhere in both families; the `default` group
/// also lets in traffic from its own members.
fn initial_rules(group: &SecurityGroupRecord, default: bool) -> Vec<RuleRecord> {
    let mut out = Vec::new();
    let mut directions = vec![("egress", None)];
    if default {
        directions.push(("ingress", Some(group.id.clone())));
    }
    for (direction, remote) in directions {
        for ethertype in ["IPv4", "IPv6"] {
            out.push(RuleRecord {
                id: new_id(),
                project_id: group.project_id.clone(),
                security_group_id: group.id.clone(),
                direction: direction.into(),
                ethertype: ethertype.into(),
                protocol: None,
                port_range_min: None,
                port_range_max: None,
                remote_ip_prefix: None,
                remote_group_id: remote.clone(),
                description: String::new(),
                created_at: group.created_at,
                updated_at: group.created_at,
                revision_number: 1,
            });
        }
    }
    out
}

/// May see a group (or a rule) of `project`.
fn sees(caller: &Caller, project: &str) -> bool {
    caller.admin || caller.owns(project)
}

impl NetworkService {
    /// The project's `default` group, created now if this is the project's first use.
    pub async fn ensure_default_group(&self, project: &str) -> NetResult<String> {
        let defaults = self.index(tables::DEFAULT_SECURITY_GROUPS);
        if let Some(id) = defaults.get(project).await? {
            return Ok(id.value);
        }
        let now = now_secs();
        let group = SecurityGroupRecord {
            id: new_id(),
            project_id: project.to_owned(),
            name: "default".into(),
            description: "Default security group".into(),
            tags: Vec::new(),
            created_at: now,
            updated_at: now,
            revision_number: 1,
        };
        let txn = Txn::new()
            .when(tables::DEFAULT_SECURITY_GROUPS, project, Expect::Absent)
            .put(
                tables::DEFAULT_SECURITY_GROUPS,
                project,
                defaults.encode(&group.id),
            );
        let txn = self.group_txn(txn, &group, true)?;
        let txn = bypass_in(
            bypass_in(txn, project, "security_group"),
            project,
            "security_group_rule",
        );
        let resp = self
            .state
            .write(tables::DEFAULT_SECURITY_GROUPS, txn)
            .await?;
        if resp.succeeded {
            return Ok(group.id);
        }
        // Another node made it first: read theirs.
        self.barrier().await?;
        Ok(defaults.require(project).await?.value)
    }

    /// Adds a new group, its initial rules and their usage rows to `txn`.
    fn group_txn(&self, txn: Txn, group: &SecurityGroupRecord, default: bool) -> NetResult<Txn> {
        let mut txn = txn
            .when(tables::SECURITY_GROUPS, &group.id, Expect::Absent)
            .put(
                tables::SECURITY_GROUPS,
                &group.id,
                self.groups().encode(group),
            );
        txn = count_in(txn, &group.project_id, "security_group", &group.id);
        for r in initial_rules(group, default) {
            txn = txn
                .put(tables::SECURITY_GROUP_RULES, &r.id, self.rules().encode(&r))
                .put(
                    tables::SECURITY_GROUP_RULE_KEYS,
                    &rule_key(&r)?,
                    self.index(tables::SECURITY_GROUP_RULE_KEYS).encode(&r.id),
                );
            txn = count_in(txn, &r.project_id, "security_group_rule", &r.id);
        }
        Ok(txn)
    }

    pub async fn security_group(
        &self,
        caller: &Caller,
        id: &str,
    ) -> NetResult<SecurityGroupRecord> {
        self.barrier().await?;
        match self.groups().get(id).await? {
            Some(g) if sees(caller, &g.value.project_id) => Ok(g.value),
            _ => Err(NetworkError::not_found(Resource::SecurityGroup, id)),
        }
    }

    /// The groups `caller` may see; makes the caller's `default` group first, as Neutron does.
    pub async fn list_security_groups(
        &self,
        caller: &Caller,
    ) -> NetResult<Vec<SecurityGroupRecord>> {
        if let Some(p) = &caller.project_id {
            self.ensure_default_group(p).await?;
        }
        self.barrier().await?;
        Ok(self
            .groups()
            .list("")
            .await?
            .into_values()
            .filter(|g| sees(caller, &g.project_id))
            .collect())
    }

    /// The rules of the groups `caller` may see, by group id.
    pub async fn rules_by_group(
        &self,
        caller: &Caller,
    ) -> NetResult<HashMap<String, Vec<RuleRecord>>> {
        let mut out: HashMap<String, Vec<RuleRecord>> = HashMap::new();
        for r in self.list_rules(caller).await? {
            out.entry(r.security_group_id.clone()).or_default().push(r);
        }
        Ok(out)
    }

    pub async fn create_security_group(
        &self,
        caller: &Caller,
        req: SecurityGroupCreate,
    ) -> NetResult<SecurityGroupRecord> {
        let project =
            caller.project_for_create("create_security_group", &req.project_id, &req.tenant_id)?;
        let name = req.name.unwrap_or_default();
        check_text("name", &name)?;
        let description = req.description.unwrap_or_default();
        check_text("description", &description)?;
        if req.stateful == Some(false) {
            return Err(NetworkError::bad(
                "stateless security groups are not supported: the datapath tracks connections",
            ));
        }
        let tags = check_tags(&req.tags.unwrap_or_default())?;
        // The project's own `default` comes first, and no second group takes the name.
        self.ensure_default_group(&project).await?;
        if name == "default" {
            return Err(NetworkError::conflict(
                "SecurityGroupDefaultAlreadyExists",
                "Default security group already exists.",
            ));
        }
        let now = now_secs();
        let group = SecurityGroupRecord {
            id: new_id(),
            project_id: project.clone(),
            name,
            description,
            tags,
            created_at: now,
            updated_at: now,
            revision_number: 1,
        };
        // Neutron gives new groups their egress rules without charging them to the quota.
        let txn = bypass_in(
            self.group_txn(Txn::new(), &group, false)?,
            &project,
            "security_group_rule",
        );
        let resp = self
            .create_within_quota(&project, "security_group", txn)
            .await?;
        if !resp.succeeded {
            return Err(shoal_state::StateError::AlreadyExists {
                table: tables::SECURITY_GROUPS,
                key: group.id,
            }
            .into());
        }
        Ok(group)
    }

    pub async fn update_security_group(
        &self,
        caller: &Caller,
        id: &str,
        req: SecurityGroupUpdate,
    ) -> NetResult<SecurityGroupRecord> {
        let current = self.security_group(caller, id).await?;
        if !caller.may_change(&current.project_id) {
            return Err(NetworkError::policy("update_security_group"));
        }
        if req.stateful == Some(false) {
            return Err(NetworkError::bad(
                "stateless security groups are not supported",
            ));
        }
        if let Some(n) = &req.name {
            check_text("name", n)?;
            if current.name == "default" && n != "default" {
                return Err(NetworkError::conflict(
                    "SecurityGroupCannotUpdateDefault",
                    "Updating default security group not allowed.",
                ));
            }
            if n == "default" && current.name != "default" {
                return Err(NetworkError::conflict(
                    "SecurityGroupDefaultAlreadyExists",
                    "Default security group already exists.",
                ));
            }
        }
        if let Some(Some(d)) = &req.description {
            check_text("description", d)?;
        }
        let now = now_secs();
        let v = self
            .groups()
            .update(id, |g| {
                if let Some(x) = &req.name {
                    g.name = x.clone();
                }
                if let Some(x) = &req.description {
                    g.description = x.clone().unwrap_or_default();
                }
                g.bump(now);
                Ok::<(), NetworkError>(())
            })
            .await?;
        Ok(v.value)
    }

    /// Deletes a group no port uses, with its rules and the rules of other groups that name
    /// it as their remote group. A project's `default` group is for admins to delete.
    pub async fn delete_security_group(&self, caller: &Caller, id: &str) -> NetResult<()> {
        let g = self.security_group(caller, id).await?;
        if !caller.may_change(&g.project_id) {
            return Err(NetworkError::policy("delete_security_group"));
        }
        let default = self
            .index(tables::DEFAULT_SECURITY_GROUPS)
            .get(&g.project_id)
            .await?
            .is_some_and(|d| d.value == id);
        if default && !caller.admin {
            return Err(NetworkError::conflict(
                "SecurityGroupCannotRemoveDefault",
                "Removing default security group not allowed.",
            ));
        }
        self.with_delete_mark("security_group", Resource::SecurityGroup, id, || {
            self.finish_group_delete(&g, default)
        })
        .await
    }

    async fn finish_group_delete(&self, g: &SecurityGroupRecord, default: bool) -> NetResult<()> {
        self.barrier().await?;
        let in_use = self
            .ports()
            .list("")
            .await?
            .into_values()
            .any(|p| p.security_groups.contains(&g.id));
        if in_use {
            return Err(NetworkError::conflict(
                "SecurityGroupInUse",
                format!("Security Group {} in use.", g.id),
            ));
        }
        let mut txn = Txn::new()
            .when(tables::SECURITY_GROUPS, &g.id, Expect::Present)
            .delete(tables::SECURITY_GROUPS, &g.id)
            .delete(
                tables::NETWORK_DELETING,
                &deleting_key("security_group", &g.id),
            );
        txn = uncount_in(txn, &g.project_id, "security_group", &g.id);
        if default {
            txn = txn.delete(tables::DEFAULT_SECURITY_GROUPS, &g.project_id);
        }
        for r in self.rules().list("").await?.into_values() {
            if r.security_group_id == g.id || r.remote_group_id.as_deref() == Some(&g.id) {
                txn = txn
                    .delete(tables::SECURITY_GROUP_RULES, &r.id)
                    .delete(tables::SECURITY_GROUP_RULE_KEYS, &rule_key(&r)?);
                txn = uncount_in(txn, &r.project_id, "security_group_rule", &r.id);
            }
        }
        let resp = self.state.write(tables::SECURITY_GROUPS, txn).await?;
        if !resp.succeeded {
            return Err(NetworkError::not_found(Resource::SecurityGroup, &g.id));
        }
        Ok(())
    }

    pub async fn rule(&self, caller: &Caller, id: &str) -> NetResult<RuleRecord> {
        self.barrier().await?;
        match self.rules().get(id).await? {
            Some(r) if sees(caller, &r.value.project_id) => Ok(r.value),
            _ => Err(NetworkError::not_found(Resource::SecurityGroupRule, id)),
        }
    }

    pub async fn list_rules(&self, caller: &Caller) -> NetResult<Vec<RuleRecord>> {
        self.barrier().await?;
        Ok(self
            .rules()
            .list("")
            .await?
            .into_values()
            .filter(|r| sees(caller, &r.project_id))
            .collect())
    }

    pub async fn create_rule(&self, caller: &Caller, req: RuleCreate) -> NetResult<RuleRecord> {
        let group = self.security_group(caller, &req.security_group_id).await?;
        if !caller.may_change(&group.project_id) {
            return Err(NetworkError::policy("create_security_group_rule"));
        }
        let project = match caller.project_for_create(
            "create_security_group_rule",
            &req.project_id,
            &req.tenant_id,
        ) {
            // An admin adding a rule to another project's group: the rule is the group's.
            Ok(p) if caller.admin && req.project_id.is_none() && req.tenant_id.is_none() => {
                let _ = p;
                group.project_id.clone()
            }
            other => other?,
        };
        let direction = match req.direction.as_deref() {
            Some(d @ ("ingress" | "egress")) => d.to_owned(),
            Some(other) => {
                return Err(NetworkError::bad(format!(
                    "Invalid input for direction. Reason: {} is not in [ingress, egress].",
                    shown(other)
                )))
            }
            None => {
                return Err(NetworkError::bad(
                    "Invalid input for direction. Reason: direction is required.",
                ))
            }
        };
        let ethertype = match req.ethertype.as_deref().unwrap_or("IPv4") {
            e if e.eq_ignore_ascii_case("ipv4") => "IPv4".to_owned(),
            e if e.eq_ignore_ascii_case("ipv6") => "IPv6".to_owned(),
            other => {
                return Err(NetworkError::BadRequest {
                    kind: "SecurityGroupRuleInvalidEtherType",
                    message: format!(
                        "Security group rule for ethertype '{}' not supported. Allowed values are [IPv4, IPv6].",
                        shown(other)
                    ),
                })
            }
        };
        let ipv6 = ethertype == "IPv6";
        let protocol = parse_protocol(&req.protocol)?;
        let (min, max) = check_ports(
            protocol.as_ref().map(|(_, n)| *n),
            req.port_range_min,
            req.port_range_max,
        )?;
        if req.remote_address_group_id.is_some() {
            return Err(NetworkError::bad(
                "remote_address_group_id is not supported: address groups do not exist in Shoal",
            ));
        }
        if req.remote_ip_prefix.is_some() && req.remote_group_id.is_some() {
            return Err(NetworkError::BadRequest {
                kind: "SecurityGroupRemoteGroupAndRemoteIpPrefix",
                message: "Only remote_ip_prefix or remote_group_id may be provided.".into(),
            });
        }
        let prefix = match &req.remote_ip_prefix {
            None => None,
            Some(p) => {
                if family_of(p) != Some(!ipv6) {
                    return Err(NetworkError::BadRequest {
                        kind: "SecurityGroupRuleParameterConflict",
                        message: format!(
                            "Conflicting value ethertype {ethertype} for CIDR {}",
                            shown(p)
                        ),
                    });
                }
                Some(normalize_prefix(p, ipv6).map_err(|m| {
                    NetworkError::bad(format!("Invalid input for remote_ip_prefix. Reason: {m}."))
                })?)
            }
        };
        if let Some(remote) = &req.remote_group_id {
            match self.groups().get(remote).await? {
                Some(r) if sees(caller, &r.value.project_id) => {}
                _ => return Err(NetworkError::not_found(Resource::SecurityGroup, remote)),
            }
        }
        let description = req.description.unwrap_or_default();
        check_text("description", &description)?;
        let now = now_secs();
        let rule = RuleRecord {
            id: new_id(),
            project_id: project.clone(),
            security_group_id: group.id.clone(),
            direction,
            ethertype,
            protocol: protocol.map(|(text, _)| text),
            port_range_min: min,
            port_range_max: max,
            remote_ip_prefix: prefix,
            remote_group_id: req.remote_group_id.clone(),
            description,
            created_at: now,
            updated_at: now,
            revision_number: 1,
        };
        let key = rule_key(&rule)?;
        let mut txn = Txn::new()
            .when(tables::SECURITY_GROUPS, &group.id, Expect::Present)
            .when(
                tables::NETWORK_DELETING,
                &deleting_key("security_group", &group.id),
                Expect::Absent,
            )
            .when(tables::SECURITY_GROUP_RULE_KEYS, &key, Expect::Absent);
        if let Some(remote) = &rule.remote_group_id {
            txn = txn.when(tables::SECURITY_GROUPS, remote, Expect::Present);
        }
        let txn = txn
            .put(
                tables::SECURITY_GROUP_RULES,
                &rule.id,
                self.rules().encode(&rule),
            )
            .put(
                tables::SECURITY_GROUP_RULE_KEYS,
                &key,
                self.index(tables::SECURITY_GROUP_RULE_KEYS)
                    .encode(&rule.id),
            );
        let txn = count_in(txn, &project, "security_group_rule", &rule.id);
        let resp = self
            .create_within_quota(&project, "security_group_rule", txn)
            .await?;
        match resp.failed_precondition {
            _ if resp.succeeded => Ok(rule),
            Some(0) => Err(NetworkError::not_found(Resource::SecurityGroup, &group.id)),
            Some(1) => Err(NetworkError::conflict(
                "SecurityGroupInUse",
                format!("Security Group {} is being deleted.", group.id),
            )),
            Some(2) => {
                self.barrier().await?;
                let existing = self
                    .index(tables::SECURITY_GROUP_RULE_KEYS)
                    .get(&key)
                    .await?
                    .map(|v| v.value)
                    .unwrap_or_default();
                Err(NetworkError::conflict(
                    "SecurityGroupRuleExists",
                    format!("Security group rule already exists. Rule id is {existing}."),
                ))
            }
            _ => Err(NetworkError::not_found(
                Resource::SecurityGroup,
                rule.remote_group_id.as_deref().unwrap_or_default(),
            )),
        }
    }

    pub async fn delete_rule(&self, caller: &Caller, id: &str) -> NetResult<()> {
        let rule = self.rule(caller, id).await?;
        if !caller.may_change(&rule.project_id) {
            return Err(NetworkError::policy("delete_security_group_rule"));
        }
        let txn = Txn::new()
            .when(tables::SECURITY_GROUP_RULES, id, Expect::Present)
            .delete(tables::SECURITY_GROUP_RULES, id)
            .delete(tables::SECURITY_GROUP_RULE_KEYS, &rule_key(&rule)?);
        let txn = uncount_in(txn, &rule.project_id, "security_group_rule", id);
        if !self
            .state
            .write(tables::SECURITY_GROUP_RULES, txn)
            .await?
            .succeeded
        {
            return Err(NetworkError::not_found(Resource::SecurityGroupRule, id));
        }
        Ok(())
    }
}

/// Checks a rule's port range for its protocol: ports 1-65535 for TCP, UDP, UDP-Lite, SCTP
/// and DCCP (a lone minimum is one port); ICMP type and code 0-255; nothing for the rest.
fn check_ports(
    protocol: Option<u8>,
    min: Option<i64>,
    max: Option<i64>,
) -> NetResult<(Option<u32>, Option<u32>)> {
    let bad = |message: String| NetworkError::BadRequest {
        kind: "SecurityGroupInvalidPortValue",
        message,
    };
    match protocol {
        _ if min.is_none() && max.is_none() => Ok((None, None)),
        None => Err(NetworkError::BadRequest {
            kind: "SecurityGroupProtocolRequiredWithPorts",
            message: "Must also specify protocol if port range is given.".into(),
        }),
        Some(p) if has_ports(p) => {
            // Neutron reads a missing minimum as a range that ends before it starts.
            let lo = min.ok_or_else(|| NetworkError::BadRequest {
                kind: "SecurityGroupInvalidPortRange",
                message: "For TCP/UDP protocols, port_range_min must be <= port_range_max (port_range_min is missing)".into(),
            })?;
            let hi = max.unwrap_or(lo);
            for v in [lo, hi] {
                if !(1..=65_535).contains(&v) {
                    return Err(bad(format!("Invalid value for port {v}")));
                }
            }
            if lo > hi {
                return Err(NetworkError::BadRequest {
                    kind: "SecurityGroupInvalidPortRange",
                    message: "For TCP/UDP protocols, port_range_min must be <= port_range_max".into(),
                });
            }
            Ok((Some(lo as u32), Some(hi as u32)))
        }
        Some(1 | 58) => {
            if min.is_none() && max.is_some() {
                return Err(NetworkError::BadRequest {
                    kind: "SecurityGroupMissingIcmpType",
                    message: format!("ICMP code (port-range-max) {} is provided but ICMP type (port-range-min) is missing.", max.unwrap_or_default()),
                });
            }
            for (v, field) in [(min, "type"), (max, "code")] {
                if let Some(v) = v {
                    if !(0..=255).contains(&v) {
                        return Err(NetworkError::BadRequest {
                            kind: "SecurityGroupInvalidIcmpValue",
                            message: format!("Invalid value for ICMP {field} (port-range-{}): {v}", if field == "type" { "min" } else { "max" }),
                        });
                    }
                }
            }
            Ok((min.map(|v| v as u32), max.map(|v| v as u32)))
        }
        Some(_) => Err(NetworkError::BadRequest {
            kind: "SecurityGroupInvalidProtocolForPort",
            message: "Invalid protocol for port range, only supported for TCP, UDP, UDPLITE, SCTP, DCCP and ICMP".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::testing::{admin, member, service};

    async fn web(s: &NetworkService, p: &Caller) -> SecurityGroupRecord {
        let req = SecurityGroupCreate {
            name: Some("web".into()),
            ..Default::default()
        };
        s.create_security_group(p, req).await.unwrap()
    }

    fn tcp(group: &str, port: i64) -> RuleCreate {
        RuleCreate {
            security_group_id: group.into(),
            direction: Some("ingress".into()),
            protocol: Some(serde_json::json!("tcp")),
            port_range_min: Some(port),
            port_range_max: Some(port),
            remote_ip_prefix: Some("0.0.0.0/0".into()),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn the_default_group_is_made_once_with_neutrons_rules() {
        let s = service();
        let p = member("p");
        let tasks: Vec<_> = (0..6)
            .map(|_| {
                let s = s.clone();
                tokio::spawn(async move { s.ensure_default_group("p").await.unwrap() })
            })
            .collect();
        let mut ids = BTreeSet::new();
        for t in tasks {
            ids.insert(t.await.unwrap());
        }
        assert_eq!(ids.len(), 1);
        let groups = s.list_security_groups(&p).await.unwrap();
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0].name, "default");
        let rules = s.list_rules(&p).await.unwrap();
        assert_eq!(rules.len(), 4);
        let ingress: Vec<_> = rules.iter().filter(|r| r.direction == "ingress").collect();
        assert_eq!(ingress.len(), 2);
        assert!(ingress
            .iter()
            .all(|r| r.remote_group_id.as_deref() == Some(groups[0].id.as_str())));
        assert!(rules
            .iter()
            .filter(|r| r.direction == "egress")
            .all(|r| r.protocol.is_none() && r.remote_ip_prefix.is_none()));
        let e = s
            .delete_security_group(&p, &groups[0].id)
            .await
            .unwrap_err();
        assert_eq!(e.neutron_type(), "SecurityGroupCannotRemoveDefault");
    }

    #[tokio::test]
    async fn duplicate_rules_are_refused_in_every_spelling() {
        let s = service();
        let p = member("p");
        let g = web(&s, &p).await;
        assert_eq!(
            s.list_rules(&p)
                .await
                .unwrap()
                .iter()
                .filter(|r| r.security_group_id == g.id)
                .count(),
            2
        );
        let r = s.create_rule(&p, tcp(&g.id, 22)).await.unwrap();
        let e = s.create_rule(&p, tcp(&g.id, 22)).await.unwrap_err();
        assert_eq!(e.neutron_type(), "SecurityGroupRuleExists");
        assert!(e.to_string().contains(&r.id), "{e}");
        // "6" is tcp, and no prefix is the same as 0.0.0.0/0.
        let same = RuleCreate {
            protocol: Some(serde_json::json!(6)),
            remote_ip_prefix: None,
            ..tcp(&g.id, 22)
        };
        assert_eq!(
            s.create_rule(&p, same).await.unwrap_err().neutron_type(),
            "SecurityGroupRuleExists"
        );
        s.create_rule(&p, tcp(&g.id, 80)).await.unwrap();
        s.delete_rule(&p, &r.id).await.unwrap();
        s.create_rule(&p, tcp(&g.id, 22)).await.unwrap();
    }

    #[tokio::test]
    async fn bad_rules_get_clear_errors() {
        let s = service();
        let p = member("p");
        let g = s.ensure_default_group("p").await.unwrap();
        let cases = [
            (
                RuleCreate {
                    direction: Some("sideways".into()),
                    ..tcp(&g, 22)
                },
                "HTTPBadRequest",
            ),
            (
                RuleCreate {
                    protocol: Some(serde_json::json!("tcpx")),
                    ..tcp(&g, 22)
                },
                "SecurityGroupRuleInvalidProtocol",
            ),
            (
                RuleCreate {
                    port_range_min: Some(70_000),
                    port_range_max: Some(70_000),
                    ..tcp(&g, 22)
                },
                "SecurityGroupInvalidPortValue",
            ),
            (
                RuleCreate {
                    port_range_min: Some(90),
                    port_range_max: Some(80),
                    ..tcp(&g, 22)
                },
                "SecurityGroupInvalidPortRange",
            ),
            (
                RuleCreate {
                    protocol: None,
                    ..tcp(&g, 22)
                },
                "SecurityGroupProtocolRequiredWithPorts",
            ),
            (
                RuleCreate {
                    ethertype: Some("IPv6".into()),
                    ..tcp(&g, 22)
                },
                "SecurityGroupRuleParameterConflict",
            ),
            (
                RuleCreate {
                    remote_group_id: Some(g.clone()),
                    ..tcp(&g, 22)
                },
                "SecurityGroupRemoteGroupAndRemoteIpPrefix",
            ),
        ];
        for (req, kind) in cases {
            let e = s.create_rule(&p, req).await.unwrap_err();
            assert_eq!(e.neutron_type(), kind, "{e}");
        }
        let missing = RuleCreate {
            remote_ip_prefix: None,
            remote_group_id: Some("nope".into()),
            ..tcp(&g, 22)
        };
        assert_eq!(
            s.create_rule(&p, missing).await.unwrap_err().neutron_type(),
            "SecurityGroupNotFound"
        );
        let icmp = RuleCreate {
            protocol: Some(serde_json::json!("icmp")),
            port_range_min: Some(8),
            port_range_max: Some(0),
            ..tcp(&g, 0)
        };
        s.create_rule(&p, icmp).await.unwrap();
    }

    #[tokio::test]
    async fn groups_are_private_and_in_use_groups_stay() {
        let s = service();
        let p = member("p");
        let g = web(&s, &p).await;
        assert!(s.security_group(&member("q"), &g.id).await.is_err());
        assert!(s.create_rule(&member("q"), tcp(&g.id, 22)).await.is_err());
        assert!(s
            .list_security_groups(&member("q"))
            .await
            .unwrap()
            .iter()
            .all(|x| x.project_id == "q"));
        let n = s
            .create_network(&p, crate::NetworkCreate::default())
            .await
            .unwrap();
        let port = s
            .create_port(
                &p,
                crate::PortCreate {
                    network_id: n.id,
                    security_groups: Some(vec![g.id.clone()]),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(
            s.delete_security_group(&p, &g.id)
                .await
                .unwrap_err()
                .neutron_type(),
            "SecurityGroupInUse"
        );
        s.delete_port(&p, &port.id).await.unwrap();
        s.delete_security_group(&p, &g.id).await.unwrap();
        assert!(s
            .list_rules(&admin())
            .await
            .unwrap()
            .iter()
            .all(|r| r.security_group_id != g.id));
        assert_eq!(
            s.create_security_group(
                &p,
                SecurityGroupCreate {
                    name: Some("default".into()),
                    ..Default::default()
                }
            )
            .await
            .unwrap_err()
            .neutron_type(),
            "SecurityGroupDefaultAlreadyExists"
        );
    }
}
