//! API errors in OpenStack's body shapes.
//!
//! Keystone and Shoal's own endpoints answer `{"error": {"code", "title", "message"}}`; the
//! compute, network and volume services use Nova's `{"badRequest": {"code", "message"}}`
//! shape through [`ApiError::nova`]; the image service answers as Glance's webob does,
//! `{"code", "title", "message"}` at top level, through [`ApiError::glance`]; the network
//! service answers as Neutron does, `{"NeutronError": {"type", "message", "detail"}}`, through
//! [`ApiError::neutron`].

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
        _ => "HTTPInternalServerError",
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Shape {
    Keystone,
    Nova,
    Glance,
    /// Neutron's body, with the error's `type` (`NetworkNotFound`).
    Neutron(String),
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
    pub fn for_path(self, path: &str) -> Self {
        if path.starts_with("/compute") {
            self.nova()
        } else if path.starts_with("/network") {
            let kind = neutron_default_type(self.status);
            self.neutron(kind)
        } else if path.starts_with("/image") {
            self.glance()
        } else {
            self
        }
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
        _ => "computeFault",
    }
}

impl IntoResponse for ApiError {
    fn into_response(mut self) -> Response {
        let code = self.status.as_u16();
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
        let body = match &self.shape {
            // A 500's type would say what failed inside: it is scrubbed with the message.
            Shape::Neutron(_) if request_id.is_some() => {
                json!({ "NeutronError": { "type": neutron_default_type(self.status), "message": self.message, "detail": "" } })
            }
            Shape::Neutron(kind) => {
                json!({ "NeutronError": { "type": kind, "message": self.message, "detail": "" } })
            }
            Shape::Nova => {
                json!({ nova_key(self.status): { "code": code, "message": self.message } })
            }
            Shape::Glance => {
                json!({ "code": code, "title": title(self.status), "message": self.message })
            }
            Shape::Keystone => {
                json!({ "error": { "code": code, "title": title(self.status), "message": self.message } })
            }
        };
        let mut resp = (self.status, Json(body)).into_response();
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
            StateError::Rejected(_) => ApiError::bad_request(e.to_string()),
            StateError::Corrupt { .. } => ApiError::internal_logged(&e),
        }
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
