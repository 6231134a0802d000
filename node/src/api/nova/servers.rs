//! `/compute/v2.1/servers`: Nova's servers API over the compute service.
//!
//! A create is Nova's flow without a broker: the quota is checked and the server rows are
//! written (BUILD, `scheduling`) under the project's quota guard, then this node schedules
//! over its replica and commits the claims together with the rows (`spawning`, host set), and
//! answers 202. The compute agent of the chosen host sees the rows on its watch and builds the
//! servers. When no host fits, the rows go to ERROR with Nova's NoValidHost fault; nothing is
//! left in BUILD. Actions set a `task_state` on the row, which the host's agent carries out.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{middleware, Json, Router};
use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Value};
use shoal_compute::placement::{self, PlaceError};
use shoal_compute::server::{
    power, Action, Backup, FlavorSnapshot, ImageSnapshot, ServerRecord, TaskState, VmState,
};
use shoal_scheduler::{GroupPolicy, Request, ScheduleError, SchedulerHints, ServerGroup};
use shoal_state::time::now_rfc3339;
use shoal_state::{retry, tables, Expect, Table, Txn, Versioned, DEFAULT_ATTEMPTS};

use crate::api::body::parse;
use crate::api::error::{ApiError, ApiResult};
use crate::api::nova::flavors::nova_err;
use crate::api::nova::version::{
    microversion, unexpected, Microversion, V2_16, V2_17, V2_19, V2_26, V2_3, V2_32, V2_36, V2_42,
    V2_5, V2_9,
};
use crate::api::{AppState, Auth, RequestId};
use shoal_compute::flavor::Flavor;

/// Decoded `user_data` may be at most this long (Nova's limit).
const MAX_USER_DATA: usize = 65_535;
/// Servers one request may create.
const MAX_COUNT: u32 = 100;
/// Rounds of (re-read the group, place) before a create reports contention.
const CREATE_ATTEMPTS: u32 = 30;
/// Rounds of (re-read the quota guard, count, write) before a create reports contention.
const QUOTA_ATTEMPTS: u32 = 60;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/compute/v2.1/servers", get(list).post(create))
        .route("/compute/v2.1/servers/detail", get(list_detail))
        .route(
            "/compute/v2.1/servers/{id}",
            get(show).put(update).delete(delete),
        )
        .route("/compute/v2.1/servers/{id}/action", post(action))
        .layer(middleware::from_fn(microversion))
}

pub(super) fn servers(state: &AppState) -> Table<ServerRecord> {
    state.state.table(tables::SERVERS)
}

pub(super) fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::bad_request(msg).nova()
}

fn not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("Instance {id} could not be found.")).nova()
}

pub(super) fn locked(id: &str) -> ApiError {
    ApiError::conflict(format!("Instance {id} is locked")).nova()
}

pub(super) fn need(auth: &Auth, role: &str) -> ApiResult<()> {
    auth.require(role).map_err(ApiError::nova)
}

fn project_of(auth: &Auth) -> ApiResult<String> {
    auth.0
        .project_id
        .clone()
        .ok_or_else(|| ApiError::forbidden("servers need a project-scoped token").nova())
}

pub(super) fn is_admin(auth: &Auth) -> bool {
    auth.require_admin().is_ok()
}

// ---------------------------------------------------------------------------------------------
// create

#[derive(Deserialize)]
struct CreateBody {
    server: CreateServer,
    #[serde(default, rename = "os:scheduler_hints")]
    hints: Option<HintsBody>,
    #[serde(default, rename = "OS-SCH-HNT:scheduler_hints")]
    hints_old: Option<HintsBody>,
}

#[derive(Deserialize)]
struct CreateServer {
    name: String,
    #[serde(rename = "flavorRef")]
    flavor_ref: String,
    #[serde(default, rename = "imageRef")]
    image_ref: Option<String>,
    #[serde(default)]
    networks: Option<Value>,
    #[serde(default)]
    key_name: Option<String>,
    #[serde(default)]
    user_data: Option<String>,
    #[serde(default)]
    metadata: Option<BTreeMap<String, String>>,
    #[serde(default)]
    security_groups: Option<Vec<NameRef>>,
    #[serde(default)]
    availability_zone: Option<String>,
    #[serde(default)]
    min_count: Option<Value>,
    #[serde(default)]
    max_count: Option<Value>,
    #[serde(default, rename = "adminPass")]
    admin_pass: Option<String>,
    #[serde(default)]
    config_drive: Option<Value>,
    #[serde(default, rename = "OS-DCF:diskConfig")]
    _disk_config: Option<String>,
    #[serde(default)]
    block_device_mapping_v2: Option<Value>,
    #[serde(default, rename = "return_reservation_id")]
    return_reservation_id: Option<Value>,
    #[serde(default, rename = "accessIPv4")]
    access_ipv4: Option<String>,
    #[serde(default, rename = "accessIPv6")]
    access_ipv6: Option<String>,
    /// From microversion 2.19.
    #[serde(default)]
    description: Option<Value>,
}

/// A `description` as Nova's schema takes it (microversion 2.19): `null` or a string of at most
/// 255 characters without control characters. `None` when the body has none, `Some(None)`
/// when it clears it.
fn description_arg(given: Option<&Value>, v: Microversion) -> ApiResult<Option<Option<String>>> {
    let Some(given) = given else {
        return Ok(None);
    };
    if v < V2_19 {
        return Err(unexpected("description", V2_19));
    }
    match given {
        Value::Null => Ok(Some(None)),
        Value::String(d) if d.chars().count() <= 255 && !d.chars().any(char::is_control) => {
            Ok(Some(Some(d.clone())))
        }
        Value::String(_) => Err(bad(
            "Invalid input for field/attribute description. Value must be at most 255 \
             printable characters",
        )),
        _ => Err(bad(
            "Invalid input for field/attribute description. It must be a string or null",
        )),
    }
}

/// `accessIPv4`/`accessIPv6`: empty, or an address of that family.
fn access_ip(v: Option<&str>, v6: bool) -> ApiResult<Option<String>> {
    let Some(text) = v else { return Ok(None) };
    // Stored in the canonical form, as Nova's IP address fields keep them.
    let canonical = if text.is_empty() {
        Some(String::new())
    } else if v6 {
        text.parse::<std::net::Ipv6Addr>()
            .ok()
            .map(|a| a.to_string())
    } else {
        text.parse::<std::net::Ipv4Addr>()
            .ok()
            .map(|a| a.to_string())
    };
    let Some(canonical) = canonical else {
        let field = if v6 { "accessIPv6" } else { "accessIPv4" };
        let shown: String = text
            .chars()
            .take(64)
            .flat_map(char::escape_default)
            .collect();
        return Err(bad(format!(
            "Invalid input for field/attribute {field}. Value: {shown}. '{shown}' is not a '{}'",
            if v6 { "ipv6" } else { "ipv4" }
        )));
    };
    Ok(Some(canonical))
}

#[derive(Deserialize)]
struct NameRef {
    name: String,
}

#[derive(Deserialize, Default)]
struct HintsBody {
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    query: Option<Value>,
    #[serde(default)]
    same_host: Option<Value>,
    #[serde(default)]
    different_host: Option<Value>,
}

/// A count field: Nova takes an integer or a string of one.
fn count(v: &Option<Value>, field: &str) -> ApiResult<Option<u32>> {
    let n = match v {
        None => return Ok(None),
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(s)) => s.trim().parse::<u64>().ok(),
        _ => None,
    };
    match n {
        Some(n) if (1..=u64::from(MAX_COUNT)).contains(&n) => Ok(Some(n as u32)),
        _ => Err(bad(format!(
            "Invalid input for field/attribute {field}. Value must be an integer from 1 to {MAX_COUNT}"
        ))),
    }
}

fn ids_of(v: &Option<Value>, field: &str) -> ApiResult<Vec<String>> {
    match v {
        None => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| bad(format!("{field} must be a server id or a list of them")))
            })
            .collect(),
        _ => Err(bad(format!(
            "{field} must be a server id or a list of them"
        ))),
    }
}

/// A `same_host`/`different_host` hint: ids checked as Nova's schema checks them (uuids),
/// kept in the canonical hyphenated lower-case form the rows are keyed by.
fn server_ids(v: &Option<Value>, field: &str) -> ApiResult<Vec<String>> {
    ids_of(v, field)?
        .into_iter()
        .map(|id| match uuid::Uuid::parse_str(&id) {
            Ok(u) => Ok(u.hyphenated().to_string()),
            Err(_) => {
                let shown: String = id.chars().take(64).flat_map(char::escape_default).collect();
                Err(bad(format!(
                    "Invalid input for field/attribute {field}. Value: {shown}. '{shown}' is not a 'uuid'"
                )))
            }
        })
        .collect()
}

/// The server group row as placement needs it; the Compute API's server groups own the rest.
#[derive(Debug, Clone, serde::Serialize, Deserialize)]
pub struct GroupRow {
    pub id: String,
    pub name: String,
    pub policy: String,
    pub project_id: String,
    pub user_id: String,
    #[serde(default)]
    pub members: Vec<String>,
    #[serde(flatten)]
    pub rest: BTreeMap<String, Value>,
}

