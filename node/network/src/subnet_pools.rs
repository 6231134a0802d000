//! Subnet pools (Neutron's `subnet_allocation`): prefixes a project's subnets are carved from,
//! by size (`prefixlen`) or by a cidr inside them, never twice the same addresses.
//!
//! A pool's allocations are the subnets whose `subnetpool_id` names it. A subnet create from a
//! pool writes the pool's row in the same transaction as the subnet, conditioned on the
//! revision it read, so two creates through different nodes cannot carve the same block: the
//! second one's precondition fails, and it reads the allocations again.

use serde::{Deserialize, Deserializer};
use serde_json::Value;
use shoal_state::{tables, Expect, Txn, Versioned};

use crate::ip::{is_v4, Cidr};
use crate::prefix_set::PrefixSet;
use crate::quotas::{count_in, uncount_in};
use crate::records::{SubnetPoolRecord, SubnetRecord};
use crate::{
    check_tags, check_text, new_id, now_secs, nullable, Caller, NetResult, NetworkError,
    NetworkService, Resource, Revisioned,
};

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubnetPoolCreate {
    pub name: Option<String>,
    pub description: Option<String>,
    pub prefixes: Option<Vec<String>>,
    #[serde(default, deserialize_with = "prefixlen")]
    pub default_prefixlen: Option<u8>,
    #[serde(default, deserialize_with = "prefixlen")]
    pub min_prefixlen: Option<u8>,
    #[serde(default, deserialize_with = "prefixlen")]
    pub max_prefixlen: Option<u8>,
    pub shared: Option<bool>,
    pub is_default: Option<bool>,
    #[serde(default, deserialize_with = "quota")]
    pub default_quota: Option<Option<u64>>,
    pub address_scope_id: Option<Value>,
    pub tags: Option<Vec<String>>,
    pub project_id: Option<String>,
    pub tenant_id: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubnetPoolUpdate {
    pub name: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub description: Option<Option<String>>,
    pub prefixes: Option<Vec<String>>,
    #[serde(default, deserialize_with = "prefixlen")]
    pub default_prefixlen: Option<u8>,
    #[serde(default, deserialize_with = "prefixlen")]
    pub min_prefixlen: Option<u8>,
    #[serde(default, deserialize_with = "prefixlen")]
    pub max_prefixlen: Option<u8>,
    pub is_default: Option<bool>,
    #[serde(default, deserialize_with = "quota")]
    pub default_quota: Option<Option<u64>>,
    pub address_scope_id: Option<Value>,
    pub shared: Option<Value>,
    pub ip_version: Option<Value>,
}

/// A prefix length as Neutron converts it: a number or a string of digits, 0 to 128.
pub(crate) fn prefixlen<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u8>, D::Error> {
    let v = Value::deserialize(d)?;
    let n = match &v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.parse().ok()
        }
        _ => None,
    };
    n.filter(|n| *n <= 128)
        .map(|n| Some(n as u8))
        .ok_or_else(|| {
            serde::de::Error::custom(format!("'{v}' is not a prefix length from 0 to 128"))
        })
}

/// `default_quota`: a non-negative integer (or its string), or `null` for no limit.
fn quota<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<u64>>, D::Error> {
    let v = Value::deserialize(d)?;
    let n = match &v {
        Value::Null => return Ok(Some(None)),
        Value::Number(n) => n.as_u64(),
        Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.parse().ok()
        }
        _ => None,
    };
    n.map(|n| Some(Some(n)))
        .ok_or_else(|| serde::de::Error::custom(format!("'{v}' is not a non-negative integer")))
}

/// What a subnet create asks of a pool: any block of a size, or a given cidr inside it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum PoolRequest {
    Any { prefixlen: Option<u8> },
    Specific(Cidr),
}

