//! [`RaftNode`]: the registry of every Raft group on a node, and the node's
//! face to the broker.
//!
//! It owns the shared log, the transport and the failure detector, creates
//! and removes groups at runtime, routes proposals to the group's leader
//! (locally or over the transport), answers other nodes' requests, and keeps
//! groups led: when the detector declares a peer down, the groups it led hold
//! elections; a periodic sweep elects in any group left without a leader
//! (after a whole-cluster restart, or a split vote). openraft's own timers
//! are switched off, so an idle group costs no CPU or network.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use openraft::async_runtime::watch::WatchReceiver;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ServerState, SnapshotPolicy};
use tokio::sync::{broadcast, watch};

use crate::failure_detector::{self, Liveness, OnPeerLost, PeerEvent};
use crate::log_store::SharedLog;
use crate::network::{self, NetworkFactory};
use crate::state_machine::{GroupStateMachine, StateMachine};
use crate::transport::{CallError, Inbound, Transport};
use crate::types::{Command, GroupId, NodeId, Raft};
use crate::wire::{LeaderInfo, ProposeOutcome, Reply, Request};

/// The default for [`ClusterConfig::failure_timeout`].
pub const DEFAULT_FAILURE_TIMEOUT: Duration = Duration::from_millis(1500);

/// How often (on average) the node looks for groups without a leader.
pub const LEADERLESS_SWEEP: Duration = Duration::from_secs(1);

/// Longest wait between two attempts of a proposal that found no leader.
const PROPOSE_MAX_BACKOFF: Duration = Duration::from_millis(200);

/// Name of the node's log database inside `data_dir`.
pub const LOG_FILE: &str = "raft.redb";

/// How a node finds and trusts the rest of the cluster.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub node_id: NodeId,
    /// Address this node listens on for other nodes.
    pub listen: SocketAddr,
    /// Every node of the cluster, including this one: id -> "host:port".
    pub peers: BTreeMap<NodeId, String>,
    /// Shared secret; a peer that does not prove it knows it is refused.
    pub secret: String,
    /// Directory for the node's redb file (created if missing).
    pub data_dir: PathBuf,
    /// A peer silent this long is declared down (default 1500 ms).
    pub failure_timeout: Duration,
}

/// Tuning that most deployments leave at its default; tests shrink it.
#[derive(Debug)]
pub struct NodeOptions {
    /// A group snapshots its state machine after this many entries since
    /// its last snapshot, and may then purge the log below it.
    pub snapshot_every: u64,
    /// Entries already in a snapshot that stay in the log, so a follower
    /// slightly behind can catch up from the log instead of a snapshot.
    pub keep_after_snapshot: u64,
    /// A listener to use instead of binding `ClusterConfig::listen` (lets a
    /// caller bind port 0 and learn the port before starting the cluster).
    pub listener: Option<std::net::TcpListener>,
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions {
            snapshot_every: 5_000,
            keep_after_snapshot: 64,
            listener: None,
        }
    }
}

/// Application traffic between nodes that is not Raft (the broker forwards
/// deliveries and publishes over it).
pub trait AppHandler: Send + Sync + 'static {
    /// A one-way message from `from`.
    fn on_message(&self, from: NodeId, msg: Bytes);
    /// A request from `from`; the returned future's output is the reply.
    fn on_call(&self, from: NodeId, msg: Bytes) -> Pin<Box<dyn Future<Output = Bytes> + Send>>;
}

/// Why a proposal (or an app call) failed.
#[derive(Debug, thiserror::Error)]
pub enum ProposeError {
    #[error("no leader for group {0}")]
    NoLeader(GroupId),
    #[error("group {0} does not exist on this node")]
    NoGroup(GroupId),
    #[error("timed out")]
    Timeout,
    #[error("{0}")]
    Other(String),
}

/// One group as the node sees it (for monitoring and placement).
#[derive(Clone, Debug)]
pub struct GroupStatus {
    pub group: GroupId,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub last_applied: u64,
    pub members: Vec<NodeId>,
}

pub(crate) struct Group {
    pub(crate) raft: Raft<GroupStateMachine>,
    sm: GroupStateMachine,
    watcher: tokio::task::JoinHandle<()>,
}

impl Group {
    fn leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow_watched().current_leader
    }

    fn voters(&self) -> BTreeSet<NodeId> {
        self.raft.voter_ids().collect()
    }
}

