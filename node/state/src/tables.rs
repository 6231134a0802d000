//! Every table name of the node's keyspace, in one place. A row's key format is written next
//! to its table; the record types live with the service that owns the table.

// identity
pub const DOMAINS: &str = "domains";
/// Key: domain name; value: domain id (the default domain, older than the index, is also found
/// by a scan).
pub const DOMAIN_NAMES: &str = "domain_names";
pub const PROJECTS: &str = "projects";
pub const PROJECT_NAMES: &str = "project_names";
pub const USERS: &str = "users";
pub const USER_NAMES: &str = "user_names";
pub const ROLES: &str = "roles";
pub const ROLE_NAMES: &str = "role_names";
pub const ASSIGNMENTS: &str = "role_assignments";
/// Key: `{user_id}/{role_id}`: a role held on the system (`"system": {"all": true}`).
pub const SYSTEM_ASSIGNMENTS: &str = "system_role_assignments";
pub const SIGNING_KEYS: &str = "signing_keys";
pub const REVOKED: &str = "revoked_tokens";
/// Keystone revocation events (a user, project or role assignment revoked at a time).
pub const REVOCATION_EVENTS: &str = "revocation_events";

// compute
/// Key: flavor id.
pub const FLAVORS: &str = "flavors";
/// Key: flavor name; value: flavor id.
pub const FLAVOR_NAMES: &str = "flavor_names";
/// Key: `{user_id}/{name}`.
pub const KEYPAIRS: &str = "keypairs";
/// Key: project id (or the default-quota key).
pub const QUOTAS: &str = "quotas";
/// Key: quota class name (`default`); value: the class's quota overrides.
pub const QUOTA_CLASSES: &str = "quota_classes";
/// Key: host name.
pub const COMPUTE_SERVICES: &str = "compute_services";
/// Key: a counted scope (`key_pairs/<user>`, `network/port/<project>`); every create in the
/// scope rewrites it, which is what makes two concurrent quota checks collide (`quota`).
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
/// Key: server uuid; value: `shoal_compute::usage::DeletedServer`, a deleted server's tombstone
/// (with its action log, which `os-instance-actions` reads from microversion 2.21), written by
/// the transaction that deletes its row and kept for `[compute] deleted_server_retention_secs`.
pub const DELETED_SERVERS: &str = "deleted_servers";

// placement
/// Key: host name.
pub const HOSTS: &str = "hosts";
/// Key: instance id.
pub const INSTANCES: &str = "instances";

// image replication
pub const IMAGE_MANIFESTS: &str = "image_manifests";
pub const CHUNK_HOLDERS: &str = "chunk_holders";

// network
/// Key: network id. Record: `shoal_network::NetworkRecord`.
pub const NETWORKS: &str = "networks";
/// Key: subnet id. Record: `shoal_network::SubnetRecord`.
pub const SUBNETS: &str = "subnets";
/// Key: port id. Record: [`crate::records::PortRecord`] (shared with the compute agent).
pub const PORTS: &str = "ports";
/// Key: node name. Record: `shoal_network::agent::AgentRecord` (the node's VTEP).
pub const NETWORK_AGENTS: &str = "network_agents";
/// Key: security group id.
pub const SECURITY_GROUPS: &str = "security_groups";
/// Key: security group rule id.
pub const SECURITY_GROUP_RULES: &str = "security_group_rules";
/// Key: `{security_group_id}/{rule fingerprint}`; value: rule id. One row per distinct rule, so
/// two identical rules cannot both be created.
pub const SECURITY_GROUP_RULE_KEYS: &str = "security_group_rule_keys";
/// Key: project id; value: the id of the project's `default` security group.
pub const DEFAULT_SECURITY_GROUPS: &str = "default_security_groups";
/// Key: `{subnet_id}/{ipv4 address}`; value: the port id holding the address.
pub const IP_ALLOCATIONS: &str = "ip_allocations";
/// Key: MAC address (`fa:16:3e:..`); value: the port id holding it.
pub const PORT_MACS: &str = "port_macs";
/// Key: `vxlan/{vni, 8 digits}` or `flat/{physical network}`; value: the network id.
pub const NETWORK_SEGMENTS: &str = "network_segments";
/// Key: `{project}/{resource}/{id}`: what each project holds, counted against its quotas.
pub const NETWORK_USAGE: &str = "network_usage";
/// Key: project id; value: the project's Neutron quota overrides.
pub const NETWORK_QUOTAS: &str = "network_quotas";
/// Key: `{resource}/{id}`: a delete in progress; creates that would use the resource fail.
pub const NETWORK_DELETING: &str = "network_deleting";
/// Key: router id. Record: `shoal_network::records::RouterRecord`.
pub const ROUTERS: &str = "routers";
/// Key: subnet pool id. Record: `shoal_network::records::SubnetPoolRecord`.
pub const SUBNET_POOLS: &str = "subnet_pools";
/// Key: `4` or `6`; value: the id of that family's default subnet pool (at most one each).
pub const DEFAULT_SUBNET_POOLS: &str = "default_subnet_pools";
/// Key: floating IP id. Record: `shoal_network::records::FloatingIpRecord`.
pub const FLOATING_IPS: &str = "floating_ips";
/// Key: `{external network}/{port}/{fixed address}`; value: the floating IP id. One floating IP
/// per fixed address and external network.
pub const FLOATING_IP_BINDINGS: &str = "floating_ip_bindings";
