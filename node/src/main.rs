//! `shoal`: the one binary every machine of a Shoal cluster runs.
//!
//! `init`, `join` and `start` run a node in the foreground; the other commands are clients
//! that talk to the node `OS_AUTH_URL` points at with the `OS_*` credentials, as the
//! `openstack` client does. `dev` runs a local cluster of node processes on loopback.
//!
//! The node itself is the `shoal` library (`lib.rs`); this file is only its command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use shoal::{client, config, dev, logging, server};

/// mimalloc instead of glibc's malloc: a profile of a node under write load spent about 16% of
/// its CPU in malloc/free (consolidating glibc's arenas across the many tokio and blocking
/// threads); docs/benchmarks.md, "Where the write time goes".
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(name = "shoal", version, about = "A masterless private cloud runtime")]
struct Cli {
    /// Log as JSON lines instead of human-readable text.
    #[arg(long, global = true, env = "SHOAL_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a new one-node cluster (CA, admin credential) and run its first node.
    Init(NodeArgs),
    /// Join an existing cluster with a token and run this node.
    Join {
        #[command(flatten)]
        node: NodeArgs,
        /// A file holding the join token (from `shoal token create`, or printed by `init`).
        /// The token may also come from the environment variable SHOAL_JOIN_TOKEN.
        #[arg(long, conflicts_with = "token")]
        token_file: Option<PathBuf>,
        /// The join token itself. Any local user can read it in /proc/PID/cmdline while the
        /// node runs: prefer --token-file or SHOAL_JOIN_TOKEN.
        #[arg(long)]
        token: Option<String>,
        /// The `--listen` address of any existing node.
        peer: String,
    },
    /// Restart an existing node from its data directory.
    Start {
        #[arg(long)]
        data_dir: PathBuf,
        /// Change how the API serves (saved to the node's config); unchanged if not given.
        #[command(flatten)]
        api: ApiTlsArgs,
    },
    /// Show the cluster's members, roles, term and health.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Manage join tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Manage nodes.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Admin access to the raw `kv` table, like etcdctl.
    #[command(subcommand)]
    Kv(KvCmd),
    /// Disk images: qcow2 overlays written natively.
    #[command(subcommand)]
    Disk(DiskCmd),
    /// Images in the cluster's image store.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Run a local cluster of N node processes on loopback.
    Dev {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long)]
        dir: PathBuf,
        /// The libvirt every node's compute agent drives, for example `test:///default` for
        /// libvirt's test hypervisor (default: qemu:///system).
        #[arg(long)]
        libvirt_uri: Option<String>,
        /// The domain type every node uses: auto, kvm or qemu.
        #[arg(long)]
        virt_type: Option<String>,
        /// Give each node's datapath its own network namespace and underlay (root): VXLAN
        /// between the nodes is real, and each node runs a network agent.
        #[arg(long)]
        netns: bool,
        /// The datapath driver every node's network agent uses with `--netns`: auto, ebpf or
        /// kernel (default: each node's own default, auto).
        #[arg(long, requires = "netns", value_parser = ["auto", "ebpf", "kernel"])]
        network_driver: Option<String>,
    },
}

