//! Compute v2.1 administration: quotas and limits, hypervisors, hosts and compute services,
//! the HTTP edge of `shoal_compute::quota` and `shoal_compute::service`.
//!
//! Every Shoal node is a hypervisor and runs the compute service, so the lists come from the
//! cluster's membership, handed to `Services` with each request. The handlers check roles,
//! translate the requests into service calls and render Nova's views (the hypervisor
//! capacity figures from `placement`'s `hosts` rows); the rows and their rules are the
//! compute service's.

use std::collections::{BTreeMap, HashMap};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, put};
use axum::{middleware, Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::api::body::parse;
use crate::api::error::{ApiError, ApiResult};
use crate::api::nova::flavors::nova_err;
use crate::api::nova::paging::Page;
use crate::api::nova::version::{
    microversion, Microversion, MIN, V2_11, V2_28, V2_33, V2_36, V2_39,
};
use crate::api::{AppState, Auth};
use shoal_compute::quota::Quotas;
use shoal_compute::service::{HostService, Services, BINARY};
use shoal_identity::has_role;

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
        .route(
            "/compute/v2.1/os-quota-class-sets/{class}",
            get(show_quota_class).put(update_quota_class),
        )
        .route("/compute/v2.1/limits", get(limits))
        .route("/compute/v2.1/os-hypervisors", get(list_hypervisors))
        .route(
            "/compute/v2.1/os-hypervisors/detail",
            get(list_hypervisors_detail),
        )
        .route(
            "/compute/v2.1/os-hypervisors/statistics",
            get(hypervisor_statistics),
        )
        .route("/compute/v2.1/os-hypervisors/{id}", get(show_hypervisor))
        .route(
            "/compute/v2.1/os-hypervisors/{id}/uptime",
            get(hypervisor_uptime),
        )
        .route(
            "/compute/v2.1/os-hypervisors/{pattern}/search",
            get(search_hypervisors),
        )
        .route(
            "/compute/v2.1/os-hypervisors/{pattern}/servers",
            get(hypervisor_servers),
        )
        .route("/compute/v2.1/os-hosts", get(list_hosts))
        .route(
            "/compute/v2.1/os-hosts/{host}",
            get(show_host).put(update_host),
        )
        .route(
            "/compute/v2.1/os-hosts/{host}/{action}",
            get(host_power_action),
        )
        .route("/compute/v2.1/os-services", get(list_services))
        .route("/compute/v2.1/os-services/{action}", put(set_service))
        .layer(middleware::from_fn(microversion))
}

fn quotas(state: &AppState) -> Quotas {
    Quotas::new(&state.state)
}

/// One quota of the project, `-1` meaning unlimited.
pub async fn quota(state: &AppState, project: &str, name: &str) -> ApiResult<i64> {
    Ok(quotas(state).limit(project, name).await?)
}

/// Checks a `{name: {quota: value, ...}}` update body.
fn parse_quota_update(body: &Bytes, name: &str) -> ApiResult<BTreeMap<String, i64>> {
    let body: Value = parse(body)?;
    shoal_compute::quota::parse_update(body, name).map_err(|m| {
        ApiError::bad_request(format!("invalid input for the request body: {m}")).nova()
    })
}

/// The quotas of the proxy APIs, which Nova's quota sets stop showing (and accepting) at 2.36.
const NETWORK_QUOTAS: [&str; 4] = [
    "fixed_ips",
    "floating_ips",
    "security_group_rules",
    "security_groups",
];

/// Whether quota `name` is part of a quota set at version `v`.
fn shown_quota(name: &str, v: Microversion) -> bool {
    v < V2_36 || !NETWORK_QUOTAS.contains(&name)
}

/// Whether the caller may read project `project`'s quotas: admins any, others their own.
fn can_read_quotas(auth: &Auth, project: &str) -> bool {
    has_role(&auth.0, "admin")
        || (has_role(&auth.0, "reader") && auth.0.project_id.as_deref() == Some(project))
}

/// A quota class as Nova 2.1 shows it: every quota but the server-group ones (shown from
/// 2.50), and the class name as `id`. Every class but `default` holds the defaults.
fn quota_class_json(class: &str, q: BTreeMap<String, i64>) -> Value {
    let mut body: serde_json::Map<String, Value> = q
        .into_iter()
        .filter(|(k, _)| !k.starts_with("server_group"))
        .map(|(k, v)| (k, json!(v)))
        .collect();
    body.insert("id".into(), json!(class));
    json!({ "quota_class_set": body })
}

