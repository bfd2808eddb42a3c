"""
Replay guards: remember the frames a codec accepted, so that a frame
delivered twice is refused with :class:`~signedqueue.ReplayedFrame`.

A codec built with ``replay_guard=`` and a ``max_age`` asks its guard, after
a frame's tag and age have verified and before anything is deserialized,
whether the frame's key (its key id and nonce) is new, and has it remembered
until ``created + max_age + clock_skew``.  After that instant every consumer
whose clock is within ``clock_skew`` of the guard's refuses the frame as
expired on its own, so the guard may forget it: memory is bounded by the
frames accepted in one window.

Three guards share the :class:`ReplayGuard` protocol:

* :class:`MemoryReplayGuard`: one process (thread-safe), bounded by
  *max_entries*; refuses frames (fail closed) when full.
* :class:`FileReplayGuard`: every process on one machine, through a SQLite
  file (stdlib); pickles as its path, so ``SignedQueue`` consumers share it.
* :class:`RedisReplayGuard`: every consumer that reaches one Redis (``SET NX
  PX``); needs the ``redis`` extra, imported only when one is made.

Each guard's store failing raises
:class:`~signedqueue.exceptions.ReplayGuardUnavailable`: nothing is accepted
unchecked.
"""

from __future__ import annotations

import heapq
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from .exceptions import ReplayGuardFull, ReplayGuardUnavailable

__all__ = [
    "FileReplayGuard",
    "MemoryReplayGuard",
    "RedisReplayGuard",
    "ReplayGuard",
]


@runtime_checkable
class ReplayGuard(Protocol):
    """
    What a codec needs of a replay guard.  Keys are opaque bytes (at most
    272); times are Unix seconds.

    An entry is *held* by an owner (a non-empty string: a RedisQueue consumer
    holding a frame it is processing) or *done* (owner ``""``).
    """

    def check_and_remember(self, key: bytes, expires_at: float, owner: str = "") -> bool:
        """
        Atomically: if *key* is not remembered (or its entry has expired),
        remember it until *expires_at* as held by *owner* and return True;
        if it is held by this same non-empty *owner*, set its expiry to
        *expires_at* and return True; otherwise return False (a replay).
        May raise ``ReplayGuardFull`` or ``ReplayGuardUnavailable``.
        """
        ...

    def update(self, key: bytes, owner: str, expires_at: float, *, done: bool) -> None:
        """
        If *key* is held by the non-empty *owner*: forget it when
        *expires_at* has passed, else keep it until *expires_at*, as done
        (*done*) or still held by *owner*.  If it is not remembered (its
        lease lapsed) and *done*: remember it as done until *expires_at*.
        Otherwise (held by another owner, or done) do nothing.
        """
        ...


class MemoryReplayGuard:
    """
    Remembers keys in this process's memory (thread-safe).

    Args:
        max_entries: Most keys remembered at once.  Expired keys are purged
            as new ones arrive (amortized O(log n)); when the guard is still
            full, the frame is refused with :class:`ReplayGuardFull` rather
            than a key forgotten early.  About 250 bytes per key (measured;
            see docs/how-to/replay-protection.md): the default, one million,
            is about 250 MB at most.
        clock: The current time in Unix seconds (the codec's, for tests).

    Pickled (e.g. into a ``SignedQueue`` consumer process) it becomes a new,
    empty guard with the same limit: it protects one process only.
    """

    def __init__(
        self, max_entries: int = 1_000_000, *, clock: Callable[[], float] = time.time
    ) -> None:
        if not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError("max_entries must be a positive integer")
        self.max_entries = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        # key -> (expires_at, owner); a heap of (expires_at, key) to purge.
        self._entries: dict[bytes, tuple[float, str]] = {}
        self._heap: list[tuple[float, bytes]] = []

    def __len__(self) -> int:
        """Keys remembered now (expired ones included until purged)."""
        return len(self._entries)

    def __reduce__(self) -> tuple[Any, ...]:
        return (MemoryReplayGuard, (self.max_entries,))

    def __repr__(self) -> str:
        return f"<MemoryReplayGuard {len(self._entries)}/{self.max_entries} keys>"

    def _purge(self, now: float) -> None:
        heap, entries = self._heap, self._entries
        while heap and heap[0][0] <= now:
            _, key = heapq.heappop(heap)
            entry = entries.get(key)
            if entry is not None and entry[0] <= now:
                del entries[key]

    def _put(self, key: bytes, expires_at: float, owner: str) -> None:
        self._entries[key] = (expires_at, owner)
        heapq.heappush(self._heap, (expires_at, key))

    def check_and_remember(self, key: bytes, expires_at: float, owner: str = "") -> bool:
        with self._lock:
            now = self._clock()
            self._purge(now)
            entry = self._entries.get(key)
            if entry is not None and entry[0] > now:
                if not owner or entry[1] != owner:
                    return False
            elif len(self._heap) >= self.max_entries:
                if len(self._entries) < self.max_entries:
                    # Stale heap items (keys whose expiry changed): rebuild.
                    self._heap = [(e, k) for k, (e, _) in self._entries.items()]
                    heapq.heapify(self._heap)
                if len(self._heap) >= self.max_entries:
                    raise ReplayGuardFull(
                        f"replay guard is full ({self.max_entries} unexpired keys): the "
                        "frame cannot be remembered, so it is refused; raise "
                        "max_entries or lower max_age"
                    )
            self._put(key, expires_at, owner)
            return True

    def update(self, key: bytes, owner: str, expires_at: float, *, done: bool) -> None:
        if not owner:
            return
        with self._lock:
            now = self._clock()
            entry = self._entries.get(key)
            live = entry is not None and entry[0] > now
            if (live and entry is not None and entry[1] != owner) or (not live and not done):
                return
            if expires_at > now:
                self._put(key, expires_at, "" if done else owner)
            elif live:
                del self._entries[key]  # its heap item is skipped when popped


