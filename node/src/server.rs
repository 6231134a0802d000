//! Running a node: `init`, `join` and `start` set up the cluster layer, then serve the API and
//! the peer protocol in the foreground until Ctrl-C or SIGTERM, and drain cleanly.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use shoal_consensus::cluster::{Cluster, ClusterOptions};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::api::{self, AppState};
use crate::config::{ApiTls, NodeConfig, CONFIG_FILE};
use shoal_compute::agent::{Agent, AgentConfig};
use shoal_compute::hypervisor::Libvirt;
use shoal_compute::placement::{self, HostSpec};
use shoal_identity::{password, Identity};
use shoal_images::ImageStore;

fn options(dir: &Path, cfg: &NodeConfig) -> ClusterOptions {
    ClusterOptions {
        data_dir: dir.to_owned(),
        name: cfg.name.clone(),
        raft_addr: cfg.listen,
        api_addr: cfg.api,
        zone: cfg.zone.clone(),
        voters: cfg.cluster.voters,
        replace_after: cfg.replace_after(),
        stabilization: Duration::from_secs(cfg.cluster.membership_stabilization_secs),
        snapshot_every: cfg.cluster.snapshot_every_entries,
        heartbeat_ms: cfg.cluster.heartbeat_ms,
        election_timeout_ms: cfg.cluster.election_timeout_ms,
        pre_vote: cfg.cluster.pre_vote,
    }
}

fn refuse_existing(dir: &Path) -> anyhow::Result<()> {
    if dir.join(CONFIG_FILE).exists() {
        bail!(
            "{} already holds a node; restart it with `shoal start --data-dir {}`",
            dir.display(),
            dir.display()
        );
    }
    if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
        bail!(
            "{} is not empty but holds no node (an earlier init or join did not finish?); use an empty directory",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(())
}

/// The address clients should use: the API address, with an unspecified IP replaced by the
/// peer address's IP, or loopback.
fn client_addr(cfg: &NodeConfig) -> std::net::SocketAddr {
    let mut addr = cfg.api;
    if addr.ip().is_unspecified() {
        let ip = if cfg.listen.ip().is_unspecified() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            cfg.listen.ip()
        };
        addr.set_ip(ip);
    }
    addr
}

/// This node's API URL, as the catalog and `admin-openrc` give it.
fn base_url(cfg: &NodeConfig) -> String {
    let scheme = match cfg.api_tls.mode {
        ApiTls::Off => "http",
        ApiTls::ClusterCa | ApiTls::File => "https",
    };
    format!("{scheme}://{}", client_addr(cfg))
}

/// The CA file a client needs to trust this node's API certificate, if any.
fn client_cacert(dir: &Path, cfg: &NodeConfig) -> anyhow::Result<Option<PathBuf>> {
    Ok(match cfg.api_tls.mode {
        ApiTls::Off => None,
        ApiTls::ClusterCa => Some(
            std::path::absolute(dir.join("tls").join(api::tls::CLUSTER_CA))
                .context("cannot resolve the data directory's path")?,
        ),
        ApiTls::File => cfg.api_tls.cacert.clone(),
    })
}

fn write_openrc(dir: &Path, cfg: &NodeConfig, password: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join("admin-openrc");
    let cacert = match client_cacert(dir, cfg)? {
        Some(p) => format!("export OS_CACERT={}\n", p.display()),
        None => String::new(),
    };
    let text = format!(
        "export OS_AUTH_URL={}/identity/v3\n\
         export OS_USERNAME=admin\n\
         export OS_PASSWORD={password}\n\
         export OS_PROJECT_NAME=admin\n\
         export OS_USER_DOMAIN_NAME=Default\n\
         export OS_PROJECT_DOMAIN_NAME=Default\n\
         export OS_IDENTITY_API_VERSION=3\n\
         export OS_REGION_NAME={}\n\
         {cacert}",
        base_url(cfg),
        cfg.region
    );
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    Ok(path)
}

