//! `/v2.0/security-groups` and `/v2.0/security-group-rules`.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};
use shoal_network::ip::normalize_prefix;
use shoal_network::records::{RuleRecord, SecurityGroupRecord};

use super::{body, caller, created, listing, net_err, one, pick_fields, timestamp, Params, PREFIX};
use crate::api::error::ApiResult;
use crate::api::{AppState, Auth};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(&format!("{PREFIX}/security-groups"), get(list).post(create))
        .route(
            &format!("{PREFIX}/security-groups/{{id}}"),
            get(show).put(update).delete(delete),
        )
        .route(
            &format!("{PREFIX}/security-group-rules"),
            get(list_rules).post(create_rule),
        )
        .route(
            &format!("{PREFIX}/security-group-rules/{{id}}"),
            get(show_rule).delete(delete_rule),
        )
}

fn rule_view(r: &RuleRecord) -> Value {
    let normalized = r
        .remote_ip_prefix
        .as_deref()
        .and_then(|p| normalize_prefix(p, r.ethertype == "IPv6").ok());
    json!({
        "id": r.id,
        "project_id": r.project_id,
        "tenant_id": r.project_id,
        "security_group_id": r.security_group_id,
        "direction": r.direction,
        "ethertype": r.ethertype,
        "protocol": r.protocol,
        "port_range_min": r.port_range_min,
        "port_range_max": r.port_range_max,
        "remote_ip_prefix": r.remote_ip_prefix,
        "normalized_cidr": normalized,
        "remote_group_id": r.remote_group_id,
        "remote_address_group_id": null,
        "description": r.description,
        "created_at": timestamp(r.created_at),
        "updated_at": timestamp(r.updated_at),
        "revision_number": r.revision_number,
    })
}

fn view(g: &SecurityGroupRecord, rules: &[RuleRecord]) -> Value {
    json!({
        "id": g.id,
        "name": g.name,
        "description": g.description,
        "project_id": g.project_id,
        "tenant_id": g.project_id,
        "stateful": true,
        "shared": false,
        "security_group_rules": rules.iter().map(rule_view).collect::<Vec<_>>(),
        "tags": g.tags,
        "created_at": timestamp(g.created_at),
        "updated_at": timestamp(g.updated_at),
        "revision_number": g.revision_number,
    })
}

async fn list(State(s): State<AppState>, auth: Auth, q: Params) -> ApiResult<Response> {
    let c = caller(&auth);
    let groups = s.network.list_security_groups(&c).await.map_err(net_err)?;
    let rules = s.network.rules_by_group(&c).await.map_err(net_err)?;
    let items = groups
        .iter()
        .map(|g| view(g, rules.get(&g.id).map_or(&[][..], Vec::as_slice)))
        .collect();
    listing("security_groups", items, &q.0, &s.base_url)
}

async fn group_view(
    s: &AppState,
    c: &shoal_network::Caller,
    g: &SecurityGroupRecord,
) -> ApiResult<Value> {
    let rules = s.network.rules_by_group(c).await.map_err(net_err)?;
    Ok(view(g, rules.get(&g.id).map_or(&[][..], Vec::as_slice)))
}

async fn show(
    State(s): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    q: Params,
) -> ApiResult<Response> {
    let c = caller(&auth);
    let g = s.network.security_group(&c, &id).await.map_err(net_err)?;
    Ok(one(
        "security_group",
        pick_fields(group_view(&s, &c, &g).await?, &q.0),
    ))
}

async fn create(State(s): State<AppState>, auth: Auth, bytes: Bytes) -> ApiResult<Response> {
    let c = caller(&auth);
    let req = body(&bytes, "security_group")?;
    let g = s
        .network
        .create_security_group(&c, req)
        .await
        .map_err(net_err)?;
    Ok(created("security_group", group_view(&s, &c, &g).await?))
}

async fn update(
    State(s): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    bytes: Bytes,
) -> ApiResult<Response> {
    let c = caller(&auth);
    let req = body(&bytes, "security_group")?;
    let g = s
        .network
        .update_security_group(&c, &id, req)
        .await
        .map_err(net_err)?;
    Ok(one("security_group", group_view(&s, &c, &g).await?))
}

async fn delete(
    State(s): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    s.network
        .delete_security_group(&caller(&auth), &id)
        .await
        .map_err(net_err)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn list_rules(State(s): State<AppState>, auth: Auth, q: Params) -> ApiResult<Response> {
    let rules = s
        .network
        .list_rules(&caller(&auth))
        .await
        .map_err(net_err)?;
    listing(
        "security_group_rules",
        rules.iter().map(rule_view).collect(),
        &q.0,
        &s.base_url,
    )
}

async fn show_rule(
    State(s): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    q: Params,
) -> ApiResult<Response> {
    let r = s.network.rule(&caller(&auth), &id).await.map_err(net_err)?;
    Ok(one("security_group_rule", pick_fields(rule_view(&r), &q.0)))
}

async fn create_rule(State(s): State<AppState>, auth: Auth, bytes: Bytes) -> ApiResult<Response> {
    let req = body(&bytes, "security_group_rule")?;
    let r = s
        .network
        .create_rule(&caller(&auth), req)
        .await
        .map_err(net_err)?;
    Ok(created("security_group_rule", rule_view(&r)))
}

async fn delete_rule(
    State(s): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    s.network
        .delete_rule(&caller(&auth), &id)
        .await
        .map_err(net_err)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
