//! Rescue, resize, cold migration and `os-migrations`: the server actions that change where
//! or from what a server boots. Each one sets the task on the server's row as the other actions
//! do; a resize or migration also places the target with the scheduler and claims the new
//! flavor there in the same transaction (docs/compute.md, "Resize and cold migration").

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{middleware, Json, Router};
use serde_json::{json, Value};
use shoal_compute::placement::{self, PlaceError};
use shoal_compute::server::{Action, FlavorSnapshot, Migration, ServerRecord};
use shoal_scheduler::{Request, ScheduleError, SchedulerHints};
use shoal_state::time::now_rfc3339;
use shoal_state::{tables, Expect};

use super::flavors::nova_err;
use super::server_meta::nova_time;
use super::servers::{
    bad, is_admin, load, locked, modify, need, no_argument, servers, snapshot_image,
};
use super::version::microversion;
use crate::api::error::{ApiError, ApiResult};
use crate::api::{AppState, Auth, RequestId};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/compute/v2.1/os-migrations", get(list))
        .layer(middleware::from_fn(microversion))
}

fn conflict(c: shoal_compute::server::Conflict) -> ApiError {
    ApiError::conflict(c.to_string()).nova()
}

/// The arguments of an action as an object (`null` is an empty one), refusing keys not in
/// `allowed`, as Nova's schemas do.
fn object<'a>(
    action: &str,
    arg: &'a Value,
    allowed: &[&str],
) -> ApiResult<Option<&'a serde_json::Map<String, Value>>> {
    let o = match arg {
        Value::Null => return Ok(None),
        Value::Object(o) => o,
        other => {
            return Err(bad(format!(
                "Invalid input for field/attribute {action}. Value: {other}. It must be an object"
            )))
        }
    };
    if let Some(k) = o.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(bad(format!(
            "Invalid input for field/attribute {action}. Additional properties are not allowed ('{k}' was unexpected)"
        )));
    }
    Ok(Some(o))
}

/// `rescue`: the server is booted from the rescue image (`rescue_image_ref`, else its own
/// image) with its disk attached second. Answers the `adminPass`, as Nova does.
pub(super) async fn rescue(
    state: &AppState,
    auth: &Auth,
    rid: &RequestId,
    id: &str,
    arg: &Value,
) -> ApiResult<Response> {
    let o = object("rescue", arg, &["adminPass", "rescue_image_ref"])?;
    let field = |name: &str| -> ApiResult<Option<String>> {
        match o.and_then(|o| o.get(name)) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(bad(format!(
                "Invalid input for field/attribute {name}. Value: {v}. It is not a string"
            ))),
        }
    };
    let pass = field("adminPass")?;
    if pass.as_ref().is_some_and(|p| p.len() > 255) {
        return Err(bad("adminPass is too long"));
    }
    let image_ref = field("rescue_image_ref")?;
    let v = load(state, auth, id).await?;
    precheck(auth, &v.value, Action::Rescue)?;
    let image = match image_ref {
        None => None,
        Some(r) => Some(snapshot_image(state, auth, &r, &v.value.flavor).await?),
    };
    let admin = is_admin(auth);
    modify(state, auth, id, |r| {
        if r.locked && !admin {
            return Err(locked(id));
        }
        r.request(Action::Rescue).map_err(conflict)?;
        r.rescue = image.clone();
        r.record_action("rescue", &rid.0, &auth.0.user_id, &now_rfc3339());
        Ok(())
    })
    .await?;
    let pass = pass.unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string()[..12].to_owned());
    Ok(Json(json!({ "adminPass": pass })).into_response())
}

/// Refuses early what the server's state forbids (the compare-and-set decides for good).
fn precheck(auth: &Auth, r: &ServerRecord, action: Action) -> ApiResult<()> {
    if r.locked && !is_admin(auth) {
        return Err(locked(&r.id));
    }
    if r.host.is_none() {
        return Err(ApiError::conflict(format!(
            "Cannot '{}' instance {} while it is in vm_state {}",
            action.name(),
            r.id,
            r.vm_state.as_str()
        ))
        .nova());
    }
    r.clone().request(action).map_err(conflict)
}

/// `unrescue`, `confirmResize` and `revertResize`: a task on the row, nothing else to decide.
/// Confirm answers 204 as Nova's does, the others 202.
pub(super) async fn simple(
    state: &AppState,
    auth: &Auth,
    rid: &RequestId,
    id: &str,
    arg: &Value,
    action: Action,
) -> ApiResult<Response> {
    no_argument(action.name(), arg)?;
    let admin = is_admin(auth);
    modify(state, auth, id, |r| {
        if r.locked && !admin {
            return Err(locked(id));
        }
        r.request(action).map_err(conflict)?;
        if let Some(m) = &mut r.migration {
            m.status = match action {
                Action::ConfirmResize => "confirming",
                _ => "reverting",
            }
            .into();
            m.updated = now_rfc3339();
        }
        r.record_action(action.name(), &rid.0, &auth.0.user_id, &now_rfc3339());
        Ok(())
    })
    .await?;
    // Nova answers a confirm with 204 and the others with 202.
    Ok(if action == Action::ConfirmResize {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::ACCEPTED
    }
    .into_response())
}

