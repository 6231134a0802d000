//! Compute services and the hosts they run on, as Nova's `os-services`, `os-hosts` and
//! `os-hypervisors` address them.
//!
//! Every Shoal node is a hypervisor and runs the compute service (`nova-compute`), so the
//! hosts are the cluster's members, handed in by the caller as it reads them. Owns the
//! `compute_services` table (key: the host name; value: whether its service is disabled, and
//! why); a host without a row is enabled. How a host is found by name, by Nova id (its Raft
//! node id) or by a name pattern, and which service and host changes are allowed, are here.
//! What a host registered (its capacity) is `placement`'s `hosts` table.

use serde::{Deserialize, Serialize};
use shoal_consensus::cluster::MemberStatus;
use shoal_state::{tables, State, StateError, Table};

use crate::error::ComputeError;

/// The one service binary each host runs.
pub const BINARY: &str = "nova-compute";

/// A host's `compute_services` row.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceState {
    pub disabled: bool,
    #[serde(default)]
    pub disabled_reason: Option<String>,
    /// Nova's `forced_down` (microversion 2.11): an admin declared the service down, so it
    /// reads as down and takes no new servers whatever its heartbeat says.
    #[serde(default)]
    pub forced_down: bool,
}

impl ServiceState {
    /// Whether the service is up, as Nova's servicegroup answers: its host is healthy and no
    /// admin forced it down.
    pub fn is_up(&self, healthy: bool) -> bool {
        healthy && !self.forced_down
    }

    /// Nova's `status`: `enabled` or `disabled`.
    pub fn status(&self) -> &'static str {
        if self.disabled {
            "disabled"
        } else {
            "enabled"
        }
    }
}

/// A compute host: the cluster member and its service's state.
#[derive(Debug, Clone)]
pub struct HostService {
    pub member: MemberStatus,
    pub service: ServiceState,
}

/// The compute-service rows of the cluster's hosts.
#[derive(Debug, Clone)]
pub struct Services {
    state: State,
    table: Table<ServiceState>,
    members: Vec<MemberStatus>,
}

impl Services {
    /// The services of `members`, the cluster's membership as the caller read it.
    pub fn new(state: &State, members: Vec<MemberStatus>) -> Self {
        Self {
            state: state.clone(),
            table: state.table(tables::COMPUTE_SERVICES),
            members,
        }
    }

    /// Every host with its service, by Nova id (the Raft node id), read after a barrier. A
    /// row that does not decode reads as an enabled service.
    pub async fn list(&self) -> Result<Vec<HostService>, ComputeError> {
        self.state.read_barrier().await?;
        let mut members = self.members.clone();
        members.sort_by_key(|m| m.id);
        let mut out = Vec::with_capacity(members.len());
        for member in members {
            let row = self
                .state
                .store()
                .get(tables::COMPUTE_SERVICES, &member.name)
                .await
                .map_err(|e| StateError::from_cluster(tables::COMPUTE_SERVICES, &member.name, e))?;
            let service = row
                .and_then(|r| serde_json::from_slice(&r.value).ok())
                .unwrap_or_default();
            out.push(HostService { member, service });
        }
        Ok(out)
    }

    /// Whether `host` is one of the members.
    fn known(&self, host: &str) -> Result<(), ComputeError> {
        if self.members.iter().any(|m| m.name == host) {
            Ok(())
        } else {
            Err(ComputeError::NotFound(format!(
                "compute host {host} could not be found"
            )))
        }
    }

    /// The host named `host`.
    pub async fn host(&self, host: &str) -> Result<HostService, ComputeError> {
        self.list()
            .await?
            .into_iter()
            .find(|h| h.member.name == host)
            .ok_or_else(|| {
                ComputeError::NotFound(format!("compute host {host} could not be found"))
            })
    }

    /// The hypervisor whose Nova id (its Raft node id) is `id`.
    pub async fn hypervisor(&self, id: &str) -> Result<HostService, ComputeError> {
        self.list()
            .await?
            .into_iter()
            .find(|h| h.member.id.to_string() == id)
            .ok_or_else(|| ComputeError::NotFound(format!("hypervisor {id} could not be found")))
    }

