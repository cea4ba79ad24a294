//! The checked workload: publishers with confirms and consumers with manual
//! acks, spread over every node, each reconnecting to another node when its
//! own fails, recording everything in the history.
//!
//! Publishers record each attempt before sending it and its outcome after
//! (ack, nack, or unknown when the connection died or the confirm did not
//! come within [`CONFIRM_TIMEOUT`]). Consumers record every delivery with its
//! `redelivered` flag before settling it: an ack, or a reject without
//! requeue on the dead-letter source. The RPC server is a consumer too: it
//! publishes a reply to each request's `reply_to` and acks the request
//! (the RPC client is in `rpc.rs`). Every wait has a deadline and every loop
//! checks the stop signal, so a stalled broker cannot hang the run.

use crate::history::{Event, Outcome, Recorder, message_id};
use crate::network::NodeId;
use futures_lite::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, BasicRejectOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::time::timeout;

/// Time allowed to open a connection and a channel.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Warren nacks a publish it cannot replicate within 10 s; past this the
/// outcome is unknown.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(15);
/// Time allowed for one AMQP method (declare, consume, qos, ack).
pub const METHOD_TIMEOUT: Duration = Duration::from_secs(12);
/// Pause between connection attempts.
pub const RETRY_PAUSE: Duration = Duration::from_millis(250);
/// A consumer with nothing to do for this long checks that its node still
/// answers (a paused node does not close the connection).
const IDLE_PROBE: Duration = Duration::from_secs(4);
/// Unacknowledged messages per consumer.
const PREFETCH: u16 = 32;

/// Whether the run said stop (or went away without saying).
pub fn stopped(stop: &watch::Receiver<bool>) -> bool {
    *stop.borrow() || stop.has_changed().is_err()
}

/// Where clients connect: one entry per node.
pub type Endpoints = Arc<Vec<(NodeId, String)>>;

/// Live totals for progress lines and the drain.
#[derive(Default)]
pub struct Counters {
    pub attempted: AtomicU64,
    pub acked: AtomicU64,
    pub delivered: AtomicU64,
    /// Run time (ms) of the latest delivery.
    pub last_delivery: AtomicU64,
}

pub async fn connect(uri: &str, name: &str) -> Option<(Connection, Channel)> {
    let props = ConnectionProperties::default().with_connection_name(name.to_owned().into());
    let conn = timeout(CONNECT_TIMEOUT, Connection::connect(uri, props))
        .await
        .ok()?
        .ok()?;
    let ch = match timeout(CONNECT_TIMEOUT, conn.create_channel()).await {
        Ok(Ok(ch)) => ch,
        _ => {
            close(conn).await;
            return None;
        }
    };
    Some((conn, ch))
}

/// Closes a connection without waiting long for a broker that may be gone.
pub async fn close(conn: Connection) {
    let _ = timeout(Duration::from_secs(2), conn.close(200, "bye".into())).await;
}

/// One publisher's settings.
#[derive(Clone, Debug)]
pub struct PublisherConfig {
    pub id: u32,
    pub queue: String,
    /// Index of the first node to try; later attempts move on.
    pub first_node: usize,
    /// Messages per second when the broker keeps up.
    pub rate: u32,
    /// Publishes sent before waiting for their confirms.
    pub batch: usize,
    /// Hard cap on messages, whatever the duration.
    pub max_messages: u64,
}

/// Publishes until `stop`, reconnecting to the next node whenever a
/// connection fails or a publish is nacked (the node may be on the minority
/// side: a real client would try elsewhere).
pub async fn publisher(
    cfg: PublisherConfig,
    endpoints: Endpoints,
    rec: Recorder,
    counters: Arc<Counters>,
    stop: watch::Receiver<bool>,
) {
    assert!(cfg.batch > 0 && cfg.rate > 0, "a publisher publishes");
    let batch_period = Duration::from_secs_f64(cfg.batch as f64 / f64::from(cfg.rate));
    let mut seq = 0u64;
    let mut attempt = cfg.first_node;
    let name = format!("chaos-publisher-{}", cfg.id);
    while !stopped(&stop) && seq < cfg.max_messages {
        let (node, uri) = endpoints[attempt % endpoints.len()].clone();
        attempt += 1;
        let Some((conn, ch)) = connect(&uri, &name).await else {
            tokio::time::sleep(RETRY_PAUSE).await;
            continue;
        };
        if !matches!(
            timeout(
                METHOD_TIMEOUT,
                ch.confirm_select(ConfirmSelectOptions::default())
            )
            .await,
            Ok(Ok(()))
        ) {
            close(conn).await;
            continue;
        }
        while !stopped(&stop) && seq < cfg.max_messages {
            let started = Instant::now();
            let healthy = publish_batch(&cfg, &ch, node, &mut seq, &rec, &counters).await;
            if !healthy {
                break;
            }
            let pause = batch_period.saturating_sub(started.elapsed());
            tokio::time::sleep(pause).await;
        }
        close(conn).await;
    }
}

