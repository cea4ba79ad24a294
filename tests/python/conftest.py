"""Fixtures for the client-compatibility suite.

The suite talks to a broker given by ``WARREN_AMQP_URL`` (any AMQP 0-9-1
broker: Warren or a real RabbitMQ), or, when that is unset, starts the Warren
binary (``WARREN_BIN``, default ``target/debug/warren``) once per session.
"""

import os
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import pika
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
STARTUP_DEADLINE = 30.0


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
class Broker:
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


def _parse_url(url):
    parts = urlsplit(url)
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    return Broker(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 5672,
        user=unquote(parts.username or "guest"),
        password=unquote(parts.password or "guest"),
        vhost=unquote(path) if path else "/",
    )


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(host, port):
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class _WarrenProcess:
    def __init__(self):
        self.proc = None
        self.stderr_path = None
        self.tmp = None

    def stderr_text(self):
        if self.stderr_path and os.path.exists(self.stderr_path):
            with open(self.stderr_path, "r", errors="replace") as f:
                return f.read()
        return ""

    def start(self):
        binary = Path(os.environ.get("WARREN_BIN", "target/debug/warren"))
        if not binary.is_absolute():
            binary = REPO_ROOT / binary
        if not binary.exists():
            pytest.exit(
                f"broker binary {binary} not found: build it or set WARREN_BIN / WARREN_AMQP_URL",
                returncode=2,
            )
        self.tmp = tempfile.TemporaryDirectory(prefix="warren-pytest-")
        amqp_port, admin_port = _free_port(), _free_port()
        while admin_port == amqp_port:
            admin_port = _free_port()
        data_dir = os.path.join(self.tmp.name, "data")
        os.makedirs(data_dir)
        self.stderr_path = os.path.join(self.tmp.name, "stderr.log")
        cmd = [
            str(binary),
            "server",
            "--amqp-listen",
            f"127.0.0.1:{amqp_port}",
            "--admin-listen",
            f"127.0.0.1:{admin_port}",
            "--data-dir",
            data_dir,
        ]
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + STARTUP_DEADLINE
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"warren exited with {self.proc.returncode} during startup:\n{self.stderr_text()}"
                )
            if _port_open("127.0.0.1", amqp_port):
                return f"amqp://guest:guest@127.0.0.1:{amqp_port}/%2f"
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(
            f"warren did not accept connections on {amqp_port} within {STARTUP_DEADLINE}s:\n"
            f"{self.stderr_text()}"
        )

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def cleanup(self):
        if self.tmp is not None:
            self.tmp.cleanup()
            self.tmp = None


_warren = _WarrenProcess()


@pytest.fixture(scope="session")
def broker():
    """The broker under test, as a :class:`Broker` (``.url``, ``.params()``, ...)."""
    url = os.environ.get("WARREN_AMQP_URL")
    if url:
        yield _parse_url(url)
        return
    url = _warren.start()
    try:
        yield _parse_url(url)
    finally:
        _warren.stop()
        rc = _warren.proc.returncode if _warren.proc else 0
        # terminate() -> -SIGTERM is a clean stop; anything else is suspicious.
        if rc not in (0, -15, None):
            print(f"\nwarren exited with {rc}; its output:\n{_warren.stderr_text()}")


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _warren.proc is None:
        return
    if exitstatus != 0:
        text = _warren.stderr_text()
        terminalreporter.section("warren output (tail)")
        terminalreporter.write_line(text[-20000:] if text else "(empty)")
    _warren.cleanup()


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

    def open(self, **params):
        conn = pika.BlockingConnection(self.broker.params(**params))
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
    """Factory opening pika BlockingConnections that are closed at teardown."""
    c = Connections(broker)
    yield c.open
    c.close_all()


@pytest.fixture
def conn(connect):
    return connect()


@pytest.fixture
def ch(conn):
    return conn.channel()
