//! The compute agent: every node runs one. It watches the `servers` table and drives each
//! server placed on its own node to the state its row asks for, through libvirt.
//!
//! - **No polling of the cluster, no lost event.** At start (and whenever the watch reports
//!   its history compacted) the agent lists every row and reconciles each of its own; then it
//!   follows the watch from the listing's revision. After a crash the rows themselves say
//!   what is pending, so a restart loses nothing.
//! - **One worker per server.** Changes of one server are handled in order by its worker;
//!   different servers progress independently. A worker always acts on the newest row.
//! - **Every outcome through Raft, conditioned on the row.** A result is written only if the
//!   row is still the one acted on; if the user asked for something else meanwhile, the
//!   worker sees the new row next and acts on that.
//! - **Power-state sync.** Every `sync_interval` each server is reconciled again against
//!   libvirt, so a domain that died or was stopped outside Shoal shows up in its row.
//! - **Orphans.** A domain named `instance-*` whose uuid no server row names is reported and,
//!   after `orphan_grace`, destroyed. Domains of other nodes' servers are left alone, so nodes
//!   may share one libvirtd.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::StreamExt;
use shoal_consensus::cluster::Cluster;
use shoal_disk::qcow2::{create_overlay, BackingFormat, OverlaySpec};
use shoal_state::{tables, StateError, Table, Versioned};
use shoal_types::EventKind;
use tokio::sync::watch;

use crate::domain::DomainSpec;
use crate::hypervisor::{DomainState, HypervisorError, Libvirt};
use crate::placement;
use shoal_state::time::now_rfc3339;

use crate::server::{power, Fault, ServerRecord, Shelved, TaskState, VmState};

/// How long a create may sit in BUILD/scheduling (its rows written, no placement committed)
/// before it is taken for interrupted. A live create places within seconds.
pub const SCHEDULING_DEADLINE: Duration = Duration::from_secs(120);

/// Where the agent gets base images: the binary hands it the node's image store.
pub trait ImageSource: Send + Sync + 'static {
    /// Ensures `image_id` is in this node's cache (pulling it from peers) and returns its path.
    fn fetch<'a>(&'a self, image_id: &'a str) -> BoxFuture<'a, Result<PathBuf, String>>;
    /// Keeps `image_id` from eviction while the returned value lives.
    fn lease(&self, image_id: &str) -> Box<dyn std::any::Any + Send + Sync>;
    /// Removes cached images unused for `min_age` that are not in `keep` (which this node's
    /// instances use) and not leased; marks the others used now. Returns the images removed.
    fn age_unused(
        &self,
        keep: BTreeSet<String>,
        min_age: Duration,
    ) -> BoxFuture<'_, Result<Vec<String>, String>>;
    /// Takes the standalone disk image at `path` into image `image_id` (which the API created
    /// `queued`) through the Image API's own upload path, as `disk_format`; returns once the
    /// image is `active` (checksums, replicas and all), or why not.
    fn upload<'a>(
        &'a self,
        image_id: &'a str,
        path: &'a Path,
        disk_format: &'a str,
    ) -> BoxFuture<'a, Result<(), String>>;
    /// Deletes image `image_id` on the cloud's behalf: a snapshot that failed, a shelved
    /// server's image once it is no longer needed. An image already gone is no error.
    fn delete<'a>(&'a self, image_id: &'a str) -> BoxFuture<'a, Result<(), String>>;
    /// Nova's `_rotate_backups`: of the images with `image_type` `backup`, this `backup_type`
    /// and `instance_uuid` `server`, keeps the newest `rotation` and deletes the others;
    /// returns the ids deleted.
    fn rotate_backups<'a>(
        &'a self,
        server: &'a str,
        backup_type: &'a str,
        rotation: u64,
    ) -> BoxFuture<'a, Result<Vec<String>, String>>;
    /// Copies file `index` of [`MIGRATION_FILES`] that a resize of `server` set aside on node
    /// `node` (its `<uuid>_resize` directory) to `out`, over the members' data transport.
    /// `Ok(false)`: the node has no such file.
    fn pull_migration_file<'a>(
        &'a self,
        node: &'a str,
        server: &'a str,
        index: u8,
        out: &'a Path,
    ) -> BoxFuture<'a, Result<bool, String>>;
}

/// The files of an instance directory a resize moves to its target, by index (the peer
/// transport names them by index: `shoal_images::peer::MIGRATION_FILES` is the same list).
pub const MIGRATION_FILES: [&str; 2] = ["disk", "disk.config"];

/// Where a resize sets the source's instance directory aside until it is confirmed or
/// reverted (Nova's `<uuid>_resize`).
pub fn resize_dir(instances: &Path, id: &str) -> PathBuf {
    instances.join(format!("{id}_resize"))
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This node's host name, as in the `hosts` table.
    pub host: String,
    /// One directory per server under it: the overlay `disk` and `console.log`.
    pub instances_path: PathBuf,
    /// `kvm` or `qemu`.
    pub virt_type: String,
    /// How long a stop or a soft reboot waits for the guest to power off before forcing it.
    pub stop_grace: Duration,
    /// How often every server is checked against libvirt.
    pub sync_interval: Duration,
    /// How long a domain no row claims is kept before it is destroyed.
    pub orphan_grace: Duration,
    /// How long a spawn waits for every port to go ACTIVE (programmed by this node's network
    /// agent) before the server goes to ERROR; `None` when no network agent runs here.
    pub vif_plugging_timeout: Option<Duration>,
    /// Every server built here gets a config drive (Nova's `force_config_drive`).
    pub force_config_drive: bool,
    /// How often unused base files are aged (Nova's `image_cache_manager_interval`).
    pub image_cache_interval: Duration,
    /// How long a base file stays unused before it is removed (Nova's
    /// `remove_unused_original_minimum_age_seconds`).
    pub remove_unused_min_age: Duration,
    /// How long a shelved server keeps its host before it is offloaded (Nova's
    /// `shelved_offload_time`): zero offloads at once, `None` (Nova's -1) never.
    pub shelved_offload_time: Option<Duration>,
    /// How long a resized server waits for `confirmResize` before it is confirmed on its own
    /// (Nova's `resize_confirm_window`); `None` never.
    pub resize_confirm_window: Option<Duration>,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("watching the servers table failed: {0}")]
    Watch(String),
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
}

/// The agent's handle; cheap to clone (every worker holds one).
#[derive(Clone)]
pub struct Agent {
    inner: Arc<Inner>,
}

struct Inner {
    cluster: Cluster,
    store: Arc<dyn shoal_state::Store>,
    servers: Table<ServerRecord>,
    hv: Libvirt,
    images: Arc<dyn ImageSource>,
    cfg: AgentConfig,
    disk_cache: &'static str,
    /// Domain names this agent handed out, to the server each went to: two rows written by
    /// one transaction (a multi-create, a batch of placements) share a revision, and libvirt
    /// names must differ on a host.
    names: std::sync::Mutex<HashMap<String, String>>,
    /// Outcomes waiting to be written, and the right to write them: see [`Agent::write_row`].
    results: std::sync::Mutex<Vec<PendingRow>>,
    writer: tokio::sync::Mutex<()>,
}

/// A row an agent step wants written if it is still at `revision`, and who waits for it.
struct PendingRow {
    key: String,
    value: Vec<u8>,
    revision: u64,
    done: tokio::sync::oneshot::Sender<Result<Option<u64>, StateError>>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("host", &self.inner.cfg.host)
            .field("libvirt", &self.inner.hv)
            .finish()
    }
}

type Slot = watch::Sender<Option<Versioned<ServerRecord>>>;

impl Agent {
    pub fn new(
        cluster: Cluster,
        servers: Table<ServerRecord>,
        hv: Libvirt,
        images: Arc<dyn ImageSource>,
        cfg: AgentConfig,
    ) -> std::io::Result<Agent> {
        std::fs::create_dir_all(&cfg.instances_path)?;
        let disk_cache = if supports_direct_io(&cfg.instances_path) {
            "none"
        } else {
            "writethrough"
        };
        Ok(Agent {
            inner: Arc::new(Inner {
                store: Arc::new(cluster.clone()),
                cluster,
                servers,
                hv,
                images,
                cfg,
                disk_cache,
                names: Default::default(),
                results: Default::default(),
                writer: Default::default(),
            }),
        })
    }

