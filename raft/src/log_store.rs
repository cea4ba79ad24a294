//! The node's Raft log store: one redb database holding every group's log
//! entries, vote, committed log id and last purged log id.
//!
//! [`SharedLog`] owns the database, the writer thread of `group_commit.rs`
//! and an in-memory index per group (`log index -> seq`, rebuilt from the
//! database's directory when it is opened). [`GroupLogStore`] is the cheap
//! per-group handle that openraft drives through its `RaftLogStorage` and
//! `RaftLogReader` traits; every group of the node holds one, all sharing one
//! `SharedLog`.
//!
//! Reads never wait for the writer: an appended entry is readable as soon as
//! `append` returns (openraft requires it), from the `unflushed` map until its
//! transaction commits, from redb afterwards.

use std::collections::{HashMap, VecDeque};
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use openraft::OptionalSend;
use openraft::entry::RaftEntry;
use openraft::storage::{RaftLogReader, RaftLogStorage};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, oneshot};

use crate::group_commit::{
    self, CommitObserver, DIRECTORY, Done, ENTRIES, GROUP_META, MetaKind, Op, Request, SNAPSHOTS,
};
use crate::types::{Entry, GroupId, IoFlushed, LogId, LogState, TypeConfig, Vote};

/// Most bytes of entries one `limited_get_log_entries` call returns (at least
/// one entry is always returned), so that replicating a long log sends it in
/// bounded pieces.
pub const MAX_READ_BYTES: usize = 4 * 1024 * 1024;

