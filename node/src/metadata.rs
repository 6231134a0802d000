//! The metadata service: Nova's metadata API at 169.254.169.254:80 for the VMs of this node.
//!
//! Which instance a request is about is decided by where it came from, never by what it says:
//! there is one listener per served VM device (`SO_BINDTODEVICE` = the tap), so the listener
//! that accepted the connection names the device and with it the port; the peer address must be
//! one of that port's fixed IPs (else 404). No header is trusted. Every request reads the port,
//! server, network and subnet rows through `shoal_state`, so renames, key and address changes
//! show at once. The documents themselves are built by `shoal_compute::metadata` (pure).
//!
//! On the kernel-path driver a tap is a port of its network's bridge (`sbr<vni>`), so the
//! node's IP stack sees the VM's packets on the bridge, never on the tap. There the service
//! serves the bridge: one listener bound to it for all of its served ports, and the port named
//! by the request's source address among the ports served on that bridge (addresses are unique
//! within a network). That the source address and MAC are the tap's own is enforced before the
//! stack sees the frame, by the driver's bridge `input` chain (dataplane/src/kernel.rs); the
//! bridge carries 169.254.169.254/32 itself, so it answers ARP for it even where `arp_ignore`
//! is set.
//!
//! Reply path without routes (tenant CIDRs overlap across networks, so no route to a VM can be
//! installed): a socket bound to a device makes the kernel route its packets out of that device
//! and assume the destination on-link when no route matches; a permanent neighbour entry (the
//! VM's IP → the port's MAC on the device) spares the ARP exchange, and `rp_filter=0` on the
//! device lets the VM's packets in although no route leads back to it.
//!
//! Namespaces: the devices may live in a network namespace of their own (`netns`). Sockets are
//! created, and `ip` and sysctl run, from a short-lived thread that entered that namespace
//! (a socket stays in the namespace it was created in); tokio then drives the sockets from any
//! thread.
//!
//! This file is self-contained (it names no other module of the binary) so that the test
//! `t92_metadata` compiles it as it is and drives it against a real cluster.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, State as AxState};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use rand::RngCore as _;
use shoal_compute::metadata::{self as docs, Document, Instance, LookupError};
use shoal_compute::server::ServerRecord;
use shoal_network::records::FloatingIpRecord;
use shoal_state::records::PortRecord;
use shoal_state::{tables, State, StateError};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The metadata address every cloud image asks.
pub const METADATA_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
pub const METADATA_PORT: u16 = 80;
/// How long a stopping listener may spend finishing requests in flight before it is dropped.
const STOP_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("cannot enter the network namespace {path}")]
    Netns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0:?} is not a network device name (1 to 15 characters, no '/', ':' or space)")]
    Device(String),
    #[error("{0:?} is not a MAC address (six hex octets separated by ':')")]
    Mac(String),
    #[error("cannot run `ip {args}`")]
    Spawn {
        args: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`ip {args}` failed: {stderr}")]
    Ip { args: String, stderr: String },
    #[error("cannot write {path}")]
    Sysctl {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {METADATA_ADDR}:{METADATA_PORT} on device {device}")]
    Listen {
        device: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the namespace worker thread died")]
    Worker,
}

/// One served device: a listener of its own (a tap the stack sees), or one port among those of
/// the bridge it is a port of (kernel-path driver).
#[derive(Debug)]
enum Served {
    Own {
        ip: Ipv4Addr,
        stop: CancellationToken,
        task: JoinHandle<()>,
    },
    Bridged {
        ip: Ipv4Addr,
        bridge: String,
    },
}

/// Where a served device's packets reach this node's stack.
enum Attached {
    /// A port of this bridge (kernel-path driver): the bridge's listener serves it.
    Bridge(String),
    /// The device itself, with this listener bound to it.
    Own(std::net::TcpListener),
}

/// A bridge's listener and the ports served through it, by source address.
#[derive(Debug)]
struct BridgeListener {
    ports: Arc<Mutex<HashMap<Ipv4Addr, String>>>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// The metadata service of one node: one listener per served device, all in `netns` (or this
/// process's namespace). Cloning shares it.
#[derive(Debug, Clone)]
pub struct MetadataService {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    state: State,
    netns: Option<PathBuf>,
    served: Mutex<HashMap<String, Served>>,
    bridges: Mutex<HashMap<String, BridgeListener>>,
    stop: CancellationToken,
}

/// What one listener knows: where its requests come from.
#[derive(Debug)]
struct Listener {
    state: State,
    device: String,
    source: Source,
}

/// Which port a listener's requests are about.
#[derive(Debug)]
enum Source {
    /// Every request: the listener's device is this port's tap.
    Port(String),
    /// The port served on the listener's bridge with the request's source address.
    Bridge(Arc<Mutex<HashMap<Ipv4Addr, String>>>),
}

impl MetadataService {
    /// Configures 169.254.169.254/32 on `lo` of `netns` (once; the listeners share it) and
    /// returns the service, serving no device yet. The network agent calls [`serve`] when a
    /// port is bound to this node and its tap exists, [`stop_serving`] when it goes.
    ///
    /// [`serve`]: MetadataService::serve
    /// [`stop_serving`]: MetadataService::stop_serving
    pub async fn start(state: State, netns: Option<PathBuf>) -> Result<Self, MetadataError> {
        in_netns(netns.clone(), || {
            lower_rp_filter_floor()?;
            run_ip(&["link", "set", "lo", "up"])?;
            add_metadata_addr("lo")
        })
        .await?;
        Ok(MetadataService {
            inner: Arc::new(Inner {
                state,
                netns,
                served: Mutex::new(HashMap::new()),
                bridges: Mutex::new(HashMap::new()),
                stop: CancellationToken::new(),
            }),
        })
    }

    /// Serves the VM behind `device` (port `port_id`, address `ip`, MAC `mac`): a listener on
    /// 169.254.169.254:80 bound to the device, a permanent neighbour entry for the VM and
    /// `rp_filter=0` on the device. Serving a device again replaces its listener. When the
    /// device is a port of a bridge (kernel-path driver), all of that is done on the bridge,
    /// whose one listener serves each of its ports by source address.
    pub async fn serve(
        &self,
        device: &str,
        port_id: &str,
        ip: Ipv4Addr,
        mac: &str,
    ) -> Result<(), MetadataError> {
        check_device(device)?;
        check_mac(mac)?;
        self.stop_serving(device).await;
        let (dev, mac) = (device.to_owned(), mac.to_owned());
        let attached = in_netns(self.inner.netns.clone(), move || {
            let bridge = master_of(&dev)?;
            let on = bridge.as_deref().unwrap_or(&dev);
            run_ip(&[
                "neigh",
                "replace",
                &ip.to_string(),
                "lladdr",
                &mac,
                "dev",
                on,
                "nud",
                "permanent",
            ])?;
            match bridge {
                Some(bridge) => Ok(Attached::Bridge(bridge)),
                None => {
                    write_sysctl(&format!("{CONF}/{dev}/rp_filter"), 0)?;
                    Ok(Attached::Own(listen_on(&dev)?))
                }
            }
        })
        .await?;
        let served = match attached {
            Attached::Bridge(bridge) => {
                self.serve_on_bridge(&bridge, port_id, ip).await?;
                tracing::info!(%device, %bridge, port = %port_id, %ip, "serving metadata");
                Served::Bridged { ip, bridge }
            }
            Attached::Own(std_listener) => {
                let stop = self.inner.stop.child_token();
                let task = self.spawn_listener(
                    std_listener,
                    device,
                    Source::Port(port_id.to_owned()),
                    stop.clone(),
                )?;
                tracing::info!(%device, port = %port_id, %ip, "serving metadata");
                Served::Own { ip, stop, task }
            }
        };
        let old = self
            .inner
            .served
            .lock()
            .expect("lock")
            .insert(device.to_owned(), served);
        // Two `serve` calls for one device raced; the later one wins.
        if let Some(old) = old {
            self.finish_served(old).await;
        }
        Ok(())
    }

    /// Adds `ip` → `port_id` to `bridge`'s listener, starting the listener with its first port.
    async fn serve_on_bridge(
        &self,
        bridge: &str,
        port_id: &str,
        ip: Ipv4Addr,
    ) -> Result<(), MetadataError> {
        if let Some(b) = self.inner.bridges.lock().expect("lock").get(bridge) {
            b.ports.lock().expect("lock").insert(ip, port_id.to_owned());
            return Ok(());
        }
        // Once per bridge: it accepts VM sources and answers ARP for the address itself.
        let on = bridge.to_owned();
        let std_listener = in_netns(self.inner.netns.clone(), move || {
            write_sysctl(&format!("{CONF}/{on}/rp_filter"), 0)?;
            add_metadata_addr(&on)?;
            listen_on(&on)
        })
        .await?;
        let ports = Arc::new(Mutex::new(HashMap::from([(ip, port_id.to_owned())])));
        let stop = self.inner.stop.child_token();
        let task = self.spawn_listener(
            std_listener,
            bridge,
            Source::Bridge(ports.clone()),
            stop.clone(),
        )?;
        let raced = {
            let mut bridges = self.inner.bridges.lock().expect("lock");
            match bridges.get(bridge) {
                // Another call started this bridge's listener meanwhile: join it.
                Some(b) => {
                    b.ports.lock().expect("lock").insert(ip, port_id.to_owned());
                    Some((stop, task))
                }
                None => {
                    bridges.insert(bridge.to_owned(), BridgeListener { ports, stop, task });
                    None
                }
            }
        };
        if let Some((stop, task)) = raced {
            finish(stop, task).await;
        }
        Ok(())
    }

    fn spawn_listener(
        &self,
        std_listener: std::net::TcpListener,
        device: &str,
        source: Source,
        stop: CancellationToken,
    ) -> Result<JoinHandle<()>, MetadataError> {
        let listener = tokio::net::TcpListener::from_std(std_listener).map_err(|source| {
            MetadataError::Listen {
                device: device.to_owned(),
                source,
            }
        })?;
        let ctx = Arc::new(Listener {
            state: self.inner.state.clone(),
            device: device.to_owned(),
            source,
        });
        let app = Router::new().fallback(handle).with_state(ctx);
        let dev = device.to_owned();
        Ok(tokio::spawn(async move {
            let served = axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
            if let Err(e) = served {
                tracing::warn!(device = %dev, error = %e, "metadata listener stopped");
            }
        }))
    }

    /// Stops what `served` runs: its own listener, or its entry in its bridge's listener (and
    /// that listener with its last port). Returns the device its neighbour entry is on.
    async fn finish_served(&self, served: Served) -> (Ipv4Addr, Option<String>) {
        match served {
            Served::Own { ip, stop, task } => {
                finish(stop, task).await;
                (ip, None)
            }
            Served::Bridged { ip, bridge } => {
                let last = {
                    let mut bridges = self.inner.bridges.lock().expect("lock");
                    let empty = bridges.get(&bridge).is_some_and(|b| {
                        let mut ports = b.ports.lock().expect("lock");
                        ports.remove(&ip);
                        ports.is_empty()
                    });
                    if empty {
                        bridges.remove(&bridge)
                    } else {
                        None
                    }
                };
                if let Some(b) = last {
                    finish(b.stop, b.task).await;
                }
                (ip, Some(bridge))
            }
        }
    }

    /// Stops serving `device` and removes its neighbour entry (the device may be gone
    /// already, which is not an error).
    pub async fn stop_serving(&self, device: &str) {
        let Some(served) = self.inner.served.lock().expect("lock").remove(device) else {
            return;
        };
        let (ip, bridge) = self.finish_served(served).await;
        let dev = bridge.unwrap_or_else(|| device.to_owned());
        let removed = in_netns(self.inner.netns.clone(), move || {
            run_ip(&["neigh", "del", &ip.to_string(), "dev", &dev])
        })
        .await;
        if let Err(e) = removed {
            tracing::debug!(%device, error = %e, "no neighbour entry to remove");
        }
        tracing::info!(%device, "stopped serving metadata");
    }

    /// The devices served now.
    #[allow(
        dead_code,
        reason = "the node stops serving through the agent; t92 drives it directly"
    )]
    pub fn devices(&self) -> Vec<String> {
        let mut d: Vec<String> = self
            .inner
            .served
            .lock()
            .expect("lock")
            .keys()
            .cloned()
            .collect();
        d.sort();
        d
    }

    /// Stops every listener (the node is stopping).
    #[allow(
        dead_code,
        reason = "the node stops serving through the agent; t92 drives it directly"
    )]
    pub async fn shutdown(&self) {
        self.inner.stop.cancel();
        for device in self.devices() {
            self.stop_serving(&device).await;
        }
    }
}

