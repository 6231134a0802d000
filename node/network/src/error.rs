//! What a network operation can end in, with the Neutron error type each one is reported as.

use shoal_state::StateError;

/// The HTTP class of an error; the edge maps it to a status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    BadRequest,
    Forbidden,
    NotFound,
    Conflict,
    Unavailable,
    /// The write was sent and its outcome is unknown (the leader was lost before it answered).
    Unknown,
    Internal,
}

/// The kinds of resource this service owns, as Neutron names them in messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    Network,
    Subnet,
    SubnetPool,
    Port,
    SecurityGroup,
    SecurityGroupRule,
    Router,
    FloatingIp,
}

impl Resource {
    /// Neutron's name, used in error types (`NetworkNotFound`) and messages.
    pub fn name(self) -> &'static str {
        match self {
            Resource::Network => "Network",
            Resource::Subnet => "Subnet",
            Resource::SubnetPool => "SubnetPool",
            Resource::Port => "Port",
            Resource::SecurityGroup => "SecurityGroup",
            Resource::SecurityGroupRule => "SecurityGroupRule",
            Resource::Router => "Router",
            Resource::FloatingIp => "FloatingIP",
        }
    }

    fn words(self) -> &'static str {
        match self {
            Resource::Network => "Network",
            Resource::Subnet => "Subnet",
            Resource::SubnetPool => "Subnet pool",
            Resource::Port => "Port",
            Resource::SecurityGroup => "Security group",
            Resource::SecurityGroupRule => "Security group rule",
            Resource::Router => "Router",
            Resource::FloatingIp => "Floating IP",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The request is malformed or asks for something invalid.
    #[error("{message}")]
    BadRequest { kind: &'static str, message: String },
    /// Policy refuses the caller this action or attribute.
    #[error("{0}")]
    Forbidden(String),
    /// The resource does not exist, or the caller may not see it.
    #[error("{} {id} could not be found.", .resource.words())]
    NotFound { resource: Resource, id: String },
    /// Something the request names is missing, with Neutron's own error type
    /// (`RouterInterfaceNotFound`).
    #[error("{message}")]
    Missing { kind: &'static str, message: String },
    /// The request conflicts with the state: in use, already allocated, a duplicate.
    #[error("{message}")]
    Conflict { kind: &'static str, message: String },
    /// A create would take the project past its quota of `resource`.
    #[error("Quota exceeded for resources: ['{resource}'].")]
    OverQuota { resource: &'static str },
    /// Every VXLAN network identifier of the configured range is taken.
    #[error(
        "Unable to create the network. No tenant network is available for allocation \
         (the VNI range {first}-{last} is exhausted)."
    )]
    NoSegment { first: u32, last: u32 },
    #[error(transparent)]
    State(#[from] StateError),
}

pub type NetResult<T> = Result<T, NetworkError>;

impl NetworkError {
    pub fn bad(message: impl Into<String>) -> Self {
        NetworkError::BadRequest {
            kind: "HTTPBadRequest",
            message: message.into(),
        }
    }

    /// Neutron's `InvalidInput`: "Invalid input for operation: ...".
    pub fn invalid(message: impl std::fmt::Display) -> Self {
        NetworkError::BadRequest {
            kind: "InvalidInput",
            message: format!("Invalid input for operation: {message}"),
        }
    }

    pub fn conflict(kind: &'static str, message: impl Into<String>) -> Self {
        NetworkError::Conflict {
            kind,
            message: message.into(),
        }
    }

    pub fn not_found(resource: Resource, id: &str) -> Self {
        NetworkError::NotFound {
            resource,
            id: crate::ip::shown(id),
        }
    }

    /// Neutron's policy refusal for `rule` (`create_network:shared`).
    pub fn policy(rule: &str) -> Self {
        NetworkError::Forbidden(format!("(rule:{rule}) is disallowed by policy"))
    }

    pub fn class(&self) -> ErrorClass {
        match self {
            NetworkError::BadRequest { .. } => ErrorClass::BadRequest,
            NetworkError::Forbidden(_) => ErrorClass::Forbidden,
            NetworkError::NotFound { .. } | NetworkError::Missing { .. } => ErrorClass::NotFound,
            NetworkError::Conflict { .. } | NetworkError::OverQuota { .. } => ErrorClass::Conflict,
            NetworkError::NoSegment { .. } => ErrorClass::Unavailable,
            NetworkError::State(e) => match e {
                StateError::NotFound { .. } => ErrorClass::NotFound,
                StateError::AlreadyExists { .. } | StateError::Contended { .. } => {
                    ErrorClass::Conflict
                }
                StateError::Unavailable(_) => ErrorClass::Unavailable,
                StateError::CommitUnknown(_) => ErrorClass::Unknown,
                StateError::Rejected(_) => ErrorClass::BadRequest,
                StateError::Corrupt { .. } => ErrorClass::Internal,
            },
        }
    }

    /// The `type` of Neutron's error body.
    pub fn neutron_type(&self) -> String {
        match self {
            NetworkError::BadRequest { kind, .. }
            | NetworkError::Conflict { kind, .. }
            | NetworkError::Missing { kind, .. } => (*kind).to_owned(),
            NetworkError::Forbidden(_) => "PolicyNotAuthorized".into(),
            NetworkError::NotFound { resource, .. } => format!("{}NotFound", resource.name()),
            NetworkError::OverQuota { .. } => "OverQuota".into(),
            NetworkError::NoSegment { .. } => "NoNetworkAvailable".into(),
            NetworkError::State(StateError::Contended { .. }) => "Conflict".into(),
            NetworkError::State(StateError::Unavailable(_)) => "ServiceUnavailable".into(),
            NetworkError::State(_) => "HTTPInternalServerError".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_and_classes_follow_neutron() {
        let e = NetworkError::not_found(Resource::SecurityGroup, "x");
        assert_eq!(e.neutron_type(), "SecurityGroupNotFound");
        assert_eq!(e.to_string(), "Security group x could not be found.");
        assert_eq!(e.class(), ErrorClass::NotFound);
        let q = NetworkError::OverQuota { resource: "port" };
        assert_eq!(q.to_string(), "Quota exceeded for resources: ['port'].");
        assert_eq!(q.class(), ErrorClass::Conflict);
        let corrupt = NetworkError::State(StateError::Corrupt {
            table: "ports",
            key: "k".into(),
            reason: "r".into(),
        });
        assert_eq!(corrupt.class(), ErrorClass::Internal);
    }
}