async fn create(
    State(state): State<AppState>,
    auth: Auth,
    rid: RequestId,
    v: Microversion,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<Value>)> {
    need(&auth, "member")?;
    let project = project_of(&auth)?;
    let body: CreateBody = parse(&body)?;
    let s = body.server;
    let hints = body.hints.or(body.hints_old).unwrap_or_default();

    let tagged = device_tags(&s, v)?;
    let name = s.name.trim().to_owned();
    if name.is_empty() || s.name.chars().count() > 255 {
        return Err(bad(
            "Invalid input for field/attribute name. Value must be 1 to 255 characters",
        ));
    }
    // Below 2.19 Nova sets the description to the name; from 2.19 it is what the body says.
    let description = if v >= V2_19 {
        description_arg(s.description.as_ref(), v)?.flatten()
    } else {
        description_arg(s.description.as_ref(), v)?;
        Some(name.clone())
    };
    let access_ipv4 = access_ip(s.access_ipv4.as_deref(), false)?.unwrap_or_default();
    let access_ipv6 = access_ip(s.access_ipv6.as_deref(), true)?.unwrap_or_default();
    let return_reservation_id = match &s.return_reservation_id {
        None | Some(Value::Null) => false,
        Some(v) => shoal_compute::flavor::boolean("return_reservation_id", v).map_err(bad)?,
    };
    // The client sends the image as a local block device too; only volumes are refused.
    let mut bdm_image = None;
    if let Some(Value::Array(bdms)) = &s.block_device_mapping_v2 {
        for b in bdms {
            let field = |k: &str| b.get(k).and_then(Value::as_str).unwrap_or("");
            match (field("source_type"), field("destination_type")) {
                ("image", "local" | "") => bdm_image = Some(field("uuid").to_owned()),
                ("blank", "local") => {}
                _ => {
                    return Err(bad(
                        "Booting from volume is not supported: Shoal has no volume service yet",
                    ))
                }
            }
        }
    } else if s.block_device_mapping_v2.is_some() {
        return Err(bad("block_device_mapping_v2 must be a list"));
    }
    let config_drive = match &s.config_drive {
        None | Some(Value::Null) => false,
        Some(v) => shoal_compute::flavor::boolean("config_drive", v).map_err(|_| {
            bad(format!(
                "Invalid input for field/attribute config_drive. Value: {v}. It is not a boolean"
            ))
        })?,
    };
    let min = count(&s.min_count, "min_count")?.unwrap_or(1);
    let max = count(&s.max_count, "max_count")?.unwrap_or(min);
    if max < min {
        return Err(bad("min_count must be <= max_count"));
    }
    if let Some(ud) = &s.user_data {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(ud.as_bytes())
            .map_err(|_| bad("User data needs to be valid base 64."))?;
        if decoded.len() > MAX_USER_DATA {
            return Err(bad(format!(
                "user_data is {} bytes decoded; at most {MAX_USER_DATA} are allowed",
                decoded.len()
            )));
        }
    }
    let metadata = s.metadata.clone().unwrap_or_default();
    super::server_meta::check_items(&metadata)?;
    // The project's quotas, read once for the whole create, after the read barrier every
    // read below relies on (flavor, image, security groups): one barrier per create.
    let quotas = shoal_compute::quota::Quotas::new(&state.state)
        .of(&project)
        .await?;
    let quota = |name: &str| quotas.get(name).copied().unwrap_or(-1);
    let meta_quota = quota("metadata_items");
    if meta_quota >= 0 && metadata.len() as i64 > meta_quota {
        return Err(ApiError::forbidden(format!(
            "Quota exceeded for metadata_items: at most {meta_quota} metadata items"
        ))
        .nova());
    }
    let nics = requested_nics(&state, &auth, &s.networks, max).await?;
    if let Some(p) = &s.admin_pass {
        if p.len() > 255 {
            return Err(bad("adminPass is too long"));
        }
    }

    // The flavor and image as this project may see them (after the quota read's barrier).
    let flavor: Flavor = match shoal_compute::flavor::Flavors::new(&state.state)
        .visible_local(&s.flavor_ref, is_admin(&auth), auth.0.project_id.as_deref())
        .await
    {
        Ok(f) => f,
        Err(shoal_compute::error::ComputeError::NotFound(_)) => {
            return Err(bad(format!("Flavor {} could not be found.", s.flavor_ref)))
        }
        Err(e) => return Err(e.into()),
    };
    let image_id = s
        .image_ref
        .clone()
        .filter(|i| !i.is_empty())
        .or(bdm_image.filter(|i| !i.is_empty()))
        .ok_or_else(|| bad("imageRef is required: Shoal boots servers from images"))?;
    let flavor_snapshot = FlavorSnapshot {
        id: flavor.id.clone(),
        name: flavor.name.clone(),
        vcpus: flavor.vcpus,
        ram_mb: flavor.ram,
        disk_gb: flavor.disk,
        ephemeral_gb: flavor.ephemeral,
        swap_mb: flavor.swap,
        extra_specs: flavor.extra_specs.clone(),
    };
    let image = snapshot_image(&state, &auth, &image_id, &flavor_snapshot).await?;

    let (key_name, key_data) = match &s.key_name {
        None => (None, None),
        Some(k) => {
            let data = crate::api::nova::keypairs::public_key(&state, &auth.0.user_id, k)
                .await?
                .ok_or_else(|| bad(format!("Invalid key_name provided.: {k}")))?;
            (Some(k.clone()), Some(data))
        }
    };
    let requested: Vec<String> = match &s.security_groups {
        Some(g) if !g.is_empty() => g.iter().map(|n| n.name.clone()).collect(),
        _ => vec!["default".to_owned()],
    };
    let mut groups = Vec::with_capacity(requested.len());
    if requested == ["default"] {
        // The project's own `default` group (no other group may take that name), without
        // listing every group the caller sees.
        let id = state
            .network
            .ensure_default_group(&project)
            .await
            .map_err(nova_err_net)?;
        groups.push((id, "default".to_owned()));
    } else {
        let visible = visible_groups(&state, &auth).await?;
        for name in &requested {
            let g = find_group(&visible, &auth, name)?;
            if !groups.iter().any(|(id, _): &(String, String)| *id == g.0) {
                groups.push(g);
            }
        }
    }
    let security_groups: Vec<String> = groups.iter().map(|(_, n)| n.clone()).collect();
    let group_ids: Vec<String> = groups.into_iter().map(|(id, _)| id).collect();

    // Availability zone: `zone`, or `zone:host` (admins).
    let zone = s.availability_zone.clone().filter(|z| !z.is_empty());
    if let Some(z) = &zone {
        if z.contains(':') && !is_admin(&auth) {
            return Err(ApiError::forbidden(
                "Policy doesn't allow os_compute_api:servers:create:forced_host to be performed.",
            )
            .nova());
        }
    }

    // Hints.
    let query = match &hints.query {
        None => None,
        Some(Value::String(q)) => Some(q.clone()),
        Some(v) => Some(v.to_string()),
    };
    // Nova's SameHostFilter/DifferentHostFilter hints: a server id or a list of them, each a
    // uuid (Nova's schema); an id of no placed server matches no host.
    let same_host = server_ids(&hints.same_host, "same_host")?;
    let different_host = server_ids(&hints.different_host, "different_host")?;
    let group_id = hints.group.clone();
    if let Some(g) = &group_id {
        load_group(&state, g, &project).await?;
    }

    let now = now_rfc3339();
    let reservation_id = format!("r-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let n = max;
    let records: Vec<ServerRecord> = (0..n)
        .map(|i| ServerRecord {
            id: uuid::Uuid::new_v4().to_string(),
            name: if n > 1 {
                format!("{name}-{}", i + 1)
            } else {
                name.clone()
            },
            project_id: project.clone(),
            user_id: auth.0.user_id.clone(),
            flavor: flavor_snapshot.clone(),
            image: image.clone(),
            key_name: key_name.clone(),
            key_data: key_data.clone(),
            user_data: s.user_data.clone(),
            metadata: metadata.clone(),
            security_groups: security_groups.clone(),
            ports: Vec::new(),
            availability_zone: zone
                .as_deref()
                .map(|z| z.split(':').next().unwrap_or(z).to_owned())
                .filter(|z| !z.is_empty())
                .unwrap_or_else(|| "nova".to_owned()),
            host: None,
            vm_state: VmState::Building,
            task_state: Some(TaskState::Scheduling),
            power_state: power::NOSTATE,
            fault: None,
            launch_index: i,
            reservation_id: reservation_id.clone(),
            instance_name: None,
            created: now.clone(),
            updated: now.clone(),
            launched_at: None,
            access_ipv4: access_ipv4.clone(),
            access_ipv6: access_ipv6.clone(),
            locked: false,
            description: description.clone(),
            crash_dump: None,
            config_drive,
            actions: Vec::new(),
            snapshot_image: None,
            shelved: None,
            backup: None,
            rescue: None,
            migration: None,
            past_migrations: Vec::new(),
            tags: Default::default(),
        })
        .collect();

    // 0. The ports, one per requested NIC of each server, bound to the server by device_id.
    let mut records = records;
    for r in &mut records {
        r.record_action("create", &rid.0, &auth.0.user_id, &now);
    }
    let zone_owner = format!("compute:{}", records[0].availability_zone);
    if let Err(e) = attach_ports(&state, &auth, &nics, &mut records, &zone_owner, &group_ids).await
    {
        release_ports(&state, &records).await;
        return Err(e);
    }

    // 1. The rows, under the project's quota (instances, cores, RAM), race-free. A project
    //    without limits on them has nothing to check: its rows are written with the placement,
    //    one Raft write instead of two.
    let limits = (quota("instances"), quota("cores"), quota("ram"));
    let unlimited = limits.0 < 0 && limits.1 < 0 && limits.2 < 0;
    let revisions = if unlimited {
        None
    } else {
        match write_within_quota(&state, &project, &records, limits).await {
            Ok(r) => Some(r),
            Err(e) => {
                release_ports(&state, &records).await;
                return Err(e);
            }
        }
    };

    // 2. Placement, committed with the rows.
    let request = |members: Vec<String>, policy: Option<GroupPolicy>| Request {
        instance_ids: records.iter().map(|r| r.id.clone()).collect(),
        flavor: shoal_scheduler::Flavor {
            name: flavor.name.clone(),
            vcpus: flavor.vcpus,
            ram_mb: flavor.ram,
            root_gb: flavor.disk,
            ephemeral_gb: flavor.ephemeral,
            swap_mb: flavor.swap,
            extra_specs: flavor.extra_specs.clone(),
        },
        image: Default::default(),
        availability_zone: zone.clone(),
        is_admin: is_admin(&auth),
        hints: SchedulerHints {
            query: query.clone(),
            group: policy.map(|policy| ServerGroup {
                policy,
                members,
                max_server_per_host: None,
            }),
            same_host: same_host.clone(),
            different_host: different_host.clone(),
        },
    };
    // A tagged device cannot be built here: Nova's compute manager aborts such a build on a
    // virt driver without `supports_device_tagging`, before it allocates anything on the host.
    let outcome = if tagged {
        Err(PlaceFailure::Fault(500, TAGGING_UNSUPPORTED.to_owned()))
    } else {
        place_servers(
            &state,
            &records,
            &revisions,
            group_id.as_deref(),
            &project,
            TaskState::Spawning,
            request,
        )
        .await
    };
    match outcome {
        Ok(()) => {}
        Err(PlaceFailure::Exists) => {
            release_ports(&state, &records).await;
            return Err(ApiError::conflict("a server with this id exists").nova());
        }
        Err(PlaceFailure::Fault(code, message)) => {
            // No host fit (or placement failed): the servers go to ERROR with the reason, as
            // Nova's conductor does, and the create itself still answers 202.
            for (i, r) in records.iter().enumerate() {
                let mut r = r.clone();
                r.vm_state = VmState::Error;
                r.task_state = None;
                let message = if tagged {
                    format!("Build of instance {} aborted: {message}", r.id)
                } else {
                    message.clone()
                };
                r.fault = Some(shoal_compute::server::Fault {
                    code,
                    message,
                    created: now_rfc3339(),
                });
                r.updated = now_rfc3339();
                match &revisions {
                    Some(revs) => servers(&state)
                        .put_at(&r.id, &r, revs[i])
                        .await
                        .map(|_| ())
                        .map_err(nova_err)?,
                    None => servers(&state)
                        .put_if_absent(&r.id, &r)
                        .await
                        .map(|_| ())
                        .map_err(nova_err)?,
                }
            }
        }
    }

    let first = &records[0];
    let admin_pass = s
        .admin_pass
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string()[..12].to_owned());
    let server = json!({
        "id": first.id,
        "links": links(&state, &first.id),
        "OS-DCF:diskConfig": "MANUAL",
        "security_groups": first.security_groups.iter().map(|g| json!({"name": g})).collect::<Vec<_>>(),
        "adminPass": admin_pass,
    });
    if return_reservation_id {
        return Ok((
            StatusCode::ACCEPTED,
            Json(json!({ "reservation_id": reservation_id })),
        ));
    }
    Ok((StatusCode::ACCEPTED, Json(json!({ "server": server }))))
}

/// The image fields the agent needs, after checking the caller may use it and the flavor
/// (its RAM in MB and root disk in GB) fits it.
pub(super) async fn snapshot_image(
    state: &AppState,
    auth: &Auth,
    image_id: &str,
    flavor: &FlavorSnapshot,
) -> ApiResult<ImageSnapshot> {
    let img = crate::api::glance::images::load_visible(state, auth, image_id)
        .await
        .map_err(|_| bad(format!("Image {image_id} could not be found.")))?
        .0;
    if img.status.as_str() != "active" {
        return Err(bad(format!(
            "Image {image_id} is not active (it is {}).",
            img.status.as_str()
        )));
    }
    if flavor.ram_mb < img.min_ram {
        return Err(bad(format!(
            "Flavor's memory is too small for requested image: {} MB < min_ram {} MB",
            flavor.ram_mb, img.min_ram
        )));
    }
    let size = img.virtual_size.or(img.size).unwrap_or(0);
    if flavor.disk_gb > 0 && (flavor.disk_gb < img.min_disk || flavor.disk_gb << 30 < size) {
        return Err(bad(format!(
            "Flavor's disk is too small for requested image: {} GB; the image needs {} GB",
            flavor.disk_gb,
            img.min_disk.max(size.div_ceil(1 << 30))
        )));
    }
    let container = img.container_format.as_deref().unwrap_or("bare");
    if !crate::api::glance::file::is_disk_container(container) {
        return Err(bad(format!(
            "Image {image_id} is a {container} archive, not a disk; servers boot bare or ami images"
        )));
    }
    let disk_format = img.disk_format.clone().unwrap_or_else(|| "raw".to_owned());
    if matches!(disk_format.as_str(), "aki" | "ari") {
        return Err(bad(format!(
            "Image {image_id} is a kernel or ramdisk ({disk_format}); boot the machine image that names it in kernel_id/ramdisk_id"
        )));
    }
    let part = |key: &str| img.properties.get(key).filter(|v| !v.is_empty()).cloned();
    let kernel_id = part("kernel_id");
    let ramdisk_id = part("ramdisk_id");
    for id in kernel_id.iter().chain(ramdisk_id.iter()) {
        let k = crate::api::glance::images::load_visible(state, auth, id)
            .await
            .map_err(|_| {
                bad(format!(
                    "Image {id} named by image {image_id} could not be found."
                ))
            })?
            .0;
        if k.status.as_str() != "active" {
            return Err(bad(format!(
                "Image {id} named by image {image_id} is not active."
            )));
        }
        // A kernel must be an aki image and a ramdisk an ari one: anything else named there
        // would be handed to the hypervisor as a kernel without having been checked as one.
        let want = if kernel_id.as_deref() == Some(id.as_str()) {
            "aki"
        } else {
            "ari"
        };
        if k.disk_format.as_deref() != Some(want) {
            return Err(bad(format!(
                "Image {id} named by image {image_id} must have disk_format {want}, not {}.",
                k.disk_format.as_deref().unwrap_or("none")
            )));
        }
    }
    Ok(ImageSnapshot {
        id: image_id.to_owned(),
        disk_format,
        kernel_id,
        ramdisk_id,
        kernel_cmdline: part("os_command_line"),
    })
}

