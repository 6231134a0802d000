//! Reconcile after restart: with maps and links pinned on bpffs, forwarding outlives
//! the process, and a new process adopts the pinned state instead of starting over.

use std::{net::Ipv4Addr, path::PathBuf};

use shoal_dataplane::{
    ebpf::EbpfDataplane,
    testbed::{self, Agent, Banner, Topology},
    Dataplane,
};

const VM1_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

/// A private bpffs instance mounted on a temporary directory (the host's /sys/fs/bpf
/// is left alone), with one pin directory per host; unmounted and removed on drop.
struct PinDirs {
    mount: PathBuf,
    dirs: Vec<PathBuf>,
}

impl PinDirs {
    fn new() -> Self {
        let mount = std::env::temp_dir().join(testbed::unique("shoalbpffs"));
        std::fs::create_dir_all(&mount).unwrap();
        let m = mount.to_str().unwrap();
        testbed::run("mount", &["-t", "bpf", "bpf", m]).unwrap();
        let dirs = (0..2).map(|i| mount.join(format!("host{i}"))).collect();
        PinDirs { mount, dirs }
    }
}

impl Drop for PinDirs {
    fn drop(&mut self) {
        for d in &self.dirs {
            let _ = std::fs::remove_dir_all(d);
        }
        let _ = testbed::run("umount", &[self.mount.to_str().unwrap()]);
        let _ = std::fs::remove_dir(&self.mount);
    }
}

fn start(topo: &Topology, dirs: &PinDirs) -> Vec<Agent<EbpfDataplane>> {
    topo.hosts
        .iter()
        .zip(&dirs.dirs)
        .enumerate()
        .map(|(i, (h, dir))| {
            let (underlay, dir, state) = (h.underlay(), dir.clone(), topo.desired(i, &[]));
            Agent::start(&h.ns, move || {
                let mut d = EbpfDataplane::new_pinned(&underlay, &dir)?;
                d.apply(&state)?;
                Ok::<_, shoal_dataplane::ebpf::EbpfDriverError>(d)
            })
            .unwrap()
            .unwrap()
        })
        .collect()
}

/// Traffic keeps flowing while no process holds the datapath, a restarted driver
/// keeps the pinned maps (counters and connections continue), and teardown unpins.
#[test]
fn pinned_datapath_survives_restart() {
    if !testbed::privileged_or_skip("pinned_datapath_survives_restart") {
        return;
    }
    let topo = Topology::build().unwrap();
    let dirs = PinDirs::new();
    let _banners: Vec<Banner> = topo
        .vms
        .iter()
        .map(|vm| Banner::start(vm, &[80, 22]).unwrap())
        .collect();
    let vm0 = &topo.vms[0];

    let agents = start(&topo, &dirs);
    assert_eq!(
        vm0.tcp_banner(VM1_IP, 80).as_deref(),
        Some("vm1"),
        "before restart"
    );
    let encap_before = agents[0].call(|d| d.counters()).unwrap()["pass_encap"];
    let ct_before = agents[1].call(|d| d.conntrack_len()).unwrap();
    assert!(encap_before > 0 && ct_before > 0);

    // The process goes away without tearing down: pinned links keep the programs in.
    for a in agents {
        a.finish(drop);
    }
    assert_eq!(
        vm0.tcp_banner(VM1_IP, 80).as_deref(),
        Some("vm1"),
        "with no process"
    );
    assert_eq!(
        vm0.tcp_banner(VM1_IP, 22),
        None,
        "rules still enforced with no process"
    );

    let agents = start(&topo, &dirs);
    let encap_after = agents[0].call(|d| d.counters()).unwrap()["pass_encap"];
    assert!(
        encap_after > encap_before,
        "pinned counters continue: {encap_before} -> {encap_after}"
    );
    assert!(
        agents[1].call(|d| d.conntrack_len()).unwrap() >= ct_before,
        "connections kept"
    );
    assert_eq!(
        vm0.tcp_banner(VM1_IP, 80).as_deref(),
        Some("vm1"),
        "after restart"
    );

    for a in agents {
        a.finish(|d| d.teardown()).unwrap();
    }
    for d in &dirs.dirs {
        assert!(!d.exists(), "teardown unpins {}", d.display());
    }
    assert_eq!(
        vm0.tcp_banner(VM1_IP, 80),
        None,
        "nothing forwards after teardown"
    );
}

