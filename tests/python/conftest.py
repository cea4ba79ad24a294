"""Fixtures for the client-compatibility suite.

Every test runs twice: against one Warren node (test ids ending ``[1node]``)
and against a 3-node Warren cluster (``[3node]``). The ``broker`` fixture is
the broker under test; ``broker.node(i)`` is one of its nodes, counted modulo
the number of nodes, so a test that puts its clients on nodes 0, 1 and 2 has
them all on one node in single mode and spread over the cluster in cluster
mode. ``-k 1node`` or ``-k 3node`` runs one mode only.

Warren is started from ``WARREN_BIN`` (default ``target/debug/warren``) once
per mode. ``WARREN_AMQP_URL`` tests an already running broker instead (any
AMQP 0-9-1 broker: Warren or a real RabbitMQ); a comma-separated list of URLs
gives the nodes of one cluster.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import pika
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
STARTUP_DEADLINE = 60.0
CLUSTER_SECRET = "python-suite-cluster-secret"


# --------------------------------------------------------------------------
# markers


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "rabbitmq4: RabbitMQ 4.x behaviour; skipped when WARREN_AMQP_URL and RABBITMQ3=1 are set",
    )


def pytest_collection_modifyitems(config, items):
    if os.environ.get("WARREN_AMQP_URL") and os.environ.get("RABBITMQ3") == "1":
        skip = pytest.mark.skip(reason="RabbitMQ 3.x differs here; the test encodes 4.x behaviour")
        for item in items:
            if "rabbitmq4" in item.keywords:
                item.add_marker(skip)


# --------------------------------------------------------------------------
# broker


@dataclass
class Node:
    """One AMQP endpoint of the broker under test."""

    host: str
    port: int
    user: str
    password: str
    vhost: str

    @property
    def url(self):
        return "amqp://%s:%s@%s:%d/%s" % (
            quote(self.user, safe=""),
            quote(self.password, safe=""),
            self.host,
            self.port,
            quote(self.vhost, safe=""),
        )

    @property
    def kombu_url(self):
        # kombu's py-amqp transport takes the same form; "%2F" is vhost "/"
        return self.url

    @property
    def oslo_url(self):
        return "rabbit://%s:%s@%s:%d/%s" % (
            quote(self.user, safe=""),
            quote(self.password, safe=""),
            self.host,
            self.port,
            "" if self.vhost == "/" else quote(self.vhost, safe=""),
        )

    def params(self, **overrides):
        kw = dict(
            host=self.host,
            port=self.port,
            virtual_host=self.vhost,
            credentials=pika.PlainCredentials(self.user, self.password),
            connection_attempts=1,
            socket_timeout=10,
            blocked_connection_timeout=30,
        )
        kw.update(overrides)
        return pika.ConnectionParameters(**kw)


class Broker:
    """The broker under test: one node or the nodes of one cluster.

    ``node(i)`` wraps around, so tests name nodes 0, 1, 2 freely. Node 0 also
    stands for the whole broker: ``broker.params()``, ``broker.url``,
    ``broker.user`` and the like are node 0's.
    """

    def __init__(self, nodes):
        self.nodes = list(nodes)

    def node(self, i):
        return self.nodes[i % len(self.nodes)]

    def __len__(self):
        return len(self.nodes)

    def __getattr__(self, name):
        if name == "nodes":  # not set yet (e.g. while unpickling)
            raise AttributeError(name)
        return getattr(self.nodes[0], name)


def _parse_url(url):
    parts = urlsplit(url.strip())
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    return Node(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 5672,
        user=unquote(parts.username or "guest"),
        password=unquote(parts.password or "guest"),
        vhost=unquote(path) if path else "/",
    )


def _free_ports(n):
    """``n`` distinct free loopback ports (all bound at once, so no repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _healthy(admin_port):
    try:
        url = f"http://127.0.0.1:{admin_port}/api/health"
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.status == 200
    except (OSError, urllib.error.URLError):
        return False


def _die_with_parent():
    """Linux: a node gets SIGTERM if pytest dies without stopping it (a timeout)."""
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _warren_binary():
    binary = Path(os.environ.get("WARREN_BIN", "target/debug/warren"))
    if not binary.is_absolute():
        binary = REPO_ROOT / binary
    if not binary.exists():
        pytest.exit(
            f"broker binary {binary} not found: build it or set WARREN_BIN / WARREN_AMQP_URL",
            returncode=2,
        )
    return binary


class _WarrenNode:
    """One `warren server` process; its output goes to ``<dir>/output.log``."""

    def __init__(self, name, dir, amqp_port, admin_port, cluster_args=()):
        self.name = name
        self.dir = dir
        self.amqp_port = amqp_port
        self.admin_port = admin_port
        self.cluster_args = list(cluster_args)
        self.log_path = os.path.join(dir, "output.log")
        self.proc = None

    def log_text(self):
        if os.path.exists(self.log_path):
            with open(self.log_path, "r", errors="replace") as f:
                return f.read()
        return ""

    def spawn(self, binary):
        data_dir = os.path.join(self.dir, "data")
        os.makedirs(data_dir)
        cmd = [
            str(binary),
            "server",
            "--amqp-listen",
            f"127.0.0.1:{self.amqp_port}",
            "--admin-listen",
            f"127.0.0.1:{self.admin_port}",
            "--data-dir",
            data_dir,
            *self.cluster_args,
        ]
        env = dict(os.environ)
        if self.cluster_args:
            env["WARREN_CLUSTER_SECRET"] = CLUSTER_SECRET
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )

    def ready(self):
        """True once the node serves clients; raises if it exited."""
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"warren {self.name} exited with {self.proc.returncode} during startup:\n"
                f"{self.log_text()[-20000:]}"
            )
        return _healthy(self.admin_port) and _port_open(self.amqp_port)

    def terminate(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()

    def wait(self):
        if self.proc is None:
            return None
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        return self.proc.returncode


class _WarrenBroker:
    """``size`` Warren nodes on loopback: one plain node, or a cluster."""

    def __init__(self, size):
        self.size = size
        self.failed = False  # a node did not stop cleanly
        # removed at the end of the session unless a test failed
        self.dir = tempfile.mkdtemp(prefix=f"warren-pytest-{size}node-")
        ports = _free_ports(3 * size)
        amqp, admin, cluster = ports[:size], ports[size : 2 * size], ports[2 * size :]
        peers = ",".join(f"{i + 1}=127.0.0.1:{cluster[i]}" for i in range(size))
        self.nodes = []
        for i in range(size):
            cluster_args = []
            if size > 1:
                cluster_args = [
                    "--node-id",
                    str(i + 1),
                    "--cluster-listen",
                    f"127.0.0.1:{cluster[i]}",
                    "--peers",
                    peers,
                ]
            name = f"node{i + 1}" if size > 1 else "node"
            node_dir = os.path.join(self.dir, name)
            os.makedirs(node_dir)
            self.nodes.append(_WarrenNode(name, node_dir, amqp[i], admin[i], cluster_args))

    def start(self):
        binary = _warren_binary()
        for n in self.nodes:
            n.spawn(binary)
        deadline = time.monotonic() + STARTUP_DEADLINE
        waiting = list(self.nodes)
        while waiting:
            waiting = [n for n in waiting if not n.ready()]
            if waiting and time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"warren {', '.join(n.name for n in waiting)} not ready within "
                    f"{STARTUP_DEADLINE}s:\n" + self.output_tail()
                )
            time.sleep(0.05)
        return Broker(_parse_url(f"amqp://guest:guest@127.0.0.1:{n.amqp_port}/%2f") for n in self.nodes)

    def stop(self):
        """Stops every node; returns {name: exit status} of unclean exits."""
        for n in self.nodes:
            n.terminate()
        codes = {n.name: n.wait() for n in self.nodes}
        # terminate() -> -SIGTERM is a clean stop; anything else is suspicious.
        return {name: rc for name, rc in codes.items() if rc not in (0, -15, None)}

    def output_tail(self, chars=20000):
        """The last ``chars`` characters of every node's output."""
        parts = []
        for n in self.nodes:
            text = n.log_text()
            parts.append(f"--- warren {n.name} ({n.log_path}) ---\n{text[-chars:] or '(empty)'}")
        return "\n".join(parts)