/// Sends one batch and waits for its confirms. Returns false when the
/// connection should be abandoned.
async fn publish_batch(
    cfg: &PublisherConfig,
    ch: &Channel,
    node: NodeId,
    seq: &mut u64,
    rec: &Recorder,
    counters: &Counters,
) -> bool {
    let mut pending = Vec::with_capacity(cfg.batch);
    let mut healthy = true;
    for _ in 0..cfg.batch {
        if *seq >= cfg.max_messages {
            break;
        }
        let id = message_id(cfg.id, *seq);
        rec.record(Event::Publish {
            t: rec.now(),
            publisher: cfg.id,
            seq: *seq,
            queue: cfg.queue.clone(),
            id: id.clone(),
            node,
        });
        *seq += 1;
        counters.attempted.fetch_add(1, Ordering::Relaxed);
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(ShortString::from(id.clone()));
        let sent = timeout(
            METHOD_TIMEOUT,
            ch.basic_publish(
                "".into(),
                cfg.queue.as_str().into(),
                BasicPublishOptions::default(),
                id.as_bytes(),
                props,
            ),
        )
        .await;
        match sent {
            Ok(Ok(confirm)) => pending.push((id, confirm)),
            _ => {
                record_outcome(rec, id, Outcome::Unknown);
                healthy = false;
                break;
            }
        }
    }
    let deadline = tokio::time::Instant::now() + CONFIRM_TIMEOUT;
    for (id, confirm) in pending {
        let outcome = match tokio::time::timeout_at(deadline, confirm).await {
            Ok(Ok(c)) if c.is_ack() => Outcome::Ack,
            Ok(Ok(_)) => {
                healthy = false;
                Outcome::Nack
            }
            _ => {
                healthy = false;
                Outcome::Unknown
            }
        };
        if outcome == Outcome::Ack {
            counters.acked.fetch_add(1, Ordering::Relaxed);
        }
        record_outcome(rec, id, outcome);
    }
    healthy
}

fn record_outcome(rec: &Recorder, id: String, outcome: Outcome) {
    rec.record(Event::Outcome {
        t: rec.now(),
        id,
        outcome,
    });
}

/// What a consumer does with each delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Records it and acks it.
    Ack,
    /// Records it and rejects it without requeue, so it is dead-lettered.
    Reject,
    /// Answers the RPC request: publishes a reply to its `reply_to` with
    /// its correlation id, records that, and acks the request.
    RpcServer,
}

/// One consumer's settings.
#[derive(Clone, Debug)]
pub struct ConsumerConfig {
    pub name: String,
    pub queue: String,
    /// Index of the first node to try; later attempts move on.
    pub first_node: usize,
    pub role: Role,
}

/// Consumes and acks until `stop`, reconnecting to the next node whenever
/// the connection fails or the node stops answering.
pub async fn consumer(
    cfg: ConsumerConfig,
    endpoints: Endpoints,
    rec: Recorder,
    counters: Arc<Counters>,
    mut stop: watch::Receiver<bool>,
) {
    let mut attempt = cfg.first_node;
    let mut session = 0u32;
    while !stopped(&stop) {
        let (node, uri) = endpoints[attempt % endpoints.len()].clone();
        attempt += 1;
        let Some((conn, ch)) = connect(&uri, &cfg.name).await else {
            tokio::time::sleep(RETRY_PAUSE).await;
            continue;
        };
        session += 1;
        consume_session(&cfg, &ch, node, session, &rec, &counters, &mut stop).await;
        close(conn).await;
    }
}

