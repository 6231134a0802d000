//! Identity v3 (Keystone): version discovery, password authentication, token validation and
//! revocation, the catalog.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::{ApiError, ApiResult};
use super::{AppState, Auth};
use crate::identity::token::Claims;
use crate::identity::{
    has_role, AuthError, Scope, DEFAULT_DOMAIN_ID, DEFAULT_DOMAIN_NAME, T_ROLE_NAMES,
};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/identity", get(versions))
        .route("/identity/", get(versions))
        .route("/identity/v3", get(version))
        .route("/identity/v3/", get(version))
        .route(
            "/identity/v3/auth/tokens",
            get(validate_token)
                .head(check_token)
                .post(issue_token)
                .delete(revoke_token),
        )
        .route("/identity/v3/auth/catalog", get(auth_catalog))
        .route("/identity/v3/auth/projects", get(auth_projects))
}

fn v3_entry(state: &AppState) -> Value {
    json!({
        "id": "v3.14",
        "status": "stable",
        "updated": "2020-04-07T00:00:00Z",
        "links": [{"rel": "self", "href": format!("{}/identity/v3/", state.base_url)}],
        "media-types": [{"base": "application/json", "type": "application/vnd.openstack.identity-v3+json"}],
    })
}

async fn versions(State(state): State<AppState>) -> Response {
    (
        StatusCode::MULTIPLE_CHOICES,
        Json(json!({"versions": {"values": [v3_entry(&state)]}})),
    )
        .into_response()
}

async fn version(State(state): State<AppState>) -> Json<Value> {
    Json(json!({ "version": v3_entry(&state) }))
}

/// Parses a JSON body into `T`, answering 400 with serde's description of what was wrong.
pub fn parse_body<T: for<'de> Deserialize<'de>>(body: &Bytes) -> ApiResult<T> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid: {e}")))
}

#[derive(Deserialize)]
struct AuthBody {
    auth: AuthSection,
}

#[derive(Deserialize)]
struct AuthSection {
    identity: IdentitySection,
    #[serde(default)]
    scope: Option<ScopeSection>,
}

#[derive(Deserialize)]
struct IdentitySection {
    methods: Vec<String>,
    #[serde(default)]
    password: Option<PasswordSection>,
    #[serde(default)]
    token: Option<TokenSection>,
}

#[derive(Deserialize)]
struct TokenSection {
    id: String,
}

#[derive(Deserialize)]
struct PasswordSection {
    user: UserRef,
}

#[derive(Deserialize)]
struct UserRef {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    domain: Option<DomainRef>,
    password: String,
}

