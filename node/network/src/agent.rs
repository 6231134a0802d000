//! The network agent of one node: turns the replicated tables into this node's datapath.
//!
//! It follows the `ports`, `floating_ips`, `routers`, `networks`, `subnets`,
//! `security_groups`, `security_group_rules` and `network_agents` tables: each is listed once
//! (again after a watch gap) and then kept up to date in memory from its watch, so a pass reads
//! nothing. A pass caused only by VMs' ports (off any router's network) updates just their
//! entries (remote, or local with their status, served device and groups) in the last
//! [`DesiredState`]; anything else, a change of the local ports' networks, a snapshot, or the
//! slow tick (taps appear after their port was bound) plans the whole state again from the
//! rows. Device lookups are remembered until a link changes ([`DeviceCache`]). The
//! state goes to the datapath driver, which runs on its own thread inside the node's network
//! namespace (drivers are blocking) and changes only what differs. After each apply it writes the ports it
//! serves `ACTIVE` and the ports bound here whose device is gone `DOWN`, and tells the
//! node-local services ([`PortHooks`]: the metadata service, DHCP) which devices to serve.
//!
//! Remote ports are found through the `network_agents` table, where every agent publishes
//! its VTEP address: a port bound on node A is reachable from node B as soon as B's agent
//! has read A's row and the port's, without flooding (L2 population from Raft).
//!
//! Routers are distributed: every node with a port on a network a router has an interface on
//! programs that router (its interfaces, and the remote ports of all its networks), so a VM's
//! packets to another subnet of the router are routed on the VM's own node. Router interface
//! ports go `ACTIVE` once a node has programmed them.
//!
//! North-south: a router's external gateway reaches the datapath of every node that programs
//! the router and maps the gateway's flat physical network to a host interface
//! (`[network] physical_interface_mappings`, published in `network_agents`). One of them, the
//! first by name, holds the gateway address and does the router's SNAT; floating IPs are NAT on
//! the node of their port, which writes them `ACTIVE` once programmed (it follows
//! `floating_ips`). Both drivers do the NAT in the kernel driver's router namespace (the eBPF
//! driver joins it to its datapath through one veth per router, docs/datapath.md).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures::{future::BoxFuture, StreamExt};
use serde::{Deserialize, Serialize};
use shoal_consensus::cluster::{Cluster, WatchError};
use shoal_dataplane::{
    ebpf::EbpfDataplane, kernel::KernelDataplane, model, netdev::DeviceCache, Dataplane,
    DesiredState, Direction, EtherType, ExternalGateway, FloatingIp, Ipv4Cidr, LocalPort, Mac,
    Remote, RemotePort, Router, RouterInterface, RouterRoute, SecurityGroup, SgRule, Underlay,
};
use shoal_state::{
    records::{tap_device, PortRecord},
    tables, State, StateError,
};
use shoal_types::{EventKind, Row};
use tokio::sync::{mpsc, oneshot};

use crate::{
    config::Driver,
    records::{
        FloatingIpRecord, NetworkRecord, RouterRecord, RuleRecord, SecurityGroupRecord,
        SubnetRecord,
    },
    routers::ROUTER_INTERFACE,
    NetworkConfig,
};

/// Key: node name. Every network agent's row: where its VXLAN tunnels end.
pub const NETWORK_AGENTS: &str = tables::NETWORK_AGENTS;

/// A node's network agent as the cluster sees it (Neutron's `agents` resource).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub host: String,
    pub vtep: Ipv4Addr,
    /// `ebpf` or `kernel`: the driver the agent runs.
    pub driver: String,
    /// Seconds since the Unix epoch the agent (re)started.
    pub started_at: u64,
    /// The physical networks this node maps to a host interface
    /// (`[network] physical_interface_mappings`): where a router's gateway may live.
    #[serde(default)]
    pub physical_networks: Vec<String>,
}

/// A port this node serves, with what its node-local services need (the DHCP lease, the
/// metadata service's view of who sits behind the device).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedPort {
    pub port_id: String,
    pub device: String,
    pub mac: String,
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub mtu: u32,
    /// (destination, prefix length, next hop)
    pub host_routes: Vec<(Ipv4Addr, u8, Ipv4Addr)>,
    pub dhcp: bool,
    /// The port's own DHCP options (`extra_dhcp_opts`), compiled.
    pub extra: crate::dhcp::ExtraOptions,
}

/// Node-local services that follow the ports the agent serves.
pub trait PortHooks: Send + Sync + 'static {
    /// `port` is programmed and its device exists (called again when what it carries changes).
    fn port_up<'a>(&'a self, port: &'a ServedPort) -> BoxFuture<'a, ()>;
    /// The device no longer serves a port.
    fn port_down<'a>(&'a self, device: &'a str) -> BoxFuture<'a, ()>;
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the network agent needs network.underlay_device and network.vtep")]
    NotConfigured,
    #[error("cannot start the {driver} datapath on {device}: {reason}")]
    Datapath {
        driver: &'static str,
        device: String,
        reason: String,
    },
    #[error("watching {table}: {reason}")]
    Watch { table: &'static str, reason: String },
    #[error(transparent)]
    State(#[from] StateError),
}

/// The tables whose changes change the datapath.
const FOLLOWED: [&str; 8] = [
    tables::PORTS,
    tables::FLOATING_IPS,
    tables::ROUTERS,
    tables::NETWORKS,
    tables::SUBNETS,
    tables::SECURITY_GROUPS,
    tables::SECURITY_GROUP_RULES,
    tables::NETWORK_AGENTS,
];

/// How long a pass waits after the first change it sees, to take a burst (a server create
/// writes several rows) in one pass.
const COALESCE: Duration = Duration::from_millis(2);

/// The synthetic group of ports with port security off: everything in and out.
const OPEN_GROUP: &str = "shoal:port-security-off";

pub struct NetworkAgent {
    host: String,
    cfg: NetworkConfig,
    cluster: Cluster,
    state: State,
    hooks: Vec<Arc<dyn PortHooks>>,
}

impl std::fmt::Debug for NetworkAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetworkAgent")
            .field("host", &self.host)
            .field("hooks", &self.hooks.len())
            .finish_non_exhaustive()
    }
}

impl NetworkAgent {
    pub fn new(
        host: String,
        cfg: NetworkConfig,
        cluster: Cluster,
        hooks: Vec<Arc<dyn PortHooks>>,
    ) -> Self {
        let state = State::new(Arc::new(cluster.clone()));
        NetworkAgent {
            host,
            cfg,
            cluster,
            state,
            hooks,
        }
    }

