"""
The Redis transport under faults: connections cut by ``CLIENT KILL``,
replies lost after the server ran the command (through a proxy that drops
them), a broker that is down or never answers.

What must hold: nothing is lost, an acknowledged frame is never delivered
again, a put is never repeated blindly, and every failure is a clear error
within the configured timeout, never a hang.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from brokers import free_port
from processes import WAIT, Background
from signedqueue import BrokerUnavailable, Codec, TransportError

redis = pytest.importorskip("redis")

from signedqueue.transports.redis import AsyncRedisQueue, RedisQueue  # noqa: E402

#: Generous bound for "raised within the configured timeout" (1 s here).
WITHIN = 10.0


@pytest.fixture
def name(redis_url: str) -> Iterator[str]:
    """A fresh queue name; its keys are deleted after the test."""
    name = f"test-{uuid.uuid4().hex}"
    yield name
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"signedqueue:{{{name}}}:*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def admin(redis_url: str) -> Iterator[Any]:
    """A client of its own, to kill others and look at the keys."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def tag() -> str:
    """A client name for this test's queues, to kill exactly their connections."""
    return f"sqtest-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def queues(redis_url: str, tag: str) -> Iterator[Callable[..., RedisQueue]]:
    """Makes RedisQueues whose connections are named *tag*."""
    made: list[RedisQueue] = []

    def make(name: str, codec: Codec, **options: Any) -> RedisQueue:
        options.setdefault("url", redis_url)
        options.setdefault("client_options", {"client_name": tag})
        made.append(RedisQueue(name, codec, **options))
        return made[-1]

    yield make
    for q in made:
        q.close()


def kill(admin: Any, tag: str) -> int:
    """Cut every connection named *tag*; return how many."""
    killed = 0
    for client in admin.client_list():
        if client.get("name") == tag:
            with contextlib.suppress(redis.ResponseError):  # gone already
                killed += admin.client_kill_filter(_id=client["id"])
    return killed


def processing_lengths(admin: Any, name: str) -> list[int]:
    keys = admin.scan_iter(match=f"signedqueue:{{{name}}}:processing:*")
    return [admin.llen(k) for k in keys]