/// A router survives the process like everything else, and a restarted driver (which numbers
/// routers afresh) replaces the pinned router entries: an interface removed while no process
/// ran is gone after its first apply, and coming back it routes again.
#[test]
fn pinned_routes_survive_restart() {
    use shoal_dataplane::{Ipv4Cidr, Mac, Router, RouterInterface};
    if !testbed::privileged_or_skip("pinned_routes_survive_restart") {
        return;
    }
    let (a0, b1) = (Ipv4Addr::new(10, 1, 0, 10), Ipv4Addr::new(10, 2, 0, 11));
    let gws = [
        (
            300,
            Ipv4Addr::new(10, 1, 0, 1),
            Mac([0xfa, 0x16, 0x3e, 0xaa, 0, 1]),
        ),
        (
            400,
            Ipv4Addr::new(10, 2, 0, 1),
            Mac([0xfa, 0x16, 0x3e, 0xbb, 0, 1]),
        ),
    ];
    let topo = Topology::build_with(&[(0, 300, a0.octets()), (1, 400, b1.octets())], 24).unwrap();
    for (vm, (_, gw, _)) in topo.vms.iter().zip(gws) {
        vm.ns
            .ip(&["route", "add", "default", "via", &gw.to_string()])
            .unwrap();
    }
    let dirs = PinDirs::new();
    let start = |on: &'static [u32]| -> Vec<Agent<EbpfDataplane>> {
        topo.hosts
            .iter()
            .zip(&dirs.dirs)
            .enumerate()
            .map(|(i, (h, dir))| {
                let mut state = topo.desired(i, &[]);
                state.routers = vec![Router {
                    id: "router-1".into(),
                    interfaces: gws
                        .iter()
                        .filter(|(vni, _, _)| on.contains(vni))
                        .map(|&(vni, ip, mac)| RouterInterface {
                            port_id: format!("rif-{vni}"),
                            vni,
                            mac,
                            ip,
                            subnet: Ipv4Cidr::new(ip, 24),
                        })
                        .collect(),
                    ..Default::default()
                }];
                let (underlay, dir) = (h.underlay(), dir.clone());
                Agent::start(&h.ns, move || {
                    let mut d = EbpfDataplane::new_pinned(&underlay, &dir)?;
                    d.apply(&state)?;
                    Ok::<_, shoal_dataplane::ebpf::EbpfDriverError>(d)
                })
                .unwrap()
                .unwrap()
            })
            .collect()
    };
    let (vm0, vm1) = (&topo.vms[0], &topo.vms[1]);

    let agents = start(&[300, 400]);
    assert!(vm0.ping(b1), "routed before the restart");
    for a in agents {
        a.finish(drop);
    }
    assert!(vm0.ping(b1), "routed with no process");
    assert!(vm1.ping(a0), "and back");

    let agents = start(&[300]);
    assert!(!vm0.ping(b1), "the interface removed meanwhile is gone");
    for a in agents {
        a.finish(drop);
    }
    let agents = start(&[300, 400]);
    assert!(vm0.ping(b1), "routed again after another restart");
    assert!(vm1.ping(a0), "both ways");
    for a in agents {
        a.finish(|d| d.teardown()).unwrap();
    }
}

