//! The same namespace suite against both drivers, with real packets: two hosts (netns)
//! on an underlay bridge, two VMs per host, VXLAN between hosts.

use std::net::Ipv4Addr;

use shoal_dataplane::{
    ebpf::EbpfDataplane,
    kernel::KernelDataplane,
    testbed::{self, Agent, Banner, Topology},
    Dataplane, ExternalGateway, FloatingIp, Ipv4Cidr, Mac, Router, RouterInterface, RouterRoute,
    Underlay,
};

const VM0_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const VM1_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const VM4_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);

fn suite<D, F>(driver: &str, make: F)
where
    D: Dataplane + 'static,
    F: Fn(Underlay) -> Result<D, D::Error> + Send + Clone + 'static,
{
    let topo = Topology::build().unwrap();
    let agents: Vec<Agent<D>> = topo
        .hosts
        .iter()
        .map(|h| {
            let make = make.clone();
            let underlay = h.underlay();
            Agent::start(&h.ns, move || make(underlay))
                .unwrap()
                .unwrap()
        })
        .collect();
    let apply = |agents: &[Agent<D>], removed: &'static [usize]| {
        for (i, agent) in agents.iter().enumerate() {
            let state = topo.desired(i, removed);
            agent.call(move |d| d.apply(&state)).unwrap();
        }
    };
    apply(&agents, &[]);
    apply(&agents, &[]); // idempotent
                         // A new driver instance (a restarted node agent) applies over what the previous
                         // one left behind without failing.
    let agents: Vec<Agent<D>> = agents
        .into_iter()
        .zip(&topo.hosts)
        .map(|(old, h)| {
            old.finish(drop);
            let make = make.clone();
            let underlay = h.underlay();
            Agent::start(&h.ns, move || make(underlay))
                .unwrap()
                .unwrap()
        })
        .collect();
    apply(&agents, &[]);
    let _banners: Vec<Banner> = topo
        .vms
        .iter()
        .map(|vm| Banner::start(vm, &[80, 22]).unwrap())
        .collect();
    let [vm0, vm1, vm2, vm3, vm4] = &topo.vms[..] else {
        unreachable!()
    };

    // Ping and TCP across hosts over VXLAN; TCP replies come back to an ephemeral
    // port no rule opens, so they prove the stateful path.
    assert!(vm0.ping(VM1_IP), "{driver}: vm0 pings vm1 across hosts");
    assert_eq!(
        vm0.tcp_banner(VM1_IP, 80).as_deref(),
        Some("vm1"),
        "{driver}: vm0 -> vm1:80"
    );
    assert_eq!(
        vm1.tcp_banner(VM0_IP, 80).as_deref(),
        Some("vm0"),
        "{driver}: vm1 -> vm0:80"
    );
    // The group allows 80 and not 22, in both directions.
    assert_eq!(
        vm0.tcp_banner(VM1_IP, 22),
        None,
        "{driver}: vm0 -> vm1:22 denied"
    );
    assert_eq!(
        vm1.tcp_banner(VM0_IP, 22),
        None,
        "{driver}: vm1 -> vm0:22 denied"
    );

    // Same host, same network: delivered without encapsulation, same rules.
    assert_eq!(
        vm0.tcp_banner(VM4_IP, 80).as_deref(),
        Some("vm4"),
        "{driver}: vm0 -> vm4:80 same host"
    );
    assert_eq!(
        vm4.tcp_banner(VM0_IP, 80).as_deref(),
        Some("vm0"),
        "{driver}: vm4 -> vm0:80 same host"
    );
    assert_eq!(
        vm0.tcp_banner(VM4_IP, 22),
        None,
        "{driver}: vm0 -> vm4:22 denied"
    );
    assert!(vm4.ping(VM0_IP), "{driver}: vm4 pings vm0");

    // VNI 200 reuses the addresses: each VM reaches its own network's peer only.
    assert_eq!(
        vm2.tcp_banner(VM0_IP, 80).as_deref(),
        Some("vm3"),
        "{driver}: vni 200 .2 -> .1"
    );
    assert_eq!(
        vm3.tcp_banner(VM1_IP, 80).as_deref(),
        Some("vm2"),
        "{driver}: vni 200 .1 -> .2"
    );
    assert_eq!(
        vm0.tcp_banner(VM1_IP, 80).as_deref(),
        Some("vm1"),
        "{driver}: vni 100 unchanged"
    );

    let counters = agents[0].call(|d| d.counters()).unwrap();
    eprintln!("{driver}: host 0 counters {counters:?}");
    // vm0's host dropped the inbound port-22 connection attempts from vm1.
    assert!(
        counters["drop_sg_ingress"] > 0,
        "{driver}: SG drops counted: {counters:?}"
    );

    // Removing vm1's port (on its host, and as a remote port on host 0).
    apply(&agents, &[1]);
    assert_eq!(
        vm0.tcp_banner(VM1_IP, 80),
        None,
        "{driver}: removed port receives nothing"
    );
    assert!(!vm0.ping(VM1_IP), "{driver}: removed port answers no ping");
    // The other network still works.
    assert_eq!(
        vm2.tcp_banner(VM0_IP, 80).as_deref(),
        Some("vm3"),
        "{driver}: others unaffected"
    );
    // Adding it back restores it.
    apply(&agents, &[]);
    assert_eq!(
        vm0.tcp_banner(VM1_IP, 80).as_deref(),
        Some("vm1"),
        "{driver}: port re-added"
    );

    for agent in agents {
        agent.finish(|d| d.teardown()).unwrap();
    }
}

