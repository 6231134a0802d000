//! Image records as the Image API keeps them in Raft, and the rules about them that need no
//! I/O: what a create body may hold, how a JSON patch changes a record, which images a caller
//! sees, and how a listing is filtered, sorted and paged. The handlers in `images.rs` and
//! `file.rs` read and write rows; everything they decide is decided here.
//!
//! - `images/<id>`: an [`ImageRecord`] (JSON).
//! - `image_members/<image id>/<project id>`: a [`Member`] of a `shared` image.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use shoal_state::time::rfc3339;

/// The hash Glance reports as `os_hash_algo`.
pub const HASH_ALGO: &str = "sha512";
/// Glance's default disk formats; every upload is checked against its declared format by
/// content (`shoal_disk::formats::check_upload`). `aki`/`ari` are the kernels and ramdisks a
/// machine image names in `kernel_id`/`ramdisk_id`.
pub const DISK_FORMATS: [&str; 11] = [
    "ami", "ari", "aki", "vhd", "vhdx", "vmdk", "raw", "qcow2", "vdi", "iso", "ploop",
];
/// Glance's default container formats. They are labels: like Glance, Shoal stores the bytes
/// as uploaded and unpacks nothing.
pub const CONTAINER_FORMATS: [&str; 8] = [
    "bare",
    "ovf",
    "ova",
    "aki",
    "ari",
    "ami",
    "docker",
    "compressed",
];
/// Read-only property that says why an upload was refused (set with status `killed`).
pub const FAILURE_KEY: &str = "shoal_upload_failure";

/// An uploading node refreshes its claim this often while bytes flow.
pub const CLAIM_HEARTBEAT_SECS: u64 = 30;
/// A `saving` image whose claim is older than this may be taken over by a new upload: its
/// uploading node stopped (crashed, restarted or lost its client without noticing).
pub const CLAIM_STALE_SECS: u64 = 120;

/// Glance's page size without `limit`, and the most a page may hold.
pub const DEFAULT_LIMIT: usize = 25;
pub const MAX_LIMIT: usize = 1000;

/// Glance's image statuses that Shoal uses. `deleted` is never stored: a deleted image's row is
/// removed and the API answers 404, as Glance does once an image is deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Created, no data yet.
    Queued,
    /// Data is being uploaded through one node (see [`UploadClaim`]).
    Saving,
    /// Data uploaded, checked and recorded; downloadable.
    Active,
    /// An upload was refused; the image never gets data and may only be deleted.
    Killed,
    /// Active, but its data is withheld from all but admins until it is reactivated.
    Deactivated,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Saving => "saving",
            Status::Active => "active",
            Status::Killed => "killed",
            Status::Deactivated => "deactivated",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Visibility {
    Public,
    Private,
    Shared,
    Community,
}

impl Visibility {
    pub fn parse(s: &str) -> Option<Visibility> {
        match s {
            "public" => Some(Visibility::Public),
            "private" => Some(Visibility::Private),
            "shared" => Some(Visibility::Shared),
            "community" => Some(Visibility::Community),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Visibility::Public => "public",
            Visibility::Private => "private",
            Visibility::Shared => "shared",
            Visibility::Community => "community",
        }
    }
}

/// Which node is taking in an image's bytes, so that two uploads cannot both win and a dead
/// uploader's claim can be recognised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadClaim {
    pub node: String,
    pub started: u64,
    pub heartbeat: u64,
}

impl UploadClaim {
    pub fn is_stale(&self, now: u64) -> bool {
        now.saturating_sub(self.heartbeat) > CLAIM_STALE_SECS
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub id: String,
    pub name: Option<String>,
    pub status: Status,
    pub visibility: Visibility,
    pub owner: Option<String>,
    pub protected: bool,
    pub os_hidden: bool,
    pub disk_format: Option<String>,
    pub container_format: Option<String>,
    pub min_ram: u64,
    pub min_disk: u64,
    pub size: Option<u64>,
    pub virtual_size: Option<u64>,
    pub checksum: Option<String>,
    pub os_hash_algo: Option<String>,
    pub os_hash_value: Option<String>,
    pub tags: Vec<String>,
    pub created_at: u64,
    pub updated_at: u64,
    /// Glance's "additional properties": free-form string key/values.
    pub properties: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload: Option<UploadClaim>,
    /// Why the image was killed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
}

/// What only the server writes. `id` may be chosen at creation, never changed.
const READ_ONLY: [&str; 16] = [
    "status",
    "size",
    "virtual_size",
    "checksum",
    "os_hash_algo",
    "os_hash_value",
    "created_at",
    "updated_at",
    "self",
    "file",
    "schema",
    "locations",
    "direct_url",
    "stores",
    FAILURE_KEY,
    "id",
];

/// The schema's fields a caller may set. These and the read-only ones are Glance's core
/// attributes: none of them can be an additional property, nor be removed.
const WRITABLE_CORE: [&str; 10] = [
    "name",
    "visibility",
    "owner",
    "protected",
    "os_hidden",
    "disk_format",
    "container_format",
    "min_ram",
    "min_disk",
    "tags",
];

fn is_core(key: &str) -> bool {
    WRITABLE_CORE.contains(&key) || READ_ONLY.contains(&key)
}

/// The operations a JSON patch may hold.
const PATCH_OPS: [&str; 3] = ["add", "replace", "remove"];

/// Why a create body or a patch was refused; each maps to the status Glance answers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    OverLimit(String),
}

use RecordError::{BadRequest, Conflict, Forbidden};

/// Additional properties one image may carry: Glance's `image_property_quota` default.
pub const MAX_PROPERTIES: usize = 128;

/// Who is asking, as far as images care.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub admin: bool,
    pub project: Option<String>,
}

impl Caller {
    pub fn owns(&self, img: &ImageRecord) -> bool {
        self.project.is_some() && img.owner == self.project
    }
}

