"""
Where a keyring comes from, and how a running process follows it.

A ring loaded from a keyring file or from a directory of one file per key
remembers its source.  With ``watch=True`` the source is checked at most once
per interval on the signing and verifying path (one ``stat`` per file, no
more); when it changed, it is read again and swapped in whole.  A source that
cannot be read or parsed never replaces the keys already loaded: the error is
logged once per change and the old keys stay.

A ring with a source is pickled (to spawn a child process) as its source, so
the child re-opens the file instead of receiving secrets through the pipe.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import logging
import os
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._keys import ACTIVE, STAGED, _State, build_state, check_key_id, parse_document
from .exceptions import KeyringError

if TYPE_CHECKING:  # pragma: no cover
    from ._keys import Keyring

__all__ = ["DirectorySource", "FileSource", "Source", "locked", "write_atomically"]

logger = logging.getLogger("signedqueue")

#: An unknown key id triggers an early look at the source at most this often.
_URGENT_MIN_INTERVAL = 0.05
#: In a key directory, the file holding the active key's id.
ACTIVE_FILE = "active"
#: No failed load logged yet (``None`` is the signature of a source that
#: cannot even be stat'ed, which must be logged too).
_NO_FAILURE = object()


def _check_mode(
    path: Path, st: os.stat_result, allow_insecure: bool, own_group_read: bool = False
) -> None:
    """
    Refuse a secret file that group or others may access.  With
    *own_group_read* (key directories), a group-read bit is accepted when the
    file's group is one of this process's groups: Kubernetes mounts secrets
    that way (mode 0440) for a pod running as a non-root user with fsGroup.
    """
    loose = st.st_mode & (stat.S_IRWXG | stat.S_IRWXO)
    if own_group_read and loose == stat.S_IRGRP and (
        st.st_gid == os.getegid() or st.st_gid in os.getgroups()
    ):
        loose = 0
    if loose and not allow_insecure:
        raise KeyringError(
            f"keyring file {str(path)!r} is accessible to group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); run 'chmod 600 {path}', or pass "
            "allow_insecure_permissions=True (--allow-insecure-permissions on the "
            "command line)"
        )


class Source:
    """A file or directory a keyring was loaded from."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        watch: bool,
        interval: float,
        allow_insecure_permissions: bool,
    ) -> None:
        if watch and not interval > 0:
            raise ValueError("watch_interval must be a positive number of seconds")
        self.path = Path(path)
        self.watch = watch
        self.interval = float(interval)
        self.allow_insecure = allow_insecure_permissions
        self._lock = threading.Lock()
        self._next = 0.0
        self._last_urgent = 0.0
        self._signature_seen: object = None
        self._signature_failed: object = _NO_FAILURE

    # -- subclass API ------------------------------------------------------

    def signature(self) -> object:
        """Something that changes whenever the source's content may have."""
        raise NotImplementedError

    def load(self) -> _State:
        """Read and validate the whole source."""
        raise NotImplementedError

    def recipe(self) -> tuple[Any, tuple[Any, ...]]:
        """How a child process re-opens this source (for pickling a ring)."""
        return (
            _reopen,
            (type(self).__name__, str(self.path), self.watch, self.interval,
             self.allow_insecure),
        )

    # -- loading and watching ----------------------------------------------

    def load_first(self) -> _State:
        signature = self.signature()
        state = self.load()
        self._signature_seen = signature
        self._next = time.monotonic() + self.interval
        return state

    def due(self) -> bool:
        return time.monotonic() >= self._next

    def refresh(self, ring: Keyring, *, urgent: bool = False) -> None:
        """Swap in the source's keys if it changed; keep the old ones on error."""
        now = time.monotonic()
        if urgent:
            if now - self._last_urgent < _URGENT_MIN_INTERVAL:
                return
            self._last_urgent = now
        if not self._lock.acquire(blocking=False):
            return  # another thread is already looking
        signature: object = None
        try:
            self._next = now + self.interval
            signature = self.signature()
            if signature == self._signature_seen:
                return
            state = self.load()
            # Swapped under the lock, so that a reload finishing late can
            # never put back keys older than another thread's.
            old = ring._state
            ring._state = state
            self._signature_seen = signature
            self._signature_failed = _NO_FAILURE
        except (OSError, ValueError, TypeError, KeyringError) as exc:
            if signature != self._signature_failed:
                self._signature_failed = signature
                logger.error(
                    "signedqueue: could not reload the keyring from %s (%s: %s); "
                    "keeping the %d keys loaded before",
                    self.path, type(exc).__name__, exc, len(ring._state.secrets),
                )
            return
        finally:
            self._lock.release()
        logger.info(
            "signedqueue: reloaded the keyring from %s: active %s, keys %s (was active %s)",
            self.path, state.active, sorted(state.secrets), old.active,
        )