    /// Runs until `shutdown`: starts the datapath, publishes this node's VTEP, then follows the
    /// tables. The datapath keeps forwarding after the agent stops (pinned maps, when
    /// configured); it is not torn down.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), AgentError> {
        let (Some(device), Some(vtep)) = (self.cfg.underlay_device.clone(), self.cfg.vtep) else {
            return Err(AgentError::NotConfigured);
        };
        let underlay = Underlay { device, vtep };
        let netns = self
            .cfg
            .netns
            .as_ref()
            .map(|n| PathBuf::from("/run/netns").join(n));
        let pin_dir =
            self.cfg.pin_dir.clone().unwrap_or_else(|| {
                default_pin_dir(self.cfg.netns.as_deref().unwrap_or(&self.host))
            });
        let (datapath, driver) =
            DatapathThread::start(underlay, netns, self.cfg.driver, Some(pin_dir)).await?;
        tracing::info!(%vtep, driver, "network agent running");
        let record = AgentRecord {
            host: self.host.clone(),
            vtep,
            driver: driver.to_string(),
            started_at: now(),
            physical_networks: mappings(&self.cfg).into_keys().collect(),
        };
        let agents = self.state.table::<AgentRecord>(tables::NETWORK_AGENTS);
        loop {
            match agents.put(&self.host, &record).await {
                Ok(_) => break,
                Err(StateError::Unavailable(e)) => {
                    tracing::debug!(error = %e, "cannot publish the VTEP yet");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }

        let (feed_tx, mut feed) = mpsc::unbounded_channel::<Feed>();
        let (failed_tx, mut failed) = mpsc::channel::<AgentError>(1);
        let followers: Vec<_> = FOLLOWED
            .iter()
            .map(|t| {
                tokio::spawn(follow(
                    self.cluster.clone(),
                    t,
                    feed_tx.clone(),
                    failed_tx.clone(),
                ))
            })
            .collect();
        let mut view = View {
            mappings: mappings(&self.cfg),
            ..View::default()
        };
        // Every table's first snapshot comes before the first pass: an agent that programmed
        // from half its tables would remove what a previous process programmed.
        let mut snapshots: BTreeSet<&'static str> = BTreeSet::new();
        let mut dirty = Dirty::Full;
        let mut plan: Option<Plan> = None;
        let mut served: BTreeMap<String, ServedPort> = BTreeMap::new();
        // The node's own namespace (where libvirt makes taps), from this task's threads, which
        // never leave it.
        let mut host_devices = HostTaps {
            devices: DeviceCache::new(),
            waiting: HashMap::new(),
        };
        // How often the agent looks again without a change: taps appear after their port is
        // bound, and disappear with their VM, without any row changing.
        let mut tick = tokio::time::interval(Duration::from_millis(self.cfg.resync_ms));
        tokio::pin!(shutdown);
        let result = loop {
            tokio::select! {
                Some(f) = feed.recv() => view.absorb(f, &self.host, &mut dirty, &mut snapshots),
                _ = tick.tick() => dirty = Dirty::Full,
                Some(e) = failed.recv() => break Err(e),
                _ = &mut shutdown => break Ok(()),
            }
            // Changes come in bursts (a server create writes several rows): take them at once.
            tokio::time::sleep(COALESCE).await;
            while let Ok(f) = feed.try_recv() {
                view.absorb(f, &self.host, &mut dirty, &mut snapshots);
            }
            if snapshots.len() < FOLLOWED.len() || dirty.is_clean() {
                continue;
            }
            let pass = std::mem::take(&mut dirty);
            let started = std::time::Instant::now();
            // A pass of a few VMs' ports updates their entries in the last plan; anything
            // else (or a change of the local ports' networks) plans the whole state.
            let incremental = match (plan.take(), pass) {
                (Some(mut p), Dirty::Ports(ids)) => view
                    .update_ports(&self.host, &mut p, &ids)
                    .then(|| (p, format!("{} ports", ids.len()))),
                _ => None,
            };
            let (mut p, how) =
                incremental.unwrap_or_else(|| (view.plan(&self.host), "full".to_string()));
            if self.cfg.netns.is_some() {
                p.device_mtus = p
                    .local
                    .values()
                    .filter_map(|(net, port)| {
                        let mtu = view.networks.get(net)?.mtu;
                        Some((port.device.clone(), mtu))
                    })
                    .collect();
            }
            let planned = started.elapsed();
            let p = self
                .converge(&datapath, p, &mut served, &mut host_devices, &how, planned)
                .await;
            plan = Some(p);
        };
        for f in followers {
            f.abort();
        }
        for device in served.keys() {
            for h in &self.hooks {
                h.port_down(device).await;
            }
        }
        result
    }

    /// One pass: apply `plan`, report. Returns the plan with the statuses it wrote, for the
    /// next incremental pass to start from.
    async fn converge(
        &self,
        datapath: &DatapathThread,
        mut plan: Plan,
        served: &mut BTreeMap<String, ServedPort>,
        host_devices: &mut HostTaps,
        how: &str,
        planned: Duration,
    ) -> Plan {
        let started = std::time::Instant::now();
        if let Some(ns) = &self.cfg.netns {
            adopt_taps(
                ns,
                plan.desired.ports.iter().map(|p| p.device.as_str()),
                &plan.device_mtus,
                host_devices,
            )
            .await;
        }
        let present = datapath.apply(plan.desired.clone()).await;
        let applied = started.elapsed();
        let Applied {
            devices: present,
            floating_ips: nat,
        } = match present {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "the datapath refused the desired state");
                return plan;
            }
        };
        // Ports the datapath now serves, and bound ports whose device is gone.
        let ports = self.state.table::<PortRecord>(tables::PORTS);
        for (id, status) in &mut plan.bound {
            let device = tap_device(id);
            let want = if present.contains(&device) && plan.served.contains_key(&device) {
                "ACTIVE"
            } else {
                "DOWN"
            };
            if status != want {
                let host = self.host.clone();
                let r = ports
                    .update(id, |p: &mut PortRecord| {
                        if p.binding_host_id != host {
                            return Err(StateError::NotFound {
                                table: tables::PORTS,
                                key: p.id.clone(),
                            });
                        }
                        p.status = want.to_string();
                        p.touch(now());
                        Ok(())
                    })
                    .await;
                match r {
                    Ok(_) => {
                        tracing::info!(port = %id, status = want, "port status");
                        *status = want.to_string();
                    }
                    Err(StateError::NotFound { .. }) => {}
                    Err(e) => {
                        tracing::warn!(port = %id, error = %e, "cannot write the port status")
                    }
                }
            }
        }
        // A distributed router is programmed on demand, by every node that gets a port on one
        // of its networks: its interfaces are ACTIVE while the router is up and they are
        // routable, whether or not a VM uses them yet. Every agent computes the same from the
        // same rows and writes only a difference (compare-and-set), so they converge.
        for (id, status, want) in &mut plan.router_interfaces {
            if status == want {
                continue;
            }
            let want = *want;
            let r = ports
                .update(id, |p: &mut PortRecord| {
                    if p.device_owner != ROUTER_INTERFACE {
                        return Err(StateError::NotFound {
                            table: tables::PORTS,
                            key: p.id.clone(),
                        });
                    }
                    p.status = want.to_string();
                    p.touch(now());
                    Ok(())
                })
                .await;
            match r {
                Ok(_) => {
                    tracing::info!(port = %id, status = want, "router interface status");
                    *status = want.to_string();
                }
                Err(StateError::NotFound { .. }) => {}
                Err(e) => tracing::warn!(port = %id, error = %e, "cannot write the port status"),
            }
        }
        // A floating IP is ACTIVE once its NAT is in place on the node of its port (that node
        // writes it), DOWN while it is unassociated (any node may write that) or while its
        // port's node cannot program it, as Neutron's L3 agent reports it.
        let fips = self.state.table::<FloatingIpRecord>(tables::FLOATING_IPS);
        for (id, status, port) in &mut plan.floating_ips {
            let want = if nat.contains(id) { "ACTIVE" } else { "DOWN" };
            if status == want {
                continue;
            }
            let port = port.clone();
            let r = fips
                .update(id, |f: &mut FloatingIpRecord| {
                    if f.port_id != port {
                        // Changed meanwhile: the next pass decides.
                        return Err(StateError::NotFound {
                            table: tables::FLOATING_IPS,
                            key: f.id.clone(),
                        });
                    }
                    f.status = want.to_string();
                    f.revision_number += 1;
                    f.updated_at = now();
                    Ok(())
                })
                .await;
            match r {
                Ok(_) => {
                    tracing::info!(floating_ip = %id, status = want, "floating IP status");
                    *status = want.to_string();
                }
                Err(StateError::NotFound { .. }) => {}
                Err(e) => {
                    tracing::warn!(floating_ip = %id, error = %e, "cannot write the floating IP status")
                }
            }
        }
        let now_served: BTreeMap<String, ServedPort> = plan
            .served
            .iter()
            .filter(|(d, _)| present.contains(*d))
            .map(|(d, p)| (d.clone(), p.clone()))
            .collect();
        for device in served.keys() {
            if !now_served.contains_key(device) {
                for h in &self.hooks {
                    h.port_down(device).await;
                }
            }
        }
        for (device, port) in &now_served {
            if served.get(device) != Some(port) {
                for h in &self.hooks {
                    h.port_up(port).await;
                }
            }
        }
        *served = now_served;
        tracing::debug!(
            pass = how,
            local = plan.desired.ports.len(),
            remote = plan.desired.remote_ports.len(),
            plan_us = planned.as_micros() as u64,
            apply_us = applied.as_micros() as u64,
            total_us = (planned + started.elapsed()).as_micros() as u64,
            "network agent pass"
        );
        plan
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Where a node pins its datapath when its config names no place: under the host's bpffs,
/// one directory per node (per namespace when the node has one, so several local nodes of
/// one name never share pins).
pub fn default_pin_dir(key: &str) -> PathBuf {
    PathBuf::from(BPFFS).join("shoal").join(key)
}

const BPFFS: &str = "/sys/fs/bpf";

/// Deletes the router namespaces (NAT and kernel-path routers, under /run/netns) of the node
/// whose network namespace is `netns` (a name under /run/netns), for tools that delete a
/// node's namespace without a driver teardown (`shoal dev --netns`): they would outlive it.
pub fn remove_router_namespaces(netns: &str) {
    let _ = shoal_dataplane::kernel::remove_router_namespaces(&format!("/run/netns/{netns}"));
}

/// Mounts bpffs on /sys/fs/bpf when nothing is mounted there (systemd does it at boot; a
/// machine without systemd does not), so pins can outlive the process.
fn ensure_bpffs(pin_dir: &std::path::Path) -> Result<(), String> {
    if !pin_dir.starts_with(BPFFS) {
        return Ok(());
    }
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let path = std::ffi::CString::new(BPFFS).expect("no NUL");
    // SAFETY: `path` is a valid C string and `st` a properly sized out-parameter.
    let magic = unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        if libc::statfs(path.as_ptr(), &mut st) != 0 {
            return Err(format!("{BPFFS}: {}", std::io::Error::last_os_error()));
        }
        st.f_type as i64
    };
    if magic == BPF_FS_MAGIC {
        return Ok(());
    }
    let out = std::process::Command::new("mount")
        .args(["-t", "bpf", "bpf", BPFFS])
        .output()
        .map_err(|e| format!("mount: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cannot mount bpffs on {BPFFS}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    tracing::info!("mounted bpffs on {BPFFS} for the datapath's pins");
    Ok(())
}

/// The node's own namespace, where libvirt makes taps, as `adopt_taps` sees it.
struct HostTaps {
    devices: DeviceCache,
    /// Taps seen before libvirt had given them their network's MTU: since when.
    waiting: HashMap<String, std::time::Instant>,
}

/// How long a tap whose MTU is not its network's waits before it is moved all the same (a
/// network whose MTU changed after the server booted, a domain defined without `<mtu>`).
const TAP_SETTLE: Duration = Duration::from_secs(2);

/// Moves the taps of local ports from the node's own namespace into `netns`, where the
/// datapath is. libvirt creates a VM's tap where libvirtd runs; with the datapath in a
/// namespace of its own (several nodes on one machine), the tap must follow it, again after
/// every restart of the VM, which recreates it. A tap in use keeps working across the move,
/// but not one libvirt is still setting up: its last step on a new tap is the MTU the domain
/// names (the network's, `mtus` by device), and a tap moved before it fails the domain's start.
/// So a tap is moved once its MTU is its network's, or after `TAP_SETTLE` (the compute agent
/// starts a domain again when the race is lost all the same).
async fn adopt_taps<'a>(
    netns: &str,
    devices: impl Iterator<Item = &'a str>,
    mtus: &BTreeMap<String, u32>,
    host: &mut HostTaps,
) {
    let known = &mut host.devices;
    known.refresh();
    let mut seen = BTreeSet::new();
    for device in devices {
        // Looked up from this (tokio) thread: the node's own namespace, not the datapath's.
        if known.ifindex(device).is_err() {
            continue;
        }
        seen.insert(device);
        let set_up = match (mtus.get(device), shoal_dataplane::netdev::mtu(device)) {
            (Some(want), Ok(have)) => *want == have,
            _ => true,
        };
        if !set_up {
            let since = *host
                .waiting
                .entry(device.to_string())
                .or_insert_with(std::time::Instant::now);
            if since.elapsed() < TAP_SETTLE {
                continue;
            }
        }
        host.waiting.remove(device);
        let moved = tokio::process::Command::new("ip")
            .args(["link", "set", "dev", device, "netns", netns])
            .output()
            .await;
        let up = tokio::process::Command::new("ip")
            .args(["-n", netns, "link", "set", "dev", device, "up"])
            .output()
            .await;
        match (moved, up) {
            (Ok(m), Ok(u)) if m.status.success() && u.status.success() => {
                tracing::info!(%device, %netns, "moved the tap into the datapath's namespace");
            }
            (m, u) => tracing::warn!(
                %device,
                %netns,
                moved = ?m.map(|o| String::from_utf8_lossy(&o.stderr).into_owned()),
                up = ?u.map(|o| String::from_utf8_lossy(&o.stderr).into_owned()),
                "cannot move the tap into the datapath's namespace"
            ),
        }
    }
    host.waiting
        .retain(|device, _| seen.contains(device.as_str()));
}

/// The `[network] physical_interface_mappings` of `cfg` (validated at start).
fn mappings(cfg: &NetworkConfig) -> BTreeMap<String, String> {
    cfg.physical_interface_mappings
        .iter()
        .filter_map(|m| m.split_once(':'))
        .map(|(p, d)| (p.to_string(), d.to_string()))
        .collect()
}

/// What one pass decided.
#[derive(Debug, Default)]
struct Plan {
    desired: DesiredState,
    /// Ports bound to this node, with their status as read.
    bound: BTreeMap<String, String>,
    /// `desired.ports` by port id, with their network.
    local: BTreeMap<String, (String, LocalPort)>,
    /// The networks of `local`: with the routers on them, what this node carries.
    local_networks: BTreeSet<String>,
    /// The groups `local` names (their rules and remote groups are in `desired`).
    groups_used: BTreeSet<String>,
    /// The local ports put in `desired`, by device.
    served: BTreeMap<String, ServedPort>,
    /// Every router's interface ports: status as read, and the status they should have
    /// (`ACTIVE` while the router is up and the interface routable, else `DOWN`).
    router_interfaces: Vec<(String, String, &'static str)>,
    /// The floating IPs whose status this node reports: (id, status as read, associated port).
    /// Those of ports bound here, and the unassociated ones.
    floating_ips: Vec<(String, String, Option<String>)>,
    /// The networks whose remote ports this node programs.
    carried: BTreeSet<String>,
    /// `desired.remote_ports` by port id.
    remote: BTreeMap<String, RemotePort>,
    /// The MTU of each local port's network, by device (only with the datapath in a
    /// namespace of its own: `adopt_taps`).
    device_mtus: BTreeMap<String, u32>,
}

/// What a table's follower hands the agent.
#[derive(Debug)]
enum Feed {
    /// Every row of `table` as of one snapshot: at start, and again after a watch gap.
    Snapshot {
        table: &'static str,
        rows: Vec<(String, Row)>,
    },
    /// One change after the snapshot, in revision order (`None`: deleted).
    Change {
        table: &'static str,
        key: String,
        row: Option<Row>,
    },
}

/// Lists `table` and hands the rows to the agent, then every change after that listing's
/// revision; lists again after a compaction (the events in between are lost, the new listing
/// replaces the table's rows).
async fn follow(
    cluster: Cluster,
    table: &'static str,
    feed: mpsc::UnboundedSender<Feed>,
    failed: mpsc::Sender<AgentError>,
) {
    let fail = |reason: String| {
        let failed = failed.clone();
        async move {
            let _ = failed.send(AgentError::Watch { table, reason }).await;
        }
    };
    loop {
        let (revision, rows) = match cluster.list_with_revision(table, "", usize::MAX).await {
            Ok(l) => l,
            Err(e) => return fail(e.to_string()).await,
        };
        if feed.send(Feed::Snapshot { table, rows }).is_err() {
            return;
        }
        let mut stream = match cluster.watch(table, "", revision + 1).await {
            Ok(s) => s,
            Err(WatchError::Compacted { .. }) => continue,
            Err(e) => return fail(e.to_string()).await,
        };
        loop {
            match stream.next().await {
                Some(Ok(ev)) => {
                    let row = match ev.kind {
                        EventKind::Put(row) => Some(row),
                        EventKind::Delete => None,
                    };
                    if feed
                        .send(Feed::Change {
                            table,
                            key: ev.key,
                            row,
                        })
                        .is_err()
                    {
                        return;
                    }
                }
                Some(Err(WatchError::Compacted { oldest })) => {
                    tracing::info!(table, oldest, "network watch compacted; reading again");
                    break;
                }
                Some(Err(e)) => return fail(e.to_string()).await,
                None => return fail("the stream ended".into()).await,
            }
        }
    }
}

/// What the next pass must recompute.
#[derive(Debug, Default, PartialEq, Eq)]
enum Dirty {
    /// Nothing changed.
    #[default]
    Clean,
    /// Only these ports changed, each a VM's port of no router's network, not named by a
    /// floating IP when bound here: the last plan stands but for their own entries.
    Ports(BTreeSet<String>),
    /// Anything else: a whole plan from the rows.
    Full,
}

impl Dirty {
    fn is_clean(&self) -> bool {
        *self == Dirty::Clean
    }