/// Why the shared log could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum LogStoreError {
    #[error("raft log database: {0}")]
    Database(#[from] redb::Error),
    #[error("raft log database is inconsistent: {0}")]
    Corrupt(String),
    #[error("raft log writer thread: {0}")]
    Io(#[from] io::Error),
}

impl From<redb::DatabaseError> for LogStoreError {
    fn from(e: redb::DatabaseError) -> Self {
        LogStoreError::Database(e.into())
    }
}
impl From<redb::TransactionError> for LogStoreError {
    fn from(e: redb::TransactionError) -> Self {
        LogStoreError::Database(e.into())
    }
}
impl From<redb::TableError> for LogStoreError {
    fn from(e: redb::TableError) -> Self {
        LogStoreError::Database(e.into())
    }
}
impl From<redb::StorageError> for LogStoreError {
    fn from(e: redb::StorageError) -> Self {
        LogStoreError::Database(e.into())
    }
}
impl From<redb::CommitError> for LogStoreError {
    fn from(e: redb::CommitError) -> Self {
        LogStoreError::Database(e.into())
    }
}

/// The node's one log database, shared by every Raft group on the node.
pub struct SharedLog {
    db: Arc<Database>,
    state: Arc<StateCell>,
    /// `None` only while dropping, so the writer sees the channel close.
    requests: Option<mpsc::Sender<Request>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

/// What the node knows about every group's log, guarded by one mutex. Held
/// only for in-memory bookkeeping, never across I/O.
#[derive(Default)]
struct State {
    next_seq: u64,
    groups: HashMap<GroupId, GroupState>,
    /// Entries handed to the writer but not yet committed, by seq.
    unflushed: HashMap<u64, Bytes>,
    /// Set when a write failed; every later operation fails with it.
    failed: Option<String>,
}

#[derive(Default, Debug)]
struct GroupState {
    /// Log index of `seqs[0]`; when `seqs` is empty, the index the next entry
    /// must have if the group has purged (otherwise unused).
    first_index: u64,
    /// Sequence number of each present entry, in index order, no holes.
    seqs: VecDeque<u64>,
    vote: Option<Bytes>,
    committed: Option<Bytes>,
    /// Index and encoding of the last purged log id.
    purged: Option<(u64, Bytes)>,
}

impl GroupState {
    /// The index the next appended entry must have, if the group's log
    /// constrains it (an empty, never purged log accepts any).
    fn next_index(&self) -> Option<u64> {
        if !self.seqs.is_empty() {
            Some(self.first_index + self.seqs.len() as u64)
        } else {
            self.purged.as_ref().map(|(index, _)| index + 1)
        }
    }

    fn last_index(&self) -> Option<u64> {
        (!self.seqs.is_empty()).then(|| self.first_index + self.seqs.len() as u64 - 1)
    }
}

struct StateCell(Mutex<State>);

impl StateCell {
    fn lock(&self) -> io::Result<MutexGuard<'_, State>> {
        self.0
            .lock()
            .map_err(|_| io::Error::other("raft log state lock poisoned"))
    }
}

impl CommitObserver for StateCell {
    fn committed(&self, seqs: &[u64]) {
        // A poisoned lock means another thread panicked mid-update; the log
        // is already unusable and every caller gets the poison error.
        if let Ok(mut state) = self.0.lock() {
            for seq in seqs {
                state.unflushed.remove(seq);
            }
        }
    }

    fn failed(&self, reason: &str) {
        if let Ok(mut state) = self.0.lock() {
            state.failed = Some(reason.to_owned());
        }
    }
}

impl State {
    fn check(&self) -> io::Result<()> {
        match &self.failed {
            Some(reason) => Err(io::Error::other(reason.clone())),
            None => Ok(()),
        }
    }
}

impl SharedLog {
    /// Opens (or creates) the log database at `path`, rebuilds every group's
    /// index from it and starts the writer thread. Blocking: call it at
    /// startup, before the groups run.
    pub fn open(path: impl AsRef<Path>) -> Result<Arc<SharedLog>, LogStoreError> {
        let db = Database::create(path.as_ref())?;
        // Create the tables on a fresh database so readers can open them.
        let txn = db.begin_write()?;
        txn.open_table(ENTRIES)?;
        txn.open_table(DIRECTORY)?;
        txn.open_table(GROUP_META)?;
        txn.open_table(SNAPSHOTS)?;
        txn.commit()?;

        let state = load_state(&db)?;
        tracing::info!(
            path = %path.as_ref().display(),
            groups = state.groups.len(),
            next_seq = state.next_seq,
            "opened raft log"
        );
        let db = Arc::new(db);
        let state = Arc::new(StateCell(Mutex::new(state)));
        let (requests, writer) = group_commit::spawn_writer(db.clone(), state.clone())?;
        Ok(Arc::new(SharedLog {
            db,
            state,
            requests: Some(requests),
            writer: Some(writer),
        }))
    }

    /// The log store handle of one group. Creating it is free; a group that
    /// never wrote anything simply has an empty log.
    pub fn group(self: &Arc<Self>, group: GroupId) -> GroupLogStore {
        GroupLogStore {
            group,
            shared: self.clone(),
        }
    }

    /// Every group with any durable state (entries, vote, purge marker), so
    /// the node can restart its groups after a reboot.
    pub fn groups(&self) -> io::Result<Vec<GroupId>> {
        let state = self.state.lock()?;
        let mut groups: Vec<GroupId> = state.groups.keys().copied().collect();
        groups.sort_unstable();
        Ok(groups)
    }

    /// Durably replaces `group`'s snapshot with `bytes` (the caller's
    /// encoding of metadata and state). Returns once it is committed, so the
    /// caller may then let the log below the snapshot be purged.
    pub async fn save_snapshot(&self, group: GroupId, bytes: Bytes) -> io::Result<()> {
        self.submit_durable(|_| Ok(vec![Op::PutSnapshot { group, bytes }]))
            .await
    }

    /// The snapshot last saved for `group`, if any. Reads the database
    /// directly; called when a group opens or a snapshot is sent, not per
    /// entry.
    pub fn load_snapshot(&self, group: GroupId) -> io::Result<Option<Bytes>> {
        self.state.lock()?.check()?;
        let read = self.db.begin_read().map_err(io_err)?;
        let table = read.open_table(SNAPSHOTS).map_err(io_err)?;
        Ok(table
            .get(group)
            .map_err(io_err)?
            .map(|guard| Bytes::copy_from_slice(guard.value())))
    }

    /// Deletes everything `group` has on disk: entries, vote, committed and
    /// purged ids, snapshot. The group must not be running.
    pub async fn remove_group(&self, group: GroupId) -> io::Result<()> {
        self.submit_durable(|state| {
            let mut ops = SharedLog::truncate_after(group, None, state);
            state.groups.remove(&group);
            for kind in [MetaKind::Vote, MetaKind::Committed, MetaKind::Purged] {
                ops.push(Op::DeleteMeta { group, kind });
            }
            ops.push(Op::DeleteSnapshot { group });
            Ok(ops)
        })
        .await
    }

    /// Sends a test hook to the writer, queued behind the requests before it.
    #[cfg(test)]
    pub(crate) async fn send_control(&self, control: group_commit::Control) -> io::Result<()> {
        self.submit(|_| {
            let mut request = Request::new(Vec::new(), None);
            request.control = Some(control);
            Ok(Some(request))
        })
        .await
    }

    /// Queues a request built under the state lock, so that the order of
    /// requests in the writer's queue is the order of the in-memory updates.
    async fn submit(
        &self,
        plan: impl FnOnce(&mut State) -> io::Result<Option<Request>>,
    ) -> io::Result<()> {
        let sender = self
            .requests
            .as_ref()
            .ok_or_else(|| io::Error::other("raft log is closed"))?;
        // Wait for queue room before taking the lock: never hold it across an await.
        let permit = sender
            .reserve()
            .await
            .map_err(|_| io::Error::other("raft log writer has stopped"))?;
        let mut state = self.state.lock()?;
        state.check()?;
        if let Some(request) = plan(&mut state)? {
            permit.send(request);
        }
        Ok(())
    }

    /// Like `submit`, then waits until the request's transaction committed.
    async fn submit_durable(
        &self,
        plan: impl FnOnce(&mut State) -> io::Result<Vec<Op>>,
    ) -> io::Result<()> {
        let (tx, rx) = oneshot::channel();
        let done: Done = Box::new(move |result| {
            // The waiter may have given up; nothing to tell then.
            let _ = tx.send(result);
        });
        self.submit(|state| Ok(Some(Request::new(plan(state)?, Some(done)))))
            .await?;
        rx.await
            .map_err(|_| io::Error::other("raft log writer stopped before committing"))?
    }

    fn append(
        group: GroupId,
        entries: Vec<(u64, Bytes)>,
        state: &mut State,
    ) -> io::Result<Vec<Op>> {
        let g = state.groups.entry(group).or_default();
        // Validate the whole append before changing anything: no holes.
        let mut expected = g.next_index();
        for (index, _) in &entries {
            if let Some(want) = expected
                && *index != want
            {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "group {group}: append of index {index} would leave a hole (next is {want})"
                    ),
                ));
            }
            expected = Some(index + 1);
        }
        if g.seqs.is_empty()
            && let Some((index, _)) = entries.first()
        {
            g.first_index = *index;
        }
        let mut ops = Vec::with_capacity(entries.len());
        for (index, bytes) in entries {
            let seq = state.next_seq;
            state.next_seq += 1;
            g.seqs.push_back(seq);
            state.unflushed.insert(seq, bytes.clone());
            ops.push(Op::Put {
                seq,
                group,
                index,
                bytes,
            });
        }
        debug_assert_eq!(g.next_index(), expected.or(g.next_index()));
        Ok(ops)
    }

    /// Removes entries after `after` (all entries if `None`).
    fn truncate_after(group: GroupId, after: Option<u64>, state: &mut State) -> Vec<Op> {
        let Some(g) = state.groups.get_mut(&group) else {
            return Vec::new();
        };
        let keep = match after {
            None => 0,
            Some(index) => (index + 1)
                .saturating_sub(g.first_index)
                .min(g.seqs.len() as u64) as usize,
        };
        let removed: Vec<u64> = g.seqs.drain(keep..).collect();
        debug_assert!(after.is_none() || g.last_index() <= after);
        removed
            .into_iter()
            .map(|seq| {
                state.unflushed.remove(&seq);
                Op::Delete { seq }
            })
            .collect()
    }

    /// Removes entries up to and including `upto` and records it as purged.
    fn purge(group: GroupId, upto: u64, log_id: Bytes, state: &mut State) -> Vec<Op> {
        let g = state.groups.entry(group).or_default();
        if g.purged.as_ref().is_some_and(|(index, _)| *index >= upto) {
            // Purging is monotonic; an older purge point changes nothing.
            return Vec::new();
        }
        let count = (upto + 1)
            .saturating_sub(g.first_index)
            .min(g.seqs.len() as u64) as usize;
        let removed: Vec<u64> = g.seqs.drain(..count).collect();
        g.first_index = if g.seqs.is_empty() {
            upto + 1
        } else {
            g.first_index + count as u64
        };
        g.purged = Some((upto, log_id.clone()));
        debug_assert_eq!(g.next_index().map(|next| next > upto), Some(true));
        let mut ops: Vec<Op> = removed
            .into_iter()
            .map(|seq| {
                state.unflushed.remove(&seq);
                Op::Delete { seq }
            })
            .collect();
        ops.push(Op::PutMeta {
            group,
            kind: MetaKind::Purged,
            bytes: log_id,
        });
        ops
    }

    /// Encoded entries of `group` in `[start, end)`, stopping once `max_bytes`
    /// is reached (after at least one entry). Entries missing at the start
    /// (purged meanwhile) are skipped; a gap after the first found entry ends
    /// the result, which then is a shorter, still contiguous, prefix.
    fn read_entries(
        &self,
        group: GroupId,
        start: u64,
        end: u64,
        max_bytes: usize,
    ) -> io::Result<Vec<Bytes>> {
        let wanted: Vec<(u64, Option<Bytes>)> = {
            let state = self.state.lock()?;
            state.check()?;
            let Some(g) = state.groups.get(&group) else {
                return Ok(Vec::new());
            };
            let lo = start.max(g.first_index);
            let hi = end.min(g.first_index + g.seqs.len() as u64);
            if lo >= hi {
                return Ok(Vec::new());
            }
            let from = (lo - g.first_index) as usize;
            let to = (hi - g.first_index) as usize;
            g.seqs
                .range(from..to)
                .map(|seq| (*seq, state.unflushed.get(seq).cloned()))
                .collect()
        };
        let needs_db = wanted.iter().any(|(_, bytes)| bytes.is_none());
        let read = if needs_db {
            Some(self.db.begin_read().map_err(io_err)?)
        } else {
            None
        };
        let table = match &read {
            Some(txn) => Some(txn.open_table(ENTRIES).map_err(io_err)?),
            None => None,
        };
        let mut out = Vec::with_capacity(wanted.len());
        let mut total = 0usize;
        for (seq, cached) in wanted {
            let bytes = match (cached, &table) {
                (Some(bytes), _) => Some(bytes),
                (None, Some(table)) => table
                    .get(seq)
                    .map_err(io_err)?
                    .map(|guard| Bytes::copy_from_slice(guard.value())),
                (None, None) => None,
            };
            match bytes {
                Some(bytes) => {
                    total += bytes.len();
                    out.push(bytes);
                    if total >= max_bytes {
                        break;
                    }
                }
                None if out.is_empty() => continue,
                None => break,
            }
        }
        Ok(out)
    }
}

