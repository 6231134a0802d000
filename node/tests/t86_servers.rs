//! Servers through the real `openstack` client on three nodes whose compute agents drive
//! libvirt's test hypervisor (`test:///default`: real libvirt, domains that run nothing):
//! the lifecycle, quotas, NoValidHost, bad input, anti-affinity, a disabled host, and many
//! concurrent creates through every node.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::osc::{openstack_bin, Osc};
use common::{wait_until, Cluster};
use serde_json::{json, Value};

/// Waits until server `id` has `status`; returns its `server show` JSON.
fn wait_status(osc: &Osc<'_>, node: usize, id: &str, status: &str) -> Value {
    wait_until(
        &format!("server {id} to be {status}"),
        Duration::from_secs(60),
        || {
            let v = osc.json(node, &["server", "show", id]);
            (v["status"] == status).then_some(v)
        },
    )
}

fn setup(osc: &Osc<'_>, dir: &std::path::Path) -> (String, String) {
    let flavor = osc.json(
        0,
        &[
            "flavor", "create", "--vcpus", "1", "--ram", "256", "--disk", "1", "m1.tiny",
        ],
    );
    (
        flavor["id"].as_str().unwrap().to_owned(),
        upload_raw(osc, 1, dir, "tiny", 0),
    )
}

/// Uploads a 1 MiB raw image of `fill` bytes named `name` through node `node`; its id.
fn upload_raw(osc: &Osc<'_>, node: usize, dir: &std::path::Path, name: &str, fill: u8) -> String {
    let disk = dir.join(format!("{name}.raw"));
    std::fs::write(&disk, vec![fill; 1 << 20]).unwrap();
    let image = osc.json(
        node,
        &[
            "image",
            "create",
            "--disk-format",
            "raw",
            "--container-format",
            "bare",
            "--file",
            disk.to_str().unwrap(),
            name,
        ],
    );
    image["id"].as_str().unwrap().to_owned()
}

#[test]
fn a_server_lives_its_life_through_any_node() {
    let Some(bin) = openstack_bin() else { return };
    let c = Cluster::start(3, &[]);
    let osc = Osc { bin, cluster: &c };
    let (_, image) = setup(&osc, c.tmp.path());

    // Created through node1 with --wait: ACTIVE on some host, with Nova's fields.
    let vm = osc.json(
        0,
        &[
            "server", "create", "--flavor", "m1.tiny", "--image", "tiny", "--wait", "vm1",
        ],
    );
    assert_eq!(vm["status"], "ACTIVE", "{vm}");
    assert_eq!(vm["OS-EXT-STS:vm_state"], "active");
    assert_eq!(vm["OS-EXT-STS:power_state"], 1);
    let id = vm["id"].as_str().unwrap().to_owned();
    let host = vm["OS-EXT-SRV-ATTR:host"].as_str().unwrap().to_owned();
    assert!(["node1", "node2", "node3"].contains(&host.as_str()), "{vm}");
    let name = vm["OS-EXT-SRV-ATTR:instance_name"].as_str().unwrap();
    assert!(
        name.starts_with("instance-") && name.len() == "instance-".len() + 8,
        "{name}"
    );
    assert!(vm["image"].to_string().contains(&image), "{vm}");

    // Listed through node3, shown through node2.
    let list = osc.json(2, &["server", "list"]);
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|s| s["ID"] == id.as_str()),
        "{list}"
    );
    let shown = osc.json(1, &["server", "show", &id]);
    assert_eq!(shown["OS-EXT-SRV-ATTR:host"], host.as_str());

    // Rename, stop, start, hard and soft reboot, each through another node.
    let out = osc.run(1, &["server", "set", "--name", "vm1-renamed", &id]);
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(osc.json(2, &["server", "show", &id])["name"], "vm1-renamed");
    let out = osc.run(2, &["server", "stop", &id]);
    assert!(out.ok, "{}", out.stderr);
    let v = wait_status(&osc, 0, &id, "SHUTOFF");
    assert_eq!(v["OS-EXT-STS:power_state"], 4);
    // Stopping a stopped server is Nova's 409.
    osc.run(0, &["server", "stop", &id]).failed_with(409);
    let out = osc.run(0, &["server", "start", &id]);
    assert!(out.ok, "{}", out.stderr);
    wait_status(&osc, 1, &id, "ACTIVE");
    for kind in ["--hard", "--soft"] {
        let out = osc.run(1, &["server", "reboot", kind, "--wait", &id]);
        assert!(out.ok, "reboot {kind}: {}", out.stderr);
        wait_status(&osc, 2, &id, "ACTIVE");
    }
    // The test hypervisor writes no console; the call itself works from any node.
    let out = osc.run(2, &["console", "log", "show", &id]);
    assert!(out.ok, "{}", out.stderr);

    // Usage counts the server, in quota and limits.
    let limits = osc.json(0, &["limits", "show", "--absolute"]);
    let used = limits
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["Name"] == "instances_used")
        .unwrap()["Value"]
        .clone();
    assert_eq!(used, 1, "{limits}");

    // Delete --wait through node2: gone from every node, usage back to zero.
    let out = osc.run(1, &["server", "delete", "--wait", &id]);
    assert!(out.ok, "{}", out.stderr);
    let out = osc.run(0, &["server", "show", &id]);
    assert!(
        !out.ok && out.stderr.contains("No Server found"),
        "{}",
        out.stderr
    );
    let list = osc.json(2, &["server", "list"]);
    assert!(list.as_array().unwrap().is_empty(), "{list}");
    let limits = osc.json(0, &["limits", "show", "--absolute"]);
    assert!(
        limits
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["Name"] == "instances_used" && l["Value"] == 0),
        "{limits}"
    );
}