async fn show_quota_class(
    State(state): State<AppState>,
    auth: Auth,
    Path(class): Path<String>,
) -> ApiResult<Json<Value>> {
    auth.require_admin().map_err(ApiError::nova)?;
    state.cluster.read_barrier().await.map_err(nova_err)?;
    Ok(Json(quota_class_json(
        &class,
        quotas(&state).class_defaults().await?,
    )))
}

/// `PUT /os-quota-class-sets/{class}`: only the `default` class has an effect (Nova ignores
/// the others too); its values become every project's defaults.
async fn update_quota_class(
    State(state): State<AppState>,
    auth: Auth,
    Path(class): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    auth.require_admin().map_err(ApiError::nova)?;
    let update = parse_quota_update(&body, "quota_class_set")?;
    shoal_state::validate::text("quota class", &class, 255, false)
        .map_err(|m| ApiError::bad_request(m).nova())?;
    if class == "default" {
        quotas(&state).update_defaults(&update).await?;
    }
    state.cluster.read_barrier().await.map_err(nova_err)?;
    let mut shown = quota_class_json(&class, quotas(&state).class_defaults().await?);
    // Nova's update answer carries no id.
    if let Some(set) = shown["quota_class_set"].as_object_mut() {
        set.remove("id");
    }
    Ok(Json(shown))
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
    let (instances, cores, ram) = crate::api::nova::servers::usage(state, project).await?;
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
    v: Microversion,
    Path(project): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    if !can_read_quotas(&auth, &project) {
        return Err(
            ApiError::forbidden("reading another project's quotas needs the admin role").nova(),
        );
    }
    known_project(&state, &project).await?;
    let mut q = quotas(&state).of(&project).await?;
    q.retain(|k, _| shown_quota(k, v));
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
    v: Microversion,
    Path(project): Path<String>,
) -> ApiResult<Json<Value>> {
    if !can_read_quotas(&auth, &project) {
        return Err(
            ApiError::forbidden("reading another project's quotas needs the admin role").nova(),
        );
    }
    known_project(&state, &project).await?;
    let mut q = quotas(&state).of(&project).await?;
    q.retain(|k, _| shown_quota(k, v));
    let mut body = detail(&state, &project, &q).await?;
    body.insert("id".into(), json!(project));
    Ok(Json(json!({ "quota_set": body })))
}

async fn default_quotas(
    State(state): State<AppState>,
    auth: Auth,
    v: Microversion,
    Path(project): Path<String>,
) -> ApiResult<Json<Value>> {
    auth.require("reader").map_err(ApiError::nova)?;
    state.cluster.read_barrier().await.map_err(nova_err)?;
    let mut body: serde_json::Map<String, Value> = quotas(&state)
        .class_defaults()
        .await?
        .into_iter()
        .filter(|(k, _)| shown_quota(k, v))
        .map(|(k, n)| (k, json!(n)))
        .collect();
    body.insert("id".into(), json!(project));
    Ok(Json(json!({ "quota_set": body })))
}

async fn update_quotas(
    State(state): State<AppState>,
    auth: Auth,
    v: Microversion,
    Path(project): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    auth.require_admin().map_err(ApiError::nova)?;
    let update = parse_quota_update(&body, "quota_set")?;
    if let Some(k) = update.keys().find(|k| !shown_quota(k, v)) {
        return Err(ApiError::bad_request(format!(
            "Invalid input for field/attribute quota_set. Additional properties are not allowed \
             ('{k}' was unexpected: network quotas are the Network API's from microversion 2.36)"
        ))
        .nova());
    }
    known_project(&state, &project).await?;
    // Merge into the stored overrides with a compare-and-set, so concurrent updates of
    // different quotas both take effect.
    quotas(&state).update_project(&project, &update).await?;
    let mut q = quotas(&state).of(&project).await?;
    q.retain(|k, _| shown_quota(k, v));
    Ok(Json(json!({ "quota_set": q })))
}

async fn revert_quotas(
    State(state): State<AppState>,
    auth: Auth,
    Path(project): Path<String>,
) -> ApiResult<StatusCode> {
    auth.require_admin().map_err(ApiError::nova)?;
    known_project(&state, &project).await?;
    quotas(&state).revert_project(&project).await?;
    Ok(StatusCode::ACCEPTED)
}

