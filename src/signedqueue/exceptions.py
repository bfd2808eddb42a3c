"""
Exceptions raised by signedqueue.

The tree::

    SignedQueueError            base class; never raised directly
    ├── KeyringError            a keyring cannot be loaded (invalid, unset,
    │                           readable by others) or changed that way
    ├── TransportError          a broker operation failed (also a
    │   │                       ConnectionError); nothing was lost
    │   └── BrokerUnavailable   the broker did not answer within the
    │                           configured timeout
    ├── ReplayGuardUnavailable  the replay guard's store (Redis, SQLite)
    │                           failed: the frame was not accepted (also a
    │                           ConnectionError)
    └── RejectedFrame           an incoming frame was refused (.frame, .reason)
        ├── FrameTooLarge       larger than max_frame_size; nothing was hashed
        ├── MalformedFrame      not a well-formed v1 frame, or a payload the
        │                       deserializer cannot read
        ├── UnknownKey          signed with a key id the keyring does not hold
        ├── InvalidSignature    the tag does not match: tampered or wrong key
        ├── ExpiredFrame        older than max_age, or dated in the future
        ├── ReplayedFrame       a frame already accepted within the replay
        │   │                   window (codec built with replay_guard=)
        │   └── ReplayGuardFull the replay guard is full: the frame could
        │                       not be remembered, so it is refused
        └── ForbiddenClass      a verified payload names a global or class
                                the policy refuses, or changes one it named

Every ``RejectedFrame`` carries the raw frame as ``.frame`` and a short reason
as ``.reason``.  Neither ``str()`` nor ``repr()`` of an exception ever contains
key material or frame bytes, so exceptions are safe to log.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "BrokerUnavailable",
    "ExpiredFrame",
    "ForbiddenClass",
    "FrameTooLarge",
    "InvalidSignature",
    "KeyringError",
    "MalformedFrame",
    "RejectedFrame",
    "ReplayGuardFull",
    "ReplayGuardUnavailable",
    "ReplayedFrame",
    "SignedQueueError",
    "TransportError",
    "UnknownKey",
]


class SignedQueueError(Exception):
    """
    Superclass of every signedqueue exception.  Never raised directly.
    """


class KeyringError(SignedQueueError, ValueError):
    """
    A keyring could not be loaded or changed: the document or directory is
    not a valid keyring, the environment variable is unset or empty, the file
    grants permissions to group or others, or the change would break the
    fleet (retiring the active key, two active keys).  (A file that cannot be
    opened raises the usual ``OSError``; an unknown key id, ``KeyError``.)
    """


class TransportError(SignedQueueError, ConnectionError):
    """
    A broker transport (Redis, RabbitMQ) could not complete an operation.

    The message says what was being done and whether the frame may already
    have reached the broker (a put whose reply was lost), so the caller can
    decide to retry.  It never contains frame bytes or key material.  Also a
    ``ConnectionError``, so existing ``except ConnectionError`` handlers see
    it.
    """


class BrokerUnavailable(TransportError):
    """
    The broker could not be reached, or did not answer, within the configured
    timeout.  Nothing was sent.
    """


class RejectedFrame(SignedQueueError):
    """
    An incoming frame was refused.  The superclass of every refusal.

    Attributes:
        frame: The raw frame as received (``bytes``).  It is never part of the
            message.  For :class:`FrameTooLarge` it holds only the first 4096
            bytes: an oversized frame is never copied whole.
        reason: A short, fixed-vocabulary description of the refusal, safe to
            log.
        key_id: The key id named by the frame header, when it could be
            parsed, else ``None``.
    """

    def __init__(
        self,
        reason: str,
        frame: bytes | bytearray | memoryview = b"",
        *,
        key_id: str | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.frame = bytes(frame)
        self.key_id = key_id

    def __str__(self) -> str:
        return self.reason

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reason!r})"

    def __reduce__(self) -> tuple[object, ...]:
        # Keep .frame and .key_id across pickling (e.g. from a pool worker),
        # without putting the frame into args (args end up in repr()).
        return (
            _rebuild,
            (type(self), self.reason, self.frame, self.key_id, self.__dict__),
        )


def _rebuild(
    cls: type[RejectedFrame],
    reason: str,
    frame: bytes,
    key_id: str | None,
    state: dict[str, object],
) -> RejectedFrame:
    exc = cls.__new__(cls)
    Exception.__init__(exc, reason)
    exc.__dict__.update(state)
    exc.reason, exc.frame, exc.key_id = reason, frame, key_id
    return exc


class FrameTooLarge(RejectedFrame):
    """
    The frame is larger than the codec's ``max_frame_size``.

    Raised before any byte is hashed or parsed.  ``.size`` is the declared or
    actual size in bytes and ``.limit`` the limit in force.
    """

    def __init__(
        self,
        reason: str,
        frame: bytes | bytearray | memoryview = b"",
        *,
        size: int,
        limit: int,
        key_id: str | None = None,
    ) -> None:
        super().__init__(reason, frame, key_id=key_id)
        self.size = size
        self.limit = limit


class MalformedFrame(RejectedFrame):
    """
    The bytes are not a well-formed frame (bad magic, unknown version or
    algorithm, bad lengths, trailing bytes), or a verified payload could not be
    deserialized.
    """


class UnknownKey(RejectedFrame):
    """
    The frame names a key id that the keyring does not hold (never issued, or
    already retired).  The message names the unknown id and the ids the ring
    knows: ids only, never secrets.
    """


class InvalidSignature(RejectedFrame):
    """
    The tag does not match the frame: it was altered, signed with another key
    under the same id, or sealed under a different ``context``.
    """


class ExpiredFrame(RejectedFrame):
    """
    The frame's creation time is older than ``max_age``, or further in the
    future than the allowed clock skew.  ``.age`` is the age in seconds
    (negative for a frame from the future).
    """

    def __init__(
        self,
        reason: str,
        frame: bytes | bytearray | memoryview = b"",
        *,
        age: float,
        key_id: str | None = None,
    ) -> None:
        super().__init__(reason, frame, key_id=key_id)
        self.age = age


class ReplayedFrame(RejectedFrame):
    """
    A frame with this key id and nonce was already accepted within the replay
    window (raised by a codec built with ``replay_guard=``; see
    docs/how-to/replay-protection.md).

    Raised after the tag and age checks and before anything is deserialized,
    so the frame is authentic: someone delivered it again.  In a
    :class:`~signedqueue.transports.redis.RedisQueue` it is also raised for a
    frame that another live consumer is processing.
    """


class ReplayGuardFull(ReplayedFrame):
    """
    The replay guard holds its maximum number of remembered frames (none of
    them expired), so this frame could not be remembered and is refused
    rather than risk accepting it twice (fail closed).  Raise the guard's
    ``max_entries`` or lower ``max_age``.
    """


class ReplayGuardUnavailable(SignedQueueError, ConnectionError):
    """
    The replay guard's store (Redis for ``RedisReplayGuard``, the SQLite file
    for ``FileReplayGuard``) could not be read or written, so a verified frame
    could not be checked for replay and was not returned (fail closed).  The
    original error is chained as ``__cause__``; the message never contains
    frame bytes or key material.  A :class:`RedisQueue` leaves the frame in
    its processing list, so it is delivered again.
    """


class ForbiddenClass(RejectedFrame):
    """
    A verified payload names a global (pickle) or class (msgpack) that the
    policy refuses, or tried to change a class or function it named.  Nothing
    refused was called.

    Attributes:
        names: Every refused global as ``"module.qualname"``.
        allow_entries: For each refused global, the exact ``allow=`` entry that
            would admit it, or ``None`` when it is refused even if allowlisted.
    """

    def __init__(
        self,
        reason: str,
        frame: bytes | bytearray | memoryview = b"",
        *,
        names: Sequence[str] = (),
        allow_entries: Sequence[str | None] = (),
        key_id: str | None = None,
    ) -> None:
        super().__init__(reason, frame, key_id=key_id)
        self.names = tuple(names)
        self.allow_entries = tuple(allow_entries)
