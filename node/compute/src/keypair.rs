//! Key pairs: a user's named SSH public keys, as Nova keeps them.
//!
//! Owns the `keypairs` table (key: `{user_id}/{name}`). A create with a public key stores it
//! after checking it: an OpenSSH line, or from microversion 2.2 an X.509 certificate. A create
//! without one generates the pair as Nova does (`generate`): a 2048-bit RSA key in OpenSSH form,
//! or a self-signed X.509 certificate; the private key is answered once and never stored.
//! Fingerprints are Nova's: the MD5 of an OpenSSH key's blob, the SHA-1 of a certificate's DER,
//! both as lowercase hex pairs joined by `:`. A user's key pairs count against its project's
//! `key_pairs` quota, race-free through `shoal_state::quota`.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use md5::{Digest, Md5};
use rsa::pkcs1::{EncodeRsaPrivateKey, LineEnding};
use rsa::pkcs8::EncodePrivateKey;
use rsa::traits::PublicKeyParts;
use rsa::RsaPrivateKey;
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
    Ok(hex_pairs(digest.as_ref()))
}

/// Bytes as lowercase hex pairs joined by `:`, the way Nova prints both fingerprints.
fn hex_pairs(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The key types a public key may have.
pub const KEY_TYPES: [&str; 5] = [
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
];

/// Checks an OpenSSH public key line (`type base64-blob [comment]`) and returns Nova's
/// fingerprint of it: the MD5 of the blob as hex pairs (what `ssh-keygen -l -E md5` prints). The blob must start with the same key type it is labelled with.
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
    Ok(hex_pairs(&Md5::digest(&blob)))
}

/// The size of the RSA keys Nova generates.
const GENERATED_RSA_BITS: usize = 2048;

/// An RSA public key as an OpenSSH line: `ssh-rsa`, the base64 of its blob (the name, then `e`
/// and `n` as SSH mpints) and `comment`.
fn openssh_rsa_line(key: &rsa::RsaPublicKey, comment: &str) -> String {
    fn string(out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        out.extend_from_slice(bytes);
    }
    fn mpint(out: &mut Vec<u8>, magnitude: &[u8]) {
        // Positive, minimal, with a zero byte before a leading high bit.
        let trimmed: Vec<u8> = magnitude.iter().copied().skip_while(|b| *b == 0).collect();
        let mut bytes = Vec::with_capacity(trimmed.len() + 1);
        if trimmed.first().is_some_and(|b| b & 0x80 != 0) {
            bytes.push(0);
        }
        bytes.extend_from_slice(&trimmed);
        string(out, &bytes);
    }
    let mut blob = Vec::new();
    string(&mut blob, b"ssh-rsa");
    mpint(&mut blob, &key.e().to_bytes_be());
    mpint(&mut blob, &key.n().to_bytes_be());
    format!("ssh-rsa {} {comment}", STANDARD.encode(blob))
}

/// A self-signed certificate for `user_id` over `key`, as Nova's `generate_winrm_x509_cert`
/// makes it: subject `CN=<user_id>`, valid for 3650 days, client authentication, and the UPN
/// `<user_id>@localhost` as a subject alternative name. Returns the certificate's PEM.
fn winrm_certificate(user_id: &str, key: &RsaPrivateKey) -> Result<String, String> {
    let failed = |e: &dyn std::fmt::Display| format!("generating the certificate failed: {e}");
    let pkcs8 = key.to_pkcs8_pem(LineEnding::LF).map_err(|e| failed(&e))?;
    let signer = rcgen::KeyPair::from_pkcs8_pem_and_sign_algo(&pkcs8, &rcgen::PKCS_RSA_SHA256)
        .map_err(|e| failed(&e))?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, user_id);
    let now =
        time::OffsetDateTime::from_unix_timestamp(now_secs() as i64).map_err(|e| failed(&e))?;
    params.not_before = now;
    params.not_after = now + time::Duration::days(3650);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    // 1.3.6.1.4.1.311.20.2.3: Microsoft's user principal name.
    params.subject_alt_names = vec![rcgen::SanType::OtherName((
        vec![1, 3, 6, 1, 4, 1, 311, 20, 2, 3],
        rcgen::OtherNameValue::Utf8String(format!("{user_id}@localhost")),
    ))];
    let mut serial = [0u8; 16];
    rand::Rng::fill(&mut rand::rng(), &mut serial[..]);
    serial[0] &= 0x7f;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    let cert = params.self_signed(&signer).map_err(|e| failed(&e))?;
    Ok(cert.pem())
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

/// A key pair Shoal generated: the record to store and its private key, which is answered once
/// and kept nowhere.
#[derive(Debug)]
pub struct Generated {
    pub keypair: Keypair,
    /// `ssh`: the RSA key in PEM (`BEGIN RSA PRIVATE KEY`, which `ssh-keygen -y` reads);
    /// `x509`: the certificate's RSA key in PKCS#8 PEM.
    pub private_key: String,
}

