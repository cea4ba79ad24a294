//! What sharing one database between groups must not break: each group's
//! log, vote and purge point survive a reopen untouched by the others, and a
//! batch that was never committed leaves nothing behind.

use std::io;

use openraft::entry::RaftEntry;
use openraft::storage::{RaftLogReader, RaftLogStorage};

use super::{append, append_nowait, entry, log_id};
use crate::group_commit::Control;
use crate::log_store::{GroupLogStore, SharedLog};
use crate::types::{Entry, Vote};

async fn entries(store: &mut GroupLogStore) -> io::Result<Vec<Entry>> {
    store.try_get_log_entries(..).await
}

fn indexes(entries: &[Entry]) -> Vec<u64> {
    entries.iter().map(|e| e.index()).collect()
}

fn expect_group(entries: &[Entry], group: u64) {
    for e in entries {
        let payload = format!("{:?}", e.payload);
        let expected = format!("g{group}-i{}", e.index());
        assert!(
            matches!(&e.payload, openraft::EntryPayload::Normal(c) if c.0 == expected.as_bytes()),
            "group {group} holds a foreign entry: {payload}"
        );
    }
}

#[tokio::test]
async fn interleaved_groups_survive_reopen() -> io::Result<()> {
    const GROUPS: u64 = 50;
    const ROUNDS: u64 = 20;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("raft.redb");
    {
        let shared = SharedLog::open(&path).map_err(io::Error::other)?;
        let mut stores: Vec<GroupLogStore> = (0..GROUPS).map(|g| shared.group(g)).collect();
        for round in 0..ROUNDS {
            // Queue one append per group before waiting for any, so that the
            // writer batches many groups into each transaction.
            let mut flushed = Vec::new();
            for (g, store) in stores.iter_mut().enumerate() {
                let g = g as u64;
                flushed.push(append_nowait(store, vec![entry(g, 1, round + 1)]).await?);
            }
            for f in flushed {
                f.await?;
            }
        }
        for (g, store) in stores.iter_mut().enumerate() {
            store
                .save_vote(&Vote::new_committed(g as u64 + 1, 1))
                .await?;
        }
    }
    let shared = SharedLog::open(&path).map_err(io::Error::other)?;
    assert_eq!(shared.groups()?, (0..GROUPS).collect::<Vec<_>>());
    for g in 0..GROUPS {
        let mut store = shared.group(g);
        let found = entries(&mut store).await?;
        assert_eq!(
            indexes(&found),
            (1..=ROUNDS).collect::<Vec<_>>(),
            "group {g}"
        );
        expect_group(&found, g);
        assert_eq!(
            store.read_vote().await?,
            Some(Vote::new_committed(g + 1, 1))
        );
        let state = store.get_log_state().await?;
        assert_eq!(state.last_log_id, Some(log_id(1, ROUNDS)));
        assert_eq!(state.last_purged_log_id, None);
    }
    Ok(())
}

#[tokio::test]
async fn truncate_and_purge_touch_only_their_group() -> io::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("raft.redb");
    let (a, b, c) = (1u64, 2u64, 3u64);
    {
        let shared = SharedLog::open(&path).map_err(io::Error::other)?;
        let (mut sa, mut sb, mut sc) = (shared.group(a), shared.group(b), shared.group(c));
        for i in 1..=10 {
            append(&mut sa, vec![entry(a, 1, i)]).await?;
            append(&mut sb, vec![entry(b, 1, i)]).await?;
            append(&mut sc, vec![entry(c, 1, i)]).await?;
        }
        sa.truncate_after(Some(log_id(1, 5))).await?;
        sb.purge(log_id(1, 3)).await?;
        // A truncated log continues from the truncation point.
        append(&mut sa, vec![entry(a, 2, 6)]).await?;

        assert_eq!(
            indexes(&entries(&mut sa).await?),
            (1..=6).collect::<Vec<_>>()
        );
        assert_eq!(
            indexes(&entries(&mut sb).await?),
            (4..=10).collect::<Vec<_>>()
        );
        assert_eq!(
            indexes(&entries(&mut sc).await?),
            (1..=10).collect::<Vec<_>>()
        );
    }
    let shared = SharedLog::open(&path).map_err(io::Error::other)?;
    let (mut sa, mut sb, mut sc) = (shared.group(a), shared.group(b), shared.group(c));
    let found_a = entries(&mut sa).await?;
    assert_eq!(indexes(&found_a), (1..=6).collect::<Vec<_>>());
    assert_eq!(found_a.last().map(|e| e.log_id()), Some(log_id(2, 6)));
    expect_group(&found_a, a);
    let found_b = entries(&mut sb).await?;
    assert_eq!(indexes(&found_b), (4..=10).collect::<Vec<_>>());
    expect_group(&found_b, b);
    let found_c = entries(&mut sc).await?;
    assert_eq!(indexes(&found_c), (1..=10).collect::<Vec<_>>());
    expect_group(&found_c, c);

    assert_eq!(sa.get_log_state().await?.last_purged_log_id, None);
    assert_eq!(
        sb.get_log_state().await?.last_purged_log_id,
        Some(log_id(1, 3))
    );
    assert_eq!(sc.get_log_state().await?.last_purged_log_id, None);

    // A purged log refuses to grow a hole, and keeps going where it was.
    assert!(append(&mut sb, vec![entry(b, 1, 12)]).await.is_err());
    append(&mut sb, vec![entry(b, 1, 11)]).await?;
    Ok(())
}