    /// Runs until `shutdown` resolves. Returns an error only when the cluster's watch fails
    /// in a way a re-list cannot mend.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), AgentError> {
        tokio::pin!(shutdown);
        let mut workers: HashMap<String, Slot> = HashMap::new();
        let mut orphans: HashMap<String, Instant> = HashMap::new();
        loop {
            let listing = loop {
                match self.inner.servers.list("").await {
                    Ok(l) => break l,
                    Err(StateError::Unavailable(e)) => {
                        tracing::debug!(error = %e, "servers not listable yet");
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                            _ = &mut shutdown => return Ok(()),
                        }
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            let mut seen = HashSet::new();
            for (id, row) in listing.rows {
                if self.involves(&row.value) {
                    seen.insert(id.clone());
                    self.dispatch(&mut workers, id, Some(row));
                }
            }
            // Rows that went while the watch was down: their workers stop.
            let gone: Vec<String> = workers
                .keys()
                .filter(|k| !seen.contains(*k))
                .cloned()
                .collect();
            for id in gone {
                self.dispatch(&mut workers, id, None);
            }
            self.sweep_orphans(&workers, &mut orphans).await;
            let mut stream = match self
                .inner
                .cluster
                .watch(tables::SERVERS, "", listing.revision + 1)
                .await
            {
                Ok(s) => s,
                Err(shoal_consensus::cluster::WatchError::Compacted { .. }) => continue,
                Err(e) => return Err(AgentError::Watch(e.to_string())),
            };
            let mut tick = tokio::time::interval(self.inner.cfg.sync_interval);
            tick.tick().await;
            let mut age_tick = tokio::time::interval(self.inner.cfg.image_cache_interval);
            age_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            age_tick.tick().await;
            loop {
                tokio::select! {
                    ev = stream.next() => match ev {
                        Some(Ok(ev)) => match ev.kind {
                            // Most rows are other nodes' servers: a peek at the hosts
                            // skips decoding those whole (every node sees every row).
                            EventKind::Put(row)
                                if !workers.contains_key(&ev.key)
                                    && Hosts::of(&row.value)
                                        .is_some_and(|h| !h.involve(&self.inner.cfg.host)) => {}
                            EventKind::Put(row) => {
                                match self.inner.servers.decode(&ev.key, &row) {
                                    Ok(v) if self.involves(&v.value) => {
                                        self.dispatch(&mut workers, ev.key, Some(v));
                                    }
                                    // Placed elsewhere now (offloaded, or unshelved on
                                    // another host): this node's worker stops.
                                    Ok(_) if workers.contains_key(&ev.key) => {
                                        self.dispatch(&mut workers, ev.key, None);
                                    }
                                    Ok(_) => {}
                                    Err(e) => tracing::error!(error = %e, "skipping a server row"),
                                }
                            }
                            EventKind::Delete => {
                                if workers.contains_key(&ev.key) {
                                    self.dispatch(&mut workers, ev.key, None);
                                }
                            }
                        },
                        Some(Err(shoal_consensus::cluster::WatchError::Compacted { oldest })) => {
                            tracing::info!(oldest, "server watch compacted; listing again");
                            break;
                        }
                        Some(Err(e)) => return Err(AgentError::Watch(e.to_string())),
                        None => return Err(AgentError::Watch("the watch stream ended".into())),
                    },
                    _ = tick.tick() => {
                        for slot in workers.values() {
                            slot.send_modify(|_| {});
                        }
                        self.sweep_orphans(&workers, &mut orphans).await;
                        self.sweep_interrupted_creates().await;
                    }
                    _ = age_tick.tick() => self.age_base_files().await,
                    _ = &mut shutdown => return Ok(()),
                }
            }
        }
    }

    /// Hands the newest row (or its deletion) to the server's worker, starting one if needed.
    fn dispatch(
        &self,
        workers: &mut HashMap<String, Slot>,
        id: String,
        row: Option<Versioned<ServerRecord>>,
    ) {
        if let Some(slot) = workers.get(&id) {
            if slot.send(row.clone()).is_ok() {
                if row.is_none() {
                    workers.remove(&id);
                }
                return;
            }
            workers.remove(&id);
        }
        let Some(row) = row else { return };
        let (tx, rx) = watch::channel(Some(row));
        workers.insert(id, tx);
        tokio::spawn(self.clone().worker(rx));
    }

    async fn worker(self, mut rx: watch::Receiver<Option<Versioned<ServerRecord>>>) {
        // Held for what they keep alive: dropping a lease lets its image age out.
        let mut _leases: Vec<Box<dyn std::any::Any + Send + Sync>> = Vec::new();
        let mut leased: Vec<String> = Vec::new();
        loop {
            let current = rx.borrow_and_update().clone();
            let Some(row) = current else { return };
            // Leases follow the row's images: a rebuild onto another image moves them.
            let images = self.image_ids(&row.value);
            if leased != images && row.value.task_state != Some(TaskState::Deleting) {
                _leases = images.iter().map(|i| self.inner.images.lease(i)).collect();
                leased = images;
            }
            let id = row.value.id.clone();
            if let Err(e) = self.reconcile(row).await {
                tracing::warn!(server = %id, error = %e, "reconcile failed; retried on the next change or sync");
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Whether this node has work for the row: the server is placed here, a resize in
    /// progress moves it from or to here, or it was evacuated from here and this node's copy
    /// is still to be removed.
    fn involves(&self, s: &ServerRecord) -> bool {
        let me = self.inner.cfg.host.as_str();
        s.host.as_deref() == Some(me)
            || s.migration
                .as_ref()
                .is_some_and(|m| m.source_host == me || m.dest_host == me)
            || s.evacuated_from(me)
    }

    fn image_ids(&self, s: &ServerRecord) -> Vec<String> {
        let mut ids = vec![s.image.id.clone()];
        ids.extend(s.image.kernel_id.clone());
        ids.extend(s.image.ramdisk_id.clone());
        ids
    }

    fn dir(&self, id: &str) -> PathBuf {
        self.inner.cfg.instances_path.join(id)
    }

    /// One step towards what the row asks for, then the outcome written to the row.
    async fn reconcile(&self, row: Versioned<ServerRecord>) -> Result<(), AgentError> {
        let s = &row.value;
        let started = now_rfc3339();
        let hv = &self.inner.hv;
        if s.host.as_deref() != Some(self.inner.cfg.host.as_str()) {
            // The other end of a resize: only its own steps are done here.
            return self.migration_step(&row, &started).await;
        }
        if let (Some(request), None) = (&s.crash_dump, s.task_state) {
            return self.crash_dump(&row, request, &started).await;
        }
        match (s.vm_state, s.task_state) {
            (_, Some(TaskState::Deleting)) => self.delete(&row).await,
            (_, Some(TaskState::Rescuing)) => self.rescue(&row, &started).await,
            (_, Some(TaskState::Unrescuing)) => self.unrescue(&row, &started).await,
            // Its rescue domain is what runs; nothing to reconcile until the unrescue.
            (VmState::Rescued, None) => Ok(()),
            (_, Some(TaskState::ResizePrep)) => self.resize_prep(&row, &started).await,
            // The source set the disks aside earlier and this node restarted part way, or the
            // target (this node too, for a resize to the same host) takes over.
            (_, Some(TaskState::ResizeMigrating)) => self.resize_prep(&row, &started).await,
            (_, Some(TaskState::ResizeMigrated | TaskState::ResizeFinish)) => {
                self.migration_step(&row, &started).await
            }
            (_, Some(TaskState::ResizeReverting | TaskState::ResizeConfirming)) => {
                self.migration_step(&row, &started).await
            }
            (VmState::Resized, None) => self.confirm_when_due(&row).await,
            (VmState::Building, _) | (_, Some(TaskState::Spawning)) => {
                let outcome = self.spawn(s, row.revision).await;
                let forced = self.inner.cfg.force_config_drive;
                self.finish_task(&row, &started, |r| match &outcome {
                    Ok(name) => {
                        // As Nova's compute manager records a forced config drive.
                        r.config_drive |= forced;
                        r.vm_state = VmState::Active;
                        r.power_state = power::RUNNING;
                        r.instance_name = Some(name.clone());
                        r.launched_at = Some(now_rfc3339());
                        r.fault = None;
                    }
                    Err(e) => fail(r, e),
                })
                .await
            }
            (_, Some(TaskState::PoweringOff)) => {
                let outcome = hv.stop(&s.id, self.inner.cfg.stop_grace).await;
                self.settle(&row, &started, outcome, VmState::Stopped, power::SHUTDOWN)
                    .await
            }
            (_, Some(TaskState::PoweringOn)) => {
                let outcome = self.power_on(s, row.revision).await;
                self.settle(&row, &started, outcome, VmState::Active, power::RUNNING)
                    .await
            }
            (_, Some(task @ (TaskState::Rebooting | TaskState::RebootingHard))) => {
                let grace = if task == TaskState::Rebooting {
                    self.inner.cfg.stop_grace
                } else {
                    Duration::ZERO
                };
                let outcome = async {
                    hv.stop(&s.id, grace).await.map_err(|e| e.to_string())?;
                    // A hard reboot of a suspended server boots afresh, as Nova's does.
                    hv.discard_saved(&s.id).await.map_err(|e| e.to_string())?;
                    self.power_on(s, row.revision).await
                }
                .await;
                self.settle(&row, &started, outcome, VmState::Active, power::RUNNING)
                    .await
            }
            (_, Some(TaskState::Pausing)) => {
                let outcome = hv.pause(&s.id).await;
                self.settle(&row, &started, outcome, VmState::Paused, power::PAUSED)
                    .await
            }
            (_, Some(TaskState::Unpausing)) => {
                let outcome = hv.unpause(&s.id).await;
                self.settle(&row, &started, outcome, VmState::Active, power::RUNNING)
                    .await
            }
            (_, Some(TaskState::Suspending)) => {
                // Libvirt's managed save leaves the domain shut off, which Nova shows as
                // power state SHUTDOWN.
                let outcome = hv.suspend(&s.id).await;
                self.settle(&row, &started, outcome, VmState::Suspended, power::SHUTDOWN)
                    .await
            }
            (_, Some(TaskState::Resuming)) => {
                // Starting a domain with a managed-save image restores it.
                let outcome = self.power_on(s, row.revision).await;
                self.settle(&row, &started, outcome, VmState::Active, power::RUNNING)
                    .await
            }
            (_, Some(TaskState::Rebuilding)) => self.rebuild(&row, &started).await,
            (_, Some(task @ (TaskState::ImageSnapshot | TaskState::ImageBackup))) => {
                self.snapshot(&row, task, &started).await
            }
            (_, Some(TaskState::Shelving)) => self.shelve(&row, &started).await,
            (
                _,
                Some(
                    task @ (TaskState::ImagePendingUpload
                    | TaskState::ImageUploading
                    | TaskState::ShelvingImagePendingUpload
                    | TaskState::ShelvingImageUploading),
                ),
            ) => self.snapshot_interrupted(&row, task).await,
            (_, Some(TaskState::ShelvingOffloading)) => self.offload(&row, &started).await,
            (_, Some(TaskState::Unshelving)) => self.unshelve(&row, &started).await,
            (VmState::Shelved, None) => self.offload_when_due(&row).await,
            // Offloaded: no host, so never here unless the row was just unshelved elsewhere.
            (VmState::ShelvedOffloaded, None) => Ok(()),
            (_, Some(TaskState::Scheduling)) | (VmState::Error | VmState::Deleted, None) => Ok(()),
            (VmState::Active, None) => self.sync_active(&row).await,
            (VmState::Stopped, None) => match hv.state(&s.id).await? {
                // Shoal says stopped: a domain someone started outside is stopped again, as
                // Nova's power-state sync does.
                Some(DomainState::Running) => {
                    tracing::info!(server = %s.id, "stopping a domain its row says is stopped");
                    hv.stop(&s.id, Duration::ZERO).await?;
                    Ok(())
                }
                _ => Ok(()),
            },
            (VmState::Paused, None) => match hv.state(&s.id).await? {
                // A paused domain that was stopped outside Shoal: the row follows, as for an
                // ACTIVE one.
                Some(state @ (DomainState::Shutoff | DomainState::Crashed)) => {
                    tracing::info!(server = %s.id, ?state, "paused domain stopped outside Shoal");
                    self.finish(&row, |r| {
                        r.vm_state = VmState::Stopped;
                        r.power_state = state.power_state();
                    })
                    .await
                }
                _ => Ok(()),
            },
            // Its memory is in libvirt's managed-save file; nothing runs to watch.
            (VmState::Suspended, None) => Ok(()),
        }
    }

    /// The outcome of a power action: the row goes to `vm`/`power`, or to ERROR with the
    /// reason.
    async fn settle<E: std::fmt::Display>(
        &self,
        row: &Versioned<ServerRecord>,
        started: &str,
        outcome: Result<(), E>,
        vm: VmState,
        power: u8,
    ) -> Result<(), AgentError> {
        self.finish_task(row, started, |r| match &outcome {
            Ok(()) => {
                r.vm_state = vm;
                r.power_state = power;
            }
            Err(e) => fail(r, &e.to_string()),
        })
        .await
    }

    /// `trigger_crash_dump`: an NMI into the domain, and the outcome as the action's
    /// `compute_trigger_crash_dump` event; the server's states do not change (Nova's neither:
    /// what the NMI does is the guest's business).
    async fn crash_dump(
        &self,
        row: &Versioned<ServerRecord>,
        request: &str,
        started: &str,
    ) -> Result<(), AgentError> {
        let outcome = self.inner.hv.inject_nmi(&row.value.id).await;
        if let Err(e) = &outcome {
            tracing::warn!(server = %row.value.id, error = %e, "trigger_crash_dump failed");
        }
        let request = request.to_owned();
        self.finish(row, |r| {
            r.crash_dump = None;
            r.record_request_event(
                "trigger_crash_dump",
                &request,
                "compute_trigger_crash_dump",
                started,
                &now_rfc3339(),
                outcome.is_ok(),
            );
        })
        .await
    }

    /// A rebuild: the domain and the server's disks go, and the server is spawned again from
    /// the image its row now names (the API wrote it), keeping its ports, name and uuid. A
    /// server that was stopped stays stopped, as in Nova.
    async fn rebuild(
        &self,
        row: &Versioned<ServerRecord>,
        started: &str,
    ) -> Result<(), AgentError> {
        let s = &row.value;
        let was_stopped = s.vm_state == VmState::Stopped;
        let outcome = async {
            self.inner
                .hv
                .destroy(&s.id)
                .await
                .map_err(|e| e.to_string())?;
            let dir = self.dir(&s.id);
            match tokio::fs::remove_dir_all(&dir).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("removing {}: {e}", dir.display())),
            }
            let name = self.spawn(s, row.revision).await?;
            if was_stopped {
                self.inner
                    .hv
                    .stop(&s.id, Duration::ZERO)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Ok::<_, String>(name)
        }
        .await;
        // An evacuation rebuilds here what another host lost (Nova's `rebuild_instance` with
        // `recreate`); its migration is `done` or `failed` with the outcome.
        let evacuation = s
            .migration
            .as_ref()
            .filter(|m| m.kind == crate::server::EVACUATION && m.dest_host == self.me())
            .cloned();
        self.finish_task(row, started, |r| {
            if let Some(mut m) = evacuation {
                m.status = if outcome.is_ok() { "done" } else { "failed" }.into();
                m.updated = now_rfc3339();
                r.migration = None;
                r.keep_past_migration(m);
            }
            match &outcome {
                Ok(name) => {
                    r.instance_name = Some(name.clone());
                    r.fault = None;
                    if was_stopped {
                        r.vm_state = VmState::Stopped;
                        r.power_state = power::SHUTDOWN;
                    } else {
                        r.vm_state = VmState::Active;
                        r.power_state = power::RUNNING;
                        r.launched_at = Some(now_rfc3339());
                    }
                }
                Err(e) => fail(r, &format!("the rebuild failed: {e}")),
            }
        })
        .await
    }

    /// Writes `change` to the row (the agent's progress through a snapshot or a shelve, as
    /// Nova's compute manager saves the task states it passes), if the row is still `row`.
    /// `None`: the row moved (a delete came), and the caller drops what it was doing.
    async fn advance(
        &self,
        row: &Versioned<ServerRecord>,
        change: impl FnOnce(&mut ServerRecord),
    ) -> Result<Option<Versioned<ServerRecord>>, AgentError> {
        let mut r = row.value.clone();
        change(&mut r);
        r.updated = now_rfc3339();
        Ok(self
            .inner
            .servers
            .put_at(&r.id, &r, row.revision)
            .await?
            .map(|revision| Versioned { value: r, revision }))
    }

    /// Where the snapshot of image `image` is written before it is uploaded.
    fn snapshot_file(&self, image: &str) -> PathBuf {
        self.inner
            .cfg
            .instances_path
            .join(SNAPSHOTS_DIR)
            .join(format!("{image}.qcow2"))
    }

    /// Flattens the server's root disk into a standalone qcow2 and uploads it as image `image`
    /// (Nova's libvirt snapshot, the cold way: a running or paused domain is saved to its
    /// managed-save file while its disk is read, and restored before the upload). The row goes
    /// to `uploading` between the two; `row` follows the writes. `Ok(false)`: the row moved
    /// and the snapshot was dropped.
    async fn capture(
        &self,
        row: &mut Versioned<ServerRecord>,
        uploading: TaskState,
        image: &str,
    ) -> Result<bool, CaptureError> {
        let s = row.value.clone();
        let hv = &self.inner.hv;
        let err = |e: &dyn std::fmt::Display| CaptureError::Failed(e.to_string());
        let before = hv.state(&s.id).await.map_err(|e| err(&e))?;
        let live = matches!(before, Some(DomainState::Running | DomainState::Paused));
        if live {
            hv.suspend(&s.id).await.map_err(|e| err(&e))?;
        }
        let out = self.snapshot_file(image);
        let disk = self.dir(&s.id).join("disk");
        let flat = {
            let out = out.clone();
            tokio::task::spawn_blocking(move || {
                if let Some(dir) = out.parent() {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| format!("creating {}: {e}", dir.display()))?;
                }
                crate::snapshot::flatten(&disk, &out)
            })
            .await
            .unwrap_or_else(|_| Err("the snapshot task was cancelled".into()))
        };
        let _remove = RemoveOnDrop(out.clone());
        if live {
            let back = async {
                hv.start(&s.id).await?;
                if before == Some(DomainState::Paused) {
                    hv.pause(&s.id).await?;
                }
                Ok::<_, HypervisorError>(())
            }
            .await;
            if let Err(e) = back {
                return Err(CaptureError::DomainLost(format!(
                    "the domain could not be restored after its disk was read: {e}"
                )));
            }
        }
        flat.map_err(CaptureError::Failed)?;
        match self
            .advance(row, |r| r.task_state = Some(uploading))
            .await
            .map_err(|e| err(&e))?
        {
            Some(next) => *row = next,
            None => return Ok(false),
        }
        self.inner
            .images
            .upload(image, &out, crate::snapshot::DISK_FORMAT)
            .await
            .map_err(|e| CaptureError::Failed(format!("the image upload failed: {e}")))?;
        Ok(true)
    }

    /// Deletes an image a snapshot or shelve was writing, when it is not to be kept.
    async fn drop_image(&self, server: &str, image: &str) {
        if let Err(e) = self.inner.images.delete(image).await {
            tracing::warn!(server, image, error = %e, "cannot delete the image of a failed snapshot");
        }
    }

    /// `createImage` (Nova's `snapshot_instance`): task `image_pending_upload`, the disk
    /// flattened, `image_uploading`, the upload, then no task; the server stays as it was
    /// (ACTIVE, SHUTOFF, PAUSED or SUSPENDED). A failure deletes the image and records the
    /// error in the action's event; a domain that could not be restored puts the server in
    /// ERROR. `createBackup` (`task` `image_backup`, Nova's `backup_instance`) is the same
    /// snapshot, then the rotation the row names.
    async fn snapshot(
        &self,
        row: &Versioned<ServerRecord>,
        task: TaskState,
        started: &str,
    ) -> Result<(), AgentError> {
        let id = row.value.id.clone();
        let Some(image) = row.value.snapshot_image.clone() else {
            tracing::warn!(server = %id, "a snapshot task names no image; dropped");
            return self.finish(row, |_| {}).await;
        };
        let Some(mut row) = self
            .advance(row, |r| r.task_state = Some(TaskState::ImagePendingUpload))
            .await?
        else {
            return Ok(());
        };
        let outcome = self
            .capture(&mut row, TaskState::ImageUploading, &image)
            .await;
        match &outcome {
            Ok(true) => {
                tracing::info!(server = %id, %image, "snapshot uploaded");
                if let (TaskState::ImageBackup, Some(b)) = (task, &row.value.backup) {
                    match self
                        .inner
                        .images
                        .rotate_backups(&id, &b.backup_type, b.rotation)
                        .await
                    {
                        Ok(gone) if !gone.is_empty() => {
                            tracing::info!(server = %id, ?gone, "rotated backups")
                        }
                        Ok(_) => {}
                        Err(e) => tracing::warn!(server = %id, error = %e, "cannot rotate backups"),
                    }
                }
            }
            Ok(false) => {
                self.drop_image(&id, &image).await;
                return Ok(());
            }
            Err(e) => {
                tracing::warn!(server = %id, %image, error = %e, "snapshot failed");
                self.drop_image(&id, &image).await;
            }
        }
        self.finish(&row, |r| {
            r.snapshot_image = None;
            r.backup = None;
            if let Err(CaptureError::DomainLost(why)) = &outcome {
                fail(r, why);
            }
            r.record_outcome(task, started, &now_rfc3339(), outcome.is_ok());
        })
        .await
    }

    /// `shelve` (Nova's `shelve_instance`): a clean power-off (a suspended server's saved
    /// memory is dropped), the disk saved as the `<name>-shelved` image, vm_state `shelved`;
    /// with `shelved_offload_time` 0 the offload follows at once. A failed snapshot leaves the
    /// server stopped, its image deleted and the error in the action's event.
    async fn shelve(&self, row: &Versioned<ServerRecord>, started: &str) -> Result<(), AgentError> {
        let s = &row.value;
        let hv = &self.inner.hv;
        let Some(image) = s.snapshot_image.clone() else {
            tracing::warn!(server = %s.id, "a shelve task names no image; dropped");
            return self.finish(row, |_| {}).await;
        };
        let off = async {
            hv.stop(&s.id, self.inner.cfg.stop_grace).await?;
            hv.discard_saved(&s.id).await
        }
        .await;
        if let Err(e) = off {
            tracing::warn!(server = %s.id, error = %e, "cannot power off to shelve");
            self.drop_image(&s.id, &image).await;
            return self
                .finish(row, |r| {
                    r.snapshot_image = None;
                    r.record_outcome(TaskState::Shelving, started, &now_rfc3339(), false);
                })
                .await;
        }
        let Some(mut row) = self
            .advance(row, |r| {
                r.task_state = Some(TaskState::ShelvingImagePendingUpload);
                r.power_state = power::SHUTDOWN;
            })
            .await?
        else {
            self.drop_image(&s.id, &image).await;
            return Ok(());
        };
        let outcome = self
            .capture(&mut row, TaskState::ShelvingImageUploading, &image)
            .await;
        match outcome {
            Ok(true) => {}
            Ok(false) => {
                self.drop_image(&s.id, &image).await;
                return Ok(());
            }
            Err(e) => {
                tracing::warn!(server = %s.id, %image, error = %e, "shelve snapshot failed");
                self.drop_image(&s.id, &image).await;
                return self
                    .finish(&row, |r| {
                        r.snapshot_image = None;
                        r.vm_state = VmState::Stopped;
                        r.power_state = power::SHUTDOWN;
                        r.record_outcome(TaskState::Shelving, started, &now_rfc3339(), false);
                    })
                    .await;
            }
        }
        let offload_now = self.inner.cfg.shelved_offload_time == Some(Duration::ZERO);
        let host = self.inner.cfg.host.clone();
        let shelved = self
            .advance(&row, |r| {
                r.snapshot_image = None;
                r.vm_state = VmState::Shelved;
                r.power_state = power::SHUTDOWN;
                r.shelved = Some(Shelved {
                    image_id: image.clone(),
                    at: now_rfc3339(),
                    host,
                });
                r.record_outcome(TaskState::Shelving, started, &now_rfc3339(), true);
                r.task_state = offload_now.then_some(TaskState::ShelvingOffloading);
            })
            .await?;
        tracing::info!(server = %s.id, %image, "shelved");
        match shelved {
            Some(row) if offload_now => self.offload(&row, started).await,
            Some(_) => Ok(()),
            None => {
                // The row moved (a delete): the image goes with the server.
                self.drop_image(&s.id, &image).await;
                Ok(())
            }
        }
    }

    /// A shelved server whose `shelved_offload_time` has passed is offloaded (Nova's
    /// `_poll_shelved_instances`).
    async fn offload_when_due(&self, row: &Versioned<ServerRecord>) -> Result<(), AgentError> {
        let Some(after) = self.inner.cfg.shelved_offload_time else {
            return Ok(());
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let cutoff = shoal_state::time::rfc3339(now.saturating_sub(after.as_secs()));
        let due = row
            .value
            .shelved
            .as_ref()
            .is_none_or(|sh| sh.at.as_str() <= cutoff.as_str());
        if due {
            self.advance(row, |r| r.task_state = Some(TaskState::ShelvingOffloading))
                .await?;
        }
        Ok(())
    }

    /// `shelveOffload` (Nova's `shelve_offload_instance`): the domain and the instance
    /// directory go, the ports are unbound, and the claim is released in one transaction with
    /// the row (no host, `shelved_offloaded`, power state NOSTATE).
    async fn offload(
        &self,
        row: &Versioned<ServerRecord>,
        started: &str,
    ) -> Result<(), AgentError> {
        let s = &row.value;
        self.inner.hv.destroy(&s.id).await?;
        self.remove_instance_dir(&s.id).await;
        self.unbind_ports(s).await;
        let mut r = s.clone();
        r.host = None;
        r.vm_state = VmState::ShelvedOffloaded;
        r.power_state = power::NOSTATE;
        r.task_state = None;
        r.updated = now_rfc3339();
        r.record_event(TaskState::ShelvingOffloading, started, &now_rfc3339());
        let value = serde_json::to_vec(&r).expect("server records serialise");
        let rev = row.revision;
        let released = placement::release(&self.inner.cluster, &s.id, |txn| {
            txn.when(tables::SERVERS, &s.id, shoal_types::Expect::Revision(rev))
                .put(tables::SERVERS, &s.id, value.clone())
        })
        .await;
        match released {
            Ok(()) => tracing::info!(server = %s.id, "shelved server offloaded"),
            // The row moved meanwhile (a delete): the newer row is handled next.
            Err(e) => tracing::info!(server = %s.id, error = %e, "offload not recorded"),
        }
        Ok(())
    }

    /// `unshelve` (Nova's `unshelve_instance`): a server still on its host is started again; an
    /// offloaded one, placed here by the API as a create is, gets a standalone disk written
    /// from its shelve image and is spawned. Then the shelve image is deleted and the server
    /// is ACTIVE.
    async fn unshelve(
        &self,
        row: &Versioned<ServerRecord>,
        started: &str,
    ) -> Result<(), AgentError> {
        let s = &row.value;
        let Some(shelved) = s.shelved.clone() else {
            return self
                .finish_task(row, started, |r| {
                    fail(r, "the unshelve failed: the server has no shelve image")
                })
                .await;
        };
        let outcome = async {
            if s.vm_state == VmState::Shelved {
                self.power_on(s, row.revision).await?;
                return Ok(s.instance_name.clone());
            }
            let src = self
                .inner
                .images
                .fetch(&shelved.image_id)
                .await
                .map_err(|e| format!("the shelve image {}: {e}", shelved.image_id))?;
            let dir = self.dir(&s.id);
            tokio::task::spawn_blocking(move || {
                std::fs::create_dir_all(&dir)
                    .map_err(|e| format!("creating {}: {e}", dir.display()))?;
                let part = dir.join("disk.part");
                std::fs::copy(&src, &part)
                    .and_then(|_| std::fs::rename(&part, dir.join("disk")))
                    .map_err(|e| format!("writing the disk from the shelve image: {e}"))
            })
            .await
            .map_err(|_| "the disk task was cancelled".to_owned())??;
            self.spawn(s, row.revision).await.map(Some)
        }
        .await;
        if outcome.is_ok() {
            self.drop_image(&s.id, &shelved.image_id).await;
        }
        self.finish_task(row, started, |r| match &outcome {
            Ok(name) => {
                r.vm_state = VmState::Active;
                r.power_state = power::RUNNING;
                r.instance_name = name.clone().or(r.instance_name.take());
                r.shelved = None;
                r.launched_at = Some(now_rfc3339());
                r.fault = None;
            }
            Err(e) => fail(r, &format!("the unshelve failed: {e}")),
        })
        .await
    }

    /// A snapshot or shelve whose agent stopped part way (this node restarted): the task is
    /// cleared with an `Error` event, the image deleted, and a domain the snapshot had saved
    /// to disk restored. A shelve that got that far leaves the server stopped.
    async fn snapshot_interrupted(
        &self,
        row: &Versioned<ServerRecord>,
        task: TaskState,
    ) -> Result<(), AgentError> {
        let s = &row.value;
        let shelving = matches!(
            task,
            TaskState::ShelvingImagePendingUpload | TaskState::ShelvingImageUploading
        );
        let now = now_rfc3339();
        let cleared = self
            .advance(row, |r| {
                r.task_state = None;
                r.snapshot_image = None;
                r.backup = None;
                if shelving {
                    r.vm_state = VmState::Stopped;
                    r.power_state = power::SHUTDOWN;
                }
                r.record_outcome(task, &now, &now, false);
            })
            .await?;
        let Some(_) = cleared else { return Ok(()) };
        tracing::warn!(server = %s.id, task = task.as_str(), "an interrupted snapshot was abandoned");
        if let Some(image) = &s.snapshot_image {
            let _ = tokio::fs::remove_file(self.snapshot_file(image)).await;
            self.drop_image(&s.id, image).await;
        }
        if !shelving && matches!(s.vm_state, VmState::Active | VmState::Paused) {
            let running = matches!(
                self.inner.hv.state(&s.id).await?,
                Some(DomainState::Running | DomainState::Paused)
            );
            if !running {
                self.inner.hv.start(&s.id).await?;
                if s.vm_state == VmState::Paused {
                    self.inner.hv.pause(&s.id).await?;
                }
            }
        }
        Ok(())
    }

    /// Removes the server's instance directory (disks, console log); gone already is fine.
    async fn remove_instance_dir(&self, id: &str) {
        let dir = self.dir(id);
        let removed = tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        })
        .await;
        if let Ok(Err(e)) = removed {
            tracing::warn!(server = %id, error = %e, "could not remove the instance directory");
        }
    }

    /// An ACTIVE server: a domain that is gone is rebuilt from its disk (or the server goes to
    /// ERROR saying why); one that stopped outside Shoal makes the row SHUTOFF.
    async fn sync_active(&self, row: &Versioned<ServerRecord>) -> Result<(), AgentError> {
        let s = &row.value;
        match self.inner.hv.state(&s.id).await? {
            Some(DomainState::Running) => {
                if s.power_state != power::RUNNING {
                    self.finish(row, |r| r.power_state = power::RUNNING).await?;
                }
                Ok(())
            }
            Some(state @ (DomainState::Shutoff | DomainState::Crashed)) => {
                tracing::info!(server = %s.id, ?state, "domain stopped outside Shoal");
                self.finish(row, |r| {
                    r.vm_state = VmState::Stopped;
                    r.power_state = state.power_state();
                })
                .await
            }
            Some(other) => {
                if s.power_state != other.power_state() {
                    self.finish(row, |r| r.power_state = other.power_state())
                        .await?;
                }
                Ok(())
            }
            None => {
                tracing::warn!(server = %s.id, "ACTIVE server has no domain on this host; rebuilding it");
                let outcome = self.spawn(s, row.revision).await;
                self.finish(row, |r| match &outcome {
                    Ok(name) => {
                        r.instance_name = Some(name.clone());
                        r.power_state = power::RUNNING;
                    }
                    Err(e) => fail(
                        r,
                        &format!("the domain was lost and could not be rebuilt: {e}"),
                    ),
                })
                .await
            }
        }
    }

    /// Starts the domain, defining it again first if libvirt lost it (test driver, or a host
    /// whose libvirt state was wiped).
    async fn power_on(&self, s: &ServerRecord, revision: u64) -> Result<(), String> {
        match self
            .inner
            .hv
            .state(&s.id)
            .await
            .map_err(|e| e.to_string())?
        {
            Some(_) => self.inner.hv.start(&s.id).await.map_err(|e| e.to_string()),
            None => self.spawn(s, revision).await.map(|_| ()),
        }
    }

    /// [`Self::finish`] for the end of a task: the action log gets the event Nova's compute
    /// manager records for it (`started` is when the agent took the task up).
    async fn finish_task(
        &self,
        row: &Versioned<ServerRecord>,
        started: &str,
        change: impl FnOnce(&mut ServerRecord),
    ) -> Result<(), AgentError> {
        let task = row.value.task_state;
        self.finish(row, |r| {
            change(r);
            if let Some(task) = task {
                r.record_event(task, started, &now_rfc3339());
            }
        })
        .await
    }

    /// Writes the outcome of a step: `change` applied to the row, task cleared, if the row is
    /// still the one the step acted on. A row that moved meanwhile is left to the next round.
    async fn finish(
        &self,
        row: &Versioned<ServerRecord>,
        change: impl FnOnce(&mut ServerRecord),
    ) -> Result<(), AgentError> {
        let mut r = row.value.clone();
        change(&mut r);
        r.task_state = None;
        r.updated = now_rfc3339();
        if r == row.value {
            return Ok(());
        }
        if self.write_row(&r, row.revision).await?.is_none() {
            tracing::debug!(server = %r.id, "row changed while acting on it; the newer row wins");
        }
        Ok(())
    }

    /// Writes `r` if its row is still at `revision` (`None` if it moved), in one transaction
    /// with the outcomes other instances' steps are writing at the same time: while one write
    /// is in flight the next ones queue, and the first of them to get the writer's turn writes
    /// them all (group commit). A burst of creates on this host costs a few Raft writes instead
    /// of one per server.
    async fn write_row(&self, r: &ServerRecord, revision: u64) -> Result<Option<u64>, StateError> {
        let (done, answer) = tokio::sync::oneshot::channel();
        self.inner
            .results
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(PendingRow {
                key: r.id.clone(),
                value: self.inner.servers.encode(r),
                revision,
                done,
            });
        {
            let _turn = self.inner.writer.lock().await;
            let batch =
                std::mem::take(&mut *self.inner.results.lock().unwrap_or_else(|e| e.into_inner()));
            // Empty when an earlier turn took this row with its own.
            if !batch.is_empty() {
                let rows: Vec<(String, Vec<u8>, u64)> = batch
                    .iter()
                    .map(|p| (p.key.clone(), p.value.clone(), p.revision))
                    .collect();
                let answers = self.inner.servers.put_at_many(&rows).await;
                for (p, a) in batch.into_iter().zip(answers) {
                    let _ = p.done.send(a);
                }
            }
        }
        answer.await.unwrap_or_else(|_| {
            Err(StateError::Unavailable(
                "the write of this outcome was dropped".into(),
            ))
        })
    }

    /// Ensures the images, writes the overlay, renders and starts the domain. Returns the
    /// domain's name.
    async fn spawn(&self, s: &ServerRecord, revision: u64) -> Result<String, String> {
        self.spawn_as(s, revision, None).await
    }

    /// [`Self::spawn`], or with `rescue` the rescue domain: an overlay `disk.rescue` on the
    /// rescue image is the first disk and the server's own disk the second, as Nova's libvirt
    /// driver boots a rescue.
    async fn spawn_as(
        &self,
        s: &ServerRecord,
        revision: u64,
        rescue: Option<&crate::server::ImageSnapshot>,
    ) -> Result<String, String> {
        let images = &self.inner.images;
        let boot = rescue.unwrap_or(&s.image);
        let dir = self.dir(&s.id);
        let disk = dir.join("disk");
        // A disk that is there needs no base: a domain rebuilt from its disk keeps what the
        // guest wrote, and an unshelve wrote a standalone disk from the shelve image.
        let base =
            if tokio::fs::try_exists(&disk).await.unwrap_or(false) {
                None
            } else {
                Some(images.fetch(&s.image.id).await.map_err(|e| {
                    format!("image {} is not available on this host: {e}", s.image.id)
                })?)
            };
        let kernel = match &boot.kernel_id {
            Some(k) => Some(
                images
                    .fetch(k)
                    .await
                    .map_err(|e| format!("kernel image {k}: {e}"))?,
            ),
            None => None,
        };
        let initrd = match &boot.ramdisk_id {
            Some(r) => Some(
                images
                    .fetch(r)
                    .await
                    .map_err(|e| format!("ramdisk image {r}: {e}"))?,
            ),
            None => None,
        };
        let console_log = dir.join("console.log");
        let format = match s.image.disk_format.as_str() {
            "qcow2" => BackingFormat::Qcow2,
            _ => BackingFormat::Raw,
        };
        let flavor_bytes = s.flavor.disk_gb << 30;
        let (ephemeral_gb, swap_mb) = (s.flavor.ephemeral_gb, s.flavor.swap_mb);
        let extra_disks = {
            let (dir, disk, base) = (dir.clone(), disk.clone(), base.clone());
            let instances_path = self.inner.cfg.instances_path.clone();
            tokio::task::spawn_blocking(move || -> Result<Vec<PathBuf>, String> {
                std::fs::create_dir_all(&dir)
                    .map_err(|e| format!("creating {}: {e}", dir.display()))?;
                if let Some(base) = base.filter(|_| !disk.exists()) {
                    let size = flavor_bytes.max(
                        backing_size(&base, format)
                            .map_err(|e| format!("reading the base image: {e}"))?,
                    );
                    create_overlay(&disk, &OverlaySpec::new(&base, format, size))
                        .map_err(|e| format!("writing the overlay: {e}"))?;
                }
                crate::disks::ensure_extra_disks(&instances_path, &dir, ephemeral_gb, swap_mb)
                    .map_err(|e| format!("creating the ephemeral and swap disks: {}", chain(&e)))
            })
            .await
            .map_err(|_| "the overlay task was cancelled".to_owned())??
        };
        let (disk, extra_disks) = match rescue {
            None => (disk, extra_disks),
            Some(img) => {
                let base = images
                    .fetch(&img.id)
                    .await
                    .map_err(|e| format!("rescue image {}: {e}", img.id))?;
                let format = match img.disk_format.as_str() {
                    "qcow2" => BackingFormat::Qcow2,
                    _ => BackingFormat::Raw,
                };
                let rescue_disk = dir.join(RESCUE_DISK);
                let out = rescue_disk.clone();
                tokio::task::spawn_blocking(move || {
                    let size = backing_size(&base, format)
                        .map_err(|e| format!("reading the rescue image: {e}"))?;
                    let _ = std::fs::remove_file(&out);
                    create_overlay(&out, &OverlaySpec::new(&base, format, size))
                        .map(|_| ())
                        .map_err(|e| format!("writing the rescue overlay: {e}"))
                })
                .await
                .map_err(|_| "the rescue overlay task was cancelled".to_owned())??;
                let mut extra = vec![disk];
                extra.extend(extra_disks);
                (rescue_disk, extra)
            }
        };
        let config_drive = if s.config_drive || self.inner.cfg.force_config_drive {
            Some(self.config_drive(s, &dir).await?)
        } else {
            None
        };
        // The name libvirt already knows the domain by wins; else the row's; else a new one
        // from the row's revision, or the next number free among the names this agent handed
        // out. One lookup by uuid, not a listing of the host's domains (a call per domain, for
        // every spawn): a name some other domain holds is met by the define below, which then
        // takes the next number.
        let existing = self
            .inner
            .hv
            .name_of(&s.id)
            .await
            .map_err(|e| e.to_string())?;
        let chosen = existing.or_else(|| s.instance_name.clone());
        let fresh = chosen.is_none();
        let mut name = match chosen {
            Some(name) => name,
            None => self.claim_name(revision, &s.id),
        };
        let mut spec = DomainSpec {
            name: name.clone(),
            uuid: s.id.clone(),
            virt_type: self.inner.cfg.virt_type.clone(),
            memory_mb: s.flavor.ram_mb,
            vcpus: s.flavor.vcpus,
            display_name: s.name.clone(),
            flavor_name: s.flavor.name.clone(),
            project_id: s.project_id.clone(),
            user_id: s.user_id.clone(),
            image_id: s.image.id.clone(),
            disk,
            disk_cache: self.inner.disk_cache,
            extra_disks,
            config_drive,
            kernel,
            initrd,
            cmdline: boot.kernel_cmdline.clone(),
            interfaces: s
                .ports
                .iter()
                .map(|p| crate::domain::Interface {
                    tap: crate::domain::tap_name(&p.port_id),
                    mac: p.mac.clone(),
                    mtu: Some(p.mtu),
                })
                .collect(),
            console_log,
        };
        self.bind_ports(s).await;
        // A name this agent chose may still meet a domain it does not know of (defined by
        // hand, or by an earlier process): the next free number then.
        let mut attempts = 0;
        loop {
            match self.inner.hv.define_and_start(spec.to_xml()).await {
                Ok(()) => break,
                Err(e) if fresh && attempts < 16 && e.to_string().contains("already exists") => {
                    attempts += 1;
                    // Another holder of the name this agent did not know of: keep it away.
                    self.inner
                        .names
                        .lock()
                        .expect("names lock")
                        .insert(name.clone(), String::new());
                    let from = name
                        .strip_prefix("instance-")
                        .and_then(|h| u64::from_str_radix(h, 16).ok())
                        .unwrap_or(revision);
                    name = self.claim_name(from + 1, &s.id);
                    spec.name = name.clone();
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        if let Some(timeout) = self.inner.cfg.vif_plugging_timeout {
            self.wait_for_ports(s, timeout).await?;
        }
        Ok(name)
    }

    /// Builds the server's config drive (`disk.config` in its directory) from the documents
    /// of the metadata service, unless it is there already (a rebuild keeps the one the guest
    /// saw). Returns its path.
    async fn config_drive(&self, s: &ServerRecord, dir: &Path) -> Result<PathBuf, String> {
        let out = dir.join(crate::configdrive::FILE);
        if out.exists() {
            return Ok(out);
        }
        let nics = crate::nics::nics(self.inner.servers_store(), s, None)
            .await
            .map_err(|e| format!("reading the ports for the config drive: {e}"))?;
        let seed: [u8; 512] = std::array::from_fn(|_| rand::random());
        let instance = crate::metadata::Instance {
            server: s,
            nics: &nics,
            address: std::net::Ipv4Addr::UNSPECIFIED,
            random_seed: &seed,
            // Written at boot, before any floating IP could be associated with the server.
            public_ipv4: None,
        };
        let files = crate::metadata::config_drive_files(&instance)
            .map_err(|e| format!("building the config drive: {e}"))?;
        let path = out.clone();
        tokio::task::spawn_blocking(move || crate::configdrive::build(&path, &files))
            .await
            .map_err(|_| "the config drive task was cancelled".to_owned())?
            .map_err(|e| format!("building the config drive: {}", chain(&e)))?;
        Ok(out)
    }

    /// The first `instance-%08x` from `from` on that no other server holds among the names
    /// this agent handed out; recorded as `uuid`'s. (A domain this agent did not name, defined
    /// by hand or by an earlier process, is met when the name is defined: the caller then asks
    /// for the next number.)
    fn claim_name(&self, from: u64, uuid: &str) -> String {
        let mut names = self.inner.names.lock().expect("names lock");
        let taken = |n: &str| names.get(n).is_some_and(|id| id != uuid);
        let name = (from..)
            .map(crate::server::instance_name)
            .find(|n| !taken(n))
            .expect("some number is free");
        names.insert(name.clone(), uuid.to_owned());
        name
    }

    /// Waits until the network agent has programmed every port of `s` (status ACTIVE), as
    /// Nova waits for Neutron's `network-vif-plugged` events. The tap exists only once the
    /// domain runs, so this comes after the start; a port that never goes ACTIVE fails the
    /// spawn (Nova's `vif_plugging_is_fatal`).
    async fn wait_for_ports(&self, s: &ServerRecord, timeout: Duration) -> Result<(), String> {
        let ports: Table<shoal_state::records::PortRecord> =
            Table::new(self.inner.servers_store(), tables::PORTS);
        let deadline = tokio::time::Instant::now() + timeout;
        for p in &s.ports {
            loop {
                match ports.get(&p.port_id).await {
                    Ok(Some(row)) if row.value.status == "ACTIVE" => break,
                    Ok(None) => break, // deleted meanwhile: nothing to wait for
                    Ok(Some(_)) | Err(_) => {}
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(format!(
                        "Virtual Interface creation failed: port {} was not plugged within {} s",
                        p.port_id,
                        timeout.as_secs()
                    ));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok(())
    }

    /// Records this host as the ports' binding (`binding:host_id`, vif type `tap`): the network
    /// agent of this node programs the ports bound to it. A port that went meanwhile is left;
    /// the guest then has a NIC nothing serves, as with Nova and a deleted port.
    async fn bind_ports(&self, s: &ServerRecord) {
        let ports: Table<shoal_state::records::PortRecord> =
            Table::new(self.inner.servers_store(), tables::PORTS);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        for p in &s.ports {
            let host = self.inner.cfg.host.clone();
            let r = ports
                .update(&p.port_id, |port| {
                    if port.binding_host_id != host || port.binding_vif_type != "tap" {
                        port.binding_host_id = host.clone();
                        port.binding_vif_type = "tap".into();
                        port.touch(now);
                    }
                    Ok::<_, StateError>(())
                })
                .await;
            if let Err(e) = r {
                tracing::warn!(server = %s.id, port = %p.port_id, error = %e, "cannot bind the port");
            }
        }
    }

    /// Clears this host from the ports' binding (an offloaded server has no host; the host
    /// that unshelves it binds them again).
    async fn unbind_ports(&self, s: &ServerRecord) {
        let ports: Table<shoal_state::records::PortRecord> =
            Table::new(self.inner.servers_store(), tables::PORTS);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let host = self.inner.cfg.host.clone();
        for p in &s.ports {
            let r = ports
                .update(&p.port_id, |port| {
                    if port.binding_host_id == host {
                        port.binding_host_id = String::new();
                        port.touch(now);
                    }
                    Ok::<_, StateError>(())
                })
                .await;
            if let Err(e) = r {
                tracing::warn!(server = %s.id, port = %p.port_id, error = %e, "cannot unbind the port");
            }
        }
    }

    /// Destroys the domain, removes the instance directory, then releases the claim, deletes
    /// the row and writes its tombstone (`crate::usage`) in one transaction.
    async fn delete(&self, row: &Versioned<ServerRecord>) -> Result<(), AgentError> {
        let s = &row.value;
        self.inner.hv.destroy(&s.id).await?;
        self.remove_instance_dir(&s.id).await;
        if s.migration.is_some() {
            // Deleted mid-resize: the other end's claim goes too (and this node's copy set
            // aside, when it is the source; a remote source removes its own).
            self.remove_resize_dir(&s.id).await;
            let key = crate::server::Migration::claim_key(&s.id);
            placement::release(&self.inner.cluster, &key, |txn| txn)
                .await
                .map_err(|e| AgentError::State(StateError::Unavailable(e.to_string())))?;
        }
        let now = now_rfc3339();
        // Unconditional: a delete, once asked for, is not undone by a later write of the row.
        // What remains is the tombstone (with the action log Nova keeps of a deleted
        // instance).
        placement::release(&self.inner.cluster, &s.id, |txn| {
            crate::usage::bury(txn, s, &now)
        })
        .await
        .map_err(|e| AgentError::State(StateError::Unavailable(e.to_string())))?;
        tracing::info!(server = %s.id, "deleted");
        Ok(())
    }

    /// One pass of the image cache manager (`crate::imagecache`): what this node's server rows
    /// and the overlays under the instances path use stays; other base files unused for
    /// `remove_unused_min_age` go, the ephemeral and swap bases here, the base images through
    /// the image service (which also honours its leases).
    pub async fn age_base_files(&self) {
        let Ok(listing) = self.inner.servers.list("").await else {
            return;
        };
        let mut images = BTreeSet::new();
        let mut flavors = Vec::new();
        for (_, row) in listing.rows {
            let s = row.value;
            if s.host.as_deref() != Some(self.inner.cfg.host.as_str()) {
                continue;
            }
            images.insert(s.image.id.clone());
            images.extend(s.image.kernel_id.clone());
            images.extend(s.image.ramdisk_id.clone());
            flavors.push((s.flavor.ephemeral_gb, s.flavor.swap_mb));
        }
        let (path, min_age) = (
            self.inner.cfg.instances_path.clone(),
            self.inner.cfg.remove_unused_min_age,
        );
        let local = tokio::task::spawn_blocking(move || {
            let _bases = crate::disks::BASE_LOCK
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let backed = crate::imagecache::overlay_backings(&path)?;
            let mut in_use = crate::imagecache::extra_disk_bases(&path, flavors.into_iter());
            in_use.extend(backed.iter().cloned());
            let base = path.join(crate::disks::BASE_DIR);
            crate::imagecache::age_dir(&base, &in_use, min_age, std::time::SystemTime::now())?;
            Ok::<_, std::io::Error>(backed)
        })
        .await;
        let backed = match local {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot age the base files");
                return;
            }
            Err(_) => return,
        };
        // A cached image is named by its id: any the overlays back onto stays too.
        images.extend(
            backed
                .iter()
                .filter_map(|b| Some(b.file_name()?.to_str()?.to_owned())),
        );
        match self.inner.images.age_unused(images, min_age).await {
            Ok(removed) if !removed.is_empty() => {
                tracing::info!(?removed, "removed base images no instance here used")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot age the base-image cache"),
        }
    }

    /// Rows left in BUILD/scheduling by a create whose node stopped before it committed the
    /// placement: after [`SCHEDULING_DEADLINE`] any node puts them in ERROR (one wins the
    /// compare-and-set), so no server stays in BUILD for good.
    async fn sweep_interrupted_creates(&self) {
        let Ok(listing) = self.inner.servers.list("").await else {
            return;
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let cutoff = shoal_state::time::rfc3339(now.saturating_sub(SCHEDULING_DEADLINE.as_secs()));
        for (id, row) in listing.rows {
            let s = &row.value;
            if s.host.is_none()
                && s.task_state == Some(TaskState::Unshelving)
                && s.updated.as_str() < cutoff.as_str()
            {
                // An unshelve whose node stopped before it placed the server: it stays
                // offloaded, to be unshelved again.
                let mut r = s.clone();
                r.task_state = None;
                r.updated = now_rfc3339();
                if let Ok(Some(_)) = self.inner.servers.put_at(&id, &r, row.revision).await {
                    tracing::warn!(server = %id, "an interrupted unshelve was abandoned");
                }
                continue;
            }
            if s.host.is_none()
                && s.task_state == Some(TaskState::Scheduling)
                && s.updated.as_str() < cutoff.as_str()
            {
                let mut r = s.clone();
                fail(
                    &mut r,
                    "scheduling was interrupted: the node handling the create stopped before it placed the server",
                );
                r.task_state = None;
                r.updated = now_rfc3339();
                if let Ok(Some(_)) = self.inner.servers.put_at(&id, &r, row.revision).await {
                    tracing::warn!(server = %id, "an interrupted create was put in ERROR");
                }
            }
        }
    }

    /// Reports domains that no row of this node claims and destroys them after the grace.
    async fn sweep_orphans(
        &self,
        workers: &HashMap<String, Slot>,
        first_seen: &mut HashMap<String, Instant>,
    ) {
        let domains = match self.inner.hv.list().await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list domains");
                return;
            }
        };
        let now = Instant::now();
        let mut still = HashMap::new();
        for d in domains {
            if !d.name.starts_with("instance-") || workers.contains_key(&d.uuid) {
                continue;
            }
            // A row for it anywhere means it is not an orphan: several nodes may share one
            // libvirtd (a dev cluster on one machine), and each leaves the others' domains be.
            match self.inner.servers.get(&d.uuid).await {
                Ok(None) => {}
                Ok(Some(_)) => continue,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot check a domain against the rows");
                    continue;
                }
            }
            let since = *first_seen.get(&d.uuid).unwrap_or(&now);
            if since == now {
                tracing::warn!(domain = %d.name, uuid = %d.uuid, grace = ?self.inner.cfg.orphan_grace,
                    "a domain no server row claims; it is destroyed after the grace period");
            }
            if now.duration_since(since) >= self.inner.cfg.orphan_grace {
                match self.inner.hv.destroy(&d.uuid).await {
                    Ok(()) => tracing::warn!(domain = %d.name, "destroyed an orphaned domain"),
                    Err(e) => {
                        tracing::warn!(domain = %d.name, error = %e, "cannot destroy an orphaned domain")
                    }
                }
                continue;
            }
            still.insert(d.uuid, since);
        }
        *first_seen = still;
    }
}

impl Inner {
    fn servers_store(&self) -> Arc<dyn shoal_state::Store> {
        self.store.clone()
    }
}

/// The hosts a server row names, read without decoding the rest of the row.
#[derive(serde::Deserialize)]
struct Hosts<'a> {
    #[serde(default, borrow)]
    host: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    migration: Option<MigrationHosts<'a>>,
    #[serde(default, borrow)]
    past_migrations: Vec<MigrationHosts<'a>>,
}

#[derive(serde::Deserialize)]
struct MigrationHosts<'a> {
    #[serde(borrow)]
    source_host: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    dest_host: std::borrow::Cow<'a, str>,
    #[serde(default, borrow)]
    kind: std::borrow::Cow<'a, str>,
    #[serde(default, borrow)]
    status: std::borrow::Cow<'a, str>,
}

impl MigrationHosts<'_> {
    /// [`crate::server::Migration::evacuated_from`] on these fields.
    fn evacuated_from(&self, me: &str) -> bool {
        self.kind == crate::server::EVACUATION
            && self.source_host == me
            && matches!(&*self.status, "accepted" | "pre-migrating" | "done")
    }
}

impl<'a> Hosts<'a> {
    /// `None` when the bytes are not a row (the full decode then reports it).
    fn of(value: &'a [u8]) -> Option<Self> {
        serde_json::from_slice(value).ok()
    }

    /// [`Agent::involves`] on these fields (or more: an evacuation from here is looked at
    /// whatever else the row says).
    fn involve(&self, me: &str) -> bool {
        self.host.as_deref() == Some(me)
            || self
                .migration
                .as_ref()
                .is_some_and(|m| m.source_host == me || m.dest_host == me)
            || self.past_migrations.iter().any(|m| m.evacuated_from(me))
    }
}

/// Where snapshots are written under the instances path before they are uploaded (Nova's
/// `snapshots_directory`).
pub const SNAPSHOTS_DIR: &str = "snapshots";

/// Why a snapshot failed: the server stays as it was, or its domain could not be restored.
#[derive(Debug, thiserror::Error)]
enum CaptureError {
    #[error("{0}")]
    Failed(String),
    #[error("{0}")]
    DomainLost(String),
}

/// A file removed when this is dropped (a snapshot once uploaded, or abandoned).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Puts the server in ERROR with Nova's fault.
fn fail(r: &mut ServerRecord, message: &str) {
    r.vm_state = VmState::Error;
    r.power_state = power::NOSTATE;
    r.fault = Some(Fault {
        code: 500,
        message: message.to_owned(),
        created: now_rfc3339(),
    });
}

/// An error and its sources, one sentence after the other (the fault a user sees).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}

/// The virtual size of a base image: a raw file's length, a qcow2's header size field.
fn backing_size(path: &Path, format: BackingFormat) -> std::io::Result<u64> {
    match format {
        BackingFormat::Raw => Ok(std::fs::metadata(path)?.len()),
        BackingFormat::Qcow2 => {
            use std::io::Read;
            let mut header = [0u8; 32];
            std::fs::File::open(path)?.read_exact(&mut header)?;
            Ok(u64::from_be_bytes(
                header[24..32].try_into().expect("8 bytes"),
            ))
        }
    }
}

/// Whether files under `dir` can be opened with O_DIRECT (tmpfs cannot), which decides the
/// disk cache mode as Nova's driver decides it.
fn supports_direct_io(dir: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let probe = dir.join(".direct-io-probe");
    let ok = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&probe)
        .is_ok();
    let _ = std::fs::remove_file(&probe);
    ok
}

/// The rescue domain's first disk, in the instance directory (Nova's `disk.rescue`).
pub const RESCUE_DISK: &str = "disk.rescue";

/// Rescue, resize and cold migration (Nova's `rescue_instance`, `prep_resize`,
/// `resize_instance`, `finish_resize`, `confirm_resize`, `revert_resize` and
/// `finish_revert_resize`), each step done by the node whose turn it is: the row says whose.
impl Agent {
    fn me(&self) -> &str {
        self.inner.cfg.host.as_str()
    }

