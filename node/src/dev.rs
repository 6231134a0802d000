//! `shoal dev`: a local cluster of N real node processes on loopback, for trying things.
//!
//! The first node runs `init`, the others `join` with a token it creates; each has its own
//! data directory `DIR/nodeK` and log file `DIR/nodeK.log`. Ports are picked by the OS.
//! Ctrl-C stops every node cleanly.
//!
//! With `--netns` (root), each node's datapath gets a network namespace of its own with an
//! underlay veth `ul0` (10.250.0.K/24) into a bridge in a hub namespace, so VXLAN between
//! the nodes is real on one machine; the namespaces are listed in `DIR/netns` and deleted
//! when the cluster stops.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;
use tokio::process::{Child, Command};

use crate::client::{OpenRc, Session};

/// Parses an `admin-openrc` file (`export NAME=value` lines).
pub fn read_openrc(path: &Path) -> anyhow::Result<OpenRc> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let get = |name: &str| -> anyhow::Result<String> {
        text.lines()
            .filter_map(|l| l.trim().strip_prefix("export "))
            .filter_map(|l| l.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.trim_matches('"').trim_matches('\'').to_owned())
            .with_context(|| format!("{} has no {name}", path.display()))
    };
    Ok(OpenRc {
        auth_url: get("OS_AUTH_URL")?,
        username: get("OS_USERNAME")?,
        password: get("OS_PASSWORD")?,
        project_name: get("OS_PROJECT_NAME")?,
        user_domain: get("OS_USER_DOMAIN_NAME")?,
        project_domain: get("OS_PROJECT_DOMAIN_NAME")?,
        cacert: get("OS_CACERT").ok().map(Into::into),
    })
}

fn free_tcp() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn free_udp() -> anyhow::Result<SocketAddr> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?)
}

struct Proc {
    name: String,
    child: Child,
}

fn spawn(dir: &Path, name: &str, args: &[String]) -> anyhow::Result<Proc> {
    let exe = std::env::current_exe().context("cannot find the shoal executable")?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{name}.log")))?;
    let child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {name}"))?;
    Ok(Proc {
        name: name.to_owned(),
        child,
    })
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

async fn wait_for<F, Fut, T>(what: &str, timeout: Duration, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let start = Instant::now();
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if start.elapsed() > timeout => {
                return Err(e.context(format!("timed out waiting for {what}")))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// The namespaces of a `--netns` cluster; deleted on drop (their links go with them).
struct Underlay {
    hub: String,
    nodes: Vec<String>,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .context("cannot run ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Underlay {
    fn create(dir: &Path, nodes: usize) -> anyhow::Result<Underlay> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            bail!("--netns creates network namespaces and needs root");
        }
        let tag = format!("shoal{}", std::process::id());
        let u = Underlay {
            hub: format!("{tag}-ul"),
            nodes: (1..=nodes).map(|i| format!("{tag}-n{i}")).collect(),
        };
        let mut list = u.hub.clone();
        for n in &u.nodes {
            list.push('\n');
            list.push_str(n);
        }
        std::fs::write(dir.join("netns"), list + "\n")?;
        ip(&["netns", "add", &u.hub])?;
        ip(&["-n", &u.hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &u.hub, "link", "set", "br0", "up"])?;
        for (i, ns) in u.nodes.iter().enumerate() {
            let port = format!("n{}", i + 1);
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n", ns, "link", "add", "ul0", "type", "veth", "peer", "name", &port, "netns",
                &u.hub,
            ])?;
            ip(&["-n", &u.hub, "link", "set", &port, "master", "br0", "up"])?;
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{}/24", Self::vtep(i)),
                "dev",
                "ul0",
            ])?;
            ip(&["-n", ns, "link", "set", "ul0", "up"])?;
        }
        Ok(u)
    }

    fn vtep(i: usize) -> String {
        format!("10.250.0.{}", i + 1)
    }

    /// The flags that put node `i` (from 0) on its own underlay, with `driver` if one was named.
    fn node_args(&self, i: usize, driver: Option<&str>) -> Vec<String> {
        let mut args = vec![
            "--underlay-device".into(),
            "ul0".into(),
            "--vtep".into(),
            Self::vtep(i),
            "--netns".into(),
            self.nodes[i].clone(),
        ];
        if let Some(d) = driver {
            args.extend(["--network-driver".into(), d.to_owned()]);
        }
        args
    }
}

impl Drop for Underlay {
    fn drop(&mut self) {
        for ns in &self.nodes {
            // The datapath pins of the node that lived in it (network agent default).
            let _ = std::fs::remove_dir_all(shoal_network::agent::default_pin_dir(ns));
            // Its routers' namespaces (floating IPs, SNAT) are not inside it.
            shoal_network::agent::remove_router_namespaces(ns);
        }
        for ns in self.nodes.iter().chain([&self.hub]) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", ns])
                .output();
        }
    }
}