/// Parses a pool's prefixes: all of one family, each a cidr with no host bits. Returns the
/// family (4 or 6) and the compacted prefixes.
fn read_prefixes(list: &[String]) -> NetResult<(u8, Vec<Cidr>)> {
    if list.is_empty() {
        return Err(NetworkError::bad("Empty subnet pool prefix list."));
    }
    let mut cidrs = Vec::with_capacity(list.len());
    for p in list {
        let c = Cidr::parse(p)
            .map_err(|m| NetworkError::bad(format!("Invalid input for prefixes. Reason: {m}.")))?;
        if c.touches_mapped() {
            return Err(NetworkError::bad(format!(
                "Invalid input for prefixes. Reason: {c} overlaps the IPv4-mapped range \
                 ::ffff:0:0/96."
            )));
        }
        cidrs.push(c);
    }
    let v4 = cidrs[0].is_v4();
    if cidrs.iter().any(|c| c.is_v4() != v4) {
        return Err(NetworkError::bad(
            "Cannot mix IPv4 and IPv6 prefixes in a subnet pool.",
        ));
    }
    let compact = PrefixSet::new(&cidrs).cidrs(v4);
    Ok((if v4 { 4 } else { 6 }, compact))
}

/// Neutron's prefix bounds: `min` defaults to 8 (IPv4) or 64 (IPv6), `max` to the family's
/// width, `default` to `min`; `min <= default <= max <= width`.
fn read_bounds(
    version: u8,
    min: Option<u8>,
    max: Option<u8>,
    default: Option<u8>,
) -> NetResult<(u8, u8, u8)> {
    let width = if version == 4 { 32 } else { 128 };
    let min = min.unwrap_or(if version == 4 { 8 } else { 64 });
    let max = max.unwrap_or(width);
    let default = default.unwrap_or(min);
    let illegal = |t: &str, n: u8, base: &str, b: u8| {
        NetworkError::bad(format!("Illegal prefix bounds: {t}={n}, {base}={b}."))
    };
    if min > max {
        return Err(illegal("min_prefixlen", min, "max_prefixlen", max));
    }
    if max > width {
        return Err(illegal("max_prefixlen", max, "ip_version_max", width));
    }
    if default < min {
        return Err(illegal("default_prefixlen", default, "min_prefixlen", min));
    }
    if default > max {
        return Err(illegal("default_prefixlen", default, "max_prefixlen", max));
    }
    Ok((min, max, default))
}

fn unsupported_scope(v: &Option<Value>) -> NetResult<()> {
    if v.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(NetworkError::bad(
            "address_scope_id is not supported: Shoal has no address scopes",
        ));
    }
    Ok(())
}

fn sees_pool(caller: &Caller, p: &SubnetPoolRecord) -> bool {
    caller.admin || p.shared || caller.owns(&p.project_id)
}

fn cidrs_of(p: &SubnetPoolRecord) -> Vec<Cidr> {
    p.prefixes
        .iter()
        .filter_map(|c| Cidr::parse(c).ok())
        .collect()
}

/// The key of a family's default pool in `default_subnet_pools`.
fn default_key(version: u8) -> String {
    version.to_string()
}

impl NetworkService {
    pub(crate) fn subnet_pools(&self) -> shoal_state::Table<SubnetPoolRecord> {
        self.state.table(tables::SUBNET_POOLS)
    }

    pub async fn subnet_pool(&self, caller: &Caller, id: &str) -> NetResult<SubnetPoolRecord> {
        self.barrier().await?;
        Ok(self.visible_pool(caller, id).await?.value)
    }

    async fn visible_pool(
        &self,
        caller: &Caller,
        id: &str,
    ) -> NetResult<Versioned<SubnetPoolRecord>> {
        self.subnet_pools()
            .get(id)
            .await?
            .filter(|p| sees_pool(caller, &p.value))
            .ok_or_else(|| NetworkError::not_found(Resource::SubnetPool, id))
    }

    /// Pool `id` read after a barrier, if `caller` may change it: 404 if it may not see it,
    /// 403 (`rule`) if it may only see it.
    async fn changeable_pool(
        &self,
        caller: &Caller,
        id: &str,
        rule: &str,
    ) -> NetResult<Versioned<SubnetPoolRecord>> {
        self.barrier().await?;
        let current = self.visible_pool(caller, id).await?;
        if !caller.may_change(&current.value.project_id) {
            return Err(NetworkError::policy(rule));
        }
        Ok(current)
    }

