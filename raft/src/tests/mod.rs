//! Tests of the shared log store: openraft's storage conformance suite, and
//! Warren's own tests of what sharing one database between groups must not
//! break (isolation between groups, recovery, atomic batches).

mod cluster;
mod conformance;
mod mem_state_machine;
mod shared_log;

use std::io;

use bytes::Bytes;
use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, RaftLogStorage};
use openraft::type_config::TypeConfigExt;
use openraft::vote::RaftLeaderIdExt;

use crate::log_store::GroupLogStore;
use crate::types::{Command, Entry, LogId, TypeConfig};

/// Log id `index` written by node 1 in `term`.
pub(crate) fn log_id(term: u64, index: u64) -> LogId {
    LogId::new(
        <TypeConfig as openraft::RaftTypeConfig>::LeaderId::new_committed(term, 1),
        index,
    )
}

/// A normal entry whose command names its group and index, so a test can
/// tell entries of different groups apart.
pub(crate) fn entry(group: u64, term: u64, index: u64) -> Entry {
    Entry::new_normal(
        log_id(term, index),
        Command(Bytes::from(format!("g{group}-i{index}"))),
    )
}

/// Appends and returns a receiver that completes when the entries are durable.
pub(crate) async fn append_nowait(
    store: &mut GroupLogStore,
    entries: Vec<Entry>,
) -> io::Result<impl std::future::Future<Output = io::Result<()>> + use<>> {
    let (tx, rx) = TypeConfig::oneshot();
    store.append(entries, IOFlushed::signal(tx)).await?;
    Ok(async move {
        rx.await
            .map_err(|_| io::Error::other("flush callback dropped"))?
    })
}

/// Appends and waits until the entries are durable.
pub(crate) async fn append(store: &mut GroupLogStore, entries: Vec<Entry>) -> io::Result<()> {
    append_nowait(store, entries).await?.await
}