/// `GET /limits`: the project's quotas and usage. From 2.36 the network limits (floating IPs,
/// security groups and their rules) are gone, from 2.39 `maxImageMeta`, as in Nova.
async fn limits(
    State(state): State<AppState>,
    auth: Auth,
    v: Microversion,
) -> ApiResult<Json<Value>> {
    let project = auth
        .0
        .project_id
        .clone()
        .ok_or_else(|| ApiError::forbidden("limits need a project-scoped token").nova())?;
    let q = quotas(&state).of(&project).await?;
    let get = |k: &str| q.get(k).copied().unwrap_or(0);
    let (instances, cores, ram) = crate::api::nova::servers::usage(&state, &project).await?;
    let mut absolute = json!({
        "maxTotalInstances": get("instances"), "maxTotalCores": get("cores"),
        "maxTotalRAMSize": get("ram"), "maxTotalKeypairs": get("key_pairs"),
        "maxServerMeta": get("metadata_items"),
        "maxPersonality": get("injected_files"),
        "maxPersonalitySize": get("injected_file_content_bytes"),
        "maxServerGroups": get("server_groups"),
        "maxServerGroupMembers": get("server_group_members"),
        "totalInstancesUsed": instances, "totalCoresUsed": cores, "totalRAMUsed": ram,
        "totalServerGroupsUsed": 0,
    });
    if v < V2_36 {
        absolute["maxTotalFloatingIps"] = json!(get("floating_ips"));
        absolute["maxSecurityGroups"] = json!(get("security_groups"));
        absolute["maxSecurityGroupRules"] = json!(get("security_group_rules"));
        absolute["totalFloatingIpsUsed"] = json!(0);
        absolute["totalSecurityGroupsUsed"] = json!(0);
    }
    if v < V2_39 {
        absolute["maxImageMeta"] = json!(get("metadata_items"));
    }
    Ok(Json(json!({"limits": {"rate": [], "absolute": absolute}})))
}

fn state_word(healthy: bool) -> &'static str {
    if healthy {
        "up"
    } else {
        "down"
    }
}

/// The compute services of the cluster's members as this node sees them now.
async fn services(state: &AppState) -> Services {
    Services::new(&state.state, state.cluster.cluster_status().await.members)
}

fn host_ip(api: &str) -> String {
    api.rsplit_once(':')
        .map(|(h, _)| h.trim_matches(['[', ']']).to_owned())
        .unwrap_or_else(|| api.to_owned())
}

/// Nova 2.1's short hypervisor view.
fn hypervisor_json(h: &HostService) -> Value {
    json!({
        "id": h.member.id, "hypervisor_hostname": h.member.name,
        "state": state_word(h.service.is_up(h.member.healthy)),
        "status": h.service.status(),
    })
}

/// The hypervisors a list shows: all of them below 2.33; from 2.33 the page `limit` and
/// `marker` (a hypervisor id) name, with `hypervisors_links` when it is full.
async fn hypervisor_page(
    state: &AppState,
    v: Microversion,
    q: &HashMap<String, String>,
) -> ApiResult<(Vec<HostService>, Option<Page>)> {
    let members = services(state).await.list().await?;
    if v < V2_33 {
        return Ok((members, None));
    }
    let page = Page::from_query(q)?;
    let members = page
        .apply(members, |h| h.member.id.to_string())
        .ok_or_else(|| {
            let marker = page.marker.as_deref().unwrap_or_default();
            ApiError::bad_request(format!("marker [{marker}] not found")).nova()
        })?;
    Ok((members, Some(page)))
}

fn hypervisor_list_body(
    state: &AppState,
    q: &HashMap<String, String>,
    collection: &str,
    members: &[HostService],
    page: Option<Page>,
    items: Vec<Value>,
) -> Value {
    let mut body = json!({ "hypervisors": items });
    let links = page.and_then(|p| {
        let last = members.last().map(|h| h.member.id.to_string());
        p.links(&state.base_url, collection, q, members.len(), last)
    });
    if let Some(links) = links {
        body["hypervisors_links"] = links;
    }
    body
}

async fn list_hypervisors(
    State(state): State<AppState>,
    auth: Auth,
    v: Microversion,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    auth.require_admin().map_err(ApiError::nova)?;
    let (members, page) = hypervisor_page(&state, v, &q).await?;
    let items: Vec<Value> = members.iter().map(hypervisor_json).collect();
    Ok(Json(hypervisor_list_body(
        &state,
        &q,
        "os-hypervisors",
        &members,
        page,
        items,
    )))
}