_SCHEMA = """
CREATE TABLE IF NOT EXISTS seen (
    key BLOB PRIMARY KEY,
    owner TEXT NOT NULL,
    expires REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS seen_expires ON seen (expires);
"""

# One statement, so atomic in autocommit mode: insert, or take over an
# expired entry or one held by the same owner; changes() says which.
_CLAIM = """
INSERT INTO seen (key, owner, expires) VALUES (?1, ?2, ?3)
ON CONFLICT (key) DO UPDATE SET owner = excluded.owner, expires = excluded.expires
WHERE seen.expires <= ?4 OR (excluded.owner != '' AND seen.owner = excluded.owner)
"""


class FileReplayGuard:
    """
    Remembers keys in a SQLite file, shared by every process and thread on
    one machine that opens the same *path* (WAL mode; one ``INSERT ... ON
    CONFLICT`` statement per frame, so the check is atomic across them).

    Args:
        path: The database file (made if missing; keep it on a local disk,
            not a network file system, where SQLite locking is unreliable).
        purge_every: Seconds between deletions of expired keys (by each
            process that uses the guard).
        timeout: Seconds to wait for another process's write lock before
            raising :class:`ReplayGuardUnavailable`.
        clock: The current time in Unix seconds (for tests; not pickled).

    Pickles as its path and settings: a ``SignedQueue``'s consumer processes
    open the same file.  Written with ``synchronous=NORMAL``: a power loss
    (not a process crash) may forget the last keys; see the guide.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        purge_every: float = 60.0,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = os.fspath(path)
        self.purge_every = float(purge_every)
        self.timeout = float(timeout)
        self._clock = clock
        self._local = threading.local()
        self._connect()  # fail now, not at the first frame

    def __reduce__(self) -> tuple[Any, ...]:
        return (_file_guard, (self.path, self.purge_every, self.timeout))

    def __repr__(self) -> str:
        return f"<FileReplayGuard {self.path!r}>"

    def _connect(self) -> sqlite3.Connection:
        local = self._local
        conn: sqlite3.Connection | None = getattr(local, "conn", None)
        if conn is not None and local.pid == os.getpid():
            return conn
        try:
            conn = sqlite3.connect(
                self.path, timeout=self.timeout, isolation_level=None, check_same_thread=True
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise self._unavailable("open", exc) from exc
        local.conn, local.pid, local.purged = conn, os.getpid(), -float("inf")
        return conn

    def _unavailable(self, op: str, exc: BaseException) -> ReplayGuardUnavailable:
        return ReplayGuardUnavailable(
            f"replay guard file {self.path!r}: could not {op} ({type(exc).__name__}: "
            f"{exc}); the frame was not accepted"
        )

    def check_and_remember(self, key: bytes, expires_at: float, owner: str = "") -> bool:
        conn = self._connect()
        now = self._clock()
        try:
            if now - self._local.purged >= self.purge_every:
                conn.execute("DELETE FROM seen WHERE expires <= ?", (now,))
                self._local.purged = now
            cursor = conn.execute(_CLAIM, (key, owner, expires_at, now))
        except sqlite3.Error as exc:
            raise self._unavailable("remember a frame", exc) from exc
        return cursor.rowcount == 1

    def update(self, key: bytes, owner: str, expires_at: float, *, done: bool) -> None:
        if not owner:
            return
        conn = self._connect()
        now = self._clock()
        try:
            if expires_at <= now:
                conn.execute("DELETE FROM seen WHERE key = ? AND owner = ?", (key, owner))
            elif done:
                conn.execute(
                    "INSERT INTO seen (key, owner, expires) VALUES (?1, '', ?2) "
                    "ON CONFLICT (key) DO UPDATE SET owner = '', expires = ?2 "
                    "WHERE seen.owner = ?3 OR seen.expires <= ?4",
                    (key, expires_at, owner, now),
                )
            else:
                conn.execute(
                    "UPDATE seen SET expires = ? WHERE key = ? AND owner = ? AND expires > ?",
                    (expires_at, key, owner, now),
                )
        except sqlite3.Error as exc:
            raise self._unavailable("update a frame", exc) from exc

    def close(self) -> None:
        """Close this thread's connection (others close when collected)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def _file_guard(path: str, purge_every: float, timeout: float) -> FileReplayGuard:
    return FileReplayGuard(path, purge_every=purge_every, timeout=timeout)


