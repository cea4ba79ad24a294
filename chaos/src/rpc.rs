//! The RPC client of the workload, shaped like oslo.messaging's and kombu's:
//! it declares an exclusive, auto-delete, server-named reply queue on the
//! node it is connected to (a node-local queue), sends each request to the
//! quorum queue `chaos-rpc` with `reply_to` and a correlation id, and waits
//! for the reply with a timeout. The server is a consumer with the
//! `RpcServer` role (`workload.rs`) on another node, so every reply is
//! forwarded to the client's node.
//!
//! Replies may be lost while faults are on (a node-local queue dies with
//! its node; a cut link drops a forwarded reply): a call then times out and
//! the client carries on, as a real one would. What the checker demands is
//! that calls succeed again once the cluster has healed.

use crate::history::{Event, Recorder};
use crate::network::NodeId;
use crate::workload::{self, Endpoints, METHOD_TIMEOUT, RETRY_PAUSE, stopped};
use futures_lite::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::time::timeout;

/// How long a call waits for its reply (oslo.messaging's default is 60 s;
/// shorter here so that a lost reply costs the run little).
pub const RPC_TIMEOUT: Duration = Duration::from_secs(5);

/// The client's settings.
#[derive(Clone, Debug)]
pub struct RpcClientConfig {
    /// The server's request queue.
    pub queue: String,
    /// Calls per second when every call is answered at once; calls are
    /// sequential, one outstanding at a time.
    pub rate: u32,
    /// Index of the first node to try; later attempts move on.
    pub first_node: usize,
    /// Hard cap on calls, whatever the duration.
    pub max_calls: u64,
}

/// Calls until `stop`, reconnecting (with a new reply queue) to the next
/// node whenever its connection or reply subscription fails. A call in
/// progress when `stop` comes is waited for, so the last call recorded has
/// its outcome.
pub async fn client(
    cfg: RpcClientConfig,
    endpoints: Endpoints,
    rec: Recorder,
    stop: watch::Receiver<bool>,
) {
    assert!(cfg.rate > 0, "a client calls");
    let mut calls = 0u64;
    let mut attempt = cfg.first_node;
    while !stopped(&stop) && calls < cfg.max_calls {
        let (node, uri) = endpoints[attempt % endpoints.len()].clone();
        attempt += 1;
        let Some((conn, ch)) = workload::connect(&uri, "chaos-rpc-client").await else {
            tokio::time::sleep(RETRY_PAUSE).await;
            continue;
        };
        session(&cfg, &ch, node, &mut calls, &rec, &stop).await;
        workload::close(conn).await;
    }
}

/// What became of one call.
enum Wait {
    Answered,
    TimedOut,
    /// The reply subscription ended (connection lost, consumer cancelled).
    Closed,
}

/// One connection: a fresh reply queue, then calls until a failure.
async fn session(
    cfg: &RpcClientConfig,
    ch: &Channel,
    node: NodeId,
    calls: &mut u64,
    rec: &Recorder,
    stop: &watch::Receiver<bool>,
) {
    let declared = timeout(
        METHOD_TIMEOUT,
        ch.queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await;
    let Ok(Ok(queue)) = declared else {
        tokio::time::sleep(RETRY_PAUSE).await;
        return;
    };
    let reply_queue = queue.name().clone();
    let subscribed = timeout(
        METHOD_TIMEOUT,
        ch.basic_consume(
            reply_queue.clone(),
            "chaos-rpc-reply".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await;
    let Ok(Ok(mut replies)) = subscribed else {
        tokio::time::sleep(RETRY_PAUSE).await;
        return;
    };
    let period = Duration::from_secs_f64(1.0 / f64::from(cfg.rate));
    while !stopped(stop) && *calls < cfg.max_calls {
        let started = Instant::now();
        let id = format!("rpc-{calls}");
        *calls += 1;
        rec.record(Event::RpcRequest {
            t: rec.now(),
            id: id.clone(),
            node,
            reply_queue: reply_queue.as_str().to_owned(),
        });
        // Like oslo.messaging, the request expires when the caller gives
        // up, so a server that comes back does not answer stale calls.
        let props = BasicProperties::default()
            .with_reply_to(reply_queue.clone())
            .with_correlation_id(ShortString::from(id.clone()))
            .with_expiration(ShortString::from(RPC_TIMEOUT.as_millis().to_string()));
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
        if !matches!(sent, Ok(Ok(_))) {
            unanswered(rec, id, "the request could not be sent");
            return;
        }
        let deadline = tokio::time::Instant::now() + RPC_TIMEOUT;
        let wait = loop {
            match tokio::time::timeout_at(deadline, replies.next()).await {
                Err(_) => break Wait::TimedOut,
                Ok(Some(Ok(d))) => {
                    let matches = d
                        .properties
                        .correlation_id()
                        .as_ref()
                        .is_some_and(|c| c.as_str() == id);
                    // Anything else is a late reply to an earlier call.
                    if matches {
                        break Wait::Answered;
                    }
                }
                Ok(Some(Err(_)) | None) => break Wait::Closed,
            }
        };
        match wait {
            Wait::Answered => rec.record(Event::RpcReply { t: rec.now(), id }),
            Wait::TimedOut => {
                unanswered(rec, id, &format!("no reply within {RPC_TIMEOUT:?}"));
            }
            Wait::Closed => {
                unanswered(rec, id, "the reply subscription ended");
                return;
            }
        }
        tokio::time::sleep(period.saturating_sub(started.elapsed())).await;
    }
}

fn unanswered(rec: &Recorder, id: String, why: &str) {
    rec.record(Event::RpcUnanswered {
        t: rec.now(),
        id,
        why: why.to_owned(),
    });
}
