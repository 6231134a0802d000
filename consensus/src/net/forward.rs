//! Forwarded writes, batched per leader address.
//!
//! A follower that receives many writes at once forwards them to the leader in
//! [`PeerRequest::ClientWriteBatch`] frames instead of one stream each: one task per leader
//! address takes every write queued at that moment (up to [`MAX_FORWARD_BATCH`], about a
//! quarter of the frame limit in bytes) and sends them together, with at most
//! [`BATCHES_IN_FLIGHT`] batches unanswered per address. Writes that arrive while those are in
//! flight wait for the next batch, as in a group commit, so under load a batch carries what
//! arrived during one round trip, and when writes are rare each goes alone at once (as a plain
//! [`PeerRequest::ClientWrite`]). The leader proposes a batch with one call to openraft.
//!
//! What a caller is told keeps the meaning [`ForwardError`] gives it. Each queued write has a
//! phase: queued, taken into a batch, sent (its batch's frame is about to be written) or
//! cancelled. A caller that gives up (its deadline, or `abandon`) before its write was sent
//! cancels it and gets `NotSent`: the batch leaves it out. After that point it gets `Unknown`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use shoal_types::{Command, Op, TxnResponse};
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::client::{ClientInner, ForwardError, PeerClient};
use super::frame::{
    encode_frame, read_frame, write_frame, FrameError, PeerError, PeerRequest, PeerResponse,
    WriteOutcome, MAX_FORWARD_BATCH,
};
use super::NetError;

/// Batches a follower keeps unanswered towards one leader address.
pub const BATCHES_IN_FLIGHT: usize = 2;

/// A forwarder with nothing to do for this long ends; the next write starts another.
const IDLE: Duration = Duration::from_secs(60);

const QUEUED: u8 = 0;
const TAKEN: u8 = 1;
const SENT: u8 = 2;
const CANCELLED: u8 = 3;

type Answer = Result<TxnResponse, ForwardError>;

/// A write waiting for its batch.
pub(super) struct Queued {
    cmd: Command,
    deadline: Instant,
    phase: Arc<AtomicU8>,
    answer: oneshot::Sender<Answer>,
}

/// The senders of the per-address forwarder tasks.
pub(super) type Forwarders = std::sync::Mutex<HashMap<String, mpsc::UnboundedSender<Queued>>>;

/// A write's size on the wire, roughly (rkyv adds a little per string and vector).
fn approx_size(cmd: &Command) -> usize {
    let txn = cmd.txn();
    let ops: usize = txn
        .ops
        .iter()
        .map(|op| {
            let value = match op {
                Op::Put { value, .. } => value.len(),
                Op::Delete { .. } => 0,
                Op::Add(a) => a.fields.iter().map(|f| f.name.len() + 32).sum(),
            };
            op.table().len() + op.key().len() + value + 48
        })
        .sum();
    let pre: usize = txn
        .preconditions
        .iter()
        .map(|p| p.table.len() + p.key.len() + 48)
        .sum();
    ops + pre + cmd.request_id().map_or(0, str::len) + 64
}

impl PeerClient {
    /// Forwards a write to the leader at `addr`, telling apart a write that cannot have reached
    /// it from one whose fate is unknown. Gives up when `timeout` passes or `abandon` resolves
    /// (the caller learnt of another leader), whichever comes first. Concurrent calls to one
    /// address travel in shared batches (see the module's documentation).
    pub async fn forward_write(
        &self,
        addr: &str,
        cmd: Command,
        timeout: Duration,
        abandon: impl std::future::Future<Output = ()>,
    ) -> Result<TxnResponse, ForwardError> {
        let deadline = Instant::now() + timeout;
        let phase = Arc::new(AtomicU8::new(QUEUED));
        let (tx, rx) = oneshot::channel();
        self.enqueue(
            addr,
            Queued {
                cmd,
                deadline,
                phase: phase.clone(),
                answer: tx,
            },
        );
        let gave_up = tokio::select! {
            biased;
            answer = rx => match answer {
                Ok(answer) => return answer,
                // The forwarder ended without answering (the client is shutting down).
                Err(_) => NetError::Abandoned,
            },
            _ = tokio::time::sleep_until(deadline.into()) => NetError::Timeout(timeout),
            _ = abandon => NetError::Abandoned,
        };
        Err(if cancel(&phase) {
            ForwardError::NotSent(gave_up)
        } else {
            ForwardError::Unknown(gave_up)
        })
    }

