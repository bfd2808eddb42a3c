"""
A kombu serializer that signs every message body, and the bindings Celery
needs on top of it.

:func:`register` adds a serializer to kombu's registry under its own content
type (``application/x-signedqueue`` by default).  Its encoder signs with a
:class:`~signedqueue.Codec`; its decoder verifies the tag before a byte of the
body reaches the restricted unpickler.  Plain kombu producers and consumers
use it by name (``serializer="signedqueue"``, ``accept=["signedqueue"]``).

Every frame is one of two kinds, and the kind is bound into its tag:

- a **task** frame carries the body of one Celery task message, an
  ``(args, kwargs, embed)`` tuple, and also binds the task's name;
- a **message** frame carries anything else: Celery results and remote
  control messages, and plain kombu bodies.

A kombu encoder or decoder sees only the body, never the headers that name the
task.  So the encoder seals a task frame only for the one body object that
:mod:`signedqueue.transports.celery` announced from Celery's
``before_task_publish`` signal.  The decoder opens a task frame only while a
task name is expected in the current context; the Celery worker-side hook
does not go through it, but verifies each task message's raw body with
:meth:`KombuSerializer.loads_task` for the task its ``task`` header names.
Everything else is sealed and opened as a message frame.  See
``docs/how-to/celery.md``.

The context bound into every tag is, with ``L(x)`` the 4-byte big-endian
length of *x* followed by *x*::

    b"signedqueue.kombu/1" L(content type) L(codec context) L(kind) L(task name)

where the kind is ``b"task"`` or ``b"message"`` and the task name (UTF-8) is
empty for messages.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from typing import Any

from kombu import serialization

from .._codec import Codec
from ..exceptions import MalformedFrame, RejectedFrame

__all__ = [
    "CONTENT_TYPE",
    "KIND_MESSAGE",
    "KIND_TASK",
    "NAME",
    "KombuSerializer",
    "frame_context",
    "register",
    "rejected_cause",
]

logger = logging.getLogger("signedqueue")

#: The serializer name :func:`register` uses by default.
NAME = "signedqueue"
#: The content type :func:`register` uses by default.
CONTENT_TYPE = "application/x-signedqueue"
#: The kind bound into task frames.
KIND_TASK = b"task"
#: The kind bound into every other frame (results, control, plain kombu).
KIND_MESSAGE = b"message"

_PREFIX = b"signedqueue.kombu/1"
#: Task codecs kept per serializer; past this many task names the cache is
#: cleared (names come from registered tasks, so it is rarely reached).
_MAX_CACHED_TASKS = 4096

#: The body object of the task message being published in this thread or
#: task, with its task name: set by the publish hook, read by the encoder.
_pending_task: contextvars.ContextVar[tuple[object, str] | None] = contextvars.ContextVar(
    "signedqueue_pending_task", default=None
)
#: The task name the message being decoded in this thread names: set by the
#: worker-side hook, read by the decoder.
_expected_task: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "signedqueue_expected_task", default=None
)
#: The serializer :func:`register` last registered for each content type: the
#: one kombu's registry decodes that content type with.
_registered: dict[str, KombuSerializer] = {}


def _field(value: bytes) -> bytes:
    return len(value).to_bytes(4, "big") + value


def frame_context(content_type: str, base: bytes, kind: bytes, task_name: str = "") -> bytes:
    """
    The context bound into the tag of a frame of *kind* (``KIND_TASK`` or
    ``KIND_MESSAGE``) under *content_type*, for a codec whose own context is
    *base*.  Each field is length-prefixed, so no two inputs give the same
    bytes.
    """
    if kind not in (KIND_TASK, KIND_MESSAGE):
        raise ValueError("kind must be KIND_TASK or KIND_MESSAGE")
    if kind == KIND_MESSAGE and task_name:
        raise ValueError("message frames bind no task name")
    if kind == KIND_TASK and not task_name:
        raise ValueError("task frames need a task name")
    return (
        _PREFIX
        + _field(content_type.encode("utf-8"))
        + _field(bytes(base))
        + _field(kind)
        + _field(task_name.encode("utf-8"))
    )


def _is_task_body(obj: object) -> bool:
    """True for an ``(args, kwargs, embed)`` tuple as Celery's protocol 2 sends."""
    return (
        type(obj) is tuple
        and len(obj) == 3
        and isinstance(obj[0], (list, tuple))
        and isinstance(obj[1], dict)
        and (obj[2] is None or isinstance(obj[2], dict))
    )


