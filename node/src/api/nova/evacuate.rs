//! `evacuate` (Nova's `os-evacuate` server action, admins only): a server whose host is down is
//! rebuilt on another host from its image. As Nova's API and `compute_api.evacuate`: the
//! target host, if named, must be a compute host and not the server's own; the server must be
//! ACTIVE, SHUTOFF or ERROR with no task; its host's compute service must be down (forced down,
//! or not heard from). The target is then scheduled (the source kept out, the server group's
//! policy honoured), and in **one** transaction the server's claim moves from the source to the
//! target and the row is written: host the target, task `rebuilding`, a migration of type
//! `evacuation` (status `accepted`). The target's agent rebuilds it; the source's agent removes
//! what it left once it runs again (docs/compute.md, "Evacuate").

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};
use shoal_compute::placement::{self, PlaceError};
use shoal_compute::server::{Action, ActionEvent, Migration, ServerRecord, EVACUATION};
use shoal_scheduler::{Request, RequestError, ScheduleError, SchedulerHints, ServerGroup};
use shoal_state::time::now_rfc3339;
use shoal_state::{tables, Expect, Versioned};

use super::flavors::nova_err;
use super::servers::{bad, group_of, load, load_group, need, servers};
use super::version::Microversion;
use crate::api::error::{ApiError, ApiResult};
use crate::api::{AppState, Auth, RequestId};

/// `onSharedStorage` leaves the body and the answer carries no `adminPass` from here on.
const V2_14: Microversion = Microversion::new(2, 14);
/// A named host goes through the scheduler's filters unless `force` is given.
const V2_29: Microversion = Microversion::new(2, 29);

/// Rounds of (re-read the group, place) when a concurrent create changed the server's group.
const ATTEMPTS: u32 = 10;

/// What an `evacuate` body asks for, checked against the version's schema.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Body {
    host: Option<String>,
    /// The host is used as it is (before 2.29, or `force`), not checked by the filters.
    forced: bool,
    /// The password the answer carries (before 2.14 only).
    password: Option<String>,
}

/// Nova's `parameter_types.boolean`: a JSON boolean or one of its strings.
fn boolean(field: &str, v: &Value) -> ApiResult<bool> {
    match v {
        Value::Bool(b) => Ok(*b),
        Value::String(s) => match s.as_str() {
            "True" | "TRUE" | "true" | "1" | "ON" | "On" | "on" | "YES" | "Yes" | "yes" | "y"
            | "t" => Ok(true),
            "False" | "FALSE" | "false" | "0" | "OFF" | "Off" | "off" | "NO" | "No" | "no"
            | "n" | "f" => Ok(false),
            _ => Err(bad(format!(
                "Invalid input for field/attribute {field}. Value: {s}. It is not a boolean"
            ))),
        },
        other => Err(bad(format!(
            "Invalid input for field/attribute {field}. Value: {other}. It is not a boolean"
        ))),
    }
}

/// A password Nova's `generate_password` would stand in for.
fn generated_password() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}

/// Nova's three `evacuate` schemas (2.1, 2.14, 2.29) and the password rules around them.
fn parse_body(arg: &Value, v: Microversion) -> ApiResult<Body> {
    let empty = Map::new();
    let o = match arg {
        Value::Object(o) => o,
        // Nova's schema wants an object; from 2.14 an empty one is a whole request.
        Value::Null if v >= V2_14 => &empty,
        other => {
            return Err(bad(format!(
                "Invalid input for field/attribute evacuate. Value: {other}. It must be an object"
            )))
        }
    };
    let mut allowed = vec!["host", "adminPass"];
    if v < V2_14 {
        allowed.push("onSharedStorage");
    }
    if v >= V2_29 {
        allowed.push("force");
    }
    if let Some(k) = o.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(bad(format!(
            "Invalid input for field/attribute evacuate. Additional properties are not allowed ('{k}' was unexpected)"
        )));
    }
    let host = match o.get("host") {
        None => None,
        Some(Value::String(h))
            if !h.is_empty()
                && h.len() <= 255
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_')) =>
        {
            Some(h.clone())
        }
        Some(h) => {
            return Err(bad(format!(
                "Invalid input for field/attribute host. Value: {h}. It is not a valid host name"
            )))
        }
    };
    let pass = match o.get("adminPass") {
        None => None,
        Some(Value::String(p)) if p.len() <= 255 => Some(p.clone()),
        Some(Value::String(_)) => return Err(bad("adminPass is too long")),
        Some(p) => {
            return Err(bad(format!(
                "Invalid input for field/attribute adminPass. Value: {p}. It is not a string"
            )))
        }
    };
    let force = match o.get("force") {
        None => false,
        Some(f) => boolean("force", f)?,
    };
    if force && host.is_none() {
        return Err(bad("Can't force to a non-provided destination"));
    }
    let password = if v >= V2_14 {
        // Nova generates one and answers none.
        None
    } else {
        let shared = match o.get("onSharedStorage") {
            None => {
                return Err(bad(
                    "Invalid input for field/attribute evacuate. 'onSharedStorage' is a required property",
                ))
            }
            Some(s) => boolean("onSharedStorage", s)?,
        };
        if shared && pass.is_some() {
            return Err(bad("admin password can't be changed on existing disk"));
        }
        if shared {
            // Nova's compute host would find the disk missing (InvalidSharedStorage): a Shoal
            // host keeps its instances on its own disk, and an evacuation rebuilds from the
            // image.
            return Err(bad(
                "onSharedStorage: instance files are never on shared storage here; evacuate rebuilds the server from its image",
            ));
        }
        Some(pass.unwrap_or_else(generated_password))
    };
    Ok(Body {
        forced: host.is_some() && (v < V2_29 || force),
        host,
        password,
    })
}