/// The eBPF driver forwards, isolates and filters statefully with real packets.
#[test]
fn ebpf_driver_suite() {
    if !testbed::privileged_or_skip("ebpf_driver_suite") {
        return;
    }
    suite("ebpf", |u: Underlay| EbpfDataplane::new(&u));
}

/// The kernel-path driver passes the same suite.
#[test]
fn kernel_driver_suite() {
    if !testbed::privileged_or_skip("kernel_driver_suite") {
        return;
    }
    suite("kernel", |u: Underlay| KernelDataplane::new(&u));
}

/// Subnet A (VNI 300, 10.1.0.0/24) and subnet B (VNI 400, 10.2.0.0/24), joined by one
/// router: vm0 on A and vm1 on B on host 0, vm2 on B on host 1.
const A_VNI: u32 = 300;
const B_VNI: u32 = 400;
const A0_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 10);
const B0_IP: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 10);
const B1_IP: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 11);
const A_GW: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
const B_GW: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 1);
const EXTRA_IP: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 7);

/// The router of the routed suite, with the interfaces on the VNIs in `on`.
fn router(on: &[u32]) -> Router {
    let interfaces = [
        (A_VNI, A_GW, Mac([0xfa, 0x16, 0x3e, 0xaa, 0, 1])),
        (B_VNI, B_GW, Mac([0xfa, 0x16, 0x3e, 0xbb, 0, 1])),
    ]
    .into_iter()
    .filter(|(vni, _, _)| on.contains(vni))
    .map(|(vni, ip, mac)| RouterInterface {
        port_id: format!("rif-{vni}"),
        vni,
        mac,
        ip,
        subnet: Ipv4Cidr::new(ip, 24),
    })
    .collect();
    Router {
        id: "router-1".into(),
        interfaces,
        ..Default::default()
    }
}

/// Kernel-driver router namespaces live under /run/netns, outside the host namespaces the
/// topology deletes: removed on drop, also when the test fails.
struct RouterNamespaces(Vec<String>);

impl Drop for RouterNamespaces {
    fn drop(&mut self) {
        for host in &self.0 {
            let _ = shoal_dataplane::kernel::remove_router_namespaces(host);
        }
    }
}