class KombuSerializer:
    """
    Signs and verifies kombu message bodies with a codec.

    Usually made and registered by :func:`register`; made directly, it is not
    registered and serves to build or check frames by hand (e.g. to publish a
    Celery task from a process without Celery).

    Args:
        codec: Signs and verifies; its keyring, allowlist, ``max_age`` and
            context apply to every frame.
        name: The kombu serializer name.
        content_type: The content type its messages carry, bound into every
            tag.
    """

    def __init__(self, codec: Codec, *, name: str = NAME, content_type: str = CONTENT_TYPE) -> None:
        if not isinstance(codec, Codec):
            raise TypeError(f"codec must be a Codec, not {type(codec).__name__}")
        if not name or "/" in name:
            raise ValueError("name must be a non-empty serializer name without '/'")
        if "/" not in content_type:
            raise ValueError("content_type must be a MIME type, e.g. 'application/x-myapp'")
        self._codec = codec
        self._name = name
        self._content_type = content_type
        self._message_codec = codec.with_context(
            frame_context(content_type, codec.context, KIND_MESSAGE)
        )
        self._task_codecs: dict[str, Codec] = {}
        self._lock = threading.Lock()

    @property
    def codec(self) -> Codec:
        """The codec this serializer was made with."""
        return self._codec

    @property
    def name(self) -> str:
        """The kombu serializer name."""
        return self._name

    @property
    def content_type(self) -> str:
        """The content type of its messages."""
        return self._content_type

    def __repr__(self) -> str:
        return f"<KombuSerializer name={self._name!r} content_type={self._content_type!r}>"

    def task_codec(self, task_name: str) -> Codec:
        """The codec that seals and opens task frames for *task_name*."""
        codec = self._task_codecs.get(task_name)
        if codec is None:
            if not isinstance(task_name, str) or not task_name:
                raise ValueError("task_name must be a non-empty str")
            codec = self._codec.with_context(
                frame_context(self._content_type, self._codec.context, KIND_TASK, task_name)
            )
            with self._lock:
                if len(self._task_codecs) >= _MAX_CACHED_TASKS:
                    self._task_codecs.clear()
                self._task_codecs[task_name] = codec
        return codec

    # -- explicit kinds ----------------------------------------------------

    def dumps_message(self, obj: Any) -> bytes:
        """Seal *obj* as a message frame."""
        return self._message_codec.dumps(obj)

    def loads_message(self, frame: bytes | bytearray | memoryview) -> Any:
        """Verify a message frame and load it; raises a ``RejectedFrame``."""
        return self._message_codec.loads(frame)

    def dumps_task(self, body: Any, task_name: str) -> bytes:
        """Seal a Celery task body ``(args, kwargs, embed)`` for *task_name*."""
        if not _is_task_body(body):
            raise TypeError("a task body is an (args, kwargs, embed) tuple")
        return self.task_codec(task_name).dumps(body)

    def loads_task(self, frame: bytes | bytearray | memoryview, task_name: str) -> Any:
        """
        Verify a task frame sealed for *task_name* and load its body.

        Raises :class:`~signedqueue.InvalidSignature` for a frame sealed for
        another task or as a message, and :class:`~signedqueue.MalformedFrame`
        for a verified body that is not an ``(args, kwargs, embed)`` tuple.
        """
        codec = self.task_codec(task_name)
        body = codec.loads(frame)
        if not _is_task_body(body):
            exc = MalformedFrame(
                "task frame does not carry an (args, kwargs, embed) tuple",
                frame,
                key_id=codec.verify(frame).key_id,
            )
            logger.warning(
                "signedqueue: refused frame (MalformedFrame): %s [key id %s, %d bytes]",
                exc.reason,
                exc.key_id,
                len(exc.frame),
            )
            raise exc
        return body

    # -- what kombu calls --------------------------------------------------

    def dumps(self, obj: Any) -> bytes:
        """
        kombu's encoder: a task frame for the body of the task message being
        published (announced by the Celery publish hook), else a message
        frame.
        """
        pending = _pending_task.get()
        if pending is not None and pending[0] is obj:
            return self.dumps_task(obj, pending[1])
        return self._message_codec.dumps(obj)

    def loads(self, body: bytes | bytearray | memoryview | str) -> Any:
        """
        kombu's decoder: a task frame for the task the worker-side hook says
        the message names, else a message frame.
        """
        if isinstance(body, str):
            # Only a transport that decoded binary as text hands over str;
            # latin-1 gives the bytes back unchanged.
            body = body.encode("latin-1")
        expected = _expected_task.get()
        if expected is not None:
            return self.loads_task(body, expected)
        return self._message_codec.loads(body)


def register(
    codec: Codec, *, name: str = NAME, content_type: str = CONTENT_TYPE
) -> KombuSerializer:
    """
    Register a kombu serializer that signs with *codec* and return it.

    Producers then publish with ``serializer=name`` and consumers accept
    ``accept=[name]`` (or the content type).  kombu's registry is global to
    the process: registering the same *name* again replaces the codec.  Use
    another *name* and *content_type* for a second codec; the content type is
    bound into every tag, so their frames are not interchangeable.
    """
    serializer = KombuSerializer(codec, name=name, content_type=content_type)
    serialization.register(  # type: ignore[no-untyped-call]
        name,
        serializer.dumps,
        serializer.loads,
        content_type=content_type,
        content_encoding="binary",
    )
    _registered[content_type] = serializer
    return serializer


def _registered_serializer(content_type: str) -> KombuSerializer | None:
    """The serializer :func:`register` last registered for *content_type*."""
    return _registered.get(content_type)


def rejected_cause(exc: BaseException) -> RejectedFrame | None:
    """
    The :class:`~signedqueue.RejectedFrame` behind *exc*, which kombu wraps in
    ``kombu.exceptions.DecodeError``; ``None`` if there is none.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, RejectedFrame):
            return current
        seen.add(id(current))
        inner = current.args[0] if current.args else None
        current = (
            inner if isinstance(inner, BaseException) else current.__cause__ or current.__context__
        )
    return None
