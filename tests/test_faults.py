"""
Fault injection: what a ``SignedQueue`` survives, and what it does not.

* Corrupted frames in the pipe (garbage, truncated, every single-bit flip of
  a real frame) are refused with a ``RejectedFrame`` carrying the frame, and
  the next item still arrives: nothing corrupted is ever loaded.
* A consumer whose handler raises leaves ``task_done()`` accounting and the
  other consumers intact.
* Producers and consumers SIGKILLed while streaming: the survivors keep
  working, nothing arrives twice or corrupted, and every frame either arrives
  once or is accounted for as lost with the process that was killed.
* A consumer killed while it waits in ``get()`` leaves no lock behind
  (``multiprocessing.Queue`` is wedged by the same kill).
* A process killed *inside* the queue's critical section (a producer
  half-way through writing a record, a consumer half-way through reading
  one) leaves the queue's lock held and the stream cut: the queue cannot go
  on, and says so (``OSError(EOWNERDEAD)`` from ``get()``, an error logged by
  the other producers' feeder threads) instead of hanging.  Nothing is
  loaded from the cut record.

See docs/explanation/reliability.md for the guarantees these tests show.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import queue
import random
import signal
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from processes import WAIT, Background, join_all, start_all
from signedqueue import (
    Keyring,
    RejectedFrame,
    SignedJoinableQueue,
    SignedQueue,
)
from signedqueue._pipe import RECORD_HEADER, write_all, write_record


def _fork() -> multiprocessing.context.BaseContext:
    return multiprocessing.get_context("fork")


def _payload(producer: int, seq: int) -> dict[str, Any]:
    """An item whose content is checkable from its own producer and number."""
    size = (seq * 7919) % 200
    data = bytes((producer + seq + i) % 256 for i in range(size))
    return {"p": producer, "s": seq, "data": data, "crc": zlib.crc32(data)}


def _intact(item: Any) -> bool:
    return (
        isinstance(item, dict)
        and item == _payload(item.get("p", -1), item.get("s", -1))
    )


# -- corrupted frames in the pipe ----------------------------------------------


def _queue_with_bad_records(records: list[bytes]) -> SignedQueue:
    q = SignedQueue(Keyring.generate(), shm_threshold=None)
    for record in records:
        write_record(q._writer.fileno(), record)
    return q


def test_every_single_bit_flip_of_a_frame_is_refused_and_the_next_item_arrives() -> None:
    q = SignedQueue(Keyring.generate(), shm_threshold=None)
    frame = q.codec.dumps(_payload(1, 2))
    flipped = []
    for bit in range(len(frame) * 8):
        bad = bytearray(frame)
        bad[bit // 8] ^= 1 << (bit % 8)
        flipped.append(bytes(bad))
    writer = Background(lambda: [write_record(q._writer.fileno(), f) for f in flipped])
    for bad in flipped:
        with pytest.raises(RejectedFrame) as info:
            q.get(timeout=WAIT)
        assert info.value.frame == bad
    writer.result()
    q.put(_payload(3, 4))
    assert q.get(timeout=WAIT) == _payload(3, 4)
    q.close()
    q.join_thread()


@pytest.mark.parametrize(
    "record",
    [
        b"",
        b"\x00",
        b"SQ",
        os.urandom(7),
        os.urandom(64),
        os.urandom(5000),
        os.urandom(200_000),
        b"\x80\x05" + os.urandom(100),  # a bare pickle, unsigned
    ],
    ids=["empty", "one-byte", "magic-only", "7", "64", "5000", "200k", "bare-pickle"],
)
def test_garbage_records_are_refused_and_the_next_item_arrives(record: bytes) -> None:
    q = _queue_with_bad_records([record])
    q.put("next")
    with pytest.raises(RejectedFrame):
        q.get(timeout=WAIT)
    assert q.get(timeout=WAIT) == "next"
    q.close()
    q.join_thread()


def test_truncated_and_extended_frames_are_refused_and_the_next_item_arrives() -> None:
    codec_q = SignedQueue(Keyring.generate(), shm_threshold=None)
    frame = codec_q.codec.dumps(_payload(5, 6))
    cuts = [1, 8, len(frame) // 2, len(frame) - 1]
    bad = [frame[:cut] for cut in cuts] + [frame + b"\x00", frame + frame]
    writer = Background(lambda: [write_record(codec_q._writer.fileno(), b) for b in bad])
    for sent in bad:
        with pytest.raises(RejectedFrame) as info:
            codec_q.get(timeout=WAIT)
        assert info.value.frame == sent
    writer.result()
    codec_q.put("next")
    assert codec_q.get(timeout=WAIT) == "next"
    codec_q.close()
    codec_q.join_thread()


def test_a_record_cut_short_when_the_writers_close_raises_eoferror() -> None:
    """Half a record and no writer left: EOFError, not a hang, nothing loaded."""
    q = SignedQueue(Keyring.generate(), shm_threshold=None)
    frame = q.codec.dumps("never loaded")
    write_all(q._writer.fileno(), RECORD_HEADER.pack(len(frame)) + frame[: len(frame) // 2])
    q._writer.close()  # the last writer: the other half can never come
    with pytest.raises(EOFError, match="middle of a record"):
        q.get(timeout=WAIT)


# -- a consumer that raises in the middle of handling ---------------------------


def _consume_and_sometimes_fail(q: SignedJoinableQueue, log: str) -> None:
    with open(log, "a") as out:
        while True:
            item = q.get(timeout=WAIT)
            if item is None:
                q.task_done()
                return
            try:
                if item["s"] % 7 == 0:
                    raise ValueError(f"handler failed on {item['s']}")
                out.write(f"ok {item['s']}\n")
            except ValueError:
                out.write(f"failed {item['s']}\n")
            finally:
                out.flush()
                q.task_done()


def test_a_handler_that_raises_leaves_task_accounting_intact(tmp_path: Path) -> None:
    ctx = _fork()
    q = SignedJoinableQueue(Keyring.generate(), ctx=ctx)
    logs = [str(tmp_path / f"c{i}.log") for i in range(3)]
    consumers = [ctx.Process(target=_consume_and_sometimes_fail, args=(q, log)) for log in logs]
    start_all(consumers)
    count = 300
    for seq in range(count):
        q.put(_payload(0, seq))
    q.join()  # every item, failed or not, was marked done once
    for _ in consumers:
        q.put(None)
    join_all(consumers)
    q.join()
    seen = Counter()
    failed = set()
    for log in logs:
        for line in Path(log).read_text().splitlines():
            status, seq = line.split()
            seen[int(seq)] += 1
            if status == "failed":
                failed.add(int(seq))
    assert seen == Counter(range(count))
    assert failed == {s for s in range(count) if s % 7 == 0}
    with pytest.raises(ValueError, match="too many times"):
        q.task_done()


def _consume_and_die_on(q: SignedJoinableQueue, log: str, fatal: int) -> None:
    with open(log, "a") as out:
        while True:
            item = q.get(timeout=WAIT)
            if item is None:
                q.task_done()
                return
            if item["s"] == fatal:
                raise RuntimeError("the handler blew up; the process exits uncaught")
            out.write(f"{item['s']}\n")
            out.flush()
            q.task_done()


def test_a_consumer_that_dies_of_its_exception_loses_only_its_item(tmp_path: Path) -> None:
    ctx = _fork()
    q = SignedJoinableQueue(Keyring.generate(), ctx=ctx)
    count, fatal = 200, 57
    logs = [str(tmp_path / f"c{i}.log") for i in range(3)]
    consumers = [
        ctx.Process(target=_consume_and_die_on, args=(q, log, fatal)) for log in logs
    ]
    start_all(consumers)
    for seq in range(count):
        q.put(_payload(0, seq))
    deadline = time.monotonic() + WAIT
    while all(c.is_alive() for c in consumers) and time.monotonic() < deadline:
        time.sleep(0.01)
    dead = [c for c in consumers if not c.is_alive()]
    assert len(dead) == 1
    dead[0].join()
    assert dead[0].exitcode == 1
    # The survivors take everything else; join() waits only for the lost item.
    joiner = Background(q.join)
    time.sleep(1.0)
    assert joiner.running
    survivors = [c for c in consumers if c is not dead[0]]
    for _ in survivors:
        q.put(None)
    join_all(survivors)
    seen = Counter(int(x) for log in logs for x in Path(log).read_text().split())
    assert seen == Counter(s for s in range(count) if s != fatal)
    assert joiner.running
    q.task_done()  # the owner accounts for the item lost with the dead consumer
    joiner.result()


# -- SIGKILL ------------------------------------------------------------------


def _idle_consumer(q: Any, timeout: float | None) -> None:
    q.get(timeout=timeout)


@pytest.mark.parametrize("timeout", [None, 3600.0], ids=["get()", "get(timeout)"])
def test_a_consumer_killed_while_waiting_leaves_no_lock_behind(timeout: float | None) -> None:
    ctx = _fork()
    q = SignedQueue(Keyring.generate(), ctx=ctx)
    victim = ctx.Process(target=_idle_consumer, args=(q, timeout))
    start_all([victim])
    time.sleep(0.5)  # it is blocked in get() on an empty queue
    os.kill(victim.pid, signal.SIGKILL)  # type: ignore[arg-type]
    victim.join()
    q.put("after")
    assert q.get(timeout=WAIT) == "after"
    q.close()
    q.join_thread()


def test_multiprocessing_queue_is_wedged_by_the_same_kill() -> None:
    """For contrast: the dead consumer holds multiprocessing.Queue's read lock."""
    ctx = _fork()
    q: Any = ctx.Queue()
    victim = ctx.Process(target=_idle_consumer, args=(q, None))
    start_all([victim])
    time.sleep(0.5)
    os.kill(victim.pid, signal.SIGKILL)  # type: ignore[arg-type]
    victim.join()
    q.put("after")
    with pytest.raises(queue.Empty):
        q.get(timeout=2.0)
    q.cancel_join_thread()
    q.close()


