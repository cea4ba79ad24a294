//! Tests of whole nodes in one process on 127.0.0.1: replication and
//! forwarding, failover through the failure detector, the shared-secret
//! handshake, restart from snapshot plus log, and app messages.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use openraft::async_runtime::watch::WatchReceiver;
use tempfile::TempDir;

use crate::registry::{AppHandler, ClusterConfig, NodeOptions, RaftNode};
use crate::state_machine::StateMachine;
use crate::types::NodeId;

/// Commands applied, in order, shared with the test.
type Applied = Arc<Mutex<Vec<Bytes>>>;

/// Appends every command; replies with how many it holds.
struct Appender(Applied);

impl StateMachine for Appender {
    fn apply(&mut self, _index: u64, cmd: Bytes, _leader: bool) -> Bytes {
        let mut applied = self.0.lock().unwrap();
        applied.push(cmd);
        Bytes::from(applied.len().to_string())
    }

    fn snapshot(&self) -> Bytes {
        let applied: Vec<Vec<u8>> = self.0.lock().unwrap().iter().map(|b| b.to_vec()).collect();
        Bytes::from(bincode::serde::encode_to_vec(&applied, bincode::config::standard()).unwrap())
    }

    fn restore(&mut self, snapshot: Bytes) {
        let (applied, _): (Vec<Vec<u8>>, usize) =
            bincode::serde::decode_from_slice(&snapshot, bincode::config::standard()).unwrap();
        *self.0.lock().unwrap() = applied.into_iter().map(Bytes::from).collect();
    }
}

fn appender() -> (Box<dyn StateMachine>, Applied) {
    let applied = Applied::default();
    (Box::new(Appender(applied.clone())), applied)
}

/// Polls `cond` every 20 ms until it holds, failing the test after `limit`.
async fn eventually(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let waited = tokio::time::timeout(limit, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "timed out waiting for: {what}");
}

struct Cluster {
    nodes: Vec<Arc<RaftNode>>,
    _dirs: Vec<TempDir>,
}

/// Starts `secrets.len()` nodes, ids 1.., node i using `secrets[i - 1]`.
async fn cluster(secrets: &[&str], options: impl Fn() -> NodeOptions) -> Cluster {
    let listeners: Vec<std::net::TcpListener> = secrets
        .iter()
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let peers: BTreeMap<NodeId, String> = listeners
        .iter()
        .enumerate()
        .map(|(i, l)| (i as NodeId + 1, l.local_addr().unwrap().to_string()))
        .collect();
    let mut nodes = Vec::new();
    let mut dirs = Vec::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = ClusterConfig {
            node_id: i as NodeId + 1,
            listen: listener.local_addr().unwrap(),
            peers: peers.clone(),
            secret: secrets[i].to_string(),
            data_dir: dir.path().to_path_buf(),
            failure_timeout: Duration::from_millis(600),
        };
        let opts = NodeOptions {
            listener: Some(listener),
            ..options()
        };
        nodes.push(RaftNode::start_with(cfg, opts).await.unwrap());
        dirs.push(dir);
    }
    Cluster { nodes, _dirs: dirs }
}

const LIMIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_replicate_forward_and_fail_over() {
    let c = cluster(&["s3cret"; 3], NodeOptions::default).await;
    let members: BTreeSet<NodeId> = [1, 2, 3].into();
    let mut applied = Vec::new();
    for node in &c.nodes {
        let (sm, log) = appender();
        node.create_group(7, members.clone(), sm).await.unwrap();
        applied.push(log);
    }
    eventually("all nodes agree on a leader", LIMIT, || {
        let l = c.nodes[0].leader(7);
        l.is_some() && c.nodes.iter().all(|n| n.leader(7) == l)
    })
    .await;
    let leader = c.nodes[0].leader(7).unwrap();
    let follower = c.nodes.iter().find(|n| n.node_id() != leader).unwrap();
    for i in 0..10 {
        let reply = follower
            .propose(7, Bytes::from(format!("c{i}")), LIMIT)
            .await
            .unwrap();
        assert_eq!(reply, Bytes::from((i + 1).to_string()));
    }
    eventually("every replica applied the ten commands", LIMIT, || {
        applied.iter().all(|a| a.lock().unwrap().len() == 10)
    })
    .await;
    let first = applied[0].lock().unwrap().clone();
    for a in &applied {
        assert_eq!(*a.lock().unwrap(), first);
    }

    // Stop the leader's node; the failure detector must get a new leader.
    let stopped = &c.nodes[leader as usize - 1];
    stopped.shutdown().await;
    let survivors: Vec<&Arc<RaftNode>> = c.nodes.iter().filter(|n| n.node_id() != leader).collect();
    eventually("the survivors elect a new leader", LIMIT, || {
        survivors.iter().any(|n| n.is_leader(7))
    })
    .await;
    let reply = tokio::time::timeout(
        LIMIT,
        survivors[0].propose(7, Bytes::from_static(b"after"), LIMIT),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(reply, Bytes::from_static(b"11"));
    assert!(survivors.iter().all(|n| !n.reachable()[&leader]));
    for n in survivors {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_the_secret_is_refused() {
    // The intruder sits between the two good nodes, so it both dials (3)
    // and is dialed (by 1).
    let c = cluster(&["right", "wrong", "right"], NodeOptions::default).await;
    let (one, intruder, three) = (&c.nodes[0], &c.nodes[1], &c.nodes[2]);
    eventually("the two good nodes connect", LIMIT, || {
        one.reachable()[&3] && three.reachable()[&1]
    })
    .await;
    eventually("both good nodes refuse the intruder", LIMIT, || {
        one.transport.refused.load(Ordering::Relaxed) > 0
            && three.transport.refused.load(Ordering::Relaxed) > 0
    })
    .await;
    assert!(!one.reachable()[&2] && !three.reachable()[&2]);
    assert!(!intruder.reachable()[&1] && !intruder.reachable()[&3]);
    let call = intruder
        .call(1, Bytes::from_static(b"hello"), Duration::from_millis(500))
        .await;
    assert!(call.is_err());
    let proposal = intruder
        .propose(9, Bytes::from_static(b"x"), Duration::from_millis(500))
        .await;
    assert!(proposal.is_err());
    for n in &c.nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_recovers_from_snapshot_and_log() {
    let dir = tempfile::tempdir().unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let cfg = ClusterConfig {
        node_id: 1,
        listen: addr,
        peers: [(1, addr.to_string())].into(),
        secret: "s".into(),
        data_dir: dir.path().to_path_buf(),
        failure_timeout: Duration::from_millis(600),
    };
    let options = |listener| NodeOptions {
        snapshot_every: 10,
        keep_after_snapshot: 0,
        listener,
    };
    let members: BTreeSet<NodeId> = [1].into();
    let node = RaftNode::start_with(cfg.clone(), options(Some(listener)))
        .await
        .unwrap();
    let (sm, _) = appender();
    node.create_group(3, members.clone(), sm).await.unwrap();
    for i in 0..100 {
        node.propose(3, Bytes::from(format!("c{i}")), LIMIT)
            .await
            .unwrap();
    }
    let g = node.group(3).unwrap();
    eventually("the log was purged below a snapshot", LIMIT, || {
        let m = g.raft.metrics().borrow_watched().clone();
        m.snapshot.is_some_and(|s| s.index() >= 90) && m.purged.is_some_and(|p| p.index() >= 80)
    })
    .await;
    drop(g);
    node.shutdown().await;
    drop(node);

    let node = RaftNode::start_with(cfg, options(None)).await.unwrap();
    assert_eq!(node.groups_on_disk(), vec![3]);
    let (sm, applied) = appender();
    node.create_group(3, members, sm).await.unwrap();
    eventually("all 100 commands are back", LIMIT, || {
        applied.lock().unwrap().len() == 100
    })
    .await;
    let expected: Vec<Bytes> = (0..100).map(|i| Bytes::from(format!("c{i}"))).collect();
    assert_eq!(*applied.lock().unwrap(), expected);
    let reply = node
        .propose(3, Bytes::from_static(b"more"), LIMIT)
        .await
        .unwrap();
    assert_eq!(reply, Bytes::from_static(b"101"));
    node.shutdown().await;
}

/// Echoes calls and records messages.
#[derive(Default)]
struct Echo {
    messages: Mutex<Vec<(NodeId, Bytes)>>,
}

impl AppHandler for Echo {
    fn on_message(&self, from: NodeId, msg: Bytes) {
        self.messages.lock().unwrap().push((from, msg));
    }

    fn on_call(&self, from: NodeId, msg: Bytes) -> Pin<Box<dyn Future<Output = Bytes> + Send>> {
        Box::pin(async move { Bytes::from(format!("{from}:{}", String::from_utf8_lossy(&msg))) })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_messages_and_calls_round_trip() {
    let c = cluster(&["k", "k"], NodeOptions::default).await;
    let echoes: Vec<Arc<Echo>> = c.nodes.iter().map(|_| Arc::new(Echo::default())).collect();
    for (n, e) in c.nodes.iter().zip(&echoes) {
        n.set_app_handler(e.clone());
    }
    eventually("the nodes connect", LIMIT, || c.nodes[0].reachable()[&2]).await;
    let reply = c.nodes[0]
        .call(2, Bytes::from_static(b"ping"), LIMIT)
        .await
        .unwrap();
    assert_eq!(reply, Bytes::from_static(b"1:ping"));
    let reply = c.nodes[1]
        .call(2, Bytes::from_static(b"self"), LIMIT)
        .await
        .unwrap();
    assert_eq!(reply, Bytes::from_static(b"2:self"));
    for i in 0..50 {
        assert!(
            c.nodes[1].send(1, Bytes::from(format!("m{i}"))),
            "handed to the link"
        );
    }
    eventually("fifty messages arrive in order", LIMIT, || {
        echoes[0].messages.lock().unwrap().len() == 50
    })
    .await;
    let got = echoes[0].messages.lock().unwrap().clone();
    for (i, (from, msg)) in got.iter().enumerate() {
        assert_eq!(*from, 2);
        assert_eq!(*msg, Bytes::from(format!("m{i}")));
    }
    for n in &c.nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_replica_catches_up_from_a_snapshot() {
    let small = || NodeOptions {
        snapshot_every: 10,
        keep_after_snapshot: 0,
        listener: None,
    };
    let c = cluster(&["k"; 3], small).await;
    let members: BTreeSet<NodeId> = [1, 2, 3].into();
    for node in &c.nodes[..2] {
        let (sm, _) = appender();
        node.create_group(5, members.clone(), sm).await.unwrap();
    }
    for i in 0..50 {
        c.nodes[1]
            .propose(5, Bytes::from(format!("c{i}")), LIMIT)
            .await
            .unwrap();
    }
    let leader = c.nodes[0].leader(5).unwrap();
    let g = c.nodes[leader as usize - 1].group(5).unwrap();
    eventually("the leader purged its log", LIMIT, || {
        let m = g.raft.metrics().borrow_watched().clone();
        m.purged.is_some_and(|p| p.index() >= 40)
    })
    .await;

    let (sm, applied) = appender();
    c.nodes[2].create_group(5, members, sm).await.unwrap();
    eventually("the late replica holds all 50 commands", LIMIT, || {
        applied.lock().unwrap().len() == 50
    })
    .await;
    let expected: Vec<Bytes> = (0..50).map(|i| Bytes::from(format!("c{i}"))).collect();
    assert_eq!(*applied.lock().unwrap(), expected);
    let late = c.nodes[2].group(5).unwrap();
    assert!(late.raft.metrics().borrow_watched().snapshot.is_some());
    for n in &c.nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_without_a_majority_times_out() {
    let c = cluster(&["k"; 3], NodeOptions::default).await;
    let members: BTreeSet<NodeId> = [1, 2, 3].into();
    for node in &c.nodes {
        let (sm, _) = appender();
        node.create_group(4, members.clone(), sm).await.unwrap();
    }
    eventually("the group has a leader", LIMIT, || {
        c.nodes[0].leader(4).is_some()
    })
    .await;
    let leader = &c.nodes[c.nodes[0].leader(4).unwrap() as usize - 1];
    leader
        .propose(4, Bytes::from_static(b"ok"), LIMIT)
        .await
        .unwrap();
    for n in &c.nodes {
        if n.node_id() != leader.node_id() {
            n.shutdown().await;
        }
    }
    let started = std::time::Instant::now();
    let result = tokio::time::timeout(
        LIMIT,
        leader.propose(4, Bytes::from_static(b"lost"), Duration::from_millis(800)),
    )
    .await
    .unwrap();
    assert!(result.is_err(), "{result:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    leader.shutdown().await;
}
