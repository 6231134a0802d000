//! `/v2.0/agents`: the network agent of each node, read-only. Shoal's agents are not Neutron's
//! (no DHCP, L3 or metadata agents: those jobs are answered by the one agent on each node), so
//! every node that runs one lists one agent of type `Shoal network agent`. Listing is for
//! admins; anyone else gets an empty list, as Neutron answers. `alive` is the node's health as
//! the cluster sees it (its Raft replication keeping up), not a separate heartbeat.

use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use shoal_network::agent::AgentRecord;

use super::{caller, listing, net_err, one, pick_fields, timestamp, Params, PREFIX};
use crate::api::error::{ApiError, ApiResult};
use crate::api::{AppState, Auth};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(&format!("{PREFIX}/agents"), get(list))
        .route(&format!("{PREFIX}/agents/{{id}}"), get(show))
}

/// A stable id for the agent of `host`, shaped as a UUID (clients expect one).
fn agent_id(host: &str) -> String {
    let digest = Sha256::digest(format!("shoal-network-agent/{host}").as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_random_bytes(bytes)
        .into_uuid()
        .to_string()
}

fn view(a: &AgentRecord, alive: bool) -> Value {
    json!({
        "id": agent_id(&a.host),
        "agent_type": "Shoal network agent",
        "binary": "shoal",
        "host": a.host,
        "topic": "N/A",
        "admin_state_up": true,
        "alive": alive,
        "availability_zone": null,
        "description": null,
        "created_at": timestamp(a.started_at),
        "started_at": timestamp(a.started_at),
        "heartbeat_timestamp": timestamp(a.started_at),
        "configurations": {"vtep": a.vtep.to_string(), "driver": a.driver,
            "physical_networks": a.physical_networks},
        "resources_synced": null,
    })
}

async fn views(s: &AppState, auth: &Auth) -> ApiResult<Vec<Value>> {
    let agents = s.network.agents(&caller(auth)).await.map_err(net_err)?;
    if agents.is_empty() {
        return Ok(Vec::new());
    }
    let members = s.cluster.cluster_status().await.members;
    Ok(agents
        .iter()
        .map(|a| {
            let alive = members.iter().any(|m| m.name == a.host && m.healthy);
            view(a, alive)
        })
        .collect())
}

async fn list(State(s): State<AppState>, auth: Auth, q: Params) -> ApiResult<Response> {
    let items = views(&s, &auth).await?;
    listing("agents", items, &q.0, &s.base_url)
}

async fn show(
    State(s): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    q: Params,
) -> ApiResult<Response> {
    let found = views(&s, &auth)
        .await?
        .into_iter()
        .find(|v| v["id"] == id.as_str())
        .ok_or_else(|| {
            ApiError::not_found(format!("Agent {id} could not be found")).neutron("AgentNotFound")
        })?;
    Ok(one("agent", pick_fields(found, &q.0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_ids_are_stable_uuids_per_host() {
        let a = agent_id("node1");
        assert_eq!(a, agent_id("node1"));
        assert_ne!(a, agent_id("node2"));
        assert!(uuid::Uuid::parse_str(&a).is_ok(), "{a}");
    }
}
