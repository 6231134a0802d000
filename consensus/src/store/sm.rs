//! The state machine: typed rows, watch history and snapshots.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::{Stream, StreamExt};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{OptionalSend, RaftSnapshotBuilder};
use rocksdb::{Direction, IteratorMode, WriteBatch};
use shoal_types::codec::{decode, encode};
use shoal_types::{
    Command, EventKind, Expect, KeyedTxn, Op, Row, Txn, TxnResponse, WatchEvent, REQUEST_WINDOW,
};
use tokio::sync::broadcast;

use super::snapshot::{self, RowBatch, SnapRow, SnapshotHeader, SnapshotWriter, ROWS_PER_BATCH};
use super::watch::{self, Live, Positioned, WatchError, WatchStream};
use super::{blocking, corrupt, Db, StoreError, StoreOptions, CF_HISTORY, CF_ROWS, CF_SM_META};
use crate::raft_types::{
    Entry, EntryPayload, LogId, Snapshot, SnapshotMeta, StoredMembership, TypeConfig,
};
use crate::wire::{WLogId, WSnapshotMeta, WStoredMembership};

pub(crate) const KEY_APPLIED: &[u8] = b"applied";
const KEY_MEMBERSHIP: &[u8] = b"membership";
pub(crate) const KEY_HISTORY_FLOOR: &[u8] = b"history_floor";
const KEY_SNAPSHOT: &[u8] = b"snapshot";
const KEY_INSTALLING: &[u8] = b"installing";

/// The store's table of request ids (`Command::Keyed`): key the request id, value the
/// rkyv-encoded first [`TxnResponse`], `mod_revision` the revision it was applied at. Rows, so
/// they are in every snapshot and survive restarts like any other state.
pub const T_REQUESTS: &str = "_requests";
/// The same ids ordered by revision (`{revision:020}/{id}`, empty value), so the oldest can be
/// pruned without a scan.
pub const T_REQUESTS_BY_REVISION: &str = "_requests_by_revision";
/// Most expired request ids removed per apply batch; the rest go with the next batches.
const REQUEST_PRUNE_PER_BATCH: usize = 1024;

/// `table \0 key`: table names and keys never contain NUL (checked by `Txn::validate`), so a
/// table's rows are one contiguous range and a key prefix is a byte prefix.
pub(crate) fn row_key(table: &str, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(table.len() + 1 + key.len());
    k.extend_from_slice(table.as_bytes());
    k.push(0);
    k.extend_from_slice(key.as_bytes());
    k
}

fn split_row_key(k: &[u8]) -> Result<(String, String), StoreError> {
    let invalid = |reason: &str| StoreError::Invalid {
        what: "row key".into(),
        reason: reason.into(),
    };
    let nul = k
        .iter()
        .position(|b| *b == 0)
        .ok_or_else(|| invalid("it has no table separator"))?;
    let table = std::str::from_utf8(&k[..nul]).map_err(|_| invalid("its table is not UTF-8"))?;
    let key = std::str::from_utf8(&k[nul + 1..]).map_err(|_| invalid("its key is not UTF-8"))?;
    Ok((table.to_owned(), key.to_owned()))
}

/// History key: revision then sequence within the revision, both big-endian so that RocksDB
/// order is event order.
pub(crate) fn history_key(revision: u64, seq: u32) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..8].copy_from_slice(&revision.to_be_bytes());
    k[8..].copy_from_slice(&seq.to_be_bytes());
    k
}

pub(crate) fn parse_history_key(k: &[u8]) -> Result<(u64, u32), StoreError> {
    let k: [u8; 12] = k.try_into().map_err(|_| StoreError::Invalid {
        what: "history key".into(),
        reason: format!("{} bytes instead of 12", k.len()),
    })?;
    let mut rev = [0u8; 8];
    rev.copy_from_slice(&k[..8]);
    let mut seq = [0u8; 4];
    seq.copy_from_slice(&k[8..]);
    Ok((u64::from_be_bytes(rev), u32::from_be_bytes(seq)))
}

pub(crate) fn parse_floor(v: &[u8]) -> Result<u64, StoreError> {
    let b: [u8; 8] = v.try_into().map_err(|_| StoreError::Invalid {
        what: "history floor".into(),
        reason: format!("{} bytes instead of 8", v.len()),
    })?;
    Ok(u64::from_be_bytes(b))
}

fn decode_row(what: &[u8], v: &[u8]) -> Result<Row, StoreError> {
    decode(v).map_err(corrupt(format!(
        "row {}",
        String::from_utf8_lossy(what).replace('\0', "/")
    )))
}

fn snapshot_file_name(last: Option<&LogId>) -> String {
    match last {
        None => "snap-empty.snap".into(),
        Some(l) => format!(
            "snap-{}-{}-{}.snap",
            l.leader_id.term, l.leader_id.node_id, l.index
        ),
    }
}