/// A Warren node's Raft engine: every group on the node, and the links to
/// the other nodes.
pub struct RaftNode {
    me: NodeId,
    peers: BTreeMap<NodeId, String>,
    incarnation: u64,
    local_addr: SocketAddr,
    raft_config: Arc<openraft::Config>,
    /// `None` once shut down.
    log: Mutex<Option<Arc<SharedLog>>>,
    pub(crate) transport: Arc<Transport>,
    groups: RwLock<HashMap<GroupId, Arc<Group>>>,
    /// Serialises creating and removing one group (both await); different
    /// groups open in parallel, which after a restart with thousands of
    /// groups is most of the time to serve again.
    lifecycle: Mutex<HashMap<GroupId, Arc<tokio::sync::Mutex<()>>>>,
    app: RwLock<Option<Arc<dyn AppHandler>>>,
    events: broadcast::Sender<PeerEvent>,
    liveness: Arc<Mutex<Liveness>>,
    /// Last known leader of groups this node does not have.
    hints: Mutex<HashMap<GroupId, NodeId>>,
    stopped: watch::Sender<bool>,
    /// Groups with state on disk at start that are not open yet. A peer's
    /// RPC for one of them waits for it to open (the node is replaying its
    /// definitions) instead of failing: after a whole-cluster restart every
    /// node opens its groups at its own pace, and a vote refused meanwhile
    /// would cost a whole election turn.
    opening: Mutex<HashSet<GroupId>>,
    /// Bumped whenever a group opens; what RPCs waiting on `opening` watch.
    opened: watch::Sender<u64>,
    /// Groups this node is trying to get a leader for (see
    /// [`RaftNode::elect_in_turn`]).
    wanting: Mutex<HashMap<GroupId, Want>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl RaftNode {
    /// Opens the shared log in data_dir, listens, dials peers. Does not
    /// create groups.
    pub async fn start(cfg: ClusterConfig) -> Result<Arc<RaftNode>, io::Error> {
        RaftNode::start_with(cfg, NodeOptions::default()).await
    }

    /// [`RaftNode::start`] with non-default tuning.
    pub async fn start_with(
        cfg: ClusterConfig,
        options: NodeOptions,
    ) -> Result<Arc<RaftNode>, io::Error> {
        if !cfg.peers.contains_key(&cfg.node_id) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("node {} is not in the peer list", cfg.node_id),
            ));
        }
        let raft_config = Arc::new(raft_config(&options)?);
        let listener = match options.listener {
            Some(listener) => {
                listener.set_nonblocking(true)?;
                tokio::net::TcpListener::from_std(listener)?
            }
            None => tokio::net::TcpListener::bind(cfg.listen).await?,
        };
        let local_addr = listener.local_addr()?;
        let data_dir = cfg.data_dir.clone();
        let log = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&data_dir)?;
            SharedLog::open(data_dir.join(LOG_FILE)).map_err(io::Error::other)
        })
        .await
        .map_err(io::Error::other)??;
        let incarnation = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            .max(1);
        let peer_ids = cfg.peers.keys().copied().filter(|p| *p != cfg.node_id);
        let liveness = Arc::new(Mutex::new(Liveness::new(peer_ids, cfg.failure_timeout)));
        let on_disk: HashSet<GroupId> = log.groups()?.into_iter().collect();
        let events = broadcast::channel(1024).0;
        let node = Arc::new_cyclic(|weak: &Weak<RaftNode>| {
            let inbound: Weak<dyn Inbound> = weak.clone();
            RaftNode {
                me: cfg.node_id,
                peers: cfg.peers.clone(),
                incarnation,
                local_addr,
                raft_config,
                log: Mutex::new(Some(log)),
                transport: Arc::new(Transport::new(
                    cfg.node_id,
                    incarnation,
                    &cfg.secret,
                    &cfg.peers,
                    inbound,
                    events.clone(),
                )),
                groups: RwLock::new(HashMap::new()),
                lifecycle: Mutex::new(HashMap::new()),
                app: RwLock::new(None),
                events,
                liveness: liveness.clone(),
                hints: Mutex::new(HashMap::new()),
                stopped: watch::channel(false).0,
                opening: Mutex::new(on_disk),
                opened: watch::channel(0).0,
                wanting: Mutex::new(HashMap::new()),
            }
        });
        node.transport.start(listener);
        let lost: Weak<dyn OnPeerLost> = Arc::downgrade(&node) as Weak<RaftNode>;
        tokio::spawn(failure_detector::run(
            node.transport.clone(),
            incarnation,
            liveness,
            node.events.clone(),
            lost,
            node.stopped.subscribe(),
        ));
        tokio::spawn(leaderless_sweep(
            Arc::downgrade(&node),
            node.stopped.subscribe(),
        ));
        tokio::spawn(election_pacer(
            Arc::downgrade(&node),
            node.stopped.subscribe(),
        ));
        tracing::info!(node = node.me, addr = %local_addr, "raft node started");
        Ok(node)
    }

    pub fn set_app_handler(&self, h: Arc<dyn AppHandler>) {
        *self.app.write().unwrap_or_else(|p| p.into_inner()) = Some(h);
    }

    pub fn node_id(&self) -> NodeId {
        self.me
    }

    /// The address the node listens on (useful when it bound port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// This node's incarnation: its start time, as announced to peers.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// All node ids in the static cluster configuration.
    pub fn nodes(&self) -> Vec<NodeId> {
        self.peers.keys().copied().collect()
    }

    fn log(&self) -> io::Result<Arc<SharedLog>> {
        lock(&self.log)
            .clone()
            .ok_or_else(|| io::Error::other("raft node is shut down"))
    }

    /// Groups that have state on disk (to re-open after restart).
    pub fn groups_on_disk(&self) -> Vec<GroupId> {
        match self.log().and_then(|log| log.groups()) {
            Ok(groups) => groups,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list groups on disk");
                Vec::new()
            }
        }
    }

    pub(crate) fn group(&self, group: GroupId) -> Option<Arc<Group>> {
        self.groups
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&group)
            .cloned()
    }

    fn all_groups(&self) -> Vec<(GroupId, Arc<Group>)> {
        self.groups
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(id, g)| (*id, g.clone()))
            .collect()
    }

    /// Creates, or re-opens after a restart, a group whose voters are
    /// `members`. If its log is empty, the group is initialised with that
    /// membership (idempotent: every member may call it). Elections are
    /// started by the failure detector and the leaderless sweep; if
    /// `members` has this node first, it also asks for votes at once so a
    /// fresh group gets a leader in milliseconds.
    pub async fn create_group(
        &self,
        group: GroupId,
        members: BTreeSet<NodeId>,
        sm: Box<dyn StateMachine>,
    ) -> Result<(), io::Error> {
        let lifecycle = self.lifecycle_of(group);
        let _lifecycle = lifecycle.lock().await;
        if self.has_group(group) {
            return Ok(());
        }
        let mut nodes = BTreeMap::new();
        for member in &members {
            let addr = self.peers.get(member).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("group {group}: member {member} is not in the cluster"),
                )
            })?;
            nodes.insert(*member, BasicNode::new(addr));
        }
        if nodes.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("group {group} has no members"),
            ));
        }
        let log = self.log()?;
        let opened_log = log.clone();
        let me = self.me;
        let sm =
            tokio::task::spawn_blocking(move || GroupStateMachine::open(group, me, sm, opened_log))
                .await
                .map_err(io::Error::other)??;
        let network = NetworkFactory {
            transport: self.transport.clone(),
            group,
        };
        let raft = Raft::new(
            self.me,
            self.raft_config.clone(),
            network,
            log.group(group),
            sm.clone(),
        )
        .await
        .map_err(io::Error::other)?;
        let initialized = raft.is_initialized().await.map_err(io::Error::other)?;
        let mut fresh = false;
        if !initialized && members.contains(&self.me) {
            // One member writes the first membership entry and the others
            // receive it from it. If every member wrote its own, the
            // entries' log ids would differ only by node id, and openraft
            // ranks the highest id's log as the most up to date: only the
            // highest-numbered node could then win a first election, and
            // it would lead every new queue. The initialiser is drawn from
            // the group id, so new groups' first leaders spread.
            if initializer(group, &members) == self.me {
                initialize(&raft, group, nodes).await?;
                fresh = true;
            } else {
                // If the initialiser is down, the group must still form.
                let raft = raft.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(INITIALIZE_FALLBACK).await;
                    if let Ok(false) = raft.is_initialized().await {
                        tracing::debug!(group, "group's initialiser silent: initialising here");
                        let _ = initialize(&raft, group, nodes).await;
                    }
                });
            }
        }
        let watcher = tokio::spawn(watch_leadership(raft.clone(), sm.clone()));
        let entry = Arc::new(Group {
            raft: raft.clone(),
            sm,
            watcher,
        });
        self.groups
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(group, entry);
        lock(&self.opening).remove(&group);
        self.opened.send_modify(|n| *n += 1);
        // A one-member group elects itself when it is initialised; a new
        // or re-opened group of several gets a leader as soon as the member
        // whose turn it is has opened it.
        if members.len() > 1 {
            let g = self.group(group).expect("just inserted");
            if fresh {
                // Only this node has the membership yet, so no other
                // member can be a candidate: no turn to wait for. Until the
                // others would initialise on their own, it asks for votes
                // every few hundred milliseconds (a member still opening
                // the group refuses the first).
                let g = g.clone();
                let me = self.me;
                tokio::spawn(async move {
                    let deadline = Instant::now() + INITIALIZE_FALLBACK;
                    while Instant::now() < deadline && g.leader() != Some(me) {
                        if g.leader().is_some() || g.raft.trigger().elect(true).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                });
            }
            self.elect_in_turn(group, None, ELECTION_EFFORT);
        }
        drop(raft);
        tracing::debug!(group, ?members, "group opened");
        Ok(())
    }

    /// The lock that serialises opening and removing `group`. Entries stay
    /// for the node's life: one small lock per group ever held here.
    fn lifecycle_of(&self, group: GroupId) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.lifecycle).entry(group).or_default().clone()
    }

    /// Stops the group and deletes its log, vote and snapshot.
    pub async fn remove_group(&self, group: GroupId) {
        let lifecycle = self.lifecycle_of(group);
        let _lifecycle = lifecycle.lock().await;
        lock(&self.opening).remove(&group);
        self.opened.send_modify(|n| *n += 1);
        let removed = self
            .groups
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&group);
        if let Some(g) = removed {
            g.watcher.abort();
            if let Err(e) = g.raft.shutdown().await {
                tracing::warn!(group, error = %e, "group did not stop cleanly");
            }
        }
        match self.log() {
            Ok(log) => {
                if let Err(e) = log.remove_group(group).await {
                    tracing::error!(group, error = %e, "could not delete the group's state");
                }
            }
            Err(e) => tracing::warn!(group, error = %e, "group state not deleted"),
        }
    }

    /// The group, waiting (at most [`OPENING_WAIT`]) if it is one this node
    /// still has to re-open after its start.
    async fn group_when_open(&self, group: GroupId) -> Option<Arc<Group>> {
        if let Some(g) = self.group(group) {
            return Some(g);
        }
        if !lock(&self.opening).contains(&group) {
            return None;
        }
        let mut opened = self.opened.subscribe();
        let wait = opened
            .wait_for(|_| self.group(group).is_some() || !lock(&self.opening).contains(&group));
        let _ = tokio::time::timeout(OPENING_WAIT, wait).await;
        self.group(group)
    }

    pub fn has_group(&self, group: GroupId) -> bool {
        self.group(group).is_some()
    }

    /// Proposes a command and waits until it is committed and applied,
    /// returning the state machine's reply. On the leader it is written
    /// directly; elsewhere it is forwarded to the leader (known, or asked of
    /// the other nodes). Retries across a leader change for up to `timeout`.
    ///
    /// A proposal whose fate is unknown (the leader's connection dropped
    /// after it was sent) is retried too, so a command may be applied twice;
    /// the application's commands must tolerate that (at-least-once).
    pub async fn propose(
        &self,
        group: GroupId,
        cmd: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, ProposeError> {
        let deadline = Instant::now() + timeout;
        let mut hint: Option<NodeId> = None;
        let mut last_error = ProposeError::NoLeader(group);
        let mut backoff = Duration::from_millis(5);
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(last_error);
            }
            let local = self.group(group);
            let target = match (&local, hint) {
                (_, Some(h)) => Some(h),
                (Some(g), None) => g.leader(),
                (None, None) => {
                    let known = lock(&self.hints).get(&group).copied();
                    match known {
                        Some(k) => Some(k),
                        None => match self.ask_leader(group, remaining).await {
                            Ok(leader) => leader,
                            Err(e) => {
                                last_error = e;
                                None
                            }
                        },
                    }
                }
            };
            hint = None;
            match target {
                Some(t) if t == self.me => {
                    let Some(g) = local else {
                        last_error = ProposeError::NoGroup(group);
                        continue;
                    };
                    match write_local(&g.raft, cmd.clone(), remaining).await {
                        ProposeOutcome::Applied(reply) => return Ok(reply),
                        ProposeOutcome::NotLeader { leader } => {
                            hint = leader.filter(|l| *l != self.me);
                            last_error = ProposeError::NoLeader(group);
                        }
                        ProposeOutcome::Timeout => return Err(ProposeError::Timeout),
                        ProposeOutcome::NoGroup => last_error = ProposeError::NoGroup(group),
                        ProposeOutcome::Failed(e) => return Err(ProposeError::Other(e)),
                    }
                }
                Some(t) => {
                    let request = Request::Propose {
                        group,
                        cmd: cmd.clone(),
                        timeout_ms: remaining.as_millis() as u64,
                    };
                    // A little longer than the leader's own bound, so its
                    // verdict arrives rather than a bare timeout.
                    let wait = remaining + Duration::from_millis(100);
                    // A leader the failure detector has given up on (killed,
                    // paused, cut off) is not waited for: its connection may
                    // stay open while it answers nothing. The proposal goes
                    // to the next leader instead (and may then be applied
                    // twice, if the old one comes back and had committed it).
                    if !lock(&self.liveness).is_up(t) {
                        lock(&self.hints).remove(&group);
                        let remaining = deadline.saturating_duration_since(Instant::now());
                        tokio::time::sleep(backoff.min(remaining)).await;
                        backoff = (backoff * 2).min(PROPOSE_MAX_BACKOFF);
                        continue;
                    }
                    let mut events = self.events.subscribe();
                    let peer_down = async move {
                        loop {
                            match events.recv().await {
                                Ok(PeerEvent::Down(p)) if p == t => return,
                                Err(broadcast::error::RecvError::Closed) => {
                                    std::future::pending::<()>().await
                                }
                                _ => {}
                            }
                        }
                    };
                    let answer = tokio::select! {
                        answer = self.transport.call(t, request, wait) => answer,
                        _ = peer_down => Err(CallError::Unreachable(t, "declared down while a proposal waited")),
                    };
                    match answer {
                        Ok(Reply::Proposed(ProposeOutcome::Applied(reply))) => {
                            if local.is_none() {
                                lock(&self.hints).insert(group, t);
                            }
                            return Ok(reply);
                        }
                        Ok(Reply::Proposed(ProposeOutcome::NotLeader { leader })) => {
                            hint = leader.filter(|l| *l != t);
                            last_error = ProposeError::NoLeader(group);
                        }
                        Ok(Reply::Proposed(ProposeOutcome::Timeout))
                        | Err(CallError::Timeout(_)) => {
                            return Err(ProposeError::Timeout);
                        }
                        Ok(Reply::Proposed(ProposeOutcome::NoGroup)) => {
                            last_error = ProposeError::NoGroup(group);
                        }
                        Ok(Reply::Proposed(ProposeOutcome::Failed(e))) => {
                            last_error = ProposeError::Other(e);
                        }
                        Ok(_) => last_error = ProposeError::Other("unexpected reply".into()),
                        Err(e) => {
                            tracing::debug!(group, error = %e, "forwarding a proposal failed");
                            last_error = ProposeError::NoLeader(group);
                        }
                    }
                    if hint.is_none() {
                        lock(&self.hints).remove(&group);
                    }
                }
                None => {}
            }
            if hint.is_none() {
                let remaining = deadline.saturating_duration_since(Instant::now());
                tokio::time::sleep(backoff.min(remaining)).await;
                backoff = (backoff * 2).min(PROPOSE_MAX_BACKOFF);
            }
        }
    }

    /// Asks every other node who leads `group`. `Ok(None)`: somebody has
    /// the group but knows no leader (yet).
    async fn ask_leader(
        &self,
        group: GroupId,
        remaining: Duration,
    ) -> Result<Option<NodeId>, ProposeError> {
        let wait = remaining.min(Duration::from_millis(500));
        let asks = self
            .peers
            .keys()
            .filter(|p| **p != self.me)
            .map(|p| self.transport.call(*p, Request::WhoLeads { group }, wait));
        let answers = futures_util::future::join_all(asks).await;
        let mut anyone_has_it = false;
        let mut all_answered = true;
        for answer in answers {
            match answer {
                Ok(Reply::Leader(info)) => {
                    anyone_has_it |= info.has_group;
                    if let Some(leader) = info.leader {
                        return Ok(Some(leader));
                    }
                }
                _ => all_answered = false,
            }
        }
        if !anyone_has_it && all_answered {
            Err(ProposeError::NoGroup(group))
        } else {
            Err(ProposeError::NoLeader(group))
        }
    }

    pub fn leader(&self, group: GroupId) -> Option<NodeId> {
        match self.group(group) {
            Some(g) => g.leader(),
            None => lock(&self.hints).get(&group).copied(),
        }
    }

    pub fn is_leader(&self, group: GroupId) -> bool {
        self.group(group).is_some_and(|g| g.raft.is_leader())
    }

    pub fn status(&self) -> Vec<GroupStatus> {
        let mut out: Vec<GroupStatus> = self
            .all_groups()
            .into_iter()
            .map(|(id, g)| {
                let metrics = g.raft.metrics().borrow_watched().clone();
                GroupStatus {
                    group: id,
                    leader: metrics.current_leader,
                    term: metrics.current_term,
                    last_applied: g.sm.last_applied().unwrap_or(0),
                    members: metrics.membership_config.voter_ids().collect(),
                }
            })
            .collect();
        out.sort_by_key(|s| s.group);
        out
    }

    fn app(&self) -> Option<Arc<dyn AppHandler>> {
        self.app.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// One-way app message, ordered per peer. Returns false when it was
    /// not handed to a live connection (the peer is not connected, or its
    /// send queue and the overflow behind it are full): the caller decides
    /// what a message that never left means, since nothing else will tell
    /// it.
    #[must_use = "a one-way message may be dropped; the caller must handle that"]
    pub fn send(&self, to: NodeId, msg: Bytes) -> bool {
        if to == self.me {
            if let Some(app) = self.app() {
                app.on_message(self.me, msg);
                return true;
            }
            return false;
        }
        self.transport.send_message(to, msg)
    }

    /// An app request to `to`, answered by its [`AppHandler::on_call`].
    pub async fn call(
        &self,
        to: NodeId,
        msg: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, ProposeError> {
        if to == self.me {
            let app = self
                .app()
                .ok_or_else(|| ProposeError::Other("no app handler".into()))?;
            return tokio::time::timeout(timeout, app.on_call(self.me, msg))
                .await
                .map_err(|_| ProposeError::Timeout);
        }
        match self.transport.call(to, Request::App(msg), timeout).await {
            Ok(Reply::App(reply)) => Ok(reply),
            Ok(_) => Err(ProposeError::Other("unexpected reply".into())),
            Err(CallError::Timeout(_)) => Err(ProposeError::Timeout),
            Err(e) => Err(ProposeError::Other(e.to_string())),
        }
    }

    /// Failure detector's current view: which nodes are reachable (this
    /// node counts as reachable).
    pub fn reachable(&self) -> BTreeMap<NodeId, bool> {
        let mut view = lock(&self.liveness).view();
        view.insert(self.me, true);
        view
    }

    pub fn peer_events(&self) -> broadcast::Receiver<PeerEvent> {
        self.events.subscribe()
    }

    /// Stops every group, closes the links and closes the log database
    /// (so the same data_dir can be opened again once this returns).
    pub async fn shutdown(&self) {
        self.stopped.send_replace(true);
        self.transport.close();
        let groups: Vec<Arc<Group>> = self
            .groups
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|(_, g)| g)
            .collect();
        for g in &groups {
            g.watcher.abort();
            if let Err(e) = g.raft.shutdown().await {
                tracing::warn!(error = %e, "group did not stop cleanly");
            }
        }
        drop(groups);
        let log = lock(&self.log).take();
        if let Some(log) = log {
            // openraft's tasks drop their handles as they finish; wait for
            // them (bounded) so the database is really closed.
            let deadline = Instant::now() + Duration::from_secs(5);
            while Arc::strong_count(&log) > 1 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if Arc::strong_count(&log) > 1 {
                tracing::warn!("raft log still referenced after shutdown");
            }
            // Dropping joins the writer thread: blocking.
            let _ = tokio::task::spawn_blocking(move || drop(log)).await;
        }
        tracing::info!(node = self.me, "raft node stopped");
    }

    /// Makes sure `group` gets a leader other than `failed` within `effort`:
    /// the group joins this node's election queue, which the node's one
    /// election pacer ([`election_pacer`]) works through. Whenever the group
    /// still has no (live) leader and it is this node's turn among the
    /// reachable voters (see [`whose_turn`]), the pacer runs a pre-vote and,
    /// if that succeeds, an election. Only one voter tries at a time, so
    /// candidates do not raise terms against each other; a pre-vote that
    /// fails raises nothing.
    fn elect_in_turn(&self, group: GroupId, failed: Option<NodeId>, effort: Duration) {
        let until = Instant::now() + effort;
        let mut wanting = lock(&self.wanting);
        let want = wanting.entry(group).or_insert(Want {
            failed,
            until,
            tried: None,
        });
        want.until = want.until.max(until);
        if failed.is_some() {
            want.failed = failed;
        }
    }
}

