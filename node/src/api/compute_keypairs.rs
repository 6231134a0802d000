//! Compute v2.1 key pairs: a user's named SSH public keys.
//!
//! The `openstack` client generates a key pair itself when given no `--public-key` (Nova
//! stopped generating them in 2.92), so the server only stores and checks public keys. The
//! fingerprint is OpenSSH's `SHA256:` form; Nova prints an MD5 one, which ring does not offer.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{middleware, Json, Router};
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use shoal_types::{Expect, Txn};

use super::compute::microversion;
use super::compute::nova_err;
use super::error::{ApiError, ApiResult};
use super::identity::iso8601;
use super::{AppState, Auth};
use crate::identity::token::now_secs;

pub const T_KEYPAIRS: &str = "keypairs";

/// Nova's default `key_pairs` quota, used when the project sets none.
const DEFAULT_KEYPAIR_QUOTA: i64 = 100;

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

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Keypair {
    name: String,
    user_id: String,
    public_key: String,
    fingerprint: String,
    created: u64,
}

const KEY_TYPES: [&str; 5] = [
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
];

/// Checks an OpenSSH public key line (`type base64-blob [comment]`) and returns its
/// `SHA256:` fingerprint. The blob must start with the same key type it is labelled with.
fn fingerprint(line: &str) -> Result<String, String> {
    let mut parts = line.split_whitespace();
    let (Some(kind), Some(b64)) = (parts.next(), parts.next()) else {
        return Err("the public key must be an OpenSSH line: '<type> <base64> [comment]'".into());
    };
    if !KEY_TYPES.contains(&kind) {
        return Err(format!(
            "key type {kind} is not supported; use one of {}",
            KEY_TYPES.join(", ")
        ));
    }
    let blob = STANDARD
        .decode(b64)
        .map_err(|e| format!("the public key's base64 is not valid: {e}"))?;
    let inner = blob
        .get(..4)
        .map(|n| u32::from_be_bytes([n[0], n[1], n[2], n[3]]) as usize)
        .and_then(|n| blob.get(4..4 + n));
    if inner != Some(kind.as_bytes()) {
        return Err(format!("the public key's data is not a {kind} key"));
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, &blob);
    Ok(format!(
        "SHA256:{}",
        STANDARD_NO_PAD.encode(digest.as_ref())
    ))
}

fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_. @".contains(c));
    if ok {
        Ok(())
    } else {
        Err("key pair names are 1 to 255 of letters, digits, '-', '_', '.', '@' and spaces".into())
    }
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
    let b: CreateBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!("invalid input for the request body: {e}")).nova()
    })?;
    let k = b.keypair;
    check_name(&k.name).map_err(|m| ApiError::bad_request(m).nova())?;
    let public_key = k.public_key.ok_or_else(|| {
        ApiError::bad_request(
            "public_key is required: Shoal does not generate key pairs (the openstack client does)",
        )
        .nova()
    })?;
    let public_key = public_key.trim().to_owned();
    let fp = fingerprint(&public_key).map_err(|m| ApiError::bad_request(m).nova())?;
    // Nova counts key pairs per user against the project's `key_pairs` quota.
    let quota = match &auth.0.project_id {
        Some(p) => super::compute_admin::quota(&state, p, "key_pairs").await?,
        None => DEFAULT_KEYPAIR_QUOTA,
    };
    let prefix = format!("{}/", auth.0.user_id);
    let kp = Keypair {
        name: k.name,
        user_id: auth.0.user_id.clone(),
        public_key,
        fingerprint: fp,
        created: now_secs(),
    };
    let key = format!("{prefix}{}", kp.name);
    let txn = Txn::new().when(T_KEYPAIRS, &key, Expect::Absent).put(
        T_KEYPAIRS,
        &key,
        serde_json::to_vec(&kp).expect("key pairs serialise"),
    );
    let count = || async {
        let held = state.cluster.list(T_KEYPAIRS, &prefix, usize::MAX).await;
        Ok(held.map_err(nova_err)?.len() as i64)
    };
    let over = |held| {
        ApiError::forbidden(format!(
            "quota exceeded: you hold {held} of {quota} key pairs"
        ))
        .nova()
    };
    let guard = format!("key_pairs/{}", auth.0.user_id);
    let resp =
        super::compute_admin::commit_within_quota(&state, &guard, quota, count, txn, over).await?;
    if !resp.succeeded {
        return Err(ApiError::conflict(format!("key pair {} already exists", kp.name)).nova());
    }
    Ok(Json(json!({ "keypair": key_json(&kp, true) })))
}

/// The public key of `user_id`'s key pair `name`, if it exists (for a server's `key_name`).
pub async fn public_key(state: &AppState, user_id: &str, name: &str) -> ApiResult<Option<String>> {
    Ok(state
        .state
        .table::<Keypair>(T_KEYPAIRS)
        .get(&format!("{user_id}/{name}"))
        .await
        .map_err(nova_err)?
        .map(|v| v.value.public_key))
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
    state.cluster.read_barrier().await.map_err(nova_err)?;
    let mut items = Vec::new();
    for (_, row) in state
        .cluster
        .list(T_KEYPAIRS, &format!("{user}/"), usize::MAX)
        .await
        .map_err(nova_err)?
    {
        if let Ok(k) = serde_json::from_slice::<Keypair>(&row.value) {
            items.push(json!({ "keypair": key_json(&k, false) }));
        }
    }
    Ok(Json(json!({ "keypairs": items })))
}

async fn load(state: &AppState, user: &str, name: &str) -> ApiResult<Keypair> {
    state.cluster.read_barrier().await.map_err(nova_err)?;
    let row = state
        .cluster
        .get(T_KEYPAIRS, &format!("{user}/{name}"))
        .await
        .map_err(nova_err)?
        .ok_or_else(|| ApiError::not_found(format!("keypair {name} not found")).nova())?;
    serde_json::from_slice(&row.value).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("keypair {name} is stored corrupt: {e}"),
        )
        .nova()
    })
}

async fn show_keypair(
    State(state): State<AppState>,
    auth: Auth,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let user = owner(&auth, &q)?;
    let k = load(&state, &user, &name).await?;
    Ok(Json(json!({ "keypair": key_json(&k, true) })))
}

async fn delete_keypair(
    State(state): State<AppState>,
    auth: Auth,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<StatusCode> {
    let user = owner(&auth, &q)?;
    let key = format!("{user}/{name}");
    let txn = Txn::new()
        .when(T_KEYPAIRS, &key, Expect::Present)
        .delete(T_KEYPAIRS, &key);
    if !state.cluster.write(txn).await.map_err(nova_err)?.succeeded {
        return Err(ApiError::not_found(format!("keypair {name} not found")).nova());
    }
    Ok(StatusCode::ACCEPTED)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED25519: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZGhscHR4f me@host";

    #[test]
    fn openssh_keys_are_checked() {
        let fp = fingerprint(ED25519).unwrap();
        assert!(fp.starts_with("SHA256:"), "{fp}");
        assert_eq!(fp.len(), "SHA256:".len() + 43);
        // Labelled as RSA but holding an ed25519 blob.
        let relabelled = ED25519.replacen("ssh-ed25519", "ssh-rsa", 1);
        assert!(fingerprint(&relabelled)
            .unwrap_err()
            .contains("not a ssh-rsa key"));
        assert!(fingerprint("ssh-dss AAAA").is_err());
        assert!(fingerprint("ssh-ed25519 !!!").is_err());
        assert!(fingerprint("").is_err());
    }

    #[test]
    fn key_pair_names() {
        assert!(check_name("my-key_1.pub").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a/b").is_err());
    }
}
