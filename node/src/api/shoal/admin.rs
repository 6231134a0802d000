//! Shoal's own admin surface under `/shoal/v1`: cluster status, the raw `kv` table (as
//! etcdctl reaches etcd), watch streams, join tokens, node removal and image prefetch (`shoal
//! image pull`). Every route needs a
//! token with the admin role: the admin surface is never reachable without a credential.

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use shoal_consensus::cluster::WatchError;
use shoal_types::{EventKind, Txn};

use crate::api::body::parse;
use crate::api::error::{ApiError, ApiResult};
use crate::api::{AppState, Auth};

/// The raw table that `shoal kv` reads and writes.
pub const KV_TABLE: &str = "kv";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/shoal/v1/status", get(status))
        .route("/shoal/v1/kv", get(kv_list))
        .route(
            "/shoal/v1/kv/{*key}",
            get(kv_get).put(kv_put).delete(kv_delete),
        )
        .route("/shoal/v1/watch", get(watch))
        .route(
            "/shoal/v1/join-tokens",
            get(tokens_list).post(tokens_create),
        )
        .route("/shoal/v1/join-tokens/{id}", delete(tokens_revoke))
        .route("/shoal/v1/nodes/{name}", delete(node_remove))
        .route("/shoal/v1/images/{id}/pull", post(image_pull))
}

/// Pulls an image into this node's base-image cache (or joins the pull already running) and
/// streams its progress as newline-delimited JSON, at most four lines a second; the last line has
/// `"status": "done"` and the cached path, or `"status": "error"` and a message.
async fn image_pull(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    auth.require_admin()?;
    // The id names a file in the cache directory.
    if id.is_empty()
        || id.len() > 128
        || id.starts_with('.')
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return Err(ApiError::bad_request(
            "an image id is 1 to 128 letters, digits, '-', '_' or '.', not starting with '.'",
        ));
    }
    let rx = state.images.start_pull(&id);
    let lines = futures::stream::unfold(Some(rx), |rx| async move {
        let mut rx = rx?;
        let _ = tokio::time::timeout(
            std::time::Duration::from_millis(250),
            rx.wait_for(|s| s.result.is_some()),
        )
        .await;
        let s = rx.borrow_and_update().clone();
        let mut line = json!({
            "done_bytes": s.done_bytes,
            "total_bytes": s.total_bytes,
            "fetched_bytes": s.fetched_bytes,
            "retried_chunks": s.retried_chunks,
            "hedged_chunks": s.hedged_chunks,
        });
        let next = match &s.result {
            None => {
                line["status"] = json!("pulling");
                Some(rx)
            }
            Some(Ok(path)) => {
                line["status"] = json!("done");
                line["path"] = json!(path.display().to_string());
                None
            }
            Some(Err(e)) => {
                line["status"] = json!("error");
                line["message"] = json!(shoal_images::chain(e.as_ref()));
                None
            }
        };
        Some((Ok::<_, std::convert::Infallible>(format!("{line}\n")), next))
    });
    Ok((
        [("content-type", "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response())
}

async fn status(State(state): State<AppState>, auth: Auth) -> ApiResult<Json<Value>> {
    auth.require_admin()?;
    let status = state.cluster.cluster_status().await;
    Ok(Json(
        serde_json::to_value(status).expect("status serialises"),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadParams {
    /// `linearizable` (default) or `local`.
    #[serde(default)]
    consistency: Option<String>,
}

/// Makes the reads that follow linearizable (the default) or leaves them local; anything else
/// is a 400.
pub(crate) async fn barrier(state: &AppState, consistency: Option<&str>) -> ApiResult<()> {
    match consistency.unwrap_or("linearizable") {
        "linearizable" => {
            state.cluster.read_barrier().await?;
            Ok(())
        }
        "local" => Ok(()),
        other => Err(ApiError::bad_request(format!(
            "consistency {other:?} is not known: use linearizable or local"
        ))),
    }
}

async fn kv_get(
    State(state): State<AppState>,
    auth: Auth,
    Path(key): Path<String>,
    Query(params): Query<ReadParams>,
) -> ApiResult<Response> {
    auth.require_admin()?;
    barrier(&state, params.consistency.as_deref()).await?;
    let row = state
        .cluster
        .get(KV_TABLE, &key)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("key {key:?} does not exist")))?;
    let mut resp = row.value.into_response();
    let h = resp.headers_mut();
    h.insert("X-Shoal-Revision", HeaderValue::from(row.mod_revision));
    h.insert(
        "X-Shoal-Create-Revision",
        HeaderValue::from(row.create_revision),
    );
    h.insert("X-Shoal-Version", HeaderValue::from(row.version));
    Ok(resp)
}

/// The header that makes a `kv` write safe to send again: repeats of one key by one user,
/// through any node, within the state machine's request window, are applied once and answered
/// with the first result (the revision it committed at).
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// Longest idempotency key a client may choose (the cluster's request id adds the user's id).
const MAX_IDEMPOTENCY_KEY: usize = 64;

/// The cluster request id for a write that carries an `Idempotency-Key`, scoped to the user so
/// that one user can never be answered with another's result.
fn request_id(auth: &Auth, headers: &HeaderMap, op: &str) -> ApiResult<Option<String>> {
    let Some(raw) = headers.get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    let key = raw
        .to_str()
        .ok()
        .filter(|k| {
            !k.is_empty()
                && k.len() <= MAX_IDEMPOTENCY_KEY
                && k.bytes().all(|b| b.is_ascii_graphic())
        })
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters"
            ))
        })?;
    Ok(Some(format!("kv-{op}:{}:{key}", auth.0.user_id)))
}

