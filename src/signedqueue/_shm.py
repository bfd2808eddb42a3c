"""
Shared-memory segments for large frames (Linux ``/dev/shm``).

A frame at least ``shm_threshold`` bytes long is not pushed through the
queue's pipe: the producer's feeder thread writes it into a new file in
``/dev/shm`` (mode 0600), hashing each chunk as it goes, and sends only the
segment's name and size through the pipe.  The consumer opens the segment,
**unlinks it at once**, copies it into private memory chunk by chunk while
hashing it (so what is verified is exactly what is loaded, whatever anyone
writes into the segment meanwhile), and loads it like any other frame.  The
tag covers the frame's bytes as they were in shared memory.

No segment outlives its queue:

* the consumer unlinks a segment before verifying it, so a refused, expired
  or oversized frame leaves nothing behind;
* a feeder that cannot announce a segment (the pipe closed) unlinks it;
* segments whose frame was never taken (the queue was abandoned with items
  in it, or a consumer died between reading the name and opening it) are
  removed by the process that created the queue when it exits, after its
  child processes have been joined (:func:`sweep`).

Names are ``signedqueue-<queue token>-<pid>-<n>-<random>``; a consumer opens
only names of its own queue's token, without blocking and never following a
symlink, and takes only regular files owned by its own user.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import re
import secrets
import stat
import sys
from collections.abc import Callable

from ._sealing import Sealing, chunks_of

__all__ = ["SHM_DIR", "available", "create", "open_segment", "read_into", "sweep"]

SHM_DIR = "/dev/shm"  # noqa: S108 - POSIX shared memory; files made O_EXCL, mode 0600
PREFIX = "signedqueue-"
_NAME_RE = re.compile(r"signedqueue-([0-9a-f]{16})-[0-9]{1,10}-[0-9]{1,20}-[0-9a-f]{8}\Z")
#: Names tried before giving up when every one is taken (squatted).
_ATTEMPTS = 8
_counter = itertools.count()


class SegmentError(OSError):
    """A segment named in the pipe cannot be used."""


def available() -> bool:
    """True where segments can be made: Linux with a writable ``/dev/shm``."""
    return (
        sys.platform.startswith("linux")
        and os.path.isdir(SHM_DIR)
        and os.access(SHM_DIR, os.W_OK | os.X_OK)
    )


def _path(name: str) -> str:
    return os.path.join(SHM_DIR, name)


def create(token: str, frame: Sealing | bytes | bytearray | memoryview) -> str:
    """
    Write *frame* into a new segment and return its name.  A
    :class:`Sealing` is hashed as it is written; its tag is written last.
    """
    for attempt in range(_ATTEMPTS):
        name = f"{PREFIX}{token}-{os.getpid()}-{next(_counter)}-{secrets.token_hex(4)}"
        try:
            fd = os.open(
                _path(name),
                os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
            )
            break
        except FileExistsError:  # someone made a file of that name first
            if attempt == _ATTEMPTS - 1:
                raise
    try:
        pos = 0

        def write(view: memoryview) -> None:
            nonlocal pos
            while len(view):
                n = os.pwrite(fd, view, pos)
                pos += n
                view = view[n:]

        if isinstance(frame, Sealing):
            frame.stream(write)
        else:
            for view in chunks_of([memoryview(frame).cast("B")]):
                write(view)
    except BaseException:
        os.close(fd)
        remove(name)
        raise
    os.close(fd)
    return name


def remove(name: str) -> None:
    """
    Unlink a segment if it is still there; something else put in its place
    goes too if it can (an empty directory, a symlink, a FIFO).
    """
    path = _path(name)
    try:
        os.unlink(path)
    except IsADirectoryError:
        with contextlib.suppress(OSError):
            os.rmdir(path)
    except OSError:  # gone already, or another user's (sticky /dev/shm)
        pass


def open_segment(token: str, name: str, size: int) -> int:
    """
    Open and unlink the segment *name* of the queue *token*, which must hold
    exactly *size* bytes; return a file descriptor to read it from.
    """
    match = _NAME_RE.match(name)
    if match is None or match.group(1) != token:
        raise SegmentError(f"the pipe names a segment that is not this queue's: {name!r}")
    try:
        # O_NONBLOCK: a FIFO of that name must not block the consumer.
        fd = os.open(
            _path(name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        )
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a symlink: remove the link itself
            remove(name)
        raise SegmentError(f"segment {name!r} cannot be opened ({exc.strerror})") from None
    try:
        st = os.fstat(fd)
        remove(name)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise SegmentError(f"segment {name!r} is not a regular file of this user")
        if st.st_size != size:
            raise SegmentError(
                f"segment {name!r} holds {st.st_size} bytes but the pipe says {size}"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_into(fd: int) -> Callable[[memoryview], None]:
    """A fill function reading *fd* sequentially into the views it is given."""
    pos = 0

    def fill(view: memoryview) -> None:
        nonlocal pos
        while len(view):
            n = os.preadv(fd, [view], pos)
            if n == 0:
                raise SegmentError("segment shorter than announced")
            pos += n
            view = view[n:]

    return fill


def sweep(token: str) -> None:
    """Remove every segment of the queue *token* that is still there."""
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return
    for name in names:
        match = _NAME_RE.match(name)
        if match is not None and match.group(1) == token:
            remove(name)