/// `resize` (`flavorRef`) and the admin's `migrate` (the same flavor, another host): the
/// scheduler picks the target with the new flavor (not the server's host unless
/// `allow_resize_to_same_host`), and the target's claim and the row's `resize_prep` commit in
/// one transaction. When no host fits, the server stays as it was and the action's event says
/// so, as Nova's conductor leaves it.
pub(super) async fn resize(
    state: &AppState,
    auth: &Auth,
    rid: &RequestId,
    id: &str,
    arg: &Value,
    migrate: bool,
) -> ApiResult<Response> {
    let action = if migrate {
        need(auth, "admin")?;
        if let Some(o) = object("migrate", arg, &["host"])? {
            if o.get("host").is_some_and(|h| !h.is_null()) {
                return Err(bad(
                    "Invalid input for field/attribute migrate. Additional properties are not allowed ('host' needs microversion 2.56, which Shoal does not serve)",
                ));
            }
        }
        Action::Migrate
    } else {
        Action::Resize
    };
    let flavor_ref = if migrate {
        None
    } else {
        let o = object("resize", arg, &["flavorRef", "OS-DCF:diskConfig"])?;
        match o.and_then(|o| o.get("flavorRef")) {
            Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            None => {
                return Err(bad(
                    "Invalid input for field/attribute resize. 'flavorRef' is a required property",
                ))
            }
            Some(v) => {
                return Err(bad(format!(
                    "Invalid input for field/attribute flavorRef. Value: {v}. It must be a non-empty string"
                )))
            }
        }
    };
    let v = load(state, auth, id).await?;
    let old = v.value.flavor.clone();
    precheck(auth, &v.value, action)?;
    let new = match &flavor_ref {
        None => old.clone(),
        Some(f) => {
            let flavor = match shoal_compute::flavor::Flavors::new(&state.state)
                .visible(f, is_admin(auth), auth.0.project_id.as_deref())
                .await
            {
                Ok(f) => f,
                Err(shoal_compute::error::ComputeError::NotFound(_)) => {
                    return Err(bad(format!("Flavor {f} could not be found.")))
                }
                Err(e) => return Err(e.into()),
            };
            FlavorSnapshot {
                id: flavor.id.clone(),
                name: flavor.name.clone(),
                vcpus: flavor.vcpus,
                ram_mb: flavor.ram,
                disk_gb: flavor.disk,
                ephemeral_gb: flavor.ephemeral,
                swap_mb: flavor.swap,
                extra_specs: flavor.extra_specs.clone(),
            }
        }
    };
    if !migrate {
        if new.id == old.id {
            return Err(bad("When resizing, instances must change flavor!"));
        }
        if new.disk_gb < old.disk_gb {
            return Err(bad("Resize error: Unable to resize disk down."));
        }
        check_quota(state, &v.value.project_id, &old, &new).await?;
    }
    let now = now_rfc3339();
    let mut r = v.value.clone();
    r.request(action).map_err(conflict)?;
    r.record_action(action.name(), &rid.0, &auth.0.user_id, &now);
    r.updated = now.clone();
    let source = r.host.clone().expect("checked above");
    let claim = Migration::claim_key(id);
    let zone = (r.availability_zone != "nova").then(|| r.availability_zone.clone());
    let request = Request {
        instance_ids: vec![claim.clone()],
        flavor: shoal_scheduler::Flavor {
            name: new.name.clone(),
            vcpus: new.vcpus,
            ram_mb: new.ram_mb,
            root_gb: new.disk_gb,
            ephemeral_gb: new.ephemeral_gb,
            swap_mb: new.swap_mb,
            extra_specs: new.extra_specs.clone(),
        },
        image: Default::default(),
        availability_zone: zone,
        is_admin: true,
        hints: SchedulerHints {
            // The DifferentHostFilter with the server itself keeps its host out.
            different_host: if state.allow_resize_to_same_host {
                Vec::new()
            } else {
                vec![id.to_owned()]
            },
            ..SchedulerHints::default()
        },
    };
    let placed = placement::place_with(
        &state.cluster,
        Some(&state.hosts),
        &request,
        |txn, claims| {
            let mut row = r.clone();
            row.migration = Some(Migration {
                id: v.revision,
                kind: if migrate { "migration" } else { "resize" }.into(),
                source_host: source.clone(),
                dest_host: claims[0].host.clone(),
                old_flavor: old.clone(),
                new_flavor: new.clone(),
                status: "pre-migrating".into(),
                old_vm_state: v.value.vm_state,
                created: now.clone(),
                updated: now.clone(),
                dest_released: false,
            });
            txn.when(tables::SERVERS, id, Expect::Revision(v.revision))
                .put(
                    tables::SERVERS,
                    id,
                    serde_json::to_vec(&row).expect("server records serialise"),
                )
        },
    )
    .await;
    match placed {
        Ok(_) => Ok(StatusCode::ACCEPTED.into_response()),
        Err(PlaceError::ExtraPrecondition { .. }) => Err(ApiError::conflict(format!(
            "Instance {id} changed while the request was handled; retry"
        ))
        .nova()),
        Err(PlaceError::InstanceExists(_)) => Err(ApiError::conflict(format!(
            "Cannot '{}' instance {id}: a migration of it is in progress",
            action.name()
        ))
        .nova()),
        Err(PlaceError::Schedule(ScheduleError::NoValidHost(why))) => {
            tracing::info!(server = %id, reason = %why, "no host for the resize");
            let mut back = v.value.clone();
            back.record_action(action.name(), &rid.0, &auth.0.user_id, &now);
            if let Some(last) = back.actions.last_mut() {
                last.events.push(shoal_compute::server::ActionEvent {
                    event: "conductor_migrate_server".into(),
                    start_time: now.clone(),
                    finish_time: Some(now_rfc3339()),
                    result: Some("Error".into()),
                });
            }
            back.updated = now_rfc3339();
            servers(state)
                .put_at(id, &back, v.revision)
                .await
                .map_err(nova_err)?;
            Ok(StatusCode::ACCEPTED.into_response())
        }
        Err(e) => {
            tracing::warn!(server = %id, error = %e, "resize placement failed");
            Err(ApiError::internal("the cluster could not commit the resize").nova())
        }
    }
}

