"""Optional queue arguments (x-*) and queue types through pika."""

import pika
import pika.exceptions
import pytest

from helpers import (
    Collector,
    channel_error,
    get,
    pump,
    wait_message_count,
    wait_until,
)

QUORUM = {"x-queue-type": "quorum"}


def _drain(ch, q):
    out = []
    while True:
        method, _, body = ch.basic_get(q, auto_ack=True)
        if method is None:
            return out
        out.append(body)


def _dlx_setup(ch, names, **src_args):
    """A fanout dead-letter exchange with a queue behind it.

    Tests declare these on another node than the source queue, so that
    dead-lettering crosses nodes on a cluster.
    """
    dlx, dlq = names.x("dlx"), names.q("dlq")
    ch.exchange_declare(dlx, "fanout")
    ch.queue_declare(dlq)
    ch.queue_bind(dlq, dlx)
    return dlx, dlq


def _queue_exists_untouched(ch, q):
    """Whether ``q`` exists, without declaring or reading it.

    A passive queue.declare counts as a use and renews an x-expires lease on
    RabbitMQ, so existence is probed with a throwaway binding instead.
    """
    c = ch.connection.channel()
    try:
        c.queue_bind(q, "amq.direct", routing_key="exists-probe." + q)
    except pika.exceptions.ChannelClosedByBroker as e:
        assert e.reply_code == 404, (e.reply_code, e.reply_text)
        return False
    c.queue_unbind(q, "amq.direct", routing_key="exists-probe." + q)
    c.close()
    return True


# --------------------------------------------------------------------------
# TTL


def test_message_ttl_expires_messages(ch, names):
    q = names.q()
    ch.queue_declare(q, arguments={"x-message-ttl": 100})
    ch.confirm_delivery()
    ch.basic_publish("", q, b"short-lived")
    wait_message_count(ch, q, 0, timeout=10)
    assert ch.basic_get(q)[0] is None


def test_message_ttl_zero_without_consumer_drops(ch, names):
    q = names.q()
    ch.queue_declare(q, arguments={"x-message-ttl": 0})
    ch.confirm_delivery()
    ch.basic_publish("", q, b"m")
    wait_message_count(ch, q, 0)


def test_message_ttl_dead_letters_with_x_death(ch, connect, names):
    dl = connect(node=1).channel()
    dlx, dlq = _dlx_setup(dl, names)
    q = names.q("src")
    ch.queue_declare(q, arguments={"x-message-ttl": 100, "x-dead-letter-exchange": dlx})
    ch.basic_publish("", q, b"expiring", pika.BasicProperties(message_id="m1"))
    method, props, body = get(dl, dlq, timeout=10)
    assert body == b"expiring"
    assert props.message_id == "m1"
    # no dead-letter routing key set: the original routing key is kept
    assert method.exchange == dlx
    assert method.routing_key == q
    xdeath = props.headers["x-death"]
    assert isinstance(xdeath, list) and len(xdeath) == 1
    d = xdeath[0]
    assert d["reason"] == "expired"
    assert d["queue"] == q
    assert d["exchange"] == ""
    assert d["routing-keys"] == [q]
    assert d["count"] == 1
    assert "time" in d
    assert props.headers["x-first-death-reason"] == "expired"
    assert props.headers["x-first-death-queue"] == q
    assert props.headers["x-first-death-exchange"] == ""


def test_per_message_expiration(ch, names):
    q = names.q()
    ch.queue_declare(q)
    ch.confirm_delivery()
    ch.basic_publish("", q, b"expires", pika.BasicProperties(expiration="100"))
    ch.basic_publish("", q, b"stays")
    wait_message_count(ch, q, 1, timeout=10)
    assert _drain(ch, q) == [b"stays"]


def test_per_message_expiration_dead_letter_records_original(ch, connect, names):
    dl = connect(node=2).channel()
    dlx, dlq = _dlx_setup(dl, names)
    q = names.q("src")
    ch.queue_declare(q, arguments={"x-dead-letter-exchange": dlx})
    ch.basic_publish("", q, b"m", pika.BasicProperties(expiration="50"))
    _, props, body = get(dl, dlq, timeout=10)
    assert body == b"m"
    # the expiration property is removed and kept in x-death
    assert props.expiration is None
    d = props.headers["x-death"][0]
    assert d["reason"] == "expired"
    assert d["original-expiration"] == "50"


