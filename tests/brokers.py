"""
Reaching the real brokers the transport tests run against.

A test that needs a broker asks for the ``redis_url`` or ``amqp_url``
fixture.  When the broker does not answer, the test is skipped with the
reason, unless ``SIGNEDQUEUE_REQUIRE_BROKERS=1`` is set (as ``.ci/run``
does): then it fails, so CI can never pass by skipping the broker tests.
"""

from __future__ import annotations

import os
import socket

import pytest

REDIS_URL = os.environ.get("SIGNEDQUEUE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
AMQP_URL = os.environ.get("SIGNEDQUEUE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


def brokers_required() -> bool:
    return os.environ.get("SIGNEDQUEUE_REQUIRE_BROKERS", "") == "1"


def unavailable(what: str, why: str) -> None:
    """Skip, or fail when brokers are required."""
    message = f"{what} is not reachable ({why})"
    if brokers_required():
        pytest.fail(f"{message}, and SIGNEDQUEUE_REQUIRE_BROKERS=1 requires it")
    pytest.skip(f"{message}; start it or set SIGNEDQUEUE_TEST_* to test the transport")


def redis_reason(url: str = REDIS_URL) -> str | None:
    """None when Redis answers PING at *url*, else why not."""
    try:
        import redis
    except ImportError as exc:
        return f"redis-py is not installed: {exc}"
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:  # any failure to reach it
        return f"{url}: {type(exc).__name__}: {exc}"
    return None


def amqp_reason(url: str = AMQP_URL) -> str | None:
    """None when an AMQP broker accepts a connection at *url*, else why not."""
    try:
        import kombu
    except ImportError as exc:
        return f"kombu is not installed: {exc}"
    try:
        with kombu.Connection(url, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1, timeout=3)
    except Exception as exc:  # any failure to reach it
        return f"{url}: {type(exc).__name__}: {exc}"
    return None


def free_port() -> int:
    """A local TCP port nothing listens on (for broker-down tests)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
