"""Exchange types and exchange-level errors through pika."""

import pika
import pika.exceptions
import pytest

from helpers import channel_error, exchange_exists, get, wait_message_count, wait_until


def _queues(ch, names, n):
    qs = [names.q(f"q{i}") for i in range(n)]
    for q in qs:
        ch.queue_declare(q)
    return qs


def _drain(ch, q):
    out = []
    while True:
        method, _, body = ch.basic_get(q, auto_ack=True)
        if method is None:
            return out
        out.append(body)


@pytest.fixture
def cch(ch):
    ch.confirm_delivery()
    return ch


@pytest.fixture
def pub(connect):
    """The publisher: a confirming channel on another node than ``ch``'s."""
    c = connect(node=1).channel()
    c.confirm_delivery()
    return c


def test_default_exchange_routes_by_queue_name(cch, pub, names):
    (q,) = _queues(cch, names, 1)
    pub.basic_publish("", q, b"m")
    assert get(cch, q)[2] == b"m"


def test_default_exchange_cannot_be_bound_403(ch, names):
    (q,) = _queues(ch, names, 1)
    with channel_error(403, "ACCESS_REFUSED"):
        ch.queue_bind(q, "", routing_key="x")


def test_direct_exchange(cch, pub, names):
    x = names.x()
    cch.exchange_declare(x, "direct")
    a, b = _queues(cch, names, 2)
    cch.queue_bind(a, x, "red")
    cch.queue_bind(b, x, "green")
    cch.queue_bind(b, x, "red")
    pub.basic_publish(x, "red", b"r")
    pub.basic_publish(x, "green", b"g")
    pub.basic_publish(x, "blue", b"b")
    wait_message_count(cch, a, 1)
    wait_message_count(cch, b, 2)
    assert _drain(cch, a) == [b"r"]
    assert _drain(cch, b) == [b"r", b"g"]


def test_direct_exchange_duplicate_binding_delivers_once(cch, pub, names):
    x = names.x()
    cch.exchange_declare(x, "direct")
    (q,) = _queues(cch, names, 1)
    cch.queue_bind(q, x, "k")
    cch.queue_bind(q, x, "k")
    pub.basic_publish(x, "k", b"once")
    wait_message_count(cch, q, 1)
    assert _drain(cch, q) == [b"once"]


def test_fanout_exchange(cch, pub, names):
    x = names.x()
    cch.exchange_declare(x, "fanout")
    qs = _queues(cch, names, 3)
    for i, q in enumerate(qs):
        cch.queue_bind(q, x, routing_key=f"ignored{i}")
    pub.basic_publish(x, "whatever", b"all")
    for q in qs:
        wait_message_count(cch, q, 1)
        assert _drain(cch, q) == [b"all"]


@pytest.mark.parametrize(
    "pattern,key,matches",
    [
        ("a.*.c", "a.b.c", True),
        ("a.*.c", "a.c", False),
        ("a.*.c", "a.b.b.c", False),
        ("a.#", "a", True),
        ("a.#", "a.b.c.d", True),
        ("a.#", "ab", False),
        ("#", "", True),
        ("#", "anything.at.all", True),
        ("*", "", False),  # RabbitMQ: the empty key has no words, so "*" misses it
        ("*", "one", True),
        ("*", "one.two", False),
        ("#.c", "c", True),
        ("#.c", "a.b.c", True),
        ("a.#.c", "a.c", True),
        ("a.#.c", "a.x.y.c", True),
        ("a.#.c", "a.x.y.d", False),
        ("*.b.#", "a.b", True),
        ("*.b.#", "b", False),
        ("a.b", "a.b", True),
        ("a.b", "a.B", False),
        ("#.#", "a.b", True),
        ("*.*", "a.", True),  # ...but "a." is two words, the second empty
        ("a.*", "a.", True),
        ("a", "a.b", False),
    ],
)
def test_topic_exchange_patterns(cch, pub, names, pattern, key, matches):
    x = names.x()
    cch.exchange_declare(x, "topic")
    (q,) = _queues(cch, names, 1)
    cch.queue_bind(q, x, routing_key=pattern)
    pub.basic_publish(x, key, b"m")
    assert cch.queue_declare(q, passive=True).method.message_count == (1 if matches else 0)


def test_topic_exchange_multiple_bindings_deliver_once(cch, pub, names):
    x = names.x()
    cch.exchange_declare(x, "topic")
    (q,) = _queues(cch, names, 1)
    cch.queue_bind(q, x, routing_key="a.*")
    cch.queue_bind(q, x, routing_key="#")
    cch.queue_bind(q, x, routing_key="a.b")
    pub.basic_publish(x, "a.b", b"m")
    assert cch.queue_declare(q, passive=True).method.message_count == 1