#[derive(Deserialize)]
struct DomainRef {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

#[derive(Deserialize)]
struct ScopeSection {
    #[serde(default)]
    project: Option<ProjectRef>,
}

#[derive(Deserialize)]
struct ProjectRef {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    domain: Option<DomainRef>,
}

fn domain_name(d: &Option<DomainRef>) -> String {
    match d {
        Some(DomainRef { name: Some(n), .. }) => n.clone(),
        Some(DomainRef { id: Some(id), .. }) => id.clone(),
        _ => DEFAULT_DOMAIN_NAME.to_owned(),
    }
}

async fn issue_token(
    State(state): State<AppState>,
    extensions: axum::http::Extensions,
    body: Bytes,
) -> ApiResult<Response> {
    let source = extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip());
    let body: AuthBody = parse_body(&body)?;
    let scope = match body.auth.scope.and_then(|s| s.project) {
        None => Scope::Unscoped,
        Some(ProjectRef { id: Some(id), .. }) => Scope::ProjectId(id),
        Some(ProjectRef {
            name: Some(name),
            domain,
            ..
        }) => Scope::ProjectName {
            name,
            domain_name: domain_name(&domain),
        },
        Some(_) => {
            return Err(ApiError::bad_request(
                "scope.project needs an id, or a name and a domain",
            ))
        }
    };
    let methods = &body.auth.identity.methods;
    let result = if methods.iter().any(|m| m == "password") {
        let pw = body.auth.identity.password.ok_or_else(|| {
            ApiError::bad_request("identity.password is required for the password method")
        })?;
        let user_name = match (&pw.user.name, &pw.user.id) {
            (Some(n), _) => n.clone(),
            (None, Some(id)) => state
                .identity
                .get_user(id)
                .await?
                .map(|u| u.name)
                .ok_or_else(|| {
                    ApiError::unauthorized("the request you have made requires authentication")
                })?,
            (None, None) => {
                return Err(ApiError::bad_request(
                    "identity.password.user needs a name or an id",
                ))
            }
        };
        let domain = if pw.user.id.is_some() && pw.user.name.is_none() {
            DEFAULT_DOMAIN_NAME.to_owned()
        } else {
            domain_name(&pw.user.domain)
        };
        state
            .identity
            .authenticate_password(&user_name, &domain, &pw.user.password, &scope, source)
            .await
    } else if methods.iter().any(|m| m == "token") {
        // Re-scoping: exchange a valid token for another scope of the same user.
        let tok = body.auth.identity.token.ok_or_else(|| {
            ApiError::bad_request("identity.token is required for the token method")
        })?;
        let claims = state
            .identity
            .validate_fresh(&tok.id)
            .await
            .map_err(|e| ApiError::unauthorized(format!("the token is not valid: {e}")))?;
        state.identity.rescope(&claims, &scope).await
    } else {
        return Err(ApiError::bad_request(format!(
            "unsupported authentication methods {methods:?}; use password or token"
        )));
    };
    let (token, claims) = match result {
        Ok(v) => v,
        Err(AuthError::Cluster(e)) => return Err(e.into()),
        Err(e @ (AuthError::NoSigningKey | AuthError::Busy(_))) => {
            return Err(ApiError::unavailable(e.to_string()))
        }
        Err(e) => {
            state.metrics.auth_failures.inc();
            static REFUSALS: crate::logging::Throttle = crate::logging::Throttle::new(5);
            if let Some(held_back) = REFUSALS.admit() {
                tracing::info!(reason = %e, ?source, held_back, "authentication refused");
            }
            return Err(ApiError::unauthorized(
                "the request you have made requires authentication",
            ));
        }
    };
    state.metrics.tokens_issued.inc();
    let body = token_body(&state, &claims, methods.clone(), true).await?;
    let mut resp = (StatusCode::CREATED, Json(body)).into_response();
    resp.headers_mut().insert(
        "X-Subject-Token",
        HeaderValue::from_str(&token).expect("tokens are ASCII"),
    );
    Ok(resp)
}

/// RFC 3339 with microseconds and `Z`, as Keystone prints times.
pub fn iso8601(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.000000Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

pub fn catalog(state: &AppState) -> Value {
    let service = |kind: &str, name: &str, path: &str| {
        let url = format!("{}{path}", state.base_url);
        let endpoints: Vec<Value> = ["public", "internal", "admin"]
            .iter()
            .map(|iface| {
                json!({
                    "id": format!("{kind}-{iface}"),
                    "interface": iface,
                    "region_id": state.region,
                    "region": state.region,
                    "url": url,
                })
            })
            .collect();
        json!({ "id": kind, "type": kind, "name": name, "endpoints": endpoints })
    };
    json!([
        service("identity", "keystone", "/identity"),
        service("compute", "nova", "/compute/v2.1"),
        service("image", "glance", "/image"),
        service("network", "neutron", "/network"),
    ])
}

async fn token_body(
    state: &AppState,
    claims: &Claims,
    methods: Vec<String>,
    with_catalog: bool,
) -> ApiResult<Value> {
    let domain = json!({"id": claims.domain_id, "name": if claims.domain_id == DEFAULT_DOMAIN_ID { DEFAULT_DOMAIN_NAME } else { claims.domain_id.as_str() }});
    let mut token = json!({
        "methods": methods,
        "user": {"id": claims.user_id, "name": claims.user_name, "domain": domain, "password_expires_at": null},
        "audit_ids": [claims.jti],
        "expires_at": iso8601(claims.exp),
        "issued_at": iso8601(claims.iat),
    });
    if let (Some(pid), Some(pname)) = (&claims.project_id, &claims.project_name) {
        // Tokens carry role ids and the project's domain, so validating one reads nothing from
        // the store; tokens issued before they did are answered with a lookup.
        let roles: Vec<Value> = if claims.role_ids.len() == claims.roles.len() {
            claims
                .roles
                .iter()
                .zip(&claims.role_ids)
                .map(|(name, id)| json!({"id": id, "name": name}))
                .collect()
        } else {
            let mut roles = Vec::new();
            for name in &claims.roles {
                let id = state
                    .cluster
                    .get(T_ROLE_NAMES, name)
                    .await?
                    .map(|r| String::from_utf8_lossy(&r.value).into_owned())
                    .unwrap_or_default();
                roles.push(json!({"id": id, "name": name}));
            }
            roles
        };
        let project_domain = match &claims.project_domain_id {
            Some(d) => d.clone(),
            None => state
                .identity
                .get_project(pid)
                .await?
                .map(|p| p.domain_id)
                .unwrap_or_else(|| DEFAULT_DOMAIN_ID.to_owned()),
        };
        token["project"] = json!({"id": pid, "name": pname, "domain": {"id": project_domain, "name": if project_domain == DEFAULT_DOMAIN_ID { DEFAULT_DOMAIN_NAME } else { project_domain.as_str() }}});
        token["is_domain"] = json!(false);
        token["roles"] = json!(roles);
        if with_catalog {
            token["catalog"] = catalog(state);
        }
    }
    Ok(json!({ "token": token }))
}

fn subject_claims(state: &AppState, headers: &HeaderMap) -> ApiResult<Claims> {
    let subject = headers
        .get("x-subject-token")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| ApiError::bad_request("the X-Subject-Token header is required"))?;
    state
        .identity
        .validate(subject)
        .map_err(|e| ApiError::not_found(format!("could not find token: {e}")))
}

