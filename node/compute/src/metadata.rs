//! The documents of the metadata service (169.254.169.254), laid out as Nova's metadata API
//! serves them, built from a server's row and its ports. Pure: no I/O, no clock, no randomness
//! (the caller hands in `random_seed`), so every document is checked here by unit tests.
//!
//! Two trees, as in Nova:
//! - OpenStack: `/openstack` lists the versions; `/openstack/<version>` lists what that
//!   version has; `meta_data.json`, `user_data`, `password`, `vendor_data.json`,
//!   `network_data.json`, `vendor_data2.json` below it.
//! - EC2: `/` lists the EC2 versions; `/<version>` (or `/ec2/<version>`) has `meta-data/` and
//!   `user-data`; directories list their entries one a line, a sub-directory with a `/`.
//!
//! Which instance a request is about is decided by the caller (the port the request came
//! from), never from the request itself.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use base64::Engine as _;
use serde_json::{json, Value};

use crate::server::ServerRecord;

/// EC2 metadata versions (Nova's `VERSIONS`); `latest` is the last.
pub const EC2_VERSIONS: [&str; 9] = [
    "1.0",
    "2007-01-19",
    "2007-03-01",
    "2007-08-29",
    "2007-10-10",
    "2007-12-15",
    "2008-02-01",
    "2008-09-01",
    "2009-04-04",
];

const FOLSOM: &str = "2012-08-10";
const GRIZZLY: &str = "2013-04-04";
const HAVANA: &str = "2013-10-17";
const LIBERTY: &str = "2015-10-15";
const NEWTON_ONE: &str = "2016-06-30";
const NEWTON_TWO: &str = "2016-10-06";
const OCATA: &str = "2017-02-22";
const ROCKY: &str = "2018-08-27";
const VICTORIA: &str = "2020-10-14";

/// OpenStack metadata versions (Nova's `OPENSTACK_VERSIONS`); `latest` is the last.
pub const OPENSTACK_VERSIONS: [&str; 9] = [
    FOLSOM, GRIZZLY, HAVANA, LIBERTY, NEWTON_ONE, NEWTON_TWO, OCATA, ROCKY, VICTORIA,
];

/// Nova's default `[api] dhcp_domain`: the hostname the guest is given is `<name>.novalocal`.
pub const DHCP_DOMAIN: &str = "novalocal";

/// One subnet address of a port, with what the guest needs to configure it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetAddress {
    pub subnet_id: String,
    pub address: Ipv4Addr,
    /// The subnet's prefix length (`/24` gives netmask 255.255.255.0).
    pub prefix_len: u8,
    pub gateway: Option<Ipv4Addr>,
    /// Extra routes: (destination network, prefix length, next hop).
    pub host_routes: Vec<(Ipv4Addr, u8, Ipv4Addr)>,
    pub dns_nameservers: Vec<String>,
}

/// One NIC of the instance, as the port rows say now (not as the server row copied them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    pub port_id: String,
    /// The tap device name on the host (`tap` + the port id cut to 14 characters).
    pub device: String,
    pub mac: String,
    pub network_id: String,
    pub mtu: u32,
    /// The port's `binding:vif_type` (`tap` once bound).
    pub vif_type: String,
    pub addresses: Vec<SubnetAddress>,
}

/// Everything a document may show about one instance.
#[derive(Debug, Clone, Copy)]
pub struct Instance<'a> {
    pub server: &'a ServerRecord,
    /// The instance's NICs in the order the guest sees them.
    pub nics: &'a [Nic],
    /// The address the request came from: EC2's `local-ipv4` when no NIC has an address.
    pub address: Ipv4Addr,
    /// Bytes for `random_seed` (Nova sends 512 random bytes, base64, on every read).
    pub random_seed: &'a [u8],
    /// The instance's floating IP (Nova: the first of its addresses' floating IPs), EC2's
    /// `public-ipv4`.
    pub public_ipv4: Option<Ipv4Addr>,
}

/// What a path resolves to, and how it is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Document {
    /// `application/json`.
    Json(Value),
    /// `text/plain`: a listing or a value.
    Text(String),
    /// The user data as the user gave it (any bytes), `text/plain` as Nova sends it.
    Bytes(Vec<u8>),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LookupError {
    /// Nova's 404: an unknown version, path, or a document this instance does not have.
    #[error("no metadata at {0}")]
    NotFound(String),
    /// The stored user data is not base64 (the API checks it on create, so this is a bug or a
    /// corrupt row).
    #[error("the user data of server {0} is not valid base64")]
    BadUserData(String),
}

/// Resolves `path` (the request's path, without the query) for `instance`.
pub fn lookup(instance: &Instance<'_>, path: &str) -> Result<Document, LookupError> {
    let tokens = normalize(path);
    let not_found = || LookupError::NotFound(format!("/{}", tokens.join("/")));
    match tokens.first().map(String::as_str) {
        None => Ok(listing(EC2_VERSIONS.iter().copied().chain(["latest"]))),
        Some("openstack") => openstack(instance, &tokens[1..]).ok_or_else(not_found)?,
        Some("ec2") => ec2(instance, &tokens[1..]).ok_or_else(not_found)?,
        Some(_) => ec2(instance, &tokens).ok_or_else(not_found)?,
    }
}

