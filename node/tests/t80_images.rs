//! The Image v2 API on a three-node cluster: the real `openstack` client creates, uploads,
//! lists, shows, changes, downloads and deletes images, each command through another node;
//! bad uploads (a backing file, an external data file, a format that is not what
//! `disk_format` says, too many bytes, a hash mismatch, a second upload) are refused with a
//! clear error, leave the image `killed` (or unchanged) and serve no data; a project sees only
//! the images Glance's visibility rules let it see.
//!
//! Needs the client (see `common::osc`) and `qemu-img`; without them the tests print why and
//! pass, unless `CI=true`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::osc::{names, openstack_bin, Osc};
use common::{wait_until, Cluster};
use md5::{Digest as _, Md5};
use reqwest::blocking::{Body, Response};
use serde_json::{json, Value};
use sha2::Sha512;

fn have_qemu_img() -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        let msg = "qemu-img is not installed (apt-get install qemu-utils)";
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{msg}");
        }
        eprintln!("skipping: {msg}");
    }
    ok
}

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A 64 MiB qcow2 with some data in it, as a user would upload.
fn make_qcow2(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    qemu_img(&["create", "-q", "-f", "qcow2", p.to_str().unwrap(), "64M"]);
    let out = Command::new("qemu-io")
        .args(["-c", "write -P 0x5a 0 300k", p.to_str().unwrap()])
        .output();
    // qemu-io comes with qemu-img; if it is missing the image stays empty, which is still valid.
    if let Ok(o) = out {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    p
}

fn md5_hex(data: &[u8]) -> String {
    hex::encode(Md5::digest(data))
}

fn sha512_hex(data: &[u8]) -> String {
    hex::encode(Sha512::digest(data))
}

/// The client, if it and qemu-img are both installed.
fn client_and_qemu() -> Option<PathBuf> {
    let bin = openstack_bin()?;
    have_qemu_img().then_some(bin)
}

/// `openstack image create --file FILE --disk-format qcow2 [EXTRA] NAME` through `node`.
fn create_from_file(osc: &Osc<'_>, node: usize, file: &Path, name: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "image",
        "create",
        "--file",
        file.to_str().unwrap(),
        "--disk-format",
        "qcow2",
    ];
    args.extend(extra);
    args.push(name);
    let created = osc.json(node, &args);
    assert_eq!(created["name"], name);
    created["id"].as_str().unwrap().to_owned()
}

/// `openstack image save` through `node`; the bytes saved.
fn save(osc: &Osc<'_>, node: usize, image: &str, out: &Path) -> Vec<u8> {
    let saved = osc.run(
        node,
        &["image", "save", "--file", out.to_str().unwrap(), image],
    );
    assert!(saved.ok, "save through node {node}: {}", saved.stderr);
    std::fs::read(out).unwrap_or_default()
}

fn show(osc: &Osc<'_>, node: usize, image: &str) -> Value {
    osc.json(node, &["image", "show", image])
}

