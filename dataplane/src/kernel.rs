//! The kernel-path driver: a Linux vxlan device and a bridge per network, static FDB
//! entries for remote ports (plus head-end replication entries so ARP floods to the
//! network's VTEPs), and nftables with conntrack for security groups. It is the
//! baseline in benchmarks and the fallback for hosts without XDP.
//!
//! Security groups need conntrack of bridged IPv4, which this kernel provides through
//! br_netfilter (nf_conntrack_bridge is not built). br_netfilter shows the bridge, not
//! the port, as the interface to `inet` rules, so a `bridge` table first marks each
//! frame with its source port (low 16 bits) and destination port (high 16 bits), and
//! the `inet` forward chain dispatches on the mark. Before that, bridge prerouting
//! carries the VNI in the mark so that an `inet` raw chain can give each network its
//! own conntrack zone.
//!
//! Routers: this kernel has no VRF, so each router is a network namespace of its own on every
//! node that programs it (`shoalr<node netns inode>-<hash>`, as Neutron's `qrouter-`
//! namespaces), with IPv4 forwarding on. Each interface is a veth: the bridge end `srb<hash>`
//! is a port of its network's bridge (with a sticky static FDB entry for the interface MAC,
//! so the same MAC answering on other nodes never moves it), the router end `srt<hash>` carries
//! the interface's MAC and address in the router's namespace. The router's neighbours are
//! permanent entries for every known port of the subnet (L2 population, no ARP from the
//! router), so every node routes its VMs' packets itself and delivers them as L2 on the
//! destination network. Security groups stay on the bridge hops (in the networks' zones).
//!
//! External networks: a router with a gateway gets a macvlan on the host interface its flat
//! physical network is mapped to, in its namespace, with the gateway address (on the router's
//! gateway node) and the floating IPs of local ports, and an `ip shoal_nat` table there: DNAT
//! and SNAT for floating IPs, SNAT to the gateway address for the rest. Routers on other nodes
//! send their SNAT traffic to the gateway node's router over the external link (policy
//! routing), so it is translated in one place.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    io::Write as _,
    net::Ipv4Addr,
    process::{Command, Stdio},
};

use tracing::debug;

use crate::{
    model::{self, CompileError, DesiredState, Direction, Mac, Underlay},
    Counters, Dataplane,
};

