//! What a channel does with each method: declares and binds, publishing
//! (content assembly, routing, mandatory returns, confirms, transactions),
//! consuming (deliveries, acks, nacks, prefetch, recover), `basic.get`, and
//! direct reply-to.
//!
//! A soft error closes only the channel (`channel.close` with the reply
//! code); the channel's consumers are cancelled and its unacknowledged
//! messages returned at once, and frames other than `channel.close-ok` are
//! ignored until the client answers, as the spec requires. A client's own
//! `channel.close` that crossed ours is answered with `close-ok`, and the
//! channel still waits for the client's `close-ok` to ours, as RabbitMQ's
//! does: forgetting it earlier would make that `close-ok` a frame on an
//! unopened channel, a connection error.

use super::confirms::Confirms;
use super::connection::{Conn, short};
use super::frame::{self, Frame};
use super::prefetch::{Delivery, SharedPrefetch, queue_limit};
use super::reply::{self, AmqpError};
use super::writer::OutBuf;
use crate::broker::metadata::{
    BindingDef, Destination, ExchangeDef, ExchangeKind, MetaCommand, QueueDef,
};
use crate::message::{Message, parse_expiration};
use crate::node::{ChannelEvent, Node, now_ms};
use crate::queue::command::{Command, ConfirmRef, ConsumerSpec, Effect, MsgId, OwnerId};
use crate::queue::config::QueueConfig;
use crate::queue::runner::{QueueHandle, Request};
use amq_protocol::protocol::{
    AMQPClass, BasicProperties, access, basic, channel as chan, confirm, exchange, queue, tx,
};
use amq_protocol::types::{FieldTable, ShortString};
use bytes::{Bytes, BytesMut};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

/// The pseudo-queue of direct reply-to (RabbitMQ's "fast reply-to").
pub const REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// A publish whose content is still arriving.
struct Pending {
    publish: basic::Publish,
    header: Option<(u64, Bytes, BasicProperties)>,
    body: BytesMut,
    first_body: Option<Bytes>,
}

/// A delivery the client has not acknowledged yet.
#[derive(Clone, Debug)]
struct Unacked {
    queue: Arc<str>,
    id: MsgId,
    /// Counts toward the channel's shared prefetch limit.
    shared: bool,
}

struct ConsumerInfo {
    queue: Arc<str>,
    no_ack: bool,
    /// The per-consumer prefetch in force when it was created.
    prefetch: u16,
    /// On a classic queue: subject to the channel's global prefetch.
    /// (Quorum queues refuse consumers while a global limit is set, and
    /// ignore one set later, as RabbitMQ's do.)
    shared: bool,
    /// The prefetch its queue enforces for it, as last told.
    queue_limit: u32,
}

/// Work a transaction holds until `tx.commit`.
enum TxOp {
    Publish {
        msg: Message,
        queues: Vec<Arc<str>>,
    },
    Ack(Vec<(u64, Unacked)>),
    Nack {
        items: Vec<(u64, Unacked)>,
        requeue: bool,
    },
}

#[derive(Default)]
pub struct Channel {
    owner: OwnerId,
    /// We sent `channel.close` and wait for `close-ok`.
    closing: bool,
    content: Option<Pending>,
    confirms: Option<Confirms>,
    tx: Option<Vec<TxOp>>,
    next_tag: u64,
    unacked: BTreeMap<u64, Unacked>,
    consumers: HashMap<Arc<str>, ConsumerInfo>,
    /// Prefetch for consumers created from now on (`basic.qos`).
    prefetch: u16,
    /// The channel-wide limit (`basic.qos` with `global`) and the
    /// deliveries it holds back.
    shared: SharedPrefetch,
    /// Queues that may hold this channel's consumers or deliveries.
    queues_used: BTreeSet<Arc<str>>,
    /// The consumer tag of this channel's direct reply-to consumer.
    reply_consumer: Option<Arc<str>>,
}

fn random_suffix() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut rng = rand::rng();
    (0..22)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// Writes a reply method: `ok!(self, ch, module, Method, value)`.
macro_rules! ok {
    ($self:ident, $ch:expr, chan, $variant:ident, $value:expr) => {
        $self
            .out
            .method($ch, &AMQPClass::Channel(chan::AMQPMethod::$variant($value)))
    };
    ($self:ident, $ch:expr, basic, $variant:ident, $value:expr) => {
        $self
            .out
            .method($ch, &AMQPClass::Basic(basic::AMQPMethod::$variant($value)))
    };
    ($self:ident, $ch:expr, queue, $variant:ident, $value:expr) => {
        $self
            .out
            .method($ch, &AMQPClass::Queue(queue::AMQPMethod::$variant($value)))
    };
    ($self:ident, $ch:expr, exchange, $variant:ident, $value:expr) => {
        $self.out.method(
            $ch,
            &AMQPClass::Exchange(exchange::AMQPMethod::$variant($value)),
        )
    };
    ($self:ident, $ch:expr, confirm, $variant:ident, $value:expr) => {
        $self.out.method(
            $ch,
            &AMQPClass::Confirm(confirm::AMQPMethod::$variant($value)),
        )
    };
    ($self:ident, $ch:expr, tx, $variant:ident, $value:expr) => {
        $self
            .out
            .method($ch, &AMQPClass::Tx(tx::AMQPMethod::$variant($value)))
    };
    ($self:ident, $ch:expr, access, $variant:ident, $value:expr) => {
        $self.out.method(
            $ch,
            &AMQPClass::Access(access::AMQPMethod::$variant($value)),
        )
    };
}