impl ImageRecord {
    /// A new `queued` image from a create body (`POST /v2/images`).
    pub fn create(
        body: &Value,
        caller: &Caller,
        now: u64,
        new_id: impl FnOnce() -> String,
    ) -> Result<ImageRecord, RecordError> {
        let obj = body
            .as_object()
            .ok_or_else(|| BadRequest("the request body must be a JSON object".into()))?;
        let id = match obj.get("id") {
            None | Some(Value::Null) => new_id(),
            Some(Value::String(s)) if uuid::Uuid::parse_str(s).is_ok() => s.to_lowercase(),
            Some(v) => return Err(BadRequest(format!("id {v} is not a UUID"))),
        };
        let mut img = ImageRecord {
            id,
            name: None,
            status: Status::Queued,
            // Glance's default since Ocata: private until members are added.
            visibility: Visibility::Shared,
            owner: caller.project.clone(),
            protected: false,
            os_hidden: false,
            disk_format: None,
            container_format: None,
            min_ram: 0,
            min_disk: 0,
            size: None,
            virtual_size: None,
            checksum: None,
            os_hash_algo: None,
            os_hash_value: None,
            tags: Vec::new(),
            created_at: now,
            updated_at: now,
            properties: BTreeMap::new(),
            upload: None,
            failure: None,
        };
        for (key, value) in obj {
            if key == "id" {
                continue;
            }
            img.set(key, value, caller)?;
        }
        img.check_format_mix()?;
        Ok(img)
    }

    /// Glance's rule for Amazon-style images: when either format is `ami`, `ari` or `aki`,
    /// both must be that same one (a kernel is `aki`/`aki`, a machine image `ami`/`ami`).
    fn check_format_mix(&self) -> Result<(), RecordError> {
        let (Some(disk), Some(container)) = (&self.disk_format, &self.container_format) else {
            return Ok(());
        };
        let amazon = |f: &str| matches!(f, "ami" | "ari" | "aki");
        if (amazon(disk) || amazon(container)) && disk != container {
            return Err(BadRequest(format!(
                "invalid mix of disk and container formats ({disk} and {container}): when either is ami, ari or aki, both must be the same"
            )));
        }
        Ok(())
    }

    /// Sets one field or property as a create body or a patch `add`/`replace` does.
    fn set(&mut self, key: &str, value: &Value, caller: &Caller) -> Result<(), RecordError> {
        check_writable(key)?;
        match key {
            "name" => self.name = opt_string(key, value, 255)?,
            "visibility" => {
                let v = value
                    .as_str()
                    .and_then(Visibility::parse)
                    .ok_or_else(|| {
                        BadRequest(format!(
                            "invalid visibility value {value}: use public, private, shared or community"
                        ))
                    })?;
                if v == Visibility::Public && !caller.admin && self.visibility != v {
                    return Err(Forbidden("only an admin may make an image public".into()));
                }
                self.visibility = v;
            }
            "owner" => {
                let owner = opt_string(key, value, 255)?;
                if !caller.admin && owner != caller.project {
                    return Err(Forbidden(
                        "only an admin may give an image to another project".into(),
                    ));
                }
                self.owner = owner;
            }
            "protected" => self.protected = boolean(key, value)?,
            "os_hidden" => self.os_hidden = boolean(key, value)?,
            "disk_format" | "container_format" => {
                if self.status != Status::Queued {
                    return Err(Forbidden(format!(
                        "attribute '{key}' can be only replaced for a queued image"
                    )));
                }
                let allowed: &[&str] = if key == "disk_format" {
                    &DISK_FORMATS
                } else {
                    &CONTAINER_FORMATS
                };
                let v = opt_string(key, value, 255)?;
                if let Some(f) = &v {
                    if !allowed.contains(&f.as_str()) {
                        return Err(BadRequest(format!(
                            "invalid value '{f}' for {key}: Shoal accepts {}",
                            allowed.join(", ")
                        )));
                    }
                }
                if key == "disk_format" {
                    self.disk_format = v;
                } else {
                    self.container_format = v;
                }
            }
            "min_ram" | "min_disk" => {
                let n = value.as_u64().ok_or_else(|| {
                    BadRequest(format!("{key} must be a non-negative integer, not {value}"))
                })?;
                if key == "min_ram" {
                    self.min_ram = n;
                } else {
                    self.min_disk = n;
                }
            }
            "tags" => self.tags = tags(value)?,
            _ => {
                shoal_state::validate::text("property name", key, 255, false)
                    .map_err(BadRequest)?;
                if !self.properties.contains_key(key) && self.properties.len() >= MAX_PROPERTIES {
                    return Err(RecordError::OverLimit(format!(
                        "an image may carry at most {MAX_PROPERTIES} additional properties"
                    )));
                }
                let v = value.as_str().ok_or_else(|| {
                    BadRequest(format!(
                        "property {key} must be a string, not {value} (additional properties are strings)"
                    ))
                })?;
                if v.len() > 65_535 {
                    return Err(BadRequest(format!(
                        "property {key} is longer than 65535 characters"
                    )));
                }
                self.properties.insert(key.to_owned(), v.to_owned());
            }
        }
        Ok(())
    }