    /// The hypervisors whose name contains `pattern` (Nova's substring match); none is
    /// `NotFound`.
    pub async fn matching(&self, pattern: &str) -> Result<Vec<HostService>, ComputeError> {
        let found: Vec<HostService> = self
            .list()
            .await?
            .into_iter()
            .filter(|h| h.member.name.contains(pattern))
            .collect();
        if found.is_empty() {
            return Err(ComputeError::NotFound(format!(
                "no hypervisor matching {pattern} was found"
            )));
        }
        Ok(found)
    }

    /// `os-services/{enable|disable|disable-log-reason}`: sets `host`'s `binary` service; a
    /// reason is kept only while it is disabled. Answers the state written.
    pub async fn set_service(
        &self,
        action: &str,
        host: &str,
        binary: &str,
        reason: Option<String>,
    ) -> Result<ServiceState, ComputeError> {
        let disabled = match action {
            "enable" => false,
            "disable" | "disable-log-reason" => true,
            other => {
                return Err(ComputeError::NotFound(format!(
                    "unknown service action {other}; use enable, disable or disable-log-reason"
                )))
            }
        };
        if binary != BINARY {
            return Err(ComputeError::NotFound(format!(
                "no {binary} service on host {host}"
            )));
        }
        self.known(host)?;
        self.change(host, |s| {
            s.disabled = disabled;
            s.disabled_reason = if disabled { reason.clone() } else { None };
        })
        .await
    }

    /// `PUT /os-services/force-down` (microversion 2.11): sets `host`'s `forced_down`.
    pub async fn force_down(
        &self,
        host: &str,
        binary: &str,
        forced_down: bool,
    ) -> Result<ServiceState, ComputeError> {
        if binary != BINARY {
            return Err(ComputeError::NotFound(format!(
                "no {binary} service on host {host}"
            )));
        }
        self.known(host)?;
        self.change(host, |s| s.forced_down = forced_down).await
    }

    /// Edits `host`'s row with a compare-and-set, so an enable and a force-down do not undo
    /// each other.
    async fn change(
        &self,
        host: &str,
        edit: impl Fn(&mut ServiceState),
    ) -> Result<ServiceState, ComputeError> {
        let written = self
            .table
            .upsert(host, ServiceState::default, |s| {
                edit(s);
                Ok::<_, ComputeError>(())
            })
            .await?;
        Ok(written.value)
    }

    /// `os-hosts/{host}` with `status` and/or `maintenance_mode` (`enable` or `disable`):
    /// the status enables or disables the host's service (the row `os-services` writes);
    /// libvirt hosts have no maintenance mode (Nova's libvirt driver does not implement it).
    /// Answers the state written.
    pub async fn set_host(
        &self,
        host: &str,
        status: Option<&str>,
        maintenance_mode: Option<&str>,
    ) -> Result<ServiceState, ComputeError> {
        for (field, v) in [("status", status), ("maintenance_mode", maintenance_mode)] {
            if let Some(other) = v.filter(|v| !matches!(*v, "enable" | "disable")) {
                return Err(ComputeError::BadRequest(format!(
                    "{field} must be enable or disable, not {other:?}"
                )));
            }
        }
        if status.is_none() && maintenance_mode.is_none() {
            return Err(ComputeError::BadRequest(
                "the body must set status and/or maintenance_mode".into(),
            ));
        }
        self.host(host).await?;
        if maintenance_mode.is_some() {
            return Err(ComputeError::NotImplemented(
                "maintenance mode is not supported by the libvirt hosts Shoal runs".into(),
            ));
        }
        let disabled = status == Some("disable");
        self.change(host, |s| {
            s.disabled = disabled;
            s.disabled_reason = None;
        })
        .await
    }

