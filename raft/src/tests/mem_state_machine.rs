//! A trivial in-memory state machine, just enough for openraft's storage
//! conformance suite (which exercises a log store and a state machine
//! together). Warren's real state machines live in the broker.

use std::io;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use openraft::entry::RaftEntry;
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::types::{Command, LogId, TypeConfig};

type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
type Snapshot = openraft::alias::SnapshotOf<TypeConfig, Vec<u8>>;

#[derive(Clone, Default, Serialize, Deserialize)]
struct Applied {
    last_applied: Option<LogId>,
    last_membership: StoredMembership,
    commands: Vec<Command>,
}

#[derive(Default)]
struct Inner {
    applied: Applied,
    snapshot: Option<Snapshot>,
}

/// State machine that records the commands it applied.
#[derive(Clone, Default)]
pub(crate) struct MemStateMachine {
    inner: Arc<Mutex<Inner>>,
}

fn encode(applied: &Applied) -> io::Result<Vec<u8>> {
    bincode::serde::encode_to_vec(applied, bincode::config::standard()).map_err(io::Error::other)
}

impl RaftSnapshotBuilder<TypeConfig> for MemStateMachine {
    type SnapshotData = Vec<u8>;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let mut inner = self.inner.lock().await;
        let snapshot = Snapshot {
            meta: SnapshotMeta {
                last_log_id: inner.applied.last_applied,
                last_membership: inner.applied.last_membership.clone(),
            },
            snapshot: encode(&inner.applied)?,
        };
        inner.snapshot = Some(snapshot.clone());
        Ok(snapshot)
    }
}

impl RaftStateMachine<TypeConfig> for MemStateMachine {
    type SnapshotData = Vec<u8>;
    type SnapshotBuilder = MemStateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let inner = self.inner.lock().await;
        Ok((
            inner.applied.last_applied,
            inner.applied.last_membership.clone(),
        ))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        let mut inner = self.inner.lock().await;
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            let log_id = entry.log_id();
            match entry.payload {
                EntryPayload::Blank => {}
                EntryPayload::Normal(command) => inner.applied.commands.push(command),
                EntryPayload::Membership(membership) => {
                    inner.applied.last_membership = StoredMembership::new(Some(log_id), membership);
                }
            }
            inner.applied.last_applied = Some(log_id);
            if let Some(responder) = responder {
                responder.send(Bytes::new());
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Vec<u8>,
    ) -> Result<(), io::Error> {
        let (applied, _): (Applied, usize) =
            bincode::serde::decode_from_slice(&snapshot, bincode::config::standard())
                .map_err(io::Error::other)?;
        let mut inner = self.inner.lock().await;
        inner.applied = applied;
        inner.snapshot = Some(Snapshot {
            meta: meta.clone(),
            snapshot,
        });
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        Ok(self.inner.lock().await.snapshot.clone())
    }
}
