//! Server groups: a project's named sets of servers with a placement policy, as Nova keeps
//! them.
//!
//! Owns the `server_groups` table (key: `{project_id}/{id}`). A group holds one of Nova's
//! four policies; its members are written by the servers API in the placement's transaction
//! (see `api/nova/servers.rs`), and a member whose server is gone leaves the group when it is
//! read. A project's groups count against its `server_groups` quota, race-free through
//! `shoal_state::quota`.

use serde::{Deserialize, Serialize};
use shoal_state::quota::{commit_within_quota, QuotaOutcome};
use shoal_state::{tables, State, StateError, Table, Txn};

use crate::error::ComputeError;
use crate::quota::Quotas;

/// The policies a group may hold, one each.
pub const POLICIES: [&str; 4] = [
    "anti-affinity",
    "affinity",
    "soft-anti-affinity",
    "soft-affinity",
];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerGroup {
    pub id: String,
    pub name: String,
    pub policy: String,
    pub project_id: String,
    pub user_id: String,
    /// Servers created into the group; written by the servers API in the placement's
    /// transaction (see `api/nova/servers.rs`).
    #[serde(default)]
    pub members: Vec<String>,
}

impl ServerGroup {
    /// A new, empty group `name` of `project_id`, made by `user_id`, or what is wrong with it:
    /// the name (1 to 255 printable characters), then `policies` (exactly one of
    /// [`POLICIES`]).
    pub fn new(
        name: String,
        policies: &[String],
        project_id: &str,
        user_id: &str,
    ) -> Result<Self, ComputeError> {
        shoal_state::validate::text("server group name", &name, 255, false)
            .map_err(ComputeError::BadRequest)?;
        let policy = match policies {
            [p] if POLICIES.contains(&p.as_str()) => p.clone(),
            _ => {
                return Err(ComputeError::BadRequest(format!(
                    "policies must hold exactly one of {}",
                    POLICIES.join(", ")
                )))
            }
        };
        Ok(Self {
            id: uuid::Uuid::new_v4().to_string(),
            name,
            policy,
            project_id: project_id.to_owned(),
            user_id: user_id.to_owned(),
            members: Vec::new(),
        })
    }

    fn key(&self) -> String {
        format!("{}/{}", self.project_id, self.id)
    }
}

/// The server group rows.
#[derive(Debug, Clone)]
pub struct ServerGroups {
    state: State,
    table: Table<ServerGroup>,
}

impl ServerGroups {
    pub fn new(state: &State) -> Self {
        Self {
            state: state.clone(),
            table: state.table(tables::SERVER_GROUPS),
        }
    }

    /// The raw rows under `prefix`, from the local replica.
    async fn rows(&self, prefix: &str) -> Result<Vec<(String, shoal_state::Row)>, ComputeError> {
        let (rows, _) = self
            .state
            .store()
            .list(tables::SERVER_GROUPS, prefix, usize::MAX)
            .await
            .map_err(|e| StateError::from_cluster(tables::SERVER_GROUPS, prefix, e))?;
        Ok(rows)
    }

    /// Creates `group` if its project holds fewer groups than its `server_groups` quota.
    pub async fn create(&self, group: &ServerGroup) -> Result<(), ComputeError> {
        let project = &group.project_id;
        let quota = Quotas::new(&self.state)
            .limit(project, "server_groups")
            .await?;
        let txn = Txn::new().put(
            tables::SERVER_GROUPS,
            &group.key(),
            self.table.encode(group),
        );
        let prefix = format!("{project}/");
        let guard = format!("server_groups/{project}");
        match commit_within_quota(
            &self.state,
            &guard,
            quota,
            || async { Ok::<_, ComputeError>(self.rows(&prefix).await?.len() as i64) },
            txn,
        )
        .await?
        {
            QuotaOutcome::Written(_) => Ok(()),
            QuotaOutcome::Over { held } => Err(ComputeError::OverQuota(format!(
                "quota exceeded: the project holds {held} of {quota} server groups"
            ))),
        }
    }

