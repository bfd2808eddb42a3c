"""Replay protection: guards in memory, in a SQLite file and in Redis, and the
RedisQueue's at-least-once redelivery with a guard."""

from __future__ import annotations

import multiprocessing
import pickle
import threading
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from signedqueue import (
    Codec,
    ExpiredFrame,
    FileReplayGuard,
    Keyring,
    MemoryReplayGuard,
    RedisReplayGuard,
    ReplayedFrame,
    ReplayGuard,
    ReplayGuardFull,
    ReplayGuardUnavailable,
)

WINDOW = 60.0 + 60.0  # max_age + the default clock skew


def small_and_large() -> list[object]:
    # A small dict takes the fast path of loads(); 100 kB the slow one.
    return [{"id": 1}, b"x" * 100_000]


# -- the codec and the memory guard ------------------------------------------


@pytest.mark.parametrize("obj", small_and_large(), ids=["small", "large"])
def test_same_frame_twice_is_refused(ring: Keyring, obj: object) -> None:
    """The second delivery of a frame is a ReplayedFrame, on both loads paths."""
    codec = Codec(ring, max_age=60, replay_guard=MemoryReplayGuard())
    frame = codec.dumps(obj)
    assert codec.loads(frame) == obj
    with pytest.raises(ReplayedFrame) as info:
        codec.loads(frame)
    assert info.value.frame == frame
    assert not isinstance(info.value, ReplayGuardFull)


def test_distinct_frames_are_accepted(ring: Keyring) -> None:
    """Frames of the same object differ in nonce: all are accepted."""
    guard = MemoryReplayGuard()
    codec = Codec(ring, max_age=60, replay_guard=guard)
    frames = [codec.dumps({"same": True}) for _ in range(500)]
    assert [codec.loads(f) for f in frames] == [{"same": True}] * 500
    assert len(guard) == 500


def test_relaying_methods_do_not_consume(ring: Keyring) -> None:
    """Only loads() remembers a frame: unseal() (get_frame relays), verify(),
    reseal() and inspect() do not."""
    codec = Codec(ring, max_age=60, replay_guard=MemoryReplayGuard())
    frame = codec.dumps(1)
    codec.unseal(frame)
    codec.verify(frame)
    codec.reseal(frame)
    codec.inspect(frame)
    assert codec.loads(frame) == 1


def test_guard_needs_max_age(ring: Keyring) -> None:
    """Without max_age a frame would be remembered forever: refused."""
    with pytest.raises(ValueError, match="max_age"):
        Codec(ring, replay_guard=MemoryReplayGuard())
    with pytest.raises(TypeError, match="replay guard"):
        Codec(ring, max_age=1, replay_guard=object())  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        MemoryReplayGuard(0)


def test_guards_follow_the_protocol(tmp_path: Path) -> None:
    """Each guard is a ReplayGuard (runtime check of the protocol)."""
    assert isinstance(MemoryReplayGuard(), ReplayGuard)
    assert isinstance(FileReplayGuard(tmp_path / "g.db"), ReplayGuard)


def test_two_codecs_sharing_a_guard(ring: Keyring) -> None:
    """A frame accepted by one consumer is refused by another with the same guard."""
    guard = MemoryReplayGuard()
    a = Codec(ring, max_age=60, replay_guard=guard)
    b = Codec(ring, max_age=60, replay_guard=guard)
    frame = a.dumps("once")
    assert b.loads(frame) == "once"
    with pytest.raises(ReplayedFrame):
        a.loads(frame)
    # with_context keeps the guard.
    assert a.with_context(b"x").replay_guard is guard


