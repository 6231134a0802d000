//! Compute hosts and placements under `/shoal/v1`: register hosts (synthetic ones for tests
//! and benchmarks), list them and the placed instances, and place instances through the
//! scheduler with claims committed in one Raft transaction. Admin only.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use shoal_scheduler::{
    Flavor, ImageProperties, Request, RequestError, ScheduleError, SchedulerHints, ServerGroup,
};

use crate::api::body::parse;
use crate::api::error::{ApiError, ApiResult};
use crate::api::{AppState, Auth};
use shoal_compute::placement::{self, HostError, HostSpec, InstanceRecord, PlaceError};

/// Most instances one placement request may ask for (each costs two transaction items).
pub const MAX_INSTANCES: usize = 100;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/shoal/v1/hosts", get(hosts_list))
        .route("/shoal/v1/hosts/{name}", get(host_get).put(host_put))
        .route("/shoal/v1/instances", get(instances_list))
        .route("/shoal/v1/placements", post(place))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadParams {
    /// `linearizable` (default) or `local`.
    #[serde(default)]
    consistency: Option<String>,
}

async fn barrier(state: &AppState, p: &ReadParams) -> ApiResult<()> {
    crate::api::shoal::admin::barrier(state, p.consistency.as_deref()).await
}

fn host_error(e: HostError) -> ApiError {
    match e {
        HostError::Cluster(c) => c.into(),
        HostError::Contended(_) => ApiError::conflict(e.to_string()),
        HostError::Corrupt(..) => {
            tracing::error!(error = %e, "corrupt host row");
            ApiError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        }
    }
}

async fn hosts_list(
    State(state): State<AppState>,
    auth: Auth,
    Query(params): Query<ReadParams>,
) -> ApiResult<Json<Value>> {
    auth.require_admin()?;
    barrier(&state, &params).await?;
    let mut hosts = placement::list_hosts(&state.cluster)
        .await
        .map_err(host_error)?;
    placement::fill_instances(&state.cluster, &mut hosts)
        .await
        .map_err(host_error)?;
    Ok(Json(json!({ "hosts": hosts })))
}

async fn host_get(
    State(state): State<AppState>,
    auth: Auth,
    Path(name): Path<String>,
    Query(params): Query<ReadParams>,
) -> ApiResult<Json<Value>> {
    auth.require_admin()?;
    barrier(&state, &params).await?;
    let row = state
        .cluster
        .get(placement::HOSTS, &name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("host {name:?} does not exist")))?;
    let mut host = [placement::decode_host(&name, &row).map_err(host_error)?];
    placement::fill_instances(&state.cluster, &mut host)
        .await
        .map_err(host_error)?;
    let [host] = host;
    Ok(Json(json!({ "host": host })))
}

async fn host_put(
    State(state): State<AppState>,
    auth: Auth,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    auth.require_admin()?;
    if !crate::config::valid_name(&name) {
        return Err(ApiError::bad_request(format!(
            "host name {name:?} is invalid: use 1-63 characters from a-z, A-Z, 0-9, '-' and '_'"
        )));
    }
    let spec: HostSpec = parse(&body)?;
    spec.validate().map_err(ApiError::bad_request)?;
    let mut host = [placement::upsert_host(&state.cluster, &name, &spec)
        .await
        .map_err(host_error)?];
    placement::fill_instances(&state.cluster, &mut host)
        .await
        .map_err(host_error)?;
    let [host] = host;
    Ok(Json(json!({ "host": host })))
}

async fn instances_list(
    State(state): State<AppState>,
    auth: Auth,
    Query(params): Query<ReadParams>,
) -> ApiResult<Json<Value>> {
    auth.require_admin()?;
    barrier(&state, &params).await?;
    let rows = state
        .state
        .table::<InstanceRecord>(placement::INSTANCES)
        .list("")
        .await?;
    let mut out = serde_json::Map::new();
    for (id, rec) in rows.rows {
        out.insert(id, serde_json::to_value(rec.value).expect("serialises"));
    }
    Ok(Json(json!({ "instances": out })))
}

