//! The node's single log writer: group commit of every Raft group's writes.
//!
//! Every group on a node sends its appends, truncations, purges and votes to
//! one std thread (redb is blocking, and a tokio task would stall a runtime
//! worker for the length of an fsync). The thread takes everything pending,
//! writes it in ONE redb write transaction, commits it with ONE fsync
//! (`Durability::Immediate`, redb's default), and only then completes each
//! request's callback, in the order the requests arrived. A thousand queues
//! that each append one message therefore cost one fsync, not a thousand.
//!
//! # Batch bound
//! A batch takes requests while it stays within [`MAX_BATCH_ENTRIES`] log
//! entries and [`MAX_BATCH_BYTES`] bytes of encoded entries. It always takes at
//! least one request, so a single request larger than the bound is committed
//! alone (openraft's appends are bounded by `max_payload_entries`, 300 by
//! default, so this does not happen in practice). The request queue holds at
//! most [`REQUEST_QUEUE_DEPTH`] requests; senders wait for room (back-pressure
//! on the groups, never unbounded memory).
//!
//! # Key layout, and why
//! Measured on this machine kind (2 cores shared with other builds, ext4 on
//! a virtual disk) with `cargo run
//! --release -p warren-raft --example group_commit_bench [value_bytes]`:
//! 50 commits (after 20 warm-up commits) of 1,000 records each, the records
//! spread round-robin over 1 or 1,000 groups; mean ms per commit, two runs
//! with 256-byte records and one with 1 KiB records:
//!
//! | layout                                   | 1 group (256 B) | 1,000 groups (256 B) | 1 group (1 KiB) | 1,000 groups (1 KiB) |
//! |------------------------------------------|----------------:|---------------------:|----------------:|---------------------:|
//! | `entries[(group, index)]`                |        4.3, 7.8 |           39.3, 38.8 |            17.2 |                 52.7 |
//! | `entries[seq]` + `index[(group, index)]` |        4.3, 6.4 |           15.7, 20.5 |            12.9 |                 29.2 |
//! | `entries[seq]` + `directory[seq]`        |        4.7, 6.2 |            4.6,  7.0 |            13.9 |                 13.2 |
//!
//! Keys that scatter over groups dirty one B-tree leaf per group and cost 3
//! to 9 times more per commit; with sequential keys, 1,000 groups cost what
//! one does. (Single runs are noisy on a shared machine; the shape repeats.)
//!
//! So the log is keyed by a node-wide append sequence number `seq`:
//! - [`ENTRIES`]: `seq -> encoded entry`. Appends from all groups land on the
//!   right edge of one tree.
//! - [`DIRECTORY`]: `seq -> (group, index)`. Also written at the right edge;
//!   small, so reading it at startup to rebuild each group's `index -> seq`
//!   map (kept in memory, 8 bytes per live entry) is cheap. It is never
//!   consulted on the hot path.
//! - [`GROUP_META`]: `(group, kind) -> bytes`: vote, committed log id, last
//!   purged log id. Small and rarely written (a vote at elections, the
//!   committed id opportunistically, the purged id on snapshots).
//! - [`SNAPSHOTS`]: `group -> encoded snapshot` (metadata and the state
//!   machine's bytes): each group's latest snapshot, written when a group
//!   builds or installs one (every few thousand entries, not per entry), so
//!   that the log below it can be purged and a restart begins from it.
//!
//! A truncation or purge deletes the affected `seq` keys; sequence numbers
//! are never reused while any key refers to them (they only grow during a
//! run and restart after the highest surviving one).

use std::io;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use redb::{Database, TableDefinition};
use tokio::sync::mpsc;

/// Most log entries one write transaction carries (see "Batch bound").
pub const MAX_BATCH_ENTRIES: usize = 4096;
/// Most bytes of encoded entries one write transaction carries.
pub const MAX_BATCH_BYTES: usize = 8 * 1024 * 1024;
/// Most write requests waiting for the writer; senders wait beyond that.
pub const REQUEST_QUEUE_DEPTH: usize = 1024;

/// Every group's log entries, by node-wide append sequence number.
pub(crate) const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("entries");
/// Which group and log index each sequence number holds.
pub(crate) const DIRECTORY: TableDefinition<u64, (u64, u64)> = TableDefinition::new("directory");
/// Per-group durable state other than entries, keyed by `(group, MetaKind)`.
pub(crate) const GROUP_META: TableDefinition<(u64, u8), &[u8]> = TableDefinition::new("group_meta");