pub async fn run(
    nodes: usize,
    dir: PathBuf,
    libvirt_uri: Option<String>,
    virt_type: Option<String>,
    netns: bool,
    network_driver: Option<String>,
) -> anyhow::Result<()> {
    if nodes == 0 || nodes > 32 {
        bail!("--nodes is {nodes}; it must be between 1 and 32");
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    if dir.join("node1").exists() {
        bail!(
            "{} already holds a dev cluster; remove it or pick another --dir",
            dir.display()
        );
    }
    let underlay = if netns {
        Some(Underlay::create(&dir, nodes)?)
    } else {
        None
    };
    let net_args = |i: usize| {
        underlay
            .as_ref()
            .map_or(Vec::new(), |u| u.node_args(i, network_driver.as_deref()))
    };
    let mut procs = Vec::new();
    // Every node drives the same kind of libvirt.
    let mut libvirt: Vec<String> = Vec::new();
    if let Some(uri) = &libvirt_uri {
        libvirt.extend(["--libvirt-uri".into(), uri.clone()]);
    }
    if let Some(t) = &virt_type {
        libvirt.extend(["--virt-type".into(), t.clone()]);
    }
    let first_listen = free_udp()?;
    let first_api = free_tcp()?;
    procs.push(spawn(
        &dir,
        "node1",
        &[
            "init".into(),
            "--data-dir".into(),
            dir.join("node1").display().to_string(),
            "--name".into(),
            "node1".into(),
            "--listen".into(),
            first_listen.to_string(),
            "--api".into(),
            first_api.to_string(),
        ]
        .into_iter()
        .chain(libvirt.iter().cloned())
        .chain(net_args(0))
        .collect::<Vec<_>>(),
    )?);
    let openrc_path = dir.join("node1").join("admin-openrc");
    let session = wait_for("node1 to initialise", Duration::from_secs(60), || async {
        let rc = read_openrc(&openrc_path)?;
        Session::login(&rc).await
    })
    .await?;
    for i in 2..=nodes {
        let name = format!("node{i}");
        let v: Value = session
            .send(
                session
                    .request(reqwest::Method::POST, "/shoal/v1/join-tokens")
                    .json(&serde_json::json!({"description": format!("dev {name}")})),
            )
            .await?
            .json()
            .await?;
        let token = v["token"].as_str().context("no token in answer")?;
        // A file only its owner reads, not the command line every local user sees.
        let token_file = dir.join(format!("{name}.join-token"));
        write_private(&token_file, token)?;
        procs.push(spawn(
            &dir,
            &name,
            &[
                "join".into(),
                "--data-dir".into(),
                dir.join(&name).display().to_string(),
                "--name".into(),
                name.clone(),
                "--listen".into(),
                free_udp()?.to_string(),
                "--api".into(),
                free_tcp()?.to_string(),
                "--token-file".into(),
                token_file.display().to_string(),
            ]
            .into_iter()
            .chain(libvirt.iter().cloned())
            .chain(net_args(i - 1))
            .chain([first_listen.to_string()])
            .collect::<Vec<_>>(),
        )?);
    }
    wait_for(
        "all nodes to be healthy",
        Duration::from_secs(90),
        || async {
            let v: Value = session
                .send(session.request(reqwest::Method::GET, "/shoal/v1/status"))
                .await?
                .json()
                .await?;
            let members = v["members"].as_array().cloned().unwrap_or_default();
            let healthy = members.iter().filter(|m| m["healthy"] == true).count();
            if v["leader"].is_string() && healthy == nodes {
                Ok(())
            } else {
                bail!("{healthy} of {nodes} members healthy")
            }
        },
    )
    .await?;
    println!("shoal dev: {nodes} nodes running under {}", dir.display());
    println!("  source {}", openrc_path.display());
    println!("  shoal status");
    println!("Ctrl-C stops the cluster.");

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut reported = vec![false; procs.len()];
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                for (i, p) in procs.iter_mut().enumerate() {
                    if let Ok(Some(status)) = p.child.try_wait() {
                        if !reported[i] {
                            eprintln!("shoal dev: {} exited ({status}); see {}.log", p.name, p.name);
                            reported[i] = true;
                        }
                    }
                }
            }
        }
    }
    eprintln!("shoal dev: stopping");
    for p in &procs {
        if let Some(pid) = p.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }
    for mut p in procs {
        if tokio::time::timeout(Duration::from_secs(10), p.child.wait())
            .await
            .is_err()
        {
            let _ = p.child.kill().await;
        }
    }
    drop(underlay);
    Ok(())
}