/// Servers of `project` and what they hold: (instances, vCPUs, RAM MB).
pub async fn usage(state: &AppState, project: &str) -> ApiResult<(i64, i64, i64)> {
    let mut u = (0i64, 0i64, 0i64);
    for r in servers(state)
        .list("")
        .await
        .map_err(nova_err)?
        .into_values()
    {
        if r.project_id == project {
            u.0 += 1;
            u.1 += i64::from(r.flavor.vcpus);
            u.2 += r.flavor.ram_mb as i64;
        }
    }
    Ok(u)
}

/// Writes the server rows if the project's `instances`, `cores` and `ram` quotas (`-1`:
/// unlimited) allow them; returns their revisions.
///
/// Race-free as the key pairs' quota is: the guard row `servers/<project>` is read before the
/// count, and the write is conditioned on it and moves it, so two creates at the limit cannot
/// both commit. When fewer than `records` but at least `min` fit, Nova creates as many as fit;
/// Shoal, simpler, refuses unless all fit.
async fn write_within_quota(
    state: &AppState,
    project: &str,
    records: &[ServerRecord],
    (q_inst, q_cores, q_ram): (i64, i64, i64),
) -> ApiResult<Vec<u64>> {
    let guard = format!("servers/{project}");
    let want = (
        records.len() as i64,
        records
            .iter()
            .map(|r| i64::from(r.flavor.vcpus))
            .sum::<i64>(),
        records.iter().map(|r| r.flavor.ram_mb as i64).sum::<i64>(),
    );
    // (A project with no limit on any of the three does not come here: its rows are written
    // with the placement, without the guard.)
    for attempt in 0..QUOTA_ATTEMPTS {
        if attempt > 0 {
            // Jittered, growing backoff: creates of one project at once take turns.
            let cap = 2u64 << attempt.min(5);
            tokio::time::sleep(Duration::from_millis(rand::random_range(0..=cap))).await;
            state.cluster.read_barrier().await.map_err(nova_err)?;
        }
        let expect = match state
            .cluster
            .get(tables::QUOTA_GUARDS, &guard)
            .await
            .map_err(nova_err)?
        {
            Some(row) => Expect::Revision(row.mod_revision),
            None => Expect::Absent,
        };
        let used = usage(state, project).await?;
        for (name, limit, used, want) in [
            ("instances", q_inst, used.0, want.0),
            ("cores", q_cores, used.1, want.1),
            ("ram", q_ram, used.2, want.2),
        ] {
            if limit >= 0 && used + want > limit {
                return Err(ApiError::forbidden(format!(
                    "Quota exceeded for {name}: Requested {want}, but already used {used} of {limit} {name}"
                ))
                .nova());
            }
        }
        let mut txn = Txn::new().when(tables::QUOTA_GUARDS, &guard, expect);
        for r in records {
            txn = txn.when(tables::SERVERS, &r.id, Expect::Absent).put(
                tables::SERVERS,
                &r.id,
                serde_json::to_vec(r).expect("server records serialise"),
            );
        }
        txn = txn.put(tables::QUOTA_GUARDS, &guard, (used.0 + want.0).to_string());
        let resp = state.cluster.write(txn).await.map_err(nova_err)?;
        if resp.succeeded {
            return Ok(vec![resp.revision; records.len()]);
        }
    }
    Err(ApiError::conflict("the project's quota kept changing; try again").nova())
}

/// Server groups are keyed `{project}/{id}`.
fn group_key(project: &str, id: &str) -> String {
    format!("{project}/{id}")
}

pub(super) async fn load_group(
    state: &AppState,
    id: &str,
    project: &str,
) -> ApiResult<(Versioned<GroupRow>, GroupPolicy)> {
    let g = state
        .state
        .table::<GroupRow>(tables::SERVER_GROUPS)
        .get(&group_key(project, id))
        .await
        .map_err(nova_err)?
        .filter(|g| g.value.project_id == project)
        .ok_or_else(|| bad(format!("Invalid server group {id}: it does not exist")))?;
    let policy = match g.value.policy.as_str() {
        "affinity" => GroupPolicy::Affinity,
        "anti-affinity" => GroupPolicy::AntiAffinity,
        "soft-affinity" => GroupPolicy::SoftAffinity,
        "soft-anti-affinity" => GroupPolicy::SoftAntiAffinity,
        other => return Err(bad(format!("server group {id} has unknown policy {other}"))),
    };
    Ok((g, policy))
}

/// The id of the server group `r` is a member of, if any (a server joins at most one, at
/// create).
pub(super) async fn group_of(state: &AppState, r: &ServerRecord) -> ApiResult<Option<String>> {
    let groups = state
        .state
        .table::<GroupRow>(tables::SERVER_GROUPS)
        .list(&group_key(&r.project_id, ""))
        .await
        .map_err(nova_err)?;
    Ok(groups
        .rows
        .into_iter()
        .find(|(_, g)| g.value.members.contains(&r.id))
        .map(|(_, g)| g.value.id))
}

/// Why [`place_servers`] placed nothing.
enum PlaceFailure {
    /// The fault the servers get: `(code, message)`.
    Fault(u16, String),
    /// Rows that were to be created exist already.
    Exists,
}

impl From<(u16, String)> for PlaceFailure {
    fn from((code, message): (u16, String)) -> Self {
        PlaceFailure::Fault(code, message)
    }
}

/// Schedules and commits the claims with the rows (host set, `spawning`), and the group's new
/// members; re-reads the group when a concurrent create changed it. With `revisions`, the rows
/// were written before (under the quota guard) and each write is conditioned on its revision;
/// without, the rows are created by the same transaction.
async fn place_servers(
    state: &AppState,
    records: &[ServerRecord],
    revisions: &Option<Vec<u64>>,
    group_id: Option<&str>,
    project: &str,
    task: TaskState,
    request: impl Fn(Vec<String>, Option<GroupPolicy>) -> Request,
) -> Result<(), PlaceFailure> {
    let internal = |e: &dyn std::fmt::Display| {
        tracing::warn!(error = %e, "placement failed");
        PlaceFailure::Fault(
            500u16,
            "Failed to schedule the instance: the cluster could not commit the placement"
                .to_owned(),
        )
    };
    for attempt in 0..CREATE_ATTEMPTS {
        if attempt > 0 {
            let _ = state.cluster.read_barrier().await;
        }
        let group = match group_id {
            Some(g) => Some(
                load_group(state, g, project)
                    .await
                    .map_err(|e| (400, e.message))?,
            ),
            None => None,
        };
        let req = request(
            group
                .as_ref()
                .map(|(g, _)| g.value.members.clone())
                .unwrap_or_default(),
            group.as_ref().map(|(_, p)| *p),
        );
        let result = placement::place_with(
            &state.cluster,
            Some(&state.hosts),
            &req,
            |mut txn, claims| {
                if let Some((g, _)) = &group {
                    let mut row = g.value.clone();
                    // An unshelved server is a member already.
                    for r in records {
                        if !row.members.contains(&r.id) {
                            row.members.push(r.id.clone());
                        }
                    }
                    let key = group_key(project, &row.id);
                    txn = txn
                        .when(tables::SERVER_GROUPS, &key, Expect::Revision(g.revision))
                        .put(
                            tables::SERVER_GROUPS,
                            &key,
                            serde_json::to_vec(&row).expect("groups serialise"),
                        );
                }
                for ((i, r), c) in records.iter().enumerate().zip(claims) {
                    let mut r = r.clone();
                    r.host = Some(c.host.clone());
                    r.task_state = Some(task);
                    r.updated = now_rfc3339();
                    let expect = match revisions {
                        Some(revs) => Expect::Revision(revs[i]),
                        None => Expect::Absent,
                    };
                    txn = txn.when(tables::SERVERS, &r.id, expect).put(
                        tables::SERVERS,
                        &r.id,
                        serde_json::to_vec(&r).expect("server records serialise"),
                    );
                }
                txn
            },
        )
        .await;
        match result {
            Ok(_) => return Ok(()),
            Err(PlaceError::ExtraPrecondition { table, .. }) if table == tables::SERVER_GROUPS => {
                continue
            }
            Err(PlaceError::ExtraPrecondition { .. }) if revisions.is_none() => {
                return Err(PlaceFailure::Exists);
            }
            Err(PlaceError::ExtraPrecondition { .. }) => {
                // The rows changed: a delete came first. Nothing to place.
                return Ok(());
            }
            Err(PlaceError::Schedule(ScheduleError::NoValidHost(nvh))) => {
                return Err(PlaceFailure::Fault(
                    500,
                    format!("No valid host was found. {nvh}"),
                ));
            }
            Err(PlaceError::Schedule(e)) => return Err(PlaceFailure::Fault(400, e.to_string())),
            Err(PlaceError::Contended(n)) => {
                tracing::warn!(
                    attempts = n,
                    "placement kept losing to concurrent placements; retrying"
                );
                continue;
            }
            Err(e) => return Err(internal(&e)),
        }
    }
    Err(PlaceFailure::Fault(
        500,
        "No valid host was found: placement kept conflicting with concurrent creates".into(),
    ))
}

/// A NIC a create asks for.
#[derive(Debug, Clone)]
enum Nic {
    /// A new port on this network, with this address if given.
    Network {
        id: String,
        name: String,
        mtu: u32,
        fixed_ip: Option<String>,
    },
    /// An existing, unbound port of the project.
    Port {
        id: String,
        network: String,
        mtu: u32,
    },
}

fn network_caller(auth: &Auth) -> shoal_network::Caller {
    shoal_network::Caller {
        project_id: auth.0.project_id.clone(),
        admin: is_admin(auth),
        member: auth.require("member").is_ok(),
    }
}

/// The service itself, for undoing what a request set up and for deletes.
fn service_caller() -> shoal_network::Caller {
    shoal_network::Caller {
        project_id: None,
        admin: true,
        member: true,
    }
}

/// Why a build with tagged devices is aborted: Shoal's libvirt driver does not expose device
/// metadata (`devices` in the metadata service is always empty), so it is a virt driver without
/// `supports_device_tagging`, and Nova's compute manager aborts the build with this reason.
const TAGGING_UNSUPPORTED: &str =
    "Attempt to boot guest with tagged devices on host that does not support tagging.";

/// The device `tag`s of a create (2.32): whether any `networks` or `block_device_mapping_v2`
/// entry carries one. Nova's schemas accept a network's tag at 2.32-2.36 and from 2.42, a block
/// device's at 2.32 and from 2.42 (the gaps are the bug 2.42 fixed); elsewhere it is an
/// unexpected property, a 400. A tag is 1 to 60 characters without `,` or `/`.
fn device_tags(s: &CreateServer, v: Microversion) -> ApiResult<bool> {
    let network_ok = (V2_32..=V2_36).contains(&v) || v >= V2_42;
    let bdm_ok = v == V2_32 || v >= V2_42;
    let mut tagged = false;
    let mut check = |entries: Option<&Value>, field: &str, ok: bool| -> ApiResult<()> {
        for entry in entries.and_then(Value::as_array).into_iter().flatten() {
            let Some(tag) = entry.get("tag") else {
                continue;
            };
            if !ok {
                return Err(bad(format!(
                    "Invalid input for field/attribute {field}. Additional properties are not \
                     allowed ('tag' was unexpected at microversion {v})"
                )));
            }
            let good = tag
                .as_str()
                .is_some_and(|t| (1..=60).contains(&t.chars().count()) && !t.contains([',', '/']));
            if !good {
                return Err(bad(format!(
                    "Invalid input for field/attribute tag. Value: {tag}. A tag is 1 to 60 \
                     characters without ',' or '/'"
                )));
            }
            tagged = true;
        }
        Ok(())
    };
    check(s.networks.as_ref(), "networks", network_ok)?;
    check(
        s.block_device_mapping_v2.as_ref(),
        "block_device_mapping_v2",
        bdm_ok,
    )?;
    Ok(tagged)
}

