//! The Raft log store: entries, vote, committed and last-purged log ids.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader};
use rocksdb::{Direction, IteratorMode, WriteBatch};
use shoal_types::codec::{decode, encode};

use super::{blocking, corrupt, Db, StoreError, CF_LOG, CF_RAFT_META};
use crate::raft_types::{Entry, LogId, TypeConfig, Vote};
use crate::wire::{WEntry, WLogId, WVote};

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_LAST_PURGED: &[u8] = b"last_purged";

/// openraft's log storage on RocksDB. Cheap to clone; clones share the database and serve as
/// the log reader.
#[derive(Clone, Debug)]
pub struct LogStore {
    db: Arc<Db>,
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn decode_entry(key: &[u8], value: &[u8]) -> Result<Entry, StoreError> {
    let index = <[u8; 8]>::try_from(key)
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::Invalid {
            what: "log key".into(),
            reason: format!("{} bytes instead of 8", key.len()),
        })?;
    let w: WEntry = decode(value).map_err(corrupt(format!("log entry {index}")))?;
    if w.log_id.index != index {
        return Err(StoreError::Invalid {
            what: format!("log entry {index}"),
            reason: format!("it carries index {}", w.log_id.index),
        });
    }
    Entry::try_from(w).map_err(|e| StoreError::Invalid {
        what: format!("log entry {index}"),
        reason: e.to_string(),
    })
}

impl LogStore {
    pub(crate) fn new(db: Arc<Db>) -> Self {
        LogStore { db }
    }

    fn get_log_id(&self, key: &[u8]) -> Result<Option<LogId>, StoreError> {
        let cf = self.db.cf(CF_RAFT_META);
        match self.db.db.get_pinned_cf(cf, key)? {
            None => Ok(None),
            Some(v) => {
                let w: WLogId = decode(&v).map_err(corrupt("raft_meta log id"))?;
                Ok(Some(LogId::from(&w)))
            }
        }
    }

    fn read_vote_blocking(&self) -> Result<Option<Vote>, StoreError> {
        let cf = self.db.cf(CF_RAFT_META);
        match self.db.db.get_pinned_cf(cf, KEY_VOTE)? {
            None => Ok(None),
            Some(v) => {
                let w: WVote = decode(&v).map_err(corrupt("vote"))?;
                Ok(Some(Vote::from(&w)))
            }
        }
    }

    fn entries_blocking(&self, start: u64, end: Option<u64>) -> Result<Vec<Entry>, StoreError> {
        let cf = self.db.cf(CF_LOG);
        let mut out = Vec::new();
        let from = index_key(start);
        for item in self
            .db
            .db
            .iterator_cf(cf, IteratorMode::From(&from, Direction::Forward))
        {
            let (k, v) = item?;
            // Stop on the key, before decoding: an entry outside the range is not read.
            if let (Some(end), Ok(key)) = (end, <[u8; 8]>::try_from(&k[..])) {
                if u64::from_be_bytes(key) >= end {
                    break;
                }
            }
            out.push(decode_entry(&k, &v)?);
        }
        Ok(out)
    }

    fn last_entry_log_id(&self) -> Result<Option<LogId>, StoreError> {
        let cf = self.db.cf(CF_LOG);
        match self.db.db.iterator_cf(cf, IteratorMode::End).next() {
            None => Ok(None),
            Some(item) => {
                let (k, v) = item?;
                Ok(Some(decode_entry(&k, &v)?.log_id))
            }
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let start = match range.start_bound() {
            Bound::Included(s) => *s,
            Bound::Excluded(s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(e) => Some(e.saturating_add(1)),
            Bound::Excluded(e) => Some(*e),
            Bound::Unbounded => None,
        };
        if end.is_some_and(|end| end <= start) {
            return Ok(Vec::new());
        }
        let this = self.clone();
        Ok(blocking(move || this.entries_blocking(start, end)).await?)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        let this = self.clone();
        Ok(blocking(move || this.read_vote_blocking()).await?)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let this = self.clone();
        Ok(blocking(move || {
            let last_purged = this.get_log_id(KEY_LAST_PURGED)?;
            let last = this.last_entry_log_id()?.or(last_purged);
            Ok(LogState {
                last_purged_log_id: last_purged,
                last_log_id: last,
            })
        })
        .await?)
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        let bytes = encode(&WVote::from(vote));
        let db = self.db.clone();
        Ok(blocking(move || {
            let mut b = WriteBatch::default();
            b.put_cf(db.cf(CF_RAFT_META), KEY_VOTE, bytes);
            db.write_synced(b)
        })
        .await?)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        let db = self.db.clone();
        Ok(blocking(move || {
            let mut b = WriteBatch::default();
            let cf = db.cf(CF_RAFT_META);
            match committed {
                Some(c) => b.put_cf(cf, KEY_COMMITTED, encode(&WLogId::from(&c))),
                None => b.delete_cf(cf, KEY_COMMITTED),
            }
            // Committed is a hint that saves re-applying on restart; losing it is safe, so it
            // is not synced on its own (the next synced write carries it).
            db.db.write(b)?;
            Ok(())
        })
        .await?)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        let this = self.clone();
        Ok(blocking(move || this.get_log_id(KEY_COMMITTED)).await?)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let encoded: Vec<([u8; 8], Vec<u8>)> = entries
            .into_iter()
            .map(|e| (index_key(e.log_id.index), encode(&WEntry::from(&e))))
            .collect();
        let db = self.db.clone();
        let res = blocking(move || {
            let mut b = WriteBatch::default();
            let cf = db.cf(CF_LOG);
            for (k, v) in encoded {
                b.put_cf(cf, k, v);
            }
            db.write_synced(b)
        })
        .await;
        // Acknowledge only once the WAL is synced.
        match res {
            Ok(()) => {
                callback.io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                let msg = e.to_string();
                callback.io_completed(Err(io::Error::other(msg)));
                Err(e.into())
            }
        }
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map_or(0, |l| l.index + 1);
        let db = self.db.clone();
        Ok(blocking(move || {
            let mut b = WriteBatch::default();
            let cf = db.cf(CF_LOG);
            b.delete_range_cf(cf, index_key(from), index_key(u64::MAX));
            b.delete_cf(cf, index_key(u64::MAX));
            db.write_synced(b)
        })
        .await?)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        let db = self.db.clone();
        Ok(blocking(move || {
            let mut b = WriteBatch::default();
            b.put_cf(
                db.cf(CF_RAFT_META),
                KEY_LAST_PURGED,
                encode(&WLogId::from(&log_id)),
            );
            b.delete_range_cf(db.cf(CF_LOG), index_key(0), index_key(log_id.index + 1));
            db.write_synced(b)
        })
        .await?)
    }
}

#[cfg(any(test, feature = "testing"))]
impl LogStore {
    /// Overwrites the stored bytes of entry `index` (tests of corruption handling).
    pub fn corrupt_entry_for_test(&self, index: u64, bytes: &[u8]) -> Result<(), StoreError> {
        self.db
            .db
            .put_cf(self.db.cf(CF_LOG), index_key(index), bytes)?;
        Ok(())
    }
}