/// The store's shared state; the state machine, its snapshot builders and every reader point
/// at one of these.
#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) db: Arc<Db>,
    opts: StoreOptions,
    live: broadcast::Sender<Live>,
    /// Last applied index (the store's revision), for lock-free reads.
    revision: AtomicU64,
    applied: Mutex<Option<LogId>>,
    /// File name (under `snapshots/`) of the current snapshot.
    current_snapshot: Mutex<Option<String>>,
    /// Serialises snapshot builds and installs: both replace files under `snapshots/`.
    snapshot_lock: Mutex<()>,
    incoming_seq: AtomicU64,
    /// Revision below which the request-id index holds no entries any more (0 after open).
    /// Pruning seeks here instead of to the start of the index: the deleted entries before it
    /// stay as tombstones until a compaction, and stepping over them on every batch made each
    /// apply slower the longer a node ran.
    request_prune_from: AtomicU64,
}

/// The state machine openraft drives. Build it with [`super::open`]; take a [`StateReader`]
/// with [`StateMachineStore::reader`] before handing it to `Raft::new`.
#[derive(Debug)]
pub struct StateMachineStore {
    inner: Arc<Inner>,
}

/// A cloneable, read-only view of the local replica: rows, revision, watches.
#[derive(Clone, Debug)]
pub struct StateReader {
    inner: Arc<Inner>,
}

/// Builds a snapshot file from a consistent RocksDB snapshot of the rows.
#[derive(Debug)]
pub struct SnapshotBuilder {
    inner: Arc<Inner>,
}

