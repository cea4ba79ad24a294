//! The wire, seen by a client that misbehaves: bad headers, garbage,
//! truncated and oversized frames, frames on unopened channels, silent
//! clients. Each gets the reply code the spec names, and other clients are
//! not disturbed. Also the replies RabbitMQ gives to methods stock clients
//! send at its edges (closes that cross, missing or reserved names,
//! arguments RabbitMQ does not implement), checked frame by frame.

mod common;

use amq_protocol::protocol::{
    AMQPClass, basic, channel as chan, confirm, connection as conn, exchange, queue,
};
use common::{Got, Raw, Server};
use std::time::{Duration, Instant};
use warren::amqp::frame::{
    FRAME_BODY, FRAME_END, FRAME_HEADER, FRAME_METHOD, Frame, PROTOCOL_HEADER,
};

fn frame(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
    let mut b = vec![kind];
    b.extend_from_slice(&channel.to_be_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    b.push(FRAME_END);
    b
}

/// A fresh client can still do a full round trip.
fn assert_server_healthy(server: &Server) {
    let mut r = Raw::handshake(server, 0, &[]);
    r.open_channel(1);
    r.close_channel(1);
}

#[test]
fn a_wrong_protocol_header_is_answered_with_warrens_and_closed() {
    let server = Server::start();
    let mut r = Raw::connect(&server);
    r.send(b"AMQP\x01\x01\x00\x0a");
    match r.recv() {
        Got::Bytes(b) => assert_eq!(&b[..], PROTOCOL_HEADER),
        other => panic!("expected the protocol header, got {other:?}"),
    }
    assert!(matches!(r.recv(), Got::Eof));
    let mut r = Raw::connect(&server);
    r.send(b"GET / HTTP/1.1\r\n\r\n");
    assert!(matches!(r.recv(), Got::Bytes(_)));
    assert_server_healthy(&server);
}

#[test]
fn an_oversized_frame_closes_the_connection_with_501() {
    let server = Server::start();
    let mut r = Raw::handshake(&server, 0, &[]);
    r.open_channel(1);
    let mut big = vec![FRAME_BODY, 0, 1];
    big.extend_from_slice(&(10_000_000u32).to_be_bytes());
    r.send(&big);
    assert_eq!(r.expect_connection_close(), 501);
    assert_server_healthy(&server);
}

#[test]
fn garbage_after_the_handshake_closes_that_connection_only() {
    let server = Server::start();
    // A well-behaved client connected before the garbage arrives...
    let mut bystander = Raw::handshake(&server, 0, &[]);
    bystander.open_channel(1);
    let mut r = Raw::handshake(&server, 0, &[]);
    r.send(&[0x42; 64]);
    assert_eq!(r.expect_connection_close(), 501);
    // ...keeps working on its existing connection afterwards.
    bystander.open_channel(2);
    assert_server_healthy(&server);
}

#[test]
fn a_bad_frame_end_closes_the_connection_with_501() {
    let server = Server::start();
    let mut r = Raw::handshake(&server, 0, &[]);
    let mut f = frame(FRAME_METHOD, 0, &[0, 10, 0, 51]);
    let n = f.len();
    f[n - 1] = 0x00;
    r.send(&f);
    assert_eq!(r.expect_connection_close(), 501);
}

#[test]
fn an_unknown_method_closes_the_connection_with_503() {
    let server = Server::start();
    let mut r = Raw::handshake(&server, 0, &[]);
    r.open_channel(1);
    r.send(&frame(FRAME_METHOD, 1, &[0, 60, 0, 99]));
    assert_eq!(r.expect_connection_close(), 503);
}

#[test]
fn truncated_method_arguments_close_the_connection_with_502() {
    let server = Server::start();
    let mut r = Raw::handshake(&server, 0, &[]);
    r.open_channel(1);
    // queue.declare whose queue name claims 200 bytes but has 3.
    r.send(&frame(
        FRAME_METHOD,
        1,
        &[0, 50, 0, 10, 0, 0, 200, b'a', b'b', b'c'],
    ));
    assert_eq!(r.expect_connection_close(), 502);
}

#[test]
fn a_frame_on_an_unopened_channel_closes_the_connection_with_504() {
    let server = Server::start();
    let mut r = Raw::handshake(&server, 0, &[]);
    r.send_method(
        7,
        &AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
            prefetch_count: 1,
            global: false,
        })),
    );
    assert_eq!(r.expect_connection_close(), 504);
}

