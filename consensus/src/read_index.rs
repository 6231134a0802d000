//! Read-index batching. A linearizable read needs a read index obtained *after* the read
//! arrived: the leader confirms it still leads (a heartbeat round) and reports its commit index.
//! Concurrent readers can share one such round as long as each shares a round that started
//! after it arrived. Readers queue; one driver task takes everyone queued, runs one round, answers
//! them all, and repeats while anyone is waiting. A reader that arrives during a round waits for
//! the next one, never joins one already under way. Under load the number of rounds is bounded
//! by round-trip time, not by the request rate (etcd batches its ReadIndex requests the same
//! way).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// One read-index round: the index, or why there is none (no leader, leader unreachable).
pub(crate) type Round = Pin<Box<dyn Future<Output = Result<u64, String>> + Send>>;

#[derive(Default)]
struct Queue {
    waiting: Vec<oneshot::Sender<Result<u64, String>>>,
    driving: bool,
}

/// Shares read-index rounds among concurrent readers.
pub(crate) struct ReadBatcher<F> {
    queue: Mutex<Queue>,
    round: F,
}

impl<F> ReadBatcher<F>
where
    F: Fn() -> Round + Send + Sync + 'static,
{
    pub(crate) fn new(round: F) -> Arc<Self> {
        Arc::new(ReadBatcher {
            queue: Mutex::new(Queue::default()),
            round,
        })
    }

    /// A read index from a round that started after this call.
    pub(crate) async fn read_index(self: &Arc<Self>) -> Result<u64, String> {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            q.waiting.push(tx);
            !std::mem::replace(&mut q.driving, true)
        };
        if start {
            tokio::spawn(self.clone().drive());
        }
        rx.await
            .unwrap_or_else(|_| Err("the read-index task stopped".into()))
    }

    async fn drive(self: Arc<Self>) {
        loop {
            let batch = {
                let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                if q.waiting.is_empty() {
                    q.driving = false;
                    return;
                }
                std::mem::take(&mut q.waiting)
            };
            let result = (self.round)().await;
            for reader in batch {
                let _ = reader.send(result.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use super::*;

    /// Each round takes 5 ms and returns a fresh number; a reader must get a round that began
    /// after it arrived, and 200 concurrent readers must share far fewer than 200 rounds.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn readers_share_rounds_that_start_after_they_arrive() {
        let started = Arc::new(AtomicU64::new(0));
        let s = started.clone();
        let batcher = ReadBatcher::new(move || {
            let n = s.fetch_add(1, Ordering::SeqCst) + 1;
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                Ok(n)
            }) as Round
        });
        let mut readers = Vec::new();
        for i in 0..200u64 {
            let b = batcher.clone();
            let started = started.clone();
            readers.push(tokio::spawn(async move {
                tokio::time::sleep(Duration::from_micros(100 * (i % 50))).await;
                let before = started.load(Ordering::SeqCst);
                let got = b.read_index().await.unwrap();
                (before, got)
            }));
        }
        for r in readers {
            let (rounds_begun_before, round) = r.await.unwrap();
            assert!(
                round > rounds_begun_before,
                "a reader got round {round}, which began before it arrived"
            );
        }
        let rounds = started.load(Ordering::SeqCst);
        assert!(rounds < 100, "{rounds} rounds for 200 readers");
    }

    #[tokio::test]
    async fn a_failed_round_fails_its_readers_and_the_next_round_runs() {
        let calls = Arc::new(AtomicU64::new(0));
        let c = calls.clone();
        let batcher = ReadBatcher::new(move || {
            let n = c.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                if n == 0 {
                    Err("no leader".to_owned())
                } else {
                    Ok(7u64)
                }
            }) as Round
        });
        assert_eq!(batcher.read_index().await, Err("no leader".to_owned()));
        assert_eq!(batcher.read_index().await, Ok(7));
    }
}
