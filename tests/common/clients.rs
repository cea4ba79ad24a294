//! lapin helpers shared by the cluster tests: connecting with a deadline,
//! quorum queues, publishing with confirms and consuming until every
//! expected message id has arrived. Every message carries its id in
//! `message_id`, so a test compares what the broker confirmed with what
//! consumers received.

use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub async fn connect(uri: &str) -> Connection {
    tokio::time::timeout(
        Duration::from_secs(20),
        Connection::connect(uri, ConnectionProperties::default()),
    )
    .await
    .expect("connect within 20 s")
    .expect("lapin connects")
}

pub fn quorum_args() -> FieldTable {
    let mut t = FieldTable::default();
    t.insert(
        ShortString::from("x-queue-type"),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    t
}

pub async fn declare(ch: &Channel, name: &str) {
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        quorum_args(),
    )
    .await
    .expect("queue.declare");
}

pub fn props(id: u64) -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(ShortString::from(id.to_string()))
}

/// Publishes ids `from..to` with confirms, `window` at a time; returns the
/// ids the broker acked. Stops at the first failure (the caller decides
/// what an error means).
pub async fn publish_confirmed(
    ch: &Channel,
    queue: &str,
    ids: std::ops::Range<u64>,
    window: usize,
) -> Result<Vec<u64>, lapin::Error> {
    let mut acked = Vec::new();
    let ids: Vec<u64> = ids.collect();
    for chunk in ids.chunks(window) {
        let mut pending = Vec::with_capacity(chunk.len());
        for &id in chunk {
            let c = ch
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    format!("body-{id}").as_bytes(),
                    props(id),
                )
                .await?;
            pending.push((id, c));
        }
        for (id, c) in pending {
            if c.await?.is_ack() {
                acked.push(id);
            }
        }
    }
    Ok(acked)
}

/// What a consumer saw: each id with how often it came, and whether every
/// repeat carried `redelivered`.
#[derive(Default)]
pub struct Seen {
    pub count: BTreeMap<u64, u32>,
    pub unmarked_repeats: Vec<u64>,
}

/// A connection and a channel on `uri`, or None (after a short pause, so
/// that a caller retrying in a loop does not spin) when the node does not
/// answer within 5 s.
pub async fn try_open(uri: &str) -> Option<(Connection, Channel)> {
    let conn = tokio::time::timeout(
        Duration::from_secs(5),
        Connection::connect(uri, ConnectionProperties::default()),
    )
    .await;
    let Ok(Ok(conn)) = conn else {
        tokio::time::sleep(Duration::from_millis(200)).await;
        return None;
    };
    let ch = conn.create_channel().await.ok()?;
    Some((conn, ch))
}

/// Consumes from `queue` on `uri`, acking, until `want` ids are all seen or
/// `within` passes; reconnects on failure.
pub async fn consume_until(
    uris: Vec<String>,
    queue: String,
    want: BTreeSet<u64>,
    within: Duration,
    seen: Arc<Mutex<Seen>>,
) {
    let deadline = Instant::now() + within;
    let mut attempt = 0usize;
    while Instant::now() < deadline {
        let uri = &uris[attempt % uris.len()];
        attempt += 1;
        let Some((conn, ch)) = try_open(uri).await else {
            continue;
        };
        if ch.basic_qos(256, BasicQosOptions::default()).await.is_err() {
            continue;
        }
        let Ok(mut consumer) = ch
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
        else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        loop {
            if want
                .iter()
                .all(|id| seen.lock().unwrap().count.contains_key(id))
            {
                let _ = conn.close(200, "done".into()).await;
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let next =
                tokio::time::timeout(left.min(Duration::from_secs(2)), consumer.next()).await;
            let d = match next {
                Ok(Some(Ok(d))) => d,
                Ok(_) => break,
                Err(_) if Instant::now() >= deadline => return,
                Err(_) => continue,
            };
            let id: u64 = d
                .properties
                .message_id()
                .as_ref()
                .and_then(|m| m.as_str().parse().ok())
                .expect("every message carries its id");
            {
                let mut s = seen.lock().unwrap();
                let n = s.count.entry(id).or_insert(0);
                *n += 1;
                if *n > 1 && !d.redelivered {
                    s.unmarked_repeats.push(id);
                }
            }
            if d.acker.ack(BasicAckOptions::default()).await.is_err() {
                break;
            }
        }
    }
}

/// Every confirmed id was delivered at least once.
pub fn assert_none_lost(seen: &Seen, confirmed: &BTreeSet<u64>) {
    let missing: Vec<u64> = confirmed
        .iter()
        .filter(|id| !seen.count.contains_key(id))
        .copied()
        .collect();
    assert!(
        missing.is_empty(),
        "{} confirmed messages lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
}

pub async fn get_body(ch: &Channel, queue: &str) -> Option<Vec<u8>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Some(m) = ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get")
        {
            return Some(m.delivery.data.clone());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

pub async fn publish_to_exchange(uri: &str, exchange: &str, key: &str, body: &[u8]) {
    let conn = connect(uri).await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let confirm = ch
        .basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            body,
            props(0),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack());
    let _ = conn.close(200, "bye".into()).await;
}
