"""
The queue contract, run against every kind of signed queue.

``QueueContract`` states what a signed queue must do.  One subclass per kind
runs it: ``SignedQueue``, ``SignedJoinableQueue``, ``wrap(queue.Queue())`` and
``wrap()`` of a manager's queue proxy.  A test that does not apply to a kind
(no child processes for an in-process ``queue.Queue``, no ``task_done()`` on a
``SignedQueue``) is set to ``None`` in that subclass, so pytest does not
collect it.

The attack tests at the end write malicious bytes straight into a queue's
pipe, and into a plain ``multiprocessing.Queue``'s pipe for contrast.
"""

from __future__ import annotations

import datetime
import decimal
import logging
import multiprocessing
import os
import pickle
import queue
import shlex
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from processes import Background, join_all, start_all
from signedqueue import (
    Codec,
    ForbiddenClass,
    FrameTooLarge,
    InvalidSignature,
    Keyring,
    MalformedFrame,
    RejectedFrame,
    SignedJoinableQueue,
    SignedQueue,
    UnknownKey,
    UnprotectedTransportWarning,
    wrap,
)
from signedqueue._pipe import write_record

#: Seconds any get(), join() or child process may take: generous, because
#: the machine is noisy.  Tests never assert on elapsed time.
WAIT = 60.0
#: Timeout of calls that are expected to time out; its value never matters.
SHORT = 0.05
#: Items each producer process puts.
COUNT = 150


# -- helpers ---------------------------------------------------------------


class Unlisted:
    """A class in no allowlist: frames carrying it are refused by default."""

    def __init__(self, value: object = None) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return type(other) is Unlisted and other.value == self.value

    __hash__ = None  # type: ignore[assignment]


class RefusesPickling:
    """Pickling it raises its own error, which put() must pass on unchanged."""

    class Error(Exception):
        """Raised by __reduce__."""

    def __reduce__(self) -> Any:
        raise RefusesPickling.Error("refuses to be pickled")


class Exploit:
    """Unpickles to os.system(...), which writes the canary file."""

    def __init__(self, canary: Path) -> None:
        self.command = f"echo pwned > {shlex.quote(str(canary))}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.command,))


def exploit_pickle(canary: Path) -> bytes:
    """A plain pickle that runs a shell command creating *canary* when loaded."""
    return pickle.dumps(Exploit(canary), protocol=pickle.DEFAULT_PROTOCOL)


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    """Poll *predicate* until it holds; fail after WAIT seconds."""
    deadline = time.monotonic() + WAIT
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting until {what}")
        time.sleep(0.01)


BAD_FRAMES = [
    "foreign_key",
    "same_id_other_secret",
    "tampered_payload",
    "tampered_tag",
    "truncated",
    "forbidden_class",
    "other_serializer",
    "garbage",
    "empty",
]


def bad_frame(kind: str, ring: Keyring) -> tuple[bytes, type[RejectedFrame]]:
    """A frame of the given kind that a queue over *ring* must refuse, and how."""
    good = Codec(ring).dumps({"n": 1})
    if kind == "foreign_key":
        return Codec(Keyring.generate()).dumps({"n": 1}), UnknownKey
    if kind == "same_id_other_secret":
        return Codec(Keyring.generate(ring.active_id)).dumps({"n": 1}), InvalidSignature
    if kind == "tampered_payload":
        flipped = bytearray(good)
        flipped[-33] ^= 0x01  # the last payload byte, just before the tag
        return bytes(flipped), InvalidSignature
    if kind == "tampered_tag":
        flipped = bytearray(good)
        flipped[-1] ^= 0x80
        return bytes(flipped), InvalidSignature
    if kind == "truncated":
        return good[:-1], MalformedFrame
    if kind == "forbidden_class":
        return Codec(ring).dumps(Unlisted(1)), ForbiddenClass
    if kind == "other_serializer":
        return Codec(ring, serializer="msgpack").dumps({"n": 1}), MalformedFrame
    if kind == "garbage":
        return bytes(range(256)), MalformedFrame
    if kind == "empty":
        return b"", MalformedFrame
    raise AssertionError(kind)


# -- child process bodies (module level, so that spawn can import them) -----


def _produce(q: Any, producer: int, count: int, flush: bool) -> None:
    """Put *count* items tagged (producer, seq); then close and flush."""
    for seq in range(count):
        q.put((producer, seq, f"item {seq} of producer {producer}"))
    if flush:
        q.close()
        q.join_thread()


