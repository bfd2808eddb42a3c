"""
A reliable work queue on Redis lists: :class:`RedisQueue` and, for asyncio,
:class:`AsyncRedisQueue` (extra ``redis``; Redis 6.2 or later).

Delivery is at least once.  ``get()`` moves the next frame atomically
(``BLMOVE``) from the queue's ready list to a processing list of its own
consumer, where the frame stays until it is acknowledged.  Each consumer
keeps an *alive* key that expires after the visibility timeout unless it is
refreshed; once a consumer's alive key is gone, any other consumer moves its
processing list back to the ready list (one Lua script, so atomically), and
its frames are delivered again.

A frame that is refused (unsigned, tampered, for another queue, a class the
allowlist refuses, ...) is moved atomically from the processing list to the
queue's dead-letter list, as a record that says why, and ``get()`` raises the
:class:`RejectedFrame`.  Nothing is silently dropped, and the next ``get()``
returns the next frame.

The queue's name is bound into the context of every tag by default, so a
frame copied from one queue into another is refused.

With a codec built with ``replay_guard=``, each frame taken is held in the
guard for its consumer until the consumer's alive key would expire (renewed
with it), marked done on ``ack()`` and forgotten on ``nack()``, dead-lettering
and ``close()``: a frame redelivered after its consumer died is accepted, a
copy of a frame being processed or acknowledged is refused as
:class:`~signedqueue.ReplayedFrame` (see docs/how-to/replay-protection.md).

Everything that is not I/O (key names, scripts, the bound context, the
dead-letter records, the bookkeeping of frames held, the retry policy) lives
in :class:`_Core`, shared by the two classes; they differ only in how they
call Redis.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import queue
import secrets
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn, cast

import msgpack
import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, AuthorizationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from .._codec import Buffer, Codec
from ..exceptions import (
    BrokerUnavailable,
    RejectedFrame,
    ReplayedFrame,
    ReplayGuardUnavailable,
    TransportError,
)

__all__ = [
    "CONTEXT_LABEL",
    "AsyncDelivery",
    "AsyncRedisQueue",
    "DeadLetter",
    "Delivery",
    "RedisQueue",
    "bound_context",
    "queue_keys",
]

logger = logging.getLogger("signedqueue")

#: The transport's label in the bound context (see :func:`bound_context`).
CONTEXT_LABEL = b"signedqueue.transports.redis/v1"
#: The reason of a dead letter made by ``nack(requeue=False)``.
NACKED = "nacked"
#: The reason of a dead letter whose frame verified but could not be loaded
#: (its ``error`` is the class name of the exception ``loads`` raised).
LOAD_FAILED = "the frame verified, but loading its payload raised an exception"
#: Longest a single blocking BLMOVE waits, so that heartbeats and recovery
#: run while a consumer waits.
_MAX_SLICE = 1.0
#: Queue names and consumer ids are at most this many characters.
_MAX_NAME = 200

_ConnErrors = (RedisConnectionError, RedisTimeoutError)

# -- Lua scripts (atomic on the server) --------------------------------------


def _move_script(push: str, value: str) -> str:
    """
    A script that removes ``ARGV[1]`` from list ``KEYS[1]`` and, only if it
    was there (so a retry cannot move it twice), pushes *value* onto list
    ``KEYS[2]`` with *push*.
    """
    return f"""
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('{push}', KEYS[2], {value})
  return 1
end
return 0
"""


#: KEYS: processing, ready.  ARGV: frame.  Back to the consumers' end of ready.
_REQUEUE = _move_script("RPUSH", "ARGV[1]")
#: KEYS: processing, dead.  ARGV: frame, record prefix.  The record is the
#: prefix followed by the frame (see _Core.dead_record).
_DEAD_LETTER = _move_script("LPUSH", "ARGV[2] .. ARGV[1]")
#: KEYS: dead, ready.  ARGV: record, frame.  Back to the producers' end of ready.
_FROM_DEAD = _move_script("LPUSH", "ARGV[2]")

#: KEYS: consumers, ready, then (alive, processing) per consumer.  ARGV:
#: force ("1" or "0"), then the consumer ids.  Each consumer whose alive key
#: is gone (or every one, with force) has its processing list moved back to
#: the consumers' end of ready, oldest frame first, and is unregistered.  A
#: member whose processing key is not a list (this module never writes one:
#: a forged entry) is unregistered and its key left alone.  Returns
#: {frames moved, members skipped}.
_RECOVER = """
local moved, skipped = 0, 0
for i = 2, #ARGV do
  local alive = KEYS[2 * i - 1]
  local processing = KEYS[2 * i]
  local kind = redis.call('TYPE', processing)['ok']
  if kind ~= 'list' and kind ~= 'none' then
    redis.call('SREM', KEYS[1], ARGV[i])
    skipped = skipped + 1
  elseif ARGV[1] == '1' or redis.call('EXISTS', alive) == 0 then
    while redis.call('LMOVE', processing, KEYS[2], 'LEFT', 'RIGHT') do
      moved = moved + 1
    end
    redis.call('DEL', alive)
    redis.call('SREM', KEYS[1], ARGV[i])
  end