def _logged_producer(q: SignedQueue, producer: int, count: int, log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    for seq in range(count):
        q.put(_payload(producer, seq))
        os.write(fd, b"%d\n" % seq)  # after put() returned
        if seq % 20 == 0:
            time.sleep(0.005)  # stream for 2.5 s at least: the kills land mid-stream


def _logged_consumer(q: SignedQueue, log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    while True:
        item = q.get(timeout=WAIT)
        if item is None:
            return
        ok = b"ok" if _intact(item) else b"BAD"
        os.write(fd, b"%s %d %d\n" % (ok, item["p"], item["s"]))


def _kill_outside_the_locks(q: SignedQueue, proc: Any) -> None:
    # Holding both locks, the victim cannot be half-way through a record:
    # the kill lands anywhere else (in put(), pickling, the feeder's buffer,
    # waiting for a lock or for data, handling an item).
    with q._wlock, q._rlock:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(WAIT)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_processes_killed_while_streaming(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    ctx = _fork()
    q = SignedQueue(Keyring.generate(), ctx=ctx)
    count = 10_000
    plogs = [str(tmp_path / f"p{i}.log") for i in range(4)]
    clogs = [str(tmp_path / f"c{i}.log") for i in range(3)]
    producers = [
        ctx.Process(target=_logged_producer, args=(q, i, count, log))
        for i, log in enumerate(plogs)
    ]
    consumers = [ctx.Process(target=_logged_consumer, args=(q, log)) for log in clogs]
    start_all(consumers + producers)
    killed_p = rng.sample(range(len(producers)), 2)
    killed_c = rng.sample(range(len(consumers)), 1)
    for victim in [*(producers[i] for i in killed_p), *(consumers[i] for i in killed_c)]:
        time.sleep(rng.uniform(0.05, 0.6))
        _kill_outside_the_locks(q, victim)
    join_all([p for i, p in enumerate(producers) if i not in killed_p])
    survivors = [c for i, c in enumerate(consumers) if i not in killed_c]
    for _ in survivors:
        q.put(None)
    join_all(survivors)
    q.close()
    q.join_thread()
    assert [producers[i].exitcode for i in killed_p] == [-signal.SIGKILL] * 2

    arrived: Counter[tuple[int, int]] = Counter()
    for log in clogs:
        for line in Path(log).read_text().splitlines():
            status, p, s = line.split()
            assert status == "ok", "a corrupted item was loaded"
            arrived[int(p), int(s)] += 1
    assert max(arrived.values()) == 1, "an item arrived twice"
    # A consumer killed between get() returning and its log write loses
    # that one item: at most one per killed consumer.
    allowance = len(killed_c)
    holes = 0
    for i, log in enumerate(plogs):
        put = [int(x) for x in Path(log).read_text().split()]
        assert put == list(range(len(put)))
        got = sorted(s for (p, s) in arrived if p == i)
        if i in killed_p:
            # Frames still in the killed producer's feeder buffer are lost
            # with it; what arrived is the start of what it put (FIFO), give
            # or take the one put() that returned just before the kill.
            assert not got or got[-1] <= len(put)
            holes += (got[-1] + 1 - len(got)) if got else 0
        else:
            assert len(put) == count
            holes += count - len(got)
    assert holes <= allowance
    assert not any(c.is_alive() for c in consumers + producers)


def _big_producer(q: SignedQueue, size: int) -> None:
    q.put(b"x" * size)
    time.sleep(WAIT)


def _kill_mid_record(q: SignedQueue) -> multiprocessing.process.BaseProcess:
    """Start a producer and SIGKILL it half-way through writing a large record."""
    ctx = _fork()
    victim = ctx.Process(target=_big_producer, args=(q, 8 << 20))
    start_all([victim])
    deadline = time.monotonic() + WAIT
    # The record is 8 MiB, the pipe holds 1 MiB: once the pipe has data and
    # the write lock is taken, the feeder is blocked in the middle of it.
    while time.monotonic() < deadline and not q._reader.poll(0):
        time.sleep(0.01)
    time.sleep(0.2)
    assert not q._wlock.acquire(False)
    os.kill(victim.pid, signal.SIGKILL)  # type: ignore[arg-type]
    victim.join()
    return victim


def test_a_producer_killed_mid_record_makes_get_raise_eownerdead() -> None:
    """The cut record is never loaded; the consumer says why it cannot go on."""
    q = SignedQueue(Keyring.generate(), ctx=_fork(), shm_threshold=None)
    victim = _kill_mid_record(q)
    with pytest.raises(OSError) as info:
        q.get(timeout=WAIT)  # reads the start of the record, waits for the rest
    assert info.value.errno == errno.EOWNERDEAD
    assert f"process {victim.pid} was killed while holding the queue's write lock" in str(
        info.value
    )
    # From then on, every get() says so too (within about a second): no
    # producer can ever write to this queue again.
    for call in (lambda: q.get(timeout=WAIT), q.get):
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == errno.EOWNERDEAD


def test_other_producers_report_the_dead_writer(caplog: pytest.LogCaptureFixture) -> None:
    q = SignedQueue(Keyring.generate(), ctx=_fork(), shm_threshold=None)
    _kill_mid_record(q)
    q.put("lost")  # accepted; the feeder thread cannot write it
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline and "could not write" not in caplog.text:
        time.sleep(0.05)
    assert "was killed while holding the queue's write lock" in caplog.text
    assert "could not write 1 frame" in caplog.text
    q.cancel_join_thread()
    q.close()


def _slow_consumer_victim(q: SignedQueue) -> None:
    q.get()


def test_a_consumer_killed_mid_record_makes_get_raise_eownerdead() -> None:
    ctx = _fork()
    q = SignedQueue(Keyring.generate(), ctx=ctx, shm_threshold=None)
    consumer = ctx.Process(target=_slow_consumer_victim, args=(q,))
    producer = ctx.Process(target=_big_producer, args=(q, 64 << 20))
    start_all([consumer, producer])
    try:
        deadline = time.monotonic() + WAIT
        # The consumer holds the read lock while it reads the 64 MiB record.
        while time.monotonic() < deadline and q._rlock._owner.value != consumer.pid:
            time.sleep(0.001)
        os.kill(consumer.pid, signal.SIGKILL)  # type: ignore[arg-type]
        consumer.join()
        for timeout in (WAIT, None):
            with pytest.raises(OSError) as info:
                q.get(timeout=timeout)
            assert info.value.errno == errno.EOWNERDEAD
            assert "holding the queue's read lock" in str(info.value)
    finally:
        producer.kill()
        producer.join()


def test_a_dead_pid_left_on_a_free_lock_is_not_reported() -> None:
    """
    A holder that released the lock and exited between the waiter's two
    looks (pid read, liveness check) is not a dead holder: no EOWNERDEAD
    while the lock is free; EOWNERDEAD once it is really held by the dead.
    """
    from signedqueue._queue import _OwnedLock

    ctx = multiprocessing.get_context("fork")
    lock = _OwnedLock(ctx, "read")
    child = ctx.Process(target=os._exit, args=(0,))
    child.start()
    child.join()
    assert child.pid is not None
    lock._owner.value = child.pid  # as if it exited right after releasing
    lock.check()  # the lock is free: nothing to report
    assert lock.acquire(timeout=1)
    lock.release()
    lock._lock.acquire()  # now really held, by a holder recorded as dead
    lock._owner.value = child.pid
    with pytest.raises(OSError) as info:
        lock.check()
    assert info.value.errno == errno.EOWNERDEAD
    lock._lock.release()


def test_a_live_process_hidden_from_proc_is_alive(monkeypatch: pytest.MonkeyPatch) -> None:
    """With /proc entries hidden (hidepid), liveness falls back to the kernel."""
    import builtins

    from signedqueue import _queue

    real_open = builtins.open

    def hiding(path: Any, *args: Any, **kwargs: Any) -> Any:
        if str(path).startswith("/proc/"):
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", hiding)
    assert _queue._alive(os.getpid())
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=os._exit, args=(0,))
    child.start()
    child.join()
    assert child.pid is not None
    assert not _queue._alive(child.pid)