    /// `rescue`: the domain goes, and the same domain (name, uuid, NICs) is defined again
    /// booting an overlay on the rescue image with the server's own disk second.
    async fn rescue(&self, row: &Versioned<ServerRecord>, started: &str) -> Result<(), AgentError> {
        let s = &row.value;
        let image = s.rescue.clone().unwrap_or_else(|| s.image.clone());
        let outcome = async {
            self.inner
                .hv
                .destroy(&s.id)
                .await
                .map_err(|e| e.to_string())?;
            self.spawn_as(s, row.revision, Some(&image)).await
        }
        .await;
        self.finish_task(row, started, |r| match &outcome {
            Ok(name) => {
                r.vm_state = VmState::Rescued;
                r.power_state = power::RUNNING;
                r.instance_name = Some(name.clone());
                r.rescue = Some(image.clone());
                r.fault = None;
            }
            Err(e) => fail(r, &format!("the rescue failed: {e}")),
        })
        .await
    }

    /// `unrescue`: the rescue domain and its overlay go and the server's own domain is defined
    /// and started again from its disk.
    async fn unrescue(
        &self,
        row: &Versioned<ServerRecord>,
        started: &str,
    ) -> Result<(), AgentError> {
        let s = &row.value;
        let outcome = async {
            self.inner
                .hv
                .destroy(&s.id)
                .await
                .map_err(|e| e.to_string())?;
            let _ = tokio::fs::remove_file(self.dir(&s.id).join(RESCUE_DISK)).await;
            self.spawn(s, row.revision).await
        }
        .await;
        self.finish_task(row, started, |r| match &outcome {
            Ok(name) => {
                r.vm_state = VmState::Active;
                r.power_state = power::RUNNING;
                r.instance_name = Some(name.clone());
                r.rescue = None;
                r.fault = None;
            }
            Err(e) => fail(r, &format!("the unrescue failed: {e}")),
        })
        .await
    }

