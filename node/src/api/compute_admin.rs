//! Compute v2.1 administration: quotas and limits, hypervisors and compute services.
//!
//! Every Shoal node is a hypervisor and runs the compute service, so both lists come from the
//! cluster's membership. A disabled service is a row in `compute_services`; quotas a project
//! overrides are a row in `quotas`, everything else takes Nova's defaults.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, put};
use axum::{middleware, Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use shoal_state::quota::{commit_within_quota as commit_within, QuotaOutcome};
use shoal_types::{Txn, TxnResponse};

use super::compute::microversion;
use super::compute::nova_err;
use super::error::{ApiError, ApiResult};
use super::{AppState, Auth};
use crate::identity::has_role;

pub const T_QUOTAS: &str = "quotas";
pub const T_COMPUTE_SERVICES: &str = "compute_services";

/// Nova's default quotas, in the order `quota show` prints them.
pub const DEFAULT_QUOTAS: [(&str, i64); 15] = [
    ("cores", 20),
    ("fixed_ips", -1),
    ("floating_ips", 10),
    ("injected_file_content_bytes", 10240),
    ("injected_file_path_bytes", 255),
    ("injected_files", 5),
    ("instances", 10),
    ("key_pairs", 100),
    ("metadata_items", 128),
    ("networks", -1),
    ("ram", 51200),
    ("security_group_rules", 20),
    ("security_groups", 10),
    ("server_group_members", 10),
    ("server_groups", 10),
];

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/compute/v2.1/os-quota-sets/{project}",
            get(show_quotas).put(update_quotas).delete(revert_quotas),
        )
        .route(
            "/compute/v2.1/os-quota-sets/{project}/defaults",
            get(default_quotas),
        )
        .route(
            "/compute/v2.1/os-quota-sets/{project}/detail",
            get(detail_quotas),
        )
        .route("/compute/v2.1/limits", get(limits))
        .route("/compute/v2.1/os-hypervisors", get(list_hypervisors))
        .route(
            "/compute/v2.1/os-hypervisors/detail",
            get(list_hypervisors_detail),
        )
        .route("/compute/v2.1/os-services", get(list_services))
        .route("/compute/v2.1/os-services/{action}", put(set_service))
        .layer(middleware::from_fn(microversion))
}

/// Whether the caller may read project `project`'s quotas: admins any, others their own.
fn can_read_quotas(auth: &Auth, project: &str) -> bool {
    has_role(&auth.0, "admin")
        || (has_role(&auth.0, "reader") && auth.0.project_id.as_deref() == Some(project))
}

/// The project's quotas: Nova's defaults with the project's overrides applied.
async fn quotas_of(state: &AppState, project: &str) -> ApiResult<BTreeMap<String, i64>> {
    state.cluster.read_barrier().await.map_err(nova_err)?;
    let mut q: BTreeMap<String, i64> = DEFAULT_QUOTAS
        .iter()
        .map(|(k, v)| ((*k).to_owned(), *v))
        .collect();
    if let Some(overrides) = state
        .state
        .table::<BTreeMap<String, i64>>(T_QUOTAS)
        .get(project)
        .await
        .map_err(nova_err)?
    {
        let overrides = overrides.value;
        q.extend(overrides);
    }
    Ok(q)
}

/// One quota of the project, `-1` meaning unlimited.
pub async fn quota(state: &AppState, project: &str, name: &str) -> ApiResult<i64> {
    Ok(quotas_of(state, project)
        .await?
        .get(name)
        .copied()
        .unwrap_or(-1))
}

