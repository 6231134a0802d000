//! Password hashing with argon2id (PHC string format, salt included).
//!
//! argon2 takes tens of milliseconds of CPU by design. Run on the async runtime it stalls every
//! other request and Raft heartbeat of the node, so the API hashes through [`verify_async`] and
//! [`hash_async`]: on the blocking pool, at most [`HASHERS`] at once, with a bounded wait.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

pub fn hash(password: &str) -> String {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .expect("the OS random source works");
    let salt = SaltString::encode_b64(&bytes).expect("16 bytes make a valid salt");
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2 with default parameters hashes any password")
        .to_string()
}

/// Whether `password` matches the PHC string `stored`. A malformed stored hash never matches.
pub fn verify(password: &str, stored: &str) -> bool {
    match PasswordHash::new(stored) {
        Ok(parsed) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// How many passwords are hashed at once; the rest wait their turn (at most [`HASH_WAIT`]).
pub const HASHERS: usize = 2;
/// How long a request waits for a hashing slot before it is answered "busy".
pub const HASH_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

static SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(HASHERS);

/// Every hashing slot was taken for [`HASH_WAIT`].
#[derive(Debug, thiserror::Error)]
#[error("too many password checks are in progress; retry shortly")]
pub struct Busy;

async fn off_runtime<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Busy> {
    let _slot = tokio::time::timeout(HASH_WAIT, SLOTS.acquire())
        .await
        .map_err(|_| Busy)?
        .expect("the hashing semaphore is never closed");
    tokio::task::spawn_blocking(f).await.map_err(|_| Busy)
}

/// [`verify`] on the blocking pool.
pub async fn verify_async(password: &str, stored: &str) -> Result<bool, Busy> {
    let (p, h) = (password.to_owned(), stored.to_owned());
    off_runtime(move || verify(&p, &h)).await
}

/// [`hash`] on the blocking pool.
pub async fn hash_async(password: &str) -> Result<String, Busy> {
    let p = password.to_owned();
    off_runtime(move || hash(&p)).await
}

/// A random password for generated credentials: 24 characters from an unambiguous alphabet.
pub fn generate() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghjkmnpqrstuvwxyzABCDEFGHJKMNPQRSTUVWXYZ23456789";
    let mut rng = rand::rng();
    (0..24)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_verifies_only_the_right_password() {
        let h = hash("s3cret");
        assert!(h.starts_with("$argon2id$"));
        assert!(verify("s3cret", &h));
        assert!(!verify("s3cret ", &h));
        assert!(!verify("s3cret", "not-a-phc-string"));
    }

    #[test]
    fn generated_passwords_differ() {
        assert_ne!(generate(), generate());
        assert_eq!(generate().len(), 24);
    }
}
