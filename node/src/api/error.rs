//! API errors in OpenStack's body shapes, one mapping per API.
//!
//! Handlers return an [`ApiError`] (a status and a message, and for Neutron the error's
//! `type`); the body's shape is chosen once, at the edge, from the path the request was for
//! ([`Shape::for_path`]): Keystone and Shoal's own endpoints answer
//! `{"error": {"code", "title", "message"}}`; the compute service Nova's
//! `{"badRequest": {"code", "message"}}`; the image service Glance's webob body
//! `{"code", "title", "message"}`; the network service Neutron's
//! `{"NeutronError": {"type", "message", "detail"}}`. A response rendered before the edge sees
//! it (in a unit test, say) takes the shape the error was marked with, Keystone's by default.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use shoal_consensus::cluster::ClusterError;
use shoal_state::StateError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    shape: Shape,
}

/// Neutron's error `type` for an answer that names none (axum's own rejections, 500s).
fn neutron_default_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "HTTPBadRequest",
        401 => "HTTPUnauthorized",
        403 => "HTTPForbidden",
        404 => "HTTPNotFound",
        405 => "HTTPMethodNotAllowed",
        409 => "HTTPConflict",
        413 => "HTTPRequestEntityTooLarge",
        415 => "HTTPUnsupportedMediaType",
        503 => "HTTPServiceUnavailable",
        504 => "HTTPGatewayTimeout",
        _ => "HTTPInternalServerError",
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shape {
    Keystone,
    Nova,
    Glance,
    /// Neutron's body, with the error's `type` (`NetworkNotFound`).
    Neutron(String),
}

impl Shape {
    /// The shape of the API that serves `path`; `kind` is the Neutron error type, if the
    /// error named one.
    pub fn for_path(path: &str, status: StatusCode, kind: Option<&str>) -> Shape {
        let api = super::SERVICES
            .iter()
            .find(|s| path.starts_with(s.prefix))
            .map_or(ErrorApi::Keystone, |s| s.errors);
        match api {
            ErrorApi::Keystone => Shape::Keystone,
            ErrorApi::Nova => Shape::Nova,
            ErrorApi::Glance => Shape::Glance,
            ErrorApi::Neutron => Shape::Neutron(
                kind.unwrap_or_else(|| neutron_default_type(status))
                    .to_owned(),
            ),
        }
    }
}

/// Whose error body an API answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorApi {
    Keystone,
    Nova,
    Glance,
    Neutron,
}

/// What an error answer was made of, kept on the response so the edge can render it in the
/// shape of the API the request was for.
#[derive(Debug, Clone)]
pub struct ErrorParts {
    pub status: StatusCode,
    pub message: String,
    pub neutron_kind: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            shape: Shape::Keystone,
        }
    }

    /// Renders this error in Nova's shape (`{"badRequest": {"code", "message"}}`).
    pub fn nova(mut self) -> Self {
        self.shape = Shape::Nova;
        self
    }

    /// Renders this error in the shape of the API that serves `path`.
    pub fn for_path(mut self, path: &str) -> Self {
        let kind = match &self.shape {
            Shape::Neutron(k) => Some(k.clone()),
            _ => None,
        };
        self.shape = Shape::for_path(path, self.status, kind.as_deref());
        self
    }

    /// Renders this error as Glance does (`{"code", "title", "message"}`).
    pub fn glance(mut self) -> Self {
        self.shape = Shape::Glance;
        self
    }

    /// Renders this error as Neutron does, with `kind` as its `type`.
    pub fn neutron(mut self, kind: impl Into<String>) -> Self {
        self.shape = Shape::Neutron(kind.into());
        self
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    /// A 500 for `error`. Like every 500 it reaches the client with only a request id; the
    /// error is logged under that id when the response is made (see `IntoResponse`).
    pub fn internal_logged(error: &dyn std::error::Error) -> Self {
        Self::internal(error.to_string())
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, message)
    }

    /// 504: the write was sent and the cluster lost its leader before answering; it may have
    /// been applied. Unlike a 503 this tells the client to read before it retries.
    pub fn commit_unknown(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "{}; read the resource before retrying the request",
                message.into()
            ),
        )
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }
}

fn title(status: StatusCode) -> &'static str {
    status.canonical_reason().unwrap_or("Error")
}

