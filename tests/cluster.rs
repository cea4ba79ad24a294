//! Real `warren` processes on loopback, killed with SIGKILL and restarted:
//! confirmed messages survive crashes, leader loss and a simultaneous
//! restart of every node, and definitions made on one node route on the
//! others.
//!
//! Every message carries its id in `message_id`; the tests compare the ids
//! the broker confirmed with the ids consumers received.

mod common;

use common::clients::*;
use common::cluster::Cluster;
use lapin::options::*;
use lapin::types::FieldTable;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
