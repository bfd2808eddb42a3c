"""
Stateful (hypothesis) tests of SignedQueue and SignedJoinableQueue, in process.

The model is the ordered list of what the pipe will deliver: items put with
``put`` and frames queued with ``put_frame`` (both hold a ``maxsize`` slot),
and records written straight into the pipe by a second, raw writer (no
slot).  Every item put arrives exactly once, in order; every refused frame
raises its RejectedFrame subclass at ``get`` and does not block the next
item; ``qsize``/``full``/``empty`` and ``task_done``/``join`` follow the
model.

A record that did not come through ``put`` releases a slot and marks a task
done that it never took, if another item holds one; the model follows that
(known limitation: see test_raw_record_releases_a_slot_it_never_took below).
"""

from __future__ import annotations

import array
import collections
import fcntl
import pickle
import queue
import termios
import threading
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

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
    _pipe,
)

SECRET = b"queue state machine key, constant" * 2
MAX_FRAME = 4096
CONTEXT = b"state-machine"
FLUSH_WAIT = 5.0

RING = Keyring({"sm": SECRET}, active="sm")
#: Same key id, another secret: its tags do not verify.
FORGED_RING = Keyring({"sm": SECRET[::-1]}, active="sm")
OTHER_RING = Keyring({"elsewhere": SECRET}, active="elsewhere")

items = st.one_of(
    st.integers(),
    st.text(max_size=30),
    st.binary(max_size=30),
    st.lists(st.integers(-5, 5), max_size=5),
    st.none(),
)
BAD_KINDS = ("garbage", "tampered", "forged", "unknown-key", "other-context",
             "forbidden", "oversized", "truncated")
EXPECTED: dict[str, type[RejectedFrame]] = {
    "garbage": MalformedFrame,
    "tampered": InvalidSignature,
    "forged": InvalidSignature,
    "unknown-key": UnknownKey,
    "other-context": InvalidSignature,
    "forbidden": ForbiddenClass,
    "oversized": FrameTooLarge,
    "truncated": MalformedFrame,
}


def bad_frame(kind: str, codec: Codec) -> bytes:
    """A frame the queue's codec refuses with EXPECTED[kind]."""
    if kind == "garbage":
        return b"not a frame at all" * 4
    if kind == "tampered":
        frame = bytearray(codec.dumps(["tamper", "me"]))
        frame[-40] ^= 0x01  # a payload byte: the tag no longer matches
        return bytes(frame)
    if kind == "forged":
        return Codec(FORGED_RING, context=CONTEXT).dumps("forged")
    if kind == "unknown-key":
        return Codec(OTHER_RING, context=CONTEXT).dumps("unknown")
    if kind == "other-context":
        return Codec(RING, context=b"another queue").dumps("context")
    if kind == "forbidden":
        # Signed with the right key, but names a global outside the allowlist
        # (pickled by reference; refusing it never calls it).
        return codec.seal(pickle.dumps(time.sleep, protocol=5))
    if kind == "oversized":
        return Codec(RING, context=CONTEXT, max_frame_size=4 * MAX_FRAME).dumps(
            b"x" * (2 * MAX_FRAME)
        )
    if kind == "truncated":
        return codec.dumps("cut short")[:-5]
    raise AssertionError(kind)


def pipe_bytes(q: SignedQueue) -> int:
    """Bytes waiting in the queue's pipe (FIONREAD)."""
    buf = array.array("i", [0])
    fcntl.ioctl(q._reader.fileno(), termios.FIONREAD, buf)
    return buf[0]


class QueueMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.q: SignedQueue | None = None

    @initialize(joinable=st.booleans(), maxsize=st.integers(0, 4))
    def make(self, joinable: bool, maxsize: int) -> None:
        cls = SignedJoinableQueue if joinable else SignedQueue
        self.joinable = joinable
        self.maxsize = maxsize
        self.q = cls(
            RING, maxsize=maxsize, context=CONTEXT, max_frame_size=MAX_FRAME,
            shm_threshold=None,
        )
        # ("item", value, record bytes) or ("bad", kind, record bytes, holds a slot)
        self.model: collections.deque[tuple[Any, ...]] = collections.deque()
        # The joinable queue's count of unfinished tasks.
        self.tasks = 0
        # Slots taken from the maxsize semaphore (qsize()).
        self.taken = 0
        self.closed = False

    # -- helpers -----------------------------------------------------------

    @property
    def queue(self) -> SignedQueue:
        assert self.q is not None
        return self.q

    def slots(self) -> int:
        return self.taken

    def unfinished(self) -> int:
        return self.tasks if self.joinable else 0

    def is_full(self) -> bool:
        return self.maxsize > 0 and self.slots() >= self.maxsize

    def wait_flushed(self) -> None:
        """Wait until the feeder thread has written every queued record."""
        want = sum(entry[2] for entry in self.model)
        deadline = time.monotonic() + FLUSH_WAIT
        while pipe_bytes(self.queue) != want:
            assert time.monotonic() < deadline, (pipe_bytes(self.queue), want)
            time.sleep(0.001)

    def record_size(self, frame_len: int) -> int:
        return _pipe.RECORD_HEADER.size + frame_len

    # -- producing ---------------------------------------------------------

    @precondition(lambda self: not self.closed)
    @rule(item=items)
    def put(self, item: Any) -> None:
        if self.is_full():
            with pytest.raises(queue.Full):
                self.queue.put_nowait(item)
            return
        self.queue.put(item, timeout=FLUSH_WAIT)
        size = self.record_size(len(self.queue.codec.dumps(item)))
        self.model.append(("item", item, size))
        self.tasks += 1
        self.taken += 1

    @precondition(lambda self: not self.closed)
    @rule(kind=st.sampled_from(BAD_KINDS))
    def put_bad_frame(self, kind: str) -> None:
        frame = bad_frame(kind, self.queue.codec)
        if self.is_full():
            with pytest.raises(queue.Full):
                self.queue.put_frame(frame, block=False)
            return
        self.queue.put_frame(frame, block=False)
        self.model.append(("bad", kind, self.record_size(len(frame)), True))
        self.tasks += 1
        self.taken += 1

    @precondition(lambda self: not self.closed)
    @rule(kind=st.sampled_from(BAD_KINDS))
    def inject_raw(self, kind: str) -> None:
        """A second writer puts a record straight into the pipe (no slot)."""
        frame = bad_frame(kind, self.queue.codec)
        self.wait_flushed()
        with self.queue._wlock:
            _pipe.write_record(self.queue._writer.fileno(), frame)
        self.model.append(("bad", kind, self.record_size(len(frame)), False))

    # -- consuming ---------------------------------------------------------

    def check_next(self, get: Any) -> None:
        entry = self.model.popleft()
        # Every record read frees a slot if one is taken: a raw record frees
        # another item's slot (the limitation tested below).
        self.taken = max(self.taken - 1, 0)
        if entry[0] == "item":
            got = get()
            assert got == entry[1] and type(got) is type(entry[1])
        else:
            with pytest.raises(EXPECTED[entry[1]]) as info:
                get()
            assert isinstance(info.value, RejectedFrame)
            assert info.value.frame is not None
            # A refused item is done: it will never be processed.
            self.tasks = max(self.tasks - 1, 0)

    @precondition(lambda self: not self.closed and self.model)
    @rule()
    def get(self) -> None:
        self.check_next(lambda: self.queue.get(timeout=FLUSH_WAIT))

    @precondition(lambda self: not self.closed and self.model)
    @rule()
    def get_nowait(self) -> None:
        self.wait_flushed()
        self.check_next(self.queue.get_nowait)

    @precondition(lambda self: not self.closed and not self.model)
    @rule(block=st.booleans())
    def get_empty(self, block: bool) -> None:
        with pytest.raises(queue.Empty):
            if block:
                self.queue.get(timeout=0.01)
            else:
                self.queue.get_nowait()

    # -- joinable accounting -----------------------------------------------

    @precondition(lambda self: not self.closed and self.joinable)
    @rule()
    def task_done(self) -> None:
        q = self.queue
        assert isinstance(q, SignedJoinableQueue)
        if self.unfinished() == 0:
            with pytest.raises(ValueError):
                q.task_done()
            return
        # (Also for an item still queued, as multiprocessing.JoinableQueue.)
        q.task_done()
        self.tasks -= 1

    @precondition(
        lambda self: not self.closed and self.joinable and self.unfinished() == 0
    )
    @rule()
    def join_returns(self) -> None:
        q = self.queue
        assert isinstance(q, SignedJoinableQueue)
        done = threading.Event()

        def joiner() -> None:
            q.join()
            done.set()

        thread = threading.Thread(target=joiner, daemon=True)
        thread.start()
        assert done.wait(FLUSH_WAIT), "join() blocked with no unfinished task"
        thread.join()

    # -- shutdown ----------------------------------------------------------

    @precondition(lambda self: not self.closed)
    @rule()
    def close(self) -> None:
        self.queue.close()
        self.closed = True

    @precondition(lambda self: self.closed)
    @rule(item=items)
    def use_after_close(self, item: Any) -> None:
        with pytest.raises(ValueError):
            self.queue.put(item)
        with pytest.raises(ValueError):
            self.queue.get_nowait()

    # -- invariants --------------------------------------------------------

    @invariant()
    def sizes_follow_the_model(self) -> None:
        if self.q is None:
            return
        assert self.queue.qsize() == self.slots()
        assert self.queue.full() == self.is_full()
        if not self.closed:
            if self.model:
                self.wait_flushed()
                assert not self.queue.empty()
            else:
                assert self.queue.empty()
                assert pipe_bytes(self.queue) == 0

    def teardown(self) -> None:
        if self.q is not None:
            self.q.close()
            self.q.join_thread()
            self.q._reader.close()