impl Conn {
    /// Handles a frame for channel `ch` (not 0).
    pub(super) async fn on_channel_frame(&mut self, ch: u16, f: Frame) -> Result<(), AmqpError> {
        let Some(mut c) = self.channels.remove(&ch) else {
            return match f {
                Frame::Method { method, .. }
                    if matches!(*method, AMQPClass::Channel(chan::AMQPMethod::Open(_))) =>
                {
                    let owner = self.node.next_id();
                    self.node.register_owner(owner, self.events.clone(), ch);
                    self.channels.insert(
                        ch,
                        Channel {
                            owner,
                            next_tag: 1,
                            ..Default::default()
                        },
                    );
                    self.node.metrics.channels_opened.inc();
                    self.node.metrics.channels.inc();
                    ok!(self, ch, chan, OpenOk, chan::OpenOk {});
                    Ok(())
                }
                _ => Err(AmqpError::new(
                    reply::CHANNEL_ERROR,
                    format!("expected 'channel.open' on channel {ch}"),
                )),
            };
        };
        if c.closing {
            // Only the close handshake matters now: everything else the
            // client sent before it saw our channel.close is dropped.
            if let Frame::Method { method, .. } = f {
                match *method {
                    AMQPClass::Channel(chan::AMQPMethod::CloseOk(_)) => {
                        self.forget_channel(c);
                        return Ok(());
                    }
                    AMQPClass::Channel(chan::AMQPMethod::Close(_)) => {
                        // Its close crossed ours. It will still answer ours
                        // with close-ok, so the channel stays until then.
                        ok!(self, ch, chan, CloseOk, chan::CloseOk {});
                    }
                    _ => {}
                }
            }
            self.channels.insert(ch, c);
            return Ok(());
        }
        let result = self.channel_frame(ch, &mut c, f).await;
        match result {
            Ok(Some(())) => {
                self.channels.insert(ch, c);
                Ok(())
            }
            // The channel was closed by the client and is gone.
            Ok(None) => Ok(()),
            Err(e) if !e.is_hard() => {
                tracing::debug!(peer = %self.peer, channel = ch, code = e.code, "closing channel: {}", e.text);
                ok!(
                    self,
                    ch,
                    chan,
                    Close,
                    chan::Close {
                        reply_code: e.code,
                        reply_text: short(&e.text),
                        class_id: e.class_id,
                        method_id: e.method_id,
                    }
                );
                self.release_channel(&mut c).await;
                c.closing = true;
                self.channels.insert(ch, c);
                Ok(())
            }
            Err(e) => {
                self.channels.insert(ch, c);
                Err(e)
            }
        }
    }

    /// Ok(None) when the channel has been closed and must not be kept.
    async fn channel_frame(
        &mut self,
        ch: u16,
        c: &mut Channel,
        f: Frame,
    ) -> Result<Option<()>, AmqpError> {
        match f {
            Frame::Method {
                method,
                class_id,
                method_id,
                args,
                ..
            } => {
                if c.content.is_some() {
                    return Err(AmqpError::new(
                        reply::UNEXPECTED_FRAME,
                        format!(
                            "expected content header for class 60, got non content header frame instead (method {class_id}/{method_id})"
                        ),
                    ));
                }
                if (class_id, method_id) == (60, 10) {
                    let size = frame::qos_prefetch_size(&args);
                    if size != 0 {
                        // RabbitMQ has never implemented a byte limit.
                        return Err(AmqpError::new(
                            reply::NOT_IMPLEMENTED,
                            format!("prefetch_size!=0 ({size})"),
                        )
                        .on(class_id, method_id));
                    }
                }
                self.channel_method(ch, c, *method).await.map_err(|e| {
                    if e.class_id == 0 {
                        e.on(class_id, method_id)
                    } else {
                        e
                    }
                })
            }
            Frame::Header {
                class_id,
                body_size,
                raw_properties,
                properties,
                ..
            } => {
                let Some(p) = c.content.as_mut().filter(|p| p.header.is_none()) else {
                    return Err(AmqpError::new(
                        reply::UNEXPECTED_FRAME,
                        "content header frame without a publish",
                    ));
                };
                if class_id != 60 {
                    return Err(AmqpError::new(
                        reply::UNEXPECTED_FRAME,
                        format!("content header for class {class_id}"),
                    ));
                }
                if body_size > self.node.config.max_message_size {
                    c.content = None;
                    return Err(AmqpError::new(
                        reply::PRECONDITION_FAILED,
                        format!(
                            "message size {body_size} is larger than configured max size {}",
                            self.node.config.max_message_size
                        ),
                    )
                    .on(60, 40));
                }
                p.header = Some((body_size, raw_properties, *properties));
                if body_size == 0 {
                    self.complete_publish(ch, c).await?;
                }
                Ok(Some(()))
            }
            Frame::Body { payload, .. } => {
                let Some(p) = c.content.as_mut().filter(|p| p.header.is_some()) else {
                    return Err(AmqpError::new(
                        reply::UNEXPECTED_FRAME,
                        "content body frame without a header",
                    ));
                };
                let size = p.header.as_ref().map(|h| h.0).unwrap_or(0);
                let have =
                    p.body.len() as u64 + p.first_body.as_ref().map_or(0, |b| b.len() as u64);
                if have + payload.len() as u64 > size {
                    return Err(AmqpError::new(
                        reply::FRAME_ERROR,
                        "content body exceeds the size in its header",
                    ));
                }
                // A body in one frame is kept as the read buffer's slice; only
                // a body split over frames is assembled by copying.
                if have == 0 && payload.len() as u64 == size {
                    p.first_body = Some(payload);
                } else {
                    if let Some(first) = p.first_body.take() {
                        p.body.reserve(size as usize);
                        p.body.extend_from_slice(&first);
                    }
                    if p.body.is_empty() {
                        p.body.reserve(size as usize);
                    }
                    p.body.extend_from_slice(&payload);
                }
                let have =
                    p.body.len() as u64 + p.first_body.as_ref().map_or(0, |b| b.len() as u64);
                if have == size {
                    self.complete_publish(ch, c).await?;
                }
                Ok(Some(()))
            }
            Frame::Heartbeat => Ok(Some(())),
        }
    }

    async fn channel_method(
        &mut self,
        ch: u16,
        c: &mut Channel,
        m: AMQPClass,
    ) -> Result<Option<()>, AmqpError> {
        match m {
            AMQPClass::Basic(b) => self.basic_method(ch, c, b).await?,
            AMQPClass::Queue(q) => self.queue_method(ch, q).await?,
            AMQPClass::Exchange(e) => self.exchange_method(ch, e).await?,
            AMQPClass::Channel(chan::AMQPMethod::Close(_)) => {
                self.release_channel(c).await;
                ok!(self, ch, chan, CloseOk, chan::CloseOk {});
                self.forget_channel(std::mem::take(c));
                return Ok(None);
            }
            AMQPClass::Channel(chan::AMQPMethod::Open(_)) => {
                return Err(AmqpError::new(
                    reply::CHANNEL_ERROR,
                    format!("second 'channel.open' seen on channel {ch}"),
                ));
            }
            AMQPClass::Channel(chan::AMQPMethod::Flow(f)) => {
                if !f.active {
                    return Err(AmqpError::new(
                        reply::NOT_IMPLEMENTED,
                        "active=false is not supported",
                    ));
                }
                ok!(self, ch, chan, FlowOk, chan::FlowOk { active: true });
            }
            AMQPClass::Channel(chan::AMQPMethod::CloseOk(_) | chan::AMQPMethod::FlowOk(_)) => {}
            AMQPClass::Confirm(confirm::AMQPMethod::Select(s)) => {
                if c.tx.is_some() {
                    return Err(AmqpError::new(
                        reply::PRECONDITION_FAILED,
                        "cannot switch from tx to confirm mode",
                    ));
                }
                c.confirms.get_or_insert_with(Confirms::default);
                if !s.nowait {
                    ok!(self, ch, confirm, SelectOk, confirm::SelectOk {});
                }
            }
            AMQPClass::Tx(t) => self.tx_method(ch, c, t).await?,
            AMQPClass::Access(access::AMQPMethod::Request(_)) => {
                ok!(self, ch, access, RequestOk, access::RequestOk {});
            }
            other => {
                return Err(AmqpError::new(
                    reply::COMMAND_INVALID,
                    format!("method {other:?} is not valid from a client on a channel"),
                ));
            }
        }
        Ok(Some(()))
    }