/// Commits `txn` only if what the scope `guard` covers, as `count` reads it from the local
/// replica, stays below `limit` (negative: unlimited); otherwise answers `over(held)`. The
/// guard-row protocol that makes this race-free is `shoal_state::quota::commit_within_quota`.
///
/// Returns the write's response when the write succeeded or failed on one of `txn`'s own
/// preconditions (for example a name that exists), for the caller to interpret.
pub async fn commit_within_quota<C, F>(
    state: &AppState,
    guard: &str,
    limit: i64,
    count: C,
    txn: Txn,
    over: impl Fn(i64) -> ApiError,
) -> ApiResult<TxnResponse>
where
    C: FnMut() -> F,
    F: Future<Output = ApiResult<i64>>,
{
    match commit_within(&state.state, guard, limit, count, txn).await {
        Ok(QuotaOutcome::Written(resp)) => Ok(resp),
        Ok(QuotaOutcome::Over { held }) => Err(over(held)),
        Err(e) => Err(ApiError::nova(e)),
    }
}

fn flag(q: &HashMap<String, String>, key: &str) -> bool {
    q.get(key)
        .is_some_and(|v| !matches!(v.to_ascii_lowercase().as_str(), "false" | "0" | "no"))
}

/// Quotas with what the project's servers hold (`instances`, `cores`, `ram`).
async fn detail(
    state: &AppState,
    project: &str,
    q: &BTreeMap<String, i64>,
) -> ApiResult<serde_json::Map<String, Value>> {
    let (instances, cores, ram) = super::nova::servers::usage(state, project).await?;
    Ok(q.iter()
        .map(|(k, v)| {
            let in_use = match k.as_str() {
                "instances" => instances,
                "cores" => cores,
                "ram" => ram,
                _ => 0,
            };
            (
                k.clone(),
                json!({"limit": v, "in_use": in_use, "reserved": 0}),
            )
        })
        .collect())
}

/// Refuses a project id that names no project, as Nova does with its Keystone check.
async fn known_project(state: &AppState, project: &str) -> ApiResult<()> {
    let exists = !project.is_empty()
        && project.len() <= 64
        && project
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && state
            .identity
            .get_project(project)
            .await
            .map_err(nova_err)?
            .is_some();
    if exists {
        Ok(())
    } else {
        let shown: String = project
            .chars()
            .take(64)
            .flat_map(char::escape_default)
            .collect();
        Err(ApiError::bad_request(format!("project id {shown} is not a valid project")).nova())
    }
}

async fn show_quotas(
    State(state): State<AppState>,
    auth: Auth,
    Path(project): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    if !can_read_quotas(&auth, &project) {
        return Err(
            ApiError::forbidden("reading another project's quotas needs the admin role").nova(),
        );
    }
    known_project(&state, &project).await?;
    let q = quotas_of(&state, &project).await?;
    let mut body = if flag(&params, "usage") {
        detail(&state, &project, &q).await?
    } else {
        q.into_iter().map(|(k, v)| (k, json!(v))).collect()
    };
    body.insert("id".into(), json!(project));
    Ok(Json(json!({ "quota_set": body })))
}

async fn detail_quotas(
    State(state): State<AppState>,
    auth: Auth,
    Path(project): Path<String>,
) -> ApiResult<Json<Value>> {
    if !can_read_quotas(&auth, &project) {
        return Err(
            ApiError::forbidden("reading another project's quotas needs the admin role").nova(),
        );
    }
    known_project(&state, &project).await?;
    let q = quotas_of(&state, &project).await?;
    let mut body = detail(&state, &project, &q).await?;
    body.insert("id".into(), json!(project));
    Ok(Json(json!({ "quota_set": body })))
}

async fn default_quotas(auth: Auth, Path(project): Path<String>) -> ApiResult<Json<Value>> {
    auth.require("reader").map_err(ApiError::nova)?;
    let mut body: serde_json::Map<String, Value> = DEFAULT_QUOTAS
        .iter()
        .map(|(k, v)| ((*k).to_owned(), json!(v)))
        .collect();
    body.insert("id".into(), json!(project));
    Ok(Json(json!({ "quota_set": body })))
}