    /// The steps of a resize that belong to this node when the row is not (or not only)
    /// placed here: the target's finish and the first half of a revert, the source's confirm,
    /// the second half of a revert, and its copy's removal when the server is deleted.
    async fn migration_step(
        &self,
        row: &Versioned<ServerRecord>,
        started: &str,
    ) -> Result<(), AgentError> {
        let s = &row.value;
        let me = self.me();
        if s.evacuated_from(me) {
            return self.destroy_evacuated(row).await;
        }
        let Some(m) = &s.migration else {
            return Ok(());
        };
        let here = s.host.as_deref() == Some(me);
        match s.task_state {
            Some(TaskState::ResizeMigrated | TaskState::ResizeFinish) if m.dest_host == me => {
                self.finish_resize(row, started).await
            }
            Some(TaskState::ResizeConfirming) if m.source_host == me => {
                self.confirm_resize(row, started).await
            }
            Some(TaskState::ResizeReverting) if m.dest_host == me && !m.dest_released => {
                self.revert_on_target(row).await
            }
            Some(TaskState::ResizeReverting) if m.source_host == me && m.dest_released && here => {
                self.revert_on_source(row, started).await
            }
            Some(TaskState::Deleting) if m.source_host == me && !here => {
                self.remove_resize_dir(&s.id).await;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// On the host a server was evacuated from, once it runs again (Nova's
    /// `_destroy_evacuated_instances`): the domain and the instance directory it left go; the
    /// row is not touched but for the migration, which is `completed` once the target has
    /// rebuilt the server (`done`). Until then the next row brings the worker back here.
    async fn destroy_evacuated(&self, row: &Versioned<ServerRecord>) -> Result<(), AgentError> {
        let s = &row.value;
        let me = self.me();
        self.inner.hv.destroy(&s.id).await?;
        if tokio::fs::try_exists(self.dir(&s.id))
            .await
            .unwrap_or(false)
        {
            tracing::info!(server = %s.id, "removing the copy of a server evacuated from here");
            self.remove_instance_dir(&s.id).await;
        }
        if !s.past_migrations.iter().any(|m| m.evacuated_from(me)) {
            return Ok(());
        }
        let now = now_rfc3339();
        let mut r = s.clone();
        for m in r
            .past_migrations
            .iter_mut()
            .filter(|m| m.evacuated_from(me))
        {
            m.status = "completed".into();
            m.updated = now.clone();
        }
        r.updated = now;
        if self.write_row(&r, row.revision).await?.is_none() {
            tracing::debug!(server = %r.id, "row changed while completing its evacuation");
        }
        Ok(())
    }

    async fn remove_resize_dir(&self, id: &str) {
        let dir = resize_dir(&self.inner.cfg.instances_path, id);
        if let Err(e) = tokio::fs::remove_dir_all(&dir).await {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(server = %id, error = %e, "cannot remove the resize directory");
            }
        }
    }

    /// On the source (Nova's `resize_instance`): task `resize_migrating`, the domain powered
    /// off cleanly and undefined, the instance directory set aside as `<uuid>_resize` (what
    /// the target pulls and a revert restores), then `resize_migrated` for the target.
    async fn resize_prep(
        &self,
        row: &Versioned<ServerRecord>,
        started: &str,
    ) -> Result<(), AgentError> {
        let s = &row.value;
        let Some(row) = self
            .advance(row, |r| {
                r.task_state = Some(TaskState::ResizeMigrating);
                r.record_outcome(TaskState::ResizePrep, started, &now_rfc3339(), true);
                if let Some(m) = &mut r.migration {
                    m.status = "migrating".into();
                    m.updated = now_rfc3339();
                }
            })
            .await?
        else {
            return Ok(());
        };
        let hv = &self.inner.hv;
        let moved = async {
            hv.stop(&s.id, self.inner.cfg.stop_grace)
                .await
                .map_err(|e| e.to_string())?;
            hv.destroy(&s.id).await.map_err(|e| e.to_string())?;
            let (dir, aside) = (
                self.dir(&s.id),
                resize_dir(&self.inner.cfg.instances_path, &s.id),
            );
            tokio::task::spawn_blocking(move || {
                // A step that ran before (this node restarted part way) moved it already.
                if !dir.exists() && aside.exists() {
                    return Ok(());
                }
                match std::fs::remove_dir_all(&aside) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(format!("removing {}: {e}", aside.display()))
                    }
                    _ => {}
                }
                std::fs::rename(&dir, &aside)
                    .map_err(|e| format!("setting {} aside: {e}", dir.display()))
            })
            .await
            .map_err(|_| "the resize task was cancelled".to_owned())?
        }
        .await;
        let now = now_rfc3339();
        match moved {
            Ok(()) => {
                self.advance(&row, |r| {
                    r.task_state = Some(TaskState::ResizeMigrated);
                    r.power_state = power::SHUTDOWN;
                    r.record_outcome(TaskState::ResizeMigrating, started, &now, true);
                    if let Some(m) = &mut r.migration {
                        m.status = "post-migrating".into();
                        m.updated = now.clone();
                    }
                })
                .await?;
                tracing::info!(server = %s.id, "resize: disks set aside for the target");
                Ok(())
            }
            Err(e) => {
                tracing::warn!(server = %s.id, error = %e, "resize: the source step failed");
                // The target's claim goes back; the server stays here, in ERROR.
                self.abandon_migration(&row, &format!("the resize failed: {e}"))
                    .await
            }
        }
    }

