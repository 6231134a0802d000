//! Nova's usage and external-event APIs, over the servers and their tombstones
//! (`shoal_compute::usage`, `shoal_compute::events`):
//! - `GET /os-simple-tenant-usage` (admins) and `GET /os-simple-tenant-usage/{tenant_id}` (the
//!   project's readers, or admins): what live and deleted servers used over a window;
//! - `POST /os-server-external-events` (admins and the `service` role): what the network
//!   service tells the compute service about a server.

use std::collections::{BTreeMap, HashMap};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{middleware, Json, Router};
use serde_json::{json, Value};
use shoal_compute::server::ServerRecord;
use shoal_compute::usage::{tenant_usages, Usable};
use shoal_state::records::PortRecord;
use shoal_state::time::{now_rfc3339, now_secs, parse_iso8601};
use shoal_state::{tables, StateError};

use crate::api::body::parse;
use crate::api::error::{ApiError, ApiResult};
use crate::api::nova::flavors::nova_err;
use crate::api::nova::servers::{deleted_servers, is_admin, need, servers};
use crate::api::nova::version::microversion;
use crate::api::{AppState, Auth, RequestId};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/compute/v2.1/os-simple-tenant-usage", get(list_usage))
        .route(
            "/compute/v2.1/os-simple-tenant-usage/{tenant_id}",
            get(show_usage),
        )
        .route(
            "/compute/v2.1/os-server-external-events",
            post(external_events),
        )
        .layer(middleware::from_fn(microversion))
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::bad_request(msg).nova()
}

// ---------------------------------------------------------------------------------------------
// os-simple-tenant-usage

/// A `start`/`end` as Nova takes them (`%Y-%m-%dT%H:%M:%S`, with `.%f`, or `%Y-%m-%d
/// %H:%M:%S.%f`; a UTC offset is taken too), or now when absent.
fn instant(q: &HashMap<String, String>, key: &str, now: i64) -> ApiResult<(i64, bool)> {
    let Some(text) = q.get(key).filter(|t| !t.is_empty()) else {
        return Ok((now, false));
    };
    let timed = text
        .split_once(['T', ' '])
        .is_some_and(|(_, t)| t.len() >= 8 && t.as_bytes()[2] == b':' && t.as_bytes()[5] == b':');
    match parse_iso8601(text).filter(|_| timed) {
        Some(t) => Ok((t, true)),
        None => Err(bad("Datetime is in invalid format")),
    }
}

/// The window a request asks about, and whether it wants every server's usage.
fn window(q: &HashMap<String, String>) -> ApiResult<(i64, i64, bool)> {
    let now = now_secs() as i64;
    let (start, given_start) = instant(q, "start", now)?;
    let (stop, given_stop) = instant(q, "end", now)?;
    if start > stop || (start == stop && given_start && given_stop) {
        return Err(bad(
            "Invalid start time. The start time cannot occur after the end time.",
        ));
    }
    // Nova takes only `1`; openstacksdk (`openstack usage list`) sends `True`, which Nova
    // reads as not detailed and the client then shows no server count. Both mean detailed here.
    let detailed = q
        .get("detailed")
        .is_some_and(|d| d == "1" || d.eq_ignore_ascii_case("true"));
    Ok((start, stop, detailed))
}

/// Every project's usage over `[start, stop)` from the live servers and the tombstones,
/// only `project`'s when given.
async fn usages(
    state: &AppState,
    project: Option<&str>,
    start: i64,
    stop: i64,
) -> ApiResult<Vec<Value>> {
    let live: Vec<ServerRecord> = servers(state)
        .list("")
        .await
        .map_err(nova_err)?
        .into_values()
        .collect();
    let dead: Vec<(ServerRecord, i64)> = deleted_servers(state)
        .await?
        .into_iter()
        .filter_map(|t| Some((t.as_record(), parse_iso8601(&t.terminated_at)?)))
        .collect();
    let mut all: Vec<Usable<'_>> = live
        .iter()
        .map(|record| Usable {
            record,
            terminated_at: None,
        })
        .chain(dead.iter().map(|(record, t)| Usable {
            record,
            terminated_at: Some(*t),
        }))
        .filter(|u| project.is_none_or(|p| u.record.project_id == p))
        .collect();
    all.sort_by(|a, b| (&a.record.created, &a.record.id).cmp(&(&b.record.created, &b.record.id)));
    let now = now_secs() as i64;
    Ok(tenant_usages(&all, start, stop, now)
        .into_iter()
        .map(|u| serde_json::to_value(u).expect("usage serialises"))
        .collect())
}

/// `GET /os-simple-tenant-usage`: every project's usage (admins; Nova's default policy).
async fn list_usage(
    State(state): State<AppState>,
    auth: Auth,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    if !is_admin(&auth) {
        return Err(ApiError::forbidden(
            "Policy doesn't allow os_compute_api:os-simple-tenant-usage:list to be performed.",
        )
        .nova());
    }
    let (start, stop, detailed) = window(&q)?;
    let mut list = usages(&state, None, start, stop).await?;
    if !detailed {
        for u in &mut list {
            if let Some(o) = u.as_object_mut() {
                o.remove("server_usages");
            }
        }
    }
    Ok(Json(json!({ "tenant_usages": list })))
}

