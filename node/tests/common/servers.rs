//! What the server tests share: waiting for a status, the action log, `qemu-img`, and the
//! compute hosts' usage.

use std::time::Duration;

use serde_json::Value;

use super::osc::Osc;
use super::{wait_until, Cluster};

/// Waits until server `id` has `status` and no task; returns its `server show` JSON.
pub fn wait_status(osc: &Osc<'_>, node: usize, id: &str, status: &str) -> Value {
    wait_until(
        &format!("server {id} to be {status}"),
        Duration::from_secs(60),
        || {
            let v = osc.json(node, &["server", "show", id]);
            (v["status"] == status && v["OS-EXT-STS:task_state"].is_null()).then_some(v)
        },
    )
}

/// `qemu-img` with `args`, its standard output (the test fails if it fails).
pub fn qemu_img(args: &[&str]) -> String {
    let out = std::process::Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img runs (node/scripts/install-deps.sh installs qemu-utils)");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The events of the server's action `action` (the newest such action), from
/// `os-instance-actions`.
pub fn events(c: &Cluster, node: usize, id: &str, action: &str) -> Vec<Value> {
    let token = c.token(node);
    let (status, list) = c.api(
        node,
        "GET",
        &format!("/compute/v2.1/servers/{id}/os-instance-actions"),
        &token,
        None,
    );
    assert_eq!(status, 200, "{list}");
    let req = list["instanceActions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["action"] == action)
        .unwrap_or_else(|| panic!("no {action} in {list}"))["request_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, one) = c.api(
        node,
        "GET",
        &format!("/compute/v2.1/servers/{id}/os-instance-actions/{req}"),
        &token,
        None,
    );
    assert_eq!(status, 200, "{one}");
    one["instanceAction"]["events"].as_array().unwrap().clone()
}

/// The vCPUs the hypervisor view says host `name` has claimed.
pub fn vcpus_used(c: &Cluster, node: usize, name: &str) -> u64 {
    let token = c.token(node);
    let (status, h) = c.api(
        node,
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
}
