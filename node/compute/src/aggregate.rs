//! Host aggregates and the availability zones derived from them, as Nova keeps them.
//!
//! Owns the `aggregates` table (key: the integer id, zero-padded so the table lists in id
//! order) and its name index `aggregate_names` (key: name, value: the aggregate's key). Nova's
//! integer ids are kept: a new aggregate takes the next free id under an `Absent`
//! precondition. An aggregate with an `availability_zone` puts its hosts in that zone, and a
//! host is in one zone only; hosts in no such aggregate are in the default zone `nova`.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use shoal_state::time::now_secs;
use shoal_state::{retry, tables, Expect, State, Table, Txn, Versioned, DEFAULT_ATTEMPTS};

use crate::error::ComputeError;

/// The zone of hosts no aggregate puts in one.
pub const DEFAULT_ZONE: &str = "nova";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Aggregate {
    pub id: u64,
    pub uuid: String,
    pub name: String,
    pub hosts: BTreeSet<String>,
    pub metadata: BTreeMap<String, String>,
    /// When it was created, in seconds since the epoch.
    pub created: u64,
    /// When it last changed (Nova's `updated_at`), none since its creation.
    #[serde(default)]
    pub updated: Option<u64>,
}

impl Aggregate {
    /// The availability zone the aggregate puts its hosts in.
    pub fn zone(&self) -> Option<&str> {
        self.metadata.get("availability_zone").map(String::as_str)
    }
}

/// Aggregates are keyed by their id, zero-padded so the table lists them in order.
fn agg_key(id: u64) -> String {
    format!("{id:020}")
}

fn bad(m: impl Into<String>) -> ComputeError {
    ComputeError::BadRequest(m.into())
}

fn not_found(id: &str) -> ComputeError {
    ComputeError::NotFound(format!("aggregate {id} could not be found"))
}

/// An aggregate name: 1 to 255 printable characters.
pub fn check_name(name: &str) -> Result<(), ComputeError> {
    shoal_state::validate::text("aggregate name", name, 255, false).map_err(bad)
}

/// An availability zone name: 1 to 255 printable characters, no ':' (Nova's `zone:host`
/// syntax uses it).
pub fn check_zone(zone: &str) -> Result<(), ComputeError> {
    shoal_state::validate::text("availability_zone", zone, 255, false).map_err(bad)?;
    if zone.contains(':') {
        return Err(bad(
            "availability_zone must be 1 to 255 characters and may not contain ':'",
        ));
    }
    Ok(())
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostRef {
    pub host: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetadataRef {
    /// A key with `null` is removed.
    pub metadata: BTreeMap<String, Option<String>>,
}

/// What `POST /os-aggregates/{id}/action` may ask for.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum Action {
    AddHost(HostRef),
    RemoveHost(HostRef),
    SetMetadata(MetadataRef),
}

impl Action {
    /// Nova's aggregate metadata schema: a valid zone, keys and values of 1-255 (values
    /// 0-255) printable characters, at most 128 items per call. Host actions need nothing.
    pub fn check(&self) -> Result<(), ComputeError> {
        let Action::SetMetadata(m) = self else {
            return Ok(());
        };
        if let Some(Some(z)) = m.metadata.get("availability_zone") {
            check_zone(z)?;
        }
        if m.metadata.len() > 128 {
            return Err(bad("at most 128 metadata items may be set at once"));
        }
        for (k, v) in &m.metadata {
            shoal_state::validate::text("metadata key", k, 255, false).map_err(bad)?;
            if let Some(v) = v {
                shoal_state::validate::text(&format!("metadata {k}"), v, 255, true).map_err(bad)?;
            }
        }
        Ok(())
    }
}

/// Applies an action, refusing a host that is not one of `known_hosts`, is already in (or
/// not in) the aggregate, or whose zone would then differ between aggregates.
pub fn apply(
    agg: &mut Aggregate,
    action: &Action,
    others: &[Aggregate],
    known_hosts: &BTreeSet<String>,
) -> Result<(), ComputeError> {
    match action {
        Action::AddHost(h) => {
            if !known_hosts.contains(&h.host) {
                return Err(ComputeError::NotFound(format!(
                    "compute host {} could not be found",
                    h.host
                )));
            }
            if !agg.hosts.insert(h.host.clone()) {
                return Err(ComputeError::Conflict(format!(
                    "host {} is already in aggregate {}",
                    h.host, agg.id
                )));
            }
        }
        Action::RemoveHost(h) => {
            if !agg.hosts.remove(&h.host) {
                return Err(ComputeError::NotFound(format!(
                    "host {} is not in aggregate {}",
                    h.host, agg.id
                )));
            }
        }
        Action::SetMetadata(m) => {
            for (k, v) in &m.metadata {
                match v {
                    Some(v) => {
                        agg.metadata.insert(k.clone(), v.clone());
                    }
                    None => {
                        agg.metadata.remove(k);
                    }
                }
            }
        }
    }
    if let Some(zone) = agg.zone() {
        for host in &agg.hosts {
            for o in others {
                if let Some(oz) = o.zone().filter(|oz| *oz != zone) {
                    if o.hosts.contains(host) {
                        return Err(bad(format!(
                            "host {host} is in zone {oz} through aggregate {}; a host is in one zone only",
                            o.id
                        )));
                    }
                }
            }
        }
    }
    Ok(())
}

/// Zone name to its hosts: aggregate zones first, every other member in `nova`. Only zones
/// that hold a host are listed, as Nova lists them.
pub fn zones<'a>(
    aggregates: &[Aggregate],
    members: impl IntoIterator<Item = &'a str>,
) -> BTreeMap<String, BTreeSet<String>> {
    let mut zones: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut placed = BTreeSet::new();
    for a in aggregates {
        if let Some(z) = a.zone() {
            let e = zones.entry(z.to_owned()).or_default();
            for h in &a.hosts {
                e.insert(h.clone());
                placed.insert(h.clone());
            }
        }
    }
    for m in members {
        if !placed.contains(m) {
            zones
                .entry(DEFAULT_ZONE.to_owned())
                .or_default()
                .insert(m.to_owned());
        }
    }
    zones.retain(|_, hosts| !hosts.is_empty());
    zones
}