impl Inner {
    fn meta_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.db.get_cf(self.db.cf(CF_SM_META), key)?)
    }

    fn read_applied(&self) -> Result<Option<LogId>, StoreError> {
        match self.meta_get(KEY_APPLIED)? {
            None => Ok(None),
            Some(v) => {
                let w: WLogId = decode(&v).map_err(corrupt("applied log id"))?;
                Ok(Some(LogId::from(&w)))
            }
        }
    }

    fn read_membership(&self) -> Result<StoredMembership, StoreError> {
        match self.meta_get(KEY_MEMBERSHIP)? {
            None => Ok(StoredMembership::default()),
            Some(v) => {
                let w: WStoredMembership = decode(&v).map_err(corrupt("stored membership"))?;
                StoredMembership::try_from(&w).map_err(|e| StoreError::Invalid {
                    what: "stored membership".into(),
                    reason: e.to_string(),
                })
            }
        }
    }

    pub(crate) fn history_floor(&self) -> Result<u64, StoreError> {
        match self.meta_get(KEY_HISTORY_FLOOR)? {
            None => Ok(0),
            Some(v) => parse_floor(&v),
        }
    }

    fn set_applied_cache(&self, applied: Option<LogId>) {
        self.revision
            .store(applied.as_ref().map_or(0, |l| l.index), Ordering::Release);
        *self.applied.lock().unwrap_or_else(|e| e.into_inner()) = applied;
    }

    fn get_row(&self, table: &str, key: &str) -> Result<Option<Row>, StoreError> {
        let k = row_key(table, key);
        match self.db.db.get_pinned_cf(self.db.cf(CF_ROWS), &k)? {
            None => Ok(None),
            Some(v) => Ok(Some(decode_row(&k, &v)?)),
        }
    }

    /// Applies a batch of entries in one RocksDB write. Returns a response per entry and the
    /// watch events the batch produced, keyed by (revision, seq).
    ///
    /// The write goes to the WAL but is not fsynced on its own. The entries it applies are
    /// already durable in the log (appends are synced before they are acknowledged), and the
    /// log and the state machine share one WAL, so: a crash can only lose a suffix of applied
    /// batches, together with the applied index written in the same batch, and openraft
    /// re-applies that suffix from the log at restart (apply is deterministic); and the log is
    /// purged only by a synced write, which makes every earlier apply durable first. Syncing
    /// here too would double the fsyncs per write for no guarantee.
    fn apply_batch(
        &self,
        entries: &[Entry],
    ) -> Result<(Vec<TxnResponse>, Vec<Positioned>), StoreError> {
        let cf_hist = self.db.cf(CF_HISTORY);
        let cf_meta = self.db.cf(CF_SM_META);
        let mut applied = self.read_applied()?;
        let mut overlay: HashMap<Vec<u8>, Option<Row>> = HashMap::new();
        let mut batch = WriteBatch::default();
        let mut events = Vec::new();
        let mut responses = Vec::with_capacity(entries.len());

        for entry in entries {
            let index = entry.log_id.index;
            // An entry at or below the applied index was applied before (a crash between apply
            // and the caller learning of it): applying it again must change nothing.
            if applied.as_ref().is_some_and(|a| index <= a.index) {
                responses.push(self.replayed_response(index)?);
                continue;
            }
            let resp = match &entry.payload {
                EntryPayload::Blank => TxnResponse {
                    succeeded: true,
                    revision: index,
                    failed_precondition: None,
                },
                EntryPayload::Membership(m) => {
                    let sm = StoredMembership::new(Some(entry.log_id), m.clone());
                    batch.put_cf(
                        cf_meta,
                        KEY_MEMBERSHIP,
                        encode(&WStoredMembership::from(&sm)),
                    );
                    TxnResponse {
                        succeeded: true,
                        revision: index,
                        failed_precondition: None,
                    }
                }
                EntryPayload::Normal(Command::Txn(txn)) => {
                    self.apply_txn(index, txn, &mut overlay, &mut batch, &mut events)?
                }
                EntryPayload::Normal(Command::Keyed(keyed)) => {
                    self.apply_keyed(index, keyed, &mut overlay, &mut batch, &mut events)?
                }
            };
            responses.push(resp);
            applied = Some(entry.log_id);
        }

        if let Some(a) = &applied {
            self.prune_request_ids(a.index, &overlay, &mut batch)?;
            batch.put_cf(cf_meta, KEY_APPLIED, encode(&WLogId::from(a)));
            // Keep the last `history_retention` revisions of history.
            let floor = self.history_floor()?;
            let new_floor = (a.index + 1).saturating_sub(self.opts.history_retention);
            if new_floor > floor {
                // From the old floor only: one small range tombstone per batch, not ever
                // longer overlapping ones from zero.
                batch.delete_range_cf(cf_hist, history_key(floor, 0), history_key(new_floor, 0));
                batch.put_cf(cf_meta, KEY_HISTORY_FLOOR, new_floor.to_be_bytes());
            }
        }
        for (pos, ev) in &events {
            batch.put_cf(cf_hist, history_key(pos.0, pos.1), encode(ev));
        }
        self.db.db.write(batch)?;
        self.set_applied_cache(applied);
        Ok((responses, events))
    }

    /// Best reconstruction of the answer for an entry applied before: it succeeded if it left
    /// history (a transaction without ops leaves none and is reported as not applied).
    fn replayed_response(&self, index: u64) -> Result<TxnResponse, StoreError> {
        let cf = self.db.cf(CF_HISTORY);
        let start = history_key(index, 0);
        let found = match self
            .db
            .db
            .iterator_cf(cf, IteratorMode::From(&start, Direction::Forward))
            .next()
        {
            Some(item) => parse_history_key(&item?.0)?.0 == index,
            None => false,
        };
        Ok(TxnResponse {
            succeeded: found,
            revision: index,
            failed_precondition: None,
        })
    }

    /// A row as the batch being applied sees it: its own earlier writes first, then RocksDB.
    fn lookup(
        &self,
        overlay: &HashMap<Vec<u8>, Option<Row>>,
        k: &[u8],
    ) -> Result<Option<Row>, StoreError> {
        if let Some(r) = overlay.get(k) {
            return Ok(r.clone());
        }
        match self.db.db.get_pinned_cf(self.db.cf(CF_ROWS), k)? {
            None => Ok(None),
            Some(v) => Ok(Some(decode_row(k, &v)?)),
        }
    }

    /// Applies a keyed transaction once per request id: a repeat within [`REQUEST_WINDOW`]
    /// revisions of the first changes nothing and gets the first one's answer. Whether a
    /// record counts is decided by its age alone, never by whether pruning (which runs per
    /// batch, and batches differ between nodes) has removed it yet, so replicas agree.
    fn apply_keyed(
        &self,
        index: u64,
        keyed: &KeyedTxn,
        overlay: &mut HashMap<Vec<u8>, Option<Row>>,
        batch: &mut WriteBatch,
        events: &mut Vec<Positioned>,
    ) -> Result<TxnResponse, StoreError> {
        if keyed.validate().is_err() {
            return Ok(TxnResponse {
                succeeded: false,
                revision: index,
                failed_precondition: None,
            });
        }
        let rk = row_key(T_REQUESTS, &keyed.request_id);
        if let Some(first) = self.lookup(overlay, &rk)? {
            if index.saturating_sub(first.mod_revision) < REQUEST_WINDOW {
                return decode(&first.value).map_err(corrupt(format!(
                    "response recorded for request {}",
                    keyed.request_id
                )));
            }
        }
        let resp = self.apply_txn(index, &keyed.txn, overlay, batch, events)?;
        let cf_rows = self.db.cf(CF_ROWS);
        let record = Row {
            value: encode(&resp),
            create_revision: index,
            mod_revision: index,
            version: 1,
        };
        batch.put_cf(cf_rows, &rk, encode(&record));
        overlay.insert(rk, Some(record));
        let by_rev = row_key(
            T_REQUESTS_BY_REVISION,
            &format!("{index:020}/{}", keyed.request_id),
        );
        let marker = Row {
            value: Vec::new(),
            create_revision: index,
            mod_revision: index,
            version: 1,
        };
        batch.put_cf(cf_rows, &by_rev, encode(&marker));
        Ok(resp)
    }

    /// Removes request ids older than the window as of `applied`, a bounded number per batch.
    fn prune_request_ids(
        &self,
        applied: u64,
        overlay: &HashMap<Vec<u8>, Option<Row>>,
        batch: &mut WriteBatch,
    ) -> Result<(), StoreError> {
        let Some(expired_below) = applied.checked_sub(REQUEST_WINDOW) else {
            return Ok(());
        };
        let cf_rows = self.db.cf(CF_ROWS);
        let prefix = row_key(T_REQUESTS_BY_REVISION, "");
        let from = self.request_prune_from.load(Ordering::Relaxed);
        if from > expired_below {
            return Ok(());
        }
        let start = row_key(T_REQUESTS_BY_REVISION, &format!("{from:020}"));
        let mut opts = rocksdb::ReadOptions::default();
        opts.set_iterate_upper_bound(row_key(
            T_REQUESTS_BY_REVISION,
            &format!("{:020}", expired_below + 1),
        ));
        let iter = self.db.db.iterator_cf_opt(
            cf_rows,
            opts,
            IteratorMode::From(&start, Direction::Forward),
        );
        let mut done_below = expired_below + 1;
        for (n, item) in iter.enumerate() {
            let (k, _) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            let invalid = |reason: &str| StoreError::Invalid {
                what: "request id index key".into(),
                reason: reason.into(),
            };
            let rest = std::str::from_utf8(&k[prefix.len()..]).map_err(|_| invalid("not UTF-8"))?;
            let (rev, id) = rest.split_once('/').ok_or_else(|| invalid("no '/'"))?;
            let rev: u64 = rev.parse().map_err(|_| invalid("bad revision"))?;
            if rev > expired_below {
                break;
            }
            if n == REQUEST_PRUNE_PER_BATCH {
                // The rest go with the next batches, starting here.
                done_below = rev;
                break;
            }
            batch.delete_cf(cf_rows, &k);
            // The id may have been used again since (a repeat after the window): then its
            // record is newer than this index entry and stays.
            let rk = row_key(T_REQUESTS, id);
            if self
                .lookup(overlay, &rk)?
                .is_some_and(|r| r.mod_revision == rev)
            {
                batch.delete_cf(cf_rows, &rk);
            }
        }
        self.request_prune_from.store(done_below, Ordering::Relaxed);
        Ok(())
    }

    fn apply_txn(
        &self,
        index: u64,
        txn: &Txn,
        overlay: &mut HashMap<Vec<u8>, Option<Row>>,
        batch: &mut WriteBatch,
        events: &mut Vec<Positioned>,
    ) -> Result<TxnResponse, StoreError> {
        // A committed transaction with bad names (a peer that skipped validation) is refused
        // the same way on every node, so replicas stay identical.
        if txn.validate().is_err() {
            return Ok(TxnResponse {
                succeeded: false,
                revision: index,
                failed_precondition: None,
            });
        }
        for (i, p) in txn.preconditions.iter().enumerate() {
            let row = self.lookup(overlay, &row_key(&p.table, &p.key))?;
            let holds = match p.expect {
                Expect::Absent => row.is_none(),
                Expect::Present => row.is_some(),
                Expect::Revision(r) => row.is_some_and(|row| row.mod_revision == r),
            };
            if !holds {
                return Ok(TxnResponse {
                    succeeded: false,
                    revision: index,
                    failed_precondition: Some(i as u32),
                });
            }
        }
        // The adds are decided before anything is written: one that cannot apply fails the
        // whole transaction, as a precondition would (its index follows the preconditions').
        let mut added: Vec<Option<Vec<u8>>> = vec![None; txn.ops.len()];
        let has_add = txn.ops.iter().any(|op| matches!(op, Op::Add(_)));
        let mut scratch: HashMap<Vec<u8>, Option<Vec<u8>>> = HashMap::new();
        for (i, op) in txn.ops.iter().enumerate().filter(|_| has_add) {
            let k = row_key(op.table(), op.key());
            match op {
                Op::Put { value, .. } => {
                    scratch.insert(k, Some(value.clone()));
                }
                Op::Delete { .. } => {
                    scratch.insert(k, None);
                }
                Op::Add(a) => {
                    let current = match scratch.get(&k) {
                        Some(v) => v.clone(),
                        None => self.lookup(overlay, &k)?.map(|r| r.value),
                    };
                    match a.apply(current.as_deref()) {
                        Ok(v) => {
                            scratch.insert(k, Some(v.clone()));
                            added[i] = Some(v);
                        }
                        Err(_) => {
                            return Ok(TxnResponse {
                                succeeded: false,
                                revision: index,
                                failed_precondition: Some((txn.preconditions.len() + i) as u32),
                            })
                        }
                    }
                }
            }
        }
        let cf_rows = self.db.cf(CF_ROWS);
        let mut seq = 0u32;
        for (op, added) in txn.ops.iter().zip(added) {
            let k = row_key(op.table(), op.key());
            let existing = self.lookup(overlay, &k)?;
            let kind = match op {
                Op::Put { .. } | Op::Add(_) => {
                    let value = match (op, added) {
                        (Op::Put { value, .. }, _) => value.clone(),
                        (_, Some(v)) => v,
                        _ => unreachable!("every add was decided above"),
                    };
                    let row = match existing {
                        Some(old) => Row {
                            value,
                            create_revision: old.create_revision,
                            mod_revision: index,
                            version: old.version + 1,
                        },
                        None => Row {
                            value,
                            create_revision: index,
                            mod_revision: index,
                            version: 1,
                        },
                    };
                    batch.put_cf(cf_rows, &k, encode(&row));
                    overlay.insert(k, Some(row.clone()));
                    EventKind::Put(row)
                }
                Op::Delete { .. } => {
                    if existing.is_none() {
                        // Deleting nothing changes nothing and tells no watcher anything.
                        continue;
                    }
                    batch.delete_cf(cf_rows, &k);
                    overlay.insert(k, None);
                    EventKind::Delete
                }
            };
            events.push((
                (index, seq),
                WatchEvent {
                    revision: index,
                    table: op.table().to_owned(),
                    key: op.key().to_owned(),
                    kind,
                },
            ));
            seq += 1;
        }
        Ok(TxnResponse {
            succeeded: true,
            revision: index,
            failed_precondition: None,
        })
    }

    fn snapshot_path(&self, name: &str) -> std::path::PathBuf {
        self.db.snapshot_dir().join(name)
    }

    /// Deletes every snapshot file but `keep` (callers hold `snapshot_lock`).
    fn delete_other_snapshots(&self, keep: &str) -> Result<(), StoreError> {
        for e in std::fs::read_dir(self.db.snapshot_dir())? {
            let e = e?;
            if e.file_name().to_str() != Some(keep) {
                std::fs::remove_file(e.path())?;
            }
        }
        Ok(())
    }

    fn build_snapshot_blocking(&self) -> Result<(SnapshotMeta, File), StoreError> {
        let _guard = self.snapshot_lock.lock().unwrap_or_else(|e| e.into_inner());
        let snap = self.db.db.snapshot();
        let cf_meta = self.db.cf(CF_SM_META);
        let cf_rows = self.db.cf(CF_ROWS);
        let applied: Option<LogId> = match snap.get_cf(cf_meta, KEY_APPLIED)? {
            None => None,
            Some(v) => Some(LogId::from(
                &decode::<WLogId>(&v).map_err(corrupt("applied log id"))?,
            )),
        };
        let membership = match snap.get_cf(cf_meta, KEY_MEMBERSHIP)? {
            None => StoredMembership::default(),
            Some(v) => {
                let w: WStoredMembership = decode(&v).map_err(corrupt("stored membership"))?;
                StoredMembership::try_from(&w).map_err(|e| StoreError::Invalid {
                    what: "stored membership".into(),
                    reason: e.to_string(),
                })?
            }
        };
        let meta = SnapshotMeta {
            last_log_id: applied,
            last_membership: membership,
        };
        // First pass counts, so the header can say how much follows.
        let mut rows = 0u64;
        for item in snap.iterator_cf(cf_rows, IteratorMode::Start) {
            item?;
            rows += 1;
        }
        let batches = rows.div_ceil(ROWS_PER_BATCH as u64);
        let name = snapshot_file_name(applied.as_ref());
        let tmp = self.snapshot_path(&format!("{name}.part"));
        let header = SnapshotHeader {
            meta: WSnapshotMeta::from(&meta),
            rows,
            batches,
        };
        let mut w = SnapshotWriter::create(&tmp, &header)?;
        let mut batch = RowBatch::default();
        let mut written = 0u64;
        for item in snap.iterator_cf(cf_rows, IteratorMode::Start) {
            let (k, v) = item?;
            let (table, key) = split_row_key(&k)?;
            let row = decode_row(&k, &v)?;
            batch.rows.push(SnapRow { table, key, row });
            written += 1;
            if batch.rows.len() == ROWS_PER_BATCH || written == rows {
                w.write_batch(&batch)?;
                batch.rows.clear();
            }
            if written == rows {
                break;
            }
        }
        w.finish()?;
        self.commit_snapshot_file(&tmp, &name)?;
        let mut file = File::open(self.snapshot_path(&name))?;
        file.seek(SeekFrom::Start(0))?;
        Ok((meta, file))
    }

    /// Renames a finished file into place and makes it the current snapshot.
    fn commit_snapshot_file(&self, tmp: &Path, name: &str) -> Result<(), StoreError> {
        std::fs::rename(tmp, self.snapshot_path(name))?;
        File::open(self.db.snapshot_dir())?.sync_all()?;
        let mut b = WriteBatch::default();
        b.put_cf(self.db.cf(CF_SM_META), KEY_SNAPSHOT, name.as_bytes());
        self.db.write_synced(b)?;
        *self
            .current_snapshot
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(name.to_owned());
        self.delete_other_snapshots(name)
    }

    fn install_snapshot_blocking(
        &self,
        meta: &SnapshotMeta,
        mut src: File,
    ) -> Result<(), StoreError> {
        let _guard = self.snapshot_lock.lock().unwrap_or_else(|e| e.into_inner());
        src.seek(SeekFrom::Start(0))?;
        let name = snapshot_file_name(meta.last_log_id.as_ref());
        let tmp = self.snapshot_path(&format!("{name}.part"));
        // Verify the whole file while copying it; state is untouched until it passes.
        let header = {
            let mut out = io::BufWriter::new(File::create(&tmp)?);
            let res = snapshot::read_verified(&mut src, Some(&mut out), |_| Ok(()));
            let header = match res {
                Ok(h) => h,
                Err(e) => {
                    drop(out);
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e);
                }
            };
            let f = out.into_inner().map_err(|e| e.into_error())?;
            f.sync_all()?;
            header
        };
        if header.meta != WSnapshotMeta::from(meta) {
            let _ = std::fs::remove_file(&tmp);
            return Err(StoreError::BadSnapshot(
                "its header does not match the snapshot metadata it was sent with".into(),
            ));
        }
        std::fs::rename(&tmp, self.snapshot_path(&name))?;
        File::open(self.db.snapshot_dir())?.sync_all()?;
        // From here a crash is finished at the next open: the marker names a verified file.
        let mut b = WriteBatch::default();
        b.put_cf(self.db.cf(CF_SM_META), KEY_INSTALLING, name.as_bytes());
        self.db.write_synced(b)?;
        self.replace_state_from(&name)
    }

    /// Replaces rows and history with the contents of a verified snapshot file, writing the
    /// applied log id and clearing the install marker last.
    fn replace_state_from(&self, name: &str) -> Result<(), StoreError> {
        let cf_rows = self.db.cf(CF_ROWS);
        let cf_hist = self.db.cf(CF_HISTORY);
        let cf_meta = self.db.cf(CF_SM_META);
        let mut clear = WriteBatch::default();
        // Row keys start with a table name byte (a-z, 0-9, '_'), all below 0xff.
        clear.delete_range_cf(cf_rows, vec![], vec![0xffu8]);
        clear.delete_range_cf(cf_hist, history_key(0, 0), history_key(u64::MAX, u32::MAX));
        clear.delete_cf(cf_hist, history_key(u64::MAX, u32::MAX));
        self.db.db.write(clear)?;
        let file = File::open(self.snapshot_path(name))?;
        let header = snapshot::read_verified(file, None, |batch| {
            let mut b = WriteBatch::default();
            for r in batch.rows {
                b.put_cf(cf_rows, row_key(&r.table, &r.key), encode(&r.row));
            }
            self.db.db.write(b)?;
            Ok(())
        })?;
        let meta = SnapshotMeta::try_from(&header.meta)
            .map_err(|e| StoreError::BadSnapshot(e.to_string()))?;
        let mut b = WriteBatch::default();
        match &meta.last_log_id {
            Some(l) => b.put_cf(cf_meta, KEY_APPLIED, encode(&WLogId::from(l))),
            None => b.delete_cf(cf_meta, KEY_APPLIED),
        }
        b.put_cf(
            cf_meta,
            KEY_MEMBERSHIP,
            encode(&WStoredMembership::from(&meta.last_membership)),
        );
        let floor = meta.last_log_id.as_ref().map_or(0, |l| l.index + 1);
        b.put_cf(cf_meta, KEY_HISTORY_FLOOR, floor.to_be_bytes());
        b.put_cf(cf_meta, KEY_SNAPSHOT, name.as_bytes());
        b.delete_cf(cf_meta, KEY_INSTALLING);
        self.db.write_synced(b)?;
        self.set_applied_cache(meta.last_log_id);
        // The snapshot's request-id index may start below where this node had pruned to.
        self.request_prune_from.store(0, Ordering::Relaxed);
        *self
            .current_snapshot
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(name.to_owned());
        self.delete_other_snapshots(name)?;
        // Watchers following live events cannot see what the snapshot skipped over.
        let _ = self.live.send(Live::Reset { floor });
        Ok(())
    }

    fn current_snapshot_blocking(&self) -> Result<Option<(SnapshotMeta, File)>, StoreError> {
        let _guard = self.snapshot_lock.lock().unwrap_or_else(|e| e.into_inner());
        let name = self
            .current_snapshot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some(name) = name else {
            return Ok(None);
        };
        let mut file = File::open(self.snapshot_path(&name))?;
        let header = snapshot::read_header(&mut file)?;
        let meta = SnapshotMeta::try_from(&header.meta)
            .map_err(|e| StoreError::BadSnapshot(e.to_string()))?;
        file.seek(SeekFrom::Start(0))?;
        Ok(Some((meta, file)))
    }

    fn list_blocking(
        &self,
        table: &str,
        prefix: &str,
        limit: usize,
    ) -> Result<(u64, Vec<(String, Row)>), StoreError> {
        let snap = self.db.db.snapshot();
        let revision = match snap.get_cf(self.db.cf(CF_SM_META), KEY_APPLIED)? {
            None => 0,
            Some(v) => {
                decode::<WLogId>(&v)
                    .map_err(corrupt("applied log id"))?
                    .index
            }
        };
        let start = row_key(table, prefix);
        let mut out = Vec::new();
        for item in snap.iterator_cf(
            self.db.cf(CF_ROWS),
            IteratorMode::From(&start, Direction::Forward),
        ) {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item?;
            if !k.starts_with(&start) {
                break;
            }
            let (_, key) = split_row_key(&k)?;
            out.push((key, decode_row(&k, &v)?));
        }
        Ok((revision, out))
    }
}

