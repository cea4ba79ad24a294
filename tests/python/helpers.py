"""Small bounded-wait helpers shared by the pika tests."""

import contextlib
import time

import pika.exceptions

DEFAULT_TIMEOUT = 10.0


class Timeout(AssertionError):
    pass


def _process(conn, time_limit):
    """Process I/O of one connection, or of each of a list of connections."""
    conns = conn if isinstance(conn, (list, tuple)) else [conn]
    for c in conns:
        c.process_data_events(time_limit=time_limit / len(conns))


def wait_until(predicate, timeout=DEFAULT_TIMEOUT, conn=None, interval=0.02, what="condition"):
    """Poll ``predicate`` until it is truthy or ``timeout`` passes.

    With ``conn`` (a connection or a list of them) the I/O is pumped between
    polls (so consumer callbacks run); otherwise it sleeps ``interval``.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Timeout(f"timed out after {timeout}s waiting for {what}")
        if conn is not None:
            _process(conn, min(interval, remaining))
        else:
            time.sleep(min(interval, remaining))


def pump(conn, seconds):
    """Process I/O for a bounded time (used to show that nothing more arrives).

    ``conn`` is a connection or a list of connections.
    """
    deadline = time.monotonic() + seconds
    # several connections take turns in short slices
    step = 0.02 if isinstance(conn, (list, tuple)) else seconds
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        _process(conn, min(step, remaining))


class Collector:
    """A consumer callback that records deliveries."""

    def __init__(self, ack=False):
        self.ack = ack
        self.items = []

    def __call__(self, ch, method, props, body):
        self.items.append((method, props, body))
        if self.ack:
            ch.basic_ack(method.delivery_tag)

    @property
    def bodies(self):
        return [b for (_, _, b) in self.items]

    def wait(self, conn, n, timeout=DEFAULT_TIMEOUT):
        wait_until(lambda: len(self.items) >= n, timeout, conn=conn, what=f"{n} deliveries (have {len(self.items)})")
        return self.items


def consume(conn, ch, queue, n, timeout=DEFAULT_TIMEOUT, ack=True, **kw):
    """Consume exactly ``n`` messages from ``queue`` then cancel; return them."""
    col = Collector(ack=ack)
    tag = ch.basic_consume(queue, col, **kw)
    try:
        col.wait(conn, n, timeout)
    finally:
        if ch.is_open:
            ch.basic_cancel(tag)
    return col.items


def get(ch, queue, timeout=DEFAULT_TIMEOUT, auto_ack=True):
    """basic.get, retried until a message is there (routing may be asynchronous)."""
    deadline = time.monotonic() + timeout
    while True:
        method, props, body = ch.basic_get(queue, auto_ack=auto_ack)
        if method is not None:
            return method, props, body
        if time.monotonic() >= deadline:
            raise Timeout(f"no message on {queue} within {timeout}s")
        ch.connection.process_data_events(time_limit=0.02)


def message_count(ch, queue):
    return ch.queue_declare(queue, passive=True).method.message_count


def wait_message_count(ch, queue, n, timeout=DEFAULT_TIMEOUT):
    return wait_until(
        lambda: message_count(ch, queue) == n or None,
        timeout,
        what=f"{queue} to hold {n} messages",
    )


@contextlib.contextmanager
def channel_error(code, text_contains=None):
    """Expect the broker to close the channel with ``code``."""
    try:
        yield
    except pika.exceptions.ChannelClosedByBroker as e:
        assert e.reply_code == code, f"expected {code}, got {e.reply_code} {e.reply_text!r}"
        if text_contains is not None:
            assert text_contains in e.reply_text, e.reply_text
        return
    raise AssertionError(f"expected channel error {code}, nothing raised")


@contextlib.contextmanager
def connection_error(code, text_contains=None):
    """Expect the broker to close the connection with ``code``."""
    try:
        yield
    except pika.exceptions.ConnectionClosedByBroker as e:
        assert e.reply_code == code, f"expected {code}, got {e.reply_code} {e.reply_text!r}"
        if text_contains is not None:
            assert text_contains in e.reply_text, e.reply_text
        return
    raise AssertionError(f"expected connection error {code}, nothing raised")


def queue_exists(conn, name):
    """Passive-declare ``name`` on a throwaway channel.

    405 (exclusive queue owned by another connection) still means it exists.
    """
    c = conn.channel()
    try:
        c.queue_declare(name, passive=True)
    except pika.exceptions.ChannelClosedByBroker as e:
        assert e.reply_code in (404, 405), (e.reply_code, e.reply_text)
        return e.reply_code == 405
    c.close()
    return True


def exchange_exists(conn, name):
    c = conn.channel()
    try:
        c.exchange_declare(name, passive=True)
    except pika.exceptions.ChannelClosedByBroker as e:
        assert e.reply_code == 404, (e.reply_code, e.reply_text)
        return False
    c.close()
    return True