/// Cancels a listener and waits for it, at most `STOP_GRACE`, then drops it.
async fn finish(stop: CancellationToken, mut task: JoinHandle<()>) {
    stop.cancel();
    if tokio::time::timeout(STOP_GRACE, &mut task).await.is_err() {
        task.abort();
        let _ = task.await;
    }
}

fn check_device(device: &str) -> Result<(), MetadataError> {
    let ok = (1..=15).contains(&device.len())
        && device
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    if ok {
        Ok(())
    } else {
        Err(MetadataError::Device(device.to_owned()))
    }
}

fn check_mac(mac: &str) -> Result<(), MetadataError> {
    let parts: Vec<&str> = mac.split(':').collect();
    let ok = parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
    if ok {
        Ok(())
    } else {
        Err(MetadataError::Mac(mac.to_owned()))
    }
}

/// Runs `work` on a fresh thread that entered `netns` first (this process's namespace when
/// `None`). The thread ends with the work, so no pooled thread is left in another namespace.
async fn in_netns<T: Send + 'static>(
    netns: Option<PathBuf>,
    work: impl FnOnce() -> Result<T, MetadataError> + Send + 'static,
) -> Result<T, MetadataError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("metadata-netns".into())
        .spawn(move || {
            let r = match &netns {
                Some(path) => enter_netns(path).and_then(|()| work()),
                None => work(),
            };
            let _ = tx.send(r);
        })
        .map_err(|_| MetadataError::Worker)?;
    rx.await.map_err(|_| MetadataError::Worker)?
}