    pub async fn list_subnet_pools(&self, caller: &Caller) -> NetResult<Vec<SubnetPoolRecord>> {
        self.barrier().await?;
        Ok(self
            .subnet_pools()
            .list("")
            .await?
            .into_values()
            .filter(|p| sees_pool(caller, p))
            .collect())
    }

    pub async fn create_subnet_pool(
        &self,
        caller: &Caller,
        req: SubnetPoolCreate,
    ) -> NetResult<SubnetPoolRecord> {
        let project =
            caller.project_for_create("create_subnetpool", &req.project_id, &req.tenant_id)?;
        let shared = req.shared.unwrap_or(false);
        let is_default = req.is_default.unwrap_or(false);
        if shared && !caller.admin {
            return Err(NetworkError::policy("create_subnetpool:shared"));
        }
        if is_default && !caller.admin {
            return Err(NetworkError::policy("create_subnetpool:is_default"));
        }
        unsupported_scope(&req.address_scope_id)?;
        let name = req.name.unwrap_or_default();
        check_text("name", &name)?;
        let description = req.description.unwrap_or_default();
        check_text("description", &description)?;
        let Some(prefixes) = req.prefixes else {
            return Err(NetworkError::bad(
                "Failed to parse request. Required attribute 'prefixes' not specified",
            ));
        };
        let (version, prefixes) = read_prefixes(&prefixes)?;
        let (min, max, default) = read_bounds(
            version,
            req.min_prefixlen,
            req.max_prefixlen,
            req.default_prefixlen,
        )?;
        let tags = check_tags(&req.tags.unwrap_or_default())?;
        let now = now_secs();
        let rec = SubnetPoolRecord {
            id: new_id(),
            project_id: project.clone(),
            name,
            description,
            prefixes: prefixes.iter().map(Cidr::to_string).collect(),
            ip_version: version,
            default_prefixlen: default,
            min_prefixlen: min,
            max_prefixlen: max,
            shared,
            is_default,
            default_quota: req.default_quota.flatten(),
            tags,
            created_at: now,
            updated_at: now,
            revision_number: 1,
        };
        let mut txn = Txn::new()
            .when(tables::SUBNET_POOLS, &rec.id, Expect::Absent)
            .put(
                tables::SUBNET_POOLS,
                &rec.id,
                self.subnet_pools().encode(&rec),
            );
        if is_default {
            txn = self.claim_default(txn, version, &rec.id);
        }
        let txn = count_in(txn, &project, "subnetpool", &rec.id);
        let resp = self
            .create_within_quota(&project, "subnetpool", txn)
            .await?;
        if !resp.succeeded {
            // Only the default's row can have been taken meanwhile (the id is new).
            return Err(default_taken());
        }
        Ok(rec)
    }

    /// Adds the family's default-pool row to `txn` (`Absent`: one default per family).
    fn claim_default(&self, txn: Txn, version: u8, id: &str) -> Txn {
        let key = default_key(version);
        txn.when(tables::DEFAULT_SUBNET_POOLS, &key, Expect::Absent)
            .put(
                tables::DEFAULT_SUBNET_POOLS,
                &key,
                self.index(tables::DEFAULT_SUBNET_POOLS)
                    .encode(&id.to_owned()),
            )
    }