/// `POST /servers/{id}/action {"evacuate": ...}`. Answers 200 as Nova does: before 2.14 with
/// `{"adminPass": ...}`, from 2.14 with no body.
pub(super) async fn evacuate(
    state: &AppState,
    auth: &Auth,
    rid: &RequestId,
    v: Microversion,
    id: &str,
    arg: &Value,
) -> ApiResult<Response> {
    // The server first (404), then the policy (Nova's `os_compute_api:os-evacuate`: admins).
    let found = load(state, auth, id).await?;
    need(auth, "admin")?;
    let body = parse_body(arg, v)?;
    let services = shoal_compute::service::Services::new(
        &state.state,
        state.cluster.cluster_status().await.members,
    )
    .list()
    .await?;
    if let Some(h) = &body.host {
        if !services.iter().any(|s| &s.member.name == h) {
            return Err(ApiError::not_found(format!("Compute host {h} not found.")).nova());
        }
        if found.value.host.as_deref() == Some(h.as_str()) {
            return Err(bad("The target host can't be the same one."));
        }
    }
    let Some(source) = found.value.host.clone() else {
        return Err(ApiError::conflict(format!(
            "Cannot 'evacuate' instance {id} while it is in vm_state {}",
            found.value.vm_state.as_str()
        ))
        .nova());
    };
    found
        .value
        .clone()
        .request(Action::Evacuate)
        .map_err(|c| ApiError::conflict(c.to_string()).nova())?;
    // A host that is no longer a member reads as down.
    if services
        .iter()
        .any(|s| s.member.name == source && s.service.is_up(s.member.healthy))
    {
        // Nova answers this with 400 (`ComputeServiceInUse` in its evacuate API).
        return Err(bad(format!("Compute service of {source} is still in use.")));
    }
    // Nova's ComputeFilter passes only hosts whose service is up; placement here leaves out
    // the forced-down and disabled ones, and the query the ones not heard from. This node is
    // up (it is answering), so the list is never empty.
    let up: Vec<String> = services
        .iter()
        .filter(|s| s.service.is_up(s.member.healthy))
        .map(|s| s.member.name.clone())
        .collect();
    place(state, auth, rid, found, &source, &body, &up).await?;
    Ok(match body.password {
        Some(p) => (StatusCode::OK, Json(json!({ "adminPass": p }))).into_response(),
        None => StatusCode::OK.into_response(),
    })
}