/// `GET /os-simple-tenant-usage/{tenant_id}`: one project's usage with every server's part,
/// for the project's readers and admins; `{}` when it used nothing in the window.
async fn show_usage(
    State(state): State<AppState>,
    auth: Auth,
    Path(tenant): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    need(&auth, "reader")?;
    if !is_admin(&auth) && auth.0.project_id.as_deref() != Some(tenant.as_str()) {
        return Err(ApiError::forbidden(
            "Policy doesn't allow os_compute_api:os-simple-tenant-usage:show to be performed.",
        )
        .nova());
    }
    let (start, stop, _) = window(&q)?;
    let usage = usages(&state, Some(&tenant), start, stop)
        .await?
        .into_iter()
        .next()
        .unwrap_or_else(|| json!({}));
    Ok(Json(json!({ "tenant_usage": usage })))
}

// ---------------------------------------------------------------------------------------------
// os-server-external-events

/// One event as the request gives it, checked against Nova's schema.
struct Event {
    name: String,
    server: String,
    status: String,
    tag: Option<String>,
}

fn invalid(field: &str, value: &Value, why: &str) -> ApiError {
    let mut shown = value.to_string();
    if shown.len() > 64 {
        shown = shown.chars().take(64).collect::<String>() + "...";
    }
    bad(format!(
        "Invalid input for field/attribute {field}. Value: {shown}. {why}"
    ))
}

fn events_of(body: &Value) -> ApiResult<Vec<Event>> {
    let obj = body
        .as_object()
        .ok_or_else(|| invalid("events", body, "The body must be an object"))?;
    if let Some(k) = obj.keys().find(|k| *k != "events") {
        return Err(invalid(
            "events",
            body,
            &format!("Additional properties are not allowed ('{k}' was unexpected)"),
        ));
    }
    let list = match obj.get("events") {
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(Value::Array(a)) => {
            return Err(invalid(
                "events",
                &Value::Array(a.clone()),
                "[] is too short",
            ))
        }
        Some(v) => return Err(invalid("events", v, "It is not an array")),
        None => return Err(invalid("events", body, "'events' is a required property")),
    };
    list.iter()
        .map(|e| {
            let o = e
                .as_object()
                .ok_or_else(|| invalid("events", e, "It is not an object"))?;
            if let Some(k) = o
                .keys()
                .find(|k| !matches!(k.as_str(), "name" | "server_uuid" | "status" | "tag"))
            {
                return Err(invalid(
                    "events",
                    e,
                    &format!("Additional properties are not allowed ('{k}' was unexpected)"),
                ));
            }
            let name = match o.get("name") {
                Some(Value::String(n)) if shoal_compute::events::NAMES.contains(&n.as_str()) => {
                    n.clone()
                }
                Some(v) => {
                    return Err(invalid(
                        "name",
                        v,
                        &format!("It is not one of {:?}", shoal_compute::events::NAMES),
                    ))
                }
                None => return Err(invalid("events", e, "'name' is a required property")),
            };
            let server = match o.get("server_uuid") {
                Some(Value::String(s)) => match uuid::Uuid::parse_str(s) {
                    Ok(u) => u.hyphenated().to_string(),
                    Err(_) => {
                        return Err(invalid(
                            "server_uuid",
                            &o["server_uuid"],
                            "It is not a 'uuid'",
                        ))
                    }
                },
                Some(v) => return Err(invalid("server_uuid", v, "It is not a string")),
                None => return Err(invalid("events", e, "'server_uuid' is a required property")),
            };
            let status = match o.get("status") {
                None => "completed".to_owned(),
                Some(Value::String(s)) if shoal_compute::events::STATUSES.contains(&s.as_str()) => {
                    s.clone()
                }
                Some(v) => {
                    return Err(invalid(
                        "status",
                        v,
                        &format!("It is not one of {:?}", shoal_compute::events::STATUSES),
                    ))
                }
            };
            let tag = match o.get("tag") {
                None => None,
                Some(Value::String(t)) if t.chars().count() <= 255 => Some(t.clone()),
                Some(v @ Value::String(_)) => return Err(invalid("tag", v, "It is too long")),
                Some(v) => return Err(invalid("tag", v, "It is not a string")),
            };
            Ok(Event {
                name,
                server,
                status,
                tag,
            })
        })
        .collect()
}