class FileSource(Source):
    """A JSON keyring file."""

    def signature(self) -> object:
        st = os.stat(self.path)
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode)

    def load(self) -> _State:
        with open(self.path, "rb") as fh:
            _check_mode(self.path, os.fstat(fh.fileno()), self.allow_insecure)
            data = fh.read()
        return parse_document(data)



class DirectorySource(Source):
    """A directory of one base64 secret per file, named by key id."""

    def _entries(self) -> list[str]:
        return sorted(n for n in os.listdir(self.path) if not n.startswith("."))

    def signature(self) -> object:
        sig = []
        for name in self._entries():
            st = os.stat(self.path / name)  # follows the symlinks orchestrators use
            sig.append((name, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode))
        return tuple(sig)

    def load(self) -> _State:
        names = self._entries()
        if ACTIVE_FILE not in names:
            raise KeyringError(
                f"key directory {str(self.path)!r} has no file {ACTIVE_FILE!r} naming "
                "the active key id"
            )
        keys: dict[str, bytes] = {}
        created: dict[str, float] = {}
        active = ""
        for name in names:
            path = self.path / name
            with open(path, "rb") as fh:
                st = os.fstat(fh.fileno())
                if not stat.S_ISREG(st.st_mode):
                    raise KeyringError(f"{str(path)!r} is not a regular file")
                _check_mode(path, st, self.allow_insecure, own_group_read=True)
                data = fh.read(1 << 16)
            text = data.decode("ascii", "replace").strip()
            if name == ACTIVE_FILE:
                active = text
                continue
            try:
                check_key_id(name)
            except ValueError as exc:
                raise KeyringError(f"file {name!r} in the key directory: {exc}") from None
            try:
                keys[name] = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                raise KeyringError(f"the secret in {str(path)!r} is not valid base64") from None
            created[name] = st.st_mtime
        if active not in keys:
            raise KeyringError(
                f"the active key id {active!r} (from {ACTIVE_FILE!r}) has no key file; "
                f"found {sorted(keys)}"
            )
        states = {k: ACTIVE if k == active else STAGED for k in keys}
        try:
            return build_state(keys, states, created)
        except KeyringError:
            raise
        except (TypeError, ValueError) as exc:  # e.g. a secret too short
            raise KeyringError(f"key directory {str(self.path)!r}: {exc}") from None



def _reopen(kind: str, path: str, watch: bool, interval: float, allow_insecure: bool) -> Keyring:
    from ._keys import Keyring

    opener = Keyring.from_directory if kind == "DirectorySource" else Keyring.from_file
    return opener(
        path, watch=watch, watch_interval=interval, allow_insecure_permissions=allow_insecure
    )


def write_atomically(path: str | os.PathLike[str], data: bytes) -> None:
    """
    Replace *path* with *data*: a temporary file (mode 0600) in the same
    directory, flushed to disk, renamed over *path*, and the directory synced.
    """
    p = Path(path)
    directory = p.parent if str(p.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


@contextlib.contextmanager
def locked(path: str | os.PathLike[str]) -> Iterator[None]:
    """
    Hold an exclusive lock for a read-modify-write of the keyring file at
    *path*, so that two commands editing it at once cannot lose a change.
    The lock is on the directory, which atomic renames leave in place.
    """
    import fcntl

    directory = Path(path).parent if str(Path(path).parent) else Path(".")
    fd = os.open(directory, os.O_RDONLY)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                break
            except OSError as exc:  # pragma: no cover - EINTR
                if exc.errno != errno.EINTR:
                    raise
        yield
    finally:
        os.close(fd)
