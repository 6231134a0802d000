//! The JSON schemas Glance serves under `/v2/schemas/`: `image`, `images`, `member` and
//! `members`. glanceclient reads them to tell core attributes from additional properties and
//! to check what it sends; they describe the records `record.rs` writes, in Glance's
//! shape (draft-04 JSON schema with Glance's `name` and `links`).

use serde_json::{json, Map, Value};

use shoal_images::record::{CONTAINER_FORMATS, DISK_FORMATS};

/// Every status Glance may report. Shoal uses `queued`, `saving`, `active`, `killed` and
/// `deactivated`; the schema lists Glance's whole set so that a client built for Glance accepts
/// every record.
const STATUSES: [&str; 9] = [
    "queued",
    "saving",
    "active",
    "killed",
    "deleted",
    "uploading",
    "importing",
    "pending_delete",
    "deactivated",
];

const UUID_PATTERN: &str =
    "^([0-9a-fA-F]){8}-([0-9a-fA-F]){4}-([0-9a-fA-F]){4}-([0-9a-fA-F]){4}-([0-9a-fA-F]){12}$";

/// A schema by its name in `/v2/schemas/{name}`, or `None` for a name Glance does not serve.
pub fn by_name(name: &str) -> Option<Value> {
    match name {
        "image" => Some(image()),
        "images" => Some(images()),
        "member" => Some(member()),
        "members" => Some(members()),
        _ => None,
    }
}

fn read_only(kind: Value, description: &str) -> Value {
    json!({"type": kind, "readOnly": true, "description": description})
}

/// A format attribute: one of the formats this cloud accepts, or null until it is set.
fn format_enum(formats: &[&str], description: &str) -> Value {
    let mut allowed: Vec<Value> = vec![Value::Null];
    allowed.extend(formats.iter().map(|f| json!(f)));
    json!({"type": ["null", "string"], "enum": allowed, "description": description})
}

pub fn image() -> Value {
    let mut p = Map::new();
    let mut add = |k: &str, v: Value| {
        p.insert(k.to_owned(), v);
    };
    add(
        "id",
        json!({"type": "string", "pattern": UUID_PATTERN, "description": "An identifier for the image"}),
    );
    add(
        "name",
        json!({"type": ["null", "string"], "maxLength": 255, "description": "Descriptive name for the image"}),
    );
    add(
        "status",
        json!({"type": "string", "readOnly": true, "enum": STATUSES, "description": "Status of the image"}),
    );
    add(
        "visibility",
        json!({"type": "string", "enum": ["community", "public", "private", "shared"], "description": "Scope of image accessibility"}),
    );
    add(
        "protected",
        json!({"type": "boolean", "description": "If true, image will not be deletable."}),
    );
    add(
        "os_hidden",
        json!({"type": "boolean", "description": "If true, image will not appear in default image list response."}),
    );
    add(
        "owner",
        json!({"type": ["null", "string"], "maxLength": 255, "description": "Owner of the image"}),
    );
    add(
        "disk_format",
        format_enum(&DISK_FORMATS, "Format of the disk"),
    );
    add(
        "container_format",
        format_enum(&CONTAINER_FORMATS, "Format of the container"),
    );
    add(
        "min_ram",
        json!({"type": "integer", "description": "Amount of ram (in MB) required to boot image."}),
    );
    add(
        "min_disk",
        json!({"type": "integer", "description": "Amount of disk space (in GB) required to boot image."}),
    );
    add(
        "size",
        read_only(json!(["null", "integer"]), "Size of image file in bytes"),
    );
    add(
        "virtual_size",
        read_only(json!(["null", "integer"]), "Virtual size of image in bytes"),
    );
    add(
        "checksum",
        json!({"type": ["null", "string"], "readOnly": true, "maxLength": 32, "description": "md5 hash of image contents."}),
    );
    add(
        "os_hash_algo",
        json!({"type": ["null", "string"], "readOnly": true, "maxLength": 64, "description": "Algorithm to calculate the os_hash_value"}),
    );
    add(
        "os_hash_value",
        json!({"type": ["null", "string"], "readOnly": true, "maxLength": 128, "description": "Hexdigest of the image contents using the algorithm specified by the os_hash_algo"}),
    );
    add(
        "tags",
        json!({"type": "array", "items": {"type": "string", "maxLength": 255}, "description": "List of strings related to the image"}),
    );
    add(
        "created_at",
        read_only(json!("string"), "Date and time of image registration"),
    );
    add(
        "updated_at",
        read_only(
            json!("string"),
            "Date and time of the last image modification",
        ),
    );
    add("self", read_only(json!("string"), "An image self url"));
    add("file", read_only(json!("string"), "An image file url"));
    add("schema", read_only(json!("string"), "An image schema url"));
    json!({
        "name": "image",
        "properties": p,
        // Glance's "additional properties": free-form string values.
        "additionalProperties": {"type": "string"},
        "links": [
            {"rel": "self", "href": "{self}"},
            {"rel": "enclosure", "href": "{file}"},
            {"rel": "describedby", "href": "{schema}"},
        ],
    })
}

