//! Image storage across real members: three `Cluster`s on loopback (real Raft, real QUIC with
//! mutual TLS, real RocksDB) with an `ImageStore` each, driven through the same calls the Image
//! API makes (`uploader`, `push`, `finish`, `manifest::record_ops`) and the streamer.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use sha2::{Digest as _, Sha256};
use shoal_consensus::cluster::{Cluster, ClusterOptions};
use shoal_disk::uring::Digest;
use shoal_types::Txn;
use tokio_util::sync::CancellationToken;

use super::manifest::{self, Manifest};
use super::ImageStore;
use crate::ImagesSection;

struct Member {
    cluster: Cluster,
    store: ImageStore,
    stop: CancellationToken,
    _dir: tempfile::TempDir,
}

fn free_udp_port() -> std::net::SocketAddr {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.local_addr().unwrap()
}

fn options(dir: &Path, name: &str, zone: &str) -> ClusterOptions {
    ClusterOptions {
        data_dir: dir.to_owned(),
        name: name.into(),
        raft_addr: free_udp_port(),
        api_addr: "127.0.0.1:9".parse().unwrap(),
        zone: zone.into(),
        voters: 3,
        replace_after: Duration::from_secs(600),
        stabilization: Duration::from_millis(200),
        snapshot_every: 100_000,
        heartbeat_ms: 100,
        election_timeout_ms: 600,
        pre_vote: true,
    }
}

fn settings(replication: usize) -> ImagesSection {
    ImagesSection {
        replication,
        chunk_bytes: 64 << 10,
        ..ImagesSection::default()
    }
}

fn member(cluster: Cluster, dir: tempfile::TempDir, settings: ImagesSection) -> Member {
    let stop = CancellationToken::new();
    tokio::spawn(cluster.clone().run(stop.clone().cancelled_owned()));
    let store = ImageStore::open(
        cluster.clone(),
        dir.path(),
        settings,
        &dir.path().join("instances"),
    )
    .unwrap();
    Member {
        cluster,
        store,
        stop,
        _dir: dir,
    }
}

/// Three members in zones az1, az2, az2, with 64 KiB chunks.
async fn three(replication: usize) -> Vec<Member> {
    three_with(settings(replication)).await
}

async fn three_with(settings: ImagesSection) -> Vec<Member> {
    let dir = tempfile::tempdir().unwrap();
    let first = Cluster::init(options(dir.path(), "n1", "az1"))
        .await
        .unwrap();
    let peer = first.node().raft_addr.clone();
    let mut out = vec![member(first, dir, settings.clone())];
    for (name, zone) in [("n2", "az2"), ("n3", "az2")] {
        let (_, token) = out[0]
            .cluster
            .create_join_token(Duration::from_secs(600), 1, "test".into(), "test".into())
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let c = Cluster::join(options(dir.path(), name, zone), &peer, &token)
            .await
            .unwrap();
        out.push(member(c, dir, settings.clone()));
    }
    for m in &out {
        m.cluster.read_barrier().await.unwrap();
    }
    // Tests kill members: Raft must survive one death.
    all_voters(&out).await;
    out
}

impl Member {
    async fn kill(&self) {
        self.stop.cancel();
        self.cluster.shutdown().await;
    }
}

/// Uploads `data` as `image_id` on `m` and commits the manifest and holder rows, as the Image
/// API's upload handler does. Returns the manifest and the copies.
async fn upload(m: &Member, image_id: &str, data: &[u8]) -> (Manifest, Vec<(Digest, String)>) {
    let mut up = m.store.uploader(image_id).await.unwrap();
    for piece in data.chunks(50_000) {
        up.push(Bytes::copy_from_slice(piece)).await.unwrap();
    }
    let done = up.finish().await.unwrap();
    let _ = std::fs::remove_file(&done.staging);
    let txn = Txn {
        preconditions: Vec::new(),
        ops: manifest::record_ops(image_id, &done.manifest, &done.copies),
    };
    m.cluster.write(txn).await.unwrap();
    (done.manifest, done.copies)
}

/// A qcow2 image of `mib` MiB with data written at a few places, as bytes.
fn qcow2_bytes(dir: &Path, mib: u64) -> Vec<u8> {
    let path = dir.join("src.qcow2");
    let run = |cmd: &mut std::process::Command| {
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{cmd:?}: {out:?}");
    };
    run(std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&path)
        .arg(format!("{mib}M")));
    for (pattern, at) in [(0x5a, 0), (0xc3, mib / 2), (0x11, mib - 1)] {
        run(std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", "-c"])
            .arg(format!("write -P {pattern} {at}M 1M"))
            .arg(&path));
    }
    std::fs::read(&path).unwrap()
}

fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

async fn holders_in_raft(m: &Member, manifest: &Manifest) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for d in manifest.digests().unwrap() {
        let mut h = manifest::holders(&m.cluster, &d).await.unwrap();
        h.sort();
        out.push(h);
    }
    out
}

/// With replication 2, every chunk is on the uploading node and on one replica in another zone
/// (the same replica for every chunk), the `chunk_holders` rows say so on every member, and
/// after the uploading node is gone a third node pulls the image whole from the replica: the same
/// bytes, and a qcow2 that `qemu-img check` passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t85_losing_the_uploader_loses_no_image() {
    let nodes = three(2).await;
    let work = tempfile::tempdir().unwrap();
    let data = qcow2_bytes(work.path(), 8);
    let (manifest, copies) = upload(&nodes[0], "img-a", &data).await;
    assert!(
        manifest.chunks.len() > 4,
        "{} chunks",
        manifest.chunks.len()
    );
    assert_eq!(manifest.sha256, sha(&data));

    let replica = copies
        .iter()
        .find(|(_, n)| n != "n1")
        .map(|(_, n)| n.clone())
        .expect("a replica");
    assert!(replica == "n2" || replica == "n3", "{replica}");
    let mut expected_holders = vec!["n1".to_string(), replica.clone()];
    expected_holders.sort();
    for m in &nodes {
        m.cluster.read_barrier().await.unwrap();
        for h in holders_in_raft(m, &manifest).await {
            assert_eq!(h, expected_holders, "on {}", m.cluster.node().name);
        }
    }
    let replica_store = &nodes[if replica == "n2" { 1 } else { 2 }].store;
    for d in manifest.digests().unwrap() {
        assert!(replica_store.chunks.contains(&d));
    }

    nodes[0].kill().await;
    let puller = &nodes[if replica == "n2" { 2 } else { 1 }];
    let path = puller.store.pull("img-a").await.unwrap();
    assert_eq!(path, puller.store.cache_path("img-a"));
    let pulled = std::fs::read(&path).unwrap();
    assert_eq!(sha(&pulled), sha(&data));
    let check = std::process::Command::new("qemu-img")
        .args(["check", "-q", "-f", "qcow2"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(check.status.success(), "qemu-img check: {check:?}");
    // Reading single chunks through the API path goes to the replica too.
    let d0 = manifest.digests().unwrap()[0];
    let chunk = puller.store.read_chunk(d0).await.unwrap();
    assert_eq!(Digest::of(&chunk), d0);
    for m in &nodes[1..] {
        m.kill().await;
    }
}

/// A holder whose copies are damaged on disk serves them as they are; the puller detects every
/// bad chunk by its hash, asks the other holder, and the cached image is exact. A holder killed
/// in the middle of a pull costs retries, never the image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t85_corrupt_and_dying_holders_cost_retries_not_images() {
    let nodes = three(2).await;
    let data: Vec<u8> = (0..(6 << 20) + 777u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let (manifest, copies) = upload(&nodes[0], "img-b", &data).await;
    let replica = copies
        .iter()
        .find(|(_, n)| n != "n1")
        .map(|(_, n)| n.clone())
        .unwrap();
    let puller = &nodes[if replica == "n2" { 2 } else { 1 }];
    puller.cluster.read_barrier().await.unwrap();

    // Damage every copy on n1: same length, one byte flipped.
    for d in manifest.digests().unwrap() {
        let path = nodes[0].store.chunks.path(&d);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[0] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
    }
    let mut rx = puller.store.start_pull("img-b");
    let status = rx.wait_for(|s| s.result.is_some()).await.unwrap().clone();
    let path = status.result.unwrap().unwrap();
    assert_eq!(sha(&std::fs::read(&path).unwrap()), sha(&data));
    assert!(status.retried_chunks > 0, "no chunk was asked of n1");
    assert_eq!(status.fetched_bytes, data.len() as u64);

    // Now a fresh image, and n1 dies while it is being pulled.
    let data2: Vec<u8> = data.iter().map(|b| b.wrapping_add(1)).collect();
    upload(&nodes[0], "img-c", &data2).await;
    puller.cluster.read_barrier().await.unwrap();
    let mut rx = puller.store.start_pull("img-c");
    // Another pull of the same image on this node joins the first.
    let joined = puller.store.pull("img-c");
    rx.wait_for(|s| s.done_bytes > 0 || s.result.is_some())
        .await
        .unwrap();
    nodes[0].kill().await;
    let path = joined.await.unwrap();
    assert_eq!(sha(&std::fs::read(&path).unwrap()), sha(&data2));
    let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    for m in &nodes[1..] {
        m.kill().await;
    }
}

/// An image whose only holder is gone fails to pull with the chunk named, and leaves no file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t85_a_chunk_with_no_holder_left_fails_cleanly() {
    let nodes = three(1).await;
    let data = vec![7u8; 300_000];
    let (_, copies) = upload(&nodes[0], "img-d", &data).await;
    assert!(copies.iter().all(|(_, n)| n == "n1"), "{copies:?}");
    nodes[1].cluster.read_barrier().await.unwrap();
    assert!(matches!(
        nodes[1].store.pull("img-none").await.unwrap_err().as_ref(),
        super::pull::PullError::NotFound(_)
    ));
    nodes[0].kill().await;
    let err = nodes[1].store.pull("img-d").await.unwrap_err();
    assert!(
        matches!(err.as_ref(), super::pull::PullError::Unavailable { .. }),
        "{err}"
    );
    assert!(!nodes[1].store.cache_path("img-d").exists());
    for m in &nodes[1..] {
        m.kill().await;
    }
}