#[derive(clap::Args, Debug)]
struct NodeArgs {
    #[arg(long)]
    data_dir: PathBuf,
    #[arg(long)]
    name: String,
    /// QUIC peer address (UDP).
    #[arg(long)]
    listen: SocketAddr,
    /// HTTP API address (TCP).
    #[arg(long)]
    api: SocketAddr,
    /// Availability zone of this node.
    #[arg(long, default_value = "nova")]
    zone: String,
    /// Voters the cluster keeps: 1, 3 or 5. Taken at init and kept by the cluster; a joining
    /// node's value is not used.
    #[arg(long)]
    voters: Option<usize>,
    /// Seconds a voter may be unreachable before it is replaced.
    #[arg(long)]
    replace_after_secs: Option<u64>,
    /// Minimum seconds between two voter changes.
    #[arg(long)]
    stabilization_secs: Option<u64>,
    /// Raft heartbeat interval in milliseconds (default 50).
    #[arg(long, env = "SHOAL_HEARTBEAT_MS")]
    heartbeat_ms: Option<u64>,
    /// A follower that hears no heartbeat for this long, up to 4/3 of it, campaigns
    /// (milliseconds, default 300).
    #[arg(long, env = "SHOAL_ELECTION_TIMEOUT_MS")]
    election_timeout_ms: Option<u64>,
    /// Raft pre-vote: true (default) or false.
    #[arg(long, env = "SHOAL_PRE_VOTE")]
    pre_vote: Option<bool>,
    /// Lifetime of the tokens this node issues, in seconds (default 24 h).
    #[arg(long)]
    token_ttl_secs: Option<u64>,
    /// Replace the token signing key when it is this many seconds old (default 24 h).
    #[arg(long)]
    key_rotation_secs: Option<u64>,
    /// Seconds a client has to send a request's headers (default 10).
    #[arg(long)]
    http_header_timeout_secs: Option<u64>,
    /// Seconds a client has to send the body of an ordinary call, and the longest pause
    /// within any body (defaults 60 and 30).
    #[arg(long)]
    http_body_timeout_secs: Option<u64>,
    /// The libvirt the compute agent drives (default qemu:///system; `test:///default` is
    /// libvirt's in-memory test hypervisor).
    #[arg(long, env = "SHOAL_LIBVIRT_URI")]
    libvirt_uri: Option<String>,
    /// The libvirt domain type: `auto` (kvm where /dev/kvm opens, else qemu), `kvm` or `qemu`
    /// (TCG, for hosts without usable hardware virtualisation).
    #[arg(long, env = "SHOAL_VIRT_TYPE")]
    virt_type: Option<String>,
    /// Overcommit of this host's vCPUs (`[compute] cpu_allocation_ratio`; unset keeps the
    /// host's own ratio, which starts at `initial_cpu_allocation_ratio`).
    #[arg(long, env = "SHOAL_CPU_ALLOCATION_RATIO")]
    cpu_allocation_ratio: Option<f64>,
    /// The device VXLAN leaves through; with `--vtep`, this node runs a network agent that
    /// programs the VMs' datapath (docs/network.md).
    #[arg(long, requires = "vtep")]
    underlay_device: Option<String>,
    /// This node's VXLAN tunnel address on the underlay.
    #[arg(long, requires = "underlay_device")]
    vtep: Option<std::net::Ipv4Addr>,
    /// A named network namespace (`ip netns`) holding the underlay and the VMs' taps.
    #[arg(long)]
    netns: Option<String>,
    /// The datapath driver: auto, ebpf or kernel.
    #[arg(long, value_parser = ["auto", "ebpf", "kernel"])]
    network_driver: Option<String>,
    /// A physical network this node reaches through a host interface, `PHYSNET:INTERFACE`
    /// (repeatable; `[network] physical_interface_mappings`): flat external networks on it
    /// carry routers' gateways and floating IPs.
    #[arg(long = "physical-interface-mapping")]
    physical_interface_mappings: Vec<String>,
    #[command(flatten)]
    api_tls: ApiTlsArgs,
}

/// How the API listener speaks (the `[api_tls]` config section).
#[derive(clap::Args, Debug)]
struct ApiTlsArgs {
    /// Serve the API over HTTPS: `cluster-ca` (a certificate issued from the cluster CA),
    /// `file` (--api-cert and --api-key), or `off` (plain HTTP, the default).
    #[arg(long, value_name = "MODE")]
    api_tls: Option<config::ApiTls>,
    /// PEM certificate chain, leaf first (with --api-tls file).
    #[arg(long, value_name = "PEM")]
    api_cert: Option<PathBuf>,
    /// PEM private key of the certificate (with --api-tls file).
    #[arg(long, value_name = "PEM")]
    api_key: Option<PathBuf>,
    /// CA bundle clients need to trust --api-cert; admin-openrc exports it as OS_CACERT.
    #[arg(long, value_name = "PEM")]
    api_cacert: Option<PathBuf>,
}