#[test]
fn a_content_frame_without_a_publish_closes_the_connection_with_505() {
    let server = Server::start();
    let mut r = Raw::handshake(&server, 0, &[]);
    r.open_channel(1);
    r.send(&frame(FRAME_BODY, 1, b"stray body"));
    assert_eq!(r.expect_connection_close(), 505);
    let mut r = Raw::handshake(&server, 0, &[]);
    r.open_channel(1);
    r.send(&frame(
        FRAME_HEADER,
        1,
        &[0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0],
    ));
    assert_eq!(r.expect_connection_close(), 505);
}

#[test]
fn a_method_where_a_content_header_is_due_closes_the_connection_with_505() {
    let server = Server::start();
    let mut r = Raw::handshake(&server, 0, &[]);
    r.open_channel(1);
    r.send_method(
        1,
        &AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: "".into(),
            routing_key: "nowhere".into(),
            mandatory: false,
            immediate: false,
        })),
    );
    r.send_method(
        1,
        &AMQPClass::Channel(chan::AMQPMethod::Flow(chan::Flow { active: true })),
    );
    assert_eq!(r.expect_connection_close(), 505);
}

#[test]
fn a_truncated_frame_followed_by_a_hangup_leaves_the_server_serving() {
    let server = Server::start();
    {
        let mut r = Raw::handshake(&server, 0, &[]);
        r.open_channel(1);
        let f = frame(
            FRAME_METHOD,
            1,
            &[0, 50, 0, 10, 0, 0, 1, b'q', 0, 0, 0, 0, 0, 0],
        );
        r.send(&f[..f.len() / 2]);
    }
    assert_server_healthy(&server);
}

#[test]
fn a_client_that_never_sends_the_header_is_closed_after_the_handshake_timeout() {
    let server = Server::start_with(&["--handshake-timeout-ms", "300"]);
    let mut r = Raw::connect(&server);
    let started = Instant::now();
    assert!(matches!(r.recv(), Got::Eof));
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250),
        "closed too early: {waited:?}"
    );
    assert!(server.wait_for_log("handshake timeout", Duration::from_secs(5)));
    let lines: Vec<_> = server
        .log()
        .into_iter()
        .filter(|l| l.contains("handshake timeout"))
        .collect();
    assert_eq!(lines.len(), 1, "logged once: {lines:?}");
    assert!(
        lines[0].contains("127.0.0.1"),
        "the line names the peer: {}",
        lines[0]
    );
}

#[test]
fn a_probe_that_connects_and_hangs_up_is_not_logged_above_debug() {
    let server = Server::start();
    for _ in 0..20 {
        drop(std::net::TcpStream::connect(server.amqp).unwrap());
    }
    assert_server_healthy(&server);
    let noisy: Vec<_> = server
        .log()
        .into_iter()
        .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("probe"))
        .collect();
    assert!(noisy.is_empty(), "probes were logged: {noisy:?}");
}

