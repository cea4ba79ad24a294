"""Core AMQP 0-9-1 behaviour through pika's BlockingConnection."""

import datetime
import decimal
import os

import pika
import pika.exceptions
import pytest

from helpers import (
    Collector,
    channel_error,
    consume,
    get,
    pump,
    queue_exists,
    wait_message_count,
    wait_until,
)

# --------------------------------------------------------------------------
# connection / authentication


def test_connect_and_open_channel(conn):
    assert conn.is_open
    ch = conn.channel()
    assert ch.is_open
    ch.close()
    assert ch.is_closed


def test_wrong_password_is_refused(broker):
    params = broker.params(credentials=pika.PlainCredentials(broker.user, "definitely-wrong"))
    with pytest.raises(
        (pika.exceptions.ProbableAuthenticationError, pika.exceptions.ConnectionClosedByBroker)
    ) as info:
        pika.BlockingConnection(params)
    # RabbitMQ advertises authentication_failure_close and answers with
    # connection.close 403 ACCESS_REFUSED before dropping the socket.
    assert "403" in str(info.value) or getattr(info.value, "reply_code", None) == 403
    assert "ACCESS_REFUSED" in str(info.value)


def test_unknown_user_is_refused(broker):
    params = broker.params(credentials=pika.PlainCredentials("no-such-user-xyz", "x"))
    with pytest.raises(
        (pika.exceptions.ProbableAuthenticationError, pika.exceptions.ConnectionClosedByBroker)
    ) as info:
        pika.BlockingConnection(params)
    assert "ACCESS_REFUSED" in str(info.value)


def test_unknown_vhost_is_refused(broker):
    params = broker.params(virtual_host="no-such-vhost-xyz")
    with pytest.raises(pika.exceptions.AMQPConnectionError) as info:
        pika.BlockingConnection(params)
    # connection.open on a missing vhost: 530 NOT_ALLOWED
    assert "530" in str(info.value) and "NOT_ALLOWED" in str(info.value)


# --------------------------------------------------------------------------
# queue declare


def test_declare_returns_name_and_counts(ch, connect, names):
    q = names.q()
    ok = ch.queue_declare(q)
    assert ok.method.queue == q
    assert ok.method.message_count == 0
    assert ok.method.consumer_count == 0
    publisher = connect(node=1).channel()
    for i in range(3):
        publisher.basic_publish("", q, b"m%d" % i)
    wait_message_count(ch, q, 3)
    ok = ch.queue_declare(q)  # redeclare with the same properties is fine
    assert ok.method.message_count == 3
    assert ok.method.consumer_count == 0
    ch.basic_consume(q, lambda *a: None)
    ok = ch.queue_declare(q, passive=True)
    assert ok.method.consumer_count == 1


def test_passive_declare_missing_queue_404(ch, prefix):
    with channel_error(404, "NOT_FOUND"):
        ch.queue_declare(prefix + ".missing", passive=True)
    assert ch.is_closed


def test_passive_declare_existing_queue(ch, connect, names):
    q = names.q()
    ch.queue_declare(q)
    ok = connect(node=1).channel().queue_declare(q, passive=True)
    assert ok.method.queue == q


def test_redeclare_with_different_durable_406(ch, connect, names):
    q = names.q()
    ch.queue_declare(q, durable=False)
    other = connect(node=1).channel()
    with channel_error(406, "inequivalent arg 'durable'"):
        other.queue_declare(q, durable=True)


def test_server_named_queue(ch):
    ok = ch.queue_declare("", exclusive=True)
    assert ok.method.queue.startswith("amq.gen-")
    # usable straight away through the default exchange
    ch.basic_publish("", ok.method.queue, b"hi")
    _, _, body = get(ch, ok.method.queue)
    assert body == b"hi"


def test_declare_amq_prefixed_queue_403(ch):
    with channel_error(403, "ACCESS_REFUSED"):
        ch.queue_declare("amq.my-queue")


def test_durable_queue_declare(ch, connect, names):
    q = names.q()
    ch.queue_declare(q, durable=True)
    ch.basic_publish("", q, b"x", pika.BasicProperties(delivery_mode=2))
    _, props, body = get(connect(node=1).channel(), q)
    assert body == b"x" and props.delivery_mode == 2