def test_expiry_frees_memory_and_then_the_frame_is_expired(ring: Keyring, clock: Any) -> None:
    """After max_age + clock_skew a key is purged; the frame is then refused as expired."""
    guard = MemoryReplayGuard(clock=clock)
    codec = Codec(ring, max_age=60, replay_guard=guard, clock=clock)
    old = [codec.dumps(i) for i in range(100)]
    for frame in old:
        codec.loads(frame)
    assert len(guard) == 100
    clock.advance(WINDOW - 1)
    codec.loads(codec.dumps("new"))  # purges nothing yet
    assert len(guard) == 101
    clock.advance(2)
    codec.loads(codec.dumps("newer"))  # purges the 100 old keys
    assert len(guard) == 2
    with pytest.raises(ExpiredFrame):
        codec.loads(old[0])


def test_full_guard_fails_closed(ring: Keyring, clock: Any) -> None:
    """A full guard refuses new frames (ReplayGuardFull) rather than forget keys."""
    guard = MemoryReplayGuard(2, clock=clock)
    codec = Codec(ring, max_age=60, replay_guard=guard, clock=clock)
    first, second, third = (codec.dumps(i) for i in range(3))
    codec.loads(first)
    codec.loads(second)
    with pytest.raises(ReplayGuardFull) as info:
        codec.loads(third)
    assert isinstance(info.value, ReplayedFrame)
    assert "full" in info.value.reason
    with pytest.raises(ReplayedFrame):  # still remembered: not forgotten to make room
        codec.loads(first)
    assert codec.counters().refused["replay_guard_full"] == 1
    clock.advance(WINDOW + 1)
    fresh = codec.dumps("fresh")
    assert codec.loads(fresh) == "fresh"  # expired keys were purged


