//! Where a publish goes.
//!
//! Each exchange keeps a [`BindingIndex`] shaped for its kind: a hash map by
//! routing key (direct), a set (fanout), a trie ([`crate::broker::topic`]) or
//! a list of argument tables ([`crate::broker::headers`]). [`route`] starts at
//! the published-to exchange and follows exchange-to-exchange bindings and
//! alternate exchanges, visiting each exchange at most once so that binding
//! cycles terminate, and returns every reached queue once.
//!
//! The indexes may use hash maps: what they return is a set, and [`route`]
//! sorts its result, so routing is the same on every node.

use crate::broker::headers::{self, XMatch};
use crate::broker::metadata::{Destination, ExchangeDef, ExchangeKind};
use crate::broker::topic::TopicTrie;
use crate::message::decode_properties;
use amq_protocol::types::{AMQPValue, FieldTable};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

/// The exchange argument naming where unroutable messages go instead.
pub const ALTERNATE_EXCHANGE: &str = "alternate-exchange";

/// One headers binding, with its `x-match` rule read once at bind time.
#[derive(Clone, Debug)]
pub struct HeadersBinding {
    x_match: XMatch,
    routing_key: String,
    arguments: FieldTable,
    destination: Destination,
}

/// The bindings of one exchange (where it is the source), indexed for its kind.
///
/// Counts stand for bindings that differ only in their arguments: for a
/// direct, fanout or topic exchange they route alike, yet each is removed on
/// its own.
#[derive(Clone, Debug)]
pub enum BindingIndex {
    Direct(HashMap<String, BTreeMap<Destination, usize>>),
    Fanout(BTreeMap<Destination, usize>),
    Topic(TopicTrie<Destination>),
    Headers(Vec<HeadersBinding>),
}

impl BindingIndex {
    pub fn new(kind: ExchangeKind) -> Self {
        match kind {
            ExchangeKind::Direct => BindingIndex::Direct(HashMap::new()),
            ExchangeKind::Fanout => BindingIndex::Fanout(BTreeMap::new()),
            ExchangeKind::Topic => BindingIndex::Topic(TopicTrie::new()),
            ExchangeKind::Headers => BindingIndex::Headers(Vec::new()),
        }
    }

    /// Adds one binding. The metadata keeps bindings unique, so a binding
    /// is added here once however often it is declared.
    pub fn add(&mut self, routing_key: &str, arguments: &FieldTable, destination: &Destination) {
        match self {
            BindingIndex::Direct(map) => {
                *map.entry(routing_key.to_owned())
                    .or_default()
                    .entry(destination.clone())
                    .or_insert(0) += 1;
            }
            BindingIndex::Fanout(set) => *set.entry(destination.clone()).or_insert(0) += 1,
            BindingIndex::Topic(trie) => {
                trie.insert(routing_key, destination.clone());
            }
            BindingIndex::Headers(list) => list.push(HeadersBinding {
                x_match: XMatch::from_arguments_lenient(arguments),
                routing_key: routing_key.to_owned(),
                arguments: arguments.clone(),
                destination: destination.clone(),
            }),
        }
    }

    /// Removes one binding previously added with the same values.
    pub fn remove(&mut self, routing_key: &str, arguments: &FieldTable, destination: &Destination) {
        match self {
            BindingIndex::Direct(map) => {
                if let Some(dests) = map.get_mut(routing_key) {
                    decrement(dests, destination);
                    if dests.is_empty() {
                        map.remove(routing_key);
                    }
                }
            }
            BindingIndex::Fanout(set) => decrement(set, destination),
            BindingIndex::Topic(trie) => {
                trie.remove(routing_key, destination);
            }
            BindingIndex::Headers(list) => {
                if let Some(i) = list.iter().position(|b| {
                    b.routing_key == routing_key
                        && b.destination == *destination
                        && same_arguments(&b.arguments, arguments)
                }) {
                    list.remove(i);
                }
            }
        }
    }