def test_exclusive_queue_locked_for_other_connections(connect, names):
    c1, c2 = connect(node=0), connect(node=1)
    q = names.q()
    ch1 = c1.channel()
    ch1.queue_declare(q, exclusive=True)
    ch2 = c2.channel()
    with channel_error(405, "RESOURCE_LOCKED"):
        ch2.queue_declare(q, passive=True)
    ch2 = c2.channel()
    with channel_error(405, "RESOURCE_LOCKED"):
        ch2.basic_consume(q, lambda *a: None)
    ch2 = c2.channel()
    with channel_error(405, "RESOURCE_LOCKED"):
        ch2.queue_declare(q, exclusive=True)
    # the owner can use it from any of its channels
    other = c1.channel()
    assert other.queue_declare(q, passive=True).method.queue == q


def test_exclusive_queue_deleted_when_owner_closes(connect, names):
    c1, c2 = connect(node=0), connect(node=2)
    q = names.q()
    c1.channel().queue_declare(q, exclusive=True)
    assert queue_exists(c2, q)
    c1.close()
    wait_until(lambda: not queue_exists(c2, q), what="exclusive queue to go")


def test_auto_delete_queue_deleted_after_last_consumer(connect, names):
    c1, c2 = connect(node=0), connect(node=1)
    q = names.q()
    ch = c1.channel()
    ch.queue_declare(q, auto_delete=True)
    t1 = ch.basic_consume(q, lambda *a: None)
    t2 = ch.basic_consume(q, lambda *a: None)
    ch.basic_cancel(t1)
    assert queue_exists(c2, q), "still has a consumer"
    ch.basic_cancel(t2)
    wait_until(lambda: not queue_exists(c2, q), what="auto-delete queue to go")


def test_auto_delete_queue_without_consumers_stays(connect, names):
    c1, c2 = connect(node=0), connect(node=2)
    q = names.q()
    c1.channel().queue_declare(q, auto_delete=True)
    c1.close()
    # never had a consumer, so it is not deleted
    assert queue_exists(c2, q)


# --------------------------------------------------------------------------
# bind / unbind / purge / delete


def test_bind_and_unbind(ch, names):
    q, x = names.q(), names.x()
    ch.exchange_declare(x, "direct")
    ch.queue_declare(q)
    ch.queue_bind(q, x, routing_key="k")
    ch.basic_publish(x, "k", b"one")
    _, _, body = get(ch, q)
    assert body == b"one"
    ch.queue_unbind(q, x, routing_key="k")
    ch.confirm_delivery()
    with pytest.raises(pika.exceptions.UnroutableError):
        ch.basic_publish(x, "k", b"two", mandatory=True)
    assert ch.queue_declare(q, passive=True).method.message_count == 0


def test_bind_to_missing_exchange_404(ch, names):
    q = names.q()
    ch.queue_declare(q)
    with channel_error(404, "NOT_FOUND"):
        ch.queue_bind(q, names.prefix + ".nox", routing_key="k")


def test_bind_missing_queue_404(ch, names):
    x = names.x()
    ch.exchange_declare(x, "direct")
    with channel_error(404, "NOT_FOUND"):
        ch.queue_bind(names.prefix + ".noq", x, routing_key="k")


def test_unbind_nonexistent_binding_is_ok(ch, names):
    q, x = names.q(), names.x()
    ch.exchange_declare(x, "direct")
    ch.queue_declare(q)
    ch.queue_unbind(q, x, routing_key="never-bound")
    assert ch.is_open


def test_purge_returns_count(ch, names):
    q = names.q()
    ch.queue_declare(q)
    for i in range(5):
        ch.basic_publish("", q, b"m")
    wait_message_count(ch, q, 5)
    ok = ch.queue_purge(q)
    assert ok.method.message_count == 5
    assert ch.queue_declare(q, passive=True).method.message_count == 0
    assert ch.queue_purge(q).method.message_count == 0


def test_delete_returns_message_count(ch, names):
    q = names.q()
    ch.queue_declare(q)
    for i in range(4):
        ch.basic_publish("", q, b"m")
    wait_message_count(ch, q, 4)
    ok = ch.queue_delete(q)
    assert ok.method.message_count == 4


def test_delete_missing_queue_is_ok(ch, prefix):
    # RabbitMQ treats deleting a missing queue as success (message_count 0)
    ok = ch.queue_delete(prefix + ".never")
    assert ok.method.message_count == 0


