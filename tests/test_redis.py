"""
The Redis transport against a real Redis: round trips, refusals and the
dead-letter list, ack/nack, the visibility timeout, and the asyncio variant.

Every test uses its own queue name and deletes the queue's keys afterwards.
Connection faults and broker outages are in ``test_redis_faults.py``.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import pickle
import queue
import random
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import signedqueue
from processes import WAIT, Background, start_all
from signedqueue import (
    Codec,
    ExpiredFrame,
    ForbiddenClass,
    FrameTooLarge,
    InvalidSignature,
    Keyring,
    MalformedFrame,
    RejectedFrame,
    UnknownKey,
)

redis = pytest.importorskip("redis")
aioredis = pytest.importorskip("redis.asyncio")

from signedqueue.transports.redis import (  # noqa: E402
    CONTEXT_LABEL,
    LOAD_FAILED,
    AsyncRedisQueue,
    DeadLetter,
    RedisQueue,
    bound_context,
    queue_keys,
)


def delete_queue(url: str, name: str) -> None:
    """Delete every key of the queue *name*."""
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"signedqueue:{{{name}}}:*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def names(redis_url: str) -> Iterator[Callable[[], str]]:
    """Makes fresh queue names; their keys are deleted after the test."""
    made: list[str] = []

    def make() -> str:
        made.append(f"test-{uuid.uuid4().hex}")
        return made[-1]

    yield make
    for name in made:
        delete_queue(redis_url, name)


@pytest.fixture
def name(names: Callable[[], str]) -> str:
    """A fresh queue name."""
    return names()


@pytest.fixture
def queues(redis_url: str) -> Iterator[Callable[..., RedisQueue]]:
    """Makes RedisQueues on the test server; closes them after the test."""
    made: list[RedisQueue] = []

    def make(name: str, codec: Codec, **options: Any) -> RedisQueue:
        made.append(RedisQueue(name, codec, url=redis_url, **options))
        return made[-1]

    yield make
    for q in made:
        q.close()


@pytest.fixture
def admin(redis_url: str) -> Iterator[Any]:
    """A plain client, for raw access to the queue's keys."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@dataclass
class Shape:
    """Not allowlisted by default: a consumer must name it in allow=."""

    sides: int
    name: str


SHAPE = f"{__name__}.Shape"


