//! Re-replication: a chunk that an image manifest names and that has fewer than `replication`
//! holders left among the members is copied again, so losing one node loses no image after the
//! first loss either.
//!
//! A holder is **lost** when its node is gone from the `nodes` table (removed: its holder rows are
//! deleted too), or when it has not answered the cluster's status probe (`Cluster::cluster_status`,
//! what `shoal status` shows as `healthy`) for `[images] rereplicate_after_secs`. Each node keeps
//! the time it first saw a member unhealthy; one healthy answer clears it.
//!
//! Of the holders still answering, the lowest-named one acts: it pushes the chunk to new nodes
//! (healthy members that hold no copy, other zones first) and, once each push is acknowledged
//! (the receiver has it durably), records the copy with a transaction conditioned on the holder
//! row being absent. Two nodes that both think they act (their views differ for a moment) make
//! the same copy at worst, and the second row write is a no-op. A node that comes back keeps its
//! chunks and its rows: the chunk then has one copy more than asked for, which is harmless
//! (garbage collection only drops chunks no manifest names).
//!
//! Passes run every [`every`]`(grace)`, and at once when a node row is deleted. Work is bounded: a
//! pass starts at most [`PER_PASS`] copies, [`CONCURRENCY`] at a time; a pass that left work undone
//! is followed by the next one a second later.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use futures::StreamExt;
use shoal_consensus::cluster::{Cluster, ClusterError};
use shoal_consensus::join::T_NODES;
use shoal_consensus::store::WatchStream;
use shoal_disk::uring::Digest;
use shoal_types::{EventKind, Expect, Txn};
use tokio::task::JoinSet;

use super::chunks::{parse_digest, ChunkError};
use super::manifest;
use super::peer::{self, TransferError};
use super::replicate::replica_order;
use super::{chain, ImageStore};

/// Chunk copies one pass starts, at most.
pub const PER_PASS: usize = 64;
/// Chunks being copied at once.
pub const CONCURRENCY: usize = 2;
/// Stale holder rows deleted per Raft transaction.
const BATCH: usize = 256;

/// How often a node looks for chunks short of copies: often enough to notice a lost holder soon
/// after its grace period ends, at most once a second, at least once a minute.
pub fn every(grace: Duration) -> Duration {
    (grace / 4).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// A chunk some manifest names, with the nodes its `chunk_holders` rows name.
#[derive(Debug, Clone)]
pub struct ChunkRows {
    pub digest: Digest,
    /// The first image (by id) that names it: the key of the rendezvous order of new holders, so
    /// an image's chunks go to the same nodes.
    pub image: String,
    pub holders: Vec<String>,
}

/// The cluster as this node sees it at the start of a pass.
#[derive(Debug)]
pub struct View<'a> {
    pub me: &'a str,
    pub my_zone: &'a str,
    /// Every node in the `nodes` table, as `(name, zone)`.
    pub members: &'a [(String, String)],
    /// Members that answer now (this node always does).
    pub healthy: &'a BTreeSet<String>,
    /// Members that have not answered for longer than the grace period.
    pub lost: &'a BTreeSet<String>,
    pub replication: usize,
    /// Copies this pass may start.
    pub limit: usize,
}

/// A chunk this node is to push to new holders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copy {
    pub digest: Digest,
    pub image: String,
    pub to: Vec<String>,
}

/// What this node does in one pass.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Chunks to push, with their new holders.
    pub copies: Vec<Copy>,
    /// Holder rows naming nodes removed from the `nodes` table, to delete.
    pub stale: Vec<(Digest, String)>,
    /// Chunks short of copies, whoever acts on them.
    pub short: usize,
    /// Whether copies were left for the next pass because of the limit.
    pub more: bool,
}