/// The client uploads a qcow2 through one node; the others list and show it with Glance's
/// size and hashes; a property set through a third node is seen by all; the uploading node
/// serves the same bytes back; a protected image cannot be deleted; a deleted image is gone
/// everywhere.
#[test]
fn image_commands_work_against_every_node() {
    let Some(bin) = client_and_qemu() else { return };
    let c = Cluster::start(3, &[]);
    let osc = Osc { bin, cluster: &c };
    let dir = c.tmp.path();
    let file = make_qcow2(dir, "cirros.qcow2");
    let bytes = std::fs::read(&file).unwrap();

    assert!(osc.catalog_has(1, "image", "glance"));

    let id = create_from_file(
        &osc,
        0,
        &file,
        "cirros",
        &[
            "--container-format",
            "bare",
            "--property",
            "os_distro=cirros",
        ],
    );

    let list = osc.json(1, &["image", "list"]);
    assert_eq!(names(&list, "Name"), ["cirros"]);
    assert_eq!(list[0]["Status"], "active");

    let shown = show(&osc, 2, "cirros");
    assert_eq!(shown["id"], id.as_str());
    assert_eq!(shown["status"], "active");
    assert_eq!(shown["disk_format"], "qcow2");
    assert_eq!(shown["container_format"], "bare");
    assert_eq!(shown["size"], bytes.len() as u64);
    assert_eq!(shown["virtual_size"], 64u64 << 20);
    assert_eq!(shown["checksum"], md5_hex(&bytes).as_str());
    assert_eq!(shown["properties"]["os_hash_algo"], "sha512");
    assert_eq!(
        shown["properties"]["os_hash_value"],
        sha512_hex(&bytes).as_str()
    );
    assert_eq!(shown["properties"]["os_distro"], "cirros");
    assert_eq!(shown["visibility"], "shared");

    let set = osc.run(
        1,
        &[
            "image",
            "set",
            "--property",
            "hw_disk_bus=virtio",
            "--min-ram",
            "64",
            "cirros",
        ],
    );
    assert!(set.ok, "{}", set.stderr);
    let shown = show(&osc, 0, &id);
    assert_eq!(shown["properties"]["hw_disk_bus"], "virtio");
    assert_eq!(shown["min_ram"], 64);
    let unset = osc.run(2, &["image", "unset", "--property", "hw_disk_bus", &id]);
    assert!(unset.ok, "{}", unset.stderr);
    assert!(show(&osc, 1, &id)["properties"]
        .get("hw_disk_bus")
        .is_none());

    // The uploading node has the bytes (its cache and the chunks).
    let out = dir.join("saved-on-node1.qcow2");
    assert!(save(&osc, 0, &id, &out) == bytes, "saved bytes differ");

    // Images created without --file: the client sends its stdin (empty here) as the data, as
    // it would to Glance, so they become active with 0 bytes.
    for name in ["empty-a", "empty-b"] {
        osc.json(1, &["image", "create", "--disk-format", "raw", name]);
        assert_eq!(show(&osc, 2, name)["size"], 0);
    }
    // Paging one image at a time (the client sorts each page by name, so one-image pages
    // keep the server's order visible).
    let mut paged = Vec::new();
    let mut marker: Option<String> = None;
    for node in [2, 0, 1, 2] {
        let mut args = vec!["image", "list", "--limit", "1"];
        if let Some(m) = &marker {
            args.extend(["--marker", m.as_str()]);
        }
        let page = osc.json(node, &args);
        let page = page.as_array().unwrap();
        assert!(page.len() <= 1, "{page:?}");
        let Some(item) = page.first() else { break };
        paged.push(item["Name"].as_str().unwrap().to_owned());
        marker = Some(item["ID"].as_str().unwrap().to_owned());
    }
    paged.sort();
    assert_eq!(paged, ["cirros", "empty-a", "empty-b"]);
    let by_name = osc.json(1, &["image", "list", "--name", "empty-b"]);
    assert_eq!(names(&by_name, "Name"), ["empty-b"]);
    let none = osc.json(0, &["image", "list", "--status", "queued"]);
    assert!(none.as_array().unwrap().is_empty(), "{none}");
    let long = osc.json(2, &["image", "list", "--long"]);
    assert_eq!(names(&long, "Name"), ["cirros", "empty-a", "empty-b"]);

    // Protected images stay until unprotected.
    assert!(osc.run(1, &["image", "set", "--protected", "empty-a"]).ok);
    osc.run(2, &["image", "delete", "empty-a"]).failed_with(403);
    assert!(osc.run(0, &["image", "set", "--unprotected", "empty-a"]).ok);
    assert!(osc.run(1, &["image", "delete", "empty-a", "empty-b"]).ok);

    let del = osc.run(2, &["image", "delete", "cirros"]);
    assert!(del.ok, "{}", del.stderr);
    for node in 0..3 {
        let gone = osc.run(node, &["image", "show", &id]);
        assert!(!gone.ok, "node {node} still shows the image");
    }
    assert!(osc
        .json(0, &["image", "list"])
        .as_array()
        .unwrap()
        .is_empty());
}