/// Each group's latest snapshot, by group.
pub(crate) const SNAPSHOTS: TableDefinition<u64, &[u8]> = TableDefinition::new("snapshots");

/// What a `GROUP_META` row holds. The discriminants are on disk: never
/// renumber them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum MetaKind {
    Vote = 1,
    Committed = 2,
    Purged = 3,
}

impl MetaKind {
    pub(crate) fn from_u8(raw: u8) -> Option<MetaKind> {
        match raw {
            1 => Some(MetaKind::Vote),
            2 => Some(MetaKind::Committed),
            3 => Some(MetaKind::Purged),
            _ => None,
        }
    }
}

/// One change to the database, as the log store planned it.
#[derive(Debug)]
pub(crate) enum Op {
    /// Store entry `index` of `group` under `seq`.
    Put {
        seq: u64,
        group: u64,
        index: u64,
        bytes: Bytes,
    },
    /// Remove the entry stored under `seq` (truncation or purge).
    Delete { seq: u64 },
    /// Set one of a group's durable values.
    PutMeta {
        group: u64,
        kind: MetaKind,
        bytes: Bytes,
    },
    /// Clear one of a group's durable values.
    DeleteMeta { group: u64, kind: MetaKind },
    /// Replace the group's snapshot.
    PutSnapshot { group: u64, bytes: Bytes },
    /// Forget the group's snapshot (the group is removed).
    DeleteSnapshot { group: u64 },
}

/// Called once with the outcome of the transaction that carried the request.
pub(crate) type Done = Box<dyn FnOnce(io::Result<()>) + Send>;

/// A unit of work for the writer: its ops go into one transaction together.
pub(crate) struct Request {
    pub(crate) ops: Vec<Op>,
    pub(crate) done: Option<Done>,
    #[cfg(test)]
    pub(crate) control: Option<Control>,
}

impl Request {
    pub(crate) fn new(ops: Vec<Op>, done: Option<Done>) -> Request {
        Request {
            ops,
            done,
            #[cfg(test)]
            control: None,
        }
    }

    /// Entries and encoded bytes this request adds to a batch.
    fn weight(&self) -> (usize, usize) {
        self.ops.iter().fold((0, 0), |(n, b), op| match op {
            Op::Put { bytes, .. } => (n + 1, b + bytes.len()),
            Op::PutSnapshot { bytes, .. } => (n, b + bytes.len()),
            _ => (n, b),
        })
    }
}

/// Test-only hooks that make a crash between write and commit reproducible.
#[cfg(test)]
pub(crate) enum Control {
    /// Block the writer before it gathers its next batch, until the sender
    /// is dropped, so a test can queue several requests into one batch.
    Stall(std::sync::mpsc::Receiver<()>),
    /// Drop the batch's transaction without committing and stop the writer,
    /// as a process killed mid-write would.
    CrashBeforeCommit,
}

/// What the writer tells the log store about each transaction.
pub(crate) trait CommitObserver: Send + Sync + 'static {
    /// The entries stored under these sequence numbers are durable.
    fn committed(&self, seqs: &[u64]);
    /// A transaction failed; the in-memory view no longer matches the disk.
    fn failed(&self, reason: &str);
}

/// Starts the writer thread. It runs until every sender is dropped and the
/// queue is drained.
pub(crate) fn spawn_writer(
    db: Arc<Database>,
    observer: Arc<dyn CommitObserver>,
) -> io::Result<(mpsc::Sender<Request>, std::thread::JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel(REQUEST_QUEUE_DEPTH);
    let writer = Writer {
        db,
        rx,
        observer,
        failed: None,
    };
    let handle = std::thread::Builder::new()
        .name("raft-log-writer".into())
        .spawn(move || writer.run())?;
    Ok((tx, handle))
}

struct Writer {
    db: Arc<Database>,
    rx: mpsc::Receiver<Request>,
    observer: Arc<dyn CommitObserver>,
    /// Set after a failed transaction. From then on every request fails: the
    /// groups' in-memory indexes assumed writes that did not happen.
    failed: Option<String>,
}

enum Outcome {
    Committed(Vec<u64>),
    #[cfg(test)]
    Crashed,
}

