//! `shoal-consensus`: the cluster's replicated metadata.
//!
//! Owns the Raft engine wiring (openraft), the RocksDB log store and state machine, the QUIC
//! transport with mutual TLS, membership and join. It must never depend on libvirt, aya,
//! io_uring or anything of the node's services: they watch its tables, it knows nothing of them.

pub mod cluster;
pub mod join;
pub mod membership;
pub mod metrics;
pub mod net;
pub mod raft_types;
mod read_index;
pub mod store;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod wire;
