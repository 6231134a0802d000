//! Server snapshots (`createImage`) and shelve / unshelve through the real `openstack` client
//! on three nodes whose compute agents drive libvirt's test hypervisor (`test:///default`):
//! the snapshot is a real flattened qcow2 that went through the Image API's upload path, and
//! servers boot from it; a shelved server is offloaded (its claim released) and unshelved onto
//! a host again from its shelve image, which then goes.

mod common;

use std::time::Duration;

use common::osc::{openstack_bin, Osc};
use common::servers::{events, qemu_img, wait_status};
use common::{wait_until, Cluster};
use serde_json::{json, Value};

/// A flavor `m1.tiny` (1 GB root disk) and a 1 MiB raw image `tiny` of bytes 7, with a
/// property a snapshot inherits and one it must not; the image's id.
fn setup(osc: &Osc<'_>, dir: &std::path::Path) -> String {
    osc.json(
        0,
        &[
            "flavor", "create", "--vcpus", "1", "--ram", "256", "--disk", "1", "m1.tiny",
        ],
    );
    let disk = dir.join("tiny.raw");
    std::fs::write(&disk, vec![7u8; 1 << 20]).unwrap();
    let image = osc.json(
        1,
        &[
            "image",
            "create",
            "--disk-format",
            "raw",
            "--container-format",
            "bare",
            "--min-ram",
            "64",
            "--property",
            "hw_disk_bus=virtio",
            "--property",
            "cache_in_nova=True",
            "--file",
            disk.to_str().unwrap(),
            "tiny",
        ],
    );
    image["id"].as_str().unwrap().to_owned()
}

