//! The same namespace suite against both drivers, with real packets: two hosts (netns)
//! on an underlay bridge, two VMs per host, VXLAN between hosts.

use std::net::Ipv4Addr;

use shoal_dataplane::{
    ebpf::EbpfDataplane,
    kernel::KernelDataplane,
    testbed::{self, Agent, Banner, Topology},
    Dataplane, Ipv4Cidr, Mac, Router, RouterInterface, RouterRoute, Underlay,
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
        routes: vec![],
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