impl StateMachineStore {
    pub(crate) fn open(db: Arc<Db>, opts: StoreOptions) -> Result<Self, StoreError> {
        let (live, _) = broadcast::channel(opts.watch_channel_capacity.max(1));
        let inner = Arc::new(Inner {
            db,
            opts,
            live,
            revision: AtomicU64::new(0),
            applied: Mutex::new(None),
            current_snapshot: Mutex::new(None),
            snapshot_lock: Mutex::new(()),
            incoming_seq: AtomicU64::new(0),
            request_prune_from: AtomicU64::new(0),
        });
        // Leftovers of a build or receive that a crash interrupted.
        for e in std::fs::read_dir(inner.db.snapshot_dir())? {
            let e = e?;
            if e.file_name().to_string_lossy().ends_with(".part") {
                std::fs::remove_file(e.path())?;
            }
        }
        if let Some(name) = inner.meta_get(KEY_INSTALLING)? {
            let name = String::from_utf8(name).map_err(|_| StoreError::Invalid {
                what: "install marker".into(),
                reason: "it is not UTF-8".into(),
            })?;
            tracing::warn!(snapshot = %name, "finishing a snapshot install interrupted by a crash");
            inner.replace_state_from(&name)?;
        }
        let snapshot = inner
            .meta_get(KEY_SNAPSHOT)?
            .map(|n| String::from_utf8_lossy(&n).into_owned());
        *inner
            .current_snapshot
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = snapshot;
        inner.set_applied_cache(inner.read_applied()?);
        Ok(StateMachineStore { inner })
    }

