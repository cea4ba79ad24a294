"""oslo.messaging (OpenStack RPC and notifications) over the rabbit driver."""

import importlib
import threading

import oslo_messaging as messaging
import pytest
from oslo_config import cfg

from helpers import wait_until

RPC_TIMEOUT = 10


class Calculator:
    def __init__(self, name):
        self.name = name
        self.casts = []
        self.lock = threading.Lock()

    def add(self, ctxt, a, b):
        return a + b

    def whoami(self, ctxt):
        return self.name

    def echo_ctxt(self, ctxt, key):
        return ctxt.get(key)

    def record(self, ctxt, value):
        with self.lock:
            self.casts.append(value)

    def fail(self, ctxt):
        raise ValueError("boom from " + self.name)


class Notifications:
    def __init__(self):
        self.seen = []

    def info(self, ctxt, publisher_id, event_type, payload, metadata):
        self.seen.append(("info", publisher_id, event_type, payload))

    def error(self, ctxt, publisher_id, event_type, payload, metadata):
        self.seen.append(("error", publisher_id, event_type, payload))


def _register_global_only_opts(conf):
    # Some oslo.messaging option groups are registered on the global cfg.CONF
    # only; a private ConfigOpts needs them too (oslo.messaging's own
    # ConfFixture does the same).
    for module, attr, group in (
        ("oslo_messaging._tracing.client", "oslo_messaging_tracing", "oslo_messaging_tracing"),
        ("oslo_messaging._metrics.client", "oslo_messaging_metrics", "oslo_messaging_metrics"),
    ):
        try:
            opts = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            continue
        conf.register_opts(opts, group=group)


@pytest.fixture
def conf():
    c = cfg.ConfigOpts()
    c([], project="warren-tests")
    _register_global_only_opts(c)
    return c


@pytest.fixture
def oslo(conf, broker, names):
    """Yields a helper; every server/listener/transport it made is stopped after.

    Clients connect to node 0 and servers to nodes 1, 2, ... (by their order),
    so on a cluster every call crosses nodes.
    """

    class Oslo:
        def __init__(self):
            self.exchange = names.x("openstack")
            self.topic = names.prefix + ".topic"
            self.servers = []
            self.transports = []
            # the default exchange of transports created from here on
            messaging.set_transport_defaults(control_exchange=self.exchange)

        def rpc_transport(self, node=0):
            t = messaging.get_rpc_transport(conf, url=broker.node(node).oslo_url)
            self.transports.append(t)
            return t

        def notification_transport(self, node=0):
            t = messaging.get_notification_transport(conf, url=broker.node(node).oslo_url)
            self.transports.append(t)
            return t

        def server(self, name, endpoint):
            target = messaging.Target(topic=self.topic, server=name)
            names.queues.extend([self.topic, f"{self.topic}.{name}"])
            srv = messaging.get_rpc_server(
                self.rpc_transport(node=1 + len(self.servers)),
                target,
                [endpoint],
                executor="threading",
            )
            srv.start()
            self.servers.append(srv)
            return srv

        def client(self, **prepare):
            c = messaging.get_rpc_client(
                self.rpc_transport(), messaging.Target(topic=self.topic), timeout=RPC_TIMEOUT
            )
            return c.prepare(**prepare) if prepare else c

        def close(self):
            for srv in self.servers:
                try:
                    srv.stop()
                    srv.wait()
                except Exception:
                    pass
            for t in self.transports:
                try:
                    t.cleanup()
                except Exception:
                    pass

    o = Oslo()
    yield o
    o.close()


def _call_until_ready(client, method, timeout=RPC_TIMEOUT, **kwargs):
    """The first call may race the server's consumer set-up; retry on timeout."""
    return wait_until(
        lambda: _try_call(client, method, **kwargs),
        timeout=timeout * 3,
        what=f"rpc {method}",
    )[0]


