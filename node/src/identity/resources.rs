//! Creating, listing and deleting projects, users and role assignments.
//!
//! Every write is one Raft transaction that also maintains the name index with an `Absent`
//! precondition, so a name stays unique per domain even when two nodes create it at once.

use shoal_consensus::cluster::ClusterError;
use shoal_types::{Expect, Txn};

use super::revoke::Revoked;
use super::{
    json, name_key, new_id, parse, password, Domain, Identity, Project, Role, User, T_ASSIGNMENTS,
    T_DOMAINS, T_DOMAIN_NAMES, T_PROJECTS, T_PROJECT_NAMES, T_ROLES, T_USERS, T_USER_NAMES,
};

/// Why an identity write was refused.
#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    #[error("{kind} {name} already exists in domain {domain_id}")]
    NameTaken {
        kind: &'static str,
        name: String,
        domain_id: String,
    },
    #[error("could not find {kind} {id}")]
    NotFound { kind: &'static str, id: String },
    #[error("the request changed concurrently with another; retry it")]
    Raced,
    #[error(transparent)]
    Busy(#[from] password::Busy),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    InUse(String),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

/// One `project/user/role` row of `role_assignments`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub project_id: String,
    pub user_id: String,
    pub role_id: String,
}

impl Assignment {
    fn key(&self) -> String {
        format!("{}/{}/{}", self.project_id, self.user_id, self.role_id)
    }

    fn from_key(key: &str) -> Option<Self> {
        let mut parts = key.splitn(3, '/');
        Some(Self {
            project_id: parts.next()?.to_owned(),
            user_id: parts.next()?.to_owned(),
            role_id: parts.next()?.to_owned(),
        })
    }
}

impl Identity {
    /// Every record of an identity table, from the local replica.
    async fn list_all<T: serde::de::DeserializeOwned>(
        &self,
        table: &str,
    ) -> Result<Vec<T>, ClusterError> {
        self.cluster
            .list(table, "", usize::MAX)
            .await?
            .into_iter()
            .map(|(_, row)| parse(table, &row.value))
            .collect()
    }

    pub async fn list_domains(&self) -> Result<Vec<Domain>, ClusterError> {
        self.list_all(T_DOMAINS).await
    }

    pub async fn get_domain(&self, id: &str) -> Result<Option<(Domain, u64)>, ClusterError> {
        self.cluster
            .get(T_DOMAINS, id)
            .await?
            .map(|r| Ok((parse(T_DOMAINS, &r.value)?, r.mod_revision)))
            .transpose()
    }

    pub async fn create_domain(
        &self,
        name: &str,
        description: &str,
        enabled: bool,
    ) -> Result<Domain, ResourceError> {
        let taken = || ResourceError::NameTaken {
            kind: "domain",
            name: name.to_owned(),
            domain_id: "(all)".to_owned(),
        };
        if self.list_domains().await?.iter().any(|d| d.name == name) {
            return Err(taken());
        }
        let domain = Domain {
            id: new_id(),
            name: name.to_owned(),
            enabled,
            description: description.to_owned(),
        };
        let txn = Txn::new()
            .when(T_DOMAIN_NAMES, name, Expect::Absent)
            .put(T_DOMAINS, &domain.id, json(&domain))
            .put(T_DOMAIN_NAMES, name, domain.id.as_bytes().to_vec());
        if !self.cluster.write(txn).await?.succeeded {
            return Err(taken());
        }
        Ok(domain)
    }

    /// Changes a domain's name, description or enabled flag. Disabling it ends every token of
    /// its users and projects, as Keystone does.
    pub async fn update_domain(
        &self,
        id: &str,
        name: Option<&str>,
        description: Option<&str>,
        enabled: Option<bool>,
    ) -> Result<Domain, ResourceError> {
        let (old, rev) = self
            .get_domain(id)
            .await?
            .ok_or_else(|| ResourceError::NotFound {
                kind: "domain",
                id: id.to_owned(),
            })?;
        let mut new = old.clone();
        if let Some(n) = name {
            new.name = n.to_owned();
        }
        if let Some(d) = description {
            new.description = d.to_owned();
        }
        if let Some(e) = enabled {
            new.enabled = e;
        }
        let mut txn =
            Txn::new()
                .when(T_DOMAINS, id, Expect::Revision(rev))
                .put(T_DOMAINS, id, json(&new));
        if new.name != old.name {
            if self
                .list_domains()
                .await?
                .iter()
                .any(|d| d.name == new.name)
            {
                return Err(ResourceError::NameTaken {
                    kind: "domain",
                    name: new.name,
                    domain_id: "(all)".to_owned(),
                });
            }
            txn = txn
                .when(T_DOMAIN_NAMES, &new.name, Expect::Absent)
                .delete(T_DOMAIN_NAMES, &old.name)
                .put(T_DOMAIN_NAMES, &new.name, id.as_bytes().to_vec());
        }
        let revoked: &[Revoked] = if old.enabled && !new.enabled {
            &[Revoked::Domain {
                domain_id: id.to_owned(),
            }]
        } else {
            &[]
        };
        if !self.write_revoking(txn, revoked).await? {
            return Err(ResourceError::Raced);
        }
        Ok(new)
    }

    /// Deletes a disabled domain that holds no projects and no users.
    pub async fn delete_domain(&self, id: &str) -> Result<(), ResourceError> {
        let (d, rev) = self
            .get_domain(id)
            .await?
            .ok_or_else(|| ResourceError::NotFound {
                kind: "domain",
                id: id.to_owned(),
            })?;
        if d.enabled {
            return Err(ResourceError::Refused(format!(
                "domain {id} is enabled; disable it before deleting it"
            )));
        }
        let in_use = self
            .list_projects()
            .await?
            .iter()
            .any(|p| p.domain_id == id)
            || self.list_users().await?.iter().any(|u| u.domain_id == id);
        if in_use {
            return Err(ResourceError::InUse(format!(
                "domain {id} still holds projects or users; delete them first"
            )));
        }
        let txn = Txn::new()
            .when(T_DOMAINS, id, Expect::Revision(rev))
            .delete(T_DOMAINS, id)
            .delete(T_DOMAIN_NAMES, &d.name);
        let revoked = [Revoked::Domain {
            domain_id: id.to_owned(),
        }];
        if !self.write_revoking(txn, &revoked).await? {
            return Err(ResourceError::Raced);
        }
        Ok(())
    }

    pub async fn create_project(
        &self,
        name: &str,
        domain_id: &str,
        description: &str,
        enabled: bool,
    ) -> Result<Project, ResourceError> {
        let project = Project {
            id: new_id(),
            name: name.to_owned(),
            domain_id: domain_id.to_owned(),
            description: description.to_owned(),
            enabled,
        };
        let index = name_key(domain_id, name);
        let txn = Txn::new()
            .when(T_PROJECT_NAMES, &index, Expect::Absent)
            .put(T_PROJECTS, &project.id, json(&project))
            .put(T_PROJECT_NAMES, &index, project.id.as_bytes().to_vec());
        if !self.cluster.write(txn).await?.succeeded {
            return Err(ResourceError::NameTaken {
                kind: "project",
                name: name.to_owned(),
                domain_id: domain_id.to_owned(),
            });
        }
        Ok(project)
    }

    pub async fn list_projects(&self) -> Result<Vec<Project>, ClusterError> {
        self.list_all(T_PROJECTS).await
    }

    /// Deletes the project, its name and every role assignment on it.
    pub async fn delete_project(&self, id: &str) -> Result<(), ResourceError> {
        let row =
            self.cluster
                .get(T_PROJECTS, id)
                .await?
                .ok_or_else(|| ResourceError::NotFound {
                    kind: "project",
                    id: id.to_owned(),
                })?;
        let project: Project = parse(T_PROJECTS, &row.value)?;
        let mut txn = Txn::new()
            .when(T_PROJECTS, id, Expect::Revision(row.mod_revision))
            .delete(T_PROJECTS, id)
            .delete(
                T_PROJECT_NAMES,
                &name_key(&project.domain_id, &project.name),
            );
        for (key, _) in self
            .cluster
            .list(T_ASSIGNMENTS, &format!("{id}/"), usize::MAX)
            .await?
        {
            txn = txn.delete(T_ASSIGNMENTS, &key);
        }
        let revoked = [Revoked::Project {
            project_id: id.to_owned(),
        }];
        if !self.write_revoking(txn, &revoked).await? {
            return Err(ResourceError::Raced);
        }
        Ok(())
    }

    pub async fn create_user(
        &self,
        name: &str,
        domain_id: &str,
        password_given: Option<&str>,
        default_project_id: Option<String>,
        enabled: bool,
    ) -> Result<User, ResourceError> {
        let password_hash = match password_given {
            Some(p) => password::hash_async(p).await?,
            // A user created without a password cannot authenticate with one: the empty hash
            // never verifies.
            None => String::new(),
        };
        let user = User {
            id: new_id(),
            name: name.to_owned(),
            domain_id: domain_id.to_owned(),
            password_hash,
            enabled,
            default_project_id,
        };
        let index = name_key(domain_id, name);
        let txn = Txn::new()
            .when(T_USER_NAMES, &index, Expect::Absent)
            .put(T_USERS, &user.id, json(&user))
            .put(T_USER_NAMES, &index, user.id.as_bytes().to_vec());
        if !self.cluster.write(txn).await?.succeeded {
            return Err(ResourceError::NameTaken {
                kind: "user",
                name: name.to_owned(),
                domain_id: domain_id.to_owned(),
            });
        }
        Ok(user)
    }

    pub async fn list_users(&self) -> Result<Vec<User>, ClusterError> {
        self.list_all(T_USERS).await
    }

    /// Deletes the user, its name and every role assignment it holds.
    pub async fn delete_user(&self, id: &str) -> Result<(), ResourceError> {
        let row = self
            .cluster
            .get(T_USERS, id)
            .await?
            .ok_or_else(|| ResourceError::NotFound {
                kind: "user",
                id: id.to_owned(),
            })?;
        let user: User = parse(T_USERS, &row.value)?;
        let mut txn = Txn::new()
            .when(T_USERS, id, Expect::Revision(row.mod_revision))
            .delete(T_USERS, id)
            .delete(T_USER_NAMES, &name_key(&user.domain_id, &user.name));
        for a in self.list_assignments().await? {
            if a.user_id == id {
                txn = txn.delete(T_ASSIGNMENTS, &a.key());
            }
        }
        let revoked = [Revoked::User {
            user_id: id.to_owned(),
        }];
        if !self.write_revoking(txn, &revoked).await? {
            return Err(ResourceError::Raced);
        }
        Ok(())
    }

    pub async fn list_roles(&self) -> Result<Vec<Role>, ClusterError> {
        self.list_all(T_ROLES).await
    }

    pub async fn get_role(&self, id: &str) -> Result<Option<Role>, ClusterError> {
        self.cluster
            .get(T_ROLES, id)
            .await?
            .map(|r| parse(T_ROLES, &r.value))
            .transpose()
    }

    /// Grants a role; the project, user and role must exist when the write applies.
    pub async fn grant(&self, a: &Assignment) -> Result<(), ResourceError> {
        let txn = Txn::new()
            .when(T_PROJECTS, &a.project_id, Expect::Present)
            .when(T_USERS, &a.user_id, Expect::Present)
            .when(T_ROLES, &a.role_id, Expect::Present)
            .put(T_ASSIGNMENTS, &a.key(), Vec::new());
        let resp = self.cluster.write(txn).await?;
        if resp.succeeded {
            return Ok(());
        }
        let (kind, id) = match resp.failed_precondition {
            Some(0) => ("project", &a.project_id),
            Some(1) => ("user", &a.user_id),
            _ => ("role", &a.role_id),
        };
        Err(ResourceError::NotFound {
            kind,
            id: id.clone(),
        })
    }

    pub async fn revoke_grant(&self, a: &Assignment) -> Result<(), ResourceError> {
        let key = a.key();
        let txn = Txn::new()
            .when(T_ASSIGNMENTS, &key, Expect::Present)
            .delete(T_ASSIGNMENTS, &key);
        let revoked = [Revoked::Grant {
            user_id: a.user_id.clone(),
            project_id: a.project_id.clone(),
        }];
        if !self.write_revoking(txn, &revoked).await? {
            return Err(ResourceError::NotFound {
                kind: "role assignment",
                id: key,
            });
        }
        Ok(())
    }

    pub async fn has_grant(&self, a: &Assignment) -> Result<bool, ClusterError> {
        Ok(self.cluster.get(T_ASSIGNMENTS, &a.key()).await?.is_some())
    }

    pub async fn list_assignments(&self) -> Result<Vec<Assignment>, ClusterError> {
        Ok(self
            .cluster
            .list(T_ASSIGNMENTS, "", usize::MAX)
            .await?
            .into_iter()
            .filter_map(|(key, _)| Assignment::from_key(&key))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::Assignment;

    #[test]
    fn assignment_keys_round_trip() {
        let a = Assignment {
            project_id: "p1".into(),
            user_id: "u1".into(),
            role_id: "r1".into(),
        };
        assert_eq!(a.key(), "p1/u1/r1");
        assert_eq!(Assignment::from_key(&a.key()), Some(a));
        assert_eq!(Assignment::from_key("p1/u1"), None);
    }
}
