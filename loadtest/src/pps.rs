//! `shoal-loadtest pps`: UDP packets per second between VMs on different hosts, built
//! on the dataplane crate's namespace topology, sent with trafgen.
//!
//! Every scenario sends 60-byte UDP frames from vm0 (host 0) to vm1 (host 1) with a
//! random source port per packet (64k flows), for `--seconds`, and reports what arrived
//! at the receiver per second (`pps`) and per CPU-second spent by the whole machine
//! (`pps_per_core`, from /proc/stat; it includes trafgen's own core).

use std::{
    net::Ipv4Addr,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use shoal_dataplane::{
    abi::{self, Config},
    ebpf::EbpfDataplane,
    kernel::KernelDataplane,
    testbed::{self, Agent, NetNs, Topology},
    Dataplane, Direction, EtherType, Ipv4Cidr, Mac, Remote, SgRule,
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seconds of traffic per scenario.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Rule counts for the rule-scaling scenarios.
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000,10000")]
    rules: Vec<usize>,
    /// Print one JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct Sample {
    scenario: &'static str,
    rules: usize,
    pps: f64,
    pps_per_core: f64,
    cpu_seconds: f64,
    packets: u64,
}

pub fn run(args: Args) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("pps needs root: it creates network namespaces and loads BPF programs");
    }
    let mut out = Vec::new();
    out.push(veth(&args)?);
    out.push(xdp_drop(&args)?);
    for &n in &args.rules {
        out.push(driver("xdp", n, &args, |u| EbpfDataplane::new(&u))?);
        report(&args, out.last().expect("pushed"));
    }
    for &n in &args.rules {
        out.push(driver("kernel", n, &args, |u| KernelDataplane::new(&u))?);
        report(&args, out.last().expect("pushed"));
    }
    for &n in &args.rules {
        out.push(sg_lookup(n)?);
        report(&args, out.last().expect("pushed"));
    }
    if !args.json {
        println!(
            "{:<14} {:>6} {:>12} {:>14}",
            "scenario", "rules", "pps", "pps/core"
        );
        for s in &out {
            println!(
                "{:<14} {:>6} {:>12.0} {:>14.0}",
                s.scenario, s.rules, s.pps, s.pps_per_core
            );
        }
    }
    Ok(())
}

fn report(args: &Args, s: &Sample) {
    if args.json {
        println!("{}", serde_json::to_string(s).expect("serialisable"));
    }
}

/// `rules` ingress rules in total: one allowing the benchmark's UDP port 9, the rest
/// TCP rules from distinct /32s that never match it.
fn rules(n: usize) -> Vec<SgRule> {
    let mut v: Vec<SgRule> = (1..n)
        .map(|i| SgRule {
            direction: Direction::Ingress,
            ethertype: EtherType::Ipv4,
            protocol: Some(6),
            port_range: Some((1000 + (i % 50_000) as u16, 1000 + (i % 50_000) as u16)),
            remote: Remote::Cidr(Ipv4Cidr::host(Ipv4Addr::from(0xac10_0000 + i as u32))),
        })
        .collect();
    v.push(SgRule {
        direction: Direction::Ingress,
        ethertype: EtherType::Ipv4,
        protocol: Some(17),
        port_range: Some((9, 9)),
        remote: Remote::Cidr(Ipv4Cidr::ANY),
    });
    v
}

