"""Connection-level negotiation and features through pika."""

import uuid

import pika
import pika.exceptions
import pytest

from helpers import Collector, channel_error, get, wait_message_count, wait_until


def test_heartbeat_negotiated(connect):
    conn = connect(heartbeat=5)
    # pika stores the tuned values back into the connection's parameters
    assert conn._impl.params.heartbeat == 5


def test_heartbeat_disabled_by_client(connect):
    conn = connect(heartbeat=0)
    assert conn._impl.params.heartbeat == 0
    ch = conn.channel()
    ch.queue_declare("", exclusive=True)


def test_heartbeat_server_default_accepted(connect):
    # a callable sees the server's proposal; RabbitMQ proposes 60 s
    proposed = []

    def choose(conn, server_value):
        proposed.append(server_value)
        return server_value

    conn = connect(heartbeat=choose)
    assert proposed and proposed[0] > 0
    assert conn._impl.params.heartbeat == proposed[0]


def test_frame_max_negotiated_and_large_message_split(connect, names):
    conn = connect(frame_max=8192)
    assert conn._impl.params.frame_max == 8192
    ch = conn.channel()
    q = names.q()
    ch.queue_declare(q)
    body = bytes(range(256)) * 400  # 100 KiB over 8 KiB frames
    ch.basic_publish("", q, body)
    _, _, got = get(ch, q)
    assert got == body


def test_channel_max_negotiated(connect):
    conn = connect(channel_max=3)
    assert conn._impl.params.channel_max == 3
    chans = [conn.channel() for _ in range(3)]
    assert [c.channel_number for c in chans] == [1, 2, 3]
    assert all(c.is_open for c in chans)


def test_channel_beyond_channel_max_530(connect):
    conn = connect(channel_max=3)
    for _ in range(3):
        conn.channel()
    # pika would refuse locally (NoFreeChannels); force the open on the wire
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as info:
        conn.channel(channel_number=4)
    assert info.value.reply_code == 530
    assert "NOT_ALLOWED" in info.value.reply_text
    assert "channel_max" in info.value.reply_text


def test_channel_number_reuse_after_close(connect):
    conn = connect(channel_max=2)
    a = conn.channel()
    b = conn.channel()
    a.close()
    c = conn.channel()
    assert c.channel_number == a.channel_number
    assert b.is_open and c.is_open


def test_server_properties_and_capabilities(conn):
    props = conn._impl.server_properties
    for key in ("product", "version", "platform", "capabilities"):
        assert key in props, key
    caps = conn._impl.server_capabilities
    for cap in (
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "consumer_cancel_notify",
        "connection.blocked",
        "authentication_failure_close",
        "per_consumer_qos",
        "consumer_priorities",
        "direct_reply_to",
    ):
        assert caps.get(cap) is True, cap


def test_many_channels_interleaved(conn, names):
    q = names.q()
    chans = [conn.channel() for _ in range(20)]
    chans[0].queue_declare(q)
    for i, c in enumerate(chans):
        c.basic_publish("", q, b"%d" % i)
    # channels are independent, so wait for all of them to be routed
    wait_message_count(chans[0], q, 20)
    got = {get(chans[5], q)[2] for _ in range(20)}
    assert got == {b"%d" % i for i in range(20)}


def test_channel_error_leaves_connection_and_other_channels_open(conn, names):
    q = names.q()
    good = conn.channel()
    good.queue_declare(q)
    bad = conn.channel()
    with channel_error(404):
        bad.queue_declare(names.prefix + ".missing", passive=True)
    assert conn.is_open and good.is_open and bad.is_closed
    good.basic_publish("", q, b"still-works")
    assert get(good, q)[2] == b"still-works"


def test_connection_close_by_client(broker):
    conn = pika.BlockingConnection(broker.params())
    conn.channel()
    conn.close()
    assert conn.is_closed


# --------------------------------------------------------------------------
# direct reply-to


def test_direct_reply_to_rpc(connect, names):
    client_conn, server_conn = connect(node=0), connect(node=1)
    rpc_q = names.q("rpc")
    server_ch = server_conn.channel()
    server_ch.queue_declare(rpc_q)

    def serve(ch, method, props, body):
        assert props.reply_to.startswith("amq.rabbitmq.reply-to.")
        ch.basic_publish(
            "",
            props.reply_to,
            body.upper(),
            pika.BasicProperties(correlation_id=props.correlation_id),
        )
        ch.basic_ack(method.delivery_tag)

    server_ch.basic_consume(rpc_q, serve)

    client_ch = client_conn.channel()
    replies = Collector()
    client_ch.basic_consume("amq.rabbitmq.reply-to", replies, auto_ack=True)
    corr = str(uuid.uuid4())
    client_ch.basic_publish(
        "",
        rpc_q,
        b"ping",
        pika.BasicProperties(reply_to="amq.rabbitmq.reply-to", correlation_id=corr),
    )

    def pumped():
        server_conn.process_data_events(time_limit=0.02)
        return replies.items

    wait_until(pumped, conn=client_conn, what="RPC reply")
    method, props, body = replies.items[0]
    assert body == b"PING"
    assert props.correlation_id == corr
    assert method.routing_key.startswith("amq.rabbitmq.reply-to")


def test_direct_reply_to_requires_no_ack_consumer_406(ch):
    with channel_error(406, "PRECONDITION_FAILED"):
        ch.basic_consume("amq.rabbitmq.reply-to", lambda *a: None, auto_ack=False)


def test_direct_reply_to_publish_without_consumer_406(ch, names):
    q = names.q()
    ch.queue_declare(q)
    ch.basic_publish(
        "", q, b"m", pika.BasicProperties(reply_to="amq.rabbitmq.reply-to")
    )
    with channel_error(406, "fast reply consumer does not exist"):
        ch.queue_declare(q, passive=True)


def test_direct_reply_to_passive_declare(ch):
    # clients may check for the pseudo-queue with a passive declare
    ok = ch.queue_declare("amq.rabbitmq.reply-to", passive=True)
    assert ok.method.queue == "amq.rabbitmq.reply-to"