/// A project sees public images, its own, and shared images it was made a member of, never
/// another project's private images; only the owner changes an image; readers cannot write.
#[test]
fn projects_see_only_what_visibility_allows() {
    let Some(bin) = openstack_bin() else { return };
    let c = Cluster::start(3, &[]);
    let osc = Osc { bin, cluster: &c };
    osc.json(0, &["project", "create", "demo"]);
    osc.user_with_role(1, "alice", "alice-pw-1", "demo", "member");
    osc.user_with_role(2, "carol", "carol-pw-1", "demo", "reader");
    let alice = [
        ("OS_USERNAME", "alice"),
        ("OS_PASSWORD", "alice-pw-1"),
        ("OS_PROJECT_NAME", "demo"),
    ];
    let carol = [
        ("OS_USERNAME", "carol"),
        ("OS_PASSWORD", "carol-pw-1"),
        ("OS_PROJECT_NAME", "demo"),
    ];
    let as_user = |who: &[(&str, &str)], node: usize, args: &[&str]| osc.run_as(node, who, args);
    let json_as = |who: &[(&str, &str)], node: usize, args: &[&str]| {
        let mut a = args.to_vec();
        a.extend(["-f", "json"]);
        osc.run_as(node, who, &a).json()
    };

    let private = osc.json(0, &["image", "create", "--private", "admin-private"]);
    let private_id = private["id"].as_str().unwrap();
    osc.json(1, &["image", "create", "--public", "admin-public"]);
    let shared = osc.json(2, &["image", "create", "--shared", "admin-shared"]);
    let shared_id = shared["id"].as_str().unwrap();
    let mine = json_as(&alice, 0, &["image", "create", "alice-own"]);
    assert_eq!(mine["visibility"], "shared");

    let seen = json_as(&alice, 1, &["image", "list"]);
    assert_eq!(names(&seen, "Name"), ["admin-public", "alice-own"]);
    assert!(!as_user(&alice, 2, &["image", "show", private_id]).ok);
    // Admins see every image.
    assert_eq!(
        names(&osc.json(0, &["image", "list"]), "Name"),
        ["admin-private", "admin-public", "admin-shared", "alice-own"]
    );

    // Sharing: a member project sees the image, and lists it once it accepts.
    let added = osc.run(1, &["image", "add", "project", "admin-shared", "demo"]);
    assert!(added.ok, "{}", added.stderr);
    assert_eq!(
        json_as(&alice, 2, &["image", "show", shared_id])["name"],
        "admin-shared"
    );
    let seen = json_as(&alice, 0, &["image", "list"]);
    assert_eq!(names(&seen, "Name"), ["admin-public", "alice-own"]);
    let accepted = as_user(&alice, 1, &["image", "set", "--accept", shared_id]);
    assert!(accepted.ok, "{}", accepted.stderr);
    let seen = json_as(&alice, 2, &["image", "list"]);
    assert_eq!(
        names(&seen, "Name"),
        ["admin-public", "admin-shared", "alice-own"]
    );

    // Only owners (and admins) change images; only admins publish.
    as_user(
        &alice,
        0,
        &["image", "set", "--property", "x=y", "admin-public"],
    )
    .failed_with(403);
    as_user(&alice, 1, &["image", "delete", "admin-public"]).failed_with(403);
    as_user(&alice, 2, &["image", "set", "--public", "alice-own"]).failed_with(403);
    assert!(as_user(&alice, 0, &["image", "set", "--community", "alice-own"]).ok);
    // Readers read and cannot write.
    let seen = json_as(&carol, 1, &["image", "list"]);
    assert!(names(&seen, "Name").contains(&"alice-own".to_owned()));
    as_user(&carol, 2, &["image", "create", "carol-own"]).failed_with(403);
    as_user(&carol, 0, &["image", "delete", "alice-own"]).failed_with(403);
    assert!(as_user(&alice, 1, &["image", "delete", "alice-own"]).ok);
}

