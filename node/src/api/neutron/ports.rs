//! `/v2.0/ports`.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};
use shoal_network::PortRecord;

use super::{
    bodies, body, caller, create_all, listing, net_err, one, pick_fields, timestamp, Params, PREFIX,
};
use crate::api::error::ApiResult;
use crate::api::{AppState, Auth};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(&format!("{PREFIX}/ports"), get(list).post(create))
        .route(
            &format!("{PREFIX}/ports/{{id}}"),
            get(show).put(update).delete(delete),
        )
}

/// Neutron's view of a port; where it is bound only for admins, as Neutron's policy has it.
fn view(p: &PortRecord, admin: bool) -> Value {
    let mut v = json!({
        "id": p.id,
        "name": p.name,
        "description": p.description,
        "project_id": p.project_id,
        "tenant_id": p.project_id,
        "network_id": p.network_id,
        "mac_address": p.mac_address,
        "fixed_ips": p.fixed_ips,
        "device_id": p.device_id,
        "device_owner": p.device_owner,
        "admin_state_up": p.admin_state_up,
        "status": p.status,
        "security_groups": p.security_groups,
        "port_security_enabled": p.port_security_enabled,
        "allowed_address_pairs": p.allowed_address_pairs,
        "binding:vnic_type": p.binding_vnic_type,
        "extra_dhcp_opts": p.extra_dhcp_opts,
        "tags": p.tags,
        "created_at": timestamp(p.created_at),
        "updated_at": timestamp(p.updated_at),
        "revision_number": p.revision_number,
    });
    if admin {
        v["binding:host_id"] = json!(p.binding_host_id);
        v["binding:vif_type"] = json!(p.binding_vif_type);
        v["binding:vif_details"] = json!({});
        v["binding:profile"] = json!({});
    }
    v
}

async fn list(State(s): State<AppState>, auth: Auth, q: Params) -> ApiResult<Response> {
    let c = caller(&auth);
    let ports = s.network.list_ports(&c).await.map_err(net_err)?;
    let items = ports.iter().map(|p| view(p, c.admin)).collect();
    listing("ports", items, &q.0, &s.base_url)
}

async fn show(
    State(s): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    q: Params,
) -> ApiResult<Response> {
    let c = caller(&auth);
    let p = s.network.port(&c, &id).await.map_err(net_err)?;
    Ok(one("port", pick_fields(view(&p, c.admin), &q.0)))
}

async fn create(State(s): State<AppState>, auth: Auth, bytes: Bytes) -> ApiResult<Response> {
    let c = caller(&auth);
    let (s, c) = (&s, &c);
    create_all(
        "port",
        bodies(&bytes, "port")?,
        |req| async move { s.network.create_port(c, req).await.map_err(net_err) },
        |p| async move { s.network.delete_port(c, &p.id).await.map_err(net_err) },
        |p| view(p, c.admin),
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
    let req = body(&bytes, "port")?;
    let p = s.network.update_port(&c, &id, req).await.map_err(net_err)?;
    Ok(one("port", view(&p, c.admin)))
}

async fn delete(
    State(s): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    s.network
        .delete_port(&caller(&auth), &id)
        .await
        .map_err(net_err)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