impl Drop for SharedLog {
    fn drop(&mut self) {
        // Closing the queue lets the writer commit what is pending and exit;
        // joining makes sure the database is closed when the drop returns, so
        // it can be reopened at once.
        self.requests.take();
        if let Some(writer) = self.writer.take()
            && writer.join().is_err()
        {
            tracing::error!("raft log writer thread panicked");
        }
    }
}

/// Reads the directory and group metadata into each group's in-memory state.
fn load_state(db: &Database) -> Result<State, LogStoreError> {
    let read = db.begin_read()?;
    let directory = read.open_table(DIRECTORY)?;
    let entries = read.open_table(ENTRIES)?;
    let meta = read.open_table(GROUP_META)?;
    let mut state = State::default();
    for row in directory.iter()? {
        let (seq, place) = row?;
        let (seq, (group, index)) = (seq.value(), place.value());
        let g = state.groups.entry(group).or_default();
        if g.seqs.is_empty() {
            g.first_index = index;
        } else if g.first_index + g.seqs.len() as u64 != index {
            return Err(LogStoreError::Corrupt(format!(
                "group {group}: entry {index} at seq {seq} does not follow {}",
                g.first_index + g.seqs.len() as u64 - 1
            )));
        }
        g.seqs.push_back(seq);
        state.next_seq = seq + 1;
    }
    if entries.len()? != directory.len()? {
        return Err(LogStoreError::Corrupt(format!(
            "{} entries but {} directory rows",
            entries.len()?,
            directory.len()?
        )));
    }
    for row in meta.iter()? {
        let (key, value) = row?;
        let (group, raw_kind) = key.value();
        let bytes = Bytes::copy_from_slice(value.value());
        let g = state.groups.entry(group).or_default();
        match MetaKind::from_u8(raw_kind) {
            Some(MetaKind::Vote) => g.vote = Some(bytes),
            Some(MetaKind::Committed) => g.committed = Some(bytes),
            Some(MetaKind::Purged) => {
                let log_id: LogId = decode(&bytes)?;
                g.purged = Some((log_id.index(), bytes));
            }
            None => {
                return Err(LogStoreError::Corrupt(format!(
                    "group {group}: unknown metadata kind {raw_kind}"
                )));
            }
        }
    }
    for (group, g) in &mut state.groups {
        if let Some((purged, _)) = &g.purged {
            if g.seqs.is_empty() {
                g.first_index = purged + 1;
            } else if g.first_index <= *purged {
                return Err(LogStoreError::Corrupt(format!(
                    "group {group}: entry {} survives purge up to {purged}",
                    g.first_index
                )));
            }
        }
    }
    Ok(state)
}

