//! What hangs off a server besides its actions: its metadata (`/servers/{id}/metadata`), its
//! tags (`/servers/{id}/tags`, 2.26; the rules are the compute record's), its addresses by
//! network (`/servers/{id}/ips`), its password (`os-server-password`) and its
//! action log (`os-instance-actions`), all read from and written to the server's row.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use shoal_compute::server::{InstanceAction, ServerRecord};

use super::servers::{is_admin, load, locked, modify, need, plain_addresses};
use crate::api::body::parse;
use crate::api::error::{ApiError, ApiResult};
use crate::api::nova::version::{microversion, Microversion, V2_21, V2_26};
use crate::api::{AppState, Auth};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/compute/v2.1/servers/{id}/metadata",
            get(list_metadata)
                .post(merge_metadata)
                .put(replace_metadata),
        )
        .route(
            "/compute/v2.1/servers/{id}/metadata/{key}",
            get(show_item).put(set_item).delete(delete_item),
        )
        .route(
            "/compute/v2.1/servers/{id}/tags",
            get(list_tags).put(replace_tags).delete(clear_tags),
        )
        .route(
            "/compute/v2.1/servers/{id}/tags/{tag}",
            get(show_tag).put(add_tag).delete(remove_tag),
        )
        .route("/compute/v2.1/servers/{id}/ips", get(list_ips))
        .route("/compute/v2.1/servers/{id}/ips/{network}", get(show_ips))
        .route(
            "/compute/v2.1/servers/{id}/os-server-password",
            get(show_password).delete(clear_password),
        )
        .route(
            "/compute/v2.1/servers/{id}/os-instance-actions",
            get(list_actions),
        )
        .route(
            "/compute/v2.1/servers/{id}/os-instance-actions/{request_id}",
            get(show_action),
        )
        .layer(axum::middleware::from_fn(microversion))
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::bad_request(msg).nova()
}

/// Nova's metadata item rules: keys 1 to 255 characters, values at most 255.
pub(super) fn check_items(items: &BTreeMap<String, String>) -> ApiResult<()> {
    for (k, v) in items {
        let shown: String = k.chars().take(64).flat_map(char::escape_default).collect();
        if k.is_empty() || k.chars().count() > 255 {
            return Err(bad(format!(
                "Invalid input for field/attribute metadata. Key '{shown}' must be 1 to 255 characters"
            )));
        }
        if v.chars().count() > 255 {
            return Err(bad(format!(
                "Invalid input for field/attribute metadata. The value of '{shown}' is longer than 255 characters"
            )));
        }
    }
    Ok(())
}

/// `{"metadata": {key: value, ...}}` with string values.
/// `{"metadata": {...}}` with string values within Nova's bounds (also the image proxy's).
pub(super) fn metadata_body(body: &Bytes) -> ApiResult<BTreeMap<String, String>> {
    let mut v: serde_json::Map<String, Value> = parse(body)?;
    let items = match v.remove("metadata") {
        Some(Value::Object(m)) if v.is_empty() => m,
        _ => {
            return Err(bad(
                "the body must be {\"metadata\": {...}} and nothing else",
            ))
        }
    };
    let items = items
        .into_iter()
        .map(|(k, v)| match v {
            Value::String(s) => Ok((k, s)),
            other => Err(bad(format!(
                "Invalid input for field/attribute metadata. The value of '{}' must be a string, not {other}",
                k.chars().take(64).collect::<String>()
            ))),
        })
        .collect::<ApiResult<BTreeMap<_, _>>>()?;
    check_items(&items)?;
    Ok(items)
}

/// Applies `edit` to the server's metadata with a compare-and-set, within the project's
/// `metadata_items` quota (403 beyond it, as Nova answers).
async fn edit_metadata(
    state: &AppState,
    auth: &Auth,
    id: &str,
    edit: impl Fn(&mut BTreeMap<String, String>) -> ApiResult<()>,
) -> ApiResult<ServerRecord> {
    need(auth, "member")?;
    let admin = is_admin(auth);
    let project = load(state, auth, id).await?.value.project_id;
    let limit = crate::api::nova::admin::quota(state, &project, "metadata_items").await?;
    modify(state, auth, id, |r| {
        if r.locked && !admin {
            return Err(locked(id));
        }
        edit(&mut r.metadata)?;
        if limit >= 0 && r.metadata.len() as i64 > limit {
            return Err(ApiError::forbidden(format!(
                "Quota exceeded for metadata_items: {} items, the limit is {limit}",
                r.metadata.len()
            ))
            .nova());
        }
        Ok(())
    })
    .await
}

/// Tags are a 2.26 API: below it they are not there (Nova's 404).
fn tags_api(v: Microversion) -> ApiResult<()> {
    if v >= V2_26 {
        Ok(())
    } else {
        Err(ApiError::not_found("The resource could not be found.").nova())
    }
}

