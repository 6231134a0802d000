//! Every table name of the node's keyspace, in one place. A row's key format is written next
//! to its table; the record types live with the service that owns the table.

// identity
pub const DOMAINS: &str = "domains";
pub const PROJECTS: &str = "projects";
pub const PROJECT_NAMES: &str = "project_names";
pub const USERS: &str = "users";
pub const USER_NAMES: &str = "user_names";
pub const ROLES: &str = "roles";
pub const ROLE_NAMES: &str = "role_names";
pub const ASSIGNMENTS: &str = "role_assignments";
pub const SIGNING_KEYS: &str = "signing_keys";
pub const REVOKED: &str = "revoked_tokens";

// compute
/// Key: flavor id.
pub const FLAVORS: &str = "flavors";
/// Key: flavor name; value: flavor id.
pub const FLAVOR_NAMES: &str = "flavor_names";
/// Key: `{user_id}/{name}`.
pub const KEYPAIRS: &str = "keypairs";
/// Key: project id (or the default-quota key).
pub const QUOTAS: &str = "quotas";
/// Key: host name.
pub const COMPUTE_SERVICES: &str = "compute_services";
pub const QUOTA_GUARDS: &str = "quota_guards";
/// Key: zero-padded aggregate id.
pub const AGGREGATES: &str = "aggregates";
pub const AGGREGATE_NAMES: &str = "aggregate_names";
pub const SERVER_GROUPS: &str = "server_groups";

// images
/// Key: image id.
pub const IMAGES: &str = "images";
/// Key: `{image_id}/{member}`.
pub const IMAGE_MEMBERS: &str = "image_members";

// servers
/// Key: server uuid; value: the compute service's `ServerRecord`.
pub const SERVERS: &str = "servers";

// placement
/// Key: host name.
pub const HOSTS: &str = "hosts";
/// Key: instance id.
pub const INSTANCES: &str = "instances";

// image replication
pub const IMAGE_MANIFESTS: &str = "image_manifests";
pub const CHUNK_HOLDERS: &str = "chunk_holders";