/// A resize that adds cores or RAM needs them within the project's quota (Nova's 403).
async fn check_quota(
    state: &AppState,
    project: &str,
    old: &FlavorSnapshot,
    new: &FlavorSnapshot,
) -> ApiResult<()> {
    let quotas = shoal_compute::quota::Quotas::new(&state.state)
        .of(project)
        .await?;
    let used = super::servers::usage(state, project).await?;
    for (name, want, used) in [
        ("cores", i64::from(new.vcpus) - i64::from(old.vcpus), used.1),
        ("ram", new.ram_mb as i64 - old.ram_mb as i64, used.2),
    ] {
        let limit = quotas.get(name).copied().unwrap_or(-1);
        if want > 0 && limit >= 0 && used + want > limit {
            return Err(ApiError::forbidden(format!(
                "Quota exceeded for {name}: Requested {want}, but already used {used} of {limit} {name}"
            ))
            .nova());
        }
    }
    Ok(())
}

#[derive(Debug, serde::Deserialize)]
struct ListQuery {
    status: Option<String>,
    instance_uuid: Option<String>,
    source_compute: Option<String>,
    host: Option<String>,
    migration_type: Option<String>,
}

/// `GET /os-migrations` (admin): the migrations in progress and the ones the servers' rows
/// keep, with Nova's fields at 2.1, oldest first.
async fn list(
    State(state): State<AppState>,
    auth: Auth,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<Value>> {
    need(&auth, "admin")?;
    let mut out: Vec<(u64, Value)> = Vec::new();
    for r in servers(&state)
        .list("")
        .await
        .map_err(nova_err)?
        .into_values()
    {
        if q.instance_uuid.as_deref().is_some_and(|u| u != r.id) {
            continue;
        }
        for m in r.past_migrations.iter().chain(r.migration.iter()) {
            let keep = q.status.as_deref().is_none_or(|s| s == m.status)
                && q.source_compute
                    .as_deref()
                    .is_none_or(|h| h == m.source_host)
                && q.host
                    .as_deref()
                    .is_none_or(|h| h == m.source_host || h == m.dest_host)
                && q.migration_type.as_deref().is_none_or(|t| t == m.kind);
            if keep {
                out.push((m.id, migration_json(&r, m)));
            }
        }
    }
    out.sort_by_key(|(id, _)| *id);
    Ok(Json(
        json!({ "migrations": out.into_iter().map(|(_, v)| v).collect::<Vec<_>>() }),
    ))
}

/// A flavor's id as Nova's integer `instance_type_id`, where it is one.
fn type_id(f: &FlavorSnapshot) -> Value {
    f.id.parse::<i64>().map(Value::from).unwrap_or(Value::Null)
}

fn migration_json(r: &ServerRecord, m: &Migration) -> Value {
    json!({
        "id": m.id,
        "status": m.status,
        "instance_uuid": r.id,
        "source_compute": m.source_host,
        "source_node": m.source_host,
        "dest_compute": m.dest_host,
        "dest_node": m.dest_host,
        "dest_host": m.dest_host,
        "old_instance_type_id": type_id(&m.old_flavor),
        "new_instance_type_id": type_id(&m.new_flavor),
        "created_at": nova_time(&m.created),
        "updated_at": nova_time(&m.updated),
    })
}