    // ----- exchanges -------------------------------------------------------

    async fn exchange_method(&mut self, ch: u16, m: exchange::AMQPMethod) -> Result<(), AmqpError> {
        let vhost = self.vhost.clone();
        match m {
            exchange::AMQPMethod::Declare(d) => {
                let name = d.exchange.as_str();
                let Some(kind) = ExchangeKind::parse(d.kind.as_str()) else {
                    return Err(AmqpError::new(
                        reply::COMMAND_INVALID,
                        format!("unknown exchange type '{}'", d.kind),
                    ));
                };
                if d.passive {
                    if !self.defined(Some(name), "").await {
                        self.node.meta().check_exchange_passive(&vhost, name)?;
                    }
                } else {
                    self.node
                        .apply_meta(MetaCommand::DeclareExchange {
                            vhost,
                            def: ExchangeDef {
                                name: name.to_owned(),
                                kind,
                                durable: d.durable,
                                auto_delete: d.auto_delete,
                                internal: d.internal,
                                arguments: d.arguments,
                            },
                        })
                        .await?;
                }
                if !d.nowait {
                    ok!(self, ch, exchange, DeclareOk, exchange::DeclareOk {});
                }
            }
            exchange::AMQPMethod::Delete(d) => {
                let name = d.exchange.as_str().to_owned();
                // Deleting an exchange that does not exist succeeds, as in RabbitMQ.
                if self.defined(Some(&name), "").await
                    || name.is_empty()
                    || name.starts_with("amq.")
                {
                    self.node
                        .apply_meta(MetaCommand::DeleteExchange {
                            vhost,
                            name,
                            if_unused: d.if_unused,
                        })
                        .await?;
                }
                if !d.nowait {
                    ok!(self, ch, exchange, DeleteOk, exchange::DeleteOk {});
                }
            }
            exchange::AMQPMethod::Bind(b) => {
                self.node
                    .apply_meta(MetaCommand::Bind {
                        vhost,
                        binding: binding(
                            &b.source,
                            Destination::Exchange(b.destination.to_string()),
                            &b.routing_key,
                            b.arguments,
                        ),
                    })
                    .await?;
                if !b.nowait {
                    ok!(self, ch, exchange, BindOk, exchange::BindOk {});
                }
            }
            exchange::AMQPMethod::Unbind(b) => {
                self.node
                    .apply_meta(MetaCommand::Unbind {
                        vhost,
                        binding: binding(
                            &b.source,
                            Destination::Exchange(b.destination.to_string()),
                            &b.routing_key,
                            b.arguments,
                        ),
                    })
                    .await?;
                if !b.nowait {
                    ok!(self, ch, exchange, UnbindOk, exchange::UnbindOk {});
                }
            }
            _ => {
                return Err(AmqpError::new(
                    reply::COMMAND_INVALID,
                    "server-only exchange method",
                ));
            }
        }
        Ok(())
    }

    // ----- queues ----------------------------------------------------------

    /// The queue a method names; an empty name means the channel's last
    /// declared queue in AMQP 0-8, which RabbitMQ no longer supports either.
    /// The queues a publish goes to, from this node's routing table.
    fn route(&self, msg: &Message, queues: &mut Vec<Arc<str>>) -> Result<(), AmqpError> {
        let meta = self.node.meta();
        if let Some(ex) = meta.exchange(&self.vhost, &msg.exchange) {
            if ex.internal {
                return Err(AmqpError::new(
                    reply::ACCESS_REFUSED,
                    format!(
                        "cannot publish to internal exchange '{}' in vhost '{}'",
                        msg.exchange, self.vhost
                    ),
                )
                .on(60, 40));
            }
        }
        meta.route(
            &self.vhost,
            &msg.exchange,
            &msg.routing_key,
            &msg.raw_properties,
            queues,
        )
        .map_err(|e| AmqpError::from(e).on(60, 40))
    }

    fn queue_access_now(&self, name: &str) -> Result<QueueHandle, AmqpError> {
        self.node
            .meta()
            .check_queue_access(&self.vhost, name, self.id)?;
        self.node.queue(&self.vhost, name).ok_or_else(|| {
            AmqpError::new(
                reply::NOT_FOUND,
                format!("no queue '{name}' in vhost '{}'", self.vhost),
            )
        })
    }

    /// The queue `name` if this connection may use it. A queue this node
    /// does not know yet may have just been declared through another node:
    /// the node catches up with the cluster's definitions before saying 404.
    async fn queue_access(&self, name: &str) -> Result<QueueHandle, AmqpError> {
        match self.queue_access_now(name) {
            Err(e) if e.code == reply::NOT_FOUND => {
                self.node.sync_meta().await;
                self.queue_access_now(name)
            }
            found => found,
        }
    }

    /// Whether the definitions name `exchange` (or, with `exchange` None,
    /// the queue `queue`), after catching up with the cluster on a miss.
    async fn defined(&self, exchange: Option<&str>, queue: &str) -> bool {
        let known = |node: &Node| {
            let meta = node.meta();
            match exchange {
                Some(x) => meta.exchange(&self.vhost, x).is_some(),
                None => meta.queue(&self.vhost, queue).is_some(),
            }
        };
        if known(&self.node) {
            return true;
        }
        self.node.sync_meta().await;
        known(&self.node)
    }