/// Resolves `networks` as Nova 2.1 does: absent, `[]` or `auto` takes the project's one visible
/// network (none: no NIC; several: 409), `none` gives no NIC, a list names networks
/// (`uuid`, optional `fixed_ip`) or ports (`port`).
async fn requested_nics(
    state: &AppState,
    auth: &Auth,
    networks: &Option<Value>,
    count: u32,
) -> ApiResult<Vec<Nic>> {
    let caller = network_caller(auth);
    let net = |id: String, fixed_ip: Option<String>| {
        let caller = caller.clone();
        async move {
            let n = state
                .network
                .network(&caller, &id)
                .await
                .map_err(|_| bad(format!("Network {id} could not be found.")))?;
            Ok::<_, ApiError>(Nic::Network {
                id: n.id,
                name: n.name,
                mtu: n.mtu,
                fixed_ip,
            })
        }
    };
    match networks {
        Some(Value::String(v)) if v == "none" => Ok(Vec::new()),
        // Before 2.37 an empty list is no request at all (the client sends it by default):
        // Nova then allocates on the one available network.
        Some(Value::Array(a)) if a.is_empty() => auto_nic(state, &caller).await,
        None => auto_nic(state, &caller).await,
        Some(Value::String(v)) if v == "auto" => auto_nic(state, &caller).await,
        Some(Value::Array(a)) => {
            let mut out = Vec::with_capacity(a.len());
            for entry in a {
                let field = |k: &str| entry.get(k).and_then(Value::as_str).map(str::to_owned);
                if let Some(port) = field("port") {
                    if count > 1 {
                        return Err(bad(
                            "Unable to launch multiple instances with a single configured port ID.",
                        ));
                    }
                    let p = state
                        .network
                        .port(&caller, &port)
                        .await
                        .map_err(|_| bad(format!("Port {port} could not be found.")))?;
                    if p.is_bound() {
                        return Err(
                            ApiError::conflict(format!("Port {port} is still in use.")).nova()
                        );
                    }
                    let n = state
                        .network
                        .network(&service_caller(), &p.network_id)
                        .await
                        .map_err(nova_err_net)?;
                    out.push(Nic::Port {
                        id: port,
                        network: n.name,
                        mtu: n.mtu,
                    });
                } else if let Some(id) = field("uuid") {
                    let fixed_ip = field("fixed_ip");
                    if fixed_ip.is_some() && count > 1 {
                        return Err(bad(
                            "Unable to launch multiple instances with a single fixed_ip.",
                        ));
                    }
                    out.push(net(id, fixed_ip).await?);
                } else {
                    return Err(bad("Invalid input for field/attribute networks: each entry needs a uuid or a port"));
                }
            }
            Ok(out)
        }
        Some(_) => Err(bad("networks must be a list, \"auto\" or \"none\"")),
    }
}

async fn auto_nic(state: &AppState, caller: &shoal_network::Caller) -> ApiResult<Vec<Nic>> {
    let visible: Vec<_> = state
        .network
        .list_networks(caller)
        .await
        .map_err(nova_err_net)?
        .into_iter()
        .filter(|n| !n.external && !n.subnets.is_empty())
        .collect();
    match visible.as_slice() {
        [] => Ok(Vec::new()),
        [n] => Ok(vec![Nic::Network {
            id: n.id.clone(),
            name: n.name.clone(),
            mtu: n.mtu,
            fixed_ip: None,
        }]),
        _ => Err(ApiError::conflict(
            "Multiple possible networks found, use a Network ID to be more specific.",
        )
        .nova()),
    }
}

fn nova_err_net(e: shoal_network::NetworkError) -> ApiError {
    match e.class() {
        shoal_network::ErrorClass::Internal => ApiError::internal_logged(&e).nova(),
        shoal_network::ErrorClass::Unavailable => ApiError::unavailable(e.to_string()).nova(),
        shoal_network::ErrorClass::Unknown => ApiError::commit_unknown(e.to_string()).nova(),
        _ => bad(e.to_string()),
    }
}

/// Creates (or claims) each server's ports and records them on the rows.
async fn attach_ports(
    state: &AppState,
    auth: &Auth,
    nics: &[Nic],
    records: &mut [ServerRecord],
    owner: &str,
    group_ids: &[String],
) -> ApiResult<()> {
    let caller = network_caller(auth);
    for r in records.iter_mut() {
        for nic in nics {
            let (port, network, mtu, created) = match nic {
                Nic::Network {
                    id,
                    name,
                    mtu,
                    fixed_ip,
                } => {
                    let req = shoal_network::PortCreate {
                        network_id: id.clone(),
                        device_id: Some(r.id.clone()),
                        device_owner: Some(owner.to_owned()),
                        fixed_ips: fixed_ip.as_ref().map(|ip| {
                            vec![shoal_network::FixedIpRequest {
                                subnet_id: None,
                                ip_address: Some(ip.clone()),
                            }]
                        }),
                        security_groups: Some(group_ids.to_vec()),
                        ..Default::default()
                    };
                    let p = state
                        .network
                        .create_port(&caller, req)
                        .await
                        .map_err(nova_err_net)?;
                    (p, name.clone(), *mtu, true)
                }
                Nic::Port { id, network, mtu } => {
                    let req = shoal_network::PortUpdate {
                        device_id: Some(r.id.clone()),
                        device_owner: Some(owner.to_owned()),
                        ..Default::default()
                    };
                    let p = state
                        .network
                        .update_port(&caller, id, req)
                        .await
                        .map_err(nova_err_net)?;
                    (p, network.clone(), *mtu, false)
                }
            };
            r.ports.push(shoal_compute::server::ServerPort {
                port_id: port.id,
                network_id: port.network_id,
                network_name: network,
                mac: port.mac_address,
                ips: port.fixed_ips.into_iter().map(|f| f.ip_address).collect(),
                mtu,
                created,
            });
        }
    }
    Ok(())
}

/// Deletes the ports the servers API created for these servers and unbinds the ones users
/// passed in. Best effort: a port already gone is done.
async fn release_ports(state: &AppState, records: &[ServerRecord]) {
    let svc = service_caller();
    for r in records {
        for p in &r.ports {
            let res = if p.created {
                state.network.delete_port(&svc, &p.port_id).await
            } else {
                let req = shoal_network::PortUpdate {
                    device_id: Some(String::new()),
                    device_owner: Some(String::new()),
                    binding_host_id: Some(String::new()),
                    ..Default::default()
                };
                state
                    .network
                    .update_port(&svc, &p.port_id, req)
                    .await
                    .map(|_| ())
            };
            if let Err(e) = res {
                if e.class() != shoal_network::ErrorClass::NotFound {
                    tracing::warn!(server = %r.id, port = %p.port_id, error = %e, "cannot release a port");
                }
            }
        }
    }
}

/// Nova's `addresses`: by network name, each fixed address with its MAC.
/// Addresses by network as `server show` has them, with each address's type and MAC.
fn addresses(r: &ServerRecord) -> Value {
    addresses_of(r, true)
}

/// `{network: [{version, addr, ...}]}`; `extended` adds Nova's `OS-EXT-IPS` type and MAC (the
/// `ips` API and the update answer have neither).
fn addresses_of(r: &ServerRecord, extended: bool) -> Value {
    let mut out = serde_json::Map::new();
    for p in &r.ports {
        let list = out
            .entry(p.network_name.clone())
            .or_insert_with(|| json!([]));
        if let Some(a) = list.as_array_mut() {
            for ip in &p.ips {
                let version = if ip.contains(':') { 6 } else { 4 };
                let mut addr = json!({"version": version, "addr": ip});
                if extended {
                    addr["OS-EXT-IPS:type"] = json!("fixed");
                    addr["OS-EXT-IPS-MAC:mac_addr"] = json!(p.mac);
                }
                a.push(addr);
            }
        }
    }
    Value::Object(out)
}

// ---------------------------------------------------------------------------------------------
// read

fn links(state: &AppState, id: &str) -> Value {
    json!([
        {"rel": "self", "href": format!("{}/compute/v2.1/servers/{id}", state.base_url)},
        {"rel": "bookmark", "href": format!("{}/compute/servers/{id}", state.base_url)},
    ])
}

fn host_id(project: &str, host: Option<&str>) -> String {
    use sha2::Digest;
    match host {
        None => String::new(),
        Some(h) => hex::encode(sha2::Sha224::digest(format!("{project}{h}").as_bytes())),
    }
}

/// Who looks at servers, at which microversion: what the views show.
pub(super) struct View {
    admin: bool,
    v: Microversion,
    /// Nova's `host_status` of each host (admins, from 2.16; empty otherwise).
    host_status: HashMap<String, &'static str>,
}

impl View {
    /// The view of `auth` at `v`; for an admin at 2.16 or later it reads the hosts' services.
    pub(super) async fn new(state: &AppState, auth: &Auth, v: Microversion) -> ApiResult<Self> {
        let admin = is_admin(auth);
        let mut host_status = HashMap::new();
        if admin && v >= V2_16 {
            let members = state.cluster.cluster_status().await.members;
            for h in shoal_compute::service::Services::new(&state.state, members)
                .list()
                .await?
            {
                host_status.insert(
                    h.member.name.clone(),
                    host_status_of(&h.service, h.member.healthy),
                );
            }
        }
        Ok(Self {
            admin,
            v,
            host_status,
        })
    }

    /// A view that shows no admin fields (the update and rebuild answers).
    fn plain(v: Microversion) -> Self {
        Self {
            admin: false,
            v,
            host_status: HashMap::new(),
        }
    }
}

/// Nova's `host_status` of a host's service: `DOWN` when forced down, `MAINTENANCE` when
/// disabled, else `UP` while it is up and `UNKNOWN` when it is not heard from.
fn host_status_of(svc: &shoal_compute::service::ServiceState, healthy: bool) -> &'static str {
    if svc.forced_down {
        "DOWN"
    } else if svc.disabled {
        "MAINTENANCE"
    } else if svc.is_up(healthy) {
        "UP"
    } else {
        "UNKNOWN"
    }
}

/// A server as Nova shows it at the view's microversion; the `OS-EXT-SRV-ATTR` fields and
/// `host_status` only to admins.
fn server_json(state: &AppState, r: &ServerRecord, view: &View) -> Value {
    let admin = view.admin;
    let mut v = json!({
        "id": r.id,
        "name": r.name,
        "status": r.status(),
        "tenant_id": r.project_id,
        "user_id": r.user_id,
        "metadata": r.metadata,
        "hostId": host_id(&r.project_id, r.host.as_deref()),
        "image": {"id": r.image.id, "links": [{"rel": "bookmark",
            "href": format!("{}/compute/images/{}", state.base_url, r.image.id)}]},
        "flavor": {"id": r.flavor.id, "links": [{"rel": "bookmark",
            "href": format!("{}/compute/flavors/{}", state.base_url, r.flavor.id)}]},
        "created": r.created,
        "updated": r.updated,
        "addresses": addresses(r),
        "accessIPv4": r.access_ipv4,
        "accessIPv6": r.access_ipv6,
        "links": links(state, &r.id),
        "OS-DCF:diskConfig": "MANUAL",
        "OS-EXT-AZ:availability_zone": r.availability_zone,
        // Nova shows "True" for a server with a config drive, else "".
        "config_drive": if r.config_drive { "True" } else { "" },
        "key_name": r.key_name,
        "OS-SRV-USG:launched_at": r.launched_at.as_deref().map(|t| t.trim_end_matches('Z').to_owned() + ".000000"),
        // A deleted server (a tombstone) was terminated when its row went: `updated`.
        "OS-SRV-USG:terminated_at": (r.vm_state == VmState::Deleted)
            .then(|| r.updated.trim_end_matches('Z').to_owned() + ".000000"),
        "OS-EXT-STS:task_state": r.task_state.map(|t| t.as_str()),
        "OS-EXT-STS:vm_state": r.vm_state.as_str(),
        "OS-EXT-STS:power_state": r.power_state,
        "os-extended-volumes:volumes_attached": [],
    });
    if admin {
        v["OS-EXT-SRV-ATTR:host"] = json!(r.host);
        v["OS-EXT-SRV-ATTR:hypervisor_hostname"] = json!(r.host);
        v["OS-EXT-SRV-ATTR:instance_name"] = json!(r.instance_name.clone().unwrap_or_default());
        if view.v >= V2_3 {
            // Shoal boots whole-disk images (no kernel or ramdisk of their own), from vda.
            v["OS-EXT-SRV-ATTR:reservation_id"] = json!(r.reservation_id);
            v["OS-EXT-SRV-ATTR:launch_index"] = json!(r.launch_index);
            v["OS-EXT-SRV-ATTR:hostname"] = json!(shoal_compute::metadata::hostname(r));
            v["OS-EXT-SRV-ATTR:kernel_id"] = json!("");
            v["OS-EXT-SRV-ATTR:ramdisk_id"] = json!("");
            v["OS-EXT-SRV-ATTR:root_device_name"] = json!(r.host.as_ref().map(|_| "/dev/vda"));
            v["OS-EXT-SRV-ATTR:user_data"] = json!(r.user_data);
        }
        if view.v >= V2_16 {
            v["host_status"] = json!(r.host.as_deref().map_or("", |h| view
                .host_status
                .get(h)
                .copied()
                .unwrap_or("UNKNOWN")));
        }
    }
    if view.v >= V2_9 {
        v["locked"] = json!(r.locked);
    }
    if view.v >= V2_19 {
        v["description"] = json!(r.description);
    }
    if view.v >= V2_26 {
        v["tags"] = json!(r.tags);
    }
    // Nova lists the groups of the server's ports, and no key at all when there are none.
    if !r.security_groups.is_empty() {
        v["security_groups"] = json!(r
            .security_groups
            .iter()
            .map(|g| json!({"name": g}))
            .collect::<Vec<_>>());
    }
    // Nova shows progress only while a server builds or runs.
    if matches!(r.vm_state, VmState::Active | VmState::Building) {
        v["progress"] = json!(0);
    }
    if let Some(f) = &r.fault {
        v["fault"] = json!({"code": f.code, "message": f.message, "created": f.created});
    }
    v
}