/// The aggregate rows.
#[derive(Debug, Clone)]
pub struct Aggregates {
    state: State,
    table: Table<Aggregate>,
}

impl Aggregates {
    pub fn new(state: &State) -> Self {
        Self {
            state: state.clone(),
            table: state.table(tables::AGGREGATES),
        }
    }

    /// Every aggregate in id order with its revision, read after a barrier.
    pub async fn all_versioned(&self) -> Result<Vec<Versioned<Aggregate>>, ComputeError> {
        self.state.read_barrier().await?;
        let listing = self.table.list("").await?;
        Ok(listing.rows.into_iter().map(|(_, v)| v).collect())
    }

    /// Every aggregate in id order, read after a barrier.
    pub async fn all(&self) -> Result<Vec<Aggregate>, ComputeError> {
        Ok(self
            .all_versioned()
            .await?
            .into_iter()
            .map(|v| v.value)
            .collect())
    }

    /// The aggregate whose id is `id` (as the URL gives it) and the other aggregates.
    async fn with_others(
        &self,
        id: &str,
    ) -> Result<(Versioned<Aggregate>, Vec<Aggregate>), ComputeError> {
        let n: u64 = id.parse().map_err(|_| not_found(id))?;
        let (mine, others): (Vec<_>, Vec<_>) = self
            .all_versioned()
            .await?
            .into_iter()
            .partition(|v| v.value.id == n);
        let mine = mine.into_iter().next().ok_or_else(|| not_found(id))?;
        Ok((mine, others.into_iter().map(|v| v.value).collect()))
    }

    /// The aggregate whose id is `id`, after a read barrier.
    pub async fn get(&self, id: &str) -> Result<Aggregate, ComputeError> {
        Ok(self.with_others(id).await?.0.value)
    }

    /// Creates aggregate `name`, in `zone` if given; the name must be new. It takes the next
    /// free id, retried when another create took it first.
    pub async fn create(
        &self,
        name: &str,
        zone: Option<String>,
    ) -> Result<Aggregate, ComputeError> {
        check_name(name)?;
        let mut metadata = BTreeMap::new();
        if let Some(z) = zone {
            check_zone(&z)?;
            metadata.insert("availability_zone".to_owned(), z);
        }
        retry(tables::AGGREGATES, name, DEFAULT_ATTEMPTS, || async {
            let next = self.all().await?.iter().map(|a| a.id).max().unwrap_or(0) + 1;
            let agg = Aggregate {
                id: next,
                uuid: uuid::Uuid::new_v4().to_string(),
                name: name.to_owned(),
                hosts: BTreeSet::new(),
                metadata: metadata.clone(),
                created: now_secs(),
                updated: None,
            };
            let key = agg_key(next);
            let txn = Txn::new()
                .when(tables::AGGREGATE_NAMES, name, Expect::Absent)
                .when(tables::AGGREGATES, &key, Expect::Absent)
                .put(tables::AGGREGATES, &key, self.table.encode(&agg))
                .put(tables::AGGREGATE_NAMES, name, key.as_bytes().to_vec());
            let resp = self.state.write(tables::AGGREGATES, txn).await?;
            if resp.succeeded {
                return Ok(Some(agg));
            }
            if resp.failed_precondition == Some(0) {
                return Err(ComputeError::Conflict(format!(
                    "aggregate {name} already exists"
                )));
            }
            Ok(None)
        })
        .await
    }

