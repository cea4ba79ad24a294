//! The running broker on this machine: definitions, queue runners, the
//! channels that own consumers, and the operations that touch several of
//! them (declare, delete, dead-lettering).
//!
//! Connections and queues talk through the node: a queue hands a delivery
//! to `deliver(owner, …)`, which finds the owning channel's connection on
//! this node or sends it to the channel's node, and says what became of it
//! (`Handover`), so that no delivery is lost unnoticed. Nothing here blocks
//! on a socket.
//!
//! Definitions are changed through the metadata Raft group: `apply_meta`
//! proposes, waits until every reachable node has applied the change, and
//! every node applies the committed command in `apply_meta_local`, which
//! also starts and stops the queues the command concerns on this node (a
//! proxy on every node for a replicated queue and its Raft group on the
//! replicas; for a node-local queue a runner on its home node and a proxy
//! forwarding to it everywhere else). Groups open and close in one ordered
//! task (`GroupOp`).

use crate::broker::error::BrokerError;
use crate::broker::metadata::{ConnId, MetaCommand, MetaOutcome, Metadata, Placement, QueueDef};
use crate::cluster::meta_sm::{META_GROUP, MetaSm};
use crate::cluster::proxy::{PROPOSE_TIMEOUT, Target};
use crate::cluster::queue_sm::QueueSm;
use crate::cluster::wire::{AppCall, AppMsg, decode, encode};
use crate::config::Config;
use crate::message::Message;
use crate::metrics::Metrics;
use crate::queue::command::{Command, DeadLetterReason, MsgId, OwnerId};
use crate::queue::config::QueueConfig;
use crate::queue::runner::{self, QueueHandle, Request};
use amq_protocol::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use tokio::sync::{mpsc, watch};
use warren_raft::RaftNode;

/// Milliseconds since the Unix epoch: the time carried inside commands.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What a queue (or the node) tells a channel.
#[derive(Debug)]
pub enum ChannelEvent {
    Deliver {
        queue: Arc<str>,
        tag: Arc<str>,
        id: MsgId,
        msg: Message,
        redelivered: bool,
    },
    Confirm {
        seq: u64,
        accepted: bool,
    },
    /// The queue the consumer was on was deleted.
    ConsumerCancelled {
        tag: Arc<str>,
    },
    /// A direct reply-to response for this channel's pseudo-consumer.
    DirectReply {
        msg: Message,
    },
    /// A queue was deleted; sent to every channel of the node, which cancels
    /// its consumers of that queue (consumer cancel notification).
    QueueDeleted {
        vhost: Arc<str>,
        queue: Arc<str>,
    },
}

/// A consumer: the channel that owns it and its tag.
type ConsumerRef = (OwnerId, Arc<str>);

/// Events for a connection, tagged with the channel they are for.
pub type ConnEvents = mpsc::UnboundedSender<(u16, ChannelEvent)>;

/// How long a definition change waits for each other node to apply it.
const PEER_APPLY_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Notices held for one unreachable node, at most.
const MAX_HELD_CANCELS: usize = 65_536;

/// The node a channel (owner) lives on: its id is in the top 16 bits.
pub fn owner_node(owner: OwnerId) -> u64 {
    owner >> 48
}

/// What became of a delivery handed to [`Node::deliver`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handover {
    /// On its way to the channel.
    Sent,
    /// The channel is on this node and gone: its messages go back.
    OwnerGone,
    /// The channel's node could not be reached: the message never left,
    /// so the queue takes it back and drops the consumer, which is told
    /// once its node can be reached.
    NotSent,
}

/// A change to the queue groups this node holds a replica of.
///
/// Applying the definitions may open a group and close it again in quick
/// succession (a queue declared and deleted, replayed at start); both
/// take time, so they run in a task of their own, and one task for all of
/// them keeps their order. Two independent tasks would race: a close that
/// runs before its open finds nothing to close, and the group is left on
/// disk, leaderless and campaigning, for a queue that no longer exists.
enum GroupOp {
    Open {
        group: u64,
        members: std::collections::BTreeSet<u64>,
        sm: Box<QueueSm>,
    },
    Close {
        group: u64,
    },
}

/// Group operations carried out at once, at most. Opening a group reads its
/// snapshot and log state; after a restart with thousands of groups,
/// opening them one by one was most of the time before they served.
const GROUP_OPS_IN_PARALLEL: usize = 32;