def test_delete_if_unused_406(ch, connect, names):
    q = names.q()
    ch.queue_declare(q)
    ch.basic_consume(q, lambda *a: None)
    ch2 = connect(node=1).channel()
    with channel_error(406, "PRECONDITION_FAILED"):
        ch2.queue_delete(q, if_unused=True)
    assert queue_exists(ch.connection, q)


def test_delete_if_empty_406(ch, connect, names):
    q = names.q()
    ch.queue_declare(q)
    ch.basic_publish("", q, b"m")
    wait_message_count(ch, q, 1)
    ch2 = connect(node=2).channel()
    with channel_error(406, "PRECONDITION_FAILED"):
        ch2.queue_delete(q, if_empty=True)
    assert queue_exists(ch.connection, q)
    ch.queue_purge(q)
    ch.queue_delete(q, if_empty=True, if_unused=True)
    assert not queue_exists(ch.connection, q)


# --------------------------------------------------------------------------
# publish / consume / ack


def test_publish_consume_ack(conn, ch, connect, names):
    q = names.q()
    ch.queue_declare(q)
    connect(node=1).channel().basic_publish("", q, b"hello")
    items = consume(conn, ch, q, 1)
    method, props, body = items[0]
    assert body == b"hello"
    assert method.redelivered is False
    assert method.exchange == ""
    assert method.routing_key == q
    assert method.delivery_tag == 1
    assert ch.queue_declare(q, passive=True).method.message_count == 0


def test_consume_from_missing_queue_404(ch, prefix):
    with channel_error(404, "NOT_FOUND"):
        ch.basic_consume(prefix + ".missing", lambda *a: None)


def test_unacked_messages_requeued_when_channel_closes(connect, names):
    c1 = connect()
    q = names.q()
    ch = c1.channel()
    ch.queue_declare(q)
    ch.basic_publish("", q, b"a")
    ch.basic_publish("", q, b"b")
    col = Collector(ack=False)
    ch.basic_consume(q, col)
    col.wait(c1, 2)
    ch.close()
    ch2 = c1.channel()
    items = consume(c1, ch2, q, 2)
    assert [b for (_, _, b) in items] == [b"a", b"b"]
    assert all(m.redelivered for (m, _, _) in items)


def test_ack_multiple(conn, ch, names):
    q = names.q()
    ch.queue_declare(q)
    for i in range(5):
        ch.basic_publish("", q, b"%d" % i)
    col = Collector(ack=False)
    tag = ch.basic_consume(q, col)
    col.wait(conn, 5)
    ch.basic_ack(col.items[3][0].delivery_tag, multiple=True)  # acks 1..4
    ch.basic_cancel(tag)
    ch.close()
    ch = conn.channel()
    wait_message_count(ch, q, 1)
    _, _, body = get(ch, q)
    assert body == b"4"


def test_ack_unknown_delivery_tag_406(ch, names):
    q = names.q()
    ch.queue_declare(q)
    ch.basic_ack(delivery_tag=42)
    with channel_error(406, "unknown delivery tag 42"):
        ch.queue_declare(q, passive=True)  # forces a round trip


def test_double_ack_406(ch, names):
    q = names.q()
    ch.queue_declare(q)
    ch.basic_publish("", q, b"m")
    method, _, _ = get(ch, q, auto_ack=False)
    ch.basic_ack(method.delivery_tag)
    ch.basic_ack(method.delivery_tag)
    with channel_error(406, "unknown delivery tag"):
        ch.queue_declare(q, passive=True)


def test_nack_requeue_sets_redelivered(conn, ch, names):
    q = names.q()
    ch.queue_declare(q)
    ch.basic_publish("", q, b"m")
    method, _, _ = get(ch, q, auto_ack=False)
    assert method.redelivered is False
    ch.basic_nack(method.delivery_tag, requeue=True)
    method, _, body = get(ch, q, auto_ack=False)
    assert body == b"m"
    assert method.redelivered is True
    ch.basic_ack(method.delivery_tag)


