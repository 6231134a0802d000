//! Watch streams: history replay, then live events, with no gap and no duplicate.
//!
//! Every event has a position (revision, seq). A watcher keeps the next position it may
//! deliver; anything before it, from history or from the live channel, is skipped. Because the
//! watcher subscribes to the live channel before it reads history, and the channel is fed only
//! after a batch is durably written, every event is in one or the other.
//!
//! Every applied batch of entries reaches the live channel, with or without events, carrying
//! the index it was applied through. That is the watch's progress mark ([`WatchProgress`]): a
//! consumer that reads the mark and then drains the stream holds every matching event up to
//! the mark, so a view kept by a watch can prove it is as current as a read barrier.

use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};

use futures::Stream;
use rocksdb::{Direction, IteratorMode};
use shoal_types::codec::decode;
use shoal_types::WatchEvent;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::AbortHandle;

use super::sm::{history_key, parse_floor, parse_history_key, KEY_APPLIED, KEY_HISTORY_FLOOR};
use super::{blocking, corrupt, Db, StoreError, CF_HISTORY, CF_SM_META};
use crate::wire::WLogId;

/// An event with its position (revision, seq).
pub(crate) type Positioned = ((u64, u32), WatchEvent);

/// What the state machine tells live watchers.
#[derive(Clone, Debug)]
pub(crate) enum Live {
    /// Events of one applied batch, in order (possibly none), and the index of the batch's
    /// last entry.
    Events {
        events: Arc<Vec<Positioned>>,
        through: u64,
    },
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
    progress: WatchProgress,
}

impl WatchStream {
    /// The stream's progress mark, to read or wait on apart from the stream;
    /// [`WatchProgress::changed`] waits for a move after this call.
    pub fn progress(&self) -> WatchProgress {
        let mut rx = self.progress.rx.clone();
        rx.borrow_and_update();
        WatchProgress { rx }
    }

    /// The next event if one is ready, without waiting; a watch that ended yields its error,
    /// then `Err(WatchError::Closed)`.
    pub fn try_next(&mut self) -> Option<Result<WatchEvent, WatchError>> {
        match self.rx.try_recv() {
            Ok(item) => Some(item),
            Err(mpsc::error::TryRecvError::Empty) => None,
            Err(mpsc::error::TryRecvError::Disconnected) => Some(Err(WatchError::Closed)),
        }
    }
}

/// How far a watch has got: every matching event with a revision at or below [`get`] has been
/// put in the stream (events the watch was started after count as delivered). Read the mark
/// first, then drain the stream: what was drained is complete up to the mark.
///
/// [`get`]: WatchProgress::get
#[derive(Clone, Debug)]
pub struct WatchProgress {
    rx: watch::Receiver<u64>,
}

impl WatchProgress {
    pub fn get(&self) -> u64 {
        *self.rx.borrow()
    }

    /// Waits until the mark reaches `revision`; false if the watch ended first.
    pub async fn wait_for(&mut self, revision: u64) -> bool {
        self.rx.wait_for(|p| *p >= revision).await.is_ok()
    }

    /// Waits until the mark moves; false if the watch ended.
    pub async fn changed(&mut self) -> bool {
        self.rx.changed().await.is_ok()
    }
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
    let (progress_tx, progress_rx) = watch::channel(from_revision.saturating_sub(1));
    let w = Watcher {
        db: Arc::downgrade(&db),
        table,
        prefix,
        next: (from_revision, 0),
        tx,
        progress: progress_tx,
    };
    let task = tokio::spawn(w.run(live)).abort_handle();
    WatchStream {
        rx,
        task,
        progress: WatchProgress { rx: progress_rx },
    }
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
    /// Raised after the events of a live batch are in `tx`, never before.
    progress: watch::Sender<u64>,
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

    /// Every matching event up to `revision` is in the stream.
    fn raise_progress(&self, revision: u64) {
        self.progress.send_if_modified(|p| {
            let moved = revision > *p;
            *p = (*p).max(revision);
            moved
        });
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
            let (floor, applied, events) = match page {
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
                // The page ran to the end of history as of `applied` (the same snapshot).
                self.raise_progress(applied);
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
                Ok(Live::Events { events, through }) => {
                    let mut flow = Ok(());
                    for (pos, ev) in events.iter() {
                        flow = self.deliver(*pos, ev.clone()).await;
                        if flow.is_err() {
                            break;
                        }
                    }
                    // Every event up to `through` was in history (replayed) or in this or an
                    // earlier batch (delivered in order), so the stream now holds them all.
                    if flow.is_ok() {
                        self.raise_progress(through);
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

/// The history floor, the applied index and the events of one page.
type Page = (u64, u64, Vec<Positioned>);

/// Up to `limit` history events from position `from`, with the history floor and the applied
/// index read from the same RocksDB snapshot (so a concurrent prune cannot hide a gap, and a
/// short page is complete through the applied index: history and the applied index are written
/// in one batch).
fn read_history(db: &Db, from: (u64, u32), limit: usize) -> Result<Page, StoreError> {
    let snap = db.db.snapshot();
    let floor = match snap.get_cf(db.cf(CF_SM_META), KEY_HISTORY_FLOOR)? {
        None => 0,
        Some(v) => parse_floor(&v)?,
    };
    let applied = match snap.get_cf(db.cf(CF_SM_META), KEY_APPLIED)? {
        None => 0,
        Some(v) => {
            decode::<WLogId>(&v)
                .map_err(corrupt("applied log id"))?
                .index
        }
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
    Ok((floor, applied, out))
}
