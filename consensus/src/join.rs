//! Join tokens.
//!
//! A token is `shoal1.<id>.<secret>.<ca-fingerprint>`. The joiner uses the fingerprint to
//! verify the cluster's certificate before it sends anything (so the secret never goes to an
//! impostor), then sends the id and secret over that TLS channel. The cluster stores only the
//! SHA-256 of the secret, in the `join_tokens` table, with an expiry; revoking deletes the
//! row. Secrets are 256 random bits, so a plain hash is enough (no password stretching).
//!
//! A token admits `uses` nodes (one by default) and records each node it admitted. The join
//! that uses it writes the node's row and the token's new use in one transaction conditioned
//! on the token row's revision, so two joins racing on the last use cannot both succeed.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Table of join tokens, keyed by token id.
pub const T_JOIN_TOKENS: &str = "join_tokens";
/// Table of cluster nodes, keyed by node name; the desired membership.
pub const T_NODES: &str = "nodes";
/// Cluster-wide settings that every node must agree on, decided at `init` (key [`K_VOTERS`]:
/// how many voters the cluster keeps, as a JSON number).
pub const T_CLUSTER: &str = "cluster";
/// The key of the voter count in [`T_CLUSTER`].
pub const K_VOTERS: &str = "voters";
/// Certificates of removed nodes, keyed by the hex SHA-256 of the leaf certificate; the value is
/// the node's name. Peer and data connections presenting one are closed.
pub const T_REVOKED_CERTS: &str = "revoked_certs";

const PREFIX: &str = "shoal1";

/// A parsed token as the joiner holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub id: String,
    pub secret: String,
    pub ca_fingerprint: String,
}

/// A token as the cluster stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    pub secret_sha256: String,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    pub expires_at: u64,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub created_by: String,
    /// How many nodes may join with it. Records made before uses existed count as single-use.
    #[serde(default = "one_use")]
    pub uses: u32,
    /// The nodes that joined with it, in order.
    #[serde(default)]
    pub used_by: Vec<TokenUse>,
}

fn one_use() -> u32 {
    1
}

/// The most nodes one token may admit.
pub const MAX_USES: u32 = 1000;

/// One node admitted by a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenUse {
    pub node: String,
    /// Seconds since the Unix epoch.
    pub at: u64,
}

/// What `token list` shows: everything but the secret's hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    pub id: String,
    pub created_at: u64,
    pub expires_at: u64,
    pub description: String,
    pub created_by: String,
    pub uses: u32,
    pub used_by: Vec<TokenUse>,
}

impl From<&TokenRecord> for TokenInfo {
    fn from(r: &TokenRecord) -> Self {
        Self {
            id: r.id.clone(),
            created_at: r.created_at,
            expires_at: r.expires_at,
            description: r.description.clone(),
            created_by: r.created_by.clone(),
            uses: r.uses,
            used_by: r.used_by.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the join token is malformed: expected shoal1.<id>.<secret>.<ca-fingerprint>")]
    Malformed,
    #[error("the join token is unknown or was revoked")]
    Unknown,
    #[error("the join token expired")]
    Expired,
    #[error("the join token secret does not match")]
    BadSecret,
    #[error("the join token was already used by {0}; create another with `shoal token create` (`--uses N` admits N nodes)")]
    UsedUp(String),
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut buf)
        .expect("the OS random source works");
    hex::encode(buf)
}

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

impl JoinToken {
    /// A new token and the record to store for it.
    pub fn generate(
        ca_fingerprint: &str,
        now: u64,
        ttl_secs: u64,
        uses: u32,
        description: String,
        created_by: String,
    ) -> (JoinToken, TokenRecord) {
        let token = JoinToken {
            id: random_hex(8),
            secret: random_hex(32),
            ca_fingerprint: ca_fingerprint.to_owned(),
        };
        let record = TokenRecord {
            id: token.id.clone(),
            secret_sha256: sha256_hex(&token.secret),
            created_at: now,
            expires_at: now + ttl_secs,
            description,
            created_by,
            uses,
            used_by: Vec::new(),
        };
        (token, record)
    }

