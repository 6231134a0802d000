//! The eBPF driver: loads `ebpf/datapath.c`, attaches XDP to the underlay and a TCX
//! ingress program to every local port's device, and keeps the maps equal to the
//! desired state by diffing against what it last wrote.

use std::{
    collections::{BTreeSet, HashMap},
    io,
    path::{Path, PathBuf},
};

use aya::{
    maps::{lpm_trie::Key as LpmKey, Array, HashMap as BpfHashMap, LpmTrie, MapError, PerCpuArray},
    pin::PinError,
    programs::{
        links::{FdLink, LinkError, PinnedLink},
        tc::SchedClassifierLinkId,
        xdp::XdpLinkId,
        ProgramError, SchedClassifier, TcAttachType, TestRun, TestRunOptions, Xdp, XdpMode,
    },
    Ebpf, EbpfError, EbpfLoader,
};
use tracing::{debug, warn};

use crate::{
    abi::{
        self, Config, CtKey, CtVal, Endpoint, EpKey, PortVal, Rif, RifKey, RouteKeyData, RouteVal,
        SgKeyData,
    },
    kernel,
    model::{self, CompileError, DesiredState, Direction, Mac, Underlay},
    netdev, Counters, Dataplane,
};

#[derive(Debug, thiserror::Error)]
pub enum EbpfDriverError {
    #[error("loading the datapath object failed")]
    Load(#[source] Box<EbpfError>),
    #[error("program {0} is missing from the datapath object")]
    MissingProgram(&'static str),
    #[error("map {0} is missing from the datapath object")]
    MissingMap(&'static str),
    #[error("program {name} could not be loaded or attached")]
    Program {
        name: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("map {name} could not be read or updated")]
    Map {
        name: &'static str,
        #[source]
        source: Box<MapError>,
    },
    #[error("interface {device} was not found")]
    Interface {
        device: String,
        #[source]
        source: io::Error,
    },
    #[error("the desired state is invalid")]
    Compile(#[from] CompileError),
    #[error("pin directory {0} could not be created or cleaned")]
    PinDir(PathBuf, #[source] io::Error),
    #[error("link pinned at {0} could not be pinned or reused")]
    Link(PathBuf, #[source] LinkError),
    #[error("link could not be pinned at {0}")]
    PinLink(PathBuf, #[source] PinError),
    #[error("router {router} has an external gateway or floating IPs: a detached (test-run) datapath has no NAT namespaces")]
    NatUnsupported { router: String },
    #[error("the calling thread's network namespace could not be read")]
    Netns(#[source] io::Error),
    #[error("the NAT namespace of router {router} could not be set up")]
    Nat {
        router: String,
        #[source]
        source: crate::kernel::KernelDriverError,
    },
}

const MAPS: [&str; 8] = [
    abi::MAP_CONFIG,
    abi::MAP_PORTS,
    abi::MAP_ENDPOINTS,
    abi::MAP_SG,
    abi::MAP_CT,
    abi::MAP_COUNTERS,
    abi::MAP_RIFS,
    abi::MAP_ROUTES,
];
const XDP_LINK_PIN: &str = "link_xdp";
const TC_LINK_PIN_PREFIX: &str = "link_tc_";

/// Pins `link` at `path` and returns it, still owned by the caller, for `attach_to_link`.
fn pin_link<L>(link: L, path: &Path) -> Result<L, EbpfDriverError>
where
    FdLink: TryFrom<L, Error = LinkError>,
    L: TryFrom<FdLink, Error = LinkError>,
{
    let fd = FdLink::try_from(link).map_err(|e| EbpfDriverError::Link(path.to_owned(), e))?;
    let pinned = fd
        .pin(path)
        .map_err(|e| EbpfDriverError::PinLink(path.to_owned(), e))?;
    L::try_from(FdLink::from(pinned)).map_err(|e| EbpfDriverError::Link(path.to_owned(), e))
}

/// Attaches the underlay program in driver mode. A device whose previous XDP link is still
/// being released (its owner just closed it, or its process is exiting) answers EBUSY for a
/// moment: the attach is retried for up to a second before that is an error.
fn attach_xdp(xdp: &mut Xdp, ifindex: u32) -> Result<XdpLinkId, EbpfDriverError> {
    let mut tries = 0;
    loop {
        match xdp.attach_to_if_index(ifindex, XdpMode::Driver) {
            Err(e) if tries < 50 && is_busy(&e) => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other.map_err(prog_err(abi::PROG_UNDERLAY)),
        }
    }
}

fn is_busy(e: &aya::programs::ProgramError) -> bool {
    matches!(e, aya::programs::ProgramError::SyscallError(s)
        if s.io_error.raw_os_error() == Some(libc::EBUSY))
}

/// The link pinned at `path`, if any.
fn pinned_link<L>(path: &Path) -> Result<Option<L>, EbpfDriverError>
where
    L: TryFrom<FdLink, Error = LinkError>,
{
    if !path.exists() {
        return Ok(None);
    }
    let pinned =
        PinnedLink::from_pin(path).map_err(|e| EbpfDriverError::Link(path.to_owned(), e))?;
    L::try_from(FdLink::from(pinned))
        .map(Some)
        .map_err(|e| EbpfDriverError::Link(path.to_owned(), e))
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> EbpfDriverError {
    move |e| EbpfDriverError::Map {
        name,
        source: Box::new(e),
    }
}

fn prog_err(name: &'static str) -> impl FnOnce(ProgramError) -> EbpfDriverError {
    move |e| EbpfDriverError::Program {
        name,
        source: Box::new(e),
    }
}

fn iface_err(device: &str) -> impl FnOnce(io::Error) -> EbpfDriverError + '_ {
    move |e| EbpfDriverError::Interface {
        device: device.to_string(),
        source: e,
    }
}

type SgKey = (u32, SgKeyData);
type RouteKey = (u32, RouteKeyData);

/// The next hop through which a router's NAT namespace reaches the router's subnets: an
/// address of no network, whose permanent neighbour entry is the leg's end in the node's
/// namespace (the namespace never ARPs; the tc program there rewrites both MACs).
const LEG_NEXTHOP: &str = "169.254.0.1";

/// A router's NAT namespace as this driver plugs it in: the kernel driver's router namespace
/// with its external side (macvlan, `ip shoal_nat`, SNAT transit), joined to the datapath by
/// one veth, the leg: `sxb<hash>` in the node's namespace runs the tc program as a "port" of
/// the router, `sxr<hash>` in the router's namespace is where the router's subnets are routed.
#[derive(Debug)]
struct NatRouter {
    netns: String,
    /// The leg's end in the node's namespace, and its ifindex.
    leg: String,
    ifindex: u32,
    /// The router's subnets, routed to the leg in the namespace.
    subnets: BTreeSet<model::Ipv4Cidr>,
    external: kernel::ExtDev,
}

/// The eBPF datapath of one node.
#[derive(Debug)]
pub struct EbpfDataplane {
    bpf: Ebpf,
    /// `false` for the packet-table harness: programs loaded, nothing attached.
    attach: bool,
    /// bpffs directory holding pinned maps and links, when the datapath must survive
    /// a restart of the process.
    pin_dir: Option<PathBuf>,
    /// Port ids found in the pinned `shoal_ports` map, by ifindex, until `apply` claims them.
    recovered_ids: HashMap<u32, u32>,
    xdp_link: Option<XdpLinkId>,
    /// device name -> (ifindex, TCX link).
    tc_links: HashMap<String, (u32, Option<SchedClassifierLinkId>)>,
    port_ids: HashMap<String, u32>,
    next_port_id: u32,
    ports: HashMap<u32, PortVal>,
    endpoints: HashMap<EpKey, Endpoint>,
    sg: BTreeSet<SgKey>,
    router_ids: HashMap<String, u32>,
    next_router_id: u32,
    rifs: HashMap<RifKey, Rif>,
    routes: HashMap<RouteKey, RouteVal>,
    /// Prefix of this node's router namespaces (None: detached, no NAT).
    router_prefix: Option<String>,
    /// The MTU of the legs into NAT namespaces: the underlay's less VXLAN's 50 bytes.
    leg_mtu: u32,
    /// Router id -> its NAT namespace.
    nat: HashMap<String, NatRouter>,
    /// Router namespaces found at start (a previous instance's): removed by the first apply
    /// unless wanted.
    found_nat: BTreeSet<String>,
    /// The ports' devices' indexes and MACs, kept while no link of the namespace changes.
    devices: netdev::DeviceCache,
}

impl EbpfDataplane {
    /// Loads the programs, configures the underlay and attaches XDP to it (native mode).
    /// Must run in the node's network namespace.
    pub fn new(underlay: &Underlay) -> Result<Self, EbpfDriverError> {
        Self::open(underlay, None)
    }

    /// As [`EbpfDataplane::new`], with maps and links pinned under `pin_dir` (on bpffs):
    /// forwarding survives the process, and a new process reuses the pinned maps,
    /// swaps its programs into the pinned links and rebuilds its view from the maps, so
    /// its first `apply` changes only what differs. [`Dataplane::teardown`] unpins.
    pub fn new_pinned(underlay: &Underlay, pin_dir: &Path) -> Result<Self, EbpfDriverError> {
        Self::open(underlay, Some(pin_dir))
    }

    fn open(underlay: &Underlay, pin_dir: Option<&Path>) -> Result<Self, EbpfDriverError> {
        let ifindex = netdev::ifindex(&underlay.device).map_err(iface_err(&underlay.device))?;
        let mac = netdev::mac(&underlay.device).map_err(iface_err(&underlay.device))?;
        let mut dp = Self::load(true, pin_dir)?;
        let prefix =
            kernel::router_ns_prefix(kernel::netns_inode().map_err(EbpfDriverError::Netns)?);
        dp.found_nat = kernel::router_namespaces(&prefix).into_iter().collect();
        dp.router_prefix = Some(prefix);
        dp.leg_mtu = kernel::mtu_of(&underlay.device).unwrap_or(1500) - 50;
        dp.set_config(Config {
            local_vtep_be: abi::ip_be(underlay.vtep),
            underlay_ifindex: ifindex,
            underlay_mac: mac.0,
            pad: [0; 2],
        })?;
        let xdp: &mut Xdp = dp
            .bpf
            .program_mut(abi::PROG_UNDERLAY)
            .ok_or(EbpfDriverError::MissingProgram(abi::PROG_UNDERLAY))?
            .try_into()
            .map_err(prog_err(abi::PROG_UNDERLAY))?;
        let Some(dir) = pin_dir else {
            dp.xdp_link = Some(attach_xdp(xdp, ifindex)?);
            return Ok(dp);
        };
        let path = dir.join(XDP_LINK_PIN);
        let link = match pinned_link(&path)? {
            Some(link) => link,
            None => {
                let id = attach_xdp(xdp, ifindex)?;
                let link = xdp.take_link(id).map_err(prog_err(abi::PROG_UNDERLAY))?;
                pin_link(link, &path)?
            }
        };
        // Atomically replaces whatever program the pinned link ran with this one.
        dp.xdp_link = Some(
            xdp.attach_to_link(link)
                .map_err(prog_err(abi::PROG_UNDERLAY))?,
        );
        dp.recover()?;
        Ok(dp)
    }

    /// Rebuilds the driver's view from pinned maps and re-adopts pinned tc links.
    fn recover(&mut self) -> Result<(), EbpfDriverError> {
        {
            let map = self
                .bpf
                .map(abi::MAP_PORTS)
                .ok_or(EbpfDriverError::MissingMap(abi::MAP_PORTS))?;
            let ports: BpfHashMap<_, u32, PortVal> =
                BpfHashMap::try_from(map).map_err(map_err(abi::MAP_PORTS))?;
            for (ifindex, port) in ports.iter().filter_map(Result::ok) {
                self.ports.insert(ifindex, port);
                if port.leg_router_id != 0 {
                    continue; // a NAT leg, no port id
                }
                self.recovered_ids.insert(ifindex, port.port_id);
                self.next_port_id = self.next_port_id.max(port.port_id + 1);
            }
        }
        {
            let map = self
                .bpf
                .map(abi::MAP_ENDPOINTS)
                .ok_or(EbpfDriverError::MissingMap(abi::MAP_ENDPOINTS))?;
            let eps: BpfHashMap<_, EpKey, Endpoint> =
                BpfHashMap::try_from(map).map_err(map_err(abi::MAP_ENDPOINTS))?;
            self.endpoints = eps.iter().filter_map(Result::ok).collect();
        }
        {
            let map = self
                .bpf
                .map(abi::MAP_SG)
                .ok_or(EbpfDriverError::MissingMap(abi::MAP_SG))?;
            let sg: LpmTrie<_, SgKeyData, u32> =
                LpmTrie::try_from(map).map_err(map_err(abi::MAP_SG))?;
            self.sg = sg
                .keys()
                .filter_map(Result::ok)
                .map(|k| (k.prefix_len(), k.data()))
                .collect();
        }
        {
            let map = self
                .bpf
                .map(abi::MAP_RIFS)
                .ok_or(EbpfDriverError::MissingMap(abi::MAP_RIFS))?;
            let rifs: BpfHashMap<_, RifKey, Rif> =
                BpfHashMap::try_from(map).map_err(map_err(abi::MAP_RIFS))?;
            self.rifs = rifs.iter().filter_map(Result::ok).collect();
            // Router names are not in the maps: the next apply numbers routers afresh,
            // above every id still in use, and replaces the entries make-before-break.
            self.next_router_id = self
                .rifs
                .values()
                .map(|r| r.router_id + 1)
                .max()
                .unwrap_or(1);
        }
        {
            let map = self
                .bpf
                .map(abi::MAP_ROUTES)
                .ok_or(EbpfDriverError::MissingMap(abi::MAP_ROUTES))?;
            let routes: LpmTrie<_, RouteKeyData, RouteVal> =
                LpmTrie::try_from(map).map_err(map_err(abi::MAP_ROUTES))?;
            let keys: Vec<LpmKey<RouteKeyData>> = routes.keys().filter_map(Result::ok).collect();
            for k in keys {
                if let Ok(v) = routes.get(&k, 0) {
                    self.routes.insert((k.prefix_len(), k.data()), v);
                }
                self.next_router_id = self.next_router_id.max(k.data().router_id + 1);
            }
        }
        let dir = self
            .pin_dir
            .clone()
            .expect("recover runs with a pin directory");
        let entries =
            std::fs::read_dir(&dir).map_err(|e| EbpfDriverError::PinDir(dir.clone(), e))?;
        for entry in entries {
            let entry = entry.map_err(|e| EbpfDriverError::PinDir(dir.clone(), e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(device) = name.strip_prefix(TC_LINK_PIN_PREFIX) else {
                continue;
            };
            let path = entry.path();
            let Ok(ifindex) = netdev::ifindex(device) else {
                // The device went away with its VM: drop the link with the pin.
                let _ = std::fs::remove_file(&path);
                continue;
            };
            let Some(link) = pinned_link(&path)? else {
                continue;
            };
            let tc: &mut SchedClassifier = self
                .bpf
                .program_mut(abi::PROG_PORT)
                .ok_or(EbpfDriverError::MissingProgram(abi::PROG_PORT))?
                .try_into()
                .map_err(prog_err(abi::PROG_PORT))?;
            let id = tc.attach_to_link(link).map_err(prog_err(abi::PROG_PORT))?;
            self.tc_links
                .insert(device.to_string(), (ifindex, Some(id)));
        }
        Ok(())
    }

    /// Loads the programs without attaching anything, for BPF_PROG_TEST_RUN.
    pub fn load_detached(config: Config) -> Result<Self, EbpfDriverError> {
        let mut dp = Self::load(false, None)?;
        dp.set_config(config)?;
        Ok(dp)
    }

    fn load(attach: bool, pin_dir: Option<&Path>) -> Result<Self, EbpfDriverError> {
        let mut loader = EbpfLoader::new();
        if let Some(dir) = pin_dir {
            std::fs::create_dir_all(dir).map_err(|e| EbpfDriverError::PinDir(dir.to_owned(), e))?;
            for name in MAPS {
                // Reused when already pinned there, created and pinned otherwise.
                loader.map_pin_path(name, dir.join(name));
            }
        }
        let mut bpf = loader
            .load(abi::DATAPATH_OBJ)
            .map_err(|e| EbpfDriverError::Load(Box::new(e)))?;
        {
            let xdp: &mut Xdp = bpf
                .program_mut(abi::PROG_UNDERLAY)
                .ok_or(EbpfDriverError::MissingProgram(abi::PROG_UNDERLAY))?
                .try_into()
                .map_err(prog_err(abi::PROG_UNDERLAY))?;
            xdp.load().map_err(prog_err(abi::PROG_UNDERLAY))?;
        }
        {
            let tc: &mut SchedClassifier = bpf
                .program_mut(abi::PROG_PORT)
                .ok_or(EbpfDriverError::MissingProgram(abi::PROG_PORT))?
                .try_into()
                .map_err(prog_err(abi::PROG_PORT))?;
            tc.load().map_err(prog_err(abi::PROG_PORT))?;
        }
        Ok(EbpfDataplane {
            bpf,
            attach,
            pin_dir: pin_dir.map(Path::to_owned),
            recovered_ids: HashMap::new(),
            xdp_link: None,
            tc_links: HashMap::new(),
            port_ids: HashMap::new(),
            next_port_id: 1,
            ports: HashMap::new(),
            endpoints: HashMap::new(),
            sg: BTreeSet::new(),
            router_ids: HashMap::new(),
            next_router_id: 1,
            rifs: HashMap::new(),
            routes: HashMap::new(),
            router_prefix: None,
            leg_mtu: 1450,
            nat: HashMap::new(),
            found_nat: BTreeSet::new(),
            devices: netdev::DeviceCache::new(),
        })
    }

    /// Makes router `r`'s NAT namespace (its external side, and the leg into it) what `r`
    /// asks for; returns the leg's ifindex and the MAC of its peer in the namespace.
    fn plug_nat(&mut self, r: &model::Router) -> Result<(u32, Mac), EbpfDriverError> {
        let nat_err = |source| EbpfDriverError::Nat {
            router: r.id.clone(),
            source,
        };
        let Some(prefix) = self.router_prefix.clone() else {
            return Err(EbpfDriverError::NatUnsupported {
                router: r.id.clone(),
            });
        };
        let Some(external) = kernel::want_external(r) else {
            return Err(EbpfDriverError::NatUnsupported {
                router: r.id.clone(),
            });
        };
        let netns = kernel::router_ns_name(&prefix, &r.id);
        let h = kernel::fnv(&[&r.id]);
        let (leg, peer) = (format!("sxb{h:08x}"), format!("sxr{h:08x}"));
        // Locally administered, stable: the same router keeps the same MAC across restarts.
        let peer_mac = Mac([
            0x02,
            0x53,
            (h >> 24) as u8,
            (h >> 16) as u8,
            (h >> 8) as u8,
            h as u8,
        ]);
        let plugged = self
            .nat
            .get(&r.id)
            .is_some_and(|n| netdev::ifindex(&n.leg).ok() == Some(n.ifindex));
        if !plugged {
            self.found_nat.remove(&netns);
            kernel::KernelDataplane::add_router(&netns).map_err(nat_err)?;
            let mtu = self.leg_mtu.to_string();
            let mac = peer_mac.to_string();
            let steps: [&[&str]; 4] = [
                &["link", "set", &leg, "mtu", &mtu, "up"],
                &[
                    "-n", &netns, "link", "set", &peer, "address", &mac, "mtu", &mtu, "up",
                ],
                &["-n", &netns, "route", "flush", "dev", &peer],
                &["-n", &netns, "neigh", "flush", "dev", &peer],
            ];
            kernel::run_exists_ok(
                "ip",
                &[
                    "link", "add", &leg, "type", "veth", "peer", "name", &peer, "netns", &netns,
                ],
            )
            .map_err(nat_err)?;
            let _ = kernel::run(
                "sysctl",
                &["-qw", &format!("net.ipv6.conf.{leg}.disable_ipv6=1")],
            );
            for args in steps {
                kernel::run("ip", args).map_err(nat_err)?;
            }
            let leg_mac = netdev::mac(&leg).map_err(iface_err(&leg))?.to_string();
            kernel::run(
                "ip",
                &[
                    "-n",
                    &netns,
                    "neigh",
                    "replace",
                    LEG_NEXTHOP,
                    "lladdr",
                    &leg_mac,
                    "dev",
                    &peer,
                    "nud",
                    "permanent",
                ],
            )
            .map_err(nat_err)?;
            // A leg that went took its routes with it; the external side is rebuilt.
            self.nat.remove(&r.id);
        }
        let ifindex = netdev::ifindex(&leg).map_err(iface_err(&leg))?;
        let subnets: BTreeSet<model::Ipv4Cidr> = r.interfaces.iter().map(|i| i.subnet).collect();
        let have = self.nat.get(&r.id);
        let empty = BTreeSet::new();
        let have_subnets = have.map_or(&empty, |n| &n.subnets);
        for s in subnets.difference(have_subnets) {
            kernel::run(
                "ip",
                &[
                    "-n",
                    &netns,
                    "route",
                    "replace",
                    &s.to_string(),
                    "via",
                    LEG_NEXTHOP,
                    "dev",
                    &peer,
                    "onlink",
                ],
            )
            .map_err(nat_err)?;
        }
        for s in have_subnets.difference(&subnets) {
            let _ = kernel::run("ip", &["-n", &netns, "route", "del", &s.to_string()]);
        }
        let have_external = have.map(|n| &n.external);
        if have_external != Some(&external) {
            kernel::apply_external(&netns, have_external, &external).map_err(nat_err)?;
        }
        self.nat.insert(
            r.id.clone(),
            NatRouter {
                netns,
                leg,
                ifindex,
                subnets,
                external,
            },
        );
        Ok((ifindex, peer_mac))
    }

    /// Removes the NAT namespaces of routers `keep` does not name (and those a previous
    /// instance left): the namespace takes its leg, macvlan, rules and connections with it.
    fn unplug_nat(&mut self, keep: &BTreeSet<&str>) {
        let gone: Vec<String> = self
            .nat
            .keys()
            .filter(|id| !keep.contains(id.as_str()))
            .cloned()
            .collect();
        let mut namespaces: Vec<String> = std::mem::take(&mut self.found_nat).into_iter().collect();
        for id in gone {
            if let Some(n) = self.nat.remove(&id) {
                namespaces.push(n.netns);
            }
        }
        for netns in namespaces {
            if let Err(e) = kernel::run("ip", &["netns", "del", &netns]) {
                debug!(netns, error = %e, "removing a NAT namespace");
            }
        }
    }

    fn set_config(&mut self, config: Config) -> Result<(), EbpfDriverError> {
        let map = self
            .bpf
            .map_mut(abi::MAP_CONFIG)
            .ok_or(EbpfDriverError::MissingMap(abi::MAP_CONFIG))?;
        let mut arr: Array<_, Config> = Array::try_from(map).map_err(map_err(abi::MAP_CONFIG))?;
        arr.set(0, config, 0).map_err(map_err(abi::MAP_CONFIG))
    }

    /// Runs the tc program once on `packet` as if it arrived from the VM on interface
    /// `ifindex`. Returns the tc action and the packet as the program left it.
    pub fn test_run_port(
        &self,
        ifindex: u32,
        packet: &[u8],
    ) -> Result<(u32, Vec<u8>), EbpfDriverError> {
        // struct __sk_buff: ifindex is the 11th __u32 (offset 40); the kernel accepts a
        // context whose other fields are zero.
        let mut ctx = [0u8; 192];
        ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
        let tc: &SchedClassifier = self
            .bpf
            .program(abi::PROG_PORT)
            .ok_or(EbpfDriverError::MissingProgram(abi::PROG_PORT))?
            .try_into()
            .map_err(prog_err(abi::PROG_PORT))?;
        run(tc, abi::PROG_PORT, packet, Some(&ctx))
    }

    /// Runs the XDP program once on `packet` as received from the underlay.
    pub fn test_run_underlay(&self, packet: &[u8]) -> Result<(u32, Vec<u8>), EbpfDriverError> {
        let xdp: &Xdp = self
            .bpf
            .program(abi::PROG_UNDERLAY)
            .ok_or(EbpfDriverError::MissingProgram(abi::PROG_UNDERLAY))?
            .try_into()
            .map_err(prog_err(abi::PROG_UNDERLAY))?;
        run(xdp, abi::PROG_UNDERLAY, packet, None)
    }

    /// Runs the XDP program `repeat` times on `packet` in the kernel and returns the
    /// mean nanoseconds per run (BPF_PROG_TEST_RUN's own timing).
    pub fn test_run_underlay_repeat(
        &self,
        packet: &[u8],
        repeat: u32,
    ) -> Result<f64, EbpfDriverError> {
        let xdp: &Xdp = self
            .bpf
            .program(abi::PROG_UNDERLAY)
            .ok_or(EbpfDriverError::MissingProgram(abi::PROG_UNDERLAY))?
            .try_into()
            .map_err(prog_err(abi::PROG_UNDERLAY))?;
        let mut out = vec![0u8; packet.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            repeat,
            ..TestRunOptions::new()
        };
        let result = xdp.test_run(opts).map_err(prog_err(abi::PROG_UNDERLAY))?;
        // The kernel reports the mean duration of one run.
        Ok(result.duration.as_nanos() as f64)
    }

    /// Sets the outer destination MAC of a remote VTEP so encapsulated packets leave
    /// with `bpf_redirect` instead of a kernel neighbour lookup (used by tests).
    pub fn set_vtep_mac(
        &mut self,
        vtep: std::net::Ipv4Addr,
        mac: model::Mac,
    ) -> Result<(), EbpfDriverError> {
        let vtep_be = abi::ip_be(vtep);
        let changed: Vec<(EpKey, Endpoint)> = self
            .endpoints
            .iter_mut()
            .filter(|(_, ep)| ep.ifindex == 0 && ep.vtep_be == vtep_be)
            .map(|(k, ep)| {
                ep.vtep_mac = mac.0;
                (*k, *ep)
            })
            .collect();
        let mut map = Self::endpoints_map(&mut self.bpf)?;
        for (k, ep) in changed {
            map.insert(k, ep, 0).map_err(map_err(abi::MAP_ENDPOINTS))?;
        }
        Ok(())
    }

    /// Number of live conntrack entries (for tests and diagnostics).
    pub fn conntrack_len(&self) -> Result<usize, EbpfDriverError> {
        let map = self
            .bpf
            .map(abi::MAP_CT)
            .ok_or(EbpfDriverError::MissingMap(abi::MAP_CT))?;
        let ct: BpfHashMap<_, CtKey, CtVal> =
            BpfHashMap::try_from(map).map_err(map_err(abi::MAP_CT))?;
        Ok(ct.keys().filter(Result::is_ok).count())
    }

    fn endpoints_map(
        bpf: &mut Ebpf,
    ) -> Result<BpfHashMap<&mut aya::maps::MapData, EpKey, Endpoint>, EbpfDriverError> {
        let map = bpf
            .map_mut(abi::MAP_ENDPOINTS)
            .ok_or(EbpfDriverError::MissingMap(abi::MAP_ENDPOINTS))?;
        BpfHashMap::try_from(map).map_err(map_err(abi::MAP_ENDPOINTS))
    }

    fn port_id(&mut self, id: &str, ifindex: u32) -> u32 {
        if let Some(n) = self.port_ids.get(id) {
            return *n;
        }
        // After a restart, the pinned port entry of this device still names its id.
        let n = match self.recovered_ids.remove(&ifindex) {
            Some(n) => n,
            None => {
                let n = self.next_port_id;
                self.next_port_id += 1;
                n
            }
        };
        self.port_ids.insert(id.to_string(), n);
        n
    }

    fn router_id(&mut self, id: &str) -> u32 {
        if let Some(n) = self.router_ids.get(id) {
            return *n;
        }
        let n = self.next_router_id;
        self.next_router_id += 1;
        self.router_ids.insert(id.to_string(), n);
        n
    }

    /// Writes the entries of `want` that differ from `have` into the hash map `name`.
    fn put_hash<K: aya::Pod + Eq + std::hash::Hash, V: aya::Pod + PartialEq>(
        bpf: &mut Ebpf,
        name: &'static str,
        have: &HashMap<K, V>,
        want: &HashMap<K, V>,
    ) -> Result<(), EbpfDriverError> {
        let map = bpf.map_mut(name).ok_or(EbpfDriverError::MissingMap(name))?;
        let mut m: BpfHashMap<_, K, V> = BpfHashMap::try_from(map).map_err(map_err(name))?;
        for (k, v) in want {
            if have.get(k) != Some(v) {
                m.insert(k, v, 0).map_err(map_err(name))?;
            }
        }
        Ok(())
    }

    /// Removes the keys of `have` that `want` lacks from the hash map `name`.
    fn prune_hash<K: aya::Pod + Eq + std::hash::Hash, V: aya::Pod>(
        bpf: &mut Ebpf,
        name: &'static str,
        have: &HashMap<K, V>,
        want: &HashMap<K, V>,
    ) -> Result<(), EbpfDriverError> {
        let map = bpf.map_mut(name).ok_or(EbpfDriverError::MissingMap(name))?;
        let mut m: BpfHashMap<_, K, V> = BpfHashMap::try_from(map).map_err(map_err(name))?;
        for k in have.keys().filter(|k| !want.contains_key(*k)) {
            m.remove(k).map_err(map_err(name))?;
        }
        Ok(())
    }

    fn routes_map(
        bpf: &mut Ebpf,
    ) -> Result<LpmTrie<&mut aya::maps::MapData, RouteKeyData, RouteVal>, EbpfDriverError> {
        let map = bpf
            .map_mut(abi::MAP_ROUTES)
            .ok_or(EbpfDriverError::MissingMap(abi::MAP_ROUTES))?;
        LpmTrie::try_from(map).map_err(map_err(abi::MAP_ROUTES))
    }

    fn attach_port(
        &mut self,
        device: &str,
    ) -> Result<Option<SchedClassifierLinkId>, EbpfDriverError> {
        if !self.attach {
            return Ok(None);
        }
        let tc: &mut SchedClassifier = self
            .bpf
            .program_mut(abi::PROG_PORT)
            .ok_or(EbpfDriverError::MissingProgram(abi::PROG_PORT))?
            .try_into()
            .map_err(prog_err(abi::PROG_PORT))?;
        let id = tc
            .attach(device, TcAttachType::Ingress)
            .map_err(prog_err(abi::PROG_PORT))?;
        let Some(dir) = &self.pin_dir else {
            return Ok(Some(id));
        };
        let path = dir.join(format!("{TC_LINK_PIN_PREFIX}{device}"));
        let _ = std::fs::remove_file(&path); // a stale pin of an earlier device of that name
        let link = tc.take_link(id).map_err(prog_err(abi::PROG_PORT))?;
        let link = pin_link(link, &path)?;
        tc.attach_to_link(link)
            .map(Some)
            .map_err(prog_err(abi::PROG_PORT))
    }

    fn detach_port(&mut self, device: &str, link: Option<SchedClassifierLinkId>) {
        if let Some(dir) = &self.pin_dir {
            let _ = std::fs::remove_file(dir.join(format!("{TC_LINK_PIN_PREFIX}{device}")));
        }
        let Some(link) = link else { return };
        let result = self
            .bpf
            .program_mut(abi::PROG_PORT)
            .ok_or(EbpfDriverError::MissingProgram(abi::PROG_PORT))
            .and_then(|p| <&mut SchedClassifier>::try_from(p).map_err(prog_err(abi::PROG_PORT)))
            .and_then(|tc| tc.detach(link).map_err(prog_err(abi::PROG_PORT)));
        // The device may already be gone with its VM; the link then died with it.
        if let Err(e) = result {
            debug!(device, error = %e, "detaching tc program");
        }
    }

    /// Deletes every conntrack entry of the given ports (rules changed: Neutron also
    /// drops the connections a removed rule no longer allows).
    fn flush_conntrack(&mut self, port_ids: &BTreeSet<u32>) -> Result<(), EbpfDriverError> {
        if port_ids.is_empty() {
            return Ok(());
        }
        let map = self
            .bpf
            .map_mut(abi::MAP_CT)
            .ok_or(EbpfDriverError::MissingMap(abi::MAP_CT))?;
        let mut ct: BpfHashMap<_, CtKey, CtVal> =
            BpfHashMap::try_from(map).map_err(map_err(abi::MAP_CT))?;
        let stale: Vec<CtKey> = ct
            .keys()
            .filter_map(Result::ok)
            .filter(|k| port_ids.contains(&k.port_id))
            .collect();
        for k in stale {
            // Concurrent LRU eviction may have removed it already.
            let _ = ct.remove(&k);
        }
        Ok(())
    }
}

fn run<P>(
    prog: &P,
    name: &'static str,
    packet: &[u8],
    ctx: Option<&[u8]>,
) -> Result<(u32, Vec<u8>), EbpfDriverError>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = aya::programs::TestRunResult>,
{
    let mut out = vec![0u8; packet.len() + 256];
    let opts = TestRunOptions {
        data_in: Some(packet),
        data_out: Some(&mut out),
        ctx_in: ctx,
        ..TestRunOptions::new()
    };
    let result = prog.test_run(opts).map_err(prog_err(name))?;
    out.truncate(result.data_size_out as usize);
    Ok((result.return_value, out))
}

impl EbpfDataplane {
    /// [`Dataplane::apply`]'s work, with device lookups from the cache.
    fn apply_desired(&mut self, desired: &DesiredState) -> Result<(), EbpfDriverError> {
        model::check_addresses(desired)?;
        let entries = model::compile_sg(desired)?;

        // 1. What the maps must hold.
        let mut want_devices: HashMap<String, u32> = HashMap::new();
        let mut want_ports: HashMap<u32, PortVal> = HashMap::new();
        let mut want_eps: HashMap<EpKey, Endpoint> = HashMap::new();
        let mut ids = Vec::with_capacity(desired.ports.len());
        for p in &desired.ports {
            let ifindex = self
                .devices
                .ifindex(&p.device)
                .map_err(iface_err(&p.device))?;
            let port_id = self.port_id(&p.id, ifindex);
            ids.push(port_id);
            want_devices.insert(p.device.clone(), ifindex);
            want_ports.insert(
                ifindex,
                PortVal {
                    port_id,
                    vni: p.vni,
                    mac: p.mac.0,
                    // The device's own MAC: the VM reaches the node's metadata service there.
                    host_mac: self.devices.mac(&p.device).map_err(iface_err(&p.device))?.0,
                    leg_router_id: 0,
                },
            );
            for ip in &p.ips {
                want_eps.insert(
                    EpKey {
                        vni: p.vni,
                        ip_be: abi::ip_be(*ip),
                    },
                    Endpoint {
                        mac: p.mac.0,
                        vtep_mac: [0; 6],
                        port_id,
                        ifindex,
                        vtep_be: 0,
                    },
                );
            }
        }
        for r in &desired.remote_ports {
            let vtep_be = abi::ip_be(r.vtep);
            for ip in &r.ips {
                let key = EpKey {
                    vni: r.vni,
                    ip_be: abi::ip_be(*ip),
                };
                // Keep an outer MAC set through set_vtep_mac while the VTEP is unchanged.
                let vtep_mac = self
                    .endpoints
                    .get(&key)
                    .filter(|old| old.vtep_be == vtep_be && old.ifindex == 0)
                    .map_or([0; 6], |old| old.vtep_mac);
                want_eps.insert(
                    key,
                    Endpoint {
                        mac: r.mac.0,
                        vtep_mac,
                        port_id: 0,
                        ifindex: 0,
                        vtep_be,
                    },
                );
            }
        }
        // Routers: each interface's address answers ARP with its MAC (an endpoint with no
        // device and no VTEP), its MAC names the router, its subnet is a connected route.
        let mut want_rifs: HashMap<RifKey, Rif> = HashMap::new();
        let mut want_routes: HashMap<RouteKey, RouteVal> = HashMap::new();
        let live_routers: BTreeSet<&str> = desired.routers.iter().map(|r| r.id.as_str()).collect();
        self.router_ids
            .retain(|id, _| live_routers.contains(id.as_str()));
        for r in &desired.routers {
            let router_id = self.router_id(&r.id);
            if r.gateway.is_some() {
                // North-south: the router's default route is its NAT namespace, through the
                // leg, which is a "port" of the router (docs/datapath.md).
                let (ifindex, peer_mac) = self.plug_nat(r)?;
                let leg = self.nat[&r.id].leg.clone();
                want_devices.insert(leg, ifindex);
                want_ports.insert(
                    ifindex,
                    PortVal {
                        mac: peer_mac.0,
                        leg_router_id: router_id,
                        ..PortVal::default()
                    },
                );
                want_routes.insert(
                    (
                        abi::ROUTE_FIXED_BITS,
                        RouteKeyData {
                            router_id,
                            dst_be: 0,
                        },
                    ),
                    RouteVal {
                        mac: peer_mac.0,
                        leg_ifindex: ifindex,
                        ..RouteVal::default()
                    },
                );
            }
            for i in &r.interfaces {
                want_rifs.insert(
                    RifKey {
                        vni: i.vni,
                        mac: i.mac.0,
                        pad: [0; 2],
                    },
                    Rif { router_id },
                );
                want_routes.insert(
                    (
                        abi::ROUTE_FIXED_BITS + u32::from(i.subnet.len),
                        RouteKeyData {
                            router_id,
                            dst_be: abi::ip_be(i.subnet.addr),
                        },
                    ),
                    RouteVal {
                        vni: i.vni,
                        mac: i.mac.0,
                        nexthop_be: 0,
                        ..RouteVal::default()
                    },
                );
                want_eps.insert(
                    EpKey {
                        vni: i.vni,
                        ip_be: abi::ip_be(i.ip),
                    },
                    Endpoint {
                        mac: i.mac.0,
                        ..Endpoint::default()
                    },
                );
            }
            // Extra routes: through the interface whose subnet holds the next hop (checked
            // by `check_addresses`); a connected subnet's own entry of the same prefix wins.
            for route in &r.routes {
                let Some(i) = r.interface_for(route.nexthop) else {
                    continue;
                };
                want_routes
                    .entry((
                        abi::ROUTE_FIXED_BITS + u32::from(route.destination.len),
                        RouteKeyData {
                            router_id,
                            dst_be: abi::ip_be(route.destination.addr),
                        },
                    ))
                    .or_insert(RouteVal {
                        vni: i.vni,
                        mac: i.mac.0,
                        nexthop_be: abi::ip_be(route.nexthop),
                        ..RouteVal::default()
                    });
            }
        }
        let want_sg: BTreeSet<SgKey> = entries
            .iter()
            .map(|e| {
                let data = SgKeyData {
                    port_id: ids[e.port],
                    direction: match e.direction {
                        Direction::Ingress => abi::DIR_INGRESS,
                        Direction::Egress => abi::DIR_EGRESS,
                    },
                    proto: e.proto,
                    dport_be: abi::port_be(e.dport),
                    remote_be: abi::ip_be(e.remote.addr),
                };
                (abi::SG_FIXED_BITS + u32::from(e.remote.len), data)
            })
            .collect();

        // 2. Make before break: new entries first, then attach, then remove stale ones.
        {
            let mut eps = Self::endpoints_map(&mut self.bpf)?;
            for (k, v) in &want_eps {
                if self.endpoints.get(k) != Some(v) {
                    eps.insert(k, v, 0).map_err(map_err(abi::MAP_ENDPOINTS))?;
                }
            }
        }
        {
            let map = self
                .bpf
                .map_mut(abi::MAP_SG)
                .ok_or(EbpfDriverError::MissingMap(abi::MAP_SG))?;
            let mut sg: LpmTrie<_, SgKeyData, u32> =
                LpmTrie::try_from(map).map_err(map_err(abi::MAP_SG))?;
            for (len, data) in want_sg.difference(&self.sg) {
                sg.insert(&LpmKey::new(*len, *data), 1, 0)
                    .map_err(map_err(abi::MAP_SG))?;
            }
        }
        {
            let mut routes = Self::routes_map(&mut self.bpf)?;
            for ((len, data), v) in &want_routes {
                if self.routes.get(&(*len, *data)) != Some(v) {
                    routes
                        .insert(&LpmKey::new(*len, *data), v, 0)
                        .map_err(map_err(abi::MAP_ROUTES))?;
                }
            }
        }
        Self::put_hash(&mut self.bpf, abi::MAP_RIFS, &self.rifs, &want_rifs)?;
        {
            let map = self
                .bpf
                .map_mut(abi::MAP_PORTS)
                .ok_or(EbpfDriverError::MissingMap(abi::MAP_PORTS))?;
            let mut ports: BpfHashMap<_, u32, PortVal> =
                BpfHashMap::try_from(map).map_err(map_err(abi::MAP_PORTS))?;
            for (k, v) in &want_ports {
                if self.ports.get(k) != Some(v) {
                    ports.insert(k, v, 0).map_err(map_err(abi::MAP_PORTS))?;
                }
            }
        }
        for (device, ifindex) in &want_devices {
            let current = self.tc_links.get(device).map(|(i, _)| *i);
            if current == Some(*ifindex) {
                continue;
            }
            if let Some((_, link)) = self.tc_links.remove(device) {
                self.detach_port(device, link); // device re-created with a new index
            }
            let link = self.attach_port(device)?;
            self.tc_links.insert(device.clone(), (*ifindex, link));
        }

        let stale_devices: Vec<String> = self
            .tc_links
            .keys()
            .filter(|d| !want_devices.contains_key(*d))
            .cloned()
            .collect();
        for device in stale_devices {
            if let Some((_, link)) = self.tc_links.remove(&device) {
                self.detach_port(&device, link);
            }
        }
        {
            let map = self
                .bpf
                .map_mut(abi::MAP_PORTS)
                .ok_or(EbpfDriverError::MissingMap(abi::MAP_PORTS))?;
            let mut ports: BpfHashMap<_, u32, PortVal> =
                BpfHashMap::try_from(map).map_err(map_err(abi::MAP_PORTS))?;
            for k in self.ports.keys().filter(|k| !want_ports.contains_key(*k)) {
                ports.remove(k).map_err(map_err(abi::MAP_PORTS))?;
            }
        }
        let mut changed_ports: BTreeSet<u32> = BTreeSet::new();
        {
            let map = self
                .bpf
                .map_mut(abi::MAP_SG)
                .ok_or(EbpfDriverError::MissingMap(abi::MAP_SG))?;
            let mut sg: LpmTrie<_, SgKeyData, u32> =
                LpmTrie::try_from(map).map_err(map_err(abi::MAP_SG))?;
            for (len, data) in self.sg.difference(&want_sg) {
                sg.remove(&LpmKey::new(*len, *data))
                    .map_err(map_err(abi::MAP_SG))?;
                changed_ports.insert(data.port_id);
            }
        }
        Self::prune_hash(&mut self.bpf, abi::MAP_RIFS, &self.rifs, &want_rifs)?;
        {
            let mut routes = Self::routes_map(&mut self.bpf)?;
            for (len, data) in self.routes.keys().filter(|k| !want_routes.contains_key(*k)) {
                routes
                    .remove(&LpmKey::new(*len, *data))
                    .map_err(map_err(abi::MAP_ROUTES))?;
            }
        }
        {
            let stale: Vec<EpKey> = self
                .endpoints
                .keys()
                .filter(|k| !want_eps.contains_key(*k))
                .copied()
                .collect();
            let mut eps = Self::endpoints_map(&mut self.bpf)?;
            for k in stale {
                eps.remove(&k).map_err(map_err(abi::MAP_ENDPOINTS))?;
            }
        }

        let nat_routers: BTreeSet<&str> = desired
            .routers
            .iter()
            .filter(|r| r.gateway.is_some())
            .map(|r| r.id.as_str())
            .collect();
        self.unplug_nat(&nat_routers);

        // 3. Forget ids of removed ports; their connections go with them.
        let live: BTreeSet<&str> = desired.ports.iter().map(|p| p.id.as_str()).collect();
        let gone: Vec<String> = self
            .port_ids
            .keys()
            .filter(|id| !live.contains(id.as_str()))
            .cloned()
            .collect();
        for id in gone {
            if let Some(n) = self.port_ids.remove(&id) {
                changed_ports.insert(n);
            }
        }
        // Ports found pinned after a restart that the desired state no longer has.
        changed_ports.extend(self.recovered_ids.drain().map(|(_, n)| n));
        self.flush_conntrack(&changed_ports)?;

        debug!(
            ports = want_ports.len(),
            endpoints = want_eps.len(),
            sg_entries = want_sg.len(),
            routes = want_routes.len(),
            "applied desired state"
        );
        self.rifs = want_rifs;
        self.routes = want_routes;
        self.ports = want_ports;
        self.endpoints = want_eps;
        self.sg = want_sg;
        Ok(())
    }
}

impl Dataplane for EbpfDataplane {
    type Error = EbpfDriverError;

    fn apply(&mut self, desired: &DesiredState) -> Result<(), EbpfDriverError> {
        self.devices.refresh();
        let r = self.apply_desired(desired);
        if r.is_err() {
            // A device may have gone (or come back) under a remembered index.
            self.devices.forget();
        }
        r
    }

    fn counters(&self) -> Result<Counters, EbpfDriverError> {
        let map = self
            .bpf
            .map(abi::MAP_COUNTERS)
            .ok_or(EbpfDriverError::MissingMap(abi::MAP_COUNTERS))?;
        let arr: PerCpuArray<_, u64> =
            PerCpuArray::try_from(map).map_err(map_err(abi::MAP_COUNTERS))?;
        let mut out = Counters::new();
        for (i, name) in abi::COUNTER_NAMES.iter().enumerate() {
            let values = arr
                .get(&(i as u32), 0)
                .map_err(map_err(abi::MAP_COUNTERS))?;
            out.insert(name.to_string(), values.iter().sum());
        }
        Ok(out)
    }

    fn teardown(mut self) -> Result<(), EbpfDriverError> {
        let links: Vec<(String, Option<SchedClassifierLinkId>)> =
            self.tc_links.drain().map(|(d, (_, l))| (d, l)).collect();
        for (device, link) in links {
            self.detach_port(&device, link);
        }
        self.unplug_nat(&BTreeSet::new());
        if let Some(link) = self.xdp_link.take() {
            let xdp: &mut Xdp = self
                .bpf
                .program_mut(abi::PROG_UNDERLAY)
                .ok_or(EbpfDriverError::MissingProgram(abi::PROG_UNDERLAY))?
                .try_into()
                .map_err(prog_err(abi::PROG_UNDERLAY))?;
            if let Err(e) = xdp.detach(link) {
                warn!(error = %e, "detaching XDP from the underlay");
            }
        }
        if let Some(dir) = &self.pin_dir {
            // Unpinned maps and links die with this process's descriptors.
            std::fs::remove_dir_all(dir).map_err(|e| EbpfDriverError::PinDir(dir.clone(), e))?;
        }
        Ok(())
    }
}
