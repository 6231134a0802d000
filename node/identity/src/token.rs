//! Signed, self-contained tokens.
//!
//! A token is `base64url(claims JSON) "." base64url(HMAC-SHA256(key, claims))`. Any node
//! validates it with the signing keys it holds in memory (replicated through Raft and kept
//! current by a watch), so validation touches neither Raft nor disk: this replaces Keystone's
//! memcached token cache. Keys carry an id (`kid`) so they can rotate: new tokens are signed
//! with the newest key, older keys keep verifying until the tokens they signed expire.
//! Revocation is a Raft write of the token's `jti`, honoured by every node's in-memory set.

use std::collections::{BTreeMap, HashSet};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::hmac;
use serde::{Deserialize, Serialize};

use super::revoke::{RevocationEvent, Revocations};

/// What a token asserts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Signing key id.
    pub kid: String,
    /// Unique token id, used for revocation.
    pub jti: String,
    pub user_id: String,
    pub user_name: String,
    pub domain_id: String,
    /// Project scope; `None` for an unscoped token.
    pub project_id: Option<String>,
    pub project_name: Option<String>,
    /// Role names in the scoped project.
    pub roles: Vec<String>,
    /// The ids of `roles`, in the same order, so a validation answers without a lookup.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub role_ids: Vec<String>,
    /// Domain of the scoped project.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_domain_id: Option<String>,
    /// Issue and expiry times, seconds since the Unix epoch.
    pub iat: u64,
    pub exp: u64,
    /// Issue time in milliseconds, for revocation events (a role removed and granted again
    /// within one second must not revoke the token issued after the grant). Absent in tokens
    /// issued before it existed.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub iat_ms: u64,
    /// Name of the node that issued the token (its catalog points there).
    pub issuer: String,
    /// A system-scoped token (`"system": {"all": true}`): `roles` are the user's roles on the
    /// system, and `project_id` is `None`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub system: bool,
    /// How the user authenticated (`password`, then `token` once exchanged for another
    /// scope). Absent in tokens issued before it existed: those were password tokens.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
}

fn is_false(v: &bool) -> bool {
    !*v
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl Claims {
    /// The authentication methods the token records, as Keystone lists them.
    pub fn auth_methods(&self) -> Vec<String> {
        if self.methods.is_empty() {
            vec!["password".to_owned()]
        } else {
            self.methods.clone()
        }
    }

    /// When the token was issued, in milliseconds since the epoch.
    pub fn issued_at_ms(&self) -> u64 {
        if self.iat_ms > 0 {
            self.iat_ms
        } else {
            self.iat.saturating_mul(1000)
        }
    }
}

/// A signing key: an id and 32 random bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigningKey {
    pub kid: String,
    /// Base64 of the secret.
    pub secret: String,
    /// Creation time, seconds since the Unix epoch.
    pub created: u64,
    /// When a newer key replaced it for signing, seconds since the Unix epoch. A superseded
    /// key only verifies, until the tokens it signed have expired and it is deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub superseded: Option<u64>,
}

impl SigningKey {
    pub fn generate(now: u64) -> Self {
        let mut secret = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
            .expect("the OS random source works");
        let mut kid = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut kid)
            .expect("the OS random source works");
        Self {
            kid: hex::encode(kid),
            secret: URL_SAFE_NO_PAD.encode(secret),
            created: now,
            superseded: None,
        }
    }

    fn hmac_key(&self) -> Option<hmac::Key> {
        let bytes = URL_SAFE_NO_PAD.decode(&self.secret).ok()?;
        Some(hmac::Key::new(hmac::HMAC_SHA256, &bytes))
    }
}