    fn enqueue(&self, addr: &str, q: Queued) {
        let mut map = self.inner.forwarders.lock().expect("forwarders lock");
        let q = match map.get(addr) {
            Some(tx) => match tx.send(q) {
                Ok(()) => return,
                Err(mpsc::error::SendError(q)) => q,
            },
            None => q,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run_forwarder(
            Arc::downgrade(&self.inner),
            addr.to_owned(),
            rx,
        ));
        let _ = tx.send(q);
        map.insert(addr.to_owned(), tx);
    }

    /// Sends one batch and answers each of its writes.
    async fn send_batch(self, addr: String, batch: Vec<Queued>) {
        let started = Instant::now();
        let last = batch.iter().map(|q| q.deadline).max().unwrap_or(started);
        let timeout = last.saturating_duration_since(started);
        let conn = match self.connection_within(&addr, timeout).await {
            Ok(conn) => conn,
            Err(e) => return self.answer_all(&addr, started, batch, e, ForwardError::NotSent),
        };
        let remaining = timeout.saturating_sub(started.elapsed());
        let (mut send, mut recv) = match tokio::time::timeout(remaining, conn.open_bi()).await {
            Ok(Ok(streams)) => streams,
            Ok(Err(e)) => {
                let e = NetError::Connection(addr.clone(), e);
                return self.answer_all(&addr, started, batch, e, ForwardError::NotSent);
            }
            Err(_) => {
                let e = NetError::Timeout(timeout);
                return self.answer_all(&addr, started, batch, e, ForwardError::NotSent);
            }
        };
        // From here on a caller can no longer take its write back; one that gave up already is
        // left out.
        let mut cmds = Vec::with_capacity(batch.len());
        let mut waiting = Vec::with_capacity(batch.len());
        for q in batch {
            if q.phase
                .compare_exchange(TAKEN, SENT, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                cmds.push(q.cmd);
                waiting.push(q.answer);
            }
        }
        if cmds.is_empty() {
            let _ = send.reset(super::codes::SHUTDOWN);
            return;
        }
        let max_frame = self.inner.opts.max_frame;
        let n = cmds.len();
        let (req, rpc) = if n == 1 {
            let cmd = cmds.pop().expect("one command");
            (PeerRequest::ClientWrite(cmd), "client_write")
        } else {
            (PeerRequest::ClientWriteBatch(cmds), "client_write_batch")
        };
        // Until the whole frame is in the stream's send buffer the leader cannot have a
        // complete request, so nothing it could append: a failure here is "not sent".
        let written = match encode_frame(&req, max_frame) {
            Ok(frame) => {
                let remaining = timeout.saturating_sub(started.elapsed());
                match tokio::time::timeout(remaining, write_frame(&mut send, &frame)).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(match conn.close_reason() {
                        Some(reason) => NetError::Connection(addr.clone(), reason),
                        None => NetError::Frame(e),
                    }),
                    Err(_) => Err(NetError::Timeout(timeout)),
                }
            }
            Err(e) => Err(NetError::Frame(e)),
        };
        drop(req);
        if let Err(e) = written {
            self.observe(&addr, rpc, started, false);
            let e = Arc::new(e);
            for w in waiting {
                let _ = w.send(Err(ForwardError::NotSent(NetError::Shared(e.clone()))));
            }
            return;
        }
        let _ = send.finish();
        let remaining = timeout.saturating_sub(started.elapsed());
        // Stop waiting once every caller has gone (each gave up: a new leader, its deadline).
        let all_gone = futures::future::join_all(waiting.iter_mut().map(|w| w.closed()));
        let answer = tokio::select! {
            r = read_frame::<PeerResponse, _>(&mut recv, max_frame, remaining) => r,
            _ = all_gone => {
                self.observe(&addr, rpc, started, false);
                return;
            }
        };
        let failed = |e: NetError| {
            let e = Arc::new(e);
            move || ForwardError::Unknown(NetError::Shared(e.clone()))
        };
        let outcomes: Vec<Answer> = match answer {
            Ok(PeerResponse::ClientWrite(r)) if n == 1 => vec![Ok(r)],
            Ok(PeerResponse::ClientWriteBatch(outs)) if outs.len() == n => outs
                .into_iter()
                .map(|o| match o {
                    WriteOutcome::Applied(r) => Ok(r),
                    WriteOutcome::Failed(e @ PeerError::ForwardToLeader { .. }) => {
                        Err(ForwardError::NotLeader(e))
                    }
                    WriteOutcome::Failed(e) => Err(ForwardError::Unknown(NetError::Remote(e))),
                })
                .collect(),
            Ok(PeerResponse::Error(e @ PeerError::ForwardToLeader { .. })) => (0..n)
                .map(|_| Err(ForwardError::NotLeader(e.clone())))
                .collect(),
            Ok(PeerResponse::Error(e)) => {
                let f = failed(NetError::Remote(e));
                (0..n).map(|_| Err(f())).collect()
            }
            Ok(other) => {
                let f = failed(NetError::UnexpectedResponse {
                    rpc,
                    got: super::client::response_name(&other),
                });
                (0..n).map(|_| Err(f())).collect()
            }
            Err(FrameError::Timeout(d)) => (0..n)
                .map(|_| Err(ForwardError::Unknown(NetError::Timeout(d))))
                .collect(),
            Err(e) => {
                let f = failed(match conn.close_reason() {
                    Some(reason) => NetError::Connection(addr.clone(), reason),
                    None => NetError::Frame(e),
                });
                (0..n).map(|_| Err(f())).collect()
            }
        };
        self.observe(&addr, rpc, started, outcomes.iter().all(Result::is_ok));
        for (w, outcome) in waiting.into_iter().zip(outcomes) {
            let _ = w.send(outcome);
        }
    }

    fn answer_all(
        &self,
        addr: &str,
        started: Instant,
        batch: Vec<Queued>,
        e: NetError,
        kind: fn(NetError) -> ForwardError,
    ) {
        self.observe(addr, "client_write", started, false);
        let e = Arc::new(e);
        for q in batch {
            let _ = q.answer.send(Err(kind(NetError::Shared(e.clone()))));
        }
    }
}