def _try_call(client, method, **kwargs):
    try:
        return (client.prepare(timeout=3).call({}, method, **kwargs),)
    except messaging.MessagingTimeout:
        return None


def test_rpc_call_returns_result(oslo):
    oslo.server("s1", Calculator("s1"))
    client = oslo.client()
    assert _call_until_ready(client, "add", a=2, b=40) == 42
    # once up, plain calls work
    assert client.call({}, "add", a=-1, b=1) == 0
    assert client.call({}, "whoami") == "s1"


def test_rpc_call_to_specific_server(oslo):
    oslo.server("s1", Calculator("s1"))
    oslo.server("s2", Calculator("s2"))
    c2 = oslo.client(server="s2")
    assert _call_until_ready(c2, "whoami") == "s2"
    for _ in range(3):
        assert c2.call({}, "whoami") == "s2"


def test_rpc_call_passes_context(oslo):
    oslo.server("s1", Calculator("s1"))
    client = oslo.client()
    _call_until_ready(client, "whoami")
    assert client.call({"request_id": "req-123"}, "echo_ctxt", key="request_id") == "req-123"


def test_rpc_remote_exception(oslo):
    oslo.server("s1", Calculator("s1"))
    client = oslo.client()
    _call_until_ready(client, "whoami")
    # builtin exception types are rebuilt on the caller's side
    with pytest.raises(ValueError) as info:
        client.call({}, "fail")
    assert "boom from s1" in str(info.value)


def test_rpc_cast_is_executed(oslo):
    calc = Calculator("s1")
    oslo.server("s1", calc)
    client = oslo.client()
    _call_until_ready(client, "whoami")
    for i in range(5):
        client.cast({}, "record", value=i)
    wait_until(lambda: len(calc.casts) == 5, timeout=RPC_TIMEOUT, what="5 casts")
    assert sorted(calc.casts) == [0, 1, 2, 3, 4]


def test_rpc_fanout_cast_reaches_all_servers(oslo):
    a, b = Calculator("a"), Calculator("b")
    oslo.server("a", a)
    oslo.server("b", b)
    _call_until_ready(oslo.client(server="a"), "whoami")
    _call_until_ready(oslo.client(server="b"), "whoami")
    oslo.client(fanout=True).cast({}, "record", value="broadcast")
    wait_until(
        lambda: a.casts == ["broadcast"] and b.casts == ["broadcast"],
        timeout=RPC_TIMEOUT,
        what="fanout to reach both servers",
    )


def test_rpc_call_timeout_without_server(oslo):
    client = oslo.client()
    with pytest.raises(messaging.MessagingTimeout):
        client.prepare(timeout=1).call({}, "add", a=1, b=2)


def test_notification_round_trip(oslo, names):
    transport = oslo.notification_transport(node=1)
    topic = names.prefix + ".notifications"
    names.queues.extend([f"{topic}.info", f"{topic}.error"])
    endpoint = Notifications()
    listener = messaging.get_notification_listener(
        transport,
        [messaging.Target(topic=topic, exchange=oslo.exchange)],
        [endpoint],
        executor="threading",
    )
    listener.start()
    oslo.servers.append(listener)
    notifier = messaging.Notifier(
        oslo.notification_transport(node=0),
        publisher_id="compute.host1",
        driver="messaging",
        topics=[topic],
    )

    notifier.info({}, "instance.create.end", {"id": "vm-1"})
    wait_until(lambda: endpoint.seen, timeout=RPC_TIMEOUT, what="info notification")
    kind, publisher, event_type, payload = endpoint.seen[0]
    assert (kind, publisher, event_type, payload) == (
        "info",
        "compute.host1",
        "instance.create.end",
        {"id": "vm-1"},
    )
    notifier.error({}, "instance.create.error", {"id": "vm-2"})
    wait_until(lambda: len(endpoint.seen) >= 2, timeout=RPC_TIMEOUT, what="error notification")
    assert endpoint.seen[1][0] == "error"