    fn port(&mut self, id: &str) {
        match self {
            Dirty::Clean => *self = Dirty::Ports([id.to_string()].into()),
            Dirty::Ports(ids) => {
                ids.insert(id.to_string());
            }
            Dirty::Full => {}
        }
    }
}

/// The followed tables, kept up to date from the watches.
#[derive(Debug, Default)]
struct View {
    ports: BTreeMap<String, PortRecord>,
    networks: HashMap<String, NetworkRecord>,
    subnets: HashMap<String, SubnetRecord>,
    groups: BTreeMap<String, SecurityGroupRecord>,
    rules: BTreeMap<String, RuleRecord>,
    agents: HashMap<String, AgentRecord>,
    routers: BTreeMap<String, RouterRecord>,
    floating_ips: BTreeMap<String, FloatingIpRecord>,
    /// This node's `physical_interface_mappings`: physical network -> host interface.
    mappings: BTreeMap<String, String>,
    /// The networks with a router interface (kept as router interface ports come and go): a
    /// port on one may change a router's gateway host, so it takes a full plan.
    routed: BTreeSet<String>,
}

/// Decodes one row of `table`; a row that does not decode is left out (and said once per
/// change), as it cannot be programmed.
fn decode<T: serde::de::DeserializeOwned>(table: &str, key: &str, row: &Row) -> Option<T> {
    match serde_json::from_slice(&row.value) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!(table, key, error = %e, "network agent cannot decode a row; left out");
            None
        }
    }
}

/// Replaces (`Some`) or removes (`None`) `key` in `map`; returns the old value.
fn put<M, T>(map: &mut M, table: &str, key: String, row: Option<&Row>) -> Option<T>
where
    M: RowMap<T>,
    T: serde::de::DeserializeOwned,
{
    match row.and_then(|r| decode::<T>(table, &key, r)) {
        Some(v) => map.put(key, v),
        None => map.take(&key),
    }
}

/// `BTreeMap` and `HashMap` alike, for [`put`].
trait RowMap<T> {
    fn put(&mut self, key: String, v: T) -> Option<T>;
    fn take(&mut self, key: &str) -> Option<T>;
    fn wipe(&mut self);
}

impl<T> RowMap<T> for BTreeMap<String, T> {
    fn put(&mut self, key: String, v: T) -> Option<T> {
        self.insert(key, v)
    }
    fn take(&mut self, key: &str) -> Option<T> {
        self.remove(key)
    }
    fn wipe(&mut self) {
        self.clear()
    }
}

impl<T> RowMap<T> for HashMap<String, T> {
    fn put(&mut self, key: String, v: T) -> Option<T> {
        self.insert(key, v)
    }
    fn take(&mut self, key: &str) -> Option<T> {
        self.remove(key)
    }
    fn wipe(&mut self) {
        self.clear()
    }
}

impl View {
    /// Takes one follower's message in, and notes what the next pass must recompute.
    fn absorb(
        &mut self,
        feed: Feed,
        host: &str,
        dirty: &mut Dirty,
        snapshots: &mut BTreeSet<&'static str>,
    ) {
        match feed {
            Feed::Snapshot { table, rows } => {
                snapshots.insert(table);
                *dirty = Dirty::Full;
                self.clear(table);
                for (key, row) in rows {
                    self.change(table, key, Some(&row));
                }
                if table == tables::PORTS {
                    self.routed = self.routed_networks();
                }
            }
            Feed::Change { table, key, row } => {
                let id = key.clone();
                let (old, new) = if table == tables::PORTS {
                    let old = put(&mut self.ports, table, key, row.as_ref());
                    (old, self.ports.get(&id))
                } else {
                    self.change(table, key, row.as_ref());
                    *dirty = Dirty::Full;
                    return;
                };
                // A VM's port, off any router's network: only its own entries change (a floating
                // IP naming a port of this node also changes that router's NAT).
                let local = [old.as_ref(), new]
                    .into_iter()
                    .flatten()
                    .any(|p| p.binding_host_id == host);
                let own_entries = [old.as_ref(), new].into_iter().flatten().all(|p| {
                    !p.device_owner.starts_with("network:") && !self.routed.contains(&p.network_id)
                }) && !(local
                    && self
                        .floating_ips
                        .values()
                        .any(|f| f.port_id.as_deref() == Some(id.as_str())));
                if own_entries {
                    dirty.port(&id);
                } else {
                    *dirty = Dirty::Full;
                }
                let rif =
                    |p: Option<&PortRecord>| p.is_some_and(|p| p.device_owner == ROUTER_INTERFACE);
                if rif(old.as_ref()) || rif(self.ports.get(&id)) {
                    self.routed = self.routed_networks();
                }
            }
        }
    }

    fn clear(&mut self, table: &str) {
        match table {
            tables::PORTS => self.ports.wipe(),
            tables::NETWORKS => self.networks.wipe(),
            tables::SUBNETS => self.subnets.wipe(),
            tables::SECURITY_GROUPS => self.groups.wipe(),
            tables::SECURITY_GROUP_RULES => self.rules.wipe(),
            tables::NETWORK_AGENTS => self.agents.wipe(),
            tables::ROUTERS => self.routers.wipe(),
            tables::FLOATING_IPS => self.floating_ips.wipe(),
            _ => {}
        }
    }

    fn change(&mut self, table: &str, key: String, row: Option<&Row>) {
        match table {
            tables::PORTS => drop(put(&mut self.ports, table, key, row)),
            tables::NETWORKS => drop(put(&mut self.networks, table, key, row)),
            tables::SUBNETS => drop(put(&mut self.subnets, table, key, row)),
            tables::SECURITY_GROUPS => drop(put(&mut self.groups, table, key, row)),
            tables::SECURITY_GROUP_RULES => drop(put(&mut self.rules, table, key, row)),
            tables::NETWORK_AGENTS => drop(put(&mut self.agents, table, key, row)),
            tables::ROUTERS => drop(put(&mut self.routers, table, key, row)),
            tables::FLOATING_IPS => drop(put(&mut self.floating_ips, table, key, row)),
            _ => {}
        }
    }

    /// Brings `plan` up to date for the changed ports `ids` only (none of them a router's or
    /// a gateway's port, on a router's network or named by a floating IP: see
    /// [`View::absorb`]): their remote entries, and for those bound here (before or now) their
    /// local entry, status, served entry and the groups the local ports use. Returns `false`,
    /// leaving `plan` to be replaced by a whole plan, when the networks of the local ports
    /// changed (what this node carries, and the routers it programs, depend on them).
    fn update_ports(&self, host: &str, plan: &mut Plan, ids: &BTreeSet<String>) -> bool {
        let mut local_changed = false;
        for id in ids {
            let p = self.ports.get(id);
            if plan.bound.remove(id).is_some() {
                local_changed = true;
            }
            if let Some((_, old)) = plan.local.remove(id) {
                plan.served.remove(&old.device);
            }
            if let Some(p) = p.filter(|p| p.binding_host_id == host) {
                local_changed = true;
                plan.bound.insert(id.clone(), p.status.clone());
                if let Some((network, port, served)) = self.local_port(p) {
                    if let Some(s) = served {
                        plan.served.insert(port.device.clone(), s);
                    }
                    plan.local.insert(id.clone(), (network, port));
                }
            }
            match p.and_then(|p| self.remote_port(host, p, &plan.carried)) {
                Some(r) => {
                    plan.remote.insert(id.clone(), r);
                }
                None => {
                    plan.remote.remove(id);
                }
            }
        }
        if local_changed {
            let networks: BTreeSet<String> = plan.local.values().map(|(n, _)| n.clone()).collect();
            if networks != plan.local_networks {
                return false;
            }
            let groups: BTreeSet<String> = plan
                .local
                .values()
                .flat_map(|(_, p)| p.security_groups.iter().cloned())
                .collect();
            if groups != plan.groups_used {
                plan.desired.security_groups = self.security_groups(&groups);
                plan.groups_used = groups;
            }
            plan.desired.ports = plan.local.values().map(|(_, p)| p.clone()).collect();
        }
        plan.desired.remote_ports = plan.remote.values().cloned().collect();
        true
    }

