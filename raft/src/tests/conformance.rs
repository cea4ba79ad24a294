//! openraft's storage conformance suite, run on one group of a shared log
//! that another group is writing to at the same time, so that a log store
//! which mixed groups up would fail it.

use openraft::testing::log::{StoreBuilder, Suite};
use openraft::{ErrorSubject, ErrorVerb};
use tempfile::TempDir;

use super::mem_state_machine::MemStateMachine;
use super::{append, entry};
use crate::log_store::{GroupLogStore, SharedLog};
use crate::types::{StorageError, TypeConfig};

/// The group the suite tests, and a neighbour whose log is not empty.
const GROUP: u64 = 7;
const NEIGHBOUR: u64 = 8;

struct Builder;

impl StoreBuilder<TypeConfig, GroupLogStore, MemStateMachine, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, GroupLogStore, MemStateMachine), StorageError> {
        let io = |e| StorageError::from_io_error(ErrorSubject::Store, ErrorVerb::Write, e);
        let dir = tempfile::tempdir().map_err(io)?;
        let shared = SharedLog::open(dir.path().join("raft.redb"))
            .map_err(|e| io(std::io::Error::other(e)))?;
        let mut neighbour = shared.group(NEIGHBOUR);
        append(
            &mut neighbour,
            (0..5).map(|i| entry(NEIGHBOUR, 1, i)).collect(),
        )
        .await
        .map_err(io)?;
        Ok((dir, shared.group(GROUP), MemStateMachine::default()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_suite() -> Result<(), StorageError> {
    Suite::test_all(Builder).await
}
