//! Signing-key rotation without a coordinator.
//!
//! Every node runs [`Identity::run_key_rotation`], which also purges expired revocations. When the signing key is older than
//! `identity.key_rotation_secs`, a node writes a new key and, in the same transaction, marks
//! the old one superseded, on the condition that the old key's row is still at the revision
//! it read. Two nodes that decide at once both propose; the first to commit changes that row,
//! so the second's precondition fails and it adopts the winner's key through the watch. No
//! leader is involved beyond Raft's own ordering.
//!
//! A superseded key keeps verifying until every token it could have signed has expired: nodes
//! may still sign with it until the superseding write reaches them, so it is deleted
//! `token_ttl + RETIRE_MARGIN_SECS` after it was superseded. The deletion too is conditioned
//! on the row's revision, so concurrent deleters do not matter.

use shoal_state::tables;
use std::time::Duration;

use rand::Rng;
use shoal_consensus::cluster::ClusterError;
use shoal_types::{Expect, Txn};

use super::token::{self, current_key, SigningKey};
use super::{json, parse, Identity};

/// Slack after a superseded key's last possible token expired, for the clock differences
/// between nodes and the delay before every node has seen the superseding write.
pub const RETIRE_MARGIN_SECS: u64 = 300;

/// How long a key stays after it was superseded, for a token lifetime of `token_ttl` seconds.
pub fn key_lifetime_after_rotation(token_ttl: u64) -> u64 {
    token_ttl + RETIRE_MARGIN_SECS
}

/// A key as stored, with the revision of its row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredKey {
    pub key: SigningKey,
    pub revision: u64,
}

/// What one round of rotation writes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// No key at all: make the first one.
    pub create_first: bool,
    /// The signing key is due: supersede it (at this revision) with a new key.
    pub rotate: Option<StoredKey>,
    /// Keys that are not the signing key but were never marked superseded (two first keys
    /// made at once): mark them, so that they retire.
    pub supersede: Vec<StoredKey>,
    /// Superseded keys whose tokens have all expired: delete them (kid, revision).
    pub retire: Vec<(String, u64)>,
}

/// Decides what to write, from the stored keys and the time. Pure, so it is tested alone.
pub fn plan(keys: &[StoredKey], now: u64, rotation_secs: u64, token_ttl: u64) -> Plan {
    let mut plan = Plan::default();
    let Some(current) = current_key(keys.iter().map(|k| &k.key)) else {
        plan.create_first = true;
        return plan;
    };
    let keep = key_lifetime_after_rotation(token_ttl);
    for k in keys {
        if k.key.kid == current.kid {
            if k.key.superseded.is_some() || now.saturating_sub(k.key.created) >= rotation_secs {
                plan.rotate = Some(k.clone());
            }
            continue;
        }
        match k.key.superseded {
            None => plan.supersede.push(k.clone()),
            Some(t) if now >= t.saturating_add(keep) => {
                plan.retire.push((k.key.kid.clone(), k.revision))
            }
            Some(_) => {}
        }
    }
    plan
}

/// The transaction that supersedes `old` (still at its revision) with `new`.
fn rotate_txn(old: &StoredKey, new: &SigningKey, now: u64) -> Txn {
    let mut marked = old.key.clone();
    marked.superseded.get_or_insert(now);
    Txn::new()
        .when(
            tables::SIGNING_KEYS,
            &old.key.kid,
            Expect::Revision(old.revision),
        )
        .put(tables::SIGNING_KEYS, &old.key.kid, json(&marked))
        .when(tables::SIGNING_KEYS, &new.kid, Expect::Absent)
        .put(tables::SIGNING_KEYS, &new.kid, json(new))
}

