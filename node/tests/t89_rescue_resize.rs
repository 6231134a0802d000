//! Rescue, resize (confirm and revert) and cold migration through the real `openstack` client
//! on three nodes whose compute agents drive libvirt's test hypervisor (`test:///default`):
//! the states a user sees, where the server and its claims end up, and that the root disk
//! really moved to (and was grown on) the new host.

mod common;

use std::path::PathBuf;

use common::osc::{openstack_bin, Osc};
use common::servers::{events, qemu_img, vcpus_used, wait_status};
use common::Cluster;
use serde_json::{json, Value};

/// Flavors `m1.tiny` (1 vCPU, 256 MB, 1 GB), `m1.small` (2 vCPUs, 256 MB, 2 GB),
/// `m1.medium` (2 vCPUs, 512 MB, 3 GB) and a 1 MiB raw image `tiny`; its id.
fn setup(osc: &Osc<'_>, dir: &std::path::Path) -> String {
    for (name, vcpus, ram, disk) in [
        ("m1.tiny", "1", "256", "1"),
        ("m1.small", "2", "256", "2"),
        ("m1.medium", "2", "512", "3"),
    ] {
        osc.json(
            0,
            &[
                "flavor", "create", "--vcpus", vcpus, "--ram", ram, "--disk", disk, name,
            ],
        );
    }
    let disk = dir.join("tiny.raw");
    std::fs::write(&disk, vec![7u8; 1 << 20]).unwrap();
    // Through the last node: the others pull it from their peers.
    osc.json(
        osc.cluster.nodes.len() - 1,
        &[
            "image",
            "create",
            "--disk-format",
            "raw",
            "--container-format",
            "bare",
            "--file",
            disk.to_str().unwrap(),
            "tiny",
        ],
    )["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// The instance directory of server `id` on host `host` (`nodeN`).
fn instance_dir(c: &Cluster, host: &str, id: &str) -> PathBuf {
    let i: usize = host.strip_prefix("node").unwrap().parse().unwrap();
    c.nodes[i - 1].dir.join("instances").join(id)
}

fn resize_dir(c: &Cluster, host: &str, id: &str) -> PathBuf {
    let d = instance_dir(c, host, id);
    d.with_file_name(format!("{id}_resize"))
}

/// An action through the API, as the client would send it; the status and body.
fn act(c: &Cluster, node: usize, id: &str, body: Value) -> (u16, Value) {
    let token = c.token(node);
    c.api(
        node,
        "POST",
        &format!("/compute/v2.1/servers/{id}/action"),
        &token,
        Some(body),
    )
}

/// Rescue boots the rescue image with the server's disk second (status RESCUE, `disk.rescue`
/// beside `disk`), refuses what Nova refuses while rescued, and unrescue brings the server
/// back ACTIVE without the rescue disk; a rescue image of the user's choice works the same.
#[test]
fn rescue_and_unrescue() {
    let Some(bin) = openstack_bin() else { return };
    let c = Cluster::start(3, &[]);
    let osc = Osc { bin, cluster: &c };
    let image = setup(&osc, c.tmp.path());
    let vm = osc.json(
        0,
        &[
            "server", "create", "--flavor", "m1.tiny", "--image", "tiny", "--wait", "r1",
        ],
    );
    let id = vm["id"].as_str().unwrap().to_owned();
    let host = vm["OS-EXT-SRV-ATTR:host"].as_str().unwrap().to_owned();
    let dir = instance_dir(&c, &host, &id);

    let (status, body) = act(&c, 1, &id, json!({"rescue": {"adminPass": "s3cret"}}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["adminPass"], "s3cret");
    let v = wait_status(&osc, 2, &id, "RESCUE");
    assert_eq!(v["OS-EXT-STS:vm_state"], "rescued");
    assert_eq!(v["OS-EXT-STS:power_state"], 1);
    assert!(dir.join("disk.rescue").exists() && dir.join("disk").exists());
    let info = qemu_img(&[
        "info",
        "--output",
        "json",
        dir.join("disk.rescue").to_str().unwrap(),
    ]);
    assert!(
        info.contains(&image),
        "the rescue disk sits on the image: {info}"
    );

    // Rescued: no reboot, no second rescue, no stop (Nova's 409s).
    osc.run(0, &["server", "reboot", &id]).failed_with(409);
    assert_eq!(act(&c, 0, &id, json!({"rescue": null})).0, 409);
    assert_eq!(act(&c, 0, &id, json!({"os-stop": null})).0, 409);
    // Unknown server: 404; unknown rescue image: 400.
    let unknown = "6f1c2d7e-0000-4000-8000-00000000abcd";
    assert_eq!(act(&c, 0, unknown, json!({"rescue": null})).0, 404);

    let out = osc.run(1, &["server", "unrescue", &id]);
    assert!(out.ok, "{}", out.stderr);
    let v = wait_status(&osc, 0, &id, "ACTIVE");
    assert_eq!(v["OS-EXT-STS:vm_state"], "active");
    assert!(!dir.join("disk.rescue").exists());
    assert_eq!(act(&c, 0, &id, json!({"unrescue": null})).0, 409);
    let (status, body) = act(
        &c,
        0,
        &id,
        json!({"rescue": {"rescue_image_ref": "00000000-0000-4000-8000-000000000000"}}),
    );
    assert_eq!(status, 400, "{body}");

    // A rescue image named by the user, from a stopped server.
    let out = osc.run(0, &["server", "stop", &id]);
    assert!(out.ok, "{}", out.stderr);
    wait_status(&osc, 0, &id, "SHUTOFF");
    let (status, body) = act(&c, 2, &id, json!({"rescue": {"rescue_image_ref": image}}));
    assert_eq!(status, 200, "{body}");
    assert!(body["adminPass"].as_str().is_some_and(|p| !p.is_empty()));
    wait_status(&osc, 0, &id, "RESCUE");
    let ev = events(&c, 0, &id, "rescue");
    assert_eq!(ev[0]["event"], "compute_rescue_instance", "{ev:?}");
    assert_eq!(act(&c, 1, &id, json!({"unrescue": {}})).0, 202);
    wait_status(&osc, 0, &id, "ACTIVE");

    // A paused server cannot be rescued.
    let out = osc.run(0, &["server", "pause", &id]);
    assert!(out.ok, "{}", out.stderr);
    wait_status(&osc, 0, &id, "PAUSED");
    assert_eq!(act(&c, 0, &id, json!({"rescue": null})).0, 409);
    let out = osc.run(0, &["server", "delete", "--wait", &id]);
    assert!(out.ok, "{}", out.stderr);
}

/// A resize goes to another host (the scheduler leaves the server's own out), where the root
/// overlay arrives over the members' transport, grown to the new flavor; the target's claim is
/// made with the move and the source's kept until the confirm, which removes what the source
/// set aside. A revert brings the server back to the host and flavor it had and releases the
/// target. A cold migration keeps the flavor. Bad input is Nova's 400, a wrong state 409, a
/// resize past the RAM quota 403; `os-migrations` lists every move.
#[test]
fn resize_confirm_revert_and_migrate() {
    let Some(bin) = openstack_bin() else { return };
    let c = Cluster::start(3, &[]);
    let osc = Osc { bin, cluster: &c };
    setup(&osc, c.tmp.path());
    let vm = osc.json(
        1,
        &[
            "server", "create", "--flavor", "m1.tiny", "--image", "tiny", "--wait", "z1",
        ],
    );
    let id = vm["id"].as_str().unwrap().to_owned();
    let a = vm["OS-EXT-SRV-ATTR:host"].as_str().unwrap().to_owned();

    // Bad input and wrong states.
    let (s, body) = act(&c, 0, &id, json!({"resize": {"flavorRef": "m1.tiny"}}));
    let tiny_id = osc.json(0, &["flavor", "show", "m1.tiny"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let small_id = osc.json(0, &["flavor", "show", "m1.small"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let medium_id = osc.json(0, &["flavor", "show", "m1.medium"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(s, 400, "flavor names are not ids: {body}");
    let (s, body) = act(&c, 0, &id, json!({"resize": {"flavorRef": tiny_id}}));
    assert_eq!(s, 400, "{body}");
    assert!(body.to_string().contains("must change flavor"), "{body}");
    assert_eq!(
        act(&c, 0, &id, json!({"resize": {"flavorRef": "no-such"}})).0,
        400
    );
    assert_eq!(act(&c, 0, &id, json!({"resize": {}})).0, 400);
    assert_eq!(act(&c, 0, &id, json!({"confirmResize": null})).0, 409);
    assert_eq!(act(&c, 0, &id, json!({"revertResize": null})).0, 409);
    assert_eq!(act(&c, 0, &id, json!({"migrate": {"host": a}})).0, 400);

    // Resize to m1.small: VERIFY_RESIZE on another host, both claims held.
    let out = osc.run(
        2,
        &["server", "resize", "--flavor", "m1.small", "--wait", &id],
    );
    assert!(out.ok, "{}", out.stderr);
    let v = wait_status(&osc, 0, &id, "VERIFY_RESIZE");
    assert_eq!(v["OS-EXT-STS:vm_state"], "resized");
    let b = v["OS-EXT-SRV-ATTR:host"].as_str().unwrap().to_owned();
    assert_ne!(
        a, b,
        "the scheduler keeps a resize off the server's own host"
    );
    assert!(v["flavor"].to_string().contains(&small_id), "{v}");
    assert_eq!(vcpus_used(&c, 0, &a), 1);
    assert_eq!(vcpus_used(&c, 0, &b), 2);
    let disk = instance_dir(&c, &b, &id).join("disk");
    let info: Value = serde_json::from_str(&qemu_img(&[
        "info",
        "--output",
        "json",
        disk.to_str().unwrap(),
    ]))
    .unwrap();
    assert_eq!(info["virtual-size"], 2u64 << 30, "{info}");
    let backing = info["full-backing-filename"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let b_dir = instance_dir(&c, &b, &id);
    let b_node = b_dir.parent().unwrap().parent().unwrap();
    assert!(
        backing.starts_with(b_node.to_str().unwrap()),
        "the overlay sits on the target's own base: {backing}"
    );
    qemu_img(&["check", disk.to_str().unwrap()]);
    assert!(resize_dir(&c, &a, &id).join("disk").exists());
    assert!(!instance_dir(&c, &a, &id).exists());
    let ev = events(&c, 0, &id, "resize");
    let names: Vec<&str> = ev.iter().filter_map(|e| e["event"].as_str()).collect();
    for e in [
        "compute_prep_resize",
        "compute_resize_instance",
        "compute_finish_resize",
    ] {
        assert!(names.contains(&e), "{ev:?}");
    }

    // Confirm: ACTIVE on the new host, the source's copy and claim gone.
    let out = osc.run(1, &["server", "resize", "confirm", &id]);
    assert!(out.ok, "{}", out.stderr);
    let v = wait_status(&osc, 0, &id, "ACTIVE");
    assert_eq!(v["OS-EXT-SRV-ATTR:host"], b.as_str());
    assert_eq!(vcpus_used(&c, 0, &a), 0);
    assert_eq!(vcpus_used(&c, 0, &b), 2);
    common::wait_until(
        "the source's copy to go",
        std::time::Duration::from_secs(30),
        || (!resize_dir(&c, &a, &id).exists()).then_some(()),
    );

    // A smaller disk is Nova's 400; past the RAM quota, 403.
    let (s, body) = act(&c, 0, &id, json!({"resize": {"flavorRef": tiny_id}}));
    assert_eq!(s, 400, "{body}");
    assert!(body.to_string().contains("resize disk down"), "{body}");
    let project = osc.json(0, &["project", "show", "admin"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let out = osc.run(0, &["quota", "set", "--ram", "300", &project]);
    assert!(out.ok, "{}", out.stderr);
    let (s, body) = act(&c, 0, &id, json!({"resize": {"flavorRef": medium_id}}));
    assert_eq!(s, 403, "{body}");
    let out = osc.run(0, &["quota", "set", "--ram", "51200", &project]);
    assert!(out.ok, "{}", out.stderr);

    // Revert: back on b with m1.small, the target's claim released and its copy gone.
    assert_eq!(
        act(&c, 2, &id, json!({"resize": {"flavorRef": medium_id}})).0,
        202
    );
    let v = wait_status(&osc, 0, &id, "VERIFY_RESIZE");
    let t = v["OS-EXT-SRV-ATTR:host"].as_str().unwrap().to_owned();
    assert_ne!(t, b);
    assert_eq!(vcpus_used(&c, 0, &t), 2);
    let out = osc.run(0, &["server", "resize", "revert", &id]);
    assert!(out.ok, "{}", out.stderr);
    let v = wait_status(&osc, 1, &id, "ACTIVE");
    assert_eq!(v["OS-EXT-SRV-ATTR:host"], b.as_str());
    assert!(v["flavor"].to_string().contains(&small_id), "{v}");
    assert_eq!(vcpus_used(&c, 0, &t), 0);
    assert_eq!(vcpus_used(&c, 0, &b), 2);
    assert!(!instance_dir(&c, &t, &id).exists());
    assert!(instance_dir(&c, &b, &id).join("disk").exists());
    assert!(!resize_dir(&c, &b, &id).exists());

    // Cold migration of a stopped server: same flavor, another host, still stopped.
    let out = osc.run(0, &["server", "stop", &id]);
    assert!(out.ok, "{}", out.stderr);
    wait_status(&osc, 0, &id, "SHUTOFF");
    assert_eq!(act(&c, 1, &id, json!({"migrate": null})).0, 202);
    let v = wait_status(&osc, 0, &id, "VERIFY_RESIZE");
    let m = v["OS-EXT-SRV-ATTR:host"].as_str().unwrap().to_owned();
    assert_ne!(m, b);
    assert_eq!(v["OS-EXT-STS:power_state"], 4);
    assert_eq!(act(&c, 1, &id, json!({"confirmResize": null})).0, 204);
    let v = wait_status(&osc, 0, &id, "SHUTOFF");
    assert_eq!(v["OS-EXT-SRV-ATTR:host"], m.as_str());
    assert_eq!(vcpus_used(&c, 0, &m), 2);
    assert_eq!(vcpus_used(&c, 0, &b), 0);

    // A paused server cannot be resized.
    let out = osc.run(0, &["server", "start", &id]);
    assert!(out.ok, "{}", out.stderr);
    wait_status(&osc, 0, &id, "ACTIVE");
    let out = osc.run(0, &["server", "pause", &id]);
    assert!(out.ok, "{}", out.stderr);
    wait_status(&osc, 0, &id, "PAUSED");
    assert_eq!(
        act(&c, 0, &id, json!({"resize": {"flavorRef": medium_id}})).0,
        409
    );

    // os-migrations: the three moves, with Nova's statuses.
    let token = c.token(2);
    let (s, list) = c.api(2, "GET", "/compute/v2.1/os-migrations", &token, None);
    assert_eq!(s, 200, "{list}");
    let statuses: Vec<&str> = list["migrations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["instance_uuid"] == id.as_str())
        .filter_map(|m| m["status"].as_str())
        .collect();
    assert_eq!(statuses, ["confirmed", "reverted", "confirmed"], "{list}");

    let out = osc.run(0, &["server", "delete", "--wait", &id]);
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(vcpus_used(&c, 0, &m), 0);
}

/// With `allow_resize_to_same_host` a one-host cloud resizes in place (the copy is local,
/// both claims on that host until the confirm), and with `resize_confirm_window` the resize
/// confirms itself: the server comes back ACTIVE with the new flavor and the old claim gone.
#[test]
fn a_resize_on_one_host_confirms_itself_after_the_window() {
    let Some(bin) = openstack_bin() else { return };
    let mut c = Cluster::start(1, &[]);
    c.nodes[0].kill9();
    let file = c.nodes[0].dir.join("node.toml");
    let text = std::fs::read_to_string(&file).unwrap();
    let text = text
        .replacen(
            "allow_resize_to_same_host = false\n",
            "allow_resize_to_same_host = true\n",
            1,
        )
        .replacen(
            "resize_confirm_window = 0\n",
            "resize_confirm_window = 2\n",
            1,
        )
        .replacen(
            "sync_power_state_interval_secs = 10\n",
            "sync_power_state_interval_secs = 1\n",
            1,
        );
    for line in [
        "allow_resize_to_same_host = true",
        "resize_confirm_window = 2",
        "sync_power_state_interval_secs = 1",
    ] {
        assert!(text.contains(line), "{text}");
    }
    std::fs::write(&file, text).unwrap();
    c.restart(0);
    common::wait_until(
        "node1 to serve again",
        std::time::Duration::from_secs(60),
        || c.try_token(0).ok(),
    );
    let osc = Osc { bin, cluster: &c };
    setup(&osc, c.tmp.path());
    let vm = osc.json(
        0,
        &[
            "server", "create", "--flavor", "m1.tiny", "--image", "tiny", "--wait", "w1",
        ],
    );
    let id = vm["id"].as_str().unwrap().to_owned();
    assert_eq!(vm["OS-EXT-SRV-ATTR:host"], "node1");
    let small_id = osc.json(0, &["flavor", "show", "m1.small"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        act(&c, 0, &id, json!({"resize": {"flavorRef": small_id}})).0,
        202
    );
    // No confirm is sent: the window does it.
    let v = wait_status(&osc, 0, &id, "ACTIVE");
    assert_eq!(v["OS-EXT-SRV-ATTR:host"], "node1");
    assert!(v["flavor"].to_string().contains(&small_id), "{v}");
    assert_eq!(vcpus_used(&c, 0, "node1"), 2);
    let disk = instance_dir(&c, "node1", &id).join("disk");
    let info: Value = serde_json::from_str(&qemu_img(&[
        "info",
        "--output",
        "json",
        disk.to_str().unwrap(),
    ]))
    .unwrap();
    assert_eq!(info["virtual-size"], 2u64 << 30, "{info}");
    assert!(!resize_dir(&c, "node1", &id).exists());
    let ev = events(&c, 0, &id, "resize");
    assert!(
        ev.iter().any(|e| e["event"] == "compute_finish_resize"),
        "{ev:?}"
    );
}