/// A group in the node's election queue.
pub(crate) struct Want {
    /// The leader that was lost (a leader still reported as this one does
    /// not count as settled).
    failed: Option<NodeId>,
    /// When the node stops trying (the leaderless sweep takes over).
    until: Instant,
    /// When this node last asked for votes in it.
    tried: Option<Instant>,
}

/// How often the election pacer looks at the queue.
const PACER_TICK: Duration = Duration::from_millis(50);

/// Time after an attempt before the same group is tried again by this node:
/// a vote round trip, with fsyncs.
const RETRY_AFTER: Duration = Duration::from_millis(300);

/// Elections this node runs at once, at most. After a whole-cluster
/// restart every group wants a leader; running them all at once would
/// queue thousands of vote RPCs and fsyncs behind each other.
const ELECTIONS_IN_FLIGHT: usize = 64;

/// The node's one election task: it works through the groups in its
/// election queue, in turns and in bounded batches, so the cost of
/// elections is paced per node rather than a task per group.
async fn election_pacer(node: Weak<RaftNode>, mut stopped: watch::Receiver<bool>) {
    let in_flight = Arc::new(tokio::sync::Semaphore::new(ELECTIONS_IN_FLIGHT));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(PACER_TICK) => {}
            _ = stopped.wait_for(|s| *s) => return,
        }
        let Some(node) = node.upgrade() else { return };
        let now = Instant::now();
        let wall = std::time::SystemTime::now();
        let me = node.me;
        let mut due = Vec::new();
        {
            let live = lock(&node.liveness);
            let mut wanting = lock(&node.wanting);
            wanting.retain(|group, want| {
                if now >= want.until {
                    return false;
                }
                let Some(g) = node.group(*group) else {
                    return false;
                };
                let settled = match g.leader() {
                    Some(l) if l == me => true,
                    Some(l) => Some(l) != want.failed && !live.is_down(l),
                    None => false,
                };
                if settled {
                    return false;
                }
                if want.tried.is_some_and(|t| now < t + RETRY_AFTER) {
                    return true;
                }
                let reachable: Vec<NodeId> = g
                    .raft
                    .voter_ids()
                    .filter(|v| *v == me || (Some(*v) != want.failed && live.is_up(*v)))
                    .collect();
                if whose_turn(*group, &reachable, wall) == Some(me) {
                    due.push((*group, g));
                    want.tried = Some(now);
                }
                true
            });
        }
        for (group, g) in due {
            let Ok(permit) = in_flight.clone().acquire_owned().await else {
                return;
            };
            tracing::debug!(group, "starting election");
            tokio::spawn(async move {
                let _ = g.raft.trigger().elect(true).await;
                drop(permit);
            });
        }
    }
}

