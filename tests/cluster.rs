//! Real `warren` processes on loopback, killed with SIGKILL and restarted:
//! confirmed messages survive crashes, leader loss and a simultaneous
//! restart of every node, and definitions made on one node route on the
//! others.
//!
//! Every message carries its id in `message_id`; the tests compare the ids
//! the broker confirmed with the ids consumers received.

mod common;

use common::cluster::Cluster;
use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

async fn connect(uri: &str) -> Connection {
    tokio::time::timeout(
        Duration::from_secs(20),
        Connection::connect(uri, ConnectionProperties::default()),
    )
    .await
    .expect("connect within 20 s")
    .expect("lapin connects")
}

fn quorum_args() -> FieldTable {
    let mut t = FieldTable::default();
    t.insert(
        ShortString::from("x-queue-type"),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    t
}

async fn declare(ch: &Channel, name: &str) {
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

fn props(id: u64) -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(ShortString::from(id.to_string()))
}

/// Publishes ids `from..to` with confirms, `window` at a time; returns the
/// ids the broker acked. Stops at the first failure (the caller decides
/// what an error means).
async fn publish_confirmed(
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
struct Seen {
    count: BTreeMap<u64, u32>,
    unmarked_repeats: Vec<u64>,
}

/// Consumes from `queue` on `uri`, acking, until `want` ids are all seen or
/// `within` passes; reconnects on failure.
async fn consume_until(
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
        let Ok(Ok(conn)) = tokio::time::timeout(
            Duration::from_secs(5),
            Connection::connect(uri, ConnectionProperties::default()),
        )
        .await
        else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let Ok(ch) = conn.create_channel().await else {
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
fn assert_none_lost(seen: &Seen, confirmed: &BTreeSet<u64>) {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_keeps_ten_thousand_confirmed_messages_through_kill_9() {
    let mut c = Cluster::start(1);
    let conn = connect(&c.uri(0)).await;
    let ch = conn.create_channel().await.unwrap();
    declare(&ch, "durable-q").await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let acked = publish_confirmed(&ch, "durable-q", 0..10_000, 256)
        .await
        .expect("publishing");
    assert_eq!(acked.len(), 10_000, "every publish confirmed");
    drop(ch);
    drop(conn);

    c.kill(0);
    c.spawn(0);
    c.wait_ready(0);

    let seen = Arc::new(Mutex::new(Seen::default()));
    let want: BTreeSet<u64> = acked.into_iter().collect();
    consume_until(
        vec![c.uri(0)],
        "durable-q".into(),
        want.clone(),
        Duration::from_secs(60),
        seen.clone(),
    )
    .await;
    let s = seen.lock().unwrap();
    assert_none_lost(&s, &want);
    assert!(
        s.count.keys().all(|id| want.contains(id)),
        "nothing unexpected"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_mid_stream_loses_no_confirmed_message() {
    let mut c = Cluster::start(3);
    let conn = connect(&c.uri(0)).await;
    let ch = conn.create_channel().await.unwrap();
    declare(&ch, "ha").await;
    drop(ch);
    drop(conn);
    let leader = c.wait_queue_leader("ha", Duration::from_secs(20)) as usize - 1;
    // Publisher and consumer on the two other nodes.
    let others: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    let (p, q) = (others[0], others[1]);

    let seen = Arc::new(Mutex::new(Seen::default()));
    let pub_conn = connect(&c.uri(p)).await;
    let pch = pub_conn.create_channel().await.unwrap();
    pch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();

    // Phase 1: 2,000 confirmed while a consumer on the third node drains.
    let mut confirmed: BTreeSet<u64> = publish_confirmed(&pch, "ha", 0..2_000, 128)
        .await
        .expect("publishing before the crash")
        .into_iter()
        .collect();
    assert_eq!(confirmed.len(), 2_000);
    let consumer = tokio::spawn(consume_until(
        vec![c.uri(q)],
        "ha".into(),
        BTreeSet::new(),
        Duration::from_secs(3),
        seen.clone(),
    ));
    let _ = consumer.await;

    // Phase 2: kill the leader; publishing must resume within 5 s.
    c.kill(leader);
    let killed_at = Instant::now();
    let mut next_id = 2_000u64;
    let mut resumed = None;
    while killed_at.elapsed() < Duration::from_secs(30) {
        let batch = next_id..next_id + 50;
        next_id += 50;
        match publish_confirmed(&pch, "ha", batch, 50).await {
            Ok(acked) if !acked.is_empty() => {
                confirmed.extend(acked);
                resumed.get_or_insert(killed_at.elapsed());
                if confirmed.len() >= 4_000 {
                    break;
                }
            }
            Ok(_) => {}
            Err(e) => panic!("the publisher's channel failed: {e}"),
        }
    }
    let resumed = resumed.expect("publishing resumed on the survivors");
    assert!(
        resumed < Duration::from_secs(5),
        "publishing resumed after {resumed:?}"
    );

    // Everything confirmed is delivered, on the consumer's node.
    consume_until(
        vec![c.uri(q)],
        "ha".into(),
        confirmed.clone(),
        Duration::from_secs(60),
        seen.clone(),
    )
    .await;
    let s = seen.lock().unwrap();
    assert_none_lost(&s, &confirmed);
    assert!(
        s.count.keys().all(|id| *id < next_id),
        "nothing that was never published"
    );
    assert!(
        s.unmarked_repeats.is_empty(),
        "repeats not marked redelivered: {:?}",
        &s.unmarked_repeats[..s.unmarked_repeats.len().min(10)]
    );
    drop(s);

    // The new leader says so in its metrics, with a term past the first.
    let new_leader = c.wait_queue_leader("ha", Duration::from_secs(10)) as usize - 1;
    assert_ne!(new_leader, leader);
    let (status, metrics) = c.http(new_leader, "GET", "/metrics");
    assert_eq!(status, 200);
    let line = |name: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(name) && l.contains("queue=\"ha\""))
            .map(|l| l.rsplit(' ').next().unwrap_or("").to_owned())
    };
    assert_eq!(
        line("warren_raft_leader").as_deref(),
        Some("1"),
        "{metrics}"
    );
    let term: u64 = line("rabbitmq_raft_term_total")
        .and_then(|t| t.parse().ok())
        .expect("a term");
    assert!(term > 1, "a new term after the election, got {term}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simultaneous_restart_of_every_node_keeps_every_queue() {
    let mut c = Cluster::start(3);
    let conn = connect(&c.uri(0)).await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let queues = ["sr-a", "sr-b", "sr-c"];
    let mut confirmed: BTreeMap<&str, BTreeSet<u64>> = BTreeMap::new();
    for (i, q) in queues.iter().enumerate() {
        declare(&ch, q).await;
        let base = i as u64 * 1_000;
        let acked = publish_confirmed(&ch, q, base..base + 300, 100)
            .await
            .expect("publishing");
        assert_eq!(acked.len(), 300);
        confirmed.insert(q, acked.into_iter().collect());
    }
    drop(ch);
    drop(conn);

    for i in 0..3 {
        c.kill(i);
    }
    // All three at the same instant, as after a power cut.
    for i in 0..3 {
        c.spawn(i);
    }
    for i in 0..3 {
        c.wait_ready(i);
    }
    for q in queues {
        c.wait_queue_leader(q, Duration::from_secs(30));
    }
    for (i, q) in queues.iter().enumerate() {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let want = confirmed[q].clone();
        consume_until(
            vec![c.uri(i)],
            q.to_string(),
            want.clone(),
            Duration::from_secs(30),
            seen.clone(),
        )
        .await;
        let s = seen.lock().unwrap();
        assert_none_lost(&s, &want);
    }
}

async fn get_body(ch: &Channel, queue: &str) -> Option<Vec<u8>> {
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

async fn publish_to_exchange(uri: &str, exchange: &str, key: &str, body: &[u8]) {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bindings_made_on_one_node_route_on_another_before_and_after_a_restart() {
    let mut c = Cluster::start(3);
    {
        let conn = connect(&c.uri(0)).await;
        let ch = conn.create_channel().await.unwrap();
        ch.exchange_declare(
            "orders".into(),
            lapin::ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
        declare(&ch, "eu-orders").await;
        ch.queue_bind(
            "eu-orders".into(),
            "orders".into(),
            "eu.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        let _ = conn.close(200, "bye".into()).await;
    }
    publish_to_exchange(&c.uri(1), "orders", "eu.fr.paris", b"first").await;
    publish_to_exchange(&c.uri(1), "orders", "us.ny", b"unrouted").await;
    {
        let conn = connect(&c.uri(2)).await;
        let ch = conn.create_channel().await.unwrap();
        assert_eq!(
            get_body(&ch, "eu-orders").await.as_deref(),
            Some(&b"first"[..])
        );
        let _ = conn.close(200, "bye".into()).await;
    }

    for i in 0..3 {
        c.kill(i);
        c.spawn(i);
    }
    for i in 0..3 {
        c.wait_ready(i);
    }
    publish_to_exchange(&c.uri(2), "orders", "eu.de", b"second").await;
    let conn = connect(&c.uri(1)).await;
    let ch = conn.create_channel().await.unwrap();
    assert_eq!(
        get_body(&ch, "eu-orders").await.as_deref(),
        Some(&b"second"[..])
    );
}