pub async fn init(dir: PathBuf, cfg: NodeConfig) -> anyhow::Result<()> {
    refuse_existing(&dir)?;
    let api = bind_api(&cfg).await?;
    let cluster = Cluster::init(options(&dir, &cfg))
        .await
        .context("cannot create the cluster")?;
    let identity = identity_of(&cluster, &cfg);
    let admin_password = password::generate();
    identity
        .bootstrap(&admin_password)
        .await
        .context("cannot create the admin credential")?;
    let openrc = write_openrc(&dir, &cfg, &admin_password)?;
    let (_, token) = cluster
        .create_join_token(
            Duration::from_secs(24 * 3600),
            1,
            "created by init".into(),
            "admin".into(),
        )
        .await
        .context("cannot create the first join token")?;
    // The config file is written last: its presence means the node is complete.
    cfg.save(&dir)?;
    println!("cluster created; node {} is its first voter", cfg.name);
    println!("admin credentials: {}", openrc.display());
    println!(
        "join one more node with: SHOAL_JOIN_TOKEN=TOKEN shoal join {} ... \
         (single-use; `shoal token create --uses N` admits N nodes)",
        cfg.listen
    );
    println!("{token}");
    serve(dir, cfg, cluster, identity, api).await
}

pub async fn join(dir: PathBuf, cfg: NodeConfig, token: &str, peer: &str) -> anyhow::Result<()> {
    refuse_existing(&dir)?;
    let api = bind_api(&cfg).await?;
    let cluster = Cluster::join(options(&dir, &cfg), peer, token)
        .await
        .with_context(|| format!("cannot join the cluster through {peer}"))?;
    cfg.save(&dir)?;
    println!("node {} joined the cluster as a learner", cfg.name);
    let identity = identity_of(&cluster, &cfg);
    serve(dir, cfg, cluster, identity, api).await
}

/// Restarts a node; `api_tls` replaces the `[api_tls]` section of its configuration when given
/// (and is saved, so later restarts keep it).
pub async fn start(
    dir: PathBuf,
    api_tls: Option<crate::config::ApiTlsSection>,
) -> anyhow::Result<()> {
    let mut cfg = NodeConfig::load(&dir)?;
    let changed = api_tls.is_some();
    if let Some(api_tls) = api_tls {
        cfg.api_tls = api_tls;
        cfg.validate()?;
    }
    let api = bind_api(&cfg).await?;
    let cluster = Cluster::start(options(&dir, &cfg))
        .await
        .context("cannot start the node")?;
    if changed {
        cfg.save(&dir)?;
    }
    let identity = identity_of(&cluster, &cfg);
    serve(dir, cfg, cluster, identity, api).await
}

fn identity_of(cluster: &Cluster, cfg: &NodeConfig) -> Identity {
    Identity::new(
        cluster.clone(),
        cfg.name.clone(),
        cfg.identity.token_ttl_secs,
    )
}

/// The bound API socket, and its TLS configuration when it is known before the cluster is
/// (an operator's files are checked first, so a bad path fails before anything is created).
struct ApiBinding {
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
}