end
return {moved, skipped}
"""

#: KEYS: dead.  Empties it; returns how many records it held.
_PURGE = """
local n = redis.call('LLEN', KEYS[1])
redis.call('DEL', KEYS[1])
return n
"""

_SCRIPTS = {
    "requeue": _REQUEUE,
    "dead_letter": _DEAD_LETTER,
    "recover": _RECOVER,
    "from_dead": _FROM_DEAD,
    "purge": _PURGE,
}


def bound_context(context: bytes, name: str) -> bytes:
    """
    The context a queue named *name* binds into its tags, for a codec whose
    own context is *context*.

    Three fields, each preceded by its length as a 4-byte big-endian
    unsigned integer: :data:`CONTEXT_LABEL`, *context*, and *name* encoded as
    UTF-8.  No two (context, name) pairs give the same bytes.
    """
    fields = (CONTEXT_LABEL, bytes(context), name.encode("utf-8"))
    return b"".join(len(f).to_bytes(4, "big") + f for f in fields)


def queue_keys(name: str) -> dict[str, str]:
    """
    The Redis keys of the queue named *name* (``processing`` and ``alive``
    are prefixes: the consumer id follows them).

    The name is a hash tag (between braces), so every key of a queue lies in
    one Redis Cluster slot.
    """
    _check_name(name, "queue name")
    if "{" in name or "}" in name:
        raise ValueError("a queue name must not contain '{' or '}'")
    base = f"signedqueue:{{{name}}}:"
    return {
        "ready": base + "ready",
        "processing": base + "processing:",
        "alive": base + "alive:",
        "consumers": base + "consumers",
        "dead": base + "dead",
    }


def _check_name(value: object, what: str) -> None:
    if not isinstance(value, str):
        raise TypeError(f"the {what} must be a str, not {type(value).__name__}")
    if not value or len(value) > _MAX_NAME or not value.isprintable():
        raise ValueError(
            f"the {what} must be 1 to {_MAX_NAME} printable characters, got {value!r}"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"the {what} must be encodable as UTF-8") from None


def _default_consumer() -> str:
    host = "".join(c for c in socket.gethostname() if c.isprintable() and c not in "{} ")
    return f"{host[:100] or 'host'}-{os.getpid()}-{secrets.token_hex(4)}"


# -- what get() returns ------------------------------------------------------


class _BaseDelivery:
    __slots__ = ("_state", "frame", "value")

    def __init__(self, value: Any, frame: bytes) -> None:
        #: The object the frame carries, verified and loaded.
        self.value = value
        #: The frame as received (never part of the repr).
        self.frame = frame
        self._state = "pending"

    @property
    def settled(self) -> bool:
        """True once acknowledged or nacked."""
        return self._state != "pending"


class Delivery(_BaseDelivery):
    """
    A frame taken by :meth:`RedisQueue.get`: ``.value`` is the object, and
    the frame stays in the consumer's processing list until :meth:`ack`.
    """

    __slots__ = ("queue",)

    def __init__(self, value: Any, frame: bytes, queue: RedisQueue) -> None:
        super().__init__(value, frame)
        #: The queue it came from.
        self.queue = queue

    def ack(self) -> None:
        """``queue.ack(self)``."""
        self.queue.ack(self)

    def nack(self, requeue: bool = True) -> None:
        """``queue.nack(self, requeue)``."""
        self.queue.nack(self, requeue)

    def __repr__(self) -> str:
        return f"<Delivery from {self.queue.name!r} {self._state} {len(self.frame)} bytes>"


class AsyncDelivery(_BaseDelivery):
    """What :meth:`AsyncRedisQueue.get` returns: a :class:`Delivery` whose
    ``ack()`` and ``nack()`` are coroutines."""

    __slots__ = ("queue",)

    def __init__(self, value: Any, frame: bytes, queue: AsyncRedisQueue) -> None:
        super().__init__(value, frame)
        #: The queue it came from.
        self.queue = queue

    async def ack(self) -> None:
        """``await queue.ack(self)``."""
        await self.queue.ack(self)

    async def nack(self, requeue: bool = True) -> None:
        """``await queue.nack(self, requeue)``."""
        await self.queue.nack(self, requeue)

    def __repr__(self) -> str:
        return f"<AsyncDelivery from {self.queue.name!r} {self._state} {len(self.frame)} bytes>"


@dataclass(frozen=True)
class DeadLetter:
    """
    A record of the dead-letter list: a refused or nacked frame and why.

    The record is a msgpack map with these keys, in this order: ``reason``,
    ``error``, ``queue``, ``consumer``, ``time``, ``frame``.
    """

    #: Why: the refusal's ``.reason``, or ``"nacked"``.
    reason: str
    #: The class name of the refusal (``"InvalidSignature"``, ...) or of
    #: the exception loading raised (reason :data:`LOAD_FAILED`), or
    #: ``"nacked"``; ``"unreadable"`` for an entry that is not such a record.
    error: str
    #: The queue the frame was taken from.
    queue: str
    #: The consumer that refused or nacked it.
    consumer: str
    #: When, in Unix seconds.
    time: float
    #: The frame, whole (never part of the repr).
    frame: bytes = field(repr=False)
    #: The record as stored, to find it again in the list.
    record: bytes = field(repr=False, compare=False)


# -- shared logic ------------------------------------------------------------


class _Attempts:
    """Retries of one operation on connection errors, within one timeout."""

    __slots__ = ("deadline", "failures")

    def __init__(self, timeout: float) -> None:
        self.deadline = time.monotonic() + timeout
        self.failures = 0


class _Core:
    """Everything of a queue that is not I/O, shared by both classes."""

    def __init__(
        self,
        name: str,
        codec: Codec,
        *,
        consumer: str | None,
        visibility_timeout: float,
        timeout: float,
        bind_name: bool,
        where: str,
    ) -> None:
        if not isinstance(codec, Codec):
            raise TypeError(f"codec must be a signedqueue.Codec, not {type(codec).__name__}")
        self.keys = queue_keys(name)
        consumer = _default_consumer() if consumer is None else consumer
        _check_name(consumer, "consumer id")
        for what, value in (("visibility_timeout", visibility_timeout), ("timeout", timeout)):
            if not isinstance(value, (int, float)) or not 0 < value < 1e9:
                raise ValueError(f"{what} must be a positive, finite number of seconds")
        self.name = name
        self.consumer = consumer
        self.codec = codec.with_context(bound_context(codec.context, name)) if bind_name else codec
        self.visibility_timeout = float(visibility_timeout)
        # Replay protection (a codec with replay_guard=): a frame is held
        # in the guard for this consumer until its alive key would expire
        # (renewed by every touch), marked done on ack, forgotten on nack,
        # dead-lettering and close; see docs/how-to/replay-protection.md.
        self.guard = self.codec.replay_guard
        self.claims: dict[bytes, tuple[bytes, float]] = {}
        self.lease_until = -float("inf")
        if self.guard is not None:
            if not callable(getattr(self.guard, "update", None)):
                raise TypeError(
                    f"the codec's replay guard ({type(self.guard).__name__}) has no "
                    "update() method, which a RedisQueue needs to hold frames while "
                    "they are processed (see the ReplayGuard protocol)"
                )
            self.codec = self.codec._claiming(consumer, lambda: self.lease_until)
        self.timeout = float(timeout)
        self.where = where
        self.ready = self.keys["ready"]
        self.dead = self.keys["dead"]
        self.consumers = self.keys["consumers"]
        self.processing = self.processing_of(consumer)
        self.alive = self.alive_of(consumer)
        # Frames in this consumer's processing list that this object holds
        # (delivered and not settled, or waiting in `pending`), as a multiset.
        self.held: collections.Counter[bytes] = collections.Counter()
        # Frames found in the processing list that nobody here held (a
        # BLMOVE whose reply was lost, or an earlier consumer with this id),
        # delivered before anything new.
        self.pending: collections.deque[bytes] = collections.deque()
        # Reconcile the processing list with `held` before the next take:
        # at the first get() and after every connection error in one.
        self.suspect = True
        # Frames settled while the processing list was being read: the
        # snapshot may still show them, and they must not count as found.
        self.listing = False
        self.gone: collections.Counter[bytes] = collections.Counter()
        self.lock = threading.Lock()
        self.registered = False
        self.closed = False
        self.pid = os.getpid()
        self.touched = -float("inf")
        self.recovered = -float("inf")
        self.touch_every = self.visibility_timeout / 4
        self.recover_every = min(max(self.visibility_timeout / 2, 0.05), 5.0)
        # Longest close() waits for a get() in another thread or task to
        # notice it: a blocking slice, a retry of the timeout, a margin.
        self.close_wait = self.timeout + 2 * _MAX_SLICE

    def processing_of(self, consumer: str) -> str:
        return self.keys["processing"] + consumer

    # -- replay guard

    def start_touch(self) -> None:
        """Before the alive key is set: renew the leases of held frames
        (so they never outlive the alive key)."""
        if self.guard is None:
            return
        self.lease_until = until = self.codec._clock() + self.visibility_timeout
        try:
            for key, expires_at in list(self.claims.values()):
                self.guard.update(key, self.consumer, min(until, expires_at), done=False)
        except ReplayGuardUnavailable as exc:
            # The alive key is refreshed all the same: failing here would
            # have other consumers process these frames a second time.
            # The leases may lapse; ack() still marks a lapsed frame done.
            logger.warning(
                "signedqueue: Redis queue %r: could not renew the replay guard's "
                "hold on %d frame(s) being processed: %s", self.name, len(self.claims), exc,
            )

    def check_not_held(self, frame: bytes) -> None:
        """Before loads(): a copy of a frame this consumer is processing is a
        replay (the guard would accept it: it is held by this same owner,
        which it allows for a frame found again in its own processing list)."""
        self.codec._last_replay = None
        if frame in self.claims:
            raise self.codec._refused(
                ReplayedFrame(
                    "frame is a copy of one this consumer is processing: refused "
                    "as a replay"
                ),
                frame,
            )

    def claimed(self, frame: bytes) -> None:
        """*frame* was accepted: keep its replay key while it is held."""
        claim = self.codec._last_replay
        if claim is not None:
            self.codec._last_replay = None
            self.claims[frame] = claim

    def unclaim_refused(self) -> None:
        """loads() raised after the guard accepted the frame (it could not
        be deserialized): forget it, so a requeued dead letter is accepted."""
        claim = self.codec._last_replay
        self.codec._last_replay = None
        if claim is not None and self.guard is not None:
            try:
                self.guard.update(claim[0], self.consumer, 0.0, done=False)
            except ReplayGuardUnavailable as exc:
                logger.warning("signedqueue: Redis queue %r: %s", self.name, exc)

    def settle_claim(self, frame: bytes, done: bool) -> None:
        """Mark *frame* done in the guard until its window ends (ack), or
        forget it (nack, close).  Raises ReplayGuardUnavailable."""
        claim = self.claims.get(frame)
        if claim is None or self.guard is None:
            return
        key, expires_at = claim
        self.guard.update(key, self.consumer, expires_at if done else 0.0, done=done)
        self.claims.pop(frame, None)

    def forget_claims(self) -> None:
        """At close, before this consumer's frames are put back."""
        for frame in list(self.claims):
            try:
                self.settle_claim(frame, done=False)
            except ReplayGuardUnavailable as exc:
                logger.warning(
                    "signedqueue: Redis queue %r: %s; frames put back on close are "
                    "refused as replays (and dead-lettered) until their lease ends "
                    "(visibility timeout %g s)", self.name, exc, self.visibility_timeout,
                )
                return

    def alive_of(self, consumer: str) -> str:
        return self.keys["alive"] + consumer

    def describe(self, kind: str) -> str:
        return (
            f"<{kind} {self.name!r} consumer={self.consumer!r} at {self.where} "
            f"codec={self.codec!r}>"
        )

    # -- state checks

    def closed_error(self) -> ValueError:
        return ValueError(f"Redis queue {self.name!r} is closed")

    def check_usable(self) -> None:
        if self.closed:
            raise self.closed_error()
        if os.getpid() != self.pid:
            raise RuntimeError(
                f"Redis queue {self.name!r} was created in process {self.pid}: "
                "make a new RedisQueue in each process (each needs its own "
                "consumer id and connections)"
            )

    # -- timing

    def deadline(self, timeout: float | None) -> float | None:
        if timeout is None:
            return None
        if timeout < 0:
            raise ValueError("timeout must be >= 0 or None")
        return time.monotonic() + timeout

    def slice(self, deadline: float | None, socket_timeout: float | None) -> float:
        """Seconds the next BLMOVE may block; 0 for a non-blocking LMOVE."""
        longest = min(_MAX_SLICE, self.touch_every)
        if socket_timeout is not None:
            longest = min(longest, socket_timeout / 2)
        if deadline is None:
            return max(longest, 0.01)
        left = deadline - time.monotonic()
        return 0.0 if left < 0.01 else min(left, longest)

    def touch_due(self) -> bool:
        return time.monotonic() - self.touched >= self.touch_every

    def recover_due(self) -> bool:
        return time.monotonic() - self.recovered >= self.recover_every

    # -- frames held

    def hold(self, frame: bytes) -> None:
        with self.lock:
            self.held[frame] += 1

    def release(self, frame: bytes) -> None:
        """*frame* was settled (it left the processing list)."""
        with self.lock:
            self.held[frame] -= 1
            if self.held[frame] <= 0:
                del self.held[frame]
            if self.listing:
                self.gone[frame] += 1

    @contextlib.contextmanager
    def in_flight(self) -> Iterator[None]:
        """Around a command that may move a frame into the processing list
        and the holding of what it returns: if it is interrupted (a
        connection error, a cancelled task, KeyboardInterrupt), the frame
        may be there unheld, so the next take reconciles first."""
        try:
            yield
        except BaseException:
            self.suspect = True
            raise

    def drop(self, frame: bytes) -> None:
        """*frame* was taken and held, but will not be handed over (get()
        was interrupted): the next take finds it again and delivers it."""
        self.release(frame)
        self.suspect = True

    def start_listing(self) -> None:
        """The processing list is about to be read for :meth:`reconcile`."""
        with self.lock:
            self.listing = True
            self.gone.clear()

    def reconcile(self, listed: list[bytes]) -> None:
        """Queue for delivery the frames of *listed* (the processing list,
        newest first, read after :meth:`start_listing`) that this object
        does not hold, oldest first."""
        with self.lock:
            # A frame settled (by another thread or task) after the list was
            # read is still in it: it counts as held, or it would be
            # delivered again after its ack.
            have = self.held + self.gone
            self.listing = False
            self.gone.clear()
            found = []
            for frame in reversed(listed):
                if have[frame] > 0:
                    have[frame] -= 1
                else:
                    found.append(frame)
                    self.held[frame] += 1
            self.pending.extend(found)
            self.suspect = False
        if found:
            logger.info(
                "signedqueue: Redis queue %r: %d frame(s) in the processing list of "
                "consumer %r were not held here; delivering them again",
                self.name, len(found), self.consumer,
            )

    def recovery(
        self, members: Any, force: bool, own: bool
    ) -> tuple[list[str], list[str]] | None:
        """The keys and arguments of the recovery script for the consumers
        *members* (this one only if *own*, else all others), or None."""
        names = sorted(
            m.decode("utf-8", "replace") if isinstance(m, bytes) else str(m) for m in members
        )
        names = [c for c in names if (c == self.consumer) == own]
        if not names:
            return None
        keys = [self.consumers, self.ready]
        for c in names:
            keys += [self.alive_of(c), self.processing_of(c)]
        return keys, ["1" if force else "0", *names]

    def recovered_count(self, reply: Any, own: bool) -> int:
        """The frames moved, from the recovery script's *reply* (logged)."""
        moved, skipped = (int(n) for n in reply)
        if skipped:
            logger.warning(
                "signedqueue: Redis queue %r: unregistered %d member(s) of the consumers "
                "set whose processing key is not a list (not written by signedqueue)",
                self.name, skipped,
            )
        self.log_recovered(moved, own)
        return moved

    def bury_failed(self, error: TransportError) -> None:
        logger.error(
            "signedqueue: Redis queue %r: could not move a refused frame to the "
            "dead-letter list (%s); it stays in the processing list and is "
            "looked at again by the next get()", self.name, error,
        )

    def give_back_failed(self, error: TransportError) -> None:
        logger.warning(
            "signedqueue: Redis queue %r: could not put back a frame taken while the "
            "queue was closing (%s); close() puts it back", self.name, error,
        )

    def close_wait_failed(self) -> None:
        logger.warning(
            "signedqueue: Redis queue %r: a get() still running after %g s; closing "
            "anyway", self.name, self.close_wait,
        )

    def close_recovery_failed(self, error: TransportError) -> None:
        logger.warning(
            "signedqueue: Redis queue %r: could not put back unacknowledged frames "
            "on close (%s); they return after the visibility timeout", self.name, error,
        )

    def recovery_failed(self, exc: Exception) -> None:
        """A recovery pass inside get() failed: logged, and get() goes on."""
        logger.warning(
            "signedqueue: Redis queue %r: recovering the frames of stopped consumers "
            "failed (%s: %s); trying again in %g s",
            self.name, type(exc).__name__, exc, self.recover_every,
        )

    def log_recovered(self, moved: int, own: bool) -> None:
        if moved and own:
            logger.info(
                "signedqueue: Redis queue %r: consumer %r put back %d unacknowledged "
                "frame(s) on close", self.name, self.consumer, moved,
            )
        elif moved:
            logger.warning(
                "signedqueue: Redis queue %r: %d frame(s) of consumers that stopped "
                "(visibility timeout %g s) were put back to be delivered again",
                self.name, moved, self.visibility_timeout,
            )

    def settle(self, delivery: _BaseDelivery, queue: object, state: str) -> bool:
        """Check *delivery* may be settled as *state*; False if already acked."""
        if getattr(delivery, "queue", None) is not queue:
            raise ValueError("this delivery did not come from this queue")
        if delivery._state == "acked" and state == "acked":
            return False
        if delivery._state != "pending":
            raise ValueError(f"this delivery was already {delivery._state}")
        return True

    # -- frames taken

    def acked(self, delivery: _BaseDelivery, removed: int, attempts: _Attempts) -> None:
        """Record an ack whose LREM removed *removed* frames."""
        delivery._state = "acked"
        self.release(delivery.frame)
        # (After a retry, 0 may mean that the first attempt removed it.)
        if not removed and not attempts.failures:
            logger.warning(
                "signedqueue: Redis queue %r: an acknowledged frame was no longer in "
                "the processing list of consumer %r: it was put back after the "
                "visibility timeout (%g s) and may be processed twice; raise "
                "visibility_timeout or turn heartbeat on",
                self.name, self.consumer, self.visibility_timeout,
            )

    def as_frame(self, value: object) -> bytes:
        if isinstance(value, bytes):
            return value
        # A client with decode_responses=True is refused at construction;
        # anything else from a list is a bulk string.
        raise TransportError(
            f"Redis returned a {type(value).__name__} from list {self.ready!r}; "
            "use a client with decode_responses=False"
        )

    def dead_record(self, exc: Exception | None, frame: bytes) -> bytes:
        """The record prefix for *frame* (refused with *exc*, or that could
        not be loaded; nacked if None): the record is prefix + frame."""
        if exc is None:
            reason = error = NACKED
        else:
            # Not str(exc) of a load failure: it may quote the payload.
            reason = exc.reason if isinstance(exc, RejectedFrame) else LOAD_FAILED
            error = type(exc).__name__
        packed = bytes(msgpack.packb(
            {
                "reason": reason,
                "error": error,
                "queue": self.name,
                "consumer": self.consumer,
                "time": time.time(),
                "frame": frame,
            },
            use_bin_type=True,
        ))
        return packed[: len(packed) - len(frame)]

    def dead_letter(self, record: object) -> DeadLetter:
        raw = record if isinstance(record, bytes) else str(record).encode()
        try:
            data = msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=False)
            fields = (
                str(data["reason"]), str(data["error"]), str(data["queue"]),
                str(data["consumer"]), float(data["time"]), data["frame"],
            )
            if not isinstance(fields[5], bytes):
                raise TypeError("frame")
        except Exception:  # anything that is not a record is kept as it is
            return DeadLetter(
                "not a dead-letter record", "unreadable", self.name, "", 0.0, raw, raw
            )
        return DeadLetter(*fields, record=raw)

    # -- errors

    def retry_delay(self, attempts: _Attempts, op: str, exc: Exception) -> float:
        """After connection error *exc*: seconds to wait before retrying
        *op*, or the error to raise when the timeout is spent."""
        if isinstance(exc, (AuthenticationError, AuthorizationError)):
            raise TransportError(
                f"could not {op} on Redis queue {self.name!r}: Redis at {self.where} "
                f"refused the credentials ({type(exc).__name__}: {exc})"
            ) from exc
        attempts.failures += 1
        delay = min(0.02 * float(2**attempts.failures), 0.5)
        if time.monotonic() + delay < attempts.deadline:
            logger.debug(
                "signedqueue: Redis queue %r: %s failed (%s: %s); retrying",
                self.name, op, type(exc).__name__, exc,
            )
            return delay
        raise self.failed(op, exc) from exc

    def failed(self, op: str, exc: Exception) -> TransportError:
        detail = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, RedisTimeoutError) or "connecting to" in str(exc):
            return BrokerUnavailable(
                f"could not {op} on Redis queue {self.name!r}: Redis at {self.where} "
                f"did not answer within {self.timeout:g} s ({detail}); nothing was lost"
            )
        return TransportError(
            f"could not {op} on Redis queue {self.name!r}: the connection to Redis at "
            f"{self.where} failed for {self.timeout:g} s ({detail}); nothing was lost"
        )

    def unreachable_put(self, exc: Exception) -> BrokerUnavailable:
        return BrokerUnavailable(
            f"could not put to Redis queue {self.name!r}: Redis at {self.where} did "
            f"not answer within {self.timeout:g} s ({type(exc).__name__}: {exc}); "
            "nothing was sent"
        )

    def put_unknown(self, exc: Exception) -> TransportError:
        return TransportError(
            f"put to Redis queue {self.name!r} failed after the frame was sent to "
            f"Redis at {self.where} ({type(exc).__name__}: {exc}): it may or may not "
            "have been queued.  Putting it again may queue it twice; to retry "
            "safely, put the same frame again with put_frame() and let consumers "
            "skip a nonce they have seen (codec.verify(frame).nonce)"
        )

    def refused_by_redis(self, op: str, exc: ResponseError) -> TransportError:
        return TransportError(
            f"could not {op} on Redis queue {self.name!r}: Redis at {self.where} "
            f"answered with an error ({exc}); nothing was lost"
        )