impl OnPeerLost for RaftNode {
    fn peer_lost(&self, peer: NodeId) {
        lock(&self.hints).retain(|_, leader| *leader != peer);
        for (id, g) in self.all_groups() {
            if g.leader() != Some(peer) {
                continue;
            }
            if !g.voters().contains(&self.me) {
                continue;
            }
            self.elect_in_turn(id, Some(peer), ELECTION_EFFORT);
        }
    }
}

impl Inbound for RaftNode {
    fn request(
        self: Arc<Self>,
        from: NodeId,
        req: Request,
    ) -> Pin<Box<dyn Future<Output = Result<Reply, String>> + Send>> {
        Box::pin(async move {
            match req {
                Request::Raft { group, rpc } => {
                    let g = self.group_when_open(group).await.ok_or_else(|| {
                        format!("group {group} does not exist on node {}", self.me)
                    })?;
                    network::serve(&g.raft, rpc).await.map(Reply::Raft)
                }
                Request::Propose {
                    group,
                    cmd,
                    timeout_ms,
                } => {
                    let outcome = match self.group(group) {
                        None => ProposeOutcome::NoGroup,
                        Some(g) => match g.leader() {
                            Some(l) if l == self.me => {
                                write_local(&g.raft, cmd, Duration::from_millis(timeout_ms)).await
                            }
                            leader => ProposeOutcome::NotLeader { leader },
                        },
                    };
                    Ok(Reply::Proposed(outcome))
                }
                Request::WhoLeads { group } => {
                    let g = self.group(group);
                    Ok(Reply::Leader(LeaderInfo {
                        has_group: g.is_some(),
                        leader: g.and_then(|g| g.leader()),
                    }))
                }
                Request::App(msg) => {
                    let app = self.app().ok_or_else(|| "no app handler".to_string())?;
                    Ok(Reply::App(app.on_call(from, msg).await))
                }
            }
        })
    }