/// Decides which chunks this node copies where, and which stale rows it deletes. Pure: every node
/// with the same view computes the same plan, and exactly one of them acts on each chunk.
pub fn plan(view: &View<'_>, chunks: &[ChunkRows]) -> Plan {
    let zones: BTreeMap<&str, &str> = view
        .members
        .iter()
        .map(|(n, z)| (n.as_str(), z.as_str()))
        .collect();
    let healthy = |n: &&String| view.healthy.contains(*n) && zones.contains_key(n.as_str());
    let mut out = Plan::default();
    let mut started = 0;
    for c in chunks {
        let (known, removed): (Vec<&String>, Vec<&String>) = c
            .holders
            .iter()
            .partition(|h| zones.contains_key(h.as_str()));
        // The lowest-named holder that answers acts on the chunk.
        let actor = known.iter().copied().filter(healthy).min();
        if !removed.is_empty() {
            // With no holder left, the lowest-named healthy member tidies the rows.
            let tidier =
                actor.or_else(|| view.healthy.iter().find(|n| zones.contains_key(n.as_str())));
            if tidier.is_some_and(|n| n == view.me) {
                out.stale
                    .extend(removed.iter().map(|n| (c.digest, (*n).clone())));
            }
        }
        let counted: Vec<&String> = known
            .iter()
            .copied()
            .filter(|h| !view.lost.contains(*h))
            .collect();
        if counted.len() >= view.replication {
            continue;
        }
        out.short += 1;
        if actor.is_none_or(|a| a != view.me) {
            continue;
        }
        let candidates: Vec<(String, String)> = view
            .members
            .iter()
            .filter(|(n, _)| view.healthy.contains(n) && !c.holders.contains(n))
            .cloned()
            .collect();
        if candidates.is_empty() {
            continue;
        }
        if started >= view.limit {
            out.more = true;
            continue;
        }
        // Greedy zone spread over the copies that count, ties broken by the image's rendezvous
        // order (the order an upload on this node would have used).
        let rank = replica_order(&c.image, view.me, view.my_zone, &candidates);
        let mut copies: BTreeMap<&str, usize> = BTreeMap::new();
        for h in &counted {
            *copies.entry(zones[h.as_str()]).or_default() += 1;
        }
        let mut rest: Vec<&String> = rank.iter().collect();
        let mut to = Vec::new();
        while to.len() + counted.len() < view.replication && !rest.is_empty() {
            let (i, _) = rest
                .iter()
                .enumerate()
                .min_by_key(|(i, n)| (copies.get(zones[n.as_str()]).copied().unwrap_or(0), *i))
                .expect("non-empty");
            let n = rest.remove(i);
            *copies.entry(zones[n.as_str()]).or_default() += 1;
            to.push(n.clone());
        }
        started += to.len();
        out.copies.push(Copy {
            digest: c.digest,
            image: c.image.clone(),
            to,
        });
    }
    out
}

/// Watches the `nodes` table so that a removal starts a pass at once rather than at the next tick.
#[derive(Debug)]
pub struct Removals(Option<WatchStream>);

impl Removals {
    /// A watch from now on; without one (it could not be set up) removals wait for the next tick.
    pub async fn watch(cluster: &Cluster) -> Removals {
        match cluster.watch(T_NODES, "", cluster.revision() + 1).await {
            Ok(w) => Removals(Some(w)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch node removals");
                Removals(None)
            }
        }
    }

    /// Resolves when a node row is deleted; never, once the watch has ended or failed.
    pub async fn next(&mut self) {
        while let Some(w) = &mut self.0 {
            match w.next().await {
                Some(Ok(ev)) if matches!(ev.kind, EventKind::Delete) => return,
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "node removal watch failed");
                    self.0 = None;
                }
                None => self.0 = None,
            }
        }
        std::future::pending().await
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RereplicateError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pass {
    /// `(chunk, node)` copies made and recorded.
    pub copied: Vec<(Digest, String)>,
    /// Holder rows of removed nodes deleted.
    pub stale_removed: usize,
    /// Chunks short of copies at the start of the pass, whoever acts on them.
    pub short: usize,
    /// Copies this node failed to make (tried again next pass).
    pub failed: usize,
    /// Whether work was left for the next pass by the per-pass limit.
    pub more: bool,
}

/// This node's re-replication state: when it first saw each member stop answering.
#[derive(Debug)]
pub struct Rereplicator {
    grace: Duration,
    down_since: HashMap<String, Instant>,
}

impl Rereplicator {
    pub fn new(grace: Duration) -> Rereplicator {
        Rereplicator {
            grace,
            down_since: HashMap::new(),
        }
    }