    pub fn parse(s: &str) -> Result<JoinToken, TokenError> {
        let mut parts = s.trim().split('.');
        let (Some(PREFIX), Some(id), Some(secret), Some(fp), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(TokenError::Malformed);
        };
        let hex_ok =
            |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex_ok(id, 16) || !hex_ok(secret, 64) || !hex_ok(fp, 64) {
            return Err(TokenError::Malformed);
        }
        Ok(JoinToken {
            id: id.to_owned(),
            secret: secret.to_owned(),
            ca_fingerprint: fp.to_ascii_lowercase(),
        })
    }
}

impl std::fmt::Display for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{PREFIX}.{}.{}.{}",
            self.id, self.secret, self.ca_fingerprint
        )
    }
}

impl TokenRecord {
    /// Checks a presented secret against this record at time `now`.
    pub fn check(&self, secret: &str, now: u64) -> Result<(), TokenError> {
        if now >= self.expires_at {
            return Err(TokenError::Expired);
        }
        let given = sha256_hex(secret);
        // Compare the digests without an early exit, so timing says nothing about them.
        let (a, b) = (given.as_bytes(), self.secret_sha256.as_bytes());
        let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
        if a.len() != b.len() || diff != 0 {
            return Err(TokenError::BadSecret);
        }
        if self.used_by.len() >= self.uses as usize {
            let names: Vec<&str> = self.used_by.iter().map(|u| u.node.as_str()).collect();
            return Err(TokenError::UsedUp(names.join(", ")));
        }
        Ok(())
    }

    /// The record after `node` joined with it at `now`.
    pub fn used(&self, node: &str, now: u64) -> TokenRecord {
        let mut r = self.clone();
        r.used_by.push(TokenUse {
            node: node.to_owned(),
            at: now,
        });
        r
    }
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    #[test]
    fn token_round_trips_and_checks() {
        let (tok, rec) = JoinToken::generate(FP, 100, 60, 1, "d".into(), "admin".into());
        let parsed = JoinToken::parse(&tok.to_string()).unwrap();
        assert_eq!(parsed, tok);
        assert_eq!(rec.check(&parsed.secret, 120), Ok(()));
        assert_eq!(rec.check(&parsed.secret, 160), Err(TokenError::Expired));
        let mut forged = parsed.secret.clone();
        forged.replace_range(0..1, if forged.starts_with('0') { "1" } else { "0" });
        assert_eq!(rec.check(&forged, 120), Err(TokenError::BadSecret));
        assert!(!serde_json::to_string(&rec).unwrap().contains(&tok.secret));
    }

    /// A token admits as many nodes as its uses, then refuses every further join and names
    /// the nodes that used it; a record stored before uses existed is single-use.
    #[test]
    fn a_token_admits_its_uses_and_no_more() {
        let (tok, rec) = JoinToken::generate(FP, 100, 60, 2, "d".into(), "admin".into());
        let rec = rec.used("n2", 101);
        assert_eq!(rec.check(&tok.secret, 102), Ok(()));
        let rec = rec.used("n3", 102);
        assert_eq!(
            rec.check(&tok.secret, 103),
            Err(TokenError::UsedUp("n2, n3".into()))
        );
        let mut old = serde_json::to_value(&rec).unwrap();
        old.as_object_mut().unwrap().remove("uses");
        old["used_by"] = serde_json::json!([]);
        let old: TokenRecord = serde_json::from_value(old).unwrap();
        assert_eq!(old.uses, 1);
    }

    #[test]
    fn malformed_tokens_are_refused() {
        for bad in [
            "",
            "shoal1",
            "shoal2.0011223344556677.00.00",
            &format!("shoal1.0011223344556677.{}.{}", "zz".repeat(32), FP),
            &format!("shoal1.0011223344556677.{}.{}.extra", "00".repeat(32), FP),
        ] {
            assert_eq!(JoinToken::parse(bad), Err(TokenError::Malformed), "{bad}");
        }
    }
}
