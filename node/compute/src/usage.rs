//! Server history: what is left of a deleted server, and the usage Nova's
//! `os-simple-tenant-usage` reports from live and deleted servers.
//!
//! Nova soft-deletes an instance row (`deleted != 0`, `terminated_at` set) and keeps it until
//! an operator archives it. Shoal keeps a deleted server as a small tombstone in a table of its
//! own (`deleted_servers`), written in the same transaction that removes the server's row, so
//! nothing that walks the `servers` table (the scheduler's host view, the compute agents,
//! server groups, quotas) ever meets a deleted server, and a tombstone holds no claim, no port
//! and no quota. A tombstone is kept for `[compute] deleted_server_retention_secs`: past that
//! it is invisible to every reader (the rule is a pure function of its `terminated_at`, the
//! same on every node) and the Raft leader's purge pass deletes it.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_consensus::cluster::Cluster;
use shoal_state::time::{now_secs, parse_iso8601};
use shoal_state::{tables, Expect, Txn};

use crate::server::{power, FlavorSnapshot, ImageSnapshot, ServerRecord, VmState};

/// The default of `[compute] deleted_server_retention_secs`: three days.
pub const DEFAULT_RETENTION_SECS: u64 = 3 * 86_400;

/// What a deleted server leaves: what the usage report and a listing of deleted servers show,
/// nothing else (no ports, metadata, user data or action log).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeletedServer {
    pub id: String,
    pub name: String,
    pub project_id: String,
    pub user_id: String,
    /// The flavor the server ran with, without its extra specs.
    pub flavor: FlavorSnapshot,
    pub image_id: String,
    pub availability_zone: String,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub instance_name: Option<String>,
    #[serde(default)]
    pub key_name: Option<String>,
    #[serde(default)]
    pub reservation_id: String,
    /// RFC 3339, UTC.
    pub created: String,
    #[serde(default)]
    pub launched_at: Option<String>,
    /// When the server's row went: Nova's `terminated_at` and `deleted_at`.
    pub terminated_at: String,
    /// The server's action log, the delete last: `os-instance-actions` of a deleted server
    /// (microversion 2.21).
    #[serde(default)]
    pub actions: Vec<crate::server::InstanceAction>,
    /// Shown from microversion 2.19, for a deleted server too.
    #[serde(default)]
    pub description: Option<String>,
}

impl DeletedServer {
    /// The tombstone of `r`, deleted at `now` (RFC 3339).
    pub fn of(r: &ServerRecord, now: &str) -> DeletedServer {
        let mut flavor = r.flavor.clone();
        flavor.extra_specs.clear();
        DeletedServer {
            id: r.id.clone(),
            name: r.name.clone(),
            project_id: r.project_id.clone(),
            user_id: r.user_id.clone(),
            flavor,
            image_id: r.image.id.clone(),
            availability_zone: r.availability_zone.clone(),
            host: r.host.clone(),
            instance_name: r.instance_name.clone(),
            key_name: r.key_name.clone(),
            reservation_id: r.reservation_id.clone(),
            created: r.created.clone(),
            launched_at: r.launched_at.clone(),
            terminated_at: now.to_owned(),
            actions: r.actions.clone(),
            description: r.description.clone(),
        }
    }

    /// Whether the tombstone is past its retention at `now` (seconds since the epoch). A
    /// `terminated_at` that does not parse is kept rather than lost.
    pub fn expired(&self, now: u64, retention: Duration) -> bool {
        parse_iso8601(&self.terminated_at)
            .is_some_and(|t| t.saturating_add(retention.as_secs() as i64) <= now as i64)
    }

    /// The server as Nova shows a deleted instance: vm_state `deleted` (status DELETED), no
    /// task, power state NOSTATE, no addresses, `updated` at its deletion.
    pub fn as_record(&self) -> ServerRecord {
        ServerRecord {
            id: self.id.clone(),
            name: self.name.clone(),
            project_id: self.project_id.clone(),
            user_id: self.user_id.clone(),
            flavor: self.flavor.clone(),
            image: ImageSnapshot {
                id: self.image_id.clone(),
                disk_format: String::new(),
                kernel_id: None,
                ramdisk_id: None,
                kernel_cmdline: None,
            },
            key_name: self.key_name.clone(),
            key_data: None,
            user_data: None,
            metadata: BTreeMap::new(),
            security_groups: Vec::new(),
            ports: Vec::new(),
            availability_zone: self.availability_zone.clone(),
            host: self.host.clone(),
            vm_state: VmState::Deleted,
            task_state: None,
            power_state: power::NOSTATE,
            fault: None,
            launch_index: 0,
            reservation_id: self.reservation_id.clone(),
            instance_name: self.instance_name.clone(),
            created: self.created.clone(),
            updated: self.terminated_at.clone(),
            launched_at: self.launched_at.clone(),
            access_ipv4: String::new(),
            access_ipv6: String::new(),
            locked: false,
            config_drive: false,
            actions: Vec::new(),
            snapshot_image: None,
            shelved: None,
            backup: None,
            rescue: None,
            migration: None,
            past_migrations: Vec::new(),
            tags: Default::default(),
            description: self.description.clone(),
            crash_dump: None,
        }
    }
}