/// Why a token was refused. Callers answer 401 for all of them but [`TokenError::KeyRingBehind`],
/// which is a 503; the reason goes to the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token is not in the expected format")]
    Malformed,
    #[error("the token was signed with an unknown key")]
    UnknownKey,
    /// The key is not in this node's ring and the node could not catch up with the cluster to
    /// learn whether the cluster committed it (cut off, or no leader): the token may well be
    /// valid, so this is not a refusal of the token but a node that cannot answer yet.
    #[error(
        "this node cannot check the token now: its signing key is not known here yet and the \
         cluster could not be reached to catch up; retry, or ask another node"
    )]
    KeyRingBehind,
    #[error("the token signature does not match")]
    BadSignature,
    #[error("the token expired")]
    Expired,
    #[error("the token was revoked")]
    Revoked,
}

/// The keys and revocations a node holds in memory.
#[derive(Debug, Default, Clone)]
pub struct KeyRing {
    keys: BTreeMap<String, SigningKey>,
    revoked: HashSet<String>,
    events: Revocations,
}

impl KeyRing {
    pub fn insert_key(&mut self, key: SigningKey) {
        self.keys.insert(key.kid.clone(), key);
    }

    pub fn remove_key(&mut self, kid: &str) {
        self.keys.remove(kid);
    }

    pub fn revoke(&mut self, jti: &str) {
        self.revoked.insert(jti.to_owned());
    }

    pub fn unrevoke(&mut self, jti: &str) {
        self.revoked.remove(jti);
    }

    /// Honours a revocation event (see [`super::revoke`]) stored under `key`.
    pub fn insert_event(&mut self, key: &str, ev: &RevocationEvent) {
        self.events.insert(key, ev);
    }

    pub fn remove_event(&mut self, key: &str) {
        self.events.remove(key);
    }

    /// The key new tokens are signed with: see [`current_key`].
    pub fn current(&self) -> Option<&SigningKey> {
        current_key(self.keys.values())
    }

    pub fn sign(&self, mut claims: Claims) -> Option<String> {
        let key = self.current()?;
        claims.kid = key.kid.clone();
        let payload = serde_json::to_vec(&claims).expect("claims serialise");
        let tag = hmac::sign(&key.hmac_key()?, &payload);
        Some(format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(&payload),
            URL_SAFE_NO_PAD.encode(tag.as_ref())
        ))
    }

    pub fn verify(&self, token: &str, now: u64) -> Result<Claims, TokenError> {
        let (payload_b64, tag_b64) = token.split_once('.').ok_or(TokenError::Malformed)?;
        let payload = URL_SAFE_NO_PAD
            .decode(payload_b64)
            .map_err(|_| TokenError::Malformed)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag_b64)
            .map_err(|_| TokenError::Malformed)?;
        let claims: Claims = serde_json::from_slice(&payload).map_err(|_| TokenError::Malformed)?;
        let key = self.keys.get(&claims.kid).ok_or(TokenError::UnknownKey)?;
        let hkey = key.hmac_key().ok_or(TokenError::UnknownKey)?;
        hmac::verify(&hkey, &payload, &tag).map_err(|_| TokenError::BadSignature)?;
        if now >= claims.exp {
            return Err(TokenError::Expired);
        }
        if self.revoked.contains(&claims.jti) || self.events.revokes(&claims) {
            return Err(TokenError::Revoked);
        }
        Ok(claims)
    }
}

/// The signing key among `keys`: the newest that no rotation has superseded (creation times
/// come from different nodes' clocks, so the `superseded` mark decides first), else the newest.
pub fn current_key<'a>(keys: impl Iterator<Item = &'a SigningKey>) -> Option<&'a SigningKey> {
    keys.max_by(|a, b| {
        (a.superseded.is_none(), a.created, &a.kid).cmp(&(
            b.superseded.is_none(),
            b.created,
            &b.kid,
        ))
    })
}

pub use shoal_consensus::join::now_secs;