async fn bind_api(cfg: &NodeConfig) -> anyhow::Result<ApiBinding> {
    let tls = match (&cfg.api_tls.mode, &cfg.api_tls.cert, &cfg.api_tls.key) {
        (ApiTls::File, Some(cert), Some(key)) => Some(api::tls::load_operator_files(
            cert,
            key,
            cfg.api_tls.cacert.as_deref(),
        )?),
        _ => None,
    };
    let listener = tokio::net::TcpListener::bind(cfg.api)
        .await
        .with_context(|| format!("cannot listen on the API address {}", cfg.api))?;
    Ok(ApiBinding { listener, tls })
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler installs");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// This machine as a compute host: detected capacity, with the `[host]` overrides.
fn host_spec(dir: &Path, cfg: &NodeConfig) -> anyhow::Result<HostSpec> {
    let mut cap = placement::detect_capacity(dir).with_context(|| {
        format!(
            "cannot detect the capacity of this host ({})",
            dir.display()
        )
    })?;
    cap.vcpus = cfg.host.vcpus.unwrap_or(cap.vcpus);
    cap.ram_mb = cfg.host.ram_mb.unwrap_or(cap.ram_mb);
    cap.disk_gb = cfg.host.disk_gb.unwrap_or(cap.disk_gb);
    let c = &cfg.compute;
    let mut spec = HostSpec::from_capacity(cap, &cfg.zone);
    spec.vcpus_reserved = c.reserved_host_cpus;
    spec.ram_mb_reserved = c.reserved_host_memory_mb;
    spec.disk_mb_reserved = c.reserved_host_disk_mb;
    spec.ratio_overrides = [
        c.cpu_allocation_ratio,
        c.ram_allocation_ratio,
        c.disk_allocation_ratio,
    ];
    let initial = &mut spec.initial_ratios;
    initial.cpu = c.initial_cpu_allocation_ratio;
    initial.ram = c.initial_ram_allocation_ratio;
    initial.disk = c.initial_disk_allocation_ratio;
    Ok(spec)
}

/// Connects to libvirt and builds the compute agent; records the hypervisor's type and version
/// in this host's registration.
async fn compute_agent(
    cfg: &NodeConfig,
    cluster: &Cluster,
    state: &AppState,
    instances_path: &Path,
    spec: &mut HostSpec,
) -> anyhow::Result<Agent> {
    let c = &cfg.compute;
    let hv = Libvirt::connect(&c.libvirt_uri).await.with_context(|| {
        format!(
            "the compute agent needs libvirt at {} (start libvirtd, see docs/compute.md, or set \
             [compute] libvirt_uri)",
            c.libvirt_uri
        )
    })?;
    let (hv_type, hv_version) = hv.hypervisor().await?;
    spec.hypervisor_type = hv_type;
    spec.hypervisor_version = hv_version;
    let virt_type = match c.virt_type.as_str() {
        "auto" => shoal_compute::hypervisor::detect_virt_type().to_owned(),
        other => other.to_owned(),
    };
    tracing::info!(libvirt = %c.libvirt_uri, %virt_type, "compute agent connected to libvirt");
    let agent = Agent::new(
        cluster.clone(),
        state.state.table(shoal_state::tables::SERVERS),
        hv,
        Arc::new(AgentImages(state.clone())),
        AgentConfig {
            host: cfg.name.clone(),
            instances_path: instances_path.to_owned(),
            virt_type,
            stop_grace: Duration::from_secs(c.shutdown_timeout_secs),
            sync_interval: Duration::from_secs(c.sync_power_state_interval_secs),
            orphan_grace: Duration::from_secs(c.orphan_grace_secs),
            vif_plugging_timeout: (cfg.network.agent_enabled() && c.vif_plugging_timeout_secs > 0)
                .then(|| Duration::from_secs(c.vif_plugging_timeout_secs)),
            force_config_drive: c.force_config_drive,
            image_cache_interval: Duration::from_secs(c.image_cache_manager_interval),
            remove_unused_min_age: Duration::from_secs(
                c.remove_unused_original_minimum_age_seconds,
            ),
            shelved_offload_time: u64::try_from(c.shelved_offload_time)
                .ok()
                .map(Duration::from_secs),
            resize_confirm_window: (c.resize_confirm_window > 0)
                .then(|| Duration::from_secs(c.resize_confirm_window)),
        },
    )
    .with_context(|| format!("cannot create {}", instances_path.display()))?;
    Ok(agent)
}

async fn serve(
    dir: PathBuf,
    cfg: NodeConfig,
    cluster: Cluster,
    identity: Identity,
    api: ApiBinding,
) -> anyhow::Result<()> {
    let tls = match cfg.api_tls.mode {
        ApiTls::ClusterCa => Some(api::tls::issue_from_cluster_ca(
            &dir.join("tls"),
            &cfg.name,
            api::tls::certificate_names(client_addr(&cfg).ip(), cfg.api),
        )?),
        ApiTls::File | ApiTls::Off => api.tls,
    };
    let stop = CancellationToken::new();
    let instances_path = cfg
        .compute
        .instances_path
        .clone()
        .unwrap_or_else(|| dir.join("instances"));
    let state = AppState {
        cluster: cluster.clone(),
        state: shoal_state::State::new(Arc::new(cluster.clone())),
        network: shoal_network::NetworkService::new(
            shoal_state::State::new(Arc::new(cluster.clone())),
            cfg.network.clone(),
        ),
        identity: identity.clone(),
        metrics: Arc::new(api::metrics::Metrics::default()),
        base_url: base_url(&cfg),
        region: cfg.region.clone(),
        images: ImageStore::open(cluster.clone(), &dir, cfg.images.clone(), &instances_path)
            .with_context(|| format!("cannot open the image store in {}", dir.display()))?,
        instances_path: instances_path.clone(),
        hosts: shoal_compute::host_view::HostView::new(cluster.clone()),
        deleted_server_retention: Duration::from_secs(cfg.compute.deleted_server_retention_secs),
        allow_resize_to_same_host: cfg.compute.allow_resize_to_same_host,
    };
    let mut host_spec = host_spec(&dir, &cfg)?;
    let agent = compute_agent(&cfg, &cluster, &state, &instances_path, &mut host_spec).await?;
    // The node's long-running tasks, in one set: each runs until `stop`, so one that ends
    // earlier (an error, a panic) is a failure that stops the whole node with a non-zero exit
    // instead of leaving it half alive.
    let mut tasks: JoinSet<(&'static str, Result<(), String>)> = JoinSet::new();
    {
        let (identity, stop) = (identity.clone(), stop.clone());
        tasks.spawn(async move {
            identity.run_keyring_sync(stop.cancelled_owned()).await;
            ("token key ring sync", Ok(()))
        });
    }
    {
        let (identity, stop) = (identity.clone(), stop.clone());
        let every = cfg.identity.key_rotation_secs;
        tasks.spawn(async move {
            identity
                .run_key_rotation(every, stop.cancelled_owned())
                .await;
            ("signing key rotation", Ok(()))
        });
    }
    {
        let (images, stop) = (state.images.clone(), stop.clone());
        tasks.spawn(async move {
            images.run_maintenance(stop.cancelled_owned()).await;
            ("image maintenance", Ok(()))
        });
    }
    {
        let (cluster, stop) = (cluster.clone(), stop.clone());
        let retention = state.deleted_server_retention;
        tasks.spawn(async move {
            shoal_compute::usage::run_purge(cluster, retention, stop.cancelled_owned()).await;
            ("deleted-server purge", Ok(()))
        });
    }
    {
        let (hosts, stop) = (state.hosts.clone(), stop.clone());
        tasks.spawn(async move {
            hosts.run(stop.cancelled_owned()).await;
            ("host view", Ok(()))
        });
    }
    {
        let stop = stop.clone();
        tasks.spawn(async move {
            let r = agent
                .run(stop.cancelled_owned())
                .await
                .map_err(|e| e.to_string());
            ("compute agent", r)
        });
    }
    if cfg.network.agent_enabled() {
        let netns = cfg
            .network
            .netns
            .as_ref()
            .map(|n| PathBuf::from("/run/netns").join(n));
        let metadata = crate::metadata::MetadataService::start(state.state.clone(), netns.clone())
            .await
            .context("cannot start the metadata service")?;
        let dhcp = shoal_network::dhcp::DhcpServer::start(netns)
            .context("cannot start the DHCP server")?;
        let hooks: Vec<Arc<dyn shoal_network::agent::PortHooks>> =
            vec![Arc::new(metadata), Arc::new(dhcp)];
        let agent = shoal_network::agent::NetworkAgent::new(
            cfg.name.clone(),
            cfg.network.clone(),
            cluster.clone(),
            hooks,
        );
        let stop = stop.clone();
        tasks.spawn(async move {
            let r = agent
                .run(stop.cancelled_owned())
                .await
                .map_err(|e| e.to_string());
            ("network agent", r)
        });
    } else {
        tracing::info!("no [network] underlay_device and vtep: this node runs no network agent");
    }
    {
        let (http, stop) = (cfg.http, stop.clone());
        tasks.spawn(async move {
            let r = api::serve(
                api.listener,
                tls,
                state,
                (&http).into(),
                stop.cancelled_owned(),
            )
            .await
            .map_err(|e| e.to_string());
            ("API server", r)
        });
    }
    {
        let (cluster, stop) = (cluster.clone(), stop.clone());
        tasks.spawn(async move {
            let r = cluster
                .run(stop.cancelled_owned())
                .await
                .map_err(|e| e.to_string());
            ("cluster", r)
        });
    }
    // Registration ends by itself once it succeeded; it is not one of the node's lifelong tasks.
    let register = tokio::spawn(placement::register_self(
        cluster.clone(),
        cfg.name.clone(),
        host_spec,
        stop.clone().cancelled_owned(),
    ));
    tracing::info!(name = %cfg.name, api = %base_url(&cfg), peer = %cfg.listen, "node running");

    let failure = tokio::select! {
        _ = shutdown_signal() => None,
        Some(done) = tasks.join_next() => Some(match done {
            Ok((name, Ok(()))) => format!("the {name} task ended on its own"),
            Ok((name, Err(e))) => format!("the {name} task failed: {e}"),
            Err(e) if e.is_panic() => format!("a task panicked: {e}"),
            Err(e) => format!("a task was cancelled: {e}"),
        }),
    };
    match &failure {
        None => tracing::info!("stopping"),
        Some(why) => tracing::error!(reason = %why, "stopping the node"),
    }
    stop.cancel();
    let _ = register.await;
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok((_, Ok(()))) => {}
            Ok((name, Err(e))) => {
                tracing::warn!(task = name, error = %e, "task stopped with an error")
            }
            Err(e) => tracing::warn!(error = %e, "task failed while stopping"),
        }
    }
    cluster.shutdown().await;
    tracing::info!("stopped");
    match failure {
        None => Ok(()),
        Some(why) => bail!("the node stopped because {why}"),
    }
}