/// `txn` with the server's row deleted and its tombstone written, in the one transaction.
pub fn bury(txn: Txn, r: &ServerRecord, now: &str) -> Txn {
    let tomb = serde_json::to_vec(&DeletedServer::of(r, now)).expect("records serialise");
    txn.delete(tables::SERVERS, &r.id)
        .put(tables::DELETED_SERVERS, &r.id, tomb)
}

/// How often the purge pass runs on the leader.
pub const PURGE_INTERVAL: Duration = Duration::from_secs(60);

/// Deletes the tombstones past `retention`, each only if it is still the row that was read.
/// Returns how many went. Run on one node (the leader); a second runner would only find its
/// deletes already done.
pub async fn purge(cluster: &Cluster, retention: Duration) -> Result<usize, String> {
    let rows = cluster
        .list(tables::DELETED_SERVERS, "", usize::MAX)
        .await
        .map_err(|e| e.to_string())?;
    let now = now_secs();
    let mut purged = 0;
    for (key, row) in rows {
        let Ok(tomb) = serde_json::from_slice::<DeletedServer>(&row.value) else {
            tracing::warn!(key, "a tombstone that does not decode is left alone");
            continue;
        };
        if !tomb.expired(now, retention) {
            continue;
        }
        let txn = Txn::new()
            .when(
                tables::DELETED_SERVERS,
                &key,
                Expect::Revision(row.mod_revision),
            )
            .delete(tables::DELETED_SERVERS, &key);
        if cluster
            .write(txn)
            .await
            .map_err(|e| e.to_string())?
            .succeeded
        {
            purged += 1;
        }
    }
    Ok(purged)
}

/// The purge loop every node runs; only the Raft leader of the moment does the work.
pub async fn run_purge(
    cluster: Cluster,
    retention: Duration,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    let every = PURGE_INTERVAL.min(retention.max(Duration::from_secs(1)));
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(every) => {}
        }
        if cluster.metrics().current_leader != Some(cluster.id()) {
            continue;
        }
        match purge(&cluster, retention).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(purged = n, "purged deleted servers past their retention"),
            Err(e) => tracing::warn!(error = %e, "cannot purge deleted servers"),
        }
    }
}

/// One server's part of a usage report (Nova's `server_usages` entry).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServerUsage {
    pub instance_id: String,
    pub name: String,
    pub tenant_id: String,
    pub flavor: String,
    pub vcpus: u32,
    pub memory_mb: u64,
    /// Root plus ephemeral disk, as Nova counts it.
    pub local_gb: u64,
    pub hours: f64,
    /// `terminated` for a deleted server, else its vm_state.
    pub state: String,
    /// `YYYY-MM-DDTHH:MM:SS.ffffff`, as Nova renders naive UTC times.
    pub started_at: String,
    pub ended_at: Option<String>,
    /// Seconds from launch to deletion, or to now.
    pub uptime: i64,
}

/// A project's usage over a window (Nova's `tenant_usage`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TenantUsage {
    pub tenant_id: String,
    pub total_hours: f64,
    pub total_vcpus_usage: f64,
    pub total_memory_mb_usage: f64,
    pub total_local_gb_usage: f64,
    pub start: String,
    pub stop: String,
    pub server_usages: Vec<ServerUsage>,
}

/// A server as the usage report sees it: its record, and when it was terminated (seconds).
#[derive(Debug)]
pub struct Usable<'a> {
    pub record: &'a ServerRecord,
    pub terminated_at: Option<i64>,
}

/// Nova's naive UTC rendering with microseconds.
pub fn naive(secs: i64) -> String {
    let t = shoal_state::time::iso8601(secs.max(0) as u64);
    t.trim_end_matches('Z').to_owned()
}

