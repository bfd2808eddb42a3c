"""
Raw records over a pipe: the transport under :class:`SignedQueue`.

A record is an 8-byte big-endian length followed by that many bytes (one
frame).  If the length's top bit is set, the record instead stands for a
frame in a sealed memory file passed beside the pipe (see
:mod:`signedqueue._shm`): 16 bytes, the frame's size and the file's inode
number, both 8-byte big-endian.  Nothing here
deserializes anything: records are read into a preallocated buffer and
handed to the codec, which verifies them first.

Writes are vectored (the length and the frame go out in one ``writev`` with
no concatenation), and the pipe buffer is enlarged where the OS allows, so
large frames cross in few system calls.
"""

from __future__ import annotations

import os
import select
import struct
import sys
from collections.abc import Callable

from ._frame import KEPT_OF_OVERSIZED
from ._sealing import Sealing

__all__ = [
    "RECORD_HEADER",
    "Oversized",
    "SegmentRef",
    "enlarge_pipe",
    "read_record",
    "write_record",
    "write_segment_ref",
]

RECORD_HEADER = struct.Struct(">Q")
_unpack = RECORD_HEADER.unpack
#: Top bit of a record's length: the frame is in a sealed memory file.
SEGMENT = 1 << 63
_SEGMENT_RECORD = struct.Struct(">QQ")
#: Pipe buffer size requested on Linux (the unprivileged maximum by default).
PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = 1031  # Linux fcntl


class Oversized:
    """A record longer than the reader's limit, drained without storing it."""

    __slots__ = ("malformed", "prefix", "size")

    def __init__(self, size: int, prefix: bytes, malformed: bool = False) -> None:
        self.size = size
        self.prefix = prefix
        #: Not too large but not a record at all (a bad shared-memory record).
        self.malformed = malformed


class SegmentRef:
    """A record standing for a frame in a sealed memory file."""

    __slots__ = ("error", "fd", "inode", "record", "size")

    def __init__(self, size: int, inode: int, record: bytes) -> None:
        self.size = size
        self.inode = inode
        self.record = record
        #: The memory file, once taken from the socket (or why it was not).
        self.fd: int | None = None
        self.error: OSError | None = None


def enlarge_pipe(fd: int) -> None:
    """Ask for a 1 MiB pipe buffer; silently keep the default if refused."""
    if sys.platform.startswith("linux"):
        try:
            import fcntl

            fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:  # pragma: no cover - limited by /proc/sys/fs/pipe-max-size
            pass


def write_record(fd: int, frame: bytes | bytearray | memoryview | Sealing) -> None:
    """
    Write one record, however many partial writes it takes.  A
    :class:`Sealing` is hashed chunk by chunk as it is written.
    """
    if isinstance(frame, Sealing):
        _write_views(fd, [memoryview(RECORD_HEADER.pack(frame.size))])
        frame.stream(lambda view: _write_views(fd, [view]))
        return
    _write_views(fd, [memoryview(RECORD_HEADER.pack(len(frame))), memoryview(frame).cast("B")])


def write_segment_ref(fd: int, size: int, inode: int) -> None:
    """Write a record for a *size*-byte frame in the memory file *inode*."""
    body = _SEGMENT_RECORD.pack(size, inode)
    _write_views(fd, [memoryview(RECORD_HEADER.pack(SEGMENT | len(body)) + body)])


def write_all(fd: int, data: bytes) -> None:
    """Write *data* (one or more whole records), however many writes it takes."""
    _write_views(fd, [memoryview(data)])


def _write_views(fd: int, views: list[memoryview]) -> None:
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


#: Milliseconds a reader waits for the rest of a record between calls to its
#: *stalled* callback.
STALL_CHECK_MS = 1000
#: Records at least this long are read watchfully from their first byte on;
#: shorter ones only once part of them has come (that costs no system call
#: on the fast path).
WATCHED = 1 << 16


def _read_into(
    fd: int, view: memoryview, stalled: Callable[[], None] | None = None
) -> None:
    while len(view):
        if stalled is not None:
            # The rest of a record that has begun: while it does not come,
            # ask *stalled* (which raises if its writer can never finish it).
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            while not poller.poll(STALL_CHECK_MS):
                stalled()
        n = os.readv(fd, [view])
        if n == 0:
            raise EOFError("the queue's pipe was closed in the middle of a record")
        view = view[n:]


def read_record(
    fd: int, limit: int, stalled: Callable[[], None] | None = None
) -> bytearray | Oversized | SegmentRef:
    """
    Read one record.  A record longer than *limit* is drained in chunks and
    returned as :class:`Oversized`, so the next record is still readable and
    memory stays bounded.  While the rest of a record is slow to come,
    *stalled* is called every ``STALL_CHECK_MS`` (it may raise).
    """
    head = os.read(fd, 8)
    if len(head) != 8:
        if not head:
            raise EOFError
        rest = bytearray(8 - len(head))
        _read_into(fd, memoryview(rest), stalled)
        head += rest
    (size,) = _unpack(head)
    if size & SEGMENT:
        size &= ~SEGMENT
        if size != _SEGMENT_RECORD.size:
            # Not one of ours: drained, and refused as malformed.
            return _drain(fd, size, True, stalled)
        body = bytearray(size)
        _read_into(fd, memoryview(body), stalled)
        frame_size, inode = _SEGMENT_RECORD.unpack(body)
        return SegmentRef(frame_size, inode, bytes(head) + bytes(body))
    if size > limit:
        return _drain(fd, size, False, stalled)
    buf = bytearray(size)
    if stalled is not None and size >= WATCHED:
        # A large record's header may have come without its body (the
        # producer streams the body after it): wait for the body watchfully.
        _read_into(fd, memoryview(buf), stalled)
        return buf
    got = os.readv(fd, [buf])
    if got != size:
        if got == 0 and size:
            raise EOFError("the queue's pipe was closed in the middle of a record")
        _read_into(fd, memoryview(buf)[got:], stalled)
    return buf


def _drain(
    fd: int, size: int, malformed: bool = False, stalled: Callable[[], None] | None = None
) -> Oversized:
    """Read and drop a *size*-byte record body, keeping only its start."""
    keep = bytearray(min(size, KEPT_OF_OVERSIZED))
    _read_into(fd, memoryview(keep), stalled)
    left = size - len(keep)
    chunk = bytearray(min(left, 1 << 16))
    while left:
        view = memoryview(chunk)[: min(left, len(chunk))]
        _read_into(fd, view, stalled)
        left -= len(view)
    return Oversized(size, bytes(keep), malformed)