    /// Applies a JSON patch (`application/openstack-images-v2.1-json-patch`) as Glance does:
    /// `add` and `replace` set a field or property (`replace` of a missing property is a
    /// conflict), `remove` deletes a property; core fields cannot be removed and read-only ones
    /// not touched. All or nothing: on error `self` is unchanged.
    pub fn apply_patch(
        &mut self,
        patch: &Value,
        caller: &Caller,
        now: u64,
    ) -> Result<(), RecordError> {
        let ops = patch.as_array().ok_or_else(|| {
            BadRequest("a JSON patch is a list of operations such as {\"op\": \"replace\", \"path\": \"/name\", \"value\": \"x\"}".into())
        })?;
        let mut next = self.clone();
        for (i, op) in ops.iter().enumerate() {
            let obj = op
                .as_object()
                .ok_or_else(|| BadRequest(format!("patch operation {i} is not an object")))?;
            let kind = obj
                .get("op")
                .and_then(Value::as_str)
                .ok_or_else(|| BadRequest(format!("patch operation {i} has no \"op\" string")))?;
            let path = obj
                .get("path")
                .and_then(Value::as_str)
                .ok_or_else(|| BadRequest(format!("patch operation {i} has no \"path\" string")))?;
            let key = pointer_key(path)?;
            match kind {
                "add" | "replace" => {
                    let value = obj.get("value").ok_or_else(|| {
                        BadRequest(format!("patch operation {i} ({kind} {path}) has no value"))
                    })?;
                    if kind == "replace" && !is_core(&key) && !next.properties.contains_key(&key) {
                        return Err(Conflict(format!("property {key} does not exist")));
                    }
                    next.set(&key, value, caller)?;
                }
                "remove" => {
                    check_writable(&key)?;
                    if is_core(&key) {
                        return Err(Forbidden(format!("property {key} may not be removed")));
                    }
                    if next.properties.remove(&key).is_none() {
                        return Err(Conflict(format!("property {key} does not exist")));
                    }
                }
                other => {
                    return Err(BadRequest(format!(
                        "unsupported patch operation '{other}': use add, replace or remove"
                    )))
                }
            }
        }
        next.check_format_mix()?;
        next.updated_at = now;
        *self = next;
        Ok(())
    }

    /// The operations of an Image API v2.0 JSON patch
    /// (`application/openstack-images-v2.0-json-patch`), where the operation is the member's
    /// name and the path its value (`{"replace": "/name", "value": "x"}`), rewritten in the v2.1
    /// form that [`Self::apply_patch`] takes (`{"op": "replace", "path": "/name", ...}`).
    pub fn patch_from_v2_0(patch: &Value) -> Result<Value, RecordError> {
        let ops = patch.as_array().ok_or_else(|| {
            BadRequest("a JSON patch is a list of operations such as {\"replace\": \"/name\", \"value\": \"x\"}".into())
        })?;
        let mut out = Vec::with_capacity(ops.len());
        for (i, op) in ops.iter().enumerate() {
            let obj = op
                .as_object()
                .ok_or_else(|| BadRequest(format!("patch operation {i} is not an object")))?;
            let mut named = PATCH_OPS.iter().filter(|k| obj.contains_key(**k));
            let (Some(kind), None) = (named.next(), named.next()) else {
                return Err(BadRequest(format!(
                    "patch operation {i} must have exactly one member named add, replace or remove"
                )));
            };
            let path = obj[*kind].as_str().ok_or_else(|| {
                BadRequest(format!(
                    "patch operation {i}: \"{kind}\" must name a path string"
                ))
            })?;
            let mut v21 = json!({"op": kind, "path": path});
            if let Some(value) = obj.get("value") {
                v21["value"] = value.clone();
            }
            out.push(v21);
        }
        Ok(Value::Array(out))
    }

    /// Deactivates (`to` is [`Status::Deactivated`]) or reactivates (`to` is
    /// [`Status::Active`]) an image. Only an image with data can be either, as in Glance;
    /// asking for the status it already has changes nothing.
    pub fn set_activation(&mut self, to: Status) -> Result<(), RecordError> {
        match self.status {
            Status::Active | Status::Deactivated => {
                self.status = to;
                Ok(())
            }
            other => {
                let verb = if to == Status::Active {
                    "reactivate"
                } else {
                    "deactivate"
                };
                Err(Forbidden(format!(
                    "cannot {verb} an image in status '{}': only active or deactivated images can",
                    other.as_str()
                )))
            }
        }
    }

    /// The image as Glance shows it: the schema's fields, then each property at top level.
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "id": self.id,
            "name": self.name,
            "status": self.status.as_str(),
            "visibility": self.visibility.as_str(),
            "owner": self.owner,
            "protected": self.protected,
            "os_hidden": self.os_hidden,
            "disk_format": self.disk_format,
            "container_format": self.container_format,
            "min_ram": self.min_ram,
            "min_disk": self.min_disk,
            "size": self.size,
            "virtual_size": self.virtual_size,
            "checksum": self.checksum,
            "os_hash_algo": self.os_hash_algo,
            "os_hash_value": self.os_hash_value,
            "tags": self.tags,
            "created_at": rfc3339(self.created_at),
            "updated_at": rfc3339(self.updated_at),
            "self": format!("/v2/images/{}", self.id),
            "file": format!("/v2/images/{}/file", self.id),
            "schema": "/v2/schemas/image",
        });
        let obj = v.as_object_mut().expect("an object");
        for (k, p) in &self.properties {
            obj.insert(k.clone(), Value::String(p.clone()));
        }
        if let Some(f) = &self.failure {
            obj.insert(FAILURE_KEY.into(), Value::String(f.clone()));
        }
        v
    }
}

fn check_writable(key: &str) -> Result<(), RecordError> {
    if READ_ONLY.contains(&key) {
        return Err(Forbidden(format!("attribute '{key}' is read-only")));
    }
    if key.starts_with("os_glance") {
        return Err(Forbidden(format!("attribute '{key}' is reserved")));
    }
    Ok(())
}

fn opt_string(key: &str, v: &Value, max: usize) -> Result<Option<String>, RecordError> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) if s.len() <= max => Ok(Some(s.clone())),
        Value::String(_) => Err(BadRequest(format!("{key} is longer than {max} characters"))),
        other => Err(BadRequest(format!(
            "{key} must be a string or null, not {other}"
        ))),
    }
}

fn boolean(key: &str, v: &Value) -> Result<bool, RecordError> {
    v.as_bool()
        .ok_or_else(|| BadRequest(format!("{key} must be true or false, not {v}")))
}