#[test]
fn snapshots_are_standalone_images_that_boot_servers() {
    let Some(bin) = openstack_bin() else { return };
    let c = Cluster::start(3, &[]);
    let osc = Osc { bin, cluster: &c };
    let base = setup(&osc, c.tmp.path());
    let project = osc.json(0, &["token", "issue"])["project_id"]
        .as_str()
        .unwrap()
        .to_owned();

    let vm = osc.json(
        0,
        &[
            "server", "create", "--flavor", "m1.tiny", "--image", "tiny", "--wait", "vm1",
        ],
    );
    let id = vm["id"].as_str().unwrap().to_owned();

    // A running server: `server image create --wait` returns once the image is active.
    let out = osc.run(
        1,
        &[
            "server",
            "image",
            "create",
            "--name",
            "snap1",
            "--property",
            "purpose=test",
            "--wait",
            &id,
        ],
    );
    assert!(out.ok, "{}", out.stderr);
    let img = osc.json(2, &["image", "show", "snap1"]);
    assert_eq!(img["status"], "active", "{img}");
    assert_eq!(img["disk_format"], "qcow2", "{img}");
    assert_eq!(img["container_format"], "bare", "{img}");
    assert_eq!(img["visibility"], "private", "{img}");
    assert_eq!(img["owner"], project.as_str(), "{img}");
    assert_eq!(img["min_ram"], 64, "{img}");
    assert_eq!(img["min_disk"], 1, "{img}");
    let props = &img["properties"];
    assert_eq!(props["image_type"], "snapshot", "{img}");
    assert_eq!(props["instance_uuid"], id.as_str(), "{img}");
    assert_eq!(props["base_image_ref"], base.as_str(), "{img}");
    assert_eq!(props["purpose"], "test", "{img}");
    assert_eq!(props["hw_disk_bus"], "virtio", "{img}");
    assert!(props.get("cache_in_nova").is_none(), "{img}");
    assert_eq!(img["checksum"].as_str().unwrap().len(), 32, "{img}");
    let snap1 = img["id"].as_str().unwrap().to_owned();

    // The server is as it was, and its action log has the snapshot.
    let shown = wait_status(&osc, 0, &id, "ACTIVE");
    assert_eq!(shown["OS-EXT-STS:power_state"], 1, "{shown}");
    let ev = events(&c, 2, &id, "createImage");
    assert_eq!(ev[0]["event"], "compute_snapshot_instance", "{ev:?}");
    assert_eq!(ev[0]["result"], "Success", "{ev:?}");

    // Downloaded through another node: a qcow2 with no backing file whose bytes are the base
    // image's (the overlay was flattened onto it), the flavor's 1 GiB.
    let file = c.tmp.path().join("snap1.qcow2");
    let out = osc.run(
        0,
        &["image", "save", "--file", file.to_str().unwrap(), &snap1],
    );
    assert!(out.ok, "{}", out.stderr);
    let info: Value = serde_json::from_str(&qemu_img(&[
        "info",
        "--output=json",
        file.to_str().unwrap(),
    ]))
    .unwrap();
    assert_eq!(info["format"], "qcow2", "{info}");
    assert_eq!(info["virtual-size"], 1u64 << 30, "{info}");
    assert!(info.get("backing-filename").is_none(), "{info}");
    qemu_img(&["check", file.to_str().unwrap()]);
    let raw = c.tmp.path().join("snap1.raw");
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        file.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    let bytes = std::fs::read(&raw).unwrap();
    assert!(bytes[..1 << 20].iter().all(|b| *b == 7));
    assert!(bytes[1 << 20..(2 << 20)].iter().all(|b| *b == 0));

    // A server boots from the snapshot.
    let vm2 = osc.json(
        2,
        &[
            "server", "create", "--flavor", "m1.tiny", "--image", "snap1", "--wait", "vm2",
        ],
    );
    assert_eq!(vm2["status"], "ACTIVE", "{vm2}");
    assert!(vm2["image"].to_string().contains(&snap1), "{vm2}");

    // A stopped server: the snapshot works and the server stays SHUTOFF.
    assert!(osc.run(0, &["server", "stop", &id]).ok);
    wait_status(&osc, 0, &id, "SHUTOFF");
    let out = osc.run(
        0,
        &[
            "server", "image", "create", "--name", "snap2", "--wait", &id,
        ],
    );
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(osc.json(1, &["image", "show", "snap2"])["status"], "active");
    let shown = wait_status(&osc, 1, &id, "SHUTOFF");
    assert_eq!(shown["OS-EXT-STS:power_state"], 4, "{shown}");

    // A paused server too, and it stays paused.
    let vm2_id = vm2["id"].as_str().unwrap().to_owned();
    assert!(osc.run(1, &["server", "pause", &vm2_id]).ok);
    wait_status(&osc, 1, &vm2_id, "PAUSED");
    let out = osc.run(
        2,
        &[
            "server", "image", "create", "--name", "snap3", "--wait", &vm2_id,
        ],
    );
    assert!(out.ok, "{}", out.stderr);
    wait_status(&osc, 0, &vm2_id, "PAUSED");

    // Nova's answers to what it refuses.
    let token = c.token(0);
    let action = |node: usize, body: Value, sid: &str| {
        c.api(
            node,
            "POST",
            &format!("/compute/v2.1/servers/{sid}/action"),
            &token,
            Some(body),
        )
    };
    for bad in [
        json!({"createImage": {}}),
        json!({"createImage": {"name": ""}}),
        json!({"createImage": {"name": "x".repeat(256)}}),
        json!({"createImage": {"name": " padded "}}),
        json!({"createImage": {"name": "m", "metadata": {"k": "v".repeat(256)}}}),
        json!({"createImage": {"name": "m", "metadata": {"": "v"}}}),
        json!({"createImage": {"name": "m", "metadata": ["not", "an", "object"]}}),
        json!({"createImage": {"name": "m", "other": 1}}),
        json!({"createImage": "snap"}),
    ] {
        let (status, body) = action(0, bad.clone(), &id);
        assert_eq!(status, 400, "{bad} -> {body}");
        assert_eq!(body["badRequest"]["code"], 400, "{body}");
    }
    let (status, body) = action(
        0,
        json!({"createImage": {"name": "x"}}),
        "6f1c2d7e-0000-4000-8000-00000000dead",
    );
    assert_eq!(status, 404, "{body}");
    assert!(body["itemNotFound"]["message"].is_string(), "{body}");
    // An ERROR server cannot be snapshotted (409), and no image is left behind.
    let (status, body) = action(0, json!({"os-resetState": {"state": "error"}}), &id);
    assert_eq!(status, 202, "{body}");
    let (status, body) = action(1, json!({"createImage": {"name": "refused"}}), &id);
    assert_eq!(status, 409, "{body}");
    assert!(
        body["conflictingRequest"]["message"]
            .as_str()
            .unwrap()
            .contains("vm_state error"),
        "{body}"
    );
    let listed = osc.json(0, &["image", "list", "--name", "refused"]);
    assert_eq!(listed, json!([]), "{listed}");

    // Deleting the server keeps its finished snapshots, as in Nova.
    assert!(osc.run(0, &["server", "delete", "--wait", &id]).ok);
    assert_eq!(osc.json(2, &["image", "show", "snap2"])["status"], "active");
}

