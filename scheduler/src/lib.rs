//! `shoal-scheduler`: Nova's filter-and-weigh placement as a pure, synchronous library.
//!
//! It owns the decision "which hosts get these instances": given a view of the hosts (from
//! the local Raft replica) and a request, it returns one [`Claim`] per instance or a typed
//! reason why none fits ([`ScheduleError`]), including Nova's per-filter "no valid host"
//! counts. It also owns the claim arithmetic ([`apply_claim`]) that the node's Raft
//! transaction applies on commit.
//!
//! It must never do I/O, read a clock, spawn threads or depend on `shoal-consensus` or the
//! node: the node reads the replica, calls [`Scheduler::select`], and commits the claims in a
//! transaction conditioned on each host's generation. Randomness comes only from the seeded
//! RNG in [`SchedulerConfig`], so every decision is reproducible.
#![deny(unsafe_code)]

pub mod extra_specs;
pub mod filters;
pub mod json_query;
pub mod model;
mod scheduler;
pub mod weighers;

#[cfg(test)]
mod reference;
#[cfg(test)]
mod tests;

pub use filters::{FilterKind, RequestError};
pub use json_query::QueryError;
pub use model::{
    apply_claim, Aggregate, AllocationRatios, Claim, ClaimError, Flavor, GroupPolicy, Host,
    ImageProperties, Request, SchedulerHints, ServerGroup,
};
pub use scheduler::{
    FilterCount, NoValidHost, ScheduleError, Scheduler, SchedulerConfig, ViewError,
};
pub use weighers::Multipliers;