    pub async fn update_subnet_pool(
        &self,
        caller: &Caller,
        id: &str,
        req: SubnetPoolUpdate,
    ) -> NetResult<SubnetPoolRecord> {
        for (given, attr) in [
            (req.shared.is_some(), "shared"),
            (req.ip_version.is_some(), "ip_version"),
        ] {
            if given {
                return Err(NetworkError::bad(format!(
                    "Cannot update read-only attribute {attr}"
                )));
            }
        }
        unsupported_scope(&req.address_scope_id)?;
        if req.is_default.is_some() && !caller.admin {
            return Err(NetworkError::policy("update_subnetpool:is_default"));
        }
        if let Some(n) = &req.name {
            check_text("name", n)?;
        }
        if let Some(Some(d)) = &req.description {
            check_text("description", d)?;
        }
        let new_prefixes = req.prefixes.as_deref().map(read_prefixes).transpose()?;
        shoal_state::retry(
            tables::SUBNET_POOLS,
            id,
            shoal_state::DEFAULT_ATTEMPTS,
            || async {
                let current = self
                    .changeable_pool(caller, id, "update_subnetpool")
                    .await?;
                let mut p = current.value.clone();
                if let Some((version, cidrs)) = &new_prefixes {
                    if *version != p.ip_version {
                        return Err(NetworkError::bad(
                            "Cannot mix IPv4 and IPv6 prefixes in a subnet pool.",
                        ));
                    }
                    if !PrefixSet::new(&cidrs_of(&p)).is_subset(&PrefixSet::new(cidrs)) {
                        return Err(NetworkError::bad(
                        "Illegal update to prefixes: Existing prefixes must be a subset of the \
                         new prefixes.",
                    ));
                    }
                    p.prefixes = cidrs.iter().map(Cidr::to_string).collect();
                }
                let (min, max, default) = read_bounds(
                    p.ip_version,
                    req.min_prefixlen.or(Some(p.min_prefixlen)),
                    req.max_prefixlen.or(Some(p.max_prefixlen)),
                    req.default_prefixlen.or(Some(p.default_prefixlen)),
                )?;
                (p.min_prefixlen, p.max_prefixlen, p.default_prefixlen) = (min, max, default);
                if let Some(x) = &req.name {
                    p.name = x.clone();
                }
                if let Some(x) = &req.description {
                    p.description = x.clone().unwrap_or_default();
                }
                if let Some(q) = req.default_quota {
                    p.default_quota = q;
                }
                let mut txn =
                    Txn::new().when(tables::SUBNET_POOLS, id, Expect::Revision(current.revision));
                match (current.value.is_default, req.is_default) {
                    (false, Some(true)) => txn = self.claim_default(txn, p.ip_version, id),
                    (true, Some(false)) => {
                        txn = txn.delete(tables::DEFAULT_SUBNET_POOLS, &default_key(p.ip_version))
                    }
                    _ => {}
                }
                if let Some(d) = req.is_default {
                    p.is_default = d;
                }
                p.bump(now_secs());
                txn = txn.put(tables::SUBNET_POOLS, id, self.subnet_pools().encode(&p));
                let resp = self.state.write(tables::SUBNET_POOLS, txn).await?;
                if !resp.succeeded && resp.failed_precondition == Some(1) {
                    return Err(default_taken());
                }
                Ok(resp.succeeded.then_some(p))
            },
        )
        .await
    }

    /// `add_prefixes` / `remove_prefixes` (`subnetpool-prefix-ops`): the pool's prefixes grow
    /// by, or lose, the given ones; addresses an allocated subnet holds cannot go. An empty
    /// list changes nothing.
    pub async fn change_pool_prefixes(
        &self,
        caller: &Caller,
        id: &str,
        prefixes: &[String],
        add: bool,
    ) -> NetResult<SubnetPoolRecord> {
        if prefixes.is_empty() {
            return self.subnet_pool(caller, id).await;
        }
        let (version, given) = read_prefixes(prefixes)?;
        shoal_state::retry(
            tables::SUBNET_POOLS,
            id,
            shoal_state::DEFAULT_ATTEMPTS,
            || async {
                let current = self
                    .changeable_pool(caller, id, "update_subnetpool")
                    .await?;
                let mut p = current.value.clone();
                if version != p.ip_version {
                    return Err(NetworkError::bad(
                        "Cannot mix IPv4 and IPv6 prefixes in a subnet pool.",
                    ));
                }
                let old = PrefixSet::new(&cidrs_of(&p));
                let next = if add {
                    let mut all = cidrs_of(&p);
                    all.extend(given.iter().copied());
                    PrefixSet::new(&all)
                } else {
                    let gone = PrefixSet::new(&given);
                    let used: Vec<Cidr> = self
                        .allocations(id)
                        .await?
                        .iter()
                        .filter_map(|s| Cidr::parse(&s.cidr).ok())
                        .collect();
                    let used = PrefixSet::new(&used);
                    if used.difference(&gone) != used {
                        return Err(NetworkError::bad(
                        "Illegal update to prefixes: One or more the prefixes to be removed is \
                         in use by a subnet.",
                    ));
                    }
                    old.difference(&gone)
                };
                p.prefixes = next
                    .cidrs(version == 4)
                    .iter()
                    .map(Cidr::to_string)
                    .collect();
                p.bump(now_secs());
                let written = self.subnet_pools().put_at(id, &p, current.revision).await?;
                Ok(written.map(|_| p))
            },
        )
        .await
    }