    /// Renames the aggregate (the new name must be free) and/or moves it to `zone` (the same
    /// checks as setting its `availability_zone` metadata), in one compare-and-set.
    pub async fn update(
        &self,
        id: &str,
        name: Option<String>,
        zone: Option<String>,
    ) -> Result<Aggregate, ComputeError> {
        if name.is_none() && zone.is_none() {
            return Err(bad(
                "the aggregate update must set name and/or availability_zone",
            ));
        }
        if let Some(n) = &name {
            check_name(n)?;
        }
        if let Some(z) = &zone {
            check_zone(z)?;
        }
        let zone = zone.map(|z| {
            Action::SetMetadata(MetadataRef {
                metadata: BTreeMap::from([("availability_zone".to_owned(), Some(z))]),
            })
        });
        retry(tables::AGGREGATES, id, DEFAULT_ATTEMPTS, || async {
            let (
                Versioned {
                    value: mut agg,
                    revision,
                },
                others,
            ) = self.with_others(id).await?;
            if let Some(action) = &zone {
                apply(&mut agg, action, &others, &BTreeSet::new())?;
            }
            agg.updated = Some(now_secs());
            let key = agg_key(agg.id);
            let mut txn = Txn::new().when(tables::AGGREGATES, &key, Expect::Revision(revision));
            if let Some(name) = name.as_ref().filter(|n| **n != agg.name) {
                txn = txn
                    .when(tables::AGGREGATE_NAMES, name, Expect::Absent)
                    .delete(tables::AGGREGATE_NAMES, &agg.name)
                    .put(tables::AGGREGATE_NAMES, name, key.as_bytes().to_vec());
                agg.name = name.clone();
            }
            let txn = txn.put(tables::AGGREGATES, &key, self.table.encode(&agg));
            let resp = self.state.write(tables::AGGREGATES, txn).await?;
            if resp.succeeded {
                return Ok(Some(agg));
            }
            if resp.failed_precondition == Some(1) {
                return Err(ComputeError::Conflict(format!(
                    "aggregate {} already exists",
                    agg.name
                )));
            }
            Ok(None)
        })
        .await
    }

    /// Deletes the aggregate and its name; it must hold no hosts.
    pub async fn delete(&self, id: &str) -> Result<(), ComputeError> {
        let (Versioned { value: a, revision }, _) = self.with_others(id).await?;
        if !a.hosts.is_empty() {
            return Err(bad(format!(
                "aggregate {id} still has hosts; remove them first"
            )));
        }
        let key = agg_key(a.id);
        let txn = Txn::new()
            .when(tables::AGGREGATES, &key, Expect::Revision(revision))
            .delete(tables::AGGREGATES, &key)
            .delete(tables::AGGREGATE_NAMES, &a.name);
        if self.state.write(tables::AGGREGATES, txn).await?.succeeded {
            Ok(())
        } else {
            Err(ComputeError::Conflict(format!(
                "aggregate {id} changed; retry"
            )))
        }
    }

    /// Applies `action` (checked first) with a compare-and-set on the aggregate's revision,
    /// retried on a concurrent change; `known_hosts` are the hosts that may be added.
    pub async fn act(
        &self,
        id: &str,
        action: &Action,
        known_hosts: &BTreeSet<String>,
    ) -> Result<Aggregate, ComputeError> {
        action.check()?;
        retry(tables::AGGREGATES, id, DEFAULT_ATTEMPTS, || async {
            let (
                Versioned {
                    value: mut agg,
                    revision,
                },
                others,
            ) = self.with_others(id).await?;
            apply(&mut agg, action, &others, known_hosts)?;
            agg.updated = Some(now_secs());
            let written = self.table.put_at(&agg_key(agg.id), &agg, revision).await?;
            Ok(written.map(|_| agg))
        })
        .await
    }