/// `posixpath.normpath` as Nova applies it: no empty or `.` parts, `..` goes up (never above
/// the root), no trailing slash.
fn normalize(path: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            p => out.push(p.to_owned()),
        }
    }
    out
}

fn listing<'a>(lines: impl IntoIterator<Item = &'a str>) -> Document {
    Document::Text(lines.into_iter().collect::<Vec<_>>().join("\n"))
}

/// Whether `requested` is `required` or later in `versions`.
fn at_least(versions: &[&str], requested: &str, required: &str) -> bool {
    let pos = |v| versions.iter().position(|x| *x == v);
    matches!((pos(requested), pos(required)), (Some(a), Some(b)) if a >= b)
}

fn openstack(instance: &Instance<'_>, tokens: &[String]) -> Option<Result<Document, LookupError>> {
    let Some(version) = tokens.first() else {
        return Some(Ok(listing(
            OPENSTACK_VERSIONS.iter().copied().chain(["latest"]),
        )));
    };
    let version = match version.as_str() {
        "latest" => VICTORIA,
        v => *OPENSTACK_VERSIONS.iter().find(|x| **x == v)?,
    };
    let since = |required| at_least(&OPENSTACK_VERSIONS, version, required);
    let user_data = user_data(instance.server);
    let rest = tokens[1..].join("/");
    let doc = match rest.as_str() {
        "" => {
            let mut names = vec!["meta_data.json"];
            if matches!(user_data, Ok(Some(_))) {
                names.push("user_data");
            }
            for (required, name) in [
                (GRIZZLY, "password"),
                (HAVANA, "vendor_data.json"),
                (LIBERTY, "network_data.json"),
                (NEWTON_TWO, "vendor_data2.json"),
            ] {
                if since(required) {
                    names.push(name);
                }
            }
            listing(names)
        }
        "meta_data.json" => Document::Json(meta_data(instance, version)),
        "user_data" => match user_data {
            Ok(Some(bytes)) => Document::Bytes(bytes),
            Ok(None) => return None,
            Err(e) => return Some(Err(e)),
        },
        // No password was ever posted (posting is not supported): Nova answers empty.
        "password" if since(GRIZZLY) => Document::Text(String::new()),
        "vendor_data.json" if since(HAVANA) => Document::Json(json!({})),
        "network_data.json" if since(LIBERTY) => Document::Json(network_data(instance.nics)),
        "vendor_data2.json" if since(NEWTON_TWO) => Document::Json(json!({})),
        _ => return None,
    };
    Some(Ok(doc))
}

/// The user data decoded, `None` when the server has none.
fn user_data(server: &ServerRecord) -> Result<Option<Vec<u8>>, LookupError> {
    server
        .user_data
        .as_deref()
        .map(|b64| {
            base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|_| LookupError::BadUserData(server.id.clone()))
        })
        .transpose()
}

/// Nova's `sanitize_hostname`: at most 63 characters, spaces, `_` and `.` become `-`, other
/// characters than letters, digits and `-` are dropped, lower case, no leading or trailing
/// `-`; `Server-<uuid>` when nothing is left.
pub fn hostname(server: &ServerRecord) -> String {
    let cut: String = server.name.chars().take(63).collect();
    let host: String = cut
        .chars()
        .map(|c| if matches!(c, ' ' | '_' | '.') { '-' } else { c })
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect::<String>()
        .to_ascii_lowercase();
    let host = host.trim_matches(|c| c == '-' || c == '.');
    if host.is_empty() {
        format!("Server-{}", server.id)
    } else {
        host.to_owned()
    }
}

fn fqdn(server: &ServerRecord) -> String {
    format!("{}.{DHCP_DOMAIN}", hostname(server))
}

/// `meta_data.json` of `version`, with the keys Nova gives that version.
pub fn meta_data(instance: &Instance<'_>, version: &str) -> Value {
    let s = instance.server;
    let since = |required| at_least(&OPENSTACK_VERSIONS, version, required);
    let mut md = serde_json::Map::new();
    md.insert("uuid".into(), json!(s.id));
    if !s.metadata.is_empty() {
        md.insert("meta".into(), json!(s.metadata));
    }
    if let (Some(name), Some(key)) = (&s.key_name, &s.key_data) {
        md.insert("public_keys".into(), json!({ name: key }));
        md.insert(
            "keys".into(),
            json!([{"name": name, "type": "ssh", "data": key}]),
        );
    }
    md.insert("hostname".into(), json!(fqdn(s)));
    md.insert("name".into(), json!(s.name));
    md.insert("launch_index".into(), json!(s.launch_index));
    md.insert("availability_zone".into(), json!(s.availability_zone));
    if since(GRIZZLY) {
        let seed = base64::engine::general_purpose::STANDARD.encode(instance.random_seed);
        md.insert("random_seed".into(), json!(seed));
    }
    if since(LIBERTY) {
        md.insert("project_id".into(), json!(s.project_id));
    }
    if since(NEWTON_ONE) {
        // No device carries a tag (tagged devices are not supported).
        md.insert("devices".into(), json!([]));
    }
    if since(VICTORIA) {
        // No CPU pinning: no dedicated CPUs.
        md.insert("dedicated_cpus".into(), json!([]));
    }
    Value::Object(md)
}

