//! Image bytes across real `shoal` processes: the chunk service on the data ALPN and
//! `shoal image pull`. The in-process tests in `node/src/images/tests.rs` cover replication,
//! pulls from surviving replicas, corrupt and dying holders on real Clusters; these check what
//! only whole processes show.

mod common;

use std::time::Duration;

use common::Cluster;
use shoal_consensus::net::client::client_endpoint;
use shoal_consensus::net::{tls, ClusterCa, NetOptions, PeerClient};

fn cluster_ca(c: &Cluster) -> ClusterCa {
    let dir = c.nodes[0].dir.join("tls");
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
    ClusterCa::from_pem(&read("ca.pem"), &read("ca.key")).unwrap()
}

/// Sends `request` on a new data stream; returns the response bytes or the reset code.
async fn exchange(conn: &quinn::Connection, request: &[u8]) -> Result<Vec<u8>, quinn::VarInt> {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(request).await.unwrap();
    send.finish().unwrap();
    match tokio::time::timeout(Duration::from_secs(15), recv.read_to_end(1 << 20))
        .await
        .expect("the node did not answer")
    {
        Ok(bytes) => Ok(bytes),
        Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code))) => Err(code),
        Err(e) => panic!("unexpected stream error {e:?}"),
    }
}

/// A member on `shoal-data/1` is answered "not found" for a chunk the node lacks; a malformed
/// request and an oversized push reset only their own stream; `shoal image pull` of an image
/// with no stored bytes fails with a message naming it, and a bad id is refused; through all of
/// it the node keeps serving.
#[test]
fn chunk_service_and_pull_cli_on_a_real_node() {
    let c = Cluster::start(2, &[]);
    let ca = cluster_ca(&c);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = PeerClient::with_tls(
            client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap(),
            tls::data_client_config(ca.cert_pem(), &ca.issue_node_cert("tester").unwrap()).unwrap(),
            NetOptions::default(),
            None,
        )
        .unwrap();
        let conn = client
            .connection(&c.nodes[0].listen.to_string())
            .await
            .unwrap();
        let mut get = vec![1u8];
        get.extend_from_slice(&[0xab; 32]);
        let resp = exchange(&conn, &get).await.unwrap();
        assert_eq!(resp[0], 1, "not found: {resp:?}");
        // Unknown op, then a truncated header, then a push announcing 1 GiB.
        assert_eq!(exchange(&conn, &[9u8; 33]).await, Err(0x10u32.into()));
        assert_eq!(exchange(&conn, &[1u8; 5]).await, Err(0x10u32.into()));
        let mut put = vec![2u8];
        put.extend_from_slice(&[0xcd; 32]);
        put.extend_from_slice(&(1u32 << 30).to_be_bytes());
        assert_eq!(exchange(&conn, &put).await, Err(0x10u32.into()));
        // The same connection still serves.
        assert_eq!(exchange(&conn, &get).await.unwrap()[0], 1);
    });

    let (ok, _, err) = c.cli(1, &["image", "pull", "--quiet", "no-such-image"]);
    assert!(!ok);
    assert!(err.contains("no-such-image has no stored bytes"), "{err}");
    let (ok, _, err) = c.cli(1, &["image", "pull", ".hidden"]);
    assert!(!ok);
    assert!(err.contains("an image id is"), "{err}");
    c.kv_put(0, "after", "1").unwrap();
}

/// The whole path as a user sees it, on three nodes with replication 2: upload through the Image
/// API to node1, `shoal image pull` on the other two, kill node1, pull again from a fresh cache
/// on the survivor that was not the replica, and check the bytes and `qemu-img check`.
#[test]
fn upload_replicate_kill_and_pull_through_the_api() {
    let mut c = Cluster::start(3, &[]);
    let work = tempfile::tempdir().unwrap();
    let img = work.path().join("src.qcow2");
    let st = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("64M")
        .status()
        .unwrap();
    assert!(st.success());
    let st = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x5a 0 8M"])
        .arg(&img)
        .status()
        .unwrap();
    assert!(st.success());
    let bytes = std::fs::read(&img).unwrap();
    let token = c.token(0);
    let http = reqwest::blocking::Client::new();
    let created: serde_json::Value = http
        .post(format!("{}/image/v2/images", c.nodes[0].base()))
        .header("X-Auth-Token", &token)
        .json(
            &serde_json::json!({"name": "t85", "disk_format": "qcow2", "container_format": "bare"}),
        )
        .send()
        .unwrap()
        .json()
        .unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    let resp = http
        .put(format!("{}/image/v2/images/{id}/file", c.nodes[0].base()))
        .header("X-Auth-Token", &token)
        .header("Content-Type", "application/octet-stream")
        .body(bytes.clone())
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 204);
    for node in [1, 2] {
        let (ok, out, err) = c.cli(node, &["image", "pull", "--quiet", &id]);
        assert!(ok, "{err}");
        assert!(out.contains(&id), "{out}");
    }
    c.nodes[0].kill9();
    for node in [1, 2] {
        let cached = c.nodes[node].dir.join("images/cache").join(&id);
        let pulled = std::fs::read(&cached).unwrap();
        assert_eq!(pulled, bytes);
        let check = std::process::Command::new("qemu-img")
            .args(["check", "-q", "-f", "qcow2"])
            .arg(&cached)
            .status()
            .unwrap();
        assert!(check.success());
        // From an empty cache, with node1 gone: the replica serves every chunk.
        std::fs::remove_file(&cached).unwrap();
        let (ok, _, err) = c.cli(node, &["image", "pull", "--quiet", &id]);
        assert!(ok, "{err}");
        assert_eq!(std::fs::read(&cached).unwrap(), bytes);
    }
}