    async fn queue_method(&mut self, ch: u16, m: queue::AMQPMethod) -> Result<(), AmqpError> {
        let vhost = self.vhost.clone();
        match m {
            queue::AMQPMethod::Declare(d) => {
                let mut name = d.queue.as_str().to_owned();
                if name.is_empty() {
                    name = format!("amq.gen-{}", random_suffix());
                }
                if d.passive && name == REPLY_TO {
                    // Clients check for the direct reply-to pseudo-queue.
                    if !d.nowait {
                        ok!(
                            self,
                            ch,
                            queue,
                            DeclareOk,
                            queue::DeclareOk {
                                queue: ShortString::from(REPLY_TO),
                                message_count: 0,
                                consumer_count: 0,
                            }
                        );
                    }
                    return Ok(());
                }
                if d.passive {
                    let h = self.queue_access(&name).await?;
                    let counts = h.counts().await.unwrap_or_default();
                    if !d.nowait {
                        ok!(
                            self,
                            ch,
                            queue,
                            DeclareOk,
                            queue::DeclareOk {
                                queue: ShortString::from(name.as_str()),
                                message_count: counts.ready as u32,
                                consumer_count: counts.consumers as u32,
                            }
                        );
                    }
                    return Ok(());
                }
                if name.starts_with("amq.") && !name.starts_with("amq.gen-") {
                    return Err(AmqpError::new(
                        reply::ACCESS_REFUSED,
                        format!("queue name '{name}' contains reserved prefix 'amq.*'"),
                    ));
                }
                let config = QueueConfig::from_arguments(
                    d.durable,
                    d.exclusive,
                    d.auto_delete,
                    &d.arguments,
                )
                .map_err(|e| {
                    AmqpError::new(
                        reply::PRECONDITION_FAILED,
                        format!("{e} (queue '{name}' in vhost '{vhost}')"),
                    )
                })?;
                // Accepted, as RabbitMQ does, with the same kind of warning.
                if let Some(why) = config.at_least_once_fallback() {
                    tracing::warn!(
                        queue = %name,
                        vhost = %vhost,
                        "x-dead-letter-strategy at-least-once falls back to at-most-once: {why}"
                    );
                }
                self.node
                    .apply_meta(MetaCommand::DeclareQueue {
                        vhost: vhost.clone(),
                        def: QueueDef {
                            name: name.clone(),
                            durable: d.durable,
                            exclusive_owner: d.exclusive.then_some(self.id),
                            placement: Default::default(),
                            auto_delete: d.auto_delete,
                            arguments: d.arguments,
                        },
                    })
                    .await?;
                let h = self.queue_access(&name).await?;
                let _ = h
                    .send(Request::Apply(Command::Touch { now_ms: now_ms() }, None))
                    .await;
                let counts = h.counts().await.unwrap_or_default();
                if !d.nowait {
                    ok!(
                        self,
                        ch,
                        queue,
                        DeclareOk,
                        queue::DeclareOk {
                            queue: ShortString::from(name.as_str()),
                            message_count: counts.ready as u32,
                            consumer_count: counts.consumers as u32,
                        }
                    );
                }
            }
            queue::AMQPMethod::Bind(b) => {
                self.queue_access(b.queue.as_str()).await?;
                self.node
                    .apply_meta(MetaCommand::Bind {
                        vhost,
                        binding: binding(
                            &b.exchange,
                            Destination::Queue(b.queue.to_string()),
                            &b.routing_key,
                            b.arguments,
                        ),
                    })
                    .await?;
                if !b.nowait {
                    ok!(self, ch, queue, BindOk, queue::BindOk {});
                }
            }
            queue::AMQPMethod::Unbind(b) => {
                self.queue_access(b.queue.as_str()).await?;
                self.node
                    .apply_meta(MetaCommand::Unbind {
                        vhost,
                        binding: binding(
                            &b.exchange,
                            Destination::Queue(b.queue.to_string()),
                            &b.routing_key,
                            b.arguments,
                        ),
                    })
                    .await?;
                ok!(self, ch, queue, UnbindOk, queue::UnbindOk {});
            }
            queue::AMQPMethod::Purge(p) => {
                let h = self.queue_access(p.queue.as_str()).await?;
                let mut count = 0;
                if let Some(effects) = h.call(Command::Purge).await {
                    for e in effects {
                        if let Effect::Purged { count: n } = e {
                            count = n;
                        }
                    }
                }
                if !p.nowait {
                    ok!(
                        self,
                        ch,
                        queue,
                        PurgeOk,
                        queue::PurgeOk {
                            message_count: count as u32
                        }
                    );
                }
            }
            queue::AMQPMethod::Delete(d) => {
                let name = d.queue.as_str();
                // Deleting a queue that does not exist succeeds, as in RabbitMQ.
                let count = if !self.defined(None, name).await {
                    0
                } else {
                    let h = self.queue_access(name).await?;
                    let counts = h.counts().await.unwrap_or_default();
                    // Quorum queues honour if-unused and if-empty too, where
                    // RabbitMQ refuses both flags on them (see README).
                    if d.if_unused && counts.consumers > 0 {
                        return Err(AmqpError::new(
                            reply::PRECONDITION_FAILED,
                            format!("queue '{name}' in vhost '{vhost}' in use"),
                        ));
                    }
                    if d.if_empty && counts.ready > 0 {
                        return Err(AmqpError::new(
                            reply::PRECONDITION_FAILED,
                            format!("queue '{name}' in vhost '{vhost}' not empty"),
                        ));
                    }
                    self.node.delete_queue(&vhost, name).await?
                };
                if !d.nowait {
                    ok!(
                        self,
                        ch,
                        queue,
                        DeleteOk,
                        queue::DeleteOk {
                            message_count: count as u32
                        }
                    );
                }
            }
            _ => {
                return Err(AmqpError::new(
                    reply::COMMAND_INVALID,
                    "server-only queue method",
                ));
            }
        }
        Ok(())
    }

    // ----- basic -----------------------------------------------------------