    /// Calls `f` for each destination a publish with `routing_key` (and the
    /// headers, decoded only if this is a headers exchange) reaches directly.
    pub fn for_each_match<'a>(
        &'a self,
        routing_key: &str,
        headers: &mut LazyHeaders<'_>,
        mut f: impl FnMut(&'a Destination),
    ) {
        match self {
            BindingIndex::Direct(map) => {
                if let Some(dests) = map.get(routing_key) {
                    dests.keys().for_each(f);
                }
            }
            BindingIndex::Fanout(set) => set.keys().for_each(f),
            BindingIndex::Topic(trie) => trie.for_each_match(routing_key, f),
            BindingIndex::Headers(list) => {
                if list.is_empty() {
                    return;
                }
                let headers = headers.get();
                for b in list {
                    if headers::matches(b.x_match, &b.arguments, headers) {
                        f(&b.destination);
                    }
                }
            }
        }
    }
}

fn decrement(set: &mut BTreeMap<Destination, usize>, destination: &Destination) {
    match set.get_mut(destination) {
        Some(n) if *n > 1 => *n -= 1,
        Some(_) => {
            set.remove(destination);
        }
        None => {}
    }
}

/// Binding identity for argument tables: exact structural equality in which
/// a float equals itself bit for bit (so a NaN argument can still be unbound).
pub fn same_arguments(a: &FieldTable, b: &FieldTable) -> bool {
    let (a, b) = (a.inner(), b.inner());
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|((ka, va), (kb, vb))| ka == kb && same_value(va, vb))
}

fn same_value(a: &AMQPValue, b: &AMQPValue) -> bool {
    match (a, b) {
        (AMQPValue::Float(x), AMQPValue::Float(y)) => x.to_bits() == y.to_bits(),
        (AMQPValue::Double(x), AMQPValue::Double(y)) => x.to_bits() == y.to_bits(),
        (AMQPValue::FieldTable(x), AMQPValue::FieldTable(y)) => same_arguments(x, y),
        (AMQPValue::FieldArray(x), AMQPValue::FieldArray(y)) => {
            let (x, y) = (x.as_slice(), y.as_slice());
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same_value(p, q))
        }
        _ => a == b,
    }
}

/// The message's `headers` property, decoded on first use: only a publish
/// that reaches a headers exchange with bindings pays for decoding.
pub struct LazyHeaders<'r> {
    raw_properties: &'r [u8],
    decoded: Option<Option<FieldTable>>,
}

impl<'r> LazyHeaders<'r> {
    pub fn new(raw_properties: &'r [u8]) -> Self {
        LazyHeaders {
            raw_properties,
            decoded: None,
        }
    }

    /// The headers table, or None when the property is absent or the
    /// property list cannot be decoded (then no header matches).
    pub fn get(&mut self) -> Option<&FieldTable> {
        let raw = self.raw_properties;
        self.decoded
            .get_or_insert_with(|| decode_properties(raw).and_then(|p| p.headers().clone()))
            .as_ref()
    }
}

/// What routing needs to see of a vhost.
pub trait Topology {
    /// An exchange's definition and the index of its bindings.
    fn exchange(&self, name: &str) -> Option<(&ExchangeDef, &BindingIndex)>;
    /// A queue's shared name, if the queue exists.
    fn queue_name(&self, name: &str) -> Option<&Arc<str>>;
}