def _external_urls():
    return [u for u in os.environ.get("WARREN_AMQP_URL", "").split(",") if u.strip()]


# Which brokers the suite runs against: with WARREN_AMQP_URL the given nodes
# only, otherwise one Warren node and a 3-node Warren cluster.
_SIZES = [len(_external_urls())] if _external_urls() else [1, 3]
# Every Warren broker started this session, for the failure report.
_started = []


@pytest.fixture(scope="session", params=_SIZES, ids=[f"{n}node" for n in _SIZES])
def broker(request):
    """The broker under test, as a :class:`Broker` (``.node(i)``, ``.params()``, ...)."""
    urls = _external_urls()
    if urls:
        yield Broker(_parse_url(u) for u in urls)
        return
    warren = _WarrenBroker(request.param)
    _started.append(warren)
    brk = warren.start()
    try:
        yield brk
    finally:
        unclean = warren.stop()
        for name, rc in unclean.items():
            print(f"\nwarren {name} ({request.param}node) exited with {rc}; its output is in the summary")
        warren.failed = bool(unclean)


def _failed_sizes(terminalreporter):
    """The broker sizes (1, 3) that failed tests ran against."""
    sizes = set()
    for key in ("failed", "error"):
        for report in terminalreporter.stats.get(key, []):
            m = re.search(r"[\[-](\d+)node[\]-]", getattr(report, "nodeid", ""))
            if m:
                sizes.add(int(m.group(1)))
    return sizes


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    # The nodes of a broker that failed tests ran against (or that did not
    # stop cleanly) have their output shown and kept; the rest is removed.
    failed = _failed_sizes(terminalreporter)
    for warren in _started:
        if warren.size in failed or warren.failed:
            terminalreporter.section(f"warren output, {warren.size}node (tail)")
            terminalreporter.write_line(warren.output_tail())
            terminalreporter.write_line(f"(full output kept in {warren.dir})")
        else:
            shutil.rmtree(warren.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def broker_url(broker):
    return broker.url


# --------------------------------------------------------------------------
# per-test helpers


@pytest.fixture
def prefix(request):
    """A name prefix unique to this test, so tests never collide on a broker."""
    name = request.node.name
    for ch in "[]/ ":
        name = name.replace(ch, "_")
    return f"pyt.{name[:60]}.{uuid.uuid4().hex[:8]}"


class Names:
    """Hands out unique names and deletes what it handed out at teardown."""

    def __init__(self, prefix):
        self.prefix = prefix
        self.queues = []
        self.exchanges = []

    def q(self, suffix="q"):
        name = f"{self.prefix}.{suffix}"
        self.queues.append(name)
        return name

    def x(self, suffix="x"):
        name = f"{self.prefix}.{suffix}"
        self.exchanges.append(name)
        return name

    def cleanup(self, broker):
        if not (self.queues or self.exchanges):
            return
        try:
            conn = pika.BlockingConnection(broker.params())
        except Exception:
            return
        try:
            ch = conn.channel()
            for kind, names in (("queue", self.queues), ("exchange", self.exchanges)):
                for name in names:
                    try:
                        if ch.is_closed:
                            ch = conn.channel()
                        if kind == "queue":
                            ch.queue_delete(name)
                        else:
                            ch.exchange_delete(name)
                    except Exception:
                        pass
        finally:
            try:
                conn.close()
            except Exception:
                pass


@pytest.fixture
def names(prefix, broker):
    n = Names(prefix)
    yield n
    n.cleanup(broker)


class Connections:
    def __init__(self, broker):
        self.broker = broker
        self.opened = []

    def open(self, node=0, **params):
        conn = pika.BlockingConnection(self.broker.node(node).params(**params))
        self.opened.append(conn)
        return conn

    def close_all(self):
        for conn in self.opened:
            try:
                if conn.is_open:
                    conn.close()
            except Exception:
                pass


@pytest.fixture
def connect(broker):
    """Factory opening pika BlockingConnections that are closed at teardown.

    ``connect(node=i, **params)`` connects to ``broker.node(i)`` (default 0).
    """
    c = Connections(broker)
    yield c.open
    c.close_all()


@pytest.fixture
def conn(connect):
    return connect()


@pytest.fixture
def ch(conn):
    return conn.channel()