fn enter_netns(path: &Path) -> Result<(), MetadataError> {
    use std::os::fd::AsRawFd as _;
    let err = |source| MetadataError::Netns {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(err)?;
    // SAFETY: setns takes a valid open descriptor (the file lives to the end of this function)
    // and a namespace type; it changes only the calling thread's network namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    Ok(())
}

const CONF: &str = "/proc/sys/net/ipv4/conf";

fn read_sysctl(path: &str) -> Result<u32, MetadataError> {
    let err = |source| MetadataError::Sysctl {
        path: path.to_owned(),
        source,
    };
    let text = std::fs::read_to_string(path).map_err(err)?;
    text.trim().parse().map_err(|_| {
        err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{text:?} is not a number"),
        ))
    })
}

fn write_sysctl(path: &str, value: u32) -> Result<(), MetadataError> {
    std::fs::write(path, value.to_string()).map_err(|source| MetadataError::Sysctl {
        path: path.to_owned(),
        source,
    })
}

/// The kernel filters a device's sources by max(`conf/all/rp_filter`, the device's own), so a
/// non-zero `all` would drop every VM packet (no route leads back to a tenant address) whatever
/// the tap's own setting. Moves `all`'s value into every device (and `default`, for devices
/// made later) whose own value is lower, then sets `all` to 0: each device keeps the filtering
/// it had, and a served tap can be set to 0 alone.
fn lower_rp_filter_floor() -> Result<(), MetadataError> {
    let all_path = format!("{CONF}/all/rp_filter");
    let all = read_sysctl(&all_path)?;
    if all == 0 {
        return Ok(());
    }
    let entries = std::fs::read_dir(CONF).map_err(|source| MetadataError::Sysctl {
        path: CONF.to_owned(),
        source,
    })?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        if name == "all" {
            continue;
        }
        let path = format!("{CONF}/{}/rp_filter", name.to_string_lossy());
        // A device may vanish meanwhile; it then needs nothing.
        if let Ok(own) = read_sysctl(&path) {
            if own < all {
                write_sysctl(&path, all)?;
            }
        }
    }
    write_sysctl(&all_path, 0)?;
    tracing::info!(
        previous = all,
        "rp_filter: the `all` floor moved into each device so that served taps can accept VM sources"
    );
    Ok(())
}

