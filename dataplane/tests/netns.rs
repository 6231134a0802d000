//! The same namespace suite against both drivers, with real packets: two hosts (netns)
//! on an underlay bridge, two VMs per host, VXLAN between hosts.

use std::net::Ipv4Addr;

use shoal_dataplane::{
    ebpf::EbpfDataplane,
    kernel::KernelDataplane,
    testbed::{self, Agent, Banner, Topology},
    Dataplane, Underlay,
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
