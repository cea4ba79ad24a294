//! A 3-node cluster used the way users run it: hundreds of idle queues
//! beside the busy ones, clients on other nodes than the queues' leaders
//! and homes, dead letters and replies that cross nodes, dead-lettering at
//! least once through a killed leader. Each test here is a fault a single
//! node never shows.

mod common;

use common::clients::*;
use common::cluster::Cluster;
use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A connection to node `i` (from 0) and a channel on it.
async fn open(c: &Cluster, i: usize) -> (lapin::Connection, Channel) {
    let conn = connect(&c.uri(i)).await;
    let ch = conn.create_channel().await.unwrap();
    (conn, ch)
}

/// Declares `n` idle quorum queues, spread over the nodes' connections.
async fn idle_queues(c: &Cluster, n: usize) {
    for node in 0..3 {
        let (conn, ch) = open(c, node).await;
        for k in (node..n).step_by(3) {
            declare(&ch, &format!("idle-{k}")).await;
        }
        let _ = conn.close(200, "bye".into()).await;
    }
}

/// Lines at WARN or above that a node wrote since `from`.
fn warnings_since(c: &Cluster, i: usize, from: usize) -> Vec<String> {
    c.log(i)
        .into_iter()
        .skip(from)
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect()
}

/// Publishes ids from `ids` with confirms in windows of 100 through any
/// node, starting at `first` and moving on when a connection fails, until
/// `stop` is set; every acked id goes into `acked`.
async fn keep_publishing(
    uris: Vec<String>,
    queue: &'static str,
    mut ids: std::ops::Range<u64>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    acked: Arc<Mutex<BTreeSet<u64>>>,
) {
    let mut attempt = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) && !ids.is_empty() {
        let uri = &uris[attempt % uris.len()];
        attempt += 1;
        let Some((_conn, ch)) = try_open(uri).await else {
            continue;
        };
        if ch
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .is_err()
        {
            continue;
        }
        while !stop.load(std::sync::atomic::Ordering::Relaxed) && !ids.is_empty() {
            let from = ids.start;
            let to = (from + 100).min(ids.end);
            let window = tokio::time::timeout(
                Duration::from_secs(15),
                publish_confirmed(&ch, queue, from..to, 100),
            )
            .await;
            match window {
                Ok(Ok(got)) => {
                    acked.lock().unwrap().extend(got);
                    ids.start = to;
                }
                // The outcome of this window is unknown: its ids are not
                // reused, and not counted as confirmed.
                _ => {
                    ids.start = to;
                    break;
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_restart_with_hundreds_of_idle_queues_resumes_deliveries_at_once() {
    let mut c = Cluster::start(3);
    idle_queues(&c, 240).await;
    let (conn, ch) = open(&c, 0).await;
    declare(&ch, "work").await;
    // A deep backlog, as when consumers fell behind.
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let backlog = publish_confirmed(&ch, "work", 9_000_000..9_030_000, 1_000)
        .await
        .expect("the backlog");
    drop(ch);
    drop(conn);
    let uris: Vec<String> = (0..3).map(|i| c.uri(i)).collect();
    let rotated = |k: usize| -> Vec<String> { (0..3).map(|i| uris[(i + k) % 3].clone()).collect() };

    // Publishers and consumers on every node, running through the restart.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let publishers: Vec<_> = (0..3u64)
        .map(|k| {
            tokio::spawn(keep_publishing(
                rotated(k as usize),
                "work",
                k * 1_000_000..k * 1_000_000 + 20_000,
                stop.clone(),
                acked.clone(),
            ))
        })
        .collect();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let never: BTreeSet<u64> = [u64::MAX].into();
    let consumers: Vec<_> = (0..3)
        .map(|k| {
            tokio::spawn(consume_until(
                rotated(k + 1),
                "work".into(),
                never.clone(),
                Duration::from_secs(180),
                seen.clone(),
            ))
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.lock().unwrap().count.len() < 500 {
        assert!(
            Instant::now() < deadline,
            "no deliveries before the restart"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let terms_before = terms_of(&c, 0);
    for i in 0..3 {
        c.kill(i);
    }
    let logged: Vec<usize> = (0..3).map(|i| c.log(i).len()).collect();
    for i in 0..3 {
        c.spawn(i);
    }
    for i in 0..3 {
        c.wait_ready(i);
    }
    let back = Instant::now();
    let before = seen.lock().unwrap().count.len();
    // Deliveries resume within 10 s of the cluster being back.
    loop {
        let now = seen.lock().unwrap().count.len();
        if now > before + 300 {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(10),
            "deliveries stalled after the restart: {} new in {:?}",
            now - before,
            back.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The leaders of before the restart lead again (their vote is on
    // disk): no election round, let alone a storm of them, in the idle
    // queues.
    let terms_after = terms_of(&c, 0);
    let changed = terms_before
        .iter()
        .filter(|(g, t)| terms_after.get(g).is_some_and(|a| a != *t))
        .count();
    assert!(
        changed <= 5,
        "{changed} of {} groups changed term across the restart",
        terms_before.len()
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for p in publishers {
        p.await.unwrap();
    }
    let mut confirmed = acked.lock().unwrap().clone();
    confirmed.extend(backlog);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !confirmed
        .iter()
        .all(|id| seen.lock().unwrap().count.contains_key(id))
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for k in consumers {
        k.abort();
    }
    assert_none_lost(&seen.lock().unwrap(), &confirmed);
    for (i, from) in logged.into_iter().enumerate() {
        let w = warnings_since(&c, i, from);
        assert!(
            w.len() <= 20,
            "node {} wrote {} warnings during the restart, e.g. {:?}",
            i + 1,
            w.len(),
            &w[..w.len().min(5)]
        );
    }
}

/// A passive `queue.declare`: the queue's counts, or the channel error.
async fn passive(ch: &Channel, name: &str) -> lapin::Result<lapin::Queue> {
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
}

/// Declares a (transient) fanout exchange.
async fn fanout(ch: &Channel, name: &str) {
    ch.exchange_declare(
        name.into(),
        lapin::ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
}

/// A table of x-arguments from (name, value) pairs.
fn args(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert(ShortString::from(*k), v.clone());
    }
    t
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// The next delivery on `consumer` within 10 s.
async fn next_delivery(consumer: &mut lapin::Consumer) -> lapin::message::Delivery {
    tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect("a delivery within 10 s")
        .expect("the consumer is open")
        .expect("a delivery")
}

async fn publish_plain(ch: &Channel, exchange: &str, key: &str, body: &[u8], p: BasicProperties) {
    ch.basic_publish(
        exchange.into(),
        key.into(),
        BasicPublishOptions::default(),
        body,
        p,
    )
    .await
    .expect("basic.publish")
    .await
    .expect("publish sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_local_queue_serves_every_operation_from_any_node() {
    let c = Cluster::start(3);
    let (_home, hch) = open(&c, 0).await;
    hch.queue_declare(
        "transient".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("a non-durable queue on node 1");

    // Node 2 sees it (passive declare) and publishes to it; node 3 gets,
    // purges and consumes from it.
    let (_n2, ch2) = open(&c, 1).await;
    passive(&ch2, "transient")
        .await
        .expect("passive declare from another node");
    for i in 0..5u64 {
        publish_plain(&ch2, "", "transient", b"m", props(i)).await;
    }
    let (_n3, ch3) = open(&c, 2).await;
    let got = ch3
        .basic_get("transient".into(), BasicGetOptions { no_ack: false })
        .await
        .expect("basic.get from another node")
        .expect("a message");
    got.delivery
        .acker
        .ack(BasicAckOptions::default())
        .await
        .unwrap();
    let declared = passive(&ch3, "transient").await.unwrap();
    assert_eq!(
        declared.message_count(),
        4,
        "the ack from node 3 settled one"
    );
    // Every node's admin API shows the queue as its home node counts it.
    for i in 0..3 {
        assert_eq!(c.queue_number(i, "transient", "messages_ready"), Some(4));
    }
    assert_eq!(
        ch3.queue_purge("transient".into(), QueuePurgeOptions::default())
            .await
            .expect("purge from another node"),
        4
    );
    ch3.basic_qos(1, BasicQosOptions::default()).await.unwrap();
    let mut consumer = ch3
        .basic_consume(
            "transient".into(),
            "c3".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume from another node");
    for i in 10..13u64 {
        publish_plain(&ch2, "", "transient", b"m", props(i)).await;
    }
    // Prefetch 1: the second delivery needs the first one's ack, sent from
    // node 3 to the queue on node 1.
    for i in 10..13u64 {
        let d = next_delivery(&mut consumer).await;
        assert_eq!(
            d.properties.message_id().as_ref().unwrap().as_str(),
            i.to_string()
        );
        if i == 11 {
            d.acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await
                .unwrap();
            let again = next_delivery(&mut consumer).await;
            assert!(again.redelivered);
            again.acker.ack(BasicAckOptions::default()).await.unwrap();
        } else {
            d.acker.ack(BasicAckOptions::default()).await.unwrap();
        }
    }
    // Deleting it from node 2 cancels node 3's consumer.
    ch2.queue_delete("transient".into(), QueueDeleteOptions::default())
        .await
        .expect("delete from another node");
    let end = tokio::time::timeout(Duration::from_secs(10), consumer.next()).await;
    assert!(
        matches!(end, Ok(None) | Ok(Some(Err(_)))),
        "the consumer ends with the queue: {end:?}"
    );
    let err = passive(&ch2, "transient").await.expect_err("gone");
    assert_eq!(common::reply_code(&err), Some(404));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_reply_to_works_with_client_and_server_on_different_nodes() {
    let c = Cluster::start(3);
    let (_server, sch) = open(&c, 2).await;
    declare(&sch, "rpc").await;
    let mut requests = sch
        .basic_consume(
            "rpc".into(),
            "server".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let (_client, cch) = open(&c, 0).await;
    let mut replies = cch
        .basic_consume(
            "amq.rabbitmq.reply-to".into(),
            "client".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    for i in 0..3u64 {
        publish_plain(
            &cch,
            "",
            "rpc",
            format!("ask-{i}").as_bytes(),
            props(i).with_reply_to(ShortString::from("amq.rabbitmq.reply-to")),
        )
        .await;
        let req = next_delivery(&mut requests).await;
        let to = req
            .properties
            .reply_to()
            .clone()
            .expect("a reply-to address");
        publish_plain(&sch, "", to.as_str(), &req.data, props(i)).await;
        req.acker.ack(BasicAckOptions::default()).await.unwrap();
        let answer = next_delivery(&mut replies).await;
        assert_eq!(answer.data, format!("ask-{i}").as_bytes());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_reach_a_queue_on_another_node() {
    let c = Cluster::start(3);
    let (_conn, ch) = open(&c, 0).await;
    fanout(&ch, "dlx").await;
    // The dead-letter queue is node-local on node 3.
    let (_n3, ch3) = open(&c, 2).await;
    ch3.queue_declare(
        "dead".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch3.queue_bind(
        "dead".into(),
        "dlx".into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    // Sources: a quorum queue (rejects, delivery limit), a quorum queue
    // with a length limit (drop-head), and a node-local queue on node 1
    // with a TTL.
    let quorum = |extra: &[(&str, AMQPValue)]| {
        let mut pairs = vec![
            ("x-queue-type", text("quorum")),
            ("x-dead-letter-exchange", text("dlx")),
        ];
        pairs.extend(extra.iter().cloned());
        args(&pairs)
    };
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare("src-reject".into(), durable, quorum(&[]))
        .await
        .unwrap();
    ch.queue_declare(
        "src-maxlen".into(),
        durable,
        quorum(&[("x-max-length", AMQPValue::LongInt(1))]),
    )
    .await
    .unwrap();
    ch.queue_declare(
        "src-ttl".into(),
        QueueDeclareOptions::default(),
        args(&[
            ("x-dead-letter-exchange", text("dlx")),
            ("x-message-ttl", AMQPValue::LongInt(50)),
        ]),
    )
    .await
    .unwrap();

    // A consumer on node 2 rejects.
    let (_n2, ch2) = open(&c, 1).await;
    publish_plain(&ch2, "", "src-reject", b"rejected", props(1)).await;
    let mut rejecter = ch2
        .basic_consume(
            "src-reject".into(),
            "r".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    next_delivery(&mut rejecter)
        .await
        .acker
        .reject(BasicRejectOptions { requeue: false })
        .await
        .unwrap();
    publish_plain(&ch2, "", "src-maxlen", b"dropped", props(2)).await;
    publish_plain(&ch2, "", "src-maxlen", b"kept", props(3)).await;
    publish_plain(&ch2, "", "src-ttl", b"expired", props(4)).await;

    // Everything arrives at the dead-letter queue, read from node 2.
    let mut dead = ch2
        .basic_consume(
            "dead".into(),
            "d".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume node 3's queue from node 2");
    let mut reasons = BTreeSet::new();
    for _ in 0..3 {
        let d = next_delivery(&mut dead).await;
        let headers = d.properties.headers().clone().expect("x-death headers");
        let reason = match headers.inner().get("x-first-death-reason") {
            Some(AMQPValue::LongString(s)) => s.to_string(),
            other => panic!("no reason: {other:?}"),
        };
        reasons.insert((String::from_utf8_lossy(&d.data).into_owned(), reason));
    }
    let want: BTreeSet<(String, String)> = [
        ("rejected", "rejected"),
        ("dropped", "maxlen"),
        ("expired", "expired"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(reasons, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_expires_follows_use_from_any_node() {
    let c = Cluster::start(3);
    let (n1, ch1) = open(&c, 0).await;
    let (_n2, ch2) = open(&c, 1).await;
    let (_n3, ch3) = open(&c, 2).await;
    for (name, durable, kind) in [
        ("exp-classic", false, "classic"),
        ("exp-quorum", true, "quorum"),
    ] {
        ch1.queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable,
                ..Default::default()
            },
            args(&[
                ("x-queue-type", text(kind)),
                ("x-expires", AMQPValue::LongInt(1_500)),
            ]),
        )
        .await
        .unwrap();
        // Right after the declare, another node finds it.
        passive(&ch2, name)
            .await
            .unwrap_or_else(|e| panic!("{name}: passive declare on node 2: {e}"));
    }
    // A consumer on node 3 keeps both alive well past their expiry.
    let mut consumers = Vec::new();
    for name in ["exp-classic", "exp-quorum"] {
        consumers.push(
            ch3.basic_consume(
                name.into(),
                format!("keep-{name}").as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap(),
        );
    }
    let alive_until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < alive_until {
        for name in ["exp-classic", "exp-quorum"] {
            passive(&ch2, name)
                .await
                .unwrap_or_else(|e| panic!("{name} expired with a consumer: {e}"));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Without the consumer, they expire.
    for name in ["exp-classic", "exp-quorum"] {
        ch3.basic_cancel(
            format!("keep-{name}").as_str().into(),
            BasicCancelOptions::default(),
        )
        .await
        .unwrap();
    }
    for name in ["exp-classic", "exp-quorum"] {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let probe = n1.create_channel().await.unwrap();
            match passive(&probe, name).await {
                Err(e) => {
                    assert_eq!(common::reply_code(&e), Some(404), "{name}: {e}");
                    break;
                }
                Ok(_) => {
                    let _ = probe.close(200, "bye".into()).await;
                }
            }
            assert!(Instant::now() < deadline, "{name} never expired");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_one_node_declares_another_sees_at_once() {
    let c = Cluster::start(3);
    let (_n1, ch1) = open(&c, 0).await;
    let (_n2, ch2) = open(&c, 1).await;
    let (_n3, ch3) = open(&c, 2).await;
    // Each round races a use on nodes 2 and 3 against the metadata
    // reaching them; every use must find what node 1 has just declared.
    for i in 0..20 {
        let (x, q) = (format!("race-x-{i}"), format!("race-q-{i}"));
        ch1.exchange_declare(
            x.as_str().into(),
            lapin::ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        let durable = QueueDeclareOptions {
            durable: i % 2 == 0,
            ..Default::default()
        };
        ch1.queue_declare(q.as_str().into(), durable, FieldTable::default())
            .await
            .unwrap();
        ch2.exchange_declare(
            x.as_str().into(),
            lapin::ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("{x} on node 2: {e}"));
        ch3.basic_consume(
            q.as_str().into(),
            format!("c-{i}").as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("{q} on node 3: {e}"));
    }
}

/// Each Raft group node `i` holds, with its term, from `/api/cluster`.
fn terms_of(c: &Cluster, i: usize) -> std::collections::BTreeMap<u64, u64> {
    let (status, body) = c.http(i, "GET", "/api/cluster");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| (g["group"].as_u64().unwrap(), g["term"].as_u64().unwrap()))
        .collect()
}

/// The Raft groups node `i` holds, from `/api/cluster`.
fn groups_of(c: &Cluster, i: usize) -> Vec<u64> {
    let (status, body) = c.http(i, "GET", "/api/cluster");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["group"].as_u64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_queues_stay_deleted_on_a_node_that_restarts() {
    let mut c = Cluster::start(3);
    let (_conn, ch) = open(&c, 0).await;
    declare(&ch, "kept").await;
    for i in 0..5 {
        declare(&ch, &format!("churn-{i}")).await;
        ch.queue_delete(
            format!("churn-{i}").as_str().into(),
            QueueDeleteOptions::default(),
        )
        .await
        .unwrap();
    }
    let before = groups_of(&c, 1);
    assert_eq!(before.len(), 2, "the metadata group and 'kept': {before:?}");
    // Deleted while node 2 is down, too.
    c.kill(1);
    for i in 5..8 {
        declare(&ch, &format!("churn-{i}")).await;
        ch.queue_delete(
            format!("churn-{i}").as_str().into(),
            QueueDeleteOptions::default(),
        )
        .await
        .unwrap();
    }
    c.spawn(1);
    c.wait_ready(1);
    c.wait_queue_leader("kept", Duration::from_secs(30));
    // The node replays the declares and deletes; give the closes their turn
    // and check it holds exactly what it held before, with every group led.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut now = groups_of(&c, 1);
        now.sort_unstable();
        let mut want = before.clone();
        want.sort_unstable();
        if now == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node 2 holds {now:?}, expected {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_queues_leaders_spread_over_the_nodes() {
    let c = Cluster::start(3);
    let (_conn, ch) = open(&c, 0).await;
    for i in 0..30 {
        declare(&ch, &format!("spread-{i}")).await;
    }
    let mut led = [0usize; 3];
    for i in 0..30 {
        let l = c.wait_queue_leader(&format!("spread-{i}"), Duration::from_secs(20));
        led[l as usize - 1] += 1;
    }
    // Uniformly drawn, a node leads fewer than 2 of 30 once in thousands
    // of runs; when only the highest-numbered node could win first
    // elections, node 1 led none.
    assert!(
        led.iter().all(|n| *n >= 2),
        "leaders per node after creating 30 queues: {led:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_survive_a_flapping_link_between_leader_and_consumer() {
    let (c, cutter) = Cluster::start_with_cutter(3, 1, 2);
    let (_conn, ch) = open(&c, 0).await;
    // A queue led by node 1 or 2, so that its deliveries to a consumer on
    // the other one cross the link that is cut.
    let mut queue = None;
    for i in 0..10 {
        let name = format!("flap-{i}");
        declare(&ch, &name).await;
        let leader = c.wait_queue_leader(&name, Duration::from_secs(20));
        if leader != 3 {
            queue = Some((name, leader as usize - 1));
            break;
        }
    }
    let (queue, leader) = queue.expect("a queue led by node 1 or 2 in ten tries");
    let consumer_node = 1 - leader;
    let (_pconn, pch) = open(&c, leader).await;
    pch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let never: BTreeSet<u64> = [u64::MAX].into();
    let consumer = tokio::spawn(consume_until(
        vec![c.uri(consumer_node)],
        queue.clone(),
        never,
        Duration::from_secs(60),
        seen.clone(),
    ));
    // Publish while the link breaks every 300 ms, ten times.
    let mut confirmed = BTreeSet::new();
    for round in 0..10u64 {
        cutter.cut();
        let ids = round * 200..(round + 1) * 200;
        confirmed.extend(
            publish_confirmed(&pch, &queue, ids, 50)
                .await
                .expect("publishing on the leader's node"),
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !confirmed
        .iter()
        .all(|id| seen.lock().unwrap().count.contains_key(id))
    {
        assert!(
            Instant::now() < deadline,
            "the consumer stalled: {} of {} confirmed messages received",
            seen.lock().unwrap().count.len(),
            confirmed.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    consumer.abort();
    assert_none_lost(&seen.lock().unwrap(), &confirmed);
}

/// The replicas of a queue, from node `i`'s `/api/queues`.
fn queue_members(c: &Cluster, i: usize, queue: &str) -> Vec<u64> {
    let (_, body) = c.http(i, "GET", "/api/queues");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    v.as_array()
        .and_then(|a| a.iter().find(|q| q["name"] == queue))
        .and_then(|q| q["members"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|m| m.as_u64())
        .collect()
}

/// Waits until node `i` reports `want` messages being dead-lettered by
/// `queue` (RabbitMQ's `messages_dlx`).
async fn wait_dead_lettering(c: &Cluster, i: usize, queue: &str, want: u64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let seen = c.queue_number(i, queue, "messages_dlx");
        if seen == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{queue}: messages_dlx {seen:?} on node {}, want {want}",
            i + 1
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The arguments of a quorum queue that dead-letters at least once
/// through `dlx`.
fn at_least_once_args(dlx: &str) -> FieldTable {
    args(&[
        ("x-queue-type", text("quorum")),
        ("x-dead-letter-exchange", text(dlx)),
        ("x-dead-letter-strategy", text("at-least-once")),
        ("x-overflow", text("reject-publish")),
    ])
}

/// Publishes ids `ids` to `queue` through `uri` with confirms, then
/// consumes them there and rejects each without requeue.
async fn publish_and_reject(uri: &str, queue: &str, ids: std::ops::Range<u64>) {
    let conn = connect(uri).await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let n = ids.end - ids.start;
    let acked = publish_confirmed(&ch, queue, ids, 100).await.unwrap();
    assert_eq!(acked.len() as u64, n, "every publish confirmed");
    ch.basic_qos(n as u16, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "rejecter".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for _ in 0..n {
        next_delivery(&mut consumer)
            .await
            .acker
            .reject(BasicRejectOptions { requeue: false })
            .await
            .unwrap();
    }
    let _ = conn.close(200, "bye".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_least_once_dead_letters_survive_a_killed_source_leader() {
    const N: u64 = 100;
    let mut c = Cluster::start(3);
    let (conn, ch) = open(&c, 0).await;
    fanout(&ch, "dlx").await;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    // The dead-letter queue has one replica, so stopping its node makes it
    // unavailable: the rejected messages are certain to be still on their
    // way to it when the source's leader is killed.
    ch.queue_declare(
        "dead".into(),
        durable,
        args(&[
            ("x-queue-type", text("quorum")),
            ("x-quorum-initial-group-size", AMQPValue::LongInt(1)),
        ]),
    )
    .await
    .unwrap();
    ch.queue_bind(
        "dead".into(),
        "dlx".into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_declare("src".into(), durable, at_least_once_args("dlx"))
        .await
        .unwrap();
    let _ = conn.close(200, "bye".into()).await;
    let members = queue_members(&c, 0, "dead");
    assert_eq!(members.len(), 1, "{members:?}");
    let target = members[0] as usize - 1;

    c.kill(target);
    let leader = c.wait_queue_leader("src", Duration::from_secs(30)) as usize - 1;
    let rejecter = (0..3).find(|&i| i != target && i != leader).unwrap();
    publish_and_reject(&c.uri(rejecter), "src", 0..N).await;
    // Every rejected message waits in the source for the dead-letter queue.
    wait_dead_lettering(&c, rejecter, "src", N, Duration::from_secs(30)).await;
    assert_eq!(c.queue_number(rejecter, "src", "messages_ready"), Some(0));

    // kill -9 the leader that had them under way, then bring everything
    // back: the next leader dead-letters them again.
    c.kill(leader);
    c.spawn(leader);
    c.wait_ready(leader);
    c.spawn(target);
    c.wait_ready(target);

    // Read from the node that neither rejected them nor led the source.
    let seen = Arc::new(Mutex::new(Seen::default()));
    let want: BTreeSet<u64> = (0..N).collect();
    consume_until(
        vec![c.uri(target)],
        "dead".into(),
        want.clone(),
        Duration::from_secs(90),
        seen.clone(),
    )
    .await;
    assert_none_lost(&seen.lock().unwrap(), &want);
    // Once every copy is confirmed, they leave the source.
    wait_dead_lettering(&c, rejecter, "src", 0, Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_least_once_dead_letters_wait_for_a_route() {
    const N: u64 = 20;
    let c = Cluster::start(3);
    let (_conn, ch) = open(&c, 0).await;
    fanout(&ch, "nowhere").await;
    ch.queue_declare(
        "src".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        at_least_once_args("nowhere"),
    )
    .await
    .unwrap();
    publish_and_reject(&c.uri(1), "src", 0..N).await;

    // The exchange routes them nowhere: they stay in the source, neither
    // ready nor lost, through more than one retry.
    wait_dead_lettering(&c, 2, "src", N, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(c.queue_number(2, "src", "messages_dlx"), Some(N));
    assert_eq!(c.queue_number(2, "src", "messages_ready"), Some(0));

    // A queue bound to the exchange gets every one of them.
    let (_n3, ch3) = open(&c, 2).await;
    declare(&ch3, "dead").await;
    ch3.queue_bind(
        "dead".into(),
        "nowhere".into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let want: BTreeSet<u64> = (0..N).collect();
    consume_until(
        vec![c.uri(2)],
        "dead".into(),
        want.clone(),
        Duration::from_secs(30),
        seen.clone(),
    )
    .await;
    assert_none_lost(&seen.lock().unwrap(), &want);
    wait_dead_lettering(&c, 0, "src", 0, Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_without_a_prefetch_limit_takes_a_deep_backlog_from_another_node() {
    const N: u64 = 40_000;
    let c = Cluster::start(3);
    let (_conn, ch) = open(&c, 0).await;
    declare(&ch, "deep").await;
    let leader = c.wait_queue_leader("deep", Duration::from_secs(20)) as usize - 1;
    let (_pconn, pch) = open(&c, leader).await;
    pch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let acked = publish_confirmed(&pch, "deep", 0..N, 2_000)
        .await
        .expect("publishing the backlog");
    assert_eq!(acked.len() as u64, N);
    // No basic.qos: the queue may deliver the whole backlog at once, more
    // than the inter-node link's send queue holds.
    let (_cconn, cch) = open(&c, (leader + 1) % 3).await;
    let mut consumer = cch
        .basic_consume(
            "deep".into(),
            "greedy".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut got = 0u64;
    let deadline = Instant::now() + Duration::from_secs(90);
    while got < N {
        let left = deadline.saturating_duration_since(Instant::now());
        let d = match tokio::time::timeout(left, consumer.next()).await {
            Ok(Some(Ok(d))) => d,
            other => panic!("after {got} of {N} deliveries: {other:?}"),
        };
        got += 1;
        if got % 1_000 == 0 || got == N {
            d.acker
                .ack(BasicAckOptions { multiple: true })
                .await
                .unwrap();
        }
    }
}