    /// Ends a migration that failed before the target started the server: its claim is
    /// released with the row, which stays on the source in ERROR.
    async fn abandon_migration(
        &self,
        row: &Versioned<ServerRecord>,
        why: &str,
    ) -> Result<(), AgentError> {
        let s = &row.value;
        let mut r = s.clone();
        let Some(mut m) = r.migration.take() else {
            return Ok(());
        };
        m.status = "error".into();
        m.updated = now_rfc3339();
        push_past(&mut r, m);
        fail(&mut r, why);
        r.task_state = None;
        r.updated = now_rfc3339();
        let value = serde_json::to_vec(&r).expect("server records serialise");
        let rev = row.revision;
        let key = crate::server::Migration::claim_key(&s.id);
        if let Err(e) = placement::release(&self.inner.cluster, &key, |txn| {
            txn.when(tables::SERVERS, &s.id, shoal_types::Expect::Revision(rev))
                .put(tables::SERVERS, &s.id, value.clone())
        })
        .await
        {
            tracing::info!(server = %s.id, error = %e, "the failed resize was not recorded");
        }
        Ok(())
    }

    /// On the target (Nova's `finish_resize`): task `resize_finish`; the disks pulled from the
    /// source's `<uuid>_resize` (over the members' data transport, or copied when the source is
    /// this node), the root overlay put on this node's copy of its base image (pulled through
    /// the image cache) and grown to the new flavor's size; the domain defined with the new
    /// flavor and started (left off when the server was stopped). Then the row names this
    /// host, the new flavor and vm_state `resized`. A failure hands the server back to the
    /// source as a revert does.
    async fn finish_resize(
        &self,
        row: &Versioned<ServerRecord>,
        started: &str,
    ) -> Result<(), AgentError> {
        let Some(row) = self
            .advance(row, |r| r.task_state = Some(TaskState::ResizeFinish))
            .await?
        else {
            return Ok(());
        };
        let s = &row.value;
        let m = s.migration.clone().expect("a resize row has its migration");
        let mut target = s.clone();
        target.flavor = m.new_flavor.clone();
        target.host = Some(self.me().to_owned());
        let stopped = m.old_vm_state == VmState::Stopped;
        let outcome = async {
            self.receive_disks(s, &m).await?;
            let name = self.spawn(&target, row.revision).await?;
            if stopped {
                self.inner
                    .hv
                    .stop(&s.id, Duration::ZERO)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Ok::<_, String>(name)
        }
        .await;
        let now = now_rfc3339();
        match outcome {
            Ok(name) => {
                let done = self
                    .advance(&row, |r| {
                        r.host = Some(m.dest_host.clone());
                        r.flavor = m.new_flavor.clone();
                        r.instance_name = Some(name.clone());
                        r.vm_state = VmState::Resized;
                        r.power_state = if stopped {
                            power::SHUTDOWN
                        } else {
                            power::RUNNING
                        };
                        r.task_state = None;
                        r.fault = None;
                        r.record_outcome(TaskState::ResizeFinish, started, &now, true);
                        if let Some(m) = &mut r.migration {
                            m.status = "finished".into();
                            m.updated = now.clone();
                        }
                    })
                    .await?;
                if done.is_some() {
                    tracing::info!(server = %s.id, host = %m.dest_host, "resize finished");
                }
                Ok(())
            }
            Err(e) => {
                tracing::warn!(server = %s.id, error = %e, "resize: the target step failed; reverting");
                let _ = self.inner.hv.destroy(&s.id).await;
                if m.source_host != self.me() {
                    self.remove_instance_dir(&s.id).await;
                }
                let next = self
                    .advance(&row, |r| {
                        r.task_state = Some(TaskState::ResizeReverting);
                        r.record_outcome(TaskState::ResizeFinish, started, &now, false);
                        r.fault = Some(Fault {
                            code: 500,
                            message: format!("the resize failed on {}: {e}", m.dest_host),
                            created: now.clone(),
                        });
                        if let Some(m) = &mut r.migration {
                            m.status = "error".into();
                            m.updated = now.clone();
                        }
                    })
                    .await?;
                match next {
                    Some(next) => self.revert_on_target(&next).await,
                    None => Ok(()),
                }
            }
        }
    }

    /// Pulls the files the source set aside into this node's instance directory, puts the root
    /// overlay on this node's base image and grows it to the new flavor's root disk.
    async fn receive_disks(
        &self,
        s: &ServerRecord,
        m: &crate::server::Migration,
    ) -> Result<(), String> {
        let dir = self.dir(&s.id);
        let local = m.source_host == self.me();
        let aside = resize_dir(&self.inner.cfg.instances_path, &s.id);
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| format!("creating {}: {e}", dir.display()))?;
        for (index, file) in MIGRATION_FILES.iter().enumerate() {
            let part = dir.join(format!("{file}.part"));
            let got = if local {
                match tokio::fs::copy(aside.join(file), &part).await {
                    Ok(_) => true,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
                    Err(e) => return Err(format!("copying {file}: {e}")),
                }
            } else {
                self.inner
                    .images
                    .pull_migration_file(&m.source_host, &s.id, index as u8, &part)
                    .await
                    .map_err(|e| format!("pulling {file} from {}: {e}", m.source_host))?
            };
            if got {
                tokio::fs::rename(&part, dir.join(file))
                    .await
                    .map_err(|e| format!("placing {file}: {e}"))?;
            } else if index == 0 {
                return Err(format!("{} has no disk for the server", m.source_host));
            }
        }
        let disk = dir.join("disk");
        let backing = crate::migrate::backing_file(&disk)?;
        let base = match backing {
            // A standalone disk (an unshelved server's) has no base to find.
            None => None,
            Some(_) => Some(
                self.inner
                    .images
                    .fetch(&s.image.id)
                    .await
                    .map_err(|e| format!("image {}: {e}", s.image.id))?,
            ),
        };
        let format = s.image.disk_format.clone();
        let size = m.new_flavor.disk_gb << 30;
        tokio::task::spawn_blocking(move || {
            if let Some(base) = base {
                let fmt = if format == "qcow2" { "qcow2" } else { "raw" };
                crate::migrate::rebase(&disk, &base, fmt)?;
            }
            crate::migrate::grow(&disk, size)
        })
        .await
        .map_err(|_| "the disk task was cancelled".to_owned())?
    }