pub fn images() -> Value {
    json!({
        "name": "images",
        "properties": {
            "images": {"type": "array", "items": image()},
            "schema": {"type": "string"},
            "first": {"type": "string"},
            "next": {"type": "string"},
        },
        "links": [
            {"rel": "first", "href": "{first}"},
            {"rel": "next", "href": "{next}"},
            {"rel": "describedby", "href": "{schema}"},
        ],
    })
}

pub fn member() -> Value {
    json!({
        "name": "member",
        "properties": {
            "created_at": {"type": "string", "description": "Date and time of image member creation"},
            "image_id": {"type": "string", "pattern": UUID_PATTERN, "description": "An identifier for the image"},
            "member_id": {"type": "string", "description": "An identifier for the image member (project ID)"},
            "schema": {"type": "string", "readOnly": true},
            "status": {"type": "string", "enum": ["pending", "accepted", "rejected"], "description": "The status of this image member"},
            "updated_at": {"type": "string", "description": "Date and time of last modification of image member"},
        },
    })
}

pub fn members() -> Value {
    json!({
        "name": "members",
        "properties": {
            "members": {"type": "array", "items": member()},
            "schema": {"type": "string"},
        },
        "links": [
            {"rel": "self", "href": "{self}"},
            {"rel": "describedby", "href": "{schema}"},
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_images::record::{Caller, ImageRecord, Member, MemberStatus};

    /// Every field a record shows is described, with a type that admits its value: a client
    /// that checks records against the schema accepts what Shoal returns.
    #[test]
    fn records_fit_their_schemas() {
        let caller = Caller {
            admin: false,
            project: Some("p".into()),
        };
        let body = json!({"name": "n", "disk_format": "qcow2", "container_format": "bare"});
        let fresh = ImageRecord::create(&json!({}), &caller, 1, || {
            "6f9619ff-8b86-d011-b42d-00cf4fc964ff".into()
        })
        .unwrap();
        let named = ImageRecord::create(&body, &caller, 1, || {
            "6f9619ff-8b86-d011-b42d-00cf4fc964ff".into()
        })
        .unwrap();
        let m = Member {
            image_id: "6f9619ff-8b86-d011-b42d-00cf4fc964ff".into(),
            member_id: "q".into(),
            status: MemberStatus::Pending,
            created_at: 1,
            updated_at: 1,
        };
        for (schema, record) in [
            (image(), fresh.to_json()),
            (image(), named.to_json()),
            (member(), m.to_json()),
        ] {
            let props = &schema["properties"];
            for (k, v) in record.as_object().unwrap() {
                let p = &props[k];
                assert!(p.is_object(), "{k} is not in the {} schema", schema["name"]);
                let kinds: Vec<&str> = match &p["type"] {
                    Value::String(t) => vec![t.as_str()],
                    Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
                    other => panic!("{k}: type {other}"),
                };
                let kind = match v {
                    Value::Null => "null",
                    Value::Bool(_) => "boolean",
                    Value::Number(_) => "integer",
                    Value::String(_) => "string",
                    Value::Array(_) => "array",
                    Value::Object(_) => "object",
                };
                assert!(kinds.contains(&kind), "{k} = {v} is not of type {kinds:?}");
                if let Some(allowed) = p["enum"].as_array() {
                    assert!(allowed.contains(v), "{k} = {v} is not in {allowed:?}");
                }
            }
        }
        for name in ["image", "images", "member", "members"] {
            assert_eq!(by_name(name).unwrap()["name"], name);
        }
        assert!(by_name("task").is_none());
    }
}
