//! Network-namespace fixtures shared by the privileged tests and `shoal-loadtest pps`:
//! namespaces and links that are deleted on drop, and running code inside a namespace.
//!
//! Every name carries the process id and a counter, so parallel tests never collide,
//! and nothing here touches the namespace the process started in except creating
//! veth pairs whose ends are moved out immediately.

use std::{
    fs::File,
    io,
    os::fd::AsRawFd,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
    thread,
};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A short unique name: `<prefix><pid % 100000>x<counter>` (fits IFNAMSIZ for short prefixes).
pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}x{n}", std::process::id() % 100_000)
}

#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    #[error("command `{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("could not run `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("could not enter network namespace {0}")]
    Setns(String, #[source] io::Error),
}

/// Runs a command and returns its output, failing on a non-zero exit.
pub fn run(program: &str, args: &[&str]) -> Result<Output, TestbedError> {
    let command = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| TestbedError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(TestbedError::Command {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out)
}

/// A named network namespace (`ip netns add`), deleted with everything in it on drop.
#[derive(Debug)]
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(prefix: &str) -> Result<Self, TestbedError> {
        let name = unique(prefix);
        run("ip", &["netns", "add", &name])?;
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    /// `ip -n NAME ARGS...`
    pub fn ip(&self, args: &[&str]) -> Result<Output, TestbedError> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Runs a program inside the namespace with nsenter (unlike `ip netns exec`, it
    /// does not remount /sys).
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<Output, TestbedError> {
        let net = format!("--net={}", self.path());
        let mut all = vec![net.as_str(), program];
        all.extend_from_slice(args);
        run("nsenter", &all)
    }

    /// Runs `f` on a new thread that has entered this namespace, and returns its result.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, TestbedError> {
        let path = self.path();
        let name = self.name.clone();
        thread::spawn(move || -> Result<T, TestbedError> {
            enter(&path).map_err(|e| TestbedError::Setns(name, e))?;
            Ok(f())
        })
        .join()
        .expect("thread in namespace panicked")
    }

    /// Spawns a thread that enters this namespace and runs `f`; the caller joins it.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> thread::JoinHandle<Result<T, TestbedError>> {
        let path = self.path();
        let name = self.name.clone();
        thread::spawn(move || {
            enter(&path).map_err(|e| TestbedError::Setns(name, e))?;
            Ok(f())
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace destroys its interfaces; veth peers elsewhere go too.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Moves the calling thread into the network namespace at `path`.
pub fn enter(path: &str) -> io::Result<()> {
    let file = File::open(path)?;
    // SAFETY: setns on a valid namespace fd only changes the calling thread's namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Creates a veth pair with one end in each namespace.
pub fn veth(a: &NetNs, a_name: &str, b: &NetNs, b_name: &str) -> Result<(), TestbedError> {
    // Created directly inside `a`, so no interface ever appears in the caller's namespace.
    a.ip(&[
        "link", "add", a_name, "type", "veth", "peer", "name", b_name, "netns", &b.name,
    ])?;
    Ok(())
}

/// True when the process may create namespaces and load BPF programs. Privileged tests
/// call this: without root they print why and skip, unless `CI=true`, where they fail.
pub fn privileged_or_skip(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: needs root (network namespaces, BPF) and CI=true forbids skipping");
    }
    eprintln!("{test}: skipped, needs root for network namespaces and BPF");
    false
}

type Job<D> = Box<dyn FnOnce(&mut Option<D>) + Send>;

/// Owns a value on a thread that lives in a network namespace, and runs closures on it
/// there (drivers resolve interface names in the namespace of the calling thread).
pub struct Agent<D> {
    tx: Option<std::sync::mpsc::Sender<Job<D>>>,
    handle: Option<thread::JoinHandle<()>>,
}

impl<D> std::fmt::Debug for Agent<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent").finish_non_exhaustive()
    }
}

impl<D: 'static> Agent<D> {
    /// Enters `ns` on a new thread and builds the value there with `make`.
    pub fn start<E: Send + 'static>(
        ns: &NetNs,
        make: impl FnOnce() -> Result<D, E> + Send + 'static,
    ) -> Result<Result<Self, E>, TestbedError> {
        let (tx, rx) = std::sync::mpsc::channel::<Job<D>>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), E>>();
        let path = ns.path();
        let name = ns.name.clone();
        let (setns_tx, setns_rx) = std::sync::mpsc::channel::<io::Result<()>>();
        let handle = thread::spawn(move || {
            if let Err(e) = enter(&path) {
                let _ = setns_tx.send(Err(e));
                return;
            }
            let _ = setns_tx.send(Ok(()));
            let mut value = match make() {
                Ok(v) => {
                    let _ = ready_tx.send(Ok(()));
                    Some(v)
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            for job in rx {
                job(&mut value);
            }
        });
        setns_rx
            .recv()
            .expect("agent thread exited")
            .map_err(|e| TestbedError::Setns(name, e))?;
        let agent = Agent {
            tx: Some(tx),
            handle: Some(handle),
        };
        match ready_rx.recv().expect("agent thread exited") {
            Ok(()) => Ok(Ok(agent)),
            Err(e) => Ok(Err(e)),
        }
    }

    /// Runs `f` on the value, in the namespace, and returns its result.
    pub fn call<T: Send + 'static>(&self, f: impl FnOnce(&mut D) -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        self.tx
            .as_ref()
            .expect("agent running")
            .send(Box::new(move |d: &mut Option<D>| {
                let _ = tx.send(f(d.as_mut().expect("agent value taken")));
            }))
            .expect("agent thread exited");
        rx.recv().expect("agent job panicked")
    }

    /// Takes the value out on its thread (e.g. to tear it down by value) and stops.
    pub fn finish<T: Send + 'static>(mut self, f: impl FnOnce(D) -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        self.tx
            .as_ref()
            .expect("agent running")
            .send(Box::new(move |d: &mut Option<D>| {
                let _ = tx.send(f(d.take().expect("agent value taken")));
            }))
            .expect("agent thread exited");
        let r = rx.recv().expect("agent job panicked");
        self.stop();
        r
    }

    fn stop(&mut self) {
        self.tx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl<D> Drop for Agent<D> {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// A VM of the test topology: a namespace whose `eth0` is a veth to its host.
#[derive(Debug)]
pub struct Vm {
    pub name: String,
    pub ns: NetNs,
    pub host: usize,
    /// The host-side end of the VM's veth (the "tap").
    pub device: String,
    pub mac: crate::Mac,
    pub ip: std::net::Ipv4Addr,
    pub vni: u32,
}

/// A host: a namespace with an underlay veth `ul0` into the underlay bridge.
#[derive(Debug)]
pub struct Host {
    pub ns: NetNs,
    pub vtep: std::net::Ipv4Addr,
}

impl Host {
    pub fn underlay(&self) -> crate::Underlay {
        crate::Underlay {
            device: "ul0".to_string(),
            vtep: self.vtep,
        }
    }
}

/// Two hosts joined by a bridge in a third namespace, two VMs per host:
/// vm0 (host 0) and vm1 (host 1) in VNI 100 with 10.0.0.1/.2; vm2 (host 0) and vm3
/// (host 1) in VNI 200 with the same addresses swapped (vm2 = .2, vm3 = .1); vm4
/// (host 0, VNI 100, 10.0.0.3) is vm0's same-host neighbour.
/// Dropping it deletes every namespace, and with them every link.
#[derive(Debug)]
pub struct Topology {
    pub vms: Vec<Vm>,
    pub hosts: Vec<Host>,
    pub underlay: NetNs,
}

/// VM MTU leaves room for the 50 bytes of VXLAN on a 1500-byte underlay.
pub const VM_MTU: &str = "1450";

impl Topology {
    pub fn build() -> Result<Self, TestbedError> {
        Self::build_with(
            &[
                (0, 100, [10, 0, 0, 1]),
                (1, 100, [10, 0, 0, 2]),
                (0, 200, [10, 0, 0, 2]),
                (1, 200, [10, 0, 0, 1]),
                (0, 100, [10, 0, 0, 3]),
            ],
            24,
        )
    }

    /// Two hosts as in [`Topology::build`], with the VMs of `plan`: VM k is (host, VNI,
    /// address), its `eth0` has `address/prefix`.
    pub fn build_with(plan: &[(usize, u32, [u8; 4])], prefix: u8) -> Result<Self, TestbedError> {
        let underlay = NetNs::new("shul")?;
        underlay.ip(&["link", "add", "br0", "type", "bridge"])?;
        underlay.ip(&["link", "set", "br0", "up"])?;
        let mut hosts = Vec::new();
        for i in 0..2u8 {
            let ns = NetNs::new("shh")?;
            let port = format!("h{i}");
            veth(&ns, "ul0", &underlay, &port)?;
            underlay.ip(&["link", "set", &port, "master", "br0", "up"])?;
            let vtep = std::net::Ipv4Addr::new(192, 168, 250, i + 1);
            ns.ip(&["addr", "add", &format!("{vtep}/24"), "dev", "ul0"])?;
            ns.ip(&["link", "set", "ul0", "up"])?;
            hosts.push(Host { ns, vtep });
        }
        let mut vms = Vec::new();
        for (k, &(host, vni, ip)) in plan.iter().enumerate() {
            let ns = NetNs::new("shv")?;
            let device = format!("tap{k}");
            veth(&hosts[host].ns, &device, &ns, "eth0")?;
            let mac = crate::Mac([0xfa, 0x16, 0x3e, 0x00, vni as u8, k as u8]);
            let ip = std::net::Ipv4Addr::from(ip);
            ns.ip(&[
                "link",
                "set",
                "eth0",
                "address",
                &mac.to_string(),
                "mtu",
                VM_MTU,
            ])?;
            ns.ip(&["addr", "add", &format!("{ip}/{prefix}"), "dev", "eth0"])?;
            ns.ip(&["link", "set", "eth0", "up"])?;
            // Full checksums from the VM: a frame that crosses XDP loses CHECKSUM_PARTIAL.
            // GRO on the VM end makes the veth run NAPI, which XDP_REDIRECT into it needs.
            ns.exec("ethtool", &["-K", "eth0", "tx", "off", "gro", "on"])?;
            hosts[host].ns.ip(&["link", "set", &device, "up"])?;
            vms.push(Vm {
                name: format!("vm{k}"),
                ns,
                host,
                device,
                mac,
                ip,
                vni,
            });
        }
        Ok(Topology {
            vms,
            hosts,
            underlay,
        })
    }

    /// The desired state of host `h`: its VMs as local ports, the others as remote
    /// ports, every port in group "web" (TCP 80 and ICMP in, everything out), except
    /// the VMs listed in `removed`.
    pub fn desired(&self, h: usize, removed: &[usize]) -> crate::DesiredState {
        self.desired_with_rules(h, removed, Vec::new())
    }

    /// As [`Topology::desired`], with `extra` rules appended to group "web".
    pub fn desired_with_rules(
        &self,
        h: usize,
        removed: &[usize],
        extra: Vec<crate::SgRule>,
    ) -> crate::DesiredState {
        use crate::{Direction, EtherType, Ipv4Cidr, Remote, SecurityGroup, SgRule};
        let rule = |direction, protocol, port_range| SgRule {
            direction,
            ethertype: EtherType::Ipv4,
            protocol,
            port_range,
            remote: Remote::Cidr(Ipv4Cidr::ANY),
        };
        let mut state = crate::DesiredState {
            security_groups: vec![SecurityGroup {
                id: "web".into(),
                rules: vec![
                    rule(Direction::Ingress, Some(6), Some((80, 80))),
                    rule(Direction::Ingress, Some(1), None),
                    rule(Direction::Egress, None, None),
                ]
                .into_iter()
                .chain(extra)
                .collect(),
            }],
            ..Default::default()
        };
        for (k, vm) in self.vms.iter().enumerate() {
            if removed.contains(&k) {
                continue;
            }
            if vm.host == h {
                state.ports.push(crate::LocalPort {
                    id: vm.name.clone(),
                    device: vm.device.clone(),
                    mac: vm.mac,
                    ips: vec![vm.ip],
                    vni: vm.vni,
                    security_groups: vec!["web".into()],
                });
            } else {
                state.remote_ports.push(crate::RemotePort {
                    id: vm.name.clone(),
                    mac: vm.mac,
                    ips: vec![vm.ip],
                    vni: vm.vni,
                    vtep: self.hosts[vm.host].vtep,
                    security_groups: vec!["web".into()],
                });
            }
        }
        state
    }
}

/// TCP listeners on some ports inside a VM that answer every connection with the VM's
/// name, so a client can tell which VM it reached. Stopped on drop.
#[derive(Debug)]
pub struct Banner {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<thread::JoinHandle<Result<(), TestbedError>>>,
}

impl Banner {
    pub fn start(vm: &Vm, ports: &[u16]) -> Result<Self, TestbedError> {
        use std::io::Write;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut threads = Vec::new();
        for &port in ports {
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let stop = stop.clone();
            let name = vm.name.clone();
            threads.push(vm.ns.spawn(move || {
                let listener = std::net::TcpListener::bind(("0.0.0.0", port)).expect("bind");
                listener.set_nonblocking(true).expect("nonblocking");
                let _ = ready_tx.send(());
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((mut s, _)) => {
                            let _ = s.write_all(name.as_bytes());
                        }
                        Err(_) => thread::sleep(std::time::Duration::from_millis(5)),
                    }
                }
            }));
            let _ = ready_rx.recv_timeout(std::time::Duration::from_secs(5));
        }
        Ok(Banner { stop, threads })
    }
}

impl Drop for Banner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Vm {
    /// Connects to `ip:port` from this VM; returns the banner, or `None` if the
    /// connection failed or timed out (2 s).
    pub fn tcp_banner(&self, ip: std::net::Ipv4Addr, port: u16) -> Option<String> {
        use std::io::Read;
        self.ns
            .run(move || {
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

    /// True if at least one of three pings to `ip` is answered.
    pub fn ping(&self, ip: std::net::Ipv4Addr) -> bool {
        self.ns
            .exec(
                "ping",
                &["-c", "3", "-i", "0.2", "-W", "1", &ip.to_string()],
            )
            .is_ok()
    }
}