/// Carries out [`GroupOp`]s: in order for any one group (an operation
/// waits for the previous one on its group), up to
/// [`GROUP_OPS_IN_PARALLEL`] groups at a time. The channel is unbounded
/// because definitions are applied where nothing may wait; it holds at most
/// one operation per definition change in flight.
async fn run_group_ops(raft: Arc<RaftNode>, mut ops: mpsc::UnboundedReceiver<GroupOp>) {
    let permits = Arc::new(tokio::sync::Semaphore::new(GROUP_OPS_IN_PARALLEL));
    // The last operation of each group still running.
    let mut last: HashMap<u64, tokio::task::JoinHandle<()>> = HashMap::new();
    while let Some(op) = ops.recv().await {
        let group = match &op {
            GroupOp::Open { group, .. } | GroupOp::Close { group } => *group,
        };
        last.retain(|_, h| !h.is_finished());
        let before = last.remove(&group);
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let raft = raft.clone();
        let handle = tokio::spawn(async move {
            if let Some(before) = before {
                let _ = before.await;
            }
            group_op(&raft, op).await;
            drop(permit);
        });
        last.insert(group, handle);
    }
}

async fn group_op(raft: &RaftNode, op: GroupOp) {
    match op {
        GroupOp::Open { group, members, sm } => {
            if let Err(e) = raft.create_group(group, members, sm).await {
                tracing::error!(group, "cannot open a queue's Raft group: {e}");
            }
        }
        // Also a group that is on disk but was never opened in this run
        // (its queue was deleted while this node was down).
        GroupOp::Close { group } => {
            if raft.has_group(group) || raft.groups_on_disk().contains(&group) {
                raft.remove_group(group).await;
            }
        }
    }
}

/// Where a dead-lettered message goes ([`Node::route_dead_letter`]).
pub struct DeadLetterRoute {
    /// The message as republished: `x-death` added, the dead-letter
    /// exchange and routing key as its exchange and routing key.
    pub msg: Message,
    /// The queues the dead-letter exchange routes it to.
    pub targets: Vec<Arc<str>>,
    /// The exchange also routed it back to the queue it left, which the
    /// cycle rule leaves out.
    pub cycled: bool,
}

/// One Warren node.
pub struct Node {
    pub config: Config,
    pub metrics: Metrics,
    meta: RwLock<Metadata>,
    /// vhost -> queue name -> runner.
    queues: RwLock<HashMap<String, HashMap<Arc<str>, QueueHandle>>>,
    /// Channels that own consumers or deliveries, by owner id.
    owners: RwLock<HashMap<OwnerId, (ConnEvents, u16)>>,
    next_id: AtomicU64,
    /// True while a resource alarm (memory) blocks publishers.
    pub alarm: watch::Sender<bool>,
    /// Resident memory above which the alarm fires, bytes; changed at run
    /// time through the admin API.
    pub memory_limit: AtomicU64,
    raft: Arc<RaftNode>,
    /// The first id this run of the node hands out. Ids grow across runs
    /// (they start from the clock), so an owner id below it belongs to an
    /// earlier run and its channel is gone.
    pub boot_floor: u64,
    /// True once the metadata group has a leader and this node has cleaned
    /// up after its previous run: the node then accepts clients.
    pub ready: watch::Sender<bool>,
    /// Index of the last metadata entry this node applied.
    pub meta_applied: watch::Sender<u64>,
    /// Opening and closing of this node's queue groups, carried out one at
    /// a time in the order the definitions were applied (see [`GroupOp`]).
    group_ops: mpsc::UnboundedSender<GroupOp>,
    /// Consumer cancellations waiting for their node to be reachable, by
    /// node.
    pending_cancels: std::sync::Mutex<HashMap<u64, std::collections::BTreeSet<ConsumerRef>>>,
}

impl Node {
    /// Starts the node's Raft engine and re-opens the metadata group (and,
    /// through it, every queue this node holds a replica of).
    pub async fn start(config: Config) -> anyhow::Result<Arc<Node>> {
        let raft = RaftNode::start(config.cluster_config())
            .await
            .map_err(|e| anyhow::anyhow!("cannot start the cluster engine: {e}"))?;
        let (alarm, _) = watch::channel(false);
        let (ready, _) = watch::channel(false);
        let (meta_applied, _) = watch::channel(0);
        // 64 ids a millisecond on average before the next run could reuse
        // one; 48 bits hold the product for thousands of years.
        let boot_floor = now_ms().saturating_mul(64) & ((1 << 48) - 1);
        let (group_ops, ops) = mpsc::unbounded_channel();
        tokio::spawn(run_group_ops(raft.clone(), ops));
        let node = Arc::new(Node {
            metrics: Metrics::new(),
            meta: RwLock::new(Metadata::new()),
            queues: RwLock::new(HashMap::new()),
            owners: RwLock::new(HashMap::new()),
            next_id: AtomicU64::new(boot_floor),
            alarm,
            memory_limit: AtomicU64::new(crate::server::memory_limit(&config)),
            raft: raft.clone(),
            boot_floor: ((config.node_id as u64) << 48) | boot_floor,
            ready,
            meta_applied,
            pending_cancels: std::sync::Mutex::new(HashMap::new()),
            group_ops,
            config,
        });
        raft.set_app_handler(Arc::new(crate::cluster::Handler {
            node: Arc::downgrade(&node),
        }));
        let members = raft.nodes().into_iter().collect();
        raft.create_group(
            META_GROUP,
            members,
            Box::new(MetaSm {
                node: Arc::downgrade(&node),
            }),
        )
        .await
        .map_err(|e| anyhow::anyhow!("cannot open the metadata group: {e}"))?;
        tokio::spawn(crate::cluster::watch_peers(Arc::downgrade(&node)));
        tokio::spawn(after_boot(node.clone()));
        Ok(node)
    }

