//! The scheduler's host view, kept current by watches instead of read from every row per
//! request.
//!
//! A [`HostView`] lists `hosts`, `aggregates` and `compute_services` once, each at the exact
//! revision of its listing, and then applies each table's watch stream in order. Every watch
//! carries a progress mark (`shoal_consensus::store::WatchProgress`): read the mark, drain the
//! stream, and the table is complete through the mark. The view's `revision` is the least of
//! the three, so a view whose revision reaches a read barrier's index holds what a listing
//! after that barrier would return.
//!
//! Placement ([`crate::placement::place_with`]) schedules its first attempt from the view
//! without waiting; the state machine checks each claim against the host's usage when it
//! applies, so a stale view costs a retry, never a double booking. Correctness never depends on the view: a "no valid
//! host" is always confirmed from a listing read after a barrier, and a retry uses the view only
//! when it has caught up with the retry's barrier (and never twice in a row after a conflict).
//!
//! The `instances` table is not watched: only requests with server-group, same/different-host
//! or JSON-query hints read which instances a host runs, and they read the table
//! (`placement::fill_instances`) after the group row they are conditioned on.
//!
//! A watch that ends (an error, the store closing) is resumed from the view's revision, keeping
//! the rows; only a resume older than the retained history (`WatchError::Compacted`) lists the
//! table again. A row that does not decode makes the view unusable until it changes: placement
//! then reads the listing, which reports the corrupt row.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use shoal_consensus::cluster::Cluster;
use shoal_consensus::store::{WatchError, WatchProgress, WatchStream};
use shoal_scheduler::{Aggregate, Host};
use shoal_types::{EventKind, Row, WatchEvent};
use tokio::sync::Mutex;

use crate::placement::{
    compose, decode_aggregate, decode_host, decode_service, AggregateRow, HostError, ServiceRow,
    AGGREGATES, COMPUTE_SERVICES, HOSTS,
};