/// The owner (member role) deactivates an image with `openstack image set --deactivate`:
/// every node shows it `deactivated`, its data is refused (403) to the owner and served to an
/// admin; `--activate` gives the owner the same bytes back. Deactivating an image without data
/// is refused. Through raw HTTP: a v2.0 JSON patch (Tempest's and old glanceclients' form)
/// changes the image as its v2.1 twin would, deleting a tag the image lacks is 404, the
/// schemas and the (empty) import methods are served, and an ami disk in a bare container is
/// refused.
#[test]
fn deactivated_images_serve_data_only_to_admins() {
    let Some(bin) = openstack_bin() else { return };
    let c = Cluster::start(3, &[]);
    let osc = Osc { bin, cluster: &c };
    let dir = c.tmp.path();
    osc.json(0, &["project", "create", "demo"]);
    osc.user_with_role(1, "alice", "alice-pw-1", "demo", "member");
    let alice = [
        ("OS_USERNAME", "alice"),
        ("OS_PASSWORD", "alice-pw-1"),
        ("OS_PROJECT_NAME", "demo"),
    ];
    let bytes: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let file = dir.join("data.raw");
    std::fs::write(&file, &bytes).unwrap();
    let created = osc.run_as(
        0,
        &alice,
        &[
            "image",
            "create",
            "--file",
            file.to_str().unwrap(),
            "--disk-format",
            "raw",
            "--container-format",
            "bare",
            "-f",
            "json",
            "alice-img",
        ],
    );
    assert!(created.ok, "{}", created.stderr);
    let id = created.json()["id"].as_str().unwrap().to_owned();

    let set = osc.run_as(1, &alice, &["image", "set", "--deactivate", &id]);
    assert!(set.ok, "{}", set.stderr);
    for n in 0..3 {
        assert_eq!(show(&osc, n, &id)["status"], "deactivated");
    }
    let out = dir.join("out.raw");
    let out_s = out.to_str().unwrap();
    // The client reports a refused download as a checksum mismatch (openstacksdk hashes
    // whatever body it gets); the API answers 403.
    let saved = osc.run_as(2, &alice, &["image", "save", "--file", out_s, &id]);
    assert!(!saved.ok, "a deactivated image was saved by its owner");
    assert_ne!(std::fs::read(&out).unwrap_or_default(), bytes);
    let alice_token = osc
        .run_as(1, &alice, &["token", "issue", "-f", "json"])
        .json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let owner = Api {
        c: &c,
        token: alice_token,
    };
    assert_eq!(
        owner
            .get(2, &format!("/images/{id}/file"))
            .status()
            .as_u16(),
        403
    );
    assert_eq!(
        save(&osc, 0, &id, &out),
        bytes,
        "an admin still downloads it"
    );
    // Only an image with data can be deactivated (the client uploads empty data when given
    // none, so this image is made over HTTP; and openstacksdk does not look at an action's
    // answer, so the refusal is checked over HTTP too).
    let empty_id = owner.create(2, json!({"name": "alice-empty"}));
    let refused = c
        .http
        .post(owner.url(2, &format!("/images/{empty_id}/actions/deactivate")))
        .header("X-Auth-Token", &owner.token)
        .send()
        .unwrap();
    assert_eq!(
        refused.status().as_u16(),
        403,
        "deactivating an image without data"
    );

    let set = osc.run_as(0, &alice, &["image", "set", "--activate", &id]);
    assert!(set.ok, "{}", set.stderr);
    assert_eq!(show(&osc, 1, &id)["status"], "active");
    std::fs::remove_file(&out).unwrap();
    let saved = osc.run_as(2, &alice, &["image", "save", "--file", out_s, &id]);
    assert!(saved.ok, "{}", saved.stderr);
    assert_eq!(std::fs::read(&out).unwrap(), bytes);

    let api = Api {
        c: &c,
        token: c.token(0),
    };
    let patch = |node: usize, media: &str, body: Value| {
        c.http
            .patch(api.url(node, &format!("/images/{id}")))
            .header("X-Auth-Token", &api.token)
            .header("Content-Type", media)
            .body(body.to_string())
            .send()
            .unwrap()
    };
    let r = patch(
        1,
        "application/openstack-images-v2.0-json-patch",
        json!([{"replace": "/name", "value": "renamed"}, {"add": "/k", "value": "v"}]),
    );
    assert_eq!(r.status().as_u16(), 200);
    let img = api.image(2, &id);
    assert_eq!((&img["name"], &img["k"]), (&json!("renamed"), &json!("v")));
    let r = patch(
        2,
        "application/openstack-images-v2.0-json-patch",
        json!([{"op": "replace", "path": "/name", "value": "x"}]),
    );
    assert_eq!(r.status().as_u16(), 400, "a v2.1 operation sent as v2.0");

    let untag = c
        .http
        .delete(api.url(0, &format!("/images/{id}/tags/never-set")))
        .header("X-Auth-Token", &api.token)
        .send()
        .unwrap();
    assert_eq!(untag.status().as_u16(), 404);

    for name in ["image", "images", "member", "members"] {
        let r = api.get(1, &format!("/schemas/{name}"));
        assert_eq!(r.status().as_u16(), 200, "schema {name}");
        assert_eq!(r.json::<Value>().unwrap()["name"], name);
    }
    let r = api.get(2, "/info/import");
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        r.json::<Value>().unwrap()["import-methods"]["value"],
        json!([])
    );

    let r = c
        .http
        .post(api.url(0, "/images"))
        .header("X-Auth-Token", &api.token)
        .json(&json!({"disk_format": "ami", "container_format": "bare"}))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 400, "ami disk in a bare container");
}

