//! Nova's image proxy (`/compute/v2.1/images`, up to 2.35; its `metadata` calls up to 2.38):
//! the Image API's images seen through the Compute API's shapes. Nothing is stored here: every
//! call reads or changes the image rows through the Image API's own functions
//! (`api::glance::images`), with its visibility and ownership rules, and answers in Nova's
//! words (Glance's additional properties are Nova's image `metadata`).

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use shoal_images::record::{ImageRecord, ListQuery, RecordError, Status};
use shoal_state::time::{now_secs, parse_iso8601, rfc3339};

use super::server_meta::metadata_body;
use super::servers::need;
use crate::api::body::parse;
use crate::api::error::{ApiError, ApiResult};
use crate::api::glance::images::{delete_image, listed_images, load_visible, modify};
use crate::api::nova::version::{image_metadata_routes, microversion, proxy_routes};
use crate::api::{AppState, Auth};

pub fn routes() -> Router<AppState> {
    // The image proxy ends at 2.35, its metadata calls at 2.38 (Nova's
    // `MAX_IMAGE_META_PROXY_API_VERSION`); Nova answers 404 after.
    let images = Router::new()
        .route("/compute/v2.1/images", get(list))
        .route("/compute/v2.1/images/detail", get(list_detail))
        .route("/compute/v2.1/images/{id}", get(show).delete(delete))
        .layer(axum::middleware::from_fn(proxy_routes));
    let metadata = Router::new()
        .route(
            "/compute/v2.1/images/{id}/metadata",
            get(show_metadata)
                .post(merge_metadata)
                .put(replace_metadata),
        )
        .route(
            "/compute/v2.1/images/{id}/metadata/{key}",
            get(show_item).put(set_item).delete(delete_item),
        )
        .layer(axum::middleware::from_fn(image_metadata_routes));
    images
        .merge(metadata)
        .layer(axum::middleware::from_fn(microversion))
}

/// Nova's image status, from Glance's.
fn status(s: Status) -> &'static str {
    match s {
        Status::Active => "ACTIVE",
        Status::Queued | Status::Saving => "SAVING",
        Status::Killed | Status::Deactivated => "ERROR",
    }
}

/// Nova's `progress`: how far an image is from usable.
fn progress(s: Status) -> u8 {
    match s {
        Status::Queued => 25,
        Status::Saving => 50,
        Status::Active => 100,
        Status::Killed | Status::Deactivated => 0,
    }
}

fn links(state: &AppState, id: &str) -> Value {
    json!([
        {"rel": "self", "href": format!("{}/compute/v2.1/images/{id}", state.base_url)},
        {"rel": "bookmark", "href": format!("{}/compute/images/{id}", state.base_url)},
        {"rel": "alternate", "type": "application/vnd.openstack.image",
         "href": format!("{}/image/v2/images/{id}", state.base_url)},
    ])
}

fn summary(state: &AppState, img: &ImageRecord) -> Value {
    json!({
        "id": img.id,
        "name": img.name,
        "links": links(state, &img.id),
    })
}

fn detail(state: &AppState, img: &ImageRecord) -> Value {
    let mut v = json!({
        "id": img.id,
        "name": img.name,
        "status": status(img.status),
        "progress": progress(img.status),
        "minRam": img.min_ram,
        "minDisk": img.min_disk,
        "created": rfc3339(img.created_at),
        "updated": rfc3339(img.updated_at),
        "metadata": img.properties,
        "OS-EXT-IMG-SIZE:size": img.size,
        "links": links(state, &img.id),
    });
    // A snapshot names the server it was taken from, as Nova's view does.
    if let Some(server) = img.properties.get("instance_uuid") {
        v["server"] = json!({
            "id": server,
            "links": [
                {"rel": "self", "href": format!("{}/compute/v2.1/servers/{server}", state.base_url)},
                {"rel": "bookmark", "href": format!("{}/compute/servers/{server}", state.base_url)},
            ],
        });
    }
    v
}

fn image_not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("Image {id} could not be found.")).nova()
}

/// The image if the caller may see it, or Nova's 404.
async fn visible(state: &AppState, auth: &Auth, id: &str) -> ApiResult<ImageRecord> {
    need(auth, "reader")?;
    load_visible(state, auth, id)
        .await
        .map(|(img, _)| img)
        .map_err(|e| in_nova_words(e, id))
}

/// An Image API refusal in Nova's shape, with Nova's wording for a missing image.
fn in_nova_words(e: ApiError, id: &str) -> ApiError {
    match e.status {
        StatusCode::NOT_FOUND => image_not_found(id),
        _ => e.nova(),
    }
}