    async fn basic_method(
        &mut self,
        ch: u16,
        c: &mut Channel,
        m: basic::AMQPMethod,
    ) -> Result<(), AmqpError> {
        match m {
            basic::AMQPMethod::Publish(p) => {
                if p.immediate {
                    return Err(AmqpError::new(reply::NOT_IMPLEMENTED, "immediate=true"));
                }
                self.has_published = true;
                c.content = Some(Pending {
                    publish: p,
                    header: None,
                    body: BytesMut::new(),
                    first_body: None,
                });
            }
            basic::AMQPMethod::Qos(q) => {
                // (A prefetch_size other than 0 was refused on arrival.)
                if q.global {
                    self.set_global_prefetch(c, q.prefetch_count).await;
                } else {
                    // Limits consumers created from now on. RabbitMQ (3.8
                    // on) also lifts the channel's global limit here.
                    c.prefetch = q.prefetch_count;
                    self.set_global_prefetch(c, 0).await;
                }
                ok!(self, ch, basic, QosOk, basic::QosOk {});
                self.send_released(ch, c);
            }
            basic::AMQPMethod::Consume(k) => self.consume(ch, c, k).await?,
            basic::AMQPMethod::Cancel(k) => {
                let tag: Arc<str> = Arc::from(k.consumer_tag.as_str());
                if c.reply_consumer.as_deref() == Some(&*tag) {
                    c.reply_consumer = None;
                } else if let Some(info) = c.consumers.remove(&tag) {
                    if let Some(h) = self.node.queue(&self.vhost, &info.queue) {
                        let _ = h
                            .send(Request::Apply(
                                Command::Cancel {
                                    owner: c.owner,
                                    tag: tag.clone(),
                                    now_ms: now_ms(),
                                },
                                None,
                            ))
                            .await;
                    }
                    // What the shared limit held back was never sent.
                    let held = c.shared.take_consumer(&tag);
                    return_to_queue(&self.node, &self.vhost, c.owner, held);
                }
                if !k.nowait {
                    ok!(
                        self,
                        ch,
                        basic,
                        CancelOk,
                        basic::CancelOk {
                            consumer_tag: k.consumer_tag
                        }
                    );
                }
            }
            basic::AMQPMethod::Get(g) => {
                let h = self.queue_access(g.queue.as_str()).await?;
                c.queues_used.insert(h.name.clone());
                let effects = h
                    .call(Command::Get {
                        owner: c.owner,
                        no_ack: g.no_ack,
                        now_ms: now_ms(),
                    })
                    .await
                    .unwrap_or_default();
                let mut answered = false;
                for e in effects {
                    match e {
                        Effect::GetOk {
                            id,
                            msg,
                            redelivered,
                            remaining,
                            ..
                        } => {
                            let tag = c.next_tag;
                            c.next_tag += 1;
                            if !g.no_ack {
                                c.unacked.insert(
                                    tag,
                                    Unacked {
                                        queue: h.name.clone(),
                                        id,
                                        shared: false,
                                    },
                                );
                            }
                            self.out.get_ok(
                                ch,
                                tag,
                                redelivered,
                                &msg,
                                remaining.min(u32::MAX as u64) as u32,
                            );
                            self.out.content(ch, &msg, self.frame_max);
                            self.node.metrics.delivered.inc();
                            answered = true;
                        }
                        Effect::GetEmpty { .. } => {}
                        _ => {}
                    }
                }
                if !answered {
                    ok!(self, ch, basic, GetEmpty, basic::GetEmpty {});
                }
            }
            basic::AMQPMethod::Ack(a) => {
                let items = take_tags(c, a.delivery_tag, a.multiple)?;
                self.node.metrics.acked.inc_by(items.len() as u64);
                match c.tx.as_mut() {
                    Some(t) => t.push(TxOp::Ack(items)),
                    None => self.settle(c.owner, items, Settle::Ack).await,
                }
                self.send_released(ch, c);
            }
            basic::AMQPMethod::Nack(n) => {
                let items = take_tags(c, n.delivery_tag, n.multiple)?;
                match c.tx.as_mut() {
                    Some(t) => t.push(TxOp::Nack {
                        items,
                        requeue: n.requeue,
                    }),
                    None => {
                        self.settle(
                            c.owner,
                            items,
                            if n.requeue {
                                Settle::Return
                            } else {
                                Settle::Discard
                            },
                        )
                        .await
                    }
                }
                self.send_released(ch, c);
            }
            basic::AMQPMethod::Reject(r) => {
                let items = take_tags(c, r.delivery_tag, false)?;
                match c.tx.as_mut() {
                    Some(t) => t.push(TxOp::Nack {
                        items,
                        requeue: r.requeue,
                    }),
                    None => {
                        self.settle(
                            c.owner,
                            items,
                            if r.requeue {
                                Settle::Return
                            } else {
                                Settle::Discard
                            },
                        )
                        .await
                    }
                }
                self.send_released(ch, c);
            }
            basic::AMQPMethod::Recover(basic::Recover { requeue })
            | basic::AMQPMethod::RecoverAsync(basic::RecoverAsync { requeue }) => {
                if !requeue {
                    // Redelivery to the original recipient: RabbitMQ has
                    // never implemented it either.
                    return Err(AmqpError::new(reply::NOT_IMPLEMENTED, "requeue=false"));
                }
                let is_sync = matches!(m, basic::AMQPMethod::Recover(_));
                let items: Vec<(u64, Unacked)> =
                    std::mem::take(&mut c.unacked).into_iter().collect();
                c.shared.settled(shared_count(&items));
                self.settle(c.owner, items, Settle::Return).await;
                if is_sync {
                    ok!(self, ch, basic, RecoverOk, basic::RecoverOk {});
                }
                self.send_released(ch, c);
            }
            _ => {
                return Err(AmqpError::new(
                    reply::COMMAND_INVALID,
                    "server-only basic method",
                ));
            }
        }
        Ok(())
    }