/// Nova's update answer: the server without the extension attributes (no zone, task and
/// power states, usage times, key, groups or volumes) and addresses without type and MAC.
fn server_json_basic(state: &AppState, r: &ServerRecord, v: Microversion) -> Value {
    let mut v = server_json(state, r, &View::plain(v));
    if let Some(o) = v.as_object_mut() {
        o.retain(|k, _| {
            !k.starts_with("OS-EXT-")
                && !k.starts_with("OS-SRV-USG:")
                && !matches!(
                    k.as_str(),
                    "config_drive"
                        | "key_name"
                        | "os-extended-volumes:volumes_attached"
                        | "security_groups"
                )
        });
    }
    v["addresses"] = plain_addresses(r);
    v
}

/// Addresses as `{network: [{version, addr}]}` (the `ips` API and the update answer).
pub(super) fn plain_addresses(r: &ServerRecord) -> Value {
    addresses_of(r, false)
}

/// The server if the caller may see it (its project's, or any for an admin); 404 otherwise.
pub(super) async fn load(
    state: &AppState,
    auth: &Auth,
    id: &str,
) -> ApiResult<Versioned<ServerRecord>> {
    need(auth, "reader")?;
    let mut found = servers(state).get(id).await.map_err(nova_err)?;
    if found.is_none() {
        // This node's replica may not have applied a create that another request just
        // committed (through the leader): read after a barrier before saying 404, so a client
        // finds the server its create answered with, as on Nova.
        state.cluster.read_barrier().await.map_err(nova_err)?;
        found = servers(state).get(id).await.map_err(nova_err)?;
    }
    let v = found.ok_or_else(|| not_found(id))?;
    if !is_admin(auth) && auth.0.project_id.as_deref() != Some(v.value.project_id.as_str()) {
        return Err(not_found(id));
    }
    Ok(v)
}

async fn show(
    State(state): State<AppState>,
    auth: Auth,
    mv: Microversion,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let v = load(&state, &auth, &id).await?;
    let view = View::new(&state, &auth, mv).await?;
    Ok(Json(
        json!({ "server": server_json(&state, &v.value, &view) }),
    ))
}

async fn list(
    State(state): State<AppState>,
    auth: Auth,
    v: Microversion,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let (rows, next) = filtered(&state, &auth, &q, v).await?;
    let items: Vec<Value> = rows
        .iter()
        .map(|r| json!({"id": r.id, "name": r.name, "links": links(&state, &r.id)}))
        .collect();
    Ok(Json(with_next(
        json!({ "servers": items }),
        &state,
        next,
        &q,
        false,
    )))
}

async fn list_detail(
    State(state): State<AppState>,
    auth: Auth,
    v: Microversion,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let (rows, next) = filtered(&state, &auth, &q, v).await?;
    let view = View::new(&state, &auth, v).await?;
    let items: Vec<Value> = rows.iter().map(|r| server_json(&state, r, &view)).collect();
    Ok(Json(with_next(
        json!({ "servers": items }),
        &state,
        next,
        &q,
        true,
    )))
}

fn with_next(
    mut body: Value,
    state: &AppState,
    next: Option<String>,
    q: &HashMap<String, String>,
    detail: bool,
) -> Value {
    if let Some(marker) = next {
        let limit = q.get("limit").cloned().unwrap_or_default();
        let path = if detail { "servers/detail" } else { "servers" };
        body["servers_links"] = json!([{ "rel": "next",
            "href": format!("{}/compute/v2.1/{path}?limit={limit}&marker={marker}", state.base_url) }]);
    }
    body
}

/// The servers a list shows, newest first as Nova sorts them, after its filters and paging;
/// and the marker of the next page when one was cut.
async fn filtered(
    state: &AppState,
    auth: &Auth,
    q: &HashMap<String, String>,
    v: Microversion,
) -> ApiResult<(Vec<ServerRecord>, Option<String>)> {
    need(auth, "reader")?;
    let since = match q.get("changes-since") {
        None => None,
        Some(t) => Some(shoal_state::time::parse_iso8601(t).ok_or_else(|| {
            let shown: String = t.chars().take(64).flat_map(char::escape_default).collect();
            bad(format!(
                "Invalid input for query parameters changes-since. Value: {shown}. '{shown}' is not a 'date-time'"
            ))
        })?),
    };
    // 2.26: comma-separated tag lists (below it Nova drops the parameters).
    let tag_list = |name: &str| -> Vec<String> {
        q.get(name)
            .filter(|_| v >= V2_26)
            .map(|t| t.split(',').map(str::to_owned).collect())
            .unwrap_or_default()
    };
    let tag_filter = shoal_compute::server::TagFilter {
        all: tag_list("tags"),
        any: tag_list("tags-any"),
        not_all: tag_list("not-tags"),
        not_any: tag_list("not-tags-any"),
    };
    let admin = is_admin(auth);
    let all_tenants = q
        .get("all_tenants")
        .is_some_and(|v| !matches!(v.to_ascii_lowercase().as_str(), "0" | "false" | "off"));
    if all_tenants && !admin {
        return Err(ApiError::forbidden(
            "Policy doesn't allow os_compute_api:servers:index:get_all_tenants to be performed.",
        )
        .nova());
    }
    if q.contains_key("host") && !admin {
        return Err(bad("the host filter is for admins only"));
    }
    let name_re = match q.get("name") {
        Some(n) => {
            Some(regex::Regex::new(n).map_err(|e| bad(format!("Invalid name filter {n:?}: {e}")))?)
        }
        None => None,
    };
    // `ip` and `ip6` match a fixed address from its start (Python's `re.match`, as Nova).
    // Below 2.5 Nova drops `ip6` from a non-admin's filters.
    let ip_re = |key: &str| -> ApiResult<Option<regex::Regex>> {
        q.get(key)
            .map(|p| {
                regex::Regex::new(&format!("^(?:{p})"))
                    .map_err(|e| bad(format!("Invalid {key} filter {p:?}: {e}")))
            })
            .transpose()
    };
    let ip4 = ip_re("ip")?;
    let ip6 = if admin || v >= V2_5 {
        ip_re("ip6")?
    } else {
        None
    };
    let limit = match q.get("limit") {
        Some(l) => Some(
            l.parse::<usize>()
                .map_err(|_| bad("limit must be a non-negative integer"))?,
        ),
        None => None,
    };
    // As in Nova, `project_id`/`tenant_id` narrow an `all_tenants` listing and are ignored
    // without it: a listing is otherwise the caller's own project, admin or not.
    let project_filter = if all_tenants {
        q.get("project_id").or(q.get("tenant_id")).cloned()
    } else {
        None
    };
    // Deleted servers (tombstones, `shoal_compute::usage`), as Nova 2.1 lists them: only with
    // `deleted=true` (admins; ignored for others, as Nova drops the option), with
    // `status=DELETED` (admins; others 403), and among the changes a `changes-since` asks for.
    let wants_deleted = q
        .get("status")
        .is_some_and(|s| s.eq_ignore_ascii_case("DELETED"));
    if wants_deleted && !admin {
        return Err(ApiError::forbidden("Only administrators may list deleted instances").nova());
    }
    let deleted = admin
        && (wants_deleted
            || q.get("deleted").is_some_and(|v| {
                matches!(
                    v.to_ascii_lowercase().as_str(),
                    "1" | "t" | "true" | "on" | "y" | "yes"
                )
            }));
    let with_deleted = deleted || (since.is_some() && !(admin && q.contains_key("deleted")));
    let live = if deleted {
        Vec::new()
    } else {
        servers(state)
            .list("")
            .await
            .map_err(nova_err)?
            .into_values()
            .collect()
    };
    let tombstones = if with_deleted {
        deleted_servers(state).await?
    } else {
        Vec::new()
    };
    let own = auth.0.project_id.clone();
    let mut rows: Vec<ServerRecord> = live
        .into_iter()
        .chain(tombstones.iter().map(|t| t.as_record()))
        .filter(|r| {
            if all_tenants {
                project_filter.as_ref().is_none_or(|p| &r.project_id == p)
            } else {
                Some(&r.project_id) == own.as_ref()
            }
        })
        .filter(|r| name_re.as_ref().is_none_or(|re| re.is_match(&r.name)))
        .filter(|r| {
            q.get("status")
                .is_none_or(|s| s.eq_ignore_ascii_case(r.status()))
        })
        .filter(|r| {
            let has = |re: &regex::Regex, v6: bool| {
                r.ports
                    .iter()
                    .flat_map(|p| &p.ips)
                    .any(|ip| ip.contains(':') == v6 && re.is_match(ip))
            };
            ip4.as_ref().is_none_or(|re| has(re, false))
                && ip6.as_ref().is_none_or(|re| has(re, true))
        })
        .filter(|r| q.get("image").is_none_or(|i| *i == r.image.id))
        .filter(|r| q.get("flavor").is_none_or(|f| *f == r.flavor.id))
        .filter(|r| {
            q.get("host")
                .is_none_or(|h| r.host.as_deref() == Some(h.as_str()))
        })
        .filter(|r| {
            q.get("reservation_id")
                .is_none_or(|v| *v == r.reservation_id)
        })
        .filter(|r| tag_filter.matches(&r.tags))
        .filter(|r| {
            since.is_none_or(|t| {
                shoal_state::time::parse_iso8601(&r.updated).is_some_and(|u| u >= t)
            })
        })
        .collect();
    rows.sort_by(|a, b| (&b.created, &b.id).cmp(&(&a.created, &a.id)));
    if let Some(marker) = q.get("marker") {
        let at = rows
            .iter()
            .position(|r| &r.id == marker)
            .ok_or_else(|| bad(format!("marker [{marker}] not found")))?;
        rows.drain(..=at);
    }
    let mut next = None;
    if let Some(l) = limit {
        if rows.len() > l {
            rows.truncate(l);
            next = rows.last().map(|r| r.id.clone());
        }
    }
    Ok((rows, next))
}

/// The tombstones of deleted servers still within their retention, in key order.
pub(super) async fn deleted_servers(
    state: &AppState,
) -> ApiResult<Vec<shoal_compute::usage::DeletedServer>> {
    let now = shoal_state::time::now_secs();
    Ok(state
        .state
        .table::<shoal_compute::usage::DeletedServer>(tables::DELETED_SERVERS)
        .list("")
        .await
        .map_err(nova_err)?
        .into_values()
        .filter(|t| !t.expired(now, state.deleted_server_retention))
        .collect())
}

// ---------------------------------------------------------------------------------------------
// change

#[derive(Deserialize)]
struct UpdateBody {
    server: UpdateServer,
}

#[derive(Deserialize)]
struct UpdateServer {
    #[serde(default)]
    name: Option<String>,
    #[serde(default, rename = "accessIPv4")]
    access_v4: Option<String>,
    #[serde(default, rename = "accessIPv6")]
    access_v6: Option<String>,
    #[serde(default, rename = "OS-DCF:diskConfig")]
    _disk_config: Option<String>,
    /// From microversion 2.19; `null` clears it, so the field is kept as JSON.
    #[serde(default, deserialize_with = "present")]
    description: Option<Value>,
}

/// A field that may be `null`: `Some(Value::Null)` when given as null, `None` when absent.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

async fn update(
    State(state): State<AppState>,
    auth: Auth,
    mv: Microversion,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    need(&auth, "member")?;
    let body: UpdateBody = parse(&body)?;
    let description = description_arg(body.server.description.as_ref(), mv)?;
    let access_v4 = access_ip(body.server.access_v4.as_deref(), false)?;
    let access_v6 = access_ip(body.server.access_v6.as_deref(), true)?;
    let v = load(&state, &auth, &id).await?;
    let mut r = v.value;
    if let Some(name) = body.server.name {
        if name.trim().is_empty() || name.chars().count() > 255 {
            return Err(bad(
                "Invalid input for field/attribute name. Value must be 1 to 255 characters",
            ));
        }
        r.name = name;
    }
    if let Some(a) = access_v4 {
        r.access_ipv4 = a;
    }
    if let Some(a) = access_v6 {
        r.access_ipv6 = a;
    }
    if let Some(d) = description {
        r.description = d;
    }
    r.updated = now_rfc3339();
    let new = change(&state, &id, v.revision, &r).await?;
    Ok(Json(
        json!({ "server": server_json_basic(&state, &new, mv) }),
    ))
}