def _where(kwargs: Mapping[str, Any]) -> str:
    if kwargs.get("path"):
        return f"unix:{kwargs['path']}"
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"


def _checked_client_kwargs(client: Any) -> dict[str, Any]:
    kwargs = dict(client.connection_pool.connection_kwargs)
    if kwargs.get("decode_responses"):
        raise ValueError(
            "the Redis client decodes responses (decode_responses=True), which "
            "would turn frames into str; use a client with decode_responses=False"
        )
    return kwargs


def _new_core(
    name: str,
    codec: Codec,
    *,
    consumer: str | None,
    visibility_timeout: float,
    timeout: float,
    bind_name: bool,
    client_options: Mapping[str, Any] | None,
) -> _Core:
    """Check every argument that is not the client, before a client is
    made (so a bad argument never leaves one behind)."""
    if client_options is not None and not isinstance(client_options, Mapping):
        raise TypeError("client_options must be a mapping of keyword arguments")
    # `where` is known once the client is: set by the caller.
    return _Core(
        name, codec, consumer=consumer, visibility_timeout=visibility_timeout,
        timeout=timeout, bind_name=bind_name, where="",
    )


def _socket_timeout(kwargs: Mapping[str, Any]) -> float | None:
    value = kwargs.get("socket_timeout")
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def _created_options(timeout: float, options: Mapping[str, Any] | None) -> dict[str, Any]:
    # No retries inside redis-py: this module retries what is safe to retry
    # (never a put whose command may have reached the server).
    return {
        "socket_connect_timeout": timeout,
        "socket_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
        **(options or {}),
    }