#[test]
fn a_silent_client_is_disconnected_after_two_heartbeat_intervals() {
    let server = Server::start();
    let mut r = Raw::handshake(&server, 1, &[]);
    let started = Instant::now();
    // The server sends heartbeats; the client never answers.
    let mut heartbeats = 0;
    loop {
        match r.recv() {
            Got::Frame(warren::amqp::frame::Frame::Heartbeat) => heartbeats += 1,
            Got::Eof => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    let waited = started.elapsed();
    assert!(heartbeats >= 1, "the server sent no heartbeat");
    assert!(
        waited >= Duration::from_millis(1900),
        "closed after {waited:?}, before two intervals"
    );
    assert!(
        waited < Duration::from_secs(6),
        "closed only after {waited:?}"
    );
}

#[test]
fn wrong_credentials_are_refused_with_403() {
    let server = Server::start();
    let mut r = Raw::connect(&server);
    r.send(PROTOCOL_HEADER);
    let Some(AMQPClass::Connection(conn::AMQPMethod::Start(s))) = r.recv_method() else {
        panic!("expected start")
    };
    let mechs = String::from_utf8_lossy(s.mechanisms.as_bytes()).to_string();
    assert!(
        mechs.contains("PLAIN") && mechs.contains("AMQPLAIN"),
        "{mechs}"
    );
    r.send_method(
        0,
        &AMQPClass::Connection(conn::AMQPMethod::StartOk(conn::StartOk {
            client_properties: Default::default(),
            mechanism: "PLAIN".into(),
            response: b"\0guest\0wrong".to_vec().into(),
            locale: "en_US".into(),
        })),
    );
    assert_eq!(r.expect_connection_close(), 403);
}

#[test]
fn channel_numbers_above_channel_max_are_refused() {
    let server = Server::start_with(&["--channel-max", "10"]);
    let mut r = Raw::handshake(&server, 0, &[]);
    r.send_method(
        11,
        &AMQPClass::Channel(chan::AMQPMethod::Open(chan::Open {})),
    );
    // RabbitMQ's code for this, rather than the spec's 504.
    assert_eq!(r.expect_connection_close(), 530);
}

#[test]
fn a_second_channel_open_on_the_same_channel_is_a_channel_error() {
    let server = Server::start();
    let mut r = Raw::handshake(&server, 0, &[]);
    r.open_channel(1);
    r.send_method(
        1,
        &AMQPClass::Channel(chan::AMQPMethod::Open(chan::Open {})),
    );
    assert_eq!(r.expect_connection_close(), 504);
}

#[test]
fn amqplain_logins_are_accepted() {
    use amq_protocol::auth::{Credentials, SASLMechanism};
    let server = Server::start();
    let mut r = Raw::connect(&server);
    r.send(PROTOCOL_HEADER);
    assert!(matches!(
        r.recv_method(),
        Some(AMQPClass::Connection(conn::AMQPMethod::Start(_)))
    ));
    let response =
        Credentials::new("guest".into(), "guest".into()).sasl_auth_string(SASLMechanism::AMQPlain);
    r.send_method(
        0,
        &AMQPClass::Connection(conn::AMQPMethod::StartOk(conn::StartOk {
            client_properties: Default::default(),
            mechanism: "AMQPLAIN".into(),
            response,
            locale: "en_US".into(),
        })),
    );
    assert!(matches!(
        r.recv_method(),
        Some(AMQPClass::Connection(conn::AMQPMethod::Tune(_)))
    ));
}

#[test]
fn settings_come_from_the_config_file_and_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("warren.toml");
    std::fs::write(&path, "frame_max = 65536\nchannel_max = 99\n").unwrap();
    // The environment overrides the file.
    let server = Server::start_with_env(
        &["--config", path.to_str().unwrap()],
        &[("WARREN_CHANNEL_MAX", "42"), ("WARREN_HEARTBEAT", "7")],
    );
    let mut r = Raw::connect(&server);
    r.send(PROTOCOL_HEADER);
    r.recv_method();
    r.send_method(
        0,
        &AMQPClass::Connection(conn::AMQPMethod::StartOk(conn::StartOk {
            client_properties: Default::default(),
            mechanism: "PLAIN".into(),
            response: b"\0guest\0guest".to_vec().into(),
            locale: "en_US".into(),
        })),
    );
    let Some(AMQPClass::Connection(conn::AMQPMethod::Tune(t))) = r.recv_method() else {
        panic!("expected tune")
    };
    assert_eq!((t.frame_max, t.channel_max, t.heartbeat), (65536, 42, 7));
}

#[test]
fn an_unknown_delivery_tag_closes_the_channel_with_406_and_the_connection_survives() {
    let server = Server::start();
    let mut r = Raw::handshake(&server, 0, &[]);
    r.open_channel(1);
    r.send_method(
        1,
        &AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
            delivery_tag: 99,
            multiple: false,
        })),
    );
    assert_eq!(r.expect_channel_close(), 406);
    // Another channel on the same connection still works.
    r.open_channel(2);
    r.close_channel(2);
}

/// Reads until a method arrives on channel `ch` (methods on other channels
/// and heartbeats are skipped); panics on EOF.
fn recv_on(r: &mut Raw, ch: u16) -> AMQPClass {
    loop {
        match r.recv() {
            Got::Frame(Frame::Method {
                channel, method, ..
            }) if channel == ch => return *method,
            Got::Frame(_) => continue,
            other => panic!("expected a method on channel {ch}, got {other:?}"),
        }
    }
}

/// Sends a publish with its header and body frames (no properties).
fn publish(r: &mut Raw, ch: u16, exchange: &str, routing_key: &str, body: &[u8]) {
    r.send_method(
        ch,
        &AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            mandatory: false,
            immediate: false,
        })),
    );
    let mut header = vec![0, 60, 0, 0];
    header.extend_from_slice(&(body.len() as u64).to_be_bytes());
    header.extend_from_slice(&[0, 0]);
    r.send(&frame(FRAME_HEADER, ch, &header));
    r.send(&frame(FRAME_BODY, ch, body));
}

fn declare_queue(r: &mut Raw, ch: u16, name: &str, durable: bool) {
    r.send_method(
        ch,
        &AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: name.into(),
            durable,
            ..Default::default()
        })),
    );
    assert!(matches!(
        recv_on(r, ch),
        AMQPClass::Queue(queue::AMQPMethod::DeclareOk(_))
    ));
}