#[test]
fn shelve_offloads_and_unshelve_spawns_from_the_shelve_image() {
    let Some(bin) = openstack_bin() else { return };
    let c = Cluster::start(3, &[]);
    let osc = Osc { bin, cluster: &c };
    setup(&osc, c.tmp.path());
    let vm = osc.json(
        1,
        &[
            "server", "create", "--flavor", "m1.tiny", "--image", "tiny", "--wait", "sh1",
        ],
    );
    let id = vm["id"].as_str().unwrap().to_owned();
    let host = vm["OS-EXT-SRV-ATTR:host"].as_str().unwrap().to_owned();
    let token = c.token(0);
    let gone = |image: &str| {
        c.api(0, "GET", &format!("/image/v2/images/{image}"), &token, None)
            .0
            == 404
    };
    let vcpus_used = |name: &str| -> u64 {
        let (status, h) = c.api(
            0,
            "GET",
            "/compute/v2.1/os-hypervisors/detail",
            &token,
            None,
        );
        assert_eq!(status, 200, "{h}");
        h["hypervisors"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["hypervisor_hostname"] == name)
            .unwrap_or_else(|| panic!("no hypervisor {name} in {h}"))["vcpus_used"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(vcpus_used(&host), 1);

    // shelved_offload_time is 0 (Nova's default): shelve ends offloaded, no host, no claim.
    let out = osc.run(0, &["server", "shelve", "--wait", &id]);
    assert!(out.ok, "{}", out.stderr);
    let v = wait_status(&osc, 2, &id, "SHELVED_OFFLOADED");
    assert_eq!(v["OS-EXT-STS:vm_state"], "shelved_offloaded", "{v}");
    assert_eq!(v["OS-EXT-STS:power_state"], 0, "{v}");
    assert!(v["OS-EXT-SRV-ATTR:host"].is_null(), "{v}");
    assert_eq!(vcpus_used(&host), 0);
    let img = osc.json(1, &["image", "show", "sh1-shelved"]);
    assert_eq!(img["status"], "active", "{img}");
    assert_eq!(img["properties"]["image_type"], "snapshot", "{img}");
    assert_eq!(img["properties"]["instance_uuid"], id.as_str(), "{img}");
    let shelve_image = img["id"].as_str().unwrap().to_owned();
    let ev = events(&c, 0, &id, "shelve");
    assert_eq!(ev[0]["event"], "compute_shelve_instance", "{ev:?}");
    assert_eq!(ev[0]["result"], "Success", "{ev:?}");
    let node = c.nodes.iter().find(|n| n.name == host).unwrap();
    assert!(!node.dir.join("instances").join(&id).exists());

    // What the state forbids is Nova's 409.
    osc.run(0, &["server", "start", &id]).failed_with(409);
    for body in [
        json!({"shelve": null}),
        json!({"shelveOffload": null}),
        json!({"createImage": {"name": "no"}}),
        json!({"os-start": null}),
    ] {
        let (status, resp) = c.api(
            2,
            "POST",
            &format!("/compute/v2.1/servers/{id}/action"),
            &token,
            Some(body.clone()),
        );
        assert_eq!(status, 409, "{body} -> {resp}");
        assert_eq!(resp["conflictingRequest"]["code"], 409, "{resp}");
    }
    let (status, resp) = c.api(
        2,
        "POST",
        &format!("/compute/v2.1/servers/{id}/action"),
        &token,
        Some(json!({"unshelve": {"availability_zone": "nova", "host": "x"}})),
    );
    assert_eq!(status, 400, "{resp}");

    // Unshelve: placed again, spawned from the shelve image, which then goes.
    let out = osc.run(1, &["server", "unshelve", "--wait", &id]);
    assert!(out.ok, "{}", out.stderr);
    let v = wait_status(&osc, 0, &id, "ACTIVE");
    assert_eq!(v["OS-EXT-STS:power_state"], 1, "{v}");
    let new_host = v["OS-EXT-SRV-ATTR:host"].as_str().unwrap().to_owned();
    assert_eq!(vcpus_used(&new_host), 1);
    wait_until(
        "the shelve image to be deleted",
        Duration::from_secs(30),
        || gone(&shelve_image).then_some(()),
    );
    let disk = c
        .nodes
        .iter()
        .find(|n| n.name == new_host)
        .unwrap()
        .dir
        .join("instances")
        .join(&id)
        .join("disk");
    let info: Value = serde_json::from_str(&qemu_img(&[
        "info",
        "--output=json",
        disk.to_str().unwrap(),
    ]))
    .unwrap();
    assert!(info.get("backing-filename").is_none(), "{info}");
    let ev = events(&c, 2, &id, "unshelve");
    assert_eq!(ev[0]["event"], "compute_unshelve_instance", "{ev:?}");
    assert_eq!(ev[0]["result"], "Success", "{ev:?}");
    // It lives on: stop and start work again.
    assert!(osc.run(2, &["server", "stop", &id]).ok);
    wait_status(&osc, 2, &id, "SHUTOFF");
    assert!(osc.run(2, &["server", "start", &id]).ok);
    wait_status(&osc, 2, &id, "ACTIVE");

    // A stopped server shelves too; deleting it while offloaded removes its shelve image.
    assert!(osc.run(0, &["server", "stop", &id]).ok);
    wait_status(&osc, 0, &id, "SHUTOFF");
    assert!(osc.run(0, &["server", "shelve", "--wait", &id]).ok);
    wait_status(&osc, 1, &id, "SHELVED_OFFLOADED");
    let shelve_image = osc.json(1, &["image", "show", "sh1-shelved"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(osc.run(0, &["server", "delete", "--wait", &id]).ok);
    assert!(gone(&shelve_image));
}

#[test]
fn unshelve_keeps_the_server_group_policy() {
    let Some(bin) = openstack_bin() else { return };
    let c = Cluster::start(3, &[]);
    let osc = Osc { bin, cluster: &c };
    setup(&osc, c.tmp.path());
    let group = osc.json(
        0,
        &[
            "server", "group", "create", "--policy", "affinity", "together",
        ],
    );
    let gid = group["id"].as_str().unwrap().to_owned();
    let boot = |name: &str| {
        let vm = osc.json(
            1,
            &[
                "server",
                "create",
                "--flavor",
                "m1.tiny",
                "--image",
                "tiny",
                "--hint",
                &format!("group={gid}"),
                "--wait",
                name,
            ],
        );
        (
            vm["id"].as_str().unwrap().to_owned(),
            vm["OS-EXT-SRV-ATTR:host"].as_str().unwrap().to_owned(),
        )
    };
    let (a, host) = boot("g1");
    let (_, host_b) = boot("g2");
    assert_eq!(host_b, host);

    // Offloaded, `a` leaves its host; the weighers alone would spread it to an empty one.
    assert!(osc.run(0, &["server", "shelve", "--wait", &a]).ok);
    wait_status(&osc, 0, &a, "SHELVED_OFFLOADED");
    assert!(osc.run(2, &["server", "unshelve", "--wait", &a]).ok);
    let v = wait_status(&osc, 2, &a, "ACTIVE");
    assert_eq!(v["OS-EXT-SRV-ATTR:host"], host.as_str(), "{v}");
    // Still one member each, not a second entry for the unshelved server.
    let g = osc.json(1, &["server", "group", "show", &gid]);
    let members = g["members"].as_str().map_or_else(
        || g["members"].as_array().unwrap().len(),
        |s| s.split(',').filter(|m| !m.trim().is_empty()).count(),
    );
    assert_eq!(members, 2, "{g}");
}

/// `server backup create` (Nova's `createBackup`): each backup is a snapshot marked as a backup
/// of its type, and the rotation keeps only the newest of that server and type; rotation 0
/// removes them all. Bad input is Nova's 400 naming the field.
#[test]
fn backups_rotate_per_server_and_type() {
    let Some(bin) = openstack_bin() else { return };
    let c = Cluster::start(3, &[]);
    let osc = Osc { bin, cluster: &c };
    setup(&osc, c.tmp.path());
    let vm = osc.json(
        0,
        &[
            "server", "create", "--flavor", "m1.tiny", "--image", "tiny", "--wait", "vm1",
        ],
    );
    let id = vm["id"].as_str().unwrap().to_owned();
    // The backups of vm1 of `kind`, oldest first, by name.
    let backups = |kind: &str| -> Vec<String> {
        let list = osc.json(
            1,
            &[
                "image",
                "list",
                "--property",
                "image_type=backup",
                "--property",
                &format!("backup_type={kind}"),
                "--property",
                &format!("instance_uuid={id}"),
                "--sort",
                "created_at:asc",
            ],
        );
        list.as_array()
            .unwrap()
            .iter()
            .map(|i| i["Name"].as_str().unwrap().to_owned())
            .collect()
    };
    let backup = |node: usize, name: &str, kind: &str, rotate: &str| {
        let out = osc.run(
            node,
            &[
                "server", "backup", "create", "--name", name, "--type", kind, "--rotate", rotate,
                "--wait", &id,
            ],
        );
        assert!(out.ok, "backup {name}: {}", out.stderr);
        wait_status(&osc, 0, &id, "ACTIVE");
    };

    backup(0, "b1", "daily", "2");
    let img = osc.json(2, &["image", "show", "b1"]);
    assert_eq!(img["status"], "active", "{img}");
    assert_eq!(img["properties"]["image_type"], "backup", "{img}");
    assert_eq!(img["properties"]["backup_type"], "daily", "{img}");
    assert_eq!(img["properties"]["instance_uuid"], id.as_str(), "{img}");
    let ev = events(&c, 1, &id, "createBackup");
    assert_eq!(ev[0]["event"], "compute_backup_instance", "{ev:?}");
    assert_eq!(ev[0]["result"], "Success", "{ev:?}");
    // Seconds apart, so that creation times order them.
    std::thread::sleep(Duration::from_millis(1100));
    backup(1, "b2", "daily", "2");
    std::thread::sleep(Duration::from_millis(1100));
    backup(2, "w1", "weekly", "1");
    assert_eq!(backups("daily"), ["b1", "b2"]);
    std::thread::sleep(Duration::from_millis(1100));
    backup(0, "b3", "daily", "2");
    // The oldest daily backup went; the weekly one is another type and stays.
    let daily = wait_until("the rotation", Duration::from_secs(30), || {
        let d = backups("daily");
        (d.len() == 2).then_some(d)
    });
    assert_eq!(daily, ["b2", "b3"]);
    assert_eq!(backups("weekly"), ["w1"]);
    let out = osc.run(0, &["image", "show", "b1"]);
    assert!(
        !out.ok && out.stderr.contains("No Image found"),
        "{}",
        out.stderr
    );

    // Rotation 0 removes every daily backup, the new one too, as Nova does.
    let (status, _) = c.api(
        0,
        "POST",
        &format!("/compute/v2.1/servers/{id}/action"),
        &c.token(0),
        Some(json!({"createBackup": {"name": "b4", "backup_type": "daily", "rotation": 0}})),
    );
    assert_eq!(status, 202);
    wait_until("rotation 0", Duration::from_secs(60), || {
        backups("daily").is_empty().then_some(())
    });
    wait_status(&osc, 0, &id, "ACTIVE");
    assert_eq!(backups("weekly"), ["w1"]);

    // Bad input: Nova's 400, naming the field.
    for (arg, field) in [
        (
            json!({"name": "x", "backup_type": "daily", "rotation": -1}),
            "rotation",
        ),
        (
            json!({"name": "x", "backup_type": "daily", "rotation": "two"}),
            "rotation",
        ),
        (
            json!({"name": "x", "backup_type": 7, "rotation": 1}),
            "backup_type",
        ),
        (json!({"name": "x", "rotation": 1}), "backup_type"),
        (json!({"backup_type": "daily", "rotation": 1}), "name"),
        (
            json!({"name": "x", "backup_type": "daily", "rotation": 1, "extra": 1}),
            "extra",
        ),
    ] {
        let (status, body) = c.api(
            1,
            "POST",
            &format!("/compute/v2.1/servers/{id}/action"),
            &c.token(1),
            Some(json!({ "createBackup": arg })),
        );
        assert_eq!(status, 400, "{arg}: {body}");
        let msg = body["badRequest"]["message"].as_str().unwrap();
        assert!(msg.contains(field), "{arg}: {msg}");
    }
}