/// Runs `ip ARGS` in the calling thread's namespace (a child inherits it).
fn run_ip(args: &[&str]) -> Result<(), MetadataError> {
    let joined = args.join(" ");
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| MetadataError::Spawn {
            args: joined.clone(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(MetadataError::Ip {
            args: joined,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Configures 169.254.169.254/32 on `device` (in the calling thread's namespace).
fn add_metadata_addr(device: &str) -> Result<(), MetadataError> {
    run_ip(&[
        "addr",
        "replace",
        &format!("{METADATA_ADDR}/32"),
        "dev",
        device,
    ])
}

/// The bridge `device` is a port of, if any (`ip -o link show`, in the calling thread's
/// namespace: sysfs would show the namespace it was mounted in).
fn master_of(device: &str) -> Result<Option<String>, MetadataError> {
    let args = ["-o", "link", "show", "dev", device];
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| MetadataError::Spawn {
            args: args.join(" "),
            source,
        })?;
    if !out.status.success() {
        return Err(MetadataError::Ip {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace();
    Ok(words
        .by_ref()
        .find(|w| *w == "master")
        .and_then(|_| words.next())
        .map(str::to_owned))
}

/// A listening socket on 169.254.169.254:80 that only sees what arrives on `device`.
fn listen_on(device: &str) -> Result<std::net::TcpListener, MetadataError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let err = |source| MetadataError::Listen {
        device: device.to_owned(),
        source,
    };
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).map_err(err)?;
    // Every device has its own listener on the same address and port: the kernel tells them
    // apart by the bound device, and REUSEADDR lets a restarted node bind while old
    // connections linger in TIME_WAIT.
    socket.set_reuse_address(true).map_err(err)?;
    socket.bind_device(Some(device.as_bytes())).map_err(err)?;
    socket
        .bind(&SocketAddrV4::new(METADATA_ADDR, METADATA_PORT).into())
        .map_err(err)?;
    socket.listen(128).map_err(err)?;
    socket.set_nonblocking(true).map_err(err)?;
    Ok(socket.into())
}

/// webob's plain-text error body, which Nova's metadata API sends.
fn plain_error(status: StatusCode, explanation: &str) -> Response {
    let body = format!(
        "{} {}\n\n{explanation}\n\n   ",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=UTF-8")],
        body,
    )
        .into_response()
}

fn not_found() -> Response {
    plain_error(StatusCode::NOT_FOUND, "The resource could not be found.")
}

/// Why a request could not be answered: a 404 to the guest, or a 500 logged here.
#[derive(Debug, thiserror::Error)]
enum AnswerError {
    #[error("not found: {0}")]
    NotFound(String),
    #[error("cannot read the state")]
    State(#[from] StateError),
    #[error("the server row is unusable")]
    Lookup(#[source] LookupError),
}

async fn handle(
    AxState(ctx): AxState<Arc<Listener>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
) -> Response {
    if method != Method::GET && method != Method::HEAD {
        let mut r = plain_error(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("The method {method} is not allowed for this resource."),
        );
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match answer(&ctx, peer.ip(), uri.path()).await {
        Ok(doc) => {
            let (ctype, body) = match doc {
                Document::Json(v) => ("application/json", Body::from(v.to_string())),
                Document::Text(t) => ("text/plain; charset=UTF-8", Body::from(t)),
                Document::Bytes(b) => ("text/plain; charset=UTF-8", Body::from(b)),
            };
            ([(header::CONTENT_TYPE, ctype)], body).into_response()
        }
        Err(AnswerError::NotFound(why)) => {
            tracing::debug!(device = %ctx.device, %peer, path = %uri.path(), %why, "metadata 404");
            not_found()
        }
        Err(e) => {
            tracing::error!(device = %ctx.device, %peer, path = %uri.path(),
                error = %chain(&e), "metadata request failed");
            plain_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "An unknown error has occurred. Please try your request again.",
            )
        }
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

async fn answer(ctx: &Listener, peer: IpAddr, path: &str) -> Result<Document, AnswerError> {
    let IpAddr::V4(peer) = peer else {
        return Err(AnswerError::NotFound("not IPv4".into()));
    };
    let port_id = match &ctx.source {
        Source::Port(id) => id.clone(),
        Source::Bridge(ports) => ports
            .lock()
            .expect("lock")
            .get(&peer)
            .cloned()
            .ok_or_else(|| AnswerError::NotFound(format!("no port served here has {peer}")))?,
    };
    let ports = ctx.state.table::<PortRecord>(tables::PORTS);
    let port = ports
        .get(&port_id)
        .await?
        .ok_or_else(|| AnswerError::NotFound(format!("port {port_id} is gone")))?
        .value;
    if !port
        .fixed_ips
        .iter()
        .any(|f| f.ip_address.parse() == Ok(peer))
    {
        return Err(AnswerError::NotFound(format!(
            "{peer} is not an address of port {}",
            port.id
        )));
    }
    if !port.is_bound() {
        return Err(AnswerError::NotFound(format!(
            "port {} is unbound",
            port.id
        )));
    }
    let server = ctx
        .state
        .table::<ServerRecord>(tables::SERVERS)
        .get(&port.device_id)
        .await?
        .ok_or_else(|| AnswerError::NotFound(format!("no server {}", port.device_id)))?
        .value;
    // EC2's `public-ipv4`: a floating IP of the asking address, else of the port (Nova takes
    // the first floating IP of the instance's addresses). A list of the floating IPs, as few
    // as a cloud has (Neutron's default quota is 50 per project).
    let floating = ctx
        .state
        .table::<FloatingIpRecord>(tables::FLOATING_IPS)
        .list("")
        .await?
        .into_values()
        .filter(|f| f.port_id.as_deref() == Some(port.id.as_str()))
        .min_by_key(|f| f.fixed_ip_address.as_deref() != Some(peer.to_string().as_str()))
        .and_then(|f| f.floating_ip_address.parse().ok());
    // The port the request came through is already read; the rest come from the rows.
    let nics = shoal_compute::nics::nics(ctx.state.store().clone(), &server, Some(port)).await?;
    let mut seed = [0u8; 512];
    rand::rng().fill_bytes(&mut seed);
    let instance = Instance {
        server: &server,
        nics: &nics,
        address: peer,
        random_seed: &seed,
        public_ipv4: floating,
    };
    docs::lookup(&instance, path).map_err(|e| match e {
        LookupError::NotFound(p) => AnswerError::NotFound(p),
        e => AnswerError::Lookup(e),
    })
}

/// The network agent tells the service which devices to serve.
impl shoal_network::agent::PortHooks for MetadataService {
    fn port_up<'a>(
        &'a self,
        port: &'a shoal_network::agent::ServedPort,
    ) -> futures::future::BoxFuture<'a, ()> {
        Box::pin(async move {
            if let Err(e) = self
                .serve(&port.device, &port.port_id, port.ip, &port.mac)
                .await
            {
                tracing::warn!(device = %port.device, error = %e, "cannot serve metadata");
            }
        })
    }

    fn port_down<'a>(&'a self, device: &'a str) -> futures::future::BoxFuture<'a, ()> {
        Box::pin(self.stop_serving(device))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_and_mac_checks() {
        assert!(check_device("tap3f0b8a4c-11").is_ok());
        for bad in ["", "a/b", "x:y", "has space", "sixteen-chars-xx"] {
            assert!(check_device(bad).is_err(), "{bad:?}");
        }
        assert!(check_mac("fa:16:3e:00:0a:FF").is_ok());
        for bad in [
            "fa:16:3e:00:0a",
            "fa:16:3e:00:0a:fg",
            "fa-16-3e-00-0a-ff",
            "",
        ] {
            assert!(check_mac(bad).is_err(), "{bad:?}");
        }
    }

    async fn body_of(r: Response) -> String {
        let bytes = axum::body::to_bytes(r.into_body(), 1 << 16).await.unwrap();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    /// Other methods get 405 naming what is allowed; a request through a port the state does
    /// not hold gets Nova's plain-text 404, to the byte.
    #[tokio::test]
    async fn methods_and_unknown_ports() {
        let ctx = Arc::new(Listener {
            state: State::in_memory(),
            device: "tapx".into(),
            source: Source::Port("no-such-port".into()),
        });
        let peer = ConnectInfo(SocketAddr::from(([10, 0, 0, 5], 40000)));
        let uri: Uri = "/openstack/latest/meta_data.json".parse().unwrap();
        let r = handle(AxState(ctx.clone()), peer, Method::POST, uri.clone()).await;
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(r.headers()[header::ALLOW], "GET, HEAD");
        assert_eq!(
            body_of(r).await,
            "405 Method Not Allowed\n\nThe method POST is not allowed for this resource.\n\n   "
        );
        let r = handle(AxState(ctx), peer, Method::GET, uri).await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            body_of(r).await,
            "404 Not Found\n\nThe resource could not be found.\n\n   "
        );
    }
}