    /// A router interface port in the datapath's terms: on a carried network, up, with an
    /// IPv4 address on a known subnet.
    fn router_interface(&self, p: &PortRecord) -> Option<RouterInterface> {
        let vni = self.vni(&p.network_id)?;
        if !p.admin_state_up {
            return None;
        }
        let mac = parse_mac(&p.mac_address).ok()?;
        let (ip, subnet_id) = ipv4s(p).into_iter().next()?;
        let (addr, len) = parse_cidr(&self.subnets.get(&subnet_id)?.cidr)?;
        Some(RouterInterface {
            port_id: p.id.clone(),
            vni,
            mac,
            ip,
            subnet: Ipv4Cidr::new(addr, len),
        })
    }

    /// Routers with an interface on one of `local_networks` (each node routes its own VMs'
    /// packets), with their interfaces; extends `carried` with the networks they join.
    fn plan_routers<'a>(
        &'a self,
        host: &str,
        local_networks: &BTreeSet<&str>,
        carried: &mut BTreeSet<&'a str>,
        plan: &mut Plan,
    ) {
        for r in self.routers.values() {
            let mut interfaces: Vec<(&PortRecord, RouterInterface)> = Vec::new();
            for p in self
                .ports
                .values()
                .filter(|p| p.device_owner == ROUTER_INTERFACE && p.device_id == r.id)
            {
                // As ML2/OVN reports a router port: up while the port is up and attached,
                // whatever the router's own admin state (which only stops its forwarding).
                let routable = self.router_interface(p);
                let want = if routable.is_some() { "ACTIVE" } else { "DOWN" };
                plan.router_interfaces
                    .push((p.id.clone(), p.status.clone(), want));
                if r.admin_state_up {
                    interfaces.extend(routable.map(|i| (p, i)));
                }
            }
            if !interfaces
                .iter()
                .any(|(p, _)| local_networks.contains(p.network_id.as_str()))
            {
                continue;
            }
            for (p, _) in &interfaces {
                carried.insert(p.network_id.as_str());
            }
            let interfaces: Vec<RouterInterface> = interfaces.into_iter().map(|(_, i)| i).collect();
            // Extra routes whose next hop lies on a routed interface (the API keeps them
            // there; one whose interface is not routable waits for it).
            let routes = r
                .routes
                .iter()
                .filter_map(|x| {
                    let (addr, len) = parse_cidr(&x.destination)?;
                    let nexthop: Ipv4Addr = x.nexthop.parse().ok()?;
                    interfaces
                        .iter()
                        .any(|i| i.subnet.contains(nexthop))
                        .then(|| RouterRoute {
                            destination: Ipv4Cidr::new(addr, len),
                            nexthop,
                        })
                })
                .collect();
            plan.desired.routers.push(Router {
                id: r.id.clone(),
                gateway: self.external_gateway(r, host),
                floating_ips: Vec::new(),
                interfaces,
                routes,
            });
            let router = plan.desired.routers.last_mut().expect("just pushed");
            if let Some(g) = &router.gateway {
                router.floating_ips = self.floating_ips_of(r, g, &plan.desired.ports);
            }
        }
    }

    /// Router `r`'s external side on this node: its gateway is on a flat network whose
    /// physical network this node maps to a host interface, with an IPv4 address.
    fn external_gateway(&self, r: &RouterRecord, host: &str) -> Option<ExternalGateway> {
        let g = r.gateway.as_ref()?;
        let network = self.networks.get(&g.network_id)?;
        if network.network_type != "flat" || !network.admin_state_up {
            return None;
        }
        let physnet = network.physical_network.as_deref()?;
        let device = self.mappings.get(physnet)?;
        let port = self.ports.get(&g.port_id)?;
        let mac = parse_mac(&port.mac_address).ok()?;
        let (ip, subnet_id) = ipv4s(port).into_iter().next()?;
        let subnet = self.subnets.get(&subnet_id)?;
        let (addr, len) = parse_cidr(&subnet.cidr)?;
        Some(ExternalGateway {
            port_id: port.id.clone(),
            device: device.clone(),
            subnet: Ipv4Cidr::new(addr, len),
            ip,
            mac,
            upstream: subnet.gateway_ip.as_deref().and_then(|u| u.parse().ok()),
            enable_snat: g.enable_snat,
            holds_address: self.gateway_host(r, physnet) == Some(host),
        })
    }

    /// The node that holds router `r`'s gateway address (and so does its SNAT): the first by
    /// name of the nodes whose agent maps `physnet` and that have a VM port on one of the
    /// router's networks (those program the router). Every agent computes the same from the
    /// same rows, so exactly one node answers for the address.
    fn gateway_host(&self, r: &RouterRecord, physnet: &str) -> Option<&str> {
        let networks: BTreeSet<&str> = self
            .ports
            .values()
            .filter(|p| p.device_owner == ROUTER_INTERFACE && p.device_id == r.id)
            .map(|p| p.network_id.as_str())
            .collect();
        self.ports
            .values()
            .filter(|p| {
                !p.binding_host_id.is_empty()
                    && p.admin_state_up
                    && networks.contains(p.network_id.as_str())
            })
            .map(|p| p.binding_host_id.as_str())
            .filter(|h| {
                self.agents
                    .get(*h)
                    .is_some_and(|a| a.physical_networks.iter().any(|n| n == physnet))
            })
            .min()
    }

    /// The floating IPs through router `r` of this node's ports, on the gateway's subnet.
    fn floating_ips_of(
        &self,
        r: &RouterRecord,
        g: &ExternalGateway,
        local: &[LocalPort],
    ) -> Vec<FloatingIp> {
        self.floating_ips
            .values()
            .filter(|f| f.router_id.as_deref() == Some(r.id.as_str()))
            .filter_map(|f| {
                let port_id = f.port_id.as_ref()?;
                let fixed: Ipv4Addr = f.fixed_ip_address.as_ref()?.parse().ok()?;
                let floating: Ipv4Addr = f.floating_ip_address.parse().ok()?;
                if !g.subnet.contains(floating)
                    || !local
                        .iter()
                        .any(|p| &p.id == port_id && p.ips.contains(&fixed))
                {
                    return None;
                }
                Some(FloatingIp {
                    id: f.id.clone(),
                    floating,
                    fixed,
                    port_id: port_id.clone(),
                })
            })
            .collect()
    }

    /// The VNI of a network the eBPF/VXLAN datapath carries (flat networks are not carried).
    fn vni(&self, network_id: &str) -> Option<u32> {
        let n = self.networks.get(network_id)?;
        (n.network_type == "vxlan" && n.admin_state_up)
            .then_some(n.segmentation_id)
            .flatten()
    }

    /// Port `p` as a remote port of this node: bound to another node whose agent published
    /// its VTEP, on a carried network, with an IPv4 address.
    fn remote_port(
        &self,
        host: &str,
        p: &PortRecord,
        carried: &BTreeSet<String>,
    ) -> Option<RemotePort> {
        if p.binding_host_id.is_empty()
            || p.binding_host_id == host
            || !carried.contains(&p.network_id)
        {
            return None;
        }
        let vni = self.vni(&p.network_id)?;
        let agent = self.agents.get(&p.binding_host_id)?;
        let mac = parse_mac(&p.mac_address).ok()?;
        let ips: Vec<Ipv4Addr> = ipv4s(p).into_iter().map(|(ip, _)| ip).collect();
        if ips.is_empty() {
            return None;
        }
        Some(RemotePort {
            id: p.id.clone(),
            mac,
            ips,
            vni,
            vtep: agent.vtep,
            security_groups: port_groups(p),
        })
    }

    /// The networks with a router interface.
    fn routed_networks(&self) -> BTreeSet<String> {
        self.ports
            .values()
            .filter(|p| p.device_owner == ROUTER_INTERFACE)
            .map(|p| p.network_id.clone())
            .collect()
    }

    /// Port `p`, bound here, as a local port of the datapath (up, on a VXLAN network, with a
    /// usable MAC and an IPv4 address), with its network and what its node-local services
    /// need (when its subnet is known).
    fn local_port(&self, p: &PortRecord) -> Option<(String, LocalPort, Option<ServedPort>)> {
        let (Some(vni), true) = (self.vni(&p.network_id), p.admin_state_up) else {
            return None;
        };
        let Ok(mac) = parse_mac(&p.mac_address) else {
            tracing::warn!(port = %p.id, mac = %p.mac_address, "port MAC unusable");
            return None;
        };
        let ips = ipv4s(p);
        let &(ip, ref subnet_id) = ips.first()?;
        let device = tap_device(&p.id);
        let served = self
            .subnets
            .get(subnet_id)
            .map(|s| served_port(p, device.clone(), ip, s, self.networks.get(&p.network_id)));
        let port = LocalPort {
            id: p.id.clone(),
            device,
            mac,
            ips: ips.iter().map(|(ip, _)| *ip).collect(),
            vni,
            security_groups: port_groups(p),
        };
        Some((p.network_id.clone(), port, served))
    }

    /// The whole plan from the rows.
    fn plan(&self, host: &str) -> Plan {
        let mut plan = Plan::default();
        for p in self.ports.values().filter(|p| p.binding_host_id == host) {
            plan.bound.insert(p.id.clone(), p.status.clone());
            let Some((network, port, served)) = self.local_port(p) else {
                continue;
            };
            if let Some(s) = served {
                plan.served.insert(port.device.clone(), s);
            }
            plan.local.insert(p.id.clone(), (network, port));
        }
        plan.desired.ports = plan.local.values().map(|(_, p)| p.clone()).collect();
        plan.local_networks = plan.local.values().map(|(n, _)| n.clone()).collect();
        plan.groups_used = plan
            .local
            .values()
            .flat_map(|(_, p)| p.security_groups.iter().cloned())
            .collect();
        let networks = plan.local_networks.clone();
        let local_networks: BTreeSet<&str> = networks.iter().map(String::as_str).collect();
        let mut carried = local_networks.clone();
        self.plan_routers(host, &local_networks, &mut carried, &mut plan);
        for f in self.floating_ips.values() {
            let ours = match &f.port_id {
                None => true,
                Some(id) => self
                    .ports
                    .get(id)
                    .is_some_and(|p| p.binding_host_id == host),
            };
            if ours {
                plan.floating_ips
                    .push((f.id.clone(), f.status.clone(), f.port_id.clone()));
            }
        }
        plan.carried = carried.iter().map(|n| n.to_string()).collect();
        for p in self.ports.values() {
            if let Some(r) = self.remote_port(host, p, &plan.carried) {
                plan.remote.insert(p.id.clone(), r);
            }
        }
        plan.desired.remote_ports = plan.remote.values().cloned().collect();
        plan.desired.security_groups = self.security_groups(&plan.groups_used);
        plan
    }

    /// The groups `used` (by local ports) and the groups their rules name as remotes, with
    /// their rules.
    fn security_groups(&self, used: &BTreeSet<String>) -> Vec<SecurityGroup> {
        let mut out = Vec::new();
        let mut wanted = used.clone();
        for r in self.rules.values() {
            if used.contains(&r.security_group_id) {
                if let Some(g) = &r.remote_group_id {
                    wanted.insert(g.clone());
                }
            }
        }
        for g in self.groups.values() {
            if wanted.contains(&g.id) {
                let rules = self
                    .rules
                    .values()
                    .filter(|r| r.security_group_id == g.id)
                    .filter_map(sg_rule)
                    .collect();
                out.push(SecurityGroup {
                    id: g.id.clone(),
                    rules,
                });
            }
        }
        // A group named but deleted meanwhile allows nothing (never everything).
        for id in wanted {
            if !out.iter().any(|g| g.id == id) {
                let rules = if id == OPEN_GROUP {
                    [Direction::Ingress, Direction::Egress]
                        .into_iter()
                        .map(|direction| SgRule {
                            direction,
                            ethertype: EtherType::Ipv4,
                            protocol: None,
                            port_range: None,
                            remote: Remote::Cidr(Ipv4Cidr::ANY),
                        })
                        .collect()
                } else {
                    Vec::new()
                };
                out.push(SecurityGroup { id, rules });
            }
        }
        out
    }
}