    /// Applies entries in order, in one synced write, and returns one response per entry.
    /// This is what [`RaftStateMachine::apply`] does; it is public for tools and tests that
    /// drive the state machine without Raft.
    pub async fn apply_entries(
        &mut self,
        entries: Vec<Entry>,
    ) -> Result<Vec<TxnResponse>, StoreError> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let through = entries.last().map_or(0, |e| e.log_id.index);
        let inner = self.inner.clone();
        let (responses, events) = blocking(move || inner.apply_batch(&entries)).await?;
        // Sent even without events: `through` is the watchers' progress mark, so a watcher of
        // a quiet table still learns that it has seen everything up to the applied index. No
        // receiver is not an error: nobody is watching.
        let _ = self.inner.live.send(Live::Events {
            events: Arc::new(events),
            through,
        });
        Ok(responses)
    }

    /// A read handle on this replica, for the API, the scheduler and the agents.
    pub fn reader(&self) -> StateReader {
        StateReader {
            inner: self.inner.clone(),
        }
    }
}

impl StateReader {
    /// The row `table/key` as of the last applied entry.
    pub async fn get(&self, table: &str, key: &str) -> Result<Option<Row>, StoreError> {
        let inner = self.inner.clone();
        let (table, key) = (table.to_owned(), key.to_owned());
        blocking(move || inner.get_row(&table, &key)).await
    }