impl ApiTlsArgs {
    /// The `[api_tls]` section these flags describe, or `None` if none was given. Paths are made
    /// absolute: the config file outlives the directory the command ran in.
    fn into_section(self) -> anyhow::Result<Option<config::ApiTlsSection>> {
        let given = self.api_tls.is_some()
            || self.api_cert.is_some()
            || self.api_key.is_some()
            || self.api_cacert.is_some();
        if !given {
            return Ok(None);
        }
        let abs = |p: Option<PathBuf>| p.map(std::path::absolute).transpose();
        Ok(Some(config::ApiTlsSection {
            mode: self.api_tls.unwrap_or(config::ApiTls::File),
            cert: abs(self.api_cert)?,
            key: abs(self.api_key)?,
            cacert: abs(self.api_cacert)?,
        }))
    }
}

#[derive(Subcommand, Debug)]
enum TokenCmd {
    /// Create a join token; the token is printed alone on the last line.
    Create {
        /// Lifetime in seconds (default 24 h).
        #[arg(long)]
        ttl_secs: Option<u64>,
        #[arg(long)]
        description: Option<String>,
        /// How many nodes may join with it (default 1: the token is spent by its first join).
        #[arg(long)]
        uses: Option<u32>,
    },
    /// List join tokens.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a join token by id.
    Revoke { id: String },
}

