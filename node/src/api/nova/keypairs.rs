//! Compute v2.1 key pairs: the HTTP edge of `shoal_compute::keypair`.
//!
//! Translates the requests into `Keypairs` calls, decides whose key pairs a request addresses
//! (`?user_id=` is for admins) and renders Nova's views; the records, the public key checks and
//! the quota-bounded create are the compute service's.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{middleware, Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use shoal_compute::keypair::{Keypair, Keypairs};
use shoal_state::time::iso8601;

use crate::api::error::{ApiError, ApiResult};
use crate::api::nova::flavors::microversion;
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
}

fn key_json(k: &Keypair, full: bool) -> Value {
    let mut v = json!({"name": k.name, "public_key": k.public_key, "fingerprint": k.fingerprint});
    if full {
        v["user_id"] = json!(k.user_id);
        v["created_at"] = json!(iso8601(k.created));
        v["deleted"] = json!(false);
        v["deleted_at"] = Value::Null;
        v["updated_at"] = Value::Null;
        v["id"] = json!(0);
    }
    v
}

async fn create_keypair(
    State(state): State<AppState>,
    auth: Auth,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    auth.require("member").map_err(ApiError::nova)?;
    let b: CreateBody = crate::api::body::parse(&body)?;
    let kp = Keypair::new(b.keypair.name, &auth.0.user_id, b.keypair.public_key)?;
    keypairs(&state)
        .create(&kp, auth.0.project_id.as_deref())
        .await?;
    // Nova's create answer is exactly these fields (its 2.1 response schema forbids more).
    Ok(Json(json!({ "keypair": {
        "name": kp.name, "public_key": kp.public_key, "fingerprint": kp.fingerprint,
        "user_id": kp.user_id,
    }})))
}

/// The public key of `user_id`'s key pair `name`, if it exists (for a server's `key_name`).
pub async fn public_key(state: &AppState, user_id: &str, name: &str) -> ApiResult<Option<String>> {
    Ok(keypairs(state).public_key(user_id, name).await?)
}

/// The user whose key pairs a request addresses: `?user_id=` is for admins only.
fn owner(auth: &Auth, q: &HashMap<String, String>) -> ApiResult<String> {
    match q.get("user_id") {
        Some(u) if *u != auth.0.user_id => {
            auth.require_admin().map_err(ApiError::nova)?;
            Ok(u.clone())
        }
        _ => Ok(auth.0.user_id.clone()),
    }
}

async fn list_keypairs(
    State(state): State<AppState>,
    auth: Auth,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let user = owner(&auth, &q)?;
    let items: Vec<Value> = keypairs(&state)
        .of_user(&user)
        .await?
        .iter()
        .map(|k| json!({ "keypair": key_json(k, false) }))
        .collect();
    Ok(Json(json!({ "keypairs": items })))
}

async fn show_keypair(
    State(state): State<AppState>,
    auth: Auth,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let user = owner(&auth, &q)?;
    let k = keypairs(&state).get(&user, &name).await?;
    Ok(Json(json!({ "keypair": key_json(&k, true) })))
}

async fn delete_keypair(
    State(state): State<AppState>,
    auth: Auth,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<StatusCode> {
    let user = owner(&auth, &q)?;
    keypairs(&state).delete(&user, &name).await?;
    Ok(StatusCode::ACCEPTED)
}