/// Pause, suspend and rebuild, each through another node, and the action log Nova keeps of
/// them (`server event list`), as a user of the client sees them.
#[test]
fn pause_suspend_rebuild_and_the_action_log() {
    let Some(bin) = openstack_bin() else { return };
    let c = Cluster::start(3, &[]);
    let osc = Osc { bin, cluster: &c };
    let (_, tiny) = setup(&osc, c.tmp.path());
    let other = upload_raw(&osc, 2, c.tmp.path(), "other", 1);
    let vm = osc.json(
        0,
        &[
            "server", "create", "--flavor", "m1.tiny", "--image", "tiny", "--wait", "vm",
        ],
    );
    let id = vm["id"].as_str().unwrap().to_owned();

    // Pause and unpause: PAUSED with Nova's power state 3; pausing twice is a 409.
    assert!(osc.run(1, &["server", "pause", &id]).ok);
    let v = wait_status(&osc, 2, &id, "PAUSED");
    assert_eq!(v["OS-EXT-STS:vm_state"], "paused");
    assert_eq!(v["OS-EXT-STS:power_state"], 3);
    osc.run(0, &["server", "pause", &id]).failed_with(409);
    osc.run(0, &["server", "suspend", &id]).failed_with(409);
    assert!(osc.run(2, &["server", "unpause", &id]).ok);
    wait_status(&osc, 0, &id, "ACTIVE");

    // Suspend and resume: SUSPENDED, its memory saved by libvirt and restored.
    assert!(osc.run(0, &["server", "suspend", &id]).ok);
    let v = wait_status(&osc, 1, &id, "SUSPENDED");
    assert_eq!(v["OS-EXT-STS:vm_state"], "suspended");
    osc.run(2, &["server", "unpause", &id]).failed_with(409);
    assert!(osc.run(1, &["server", "resume", &id]).ok);
    let v = wait_status(&osc, 2, &id, "ACTIVE");
    assert_eq!(v["OS-EXT-STS:power_state"], 1);

    // Rebuild onto another image: ACTIVE again, on the same host, with the new image.
    let out = osc.run(2, &["server", "rebuild", "--image", "other", "--wait", &id]);
    assert!(out.ok, "{}", out.stderr);
    let v = wait_status(&osc, 0, &id, "ACTIVE");
    assert!(v["image"].to_string().contains(&other), "{v}");
    assert_eq!(v["OS-EXT-SRV-ATTR:host"], vm["OS-EXT-SRV-ATTR:host"]);
    // A stopped server is rebuilt and stays stopped, as in Nova.
    assert!(osc.run(0, &["server", "stop", &id]).ok);
    wait_status(&osc, 0, &id, "SHUTOFF");
    assert!(
        osc.run(1, &["server", "rebuild", "--image", "tiny", &id])
            .ok
    );
    let v = wait_until(
        "the rebuild of a stopped server",
        Duration::from_secs(60),
        || {
            let v = osc.json(2, &["server", "show", &id]);
            (v["status"] == "SHUTOFF" && v["image"].to_string().contains(&tiny)).then_some(v)
        },
    );
    assert_eq!(v["OS-EXT-STS:task_state"], Value::Null, "{v}");
    // An image that does not exist is Nova's 400 naming it, and the server is untouched.
    let resp = c
        .http
        .post(format!(
            "{}/compute/v2.1/servers/{id}/action",
            c.nodes[0].base()
        ))
        .header("X-Auth-Token", c.token(0))
        .json(&json!({"rebuild": {"imageRef": "8a7d0d3e-0000-4000-8000-000000000000"}}))
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let body: Value = resp.json().unwrap();
    assert!(
        body["badRequest"]["message"]
            .as_str()
            .unwrap()
            .contains("8a7d0d3e-0000-4000-8000-000000000000"),
        "{body}"
    );
    assert_eq!(osc.json(1, &["server", "show", &id])["status"], "SHUTOFF");

    // The action log, newest first, from any node: one entry per request.
    let events = osc.json(1, &["server", "event", "list", &id]);
    let actions: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["Action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        ["rebuild", "stop", "rebuild", "resume", "suspend", "unpause", "pause", "create"],
        "{events}"
    );
    let first = &events.as_array().unwrap()[7];
    let request = first["Request ID"].as_str().unwrap();
    assert!(request.starts_with("req-"), "{first}");
    // An admin sees what the compute agent did for it.
    let shown = osc.json(2, &["server", "event", "show", &id, request]);
    assert_eq!(shown["action"], "create", "{shown}");
    let agent_events = shown["events"].to_string();
    assert!(
        agent_events.contains("compute__do_build_and_run_instance")
            && agent_events.contains("Success"),
        "{shown}"
    );
    let out = osc.run(0, &["server", "event", "show", &id, "req-nope"]);
    // The client words the 404 itself ("No ServerAction found"), then quotes Nova's message.
    assert!(
        !out.ok && out.stderr.contains("Action req-nope on instance"),
        "{}",
        out.stderr
    );

    // An admin's reset to ERROR, then a rebuild brings the server back, as in Nova.
    assert!(
        osc.run(
            1,
            &["server", "set", "--state", "error", "--auto-approve", &id]
        )
        .ok
    );
    let v = wait_status(&osc, 2, &id, "ERROR");
    assert_eq!(v["OS-EXT-STS:task_state"], Value::Null, "{v}");
    let out = osc.run(0, &["server", "rebuild", "--image", "tiny", "--wait", &id]);
    assert!(out.ok, "{}", out.stderr);
    wait_status(&osc, 1, &id, "ACTIVE");

    // A suspended server deletes like any other.
    assert!(osc.run(0, &["server", "suspend", &id]).ok);
    wait_status(&osc, 1, &id, "SUSPENDED");
    let out = osc.run(2, &["server", "delete", "--wait", &id]);
    assert!(out.ok, "{}", out.stderr);
}

