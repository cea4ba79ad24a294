//! Warren driven by lapin, a real Rust AMQP client: ordering, large bodies,
//! every property and header type, confirms, acks and redelivery, prefetch,
//! a channel-wide (global) prefetch, publishers blocked by the memory alarm
//! while consumers go on, and the declare-time checks of
//! `x-dead-letter-strategy`.

mod common;

use common::{Server, connect};
use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::{
    AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString, ShortString,
};
use lapin::{BasicProperties, Channel};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

async fn declare(ch: &Channel, name: &str, args: FieldTable) {
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .expect("queue.declare");
}

async fn next(consumer: &mut lapin::Consumer) -> lapin::message::Delivery {
    tokio::time::timeout(WAIT, consumer.next())
        .await
        .expect("a delivery within the deadline")
        .expect("consumer open")
        .expect("delivery ok")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_messages_from_one_publisher_arrive_in_order() {
    let server = Server::start();
    let conn = connect(&server).await;
    let ch = conn.create_channel().await.unwrap();
    declare(&ch, "ordered", FieldTable::default()).await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let cch = conn.create_channel().await.unwrap();
    cch.basic_qos(500, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = cch
        .basic_consume(
            "ordered".into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for i in 0..10_000u32 {
        ch.basic_publish(
            "".into(),
            "ordered".into(),
            BasicPublishOptions::default(),
            &i.to_be_bytes(),
            BasicProperties::default(),
        )
        .await
        .unwrap();
    }
    for i in 0..10_000u32 {
        let d = next(&mut consumer).await;
        assert_eq!(d.data, i.to_be_bytes(), "message {i} out of order");
        assert!(!d.redelivered);
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    tokio::time::timeout(WAIT, ch.wait_for_confirms())
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_and_sixteen_mebibyte_bodies_round_trip() {
    let server = Server::start();
    let conn = connect(&server).await;
    let ch = conn.create_channel().await.unwrap();
    declare(&ch, "big", FieldTable::default()).await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let bodies: Vec<Vec<u8>> = [1usize << 20, 16 << 20]
        .iter()
        .map(|n| (0..*n).map(|i| (i * 31 % 251) as u8).collect())
        .collect();
    for b in &bodies {
        let confirm = ch
            .basic_publish(
                "".into(),
                "big".into(),
                BasicPublishOptions::default(),
                b,
                BasicProperties::default(),
            )
            .await
            .unwrap();
        assert!(confirm.await.unwrap().is_ack());
    }
    for b in &bodies {
        let got = ch
            .basic_get("big".into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .expect("a message");
        assert_eq!(got.delivery.data.len(), b.len());
        assert!(got.delivery.data == *b, "body differs");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_basic_property_and_header_type_round_trips() {
    let server = Server::start();
    let conn = connect(&server).await;
    let ch = conn.create_channel().await.unwrap();
    declare(&ch, "props", FieldTable::default()).await;
    let mut nested = FieldTable::default();
    nested.insert("inner".into(), AMQPValue::LongString("x".into()));
    let mut headers = FieldTable::default();
    let values = vec![
        ("bool", AMQPValue::Boolean(true)),
        ("i8", AMQPValue::ShortShortInt(-8)),
        ("u8", AMQPValue::ShortShortUInt(8)),
        ("i16", AMQPValue::ShortInt(-16)),
        ("u16", AMQPValue::ShortUInt(16)),
        ("i32", AMQPValue::LongInt(-32)),
        ("u32", AMQPValue::LongUInt(32)),
        ("i64", AMQPValue::LongLongInt(-64)),
        ("f32", AMQPValue::Float(1.5)),
        ("f64", AMQPValue::Double(2.25)),
        (
            "dec",
            AMQPValue::DecimalValue(DecimalValue {
                scale: 2,
                value: 12345,
            }),
        ),
        // No short strings: RabbitMQ's table grammar has none, and no
        // client but lapin writes them (with a tag RabbitMQ would refuse).
        (
            "lstr",
            AMQPValue::LongString(LongString::from("long \u{2713}")),
        ),
        (
            "arr",
            AMQPValue::FieldArray(FieldArray::from(vec![
                AMQPValue::LongInt(1),
                AMQPValue::Boolean(false),
            ])),
        ),
        ("ts", AMQPValue::Timestamp(1_700_000_000)),
        ("table", AMQPValue::FieldTable(nested)),
        (
            "bytes",
            AMQPValue::ByteArray(ByteArray::from(vec![0u8, 1, 2, 255])),
        ),
        ("void", AMQPValue::Void),
    ];
    for (k, v) in &values {
        headers.insert(ShortString::from(*k), v.clone());
    }
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("gzip".into())
        .with_headers(headers.clone())
        .with_delivery_mode(2)
        .with_priority(7)
        .with_correlation_id("corr".into())
        .with_reply_to("replies".into())
        .with_expiration("60000".into())
        .with_message_id("mid".into())
        .with_timestamp(1_700_000_001)
        .with_type("kind".into())
        .with_user_id("guest".into())
        .with_app_id("app".into())
        .with_cluster_id("cluster".into());
    ch.basic_publish(
        "".into(),
        "props".into(),
        BasicPublishOptions::default(),
        b"p",
        props.clone(),
    )
    .await
    .unwrap();
    let got = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(m) = ch
                .basic_get("props".into(), BasicGetOptions { no_ack: true })
                .await
                .unwrap()
            {
                return m;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(got.delivery.properties, props);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nacked_message_is_redelivered_with_the_redelivered_flag() {
    let server = Server::start();
    let conn = connect(&server).await;
    let ch = conn.create_channel().await.unwrap();
    declare(&ch, "nack", FieldTable::default()).await;
    ch.basic_publish(
        "".into(),
        "nack".into(),
        BasicPublishOptions::default(),
        b"m",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    let mut consumer = ch
        .basic_consume(
            "nack".into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let d = next(&mut consumer).await;
    assert!(!d.redelivered);
    d.nack(BasicNackOptions {
        requeue: true,
        multiple: false,
    })
    .await
    .unwrap();
    let d = next(&mut consumer).await;
    assert!(d.redelivered);
    assert_eq!(d.data, b"m");
    let count = d
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-delivery-count").cloned());
    assert_eq!(
        count,
        Some(AMQPValue::LongLongInt(1)),
        "quorum queues count returns"
    );
    d.ack(BasicAckOptions::default()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_messages_return_to_the_queue_when_the_connection_closes() {
    let server = Server::start();
    let conn = connect(&server).await;
    let ch = conn.create_channel().await.unwrap();
    declare(&ch, "back", FieldTable::default()).await;
    for i in 0..3u8 {
        ch.basic_publish(
            "".into(),
            "back".into(),
            BasicPublishOptions::default(),
            &[i],
            BasicProperties::default(),
        )
        .await
        .unwrap();
    }
    let mut consumer = ch
        .basic_consume(
            "back".into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for _ in 0..3 {
        next(&mut consumer).await;
    }
    conn.close(200, "bye".into()).await.unwrap();
    let conn2 = connect(&server).await;
    let ch2 = conn2.create_channel().await.unwrap();
    let mut c2 = ch2
        .basic_consume(
            "back".into(),
            "c2".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for i in 0..3u8 {
        let d = next(&mut c2).await;
        assert_eq!(d.data, [i], "returned in original order");
        assert!(d.redelivered);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_limits_unacknowledged_deliveries_per_consumer() {
    let server = Server::start();
    let conn = connect(&server).await;
    let ch = conn.create_channel().await.unwrap();
    declare(&ch, "pf", FieldTable::default()).await;
    for i in 0..10u8 {
        ch.basic_publish(
            "".into(),
            "pf".into(),
            BasicPublishOptions::default(),
            &[i],
            BasicProperties::default(),
        )
        .await
        .unwrap();
    }
    ch.basic_qos(3, BasicQosOptions::default()).await.unwrap();
    let mut consumer = ch
        .basic_consume(
            "pf".into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(next(&mut consumer).await);
    }
    // The queue reports 7 ready and 3 unacked: no fourth delivery was made.
    let q = ch
        .queue_declare(
            "pf".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(q.message_count(), 7);
    held[2]
        .acker
        .ack(BasicAckOptions { multiple: true })
        .await
        .unwrap();
    for i in 3..6u8 {
        assert_eq!(next(&mut consumer).await.data, [i]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_are_blocked_by_the_memory_alarm_while_consumers_keep_receiving() {
    let server = Server::start();
    let publisher = connect(&server).await;
    let mut events = publisher.events_listener();
    let pch = publisher.create_channel().await.unwrap();
    declare(&pch, "alarm", FieldTable::default()).await;
    pch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for i in 0..100u32 {
        pch.basic_publish(
            "".into(),
            "alarm".into(),
            BasicPublishOptions::default(),
            &i.to_be_bytes(),
            BasicProperties::default(),
        )
        .await
        .unwrap();
    }
    tokio::time::timeout(WAIT, pch.wait_for_confirms())
        .await
        .unwrap()
        .unwrap();
    // Lower the watermark below what the node uses: the alarm fires.
    let (status, _) = server.http("PUT", "/api/vm-memory-high-watermark", r#"{"bytes": 1}"#);
    assert_eq!(status, 204);
    let blocked = tokio::time::timeout(WAIT, async {
        while let Some(ev) = events.next().await {
            if matches!(ev, lapin::Event::ConnectionBlocked(_)) {
                return true;
            }
        }
        false
    })
    .await
    .unwrap();
    assert!(blocked, "publisher got connection.blocked");
    // A publish now is held back (lapin waits for connection.unblocked;
    // Warren would not read it anyway)...
    let late_ch = pch.clone();
    let late = tokio::spawn(async move {
        late_ch
            .basic_publish(
                "".into(),
                "alarm".into(),
                BasicPublishOptions::default(),
                b"late",
                BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap()
    });
    // ...while a consumer on another connection drains the queue.
    let consumer_conn = connect(&server).await;
    let cch = consumer_conn.create_channel().await.unwrap();
    let mut consumer = cch
        .basic_consume(
            "alarm".into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for i in 0..100u32 {
        let d = next(&mut consumer).await;
        assert_eq!(d.data, i.to_be_bytes());
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    // Clearing the alarm unblocks the publisher and the held publish arrives.
    let (status, _) = server.http(
        "PUT",
        "/api/vm-memory-high-watermark",
        r#"{"fraction": 0.9}"#,
    );
    assert_eq!(status, 204);
    let unblocked = tokio::time::timeout(WAIT, async {
        while let Some(ev) = events.next().await {
            if matches!(ev, lapin::Event::ConnectionUnblocked) {
                return true;
            }
        }
        false
    })
    .await
    .unwrap();
    assert!(unblocked);
    assert_eq!(next(&mut consumer).await.data, b"late");
    assert!(
        tokio::time::timeout(WAIT, late)
            .await
            .unwrap()
            .unwrap()
            .is_ack()
    );
}

/// Forwards the deliveries of several consumers to one receiver, in
/// arrival order.
fn merge(
    consumers: Vec<lapin::Consumer>,
) -> tokio::sync::mpsc::UnboundedReceiver<lapin::message::Delivery> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    for mut c in consumers {
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(Ok(d)) = c.next().await {
                if tx.send(d).is_err() {
                    break;
                }
            }
        });
    }
    rx
}

/// The next `n` deliveries, then half a second without another.
async fn exactly(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<lapin::message::Delivery>,
    n: usize,
) -> Vec<lapin::message::Delivery> {
    let mut got = Vec::new();
    for _ in 0..n {
        let d = tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} deliveries arrived", got.len()))
            .expect("consumers open");
        got.push(d);
    }
    let extra = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await;
    assert!(extra.is_err(), "a delivery beyond the expected {n}");
    got
}

/// Declares a non-durable (classic) queue holding `n` one-byte messages.
async fn classic_queue_with(ch: &Channel, name: &str, n: u8) {
    queue_with(ch, name, n, false).await
}

/// A queue holding `n` one-byte messages: classic, or (durable) quorum.
async fn queue_with(ch: &Channel, name: &str, n: u8, durable: bool) {
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            durable,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    for i in 0..n {
        ch.basic_publish(
            "".into(),
            name.into(),
            BasicPublishOptions::default(),
            &[i],
            BasicProperties::default(),
        )
        .await
        .unwrap();
    }
}

async fn consume(ch: &Channel, queue: &str, tag: &str) -> lapin::Consumer {
    ch.basic_consume(
        queue.into(),
        tag.into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_global_prefetch_is_shared_by_the_channels_consumers_of_every_queue_kind() {
    let server = Server::start();
    let conn = connect(&server).await;
    let ch = conn.create_channel().await.unwrap();
    // One classic queue and one quorum queue (durable: Warren's default
    // kind), consumed on one channel.
    queue_with(&ch, "g1", 5, false).await;
    queue_with(&ch, "g2", 5, true).await;
    let cch = conn.create_channel().await.unwrap();
    cch.basic_qos(3, BasicQosOptions { global: true })
        .await
        .unwrap();
    let c1 = consume(&cch, "g1", "c1").await;
    let c2 = consume(&cch, "g2", "c2").await;
    let mut rx = merge(vec![c1, c2]);
    // Three across both consumers, not three each.
    let first = exactly(&mut rx, 3).await;
    // One ack makes room for one more.
    first[0].ack(BasicAckOptions::default()).await.unwrap();
    let more = exactly(&mut rx, 1).await;
    // Acking everything outstanding makes room for three.
    more[0]
        .ack(BasicAckOptions { multiple: true })
        .await
        .unwrap();
    exactly(&mut rx, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_global_prefetch_applies_to_existing_consumers() {
    let server = Server::start();
    let conn = connect(&server).await;
    let ch = conn.create_channel().await.unwrap();
    classic_queue_with(&ch, "g", 8).await;
    let cch = conn.create_channel().await.unwrap();
    cch.basic_qos(1, BasicQosOptions { global: true })
        .await
        .unwrap();
    let mut rx = merge(vec![consume(&cch, "g", "c").await]);
    exactly(&mut rx, 1).await;
    // Raised: two more without any ack.
    cch.basic_qos(3, BasicQosOptions { global: true })
        .await
        .unwrap();
    exactly(&mut rx, 2).await;
    // A per-consumer qos lifts the channel's limit, as in RabbitMQ; this
    // consumer was created without a limit of its own, so the rest comes.
    cch.basic_qos(1, BasicQosOptions { global: false })
        .await
        .unwrap();
    exactly(&mut rx, 5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dead_letter_strategy_is_checked_at_declare() {
    let server = Server::start();
    let conn = connect(&server).await;
    let table = |pairs: &[(&str, &str)]| {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert(
                ShortString::from(*k),
                AMQPValue::LongString(LongString::from(*v)),
            );
        }
        t
    };
    let ch = conn.create_channel().await.unwrap();
    let err = ch
        .queue_declare(
            "bad".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            table(&[("x-dead-letter-strategy", "exactly-once")]),
        )
        .await
        .expect_err("an unknown strategy is refused");
    assert_eq!(common::reply_code(&err), Some(406), "{err}");
    assert!(
        err.to_string().contains(
            "invalid arg 'x-dead-letter-strategy': expected at-most-once or at-least-once, \
             got 'exactly-once'"
        ),
        "{err}"
    );
    // Without reject-publish a quorum queue falls back to at-most-once,
    // with a warning, as RabbitMQ does; a classic queue ignores it.
    let ch = conn.create_channel().await.unwrap();
    declare(
        &ch,
        "fallback",
        table(&[
            ("x-queue-type", "quorum"),
            ("x-dead-letter-exchange", "dlx"),
            ("x-dead-letter-strategy", "at-least-once"),
        ]),
    )
    .await;
    assert!(server.wait_for_log(
        "x-dead-letter-strategy at-least-once falls back to at-most-once",
        WAIT
    ));
    ch.queue_declare(
        "classic".into(),
        QueueDeclareOptions::default(),
        table(&[
            ("x-dead-letter-exchange", "dlx"),
            ("x-dead-letter-strategy", "at-least-once"),
            ("x-overflow", "reject-publish"),
        ]),
    )
    .await
    .expect("a classic queue accepts the strategy");
}