/// Schedules the target and commits the claim's move with the row; with no host that fits,
/// the server stays as it was with the migration `error` and a `conductor_rebuild_server`
/// event saying so, as Nova's conductor leaves it.
async fn place(
    state: &AppState,
    auth: &Auth,
    rid: &RequestId,
    found: Versioned<ServerRecord>,
    source: &str,
    body: &Body,
    up: &[String],
) -> ApiResult<()> {
    let id = found.value.id.clone();
    let now = now_rfc3339();
    let mut r = found.value.clone();
    r.request(Action::Evacuate)
        .map_err(|c| ApiError::conflict(c.to_string()).nova())?;
    r.record_action("evacuate", &rid.0, &auth.0.user_id, &now);
    r.updated = now.clone();
    let migration = |dest: &str, status: &str| Migration {
        id: found.revision,
        kind: EVACUATION.into(),
        source_host: source.to_owned(),
        dest_host: dest.to_owned(),
        old_flavor: found.value.flavor.clone(),
        new_flavor: found.value.flavor.clone(),
        status: status.into(),
        old_vm_state: found.value.vm_state,
        created: now.clone(),
        updated: now.clone(),
        dest_released: false,
    };
    let f = &r.flavor;
    // The scheduler places a name no claim has; the transaction then moves the server's own.
    let placeholder = format!("{id}.{EVACUATION}");
    let group_id = group_of(state, &r).await?;
    let mut outcome = Err(PlaceError::Contended(0));
    for _ in 0..ATTEMPTS {
        let group = match &group_id {
            Some(g) => Some(load_group(state, g, &r.project_id).await?),
            None => None,
        };
        let zone = match (&body.host, body.forced) {
            // Nova's forced host: only the resource filters run (see the scheduler).
            (Some(h), true) => Some(format!(":{h}")),
            _ => (r.availability_zone != "nova").then(|| r.availability_zone.clone()),
        };
        let request = Request {
            instance_ids: vec![placeholder.clone()],
            flavor: shoal_scheduler::Flavor {
                name: f.name.clone(),
                vcpus: f.vcpus,
                ram_mb: f.ram_mb,
                root_gb: f.disk_gb,
                ephemeral_gb: f.ephemeral_gb,
                swap_mb: f.swap_mb,
                extra_specs: f.extra_specs.clone(),
            },
            image: Default::default(),
            availability_zone: zone,
            is_admin: true,
            hints: SchedulerHints {
                query: Some(host_query(body, up)),
                group: group.as_ref().map(|(g, policy)| ServerGroup {
                    policy: *policy,
                    members: g.value.members.clone(),
                    max_server_per_host: None,
                }),
                // The server's own claim keeps its host out.
                different_host: vec![id.clone()],
                ..SchedulerHints::default()
            },
        };
        let current = placement::claim_of(&state.cluster, &id)
            .await
            .map_err(|e| internal(&id, &e))?;
        outcome = placement::place_with(
            &state.cluster,
            Some(&state.hosts),
            &request,
            |txn, claims| {
                let mut txn = placement::move_claim(txn, &placeholder, &id, current.as_ref());
                if let Some((g, _)) = &group {
                    // Conditioned and written again, so that a create placing a member of the
                    // group at the same time re-reads it and sees this server's new host.
                    let key = format!("{}/{}", g.value.project_id, g.value.id);
                    txn = txn
                        .when(tables::SERVER_GROUPS, &key, Expect::Revision(g.revision))
                        .put(
                            tables::SERVER_GROUPS,
                            &key,
                            serde_json::to_vec(&g.value).expect("groups serialise"),
                        );
                }
                let mut row = r.clone();
                row.host = Some(claims[0].host.clone());
                row.migration = Some(migration(&claims[0].host, "accepted"));
                txn.when(tables::SERVERS, &id, Expect::Revision(found.revision))
                    .put(
                        tables::SERVERS,
                        &id,
                        serde_json::to_vec(&row).expect("server records serialise"),
                    )
            },
        )
        .await;
        match &outcome {
            Err(PlaceError::ExtraPrecondition { table, .. }) if table == tables::SERVER_GROUPS => {
                state.cluster.read_barrier().await.map_err(nova_err)?;
                continue;
            }
            _ => break,
        }
    }
    match outcome {
        Ok(placed) => {
            tracing::info!(server = %id, from = %source, to = %placed.placements[0].host, "evacuating");
            Ok(())
        }
        Err(PlaceError::ExtraPrecondition { .. } | PlaceError::InstanceExists(_)) => {
            Err(ApiError::conflict(format!(
                "Instance {id} changed while the request was handled; retry"
            ))
            .nova())
        }
        Err(PlaceError::Schedule(
            e @ (ScheduleError::NoValidHost(_)
            | ScheduleError::Request(RequestError::UnknownForcedHost(_))),
        )) => {
            tracing::info!(server = %id, reason = %e, "no host for the evacuation");
            let mut back = found.value.clone();
            back.record_action("evacuate", &rid.0, &auth.0.user_id, &now);
            if let Some(last) = back.actions.last_mut() {
                last.events.push(ActionEvent {
                    event: "conductor_rebuild_server".into(),
                    start_time: now.clone(),
                    finish_time: Some(now_rfc3339()),
                    result: Some("Error".into()),
                });
            }
            back.keep_past_migration(migration("", "error"));
            back.updated = now_rfc3339();
            servers(state)
                .put_at(&id, &back, found.revision)
                .await
                .map_err(nova_err)?;
            Ok(())
        }
        Err(PlaceError::Schedule(e)) => Err(bad(e.to_string())),
        Err(e) => Err(internal(&id, &e)),
    }
}

