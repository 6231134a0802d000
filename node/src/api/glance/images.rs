//! Image v2 (Glance) under `/image`: version discovery, image records (create, list, show,
//! JSON-patch update, delete), tags and members, as `openstack image ...` uses them. The
//! image data calls (`PUT`/`GET /v2/images/{id}/file`) are in `file.rs`; the record and
//! the rules about it in `record.rs`.
//!
//! Every write is a Raft transaction conditioned on the revision the handler read, so
//! concurrent changes to one image cannot overwrite each other: the loser retries on the new
//! record or is told of the conflict.

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde_json::{json, Value};
use shoal_state::tables;
use shoal_state::{retry, Table, DEFAULT_ATTEMPTS};
use shoal_types::{Expect, Txn};

use crate::api::body::parse;
use crate::api::error::{ApiError, ApiResult};
use crate::api::glance::file;
use crate::api::glance::schema;
use crate::api::{AppState, Auth};
use shoal_images::manifest;
use shoal_images::policy::{can_create_image, can_modify_image, image_caller};
use shoal_images::record::{
    listed, next_link, page, visible, Caller, ImageRecord, ListQuery, Member, MemberStatus,
    RecordError, Status, Visibility,
};
use shoal_state::time::now_secs;

/// The newest Image API minor version whose calls Shoal serves (community visibility is 2.5;
/// import, 2.6, is not offered).
const CURRENT: &str = "v2.5";
const SUPPORTED: [&str; 5] = ["v2.4", "v2.3", "v2.2", "v2.1", "v2.0"];
/// Image updates are JSON patches in one of two forms: v2.1's `{"op", "path", "value"}` and
/// v2.0's `{"<op>": "<path>", "value"}` (what Tempest and older glanceclients send).
const PATCH_TYPES: [&str; 2] = ["application/openstack-images-v2.1-json-patch", PATCH_V2_0];
const PATCH_V2_0: &str = "application/openstack-images-v2.0-json-patch";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/image", get(versions))
        .route("/image/", get(versions))
        .route("/image/versions", get(versions))
        .route("/image/v2", get(versions))
        .route("/image/v2/", get(versions))
        .route("/image/v2/images", get(list_images).post(create_image))
        .route(
            "/image/v2/images/{id}",
            get(show_image).patch(update_image).delete(delete_image),
        )
        .route(
            "/image/v2/images/{id}/file",
            put(file::upload)
                .get(file::download)
                .layer(DefaultBodyLimit::disable()),
        )
        .route(
            "/image/v2/images/{id}/tags/{tag}",
            put(add_tag).delete(delete_tag),
        )
        .route("/image/v2/images/{id}/actions/deactivate", post(deactivate))
        .route("/image/v2/images/{id}/actions/reactivate", post(reactivate))
        .route("/image/v2/schemas/{name}", get(show_schema))
        .route("/image/v2/info/import", get(info_import))
        .route("/image/v2/info/stores", get(info_stores))
        .route(
            "/image/v2/images/{id}/members",
            get(list_members).post(add_member),
        )
        .route(
            "/image/v2/images/{id}/members/{member}",
            get(show_member).put(update_member).delete(delete_member),
        )
}

async fn versions(State(state): State<AppState>) -> Response {
    let entry = |id: &str, status: &str| {
        json!({
            "id": id,
            "status": status,
            "links": [{"rel": "self", "href": format!("{}/image/v2/", state.base_url)}],
        })
    };
    let mut list = vec![entry(CURRENT, "CURRENT")];
    list.extend(SUPPORTED.iter().map(|v| entry(v, "SUPPORTED")));
    (
        StatusCode::MULTIPLE_CHOICES,
        Json(json!({ "versions": list })),
    )
        .into_response()
}

/// Any error, in Glance's body shape.
pub(super) fn gerr(e: impl Into<ApiError>) -> ApiError {
    e.into().glance()
}

impl From<RecordError> for ApiError {
    fn from(e: RecordError) -> Self {
        match e {
            RecordError::BadRequest(m) => ApiError::bad_request(m),
            RecordError::Forbidden(m) => ApiError::forbidden(m),
            RecordError::Conflict(m) => ApiError::conflict(m),
            RecordError::NotFound(m) => ApiError::not_found(m),
            RecordError::OverLimit(m) => {
                ApiError::new(axum::http::StatusCode::PAYLOAD_TOO_LARGE, m)
            }
        }
        .glance()
    }
}

