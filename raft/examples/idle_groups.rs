//! Measures what idle groups cost: starts three nodes in one process, opens
//! N groups (default 1,000) replicated on all three, waits until each has a
//! leader, then reports the process's CPU time over an idle interval.
//!
//! Run: `cargo run --release -p warren-raft --example idle_groups [groups] [idle_secs]`
//! (Linux only: CPU time is read from /proc/self/stat.)

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use bytes::Bytes;
use warren_raft::{ClusterConfig, NodeOptions, RaftNode, StateMachine};

struct Nothing;

impl StateMachine for Nothing {
    fn apply(&mut self, _: u64, _: Bytes, _: bool) -> Bytes {
        Bytes::new()
    }
    fn snapshot(&self) -> Bytes {
        Bytes::new()
    }
    fn restore(&mut self, _: Bytes) {}
}

/// User plus system CPU time of this process, in clock ticks (1/100 s).
fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the whole line.
    let rest = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    get(11) + get(12)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let groups: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(1000);
    let idle_secs: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(10);

    let listeners: Vec<std::net::TcpListener> = (0..3)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()?;
    let peers: BTreeMap<u64, String> = listeners
        .iter()
        .enumerate()
        .map(|(i, l)| Ok((i as u64 + 1, l.local_addr()?.to_string())))
        .collect::<Result<_, std::io::Error>>()?;
    let dir = tempfile::tempdir()?;
    let mut nodes = Vec::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        let id = i as u64 + 1;
        let cfg = ClusterConfig {
            node_id: id,
            listen: listener.local_addr()?,
            peers: peers.clone(),
            secret: "idle".into(),
            data_dir: dir.path().join(id.to_string()),
            failure_timeout: Duration::from_millis(1500),
        };
        let options = NodeOptions {
            listener: Some(listener),
            ..NodeOptions::default()
        };
        nodes.push(RaftNode::start_with(cfg, options).await?);
    }
    let started = Instant::now();
    for g in 0..groups {
        // Every member opens the group; node 1, first member, asks for votes.
        let members: BTreeSet<u64> = [1, 2, 3].into();
        for node in nodes.iter().cycle().skip(g as usize % 3).take(3) {
            node.create_group(g, members.clone(), Box::new(Nothing))
                .await?;
        }
    }
    loop {
        let led = nodes[0]
            .status()
            .iter()
            .filter(|s| s.leader.is_some())
            .count();
        if led == groups as usize {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            return Err(format!("only {led} of {groups} groups have a leader").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "{groups} groups on 3 nodes led after {:?}",
        started.elapsed()
    );

    // Let elections and their writes settle before measuring.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = cpu_ticks();
    tokio::time::sleep(Duration::from_secs(idle_secs)).await;
    let used = cpu_ticks() - before;
    let percent = used as f64 / (idle_secs as f64 * 100.0) * 100.0;
    println!(
        "idle for {idle_secs} s: {used} ticks of CPU = {percent:.2}% of one core (3 nodes together)"
    );
    for node in &nodes {
        node.shutdown().await;
    }
    Ok(())
}