    /// First half of a revert, on the target (Nova's `revert_resize`): the domain and the
    /// target's copy go, and the target's claim is released with the row, which names the
    /// source and the old flavor again.
    async fn revert_on_target(&self, row: &Versioned<ServerRecord>) -> Result<(), AgentError> {
        let s = &row.value;
        let Some(m) = s.migration.clone() else {
            return Ok(());
        };
        if s.host.as_deref() == Some(self.me()) {
            self.inner.hv.destroy(&s.id).await?;
        }
        // On the same host the source's copy is `<uuid>_resize`, which stays.
        self.remove_instance_dir(&s.id).await;
        let mut r = s.clone();
        r.host = Some(m.source_host.clone());
        r.flavor = m.old_flavor.clone();
        r.updated = now_rfc3339();
        if let Some(m) = &mut r.migration {
            m.dest_released = true;
            m.updated = now_rfc3339();
        }
        let value = serde_json::to_vec(&r).expect("server records serialise");
        let rev = row.revision;
        let key = crate::server::Migration::claim_key(&s.id);
        let released = placement::release(&self.inner.cluster, &key, |txn| {
            txn.when(tables::SERVERS, &s.id, shoal_types::Expect::Revision(rev))
                .put(tables::SERVERS, &s.id, value.clone())
        })
        .await;
        match released {
            // The source (this node too, for a resize on one host) sees the row next.
            Ok(()) => {
                tracing::info!(server = %s.id, "revert: the target's copy and claim are gone")
            }
            Err(e) => tracing::info!(server = %s.id, error = %e, "revert step not recorded"),
        }
        Ok(())
    }