/// What each host registered in `hosts` (its libvirt driver, version and capacity), by name.
async fn host_rows(state: &AppState) -> ApiResult<HashMap<String, shoal_scheduler::Host>> {
    let mut hosts = shoal_compute::placement::list_hosts(&state.cluster)
        .await
        .map_err(|e| ApiError::internal_logged(&e).nova())?;
    shoal_compute::placement::fill_instances(&state.cluster, &mut hosts)
        .await
        .map_err(|e| ApiError::internal_logged(&e).nova())?;
    Ok(hosts.into_iter().map(|h| (h.name.clone(), h)).collect())
}

/// Nova's detailed hypervisor view of a member; a member that has not registered in `hosts`
/// yet shows Nova's defaults and zero capacity. `cpu_info` is a JSON string below 2.28 and
/// the object it encodes from 2.28 on.
fn hypervisor_detail(
    hs: &HostService,
    host: Option<&shoal_scheduler::Host>,
    v: Microversion,
) -> Value {
    let (m, svc) = (&hs.member, &hs.service);
    let (hv_type, hv_version) = host
        .filter(|h| !h.hypervisor_type.is_empty())
        .map_or(("QEMU", 0), |h| {
            (h.hypervisor_type.as_str(), h.hypervisor_version)
        });
    let (vcpus, vcpus_used, ram, ram_used, disk_gb, disk_used_gb, vms, arch) =
        host.map_or((0, 0, 0, 0, 0, 0, 0, ""), |h| {
            (
                h.vcpus_total,
                h.vcpus_used,
                h.ram_mb_total,
                // Nova counts the host's reserved RAM and disk as used.
                h.ram_mb_used + h.ram_mb_reserved,
                h.disk_gb_total,
                (h.disk_mb_used + h.disk_mb_reserved).div_ceil(1024),
                h.instances.len(),
                h.architecture.as_str(),
            )
        });
    let cpu_info = json!({ "arch": arch });
    json!({
        "id": m.id, "hypervisor_hostname": m.name, "hypervisor_type": hv_type,
        "hypervisor_version": hv_version, "host_ip": host_ip(&m.api),
        "state": state_word(svc.is_up(m.healthy)),
        "status": svc.status(),
        "service": {"id": m.id, "host": m.name, "disabled_reason": svc.disabled_reason},
        "vcpus": vcpus, "vcpus_used": vcpus_used,
        "memory_mb": ram, "memory_mb_used": ram_used,
        "free_ram_mb": ram as i64 - ram_used as i64,
        "local_gb": disk_gb, "local_gb_used": disk_used_gb,
        "free_disk_gb": disk_gb as i64 - disk_used_gb as i64,
        "disk_available_least": disk_gb as i64 - disk_used_gb as i64,
        "running_vms": vms, "current_workload": 0,
        "cpu_info": if v >= V2_28 { cpu_info } else { json!(cpu_info.to_string()) },
    })
}

async fn list_hypervisors_detail(
    State(state): State<AppState>,
    auth: Auth,
    v: Microversion,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    auth.require_admin().map_err(ApiError::nova)?;
    let (members, page) = hypervisor_page(&state, v, &q).await?;
    let hosts = host_rows(&state).await?;
    let items: Vec<Value> = members
        .iter()
        .map(|h| hypervisor_detail(h, hosts.get(&h.member.name), v))
        .collect();
    Ok(Json(hypervisor_list_body(
        &state,
        &q,
        "os-hypervisors/detail",
        &members,
        page,
        items,
    )))
}

async fn show_hypervisor(
    State(state): State<AppState>,
    auth: Auth,
    v: Microversion,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    auth.require_admin().map_err(ApiError::nova)?;
    let h = services(&state).await.hypervisor(&id).await?;
    let hosts = host_rows(&state).await?;
    Ok(Json(
        json!({ "hypervisor": hypervisor_detail(&h, hosts.get(&h.member.name), v) }),
    ))
}