    /// Deletes a pool no subnet was allocated from.
    pub async fn delete_subnet_pool(&self, caller: &Caller, id: &str) -> NetResult<()> {
        shoal_state::retry(
            tables::SUBNET_POOLS,
            id,
            shoal_state::DEFAULT_ATTEMPTS,
            || async {
                let current = self
                    .changeable_pool(caller, id, "delete_subnetpool")
                    .await?;
                let p = &current.value;
                if !self.allocations(id).await?.is_empty() {
                    return Err(NetworkError::bad(
                        "Unable to delete subnet pool: Subnet pool has existing allocations.",
                    ));
                }
                let mut txn = Txn::new()
                    .when(tables::SUBNET_POOLS, id, Expect::Revision(current.revision))
                    .delete(tables::SUBNET_POOLS, id);
                if p.is_default {
                    txn = txn.delete(tables::DEFAULT_SUBNET_POOLS, &default_key(p.ip_version));
                }
                let txn = uncount_in(txn, &p.project_id, "subnetpool", id);
                Ok(self
                    .state
                    .write(tables::SUBNET_POOLS, txn)
                    .await?
                    .succeeded
                    .then_some(()))
            },
        )
        .await
    }

    /// The subnets allocated from pool `id`.
    async fn allocations(&self, id: &str) -> NetResult<Vec<SubnetRecord>> {
        Ok(self
            .subnets()
            .list("")
            .await?
            .into_values()
            .filter(|s| s.subnetpool_id.as_deref() == Some(id))
            .collect())
    }

    /// The pool a subnet create names: `subnetpool_id`, or with `use_default_subnetpool` the
    /// family's default. 404 for a pool the caller cannot see, 400 without a default.
    pub(crate) async fn pool_for_subnet(
        &self,
        caller: &Caller,
        id: Option<&str>,
        use_default: bool,
        version: Option<u8>,
    ) -> NetResult<Option<String>> {
        match (id, use_default) {
            (Some(_), true) => Err(NetworkError::bad(
                "subnetpool_id and use_default_subnetpool cannot both be specified",
            )),
            (Some(id), false) => {
                self.barrier().await?;
                self.visible_pool(caller, id).await?;
                Ok(Some(id.to_owned()))
            }
            (None, false) => Ok(None),
            (None, true) => {
                let Some(version) = version else {
                    return Err(NetworkError::bad(
                        "ip_version must be specified in the absence of cidr and subnetpool_id",
                    ));
                };
                self.barrier().await?;
                match self
                    .index(tables::DEFAULT_SUBNET_POOLS)
                    .get(&default_key(version))
                    .await?
                {
                    Some(id) => Ok(Some(id.value)),
                    None => Err(NetworkError::bad(format!(
                        "No default subnetpool found for IPv{version}"
                    ))),
                }
            }
        }
    }

