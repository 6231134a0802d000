//! The compute service: where servers go and how they come to run.
//!
//! Owns the compute records, their tables and their rules; the HTTP edge (`api/nova` in the
//! binary) only translates requests into calls here and `ComputeError`s into Nova's bodies:
//! - `flavor`: flavors, their extra specs and access lists (`flavors`, `flavor_names`);
//! - `quota`: Nova's quotas, the default class and project overrides (`quotas`,
//!   `quota_classes`);
//! - `keypair`: users' SSH public keys, their checks and the quota-bounded create
//!   (`keypairs`);
//! - `aggregate`: host aggregates, their ids and names, host membership and the availability
//!   zones derived from them (`aggregates`, `aggregate_names`);
//! - `server_group`: server groups, their policy and live members (`server_groups`);
//! - `service`: the compute service of each host (the cluster's members), enabled or
//!   disabled, and how hosts and hypervisors are looked up (`compute_services`);
//! - `placement`: host registration and claims committed in one Raft transaction (`hosts`,
//!   `instances`);
//! - `host_view`: the scheduler's view of the hosts, kept current by watches;
//! - `server`: the server record (Nova's instance, `servers`), its states and the transitions
//!   the API may ask for;
//! - `usage`: deleted servers' tombstones (`deleted_servers`), their purge, and the usage
//!   report Nova's `os-simple-tenant-usage` gives;
//! - `events`: external events (`os-server-external-events`) and what each one does;
//! - `snapshot`: what a server snapshot's image inherits, and the flattened root disk;
//! - `configdrive`: the config drive, an ISO 9660 image of the metadata documents;
//! - `nics`: a server's NICs as its port, network and subnet rows say now, the one lookup
//!   behind the config drive's and the metadata service's `network_data.json`;
//! - `disks`: a flavor's ephemeral and swap disks (formatted bases and qcow2 overlays);
//! - `imagecache`: aging of unused base files, as Nova's image cache manager;
//! - `domain`: the libvirt domain XML, rendered as Nova's libvirt driver writes it;
//! - `hypervisor`: the libvirt driver (blocking calls run off the async runtime);
//! - `metadata`: the documents of the metadata service (Nova's layout), pure;
//! - `agent`: the compute agent every node runs, which drives the servers placed on its node
//!   to the state their rows ask for.
//!
//! Must never depend on the HTTP layer (axum) or on another service's internals: the image
//! bytes reach the agent through the `ImageSource` the binary hands it, and ports through the
//! replicated `ports` table.

pub mod agent;
pub mod aggregate;
pub mod configdrive;
pub mod disks;
pub mod domain;
pub mod error;
pub mod events;
pub mod flavor;
pub mod host_view;
pub mod hypervisor;
pub mod imagecache;
pub mod keypair;
pub mod metadata;
pub mod migrate;
pub mod nics;
pub mod placement;
pub mod quota;
pub mod server;
pub mod server_group;
pub mod service;
pub mod snapshot;
pub mod usage;