fn tags(v: &Value) -> Result<Vec<String>, RecordError> {
    let list = v
        .as_array()
        .ok_or_else(|| BadRequest(format!("tags must be a list of strings, not {v}")))?;
    if list.len() > 128 {
        return Err(BadRequest("an image has at most 128 tags".into()));
    }
    let mut out: Vec<String> = Vec::new();
    for t in list {
        let t = t
            .as_str()
            .filter(|t| !t.is_empty() && t.len() <= 255)
            .ok_or_else(|| {
                BadRequest(format!("tag {t} must be a string of 1 to 255 characters"))
            })?;
        if !out.iter().any(|o| o == t) {
            out.push(t.to_owned());
        }
    }
    Ok(out)
}

/// The property a patch path names: one level, `/name`, with JSON pointer escapes.
fn pointer_key(path: &str) -> Result<String, RecordError> {
    let rest = path
        .strip_prefix('/')
        .filter(|r| !r.is_empty() && !r.contains('/'))
        .ok_or_else(|| {
            BadRequest(format!(
                "invalid patch path '{path}': use '/<attribute>', one level deep"
            ))
        })?;
    Ok(rest.replace("~1", "/").replace("~0", "~"))
}

/// A project's membership of a shared image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub image_id: String,
    pub member_id: String,
    pub status: MemberStatus,
    pub created_at: u64,
    pub updated_at: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberStatus {
    Pending,
    Accepted,
    Rejected,
}

impl MemberStatus {
    pub fn parse(s: &str) -> Option<MemberStatus> {
        match s {
            "pending" => Some(MemberStatus::Pending),
            "accepted" => Some(MemberStatus::Accepted),
            "rejected" => Some(MemberStatus::Rejected),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            MemberStatus::Pending => "pending",
            MemberStatus::Accepted => "accepted",
            MemberStatus::Rejected => "rejected",
        }
    }
}

impl Member {
    pub fn key(image_id: &str, project: &str) -> String {
        format!("{image_id}/{project}")
    }

    pub fn to_json(&self) -> Value {
        json!({
            "image_id": self.image_id,
            "member_id": self.member_id,
            "status": self.status.as_str(),
            "created_at": rfc3339(self.created_at),
            "updated_at": rfc3339(self.updated_at),
            "schema": "/v2/schemas/member",
        })
    }
}

/// `GET /v2/images` query: Glance's filters, sorting and paging. Keys Glance does not define
/// filter on additional properties, as Glance does.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ListQuery {
    pub limit: usize,
    pub marker: Option<String>,
    pub sort: Vec<(String, bool)>,
    pub visibility: Option<String>,
    pub member_status: Option<String>,
    pub os_hidden: bool,
    pub tags: Vec<String>,
    pub size_min: Option<u64>,
    pub size_max: Option<u64>,
    /// `name`, `status`, `owner`, `disk_format`, ... and additional properties: exact match.
    pub equal: Vec<(String, String)>,
}

const SORT_KEYS: [&str; 12] = [
    "name",
    "status",
    "container_format",
    "disk_format",
    "size",
    "id",
    "created_at",
    "updated_at",
    "visibility",
    "owner",
    "min_disk",
    "min_ram",
];

impl ListQuery {
    pub fn parse(pairs: &[(String, String)]) -> Result<ListQuery, RecordError> {
        let mut q = ListQuery {
            limit: DEFAULT_LIMIT,
            ..ListQuery::default()
        };
        let mut sort_keys = Vec::new();
        let mut sort_dirs = Vec::new();
        for (k, v) in pairs {
            match k.as_str() {
                "limit" => {
                    let n: usize = v.parse().map_err(|_| {
                        BadRequest(format!("limit must be a non-negative integer, not '{v}'"))
                    })?;
                    q.limit = n.min(MAX_LIMIT);
                }
                "marker" => q.marker = Some(v.clone()),
                "sort_key" => sort_keys.push(v.clone()),
                "sort_dir" => sort_dirs.push(v.clone()),
                "sort" => {
                    for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                        let (key, dir) = part.split_once(':').unwrap_or((part, "desc"));
                        q.sort.push((check_sort_key(key)?, sort_desc(dir)?));
                    }
                }
                "visibility" => {
                    if v != "all" && Visibility::parse(v).is_none() {
                        return Err(BadRequest(format!(
                            "invalid visibility value '{v}': use public, private, shared, community or all"
                        )));
                    }
                    q.visibility = Some(v.clone());
                }
                "member_status" => {
                    if v != "all" && MemberStatus::parse(v).is_none() {
                        return Err(BadRequest(format!(
                            "invalid member_status '{v}': use pending, accepted, rejected or all"
                        )));
                    }
                    q.member_status = Some(v.clone());
                }
                "os_hidden" => {
                    q.os_hidden = parse_bool(k, v)?;
                }
                "tag" => q.tags.push(v.clone()),
                "size_min" | "size_max" => {
                    let n: u64 = v.parse().map_err(|_| {
                        BadRequest(format!("{k} must be a non-negative integer, not '{v}'"))
                    })?;
                    if k == "size_min" {
                        q.size_min = Some(n);
                    } else {
                        q.size_max = Some(n);
                    }
                }
                "protected" => {
                    parse_bool(k, v)?;
                    q.equal.push((k.clone(), v.clone()));
                }
                _ => q.equal.push((k.clone(), v.clone())),
            }
        }
        if !sort_keys.is_empty() {
            if !q.sort.is_empty() {
                return Err(BadRequest(
                    "use either sort or sort_key/sort_dir, not both".into(),
                ));
            }
            if sort_dirs.len() > sort_keys.len() {
                return Err(BadRequest("more sort_dir than sort_key values".into()));
            }
            for (i, key) in sort_keys.iter().enumerate() {
                let dir = sort_dirs
                    .get(i)
                    .or(sort_dirs.last())
                    .map_or("desc", String::as_str);
                q.sort.push((check_sort_key(key)?, sort_desc(dir)?));
            }
        }
        if q.sort.is_empty() {
            q.sort.push(("created_at".into(), true));
        }
        if !q.sort.iter().any(|(k, _)| k == "id") {
            let desc = q.sort[0].1;
            q.sort.push(("id".into(), desc));
        }
        Ok(q)
    }

    /// Whether `img` passes the filters (visibility rules are [`listed`]'s).
    pub fn matches(&self, img: &ImageRecord) -> bool {
        if img.os_hidden != self.os_hidden {
            return false;
        }
        if !self.tags.iter().all(|t| img.tags.contains(t)) {
            return false;
        }
        let size = img.size.unwrap_or(0);
        if self
            .size_min
            .is_some_and(|m| img.size.is_none() || size < m)
            || self
                .size_max
                .is_some_and(|m| img.size.is_none() || size > m)
        {
            return false;
        }
        // Glance's `in:` operator: `id=in:a,b` matches any of the values (quoted values may
        // hold commas). The `openstack` client names servers' images with it.
        self.equal.iter().all(|(k, want)| match field_text(img, k) {
            Some(have) => match want.strip_prefix("in:") {
                Some(list) => split_in(list).contains(&have),
                None => have == *want,
            },
            None => false,
        })
    }
}