fn not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("no image found with ID {id}")).glance()
}

fn images(state: &AppState) -> Table<ImageRecord> {
    state.state.table(tables::IMAGES)
}

fn members(state: &AppState) -> Table<Member> {
    state.state.table(tables::IMAGE_MEMBERS)
}

/// The image and the revision it was read at, after a read barrier (linearizable).
pub(super) async fn load(state: &AppState, id: &str) -> ApiResult<(ImageRecord, u64)> {
    state.cluster.read_barrier().await.map_err(gerr)?;
    load_local(state, id).await
}

/// [`load`] from this node's replica, without a barrier.
async fn load_local(state: &AppState, id: &str) -> ApiResult<(ImageRecord, u64)> {
    let v = images(state)
        .get(id)
        .await
        .map_err(gerr)?
        .ok_or_else(|| not_found(id))?;
    Ok((v.value, v.revision))
}

async fn membership(
    state: &AppState,
    image_id: &str,
    project: Option<&str>,
) -> ApiResult<Option<(Member, u64)>> {
    let Some(project) = project else {
        return Ok(None);
    };
    let key = Member::key(image_id, project);
    match members(state).get(&key).await.map_err(gerr)? {
        Some(v) => Ok(Some((v.value, v.revision))),
        None => Ok(None),
    }
}

/// The image if the caller may see it; 404 otherwise, so that hidden images do not leak.
pub(crate) async fn load_visible(
    state: &AppState,
    auth: &Auth,
    id: &str,
) -> ApiResult<(ImageRecord, u64)> {
    auth.require("reader").map_err(ApiError::glance)?;
    let (img, rev) = load(state, id).await?;
    let caller = image_caller(&auth.0);
    let m = membership(state, id, caller.project.as_deref()).await?;
    if !visible(&caller, &img, m.map(|(m, _)| m.status)) {
        return Err(not_found(id));
    }
    Ok((img, rev))
}

/// The image if the caller may change it: 404 if they cannot see it, 403 if they can but do
/// not own it.
pub(super) async fn load_writable(
    state: &AppState,
    auth: &Auth,
    id: &str,
) -> ApiResult<(ImageRecord, u64)> {
    let (img, rev) = load_visible(state, auth, id).await?;
    if !can_modify_image(&auth.0, img.owner.as_deref()) {
        return Err(ApiError::forbidden(format!(
            "you are not permitted to modify image {id}: it belongs to another project or your role is reader"
        ))
        .glance());
    }
    Ok((img, rev))
}

pub(super) fn image_value(img: &ImageRecord) -> Vec<u8> {
    serde_json::to_vec(img).expect("image records serialise")
}

/// Writes `img` if its row is still at `rev`; returns the new revision, or `None` if it moved.
pub(super) async fn put_if(
    state: &AppState,
    img: &ImageRecord,
    rev: u64,
) -> ApiResult<Option<u64>> {
    images(state).put_at(&img.id, img, rev).await.map_err(gerr)
}

/// Applies `change` to a writable image with a compare-and-set, re-reading on a conflict.
pub(crate) async fn modify(
    state: &AppState,
    auth: &Auth,
    id: &str,
    change: impl Fn(&mut ImageRecord, &Caller) -> Result<(), RecordError>,
) -> ApiResult<ImageRecord> {
    let caller = image_caller(&auth.0);
    retry(tables::IMAGES, id, DEFAULT_ATTEMPTS, || async {
        let (mut img, rev) = load_writable(state, auth, id).await?;
        change(&mut img, &caller)?;
        img.updated_at = now_secs();
        Ok(put_if(state, &img, rev).await?.map(|_| img))
    })
    .await
    .map_err(ApiError::glance)
}