#[test]
fn quotas_no_valid_host_bad_input_and_groups() {
    let Some(bin) = openstack_bin() else { return };
    let c = Cluster::start(3, &[]);
    let osc = Osc { bin, cluster: &c };
    setup(&osc, c.tmp.path());
    let create = |node: usize, extra: &[&str], name: &str| {
        let mut args = vec!["server", "create", "--flavor", "m1.tiny", "--image", "tiny"];
        args.extend_from_slice(extra);
        args.push(name);
        osc.run(node, &args)
    };

    // Bad input: Nova's 400 naming what is wrong, and nothing created.
    for (args, what) in [
        (
            vec![
                "server", "create", "--flavor", "nope", "--image", "tiny", "x",
            ],
            "flavor",
        ),
        (
            vec![
                "server", "create", "--flavor", "m1.tiny", "--image", "nope", "x",
            ],
            "image",
        ),
    ] {
        let out = osc.run(0, &args);
        assert!(!out.ok, "{what}: {}", out.stdout);
    }
    let long = "n".repeat(256);
    create(1, &[], &long).failed_with(400);
    let out = create(2, &["--key-name", "no-such-key"], "x");
    out.failed_with(400);
    assert!(out.stderr.contains("key_name"), "{}", out.stderr);
    let token = c.token(0);
    let flavor_id = osc.json(0, &["flavor", "show", "m1.tiny"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let image_id = osc.json(0, &["image", "show", "tiny"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let post = |body: Value| {
        c.http
            .post(format!("{}/compute/v2.1/servers", c.nodes[0].base()))
            .header("X-Auth-Token", &token)
            .json(&body)
            .send()
            .unwrap()
    };
    let resp = post(json!({"server": {"name": "x", "flavorRef": flavor_id,
        "imageRef": image_id, "user_data": "not base64!!"}}));
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().unwrap();
    assert!(
        body["badRequest"]["message"]
            .as_str()
            .unwrap()
            .contains("base 64"),
        "{body}"
    );
    assert!(osc
        .json(0, &["server", "list"])
        .as_array()
        .unwrap()
        .is_empty());

    // NoValidHost: a flavor no host can hold gives ERROR with Nova's fault, not a hang.
    osc.json(
        0,
        &[
            "flavor",
            "create",
            "--vcpus",
            "1",
            "--ram",
            "256",
            "--disk",
            "100000000",
            "huge",
        ],
    );
    let out = osc.run(
        1,
        &[
            "server", "create", "--flavor", "huge", "--image", "tiny", "-f", "json", "big",
        ],
    );
    let id = out.json()["id"].as_str().unwrap().to_owned();
    let v = wait_status(&osc, 2, &id, "ERROR");
    let fault = v["fault"].to_string();
    assert!(fault.contains("No valid host"), "{v}");
    let out = osc.run(0, &["server", "delete", "--wait", &id]);
    assert!(out.ok, "{}", out.stderr);

    // Anti-affinity across three nodes: three servers on three hosts, the fourth refused.
    let group = osc.json(
        0,
        &[
            "server",
            "group",
            "create",
            "--policy",
            "anti-affinity",
            "spread",
        ],
    );
    let gid = group["id"].as_str().unwrap().to_owned();
    let hint = format!("group={gid}");
    let mut hosts = Vec::new();
    let mut placed = Vec::new();
    for i in 0..3 {
        let out = create(
            i,
            &["--hint", &hint, "--wait", "-f", "json"],
            &format!("aa{i}"),
        );
        let v = out.json();
        assert_eq!(v["status"], "ACTIVE", "{v}");
        hosts.push(v["OS-EXT-SRV-ATTR:host"].as_str().unwrap().to_owned());
        placed.push(v["id"].as_str().unwrap().to_owned());
    }
    hosts.sort();
    hosts.dedup();
    assert_eq!(hosts.len(), 3, "anti-affinity broken: {hosts:?}");
    let out = create(1, &["--hint", &hint, "-f", "json"], "aa3");
    let id = out.json()["id"].as_str().unwrap().to_owned();
    let v = wait_status(&osc, 0, &id, "ERROR");
    assert!(v["fault"].to_string().contains("No valid host"), "{v}");
    let members = osc.json(2, &["server", "group", "show", &gid])["members"].to_string();
    assert!(placed.iter().all(|p| members.contains(p)), "{members}");

    // Quota: with 5 instances in the project and a limit of 5, the next create is 403.
    let project = osc.json(0, &["project", "show", "admin"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let out = osc.run(0, &["quota", "set", "--instances", "5", &project]);
    assert!(out.ok, "{}", out.stderr);
    create(2, &["--wait"], "q4");
    let out = create(0, &[], "q5");
    out.failed_with(403);
    assert!(out.stderr.contains("Quota exceeded"), "{}", out.stderr);
    let usage = osc.json(1, &["quota", "show", "--compute", "--usage", &project]);
    assert!(usage.to_string().contains("\"instances\""), "{usage}");

    // A disabled compute service gets no server.
    for s in osc.json(0, &["server", "list"]).as_array().unwrap() {
        let out = osc.run(
            0,
            &["server", "delete", "--wait", s["ID"].as_str().unwrap()],
        );
        assert!(out.ok, "{}", out.stderr);
    }
    let out = osc.run(
        1,
        &[
            "compute",
            "service",
            "set",
            "--disable",
            "node2",
            "nova-compute",
        ],
    );
    assert!(out.ok, "{}", out.stderr);
    for i in 0..4 {
        let v = create(i % 3, &["--wait", "-f", "json"], &format!("d{i}")).json();
        assert_ne!(
            v["OS-EXT-SRV-ATTR:host"], "node2",
            "placed on a disabled host: {v}"
        );
    }
}

#[test]
fn concurrent_creates_through_every_node_never_overbook_a_host() {
    let Some(bin) = openstack_bin() else { return };
    let c = Cluster::start(3, &[]);
    let osc = Osc { bin, cluster: &c };
    setup(&osc, c.tmp.path());
    let project = osc.json(0, &["project", "show", "admin"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let out = osc.run(
        0,
        &[
            "quota",
            "set",
            "--instances",
            "200",
            "--cores",
            "2000",
            "--ram",
            "100000000",
            &project,
        ],
    );
    assert!(out.ok, "{}", out.stderr);
    // Each host registers the machine's RAM; a flavor of a fifth of it lets only a few fit.
    let hosts = osc.json(0, &["hypervisor", "list", "--long"]);
    let ram_total: u64 = hosts.as_array().unwrap()[0]["Memory MB"]
        .as_u64()
        .unwrap_or_else(|| panic!("{hosts}"));
    let ram = (ram_total / 5).max(64);
    osc.json(
        0,
        &[
            "flavor",
            "create",
            "--vcpus",
            "1",
            "--ram",
            &ram.to_string(),
            "--disk",
            "1",
            "fifth",
        ],
    );
    let flavor = osc.json(0, &["flavor", "show", "fifth"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let image = osc.json(0, &["image", "show", "tiny"])["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let tokens: Vec<String> = (0..3).map(|i| c.token(i)).collect();
    let accepted: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..30)
            .map(|i| {
                let (c, tokens, flavor, image) = (&c, &tokens, &flavor, &image);
                s.spawn(move || {
                    let node = i % 3;
                    let resp = c
                        .http
                        .post(format!("{}/compute/v2.1/servers", c.nodes[node].base()))
                        .header("X-Auth-Token", &tokens[node])
                        .json(&json!({"server": {"name": format!("c{i}"),
                            "flavorRef": flavor, "imageRef": image}}))
                        .send()
                        .unwrap();
                    assert_eq!(resp.status(), 202, "create {i}");
                    let v: Value = resp.json().unwrap();
                    v["server"]["id"].as_str().unwrap().to_owned()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Every accepted create is listed and ends ACTIVE or ERROR; none stays in BUILD.
    let servers = wait_until("every server to settle", Duration::from_secs(120), || {
        let list = osc.json(0, &["server", "list", "--long"]);
        let list = list.as_array().unwrap().clone();
        let settled = list
            .iter()
            .all(|s| s["Status"] == "ACTIVE" || s["Status"] == "ERROR");
        (settled && list.len() == accepted.len()).then_some(list)
    });
    for id in &accepted {
        assert!(
            servers.iter().any(|s| s["ID"] == id.as_str()),
            "{id} not listed"
        );
    }
    // No host holds more RAM than it has (a new host's RAM ratio is Nova's initial 1.0).
    let mut per_host: BTreeMap<String, u64> = BTreeMap::new();
    let mut active = 0;
    for s in &servers {
        if s["Status"] == "ACTIVE" {
            active += 1;
            *per_host
                .entry(s["Host"].as_str().unwrap().to_owned())
                .or_default() += ram;
        }
    }
    for (host, used) in &per_host {
        assert!(
            *used as f64 <= ram_total as f64,
            "{host} holds {used} MB of {ram_total} MB"
        );
    }
    assert!(active >= 3, "only {active} of 30 servers became ACTIVE");
    let hyper = osc.json(1, &["hypervisor", "list", "--long"]);
    for h in hyper.as_array().unwrap() {
        let name = h["Hypervisor Hostname"].as_str().unwrap();
        let used = h["Memory MB Used"].as_u64().unwrap();
        // Nova counts the host's reserved RAM (`reserved_host_memory_mb`, 512) as used.
        assert_eq!(
            used,
            per_host.get(name).copied().unwrap_or(0) + 512,
            "{name}: the claims and the ACTIVE servers disagree"
        );
    }
}

/// Server-group policies hold under concurrent creates through different nodes: claims are
/// checked against a host's capacity when they apply, not conditioned on the host row, so
/// what keeps two members of an anti-affinity group off one host is the group row each
/// create is conditioned on and the members' hosts read with it. Nine creates into an
/// anti-affinity group over three hosts: exactly three ACTIVE, on three hosts, the rest
/// ERROR with NoValidHost; six into an affinity group: all on one host.
#[test]
fn concurrent_group_creates_through_every_node_keep_the_policy() {
    let Some(bin) = openstack_bin() else { return };
    let c = Cluster::start(3, &[]);
    let osc = Osc { bin, cluster: &c };
    let (flavor, image) = setup(&osc, c.tmp.path());
    let project = osc.json(0, &["project", "show", "admin"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let out = osc.run(0, &["quota", "set", "--instances", "100", &project]);
    assert!(out.ok, "{}", out.stderr);
    let group = |policy: &str, name: &str| {
        osc.json(0, &["server", "group", "create", "--policy", policy, name])["id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let spread = group("anti-affinity", "spread");
    let together = group("affinity", "together");
    let tokens: Vec<String> = (0..3).map(|i| c.token(i)).collect();
    let create_all = |gid: &str, n: usize| -> Vec<String> {
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..n)
                .map(|i| {
                    let (c, tokens, flavor, image) = (&c, &tokens, &flavor, &image);
                    s.spawn(move || {
                        let node = i % 3;
                        let resp = c
                            .http
                            .post(format!("{}/compute/v2.1/servers", c.nodes[node].base()))
                            .header("X-Auth-Token", &tokens[node])
                            .json(&json!({"server": {"name": format!("g{i}"),
                                "flavorRef": flavor, "imageRef": image},
                                "os:scheduler_hints": {"group": gid}}))
                            .send()
                            .unwrap();
                        assert_eq!(resp.status(), 202, "create {i}");
                        let v: Value = resp.json().unwrap();
                        v["server"]["id"].as_str().unwrap().to_owned()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    };
    let settled = |ids: &[String]| -> Vec<Value> {
        ids.iter()
            .map(|id| {
                wait_until("the server to settle", Duration::from_secs(120), || {
                    let v = osc.json(0, &["server", "show", id]);
                    (v["status"] == "ACTIVE" || v["status"] == "ERROR").then_some(v)
                })
            })
            .collect()
    };

    let spread_ids = create_all(&spread, 9);
    let servers = settled(&spread_ids);
    let mut hosts: Vec<String> = servers
        .iter()
        .filter(|v| v["status"] == "ACTIVE")
        .map(|v| v["OS-EXT-SRV-ATTR:host"].as_str().unwrap().to_owned())
        .collect();
    hosts.sort();
    let active = hosts.len();
    hosts.dedup();
    assert_eq!(
        active, 3,
        "anti-affinity: {active} of 9 ACTIVE on {hosts:?}"
    );
    assert_eq!(hosts.len(), 3, "anti-affinity broken: {hosts:?}");
    for v in servers.iter().filter(|v| v["status"] == "ERROR") {
        assert!(v["fault"].to_string().contains("No valid host"), "{v}");
    }

    let together_ids = create_all(&together, 6);
    let servers = settled(&together_ids);
    let mut hosts: Vec<String> = servers
        .iter()
        .map(|v| {
            assert_eq!(v["status"], "ACTIVE", "{v}");
            v["OS-EXT-SRV-ATTR:host"].as_str().unwrap().to_owned()
        })
        .collect();
    hosts.sort();
    hosts.dedup();
    assert_eq!(hosts.len(), 1, "affinity broken: {hosts:?}");
}

#[test]
fn servers_get_ports_on_the_projects_networks() {
    let Some(bin) = openstack_bin() else { return };
    let c = Cluster::start(3, &[]);
    let osc = Osc { bin, cluster: &c };
    setup(&osc, c.tmp.path());
    osc.json(0, &["network", "create", "net1"]);
    osc.json(
        1,
        &[
            "subnet",
            "create",
            "--network",
            "net1",
            "--subnet-range",
            "10.9.0.0/24",
            "sub1",
        ],
    );

    // One network visible: a server without --nic gets a port on it.
    let vm = osc.json(
        2,
        &[
            "server", "create", "--flavor", "m1.tiny", "--image", "tiny", "--wait", "vmn",
        ],
    );
    let id = vm["id"].as_str().unwrap().to_owned();
    let host = vm["OS-EXT-SRV-ATTR:host"].as_str().unwrap().to_owned();
    assert!(vm["addresses"].to_string().contains("10.9.0."), "{vm}");
    let ports = osc.json(0, &["port", "list", "--server", &id]);
    let ports = ports.as_array().unwrap();
    assert_eq!(ports.len(), 1, "{ports:?}");
    let port_id = ports[0]["ID"].as_str().unwrap().to_owned();
    let port = osc.json(1, &["port", "show", &port_id]);
    assert_eq!(port["device_owner"], "compute:nova", "{port}");
    assert_eq!(port["binding_host_id"], host.as_str(), "{port}");
    assert!(port["mac_address"]
        .as_str()
        .unwrap()
        .starts_with("fa:16:3e:"));

    // Two networks: the server must say which.
    osc.json(0, &["network", "create", "net2"]);
    osc.json(
        0,
        &[
            "subnet",
            "create",
            "--network",
            "net2",
            "--subnet-range",
            "10.8.0.0/24",
            "sub2",
        ],
    );
    let out = osc.run(
        1,
        &[
            "server", "create", "--flavor", "m1.tiny", "--image", "tiny", "x",
        ],
    );
    out.failed_with(409);
    let vm2 = osc.json(
        1,
        &[
            "server",
            "create",
            "--flavor",
            "m1.tiny",
            "--image",
            "tiny",
            "--network",
            "net2",
            "--wait",
            "vm2",
        ],
    );
    assert!(vm2["addresses"].to_string().contains("10.8.0."), "{vm2}");

    // Security groups: named at create, added and removed later; each reaches the ports.
    let web = osc.json(0, &["security", "group", "create", "web"]);
    let web_id = web["id"].as_str().unwrap().to_owned();
    let default_id = osc.json(0, &["security", "group", "show", "default"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let groups_of_port = |server: &str| -> Vec<String> {
        let ports = osc.json(1, &["port", "list", "--server", server]);
        let port = ports[0]["ID"].as_str().unwrap().to_owned();
        let mut ids: Vec<String> = osc.json(2, &["port", "show", &port])["security_group_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect();
        ids.sort();
        ids
    };
    let vm5 = osc.json(
        2,
        &[
            "server",
            "create",
            "--flavor",
            "m1.tiny",
            "--image",
            "tiny",
            "--network",
            "net1",
            "--security-group",
            "web",
            "--wait",
            "vm5",
        ],
    );
    let vm5_id = vm5["id"].as_str().unwrap().to_owned();
    assert!(vm5["security_groups"].to_string().contains("web"), "{vm5}");
    assert_eq!(groups_of_port(&vm5_id), [web_id.as_str()]);
    let out = osc.run(0, &["server", "add", "security", "group", "vm5", "default"]);
    assert!(out.ok, "{}", out.stderr);
    let mut both = vec![web_id.clone(), default_id.clone()];
    both.sort();
    assert_eq!(groups_of_port(&vm5_id), both);
    let shown = osc.json(1, &["server", "show", "vm5"]);
    let text = shown["security_groups"].to_string();
    assert!(text.contains("web") && text.contains("default"), "{shown}");
    // A group already there, or not there for a removal, is Nova's 400 (the client only
    // counts failures, so these go over HTTP).
    let act = |body: Value| {
        c.http
            .post(format!(
                "{}/compute/v2.1/servers/{vm5_id}/action",
                c.nodes[1].base()
            ))
            .header("X-Auth-Token", c.token(1))
            .json(&body)
            .send()
            .unwrap()
    };
    let again = act(json!({"addSecurityGroup": {"name": "web"}}));
    assert_eq!(again.status(), 400);
    let msg = again.json::<Value>().unwrap()["badRequest"]["message"].to_string();
    assert!(msg.contains("already associated"), "{msg}");
    let out = osc.run(2, &["server", "remove", "security", "group", "vm5", "web"]);
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(groups_of_port(&vm5_id), [default_id.as_str()]);
    assert_eq!(
        act(json!({"removeSecurityGroup": {"name": "web"}})).status(),
        400
    );
    assert_eq!(
        act(json!({"addSecurityGroup": {"name": "nope"}})).status(),
        400
    );
    // An unknown group is refused at create (the client looks it up first), and nothing is
    // left behind.
    let out = osc.run(
        0,
        &[
            "server",
            "create",
            "--flavor",
            "m1.tiny",
            "--image",
            "tiny",
            "--network",
            "net1",
            "--security-group",
            "nope",
            "vm6",
        ],
    );
    assert!(!out.ok && out.stderr.contains("nope"), "{}", out.stderr);
    assert!(!osc.run(1, &["server", "show", "vm6"]).ok);

    // A port the user made is used, and only unbound when the server goes.
    let p1 = osc.json(2, &["port", "create", "--network", "net1", "p1"]);
    let p1_id = p1["id"].as_str().unwrap().to_owned();
    let p1_ip = p1["fixed_ips"].to_string();
    let vm3 = osc.json(
        0,
        &[
            "server", "create", "--flavor", "m1.tiny", "--image", "tiny", "--port", &p1_id,
            "--wait", "vm3",
        ],
    );
    let vm3_id = vm3["id"].as_str().unwrap().to_owned();
    assert_eq!(
        osc.json(1, &["port", "show", &p1_id])["device_id"],
        vm3_id.as_str()
    );
    assert!(
        vm3["addresses"].to_string().contains("10.9.0."),
        "{vm3} {p1_ip}"
    );
    // A bound port cannot be given to a second server.
    let out = osc.run(
        1,
        &[
            "server", "create", "--flavor", "m1.tiny", "--image", "tiny", "--port", &p1_id, "y",
        ],
    );
    out.failed_with(409);

    // Deletes: the server's own port goes, the user's port stays, unbound.
    for s in [&id, &vm3_id] {
        let out = osc.run(2, &["server", "delete", "--wait", s]);
        assert!(out.ok, "{}", out.stderr);
    }
    let out = osc.run(0, &["port", "show", &port_id]);
    assert!(!out.ok, "the server's port is left: {}", out.stdout);
    let p1 = osc.json(0, &["port", "show", &p1_id]);
    assert_eq!(p1["device_id"], "", "{p1}");

    // networks "none" (what --nic none sends at 2.37+): no NIC.
    let flavor_id = osc.json(0, &["flavor", "show", "m1.tiny"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let image_id = osc.json(0, &["image", "show", "tiny"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let resp = c
        .http
        .post(format!("{}/compute/v2.1/servers", c.nodes[0].base()))
        .header("X-Auth-Token", c.token(0))
        .json(
            &json!({"server": {"name": "vm4", "flavorRef": flavor_id, "imageRef": image_id,
            "networks": "none"}}),
        )
        .send()
        .unwrap();
    assert_eq!(resp.status(), 202);
    let v: Value = resp.json().unwrap();
    let vm4 = wait_status(&osc, 1, v["server"]["id"].as_str().unwrap(), "ACTIVE");
    assert!(!vm4["addresses"].to_string().contains("10."), "{vm4}");
}

/// `qemu-img info --output json` of `path`.
fn qemu_img_info(path: &std::path::Path) -> Value {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "--output", "json"])
        .arg(path)
        .output()
        .expect("qemu-img runs (node/scripts/install-deps.sh installs qemu-utils)");
    assert!(
        out.status.success(),
        "qemu-img info {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `isoinfo` with `args` on `iso`, its standard output.
fn isoinfo(iso: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new("isoinfo")
        .args(args)
        .arg("-i")
        .arg(iso)
        .output()
        .expect("isoinfo runs (node/scripts/install-deps.sh installs genisoimage)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A flavor's ephemeral and swap disks are qcow2 overlays in the instance directory, a config
/// drive asked for on create is an ISO labelled `config-2` with the server's documents, and
/// both go with the server; `same_host`/`different_host` hints keep a server to (or away from)
/// the hosts of the servers they name, an unknown id matching no host, as in Nova.
#[test]
fn flavor_disks_config_drive_and_host_hints() {
    let Some(bin) = openstack_bin() else { return };
    let c = Cluster::start(3, &[]);
    let osc = Osc { bin, cluster: &c };
    setup(&osc, c.tmp.path());
    osc.json(
        0,
        &[
            "flavor",
            "create",
            "--vcpus",
            "1",
            "--ram",
            "128",
            "--disk",
            "1",
            "--ephemeral",
            "1",
            "--swap",
            "64",
            "m1.disks",
        ],
    );
    let user_data = c.tmp.path().join("user-data");
    std::fs::write(&user_data, "#cloud-config\nhostname: eph\n").unwrap();
    let vm = osc.json(
        1,
        &[
            "server",
            "create",
            "--flavor",
            "m1.disks",
            "--image",
            "tiny",
            "--config-drive",
            "true",
            "--user-data",
            user_data.to_str().unwrap(),
            "--wait",
            "eph",
        ],
    );
    assert_eq!(vm["status"], "ACTIVE", "{vm}");
    assert_eq!(vm["config_drive"], "True", "{vm}");
    let id = vm["id"].as_str().unwrap().to_owned();
    let host = vm["OS-EXT-SRV-ATTR:host"].as_str().unwrap().to_owned();
    let node = c.nodes.iter().find(|n| n.name == host).unwrap();
    let dir = node.dir.join("instances").join(&id);

    // Ephemeral (vdb) and swap (vdc): qcow2 overlays on formatted raw bases, Nova's names.
    let eph = qemu_img_info(&dir.join("disk.eph0"));
    assert_eq!(eph["format"], "qcow2", "{eph}");
    assert_eq!(eph["virtual-size"], 1u64 << 30, "{eph}");
    assert!(
        eph["backing-filename"]
            .as_str()
            .unwrap()
            .ends_with("instances/_base/ephemeral_1_vfat"),
        "{eph}"
    );
    assert_eq!(eph["backing-filename-format"], "raw", "{eph}");
    let swap = qemu_img_info(&dir.join("disk.swap"));
    assert_eq!(swap["format"], "qcow2", "{swap}");
    assert_eq!(swap["virtual-size"], 64u64 << 20, "{swap}");
    assert!(
        swap["backing-filename"]
            .as_str()
            .unwrap()
            .ends_with("instances/_base/swap_64"),
        "{swap}"
    );

    // The config drive: ISO 9660 labelled config-2, the documents of every version.
    let iso = dir.join("disk.config");
    let pvd = isoinfo(&iso, &["-d"]);
    assert!(pvd.contains("Volume id: config-2"), "{pvd}");
    let listing = isoinfo(&iso, &["-R", "-f"]);
    for file in [
        "/openstack/latest/meta_data.json",
        "/openstack/latest/user_data",
        "/openstack/latest/network_data.json",
        "/openstack/2012-08-10/meta_data.json",
        "/ec2/latest/meta-data.json",
    ] {
        assert!(listing.lines().any(|l| l == file), "{file} in {listing}");
    }
    let md: Value = serde_json::from_str(&isoinfo(
        &iso,
        &["-R", "-x", "/openstack/latest/meta_data.json"],
    ))
    .unwrap();
    assert_eq!(md["uuid"], id.as_str(), "{md}");
    assert_eq!(
        isoinfo(&iso, &["-R", "-x", "/openstack/latest/user_data"]),
        "#cloud-config\nhostname: eph\n"
    );
    let ec2: Value =
        serde_json::from_str(&isoinfo(&iso, &["-R", "-x", "/ec2/latest/meta-data.json"])).unwrap();
    assert_eq!(
        ec2["block-device-mapping"]["ephemeral0"], "/dev/vdb",
        "{ec2}"
    );
    assert_eq!(ec2["block-device-mapping"]["swap"], "/dev/vdc", "{ec2}");

    // same_host keeps the next server on that host, different_host keeps it away.
    let same = osc.json(
        2,
        &[
            "server",
            "create",
            "--flavor",
            "m1.tiny",
            "--image",
            "tiny",
            "--hint",
            &format!("same_host={id}"),
            "--wait",
            "near",
        ],
    );
    assert_eq!(same["OS-EXT-SRV-ATTR:host"], host.as_str(), "{same}");
    // Nova's "" for no config drive; the client shows it as null.
    assert_ne!(same["config_drive"], "True", "{same}");
    let near = same["id"].as_str().unwrap().to_owned();
    for i in 0..2 {
        let away = osc.json(
            i,
            &[
                "server",
                "create",
                "--flavor",
                "m1.tiny",
                "--image",
                "tiny",
                "--hint",
                &format!("different_host={id}"),
                "--hint",
                &format!("different_host={near}"),
                "--wait",
                &format!("far{i}"),
            ],
        );
        assert_ne!(away["OS-EXT-SRV-ATTR:host"], host.as_str(), "{away}");
    }
    // An id of no server matches no host: NoValidHost naming the filter. A non-uuid is 400.
    let out = osc.run(
        0,
        &[
            "server",
            "create",
            "--flavor",
            "m1.tiny",
            "--image",
            "tiny",
            "--hint",
            "same_host=2b5c1a5e-0000-4000-8000-000000000000",
            "-f",
            "json",
            "lost",
        ],
    );
    let lost = out.json()["id"].as_str().unwrap().to_owned();
    let v = wait_status(&osc, 1, &lost, "ERROR");
    let fault = v["fault"].to_string();
    assert!(
        fault.contains("No valid host") && fault.contains("SameHostFilter"),
        "{v}"
    );
    let out = osc.run(
        0,
        &[
            "server",
            "create",
            "--flavor",
            "m1.tiny",
            "--image",
            "tiny",
            "--hint",
            "different_host=not-a-uuid",
            "bad",
        ],
    );
    out.failed_with(400);
    assert!(out.stderr.contains("different_host"), "{}", out.stderr);

    // Deleting the server removes its disks and drive with its directory.
    let out = osc.run(1, &["server", "delete", "--wait", &id]);
    assert!(out.ok, "{}", out.stderr);
    assert!(!dir.exists(), "{} is left", dir.display());
}

/// `[compute]` reserved resources and allocation ratios, as an operator sets them in the
/// node's file, reach the host the node registers: the hypervisor view counts the reserved
/// RAM and disk as used, and placement keeps a server from the reserved part. With
/// `force_config_drive` every server gets a config drive.
#[test]
fn compute_reservations_and_ratios_reach_the_host() {
    let Some(bin) = openstack_bin() else { return };
    let mut c = Cluster::start(1, &[]);
    c.nodes[0].kill9();
    let file = c.nodes[0].dir.join("node.toml");
    let text = std::fs::read_to_string(&file).unwrap();
    // The saved file spells out the defaults; the ratios are unset.
    let text = text
        .replacen(
            "reserved_host_memory_mb = 512\n",
            "reserved_host_memory_mb = 1536\n",
            1,
        )
        .replacen(
            "reserved_host_disk_mb = 0\n",
            "reserved_host_disk_mb = 3072\n",
            1,
        )
        .replacen("reserved_host_cpus = 0\n", "reserved_host_cpus = 1\n", 1)
        .replacen(
            "force_config_drive = false\n",
            "force_config_drive = true\n",
            1,
        )
        .replacen(
            "[compute]\n",
            "[compute]\ncpu_allocation_ratio = 2.0\nram_allocation_ratio = 1.0\n",
            1,
        );
    for line in [
        "reserved_host_memory_mb = 1536",
        "reserved_host_disk_mb = 3072",
        "reserved_host_cpus = 1",
        "force_config_drive = true",
    ] {
        assert!(text.contains(line), "{text}");
    }
    std::fs::write(&file, text).unwrap();
    c.restart(0);
    wait_until("node1 to serve again", Duration::from_secs(60), || {
        c.try_token(0).ok()
    });
    let osc = Osc { bin, cluster: &c };
    let token = c.token(0);
    let host = wait_until("the new registration", Duration::from_secs(30), || {
        let (st, v) = c.api(0, "GET", "/shoal/v1/hosts/node1", &token, None);
        (st == 200 && v["host"]["ram_mb_reserved"] == 1536).then_some(v["host"].clone())
    });
    assert_eq!(host["vcpus_reserved"], 1, "{host}");
    assert_eq!(host["disk_mb_reserved"], 3072, "{host}");
    assert_eq!(host["allocation_ratios"]["cpu"], 2.0, "{host}");
    assert_eq!(host["allocation_ratios"]["ram"], 1.0, "{host}");
    // Unset: the disk ratio keeps its value.
    assert_eq!(host["allocation_ratios"]["disk"], 1.0, "{host}");

    let hv = osc.json(0, &["hypervisor", "show", "node1"]);
    let total = hv["memory_mb"].as_u64().unwrap();
    assert_eq!(hv["memory_mb_used"], 1536, "{hv}");
    assert_eq!(hv["free_ram_mb"], total as i64 - 1536, "{hv}");
    assert_eq!(hv["local_gb_used"], 3, "{hv}");

    // A server needing more than (total - reserved) × 1.0 of RAM finds no host.
    let disk = c.tmp.path().join("tiny.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    osc.json(
        0,
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
    );
    let too_big = (total - 1536 + 1).to_string();
    osc.json(
        0,
        &[
            "flavor", "create", "--vcpus", "1", "--ram", &too_big, "--disk", "1", "m1.big",
        ],
    );
    let out = osc.run(
        0,
        &[
            "server", "create", "--flavor", "m1.big", "--image", "tiny", "-f", "json", "big",
        ],
    );
    let id = out.json()["id"].as_str().unwrap().to_owned();
    let v = wait_status(&osc, 0, &id, "ERROR");
    assert!(v["fault"].to_string().contains("AggregateRamFilter"), "{v}");

    // force_config_drive: a server that did not ask for one gets a config drive.
    osc.json(
        0,
        &[
            "flavor", "create", "--vcpus", "1", "--ram", "64", "--disk", "1", "m1.small",
        ],
    );
    let vm = osc.json(
        0,
        &[
            "server", "create", "--flavor", "m1.small", "--image", "tiny", "--wait", "forced",
        ],
    );
    assert_eq!(vm["config_drive"], "True", "{vm}");
    let iso = c.nodes[0]
        .dir
        .join("instances")
        .join(vm["id"].as_str().unwrap())
        .join("disk.config");
    assert!(isoinfo(&iso, &["-d"]).contains("Volume id: config-2"));
}

/// A deleted server's history, as Nova keeps it: listed to admins with `--deleted` and to
/// `--changes-since` as DELETED with its termination time, never shown by id, not counted in
/// quota; counted by `usage list`/`usage show` with the live one; and the external events the
/// network service sends land in the server's action log.
#[test]
fn deleted_servers_usage_and_external_events() {
    let Some(bin) = openstack_bin() else { return };
    let c = Cluster::start(3, &[]);
    let osc = Osc { bin, cluster: &c };
    setup(&osc, c.tmp.path());
    let project = osc.json(0, &["token", "issue"])["project_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let t0 = shoal_state::time::rfc3339(shoal_state::time::now_secs() - 5);

    let mut ids = Vec::new();
    for name in ["keep", "gone"] {
        let vm = osc.json(
            0,
            &[
                "server", "create", "--flavor", "m1.tiny", "--image", "tiny", "--wait", name,
            ],
        );
        ids.push(vm["id"].as_str().unwrap().to_owned());
    }
    let (keep, gone) = (ids[0].clone(), ids[1].clone());
    let out = osc.run(1, &["server", "delete", "--wait", &gone]);
    assert!(out.ok, "{}", out.stderr);

    // Not shown by id, not in the normal list, not counted in quota.
    let out = osc.run(2, &["server", "show", &gone]);
    assert!(
        !out.ok && out.stderr.contains("No Server found"),
        "{}",
        out.stderr
    );
    let ids_of = |list: &Value| -> Vec<String> {
        list.as_array()
            .unwrap()
            .iter()
            .map(|s| s["ID"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(ids_of(&osc.json(2, &["server", "list"])), [keep.as_str()]);
    let limits = osc.json(0, &["limits", "show", "--absolute"]);
    assert!(
        limits
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["Name"] == "instances_used" && l["Value"] == 1),
        "{limits}"
    );

    // Admins list it with --deleted, through any node: DELETED, with its termination time.
    let deleted = osc.json(1, &["server", "list", "--deleted", "--long"]);
    assert_eq!(ids_of(&deleted), [gone.as_str()], "{deleted}");
    assert_eq!(deleted[0]["Status"], "DELETED", "{deleted}");
    let (status, detail) = c.api(
        2,
        "GET",
        "/compute/v2.1/servers/detail?deleted=true",
        &c.token(2),
        None,
    );
    assert_eq!(status, 200);
    let s = &detail["servers"][0];
    assert_eq!(s["id"], gone.as_str(), "{detail}");
    assert_eq!(s["OS-EXT-STS:vm_state"], "deleted", "{s}");
    assert!(s["OS-SRV-USG:terminated_at"].is_string(), "{s}");
    assert!(s["OS-SRV-USG:launched_at"].is_string(), "{s}");
    assert_eq!(s["addresses"], json!({}), "{s}");

    // changes-since shows both, the deleted one as DELETED. (The client always sends
    // `deleted=False`, which Nova honours for admins, so it is asked directly.)
    let (status, changed) = c.api(
        0,
        "GET",
        &format!("/compute/v2.1/servers/detail?changes-since={t0}"),
        &c.token(0),
        None,
    );
    assert_eq!(status, 200, "{changed}");
    let changed = changed["servers"].as_array().unwrap().clone();
    let status_of = |id: &str| {
        changed
            .iter()
            .find(|s| s["id"] == id)
            .map(|s| s["status"].as_str().unwrap().to_owned())
    };
    assert_eq!(changed.len(), 2, "{changed:?}");
    assert_eq!(status_of(&keep).as_deref(), Some("ACTIVE"));
    assert_eq!(status_of(&gone).as_deref(), Some("DELETED"));
    let listed = osc.json(0, &["server", "list", "--changes-since", &t0]);
    assert_eq!(ids_of(&listed), [keep.as_str()], "{listed}");

    // A member of the project sees neither --deleted nor status=DELETED.
    osc.user_with_role(0, "alice", "pw-alice", "admin", "member");
    let alice = common::osc::login("alice", "pw-alice", "admin");
    let own = osc
        .json_as(0, &alice, &["server", "list", "--deleted"])
        .json();
    assert_eq!(ids_of(&own), [keep.as_str()], "{own}");
    let (status, _) = c.api(
        0,
        "GET",
        "/compute/v2.1/servers?status=DELETED",
        &token_of(&c, "alice", "pw-alice"),
        None,
    );
    assert_eq!(status, 403);

    // Usage counts the live and the deleted server, for the project and for all.
    let shown = osc.json(0, &["usage", "show", "--project", &project]);
    let servers = shown["Servers"].as_array().unwrap();
    assert_eq!(servers.len(), 2, "{shown}");
    assert!(
        servers
            .iter()
            .any(|s| s["instance_id"] == gone.as_str() && s["state"] == "terminated"),
        "{shown}"
    );
    let listed = osc.json(1, &["usage", "list"]);
    let row = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["Project"] == "admin" || u["Project"] == project.as_str())
        .unwrap_or_else(|| panic!("{listed}"))
        .clone();
    let count = row["Servers"]
        .as_array()
        .map_or(row["Servers"].clone(), |a| json!(a.len()));
    assert_eq!(count, 2, "{listed}");
    let (status, usage) = c.api(
        2,
        "GET",
        &format!(
            "/compute/v2.1/os-simple-tenant-usage/{project}?start={}",
            t0.trim_end_matches('Z')
        ),
        &c.token(2),
        None,
    );
    assert_eq!(status, 200, "{usage}");
    let servers = usage["tenant_usage"]["server_usages"].as_array().unwrap();
    let dead = servers
        .iter()
        .find(|s| s["instance_id"] == gone.as_str())
        .unwrap();
    assert_eq!(dead["state"], "terminated", "{dead}");
    assert!(dead["ended_at"].is_string(), "{dead}");
    let live = servers
        .iter()
        .find(|s| s["instance_id"] == keep.as_str())
        .unwrap();
    assert_eq!(live["state"], "active", "{live}");
    assert_eq!(
        (live["vcpus"].clone(), live["memory_mb"].clone()),
        (json!(1), json!(256))
    );
    assert_eq!(live["local_gb"], 1);
    // Members may not list every project's usage; a start after the end is a 400.
    let out = osc.json_as(0, &alice, &["usage", "list"]);
    out.failed_with(403);
    let (status, _) = c.api(
        0,
        "GET",
        "/compute/v2.1/os-simple-tenant-usage?start=2030-01-02T00:00:00&end=2030-01-01T00:00:00",
        &c.token(0),
        None,
    );
    assert_eq!(status, 400);

    // External events: 200 for the live server (in its action log), 404 for the deleted one
    // (207 overall); only for admins and the service role.
    let body = json!({"events": [
        {"name": "network-changed", "server_uuid": keep, "tag": "port-x"},
        {"name": "network-vif-plugged", "server_uuid": gone},
    ]});
    let (status, answer) = c.api(
        1,
        "POST",
        "/compute/v2.1/os-server-external-events",
        &c.token(1),
        Some(body.clone()),
    );
    assert_eq!(status, 207, "{answer}");
    assert_eq!(answer["events"][0]["code"], 200, "{answer}");
    assert_eq!(answer["events"][0]["status"], "completed", "{answer}");
    assert_eq!(answer["events"][0]["tag"], "port-x", "{answer}");
    assert_eq!(answer["events"][1]["code"], 404, "{answer}");
    let log = osc.json(2, &["server", "event", "list", &keep]);
    assert!(
        log.as_array()
            .unwrap()
            .iter()
            .any(|a| a["Action"] == "network-changed"),
        "{log}"
    );
    let (status, _) = c.api(
        0,
        "POST",
        "/compute/v2.1/os-server-external-events",
        &c.token(0),
        Some(json!({"events": [{"name": "network-changed", "server_uuid": gone}]})),
    );
    assert_eq!(status, 404);
    let (status, _) = c.api(
        0,
        "POST",
        "/compute/v2.1/os-server-external-events",
        &token_of(&c, "alice", "pw-alice"),
        Some(body),
    );
    assert_eq!(status, 403);
}

/// A project-scoped token of `user` on project `admin`.
fn token_of(c: &Cluster, user: &str, password: &str) -> String {
    let body = json!({"auth": {
        "identity": {"methods": ["password"], "password": {"user": {
            "name": user, "domain": {"name": "Default"}, "password": password}}},
        "scope": {"project": {"name": "admin", "domain": {"name": "Default"}}}}});
    let resp = c
        .http
        .post(format!("{}/identity/v3/auth/tokens", c.nodes[0].base()))
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    resp.headers()["x-subject-token"]
        .to_str()
        .unwrap()
        .to_owned()
}
