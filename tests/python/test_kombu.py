"""kombu (py-amqp transport) against the broker: the stack Celery uses."""

import queue as stdqueue
import socket
import time
import uuid

import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue

DEADLINE = 10.0


@pytest.fixture
def kconnect(broker):
    """Factory of kombu connections to ``broker.node(node)``, released after the test."""
    opened = []

    def open(node=0):
        conn = Connection(
            broker.node(node).kombu_url,
            connect_timeout=10,
            transport_options={"confirm_publish": True},
        )
        conn.connect()
        opened.append(conn)
        return conn

    yield open
    for conn in opened:
        conn.release()


@pytest.fixture
def kconn(kconnect):
    return kconnect(node=0)


def drain_until(conn, predicate, timeout=DEADLINE):
    deadline = time.monotonic() + timeout
    while not predicate():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError("timed out waiting for kombu deliveries")
        try:
            conn.drain_events(timeout=min(0.2, remaining))
        except socket.timeout:
            pass


def test_connection_info(kconn, broker):
    assert kconn.connected
    info = kconn.info()
    assert info["hostname"] == broker.host
    assert info["port"] == broker.port
    assert info["virtual_host"] == broker.vhost
    props = kconn.connection.server_properties
    assert "capabilities" in props


def test_producer_consumer_round_trip(kconn, kconnect, names):
    exchange = Exchange(names.x(), type="direct", durable=False)
    q = Queue(names.q(), exchange=exchange, routing_key="jobs", durable=False)
    received = []

    def on_message(body, message):
        received.append((body, message))
        message.ack()

    with Consumer(kconn, queues=[q], callbacks=[on_message], accept=["json", "pickle"]):
        producer = Producer(kconnect(node=1))
        producer.publish(
            {"n": 1, "items": ["a", "b"]},
            exchange=exchange,
            routing_key="jobs",
            serializer="json",
            declare=[q],
            headers={"x-trace": "t1"},
            correlation_id="c-1",
            priority=3,
        )
        drain_until(kconn, lambda: received)
    body, message = received[0]
    assert body == {"n": 1, "items": ["a", "b"]}
    assert message.content_type == "application/json"
    assert message.headers["x-trace"] == "t1"
    assert message.properties["correlation_id"] == "c-1"
    assert message.properties["priority"] == 3
    assert message.delivery_info["routing_key"] == "jobs"
    assert message.delivery_info["exchange"] == exchange.name


def test_simple_queue_put_get(kconn, kconnect, names):
    qname = names.q()
    sq = kconn.SimpleQueue(qname)
    putter = kconnect(node=2).SimpleQueue(qname)
    try:
        putter.put({"hello": "world"})
        putter.put("second", serializer="json")
        msg = sq.get(block=True, timeout=DEADLINE)
        assert msg.payload == {"hello": "world"}
        msg.ack()
        msg = sq.get(block=True, timeout=DEADLINE)
        assert msg.payload == "second"
        msg.ack()
        assert sq.qsize() == 0
    finally:
        putter.close()
        sq.close()


def test_simple_queue_get_timeout_raises_empty(kconn, names):
    sq = kconn.SimpleQueue(names.q())
    try:
        started = time.monotonic()
        with pytest.raises(stdqueue.Empty):
            sq.get(block=True, timeout=0.5)
        assert time.monotonic() - started < 5
        with pytest.raises(stdqueue.Empty):
            sq.get_nowait()
    finally:
        sq.close()


def test_simple_queue_requeue(kconn, names):
    sq = kconn.SimpleQueue(names.q())
    try:
        sq.put("again")
        msg = sq.get(timeout=DEADLINE)
        assert not msg.delivery_info["redelivered"]
        msg.requeue()
        msg = sq.get(timeout=DEADLINE)
        assert msg.payload == "again"
        assert msg.delivery_info["redelivered"]
        msg.ack()
    finally:
        sq.close()


def test_simple_queue_clear(kconn, names):
    sq = kconn.SimpleQueue(names.q())
    try:
        for i in range(5):
            sq.put(i)
        deadline = time.monotonic() + DEADLINE
        while sq.qsize() < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sq.clear() == 5
        assert sq.qsize() == 0
    finally:
        sq.close()