def test_reject_requeue_sets_redelivered(conn, ch, names):
    q = names.q()
    ch.queue_declare(q)
    ch.basic_publish("", q, b"m")
    method, _, _ = get(ch, q, auto_ack=False)
    ch.basic_reject(method.delivery_tag, requeue=True)
    method, _, body = get(ch, q, auto_ack=False)
    assert body == b"m" and method.redelivered is True
    ch.basic_ack(method.delivery_tag)


def test_requeued_message_keeps_its_position(ch, names):
    q = names.q()
    ch.queue_declare(q)
    for b in (b"1", b"2", b"3"):
        ch.basic_publish("", q, b)
    m1, _, _ = get(ch, q, auto_ack=False)
    ch.basic_nack(m1.delivery_tag, requeue=True)
    # RabbitMQ puts a requeued message back at (or near) its original position
    bodies = [get(ch, q)[2] for _ in range(3)]
    assert bodies == [b"1", b"2", b"3"]


def test_nack_and_reject_without_requeue_drop(ch, names):
    q = names.q()
    ch.queue_declare(q)
    ch.basic_publish("", q, b"a")
    ch.basic_publish("", q, b"b")
    m1, _, _ = get(ch, q, auto_ack=False)
    m2, _, _ = get(ch, q, auto_ack=False)
    ch.basic_nack(m1.delivery_tag, requeue=False)
    ch.basic_reject(m2.delivery_tag, requeue=False)
    assert ch.queue_declare(q, passive=True).method.message_count == 0
    ch.close()
    ch = ch.connection.channel()
    assert ch.queue_declare(q, passive=True).method.message_count == 0


def test_nack_multiple_requeue(ch, names):
    q = names.q()
    ch.queue_declare(q)
    for i in range(3):
        ch.basic_publish("", q, b"%d" % i)
    tags = [get(ch, q, auto_ack=False)[0].delivery_tag for _ in range(3)]
    ch.basic_nack(tags[-1], multiple=True, requeue=True)
    items = [get(ch, q) for _ in range(3)]
    assert [b for (_, _, b) in items] == [b"0", b"1", b"2"]
    assert all(m.redelivered for (m, _, _) in items)


def test_basic_get_and_get_empty(ch, names):
    q = names.q()
    ch.queue_declare(q)
    method, props, body = ch.basic_get(q)
    assert method is None and props is None and body is None  # get-empty
    ch.basic_publish("", q, b"a")
    ch.basic_publish("", q, b"b")
    wait_message_count(ch, q, 2)
    method, props, body = ch.basic_get(q, auto_ack=True)
    assert body == b"a"
    assert method.message_count == 1  # messages remaining
    assert method.redelivered is False
    method, _, body = ch.basic_get(q, auto_ack=False)
    assert body == b"b" and method.message_count == 0
    ch.basic_ack(method.delivery_tag)
    assert ch.basic_get(q)[0] is None


def test_basic_get_missing_queue_404(ch, prefix):
    with channel_error(404, "NOT_FOUND"):
        ch.basic_get(prefix + ".missing")


def test_qos_prefetch_is_respected(conn, ch, connect, names):
    q = names.q()
    ch.queue_declare(q)
    publisher = connect(node=2).channel()
    for i in range(10):
        publisher.basic_publish("", q, b"%d" % i)
    wait_message_count(ch, q, 10)
    ch.basic_qos(prefetch_count=2)
    col = Collector(ack=False)
    ch.basic_consume(q, col)
    col.wait(conn, 2)
    pump(conn, 0.5)
    assert col.bodies == [b"0", b"1"], "prefetch=2 with no acks must stop at 2"
    # acking one lets exactly one more through
    ch.basic_ack(col.items[0][0].delivery_tag)
    col.wait(conn, 3)
    pump(conn, 0.3)
    assert col.bodies == [b"0", b"1", b"2"]


def test_qos_prefetch_with_multiple_ack(conn, ch, names):
    q = names.q()
    ch.queue_declare(q)
    for i in range(6):
        ch.basic_publish("", q, b"%d" % i)
    ch.basic_qos(prefetch_count=3)
    col = Collector(ack=False)
    ch.basic_consume(q, col)
    col.wait(conn, 3)
    pump(conn, 0.3)
    assert len(col.items) == 3
    ch.basic_ack(col.items[2][0].delivery_tag, multiple=True)
    col.wait(conn, 6)
    assert col.bodies == [b"%d" % i for i in range(6)]


