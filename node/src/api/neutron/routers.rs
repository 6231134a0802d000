//! `/v2.0/routers`, with `add_router_interface` and `remove_router_interface`.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use serde_json::{json, Value};
use shoal_network::records::RouterRecord;
use shoal_network::InterfaceInfo;

use super::{
    bodies, caller, create_all, decode_object, listing, net_err, one, pick_fields, timestamp,
    Params, PREFIX,
};
use crate::api::error::ApiResult;
use crate::api::{AppState, Auth};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(&format!("{PREFIX}/routers"), get(list).post(create))
        .route(
            &format!("{PREFIX}/routers/{{id}}"),
            get(show).put(update).delete(delete),
        )
        .route(
            &format!("{PREFIX}/routers/{{id}}/add_router_interface"),
            put(add_interface),
        )
        .route(
            &format!("{PREFIX}/routers/{{id}}/remove_router_interface"),
            put(remove_interface),
        )
}

/// Neutron's view of a router; `distributed` and `ha` only for admins, as its policy has it.
fn view(r: &RouterRecord, admin: bool) -> Value {
    let gateway = r.gateway.as_ref().map(|g| {
        json!({
            "network_id": g.network_id,
            "enable_snat": g.enable_snat,
            "external_fixed_ips": g.external_fixed_ips,
        })
    });
    let mut v = json!({
        "id": r.id,
        "name": r.name,
        "description": r.description,
        "project_id": r.project_id,
        "tenant_id": r.project_id,
        "admin_state_up": r.admin_state_up,
        "status": r.status,
        "external_gateway_info": gateway,
        "routes": r.routes,
        "tags": r.tags,
        "created_at": timestamp(r.created_at),
        "updated_at": timestamp(r.updated_at),
        "revision_number": r.revision_number,
    });
    if admin {
        v["distributed"] = json!(false);
        v["ha"] = json!(false);
    }
    v
}

fn interface_view(i: &InterfaceInfo) -> Value {
    json!({
        "id": i.router_id,
        "tenant_id": i.project_id,
        "project_id": i.project_id,
        "port_id": i.port_id,
        "network_id": i.network_id,
        "subnet_id": i.subnet_id,
        "subnet_ids": i.subnet_ids,
    })
}

async fn list(State(s): State<AppState>, auth: Auth, q: Params) -> ApiResult<Response> {
    let c = caller(&auth);
    let routers = s.network.list_routers(&c).await.map_err(net_err)?;
    let items = routers.iter().map(|r| view(r, c.admin)).collect();
    listing("routers", items, &q.0, &s.base_url)
}

async fn show(
    State(s): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    q: Params,
) -> ApiResult<Response> {
    let c = caller(&auth);
    let r = s.network.router(&c, &id).await.map_err(net_err)?;
    Ok(one("router", pick_fields(view(&r, c.admin), &q.0)))
}

async fn create(State(s): State<AppState>, auth: Auth, bytes: Bytes) -> ApiResult<Response> {
    let c = caller(&auth);
    let (s, c) = (&s, &c);
    create_all(
        "router",
        bodies(&bytes, "router")?,
        |req| async move { s.network.create_router(c, req).await.map_err(net_err) },
        |r| async move { s.network.delete_router(c, &r.id).await.map_err(net_err) },
        |r| view(r, c.admin),
    )
    .await
}

async fn update(
    State(s): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    bytes: Bytes,
) -> ApiResult<Response> {
    let c = caller(&auth);
    let req = super::body(&bytes, "router")?;
    let r = s
        .network
        .update_router(&c, &id, req)
        .await
        .map_err(net_err)?;
    Ok(one("router", view(&r, c.admin)))
}

async fn delete(
    State(s): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    s.network
        .delete_router(&caller(&auth), &id)
        .await
        .map_err(net_err)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The interface calls take their body unwrapped: `{"subnet_id": ...}` or `{"port_id": ...}`.
async fn add_interface(
    State(s): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    bytes: Bytes,
) -> ApiResult<Response> {
    let req = decode_object(&bytes)?;
    let i = s
        .network
        .add_router_interface(&caller(&auth), &id, req)
        .await
        .map_err(net_err)?;
    Ok(Json(interface_view(&i)).into_response())
}

async fn remove_interface(
    State(s): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    bytes: Bytes,
) -> ApiResult<Response> {
    let req = decode_object(&bytes)?;
    let i = s
        .network
        .remove_router_interface(&caller(&auth), &id, req)
        .await
        .map_err(net_err)?;
    Ok(Json(interface_view(&i)).into_response())
}