impl Writer {
    fn run(mut self) {
        let mut carried: Option<Request> = None;
        loop {
            let first = match carried.take() {
                Some(request) => request,
                None => match self.rx.blocking_recv() {
                    Some(request) => request,
                    None => return,
                },
            };
            #[cfg(test)]
            let first = match first.control {
                Some(Control::Stall(release)) => {
                    // Wait for the test to drop its end; the result is irrelevant.
                    let _ = release.recv();
                    continue;
                }
                _ => first,
            };
            let (mut entries, mut bytes) = first.weight();
            let mut batch = vec![first];
            while entries < MAX_BATCH_ENTRIES && bytes < MAX_BATCH_BYTES {
                let Ok(next) = self.rx.try_recv() else { break };
                let (n, b) = next.weight();
                if entries + n > MAX_BATCH_ENTRIES || bytes + b > MAX_BATCH_BYTES {
                    carried = Some(next);
                    break;
                }
                entries += n;
                bytes += b;
                batch.push(next);
            }
            debug_assert!(!batch.is_empty());
            debug_assert!(batch.len() == 1 || entries <= MAX_BATCH_ENTRIES);
            if !self.commit_batch(batch, entries, bytes) {
                return;
            }
        }
    }

    /// Writes and commits one batch and completes its requests. Returns false
    /// when the writer must stop (test crash hook).
    fn commit_batch(&mut self, batch: Vec<Request>, entries: usize, bytes: usize) -> bool {
        if let Some(reason) = &self.failed {
            let reason = reason.clone();
            complete_all(batch, || Err(io::Error::other(reason.clone())));
            return true;
        }
        let started = Instant::now();
        match self.write(&batch) {
            Ok(Outcome::Committed(seqs)) => {
                tracing::debug!(
                    requests = batch.len(),
                    entries,
                    bytes,
                    micros = started.elapsed().as_micros() as u64,
                    "raft log group commit"
                );
                self.observer.committed(&seqs);
                complete_all(batch, || Ok(()));
                true
            }
            #[cfg(test)]
            Ok(Outcome::Crashed) => false,
            Err(err) => {
                let reason = format!("raft log write failed: {err}");
                tracing::error!(%reason, "raft log writer stops accepting writes");
                self.observer.failed(&reason);
                self.failed = Some(reason.clone());
                complete_all(batch, || Err(io::Error::other(reason.clone())));
                true
            }
        }
    }

    /// Applies every op of the batch, in order, in one transaction.
    fn write(&self, batch: &[Request]) -> Result<Outcome, redb::Error> {
        let txn = self.db.begin_write()?;
        let mut flushed = Vec::new();
        {
            let mut entries = txn.open_table(ENTRIES)?;
            let mut directory = txn.open_table(DIRECTORY)?;
            let mut meta = txn.open_table(GROUP_META)?;
            let mut snapshots = txn.open_table(SNAPSHOTS)?;
            for request in batch {
                for op in &request.ops {
                    match op {
                        Op::Put {
                            seq,
                            group,
                            index,
                            bytes,
                        } => {
                            entries.insert(*seq, bytes.as_ref())?;
                            directory.insert(*seq, (*group, *index))?;
                            flushed.push(*seq);
                        }
                        Op::Delete { seq } => {
                            entries.remove(*seq)?;
                            directory.remove(*seq)?;
                        }
                        Op::PutMeta { group, kind, bytes } => {
                            meta.insert((*group, *kind as u8), bytes.as_ref())?;
                        }
                        Op::DeleteMeta { group, kind } => {
                            meta.remove((*group, *kind as u8))?;
                        }
                        Op::PutSnapshot { group, bytes } => {
                            snapshots.insert(*group, bytes.as_ref())?;
                        }
                        Op::DeleteSnapshot { group } => {
                            snapshots.remove(*group)?;
                        }
                    }
                }
                #[cfg(test)]
                if matches!(request.control, Some(Control::CrashBeforeCommit)) {
                    // Dropping an uncommitted redb transaction discards it.
                    return Ok(Outcome::Crashed);
                }
            }
        }
        txn.commit()?;
        Ok(Outcome::Committed(flushed))
    }
}

fn complete_all(batch: Vec<Request>, result: impl Fn() -> io::Result<()>) {
    for request in batch {
        if let Some(done) = request.done {
            done(result());
        }
    }
}