/// Writes `r` if the row is still at `revision`; a concurrent change is a 409 to retry.
pub(super) async fn change(
    state: &AppState,
    id: &str,
    revision: u64,
    r: &ServerRecord,
) -> ApiResult<ServerRecord> {
    match servers(state)
        .put_at(id, r, revision)
        .await
        .map_err(nova_err)?
    {
        Some(_) => Ok(r.clone()),
        None => Err(ApiError::conflict(format!(
            "Instance {id} changed while the request was handled; retry"
        ))
        .nova()),
    }
}

/// Applies `edit` to the server's row with a compare-and-set, re-reading after a conflict
/// (`shoal_state::retry`; after its attempts a 409); `edit` refusing is the answer. Stamps
/// `updated`.
pub(super) async fn modify(
    state: &AppState,
    auth: &Auth,
    id: &str,
    edit: impl Fn(&mut ServerRecord) -> ApiResult<()>,
) -> ApiResult<ServerRecord> {
    retry(tables::SERVERS, id, DEFAULT_ATTEMPTS, || async {
        let v = load(state, auth, id).await?;
        let mut r = v.value;
        edit(&mut r)?;
        r.updated = now_rfc3339();
        let written = servers(state).put_at(id, &r, v.revision).await?;
        if written.is_none() {
            // Lost to a concurrent writer: read that write before the next round.
            state.state.read_barrier().await?;
        }
        Ok(written.map(|_| r))
    })
    .await
}

async fn delete(
    State(state): State<AppState>,
    auth: Auth,
    rid: RequestId,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    need(&auth, "member")?;
    for _ in 0..5 {
        let v = load(&state, &auth, &id).await?;
        let mut r = v.value;
        if r.host.is_none() {
            // Never placed (NoValidHost) or shelved and offloaded: nothing runs anywhere; the
            // row goes now, leaving the record of a deleted server with the delete logged.
            release_ports(&state, std::slice::from_ref(&r)).await;
            let now = now_rfc3339();
            r.record_action("delete", &rid.0, &auth.0.user_id, &now);
            let txn = shoal_compute::usage::bury(
                Txn::new().when(tables::SERVERS, &id, Expect::Revision(v.revision)),
                &r,
                &now,
            );
            if !state
                .state
                .write(tables::SERVERS, txn)
                .await
                .map_err(nova_err)?
                .succeeded
            {
                state.cluster.read_barrier().await.map_err(nova_err)?;
                continue;
            }
            drop_images(&state, &r).await;
            return Ok(StatusCode::NO_CONTENT);
        }
        if r.task_state == Some(TaskState::Deleting) {
            return Ok(StatusCode::NO_CONTENT);
        }
        if r.locked && !is_admin(&auth) {
            return Err(locked(&id));
        }
        r.request(Action::Delete).expect("delete is always allowed");
        r.record_action("delete", &rid.0, &auth.0.user_id, &now_rfc3339());
        // The ports go now, as Nova deletes the ports it made; the host's agent tears the
        // domain down when it sees the row.
        release_ports(&state, std::slice::from_ref(&r)).await;
        r.updated = now_rfc3339();
        if servers(&state)
            .put_at(&id, &r, v.revision)
            .await
            .map_err(nova_err)?
            .is_some()
        {
            drop_images(&state, &r).await;
            return Ok(StatusCode::NO_CONTENT);
        }
        state.cluster.read_barrier().await.map_err(nova_err)?;
    }
    Err(ApiError::conflict(format!("Instance {id} kept changing; retry the delete")).nova())
}

/// The images a deleted server leaves behind that go with it, as Nova deletes them: a shelved
/// server's image, and the image of a snapshot or shelve still in progress.
async fn drop_images(state: &AppState, r: &ServerRecord) {
    let shelved = r.shelved.as_ref().map(|s| s.image_id.as_str());
    for image in shelved.into_iter().chain(r.snapshot_image.as_deref()) {
        if let Err(e) = crate::api::glance::images::delete_for_service(state, image).await {
            tracing::warn!(server = %r.id, image, error = %e.message, "cannot delete the server's image");
        }
    }
}

async fn action(
    State(state): State<AppState>,
    auth: Auth,
    rid: RequestId,
    mv: Microversion,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<axum::response::Response> {
    use axum::response::IntoResponse;
    need(&auth, "member")?;
    let body: serde_json::Map<String, Value> = parse(&body)?;
    if body.len() != 1 {
        return Err(bad("an action body has exactly one action"));
    }
    let (name, arg) = body.into_iter().next().expect("one entry");
    let act = match name.as_str() {
        "os-stop" => Action::Stop,
        "os-start" => Action::Start,
        "pause" => Action::Pause,
        "unpause" => Action::Unpause,
        "suspend" => Action::Suspend,
        "resume" => Action::Resume,
        "reboot" => {
            let kind = arg
                .get("type")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("reboot needs a type, SOFT or HARD"))?;
            match kind.to_ascii_uppercase().as_str() {
                "SOFT" => Action::Reboot { hard: false },
                "HARD" => Action::Reboot { hard: true },
                _ => return Err(bad(format!("Invalid input for field/attribute type. Value: {kind}. '{kind}' is not one of ['HARD', 'Hard', 'SOFT', 'Soft']"))),
            }
        }
        "rebuild" => return rebuild(&state, &auth, &rid, mv, &id, &arg).await,
        "createImage" => return create_image(&state, &auth, &rid, &id, &arg).await,
        "createBackup" => return create_backup(&state, &auth, &rid, &id, &arg).await,
        "shelve" => return shelve(&state, &auth, &rid, &id, &arg).await,
        "rescue" => return super::migrations::rescue(&state, &auth, &rid, &id, &arg).await,
        "unrescue" => {
            return super::migrations::simple(&state, &auth, &rid, &id, &arg, Action::Unrescue)
                .await
        }
        "confirmResize" => {
            return super::migrations::simple(&state, &auth, &rid, &id, &arg, Action::ConfirmResize)
                .await
        }
        "revertResize" => {
            return super::migrations::simple(&state, &auth, &rid, &id, &arg, Action::RevertResize)
                .await
        }
        "resize" => return super::migrations::resize(&state, &auth, &rid, &id, &arg, false).await,
        "migrate" => return super::migrations::resize(&state, &auth, &rid, &id, &arg, true).await,
        "unshelve" => return unshelve(&state, &auth, &rid, &id, &arg).await,
        "evacuate" => return super::evacuate::evacuate(&state, &auth, &rid, mv, &id, &arg).await,
        "shelveOffload" => {
            // Admin only, as Nova's default policy.
            need(&auth, "admin")?;
            no_argument(&name, &arg)?;
            Action::ShelveOffload
        }
        "os-resetState" => {
            // Admin only (Nova's default policy): the state is set, the task dropped, and
            // nothing is done to the domain.
            need(&auth, "admin")?;
            let vm_state = match arg.get("state").and_then(Value::as_str) {
                Some("active") => VmState::Active,
                Some("error") => VmState::Error,
                other => {
                    return Err(bad(format!(
                        "Invalid input for field/attribute state. Value: {}. It is not one of ['active', 'error']",
                        other.unwrap_or("null")
                    )))
                }
            };
            modify(&state, &auth, &id, |r| {
                r.vm_state = vm_state;
                r.task_state = None;
                Ok(())
            })
            .await?;
            return Ok(StatusCode::ACCEPTED.into_response());
        }
        "injectNetworkInfo" => {
            // Admin only. Nova's libvirt driver has nothing to inject into a running guest
            // (its network configuration comes from DHCP, the config drive or the metadata
            // service), and neither has Shoal's: the call is accepted once the server exists.
            need(&auth, "admin")?;
            load(&state, &auth, &id).await?;
            return Ok(StatusCode::ACCEPTED.into_response());
        }
        "os-getConsoleOutput" => {
            let length = match arg.get("length") {
                None | Some(Value::Null) => None,
                Some(Value::Number(n)) => n.as_i64(),
                Some(Value::String(s)) => s.parse::<i64>().ok(),
                _ => return Err(bad("length must be an integer")),
            };
            let v = load(&state, &auth, &id).await?;
            let output = console_output(&state, &v.value, length).await?;
            return Ok(Json(json!({ "output": output })).into_response());
        }
        "trigger_crash_dump" => {
            return trigger_crash_dump(&state, &auth, &rid, mv, &id, &arg).await;
        }
        "lock" | "unlock" => {
            let locked = name == "lock";
            modify(&state, &auth, &id, |r| {
                r.locked = locked;
                r.record_action(&name, &rid.0, &auth.0.user_id, &now_rfc3339());
                Ok(())
            })
            .await?;
            return Ok(StatusCode::ACCEPTED.into_response());
        }
        "addSecurityGroup" | "removeSecurityGroup" => {
            let group = arg
                .get("name")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
                .ok_or_else(|| bad(format!("{name} needs the name of a security group")))?;
            let add = name == "addSecurityGroup";
            server_group_membership(&state, &auth, &id, group, add).await?;
            return Ok(StatusCode::ACCEPTED.into_response());
        }
        "forceDelete" | "restore" => {
            // Deletes are immediate (no reclaim interval): nothing is ever soft-deleted.
            load(&state, &auth, &id).await?;
            return Err(ApiError::conflict(format!(
                "Cannot '{name}' instance {id}: it is not soft-deleted (Shoal deletes at once)"
            ))
            .nova());
        }
        other => {
            // An unknown server is a 404 whatever the action, as in Nova.
            load(&state, &auth, &id).await?;
            return Err(bad(format!("There is no such action: {other}")));
        }
    };
    let admin = is_admin(&auth);
    modify(&state, &auth, &id, |r| {
        if r.host.is_none() {
            return Err(ApiError::conflict(format!(
                "Cannot '{name}' instance {id} while it is in vm_state {}",
                r.vm_state.as_str()
            ))
            .nova());
        }
        if r.locked && !admin {
            return Err(locked(&id));
        }
        r.request(act)
            .map_err(|c| ApiError::conflict(c.to_string()).nova())?;
        r.record_action(act.name(), &rid.0, &auth.0.user_id, &now_rfc3339());
        Ok(())
    })
    .await?;
    Ok(StatusCode::ACCEPTED.into_response())
}

/// `rebuild`: the server's disks are written again from `imageRef` (the image it has or
/// another), its name, metadata and access addresses replaced when given; the compute agent of
/// its host does the rest and leaves it as it found it, running or stopped. Answers 202 with
/// the server and its new `adminPass`, as Nova does.
async fn rebuild(
    state: &AppState,
    auth: &Auth,
    rid: &RequestId,
    mv: Microversion,
    id: &str,
    arg: &Value,
) -> ApiResult<axum::response::Response> {
    use axum::response::IntoResponse;
    let Some(arg) = arg.as_object() else {
        return Err(bad("rebuild takes an object"));
    };
    let description = description_arg(arg.get("description"), mv)?;
    let text = |field: &str| -> ApiResult<Option<String>> {
        match arg.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(t)) => Ok(Some(t.clone())),
            Some(_) => Err(bad(format!(
                "Invalid input for field/attribute {field}. It must be a string"
            ))),
        }
    };
    let image_id = text("imageRef")?
        .filter(|i| !i.trim().is_empty())
        .ok_or_else(|| bad("Invalid input for field/attribute imageRef: it is required"))?;
    let name = text("name")?;
    if let Some(n) = &name {
        if n.trim().is_empty() || n.chars().count() > 255 {
            return Err(bad(
                "Invalid input for field/attribute name. Value must be 1 to 255 characters",
            ));
        }
    }
    let metadata: Option<BTreeMap<String, String>> = match arg.get("metadata") {
        None | Some(Value::Null) => None,
        Some(m) => Some(serde_json::from_value(m.clone()).map_err(|_| {
            bad("Invalid input for field/attribute metadata: an object of strings is expected")
        })?),
    };
    if let Some(m) = &metadata {
        super::server_meta::check_items(m)?;
    }
    let access_ipv4 = access_ip(text("accessIPv4")?.as_deref(), false)?;
    let access_ipv6 = access_ip(text("accessIPv6")?.as_deref(), true)?;
    let admin_pass = match text("adminPass")? {
        Some(p) if p.len() > 255 => return Err(bad("adminPass is too long")),
        Some(p) => p,
        None => uuid::Uuid::new_v4().simple().to_string()[..12].to_owned(),
    };
    match arg.get("preserve_ephemeral") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => {}
        Some(Value::Bool(true)) => {
            return Err(bad(
                "The current driver does not support preserving ephemeral partitions.",
            ))
        }
        Some(v) => {
            return Err(bad(format!(
            "Invalid input for field/attribute preserve_ephemeral. Value: {v}. It is not a boolean"
        )))
        }
    }
    let current = load(state, auth, id).await?.value;
    let image = snapshot_image(state, auth, &image_id, &current.flavor).await?;
    let admin = is_admin(auth);
    let r = modify(state, auth, id, |r| {
        if r.locked && !admin {
            return Err(locked(id));
        }
        if r.host.is_none() {
            return Err(ApiError::conflict(format!(
                "Cannot 'rebuild' instance {id} while it is in vm_state {}",
                r.vm_state.as_str()
            ))
            .nova());
        }
        r.request(Action::Rebuild)
            .map_err(|c| ApiError::conflict(c.to_string()).nova())?;
        r.image = image.clone();
        if let Some(n) = &name {
            r.name = n.trim().to_owned();
        }
        if let Some(m) = &metadata {
            r.metadata = m.clone();
        }
        if let Some(ip) = &access_ipv4 {
            r.access_ipv4 = ip.clone();
        }
        if let Some(ip) = &access_ipv6 {
            r.access_ipv6 = ip.clone();
        }
        if let Some(d) = &description {
            r.description = d.clone();
        }
        r.record_action("rebuild", &rid.0, &auth.0.user_id, &now_rfc3339());
        Ok(())
    })
    .await?;
    // The answer is the server as the update answer shows it (Nova's rebuild view).
    let mut server = server_json_basic(state, &r, mv);
    server["adminPass"] = json!(admin_pass);
    Ok((StatusCode::ACCEPTED, Json(json!({ "server": server }))).into_response())
}

