//! `evacuate` through the real `openstack` client on three nodes whose compute agents drive
//! libvirt's test hypervisor (`test:///default`): a node is killed with -9, its service forced
//! down, and its servers are rebuilt on the other hosts with their ports and claims moved; when
//! the node comes back it removes what it left of them.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::osc::{login, openstack_bin, Osc};
use common::servers::{events, wait_status};
use common::{wait_until, Cluster};
use serde_json::{json, Value};

/// An action at microversion 2.1 (no header), as a client without microversions sends it.
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

fn instance_dir(c: &Cluster, node: usize, id: &str) -> PathBuf {
    c.nodes[node].dir.join("instances").join(id)
}

/// The evacuations of server `id` in `os-migrations`, by status.
fn evacuations(c: &Cluster, node: usize, id: &str) -> Vec<String> {
    let token = c.token(node);
    let (status, body) = c.api(
        node,
        "GET",
        &format!("/compute/v2.1/os-migrations?migration_type=evacuation&instance_uuid={id}"),
        &token,
        None,
    );
    assert_eq!(status, 200, "{body}");
    body["migrations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["status"].as_str().unwrap().to_owned())
        .collect()
}

/// The vCPUs host `name` has claimed, as `openstack hypervisor list --long` shows them.
fn vcpus_used(osc: &Osc<'_>, node: usize, name: &str) -> u64 {
    let list = osc.json(node, &["hypervisor", "list", "--long"]);
    list.as_array()
        .unwrap()
        .iter()
        .find(|h| h["Hypervisor Hostname"] == name)
        .unwrap_or_else(|| panic!("no hypervisor {name} in {list}"))["vCPUs Used"]
        .as_u64()
        .unwrap()
}

/// A server on a node that is killed: evacuate is admin only (403), refused while the node's
/// compute service is up (Nova's 400 "still in use"), and refuses an unknown target (404) or
/// the server's own host (400). Once the service is forced down, `openstack server evacuate`
/// rebuilds the server on another host (ACTIVE, its port bound there, the claim moved: the dead
/// host's hypervisor shows nothing used) and a stopped server stays SHUTOFF; the action log and
/// `os-migrations` record it. When the node starts again it removes its copies (the instance
/// directories) and completes the migrations, and the servers stay where they are.
#[test]
fn evacuate_rebuilds_a_dead_hosts_servers_elsewhere() {
    let Some(bin) = openstack_bin() else { return };
    let mut c = Cluster::start(3, &[]);
    // The victim is not the leader, so that the survivors need no election.
    let leader = c.leader_index();
    let victim = (0..3).find(|i| *i != leader).unwrap();
    let asker = (0..3).find(|i| *i != victim).unwrap();
    let dead = c.nodes[victim].name.clone();
    let (ids, dirs) = {
        let osc = Osc {
            bin: bin.clone(),
            cluster: &c,
        };
        osc.json(
            asker,
            &[
                "flavor", "create", "--vcpus", "1", "--ram", "256", "--disk", "1", "m1.tiny",
            ],
        );
        let disk = c.tmp.path().join("tiny.raw");
        std::fs::write(&disk, vec![7u8; 1 << 20]).unwrap();
        // Through a survivor, so a copy of the image outlives the victim.
        osc.json(
            asker,
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
        osc.json(asker, &["network", "create", "net1"]);
        osc.json(
            asker,
            &[
                "subnet",
                "create",
                "--network",
                "net1",
                "--subnet-range",
                "10.19.0.0/24",
                "sub1",
            ],
        );
        let zone = format!("nova:{dead}");
        let mut ids = Vec::new();
        for name in ["ev1", "ev2"] {
            let vm = osc.json(
                asker,
                &[
                    "server",
                    "create",
                    "--flavor",
                    "m1.tiny",
                    "--image",
                    "tiny",
                    "--availability-zone",
                    &zone,
                    "--wait",
                    name,
                ],
            );
            assert_eq!(vm["OS-EXT-SRV-ATTR:host"], dead.as_str(), "{vm}");
            ids.push(vm["id"].as_str().unwrap().to_owned());
        }
        assert!(osc.run(asker, &["server", "stop", &ids[1]]).ok);
        wait_status(&osc, asker, &ids[1], "SHUTOFF");

        // Admins only.
        osc.user_with_role(asker, "alice", "pw-alice", "admin", "member");
        osc.run_as(
            asker,
            &login("alice", "pw-alice", "admin"),
            &["server", "evacuate", &ids[0]],
        )
        .failed_with(403);
        // The host is up: Nova's 400, through the client and at 2.1.
        osc.run(asker, &["server", "evacuate", &ids[0]])
            .failed_with(400);
        let (s, body) = act(
            &c,
            asker,
            &ids[0],
            json!({"evacuate": {"onSharedStorage": false}}),
        );
        assert_eq!(s, 400, "{body}");
        assert!(body.to_string().contains("is still in use"), "{body}");
        let dirs: Vec<PathBuf> = ids.iter().map(|id| instance_dir(&c, victim, id)).collect();
        assert!(dirs.iter().all(|d| d.join("disk").exists()));
        (ids, dirs)
    };

    c.nodes[victim].kill9();
    let osc = Osc {
        bin: bin.clone(),
        cluster: &c,
    };
    let out = osc.run(
        asker,
        &["compute", "service", "set", "--down", &dead, "nova-compute"],
    );
    assert!(out.ok, "{}", out.stderr);
    // Bad targets and bodies: 404 for an unknown host, 400 for its own, 2.1 needs
    // onSharedStorage; a shared-storage evacuation is refused (the disks are local).
    let (s, body) = act(
        &c,
        asker,
        &ids[0],
        json!({"evacuate": {"host": "nosuch", "onSharedStorage": false}}),
    );
    assert_eq!(s, 404, "{body}");
    let (s, body) = act(
        &c,
        asker,
        &ids[0],
        json!({"evacuate": {"host": dead, "onSharedStorage": false}}),
    );
    assert_eq!(s, 400, "{body}");
    assert_eq!(act(&c, asker, &ids[0], json!({"evacuate": {}})).0, 400);
    assert_eq!(
        act(
            &c,
            asker,
            &ids[0],
            json!({"evacuate": {"onSharedStorage": true}})
        )
        .0,
        400
    );

    // The client, at the version it negotiates (2.14 or later: no password in the answer).
    let out = osc.run(asker, &["server", "evacuate", &ids[0]]);
    assert!(out.ok, "{}", out.stderr);
    let v = wait_status(&osc, asker, &ids[0], "ACTIVE");
    let target = v["OS-EXT-SRV-ATTR:host"].as_str().unwrap().to_owned();
    assert_ne!(target, dead, "{v}");
    assert_eq!(v["OS-EXT-STS:power_state"], 1, "{v}");
    // A second evacuation of a server that is fine where it is: its host is up.
    osc.run(asker, &["server", "evacuate", &ids[0]])
        .failed_with(400);

    // 2.1: the stopped server, with the password answered; it stays stopped.
    let (s, body) = act(
        &c,
        asker,
        &ids[1],
        json!({"evacuate": {"onSharedStorage": false, "adminPass": "pw-1"}}),
    );
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["adminPass"], "pw-1");
    let v2 = wait_status(&osc, asker, &ids[1], "SHUTOFF");
    assert_ne!(v2["OS-EXT-SRV-ATTR:host"], dead.as_str(), "{v2}");

    // The port is bound to the new host.
    let ports = osc.json(asker, &["port", "list", "--server", &ids[0]]);
    let port_id = ports[0]["ID"].as_str().unwrap().to_owned();
    let port = osc.json(asker, &["port", "show", &port_id]);
    assert_eq!(port["binding_host_id"], target.as_str(), "{port}");
    // The claims moved: nothing is used on the dead host, both servers elsewhere.
    assert_eq!(vcpus_used(&osc, asker, &dead), 0);
    assert_eq!(
        vcpus_used(&osc, asker, &c.nodes[asker].name)
            + vcpus_used(&osc, asker, &c.nodes[3 - victim - asker].name),
        2
    );
    let hv = osc.json(asker, &["hypervisor", "show", &target]);
    assert!(hv["vcpus_used"].as_u64().unwrap() >= 1, "{hv}");
    let ev = events(&c, asker, &ids[0], "evacuate");
    assert_eq!(ev[0]["event"], "compute_rebuild_instance", "{ev:?}");
    assert_eq!(ev[0]["result"], "Success", "{ev:?}");
    for id in &ids {
        assert_eq!(evacuations(&c, asker, id), ["done"]);
    }
    // The dead node's copies are still there: nothing acts for it while it is down.
    assert!(dirs.iter().all(|d| d.exists()));
    drop(osc);

    c.restart(victim);
    wait_until(
        "the returned node to remove its copies",
        Duration::from_secs(60),
        || dirs.iter().all(|d| !d.exists()).then_some(()),
    );
    let osc = Osc { bin, cluster: &c };
    wait_until(
        "the evacuations to complete",
        Duration::from_secs(30),
        || {
            ids.iter()
                .all(|id| evacuations(&c, asker, id) == ["completed"])
                .then_some(())
        },
    );
    let v = osc.json(asker, &["server", "show", &ids[0]]);
    assert_eq!(v["status"], "ACTIVE", "{v}");
    assert_eq!(v["OS-EXT-SRV-ATTR:host"], target.as_str(), "{v}");
    let v2 = osc.json(asker, &["server", "show", &ids[1]]);
    assert_eq!(v2["status"], "SHUTOFF", "{v2}");
    let hv = osc.json(victim, &["hypervisor", "show", &dead]);
    assert_eq!(hv["vcpus_used"], 0, "{hv}");
    let out = osc.run(
        asker,
        &["compute", "service", "set", "--up", &dead, "nova-compute"],
    );
    assert!(out.ok, "{}", out.stderr);
    let out = osc.run(asker, &["server", "delete", "--wait", &ids[0], &ids[1]]);
    assert!(out.ok, "{}", out.stderr);
}