    pub fn raft(&self) -> &Arc<RaftNode> {
        &self.raft
    }

    pub fn node_id(&self) -> u64 {
        self.config.node_id as u64
    }

    /// A new id for a connection or channel, unique in the cluster: the node
    /// id is in the top 16 bits.
    pub fn next_id(&self) -> u64 {
        ((self.config.node_id as u64) << 48) | self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn meta(&self) -> std::sync::RwLockReadGuard<'_, Metadata> {
        self.meta.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Proposes a definition command to the metadata group and returns its
    /// outcome once committed (every node applies it).
    pub async fn apply_meta(
        self: &Arc<Self>,
        mut cmd: MetaCommand,
    ) -> Result<MetaOutcome, BrokerError> {
        let barrier = matches!(cmd, MetaCommand::Barrier);
        if let MetaCommand::DeclareQueue { vhost, def } = &mut cmd {
            // A redeclare keeps the queue where it is; only a new queue is
            // placed.
            let existing = self
                .meta()
                .queue(vhost, &def.name)
                .map(|q| q.placement.clone());
            def.placement = existing.unwrap_or_else(|| self.place(def));
        }
        let reply = self
            .raft
            .propose(META_GROUP, encode(&cmd), PROPOSE_TIMEOUT)
            .await
            .map_err(|e| BrokerError::internal(format!("cluster unavailable: {e}")))?;
        let Some((index, outcome)) = decode::<(u64, Result<MetaOutcome, BrokerError>)>(&reply)
        else {
            return Err(BrokerError::internal("undecodable metadata reply"));
        };
        // A follower learns that the entry is committed a moment after the
        // leader; wait for it here (bounded) so this node's routing table
        // already has what the client just changed.
        if !self.meta_applied_up_to(index).await {
            return Err(BrokerError::internal(
                "this node did not catch up with the cluster's metadata",
            ));
        }
        if !barrier {
            self.wait_peers_applied(index).await;
        }
        outcome
    }

    /// Waits (at most [`PROPOSE_TIMEOUT`]) until this node has applied the
    /// metadata log up to `index`; false if it did not in time.
    pub async fn meta_applied_up_to(&self, index: u64) -> bool {
        let mut applied = self.meta_applied.subscribe();
        let caught_up =
            tokio::time::timeout(PROPOSE_TIMEOUT, applied.wait_for(|a| *a >= index)).await;
        matches!(caught_up, Ok(Ok(_)))
    }

    /// Waits until every other node the failure detector sees has applied
    /// the metadata log up to `index`, so that when a client is told
    /// declare-ok or bind-ok, a publish or consume through any node sees
    /// the change (RabbitMQ's definitions behave so). A node that does not
    /// answer within [`PEER_APPLY_WAIT`] is not waited for: it is slow or
    /// cut off, and a lookup there that misses catches up first
    /// ([`Node::sync_meta`]).
    async fn wait_peers_applied(&self, index: u64) {
        let peers: Vec<u64> = self
            .raft
            .reachable()
            .into_iter()
            .filter(|(n, up)| *up && *n != self.node_id())
            .map(|(n, _)| n)
            .collect();
        let calls = peers.into_iter().map(|peer| {
            let raft = self.raft.clone();
            async move {
                let call = encode(&AppCall::MetaApplied { index });
                let _ = raft.call(peer, call, PEER_APPLY_WAIT).await;
            }
        });
        let mut set = tokio::task::JoinSet::new();
        for c in calls {
            set.spawn(c);
        }
        while set.join_next().await.is_some() {}
    }

    /// Brings this node's definitions up to date with everything the
    /// cluster committed before the call, so that a definition just made
    /// through another node is seen here. Called when a lookup misses,
    /// before answering 404: a client that declared a queue on node 1 and
    /// then uses it on node 2 must find it, as with RabbitMQ. Costs one
    /// metadata round trip, and only on a miss.
    pub async fn sync_meta(self: &Arc<Self>) {
        if let Err(e) = self.apply_meta(MetaCommand::Barrier).await {
            tracing::debug!("metadata barrier failed: {e}");
        }
    }

    /// Where a new queue goes. A replicated queue gets a fresh group id and
    /// `x-quorum-initial-group-size` replicas (3 by default, at most the
    /// cluster's size), starting at the node after the last queue's first
    /// replica so that leaders spread over the nodes.
    fn place(&self, def: &QueueDef) -> Placement {
        if !def.is_replicated() {
            return Placement {
                group: None,
                replicas: Vec::new(),
                home: self.node_id(),
            };
        }
        let nodes = self.raft.nodes();
        let size = def
            .arguments
            .inner()
            .get("x-quorum-initial-group-size")
            .and_then(crate::message::value_int)
            .filter(|&n| n > 0)
            .map(|n| n as usize)
            .unwrap_or(3)
            .min(nodes.len());
        let existing = {
            let meta = self.meta();
            meta.vhosts()
                .map(|v| {
                    meta.queues(v)
                        .filter(|q| q.placement.group.is_some())
                        .count()
                })
                .sum::<usize>()
        };
        let start = existing % nodes.len().max(1);
        let replicas = (0..size)
            .map(|i| nodes[(start + i) % nodes.len()])
            .collect();
        Placement {
            group: Some(rand::random::<u64>() | 1),
            replicas,
            home: self.node_id(),
        }
    }

    /// Applies a committed definition command on this node and starts or
    /// stops the queues it creates or deletes.
    pub fn apply_meta_local(
        self: &Arc<Self>,
        cmd: MetaCommand,
    ) -> Result<MetaOutcome, BrokerError> {
        let spawn = match &cmd {
            MetaCommand::DeclareQueue { vhost, def } => Some((vhost.clone(), def.clone())),
            _ => None,
        };
        let mut removed: Vec<(String, String)> = Vec::new();
        let outcome = {
            let mut meta = self.meta.write().unwrap_or_else(|e| e.into_inner());
            match &cmd {
                MetaCommand::DeleteQueue { vhost, name } => {
                    removed.push((vhost.clone(), name.clone()));
                }
                MetaCommand::ConnectionClosed { conn } => {
                    removed.extend(meta.exclusive_queues_of(*conn));
                }
                _ => {}
            }
            meta.apply(cmd)?
        };
        if let (Some((vhost, def)), true) = (spawn, outcome.created) {
            self.start_queue(&vhost, &def);
        }
        if !outcome.deleted_queues.is_empty() {
            for (vhost, name) in removed {
                if outcome.deleted_queues.contains(&name) {
                    self.stop_queue(&vhost, &name);
                }
            }
        }
        Ok(outcome)
    }

    /// Replaces the definitions with a metadata snapshot: queues that are no
    /// longer defined stop, new ones start.
    pub fn restore_meta(self: &Arc<Self>, cmds: Vec<MetaCommand>) {
        let mut fresh = Metadata::new();
        for cmd in cmds {
            let _ = fresh.apply(cmd);
        }
        let old = std::mem::replace(
            &mut *self.meta.write().unwrap_or_else(|e| e.into_inner()),
            fresh,
        );
        let meta = self.meta().clone();
        for v in old.vhosts() {
            for q in old.queues(v) {
                if meta.queue(v, &q.name).map(|d| &d.placement) != Some(&q.placement) {
                    self.stop_queue(v, &q.name);
                }
            }
        }
        for v in meta.vhosts() {
            for q in meta.queues(v) {
                if self.queue(v, &q.name).is_none() {
                    self.start_queue(v, q);
                }
            }
        }
    }

    fn start_queue(self: &Arc<Self>, vhost: &str, def: &QueueDef) {
        let config = QueueConfig::from_arguments(
            def.durable,
            def.exclusive_owner.is_some(),
            def.auto_delete,
            &def.arguments,
        )
        .unwrap_or_else(|_| QueueConfig::classic());
        let handle = match def.placement.group {
            Some(group) => {
                let h = crate::cluster::proxy::spawn(
                    self.clone(),
                    Arc::from(vhost),
                    Arc::from(def.name.as_str()),
                    config,
                    Target::Group(group),
                );
                if def.placement.replicas.contains(&self.node_id()) {
                    let sm = QueueSm::new(
                        self,
                        h.vhost.clone(),
                        h.name.clone(),
                        h.config.clone(),
                        h.stats.clone(),
                    );
                    let members = def.placement.replicas.iter().copied().collect();
                    let _ = self.group_ops.send(GroupOp::Open {
                        group,
                        members,
                        sm: Box::new(sm),
                    });
                }
                h
            }
            // A node-local queue declared on another node runs there; this
            // node's handle forwards every request to it, so that any node
            // serves every queue.
            None if def.placement.home != 0 && def.placement.home != self.node_id() => {
                crate::cluster::proxy::spawn(
                    self.clone(),
                    Arc::from(vhost),
                    Arc::from(def.name.as_str()),
                    config,
                    Target::Home(def.placement.home),
                )
            }
            None => runner::spawn(
                self.clone(),
                Arc::from(vhost),
                Arc::from(def.name.as_str()),
                config,
                def.auto_delete,
            ),
        };
        self.queues
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(vhost.to_owned())
            .or_default()
            .insert(handle.name.clone(), handle);
    }

    /// Tells a consumer's channel, on this node or another, that the queue
    /// dropped its consumer (consumer cancel notification). A notice for a
    /// node that cannot be reached now is held and sent once it can.
    pub fn cancel_consumer(&self, owner: OwnerId, tag: Arc<str>) {
        let home = owner_node(owner);
        if home == self.node_id() {
            self.send_to_owner(owner, ChannelEvent::ConsumerCancelled { tag });
        } else if !self.raft.send(
            home,
            encode(&AppMsg::Cancelled {
                owner,
                tag: tag.clone(),
            }),
        ) {
            self.cancel_when_reachable(owner, tag);
        }
    }

    /// Holds a consumer cancellation for a node that cannot be reached now
    /// (it was declared down, or its link is not up); [`Node::flush_cancels`]
    /// sends it when the node can be reached again.
    pub fn cancel_when_reachable(&self, owner: OwnerId, tag: Arc<str>) {
        let mut held = self
            .pending_cancels
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let list = held.entry(owner_node(owner)).or_default();
        // Bounded: a node unreachable for long gets at most this many
        // notices; past that its clients find their channels closed anyway
        // once its connections to the cluster are gone.
        if list.len() < MAX_HELD_CANCELS {
            list.insert((owner, tag));
        }
    }

    /// Sends what `cancel_when_reachable` held for `peer`; what its link
    /// does not take stays held for the next try.
    pub fn flush_cancels(&self, peer: u64) {
        let held = self
            .pending_cancels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&peer)
            .unwrap_or_default();
        let mut kept = std::collections::BTreeSet::new();
        for (owner, tag) in held {
            let sent = kept.is_empty()
                && self.raft.send(
                    peer,
                    encode(&AppMsg::Cancelled {
                        owner,
                        tag: tag.clone(),
                    }),
                );
            if !sent {
                kept.insert((owner, tag));
            }
        }
        if !kept.is_empty() {
            self.pending_cancels
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(peer)
                .or_default()
                .append(&mut kept);
        }
    }