/// Raw HTTP against the image API as admin on node `node`.
struct Api<'a> {
    c: &'a Cluster,
    token: String,
}

impl Api<'_> {
    fn url(&self, node: usize, path: &str) -> String {
        format!("{}/image/v2{path}", self.c.nodes[node].base())
    }

    fn create(&self, node: usize, body: Value) -> String {
        let r = self
            .c
            .http
            .post(self.url(node, "/images"))
            .header("X-Auth-Token", &self.token)
            .json(&body)
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 201, "{}", r.text().unwrap());
        r.json::<Value>().unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    fn upload(&self, node: usize, id: &str, body: Body) -> Response {
        self.c
            .http
            .put(self.url(node, &format!("/images/{id}/file")))
            .header("X-Auth-Token", &self.token)
            .header("Content-Type", "application/octet-stream")
            .body(body)
            .send()
            .unwrap()
    }

    fn get(&self, node: usize, path: &str) -> Response {
        self.c
            .http
            .get(self.url(node, path))
            .header("X-Auth-Token", &self.token)
            .send()
            .unwrap()
    }

    fn image(&self, node: usize, id: &str) -> Value {
        let r = self.get(node, &format!("/images/{id}"));
        assert_eq!(r.status().as_u16(), 200);
        r.json().unwrap()
    }

    /// Uploads `data` to a new image of `disk_format` and expects `status` and a message
    /// containing `says`; then the image must be `killed` with that reason on every node and
    /// serve no data.
    fn refused(&self, node: usize, disk_format: &str, data: Body, status: u16, says: &str) {
        let id = self.create(
            node,
            json!({"name": says, "disk_format": disk_format, "container_format": "bare"}),
        );
        self.refused_upload(node, &id, data, status, says);
    }

    fn refused_upload(&self, node: usize, id: &str, data: Body, status: u16, says: &str) {
        let r = self.upload(node, id, data);
        assert_eq!(r.status().as_u16(), status, "upload of {says:?}");
        let body: Value = r.json().unwrap();
        let msg = body["message"].as_str().unwrap();
        assert!(msg.contains(says), "{says:?} not in {body}");
        for n in 0..3 {
            let img = self.image(n, id);
            assert_eq!(img["status"], "killed", "{img}");
            assert!(
                img["shoal_upload_failure"].as_str().unwrap().contains(says),
                "{img}"
            );
            let dl = self.get(n, &format!("/images/{id}/file"));
            assert_eq!(dl.status().as_u16(), 409, "download of a killed image");
            // A killed image takes no more data.
            let again = self.upload(n, id, Body::from(vec![0u8; 512]));
            assert_eq!(again.status().as_u16(), 409);
        }
    }
}