/// Why the view could not catch up; only logged: placement then reads the tables.
#[derive(Debug, thiserror::Error)]
enum ViewError {
    #[error(transparent)]
    Rows(#[from] HostError),
    #[error("the watch of table {0} cannot start")]
    Watch(&'static str, #[source] WatchError),
}

impl From<shoal_consensus::cluster::ClusterError> for ViewError {
    fn from(e: shoal_consensus::cluster::ClusterError) -> Self {
        ViewError::Rows(HostError::Cluster(e))
    }
}

/// One table's rows as of `revision`, decoded once when they arrive.
#[derive(Debug)]
pub(crate) struct Rows<T> {
    table: &'static str,
    decode: fn(&str, &Row) -> Result<T, HostError>,
    rows: BTreeMap<String, T>,
    /// Keys whose newest row does not decode.
    corrupt: BTreeSet<String>,
    /// Every change at or below this revision is applied (later ones may be too).
    revision: u64,
    /// Whether the table has been listed at all.
    loaded: bool,
    stream: Option<WatchStream>,
    /// How many times the table was listed (a resumed watch does not list).
    listings: u64,
}

impl<T> Rows<T> {
    fn new(table: &'static str, decode: fn(&str, &Row) -> Result<T, HostError>) -> Self {
        Self {
            table,
            decode,
            rows: BTreeMap::new(),
            corrupt: BTreeSet::new(),
            revision: 0,
            loaded: false,
            stream: None,
            listings: 0,
        }
    }

    /// Replaces the rows with a listing that is exact as of `revision`.
    fn load(&mut self, listing: Vec<(String, Row)>, revision: u64) {
        self.rows.clear();
        self.corrupt.clear();
        for (key, row) in listing {
            self.put(key, &row);
        }
        self.revision = revision;
        self.loaded = true;
        self.listings += 1;
    }

    fn put(&mut self, key: String, row: &Row) {
        match (self.decode)(&key, row) {
            Ok(v) => {
                self.corrupt.remove(&key);
                self.rows.insert(key, v);
            }
            Err(e) => {
                tracing::warn!(error = %e, "a row the host view cannot read");
                self.rows.remove(&key);
                self.corrupt.insert(key);
            }
        }
    }

    /// Applies one change; events arrive in revision order. Returns whether it was this table's.
    fn apply(&mut self, ev: WatchEvent) -> bool {
        if ev.table != self.table {
            return false;
        }
        match ev.kind {
            EventKind::Put(row) => self.put(ev.key, &row),
            EventKind::Delete => {
                self.rows.remove(&ev.key);
                self.corrupt.remove(&ev.key);
            }
        }
        true
    }

    /// Lists the table if it never was (or its watch fell behind the retained history), starts
    /// or resumes its watch from `revision + 1`, then applies what the watch holds: the table is
    /// then complete through the mark read before the drain. Returns whether a row changed.
    async fn catch_up(&mut self, cluster: &Cluster) -> Result<bool, ViewError> {
        let mut changed = false;
        if self.stream.is_none() {
            if !self.loaded {
                let (revision, listing) = cluster
                    .list_with_revision(self.table, "", usize::MAX)
                    .await?;
                self.load(listing, revision);
                changed = true;
            }
            match cluster.watch(self.table, "", self.revision + 1).await {
                Ok(s) => self.stream = Some(s),
                Err(WatchError::Compacted { .. }) => {
                    // Relist on the next round.
                    self.loaded = false;
                    return Ok(changed);
                }
                Err(e) => return Err(ViewError::Watch(self.table, e)),
            }
        }
        let mut stream = self.stream.take().expect("started above");
        let mark = stream.progress().get();
        loop {
            match stream.try_next() {
                None => break,
                Some(Ok(ev)) => changed |= self.apply(ev),
                Some(Err(e)) => {
                    if matches!(e, WatchError::Compacted { .. }) {
                        self.loaded = false;
                    } else {
                        tracing::info!(table = self.table, error = %e, "host view watch ended; resuming");
                    }
                    // Not complete through `mark`: the next round resumes from `revision`.
                    return Ok(changed);
                }
            }
        }
        self.stream = Some(stream);
        self.revision = self.revision.max(mark);
        Ok(changed)
    }

    fn progress(&self) -> Option<WatchProgress> {
        self.stream.as_ref().map(WatchStream::progress)
    }
}

/// The hosts, aggregates and services as placement composes them.
#[derive(Debug)]
pub struct Snapshot {
    /// The `hosts` rows as stored (generation = row revision).
    pub stored: Vec<Host>,
    /// The hosts as the scheduler sees them (services and aggregates applied).
    pub hosts: Vec<Host>,
    pub aggregates: Vec<Aggregate>,
}

/// A snapshot of the view and the revision the view is complete through.
pub type Viewed = (Arc<Snapshot>, u64);

#[derive(Debug)]
struct Inner {
    hosts: Rows<Host>,
    aggregates: Rows<AggregateRow>,
    services: Rows<ServiceRow>,
    /// The last composition, kept until a row changes.
    composed: Option<Arc<Snapshot>>,
}

impl Inner {
    async fn catch_up(&mut self, cluster: &Cluster) -> Result<(), ViewError> {
        let mut changed = self.hosts.catch_up(cluster).await?;
        changed |= self.aggregates.catch_up(cluster).await?;
        changed |= self.services.catch_up(cluster).await?;
        if changed {
            self.composed = None;
        }
        Ok(())
    }

    fn revision(&self) -> u64 {
        self.hosts
            .revision
            .min(self.aggregates.revision)
            .min(self.services.revision)
    }

    fn usable(&self) -> bool {
        [
            &self.hosts.corrupt,
            &self.aggregates.corrupt,
            &self.services.corrupt,
        ]
        .iter()
        .all(|c| c.is_empty())
            && self.hosts.loaded
            && self.aggregates.loaded
            && self.services.loaded
    }

    fn snapshot(&mut self) -> Viewed {
        let revision = self.revision();
        if let Some(s) = &self.composed {
            return (s.clone(), revision);
        }
        let stored: Vec<Host> = self.hosts.rows.values().cloned().collect();
        let disabled: BTreeSet<String> = self
            .services
            .rows
            .iter()
            .filter(|(_, s)| s.excluded())
            .map(|(k, _)| k.clone())
            .collect();
        let (hosts, aggregates) = compose(&stored, self.aggregates.rows.values(), &disabled);
        let s = Arc::new(Snapshot {
            stored,
            hosts,
            aggregates,
        });
        self.composed = Some(s.clone());
        (s, revision)
    }

    fn marks(&self) -> Vec<WatchProgress> {
        [
            self.hosts.progress(),
            self.aggregates.progress(),
            self.services.progress(),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

/// A node's host view; cheap to clone (one shared view).
#[derive(Debug, Clone)]
pub struct HostView {
    cluster: Cluster,
    inner: Arc<Mutex<Inner>>,
}

impl HostView {
    /// A view of `cluster`'s replica; nothing is read until the first use.
    pub fn new(cluster: Cluster) -> Self {
        Self {
            cluster,
            inner: Arc::new(Mutex::new(Inner {
                hosts: Rows::new(HOSTS, decode_host),
                aggregates: Rows::new(AGGREGATES, decode_aggregate),
                services: Rows::new(COMPUTE_SERVICES, decode_service),
                composed: None,
            })),
        }
    }

    /// The view as current as the watches are now, or `None` if it cannot be used (a row that
    /// does not decode, a watch that cannot start): the caller reads the tables instead.
    pub async fn current(&self) -> Option<Viewed> {
        let mut inner = self.inner.lock().await;
        if let Err(e) = inner.catch_up(&self.cluster).await {
            tracing::warn!(error = %e, "host view cannot catch up");
            return None;
        }
        inner.usable().then(|| inner.snapshot())
    }

    /// The view once it is complete through `revision` (a read barrier's index), waiting at
    /// most `wait` for the watches to deliver; `None` if it is not by then, or cannot be used.
    pub async fn at_least(&self, revision: u64, wait: Duration) -> Option<Viewed> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let marks = {
                let mut inner = self.inner.lock().await;
                if let Err(e) = inner.catch_up(&self.cluster).await {
                    tracing::warn!(error = %e, "host view cannot catch up");
                    return None;
                }
                if !inner.usable() {
                    return None;
                }
                if inner.revision() >= revision {
                    return Some(inner.snapshot());
                }
                inner.marks()
            };
            let reached = async {
                for mut m in marks {
                    if !m.wait_for(revision).await {
                        return;
                    }
                }
            };
            if tokio::time::timeout_at(deadline, reached).await.is_err() {
                return None;
            }
        }
    }

    /// Keeps applying the watches as entries are applied, so that a placement finds the view
    /// current and the watch channels never fill while no placement runs. Runs until `stop`.
    pub async fn run(self, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            let marks = {
                let mut inner = self.inner.lock().await;
                if let Err(e) = inner.catch_up(&self.cluster).await {
                    tracing::warn!(error = %e, "host view cannot catch up; retrying");
                }
                inner.marks()
            };
            let moved = async {
                if marks.len() < 3 {
                    // A watch is not running: retry after a pause.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    return;
                }
                let changes = marks
                    .into_iter()
                    .map(|mut m| Box::pin(async move { m.changed().await }));
                futures::future::select_all(changes).await;
                // Let a burst of applied entries gather before the next drain.
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            tokio::select! {
                _ = &mut stop => return,
                _ = moved => {}
            }
        }
    }

    #[cfg(test)]
    async fn drop_watches(&self) {
        let mut inner = self.inner.lock().await;
        inner.hosts.stream = None;
        inner.aggregates.stream = None;
        inner.services.stream = None;
    }

    #[cfg(test)]
    async fn listings(&self) -> u64 {
        let inner = self.inner.lock().await;
        inner.hosts.listings + inner.aggregates.listings + inner.services.listings
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::Path;

    use shoal_consensus::cluster::ClusterOptions;
    use shoal_types::Txn;

    use super::*;
    use crate::placement::{host_view, list_hosts};

    fn row(value: &str, revision: u64) -> Row {
        Row {
            value: value.as_bytes().to_vec(),
            create_revision: revision,
            mod_revision: revision,
            version: 1,
        }
    }

    fn put(table: &str, key: &str, value: &str, revision: u64) -> WatchEvent {
        WatchEvent {
            revision,
            table: table.into(),
            key: key.into(),
            kind: EventKind::Put(row(value, revision)),
        }
    }

    fn delete(table: &str, key: &str, revision: u64) -> WatchEvent {
        WatchEvent {
            revision,
            table: table.into(),
            key: key.into(),
            kind: EventKind::Delete,
        }
    }

    fn host_json(vcpus_used: u32) -> String {
        serde_json::json!({
            "name": "", "enabled": true, "up": true, "availability_zone": "nova",
            "vcpus_total": 8, "vcpus_used": vcpus_used, "ram_mb_total": 4096, "ram_mb_used": 0,
            "disk_gb_total": 10, "disk_mb_used": 0, "hypervisor_type": "QEMU",
            "architecture": "x86_64"
        })
        .to_string()
    }

    /// Rows follow the events in order: the newest put wins and carries its revision as the
    /// host's generation, a delete removes the row, a row that does not decode is remembered
    /// until a later change replaces it, and another table's events are ignored.
    #[test]
    fn rows_apply_puts_and_deletes_in_order() {
        let mut rows = Rows::new(HOSTS, decode_host);
        rows.load(vec![("a".into(), row(&host_json(1), 3))], 3);
        assert!(rows.apply(put(HOSTS, "b", &host_json(2), 4)));
        assert!(rows.apply(put(HOSTS, "a", &host_json(5), 5)));
        assert!(!rows.apply(put(AGGREGATES, "a", "{}", 6)));
        assert_eq!(rows.rows["a"].vcpus_used, 5);
        assert_eq!(rows.rows["a"].generation, 5);
        assert_eq!(rows.rows["a"].name, "a");
        assert!(rows.apply(delete(HOSTS, "b", 7)));
        assert_eq!(rows.rows.keys().collect::<Vec<_>>(), vec!["a"]);
        assert!(rows.apply(put(HOSTS, "c", "not json", 8)));
        assert!(rows.corrupt.contains("c") && !rows.rows.contains_key("c"));
        assert!(rows.apply(put(HOSTS, "c", &host_json(0), 9)));
        assert!(rows.corrupt.is_empty() && rows.rows.contains_key("c"));
        assert!(rows.apply(put(HOSTS, "c", "not json", 10)));
        assert!(rows.apply(delete(HOSTS, "c", 11)));
        assert!(rows.corrupt.is_empty() && !rows.rows.contains_key("c"));
    }

    fn free_udp_port() -> std::net::SocketAddr {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap()
    }

    pub(crate) fn options(dir: &Path) -> ClusterOptions {
        ClusterOptions {
            data_dir: dir.to_owned(),
            name: "n1".into(),
            raft_addr: free_udp_port(),
            api_addr: "127.0.0.1:9".parse().unwrap(),
            zone: "az1".into(),
            voters: 1,
            replace_after: Duration::from_secs(600),
            stabilization: Duration::from_millis(200),
            snapshot_every: 100_000,
            heartbeat_ms: 100,
            election_timeout_ms: 600,
            pre_vote: true,
        }
    }

    async fn write(c: &Cluster, txn: Txn) {
        assert!(c.write(txn).await.unwrap().succeeded);
    }

    /// What placement would read from the tables after a barrier, as the view holds it.
    async fn listed(c: &Cluster) -> (Vec<Host>, Vec<Host>, Vec<Aggregate>) {
        let stored = list_hosts(c).await.unwrap();
        let (hosts, aggregates) = host_view(c, &stored).await.unwrap();
        (stored, hosts, aggregates)
    }

    async fn viewed(v: &HostView, c: &Cluster) -> (Vec<Host>, Vec<Host>, Vec<Aggregate>) {
        let b = c.read_barrier().await.unwrap();
        let got = v.at_least(b, Duration::from_secs(10)).await;
        let (s, revision) = got.expect("the view reaches the barrier");
        assert!(revision >= b);
        (s.stored.clone(), s.hosts.clone(), s.aggregates.clone())
    }

    /// On a real one-node cluster: once the view reaches a read barrier it equals what the
    /// listing after that barrier composes (hosts with their generations, aggregates with
    /// their zones, disabled services), through puts, updates and deletes; and a watch that
    /// ended resumes from the view's revision without listing the tables again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn view_follows_the_tables_and_resumes_from_its_revision() {
        let dir = tempfile::tempdir().unwrap();
        let c = Cluster::init(options(dir.path())).await.unwrap();
        let stop = tokio_util_stop();
        tokio::spawn(c.clone().run(stop.1));
        c.read_barrier().await.unwrap();
        write(&c, Txn::new().put(HOSTS, "h1", host_json(0))).await;
        write(&c, Txn::new().put(HOSTS, "h2", host_json(1))).await;

        let v = HostView::new(c.clone());
        let first = viewed(&v, &c).await;
        assert_eq!(first, listed(&c).await);
        assert_eq!(first.0.len(), 2);
        assert_eq!(v.listings().await, 3, "each table listed once");

        // Changes after the listing arrive through the watches.
        let agg = r#"{"name": "fast", "hosts": ["h2"], "metadata": {"availability_zone": "az9", "ssd": "true"}}"#;
        write(&c, Txn::new().put(AGGREGATES, "1", agg)).await;
        write(
            &c,
            Txn::new().put(COMPUTE_SERVICES, "h1", r#"{"disabled": true}"#),
        )
        .await;
        write(&c, Txn::new().put(HOSTS, "h3", host_json(2))).await;
        write(&c, Txn::new().put(HOSTS, "h1", host_json(7))).await;
        let second = viewed(&v, &c).await;
        assert_eq!(second, listed(&c).await);
        let h2 = second.1.iter().find(|h| h.name == "h2").unwrap();
        assert_eq!(h2.availability_zone, "az9");
        assert!(!second.1.iter().find(|h| h.name == "h1").unwrap().enabled);
        assert_eq!(
            second.0.iter().find(|h| h.name == "h1").unwrap().vcpus_used,
            7
        );

        // The watches end; what is written meanwhile is replayed from the view's revision.
        v.drop_watches().await;
        write(&c, Txn::new().delete(HOSTS, "h3")).await;
        write(&c, Txn::new().delete(COMPUTE_SERVICES, "h1")).await;
        write(&c, Txn::new().put(HOSTS, "h2", host_json(4))).await;
        let third = viewed(&v, &c).await;
        assert_eq!(third, listed(&c).await);
        assert_eq!(third.0.len(), 2);
        assert!(third.1.iter().all(|h| h.enabled));
        assert_eq!(v.listings().await, 3, "resumed, not listed again");

        // The background task keeps the view current without a caller.
        let runner = tokio::spawn(v.clone().run(std::future::pending()));
        write(&c, Txn::new().put(HOSTS, "h4", host_json(0))).await;
        let b = c.read_barrier().await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while v.inner.lock().await.revision() < b {
            assert!(
                tokio::time::Instant::now() < deadline,
                "run() did not catch up"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        runner.abort();
        let _ = stop.0.send(());
        c.shutdown().await;
    }

    /// A new host starts at Nova's initial ratios (or the node's `initial_*`), a set ratio
    /// overrides them, and a host that exists keeps its own ratios when the node's change.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn new_host_takes_the_initial_ratios_an_existing_host_keeps_its_own() {
        use crate::placement::{nova_initial_ratios, upsert_host, Capacity, HostSpec};
        let dir = tempfile::tempdir().unwrap();
        let c = Cluster::init(options(dir.path())).await.unwrap();
        let stop = tokio_util_stop();
        tokio::spawn(c.clone().run(stop.1));
        c.read_barrier().await.unwrap();
        let cap = Capacity {
            vcpus: 4,
            ram_mb: 4096,
            disk_gb: 10,
        };
        let spec = HostSpec::from_capacity(cap, "nova");
        let h = upsert_host(&c, "a", &spec).await.unwrap();
        assert_eq!(h.allocation_ratios, nova_initial_ratios());
        assert_eq!(
            (
                h.allocation_ratios.cpu,
                h.allocation_ratios.ram,
                h.allocation_ratios.disk
            ),
            (4.0, 1.0, 1.0)
        );

        let mut set = spec.clone();
        set.ratio_overrides = [None, Some(2.0), None];
        set.initial_ratios.cpu = 16.0;
        let b = upsert_host(&c, "b", &set).await.unwrap();
        assert_eq!(
            (
                b.allocation_ratios.cpu,
                b.allocation_ratios.ram,
                b.allocation_ratios.disk
            ),
            (16.0, 2.0, 1.0)
        );
        // Registered again with other initial ratios: "a" keeps what it has.
        let mut later = spec.clone();
        later.initial_ratios.cpu = 8.0;
        let a = upsert_host(&c, "a", &later).await.unwrap();
        assert_eq!(a.allocation_ratios.cpu, 4.0);
        let mut bad = spec;
        bad.initial_ratios.ram = 0.0;
        assert!(bad.validate().unwrap_err().contains("initial_ram"));
        let _ = stop.0.send(());
        c.shutdown().await;
    }

    pub(crate) fn tokio_util_stop() -> (
        tokio::sync::oneshot::Sender<()>,
        impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        (tx, async move {
            let _ = rx.await;
        })
    }
}