def test_shorter_of_queue_ttl_and_expiration_wins(ch, names):
    q = names.q()
    ch.queue_declare(q, arguments={"x-message-ttl": 60000})
    ch.confirm_delivery()
    ch.basic_publish("", q, b"short", pika.BasicProperties(expiration="50"))
    ch.basic_publish("", q, b"queue-ttl")
    wait_message_count(ch, q, 1, timeout=10)
    assert _drain(ch, q) == [b"queue-ttl"]


def test_invalid_expiration_406(ch, names):
    q = names.q()
    ch.queue_declare(q)
    ch.basic_publish("", q, b"m", pika.BasicProperties(expiration="soon"))
    with channel_error(406, "invalid expiration 'soon'"):
        ch.queue_declare(q, passive=True)


def test_queue_expires_when_unused(ch, connect, names):
    q = names.q()
    ch.queue_declare(q, arguments={"x-expires": 300})
    observer = connect(node=1).channel()
    assert _queue_exists_untouched(observer, q)
    wait_until(
        lambda: not _queue_exists_untouched(observer, q),
        timeout=15,
        interval=0.1,
        what="x-expires queue to be deleted",
    )
    with channel_error(404, "NOT_FOUND"):
        observer.connection.channel().queue_declare(q, passive=True)


def test_queue_with_consumer_does_not_expire(conn, ch, connect, names):
    q = names.q()
    ch.queue_declare(q, arguments={"x-expires": 200})
    ch.basic_consume(q, lambda *a: None)
    pump(conn, 0.8)
    assert _queue_exists_untouched(connect(node=2).channel(), q)


# --------------------------------------------------------------------------
# length limits


def test_max_length_drop_head(ch, names):
    q = names.q()
    ch.queue_declare(q, arguments={"x-max-length": 2})
    ch.confirm_delivery()
    for b in (b"1", b"2", b"3"):
        ch.basic_publish("", q, b)
    assert ch.queue_declare(q, passive=True).method.message_count == 2
    assert _drain(ch, q) == [b"2", b"3"]


def test_max_length_drop_head_dead_letters_maxlen(ch, connect, names):
    dl = connect(node=1).channel()
    dlx, dlq = _dlx_setup(dl, names)
    q = names.q("src")
    ch.queue_declare(q, arguments={"x-max-length": 1, "x-dead-letter-exchange": dlx})
    ch.confirm_delivery()
    ch.basic_publish("", q, b"old")
    ch.basic_publish("", q, b"new")
    _, props, body = get(dl, dlq)
    assert body == b"old"
    assert props.headers["x-death"][0]["reason"] == "maxlen"
    assert _drain(ch, q) == [b"new"]


def test_max_length_reject_publish_nacks(ch, names):
    q = names.q()
    ch.queue_declare(q, arguments={"x-max-length": 2, "x-overflow": "reject-publish"})
    ch.confirm_delivery()
    ch.basic_publish("", q, b"1")
    ch.basic_publish("", q, b"2")
    with pytest.raises(pika.exceptions.NackError):
        ch.basic_publish("", q, b"3")
    assert ch.is_open
    assert _drain(ch, q) == [b"1", b"2"]
    ch.basic_publish("", q, b"4")  # room again
    assert _drain(ch, q) == [b"4"]


def test_max_length_bytes(ch, names):
    q = names.q()
    ch.queue_declare(q, arguments={"x-max-length-bytes": 10})
    ch.confirm_delivery()
    for b in (b"aaaaa", b"bbbbb", b"ccccc"):
        ch.basic_publish("", q, b)
    assert _drain(ch, q) == [b"bbbbb", b"ccccc"]


def test_max_length_zero_drops_everything(ch, names):
    q = names.q()
    ch.queue_declare(q, arguments={"x-max-length": 0})
    ch.confirm_delivery()
    ch.basic_publish("", q, b"gone")
    assert ch.queue_declare(q, passive=True).method.message_count == 0


# --------------------------------------------------------------------------
# dead lettering