async fn create_image(
    State(state): State<AppState>,
    auth: Auth,
    body: Bytes,
) -> ApiResult<Response> {
    if !can_create_image(&auth.0) {
        return Err(
            ApiError::forbidden("creating an image needs the member role in a project").glance(),
        );
    }
    let body = parse::<Value>(&body)?;
    let caller = image_caller(&auth.0);
    let img = ImageRecord::create(&body, &caller, now_secs(), || {
        uuid::Uuid::new_v4().to_string()
    })?;
    let txn = Txn::new()
        .when(tables::IMAGES, &img.id, Expect::Absent)
        .put(tables::IMAGES, &img.id, image_value(&img));
    if !state.cluster.write(txn).await.map_err(gerr)?.succeeded {
        return Err(
            ApiError::conflict(format!("an image with ID {} already exists", img.id)).glance(),
        );
    }
    let mut resp = (StatusCode::CREATED, Json(img.to_json())).into_response();
    if let Ok(v) = format!("{}/image/v2/images/{}", state.base_url, img.id).parse() {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Ok(resp)
}

async fn list_images(
    State(state): State<AppState>,
    auth: Auth,
    Query(pairs): Query<Vec<(String, String)>>,
) -> ApiResult<Json<Value>> {
    let q = ListQuery::parse(&pairs)?;
    let found = listed_images(&state, &auth, &q).await?;
    let (items, more) = page(found, &q)?;
    let mut body = json!({
        "images": items.iter().map(ImageRecord::to_json).collect::<Vec<_>>(),
        "first": "/v2/images",
        "schema": "/v2/schemas/images",
    });
    if let (true, Some(last)) = (more, items.last()) {
        body["next"] = json!(next_link(&pairs, &last.id));
    }
    Ok(Json(body))
}

/// Every image the caller may list that `q` matches, after a read barrier, in key order (the
/// Compute API's image proxy lists through this too).
pub(crate) async fn listed_images(
    state: &AppState,
    auth: &Auth,
    q: &ListQuery,
) -> ApiResult<Vec<ImageRecord>> {
    auth.require("reader").map_err(ApiError::glance)?;
    let caller = image_caller(&auth.0);
    state.cluster.read_barrier().await.map_err(gerr)?;
    let mine: Vec<(String, MemberStatus)> = match &caller.project {
        Some(p) => state
            .state
            .table::<Member>(tables::IMAGE_MEMBERS)
            .list("")
            .await
            .map_err(gerr)?
            .into_values()
            .filter(|m| m.member_id == *p)
            .map(|m| (m.image_id, m.status))
            .collect(),
        None => Vec::new(),
    };
    let mut found = Vec::new();
    for img in images(state).list("").await.map_err(gerr)?.into_values() {
        let m = mine.iter().find(|(i, _)| *i == img.id).map(|(_, s)| *s);
        if listed(&caller, &img, m, q) && q.matches(&img) {
            found.push(img);
        }
    }
    Ok(found)
}

async fn show_image(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let (img, _) = load_visible(&state, &auth, &id).await?;
    Ok(Json(img.to_json()))
}

async fn update_image(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let ctype = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let media = ctype.split(';').next().unwrap_or("").trim();
    if !PATCH_TYPES.contains(&media) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "image updates are JSON patches with Content-Type {}, not '{ctype}'",
                PATCH_TYPES[0]
            ),
        )
        .glance());
    }
    let mut patch = parse::<Value>(&body)?;
    if media == PATCH_V2_0 {
        patch = ImageRecord::patch_from_v2_0(&patch)?;
    }
    let now = now_secs();
    let img = modify(&state, &auth, &id, |img, caller| {
        img.apply_patch(&patch, caller, now)
    })
    .await?;
    Ok(Json(img.to_json()))
}

pub(crate) async fn delete_image(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    retry(tables::IMAGES, &id, DEFAULT_ATTEMPTS, || async {
        let (img, rev) = load_writable(&state, &auth, &id).await?;
        if img.protected {
            return Err(ApiError::forbidden(format!(
                "image {id} is protected and cannot be deleted; unset protected first"
            ))
            .glance());
        }
        let members = state
            .cluster
            .list(tables::IMAGE_MEMBERS, &format!("{id}/"), usize::MAX)
            .await
            .map_err(gerr)?;
        // The manifest goes with the image; its chunks are garbage-collected once no manifest
        // names them.
        let mut txn = Txn::new()
            .when(tables::IMAGES, &id, Expect::Revision(rev))
            .delete(tables::IMAGES, &id)
            .delete(manifest::MANIFESTS, &id);
        for (key, _) in members {
            txn = txn.delete(tables::IMAGE_MEMBERS, &key);
        }
        if state.cluster.write(txn).await.map_err(gerr)?.succeeded {
            let cached = state.images.cache_path(&id);
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_file(cached)).await;
            return Ok(Some(StatusCode::NO_CONTENT));
        }
        Ok(None)
    })
    .await
    .map_err(ApiError::glance)
}