impl Claims {
    /// Claims of `user` scoped to project `p` with `roles`, valid from 0 to 1 (long expired, so
    /// they never pass validation): for the policy tests of the services, which change what
    /// they need with struct update syntax.
    pub fn for_test(user: &str, roles: &[&str]) -> Claims {
        Claims {
            kid: String::new(),
            jti: "j".into(),
            user_id: user.into(),
            user_name: user.into(),
            domain_id: "default".into(),
            project_id: Some("p".into()),
            project_name: Some("p".into()),
            roles: roles.iter().map(|s| s.to_string()).collect(),
            role_ids: Vec::new(),
            project_domain_id: None,
            iat: 0,
            exp: 1,
            iat_ms: 0,
            issuer: "n1".into(),
            system: false,
            methods: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: u64) -> Claims {
        Claims {
            jti: "t1".into(),
            iat: 100,
            exp,
            ..Claims::for_test("admin", &["admin"])
        }
    }

    #[test]
    fn signed_token_verifies_and_carries_claims() {
        let mut ring = KeyRing::default();
        ring.insert_key(SigningKey::generate(1));
        let t = ring.sign(claims(1000)).unwrap();
        let c = ring.verify(&t, 500).unwrap();
        assert_eq!(c.user_name, "admin");
        assert_eq!(c.roles, vec!["admin"]);
    }

    #[test]
    fn role_ids_and_project_domain_travel_in_the_token() {
        let mut ring = KeyRing::default();
        ring.insert_key(SigningKey::generate(1));
        let mut c = claims(1000);
        c.role_ids = vec!["r-admin".into()];
        c.project_domain_id = Some("default".into());
        let back = ring.verify(&ring.sign(c).unwrap(), 500).unwrap();
        assert_eq!(back.role_ids, vec!["r-admin"]);
        assert_eq!(back.project_domain_id.as_deref(), Some("default"));
    }

    #[test]
    fn tampered_expired_revoked_and_unknown_tokens_are_refused() {
        let mut ring = KeyRing::default();
        ring.insert_key(SigningKey::generate(1));
        let t = ring.sign(claims(1000)).unwrap();
        // Tamper: re-encode claims with admin role changed, keep old signature.
        let (_, sig) = t.split_once('.').unwrap();
        let mut forged = claims(1000);
        forged.kid = ring.current().unwrap().kid.clone();
        forged.user_name = "mallory".into();
        let forged = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).unwrap()),
            sig
        );
        assert_eq!(ring.verify(&forged, 500), Err(TokenError::BadSignature));
        assert_eq!(ring.verify(&t, 1000), Err(TokenError::Expired));
        assert_eq!(ring.verify("garbage", 1), Err(TokenError::Malformed));
        ring.revoke("t1");
        assert_eq!(ring.verify(&t, 500), Err(TokenError::Revoked));
        let other = KeyRing::default();
        assert_eq!(other.verify(&t, 500), Err(TokenError::UnknownKey));
    }

    /// After rotation new tokens use the new key and old tokens still verify until the old
    /// key is removed.
    #[test]
    fn rotation_keeps_old_tokens_valid_until_key_removal() {
        let mut ring = KeyRing::default();
        let k1 = SigningKey::generate(1);
        ring.insert_key(k1.clone());
        let old = ring.sign(claims(1000)).unwrap();
        let k2 = SigningKey::generate(2);
        ring.insert_key(k2.clone());
        let new = ring.sign(claims(1000)).unwrap();
        assert_eq!(ring.verify(&new, 5).unwrap().kid, k2.kid);
        assert_eq!(ring.verify(&old, 5).unwrap().kid, k1.kid);
        ring.remove_key(&k1.kid);
        assert_eq!(ring.verify(&old, 5), Err(TokenError::UnknownKey));
        assert!(ring.verify(&new, 5).is_ok());
    }

    /// A key marked superseded stops signing even when another node's clock gave the key that
    /// replaced it an earlier creation time.
    #[test]
    fn superseded_key_stops_signing_whatever_the_clocks_say() {
        let mut ring = KeyRing::default();
        let mut old = SigningKey::generate(100);
        old.superseded = Some(100);
        let new = SigningKey::generate(90);
        ring.insert_key(old);
        ring.insert_key(new.clone());
        assert_eq!(ring.current().unwrap().kid, new.kid);
        let t = ring.sign(claims(1000)).unwrap();
        assert_eq!(ring.verify(&t, 5).unwrap().kid, new.kid);
    }
}