/// `trigger_crash_dump` (microversion 2.17; below it Nova has no such action for this
/// version: 404): for a placed server, ACTIVE, PAUSED or ERROR with no task, not locked
/// against the caller. The host's agent injects the NMI; the answer is 202 at once.
async fn trigger_crash_dump(
    state: &AppState,
    auth: &Auth,
    rid: &RequestId,
    mv: Microversion,
    id: &str,
    arg: &Value,
) -> ApiResult<axum::response::Response> {
    use axum::response::IntoResponse;
    if mv < V2_17 {
        return Err(ApiError::not_found(format!(
            "The action trigger_crash_dump needs microversion {V2_17} or later"
        ))
        .nova());
    }
    if !arg.is_null() {
        return Err(bad(format!(
            "Invalid input for field/attribute trigger_crash_dump. Value: {arg}. {arg} is not \
             of type 'null'"
        )));
    }
    let admin = is_admin(auth);
    modify(state, auth, id, |r| {
        if r.locked && !admin {
            return Err(locked(id));
        }
        if r.host.is_none() {
            return Err(ApiError::conflict(format!("Instance {id} is not ready")).nova());
        }
        let state_ok = matches!(
            r.vm_state,
            VmState::Active | VmState::Paused | VmState::Error
        );
        if !state_ok || r.task_state.is_some() {
            let (what, value) = match r.task_state {
                Some(t) if state_ok => ("task_state", t.as_str()),
                _ => ("vm_state", r.vm_state.as_str()),
            };
            return Err(ApiError::conflict(format!(
                "Cannot 'trigger_crash_dump' instance {id} while it is in {what} {value}"
            ))
            .nova());
        }
        r.crash_dump = Some(rid.0.clone());
        r.record_action(
            "trigger_crash_dump",
            &rid.0,
            &auth.0.user_id,
            &now_rfc3339(),
        );
        Ok(())
    })
    .await?;
    Ok(StatusCode::ACCEPTED.into_response())
}

/// The image a snapshot of `r` (by `user_id`) is written to: Glance's record, `queued`, owned
/// by the server's project and private, with the properties Nova gives snapshots
/// (`shoal_compute::snapshot::snapshot_meta`); written here, its bytes come from the agent.
async fn snapshot_record(
    state: &AppState,
    r: &ServerRecord,
    user_id: &str,
    name: &str,
    metadata: &BTreeMap<String, String>,
    backup: Option<&Backup>,
) -> ApiResult<shoal_images::record::ImageRecord> {
    use shoal_compute::snapshot::{snapshot_meta, SourceImage};
    use shoal_images::record::{Caller, ImageRecord, Visibility};
    let source = match crate::api::glance::images::load(state, &r.image.id).await {
        Ok((img, _)) => Some(SourceImage {
            min_ram: img.min_ram,
            min_disk: img.min_disk,
            disk_format: img.disk_format,
            properties: img.properties,
        }),
        Err(e) if e.status == StatusCode::NOT_FOUND => None,
        Err(e) => return Err(e.nova()),
    };
    let meta = snapshot_meta(r, user_id, source.as_ref(), metadata);
    let caller = Caller {
        admin: true,
        project: Some(r.project_id.clone()),
    };
    let mut img = ImageRecord::create(
        &json!({ "name": name }),
        &caller,
        shoal_state::time::now_secs(),
        || uuid::Uuid::new_v4().to_string(),
    )
    .map_err(|e| bad(e.to_string()))?;
    img.visibility = Visibility::Private;
    img.min_ram = meta.min_ram;
    img.min_disk = meta.min_disk;
    img.properties = meta.properties;
    if let Some(b) = backup {
        // Nova's `backup`: `image_type` backup and the backup's type, which rotation selects by.
        img.properties
            .insert("image_type".to_owned(), "backup".to_owned());
        img.properties
            .insert("backup_type".to_owned(), b.backup_type.clone());
    }
    let txn = Txn::new()
        .when(tables::IMAGES, &img.id, Expect::Absent)
        .put(
            tables::IMAGES,
            &img.id,
            serde_json::to_vec(&img).expect("image records serialise"),
        );
    if !state.cluster.write(txn).await.map_err(nova_err)?.succeeded {
        return Err(ApiError::conflict("the snapshot's image id was taken; retry").nova());
    }
    Ok(img)
}

/// Sets `action` on the server with `image` as the image it writes, or deletes the image if
/// the server refuses (its state, its lock, a concurrent change).
async fn start_snapshot(
    state: &AppState,
    auth: &Auth,
    rid: &RequestId,
    id: &str,
    action: Action,
    image: &str,
    backup: Option<Backup>,
) -> ApiResult<()> {
    let admin = is_admin(auth);
    let started = modify(state, auth, id, |r| {
        if r.host.is_none() {
            return Err(ApiError::conflict(format!(
                "Cannot '{}' instance {id} while it is in vm_state {}",
                action.name(),
                r.vm_state.as_str()
            ))
            .nova());
        }
        if action == Action::Shelve && r.locked && !admin {
            return Err(locked(id));
        }
        r.request(action)
            .map_err(|c| ApiError::conflict(c.to_string()).nova())?;
        r.snapshot_image = Some(image.to_owned());
        r.backup = backup.clone();
        r.record_action(action.name(), &rid.0, &auth.0.user_id, &now_rfc3339());
        Ok(())
    })
    .await;
    if let Err(e) = started {
        if let Err(d) = crate::api::glance::images::delete_for_service(state, image).await {
            tracing::warn!(image, error = %d.message, "cannot delete an unused snapshot image");
        }
        return Err(e);
    }
    Ok(())
}

/// Refuses `action` early when the server's state forbids it (before an image is created for
/// it); the compare-and-set in [`start_snapshot`] decides for good.
fn precheck(auth: &Auth, r: &ServerRecord, action: Action) -> ApiResult<()> {
    if !matches!(action, Action::CreateImage | Action::CreateBackup) && r.locked && !is_admin(auth)
    {
        return Err(locked(&r.id));
    }
    let mut probe = r.clone();
    if r.host.is_none() && action != Action::Unshelve {
        return Err(ApiError::conflict(format!(
            "Cannot '{}' instance {} while it is in vm_state {}",
            action.name(),
            r.id,
            r.vm_state.as_str()
        ))
        .nova());
    }
    probe
        .request(action)
        .map_err(|c| ApiError::conflict(c.to_string()).nova())
}

/// An action that takes no argument: `null`, or an empty object as Tempest and older clients
/// send.
pub(super) fn no_argument(action: &str, arg: &Value) -> ApiResult<()> {
    match arg {
        Value::Null => Ok(()),
        Value::Object(o) if o.is_empty() => Ok(()),
        other => Err(bad(format!(
            "Invalid input for field/attribute {action}. Value: {other}. It takes no argument"
        ))),
    }
}

/// `createImage`: a snapshot of the server's root disk as a new image ([`snapshot_action`]).
async fn create_image(
    state: &AppState,
    auth: &Auth,
    rid: &RequestId,
    id: &str,
    arg: &Value,
) -> ApiResult<axum::response::Response> {
    let (name, metadata) = image_request(arg, "createImage", &[])?;
    snapshot_action(state, auth, rid, id, &name, &metadata, None).await
}

/// `createBackup` (Nova's `_create_backup`): a snapshot as `createImage` takes it, its image
/// marked `image_type` backup with the `backup_type`; once it is uploaded, the host's agent
/// deletes this server's backups of that type beyond the newest `rotation` (0: all of them,
/// the new one too). Answers 202, with the image in `Location` unless `rotation` is 0.
async fn create_backup(
    state: &AppState,
    auth: &Auth,
    rid: &RequestId,
    id: &str,
    arg: &Value,
) -> ApiResult<axum::response::Response> {
    let (name, metadata) = image_request(arg, "createBackup", &["backup_type", "rotation"])?;
    let backup_type = match &arg["backup_type"] {
        Value::String(t) => t.clone(),
        v => {
            return Err(bad(format!(
                "Invalid input for field/attribute backup_type. Value: {v}. {v} is not of type 'string'"
            )))
        }
    };
    let rotation = match &arg["rotation"] {
        Value::Number(n) if n.is_u64() => n.as_u64(),
        Value::String(t) if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) => {
            t.parse::<u64>().ok()
        }
        _ => None,
    };
    let Some(rotation) = rotation else {
        let v = &arg["rotation"];
        return Err(bad(format!(
            "Invalid input for field/attribute rotation. Value: {v}. {v} is not a non-negative integer"
        )));
    };
    let backup = Backup {
        backup_type,
        rotation,
    };
    snapshot_action(state, auth, rid, id, &name, &metadata, Some(backup)).await
}

/// The `name` and `metadata` of a `createImage` or `createBackup`, checked as Nova's schema
/// checks them; `more` are the other properties the action requires.
fn image_request(
    arg: &Value,
    action: &str,
    more: &[&str],
) -> ApiResult<(String, BTreeMap<String, String>)> {
    let Some(arg) = arg.as_object() else {
        return Err(bad(format!(
            "Invalid input for field/attribute {action}. Value: it must be an object"
        )));
    };
    if let Some(k) = arg
        .keys()
        .find(|k| !matches!(k.as_str(), "name" | "metadata") && !more.contains(&k.as_str()))
    {
        return Err(bad(format!(
            "Invalid input for field/attribute {action}. Additional properties are not allowed ('{k}' was unexpected)"
        )));
    }
    if let Some(k) = ["name"].iter().chain(more).find(|k| !arg.contains_key(**k)) {
        return Err(bad(format!(
            "Invalid input for field/attribute {action}. '{k}' is a required property"
        )));
    }
    let name = match &arg["name"] {
        Value::String(n) => n.clone(),
        v => {
            return Err(bad(format!(
                "Invalid input for field/attribute name. Value: {v}. It is not a string"
            )))
        }
    };
    if name.is_empty() || name.chars().count() > 255 || name.trim() != name {
        return Err(bad(format!(
            "Invalid input for field/attribute name. Value: {}. It must be 1 to 255 characters with no leading or trailing whitespace",
            name.chars().take(64).collect::<String>()
        )));
    }
    let metadata: BTreeMap<String, String> = match arg.get("metadata") {
        None => BTreeMap::new(),
        Some(m) => serde_json::from_value(m.clone()).map_err(|_| {
            bad("Invalid input for field/attribute metadata: an object of strings is expected")
        })?,
    };
    super::server_meta::check_items(&metadata)?;
    if metadata.len() > shoal_images::record::MAX_PROPERTIES {
        return Err(ApiError::forbidden("Image metadata limit exceeded").nova());
    }
    Ok((name, metadata))
}