    /// Looks at every manifest's chunks and makes the copies this node is to make.
    pub async fn pass(&mut self, store: &ImageStore) -> Result<Pass, RereplicateError> {
        let cluster = &store.cluster;
        cluster.read_barrier().await?;
        let me = cluster.node().clone();
        let members: Vec<(String, String)> = cluster
            .node_records()
            .await?
            .into_iter()
            .map(|r| (r.info.name, r.info.zone))
            .collect();
        let (healthy, lost) = self.observe(cluster, &members).await;
        let chunks = referenced_chunks(cluster).await?;
        let view = View {
            me: &me.name,
            my_zone: &me.zone,
            members: &members,
            healthy: &healthy,
            lost: &lost,
            replication: store.settings.replication,
            limit: PER_PASS,
        };
        let plan = plan(&view, &chunks);
        let mut pass = Pass {
            short: plan.short,
            more: plan.more,
            ..Pass::default()
        };
        pass.stale_removed = delete_stale(cluster, &plan.stale).await?;
        let mut todo = plan.copies.into_iter();
        let mut running: JoinSet<(Copy, Result<Copied, ChunkError>)> = JoinSet::new();
        loop {
            while running.len() < CONCURRENCY {
                let Some(copy) = todo.next() else { break };
                let store = store.clone();
                running.spawn(async move {
                    let result = copy_chunk(&store, &copy).await;
                    (copy, result)
                });
            }
            let Some(done) = running.join_next().await else {
                break;
            };
            match done {
                Ok((copy, Ok(results))) => {
                    for (node, result) in results {
                        match result {
                            Ok(()) => pass.copied.push((copy.digest, node)),
                            Err(e) => {
                                pass.failed += 1;
                                tracing::warn!(
                                    chunk = %copy.digest, %node, error = %chain(&e),
                                    "chunk copy failed"
                                );
                            }
                        }
                    }
                }
                Ok((copy, Err(e))) => {
                    pass.failed += copy.to.len();
                    tracing::warn!(chunk = %copy.digest, error = %chain(&e), "cannot read a chunk to copy");
                }
                Err(e) => {
                    pass.failed += 1;
                    tracing::error!(error = %e, "chunk copy task failed");
                }
            }
        }
        if !pass.copied.is_empty() || pass.stale_removed > 0 {
            tracing::info!(
                copied = pass.copied.len(),
                stale_rows = pass.stale_removed,
                short = pass.short,
                "re-replicated chunks"
            );
        }
        Ok(pass)
    }

    /// The members answering now and those silent for longer than the grace period.
    async fn observe(
        &mut self,
        cluster: &Cluster,
        members: &[(String, String)],
    ) -> (BTreeSet<String>, BTreeSet<String>) {
        let status = cluster.cluster_status().await;
        let mut healthy: BTreeSet<String> = status
            .members
            .into_iter()
            .filter(|m| m.healthy)
            .map(|m| m.name)
            .collect();
        healthy.insert(cluster.node().name.clone());
        let now = Instant::now();
        self.down_since
            .retain(|n, _| !healthy.contains(n) && members.iter().any(|(m, _)| m == n));
        let mut lost = BTreeSet::new();
        for (name, _) in members {
            if healthy.contains(name) {
                continue;
            }
            let since = *self.down_since.entry(name.clone()).or_insert(now);
            if now.duration_since(since) >= self.grace {
                lost.insert(name.clone());
            }
        }
        healthy.retain(|n| members.iter().any(|(m, _)| m == n));
        (healthy, lost)
    }
}

/// Every chunk some manifest names, with its holders, in digest order. A manifest that does not
/// parse is skipped (copying less is safe; garbage collection is the one that must stop).
async fn referenced_chunks(cluster: &Cluster) -> Result<Vec<ChunkRows>, ClusterError> {
    let mut chunks: BTreeMap<Digest, ChunkRows> = BTreeMap::new();
    for (image, digests) in manifest::all_digests(cluster).await? {
        let digests = match digests {
            Ok(d) => d,
            Err(error) => {
                tracing::warn!(%image, %error, "unreadable manifest; not re-replicating it");
                continue;
            }
        };
        for digest in digests {
            chunks.entry(digest).or_insert_with(|| ChunkRows {
                digest,
                image: image.clone(),
                holders: Vec::new(),
            });
        }
    }
    for (key, _) in cluster.list(manifest::HOLDERS, "", usize::MAX).await? {
        let Some((hex, node)) = key.split_once('/') else {
            continue;
        };
        if let Some(c) = parse_digest(hex).and_then(|d| chunks.get_mut(&d)) {
            c.holders.push(node.to_owned());
        }
    }
    Ok(chunks.into_values().collect())
}

