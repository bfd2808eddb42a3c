"""
Drop-in replacements for ``multiprocessing.Queue`` and ``JoinableQueue``.

``multiprocessing.Queue.get()`` unpickles whatever arrives in its pipe, so a
signed queue cannot be built by wrapping one: an attacker's pickle would run
before any check.  :class:`SignedQueue` therefore moves raw frame bytes over
its own pipe (see :mod:`signedqueue._pipe`) and hands them to the codec, which
verifies the tag before deserializing.  Frames are made in the caller of
``put()`` (serialization errors raise there) and written by a feeder thread,
with the locking, ``maxsize``, ``close()`` and ``join_thread()`` semantics of
``multiprocessing.Queue``; the frame is pickled once, not twice.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import math
import multiprocessing
import os
import select
import sys
import threading
import time
import weakref
from collections.abc import Callable
from multiprocessing import connection, context
from multiprocessing.context import BaseContext
from multiprocessing.util import Finalize, is_exiting, register_after_fork
from queue import Empty, Full
from typing import Any

from . import _pipe, _shm
from ._codec import Buffer, Codec
from ._frame import KEPT_OF_OVERSIZED
from ._keys import Keyring
from ._sealing import Sealing
from .exceptions import FrameTooLarge, MalformedFrame, RejectedFrame

__all__ = ["SignedJoinableQueue", "SignedQueue"]

logger = logging.getLogger("signedqueue")

_sentinel = object()

#: Frames at least this large travel through shared memory by default.
DEFAULT_SHM_THRESHOLD = 1 << 20
#: Frames smaller than this that are queued together are written together,
#: at most this many records at a time.
_BATCHED = 16 * 1024
_BATCH_RECORDS = 64

Item = bytes | Sealing


class SignedQueue:
    """
    A process-safe FIFO queue whose items travel as signed frames.

    Behaves like ``multiprocessing.Queue``: ``put``/``get`` with *block* and
    *timeout*, ``put_nowait``/``get_nowait``, ``qsize``/``empty``/``full``,
    ``close``/``join_thread``/``cancel_join_thread``, and it can be passed to
    child processes as an argument under every start method.

    Args:
        keyring: Signs frames on ``put`` and verifies them on ``get``.
        maxsize: Upper bound on items in the queue; ``<= 0`` for unbounded.
        ctx: A multiprocessing context (default: the current one).
        shm_threshold: Frames of at least this many bytes travel as sealed
            memory files passed beside the pipe instead of through it (Linux;
            default 1 MiB); ``None`` sends every frame through the pipe.  A
            sealed file cannot change, so the consumer verifies and loads it
            in place, without a copy (see :mod:`signedqueue._shm`).
        **codec_options: Passed to :class:`Codec` (``serializer``, ``allow``,
            ``max_age``, ``context``, ``max_frame_size``, ...).

    A frame that fails verification raises a :class:`RejectedFrame` subclass
    from ``get()``, carrying the raw frame; the queue stays usable and the
    next ``get()`` returns the next item.

    POSIX only (Linux, macOS): the pipe is driven with ``os.writev`` and
    ``os.readv``.
    """

    def __init__(
        self,
        keyring: Keyring,
        *,
        maxsize: int = 0,
        ctx: BaseContext | None = None,
        shm_threshold: int | None = DEFAULT_SHM_THRESHOLD,
        **codec_options: Any,
    ) -> None:
        if sys.platform == "win32":  # pragma: no cover
            raise OSError("SignedQueue needs POSIX pipes; on Windows use wrap()")
        ctx = ctx if ctx is not None else multiprocessing.get_context()
        self._codec = Codec(keyring, **codec_options)
        if maxsize <= 0:
            from multiprocessing import synchronize

            maxsize = synchronize.SEM_VALUE_MAX  # type: ignore[attr-defined]
        self._maxsize = maxsize
        self._reader, self._writer = connection.Pipe(duplex=False)
        _pipe.enlarge_pipe(self._writer.fileno())
        self._rlock = _OwnedLock(ctx, "read")
        self._wlock = _OwnedLock(ctx, "write")
        self._sem = ctx.BoundedSemaphore(maxsize)
        self._opid = os.getpid()
        self._ignore_epipe = False
        if shm_threshold is not None and shm_threshold < 1:
            raise ValueError("shm_threshold must be a positive number of bytes or None")
        self._shm_threshold = shm_threshold if _shm.available() else None
        self._fds: tuple[connection.Connection, connection.Connection] | None = (
            _shm.channel() if self._shm_threshold is not None else None
        )
        self._reset()
        register_after_fork(self, SignedQueue._after_fork)

    # -- process plumbing (as multiprocessing.Queue) -----------------------

    def __getstate__(self) -> tuple[Any, ...]:
        context.assert_spawning(self)
        return (
            self._ignore_epipe, self._maxsize, self._reader, self._writer,
            self._rlock, self._wlock, self._sem, self._opid, self._codec,
            self._shm_threshold, self._fds,
        )

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        (
            self._ignore_epipe, self._maxsize, self._reader, self._writer,
            self._rlock, self._wlock, self._sem, self._opid, self._codec,
            self._shm_threshold, self._fds,
        ) = state
        self._reset()
        register_after_fork(self, SignedQueue._after_fork)

    def _after_fork(self) -> None:
        self._reset(after_fork=True)

    def _reset(self, after_fork: bool = False) -> None:
        if after_fork:
            self._notempty._at_fork_reinit()  # type: ignore[has-type]
        else:
            self._notempty = threading.Condition(threading.Lock())
        self._buffer: collections.deque[Any] = collections.deque()
        self._thread: threading.Thread | None = None
        self._jointhread: Finalize | None = None
        self._joincancelled = False
        self._closed = False
        self._close: Finalize | None = None
        self._poll = self._reader.poll
        self._rfd = self._reader.fileno()
        self._limit = self._codec.max_frame_size
        poller = select.poll()
        poller.register(self._rfd, select.POLLIN)
        self._poller = poller

    def _readable(self, timeout: float) -> bool:
        """True once the pipe has data (or was closed), within *timeout* seconds."""
        return bool(self._poller.poll(math.ceil(timeout * 1000)))

    @property
    def codec(self) -> Codec:
        """The codec that seals and opens this queue's frames."""
        return self._codec

    def __repr__(self) -> str:
        return f"<{type(self).__name__} at {id(self):#x} codec={self._codec!r}>"

    # -- producing ---------------------------------------------------------

    def put(self, obj: Any, block: bool = True, timeout: float | None = None) -> None:
        """
        Sign *obj* and queue it.  Serialization errors raise here, in the
        caller; ``queue.Full`` if no slot frees up in time.
        """
        self._put_frame(self._codec._prepare(obj), block, timeout)

    def put_nowait(self, obj: Any) -> None:
        """``put(obj, block=False)``."""
        self.put(obj, False)

    def put_frame(
        self, frame: Buffer, block: bool = True, timeout: float | None = None
    ) -> None:
        """
        Queue an already sealed frame as it is, without re-signing (to relay
        frames between transports).  It is verified at ``get()`` like any
        other frame.
        """
        self._put_frame(bytes(frame), block, timeout)

    def _put_frame(self, frame: Item, block: bool, timeout: float | None) -> None:
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")
        if not self._sem.acquire(block, timeout):
            raise Full
        with self._notempty:
            if self._thread is None:
                self._start_thread()
            self._buffer.append(frame)
            self._notempty.notify()

    # -- consuming ---------------------------------------------------------

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """
        Remove and return the next item, verified and loaded.

        Raises ``queue.Empty`` if none arrives in time, and a
        :class:`RejectedFrame` subclass if the next frame is refused (the
        frame is consumed; the next call returns the next item).  Raises
        ``OSError`` with ``errno.EOWNERDEAD`` (within about a second) if a
        process was killed while holding the queue's read or write lock: the
        queue cannot be used any more.
        """
        return self._load(self._get_record(block, timeout))

    def get_nowait(self) -> Any:
        """``get(block=False)``."""
        return self.get(False)

    def get_frame(self, block: bool = True, timeout: float | None = None) -> bytes:
        """
        Remove the next frame and return it verified but not deserialized
        (the payload is not loaded), e.g. to relay it with ``put_frame``.
        """
        record = self._get_record(block, timeout)
        if isinstance(record, _pipe.Oversized):
            return self._load(record)  # type: ignore[no-any-return] # raises FrameTooLarge
        try:
            if isinstance(record, _pipe.SegmentRef):
                if record.size > self._codec.max_frame_size:
                    return self._load(record)  # type: ignore[no-any-return] # raises
                mapped = self._map_segment(record)
                with mapped:
                    frame = bytes(mapped)
            else:
                frame = bytes(record)
            self._codec.unseal(frame)
        except RejectedFrame:
            self._on_rejected()
            raise
        return frame

    def _map_segment(self, record: _pipe.SegmentRef) -> Any:
        """The sealed memory file of *record*, mapped privately (or refused)."""
        try:
            if record.fd is None:
                raise record.error or _shm.SegmentError("no memory file came with the record")
            return _shm.map_sealed(record.fd, record.size)
        except OSError as exc:
            raise self._codec._refused(
                MalformedFrame(f"{exc}; the frame is lost"), record.record
            ) from None
        finally:
            if record.fd is not None:
                os.close(record.fd)
                record.fd = None

    def _get_record(
        self, block: bool, timeout: float | None
    ) -> bytearray | _pipe.Oversized | _pipe.SegmentRef:
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")
        limit = self._limit
        rlock = self._rlock
        deadline = time.monotonic() + timeout if block and timeout is not None else 0.0
        while True:
            # The read lock is held only while a record that has begun to
            # arrive is read, never while waiting for one: a consumer killed
            # while it waits (an idle consumer's usual state) leaves no lock
            # behind, so the other consumers are not stuck behind it.
            if not block:
                acquired = rlock.acquire(False)
            elif timeout is None:
                acquired = rlock.acquire()
            else:
                acquired = rlock.acquire(True, max(deadline - time.monotonic(), 0.0))
            if not acquired:
                raise Empty
            try:
                if self._readable(0.0):
                    record = _pipe.read_record(self._rfd, limit, self._wlock.check)
                    if type(record) is _pipe.SegmentRef:
                        self._take_fd(record)
                    self._release_slot()
                    return record
            finally:
                rlock.release()
            if not block:
                raise Empty
            left = None if timeout is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise Empty
            _wait_readable(self._rfd, left, self._wlock.check)

    def _take_fd(self, record: _pipe.SegmentRef) -> None:
        # Under the read lock: records and descriptors are taken in the
        # order they were sent (both are sent under the write lock).
        if self._fds is None:
            record.error = _shm.SegmentError(
                "a shared-memory record reached a queue that has no shared memory"
            )
            return
        try:
            record.fd = _shm.receive(self._fds[1], record.inode)
        except OSError as exc:
            record.error = exc

    def _release_slot(self) -> None:
        # A record that did not come through put() (written into the pipe by
        # someone else) holds no slot.  Never lose the record for it.
        try:  # noqa: SIM105 - on every get(); contextlib.suppress costs more
            self._sem.release()
        except ValueError:
            pass

    def _load(self, record: bytearray | _pipe.Oversized | _pipe.SegmentRef) -> Any:
        # Runs after the read lock is released, like multiprocessing.Queue.
        try:
            if type(record) is bytearray:  # a frame read from the pipe
                return self._codec.loads(record)
            if isinstance(record, _pipe.SegmentRef):
                return self._load_segment(record)
            if isinstance(record, _pipe.Oversized):
                if record.malformed:
                    raise self._codec._refused(
                        MalformedFrame(
                            f"a shared-memory record of {record.size} bytes (not 16); "
                            "it was drained unread"
                        ),
                        record.prefix,
                    )
                exc = FrameTooLarge(
                    f"frame of {record.size} bytes is over max_frame_size="
                    f"{self._codec.max_frame_size}; it was drained unread",
                    size=record.size,
                    limit=self._codec.max_frame_size,
                )
                raise self._codec._refused(exc, record.prefix)
        except RejectedFrame:
            self._on_rejected()
            raise

    def _load_segment(self, record: _pipe.SegmentRef) -> Any:
        codec = self._codec
        if record.size > codec.max_frame_size:
            prefix = b""
            if record.fd is not None:
                try:
                    prefix = os.pread(record.fd, KEPT_OF_OVERSIZED, 0)
                except OSError:  # not a file: a pipe, a socket, a directory
                    pass
                finally:
                    os.close(record.fd)
                    record.fd = None
            exc = FrameTooLarge(
                f"frame of {record.size} bytes is over max_frame_size="
                f"{codec.max_frame_size}; its shared memory was released unread",
                size=record.size,
                limit=codec.max_frame_size,
            )
            raise codec._refused(exc, prefix)
        # Verified and loaded in place: the file is sealed, so the bytes
        # verified are the bytes loaded; arrays loaded out of band view the
        # private mapping, which lives as long as they do.
        return codec.loads(self._map_segment(record))

    def _on_rejected(self) -> None:
        """Hook: a frame was refused at get()."""

    def _on_unsent(self) -> None:
        """Hook (feeder thread): a put frame could not be written."""

    # -- size --------------------------------------------------------------

    def qsize(self) -> int:
        """Approximate number of items (NotImplementedError on macOS)."""
        return self._maxsize - self._sem._semlock._get_value()  # type: ignore[attr-defined,no-any-return]

    def empty(self) -> bool:
        """True if no frame is waiting in the pipe (approximate)."""
        return not self._poll()

    def full(self) -> bool:
        """True if ``maxsize`` items are queued (approximate)."""
        return bool(self._sem._semlock._is_zero())  # type: ignore[attr-defined]

    # -- shutdown (as multiprocessing.Queue) -------------------------------

    def close(self) -> None:
        """No more puts from this process; the feeder flushes and exits."""
        self._closed = True
        close = self._close
        if close:
            self._close = None
            close()

    def join_thread(self) -> None:
        """Wait for the feeder thread to flush; only after ``close()``."""
        if not self._closed:
            raise ValueError(f"Queue {self!r} not closed")
        if self._jointhread:
            self._jointhread()

    def cancel_join_thread(self) -> None:
        """Do not wait for the feeder thread at process exit."""
        self._joincancelled = True
        jointhread = self._jointhread
        if jointhread is not None:
            jointhread.cancel()

    def _start_thread(self) -> None:
        self._buffer.clear()
        self._thread = threading.Thread(
            target=SignedQueue._feed,
            args=(
                self._buffer, self._notempty, self._writer.fileno(), self._wlock,
                self._reader.close, self._writer.close, self._ignore_epipe, self._sem,
                self._on_unsent, self._shm_threshold, self._fds,
            ),
            name="SignedQueueFeederThread",
            daemon=True,
        )
        self._thread.start()
        if not self._joincancelled:
            self._jointhread = Finalize(
                self._thread, SignedQueue._finalize_join,
                [weakref.ref(self._thread)], exitpriority=-5,
            )
        self._close = Finalize(
            self, SignedQueue._finalize_close,
            [self._buffer, self._notempty], exitpriority=10,
        )

    @staticmethod
    def _finalize_join(twr: Callable[[], threading.Thread | None]) -> None:
        thread = twr()
        if thread is not None:
            thread.join()

    @staticmethod
    def _finalize_close(buffer: collections.deque[Any], notempty: threading.Condition) -> None:
        with notempty:
            buffer.append(_sentinel)
            notempty.notify()

    @staticmethod
    def _feed(
        buffer: collections.deque[Any],
        notempty: threading.Condition,
        fd: int,
        writelock: Any,
        reader_close: Callable[[], None],
        writer_close: Callable[[], None],
        ignore_epipe: bool,
        queue_sem: Any,
        on_unsent: Callable[[], None],
        shm_threshold: int | None,
        fds: tuple[connection.Connection, connection.Connection] | None,
    ) -> None:
        popleft = buffer.popleft
        pack = _pipe.RECORD_HEADER.pack
        batch: list[bytes] = []  # small records, written with one write
        unsent = 0  # frames taken from the buffer and not yet in the pipe

        def flush() -> None:
            nonlocal unsent
            if batch:
                data = b"".join(batch)
                with writelock:
                    _pipe.write_all(fd, data)
                batch.clear()
            unsent = 0

        while True:
            try:
                with notempty:
                    if not buffer:
                        notempty.wait()
                try:
                    while True:
                        frame = popleft()
                        if frame is _sentinel:
                            flush()
                            reader_close()
                            writer_close()
                            return
                        unsent += 1
                        if type(frame) is bytes and len(frame) < _BATCHED:
                            # Frames queued together go out together: one
                            # system call and one lock for many records.
                            batch.append(pack(len(frame)))
                            batch.append(frame)
                            if len(batch) >= 2 * _BATCH_RECORDS:
                                flush()
                            continue
                        flush()
                        unsent = 1
                        size = frame.size if isinstance(frame, Sealing) else len(frame)
                        if fds is not None and shm_threshold is not None and (
                            size >= shm_threshold
                        ):
                            # Made outside the write lock: other producers'
                            # frames keep flowing while this one is copied.
                            try:
                                memfd = _shm.create(frame)
                            except OSError:  # no memory file (limits, memory)
                                memfd = -1
                            try:
                                with writelock:
                                    try:
                                        if memfd < 0:
                                            raise OSError("no memory file")
                                        inode = _shm.identity(memfd)
                                        _shm.send(fds[0], memfd)
                                    except OSError:
                                        # No memory file, the socket is full
                                        # or the in-flight limit is reached:
                                        # the frame goes through the pipe.
                                        _pipe.write_record(fd, frame)
                                    else:
                                        _pipe.write_segment_ref(fd, size, inode)
                            finally:
                                if memfd >= 0:
                                    os.close(memfd)
                        else:
                            with writelock:
                                _pipe.write_record(fd, frame)
                        unsent = 0
                except IndexError:
                    pass
                flush()
            except Exception as exc:
                if ignore_epipe and getattr(exc, "errno", 0) == errno.EPIPE:
                    return
                if is_exiting():
                    return
                # Those frames never reached the pipe: free their slots, report.
                lost, unsent = max(unsent, 1), 0
                batch.clear()
                for _ in range(lost):
                    # (A slot may already be free: a forged record read by
                    # get() releases one it never took.)
                    with contextlib.suppress(ValueError):
                        queue_sem.release()
                    on_unsent()
                logger.error(
                    "signedqueue: feeder thread could not write %d frame(s): %r", lost, exc
                )