@pytest.mark.parametrize(
    "match,headers,expected",
    [
        ("all", {"format": "pdf", "type": "report"}, True),
        ("all", {"format": "pdf", "type": "report", "extra": 1}, True),
        ("all", {"format": "pdf"}, False),
        ("all", {"format": "zip", "type": "report"}, False),
        ("any", {"format": "pdf"}, True),
        ("any", {"type": "report", "x": "y"}, True),
        ("any", {"format": "zip", "type": "log"}, False),
        ("any", {}, False),
        ("all", None, False),
    ],
)
def test_headers_exchange(cch, pub, names, match, headers, expected):
    x = names.x()
    cch.exchange_declare(x, "headers")
    (q,) = _queues(cch, names, 1)
    cch.queue_bind(q, x, arguments={"x-match": match, "format": "pdf", "type": "report"})
    props = pika.BasicProperties(headers=headers)
    pub.basic_publish(x, "ignored", b"m", props)
    assert cch.queue_declare(q, passive=True).method.message_count == (1 if expected else 0)


def test_headers_exchange_default_match_is_all(cch, pub, names):
    x = names.x()
    cch.exchange_declare(x, "headers")
    (q,) = _queues(cch, names, 1)
    cch.queue_bind(q, x, arguments={"a": 1, "b": 2})
    pub.basic_publish(x, "", b"one", pika.BasicProperties(headers={"a": 1}))
    pub.basic_publish(x, "", b"both", pika.BasicProperties(headers={"a": 1, "b": 2}))
    assert _drain(cch, q) == [b"both"]


def test_headers_exchange_void_value_matches_presence(cch, pub, names):
    # A binding argument with a void (None) value matches on presence of the key
    x = names.x()
    cch.exchange_declare(x, "headers")
    (q,) = _queues(cch, names, 1)
    cch.queue_bind(q, x, arguments={"x-match": "all", "flag": None})
    pub.basic_publish(x, "", b"no", pika.BasicProperties(headers={"other": 1}))
    pub.basic_publish(x, "", b"yes", pika.BasicProperties(headers={"flag": "anything"}))
    assert _drain(cch, q) == [b"yes"]


def test_headers_exchange_bad_x_match_406(ch, names):
    x = names.x()
    ch.exchange_declare(x, "headers")
    (q,) = _queues(ch, names, 1)
    with channel_error(406, "PRECONDITION_FAILED"):
        ch.queue_bind(q, x, arguments={"x-match": "some"})


def test_exchange_to_exchange_binding(cch, pub, names):
    src, dst = names.x("src"), names.x("dst")
    cch.exchange_declare(src, "topic")
    cch.exchange_declare(dst, "fanout")
    cch.exchange_bind(destination=dst, source=src, routing_key="orders.*")
    (q,) = _queues(cch, names, 1)
    cch.queue_bind(q, dst)
    pub.basic_publish(src, "orders.new", b"routed")
    pub.basic_publish(src, "users.new", b"not-routed")
    wait_message_count(cch, q, 1)
    assert _drain(cch, q) == [b"routed"]
    cch.exchange_unbind(destination=dst, source=src, routing_key="orders.*")
    pub.basic_publish(src, "orders.new", b"after-unbind")
    assert _drain(cch, q) == []


def test_exchange_binding_cycle_delivers_once(cch, pub, names):
    a, b = names.x("a"), names.x("b")
    cch.exchange_declare(a, "fanout")
    cch.exchange_declare(b, "fanout")
    cch.exchange_bind(destination=b, source=a)
    cch.exchange_bind(destination=a, source=b)
    (q,) = _queues(cch, names, 1)
    cch.queue_bind(q, a)
    cch.queue_bind(q, b)
    pub.basic_publish(a, "", b"m")
    assert cch.queue_declare(q, passive=True).method.message_count == 1


def test_internal_exchange_rejects_publish_403(ch, names):
    src, internal = names.x("src"), names.x("internal")
    ch.exchange_declare(internal, "fanout", internal=True)
    ch.exchange_declare(src, "fanout")
    ch.exchange_bind(destination=internal, source=src)
    (q,) = _queues(ch, names, 1)
    ch.queue_bind(q, internal)
    # routing through it from another exchange works
    ch.basic_publish(src, "", b"via-src")
    wait_message_count(ch, q, 1)
    ch.basic_publish(internal, "", b"direct")
    with channel_error(403, "cannot publish to internal exchange"):
        ch.queue_declare(q, passive=True)


def test_auto_delete_exchange_deleted_after_last_unbind(ch, connect, names):
    x = names.x()
    ch.exchange_declare(x, "direct", auto_delete=True)
    a, b = _queues(ch, names, 2)
    ch.queue_bind(a, x, "k")
    ch.queue_bind(b, x, "k")
    ch.queue_unbind(a, x, "k")
    observer = connect(node=1)
    assert exchange_exists(observer, x)
    ch.queue_unbind(b, x, "k")
    wait_until(lambda: not exchange_exists(observer, x), what="auto-delete exchange to go")


