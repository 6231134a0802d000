//! `/v2.0/quotas`: what `openstack quota show --network` and `quota set` call.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use shoal_network::DEFAULT_QUOTAS;

use super::{bad, caller, net_err, one, PREFIX};
use crate::api::error::ApiResult;
use crate::api::{AppState, Auth};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(&format!("{PREFIX}/quotas"), get(list))
        .route(
            &format!("{PREFIX}/quotas/{{project}}"),
            get(show).put(update).delete(reset),
        )
        .route(
            &format!("{PREFIX}/quotas/{{project}}/default"),
            get(defaults),
        )
        .route(
            &format!("{PREFIX}/quotas/{{project}}/details"),
            get(details),
        )
        .route(
            &format!("{PREFIX}/quotas/{{project}}/details.json"),
            get(details),
        )
}

/// Neutron's routes accept a `.json` suffix; the client asks for `{project}.json` at times.
fn project_of(p: &str) -> &str {
    p.strip_suffix(".json").unwrap_or(p)
}

fn limits_json(project: &str, limits: &BTreeMap<String, i64>) -> Value {
    let mut v = json!(limits);
    v["project_id"] = json!(project);
    v["tenant_id"] = json!(project);
    v
}

async fn list(State(s): State<AppState>, auth: Auth) -> ApiResult<Response> {
    let all = s
        .network
        .projects_with_quotas(&caller(&auth))
        .await
        .map_err(net_err)?;
    let items: Vec<Value> = all.iter().map(|(p, l)| limits_json(p, l)).collect();
    Ok(Json(json!({ "quotas": items })).into_response())
}

async fn show(
    State(s): State<AppState>,
    auth: Auth,
    Path(project): Path<String>,
) -> ApiResult<Response> {
    let project = project_of(&project);
    let limits = s
        .network
        .quotas(&caller(&auth), project)
        .await
        .map_err(net_err)?;
    Ok(one("quota", json!(limits)))
}

async fn defaults(
    State(s): State<AppState>,
    auth: Auth,
    Path(project): Path<String>,
) -> ApiResult<Response> {
    // Reading the defaults needs the same right as reading the project's quotas.
    s.network
        .quotas(&caller(&auth), &project)
        .await
        .map_err(net_err)?;
    let d: BTreeMap<&str, i64> = DEFAULT_QUOTAS.iter().copied().collect();
    Ok(one("quota", json!(d)))
}

async fn details(
    State(s): State<AppState>,
    auth: Auth,
    Path(project): Path<String>,
) -> ApiResult<Response> {
    let d = s
        .network
        .quota_details(&caller(&auth), &project)
        .await
        .map_err(net_err)?;
    Ok(one("quota", json!(d)))
}

/// `{"quota": {"port": 5, ...}}`; `force` and `check_limit` as Neutron takes them (the
/// client sends `check_limit: true` unless given `--force`).
async fn update(
    State(s): State<AppState>,
    auth: Auth,
    Path(project): Path<String>,
    bytes: Bytes,
) -> ApiResult<Response> {
    let project = project_of(&project);
    let v: Value = crate::api::body::parse(&bytes)?;
    let Some(Value::Object(mut q)) = v.get("quota").cloned() else {
        return Err(bad("Unable to find 'quota' in request body"));
    };
    let flag = |v: Option<Value>| v.is_some_and(|v| v == true || v == "true" || v == "True");
    let force = flag(q.remove("force"));
    let check = flag(q.remove("check_limit")) && !force;
    let mut changes = BTreeMap::new();
    for (k, v) in q {
        let n = match &v {
            Value::Number(n) => n.as_i64(),
            Value::String(s) => s.parse().ok(),
            _ => None,
        }
        .ok_or_else(|| {
            bad(format!(
                "Invalid input for {k}. Reason: '{v}' is not an integer."
            ))
        })?;
        changes.insert(k, n);
    }
    let limits = s
        .network
        .set_quotas(&caller(&auth), project, changes, check)
        .await
        .map_err(net_err)?;
    Ok(one("quota", json!(limits)))
}

async fn reset(
    State(s): State<AppState>,
    auth: Auth,
    Path(project): Path<String>,
) -> ApiResult<Response> {
    s.network
        .reset_quotas(&caller(&auth), project_of(&project))
        .await
        .map_err(net_err)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