/// The flavor part of a placement request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlavorBody {
    #[serde(default)]
    pub name: Option<String>,
    pub vcpus: u32,
    pub ram_mb: u64,
    pub disk_gb: u64,
    #[serde(default)]
    pub ephemeral_gb: u64,
    #[serde(default)]
    pub swap_mb: u64,
    #[serde(default)]
    pub extra_specs: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HintsBody {
    #[serde(default)]
    pub query: Option<String>,
    #[serde(default)]
    pub group: Option<ServerGroup>,
}

/// `POST /shoal/v1/placements`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlacementBody {
    pub flavor: FlavorBody,
    #[serde(default)]
    pub image: ImageProperties,
    #[serde(default)]
    pub availability_zone: Option<String>,
    #[serde(default)]
    pub scheduler_hints: Option<HintsBody>,
    #[serde(default)]
    pub num_instances: Option<usize>,
    #[serde(default)]
    pub instance_ids: Option<Vec<String>>,
}

fn valid_instance_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

impl PlacementBody {
    /// Turns the body into a scheduler request, or says what is wrong with it.
    pub fn into_request(self) -> Result<Request, String> {
        let f = self.flavor;
        if f.vcpus == 0 || f.vcpus > 1024 {
            return Err(format!("flavor.vcpus must be 1-1024, got {}", f.vcpus));
        }
        if f.ram_mb == 0 || f.ram_mb > 1 << 24 {
            return Err(format!(
                "flavor.ram_mb must be 1-{}, got {}",
                1u64 << 24,
                f.ram_mb
            ));
        }
        for (field, v) in [("disk_gb", f.disk_gb), ("ephemeral_gb", f.ephemeral_gb)] {
            if v > 1 << 20 {
                return Err(format!(
                    "flavor.{field} must be at most {}, got {v}",
                    1u64 << 20
                ));
            }
        }
        if f.swap_mb > 1 << 24 {
            return Err(format!(
                "flavor.swap_mb must be at most {}, got {}",
                1u64 << 24,
                f.swap_mb
            ));
        }
        // Bounded before anything is allocated for it: a count is untrusted input.
        let count = self
            .instance_ids
            .as_ref()
            .map_or(self.num_instances.unwrap_or(1), Vec::len);
        if count == 0 || count > MAX_INSTANCES {
            return Err(format!(
                "a request places 1-{MAX_INSTANCES} instances, got {count}"
            ));
        }
        let ids = match (self.instance_ids, self.num_instances) {
            (Some(ids), n) => {
                if n.is_some_and(|n| n != ids.len()) {
                    return Err(format!(
                        "num_instances ({}) differs from the number of instance_ids ({})",
                        n.unwrap_or(0),
                        ids.len()
                    ));
                }
                if let Some(bad) = ids.iter().find(|id| !valid_instance_id(id)) {
                    return Err(format!(
                        "instance id {bad:?} is invalid: use 1-64 characters from a-z, A-Z, \
                         0-9, '-', '_' and '.'"
                    ));
                }
                ids
            }
            (None, n) => (0..n.unwrap_or(1))
                .map(|_| uuid::Uuid::new_v4().to_string())
                .collect(),
        };
        if ids.is_empty() || ids.len() > MAX_INSTANCES {
            return Err(format!(
                "a request places 1-{MAX_INSTANCES} instances, got {}",
                ids.len()
            ));
        }
        let hints = self
            .scheduler_hints
            .map_or_else(SchedulerHints::default, |h| SchedulerHints {
                query: h.query,
                group: h.group,
                ..Default::default()
            });
        Ok(Request {
            instance_ids: ids,
            flavor: Flavor {
                name: f.name.unwrap_or_else(|| "custom".to_owned()),
                vcpus: f.vcpus,
                ram_mb: f.ram_mb,
                root_gb: f.disk_gb,
                ephemeral_gb: f.ephemeral_gb,
                swap_mb: f.swap_mb,
                extra_specs: f.extra_specs,
            },
            image: self.image,
            availability_zone: self.availability_zone,
            is_admin: true,
            hints,
        })
    }
}