/// The values of an `in:` filter: comma-separated, each optionally in double quotes.
fn split_in(list: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in list.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out
}

fn parse_bool(k: &str, v: &str) -> Result<bool, RecordError> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(BadRequest(format!("{k} must be true or false, not '{v}'"))),
    }
}

fn check_sort_key(key: &str) -> Result<String, RecordError> {
    if SORT_KEYS.contains(&key) {
        Ok(key.to_owned())
    } else {
        Err(BadRequest(format!(
            "invalid sort key '{key}': use one of {}",
            SORT_KEYS.join(", ")
        )))
    }
}

fn sort_desc(dir: &str) -> Result<bool, RecordError> {
    match dir {
        "asc" => Ok(false),
        "desc" => Ok(true),
        _ => Err(BadRequest(format!(
            "invalid sort direction '{dir}': use asc or desc"
        ))),
    }
}

/// A field or property as text, for equality filters.
fn field_text(img: &ImageRecord, key: &str) -> Option<String> {
    let v = img.to_json();
    match v.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Null => None,
        other => Some(other.to_string()),
    }
}

#[derive(PartialEq, PartialOrd)]
enum SortVal<'a> {
    Missing,
    Num(u64),
    Text(&'a str),
}

fn sort_val<'a>(img: &'a ImageRecord, key: &str) -> SortVal<'a> {
    let text = |s: &'a Option<String>| s.as_deref().map_or(SortVal::Missing, SortVal::Text);
    let num = |n: Option<u64>| n.map_or(SortVal::Missing, SortVal::Num);
    match key {
        "name" => text(&img.name),
        "status" => SortVal::Text(img.status.as_str()),
        "container_format" => text(&img.container_format),
        "disk_format" => text(&img.disk_format),
        "size" => num(img.size),
        "created_at" => SortVal::Num(img.created_at),
        "updated_at" => SortVal::Num(img.updated_at),
        "visibility" => SortVal::Text(img.visibility.as_str()),
        "owner" => text(&img.owner),
        "min_disk" => SortVal::Num(img.min_disk),
        "min_ram" => SortVal::Num(img.min_ram),
        _ => SortVal::Text(&img.id),
    }
}

fn compare(a: &ImageRecord, b: &ImageRecord, sort: &[(String, bool)]) -> Ordering {
    for (key, desc) in sort {
        let o = sort_val(a, key)
            .partial_cmp(&sort_val(b, key))
            .unwrap_or(Ordering::Equal);
        let o = if *desc { o.reverse() } else { o };
        if o != Ordering::Equal {
            return o;
        }
    }
    Ordering::Equal
}

/// Whether `caller` may see `img` at all (show, download): admins see everything; others see
/// public and community images, their project's own, and shared images their project is a
/// member of (in any member status, as Glance allows).
pub fn visible(caller: &Caller, img: &ImageRecord, membership: Option<MemberStatus>) -> bool {
    caller.admin
        || caller.owns(img)
        || matches!(img.visibility, Visibility::Public | Visibility::Community)
        || (img.visibility == Visibility::Shared && membership.is_some())
}

/// Whether `img` appears in `caller`'s listing with the query's `visibility` and
/// `member_status`. Without a visibility filter Glance lists public images, the project's own,
/// and shared images it accepted, but not others' community images; `visibility=all` adds
/// those. Admins list every image.
pub fn listed(
    caller: &Caller,
    img: &ImageRecord,
    membership: Option<MemberStatus>,
    q: &ListQuery,
) -> bool {
    if let Some(v) = q.visibility.as_deref() {
        if v != "all" && v != img.visibility.as_str() {
            return false;
        }
    }
    let wanted_member = |m: MemberStatus| match q.member_status.as_deref() {
        None => m == MemberStatus::Accepted,
        Some("all") => true,
        Some(s) => s == m.as_str(),
    };
    if caller.admin {
        return true;
    }
    if caller.owns(img) {
        return true;
    }
    match img.visibility {
        Visibility::Public => true,
        Visibility::Community => q.visibility.is_some(),
        Visibility::Shared => membership.is_some_and(wanted_member),
        Visibility::Private => false,
    }
}