def _wait_readable(fd: int, timeout: float | None, stalled: Callable[[], None]) -> None:
    """
    Wait until *fd* has data or is closed, or *timeout* seconds pass; call
    *stalled* (which may raise) every second meanwhile.
    """
    # A poll object of its own: the queue's is used only under the read lock.
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        wait = _pipe.STALL_CHECK_MS
        if deadline is not None:
            wait = min(wait, max(math.ceil((deadline - time.monotonic()) * 1000), 0))
        if poller.poll(wait) or (deadline is not None and time.monotonic() >= deadline):
            return
        stalled()


#: Seconds a waiter waits for a lock between looks at whether its holder lives.
_OWNER_CHECK = 1.0


class _OwnedLock:
    """
    A process-shared lock that knows which process holds it.

    The queue's locks are semaphores, which the kernel does not release when
    their holder dies.  A process SIGKILLed while holding one (a producer in
    the middle of writing a record, a consumer in the middle of reading one)
    would leave every other process waiting forever; instead, a waiter looks
    at the holder every second and, if it is dead, raises
    ``OSError(EOWNERDEAD)``: the queue cannot be used safely any more (the
    dead process may have left half a record in the pipe, or taken half of
    one).  A holder killed in the few instructions between taking the lock
    and recording its pid is not detected.
    """

    def __init__(self, ctx: BaseContext, what: str) -> None:
        self._lock = ctx.Lock()
        self._owner = ctx.RawValue("q", 0)  # pid of the holder, 0 if none
        self._what = what

    def acquire(self, block: bool = True, timeout: float | None = None) -> bool:
        lock = self._lock
        if lock.acquire(False):
            self._owner.value = os.getpid()
            return True
        if not block:
            return False
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = _OWNER_CHECK
            if deadline is not None:
                wait = max(min(wait, deadline - time.monotonic()), 0.0)
            if lock.acquire(True, wait):
                self._owner.value = os.getpid()
                return True
            self.check()
            if deadline is not None and time.monotonic() >= deadline:
                return False

    def release(self) -> None:
        self._owner.value = 0
        self._lock.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def check(self) -> None:
        """Raise ``OSError(EOWNERDEAD)`` if the lock's holder is dead."""
        pid = self._owner.value
        if pid and not _alive(pid) and self._owner.value == pid:
            # Still recorded after the check, so it did not release the lock
            # and exit in between; and the lock is indeed still held.
            if self._lock.acquire(False):
                self._lock.release()
                return
            raise OSError(
                errno.EOWNERDEAD,
                f"process {pid} was killed while holding the queue's {self._what} lock; "
                "the queue cannot be used any more (replace it)",
            )


