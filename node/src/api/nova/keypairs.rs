//! Compute v2.1 key pairs: the HTTP edge of `shoal_compute::keypair`.
//!
//! Translates the requests into `Keypairs` calls, decides whose key pairs a request addresses
//! (`?user_id=` and a create's `user_id` are for admins, from microversion 2.10) and renders
//! Nova's views (the key `type`, 201 on create and 204 on delete from 2.2; a generated pair's
//! `private_key` in the create answer only; `limit`/`marker` paging from 2.35); the records, the public key checks, the key
//! generation and the quota-bounded create are the compute service's.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{middleware, Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use shoal_compute::keypair::{KeyType, Keypair, Keypairs};
use shoal_state::time::iso8601;

use crate::api::error::{ApiError, ApiResult};
use crate::api::nova::paging::Page;
use crate::api::nova::version::{microversion, unexpected, Microversion, V2_10, V2_2, V2_35};
use crate::api::{AppState, Auth};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/compute/v2.1/os-keypairs",
            get(list_keypairs).post(create_keypair),
        )
        .route(
            "/compute/v2.1/os-keypairs/{name}",
            get(show_keypair).delete(delete_keypair),
        )
        .layer(middleware::from_fn(microversion))
}

fn keypairs(state: &AppState) -> Keypairs {
    Keypairs::new(&state.state)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    keypair: CreateKeypair,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKeypair {
    name: String,
    #[serde(default)]
    public_key: Option<String>,
    #[serde(default, rename = "type")]
    key_type: Option<String>,
    #[serde(default)]
    user_id: Option<String>,
}

fn key_json(k: &Keypair, full: bool, v: Microversion) -> Value {
    let mut out = json!({"name": k.name, "public_key": k.public_key, "fingerprint": k.fingerprint});
    if v >= V2_2 {
        out["type"] = json!(k.key_type.as_str());
    }
    if full {
        out["user_id"] = json!(k.user_id);
        out["created_at"] = json!(iso8601(k.created));
        out["deleted"] = json!(false);
        out["deleted_at"] = Value::Null;
        out["updated_at"] = Value::Null;
        out["id"] = json!(0);
    }
    out
}

async fn create_keypair(
    State(state): State<AppState>,
    auth: Auth,
    v: Microversion,
    body: Bytes,
) -> ApiResult<Response> {
    auth.require("member").map_err(ApiError::nova)?;
    let b: CreateBody = crate::api::body::parse(&body)?;
    let key_type = match b.keypair.key_type {
        None => KeyType::Ssh,
        Some(_) if v < V2_2 => return Err(unexpected("type", V2_2)),
        Some(t) => KeyType::parse(&t).map_err(|m| ApiError::bad_request(m).nova())?,
    };
    let user = match b.keypair.user_id {
        None => auth.0.user_id.clone(),
        Some(_) if v < V2_10 => return Err(unexpected("user_id", V2_10)),
        Some(u) if u == auth.0.user_id => u,
        Some(u) => {
            auth.require_admin().map_err(ApiError::nova)?;
            u
        }
    };
    // Without a public key the pair is generated and its private key answered this once.
    let (kp, private_key) = match b.keypair.public_key {
        Some(public_key) => (
            Keypair::new(b.keypair.name, &user, public_key, key_type)?,
            None,
        ),
        None => {
            let g = Keypair::generate(b.keypair.name, &user, key_type).await?;
            (g.keypair, Some(g.private_key))
        }
    };
    keypairs(&state)
        .create(&kp, auth.0.project_id.as_deref())
        .await?;
    // Nova's create answer is exactly these fields (its response schema forbids more).
    let mut out = json!({
        "name": kp.name, "public_key": kp.public_key, "fingerprint": kp.fingerprint,
        "user_id": kp.user_id,
    });
    if let Some(private_key) = private_key {
        out["private_key"] = json!(private_key);
    }
    let status = if v >= V2_2 {
        out["type"] = json!(kp.key_type.as_str());
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(json!({ "keypair": out }))).into_response())
}

/// The public key of `user_id`'s key pair `name`, if it exists (for a server's `key_name`).
pub async fn public_key(state: &AppState, user_id: &str, name: &str) -> ApiResult<Option<String>> {
    Ok(keypairs(state).public_key(user_id, name).await?)
}

/// The user whose key pairs a request addresses: `?user_id=` is read from microversion 2.10
/// (Nova ignores it below) and is for admins only.
fn owner(auth: &Auth, q: &HashMap<String, String>, v: Microversion) -> ApiResult<String> {
    match q.get("user_id").filter(|_| v >= V2_10) {
        Some(u) if *u != auth.0.user_id => {
            auth.require_admin().map_err(ApiError::nova)?;
            Ok(u.clone())
        }
        _ => Ok(auth.0.user_id.clone()),
    }
}

/// `GET /os-keypairs`: the user's key pairs in name order; from 2.35 the page `limit` and
/// `marker` (a key pair name) name, with `keypairs_links` when it is full.
async fn list_keypairs(
    State(state): State<AppState>,
    auth: Auth,
    v: Microversion,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let user = owner(&auth, &q, v)?;
    let mut all = keypairs(&state).of_user(&user).await?;
    let page = if v >= V2_35 {
        let page = Page::from_query(&q)?;
        all = page.apply(all, |k| k.name.clone()).ok_or_else(|| {
            let marker = page.marker.as_deref().unwrap_or_default();
            ApiError::bad_request(format!("Marker {marker} could not be found.")).nova()
        })?;
        Some(page)
    } else {
        None
    };
    let items: Vec<Value> = all
        .iter()
        .map(|k| json!({ "keypair": key_json(k, false, v) }))
        .collect();
    let mut body = json!({ "keypairs": items });
    let last = all.last().map(|k| k.name.clone());
    if let Some(links) =
        page.and_then(|p| p.links(&state.base_url, "os-keypairs", &q, all.len(), last))
    {
        body["keypairs_links"] = links;
    }
    Ok(Json(body))
}

async fn show_keypair(
    State(state): State<AppState>,
    auth: Auth,
    v: Microversion,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let user = owner(&auth, &q, v)?;
    let k = keypairs(&state).get(&user, &name).await?;
    Ok(Json(json!({ "keypair": key_json(&k, true, v) })))
}

async fn delete_keypair(
    State(state): State<AppState>,
    auth: Auth,
    v: Microversion,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<StatusCode> {
    let user = owner(&auth, &q, v)?;
    keypairs(&state).delete(&user, &name).await?;
    Ok(if v >= V2_2 {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::ACCEPTED
    })
}