#[derive(Debug, thiserror::Error)]
pub enum KernelDriverError {
    #[error("command `{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("could not run `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("could not enable bridge netfilter (conntrack for bridged IPv4)")]
    Sysctl(#[source] std::io::Error),
    #[error("the desired state is invalid")]
    Compile(#[from] CompileError),
    #[error("port {0} is attached to two networks")]
    PortInTwoNetworks(String),
    #[error("cannot read this node's network namespace")]
    Netns(#[source] std::io::Error),
}

const TABLE_BRIDGE: &str = "shoal_br";
const TABLE_INET: &str = "shoal";
const COUNTERS_BRIDGE: [&str; 4] = [
    "drop_spoof_mac",
    "drop_spoof_ip",
    "drop_unsupported",
    "drop_host",
];
/// Where guests find the metadata service (served on each network's bridge, node/src/metadata.rs).
const METADATA_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
const COUNTERS_INET: [&str; 2] = ["drop_sg_egress", "drop_sg_ingress"];

pub(crate) fn run(program: &str, args: &[&str]) -> Result<(), KernelDriverError> {
    output(program, args).map(drop)
}

/// As [`run`], but an object that already exists counts as success: a driver started
/// after a restart finds the devices and entries of its predecessor.
pub(crate) fn run_exists_ok(program: &str, args: &[&str]) -> Result<(), KernelDriverError> {
    match run(program, args) {
        Err(KernelDriverError::Command { stderr, .. }) if stderr.contains("File exists") => Ok(()),
        other => other,
    }
}

pub(crate) fn output(program: &str, args: &[&str]) -> Result<String, KernelDriverError> {
    let command = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| KernelDriverError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(KernelDriverError::Command {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn nft_script(script: &str) -> Result<(), KernelDriverError> {
    nft_script_in(None, script)
}

/// Runs an nft script in the named namespace (through nsenter, which, unlike `ip netns exec`,
/// does not remount /sys), or in the caller's when `netns` is `None`.
fn nft_script_in(netns: Option<&str>, script: &str) -> Result<(), KernelDriverError> {
    match netns {
        Some(ns) => run_stdin(
            "nsenter",
            &[&format!("--net=/run/netns/{ns}"), "nft", "-f", "-"],
            script,
        ),
        None => run_stdin("nft", &["-f", "-"], script),
    }
}

/// Runs `program args` with `input` on its standard input.
fn run_stdin(program: &str, args: &[&str], input: &str) -> Result<(), KernelDriverError> {
    let command = format!("{program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| KernelDriverError::Spawn {
            command: command.clone(),
            source,
        })?;
    // Written from another thread while this one drains stderr, so a long batch with many
    // failing lines cannot fill both pipes and block both processes.
    let mut stdin = child.stdin.take().expect("piped stdin");
    let input = input.to_owned();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child
        .wait_with_output()
        .map_err(|source| KernelDriverError::Spawn {
            command: command.clone(),
            source,
        })?;
    // A program that stops reading early (an `ip -batch` that exits on a failed line) closes
    // the pipe: its exit status and message say why, not the write's error.
    let written = writer.join().expect("stdin writer panicked");
    if !out.status.success() {
        return Err(KernelDriverError::Command {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    written.map_err(|source| KernelDriverError::Spawn { command, source })
}

/// What a line of a [`Batch`] that fails means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnError {
    /// The apply fails.
    Fail,
    /// Success if the object exists already (as [`run_exists_ok`]).
    ExistsOk,
    /// Success if the object is gone already: a deletion has nothing left to do.
    MissingOk,
    /// Best effort: logged and ignored (the object went with its device or namespace).
    Ignore,
}

/// `ip` or `bridge` commands of one apply run by one process (`-batch -` on standard input)
/// instead of one process each: the kernel driver's convergence cost was mostly process starts.
/// `-force` lets the lines after a failed one run; if any line failed, every line is run again
/// on its own (lines are idempotent, or deletions whose repeat is `MissingOk`/`Ignore`), so the
/// outcome and the error, which names the failing command, are those of one process per line.
#[derive(Debug)]
struct Batch {
    program: &'static str,
    /// `-n NETNS` for `ip`: the namespace the lines act in.
    netns: Option<String>,
    lines: Vec<(String, OnError)>,
}

impl Batch {
    fn new(program: &'static str, netns: Option<&str>) -> Self {
        Batch {
            program,
            netns: netns.map(str::to_string),
            lines: Vec::new(),
        }
    }

    /// Adds one command (its words as on the command line, after the program name).
    fn push(&mut self, on_error: OnError, words: &[&str]) {
        self.lines.push((words.join(" "), on_error));
    }

    fn run(self) -> Result<(), KernelDriverError> {
        if self.lines.is_empty() {
            return Ok(());
        }
        let mut args: Vec<&str> = Vec::new();
        if let Some(ns) = &self.netns {
            args.extend(["-n", ns.as_str()]);
        }
        let prefix = args.len();
        args.extend(["-force", "-batch", "-"]);
        let mut input = String::new();
        for (line, _) in &self.lines {
            input.push_str(line);
            input.push('\n');
        }
        let Err(batch_error) = run_stdin(self.program, &args, &input) else {
            return Ok(());
        };
        debug!(error = %batch_error, lines = self.lines.len(), "batch failed; running its lines one by one");
        args.truncate(prefix);
        for (line, on_error) in &self.lines {
            let mut line_args = args.clone();
            line_args.extend(line.split_whitespace());
            let result = run(self.program, &line_args);
            match (result, on_error) {
                (Ok(()), _) => {}
                (Err(KernelDriverError::Command { stderr, .. }), OnError::ExistsOk)
                    if stderr.contains("File exists") => {}
                (Err(KernelDriverError::Command { stderr, .. }), OnError::MissingOk)
                    if stderr.contains("No such file or directory") => {}
                (Err(e), OnError::Ignore) => debug!(error = %e, "best-effort command failed"),
                (Err(e), _) => return Err(e),
            }
        }
        Ok(())
    }
}

fn bridge_name(vni: u32) -> String {
    format!("sbr{vni}")
}

fn vxlan_name(vni: u32) -> String {
    format!("svx{vni}")
}

/// 32-bit FNV-1a: short stable names for kernel objects named after long ids.
pub(crate) fn fnv(parts: &[&str]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for p in parts {
        for b in p.bytes().chain([0]) {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
    }
    h
}

/// The bridge end and the router end of a router interface's veth.
fn rif_names(router: &str, port: &str) -> (String, String) {
    let h = fnv(&[router, port]);
    (format!("srb{h:08x}"), format!("srt{h:08x}"))
}

const ROUTER_NS_PREFIX: &str = "shoalr";

/// The prefix of the router namespaces of the node whose network namespace has inode `ino`
/// (names under /run/netns are machine-wide; several nodes may share a machine).
pub(crate) fn router_ns_prefix(ino: u64) -> String {
    format!("{ROUTER_NS_PREFIX}{ino}-")
}

/// The namespace of router `router` among those with prefix `prefix`.
pub(crate) fn router_ns_name(prefix: &str, router: &str) -> String {
    format!("{prefix}{:08x}", fnv(&[router]))
}

/// The inode of the calling thread's network namespace.
pub(crate) fn netns_inode() -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata("/proc/thread-self/ns/net")?.ino())
}

/// Deletes the router namespaces the kernel driver made for the node whose network
/// namespace is at `node_netns` (e.g. `/run/netns/NAME`): for tests and tools that remove
/// a node without a driver teardown.
pub fn remove_router_namespaces(node_netns: &str) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let prefix = router_ns_prefix(std::fs::metadata(node_netns)?.ino());
    for name in router_namespaces(&prefix) {
        let _ = run("ip", &["netns", "del", &name]);
    }
    Ok(())
}

pub(crate) fn router_namespaces(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// A router interface as this driver builds it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct RifDev {
    netns: String,
    router_end: String,
    vni: u32,
    mac: Mac,
    ip: Ipv4Addr,
    len: u8,
}

/// A router's external side as this driver builds it in the router's namespace: a macvlan
/// `sre<hash>` on the host interface the external network is mapped to, holding the gateway
/// address (on the router's gateway node) and the floating IPs of local ports as /32s, and an
/// `ip shoal_nat` table doing the NAT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ExtDev {
    /// The macvlan's name (in the router's namespace).
    name: String,
    /// The host interface it sits on.
    parent: String,
    /// The gateway port's MAC when this node holds the gateway address, else the kernel's.
    mac: Option<Mac>,
    addrs: BTreeSet<(Ipv4Addr, u8)>,
    subnet: model::Ipv4Cidr,
    upstream: Option<Ipv4Addr>,
    /// On a node without the gateway address, with SNAT: the gateway node's router address,
    /// where the router's subnets go (policy routing) to be translated; the router's subnets
    /// and the fixed addresses with a floating IP here (which leave directly).
    transit: Option<Transit>,
    /// The router namespace's NAT ruleset.
    nat: String,
}

/// The SNAT transit of a router on a node without the gateway address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Transit {
    /// The gateway node's router: its address and MAC on the external link (the node that
    /// holds the address uses the gateway port's MAC, so it is known without ARP, which this
    /// router could not send without an address of its own).
    gateway: Ipv4Addr,
    mac: Mac,
    /// The router's subnets: their packets to anywhere else go to the gateway node.
    subnets: Vec<model::Ipv4Cidr>,
    /// Fixed addresses with a floating IP here: they leave directly from it.
    fixed: Vec<Ipv4Addr>,
}

/// Policy-routing rule priorities of the SNAT transit (the router's namespace is ours).
const RULE_TO_SUBNETS: u32 = 1000;
const RULE_FROM_FLOATING: u32 = 1100;
const RULE_FROM_SUBNETS: u32 = 1200;
/// The routing table of the SNAT transit: a default route to the gateway node.
const TRANSIT_TABLE: &str = "200";

const TABLE_NAT: &str = "shoal_nat";

/// The external side of router `r` in namespace `netns`, if it has one.
pub(crate) fn want_external(r: &model::Router) -> Option<ExtDev> {
    let g = r.gateway.as_ref()?;
    let name = format!("sre{:08x}", fnv(&[&r.id]));
    let mut addrs = BTreeSet::new();
    if g.holds_address {
        addrs.insert((g.ip, g.subnet.len));
    }
    addrs.extend(r.floating_ips.iter().map(|f| (f.floating, 32)));
    let mut nat = String::new();
    let _ = writeln!(
        nat,
        "add table ip {TABLE_NAT}\ndelete table ip {TABLE_NAT}\ntable ip {TABLE_NAT} {{"
    );
    // Inbound: a floating address becomes its fixed one, from outside and from the router's
    // own side too (hairpin: a VM reaching a floating IP served here).
    let _ = writeln!(
        nat,
        "  chain prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;"
    );
    for f in &r.floating_ips {
        let _ = writeln!(nat, "    ip daddr {} dnat to {}", f.floating, f.fixed);
    }
    let _ = writeln!(nat, "  }}");
    let subnets: Vec<String> = r.interfaces.iter().map(|i| i.subnet.to_string()).collect();
    // Outbound: a port with a floating IP leaves from it, every other one from the gateway
    // address (SNAT), on the node that holds it. Only a connection's first packet gets here.
    let _ = writeln!(
        nat,
        "  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;"
    );
    for f in &r.floating_ips {
        let _ = writeln!(
            nat,
            "    oifname \"{name}\" ip saddr {} snat to {}",
            f.fixed, f.floating
        );
    }
    if g.snat_here() {
        // Also what other nodes' routers send here (transit), see the forward chain.
        let _ = writeln!(nat, "    oifname \"{name}\" snat to {}", g.ip);
    }
    // Hairpin: a connection from the router's subnets DNATed to a fixed address and going
    // back to the router's side must leave from an address of this namespace, or the
    // destination would answer the VM directly and the VM would see the fixed address. As
    // Neutron: from the source's own floating IP when it has one here, else from the gateway
    // address where this node holds it, else from the floating address it was sent to.
    if !subnets.is_empty() {
        for f in &r.floating_ips {
            let _ = writeln!(
                nat,
                "    oifname != \"{name}\" ct status dnat ip saddr {} snat to {}",
                f.fixed, f.floating
            );
        }
        let set = subnets.join(", ");
        if g.holds_address {
            let _ = writeln!(
                nat,
                "    oifname != \"{name}\" ct status dnat ip saddr {{ {set} }} snat to {}",
                g.ip
            );
        } else {
            for f in &r.floating_ips {
                let _ = writeln!(
                    nat,
                    "    oifname != \"{name}\" ct status dnat ip saddr {{ {set} }} ip daddr {} snat to {}",
                    f.fixed, f.floating
                );
            }
        }
    }
    let _ = writeln!(nat, "  }}");
    // With SNAT on, nothing enters from outside but replies and floating IP traffic, and on a
    // node without the gateway address nothing leaves untranslated.
    let _ = writeln!(
        nat,
        "  chain forward {{\n    type filter hook forward priority filter; policy accept;"
    );
    if g.enable_snat {
        let _ = writeln!(
            nat,
            "    iifname \"{name}\" ct state established,related accept\n    iifname \"{name}\" ct status dnat accept"
        );
        // The gateway node translates for the other nodes' routers too: their VMs' packets
        // arrive on the external link from the router's subnets and leave it again.
        if g.holds_address && !subnets.is_empty() {
            let _ = writeln!(
                nat,
                "    iifname \"{name}\" oifname \"{name}\" ip saddr {{ {} }} accept",
                subnets.join(", ")
            );
        }
        let _ = writeln!(nat, "    iifname \"{name}\" drop");
    }
    let _ = writeln!(nat, "  }}\n}}");
    Some(ExtDev {
        name,
        parent: g.device.clone(),
        mac: g.holds_address.then_some(g.mac),
        addrs,
        subnet: g.subnet,
        upstream: g.upstream.filter(|u| g.subnet.contains(*u)),
        transit: (g.enable_snat && !g.holds_address).then(|| Transit {
            gateway: g.ip,
            mac: g.mac,
            subnets: r.interfaces.iter().map(|i| i.subnet).collect(),
            fixed: r.floating_ips.iter().map(|f| f.fixed).collect(),
        }),
        nat,
    })
}

/// Makes the external side of the router in `netns` equal `want`, from `have`.
pub(crate) fn apply_external(
    netns: &str,
    have: Option<&ExtDev>,
    want: &ExtDev,
) -> Result<(), KernelDriverError> {
    let name = want.name.as_str();
    let same_link =
        have.is_some_and(|h| (&h.name, &h.parent, h.mac) == (&want.name, &want.parent, want.mac));
    let empty = BTreeSet::new();
    let have_addrs = if same_link {
        have.map_or(&empty, |h| &h.addrs)
    } else {
        // A previous instance's link, or one on another interface or with another MAC.
        let _ = run("ip", &["-n", netns, "link", "del", name]);
        if let Some(h) = have {
            let _ = run("ip", &["-n", netns, "link", "del", &h.name]);
        }
        run(
            "ip",
            &[
                "link",
                "add",
                name,
                "link",
                &want.parent,
                "type",
                "macvlan",
                "mode",
                "bridge",
            ],
        )?;
        if let Err(e) = run("ip", &["link", "set", name, "netns", netns]) {
            let _ = run("ip", &["link", "del", name]);
            return Err(e);
        }
        if let Some(mac) = want.mac {
            run(
                "ip",
                &[
                    "-n",
                    netns,
                    "link",
                    "set",
                    name,
                    "address",
                    &mac.to_string(),
                ],
            )?;
        }
        // Created in the node's namespace, it took that namespace's defaults: the gateway node
        // must accept other routers' transit (their sources route back through the router's
        // interfaces, not this link).
        run(
            "nsenter",
            &[
                &format!("--net=/run/netns/{netns}"),
                "sysctl",
                "-qw",
                &format!("net.ipv4.conf.{name}.rp_filter=0"),
                &format!("net.ipv4.conf.{name}.send_redirects=0"),
            ],
        )?;
        run("ip", &["-n", netns, "link", "set", name, "up"])?;
        &empty
    };
    for (ip, len) in want.addrs.difference(have_addrs) {
        run(
            "ip",
            &[
                "-n",
                netns,
                "addr",
                "replace",
                &format!("{ip}/{len}"),
                "dev",
                name,
            ],
        )?;
    }
    for (ip, len) in have_addrs.difference(&want.addrs) {
        let _ = run(
            "ip",
            &[
                "-n",
                netns,
                "addr",
                "del",
                &format!("{ip}/{len}"),
                "dev",
                name,
            ],
        );
    }
    // The external subnet is on the link whether or not this node holds an address in it.
    run(
        "ip",
        &[
            "-n",
            netns,
            "route",
            "replace",
            &want.subnet.to_string(),
            "dev",
            name,
        ],
    )?;
    match want.upstream {
        Some(up) => run(
            "ip",
            &[
                "-n",
                netns,
                "route",
                "replace",
                "default",
                "via",
                &up.to_string(),
                "dev",
                name,
            ],
        )?,
        None => {
            let _ = run("ip", &["-n", netns, "route", "del", "default"]);
        }
    }
    if !same_link || have.and_then(|h| h.transit.as_ref()) != want.transit.as_ref() {
        apply_transit(netns, name, want.transit.as_ref())?;
    }
    if !same_link || have.map(|h| &h.nat) != Some(&want.nat) {
        nft_script_in(Some(netns), &want.nat)?;
    }
    // Connections already translated through an address that went (a disassociated
    // floating IP, a gateway address moved to another node) would go on: conntrack keeps
    // their translation. They are deleted, as Neutron's L3 agent does.
    if let Some(h) = have {
        for (ip, _) in h.addrs.difference(&want.addrs) {
            flush_conntrack(netns, *ip);
        }
    }
    Ok(())
}

/// Deletes the connections of router namespace `netns` translated to or from `ip`: those
/// that arrived for it (original destination: a floating IP's inbound) and those that left
/// from it (reply destination: SNAT). Best effort: `conntrack` (Debian package `conntrack`)
/// answers 1 when there was nothing to delete.
pub(crate) fn flush_conntrack(netns: &str, ip: Ipv4Addr) {
    let path = format!("--net=/run/netns/{netns}");
    let ip = ip.to_string();
    for selector in ["--orig-dst", "--reply-dst"] {
        match Command::new("nsenter")
            .args([path.as_str(), "conntrack", "-D", selector, &ip])
            .output()
        {
            Ok(out) if !out.status.success() => {
                let stderr = String::from_utf8_lossy(&out.stderr);
                // "0 flow entries have been deleted" is not a failure.
                if !stderr.contains("0 flow entries") {
                    tracing::warn!(netns, ip, stderr = %stderr.trim(), "flushing conntrack");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(netns, ip, error = %e, "running conntrack"),
        }
    }
}

/// Policy routing of a router on a node without the gateway address: packets from the
/// router's subnets to anywhere but those subnets go to the gateway node's router (over the
/// external link) to be translated there, except those of fixed addresses with a floating IP
/// here, which leave directly from it. Without `transit`, the rules and table are removed.
fn apply_transit(
    netns: &str,
    device: &str,
    transit: Option<&Transit>,
) -> Result<(), KernelDriverError> {
    for pref in [RULE_TO_SUBNETS, RULE_FROM_FLOATING, RULE_FROM_SUBNETS] {
        let pref = pref.to_string();
        // Each router's namespace is ours: every rule at these priorities is one we added.
        while run("ip", &["-n", netns, "rule", "del", "pref", &pref]).is_ok() {}
    }
    let _ = run(
        "ip",
        &["-n", netns, "route", "flush", "table", TRANSIT_TABLE],
    );
    let _ = run(
        "ip",
        &[
            "-n",
            netns,
            "neigh",
            "flush",
            "dev",
            device,
            "nud",
            "permanent",
        ],
    );
    let Some(Transit {
        gateway,
        mac,
        subnets,
        fixed,
    }) = transit
    else {
        return Ok(());
    };
    run(
        "ip",
        &[
            "-n",
            netns,
            "neigh",
            "replace",
            &gateway.to_string(),
            "lladdr",
            &mac.to_string(),
            "dev",
            device,
            "nud",
            "permanent",
        ],
    )?;
    let rule = |selector: &str, addr: String, pref: u32| {
        run(
            "ip",
            &[
                "-n",
                netns,
                "rule",
                "add",
                selector,
                &addr,
                "lookup",
                if pref == RULE_FROM_SUBNETS {
                    TRANSIT_TABLE
                } else {
                    "main"
                },
                "pref",
                &pref.to_string(),
            ],
        )
    };
    run(
        "ip",
        &[
            "-n",
            netns,
            "route",
            "replace",
            "default",
            "via",
            &gateway.to_string(),
            "dev",
            device,
            "onlink",
            "table",
            TRANSIT_TABLE,
        ],
    )?;
    for s in subnets {
        rule("to", s.to_string(), RULE_TO_SUBNETS)?;
        rule("from", s.to_string(), RULE_FROM_SUBNETS)?;
    }
    for f in fixed {
        rule("from", f.to_string(), RULE_FROM_FLOATING)?;
    }
    Ok(())
}

/// Removes the external side of a router whose namespace stays.
pub(crate) fn remove_external(netns: &str, have: &ExtDev) {
    let _ = apply_transit(netns, &have.name, None);
    let _ = run("ip", &["-n", netns, "link", "del", &have.name]);
    let _ = nft_script_in(
        Some(netns),
        &format!("add table ip {TABLE_NAT}\ndelete table ip {TABLE_NAT}\n"),
    );
}

/// A permanent neighbour of a router: (namespace, router-end device, address, MAC).
type Neighbour = (String, String, Ipv4Addr, Mac);

/// An extra route of a router: (namespace, destination, next hop).
type ExtraRoute = (String, model::Ipv4Cidr, Ipv4Addr);

/// `ip -o link show DEV` -> its MTU.
pub(crate) fn mtu_of(device: &str) -> Option<u32> {
    let text = output("ip", &["-o", "link", "show", "dev", device]).ok()?;
    let mut words = text.split_whitespace();
    words.find(|w| *w == "mtu")?;
    words.next()?.parse().ok()
}

/// The kernel-path datapath of one node.
#[derive(Debug)]
pub struct KernelDataplane {
    underlay: Underlay,
    networks: BTreeSet<u32>,
    /// device -> VNI of the bridge it is enslaved to.
    ports: BTreeMap<String, u32>,
    /// (VNI, MAC, VTEP) unicast entries on the vxlan device.
    fdb: BTreeSet<(u32, Mac, Ipv4Addr)>,
    /// (VNI, VTEP) all-zero entries: broadcast and ARP go to every VTEP of the network.
    flood: BTreeSet<(u32, Ipv4Addr)>,
    /// The nftables tables as last loaded, without the sets' elements.
    ruleset: String,
    /// The elements of each set `m_<n>` (remote groups' members).
    members: Vec<BTreeSet<Ipv4Addr>>,
    /// Prefix of this node's router namespaces.
    router_prefix: String,
    /// Router namespaces.
    routers: BTreeSet<String>,
    /// Bridge-end device -> the interface.
    rifs: BTreeMap<String, RifDev>,
    neighbours: BTreeSet<Neighbour>,
    extra_routes: BTreeSet<ExtraRoute>,
    /// Router namespace -> its external side.
    externals: BTreeMap<String, ExtDev>,
    /// Router-interface devices a previous instance left: removed by the first apply unless
    /// wanted.
    found_rifs: BTreeSet<String>,
}

impl KernelDataplane {
    /// Prepares the node: bridged IPv4 goes through conntrack and the inet hooks.
    /// Must run in the node's network namespace.
    pub fn new(underlay: &Underlay) -> Result<Self, KernelDriverError> {
        std::fs::write("/proc/sys/net/bridge/bridge-nf-call-iptables", "1")
            .map_err(KernelDriverError::Sysctl)?;
        let router_prefix = router_ns_prefix(netns_inode().map_err(KernelDriverError::Netns)?);
        // What a previous instance left: its router namespaces and interface veths.
        let routers = router_namespaces(&router_prefix).into_iter().collect();
        let found_rifs = output("ip", &["-o", "link", "show"])
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .filter(|n| n.starts_with("srb") && n.len() == 11)
            .collect();
        Ok(KernelDataplane {
            underlay: underlay.clone(),
            networks: BTreeSet::new(),
            ports: BTreeMap::new(),
            fdb: BTreeSet::new(),
            flood: BTreeSet::new(),
            ruleset: String::new(),
            members: Vec::new(),
            router_prefix,
            routers,
            rifs: BTreeMap::new(),
            neighbours: BTreeSet::new(),
            extra_routes: BTreeSet::new(),
            externals: BTreeMap::new(),
            found_rifs,
        })
    }

    fn router_ns(&self, router: &str) -> String {
        router_ns_name(&self.router_prefix, router)
    }

    /// The router namespaces, interfaces and neighbours `desired` asks for.
    fn want_routing(
        &self,
        desired: &DesiredState,
    ) -> (
        BTreeSet<String>,
        BTreeMap<String, RifDev>,
        BTreeSet<Neighbour>,
        BTreeSet<ExtraRoute>,
    ) {
        let mut routers = BTreeSet::new();
        let mut rifs = BTreeMap::new();
        let mut neighbours = BTreeSet::new();
        let mut routes = BTreeSet::new();
        for r in &desired.routers {
            let netns = self.router_ns(&r.id);
            routers.insert(netns.clone());
            for x in &r.routes {
                routes.insert((netns.clone(), x.destination, x.nexthop));
            }
            for i in &r.interfaces {
                let (bridge_end, router_end) = rif_names(&r.id, &i.port_id);
                let local = desired.ports.iter().map(|p| (p.vni, p.mac, &p.ips));
                let remote = desired.remote_ports.iter().map(|p| (p.vni, p.mac, &p.ips));
                for (vni, mac, ips) in local.chain(remote) {
                    for ip in ips
                        .iter()
                        .filter(|ip| vni == i.vni && i.subnet.contains(**ip))
                    {
                        neighbours.insert((netns.clone(), router_end.clone(), *ip, mac));
                    }
                }
                rifs.insert(
                    bridge_end,
                    RifDev {
                        netns: netns.clone(),
                        router_end,
                        vni: i.vni,
                        mac: i.mac,
                        ip: i.ip,
                        len: i.subnet.len,
                    },
                );
            }
        }
        (routers, rifs, neighbours, routes)
    }

    pub(crate) fn add_router(netns: &str) -> Result<(), KernelDriverError> {
        run_exists_ok("ip", &["netns", "add", netns])?;
        run("ip", &["-n", netns, "link", "set", "lo", "up"])?;
        let path = format!("--net=/run/netns/{netns}");
        run(
            "nsenter",
            &[&path, "sysctl", "-qw", "net.ipv4.ip_forward=1"],
        )?;
        // Traffic of other nodes' VMs reaches the gateway node's router on its external link
        // and leaves there again (SNAT transit): no reverse-path filter, no ICMP redirects.
        run(
            "nsenter",
            &[
                &path,
                "sysctl",
                "-qw",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
                "net.ipv4.conf.all.send_redirects=0",
                "net.ipv4.conf.default.send_redirects=0",
            ],
        )?;
        // The router is IPv4-only: no router solicitations or MLD reports into the networks
        // (best effort: a kernel without IPv6 has nothing to turn off).
        let _ = run(
            "nsenter",
            &[
                &path,
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ],
        );
        Ok(())
    }

    fn add_rif(bridge_end: &str, rif: &RifDev) -> Result<(), KernelDriverError> {
        let RifDev {
            netns,
            router_end,
            vni,
            mac,
            ip,
            len,
        } = rif;
        run_exists_ok(
            "ip",
            &[
                "link", "add", bridge_end, "type", "veth", "peer", "name", router_end, "netns",
                netns,
            ],
        )?;
        // The network's MTU (its vxlan device's) on both ends: the router must not send
        // frames the network cannot carry.
        let mtu = mtu_of(&vxlan_name(*vni)).unwrap_or(1450).to_string();
        run("ip", &["link", "set", bridge_end, "mtu", &mtu])?;
        let _ = run(
            "sysctl",
            &["-qw", &format!("net.ipv6.conf.{bridge_end}.disable_ipv6=1")],
        );
        run(
            "ip",
            &[
                "link",
                "set",
                bridge_end,
                "master",
                &bridge_name(*vni),
                "up",
            ],
        )?;
        let mac = mac.to_string();
        run(
            "bridge",
            &[
                "fdb", "replace", &mac, "dev", bridge_end, "master", "static", "sticky",
            ],
        )?;
        run(
            "ip",
            &[
                "-n", netns, "link", "set", router_end, "address", &mac, "mtu", &mtu, "up",
            ],
        )?;
        run(
            "ip",
            &[
                "-n",
                netns,
                "addr",
                "replace",
                &format!("{ip}/{len}"),
                "dev",
                router_end,
            ],
        )
    }

    fn add_network(&self, vni: u32) -> Result<(), KernelDriverError> {
        let (br, vx) = (bridge_name(vni), vxlan_name(vni));
        let vtep = self.underlay.vtep.to_string();
        let id = vni.to_string();
        run_exists_ok("ip", &["link", "add", &br, "type", "bridge"])?;
        run_exists_ok(
            "ip",
            &[
                "link",
                "add",
                &vx,
                "type",
                "vxlan",
                "id",
                &id,
                "local",
                &vtep,
                "dstport",
                "4789",
                "dev",
                &self.underlay.device,
                "nolearning",
            ],
        )?;
        run("ip", &["link", "set", &vx, "master", &br, "up"])?;
        run("ip", &["link", "set", &br, "up"])
    }

    fn del_network(&self, vni: u32) -> Result<(), KernelDriverError> {
        run("ip", &["link", "del", &vxlan_name(vni)])?;
        run("ip", &["link", "del", &bridge_name(vni)])
    }

    /// The ruleset without the remote groups' members (those are elements of its named sets
    /// `m_<n>`, `n` indexing `sg.sets`), so a port joining or leaving a group is an element
    /// change, not a new ruleset.
    fn render(state: &DesiredState, sg: &model::SgSets) -> String {
        let mut s = String::new();
        // Re-created in one transaction: `add` then `delete` tolerates a missing table.
        for (family, table) in [("bridge", TABLE_BRIDGE), ("inet", TABLE_INET)] {
            let _ = writeln!(
                s,
                "add table {family} {table}\ndelete table {family} {table}"
            );
        }
        let _ = writeln!(s, "table bridge {TABLE_BRIDGE} {{");
        for c in COUNTERS_BRIDGE {
            let _ = writeln!(s, "  counter {c} {{}}");
        }
        // Conntrack zone per network (networks may reuse addresses): the VNI rides in
        // the mark from bridge prerouting to the inet raw chain, before conntrack.
        let mut by_vni: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        for p in &state.ports {
            by_vni
                .entry(p.vni)
                .or_default()
                .push(format!("\"{}\"", p.device));
        }
        // Router interfaces' bridge ends belong to their network's zone too (frames the
        // router sends arrive there with no mark: the veth crossed namespaces).
        for r in &state.routers {
            for i in &r.interfaces {
                by_vni
                    .entry(i.vni)
                    .or_default()
                    .push(format!("\"{}\"", rif_names(&r.id, &i.port_id).0));
            }
        }
        let _ = writeln!(
            s,
            "  chain prerouting {{\n    type filter hook prerouting priority -300; policy accept;"
        );
        for (vni, devices) in &by_vni {
            let mut devices = devices.clone();
            devices.push(format!("\"{}\"", vxlan_name(*vni)));
            let _ = writeln!(
                s,
                "    iifname {{ {} }} meta mark set {vni}",
                devices.join(", ")
            );
        }
        let _ = writeln!(s, "  }}");
        let _ = writeln!(
            s,
            "  chain forward {{\n    type filter hook forward priority -200; policy accept;"
        );
        let _ = writeln!(s, "    meta mark set 0");
        for (i, p) in state.ports.iter().enumerate() {
            let _ = writeln!(s, "    iifname \"{}\" jump from_{i}", p.device);
        }
        for (i, p) in state.ports.iter().enumerate() {
            let _ = writeln!(
                s,
                "    oifname \"{}\" meta mark set meta mark | 0x{:x}",
                p.device,
                (i + 1) << 16
            );
        }
        let _ = writeln!(s, "  }}");
        Self::render_input(&mut s, state, &by_vni);
        for (i, p) in state.ports.iter().enumerate() {
            let ips: Vec<String> = p.ips.iter().map(|ip| ip.to_string()).collect();
            let ips = ips.join(", ");
            let _ = writeln!(s, "  chain from_{i} {{");
            let _ = writeln!(
                s,
                "    ether saddr != {} counter name drop_spoof_mac drop",
                p.mac
            );
            let _ = writeln!(
                s,
                "    arp saddr ether != {} counter name drop_spoof_mac drop",
                p.mac
            );
            let _ = writeln!(
                s,
                "    arp saddr ip != {{ {ips} }} counter name drop_spoof_ip drop"
            );
            let _ = writeln!(
                s,
                "    ether type ip ip saddr != {{ {ips} }} counter name drop_spoof_ip drop"
            );
            let _ = writeln!(
                s,
                "    ether type != {{ ip, arp }} counter name drop_unsupported drop"
            );
            let _ = writeln!(s, "    meta mark set 0x{:x}", i + 1);
            let _ = writeln!(s, "  }}");
        }
        let _ = writeln!(s, "}}");

        let _ = writeln!(s, "table inet {TABLE_INET} {{");
        for c in COUNTERS_INET {
            let _ = writeln!(s, "  counter {c} {{}}");
        }
        for n in 0..sg.sets.len() {
            let _ = writeln!(s, "  set m_{n} {{ type ipv4_addr; }}");
        }
        if !by_vni.is_empty() {
            // Zones are 16 bits: VNIs equal modulo 65536 would share one.
            let zones: Vec<String> = by_vni
                .keys()
                .map(|vni| format!("{vni} : {}", vni & 0xffff))
                .collect();
            let _ = writeln!(
                s,
                "  chain raw {{\n    type filter hook prerouting priority -300; policy accept;\n    ct zone set meta mark map {{ {} }}\n  }}",
                zones.join(", ")
            );
        }
        let _ = writeln!(
            s,
            "  chain forward {{\n    type filter hook forward priority 0; policy accept;"
        );
        let _ = writeln!(s, "    meta mark 0 accept");
        let _ = writeln!(s, "    ct state established,related accept");
        if !state.ports.is_empty() {
            let eg: Vec<String> = (0..state.ports.len())
                .map(|i| format!("0x{:x} : jump egress_{i}", i + 1))
                .collect();
            let ing: Vec<String> = (0..state.ports.len())
                .map(|i| format!("0x{:x} : jump ingress_{i}", (i + 1) << 16))
                .collect();
            let _ = writeln!(s, "    meta mark & 0xffff vmap {{ {} }}", eg.join(", "));
            let _ = writeln!(
                s,
                "    meta mark & 0xffff0000 vmap {{ {} }}",
                ing.join(", ")
            );
        }
        let _ = writeln!(s, "  }}");
        for (i, _) in state.ports.iter().enumerate() {
            for (dir, name, addr, counter) in [
                (Direction::Egress, "egress", "daddr", "drop_sg_egress"),
                (Direction::Ingress, "ingress", "saddr", "drop_sg_ingress"),
            ] {
                let _ = writeln!(s, "  chain {name}_{i} {{");
                for e in sg
                    .entries
                    .iter()
                    .filter(|e| e.port == i && e.direction == dir)
                {
                    let mut rule = String::new();
                    match e.remote {
                        model::SetRemote::Cidr(c) if c.len == 0 => {}
                        model::SetRemote::Cidr(c) => {
                            let _ = write!(rule, "ip {addr} {c} ");
                        }
                        model::SetRemote::Set(n) => {
                            let _ = write!(rule, "ip {addr} @m_{n} ");
                        }
                    }
                    if e.proto != 0 {
                        let _ = write!(rule, "meta l4proto {} ", e.proto);
                    }
                    if e.dport != 0 {
                        let _ = write!(rule, "th dport {} ", e.dport);
                    }
                    let _ = writeln!(s, "    {rule}return");
                }
                let _ = writeln!(s, "    counter name {counter} drop\n  }}");
            }
        }
        let _ = writeln!(s, "}}");
        s
    }

    /// `nft` lines that add (`add`) or delete (`delete`) `ips` in set `m_<n>`.
    /// What reaches the node's own stack through a network's bridge: from a local port, only
    /// its ARP for and its TCP to the metadata address on port 80, with the port's own MAC and
    /// addresses (the metadata service names the port by the source address); from the VXLAN
    /// device and router ends, nothing (another node's guests ask their own node).
    fn render_input(s: &mut String, state: &DesiredState, by_vni: &BTreeMap<u32, Vec<String>>) {
        let _ = writeln!(
            s,
            "  chain input {{\n    type filter hook input priority filter; policy accept;"
        );
        for p in &state.ports {
            let ips: Vec<String> = p.ips.iter().map(|ip| ip.to_string()).collect();
            let (dev, mac, ips) = (&p.device, p.mac, ips.join(", "));
            let _ = writeln!(
                s,
                "    iifname \"{dev}\" ether saddr != {mac} counter name drop_spoof_mac drop"
            );
            if !ips.is_empty() {
                let _ = writeln!(
                    s,
                    "    iifname \"{dev}\" arp operation request arp saddr ether {mac} arp saddr ip {{ {ips} }} arp daddr ip {METADATA_ADDR} accept"
                );
                let _ = writeln!(
                    s,
                    "    iifname \"{dev}\" ip saddr {{ {ips} }} ip daddr {METADATA_ADDR} tcp dport 80 accept"
                );
            }
            let _ = writeln!(s, "    iifname \"{dev}\" counter name drop_host drop");
        }
        // The networks' VXLAN devices and the routers' bridge ends.
        let others: Vec<String> = by_vni
            .keys()
            .map(|vni| vxlan_name(*vni))
            .chain(
                state
                    .routers
                    .iter()
                    .flat_map(|r| r.interfaces.iter().map(|i| rif_names(&r.id, &i.port_id).0)),
            )
            .map(|d| format!("\"{d}\""))
            .collect();
        if !others.is_empty() {
            let _ = writeln!(
                s,
                "    iifname {{ {} }} counter name drop_host drop",
                others.join(", ")
            );
        }
        let _ = writeln!(s, "  }}");
    }

    fn elements(s: &mut String, verb: &str, n: usize, ips: &BTreeSet<Ipv4Addr>) {
        if ips.is_empty() {
            return;
        }
        let ips: Vec<String> = ips.iter().map(Ipv4Addr::to_string).collect();
        let _ = writeln!(
            s,
            "{verb} element inet {TABLE_INET} m_{n} {{ {} }}",
            ips.join(", ")
        );
    }

    /// Brings the nftables tables to `desired`'s security groups: the whole ruleset when its
    /// shape changed (ports, groups, rules, routers), else only the members' elements.
    fn apply_filters(&mut self, desired: &DesiredState) -> Result<(), KernelDriverError> {
        let sg = model::compile_sg_sets(desired)?;
        let ruleset = Self::render(desired, &sg);
        let members: Vec<BTreeSet<Ipv4Addr>> = sg.sets.into_iter().map(|(_, m)| m).collect();
        if ruleset == self.ruleset {
            let mut script = String::new();
            for (n, want) in members.iter().enumerate() {
                let have = self.members.get(n).cloned().unwrap_or_default();
                Self::elements(
                    &mut script,
                    "add",
                    n,
                    &want.difference(&have).copied().collect(),
                );
                Self::elements(
                    &mut script,
                    "delete",
                    n,
                    &have.difference(want).copied().collect(),
                );
            }
            if script.is_empty() {
                return Ok(());
            }
            match nft_script(&script) {
                Ok(()) => {
                    self.members = members;
                    return Ok(());
                }
                // The sets are not what this driver thinks (changed behind its back): load
                // everything again.
                Err(e) => debug!(error = %e, "updating the security group sets; reloading"),
            }
        }
        let mut script = ruleset.clone();
        for (n, want) in members.iter().enumerate() {
            Self::elements(&mut script, "add", n, want);
        }
        nft_script(&script)?;
        self.ruleset = ruleset;
        self.members = members;
        Ok(())
    }
}

impl Dataplane for KernelDataplane {
    type Error = KernelDriverError;

    fn apply(&mut self, desired: &DesiredState) -> Result<(), KernelDriverError> {
        model::check_addresses(desired)?;

        let mut want_ports: BTreeMap<String, u32> = BTreeMap::new();
        for p in &desired.ports {
            if want_ports
                .insert(p.device.clone(), p.vni)
                .is_some_and(|v| v != p.vni)
            {
                return Err(KernelDriverError::PortInTwoNetworks(p.device.clone()));
            }
        }
        // Networks of local ports, and those routers join them to (routed packets are
        // delivered as L2 on the destination network, from this node).
        let want_networks: BTreeSet<u32> = want_ports
            .values()
            .copied()
            .chain(
                desired
                    .routers
                    .iter()
                    .flat_map(|r| r.interfaces.iter().map(|i| i.vni)),
            )
            .collect();
        let (want_routers, want_rifs, want_neighbours, want_routes) = self.want_routing(desired);
        let want_fdb: BTreeSet<(u32, Mac, Ipv4Addr)> = desired
            .remote_ports
            .iter()
            .filter(|r| want_networks.contains(&r.vni))
            .map(|r| (r.vni, r.mac, r.vtep))
            .collect();
        let want_flood: BTreeSet<(u32, Ipv4Addr)> = want_fdb
            .iter()
            .map(|(vni, _, vtep)| (*vni, *vtep))
            .collect();

        // Filters first, so a new port is never bridged unfiltered.
        self.apply_filters(desired)?;
        for vni in want_networks.difference(&self.networks.clone()) {
            self.add_network(*vni)?;
            self.networks.insert(*vni);
        }
        // Remote ports' FDB entries and the networks' flood entries: one process.
        let mut fdb = Batch::new("bridge", None);
        for (vni, mac, vtep) in want_fdb.difference(&self.fdb) {
            let (mac, vtep) = (mac.to_string(), vtep.to_string());
            fdb.push(
                OnError::Fail,
                &[
                    "fdb",
                    "replace",
                    &mac,
                    "dev",
                    &vxlan_name(*vni),
                    "dst",
                    &vtep,
                    "self",
                    "permanent",
                ],
            );
        }
        for (vni, vtep) in want_flood.difference(&self.flood) {
            fdb.push(
                OnError::ExistsOk,
                &[
                    "fdb",
                    "append",
                    "00:00:00:00:00:00",
                    "dev",
                    &vxlan_name(*vni),
                    "dst",
                    &vtep.to_string(),
                    "self",
                    "permanent",
                ],
            );
        }
        fdb.run()?;
        let mut attach = Batch::new("ip", None);
        for (device, vni) in &want_ports {
            if self.ports.get(device) != Some(vni) {
                attach.push(
                    OnError::Fail,
                    &["link", "set", device, "master", &bridge_name(*vni), "up"],
                );
            }
        }
        attach.run()?;
        for netns in want_routers.difference(&self.routers.clone()) {
            Self::add_router(netns)?;
            self.routers.insert(netns.clone());
        }
        for (bridge_end, rif) in &want_rifs {
            match self.rifs.get(bridge_end) {
                Some(have) if have == rif => continue,
                Some(_) => run("ip", &["link", "del", bridge_end])?,
                None => {}
            }
            Self::add_rif(bridge_end, rif)?;
            self.rifs.insert(bridge_end.clone(), rif.clone());
        }
        // One process per router namespace.
        let mut neigh: BTreeMap<&str, Batch> = BTreeMap::new();
        for (netns, dev, ip, mac) in want_neighbours.difference(&self.neighbours) {
            let (ip, mac) = (ip.to_string(), mac.to_string());
            neigh
                .entry(netns)
                .or_insert_with(|| Batch::new("ip", Some(netns)))
                .push(
                    OnError::Fail,
                    &[
                        "neigh",
                        "replace",
                        &ip,
                        "lladdr",
                        &mac,
                        "dev",
                        dev,
                        "nud",
                        "permanent",
                    ],
                );
        }
        for batch in neigh.into_values() {
            batch.run()?;
        }
        let want_externals: BTreeMap<String, ExtDev> = desired
            .routers
            .iter()
            .filter_map(|r| Some((self.router_ns(&r.id), want_external(r)?)))
            .collect();
        for (netns, ext) in &want_externals {
            if self.externals.get(netns) != Some(ext) {
                apply_external(netns, self.externals.get(netns), ext)?;
                self.externals.insert(netns.clone(), ext.clone());
            }
        }
        for (netns, ext) in &self.externals {
            if !want_externals.contains_key(netns) && want_routers.contains(netns) {
                remove_external(netns, ext);
            }
        }
        self.externals = want_externals;
        let mut routes: BTreeMap<&str, Batch> = BTreeMap::new();
        for (netns, dest, nexthop) in want_routes.difference(&self.extra_routes) {
            let (dest, nexthop) = (dest.to_string(), nexthop.to_string());
            routes
                .entry(netns)
                .or_insert_with(|| Batch::new("ip", Some(netns)))
                .push(OnError::Fail, &["route", "replace", &dest, "via", &nexthop]);
        }
        for batch in routes.into_values() {
            batch.run()?;
        }
        // Stale routes and neighbours: gone already when their router or interface went.
        let mut stale: BTreeMap<&str, Batch> = BTreeMap::new();
        for (netns, dest, nexthop) in self.extra_routes.difference(&want_routes) {
            let (dest, nexthop) = (dest.to_string(), nexthop.to_string());
            stale
                .entry(netns)
                .or_insert_with(|| Batch::new("ip", Some(netns)))
                .push(OnError::Ignore, &["route", "del", &dest, "via", &nexthop]);
        }
        for (netns, dev, ip, _) in self.neighbours.difference(&want_neighbours) {
            stale
                .entry(netns)
                .or_insert_with(|| Batch::new("ip", Some(netns)))
                .push(
                    OnError::Ignore,
                    &["neigh", "del", &ip.to_string(), "dev", dev],
                );
        }
        for batch in stale.into_values() {
            batch.run()?;
        }
        let stale_rifs: Vec<String> = self
            .rifs
            .keys()
            .chain(self.found_rifs.iter())
            .filter(|d| !want_rifs.contains_key(*d))
            .cloned()
            .collect();
        for device in stale_rifs {
            // Deleting one end deletes the pair (gone already if its router went).
            if let Err(e) = run("ip", &["link", "del", &device]) {
                debug!(device, error = %e, "removing a router interface");
            }
        }
        self.found_rifs.clear();
        for netns in self.routers.difference(&want_routers) {
            if let Err(e) = run("ip", &["netns", "del", netns]) {
                debug!(netns, error = %e, "removing a router namespace");
            }
        }

        let mut detach = Batch::new("ip", None);
        for device in self.ports.keys().filter(|d| !want_ports.contains_key(*d)) {
            // The VM's device may be gone already; then it left the bridge with it.
            detach.push(OnError::Ignore, &["link", "set", device, "nomaster"]);
        }
        detach.run()?;
        // Stale FDB and flood entries of networks that stay (the others go with their devices).
        let mut fdb = Batch::new("bridge", None);
        for (vni, mac, vtep) in self.fdb.difference(&want_fdb) {
            if want_networks.contains(vni) {
                let (mac, vtep) = (mac.to_string(), vtep.to_string());
                fdb.push(
                    OnError::MissingOk,
                    &[
                        "fdb",
                        "del",
                        &mac,
                        "dev",
                        &vxlan_name(*vni),
                        "dst",
                        &vtep,
                        "self",
                    ],
                );
            }
        }
        for (vni, vtep) in self.flood.difference(&want_flood) {
            if want_networks.contains(vni) {
                fdb.push(
                    OnError::MissingOk,
                    &[
                        "fdb",
                        "del",
                        "00:00:00:00:00:00",
                        "dev",
                        &vxlan_name(*vni),
                        "dst",
                        &vtep.to_string(),
                        "self",
                    ],
                );
            }
        }
        fdb.run()?;
        for vni in self.networks.difference(&want_networks) {
            self.del_network(*vni)?;
        }
        self.routers = want_routers;
        self.rifs = want_rifs;
        self.neighbours = want_neighbours;
        self.extra_routes = want_routes;
        self.networks = want_networks;
        self.ports = want_ports;
        self.fdb = want_fdb;
        self.flood = want_flood;
        Ok(())
    }

    fn counters(&self) -> Result<Counters, KernelDriverError> {
        let mut out = Counters::new();
        for (family, table, names) in [
            ("bridge", TABLE_BRIDGE, &COUNTERS_BRIDGE[..]),
            ("inet", TABLE_INET, &COUNTERS_INET[..]),
        ] {
            for name in names {
                let text = output("nft", &["list", "counter", family, table, name])?;
                let packets = text
                    .split_whitespace()
                    .skip_while(|w| *w != "packets")
                    .nth(1)
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                out.insert(name.to_string(), packets);
            }
        }
        Ok(out)
    }

    fn teardown(self) -> Result<(), KernelDriverError> {
        for device in self.rifs.keys() {
            let _ = run("ip", &["link", "del", device]);
        }
        for netns in &self.routers {
            let _ = run("ip", &["netns", "del", netns]);
        }
        for device in self.ports.keys() {
            let _ = run("ip", &["link", "set", device, "nomaster"]);
        }
        for vni in &self.networks {
            self.del_network(*vni)?;
        }
        if !self.ruleset.is_empty() {
            nft_script(&format!(
                "delete table bridge {TABLE_BRIDGE}\ndelete table inet {TABLE_INET}\n"
            ))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testbed::{privileged_or_skip, NetNs};

    /// A batch whose lines fail still applies the others, tolerates what its lines allow, and
    /// fails naming the command that failed.
    #[test]
    fn batch_runs_every_line_and_names_the_failing_one() {
        if !privileged_or_skip("batch_runs_every_line_and_names_the_failing_one") {
            return;
        }
        let ns = NetNs::new("sbat").unwrap();
        let mut batch = Batch::new("ip", Some(&ns.name));
        batch.push(
            OnError::ExistsOk,
            &["link", "add", "sbatd0", "type", "bridge"],
        );
        // Lines run again after a failure: a creation must tolerate its own earlier success.
        // `ip neigh del` of a missing entry ends an `ip -batch` run (exit 2), even with -force.
        batch.push(OnError::Ignore, &["neigh", "del", "10.9.0.1", "dev", "lo"]);
        batch.push(
            OnError::ExistsOk,
            &["link", "add", "sbatd1", "type", "bridge"],
        );
        batch.run().unwrap();
        let links = output("ip", &["-n", &ns.name, "-o", "link", "show"]).unwrap();
        assert!(
            links.contains("sbatd0") && links.contains("sbatd1"),
            "{links}"
        );

        let mut batch = Batch::new("ip", Some(&ns.name));
        batch.push(
            OnError::ExistsOk,
            &["link", "add", "sbatd0", "type", "bridge"],
        );
        batch.push(OnError::Fail, &["link", "set", "sbatnone", "up"]);
        batch.push(OnError::Fail, &["link", "add", "sbatd2", "type", "bridge"]);
        let err = batch.run().unwrap_err().to_string();
        assert!(
            err.contains(&format!("ip -n {} link set sbatnone up", ns.name)),
            "{err}"
        );
    }
}