    /// Carves a subnet for `project` from pool `id` as it stands now. Returns the cidr and the
    /// pool's row, whose revision the subnet's transaction must hold.
    pub(crate) async fn carve(
        &self,
        id: &str,
        project: &str,
        version: Option<u8>,
        request: PoolRequest,
    ) -> NetResult<(Cidr, Versioned<SubnetPoolRecord>)> {
        let pool = self
            .subnet_pools()
            .get(id)
            .await?
            .ok_or_else(|| NetworkError::not_found(Resource::SubnetPool, id))?;
        let p = &pool.value;
        let asked = match request {
            PoolRequest::Specific(c) => c.version(),
            PoolRequest::Any { .. } => version.unwrap_or(p.ip_version),
        };
        if asked != p.ip_version {
            return Err(NetworkError::bad(format!(
                "Cannot allocate IPv{asked} subnet from IPv{} subnet pool",
                p.ip_version
            )));
        }
        let prefixlen = match request {
            PoolRequest::Specific(c) => c.prefix(),
            PoolRequest::Any { prefixlen } => prefixlen.unwrap_or(p.default_prefixlen),
        };
        if prefixlen > p.max_prefixlen {
            return Err(NetworkError::bad(format!(
                "Unable to allocate subnet with prefix length {prefixlen}, maximum allowed \
                 prefix is {}.",
                p.max_prefixlen
            )));
        }
        if prefixlen < p.min_prefixlen {
            return Err(NetworkError::bad(format!(
                "Unable to allocate subnet with prefix length {prefixlen}, minimum allowed \
                 prefix is {}.",
                p.min_prefixlen
            )));
        }
        let used = self.allocations(id).await?;
        if let Some(quota) = p.default_quota {
            let unit: u32 = if p.ip_version == 4 { 32 } else { 64 };
            let units = |len: u8| {
                1u128
                    .checked_shl(unit.saturating_sub(u32::from(len)))
                    .unwrap_or(u128::MAX)
            };
            let held: u128 = used
                .iter()
                .filter(|s| s.project_id == project)
                .filter_map(|s| Cidr::parse(&s.cidr).ok())
                .map(|c| units(c.prefix()))
                .fold(0, u128::saturating_add);
            if held.saturating_add(units(prefixlen)) > u128::from(quota) {
                return Err(NetworkError::conflict(
                    "SubnetPoolQuotaExceeded",
                    "Per-tenant subnet pool prefix quota exceeded.",
                ));
            }
        }
        let taken: Vec<Cidr> = used
            .iter()
            .filter_map(|s| Cidr::parse(&s.cidr).ok())
            .collect();
        let free = PrefixSet::new(&cidrs_of(p)).difference(&PrefixSet::new(&taken));
        let v4 = p.ip_version == 4;
        let cidr = match request {
            PoolRequest::Specific(c) => free.contains(&c).then_some(c).ok_or_else(|| {
                NetworkError::conflict(
                    "SubnetAllocationError",
                    "Failed to allocate subnet: Cannot allocate requested subnet from the \
                     available set of prefixes.",
                )
            })?,
            PoolRequest::Any { .. } => {
                // The smallest free block that holds the size, as Neutron picks it.
                let mut blocks = free.cidrs(v4);
                blocks.sort_by_key(|c| std::cmp::Reverse(c.prefix()));
                let bits = if v4 { prefixlen + 96 } else { prefixlen };
                blocks
                    .into_iter()
                    .find(|b| b.prefix() <= prefixlen)
                    .map(|b| Cidr::block(b.first(), bits, v4))
                    .ok_or_else(|| {
                        NetworkError::conflict(
                            "SubnetAllocationError",
                            format!(
                                "Failed to allocate subnet: Insufficient prefix space to \
                                 allocate subnet size /{prefixlen}."
                            ),
                        )
                    })?
            }
        };
        debug_assert!(cidr.is_v4() == is_v4(cidr.first()));
        Ok((cidr, pool))
    }

    /// Adds to a subnet's transaction the pool row at the revision `carve` read (written back
    /// unchanged: its revision moves, so a concurrent allocation from the pool fails).
    pub(crate) fn hold_pool(&self, txn: Txn, pool: &Versioned<SubnetPoolRecord>) -> Txn {
        txn.when(
            tables::SUBNET_POOLS,
            &pool.value.id,
            Expect::Revision(pool.revision),
        )
        .put(
            tables::SUBNET_POOLS,
            &pool.value.id,
            self.subnet_pools().encode(&pool.value),
        )
    }
}