fn port_groups(p: &PortRecord) -> Vec<String> {
    if p.port_security_enabled {
        p.security_groups.clone()
    } else {
        vec![OPEN_GROUP.to_string()]
    }
}

fn ipv4s(p: &PortRecord) -> Vec<(Ipv4Addr, String)> {
    p.fixed_ips
        .iter()
        .filter_map(|f| Some((f.ip_address.parse().ok()?, f.subnet_id.clone())))
        .collect()
}

fn parse_mac(s: &str) -> Result<Mac, ()> {
    let parts: Vec<u8> = s
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .map_err(|_| ())?;
    let bytes: [u8; 6] = parts.try_into().map_err(|_| ())?;
    Ok(Mac(bytes))
}

fn parse_cidr(s: &str) -> Option<(Ipv4Addr, u8)> {
    let (addr, len) = s.split_once('/')?;
    let len: u8 = len.parse().ok().filter(|l| *l <= 32)?;
    Some((addr.parse().ok()?, len))
}

fn served_port(
    p: &PortRecord,
    device: String,
    ip: Ipv4Addr,
    s: &SubnetRecord,
    network: Option<&NetworkRecord>,
) -> ServedPort {
    ServedPort {
        port_id: p.id.clone(),
        device,
        mac: p.mac_address.clone(),
        ip,
        prefix_len: parse_cidr(&s.cidr).map_or(32, |(_, l)| l),
        gateway: s.gateway_ip.as_deref().and_then(|g| g.parse().ok()),
        dns: s
            .dns_nameservers
            .iter()
            .filter_map(|d| d.parse().ok())
            .collect(),
        mtu: network.map_or(1450, |n| n.mtu),
        host_routes: s
            .host_routes
            .iter()
            .filter_map(|r| {
                let (dst, len) = parse_cidr(&r.destination)?;
                Some((dst, len, r.nexthop.parse().ok()?))
            })
            .collect(),
        dhcp: s.enable_dhcp,
        extra: crate::dhcp::ExtraOptions::compile(&p.extra_dhcp_opts).0,
    }
}

/// Neutron's rule in the datapath's terms; `None` for what the IPv4 datapath cannot express
/// (IPv6 prefixes). ICMP type/code ranges are not matched: such a rule allows all ICMP.
fn sg_rule(r: &RuleRecord) -> Option<SgRule> {
    let direction = match r.direction.as_str() {
        "ingress" => Direction::Ingress,
        _ => Direction::Egress,
    };
    let ethertype = if r.ethertype == "IPv6" {
        EtherType::Ipv6
    } else {
        EtherType::Ipv4
    };
    let protocol = match r.protocol.as_deref() {
        None | Some("any") | Some("") => None,
        Some("tcp") => Some(6),
        Some("udp") => Some(17),
        Some("icmp") => Some(1),
        Some(other) => Some(other.parse::<u8>().ok()?),
    };
    let port_range = match (protocol, r.port_range_min, r.port_range_max) {
        (Some(6 | 17), Some(min), max) => Some((
            u16::try_from(min).ok()?,
            u16::try_from(max.unwrap_or(min)).ok()?,
        )),
        _ => None,
    };
    let remote = match (&r.remote_group_id, &r.remote_ip_prefix) {
        (Some(g), _) => Remote::Group(g.clone()),
        (None, Some(prefix)) if ethertype == EtherType::Ipv4 => {
            let (addr, len) = parse_cidr(prefix).or_else(|| Some((prefix.parse().ok()?, 32)))?;
            Remote::Cidr(Ipv4Cidr::new(addr, len))
        }
        (None, Some(_)) => return None,
        (None, None) => Remote::Cidr(Ipv4Cidr::ANY),
    };
    Some(SgRule {
        direction,
        ethertype,
        protocol,
        port_range,
        remote,
    })
}

/// Either driver, behind one type (the trait's `teardown(self)` keeps it from being a trait
/// object).
enum AnyDatapath {
    Ebpf(Box<EbpfDataplane>),
    Kernel(Box<KernelDataplane>),
}

impl AnyDatapath {
    fn apply(&mut self, desired: &DesiredState) -> Result<(), String> {
        match self {
            AnyDatapath::Ebpf(d) => d.apply(desired).map_err(|e| e.to_string()),
            AnyDatapath::Kernel(d) => d.apply(desired).map_err(|e| e.to_string()),
        }
    }
}

/// What one apply programmed.
#[derive(Debug, Default)]
struct Applied {
    /// The devices of the local ports (those that exist).
    devices: BTreeSet<String>,
    /// The floating IPs whose NAT is in place.
    floating_ips: BTreeSet<String>,
}

type Job = (DesiredState, oneshot::Sender<Result<Applied, String>>);

/// The driver on its own thread, inside the node's network namespace.
struct DatapathThread {
    jobs: std::sync::mpsc::Sender<Job>,
}

impl DatapathThread {
    async fn start(
        underlay: Underlay,
        netns: Option<PathBuf>,
        driver: Driver,
        pin_dir: Option<PathBuf>,
    ) -> Result<(DatapathThread, &'static str), AgentError> {
        let (jobs, rx) = std::sync::mpsc::channel::<Job>();
        let (ready_tx, ready) = oneshot::channel();
        let device = underlay.device.clone();
        std::thread::Builder::new()
            .name("shoal-datapath".into())
            .spawn(move || {
                let opened = open_datapath(&underlay, netns.as_deref(), driver, pin_dir.as_deref());
                let mut dp = match opened {
                    Ok((dp, name)) => {
                        let _ = ready_tx.send(Ok(name));
                        dp
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                // Warnings said once per thread (each pass would repeat them every second).
                let mut warned = BTreeSet::new();
                // Opened here, in the datapath's namespace: its link events are the ones that
                // matter.
                let mut devices = DeviceCache::new();
                while let Ok((desired, reply)) = rx.recv() {
                    let _ = reply.send(apply_present(&mut dp, desired, &mut devices, &mut warned));
                }
            })
            .map_err(|e| AgentError::Datapath {
                driver: "any",
                device: device.clone(),
                reason: e.to_string(),
            })?;
        let name = ready.await.map_err(|_| AgentError::Datapath {
            driver: "any",
            device: device.clone(),
            reason: "the datapath thread died".into(),
        })??;
        Ok((DatapathThread { jobs }, name))
    }

    /// Applies `desired` for the ports whose device exists; returns those devices.
    async fn apply(&self, desired: DesiredState) -> Result<Applied, String> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send((desired, tx))
            .map_err(|_| "the datapath thread is gone".to_string())?;
        rx.await
            .map_err(|_| "the datapath thread is gone".to_string())?
    }
}

fn apply_present(
    dp: &mut AnyDatapath,
    mut desired: DesiredState,
    devices: &mut DeviceCache,
    warned: &mut BTreeSet<String>,
) -> Result<Applied, String> {
    // A tap appears a moment after its port is bound and goes with its VM: program what exists.
    // Remembered between passes until a link changes (a node may have many bound ports).
    devices.refresh();
    desired.ports.retain(|p| devices.ifindex(&p.device).is_ok());
    let ports: BTreeSet<String> = desired.ports.iter().map(|p| p.id.clone()).collect();
    for r in &mut desired.routers {
        r.floating_ips.retain(|f| ports.contains(&f.port_id));
        // A mapping to an interface this node does not have leaves the router without its
        // external side (floating IPs DOWN) instead of failing the whole datapath.
        if let Some(g) = &r.gateway {
            if devices.ifindex(&g.device).is_err() {
                if warned.insert(format!("device {}", g.device)) {
                    tracing::warn!(router = %r.id, device = %g.device,
                        "the external network's interface does not exist here");
                }
                r.gateway = None;
                r.floating_ips.clear();
            }
        }
    }
    if let Err(e) = model::check_addresses(&desired) {
        return Err(e.to_string());
    }
    if let Err(e) = dp.apply(&desired) {
        // Perhaps a device changed under a remembered answer: look again next time.
        devices.forget();
        return Err(e);
    }
    Ok(Applied {
        floating_ips: desired
            .routers
            .iter()
            .flat_map(|r| r.floating_ips.iter().map(|f| f.id.clone()))
            .collect(),
        devices: desired.ports.into_iter().map(|p| p.device).collect(),
    })
}

fn open_datapath(
    underlay: &Underlay,
    netns: Option<&std::path::Path>,
    driver: Driver,
    pin_dir: Option<&std::path::Path>,
) -> Result<(AnyDatapath, &'static str), AgentError> {
    if let Some(ns) = netns {
        enter_netns(ns).map_err(|e| AgentError::Datapath {
            driver: "any",
            device: underlay.device.clone(),
            reason: format!("cannot enter the network namespace {}: {e}", ns.display()),
        })?;
    }
    let ebpf = || -> Result<AnyDatapath, String> {
        let dp = match pin_dir {
            Some(dir) => {
                ensure_bpffs(dir)?;
                std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
                EbpfDataplane::new_pinned(underlay, dir)
            }
            None => EbpfDataplane::new(underlay),
        };
        dp.map(|d| AnyDatapath::Ebpf(Box::new(d)))
            .map_err(|e| e.to_string())
    };
    let kernel = || {
        KernelDataplane::new(underlay)
            .map(|d| AnyDatapath::Kernel(Box::new(d)))
            .map_err(|e| e.to_string())
    };
    let fail = |driver, reason| AgentError::Datapath {
        driver,
        device: underlay.device.clone(),
        reason,
    };
    match driver {
        Driver::Ebpf => ebpf().map(|d| (d, "ebpf")).map_err(|e| fail("ebpf", e)),
        Driver::Kernel => kernel()
            .map(|d| (d, "kernel"))
            .map_err(|e| fail("kernel", e)),
        Driver::Auto => match ebpf() {
            Ok(d) => Ok((d, "ebpf")),
            Err(e) => {
                tracing::warn!(error = %e, "the eBPF datapath cannot start; using the kernel path");
                kernel()
                    .map(|d| (d, "kernel"))
                    .map_err(|e| fail("kernel", e))
            }
        },
    }
}

/// Moves the calling thread into the network namespace at `path`.
pub(crate) fn enter_netns(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path)?;
    // SAFETY: `f` is an open namespace file for the whole call; setns only affects this thread.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_state::records::FixedIp;

