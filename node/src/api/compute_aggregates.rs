//! Compute v2.1 host aggregates, the availability zones derived from them, and server groups.
//!
//! An aggregate with an `availability_zone` puts its hosts in that zone; hosts in no such
//! aggregate are in the default zone `nova`, as in Nova. Aggregates keep Nova's integer ids
//! at 2.1: a new one takes the next free id under an `Absent` precondition.

use std::collections::{BTreeMap, BTreeSet};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{middleware, Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use shoal_state::{retry, Table, DEFAULT_ATTEMPTS};
use shoal_types::{Expect, Txn};

use super::compute::microversion;
use super::compute::{nova_err, parse};
use super::error::{ApiError, ApiResult};
use super::identity::iso8601;
use super::{AppState, Auth};
use crate::identity::has_role;
use crate::identity::token::now_secs;

pub const T_AGGREGATES: &str = "aggregates";
pub const T_AGGREGATE_NAMES: &str = "aggregate_names";
pub const T_SERVER_GROUPS: &str = "server_groups";

const DEFAULT_ZONE: &str = "nova";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/compute/v2.1/os-aggregates",
            get(list_aggregates).post(create_aggregate),
        )
        .route(
            "/compute/v2.1/os-aggregates/{id}",
            get(show_aggregate).delete(delete_aggregate),
        )
        .route(
            "/compute/v2.1/os-aggregates/{id}/action",
            post(aggregate_action),
        )
        .route("/compute/v2.1/os-availability-zone", get(list_zones))
        .route(
            "/compute/v2.1/os-availability-zone/detail",
            get(list_zones_detail),
        )
        .route(
            "/compute/v2.1/os-server-groups",
            get(list_server_groups).post(create_server_group),
        )
        .route(
            "/compute/v2.1/os-server-groups/{id}",
            get(show_server_group).delete(delete_server_group),
        )
        .layer(middleware::from_fn(microversion))
}

