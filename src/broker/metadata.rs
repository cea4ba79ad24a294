//! The metadata state machine: every vhost's exchanges, queues and bindings.
//!
//! Commands are plain data and `apply` is deterministic, so in a cluster the
//! metadata Raft group replicates the commands and every node applies them
//! into the same [`Metadata`]. Routing reads it under a shared lock.
//!
//! The rules (names, equivalence of redeclares, exclusivity, auto-delete) and
//! the reply texts follow RabbitMQ, so clients see the errors they expect.
//! Definitions live in `BTreeMap`s: listings come out in name order, the same
//! on every node.

use crate::broker::error::BrokerError;
use crate::broker::headers::{XMatch, display_value, string_bytes, type_name, values_equal};
use crate::broker::routing::{self, ALTERNATE_EXCHANGE, BindingIndex, Topology, same_arguments};
use amq_protocol::types::{AMQPValue, FieldTable, LongString};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// Unique connection id (the node id in the high bits), naming the owner of
/// exclusive queues.
pub type ConnId = u64;

/// The vhost every broker starts with.
pub const DEFAULT_VHOST: &str = "/";

/// Prefix of server-generated queue names; the only `amq.` queue names a
/// declare may create.
pub const SERVER_NAMED_PREFIX: &str = "amq.gen-";

/// Names starting with this are reserved for the broker.
const RESERVED_PREFIX: &str = "amq.";

/// The exchanges every vhost is created with: (name, kind, internal).
const PREDECLARED: [(&str, ExchangeKind, bool); 7] = [
    ("", ExchangeKind::Direct, false),
    ("amq.direct", ExchangeKind::Direct, false),
    ("amq.fanout", ExchangeKind::Fanout, false),
    ("amq.topic", ExchangeKind::Topic, false),
    ("amq.headers", ExchangeKind::Headers, false),
    ("amq.match", ExchangeKind::Headers, false),
    ("amq.rabbitmq.trace", ExchangeKind::Topic, true),
];

/// Queue arguments a redeclare must repeat with an equal value, as RabbitMQ
/// checks them.
const QUEUE_EQUIVALENCE_ARGS: [&str; 12] = [
    "x-queue-type",
    "x-message-ttl",
    "x-expires",
    "x-max-length",
    "x-max-length-bytes",
    "x-overflow",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-dead-letter-strategy",
    "x-max-priority",
    "x-single-active-consumer",
    "x-delivery-limit",
];

/// A queue declared without `x-queue-type` is a classic queue, and a redeclare
/// naming "classic" is equivalent to it.
const DEFAULT_QUEUE_TYPE: &str = "classic";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExchangeKind {
    Direct,
    Fanout,
    Topic,
    Headers,
}

