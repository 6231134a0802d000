//! Key pairs: a user's named SSH public keys, as Nova keeps them.
//!
//! Owns the `keypairs` table (key: `{user_id}/{name}`). The `openstack` client generates a key
//! pair itself when given no public key (Nova stopped generating them in 2.92), so only public
//! keys are stored and checked: OpenSSH lines, and from microversion 2.2 X.509 certificates. The fingerprint is OpenSSH's `SHA256:` form; Nova prints an MD5
//! one, which ring does not offer. A user's key pairs count against its project's `key_pairs`
//! quota, race-free through `shoal_state::quota`.

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use base64::Engine;
use serde::{Deserialize, Serialize};
use shoal_state::quota::{commit_within_quota, QuotaOutcome};
use shoal_state::time::now_secs;
use shoal_state::{tables, Expect, State, Table, Txn};

use crate::error::ComputeError;
use crate::quota::Quotas;

/// Nova's default `key_pairs` quota, used when the caller has no project.
const DEFAULT_KEYPAIR_QUOTA: i64 = 100;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Keypair {
    pub name: String,
    pub user_id: String,
    pub public_key: String,
    pub fingerprint: String,
    /// When it was created, in seconds since the epoch.
    pub created: u64,
    /// Nova's key pair `type` (microversion 2.2): rows from before it are `ssh`.
    #[serde(default)]
    pub key_type: KeyType,
}

/// What a key pair holds: an OpenSSH public key or (from microversion 2.2) an X.509
/// certificate in PEM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyType {
    #[default]
    Ssh,
    X509,
}

impl KeyType {
    /// Nova's name for the type (`ssh`, `x509`), or what is allowed.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "ssh" => Ok(Self::Ssh),
            "x509" => Ok(Self::X509),
            other => Err(format!(
                "Invalid input for field/attribute type. Value: {}. '{}' is not one of ['ssh', 'x509']",
                other.chars().take(64).collect::<String>(),
                other.chars().take(64).collect::<String>()
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ssh => "ssh",
            Self::X509 => "x509",
        }
    }
}

/// Checks a PEM X.509 certificate and returns Nova's fingerprint of it: the SHA-1 of its DER,
/// as lowercase hex pairs joined by `:`.
pub fn x509_fingerprint(pem: &str) -> Result<String, String> {
    let invalid = || "Keypair data is invalid: failed to generate fingerprint".to_owned();
    let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|_| invalid())?;
    if block.label != "CERTIFICATE" {
        return Err(invalid());
    }
    block.parse_x509().map_err(|_| invalid())?;
    let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &block.contents);
    Ok(digest
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":"))
}

/// The key types a public key may have.
pub const KEY_TYPES: [&str; 5] = [
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
];

/// Checks an OpenSSH public key line (`type base64-blob [comment]`) and returns its
/// `SHA256:` fingerprint. The blob must start with the same key type it is labelled with.
pub fn fingerprint(line: &str) -> Result<String, String> {
    let mut parts = line.split_whitespace();
    let (Some(kind), Some(b64)) = (parts.next(), parts.next()) else {
        return Err("the public key must be an OpenSSH line: '<type> <base64> [comment]'".into());
    };
    if !KEY_TYPES.contains(&kind) {
        return Err(format!(
            "key type {kind} is not supported; use one of {}",
            KEY_TYPES.join(", ")
        ));
    }
    let blob = STANDARD
        .decode(b64)
        .map_err(|e| format!("the public key's base64 is not valid: {e}"))?;
    let inner = blob
        .get(..4)
        .map(|n| u32::from_be_bytes([n[0], n[1], n[2], n[3]]) as usize)
        .and_then(|n| blob.get(4..4 + n));
    if inner != Some(kind.as_bytes()) {
        return Err(format!("the public key's data is not a {kind} key"));
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, &blob);
    Ok(format!(
        "SHA256:{}",
        STANDARD_NO_PAD.encode(digest.as_ref())
    ))
}

/// A key pair name as Nova's schema allows it.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_. @".contains(c));
    if ok {
        Ok(())
    } else {
        Err("key pair names are 1 to 255 of letters, digits, '-', '_', '.', '@' and spaces".into())
    }
}