def _pool_wants_name() -> bool:
    # ConnectionPool.get_connection() takes no arguments from redis-py 5.3 on
    # (and warns when given some); before, the command name was required.
    try:
        major, minor = (int(p) for p in redis.__version__.split(".")[:2])
    except ValueError:  # pragma: no cover - an unusual version string
        return False
    return (major, minor) < (5, 3)


_POOL_WANTS_NAME = _pool_wants_name()


# -- the synchronous queue ---------------------------------------------------


class _QueueBase:
    """What the sync and asyncio queues share that does no I/O."""

    _core: _Core

    @property
    def name(self) -> str:
        """The queue's name."""
        return self._core.name

    @property
    def consumer(self) -> str:
        """This consumer's id."""
        return self._core.consumer

    @property
    def codec(self) -> Codec:
        """The codec frames are sealed and opened with (its context binds the
        queue's name unless ``bind_name=False``)."""
        return self._core.codec

    @property
    def keys(self) -> dict[str, str]:
        """The queue's keys (see :func:`queue_keys`)."""
        return dict(self._core.keys)

    def __repr__(self) -> str:
        return self._core.describe(type(self).__name__)


class RedisQueue(_QueueBase):
    """
    A reliable queue of signed frames on Redis, named *name*.

    ``put(obj)`` signs and queues; ``get(timeout)`` returns a
    :class:`Delivery` to ``ack()`` (done) or ``nack()`` (requeue or
    dead-letter).  Delivery is at least once: a frame leaves the consumer's
    processing list only when it is acknowledged, and the frames of a
    consumer that stopped refreshing its alive key for *visibility_timeout*
    seconds are delivered again.

    Args:
        name: The queue's name (printable, no braces): part of every key and,
            unless *bind_name* is false, of every tag.
        codec: Signs and verifies frames; its ``context`` is kept and the
            queue's name is bound after it (see :func:`bound_context`).
        client: A ``redis.Redis`` to use (not closed by :meth:`close`).  Its
            own timeouts and retry settings apply.
        url: Otherwise, a ``redis://`` URL to connect to; the client made for
            it uses *timeout* for connecting and every reply, does not retry
            on its own, and is closed by :meth:`close`.
        consumer: This consumer's id, unique among the live consumers of the
            queue (default: host name, process id and a random part).
        visibility_timeout: Seconds after which the frames of a consumer that
            has not called the queue (or :meth:`heartbeat`) are delivered
            again to others.  Longer than any one item takes to process,
            unless *heartbeat* is on.
        timeout: Seconds an operation may keep failing to reach Redis before
            it raises :class:`BrokerUnavailable` or :class:`TransportError`;
            also the connect and socket timeout of a client made from *url*.
        bind_name: Bind the queue's name into every tag (default).  With
            ``False`` a frame is valid in every queue that shares the codec.
        heartbeat: Refresh the alive key from a background thread every
            quarter of the visibility timeout, from the first ``get()`` until
            :meth:`close`, so that items may take longer to process than the
            visibility timeout.  A consumer that hangs then keeps its frames
            until its process ends.
        client_options: Extra keyword arguments for the client made from
            *url* (``password``, ``ssl``, ``client_name``, ...).

    Not for use across ``fork()``: make one queue per process.  ``put``,
    ``ack`` and ``nack`` may be called from any thread; ``get`` calls are
    serialized.
    """

    def __init__(
        self,
        name: str,
        codec: Codec,
        *,
        client: redis.Redis | None = None,
        url: str | None = None,
        consumer: str | None = None,
        visibility_timeout: float = 30.0,
        timeout: float = 5.0,
        bind_name: bool = True,
        heartbeat: bool = False,
        client_options: Mapping[str, Any] | None = None,
    ) -> None:
        if (client is None) == (url is None):
            raise ValueError(
                "pass either url='redis://host:6379/0' or client=redis.Redis(...)"
            )
        if client is not None and (
            not isinstance(client, redis.Redis) or isinstance(client, redis.asyncio.Redis)
        ):
            raise TypeError(
                f"client must be a redis.Redis, not {type(client).__name__} "
                "(use AsyncRedisQueue for redis.asyncio)"
            )
        core = _new_core(
            name, codec, consumer=consumer, visibility_timeout=visibility_timeout,
            timeout=timeout, bind_name=bind_name, client_options=client_options,
        )
        if client is None:
            client = redis.Redis.from_url(
                cast(str, url), **_created_options(timeout, client_options)
            )
            self._owns_client = True
        else:
            self._owns_client = False
        try:
            kwargs = _checked_client_kwargs(client)
        except BaseException:
            if self._owns_client:
                client.close()
            raise
        core.where = _where(kwargs)
        self._core = core
        self._client = client
        self._socket_timeout = _socket_timeout(kwargs)
        self._scripts = {k: client.register_script(v) for k, v in _SCRIPTS.items()}
        self._get_lock = threading.Lock()
        self._heartbeat = heartbeat
        self._beating: threading.Thread | None = None
        self._stop = threading.Event()

    # -- attributes

    @property
    def client(self) -> redis.Redis:
        """The Redis client."""
        return self._client

    def __enter__(self) -> RedisQueue:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- plumbing

    def _call(self, op: str, fn: Any, *args: Any, attempts: _Attempts | None = None) -> Any:
        """*fn(*args)*, retried on connection errors within the timeout."""
        attempts = _Attempts(self._core.timeout) if attempts is None else attempts
        while True:
            try:
                return fn(*args)
            except _ConnErrors as exc:
                time.sleep(self._core.retry_delay(attempts, op, exc))
            except ResponseError as exc:
                raise self._core.refused_by_redis(op, exc) from exc

    def _script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        return self._scripts[name](keys=keys, args=args)

    # -- producing

    def put(self, obj: Any) -> None:
        """
        Sign *obj* and queue it.  Serialization errors raise here.

        Raises :class:`BrokerUnavailable` if Redis could not be reached within
        the timeout (nothing was sent), and :class:`TransportError` if the
        connection failed after the frame was sent (it may or may not have
        been queued; see the message).  A put is never retried once sent.
        """
        self.put_frame(self._core.codec.dumps(obj))

    def put_frame(self, frame: Buffer) -> None:
        """
        Queue an already sealed frame as it is (to relay frames, or to retry a
        put with the same frame).  It is verified at ``get()`` like any other,
        so it must be sealed under this queue's :attr:`codec`.
        """
        self._core.check_usable()
        data = bytes(frame)
        pool: Any = self._client.connection_pool
        attempts = _Attempts(self._core.timeout)
        while True:
            try:
                conn: Any = (
                    pool.get_connection("LPUSH") if _POOL_WANTS_NAME else pool.get_connection()
                )
            except _ConnErrors as exc:
                try:
                    delay = self._core.retry_delay(attempts, "put", exc)
                except TransportError:
                    raise self._core.unreachable_put(exc) from exc
                time.sleep(delay)
                continue
            try:
                conn.send_command("LPUSH", self._core.ready, data)
                conn.read_response()
            except ResponseError as exc:
                raise self._core.refused_by_redis("put", exc) from exc
            except (*_ConnErrors, OSError) as exc:
                conn.disconnect()
                raise self._core.put_unknown(exc) from exc
            finally:
                pool.release(conn)
            return

    # -- consuming

    def get(self, timeout: float | None = None) -> Delivery:
        """
        Take the next frame, verify and load it, and return a
        :class:`Delivery` to acknowledge.

        Waits up to *timeout* seconds (``None``: until a frame arrives; ``0``:
        not at all) and raises ``queue.Empty`` if none does.  Frames found in
        this consumer's processing list that this object does not hold (a
        reply lost with its connection, or a previous consumer with this id)
        are returned first.  A refused frame
        is moved to the dead-letter list with its reason, and its
        :class:`RejectedFrame` is raised; the next call returns the next
        frame.  Connection errors are retried for ``timeout`` (the queue's)
        seconds, then raise :class:`BrokerUnavailable` or
        :class:`TransportError`.
        """
        core = self._core
        core.check_usable()
        deadline = core.deadline(timeout)
        with self._get_lock:
            frame = self._take(deadline)
            try:
                core.check_not_held(frame)
                value = core.codec.loads(frame)
            except ReplayGuardUnavailable:
                # Not checked: left in the processing list, delivered again.
                core.drop(frame)
                raise
            except Exception as exc:
                # Refused, or verified but not loadable: dead-lettered.
                core.unclaim_refused()
                self._bury(exc, frame)
                raise
            except BaseException:
                core.drop(frame)
                raise
            core.claimed(frame)
            return Delivery(value, frame, self)

    def get_nowait(self) -> Delivery:
        """``get(timeout=0)``."""
        return self.get(0)

    def _take(self, deadline: float | None) -> bytes:
        core = self._core
        attempts = _Attempts(core.timeout)
        while True:
            if core.closed:  # by close() in another thread
                raise core.closed_error()
            try:
                if core.touch_due() or not core.registered:
                    self._touch()
                if core.recover_due():
                    try:
                        self._recover(force=False)
                    except ResponseError as exc:
                        core.recovery_failed(exc)
                if core.suspect:
                    core.start_listing()
                    listed = self._client.lrange(core.processing, 0, -1)
                    core.reconcile([core.as_frame(f) for f in listed])
                if core.pending:
                    return core.pending.popleft()
                wait = core.slice(deadline, self._socket_timeout)
                # If the move is interrupted (connection error, ^C, ...),
                # its frame may be in the processing list: the next take
                # looks there before taking another.
                with core.in_flight():
                    if wait > 0:
                        value = self._client.blmove(
                            core.ready, core.processing, wait, "RIGHT", "LEFT"  # type: ignore[arg-type]
                        )
                    else:
                        value = self._client.lmove(core.ready, core.processing, "RIGHT", "LEFT")
                    attempts = _Attempts(core.timeout)
                    if value is not None:
                        frame = core.as_frame(value)
                        if core.closed:
                            self._give_back(frame)
                        core.hold(frame)
                        return frame
                if wait <= 0:
                    raise queue.Empty
            except _ConnErrors as exc:
                core.suspect = True
                time.sleep(core.retry_delay(attempts, "get", exc))
            except ResponseError as exc:
                raise core.refused_by_redis("get", exc) from exc

    def _give_back(self, frame: bytes) -> NoReturn:
        """*frame* was taken after close() began: put it back at the front
        of the queue and raise (close() puts it back if this fails)."""
        core = self._core
        try:
            self._call(
                "give back a frame taken during close", self._script, "requeue",
                [core.processing, core.ready], [frame],
            )
        except TransportError as exc:
            core.give_back_failed(exc)
        raise core.closed_error()

    def _bury(self, exc: Exception, frame: bytes) -> None:
        """Move a frame that was refused or could not be loaded to the
        dead-letter list (or leave it to be found again by the next get(),
        if Redis cannot be reached or this is interrupted)."""
        core = self._core
        try:
            with core.in_flight():
                self._call(
                    "dead-letter a refused frame", self._script, "dead_letter",
                    [core.processing, core.dead], [frame, core.dead_record(exc, frame)],
                )
        except TransportError as error:
            core.bury_failed(error)
        finally:
            core.release(frame)

    def _touch(self) -> None:
        core = self._core
        core.start_touch()
        pipe = self._client.pipeline(transaction=False)
        pipe.set(core.alive, core.consumer, px=max(int(core.visibility_timeout * 1000), 1))
        pipe.sadd(core.consumers, core.consumer)
        pipe.execute()
        if core.closed:
            # close() ran meanwhile: this must not register it again.
            self._recover(force=True, only_self=True)
            raise core.closed_error()
        core.touched = time.monotonic()
        if not core.registered:
            core.registered = True
            if self._heartbeat and self._beating is None:
                self._beating = threading.Thread(
                    target=self._beat, name=f"signedqueue-heartbeat-{core.name}", daemon=True
                )
                self._beating.start()

    def _beat(self) -> None:
        while not self._stop.wait(self._core.touch_every):
            try:
                self.heartbeat()
            except Exception as exc:  # logged; the next beat tries again
                if not self._core.closed:
                    logger.warning(
                        "signedqueue: Redis queue %r: heartbeat failed: %s", self._core.name, exc
                    )

    def _recover(self, force: bool, only_self: bool = False) -> int:
        core = self._core
        core.recovered = time.monotonic()
        members = [core.consumer] if only_self else self._client.smembers(core.consumers)
        plan = core.recovery(members, force, only_self)
        if plan is None:
            return 0
        return core.recovered_count(self._script("recover", *plan), only_self)

    # -- settling

    def ack(self, delivery: Delivery) -> None:
        """
        Acknowledge *delivery*: its frame leaves the processing list for
        good.  Acknowledging twice does nothing.  Retried on connection
        errors (it is idempotent); if it still fails, the frame stays and is
        delivered again after the visibility timeout.
        """
        core = self._core
        core.check_usable()
        if not core.settle(delivery, self, "acked"):
            return
        core.settle_claim(delivery.frame, done=True)
        attempts = _Attempts(core.timeout)
        removed = self._call(
            "ack", self._client.lrem, core.processing, 1, delivery.frame, attempts=attempts
        )
        core.acked(delivery, removed, attempts)

    def nack(self, delivery: Delivery, requeue: bool = True) -> None:
        """
        Give *delivery* back: to the front of the queue (*requeue*, the
        default; it is the next frame delivered), or to the dead-letter list
        with the reason ``"nacked"``.  Atomic, and retried on connection
        errors.
        """
        core = self._core
        core.check_usable()
        core.settle(delivery, self, "nacked")
        core.settle_claim(delivery.frame, done=False)
        if requeue:
            self._call(
                "nack", self._script, "requeue", [core.processing, core.ready], [delivery.frame]
            )
        else:
            self._call(
                "nack", self._script, "dead_letter", [core.processing, core.dead],
                [delivery.frame, core.dead_record(None, delivery.frame)],
            )
        delivery._state = "nacked"
        core.release(delivery.frame)

    # -- liveness

    def heartbeat(self) -> None:
        """Refresh this consumer's alive key (see *heartbeat* for a thread
        that does it)."""
        self._core.check_usable()
        self._call("heartbeat", self._touch)

    def recover(self) -> int:
        """
        Put back the frames of every consumer of this queue whose alive key
        has expired; return how many.  ``get()`` does this on its own every
        half visibility timeout (at most every 5 s).
        """
        self._core.check_usable()
        return int(self._call("recover", self._recover, False))

    # -- inspecting and dead letters

    def qsize(self) -> int:
        """Frames waiting in the ready list (not those being processed)."""
        return int(self._call("qsize", self._client.llen, self._core.ready))

    def dead_letters(self, limit: int | None = None) -> list[DeadLetter]:
        """The dead-letter records, oldest first (at most *limit*, the oldest)."""
        if limit is not None and limit <= 0:
            return []
        start = 0 if limit is None else -limit
        records = self._call("read dead letters", self._client.lrange, self._core.dead, start, -1)
        return [self._core.dead_letter(r) for r in reversed(records)]

    def requeue_dead_letters(self, letters: list[DeadLetter] | None = None) -> int:
        """
        Put dead letters (*letters*, or all) back at the end of the queue, and
        return how many were moved.  Each move is atomic.
        """
        core = self._core
        letters = self.dead_letters() if letters is None else letters
        moved = 0
        for letter in letters:
            moved += int(self._call(
                "requeue a dead letter", self._script, "from_dead",
                [core.dead, core.ready], [letter.record, letter.frame],
            ))
        return moved

    def purge_dead_letters(self, letters: list[DeadLetter] | None = None) -> int:
        """Delete dead letters (*letters*, or all); return how many."""
        core = self._core
        if letters is None:
            return int(self._call("purge dead letters", self._script, "purge", [core.dead], []))
        return sum(
            int(self._call("purge a dead letter", self._client.lrem, core.dead, 1, letter.record))
            for letter in letters
        )

    # -- shutdown

    def close(self) -> None:
        """
        Stop the heartbeat, put this consumer's unacknowledged frames back at
        the front of the queue, unregister it, and close the client if this
        queue made it.  Closing twice does nothing.
        """
        core = self._core
        if core.closed:
            return
        core.closed = True
        self._stop.set()
        if self._beating is not None:
            self._beating.join(5.0)
        # A get() in another thread sees the flag within a blocking slice
        # (and gives back a frame it took meanwhile): wait for it, so that
        # nothing is taken after the frames are put back below, and the
        # client is not closed under it.
        waited = self._get_lock.acquire(timeout=core.close_wait)
        try:
            if not waited:
                core.close_wait_failed()
            if core.registered and os.getpid() == core.pid:
                core.forget_claims()
                self._call("close", self._recover, True, True)
        except TransportError as exc:
            core.close_recovery_failed(exc)
        finally:
            if waited:
                self._get_lock.release()
            if self._owns_client:
                self._client.close()


