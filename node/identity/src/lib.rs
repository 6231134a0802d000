//! The identity service: domains, users, projects, roles, role assignments and tokens, stored in
//! Raft tables, and who may read or change them ([`policy`]).
//!
//! Owns the identity tables (`shoal_state::tables`, identity part), the signing key ring and
//! token validation, password hashing and lockout. Must never depend on the HTTP layer or on
//! another service crate; other services learn who the caller is only from a [`token::Claims`].
//!
//! Records are JSON values in tables of the replicated keyspace. Names are unique per domain
//! through index rows (`user_names`, `project_names`, `role_names`) written in the same
//! transaction as the record with an `Absent` precondition, so two nodes creating the same
//! name at once cannot both succeed. Tokens are validated from an in-memory [`KeyRing`] that a
//! watch on `signing_keys` and `revoked_tokens` keeps current; [`rotation`] replaces the
//! signing key periodically.

pub mod lockout;
pub mod password;
pub mod policy;
pub mod resources;
pub mod revoke;
pub mod rotation;
pub mod token;

use shoal_state::tables;
use std::sync::{Arc, RwLock};

use futures::StreamExt;
pub use rotation::key_lifetime_after_rotation;
use serde::{Deserialize, Serialize};
use shoal_consensus::cluster::{Cluster, ClusterError};
use shoal_types::{Expect, Txn};
use token::{Claims, KeyRing, SigningKey, TokenError};

/// A hash of a random password, checked against when the user does not exist, so that
/// unknown names cost as much time as wrong passwords.
static DUMMY_HASH: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| password::hash(&password::generate()));

/// How long a revocation waits for every reachable member to apply it before answering.
pub const PROPAGATION_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

pub const DEFAULT_DOMAIN_ID: &str = "default";
pub const DEFAULT_DOMAIN_NAME: &str = "Default";
/// Roles created at init; `admin` implies `member` implies `reader`.
pub const BUILTIN_ROLES: [&str; 3] = ["admin", "member", "reader"];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Domain {
    pub id: String,
    pub name: String,
    pub enabled: bool,
    #[serde(default)]
    pub description: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Project {
    pub id: String,
    pub name: String,
    pub domain_id: String,
    #[serde(default)]
    pub description: String,
    pub enabled: bool,
    /// Keystone's project tags: free strings, unique per project, in the order added.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub id: String,
    pub name: String,
    pub domain_id: String,
    pub password_hash: String,
    pub enabled: bool,
    #[serde(default)]
    pub default_project_id: Option<String>,
    /// Attributes Keystone keeps without interpreting them (`email`, `description`, ...),
    /// returned as given.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Role {
    pub id: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedToken {
    pub jti: String,
    pub exp: u64,
}

/// Why authentication failed; the API answers 401 without saying which part was wrong.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("user has no role on the system")]
    NoRoleOnSystem,
    #[error("the request you have made requires authentication")]
    InvalidCredentials,
    #[error("user has no role on project {0}")]
    NoRoleOnProject(String),
    #[error("could not find project {0}")]
    ProjectNotFound(String),
    #[error("no signing key is available yet; retry shortly")]
    NoSigningKey,
    #[error(transparent)]
    Busy(#[from] password::Busy),
    #[error("too many failed attempts for this user from this address; wait a minute")]
    LockedOut,
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

/// How a token request is scoped.
#[derive(Debug, Clone)]
pub enum Scope {
    Unscoped,
    ProjectName {
        name: String,
        domain_name: String,
    },
    ProjectId(String),
    /// `"system": {"all": true}`.
    System,
}

/// What an issued token is scoped to.
#[derive(Debug, Clone)]
enum Target {
    Nothing,
    Project(Project),
    System,
}

/// How long a request waits for this node's replica to catch up before a token signed by an
/// unknown key is refused.
pub const KEY_CATCH_UP: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct Identity {
    cluster: Cluster,
    ring: Arc<RwLock<KeyRing>>,
    lockout: Arc<lockout::Lockout>,
    node_name: String,
    token_ttl: u64,
}

pub fn new_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("identity records serialise")
}

fn parse<T: for<'de> Deserialize<'de>>(table: &str, bytes: &[u8]) -> Result<T, ClusterError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ClusterError::Corrupt(format!("row of table {table} is not valid: {e}")))
}