fn default_taken() -> NetworkError {
    NetworkError::invalid(
        "A default subnetpool for this IP family has already been set. Only one default may \
         exist per IP family",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{admin, member, service};

    fn create(prefixes: &[&str]) -> SubnetPoolCreate {
        SubnetPoolCreate {
            name: Some("pool".into()),
            prefixes: Some(prefixes.iter().map(|s| s.to_string()).collect()),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn pools_compact_their_prefixes_and_check_bounds() {
        let svc = service();
        let me = member("p1");
        let p = svc
            .create_subnet_pool(&me, create(&["10.10.0.0/24", "10.10.1.0/24"]))
            .await
            .unwrap();
        assert_eq!(p.prefixes, ["10.10.0.0/23"]);
        assert_eq!(
            (
                p.ip_version,
                p.min_prefixlen,
                p.default_prefixlen,
                p.max_prefixlen
            ),
            (4, 8, 8, 32)
        );
        for (prefixes, what) in [
            (vec![], "Empty"),
            (vec!["10.0.0.0/8", "2001:db8::/32"], "mix"),
            (vec!["10.0.0.1/8"], "recognized"),
        ] {
            let e = svc
                .create_subnet_pool(&me, create(&prefixes))
                .await
                .unwrap_err();
            assert!(e.to_string().contains(what), "{e}");
        }
        let mut bad = create(&["10.0.0.0/8"]);
        bad.min_prefixlen = Some(24);
        bad.default_prefixlen = Some(16);
        let e = svc.create_subnet_pool(&me, bad).await.unwrap_err();
        assert!(
            e.to_string()
                .contains("Illegal prefix bounds: default_prefixlen=16"),
            "{e}"
        );
        // Shared and default pools are the admin's to make.
        let mut shared = create(&["10.0.0.0/8"]);
        shared.shared = Some(true);
        assert!(matches!(
            svc.create_subnet_pool(&me, shared).await,
            Err(NetworkError::Forbidden(_))
        ));
        // Prefixes only grow.
        let mut shrink = SubnetPoolUpdate {
            prefixes: Some(vec!["10.10.0.0/24".into()]),
            ..Default::default()
        };
        let e = svc
            .update_subnet_pool(&me, &p.id, shrink.clone())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("subset"), "{e}");
        shrink.prefixes = Some(vec!["10.10.0.0/22".into()]);
        let grown = svc.update_subnet_pool(&me, &p.id, shrink).await.unwrap();
        assert_eq!(grown.prefixes, ["10.10.0.0/22"]);
        // Another project sees nothing of it.
        assert!(matches!(
            svc.subnet_pool(&member("p2"), &p.id).await,
            Err(NetworkError::NotFound { .. })
        ));
    }

    #[tokio::test]
    async fn one_default_pool_per_family() {
        let svc = service();
        let mut d = create(&["10.0.0.0/8"]);
        d.is_default = Some(true);
        let first = svc.create_subnet_pool(&admin(), d.clone()).await.unwrap();
        let e = svc
            .create_subnet_pool(&admin(), d.clone())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("default"), "{e}");
        svc.delete_subnet_pool(&admin(), &first.id).await.unwrap();
        svc.create_subnet_pool(&admin(), d).await.unwrap();
    }

    fn from_pool(network: &str, pool: &str, prefixlen: Option<u8>) -> crate::SubnetCreate {
        crate::SubnetCreate {
            network_id: network.into(),
            subnetpool_id: Some(pool.into()),
            prefixlen,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn concurrent_subnets_from_a_pool_never_share_addresses() {
        let svc = service();
        let me = member("p1");
        let mut c = create(&["10.1.0.0/22"]);
        c.default_prefixlen = Some(24);
        let pool = svc.create_subnet_pool(&me, c).await.unwrap();
        // Eight creates through one service at once, on two networks, for four /24s.
        let mut nets = Vec::new();
        for _ in 0..2 {
            nets.push(
                svc.create_network(&me, crate::NetworkCreate::default())
                    .await
                    .unwrap()
                    .id,
            );
        }
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let (svc, me, n, p) = (
                    svc.clone(),
                    me.clone(),
                    nets[i % 2].clone(),
                    pool.id.clone(),
                );
                tokio::spawn(async move { svc.create_subnet(&me, from_pool(&n, &p, None)).await })
            })
            .collect();
        let mut got = Vec::new();
        for t in tasks {
            match t.await.unwrap() {
                Ok(s) => got.push(s),
                Err(e) => assert!(e.to_string().contains("Insufficient prefix space"), "{e}"),
            }
        }
        let mut cidrs: Vec<String> = got.iter().map(|s| s.cidr.clone()).collect();
        cidrs.sort();
        assert_eq!(
            cidrs,
            ["10.1.0.0/24", "10.1.1.0/24", "10.1.2.0/24", "10.1.3.0/24"]
        );
        assert!(got
            .iter()
            .all(|s| s.subnetpool_id.as_deref() == Some(pool.id.as_str())));
        assert_eq!(
            got[0].gateway_ip.as_deref().map(|g| g.ends_with(".1")),
            Some(true)
        );
        // In use: the pool stays; a freed block is carved again.
        let e = svc.delete_subnet_pool(&me, &pool.id).await.unwrap_err();
        assert!(e.to_string().contains("existing allocations"), "{e}");
        let e = svc
            .change_pool_prefixes(&me, &pool.id, &["10.1.2.0/24".into()], false)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("in use by a subnet"), "{e}");
        let freed = got.iter().find(|s| s.cidr == "10.1.2.0/24").unwrap();
        svc.delete_subnet(&me, &freed.id).await.unwrap();
        let again = svc
            .create_subnet(&me, from_pool(&nets[0], &pool.id, Some(26)))
            .await
            .unwrap();
        assert_eq!(again.cidr, "10.1.2.0/26");
        // A given cidr must be free and inside the pool; bounds hold.
        let mut specific = from_pool(&nets[1], &pool.id, None);
        specific.cidr = Some("10.1.2.128/25".into());
        assert_eq!(
            svc.create_subnet(&me, specific.clone()).await.unwrap().cidr,
            "10.1.2.128/25"
        );
        let e = svc.create_subnet(&me, specific).await.unwrap_err();
        assert!(e.to_string().contains("available set of prefixes"), "{e}");
        let e = svc
            .create_subnet(&me, from_pool(&nets[1], &pool.id, Some(4)))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("minimum allowed prefix is 8"), "{e}");
        let mut v6 = from_pool(&nets[1], &pool.id, None);
        v6.ip_version = Some(6);
        let e = svc.create_subnet(&me, v6).await.unwrap_err();
        assert!(e.to_string().contains("Cannot allocate IPv6"), "{e}");
        // Another project's pool does not exist for it.
        let other = member("p2");
        let theirs = svc
            .create_network(&other, crate::NetworkCreate::default())
            .await
            .unwrap()
            .id;
        let e = svc
            .create_subnet(&other, from_pool(&theirs, &pool.id, None))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("Subnet pool"), "{e}");
        assert!(matches!(e, NetworkError::NotFound { .. }), "{e}");
    }

    #[tokio::test]
    async fn the_default_pool_serves_use_default_subnetpool() {
        let svc = service();
        let me = member("p1");
        let net = svc
            .create_network(&me, crate::NetworkCreate::default())
            .await
            .unwrap()
            .id;
        let ask = crate::SubnetCreate {
            network_id: net.clone(),
            use_default_subnetpool: Some(true),
            ip_version: Some(4),
            ..Default::default()
        };
        let e = svc.create_subnet(&me, ask.clone()).await.unwrap_err();
        assert!(
            e.to_string()
                .contains("No default subnetpool found for IPv4"),
            "{e}"
        );
        let mut d = create(&["10.9.0.0/16"]);
        d.is_default = Some(true);
        d.shared = Some(true);
        d.default_prefixlen = Some(28);
        svc.create_subnet_pool(&admin(), d).await.unwrap();
        assert_eq!(
            svc.create_subnet(&me, ask).await.unwrap().cidr,
            "10.9.0.0/28"
        );
        let e = svc
            .create_subnet(
                &me,
                crate::SubnetCreate {
                    network_id: net,
                    ..Default::default()
                },
            )
            .await
            .unwrap_err();
        assert!(e.to_string().contains("absence of a cidr"), "{e}");
    }
}