#[tokio::test]
async fn purge_past_the_end_then_append_continues_after_it() -> io::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("raft.redb");
    {
        let shared = SharedLog::open(&path).map_err(io::Error::other)?;
        let mut s = shared.group(1);
        append(&mut s, (1..=3).map(|i| entry(1, 1, i)).collect()).await?;
        // A snapshot installed from the leader purges beyond the local log.
        s.purge(log_id(2, 9)).await?;
        assert!(entries(&mut s).await?.is_empty());
    }
    let shared = SharedLog::open(&path).map_err(io::Error::other)?;
    let mut s = shared.group(1);
    let state = s.get_log_state().await?;
    assert_eq!(state.last_purged_log_id, Some(log_id(2, 9)));
    assert_eq!(state.last_log_id, Some(log_id(2, 9)));
    append(&mut s, vec![entry(1, 2, 10)]).await?;
    assert_eq!(indexes(&entries(&mut s).await?), vec![10]);
    Ok(())
}

#[tokio::test]
async fn batch_never_committed_leaves_nothing_after_reopen() -> io::Result<()> {
    const GROUPS: u64 = 8;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("raft.redb");
    {
        let shared = SharedLog::open(&path).map_err(io::Error::other)?;
        let mut stores: Vec<GroupLogStore> = (0..GROUPS).map(|g| shared.group(g)).collect();
        for (g, store) in stores.iter_mut().enumerate() {
            append(store, (1..=3).map(|i| entry(g as u64, 1, i)).collect()).await?;
        }

        // Hold the writer so that the next appends of every group, and the
        // crash, are all gathered into one batch.
        let (release, stalled) = std::sync::mpsc::channel::<()>();
        shared.send_control(Control::Stall(stalled)).await?;
        let mut never_flushed = Vec::new();
        for (g, store) in stores.iter_mut().enumerate() {
            let g = g as u64;
            never_flushed
                .push(append_nowait(store, (4..=6).map(|i| entry(g, 1, i)).collect()).await?);
            // Appended entries are readable before they are durable.
            assert_eq!(indexes(&entries(store).await?), (1..=6).collect::<Vec<_>>());
        }
        shared.send_control(Control::CrashBeforeCommit).await?;
        drop(release);
        for f in never_flushed {
            assert!(f.await.is_err(), "an uncommitted append reported durable");
        }
        // Dropping the last handles joins the (stopped) writer and closes the database.
        drop(stores);
        drop(shared);
    }
    let shared = SharedLog::open(&path).map_err(io::Error::other)?;
    for g in 0..GROUPS {
        let mut store = shared.group(g);
        let found = entries(&mut store).await?;
        assert_eq!(
            indexes(&found),
            vec![1, 2, 3],
            "group {g} kept part of an uncommitted batch"
        );
        expect_group(&found, g);
        // And the log goes on from the last durable entry.
        append(&mut store, vec![entry(g, 2, 4)]).await?;
    }
    Ok(())
}