fn name_key(domain_id: &str, name: &str) -> String {
    format!("{domain_id}/{name}")
}

impl Identity {
    pub fn new(cluster: Cluster, node_name: String, token_ttl: u64) -> Self {
        Self {
            cluster,
            ring: Arc::new(RwLock::new(KeyRing::default())),
            lockout: Arc::new(lockout::Lockout::default()),
            node_name,
            token_ttl,
        }
    }

    /// Creates the default domain, the built-in roles, the admin project and user with its
    /// admin role, and the first signing key. Run once, by `init`.
    pub async fn bootstrap(&self, admin_password: &str) -> Result<(), ClusterError> {
        let mut txn = Txn::new()
            .when(tables::DOMAINS, DEFAULT_DOMAIN_ID, Expect::Absent)
            .put(
                tables::DOMAINS,
                DEFAULT_DOMAIN_ID,
                json(&Domain {
                    id: DEFAULT_DOMAIN_ID.into(),
                    name: DEFAULT_DOMAIN_NAME.into(),
                    enabled: true,
                    description: "The default domain".into(),
                }),
            );
        let mut admin_role_id = String::new();
        for name in BUILTIN_ROLES {
            let id = new_id();
            if name == "admin" {
                admin_role_id = id.clone();
            }
            txn = txn
                .put(
                    tables::ROLES,
                    &id,
                    json(&Role {
                        id: id.clone(),
                        name: name.into(),
                        description: None,
                    }),
                )
                .put(tables::ROLE_NAMES, name, id.as_bytes().to_vec());
        }
        let project = Project {
            id: new_id(),
            name: "admin".into(),
            domain_id: DEFAULT_DOMAIN_ID.into(),
            description: "Bootstrap project for initializing the cloud.".into(),
            enabled: true,
            tags: Vec::new(),
        };
        let user = User {
            id: new_id(),
            name: "admin".into(),
            domain_id: DEFAULT_DOMAIN_ID.into(),
            password_hash: password::hash(admin_password),
            enabled: true,
            default_project_id: Some(project.id.clone()),
            extra: serde_json::Map::new(),
        };
        let key = SigningKey::generate(token::now_secs());
        txn = txn
            .put(tables::PROJECTS, &project.id, json(&project))
            .put(
                tables::PROJECT_NAMES,
                &name_key(DEFAULT_DOMAIN_ID, "admin"),
                project.id.as_bytes().to_vec(),
            )
            .put(tables::USERS, &user.id, json(&user))
            .put(
                tables::USER_NAMES,
                &name_key(DEFAULT_DOMAIN_ID, "admin"),
                user.id.as_bytes().to_vec(),
            )
            .put(
                tables::ASSIGNMENTS,
                &format!("{}/{}/{}", project.id, user.id, admin_role_id),
                Vec::new(),
            )
            .put(
                tables::SYSTEM_ASSIGNMENTS,
                &format!("{}/{}", user.id, admin_role_id),
                Vec::new(),
            )
            .put(tables::SIGNING_KEYS, &key.kid, json(&key));
        let resp = self.cluster.write(txn).await?;
        if !resp.succeeded {
            return Err(ClusterError::Conflict(
                "identity is already bootstrapped".into(),
            ));
        }
        Ok(())
    }

