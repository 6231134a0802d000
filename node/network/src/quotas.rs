//! Neutron's quotas: per-project limits, what each project uses, and the check every create
//! goes through.
//!
//! Usage is counted from `network_usage` rows (`{project}/{resource}/{id}`), written and
//! deleted in the same transaction as the resource they count, so a count is one prefix
//! listing and is never out of step with the resources.

use std::collections::BTreeMap;

use serde::Serialize;
use shoal_state::quota::{commit_within_quota, QuotaOutcome};
use shoal_state::{tables, Txn, TxnResponse};

use crate::{check_project_id, Caller, NetResult, NetworkError, NetworkService};

/// Neutron's default quotas. RBAC policies are reported (the client shows them) but nothing
/// here creates them.
pub const DEFAULT_QUOTAS: [(&str, i64); 9] = [
    ("floatingip", 50),
    ("network", 100),
    ("port", 500),
    ("rbac_policy", 10),
    ("router", 10),
    ("security_group", 10),
    ("security_group_rule", 100),
    ("subnet", 100),
    ("subnetpool", -1),
];

/// The resources this service creates and counts.
pub const COUNTED: [&str; 8] = [
    "floatingip",
    "network",
    "subnet",
    "subnetpool",
    "port",
    "router",
    "security_group",
    "security_group_rule",
];

/// One line of `GET /v2.0/quotas/{project}/details`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct QuotaUsage {
    pub limit: i64,
    pub used: i64,
    pub reserved: i64,
}

pub(crate) fn usage_key(project: &str, resource: &str, id: &str) -> String {
    format!("{project}/{resource}/{id}")
}

fn guard_key(project: &str, resource: &str) -> String {
    format!("network/{resource}/{project}")
}

/// Adds the usage row of a new resource to `txn`.
pub(crate) fn count_in(txn: Txn, project: &str, resource: &str, id: &str) -> Txn {
    txn.put(
        tables::NETWORK_USAGE,
        &usage_key(project, resource, id),
        b"\"\"".to_vec(),
    )
}

/// Adds the deletion of a resource's usage row to `txn`.
pub(crate) fn uncount_in(txn: Txn, project: &str, resource: &str, id: &str) -> Txn {
    txn.delete(tables::NETWORK_USAGE, &usage_key(project, resource, id))
}

/// Marks `txn` as a create of `resource` outside the quota check (a project's `default`
/// security group): concurrent checked creates will recount.
pub(crate) fn bypass_in(txn: Txn, project: &str, resource: &str) -> Txn {
    shoal_state::quota::bump_guard(txn, &guard_key(project, resource))
}

impl NetworkService {
    /// Whether `caller` may read `project`'s quotas: admins any, others their own.
    pub fn may_read_quotas(&self, caller: &Caller, project: &str) -> bool {
        caller.admin || caller.owns(project)
    }

    fn quota_table(&self) -> shoal_state::Table<BTreeMap<String, i64>> {
        self.state.table(tables::NETWORK_QUOTAS)
    }

    /// The project's limits: Neutron's defaults with the project's overrides.
    pub async fn quotas(&self, caller: &Caller, project: &str) -> NetResult<BTreeMap<String, i64>> {
        if !self.may_read_quotas(caller, project) {
            return Err(NetworkError::policy("get_quota"));
        }
        self.barrier().await?;
        self.limits(project).await
    }

    async fn limits(&self, project: &str) -> NetResult<BTreeMap<String, i64>> {
        let mut q: BTreeMap<String, i64> = DEFAULT_QUOTAS
            .iter()
            .map(|(k, v)| ((*k).to_owned(), *v))
            .collect();
        if let Some(o) = self.quota_table().get(project).await? {
            q.extend(o.value);
        }
        Ok(q)
    }

    async fn used(&self, project: &str, resource: &str) -> NetResult<i64> {
        let rows = self
            .index(tables::NETWORK_USAGE)
            .list(&format!("{project}/{resource}/"))
            .await?;
        Ok(rows.rows.len() as i64)
    }

    /// Limits with what the project uses of each.
    pub async fn quota_details(
        &self,
        caller: &Caller,
        project: &str,
    ) -> NetResult<BTreeMap<String, QuotaUsage>> {
        let limits = self.quotas(caller, project).await?;
        let mut out = BTreeMap::new();
        for (resource, limit) in limits {
            let used = if COUNTED.contains(&resource.as_str()) {
                self.used(project, &resource).await?
            } else {
                0
            };
            out.insert(
                resource,
                QuotaUsage {
                    limit,
                    used,
                    reserved: 0,
                },
            );
        }
        Ok(out)
    }

