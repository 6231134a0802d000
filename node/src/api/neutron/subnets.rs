//! `/v2.0/subnets`.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};
use shoal_network::records::SubnetRecord;

use super::{
    bodies, body, caller, create_all, listing, net_err, one, pick_fields, timestamp, Params, PREFIX,
};
use crate::api::error::ApiResult;
use crate::api::{AppState, Auth};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(&format!("{PREFIX}/subnets"), get(list).post(create))
        .route(
            &format!("{PREFIX}/subnets/{{id}}"),
            get(show).put(update).delete(delete),
        )
}

fn view(s: &SubnetRecord) -> Value {
    json!({
        "id": s.id,
        "name": s.name,
        "description": s.description,
        "project_id": s.project_id,
        "tenant_id": s.project_id,
        "network_id": s.network_id,
        "ip_version": s.ip_version,
        "cidr": s.cidr,
        "gateway_ip": s.gateway_ip,
        "allocation_pools": s.allocation_pools,
        "dns_nameservers": s.dns_nameservers,
        "host_routes": s.host_routes,
        "enable_dhcp": s.enable_dhcp,
        "router:external": s.router_external,
        "ipv6_ra_mode": s.ipv6_ra_mode,
        "ipv6_address_mode": s.ipv6_address_mode,
        "subnetpool_id": s.subnetpool_id,
        "segment_id": null,
        "service_types": [],
        "dns_publish_fixed_ip": false,
        "tags": s.tags,
        "created_at": timestamp(s.created_at),
        "updated_at": timestamp(s.updated_at),
        "revision_number": s.revision_number,
    })
}

async fn list(State(s): State<AppState>, auth: Auth, q: Params) -> ApiResult<Response> {
    let subnets = s
        .network
        .list_subnets(&caller(&auth))
        .await
        .map_err(net_err)?;
    listing(
        "subnets",
        subnets.iter().map(view).collect(),
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
    let sub = s
        .network
        .subnet(&caller(&auth), &id)
        .await
        .map_err(net_err)?;
    Ok(one("subnet", pick_fields(view(&sub), &q.0)))
}

async fn create(State(s): State<AppState>, auth: Auth, bytes: Bytes) -> ApiResult<Response> {
    let c = caller(&auth);
    let (s, c) = (&s, &c);
    create_all(
        "subnet",
        bodies(&bytes, "subnet")?,
        |req| async move { s.network.create_subnet(c, req).await.map_err(net_err) },
        |sub| async move { s.network.delete_subnet(c, &sub.id).await.map_err(net_err) },
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
    let req = body(&bytes, "subnet")?;
    let sub = s
        .network
        .update_subnet(&caller(&auth), &id, req)
        .await
        .map_err(net_err)?;
    Ok(one("subnet", view(&sub)))
}

async fn delete(
    State(s): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    s.network
        .delete_subnet(&caller(&auth), &id)
        .await
        .map_err(net_err)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