def test_dead_letter_on_reject_with_routing_key(ch, connect, names):
    dl = connect(node=1).channel()
    dlx, dlq = names.x("dlx"), names.q("dlq")
    dl.exchange_declare(dlx, "direct")
    dl.queue_declare(dlq)
    dl.queue_bind(dlq, dlx, "dead")
    q = names.q("src")
    ch.queue_declare(
        q, arguments={"x-dead-letter-exchange": dlx, "x-dead-letter-routing-key": "dead"}
    )
    ch.basic_publish("", q, b"bad", pika.BasicProperties(headers={"keep": "me"}))
    method, _, _ = get(ch, q, auto_ack=False)
    ch.basic_reject(method.delivery_tag, requeue=False)
    method, props, body = get(dl, dlq)
    assert body == b"bad"
    assert method.exchange == dlx and method.routing_key == "dead"
    assert props.headers["keep"] == "me"
    d = props.headers["x-death"][0]
    assert d["reason"] == "rejected"
    assert d["queue"] == q
    assert d["routing-keys"] == [q]
    assert d["count"] == 1


def test_dead_letter_on_nack_to_default_exchange(ch, connect, names):
    dl = connect(node=2).channel()
    dlq = names.q("dlq")
    dl.queue_declare(dlq)
    q = names.q("src")
    ch.queue_declare(q, arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": dlq})
    ch.basic_publish("", q, b"m")
    method, _, _ = get(ch, q, auto_ack=False)
    ch.basic_nack(method.delivery_tag, requeue=False)
    _, props, body = get(dl, dlq)
    assert body == b"m"
    assert props.headers["x-death"][0]["reason"] == "rejected"


def test_requeue_does_not_dead_letter(ch, connect, names):
    dl = connect(node=1).channel()
    dlx, dlq = _dlx_setup(dl, names)
    q = names.q("src")
    ch.queue_declare(q, arguments={"x-dead-letter-exchange": dlx})
    ch.basic_publish("", q, b"m")
    method, _, _ = get(ch, q, auto_ack=False)
    ch.basic_reject(method.delivery_tag, requeue=True)
    method, _, body = get(ch, q)
    assert body == b"m" and method.redelivered
    assert dl.queue_declare(dlq, passive=True).method.message_count == 0


def test_x_death_count_increments_on_cycle(ch, connect, names):
    # q1 --(ttl)--> q2 --(reject)--> q1: the same (queue, reason) entry counts up
    # (q2 on another node, so both dead-letterings cross nodes on a cluster)
    q1, q2 = names.q("one"), names.q("two")
    ch2 = connect(node=1).channel()
    ch2.queue_declare(q2, arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": q1})
    ch.queue_declare(
        q1,
        arguments={
            "x-message-ttl": 50,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": q2,
        },
    )
    ch.basic_publish("", q1, b"m")
    for expected in (1, 2):
        method, props, _ = get(ch2, q2, auto_ack=False, timeout=10)
        deaths = {(d["queue"], d["reason"]): d["count"] for d in props.headers["x-death"]}
        assert deaths[(q1, "expired")] == expected
        ch2.basic_reject(method.delivery_tag, requeue=False)
    method, props, _ = get(ch2, q2, auto_ack=False, timeout=10)
    first = props.headers["x-death"][0]
    # the most recent death is first
    assert (first["queue"], first["reason"]) == (q1, "expired")
    ch2.basic_ack(method.delivery_tag)
    ch.queue_delete(q1)


# --------------------------------------------------------------------------
# quorum queues: delivery limit


def _reject_until_dead_lettered(conn, ch, q, dl, dlq, rejects):
    """Consume the one message in ``q``, rejecting (requeue=True) every delivery.

    Returns the x-delivery-count header of each of the ``rejects`` deliveries,
    and the dead-lettered message once it shows up in ``dlq`` (read on ``dl``).
    """
    seen = []

    def on_msg(c, method, props, body):
        seen.append(((props.headers or {}).get("x-delivery-count"), method.redelivered))
        c.basic_reject(method.delivery_tag, requeue=True)

    ch.basic_qos(prefetch_count=1)
    tag = ch.basic_consume(q, on_msg)
    wait_until(lambda: len(seen) >= rejects, conn=conn, what=f"{rejects} deliveries")
    dead = get(dl, dlq, timeout=10)
    ch.basic_cancel(tag)
    assert len(seen) == rejects, f"delivered again after the limit: {seen}"
    # redelivered is set on every delivery but the first
    assert [r for (_, r) in seen] == [False] + [True] * (rejects - 1)
    return [c for (c, _) in seen], dead


def test_quorum_delivery_limit_dead_letters(conn, ch, connect, names):
    dl = connect(node=1).channel()
    dlx, dlq = _dlx_setup(dl, names)
    q = names.q("qq")
    ch.queue_declare(
        q,
        durable=True,
        arguments={**QUORUM, "x-delivery-limit": 2, "x-dead-letter-exchange": dlx},
    )
    ch.basic_publish("", q, b"poison")
    counts, (method, props, body) = _reject_until_dead_lettered(conn, ch, q, dl, dlq, 3)
    # first delivery carries no count; each redelivery counts the returns so far
    assert counts == [None, 1, 2]
    assert body == b"poison"
    d = props.headers["x-death"][0]
    assert d["reason"] == "delivery_limit"
    assert d["queue"] == q
    assert ch.queue_declare(q, passive=True, durable=True, arguments=QUORUM).method.message_count == 0


def test_quorum_delivery_limit_without_dlx_drops(ch, names):
    q = names.q("qq")
    ch.queue_declare(q, durable=True, arguments={**QUORUM, "x-delivery-limit": 1})
    ch.basic_publish("", q, b"poison")
    for _ in range(2):
        method, _, _ = get(ch, q, auto_ack=False)
        ch.basic_reject(method.delivery_tag, requeue=True)
    wait_message_count(ch, q, 0)
    assert ch.basic_get(q)[0] is None


def test_quorum_redelivery_header_and_flag(conn, ch, names):
    q = names.q("qq")
    ch.queue_declare(q, durable=True, arguments=QUORUM)
    ch.basic_publish("", q, b"m")
    col = Collector(ack=False)
    ch.basic_consume(q, col)
    col.wait(conn, 1)
    method, props, _ = col.items[0]
    assert method.redelivered is False
    # (RabbitMQ 3.x adds x-delivery-count: 0 on a first basic.get, but not
    # on a first consumer delivery)
    assert "x-delivery-count" not in (props.headers or {})
    ch.basic_reject(method.delivery_tag, requeue=True)
    col.wait(conn, 2)
    method, props, _ = col.items[1]
    assert method.redelivered is True
    assert props.headers["x-delivery-count"] == 1
    ch.basic_ack(method.delivery_tag)


def test_quorum_nack_requeue_counts_toward_limit(conn, ch, names):
    # Every return counts toward x-delivery-limit, whether by basic.nack,
    # basic.reject or a closed channel (RabbitMQ 3.x to 4.2; Warren keeps this
    # rule so that a consumer that nacks a poison message forever cannot keep
    # it circulating). With limit 1 the message is gone after the second nack.
    q = names.q("qq")
    ch.queue_declare(q, durable=True, arguments={**QUORUM, "x-delivery-limit": 1})
    ch.basic_publish("", q, b"m")
    for _ in range(2):
        method, _, _ = get(ch, q, auto_ack=False)
        ch.basic_nack(method.delivery_tag, requeue=True)
    wait_message_count(ch, q, 0)
    method, _, _ = ch.basic_get(q, auto_ack=True)
    assert method is None


@pytest.mark.rabbitmq4
def test_quorum_default_delivery_limit_is_20(conn, ch, connect, names):
    # RabbitMQ 4.0 gives quorum queues a default x-delivery-limit of 20
    # (3.x has no default and redelivers forever).
    dl = connect(node=2).channel()
    dlx, dlq = _dlx_setup(dl, names)
    q = names.q("qq")
    ch.queue_declare(q, durable=True, arguments={**QUORUM, "x-dead-letter-exchange": dlx})
    ch.basic_publish("", q, b"poison")
    counts, (_, props, body) = _reject_until_dead_lettered(conn, ch, q, dl, dlq, 21)
    assert counts == [None] + list(range(1, 21))
    assert body == b"poison"
    assert props.headers["x-death"][0]["reason"] == "delivery_limit"


def test_quorum_explicit_delivery_limit_20(conn, ch, connect, names):
    # Same arithmetic as the 4.x default, with the limit given explicitly.
    dl = connect(node=1).channel()
    dlx, dlq = _dlx_setup(dl, names)
    q = names.q("qq")
    ch.queue_declare(
        q,
        durable=True,
        arguments={**QUORUM, "x-delivery-limit": 20, "x-dead-letter-exchange": dlx},
    )
    ch.basic_publish("", q, b"poison")
    counts, (_, props, body) = _reject_until_dead_lettered(conn, ch, q, dl, dlq, 21)
    assert counts == [None] + list(range(1, 21))
    assert props.headers["x-death"][0]["reason"] == "delivery_limit"


# --------------------------------------------------------------------------
# consumers: single active, priorities


def test_single_active_consumer(conn, connect, names):
    q = names.q()
    conn2 = connect(node=1)
    both = [conn, conn2]
    ch1, ch2 = conn.channel(), conn2.channel()
    ch1.queue_declare(q, arguments={"x-single-active-consumer": True})
    a, b = Collector(ack=True), Collector(ack=True)
    tag_a = ch1.basic_consume(q, a)
    ch2.basic_consume(q, b)
    for i in range(6):
        ch1.basic_publish("", q, b"%d" % i)
    a.wait(both, 6)
    pump(both, 0.3)
    assert len(b.items) == 0, "only the active consumer receives"
    ch1.basic_cancel(tag_a)
    for i in range(6, 9):
        ch1.basic_publish("", q, b"%d" % i)
    b.wait(both, 3)
    assert b.bodies == [b"6", b"7", b"8"]
    assert len(a.items) == 6


def test_single_active_consumer_quorum(conn, connect, names):
    q = names.q()
    conn2 = connect(node=2)
    both = [conn, conn2]
    ch1, ch2 = conn.channel(), conn2.channel()
    ch1.queue_declare(q, durable=True, arguments={**QUORUM, "x-single-active-consumer": True})
    a, b = Collector(ack=True), Collector(ack=True)
    tag_a = ch1.basic_consume(q, a)
    ch2.basic_consume(q, b)
    for i in range(4):
        ch1.basic_publish("", q, b"%d" % i)
    a.wait(both, 4)
    pump(both, 0.3)
    assert len(b.items) == 0
    ch1.basic_cancel(tag_a)
    ch1.basic_publish("", q, b"after")
    b.wait(both, 1)
    assert b.bodies == [b"after"]


def test_single_active_consumer_unacked_go_to_next(conn, connect, names):
    q = names.q()
    conn2 = connect(node=1)
    both = [conn, conn2]
    ch1, ch2 = conn.channel(), conn2.channel()
    ch1.queue_declare(q, arguments={"x-single-active-consumer": True})
    a, b = Collector(ack=False), Collector(ack=True)
    ch1.basic_consume(q, a)
    ch2.basic_consume(q, b)
    ch2.basic_publish("", q, b"x")
    a.wait(both, 1)
    ch1.close()  # unacked message goes back and the next consumer becomes active
    b.wait(both, 1)
    method, _, body = b.items[0]
    assert body == b"x" and method.redelivered


@pytest.mark.parametrize("qtype", ["classic", "quorum"])
def test_consumer_priority(conn, connect, names, qtype):
    q = names.q()
    conn2 = connect(node=1)
    both = [conn, conn2]
    low_ch, high_ch = conn.channel(), conn2.channel()
    args = {"x-queue-type": qtype}
    low_ch.queue_declare(q, durable=(qtype == "quorum"), arguments=args)
    high_ch.basic_qos(prefetch_count=2)
    low_ch.basic_qos(prefetch_count=100)
    low, high = Collector(ack=False), Collector(ack=False)
    low_ch.basic_consume(q, low, arguments={"x-priority": 1})
    high_ch.basic_consume(q, high, arguments={"x-priority": 10})
    for i in range(7):
        low_ch.basic_publish("", q, b"%d" % i)
    wait_until(lambda: len(low.items) + len(high.items) == 7, conn=both, what="7 deliveries")
    # the high-priority consumer takes what its credit allows, the rest
    # overflows to the low-priority one
    assert high.bodies == [b"0", b"1"]
    assert low.bodies == [b"2", b"3", b"4", b"5", b"6"]
    # once it has credit again it is preferred again
    high_ch.basic_ack(high.items[-1][0].delivery_tag, multiple=True)
    # (published on the acking channel, so that the ack is there first)
    high_ch.basic_publish("", q, b"7")
    high.wait(both, 3)
    assert high.bodies[-1] == b"7"


def test_classic_queue_message_priority(ch, names):
    q = names.q()
    ch.queue_declare(q, arguments={"x-max-priority": 10})
    ch.confirm_delivery()
    for p in (1, 5, 3, None, 10, 9, 200, 0):
        ch.basic_publish("", q, b"p%s" % str(p).encode(), pika.BasicProperties(priority=p))
    # above the max counts as the max; none counts as 0; FIFO within one level
    assert _drain(ch, q) == [b"p10", b"p200", b"p9", b"p5", b"p3", b"p1", b"pNone", b"p0"]


@pytest.mark.rabbitmq4
def test_quorum_queue_message_priority(ch, names):
    # RabbitMQ 4.x quorum queues have two priorities: normal (0-4 or none) and
    # high (5+), served 2:1 in favour of high. 3.x ignores priority.
    q = names.q()
    ch.queue_declare(q, durable=True, arguments=QUORUM)
    ch.confirm_delivery()
    ch.basic_publish("", q, b"n1")
    ch.basic_publish("", q, b"n2", pika.BasicProperties(priority=4))
    ch.basic_publish("", q, b"h1", pika.BasicProperties(priority=5))
    ch.basic_publish("", q, b"h2", pika.BasicProperties(priority=9))
    assert [get(ch, q)[2] for _ in range(4)] == [b"h1", b"h2", b"n1", b"n2"]


# --------------------------------------------------------------------------
# queue types and argument validation


@pytest.mark.parametrize("qtype", ["classic", "quorum"])
def test_queue_type_accepted(ch, names, qtype):
    q = names.q()
    ok = ch.queue_declare(q, durable=True, arguments={"x-queue-type": qtype})
    assert ok.method.queue == q
    ch.confirm_delivery()
    ch.basic_publish("", q, b"m", pika.BasicProperties(delivery_mode=2))
    assert get(ch, q)[2] == b"m"
    # redeclare with the same type is fine, a different type is not
    ch.queue_declare(q, durable=True, arguments={"x-queue-type": qtype})
    other = "classic" if qtype == "quorum" else "quorum"
    with channel_error(406, "inequivalent arg 'x-queue-type'"):
        ch.queue_declare(q, durable=True, arguments={"x-queue-type": other})


def test_unknown_queue_type_406(ch, names):
    with channel_error(406, "unsupported queue type 'banana'"):
        ch.queue_declare(names.q(), arguments={"x-queue-type": "banana"})


@pytest.mark.parametrize(
    "props,what",
    [
        (dict(durable=False), "non-durable"),
        (dict(durable=True, exclusive=True), "exclusive-owner"),
        (dict(durable=True, auto_delete=True), "auto-delete"),
    ],
)
def test_quorum_queue_invalid_properties_406(ch, names, props, what):
    with channel_error(406, f"invalid property '{what}'"):
        ch.queue_declare(names.q(), arguments=QUORUM, **props)


def test_quorum_queue_rejects_max_priority_406(ch, names):
    with channel_error(406, "invalid arg 'x-max-priority'"):
        ch.queue_declare(names.q(), durable=True, arguments={**QUORUM, "x-max-priority": 5})


@pytest.mark.parametrize(
    "args,text",
    [
        ({"x-message-ttl": "abc"}, "invalid arg 'x-message-ttl'"),
        ({"x-message-ttl": -1}, "invalid arg 'x-message-ttl'"),
        ({"x-expires": 0}, "invalid arg 'x-expires'"),
        ({"x-expires": "soon"}, "invalid arg 'x-expires'"),
        ({"x-max-length": -1}, "invalid arg 'x-max-length'"),
        ({"x-max-length": "ten"}, "invalid arg 'x-max-length'"),
        ({"x-max-length-bytes": -5}, "invalid arg 'x-max-length-bytes'"),
        ({"x-overflow": "nope"}, "invalid arg 'x-overflow'"),
        # (RabbitMQ words this one differently: "invalid type 'signedint' for arg ...")
        ({"x-dead-letter-exchange": 5}, "'x-dead-letter-exchange'"),
        ({"x-max-priority": "high"}, "invalid arg 'x-max-priority'"),
    ],
)
def test_bad_argument_406(ch, names, args, text):
    with channel_error(406, text):
        ch.queue_declare(names.q(), arguments=args)


def test_redeclare_with_different_argument_406(ch, names):
    q = names.q()
    ch.queue_declare(q, arguments={"x-message-ttl": 1000})
    with channel_error(406, "inequivalent arg 'x-message-ttl'"):
        ch.queue_declare(q, arguments={"x-message-ttl": 2000})