/// Keystone's `identity:validate_token` and `identity:check_token`: the token's own subject,
/// an admin, or a service may look at a token; anyone else gets 403, before the subject token
/// is even looked at, so a member cannot probe other users' tokens.
fn may_inspect(auth: &Auth, headers: &HeaderMap, state: &AppState) -> ApiResult<Claims> {
    let claims = subject_claims(state, headers);
    if has_role(&auth.0, "admin") || has_role(&auth.0, "service") {
        return claims;
    }
    match claims {
        Ok(c) if c.user_id == auth.0.user_id => Ok(c),
        _ => Err(ApiError::forbidden(
            "only the token's own user, an admin or a service may validate a token",
        )),
    }
}

async fn validate_token(
    State(state): State<AppState>,
    auth: Auth,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let claims = may_inspect(&auth, &headers, &state)?;
    let nocatalog = false;
    let body = token_body(&state, &claims, vec!["password".into()], !nocatalog).await?;
    let mut resp = Json(body).into_response();
    if let Some(v) = headers.get("x-subject-token") {
        resp.headers_mut().insert("X-Subject-Token", v.clone());
    }
    Ok(resp)
}

async fn check_token(
    State(state): State<AppState>,
    auth: Auth,
    headers: HeaderMap,
) -> ApiResult<StatusCode> {
    may_inspect(&auth, &headers, &state)?;
    Ok(StatusCode::OK)
}

async fn revoke_token(
    State(state): State<AppState>,
    auth: Auth,
    headers: HeaderMap,
) -> ApiResult<StatusCode> {
    let claims = subject_claims(&state, &headers)?;
    // A user may revoke their own tokens; revoking another user's needs admin.
    if claims.user_id != auth.0.user_id {
        auth.require_admin()?;
    }
    state.identity.revoke(&claims).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn auth_catalog(State(state): State<AppState>, _auth: Auth) -> Json<Value> {
    Json(
        json!({ "catalog": catalog(&state), "links": {"self": format!("{}/identity/v3/auth/catalog", state.base_url)} }),
    )
}

async fn auth_projects(State(state): State<AppState>, auth: Auth) -> ApiResult<Json<Value>> {
    let projects = state.identity.projects_of_user(&auth.0.user_id).await?;
    let list: Vec<Value> = projects
        .into_iter()
        .map(|p| json!({"id": p.id, "name": p.name, "domain_id": p.domain_id, "enabled": p.enabled, "description": p.description, "is_domain": false, "parent_id": p.domain_id, "links": {"self": format!("{}/identity/v3/projects/{}", state.base_url, p.id)}}))
        .collect();
    Ok(Json(
        json!({ "projects": list, "links": {"self": format!("{}/identity/v3/auth/projects", state.base_url), "next": null, "previous": null} }),
    ))
}

#[cfg(test)]
mod tests {
    use super::iso8601;

    #[test]
    fn iso8601_formats_known_instants() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(iso8601(951_782_400), "2000-02-29T00:00:00.000000Z");
        assert_eq!(iso8601(1_795_000_000), "2026-11-18T11:06:40.000000Z");
    }
}