fn consume(r: &mut Raw, ch: u16, queue: &str) {
    r.send_method(
        ch,
        &AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
            queue: queue.into(),
            ..Default::default()
        })),
    );
}

fn global_qos(r: &mut Raw, ch: u16, prefetch_count: u16) {
    r.send_method(
        ch,
        &AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
            prefetch_count,
            global: true,
        })),
    );
    assert!(matches!(
        recv_on(r, ch),
        AMQPClass::Basic(basic::AMQPMethod::QosOk(_))
    ));
}

fn close_connection_reply(r: &mut Raw) -> (u16, String) {
    loop {
        match r.recv_method() {
            Some(AMQPClass::Connection(conn::AMQPMethod::Close(cl))) => {
                return (cl.reply_code, cl.reply_text.to_string());
            }
            Some(_) => continue,
            None => panic!("connection ended without connection.close"),
        }
    }
}

#[test]
fn deleting_a_missing_queue_or_exchange_answers_delete_ok() {
    let server = Server::start();
    let mut r = Raw::handshake(&server, 0, &[]);
    r.open_channel(1);
    r.send_method(
        1,
        &AMQPClass::Queue(queue::AMQPMethod::Delete(queue::Delete {
            queue: "never-declared".into(),
            ..Default::default()
        })),
    );
    match recv_on(&mut r, 1) {
        AMQPClass::Queue(queue::AMQPMethod::DeleteOk(ok)) => assert_eq!(ok.message_count, 0),
        other => panic!("expected queue.delete-ok, got {other:?}"),
    }
    r.send_method(
        1,
        &AMQPClass::Exchange(exchange::AMQPMethod::Delete(exchange::Delete {
            exchange: "never-declared".into(),
            ..Default::default()
        })),
    );
    assert!(matches!(
        recv_on(&mut r, 1),
        AMQPClass::Exchange(exchange::AMQPMethod::DeleteOk(_))
    ));
    r.close_channel(1);
}

#[test]
fn the_default_exchange_cannot_be_declared_or_deleted() {
    let server = Server::start();
    let mut r = Raw::handshake(&server, 0, &[]);
    r.open_channel(1);
    r.send_method(
        1,
        &AMQPClass::Exchange(exchange::AMQPMethod::Declare(exchange::Declare {
            exchange: "".into(),
            kind: "direct".into(),
            ..Default::default()
        })),
    );
    match recv_on(&mut r, 1) {
        AMQPClass::Channel(chan::AMQPMethod::Close(cl)) => {
            assert_eq!(cl.reply_code, 403);
            assert_eq!(
                cl.reply_text.as_str(),
                "ACCESS_REFUSED - operation not permitted on the default exchange"
            );
        }
        other => panic!("expected channel.close, got {other:?}"),
    }
    r.send_method(
        1,
        &AMQPClass::Channel(chan::AMQPMethod::CloseOk(chan::CloseOk {})),
    );
    r.open_channel(1);
    r.send_method(
        1,
        &AMQPClass::Exchange(exchange::AMQPMethod::Delete(exchange::Delete {
            exchange: "".into(),
            ..Default::default()
        })),
    );
    assert_eq!(r.expect_channel_close(), 403);
}

#[test]
fn a_client_close_crossing_the_servers_close_is_answered_and_the_connection_survives() {
    let server = Server::start();
    let mut r = Raw::handshake(&server, 0, &[]);
    r.open_channel(1);
    r.open_channel(2);
    // The first publish earns a 404 channel.close; the client sends more on
    // the channel, then its own close, before it reads the server's close.
    publish(&mut r, 1, "no-such-exchange", "k", b"one");
    publish(&mut r, 1, "no-such-exchange", "k", b"two");
    r.send_method(
        1,
        &AMQPClass::Channel(chan::AMQPMethod::Close(chan::Close {
            reply_code: 200,
            reply_text: "bye".into(),
            class_id: 0,
            method_id: 0,
        })),
    );
    match recv_on(&mut r, 1) {
        AMQPClass::Channel(chan::AMQPMethod::Close(cl)) => assert_eq!(cl.reply_code, 404),
        other => panic!("expected channel.close, got {other:?}"),
    }
    // The second publish was dropped (no second close); the client's close
    // is answered.
    assert!(matches!(
        recv_on(&mut r, 1),
        AMQPClass::Channel(chan::AMQPMethod::CloseOk(_))
    ));
    // The client answers the server's close, as clients do.
    r.send_method(
        1,
        &AMQPClass::Channel(chan::AMQPMethod::CloseOk(chan::CloseOk {})),
    );
    // The other channel and the connection are still usable, and the
    // channel number can be opened again.
    declare_queue(&mut r, 2, "still-here", false);
    r.open_channel(1);
    r.close_channel(1);
    r.close_channel(2);
}