impl Keypair {
    /// The key pair `name` of `user_id` holding `public_key`, or what is wrong with them: the
    /// name, then the key (required, an OpenSSH line of a supported type).
    pub fn new(
        name: String,
        user_id: &str,
        public_key: Option<String>,
        key_type: KeyType,
    ) -> Result<Self, ComputeError> {
        check_name(&name).map_err(ComputeError::BadRequest)?;
        let public_key = public_key.ok_or_else(|| {
            ComputeError::BadRequest(
                "public_key is required: Shoal does not generate key pairs (the openstack client does)"
                    .into(),
            )
        })?;
        let public_key = public_key.trim().to_owned();
        let fingerprint = match key_type {
            KeyType::Ssh => fingerprint(&public_key),
            KeyType::X509 => x509_fingerprint(&public_key),
        }
        .map_err(ComputeError::BadRequest)?;
        Ok(Self {
            name,
            user_id: user_id.to_owned(),
            public_key,
            fingerprint,
            created: now_secs(),
            key_type,
        })
    }
}

/// The row key of `user`'s key pair `name`.
fn key(user: &str, name: &str) -> String {
    format!("{user}/{name}")
}

/// The key pair rows.
#[derive(Debug, Clone)]
pub struct Keypairs {
    state: State,
    table: Table<Keypair>,
}

impl Keypairs {
    pub fn new(state: &State) -> Self {
        Self {
            state: state.clone(),
            table: state.table(tables::KEYPAIRS),
        }
    }

    /// Creates `kp` if its name is new for its user and the user holds fewer key pairs than
    /// `project`'s `key_pairs` quota (Nova counts them per user; Nova's default without a
    /// project).
    pub async fn create(&self, kp: &Keypair, project: Option<&str>) -> Result<(), ComputeError> {
        let quota = match project {
            Some(p) => Quotas::new(&self.state).limit(p, "key_pairs").await?,
            None => DEFAULT_KEYPAIR_QUOTA,
        };
        let prefix = format!("{}/", kp.user_id);
        let row = key(&kp.user_id, &kp.name);
        let txn = Txn::new().when(tables::KEYPAIRS, &row, Expect::Absent).put(
            tables::KEYPAIRS,
            &row,
            self.table.encode(kp),
        );
        let count = || async {
            let held = self
                .state
                .store()
                .list(tables::KEYPAIRS, &prefix, usize::MAX);
            let (rows, _) = held
                .await
                .map_err(|e| shoal_state::StateError::from_cluster(tables::KEYPAIRS, &prefix, e))?;
            Ok::<_, ComputeError>(rows.len() as i64)
        };
        let guard = format!("key_pairs/{}", kp.user_id);
        match commit_within_quota(&self.state, &guard, quota, count, txn).await? {
            QuotaOutcome::Written(resp) if resp.succeeded => Ok(()),
            QuotaOutcome::Written(_) => Err(ComputeError::Conflict(format!(
                "key pair {} already exists",
                kp.name
            ))),
            QuotaOutcome::Over { held } => Err(ComputeError::OverQuota(format!(
                "quota exceeded: you hold {held} of {quota} key pairs"
            ))),
        }
    }

    /// `user`'s key pairs in name order, read after a barrier.
    pub async fn of_user(&self, user: &str) -> Result<Vec<Keypair>, ComputeError> {
        self.state.read_barrier().await?;
        Ok(self
            .table
            .list(&format!("{user}/"))
            .await?
            .into_values()
            .collect())
    }

    /// `user`'s key pair `name`, read after a barrier.
    pub async fn get(&self, user: &str, name: &str) -> Result<Keypair, ComputeError> {
        self.state.read_barrier().await?;
        self.table
            .get(&key(user, name))
            .await?
            .map(|v| v.value)
            .ok_or_else(|| ComputeError::NotFound(format!("keypair {name} not found")))
    }

    /// Deletes `user`'s key pair `name`.
    pub async fn delete(&self, user: &str, name: &str) -> Result<(), ComputeError> {
        if self.table.delete(&key(user, name)).await? {
            Ok(())
        } else {
            Err(ComputeError::NotFound(format!("keypair {name} not found")))
        }
    }