    /// The peers with held cancellations.
    pub fn peers_with_held_cancels(&self) -> Vec<u64> {
        self.pending_cancels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect()
    }

    /// Hands a delivery to the consumer's channel, on this node or another,
    /// and says whether it left: a delivery that was not handed over must
    /// go back to the queue, or the consumer's credit leaks.
    #[allow(clippy::too_many_arguments)]
    pub fn deliver(
        &self,
        owner: OwnerId,
        vhost: &Arc<str>,
        queue: &Arc<str>,
        tag: Arc<str>,
        id: MsgId,
        msg: Message,
        redelivered: bool,
    ) -> Handover {
        let home = owner_node(owner);
        if home == self.node_id() {
            let ev = ChannelEvent::Deliver {
                queue: queue.clone(),
                tag,
                id,
                msg,
                redelivered,
            };
            return match self.send_to_owner(owner, ev) {
                true => Handover::Sent,
                false => Handover::OwnerGone,
            };
        }
        let sent = self.raft.send(
            home,
            encode(&AppMsg::Deliver {
                owner,
                vhost: vhost.clone(),
                queue: queue.clone(),
                tag,
                id,
                msg,
                redelivered,
            }),
        );
        match sent {
            true => Handover::Sent,
            false => Handover::NotSent,
        }
    }