fn place_error(e: PlaceError) -> ApiError {
    match e {
        PlaceError::Schedule(ScheduleError::NoValidHost(n)) => ApiError::conflict(n.to_string()),
        PlaceError::Schedule(ScheduleError::Request(r)) => {
            let msg = match &r {
                RequestError::Query(q) => format!("{r}: {q}"),
                _ => r.to_string(),
            };
            ApiError::bad_request(msg)
        }
        PlaceError::Schedule(ScheduleError::DuplicateInstance(_))
        | PlaceError::InstanceExists(_) => ApiError::conflict(e.to_string()),
        PlaceError::Contended(_) | PlaceError::ExtraPrecondition { .. } => {
            ApiError::conflict(e.to_string())
        }
        PlaceError::Hosts(h) => host_error(h),
        PlaceError::View(_) => {
            tracing::error!(error = %e, "inconsistent host view");
            ApiError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        }
    }
}

async fn place(State(state): State<AppState>, auth: Auth, body: Bytes) -> ApiResult<Json<Value>> {
    auth.require_admin()?;
    let body: PlacementBody = parse(&body)?;
    let request = body.into_request().map_err(ApiError::bad_request)?;
    let placed = placement::place(&state.cluster, Some(&state.hosts), &request)
        .await
        .map_err(place_error)?;
    Ok(Json(
        serde_json::to_value(placed).expect("a placement serialises"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(v: Value) -> Result<Request, String> {
        serde_json::from_value::<PlacementBody>(v)
            .map_err(|e| e.to_string())?
            .into_request()
    }

    #[test]
    fn a_minimal_body_places_one_instance_with_a_generated_id() {
        let r = body(json!({"flavor": {"vcpus": 2, "ram_mb": 512, "disk_gb": 1}})).unwrap();
        assert_eq!(r.instance_ids.len(), 1);
        assert!(uuid::Uuid::parse_str(&r.instance_ids[0]).is_ok());
        assert_eq!(
            (r.flavor.vcpus, r.flavor.ram_mb, r.flavor.root_gb),
            (2, 512, 1)
        );
        assert!(r.is_admin);
    }

    #[test]
    fn num_instances_and_ids_must_agree() {
        let f = json!({"vcpus": 1, "ram_mb": 1, "disk_gb": 0});
        let r = body(json!({"flavor": f, "num_instances": 3})).unwrap();
        assert_eq!(r.instance_ids.len(), 3);
        let r = body(json!({"flavor": f, "instance_ids": ["a", "b"]})).unwrap();
        assert_eq!(r.instance_ids, vec!["a", "b"]);
        let e = body(json!({"flavor": f, "instance_ids": ["a"], "num_instances": 2})).unwrap_err();
        assert!(e.contains("num_instances"), "{e}");
        let e = body(json!({"flavor": f, "num_instances": 0})).unwrap_err();
        assert!(e.contains("1-100"), "{e}");
        let e = body(json!({"flavor": f, "num_instances": 101})).unwrap_err();
        assert!(e.contains("1-100"), "{e}");
        // Huge counts are refused before anything is allocated for them.
        for n in [2_000_000_000u64, 1 << 63, u64::MAX] {
            let e = body(json!({"flavor": f, "num_instances": n})).unwrap_err();
            assert!(e.contains("1-100"), "{n}: {e}");
        }
        let e = body(json!({"flavor": f, "instance_ids": ["a/b"]})).unwrap_err();
        assert!(e.contains("instance id"), "{e}");
    }

    #[test]
    fn bad_flavors_and_unknown_fields_are_refused() {
        let e = body(json!({"flavor": {"vcpus": 0, "ram_mb": 1, "disk_gb": 0}})).unwrap_err();
        assert!(e.contains("flavor.vcpus"), "{e}");
        let e = body(json!({"flavor": {"vcpus": 1, "ram_mb": 0, "disk_gb": 0}})).unwrap_err();
        assert!(e.contains("flavor.ram_mb"), "{e}");
        let e = body(json!({"flavor": {"vcpus": 1, "ram_mb": 1, "disk_gb": 0}, "zone": "x"}))
            .unwrap_err();
        assert!(e.contains("unknown field"), "{e}");
        let e = body(json!({"flavor": {"vcpus": 1, "ram_mb": 1}})).unwrap_err();
        assert!(e.contains("disk_gb"), "{e}");
    }
}
