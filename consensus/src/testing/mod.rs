//! An in-process cluster fixture for tests: nodes on real RocksDB stores in a temporary
//! directory, connected by a [`Router`] that can isolate, partition, cut links one way, drop and
//! delay messages (openraft's `tests/tests/fixtures`, raft-rs's harness network).
//!
//! Built with `cfg(test)` or the `testing` feature, so the node's tests and the load-test tool
//! can reuse it; it is never part of a release binary.

mod cluster;
mod router;

pub use cluster::{test_config, ClusterError, TestCluster, TestNode};
pub use router::{NodeRouter, Router, RouterClient, TestRaft};