def test_no_ack_consumer_ignores_prefetch(conn, ch, names):
    q = names.q()
    ch.queue_declare(q)
    for i in range(5):
        ch.basic_publish("", q, b"%d" % i)
    ch.basic_qos(prefetch_count=1)
    col = Collector()
    ch.basic_consume(q, col, auto_ack=True)
    col.wait(conn, 5)
    assert len(col.items) == 5


def test_recover_requeue_redelivers(conn, ch, names):
    q = names.q()
    ch.queue_declare(q)
    ch.basic_publish("", q, b"a")
    ch.basic_publish("", q, b"b")
    col = Collector(ack=False)
    ch.basic_consume(q, col)
    col.wait(conn, 2)
    assert not any(m.redelivered for (m, _, _) in col.items)
    ch.basic_recover(requeue=True)
    col.wait(conn, 4)
    redelivered = col.items[2:]
    assert sorted(b for (_, _, b) in redelivered) == [b"a", b"b"]
    assert all(m.redelivered for (m, _, _) in redelivered)
    for m, _, _ in redelivered:
        ch.basic_ack(m.delivery_tag)


# --------------------------------------------------------------------------
# publisher confirms / mandatory


def test_publisher_confirms_ack(ch, connect, names):
    q = names.q()
    ch.queue_declare(q)
    ch.confirm_delivery()
    for i in range(20):
        ch.basic_publish("", q, b"%d" % i)  # raises if nacked
    wait_message_count(connect(node=1).channel(), q, 20)


def test_mandatory_unroutable_returns_312(ch, prefix):
    ch.confirm_delivery()
    with pytest.raises(pika.exceptions.UnroutableError) as info:
        ch.basic_publish("", prefix + ".nowhere", b"lost", mandatory=True)
    returned = info.value.messages[0]
    assert returned.method.reply_code == 312
    assert returned.method.reply_text == "NO_ROUTE"
    assert returned.method.exchange == ""
    assert returned.method.routing_key == prefix + ".nowhere"
    assert returned.body == b"lost"


def test_mandatory_return_without_confirms(conn, ch, prefix):
    returned = []
    ch.add_on_return_callback(lambda c, m, p, b: returned.append((m, p, b)))
    ch.basic_publish(
        "", prefix + ".nowhere", b"back", pika.BasicProperties(message_id="r1"), mandatory=True
    )
    wait_until(lambda: returned, conn=conn, what="basic.return")
    m, p, b = returned[0]
    assert (m.reply_code, m.reply_text, b, p.message_id) == (312, "NO_ROUTE", b"back", "r1")


def test_unroutable_without_mandatory_is_confirmed(ch, prefix):
    ch.confirm_delivery()
    ch.basic_publish("", prefix + ".nowhere", b"dropped")  # acked, silently dropped
    assert ch.is_open


def test_publish_to_missing_exchange_404(ch, prefix):
    ch.basic_publish(prefix + ".nox", "k", b"m")
    with channel_error(404, "NOT_FOUND"):
        ch.queue_declare("", exclusive=True)


# --------------------------------------------------------------------------
# consumers


def test_consumer_cancel_notification_on_queue_delete(connect, names):
    c1, c2 = connect(node=0), connect(node=1)
    q = names.q()
    ch = c1.channel()
    ch.queue_declare(q)
    cancelled = []
    ch.add_on_cancel_callback(lambda frame: cancelled.append(frame))
    tag = ch.basic_consume(q, lambda *a: None)
    c2.channel().queue_delete(q)
    wait_until(lambda: cancelled, conn=c1, what="basic.cancel from the broker")
    assert cancelled[0].method.consumer_tag == tag
    assert ch.is_open


def test_duplicate_consumer_tag_530(ch, names):
    q = names.q()
    ch.queue_declare(q)
    ch.basic_consume(q, lambda *a: None, consumer_tag="dup")
    # pika refuses a duplicate tag locally, so send the raw method.
    ch._impl._send_method(pika.spec.Basic.Consume(queue=q, consumer_tag="dup"))
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as info:
        ch.queue_declare(q, passive=True)
    assert info.value.reply_code == 530
    assert "NOT_ALLOWED" in info.value.reply_text
    assert "reuse consumer tag" in info.value.reply_text