/// Bad uploads through raw HTTP and the client: each is refused with a message naming the
/// problem, the image is left `killed` with that reason, and no node serves any of its bytes.
/// A second upload to an active image is refused and changes nothing.
#[test]
fn bad_uploads_are_refused_and_serve_nothing() {
    if !have_qemu_img() {
        return;
    }
    let mut c = Cluster::start(3, &[]);
    let dir = c.tmp.path().to_owned();

    // node3 takes at most 1 MiB per image, in 64 KiB chunks.
    c.nodes[2].kill9();
    let cfg_path = c.nodes[2].dir.join("node.toml");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    let cfg = cfg
        .replace(
            "max_image_bytes = 1099511627776",
            "max_image_bytes = 1048576",
        )
        .replace("chunk_bytes = 4194304", "chunk_bytes = 65536");
    assert!(cfg.contains("max_image_bytes = 1048576"), "{cfg}");
    std::fs::write(&cfg_path, cfg).unwrap();
    c.restart(2);
    wait_until("node3 to serve again", Duration::from_secs(60), || {
        c.try_token(2).ok()
    });
    let api = Api {
        c: &c,
        token: c.token(0),
    };

    let base = make_qcow2(&dir, "base.qcow2");
    let with_backing = dir.join("backing.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        base.to_str().unwrap(),
        "-F",
        "qcow2",
        with_backing.to_str().unwrap(),
    ]);
    let external = dir.join("external.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={}", dir.join("external.raw").display()),
        external.to_str().unwrap(),
        "1M",
    ]);
    let read = |p: &Path| Body::from(std::fs::read(p).unwrap());

    api.refused(0, "qcow2", read(&with_backing), 400, "backing file");
    api.refused(1, "qcow2", read(&external), 400, "external data file");
    api.refused(
        2,
        "raw",
        read(&base),
        400,
        "declared raw but its content is qcow2",
    );
    api.refused(
        0,
        "qcow2",
        Body::from(vec![7u8; 4096]),
        400,
        "declared qcow2 but its content is raw",
    );
    // Over node3's limit: announced by Content-Length, and streamed without a length.
    api.refused(
        2,
        "raw",
        Body::from(vec![0u8; 2 << 20]),
        413,
        "1048576-byte limit",
    );
    let stream = std::io::Cursor::new(vec![0u8; 2 << 20]);
    api.refused(2, "raw", Body::new(stream), 413, "1048576-byte limit");
    // The client's declared hash does not match the data.
    let id = api.create(
        1,
        json!({"name": "wrong-md5", "disk_format": "raw", "container_format": "bare",
               "owner_specified.openstack.md5": "0".repeat(32)}),
    );
    api.refused_upload(1, &id, Body::from(vec![1u8; 1000]), 400, "hash mismatch");

    // A good multi-chunk raw upload on node3, then a second upload to it.
    let data: Vec<u8> = (0..700_000u32).map(|i| (i % 251) as u8).collect();
    let id = api.create(
        2,
        json!({"name": "good", "disk_format": "raw", "container_format": "bare"}),
    );
    let empty = api.get(1, &format!("/images/{id}/file"));
    assert_eq!(empty.status().as_u16(), 204, "a queued image has no data");
    let r = api.upload(2, &id, Body::from(data.clone()));
    assert_eq!(r.status().as_u16(), 204, "{:?}", r.text());
    let img = api.image(0, &id);
    assert_eq!(img["status"], "active");
    assert_eq!(img["size"], data.len() as u64);
    assert_eq!(img["checksum"], md5_hex(&data).as_str());
    let again = api.upload(1, &id, Body::from(vec![0u8; 10]));
    assert_eq!(again.status().as_u16(), 409);
    assert!(again.text().unwrap().contains("only to a queued image"));
    assert_eq!(
        api.image(1, &id),
        img,
        "a refused second upload changed the image"
    );
    // Served from node3's cache, then from its chunks once the cache is gone.
    for round in ["cache", "chunks"] {
        let dl = api.get(2, &format!("/images/{id}/file"));
        assert_eq!(dl.status().as_u16(), 200, "{round}");
        assert_eq!(
            dl.headers()["content-md5"].to_str().unwrap(),
            md5_hex(&data),
            "{round}"
        );
        assert_eq!(dl.bytes().unwrap().as_ref(), &data[..], "{round}");
        if round == "cache" {
            std::fs::remove_file(c.nodes[2].dir.join("images/cache").join(&id)).unwrap();
        }
    }

    // Through the client: the refusal's reason reaches the user.
    if let Some(bin) = openstack_bin() {
        let osc = Osc { bin, cluster: &c };
        let out = osc.run(
            1,
            &[
                "image",
                "create",
                "--file",
                with_backing.to_str().unwrap(),
                "--disk-format",
                "qcow2",
                "layered",
            ],
        );
        out.failed_with(400);
        assert!(out.stderr.contains("backing file"), "{}", out.stderr);
    }
}

/// `image save` through a node that holds neither the cache nor the chunks: the bytes come
/// from the uploading node.
#[test]
fn image_save_on_another_node_streams_from_peers() {
    let Some(bin) = client_and_qemu() else { return };
    let c = Cluster::start(3, &[]);
    let osc = Osc { bin, cluster: &c };
    let dir = c.tmp.path();
    let file = make_qcow2(dir, "cirros.qcow2");
    let bytes = std::fs::read(&file).unwrap();
    let id = create_from_file(&osc, 0, &file, "cirros", &[]);
    for node in [1, 2] {
        let out = dir.join(format!("saved-on-node{}.qcow2", node + 1));
        assert!(
            save(&osc, node, &id, &out) == bytes,
            "node {node}: bytes differ"
        );
    }
}