def _consume(q: Any, results: Any, joinable: bool) -> None:
    """Get items until a None arrives; report them in the order received."""
    received = []
    while True:
        item = q.get(timeout=WAIT)
        if joinable:
            q.task_done()
        if item is None:
            break
        received.append(item)
    results.put(received)


def _consume_reporting_refusals(q: Any, results: Any, count: int) -> None:
    """Get *count* times; report each item or the refusal's class and frame size."""
    outcome: list[tuple[str, object]] = []
    for _ in range(count):
        try:
            outcome.append(("item", q.get(timeout=WAIT)))
        except RejectedFrame as exc:
            outcome.append((type(exc).__name__, len(exc.frame)))
    results.put(outcome)


def _overfill_then_cancel(q: Any) -> None:
    """Put more than the pipe holds, with nobody reading, and cancel the join."""
    for _ in range(8):
        q.put(b"x" * (1 << 20))
    q.cancel_join_thread()


# -- the contract ------------------------------------------------------------


@pytest.fixture(scope="module")
def manager() -> Iterator[Any]:
    """A manager process (started by spawn: no fork of a threaded parent)."""
    with multiprocessing.get_context("spawn").Manager() as mgr:
        yield mgr


class QueueContract:
    """What every kind of signed queue does.  Subclasses provide ``new()``."""

    #: The queue can be passed to child processes.
    cross_process = True
    #: close(), join_thread() and cancel_join_thread() exist.
    has_close = False
    #: task_done() and join() exist.
    joinable = False
    #: get_frame() exists.
    has_get_frame = False

    @pytest.fixture(autouse=True)
    def _queues(self, ring: Keyring) -> Iterator[None]:
        self.ring = ring
        self._made: list[Any] = []
        yield
        for q in self._made:
            self.dispose(q)

    def make(self, *, maxsize: int = 0, ctx: Any = None, **options: Any) -> Any:
        """A new queue of this kind over ``self.ring``, disposed after the test."""
        q = self.new(self.ring, maxsize=maxsize, ctx=ctx, **options)
        self._made.append(q)
        return q

    def new(self, ring: Keyring, *, maxsize: int, ctx: Any, **options: Any) -> Any:
        raise NotImplementedError

    def dispose(self, q: Any) -> None:
        """Release what the queue holds."""

    def done(self, q: Any, count: int) -> None:
        """Call task_done() *count* times, then check that join() returns."""
        for _ in range(count):
            q.task_done()
        Background(q.join).result()

    # -- put and get ---------------------------------------------------------

    def test_items_round_trip_in_order(self) -> None:
        """Items come out equal to what went in, of the same types, first in first out."""
        q = self.make()
        items: list[Any] = [
            0, -1, 2**70, 1.5, complex(1, -2), "text", b"bytes", bytearray(b"array"),
            None, True, (1, "a"), [1, [2, [3]]], {"k": {1, 2}}, frozenset({3}),
            datetime.datetime(2024, 2, 29, 12, 0, tzinfo=datetime.timezone.utc),
            decimal.Decimal("1.10"), uuid.UUID(int=7), "\u00e9\u4e2d\U0001f600",
        ]
        for item in items:
            q.put(item)
        received = [q.get(timeout=WAIT) for _ in items]
        assert received == items
        assert [type(r) for r in received] == [type(i) for i in items]

    def test_get_on_an_empty_queue_raises_empty(self) -> None:
        """get() with a timeout, get(block=False) and get_nowait() raise queue.Empty."""
        q = self.make()
        with pytest.raises(queue.Empty):
            q.get(timeout=SHORT)
        with pytest.raises(queue.Empty):
            q.get(True, SHORT)
        with pytest.raises(queue.Empty):
            q.get(block=False)
        with pytest.raises(queue.Empty):
            q.get_nowait()
        q.put("still works")
        assert q.get(timeout=WAIT) == "still works"

    def test_put_on_a_full_queue_raises_full(self) -> None:
        """At maxsize, put() with a timeout, put(block=False) and put_nowait() raise Full."""
        q = self.make(maxsize=2)
        q.put(1)
        q.put_nowait(2)
        with pytest.raises(queue.Full):
            q.put(3, timeout=SHORT)
        with pytest.raises(queue.Full):
            q.put(3, block=False)
        with pytest.raises(queue.Full):
            q.put_nowait(3)
        assert q.get(timeout=WAIT) == 1
        q.put_nowait(3)
        assert [q.get(timeout=WAIT), q.get(timeout=WAIT)] == [2, 3]
        with pytest.raises(queue.Empty):
            q.get(timeout=SHORT)

    def test_blocking_put_waits_for_a_free_slot(self) -> None:
        """A blocking put() on a full queue returns once a get() frees a slot."""
        q = self.make(maxsize=1)
        q.put("first")
        second = Background(q.put, "second")
        assert q.get(timeout=WAIT) == "first"
        second.result()
        assert q.get(timeout=WAIT) == "second"

    def test_blocking_get_waits_for_an_item(self) -> None:
        """A get() without timeout returns the item another thread puts later."""
        q = self.make()
        getter = Background(q.get)
        q.put("late")
        assert getter.result() == "late"

    def test_qsize_empty_full(self) -> None:
        """qsize(), empty() and full() follow puts and gets."""
        q = self.make(maxsize=1)
        assert (q.qsize(), q.empty(), q.full()) == (0, True, False)
        q.put("x")
        assert (q.qsize(), q.full()) == (1, True)
        wait_until(lambda: not q.empty(), "the item is in the queue")
        assert q.get(timeout=WAIT) == "x"
        assert (q.qsize(), q.empty(), q.full()) == (0, True, False)

    def test_get_nowait_returns_an_item_that_arrived(self) -> None:
        """get_nowait() returns an item once the queue is no longer empty."""
        q = self.make()
        q.put({"x": 1})
        wait_until(lambda: not q.empty(), "the item is in the queue")
        assert q.get_nowait() == {"x": 1}

    # -- serialization errors --------------------------------------------------

    @pytest.mark.parametrize(
        ("serializer", "make_item", "error"),
        [
            # AttributeError up to Python 3.13, PicklingError from 3.14 on
            ("pickle", lambda: (lambda: None), (pickle.PicklingError, AttributeError)),
            ("pickle", RefusesPickling, RefusesPickling.Error),
            ("msgpack", object, TypeError),
            ("msgpack", lambda: Unlisted(1), TypeError),
        ],
        ids=["pickle-lambda", "pickle-reduce-error", "msgpack-object", "msgpack-class"],
    )
    def test_serialization_error_raises_in_put(
        self,
        serializer: str,
        make_item: Callable[[], Any],
        error: type[Exception] | tuple[type[Exception], ...],
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """An unserializable item raises in put(), takes no slot; the queue keeps working."""
        q = self.make(maxsize=1, serializer=serializer)
        with pytest.raises(error):
            q.put(make_item())
        q.put_nowait("good")  # the failed put holds no slot
        assert q.get(timeout=WAIT) == "good"
        with pytest.raises(queue.Empty):
            q.get(timeout=SHORT)  # nothing of the failed put was queued
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]

    def test_producer_refuses_a_frame_over_max_frame_size(self) -> None:
        """put() of a frame over max_frame_size raises ValueError and queues nothing."""
        q = self.make(max_frame_size=4096)
        with pytest.raises(ValueError, match="max_frame_size"):
            q.put(b"x" * 10_000)
        q.put("small")
        assert q.get(timeout=WAIT) == "small"
        with pytest.raises(queue.Empty):
            q.get(timeout=SHORT)

    # -- refused frames --------------------------------------------------------

    @pytest.mark.parametrize("kind", BAD_FRAMES)
    def test_refused_frame_raises_at_get_and_nothing_is_lost(self, kind: str) -> None:
        """A refused frame raises its RejectedFrame with the frame; the items around it arrive."""
        q = self.make()
        frame, expected = bad_frame(kind, self.ring)
        q.put("before")
        q.put_frame(frame)
        q.put("after")
        assert q.get(timeout=WAIT) == "before"
        with pytest.raises(RejectedFrame) as info:
            q.get(timeout=WAIT)
        assert type(info.value) is expected
        assert info.value.frame == frame
        assert q.get(timeout=WAIT) == "after"
        with pytest.raises(queue.Empty):
            q.get(timeout=SHORT)
        if self.joinable:
            self.done(q, 2)

    @pytest.mark.parametrize("kind", ["tampered_tag", "foreign_key", "forbidden_class"])
    def test_refusal_is_logged_without_payload_bytes(
        self, kind: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A refusal is logged with key id, reason and size, and never with payload bytes."""
        q = self.make()
        marker = "PAYLOAD-MARKER-7f3a9c"
        other = Keyring.generate() if kind == "foreign_key" else self.ring
        frame = Codec(other).dumps(Unlisted(marker) if kind == "forbidden_class" else marker)
        if kind == "tampered_tag":
            frame = frame[:-1] + bytes([frame[-1] ^ 0x01])
        assert marker.encode() in frame
        with caplog.at_level(logging.WARNING, logger="signedqueue"):
            q.put_frame(frame)
            with pytest.raises(RejectedFrame) as info:
                q.get(timeout=WAIT)
        records = [r for r in caplog.records if r.name == "signedqueue"]
        assert len(records) == 1
        message = records[0].getMessage()
        assert records[0].levelno == logging.WARNING
        assert other.active_id in message
        assert info.value.key_id == other.active_id
        assert info.value.reason in message
        assert f"{len(frame)} bytes" in message
        for text in (message, caplog.text, str(info.value), repr(info.value)):
            assert "PAYLOAD-MARKER" not in text

    def test_oversized_frame_is_refused_and_the_next_item_arrives(self) -> None:
        """A frame over max_frame_size raises FrameTooLarge at get(); the next item arrives."""
        q = self.make(max_frame_size=4096)
        big = Codec(self.ring).dumps(b"x" * 10_000)
        q.put_frame(big)
        q.put("next")
        with pytest.raises(FrameTooLarge) as info:
            q.get(timeout=WAIT)
        assert (info.value.size, info.value.limit) == (len(big), 4096)
        assert info.value.frame == big[:4096]  # an oversized frame is never copied whole
        assert q.get(timeout=WAIT) == "next"
        if self.joinable:
            self.done(q, 1)

    # -- relaying frames ---------------------------------------------------------

    def test_put_frame_passes_a_sealed_frame_on_unchanged(self) -> None:
        """put_frame() queues a frame sealed elsewhere as it is; get() verifies and loads it."""
        q = self.make()
        frame = Codec(self.ring).dumps({"relayed": [1, 2]})
        q.put_frame(bytearray(frame))
        if self.has_get_frame:
            assert q.get_frame(timeout=WAIT) == frame  # same bytes: not re-signed
            q.put_frame(memoryview(frame))
        assert q.get(timeout=WAIT) == {"relayed": [1, 2]}

    def test_relay_between_two_queues_without_resigning(self) -> None:
        """get_frame() then put_frame() relays a frame byte for byte; it loads at the end."""
        first, second = self.make(), self.make()
        first.put(("order", 42))
        frame = first.get_frame(timeout=WAIT)
        second.put_frame(frame)
        assert second.get_frame(timeout=WAIT) == frame
        second.put_frame(frame)
        assert second.get(timeout=WAIT) == ("order", 42)
        if self.joinable:
            self.done(first, 1)
            self.done(second, 2)

    def test_get_frame_does_not_load_the_payload(self) -> None:
        """get_frame() does not deserialize: a relay passes on a class only the far end allows."""
        relay = self.make()
        far_end = self.make(allow=[Unlisted])
        frame = Codec(self.ring).dumps(Unlisted("for the far end"))
        relay.put_frame(frame)
        passed_on = relay.get_frame(timeout=WAIT)
        assert passed_on == frame
        far_end.put_frame(passed_on)
        assert far_end.get(timeout=WAIT) == Unlisted("for the far end")
        relay.put_frame(frame)
        with pytest.raises(ForbiddenClass):
            relay.get(timeout=WAIT)  # the relay itself does not admit the class

    @pytest.mark.parametrize("kind", ["foreign_key", "tampered_tag", "garbage"])
    def test_get_frame_refuses_what_get_refuses(self, kind: str) -> None:
        """get_frame() refuses a frame that fails verification as get() does, with the frame."""
        q = self.make()
        frame, expected = bad_frame(kind, self.ring)
        q.put_frame(frame)
        q.put("next")
        with pytest.raises(RejectedFrame) as info:
            q.get_frame(timeout=WAIT)
        assert type(info.value) is expected
        assert info.value.frame == frame
        assert q.get(timeout=WAIT) == "next"
        if self.joinable:
            self.done(q, 1)

    # -- shutdown ------------------------------------------------------------------

    def test_close_and_join_thread(self) -> None:
        """join_thread() needs close() first; after close(), put() and get() raise ValueError."""
        q = self.make()
        q.put(1)
        with pytest.raises(ValueError):
            q.join_thread()
        q.close()
        Background(q.join_thread).result()
        with pytest.raises(ValueError):
            q.put(2)
        with pytest.raises(ValueError):
            q.get(timeout=SHORT)

    def test_cancel_join_thread_lets_a_blocked_producer_exit(
        self, mp_context: multiprocessing.context.BaseContext
    ) -> None:
        """A child that put more than the pipe holds exits once it called cancel_join_thread()."""
        q = self.make(ctx=mp_context)
        child = mp_context.Process(target=_overfill_then_cancel, args=(q,))
        start_all([child])
        join_all([child])

    # -- task_done and join ------------------------------------------------------------

    def test_task_done_and_join(self) -> None:
        """join() returns after task_done() for every item; one call too many raises ValueError."""
        q = self.make()
        for i in range(3):
            q.put(i)
        joiner = Background(q.join)
        for i in range(3):
            assert q.get(timeout=WAIT) == i
            assert joiner.running  # nothing returns join() before the last task_done()
            q.task_done()
        joiner.result()
        with pytest.raises(ValueError):
            q.task_done()

    # -- child processes ----------------------------------------------------------------

    def test_producers_and_consumers_in_child_processes(
        self, mp_context: multiprocessing.context.BaseContext
    ) -> None:
        """Items of two producer processes reach two consumers once each, in order per producer."""
        q = self.make(ctx=mp_context)
        results = mp_context.Queue()
        producers = [
            mp_context.Process(target=_produce, args=(q, n, COUNT, self.has_close))
            for n in range(2)
        ]
        consumers = [
            mp_context.Process(target=_consume, args=(q, results, self.joinable))
            for _ in range(2)
        ]
        start_all(consumers + producers)
        join_all(producers)
        for _ in consumers:
            q.put(None)
        received = [results.get(timeout=WAIT) for _ in consumers]
        join_all(consumers)
        results.close()
        results.join_thread()
        everything = [item for batch in received for item in batch]
        expected = {
            (n, seq, f"item {seq} of producer {n}") for n in range(2) for seq in range(COUNT)
        }
        assert len(everything) == len(expected)  # nothing twice
        assert set(everything) == expected  # nothing lost
        for batch in received:
            for n in range(2):
                seqs = [seq for producer, seq, _ in batch if producer == n]
                assert seqs == sorted(seqs)  # in order per producer
        if self.joinable:
            Background(q.join).result()


class TestSignedQueue(QueueContract):
    """The contract for SignedQueue."""

    has_close = True
    has_get_frame = True

    def new(self, ring: Keyring, *, maxsize: int, ctx: Any, **options: Any) -> Any:
        return SignedQueue(ring, maxsize=maxsize, ctx=ctx, **options)

    def dispose(self, q: Any) -> None:
        q.cancel_join_thread()
        q.close()

    test_task_done_and_join = None


class TestSignedJoinableQueue(QueueContract):
    """The contract for SignedJoinableQueue: a refused frame needs no task_done()."""

    has_close = True
    joinable = True
    has_get_frame = True

    def new(self, ring: Keyring, *, maxsize: int, ctx: Any, **options: Any) -> Any:
        return SignedJoinableQueue(ring, maxsize=maxsize, ctx=ctx, **options)

    def dispose(self, q: Any) -> None:
        q.cancel_join_thread()
        q.close()

    def test_refused_frames_need_no_task_done(self) -> None:
        """join() needs task_done() for returned items only, not for refused ones."""
        q = self.make()
        for kind in ("tampered_tag", "foreign_key", "forbidden_class", "garbage"):
            q.put_frame(bad_frame(kind, self.ring)[0])
        q.put("kept")
        for _ in range(2):
            with pytest.raises(RejectedFrame):
                q.get(timeout=WAIT)
            with pytest.raises(RejectedFrame):
                q.get_frame(timeout=WAIT)
        assert q.get(timeout=WAIT) == "kept"
        self.done(q, 1)


class WrappedContract(QueueContract):
    """The contract for wrap(), plus what only a wrapped queue can meet."""

    joinable = True
    has_get_frame = True

    test_close_and_join_thread = None
    test_cancel_join_thread_lets_a_blocked_producer_exit = None

    @pytest.mark.parametrize("item", [12345, "text", ["a", "list"], None], ids=repr)
    def test_unsigned_item_is_refused_with_malformed_frame(self, item: object) -> None:
        """An item that is not bytes raises MalformedFrame at get(); the next item arrives."""
        q = self.make()
        q.queue.put(item)
        q.put("next")
        with pytest.raises(MalformedFrame) as info:
            q.get(timeout=WAIT)
        assert type(item).__name__ in info.value.reason
        assert q.get(timeout=WAIT) == "next"
        self.done(q, 1)  # the refused item is already done

    def test_relay_into_a_signed_queue(self) -> None:
        """A frame from SignedQueue.get_frame() passes through put_frame() unchanged and loads."""
        source = SignedQueue(self.ring)
        try:
            source.put({"hop": 1})
            frame = source.get_frame(timeout=WAIT)
        finally:
            source.close()
        q = self.make()
        q.put_frame(frame)
        assert q.queue.get(timeout=WAIT) == frame  # the same bytes
        q.put_frame(frame)
        assert q.get(timeout=WAIT) == {"hop": 1}
        self.done(q, 2)


class TestWrappedQueue(WrappedContract):
    """The contract for wrap(queue.Queue()): in one process only."""

    cross_process = False

    def new(self, ring: Keyring, *, maxsize: int, ctx: Any, **options: Any) -> Any:
        return wrap(queue.Queue(maxsize), ring, **options)

    test_producers_and_consumers_in_child_processes = None


class TestWrappedManagerQueue(WrappedContract):
    """The contract for wrap() of a manager's queue proxy, shared with child processes."""

    @pytest.fixture(autouse=True)
    def _manager(self, manager: Any) -> None:
        self.manager = manager

    def new(self, ring: Keyring, *, maxsize: int, ctx: Any, **options: Any) -> Any:
        return wrap(self.manager.Queue(maxsize), ring, **options)


# -- wrap() of a queue that unpickles ----------------------------------------------


@pytest.mark.parametrize(
    "make_queue",
    [multiprocessing.Queue, multiprocessing.JoinableQueue, multiprocessing.SimpleQueue],
    ids=["Queue", "JoinableQueue", "SimpleQueue"],
)
def test_wrap_warns_for_multiprocessing_queues(
    make_queue: Callable[[], Any], ring: Keyring
) -> None:
    """wrap() of a multiprocessing queue warns UnprotectedTransportWarning; it still works."""
    inner = make_queue()
    with pytest.warns(UnprotectedTransportWarning, match="SignedQueue"):
        wrapped = wrap(inner, ring)
    wrapped.put({"still": "works"})
    assert wrapped.get() == {"still": "works"}
    inner.close()
    if hasattr(inner, "join_thread"):
        inner.join_thread()


@pytest.mark.parametrize(
    "make_queue", [queue.Queue, queue.LifoQueue, queue.SimpleQueue], ids=lambda f: f.__name__
)
def test_wrap_does_not_warn_for_in_process_queues(
    make_queue: Callable[[], Any], ring: Keyring
) -> None:
    """wrap() of an in-process queue issues no warning (warnings are errors here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrapped = wrap(make_queue(), ring)
    wrapped.put(1)
    assert wrapped.get() == 1


# -- oversized and foreign records in a SignedQueue's pipe ----------------------------


@pytest.fixture(params=[SignedQueue, SignedJoinableQueue], ids=lambda c: c.__name__)
def pipe_queue(request: pytest.FixtureRequest, ring: Keyring) -> Iterator[Callable[..., Any]]:
    """Makes SignedQueue or SignedJoinableQueue instances, closed after the test."""
    made: list[Any] = []

    def make(**options: Any) -> Any:
        q = request.param(ring, **options)
        made.append(q)
        return q

    yield make
    for q in made:
        q.cancel_join_thread()
        q.close()


def test_oversized_record_in_the_pipe_is_drained(pipe_queue: Callable[..., Any]) -> None:
    """An oversized record in the pipe raises FrameTooLarge, is drained; the next item arrives."""
    q = pipe_queue(max_frame_size=4096)
    record = bytes(range(256)) * 1200  # 300 KiB: more than one read chunk
    writer = Background(write_record, q._writer.fileno(), record)
    with pytest.raises(FrameTooLarge) as info:
        q.get(timeout=WAIT)
    writer.result()
    assert (info.value.size, info.value.limit) == (len(record), 4096)
    assert info.value.frame == record[:4096]
    q.put("next")
    assert q.get(timeout=WAIT) == "next"
    with pytest.raises(queue.Empty):
        q.get(timeout=SHORT)


@pytest.mark.parametrize("size", [0, 1, 71, 4096])
def test_short_record_in_the_pipe_is_refused(pipe_queue: Callable[..., Any], size: int) -> None:
    """Random bytes in the pipe raise MalformedFrame with those bytes; the next item arrives."""
    q = pipe_queue(max_frame_size=4096)
    record = os.urandom(size)
    write_record(q._writer.fileno(), record)
    q.put("next")
    with pytest.raises(MalformedFrame) as info:
        q.get(timeout=WAIT)
    assert info.value.frame == record
    assert q.get(timeout=WAIT) == "next"


# -- the key security test: a malicious pickle in the pipe ---------------------------


def test_malicious_pickle_in_the_pipe_never_runs(
    pipe_queue: Callable[..., Any], tmp_path: Path
) -> None:
    """A malicious plain pickle written into the pipe is refused at get() and never runs."""
    canary = tmp_path / "canary"
    q = pipe_queue()
    raw = exploit_pickle(canary)
    write_record(q._writer.fileno(), raw)
    with pytest.raises(MalformedFrame) as info:
        q.get(timeout=WAIT)
    assert info.value.frame == raw
    assert not canary.exists()
    q.put("legit")
    assert q.get(timeout=WAIT) == "legit"


def test_malicious_pickle_sealed_with_a_valid_key_never_runs(
    pipe_queue: Callable[..., Any], ring: Keyring, tmp_path: Path
) -> None:
    """The same pickle sealed with a valid key is refused as ForbiddenClass and never runs."""
    canary = tmp_path / "canary"
    q = pipe_queue()
    sealed = Codec(ring).seal(exploit_pickle(canary))
    write_record(q._writer.fileno(), sealed)
    q.put_frame(sealed)
    for _ in range(2):
        with pytest.raises(ForbiddenClass) as info:
            q.get(timeout=WAIT)
        assert info.value.frame == sealed
        assert info.value.names == ("posix.system",)
        assert info.value.allow_entries == (None,)
    assert not canary.exists()
    q.put("legit")
    assert q.get(timeout=WAIT) == "legit"


def test_malicious_pickles_never_run_in_a_consumer_process(
    mp_context: multiprocessing.context.BaseContext, ring: Keyring, tmp_path: Path
) -> None:
    """A consumer process refuses the raw and the sealed malicious pickle and runs neither."""
    canary = tmp_path / "canary"
    q = SignedQueue(ring, ctx=mp_context)
    results = mp_context.Queue()
    raw = exploit_pickle(canary)
    sealed = Codec(ring).seal(raw)
    try:
        consumer = mp_context.Process(
            target=_consume_reporting_refusals, args=(q, results, 3)
        )
        start_all([consumer])
        write_record(q._writer.fileno(), raw)
        q.put_frame(sealed)
        q.put("legit")
        outcome = results.get(timeout=WAIT)
        join_all([consumer])
    finally:
        q.cancel_join_thread()
        q.close()
        results.close()
    assert outcome == [
        ("MalformedFrame", len(raw)),
        ("ForbiddenClass", len(sealed)),
        ("item", "legit"),
    ]
    assert not canary.exists()


def test_the_same_pickle_runs_in_a_plain_multiprocessing_queue(
    ring: Keyring, tmp_path: Path
) -> None:
    """The same bytes in a multiprocessing.Queue's pipe run at get(), wrapped or not."""
    canary = tmp_path / "canary"
    # The injected record is read first; the item put after it holds the slot
    # that get() releases (with no item queued, multiprocessing.Queue.get()
    # would fail on its semaphore before unpickling).
    plain = multiprocessing.Queue()
    plain._writer.send_bytes(exploit_pickle(canary))  # type: ignore[attr-defined]
    plain.put("legit")
    assert plain.get(timeout=WAIT) == 0  # os.system's exit status
    assert canary.read_text().strip() == "pwned"
    plain.close()
    plain.join_thread()

    canary.unlink()
    inner = multiprocessing.Queue()
    with pytest.warns(UnprotectedTransportWarning):
        wrapped = wrap(inner, ring)
    inner._writer.send_bytes(exploit_pickle(canary))  # type: ignore[attr-defined]
    wrapped.put("legit")
    with pytest.raises(MalformedFrame):
        wrapped.get(timeout=WAIT)  # refused, but only after the pickle ran
    assert canary.read_text().strip() == "pwned"
    inner.close()
    inner.join_thread()