    fn message(&self, from: NodeId, msg: Bytes) {
        match self.app() {
            Some(app) => app.on_message(from, msg),
            None => tracing::debug!(from, "app message dropped: no handler"),
        }
    }
}

impl Drop for RaftNode {
    fn drop(&mut self) {
        // Stop the background loops and links if `shutdown` was not called.
        self.stopped.send_replace(true);
        self.transport.close();
    }
}

/// Writes on this node, which believes it leads the group, waiting at most
/// `timeout` for the entry to be committed and applied (a leader cut off
/// from its quorum would otherwise wait forever).
///
/// openraft refuses writes on a leader whose lease ran out, and the lease
/// is only renewed by followers' acknowledgements. With heartbeats off, an
/// idle group's leader is in that state; so when a write is refused while
/// this node still leads, one heartbeat round renews the lease (or shows
/// that the majority is gone) and the write is tried again. An idle queue
/// pays one round trip on its next write instead of heartbeats forever.
async fn write_local(
    raft: &Raft<GroupStateMachine>,
    cmd: Bytes,
    timeout: Duration,
) -> ProposeOutcome {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(2);
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let outcome = write_once(raft, cmd.clone(), remaining).await;
        let leading = raft.metrics().borrow_watched().state == ServerState::Leader;
        match outcome {
            ProposeOutcome::NotLeader { leader: None } if leading && !remaining.is_zero() => {
                let _ = raft.trigger().heartbeat().await;
                tokio::time::sleep(pause.min(remaining)).await;
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            other => return other,
        }
    }
}

