//! The compute service: where servers go and how they come to run.
//!
//! Owns the `hosts`, `instances` (placement claims) and `servers` tables' records and rules:
//! - `placement`: host registration and claims committed in one Raft transaction;
//! - `server`: the server record (Nova's instance), its states and the transitions the API
//!   may ask for;
//! - `domain`: the libvirt domain XML, rendered as Nova's libvirt driver writes it;
//! - `hypervisor`: the libvirt driver (blocking calls run off the async runtime);
//! - `agent`: the compute agent every node runs, which drives the servers placed on its node
//!   to the state their rows ask for.
//!
//! Must never depend on the HTTP layer (axum) or on another service's internals: the image
//! bytes reach the agent through the `ImageSource` the binary hands it, and ports through the
//! replicated `ports` table.

pub mod agent;
pub mod domain;
pub mod hypervisor;
pub mod placement;
pub mod server;