    /// Up to `limit` rows of `table` whose key starts with `prefix`, in key order.
    pub async fn list(
        &self,
        table: &str,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<(String, Row)>, StoreError> {
        Ok(self.list_with_revision(table, prefix, limit).await?.1)
    }

    /// Like [`StateReader::list`], with the revision the listing is consistent with: a client
    /// that then watches from `revision + 1` misses nothing and sees nothing twice.
    pub async fn list_with_revision(
        &self,
        table: &str,
        prefix: &str,
        limit: usize,
    ) -> Result<(u64, Vec<(String, Row)>), StoreError> {
        let inner = self.inner.clone();
        let (table, prefix) = (table.to_owned(), prefix.to_owned());
        blocking(move || inner.list_blocking(&table, &prefix, limit)).await
    }

    /// The replica's revision: the index of the last applied entry (0 before any).
    pub fn revision(&self) -> u64 {
        self.inner.revision.load(Ordering::Acquire)
    }

    /// The log id of the last applied entry.
    pub fn applied_log_id(&self) -> Option<LogId> {
        *self.inner.applied.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The oldest revision a watch can start from.
    pub async fn history_floor(&self) -> Result<u64, StoreError> {
        let inner = self.inner.clone();
        blocking(move || inner.history_floor()).await
    }

    /// Size in bytes of the current snapshot file, if there is one (for metrics).
    pub fn snapshot_file_size(&self) -> Option<u64> {
        let name = self
            .inner
            .current_snapshot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()?;
        std::fs::metadata(self.inner.snapshot_path(&name))
            .ok()
            .map(|m| m.len())
    }

    /// An anonymous file, on the store's disk, for receiving a snapshot from a peer before
    /// handing it to `Raft::install_full_snapshot`. It is unlinked at once, so nothing is left
    /// behind if the transfer fails.
    pub fn incoming_snapshot_file(&self) -> io::Result<File> {
        let n = self.inner.incoming_seq.fetch_add(1, Ordering::Relaxed);
        let path = self
            .inner
            .db
            .snapshot_dir()
            .join(format!("incoming-{}-{n}.part", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        std::fs::remove_file(&path)?;
        Ok(f)
    }

    /// Events of `table` whose key starts with `key_prefix`, from `from_revision` on: first the
    /// retained history, then live events as entries are applied, without gap or duplicate.
    /// Fails with [`WatchError::Compacted`] if `from_revision` is older than the history kept.
    pub async fn watch(
        &self,
        table: &str,
        key_prefix: &str,
        from_revision: u64,
    ) -> Result<WatchStream, WatchError> {
        // Subscribe before reading anything, so that every event committed after the history
        // read is also in the live channel.
        let live = self.inner.live.subscribe();
        let inner = self.inner.clone();
        let floor = blocking(move || inner.history_floor())
            .await
            .map_err(WatchError::Store)?;
        if from_revision < floor {
            return Err(WatchError::Compacted { oldest: floor });
        }
        Ok(watch::spawn(
            self.inner.db.clone(),
            table.to_owned(),
            key_prefix.to_owned(),
            from_revision,
            live,
        ))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = File;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let inner = self.inner.clone();
        let (meta, file) = blocking(move || inner.build_snapshot_blocking()).await?;
        Ok(Snapshot {
            meta,
            snapshot: file,
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotData = File;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let inner = self.inner.clone();
        Ok(blocking(move || Ok((inner.read_applied()?, inner.read_membership()?))).await?)
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        let mut batch = Vec::new();
        let mut responders = Vec::new();
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            batch.push(entry);
            responders.push(responder);
        }
        let responses = self.apply_entries(batch).await?;
        for (resp, responder) in responses.into_iter().zip(responders) {
            if let Some(r) = responder {
                r.send(resp);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            inner: self.inner.clone(),
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: File,
    ) -> Result<(), io::Error> {
        let inner = self.inner.clone();
        let meta = meta.clone();
        Ok(blocking(move || inner.install_snapshot_blocking(&meta, snapshot)).await?)
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        let inner = self.inner.clone();
        let cur = blocking(move || inner.current_snapshot_blocking()).await?;
        Ok(cur.map(|(meta, snapshot)| Snapshot { meta, snapshot }))
    }
}

#[cfg(any(test, feature = "testing"))]
impl StateReader {
    /// Leaves the store as a crash in the middle of installing its current snapshot would:
    /// the install marker set and the rows half replaced (tests of recovery at open).
    pub fn simulate_interrupted_install_for_test(&self) -> Result<(), StoreError> {
        let inner = &self.inner;
        let name = inner
            .current_snapshot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| StoreError::BadSnapshot("there is no current snapshot".into()))?;
        let mut b = WriteBatch::default();
        b.put_cf(inner.db.cf(CF_SM_META), KEY_INSTALLING, name.as_bytes());
        b.delete_range_cf(inner.db.cf(CF_ROWS), vec![], vec![0xffu8]);
        b.put_cf(
            inner.db.cf(CF_ROWS),
            row_key("t", "half-written"),
            encode(&Row {
                value: vec![],
                create_revision: 1,
                mod_revision: 1,
                version: 1,
            }),
        );
        inner.db.write_synced(b)
    }
}