def _alive(pid: int) -> bool:
    """False if process *pid* has exited (a zombie counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rpartition(b")")[2].split()[:1] not in ([b"Z"], [b"X"])
    except OSError:  # no /proc (macOS), or its entry hidden (hidepid): ask the kernel
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_zero(sem: Any) -> bool:
    return bool(sem._semlock._is_zero())


class SignedJoinableQueue(SignedQueue):
    """
    A :class:`SignedQueue` with ``task_done()`` and ``join()``, like
    ``multiprocessing.JoinableQueue``.

    A ``get()`` that raises :class:`RejectedFrame` has already marked its item
    done: call ``task_done()`` only for items ``get()`` returned.
    """

    def __init__(
        self,
        keyring: Keyring,
        *,
        maxsize: int = 0,
        ctx: BaseContext | None = None,
        shm_threshold: int | None = DEFAULT_SHM_THRESHOLD,
        **codec_options: Any,
    ) -> None:
        ctx = ctx if ctx is not None else multiprocessing.get_context()
        super().__init__(
            keyring, maxsize=maxsize, ctx=ctx, shm_threshold=shm_threshold, **codec_options
        )
        self._unfinished_tasks = ctx.Semaphore(0)
        self._cond = ctx.Condition()

    def __getstate__(self) -> tuple[Any, ...]:
        return (*super().__getstate__(), self._cond, self._unfinished_tasks)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        super().__setstate__(state[:-2])
        self._cond, self._unfinished_tasks = state[-2:]

    def _put_frame(self, frame: Item, block: bool, timeout: float | None) -> None:
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")
        if not self._sem.acquire(block, timeout):
            raise Full
        with self._notempty, self._cond:
            if self._thread is None:
                self._start_thread()
            self._buffer.append(frame)
            self._unfinished_tasks.release()
            self._notempty.notify()

    def _on_unsent(self) -> None:
        # The item will never arrive, so join() must not wait for it.
        self._on_rejected()

    def _on_rejected(self) -> None:
        # The refused item will never be processed, so it is done.  (A frame
        # written to the pipe by someone else was never counted; the count
        # cannot go below zero.)
        with self._cond:
            if self._unfinished_tasks.acquire(False) and _is_zero(self._unfinished_tasks):
                self._cond.notify_all()

    def task_done(self) -> None:
        """Mark one item returned by ``get()`` as processed."""
        with self._cond:
            if not self._unfinished_tasks.acquire(False):
                raise ValueError("task_done() called too many times")
            if _is_zero(self._unfinished_tasks):
                self._cond.notify_all()

    def join(self) -> None:
        """Block until every item put has been marked done."""
        with self._cond:
            if not _is_zero(self._unfinished_tasks):
                self._cond.wait()