QueueMachine.TestCase.settings = settings(
    max_examples=30,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestQueueStateMachine = QueueMachine.TestCase


@pytest.fixture(autouse=True)
def _quiet_refusals(caplog: pytest.LogCaptureFixture) -> None:
    """Refusals are logged at WARNING; the machine makes hundreds."""
    caplog.set_level("CRITICAL", logger="signedqueue")


# -- a known limitation, found by this machine ----------------------------------


@pytest.mark.xfail(
    strict=True,
    reason="a record written straight into the pipe (not through put) releases a "
    "maxsize slot it never took when other items hold slots, so qsize() "
    "undercounts and one extra put() is admitted per forged record",
)
def test_raw_record_releases_a_slot_it_never_took() -> None:
    q = SignedQueue(RING, maxsize=2, context=CONTEXT, shm_threshold=None)
    try:
        with q._wlock:
            _pipe.write_record(q._writer.fileno(), b"forged record" * 4)
        q.put("a")
        q.put("b")
        with pytest.raises(MalformedFrame):
            q.get(timeout=FLUSH_WAIT)
        assert q.qsize() == 2
        assert q.full()
    finally:
        q.close()
        q.join_thread()


@pytest.mark.xfail(
    strict=True,
    reason="a record written straight into the pipe marks a task done that it never "
    "counted, so join() can return while a returned item is still unprocessed",
)
def test_raw_record_marks_someone_elses_task_done() -> None:
    q = SignedJoinableQueue(RING, context=CONTEXT, shm_threshold=None)
    try:
        q.put("work")
        assert q.get(timeout=FLUSH_WAIT) == "work"  # taken, not yet task_done()
        with q._wlock:
            _pipe.write_record(q._writer.fileno(), b"forged record" * 4)
        with pytest.raises(MalformedFrame):
            q.get(timeout=FLUSH_WAIT)
        done = threading.Event()
        threading.Thread(target=lambda: (q.join(), done.set()), daemon=True).start()
        assert not done.wait(0.2), "join() returned with a task unfinished"
        q.task_done()
    finally:
        q.close()
        q.join_thread()