/// `GET /os-hypervisors/{id}/uptime`: the host's `uptime(1)` line, as Nova's libvirt driver
/// answers it. Another member is asked over the members' data transport; a member that does
/// not answer gets Nova's answer for a compute service that is down (400 "Compute service of
/// <host> is unavailable at this time.").
async fn hypervisor_uptime(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    auth.require_admin().map_err(ApiError::nova)?;
    let h = services(&state).await.hypervisor(&id).await?;
    let host = h.member.name.clone();
    let uptime = if host == state.cluster.cluster_status().await.node {
        tokio::task::spawn_blocking(shoal_images::peer::uptime_line)
            .await
            .map_err(|e| ApiError::internal_logged(&e).nova())?
            .map_err(|e| ApiError::internal_logged(&e).nova())?
    } else {
        shoal_images::peer::uptime(&state.cluster, &host)
            .await
            .map_err(|e| {
                tracing::info!(%host, error = %e, "no uptime from the host");
                ApiError::bad_request(format!(
                    "Compute service of {host} is unavailable at this time."
                ))
                .nova()
            })?
    };
    let mut v = hypervisor_json(&h);
    v["uptime"] = json!(uptime);
    Ok(Json(json!({ "hypervisor": v })))
}

async fn hypervisor_statistics(
    State(state): State<AppState>,
    auth: Auth,
) -> ApiResult<Json<Value>> {
    auth.require_admin().map_err(ApiError::nova)?;
    let members = services(&state).await.list().await?;
    let hosts = host_rows(&state).await?;
    let keys = [
        "vcpus",
        "vcpus_used",
        "memory_mb",
        "memory_mb_used",
        "free_ram_mb",
        "local_gb",
        "local_gb_used",
        "free_disk_gb",
        "disk_available_least",
        "current_workload",
        "running_vms",
    ];
    let mut sums: BTreeMap<&str, i64> = keys.iter().map(|k| (*k, 0)).collect();
    for h in &members {
        let d = hypervisor_detail(h, hosts.get(&h.member.name), MIN);
        for k in keys {
            *sums.get_mut(k).expect("every key is summed") += d[k].as_i64().unwrap_or(0);
        }
    }
    let mut body = json!(sums);
    body["count"] = json!(members.len());
    Ok(Json(json!({ "hypervisor_statistics": body })))
}

/// `GET /os-hypervisors/{pattern}/search` and `/{pattern}/servers`: hypervisors whose name
/// contains `pattern`, with their servers for the latter.
async fn hypervisors_matching(
    state: &AppState,
    auth: &Auth,
    pattern: &str,
    with_servers: bool,
) -> ApiResult<Json<Value>> {
    auth.require_admin().map_err(ApiError::nova)?;
    let hosts = host_rows(state).await?;
    let items: Vec<Value> = services(state)
        .await
        .matching(pattern)
        .await?
        .iter()
        .map(|h| {
            let mut v = hypervisor_json(h);
            if with_servers {
                let servers: Vec<Value> = hosts
                    .get(&h.member.name)
                    .map(|h| h.instances.as_slice())
                    .unwrap_or_default()
                    .iter()
                    .map(|id| json!({"uuid": id, "name": format!("instance-{id}")}))
                    .collect();
                if !servers.is_empty() {
                    v["servers"] = json!(servers);
                }
            }
            v
        })
        .collect();
    Ok(Json(json!({ "hypervisors": items })))
}

async fn search_hypervisors(
    State(state): State<AppState>,
    auth: Auth,
    Path(pattern): Path<String>,
) -> ApiResult<Json<Value>> {
    hypervisors_matching(&state, &auth, &pattern, false).await
}

async fn hypervisor_servers(
    State(state): State<AppState>,
    auth: Auth,
    Path(pattern): Path<String>,
) -> ApiResult<Json<Value>> {
    hypervisors_matching(&state, &auth, &pattern, true).await
}

/// `GET /os-hosts[?zone=]` (Nova serves it up to 2.42): every member as a compute host.
async fn list_hosts(
    State(state): State<AppState>,
    auth: Auth,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    auth.require_admin().map_err(ApiError::nova)?;
    let items: Vec<Value> = services(&state)
        .await
        .list()
        .await?
        .into_iter()
        // An empty zone filters nothing, as in Nova.
        .filter(|h| {
            q.get("zone")
                .is_none_or(|z| z.is_empty() || *z == h.member.zone)
        })
        .map(|h| json!({"host_name": h.member.name, "service": "compute", "zone": h.member.zone}))
        .collect();
    Ok(Json(json!({ "hosts": items })))
}

