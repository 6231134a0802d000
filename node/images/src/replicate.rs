//! Replication during an upload: every chunk the uploader seals is pushed to `replication - 1`
//! other nodes while the upload goes on, so `finish` returns with every chunk durable on
//! `replication` nodes (or on every node there is, in a smaller cluster).
//!
//! The replicas are the same for every chunk of an image (a *slot* per replica), chosen
//! deterministically from the image id and spread over zones: nodes in zones that hold no copy
//! yet come first. A replica that fails twice in a row on a chunk is replaced by the next
//! candidate, which is then sent every chunk sealed so far (read back from this node's store), so
//! each slot ends with the whole image.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use sha2::{Digest as _, Sha256};
use shoal_consensus::cluster::{Cluster, ClusterError};
use shoal_disk::uring::Digest;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

use super::chunks::ChunkStore;
use super::peer::{self, TransferError};

/// Pushes in flight across all replicas of one upload.
const MAX_IN_FLIGHT: usize = 8;
/// Pushes queued (chunks held in memory) before the upload is made to wait.
const MAX_QUEUED: usize = 16;
/// Tries of one chunk on one replica before the replica is replaced.
const TRIES: u32 = 2;

/// The order in which nodes are asked to hold copies of image `image_id`, given the node that
/// took the upload (`me`, in zone `my_zone`) and every node as `(name, zone)`. Greedy zone
/// spread: each next pick is from the zone holding the fewest copies so far (this node's copy
/// included); ties go to the node ranked first for this image by rendezvous hashing, so all
/// chunks of an image land on the same nodes while images spread over the cluster.
pub fn replica_order(
    image_id: &str,
    me: &str,
    my_zone: &str,
    nodes: &[(String, String)],
) -> Vec<String> {
    let mut rest: Vec<(&String, &String, [u8; 32])> = nodes
        .iter()
        .filter(|(name, _)| name != me)
        .map(|(name, zone)| {
            let score: [u8; 32] = Sha256::new()
                .chain_update(image_id.as_bytes())
                .chain_update([0u8])
                .chain_update(name.as_bytes())
                .finalize()
                .into();
            (name, zone, score)
        })
        .collect();
    rest.sort_by(|a, b| a.2.cmp(&b.2).then_with(|| a.0.cmp(b.0)));
    let mut copies: BTreeMap<&str, usize> = BTreeMap::new();
    *copies.entry(my_zone).or_default() += 1;
    let mut order = Vec::with_capacity(rest.len());
    while !rest.is_empty() {
        let (i, _) = rest
            .iter()
            .enumerate()
            .min_by_key(|(i, (_, zone, _))| (copies.get(zone.as_str()).copied().unwrap_or(0), *i))
            .expect("non-empty");
        let (name, zone, _) = rest.remove(i);
        *copies.entry(zone.as_str()).or_default() += 1;
        order.push(name.clone());
    }
    order
}

struct Slot {
    /// `None` once no candidate is left for this slot.
    node: Option<String>,
    acked: HashSet<Digest>,
}

struct Push {
    slot: usize,
    node: String,
    digest: Digest,
    /// The bytes, or `None` to read them from this node's store (a re-push to a replacement).
    data: Option<Bytes>,
    tries: u32,
}

/// The replication half of one upload.
#[derive(Debug)]
pub struct Replicator {
    tx: Option<mpsc::Sender<(Digest, Bytes)>>,
    task: Option<JoinHandle<Vec<(Digest, String)>>>,
}