#[derive(Subcommand, Debug)]
enum DiskCmd {
    /// Create a qcow2 v3 overlay backed by BASE (no qemu-img needed).
    Overlay {
        /// Absolute path of the backing image.
        #[arg(long)]
        backing: PathBuf,
        /// Format of the backing image: raw or qcow2.
        #[arg(long)]
        backing_format: String,
        /// Virtual size: bytes, or with a K/M/G/T suffix (10G); at least the base's size.
        #[arg(long)]
        size: String,
        /// The overlay file to create.
        out: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum ImageCmd {
    /// Prefetch an image into the base-image cache of the node OS_AUTH_URL points at. Shows a
    /// progress bar on a terminal; prints one final line otherwise or with --quiet.
    Pull {
        id: String,
        #[arg(long, short)]
        quiet: bool,
    },
}

#[derive(Subcommand, Debug)]
enum NodeCmd {
    /// Remove a node from the cluster.
    Remove { name: String },
}

#[derive(Subcommand, Debug)]
enum KvCmd {
    /// Write a value.
    Put { key: String, value: String },
    /// Print a value alone (linearizable read).
    Get {
        key: String,
        /// Read the local replica instead of a linearizable read.
        #[arg(long)]
        local: bool,
    },
    /// Print changes under a prefix as they happen, one JSON object a line.
    Watch {
        prefix: String,
        /// Start from this revision (replays history).
        #[arg(long)]
        from_revision: Option<u64>,
    },
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn,quinn=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(logging::SafeStderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

impl NodeArgs {
    fn into_config(self) -> anyhow::Result<(PathBuf, config::NodeConfig)> {
        let mut cfg = config::NodeConfig::new(self.name, self.listen, self.api);
        cfg.zone = self.zone;
        if let Some(v) = self.voters {
            cfg.cluster.voters = v;
        }
        if let Some(s) = self.replace_after_secs {
            cfg.cluster.replace_unreachable_voter_after_secs = s;
        }
        if let Some(s) = self.stabilization_secs {
            cfg.cluster.membership_stabilization_secs = s;
        }
        if let Some(ms) = self.heartbeat_ms {
            cfg.cluster.heartbeat_ms = ms;
        }
        if let Some(ms) = self.election_timeout_ms {
            cfg.cluster.election_timeout_ms = ms;
        }
        if let Some(p) = self.pre_vote {
            cfg.cluster.pre_vote = p;
        }
        if let Some(s) = self.token_ttl_secs {
            cfg.identity.token_ttl_secs = s;
        }
        if let Some(s) = self.key_rotation_secs {
            cfg.identity.key_rotation_secs = s;
        }
        if let Some(s) = self.http_header_timeout_secs {
            cfg.http.header_read_timeout_secs = s;
        }
        if let Some(s) = self.http_body_timeout_secs {
            cfg.http.body_timeout_secs = s;
            cfg.http.body_idle_timeout_secs = s;
        }
        if let Some(uri) = self.libvirt_uri {
            cfg.compute.libvirt_uri = uri;
        }
        if let Some(t) = self.virt_type {
            cfg.compute.virt_type = t;
        }
        if let Some(r) = self.cpu_allocation_ratio {
            cfg.compute.cpu_allocation_ratio = Some(r);
        }
        if self.underlay_device.is_some() {
            cfg.network.underlay_device = self.underlay_device;
            cfg.network.vtep = self.vtep;
        }
        if self.netns.is_some() {
            cfg.network.netns = self.netns;
        }
        if !self.physical_interface_mappings.is_empty() {
            cfg.network.physical_interface_mappings = self.physical_interface_mappings;
        }
        if let Some(d) = self.network_driver {
            cfg.network.driver = match d.as_str() {
                "ebpf" => shoal_network::config::Driver::Ebpf,
                "kernel" => shoal_network::config::Driver::Kernel,
                _ => shoal_network::config::Driver::Auto,
            };
        }
        if let Some(api_tls) = self.api_tls.into_section()? {
            cfg.api_tls = api_tls;
        }
        cfg.validate()?;
        Ok((self.data_dir, cfg))
    }
}

/// The join token from `--token-file`, else SHOAL_JOIN_TOKEN, else `--token` (with a warning:
/// a command line is readable by every local user).
fn join_token(file: Option<PathBuf>, flag: Option<String>) -> anyhow::Result<String> {
    let env = std::env::var("SHOAL_JOIN_TOKEN")
        .ok()
        .filter(|t| !t.trim().is_empty());
    let token = match (file, env, flag) {
        (Some(path), _, _) => std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read the join token from {}", path.display()))?,
        (None, Some(t), _) => t,
        (None, None, Some(t)) => {
            eprintln!(
                "warning: --token puts the join token on the command line, where every local \
                 user can read it; use --token-file or SHOAL_JOIN_TOKEN"
            );
            t
        }
        (None, None, None) => {
            anyhow::bail!("a join token is needed: --token-file PATH, SHOAL_JOIN_TOKEN, or --token")
        }
    };
    Ok(token.trim().to_owned())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cli.command {
            Command::Init(args) => {
                let (dir, cfg) = args.into_config()?;
                server::init(dir, cfg).await
            }
            Command::Join {
                node,
                token_file,
                token,
                peer,
            } => {
                let token = join_token(token_file, token)?;
                let (dir, cfg) = node.into_config()?;
                server::join(dir, cfg, &token, &peer).await
            }
            Command::Start { data_dir, api } => server::start(data_dir, api.into_section()?).await,
            Command::Status { json } => client::status(json).await,
            Command::Token(TokenCmd::Create {
                ttl_secs,
                description,
                uses,
            }) => client::token_create(ttl_secs, description, uses).await,
            Command::Token(TokenCmd::List { json }) => client::token_list(json).await,
            Command::Token(TokenCmd::Revoke { id }) => client::token_revoke(&id).await,
            Command::Node(NodeCmd::Remove { name }) => client::node_remove(&name).await,
            Command::Kv(KvCmd::Put { key, value }) => client::kv_put(&key, &value).await,
            Command::Kv(KvCmd::Get { key, local }) => client::kv_get(&key, local).await,
            Command::Kv(KvCmd::Watch {
                prefix,
                from_revision,
            }) => client::kv_watch(&prefix, from_revision).await,
            Command::Image(ImageCmd::Pull { id, quiet }) => client::image_pull(&id, quiet).await,
            Command::Dev {
                nodes,
                dir,
                libvirt_uri,
                virt_type,
                netns,
                network_driver,
            } => dev::run(nodes, dir, libvirt_uri, virt_type, netns, network_driver).await,
            Command::Disk(DiskCmd::Overlay {
                backing,
                backing_format,
                size,
                out,
            }) => {
                let info =
                    shoal_disk::cli::overlay_command(&backing, &backing_format, &size, &out)?;
                println!(
                    "{}: qcow2 v3, virtual size {} bytes, backed by {}",
                    out.display(),
                    info.virtual_size,
                    backing.display()
                );
                Ok(())
            }
        }
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_json);
    // reqwest and quinn both use rustls; pick the ring provider once for the process.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