#: KEYS: the key.  ARGV: owner, milliseconds.  Claim it if absent or held
#: by this same non-empty owner.
_REDIS_CLAIM = """
local v = redis.call('GET', KEYS[1])
if (not v) or (ARGV[1] ~= '' and v == ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

#: KEYS: the key.  ARGV: owner, milliseconds (<= 0: forget), new value,
#: done ("1" or "0").  As ReplayGuard.update.
_REDIS_UPDATE = """
if ARGV[1] == '' then return 0 end
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] or ((not v) and ARGV[4] == '1') then
  if tonumber(ARGV[2]) <= 0 then
    if v then redis.call('DEL', KEYS[1]) end
  else
    redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[2])
  end
end
return 0
"""


class RedisReplayGuard:
    """
    Remembers keys in Redis, shared by every consumer that reaches it: one
    ``SET key "" NX PX ttl`` per frame (a Lua script when a
    :class:`RedisQueue` consumer holds the frame).

    Args:
        client_or_url: A ``redis.Redis`` or a ``redis://`` URL.
        prefix: Prepended to every key (then the frame's key as hex).
        timeout: Connect and socket timeout of a client made from a URL.
        clock: The current time in Unix seconds.  Expiries are sent as
            durations from this clock (``PX``), so the server's clock never
            decides when a key is forgotten, only how long it has waited.

    Pickles as its URL, prefix and timeout (one made from a client does not
    pickle: pass a URL to share it with child processes).  Any Redis error
    raises :class:`ReplayGuardUnavailable`: nothing is accepted unchecked.
    """

    def __init__(
        self,
        client_or_url: Any,
        *,
        prefix: str = "signedqueue:replay:",
        timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        import redis

        self.prefix = prefix
        self.timeout = float(timeout)
        self._clock = clock
        if isinstance(client_or_url, str):
            self.url: str | None = client_or_url
            self._client = redis.Redis.from_url(
                client_or_url, socket_timeout=timeout, socket_connect_timeout=timeout
            )
        elif isinstance(client_or_url, redis.Redis):
            self.url = None
            self._client = client_or_url
        else:
            raise TypeError(
                f"client_or_url must be a redis.Redis or a URL, not "
                f"{type(client_or_url).__name__}"
            )
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self._claim = self._client.register_script(_REDIS_CLAIM)
        self._update = self._client.register_script(_REDIS_UPDATE)

    @property
    def client(self) -> Any:
        """The Redis client."""
        return self._client

    def __reduce__(self) -> tuple[Any, ...]:
        if self.url is None:
            raise TypeError(
                "a RedisReplayGuard made from a client cannot be pickled; make it "
                "from a URL to share it with child processes"
            )
        return (_redis_guard, (self.url, self.prefix, self.timeout))

    def __repr__(self) -> str:
        return f"<RedisReplayGuard prefix={self.prefix!r}>"

    def _ms(self, expires_at: float) -> int:
        # Rounded up: forgetting a key early would reopen the window.
        return math.ceil((expires_at - self._clock()) * 1000)

    def _unavailable(self, exc: BaseException) -> ReplayGuardUnavailable:
        return ReplayGuardUnavailable(
            f"replay guard on Redis failed ({type(exc).__name__}); the frame was "
            "not accepted"
        )

    def check_and_remember(self, key: bytes, expires_at: float, owner: str = "") -> bool:
        name = self.prefix + key.hex()
        ms = max(self._ms(expires_at), 1)
        try:
            if not owner:
                return bool(self._client.set(name, b"", nx=True, px=ms))
            return bool(self._claim(keys=[name], args=[owner, ms]))
        except self._errors as exc:
            raise self._unavailable(exc) from exc

    def update(self, key: bytes, owner: str, expires_at: float, *, done: bool) -> None:
        if not owner:
            return
        ms = self._ms(expires_at)
        try:
            self._update(
                keys=[self.prefix + key.hex()],
                args=[owner, ms, "" if done else owner, "1" if done else "0"],
            )
        except self._errors as exc:
            raise self._unavailable(exc) from exc


def _redis_guard(url: str, prefix: str, timeout: float) -> RedisReplayGuard:
    return RedisReplayGuard(url, prefix=prefix, timeout=timeout)