/// The compute agent's base images come from this node's image store: pulled from peers into
/// the cache, and leased while an instance of this node uses them; its snapshots go in through
/// the Image API's upload path. (The two services meet only here, in the binary that wires
/// them.)
struct AgentImages(crate::api::AppState);

impl shoal_compute::agent::ImageSource for AgentImages {
    fn fetch<'a>(
        &'a self,
        image_id: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<std::path::PathBuf, String>> {
        Box::pin(async move {
            self.0
                .images
                .pull(image_id)
                .await
                .map_err(|e| shoal_images::chain(e.as_ref()))
        })
    }

    fn lease(&self, image_id: &str) -> Box<dyn std::any::Any + Send + Sync> {
        Box::new(self.0.images.lease(image_id))
    }

    fn upload<'a>(
        &'a self,
        image_id: &'a str,
        path: &'a std::path::Path,
        disk_format: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            crate::api::glance::file::ingest_file(&self.0, image_id, path, disk_format)
                .await
                .map_err(|e| e.message)
        })
    }

    fn delete<'a>(
        &'a self,
        image_id: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            crate::api::glance::images::delete_for_service(&self.0, image_id)
                .await
                .map_err(|e| e.message)
        })
    }

    fn rotate_backups<'a>(
        &'a self,
        server: &'a str,
        backup_type: &'a str,
        rotation: u64,
    ) -> futures::future::BoxFuture<'a, Result<Vec<String>, String>> {
        Box::pin(async move {
            let mut backups: Vec<shoal_images::record::ImageRecord> = self
                .0
                .state
                .table::<shoal_images::record::ImageRecord>(shoal_state::tables::IMAGES)
                .list("")
                .await
                .map_err(|e| e.to_string())?
                .into_values()
                .filter(|img| {
                    let p = |k: &str| img.properties.get(k).map(String::as_str);
                    p("image_type") == Some("backup")
                        && p("backup_type") == Some(backup_type)
                        && p("instance_uuid") == Some(server)
                })
                .collect();
            // Newest first, as Nova's `_rotate_backups` sorts them; the excess is the oldest.
            backups.sort_by_key(|img| std::cmp::Reverse(img.created_at));
            let keep = usize::try_from(rotation).unwrap_or(usize::MAX);
            let mut gone = Vec::new();
            for img in backups.into_iter().skip(keep) {
                crate::api::glance::images::delete_for_service(&self.0, &img.id)
                    .await
                    .map_err(|e| e.message)?;
                gone.push(img.id);
            }
            Ok(gone)
        })
    }

    fn pull_migration_file<'a>(
        &'a self,
        node: &'a str,
        server: &'a str,
        index: u8,
        out: &'a std::path::Path,
    ) -> futures::future::BoxFuture<'a, Result<bool, String>> {
        Box::pin(async move {
            let id = uuid::Uuid::parse_str(server).map_err(|e| e.to_string())?;
            shoal_images::peer::pull_migration_file(&self.0.cluster, node, &id, index, out)
                .await
                .map_err(|e| shoal_images::chain(&e))
        })
    }

    fn age_unused(
        &self,
        keep: std::collections::BTreeSet<String>,
        min_age: Duration,
    ) -> futures::future::BoxFuture<'_, Result<Vec<String>, String>> {
        Box::pin(async move {
            self.0
                .images
                .age_unused(keep, min_age)
                .await
                .map_err(|e| e.to_string())
        })
    }
}