fn routed_suite<D, F>(driver: &str, make: F)
where
    D: Dataplane + 'static,
    F: Fn(Underlay) -> Result<D, D::Error> + Send + Clone + 'static,
{
    let topo = Topology::build_with(
        &[
            (0, A_VNI, A0_IP.octets()),
            (0, B_VNI, B0_IP.octets()),
            (1, B_VNI, B1_IP.octets()),
        ],
        24,
    )
    .unwrap();
    let _routers = RouterNamespaces(topo.hosts.iter().map(|h| h.ns.path()).collect());
    for (vm, gw) in topo.vms.iter().zip([A_GW, B_GW, B_GW]) {
        vm.ns
            .ip(&["route", "add", "default", "via", &gw.to_string()])
            .unwrap();
    }
    let agents: Vec<Agent<D>> = topo
        .hosts
        .iter()
        .map(|h| {
            let make = make.clone();
            let underlay = h.underlay();
            Agent::start(&h.ns, move || make(underlay))
                .unwrap()
                .unwrap()
        })
        .collect();
    // Every host has a port on A or B, so both program the router (distributed).
    let apply = |agents: &[Agent<D>], on: &[u32]| {
        for (i, agent) in agents.iter().enumerate() {
            let mut state = topo.desired(i, &[]);
            state.routers = vec![router(on)];
            agent.call(move |d| d.apply(&state)).unwrap();
        }
    };
    apply(&agents, &[A_VNI, B_VNI]);
    apply(&agents, &[A_VNI, B_VNI]); // idempotent
    let _banners: Vec<Banner> = topo
        .vms
        .iter()
        .map(|vm| Banner::start(vm, &[80, 22]).unwrap())
        .collect();
    let [vm0, vm1, vm2] = &topo.vms[..] else {
        unreachable!()
    };

    assert!(vm0.ping(A_GW), "{driver}: A pings its gateway");
    assert!(
        vm2.ping(A_GW),
        "{driver}: B pings the router's address on A"
    );
    assert!(
        vm0.ping(B0_IP),
        "{driver}: A pings B on the same host, routed"
    );
    assert!(vm0.ping(B1_IP), "{driver}: A pings B across hosts, routed");
    assert!(vm2.ping(A0_IP), "{driver}: B pings A across hosts, routed");
    // Groups still apply at the destination, and replies to ephemeral ports prove conntrack.
    assert_eq!(
        vm0.tcp_banner(B1_IP, 80).as_deref(),
        Some("vm2"),
        "{driver}: A -> B:80 across hosts"
    );
    assert_eq!(
        vm2.tcp_banner(A0_IP, 80).as_deref(),
        Some("vm0"),
        "{driver}: B -> A:80 across hosts"
    );
    assert_eq!(
        vm1.tcp_banner(A0_IP, 80).as_deref(),
        Some("vm0"),
        "{driver}: B -> A:80 same host"
    );
    assert_eq!(
        vm0.tcp_banner(B1_IP, 22),
        None,
        "{driver}: A -> B:22 denied by B's group"
    );
    assert_eq!(
        vm0.tcp_banner(B0_IP, 22),
        None,
        "{driver}: A -> B:22 same host denied"
    );
    // The TTL is decremented: a packet that arrives with TTL 1 is not forwarded.
    assert!(
        vm0.ns
            .exec(
                "ping",
                &["-c", "1", "-t", "1", "-W", "1", &B0_IP.to_string()]
            )
            .is_err(),
        "{driver}: TTL 1 is not routed"
    );
    let counters = agents[0].call(|d| d.counters()).unwrap();
    eprintln!("{driver}: host 0 counters {counters:?}");
    if driver == "ebpf" {
        assert!(counters["pass_routed"] > 0, "{driver}: {counters:?}");
        assert!(counters["drop_ttl"] > 0, "{driver}: {counters:?}");
    }

    // An extra route: 10.9.0.0/24 lies behind vm1 (a VM acting as a router, which holds
    // 10.9.0.7 itself; the address is its port's too, as an allowed address pair would be).
    vm1.ns
        .ip(&["addr", "add", &format!("{EXTRA_IP}/32"), "dev", "lo"])
        .unwrap();
    for (i, agent) in agents.iter().enumerate() {
        let mut state = topo.desired(i, &[]);
        for p in state.ports.iter_mut().filter(|p| p.id == "vm1") {
            p.ips.push(EXTRA_IP);
        }
        for p in state.remote_ports.iter_mut().filter(|p| p.id == "vm1") {
            p.ips.push(EXTRA_IP);
        }
        let mut r = router(&[A_VNI, B_VNI]);
        r.routes.push(RouterRoute {
            destination: Ipv4Cidr::new(EXTRA_IP, 24),
            nexthop: B0_IP,
        });
        state.routers = vec![r];
        agent.call(move |d| d.apply(&state)).unwrap();
    }
    assert!(
        vm0.ping(EXTRA_IP),
        "{driver}: extra route through vm1, same host"
    );
    assert!(
        vm2.ping(EXTRA_IP),
        "{driver}: extra route through vm1, across hosts"
    );
    apply(&agents, &[A_VNI, B_VNI]);
    assert!(!vm0.ping(EXTRA_IP), "{driver}: extra route removed");

    // Removing the router's interface on B stops routing into B (both hosts).
    apply(&agents, &[A_VNI]);
    assert!(!vm0.ping(B0_IP), "{driver}: interface removed, same host");
    assert!(
        !vm0.ping(B1_IP),
        "{driver}: interface removed, across hosts"
    );
    assert_eq!(vm2.tcp_banner(A0_IP, 80), None, "{driver}: and back");
    // Adding it back restores it.
    apply(&agents, &[A_VNI, B_VNI]);
    assert!(vm0.ping(B1_IP), "{driver}: interface re-added");
    assert!(vm0.ping(B0_IP), "{driver}: interface re-added, same host");

    for agent in agents {
        agent.finish(|d| d.teardown()).unwrap();
    }
}