/// `createImage` (Nova's `_action_create_image`), and `createBackup` with `backup`: the image
/// is created `queued` with Nova's snapshot properties and the server's task set to
/// `image_snapshot` (`image_backup`); its host's agent flattens the disk and uploads it.
/// Answers 202 with the image's URL in `Location` (the body of 2.45 and later is not served:
/// Shoal serves 2.1); a backup with rotation 0 has no `Location`, as in Nova.
async fn snapshot_action(
    state: &AppState,
    auth: &Auth,
    rid: &RequestId,
    id: &str,
    name: &str,
    metadata: &BTreeMap<String, String>,
    backup: Option<Backup>,
) -> ApiResult<axum::response::Response> {
    use axum::response::IntoResponse;
    let action = match backup {
        Some(_) => Action::CreateBackup,
        None => Action::CreateImage,
    };
    let v = load(state, auth, id).await?;
    precheck(auth, &v.value, action)?;
    let img = snapshot_record(
        state,
        &v.value,
        &auth.0.user_id,
        name,
        metadata,
        backup.as_ref(),
    )
    .await?;
    let located = backup.as_ref().is_none_or(|b| b.rotation > 0);
    start_snapshot(state, auth, rid, id, action, &img.id, backup).await?;
    let mut resp = StatusCode::ACCEPTED.into_response();
    if located {
        if let Ok(loc) = format!("{}/image/v2/images/{}", state.base_url, img.id).parse() {
            resp.headers_mut().insert(axum::http::header::LOCATION, loc);
        }
    }
    Ok(resp)
}

/// `shelve`: the server is powered off and its disk saved as the `<name>-shelved` image (then
/// offloaded, with `shelved_offload_time` 0), by its host's agent.
async fn shelve(
    state: &AppState,
    auth: &Auth,
    rid: &RequestId,
    id: &str,
    arg: &Value,
) -> ApiResult<axum::response::Response> {
    use axum::response::IntoResponse;
    no_argument("shelve", arg)?;
    let v = load(state, auth, id).await?;
    precheck(auth, &v.value, Action::Shelve)?;
    let name = shoal_compute::snapshot::shelved_name(&v.value);
    let img = snapshot_record(
        state,
        &v.value,
        &auth.0.user_id,
        &name,
        &BTreeMap::new(),
        None,
    )
    .await?;
    start_snapshot(state, auth, rid, id, Action::Shelve, &img.id, None).await?;
    Ok(StatusCode::ACCEPTED.into_response())
}

/// `unshelve`: a server still on its host is started there; an offloaded one is placed again
/// as a create is (the claim committed with the row), and the chosen host's agent spawns it
/// from the shelve image. When no host fits, the server stays shelved-offloaded, as Nova's
/// conductor leaves it.
async fn unshelve(
    state: &AppState,
    auth: &Auth,
    rid: &RequestId,
    id: &str,
    arg: &Value,
) -> ApiResult<axum::response::Response> {
    use axum::response::IntoResponse;
    match arg {
        Value::Null => {}
        Value::Object(o) if o.is_empty() => {}
        _ => {
            return Err(bad(
                "Invalid input for field/attribute unshelve. Value: it must be null (an availability_zone needs microversion 2.77, which Shoal does not serve)",
            ))
        }
    }
    let admin = is_admin(auth);
    modify(state, auth, id, |r| {
        if r.locked && !admin {
            return Err(locked(id));
        }
        r.request(Action::Unshelve)
            .map_err(|c| ApiError::conflict(c.to_string()).nova())?;
        r.record_action("unshelve", &rid.0, &auth.0.user_id, &now_rfc3339());
        Ok(())
    })
    .await?;
    // The row is read after a barrier: `modify`'s write may have been committed through the
    // leader and not yet applied to this node's replica, and a stale read (no task) would
    // leave the server unplaced. A write that lands between the read and the placement moves
    // the row's revision, and the placement then places nothing: read again and place again,
    // until the row is placed or no longer waits for it.
    for _ in 0..UNSHELVE_ATTEMPTS {
        state.state.read_barrier().await.map_err(nova_err)?;
        let v = load(state, auth, id).await?;
        if v.value.host.is_some() || v.value.task_state != Some(TaskState::Unshelving) {
            return Ok(StatusCode::ACCEPTED.into_response());
        }
        place_unshelve(state, id, admin, v).await?;
    }
    tracing::warn!(server = %id, "the unshelve kept losing to concurrent writes of its row");
    Ok(StatusCode::ACCEPTED.into_response())
}

/// How many times an unshelve reads its row again after a concurrent write (see `unshelve`).
const UNSHELVE_ATTEMPTS: usize = 10;

/// Schedules and claims an offloaded server's unshelve, conditioned on row revision
/// `v.revision`; with no valid host, the server stays offloaded with an `Error` event.
async fn place_unshelve(
    state: &AppState,
    id: &str,
    admin: bool,
    v: shoal_state::Versioned<ServerRecord>,
) -> ApiResult<()> {
    let r = v.value;
    let f = &r.flavor;
    let zone = (r.availability_zone != "nova").then(|| r.availability_zone.clone());
    // The server's group holds again, as Nova's request spec carries it into the unshelve.
    let group_id = group_of(state, &r).await?;
    let request = |members: Vec<String>, policy: Option<GroupPolicy>| Request {
        instance_ids: vec![r.id.clone()],
        flavor: shoal_scheduler::Flavor {
            name: f.name.clone(),
            vcpus: f.vcpus,
            ram_mb: f.ram_mb,
            root_gb: f.disk_gb,
            ephemeral_gb: f.ephemeral_gb,
            swap_mb: f.swap_mb,
            extra_specs: f.extra_specs.clone(),
        },
        image: Default::default(),
        availability_zone: zone.clone(),
        is_admin: admin,
        hints: SchedulerHints {
            group: policy.map(|policy| ServerGroup {
                policy,
                members: members.clone(),
                max_server_per_host: None,
            }),
            ..SchedulerHints::default()
        },
    };
    let placed = place_servers(
        state,
        std::slice::from_ref(&r),
        &Some(vec![v.revision]),
        group_id.as_deref(),
        &r.project_id,
        TaskState::Unshelving,
        request,
    )
    .await;
    // `Exists` cannot come back for rows placed by revision (a changed row is "nothing to
    // place"); only a fault leaves the server offloaded.
    if let Err(PlaceFailure::Fault(_, why)) = placed {
        tracing::info!(server = %id, reason = %why, "no host for the unshelve");
        let mut back = r.clone();
        back.task_state = None;
        back.updated = now_rfc3339();
        if let Some(last) = back.actions.last_mut() {
            let now = now_rfc3339();
            last.events.push(shoal_compute::server::ActionEvent {
                event: "schedule_instances".into(),
                start_time: now.clone(),
                finish_time: Some(now),
                result: Some("Error".into()),
            });
        }
        servers(state)
            .put_at(id, &back, v.revision)
            .await
            .map_err(nova_err)?;
    }
    Ok(())
}

/// The security groups the caller sees.
async fn visible_groups(
    state: &AppState,
    auth: &Auth,
) -> ApiResult<Vec<shoal_network::records::SecurityGroupRecord>> {
    state
        .network
        .list_security_groups(&network_caller(auth))
        .await
        .map_err(nova_err_net)
}

/// The security group a server request names (an id, or a name unique among the groups the
/// caller sees), as `(id, name)`; Nova's 400 when there is none, 409 when a name is ambiguous.
fn find_group(
    groups: &[shoal_network::records::SecurityGroupRecord],
    auth: &Auth,
    name: &str,
) -> ApiResult<(String, String)> {
    if let Some(g) = groups.iter().find(|g| g.id == name) {
        return Ok((g.id.clone(), g.name.clone()));
    }
    // The caller's own groups first: `default` names the project's own default group.
    let mine: Vec<_> = groups
        .iter()
        .filter(|g| g.name == name && auth.0.project_id.as_deref() == Some(g.project_id.as_str()))
        .collect();
    let named: Vec<_> = if mine.is_empty() {
        groups.iter().filter(|g| g.name == name).collect()
    } else {
        mine
    };
    match named.as_slice() {
        [g] => Ok((g.id.clone(), g.name.clone())),
        [] => Err(bad(format!("Security group {name} not found."))),
        _ => Err(ApiError::conflict(format!(
            "Multiple security groups found matching '{name}'. Use an ID to be more specific."
        ))
        .nova()),
    }
}

/// `addSecurityGroup` / `removeSecurityGroup`: the group joins (leaves) every port of the
/// server, then the server's list. As Nova answers: a group already on the server (or not on
/// it, for a removal) is a 400; a server with no port takes the group on its record only.
async fn server_group_membership(
    state: &AppState,
    auth: &Auth,
    id: &str,
    group: &str,
    add: bool,
) -> ApiResult<()> {
    let v = load(state, auth, id).await?;
    if v.value.locked && !is_admin(auth) {
        return Err(locked(id));
    }
    let (group_id, group_name) = find_group(&visible_groups(state, auth).await?, auth, group)?;
    let listed = v.value.security_groups.contains(&group_name);
    if add && listed {
        return Err(bad(format!(
            "Security group {group_name} is already associated with the instance {id}"
        )));
    }
    if !add && !listed {
        return Err(bad(format!(
            "Security group {group_name} not associated with the instance {id}"
        )));
    }
    let caller = network_caller(auth);
    for p in &v.value.ports {
        let port = state
            .network
            .port(&caller, &p.port_id)
            .await
            .map_err(nova_err_net)?;
        let mut ids = port.security_groups.clone();
        ids.retain(|g| *g != group_id);
        if add {
            ids.push(group_id.clone());
        }
        if ids != port.security_groups {
            let req = shoal_network::PortUpdate {
                security_groups: Some(ids),
                ..Default::default()
            };
            state
                .network
                .update_port(&caller, &p.port_id, req)
                .await
                .map_err(nova_err_net)?;
        }
    }
    modify(state, auth, id, |r| {
        r.security_groups.retain(|g| *g != group_name);
        if add {
            r.security_groups.push(group_name.clone());
        }
        Ok(())
    })
    .await?;
    Ok(())
}

/// The serial console's log, from the node the server runs on (fetched from its peer API
/// when that is another node), cut to the last `length` lines.
async fn console_output(
    state: &AppState,
    r: &ServerRecord,
    length: Option<i64>,
) -> ApiResult<String> {
    let Some(host) = r.host.as_deref() else {
        return Err(
            ApiError::conflict(format!("Instance {} is not placed on a host yet", r.id)).nova(),
        );
    };
    let unavailable = |e: &dyn std::fmt::Display| {
        ApiError::conflict(format!("The console log of {} is not available: {e}", r.id)).nova()
    };
    let bytes = if host == state.images.node_name() {
        shoal_images::peer::read_console(&state.instances_path, &r.id)
            .await
            .map_err(|e| unavailable(&e))?
            .unwrap_or_default()
    } else {
        let uuid = uuid::Uuid::parse_str(&r.id).map_err(|e| unavailable(&e))?;
        match shoal_images::peer::console_log(&state.cluster, host, &uuid).await {
            Ok(b) => b.to_vec(),
            Err(shoal_images::peer::TransferError::NotFound { .. }) => Vec::new(),
            Err(e) => return Err(unavailable(&e)),
        }
    };
    let text = String::from_utf8_lossy(&bytes).into_owned();
    Ok(match length {
        Some(n) if n >= 0 => {
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(n as usize);
            lines[from..].join("\n")
        }
        _ => text,
    })
}

#[cfg(test)]
mod tests {
    use shoal_compute::service::ServiceState;

    use super::*;
    use crate::api::nova::version::V2_18;

    #[test]
    fn host_status_follows_nova() {
        let up = ServiceState::default();
        assert_eq!(host_status_of(&up, true), "UP");
        assert_eq!(host_status_of(&up, false), "UNKNOWN");
        let disabled = ServiceState {
            disabled: true,
            ..Default::default()
        };
        assert_eq!(host_status_of(&disabled, true), "MAINTENANCE");
        let forced = ServiceState {
            disabled: true,
            forced_down: true,
            ..Default::default()
        };
        // Forced down wins over disabled, and over a healthy heartbeat.
        assert_eq!(host_status_of(&forced, true), "DOWN");
    }

    #[test]
    fn description_needs_2_19_and_nova_schema() {
        let d = json!("a web server");
        assert_eq!(description_arg(None, V2_18).unwrap(), None);
        let e = description_arg(Some(&d), V2_18).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(
            e.message.contains("'description' was unexpected"),
            "{}",
            e.message
        );
        assert_eq!(
            description_arg(Some(&d), V2_19).unwrap(),
            Some(Some("a web server".to_owned()))
        );
        assert_eq!(
            description_arg(Some(&Value::Null), V2_19).unwrap(),
            Some(None)
        );
        for bad in [json!("x".repeat(256)), json!("line\nbreak"), json!(5)] {
            assert!(description_arg(Some(&bad), V2_19).is_err(), "{bad}");
        }
        assert!(description_arg(Some(&json!("é".repeat(255))), V2_19).is_ok());
    }
}