    /// The public key of `user`'s key pair `name`, if it exists (a server's `key_name`).
    pub async fn public_key(&self, user: &str, name: &str) -> Result<Option<String>, ComputeError> {
        Ok(self
            .table
            .get(&key(user, name))
            .await?
            .map(|v| v.value.public_key))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    const ED25519: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZGhscHR4f me@host";

    #[test]
    fn openssh_keys_are_checked() {
        let fp = fingerprint(ED25519).unwrap();
        assert!(fp.starts_with("SHA256:"), "{fp}");
        assert_eq!(fp.len(), "SHA256:".len() + 43);
        // Labelled as RSA but holding an ed25519 blob.
        let relabelled = ED25519.replacen("ssh-ed25519", "ssh-rsa", 1);
        assert!(fingerprint(&relabelled)
            .unwrap_err()
            .contains("not a ssh-rsa key"));
        assert!(fingerprint("ssh-dss AAAA").is_err());
        assert!(fingerprint("ssh-ed25519 !!!").is_err());
        assert!(fingerprint("").is_err());
    }

    #[test]
    fn key_pair_names() {
        assert!(check_name("my-key_1.pub").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a/b").is_err());
    }

    #[test]
    fn a_key_pair_needs_a_public_key() {
        let err = Keypair::new("k".into(), "u", None, KeyType::Ssh).unwrap_err();
        assert!(matches!(err, ComputeError::BadRequest(m) if m.contains("public_key is required")));
        let kp = Keypair::new(
            "k".into(),
            "u",
            Some(format!("  {ED25519}\n")),
            KeyType::Ssh,
        )
        .unwrap();
        assert_eq!(kp.public_key, ED25519);
    }

    #[test]
    fn x509_certificates_are_checked_and_fingerprinted_as_nova_does() {
        let cert = rcgen::generate_simple_self_signed(vec!["k".to_owned()]).unwrap();
        let pem = cert.cert.pem();
        let kp = Keypair::new("k".into(), "u", Some(pem.clone()), KeyType::X509).unwrap();
        let der = cert.cert.der();
        let sha1 = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, der);
        let hex: Vec<String> = sha1.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(kp.fingerprint, hex.join(":"));
        assert_eq!(kp.fingerprint.len(), 59);
        assert_eq!(kp.key_type, KeyType::X509);
        // An SSH key is not a certificate, nor is a certificate an SSH key.
        assert!(Keypair::new("k".into(), "u", Some(ED25519.into()), KeyType::X509).is_err());
        assert!(Keypair::new("k".into(), "u", Some(pem), KeyType::Ssh).is_err());
        assert_eq!(KeyType::parse("x509"), Ok(KeyType::X509));
        assert!(KeyType::parse("rsa")
            .unwrap_err()
            .contains("['ssh', 'x509']"));
    }

    #[test]
    fn rows_from_before_types_are_ssh() {
        let row = r#"{"name":"k","user_id":"u","public_key":"x","fingerprint":"f","created":1}"#;
        let kp: Keypair = serde_json::from_str(row).unwrap();
        assert_eq!(kp.key_type, KeyType::Ssh);
    }

    #[tokio::test]
    async fn names_are_unique_per_user_and_the_quota_bounds_them() {
        let state = State::in_memory();
        let keys = Keypairs::new(&state);
        Quotas::new(&state)
            .update_project("p", &BTreeMap::from([("key_pairs".to_owned(), 2)]))
            .await
            .unwrap();
        let kp = |name: &str, user: &str| {
            Keypair::new(name.into(), user, Some(ED25519.to_owned()), KeyType::Ssh).unwrap()
        };
        keys.create(&kp("a", "u"), Some("p")).await.unwrap();
        assert!(matches!(
            keys.create(&kp("a", "u"), Some("p")).await,
            Err(ComputeError::Conflict(m)) if m == "key pair a already exists"
        ));
        // Another user may use the name.
        keys.create(&kp("a", "v"), Some("p")).await.unwrap();
        keys.create(&kp("b", "u"), Some("p")).await.unwrap();
        assert!(matches!(
            keys.create(&kp("c", "u"), Some("p")).await,
            Err(ComputeError::OverQuota(m)) if m == "quota exceeded: you hold 2 of 2 key pairs"
        ));
        let names: Vec<String> = keys
            .of_user("u")
            .await
            .unwrap()
            .into_iter()
            .map(|k| k.name)
            .collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(
            keys.public_key("v", "a").await.unwrap().as_deref(),
            Some(ED25519)
        );
        keys.delete("u", "a").await.unwrap();
        assert!(matches!(
            keys.delete("u", "a").await,
            Err(ComputeError::NotFound(_))
        ));
        assert!(matches!(
            keys.get("u", "a").await,
            Err(ComputeError::NotFound(_))
        ));
        assert_eq!(keys.public_key("u", "a").await.unwrap(), None);
        // A freed slot takes a new key pair.
        keys.create(&kp("c", "u"), Some("p")).await.unwrap();
    }
}