fn io_err(e: impl Into<redb::Error>) -> io::Error {
    io::Error::other(e.into())
}

fn encode<T: Serialize>(value: &T) -> io::Result<Bytes> {
    bincode::serde::encode_to_vec(value, bincode::config::standard())
        .map(Bytes::from)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> io::Result<T> {
    bincode::serde::decode_from_slice(bytes, bincode::config::standard())
        .map(|(value, _)| value)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// `[start, end)` of a range of log indexes.
fn bounds(range: &impl RangeBounds<u64>) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(i) => *i,
        Bound::Excluded(i) => i.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(i) => i.saturating_add(1),
        Bound::Excluded(i) => *i,
        Bound::Unbounded => u64::MAX,
    };
    (start, end)
}

/// One group's view of the shared log: what openraft is given as the group's
/// log storage and log reader. Cloning is cheap.
#[derive(Clone)]
pub struct GroupLogStore {
    group: GroupId,
    shared: Arc<SharedLog>,
}

impl GroupLogStore {
    /// The group this handle reads and writes.
    pub fn group_id(&self) -> GroupId {
        self.group
    }

    /// Reads run on the calling task: a redb read transaction never waits for
    /// the writer, recent entries come from memory, and older ones are
    /// usually in the page cache, so a hop to a blocking thread would cost
    /// more than it saves.
    fn read(&self, start: u64, end: u64, max_bytes: usize) -> io::Result<Vec<Entry>> {
        let entries: Vec<Entry> = self
            .shared
            .read_entries(self.group, start, end, max_bytes)?
            .iter()
            .map(|bytes| decode(bytes))
            .collect::<io::Result<_>>()?;
        debug_assert!(entries.windows(2).all(|w| w[0].index() + 1 == w[1].index()));
        debug_assert!(entries.first().is_none_or(|e| e.index() >= start));
        Ok(entries)
    }
}