/// Nova's `_hours_for`: the hours of `[launched, terminated)` inside `[start, stop)`.
fn hours_for(launched: i64, terminated: Option<i64>, start: i64, stop: i64) -> f64 {
    if terminated.is_some_and(|t| t < start) || launched > stop {
        return 0.0;
    }
    let from = launched.max(start);
    let to = terminated.map_or(stop, |t| t.min(stop));
    (to - from).max(0) as f64 / 3600.0
}

/// Nova's `_tenant_usages_for_period`: every server launched before `stop` and not terminated
/// before `start`, grouped by project in the order met. Servers never launched are left out.
pub fn tenant_usages(servers: &[Usable<'_>], start: i64, stop: i64, now: i64) -> Vec<TenantUsage> {
    let mut out: Vec<TenantUsage> = Vec::new();
    for s in servers {
        let r = s.record;
        let Some(launched) = r.launched_at.as_deref().and_then(parse_iso8601) else {
            continue;
        };
        if launched >= stop || s.terminated_at.is_some_and(|t| t <= start) {
            continue;
        }
        let hours = hours_for(launched, s.terminated_at, start, stop);
        let usage = ServerUsage {
            instance_id: r.id.clone(),
            name: r.name.clone(),
            tenant_id: r.project_id.clone(),
            flavor: r.flavor.name.clone(),
            vcpus: r.flavor.vcpus,
            memory_mb: r.flavor.ram_mb,
            local_gb: r.flavor.disk_gb + r.flavor.ephemeral_gb,
            hours,
            state: match s.terminated_at {
                Some(_) => "terminated".to_owned(),
                None => r.vm_state.as_str().to_owned(),
            },
            started_at: naive(launched),
            ended_at: s.terminated_at.map(naive),
            uptime: s.terminated_at.unwrap_or(now) - launched,
        };
        let at = match out.iter().position(|t| t.tenant_id == r.project_id) {
            Some(i) => i,
            None => {
                out.push(TenantUsage {
                    tenant_id: r.project_id.clone(),
                    total_hours: 0.0,
                    total_vcpus_usage: 0.0,
                    total_memory_mb_usage: 0.0,
                    total_local_gb_usage: 0.0,
                    start: naive(start),
                    stop: naive(stop),
                    server_usages: Vec::new(),
                });
                out.len() - 1
            }
        };
        let t = &mut out[at];
        t.total_hours += hours;
        t.total_vcpus_usage += f64::from(usage.vcpus) * hours;
        t.total_memory_mb_usage += usage.memory_mb as f64 * hours;
        t.total_local_gb_usage += usage.local_gb as f64 * hours;
        t.server_usages.push(usage);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::tests::record;

    fn at(t: &str) -> i64 {
        parse_iso8601(t).unwrap()
    }

    #[test]
    fn a_tombstone_keeps_only_what_usage_and_listing_need() {
        let mut r = record();
        r.flavor.extra_specs.insert("hw:cpu".into(), "x".into());
        r.metadata.insert("k".into(), "v".into());
        r.user_data = Some("aGk=".into());
        r.record_action("create", "req", "u", "t");
        let tomb = DeletedServer::of(&r, "2026-12-06T10:00:00Z");
        assert!(tomb.flavor.extra_specs.is_empty());
        let shown = tomb.as_record();
        assert_eq!(shown.status(), "DELETED");
        assert_eq!(shown.updated, "2026-12-06T10:00:00Z");
        assert!(shown.metadata.is_empty() && shown.actions.is_empty());
        assert_eq!(shown.flavor.vcpus, r.flavor.vcpus);
        let json = serde_json::to_string(&tomb).unwrap();
        assert!(!json.contains("aGk=") && !json.contains("hw:cpu"), "{json}");
    }

    #[test]
    fn retention_is_a_rule_of_the_termination_time() {
        let mut r = record();
        r.launched_at = Some("2026-12-01T00:00:00Z".into());
        let tomb = DeletedServer::of(&r, "2026-12-06T00:00:00Z");
        let t = at("2026-12-06T00:00:00Z") as u64;
        let day = Duration::from_secs(86_400);
        assert!(!tomb.expired(t, day));
        assert!(!tomb.expired(t + 86_399, day));
        assert!(tomb.expired(t + 86_400, day));
        assert!(tomb.expired(t, Duration::ZERO));
        let mut odd = tomb.clone();
        odd.terminated_at = "yesterday".into();
        assert!(!odd.expired(u64::MAX / 2, day));
    }

    #[test]
    fn usage_counts_the_hours_inside_the_window_as_nova_does() {
        let mut live = record();
        live.project_id = "p1".into();
        live.launched_at = Some("2026-12-06T10:00:00Z".into());
        live.flavor.disk_gb = 1;
        live.flavor.ephemeral_gb = 2;
        let mut dead = record();
        dead.id = "dead".into();
        dead.project_id = "p1".into();
        dead.launched_at = Some("2026-12-06T08:00:00Z".into());
        let mut before = record();
        before.id = "before".into();
        before.launched_at = Some("2026-12-01T00:00:00Z".into());
        let mut unlaunched = record();
        unlaunched.id = "never".into();
        unlaunched.launched_at = None;
        let servers = [
            Usable {
                record: &live,
                terminated_at: None,
            },
            Usable {
                record: &dead,
                terminated_at: Some(at("2026-12-06T11:00:00Z")),
            },
            Usable {
                record: &before,
                terminated_at: Some(at("2026-12-02T00:00:00Z")),
            },
            Usable {
                record: &unlaunched,
                terminated_at: None,
            },
        ];
        let start = at("2026-12-06T09:00:00Z");
        let stop = at("2026-12-06T12:00:00Z");
        let now = at("2026-12-06T11:30:00Z");
        let usages = tenant_usages(&servers, start, stop, now);
        assert_eq!(usages.len(), 1);
        let u = &usages[0];
        assert_eq!(u.tenant_id, "p1");
        assert_eq!(u.start, "2026-12-06T09:00:00.000000");
        assert_eq!(u.server_usages.len(), 2);
        let (l, d) = (&u.server_usages[0], &u.server_usages[1]);
        // Live: 10:00 to the end of the window; deleted: the window's start to 11:00.
        assert_eq!((l.hours, d.hours), (2.0, 2.0));
        assert_eq!(l.state, "active");
        assert_eq!(l.local_gb, 3);
        assert_eq!(l.uptime, 5400);
        assert_eq!(l.ended_at, None);
        assert_eq!(d.state, "terminated");
        assert_eq!(d.ended_at.as_deref(), Some("2026-12-06T11:00:00.000000"));
        assert_eq!(d.uptime, 3 * 3600);
        assert_eq!(u.total_hours, 4.0);
        assert_eq!(u.total_vcpus_usage, 4.0);
        assert_eq!(u.total_memory_mb_usage, 4.0 * 512.0);
        assert_eq!(u.total_local_gb_usage, 2.0 * 3.0 + 2.0);
        // A window before every launch is empty.
        assert!(tenant_usages(&servers, start - 86_400 * 30, start - 86_400 * 20, now).is_empty());
    }

    /// On a real one-node cluster: a server buried leaves only its tombstone; the purge
    /// deletes the tombstones past their retention and leaves the others, and finds nothing
    /// more to do the second time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn purge_deletes_only_expired_tombstones() {
        use crate::host_view::tests::{options, tokio_util_stop};
        let dir = tempfile::tempdir().unwrap();
        let c = Cluster::init(options(dir.path())).await.unwrap();
        let stop = tokio_util_stop();
        tokio::spawn(c.clone().run(stop.1));
        c.read_barrier().await.unwrap();
        let mut old = record();
        old.id = "old".into();
        let fresh = record();
        let value = serde_json::to_vec(&fresh).unwrap();
        let txn = Txn::new().put(tables::SERVERS, &fresh.id, value);
        assert!(c.write(txn).await.unwrap().succeeded);
        let now = shoal_state::time::now_rfc3339();
        let txn = bury(Txn::new(), &fresh, &now);
        assert!(c.write(txn).await.unwrap().succeeded);
        let long_ago = shoal_state::time::rfc3339(now_secs() - 10 * 86_400);
        let txn = bury(Txn::new(), &old, &long_ago);
        assert!(c.write(txn).await.unwrap().succeeded);
        assert!(c.get(tables::SERVERS, &fresh.id).await.unwrap().is_none());

        let retention = Duration::from_secs(DEFAULT_RETENTION_SECS);
        assert_eq!(purge(&c, retention).await.unwrap(), 1);
        let left = c
            .list(tables::DELETED_SERVERS, "", usize::MAX)
            .await
            .unwrap();
        let keys: Vec<&str> = left.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, [fresh.id.as_str()]);
        assert_eq!(purge(&c, retention).await.unwrap(), 0);
        drop(stop.0);
    }
}