/// Marks a write the caller gave up on; true if it was not sent (and now never will be).
fn cancel(phase: &AtomicU8) -> bool {
    let mut now = phase.load(Ordering::Acquire);
    loop {
        if now != QUEUED && now != TAKEN {
            return now == CANCELLED;
        }
        match phase.compare_exchange(now, CANCELLED, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return true,
            Err(seen) => now = seen,
        }
    }
}

/// Takes a queued write into a batch unless its caller gave up on it.
fn take(q: &Queued) -> bool {
    !q.answer.is_closed()
        && q.phase
            .compare_exchange(QUEUED, TAKEN, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
}

/// The forwarder of one leader address: batches what is queued, keeps at most
/// [`BATCHES_IN_FLIGHT`] batches unanswered, ends when its client is gone or it has been idle.
async fn run_forwarder(
    client: Weak<ClientInner>,
    addr: String,
    mut rx: mpsc::UnboundedReceiver<Queued>,
) {
    let in_flight = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT));
    let mut carried: Option<Queued> = None;
    loop {
        let first = match carried.take() {
            Some(q) => q,
            None => match tokio::time::timeout(IDLE, rx.recv()).await {
                Ok(Some(q)) => q,
                Ok(None) => return,
                Err(_) => {
                    let Some(inner) = client.upgrade() else {
                        return;
                    };
                    let mut map = inner.forwarders.lock().expect("forwarders lock");
                    // Senders use the map under its lock, so nothing arrives after this check.
                    if rx.is_empty() {
                        map.remove(&addr);
                        return;
                    }
                    continue;
                }
            },
        };
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let Some(inner) = client.upgrade() else {
            return;
        };
        let budget = (inner.opts.max_frame as usize) / 4;
        let mut batch = Vec::new();
        let mut bytes = 0;
        if take(&first) {
            bytes += approx_size(&first.cmd);
            batch.push(first);
        }
        while batch.len() < MAX_FORWARD_BATCH && bytes < budget {
            let Ok(q) = rx.try_recv() else { break };
            let size = approx_size(&q.cmd);
            if !batch.is_empty() && bytes + size > budget {
                carried = Some(q);
                break;
            }
            if take(&q) {
                bytes += size;
                batch.push(q);
            }
        }
        if batch.is_empty() {
            continue;
        }
        let client = PeerClient { inner };
        let addr = addr.clone();
        tokio::spawn(async move {
            client.send_batch(addr, batch).await;
            drop(permit);
        });
    }
}