/// The eBPF driver routes between a router's subnets on the sender's host.
#[test]
fn ebpf_driver_routes() {
    if !testbed::privileged_or_skip("ebpf_driver_routes") {
        return;
    }
    routed_suite("ebpf", |u: Underlay| EbpfDataplane::new(&u));
}

/// The kernel-path driver routes the same way (a namespace per router).
#[test]
fn kernel_driver_routes() {
    if !testbed::privileged_or_skip("kernel_driver_routes") {
        return;
    }
    routed_suite("kernel", |u: Underlay| KernelDataplane::new(&u));
}

/// The external network of the NAT suite: 203.0.113.0/24, its upstream router at .1 (absent),
/// an external host at .100, the router's gateway address .10, floating IPs .20 and .21.
const EXT_HOST: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 100);
const EXT_GW: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const FIP_VM0: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
const FIP_VM2: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 21);
/// The port of the echo listeners (held connections), allowed in by the VMs' group.
const ECHO_PORT: u16 = 7;

/// TCP listeners that answer each connection with "<name> <the peer's address>", so each
/// side can tell whom it reached and from which address it was seen. Stopped on drop.
struct PeerEcho {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<(), testbed::TestbedError>>>,
}

impl PeerEcho {
    fn start(ns: &testbed::NetNs, name: &str, port: u16) -> Self {
        use std::{io::Write, sync::atomic::Ordering};
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (flag, name) = (stop.clone(), name.to_string());
        let thread = ns.spawn(move || {
            let listener = std::net::TcpListener::bind(("0.0.0.0", port)).expect("bind");
            listener.set_nonblocking(true).expect("nonblocking");
            let _ = ready_tx.send(());
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, peer)) => {
                        let _ = write!(s, "{name} {}", peer.ip());
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
                }
            }
        });
        let _ = ready_rx.recv_timeout(std::time::Duration::from_secs(5));
        PeerEcho {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for PeerEcho {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A TCP listener that sends back whatever each connection sends, for as long as it stays
/// open: a connection held across a change of the NAT. Stopped on drop.
struct Echo {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<(), testbed::TestbedError>>>,
}

impl Echo {
    fn start(ns: &testbed::NetNs, port: u16) -> Self {
        use std::{
            io::{Read, Write},
            sync::atomic::Ordering,
        };
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let flag = stop.clone();
        let thread = ns.spawn(move || {
            let listener = std::net::TcpListener::bind(("0.0.0.0", port)).expect("bind");
            listener.set_nonblocking(true).expect("nonblocking");
            let _ = ready_tx.send(());
            while !flag.load(Ordering::Relaxed) {
                let Ok((mut s, _)) = listener.accept() else {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                    continue;
                };
                let flag = flag.clone();
                std::thread::spawn(move || {
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(std::time::Duration::from_millis(100)));
                    let mut buf = [0u8; 256];
                    while !flag.load(Ordering::Relaxed) {
                        match s.read(&mut buf) {
                            Ok(0) => break,
                            Ok(n) => {
                                if s.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                            Err(_) => break,
                        }
                    }
                });
            }
        });
        let _ = ready_rx.recv_timeout(std::time::Duration::from_secs(5));
        Echo {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A connection from `ns` to `ip:port`, made there and used from here (its socket stays in
/// `ns`).
fn connect(ns: &testbed::NetNs, ip: Ipv4Addr, port: u16) -> Option<std::net::TcpStream> {
    ns.run(move || {
        let timeout = std::time::Duration::from_secs(2);
        let s = std::net::TcpStream::connect_timeout(&(ip, port).into(), timeout).ok()?;
        s.set_read_timeout(Some(std::time::Duration::from_millis(1500)))
            .ok()?;
        Some(s)
    })
    .ok()
    .flatten()
}

/// Sends `line` on `s` and returns what comes back (within its read timeout).
fn echo(s: &mut std::net::TcpStream, line: &str) -> Option<String> {
    use std::io::{Read, Write};
    s.write_all(line.as_bytes()).ok()?;
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).ok().filter(|n| *n > 0)?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Connects from `ns` to `ip:port` and returns what the listener wrote (2 s timeout).
fn fetch(ns: &testbed::NetNs, ip: Ipv4Addr, port: u16) -> Option<String> {
    use std::io::Read;
    ns.run(move || {
        let timeout = std::time::Duration::from_secs(2);
        let addr = std::net::SocketAddr::from((ip, port));
        let mut s = std::net::TcpStream::connect_timeout(&addr, timeout).ok()?;
        s.set_read_timeout(Some(timeout)).ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    })
    .ok()
    .flatten()
}

/// The router of the routed suite with its gateway on the external network through `ext0`
/// (host 0 holds the gateway address) and the floating IPs of host `h`'s ports in `fips`.
fn nat_router(h: usize, fips: &[(Ipv4Addr, &str, Ipv4Addr, usize)]) -> Router {
    let mut r = router(&[A_VNI, B_VNI]);
    r.gateway = Some(ExternalGateway {
        port_id: "gw-1".into(),
        device: "ext0".into(),
        subnet: Ipv4Cidr::new(EXT_GW, 24),
        ip: EXT_GW,
        mac: Mac([0xfa, 0x16, 0x3e, 0xee, 0, 1]),
        upstream: Some(Ipv4Addr::new(203, 0, 113, 1)),
        enable_snat: true,
        holds_address: h == 0,
    });
    r.floating_ips = fips
        .iter()
        .filter(|f| f.3 == h)
        .map(|&(floating, port, fixed, _)| FloatingIp {
            id: format!("fip-{port}"),
            floating,
            fixed,
            port_id: port.into(),
        })
        .collect();
    r
}

fn nat_suite<D, F>(driver: &str, make: F)
where
    D: Dataplane + 'static,
    F: Fn(Underlay) -> Result<D, D::Error> + Send + Clone + 'static,
{
    let topo = Topology::build_with(
        &[
            (0, A_VNI, A0_IP.octets()),
            (0, B_VNI, B0_IP.octets()),
            (1, B_VNI, B1_IP.octets()),
        ],
        24,
    )
    .unwrap();
    let _routers = RouterNamespaces(topo.hosts.iter().map(|h| h.ns.path()).collect());
    // The external network: a bridge (its own namespace) joining the external host and
    // each host's `ext0`, the interface `[network] physical_interface_mappings` names.
    let ext_bridge = testbed::NetNs::new("fipe").unwrap();
    ext_bridge
        .ip(&["link", "add", "br0", "type", "bridge"])
        .unwrap();
    ext_bridge.ip(&["link", "set", "br0", "up"]).unwrap();
    let ext_host = testbed::NetNs::new("fipx").unwrap();
    testbed::veth(&ext_host, "eth0", &ext_bridge, "x0").unwrap();
    ext_host
        .ip(&["addr", "add", &format!("{EXT_HOST}/24"), "dev", "eth0"])
        .unwrap();
    ext_host.ip(&["link", "set", "eth0", "up"]).unwrap();
    // A namespace's veth leaves TCP checksums to offload; a real external network delivers
    // them complete, which is what encapsulation in XDP needs (docs/datapath.md).
    ext_host
        .exec("ethtool", &["-K", "eth0", "tx", "off"])
        .unwrap();
    for (i, h) in topo.hosts.iter().enumerate() {
        let port = format!("h{i}");
        testbed::veth(&h.ns, "ext0", &ext_bridge, &port).unwrap();
        ext_bridge
            .ip(&["link", "set", &port, "master", "br0", "up"])
            .unwrap();
        h.ns.ip(&["link", "set", "ext0", "up"]).unwrap();
    }
    ext_bridge
        .ip(&["link", "set", "x0", "master", "br0", "up"])
        .unwrap();
    for (vm, gw) in topo.vms.iter().zip([A_GW, B_GW, B_GW]) {
        vm.ns
            .ip(&["route", "add", "default", "via", &gw.to_string()])
            .unwrap();
    }
    let agents: Vec<Agent<D>> = topo
        .hosts
        .iter()
        .map(|h| {
            let make = make.clone();
            let underlay = h.underlay();
            Agent::start(&h.ns, move || make(underlay))
                .unwrap()
                .unwrap()
        })
        .collect();
    let apply = |agents: &[Agent<D>], gateway: bool, fips: &[(Ipv4Addr, &str, Ipv4Addr, usize)]| {
        for (i, agent) in agents.iter().enumerate() {
            // The echo port, for connections held across a change.
            let echo_rule = shoal_dataplane::SgRule {
                direction: shoal_dataplane::Direction::Ingress,
                ethertype: shoal_dataplane::EtherType::Ipv4,
                protocol: Some(6),
                port_range: Some((ECHO_PORT, ECHO_PORT)),
                remote: shoal_dataplane::Remote::Cidr(Ipv4Cidr::ANY),
            };
            let mut state = topo.desired_with_rules(i, &[], vec![echo_rule]);
            let mut r = nat_router(i, fips);
            if !gateway {
                r.gateway = None;
            }
            state.routers = vec![r];
            agent.call(move |d| d.apply(&state)).unwrap();
        }
    };
    let both = [(FIP_VM0, "vm0", A0_IP, 0), (FIP_VM2, "vm2", B1_IP, 1)];
    apply(&agents, true, &both);
    apply(&agents, true, &both); // idempotent
    let _echo: Vec<PeerEcho> = topo
        .vms
        .iter()
        .map(|vm| PeerEcho::start(&vm.ns, &vm.name, 80))
        .chain([PeerEcho::start(&ext_host, "ext", 8080)])
        .collect();
    let _echo_vm0 = Echo::start(&topo.vms[0].ns, ECHO_PORT);
    let _echo_ext = Echo::start(&ext_host, ECHO_PORT);
    let [vm0, vm1, vm2] = &topo.vms[..] else {
        unreachable!()
    };
    let seen = |who: &str, from: Ipv4Addr| Some(format!("{who} {from}"));

    // Inbound through floating IPs, on the gateway node (vm0) and on another (vm2): each VM
    // sees the external host's real address, and the handshake's replies pass (stateful).
    assert_eq!(
        fetch(&ext_host, FIP_VM0, 80),
        seen("vm0", EXT_HOST),
        "{driver}: external host -> floating IP of vm0"
    );
    assert_eq!(
        fetch(&ext_host, FIP_VM2, 80),
        seen("vm2", EXT_HOST),
        "{driver}: external host -> floating IP of vm2, on the node without the gateway"
    );
    assert!(
        ext_host
            .exec(
                "ping",
                &["-c", "2", "-i", "0.2", "-W", "1", &FIP_VM0.to_string()]
            )
            .is_ok(),
        "{driver}: the external host pings a floating IP"
    );
    // The VMs' groups still apply to what comes in through a floating IP.
    assert_eq!(
        fetch(&ext_host, FIP_VM0, 22),
        None,
        "{driver}: port 22 of vm0 stays closed by its group"
    );
    // Outbound: a VM with a floating IP leaves from it, one without from the gateway address.
    assert_eq!(
        vm0.tcp_banner(EXT_HOST, 8080),
        seen("ext", FIP_VM0),
        "{driver}: vm0 leaves from its floating IP"
    );
    assert_eq!(
        vm2.tcp_banner(EXT_HOST, 8080),
        seen("ext", FIP_VM2),
        "{driver}: vm2 leaves from its floating IP"
    );
    assert_eq!(
        vm1.tcp_banner(EXT_HOST, 8080),
        seen("ext", EXT_GW),
        "{driver}: vm1, without floating IP, leaves through SNAT"
    );
    assert!(vm1.ping(EXT_HOST), "{driver}: vm1 pings outside (SNAT)");
    // With SNAT, a fixed address is not reachable from outside even with a route to it.
    ext_host
        .ip(&["route", "add", "10.0.0.0/8", "via", &EXT_GW.to_string()])
        .unwrap();
    assert_eq!(
        fetch(&ext_host, B0_IP, 80),
        None,
        "{driver}: vm1's fixed address is not reachable from outside"
    );
    // East-west routing is unchanged.
    assert_eq!(
        vm0.tcp_banner(B1_IP, 80),
        seen("vm2", A0_IP),
        "{driver}: routing between the subnets still works"
    );

    // Connections held through vm0's floating IP, one each way, work until it goes.
    let mut inbound =
        connect(&ext_host, FIP_VM0, ECHO_PORT).expect("external host -> floating IP of vm0");
    let mut outbound =
        connect(&vm0.ns, EXT_HOST, ECHO_PORT).expect("vm0 -> external host from its floating IP");
    assert_eq!(
        echo(&mut inbound, "in"),
        Some("in".into()),
        "{driver}: held inbound"
    );
    assert_eq!(
        echo(&mut outbound, "out"),
        Some("out".into()),
        "{driver}: held outbound"
    );

    // Disassociating vm0's floating IP stops inbound; vm0 then leaves through SNAT.
    apply(&agents, true, &both[1..]);
    // Their translation is forgotten: neither connection goes on (conntrack flushed).
    assert_eq!(
        echo(&mut inbound, "in again"),
        None,
        "{driver}: a connection through a disassociated floating IP stops"
    );
    assert_eq!(
        echo(&mut outbound, "out again"),
        None,
        "{driver}: a connection from a disassociated floating IP stops"
    );
    assert_eq!(
        fetch(&ext_host, FIP_VM0, 80),
        None,
        "{driver}: a removed floating IP lets nothing in"
    );
    assert_eq!(
        vm0.tcp_banner(EXT_HOST, 8080),
        seen("ext", EXT_GW),
        "{driver}: vm0 leaves through SNAT once its floating IP is gone"
    );
    assert_eq!(
        fetch(&ext_host, FIP_VM2, 80),
        seen("vm2", EXT_HOST),
        "{driver}: the other floating IP stays"
    );
    // Re-associating restores it.
    apply(&agents, true, &both);
    assert_eq!(
        fetch(&ext_host, FIP_VM0, 80),
        seen("vm0", EXT_HOST),
        "{driver}: floating IP re-associated"
    );

    // Without its floating IP, vm2 (on the node without the gateway address) goes out through
    // the gateway node's SNAT: its router sends it there over the external link.
    apply(&agents, true, &both[..1]);
    assert_eq!(
        vm2.tcp_banner(EXT_HOST, 8080),
        seen("ext", EXT_GW),
        "{driver}: vm2 leaves through the gateway node's SNAT"
    );
    assert!(
        vm2.ping(EXT_HOST),
        "{driver}: vm2 pings outside (SNAT transit)"
    );
    assert_eq!(
        fetch(&ext_host, FIP_VM2, 80),
        None,
        "{driver}: vm2's removed floating IP lets nothing in"
    );
    assert_eq!(
        fetch(&ext_host, B1_IP, 80),
        None,
        "{driver}: nor does its fixed address, through either node"
    );
    assert_eq!(
        vm0.tcp_banner(B1_IP, 80),
        seen("vm2", A0_IP),
        "{driver}: routing between the subnets is unchanged by the transit rules"
    );
    apply(&agents, true, &both);
    assert_eq!(
        vm2.tcp_banner(EXT_HOST, 8080),
        seen("ext", FIP_VM2),
        "{driver}: vm2 leaves from its floating IP again"
    );

    // Without the gateway nothing reaches the outside, and routing goes on.
    apply(&agents, false, &[]);
    assert_eq!(
        vm1.tcp_banner(EXT_HOST, 8080),
        None,
        "{driver}: no gateway, no way out"
    );
    assert_eq!(
        fetch(&ext_host, FIP_VM2, 80),
        None,
        "{driver}: no gateway, no floating IP"
    );
    assert!(vm0.ping(B1_IP), "{driver}: routing without a gateway");

    // The eBPF driver's datapath carried it (the kernel driver has no such counters).
    for (i, agent) in agents.iter().enumerate() {
        let counters = agent.call(|d| d.counters()).unwrap();
        for name in ["pass_to_nat", "pass_from_nat"] {
            if let Some(n) = counters.get(name) {
                assert!(*n > 0, "{driver}: host {i} counted no {name}");
            }
        }
    }
    for agent in agents {
        agent.finish(|d| d.teardown()).unwrap();
    }
}

/// The kernel-path driver does floating IP NAT on the port's node and SNAT through the
/// router's gateway, in the router's namespace.
#[test]
fn kernel_driver_nat() {
    if !testbed::privileged_or_skip("kernel_driver_nat") {
        return;
    }
    nat_suite("kernel", |u: Underlay| KernelDataplane::new(&u));
}

/// The eBPF driver does the same NAT in the same router namespace, joined to its datapath by
/// a veth (the leg) instead of the network bridges.
#[test]
fn ebpf_driver_nat() {
    if !testbed::privileged_or_skip("ebpf_driver_nat") {
        return;
    }
    nat_suite("ebpf", |u: Underlay| EbpfDataplane::new(&u));
}