impl Debug for GroupLogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupLogStore")
            .field("group", &self.group)
            .finish()
    }
}

impl RaftLogReader<TypeConfig> for GroupLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let (start, end) = bounds(&range);
        self.read(start, end, usize::MAX)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        let state = self.shared.state.lock()?;
        state.check()?;
        match state.groups.get(&self.group).and_then(|g| g.vote.as_ref()) {
            Some(bytes) => decode(bytes).map(Some),
            None => Ok(None),
        }
    }

    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<Entry>, io::Error> {
        self.read(start, end, MAX_READ_BYTES)
    }
}

impl RaftLogStorage<TypeConfig> for GroupLogStore {
    type LogReader = GroupLogStore;

    async fn get_log_state(&mut self) -> Result<LogState, io::Error> {
        let (purged, last_index) = {
            let state = self.shared.state.lock()?;
            state.check()?;
            match state.groups.get(&self.group) {
                Some(g) => (g.purged.as_ref().map(|(_, b)| b.clone()), g.last_index()),
                None => (None, None),
            }
        };
        let last_purged_log_id: Option<LogId> = purged.map(|b| decode(&b)).transpose()?;
        let last_entry = match last_index {
            Some(index) => self.read(index, index + 1, usize::MAX)?.pop(),
            None => None,
        };
        let last_log_id = last_entry.map(|e| e.log_id()).or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        let bytes = encode(vote)?;
        let group = self.group;
        self.shared
            .submit_durable(|state| {
                state.groups.entry(group).or_default().vote = Some(bytes.clone());
                Ok(vec![Op::PutMeta {
                    group,
                    kind: MetaKind::Vote,
                    bytes,
                }])
            })
            .await
    }