    /// Loads keys and revocations, then follows their tables. Runs until `shutdown`.
    pub async fn run_keyring_sync(self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            let result = tokio::select! {
                _ = &mut shutdown => return,
                r = self.sync_once() => r,
            };
            if let Err(e) = result {
                tracing::warn!(error = %e, "token key ring sync restarts");
            }
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(std::time::Duration::from_millis(200)) => {}
            }
        }
    }

    async fn sync_once(&self) -> Result<(), ClusterError> {
        let rev = self.cluster.revision();
        let keys = self
            .cluster
            .list(tables::SIGNING_KEYS, "", usize::MAX)
            .await?;
        let revoked = self.cluster.list(tables::REVOKED, "", usize::MAX).await?;
        let events = self
            .cluster
            .list(tables::REVOCATION_EVENTS, "", usize::MAX)
            .await?;
        {
            let mut ring = KeyRing::default();
            for (_, row) in keys {
                ring.insert_key(parse(tables::SIGNING_KEYS, &row.value)?);
            }
            for (jti, _) in revoked {
                ring.revoke(&jti);
            }
            for (key, row) in events {
                ring.insert_event(&key, &parse(tables::REVOCATION_EVENTS, &row.value)?);
            }
            *self.ring.write().expect("key ring lock") = ring;
        }
        // A watch that cannot start (compacted, store closed) ends this round; the caller
        // lists again, which is what a compacted watch asks for.
        let lost = |e: shoal_consensus::cluster::WatchError| ClusterError::Conflict(e.to_string());
        let mut keys_watch = self
            .cluster
            .watch(tables::SIGNING_KEYS, "", rev + 1)
            .await
            .map_err(lost)?;
        let mut revoked_watch = self
            .cluster
            .watch(tables::REVOKED, "", rev + 1)
            .await
            .map_err(lost)?;
        let mut events_watch = self
            .cluster
            .watch(tables::REVOCATION_EVENTS, "", rev + 1)
            .await
            .map_err(lost)?;
        loop {
            tokio::select! {
                ev = keys_watch.next() => {
                    let Some(ev) = ev else { return Ok(()) };
                    let ev = ev.map_err(lost)?;
                    let mut ring = self.ring.write().expect("key ring lock");
                    match ev.kind {
                        shoal_types::EventKind::Put(row) => ring.insert_key(parse(tables::SIGNING_KEYS, &row.value)?),
                        shoal_types::EventKind::Delete => ring.remove_key(&ev.key),
                    }
                }
                ev = revoked_watch.next() => {
                    let Some(ev) = ev else { return Ok(()) };
                    let ev = ev.map_err(lost)?;
                    let mut ring = self.ring.write().expect("key ring lock");
                    match ev.kind {
                        shoal_types::EventKind::Put(_) => ring.revoke(&ev.key),
                        shoal_types::EventKind::Delete => ring.unrevoke(&ev.key),
                    }
                }
                ev = events_watch.next() => {
                    let Some(ev) = ev else { return Ok(()) };
                    let ev = ev.map_err(|e| ClusterError::Conflict(e.to_string()))?;
                    let mut ring = self.ring.write().expect("key ring lock");
                    match ev.kind {
                        shoal_types::EventKind::Put(row) => ring.insert_event(
                            &ev.key,
                            &parse(tables::REVOCATION_EVENTS, &row.value)?,
                        ),
                        shoal_types::EventKind::Delete => ring.remove_event(&ev.key),
                    }
                }
            }
        }
    }

    /// Validates a token from memory only.
    pub fn validate(&self, token: &str) -> Result<Claims, TokenError> {
        self.ring
            .read()
            .expect("key ring lock")
            .verify(token, token::now_secs())
    }

    /// Like [`validate`](Self::validate), but a token signed by a key this node's ring does
    /// not hold yet (a key committed elsewhere that the watch has not delivered, or a node
    /// that just restarted) is not refused at once: the node catches its replica up with a
    /// read barrier (at most [`KEY_CATCH_UP`]), loads the signing keys from it, and checks
    /// again. A key the cluster committed is therefore never the reason for a 401: if the
    /// node cannot catch up (cut off from a quorum, no leader within the wait), the answer is
    /// [`TokenError::KeyRingBehind`], for the caller to answer 503, never `UnknownKey`.
    pub async fn validate_fresh(&self, token: &str) -> Result<Claims, TokenError> {
        match self.validate(token) {
            Err(TokenError::UnknownKey) => {}
            other => return other,
        }
        let caught_up = async {
            self.cluster.read_barrier().await?;
            let keys = self
                .cluster
                .list(tables::SIGNING_KEYS, "", usize::MAX)
                .await?;
            let mut ring = self.ring.write().expect("key ring lock");
            for (_, row) in keys {
                ring.insert_key(parse(tables::SIGNING_KEYS, &row.value)?);
            }
            Ok::<_, ClusterError>(())
        };
        let caught_up = match tokio::time::timeout(KEY_CATCH_UP, caught_up).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "cannot catch up the key ring");
                false
            }
            Err(_) => {
                tracing::debug!("catching up the key ring timed out");
                false
            }
        };
        match self.validate(token) {
            // Only a replica known to be current may say the cluster never committed the key.
            Err(TokenError::UnknownKey) if !caught_up => Err(TokenError::KeyRingBehind),
            other => other,
        }
    }

    pub async fn revoke(&self, claims: &Claims) -> Result<(), ClusterError> {
        let rec = RevokedToken {
            jti: claims.jti.clone(),
            exp: claims.exp,
        };
        let resp = self
            .cluster
            .write(Txn::new().put(tables::REVOKED, &claims.jti, json(&rec)))
            .await?;
        // Honour it here at once, without waiting for the watch.
        self.ring
            .write()
            .expect("key ring lock")
            .revoke(&claims.jti);
        self.await_everywhere(resp.revision).await;
        Ok(())
    }

    /// Writes a change together with the revocation events it causes, and returns once every
    /// reachable member has applied it, so that no node accepts a revoked token after the
    /// caller was told the change is done. Returns whether the transaction's preconditions
    /// held.
    pub async fn write_revoking(
        &self,
        mut txn: Txn,
        revoked: &[revoke::Revoked],
    ) -> Result<bool, ClusterError> {
        let now = revoke::now_ms();
        for what in revoked {
            let ev = revoke::RevocationEvent::new(what.clone(), now, self.token_ttl);
            txn = txn.put(tables::REVOCATION_EVENTS, &what.key(), json(&ev));
        }
        let resp = self.cluster.write(txn).await?;
        if resp.succeeded {
            {
                let mut ring = self.ring.write().expect("key ring lock");
                for what in revoked {
                    let ev = revoke::RevocationEvent::new(what.clone(), now, self.token_ttl);
                    ring.insert_event(&what.key(), &ev);
                }
            }
            self.await_everywhere(resp.revision).await;
        }
        Ok(resp.succeeded)
    }

    /// Waits, up to [`PROPAGATION_WAIT`], until every reachable member has applied
    /// `revision`. A member that does not answer in time (down or cut off) is not waited for:
    /// it applies the revocation before it serves again after it catches up.
    async fn await_everywhere(&self, revision: u64) {
        if let Err(lagging) = self
            .cluster
            .wait_applied_everywhere(revision, PROPAGATION_WAIT)
            .await
        {
            tracing::warn!(
                revision,
                members = ?lagging,
                "a revocation was not applied by every member in time"
            );
        }
    }

    /// Deletes revocation events and revoked tokens that no valid token can match any more.
    /// Every node runs it in the maintenance loop; deletes are conditioned on the row's
    /// revision, so concurrent purges and a concurrent newer event do not conflict.
    pub async fn purge_revocations(&self) -> Result<usize, ClusterError> {
        let now = token::now_secs();
        let mut txn = Txn::new();
        let mut n = 0;
        for (key, row) in self
            .cluster
            .list(tables::REVOCATION_EVENTS, "", usize::MAX)
            .await?
        {
            let ev: revoke::RevocationEvent = parse(tables::REVOCATION_EVENTS, &row.value)?;
            if now >= ev.purge_after {
                txn = txn
                    .when(
                        tables::REVOCATION_EVENTS,
                        &key,
                        Expect::Revision(row.mod_revision),
                    )
                    .delete(tables::REVOCATION_EVENTS, &key);
                n += 1;
            }
        }
        for (key, row) in self.cluster.list(tables::REVOKED, "", usize::MAX).await? {
            let rec: RevokedToken = parse(tables::REVOKED, &row.value)?;
            if now >= rec.exp.saturating_add(revoke::CLOCK_MARGIN_SECS) {
                txn = txn
                    .when(tables::REVOKED, &key, Expect::Revision(row.mod_revision))
                    .delete(tables::REVOKED, &key);
                n += 1;
            }
        }
        if n > 0 && self.cluster.write(txn).await?.succeeded {
            tracing::info!(rows = n, "purged expired revocations");
            return Ok(n);
        }
        Ok(0)
    }

    async fn lookup_id(&self, table: &str, key: &str) -> Result<Option<String>, ClusterError> {
        Ok(self
            .cluster
            .get(table, key)
            .await?
            .map(|row| String::from_utf8_lossy(&row.value).into_owned()))
    }

    pub async fn get_user(&self, id: &str) -> Result<Option<User>, ClusterError> {
        self.cluster
            .get(tables::USERS, id)
            .await?
            .map(|r| parse(tables::USERS, &r.value))
            .transpose()
    }

    pub async fn get_project(&self, id: &str) -> Result<Option<Project>, ClusterError> {
        self.cluster
            .get(tables::PROJECTS, id)
            .await?
            .map(|r| parse(tables::PROJECTS, &r.value))
            .transpose()
    }

    async fn domain_id_by_name(&self, name: &str) -> Result<Option<String>, ClusterError> {
        for (_, row) in self.cluster.list(tables::DOMAINS, "", usize::MAX).await? {
            let d: Domain = parse(tables::DOMAINS, &row.value)?;
            if d.name == name || d.id == name {
                return Ok(Some(d.id));
            }
        }
        Ok(None)
    }

    /// Role names the user holds on the project.
    pub async fn roles_on_project(
        &self,
        user_id: &str,
        project_id: &str,
    ) -> Result<Vec<String>, ClusterError> {
        let roles = self.role_ids_on_project(user_id, project_id).await?;
        Ok(roles.into_iter().map(|(name, _)| name).collect())
    }

    /// `(name, id)` of each role the user holds on the project, by name.
    pub async fn role_ids_on_project(
        &self,
        user_id: &str,
        project_id: &str,
    ) -> Result<Vec<(String, String)>, ClusterError> {
        let mut roles = Vec::new();
        let prefix = format!("{project_id}/{user_id}/");
        for (key, _) in self
            .cluster
            .list(tables::ASSIGNMENTS, &prefix, usize::MAX)
            .await?
        {
            let role_id = &key[prefix.len()..];
            if let Some(row) = self.cluster.get(tables::ROLES, role_id).await? {
                let role: Role = parse(tables::ROLES, &row.value)?;
                roles.push((role.name, role_id.to_owned()));
            }
        }
        roles.sort();
        Ok(roles)
    }

    /// `(name, id)` of each role the user holds on the system, by name.
    pub async fn role_ids_on_system(
        &self,
        user_id: &str,
    ) -> Result<Vec<(String, String)>, ClusterError> {
        let mut roles = Vec::new();
        let prefix = format!("{user_id}/");
        for (key, _) in self
            .cluster
            .list(tables::SYSTEM_ASSIGNMENTS, &prefix, usize::MAX)
            .await?
        {
            let role_id = &key[prefix.len()..];
            if let Some(role) = self.get_role(role_id).await? {
                roles.push((role.name, role_id.to_owned()));
            }
        }
        roles.sort();
        Ok(roles)
    }

    /// Password authentication, as `POST /v3/auth/tokens` does it.
    pub async fn authenticate_password(
        &self,
        user_name: &str,
        user_domain: &str,
        password_given: &str,
        scope: &Scope,
        source: Option<std::net::IpAddr>,
    ) -> Result<(String, Claims), AuthError> {
        let who = format!("{user_domain}/{user_name}");
        let now = std::time::Instant::now();
        if !self.lockout.allows(&who, source, now) {
            return Err(AuthError::LockedOut);
        }
        let result = self
            .check_password(user_name, user_domain, password_given)
            .await;
        match &result {
            Ok(_) => self.lockout.succeeded(&who, source),
            Err(AuthError::InvalidCredentials) => self.lockout.failed(&who, source, now),
            Err(_) => {}
        }
        let user = result?;
        let target = match scope {
            // Keystone scopes a token asked for without a scope to the user's default project,
            // when the user holds a role on it.
            Scope::Unscoped => self.default_target(&user).await?,
            _ => self.resolve_scope(scope).await?,
        };
        self.issue_until(user, target, None, vec!["password".to_owned()])
            .await
    }

    /// Whether `given` is the user's password (a password change checks the old one),
    /// counted against the same lockout as logins so it cannot be used to guess instead.
    pub async fn verify_user_password(
        &self,
        user: &User,
        given: &str,
        source: Option<std::net::IpAddr>,
    ) -> Result<bool, AuthError> {
        let who = format!("{}/{}", user.domain_id, user.name);
        let now = std::time::Instant::now();
        if !self.lockout.allows(&who, source, now) {
            return Err(AuthError::LockedOut);
        }
        let ok = password::verify_async(given, &user.password_hash).await?;
        if ok {
            self.lockout.succeeded(&who, source);
        } else {
            self.lockout.failed(&who, source, now);
        }
        Ok(ok)
    }

    async fn default_target(&self, user: &User) -> Result<Target, ClusterError> {
        let Some(pid) = &user.default_project_id else {
            return Ok(Target::Nothing);
        };
        match self.get_project(pid).await? {
            Some(p) if p.enabled && !self.role_ids_on_project(&user.id, pid).await?.is_empty() => {
                Ok(Target::Project(p))
            }
            _ => Ok(Target::Nothing),
        }
    }

    /// The enabled user with this name and password. A missing user costs a hash too, so the
    /// answer's timing does not tell which names exist.
    async fn check_password(
        &self,
        user_name: &str,
        user_domain: &str,
        password_given: &str,
    ) -> Result<User, AuthError> {
        let domain_id = self
            .domain_id_by_name(user_domain)
            .await?
            .ok_or(AuthError::InvalidCredentials)?;
        let user_id = self
            .lookup_id(tables::USER_NAMES, &name_key(&domain_id, user_name))
            .await?;
        let user = match user_id {
            Some(id) => self.get_user(&id).await?,
            None => None,
        };
        let stored = match &user {
            Some(u) => u.password_hash.clone(),
            None => tokio::task::spawn_blocking(|| DUMMY_HASH.clone())
                .await
                .map_err(|_| password::Busy)?,
        };
        let matches = password::verify_async(password_given, &stored).await?;
        match user {
            Some(u) if u.enabled && matches => Ok(u),
            _ => Err(AuthError::InvalidCredentials),
        }
    }
}