/// Records an accepted event on the server's row (and for `network-changed` refreshes the
/// row's ports from the port rows). `Ok(false)`: the server went meanwhile.
async fn accept(state: &AppState, auth: &Auth, rid: &RequestId, e: &Event) -> ApiResult<bool> {
    let mut ports = BTreeMap::new();
    if e.name == "network-changed" {
        let table = state.state.table::<PortRecord>(tables::PORTS);
        if let Some(v) = servers(state).get(&e.server).await.map_err(nova_err)? {
            for p in &v.value.ports {
                if let Some(row) = table.get(&p.port_id).await.map_err(nova_err)? {
                    ports.insert(p.port_id.clone(), row.value);
                }
            }
        }
    }
    let now = now_rfc3339();
    let written = servers(state)
        .update(&e.server, |r| {
            if e.name == "network-changed" {
                shoal_compute::events::refresh_ports(r, e.tag.as_deref(), &ports);
            }
            shoal_compute::events::record(
                r,
                &e.name,
                e.tag.as_deref(),
                &e.status,
                &rid.0,
                &auth.0.user_id,
                &now,
            );
            r.updated = now.clone();
            Ok::<_, StateError>(())
        })
        .await;
    match written {
        Ok(_) => Ok(true),
        Err(StateError::NotFound { .. }) => Ok(false),
        Err(e) => Err(nova_err(e)),
    }
}

/// `POST /os-server-external-events` (Nova's `server_external_events`): each event answered
/// 200 (`completed`) when its server exists on a host, 404 when there is no such server, 422
/// when the server has no host; 207 overall when any failed, 404 when none was accepted.
async fn external_events(
    State(state): State<AppState>,
    auth: Auth,
    rid: RequestId,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<Value>)> {
    if !is_admin(&auth) && !shoal_identity::has_role(&auth.0, "service") {
        return Err(ApiError::forbidden(
            "Policy doesn't allow os_compute_api:os-server-external-events:create to be performed.",
        )
        .nova());
    }
    let body: Value = parse(&body)?;
    let events = events_of(&body)?;
    let mut answers = Vec::with_capacity(events.len());
    let mut accepted = 0;
    for e in &events {
        let row = servers(&state).get(&e.server).await.map_err(nova_err)?;
        let code = match row {
            None => 404,
            Some(v) if v.value.host.is_none() => 422,
            Some(_) if accept(&state, &auth, &rid, e).await? => {
                accepted += 1;
                200
            }
            // Deleted between the read and the write.
            Some(_) => 404,
        };
        if code != 200 {
            tracing::debug!(server = %e.server, event = %e.name, code, "external event dropped");
        }
        let mut a = json!({
            "name": e.name,
            "server_uuid": e.server,
            "status": if code == 200 { "completed" } else { "failed" },
            "code": code,
        });
        if let Some(t) = &e.tag {
            a["tag"] = json!(t);
        }
        answers.push(a);
    }
    if accepted == 0 {
        return Err(ApiError::not_found("No instances found for any event").nova());
    }
    let status = if accepted == events.len() {
        StatusCode::OK
    } else {
        StatusCode::MULTI_STATUS
    };
    Ok((status, Json(json!({ "events": answers }))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn windows_take_novas_formats_and_refuse_the_rest() {
        let (s, e, d) = window(&q(&[
            ("start", "2026-12-05T10:00:00.123456"),
            ("end", "2026-12-06 10:00:00.000000"),
            ("detailed", "1"),
        ]))
        .unwrap();
        assert_eq!(e - s, 86_400);
        assert!(d);
        assert!(!window(&q(&[("start", "2026-12-05T10:00:00")])).unwrap().2);
        assert!(window(&q(&[("detailed", "True")])).unwrap().2);
        assert!(!window(&q(&[("detailed", "0")])).unwrap().2);
        for wrong in [
            "2026-12-05",
            "2026/12/05T10:00:00",
            "yesterday",
            "2026-12-05T10:00",
        ] {
            let err = window(&q(&[("start", wrong)])).unwrap_err();
            assert_eq!(err.status, StatusCode::BAD_REQUEST, "{wrong}");
        }
        let err = window(&q(&[
            ("start", "2026-12-06T10:00:00"),
            ("end", "2026-12-05T10:00:00"),
        ]))
        .unwrap_err();
        assert!(err.message.contains("start time"), "{}", err.message);
    }

    #[test]
    fn events_are_checked_against_novas_schema() {
        let id = "6f1c2d7e-0000-4000-8000-000000000001";
        let ok = events_of(&json!({"events": [
            {"name": "network-changed", "server_uuid": id, "tag": "p1"},
            {"name": "network-vif-plugged", "server_uuid": id, "status": "failed"},
        ]}))
        .unwrap();
        assert_eq!(ok[0].status, "completed");
        assert_eq!(ok[0].tag.as_deref(), Some("p1"));
        assert_eq!(ok[1].status, "failed");
        for (body, field) in [
            (json!({"events": []}), "events"),
            (json!({}), "events"),
            (
                json!({"events": [{"name": "reboot", "server_uuid": id}]}),
                "name",
            ),
            (
                json!({"events": [{"name": "network-changed", "server_uuid": "x"}]}),
                "server_uuid",
            ),
            (
                json!({"events": [{"name": "network-changed", "server_uuid": id, "status": "x"}]}),
                "status",
            ),
            (
                json!({"events": [{"name": "network-changed", "server_uuid": id, "extra": 1}]}),
                "events",
            ),
            (json!({"events": [{"name": "network-changed"}]}), "events"),
        ] {
            let err = events_of(&body).err().unwrap_or_else(|| panic!("{body}"));
            assert!(
                err.message.contains(&format!("field/attribute {field}.")),
                "{body}: {}",
                err.message
            );
        }
    }
}