async fn write_once(
    raft: &Raft<GroupStateMachine>,
    cmd: Bytes,
    timeout: Duration,
) -> ProposeOutcome {
    match tokio::time::timeout(timeout, raft.client_write(Command(cmd))).await {
        Err(_) => ProposeOutcome::Timeout,
        Ok(Ok(response)) => ProposeOutcome::Applied(response.data),
        Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
            tracing::debug!(leader = ?f.leader_id, "client write refused: not the leader");
            ProposeOutcome::NotLeader {
                leader: f.leader_id,
            }
        }
        Ok(Err(RaftError::APIError(ClientWriteError::LogEntryDiscarded(f)))) => {
            tracing::debug!(leader = ?f.leader_id, "client write discarded");
            ProposeOutcome::NotLeader {
                leader: f.leader_id,
            }
        }
        Ok(Err(e)) => ProposeOutcome::Failed(e.to_string()),
    }
}

/// Keeps the application's machine told whether this node leads the group.
/// Wakes only when the group's server state changes.
async fn watch_leadership(raft: Raft<GroupStateMachine>, sm: GroupStateMachine) {
    let mut metrics = raft.server_metrics();
    loop {
        let is_leader = metrics.borrow_watched().state == ServerState::Leader;
        sm.set_leader(is_leader);
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// Which voter may start an election in a leaderless group during the
/// current sweep window: the voters this node can reach take turns, in an
/// order that moves on every window. Nodes read the same wall clock, so
/// they agree on whose turn it is and do not duel with rising terms.
fn whose_turn(
    group: GroupId,
    reachable_voters: &[NodeId],
    now: std::time::SystemTime,
) -> Option<NodeId> {
    if reachable_voters.is_empty() {
        return None;
    }
    let window = now
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64 / SWEEP_WINDOW.as_millis() as u64)
        .unwrap_or(0);
    let i = (group.wrapping_add(window) % reachable_voters.len() as u64) as usize;
    Some(reachable_voters[i])
}

/// How long a member of a new group waits for the group's initialiser to
/// send it the membership before it initialises the group itself.
const INITIALIZE_FALLBACK: Duration = Duration::from_secs(3);

/// The member that writes a new group's first membership entry.
fn initializer(group: GroupId, members: &BTreeSet<NodeId>) -> NodeId {
    let i = (group % members.len().max(1) as u64) as usize;
    members.iter().copied().nth(i).unwrap_or_default()
}

/// Writes a new group's first membership entry on this node.
async fn initialize(
    raft: &Raft<GroupStateMachine>,
    group: GroupId,
    nodes: BTreeMap<NodeId, BasicNode>,
) -> Result<(), io::Error> {
    match raft.initialize(nodes).await {
        Ok(()) => Ok(()),
        // Another call got there first; the membership is on disk.
        Err(RaftError::APIError(e)) => {
            tracing::debug!(group, error = %e, "group already initialised");
            Ok(())
        }
        Err(e) => Err(io::Error::other(e)),
    }
}

/// How long a peer's RPC for a group this node has yet to re-open waits for
/// it. Shorter than openraft's RPC timeouts (1 s for appends and votes), so
/// a group that does not open in time answers with an error, not silence.
const OPENING_WAIT: Duration = Duration::from_millis(800);

/// Length of one turn in [`whose_turn`].
const SWEEP_WINDOW: Duration = Duration::from_millis(1500);

/// How long a node keeps trying, in its turns, to get a leader for a group
/// that was just opened or whose leader was lost; the leaderless sweep
/// takes over after that.
const ELECTION_EFFORT: Duration = Duration::from_secs(5);

/// Every [`LEADERLESS_SWEEP`] (with jitter), starts an election in every
/// group that has no leader, or whose leader the detector thinks is down.
async fn leaderless_sweep(node: Weak<RaftNode>, mut stopped: watch::Receiver<bool>) {
    loop {
        let jitter = rand::random_range(0..=LEADERLESS_SWEEP.as_millis() as u64 / 2);
        let pause = LEADERLESS_SWEEP * 3 / 4 + Duration::from_millis(jitter);
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stopped.wait_for(|s| *s) => return,
        }
        let Some(node) = node.upgrade() else { return };
        for (id, g) in node.all_groups() {
            let leader = g.leader();
            let orphaned = match leader {
                None => true,
                Some(l) if l == node.me => false,
                Some(l) => lock(&node.liveness).is_down(l),
            };
            if !orphaned || !g.raft.voter_ids().any(|v| v == node.me) {
                continue;
            }
            node.elect_in_turn(id, leader, LEADERLESS_SWEEP);
        }
    }
}

