//! The metadata state machine: every vhost's exchanges, queues and bindings.
//!
//! Commands are plain data and `apply` is deterministic, so in a cluster the
//! metadata Raft group replicates the commands and every node applies them
//! into the same [`Metadata`]. Routing reads it under a shared lock.

// CONTRACT (implemented by the metadata work):
//
// pub type ConnId = u64;               // unique connection id (node id in high bits)
//
// #[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
// pub enum ExchangeKind { Direct, Fanout, Topic, Headers }
// impl ExchangeKind { pub fn parse(s: &str) -> Option<Self>; pub fn as_str(self) -> &'static str }
//
// #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
// pub struct ExchangeDef { pub name: String, pub kind: ExchangeKind, pub durable: bool,
//     pub auto_delete: bool, pub internal: bool, pub arguments: FieldTable }
//
// #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
// pub struct QueueDef { pub name: String, pub durable: bool, pub exclusive_owner: Option<ConnId>,
//     pub auto_delete: bool, pub arguments: FieldTable }
//
// #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
// pub enum Destination { Queue(String), Exchange(String) }
//
// #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
// pub struct BindingDef { pub source: String, pub destination: Destination,
//     pub routing_key: String, pub arguments: FieldTable }
//
// #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
// pub enum MetaCommand {
//     AddVhost { name: String },
//     DeclareExchange { vhost: String, def: ExchangeDef },
//     DeleteExchange { vhost: String, name: String, if_unused: bool },
//     DeclareQueue { vhost: String, def: QueueDef },
//     DeleteQueue { vhost: String, name: String },
//     Bind { vhost: String, binding: BindingDef },
//     Unbind { vhost: String, binding: BindingDef },
//     /// The connection closed: its exclusive queues are deleted.
//     ConnectionClosed { conn: ConnId },
// }
//
// #[derive(Clone, Debug, PartialEq, Default)]
// pub struct MetaOutcome {
//     /// `DeclareQueue`/`DeclareExchange`: false when it already existed (equivalent).
//     pub created: bool,
//     /// Queues removed by this command (deleted directly, exclusive ones of a
//     /// closed connection); the shell stops them and cancels their consumers.
//     pub deleted_queues: Vec<String>,
//     /// Exchanges removed (directly, or auto-deleted when they lost their last binding).
//     pub deleted_exchanges: Vec<String>,
// }
//
// pub struct Metadata { ... }
// impl Metadata {
//     /// One vhost "/" with the predeclared exchanges.
//     pub fn new() -> Self;
//     pub fn apply(&mut self, cmd: MetaCommand) -> Result<MetaOutcome, BrokerError>;
//     pub fn exchange(&self, vhost: &str, name: &str) -> Option<&ExchangeDef>;
//     pub fn queue(&self, vhost: &str, name: &str) -> Option<&QueueDef>;
//     pub fn queues(&self, vhost: &str) -> impl Iterator<Item = &QueueDef>;  // and exchanges(), bindings()
//     /// 404 if absent, 405 if exclusive to another connection.
//     pub fn check_queue_access(&self, vhost: &str, name: &str, conn: ConnId) -> Result<&QueueDef, BrokerError>;
//     /// Checks for a declare with passive=true: 404 if absent, 405 if exclusive to another connection.
//     /// Route a publish: appends queue names (deduplicated) to `out`.
//     /// 404 if the exchange does not exist; does not check `internal` (the channel does).
//     pub fn route(&self, vhost: &str, exchange: &str, routing_key: &str,
//                  raw_properties: &[u8], out: &mut Vec<Arc<str>>) -> Result<(), BrokerError>;
//     // raw_properties is Message::raw_properties; decode headers from it (crate::message::decode_properties)
//     // only when a headers exchange is on the route, so other publishes never pay for it.
// }
