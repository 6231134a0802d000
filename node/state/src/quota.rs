//! Quota-checked creates without locks: a guard row per counted scope.

use std::future::Future;
use std::time::Duration;

use shoal_types::{Expect, Txn, TxnResponse};

use crate::{tables, State, StateError};

/// Rounds a quota-checked create may lose to concurrent creates before it gives up.
pub const QUOTA_ATTEMPTS: u32 = 50;

/// How a quota-checked write ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuotaOutcome {
    /// The write was proposed: it applied, or failed on one of the caller's own
    /// preconditions (the response says which).
    Written(TxnResponse),
    /// The scope already holds `held` of its `limit`; nothing was written.
    Over { held: i64 },
}

/// Commits `txn` only if what the scope `guard` covers, as `count` reads it from the local
/// replica, stays below `limit` (negative: unlimited).
///
/// Race-free without locks: the guard row (table `quota_guards`) is read before counting, and
/// the write carries the precondition that the guard is still at that revision and rewrites
/// it. Every create in the scope goes through here, so a create that committed after the guard
/// was read has moved it and this write fails; it is then re-read through a read barrier and
/// counted again. Two creates at the limit therefore cannot both pass. Deletes need not touch
/// the guard: one missed only makes the count high for a round.
pub async fn commit_within_quota<C, F, E>(
    state: &State,
    guard: &str,
    limit: i64,
    mut count: C,
    txn: Txn,
) -> Result<QuotaOutcome, E>
where
    E: From<StateError>,
    C: FnMut() -> F,
    F: Future<Output = Result<i64, E>>,
{
    let table = tables::QUOTA_GUARDS;
    if limit < 0 {
        // Nothing to bound, so no precondition on the guard: creates in one scope would
        // otherwise all compete for it, and under enough concurrency one could lose every
        // round and fail on contention alone. The guard still moves, so a checked create
        // racing with a new limit counts again.
        let resp = state.write(table, bump_guard(txn, guard)).await?;
        return Ok(QuotaOutcome::Written(resp));
    }
    let guard_index = txn.preconditions.len() as u32;
    for attempt in 0..QUOTA_ATTEMPTS {
        if attempt > 0 {
            // Spread the rivals out a little so one of them wins the next round.
            let backoff = rand::random_range(0..=u64::from(attempt).min(20));
            tokio::time::sleep(Duration::from_millis(backoff)).await;
            state.read_barrier().await?;
        }
        let expect = match state
            .store()
            .get(table, guard)
            .await
            .map_err(|e| StateError::from_cluster(table, guard, e))?
        {
            Some(row) => Expect::Revision(row.mod_revision),
            None => Expect::Absent,
        };
        let held = count().await?;
        if limit >= 0 && held >= limit {
            return Ok(QuotaOutcome::Over { held });
        }
        let attempt_txn =
            txn.clone()
                .when(table, guard, expect)
                .put(table, guard, (held + 1).to_string());
        let resp = state.write(table, attempt_txn).await?;
        if resp.succeeded || resp.failed_precondition != Some(guard_index) {
            return Ok(QuotaOutcome::Written(resp));
        }
    }
    Err(StateError::Contended {
        table,
        key: guard.to_owned(),
        attempts: QUOTA_ATTEMPTS,
    }
    .into())
}

/// Moves the guard of `guard` without a precondition: a create that bypasses the quota check
/// (a project's `default` security group) still makes concurrent checked creates recount.
pub fn bump_guard(txn: Txn, guard: &str) -> Txn {
    txn.put(tables::QUOTA_GUARDS, guard, b"bumped".to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Concurrent creates against one guard never exceed the limit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_creates_stop_at_the_limit() {
        let state = State::in_memory();
        let mut tasks = Vec::new();
        for i in 0..20 {
            let state = state.clone();
            tasks.push(tokio::spawn(async move {
                let key = format!("held/{i}");
                let txn = Txn::new().put("items", &key, b"x".to_vec());
                let count = || {
                    let state = state.clone();
                    async move {
                        let (rows, _) = state
                            .store()
                            .list("items", "held/", usize::MAX)
                            .await
                            .map_err(|e| StateError::from_cluster("items", "", e))?;
                        Ok::<_, StateError>(rows.len() as i64)
                    }
                };
                commit_within_quota::<_, _, StateError>(&state, "items/p", 7, count, txn).await
            }));
        }
        let mut written = 0;
        for t in tasks {
            match t.await.unwrap().unwrap() {
                QuotaOutcome::Written(r) => {
                    assert!(r.succeeded);
                    written += 1;
                }
                QuotaOutcome::Over { held } => assert_eq!(held, 7),
            }
        }
        assert_eq!(written, 7);
    }

    /// Without a limit every create is written, however many race, and each moves the guard.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn unlimited_creates_never_contend() {
        let state = State::in_memory();
        let mut tasks = Vec::new();
        for i in 0..40 {
            let state = state.clone();
            tasks.push(tokio::spawn(async move {
                let txn = Txn::new().put("items", &format!("held/{i}"), b"x".to_vec());
                // Counting takes a while, as a listing does, so the creates overlap.
                let count = || async {
                    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                    Ok::<_, StateError>(0)
                };
                commit_within_quota::<_, _, StateError>(&state, "items/p", -1, count, txn).await
            }));
        }
        let mut revisions = Vec::new();
        for t in tasks {
            match t.await.unwrap().unwrap() {
                QuotaOutcome::Written(r) => {
                    assert!(r.succeeded);
                    revisions.push(r.revision);
                }
                QuotaOutcome::Over { .. } => panic!("an unlimited scope refused a create"),
            }
        }
        let (rows, _) = state
            .store()
            .list("items", "held/", usize::MAX)
            .await
            .unwrap();
        assert_eq!(rows.len(), 40);
        let guard = state
            .store()
            .get(tables::QUOTA_GUARDS, "items/p")
            .await
            .unwrap()
            .expect("the guard row");
        assert_eq!(Some(&guard.mod_revision), revisions.iter().max());
        // One write per create: no round was lost to a rival and proposed again.
        revisions.sort();
        revisions.dedup();
        assert_eq!(revisions.len(), 40);
        assert_eq!(revisions[39] - revisions[0], 39, "creates were retried");
    }
}