    /// Rows keyed by id, as the agent keeps them.
    trait Keyed {
        fn id(&self) -> String;
    }
    macro_rules! keyed {
        ($($t:ty),*) => {$(impl Keyed for $t { fn id(&self) -> String { self.id.clone() } })*};
    }
    keyed!(
        PortRecord,
        SecurityGroupRecord,
        RuleRecord,
        RouterRecord,
        FloatingIpRecord
    );

    fn by_id<T: Keyed>(rows: Vec<T>) -> BTreeMap<String, T> {
        rows.into_iter().map(|r| (r.id(), r)).collect()
    }

    trait Push<T> {
        fn push(&mut self, row: T);
    }
    impl<T: Keyed> Push<T> for BTreeMap<String, T> {
        fn push(&mut self, row: T) {
            self.insert(row.id(), row);
        }
    }

    fn port(id: &str, host: &str, ip: &str, groups: &[&str]) -> PortRecord {
        PortRecord {
            id: id.into(),
            project_id: "p".into(),
            network_id: "n1".into(),
            name: String::new(),
            description: String::new(),
            mac_address: format!("fa:16:3e:00:00:{:02x}", id.len()),
            fixed_ips: vec![FixedIp {
                subnet_id: "s1".into(),
                ip_address: ip.into(),
            }],
            device_id: "vm".into(),
            device_owner: "compute:nova".into(),
            binding_host_id: host.into(),
            binding_vif_type: "tap".into(),
            binding_vnic_type: "normal".into(),
            security_groups: groups.iter().map(|g| g.to_string()).collect(),
            port_security_enabled: true,
            allowed_address_pairs: vec![],
            admin_state_up: true,
            status: "DOWN".into(),
            tags: vec![],
            created_at: 0,
            updated_at: 0,
            revision_number: 1,
            extra_dhcp_opts: vec![],
        }
    }

    fn view() -> View {
        let network = NetworkRecord {
            id: "n1".into(),
            project_id: "p".into(),
            name: "net".into(),
            description: String::new(),
            admin_state_up: true,
            shared: false,
            external: false,
            port_security_enabled: true,
            mtu: 1450,
            network_type: "vxlan".into(),
            physical_network: None,
            segmentation_id: Some(7),
            subnets: vec!["s1".into()],
            availability_zone_hints: vec![],
            tags: vec![],
            status: "ACTIVE".into(),
            created_at: 0,
            updated_at: 0,
            revision_number: 1,
        };
        let subnet = SubnetRecord {
            id: "s1".into(),
            project_id: "p".into(),
            network_id: "n1".into(),
            name: String::new(),
            description: String::new(),
            cidr: "10.0.0.0/24".into(),
            gateway_ip: Some("10.0.0.1".into()),
            allocation_pools: vec![],
            dns_nameservers: vec!["10.0.0.53".into()],
            host_routes: vec![],
            enable_dhcp: true,
            tags: vec![],
            created_at: 0,
            updated_at: 0,
            revision_number: 1,
            ip_version: 4,
            ipv6_ra_mode: None,
            ipv6_address_mode: None,
            router_external: false,
            subnetpool_id: None,
        };
        let rule = |id: &str, dir: &str, remote_group: Option<&str>| RuleRecord {
            id: id.into(),
            project_id: "p".into(),
            security_group_id: "g".into(),
            direction: dir.into(),
            ethertype: "IPv4".into(),
            protocol: None,
            port_range_min: None,
            port_range_max: None,
            remote_ip_prefix: None,
            remote_group_id: remote_group.map(Into::into),
            description: String::new(),
            created_at: 0,
            updated_at: 0,
            revision_number: 1,
        };
        View {
            ports: by_id(vec![
                port("a", "n1", "10.0.0.5", &["g"]),
                port("bb", "n2", "10.0.0.6", &["g"]),
                port("ccc", "n3", "10.0.0.7", &["g"]),
            ]),
            networks: [("n1".to_string(), network)].into(),
            subnets: [("s1".to_string(), subnet)].into(),
            groups: by_id(vec![SecurityGroupRecord {
                id: "g".into(),
                project_id: "p".into(),
                name: "default".into(),
                description: String::new(),
                tags: vec![],
                created_at: 0,
                updated_at: 0,
                revision_number: 1,
            }]),
            rules: by_id(vec![
                rule("r1", "egress", None),
                rule("r2", "ingress", Some("g")),
            ]),
            agents: [(
                "n2".to_string(),
                AgentRecord {
                    host: "n2".into(),
                    vtep: Ipv4Addr::new(192, 0, 2, 2),
                    driver: "ebpf".into(),
                    started_at: 0,
                    physical_networks: vec![],
                },
            )]
            .into(),
            routers: BTreeMap::new(),
            floating_ips: BTreeMap::new(),
            mappings: BTreeMap::new(),
            routed: BTreeSet::new(),
        }
    }

    /// `view()` plus network n2 (VNI 8, 10.0.1.0/24) with a port on node n2, and router r
    /// with interfaces on s1 (10.0.0.1) and s2 (10.0.1.1).
    fn routed_view() -> View {
        let mut v = view();
        let mut n2 = v.networks["n1"].clone();
        n2.id = "n2".into();
        n2.segmentation_id = Some(8);
        n2.subnets = vec!["s2".into()];
        v.networks.insert("n2".into(), n2);
        let mut s2 = v.subnets["s1"].clone();
        s2.id = "s2".into();
        s2.network_id = "n2".into();
        s2.cidr = "10.0.1.0/24".into();
        s2.gateway_ip = Some("10.0.1.1".into());
        v.subnets.insert("s2".into(), s2);
        let on_n2 = |mut p: PortRecord| {
            p.network_id = "n2".into();
            p.fixed_ips[0].subnet_id = "s2".into();
            p
        };
        v.ports.push(on_n2(port("dddd", "n2", "10.0.1.5", &["g"])));
        let rif = |p: PortRecord| PortRecord {
            device_owner: ROUTER_INTERFACE.into(),
            device_id: "r".into(),
            binding_host_id: String::new(),
            security_groups: vec![],
            ..p
        };
        v.ports.push(rif(port("ri1xx", "", "10.0.0.1", &[])));
        v.ports
            .push(rif(on_n2(port("ri2xxx", "", "10.0.1.1", &[]))));
        v.routers.push(RouterRecord {
            id: "r".into(),
            project_id: "p".into(),
            name: "r".into(),
            description: String::new(),
            admin_state_up: true,
            status: "ACTIVE".into(),
            gateway: None,
            routes: vec![
                crate::records::HostRoute {
                    destination: "192.168.50.0/24".into(),
                    nexthop: "10.0.1.5".into(),
                },
                crate::records::HostRoute {
                    destination: "172.16.0.0/12".into(),
                    nexthop: "10.9.9.9".into(),
                },
            ],
            tags: vec![],
            created_at: 0,
            updated_at: 0,
            revision_number: 1,
        });
        v
    }

    /// `routed_view()` with router r's gateway on flat network "ext" (physical network
    /// "public", 203.0.113.0/24, gateway port address .10), floating IP f1 (.20) associated
    /// with port a (10.0.0.5, node n1) and f2 (.21) unassociated and ACTIVE; nodes n1 and n2
    /// both map "public".
    fn external_view() -> View {
        let mut v = routed_view();
        let mut ext = v.networks["n1"].clone();
        ext.id = "ext".into();
        ext.network_type = "flat".into();
        ext.physical_network = Some("public".into());
        ext.segmentation_id = None;
        ext.external = true;
        ext.subnets = vec!["se".into()];
        v.networks.insert("ext".into(), ext);
        let mut se = v.subnets["s1"].clone();
        se.id = "se".into();
        se.network_id = "ext".into();
        se.cidr = "203.0.113.0/24".into();
        se.gateway_ip = Some("203.0.113.1".into());
        v.subnets.insert("se".into(), se);
        let mut gw = port("gwport", "", "203.0.113.10", &[]);
        gw.network_id = "ext".into();
        gw.fixed_ips[0].subnet_id = "se".into();
        gw.device_owner = crate::routers::ROUTER_GATEWAY.into();
        gw.device_id = "r".into();
        v.ports.push(gw);
        v.routers.get_mut("r").unwrap().gateway = Some(crate::records::RouterGateway {
            network_id: "ext".into(),
            enable_snat: true,
            port_id: "gwport".into(),
            external_fixed_ips: vec![],
        });
        let fip = |id: &str, addr: &str, port: Option<&str>, status: &str| FloatingIpRecord {
            id: id.into(),
            project_id: "p".into(),
            description: String::new(),
            floating_network_id: "ext".into(),
            floating_ip_address: addr.into(),
            floating_port_id: format!("{id}-port"),
            port_id: port.map(Into::into),
            fixed_ip_address: port.map(|_| "10.0.0.5".into()),
            router_id: port.map(|_| "r".into()),
            status: status.into(),
            tags: vec![],
            created_at: 0,
            updated_at: 0,
            revision_number: 1,
        };
        v.floating_ips = by_id(vec![
            fip("f1", "203.0.113.20", Some("a"), "DOWN"),
            fip("f2", "203.0.113.21", None, "ACTIVE"),
        ]);
        for (host, vtep) in [("n1", 1), ("n2", 2)] {
            v.agents.insert(
                host.into(),
                AgentRecord {
                    host: host.into(),
                    vtep: Ipv4Addr::new(192, 0, 2, vtep),
                    driver: "kernel".into(),
                    started_at: 0,
                    physical_networks: vec!["public".into()],
                },
            );
        }
        v.mappings = [("public".to_string(), "eth9".to_string())].into();
        v
    }