def test_exclusive_consumer_blocks_others_403(connect, names):
    c1, c2 = connect(node=0), connect(node=1)
    q = names.q()
    ch1 = c1.channel()
    ch1.queue_declare(q)
    ch1.basic_consume(q, lambda *a: None, exclusive=True)
    ch2 = c2.channel()
    with channel_error(403, "ACCESS_REFUSED"):
        ch2.basic_consume(q, lambda *a: None)


def test_exclusive_consumer_refused_when_queue_has_consumers_403(connect, names):
    c1, c2 = connect(node=0), connect(node=2)
    q = names.q()
    ch1 = c1.channel()
    ch1.queue_declare(q)
    ch1.basic_consume(q, lambda *a: None)
    ch2 = c2.channel()
    with channel_error(403, "ACCESS_REFUSED"):
        ch2.basic_consume(q, lambda *a: None, exclusive=True)


def test_round_robin_between_consumers(conn, ch, connect, names):
    q = names.q()
    ch.queue_declare(q)
    a, b = Collector(ack=True), Collector(ack=True)
    ch.basic_consume(q, a)
    ch.basic_consume(q, b)
    publisher = connect(node=1).channel()
    for i in range(10):
        publisher.basic_publish("", q, b"%d" % i)
    wait_until(lambda: len(a.items) + len(b.items) == 10, conn=conn, what="10 deliveries")
    assert len(a.items) == 5 and len(b.items) == 5


def test_cancel_consumer_stops_delivery(conn, ch, names):
    q = names.q()
    ch.queue_declare(q)
    col = Collector(ack=True)
    tag = ch.basic_consume(q, col)
    ch.basic_publish("", q, b"1")
    col.wait(conn, 1)
    ch.basic_cancel(tag)
    ch.basic_publish("", q, b"2")
    wait_message_count(ch, q, 1)
    assert col.bodies == [b"1"]


# --------------------------------------------------------------------------
# transactions


def test_tx_commit_and_rollback(ch, connect, names):
    q = names.q()
    ch.queue_declare(q)
    ch.tx_select()
    ch.basic_publish("", q, b"rolled-back")
    observer = connect(node=1).channel()
    assert observer.queue_declare(q, passive=True).method.message_count == 0
    ch.tx_rollback()
    assert observer.queue_declare(q, passive=True).method.message_count == 0
    ch.basic_publish("", q, b"committed")
    ch.tx_commit()
    wait_message_count(observer, q, 1)
    _, _, body = get(observer, q)
    assert body == b"committed"


def test_tx_ack_rollback_keeps_message(ch, names):
    q = names.q()
    ch.queue_declare(q)
    ch.basic_publish("", q, b"m")
    ch.tx_select()
    method, _, _ = get(ch, q, auto_ack=False)
    ch.basic_ack(method.delivery_tag)
    ch.tx_rollback()
    ch.close()
    ch = ch.connection.channel()
    wait_message_count(ch, q, 1)
    ch.tx_select()
    method, _, _ = get(ch, q, auto_ack=False)
    ch.basic_ack(method.delivery_tag)
    ch.tx_commit()
    ch.close()
    ch = ch.connection.channel()
    assert ch.queue_declare(q, passive=True).method.message_count == 0


def test_tx_commit_without_select_406(ch):
    with channel_error(406, "PRECONDITION_FAILED"):
        ch.tx_commit()


def test_confirm_after_tx_select_406(ch):
    ch.tx_select()
    with channel_error(406, "PRECONDITION_FAILED"):
        ch.confirm_delivery()


# --------------------------------------------------------------------------
# volume and size


def test_ten_thousand_messages_in_order(conn, ch, connect, names):
    q = names.q()
    ch.queue_declare(q)
    n = 10_000
    consumer_conn = connect(node=2)
    cch = consumer_conn.channel()
    cch.basic_qos(prefetch_count=500)
    received = []

    def on_msg(c, method, props, body):
        received.append(body)
        if len(received) % 100 == 0:
            c.basic_ack(method.delivery_tag, multiple=True)

    cch.basic_consume(q, on_msg)
    for i in range(n):
        ch.basic_publish("", q, b"%d" % i)
    wait_until(lambda: len(received) >= n, timeout=60, conn=consumer_conn, what=f"{n} messages")
    assert received == [b"%d" % i for i in range(n)]