/// Appends to `out`, sorted and each once, the queues a publish to `exchange`
/// reaches. A missing `exchange` reaches nothing (the caller reports 404).
///
/// The walk follows exchange-to-exchange bindings, and an exchange whose own
/// bindings match nothing hands the message to its `alternate-exchange`, as
/// RabbitMQ does. Every exchange is visited at most once, which bounds the
/// work by the number of exchanges and ends binding cycles.
pub fn route<'a, T: Topology + ?Sized>(
    topology: &'a T,
    exchange: &'a str,
    routing_key: &str,
    raw_properties: &[u8],
    out: &mut Vec<Arc<str>>,
) {
    let start = out.len();
    let mut headers = LazyHeaders::new(raw_properties);
    let mut visited: HashSet<&'a str> = HashSet::new();
    let mut pending: Vec<&'a str> = vec![exchange];
    while let Some(name) = pending.pop() {
        if !visited.insert(name) {
            continue;
        }
        let Some((def, index)) = topology.exchange(name) else {
            continue;
        };
        if name.is_empty() {
            // The default exchange: every queue is implicitly bound to it
            // with its own name as the routing key.
            if let Some(queue) = topology.queue_name(routing_key) {
                out.push(queue.clone());
            }
            continue;
        }
        let mut matched = false;
        index.for_each_match(routing_key, &mut headers, |dest| {
            matched = true;
            match dest {
                Destination::Queue(q) => {
                    if let Some(queue) = topology.queue_name(q) {
                        out.push(queue.clone());
                    }
                }
                Destination::Exchange(x) => pending.push(x.as_str()),
            }
        });
        if !matched {
            if let Some(alternate) = alternate_exchange(def) {
                pending.push(alternate);
            }
        }
    }
    let mut reached = out.split_off(start);
    reached.sort_unstable();
    reached.dedup();
    out.extend(reached);
}