fn nova_key(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "badRequest",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "itemNotFound",
        409 => "conflictingRequest",
        413 => "overLimit",
        503 => "serviceUnavailable",
        504 => "gatewayTimeout",
        _ => "computeFault",
    }
}

/// The body of an error answer in `shape`.
pub fn render(shape: &Shape, status: StatusCode, message: &str) -> serde_json::Value {
    let code = status.as_u16();
    match shape {
        Shape::Neutron(kind) => {
            json!({ "NeutronError": { "type": kind, "message": message, "detail": "" } })
        }
        Shape::Nova => json!({ nova_key(status): { "code": code, "message": message } }),
        Shape::Glance => json!({ "code": code, "title": title(status), "message": message }),
        Shape::Keystone => {
            json!({ "error": { "code": code, "title": title(status), "message": message } })
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(mut self) -> Response {
        let mut request_id = None;
        if self.status == StatusCode::INTERNAL_SERVER_ERROR {
            // What went wrong inside stays in the log, under an id the client can quote.
            let id = format!("req-{}", uuid::Uuid::new_v4());
            tracing::error!(request_id = %id, error = %self.message, "internal error");
            self.message = format!(
                "the server could not complete the request; the operator can find it in the \
                 logs under {id}"
            );
            request_id = Some(id);
        }
        if request_id.is_some() {
            // A 500's Neutron type would say what failed inside: it is scrubbed with the message.
            if let Shape::Neutron(kind) = &mut self.shape {
                *kind = neutron_default_type(self.status).to_owned();
            }
        }
        let parts = ErrorParts {
            status: self.status,
            message: self.message.clone(),
            neutron_kind: match &self.shape {
                Shape::Neutron(k) => Some(k.clone()),
                _ => None,
            },
        };
        let body = render(&self.shape, self.status, &self.message);
        let mut resp = (self.status, Json(body)).into_response();
        resp.extensions_mut().insert(parts);
        if let Some(id) = request_id {
            if let Ok(v) = axum::http::HeaderValue::from_str(&id) {
                resp.headers_mut().insert("x-openstack-request-id", v);
            }
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                "WWW-Authenticate",
                axum::http::HeaderValue::from_static("Keystone uri=\"/identity\""),
            );
        }
        resp
    }
}

impl From<ClusterError> for ApiError {
    fn from(e: ClusterError) -> Self {
        match &e {
            ClusterError::BadRequest(_) => ApiError::bad_request(e.to_string()),
            ClusterError::NotFound(_) => ApiError::not_found(e.to_string()),
            ClusterError::Conflict(_) => ApiError::conflict(e.to_string()),
            ClusterError::Unavailable(_) => ApiError::unavailable(e.to_string()),
            ClusterError::CommitUnknown(_) => ApiError::commit_unknown(e.to_string()),
            _ => ApiError::internal_logged(&e),
        }
    }
}

impl From<StateError> for ApiError {
    fn from(e: StateError) -> Self {
        match &e {
            StateError::NotFound { .. } => ApiError::not_found(e.to_string()),
            StateError::AlreadyExists { .. } | StateError::Contended { .. } => {
                ApiError::conflict(e.to_string())
            }
            StateError::Unavailable(_) => ApiError::unavailable(e.to_string()),
            StateError::CommitUnknown(_) => ApiError::commit_unknown(e.to_string()),
            StateError::Rejected(_) => ApiError::bad_request(e.to_string()),
            StateError::Corrupt { .. } => ApiError::internal_logged(&e),
        }
    }
}

impl From<shoal_compute::error::ComputeError> for ApiError {
    /// Compute errors are answered in Nova's shape.
    fn from(e: shoal_compute::error::ComputeError) -> Self {
        use shoal_compute::error::ComputeError as E;
        match e {
            E::BadRequest(m) => ApiError::bad_request(m),
            E::NotFound(m) => ApiError::not_found(m),
            E::Conflict(m) => ApiError::conflict(m),
            E::OverQuota(m) => ApiError::forbidden(m),
            E::NotImplemented(m) => ApiError::new(StatusCode::NOT_IMPLEMENTED, m),
            E::Internal(m) => ApiError::internal(m),
            E::State(e) => e.into(),
        }
        .nova()
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
