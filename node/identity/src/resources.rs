//! Creating, listing and deleting projects, users and role assignments.
//!
//! Every write is one Raft transaction that also maintains the name index with an `Absent`
//! precondition, so a name stays unique per domain even when two nodes create it at once.

use shoal_consensus::cluster::ClusterError;
use shoal_state::tables;
use shoal_types::{Expect, Txn};

use super::revoke::Revoked;
use super::{json, name_key, new_id, parse, password, Domain, Identity, Project, Role, User};

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
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

/// What a user may change about a user record; `None` leaves a field as it is.
#[derive(Debug, Default)]
pub struct UserUpdate {
    pub name: Option<String>,
    pub password: Option<String>,
    pub enabled: Option<bool>,
    /// `Some(None)` clears the default project.
    pub default_project_id: Option<Option<String>>,
    /// Extra attributes to set; a `null` value removes one.
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// What may change about a project; `None` leaves a field as it is.
#[derive(Debug, Default)]
pub struct ProjectUpdate {
    pub name: Option<String>,
    pub description: Option<String>,
    pub enabled: Option<bool>,
    /// Replaces every tag.
    pub tags: Option<Vec<String>>,
    /// Adds one tag (applied to the record as read in the transaction, so concurrent tag
    /// changes do not overwrite each other).
    pub add_tag: Option<String>,
    /// Removes one tag; the update answers `NotFound` when the project does not have it.
    pub remove_tag: Option<String>,
}

/// A record's name change, for [`Identity::write_renaming`].
struct Rename<'a> {
    kind: &'static str,
    /// The name index table.
    index: &'static str,
    id: &'a str,
    domain_id: &'a str,
    old: &'a str,
    new: &'a str,
}