class Canary:
    """Unpickling it creates a file: the proof that an unsigned pickle ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.path,))


# -- round trips -------------------------------------------------------------


def test_round_trip_ack(name: str, codec: Codec, queues: Any, admin: Any) -> None:
    q = queues(name, codec)
    items = [{"a": 1}, [1, 2, 3], "text", b"\x00bytes", None, 3.5, (1, "x")]
    for item in items:
        q.put(item)
    assert q.qsize() == len(items)
    for item in items:
        delivery = q.get(timeout=5)
        assert delivery.value == item
        assert delivery.queue is q
        delivery.ack()
        assert delivery.settled
    assert admin.llen(q.keys["ready"]) == 0
    assert admin.llen(q.keys["processing"] + q.consumer) == 0


def test_custom_class_allowlisted(name: str, ring: Keyring, queues: Any) -> None:
    q = queues(name, Codec(ring, allow=[Shape]))
    q.put(Shape(3, "triangle"))
    delivery = q.get(timeout=5)
    assert delivery.value == Shape(3, "triangle")
    delivery.ack()


def test_msgpack_serializer(name: str, ring: Keyring, queues: Any) -> None:
    q = queues(name, Codec(ring, serializer="msgpack", msgpack_types=[Shape]))
    q.put({"n": [1, 2], "s": Shape(4, "square")})
    delivery = q.get(timeout=5)
    assert delivery.value == {"n": [1, 2], "s": Shape(4, "square")}
    delivery.ack()


def test_fifo_across_producer_and_consumer_objects(
    name: str, codec: Codec, queues: Any
) -> None:
    producer = queues(name, codec)
    consumer = queues(name, codec)
    for i in range(50):
        producer.put(i)
    got = []
    for _ in range(50):
        delivery = consumer.get(timeout=5)
        got.append(delivery.value)
        delivery.ack()
    assert got == list(range(50))


def test_get_timeout_raises_empty(name: str, codec: Codec, queues: Any) -> None:
    q = queues(name, codec)
    start = time.monotonic()
    with pytest.raises(queue.Empty):
        q.get(timeout=0.3)
    assert time.monotonic() - start >= 0.25
    with pytest.raises(queue.Empty):
        q.get(timeout=0)
    with pytest.raises(queue.Empty):
        q.get_nowait()
    q.put("late")
    assert q.get_nowait().value == "late"


def test_get_without_timeout_waits_for_a_put(name: str, codec: Codec, queues: Any) -> None:
    consumer = queues(name, codec)
    producer = queues(name, codec)
    waiting = Background(consumer.get)
    time.sleep(1.5)  # longer than one blocking slice
    assert waiting.running
    producer.put("wake")
    assert waiting.result().value == "wake"


def test_get_timeout_must_not_be_negative(name: str, codec: Codec, queues: Any) -> None:
    with pytest.raises(ValueError, match="timeout"):
        queues(name, codec).get(timeout=-1)


# -- context binding and keys ------------------------------------------------


def test_bound_context_bytes() -> None:
    expected = (
        len(CONTEXT_LABEL).to_bytes(4, "big") + CONTEXT_LABEL
        + b"\x00\x00\x00\x03app"
        + b"\x00\x00\x00\x06orders"
    )
    assert bound_context(b"app", "orders") == expected
    assert CONTEXT_LABEL == b"signedqueue.transports.redis/v1"
    # Length prefixes: moving bytes between the fields gives other contexts.
    assert bound_context(b"ab", "c") != bound_context(b"a", "bc")
    assert bound_context(b"", "é") == (
        len(CONTEXT_LABEL).to_bytes(4, "big") + CONTEXT_LABEL
        + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x02\xc3\xa9"
    )


def test_queue_codec_binds_the_name(name: str, ring: Keyring, queues: Any) -> None:
    codec = Codec(ring, context=b"app")
    q = queues(name, codec)
    assert q.codec.context == bound_context(b"app", name)
    assert codec.context == b"app"  # the caller's codec is not changed
    unbound = queues(name, codec, bind_name=False)
    assert unbound.codec is codec


def test_keys_share_one_hash_tag(name: str) -> None:
    keys = queue_keys(name)
    base = f"signedqueue:{{{name}}}:"
    assert keys == {
        "ready": base + "ready",
        "processing": base + "processing:",
        "alive": base + "alive:",
        "consumers": base + "consumers",
        "dead": base + "dead",
    }


def test_only_documented_keys_are_used(name: str, codec: Codec, queues: Any, admin: Any) -> None:
    q = queues(name, codec, consumer="c1")
    q.put(1)
    q.put(2)
    q.get(timeout=5).nack(requeue=False)
    kept = q.get(timeout=5)
    base = f"signedqueue:{{{name}}}:"
    assert {k.decode() for k in admin.scan_iter(match=f"signedqueue:{{{name}}}:*")} == {
        base + "processing:c1", base + "alive:c1", base + "consumers", base + "dead",
    }
    assert admin.type(base + "consumers") == b"set"
    assert admin.pttl(base + "alive:c1") > 0
    kept.ack()


# -- refusals: both sides of each --------------------------------------------


def test_unsigned_pickle_is_refused_dead_lettered_and_next_item_arrives(
    name: str, codec: Codec, queues: Any, admin: Any, tmp_path: Path
) -> None:
    canary = tmp_path / "canary"
    raw = pickle.dumps(Canary(canary))
    # The control: this pickle does create the canary when unpickled plainly.
    pickle.loads(raw)
    assert canary.exists()
    canary.unlink()

    q = queues(name, codec)
    admin.lpush(q.keys["ready"], raw)
    q.put("legit")
    with pytest.raises(MalformedFrame) as info:
        q.get(timeout=5)
    assert info.value.frame == raw
    assert not canary.exists()
    assert q.get(timeout=5).value == "legit"
    [letter] = q.dead_letters()
    assert letter.frame == raw
    assert letter.error == "MalformedFrame"
    assert letter.reason == info.value.reason
    assert letter.queue == name
    assert letter.consumer == q.consumer
    assert abs(letter.time - time.time()) < 60
    assert admin.llen(q.keys["processing"] + q.consumer) == 1  # only "legit", unacked
    assert not canary.exists()


def test_frame_copied_to_another_queue_is_refused(
    names: Callable[[], str], codec: Codec, queues: Any, admin: Any
) -> None:
    a, b = queues(names(), codec), queues(names(), codec)
    a.put("for a")
    a.put("for a, again")
    frame = admin.lindex(a.keys["ready"], -1)
    admin.lpush(b.keys["ready"], frame)
    with pytest.raises(InvalidSignature) as info:
        b.get(timeout=5)
    assert info.value.frame == frame
    assert [d.error for d in b.dead_letters()] == ["InvalidSignature"]
    # Queue A still reads its own frames.
    assert a.get(timeout=5).value == "for a"
    assert a.get(timeout=5).value == "for a, again"


def test_frame_copied_between_unbound_queues_is_accepted(
    names: Callable[[], str], codec: Codec, queues: Any, admin: Any
) -> None:
    a = queues(names(), codec, bind_name=False)
    b = queues(names(), codec, bind_name=False)
    a.put("anywhere")
    admin.lpush(b.keys["ready"], admin.lindex(a.keys["ready"], -1))
    assert b.get(timeout=5).value == "anywhere"
    assert a.get(timeout=5).value == "anywhere"


def test_unknown_key(name: str, codec: Codec, queues: Any) -> None:
    stranger = queues(name, Codec(Keyring.generate()))
    q = queues(name, codec)
    stranger.put("from a stranger")
    q.put("from a friend")
    with pytest.raises(UnknownKey):
        q.get(timeout=5)
    assert q.get(timeout=5).value == "from a friend"
    assert [d.error for d in q.dead_letters()] == ["UnknownKey"]


def test_forbidden_class_names_the_allow_entry(name: str, ring: Keyring, queues: Any) -> None:
    producer = queues(name, Codec(ring, allow=[Shape]))
    strict = queues(name, Codec(ring))
    producer.put(Shape(5, "pentagon"))
    producer.put("plain")
    with pytest.raises(ForbiddenClass) as info:
        strict.get(timeout=5)
    assert SHAPE in str(info.value)
    assert info.value.allow_entries == (SHAPE,)
    assert strict.get(timeout=5).value == "plain"
    [letter] = strict.dead_letters()
    assert letter.error == "ForbiddenClass" and SHAPE in letter.reason
    # The other side: a consumer that allows it loads it, from the dead letters.
    assert strict.requeue_dead_letters() == 1
    allowing = queues(name, Codec(ring, allow=[Shape]))
    assert allowing.get(timeout=5).value == Shape(5, "pentagon")


def test_tampered_frame(name: str, codec: Codec, queues: Any, admin: Any) -> None:
    q = queues(name, codec)
    good = q.codec.dumps({"amount": 10})
    bad = bytearray(good)
    bad[-40] ^= 1  # a payload byte
    admin.lpush(q.keys["ready"], bytes(bad), good)
    with pytest.raises(InvalidSignature):
        q.get(timeout=5)
    assert q.get(timeout=5).value == {"amount": 10}


def test_expired_frame(name: str, ring: Keyring, queues: Any, clock: Any) -> None:
    old = queues(name, Codec(ring, clock=clock))
    old.put("stale")
    clock.advance(100)
    q = queues(name, Codec(ring, max_age=10, clock=clock))
    with pytest.raises(ExpiredFrame):
        q.get(timeout=5)
    q.put("fresh")
    assert q.get(timeout=5).value == "fresh"


def test_oversized_entry_is_dead_lettered_whole(
    name: str, ring: Keyring, queues: Any, admin: Any
) -> None:
    q = queues(name, Codec(ring, max_frame_size=1024))
    big = Codec(ring).with_context(q.codec.context).dumps(b"x" * 5000)
    admin.lpush(q.keys["ready"], big)
    with pytest.raises(FrameTooLarge) as info:
        q.get(timeout=5)
    assert info.value.frame == big[:4096]
    [letter] = q.dead_letters()
    assert letter.frame == big  # kept whole, so it can be requeued


@pytest.mark.parametrize("garbage", [b"", b"x", b"\x00" * 56, b"SQ" + os.urandom(200)])
def test_garbage_never_crashes_or_hangs(
    garbage: bytes, name: str, codec: Codec, queues: Any, admin: Any
) -> None:
    q = queues(name, codec)
    admin.lpush(q.keys["ready"], garbage)
    q.put("next")
    with pytest.raises(RejectedFrame) as info:
        q.get(timeout=5)
    assert info.value.frame == garbage
    assert q.get(timeout=5).value == "next"
    assert [d.frame for d in q.dead_letters()] == [garbage]


def test_rejected_frame_never_in_messages_or_reprs(
    name: str, codec: Codec, queues: Any, admin: Any, caplog: pytest.LogCaptureFixture
) -> None:
    secret = b"TOPSECRET-PAYLOAD-" + os.urandom(8).hex().encode()
    q = queues(name, codec)
    admin.lpush(q.keys["ready"], secret)
    with caplog.at_level(logging.DEBUG, logger="signedqueue"), pytest.raises(
        RejectedFrame
    ) as info:
        q.get(timeout=5)
    q.put(secret)
    delivery = q.get(timeout=5)
    texts = [str(info.value), repr(info.value), repr(q), repr(delivery), caplog.text]
    texts += [repr(d) for d in q.dead_letters()]
    for text in texts:
        assert b"TOPSECRET".decode() not in text
    assert "TOPSECRET" not in repr(q.dead_letters())


# -- ack and nack ------------------------------------------------------------


def test_nack_requeues_to_the_front(name: str, codec: Codec, queues: Any) -> None:
    q = queues(name, codec)
    for i in range(3):
        q.put(i)
    first = q.get(timeout=5)
    first.nack()
    again = q.get(timeout=5)
    assert again.value == 0
    again.ack()
    assert [q.get(timeout=5).value for _ in range(2)] == [1, 2]


def test_nack_without_requeue_dead_letters(name: str, codec: Codec, queues: Any) -> None:
    q = queues(name, codec)
    q.put("poison")
    q.get(timeout=5).nack(requeue=False)
    [letter] = q.dead_letters()
    assert (letter.reason, letter.error) == ("nacked", "nacked")
    assert q.codec.loads(letter.frame) == "poison"
    with pytest.raises(queue.Empty):
        q.get(timeout=0)


def test_settling_twice(name: str, names: Callable[[], str], codec: Codec, queues: Any) -> None:
    q = queues(name, codec)
    q.put(1)
    delivery = q.get(timeout=5)
    delivery.ack()
    delivery.ack()  # idempotent
    with pytest.raises(ValueError, match="already acked"):
        delivery.nack()
    q.put(2)
    nacked = q.get(timeout=5)
    nacked.nack()
    with pytest.raises(ValueError, match="already nacked"):
        nacked.ack()
    other = queues(names(), codec)
    with pytest.raises(ValueError, match="did not come from this queue"):
        other.ack(q.get(timeout=5))


def test_ack_leaves_nothing_behind(name: str, codec: Codec, queues: Any, admin: Any) -> None:
    q = queues(name, codec, consumer="solo")
    for i in range(10):
        q.put(i)
    for _ in range(10):
        q.get(timeout=5).ack()
    assert admin.llen(q.keys["processing"] + "solo") == 0
    assert admin.llen(q.keys["ready"]) == 0
    with pytest.raises(queue.Empty):
        q.get(timeout=0)


# -- dead letters ------------------------------------------------------------


def test_dead_letters_requeue_and_purge(
    name: str, codec: Codec, queues: Any, admin: Any
) -> None:
    q = queues(name, codec)
    for i in range(4):
        q.put(i)
        q.get(timeout=5).nack(requeue=False)
    letters = q.dead_letters()
    assert [q.codec.loads(d.frame) for d in letters] == [0, 1, 2, 3]  # oldest first
    assert [q.codec.loads(d.frame) for d in q.dead_letters(limit=2)] == [0, 1]
    assert q.dead_letters(limit=0) == []
    assert q.requeue_dead_letters(letters[:1]) == 1
    assert q.requeue_dead_letters(letters[:1]) == 0  # already moved
    assert q.get(timeout=5).value == 0
    assert q.purge_dead_letters(letters[1:2]) == 1
    assert [q.codec.loads(d.frame) for d in q.dead_letters()] == [2, 3]
    assert q.purge_dead_letters() == 2
    assert q.dead_letters() == []


def test_unreadable_dead_letter_record(name: str, codec: Codec, queues: Any, admin: Any) -> None:
    q = queues(name, codec)
    admin.lpush(q.keys["dead"], b"\xc1 not msgpack")
    [letter] = q.dead_letters()
    assert letter.error == "unreadable"
    assert letter.frame == b"\xc1 not msgpack"
    assert isinstance(letter, DeadLetter)
    assert q.purge_dead_letters([letter]) == 1


# -- visibility timeout and recovery -----------------------------------------


def test_frames_of_a_silent_consumer_come_back(
    name: str, codec: Codec, queues: Any, caplog: pytest.LogCaptureFixture
) -> None:
    silent = queues(name, codec, visibility_timeout=0.5)
    other = queues(name, codec, visibility_timeout=0.5)
    for i in range(2):
        silent.put(i)
    taken = silent.get(timeout=5)
    assert taken.value == 0
    kept = other.get(timeout=5)
    assert kept.value == 1
    # `silent` stops calling the queue; its alive key expires.
    again = other.get(timeout=10)
    assert again.value == 0
    again.ack()
    kept.ack()
    with pytest.raises(queue.Empty):
        other.get(timeout=1.0)
    with caplog.at_level(logging.WARNING, logger="signedqueue"):
        taken.ack()  # too late: it was already put back
    assert "no longer in the processing list" in caplog.text


def test_recover_by_hand(name: str, codec: Codec, queues: Any, redis_url: str) -> None:
    dead = queues(name, codec, visibility_timeout=0.2)
    dead.put("orphan")
    dead.get(timeout=5)
    watcher = queues(name, codec)
    assert watcher.recover() == 0  # still alive
    time.sleep(0.5)
    assert watcher.recover() == 1
    assert watcher.recover() == 0
    assert watcher.get(timeout=5).value == "orphan"


def test_restarted_consumer_id_gets_its_frames_first(
    name: str, codec: Codec, queues: Any
) -> None:
    before = queues(name, codec, consumer="worker-1")
    before.put("in flight")
    before.put("waiting")
    before.get(timeout=5)
    # A new object with the same id (a restarted worker) before the old
    # one's alive key expired: it finds the frame in its processing list.
    after = queues(name, codec, consumer="worker-1")
    first = after.get(timeout=5)
    assert first.value == "in flight"
    first.ack()
    assert after.get(timeout=5).value == "waiting"


def test_close_puts_unacked_frames_back(name: str, codec: Codec, queues: Any) -> None:
    q = queues(name, codec)
    q.put("a")
    q.put("b")
    q.get(timeout=5).ack()
    q.get(timeout=5)
    q.close()
    q.close()  # twice is fine
    with pytest.raises(ValueError, match="closed"):
        q.get(timeout=0)
    other = queues(name, codec)
    assert other.get(timeout=5).value == "b"


def test_heartbeat_thread_keeps_a_slow_consumer_alive(
    name: str, codec: Codec, queues: Any
) -> None:
    slow = queues(name, codec, visibility_timeout=0.6, heartbeat=True)
    other = queues(name, codec, visibility_timeout=0.6)
    slow.put("long task")
    delivery = slow.get(timeout=5)
    with pytest.raises(queue.Empty):
        other.get(timeout=2.0)  # three visibility timeouts
    delivery.ack()


def test_heartbeat_by_hand(name: str, codec: Codec, queues: Any) -> None:
    slow = queues(name, codec, visibility_timeout=0.6)
    other = queues(name, codec, visibility_timeout=0.6)
    slow.put("long task")
    delivery = slow.get(timeout=5)
    for _ in range(6):
        time.sleep(0.2)
        slow.heartbeat()
    assert other.recover() == 0
    delivery.ack()


def _take_and_hang(url: str, name: str, codec: Codec, ready: Any) -> None:
    """Child: ack the first frame, take the second, say so, then hang."""
    q = RedisQueue(name, codec, url=url, visibility_timeout=1.0)
    q.get(timeout=WAIT).ack()
    q.get(timeout=WAIT)
    ready.set()
    time.sleep(WAIT)


@pytest.mark.slow
def test_killed_consumer_loses_nothing(
    name: str, codec: Codec, queues: Any, redis_url: str, admin: Any
) -> None:
    ctx = multiprocessing.get_context("spawn")
    producer = queues(name, codec)
    producer.put("acked by the child")
    producer.put("taken by the child")
    ready = ctx.Event()
    child = ctx.Process(target=_take_and_hang, args=(redis_url, name, codec, ready))
    start_all([child])
    try:
        assert ready.wait(WAIT)
        child.kill()
    finally:
        child.join(WAIT)
    assert child.exitcode == -9
    consumer = queues(name, codec, visibility_timeout=1.0)
    delivery = consumer.get(timeout=WAIT)
    assert delivery.value == "taken by the child"
    delivery.ack()
    # Exactly once more, and the acked frame never.
    with pytest.raises(queue.Empty):
        consumer.get(timeout=3.0)
    assert consumer.recover() == 0
    assert [k for k in admin.scan_iter(match=f"signedqueue:{{{name}}}:processing:*")
            if admin.llen(k)] == []


# -- bad input ---------------------------------------------------------------


def test_constructor_checks(name: str, codec: Codec, redis_url: str, admin: Any) -> None:
    with pytest.raises(ValueError, match="either url"):
        RedisQueue(name, codec)
    with pytest.raises(ValueError, match="either url"):
        RedisQueue(name, codec, url=redis_url, client=admin)
    for bad in ("", "a{b", "x}", "tab\there", "x" * 201):
        with pytest.raises(ValueError):
            RedisQueue(bad, codec, url=redis_url)
    with pytest.raises(TypeError):
        RedisQueue(b"bytes", codec, url=redis_url)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Codec"):
        RedisQueue(name, object(), url=redis_url)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="consumer"):
        RedisQueue(name, codec, url=redis_url, consumer="")
    with pytest.raises(ValueError, match="visibility_timeout"):
        RedisQueue(name, codec, url=redis_url, visibility_timeout=0)
    for bad_timeout in (-1, 0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="timeout"):
            RedisQueue(name, codec, url=redis_url, timeout=bad_timeout)
        with pytest.raises(ValueError, match="visibility_timeout"):
            RedisQueue(name, codec, url=redis_url, visibility_timeout=bad_timeout)
    decoding = redis.Redis.from_url(redis_url, decode_responses=True)
    with pytest.raises(ValueError, match="decode_responses"):
        RedisQueue(name, codec, client=decoding)
    decoding.close()
    async_client, sync_client = aioredis.Redis(), redis.Redis()
    with pytest.raises(TypeError, match="AsyncRedisQueue"):
        RedisQueue(name, codec, client=async_client)
    with pytest.raises(TypeError, match="RedisQueue"):
        AsyncRedisQueue(name, codec, client=sync_client)
    sync_client.close()
    asyncio.run(async_client.aclose())


def test_user_client_is_not_closed(name: str, codec: Codec, redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    with RedisQueue(name, codec, client=client) as q:
        q.put(1)
        q.get(timeout=5).ack()
    assert client.ping()
    client.close()


def test_wrong_key_type_is_a_clear_error(
    name: str, codec: Codec, queues: Any, admin: Any
) -> None:
    q = queues(name, codec)
    admin.set(q.keys["ready"], b"not a list")
    with pytest.raises(signedqueue.TransportError, match="WRONGTYPE"):
        q.put(1)
    with pytest.raises(signedqueue.TransportError, match="WRONGTYPE"):
        q.get(timeout=0)


def test_unpicklable_object_raises_in_put(name: str, codec: Codec, queues: Any) -> None:
    q = queues(name, codec)
    with pytest.raises(Exception, match=r"pickle|lambda"):
        q.put(lambda: None)
    assert q.qsize() == 0


def test_queue_is_refused_in_another_process(name: str, codec: Codec, queues: Any) -> None:
    q = queues(name, codec)
    q._core.pid = -1  # as after a fork
    with pytest.raises(RuntimeError, match="each process"):
        q.get(timeout=0)
    q._core.pid = os.getpid()


# -- interruptions, close() during get(), forged entries -----------------------


class Picky(Codec):
    """A codec whose loads() raises what the loaded value names, after the
    frame verified (as an application's Codec subclass could)."""

    def loads(self, frame: Any) -> Any:
        value = super().loads(frame)
        if value == "lookup-error":
            raise LookupError("detail that quotes the payload")
        if value == "interrupt-once" and not getattr(self, "interrupted", False):
            self.interrupted = True
            raise KeyboardInterrupt
        return value


def test_frame_that_fails_to_load_is_dead_lettered(
    name: str, ring: Keyring, queues: Any, admin: Any, redis_url: str
) -> None:
    q = queues(name, Picky(ring), bind_name=False)
    q.put("lookup-error")
    q.put("next")
    with pytest.raises(LookupError, match="quotes the payload"):
        q.get(timeout=5)
    [letter] = q.dead_letters()
    assert (letter.error, letter.reason) == ("LookupError", LOAD_FAILED)
    assert "quotes" not in letter.reason
    assert Codec(ring).loads(letter.frame) == "lookup-error"  # the frame, whole
    assert admin.llen(q.keys["processing"] + q.consumer) == 0
    delivery = q.get(timeout=5)
    assert delivery.value == "next"
    delivery.ack()
    assert not q._core.held

    async def main() -> None:
        async with AsyncRedisQueue(name, Picky(ring), url=redis_url, bind_name=False) as aq:
            await aq.put("lookup-error")
            with pytest.raises(LookupError):
                await aq.get(timeout=5)
            assert [d.error for d in await aq.dead_letters()] == ["LookupError"] * 2
            assert not aq._core.held

    asyncio.run(main())


def test_interrupted_get_loses_no_frame(
    name: str, ring: Keyring, codec: Codec, queues: Any, admin: Any
) -> None:
    q = queues(name, Picky(ring), bind_name=False)
    processing = q.keys["processing"] + q.consumer
    # Interrupted after Redis moved the frame, before get() had its reply.
    real_blmove = q.client.blmove

    def blmove_then_interrupt(*args: Any) -> Any:
        del q.client.blmove
        real_blmove(*args)
        raise KeyboardInterrupt

    q.client.blmove = blmove_then_interrupt
    q.put("moved")
    with pytest.raises(KeyboardInterrupt):
        q.get(timeout=5)
    assert admin.llen(processing) == 1
    delivery = q.get(timeout=5)
    assert delivery.value == "moved"
    delivery.ack()
    # Interrupted while loading.
    q.put("interrupt-once")
    with pytest.raises(KeyboardInterrupt):
        q.get(timeout=5)
    delivery = q.get(timeout=5)
    assert delivery.value == "interrupt-once"
    delivery.ack()
    # Interrupted while dead-lettering a refused frame.
    admin.lpush(q.keys["ready"], b"not a frame")
    real_script = q._scripts["dead_letter"]

    def interrupt_once(**kwargs: Any) -> Any:
        q._scripts["dead_letter"] = real_script
        raise KeyboardInterrupt

    q._scripts["dead_letter"] = interrupt_once
    with pytest.raises(KeyboardInterrupt):
        q.get(timeout=5)
    with pytest.raises(MalformedFrame):
        q.get(timeout=5)
    assert [d.frame for d in q.dead_letters()] == [b"not a frame"]
    assert admin.llen(processing) == 0
    assert not q._core.held


@pytest.mark.parametrize("made_from", ["url", "client"])
def test_close_while_another_thread_waits_in_get(
    name: str, codec: Codec, queues: Any, admin: Any, redis_url: str, made_from: str
) -> None:
    client = redis.Redis.from_url(redis_url)
    if made_from == "url":
        q = RedisQueue(name, codec, url=redis_url, visibility_timeout=2)
    else:
        q = RedisQueue(name, codec, client=client, visibility_timeout=2)
    producer = queues(name, codec)
    waiting = Background(q.get)
    time.sleep(0.7)  # registered, blocked in a BLMOVE
    closing = Background(q.close)
    time.sleep(0.05)
    producer.put("job")  # taken by the BLMOVE in flight, after close() began
    closing.result()
    with pytest.raises(ValueError, match="is closed"):
        waiting.result()
    time.sleep(1.2)  # a touch would be due by now
    assert admin.smembers(q.keys["consumers"]) == set()
    assert not admin.exists(q.keys["alive"] + q.consumer)
    assert admin.llen(q.keys["processing"] + q.consumer) == 0
    delivery = producer.get(timeout=5)
    assert delivery.value == "job"
    delivery.ack()
    client.close()


def test_forged_consumer_entry_does_not_stop_recovery(
    name: str, codec: Codec, queues: Any, admin: Any, caplog: pytest.LogCaptureFixture
) -> None:
    q = queues(name, codec, visibility_timeout=0.5)
    keys = q.keys
    # A writer without the key: an entry whose "processing list" is a string,
    # sorting before a real consumer that died holding a frame.
    admin.sadd(keys["consumers"], "a-forged", "z-dead")
    admin.set(keys["processing"] + "a-forged", "not a list")
    admin.rpush(keys["processing"] + "z-dead", codec_frame(q, "orphan"))
    with caplog.at_level(logging.WARNING, logger="signedqueue"):
        delivery = q.get(timeout=5)
    assert delivery.value == "orphan"
    delivery.ack()
    assert "not a list" in caplog.text
    assert admin.smembers(keys["consumers"]) == {q.consumer.encode()}
    assert admin.get(keys["processing"] + "a-forged") == b"not a list"  # left alone
    for i in range(3):
        q.put(i)
    assert [q.get(timeout=5).value for _ in range(3)] == [0, 1, 2]


def test_failed_recovery_pass_does_not_fail_get(
    name: str, codec: Codec, queues: Any, caplog: pytest.LogCaptureFixture
) -> None:
    q = queues(name, codec, visibility_timeout=0.2)
    q.put("a")
    q.client.sadd(q.keys["consumers"], "someone")

    def refused(**kwargs: Any) -> Any:
        raise redis.ResponseError("WRONGTYPE Operation against a key")

    q._scripts["recover"] = refused
    with caplog.at_level(logging.WARNING, logger="signedqueue"):
        assert q.get(timeout=5).value == "a"
    assert "recovering the frames of stopped consumers failed" in caplog.text


def codec_frame(q: Any, value: Any) -> bytes:
    """A frame of *value* sealed for the queue *q*."""
    return bytes(q.codec.dumps(value))


# -- asyncio -----------------------------------------------------------------


def test_async_round_trip_ack_nack(name: str, codec: Codec, redis_url: str) -> None:
    async def main() -> None:
        async with AsyncRedisQueue(name, codec, url=redis_url) as q:
            for i in range(3):
                await q.put(i)
            assert await q.qsize() == 3
            first = await q.get(timeout=5)
            assert first.value == 0
            await first.nack()
            again = await q.get(timeout=5)
            assert again.value == 0
            await again.ack()
            poison = await q.get(timeout=5)
            await poison.nack(requeue=False)
            assert [d.reason for d in await q.dead_letters()] == ["nacked"]
            last = await q.get(timeout=5)
            assert last.value == 2
            await last.ack()
            with pytest.raises(queue.Empty):
                await q.get(timeout=0.2)
            assert await q.requeue_dead_letters() == 1
            assert (await q.get_nowait()).value == 1
            assert await q.purge_dead_letters() == 0

    asyncio.run(main())


def test_async_and_sync_queues_interoperate(
    name: str, codec: Codec, queues: Any, redis_url: str
) -> None:
    sync = queues(name, codec)
    sync.put({"from": "sync"})

    async def main() -> None:
        async with AsyncRedisQueue(name, codec, url=redis_url) as q:
            delivery = await q.get(timeout=5)
            assert delivery.value == {"from": "sync"}
            await delivery.ack()
            await q.put({"from": "async"})

    asyncio.run(main())
    assert sync.get(timeout=5).value == {"from": "async"}


def test_async_refusal_dead_letter_and_next_item(
    name: str, codec: Codec, redis_url: str, admin: Any, tmp_path: Path
) -> None:
    canary = tmp_path / "canary"
    raw = pickle.dumps(Canary(canary))

    async def main() -> None:
        async with AsyncRedisQueue(name, codec, url=redis_url) as q:
            await q.client.lpush(q.keys["ready"], raw)
            await q.put("legit")
            with pytest.raises(MalformedFrame) as info:
                await q.get(timeout=5)
            assert info.value.frame == raw
            delivery = await q.get(timeout=5)
            assert delivery.value == "legit"
            await delivery.ack()
            [letter] = await q.dead_letters()
            assert letter.frame == raw and letter.error == "MalformedFrame"

    asyncio.run(main())
    assert not canary.exists()


def test_async_recovery(name: str, codec: Codec, redis_url: str) -> None:
    async def main() -> None:
        async with AsyncRedisQueue(
            name, codec, url=redis_url, visibility_timeout=0.5
        ) as silent, AsyncRedisQueue(name, codec, url=redis_url, visibility_timeout=0.5) as other:
            await silent.put("orphan")
            taken = await silent.get(timeout=5)
            again = await other.get(timeout=10)
            assert again.value == "orphan"
            await again.ack()
            await taken.ack()  # too late; logged
            with pytest.raises(queue.Empty):
                await other.get(timeout=1.0)

    asyncio.run(main())


def test_async_heartbeat_task(name: str, codec: Codec, redis_url: str) -> None:
    async def main() -> None:
        async with AsyncRedisQueue(
            name, codec, url=redis_url, visibility_timeout=0.6, heartbeat=True
        ) as slow, AsyncRedisQueue(name, codec, url=redis_url, visibility_timeout=0.6) as other:
            await slow.put("long task")
            delivery = await slow.get(timeout=5)
            with pytest.raises(queue.Empty):
                await other.get(timeout=2.0)
            await delivery.ack()

    asyncio.run(main())


def test_async_binds_the_name(names: Callable[[], str], codec: Codec, redis_url: str) -> None:
    a_name, b_name = names(), names()

    async def main() -> None:
        async with AsyncRedisQueue(a_name, codec, url=redis_url) as a, AsyncRedisQueue(
            b_name, codec, url=redis_url
        ) as b:
            assert a.codec.context == bound_context(b"", a_name)
            await a.put("for a")
            frame = await a.client.lindex(a.keys["ready"], -1)
            await b.client.lpush(b.keys["ready"], frame)
            with pytest.raises(InvalidSignature):
                await b.get(timeout=5)
            assert (await a.get(timeout=5)).value == "for a"

    asyncio.run(main())


def test_async_cancelled_gets_lose_nothing(
    name: str, codec: Codec, redis_url: str, admin: Any
) -> None:
    count = 300
    rng = random.Random(1234)

    async def main() -> tuple[list[int], Any]:
        got: list[int] = []
        async with AsyncRedisQueue(
            name, codec, url=redis_url, visibility_timeout=30, heartbeat=True
        ) as q, AsyncRedisQueue(name, codec, url=redis_url) as producer:

            async def produce() -> None:
                for i in range(count):
                    await producer.put(i)
                    await asyncio.sleep(rng.uniform(0, 0.004))

            task = asyncio.create_task(produce())
            cancelled = 0
            while len(got) < count:
                # Cancelled mid-BLMOVE often: a frame moved whose reply is
                # lost, which the next get() must find and deliver.
                producing = not task.done()
                budget = rng.uniform(0.0005, 0.004) if producing else 3.0
                try:
                    delivery = await asyncio.wait_for(q.get(), timeout=budget)
                except asyncio.TimeoutError:
                    if not producing:
                        break  # frames stranded (heartbeat on: until close)
                    cancelled += 1
                    continue
                got.append(delivery.value)
                await delivery.ack()
            await task
            assert cancelled > 10
            return got, (q.keys["processing"] + q.consumer, dict(q._core.held))

    got, (processing, held) = asyncio.run(main())
    assert sorted(got) == list(range(count))  # each exactly once
    assert admin.llen(processing) == 0
    assert not held


def test_async_close_while_another_task_waits_in_get(
    name: str, codec: Codec, redis_url: str, admin: Any
) -> None:
    async def main() -> None:
        q = AsyncRedisQueue(name, codec, url=redis_url, visibility_timeout=2)
        async with AsyncRedisQueue(name, codec, url=redis_url) as producer:
            waiting = asyncio.create_task(q.get())
            await asyncio.sleep(0.7)
            closing = asyncio.create_task(q.close())
            await asyncio.sleep(0.05)
            await producer.put("job")  # taken by the BLMOVE in flight
            await closing
            with pytest.raises(ValueError, match="is closed"):
                await waiting
            await asyncio.sleep(1.2)
            assert admin.smembers(q.keys["consumers"]) == set()
            assert not admin.exists(q.keys["alive"] + q.consumer)
            assert admin.llen(q.keys["processing"] + q.consumer) == 0
            delivery = await producer.get(timeout=5)
            assert delivery.value == "job"
            await delivery.ack()

    asyncio.run(main())


def test_bad_arguments_make_no_client(
    name: str, codec: Codec, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[Any] = []
    for cls in (redis.Redis, aioredis.Redis):
        real = cls.from_url

        def spy(*args: Any, _real: Any = real, **kwargs: Any) -> Any:
            made.append(_real(*args, **kwargs))
            return made[-1]

        monkeypatch.setattr(cls, "from_url", spy)
    for queue_class in (RedisQueue, AsyncRedisQueue):
        with pytest.raises(ValueError):
            queue_class("a{b", codec, url=redis_url)
        with pytest.raises(ValueError, match="consumer"):
            queue_class(name, codec, url=redis_url, consumer="")
        with pytest.raises(TypeError, match="Codec"):
            queue_class(name, object(), url=redis_url)  # type: ignore[arg-type]
    assert made == []


# -- key rotation ------------------------------------------------------------


def test_key_rotation_across_workers(name: str, queues: Any) -> None:
    # Each worker has its own copy of the ring, as separate hosts would.
    document = Keyring.generate().to_json()
    producer_ring, consumer_ring = Keyring.from_json(document), Keyring.from_json(document)
    producer = queues(name, Codec(producer_ring))
    consumer = queues(name, Codec(consumer_ring))
    old_id = producer_ring.active_id
    producer.put("old key")
    # 1. Stage the new key everywhere; 2. promote it.
    new_id = consumer_ring.add()
    producer_ring = Keyring.from_json(consumer_ring.to_json())
    producer = queues(name, Codec(producer_ring))
    producer_ring.promote(new_id)
    consumer_ring.promote(new_id)
    producer.put("new key")
    assert [consumer.get(timeout=5).value for _ in range(2)] == ["old key", "new key"]
    # 3. Frames of the old key drained; a late one is put before retiring.
    keeper = Codec(Keyring.from_json(consumer_ring.to_json()))
    late = Codec(Keyring.from_json(document)).with_context(consumer.codec.context).dumps("late")
    producer.put_frame(late)
    # 4. Retire: the late frame is refused and dead-lettered, not lost.
    consumer_ring.retire(old_id)
    with pytest.raises(UnknownKey):
        consumer.get(timeout=5)
    [letter] = consumer.dead_letters()
    fixed = keeper.with_context(consumer.codec.context).reseal(letter.frame)
    consumer.purge_dead_letters([letter])
    producer.put_frame(fixed)
    delivery = consumer.get(timeout=5)
    assert delivery.value == "late"
    assert consumer.codec.verify(delivery.frame).key_id == new_id