    async fn consume(
        &mut self,
        ch: u16,
        c: &mut Channel,
        k: basic::Consume,
    ) -> Result<(), AmqpError> {
        let tag: Arc<str> = if k.consumer_tag.as_str().is_empty() {
            Arc::from(format!("amq.ctag-{}", random_suffix()).as_str())
        } else {
            Arc::from(k.consumer_tag.as_str())
        };
        if c.consumers.contains_key(&tag) || c.reply_consumer.as_deref() == Some(&*tag) {
            return Err(AmqpError::new(
                reply::NOT_ALLOWED,
                format!("attempt to reuse consumer tag '{tag}'"),
            ));
        }
        if k.queue.as_str() == REPLY_TO {
            if !k.no_ack {
                return Err(AmqpError::new(
                    reply::PRECONDITION_FAILED,
                    "reply consumer cannot acknowledge",
                ));
            }
            c.reply_consumer = Some(tag.clone());
            if !k.nowait {
                ok!(
                    self,
                    ch,
                    basic,
                    ConsumeOk,
                    basic::ConsumeOk {
                        consumer_tag: ShortString::from(&*tag)
                    }
                );
            }
            return Ok(());
        }
        let h = self.queue_access(k.queue.as_str()).await?;
        // A global prefetch is one limit for all of the channel's consumers,
        // enforced here, by the channel, for every kind of queue. RabbitMQ
        // refuses it on quorum queues (540); in Warren every durable queue
        // is a quorum queue, and Celery asks for a global prefetch by
        // default, so Warren honours it instead (README, differences).
        let shared = !k.no_ack;
        let limit = if shared {
            queue_limit(c.prefetch, c.shared.limit())
        } else {
            c.prefetch.into()
        };
        let priority = k
            .arguments
            .inner()
            .get("x-priority")
            .map(|v| {
                crate::message::value_int(v).ok_or_else(|| {
                    AmqpError::new(
                        reply::PRECONDITION_FAILED,
                        "invalid arg 'x-priority': expected an integer",
                    )
                })
            })
            .transpose()?
            .unwrap_or(0)
            .clamp(i32::MIN as i64, i32::MAX as i64) as i32;
        let spec = ConsumerSpec {
            owner: c.owner,
            tag: tag.clone(),
            prefetch: limit,
            priority,
            no_ack: k.no_ack,
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        if h.send(Request::Consume {
            spec,
            exclusive: k.exclusive,
            reply: tx,
        })
        .await
        .is_err()
        {
            return Err(AmqpError::new(
                reply::NOT_FOUND,
                format!("no queue '{}' in vhost '{}'", h.name, self.vhost),
            ));
        }
        match rx.await {
            Ok(Ok(())) => {}
            Ok(Err(text)) => return Err(AmqpError::new(reply::ACCESS_REFUSED, text)),
            Err(_) => {
                return Err(AmqpError::new(
                    reply::NOT_FOUND,
                    format!("no queue '{}' in vhost '{}'", h.name, self.vhost),
                ));
            }
        }
        c.queues_used.insert(h.name.clone());
        c.consumers.insert(
            tag.clone(),
            ConsumerInfo {
                queue: h.name.clone(),
                no_ack: k.no_ack,
                prefetch: c.prefetch,
                shared,
                queue_limit: limit,
            },
        );
        if !k.nowait {
            ok!(
                self,
                ch,
                basic,
                ConsumeOk,
                basic::ConsumeOk {
                    consumer_tag: ShortString::from(&*tag)
                }
            );
        }
        Ok(())
    }

    /// Sends settlements to the queues the deliveries came from.
    async fn settle(&mut self, owner: OwnerId, items: Vec<(u64, Unacked)>, how: Settle) {
        let mut by_queue: BTreeMap<Arc<str>, Vec<MsgId>> = BTreeMap::new();
        for (_, u) in items {
            by_queue.entry(u.queue).or_default().push(u.id);
        }
        for (queue, ids) in by_queue {
            let Some(h) = self.node.queue(&self.vhost, &queue) else {
                continue;
            };
            let cmd = match how {
                Settle::Ack => Command::Settle { owner, ids },
                Settle::Return => Command::Return {
                    owner,
                    ids,
                    now_ms: now_ms(),
                },
                Settle::Discard => Command::Discard {
                    owner,
                    ids,
                    now_ms: now_ms(),
                },
            };
            let _ = h.send(Request::Apply(cmd, None)).await;
        }
    }

    // ----- publishing ------------------------------------------------------

    async fn complete_publish(&mut self, ch: u16, c: &mut Channel) -> Result<(), AmqpError> {
        let Some(p) = c.content.take() else {
            return Ok(());
        };
        let Some((_, raw_properties, props)) = p.header else {
            return Ok(());
        };
        let body = p.first_body.unwrap_or_else(|| p.body.freeze());
        let publish = p.publish;
        let err = |code, text: String| Err(AmqpError::new(code, text).on(60, 40));
        if let Some(uid) = props.user_id() {
            if uid.as_str() != self.user {
                return err(
                    reply::PRECONDITION_FAILED,
                    format!(
                        "user_id property set to '{uid}' but authenticated user was '{}'",
                        self.user
                    ),
                );
            }
        }
        let expiration_ms = match props.expiration() {
            Some(e) => match parse_expiration(e.as_str()) {
                Ok(ms) => Some(ms),
                Err(text) => return err(reply::PRECONDITION_FAILED, text),
            },
            None => None,
        };
        let mut msg = Message {
            exchange: Arc::from(publish.exchange.as_str()),
            routing_key: Arc::from(publish.routing_key.as_str()),
            priority: props.priority().unwrap_or(0),
            expiration_ms,
            raw_properties,
            body,
        };
        if props
            .reply_to()
            .as_ref()
            .is_some_and(|r| r.as_str() == REPLY_TO)
        {
            if c.reply_consumer.is_none() {
                return err(
                    reply::PRECONDITION_FAILED,
                    "fast reply consumer does not exist".into(),
                );
            }
            let props = props
                .clone()
                .with_reply_to(ShortString::from(format!("{REPLY_TO}.{:x}", c.owner)));
            msg = msg.with_properties(&props);
        }
        self.node.metrics.published.inc();
        // Direct reply-to: straight to the requesting channel, no queue.
        if publish.exchange.as_str().is_empty() {
            if let Some(owner) = publish
                .routing_key
                .as_str()
                .strip_prefix(&format!("{REPLY_TO}."))
            {
                let delivered = u64::from_str_radix(owner, 16)
                    .ok()
                    .is_some_and(|o| self.node.direct_reply(o, msg.clone()));
                if !delivered && publish.mandatory {
                    self.basic_return(ch, &msg, reply::NO_ROUTE, "NO_ROUTE");
                }
                if let Some(cf) = c.confirms.as_mut() {
                    cf.publish(0);
                }
                return Ok(());
            }
        }
        let mut queues = Vec::new();
        if let Err(e) = self.route(&msg, &mut queues) {
            // An exchange this node does not know yet may have just been
            // declared through another node.
            if e.code != reply::NOT_FOUND {
                return Err(e);
            }
            self.node.sync_meta().await;
            queues.clear();
            self.route(&msg, &mut queues)?;
        }
        if queues.is_empty() {
            if publish.mandatory {
                self.basic_return(ch, &msg, reply::NO_ROUTE, "NO_ROUTE");
                self.node.metrics.unroutable_returned.inc();
            } else {
                self.node.metrics.unroutable_dropped.inc();
            }
        }
        if let Some(t) = c.tx.as_mut() {
            t.push(TxOp::Publish { msg, queues });
            return Ok(());
        }
        let confirm = c.confirms.as_mut().map(|cf| ConfirmRef {
            owner: c.owner,
            seq: cf.publish(queues.len() as u32),
        });
        self.enqueue(c, msg, &queues, confirm).await;
        Ok(())
    }

    async fn enqueue(
        &mut self,
        c: &mut Channel,
        msg: Message,
        queues: &[Arc<str>],
        confirm: Option<ConfirmRef>,
    ) {
        let now = now_ms();
        for name in queues {
            let sent = match self.node.queue(&self.vhost, name) {
                // Waiting here for room in the queue's inbox is the
                // backpressure that keeps a fast publisher in check.
                Some(h) => h
                    .send(Request::Apply(
                        Command::Enqueue {
                            msg: msg.clone(),
                            confirm,
                            now_ms: now,
                        },
                        None,
                    ))
                    .await
                    .is_ok(),
                None => false,
            };
            if !sent {
                // The queue was deleted between routing and enqueue: as if
                // it had taken the message and lost it with the queue.
                if let (Some(cf), Some(r)) = (c.confirms.as_mut(), confirm) {
                    cf.answer(r.seq, true);
                }
            }
        }
    }

    fn basic_return(&mut self, ch: u16, msg: &Message, code: u16, text: &str) {
        ok!(
            self,
            ch,
            basic,
            Return,
            basic::Return {
                reply_code: code,
                reply_text: ShortString::from(text),
                exchange: ShortString::from(&*msg.exchange),
                routing_key: ShortString::from(&*msg.routing_key),
            }
        );
        self.out.content(ch, msg, self.frame_max);
    }

    // ----- transactions ----------------------------------------------------

    async fn tx_method(
        &mut self,
        ch: u16,
        c: &mut Channel,
        m: tx::AMQPMethod,
    ) -> Result<(), AmqpError> {
        match m {
            tx::AMQPMethod::Select(_) => {
                if c.confirms.is_some() {
                    return Err(AmqpError::new(
                        reply::PRECONDITION_FAILED,
                        "cannot switch from confirm to tx mode",
                    ));
                }
                c.tx.get_or_insert_with(Vec::new);
                ok!(self, ch, tx, SelectOk, tx::SelectOk {});
            }
            tx::AMQPMethod::Commit(_) => {
                let Some(ops) = c.tx.replace(Vec::new()) else {
                    return Err(AmqpError::new(
                        reply::PRECONDITION_FAILED,
                        "channel is not transactional",
                    ));
                };
                for op in ops {
                    match op {
                        TxOp::Publish { msg, queues } => self.enqueue(c, msg, &queues, None).await,
                        TxOp::Ack(items) => self.settle(c.owner, items, Settle::Ack).await,
                        TxOp::Nack { items, requeue } => {
                            self.settle(
                                c.owner,
                                items,
                                if requeue {
                                    Settle::Return
                                } else {
                                    Settle::Discard
                                },
                            )
                            .await
                        }
                    }
                }
                ok!(self, ch, tx, CommitOk, tx::CommitOk {});
            }
            tx::AMQPMethod::Rollback(_) => {
                let Some(ops) = c.tx.replace(Vec::new()) else {
                    return Err(AmqpError::new(
                        reply::PRECONDITION_FAILED,
                        "channel is not transactional",
                    ));
                };
                // Acks rolled back make their deliveries unacknowledged
                // again, under their original tags.
                for op in ops {
                    if let TxOp::Ack(items) | TxOp::Nack { items, .. } = op {
                        c.shared.restored(shared_count(&items));
                        c.unacked.extend(items);
                    }
                }
                ok!(self, ch, tx, RollbackOk, tx::RollbackOk {});
            }
            _ => {
                return Err(AmqpError::new(
                    reply::COMMAND_INVALID,
                    "server-only tx method",
                ));
            }
        }
        Ok(())
    }

    // ----- events from queues ---------------------------------------------

    pub(super) fn on_event(&mut self, ch: u16, ev: ChannelEvent) {
        let Some(c) = self.channels.get_mut(&ch) else {
            // The channel is gone; the queue learns it from the failed
            // sends that follow and takes its deliveries back.
            return;
        };
        match ev {
            ChannelEvent::Deliver {
                queue,
                tag,
                id,
                msg,
                redelivered,
            } => {
                let d = Delivery {
                    queue,
                    tag,
                    id,
                    msg,
                    redelivered,
                };
                let Some(info) = c.consumers.get(&d.tag).filter(|_| !c.closing) else {
                    // Cancelled meanwhile: the message goes back.
                    return_to_queue(&self.node, &self.vhost, c.owner, vec![d]);
                    return;
                };
                let tracking = if info.no_ack {
                    Tracking::NoAck
                } else {
                    Tracking::Unacked {
                        shared: info.shared,
                    }
                };
                let d = if info.shared {
                    // Counted now, or held until acks make room.
                    match c.shared.admit(d) {
                        Some(d) => d,
                        None => return,
                    }
                } else {
                    d
                };
                write_delivery(
                    &mut self.out,
                    &self.node,
                    self.frame_max,
                    ch,
                    c,
                    d,
                    tracking,
                );
            }
            ChannelEvent::Confirm { seq, accepted } => {
                if let Some(cf) = c.confirms.as_mut() {
                    cf.answer(seq, accepted);
                }
            }
            ev @ (ChannelEvent::QueueDeleted { .. } | ChannelEvent::ConsumerCancelled { .. }) => {
                // The queue cancelled one consumer, or was deleted (then
                // every consumer of it on this channel is cancelled).
                let tags: Vec<Arc<str>> = match ev {
                    ChannelEvent::QueueDeleted { vhost, queue } if *vhost == *self.vhost => c
                        .consumers
                        .iter()
                        .filter(|(_, info)| info.queue == queue)
                        .map(|(t, _)| t.clone())
                        .collect(),
                    ChannelEvent::ConsumerCancelled { tag } => vec![tag],
                    _ => Vec::new(),
                };
                for tag in tags {
                    // What the shared limit held back for it is no longer
                    // ours: the queue was deleted, or took back everything
                    // this channel had before it cancelled the consumer.
                    c.shared.take_consumer(&tag);
                    if c.consumers.remove(&tag).is_some()
                        && self.caps.consumer_cancel_notify
                        && !c.closing
                    {
                        ok!(
                            self,
                            ch,
                            basic,
                            Cancel,
                            basic::Cancel {
                                consumer_tag: ShortString::from(&*tag),
                                nowait: true
                            }
                        );
                    }
                }
            }
            ChannelEvent::DirectReply { msg } => {
                if let Some(tag) = c.reply_consumer.clone().filter(|_| !c.closing) {
                    let dtag = c.next_tag;
                    c.next_tag += 1;
                    self.out.deliver(ch, &tag, dtag, false, &msg);
                    self.out.content(ch, &msg, self.frame_max);
                }
            }
        }
    }

    /// Sends the confirms that became ready.
    pub(super) fn flush_confirms(&mut self) {
        for (ch, c) in self.channels.iter_mut() {
            if let Some(cf) = c.confirms.as_mut() {
                for (tag, multiple, ack) in cf.flush() {
                    self.out.confirm(*ch, tag, multiple, ack);
                    self.node.metrics.confirmed.inc();
                }
            }
        }
    }

    // ----- shared prefetch (basic.qos global) -------------------------------

    /// Sets the channel's global prefetch and tells the queues of its
    /// consumers of classic queues their new limit. Call
    /// [`send_released`](Self::send_released) afterwards.
    async fn set_global_prefetch(&mut self, c: &mut Channel, limit: u16) {
        c.shared.set_limit(limit);
        for (tag, info) in c.consumers.iter_mut().filter(|(_, i)| i.shared) {
            let want = queue_limit(info.prefetch, limit);
            if want == info.queue_limit {
                continue;
            }
            info.queue_limit = want;
            if let Some(h) = self.node.queue(&self.vhost, &info.queue) {
                let _ = h
                    .send(Request::Apply(
                        Command::SetPrefetch {
                            owner: c.owner,
                            tag: tag.clone(),
                            prefetch: want,
                        },
                        None,
                    ))
                    .await;
            }
        }
    }

    /// Sends the deliveries the shared limit now has room for.
    fn send_released(&mut self, ch: u16, c: &mut Channel) {
        for d in c.shared.release() {
            let tracking = Tracking::Unacked { shared: true };
            write_delivery(
                &mut self.out,
                &self.node,
                self.frame_max,
                ch,
                c,
                d,
                tracking,
            );
        }
    }

    // ----- closing ---------------------------------------------------------

    /// Cancels the channel's consumers and returns its unacknowledged
    /// messages to their queues.
    async fn release_channel(&mut self, c: &mut Channel) {
        c.content = None;
        c.consumers.clear();
        c.unacked.clear();
        c.shared.clear();
        c.reply_consumer = None;
        let owner = c.owner;
        for q in std::mem::take(&mut c.queues_used) {
            if let Some(h) = self.node.queue(&self.vhost, &q) {
                let _ = h
                    .send(Request::Apply(
                        Command::OwnerDown {
                            owner,
                            now_ms: now_ms(),
                        },
                        None,
                    ))
                    .await;
            }
        }
    }

    fn forget_channel(&mut self, c: Channel) {
        self.node.unregister_owner(c.owner);
        self.node.metrics.channels_closed.inc();
        self.node.metrics.channels.dec();
    }

    /// Releases and forgets channel `ch` (connection teardown).
    pub(super) async fn close_channel_state(&mut self, ch: u16) {
        if let Some(mut c) = self.channels.remove(&ch) {
            self.release_channel(&mut c).await;
            self.forget_channel(c);
        }
    }
}

/// What the channel keeps of a delivery it sends.
#[derive(Clone, Copy)]
enum Tracking {
    /// Nothing: a `no_ack` consumer's delivery is settled once sent.
    NoAck,
    /// Unacknowledged until settled; `shared` when the shared prefetch
    /// limit counted it.
    Unacked { shared: bool },
}

/// Writes a delivery to the client under the channel's next delivery tag.
fn write_delivery(
    out: &mut OutBuf,
    node: &Node,
    frame_max: u32,
    ch: u16,
    c: &mut Channel,
    d: Delivery,
    tracking: Tracking,
) {
    let dtag = c.next_tag;
    c.next_tag += 1;
    out.deliver(ch, &d.tag, dtag, d.redelivered, &d.msg);
    out.content(ch, &d.msg, frame_max);
    node.metrics.delivered.inc();
    if let Tracking::Unacked { shared } = tracking {
        c.unacked.insert(
            dtag,
            Unacked {
                queue: d.queue,
                id: d.id,
                shared,
            },
        );
    }
}

/// Gives deliveries that never reached the client back to their queues at
/// once, without waiting for room in an inbox (the caller may be the
/// connection's event loop, and a queue's credit must not leak).
fn return_to_queue(node: &Node, vhost: &str, owner: OwnerId, ds: Vec<Delivery>) {
    let mut by_queue: BTreeMap<Arc<str>, Vec<MsgId>> = BTreeMap::new();
    for d in ds {
        by_queue.entry(d.queue).or_default().push(d.id);
    }
    for (queue, ids) in by_queue {
        let Some(h) = node.queue(vhost, &queue) else {
            continue;
        };
        let ret = Request::Apply(
            Command::Return {
                owner,
                ids,
                now_ms: now_ms(),
            },
            None,
        );
        if let Err(req) = h.try_send(ret) {
            tokio::spawn(async move { h.send(*req).await });
        }
    }
}

/// How many of these deliveries count toward the shared prefetch limit.
fn shared_count(items: &[(u64, Unacked)]) -> u32 {
    items.iter().filter(|(_, u)| u.shared).count() as u32
}

/// A binding as a definition command names it.
fn binding(
    source: &ShortString,
    destination: Destination,
    routing_key: &ShortString,
    arguments: FieldTable,
) -> BindingDef {
    BindingDef {
        source: source.as_str().to_owned(),
        destination,
        routing_key: routing_key.as_str().to_owned(),
        arguments,
    }
}

#[derive(Clone, Copy)]
enum Settle {
    Ack,
    Return,
    Discard,
}

/// Removes the deliveries an ack/nack names: one tag, or with `multiple`
/// every tag up to it (0 meaning all), and makes room for them under the
/// shared prefetch limit. An unknown tag is a channel error.
fn take_tags(c: &mut Channel, tag: u64, multiple: bool) -> Result<Vec<(u64, Unacked)>, AmqpError> {
    let items = take_unacked(c, tag, multiple)?;
    c.shared.settled(shared_count(&items));
    Ok(items)
}

fn take_unacked(
    c: &mut Channel,
    tag: u64,
    multiple: bool,
) -> Result<Vec<(u64, Unacked)>, AmqpError> {
    if multiple {
        let items: Vec<(u64, Unacked)> = if tag == 0 {
            std::mem::take(&mut c.unacked).into_iter().collect()
        } else {
            let rest = c.unacked.split_off(&(tag + 1));
            std::mem::replace(&mut c.unacked, rest)
                .into_iter()
                .collect()
        };
        if items.is_empty() && tag != 0 {
            return Err(AmqpError::new(
                reply::PRECONDITION_FAILED,
                format!("unknown delivery tag {tag}"),
            ));
        }
        return Ok(items);
    }
    c.unacked
        .remove(&tag)
        .map(|u| vec![(tag, u)])
        .ok_or_else(|| {
            AmqpError::new(
                reply::PRECONDITION_FAILED,
                format!("unknown delivery tag {tag}"),
            )
        })
}