/// The JSON filter query of an evacuation: a host whose service is up and, for Nova's
/// requested destination (a host from 2.29 without `force`), that host alone, every other
/// filter running too. (A forced host skips the filters, this one included, as in Nova.)
fn host_query(body: &Body, up: &[String]) -> String {
    let mut live = vec![json!("in"), json!("$host")];
    live.extend(up.iter().map(|h| json!(h)));
    match (&body.host, body.forced) {
        (Some(h), false) => json!(["and", ["=", "$host", h], live]),
        _ => Value::Array(live),
    }
    .to_string()
}

fn internal(id: &str, e: &dyn std::fmt::Display) -> ApiError {
    tracing::warn!(server = %id, error = %e, "evacuate placement failed");
    ApiError::internal("the cluster could not commit the evacuation").nova()
}

#[cfg(test)]
mod tests {
    use super::*;

    const V2_1: Microversion = Microversion::new(2, 1);
    const V2_26: Microversion = Microversion::new(2, 26);

    /// Each version's schema: `onSharedStorage` required before 2.14 and refused after, a
    /// password answered only before 2.14, `force` from 2.29 and never without a host; a
    /// named host is used as it is before 2.29 and filtered after unless forced.
    #[test]
    fn bodies_follow_novas_schemas() {
        let b = parse_body(&json!({"onSharedStorage": false}), V2_1).unwrap();
        assert!(b.host.is_none() && b.password.as_ref().is_some_and(|p| p.len() == 12));
        let b = parse_body(
            &json!({"onSharedStorage": "False", "adminPass": "pw", "host": "node2"}),
            V2_1,
        )
        .unwrap();
        assert_eq!(b.password.as_deref(), Some("pw"));
        assert!(b.forced);
        assert!(parse_body(&json!({}), V2_1).is_err());
        assert!(parse_body(&Value::Null, V2_1).is_err());
        assert!(parse_body(&json!({"onSharedStorage": true, "adminPass": "x"}), V2_1).is_err());
        assert!(parse_body(&json!({"onSharedStorage": "maybe"}), V2_1).is_err());

        let b = parse_body(&json!({}), V2_26).unwrap();
        assert_eq!(
            b,
            Body {
                host: None,
                forced: false,
                password: None
            }
        );
        assert!(parse_body(&Value::Null, V2_26).is_ok());
        assert!(parse_body(&json!({"onSharedStorage": false}), V2_26).is_err());
        assert!(parse_body(&json!({"force": true, "host": "node2"}), V2_26).is_err());
        assert!(parse_body(&json!({"host": "bad host"}), V2_26).is_err());
        assert!(parse_body(&json!({"host": 7}), V2_26).is_err());
        assert!(parse_body(&json!({"adminPass": 7}), V2_26).is_err());
        assert!(parse_body(&json!({"host": "node2"}), V2_26).unwrap().forced);

        assert!(!parse_body(&json!({"host": "node2"}), V2_29).unwrap().forced);
        assert!(
            parse_body(&json!({"host": "node2", "force": "true"}), V2_29)
                .unwrap()
                .forced
        );
        assert!(parse_body(&json!({"force": true}), V2_29).is_err());
        assert!(parse_body(&json!({"force": "sure", "host": "a"}), V2_29).is_err());
    }

    /// The query keeps the hosts that are up and, for a requested destination, that one; it
    /// parses as the scheduler's JSON filter.
    #[test]
    fn the_host_query_keeps_live_hosts_and_the_requested_one() {
        let up = vec!["node1".to_owned(), "node2".to_owned()];
        let any = parse_body(&json!({}), V2_29).unwrap();
        assert_eq!(host_query(&any, &up), r#"["in","$host","node1","node2"]"#);
        let asked = parse_body(&json!({"host": "node2"}), V2_29).unwrap();
        let q = host_query(&asked, &up);
        assert_eq!(
            q,
            r#"["and",["=","$host","node2"],["in","$host","node1","node2"]]"#
        );
        for q in [host_query(&any, &up), q] {
            assert!(shoal_scheduler::json_query::parse(&q).is_ok(), "{q}");
        }
    }
}
