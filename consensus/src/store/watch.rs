//! Watch streams: history replay, then live events, with no gap and no duplicate.
//!
//! Every event has a position (revision, seq). A watcher keeps the next position it may
//! deliver; anything before it, from history or from the live channel, is skipped. Because the
//! watcher subscribes to the live channel before it reads history, and the channel is fed only
//! after a batch is durably written, every event is in one or the other.

use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};

use futures::Stream;
use rocksdb::{Direction, IteratorMode};
use shoal_types::codec::decode;
use shoal_types::WatchEvent;
use tokio::sync::{broadcast, mpsc};
use tokio::task::AbortHandle;

use super::sm::{history_key, parse_floor, parse_history_key, KEY_HISTORY_FLOOR};
use super::{blocking, corrupt, Db, StoreError, CF_HISTORY, CF_SM_META};

/// An event with its position (revision, seq).
pub(crate) type Positioned = ((u64, u32), WatchEvent);

/// What the state machine tells live watchers.
#[derive(Clone, Debug)]
pub(crate) enum Live {
    /// Events of one applied batch, in order.
    Events(Arc<Vec<Positioned>>),
    /// A snapshot replaced the state; history now starts at `floor`.
    Reset { floor: u64 },
}

/// A watch could not start or continue.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("history before revision {oldest} has been compacted; list again and watch from the listing's revision")]
    Compacted { oldest: u64 },
    #[error("the store could not be read")]
    Store(#[source] StoreError),
    #[error("the store was closed")]
    Closed,
}

/// A stream of watch events; dropping it stops the watch.
#[derive(Debug)]
pub struct WatchStream {
    rx: mpsc::Receiver<Result<WatchEvent, WatchError>>,
    task: AbortHandle,
}

impl Stream for WatchStream {
    type Item = Result<WatchEvent, WatchError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for WatchStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const PAGE: usize = 512;
const CHANNEL: usize = 256;

pub(crate) fn spawn(
    db: Arc<Db>,
    table: String,
    prefix: String,
    from_revision: u64,
    live: broadcast::Receiver<Live>,
) -> WatchStream {
    let (tx, rx) = mpsc::channel(CHANNEL);
    let w = Watcher {
        db: Arc::downgrade(&db),
        table,
        prefix,
        next: (from_revision, 0),
        tx,
    };
    let task = tokio::spawn(w.run(live)).abort_handle();
    WatchStream { rx, task }
}

struct Watcher {
    /// Weak, so that a watch left running does not keep the database open after the node
    /// shuts down (a restart must be able to reopen it).
    db: Weak<Db>,
    table: String,
    prefix: String,
    /// Next position that may be delivered.
    next: (u64, u32),
    tx: mpsc::Sender<Result<WatchEvent, WatchError>>,
}

/// Control flow of the watch loop: keep going or stop (receiver gone or error sent).
type Flow = Result<(), ()>;

impl Watcher {
    fn matches(&self, ev: &WatchEvent) -> bool {
        ev.table == self.table && ev.key.starts_with(&self.prefix)
    }

    async fn deliver(&mut self, pos: (u64, u32), ev: WatchEvent) -> Flow {
        if pos < self.next {
            return Ok(());
        }
        self.next = (pos.0, pos.1 + 1);
        if self.matches(&ev) {
            self.tx.send(Ok(ev)).await.map_err(|_| ())?;
        }
        Ok(())
    }

    async fn fail(&self, e: WatchError) -> Flow {
        let _ = self.tx.send(Err(e)).await;
        Err(())
    }

    /// Delivers history from `next` to its current end.
    async fn replay(&mut self) -> Flow {
        loop {
            let Some(db) = self.db.upgrade() else {
                return self.fail(WatchError::Closed).await;
            };
            let from = self.next;
            let page = blocking(move || read_history(&db, from, PAGE)).await;
            let (floor, events) = match page {
                Ok(p) => p,
                Err(e) => return self.fail(WatchError::Store(e)).await,
            };
            if self.next.0 < floor {
                return self.fail(WatchError::Compacted { oldest: floor }).await;
            }
            let n = events.len();
            for (pos, ev) in events {
                self.deliver(pos, ev).await?;
            }
            if n < PAGE {
                return Ok(());
            }
        }
    }

    async fn run(mut self, mut live: broadcast::Receiver<Live>) {
        if self.replay().await.is_err() {
            return;
        }
        loop {
            let flow = match live.recv().await {
                Ok(Live::Events(batch)) => {
                    let mut flow = Ok(());
                    for (pos, ev) in batch.iter() {
                        flow = self.deliver(*pos, ev.clone()).await;
                        if flow.is_err() {
                            break;
                        }
                    }
                    flow
                }
                Ok(Live::Reset { floor }) => {
                    if self.next.0 < floor {
                        self.fail(WatchError::Compacted { oldest: floor }).await
                    } else {
                        Ok(())
                    }
                }
                // Fell behind the live channel: what was missed is in history.
                Err(broadcast::error::RecvError::Lagged(_)) => self.replay().await,
                Err(broadcast::error::RecvError::Closed) => self.fail(WatchError::Closed).await,
            };
            if flow.is_err() {
                return;
            }
        }
    }
}

type Page = (u64, Vec<Positioned>);

/// Up to `limit` history events from position `from`, with the history floor read from the
/// same RocksDB snapshot (so a concurrent prune cannot hide a gap).
fn read_history(db: &Db, from: (u64, u32), limit: usize) -> Result<Page, StoreError> {
    let snap = db.db.snapshot();
    let floor = match snap.get_cf(db.cf(CF_SM_META), KEY_HISTORY_FLOOR)? {
        None => 0,
        Some(v) => parse_floor(&v)?,
    };
    let start = history_key(from.0, from.1);
    let mut out = Vec::new();
    for item in snap.iterator_cf(
        db.cf(CF_HISTORY),
        IteratorMode::From(&start, Direction::Forward),
    ) {
        if out.len() >= limit {
            break;
        }
        let (k, v) = item?;
        let pos = parse_history_key(&k)?;
        let ev: WatchEvent = decode(&v).map_err(corrupt(format!("history event {pos:?}")))?;
        out.push((pos, ev));
    }
    Ok((floor, out))
}