/// Checks a `quota_set` update: known keys only, integers of -1 (unlimited) or more.
fn parse_quota_update(body: &Bytes) -> Result<BTreeMap<String, i64>, String> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        quota_set: serde_json::Map<String, Value>,
    }
    let b: Body = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let mut out = BTreeMap::new();
    for (k, v) in b.quota_set {
        if k == "force" {
            if !v.is_boolean() {
                return Err("force must be a boolean".into());
            }
            continue;
        }
        if !DEFAULT_QUOTAS.iter().any(|(name, _)| *name == k) {
            let known: Vec<&str> = DEFAULT_QUOTAS.iter().map(|(n, _)| *n).collect();
            return Err(format!(
                "additional properties are not allowed ({k} was unexpected); quotas are: {}",
                known.join(", ")
            ));
        }
        let n = match &v {
            Value::Number(n) => n.as_i64(),
            Value::String(s) => s.parse().ok(),
            _ => None,
        }
        .filter(|n| (-1..=super::validate::MAX_INT as i64).contains(n))
        .ok_or_else(|| {
            format!(
                "{k} must be an integer from -1 (unlimited) to {}, not {v}",
                super::validate::MAX_INT
            )
        })?;
        out.insert(k, n);
    }
    Ok(out)
}

async fn update_quotas(
    State(state): State<AppState>,
    auth: Auth,
    Path(project): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    auth.require_admin().map_err(ApiError::nova)?;
    let update = parse_quota_update(&body).map_err(|m| {
        ApiError::bad_request(format!("invalid input for the request body: {m}")).nova()
    })?;
    known_project(&state, &project).await?;
    // Merge into the stored overrides with a compare-and-set, so concurrent updates of
    // different quotas both take effect.
    state
        .state
        .table::<BTreeMap<String, i64>>(T_QUOTAS)
        .upsert(&project, BTreeMap::new, |overrides| {
            overrides.extend(update.clone());
            Ok::<_, ApiError>(())
        })
        .await
        .map_err(ApiError::nova)?;
    let q = quotas_of(&state, &project).await?;
    Ok(Json(json!({ "quota_set": q })))
}

async fn revert_quotas(
    State(state): State<AppState>,
    auth: Auth,
    Path(project): Path<String>,
) -> ApiResult<StatusCode> {
    auth.require_admin().map_err(ApiError::nova)?;
    known_project(&state, &project).await?;
    state
        .cluster
        .write(Txn::new().delete(T_QUOTAS, &project))
        .await
        .map_err(nova_err)?;
    Ok(StatusCode::ACCEPTED)
}