/// One subscription, until it fails or `stop`.
async fn consume_session(
    cfg: &ConsumerConfig,
    ch: &Channel,
    node: NodeId,
    session: u32,
    rec: &Recorder,
    counters: &Counters,
    stop: &mut watch::Receiver<bool>,
) {
    if !matches!(
        timeout(
            METHOD_TIMEOUT,
            ch.basic_qos(PREFETCH, BasicQosOptions::default())
        )
        .await,
        Ok(Ok(()))
    ) {
        return;
    }
    let subscribed = timeout(
        METHOD_TIMEOUT,
        ch.basic_consume(
            cfg.queue.as_str().into(),
            cfg.name.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    let Ok(Ok(mut deliveries)) = subscribed else {
        tokio::time::sleep(RETRY_PAUSE).await;
        return;
    };
    let mut last_heard = Instant::now();
    loop {
        let next = tokio::select! {
            n = timeout(Duration::from_secs(1), deliveries.next()) => n,
            _ = stop.changed() => return,
        };
        if stopped(stop) {
            return;
        }
        let d = match next {
            Ok(Some(Ok(d))) => d,
            Ok(Some(Err(_))) | Ok(None) => return,
            Err(_) => {
                if last_heard.elapsed() >= IDLE_PROBE {
                    // A frozen node keeps the socket open; ask it something.
                    let probe = timeout(
                        Duration::from_secs(3),
                        ch.queue_declare(
                            cfg.queue.as_str().into(),
                            QueueDeclareOptions {
                                passive: true,
                                ..Default::default()
                            },
                            FieldTable::default(),
                        ),
                    )
                    .await;
                    if !matches!(probe, Ok(Ok(_))) {
                        return;
                    }
                    last_heard = Instant::now();
                }
                continue;
            }
        };
        last_heard = Instant::now();
        if cfg.role == Role::RpcServer {
            if !serve_rpc(ch, &d, node, rec).await {
                return;
            }
            continue;
        }
        let id = d
            .properties
            .message_id()
            .as_ref()
            .map(|m| m.as_str().to_owned())
            .unwrap_or_else(|| format!("<no id, {} bytes>", d.data.len()));
        let t = rec.now();
        rec.record(Event::Delivery {
            t,
            consumer: cfg.name.clone(),
            session,
            queue: cfg.queue.clone(),
            id,
            redelivered: d.redelivered,
            node,
        });
        counters.delivered.fetch_add(1, Ordering::Relaxed);
        counters.last_delivery.fetch_max(t, Ordering::Relaxed);
        let settled = match cfg.role {
            Role::Reject => {
                timeout(
                    METHOD_TIMEOUT,
                    d.acker.reject(BasicRejectOptions { requeue: false }),
                )
                .await
            }
            Role::Ack | Role::RpcServer => {
                timeout(METHOD_TIMEOUT, d.acker.ack(BasicAckOptions::default())).await
            }
        };
        if !matches!(settled, Ok(Ok(_))) {
            return;
        }
    }
}

/// Answers one RPC request (default exchange, routing key `reply_to`, the
/// request's correlation id) and acks it. A reply queue that is gone (its
/// client's node restarted) swallows the reply, as in RabbitMQ. Returns
/// false when the channel failed.
async fn serve_rpc(ch: &Channel, d: &Delivery, node: NodeId, rec: &Recorder) -> bool {
    let correlation = d.properties.correlation_id().clone();
    if let Some(reply_to) = d.properties.reply_to() {
        let mut props = BasicProperties::default();
        if let Some(c) = &correlation {
            props = props.with_correlation_id(c.clone());
        }
        let sent = timeout(
            METHOD_TIMEOUT,
            ch.basic_publish(
                "".into(),
                reply_to.clone(),
                BasicPublishOptions::default(),
                &d.data,
                props,
            ),
        )
        .await;
        if !matches!(sent, Ok(Ok(_))) {
            return false;
        }
        rec.record(Event::RpcServed {
            t: rec.now(),
            id: correlation
                .map(|c| c.as_str().to_owned())
                .unwrap_or_default(),
            node,
        });
    }
    let acked = timeout(METHOD_TIMEOUT, d.acker.ack(BasicAckOptions::default())).await;
    matches!(acked, Ok(Ok(_)))
}