fn netmask(prefix_len: u8) -> Ipv4Addr {
    let bits = u32::MAX
        .checked_shl(32 - u32::from(prefix_len.min(32)))
        .unwrap_or(0);
    Ipv4Addr::from(bits)
}

/// `network_data.json`: a link per NIC, a static IPv4 network per address, the DNS servers.
pub fn network_data(nics: &[Nic]) -> Value {
    let mut links = Vec::new();
    let mut networks = Vec::new();
    let mut services: Vec<Value> = Vec::new();
    for nic in nics {
        links.push(json!({
            "id": nic.device,
            "vif_id": nic.port_id,
            "type": nic.vif_type,
            "mtu": nic.mtu,
            "ethernet_mac_address": nic.mac,
        }));
        for a in &nic.addresses {
            let mut routes: Vec<Value> = a
                .gateway
                .map(|gw| json!({"network": "0.0.0.0", "netmask": "0.0.0.0", "gateway": gw.to_string()}))
                .into_iter()
                .collect();
            routes.extend(a.host_routes.iter().map(|(dest, len, hop)| {
                json!({
                    "network": dest.to_string(),
                    "netmask": netmask(*len).to_string(),
                    "gateway": hop.to_string(),
                })
            }));
            let dns: Vec<Value> = a
                .dns_nameservers
                .iter()
                .map(|ip| json!({"type": "dns", "address": ip}))
                .collect();
            for d in &dns {
                if !services.contains(d) {
                    services.push(d.clone());
                }
            }
            networks.push(json!({
                "id": format!("network{}", networks.len()),
                "type": "ipv4",
                "link": nic.device,
                "ip_address": a.address.to_string(),
                "netmask": netmask(a.prefix_len).to_string(),
                "routes": routes,
                "network_id": nic.network_id,
                "services": dns,
            }));
        }
    }
    json!({"links": links, "networks": networks, "services": services})
}

/// A node of the EC2 tree: a value, or a directory whose listing shows `name` for a child
/// that has one (Nova's `_name`: `public-keys/` lists `0=<key name>`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ec2 {
    Value(Vec<u8>),
    List(Vec<String>),
    Dir(BTreeMap<String, Ec2>, Option<String>),
}

fn text(s: impl Into<String>) -> Ec2 {
    Ec2::Value(s.into().into_bytes())
}