    /// Changes some of the project's limits (admins only). With `check_limit`, a limit below
    /// what the project already uses is refused, as Neutron does.
    pub async fn set_quotas(
        &self,
        caller: &Caller,
        project: &str,
        changes: BTreeMap<String, i64>,
        check_limit: bool,
    ) -> NetResult<BTreeMap<String, i64>> {
        if !caller.admin {
            return Err(NetworkError::policy("update_quota"));
        }
        check_project_id(project)?;
        for (resource, limit) in &changes {
            if !DEFAULT_QUOTAS.iter().any(|(k, _)| k == resource) {
                return Err(NetworkError::bad(format!(
                    "Unrecognized attribute(s) '{}'",
                    crate::ip::shown(resource)
                )));
            }
            if *limit < -1 {
                return Err(NetworkError::bad(format!(
                    "Invalid input for {resource}. Reason: '{limit}' should be greater than or equal to -1."
                )));
            }
            if check_limit && *limit >= 0 && COUNTED.contains(&resource.as_str()) {
                self.barrier().await?;
                let used = self.used(project, resource).await?;
                if used > *limit {
                    return Err(NetworkError::bad(format!(
                        "Quota limit {limit} for {resource} must be greater than or equal to already used {used}"
                    )));
                }
            }
        }
        self.quota_table()
            .upsert(project, BTreeMap::new, |o| {
                o.extend(changes.clone());
                Ok::<(), NetworkError>(())
            })
            .await?;
        self.limits(project).await
    }

    /// Drops the project's overrides: it is back on the defaults.
    pub async fn reset_quotas(&self, caller: &Caller, project: &str) -> NetResult<()> {
        if !caller.admin {
            return Err(NetworkError::policy("delete_quota"));
        }
        self.quota_table().delete(project).await?;
        Ok(())
    }

    /// Every project with overrides, with its limits (admins only), as `GET /v2.0/quotas`.
    pub async fn projects_with_quotas(
        &self,
        caller: &Caller,
    ) -> NetResult<Vec<(String, BTreeMap<String, i64>)>> {
        if !caller.admin {
            return Err(NetworkError::policy("get_quota"));
        }
        self.barrier().await?;
        let mut out = Vec::new();
        for (project, _) in self.quota_table().list("").await?.rows {
            let limits = self.limits(&project).await?;
            out.push((project, limits));
        }
        Ok(out)
    }

    /// Commits the create of one `resource` for `project` while the project stays within its
    /// limit; `OverQuota` (409, as Neutron answers) otherwise. The response tells whether one
    /// of `txn`'s own preconditions failed.
    pub(crate) async fn create_within_quota(
        &self,
        project: &str,
        resource: &'static str,
        txn: Txn,
    ) -> NetResult<TxnResponse> {
        let limit = self
            .limits(project)
            .await?
            .get(resource)
            .copied()
            .unwrap_or(-1);
        let count = || self.used(project, resource);
        match commit_within_quota::<_, _, NetworkError>(
            &self.state,
            &guard_key(project, resource),
            limit,
            count,
            txn,
        )
        .await?
        {
            QuotaOutcome::Written(resp) => Ok(resp),
            QuotaOutcome::Over { .. } => Err(NetworkError::OverQuota { resource }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{admin, member, service};

    #[tokio::test]
    async fn limits_default_change_and_reset() {
        let s = service();
        let q = s.quotas(&member("p"), "p").await.unwrap();
        assert_eq!(q["port"], 500);
        assert_eq!(q["network"], 100);
        assert!(matches!(
            s.quotas(&member("p"), "other").await,
            Err(NetworkError::Forbidden(_))
        ));
        assert!(matches!(
            s.set_quotas(
                &member("p"),
                "p",
                BTreeMap::from([("port".into(), 1)]),
                true
            )
            .await,
            Err(NetworkError::Forbidden(_))
        ));
        let q = s
            .set_quotas(&admin(), "p", BTreeMap::from([("port".into(), 3)]), true)
            .await
            .unwrap();
        assert_eq!(q["port"], 3);
        assert!(s
            .set_quotas(&admin(), "p", BTreeMap::from([("bogus".into(), 3)]), true)
            .await
            .is_err());
        assert_eq!(s.projects_with_quotas(&admin()).await.unwrap().len(), 1);
        s.reset_quotas(&admin(), "p").await.unwrap();
        assert_eq!(s.quotas(&admin(), "p").await.unwrap()["port"], 500);
    }
}
