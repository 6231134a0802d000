//! `shoal-dataplane`: the userspace side of Shoal networking.
//!
//! Owns loading the kernel programs of `ebpf/` with aya, attaching them, keeping their
//! maps equal to a [`DesiredState`], and the kernel-path driver (Linux vxlan + bridge +
//! nftables) that implements the same [`Dataplane`] trait. Both drivers are blocking:
//! callers on an async runtime use `spawn_blocking`.
//!
//! Must never depend on `shoal-consensus` or `node`: the network agent in `node`
//! translates Raft rows into a [`DesiredState`] and calls [`Dataplane::apply`].

pub mod abi;
pub mod ebpf;
pub mod kernel;
pub mod model;
pub mod netdev;
pub mod testbed;

use std::collections::BTreeMap;

pub use model::{
    DesiredState, Direction, EtherType, ExternalGateway, FloatingIp, Ipv4Cidr, LocalPort, Mac,
    Remote, RemotePort, Router, RouterInterface, RouterRoute, SecurityGroup, SgRule, Underlay,
};

/// Verdict counters by reason name (e.g. `pass_encap`, `drop_sg_ingress`), summed
/// over CPUs.
pub type Counters = BTreeMap<String, u64>;

/// A node's datapath. `apply` is incremental and idempotent: it moves the datapath from
/// whatever it holds to `desired`, touching only what differs.
pub trait Dataplane {
    type Error: std::error::Error + Send + Sync + 'static;

    /// Makes the datapath forward and filter exactly as `desired` says.
    fn apply(&mut self, desired: &DesiredState) -> Result<(), Self::Error>;

    /// Current verdict counters.
    fn counters(&self) -> Result<Counters, Self::Error>;

    /// Detaches everything this driver attached and deletes what it created.
    fn teardown(self) -> Result<(), Self::Error>
    where
        Self: Sized;
}