/// openraft's configuration for every group: its timers off (the node's
/// failure detector and sweep take their place), snapshots by `options`.
fn raft_config(options: &NodeOptions) -> io::Result<openraft::Config> {
    let snapshot_every = options.snapshot_every.max(1);
    let config = openraft::Config {
        cluster_name: "warren".into(),
        enable_tick: false,
        enable_heartbeat: false,
        enable_elect: false,
        // With heartbeats off, `heartbeat_interval` is only the timeout of
        // an append-entries RPC (openraft uses it so). A timed-out append is
        // retried only on the next write, so it must be long enough for a
        // follower's fsync on a loaded machine.
        heartbeat_interval: 1000,
        heartbeat_min_interval: Some(0),
        // Still used as the followers' leader lease: a vote request within
        // `election_timeout_max` of hearing from a live leader is refused.
        // Kept below the failure detector's default timeout, so that when a
        // leader is declared down its lease has run out.
        election_timeout_min: 1100,
        election_timeout_max: 1200,
        install_snapshot_timeout: 10_000,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(snapshot_every),
        max_in_snapshot_log_to_keep: options.keep_after_snapshot,
        purge_batch_size: 1,
        replication_lag_threshold: snapshot_every * 2,
        ..Default::default()
    };
    config
        .validate()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

#[cfg(test)]
mod turn_tests {
    use super::*;

    #[test]
    fn one_reachable_voter_has_the_turn_and_turns_move_on() {
        let voters = [1, 2, 3];
        let t0 = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let first = whose_turn(7, &voters, t0).unwrap();
        let later = whose_turn(7, &voters, t0 + SWEEP_WINDOW).unwrap();
        assert_ne!(first, later, "the turn moves to another voter");
        // Every voter gets a turn within as many windows as there are voters.
        let turns: BTreeSet<NodeId> = (0..3)
            .map(|k| whose_turn(7, &voters, t0 + SWEEP_WINDOW * k).unwrap())
            .collect();
        assert_eq!(turns.len(), 3);
        assert_eq!(whose_turn(7, &[], t0), None);
    }
}