/// Deletes holder rows of removed nodes, each transaction conditioned on those nodes still being
/// absent from the `nodes` table (a node that rejoined under its old name keeps its rows).
async fn delete_stale(
    cluster: &Cluster,
    stale: &[(Digest, String)],
) -> Result<usize, ClusterError> {
    let mut deleted = 0;
    for batch in stale.chunks(BATCH) {
        let nodes: BTreeSet<&str> = batch.iter().map(|(_, n)| n.as_str()).collect();
        let txn = nodes
            .iter()
            .fold(Txn::new(), |t, n| t.when(T_NODES, n, Expect::Absent));
        let txn = batch.iter().fold(txn, |t, (d, n)| {
            t.delete(manifest::HOLDERS, &manifest::holder_key(d, n))
        });
        if cluster.write(txn).await?.succeeded {
            deleted += batch.len();
        }
    }
    Ok(deleted)
}

#[derive(Debug, thiserror::Error)]
enum CopyError {
    #[error(transparent)]
    Push(TransferError),
    #[error("cannot record the new copy")]
    Record(#[source] ClusterError),
}

/// Per new holder, whether the copy was made and recorded.
type Copied = Vec<(String, Result<(), CopyError>)>;

/// Reads the chunk once (this node's copy, or a peer's if this one is damaged), pushes it to each
/// new holder and records each acknowledged copy.
async fn copy_chunk(store: &ImageStore, copy: &Copy) -> Result<Copied, ChunkError> {
    let d = copy.digest;
    let data = store.read_chunk(d).await?;
    let mut out = Vec::new();
    for node in &copy.to {
        let result = async {
            peer::push(&store.cluster, node, d, data.clone())
                .await
                .map_err(CopyError::Push)?;
            let key = manifest::holder_key(&d, node);
            // Absent: a copy someone else recorded meanwhile is left as it is.
            let txn = Txn::new()
                .when(manifest::HOLDERS, &key, Expect::Absent)
                .put(manifest::HOLDERS, &key, Vec::new());
            store.cluster.write(txn).await.map_err(CopyError::Record)?;
            Ok(())
        }
        .await;
        out.push((node.clone(), result));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> BTreeSet<String> {
        list.iter().map(|n| n.to_string()).collect()
    }

    fn members() -> Vec<(String, String)> {
        [("a", "z1"), ("b", "z2"), ("c", "z2"), ("d", "z3")]
            .iter()
            .map(|(n, z)| (n.to_string(), z.to_string()))
            .collect()
    }

    fn chunk(i: u8, holders: &[&str]) -> ChunkRows {
        ChunkRows {
            digest: Digest::of(&[i]),
            image: "img".into(),
            holders: holders.iter().map(|h| h.to_string()).collect(),
        }
    }

    fn view<'a>(
        me: &'a str,
        members: &'a [(String, String)],
        healthy: &'a BTreeSet<String>,
        lost: &'a BTreeSet<String>,
    ) -> View<'a> {
        let my_zone = members.iter().find(|(n, _)| n == me).unwrap().1.as_str();
        View {
            me,
            my_zone,
            members,
            healthy,
            lost,
            replication: 2,
            limit: 100,
        }
    }

    /// A holder silent past the grace period no longer counts: exactly one node (the lowest-named
    /// holder that answers) copies, to a healthy non-holder in a zone holding no copy yet.
    #[test]
    fn a_lost_holder_is_replaced_by_one_actor_in_another_zone() {
        let m = members();
        let healthy = names(&["b", "c", "d"]);
        let lost = names(&["a"]);
        let chunks = [chunk(1, &["a", "b"]), chunk(2, &["c", "d"])];
        let p = plan(&view("b", &m, &healthy, &lost), &chunks);
        assert_eq!(p.short, 1);
        assert_eq!(
            p.copies,
            vec![Copy {
                digest: Digest::of(&[1]),
                image: "img".into(),
                to: vec!["d".into()],
            }],
            "z3 holds no copy, z2 (b's zone) does"
        );
        assert!(p.stale.is_empty());
        for other in ["c", "d"] {
            let p = plan(&view(other, &m, &healthy, &lost), &chunks);
            assert!(p.copies.is_empty(), "{other} must not act: {p:?}");
            assert_eq!(p.short, 1);
        }
    }