def test_concurrent_duplicates_accept_exactly_one(ring: Keyring) -> None:
    """Many threads opening one frame at once: exactly one gets it."""
    codec = Codec(ring, max_age=60, replay_guard=MemoryReplayGuard())
    for _ in range(20):
        frame = codec.dumps({"n": 1})
        results: list[str] = []
        barrier = threading.Barrier(8)

        def race(
            frame: bytes = frame,
            barrier: threading.Barrier = barrier,
            results: list[str] = results,
        ) -> None:
            barrier.wait()
            try:
                codec.loads(frame)
                results.append("ok")
            except ReplayedFrame:
                results.append("replayed")

        threads = [threading.Thread(target=race) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == ["ok"] + ["replayed"] * 7


class _Broken:
    def check_and_remember(self, key: bytes, expires_at: float, owner: str = "") -> bool:
        raise RuntimeError("store is down")

    def update(self, key: bytes, owner: str, expires_at: float, *, done: bool) -> None:
        raise RuntimeError("store is down")


def test_failing_guard_fails_closed(ring: Keyring) -> None:
    """Any error of a guard refuses the frame with ReplayGuardUnavailable."""
    codec = Codec(ring, max_age=60, replay_guard=_Broken())
    for obj in small_and_large():
        with pytest.raises(ReplayGuardUnavailable) as info:
            codec.loads(codec.dumps(obj))
        assert isinstance(info.value.__cause__, RuntimeError)
    assert codec.counters().refused["replay_guard_unavailable"] == 2
    assert codec.counters().opened == 0


def test_bytes_per_entry_is_bounded(ring: Keyring) -> None:
    """The documented figure: under 300 bytes per remembered frame (16-char key ids)."""
    guard = MemoryReplayGuard()
    codec = Codec(ring, max_age=60, replay_guard=guard)
    frames = [codec.dumps(i) for i in range(20_000)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for frame in frames:
            codec.loads(frame)
        per_entry = (tracemalloc.get_traced_memory()[0] - before) / len(frames)
    finally:
        tracemalloc.stop()
    assert per_entry < 300, per_entry


def test_memory_guard_pickles_as_a_new_empty_guard(ring: Keyring) -> None:
    """A memory guard sent to another process starts empty (one process only)."""
    guard = MemoryReplayGuard(7)
    Codec(ring, max_age=60, replay_guard=guard).loads(Codec(ring).dumps(1))
    copy = pickle.loads(pickle.dumps(guard))
    assert copy.max_entries == 7
    assert len(copy) == 0


# -- the file guard -----------------------------------------------------------


def test_file_guard_refuses_replays_and_survives_reopening(ring: Keyring, tmp_path: Path) -> None:
    """Two guards on one file (as two processes would) share what they remember."""
    path = tmp_path / "replay.db"
    a = Codec(ring, max_age=60, replay_guard=FileReplayGuard(path))
    frame = a.dumps("x")
    assert a.loads(frame) == "x"
    b = Codec(ring, max_age=60, replay_guard=pickle.loads(pickle.dumps(FileReplayGuard(path))))
    with pytest.raises(ReplayedFrame):
        b.loads(frame)
    assert b.loads(a.dumps("y")) == "y"


def test_file_guard_purges_expired(ring: Keyring, tmp_path: Path, clock: Any) -> None:
    """Expired rows are deleted at the next purge."""
    import sqlite3

    path = tmp_path / "replay.db"
    codec = Codec(
        ring, max_age=60, clock=clock,
        replay_guard=FileReplayGuard(path, purge_every=0, clock=clock),
    )
    for i in range(10):
        codec.loads(codec.dumps(i))
    clock.advance(WINDOW + 1)
    codec.loads(codec.dumps("new"))
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM seen").fetchone() == (1,)


def test_file_guard_unwritable_fails_closed(ring: Keyring, tmp_path: Path) -> None:
    """A guard file that cannot be opened raises ReplayGuardUnavailable."""
    with pytest.raises(ReplayGuardUnavailable):
        FileReplayGuard(tmp_path / "missing-dir" / "replay.db")


def _consume(codec: Codec, frames: list[bytes], out: Any) -> None:
    accepted = []
    for i, frame in enumerate(frames):
        try:
            codec.loads(frame)
            accepted.append(i)
        except ReplayedFrame:
            pass
    out.put(accepted)


def test_file_guard_across_processes(ring: Keyring, tmp_path: Path) -> None:
    """Two consumer processes given the same frames: each frame is accepted exactly once."""
    ctx = multiprocessing.get_context("spawn")
    codec = Codec(ring, max_age=60, replay_guard=FileReplayGuard(tmp_path / "replay.db"))
    frames = [codec.dumps(i) for i in range(200)]
    out = ctx.Queue()
    procs = [ctx.Process(target=_consume, args=(codec, frames, out)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert sorted(results[0] + results[1]) == list(range(200))


# -- the Redis guard ------------------------------------------------------------


@pytest.fixture
def redis_guard(redis_url: str) -> Iterator[Callable[..., RedisReplayGuard]]:
    """Makes Redis guards under a fresh prefix; deletes their keys after."""
    prefix = f"test-replay-{uuid.uuid4().hex}:"
    made: list[RedisReplayGuard] = []

    def make(**options: Any) -> RedisReplayGuard:
        made.append(RedisReplayGuard(redis_url, prefix=prefix, **options))
        return made[-1]

    yield make
    if made:
        client = made[0].client
        keys = list(client.scan_iter(prefix + "*"))
        if keys:
            client.delete(*keys)
        for guard in made:
            guard.client.close()


def test_redis_guard_shared_by_two_codecs(ring: Keyring, redis_guard: Any) -> None:
    """One consumer accepts, the other refuses; the key expires with the window."""
    a = Codec(ring, max_age=30, replay_guard=redis_guard())
    b = Codec(ring, max_age=30, replay_guard=pickle.loads(pickle.dumps(redis_guard())))
    frame = a.dumps({"job": 1})
    assert a.loads(frame) == {"job": 1}
    with pytest.raises(ReplayedFrame):
        b.loads(frame)
    guard = a.replay_guard
    assert isinstance(guard, RedisReplayGuard)
    [key] = guard.client.keys(guard.prefix + "*")
    assert 86_000 < guard.client.pttl(key) <= 91_000  # 30 s + 60 s skew + 1 s margin


def test_redis_guard_concurrent_duplicates(ring: Keyring, redis_guard: Any) -> None:
    """Threads with their own codecs racing on one frame: one wins."""
    codecs = [Codec(ring, max_age=60, replay_guard=redis_guard()) for _ in range(6)]
    frame = codecs[0].dumps("race")
    results: list[str] = []
    barrier = threading.Barrier(len(codecs))

    def race(codec: Codec) -> None:
        barrier.wait()
        try:
            codec.loads(frame)
            results.append("ok")
        except ReplayedFrame:
            results.append("replayed")

    threads = [threading.Thread(target=race, args=(c,)) for c in codecs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["ok"] + ["replayed"] * 5


def test_redis_guard_down_fails_closed(ring: Keyring) -> None:
    """A guard whose Redis is unreachable refuses with ReplayGuardUnavailable."""
    guard = RedisReplayGuard("redis://127.0.0.1:1/0", timeout=0.2)
    codec = Codec(ring, max_age=60, replay_guard=guard)
    with pytest.raises(ReplayGuardUnavailable) as info:
        codec.loads(codec.dumps("x"))
    assert "not accepted" in str(info.value)
    assert codec.counters().opened == 0


# -- RedisQueue: at-least-once redelivery and replays ------------------------------


@pytest.fixture
def rq(redis_url: str, redis_guard: Any) -> Iterator[Callable[..., Any]]:
    """Makes RedisQueues over one fresh name with a shared Redis guard."""
    from signedqueue.transports.redis import RedisQueue
    from test_redis import delete_queue

    name = f"test-{uuid.uuid4().hex}"
    ring = Keyring.generate()
    guard = redis_guard()
    made: list[RedisQueue] = []

    def make(**options: Any) -> RedisQueue:
        codec = Codec(ring, max_age=60, replay_guard=options.pop("guard", guard))
        made.append(RedisQueue(name, codec, url=redis_url, **options))
        return made[-1]

    yield make
    for q in made:
        q.close()
    delete_queue(redis_url, name)


def test_queue_replayed_frame_is_refused_and_dead_lettered(rq: Any) -> None:
    """An acknowledged frame put again is refused as a replay."""
    q = rq(consumer="c1")
    q.put({"pay": 10})
    delivery = q.get(timeout=2)
    frame = delivery.frame
    delivery.ack()
    q.put_frame(frame)  # an attacker with write access to the broker
    with pytest.raises(ReplayedFrame):
        q.get(timeout=2)
    assert [d.error for d in q.dead_letters()] == ["ReplayedFrame"]
    assert q.codec.counters().refused["replayed"] == 1


def test_queue_redelivery_after_dead_consumer_is_accepted(rq: Any) -> None:
    """A frame a consumer took and never acknowledged is delivered to another."""
    dead = rq(consumer="dead", visibility_timeout=0.5)
    dead.put("work")
    assert dead.get(timeout=2).value == "work"
    # The consumer dies: no ack, no close, no more touches.
    live = rq(consumer="live", visibility_timeout=0.5)
    time.sleep(0.7)
    delivery = live.get(timeout=3)
    assert delivery.value == "work"
    delivery.ack()
    assert live.dead_letters() == []
    # Now done: the same frame again is a replay.
    live.put_frame(delivery.frame)
    with pytest.raises(ReplayedFrame):
        live.get(timeout=2)


def test_queue_copy_of_a_frame_in_flight_is_refused(rq: Any) -> None:
    """A copy of a frame that a live consumer is processing is a replay."""
    a = rq(consumer="a", visibility_timeout=5)
    b = rq(consumer="b", visibility_timeout=5)
    a.put("job")
    delivery = a.get(timeout=2)
    b.put_frame(delivery.frame)
    with pytest.raises(ReplayedFrame):
        b.get(timeout=2)
    delivery.ack()


def test_queue_copy_taken_by_the_same_consumer_is_refused(rq: Any) -> None:
    """A copy of its own in-flight frame is a replay for the consumer too."""
    a = rq(consumer="a")
    a.put("job")
    delivery = a.get(timeout=2)
    a.put_frame(delivery.frame)
    with pytest.raises(ReplayedFrame):
        a.get(timeout=2)
    delivery.ack()  # the original is still acknowledged
    assert [d.error for d in a.dead_letters()] == ["ReplayedFrame"]
    assert a.qsize() == 0


def test_queue_nack_and_close_give_frames_back_acceptably(rq: Any) -> None:
    """nack(requeue) and close() forget the hold, so the frame is delivered again."""
    a = rq(consumer="a")
    a.put("job")
    first = a.get(timeout=2)
    first.nack()
    again = a.get(timeout=2)
    assert again.value == "job"
    a.close()  # puts it back
    b = rq(consumer="b")
    last = b.get(timeout=2)
    assert last.value == "job"
    last.ack()


def test_queue_guard_down_leaves_the_frame_for_later(rq: Any, redis_guard: Any) -> None:
    """A guard failure at get raises and keeps the frame; nothing is dead-lettered."""
    broken = RedisReplayGuard("redis://127.0.0.1:1/0", timeout=0.2)
    q = rq(consumer="c", guard=broken)
    q.put("kept")
    with pytest.raises(ReplayGuardUnavailable):
        q.get(timeout=2)
    assert q.dead_letters() == []
    # The guard comes back: the same frame is delivered.
    q._core.guard = good = redis_guard()
    q._core.codec._guard = good
    assert q.get(timeout=2).value == "kept"


def test_queue_heartbeat_renews_the_hold(rq: Any) -> None:
    """With heartbeat on, a frame processed longer than the visibility
    timeout stays held: a copy is still refused."""
    a = rq(consumer="a", visibility_timeout=0.4, heartbeat=True)
    b = rq(consumer="b", visibility_timeout=0.4)
    a.put("slow")
    delivery = a.get(timeout=2)
    time.sleep(1.0)  # 2.5 visibility timeouts, kept alive by the heartbeat
    b.put_frame(delivery.frame)
    with pytest.raises(ReplayedFrame):
        b.get(timeout=2)
    delivery.ack()


def test_async_queue_replays_and_redelivery(redis_url: str, redis_guard: Any) -> None:
    """AsyncRedisQueue: a replay is refused; a dead consumer's frame is redelivered."""
    import asyncio

    from signedqueue.transports.redis import AsyncRedisQueue
    from test_redis import delete_queue

    name = f"test-{uuid.uuid4().hex}"
    codec = Codec(Keyring.generate(), max_age=60, replay_guard=redis_guard())

    async def main() -> None:
        dead = AsyncRedisQueue(name, codec, url=redis_url, consumer="dead", visibility_timeout=0.4)
        live = AsyncRedisQueue(name, codec, url=redis_url, consumer="live", visibility_timeout=0.4)
        try:
            await dead.put("work")
            assert (await dead.get(timeout=2)).value == "work"
            await asyncio.sleep(0.6)
            delivery = await live.get(timeout=3)
            assert delivery.value == "work"
            await delivery.ack()
            await live.put_frame(delivery.frame)
            with pytest.raises(ReplayedFrame):
                await live.get(timeout=2)
            assert live.codec.counters().refused["replayed"] == 1
        finally:
            await live.close()
            await dead.close()

    try:
        asyncio.run(main())
    finally:
        delete_queue(redis_url, name)


def _signed_queue_consumer(q: Any, out: Any) -> None:
    results = []
    for _ in range(2):
        try:
            results.append(q.get(timeout=10))
        except ReplayedFrame:
            results.append("replayed")
    out.put(results)


def test_signed_queue_consumer_process_shares_the_file_guard(
    ring: Keyring, tmp_path: Path
) -> None:
    """A SignedQueue consumer process refuses a frame put twice, and so does
    this process afterwards (one guard file)."""
    from signedqueue import SignedQueue

    ctx = multiprocessing.get_context("spawn")
    guard = FileReplayGuard(tmp_path / "replay.db")
    q = SignedQueue(ring, ctx=ctx, max_age=60, replay_guard=guard)
    frame = q.codec.dumps({"once": True})
    q.put_frame(frame)
    q.put_frame(frame)
    out = ctx.Queue()
    p = ctx.Process(target=_signed_queue_consumer, args=(q, out))
    p.start()
    assert out.get(timeout=60) == [{"once": True}, "replayed"]
    p.join(30)
    with pytest.raises(ReplayedFrame):
        q.codec.loads(frame)


# -- the protocol, the same for every guard ---------------------------------------


@pytest.fixture(params=["memory", "file", "redis"])
def any_guard(request: pytest.FixtureRequest, tmp_path: Path, clock: Any) -> Any:
    """Each guard in turn, on the frozen clock."""
    if request.param == "memory":
        return MemoryReplayGuard(clock=clock)
    if request.param == "file":
        return FileReplayGuard(tmp_path / "g.db", clock=clock)
    make = request.getfixturevalue("redis_guard")
    return make(clock=clock)


def test_guard_protocol_semantics(any_guard: Any, clock: Any) -> None:
    """Plain keys, holds by owner, done, forget and a lapsed lease."""
    now = clock()
    g = any_guard
    assert g.check_and_remember(b"k1", now + 60) is True
    assert g.check_and_remember(b"k1", now + 60) is False
    assert g.check_and_remember(b"k1", now + 60, "a") is False  # done: for everyone
    # Held by a: a may claim it again, b may not.
    assert g.check_and_remember(b"k2", now + 10, "a") is True
    assert g.check_and_remember(b"k2", now + 10, "a") is True
    assert g.check_and_remember(b"k2", now + 10, "b") is False
    assert g.check_and_remember(b"k2", now + 10) is False
    g.update(b"k2", "b", now + 60, done=True)  # not b's: nothing
    assert g.check_and_remember(b"k2", now + 10, "a") is True
    g.update(b"k2", "a", now + 60, done=True)  # acked
    assert g.check_and_remember(b"k2", now + 10, "a") is False
    # Forgotten (nack): anyone may take it.
    assert g.check_and_remember(b"k3", now + 10, "a") is True
    g.update(b"k3", "a", now - 1, done=False)
    assert g.check_and_remember(b"k3", now + 10, "b") is True
    # A lapsed lease is not renewed, but ack still marks it done.
    assert g.check_and_remember(b"k4", now + 10, "a") is True
    if isinstance(g, RedisReplayGuard):
        g.client.delete(g.prefix + b"k4".hex())  # Redis expires by its own clock
    else:
        clock.advance(11)
    g.update(b"k4", "a", clock() + 60, done=False)
    g.update(b"k4", "a", clock() + 60, done=True)
    assert g.check_and_remember(b"k4", clock() + 10, "b") is False


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_replay_at_the_last_accepted_instant_is_refused(
    ring: Keyring, tmp_path: Path, clock: Any, kind: str
) -> None:
    """
    With clock_skew=0 a frame is still accepted when its age equals max_age;
    the guard must still remember it then, so its replay is refused.
    """
    guard: Any = (MemoryReplayGuard(clock=clock) if kind == "memory"
                  else FileReplayGuard(tmp_path / "guard.db", clock=clock))
    codec = Codec(ring, max_age=10, clock_skew=0, clock=clock, replay_guard=guard)
    frame = codec.dumps("x")
    clock.advance(10)  # age == max_age: the last instant it is accepted
    assert codec.loads(frame) == "x"
    with pytest.raises(ReplayedFrame):
        codec.loads(frame)
    clock.advance(0.001)
    with pytest.raises(ExpiredFrame):
        codec.loads(frame)