/// Sorts `images` and returns the page after `q.marker` plus whether more follow. A marker
/// that is not in the list is an error, as in Glance.
pub fn page(
    mut images: Vec<ImageRecord>,
    q: &ListQuery,
) -> Result<(Vec<ImageRecord>, bool), RecordError> {
    images.sort_by(|a, b| compare(a, b, &q.sort));
    let start = match &q.marker {
        None => 0,
        Some(m) => {
            images.iter().position(|i| i.id == *m).ok_or_else(|| {
                BadRequest(format!("invalid marker: image {m} could not be found"))
            })? + 1
        }
    };
    let rest = images.split_off(start.min(images.len()));
    let more = rest.len() > q.limit;
    Ok((rest.into_iter().take(q.limit).collect(), more))
}

/// The `next` link of a page: the same query with the last id as marker.
pub fn next_link(pairs: &[(String, String)], last_id: &str) -> String {
    let mut s = form_query(
        pairs
            .iter()
            .filter(|(k, _)| k != "marker")
            .map(|(k, v)| (k.as_str(), v.as_str())),
    );
    if !s.is_empty() {
        s.push('&');
    }
    s.push_str(&form_query([("marker", last_id)]));
    format!("/v2/images?{s}")
}

fn form_query<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let enc = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    pairs
        .into_iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member() -> Caller {
        Caller {
            admin: false,
            project: Some("pa".into()),
        }
    }

    fn admin() -> Caller {
        Caller {
            admin: true,
            project: Some("adm".into()),
        }
    }

    fn image(body: Value) -> ImageRecord {
        ImageRecord::create(&body, &member(), 100, || "id-1".into()).unwrap()
    }

    fn err(r: Result<impl std::fmt::Debug, RecordError>) -> RecordError {
        r.unwrap_err()
    }

    #[test]
    fn in_filters_match_any_value() {
        assert_eq!(split_in("a,b"), vec!["a", "b"]);
        assert_eq!(split_in("\"x,y\",z"), vec!["x,y", "z"]);
        let q = ListQuery::parse(&[("name".into(), "in:one,two".into())]).unwrap();
        let caller = Caller {
            project: Some("p".into()),
            admin: false,
        };
        let mut img = ImageRecord::create(&serde_json::json!({"name": "two"}), &caller, 0, || {
            "i".into()
        })
        .unwrap();
        assert!(q.matches(&img));
        img.name = Some("three".into());
        assert!(!q.matches(&img));
    }

    #[test]
    fn create_takes_schema_fields_and_string_properties() {
        let img = image(json!({
            "name": "cirros", "disk_format": "qcow2", "container_format": "bare",
            "min_ram": 64, "tags": ["a", "b", "a"], "os_distro": "cirros",
            "owner_specified.openstack.md5": "",
        }));
        assert_eq!(img.status, Status::Queued);
        assert_eq!(img.visibility, Visibility::Shared);
        assert_eq!(img.owner.as_deref(), Some("pa"));
        assert_eq!(img.tags, ["a", "b"]);
        assert_eq!(img.properties["os_distro"], "cirros");
        let v = img.to_json();
        assert_eq!(v["os_distro"], "cirros");
        assert_eq!(v["self"], "/v2/images/id-1");
        assert_eq!(v["size"], Value::Null);
        assert_eq!(v["created_at"], "1970-01-01T00:01:40Z");
    }

    #[test]
    fn create_refuses_read_only_fields_bad_values_and_other_owners() {
        let c = member();
        let create = |b: Value| ImageRecord::create(&b, &c, 1, || "x".into());
        assert!(
            matches!(err(create(json!({"status": "active"}))), Forbidden(m) if m.contains("'status' is read-only"))
        );
        assert!(matches!(err(create(json!({"size": 1}))), Forbidden(_)));
        assert!(
            matches!(err(create(json!({"os_glance_x": "1"}))), Forbidden(m) if m.contains("reserved"))
        );
        assert!(
            matches!(err(create(json!({"disk_format": "vmdk2"}))), BadRequest(m) if m.contains("raw, qcow2"))
        );
        assert!(matches!(
            err(create(json!({"container_format": "zip"}))),
            BadRequest(_)
        ));
        assert!(matches!(
            err(create(json!({"visibility": "everyone"}))),
            BadRequest(_)
        ));
        assert!(matches!(
            err(create(json!({"visibility": "public"}))),
            Forbidden(_)
        ));
        assert!(matches!(err(create(json!({"owner": "pb"}))), Forbidden(_)));
        assert!(matches!(err(create(json!({"min_ram": -1}))), BadRequest(_)));
        assert!(
            matches!(err(create(json!({"k": 1}))), BadRequest(m) if m.contains("must be a string"))
        );
        assert!(matches!(
            err(create(json!({"id": "not-a-uuid"}))),
            BadRequest(_)
        ));
        let ok = create(json!({"id": "5D1A5C5E-1111-4222-8333-944445555666"})).unwrap();
        assert_eq!(ok.id, "5d1a5c5e-1111-4222-8333-944445555666");
        let a = ImageRecord::create(
            &json!({"visibility": "public", "owner": "pb"}),
            &admin(),
            1,
            || "x".into(),
        )
        .unwrap();
        assert_eq!(
            (a.visibility, a.owner.as_deref()),
            (Visibility::Public, Some("pb"))
        );
    }

    /// A v2.0 patch (the operation is the member's name) does what the same v2.1 patch does,
    /// and a v2.0 operation must name exactly one of add, replace, remove.
    #[test]
    fn v2_0_patches_mean_what_v2_1_ones_do() {
        let v20 = json!([
            {"replace": "/name", "value": "b"},
            {"add": "/k", "value": "v"},
            {"remove": "/gone"},
        ]);
        assert_eq!(
            ImageRecord::patch_from_v2_0(&v20).unwrap(),
            json!([
                {"op": "replace", "path": "/name", "value": "b"},
                {"op": "add", "path": "/k", "value": "v"},
                {"op": "remove", "path": "/gone"},
            ])
        );
        let mut img = image(json!({"name": "a", "gone": "x"}));
        let patch = ImageRecord::patch_from_v2_0(&v20).unwrap();
        img.apply_patch(&patch, &member(), 200).unwrap();
        assert_eq!(img.name.as_deref(), Some("b"));
        assert_eq!(img.properties.get("k").map(String::as_str), Some("v"));
        assert!(!img.properties.contains_key("gone"));

        for bad in [
            json!([{"value": "x"}]),
            json!([{"add": "/a", "remove": "/b"}]),
            json!([{"replace": 1, "value": "x"}]),
            json!([{"op": "replace", "path": "/name", "value": "x"}]),
            json!({"replace": "/name"}),
        ] {
            assert!(
                matches!(ImageRecord::patch_from_v2_0(&bad), Err(BadRequest(_))),
                "{bad}"
            );
        }
    }

    /// Glance's rule: an ami, ari or aki disk goes with the same container, and the other way
    /// round; other formats mix freely. A patch that breaks it changes nothing.
    #[test]
    fn amazon_formats_go_in_pairs() {
        let c = member();
        let create = |d: &str, cf: &str| {
            ImageRecord::create(
                &json!({"disk_format": d, "container_format": cf}),
                &c,
                1,
                || "id".into(),
            )
        };
        for (d, cf) in [
            ("aki", "aki"),
            ("ari", "ari"),
            ("ami", "ami"),
            ("qcow2", "ovf"),
        ] {
            assert!(create(d, cf).is_ok(), "{d}/{cf}");
        }
        for (d, cf) in [("aki", "bare"), ("raw", "ami"), ("ari", "aki")] {
            assert!(
                matches!(create(d, cf), Err(BadRequest(m)) if m.contains("invalid mix")),
                "{d}/{cf}"
            );
        }
        let mut img = create("raw", "bare").unwrap();
        let before = img.clone();
        assert!(img
            .apply_patch(
                &json!([{"op": "replace", "path": "/disk_format", "value": "aki"}]),
                &c,
                2
            )
            .is_err());
        assert_eq!(img, before);
        img.apply_patch(
            &json!([
                {"op": "replace", "path": "/disk_format", "value": "aki"},
                {"op": "replace", "path": "/container_format", "value": "aki"},
            ]),
            &c,
            2,
        )
        .unwrap();
        assert_eq!(img.container_format.as_deref(), Some("aki"));
    }

    /// Only an image with data can be deactivated or reactivated; repeating either is harmless.
    #[test]
    fn only_images_with_data_are_deactivated() {
        let mut img = image(json!({"name": "a"}));
        assert!(matches!(
            img.set_activation(Status::Deactivated),
            Err(Forbidden(_))
        ));
        assert!(matches!(
            img.set_activation(Status::Active),
            Err(Forbidden(_))
        ));
        img.status = Status::Active;
        for to in [
            Status::Deactivated,
            Status::Deactivated,
            Status::Active,
            Status::Active,
        ] {
            img.set_activation(to).unwrap();
            assert_eq!(img.status, to);
        }
        img.status = Status::Killed;
        assert!(img.set_activation(Status::Active).is_err());
        assert_eq!(
            serde_json::to_value(Status::Deactivated).unwrap(),
            json!("deactivated")
        );
    }

    #[test]
    fn patches_follow_glance() {
        let c = member();
        let mut img = image(json!({"name": "a", "disk_format": "raw", "k": "v"}));
        img.apply_patch(
            &json!([
                {"op": "add", "path": "/k2", "value": "v2"},
                {"op": "replace", "path": "/name", "value": "b"},
                {"op": "replace", "path": "/k", "value": "w"},
                {"op": "add", "path": "/a~1b", "value": "slash"},
                {"op": "remove", "path": "/k2"},
                {"op": "replace", "path": "/tags", "value": ["t"]},
            ]),
            &c,
            200,
        )
        .unwrap();
        assert_eq!(img.name.as_deref(), Some("b"));
        assert_eq!(img.properties.get("k").map(String::as_str), Some("w"));
        assert_eq!(img.properties.get("a/b").map(String::as_str), Some("slash"));
        assert!(!img.properties.contains_key("k2"));
        assert_eq!(img.tags, ["t"]);
        assert_eq!(img.updated_at, 200);

        let before = img.clone();
        let mut p = |patch: Value| img.apply_patch(&patch, &c, 300).unwrap_err();
        assert!(
            matches!(p(json!([{"op": "replace", "path": "/status", "value": "active"}])), Forbidden(m) if m.contains("read-only"))
        );
        assert!(matches!(
            p(json!([{"op": "replace", "path": "/id", "value": "x"}])),
            Forbidden(_)
        ));
        assert!(matches!(
            p(json!([{"op": "remove", "path": "/name"}])),
            Forbidden(_)
        ));
        assert!(matches!(
            p(json!([{"op": "remove", "path": "/nope"}])),
            Conflict(_)
        ));
        assert!(matches!(
            p(json!([{"op": "replace", "path": "/nope", "value": "x"}])),
            Conflict(_)
        ));
        assert!(matches!(
            p(json!([{"op": "move", "path": "/name", "from": "/k"}])),
            BadRequest(_)
        ));
        assert!(matches!(
            p(json!([{"op": "add", "path": "/a/b", "value": "x"}])),
            BadRequest(_)
        ));
        assert!(matches!(
            p(json!([{"op": "add", "path": "/x"}])),
            BadRequest(_)
        ));
        assert!(matches!(p(json!({"op": "add"})), BadRequest(_)));
        // All or nothing: the first operation would have succeeded.
        assert!(matches!(
            p(
                json!([{"op": "add", "path": "/ok", "value": "1"}, {"op": "add", "path": "/size", "value": 1}])
            ),
            Forbidden(_)
        ));
        assert_eq!(img, before);
    }

    #[test]
    fn formats_are_fixed_once_data_is_in() {
        let mut img = image(json!({"disk_format": "raw"}));
        img.status = Status::Active;
        let e = img
            .apply_patch(
                &json!([{"op": "replace", "path": "/disk_format", "value": "qcow2"}]),
                &member(),
                1,
            )
            .unwrap_err();
        assert!(matches!(e, Forbidden(m) if m.contains("queued")));
    }

    fn owned_by(owner: &str, vis: Visibility) -> ImageRecord {
        let mut img = image(json!({}));
        img.owner = Some(owner.into());
        img.visibility = vis;
        img
    }

    #[test]
    fn who_sees_what() {
        let me = member();
        let q = ListQuery::parse(&[]).unwrap();
        let all = ListQuery::parse(&[("visibility".into(), "all".into())]).unwrap();
        let pending = ListQuery::parse(&[("member_status".into(), "pending".into())]).unwrap();
        use Visibility::*;
        // (image, membership, visible, listed by default, listed with visibility=all)
        let cases = [
            (owned_by("pa", Private), None, true, true, true),
            (owned_by("pb", Private), None, false, false, false),
            (owned_by("pb", Public), None, true, true, true),
            (owned_by("pb", Community), None, true, false, true),
            (owned_by("pa", Community), None, true, true, true),
            (owned_by("pb", Shared), None, false, false, false),
            (
                owned_by("pb", Shared),
                Some(MemberStatus::Pending),
                true,
                false,
                false,
            ),
            (
                owned_by("pb", Shared),
                Some(MemberStatus::Accepted),
                true,
                true,
                true,
            ),
        ];
        for (i, (img, m, vis, dflt, with_all)) in cases.iter().enumerate() {
            assert_eq!(visible(&me, img, *m), *vis, "case {i} visible");
            assert_eq!(listed(&me, img, *m, &q), *dflt, "case {i} listed");
            assert_eq!(listed(&me, img, *m, &all), *with_all, "case {i} all");
            assert!(visible(&admin(), img, None), "case {i} admin");
            assert!(listed(&admin(), img, None, &q), "case {i} admin lists");
        }
        assert!(listed(
            &me,
            &owned_by("pb", Shared),
            Some(MemberStatus::Pending),
            &pending
        ));
        let public_only = ListQuery::parse(&[("visibility".into(), "public".into())]).unwrap();
        assert!(!listed(&me, &owned_by("pa", Private), None, &public_only));
        assert!(!listed(
            &admin(),
            &owned_by("pa", Private),
            None,
            &public_only
        ));
    }

    fn pairs(s: &[(&str, &str)]) -> Vec<(String, String)> {
        s.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn list_queries_filter_sort_and_page() {
        let mk = |id: &str, name: &str, t: u64| {
            let mut i = image(json!({"name": name, "disk_format": "raw", "tags": ["x"]}));
            i.id = id.into();
            i.created_at = t;
            i
        };
        let imgs = vec![mk("a", "zeta", 3), mk("b", "alpha", 1), mk("c", "mid", 2)];
        // Default: newest first.
        let q = ListQuery::parse(&[]).unwrap();
        let (p, more) = page(imgs.clone(), &q).unwrap();
        assert_eq!(
            p.iter().map(|i| &i.id[..]).collect::<Vec<_>>(),
            ["a", "c", "b"]
        );
        assert!(!more);
        // sort=name:asc, two per page, then from the marker.
        let q = ListQuery::parse(&pairs(&[("sort", "name:asc"), ("limit", "2")])).unwrap();
        let (p, more) = page(imgs.clone(), &q).unwrap();
        assert_eq!(p.iter().map(|i| &i.id[..]).collect::<Vec<_>>(), ["b", "c"]);
        assert!(more);
        let link = next_link(&pairs(&[("sort", "name:asc"), ("limit", "2")]), "c");
        assert_eq!(link, "/v2/images?sort=name%3Aasc&limit=2&marker=c");
        let q = ListQuery::parse(&pairs(&[
            ("sort_key", "name"),
            ("sort_dir", "asc"),
            ("limit", "2"),
            ("marker", "c"),
        ]))
        .unwrap();
        let (p, more) = page(imgs.clone(), &q).unwrap();
        assert_eq!(p.iter().map(|i| &i.id[..]).collect::<Vec<_>>(), ["a"]);
        assert!(!more);
        let q = ListQuery::parse(&pairs(&[("marker", "gone")])).unwrap();
        assert!(matches!(page(imgs.clone(), &q), Err(BadRequest(_))));

        let q = ListQuery::parse(&pairs(&[("name", "mid"), ("tag", "x")])).unwrap();
        assert_eq!(imgs.iter().filter(|i| q.matches(i)).count(), 1);
        let q = ListQuery::parse(&pairs(&[("tag", "x"), ("tag", "y")])).unwrap();
        assert_eq!(imgs.iter().filter(|i| q.matches(i)).count(), 0);
        let q = ListQuery::parse(&pairs(&[("disk_format", "raw"), ("status", "queued")])).unwrap();
        assert_eq!(imgs.iter().filter(|i| q.matches(i)).count(), 3);
        let q = ListQuery::parse(&pairs(&[("os_hidden", "true")])).unwrap();
        assert_eq!(imgs.iter().filter(|i| q.matches(i)).count(), 0);

        for bad in [
            pairs(&[("sort_key", "color")]),
            pairs(&[("sort", "name:up")]),
            pairs(&[("limit", "-1")]),
            pairs(&[("visibility", "world")]),
            pairs(&[("sort", "name"), ("sort_key", "id")]),
        ] {
            assert!(
                matches!(ListQuery::parse(&bad), Err(BadRequest(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn upload_claims_go_stale() {
        let c = UploadClaim {
            node: "n1".into(),
            started: 10,
            heartbeat: 10,
        };
        assert!(!c.is_stale(10 + CLAIM_STALE_SECS));
        assert!(c.is_stale(11 + CLAIM_STALE_SECS));
    }
}