/// `GET /os-hosts/{host}`: the host's capacity `(total)` and what its servers claim
/// (`(used_now)`, `(used_max)`), from its `hosts` row.
async fn show_host(
    State(state): State<AppState>,
    auth: Auth,
    Path(host): Path<String>,
) -> ApiResult<Json<Value>> {
    auth.require_admin().map_err(ApiError::nova)?;
    let m = services(&state).await.host(&host).await?.member;
    let hosts = host_rows(&state).await?;
    let h = hosts.get(&m.name);
    let row = |project: &str, cpu: u64, ram: u64, disk_gb: u64| {
        json!({"resource": {"host": m.name, "project": project, "cpu": cpu,
            "memory_mb": ram, "disk_gb": disk_gb}})
    };
    let (cpu, ram, disk) = h.map_or((0, 0, 0), |h| {
        (u64::from(h.vcpus_total), h.ram_mb_total, h.disk_gb_total)
    });
    let (cpu_used, ram_used, disk_used) = h.map_or((0, 0, 0), |h| {
        (
            u64::from(h.vcpus_used),
            h.ram_mb_used + h.ram_mb_reserved,
            (h.disk_mb_used + h.disk_mb_reserved).div_ceil(1024),
        )
    });
    Ok(Json(json!({ "host": [
        row("(total)", cpu, ram, disk),
        row("(used_now)", cpu_used, ram_used, disk_used),
        row("(used_max)", cpu_used, ram_used, disk_used),
    ]})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HostUpdate {
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    maintenance_mode: Option<String>,
}

/// `PUT /os-hosts/{host}`: `status` enables or disables the host's compute service.
async fn update_host(
    State(state): State<AppState>,
    auth: Auth,
    Path(host): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    auth.require_admin().map_err(ApiError::nova)?;
    let b: HostUpdate = crate::api::body::parse(&body)?;
    let svc = services(&state)
        .await
        .set_host(&host, b.status.as_deref(), b.maintenance_mode.as_deref())
        .await?;
    Ok(Json(json!({ "host": host, "status": svc.status() })))
}

/// `GET /os-hosts/{host}/{reboot|shutdown|startup}`: refused, Shoal does not power hosts.
async fn host_power_action(
    State(state): State<AppState>,
    auth: Auth,
    Path((host, action)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    auth.require_admin().map_err(ApiError::nova)?;
    Err(services(&state).await.power(&host, &action).await.into())
}

async fn list_services(
    State(state): State<AppState>,
    auth: Auth,
    v: Microversion,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    auth.require_admin().map_err(ApiError::nova)?;
    let items: Vec<Value> = services(&state)
        .await
        .list()
        .await?
        .into_iter()
        .filter(|h| q.get("host").is_none_or(|n| *n == h.member.name))
        .filter(|_| q.get("binary").is_none_or(|b| b == BINARY))
        .map(
            |HostService {
                 member: m,
                 service: svc,
             }| {
                let mut out = json!({
                    "id": m.id, "binary": BINARY, "host": m.name, "zone": m.zone,
                    "status": svc.status(),
                    "state": state_word(svc.is_up(m.healthy)),
                    "updated_at": null, "disabled_reason": svc.disabled_reason,
                });
                if v >= V2_11 {
                    out["forced_down"] = json!(svc.forced_down);
                }
                out
            },
        )
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ForceDown {
    host: String,
    binary: String,
    forced_down: bool,
}

/// `PUT /os-services/{enable|disable|disable-log-reason}`, the 2.1 form, and from microversion
/// 2.11 `force-down` (below it Nova knows no such action: 404).
async fn set_service(
    State(state): State<AppState>,
    auth: Auth,
    v: Microversion,
    Path(action): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    auth.require_admin().map_err(ApiError::nova)?;
    if action == "force-down" && v >= V2_11 {
        let b: ForceDown = crate::api::body::parse(&body)?;
        let svc = services(&state)
            .await
            .force_down(&b.host, &b.binary, b.forced_down)
            .await?;
        return Ok(Json(json!({ "service": {
            "host": b.host, "binary": b.binary, "forced_down": svc.forced_down,
        }})));
    }
    let b: ServiceAction = crate::api::body::parse(&body)?;
    let svc = services(&state)
        .await
        .set_service(&action, &b.host, &b.binary, b.disabled_reason)
        .await?;
    let mut service = json!({"host": b.host, "binary": b.binary, "status": svc.status()});
    if let Some(r) = svc.disabled_reason {
        service["disabled_reason"] = json!(r);
    }
    Ok(Json(json!({ "service": service })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ip_strips_the_port() {
        assert_eq!(host_ip("127.0.0.1:8774"), "127.0.0.1");
        assert_eq!(host_ip("[::1]:80"), "::1");
    }
}