    /// `os-hosts/{host}/{reboot|shutdown|startup}`: the error it ends in. Shoal does not power
    /// its hosts (as Nova's libvirt driver); an unknown action or host is `NotFound` first.
    pub async fn power(&self, host: &str, action: &str) -> ComputeError {
        if !matches!(action, "reboot" | "shutdown" | "startup") {
            return ComputeError::NotFound(format!("no host action {action}"));
        }
        if let Err(e) = self.host(host).await {
            return e;
        }
        ComputeError::NotImplemented(format!(
            "host {action} is not supported: Shoal does not power its hosts"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: u64, name: &str) -> MemberStatus {
        MemberStatus {
            name: name.into(),
            id,
            role: "voter".into(),
            api: "127.0.0.1:8774".into(),
            raft_addr: String::new(),
            zone: "nova".into(),
            applied_index: 0,
            healthy: true,
        }
    }

    fn services(state: &State) -> Services {
        Services::new(state, vec![member(2, "node2"), member(1, "node1")])
    }

    #[tokio::test]
    async fn hosts_are_found_by_name_id_and_pattern() {
        let svc = services(&State::in_memory());
        let names: Vec<String> = svc
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|h| h.member.name)
            .collect();
        assert_eq!(names, ["node1", "node2"]);
        assert_eq!(svc.hypervisor("2").await.unwrap().member.name, "node2");
        assert!(matches!(
            svc.hypervisor("9").await,
            Err(ComputeError::NotFound(_))
        ));
        assert!(matches!(
            svc.host("node9").await,
            Err(ComputeError::NotFound(_))
        ));
        assert_eq!(svc.matching("node").await.unwrap().len(), 2);
        assert!(matches!(
            svc.matching("gpu").await,
            Err(ComputeError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn services_are_disabled_with_a_reason_and_enabled_without() {
        let state = State::in_memory();
        let svc = services(&state);
        let s = svc
            .set_service(
                "disable-log-reason",
                "node1",
                BINARY,
                Some("maintenance".into()),
            )
            .await
            .unwrap();
        assert_eq!(
            (s.status(), s.disabled_reason.as_deref()),
            ("disabled", Some("maintenance"))
        );
        assert_eq!(svc.host("node1").await.unwrap().service, s);
        let s = svc
            .set_service("enable", "node1", BINARY, Some("ignored".into()))
            .await
            .unwrap();
        assert_eq!(s, ServiceState::default());
        for (action, host, binary) in [
            ("explode", "node1", BINARY),
            ("disable", "node1", "nova-scheduler"),
            ("disable", "node9", BINARY),
        ] {
            assert!(matches!(
                svc.set_service(action, host, binary, None).await,
                Err(ComputeError::NotFound(_))
            ));
        }
        // A corrupt row reads as an enabled service.
        state
            .write(
                tables::COMPUTE_SERVICES,
                shoal_state::Txn::new().put(tables::COMPUTE_SERVICES, "node2", b"?".to_vec()),
            )
            .await
            .unwrap();
        assert!(!svc.host("node2").await.unwrap().service.disabled);
    }

    #[tokio::test]
    async fn hosts_take_a_status_but_no_maintenance_mode_or_power_action() {
        let svc = services(&State::in_memory());
        assert!(
            svc.set_host("node1", Some("disable"), None)
                .await
                .unwrap()
                .disabled
        );
        assert!(svc.host("node1").await.unwrap().service.disabled);
        assert!(matches!(
            svc.set_host("node1", Some("off"), None).await,
            Err(ComputeError::BadRequest(_))
        ));
        assert!(matches!(
            svc.set_host("node1", None, None).await,
            Err(ComputeError::BadRequest(_))
        ));
        assert!(matches!(
            svc.set_host("node9", Some("enable"), None).await,
            Err(ComputeError::NotFound(_))
        ));
        assert!(matches!(
            svc.set_host("node1", None, Some("enable")).await,
            Err(ComputeError::NotImplemented(_))
        ));
        assert!(matches!(
            svc.power("node1", "reboot").await,
            ComputeError::NotImplemented(_)
        ));
        assert!(matches!(
            svc.power("node1", "explode").await,
            ComputeError::NotFound(_)
        ));
        assert!(matches!(
            svc.power("node9", "reboot").await,
            ComputeError::NotFound(_)
        ));
    }
}