impl Keypair {
    /// Generates the key pair `name` of `user_id` as Nova does: `ssh` a 2048-bit RSA key whose
    /// public half is an OpenSSH line commented `Generated-by-Nova`, `x509` a self-signed
    /// certificate over a 2048-bit RSA key. Runs off the async runtime (RSA key generation takes
    /// a while).
    pub async fn generate(
        name: String,
        user_id: &str,
        key_type: KeyType,
    ) -> Result<Generated, ComputeError> {
        check_name(&name).map_err(ComputeError::BadRequest)?;
        let user = user_id.to_owned();
        let made = tokio::task::spawn_blocking(move || -> Result<(String, String), String> {
            let key = RsaPrivateKey::new(&mut rsa::rand_core::OsRng, GENERATED_RSA_BITS)
                .map_err(|e| format!("generating the key failed: {e}"))?;
            match key_type {
                KeyType::Ssh => {
                    let private = key
                        .to_pkcs1_pem(LineEnding::LF)
                        .map_err(|e| format!("encoding the key failed: {e}"))?;
                    let public = openssh_rsa_line(&key.to_public_key(), "Generated-by-Nova");
                    Ok((public, private.to_string()))
                }
                KeyType::X509 => {
                    let cert = winrm_certificate(&user, &key)?;
                    let private = key
                        .to_pkcs8_pem(LineEnding::LF)
                        .map_err(|e| format!("encoding the key failed: {e}"))?;
                    Ok((cert, private.to_string()))
                }
            }
        })
        .await
        .map_err(|e| ComputeError::Internal(format!("key generation stopped: {e}")))?
        .map_err(ComputeError::Internal)?;
        let (public_key, private_key) = made;
        let keypair =
            Self::checked(name, user_id, public_key, key_type).map_err(ComputeError::Internal)?;
        Ok(Generated {
            keypair,
            private_key,
        })
    }

    /// The record of `public_key`, fingerprinted for its type, or why the key is not one.
    fn checked(
        name: String,
        user_id: &str,
        public_key: String,
        key_type: KeyType,
    ) -> Result<Self, String> {
        let fingerprint = match key_type {
            KeyType::Ssh => fingerprint(&public_key),
            KeyType::X509 => x509_fingerprint(&public_key),
        }?;
        Ok(Self {
            name,
            user_id: user_id.to_owned(),
            public_key,
            fingerprint,
            created: now_secs(),
            key_type,
        })
    }

    /// The key pair `name` of `user_id` holding `public_key`, or what is wrong with them: the
    /// name, then the key (an OpenSSH line of a supported type, or a PEM certificate).
    pub fn new(
        name: String,
        user_id: &str,
        public_key: String,
        key_type: KeyType,
    ) -> Result<Self, ComputeError> {
        check_name(&name).map_err(ComputeError::BadRequest)?;
        Self::checked(name, user_id, public_key.trim().to_owned(), key_type)
            .map_err(ComputeError::BadRequest)
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
        // What `ssh-keygen -l -E md5` prints for this key, without its `MD5:` prefix.
        let fp = fingerprint(ED25519).unwrap();
        assert_eq!(fp.len(), 47, "{fp}");
        assert!(fp.split(':').all(|p| p.len() == 2), "{fp}");
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
    fn public_keys_are_trimmed() {
        let kp = Keypair::new("k".into(), "u", format!("  {ED25519}\n"), KeyType::Ssh).unwrap();
        assert_eq!(kp.public_key, ED25519);
    }

    #[tokio::test]
    async fn generated_ssh_pairs_are_rsa_with_nova_s_comment_and_fingerprint() {
        let g = Keypair::generate("k".into(), "u", KeyType::Ssh)
            .await
            .unwrap();
        assert!(g
            .private_key
            .starts_with("-----BEGIN RSA PRIVATE KEY-----\n"));
        let parts: Vec<&str> = g.keypair.public_key.split(' ').collect();
        assert_eq!((parts[0], parts[2]), ("ssh-rsa", "Generated-by-Nova"));
        // The public line is what the private key holds: both carry the same modulus.
        let key =
            <RsaPrivateKey as rsa::pkcs1::DecodeRsaPrivateKey>::from_pkcs1_pem(&g.private_key)
                .unwrap();
        assert_eq!(key.size() * 8, 2048);
        assert_eq!(
            openssh_rsa_line(&key.to_public_key(), "Generated-by-Nova"),
            g.keypair.public_key
        );
        assert_eq!(
            g.keypair.fingerprint,
            fingerprint(&g.keypair.public_key).unwrap()
        );
        assert!(Keypair::generate("a/b".into(), "u", KeyType::Ssh)
            .await
            .is_err());
    }

    #[tokio::test]
    async fn generated_x509_pairs_are_self_signed_certificates_for_the_user() {
        let g = Keypair::generate("k".into(), "alice", KeyType::X509)
            .await
            .unwrap();
        assert!(g.private_key.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        let (_, block) = x509_parser::pem::parse_x509_pem(g.keypair.public_key.as_bytes()).unwrap();
        let cert = block.parse_x509().unwrap();
        assert_eq!(cert.subject().to_string(), "CN=alice");
        assert_eq!(cert.issuer(), cert.subject());
        let days = (cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp())
            / 86_400;
        assert_eq!(days, 3650);
        assert_eq!(
            g.keypair.fingerprint,
            x509_fingerprint(&g.keypair.public_key).unwrap()
        );
        assert_eq!(g.keypair.key_type, KeyType::X509);
    }

    #[test]
    fn x509_certificates_are_checked_and_fingerprinted_as_nova_does() {
        let cert = rcgen::generate_simple_self_signed(vec!["k".to_owned()]).unwrap();
        let pem = cert.cert.pem();
        let kp = Keypair::new("k".into(), "u", pem.clone(), KeyType::X509).unwrap();
        let der = cert.cert.der();
        let sha1 = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, der);
        let hex: Vec<String> = sha1.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(kp.fingerprint, hex.join(":"));
        assert_eq!(kp.fingerprint.len(), 59);
        assert_eq!(kp.key_type, KeyType::X509);
        // An SSH key is not a certificate, nor is a certificate an SSH key.
        assert!(Keypair::new("k".into(), "u", ED25519.into(), KeyType::X509).is_err());
        assert!(Keypair::new("k".into(), "u", pem, KeyType::Ssh).is_err());
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
            Keypair::new(name.into(), user, ED25519.to_owned(), KeyType::Ssh).unwrap()
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
