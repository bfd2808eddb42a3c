"""
Shared memory for large frames: sealed memfds passed over a socket (Linux).

A frame at least ``shm_threshold`` bytes long is not pushed through the
queue's pipe.  The producer's feeder thread writes it into an anonymous
memory file (``memfd_create``), hashing each chunk right after writing it,
then **seals** the file against every write, shrink and grow
(``F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL``): from then on
its bytes cannot change, for anyone.  The file descriptor goes to the
consumers over a socket beside the pipe (``SCM_RIGHTS``), and a small record
naming it (size and inode) goes through the pipe in its place.

The consumer takes the descriptor, checks that the file is sealed and of the
announced size, maps it privately (copy on write, so loaded arrays are
writable and nothing reaches the producer), verifies the tag over the mapped
bytes and loads them without a copy.  Because the file is sealed, what is
verified is what is loaded.

Nothing can leak and nothing can be named: the memory files have no path,
an in-flight descriptor belongs to the socket, and the kernel frees every
file when the last descriptor or mapping of it goes -- when the consumer
drops the loaded object, or when the queue's processes exit, however they
exit.  A descriptor whose record never came (its producer was killed between
the two writes) is discarded by the next consumer that looks.
"""

from __future__ import annotations

import array
import fcntl
import mmap
import os
import socket
import stat
import sys
from multiprocessing.connection import Connection, Pipe
from typing import Any

from ._sealing import Sealing, chunks_of

__all__ = ["SegmentError", "available", "create", "map_sealed", "receive", "send"]

_SEALS_NEEDED = (
    getattr(fcntl, "F_SEAL_WRITE", 0)
    | getattr(fcntl, "F_SEAL_SHRINK", 0)
    | getattr(fcntl, "F_SEAL_GROW", 0)
)


class SegmentError(OSError):
    """A shared-memory frame announced in the pipe cannot be used."""


def available() -> bool:
    """True where frames can travel as sealed memory files (Linux)."""
    return (
        sys.platform.startswith("linux")
        and hasattr(os, "memfd_create")
        and hasattr(fcntl, "F_ADD_SEALS")
        and hasattr(socket, "send_fds")
    )


def channel() -> tuple[Connection, Connection]:
    """
    The socket pair descriptors travel over: (producers' end, consumers'
    end), as connections, which pass to child processes like the queue's
    pipe does.
    """
    return Pipe(duplex=True)


def _socket(conn: Connection) -> socket.socket:
    # A socket object over the connection's descriptor, detached after use.
    return socket.socket(fileno=conn.fileno())


def create(frame: Sealing | bytes | bytearray | memoryview) -> int:
    """
    Write *frame* into a new sealed memory file and return its descriptor.
    A :class:`Sealing` is hashed as it is written; its tag is written last.
    """
    size = frame.size if isinstance(frame, Sealing) else len(frame)
    fd = os.memfd_create(
        "signedqueue-frame", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
    )
    try:
        os.ftruncate(fd, size)
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
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS_NEEDED | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


def identity(fd: int) -> int:
    """The inode number that names a memory file in the pipe's record."""
    return os.fstat(fd).st_ino


def send(conn: Connection, fd: int) -> None:
    """
    Pass *fd* to the consumers' end without blocking.  Raises ``OSError``
    (``BlockingIOError`` when the socket is full, ``ETOOMANYREFS`` past the
    in-flight limit); the caller then sends the frame through the pipe.
    """
    sock = _socket(conn)
    try:
        # socket.send_fds would ignore the flags: call sendmsg itself.
        sock.sendmsg(
            [b"\0"],
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))],
            socket.MSG_DONTWAIT,
        )
    finally:
        sock.detach()


def receive(conn: Connection, inode: int) -> int:
    """
    Take the descriptor of memory file *inode* from the socket, closing the
    ones queued before it (orphans of a producer killed between its two
    writes).  If it is not there, nothing is taken (the descriptors of the
    frames behind a forged record stay for them) and :class:`SegmentError`
    is raised.  Never blocks.  Call it under the queue's read lock.
    """
    sock = _socket(conn)
    try:
        position = _find(sock, inode)
        if position is None:
            raise SegmentError(
                "the pipe announced a shared-memory frame whose descriptor is not "
                "in the socket"
            )
        for _ in range(position):
            for fd in _take(sock, 0):
                os.close(fd)
        (fd, *extra) = _take(sock, 0) or [-1]
        for other in extra:  # pragma: no cover - one per message
            os.close(other)
        if fd < 0:  # pragma: no cover - it was there a moment ago
            raise SegmentError("the shared-memory descriptor vanished")
        return fd
    finally:
        sock.detach()


#: Messages looked at before a descriptor is declared missing.
_MAX_SCAN = 1024
_SO_PEEK_OFF = getattr(socket, "SO_PEEK_OFF", 42)


def _take(sock: socket.socket, flags: int) -> list[int]:
    """The descriptors of the next one-byte message ([] if it has none)."""
    try:
        data, ancillary, _, _ = sock.recvmsg(
            1,
            socket.CMSG_SPACE(array.array("i").itemsize),
            flags | socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC,
        )
    except BlockingIOError:
        raise EOFError from None
    if not data:
        raise EOFError
    fds = array.array("i")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return list(fds)


def _find(sock: socket.socket, inode: int) -> int | None:
    """How many messages precede the one carrying memory file *inode*."""
    sock.setsockopt(socket.SOL_SOCKET, _SO_PEEK_OFF, 0)
    try:
        for position in range(_MAX_SCAN):
            try:
                fds = _take(sock, socket.MSG_PEEK)
            except EOFError:
                return None
            found = False
            for fd in fds:  # peeked copies: close them all
                try:
                    found = found or os.fstat(fd).st_ino == inode
                finally:
                    os.close(fd)
            if found:
                return position
        return None
    finally:
        sock.setsockopt(socket.SOL_SOCKET, _SO_PEEK_OFF, -1)


def map_sealed(fd: int, size: int) -> Any:
    """
    Map the sealed memory file *fd* of *size* bytes privately (writable,
    copy on write).  Raises :class:`SegmentError` unless it is a regular
    file of exactly that size, sealed against writing, shrinking and growing.
    """
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise SegmentError("the shared-memory frame is not a memory file")
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        seals = 0
    if seals & _SEALS_NEEDED != _SEALS_NEEDED:
        raise SegmentError(
            "the shared-memory frame is not sealed against writes; it could change "
            "after verification"
        )
    if st.st_size != size or size == 0:
        raise SegmentError(
            f"the shared-memory frame holds {st.st_size} bytes but the pipe says {size}"
        )
    return mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