async fn list_tags(
    State(state): State<AppState>,
    auth: Auth,
    v: Microversion,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    tags_api(v)?;
    let r = load(&state, &auth, &id).await?.value;
    Ok(Json(json!({ "tags": r.tags })))
}

/// `PUT .../tags` with `{"tags": [...]}`: they become the server's tags; answers them.
async fn replace_tags(
    State(state): State<AppState>,
    auth: Auth,
    v: Microversion,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Tags {
        tags: Vec<String>,
    }
    let b: Tags = parse(&body)?;
    let r = edit_tags(&state, &auth, v, &id, |r| r.set_tags(&b.tags)).await?;
    Ok(Json(json!({ "tags": r.tags })))
}

/// Applies a tag change of the compute record (which holds the rules) with a compare-and-set.
async fn edit_tags(
    state: &AppState,
    auth: &Auth,
    v: Microversion,
    id: &str,
    edit: impl Fn(&mut ServerRecord) -> Result<(), shoal_compute::error::ComputeError>,
) -> ApiResult<ServerRecord> {
    tags_api(v)?;
    need(auth, "member")?;
    modify(state, auth, id, |r| Ok(edit(r)?)).await
}

async fn clear_tags(
    State(state): State<AppState>,
    auth: Auth,
    v: Microversion,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    edit_tags(&state, &auth, v, &id, ServerRecord::clear_tags).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET .../tags/{tag}`: 204 when the server has the tag, else 404.
async fn show_tag(
    State(state): State<AppState>,
    auth: Auth,
    v: Microversion,
    Path((id, tag)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    tags_api(v)?;
    let r = load(&state, &auth, &id).await?.value;
    if r.tags.contains(&tag) {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!("Server {id} has no tag '{tag}'")).nova())
    }
}

/// `PUT .../tags/{tag}`: 201 with the tag's `Location` when it is new, 204 when it was there.
async fn add_tag(
    State(state): State<AppState>,
    auth: Auth,
    v: Microversion,
    Path((id, tag)): Path<(String, String)>,
) -> ApiResult<axum::response::Response> {
    use axum::response::IntoResponse;
    let added = std::sync::atomic::AtomicBool::new(false);
    edit_tags(&state, &auth, v, &id, |r| {
        added.store(r.add_tag(&tag)?, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    })
    .await?;
    if added.into_inner() {
        let location = format!("{}/compute/v2.1/servers/{id}/tags/{tag}", state.base_url);
        Ok((
            StatusCode::CREATED,
            [(axum::http::header::LOCATION, location)],
        )
            .into_response())
    } else {
        Ok(StatusCode::NO_CONTENT.into_response())
    }
}

async fn remove_tag(
    State(state): State<AppState>,
    auth: Auth,
    v: Microversion,
    Path((id, tag)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    edit_tags(&state, &auth, v, &id, |r| r.remove_tag(&tag)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_metadata(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let v = load(&state, &auth, &id).await?;
    Ok(Json(json!({ "metadata": v.value.metadata })))
}

/// `POST .../metadata`: the items are added to (or replace) what is there; answers all.
async fn merge_metadata(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let items = metadata_body(&body)?;
    let r = edit_metadata(&state, &auth, &id, |m| {
        m.extend(items.clone());
        Ok(())
    })
    .await?;
    Ok(Json(json!({ "metadata": r.metadata })))
}

/// `PUT .../metadata`: the items become the whole metadata.
async fn replace_metadata(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let items = metadata_body(&body)?;
    let r = edit_metadata(&state, &auth, &id, |m| {
        *m = items.clone();
        Ok(())
    })
    .await?;
    Ok(Json(json!({ "metadata": r.metadata })))
}

fn no_item(id: &str, key: &str) -> ApiError {
    let shown: String = key
        .chars()
        .take(64)
        .flat_map(char::escape_default)
        .collect();
    ApiError::not_found(format!(
        "Metadata item {shown} was not found on instance {id}"
    ))
    .nova()
}

async fn show_item(
    State(state): State<AppState>,
    auth: Auth,
    Path((id, key)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let v = load(&state, &auth, &id).await?;
    let value = v
        .value
        .metadata
        .get(&key)
        .ok_or_else(|| no_item(&id, &key))?;
    Ok(Json(json!({ "meta": { key: value } })))
}

/// `PUT .../metadata/{key}` with `{"meta": {key: value}}`: exactly that one item.
async fn set_item(
    State(state): State<AppState>,
    auth: Auth,
    Path((id, key)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let mut v: serde_json::Map<String, Value> = parse(&body)?;
    let meta = match v.remove("meta") {
        Some(Value::Object(m)) if v.is_empty() => m,
        _ => return Err(bad("the body must be {\"meta\": {key: value}}")),
    };
    let value = match (meta.len(), meta.get(&key)) {
        (1, Some(Value::String(s))) => s.clone(),
        (1, Some(other)) => return Err(bad(format!("the value must be a string, not {other}"))),
        (1, None) => return Err(bad("Request body and URI mismatch")),
        _ => return Err(bad("Request body contains too many items")),
    };
    check_items(&BTreeMap::from([(key.clone(), value.clone())]))?;
    edit_metadata(&state, &auth, &id, |m| {
        m.insert(key.clone(), value.clone());
        Ok(())
    })
    .await?;
    Ok(Json(json!({ "meta": { key: value } })))
}

async fn delete_item(
    State(state): State<AppState>,
    auth: Auth,
    Path((id, key)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    edit_metadata(&state, &auth, &id, |m| {
        m.remove(&key).map(|_| ()).ok_or_else(|| no_item(&id, &key))
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_ips(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let v = load(&state, &auth, &id).await?;
    Ok(Json(json!({ "addresses": plain_addresses(&v.value) })))
}

async fn show_ips(
    State(state): State<AppState>,
    auth: Auth,
    Path((id, network)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let v = load(&state, &auth, &id).await?;
    let all = plain_addresses(&v.value);
    let ips = all.get(&network).cloned().ok_or_else(|| {
        let shown: String = network
            .chars()
            .take(64)
            .flat_map(char::escape_default)
            .collect();
        ApiError::not_found(format!("Instance {id} has no address on network {shown}")).nova()
    })?;
    Ok(Json(json!({ network: ips })))
}

/// `GET .../os-server-password`: the encrypted password a guest posted to the metadata
/// service. Shoal's metadata service takes no posts, so it is always empty, as Nova's answer
/// for a guest that posted none.
async fn show_password(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    load(&state, &auth, &id).await?;
    Ok(Json(json!({ "password": "" })))
}

async fn clear_password(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    need(&auth, "member")?;
    load(&state, &auth, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// An action as Nova 2.1 shows it: times without an offset, `message` null (Shoal keeps the
/// reason of a failure in the server's `fault`).
fn action_json(server: &str, a: &InstanceAction) -> Value {
    json!({
        "action": a.action,
        "instance_uuid": server,
        "message": null,
        "project_id": a.project_id,
        "request_id": a.request_id,
        "start_time": nova_time(&a.start_time),
        "user_id": a.user_id,
    })
}

/// `2026-12-06T06:30:00Z` as Nova before 2.58 writes action times: `2026-12-06T06:30:00.000000`.
pub(super) fn nova_time(rfc3339: &str) -> String {
    format!("{}.000000", rfc3339.trim_end_matches('Z'))
}

/// `GET /servers/{id}/os-instance-actions`: newest first, as Nova lists them.
/// The action log a request reads: the server's, or from microversion 2.21 the one its
/// tombstone kept (as Nova reads deleted instances there, while the tombstone is kept), with
/// the same visibility.
async fn load_for_actions(
    state: &AppState,
    auth: &Auth,
    id: &str,
    mv: Microversion,
) -> ApiResult<Vec<InstanceAction>> {
    match load(state, auth, id).await {
        Err(e) if e.status == StatusCode::NOT_FOUND && mv >= V2_21 => {
            let now = shoal_state::time::now_secs();
            let gone = state
                .state
                .table::<shoal_compute::usage::DeletedServer>(shoal_state::tables::DELETED_SERVERS)
                .get(id)
                .await
                .map_err(super::flavors::nova_err)?
                .map(|v| v.value)
                .filter(|t| !t.expired(now, state.deleted_server_retention))
                .filter(|t| is_admin(auth) || auth.0.project_id.as_deref() == Some(&t.project_id));
            gone.map(|t| t.actions).ok_or(e)
        }
        other => other.map(|v| v.value.actions),
    }
}

async fn list_actions(
    State(state): State<AppState>,
    auth: Auth,
    mv: Microversion,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let actions = load_for_actions(&state, &auth, &id, mv).await?;
    let actions: Vec<Value> = actions.iter().rev().map(|a| action_json(&id, a)).collect();
    Ok(Json(json!({ "instanceActions": actions })))
}

/// `GET /servers/{id}/os-instance-actions/{request_id}`: the action, with the compute
/// agent's events for an admin (Nova's `os-instance-actions:events` policy).
async fn show_action(
    State(state): State<AppState>,
    auth: Auth,
    mv: Microversion,
    Path((id, request_id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let actions = load_for_actions(&state, &auth, &id, mv).await?;
    let a = actions
        .iter()
        .rev()
        .find(|a| a.request_id == request_id)
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "Action {request_id} on instance {id} could not be found."
            ))
            .nova()
        })?;
    let mut body = action_json(&id, a);
    if is_admin(&auth) {
        body["events"] = a
            .events
            .iter()
            .map(|e| {
                json!({
                    "event": e.event,
                    "start_time": nova_time(&e.start_time),
                    "finish_time": e.finish_time.as_deref().map(nova_time),
                    "result": e.result,
                    "traceback": null,
                })
            })
            .collect();
    }
    Ok(Json(json!({ "instanceAction": body })))
}