impl Identity {
    /// Rotates and retires signing keys until `shutdown`; every node runs this.
    pub async fn run_key_rotation(
        self,
        rotation_secs: u64,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        // Look often enough that a key is replaced within a tenth of its period past due, and
        // at least every minute; the jitter spreads the nodes' attempts.
        let period = Duration::from_secs((rotation_secs / 10).clamp(1, 60));
        tokio::pin!(shutdown);
        loop {
            let jitter = rand::rng().random_range(0..=period.as_millis() as u64 / 2);
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(period + Duration::from_millis(jitter)) => {}
            }
            if let Err(e) = self.rotate_once(rotation_secs).await {
                tracing::debug!(error = %e, "signing-key rotation round failed; retrying later");
            }
            if let Err(e) = self.purge_revocations().await {
                tracing::debug!(error = %e, "revocation purge failed; retrying later");
            }
        }
    }

    /// One round: reads the keys after a read barrier and writes what [`plan`] says. The
    /// barrier matters for a node that has just joined: its replica may not hold the keys yet,
    /// and an empty table must not make it create a first key. A write that lost to another
    /// node's only fails its precondition; the next round reads again.
    pub async fn rotate_once(&self, rotation_secs: u64) -> Result<Plan, ClusterError> {
        self.cluster.read_barrier().await?;
        let mut keys = Vec::new();
        for (_, row) in self
            .cluster
            .list(tables::SIGNING_KEYS, "", usize::MAX)
            .await?
        {
            keys.push(StoredKey {
                key: parse(tables::SIGNING_KEYS, &row.value)?,
                revision: row.mod_revision,
            });
        }
        let now = token::now_secs();
        let plan = plan(&keys, now, rotation_secs, self.token_ttl);
        if plan.create_first {
            let key = SigningKey::generate(now);
            self.cluster
                .write(Txn::new().put(tables::SIGNING_KEYS, &key.kid, json(&key)))
                .await?;
        }
        if let Some(old) = &plan.rotate {
            let new = SigningKey::generate(now);
            let resp = self.cluster.write(rotate_txn(old, &new, now)).await?;
            if resp.succeeded {
                tracing::info!(old = %old.key.kid, new = %new.kid, "rotated the token signing key");
            }
        }
        for k in &plan.supersede {
            let mut marked = k.key.clone();
            marked.superseded = Some(now);
            let txn = Txn::new()
                .when(
                    tables::SIGNING_KEYS,
                    &k.key.kid,
                    Expect::Revision(k.revision),
                )
                .put(tables::SIGNING_KEYS, &k.key.kid, json(&marked));
            self.cluster.write(txn).await?;
        }
        for (kid, revision) in &plan.retire {
            let txn = Txn::new()
                .when(tables::SIGNING_KEYS, kid, Expect::Revision(*revision))
                .delete(tables::SIGNING_KEYS, kid);
            if self.cluster.write(txn).await?.succeeded {
                tracing::info!(kid = %kid, "retired a token signing key");
            }
        }
        Ok(plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::{Claims, KeyRing, TokenError};

    const DAY: u64 = 86_400;

    fn stored(key: &SigningKey, revision: u64) -> StoredKey {
        StoredKey {
            key: key.clone(),
            revision,
        }
    }

    fn claims(iat: u64, ttl: u64) -> Claims {
        Claims {
            jti: format!("t{iat}"),
            project_id: None,
            project_name: None,
            iat,
            exp: iat + ttl,
            ..Claims::for_test("admin", &[])
        }
    }

    /// The ring as the stored keys make it.
    fn ring_of(keys: &[StoredKey]) -> KeyRing {
        let mut ring = KeyRing::default();
        for k in keys {
            ring.insert_key(k.key.clone());
        }
        ring
    }

    /// Applies a plan the way the transactions would, with made-up revisions.
    fn apply(keys: &mut Vec<StoredKey>, plan: &Plan, now: u64, rev: &mut u64) -> Option<String> {
        let mut new_kid = None;
        if let Some(old) = &plan.rotate {
            let new = SigningKey::generate(now);
            *rev += 1;
            let k = keys.iter_mut().find(|k| k.key.kid == old.key.kid).unwrap();
            k.key.superseded.get_or_insert(now);
            k.revision = *rev;
            keys.push(stored(&new, *rev));
            new_kid = Some(new.kid);
        }
        keys.retain(|k| !plan.retire.iter().any(|(kid, _)| *kid == k.key.kid));
        new_kid
    }

    /// A fresh key is left alone; a due key is replaced, the new key signs, a token signed by
    /// the old key keeps verifying until the old key retires, and after retirement the old
    /// key's tokens are refused as signed by an unknown key.
    #[test]
    fn rotation_signs_with_the_new_key_and_retires_the_old_after_its_tokens() {
        let ttl = 3600;
        let k1 = SigningKey::generate(0);
        let mut keys = vec![stored(&k1, 1)];
        let mut rev = 1;
        assert_eq!(plan(&keys, DAY - 1, DAY, ttl), Plan::default());

        let old_token = ring_of(&keys).sign(claims(DAY - 10, ttl)).unwrap();
        let now = DAY;
        let p = plan(&keys, now, DAY, ttl);
        assert_eq!(p.rotate.as_ref().unwrap().key.kid, k1.kid);
        assert_eq!(p.rotate.as_ref().unwrap().revision, 1);
        let k2 = apply(&mut keys, &p, now, &mut rev).unwrap();

        let ring = ring_of(&keys);
        let new_token = ring.sign(claims(now, ttl)).unwrap();
        assert_eq!(ring.verify(&new_token, now + 1).unwrap().kid, k2);
        assert_eq!(ring.verify(&old_token, now + 1).unwrap().kid, k1.kid);

        // Nothing to do until the old key's last token (signed just before the superseding
        // write was seen) has expired, plus the margin.
        let last = now + key_lifetime_after_rotation(ttl);
        assert_eq!(plan(&keys, last - 1, DAY, ttl), Plan::default());
        let p = plan(&keys, last, DAY, ttl);
        assert_eq!(p.retire, vec![(k1.kid.clone(), 2)]);
        assert!(p.rotate.is_none());
        apply(&mut keys, &p, last, &mut rev);

        let ring = ring_of(&keys);
        assert_eq!(
            ring.verify(&old_token, now + 1),
            Err(TokenError::UnknownKey)
        );
        assert!(ring.verify(&new_token, now + 1).is_ok());
    }

    /// The rotation write is conditioned on the old key's revision, so of two nodes that rotate
    /// at once only one can commit; the new key must not exist yet either.
    #[test]
    fn rotation_is_conditioned_on_the_old_keys_revision() {
        let k1 = SigningKey::generate(0);
        let new = SigningKey::generate(DAY);
        let txn = rotate_txn(&stored(&k1, 7), &new, DAY);
        let pre: Vec<_> = txn
            .preconditions
            .iter()
            .map(|p| (p.key.as_str(), p.expect))
            .collect();
        assert_eq!(
            pre,
            vec![
                (k1.kid.as_str(), Expect::Revision(7)),
                (new.kid.as_str(), Expect::Absent)
            ]
        );
        assert_eq!(txn.ops.len(), 2);
    }

    /// No key at all makes the first; two unsuperseded keys (made at once) leave one signing
    /// and mark the other, which then retires like any superseded key.
    #[test]
    fn missing_and_duplicate_first_keys_are_repaired() {
        assert!(plan(&[], 5, DAY, 60).create_first);
        let a = SigningKey::generate(10);
        let b = SigningKey::generate(11);
        let keys = vec![stored(&a, 3), stored(&b, 4)];
        let p = plan(&keys, 12, DAY, 60);
        assert_eq!(p.supersede, vec![stored(&a, 3)]);
        assert!(p.rotate.is_none());
    }
}
