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
use shoal_state::tables;
use shoal_state::time::iso8601;

use crate::api::body::parse;
use crate::api::error::{ApiError, ApiResult};
use crate::api::{AppState, Auth};
use shoal_identity::token::Claims;
use shoal_identity::{has_role, AuthError, Scope, DEFAULT_DOMAIN_ID, DEFAULT_DOMAIN_NAME};

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
    #[serde(default)]
    system: Option<SystemRef>,
    #[serde(default)]
    domain: Option<Value>,
}

#[derive(Deserialize)]
struct SystemRef {
    #[serde(default)]
    all: bool,
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
    let body: AuthBody = parse(&body)?;
    let (project, system, domain) = match body.auth.scope {
        Some(s) => (s.project, s.system, s.domain),
        None => (None, None, None),
    };
    // Shoal has no role assignments on domains, so no user can hold the role a
    // domain-scoped token needs: Keystone's answer for that case is 401.
    if domain.is_some() {
        return Err(ApiError::unauthorized(
            "no role on the domain: Shoal grants roles on projects and on the system only",
        ));
    }
    let scope = match (project, system) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "a token is scoped to a project or to the system, not both",
            ))
        }
        (None, Some(SystemRef { all: true })) => Scope::System,
        (None, Some(_)) => {
            return Err(ApiError::bad_request(
                "scope.system must be {\"all\": true}",
            ))
        }
        (project, None) => match project {
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
        },
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
            .map_err(|e| match e {
                shoal_identity::token::TokenError::KeyRingBehind => {
                    ApiError::unavailable(e.to_string())
                }
                e => ApiError::unauthorized(format!("the token is not valid: {e}")),
            })?;
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
    let body = token_body(&state, &claims, true).await?;
    let mut resp = (StatusCode::CREATED, Json(body)).into_response();
    resp.headers_mut().insert(
        "X-Subject-Token",
        HeaderValue::from_str(&token).expect("tokens are ASCII"),
    );
    Ok(resp)
}

pub fn catalog(state: &AppState) -> Value {
    let entries: Vec<Value> = crate::api::SERVICES
        .iter()
        .map(|svc| {
            let url = format!("{}{}", state.base_url, svc.endpoint);
            let endpoints: Vec<Value> = ["public", "internal", "admin"]
                .iter()
                .map(|iface| {
                    json!({
                        "id": format!("{}-{iface}", svc.kind),
                        "interface": iface,
                        "region_id": state.region,
                        "region": state.region,
                        "url": url,
                    })
                })
                .collect();
            json!({ "id": svc.kind, "type": svc.kind, "name": svc.name, "endpoints": endpoints })
        })
        .collect();
    Value::Array(entries)
}

async fn token_body(state: &AppState, claims: &Claims, with_catalog: bool) -> ApiResult<Value> {
    let domain = json!({"id": claims.domain_id, "name": if claims.domain_id == DEFAULT_DOMAIN_ID { DEFAULT_DOMAIN_NAME } else { claims.domain_id.as_str() }});
    let mut token = json!({
        "methods": claims.auth_methods(),
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
                    .get(tables::ROLE_NAMES, name)
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
    } else if claims.system {
        let roles: Vec<Value> = claims
            .roles
            .iter()
            .zip(&claims.role_ids)
            .map(|(name, id)| json!({"id": id, "name": name}))
            .collect();
        token["system"] = json!({"all": true});
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
/// an admin, a reader on the system or a service may look at a token. A subject token that
/// does not validate (revoked, expired, forged) is 404 to everyone, as in Keystone; one that
/// validates but belongs to someone else is 403, so a member learns nothing about other
/// users' tokens beyond what holding the token string already tells.
fn may_inspect(auth: &Auth, headers: &HeaderMap, state: &AppState) -> ApiResult<Claims> {
    let claims = subject_claims(state, headers)?;
    if shoal_identity::policy::can_read_identity(&auth.0)
        || has_role(&auth.0, "service")
        || claims.user_id == auth.0.user_id
    {
        return Ok(claims);
    }
    Err(ApiError::forbidden(
        "only the token's own user, an admin or a service may validate a token",
    ))
}

async fn validate_token(
    State(state): State<AppState>,
    auth: Auth,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let claims = may_inspect(&auth, &headers, &state)?;
    let nocatalog = false;
    let body = token_body(&state, &claims, !nocatalog).await?;
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
