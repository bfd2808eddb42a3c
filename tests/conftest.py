"""Shared fixtures: keyrings, codecs, a frozen clock, a clean environment."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator

import pytest

import signedqueue

#: Every start method this platform offers, for queue tests.
START_METHODS = [
    m for m in ("fork", "spawn", "forkserver") if m in multiprocessing.get_all_start_methods()
]


@pytest.fixture(autouse=True)
def _clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees a keyring from the developer's environment."""
    monkeypatch.delenv("SIGNEDQUEUE_KEYRING", raising=False)


@pytest.fixture
def ring() -> signedqueue.Keyring:
    """A fresh keyring with one active key."""
    return signedqueue.Keyring.generate()


@pytest.fixture
def codec(ring: signedqueue.Keyring) -> signedqueue.Codec:
    """A default codec (restricted pickle) over ``ring``."""
    return signedqueue.Codec(ring)


class FrozenClock:
    """A clock for Codec(clock=...) that moves only when told to."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FrozenClock:
    """A frozen clock starting at a fixed instant."""
    return FrozenClock()


@pytest.fixture(params=START_METHODS)
def mp_context(request: pytest.FixtureRequest) -> Iterator[multiprocessing.context.BaseContext]:
    """Each multiprocessing start method in turn."""
    yield multiprocessing.get_context(request.param)


@pytest.fixture(scope="session")
def redis_url() -> str:
    """A Redis server to test against (skips, or fails under REQUIRE_BROKERS)."""
    from brokers import REDIS_URL, redis_reason, unavailable

    reason = redis_reason()
    if reason is not None:
        unavailable("Redis", reason)
    return REDIS_URL


@pytest.fixture(scope="session")
def amqp_url() -> str:
    """A RabbitMQ server to test against (skips, or fails under REQUIRE_BROKERS)."""
    from brokers import AMQP_URL, amqp_reason, unavailable

    reason = amqp_reason()
    if reason is not None:
        unavailable("RabbitMQ", reason)
    return AMQP_URL