fn bad(m: impl Into<String>) -> ApiError {
    ApiError::bad_request(m).nova()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Aggregate {
    id: u64,
    uuid: String,
    name: String,
    hosts: BTreeSet<String>,
    metadata: BTreeMap<String, String>,
    created: u64,
}

impl Aggregate {
    fn zone(&self) -> Option<&str> {
        self.metadata.get("availability_zone").map(String::as_str)
    }

    fn to_json(&self) -> Value {
        json!({
            "id": self.id, "uuid": self.uuid, "name": self.name,
            "availability_zone": self.zone(), "hosts": self.hosts, "metadata": self.metadata,
            "created_at": iso8601(self.created), "updated_at": null, "deleted": false,
            "deleted_at": null,
        })
    }
}

/// Aggregates are keyed by their id, zero-padded so the table lists them in order.
fn agg_key(id: u64) -> String {
    format!("{id:020}")
}

async fn aggregates(state: &AppState) -> ApiResult<Vec<(Aggregate, u64)>> {
    state.cluster.read_barrier().await.map_err(nova_err)?;
    let listing = aggregate_table(state).list("").await.map_err(nova_err)?;
    Ok(listing
        .rows
        .into_iter()
        .map(|(_, v)| (v.value, v.revision))
        .collect())
}

fn aggregate_table(state: &AppState) -> Table<Aggregate> {
    state.state.table(T_AGGREGATES)
}

async fn find_aggregate(state: &AppState, id: &str) -> ApiResult<(Aggregate, u64)> {
    let n: u64 = id
        .parse()
        .map_err(|_| ApiError::not_found(format!("aggregate {id} could not be found")).nova())?;
    aggregates(state)
        .await?
        .into_iter()
        .find(|(a, _)| a.id == n)
        .ok_or_else(|| ApiError::not_found(format!("aggregate {id} could not be found")).nova())
}

fn check_zone(zone: &str) -> ApiResult<()> {
    super::validate::text("availability_zone", zone, 255, false).map_err(bad)?;
    if zone.contains(':') {
        return Err(bad(
            "availability_zone must be 1 to 255 characters and may not contain ':'",
        ));
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateAggBody {
    aggregate: CreateAgg,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateAgg {
    name: String,
    #[serde(default)]
    availability_zone: Option<String>,
}

async fn create_aggregate(
    State(state): State<AppState>,
    auth: Auth,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    auth.require_admin().map_err(ApiError::nova)?;
    let b: CreateAggBody = parse(&body)?;
    let name = b.aggregate.name;
    super::validate::text("aggregate name", &name, 255, false).map_err(bad)?;
    let mut metadata = BTreeMap::new();
    if let Some(z) = b.aggregate.availability_zone {
        check_zone(&z)?;
        metadata.insert("availability_zone".to_owned(), z);
    }
    retry(T_AGGREGATES, &name, DEFAULT_ATTEMPTS, || async {
        let next = aggregates(&state)
            .await?
            .iter()
            .map(|(a, _)| a.id)
            .max()
            .unwrap_or(0)
            + 1;
        let agg = Aggregate {
            id: next,
            uuid: uuid::Uuid::new_v4().to_string(),
            name: name.clone(),
            hosts: BTreeSet::new(),
            metadata: metadata.clone(),
            created: now_secs(),
        };
        let key = agg_key(next);
        let txn = Txn::new()
            .when(T_AGGREGATE_NAMES, &name, Expect::Absent)
            .when(T_AGGREGATES, &key, Expect::Absent)
            .put(T_AGGREGATES, &key, aggregate_table(&state).encode(&agg))
            .put(T_AGGREGATE_NAMES, &name, key.as_bytes().to_vec());
        let resp = state.cluster.write(txn).await.map_err(nova_err)?;
        if resp.succeeded {
            return Ok(Some(Json(json!({ "aggregate": agg.to_json() }))));
        }
        if resp.failed_precondition == Some(0) {
            return Err(ApiError::conflict(format!("aggregate {name} already exists")).nova());
        }
        Ok(None)
    })
    .await
    .map_err(ApiError::nova)
}

async fn list_aggregates(State(state): State<AppState>, auth: Auth) -> ApiResult<Json<Value>> {
    auth.require_admin().map_err(ApiError::nova)?;
    let items: Vec<Value> = aggregates(&state)
        .await?
        .iter()
        .map(|(a, _)| a.to_json())
        .collect();
    Ok(Json(json!({ "aggregates": items })))
}

async fn show_aggregate(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    auth.require_admin().map_err(ApiError::nova)?;
    let (a, _) = find_aggregate(&state, &id).await?;
    Ok(Json(json!({ "aggregate": a.to_json() })))
}

async fn delete_aggregate(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    auth.require_admin().map_err(ApiError::nova)?;
    let (a, rev) = find_aggregate(&state, &id).await?;
    if !a.hosts.is_empty() {
        return Err(bad(format!(
            "aggregate {id} still has hosts; remove them first"
        )));
    }
    let key = agg_key(a.id);
    let txn = Txn::new()
        .when(T_AGGREGATES, &key, Expect::Revision(rev))
        .delete(T_AGGREGATES, &key)
        .delete(T_AGGREGATE_NAMES, &a.name);
    if !state.cluster.write(txn).await.map_err(nova_err)?.succeeded {
        return Err(ApiError::conflict(format!("aggregate {id} changed; retry")).nova());
    }
    Ok(StatusCode::OK)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HostRef {
    host: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MetadataRef {
    metadata: BTreeMap<String, Option<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
enum Action {
    AddHost(HostRef),
    RemoveHost(HostRef),
    SetMetadata(MetadataRef),
}

/// Applies an action, refusing a host whose zone would then differ between aggregates.
fn apply(
    agg: &mut Aggregate,
    action: &Action,
    others: &[Aggregate],
    known_hosts: &BTreeSet<String>,
) -> Result<(), (StatusCode, String)> {
    match action {
        Action::AddHost(h) => {
            if !known_hosts.contains(&h.host) {
                return Err((
                    StatusCode::NOT_FOUND,
                    format!("compute host {} could not be found", h.host),
                ));
            }
            if !agg.hosts.insert(h.host.clone()) {
                return Err((
                    StatusCode::CONFLICT,
                    format!("host {} is already in aggregate {}", h.host, agg.id),
                ));
            }
        }
        Action::RemoveHost(h) => {
            if !agg.hosts.remove(&h.host) {
                return Err((
                    StatusCode::NOT_FOUND,
                    format!("host {} is not in aggregate {}", h.host, agg.id),
                ));
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
                        return Err((
                            StatusCode::BAD_REQUEST,
                            format!(
                                "host {host} is in zone {oz} through aggregate {}; a host is in one zone only",
                                o.id
                            ),
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}

async fn aggregate_action(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    auth.require_admin().map_err(ApiError::nova)?;
    let action: Action = parse(&body)?;
    if let Action::SetMetadata(m) = &action {
        if let Some(Some(z)) = m.metadata.get("availability_zone") {
            check_zone(z)?;
        }
        // Nova's aggregate metadata schema: keys and values of 1-255 (values 0-255)
        // printable characters, at most 128 items per call.
        if m.metadata.len() > 128 {
            return Err(bad("at most 128 metadata items may be set at once"));
        }
        for (k, v) in &m.metadata {
            super::validate::text("metadata key", k, 255, false).map_err(bad)?;
            if let Some(v) = v {
                super::validate::text(&format!("metadata {k}"), v, 255, true).map_err(bad)?;
            }
        }
    }
    let known: BTreeSet<String> = state
        .cluster
        .cluster_status()
        .await
        .members
        .into_iter()
        .map(|m| m.name)
        .collect();
    let table = aggregate_table(&state);
    retry(T_AGGREGATES, &id, DEFAULT_ATTEMPTS, || async {
        let all = aggregates(&state).await?;
        let (mut agg, rev) = find_aggregate(&state, &id).await?;
        let others: Vec<Aggregate> = all
            .into_iter()
            .map(|(a, _)| a)
            .filter(|a| a.id != agg.id)
            .collect();
        apply(&mut agg, &action, &others, &known).map_err(|(s, m)| ApiError::new(s, m).nova())?;
        let written = table
            .put_at(&agg_key(agg.id), &agg, rev)
            .await
            .map_err(nova_err)?;
        Ok(written.map(|_| Json(json!({ "aggregate": agg.to_json() }))))
    })
    .await
    .map_err(ApiError::nova)
}

/// Zone name to its hosts: aggregate zones first, every other member in `nova`.
async fn zones(state: &AppState) -> ApiResult<BTreeMap<String, BTreeSet<String>>> {
    let aggs = aggregates(state).await?;
    let mut zones: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut placed = BTreeSet::new();
    for (a, _) in &aggs {
        if let Some(z) = a.zone() {
            let e = zones.entry(z.to_owned()).or_default();
            for h in &a.hosts {
                e.insert(h.clone());
                placed.insert(h.clone());
            }
        }
    }
    for m in state.cluster.cluster_status().await.members {
        if !placed.contains(&m.name) {
            zones
                .entry(DEFAULT_ZONE.to_owned())
                .or_default()
                .insert(m.name);
        }
    }
    // Nova lists only zones that hold a host.
    zones.retain(|_, hosts| !hosts.is_empty());
    Ok(zones)
}

async fn list_zones(State(state): State<AppState>, auth: Auth) -> ApiResult<Json<Value>> {
    auth.require("reader").map_err(ApiError::nova)?;
    let items: Vec<Value> = zones(&state)
        .await?
        .into_keys()
        .map(|z| json!({"zoneName": z, "zoneState": {"available": true}, "hosts": null}))
        .collect();
    Ok(Json(json!({ "availabilityZoneInfo": items })))
}

async fn list_zones_detail(State(state): State<AppState>, auth: Auth) -> ApiResult<Json<Value>> {
    auth.require_admin().map_err(ApiError::nova)?;
    let healthy: BTreeMap<String, bool> = state
        .cluster
        .cluster_status()
        .await
        .members
        .into_iter()
        .map(|m| (m.name, m.healthy))
        .collect();
    let items: Vec<Value> = zones(&state)
        .await?
        .into_iter()
        .map(|(z, hosts)| {
            let hosts: serde_json::Map<String, Value> = hosts
                .into_iter()
                .map(|h| {
                    let up = healthy.get(&h).copied().unwrap_or(false);
                    let v = json!({"nova-compute": {"available": up, "active": true, "updated_at": null}});
                    (h, v)
                })
                .collect();
            json!({"zoneName": z, "zoneState": {"available": true}, "hosts": hosts})
        })
        .collect();
    Ok(Json(json!({ "availabilityZoneInfo": items })))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ServerGroup {
    id: String,
    name: String,
    policy: String,
    project_id: String,
    user_id: String,
    /// Servers created into the group; written by the servers API in the placement's
    /// transaction (see `api/nova/servers.rs`).
    #[serde(default)]
    members: Vec<String>,
}

impl ServerGroup {
    fn to_json(&self) -> Value {
        json!({"id": self.id, "name": self.name, "policies": [self.policy], "members": self.members,
            "metadata": {}, "project_id": self.project_id, "user_id": self.user_id})
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateGroupBody {
    server_group: CreateGroup,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateGroup {
    name: String,
    policies: Vec<String>,
}

const POLICIES: [&str; 4] = [
    "anti-affinity",
    "affinity",
    "soft-anti-affinity",
    "soft-affinity",
];

async fn server_groups_of(state: &AppState, project: &str) -> ApiResult<Vec<ServerGroup>> {
    state.cluster.read_barrier().await.map_err(nova_err)?;
    Ok(state
        .cluster
        .list(T_SERVER_GROUPS, &format!("{project}/"), usize::MAX)
        .await
        .map_err(nova_err)?
        .into_iter()
        .filter_map(|(_, r)| serde_json::from_slice(&r.value).ok())
        .collect())
}

fn project_of(auth: &Auth) -> ApiResult<String> {
    auth.0
        .project_id
        .clone()
        .ok_or_else(|| ApiError::forbidden("server groups need a project-scoped token").nova())
}

async fn create_server_group(
    State(state): State<AppState>,
    auth: Auth,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    auth.require("member").map_err(ApiError::nova)?;
    let project = project_of(&auth)?;
    let b: CreateGroupBody = parse(&body)?;
    let g = b.server_group;
    let name = g.name;
    super::validate::text("server group name", &name, 255, false).map_err(bad)?;
    let policy = match g.policies.as_slice() {
        [p] if POLICIES.contains(&p.as_str()) => p.clone(),
        _ => {
            return Err(bad(format!(
                "policies must hold exactly one of {}",
                POLICIES.join(", ")
            )))
        }
    };
    let quota = super::compute_admin::quota(&state, &project, "server_groups").await?;
    let sg = ServerGroup {
        id: uuid::Uuid::new_v4().to_string(),
        name,
        policy,
        project_id: project.clone(),
        user_id: auth.0.user_id.clone(),
        members: Vec::new(),
    };
    let txn = Txn::new().put(
        T_SERVER_GROUPS,
        &format!("{project}/{}", sg.id),
        serde_json::to_vec(&sg).expect("server groups serialise"),
    );
    let prefix = format!("{project}/");
    let count = || async {
        let held = state
            .cluster
            .list(T_SERVER_GROUPS, &prefix, usize::MAX)
            .await;
        Ok(held.map_err(nova_err)?.len() as i64)
    };
    let over = |held| {
        ApiError::forbidden(format!(
            "quota exceeded: the project holds {held} of {quota} server groups"
        ))
        .nova()
    };
    let guard = format!("server_groups/{project}");
    super::compute_admin::commit_within_quota(&state, &guard, quota, count, txn, over).await?;
    Ok(Json(json!({ "server_group": sg.to_json() })))
}

async fn list_server_groups(State(state): State<AppState>, auth: Auth) -> ApiResult<Json<Value>> {
    auth.require("reader").map_err(ApiError::nova)?;
    let project = project_of(&auth)?;
    let items: Vec<Value> = server_groups_of(&state, &project)
        .await?
        .iter()
        .map(ServerGroup::to_json)
        .collect();
    Ok(Json(json!({ "server_groups": items })))
}

async fn find_group(state: &AppState, auth: &Auth, id: &str) -> ApiResult<ServerGroup> {
    let project = project_of(auth)?;
    let mut found = server_groups_of(state, &project)
        .await?
        .into_iter()
        .find(|g| g.id == id);
    if found.is_none() && has_role(&auth.0, "admin") {
        state.cluster.read_barrier().await.map_err(nova_err)?;
        found = state
            .cluster
            .list(T_SERVER_GROUPS, "", usize::MAX)
            .await
            .map_err(nova_err)?
            .into_iter()
            .filter_map(|(_, r)| serde_json::from_slice::<ServerGroup>(&r.value).ok())
            .find(|g| g.id == id);
    }
    found.ok_or_else(|| ApiError::not_found(format!("server group {id} could not be found")).nova())
}

async fn show_server_group(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    auth.require("reader").map_err(ApiError::nova)?;
    let g = find_group(&state, &auth, &id).await?;
    Ok(Json(json!({ "server_group": g.to_json() })))
}

async fn delete_server_group(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    auth.require("member").map_err(ApiError::nova)?;
    let g = find_group(&state, &auth, &id).await?;
    state
        .cluster
        .write(Txn::new().delete(T_SERVER_GROUPS, &format!("{}/{}", g.project_id, g.id)))
        .await
        .map_err(nova_err)?;
    Ok(StatusCode::NO_CONTENT)
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
        assert_eq!(err.0, StatusCode::BAD_REQUEST, "{}", err.1);
        // The same zone, or no zone, is fine.
        let mut a = agg(3, Some("az1"), &[]);
        assert!(apply(&mut a, &add("node1"), &others, &known()).is_ok());
        let mut a = agg(4, None, &[]);
        assert!(apply(&mut a, &add("node1"), &others, &known()).is_ok());
    }

    #[test]
    fn hosts_must_exist_and_not_repeat() {
        let mut a = agg(1, None, &[]);
        assert_eq!(
            apply(&mut a, &add("node9"), &[], &known()).unwrap_err().0,
            StatusCode::NOT_FOUND
        );
        apply(&mut a, &add("node2"), &[], &known()).unwrap();
        assert_eq!(
            apply(&mut a, &add("node2"), &[], &known()).unwrap_err().0,
            StatusCode::CONFLICT
        );
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
}