    /// A direct reply-to response for the channel `owner`, on this node or
    /// another; false when it could not be handed over.
    pub fn direct_reply(&self, owner: OwnerId, msg: Message) -> bool {
        let home = owner_node(owner);
        if home == self.node_id() {
            return self.send_to_owner(owner, ChannelEvent::DirectReply { msg });
        }
        self.raft
            .send(home, encode(&AppMsg::DirectReply { owner, msg }))
    }

    /// The runner of a queue, if it exists.
    pub fn queue(&self, vhost: &str, name: &str) -> Option<QueueHandle> {
        self.queues
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(vhost)?
            .get(name)
            .cloned()
    }

    /// Every queue runner (admin API, metrics).
    pub fn all_queues(&self) -> Vec<QueueHandle> {
        let q = self.queues.read().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<QueueHandle> = q.values().flat_map(|m| m.values().cloned()).collect();
        v.sort_by(|a, b| (&a.vhost, &a.name).cmp(&(&b.vhost, &b.name)));
        v
    }

    /// Deletes a queue's definition and stops its runner, which cancels its
    /// consumers. Returns the number of ready messages it held.
    pub async fn delete_queue(
        self: &Arc<Self>,
        vhost: &str,
        name: &str,
    ) -> Result<u64, BrokerError> {
        let count = match self.queue(vhost, name) {
            Some(h) => h.counts().await.map(|c| c.ready).unwrap_or(0),
            None => 0,
        };
        self.apply_meta(MetaCommand::DeleteQueue {
            vhost: vhost.to_owned(),
            name: name.to_owned(),
        })
        .await?;
        Ok(count)
    }