def test_auto_delete_exchange_deleted_when_bound_queue_deleted(ch, connect, names):
    x = names.x()
    ch.exchange_declare(x, "fanout", auto_delete=True)
    (q,) = _queues(ch, names, 1)
    ch.queue_bind(q, x)
    ch.queue_delete(q)
    observer = connect(node=2)
    wait_until(lambda: not exchange_exists(observer, x), what="auto-delete exchange to go")


def test_auto_delete_exchange_never_bound_stays(ch, connect, names):
    x = names.x()
    ch.exchange_declare(x, "direct", auto_delete=True)
    assert exchange_exists(connect(node=1), x)


def test_redeclare_with_different_type_406(ch, names):
    x = names.x()
    ch.exchange_declare(x, "direct")
    with channel_error(406, "inequivalent arg 'type'"):
        ch.exchange_declare(x, "fanout")


def test_redeclare_with_different_durable_406(ch, names):
    x = names.x()
    ch.exchange_declare(x, "direct", durable=False)
    with channel_error(406, "inequivalent arg 'durable'"):
        ch.exchange_declare(x, "direct", durable=True)


def test_redeclare_identical_is_ok(ch, names):
    x = names.x()
    ch.exchange_declare(x, "topic", durable=True)
    ch.exchange_declare(x, "topic", durable=True)
    assert ch.is_open


def test_declare_reserved_amq_prefix_403(ch, prefix):
    with channel_error(403, "ACCESS_REFUSED"):
        ch.exchange_declare("amq.foo-" + prefix[-8:], "direct")


def test_passive_declare_of_amq_builtin_ok(ch):
    for name in ("amq.direct", "amq.fanout", "amq.topic", "amq.headers", "amq.match"):
        ch.exchange_declare(name, passive=True)


def test_passive_declare_missing_exchange_404(ch, prefix):
    with channel_error(404, "NOT_FOUND"):
        ch.exchange_declare(prefix + ".missing", passive=True)


def test_unknown_exchange_type_503(conn, names):
    ch = conn.channel()
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as info:
        ch.exchange_declare(names.x(), "no-such-type")
    # RabbitMQ closes the whole connection: 503 COMMAND_INVALID
    assert info.value.reply_code == 503
    assert "unknown exchange type 'no-such-type'" in info.value.reply_text


def test_delete_builtin_exchange_403(ch):
    with channel_error(403, "ACCESS_REFUSED"):
        ch.exchange_delete("amq.direct")


def test_delete_exchange_if_unused_406(ch, names):
    x = names.x()
    ch.exchange_declare(x, "fanout")
    (q,) = _queues(ch, names, 1)
    ch.queue_bind(q, x)
    with channel_error(406, "PRECONDITION_FAILED"):
        ch.exchange_delete(x, if_unused=True)


def test_delete_exchange_removes_bindings(cch, pub, names):
    x = names.x()
    cch.exchange_declare(x, "fanout")
    (q,) = _queues(cch, names, 1)
    cch.queue_bind(q, x)
    cch.exchange_delete(x)
    assert not exchange_exists(pub.connection, x)
    cch.exchange_declare(x, "fanout")
    pub.basic_publish(x, "", b"m")
    assert cch.queue_declare(q, passive=True).method.message_count == 0


def test_alternate_exchange(cch, pub, names):
    main, ae = names.x("main"), names.x("ae")
    cch.exchange_declare(ae, "fanout")
    cch.exchange_declare(main, "direct", arguments={"alternate-exchange": ae})
    routed, unrouted = names.q("routed"), names.q("unrouted")
    cch.queue_declare(routed)
    cch.queue_declare(unrouted)
    cch.queue_bind(routed, main, "known")
    cch.queue_bind(unrouted, ae)
    pub.basic_publish(main, "known", b"k")
    # mandatory is satisfied by the alternate exchange: no basic.return
    pub.basic_publish(main, "unknown", b"u", mandatory=True)
    assert _drain(cch, routed) == [b"k"]
    method, _, body = get(cch, unrouted)
    assert body == b"u"
    # the message keeps the exchange and routing key it was published with
    assert method.exchange == main and method.routing_key == "unknown"


def test_alternate_exchange_missing_behaves_unroutable(cch, pub, names):
    main = names.x("main")
    cch.exchange_declare(main, "direct", arguments={"alternate-exchange": names.prefix + ".nope"})
    with pytest.raises(pika.exceptions.UnroutableError):
        pub.basic_publish(main, "k", b"m", mandatory=True)