# -- the asyncio queue -------------------------------------------------------


class AsyncRedisQueue(_QueueBase):
    """
    :class:`RedisQueue` for asyncio, on ``redis.asyncio``: the same
    arguments (*client* is a ``redis.asyncio.Redis``), and the same methods
    as coroutines; ``get()`` returns an :class:`AsyncDelivery`.  The
    heartbeat, when on, is a task of the running loop.  Use it from one
    event loop.
    """

    def __init__(
        self,
        name: str,
        codec: Codec,
        *,
        client: redis.asyncio.Redis | None = None,
        url: str | None = None,
        consumer: str | None = None,
        visibility_timeout: float = 30.0,
        timeout: float = 5.0,
        bind_name: bool = True,
        heartbeat: bool = False,
        client_options: Mapping[str, Any] | None = None,
    ) -> None:
        if (client is None) == (url is None):
            raise ValueError(
                "pass either url='redis://host:6379/0' or client=redis.asyncio.Redis(...)"
            )
        if client is not None and not isinstance(client, redis.asyncio.Redis):
            raise TypeError(
                f"client must be a redis.asyncio.Redis, not {type(client).__name__} "
                "(use RedisQueue for redis.Redis)"
            )
        core = _new_core(
            name, codec, consumer=consumer, visibility_timeout=visibility_timeout,
            timeout=timeout, bind_name=bind_name, client_options=client_options,
        )
        if client is None:
            client = redis.asyncio.Redis.from_url(
                cast(str, url), **_created_options(timeout, client_options)
            )
            self._owns_client = True
        else:
            self._owns_client = False
        # A client made from url has not connected yet (redis.asyncio
        # connects at the first command), so if this raises there is no
        # connection to close, and none can be awaited here anyway.
        kwargs = _checked_client_kwargs(client)
        core.where = _where(kwargs)
        self._core = core
        self._client = client
        self._socket_timeout = _socket_timeout(kwargs)
        self._scripts = {k: client.register_script(v) for k, v in _SCRIPTS.items()}
        self._get_lock = asyncio.Lock()
        self._heartbeat = heartbeat
        self._beating: asyncio.Task[None] | None = None

    @property
    def client(self) -> redis.asyncio.Redis:
        """The Redis client."""
        return self._client

    async def __aenter__(self) -> AsyncRedisQueue:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _call(
        self, op: str, fn: Any, *args: Any, attempts: _Attempts | None = None
    ) -> Any:
        attempts = _Attempts(self._core.timeout) if attempts is None else attempts
        while True:
            try:
                return await fn(*args)
            except _ConnErrors as exc:
                await asyncio.sleep(self._core.retry_delay(attempts, op, exc))
            except ResponseError as exc:
                raise self._core.refused_by_redis(op, exc) from exc

    async def _script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        return await self._scripts[name](keys=keys, args=args)

    async def put(self, obj: Any) -> None:
        """See :meth:`RedisQueue.put`."""
        await self.put_frame(self._core.codec.dumps(obj))

    async def put_frame(self, frame: Buffer) -> None:
        """See :meth:`RedisQueue.put_frame`."""
        self._core.check_usable()
        data = bytes(frame)
        pool: Any = self._client.connection_pool
        attempts = _Attempts(self._core.timeout)
        while True:
            try:
                conn: Any = await (
                    pool.get_connection("LPUSH") if _POOL_WANTS_NAME else pool.get_connection()
                )
            except _ConnErrors as exc:
                try:
                    delay = self._core.retry_delay(attempts, "put", exc)
                except TransportError:
                    raise self._core.unreachable_put(exc) from exc
                await asyncio.sleep(delay)
                continue
            try:
                await conn.send_command("LPUSH", self._core.ready, data)
                await conn.read_response()
            except ResponseError as exc:
                raise self._core.refused_by_redis("put", exc) from exc
            except (*_ConnErrors, OSError) as exc:
                await conn.disconnect()
                raise self._core.put_unknown(exc) from exc
            finally:
                await pool.release(conn)
            return

    async def get(self, timeout: float | None = None) -> AsyncDelivery:
        """See :meth:`RedisQueue.get`."""
        core = self._core
        core.check_usable()
        deadline = core.deadline(timeout)
        async with self._get_lock:
            frame = await self._take(deadline)
            try:
                core.check_not_held(frame)
                value = core.codec.loads(frame)
            except ReplayGuardUnavailable:
                core.drop(frame)
                raise
            except Exception as exc:
                core.unclaim_refused()
                await self._bury(exc, frame)
                raise
            except BaseException:
                core.drop(frame)
                raise
            core.claimed(frame)
            return AsyncDelivery(value, frame, self)

    async def get_nowait(self) -> AsyncDelivery:
        """``await get(timeout=0)``."""
        return await self.get(0)

    async def _take(self, deadline: float | None) -> bytes:
        core = self._core
        client = self._client
        attempts = _Attempts(core.timeout)
        while True:
            if core.closed:  # by close() in another task
                raise core.closed_error()
            try:
                if core.touch_due() or not core.registered:
                    await self._touch()
                if core.recover_due():
                    try:
                        await self._recover(force=False)
                    except ResponseError as exc:
                        core.recovery_failed(exc)
                if core.suspect:
                    core.start_listing()
                    listed = await client.lrange(core.processing, 0, -1)
                    core.reconcile([core.as_frame(f) for f in listed])
                if core.pending:
                    return core.pending.popleft()
                wait = core.slice(deadline, self._socket_timeout)
                # A cancelled get() (wait_for, a task timeout) loses the
                # reply of its move, not the frame: see RedisQueue._take.
                with core.in_flight():
                    if wait > 0:
                        value = await client.blmove(
                            core.ready, core.processing, wait, "RIGHT", "LEFT"  # type: ignore[arg-type]
                        )
                    else:
                        value = await client.lmove(core.ready, core.processing, "RIGHT", "LEFT")
                    attempts = _Attempts(core.timeout)
                    if value is not None:
                        frame = core.as_frame(value)
                        if core.closed:
                            await self._give_back(frame)
                        core.hold(frame)
                        return frame
                if wait <= 0:
                    raise queue.Empty
            except _ConnErrors as exc:
                core.suspect = True
                await asyncio.sleep(core.retry_delay(attempts, "get", exc))
            except ResponseError as exc:
                raise core.refused_by_redis("get", exc) from exc

    async def _bury(self, exc: Exception, frame: bytes) -> None:
        core = self._core
        try:
            with core.in_flight():
                await self._call(
                    "dead-letter a refused frame", self._script, "dead_letter",
                    [core.processing, core.dead], [frame, core.dead_record(exc, frame)],
                )
        except TransportError as error:
            core.bury_failed(error)
        finally:
            core.release(frame)

    async def _give_back(self, frame: bytes) -> NoReturn:
        """See :meth:`RedisQueue._give_back`."""
        core = self._core
        try:
            await self._call(
                "give back a frame taken during close", self._script, "requeue",
                [core.processing, core.ready], [frame],
            )
        except TransportError as exc:
            core.give_back_failed(exc)
        raise core.closed_error()

    async def _touch(self) -> None:
        core = self._core
        core.start_touch()
        pipe = self._client.pipeline(transaction=False)
        pipe.set(core.alive, core.consumer, px=max(int(core.visibility_timeout * 1000), 1))
        pipe.sadd(core.consumers, core.consumer)
        await pipe.execute()
        if core.closed:
            await self._recover(force=True, only_self=True)
            raise core.closed_error()
        core.touched = time.monotonic()
        if not core.registered:
            core.registered = True
            if self._heartbeat and self._beating is None:
                self._beating = asyncio.get_running_loop().create_task(self._beat())

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self._core.touch_every)
            try:
                await self.heartbeat()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # logged; the next beat tries again
                if not self._core.closed:
                    logger.warning(
                        "signedqueue: Redis queue %r: heartbeat failed: %s", self._core.name, exc
                    )

    async def _recover(self, force: bool, only_self: bool = False) -> int:
        core = self._core
        core.recovered = time.monotonic()
        members = [core.consumer] if only_self else await self._client.smembers(core.consumers)
        plan = core.recovery(members, force, only_self)
        if plan is None:
            return 0
        return core.recovered_count(await self._script("recover", *plan), only_self)

    async def ack(self, delivery: AsyncDelivery) -> None:
        """See :meth:`RedisQueue.ack`."""
        core = self._core
        core.check_usable()
        if not core.settle(delivery, self, "acked"):
            return
        core.settle_claim(delivery.frame, done=True)
        attempts = _Attempts(core.timeout)
        removed = await self._call(
            "ack", self._client.lrem, core.processing, 1, delivery.frame, attempts=attempts
        )
        core.acked(delivery, removed, attempts)

    async def nack(self, delivery: AsyncDelivery, requeue: bool = True) -> None:
        """See :meth:`RedisQueue.nack`."""
        core = self._core
        core.check_usable()
        core.settle(delivery, self, "nacked")
        core.settle_claim(delivery.frame, done=False)
        if requeue:
            await self._call(
                "nack", self._script, "requeue", [core.processing, core.ready], [delivery.frame]
            )
        else:
            await self._call(
                "nack", self._script, "dead_letter", [core.processing, core.dead],
                [delivery.frame, core.dead_record(None, delivery.frame)],
            )
        delivery._state = "nacked"
        core.release(delivery.frame)

    async def heartbeat(self) -> None:
        """See :meth:`RedisQueue.heartbeat`."""
        self._core.check_usable()
        await self._call("heartbeat", self._touch)

    async def recover(self) -> int:
        """See :meth:`RedisQueue.recover`."""
        self._core.check_usable()
        return int(await self._call("recover", self._recover, False))

    async def qsize(self) -> int:
        """See :meth:`RedisQueue.qsize`."""
        return int(await self._call("qsize", self._client.llen, self._core.ready))

    async def dead_letters(self, limit: int | None = None) -> list[DeadLetter]:
        """See :meth:`RedisQueue.dead_letters`."""
        if limit is not None and limit <= 0:
            return []
        start = 0 if limit is None else -limit
        records = await self._call(
            "read dead letters", self._client.lrange, self._core.dead, start, -1
        )
        return [self._core.dead_letter(r) for r in reversed(records)]

    async def requeue_dead_letters(self, letters: list[DeadLetter] | None = None) -> int:
        """See :meth:`RedisQueue.requeue_dead_letters`."""
        core = self._core
        letters = await self.dead_letters() if letters is None else letters
        moved = 0
        for letter in letters:
            moved += int(await self._call(
                "requeue a dead letter", self._script, "from_dead",
                [core.dead, core.ready], [letter.record, letter.frame],
            ))
        return moved

    async def purge_dead_letters(self, letters: list[DeadLetter] | None = None) -> int:
        """See :meth:`RedisQueue.purge_dead_letters`."""
        core = self._core
        if letters is None:
            purged = await self._call("purge dead letters", self._script, "purge", [core.dead], [])
            return int(purged)
        removed = 0
        for letter in letters:
            removed += int(await self._call(
                "purge a dead letter", self._client.lrem, core.dead, 1, letter.record
            ))
        return removed

    async def close(self) -> None:
        """See :meth:`RedisQueue.close`."""
        core = self._core
        if core.closed:
            return
        core.closed = True
        if self._beating is not None:
            self._beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._beating
        # As RedisQueue.close(): wait for a get() of another task.
        try:
            await asyncio.wait_for(self._get_lock.acquire(), core.close_wait)
            waited = True
        except asyncio.TimeoutError:
            waited = False
        try:
            if not waited:
                core.close_wait_failed()
            if core.registered and os.getpid() == core.pid:
                core.forget_claims()
                await self._call("close", self._recover, True, True)
        except TransportError as exc:
            core.close_recovery_failed(exc)
        finally:
            if waited:
                self._get_lock.release()
            if self._owns_client:
                await self._client.aclose()

    aclose = close