/// Most tags a project may carry, as in Keystone.
pub const MAX_PROJECT_TAGS: usize = 80;

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
        self.list_all(tables::DOMAINS).await
    }

    pub async fn get_domain(&self, id: &str) -> Result<Option<(Domain, u64)>, ClusterError> {
        self.cluster
            .get(tables::DOMAINS, id)
            .await?
            .map(|r| Ok((parse(tables::DOMAINS, &r.value)?, r.mod_revision)))
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
            .when(tables::DOMAIN_NAMES, name, Expect::Absent)
            .put(tables::DOMAINS, &domain.id, json(&domain))
            .put(tables::DOMAIN_NAMES, name, domain.id.as_bytes().to_vec());
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
        let mut txn = Txn::new()
            .when(tables::DOMAINS, id, Expect::Revision(rev))
            .put(tables::DOMAINS, id, json(&new));
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
                .when(tables::DOMAIN_NAMES, &new.name, Expect::Absent)
                .delete(tables::DOMAIN_NAMES, &old.name)
                .put(tables::DOMAIN_NAMES, &new.name, id.as_bytes().to_vec());
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
            .when(tables::DOMAINS, id, Expect::Revision(rev))
            .delete(tables::DOMAINS, id)
            .delete(tables::DOMAIN_NAMES, &d.name);
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
        tags: Vec<String>,
    ) -> Result<Project, ResourceError> {
        let project = Project {
            id: new_id(),
            name: name.to_owned(),
            domain_id: domain_id.to_owned(),
            description: description.to_owned(),
            enabled,
            tags,
        };
        let index = name_key(domain_id, name);
        let txn = Txn::new()
            .when(tables::PROJECT_NAMES, &index, Expect::Absent)
            .put(tables::PROJECTS, &project.id, json(&project))
            .put(
                tables::PROJECT_NAMES,
                &index,
                project.id.as_bytes().to_vec(),
            );
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
        self.list_all(tables::PROJECTS).await
    }

    /// Deletes the project, its name and every role assignment on it.
    pub async fn delete_project(&self, id: &str) -> Result<(), ResourceError> {
        let row = self
            .cluster
            .get(tables::PROJECTS, id)
            .await?
            .ok_or_else(|| ResourceError::NotFound {
                kind: "project",
                id: id.to_owned(),
            })?;
        let project: Project = parse(tables::PROJECTS, &row.value)?;
        let mut txn = Txn::new()
            .when(tables::PROJECTS, id, Expect::Revision(row.mod_revision))
            .delete(tables::PROJECTS, id)
            .delete(
                tables::PROJECT_NAMES,
                &name_key(&project.domain_id, &project.name),
            );
        for (key, _) in self
            .cluster
            .list(tables::ASSIGNMENTS, &format!("{id}/"), usize::MAX)
            .await?
        {
            txn = txn.delete(tables::ASSIGNMENTS, &key);
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
        extra: serde_json::Map<String, serde_json::Value>,
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
            extra,
        };
        let index = name_key(domain_id, name);
        let txn = Txn::new()
            .when(tables::USER_NAMES, &index, Expect::Absent)
            .put(tables::USERS, &user.id, json(&user))
            .put(tables::USER_NAMES, &index, user.id.as_bytes().to_vec());
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
        self.list_all(tables::USERS).await
    }

    /// Deletes the user, its name and every role assignment it holds.
    pub async fn delete_user(&self, id: &str) -> Result<(), ResourceError> {
        let row =
            self.cluster
                .get(tables::USERS, id)
                .await?
                .ok_or_else(|| ResourceError::NotFound {
                    kind: "user",
                    id: id.to_owned(),
                })?;
        let user: User = parse(tables::USERS, &row.value)?;
        let mut txn = Txn::new()
            .when(tables::USERS, id, Expect::Revision(row.mod_revision))
            .delete(tables::USERS, id)
            .delete(tables::USER_NAMES, &name_key(&user.domain_id, &user.name));
        for a in self.list_assignments().await? {
            if a.user_id == id {
                txn = txn.delete(tables::ASSIGNMENTS, &a.key());
            }
        }
        for (key, _) in self
            .cluster
            .list(tables::SYSTEM_ASSIGNMENTS, &format!("{id}/"), usize::MAX)
            .await?
        {
            txn = txn.delete(tables::SYSTEM_ASSIGNMENTS, &key);
        }
        let revoked = [Revoked::User {
            user_id: id.to_owned(),
        }];
        if !self.write_revoking(txn, &revoked).await? {
            return Err(ResourceError::Raced);
        }
        Ok(())
    }

    /// Changes a user. Disabling the user or changing its password ends its tokens, as
    /// Keystone does.
    pub async fn update_user(&self, id: &str, u: UserUpdate) -> Result<User, ResourceError> {
        let row =
            self.cluster
                .get(tables::USERS, id)
                .await?
                .ok_or_else(|| ResourceError::NotFound {
                    kind: "user",
                    id: id.to_owned(),
                })?;
        let old: User = parse(tables::USERS, &row.value)?;
        let mut new = old.clone();
        if let Some(n) = u.name {
            new.name = n;
        }
        if let Some(e) = u.enabled {
            new.enabled = e;
        }
        if let Some(d) = u.default_project_id {
            new.default_project_id = d;
        }
        for (k, v) in u.extra {
            if v.is_null() {
                new.extra.remove(&k);
            } else {
                new.extra.insert(k, v);
            }
        }
        let password_changed = u.password.is_some();
        if let Some(p) = u.password {
            new.password_hash = password::hash_async(&p).await?;
        }
        let txn = Txn::new()
            .when(tables::USERS, id, Expect::Revision(row.mod_revision))
            .put(tables::USERS, id, json(&new));
        let revoked: &[Revoked] = if (old.enabled && !new.enabled) || password_changed {
            &[Revoked::User {
                user_id: id.to_owned(),
            }]
        } else {
            &[]
        };
        let rename = Rename {
            kind: "user",
            index: tables::USER_NAMES,
            id,
            domain_id: &new.domain_id,
            old: &old.name,
            new: &new.name,
        };
        self.write_renaming(txn, rename, revoked).await?;
        Ok(new)
    }

    /// Changes a project's name, description or enabled flag. Disabling it ends the tokens
    /// scoped to it.
    pub async fn update_project(
        &self,
        id: &str,
        u: ProjectUpdate,
    ) -> Result<Project, ResourceError> {
        let row = self
            .cluster
            .get(tables::PROJECTS, id)
            .await?
            .ok_or_else(|| ResourceError::NotFound {
                kind: "project",
                id: id.to_owned(),
            })?;
        let old: Project = parse(tables::PROJECTS, &row.value)?;
        let mut new = old.clone();
        if let Some(n) = u.name {
            new.name = n;
        }
        if let Some(d) = u.description {
            new.description = d;
        }
        if let Some(e) = u.enabled {
            new.enabled = e;
        }
        if let Some(t) = u.tags {
            new.tags = t;
        }
        if let Some(t) = u.add_tag {
            if !new.tags.contains(&t) {
                new.tags.push(t);
            }
        }
        if let Some(t) = u.remove_tag {
            let before = new.tags.len();
            new.tags.retain(|x| *x != t);
            if new.tags.len() == before {
                return Err(ResourceError::NotFound {
                    kind: "project tag",
                    id: t,
                });
            }
        }
        if new.tags.len() > MAX_PROJECT_TAGS {
            return Err(ResourceError::Invalid(format!(
                "a project may have at most {MAX_PROJECT_TAGS} tags"
            )));
        }
        let txn = Txn::new()
            .when(tables::PROJECTS, id, Expect::Revision(row.mod_revision))
            .put(tables::PROJECTS, id, json(&new));
        let revoked: &[Revoked] = if old.enabled && !new.enabled {
            &[Revoked::Project {
                project_id: id.to_owned(),
            }]
        } else {
            &[]
        };
        let rename = Rename {
            kind: "project",
            index: tables::PROJECT_NAMES,
            id,
            domain_id: &new.domain_id,
            old: &old.name,
            new: &new.name,
        };
        self.write_renaming(txn, rename, revoked).await?;
        Ok(new)
    }

    /// Writes an update of a record named per domain: when the name changed, the name index
    /// row moves in the same transaction, refused if the new name is taken.
    async fn write_renaming(
        &self,
        mut txn: Txn,
        r: Rename<'_>,
        revoked: &[Revoked],
    ) -> Result<(), ResourceError> {
        let renamed = r.old != r.new;
        if renamed {
            let index = name_key(r.domain_id, r.new);
            txn = txn
                .when(r.index, &index, Expect::Absent)
                .delete(r.index, &name_key(r.domain_id, r.old))
                .put(r.index, &index, r.id.as_bytes().to_vec());
        }
        if self.write_revoking(txn, revoked).await? {
            return Ok(());
        }
        Err(if renamed {
            ResourceError::NameTaken {
                kind: r.kind,
                name: r.new.to_owned(),
                domain_id: r.domain_id.to_owned(),
            }
        } else {
            ResourceError::Raced
        })
    }

    /// Creates a role; role names are unique across the cluster.
    pub async fn create_role(
        &self,
        name: &str,
        description: Option<String>,
    ) -> Result<Role, ResourceError> {
        let role = Role {
            id: new_id(),
            name: name.to_owned(),
            description,
        };
        let txn = Txn::new()
            .when(tables::ROLE_NAMES, name, Expect::Absent)
            .put(tables::ROLES, &role.id, json(&role))
            .put(tables::ROLE_NAMES, name, role.id.as_bytes().to_vec());
        if !self.cluster.write(txn).await?.succeeded {
            return Err(ResourceError::NameTaken {
                kind: "role",
                name: name.to_owned(),
                domain_id: "(all)".to_owned(),
            });
        }
        Ok(role)
    }

    /// Changes a role's name or description. Tokens carry role names, so a rename ends the
    /// tokens of the role's holders.
    pub async fn update_role(
        &self,
        id: &str,
        name: Option<&str>,
        description: Option<String>,
    ) -> Result<Role, ResourceError> {
        let row =
            self.cluster
                .get(tables::ROLES, id)
                .await?
                .ok_or_else(|| ResourceError::NotFound {
                    kind: "role",
                    id: id.to_owned(),
                })?;
        let old: Role = parse(tables::ROLES, &row.value)?;
        let mut new = old.clone();
        if description.is_some() {
            new.description = description;
        }
        let mut txn = Txn::new().when(tables::ROLES, id, Expect::Revision(row.mod_revision));
        let mut revoked = Vec::new();
        if let Some(name) = name.filter(|n| *n != old.name) {
            if crate::BUILTIN_ROLES.contains(&old.name.as_str()) {
                return Err(ResourceError::Refused(format!(
                    "the built-in role {} may not be renamed",
                    old.name
                )));
            }
            new.name = name.to_owned();
            txn = txn
                .when(tables::ROLE_NAMES, name, Expect::Absent)
                .delete(tables::ROLE_NAMES, &old.name)
                .put(tables::ROLE_NAMES, name, id.as_bytes().to_vec());
            revoked = self.holders_of(id).await?;
        }
        txn = txn.put(tables::ROLES, id, json(&new));
        if !self.write_revoking(txn, &revoked).await? {
            if new.name != old.name {
                return Err(ResourceError::NameTaken {
                    kind: "role",
                    name: new.name,
                    domain_id: "(all)".to_owned(),
                });
            }
            return Err(ResourceError::Raced);
        }
        Ok(new)
    }

    /// The revocations that end every token carrying the role.
    async fn holders_of(&self, role_id: &str) -> Result<Vec<Revoked>, ClusterError> {
        let mut revoked: Vec<Revoked> = self
            .list_assignments()
            .await?
            .into_iter()
            .filter(|a| a.role_id == role_id)
            .map(|a| Revoked::Grant {
                user_id: a.user_id,
                project_id: a.project_id,
            })
            .collect();
        revoked.extend(
            self.list_system_assignments()
                .await?
                .into_iter()
                .filter(|(_, r)| r == role_id)
                .map(|(user_id, _)| Revoked::System { user_id }),
        );
        revoked.dedup();
        Ok(revoked)
    }

    /// Deletes a role and every assignment of it; the tokens that carried it end.
    pub async fn delete_role(&self, id: &str) -> Result<(), ResourceError> {
        let row =
            self.cluster
                .get(tables::ROLES, id)
                .await?
                .ok_or_else(|| ResourceError::NotFound {
                    kind: "role",
                    id: id.to_owned(),
                })?;
        let role: Role = parse(tables::ROLES, &row.value)?;
        if crate::BUILTIN_ROLES.contains(&role.name.as_str()) {
            return Err(ResourceError::Refused(format!(
                "the built-in role {} may not be deleted",
                role.name
            )));
        }
        let mut txn = Txn::new()
            .when(tables::ROLES, id, Expect::Revision(row.mod_revision))
            .delete(tables::ROLES, id)
            .delete(tables::ROLE_NAMES, &role.name);
        for a in self.list_assignments().await? {
            if a.role_id == id {
                txn = txn.delete(tables::ASSIGNMENTS, &a.key());
            }
        }
        for (user_id, role_id) in self.list_system_assignments().await? {
            if role_id == id {
                txn = txn.delete(tables::SYSTEM_ASSIGNMENTS, &format!("{user_id}/{role_id}"));
            }
        }
        let revoked = self.holders_of(id).await?;
        if !self.write_revoking(txn, &revoked).await? {
            return Err(ResourceError::Raced);
        }
        Ok(())
    }

    /// Grants a role on the system; the user and role must exist when the write applies.
    pub async fn grant_system(&self, user_id: &str, role_id: &str) -> Result<(), ResourceError> {
        let txn = Txn::new()
            .when(tables::USERS, user_id, Expect::Present)
            .when(tables::ROLES, role_id, Expect::Present)
            .put(
                tables::SYSTEM_ASSIGNMENTS,
                &format!("{user_id}/{role_id}"),
                Vec::new(),
            );
        let resp = self.cluster.write(txn).await?;
        if resp.succeeded {
            return Ok(());
        }
        let (kind, id) = match resp.failed_precondition {
            Some(0) => ("user", user_id),
            _ => ("role", role_id),
        };
        Err(ResourceError::NotFound {
            kind,
            id: id.to_owned(),
        })
    }

    /// Removes a role on the system; the user's system-scoped tokens end.
    pub async fn revoke_system(&self, user_id: &str, role_id: &str) -> Result<(), ResourceError> {
        let key = format!("{user_id}/{role_id}");
        let txn = Txn::new()
            .when(tables::SYSTEM_ASSIGNMENTS, &key, Expect::Present)
            .delete(tables::SYSTEM_ASSIGNMENTS, &key);
        let revoked = [Revoked::System {
            user_id: user_id.to_owned(),
        }];
        if !self.write_revoking(txn, &revoked).await? {
            return Err(ResourceError::NotFound {
                kind: "role assignment",
                id: format!("system/{key}"),
            });
        }
        Ok(())
    }

    /// `(user_id, role_id)` of every role assignment on the system.
    pub async fn list_system_assignments(&self) -> Result<Vec<(String, String)>, ClusterError> {
        Ok(self
            .cluster
            .list(tables::SYSTEM_ASSIGNMENTS, "", usize::MAX)
            .await?
            .into_iter()
            .filter_map(|(key, _)| {
                let (u, r) = key.split_once('/')?;
                Some((u.to_owned(), r.to_owned()))
            })
            .collect())
    }

    pub async fn list_roles(&self) -> Result<Vec<Role>, ClusterError> {
        self.list_all(tables::ROLES).await
    }

    pub async fn get_role(&self, id: &str) -> Result<Option<Role>, ClusterError> {
        self.cluster
            .get(tables::ROLES, id)
            .await?
            .map(|r| parse(tables::ROLES, &r.value))
            .transpose()
    }

    /// Grants a role; the project, user and role must exist when the write applies.
    pub async fn grant(&self, a: &Assignment) -> Result<(), ResourceError> {
        let txn = Txn::new()
            .when(tables::PROJECTS, &a.project_id, Expect::Present)
            .when(tables::USERS, &a.user_id, Expect::Present)
            .when(tables::ROLES, &a.role_id, Expect::Present)
            .put(tables::ASSIGNMENTS, &a.key(), Vec::new());
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
            .when(tables::ASSIGNMENTS, &key, Expect::Present)
            .delete(tables::ASSIGNMENTS, &key);
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
        Ok(self
            .cluster
            .get(tables::ASSIGNMENTS, &a.key())
            .await?
            .is_some())
    }

    pub async fn list_assignments(&self) -> Result<Vec<Assignment>, ClusterError> {
        Ok(self
            .cluster
            .list(tables::ASSIGNMENTS, "", usize::MAX)
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
