//! `/v2.0/networks`.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};
use shoal_network::records::NetworkRecord;

use super::{
    bodies, body, caller, create_all, listing, net_err, one, pick_fields, timestamp, Params, PREFIX,
};
use crate::api::error::ApiResult;
use crate::api::{AppState, Auth};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(&format!("{PREFIX}/networks"), get(list).post(create))
        .route(
            &format!("{PREFIX}/networks/{{id}}"),
            get(show).put(update).delete(delete),
        )
}

/// Neutron's view of a network; the provider attributes only for admins.
fn view(n: &NetworkRecord, admin: bool) -> Value {
    let mut v = json!({
        "id": n.id,
        "name": n.name,
        "description": n.description,
        "project_id": n.project_id,
        "tenant_id": n.project_id,
        "admin_state_up": n.admin_state_up,
        "shared": n.shared,
        "router:external": n.external,
        "port_security_enabled": n.port_security_enabled,
        "mtu": n.mtu,
        "status": n.status,
        "subnets": n.subnets,
        "availability_zone_hints": n.availability_zone_hints,
        "availability_zones": [],
        "ipv4_address_scope": null,
        "ipv6_address_scope": null,
        "l2_adjacency": true,
        "tags": n.tags,
        "created_at": timestamp(n.created_at),
        "updated_at": timestamp(n.updated_at),
        "revision_number": n.revision_number,
    });
    if admin {
        v["provider:network_type"] = json!(n.network_type);
        v["provider:physical_network"] = json!(n.physical_network);
        v["provider:segmentation_id"] = json!(n.segmentation_id);
    }
    v
}

async fn list(State(s): State<AppState>, auth: Auth, q: Params) -> ApiResult<Response> {
    let c = caller(&auth);
    let nets = s.network.list_networks(&c).await.map_err(net_err)?;
    let items = nets.iter().map(|n| view(n, c.admin)).collect();
    listing("networks", items, &q.0, &s.base_url)
}

async fn show(
    State(s): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    q: Params,
) -> ApiResult<Response> {
    let c = caller(&auth);
    let n = s.network.network(&c, &id).await.map_err(net_err)?;
    Ok(one("network", pick_fields(view(&n, c.admin), &q.0)))
}

async fn create(State(s): State<AppState>, auth: Auth, bytes: Bytes) -> ApiResult<Response> {
    let c = caller(&auth);
    let (s, c) = (&s, &c);
    create_all(
        "network",
        bodies(&bytes, "network")?,
        |req| async move { s.network.create_network(c, req).await.map_err(net_err) },
        |n| async move { s.network.delete_network(c, &n.id).await.map_err(net_err) },
        |n| view(n, c.admin),
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
    let req = body(&bytes, "network")?;
    let n = s
        .network
        .update_network(&c, &id, req)
        .await
        .map_err(net_err)?;
    Ok(one("network", view(&n, c.admin)))
}

async fn delete(
    State(s): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let c = caller(&auth);
    s.network.delete_network(&c, &id).await.map_err(net_err)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
