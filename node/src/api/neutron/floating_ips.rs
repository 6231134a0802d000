//! `/v2.0/floatingips`.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};
use shoal_network::records::FloatingIpRecord;

use super::{
    bodies, body, caller, create_all, listing, net_err, one, pick_fields, timestamp, Params, PREFIX,
};
use crate::api::error::ApiResult;
use crate::api::{AppState, Auth};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(&format!("{PREFIX}/floatingips"), get(list).post(create))
        .route(
            &format!("{PREFIX}/floatingips/{{id}}"),
            get(show).put(update).delete(delete),
        )
}

/// Neutron's view of a floating IP.
fn view(f: &FloatingIpRecord) -> Value {
    json!({
        "id": f.id,
        "project_id": f.project_id,
        "tenant_id": f.project_id,
        "description": f.description,
        "floating_network_id": f.floating_network_id,
        "floating_ip_address": f.floating_ip_address,
        "port_id": f.port_id,
        "fixed_ip_address": f.fixed_ip_address,
        "router_id": f.router_id,
        "status": f.status,
        "tags": f.tags,
        "created_at": timestamp(f.created_at),
        "updated_at": timestamp(f.updated_at),
        "revision_number": f.revision_number,
    })
}

async fn list(State(s): State<AppState>, auth: Auth, q: Params) -> ApiResult<Response> {
    let fips = s
        .network
        .list_floating_ips(&caller(&auth))
        .await
        .map_err(net_err)?;
    let items = fips.iter().map(view).collect();
    listing("floatingips", items, &q.0, &s.base_url)
}

async fn show(
    State(s): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    q: Params,
) -> ApiResult<Response> {
    let f = s
        .network
        .floating_ip(&caller(&auth), &id)
        .await
        .map_err(net_err)?;
    Ok(one("floatingip", pick_fields(view(&f), &q.0)))
}

async fn create(State(s): State<AppState>, auth: Auth, bytes: Bytes) -> ApiResult<Response> {
    let c = caller(&auth);
    let (s, c) = (&s, &c);
    create_all(
        "floatingip",
        bodies(&bytes, "floatingip")?,
        |req| async move { s.network.create_floating_ip(c, req).await.map_err(net_err) },
        |f| async move {
            s.network
                .delete_floating_ip(c, &f.id)
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
    let req = body(&bytes, "floatingip")?;
    let f = s
        .network
        .update_floating_ip(&caller(&auth), &id, req)
        .await
        .map_err(net_err)?;
    Ok(one("floatingip", view(&f)))
}

async fn delete(
    State(s): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    s.network
        .delete_floating_ip(&caller(&auth), &id)
        .await
        .map_err(net_err)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
