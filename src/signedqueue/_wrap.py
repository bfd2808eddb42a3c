"""
``wrap()``: signed frames through any queue-like object.

What it protects depends on the queue underneath:

* ``queue.Queue``, ``asyncio``-free in-process queues, and any queue that
  moves the frame bytes as they are: every item is verified before it is
  loaded.
* Queues that pickle their items themselves (``multiprocessing.Queue``,
  manager queue proxies): the frame is verified before *signedqueue* loads
  it, but the queue has already unpickled its own envelope, so whoever can
  write to that queue's transport can still run code in the consumer.  Use
  :class:`SignedQueue` instead of a wrapped ``multiprocessing.Queue``; a
  manager is only as safe as its ``authkey``.
"""

from __future__ import annotations

import contextlib
import multiprocessing.queues
import warnings
from typing import Any

from ._codec import Buffer, Codec
from ._keys import Keyring
from .exceptions import MalformedFrame, RejectedFrame

__all__ = ["UnprotectedTransportWarning", "WrappedQueue", "wrap"]


class UnprotectedTransportWarning(UserWarning):
    """The wrapped queue unpickles its transport before signedqueue can check."""


class WrappedQueue:
    """
    A queue-like object whose items travel through *queue* as signed frames.

    Methods the wrapped queue lacks (``task_done`` on a ``queue.SimpleQueue``,
    say) raise ``AttributeError``.
    """

    def __init__(self, queue: Any, codec: Codec) -> None:
        self.queue = queue
        self.codec = codec

    def __repr__(self) -> str:
        return f"<WrappedQueue of {type(self.queue).__name__} codec={self.codec!r}>"

    def put(self, obj: Any, block: bool = True, timeout: float | None = None) -> None:
        """Sign *obj* (errors raise here) and put the frame."""
        self._put(self.codec.dumps(obj), block, timeout)

    def _put(self, frame: bytes, block: bool, timeout: float | None) -> None:
        # Queues without block/timeout (SimpleQueue) get the plain call.
        if block and timeout is None:
            self.queue.put(frame)
        else:
            self.queue.put(frame, block, timeout)

    def put_nowait(self, obj: Any) -> None:
        self.put(obj, False)

    def put_frame(self, frame: Buffer, block: bool = True, timeout: float | None = None) -> None:
        """Put an already sealed frame as it is; it is verified at ``get()``."""
        self._put(bytes(frame), block, timeout)

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """
        Get the next frame, verify it, and return the object it carries.

        A refused frame raises :class:`RejectedFrame`; if the wrapped queue
        counts tasks, the refused item is already marked done.
        """
        frame = self._get_frame(block, timeout)
        try:
            return self.codec.loads(frame)
        except RejectedFrame:
            self._refused_item_done()
            raise

    def get_frame(self, block: bool = True, timeout: float | None = None) -> bytes:
        """
        Get the next frame verified but not deserialized, e.g. to relay it
        with ``put_frame``.
        """
        frame = self._get_frame(block, timeout)
        try:
            self.codec.unseal(frame)
        except RejectedFrame:
            self._refused_item_done()
            raise
        return bytes(frame)

    def _get_frame(self, block: bool, timeout: float | None) -> Buffer:
        item = self.queue.get() if block and timeout is None else self.queue.get(block, timeout)
        if not isinstance(item, (bytes, bytearray, memoryview)):
            self._refused_item_done()
            exc = MalformedFrame(
                f"the queue delivered a {type(item).__name__}, not a frame; "
                "something put an unsigned object into it"
            )
            raise self.codec._refused(exc, b"")
        return item

    def _refused_item_done(self) -> None:
        # Everything in the wrapped queue went through its put(), so it was
        # counted; a refused item will never be processed.
        task_done = getattr(self.queue, "task_done", None)
        if task_done is not None:
            with contextlib.suppress(ValueError):
                task_done()

    def get_nowait(self) -> Any:
        return self.get(False)

    def qsize(self) -> int:
        return int(self.queue.qsize())

    def empty(self) -> bool:
        return bool(self.queue.empty())

    def full(self) -> bool:
        return bool(self.queue.full())

    def task_done(self) -> None:
        self.queue.task_done()

    def join(self) -> None:
        self.queue.join()

    def close(self) -> None:
        self.queue.close()

    def join_thread(self) -> None:
        self.queue.join_thread()

    def cancel_join_thread(self) -> None:
        self.queue.cancel_join_thread()


def wrap(queue: Any, keyring: Keyring, **codec_options: Any) -> WrappedQueue:
    """
    Wrap a queue-like object (``queue.Queue``, a manager queue proxy, ...) so
    that items go in as signed frames and are verified on the way out.

    Wrapping a ``multiprocessing.Queue`` warns with
    :class:`UnprotectedTransportWarning`: its ``get()`` unpickles the pipe
    before any check.  Use :class:`SignedQueue` instead.
    """
    if isinstance(queue, (multiprocessing.queues.Queue, multiprocessing.queues.SimpleQueue)):
        warnings.warn(
            f"wrap() cannot protect a multiprocessing {type(queue).__name__}: its get() unpickles "
            "whatever is in its pipe before signedqueue sees it. Use "
            "signedqueue.SignedQueue (or SignedJoinableQueue) instead.",
            UnprotectedTransportWarning,
            stacklevel=2,
        )
    return WrappedQueue(queue, Codec(keyring, **codec_options))