    /// The groups under `prefix`, after a read barrier; rows that do not decode are skipped.
    async fn under(&self, prefix: &str) -> Result<Vec<ServerGroup>, ComputeError> {
        self.state.read_barrier().await?;
        let rows = self.rows(prefix).await?;
        Ok(rows
            .into_iter()
            .filter_map(|(_, r)| serde_json::from_slice(&r.value).ok())
            .collect())
    }

    /// `project`'s groups, after a read barrier.
    pub async fn of_project(&self, project: &str) -> Result<Vec<ServerGroup>, ComputeError> {
        self.under(&format!("{project}/")).await
    }

    /// Group `id` of `project`; an `admin` also finds another project's group.
    pub async fn find(
        &self,
        project: &str,
        id: &str,
        admin: bool,
    ) -> Result<ServerGroup, ComputeError> {
        let mut found = self
            .of_project(project)
            .await?
            .into_iter()
            .find(|g| g.id == id);
        if found.is_none() && admin {
            found = self.under("").await?.into_iter().find(|g| g.id == id);
        }
        found.ok_or_else(|| ComputeError::NotFound(format!("server group {id} could not be found")))
    }

    /// Drops the members whose server is gone: a deleted server leaves its group, as in Nova.
    pub async fn live_members(&self, group: &mut ServerGroup) -> Result<(), ComputeError> {
        let mut live = Vec::with_capacity(group.members.len());
        for id in &group.members {
            let row = self
                .state
                .store()
                .get(tables::SERVERS, id)
                .await
                .map_err(|e| StateError::from_cluster(tables::SERVERS, id, e))?;
            if row.is_some() {
                live.push(id.clone());
            }
        }
        group.members = live;
        Ok(())
    }

    /// Deletes the group (gone already is fine).
    pub async fn delete(&self, group: &ServerGroup) -> Result<(), ComputeError> {
        self.table.delete(&group.key()).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn group(name: &str, project: &str) -> ServerGroup {
        ServerGroup::new(name.into(), &["affinity".to_owned()], project, "u").unwrap()
    }

    #[test]
    fn a_group_has_one_known_policy() {
        let new = |p: &[&str]| {
            let p: Vec<String> = p.iter().map(|s| (*s).to_owned()).collect();
            ServerGroup::new("g".into(), &p, "p", "u")
        };
        assert_eq!(
            new(&["soft-anti-affinity"]).unwrap().policy,
            "soft-anti-affinity"
        );
        for bad in [&[][..], &["affinity", "anti-affinity"], &["spread"]] {
            assert!(
                matches!(new(bad), Err(ComputeError::BadRequest(_))),
                "{bad:?}"
            );
        }
        assert!(ServerGroup::new(String::new(), &["affinity".into()], "p", "u").is_err());
    }

    #[tokio::test]
    async fn groups_are_bounded_by_the_quota_and_found_by_their_project() {
        let state = State::in_memory();
        let groups = ServerGroups::new(&state);
        Quotas::new(&state)
            .update_project("p", &BTreeMap::from([("server_groups".to_owned(), 1)]))
            .await
            .unwrap();
        let mut g = group("g", "p");
        groups.create(&g).await.unwrap();
        assert!(matches!(
            groups.create(&group("h", "p")).await,
            Err(ComputeError::OverQuota(m)) if m == "quota exceeded: the project holds 1 of 1 server groups"
        ));
        // Another project has its own quota.
        groups.create(&group("h", "q")).await.unwrap();
        assert_eq!(groups.of_project("p").await.unwrap(), [g.clone()]);
        assert!(matches!(
            groups.find("q", &g.id, false).await,
            Err(ComputeError::NotFound(_))
        ));
        assert_eq!(groups.find("q", &g.id, true).await.unwrap().id, g.id);
        // A member whose server row is gone is not shown.
        state
            .write(
                tables::SERVERS,
                Txn::new().put(tables::SERVERS, "s1", b"{}".to_vec()),
            )
            .await
            .unwrap();
        g.members = vec!["s1".into(), "s2".into()];
        groups.live_members(&mut g).await.unwrap();
        assert_eq!(g.members, ["s1"]);
        groups.delete(&g).await.unwrap();
        assert!(groups.of_project("p").await.unwrap().is_empty());
        groups.create(&group("i", "p")).await.unwrap();
    }
}
