//! Networks and their segments: a VXLAN network identifier for tenant networks, chosen at
//! random from the configured range and claimed with a row of its own, or a flat physical
//! network for administrators.

use std::collections::BTreeSet;

use serde::Deserialize;
use shoal_state::{tables, Expect, Txn};

use crate::config::MAX_VNI;
use crate::quotas::{count_in, uncount_in};
use crate::records::NetworkRecord;
use crate::{
    check_tags, check_text, new_id, now_secs, nullable, Caller, NetResult, NetworkError,
    NetworkService, Resource, Revisioned,
};

/// Rounds a create makes when the VNI it picked was taken meanwhile.
const SEGMENT_ROUNDS: u32 = 20;
/// A bound on availability zone hints per network.
const MAX_ZONE_HINTS: usize = 16;
/// The smallest MTU IPv4 allows.
const MIN_MTU: u32 = 68;

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkCreate {
    pub name: Option<String>,
    pub description: Option<String>,
    pub admin_state_up: Option<bool>,
    pub shared: Option<bool>,
    pub port_security_enabled: Option<bool>,
    pub mtu: Option<u32>,
    #[serde(rename = "router:external")]
    pub external: Option<bool>,
    #[serde(rename = "provider:network_type")]
    pub network_type: Option<String>,
    #[serde(rename = "provider:physical_network")]
    pub physical_network: Option<String>,
    #[serde(rename = "provider:segmentation_id")]
    pub segmentation_id: Option<u32>,
    pub availability_zone_hints: Option<Vec<String>>,
    pub tags: Option<Vec<String>>,
    pub project_id: Option<String>,
    pub tenant_id: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkUpdate {
    pub name: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub description: Option<Option<String>>,
    pub admin_state_up: Option<bool>,
    pub shared: Option<bool>,
    pub port_security_enabled: Option<bool>,
    pub mtu: Option<u32>,
    #[serde(rename = "router:external")]
    pub external: Option<bool>,
    #[serde(rename = "provider:network_type")]
    pub network_type: Option<serde_json::Value>,
    #[serde(rename = "provider:physical_network")]
    pub physical_network: Option<serde_json::Value>,
    #[serde(rename = "provider:segmentation_id")]
    pub segmentation_id: Option<serde_json::Value>,
}

fn vxlan_key(vni: u32) -> String {
    format!("vxlan/{vni:08}")
}

fn flat_key(physnet: &str) -> String {
    format!("flat/{physnet}")
}

/// The segment row a network holds.
fn segment_key(n: &NetworkRecord) -> Option<String> {
    match (
        n.network_type.as_str(),
        n.segmentation_id,
        &n.physical_network,
    ) {
        ("vxlan", Some(vni), _) => Some(vxlan_key(vni)),
        ("flat", _, Some(p)) => Some(flat_key(p)),
        _ => None,
    }
}

/// A free VNI of `first..=last`, or `None` if all are used: random draws first (the range is
/// usually sparse and concurrent creates then seldom pick the same one), then a scan.
fn pick_vni(first: u32, last: u32, used: &BTreeSet<u32>) -> Option<u32> {
    for _ in 0..32 {
        let v = rand::random_range(first..=last);
        if !used.contains(&v) {
            return Some(v);
        }
    }
    let start = rand::random_range(first..=last);
    (start..=last)
        .chain(first..start)
        .find(|v| !used.contains(v))
}

/// Whether `caller` may see network `n`: its project, admins, and everyone for shared and
/// external networks.
pub(crate) fn sees(caller: &Caller, n: &NetworkRecord) -> bool {
    caller.admin || caller.owns(&n.project_id) || n.shared || n.external
}

pub(crate) fn deleting_key(resource: &str, id: &str) -> String {
    format!("{resource}/{id}")
}

impl NetworkService {
    /// Network `id` as `caller` may see it (404 otherwise), read linearizably.
    pub async fn network(&self, caller: &Caller, id: &str) -> NetResult<NetworkRecord> {
        self.barrier().await?;
        self.visible_network(caller, id).await
    }

    /// Like `network`, from the local replica (the caller has just passed a barrier).
    pub(crate) async fn visible_network(
        &self,
        caller: &Caller,
        id: &str,
    ) -> NetResult<NetworkRecord> {
        match self.networks().get(id).await? {
            Some(n) if sees(caller, &n.value) => Ok(n.value),
            _ => Err(NetworkError::not_found(Resource::Network, id)),
        }
    }

    pub async fn list_networks(&self, caller: &Caller) -> NetResult<Vec<NetworkRecord>> {
        self.barrier().await?;
        Ok(self
            .networks()
            .list("")
            .await?
            .into_values()
            .filter(|n| sees(caller, n))
            .collect())
    }

    pub async fn create_network(
        &self,
        caller: &Caller,
        req: NetworkCreate,
    ) -> NetResult<NetworkRecord> {
        let project =
            caller.project_for_create("create_network", &req.project_id, &req.tenant_id)?;
        let name = req.name.unwrap_or_default();
        check_text("name", &name)?;
        let description = req.description.unwrap_or_default();
        check_text("description", &description)?;
        let shared = req.shared.unwrap_or(false);
        if shared && !caller.admin {
            return Err(NetworkError::policy("create_network:shared"));
        }
        let external = req.external.unwrap_or(false);
        if external && !caller.admin {
            return Err(NetworkError::policy("create_network:router:external"));
        }
        if !caller.admin {
            for (set, attr) in [
                (req.network_type.is_some(), "network_type"),
                (req.physical_network.is_some(), "physical_network"),
                (req.segmentation_id.is_some(), "segmentation_id"),
            ] {
                if set {
                    return Err(NetworkError::policy(&format!(
                        "create_network:provider:{attr}"
                    )));
                }
            }
        }
        let network_type = req.network_type.unwrap_or_else(|| "vxlan".into());
        match network_type.as_str() {
            "vxlan" => {
                if req.physical_network.is_some() {
                    return Err(NetworkError::invalid(
                        "provider:physical_network specified for VXLAN network",
                    ));
                }
                if let Some(v) = req.segmentation_id {
                    if v == 0 || v > MAX_VNI {
                        return Err(NetworkError::invalid(format!(
                            "segmentation_id {v} out of range (1 through {MAX_VNI})"
                        )));
                    }
                }
            }
            "flat" => {
                let Some(p) = &req.physical_network else {
                    return Err(NetworkError::invalid(
                        "physical_network required for flat provider network",
                    ));
                };
                if !self.config.allows_flat(p) || p.is_empty() || p.len() > 64 {
                    return Err(NetworkError::invalid(format!(
                        "physical_network '{}' unknown for flat provider network",
                        crate::ip::shown(p)
                    )));
                }
                if req.segmentation_id.is_some() {
                    return Err(NetworkError::invalid(
                        "segmentation_id specified for flat provider network",
                    ));
                }
            }
            other => {
                return Err(NetworkError::invalid(format!(
                    "network_type value '{}' not supported: use vxlan or flat",
                    crate::ip::shown(other)
                )))
            }
        }
        let max_mtu = self.config.max_mtu(&network_type);
        let mtu = req.mtu.unwrap_or(max_mtu);
        check_mtu(mtu, max_mtu)?;
        let zones = req.availability_zone_hints.unwrap_or_default();
        if zones.len() > MAX_ZONE_HINTS {
            return Err(NetworkError::bad(format!(
                "Too many availability_zone_hints: at most {MAX_ZONE_HINTS}"
            )));
        }
        for z in &zones {
            check_text("availability_zone_hints", z)?;
        }
        let tags = check_tags(&req.tags.unwrap_or_default())?;
        // Neutron makes sure the project has its `default` group when it creates a network.
        self.ensure_default_group(&project).await?;

        let now = now_secs();
        let mut rec = NetworkRecord {
            id: new_id(),
            project_id: project.clone(),
            name,
            description,
            admin_state_up: req.admin_state_up.unwrap_or(true),
            shared,
            external,
            port_security_enabled: req.port_security_enabled.unwrap_or(true),
            mtu,
            network_type: network_type.clone(),
            physical_network: req.physical_network.clone(),
            segmentation_id: None,
            subnets: Vec::new(),
            availability_zone_hints: zones,
            tags,
            status: "ACTIVE".into(),
            created_at: now,
            updated_at: now,
            revision_number: 1,
        };
        for round in 0..SEGMENT_ROUNDS {
            if round > 0 {
                self.barrier().await?;
            }
            let segment = match (&req.physical_network, req.segmentation_id) {
                (Some(p), _) => flat_key(p),
                (None, Some(v)) => vxlan_key(v),
                (None, None) => {
                    let used: BTreeSet<u32> = self
                        .index(tables::NETWORK_SEGMENTS)
                        .list("vxlan/")
                        .await?
                        .rows
                        .iter()
                        .filter_map(|(k, _)| k.strip_prefix("vxlan/")?.parse().ok())
                        .collect();
                    let (first, last) = (self.config.vni_first, self.config.vni_last);
                    let vni = pick_vni(first, last, &used)
                        .ok_or(NetworkError::NoSegment { first, last })?;
                    vxlan_key(vni)
                }
            };
            if network_type == "vxlan" {
                rec.segmentation_id = segment.strip_prefix("vxlan/").and_then(|v| v.parse().ok());
            }
            let txn = Txn::new()
                .when(tables::NETWORKS, &rec.id, Expect::Absent)
                .when(tables::NETWORK_SEGMENTS, &segment, Expect::Absent)
                .put(tables::NETWORKS, &rec.id, self.networks().encode(&rec))
                .put(
                    tables::NETWORK_SEGMENTS,
                    &segment,
                    self.index(tables::NETWORK_SEGMENTS).encode(&rec.id),
                );
            let txn = count_in(txn, &project, "network", &rec.id);
            let resp = self.create_within_quota(&project, "network", txn).await?;
            if resp.succeeded {
                return Ok(rec);
            }
            if resp.failed_precondition == Some(1) {
                if let Some(p) = &req.physical_network {
                    return Err(NetworkError::conflict(
                        "FlatNetworkInUse",
                        format!(
                            "Unable to create the flat network. Physical network {p} is in use."
                        ),
                    ));
                }
                if let Some(v) = req.segmentation_id {
                    return Err(NetworkError::conflict(
                        "TunnelIdInUse",
                        format!("Unable to create the network. The tunnel ID {v} is in use."),
                    ));
                }
                // Another create took the VNI we picked: pick again.
                continue;
            }
            rec.id = new_id();
        }
        Err(shoal_state::StateError::Contended {
            table: tables::NETWORK_SEGMENTS,
            key: "vxlan/".into(),
            attempts: SEGMENT_ROUNDS,
        }
        .into())
    }

    pub async fn update_network(
        &self,
        caller: &Caller,
        id: &str,
        req: NetworkUpdate,
    ) -> NetResult<NetworkRecord> {
        let current = self.network(caller, id).await?;
        if !caller.may_change(&current.project_id) {
            return Err(NetworkError::policy("update_network"));
        }
        if req.network_type.is_some()
            || req.physical_network.is_some()
            || req.segmentation_id.is_some()
        {
            return Err(NetworkError::invalid(
                "Plugin does not support updating provider attributes",
            ));
        }
        if req.shared.is_some() && !caller.admin {
            return Err(NetworkError::policy("update_network:shared"));
        }
        if req.external.is_some() && !caller.admin {
            return Err(NetworkError::policy("update_network:router:external"));
        }
        if let Some(n) = &req.name {
            check_text("name", n)?;
        }
        if let Some(Some(d)) = &req.description {
            check_text("description", d)?;
        }
        if let Some(mtu) = req.mtu {
            check_mtu(mtu, self.config.max_mtu(&current.network_type))?;
        }
        if req.shared == Some(false) && current.shared {
            // Neutron refuses to unshare a network other projects have ports on.
            let foreign = self
                .ports()
                .list("")
                .await?
                .into_values()
                .any(|p| p.network_id == id && p.project_id != current.project_id);
            if foreign {
                return Err(NetworkError::conflict(
                    "InvalidSharedSetting",
                    format!(
                        "Unable to reconfigure sharing settings for network {id}. \
                         Multiple tenants are using it."
                    ),
                ));
            }
        }
        let now = now_secs();
        let v = self
            .networks()
            .update(id, |n| {
                if let Some(x) = &req.name {
                    n.name = x.clone();
                }
                if let Some(x) = &req.description {
                    n.description = x.clone().unwrap_or_default();
                }
                if let Some(x) = req.admin_state_up {
                    n.admin_state_up = x;
                }
                if let Some(x) = req.shared {
                    n.shared = x;
                }
                if let Some(x) = req.external {
                    n.external = x;
                }
                if let Some(x) = req.port_security_enabled {
                    n.port_security_enabled = x;
                }
                if let Some(x) = req.mtu {
                    n.mtu = x;
                }
                n.bump(now);
                Ok::<(), NetworkError>(())
            })
            .await?;
        Ok(v.value)
    }

    /// Deletes a network with no ports left on it, its subnets with it.
    ///
    /// A port create that commits concurrently must not be left on a deleted network: the
    /// delete first writes a `network_deleting` row, which every port create has an `Absent`
    /// precondition on; it then looks for ports through a read barrier, so every port created
    /// before that row is seen, and every one after it fails.
    pub async fn delete_network(&self, caller: &Caller, id: &str) -> NetResult<()> {
        let current = self.network(caller, id).await?;
        if !caller.may_change(&current.project_id) {
            return Err(NetworkError::policy("delete_network"));
        }
        self.with_delete_mark("network", Resource::Network, id, || {
            self.finish_network_delete(id)
        })
        .await
    }

    /// Runs `finish` holding the `network_deleting` mark of `{kind}/{id}` (409 if another
    /// delete holds it). `finish` deletes the mark in its own final transaction; if it fails
    /// the mark is removed here, so creates may use the resource again.
    pub(crate) async fn with_delete_mark<F, Fut>(
        &self,
        kind: &str,
        resource: Resource,
        id: &str,
        finish: F,
    ) -> NetResult<()>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = NetResult<()>>,
    {
        let mark = deleting_key(kind, id);
        let marks = self.index(tables::NETWORK_DELETING);
        match marks.put_if_absent(&mark, &String::new()).await {
            Ok(_) => {}
            Err(shoal_state::StateError::AlreadyExists { .. }) => {
                return Err(NetworkError::conflict(
                    "InUse",
                    format!(
                        "{} {id} is being deleted by another request.",
                        resource.name()
                    ),
                ))
            }
            Err(e) => return Err(e.into()),
        }
        let result = finish().await;
        if result.is_err() {
            marks.delete(&mark).await?;
        }
        result
    }

    async fn finish_network_delete(&self, id: &str) -> NetResult<()> {
        let mark = deleting_key("network", id);
        shoal_state::retry(
            tables::NETWORKS,
            id,
            shoal_state::DEFAULT_ATTEMPTS,
            || async {
                self.barrier().await?;
                let Some(net) = self.networks().get(id).await? else {
                    return Err(NetworkError::not_found(Resource::Network, id));
                };
                // Unassociated floating IPs go with their external network, as in Neutron.
                let mut txn = Txn::new();
                let mut in_use = false;
                for (_, p) in self.ports().list("").await?.rows {
                    if p.value.network_id != id {
                        continue;
                    }
                    match self.releasable_floating_ip(txn.clone(), &p).await? {
                        Some(t) => txn = t,
                        None => {
                            in_use = true;
                            break;
                        }
                    }
                }
                if in_use {
                    return Err(NetworkError::conflict(
                        "NetworkInUse",
                        format!(
                            "Unable to complete operation on network {id}. There are one or more \
                         ports still in use on the network."
                        ),
                    ));
                }
                let n = net.value;
                let mut txn = txn
                    .when(tables::NETWORKS, id, Expect::Revision(net.revision))
                    .delete(tables::NETWORKS, id)
                    .delete(tables::NETWORK_DELETING, &mark);
                if let Some(seg) = segment_key(&n) {
                    txn = txn.delete(tables::NETWORK_SEGMENTS, &seg);
                }
                txn = uncount_in(txn, &n.project_id, "network", id);
                for sid in &n.subnets {
                    if let Some(s) = self.subnets().get(sid).await? {
                        txn = uncount_in(txn, &s.value.project_id, "subnet", sid);
                    }
                    txn = txn.delete(tables::SUBNETS, sid);
                }
                let resp = self.state.write(tables::NETWORKS, txn).await?;
                Ok(resp.succeeded.then_some(()))
            },
        )
        .await
    }
}

fn check_mtu(mtu: u32, max: u32) -> NetResult<()> {
    if mtu > max {
        return Err(NetworkError::invalid(format!(
            "Requested MTU is too big, maximum is {max}"
        )));
    }
    if mtu < MIN_MTU {
        return Err(NetworkError::invalid(format!(
            "Requested MTU {mtu} is too small, minimum is {MIN_MTU}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{admin, member, service};

    #[tokio::test]
    async fn tenant_networks_get_vxlan_and_mtu() {
        let s = service();
        let n = s
            .create_network(
                &member("p"),
                NetworkCreate {
                    name: Some("net".into()),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(n.network_type, "vxlan");
        assert_eq!(n.mtu, 1450);
        let vni = n.segmentation_id.unwrap();
        assert!((1..=65_535).contains(&vni));
        assert_eq!(s.list_networks(&member("p")).await.unwrap().len(), 1);
        assert!(s.list_networks(&member("q")).await.unwrap().is_empty());
        assert!(matches!(
            s.network(&member("q"), &n.id).await,
            Err(NetworkError::NotFound { .. })
        ));
        let too_big = s
            .create_network(
                &member("p"),
                NetworkCreate {
                    mtu: Some(1500),
                    ..Default::default()
                },
            )
            .await;
        assert!(matches!(too_big, Err(NetworkError::BadRequest { .. })));
    }

    #[tokio::test]
    async fn provider_attributes_are_for_admins_and_unique() {
        let s = service();
        let flat = NetworkCreate {
            network_type: Some("flat".into()),
            physical_network: Some("physnet1".into()),
            ..Default::default()
        };
        assert!(matches!(
            s.create_network(&member("p"), flat.clone()).await,
            Err(NetworkError::Forbidden(_))
        ));
        let n = s.create_network(&admin(), flat.clone()).await.unwrap();
        assert_eq!((n.mtu, n.segmentation_id), (1500, None));
        let again = s.create_network(&admin(), flat).await.unwrap_err();
        assert_eq!(again.neutron_type(), "FlatNetworkInUse");
        let fixed = NetworkCreate {
            segmentation_id: Some(4242),
            ..Default::default()
        };
        s.create_network(&admin(), fixed.clone()).await.unwrap();
        assert_eq!(
            s.create_network(&admin(), fixed)
                .await
                .unwrap_err()
                .neutron_type(),
            "TunnelIdInUse"
        );
        s.delete_network(&admin(), &n.id).await.unwrap();
        // The physical network is free again.
        s.create_network(
            &admin(),
            NetworkCreate {
                network_type: Some("flat".into()),
                physical_network: Some("physnet1".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn vnis_run_out_with_a_clear_error() {
        let s = NetworkService::new(
            shoal_state::State::in_memory(),
            crate::NetworkConfig {
                vni_first: 10,
                vni_last: 12,
                ..Default::default()
            },
        );
        let mut seen = BTreeSet::new();
        for _ in 0..3 {
            let n = s
                .create_network(&member("p"), NetworkCreate::default())
                .await
                .unwrap();
            assert!(seen.insert(n.segmentation_id.unwrap()));
        }
        let e = s
            .create_network(&member("p"), NetworkCreate::default())
            .await
            .unwrap_err();
        assert!(matches!(
            e,
            NetworkError::NoSegment {
                first: 10,
                last: 12
            }
        ));
    }

    #[tokio::test]
    async fn shared_networks_are_seen_by_all_but_changed_by_owner() {
        let s = service();
        let n = s
            .create_network(
                &admin(),
                NetworkCreate {
                    shared: Some(true),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(s.list_networks(&member("q")).await.unwrap().len(), 1);
        assert!(matches!(
            s.delete_network(&member("q"), &n.id).await,
            Err(NetworkError::Forbidden(_))
        ));
        assert!(matches!(
            s.create_network(
                &member("q"),
                NetworkCreate {
                    shared: Some(true),
                    ..Default::default()
                }
            )
            .await,
            Err(NetworkError::Forbidden(_))
        ));
    }

    #[test]
    fn vni_picks_avoid_used_ones() {
        let used: BTreeSet<u32> = (1..=99).collect();
        assert_eq!(pick_vni(1, 100, &used), Some(100));
        let all: BTreeSet<u32> = (1..=100).collect();
        assert_eq!(pick_vni(1, 100, &all), None);
    }
}