@pytest.mark.parametrize("size", [1 << 20, 16 << 20], ids=["1MiB", "16MiB"])
def test_large_body_round_trip(ch, connect, names, size):
    q = names.q()
    ch.queue_declare(q)
    body = os.urandom(1024) * (size // 1024)
    publisher = connect(node=1).channel()
    publisher.confirm_delivery()
    publisher.basic_publish("", q, body)
    _, _, got = get(ch, q, timeout=30)
    assert len(got) == size
    assert got == body


def test_empty_body_round_trip(ch, connect, names):
    q = names.q()
    ch.queue_declare(q)
    connect(node=2).channel().basic_publish("", q, b"")
    _, props, body = get(ch, q)
    assert body == b""


# --------------------------------------------------------------------------
# properties


def test_all_basic_properties_round_trip(ch, connect, names, broker):
    q = names.q()
    ch.queue_declare(q)
    ts = datetime.datetime(2024, 5, 17, 12, 30, 45, tzinfo=datetime.timezone.utc)
    # Every field-table type pika can encode (pika has no encoder for floats:
    # it raises UnsupportedAMQPFieldException, so they are not covered here).
    headers = {
        "str": "text ünïcode",
        "bytes": b"\x00\x01binary\xff",
        "int": 42,
        "negative": -7,
        "bigint": 2**40 + 3,
        "true": True,
        "false": False,
        "none": None,
        "dict": {"a": 1, "nested": {"b": "c"}},
        "list": [1, "two", b"3", [4], {"five": 5}, None, True],
        "timestamp": ts,
        "decimal": decimal.Decimal("12.345"),
        "empty-str": "",
        "empty-list": [],
        "empty-dict": {},
    }
    props = pika.BasicProperties(
        content_type="application/json",
        content_encoding="gzip",
        headers=headers,
        delivery_mode=2,
        priority=7,
        correlation_id="corr-1",
        reply_to="reply.queue",
        expiration="600000",
        message_id="msg-1",
        timestamp=1700000000,
        type="my.type",
        user_id=broker.user,
        app_id="the-app",
    )
    connect(node=1).channel().basic_publish("", q, b"{}", props)
    _, got, body = get(ch, q)
    assert body == b"{}"
    assert got.content_type == "application/json"
    assert got.content_encoding == "gzip"
    assert got.delivery_mode == 2
    assert got.priority == 7
    assert got.correlation_id == "corr-1"
    assert got.reply_to == "reply.queue"
    assert got.expiration == "600000"
    assert got.message_id == "msg-1"
    assert got.timestamp == 1700000000
    assert got.type == "my.type"
    assert got.user_id == broker.user
    assert got.app_id == "the-app"
    h = got.headers
    assert set(h) == set(headers)
    assert h["str"] == "text ünïcode"
    assert h["bytes"] == b"\x00\x01binary\xff"
    assert h["int"] == 42 and h["negative"] == -7
    assert h["bigint"] == 2**40 + 3
    assert h["true"] is True and h["false"] is False
    assert h["none"] is None
    assert h["dict"] == {"a": 1, "nested": {"b": "c"}}
    assert h["list"] == [1, "two", b"3", [4], {"five": 5}, None, True]
    assert h["timestamp"] == ts
    assert h["decimal"] == decimal.Decimal("12.345")
    assert h["empty-str"] == "" and h["empty-list"] == [] and h["empty-dict"] == {}


def test_absent_properties_stay_absent(ch, connect, names):
    q = names.q()
    ch.queue_declare(q)
    connect(node=2).channel().basic_publish("", q, b"x")
    _, got, _ = get(ch, q)
    for attr in (
        "content_type",
        "content_encoding",
        "headers",
        "delivery_mode",
        "priority",
        "correlation_id",
        "reply_to",
        "expiration",
        "message_id",
        "timestamp",
        "type",
        "user_id",
        "app_id",
        "cluster_id",
    ):
        assert getattr(got, attr) is None, attr


def test_user_id_must_match_authenticated_user_406(ch, names):
    q = names.q()
    ch.queue_declare(q)
    ch.basic_publish("", q, b"x", pika.BasicProperties(user_id="someone-else"))
    with channel_error(406, "user_id property set to 'someone-else' but authenticated user was"):
        ch.queue_declare(q, passive=True)