impl Identity {
    /// Projects on which the user holds any role.
    pub async fn projects_of_user(&self, user_id: &str) -> Result<Vec<Project>, ClusterError> {
        let mut out = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for (key, _) in self
            .cluster
            .list(tables::ASSIGNMENTS, "", usize::MAX)
            .await?
        {
            let mut parts = key.splitn(3, '/');
            let (Some(pid), Some(uid)) = (parts.next(), parts.next()) else {
                continue;
            };
            if uid == user_id && seen.insert(pid.to_owned()) {
                if let Some(p) = self.get_project(pid).await? {
                    out.push(p);
                }
            }
        }
        Ok(out)
    }

    /// Issues a token for the same user with another scope (the `token` auth method).
    /// The new token expires when the one it came from does, as Keystone's do: a token can
    /// never be stretched by exchanging it.
    pub async fn rescope(
        &self,
        claims: &Claims,
        scope: &Scope,
    ) -> Result<(String, Claims), AuthError> {
        let user = self
            .get_user(&claims.user_id)
            .await?
            .filter(|u| u.enabled)
            .ok_or(AuthError::InvalidCredentials)?;
        let target = self.resolve_scope(scope).await?;
        let mut methods = claims.auth_methods();
        if !methods.iter().any(|m| m == "token") {
            methods.push("token".to_owned());
        }
        self.issue_until(user, target, Some(claims.exp), methods)
            .await
    }