    /// Stops a deleted queue on this node: its runner or proxy ends, its
    /// Raft group is removed, and this node's consumers of it are told.
    fn stop_queue(self: &Arc<Self>, vhost: &str, name: &str) {
        let handle = self
            .queues
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(vhost)
            .and_then(|m| m.remove(name));
        let Some(h) = handle else { return };
        let owners: Vec<(ConnEvents, u16)> = self
            .owners
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        for (tx, ch) in owners {
            let _ = tx.send((
                ch,
                ChannelEvent::QueueDeleted {
                    vhost: h.vhost.clone(),
                    queue: h.name.clone(),
                },
            ));
        }
        if let Some(group) = h.group {
            let _ = self.group_ops.send(GroupOp::Close { group });
        }
        tokio::spawn(async move {
            let _ = h.send(Request::Stop).await;
        });
    }

    /// Deletes a queue from inside a runner (x-expires, auto-delete), where
    /// awaiting the runner itself would deadlock.
    pub fn delete_queue_later(self: &Arc<Self>, vhost: &str, name: &str) {
        let node = self.clone();
        let cmd = MetaCommand::DeleteQueue {
            vhost: vhost.to_owned(),
            name: name.to_owned(),
        };
        tokio::spawn(async move {
            let _ = node.apply_meta(cmd).await;
        });
    }

    /// A connection closed: its exclusive queues go with it.
    pub async fn connection_closed(self: &Arc<Self>, conn: ConnId, _vhost: &str) {
        if self.meta().has_exclusive_queues(conn) {
            let _ = self
                .apply_meta(MetaCommand::ConnectionClosed { conn })
                .await;
        }
    }

    pub fn register_owner(&self, owner: OwnerId, events: ConnEvents, channel: u16) {
        self.owners
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(owner, (events, channel));
    }

    pub fn unregister_owner(&self, owner: OwnerId) {
        self.owners
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&owner);
    }

    /// Sends an event to a channel; false when the channel is gone.
    pub fn send_to_owner(&self, owner: OwnerId, ev: ChannelEvent) -> bool {
        let owners = self.owners.read().unwrap_or_else(|e| e.into_inner());
        match owners.get(&owner) {
            Some((tx, ch)) => tx.send((*ch, ev)).is_ok(),
            None => false,
        }
    }

    /// Where a message dead-lettered by `queue` goes: the message as its
    /// dead-letter exchange republishes it (with an `x-death` entry, as
    /// RabbitMQ adds) and the queues that exchange routes it to. None when
    /// the queue has no dead-letter exchange or the exchange does not exist.
    pub fn route_dead_letter(
        &self,
        vhost: &str,
        queue: &str,
        config: &QueueConfig,
        msg: &Message,
        reason: DeadLetterReason,
    ) -> Option<DeadLetterRoute> {
        let dlx = config.dead_letter_exchange.as_deref()?;
        let routing_key = config
            .dead_letter_routing_key
            .clone()
            .unwrap_or_else(|| msg.routing_key.to_string());
        let dead = add_x_death(msg, queue, reason, now_ms());
        let dead = Message {
            exchange: Arc::from(dlx),
            routing_key: Arc::from(routing_key.as_str()),
            ..dead
        };
        let mut routed = Vec::new();
        self.meta()
            .route(vhost, dlx, &routing_key, &dead.raw_properties, &mut routed)
            .ok()?;
        // A message is never dead-lettered back into the queue it left for
        // the same reason in a cycle without a reject (RabbitMQ's cycle
        // rule); keeping it simple: skip the source queue unless the reason
        // is a rejection.
        let routed_count = routed.len();
        routed.retain(|name| &**name != queue || reason == DeadLetterReason::Rejected);
        Some(DeadLetterRoute {
            msg: dead,
            cycled: routed.len() < routed_count,
            targets: routed,
        })
    }

    /// Publishes a dead-lettered message to the queue's dead-letter exchange
    /// (at most once: nothing tells whether it arrived). Never waits: a full
    /// target queue gets the message from a spawned task.
    pub fn dead_letter(
        self: &Arc<Self>,
        vhost: &str,
        queue: &str,
        config: &QueueConfig,
        msg: Message,
        reason: DeadLetterReason,
    ) {
        let Some(route) = self.route_dead_letter(vhost, queue, config, &msg, reason) else {
            return;
        };
        self.metrics.dead_lettered.inc();
        for name in route.targets {
            if let Some(h) = self.queue(vhost, &name) {
                let cmd = Command::Enqueue {
                    msg: route.msg.clone(),
                    confirm: None,
                    now_ms: now_ms(),
                };
                if let Err(req) = h.try_send(Request::Apply(cmd, None)) {
                    tokio::spawn(async move {
                        let _ = h.send(*req).await;
                    });
                }
            }
        }
    }

    /// Checks a username and password against the configured users.
    pub fn authenticate(&self, user: &str, password: &str) -> bool {
        self.config
            .users
            .iter()
            .any(|u| u.name == user && u.password == password)
    }
}

