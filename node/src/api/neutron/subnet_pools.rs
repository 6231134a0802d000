//! `/v2.0/subnetpools`, with `add_prefixes` and `remove_prefixes`.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use shoal_network::records::SubnetPoolRecord;

use super::{
    bodies, body, caller, create_all, decode_object, listing, net_err, one, pick_fields, timestamp,
    Params, PREFIX,
};
use crate::api::error::ApiResult;
use crate::api::{AppState, Auth};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(&format!("{PREFIX}/subnetpools"), get(list).post(create))
        .route(
            &format!("{PREFIX}/subnetpools/{{id}}"),
            get(show).put(update).delete(delete),
        )
        .route(
            &format!("{PREFIX}/subnetpools/{{id}}/add_prefixes"),
            put(|s, a, p, b| prefix_op(s, a, p, b, true)),
        )
        .route(
            &format!("{PREFIX}/subnetpools/{{id}}/remove_prefixes"),
            put(|s, a, p, b| prefix_op(s, a, p, b, false)),
        )
}

fn view(p: &SubnetPoolRecord) -> Value {
    json!({
        "id": p.id,
        "name": p.name,
        "description": p.description,
        "project_id": p.project_id,
        "tenant_id": p.project_id,
        "prefixes": p.prefixes,
        "ip_version": p.ip_version,
        "default_prefixlen": p.default_prefixlen,
        "min_prefixlen": p.min_prefixlen,
        "max_prefixlen": p.max_prefixlen,
        "shared": p.shared,
        "is_default": p.is_default,
        "default_quota": p.default_quota,
        "address_scope_id": null,
        "tags": p.tags,
        "created_at": timestamp(p.created_at),
        "updated_at": timestamp(p.updated_at),
        "revision_number": p.revision_number,
    })
}

async fn list(State(s): State<AppState>, auth: Auth, q: Params) -> ApiResult<Response> {
    let pools = s
        .network
        .list_subnet_pools(&caller(&auth))
        .await
        .map_err(net_err)?;
    listing(
        "subnetpools",
        pools.iter().map(view).collect(),
        &q.0,
        &s.base_url,
    )
}

async fn show(
    State(s): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    q: Params,
) -> ApiResult<Response> {
    let p = s
        .network
        .subnet_pool(&caller(&auth), &id)
        .await
        .map_err(net_err)?;
    Ok(one("subnetpool", pick_fields(view(&p), &q.0)))
}

async fn create(State(s): State<AppState>, auth: Auth, bytes: Bytes) -> ApiResult<Response> {
    let c = caller(&auth);
    let (s, c) = (&s, &c);
    create_all(
        "subnetpool",
        bodies(&bytes, "subnetpool")?,
        |req| async move { s.network.create_subnet_pool(c, req).await.map_err(net_err) },
        |p| async move {
            s.network
                .delete_subnet_pool(c, &p.id)
                .await
                .map_err(net_err)
        },
        view,
    )
    .await
}

async fn update(
    State(s): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    bytes: Bytes,
) -> ApiResult<Response> {
    let req = body(&bytes, "subnetpool")?;
    let p = s
        .network
        .update_subnet_pool(&caller(&auth), &id, req)
        .await
        .map_err(net_err)?;
    Ok(one("subnetpool", view(&p)))
}

async fn delete(
    State(s): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    s.network
        .delete_subnet_pool(&caller(&auth), &id)
        .await
        .map_err(net_err)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The body of `add_prefixes` and `remove_prefixes`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Prefixes {
    prefixes: Vec<String>,
}

/// Neutron answers a prefix operation with the pool's prefixes only.
async fn prefix_op(
    State(s): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    bytes: Bytes,
    add: bool,
) -> ApiResult<Response> {
    let req: Prefixes = decode_object(&bytes)?;
    let p = s
        .network
        .change_pool_prefixes(&caller(&auth), &id, &req.prefixes, add)
        .await
        .map_err(net_err)?;
    Ok(Json(json!({ "prefixes": p.prefixes })).into_response())
}