    /// Silent but within the grace period: nothing is copied. A node removed from the `nodes`
    /// table is lost at once, and its rows are deleted by the acting holder only.
    #[test]
    fn silence_within_grace_copies_nothing_and_removal_counts_at_once() {
        let m = members();
        let healthy = names(&["b", "c", "d"]);
        let none = BTreeSet::new();
        let chunks = [chunk(1, &["a", "b"])];
        let p = plan(&view("b", &m, &healthy, &none), &chunks);
        assert_eq!(p, Plan::default());

        let without_a: Vec<_> = m.iter().filter(|(n, _)| n != "a").cloned().collect();
        let p = plan(&view("b", &without_a, &healthy, &none), &chunks);
        assert_eq!(p.stale, vec![(Digest::of(&[1]), "a".to_string())]);
        assert_eq!(p.copies.len(), 1);
        assert_eq!(p.copies[0].to, vec!["d".to_string()]);
        let p = plan(&view("c", &without_a, &healthy, &none), &chunks);
        assert!(p.stale.is_empty() && p.copies.is_empty(), "{p:?}");

        // No holder left at all: the lowest-named healthy member tidies the rows, nobody copies.
        let p = plan(&view("b", &without_a, &healthy, &none), &[chunk(3, &["a"])]);
        assert_eq!(p.stale, vec![(Digest::of(&[3]), "a".to_string())]);
        assert!(p.copies.is_empty());
        assert_eq!(p.short, 1);
    }

    /// The acting holder may itself be unhealthy in another node's eyes: then the next-lowest
    /// healthy holder acts. Targets are never holders, lost or silent nodes; with no target
    /// left nothing is planned; the limit leaves work for the next pass.
    #[test]
    fn targets_actors_and_the_limit() {
        let m = members();
        let lost = names(&["a"]);
        // a is lost; b and c hold; replication 3 wants one more: only d qualifies.
        let healthy = names(&["b", "c", "d"]);
        let mut v = view("b", &m, &healthy, &lost);
        v.replication = 3;
        let p = plan(&v, &[chunk(1, &["a", "b", "c"])]);
        assert_eq!(p.copies[0].to, vec!["d".to_string()]);
        // d silent (not yet lost): no target, nothing planned, and not "more".
        let healthy_bc = names(&["b", "c"]);
        let mut v = view("b", &m, &healthy_bc, &lost);
        v.replication = 3;
        let p = plan(&v, &[chunk(1, &["a", "b", "c"])]);
        assert!(p.copies.is_empty() && !p.more, "{p:?}");
        // Two chunks short, limit 1: one copy now, the other next pass.
        let mut v = view("b", &m, &healthy, &lost);
        v.limit = 1;
        let p = plan(&v, &[chunk(1, &["a", "b"]), chunk(2, &["a", "b"])]);
        assert_eq!(p.copies.len(), 1);
        assert!(p.more);
        assert_eq!(p.short, 2);
        // b unhealthy as c sees it: c acts on a chunk held by b and c.
        let healthy_cd = names(&["c", "d"]);
        let p = plan(
            &view("c", &m, &healthy_cd, &lost),
            &[chunk(1, &["a", "b", "c"])],
        );
        assert!(p.copies.is_empty(), "b and c still count: {p:?}");
        let lost_ab = names(&["a", "b"]);
        let p = plan(
            &view("c", &m, &healthy_cd, &lost_ab),
            &[chunk(1, &["a", "b", "c"])],
        );
        assert_eq!(p.copies[0].to, vec!["d".to_string()]);
    }

    #[test]
    fn passes_run_between_once_a_second_and_once_a_minute() {
        assert_eq!(every(Duration::from_secs(1)), Duration::from_secs(1));
        assert_eq!(every(Duration::from_secs(20)), Duration::from_secs(5));
        assert_eq!(every(Duration::from_secs(300)), Duration::from_secs(60));
    }
}