async fn write(
    state: &AppState,
    request_id: Option<String>,
    txn: Txn,
) -> ApiResult<shoal_types::TxnResponse> {
    Ok(match request_id {
        Some(id) => state.cluster.write_keyed(&id, txn).await?,
        None => state.cluster.write(txn).await?,
    })
}

async fn kv_put(
    State(state): State<AppState>,
    auth: Auth,
    Path(key): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    auth.require_admin()?;
    let id = request_id(&auth, &headers, "put")?;
    let resp = write(&state, id, Txn::new().put(KV_TABLE, &key, body.to_vec())).await?;
    Ok(Json(json!({ "revision": resp.revision })))
}

async fn kv_delete(
    State(state): State<AppState>,
    auth: Auth,
    Path(key): Path<String>,
    headers: HeaderMap,
) -> ApiResult<StatusCode> {
    auth.require_admin()?;
    let id = request_id(&auth, &headers, "delete")?;
    let txn = Txn::new()
        .when(KV_TABLE, &key, shoal_types::Expect::Present)
        .delete(KV_TABLE, &key);
    if write(&state, id, txn).await?.succeeded {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!("key {key:?} does not exist")))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    #[serde(default)]
    prefix: String,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    consistency: Option<String>,
}

async fn kv_list(
    State(state): State<AppState>,
    auth: Auth,
    Query(params): Query<ListParams>,
) -> ApiResult<Json<Value>> {
    auth.require_admin()?;
    barrier(&state, params.consistency.as_deref()).await?;
    let revision = state.cluster.revision();
    let rows = state
        .cluster
        .list(KV_TABLE, &params.prefix, params.limit.unwrap_or(1000))
        .await?;
    let items: Vec<Value> = rows
        .into_iter()
        .map(|(k, r)| {
            json!({"key": k, "value": String::from_utf8_lossy(&r.value), "mod_revision": r.mod_revision})
        })
        .collect();
    Ok(Json(json!({ "revision": revision, "items": items })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WatchParams {
    #[serde(default = "kv")]
    table: String,
    #[serde(default)]
    prefix: String,
    /// First revision to deliver; default: changes after now.
    #[serde(default)]
    from_revision: Option<u64>,
}

fn kv() -> String {
    KV_TABLE.to_owned()
}

/// A watch as newline-delimited JSON, one event a line, in revision order.
async fn watch(
    State(state): State<AppState>,
    auth: Auth,
    Query(params): Query<WatchParams>,
) -> ApiResult<Response> {
    auth.require_admin()?;
    shoal_types::validate_table(&params.table).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let from = params
        .from_revision
        .unwrap_or_else(|| state.cluster.revision() + 1);
    let stream = state
        .cluster
        .watch(&params.table, &params.prefix, from)
        .await
        .map_err(|e| match e {
            WatchError::Compacted { .. } => ApiError::conflict(e.to_string()),
            WatchError::Closed => ApiError::unavailable(e.to_string()),
            WatchError::Store(_) => ApiError::internal_logged(&e),
        })?;
    let body = stream.map(|ev| {
        let line = match ev {
            Ok(ev) => {
                let (kind, value) = match &ev.kind {
                    EventKind::Put(row) => ("put", Some(String::from_utf8_lossy(&row.value).into_owned())),
                    EventKind::Delete => ("delete", None),
                };
                json!({"revision": ev.revision, "table": ev.table, "key": ev.key, "type": kind, "value": value})
            }
            Err(e) => json!({"error": e.to_string()}),
        };
        Ok::<_, std::convert::Infallible>(format!("{line}\n"))
    });
    Ok((
        [("content-type", "application/x-ndjson")],
        Body::from_stream(body),
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateToken {
    /// Lifetime in seconds; default 24 h.
    #[serde(default)]
    ttl_secs: Option<u64>,
    #[serde(default)]
    description: Option<String>,
    /// How many nodes may join with it; default 1.
    #[serde(default)]
    uses: Option<u32>,
}

async fn tokens_create(
    State(state): State<AppState>,
    auth: Auth,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<Value>)> {
    auth.require_admin()?;
    let req: CreateToken = if body.is_empty() {
        CreateToken {
            ttl_secs: None,
            description: None,
            uses: None,
        }
    } else {
        parse(&body)?
    };
    let ttl = req.ttl_secs.unwrap_or(24 * 3600);
    if !(1..=365 * 86_400).contains(&ttl) {
        return Err(ApiError::bad_request(format!(
            "ttl_secs is {ttl}; it must be between 1 and 31536000"
        )));
    }
    let uses = req.uses.unwrap_or(1);
    if !(1..=shoal_consensus::join::MAX_USES).contains(&uses) {
        return Err(ApiError::bad_request(format!(
            "uses is {uses}; it must be between 1 and {}",
            shoal_consensus::join::MAX_USES
        )));
    }
    let (info, token) = state
        .cluster
        .create_join_token(
            std::time::Duration::from_secs(ttl),
            uses,
            req.description.unwrap_or_default(),
            auth.0.user_name.clone(),
        )
        .await?;
    let mut v = serde_json::to_value(info).expect("token info serialises");
    v["token"] = json!(token);
    Ok((StatusCode::CREATED, Json(v)))
}

async fn tokens_list(State(state): State<AppState>, auth: Auth) -> ApiResult<Json<Value>> {
    auth.require_admin()?;
    let tokens = state.cluster.list_join_tokens().await?;
    Ok(Json(json!({ "join_tokens": tokens })))
}

async fn tokens_revoke(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    auth.require_admin()?;
    state.cluster.revoke_join_token(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn node_remove(
    State(state): State<AppState>,
    auth: Auth,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    auth.require_admin()?;
    state.cluster.remove_node(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}
