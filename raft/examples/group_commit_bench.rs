//! Measures what one group-commit transaction costs in redb for the candidate
//! key layouts of the shared log, so the choice in `group_commit.rs` rests on
//! numbers from this machine rather than on taste.
//!
//! Each run commits batches of `BATCH` log records (one write transaction and
//! one fsync each, `Durability::Immediate` being redb's default) spread
//! round-robin over 1 group or over 1,000 groups, after a warm-up that gives the
//! trees some depth. It prints the mean milliseconds per commit.
//!
//! Layouts:
//! - `group_index`: `entries[(group, index)] = entry`. Simple, but a batch that
//!   touches many groups dirties one leaf page per group.
//! - `seq+index`: `entries[seq] = entry` (a node-wide append sequence) plus an
//!   on-disk `index[(group, index)] = seq`. Entries land on sequential pages,
//!   the small index still scatters.
//! - `seq+directory`: `entries[seq] = entry` plus `directory[seq] = (group,
//!   index)`. Both tables are written sequentially; the per-group index lives in
//!   memory and is rebuilt from `directory` when the database is opened.
//!
//! Run: `cargo run --release -p warren-raft
//! --example group_commit_bench` (optional args: value size in bytes, commits).

use std::time::Instant;

use redb::{Database, ReadableDatabase, ReadableTableMetadata, TableDefinition};

const BATCH: u64 = 1_000;
const WARMUP_COMMITS: u64 = 20;

const ENTRIES_BY_GROUP: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("entries_gi");
const ENTRIES_BY_SEQ: TableDefinition<u64, &[u8]> = TableDefinition::new("entries_seq");
const INDEX: TableDefinition<(u64, u64), u64> = TableDefinition::new("index");
const DIRECTORY: TableDefinition<u64, (u64, u64)> = TableDefinition::new("directory");

#[derive(Clone, Copy, Debug)]
enum Layout {
    GroupIndex,
    SeqPlusIndex,
    SeqPlusDirectory,
}

impl Layout {
    fn name(self) -> &'static str {
        match self {
            Layout::GroupIndex => "group_index",
            Layout::SeqPlusIndex => "seq+index",
            Layout::SeqPlusDirectory => "seq+directory",
        }
    }
}

/// Writes one batch of `BATCH` records in one transaction and commits it.
fn commit_batch(
    db: &Database,
    layout: Layout,
    groups: u64,
    next_seq: &mut u64,
    next_index: &mut [u64],
    value: &[u8],
) -> Result<(), redb::Error> {
    let txn = db.begin_write()?;
    {
        let mut by_group = txn.open_table(ENTRIES_BY_GROUP)?;
        let mut by_seq = txn.open_table(ENTRIES_BY_SEQ)?;
        let mut index = txn.open_table(INDEX)?;
        let mut directory = txn.open_table(DIRECTORY)?;
        for i in 0..BATCH {
            let group = i % groups;
            let slot = usize::try_from(group).expect("group fits usize");
            let log_index = next_index[slot];
            next_index[slot] += 1;
            let seq = *next_seq;
            *next_seq += 1;
            match layout {
                Layout::GroupIndex => {
                    by_group.insert((group, log_index), value)?;
                }
                Layout::SeqPlusIndex => {
                    by_seq.insert(seq, value)?;
                    index.insert((group, log_index), seq)?;
                }
                Layout::SeqPlusDirectory => {
                    by_seq.insert(seq, value)?;
                    directory.insert(seq, (group, log_index))?;
                }
            }
        }
    }
    txn.commit()?;
    Ok(())
}

fn run(layout: Layout, groups: u64, value_len: usize, commits: u64) -> Result<f64, redb::Error> {
    let dir = tempfile::tempdir().map_err(redb::Error::Io)?;
    let db = Database::create(dir.path().join("bench.redb"))?;
    let value = vec![0xA5u8; value_len];
    let mut next_seq = 0;
    let mut next_index = vec![1u64; usize::try_from(groups).expect("groups fits usize")];
    for _ in 0..WARMUP_COMMITS {
        commit_batch(&db, layout, groups, &mut next_seq, &mut next_index, &value)?;
    }
    let started = Instant::now();
    for _ in 0..commits {
        commit_batch(&db, layout, groups, &mut next_seq, &mut next_index, &value)?;
    }
    let per_commit_ms = started.elapsed().as_secs_f64() * 1e3 / commits as f64;
    // Keep the read side honest: the last record must be there.
    let read = db.begin_read()?;
    let found = match layout {
        Layout::GroupIndex => read.open_table(ENTRIES_BY_GROUP)?.len()?,
        Layout::SeqPlusIndex | Layout::SeqPlusDirectory => {
            read.open_table(ENTRIES_BY_SEQ)?.len()?
        }
    };
    assert_eq!(found, (WARMUP_COMMITS + commits) * BATCH);
    Ok(per_commit_ms)
}

fn main() -> Result<(), redb::Error> {
    let mut args = std::env::args().skip(1);
    let value_len: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(256);
    let commits: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(50);
    println!(
        "batch = {BATCH} records of {value_len} bytes, {commits} commits after {WARMUP_COMMITS} warm-up commits"
    );
    println!("{:<15} {:>8} {:>12}", "layout", "groups", "ms/commit");
    for layout in [
        Layout::GroupIndex,
        Layout::SeqPlusIndex,
        Layout::SeqPlusDirectory,
    ] {
        for groups in [1, 1_000] {
            let ms = run(layout, groups, value_len, commits)?;
            println!("{:<15} {:>8} {:>12.2}", layout.name(), groups, ms);
        }
    }
    Ok(())
}
