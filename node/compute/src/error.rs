//! What a compute operation can end in. The HTTP edge maps each kind to Nova's status and
//! body; a state failure keeps the table and key it was about.

use shoal_state::StateError;

#[derive(Debug, thiserror::Error)]
pub enum ComputeError {
    /// The request asks for something invalid; the message names the field.
    #[error("{0}")]
    BadRequest(String),
    /// The resource does not exist, or the caller may not see it.
    #[error("{0}")]
    NotFound(String),
    /// The caller's project or user already holds all its quota allows.
    #[error("{0}")]
    OverQuota(String),
    /// The request conflicts with the stored state (a duplicate, a concurrent change).
    #[error("{0}")]
    Conflict(String),
    /// The request asks for something Shoal's hosts do not do (Nova's libvirt driver does
    /// not either).
    #[error("{0}")]
    NotImplemented(String),
    /// Something inside the service failed (key generation); the edge logs it and answers a
    /// bare 500.
    #[error("{0}")]
    Internal(String),
    /// Reading or writing the replicated state failed.
    #[error(transparent)]
    State(#[from] StateError),
}