/// NAT outlives the process too: the router's namespace stays in /run/netns and the leg's tc
/// link is pinned, so a floating IP answers with no process; a restarted driver takes the leg
/// and the namespace over (one namespace, still answering), and one whose desired state has
/// no gateway any more removes the namespace.
#[test]
fn pinned_nat_survives_restart() {
    use shoal_dataplane::{ExternalGateway, FloatingIp, Ipv4Cidr, Mac, Router, RouterInterface};
    if !testbed::privileged_or_skip("pinned_nat_survives_restart") {
        return;
    }
    let (vm_ip, gw) = (Ipv4Addr::new(10, 1, 0, 10), Ipv4Addr::new(10, 1, 0, 1));
    let (ext_host_ip, ext_gw, fip) = (
        Ipv4Addr::new(203, 0, 113, 100),
        Ipv4Addr::new(203, 0, 113, 10),
        Ipv4Addr::new(203, 0, 113, 20),
    );
    let topo = Topology::build_with(&[(0, 300, vm_ip.octets())], 24).unwrap();
    let host = &topo.hosts[0];
    // Router namespaces live under /run/netns, outside the host namespace: removed on drop.
    struct RouterNamespaces(String);
    impl Drop for RouterNamespaces {
        fn drop(&mut self) {
            let _ = shoal_dataplane::kernel::remove_router_namespaces(&self.0);
        }
    }
    let _routers = RouterNamespaces(host.ns.path());
    let ext_host = testbed::NetNs::new("rsnx").unwrap();
    testbed::veth(&host.ns, "ext0", &ext_host, "eth0").unwrap();
    ext_host
        .ip(&["addr", "add", &format!("{ext_host_ip}/24"), "dev", "eth0"])
        .unwrap();
    ext_host.ip(&["link", "set", "eth0", "up"]).unwrap();
    host.ns.ip(&["link", "set", "ext0", "up"]).unwrap();
    topo.vms[0]
        .ns
        .ip(&["route", "add", "default", "via", &gw.to_string()])
        .unwrap();
    let router = |gateway: bool| Router {
        id: "router-nat".into(),
        interfaces: vec![RouterInterface {
            port_id: "rif-300".into(),
            vni: 300,
            mac: Mac([0xfa, 0x16, 0x3e, 0xaa, 0, 1]),
            ip: gw,
            subnet: Ipv4Cidr::new(gw, 24),
        }],
        gateway: gateway.then(|| ExternalGateway {
            port_id: "gw-nat".into(),
            device: "ext0".into(),
            subnet: Ipv4Cidr::new(ext_gw, 24),
            ip: ext_gw,
            mac: Mac([0xfa, 0x16, 0x3e, 0xee, 0, 1]),
            upstream: None,
            enable_snat: true,
            holds_address: true,
        }),
        floating_ips: if gateway {
            vec![FloatingIp {
                id: "fip-vm0".into(),
                floating: fip,
                fixed: vm_ip,
                port_id: topo.vms[0].name.clone(),
            }]
        } else {
            Vec::new()
        },
        ..Default::default()
    };
    let dirs = PinDirs::new();
    let start = |gateway: bool| {
        let mut state = topo.desired(0, &[]);
        state.routers = vec![router(gateway)];
        let (underlay, dir) = (host.underlay(), dirs.dirs[0].clone());
        Agent::start(&host.ns, move || {
            let mut d = EbpfDataplane::new_pinned(&underlay, &dir)?;
            d.apply(&state)?;
            Ok::<_, shoal_dataplane::ebpf::EbpfDriverError>(d)
        })
        .unwrap()
        .unwrap()
    };
    let namespaces = || {
        use std::os::unix::fs::MetadataExt;
        let ino = std::fs::metadata(host.ns.path()).unwrap().ino();
        std::fs::read_dir("/run/netns")
            .unwrap()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("shoalr{ino}-"))
            })
            .count()
    };
    let pings = |ip: Ipv4Addr| {
        ext_host
            .exec(
                "ping",
                &["-c", "2", "-i", "0.2", "-W", "1", &ip.to_string()],
            )
            .is_ok()
    };

    start(true).finish(drop);
    assert!(pings(fip), "the floating IP answers with no process");
    assert_eq!(namespaces(), 1);
    start(true).finish(drop);
    assert!(pings(fip), "a restarted driver took the NAT over");
    assert!(topo.vms[0].ping(ext_host_ip), "and the VM leaves from it");
    assert_eq!(
        namespaces(),
        1,
        "the namespace was taken over, not duplicated"
    );
    let agent = start(false);
    assert_eq!(
        namespaces(),
        0,
        "no gateway any more: the namespace is gone"
    );
    assert!(!pings(fip), "and the floating IP with it");
    agent.finish(|d| d.teardown()).unwrap();
}