impl Drop for Replicator {
    fn drop(&mut self) {
        // An abandoned upload stops pushing; chunks already sent are collected as garbage.
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Replicator {
    /// Chooses the replicas of `image_id` and starts the pushing task.
    pub async fn start(
        cluster: Cluster,
        store: ChunkStore,
        image_id: &str,
        replication: usize,
    ) -> Result<Replicator, ClusterError> {
        let me = cluster.node().clone();
        let nodes: Vec<(String, String)> = cluster
            .node_records()
            .await?
            .into_iter()
            .map(|r| (r.info.name, r.info.zone))
            .collect();
        let mut candidates: VecDeque<String> =
            replica_order(image_id, &me.name, &me.zone, &nodes).into();
        let wanted = replication.saturating_sub(1);
        if candidates.len() < wanted {
            tracing::warn!(
                image = image_id,
                replication,
                nodes = nodes.len(),
                "fewer nodes than the replication factor: every node gets a copy"
            );
        }
        let slots: Vec<Slot> = (0..wanted)
            .map_while(|_| candidates.pop_front())
            .map(|node| Slot {
                node: Some(node),
                acked: HashSet::new(),
            })
            .collect();
        let (tx, rx) = mpsc::channel(2);
        let run = Run {
            cluster,
            store,
            image: image_id.to_owned(),
            candidates,
            slots,
            sealed: Vec::new(),
            seen: HashSet::new(),
            queue: VecDeque::new(),
        };
        Ok(Replicator {
            tx: Some(tx),
            task: Some(tokio::spawn(run.run(rx))),
        })
    }

    /// Hands a sealed chunk (already durable here) over for pushing; waits while too many are
    /// queued, which holds the upload to the replicas' pace.
    pub async fn send(&self, d: Digest, data: Bytes) {
        if let Some(tx) = &self.tx {
            // The task only stops early if it panicked; `finish` reports that.
            let _ = tx.send((d, data)).await;
        }
    }

    /// Waits until every chunk sent is durable on every replica that could be found, and returns
    /// those `(chunk, node)` copies.
    pub async fn finish(mut self) -> Vec<(Digest, String)> {
        self.tx.take();
        match self.task.take() {
            Some(task) => task.await.unwrap_or_else(|e| {
                tracing::error!(error = %e, "replication task failed");
                Vec::new()
            }),
            None => Vec::new(),
        }
    }
}

struct Run {
    cluster: Cluster,
    store: ChunkStore,
    image: String,
    candidates: VecDeque<String>,
    slots: Vec<Slot>,
    sealed: Vec<Digest>,
    seen: HashSet<Digest>,
    queue: VecDeque<Push>,
}

impl Run {
    async fn run(mut self, mut rx: mpsc::Receiver<(Digest, Bytes)>) -> Vec<(Digest, String)> {
        let mut in_flight: JoinSet<(Push, Result<(), TransferError>)> = JoinSet::new();
        let mut closed = false;
        loop {
            while in_flight.len() < MAX_IN_FLIGHT {
                let Some(push) = self.queue.pop_front() else {
                    break;
                };
                if self.slots[push.slot].node.as_ref() != Some(&push.node) {
                    continue; // the slot moved on to another node
                }
                let (cluster, store) = (self.cluster.clone(), self.store.clone());
                in_flight.spawn(async move {
                    let result = send_one(&cluster, &store, &push).await;
                    (push, result)
                });
            }
            tokio::select! {
                msg = rx.recv(), if !closed && self.queue.len() < MAX_QUEUED => match msg {
                    Some((d, data)) => self.sealed_chunk(d, data),
                    None => closed = true,
                },
                Some(done) = in_flight.join_next() => match done {
                    Ok((push, Ok(()))) => {
                        let slot = &mut self.slots[push.slot];
                        if slot.node.as_ref() == Some(&push.node) {
                            slot.acked.insert(push.digest);
                        }
                    }
                    Ok((push, Err(e))) => self.failed(push, e).await,
                    Err(e) => tracing::error!(error = %e, "chunk push task failed"),
                },
                else => break,
            }
        }
        self.copies()
    }

    fn sealed_chunk(&mut self, d: Digest, data: Bytes) {
        if !self.seen.insert(d) {
            return; // the same bytes again in this image
        }
        self.sealed.push(d);
        for (i, slot) in self.slots.iter().enumerate() {
            if let Some(node) = &slot.node {
                self.queue.push_back(Push {
                    slot: i,
                    node: node.clone(),
                    digest: d,
                    data: Some(data.clone()),
                    tries: 0,
                });
            }
        }
    }

    async fn failed(&mut self, mut push: Push, e: TransferError) {
        if self.slots[push.slot].node.as_ref() != Some(&push.node) {
            return;
        }
        push.tries += 1;
        if push.tries < TRIES && !e.peer_down() {
            tracing::debug!(image = %self.image, error = %e, "retrying a chunk push");
            tokio::time::sleep(Duration::from_millis(100)).await;
            self.queue.push_front(push);
            return;
        }
        let used: HashSet<String> = self.slots.iter().filter_map(|s| s.node.clone()).collect();
        let next = std::iter::from_fn(|| self.candidates.pop_front()).find(|n| !used.contains(n));
        tracing::warn!(
            image = %self.image,
            replica = %push.node,
            replacement = ?next,
            error = %e,
            "replica failed during upload"
        );
        let slot = &mut self.slots[push.slot];
        slot.node = next.clone();
        slot.acked.clear();
        if let Some(node) = next {
            for d in &self.sealed {
                self.queue.push_back(Push {
                    slot: push.slot,
                    node: node.clone(),
                    digest: *d,
                    data: None,
                    tries: 0,
                });
            }
        }
    }

    fn copies(self) -> Vec<(Digest, String)> {
        let mut out = Vec::new();
        let mut complete = 0;
        for slot in &self.slots {
            let Some(node) = &slot.node else { continue };
            if self.sealed.iter().all(|d| slot.acked.contains(d)) {
                complete += 1;
            }
            out.extend(
                self.sealed
                    .iter()
                    .filter(|d| slot.acked.contains(d))
                    .map(|d| (*d, node.clone())),
            );
        }
        if complete < self.slots.len() || self.slots.is_empty() && !self.sealed.is_empty() {
            tracing::warn!(
                image = %self.image,
                replicas = complete,
                "image stored with fewer complete copies than asked for"
            );
        }
        out
    }
}

async fn send_one(cluster: &Cluster, store: &ChunkStore, push: &Push) -> Result<(), TransferError> {
    let data = match &push.data {
        Some(data) => data.clone(),
        None => match store.get(push.digest).await {
            Ok(Some(data)) => data,
            other => {
                // Our own copy is gone or damaged: nothing to send from here.
                return Err(TransferError::Refused {
                    node: cluster.node().name.clone(),
                    digest: push.digest,
                    message: format!("local copy unavailable: {other:?}"),
                });
            }
        },
    };
    peer::push(cluster, &push.node, push.digest, data).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, z)| (n.to_string(), z.to_string()))
            .collect()
    }

    /// Other zones come before this node's zone, each zone once before any twice; the order is
    /// the same every time for an image and never includes this node.
    #[test]
    fn replicas_spread_over_zones_deterministically() {
        let all = nodes(&[
            ("a1", "az1"),
            ("a2", "az1"),
            ("a3", "az1"),
            ("b1", "az2"),
            ("b2", "az2"),
            ("c1", "az3"),
        ]);
        for image in ["img-1", "img-2", "img-3", "img-4"] {
            let order = replica_order(image, "a1", "az1", &all);
            assert_eq!(order.len(), 5);
            assert!(!order.contains(&"a1".to_string()));
            let zone = |n: &String| all.iter().find(|(m, _)| m == n).unwrap().1.clone();
            let first_two: HashSet<String> = order[..2].iter().map(zone).collect();
            assert_eq!(
                first_two,
                HashSet::from(["az2".to_string(), "az3".to_string()]),
                "{image}: {order:?}"
            );
            assert_eq!(order, replica_order(image, "a1", "az1", &all));
        }
        // Different images pick different first replicas among equals.
        let same_zone = nodes(&[("x", "z"), ("p", "z"), ("q", "z"), ("r", "z"), ("s", "z")]);
        let firsts: HashSet<String> = (0..32)
            .map(|i| replica_order(&format!("img-{i}"), "x", "z", &same_zone)[0].clone())
            .collect();
        assert!(firsts.len() > 1, "{firsts:?}");
    }

    #[test]
    fn a_lone_node_has_no_replicas() {
        assert!(replica_order("i", "a", "z", &nodes(&[("a", "z")])).is_empty());
    }
}