/// What a node does once it is up: wait for the metadata group to have a
/// leader, then clean up after its previous run. Node-local queues do not
/// survive a restart (RabbitMQ's transient and exclusive queues do not
/// either), and the replicated queues give back what this node's channels
/// of the previous run held. Then the node is ready for clients.
async fn after_boot(node: Arc<Node>) {
    let started = std::time::Instant::now();
    let mut waited = 0u64;
    while node.raft.leader(META_GROUP).is_none() {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        waited += 50;
        if waited % 5000 == 0 {
            tracing::warn!("waiting for a majority of the cluster to elect a metadata leader");
        }
    }
    let stale: Vec<(String, String)> = {
        let meta = node.meta();
        meta.vhosts()
            .flat_map(|v| {
                meta.queues(v)
                    .filter(|q| q.placement.group.is_none() && q.placement.home == node.node_id())
                    .map(|q| (v.to_owned(), q.name.clone()))
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    for (vhost, name) in stale {
        let cmd = MetaCommand::DeleteQueue { vhost, name };
        if let Err(e) = node.apply_meta(cmd).await {
            tracing::warn!("could not remove a node-local queue of the previous run: {e}");
        }
    }
    node.ready.send_replace(true);
    tracing::info!("node ready");
    close_unplaced_groups(&node).await;
    tokio::spawn(report_leaders(node.clone(), started));
    for h in node.all_queues() {
        if h.group.is_some() {
            let _ = h
                .send(Request::NodeGone {
                    node: node.node_id(),
                    below: Some(node.boot_floor),
                })
                .await;
        }
    }
}

/// Removes the groups this node has on disk that the definitions no longer
/// place on it: their queue was deleted while the node was down, so no
/// entry will ever close them, and left alone they would sit on disk (or,
/// opened, campaign for a queue that is gone).
async fn close_unplaced_groups(node: &Arc<Node>) {
    node.sync_meta().await;
    let on_disk = node.raft.groups_on_disk();
    let placed: std::collections::HashSet<u64> = {
        let meta = node.meta();
        meta.vhosts()
            .flat_map(|v| {
                meta.queues(v)
                    .filter(|q| q.placement.replicas.contains(&node.node_id()))
                    .filter_map(|q| q.placement.group)
                    .collect::<Vec<_>>()
            })
            .chain([META_GROUP])
            .collect()
    };
    let gone: Vec<u64> = on_disk
        .into_iter()
        .filter(|g| !placed.contains(g))
        .collect();
    if !gone.is_empty() {
        tracing::info!(
            groups = gone.len(),
            "removing the groups of queues deleted while this node was down"
        );
    }
    for group in gone {
        let _ = node.group_ops.send(GroupOp::Close { group });
    }
}

/// How long after start the node waits for every group it holds to have a
/// leader before it says how many do.
const LEADERS_REPORT_WITHIN: std::time::Duration = std::time::Duration::from_secs(60);

/// One line per start that sums up the elections: how many of the groups
/// this node holds have a leader, and how long that took. It replaces the
/// per-group, per-RPC lines that a restart of a thousand queues would
/// otherwise write.
async fn report_leaders(node: Arc<Node>, since: std::time::Instant) {
    let deadline = since + LEADERS_REPORT_WITHIN;
    loop {
        // The groups this node holds, per its definitions (plus the
        // metadata group); they open while the definitions replay.
        let expected = 1 + {
            let meta = node.meta();
            meta.vhosts()
                .map(|v| {
                    meta.queues(v)
                        .filter(|q| q.placement.replicas.contains(&node.node_id()))
                        .count()
                })
                .sum::<usize>()
        };
        let groups = node.raft.status();
        let led = groups.iter().filter(|g| g.leader.is_some()).count();
        let done = led == groups.len() && groups.len() >= expected;
        if done || std::time::Instant::now() >= deadline {
            let secs = since.elapsed().as_secs_f64();
            if done {
                tracing::info!(
                    "leaders known for {led}/{} groups {secs:.1} s after start",
                    groups.len()
                );
            } else {
                tracing::warn!(
                    "leaders known for only {led}/{} groups {secs:.0} s after start",
                    groups.len()
                );
            }
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// The message with RabbitMQ's `x-death` header updated: the entry for this
/// queue and reason has its count raised, or a new one goes first; and the
/// `x-first-death-*` / `x-last-death-*` headers are set.
pub fn add_x_death(msg: &Message, queue: &str, reason: DeadLetterReason, now_ms: u64) -> Message {
    let mut props = msg.properties();
    let mut headers = props.headers().clone().unwrap_or_default();
    let mut deaths: Vec<AMQPValue> = match headers.inner().get("x-death") {
        Some(AMQPValue::FieldArray(a)) => a.as_slice().to_vec(),
        _ => Vec::new(),
    };
    let ls = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()));
    let mut found = None;
    for (i, d) in deaths.iter().enumerate() {
        if let AMQPValue::FieldTable(t) = d {
            let q = t.inner().get("queue").and_then(crate::message::value_str);
            let r = t.inner().get("reason").and_then(crate::message::value_str);
            if q.as_deref() == Some(queue) && r.as_deref() == Some(reason.as_str()) {
                found = Some(i);
            }
        }
    }
    let entry = match found {
        Some(i) => {
            let mut t = match deaths.remove(i) {
                AMQPValue::FieldTable(t) => t,
                _ => FieldTable::default(),
            };
            let count = crate::message::table_int(&t, "count").unwrap_or(0) + 1;
            t.insert(ShortString::from("count"), AMQPValue::LongLongInt(count));
            t.insert(
                ShortString::from("time"),
                AMQPValue::Timestamp(now_ms / 1000),
            );
            t
        }
        None => {
            let mut t = FieldTable::default();
            t.insert(ShortString::from("count"), AMQPValue::LongLongInt(1));
            t.insert(ShortString::from("reason"), ls(reason.as_str()));
            t.insert(ShortString::from("queue"), ls(queue));
            t.insert(
                ShortString::from("time"),
                AMQPValue::Timestamp(now_ms / 1000),
            );
            t.insert(ShortString::from("exchange"), ls(&msg.exchange));
            t.insert(
                ShortString::from("routing-keys"),
                AMQPValue::FieldArray(FieldArray::from(vec![ls(&msg.routing_key)])),
            );
            if let Some(exp) = props.expiration() {
                t.insert(ShortString::from("original-expiration"), ls(exp.as_str()));
            }
            t
        }
    };
    deaths.insert(0, AMQPValue::FieldTable(entry));
    if !headers.contains_key("x-first-death-reason") {
        headers.insert(
            ShortString::from("x-first-death-reason"),
            ls(reason.as_str()),
        );
        headers.insert(ShortString::from("x-first-death-queue"), ls(queue));
        headers.insert(
            ShortString::from("x-first-death-exchange"),
            ls(&msg.exchange),
        );
    }
    headers.insert(
        ShortString::from("x-last-death-reason"),
        ls(reason.as_str()),
    );
    headers.insert(ShortString::from("x-last-death-queue"), ls(queue));
    headers.insert(
        ShortString::from("x-last-death-exchange"),
        ls(&msg.exchange),
    );
    headers.insert(
        ShortString::from("x-death"),
        AMQPValue::FieldArray(FieldArray::from(deaths)),
    );
    // A dead-lettered message's per-message TTL is removed so that it does
    // not expire again in the dead-letter queue (RabbitMQ does the same).
    props = props.with_headers(headers);
    let mut cleared = amq_protocol::protocol::BasicProperties::default();
    if let Some(v) = props.content_type() {
        cleared = cleared.with_content_type(v.clone());
    }
    if let Some(v) = props.content_encoding() {
        cleared = cleared.with_content_encoding(v.clone());
    }
    if let Some(v) = props.headers() {
        cleared = cleared.with_headers(v.clone());
    }
    if let Some(v) = props.delivery_mode() {
        cleared = cleared.with_delivery_mode(*v);
    }
    if let Some(v) = props.priority() {
        cleared = cleared.with_priority(*v);
    }
    if let Some(v) = props.correlation_id() {
        cleared = cleared.with_correlation_id(v.clone());
    }
    if let Some(v) = props.reply_to() {
        cleared = cleared.with_reply_to(v.clone());
    }
    if let Some(v) = props.message_id() {
        cleared = cleared.with_message_id(v.clone());
    }
    if let Some(v) = props.timestamp() {
        cleared = cleared.with_timestamp(*v);
    }
    if let Some(v) = props.kind() {
        cleared = cleared.with_type(v.clone());
    }
    if let Some(v) = props.user_id() {
        cleared = cleared.with_user_id(v.clone());
    }
    if let Some(v) = props.app_id() {
        cleared = cleared.with_app_id(v.clone());
    }
    if let Some(v) = props.cluster_id() {
        cleared = cleared.with_cluster_id(v.clone());
    }
    let mut out = msg.with_properties(&cleared);
    out.expiration_ms = None;
    out
}