/// Garbage collection drops chunks no manifest refers to, holder row first, and keeps the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t85_gc_frees_unreferenced_chunks() {
    let nodes = three(2).await;
    let (manifest, _) = upload(&nodes[0], "img-e", &vec![3u8; 200_000]).await;
    // An abandoned upload: chunks stored, no manifest.
    let mut up = nodes[0].store.uploader("img-f").await.unwrap();
    up.push(Bytes::from(vec![9u8; 100_000])).await.unwrap();
    drop(up);
    let orphan = Digest::of(&[9u8; 65536]);
    assert!(nodes[0].store.chunks.contains(&orphan));
    let removed = super::gc::collect(&nodes[0].store, Duration::ZERO)
        .await
        .unwrap();
    assert!(removed.contains(&orphan), "{removed:?}");
    assert!(!nodes[0].store.chunks.contains(&orphan));
    for d in manifest.digests().unwrap() {
        assert!(nodes[0].store.chunks.contains(&d));
    }
    for m in &nodes {
        m.kill().await;
    }
}

/// Runs `m`'s maintenance loop (cache, GC, re-replication) until `m` is killed.
fn maintain(m: &Member) {
    tokio::spawn(
        m.store
            .clone()
            .run_maintenance(m.stop.clone().cancelled_owned()),
    );
}

/// Waits until every chunk of `manifest` has exactly the holders `want` in `m`'s replica.
async fn wait_for_holders(m: &Member, manifest: &Manifest, want: &[&str]) {
    let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        // Right after a death the survivors may still be electing a leader.
        let _ = m.cluster.read_barrier().await;
        let now = holders_in_raft(m, manifest).await;
        if now.iter().all(|h| *h == want) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "holders {now:?}, waiting for {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until all three members are voters, so that Raft survives one death.
async fn all_voters(nodes: &[Member]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while nodes[0]
        .cluster
        .metrics()
        .membership_config
        .membership()
        .voter_ids()
        .count()
        < nodes.len()
    {
        assert!(std::time::Instant::now() < deadline, "members not promoted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The image as `m`'s own chunk store has it, every chunk checked against its hash.
async fn from_local_chunks(m: &Member, manifest: &Manifest) -> Vec<u8> {
    let mut out = Vec::new();
    for d in manifest.digests().unwrap() {
        let chunk = m.store.chunks.get(d).await.unwrap().expect("chunk held");
        out.extend_from_slice(&chunk);
    }
    out
}

/// Three voters running maintenance with replication 2 and `grace` seconds before a silent
/// holder is lost, and `data` uploaded on n1. Returns the members, the manifest, the replica's
/// name, and the indices of the replica and of the node that holds nothing.
async fn held_by_n1_and_one(
    grace: u64,
    image_id: &str,
    data: &[u8],
) -> (Vec<Member>, Manifest, String, usize, usize) {
    let nodes = three_with(ImagesSection {
        rereplicate_after_secs: grace,
        ..settings(2)
    })
    .await;
    all_voters(&nodes).await;
    for m in &nodes {
        maintain(m);
    }
    let (manifest, copies) = upload(&nodes[0], image_id, data).await;
    let replica = copies.iter().find(|(_, n)| n != "n1").unwrap().1.clone();
    let (keeper, third) = if replica == "n2" { (1, 2) } else { (2, 1) };
    (nodes, manifest, replica, keeper, third)
}

/// A holder silent for longer than `rereplicate_after_secs` no longer counts: the other holder
/// copies every chunk to the third node and records it, while the silent node's rows stay (it may
/// come back). Then the second original holder dies too, and the third node alone has the whole
/// image. (With two of three nodes dead Raft has no quorum, so the image is read from the third
/// node's chunk store rather than pulled.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t85_a_silent_holder_is_replaced_after_the_grace_period() {
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 300) as u8).collect();
    let (nodes, manifest, replica, keeper, third) = held_by_n1_and_one(2, "img-r", &data).await;
    let third_name = nodes[third].cluster.node().name.clone();

    nodes[0].kill().await;
    let mut want = vec!["n1", replica.as_str(), third_name.as_str()];
    want.sort();
    wait_for_holders(&nodes[keeper], &manifest, &want).await;
    assert_eq!(
        sha(&from_local_chunks(&nodes[third], &manifest).await),
        sha(&data)
    );

    nodes[keeper].kill().await;
    assert_eq!(
        sha(&from_local_chunks(&nodes[third], &manifest).await),
        sha(&data)
    );
    nodes[third].kill().await;
}

/// A node removed from the `nodes` table is lost at once, long before the grace period: its
/// holder rows are deleted and its chunks copied to the remaining node, and a pull on a node
/// that held nothing before reads the image whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t85_a_removed_holder_is_replaced_and_its_rows_dropped() {
    let data = vec![0x42u8; 200_000];
    let (nodes, manifest, replica, keeper, third) = held_by_n1_and_one(3600, "img-s", &data).await;
    nodes[0].kill().await;
    nodes[keeper].cluster.remove_node("n1").await.unwrap();
    let mut want = [replica.clone(), nodes[third].cluster.node().name.clone()];
    want.sort();
    let want: Vec<&str> = want.iter().map(String::as_str).collect();
    wait_for_holders(&nodes[keeper], &manifest, &want).await;
    assert_eq!(
        sha(&from_local_chunks(&nodes[third], &manifest).await),
        sha(&data)
    );
    let path = nodes[third].store.pull("img-s").await.unwrap();
    assert_eq!(sha(&std::fs::read(&path).unwrap()), sha(&data));
    for m in &nodes[1..] {
        m.kill().await;
    }
}