#[test]
fn a_nonzero_prefetch_size_closes_the_connection_with_540() {
    let server = Server::start();
    let mut r = Raw::handshake(&server, 0, &[]);
    r.open_channel(1);
    // basic.qos: prefetch-size 1000, prefetch-count 10, not global.
    r.send(&frame(
        FRAME_METHOD,
        1,
        &[0, 60, 0, 10, 0, 0, 0x03, 0xe8, 0, 10, 0],
    ));
    let (code, text) = close_connection_reply(&mut r);
    assert_eq!(code, 540);
    assert_eq!(text, "NOT_IMPLEMENTED - prefetch_size!=0 (1000)");
    assert_server_healthy(&server);
}

#[test]
fn recover_without_requeue_closes_the_connection_with_540() {
    let server = Server::start();
    let mut r = Raw::handshake(&server, 0, &[]);
    r.open_channel(1);
    r.send_method(
        1,
        &AMQPClass::Basic(basic::AMQPMethod::Recover(basic::Recover {
            requeue: false,
        })),
    );
    let (code, text) = close_connection_reply(&mut r);
    assert_eq!(code, 540);
    assert_eq!(text, "NOT_IMPLEMENTED - requeue=false");
    // With requeue it is answered.
    let mut r = Raw::handshake(&server, 0, &[]);
    r.open_channel(1);
    r.send_method(
        1,
        &AMQPClass::Basic(basic::AMQPMethod::Recover(basic::Recover { requeue: true })),
    );
    assert!(matches!(
        recv_on(&mut r, 1),
        AMQPClass::Basic(basic::AMQPMethod::RecoverOk(_))
    ));
}

#[test]
fn a_quorum_queue_accepts_a_consumer_under_a_global_prefetch() {
    // RabbitMQ refuses this with 540; Warren's durable queues are quorum
    // queues by default and Celery asks for a global prefetch, so Warren
    // honours the limit instead (README, differences from RabbitMQ).
    let server = Server::start();
    let mut r = Raw::handshake(&server, 0, &[]);
    r.open_channel(1);
    declare_queue(&mut r, 1, "qq", true);
    global_qos(&mut r, 1, 10);
    consume(&mut r, 1, "qq");
    assert!(matches!(
        recv_on(&mut r, 1),
        AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(_))
    ));
}

#[test]
fn if_empty_refuses_to_delete_a_quorum_queue_holding_messages() {
    let server = Server::start();
    let mut r = Raw::handshake(&server, 0, &[]);
    r.open_channel(1);
    declare_queue(&mut r, 1, "qq", true);
    r.send_method(
        1,
        &AMQPClass::Confirm(confirm::AMQPMethod::Select(confirm::Select {
            nowait: false,
        })),
    );
    assert!(matches!(
        recv_on(&mut r, 1),
        AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(_))
    ));
    publish(&mut r, 1, "", "qq", b"m");
    assert!(matches!(
        recv_on(&mut r, 1),
        AMQPClass::Basic(basic::AMQPMethod::Ack(_))
    ));
    r.send_method(
        1,
        &AMQPClass::Queue(queue::AMQPMethod::Delete(queue::Delete {
            queue: "qq".into(),
            if_empty: true,
            ..Default::default()
        })),
    );
    match recv_on(&mut r, 1) {
        AMQPClass::Channel(chan::AMQPMethod::Close(cl)) => {
            assert_eq!(cl.reply_code, 406);
            assert_eq!(
                cl.reply_text.as_str(),
                "PRECONDITION_FAILED - queue 'qq' in vhost '/' not empty"
            );
        }
        other => panic!("expected channel.close, got {other:?}"),
    }
    r.send_method(
        1,
        &AMQPClass::Channel(chan::AMQPMethod::CloseOk(chan::CloseOk {})),
    );
    // The queue and its message are still there.
    r.open_channel(2);
    r.send_method(
        2,
        &AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: "qq".into(),
            passive: true,
            ..Default::default()
        })),
    );
    match recv_on(&mut r, 2) {
        AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok)) => assert_eq!(ok.message_count, 1),
        other => panic!("expected queue.declare-ok, got {other:?}"),
    }
}