/// The exchange's `alternate-exchange` argument, if it names one.
pub fn alternate_exchange(def: &ExchangeDef) -> Option<&str> {
    let value = def.arguments.inner().get(ALTERNATE_EXCHANGE)?;
    let bytes = headers::string_bytes(value)?;
    std::str::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use crate::broker::metadata::{
        BindingDef, Destination, ExchangeDef, ExchangeKind, MetaCommand, Metadata, QueueDef,
    };
    use crate::message::encode_properties;
    use amq_protocol::protocol::BasicProperties;
    use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};
    use std::sync::Arc;

    const V: &str = "/";

    struct World(Metadata);

    impl World {
        fn new() -> Self {
            World(Metadata::new())
        }

        fn exchange(&mut self, def: ExchangeDef) -> &mut Self {
            self.0
                .apply(MetaCommand::DeclareExchange {
                    vhost: V.into(),
                    def,
                })
                .unwrap();
            self
        }

        fn queue(&mut self, name: &str) -> &mut Self {
            self.0
                .apply(MetaCommand::DeclareQueue {
                    vhost: V.into(),
                    def: QueueDef::new(name),
                })
                .unwrap();
            self
        }

        fn bind(&mut self, binding: BindingDef) -> &mut Self {
            self.0
                .apply(MetaCommand::Bind {
                    vhost: V.into(),
                    binding,
                })
                .unwrap();
            self
        }

        fn route_with(&self, exchange: &str, key: &str, raw: &[u8]) -> Vec<String> {
            let mut out: Vec<Arc<str>> = Vec::new();
            self.0.route(V, exchange, key, raw, &mut out).unwrap();
            out.iter().map(|q| q.to_string()).collect()
        }

        fn route(&self, exchange: &str, key: &str) -> Vec<String> {
            self.route_with(
                exchange,
                key,
                &encode_properties(&BasicProperties::default()),
            )
        }
    }

    fn q(name: &str) -> Destination {
        Destination::Queue(name.into())
    }

    fn x(name: &str) -> Destination {
        Destination::Exchange(name.into())
    }

    fn table(entries: &[(&str, &str)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in entries {
            t.insert(
                ShortString::from(*k),
                AMQPValue::LongString(LongString::from(*v)),
            );
        }
        t
    }

    fn with_ae(def: ExchangeDef, alternate: &str) -> ExchangeDef {
        ExchangeDef {
            arguments: table(&[("alternate-exchange", alternate)]),
            ..def
        }
    }

    #[test]
    fn default_exchange_routes_to_the_queue_named_by_the_key() {
        let mut w = World::new();
        w.queue("orders");
        assert_eq!(w.route("", "orders"), vec!["orders"]);
        assert!(w.route("", "missing").is_empty());
    }

    #[test]
    fn publish_to_missing_exchange_is_404() {
        let w = World::new();
        let err = w.0.route(V, "nope", "k", &[], &mut Vec::new()).unwrap_err();
        assert_eq!(
            err,
            crate::broker::error::BrokerError::not_found("no exchange 'nope' in vhost '/'")
        );
    }

    #[test]
    fn direct_fanout_and_topic_exchanges_route_by_their_rules() {
        let mut w = World::new();
        w.queue("a").queue("b").queue("c");
        w.bind(BindingDef::new("amq.direct", q("a"), "k1"));
        w.bind(BindingDef::new("amq.direct", q("b"), "k2"));
        w.bind(BindingDef::new("amq.fanout", q("a"), "ignored"));
        w.bind(BindingDef::new("amq.fanout", q("c"), ""));
        w.bind(BindingDef::new("amq.topic", q("a"), "stock.*.nyse"));
        w.bind(BindingDef::new("amq.topic", q("b"), "stock.#"));
        assert_eq!(w.route("amq.direct", "k1"), vec!["a"]);
        assert!(w.route("amq.direct", "k3").is_empty());
        assert_eq!(w.route("amq.fanout", "anything"), vec!["a", "c"]);
        assert_eq!(w.route("amq.topic", "stock.ibm.nyse"), vec!["a", "b"]);
        assert_eq!(w.route("amq.topic", "stock"), vec!["b"]);
        assert!(w.route("amq.topic", "bond.x").is_empty());
    }

    #[test]
    fn headers_exchange_routes_on_decoded_headers() {
        let mut w = World::new();
        w.queue("pdf").queue("any");
        let all = table(&[("format", "pdf"), ("type", "report")]);
        let any = table(&[("x-match", "any"), ("format", "pdf"), ("type", "log")]);
        w.bind(BindingDef {
            arguments: all,
            ..BindingDef::new("amq.headers", q("pdf"), "")
        });
        w.bind(BindingDef {
            arguments: any,
            ..BindingDef::new("amq.headers", q("any"), "")
        });
        let props = |h: &[(&str, &str)]| {
            encode_properties(&BasicProperties::default().with_headers(table(h)))
        };
        assert_eq!(
            w.route_with(
                "amq.headers",
                "",
                &props(&[("format", "pdf"), ("type", "report")])
            ),
            vec!["any", "pdf"]
        );
        assert_eq!(
            w.route_with("amq.headers", "", &props(&[("type", "log")])),
            vec!["any"]
        );
        assert!(w.route_with("amq.headers", "", &props(&[])).is_empty());
        // Undecodable properties match no header; they do not fail the publish.
        assert!(w.route_with("amq.headers", "", &[0xff]).is_empty());
    }

    #[test]
    fn other_exchanges_never_decode_properties() {
        let mut w = World::new();
        w.queue("a");
        w.bind(BindingDef::new("amq.direct", q("a"), "k"));
        assert_eq!(w.route_with("amq.direct", "k", &[0xff, 0x00]), vec!["a"]);
    }

    #[test]
    fn exchange_to_exchange_bindings_are_followed() {
        let mut w = World::new();
        w.queue("a").queue("b");
        w.exchange(ExchangeDef::new("hub", ExchangeKind::Topic));
        w.bind(BindingDef::new("amq.direct", x("hub"), "eu.orders"));
        w.bind(BindingDef::new("hub", q("a"), "eu.#"));
        w.bind(BindingDef::new("amq.direct", q("b"), "eu.orders"));
        assert_eq!(w.route("amq.direct", "eu.orders"), vec!["a", "b"]);
        assert!(w.route("amq.direct", "us.orders").is_empty());
    }

    #[test]
    fn binding_cycles_terminate_and_queues_are_reached_once() {
        let mut w = World::new();
        w.queue("a").queue("b");
        w.exchange(ExchangeDef::new("e1", ExchangeKind::Fanout));
        w.exchange(ExchangeDef::new("e2", ExchangeKind::Fanout));
        w.exchange(ExchangeDef::new("e3", ExchangeKind::Fanout));
        w.bind(BindingDef::new("e1", x("e2"), ""));
        w.bind(BindingDef::new("e2", x("e3"), ""));
        w.bind(BindingDef::new("e3", x("e1"), ""));
        w.bind(BindingDef::new("e1", x("e1"), ""));
        w.bind(BindingDef::new("e1", q("a"), ""));
        w.bind(BindingDef::new("e2", q("a"), ""));
        w.bind(BindingDef::new("e3", q("b"), ""));
        for start in ["e1", "e2", "e3"] {
            assert_eq!(w.route(start, "k"), vec!["a", "b"], "from {start}");
        }
    }

    #[test]
    fn alternate_exchange_takes_unroutable_messages() {
        let mut w = World::new();
        w.queue("main").queue("unrouted");
        w.exchange(ExchangeDef::new("ae", ExchangeKind::Fanout));
        w.exchange(with_ae(
            ExchangeDef::new("orders", ExchangeKind::Direct),
            "ae",
        ));
        w.bind(BindingDef::new("ae", q("unrouted"), ""));
        w.bind(BindingDef::new("orders", q("main"), "new"));
        assert_eq!(w.route("orders", "new"), vec!["main"]);
        assert_eq!(w.route("orders", "other"), vec!["unrouted"]);
    }

    #[test]
    fn missing_alternate_exchange_is_ignored_and_alternate_cycles_end() {
        let mut w = World::new();
        w.queue("a");
        w.exchange(with_ae(
            ExchangeDef::new("lonely", ExchangeKind::Direct),
            "absent",
        ));
        assert!(w.route("lonely", "k").is_empty());
        w.exchange(with_ae(ExchangeDef::new("p", ExchangeKind::Direct), "r"));
        w.exchange(with_ae(ExchangeDef::new("r", ExchangeKind::Direct), "p"));
        assert!(w.route("p", "k").is_empty());
        w.bind(BindingDef::new("r", q("a"), "k"));
        assert_eq!(w.route("p", "k"), vec!["a"]);
    }

    #[test]
    fn alternate_exchange_is_also_followed_after_exchange_to_exchange_hops() {
        let mut w = World::new();
        w.queue("fallback");
        w.exchange(ExchangeDef::new("ae", ExchangeKind::Fanout));
        w.exchange(with_ae(
            ExchangeDef::new("inner", ExchangeKind::Direct),
            "ae",
        ));
        w.bind(BindingDef::new("ae", q("fallback"), ""));
        w.bind(BindingDef::new("amq.fanout", x("inner"), ""));
        assert_eq!(w.route("amq.fanout", "k"), vec!["fallback"]);
    }

    #[test]
    fn internal_exchanges_route_when_asked() {
        // The channel refuses publishes to internal exchanges; routing itself
        // must still pass through them for exchange-to-exchange bindings.
        let mut w = World::new();
        w.queue("trace");
        w.bind(BindingDef::new(
            "amq.rabbitmq.trace",
            q("trace"),
            "publish.#",
        ));
        assert_eq!(w.route("amq.rabbitmq.trace", "publish.x"), vec!["trace"]);
    }

    #[test]
    fn route_appends_after_existing_entries() {
        let mut w = World::new();
        w.queue("a");
        w.bind(BindingDef::new("amq.fanout", q("a"), ""));
        let mut out: Vec<Arc<str>> = vec![Arc::from("z")];
        w.0.route(V, "amq.fanout", "", &[], &mut out).unwrap();
        assert_eq!(out, vec![Arc::<str>::from("z"), Arc::from("a")]);
    }

    #[test]
    fn same_arguments_is_exact_and_nan_equals_itself() {
        let mut a = FieldTable::default();
        a.insert(ShortString::from("f"), AMQPValue::Double(f64::NAN));
        assert!(super::same_arguments(&a, &a.clone()));
        let mut b = FieldTable::default();
        b.insert(ShortString::from("f"), AMQPValue::LongInt(1));
        let mut c = FieldTable::default();
        c.insert(ShortString::from("f"), AMQPValue::LongLongInt(1));
        assert!(!super::same_arguments(&b, &c));
    }
}