@pytest.mark.parametrize(
    "xtype,bindings,key,expect",
    [
        ("direct", ["a"], "a", [True]),
        ("fanout", ["", ""], "anything", [True, True]),
        ("topic", ["logs.*", "logs.#", "audit.#"], "logs.error.disk", [False, True, False]),
        ("topic", ["*.error", "#"], "db.error", [True, True]),
    ],
)
def test_exchange_types(kconn, kconnect, names, xtype, bindings, key, expect):
    exchange = Exchange(names.x(), type=xtype, durable=False)
    queues = [
        Queue(names.q(f"q{i}"), exchange=exchange, routing_key=rk, durable=False)
        for i, rk in enumerate(bindings)
    ]
    channel = kconn.channel()
    try:
        for q in queues:
            q(channel).declare()
        publisher = kconnect(node=1).channel()
        Producer(publisher).publish("payload", exchange=exchange, routing_key=key, serializer="json")
        for q, should in zip(queues, expect):
            bound = q(channel)
            msg = bound.get(no_ack=True)
            if should:
                deadline = time.monotonic() + DEADLINE
                while msg is None and time.monotonic() < deadline:
                    time.sleep(0.02)
                    msg = bound.get(no_ack=True)
                assert msg is not None and msg.decode() == "payload", q.name
            else:
                assert msg is None, q.name
    finally:
        channel.close()


def test_headers_exchange(kconn, kconnect, names):
    exchange = Exchange(names.x(), type="headers", durable=False)
    q = Queue(
        names.q(),
        exchange=exchange,
        binding_arguments={"x-match": "any", "kind": "a", "tier": "gold"},
        durable=False,
    )
    channel = kconn.channel()
    try:
        q(channel).declare()
        p = Producer(kconnect(node=2).channel())
        p.publish("yes", exchange=exchange, headers={"tier": "gold"}, serializer="json")
        p.publish("no", exchange=exchange, headers={"tier": "lead"}, serializer="json")
        bound = q(channel)
        deadline = time.monotonic() + DEADLINE
        msg = bound.get(no_ack=True)
        while msg is None and time.monotonic() < deadline:
            time.sleep(0.02)
            msg = bound.get(no_ack=True)
        assert msg.decode() == "yes"
        assert bound.get(no_ack=True) is None
    finally:
        channel.close()


def test_celery_like_task_and_rpc_result(kconn, broker, names):
    """A worker takes a task from a queue and answers on the caller's reply queue."""
    task_q = names.q("celery")
    reply_q = names.q("reply")
    exchange = Exchange(names.x("celery"), type="direct", durable=True)
    tasks = Queue(task_q, exchange=exchange, routing_key=task_q, durable=True)
    replies = Queue(reply_q, durable=False, exclusive=False, auto_delete=False)
    task_id = str(uuid.uuid4())

    with kconn.channel() as ch:
        replies(ch).declare()
        Producer(ch).publish(
            {"args": [2, 3], "kwargs": {}},
            exchange=exchange,
            routing_key=task_q,
            declare=[tasks],
            serializer="json",
            headers={"lang": "py", "task": "tasks.add", "id": task_id},
            correlation_id=task_id,
            reply_to=reply_q,
            delivery_mode=2,
        )

    # the worker, on its own connection (to another node)
    with Connection(broker.node(2).kombu_url, connect_timeout=10) as worker:
        sq = worker.SimpleQueue(tasks)
        try:
            msg = sq.get(block=True, timeout=DEADLINE)
            assert msg.headers["task"] == "tasks.add"
            result = sum(msg.payload["args"])
            with worker.channel() as wch:
                Producer(wch).publish(
                    {"status": "SUCCESS", "result": result, "task_id": msg.headers["id"]},
                    exchange="",
                    routing_key=msg.properties["reply_to"],
                    correlation_id=msg.properties["correlation_id"],
                    serializer="json",
                )
            msg.ack()
        finally:
            sq.close()

    got = []
    with Consumer(kconn, queues=[replies], callbacks=[lambda b, m: (got.append((b, m)), m.ack())], accept=["json"]):
        drain_until(kconn, lambda: got)
    body, message = got[0]
    assert body == {"status": "SUCCESS", "result": 5, "task_id": task_id}
    assert message.properties["correlation_id"] == task_id


def test_consumer_prefetch_and_cancel(kconn, names):
    q = Queue(names.q(), durable=False)
    channel = kconn.channel()
    try:
        q(channel).declare()
        p = Producer(channel)
        for i in range(5):
            p.publish(i, routing_key=q.name, serializer="json")
        seen = []
        consumer = Consumer(channel, queues=[q], callbacks=[lambda b, m: seen.append(m)], accept=["json"])
        consumer.qos(prefetch_count=2)
        consumer.consume()
        drain_until(kconn, lambda: len(seen) >= 2)
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            try:
                kconn.drain_events(timeout=0.1)
            except socket.timeout:
                pass
        assert len(seen) == 2
        for m in seen:
            m.ack()
        drain_until(kconn, lambda: len(seen) >= 4)
        consumer.cancel()
        for m in seen[2:]:
            m.ack()
    finally:
        channel.close()