class Proxy:
    """
    A TCP proxy to Redis that can lose one reply: after ``lose_reply_to(cmd)``
    the next command *cmd* is forwarded to Redis, which runs it, and the
    connection is cut when its reply comes back, before the client sees it.
    """

    def __init__(self, port: int) -> None:
        self.upstream = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.doom: bytes | None = None
        self.lost = 0
        self.sockets: list[socket.socket] = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def lose_reply_to(self, command: str) -> None:
        with self.lock:
            self.doom = b"\r\n" + command.encode() + b"\r\n"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.closed:
                client.close()
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream))
            self.sockets += [client, upstream]
            doomed = threading.Event()
            threading.Thread(
                target=self._up, args=(client, upstream, doomed), daemon=True
            ).start()
            threading.Thread(
                target=self._down, args=(client, upstream, doomed), daemon=True
            ).start()

    def _up(self, client: socket.socket, upstream: socket.socket, doomed: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(1 << 16):
                with self.lock:
                    if self.doom is not None and self.doom in data.upper():
                        self.doom = None
                        doomed.set()
                upstream.sendall(data)
        self._close(client, upstream)

    def _down(
        self, client: socket.socket, upstream: socket.socket, doomed: threading.Event
    ) -> None:
        with contextlib.suppress(OSError):
            while data := upstream.recv(1 << 16):
                if doomed.is_set():
                    with self.lock:
                        self.lost += 1
                    break
                client.sendall(data)
        self._close(client, upstream)

    @staticmethod
    def _close(*socks: socket.socket) -> None:
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        """Stop listening and cut every connection: the broker is gone."""
        self.closed = True
        self._close(self.listener)  # shutdown() wakes the accept() (Linux)
        self._close(*self.sockets)


@pytest.fixture
def proxy(redis_url: str) -> Iterator[Proxy]:
    """A reply-losing proxy in front of the test server."""
    port = redis.Redis.from_url(redis_url).connection_pool.connection_kwargs["port"]
    p = Proxy(port)
    yield p
    p.close()


# -- CLIENT KILL -------------------------------------------------------------


def test_kill_during_blocking_get(
    name: str, codec: Codec, queues: Any, admin: Any, tag: str
) -> None:
    consumer = queues(name, codec)
    producer = queues(name, codec, client_options={})
    waiting = Background(consumer.get, WAIT)
    time.sleep(0.5)
    assert kill(admin, tag) >= 1
    time.sleep(0.5)
    producer.put("after the cut")
    delivery = waiting.result()
    assert delivery.value == "after the cut"
    delivery.ack()
    with pytest.raises(queue.Empty):
        consumer.get(timeout=0.5)
    assert sum(processing_lengths(admin, name)) == 0


def test_kill_between_get_and_ack(
    name: str, codec: Codec, queues: Any, admin: Any, tag: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    q = queues(name, codec)
    q.put("one")
    delivery = q.get(timeout=5)
    assert kill(admin, tag) >= 1
    with caplog.at_level(logging.WARNING, logger="signedqueue"):
        delivery.ack()
    assert "no longer" not in caplog.text
    assert sum(processing_lengths(admin, name)) == 0
    with pytest.raises(queue.Empty):
        q.get(timeout=0.5)


def test_kill_before_put_and_nack(
    name: str, codec: Codec, queues: Any, admin: Any, tag: str
) -> None:
    q = queues(name, codec)
    q.put("warm the pool")
    assert kill(admin, tag) >= 1
    q.put("after the cut")  # a dead pooled connection is replaced before sending
    first = q.get(timeout=5)
    assert kill(admin, tag) >= 1
    first.nack()
    assert [q.get(timeout=5).value for _ in range(2)] == ["warm the pool", "after the cut"]


def test_many_frames_with_periodic_kills(
    name: str, codec: Codec, queues: Any, admin: Any, tag: str
) -> None:
    n = 300
    producer = queues(name, codec)
    consumer = queues(name, codec)
    ready = producer.keys["ready"]
    stop = threading.Event()
    kills = [0]

    def killer() -> None:
        killer_client = redis.Redis.from_url(
            f"redis://{admin.connection_pool.connection_kwargs['host']}:"
            f"{admin.connection_pool.connection_kwargs['port']}/0"
        )
        while not stop.wait(0.02):
            with contextlib.suppress(redis.RedisError):
                kills[0] += kill(killer_client, tag)
        killer_client.close()

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        unknown = 0
        for i in range(n):
            frame = producer.codec.dumps(i)
            while True:
                try:
                    producer.put_frame(frame)
                    break
                except TransportError as exc:
                    assert "may or may not have been queued" in str(exc)
                    unknown += 1
                    # No consumer runs yet: the ready list says which it was.
                    if admin.lpos(ready, frame) is not None:
                        break
        assert admin.llen(ready) == n
        delivered: collections.Counter[int] = collections.Counter()
        while sum(delivered.values()) < n:
            delivery = consumer.get(timeout=WAIT)
            delivered[delivery.value] += 1
            delivery.ack()
        kills_seen = kills[0]
    finally:
        stop.set()
        thread.join(WAIT)
    assert delivered == collections.Counter(range(n))  # each exactly once
    assert kills_seen > 0
    with pytest.raises(queue.Empty):
        consumer.get(timeout=1.0)
    assert sum(processing_lengths(admin, name)) == 0
    assert consumer.dead_letters() == []


# -- replies lost after the server ran the command ---------------------------


def test_put_whose_reply_is_lost_is_not_repeated(
    name: str, codec: Codec, proxy: Proxy, queues: Any, admin: Any
) -> None:
    q = queues(name, codec, url=f"redis://127.0.0.1:{proxy.port}/0", client_options={})
    q.put("warm")
    proxy.lose_reply_to("LPUSH")
    with pytest.raises(TransportError, match="may or may not have been queued") as info:
        q.put("sent")
    assert not isinstance(info.value, BrokerUnavailable)
    assert proxy.lost == 1
    assert admin.llen(q.keys["ready"]) == 2  # it was queued, once
    assert [q.get(timeout=5).value for _ in range(2)] == ["warm", "sent"]


def test_get_whose_reply_is_lost_delivers_the_frame(
    name: str, codec: Codec, proxy: Proxy, queues: Any, admin: Any
) -> None:
    q = queues(name, codec, url=f"redis://127.0.0.1:{proxy.port}/0", client_options={})
    q.put("moved, reply lost")
    q.put("next")
    q.get(timeout=0).nack()  # the first gets are done: registered, reconciled
    proxy.lose_reply_to("LMOVE")
    delivery = q.get(timeout=0)
    assert proxy.lost == 1
    assert delivery.value == "moved, reply lost"
    delivery.ack()
    proxy.lose_reply_to("BLMOVE")
    delivery = q.get(timeout=5)
    assert proxy.lost == 2
    assert delivery.value == "next"
    delivery.ack()
    with pytest.raises(queue.Empty):
        q.get(timeout=0.5)
    assert sum(processing_lengths(admin, name)) == 0


def test_ack_whose_reply_is_lost_is_retried(
    name: str, codec: Codec, proxy: Proxy, queues: Any, admin: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    q = queues(name, codec, url=f"redis://127.0.0.1:{proxy.port}/0", client_options={})
    q.put("once")
    delivery = q.get(timeout=5)
    proxy.lose_reply_to("LREM")
    with caplog.at_level(logging.WARNING, logger="signedqueue"):
        delivery.ack()
    assert proxy.lost == 1
    assert "no longer" not in caplog.text
    assert sum(processing_lengths(admin, name)) == 0
    with pytest.raises(queue.Empty):
        q.get(timeout=0.5)


def test_nack_whose_reply_is_lost_requeues_once(
    name: str, codec: Codec, proxy: Proxy, queues: Any, admin: Any
) -> None:
    q = queues(name, codec, url=f"redis://127.0.0.1:{proxy.port}/0", client_options={})
    q.put("again")
    delivery = q.get(timeout=5)
    proxy.lose_reply_to("EVALSHA")
    delivery.nack()
    assert proxy.lost == 1
    assert admin.llen(q.keys["ready"]) == 1
    q.get(timeout=5).ack()
    with pytest.raises(queue.Empty):
        q.get(timeout=0.5)


def test_ack_racing_a_reconcile_is_not_delivered_again(
    name: str, codec: Codec, queues: Any, admin: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    q = queues(name, codec)
    q.put("acked while the list is read")
    delivery = q.get(timeout=5)
    real_lrange = q.client.lrange

    def lrange_then_ack(*args: Any) -> Any:
        # Another thread acks after the snapshot was taken.
        snapshot = real_lrange(*args)
        delivery.ack()
        return snapshot

    monkeypatch.setattr(q.client, "lrange", lrange_then_ack)
    q._core.suspect = True  # as after a connection error in get()
    with pytest.raises(queue.Empty):
        q.get(timeout=0.5)
    assert sum(processing_lengths(admin, name)) == 0


# -- broker down -------------------------------------------------------------


def test_closed_port_is_broker_unavailable_within_timeout(name: str, codec: Codec) -> None:
    port = free_port()
    q = RedisQueue(name, codec, url=f"redis://127.0.0.1:{port}/0", timeout=1.0)
    for call in (lambda: q.put("x"), lambda: q.get(), lambda: q.get(timeout=0), q.qsize):
        start = time.monotonic()
        with pytest.raises(BrokerUnavailable) as info:
            call()
        assert time.monotonic() - start < WITHIN
        assert f"127.0.0.1:{port}" in str(info.value)
        assert "within 1 s" in str(info.value)
        assert isinstance(info.value, ConnectionError)
    q.close()


def test_silent_broker_is_an_error_within_timeout(name: str, codec: Codec) -> None:
    with socket.create_server(("127.0.0.1", 0), backlog=64) as silent:
        port = silent.getsockname()[1]
        q = RedisQueue(name, codec, url=f"redis://127.0.0.1:{port}/0", timeout=1.0)
        start = time.monotonic()
        with pytest.raises(BrokerUnavailable, match=f"127.0.0.1:{port}"):
            q.get()
        assert time.monotonic() - start < WITHIN
        start = time.monotonic()
        with pytest.raises(BrokerUnavailable, match="nothing was sent"):
            q.put("x")  # the connection's handshake is never answered
        assert time.monotonic() - start < WITHIN
        q.close()


def test_broker_lost_during_blocking_get_raises(
    name: str, codec: Codec, queues: Any, proxy: Proxy
) -> None:
    q = queues(name, codec, url=f"redis://127.0.0.1:{proxy.port}/0", timeout=1.0)
    waiting = Background(q.get)  # no timeout: waits for a frame forever
    time.sleep(1.0)
    assert waiting.running
    proxy.close()  # the broker goes away, and stays away
    start = time.monotonic()
    with pytest.raises(BrokerUnavailable, match=f"127.0.0.1:{proxy.port}"):
        waiting.result()
    assert time.monotonic() - start < WITHIN


def test_async_broker_down_and_silent(name: str, codec: Codec) -> None:
    async def main() -> None:
        port = free_port()
        async with AsyncRedisQueue(
            name, codec, url=f"redis://127.0.0.1:{port}/0", timeout=1.0
        ) as q:
            for call in (lambda: q.put("x"), lambda: q.get()):
                start = time.monotonic()
                with pytest.raises(BrokerUnavailable, match=f"127.0.0.1:{port}"):
                    await call()
                assert time.monotonic() - start < WITHIN
        with socket.create_server(("127.0.0.1", 0), backlog=64) as silent:
            port = silent.getsockname()[1]
            async with AsyncRedisQueue(
                name, codec, url=f"redis://127.0.0.1:{port}/0", timeout=1.0
            ) as q:
                start = time.monotonic()
                with pytest.raises(BrokerUnavailable):
                    await q.get()
                assert time.monotonic() - start < WITHIN

    asyncio.run(main())


def test_async_kill_during_get_and_lost_reply(
    name: str, codec: Codec, redis_url: str, admin: Any, tag: str, proxy: Proxy
) -> None:
    async def main() -> None:
        async with AsyncRedisQueue(
            name, codec, url=redis_url, client_options={"client_name": tag}
        ) as q, AsyncRedisQueue(
            name, codec, url=f"redis://127.0.0.1:{proxy.port}/0"
        ) as lossy:
            waiting = asyncio.ensure_future(q.get(timeout=WAIT))
            await asyncio.sleep(0.5)
            assert kill(admin, tag) >= 1
            await asyncio.sleep(0.3)
            await lossy.put("after the cut")
            delivery = await waiting
            assert delivery.value == "after the cut"
            await delivery.ack()
            await lossy.put("warm")
            await (await lossy.get(timeout=5)).ack()
            await lossy.put("reply lost")
            proxy.lose_reply_to("BLMOVE")
            delivery = await lossy.get(timeout=5)
            assert delivery.value == "reply lost"
            await delivery.ack()
            proxy.lose_reply_to("LPUSH")
            with pytest.raises(TransportError, match="may or may not"):
                await lossy.put("sent")
            assert (await lossy.get(timeout=5)).value == "sent"

    asyncio.run(main())
