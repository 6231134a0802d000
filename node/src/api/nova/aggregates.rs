//! Compute v2.1 host aggregates, availability zones and server groups: the HTTP edge of
//! `shoal_compute::aggregate` and `shoal_compute::server_group`.
//!
//! Translates the requests into `Aggregates` and `ServerGroups` calls, checks the caller's
//! roles, hands in the cluster's members (the hosts an aggregate may hold, the hosts of the
//! default zone) and renders Nova's views; the records, the id allocation, the name index, the
//! zone rules and the policies are the compute service's.

use std::collections::{BTreeMap, BTreeSet};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{middleware, Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use shoal_compute::aggregate::{Action, Aggregate, Aggregates};
use shoal_compute::server_group::{ServerGroup, ServerGroups};
use shoal_identity::has_role;
use shoal_state::time::iso8601;

use crate::api::body::parse;
use crate::api::error::{ApiError, ApiResult};
use crate::api::nova::version::{microversion, Microversion, V2_13, V2_15};
use crate::api::{AppState, Auth};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/compute/v2.1/os-aggregates",
            get(list_aggregates).post(create_aggregate),
        )
        .route(
            "/compute/v2.1/os-aggregates/{id}",
            get(show_aggregate)
                .put(update_aggregate)
                .delete(delete_aggregate),
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

fn aggregates(state: &AppState) -> Aggregates {
    Aggregates::new(&state.state)
}

/// Nova 2.1's view of an aggregate (the `uuid` is shown from 2.41 on).
fn aggregate_json(a: &Aggregate) -> Value {
    json!({
        "id": a.id, "name": a.name,
        "availability_zone": a.zone(), "hosts": a.hosts, "metadata": a.metadata,
        "created_at": iso8601(a.created),
        "updated_at": a.updated.map(iso8601), "deleted": false,
        "deleted_at": null,
    })
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
    let agg = aggregates(&state)
        .create(&b.aggregate.name, b.aggregate.availability_zone)
        .await?;
    // Nova's create answer has no hosts or metadata yet.
    let mut v = aggregate_json(&agg);
    if let Some(o) = v.as_object_mut() {
        o.remove("hosts");
        o.remove("metadata");
    }
    Ok(Json(json!({ "aggregate": v })))
}

async fn list_aggregates(State(state): State<AppState>, auth: Auth) -> ApiResult<Json<Value>> {
    auth.require_admin().map_err(ApiError::nova)?;
    let items: Vec<Value> = aggregates(&state)
        .all()
        .await?
        .iter()
        .map(aggregate_json)
        .collect();
    Ok(Json(json!({ "aggregates": items })))
}

async fn show_aggregate(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    auth.require_admin().map_err(ApiError::nova)?;
    let a = aggregates(&state).get(&id).await?;
    Ok(Json(json!({ "aggregate": aggregate_json(&a) })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateAggBody {
    aggregate: UpdateAgg,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateAgg {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    availability_zone: Option<String>,
}

/// `PUT /os-aggregates/{id}`: a new name and/or zone.
async fn update_aggregate(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    auth.require_admin().map_err(ApiError::nova)?;
    let b: UpdateAggBody = parse(&body)?;
    let agg = aggregates(&state)
        .update(&id, b.aggregate.name, b.aggregate.availability_zone)
        .await?;
    Ok(Json(json!({ "aggregate": aggregate_json(&agg) })))
}

async fn delete_aggregate(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    auth.require_admin().map_err(ApiError::nova)?;
    aggregates(&state).delete(&id).await?;
    Ok(StatusCode::OK)
}

/// The names of the cluster's members: every member is a compute host.
async fn member_names(state: &AppState) -> Vec<String> {
    state
        .cluster
        .cluster_status()
        .await
        .members
        .into_iter()
        .map(|m| m.name)
        .collect()
}

async fn aggregate_action(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    auth.require_admin().map_err(ApiError::nova)?;
    let action: Action = parse(&body)?;
    let known: BTreeSet<String> = member_names(&state).await.into_iter().collect();
    let agg = aggregates(&state).act(&id, &action, &known).await?;
    Ok(Json(json!({ "aggregate": aggregate_json(&agg) })))
}

/// Zone name to its hosts, over the cluster's members.
async fn zones(state: &AppState) -> ApiResult<BTreeMap<String, BTreeSet<String>>> {
    let members = member_names(state).await;
    Ok(aggregates(state)
        .zones(members.iter().map(String::as_str))
        .await?)
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
    // Nova's view of each host's service: available while up (not forced down), active while
    // enabled.
    let members = state.cluster.cluster_status().await.members;
    let service: BTreeMap<String, (bool, bool)> =
        shoal_compute::service::Services::new(&state.state, members)
            .list()
            .await?
            .into_iter()
            .map(|h| {
                let up = h.service.is_up(h.member.healthy);
                (h.member.name, (up, !h.service.disabled))
            })
            .collect();
    let items: Vec<Value> = zones(&state)
        .await?
        .into_iter()
        .map(|(z, hosts)| {
            let hosts: serde_json::Map<String, Value> = hosts
                .into_iter()
                .map(|h| {
                    let (up, active) = service.get(&h).copied().unwrap_or((false, true));
                    let v = json!({"nova-compute": {"available": up, "active": active, "updated_at": null}});
                    (h, v)
                })
                .collect();
            json!({"zoneName": z, "zoneState": {"available": true}, "hosts": hosts})
        })
        .collect();
    Ok(Json(json!({ "availabilityZoneInfo": items })))
}

fn server_groups(state: &AppState) -> ServerGroups {
    ServerGroups::new(&state.state)
}

/// Nova's view of a server group: the owner's ids are shown from microversion 2.13 on.
fn group_json(g: &ServerGroup, v: Microversion) -> Value {
    let mut out = json!({"id": g.id, "name": g.name, "policies": [g.policy],
        "members": g.members, "metadata": {}});
    if v >= V2_13 {
        out["project_id"] = json!(g.project_id);
        out["user_id"] = json!(g.user_id);
    }
    out
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

fn project_of(auth: &Auth) -> ApiResult<String> {
    auth.0
        .project_id
        .clone()
        .ok_or_else(|| ApiError::forbidden("server groups need a project-scoped token").nova())
}

async fn create_server_group(
    State(state): State<AppState>,
    auth: Auth,
    v: Microversion,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    auth.require("member").map_err(ApiError::nova)?;
    let project = project_of(&auth)?;
    let b: CreateGroupBody = parse(&body)?;
    let g = b.server_group;
    // The soft policies came with microversion 2.15; below it Nova's schema knows two.
    if v < V2_15 {
        if let Some(p) = g.policies.iter().find(|p| p.starts_with("soft-")) {
            let shown: String = p.chars().take(64).collect();
            return Err(ApiError::bad_request(format!(
                "Invalid input for field/attribute 0. Value: {shown}. '{shown}' is not one of \
                 ['anti-affinity', 'affinity']"
            ))
            .nova());
        }
    }
    let sg = ServerGroup::new(g.name, &g.policies, &project, &auth.0.user_id)?;
    server_groups(&state).create(&sg).await?;
    Ok(Json(json!({ "server_group": group_json(&sg, v) })))
}

async fn list_server_groups(
    State(state): State<AppState>,
    auth: Auth,
    v: Microversion,
) -> ApiResult<Json<Value>> {
    auth.require("reader").map_err(ApiError::nova)?;
    let project = project_of(&auth)?;
    let groups = server_groups(&state);
    let mut items = Vec::new();
    for mut g in groups.of_project(&project).await? {
        groups.live_members(&mut g).await?;
        items.push(group_json(&g, v));
    }
    Ok(Json(json!({ "server_groups": items })))
}

/// Group `id` of the caller's project; admins also find other projects' groups.
async fn find_group(state: &AppState, auth: &Auth, id: &str) -> ApiResult<ServerGroup> {
    let project = project_of(auth)?;
    Ok(server_groups(state)
        .find(&project, id, has_role(&auth.0, "admin"))
        .await?)
}

async fn show_server_group(
    State(state): State<AppState>,
    auth: Auth,
    v: Microversion,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    auth.require("reader").map_err(ApiError::nova)?;
    let mut g = find_group(&state, &auth, &id).await?;
    server_groups(&state).live_members(&mut g).await?;
    Ok(Json(json!({ "server_group": group_json(&g, v) })))
}

async fn delete_server_group(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    auth.require("member").map_err(ApiError::nova)?;
    let g = find_group(&state, &auth, &id).await?;
    server_groups(&state).delete(&g).await?;
    Ok(StatusCode::NO_CONTENT)
}