/// A measurement, not a test: pull throughput of an image from two holders into the cache,
/// beside `cp` of the same file on the same disk. Run in release with
/// `SHOAL_PULL_MIB=1024 cargo test --release -p shoal --bin shoal measure_pull -- --ignored
/// --nocapture`; figures go to docs/benchmarks.md. Stands in for `shoal-loadtest image` until
/// uploads can go through the Image API from outside the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run by hand in release"]
async fn measure_pull_from_two_holders_against_cp() {
    let mib: usize = std::env::var("SHOAL_PULL_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    // 4 MiB chunks, the default.
    let nodes = three_with(ImagesSection {
        replication: 2,
        ..ImagesSection::default()
    })
    .await;
    let mut up = nodes[0].store.uploader("big").await.unwrap();
    let mut x = 0x9e3779b97f4a7c15u64;
    for _ in 0..mib {
        let piece: Vec<u8> = (0..(1 << 17))
            .flat_map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()
            })
            .collect();
        up.push(Bytes::from(piece)).await.unwrap();
    }
    let done = up.finish().await.unwrap();
    let src = done.staging.clone();
    let txn = Txn {
        preconditions: Vec::new(),
        ops: manifest::record_ops("big", &done.manifest, &done.copies),
    };
    nodes[0].cluster.write(txn).await.unwrap();
    let replica = done
        .copies
        .iter()
        .find(|(_, n)| n != "n1")
        .unwrap()
        .1
        .clone();
    let puller = &nodes[if replica == "n2" { 2 } else { 1 }];
    puller.cluster.read_barrier().await.unwrap();
    let (mut pulls, mut cps) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let t = std::time::Instant::now();
        let path = puller.store.pull("big").await.unwrap();
        pulls.push(t.elapsed().as_secs_f64());
        std::fs::remove_file(&path).unwrap();
        let dst = path.with_file_name("cp-copy");
        let t = std::time::Instant::now();
        let st = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "cp {} {} && sync {}",
                src.display(),
                dst.display(),
                dst.display()
            ))
            .status()
            .unwrap();
        assert!(st.success());
        cps.push(t.elapsed().as_secs_f64());
        std::fs::remove_file(&dst).unwrap();
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let (p, c) = (med(&mut pulls), med(&mut cps));
    println!(
        "image {mib} MiB: pull from 2 holders median {p:.2} s ({:.0} MiB/s), cp+sync median {c:.2} s ({:.0} MiB/s), ratio pull/cp throughput {:.2}; runs pull {pulls:?} cp {cps:?}",
        mib as f64 / p,
        mib as f64 / c,
        c / p
    );
    let _ = std::fs::remove_file(&src);
    for m in &nodes {
        m.kill().await;
    }
}
