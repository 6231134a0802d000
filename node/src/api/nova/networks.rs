//! Nova's network proxies (`/os-networks` and `/os-tenant-networks`, served up to 2.35; from
//! 2.36 their reads are 404 as in Nova): the Network API's networks seen through the Compute API's shapes.
//! Nothing is stored here: every call reads through `shoal-network` with its visibility rules
//! (a project sees its own, shared and external networks; an admin sees all). The calls that
//! only nova-network served (create, delete, associate) answer 410 Gone, as Nova does since
//! nova-network was removed.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use shoal_network::records::{NetworkRecord, SubnetRecord};
use shoal_network::NetworkError;
use shoal_state::time::rfc3339;

use crate::api::error::{ApiError, ApiResult};
use crate::api::neutron::{caller, net_err};
use crate::api::nova::version::{microversion, proxy_api, Microversion};
use crate::api::{AppState, Auth};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/compute/v2.1/os-networks", get(list).post(gone))
        .route("/compute/v2.1/os-networks/{id}", get(show).delete(gone_id))
        .route(
            "/compute/v2.1/os-networks/{id}/action",
            axum::routing::post(gone_id),
        )
        .route("/compute/v2.1/os-networks/add", axum::routing::post(gone))
        .route(
            "/compute/v2.1/os-tenant-networks",
            get(list_tenant).post(gone),
        )
        .route(
            "/compute/v2.1/os-tenant-networks/{id}",
            get(show_tenant).delete(gone_id),
        )
        .layer(axum::middleware::from_fn(microversion))
}

/// Nova's answer to nova-network's calls.
async fn gone() -> ApiError {
    ApiError::new(
        StatusCode::GONE,
        "This API is no longer available: nova-network was removed; use the Network API.",
    )
    .nova()
}

async fn gone_id(Path(_): Path<String>) -> ApiError {
    gone().await
}

/// The first IPv4 subnet's prefix of `n`, as nova-network's single `cidr` was.
fn cidr(n: &NetworkRecord, subnets: &[SubnetRecord]) -> Option<String> {
    n.subnets.iter().find_map(|id| {
        subnets
            .iter()
            .find(|s| s.id == *id && s.ip_version == 4)
            .map(|s| s.cidr.clone())
    })
}

/// Nova's `network_dict`: the nova-network fields, with what the Network API knows filled in
/// (`id`, `label`, `cidr`, and for admins `project_id`, `mtu` and the timestamps) and the rest
/// `null`, as Nova shows Neutron's networks.
fn network_view(n: &NetworkRecord, subnets: &[SubnetRecord], admin: bool) -> Value {
    let mut v = json!({
        "id": n.id, "label": n.name, "cidr": cidr(n, subnets), "netmask": null,
        "gateway": null, "broadcast": null, "dns1": null, "dns2": null, "cidr_v6": null,
        "gateway_v6": null, "netmask_v6": null,
    });
    if admin {
        let extra = json!({
            "created_at": rfc3339(n.created_at), "updated_at": rfc3339(n.updated_at),
            "deleted_at": null, "deleted": false, "injected": null, "bridge": null,
            "vlan": null, "vpn_public_address": null, "vpn_public_port": null,
            "vpn_private_address": null, "dhcp_start": null, "project_id": n.project_id,
            "host": null, "bridge_interface": null, "multi_host": null, "priority": null,
            "rxtx_base": null, "mtu": n.mtu, "dhcp_server": null, "enable_dhcp": null,
            "share_address": null,
        });
        if let (Some(v), Value::Object(extra)) = (v.as_object_mut(), extra) {
            v.extend(extra);
        }
    }
    v
}

/// `os-tenant-networks`' shape: id, label and cidr.
fn tenant_view(n: &NetworkRecord, subnets: &[SubnetRecord]) -> Value {
    json!({"id": n.id, "label": n.name, "cidr": cidr(n, subnets)})
}

/// Nova's 404 for a network the caller cannot see.
fn nova_err(e: NetworkError) -> ApiError {
    if matches!(e, NetworkError::NotFound { .. }) {
        ApiError::not_found("Network not found").nova()
    } else {
        net_err(e)
    }
}

async fn networks_and_subnets(
    s: &AppState,
    auth: &Auth,
) -> ApiResult<(Vec<NetworkRecord>, Vec<SubnetRecord>)> {
    let c = caller(auth);
    let mut nets = s.network.list_networks(&c).await.map_err(nova_err)?;
    nets.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.id.cmp(&b.id)));
    let subnets = s.network.list_subnets(&c).await.map_err(nova_err)?;
    Ok((nets, subnets))
}

async fn one(s: &AppState, auth: &Auth, id: &str) -> ApiResult<(NetworkRecord, Vec<SubnetRecord>)> {
    let c = caller(auth);
    let n = s.network.network(&c, id).await.map_err(nova_err)?;
    let subnets = s.network.list_subnets(&c).await.map_err(nova_err)?;
    Ok((n, subnets))
}

async fn list(State(s): State<AppState>, auth: Auth, v: Microversion) -> ApiResult<Json<Value>> {
    proxy_api(v)?;
    let admin = caller(&auth).admin;
    let (nets, subnets) = networks_and_subnets(&s, &auth).await?;
    let list: Vec<Value> = nets
        .iter()
        .map(|n| network_view(n, &subnets, admin))
        .collect();
    Ok(Json(json!({ "networks": list })))
}

async fn show(
    State(s): State<AppState>,
    auth: Auth,
    v: Microversion,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    proxy_api(v)?;
    let admin = caller(&auth).admin;
    let (n, subnets) = one(&s, &auth, &id).await?;
    Ok(Json(
        json!({ "network": network_view(&n, &subnets, admin) }),
    ))
}

async fn list_tenant(
    State(s): State<AppState>,
    auth: Auth,
    v: Microversion,
) -> ApiResult<Json<Value>> {
    proxy_api(v)?;
    let (nets, subnets) = networks_and_subnets(&s, &auth).await?;
    let list: Vec<Value> = nets.iter().map(|n| tenant_view(n, &subnets)).collect();
    Ok(Json(json!({ "networks": list })))
}

async fn show_tenant(
    State(s): State<AppState>,
    auth: Auth,
    v: Microversion,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    proxy_api(v)?;
    let (n, subnets) = one(&s, &auth, &id).await?;
    Ok(Json(json!({ "network": tenant_view(&n, &subnets) })))
}