fn entries(items: impl IntoIterator<Item = (&'static str, Ec2)>) -> BTreeMap<String, Ec2> {
    items.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

fn dir(items: impl IntoIterator<Item = (&'static str, Ec2)>) -> Ec2 {
    Ec2::Dir(entries(items), None)
}

/// EC2's ids are `<prefix>-%08x` of a number; an id here is the first 8 hex digits of the
/// uuid (Nova keeps a database number per uuid instead).
fn ec2_id(prefix: &str, uuid: &str) -> String {
    let hex: String = uuid
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(8)
        .collect();
    format!("{prefix}-{hex:0>8}")
}

/// `i-%08x` of the number libvirt's `instance-%08x` name carries, else of the uuid.
fn instance_id(server: &ServerRecord) -> String {
    match server
        .instance_name
        .as_deref()
        .and_then(|n| n.strip_prefix("instance-"))
    {
        Some(hex) => format!("i-{hex}"),
        None => ec2_id("i", &server.id),
    }
}

fn ec2_tree(instance: &Instance<'_>, version: &str) -> Ec2 {
    let s = instance.server;
    let since = |required| at_least(&EC2_VERSIONS, version, required);
    let host = fqdn(s);
    let local_ipv4 = instance
        .nics
        .iter()
        .flat_map(|n| &n.addresses)
        .map(|a| a.address)
        .next()
        .unwrap_or(instance.address);
    let mut md = entries([
        ("ami-id", text(ec2_id("ami", &s.image.id))),
        ("ami-launch-index", text(s.launch_index.to_string())),
        ("ami-manifest-path", text("FIXME")),
        ("instance-id", text(instance_id(s))),
        ("hostname", text(host.clone())),
        ("local-ipv4", text(local_ipv4.to_string())),
        ("reservation-id", text(s.reservation_id.clone())),
        ("security-groups", Ec2::List(s.security_groups.clone())),
    ]);
    let mut put = |k: &str, v: Ec2| {
        md.insert(k.to_owned(), v);
    };
    if let (Some(name), Some(key)) = (&s.key_name, &s.key_data) {
        let key0 = Ec2::Dir(
            BTreeMap::from([("openssh-key".to_owned(), text(key.clone()))]),
            Some(format!("0={name}")),
        );
        put(
            "public-keys",
            Ec2::Dir(BTreeMap::from([("0".to_owned(), key0)]), None),
        );
    }
    if since("2007-01-19") {
        put("local-hostname", text(host.clone()));
        put("public-hostname", text(host));
        put(
            "public-ipv4",
            text(
                instance
                    .public_ipv4
                    .map(|a| a.to_string())
                    .unwrap_or_default(),
            ),
        );
    }
    if since("2007-08-29") {
        put("instance-type", text(s.flavor.name.clone()));
    }
    if since("2007-12-15") {
        // Nova's `instance_block_mapping`: the root disk, then the flavor's ephemeral disk
        // and swap with the guest device names the driver gave them.
        let mut bdm = entries([("ami", text("vda")), ("root", text("/dev/vda"))]);
        let (eph, swap) = crate::disks::device_names(s.flavor.ephemeral_gb, s.flavor.swap_mb);
        if let Some(d) = eph {
            bdm.insert("ephemeral0".into(), text(d));
        }
        if let Some(d) = swap {
            bdm.insert("swap".into(), text(d));
        }
        put("block-device-mapping", Ec2::Dir(bdm, None));
        if let Some(k) = &s.image.kernel_id {
            put("kernel-id", text(ec2_id("aki", k)));
        }
        if let Some(r) = &s.image.ramdisk_id {
            put("ramdisk-id", text(ec2_id("ari", r)));
        }
    }
    if since("2008-02-01") {
        put(
            "placement",
            dir([("availability-zone", text(s.availability_zone.clone()))]),
        );
    }
    if since("2008-09-01") {
        put("instance-action", text("none"));
    }
    let mut top = BTreeMap::from([("meta-data".to_owned(), Ec2::Dir(md, None))]);
    if let Ok(Some(bytes)) = user_data(s) {
        top.insert("user-data".to_owned(), Ec2::Value(bytes));
    }
    Ec2::Dir(top, None)
}

fn ec2(instance: &Instance<'_>, tokens: &[String]) -> Option<Result<Document, LookupError>> {
    let version = match tokens.first()?.as_str() {
        "latest" => EC2_VERSIONS[EC2_VERSIONS.len() - 1],
        v => *EC2_VERSIONS.iter().find(|x| **x == v)?,
    };
    if let Err(e) = user_data(instance.server) {
        return Some(Err(e));
    }
    let mut node = ec2_tree(instance, version);
    for token in &tokens[1..] {
        node = match node {
            Ec2::Dir(mut children, _) => children.remove(token)?,
            _ => return None,
        };
    }
    Some(Ok(match node {
        Ec2::Value(bytes) => match String::from_utf8(bytes) {
            Ok(s) => Document::Text(s),
            Err(e) => Document::Bytes(e.into_bytes()),
        },
        Ec2::List(items) => Document::Text(items.join("\n")),
        Ec2::Dir(entries, _) => Document::Text(
            entries
                .iter()
                .map(|(k, v)| match v {
                    Ec2::Dir(_, Some(name)) => name.clone(),
                    Ec2::Dir(_, None) => format!("{k}/"),
                    _ => k.clone(),
                })
                .collect::<Vec<_>>()
                .join("\n"),
        ),
    }))
}

/// The files of a config drive, as Nova's `metadata_for_config_drive` lays them out: for every
/// EC2 version (and `latest`) `ec2/<version>/meta-data.json` and `user-data`; for every
/// OpenStack version (and `latest`) `openstack/<version>/meta_data.json`, `user_data`, and
/// from the versions that have them `vendor_data.json`, `network_data.json`,
/// `vendor_data2.json`. The same documents the metadata service serves.
pub fn config_drive_files(instance: &Instance<'_>) -> Result<Vec<(String, Vec<u8>)>, LookupError> {
    let mut files = Vec::new();
    let has_user_data = user_data(instance.server)?.is_some();
    for version in EC2_VERSIONS.iter().copied().chain(["latest"]) {
        let tree_version = if version == "latest" {
            EC2_VERSIONS[EC2_VERSIONS.len() - 1]
        } else {
            version
        };
        let Ec2::Dir(mut top, _) = ec2_tree(instance, tree_version) else {
            unreachable!("the EC2 tree is a directory")
        };
        if let Some(Ec2::Value(bytes)) = top.remove("user-data") {
            files.push((format!("ec2/{version}/user-data"), bytes));
        }
        if let Some(md) = top.remove("meta-data") {
            let json = serde_json::to_vec(&ec2_json(md)).expect("JSON serialises");
            files.push((format!("ec2/{version}/meta-data.json"), json));
        }
    }
    for version in OPENSTACK_VERSIONS.iter().copied().chain(["latest"]) {
        let effective = if version == "latest" {
            VICTORIA
        } else {
            version
        };
        let since = |required| at_least(&OPENSTACK_VERSIONS, effective, required);
        let mut names = vec!["meta_data.json"];
        if has_user_data {
            names.push("user_data");
        }
        for (required, name) in [
            (HAVANA, "vendor_data.json"),
            (LIBERTY, "network_data.json"),
            (NEWTON_TWO, "vendor_data2.json"),
        ] {
            if since(required) {
                names.push(name);
            }
        }
        for name in names {
            let path = format!("openstack/{version}/{name}");
            let bytes = match lookup(instance, &path)? {
                Document::Json(v) => serde_json::to_vec(&v).expect("JSON serialises"),
                Document::Text(t) => t.into_bytes(),
                Document::Bytes(b) => b,
            };
            files.push((path, bytes));
        }
    }
    Ok(files)
}

/// An EC2 subtree as the JSON Nova writes into `meta-data.json` (listings' `_name` dropped).
fn ec2_json(node: Ec2) -> Value {
    match node {
        Ec2::Value(bytes) => Value::String(String::from_utf8_lossy(&bytes).into_owned()),
        Ec2::List(items) => json!(items),
        Ec2::Dir(children, _) => Value::Object(
            children
                .into_iter()
                .map(|(k, v)| (k, ec2_json(v)))
                .collect(),
        ),
    }
}

/// The instance's NICs from its ports: a convenience for callers that hold the rows, so that
/// the order is the server's (the order the guest sees) and a port gone meanwhile is skipped.
pub fn order_nics(server: &ServerRecord, mut nics: Vec<Nic>) -> Vec<Nic> {
    let mut ordered = Vec::with_capacity(nics.len());
    for p in &server.ports {
        if let Some(i) = nics.iter().position(|n| n.port_id == p.port_id) {
            ordered.push(nics.swap_remove(i));
        }
    }
    ordered
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::server::{FlavorSnapshot, ImageSnapshot, ServerPort, VmState};

    pub(crate) fn server() -> ServerRecord {
        ServerRecord {
            id: "3f0b8a4c-1111-2222-3333-444455556666".into(),
            name: "Web_01 .Prod".into(),
            project_id: "p1".into(),
            user_id: "u1".into(),
            flavor: FlavorSnapshot {
                id: "f1".into(),
                name: "m1.tiny".into(),
                vcpus: 1,
                ram_mb: 256,
                disk_gb: 1,
                ephemeral_gb: 0,
                swap_mb: 0,
                extra_specs: BTreeMap::new(),
            },
            image: ImageSnapshot {
                id: "a1b2c3d4-0000-0000-0000-000000000000".into(),
                disk_format: "raw".into(),
                kernel_id: None,
                ramdisk_id: None,
                kernel_cmdline: None,
            },
            key_name: Some("mykey".into()),
            key_data: Some("ssh-ed25519 AAAA test@host".into()),
            user_data: Some(
                base64::engine::general_purpose::STANDARD.encode(b"#!/bin/sh\necho hi\n"),
            ),
            metadata: BTreeMap::from([("role".to_owned(), "web".to_owned())]),
            security_groups: vec!["default".into(), "web".into()],
            ports: vec![ServerPort {
                port_id: "port-1".into(),
                network_id: "net-1".into(),
                network_name: "private".into(),
                mac: "fa:16:3e:00:00:01".into(),
                ips: vec!["10.0.0.5".into()],
                mtu: 1450,
                created: true,
            }],
            availability_zone: "nova".into(),
            host: Some("node1".into()),
            vm_state: VmState::Active,
            task_state: None,
            power_state: 1,
            fault: None,
            launch_index: 0,
            reservation_id: "r-abcdef12".into(),
            instance_name: Some("instance-0000002a".into()),
            created: "2026-01-01T00:00:00Z".into(),
            updated: "2026-01-01T00:00:00Z".into(),
            launched_at: None,
            access_ipv4: String::new(),
            access_ipv6: String::new(),
            locked: false,
            description: None,
            crash_dump: None,
            config_drive: false,
            actions: Vec::new(),
            snapshot_image: None,
            shelved: None,
            backup: None,
            rescue: None,
            migration: None,
            past_migrations: Vec::new(),
            tags: Default::default(),
        }
    }

    fn nics() -> Vec<Nic> {
        vec![Nic {
            port_id: "port-1".into(),
            device: "tapport-1".into(),
            mac: "fa:16:3e:00:00:01".into(),
            network_id: "net-1".into(),
            mtu: 1450,
            vif_type: "tap".into(),
            addresses: vec![SubnetAddress {
                subnet_id: "sub-1".into(),
                address: Ipv4Addr::new(10, 0, 0, 5),
                prefix_len: 24,
                gateway: Some(Ipv4Addr::new(10, 0, 0, 1)),
                host_routes: vec![(
                    Ipv4Addr::new(192, 168, 0, 0),
                    16,
                    Ipv4Addr::new(10, 0, 0, 254),
                )],
                dns_nameservers: vec!["8.8.8.8".into()],
            }],
        }]
    }

    fn get(s: &ServerRecord, nics: &[Nic], path: &str) -> Result<Document, LookupError> {
        let seed = [7u8; 512];
        let i = Instance {
            server: s,
            nics,
            address: Ipv4Addr::new(10, 0, 0, 5),
            random_seed: &seed,
            public_ipv4: None,
        };
        lookup(&i, path)
    }

    fn text_at(s: &ServerRecord, path: &str) -> String {
        match get(s, &nics(), path).unwrap() {
            Document::Text(t) => t,
            other => panic!("{path}: not text: {other:?}"),
        }
    }

    fn json_at(s: &ServerRecord, path: &str) -> Value {
        match get(s, &nics(), path).unwrap() {
            Document::Json(v) => v,
            other => panic!("{path}: not JSON: {other:?}"),
        }
    }

    /// `meta_data.json` of `latest` has exactly Nova's keys with Nova's value shapes.
    #[test]
    fn meta_data_has_novas_keys_and_shapes() {
        let s = server();
        let md = json_at(&s, "/openstack/latest/meta_data.json");
        let seed = base64::engine::general_purpose::STANDARD.encode([7u8; 512]);
        assert_eq!(
            md,
            json!({
                "uuid": "3f0b8a4c-1111-2222-3333-444455556666",
                "meta": {"role": "web"},
                "public_keys": {"mykey": "ssh-ed25519 AAAA test@host"},
                "keys": [{"name": "mykey", "type": "ssh", "data": "ssh-ed25519 AAAA test@host"}],
                "hostname": "web-01--prod.novalocal",
                "name": "Web_01 .Prod",
                "launch_index": 0,
                "availability_zone": "nova",
                "random_seed": seed,
                "project_id": "p1",
                "devices": [],
                "dedicated_cpus": [],
            })
        );
        // Older versions lack the keys added after them, as in Nova.
        let folsom = json_at(&s, "/openstack/2012-08-10/meta_data.json");
        for absent in ["random_seed", "project_id", "devices", "dedicated_cpus"] {
            assert!(folsom.get(absent).is_none(), "{absent} in {folsom}");
        }
        let liberty = json_at(&s, "/openstack/2015-10-15/meta_data.json");
        assert_eq!(liberty["project_id"], "p1");
        assert!(liberty.get("devices").is_none());
        // No key pair: no public_keys, no keys; no metadata: no meta.
        let mut bare = server();
        bare.key_name = None;
        bare.key_data = None;
        bare.metadata.clear();
        let md = json_at(&bare, "/openstack/latest/meta_data.json");
        for absent in ["public_keys", "keys", "meta"] {
            assert!(md.get(absent).is_none(), "{absent} in {md}");
        }
    }

    /// The version listings are Nova's, one a line, and a version lists only what it has.
    #[test]
    fn listings_match_nova() {
        let s = server();
        assert_eq!(
            text_at(&s, "/openstack"),
            "2012-08-10\n2013-04-04\n2013-10-17\n2015-10-15\n2016-06-30\n2016-10-06\n\
             2017-02-22\n2018-08-27\n2020-10-14\nlatest"
        );
        assert_eq!(
            text_at(&s, "/openstack/latest/"),
            "meta_data.json\nuser_data\npassword\nvendor_data.json\nnetwork_data.json\nvendor_data2.json"
        );
        assert_eq!(
            text_at(&s, "/openstack/2012-08-10"),
            "meta_data.json\nuser_data"
        );
        assert_eq!(
            text_at(&s, "/openstack/2015-10-15"),
            "meta_data.json\nuser_data\npassword\nvendor_data.json\nnetwork_data.json"
        );
        let mut none = server();
        none.user_data = None;
        assert!(!text_at(&none, "/openstack/latest").contains("user_data"));
        assert_eq!(
            text_at(&s, "/"),
            "1.0\n2007-01-19\n2007-03-01\n2007-08-29\n2007-10-10\n2007-12-15\n2008-02-01\n\
             2008-09-01\n2009-04-04\nlatest"
        );
        assert_eq!(text_at(&s, "/latest"), "meta-data/\nuser-data");
        assert_eq!(text_at(&s, "/ec2/latest"), "meta-data/\nuser-data");
    }

    /// User data comes back as the bytes sent, base64 decoded; none is a 404.
    #[test]
    fn user_data_is_decoded_and_absent_is_not_found() {
        let s = server();
        assert_eq!(
            get(&s, &[], "/openstack/latest/user_data").unwrap(),
            Document::Bytes(b"#!/bin/sh\necho hi\n".to_vec())
        );
        assert_eq!(text_at(&s, "/latest/user-data"), "#!/bin/sh\necho hi\n");
        let mut none = server();
        none.user_data = None;
        assert!(matches!(
            get(&none, &[], "/openstack/latest/user_data"),
            Err(LookupError::NotFound(_))
        ));
        assert!(matches!(
            get(&none, &[], "/latest/user-data"),
            Err(LookupError::NotFound(_))
        ));
        let mut bad = server();
        bad.user_data = Some("not base64!".into());
        assert!(matches!(
            get(&bad, &[], "/openstack/latest/user_data"),
            Err(LookupError::BadUserData(_))
        ));
    }

    /// `network_data.json` has Nova's links, networks and services.
    #[test]
    fn network_data_has_links_networks_and_services() {
        let s = server();
        let nd = json_at(&s, "/openstack/latest/network_data.json");
        assert_eq!(
            nd,
            json!({
                "links": [{
                    "id": "tapport-1",
                    "vif_id": "port-1",
                    "type": "tap",
                    "mtu": 1450,
                    "ethernet_mac_address": "fa:16:3e:00:00:01",
                }],
                "networks": [{
                    "id": "network0",
                    "type": "ipv4",
                    "link": "tapport-1",
                    "ip_address": "10.0.0.5",
                    "netmask": "255.255.255.0",
                    "routes": [
                        {"network": "0.0.0.0", "netmask": "0.0.0.0", "gateway": "10.0.0.1"},
                        {"network": "192.168.0.0", "netmask": "255.255.0.0", "gateway": "10.0.0.254"},
                    ],
                    "network_id": "net-1",
                    "services": [{"type": "dns", "address": "8.8.8.8"}],
                }],
                "services": [{"type": "dns", "address": "8.8.8.8"}],
            })
        );
        assert_eq!(json_at(&s, "/openstack/latest/vendor_data.json"), json!({}));
        assert_eq!(
            json_at(&s, "/openstack/latest/vendor_data2.json"),
            json!({})
        );
        assert!(get(&s, &[], "/openstack/2013-04-04/network_data.json").is_err());
    }

    /// EC2's tree: the basics cloud-init reads, the key listing's `0=name` form.
    #[test]
    fn ec2_meta_data_matches_nova() {
        let s = server();
        assert_eq!(
            text_at(&s, "/latest/meta-data/"),
            "ami-id\nami-launch-index\nami-manifest-path\nblock-device-mapping/\nhostname\n\
             instance-action\ninstance-id\ninstance-type\nlocal-hostname\nlocal-ipv4\n\
             placement/\npublic-hostname\npublic-ipv4\npublic-keys/\nreservation-id\n\
             security-groups"
        );
        assert_eq!(text_at(&s, "/latest/meta-data/public-ipv4"), "");
        let seed = [7u8; 512];
        let with_fip = Instance {
            server: &s,
            nics: &[],
            address: Ipv4Addr::new(10, 0, 0, 5),
            random_seed: &seed,
            public_ipv4: Some(Ipv4Addr::new(203, 0, 113, 20)),
        };
        assert_eq!(
            lookup(&with_fip, "/latest/meta-data/public-ipv4"),
            Ok(Document::Text("203.0.113.20".into()))
        );
        assert_eq!(text_at(&s, "/latest/meta-data/instance-id"), "i-0000002a");
        assert_eq!(text_at(&s, "/latest/meta-data/ami-id"), "ami-a1b2c3d4");
        assert_eq!(
            text_at(&s, "/latest/meta-data/hostname"),
            "web-01--prod.novalocal"
        );
        assert_eq!(
            text_at(&s, "/latest/meta-data/local-hostname"),
            "web-01--prod.novalocal"
        );
        assert_eq!(text_at(&s, "/latest/meta-data/local-ipv4"), "10.0.0.5");
        assert_eq!(text_at(&s, "/latest/meta-data/instance-type"), "m1.tiny");
        assert_eq!(
            text_at(&s, "/latest/meta-data/reservation-id"),
            "r-abcdef12"
        );
        assert_eq!(
            text_at(&s, "/latest/meta-data/security-groups"),
            "default\nweb"
        );
        assert_eq!(
            text_at(&s, "/latest/meta-data/placement/"),
            "availability-zone"
        );
        assert_eq!(
            text_at(&s, "/latest/meta-data/placement/availability-zone"),
            "nova"
        );
        assert_eq!(text_at(&s, "/latest/meta-data/public-keys/"), "0=mykey");
        assert_eq!(
            text_at(&s, "/latest/meta-data/public-keys/0"),
            "openssh-key"
        );
        assert_eq!(
            text_at(&s, "/latest/meta-data/public-keys/0/openssh-key"),
            "ssh-ed25519 AAAA test@host"
        );
        assert_eq!(
            text_at(&s, "/2009-04-04/meta-data/block-device-mapping/root"),
            "/dev/vda"
        );
        assert_eq!(
            text_at(&s, "/latest/meta-data/block-device-mapping/"),
            "ami\nroot"
        );
        // A flavor's ephemeral disk and swap come after the root disk, as the driver attaches
        // them.
        let mut big = s.clone();
        big.flavor.ephemeral_gb = 1;
        big.flavor.swap_mb = 512;
        assert_eq!(
            text_at(&big, "/latest/meta-data/block-device-mapping/"),
            "ami\nephemeral0\nroot\nswap"
        );
        assert_eq!(
            text_at(&big, "/latest/meta-data/block-device-mapping/ephemeral0"),
            "/dev/vdb"
        );
        assert_eq!(
            text_at(&big, "/latest/meta-data/block-device-mapping/swap"),
            "/dev/vdc"
        );
        big.flavor.ephemeral_gb = 0;
        assert_eq!(
            text_at(&big, "/latest/meta-data/block-device-mapping/swap"),
            "/dev/vdb"
        );
        // 1.0 predates local-hostname and instance-type.
        assert!(get(&s, &[], "/1.0/meta-data/local-hostname").is_err());
        assert!(get(&s, &[], "/1.0/meta-data/instance-type").is_err());
    }

    /// The config drive carries every version's documents, as Nova writes them.
    #[test]
    fn config_drive_files_follow_nova() {
        let s = server();
        let n = nics();
        let seed = [7u8; 512];
        let i = Instance {
            server: &s,
            nics: &n,
            address: Ipv4Addr::new(10, 0, 0, 5),
            random_seed: &seed,
            public_ipv4: None,
        };
        let files: BTreeMap<String, Vec<u8>> =
            config_drive_files(&i).unwrap().into_iter().collect();
        let md: Value = serde_json::from_slice(&files["openstack/latest/meta_data.json"]).unwrap();
        assert_eq!(md["uuid"], s.id.as_str());
        assert_eq!(files["openstack/latest/user_data"], b"#!/bin/sh\necho hi\n");
        assert_eq!(files["ec2/latest/user-data"], b"#!/bin/sh\necho hi\n");
        let nd: Value =
            serde_json::from_slice(&files["openstack/latest/network_data.json"]).unwrap();
        assert_eq!(nd["links"][0]["ethernet_mac_address"], "fa:16:3e:00:00:01");
        // Folsom has neither vendor nor network data; Liberty has network data.
        assert!(files.contains_key("openstack/2012-08-10/meta_data.json"));
        assert!(!files.contains_key("openstack/2012-08-10/network_data.json"));
        assert!(files.contains_key("openstack/2015-10-15/network_data.json"));
        assert!(files.contains_key("openstack/2016-10-06/vendor_data2.json"));
        let ec2: Value = serde_json::from_slice(&files["ec2/2009-04-04/meta-data.json"]).unwrap();
        assert_eq!(ec2["block-device-mapping"]["root"], "/dev/vda");
        assert_eq!(
            ec2["public-keys"]["0"]["openssh-key"],
            "ssh-ed25519 AAAA test@host"
        );
        assert_eq!(ec2["security-groups"], json!(["default", "web"]));
        // Without user data there is no user data file.
        let mut bare = s.clone();
        bare.user_data = None;
        let i = Instance { server: &bare, ..i };
        let files = config_drive_files(&i).unwrap();
        assert!(!files
            .iter()
            .any(|(p, _)| p.ends_with("user_data") || p.ends_with("user-data")));
    }

    /// Unknown versions and paths, and paths below a value, are not found; `..` cannot climb
    /// out of the tree.
    #[test]
    fn unknown_paths_are_not_found() {
        let s = server();
        for path in [
            "/openstack/2011-01-01/meta_data.json",
            "/openstack/latest/nope",
            "/openstack/latest/meta_data.json/x",
            "/openstack/latest/content/0000",
            "/2010-01-01/meta-data/",
            "/latest/meta-data/nope",
            "/latest/meta-data/hostname/x",
            "/nope",
        ] {
            assert!(
                matches!(get(&s, &nics(), path), Err(LookupError::NotFound(_))),
                "{path}"
            );
        }
        assert_eq!(
            text_at(&s, "/../../openstack/./latest/../latest//password"),
            ""
        );
    }

    #[test]
    fn hostnames_are_sanitized_as_nova_does() {
        let mut s = server();
        for (name, want) in [
            ("vm1", "vm1"),
            ("My Server", "my-server"),
            ("a.b_c", "a-b-c"),
            ("--x--", "x"),
            ("üñí", "Server-3f0b8a4c-1111-2222-3333-444455556666"),
        ] {
            s.name = name.into();
            assert_eq!(hostname(&s), want, "{name}");
        }
        s.name = "x".repeat(80);
        assert_eq!(hostname(&s).len(), 63);
    }

    #[test]
    fn nics_follow_the_servers_order() {
        let mut s = server();
        s.ports.insert(
            0,
            ServerPort {
                port_id: "port-0".into(),
                ..s.ports[0].clone()
            },
        );
        let mut zero = nics()[0].clone();
        zero.port_id = "port-0".into();
        let ordered = order_nics(&s, vec![nics()[0].clone(), zero]);
        let ids: Vec<_> = ordered.iter().map(|n| n.port_id.as_str()).collect();
        assert_eq!(ids, ["port-0", "port-1"]);
    }
}