/// The listing's filters, as Nova's proxy takes them: `name`, `status`, `changes-since`,
/// `server`, `type`, `minRam`, `minDisk`; `limit` and `marker` page.
async fn filtered(
    state: &AppState,
    auth: &Auth,
    q: &BTreeMap<String, String>,
) -> ApiResult<Vec<ImageRecord>> {
    need(auth, "reader")?;
    let number = |key: &str| -> ApiResult<Option<u64>> {
        q.get(key)
            .map(|v| {
                v.parse::<u64>().map_err(|_| {
                    ApiError::bad_request(format!("{key} must be a non-negative integer")).nova()
                })
            })
            .transpose()
    };
    let (min_ram, min_disk, limit) = (number("minRam")?, number("minDisk")?, number("limit")?);
    let since = match q.get("changes-since") {
        None => None,
        Some(t) => Some(parse_iso8601(t).ok_or_else(|| {
            ApiError::bad_request(format!("Invalid changes-since value: {t}")).nova()
        })?),
    };
    let all = listed_images(
        state,
        auth,
        &ListQuery::parse(&[]).map_err(|e| ApiError::from(e).nova())?,
    )
    .await
    .map_err(ApiError::nova)?;
    let mut found: Vec<ImageRecord> = all
        .into_iter()
        .filter(|img| q.get("name").is_none_or(|n| img.name.as_deref() == Some(n)))
        .filter(|img| {
            q.get("status")
                .is_none_or(|s| status(img.status).eq_ignore_ascii_case(s))
        })
        .filter(|img| since.is_none_or(|t| img.updated_at as i64 >= t))
        .filter(|img| {
            q.get("server").is_none_or(|s| {
                // A server reference may be its id or its URL.
                let id = s.rsplit('/').next().unwrap_or(s);
                img.properties.get("instance_uuid").map(String::as_str) == Some(id)
            })
        })
        .filter(|img| {
            q.get("type").is_none_or(|t| {
                img.properties
                    .get("image_type")
                    .map(String::as_str)
                    .unwrap_or("image")
                    == t
            })
        })
        .filter(|img| min_ram.is_none_or(|m| img.min_ram >= m))
        .filter(|img| min_disk.is_none_or(|m| img.min_disk >= m))
        .collect();
    if let Some(marker) = q.get("marker") {
        let at = found
            .iter()
            .position(|img| img.id == *marker)
            .ok_or_else(|| ApiError::bad_request(format!("marker [{marker}] not found")).nova())?;
        found.drain(..=at);
    }
    if let Some(l) = limit {
        found.truncate(l as usize);
    }
    Ok(found)
}

async fn list(
    State(state): State<AppState>,
    auth: Auth,
    Query(q): Query<BTreeMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let found = filtered(&state, &auth, &q).await?;
    let images: Vec<Value> = found.iter().map(|i| summary(&state, i)).collect();
    Ok(Json(json!({ "images": images })))
}

async fn list_detail(
    State(state): State<AppState>,
    auth: Auth,
    Query(q): Query<BTreeMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let found = filtered(&state, &auth, &q).await?;
    let images: Vec<Value> = found.iter().map(|i| detail(&state, i)).collect();
    Ok(Json(json!({ "images": images })))
}

async fn show(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let img = visible(&state, &auth, &id).await?;
    Ok(Json(json!({ "image": detail(&state, &img) })))
}

async fn delete(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    need(&auth, "member")?;
    // The Image API's delete reads the image with its own visibility rules: one read.
    delete_image(State(state), auth, Path(id.clone()))
        .await
        .map_err(|e| in_nova_words(e, &id))
}

/// Changes the image's properties (Nova's metadata) with the Image API's own compare-and-set
/// and ownership check; returns the image as written. A refusal from `change` is answered with
/// its status and message, in Nova's shape.
async fn change_metadata(
    state: &AppState,
    auth: &Auth,
    id: &str,
    change: impl Fn(&mut BTreeMap<String, String>) -> Result<(), RecordError>,
) -> ApiResult<ImageRecord> {
    need(auth, "member")?;
    // Read first for Nova's "Image not found." wording: a 404 out of `modify` may also be the
    // closure's own (a missing metadata item), which must keep its message.
    visible(state, auth, id).await?;
    let now = now_secs();
    modify(state, auth, id, |img, _| {
        change(&mut img.properties)?;
        img.updated_at = now;
        Ok(())
    })
    .await
    .map_err(ApiError::nova)
}

async fn show_metadata(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let img = visible(&state, &auth, &id).await?;
    Ok(Json(json!({ "metadata": img.properties })))
}

async fn merge_metadata(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let add = metadata_body(&body)?;
    let img = change_metadata(&state, &auth, &id, |props| {
        props.extend(add.clone());
        Ok(())
    })
    .await?;
    Ok(Json(json!({ "metadata": img.properties })))
}

async fn replace_metadata(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let new = metadata_body(&body)?;
    let img = change_metadata(&state, &auth, &id, |props| {
        *props = new.clone();
        Ok(())
    })
    .await?;
    Ok(Json(json!({ "metadata": img.properties })))
}

fn item_missing(id: &str, key: &str) -> String {
    format!("Image {id} has no metadata item {key}")
}

async fn show_item(
    State(state): State<AppState>,
    auth: Auth,
    Path((id, key)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let img = visible(&state, &auth, &id).await?;
    let value = img
        .properties
        .get(&key)
        .ok_or_else(|| ApiError::not_found(item_missing(&id, &key)).nova())?;
    Ok(Json(json!({ "meta": { key: value } })))
}

async fn set_item(
    State(state): State<AppState>,
    auth: Auth,
    Path((id, key)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let v: Value = parse(&body).map_err(ApiError::nova)?;
    let meta = v
        .get("meta")
        .and_then(Value::as_object)
        .ok_or_else(|| ApiError::bad_request("Malformed request body: meta is required").nova())?;
    let value = match (meta.len(), meta.get(&key)) {
        (1, Some(Value::String(s))) if s.len() <= 255 => s.clone(),
        (1, Some(_)) => {
            return Err(ApiError::bad_request("a metadata value is a string of at most 255").nova())
        }
        _ => return Err(ApiError::bad_request("Request body and URI mismatch").nova()),
    };
    change_metadata(&state, &auth, &id, |props| {
        props.insert(key.clone(), value.clone());
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
    change_metadata(&state, &auth, &id, |props| {
        props
            .remove(&key)
            .map(|_| ())
            .ok_or_else(|| RecordError::NotFound(item_missing(&id, &key)))
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}