    /// Zone name to its hosts, for the cluster's `members` (see [`zones`]).
    pub async fn zones<'a>(
        &self,
        members: impl IntoIterator<Item = &'a str>,
    ) -> Result<BTreeMap<String, BTreeSet<String>>, ComputeError> {
        Ok(zones(&self.all().await?, members))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agg(id: u64, zone: Option<&str>, hosts: &[&str]) -> Aggregate {
        Aggregate {
            id,
            uuid: String::new(),
            name: format!("a{id}"),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            metadata: zone
                .map(|z| [("availability_zone".to_owned(), z.to_owned())].into())
                .unwrap_or_default(),
            created: 0,
            updated: None,
        }
    }

    fn known() -> BTreeSet<String> {
        ["node1", "node2"].iter().map(|s| s.to_string()).collect()
    }

    fn add(h: &str) -> Action {
        Action::AddHost(HostRef { host: h.into() })
    }

    #[test]
    fn a_host_is_in_one_zone_only() {
        let others = [agg(1, Some("az1"), &["node1"])];
        let mut a = agg(2, Some("az2"), &[]);
        let err = apply(&mut a, &add("node1"), &others, &known()).unwrap_err();
        assert!(matches!(err, ComputeError::BadRequest(_)), "{err}");
        // The same zone, or no zone, is fine.
        let mut a = agg(3, Some("az1"), &[]);
        assert!(apply(&mut a, &add("node1"), &others, &known()).is_ok());
        let mut a = agg(4, None, &[]);
        assert!(apply(&mut a, &add("node1"), &others, &known()).is_ok());
    }

    #[test]
    fn hosts_must_exist_and_not_repeat() {
        let mut a = agg(1, None, &[]);
        assert!(matches!(
            apply(&mut a, &add("node9"), &[], &known()),
            Err(ComputeError::NotFound(_))
        ));
        apply(&mut a, &add("node2"), &[], &known()).unwrap();
        assert!(matches!(
            apply(&mut a, &add("node2"), &[], &known()),
            Err(ComputeError::Conflict(_))
        ));
    }

    #[test]
    fn action_bodies_are_strict() {
        let ok: Action =
            serde_json::from_str(r#"{"set_metadata":{"metadata":{"k":"v","gone":null}}}"#).unwrap();
        let mut a = agg(1, None, &[]);
        a.metadata.insert("gone".into(), "x".into());
        apply(&mut a, &ok, &[], &known()).unwrap();
        assert_eq!(a.metadata, [("k".to_owned(), "v".to_owned())].into());
        assert!(serde_json::from_str::<Action>(r#"{"add_host":{"host":"n","x":1}}"#).is_err());
        assert!(serde_json::from_str::<Action>(r#"{"explode":{}}"#).is_err());
    }

    #[test]
    fn metadata_is_checked() {
        let set = |k: &str, v: &str| {
            Action::SetMetadata(MetadataRef {
                metadata: BTreeMap::from([(k.to_owned(), Some(v.to_owned()))]),
            })
        };
        assert!(set("k", "").check().is_ok());
        assert!(set("", "v").check().is_err());
        assert!(set("availability_zone", "a:b").check().is_err());
        let many = Action::SetMetadata(MetadataRef {
            metadata: (0..129).map(|i| (format!("k{i}"), None)).collect(),
        });
        assert!(many.check().is_err());
    }

    #[test]
    fn unzoned_members_are_in_the_default_zone() {
        let aggs = [agg(1, Some("az1"), &["node1"]), agg(2, Some("empty"), &[])];
        let z = zones(&aggs, ["node1", "node2"]);
        assert_eq!(z.keys().collect::<Vec<_>>(), ["az1", "nova"]);
        assert!(z["nova"].contains("node2") && !z["nova"].contains("node1"));
    }

    #[tokio::test]
    async fn ids_count_up_names_are_unique_and_actions_compare_and_set() {
        let aggs = Aggregates::new(&State::in_memory());
        let a = aggs.create("a", None).await.unwrap();
        let b = aggs.create("b", Some("az1".into())).await.unwrap();
        assert_eq!((a.id, b.id), (1, 2));
        assert!(matches!(
            aggs.create("a", None).await,
            Err(ComputeError::Conflict(m)) if m == "aggregate a already exists"
        ));
        assert!(matches!(
            aggs.update("1", Some("b".into()), None).await,
            Err(ComputeError::Conflict(_))
        ));
        let renamed = aggs.update("1", Some("c".into()), None).await.unwrap();
        assert!(renamed.updated.is_some());
        // The old name is free again.
        aggs.create("a", None).await.unwrap();
        let b = aggs.act("2", &add("node1"), &known()).await.unwrap();
        assert_eq!(b.hosts, ["node1".to_owned()].into());
        // node1 is in az1: aggregate 1 may not put it in another zone.
        aggs.act("1", &add("node1"), &known()).await.unwrap();
        assert!(matches!(
            aggs.update("1", None, Some("az2".into())).await,
            Err(ComputeError::BadRequest(_))
        ));
        assert!(matches!(
            aggs.delete("2").await,
            Err(ComputeError::BadRequest(m)) if m.contains("still has hosts")
        ));
        aggs.act(
            "2",
            &Action::RemoveHost(HostRef {
                host: "node1".into(),
            }),
            &known(),
        )
        .await
        .unwrap();
        aggs.delete("2").await.unwrap();
        assert!(matches!(
            aggs.get("2").await,
            Err(ComputeError::NotFound(_))
        ));
        assert!(matches!(
            aggs.get("x").await,
            Err(ComputeError::NotFound(_))
        ));
        let z = aggs.zones(["node1", "node2"]).await.unwrap();
        assert_eq!(z.keys().collect::<Vec<_>>(), ["nova"]);
    }
}
