//! The adapter between openraft's state-machine traits and Warren's
//! [`StateMachine`], plus the durable copy of each group's latest snapshot.
//!
//! The application's machine sees only committed commands, snapshots as
//! bytes and leadership changes; openraft's bookkeeping (last applied log id,
//! last membership) lives here, next to it, under one lock, so a snapshot's
//! metadata always matches the state it was taken from.
//!
//! Snapshots are persisted in the node's log database (`SharedLog`), written
//! when one is built (every `snapshot_every` entries, by openraft's policy)
//! or installed from a leader; only then does openraft purge the log below
//! it. When a group opens, the adapter restores the persisted snapshot first
//! and openraft replays the committed log after it: recovery is snapshot plus
//! log.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use openraft::entry::RaftEntry;
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend};
use serde::{Deserialize, Serialize};

use crate::log_store::SharedLog;
use crate::types::{GroupId, LogId, NodeId, TypeConfig};

/// What a group's state machine is: the application's logic for one queue,
/// or for the cluster's metadata.
pub trait StateMachine: Send + 'static {
    /// Applies a committed command. `leader` is true when this node leads
    /// the group and the entry was proposed in its current term: entries of
    /// earlier terms were the previous leader's to act on. (It may still be
    /// true on a node that has just lost leadership without knowing it.)
    /// Returns the reply handed to the proposer.
    fn apply(&mut self, index: u64, cmd: Bytes, leader: bool) -> Bytes;
    /// Serialises the whole state (called for snapshots).
    fn snapshot(&self) -> Bytes;
    /// Replaces the state with a snapshot (install from leader, or at start).
    fn restore(&mut self, snapshot: Bytes);
    /// This node became (true) or stopped being (false) the group's leader.
    fn leader_changed(&mut self, is_leader: bool) {
        let _ = is_leader;
    }
}

pub(crate) type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
/// A snapshot's metadata: which log id and membership it includes.
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
/// A snapshot as openraft passes it around: metadata plus the state bytes.
pub type Snapshot = openraft::alias::SnapshotOf<TypeConfig, Bytes>;

/// The on-disk form of a group's snapshot.
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    data: Bytes,
}

/// The application's machine with openraft's bookkeeping of what it holds.
struct Applied {
    sm: Box<dyn StateMachine>,
    last_applied: Option<LogId>,
    membership: StoredMembership,
}

struct Shared {
    group: GroupId,
    /// This node's id.
    me: NodeId,
    /// The term of the last blank entry this node appended as leader: the
    /// term it leads in. Entries of this node from an older term are not
    /// its current leadership's.
    own_term: std::sync::atomic::AtomicU64,
    applied: Mutex<Applied>,
    /// Whether this node leads the group, kept by the group's leadership
    /// watcher and read on every apply.
    is_leader: AtomicBool,
    log: Arc<SharedLog>,
    current: Mutex<Option<Snapshot>>,
}

/// What openraft drives as a group's state machine (and snapshot builder).
/// Cloning is cheap: clones share the machine.
#[derive(Clone)]
pub(crate) struct GroupStateMachine {
    shared: Arc<Shared>,
}

/// Locks a mutex whose holder may have panicked inside the application's
/// machine. The machine may then be half-updated, but refusing every later
/// call would not make it whole; openraft's own error path stops the group
/// if applying fails.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn encode<T: Serialize>(value: &T) -> io::Result<Bytes> {
    bincode::serde::encode_to_vec(value, bincode::config::standard())
        .map(Bytes::from)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

impl GroupStateMachine {
    /// Wraps `sm`, first restoring the group's persisted snapshot into it.
    /// Blocking (reads the database): call before the group starts.
    pub(crate) fn open(
        group: GroupId,
        me: NodeId,
        mut sm: Box<dyn StateMachine>,
        log: Arc<SharedLog>,
    ) -> io::Result<GroupStateMachine> {
        let mut last_applied = None;
        let mut membership = StoredMembership::default();
        let mut current = None;
        if let Some(bytes) = log.load_snapshot(group)? {
            let (stored, _): (StoredSnapshot, usize) =
                bincode::serde::decode_from_slice(&bytes, bincode::config::standard())
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            sm.restore(stored.data.clone());
            last_applied = stored.meta.last_log_id;
            membership = stored.meta.last_membership.clone();
            tracing::debug!(group, ?last_applied, "restored snapshot");
            current = Some(Snapshot {
                meta: stored.meta,
                snapshot: stored.data,
            });
        }
        let applied = Applied {
            sm,
            last_applied,
            membership,
        };
        Ok(GroupStateMachine {
            shared: Arc::new(Shared {
                group,
                me,
                own_term: std::sync::atomic::AtomicU64::new(0),
                applied: Mutex::new(applied),
                is_leader: AtomicBool::new(false),
                log,
                current: Mutex::new(current),
            }),
        })
    }

