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