async fn limits(State(state): State<AppState>, auth: Auth) -> ApiResult<Json<Value>> {
    let project = auth
        .0
        .project_id
        .clone()
        .ok_or_else(|| ApiError::forbidden("limits need a project-scoped token").nova())?;
    let q = quotas_of(&state, &project).await?;
    let get = |k: &str| q.get(k).copied().unwrap_or(0);
    let (instances, cores, ram) = super::nova::servers::usage(&state, &project).await?;
    Ok(Json(json!({"limits": {"rate": [], "absolute": {
        "maxTotalInstances": get("instances"), "maxTotalCores": get("cores"),
        "maxTotalRAMSize": get("ram"), "maxTotalKeypairs": get("key_pairs"),
        "maxServerMeta": get("metadata_items"), "maxImageMeta": get("metadata_items"),
        "maxPersonality": get("injected_files"),
        "maxPersonalitySize": get("injected_file_content_bytes"),
        "maxServerGroups": get("server_groups"),
        "maxServerGroupMembers": get("server_group_members"),
        "maxTotalFloatingIps": get("floating_ips"),
        "maxSecurityGroups": get("security_groups"),
        "maxSecurityGroupRules": get("security_group_rules"),
        "totalInstancesUsed": instances, "totalCoresUsed": cores, "totalRAMUsed": ram,
        "totalServerGroupsUsed": 0, "totalFloatingIpsUsed": 0, "totalSecurityGroupsUsed": 0,
    }}})))
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct ServiceState {
    disabled: bool,
    #[serde(default)]
    disabled_reason: Option<String>,
}

/// The members and their service rows, with Nova's integer ids (the Raft node id).
async fn members(
    state: &AppState,
) -> ApiResult<Vec<(shoal_consensus::cluster::MemberStatus, ServiceState)>> {
    state.cluster.read_barrier().await.map_err(nova_err)?;
    let mut out = Vec::new();
    let mut status = state.cluster.cluster_status().await.members;
    status.sort_by_key(|m| m.id);
    for m in status {
        let svc = match state
            .cluster
            .get(T_COMPUTE_SERVICES, &m.name)
            .await
            .map_err(nova_err)?
        {
            Some(row) => serde_json::from_slice(&row.value).unwrap_or_default(),
            None => ServiceState::default(),
        };
        out.push((m, svc));
    }
    Ok(out)
}

fn host_ip(api: &str) -> String {
    api.rsplit_once(':')
        .map(|(h, _)| h.trim_matches(['[', ']']).to_owned())
        .unwrap_or_else(|| api.to_owned())
}

async fn list_hypervisors(State(state): State<AppState>, auth: Auth) -> ApiResult<Json<Value>> {
    auth.require_admin().map_err(ApiError::nova)?;
    let items: Vec<Value> = members(&state)
        .await?
        .into_iter()
        .map(|(m, svc)| {
            json!({
                "id": m.id, "hypervisor_hostname": m.name,
                "state": if m.healthy { "up" } else { "down" },
                "status": if svc.disabled { "disabled" } else { "enabled" },
            })
        })
        .collect();
    Ok(Json(json!({ "hypervisors": items })))
}

async fn list_hypervisors_detail(
    State(state): State<AppState>,
    auth: Auth,
) -> ApiResult<Json<Value>> {
    auth.require_admin().map_err(ApiError::nova)?;
    let members = members(&state).await?;
    // What each host registered in `hosts` (its libvirt driver and version); a member that
    // has not registered yet shows Nova's defaults.
    let hosts: HashMap<String, shoal_scheduler::Host> =
        shoal_compute::placement::list_hosts(&state.cluster)
            .await
            .map_err(|e| ApiError::internal_logged(&e).nova())?
            .into_iter()
            .map(|h| (h.name.clone(), h))
            .collect();
    let items: Vec<Value> = members
        .into_iter()
        .map(|(m, svc)| {
            let (hv_type, hv_version) = hosts
                .get(&m.name)
                .filter(|h| !h.hypervisor_type.is_empty())
                .map_or(("QEMU", 0), |h| {
                    (h.hypervisor_type.as_str(), h.hypervisor_version)
                });
            let mut v = json!({
                "id": m.id, "hypervisor_hostname": m.name, "hypervisor_type": hv_type,
                "hypervisor_version": hv_version, "host_ip": host_ip(&m.api),
                "state": if m.healthy { "up" } else { "down" },
                "status": if svc.disabled { "disabled" } else { "enabled" },
                "service": {"id": m.id, "host": m.name, "disabled_reason": svc.disabled_reason},
            });
            // Nova 2.1's resource view, from the host's registration and its claims.
            if let Some(h) = hosts.get(&m.name) {
                let disk_used_gb = h.disk_mb_used.div_ceil(1024);
                let extra = json!({
                    "vcpus": h.vcpus_total, "vcpus_used": h.vcpus_used,
                    "memory_mb": h.ram_mb_total, "memory_mb_used": h.ram_mb_used,
                    "free_ram_mb": h.ram_mb_total as i64 - h.ram_mb_used as i64,
                    "local_gb": h.disk_gb_total, "local_gb_used": disk_used_gb,
                    "free_disk_gb": h.disk_gb_total as i64 - disk_used_gb as i64,
                    "disk_available_least": h.disk_gb_total as i64 - disk_used_gb as i64,
                    "running_vms": h.instances.len(), "current_workload": 0,
                    "cpu_info": json!({"arch": h.architecture}).to_string(),
                });
                if let (Some(v), Some(extra)) = (v.as_object_mut(), extra.as_object()) {
                    v.extend(extra.clone());
                }
            }
            v
        })
        .collect();
    Ok(Json(json!({ "hypervisors": items })))
}

async fn list_services(
    State(state): State<AppState>,
    auth: Auth,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    auth.require_admin().map_err(ApiError::nova)?;
    let items: Vec<Value> = members(&state)
        .await?
        .into_iter()
        .filter(|(m, _)| q.get("host").is_none_or(|h| *h == m.name))
        .filter(|_| q.get("binary").is_none_or(|b| b == "nova-compute"))
        .map(|(m, svc)| {
            json!({
                "id": m.id, "binary": "nova-compute", "host": m.name, "zone": m.zone,
                "status": if svc.disabled { "disabled" } else { "enabled" },
                "state": if m.healthy { "up" } else { "down" },
                "updated_at": null, "disabled_reason": svc.disabled_reason,
            })
        })
        .collect();
    Ok(Json(json!({ "services": items })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceAction {
    host: String,
    binary: String,
    #[serde(default)]
    disabled_reason: Option<String>,
}

/// `PUT /os-services/{enable|disable|disable-log-reason}`, the 2.1 form.
async fn set_service(
    State(state): State<AppState>,
    auth: Auth,
    Path(action): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    auth.require_admin().map_err(ApiError::nova)?;
    let b: ServiceAction = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!("invalid input for the request body: {e}")).nova()
    })?;
    let disabled = match action.as_str() {
        "enable" => false,
        "disable" | "disable-log-reason" => true,
        other => {
            return Err(ApiError::not_found(format!(
                "unknown service action {other}; use enable, disable or disable-log-reason"
            ))
            .nova())
        }
    };
    if b.binary != "nova-compute" {
        return Err(
            ApiError::not_found(format!("no {} service on host {}", b.binary, b.host)).nova(),
        );
    }
    let known = members(&state).await?.iter().any(|(m, _)| m.name == b.host);
    if !known {
        return Err(
            ApiError::not_found(format!("compute host {} could not be found", b.host)).nova(),
        );
    }
    let svc = ServiceState {
        disabled,
        disabled_reason: if disabled {
            b.disabled_reason.clone()
        } else {
            None
        },
    };
    state
        .cluster
        .write(Txn::new().put(
            T_COMPUTE_SERVICES,
            &b.host,
            serde_json::to_vec(&svc).expect("service state serialises"),
        ))
        .await
        .map_err(nova_err)?;
    let mut service = json!({"host": b.host, "binary": b.binary,
        "status": if disabled { "disabled" } else { "enabled" }});
    if let Some(r) = svc.disabled_reason {
        service["disabled_reason"] = json!(r);
    }
    Ok(Json(json!({ "service": service })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_updates_are_checked() {
        let ok = parse_quota_update(&Bytes::from_static(
            br#"{"quota_set":{"cores":30,"instances":-1,"force":true}}"#,
        ))
        .unwrap();
        assert_eq!(ok.get("cores"), Some(&30));
        assert_eq!(ok.get("instances"), Some(&-1));
        assert!(!ok.contains_key("force"));
        let err =
            parse_quota_update(&Bytes::from_static(br#"{"quota_set":{"gpus":1}}"#)).unwrap_err();
        assert!(err.contains("gpus was unexpected"), "{err}");
        assert!(parse_quota_update(&Bytes::from_static(br#"{"quota_set":{"cores":-2}}"#)).is_err());
        assert!(parse_quota_update(&Bytes::from_static(br#"{"quota_set":{},"x":1}"#)).is_err());
    }

    #[test]
    fn host_ip_strips_the_port() {
        assert_eq!(host_ip("127.0.0.1:8774"), "127.0.0.1");
        assert_eq!(host_ip("[::1]:80"), "::1");
    }
}