    /// Tells the machine about a leadership change (once per change).
    pub(crate) fn set_leader(&self, is_leader: bool) {
        if self.shared.is_leader.swap(is_leader, Ordering::AcqRel) != is_leader {
            lock(&self.shared.applied).sm.leader_changed(is_leader);
        }
    }

    /// Index of the last entry applied to the machine.
    pub(crate) fn last_applied(&self) -> Option<u64> {
        lock(&self.shared.applied)
            .last_applied
            .as_ref()
            .map(|id| id.index())
    }

    async fn persist(&self, meta: &SnapshotMeta, data: &Bytes) -> io::Result<()> {
        let stored = encode(&StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        })?;
        self.shared
            .log
            .save_snapshot(self.shared.group, stored)
            .await
    }
}

impl RaftSnapshotBuilder<TypeConfig> for GroupStateMachine {
    type SnapshotData = Bytes;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let (meta, data) = {
            let applied = lock(&self.shared.applied);
            let meta = SnapshotMeta {
                last_log_id: applied.last_applied,
                last_membership: applied.membership.clone(),
            };
            (meta, applied.sm.snapshot())
        };
        // Durable before openraft learns of it, since it then purges the log.
        self.persist(&meta, &data).await?;
        let snapshot = Snapshot {
            meta,
            snapshot: data,
        };
        tracing::debug!(group = self.shared.group, last = ?snapshot.meta.last_log_id, "built snapshot");
        *lock(&self.shared.current) = Some(snapshot.clone());
        Ok(snapshot)
    }
}

impl RaftStateMachine<TypeConfig> for GroupStateMachine {
    type SnapshotData = Bytes;
    type SnapshotBuilder = GroupStateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let applied = lock(&self.shared.applied);
        Ok((applied.last_applied, applied.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            let log_id = entry.log_id();
            // An entry with a responder was proposed through this node while
            // it led the group.
            let by_me = log_id.leader_id.node_id == self.shared.me;
            if by_me && matches!(entry.payload, EntryPayload::Blank) {
                // A new leader's first entry opens its term.
                self.shared
                    .own_term
                    .fetch_max(log_id.leader_id.term, Ordering::AcqRel);
            }
            let leader = by_me
                && log_id.leader_id.term == self.shared.own_term.load(Ordering::Acquire)
                && (responder.is_some() || self.shared.is_leader.load(Ordering::Acquire));
            let reply = {
                let mut applied = lock(&self.shared.applied);
                debug_assert!(applied.last_applied.as_ref() < Some(&log_id));
                let reply = match entry.payload {
                    EntryPayload::Normal(cmd) => applied.sm.apply(log_id.index(), cmd.0, leader),
                    EntryPayload::Membership(membership) => {
                        applied.membership = StoredMembership::new(Some(log_id), membership);
                        Bytes::new()
                    }
                    EntryPayload::Blank => Bytes::new(),
                };
                applied.last_applied = Some(log_id);
                reply
            };
            if let Some(responder) = responder {
                responder.send(reply);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> GroupStateMachine {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        data: Bytes,
    ) -> Result<(), io::Error> {
        self.persist(meta, &data).await?;
        {
            let mut applied = lock(&self.shared.applied);
            applied.sm.restore(data.clone());
            applied.last_applied = meta.last_log_id;
            applied.membership = meta.last_membership.clone();
        }
        tracing::info!(group = self.shared.group, last = ?meta.last_log_id, "installed snapshot from leader");
        *lock(&self.shared.current) = Some(Snapshot {
            meta: meta.clone(),
            snapshot: data,
        });
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        Ok(lock(&self.shared.current).clone())
    }
}