    /// The project a token request is scoped to, if any.
    async fn resolve_scope(&self, scope: &Scope) -> Result<Target, AuthError> {
        let project = match scope {
            Scope::Unscoped => None,
            Scope::System => return Ok(Target::System),
            Scope::ProjectId(id) => Some(
                self.get_project(id)
                    .await?
                    .ok_or_else(|| AuthError::ProjectNotFound(id.clone()))?,
            ),
            Scope::ProjectName { name, domain_name } => {
                let pdomain = self
                    .domain_id_by_name(domain_name)
                    .await?
                    .ok_or_else(|| AuthError::ProjectNotFound(name.clone()))?;
                let id = self
                    .lookup_id(tables::PROJECT_NAMES, &name_key(&pdomain, name))
                    .await?
                    .ok_or_else(|| AuthError::ProjectNotFound(name.clone()))?;
                Some(
                    self.get_project(&id)
                        .await?
                        .ok_or_else(|| AuthError::ProjectNotFound(name.clone()))?,
                )
            }
        };
        Ok(project.map_or(Target::Nothing, Target::Project))
    }

    /// Issues a token that expires after the configured lifetime, or at `not_after` if that
    /// comes first.
    async fn issue_until(
        &self,
        user: User,
        target: Target,
        not_after: Option<u64>,
        methods: Vec<String>,
    ) -> Result<(String, Claims), AuthError> {
        let (roles, project, system) = match target {
            Target::Project(p) => {
                let roles = self.role_ids_on_project(&user.id, &p.id).await?;
                if roles.is_empty() {
                    return Err(AuthError::NoRoleOnProject(p.name.clone()));
                }
                (roles, Some(p), false)
            }
            Target::System => {
                let roles = self.role_ids_on_system(&user.id).await?;
                if roles.is_empty() {
                    return Err(AuthError::NoRoleOnSystem);
                }
                (roles, None, true)
            }
            Target::Nothing => (Vec::new(), None, false),
        };
        let now_ms = revoke::now_ms();
        let now = now_ms / 1000;
        let exp = (now + self.token_ttl).min(not_after.unwrap_or(u64::MAX));
        let claims = Claims {
            kid: String::new(),
            jti: new_id(),
            user_id: user.id,
            user_name: user.name,
            domain_id: user.domain_id,
            project_id: project.as_ref().map(|p| p.id.clone()),
            project_domain_id: project.as_ref().map(|p| p.domain_id.clone()),
            project_name: project.map(|p| p.name),
            role_ids: roles.iter().map(|(_, id)| id.clone()).collect(),
            roles: roles.into_iter().map(|(name, _)| name).collect(),
            iat: now,
            exp,
            iat_ms: now_ms,
            issuer: self.node_name.clone(),
            system,
            methods,
        };
        let token = self
            .ring
            .read()
            .expect("key ring lock")
            .sign(claims)
            .ok_or(AuthError::NoSigningKey)?;
        let claims = self.validate(&token).map_err(|_| AuthError::NoSigningKey)?;
        Ok((token, claims))
    }
}

/// Whether the token's roles include `role` (admin implies member implies reader).
pub fn has_role(claims: &Claims, role: &str) -> bool {
    let rank = |r: &str| match r {
        "admin" => 3,
        "member" => 2,
        "reader" => 1,
        _ => 0,
    };
    let need = rank(role);
    claims
        .roles
        .iter()
        .any(|r| r == role || (need > 0 && rank(r) >= need))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(roles: &[&str]) -> Claims {
        Claims::for_test("u", roles)
    }

    #[test]
    fn role_hierarchy() {
        assert!(has_role(&claims(&["admin"]), "member"));
        assert!(has_role(&claims(&["admin"]), "reader"));
        assert!(has_role(&claims(&["member"]), "reader"));
        assert!(!has_role(&claims(&["member"]), "admin"));
        assert!(!has_role(&claims(&["reader"]), "member"));
        assert!(!has_role(&claims(&[]), "reader"));
    }
}