async fn add_tag(
    State(state): State<AppState>,
    auth: Auth,
    Path((id, tag)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    modify(&state, &auth, &id, |img, caller| {
        let mut tags = img.tags.clone();
        tags.push(tag.clone());
        img.apply_patch(
            &json!([{"op": "replace", "path": "/tags", "value": tags}]),
            caller,
            now_secs(),
        )
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn delete_tag(
    State(state): State<AppState>,
    auth: Auth,
    Path((id, tag)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    modify(&state, &auth, &id, |img, _| {
        let before = img.tags.len();
        img.tags.retain(|t| *t != tag);
        if img.tags.len() == before {
            return Err(RecordError::NotFound(format!(
                "tag {tag} not found on image {}",
                img.id
            )));
        }
        Ok(())
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v2/images/{id}/actions/deactivate`: an active image keeps its data but only admins
/// may download it (and no server boots from it) until it is reactivated. The owner (member
/// role) or an admin may do it, as Glance's default policy allows; it repeats harmlessly.
async fn deactivate(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    set_activation(&state, &auth, &id, Status::Deactivated).await
}

/// `POST /v2/images/{id}/actions/reactivate`: a deactivated image becomes active again.
async fn reactivate(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    set_activation(&state, &auth, &id, Status::Active).await
}

async fn set_activation(
    state: &AppState,
    auth: &Auth,
    id: &str,
    to: Status,
) -> ApiResult<StatusCode> {
    modify(state, auth, id, |img, _| img.set_activation(to)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v2/schemas/{image,images,member,members}`.
async fn show_schema(_auth: Auth, Path(name): Path<String>) -> ApiResult<Json<Value>> {
    schema::by_name(&name).map(Json).ok_or_else(|| {
        ApiError::not_found(format!(
            "no schema named {name}: Shoal serves image, images, member and members"
        ))
        .glance()
    })
}

/// `GET /v2/info/import`: Shoal offers no interoperable image import (data arrives only by
/// `PUT /v2/images/{id}/file`), so the list of import methods is empty.
async fn info_import(_auth: Auth) -> Json<Value> {
    Json(json!({
        "import-methods": {
            "description": "Import methods available.",
            "type": "array",
            "value": [],
        }
    }))
}

/// `GET /v2/info/stores`: Glance answers 404 when it runs a single store, as Shoal does (its
/// one store is the cluster's replicated chunk store).
async fn info_stores(_auth: Auth) -> ApiError {
    ApiError::not_found("multiple stores are not supported by this cloud").glance()
}

fn shared_only(img: &ImageRecord) -> ApiResult<()> {
    if img.visibility == Visibility::Shared {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!(
            "only shared images have members; image {} is {}",
            img.id,
            img.visibility.as_str()
        ))
        .glance())
    }
}

async fn list_members(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let (img, _) = load_visible(&state, &auth, &id).await?;
    shared_only(&img)?;
    let owner_view = can_modify_image(&auth.0, img.owner.as_deref());
    let mut out = Vec::new();
    for m in members(&state)
        .list(&format!("{id}/"))
        .await
        .map_err(gerr)?
        .into_values()
    {
        // A member project sees only its own membership.
        if owner_view || auth.0.project_id.as_deref() == Some(m.member_id.as_str()) {
            out.push(m.to_json());
        }
    }
    Ok(Json(
        json!({ "members": out, "schema": "/v2/schemas/members" }),
    ))
}

async fn add_member(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let (img, rev) = load_writable(&state, &auth, &id).await?;
    shared_only(&img)?;
    let body = parse::<Value>(&body)?;
    let project = body
        .get("member")
        .and_then(Value::as_str)
        .filter(|p| !p.is_empty() && p.len() <= 255 && !p.contains('/'))
        .ok_or_else(|| {
            ApiError::bad_request("the body must be {\"member\": \"<project id>\"}").glance()
        })?;
    if state
        .identity
        .get_project(project)
        .await
        .map_err(gerr)?
        .is_none()
    {
        return Err(ApiError::bad_request(format!("project {project} does not exist")).glance());
    }
    let now = now_secs();
    let m = Member {
        image_id: id.clone(),
        member_id: project.to_owned(),
        status: MemberStatus::Pending,
        created_at: now,
        updated_at: now,
    };
    let key = Member::key(&id, project);
    // Conditioned on the image too, so a member is never added to an image being deleted.
    let txn = Txn::new()
        .when(tables::IMAGES, &id, Expect::Revision(rev))
        .when(tables::IMAGE_MEMBERS, &key, Expect::Absent)
        .put(
            tables::IMAGE_MEMBERS,
            &key,
            serde_json::to_vec(&m).expect("members serialise"),
        );
    let resp = state.cluster.write(txn).await.map_err(gerr)?;
    if !resp.succeeded {
        let msg = if resp.failed_precondition == Some(1) {
            format!("project {project} is already a member of image {id}")
        } else {
            format!("image {id} changed while adding a member; retry")
        };
        return Err(ApiError::conflict(msg).glance());
    }
    Ok(Json(m.to_json()))
}

async fn show_member(
    State(state): State<AppState>,
    auth: Auth,
    Path((id, member)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let (img, _) = load_visible(&state, &auth, &id).await?;
    let owner_view = can_modify_image(&auth.0, img.owner.as_deref());
    if !owner_view && auth.0.project_id.as_deref() != Some(member.as_str()) {
        return Err(member_not_found(&id, &member));
    }
    let (m, _) = membership(&state, &id, Some(&member))
        .await?
        .ok_or_else(|| member_not_found(&id, &member))?;
    Ok(Json(m.to_json()))
}

fn member_not_found(id: &str, member: &str) -> ApiError {
    ApiError::not_found(format!("project {member} is not a member of image {id}")).glance()
}

/// A member project accepts or rejects a shared image; the owner cannot do it for them.
async fn update_member(
    State(state): State<AppState>,
    auth: Auth,
    Path((id, member)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    load_visible(&state, &auth, &id).await?;
    if auth.0.project_id.as_deref() != Some(member.as_str()) || auth.require("member").is_err() {
        return Err(ApiError::forbidden(
            "only a member of the member project may change its membership status",
        )
        .glance());
    }
    let body = parse::<Value>(&body)?;
    let status = body
        .get("status")
        .and_then(Value::as_str)
        .and_then(MemberStatus::parse)
        .ok_or_else(|| {
            ApiError::bad_request(
                "the body must be {\"status\": \"accepted\" | \"rejected\" | \"pending\"}",
            )
            .glance()
        })?;
    let (mut m, rev) = membership(&state, &id, Some(&member))
        .await?
        .ok_or_else(|| member_not_found(&id, &member))?;
    m.status = status;
    m.updated_at = now_secs();
    let key = Member::key(&id, &member);
    let txn = Txn::new()
        .when(tables::IMAGE_MEMBERS, &key, Expect::Revision(rev))
        .put(
            tables::IMAGE_MEMBERS,
            &key,
            serde_json::to_vec(&m).expect("members serialise"),
        );
    if !state.cluster.write(txn).await.map_err(gerr)?.succeeded {
        return Err(ApiError::conflict(format!("membership of {member} changed; retry")).glance());
    }
    Ok(Json(m.to_json()))
}

async fn delete_member(
    State(state): State<AppState>,
    auth: Auth,
    Path((id, member)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    load_writable(&state, &auth, &id).await?;
    let key = Member::key(&id, &member);
    let txn = Txn::new()
        .when(tables::IMAGE_MEMBERS, &key, Expect::Present)
        .delete(tables::IMAGE_MEMBERS, &key);
    if !state.cluster.write(txn).await.map_err(gerr)?.succeeded {
        return Err(member_not_found(&id, &member));
    }
    Ok(StatusCode::NO_CONTENT)
}