    /// Recorded with the next batch, not waited for: openraft treats the
    /// committed id as a hint that speeds up recovery, so it need not cost
    /// an fsync of its own.
    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        let group = self.group;
        let bytes = committed.as_ref().map(encode).transpose()?;
        self.shared
            .submit(|state| {
                state.groups.entry(group).or_default().committed = bytes.clone();
                let op = match bytes {
                    Some(bytes) => Op::PutMeta {
                        group,
                        kind: MetaKind::Committed,
                        bytes,
                    },
                    None => Op::DeleteMeta {
                        group,
                        kind: MetaKind::Committed,
                    },
                };
                Ok(Some(Request::new(vec![op], None)))
            })
            .await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        let state = self.shared.state.lock()?;
        state.check()?;
        match state
            .groups
            .get(&self.group)
            .and_then(|g| g.committed.as_ref())
        {
            Some(bytes) => decode(bytes).map(Some),
            None => Ok(None),
        }
    }

    async fn append<I>(&mut self, entries: I, callback: IoFlushed) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let encoded: Vec<(u64, Bytes)> = entries
            .into_iter()
            .map(|entry| Ok((entry.index(), encode(&entry)?)))
            .collect::<io::Result<_>>()?;
        if encoded.is_empty() {
            callback.io_completed(Ok(()));
            return Ok(());
        }
        let group = self.group;
        let done: Done = Box::new(move |result| callback.io_completed(result));
        self.shared
            .submit(|state| {
                let ops = SharedLog::append(group, encoded, state)?;
                Ok(Some(Request::new(ops, Some(done))))
            })
            .await
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let group = self.group;
        let after = last_log_id.map(|id| id.index());
        self.shared
            .submit_durable(|state| Ok(SharedLog::truncate_after(group, after, state)))
            .await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        let group = self.group;
        let upto = log_id.index();
        let bytes = encode(&log_id)?;
        self.shared
            .submit_durable(|state| Ok(SharedLog::purge(group, upto, bytes, state)))
            .await
    }
}