    /// Second half of a revert, on the source (Nova's `finish_revert_resize`): the directory
    /// set aside comes back and the server's domain is defined and started from it, with the old
    /// flavor; the server is what it was before the resize.
    async fn revert_on_source(
        &self,
        row: &Versioned<ServerRecord>,
        started: &str,
    ) -> Result<(), AgentError> {
        let s = &row.value;
        let Some(m) = s.migration.clone() else {
            return Ok(());
        };
        let stopped = m.old_vm_state == VmState::Stopped;
        let outcome = async {
            let (dir, aside) = (
                self.dir(&s.id),
                resize_dir(&self.inner.cfg.instances_path, &s.id),
            );
            tokio::task::spawn_blocking(move || {
                if aside.exists() {
                    let _ = std::fs::remove_dir_all(&dir);
                    std::fs::rename(&aside, &dir)
                        .map_err(|e| format!("restoring {}: {e}", dir.display()))?;
                }
                Ok::<_, String>(())
            })
            .await
            .map_err(|_| "the revert task was cancelled".to_owned())??;
            let name = self.spawn(s, row.revision).await?;
            if stopped {
                self.inner
                    .hv
                    .stop(&s.id, Duration::ZERO)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Ok::<_, String>(name)
        }
        .await;
        let now = now_rfc3339();
        self.finish(row, |r| {
            r.record_outcome(TaskState::ResizeReverting, started, &now, outcome.is_ok());
            if let Some(mut m) = r.migration.take() {
                if m.status != "error" {
                    m.status = "reverted".into();
                }
                m.updated = now.clone();
                push_past(r, m);
            }
            match &outcome {
                Ok(name) => {
                    r.instance_name = Some(name.clone());
                    r.vm_state = m.old_vm_state;
                    r.power_state = if stopped {
                        power::SHUTDOWN
                    } else {
                        power::RUNNING
                    };
                }
                Err(e) => fail(r, &format!("the revert failed: {e}")),
            }
        })
        .await?;
        tracing::info!(server = %s.id, "revert finished");
        Ok(())
    }

    /// On the source (Nova's `confirm_resize`): the directory set aside goes, and the source's
    /// claim is released while the target's becomes the server's own, with the row (vm_state
    /// back to what it was, no migration in progress) in one transaction.
    async fn confirm_resize(
        &self,
        row: &Versioned<ServerRecord>,
        started: &str,
    ) -> Result<(), AgentError> {
        let s = &row.value;
        self.remove_resize_dir(&s.id).await;
        let now = now_rfc3339();
        let mut r = s.clone();
        let Some(mut m) = r.migration.take() else {
            return Ok(());
        };
        r.vm_state = if r.power_state == power::RUNNING {
            VmState::Active
        } else {
            VmState::Stopped
        };
        r.record_outcome(TaskState::ResizeConfirming, started, &now, true);
        r.task_state = None;
        r.updated = now.clone();
        m.status = "confirmed".into();
        m.updated = now;
        push_past(&mut r, m);
        let value = serde_json::to_vec(&r).expect("server records serialise");
        let rev = row.revision;
        let key = crate::server::Migration::claim_key(&s.id);
        match placement::confirm_migration(&self.inner.cluster, &s.id, &key, |txn| {
            txn.when(tables::SERVERS, &s.id, shoal_types::Expect::Revision(rev))
                .put(tables::SERVERS, &s.id, value.clone())
        })
        .await
        {
            Ok(()) => tracing::info!(server = %s.id, "resize confirmed"),
            Err(e) => tracing::info!(server = %s.id, error = %e, "confirm not recorded"),
        }
        Ok(())
    }

    /// A resized server left unconfirmed for `resize_confirm_window` is confirmed (Nova's
    /// `_poll_unconfirmed_resizes`), on the power-state sync.
    async fn confirm_when_due(&self, row: &Versioned<ServerRecord>) -> Result<(), AgentError> {
        let (Some(window), Some(m)) = (self.inner.cfg.resize_confirm_window, &row.value.migration)
        else {
            return Ok(());
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let cutoff = shoal_state::time::rfc3339(now.saturating_sub(window.as_secs()));
        if m.updated.as_str() <= cutoff.as_str() {
            tracing::info!(server = %row.value.id, "the resize confirm window passed; confirming");
            self.advance(row, |r| {
                r.task_state = Some(TaskState::ResizeConfirming);
                if let Some(m) = &mut r.migration {
                    m.status = "confirming".into();
                }
            })
            .await?;
        }
        Ok(())
    }
}

/// Keeps a finished migration in the row's history (the newest [`MAX_MIGRATIONS`]).
fn push_past(r: &mut ServerRecord, m: crate::server::Migration) {
    r.keep_past_migration(m);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The peek at a row's hosts says what [`Agent::involves`] says of the decoded row, for an
    /// unplaced row, a placed one and one migrating between two hosts.
    #[test]
    fn the_hosts_peek_agrees_with_the_decoded_row() {
        let mut r = crate::server::tests::record();
        r.host = None;
        let bytes = serde_json::to_vec(&r).unwrap();
        let h = Hosts::of(&bytes).unwrap();
        assert!(!h.involve("n1"));
        r.host = Some("n1".into());
        let bytes = serde_json::to_vec(&r).unwrap();
        let h = Hosts::of(&bytes).unwrap();
        assert!(h.involve("n1") && !h.involve("n2"));
        // A resize from n1 to n3 (the other fields of the migration are skipped).
        let mut v = serde_json::to_value(&r).unwrap();
        v["host"] = serde_json::Value::Null;
        v["migration"] = serde_json::json!({"id": 1, "kind": "resize", "source_host": "n1",
            "dest_host": "n3", "status": "migrating"});
        let bytes = serde_json::to_vec(&v).unwrap();
        let h = Hosts::of(&bytes).unwrap();
        assert!(h.involve("n1") && h.involve("n3") && !h.involve("n2"));
        assert!(Hosts::of(b"not json").is_none());
    }

    /// A server evacuated from n1 to n2 involves n1 until n1 has removed its copy (the
    /// migration `completed`), in the peek and in the decoded row alike; a failed evacuation
    /// leaves n1's copy alone, and a server back on n1 is n1's own again.
    #[test]
    fn an_evacuation_involves_its_source_until_completed() {
        let mut r = crate::server::tests::record();
        r.host = Some("n2".into());
        let m = crate::server::Migration {
            id: 1,
            kind: crate::server::EVACUATION.into(),
            source_host: "n1".into(),
            dest_host: "n2".into(),
            old_flavor: r.flavor.clone(),
            new_flavor: r.flavor.clone(),
            status: "done".into(),
            old_vm_state: VmState::Active,
            created: String::new(),
            updated: String::new(),
            dest_released: false,
        };
        let peek = |r: &ServerRecord, me: &str| {
            let bytes = serde_json::to_vec(r).unwrap();
            Hosts::of(&bytes).unwrap().involve(me)
        };
        r.keep_past_migration(m.clone());
        assert!(r.evacuated_from("n1") && peek(&r, "n1"));
        assert!(!r.evacuated_from("n3") && !peek(&r, "n3"));
        assert!(
            !r.evacuated_from("n2"),
            "the target holds the server itself"
        );
        r.past_migrations[0].status = "completed".into();
        assert!(!r.evacuated_from("n1") && !peek(&r, "n1"));
        r.past_migrations[0].status = "failed".into();
        assert!(!r.evacuated_from("n1") && !peek(&r, "n1"));
        // In progress: the source drops its copy already.
        r.past_migrations.clear();
        r.migration = Some(crate::server::Migration {
            status: "accepted".into(),
            ..m.clone()
        });
        assert!(r.evacuated_from("n1") && peek(&r, "n1"));
        // Back on n1 (a later move): nothing of it is removed.
        r.migration = None;
        r.keep_past_migration(m);
        r.host = Some("n1".into());
        assert!(!r.evacuated_from("n1"));
    }
}