    /// The router's external side reaches the datapath of the nodes that map its physical
    /// network: one node (the first by name with a VM port on the router's networks) holds
    /// the gateway address, floating IPs go to the node of their port, and each node reports
    /// the status of its ports' floating IPs and of the unassociated ones.
    #[test]
    fn gateways_and_floating_ips_reach_the_nodes_of_their_ports() {
        let plan = external_view().plan("n1");
        let r = &plan.desired.routers[0];
        let g = r.gateway.as_ref().expect("n1 maps public");
        assert_eq!(
            (
                g.device.as_str(),
                g.ip.to_string(),
                g.subnet.to_string(),
                g.upstream,
                g.enable_snat,
                g.holds_address
            ),
            (
                "eth9",
                "203.0.113.10".into(),
                "203.0.113.0/24".into(),
                Some(Ipv4Addr::new(203, 0, 113, 1)),
                true,
                true
            )
        );
        assert_eq!(
            r.floating_ips,
            vec![FloatingIp {
                id: "f1".into(),
                floating: Ipv4Addr::new(203, 0, 113, 20),
                fixed: Ipv4Addr::new(10, 0, 0, 5),
                port_id: "a".into(),
            }]
        );
        model::check_addresses(&plan.desired).unwrap();
        assert_eq!(
            plan.floating_ips,
            vec![
                ("f1".into(), "DOWN".into(), Some("a".into())),
                ("f2".into(), "ACTIVE".into(), None)
            ]
        );

        // n2 programs the router too (port dddd), without the address or f1 (not its port).
        let plan = external_view().plan("n2");
        let r = &plan.desired.routers[0];
        assert!(!r.gateway.as_ref().unwrap().holds_address);
        assert!(r.floating_ips.is_empty());
        assert_eq!(
            plan.floating_ips,
            vec![("f2".into(), "ACTIVE".into(), None)]
        );

        // A node that does not map the physical network has no external side.
        let mut v = external_view();
        v.mappings.clear();
        let plan = v.plan("n1");
        assert!(plan.desired.routers[0].gateway.is_none());
        assert!(plan.desired.routers[0].floating_ips.is_empty());
        // Nor does one whose gateway network is not flat.
        let mut v = external_view();
        v.networks.get_mut("ext").unwrap().network_type = "vxlan".into();
        assert!(v.plan("n1").desired.routers[0].gateway.is_none());
        // Once n1 maps nothing, n2 holds the address.
        let mut v = external_view();
        v.agents.get_mut("n1").unwrap().physical_networks.clear();
        assert!(
            v.plan("n2").desired.routers[0]
                .gateway
                .as_ref()
                .unwrap()
                .holds_address
        );
    }

    /// A node with a port on one of a router's networks programs the router (both
    /// interfaces) and the remote ports of every network it joins; the remote-group rule of
    /// the local port then admits the routed network's members.
    #[test]
    fn a_router_on_a_local_network_is_programmed_with_its_networks() {
        let plan = routed_view().plan("n1");
        assert_eq!(plan.desired.routers.len(), 1);
        let r = &plan.desired.routers[0];
        let rifs: Vec<(u32, String, String)> = r
            .interfaces
            .iter()
            .map(|i| (i.vni, i.ip.to_string(), i.subnet.to_string()))
            .collect();
        assert_eq!(
            rifs,
            vec![
                (7, "10.0.0.1".into(), "10.0.0.0/24".into()),
                (8, "10.0.1.1".into(), "10.0.1.0/24".into())
            ]
        );
        assert_eq!(r.interfaces[1].mac, parse_mac("fa:16:3e:00:00:06").unwrap());
        // The extra route through a VM on n2 (an unconnected next hop is left out).
        assert_eq!(
            r.routes,
            vec![RouterRoute {
                destination: Ipv4Cidr::new(Ipv4Addr::new(192, 168, 50, 0), 24),
                nexthop: Ipv4Addr::new(10, 0, 1, 5),
            }]
        );
        let remote: Vec<(&str, u32)> = plan
            .desired
            .remote_ports
            .iter()
            .map(|p| (p.id.as_str(), p.vni))
            .collect();
        assert_eq!(remote, vec![("bb", 7), ("dddd", 8)]);
        let statuses: Vec<(&str, &str)> = plan
            .router_interfaces
            .iter()
            .map(|(id, _, want)| (id.as_str(), *want))
            .collect();
        assert_eq!(statuses, vec![("ri1xx", "ACTIVE"), ("ri2xxx", "ACTIVE")]);
        model::check_addresses(&plan.desired).unwrap();
        let remotes: Vec<String> = model::compile_sg(&plan.desired)
            .unwrap()
            .iter()
            .filter(|e| e.direction == Direction::Ingress)
            .map(|e| e.remote.to_string())
            .collect();
        assert!(remotes.contains(&"10.0.1.5/32".to_string()), "{remotes:?}");

        // The node of the routed network's port programs it too (distributed).
        let plan = routed_view().plan("n2");
        assert_eq!(plan.desired.routers.len(), 1);
        assert_eq!(plan.desired.ports[0].id, "bb");
    }

    /// No port of this node on the router's networks, the router down, or its interface
    /// removed: nothing of it is programmed and the other network is not carried.
    #[test]
    fn routers_are_programmed_only_where_and_while_they_route() {
        let plan = routed_view().plan("n9");
        assert!(plan.desired.routers.is_empty());
        // Distributed: its interfaces are up even where no VM uses them yet.
        assert!(plan
            .router_interfaces
            .iter()
            .all(|(_, _, w)| *w == "ACTIVE"));

        let mut v = routed_view();
        v.routers.get_mut("r").unwrap().admin_state_up = false;
        let plan = v.plan("n1");
        assert!(plan.desired.routers.is_empty());
        // Its interface ports stay up (as ML2/OVN reports them); it just does not forward.
        assert_eq!(plan.router_interfaces.len(), 2);
        assert!(plan
            .router_interfaces
            .iter()
            .all(|(_, _, w)| *w == "ACTIVE"));
        assert!(plan.desired.remote_ports.iter().all(|p| p.vni == 7));

        let mut v = routed_view();
        v.ports.remove("ri2xxx");
        let plan = v.plan("n1");
        assert_eq!(plan.desired.routers[0].interfaces.len(), 1);
        assert!(plan.desired.remote_ports.iter().all(|p| p.vni == 7));
    }