impl ExchangeKind {
    /// The kind named in `exchange.declare`; None for kinds Warren lacks.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "direct" => ExchangeKind::Direct,
            "fanout" => ExchangeKind::Fanout,
            "topic" => ExchangeKind::Topic,
            "headers" => ExchangeKind::Headers,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeKind::Direct => "direct",
            ExchangeKind::Fanout => "fanout",
            ExchangeKind::Topic => "topic",
            ExchangeKind::Headers => "headers",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExchangeDef {
    pub name: String,
    pub kind: ExchangeKind,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: FieldTable,
}

impl ExchangeDef {
    /// A durable, non-auto-delete, non-internal exchange without arguments
    /// (what most declares ask for).
    pub fn new(name: impl Into<String>, kind: ExchangeKind) -> Self {
        ExchangeDef {
            name: name.into(),
            kind,
            durable: true,
            auto_delete: false,
            internal: false,
            arguments: FieldTable::default(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QueueDef {
    pub name: String,
    pub durable: bool,
    /// The connection an exclusive queue belongs to; None when not exclusive.
    pub exclusive_owner: Option<ConnId>,
    pub auto_delete: bool,
    pub arguments: FieldTable,
    /// Where the queue lives in the cluster; chosen by the node that
    /// proposes the declare, kept from the first declare on redeclares.
    #[serde(default)]
    pub placement: Placement,
}

/// Where a queue lives. A replicated (durable) queue is a Raft group on
/// `replicas`, the first of which is asked to lead it first; a node-local
/// queue (exclusive, auto-delete or non-durable) lives on `home`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// The queue's Raft group; None for a node-local queue.
    pub group: Option<u64>,
    pub replicas: Vec<u64>,
    /// The node a node-local queue lives on.
    pub home: u64,
}

impl QueueDef {
    /// Whether the queue is replicated with Raft: every durable queue that
    /// is neither exclusive nor auto-delete.
    pub fn is_replicated(&self) -> bool {
        self.durable && self.exclusive_owner.is_none() && !self.auto_delete
    }

    /// A durable, shared, non-auto-delete queue without arguments.
    pub fn new(name: impl Into<String>) -> Self {
        QueueDef {
            name: name.into(),
            durable: true,
            exclusive_owner: None,
            placement: Default::default(),
            auto_delete: false,
            arguments: FieldTable::default(),
        }
    }
}

/// Where a binding leads: a queue, or another exchange (exchange-to-exchange).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Destination {
    Queue(String),
    Exchange(String),
}

impl Destination {
    pub fn name(&self) -> &str {
        match self {
            Destination::Queue(n) | Destination::Exchange(n) => n,
        }
    }
}

/// A binding. Its identity is all four fields: two bindings differing only
/// in their arguments are two bindings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BindingDef {
    pub source: String,
    pub destination: Destination,
    pub routing_key: String,
    pub arguments: FieldTable,
}

impl BindingDef {
    /// A binding without arguments.
    pub fn new(
        source: impl Into<String>,
        destination: Destination,
        routing_key: impl Into<String>,
    ) -> Self {
        BindingDef {
            source: source.into(),
            destination,
            routing_key: routing_key.into(),
            arguments: FieldTable::default(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum MetaCommand {
    /// Creates a vhost with the predeclared exchanges; an existing one is kept.
    AddVhost {
        name: String,
    },
    DeclareExchange {
        vhost: String,
        def: ExchangeDef,
    },
    DeleteExchange {
        vhost: String,
        name: String,
        if_unused: bool,
    },
    DeclareQueue {
        vhost: String,
        def: QueueDef,
    },
    DeleteQueue {
        vhost: String,
        name: String,
    },
    Bind {
        vhost: String,
        binding: BindingDef,
    },
    Unbind {
        vhost: String,
        binding: BindingDef,
    },
    /// The connection closed: its exclusive queues are deleted.
    ConnectionClosed {
        conn: ConnId,
    },
    /// Changes nothing. A node that proposes it and waits until it has
    /// applied it has applied everything committed before: a read of its
    /// definitions afterwards sees what a client declared through any node.
    Barrier,
}

#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
pub struct MetaOutcome {
    /// `DeclareQueue`/`DeclareExchange`/`AddVhost`/`Bind`: false when it
    /// already existed (an equivalent redeclare or a duplicate binding).
    pub created: bool,
    /// Queues removed by this command (deleted directly, exclusive ones of a
    /// closed connection); the shell stops them and cancels their consumers.
    pub deleted_queues: Vec<String>,
    /// Exchanges removed (directly, or auto-deleted when they lost their last binding).
    pub deleted_exchanges: Vec<String>,
}

/// An exchange with its bindings as source.
#[derive(Clone, Debug)]
struct Exchange {
    def: ExchangeDef,
    /// The bindings, by (destination, routing key); the vector holds the
    /// distinct argument tables bound with that pair.
    bindings: BTreeMap<(Destination, String), Vec<FieldTable>>,
    /// The same bindings, shaped for routing.
    index: BindingIndex,
}

impl Exchange {
    fn new(def: ExchangeDef) -> Self {
        let index = BindingIndex::new(def.kind);
        Exchange {
            def,
            bindings: BTreeMap::new(),
            index,
        }
    }
}

#[derive(Clone, Debug)]
struct Queue {
    def: QueueDef,
    /// The name shared with every routing result, so routing does not
    /// allocate a string per reached queue.
    name: Arc<str>,
}

#[derive(Clone, Debug)]
struct Vhost {
    name: String,
    exchanges: BTreeMap<String, Exchange>,
    queues: BTreeMap<String, Queue>,
    /// For each destination, the (source, routing key) pairs bound to it:
    /// deleting a queue or exchange finds its bindings without a full scan.
    inbound: BTreeMap<Destination, BTreeSet<(String, String)>>,
    /// Exclusive queues by owning connection, for `ConnectionClosed`.
    exclusive: BTreeMap<ConnId, BTreeSet<String>>,
}

/// Every vhost's definitions and binding indexes.
#[derive(Clone, Debug)]
pub struct Metadata {
    vhosts: BTreeMap<String, Vhost>,
}

impl Default for Metadata {
    fn default() -> Self {
        Self::new()
    }
}

impl Metadata {
    /// One vhost "/" with the predeclared exchanges.
    pub fn new() -> Self {
        let mut vhosts = BTreeMap::new();
        vhosts.insert(DEFAULT_VHOST.to_owned(), Vhost::new(DEFAULT_VHOST));
        Metadata { vhosts }
    }

    /// Applies one command. A refused command changes nothing.
    pub fn apply(&mut self, cmd: MetaCommand) -> Result<MetaOutcome, BrokerError> {
        let mut out = MetaOutcome::default();
        match cmd {
            MetaCommand::Barrier => {}
            MetaCommand::AddVhost { name } => {
                out.created = !self.vhosts.contains_key(&name);
                if out.created {
                    let vhost = Vhost::new(&name);
                    self.vhosts.insert(name, vhost);
                }
            }
            MetaCommand::DeclareExchange { vhost, def } => {
                out.created = self.vhost_mut(&vhost)?.declare_exchange(def)?;
            }
            MetaCommand::DeleteExchange {
                vhost,
                name,
                if_unused,
            } => {
                self.vhost_mut(&vhost)?
                    .delete_exchange(&name, if_unused, &mut out)?;
            }
            MetaCommand::DeclareQueue { vhost, def } => {
                out.created = self.vhost_mut(&vhost)?.declare_queue(def)?;
            }
            MetaCommand::DeleteQueue { vhost, name } => {
                let v = self.vhost_mut(&vhost)?;
                if !v.queues.contains_key(&name) {
                    return Err(no_queue(&name, &vhost));
                }
                v.remove_queue(&name, &mut out);
            }
            MetaCommand::Bind { vhost, binding } => {
                out.created = self.vhost_mut(&vhost)?.bind(binding)?;
            }
            MetaCommand::Unbind { vhost, binding } => {
                self.vhost_mut(&vhost)?.unbind(&binding, &mut out)?;
            }
            MetaCommand::ConnectionClosed { conn } => {
                for v in self.vhosts.values_mut() {
                    v.connection_closed(conn, &mut out);
                }
            }
        }
        Ok(out)
    }

    pub fn exchange(&self, vhost: &str, name: &str) -> Option<&ExchangeDef> {
        Some(&self.vhosts.get(vhost)?.exchanges.get(name)?.def)
    }

    pub fn queue(&self, vhost: &str, name: &str) -> Option<&QueueDef> {
        Some(&self.vhosts.get(vhost)?.queues.get(name)?.def)
    }

    /// The vhost names, in order.
    pub fn vhosts(&self) -> impl Iterator<Item = &str> {
        self.vhosts.keys().map(String::as_str)
    }

    pub fn has_vhost(&self, vhost: &str) -> bool {
        self.vhosts.contains_key(vhost)
    }

    /// A vhost's exchanges in name order (the default exchange "" first);
    /// empty for an unknown vhost.
    pub fn exchanges(&self, vhost: &str) -> impl Iterator<Item = &ExchangeDef> {
        self.vhosts
            .get(vhost)
            .into_iter()
            .flat_map(|v| v.exchanges.values().map(|x| &x.def))
    }

    /// A vhost's queues in name order; empty for an unknown vhost.
    pub fn queues(&self, vhost: &str) -> impl Iterator<Item = &QueueDef> {
        self.vhosts
            .get(vhost)
            .into_iter()
            .flat_map(|v| v.queues.values().map(|q| &q.def))
    }

    /// A vhost's bindings as RabbitMQ's management API lists them: first the
    /// implicit binding of every queue to the default exchange, then the
    /// declared bindings by source, destination and routing key.
    pub fn bindings(&self, vhost: &str) -> Vec<BindingDef> {
        let Some(v) = self.vhosts.get(vhost) else {
            return Vec::new();
        };
        let implicit = v
            .queues
            .keys()
            .map(|q| BindingDef::new("", Destination::Queue(q.clone()), q.clone()));
        let declared = v.exchanges.iter().flat_map(|(source, x)| {
            x.bindings.iter().flat_map(move |((dest, rk), args)| {
                args.iter().map(move |a| BindingDef {
                    source: source.clone(),
                    destination: dest.clone(),
                    routing_key: rk.clone(),
                    arguments: a.clone(),
                })
            })
        });
        implicit.chain(declared).collect()
    }

    /// The queue as a connection may use it: 404 if absent, 405 if exclusive
    /// to another connection.
    pub fn check_queue_access(
        &self,
        vhost: &str,
        name: &str,
        conn: ConnId,
    ) -> Result<&QueueDef, BrokerError> {
        let q = self
            .vhost(vhost)?
            .queues
            .get(name)
            .ok_or_else(|| no_queue(name, vhost))?;
        match q.def.exclusive_owner {
            Some(owner) if owner != conn => Err(queue_locked(name, vhost)),
            _ => Ok(&q.def),
        }
    }

    /// The check of an `exchange.declare` with passive=true: 404 if absent.
    pub fn check_exchange_passive(
        &self,
        vhost: &str,
        name: &str,
    ) -> Result<&ExchangeDef, BrokerError> {
        let v = self.vhost(vhost)?;
        v.exchanges
            .get(name)
            .map(|x| &x.def)
            .ok_or_else(|| no_exchange(name, vhost))
    }

    /// Route a publish: appends the reached queue names to `out`, sorted and
    /// each once. 404 if the exchange does not exist; does not check
    /// `internal` (the channel does, for the exchange published to only).
    ///
    /// `raw_properties` is `Message::raw_properties`; the headers are decoded
    /// from it only when a headers exchange with bindings is on the route.
    pub fn route(
        &self,
        vhost: &str,
        exchange: &str,
        routing_key: &str,
        raw_properties: &[u8],
        out: &mut Vec<Arc<str>>,
    ) -> Result<(), BrokerError> {
        let v = self.vhost(vhost)?;
        if !v.exchanges.contains_key(exchange) {
            return Err(no_exchange(exchange, vhost));
        }
        routing::route(v, exchange, routing_key, raw_properties, out);
        Ok(())
    }

    /// Commands that rebuild these definitions when applied, in order, to
    /// `Metadata::new()`: a snapshot for a node that joins the metadata group.
    /// The exclusive queues of a connection, as (vhost, name).
    pub fn exclusive_queues_of(&self, conn: ConnId) -> Vec<(String, String)> {
        self.vhosts
            .iter()
            .flat_map(|(vn, v)| {
                v.exclusive
                    .get(&conn)
                    .into_iter()
                    .flatten()
                    .map(move |q| (vn.clone(), q.clone()))
            })
            .collect()
    }

    pub fn has_exclusive_queues(&self, conn: ConnId) -> bool {
        self.vhosts
            .values()
            .any(|v| v.exclusive.get(&conn).is_some_and(|s| !s.is_empty()))
    }

    pub fn to_commands(&self) -> Vec<MetaCommand> {
        let mut cmds = Vec::new();
        for (name, v) in &self.vhosts {
            cmds.push(MetaCommand::AddVhost { name: name.clone() });
            for x in v.exchanges.values().filter(|x| !x.def.name.is_empty()) {
                cmds.push(MetaCommand::DeclareExchange {
                    vhost: name.clone(),
                    def: x.def.clone(),
                });
            }
            for q in v.queues.values() {
                cmds.push(MetaCommand::DeclareQueue {
                    vhost: name.clone(),
                    def: q.def.clone(),
                });
            }
            for b in self
                .bindings(name)
                .into_iter()
                .filter(|b| !b.source.is_empty())
            {
                cmds.push(MetaCommand::Bind {
                    vhost: name.clone(),
                    binding: b,
                });
            }
        }
        cmds
    }

    fn vhost(&self, name: &str) -> Result<&Vhost, BrokerError> {
        self.vhosts.get(name).ok_or_else(|| no_vhost(name))
    }

    fn vhost_mut(&mut self, name: &str) -> Result<&mut Vhost, BrokerError> {
        self.vhosts.get_mut(name).ok_or_else(|| no_vhost(name))
    }
}

impl Vhost {
    fn new(name: &str) -> Self {
        let exchanges = PREDECLARED
            .iter()
            .map(|&(x, kind, internal)| {
                let def = ExchangeDef {
                    internal,
                    ..ExchangeDef::new(x, kind)
                };
                (x.to_owned(), Exchange::new(def))
            })
            .collect();
        Vhost {
            name: name.to_owned(),
            exchanges,
            queues: BTreeMap::new(),
            inbound: BTreeMap::new(),
            exclusive: BTreeMap::new(),
        }
    }

    /// Returns whether the exchange was created (false: equivalent redeclare).
    fn declare_exchange(&mut self, def: ExchangeDef) -> Result<bool, BrokerError> {
        if def.name.is_empty() {
            return Err(default_exchange_refused());
        }
        if let Some(x) = self.exchanges.get(&def.name) {
            assert_exchange_equivalent(&x.def, &def, &self.name)?;
            return Ok(false);
        }
        if def.name.starts_with(RESERVED_PREFIX) {
            return Err(BrokerError::access_refused(format!(
                "exchange name '{}' contains reserved prefix 'amq.*'",
                def.name
            )));
        }
        self.exchanges.insert(def.name.clone(), Exchange::new(def));
        Ok(true)
    }

    fn delete_exchange(
        &mut self,
        name: &str,
        if_unused: bool,
        out: &mut MetaOutcome,
    ) -> Result<(), BrokerError> {
        if name.is_empty() {
            return Err(default_exchange_refused());
        }
        if name.starts_with(RESERVED_PREFIX) {
            return Err(BrokerError::access_refused(format!(
                "deletion of system exchange '{name}' in vhost '{}' not allowed",
                self.name
            )));
        }
        let x = self
            .exchanges
            .get(name)
            .ok_or_else(|| no_exchange(name, &self.name))?;
        if if_unused && !x.bindings.is_empty() {
            return Err(BrokerError::precondition_failed(format!(
                "exchange '{name}' in vhost '{}' in use",
                self.name
            )));
        }
        self.remove_exchanges(name.to_owned(), out);
        Ok(())
    }

    /// Returns whether the queue was created (false: equivalent redeclare).
    fn declare_queue(&mut self, def: QueueDef) -> Result<bool, BrokerError> {
        if def.name.is_empty() {
            // The channel names server-named queues before declaring them.
            return Err(BrokerError::command_invalid("queue name must not be empty"));
        }
        if let Some(q) = self.queues.get(&def.name) {
            assert_queue_equivalent(&q.def, &def, &self.name)?;
            return Ok(false);
        }
        if def.name.starts_with(RESERVED_PREFIX) && !def.name.starts_with(SERVER_NAMED_PREFIX) {
            return Err(BrokerError::access_refused(format!(
                "queue name '{}' contains reserved prefix 'amq.*'",
                def.name
            )));
        }
        if let Some(owner) = def.exclusive_owner {
            self.exclusive
                .entry(owner)
                .or_default()
                .insert(def.name.clone());
        }
        let queue = Queue {
            name: Arc::from(def.name.as_str()),
            def,
        };
        self.queues.insert(queue.def.name.clone(), queue);
        Ok(true)
    }

    /// Checks that both ends of a binding exist and that neither is the
    /// default exchange, whose bindings are implicit.
    fn check_binding_ends(&self, b: &BindingDef) -> Result<(), BrokerError> {
        if b.source.is_empty() || b.destination == Destination::Exchange(String::new()) {
            return Err(default_exchange_refused());
        }
        if !self.exchanges.contains_key(&b.source) {
            return Err(no_exchange(&b.source, &self.name));
        }
        match &b.destination {
            Destination::Queue(q) if !self.queues.contains_key(q) => Err(no_queue(q, &self.name)),
            Destination::Exchange(x) if !self.exchanges.contains_key(x) => {
                Err(no_exchange(x, &self.name))
            }
            _ => Ok(()),
        }
    }

    /// Returns whether the binding is new (false: it already existed).
    fn bind(&mut self, b: BindingDef) -> Result<bool, BrokerError> {
        self.check_binding_ends(&b)?;
        let Some(x) = self.exchanges.get_mut(&b.source) else {
            return Err(no_exchange(&b.source, &self.name));
        };
        if x.def.kind == ExchangeKind::Headers {
            XMatch::from_arguments(&b.arguments)?;
        }
        let args = x
            .bindings
            .entry((b.destination.clone(), b.routing_key.clone()))
            .or_default();
        if args.iter().any(|a| same_arguments(a, &b.arguments)) {
            return Ok(false);
        }
        x.index.add(&b.routing_key, &b.arguments, &b.destination);
        args.push(b.arguments);
        self.inbound
            .entry(b.destination)
            .or_default()
            .insert((b.source, b.routing_key));
        Ok(true)
    }

    /// Removes a binding if it exists (unbinding a missing binding succeeds,
    /// as in RabbitMQ), then auto-deletes the source if it was the last.
    fn unbind(&mut self, b: &BindingDef, out: &mut MetaOutcome) -> Result<(), BrokerError> {
        self.check_binding_ends(b)?;
        let Some(x) = self.exchanges.get_mut(&b.source) else {
            return Err(no_exchange(&b.source, &self.name));
        };
        let key = (b.destination.clone(), b.routing_key.clone());
        let Some(args) = x.bindings.get_mut(&key) else {
            return Ok(());
        };
        let Some(i) = args.iter().position(|a| same_arguments(a, &b.arguments)) else {
            return Ok(());
        };
        args.remove(i);
        x.index.remove(&b.routing_key, &b.arguments, &b.destination);
        if args.is_empty() {
            x.bindings.remove(&key);
            self.inbound_remove(&b.destination, &b.source, &b.routing_key);
        }
        if self.should_auto_delete(&b.source) {
            self.remove_exchanges(b.source.clone(), out);
        }
        Ok(())
    }

    fn connection_closed(&mut self, conn: ConnId, out: &mut MetaOutcome) {
        for name in self.exclusive.remove(&conn).unwrap_or_default() {
            self.remove_queue(&name, out);
        }
    }

    /// Removes a queue and its bindings, then auto-deletes the exchanges that
    /// lost their last binding.
    fn remove_queue(&mut self, name: &str, out: &mut MetaOutcome) {
        let Some(q) = self.queues.remove(name) else {
            return;
        };
        if let Some(owner) = q.def.exclusive_owner {
            if let Some(names) = self.exclusive.get_mut(&owner) {
                names.remove(name);
                if names.is_empty() {
                    self.exclusive.remove(&owner);
                }
            }
        }
        out.deleted_queues.push(q.def.name);
        for source in self.unbind_all_to(&Destination::Queue(name.to_owned())) {
            if self.should_auto_delete(&source) {
                self.remove_exchanges(source, out);
            }
        }
    }

    /// Removes an exchange and every binding it is part of, then, in turn,
    /// the auto-delete exchanges that lost their last binding because of it.
    /// A worklist rather than recursion: chains of exchanges can be long.
    fn remove_exchanges(&mut self, first: String, out: &mut MetaOutcome) {
        let mut pending = vec![first];
        while let Some(name) = pending.pop() {
            debug_assert!(!name.is_empty(), "the default exchange is never removed");
            let Some(x) = self.exchanges.remove(&name) else {
                continue;
            };
            for (dest, rk) in x.bindings.keys() {
                self.inbound_remove(dest, &name, rk);
            }
            let sources = self.unbind_all_to(&Destination::Exchange(name.clone()));
            out.deleted_exchanges.push(name);
            pending.extend(sources.into_iter().filter(|s| self.should_auto_delete(s)));
        }
    }

    /// Removes every binding leading to `dest`; returns the sources that lost
    /// one, in order and each once.
    fn unbind_all_to(&mut self, dest: &Destination) -> Vec<String> {
        let Some(pairs) = self.inbound.remove(dest) else {
            return Vec::new();
        };
        let mut sources: Vec<String> = Vec::new();
        for (source, rk) in pairs {
            let Some(x) = self.exchanges.get_mut(&source) else {
                continue;
            };
            for args in x
                .bindings
                .remove(&(dest.clone(), rk.clone()))
                .unwrap_or_default()
            {
                x.index.remove(&rk, &args, dest);
            }
            if sources.last() != Some(&source) {
                sources.push(source);
            }
        }
        sources
    }

    fn inbound_remove(&mut self, dest: &Destination, source: &str, routing_key: &str) {
        if let Some(pairs) = self.inbound.get_mut(dest) {
            pairs.remove(&(source.to_owned(), routing_key.to_owned()));
            if pairs.is_empty() {
                self.inbound.remove(dest);
            }
        }
    }

    /// An auto-delete exchange goes when its last binding as source goes.
    fn should_auto_delete(&self, name: &str) -> bool {
        !name.is_empty()
            && self
                .exchanges
                .get(name)
                .is_some_and(|x| x.def.auto_delete && x.bindings.is_empty())
    }
}

#[cfg(test)]
impl Vhost {
    /// Panics if the secondary indexes disagree with the bindings and queues.
    fn check_invariants(&self) {
        let mut expected_inbound: BTreeMap<Destination, BTreeSet<(String, String)>> =
            BTreeMap::new();
        for (source, x) in &self.exchanges {
            for ((dest, rk), args) in &x.bindings {
                assert!(
                    !args.is_empty(),
                    "empty argument list kept for {source} -> {dest:?}"
                );
                let exists = match dest {
                    Destination::Queue(q) => self.queues.contains_key(q),
                    Destination::Exchange(e) => self.exchanges.contains_key(e),
                };
                assert!(
                    exists,
                    "binding {source} -> {dest:?} outlived its destination"
                );
                expected_inbound
                    .entry(dest.clone())
                    .or_default()
                    .insert((source.clone(), rk.clone()));
            }
        }
        assert_eq!(self.inbound, expected_inbound);
        let mut expected_exclusive: BTreeMap<ConnId, BTreeSet<String>> = BTreeMap::new();
        for (name, q) in &self.queues {
            assert_eq!(&*q.name, name.as_str());
            if let Some(owner) = q.def.exclusive_owner {
                expected_exclusive
                    .entry(owner)
                    .or_default()
                    .insert(name.clone());
            }
        }
        assert_eq!(self.exclusive, expected_exclusive);
        for (name, _, _) in PREDECLARED {
            assert!(
                self.exchanges.contains_key(name),
                "predeclared {name} removed"
            );
        }
    }
}

impl Topology for Vhost {
    fn exchange(&self, name: &str) -> Option<(&ExchangeDef, &BindingIndex)> {
        self.exchanges.get(name).map(|x| (&x.def, &x.index))
    }

    fn queue_name(&self, name: &str) -> Option<&Arc<str>> {
        self.queues.get(name).map(|q| &q.name)
    }
}

fn assert_exchange_equivalent(
    cur: &ExchangeDef,
    req: &ExchangeDef,
    vhost: &str,
) -> Result<(), BrokerError> {
    let rs = format!("exchange '{}' in vhost '{vhost}'", cur.name);
    field_equivalent("type", req.kind.as_str(), cur.kind.as_str(), &rs)?;
    field_equivalent("durable", req.durable, cur.durable, &rs)?;
    field_equivalent("auto_delete", req.auto_delete, cur.auto_delete, &rs)?;
    field_equivalent("internal", req.internal, cur.internal, &rs)?;
    args_equivalent(&cur.arguments, &req.arguments, &[ALTERNATE_EXCHANGE], &rs)
}

fn assert_queue_equivalent(cur: &QueueDef, req: &QueueDef, vhost: &str) -> Result<(), BrokerError> {
    // Exclusivity first, as RabbitMQ checks it: a mismatch, or a queue that
    // belongs to another connection, is "locked" (405), not inequivalent.
    if cur.exclusive_owner != req.exclusive_owner {
        return Err(queue_locked(&cur.name, vhost));
    }
    let rs = format!("queue '{}' in vhost '{vhost}'", cur.name);
    field_equivalent("durable", req.durable, cur.durable, &rs)?;
    field_equivalent("auto_delete", req.auto_delete, cur.auto_delete, &rs)?;
    args_equivalent(&cur.arguments, &req.arguments, &QUEUE_EQUIVALENCE_ARGS, &rs)
}

fn field_equivalent<T: PartialEq + std::fmt::Display>(
    key: &str,
    received: T,
    current: T,
    rs: &str,
) -> Result<(), BrokerError> {
    if received == current {
        return Ok(());
    }
    Err(BrokerError::precondition_failed(format!(
        "inequivalent arg '{key}' for {rs}: received '{received}' but current is '{current}'"
    )))
}

/// Compares the listed arguments of a redeclare with the current ones: both
/// absent, or values of the same type class (any integer width counts as
/// one class) that are equal.
fn args_equivalent(
    cur: &FieldTable,
    req: &FieldTable,
    keys: &[&str],
    rs: &str,
) -> Result<(), BrokerError> {
    let classic = AMQPValue::LongString(LongString::from(DEFAULT_QUEUE_TYPE));
    for &key in keys {
        let default = (key == "x-queue-type").then_some(&classic);
        let c = cur.inner().get(key).or(default);
        let r = req.inner().get(key).or(default);
        let same = match (c, r) {
            (None, None) => true,
            (Some(c), Some(r)) => type_class(c) == type_class(r) && values_equal(c, r),
            _ => false,
        };
        if !same {
            return Err(BrokerError::precondition_failed(format!(
                "inequivalent arg '{key}' for {rs}: received {} but current is {}",
                describe_arg(r),
                describe_arg(c)
            )));
        }
    }
    Ok(())
}

/// RabbitMQ's type classes for argument equivalence.
fn type_class(v: &AMQPValue) -> &'static str {
    match v {
        AMQPValue::ShortShortInt(_)
        | AMQPValue::ShortShortUInt(_)
        | AMQPValue::ShortInt(_)
        | AMQPValue::ShortUInt(_)
        | AMQPValue::LongInt(_)
        | AMQPValue::LongUInt(_)
        | AMQPValue::LongLongInt(_) => "int",
        AMQPValue::Float(_) | AMQPValue::Double(_) => "float",
        // Clients differ in which string type they send; both are text.
        v if string_bytes(v).is_some() => "string",
        v => type_name(v),
    }
}

fn describe_arg(v: Option<&AMQPValue>) -> String {
    match v {
        None => "none".to_owned(),
        Some(v) => format!(
            "the value '{}' of type '{}'",
            display_value(v),
            type_name(v)
        ),
    }
}

fn no_vhost(name: &str) -> BrokerError {
    BrokerError::not_found(format!("vhost '{name}' not found"))
}

fn no_exchange(name: &str, vhost: &str) -> BrokerError {
    BrokerError::not_found(format!("no exchange '{name}' in vhost '{vhost}'"))
}

fn no_queue(name: &str, vhost: &str) -> BrokerError {
    BrokerError::not_found(format!("no queue '{name}' in vhost '{vhost}'"))
}

fn queue_locked(name: &str, vhost: &str) -> BrokerError {
    BrokerError::resource_locked(format!(
        "cannot obtain exclusive access to locked queue '{name}' in vhost '{vhost}'. It could be \
         originally declared on another connection or the exclusive property value does not \
         match that of the original declaration."
    ))
}

fn default_exchange_refused() -> BrokerError {
    BrokerError::access_refused("operation not permitted on the default exchange")
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::types::ShortString;

    const V: &str = "/";

    fn declare_exchange(m: &mut Metadata, def: ExchangeDef) -> Result<MetaOutcome, BrokerError> {
        m.apply(MetaCommand::DeclareExchange {
            vhost: V.into(),
            def,
        })
    }

    fn declare_queue(m: &mut Metadata, def: QueueDef) -> Result<MetaOutcome, BrokerError> {
        m.apply(MetaCommand::DeclareQueue {
            vhost: V.into(),
            def,
        })
    }

    fn bind(m: &mut Metadata, b: BindingDef) -> Result<MetaOutcome, BrokerError> {
        m.apply(MetaCommand::Bind {
            vhost: V.into(),
            binding: b,
        })
    }

    fn unbind(m: &mut Metadata, b: BindingDef) -> Result<MetaOutcome, BrokerError> {
        m.apply(MetaCommand::Unbind {
            vhost: V.into(),
            binding: b,
        })
    }

    fn delete_exchange(
        m: &mut Metadata,
        name: &str,
        if_unused: bool,
    ) -> Result<MetaOutcome, BrokerError> {
        m.apply(MetaCommand::DeleteExchange {
            vhost: V.into(),
            name: name.into(),
            if_unused,
        })
    }

    fn delete_queue(m: &mut Metadata, name: &str) -> Result<MetaOutcome, BrokerError> {
        m.apply(MetaCommand::DeleteQueue {
            vhost: V.into(),
            name: name.into(),
        })
    }

    fn q(name: &str) -> Destination {
        Destination::Queue(name.into())
    }

    fn x(name: &str) -> Destination {
        Destination::Exchange(name.into())
    }

    fn args(entries: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in entries {
            t.insert(ShortString::from(*k), v.clone());
        }
        t
    }

    fn text(s: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(s))
    }

    /// Metadata with queue `q1` and direct exchange `ex`.
    fn setup() -> Metadata {
        let mut m = Metadata::new();
        declare_queue(&mut m, QueueDef::new("q1")).unwrap();
        declare_exchange(&mut m, ExchangeDef::new("ex", ExchangeKind::Direct)).unwrap();
        m
    }

    fn declared_bindings(m: &Metadata) -> Vec<BindingDef> {
        m.bindings(V)
            .into_iter()
            .filter(|b| !b.source.is_empty())
            .collect()
    }

    #[test]
    fn new_has_the_predeclared_exchanges() {
        let m = Metadata::new();
        assert_eq!(m.vhosts().collect::<Vec<_>>(), vec!["/"]);
        let names: Vec<_> = m.exchanges(V).map(|x| x.name.as_str()).collect();
        assert_eq!(
            names,
            vec![
                "",
                "amq.direct",
                "amq.fanout",
                "amq.headers",
                "amq.match",
                "amq.rabbitmq.trace",
                "amq.topic"
            ]
        );
        assert!(m.exchanges(V).all(|x| x.durable && !x.auto_delete));
        assert_eq!(
            m.exchange(V, "amq.match").map(|x| x.kind),
            Some(ExchangeKind::Headers)
        );
        let trace = m.exchange(V, "amq.rabbitmq.trace").unwrap();
        assert!(trace.internal && trace.kind == ExchangeKind::Topic);
    }

    #[test]
    fn exchange_kind_parses_its_own_names() {
        for k in [
            ExchangeKind::Direct,
            ExchangeKind::Fanout,
            ExchangeKind::Topic,
            ExchangeKind::Headers,
        ] {
            assert_eq!(ExchangeKind::parse(k.as_str()), Some(k));
        }
        assert_eq!(ExchangeKind::parse("x-consistent-hash"), None);
    }

    #[test]
    fn add_vhost_creates_predeclared_exchanges_once() {
        let mut m = Metadata::new();
        let out = m
            .apply(MetaCommand::AddVhost { name: "v2".into() })
            .unwrap();
        assert!(out.created);
        assert!(m.exchange("v2", "amq.topic").is_some());
        let out = m
            .apply(MetaCommand::AddVhost { name: "v2".into() })
            .unwrap();
        assert!(!out.created);
    }

    #[test]
    fn unknown_vhost_is_404() {
        let mut m = Metadata::new();
        let err = m
            .apply(MetaCommand::DeclareQueue {
                vhost: "nope".into(),
                def: QueueDef::new("q"),
            })
            .unwrap_err();
        assert_eq!(err, BrokerError::not_found("vhost 'nope' not found"));
        assert_eq!(
            m.check_exchange_passive("nope", "amq.direct")
                .unwrap_err()
                .code,
            404
        );
        assert_eq!(
            m.route("nope", "", "q", &[], &mut Vec::new())
                .unwrap_err()
                .code,
            404
        );
        assert_eq!(m.queues("nope").count(), 0);
        assert!(m.bindings("nope").is_empty());
    }

    #[test]
    fn declare_exchange_then_equivalent_redeclare_is_not_created() {
        let mut m = Metadata::new();
        let def = ExchangeDef::new("logs", ExchangeKind::Fanout);
        assert!(declare_exchange(&mut m, def.clone()).unwrap().created);
        assert!(!declare_exchange(&mut m, def.clone()).unwrap().created);
        assert_eq!(m.exchange(V, "logs"), Some(&def));
    }

    #[test]
    fn exchange_with_reserved_prefix_is_refused() {
        let mut m = Metadata::new();
        let err =
            declare_exchange(&mut m, ExchangeDef::new("amq.x", ExchangeKind::Direct)).unwrap_err();
        assert_eq!(
            err,
            BrokerError::access_refused("exchange name 'amq.x' contains reserved prefix 'amq.*'")
        );
    }

    #[test]
    fn predeclared_exchange_can_be_redeclared_equivalently() {
        let mut m = Metadata::new();
        let out =
            declare_exchange(&mut m, ExchangeDef::new("amq.direct", ExchangeKind::Direct)).unwrap();
        assert!(!out.created);
        let err = declare_exchange(&mut m, ExchangeDef::new("amq.direct", ExchangeKind::Topic))
            .unwrap_err();
        assert_eq!(err.code, 406);
    }

    #[test]
    fn redeclare_exchange_with_another_type_is_406() {
        let mut m = setup();
        let err =
            declare_exchange(&mut m, ExchangeDef::new("ex", ExchangeKind::Fanout)).unwrap_err();
        assert_eq!(
            err,
            BrokerError::precondition_failed(
                "inequivalent arg 'type' for exchange 'ex' in vhost '/': received 'fanout' but current is 'direct'"
            )
        );
    }

    #[test]
    fn redeclare_exchange_with_other_flags_or_alternate_is_406() {
        let mut m = setup();
        let base = ExchangeDef::new("ex", ExchangeKind::Direct);
        let cases = [
            (
                "durable",
                ExchangeDef {
                    durable: false,
                    ..base.clone()
                },
            ),
            (
                "auto_delete",
                ExchangeDef {
                    auto_delete: true,
                    ..base.clone()
                },
            ),
            (
                "internal",
                ExchangeDef {
                    internal: true,
                    ..base.clone()
                },
            ),
            (
                "alternate-exchange",
                ExchangeDef {
                    arguments: args(&[("alternate-exchange", text("ae"))]),
                    ..base.clone()
                },
            ),
        ];
        for (field, def) in cases {
            let err = declare_exchange(&mut m, def).unwrap_err();
            assert_eq!(err.code, 406, "{field}");
            assert!(
                err.text.contains(&format!("inequivalent arg '{field}'")),
                "{}",
                err.text
            );
        }
        // Arguments other than alternate-exchange are not compared.
        let other = ExchangeDef {
            arguments: args(&[("x-foo", text("1"))]),
            ..base
        };
        assert!(!declare_exchange(&mut m, other).unwrap().created);
    }

    #[test]
    fn default_exchange_cannot_be_declared_deleted_or_bound() {
        let mut m = setup();
        let refused =
            BrokerError::access_refused("operation not permitted on the default exchange");
        assert_eq!(
            declare_exchange(&mut m, ExchangeDef::new("", ExchangeKind::Direct)).unwrap_err(),
            refused
        );
        assert_eq!(delete_exchange(&mut m, "", false).unwrap_err(), refused);
        assert_eq!(
            bind(&mut m, BindingDef::new("", q("q1"), "k")).unwrap_err(),
            refused
        );
        assert_eq!(
            bind(&mut m, BindingDef::new("ex", x(""), "k")).unwrap_err(),
            refused
        );
        assert_eq!(
            unbind(&mut m, BindingDef::new("", q("q1"), "q1")).unwrap_err(),
            refused
        );
    }

    #[test]
    fn passive_declare_of_missing_exchange_is_404() {
        let m = setup();
        assert_eq!(
            m.check_exchange_passive(V, "ex").map(|x| x.kind),
            Ok(ExchangeKind::Direct)
        );
        assert_eq!(
            m.check_exchange_passive(V, "nope").unwrap_err(),
            BrokerError::not_found("no exchange 'nope' in vhost '/'")
        );
    }

    #[test]
    fn delete_missing_exchange_is_404() {
        let mut m = Metadata::new();
        assert_eq!(
            delete_exchange(&mut m, "nope", false).unwrap_err(),
            BrokerError::not_found("no exchange 'nope' in vhost '/'")
        );
    }

    #[test]
    fn delete_system_exchange_is_403() {
        let mut m = Metadata::new();
        let err = delete_exchange(&mut m, "amq.direct", false).unwrap_err();
        assert_eq!(
            err,
            BrokerError::access_refused(
                "deletion of system exchange 'amq.direct' in vhost '/' not allowed"
            )
        );
        assert!(m.exchange(V, "amq.direct").is_some());
    }

    #[test]
    fn delete_exchange_if_unused_refuses_while_it_has_bindings() {
        let mut m = setup();
        bind(&mut m, BindingDef::new("ex", q("q1"), "k")).unwrap();
        let err = delete_exchange(&mut m, "ex", true).unwrap_err();
        assert_eq!(
            err,
            BrokerError::precondition_failed("exchange 'ex' in vhost '/' in use")
        );
        unbind(&mut m, BindingDef::new("ex", q("q1"), "k")).unwrap();
        let out = delete_exchange(&mut m, "ex", true).unwrap();
        assert_eq!(out.deleted_exchanges, vec!["ex"]);
    }

    #[test]
    fn delete_exchange_removes_bindings_as_source_and_destination() {
        let mut m = setup();
        declare_exchange(&mut m, ExchangeDef::new("up", ExchangeKind::Fanout)).unwrap();
        bind(&mut m, BindingDef::new("ex", q("q1"), "k")).unwrap();
        bind(&mut m, BindingDef::new("up", x("ex"), "")).unwrap();
        let out = delete_exchange(&mut m, "ex", false).unwrap();
        assert_eq!(out.deleted_exchanges, vec!["ex"]);
        assert!(declared_bindings(&m).is_empty());
        // Recreating the exchange does not bring its old bindings back.
        declare_exchange(&mut m, ExchangeDef::new("ex", ExchangeKind::Direct)).unwrap();
        let mut reached = Vec::new();
        m.route(V, "up", "k", &[], &mut reached).unwrap();
        assert!(reached.is_empty());
    }

    #[test]
    fn queue_with_reserved_prefix_is_refused_but_server_names_are_allowed() {
        let mut m = Metadata::new();
        let err = declare_queue(&mut m, QueueDef::new("amq.q")).unwrap_err();
        assert_eq!(
            err,
            BrokerError::access_refused("queue name 'amq.q' contains reserved prefix 'amq.*'")
        );
        assert!(
            declare_queue(&mut m, QueueDef::new("amq.gen-abc123"))
                .unwrap()
                .created
        );
    }

    #[test]
    fn redeclare_queue_with_other_durable_is_406() {
        let mut m = setup();
        let err = declare_queue(
            &mut m,
            QueueDef {
                durable: false,
                ..QueueDef::new("q1")
            },
        )
        .unwrap_err();
        assert_eq!(
            err,
            BrokerError::precondition_failed(
                "inequivalent arg 'durable' for queue 'q1' in vhost '/': received 'false' but current is 'true'"
            )
        );
        let err = declare_queue(
            &mut m,
            QueueDef {
                auto_delete: true,
                ..QueueDef::new("q1")
            },
        )
        .unwrap_err();
        assert!(
            err.text.contains("inequivalent arg 'auto_delete'"),
            "{}",
            err.text
        );
    }

    #[test]
    fn redeclare_queue_with_other_compared_argument_is_406() {
        let mut m = Metadata::new();
        let with = |entries: &[(&str, AMQPValue)]| QueueDef {
            arguments: args(entries),
            ..QueueDef::new("q")
        };
        declare_queue(&mut m, with(&[("x-max-length", AMQPValue::LongInt(10))])).unwrap();
        let err =
            declare_queue(&mut m, with(&[("x-max-length", AMQPValue::LongInt(20))])).unwrap_err();
        assert_eq!(
            err,
            BrokerError::precondition_failed(
                "inequivalent arg 'x-max-length' for queue 'q' in vhost '/': received the value '20' of \
                 type 'signedint' but current is the value '10' of type 'signedint'"
            )
        );
        let err = declare_queue(&mut m, with(&[])).unwrap_err();
        assert!(
            err.text
                .contains("received none but current is the value '10'"),
            "{}",
            err.text
        );
        // Another integer width with the same value is equivalent.
        let out = declare_queue(
            &mut m,
            with(&[("x-max-length", AMQPValue::LongLongInt(10))]),
        )
        .unwrap();
        assert!(!out.created);
        // Arguments RabbitMQ does not compare may differ.
        let out = declare_queue(
            &mut m,
            with(&[
                ("x-max-length", AMQPValue::ShortUInt(10)),
                ("x-custom", text("y")),
            ]),
        )
        .unwrap();
        assert!(!out.created);
    }

    #[test]
    fn queue_type_defaults_to_classic_when_comparing() {
        let mut m = Metadata::new();
        declare_queue(&mut m, QueueDef::new("q")).unwrap();
        let classic = QueueDef {
            arguments: args(&[("x-queue-type", text("classic"))]),
            ..QueueDef::new("q")
        };
        assert!(!declare_queue(&mut m, classic).unwrap().created);
        let quorum = QueueDef {
            arguments: args(&[("x-queue-type", text("quorum"))]),
            ..QueueDef::new("q")
        };
        let err = declare_queue(&mut m, quorum).unwrap_err();
        assert!(
            err.text.contains("inequivalent arg 'x-queue-type'"),
            "{}",
            err.text
        );
    }

    #[test]
    fn exclusive_queue_is_locked_to_other_connections() {
        let mut m = Metadata::new();
        let mine = QueueDef {
            exclusive_owner: Some(1),
            placement: Default::default(),
            ..QueueDef::new("ex-q")
        };
        declare_queue(&mut m, mine.clone()).unwrap();
        assert!(
            !declare_queue(&mut m, mine).unwrap().created,
            "owner may redeclare"
        );
        let theirs = QueueDef {
            exclusive_owner: Some(2),
            placement: Default::default(),
            ..QueueDef::new("ex-q")
        };
        let err = declare_queue(&mut m, theirs).unwrap_err();
        assert_eq!(err, queue_locked("ex-q", "/"));
        assert_eq!(err.code, 405);
        assert!(err.text.starts_with(
            "RESOURCE_LOCKED - cannot obtain exclusive access to locked queue 'ex-q' in vhost '/'."
        ));
        let shared = QueueDef::new("ex-q");
        assert_eq!(declare_queue(&mut m, shared).unwrap_err().code, 405);
    }

    #[test]
    fn check_queue_access_is_404_when_missing_and_405_when_locked() {
        let mut m = Metadata::new();
        declare_queue(
            &mut m,
            QueueDef {
                exclusive_owner: Some(1),
                placement: Default::default(),
                ..QueueDef::new("ex-q")
            },
        )
        .unwrap();
        assert!(m.check_queue_access(V, "ex-q", 1).is_ok());
        assert_eq!(m.check_queue_access(V, "ex-q", 2).unwrap_err().code, 405);
        assert_eq!(
            m.check_queue_access(V, "nope", 1).unwrap_err(),
            BrokerError::not_found("no queue 'nope' in vhost '/'")
        );
    }

    #[test]
    fn delete_missing_queue_is_404() {
        let mut m = Metadata::new();
        assert_eq!(
            delete_queue(&mut m, "nope").unwrap_err(),
            BrokerError::not_found("no queue 'nope' in vhost '/'")
        );
    }

    #[test]
    fn delete_queue_removes_its_bindings() {
        let mut m = setup();
        bind(&mut m, BindingDef::new("ex", q("q1"), "a")).unwrap();
        bind(&mut m, BindingDef::new("amq.fanout", q("q1"), "")).unwrap();
        let out = delete_queue(&mut m, "q1").unwrap();
        assert_eq!(out.deleted_queues, vec!["q1"]);
        assert!(out.deleted_exchanges.is_empty());
        assert!(m.bindings(V).is_empty());
        assert!(m.queue(V, "q1").is_none());
    }

    #[test]
    fn bind_to_missing_ends_is_404() {
        let mut m = setup();
        assert_eq!(
            bind(&mut m, BindingDef::new("nope", q("q1"), "k")).unwrap_err(),
            BrokerError::not_found("no exchange 'nope' in vhost '/'")
        );
        assert_eq!(
            bind(&mut m, BindingDef::new("ex", q("nope"), "k")).unwrap_err(),
            BrokerError::not_found("no queue 'nope' in vhost '/'")
        );
        assert_eq!(
            bind(&mut m, BindingDef::new("ex", x("nope"), "k")).unwrap_err(),
            BrokerError::not_found("no exchange 'nope' in vhost '/'")
        );
        assert_eq!(
            unbind(&mut m, BindingDef::new("ex", q("nope"), "k"))
                .unwrap_err()
                .code,
            404
        );
    }

    #[test]
    fn duplicate_bind_is_idempotent_and_arguments_are_part_of_identity() {
        let mut m = setup();
        assert!(
            bind(&mut m, BindingDef::new("ex", q("q1"), "k"))
                .unwrap()
                .created
        );
        assert!(
            !bind(&mut m, BindingDef::new("ex", q("q1"), "k"))
                .unwrap()
                .created
        );
        assert_eq!(declared_bindings(&m).len(), 1);
        let with_args = BindingDef {
            arguments: args(&[("a", text("1"))]),
            ..BindingDef::new("ex", q("q1"), "k")
        };
        assert!(bind(&mut m, with_args.clone()).unwrap().created);
        assert_eq!(declared_bindings(&m).len(), 2);
        // Removing one of the two still routes through the other.
        unbind(&mut m, with_args).unwrap();
        let mut reached = Vec::new();
        m.route(V, "ex", "k", &[], &mut reached).unwrap();
        assert_eq!(reached, vec![Arc::<str>::from("q1")]);
    }

    #[test]
    fn unbind_of_missing_binding_is_ok() {
        let mut m = setup();
        assert_eq!(
            unbind(&mut m, BindingDef::new("ex", q("q1"), "never")),
            Ok(MetaOutcome::default())
        );
    }

    #[test]
    fn headers_binding_with_invalid_x_match_is_406() {
        let mut m = setup();
        let b = BindingDef {
            arguments: args(&[("x-match", text("most"))]),
            ..BindingDef::new("amq.headers", q("q1"), "")
        };
        assert_eq!(bind(&mut m, b).unwrap_err().code, 406);
        assert!(declared_bindings(&m).is_empty());
    }

    #[test]
    fn bindings_listing_includes_implicit_default_bindings() {
        let mut m = setup();
        bind(&mut m, BindingDef::new("ex", q("q1"), "k")).unwrap();
        assert_eq!(
            m.bindings(V),
            vec![
                BindingDef::new("", q("q1"), "q1"),
                BindingDef::new("ex", q("q1"), "k")
            ]
        );
    }

    #[test]
    fn auto_delete_exchange_survives_creation_and_goes_with_its_last_binding() {
        let mut m = setup();
        let auto = ExchangeDef {
            auto_delete: true,
            ..ExchangeDef::new("auto", ExchangeKind::Topic)
        };
        declare_exchange(&mut m, auto).unwrap();
        declare_queue(&mut m, QueueDef::new("q2")).unwrap();
        assert!(m.exchange(V, "auto").is_some(), "not deleted at creation");
        bind(&mut m, BindingDef::new("auto", q("q1"), "a.#")).unwrap();
        bind(&mut m, BindingDef::new("auto", q("q2"), "b.*")).unwrap();
        let out = unbind(&mut m, BindingDef::new("auto", q("q1"), "a.#")).unwrap();
        assert!(out.deleted_exchanges.is_empty(), "one binding left");
        let out = delete_queue(&mut m, "q2").unwrap();
        assert_eq!(out.deleted_exchanges, vec!["auto"]);
        assert!(m.exchange(V, "auto").is_none());
    }

    #[test]
    fn auto_delete_cascades_through_exchange_to_exchange_bindings() {
        let mut m = setup();
        let auto = |name: &str| ExchangeDef {
            auto_delete: true,
            ..ExchangeDef::new(name, ExchangeKind::Fanout)
        };
        declare_exchange(&mut m, auto("a1")).unwrap();
        declare_exchange(&mut m, auto("a2")).unwrap();
        bind(&mut m, BindingDef::new("a1", x("a2"), "")).unwrap();
        bind(&mut m, BindingDef::new("a2", q("q1"), "")).unwrap();
        let out = delete_queue(&mut m, "q1").unwrap();
        assert_eq!(out.deleted_exchanges, vec!["a2", "a1"]);
        assert!(m.exchange(V, "a1").is_none() && m.exchange(V, "a2").is_none());
    }

    #[test]
    fn auto_delete_exchange_is_deleted_on_unbind_of_its_last_binding() {
        let mut m = setup();
        let auto = ExchangeDef {
            auto_delete: true,
            ..ExchangeDef::new("auto", ExchangeKind::Direct)
        };
        declare_exchange(&mut m, auto).unwrap();
        bind(&mut m, BindingDef::new("auto", q("q1"), "k")).unwrap();
        let out = unbind(&mut m, BindingDef::new("auto", q("q1"), "k")).unwrap();
        assert_eq!(out.deleted_exchanges, vec!["auto"]);
    }

    #[test]
    fn connection_closed_deletes_only_its_exclusive_queues() {
        let mut m = setup();
        declare_queue(
            &mut m,
            QueueDef {
                exclusive_owner: Some(7),
                placement: Default::default(),
                ..QueueDef::new("amq.gen-1")
            },
        )
        .unwrap();
        declare_queue(
            &mut m,
            QueueDef {
                exclusive_owner: Some(7),
                placement: Default::default(),
                ..QueueDef::new("mine")
            },
        )
        .unwrap();
        declare_queue(
            &mut m,
            QueueDef {
                exclusive_owner: Some(8),
                placement: Default::default(),
                ..QueueDef::new("theirs")
            },
        )
        .unwrap();
        bind(&mut m, BindingDef::new("ex", q("mine"), "k")).unwrap();
        let out = m.apply(MetaCommand::ConnectionClosed { conn: 7 }).unwrap();
        assert_eq!(out.deleted_queues, vec!["amq.gen-1", "mine"]);
        let names: Vec<_> = m.queues(V).map(|q| q.name.as_str()).collect();
        assert_eq!(names, vec!["q1", "theirs"]);
        assert!(declared_bindings(&m).is_empty());
        let again = m.apply(MetaCommand::ConnectionClosed { conn: 7 }).unwrap();
        assert_eq!(again, MetaOutcome::default());
    }

    #[test]
    fn deleted_exclusive_queue_is_not_deleted_again_on_close() {
        let mut m = Metadata::new();
        declare_queue(
            &mut m,
            QueueDef {
                exclusive_owner: Some(3),
                placement: Default::default(),
                ..QueueDef::new("e")
            },
        )
        .unwrap();
        delete_queue(&mut m, "e").unwrap();
        declare_queue(&mut m, QueueDef::new("e")).unwrap();
        let out = m.apply(MetaCommand::ConnectionClosed { conn: 3 }).unwrap();
        assert!(out.deleted_queues.is_empty());
        assert!(m.queue(V, "e").is_some());
    }

    #[test]
    fn refused_commands_change_nothing() {
        let mut m = setup();
        bind(&mut m, BindingDef::new("ex", q("q1"), "k")).unwrap();
        let before = (m.bindings(V), m.exchanges(V).cloned().collect::<Vec<_>>());
        let _ = declare_exchange(&mut m, ExchangeDef::new("ex", ExchangeKind::Topic));
        let _ = delete_exchange(&mut m, "ex", true);
        let _ = bind(&mut m, BindingDef::new("ex", q("missing"), "k"));
        assert_eq!(
            before,
            (m.bindings(V), m.exchanges(V).cloned().collect::<Vec<_>>())
        );
    }

    #[test]
    fn to_commands_rebuilds_the_same_definitions() {
        let mut m = setup();
        m.apply(MetaCommand::AddVhost { name: "v2".into() })
            .unwrap();
        let auto = ExchangeDef {
            auto_delete: true,
            ..ExchangeDef::new("auto", ExchangeKind::Headers)
        };
        declare_exchange(&mut m, auto).unwrap();
        declare_queue(
            &mut m,
            QueueDef {
                exclusive_owner: Some(4),
                placement: Default::default(),
                ..QueueDef::new("amq.gen-x")
            },
        )
        .unwrap();
        bind(&mut m, BindingDef::new("ex", q("q1"), "k")).unwrap();
        bind(&mut m, BindingDef::new("amq.topic", x("ex"), "#")).unwrap();
        let mut copy = Metadata::new();
        for cmd in m.to_commands() {
            copy.apply(cmd).unwrap();
        }
        for v in ["/", "v2"] {
            assert_eq!(m.bindings(v), copy.bindings(v));
            assert!(m.exchanges(v).eq(copy.exchanges(v)));
            assert!(m.queues(v).eq(copy.queues(v)));
        }
        assert!(m.vhosts().eq(copy.vhosts()));
    }

    #[test]
    fn commands_round_trip_through_serde() {
        let cmd = MetaCommand::Bind {
            vhost: V.into(),
            binding: BindingDef {
                arguments: args(&[("x-match", text("any"))]),
                ..BindingDef::new("e", q("q"), "k")
            },
        };
        let json = serde_json::to_string(&cmd).unwrap();
        assert_eq!(serde_json::from_str::<MetaCommand>(&json).unwrap(), cmd);
    }

    mod model {
        //! Random command histories: the indexes stay consistent with the
        //! definitions, and routing agrees with a naive router that reads
        //! only the `bindings()` listing.
        use super::*;
        use crate::message::table_str;
        use proptest::prelude::*;

        const EXCHANGES: [&str; 4] = ["e0", "e1", "e2", "amq.topic"];
        const QUEUES: [&str; 3] = ["q0", "q1", "q2"];
        const BINDING_KEYS: [&str; 7] = ["a", "a.b", "b", "#", "a.*", "", "*.b"];
        const ROUTING_KEYS: [&str; 6] = ["a", "a.b", "b", "", "a.b.c", "q1"];

        #[derive(Clone, Debug)]
        enum Op {
            DeclareExchange {
                e: usize,
                kind: usize,
                auto_delete: bool,
                alternate: Option<usize>,
            },
            DeclareQueue {
                q: usize,
                owner: Option<u64>,
            },
            DeleteExchange {
                e: usize,
                if_unused: bool,
            },
            DeleteQueue {
                q: usize,
            },
            Bind {
                source: usize,
                to_queue: bool,
                dest: usize,
                key: usize,
            },
            Unbind {
                source: usize,
                to_queue: bool,
                dest: usize,
                key: usize,
            },
            Close {
                conn: u64,
            },
            /// Unbinds the n-th declared binding (modulo their number), so
            /// that unbinds hit existing bindings often.
            UnbindExisting {
                n: usize,
            },
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                (
                    0..3usize,
                    0..3usize,
                    any::<bool>(),
                    prop::option::of(0..4usize)
                )
                    .prop_map(|(e, kind, auto_delete, alternate)| {
                        Op::DeclareExchange {
                            e,
                            kind,
                            auto_delete,
                            alternate,
                        }
                    }),
                (0..3usize, prop::option::of(0..2u64))
                    .prop_map(|(q, owner)| Op::DeclareQueue { q, owner }),
                (0..4usize, any::<bool>())
                    .prop_map(|(e, if_unused)| Op::DeleteExchange { e, if_unused }),
                (0..3usize).prop_map(|q| Op::DeleteQueue { q }),
                (0..4usize, any::<bool>(), 0..4usize, 0..7usize).prop_map(
                    |(source, to_queue, dest, key)| Op::Bind {
                        source,
                        to_queue,
                        dest,
                        key
                    }
                ),
                (0..4usize, any::<bool>(), 0..4usize, 0..7usize).prop_map(
                    |(source, to_queue, dest, key)| Op::Unbind {
                        source,
                        to_queue,
                        dest,
                        key
                    }
                ),
                (0..2u64).prop_map(|conn| Op::Close { conn }),
                any::<usize>().prop_map(|n| Op::UnbindExisting { n }),
            ]
        }

        fn binding(source: usize, to_queue: bool, dest: usize, key: usize) -> BindingDef {
            let destination = if to_queue {
                q(QUEUES[dest % QUEUES.len()])
            } else {
                x(EXCHANGES[dest])
            };
            BindingDef::new(EXCHANGES[source], destination, BINDING_KEYS[key])
        }

        fn command(m: &Metadata, op: &Op) -> MetaCommand {
            let vhost = V.to_owned();
            match *op {
                Op::DeclareExchange {
                    e,
                    kind,
                    auto_delete,
                    alternate,
                } => {
                    let kinds = [
                        ExchangeKind::Direct,
                        ExchangeKind::Fanout,
                        ExchangeKind::Topic,
                    ];
                    let mut def = ExchangeDef {
                        auto_delete,
                        ..ExchangeDef::new(EXCHANGES[e], kinds[kind])
                    };
                    if let Some(a) = alternate {
                        def.arguments = args(&[("alternate-exchange", text(EXCHANGES[a]))]);
                    }
                    MetaCommand::DeclareExchange { vhost, def }
                }
                Op::DeclareQueue { q, owner } => MetaCommand::DeclareQueue {
                    vhost,
                    def: QueueDef {
                        exclusive_owner: owner,
                        placement: Default::default(),
                        ..QueueDef::new(QUEUES[q])
                    },
                },
                Op::DeleteExchange { e, if_unused } => MetaCommand::DeleteExchange {
                    vhost,
                    name: EXCHANGES[e].into(),
                    if_unused,
                },
                Op::DeleteQueue { q } => MetaCommand::DeleteQueue {
                    vhost,
                    name: QUEUES[q].into(),
                },
                Op::Bind {
                    source,
                    to_queue,
                    dest,
                    key,
                } => MetaCommand::Bind {
                    vhost,
                    binding: binding(source, to_queue, dest, key),
                },
                Op::Unbind {
                    source,
                    to_queue,
                    dest,
                    key,
                } => MetaCommand::Unbind {
                    vhost,
                    binding: binding(source, to_queue, dest, key),
                },
                Op::Close { conn } => MetaCommand::ConnectionClosed { conn },
                Op::UnbindExisting { n } => {
                    let declared = declared_bindings(m);
                    match declared.get(n % declared.len().max(1)) {
                        Some(b) => MetaCommand::Unbind {
                            vhost,
                            binding: b.clone(),
                        },
                        None => MetaCommand::ConnectionClosed { conn: 99 },
                    }
                }
            }
        }

        fn topic_matches(pattern: &[&str], key: &[&str]) -> bool {
            match pattern.split_first() {
                None => key.is_empty(),
                Some((&"#", rest)) => (0..=key.len()).any(|k| topic_matches(rest, &key[k..])),
                Some((&"*", rest)) => !key.is_empty() && topic_matches(rest, &key[1..]),
                Some((w, rest)) => key.first() == Some(w) && topic_matches(rest, &key[1..]),
            }
        }

        fn naive_route(m: &Metadata, exchange: &str, key: &str) -> Vec<String> {
            let words = |s: &str| {
                crate::broker::topic::split_words(s)
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            };
            let listing = m.bindings(V);
            let mut visited = BTreeSet::new();
            let mut pending = vec![exchange.to_owned()];
            let mut reached = BTreeSet::new();
            while let Some(e) = pending.pop() {
                if !visited.insert(e.clone()) {
                    continue;
                }
                let Some(def) = m.exchange(V, &e) else {
                    continue;
                };
                let mut matched = false;
                for b in listing.iter().filter(|b| b.source == e) {
                    let hit = match def.kind {
                        _ if e.is_empty() => b.routing_key == key,
                        ExchangeKind::Direct => b.routing_key == key,
                        ExchangeKind::Fanout => true,
                        ExchangeKind::Topic => {
                            let (p, k) = (words(&b.routing_key), words(key));
                            let p: Vec<&str> = p.iter().map(String::as_str).collect();
                            let k: Vec<&str> = k.iter().map(String::as_str).collect();
                            topic_matches(&p, &k)
                        }
                        ExchangeKind::Headers => false,
                    };
                    if hit {
                        matched = true;
                        match &b.destination {
                            Destination::Queue(name) => {
                                reached.insert(name.clone());
                            }
                            Destination::Exchange(name) => pending.push(name.clone()),
                        }
                    }
                }
                if !matched && !e.is_empty() {
                    if let Some(alternate) = table_str(&def.arguments, "alternate-exchange") {
                        pending.push(alternate);
                    }
                }
            }
            reached.into_iter().collect()
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(128))]
            #[test]
            fn indexes_stay_consistent_and_routing_matches_the_listing(
                ops in prop::collection::vec(op(), 1..40)
            ) {
                let mut m = Metadata::new();
                for op in &ops {
                    let cmd = command(&m, op);
                    let _ = m.apply(cmd);
                    m.vhosts.values().for_each(Vhost::check_invariants);
                }
                for e in m.exchanges(V).map(|x| x.name.clone()).collect::<Vec<_>>() {
                    for key in ROUTING_KEYS {
                        let mut out = Vec::new();
                        m.route(V, &e, key, &[], &mut out).unwrap();
                        let got: Vec<String> = out.iter().map(|q| q.to_string()).collect();
                        prop_assert_eq!(got, naive_route(&m, &e, key), "exchange {:?} key {:?}", e, key);
                    }
                }
            }
        }
    }
}
