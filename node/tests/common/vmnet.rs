//! Guests as network namespaces, for the tests of the network agent and the metadata
//! service: a "node" namespace holds the ports' taps (veth ends named as Nova names taps), a
//! "vm" namespace per guest holds the other end with the port's MAC and address, and asks
//! as a cloud image would (busybox). Plus the REST calls those tests make.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};

use super::{wait_until, Cluster};

pub const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZGhscHR4f t@h";
pub const USER_DATA: &[u8] = b"#cloud-config\nruncmd:\n  - echo metadata works\n";

/// True when running as root; otherwise prints why `what` is skipped (and fails under
/// `CI=true`, where privileged tests must run).
pub fn is_root(what: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let msg = format!("{what} needs root (network namespaces, veth pairs, port 80)");
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{msg}");
    }
    eprintln!("skipping: {msg}");
    false
}

pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace, deleted on drop (with the veth ends inside it) even when an assertion
/// fails.
pub struct Netns(pub String);

impl Netns {
    pub fn new(name: String) -> Netns {
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let ns = Netns(name);
        ip(&["-n", &ns.0, "link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.0)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // A node whose datapath lived here pinned it under this name (network agent default).
        let _ = std::fs::remove_dir_all(format!("/sys/fs/bpf/shoal/{}", self.0));
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// `sysctl -w KEY=VALUE` (or `-n KEY`: its value) inside `ns`.
pub fn sysctl(ns: &Netns, arg: &str) -> String {
    let flag = if arg.contains('=') { "-w" } else { "-n" };
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0, "sysctl", flag, arg])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sysctl {arg}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A guest: a namespace whose `eth0` is the peer of `tap` in the node's namespace, with the
/// port's MAC and `address`, and a route to 169.254.169.254 out of `eth0` (as cloud-init adds).
pub fn guest(name: String, node: &Netns, tap: &str, mac: &str, address: &str) -> Netns {
    let vm = Netns::new(name);
    ip(&[
        "-n", &node.0, "link", "add", tap, "type", "veth", "peer", "name", "eth0", "netns", &vm.0,
    ]);
    ip(&["-n", &node.0, "link", "set", tap, "up"]);
    ip(&["-n", &vm.0, "link", "set", "eth0", "address", mac]);
    ip(&["-n", &vm.0, "link", "set", "eth0", "up"]);
    // A veth stands in for the tap: frames the datapath redirects into it from XDP (from
    // another node, over VXLAN) need NAPI at this end, which GRO turns on; and checksums
    // must be complete on the wire (docs/datapath.md).
    let out = Command::new("ip")
        .args([
            "netns", "exec", &vm.0, "ethtool", "-K", "eth0", "tx", "off", "gro", "on",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ethtool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    readdress(&vm, address);
    vm
}

/// Gives the guest's `eth0` `address` instead of the one it had, and the route to
/// 169.254.169.254 again (the kernel drops a device's routes with its last address).
pub fn readdress(vm: &Netns, address: &str) {
    ip(&["-n", &vm.0, "addr", "flush", "dev", "eth0"]);
    ip(&[
        "-n",
        &vm.0,
        "addr",
        "add",
        &format!("{address}/24"),
        "dev",
        "eth0",
    ]);
    ip(&[
        "-n",
        &vm.0,
        "route",
        "replace",
        "169.254.169.254/32",
        "dev",
        "eth0",
    ]);
}

/// `busybox wget` of `path` from inside `vm`: Ok(body) on 2xx, Err(stderr) otherwise.
pub fn wget(vm: &Netns, path: &str) -> Result<Vec<u8>, String> {
    let out = Command::new("ip")
        // busybox 1.35's `wget -T` crashes (SIGSEGV); `timeout` bounds the request instead.
        .args([
            "netns", "exec", &vm.0, "timeout", "10", "busybox", "wget", "-q", "-O", "-",
        ])
        .arg(format!("http://169.254.169.254{path}"))
        .output()
        .unwrap();
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

pub fn wget_json(vm: &Netns, path: &str) -> Value {
    let body = wget(vm, path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{path}: not JSON ({e})"))
}

pub fn wget_text(vm: &Netns, path: &str) -> String {
    String::from_utf8(wget(vm, path).unwrap_or_else(|e| panic!("{path}: {e}"))).unwrap()
}

/// Runs `f` on a thread of its own inside `ns` (`setns` changes only the calling thread's
/// namespace) and returns its result.
pub fn in_netns<T: Send + 'static>(ns: &Netns, f: impl FnOnce() -> T + Send + 'static) -> T {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(ns.path()).unwrap();
    std::thread::spawn(move || {
        // SAFETY: setns on an open namespace fd only changes this thread's namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap()
}

/// A TCP server in a guest: every connection to `port` is answered with the address it came
/// from (as the server sees it) and closed. Stops on drop.
pub struct PeerEcho {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PeerEcho {
    pub fn new(vm: &Netns, port: u16) -> PeerEcho {
        use std::io::Write;
        use std::sync::atomic::Ordering;
        let listener = in_netns(vm, move || {
            std::net::TcpListener::bind(("0.0.0.0", port)).expect("bind in the guest")
        });
        listener.set_nonblocking(true).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, peer)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.write_all(peer.ip().to_string().as_bytes());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
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

/// One TCP connection from `vm` to `addr:port` (3 s to connect and to read): the address the
/// connection went to, as the guest sees it, and what a `PeerEcho` there answered (the
/// address it saw the guest come from); `Err` when it did not connect.
pub fn tcp_ask(vm: &Netns, addr: &str, port: u16) -> Result<(String, String), String> {
    use std::io::Read;
    let to: std::net::SocketAddr = format!("{addr}:{port}").parse().unwrap();
    in_netns(vm, move || {
        let mut s = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(3))
            .map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut seen = String::new();
        s.read_to_string(&mut seen).map_err(|e| e.to_string())?;
        Ok((s.peer_addr().unwrap().ip().to_string(), seen))
    })
}

/// `tcp_ask` until it connects (up to 10 s: the agent applies changes within milliseconds,
/// but the test must not depend on how many).
pub fn tcp_ask_until(vm: &Netns, addr: &str, port: u16) -> Result<(String, String), String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tcp_ask(vm, addr, port) {
            Ok(r) => return Ok(r),
            Err(e) if std::time::Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// One API call; returns the status and the JSON body (or `null`).
pub fn api(
    c: &Cluster,
    token: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = c
        .http
        .request(
            method.parse().unwrap(),
            format!("{}{path}", c.nodes[0].base()),
        )
        .header("X-Auth-Token", token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().unwrap_or(Value::Null))
}

pub fn created(c: &Cluster, token: &str, path: &str, body: Value) -> Value {
    let (status, v) = api(c, token, "POST", path, Some(body));
    assert!((200..300).contains(&status), "POST {path}: {status} {v}");
    v
}

pub struct Port {
    pub id: String,
    pub mac: String,
    pub ip: String,
}

pub fn port(c: &Cluster, token: &str, network: &str) -> Port {
    let p = &created(
        c,
        token,
        "/network/v2.0/ports",
        json!({"port": {"network_id": network}}),
    )["port"];
    Port {
        id: p["id"].as_str().unwrap().to_owned(),
        mac: p["mac_address"].as_str().unwrap().to_owned(),
        ip: p["fixed_ips"][0]["ip_address"].as_str().unwrap().to_owned(),
    }
}

pub fn server(c: &Cluster, token: &str, name: &str, port: &Port, ids: &(String, String)) -> String {
    let ud = base64::engine::general_purpose::STANDARD.encode(USER_DATA);
    let s = created(
        c,
        token,
        "/compute/v2.1/servers",
        json!({"server": {
            "name": name, "flavorRef": ids.0, "imageRef": ids.1, "key_name": "mdkey",
            "user_data": ud, "networks": [{"port": port.id}],
        }}),
    );
    let id = s["server"]["id"].as_str().unwrap().to_owned();
    wait_until(
        &format!("server {name} to be ACTIVE"),
        Duration::from_secs(60),
        || {
            let (_, v) = api(
                c,
                token,
                "GET",
                &format!("/compute/v2.1/servers/{id}"),
                None,
            );
            (v["server"]["status"] == "ACTIVE").then_some(())
        },
    );
    id
}

/// Flavor, image and key pair for the servers.
pub fn setup(c: &Cluster, token: &str) -> (String, String) {
    let flavor = created(
        c,
        token,
        "/compute/v2.1/flavors",
        json!({"flavor": {"name": "m1.md", "ram": 64, "vcpus": 1, "disk": 1}}),
    )["flavor"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let image = created(
        c,
        token,
        "/image/v2/images",
        json!({"name": "md", "disk_format": "raw", "container_format": "bare"}),
    )["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let resp = c
        .http
        .put(format!(
            "{}/image/v2/images/{image}/file",
            c.nodes[0].base()
        ))
        .header("X-Auth-Token", token)
        .header("Content-Type", "application/octet-stream")
        .body(vec![0u8; 1 << 20])
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 204, "image upload");
    created(
        c,
        token,
        "/compute/v2.1/os-keypairs",
        json!({"keypair": {"name": "mdkey", "public_key": KEY}}),
    );
    (flavor, image)
}

/// Nodes whose datapaths each have a namespace with an underlay veth `ul0`
/// (10.250.0.K/24) into a bridge in a hub namespace, as `shoal dev --netns` builds them.
pub struct Underlay {
    pub nodes: Vec<Netns>,
    // Dropped last: the nodes' veth peers live in it.
    pub hub: Netns,
}

impl Underlay {
    pub fn new(prefix: &str, n: usize) -> Underlay {
        let pid = std::process::id();
        let hub = Netns::new(format!("{prefix}-ul-{pid}"));
        ip(&["-n", &hub.0, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &hub.0, "link", "set", "br0", "up"]);
        let nodes = (1..=n)
            .map(|i| {
                let ns = Netns::new(format!("{prefix}-n{i}-{pid}"));
                let port = format!("n{i}");
                ip(&[
                    "-n", &ns.0, "link", "add", "ul0", "type", "veth", "peer", "name", &port,
                    "netns", &hub.0,
                ]);
                ip(&["-n", &hub.0, "link", "set", &port, "master", "br0", "up"]);
                ip(&[
                    "-n",
                    &ns.0,
                    "addr",
                    "add",
                    &format!("10.250.0.{i}/24"),
                    "dev",
                    "ul0",
                ]);
                ip(&["-n", &ns.0, "link", "set", "ul0", "up"]);
                ns
            })
            .collect();
        Underlay { nodes, hub }
    }

    /// The flags that put node `i` (from 0) on its own underlay with the eBPF datapath.
    pub fn args(&self, i: usize) -> Vec<String> {
        self.args_with(i, "ebpf")
    }

    /// The flags that put node `i` (from 0) on its own underlay with `driver` (ebpf, kernel).
    pub fn args_with(&self, i: usize, driver: &str) -> Vec<String> {
        vec![
            "--underlay-device".to_string(),
            "ul0".into(),
            "--vtep".into(),
            format!("10.250.0.{}", i + 1),
            "--netns".into(),
            self.nodes[i].0.clone(),
            "--network-driver".into(),
            driver.into(),
        ]
    }
}