fn trafgen_conf(dst: Mac, src: Mac, saddr: Ipv4Addr, daddr: Ipv4Addr) -> String {
    let hex = |b: &[u8]| {
        b.iter()
            .map(|x| format!("0x{x:02x}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "{{\n  {}, {}, 0x08, 0x00,\n  0x45, 0x00, 0x00, 0x2e, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11,\n  csumip(14, 33),\n  {}, {},\n  drnd(2), 0x00, 0x09, 0x00, 0x1a, 0x00, 0x00,\n  fill(0x41, 18)\n}}\n",
        hex(&dst.0),
        hex(&src.0),
        hex(&saddr.octets()),
        hex(&daddr.octets())
    )
}

fn busy_jiffies() -> Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let cpu: Vec<u64> = stat
        .lines()
        .next()
        .context("empty /proc/stat")?
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = cpu.iter().take(8).sum();
    Ok(total - cpu[3] - cpu[4])
}

/// A device counter read with `ip -s link` inside the namespace (sysfs would show the
/// namespace it was mounted in).
fn link_counter(ns: &NetNs, dev: &str, rx: bool) -> Result<u64> {
    let out = ns.ip(&["-s", "link", "show", dev])?;
    let text = String::from_utf8_lossy(&out.stdout);
    let header = if rx { "RX:" } else { "TX:" };
    let mut lines = text
        .lines()
        .skip_while(|l| !l.trim_start().starts_with(header));
    lines.next();
    let packets = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .context("parsing ip -s link")?;
    Ok(packets)
}

/// Runs trafgen in `sender` for the configured time and measures `count()` and CPU.
fn blast(
    scenario: &'static str,
    rules: usize,
    args: &Args,
    sender: &NetNs,
    conf: &str,
    count: impl Fn() -> Result<u64>,
) -> Result<Sample> {
    let path = std::env::temp_dir().join(format!("{}.trafgen", testbed::unique("shoalpps")));
    std::fs::write(&path, conf)?;
    let net = format!("--net={}", sender.path());
    // timeout(1) stops trafgen with SIGTERM after warm-up + measurement.
    let limit = format!("{}", args.seconds + 2);
    let mut child = Command::new("timeout")
        .args([
            limit.as_str(),
            "nsenter",
            net.as_str(),
            "trafgen",
            "--dev",
            "eth0",
            "--conf",
        ])
        .arg(&path)
        .args(["--cpus", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("running trafgen (package netsniff-ng)")?;
    thread::sleep(Duration::from_millis(500)); // warm-up: conntrack, ARP, NAPI
    let (p0, j0, t0) = (count()?, busy_jiffies()?, Instant::now());
    thread::sleep(Duration::from_secs(args.seconds));
    let (p1, j1, elapsed) = (count()?, busy_jiffies()?, t0.elapsed().as_secs_f64());
    let _ = child.wait();
    let _ = std::fs::remove_file(&path);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let packets = p1.saturating_sub(p0);
    let cpu_seconds = (j1 - j0) as f64 / hz;
    let s = Sample {
        scenario,
        rules,
        pps: packets as f64 / elapsed,
        pps_per_core: if cpu_seconds > 0.0 {
            packets as f64 / cpu_seconds
        } else {
            0.0
        },
        cpu_seconds,
        packets,
    };
    Ok(s)
}

/// Plain veth between two namespaces: the floor cost of the virtual wire.
fn veth(args: &Args) -> Result<Sample> {
    let a = NetNs::new("shpa")?;
    let b = NetNs::new("shpb")?;
    testbed::veth(&a, "eth0", &b, "eth0")?;
    for ns in [&a, &b] {
        ns.ip(&["link", "set", "eth0", "up"])?;
    }
    let conf = trafgen_conf(
        Mac([2, 0, 0, 0, 0, 2]),
        Mac([2, 0, 0, 0, 0, 1]),
        [10, 0, 0, 1].into(),
        [10, 0, 0, 2].into(),
    );
    let s = blast("veth", 0, args, &a, &conf, || {
        link_counter(&b, "eth0", true)
    })?;
    report(args, &s);
    Ok(s)
}

/// eBPF encap on host 0, XDP_DROP on host 1's underlay: the most host 1 could take.
fn xdp_drop(args: &Args) -> Result<Sample> {
    let topo = Topology::build()?;
    let state = topo.desired(0, &[]);
    let sender = Agent::start(&topo.hosts[0].ns, move || -> Result<EbpfDataplane, _> {
        let mut d = EbpfDataplane::new(&testbed_underlay(0))?;
        d.apply(&state)?;
        Ok::<_, shoal_dataplane::ebpf::EbpfDriverError>(d)
    })??;
    let drop = Agent::start(&topo.hosts[1].ns, || -> Result<aya::Ebpf, anyhow::Error> {
        let mut bpf = aya::Ebpf::load(abi::AUX_OBJ)?;
        let prog: &mut aya::programs::Xdp = bpf
            .program_mut(abi::PROG_XDP_DROP)
            .context("xdp_drop program")?
            .try_into()?;
        prog.load()?;
        prog.attach("ul0", aya::programs::XdpMode::Driver)?;
        Ok(bpf)
    })??;
    // Host 1 drops its ARP replies too, so host 0 gets the VTEP MAC from us instead of
    // the neighbour table.
    let mac1 = topo.hosts[1]
        .ns
        .run(|| shoal_dataplane::netdev::mac("ul0"))??;
    let vtep1 = topo.hosts[1].vtep;
    sender.call(move |d| d.set_vtep_mac(vtep1, mac1))?;
    let (vm0, vm1) = (&topo.vms[0], &topo.vms[1]);
    let conf = trafgen_conf(vm1.mac, vm0.mac, vm0.ip, vm1.ip);
    // XDP_DROP leaves no receive counter on host 1's veth; count what host 0 put on
    // the underlay bridge (all of it reaches host 1's XDP).
    let s = blast("xdp_drop", 0, args, &vm0.ns, &conf, || {
        link_counter(&topo.underlay, "h0", true)
    })?;
    report(args, &s);
    drop.finish(drop_bpf);
    sender.finish(|d| d.teardown())?;
    Ok(s)
}

fn drop_bpf(_: aya::Ebpf) {}

fn testbed_underlay(h: u8) -> shoal_dataplane::Underlay {
    shoal_dataplane::Underlay {
        device: "ul0".into(),
        vtep: Ipv4Addr::new(192, 168, 250, h + 1),
    }
}

/// vm0 -> vm1 across hosts through a driver, with `n` ingress rules on vm1's group.
fn driver<D, F>(scenario: &'static str, n: usize, args: &Args, make: F) -> Result<Sample>
where
    D: Dataplane + 'static,
    F: Fn(shoal_dataplane::Underlay) -> Result<D, D::Error> + Send + Clone + 'static,
{
    let topo = Topology::build()?;
    let mut agents = Vec::new();
    for (i, host) in topo.hosts.iter().enumerate() {
        let state = topo.desired_with_rules(i, &[], rules(n));
        let make = make.clone();
        let underlay = host.underlay();
        agents.push(Agent::start(&host.ns, move || -> Result<D, D::Error> {
            let mut d = make(underlay)?;
            d.apply(&state)?;
            Ok(d)
        })??);
    }
    let (vm0, vm1) = (&topo.vms[0], &topo.vms[1]);
    let conf = trafgen_conf(vm1.mac, vm0.mac, vm0.ip, vm1.ip);
    let s = blast(scenario, n, args, &vm0.ns, &conf, || {
        link_counter(&vm1.ns, "eth0", true)
    })?;
    for (i, a) in agents.iter().enumerate() {
        let counters = a.call(|d| d.counters().map_err(anyhow::Error::from))?;
        eprintln!("{scenario} rules={n} host {i} counters: {counters:?}");
    }
    for a in agents {
        a.finish(|d| d.teardown())?;
    }
    Ok(s)
}

/// Per-packet cost of the XDP program's rule lookup, by BPF_PROG_TEST_RUN: a VXLAN
/// packet to a local port that no rule allows, so every run misses conntrack and
/// does all three LPM lookups (denied packets create no conntrack entry).
fn sg_lookup(n: usize) -> Result<Sample> {
    let ns = NetNs::new("shpl")?;
    testbed::veth(&ns, "pa", &ns, "pa0")?;
    ns.run(move || -> Result<Sample> {
        let mut dp = EbpfDataplane::load_detached(Config {
            local_vtep_be: abi::ip_be([192, 0, 2, 1].into()),
            underlay_ifindex: 1,
            underlay_mac: [2, 0, 0, 0, 0, 1],
            pad: [0; 2],
        })?;
        let mut extra = rules(n);
        extra.pop(); // keep only the non-matching rules plus the group's own three
        let mut state = shoal_dataplane::DesiredState::default();
        state.ports.push(shoal_dataplane::LocalPort {
            id: "a".into(),
            device: "pa".into(),
            mac: Mac([0xfa, 0x16, 0x3e, 0, 0, 1]),
            ips: vec![[10, 0, 0, 1].into()],
            vni: 100,
            security_groups: vec!["g".into()],
        });
        state.security_groups.push(shoal_dataplane::SecurityGroup {
            id: "g".into(),
            rules: extra,
        });
        dp.apply(&state)?;
        let pkt = denied_vxlan_udp();
        // Make sure the timed path is the full rule walk ending in a denial.
        let before = dp.counters()?["drop_sg_ingress"];
        let (verdict, _) = dp.test_run_underlay(&pkt)?;
        anyhow::ensure!(
            verdict == 1 && dp.counters()?["drop_sg_ingress"] == before + 1,
            "the lookup packet must be denied by the security group (action {verdict})"
        );
        let runs = 200_000u32;
        let ns_per = dp.test_run_underlay_repeat(&pkt, runs)?;
        Ok(Sample {
            scenario: "xdp_sg_lookup",
            rules: n,
            pps: 1e9 / ns_per,
            pps_per_core: 1e9 / ns_per,
            cpu_seconds: ns_per * f64::from(runs) / 1e9,
            packets: u64::from(runs),
        })
    })?
}

fn denied_vxlan_udp() -> Vec<u8> {
    fn csum(h: &[u8]) -> u16 {
        let mut s: u32 = h
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
            .sum();
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        !(s as u16)
    }
    fn ip(src: [u8; 4], dst: [u8; 4], proto: u8, payload: &[u8]) -> Vec<u8> {
        let mut h = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, proto, 0, 0];
        h[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
        h.extend_from_slice(&src);
        h.extend_from_slice(&dst);
        let c = csum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h.extend_from_slice(payload);
        h
    }
    fn eth(dst: [u8; 6], src: [u8; 6], payload: &[u8]) -> Vec<u8> {
        let mut p = [dst, src].concat();
        p.extend_from_slice(&[0x08, 0x00]);
        p.extend_from_slice(payload);
        p
    }
    let udp = |sport: u16, dport: u16, payload: &[u8]| {
        let mut u = Vec::new();
        u.extend_from_slice(&sport.to_be_bytes());
        u.extend_from_slice(&dport.to_be_bytes());
        u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        u.extend_from_slice(&[0, 0]);
        u.extend_from_slice(payload);
        u
    };
    let inner = eth(
        [0xfa, 0x16, 0x3e, 0, 0, 1],
        [0xfa, 0x16, 0x3e, 0, 0, 2],
        &ip([10, 0, 0, 2], [10, 0, 0, 1], 17, &udp(5000, 9, &[0x41; 18])),
    );
    let mut vx = vec![0x08, 0, 0, 0];
    vx.extend_from_slice(&(100u32 << 8).to_be_bytes());
    vx.extend_from_slice(&inner);
    eth(
        [2, 0, 0, 0, 0, 1],
        [2, 0, 0, 0, 0, 2],
        &ip([192, 0, 2, 2], [192, 0, 2, 1], 17, &udp(50000, 4789, &vx)),
    )
}