    #[test]
    fn local_ports_remote_ports_with_a_known_vtep_and_their_groups() {
        let plan = view().plan("n1");
        assert_eq!(plan.desired.ports.len(), 1);
        let local = &plan.desired.ports[0];
        assert_eq!((local.device.as_str(), local.vni), ("tapa", 7));
        // n3 has published no VTEP yet: its port is not reachable, n2's is.
        assert_eq!(plan.desired.remote_ports.len(), 1);
        assert_eq!(
            plan.desired.remote_ports[0].vtep,
            Ipv4Addr::new(192, 0, 2, 2)
        );
        assert_eq!(plan.desired.security_groups.len(), 1);
        assert_eq!(plan.desired.security_groups[0].rules.len(), 2);
        // The compiled rules accept it (the remote group expands over both ports).
        model::compile_sg(&plan.desired).unwrap();
        let served = &plan.served["tapa"];
        assert_eq!(served.prefix_len, 24);
        assert_eq!(served.gateway, Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(served.dns, vec![Ipv4Addr::new(10, 0, 0, 53)]);
        assert_eq!(plan.bound, [("a".to_string(), "DOWN".to_string())].into());
    }

    fn row<T: Serialize>(v: &T) -> Option<Row> {
        Some(Row {
            value: serde_json::to_vec(v).unwrap(),
            create_revision: 1,
            mod_revision: 1,
            version: 1,
        })
    }

    fn change(table: &'static str, key: &str, row: Option<Row>) -> Feed {
        Feed::Change {
            table,
            key: key.into(),
            row,
        }
    }

    /// A pass driven by changes of other nodes' ports only updates their remote entries, and
    /// ends where a whole plan from the same rows ends; anything else takes a whole plan.
    #[test]
    fn remote_port_changes_update_the_plan_as_a_whole_plan_would() {
        let mut v = view();
        let mut plan = v.plan("n1");
        let mut snaps = BTreeSet::new();
        let mut dirty = Dirty::Clean;
        // A new port on n2, a changed one (new address), one deleted, one unbound.
        let new = port("eeeee", "n2", "10.0.0.9", &["g"]);
        v.absorb(
            change(tables::PORTS, "eeeee", row(&new)),
            "n1",
            &mut dirty,
            &mut snaps,
        );
        let mut moved = v.ports["bb"].clone();
        moved.fixed_ips[0].ip_address = "10.0.0.66".into();
        v.absorb(
            change(tables::PORTS, "bb", row(&moved)),
            "n1",
            &mut dirty,
            &mut snaps,
        );
        v.absorb(
            change(tables::PORTS, "ccc", None),
            "n1",
            &mut dirty,
            &mut snaps,
        );
        assert_eq!(
            dirty,
            Dirty::Ports(["bb", "ccc", "eeeee"].map(String::from).into())
        );
        let Dirty::Ports(ids) = std::mem::take(&mut dirty) else {
            unreachable!()
        };
        assert!(v.update_ports("n1", &mut plan, &ids));
        assert_same(&plan, &v.plan("n1"));
        assert_eq!(plan.desired.remote_ports.len(), 2);
        let mut unbound = new.clone();
        unbound.binding_host_id = String::new();
        v.absorb(
            change(tables::PORTS, "eeeee", row(&unbound)),
            "n1",
            &mut dirty,
            &mut snaps,
        );
        let Dirty::Ports(ids) = std::mem::take(&mut dirty) else {
            panic!("an unbound port is no one's local port")
        };
        assert!(v.update_ports("n1", &mut plan, &ids));
        assert_same(&plan, &v.plan("n1"));
        assert_eq!(plan.desired.remote_ports.len(), 1);

        // A floating IP naming a port of this node: that port's changes take a whole plan.
        v.floating_ips.push(FloatingIpRecord {
            port_id: Some("a".into()),
            ..fip("f1")
        });
        let mut local = v.ports["a"].clone();
        local.admin_state_up = false;
        v.absorb(
            change(tables::PORTS, "a", row(&local)),
            "n1",
            &mut dirty,
            &mut snaps,
        );
        assert_eq!(dirty, Dirty::Full);
        // Any other table: a whole plan.
        let mut dirty = Dirty::Clean;
        let rule = v.rules["r1"].clone();
        v.absorb(
            change(tables::SECURITY_GROUP_RULES, "r1", row(&rule)),
            "n1",
            &mut dirty,
            &mut snaps,
        );
        assert_eq!(dirty, Dirty::Full);
    }

    /// Everything a pass uses of a plan.
    fn assert_same(plan: &Plan, whole: &Plan) {
        assert_eq!(plan.desired, whole.desired);
        assert_eq!(plan.bound, whole.bound);
        assert_eq!(plan.served, whole.served);
        assert_eq!(plan.local, whole.local);
        assert_eq!(plan.local_networks, whole.local_networks);
        assert_eq!(plan.groups_used, whole.groups_used);
        assert_eq!(plan.carried, whole.carried);
        assert_eq!(plan.remote, whole.remote);
        assert_eq!(plan.floating_ips, whole.floating_ips);
        assert_eq!(plan.router_interfaces, whole.router_interfaces);
    }

    fn fip(id: &str) -> FloatingIpRecord {
        FloatingIpRecord {
            id: id.into(),
            project_id: "p".into(),
            floating_network_id: "ext".into(),
            floating_ip_address: "203.0.113.20".into(),
            floating_port_id: "fp".into(),
            fixed_ip_address: None,
            port_id: None,
            router_id: None,
            status: "DOWN".into(),
            description: String::new(),
            tags: vec![],
            created_at: 0,
            updated_at: 0,
            revision_number: 1,
        }
    }

    /// Takes `p` in as a changed row (`None`: deleted) and runs the pass the agent would:
    /// incremental when the change allows it. Returns whether it was incremental.
    fn pass(v: &mut View, plan: &mut Plan, id: &str, p: Option<&PortRecord>) -> bool {
        let mut dirty = Dirty::Clean;
        let mut snaps = BTreeSet::new();
        v.absorb(
            change(tables::PORTS, id, p.and_then(row)),
            "n1",
            &mut dirty,
            &mut snaps,
        );
        let incremental = match std::mem::take(&mut dirty) {
            Dirty::Ports(ids) => v.update_ports("n1", plan, &ids),
            _ => false,
        };
        if !incremental {
            *plan = v.plan("n1");
        }
        incremental
    }

    /// Changes of this node's own ports (a new one, its groups changed, port security off,
    /// down, deleted, one moving here and away) update the last plan incrementally and end
    /// where a whole plan from the same rows ends, served entries, statuses and groups
    /// included; a local port on a network no local port was on takes a whole plan (it
    /// changes what the node carries).
    #[test]
    fn local_port_changes_update_the_plan_as_a_whole_plan_would() {
        let mut v = view();
        let mut g2 = v.groups["g"].clone();
        g2.id = "g2".into();
        v.groups.push(g2);
        let mut r3 = v.rules["r1"].clone();
        r3.id = "r3".into();
        r3.security_group_id = "g2".into();
        r3.direction = "ingress".into();
        r3.protocol = Some("tcp".into());
        r3.port_range_min = Some(22);
        v.rules.push(r3);
        let mut plan = v.plan("n1");
        let check = |v: &mut View, plan: &mut Plan, id: &str, p: Option<PortRecord>| {
            assert!(pass(v, plan, id, p.as_ref()), "{id}: incremental");
            assert_same(plan, &v.plan("n1"));
        };

        let new = port("ffffff", "n1", "10.0.0.11", &["g"]);
        check(&mut v, &mut plan, "ffffff", Some(new.clone()));
        assert_eq!(plan.desired.ports.len(), 2);
        assert!(plan.served.contains_key(&tap_device("ffffff")));

        // Into a group no other local port uses: its rules (and only then) are planned.
        let mut moved = new.clone();
        moved.security_groups = vec!["g2".into()];
        check(&mut v, &mut plan, "ffffff", Some(moved.clone()));
        assert!(plan.desired.security_groups.iter().any(|g| g.id == "g2"));
        let mut open = moved.clone();
        open.port_security_enabled = false;
        check(&mut v, &mut plan, "ffffff", Some(open));
        assert!(plan
            .desired
            .security_groups
            .iter()
            .any(|g| g.id == OPEN_GROUP));
        assert!(!plan.desired.security_groups.iter().any(|g| g.id == "g2"));
        check(&mut v, &mut plan, "ffffff", Some(moved.clone()));

        // A new address, then down: not served, still bound (its status is reported).
        let mut readdressed = moved.clone();
        readdressed.fixed_ips[0].ip_address = "10.0.0.12".into();
        check(&mut v, &mut plan, "ffffff", Some(readdressed.clone()));
        let mut down = readdressed;
        down.admin_state_up = false;
        check(&mut v, &mut plan, "ffffff", Some(down));
        assert!(plan.bound.contains_key("ffffff"));
        assert!(!plan.served.contains_key(&tap_device("ffffff")));
        check(&mut v, &mut plan, "ffffff", Some(moved));
        check(&mut v, &mut plan, "ffffff", None);
        assert!(!plan.bound.contains_key("ffffff"));
        assert!(!plan.desired.security_groups.iter().any(|g| g.id == "g2"));

        // A remote port moving here and back.
        let mut here = v.ports["bb"].clone();
        here.binding_host_id = "n1".into();
        check(&mut v, &mut plan, "bb", Some(here.clone()));
        assert!(!plan.remote.contains_key("bb"));
        here.binding_host_id = "n2".into();
        check(&mut v, &mut plan, "bb", Some(here));
        assert!(plan.remote.contains_key("bb"));

        // The only local port leaves network n1: what the node carries changes.
        let mut n2 = v.networks["n1"].clone();
        n2.id = "n2".into();
        n2.segmentation_id = Some(8);
        v.networks.insert("n2".into(), n2);
        let mut elsewhere = v.ports["a"].clone();
        elsewhere.network_id = "n2".into();
        assert!(
            !pass(&mut v, &mut plan, "a", Some(&elsewhere)),
            "a whole plan"
        );
        assert!(plan.remote.is_empty(), "n1 is no longer carried");
        assert_same(&plan, &v.plan("n1"));
    }

    /// A port on a router's network may move the router's gateway host: a whole plan. The
    /// networks routed are followed as router interfaces come and go.
    #[test]
    fn ports_on_routed_networks_take_a_whole_plan() {
        let mut v = routed_view();
        let mut snaps = BTreeSet::new();
        let mut dirty = Dirty::Clean;
        let ports: Vec<(String, Row)> = v
            .ports
            .iter()
            .map(|(k, p)| (k.clone(), row(p).unwrap()))
            .collect();
        v.absorb(
            Feed::Snapshot {
                table: tables::PORTS,
                rows: ports,
            },
            "n1",
            &mut dirty,
            &mut snaps,
        );
        assert_eq!(v.routed, ["n1", "n2"].map(String::from).into());
        let mut dirty = Dirty::Clean;
        let p = port("fffff", "n2", "10.0.0.10", &["g"]);
        v.absorb(
            change(tables::PORTS, "fffff", row(&p)),
            "n1",
            &mut dirty,
            &mut snaps,
        );
        assert_eq!(dirty, Dirty::Full);
        // Without the interface on n2's network, a port there is only a remote port again.
        let mut dirty = Dirty::Clean;
        v.absorb(
            change(tables::PORTS, "ri2xxx", None),
            "n1",
            &mut dirty,
            &mut snaps,
        );
        assert_eq!(dirty, Dirty::Full);
        assert_eq!(v.routed, ["n1".to_string()].into());
        let mut dirty = Dirty::Clean;
        let mut q = port("gggggg", "n2", "10.0.1.9", &["g"]);
        q.network_id = "n2".into();
        q.fixed_ips[0].subnet_id = "s2".into();
        v.absorb(
            change(tables::PORTS, "gggggg", row(&q)),
            "n1",
            &mut dirty,
            &mut snaps,
        );
        assert_eq!(dirty, Dirty::Ports(["gggggg".to_string()].into()));
    }

    #[test]
    fn a_node_without_ports_on_a_network_programs_none_of_it() {
        let plan = view().plan("n9");
        assert!(plan.desired.ports.is_empty());
        assert!(plan.desired.remote_ports.is_empty());
        assert!(plan.desired.security_groups.is_empty());
    }

    #[test]
    fn port_security_off_opens_the_port_and_deleted_groups_close_it() {
        let mut v = view();
        v.ports.get_mut("a").unwrap().port_security_enabled = false;
        let plan = v.plan("n1");
        assert_eq!(plan.desired.ports[0].security_groups, vec![OPEN_GROUP]);
        let open = plan
            .desired
            .security_groups
            .iter()
            .find(|g| g.id == OPEN_GROUP)
            .unwrap();
        assert_eq!(open.rules.len(), 2);

        let mut v = view();
        v.groups.clear();
        let plan = v.plan("n1");
        let g = &plan.desired.security_groups[0];
        assert_eq!((g.id.as_str(), g.rules.len()), ("g", 0));
    }

    #[test]
    fn rules_translate_protocols_ranges_and_remotes() {
        let mut r = view().rules["r1"].clone();
        r.protocol = Some("tcp".into());
        r.port_range_min = Some(22);
        r.port_range_max = Some(22);
        r.remote_ip_prefix = Some("192.0.2.0/24".into());
        let s = sg_rule(&r).unwrap();
        assert_eq!(s.protocol, Some(6));
        assert_eq!(s.port_range, Some((22, 22)));
        assert_eq!(
            s.remote,
            Remote::Cidr(Ipv4Cidr::new(Ipv4Addr::new(192, 0, 2, 0), 24))
        );
        r.protocol = Some("icmp".into());
        assert_eq!(sg_rule(&r).unwrap().port_range, None);
        r.ethertype = "IPv6".into();
        r.remote_ip_prefix = Some("2001:db8::/32".into());
        assert!(sg_rule(&r).is_none());
    }
}

/// Root only: taps in a namespace of the test's own (a thread that left the machine's), moved
/// into a named namespace the test makes and removes.
#[cfg(test)]
mod adopt_tests {
    use super::*;

    /// Deletes the named namespace, also when the test fails.
    struct NetnsGuard(String);

    impl Drop for NetnsGuard {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &self.0])
                .status();
        }
    }

    fn ip(args: &[&str]) {
        let ok = std::process::Command::new("ip")
            .args(args)
            .status()
            .unwrap()
            .success();
        assert!(ok, "ip {args:?}");
    }

    fn in_netns(netns: &str, device: &str) -> bool {
        std::process::Command::new("ip")
            .args(["-n", netns, "link", "show", "dev", device])
            .output()
            .unwrap()
            .status
            .success()
    }

    /// A tap libvirt has not yet given its network's MTU stays where libvirt works on it;
    /// once it has that MTU it moves, and so does one that waited `TAP_SETTLE` with another.
    #[test]
    fn a_tap_moves_once_libvirt_has_set_it_up() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true needs root for this test"
            );
            eprintln!("not root: skipped");
            return;
        }
        let netns = format!("sat{}", std::process::id());
        std::thread::spawn(move || {
            // SAFETY: unshare only moves this thread, which nothing else uses, into a new
            // network namespace; the processes it starts inherit it.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
            ip(&["netns", "add", &netns]);
            let _guard = NetnsGuard(netns.clone());
            let (a, b) = ("tapsat0000a", "tapsat0000b");
            ip(&["tuntap", "add", "dev", a, "mode", "tap"]);
            ip(&["tuntap", "add", "dev", b, "mode", "tap"]);
            let mtus: BTreeMap<String, u32> = [(a.to_string(), 1450), (b.to_string(), 1450)].into();
            let mut host = HostTaps {
                devices: DeviceCache::new(),
                waiting: HashMap::new(),
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let adopt = |host: &mut HostTaps| {
                rt.block_on(adopt_taps(&netns, [a, b].into_iter(), &mtus, host))
            };
            adopt(&mut host);
            assert!(
                !in_netns(&netns, a) && !in_netns(&netns, b),
                "MTU not set yet"
            );
            ip(&["link", "set", "dev", a, "mtu", "1450"]);
            adopt(&mut host);
            assert!(in_netns(&netns, a), "its network's MTU: moved");
            assert!(!in_netns(&netns, b));
            host.waiting
                .insert(b.to_string(), std::time::Instant::now() - TAP_SETTLE);
            adopt(&mut host);
            assert!(
                in_netns(&netns, b),
                "waited long enough: moved all the same"
            );
            assert!(host.waiting.is_empty());
        })
        .join()
        .unwrap();
    }
}
