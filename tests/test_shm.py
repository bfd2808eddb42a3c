"""
Large frames through sealed memory files (``shm_threshold``).

A frame of at least ``shm_threshold`` bytes is written by the producer's
feeder thread into an anonymous memory file (``memfd_create``), sealed
against every write, shrink and grow, and its descriptor is passed over a
socket beside the pipe (``queue._fds``); a 16-byte segment record (frame size
and inode) goes through the pipe in its place.  These tests check both sides
of each claim:

* legitimate frames round-trip through memory files (bytes, str, C and
  Fortran numpy arrays, both MACs, producer and consumer in child processes),
  arrays arrive writable, and smaller frames still go through the pipe;
* the file a consumer receives is sealed, and writes into a loaded array
  never reach it;
* descriptors and records forged by hand (unsealed or partly sealed files,
  tampered frames, wrong sizes, unknown inodes, files that are not memory
  files, records on a queue without shared memory, records of impossible
  length) are refused as :class:`RejectedFrame`, never a crash or a hang, and
  the next item still arrives;
* nothing leaks: no descriptor or mapping of a memory file outlives the
  objects loaded from it, a killed consumer or an abandoned queue;
* ``get_frame()`` returns a verified frame that ``put_frame()`` relays;
* a descriptor that cannot be sent sends the frame through the pipe instead.

Every wait has a timeout; no test asserts on elapsed time.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import hashlib
import mmap
import multiprocessing
import os
import queue
import signal
import socket
import struct
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from processes import WAIT, Background, join_all, start_all
from signedqueue import (
    Allowlist,
    Codec,
    ForbiddenClass,
    FrameTooLarge,
    InvalidSignature,
    Keyring,
    MalformedFrame,
    RejectedFrame,
    SignedJoinableQueue,
    SignedQueue,
    UnknownKey,
    _pipe,
    _shm,
)
from signedqueue._pipe import RECORD_HEADER, SEGMENT, write_segment_ref

np = pytest.importorskip("numpy")

pytestmark = pytest.mark.skipif(
    not _shm.available(), reason="sealed memory files need Linux (memfd_create, SCM_RIGHTS)"
)

FORK = multiprocessing.get_context("fork")
#: How long a call that must not block may take before the test calls it stuck
#: (only to end the test instead of hanging; it is not a speed requirement).
STUCK = 5.0
#: Size of the large items: over the default threshold of 1 MiB.
BIG = 2 << 20
MACS = ["hmac-sha256", "aes256-gmac"]
#: What /proc shows for the queue's memory files.
MEMFD = "memfd:signedqueue-frame"
ALL_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
#: Not in every fcntl module: seals future writes, but not writable mappings made before.
F_SEAL_FUTURE_WRITE = 0x0010


def numpy_allow() -> Allowlist:
    """The allowlist numpy arrays need."""
    return Allowlist(presets=["stdlib", "numpy"])


class Unlisted:
    """A class in no allowlist: frames carrying it are refused by default."""

    def __init__(self, value: object = None) -> None:
        self.value = value


# -- helpers -------------------------------------------------------------------


def big_bytes(seed: int = 0) -> bytes:
    """BIG deterministic bytes."""
    return bytes((i + seed) % 256 for i in range(256)) * (BIG // 256)


def big_str() -> str:
    """A 3 MiB str (not only ASCII)."""
    return ("signed queue \u00e9\u4e2d " * (3 << 16))[: 3 << 20]


def c_array() -> Any:
    """A 2 MiB C-ordered float64 array."""
    return np.arange(BIG // 8, dtype=np.float64).reshape(512, -1)


def fortran_array() -> Any:
    """A 2 MiB Fortran-ordered int32 array."""
    return np.asfortranarray(np.arange(BIG // 4, dtype=np.int32).reshape(1024, -1))


def items() -> list[Any]:
    """What the round-trip producers put: memory-file frames and one pipe frame."""
    return [big_bytes(), big_str(), c_array(), fortran_array(), "small", big_bytes(7)]


def describe(item: Any) -> tuple[Any, ...]:
    """A small, comparable summary of an item (sent back from consumers)."""
    if isinstance(item, np.ndarray):
        return (
            "ndarray", item.dtype.str, item.shape, bool(item.flags.c_contiguous),
            bool(item.flags.f_contiguous), bool(item.flags.writeable),
            hashlib.sha256(item.tobytes(order="A")).hexdigest(),
        )
    if isinstance(item, (bytes, str)):
        data = item if isinstance(item, bytes) else item.encode()
        return (type(item).__name__, len(item), hashlib.sha256(data).hexdigest())
    return ("other", item)


def open_fds() -> dict[int, str]:
    """This process's open descriptors and what they link to."""
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor, closed by now
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return fds


def memfd_fds() -> list[str]:
    """Descriptors of this process that are the queue's memory files."""
    return [target for target in open_fds().values() if MEMFD in target]


def memfd_maps() -> list[str]:
    """Mappings of the queue's memory files in this process."""
    with open("/proc/self/maps") as maps:
        return [line for line in maps if MEMFD in line]


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    """Poll *predicate* until it holds; fail after WAIT seconds."""
    deadline = time.monotonic() + WAIT
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting until {what}")
        time.sleep(0.01)


def settled() -> None:
    """Drop garbage and wait until no in-process feeder holds a memory file."""
    gc.collect()
    wait_until(lambda: not memfd_fds(), "the feeder closed its memory files")


def new_fds(before: dict[int, str]) -> dict[int, str]:
    """Descriptors open now that were not open (as the same thing) before."""
    return {fd: t for fd, t in open_fds().items() if before.get(fd) != t}


def pipe_bytes(q: SignedQueue) -> int:
    """Bytes waiting in the queue's pipe."""
    buf = bytearray(4)
    fcntl.ioctl(q._reader.fileno(), termios.FIONREAD, buf)
    return int(struct.unpack("i", buf)[0])


def memfd_with(data: bytes, seals: int = ALL_SEALS, name: str = "forged") -> int:
    """A memory file holding *data*, with *seals* added (0: none)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if seals:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    except BaseException:
        os.close(fd)
        raise
    return fd


def record_bytes(size: int, inode: int) -> bytes:
    """The bytes of a segment record as they go through the pipe."""
    return RECORD_HEADER.pack(SEGMENT | 16) + struct.pack(">QQ", size, inode)


def announce(q: SignedQueue, fd: int | None, size: int, inode: int | None = None) -> bytes:
    """
    Send *fd* (if any) over the queue's socket as a producer does and write a
    segment record for it (of *size* bytes, inode *inode* or *fd*'s) into the
    pipe; return the record.
    """
    assert q._fds is not None or fd is None
    if inode is None:
        assert fd is not None
        inode = os.fstat(fd).st_ino
    with q._wlock:
        if fd is not None:
            assert q._fds is not None
            _shm.send(q._fds[0], fd)
        write_segment_ref(q._writer.fileno(), size, inode)
    return record_bytes(size, inode)


def call_unless_stuck(
    fn: Callable[[], Any], unstick: Callable[[], None]
) -> tuple[bool, Background]:
    """
    Run *fn* in a thread; if it is still running after STUCK seconds, call
    *unstick* so that it can end.  Returns (was it stuck, the call).
    """
    call = Background(fn)
    deadline = time.monotonic() + STUCK
    while call.running and time.monotonic() < deadline:
        time.sleep(0.01)
    stuck = call.running
    if stuck:
        unstick()
    return stuck, call


@pytest.fixture
def make_queue(ring: Keyring) -> Iterator[Callable[..., SignedQueue]]:
    """Makes queues over ``ring`` (fork context); closes them after the test."""
    made: list[SignedQueue] = []

    def make(cls: type[SignedQueue] = SignedQueue, keyring: Keyring | None = None,
             **options: Any) -> SignedQueue:
        options.setdefault("ctx", FORK)
        q = cls(ring if keyring is None else keyring, **options)
        made.append(q)
        return q

    yield make
    for q in made:
        q.cancel_join_thread()
        q.close()


@pytest.fixture
def closing() -> Iterator[list[int]]:
    """Descriptors a test opens by hand; closed after the test if still open."""
    fds: list[int] = []
    yield fds
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


# -- child process bodies (module level, so that spawn can import them) ----------


def _produce(q: Any) -> None:
    """Put items(), then flush."""
    for item in items():
        q.put(item)
    q.close()
    q.join_thread()


def _consume(q: Any, results: Any, count: int) -> None:
    """Get *count* items and report what each was."""
    results.put([describe(q.get(timeout=WAIT)) for _ in range(count)])


def _consume_counting_fds(q: Any, results: Any, count: int) -> None:
    """Get *count* items, dropping each; report descriptors and mappings left."""
    before = open_fds()
    seen = []
    last = None
    for _ in range(count):
        last = q.get(timeout=WAIT)
        seen.append(describe(last))
    alive = memfd_maps()  # the last array still views its memory file
    del last
    gc.collect()
    results.put((seen, new_fds(before), len(alive), memfd_maps(), memfd_fds()))


def _consume_one_then_hold_a_record(q: Any, report: Any) -> None:
    """Get one item, then read the next record without taking its descriptor."""
    report.send(describe(q.get(timeout=WAIT)))
    record = _pipe.read_record(q._reader.fileno(), q.codec.max_frame_size)
    report.send(type(record).__name__)
    time.sleep(WAIT)


def _produce_small_arrays(q: Any, count: int) -> None:
    """Put *count* small arrays (each a frame of its own memory file), then flush."""
    for i in range(count):
        q.put(np.full(16, i, dtype=np.int64))
    q.close()
    q.join_thread()


def _relay(source: Any, sink: Any) -> None:
    """Relay one frame from *source* into *sink* unopened, then flush."""
    sink.put_frame(source.get_frame(timeout=WAIT))
    sink.close()
    sink.join_thread()


# -- 1. round trips -----------------------------------------------------------------


@pytest.mark.parametrize("mac", MACS)
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_round_trip_between_processes(ring: Keyring, method: str, mac: str) -> None:
    """Bytes, str and C/Fortran arrays cross between processes as memory files."""
    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {method} start method here")
    ctx = multiprocessing.get_context(method)
    q = SignedQueue(ring, ctx=ctx, mac=mac, allow=numpy_allow())
    results = ctx.Queue()
    try:
        producer = ctx.Process(target=_produce, args=(q,))
        start_all([producer])
        join_all([producer])  # flushed with no consumer: the files are in flight
        consumer = ctx.Process(target=_consume, args=(q, results, len(items())))
        start_all([consumer])
        received = results.get(timeout=WAIT)
        join_all([consumer])
    finally:
        q.cancel_join_thread()
        q.close()
        results.close()
        results.join_thread()
    assert received == [describe(item) for item in items()]
    # Arrays arrive writable, in their own memory order.
    assert received[2][3:6] == (True, False, True)  # C order, writable
    assert received[3][3:6] == (False, True, True)  # Fortran order, writable


def spy_on_create(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the memory files _shm.create makes in this process, as it makes them."""
    created: list[int] = []
    create = _shm.create

    def spy(frame: Any) -> int:
        fd = create(frame)
        created.append(os.fstat(fd).st_size)
        return fd

    monkeypatch.setattr(_shm, "create", spy)
    return created


@pytest.mark.parametrize("mac", MACS)
@pytest.mark.parametrize("cls", [SignedQueue, SignedJoinableQueue], ids=lambda c: c.__name__)
def test_round_trip_in_process(
    make_queue: Callable[..., SignedQueue], monkeypatch: pytest.MonkeyPatch,
    mac: str, cls: type[SignedQueue],
) -> None:
    """Large items are made into memory files (one each), arrive equal and writable."""
    created = spy_on_create(monkeypatch)
    q = make_queue(cls, mac=mac, allow=numpy_allow())
    for item in items():
        q.put(item)
    got = [q.get(timeout=WAIT) for _ in items()]
    assert [describe(x) for x in got] == [describe(x) for x in items()]
    assert len(created) == 5 and min(created) >= 1 << 20  # all but "small"
    got[2][0, 0] = -1.0  # arrays are writable, and private
    got[3][0, 0] = -1
    assert got[2][0, 0] == -1.0 and got[3][0, 0] == -1
    if cls is SignedJoinableQueue:
        for _ in got:
            q.task_done()  # type: ignore[attr-defined]
        q.join()  # type: ignore[attr-defined]


def test_frames_below_the_threshold_go_through_the_pipe(
    make_queue: Callable[..., SignedQueue], ring: Keyring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A frame of exactly shm_threshold bytes uses a memory file; one byte less, the pipe."""
    created = spy_on_create(monkeypatch)
    item = big_bytes()[: 300 * 1024]
    size = len(Codec(ring).dumps(item))
    at = make_queue(shm_threshold=size)
    at.put(item)
    assert at.get(timeout=WAIT) == item
    assert created == [size]

    above = make_queue(shm_threshold=size + 1)
    assert above._fds is not None
    above.put(item)
    assert above.get(timeout=WAIT) == item
    assert created == [size]  # no memory file made
    assert not above._fds[1].poll(0)  # and no descriptor passed


def test_shm_threshold_none_sends_everything_through_the_pipe(
    make_queue: Callable[..., SignedQueue], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With shm_threshold=None a 2 MiB frame goes through the pipe; no socket exists."""
    def refuse(frame: Any) -> int:
        raise AssertionError("a memory file was made with shm_threshold=None")

    monkeypatch.setattr(_shm, "create", refuse)
    q = make_queue(shm_threshold=None, allow=numpy_allow())
    assert q._fds is None
    q.put(big_bytes())
    q.put(c_array())
    assert q.get(timeout=WAIT) == big_bytes()
    got = q.get(timeout=WAIT)
    assert np.array_equal(got, c_array()) and got.flags.writeable


@pytest.mark.parametrize("threshold", [0, -1, -(1 << 20), 0.5])
def test_shm_threshold_must_be_positive(ring: Keyring, threshold: Any) -> None:
    """A threshold below one byte is refused."""
    with pytest.raises(ValueError, match="shm_threshold"):
        SignedQueue(ring, shm_threshold=threshold)


# -- 2. sealing ------------------------------------------------------------------------


def test_the_received_memory_file_is_sealed(
    make_queue: Callable[..., SignedQueue], closing: list[int]
) -> None:
    """
    The file a consumer receives cannot be written, shrunk, grown, mapped
    writable and shared, or unsealed; an array loaded from it writes only into
    its private copy.
    """
    q = make_queue(allow=numpy_allow())
    assert q._fds is not None
    q.put(c_array())
    record = _pipe.read_record(q._reader.fileno(), q.codec.max_frame_size)
    assert isinstance(record, _pipe.SegmentRef)
    fd = _shm.receive(q._fds[1], record.inode)
    closing.append(fd)
    assert os.fstat(fd).st_size == record.size
    assert os.readlink(f"/proc/self/fd/{fd}").startswith(f"/{MEMFD}")
    assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & ALL_SEALS == ALL_SEALS
    original = os.pread(fd, record.size, 0)
    for attempt in (
        lambda: os.pwrite(fd, b"\0", 0),
        lambda: os.write(fd, b"\0"),
        lambda: os.ftruncate(fd, record.size - 1),
        lambda: os.ftruncate(fd, record.size + 1),
        lambda: os.ftruncate(fd, 0),
    ):
        with pytest.raises(PermissionError):
            attempt()
    with pytest.raises(PermissionError):
        mmap.mmap(fd, record.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    with pytest.raises(PermissionError):  # F_SEAL_SEAL: no more seals, none removed
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, F_SEAL_FUTURE_WRITE)

    # Hand it back to the queue as it came, and load it.
    announce(q, fd, record.size)
    got = q.get(timeout=WAIT)
    assert np.array_equal(got, c_array()) and got.flags.writeable
    got[...] = -1.0  # writes into the private mapping
    assert os.pread(fd, record.size, 0) == original, "a write into a loaded array reached the file"
    assert np.all(got == -1.0)
    q.put("next")
    assert q.get(timeout=WAIT) == "next"


# -- 3. forged descriptors and records --------------------------------------------------


SEALINGS = {
    "none": 0,
    "write_only": fcntl.F_SEAL_WRITE,
    "no_write_seal": fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL,
    "no_grow_seal": fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK,
    "no_shrink_seal": fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW,
    "future_write": F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW,
}


@pytest.mark.parametrize("how", ["get", "get_frame"])
@pytest.mark.parametrize("valid", [True, False], ids=["signed", "tampered"])
@pytest.mark.parametrize("sealing", list(SEALINGS))
def test_a_memory_file_not_fully_sealed_is_refused(
    make_queue: Callable[..., SignedQueue], ring: Keyring, closing: list[int],
    sealing: str, valid: bool, how: str,
) -> None:
    """
    A memory file sent by hand without all three seals is refused as
    MalformedFrame, even when it holds a validly signed frame (it could change
    after verification); the next item arrives.
    """
    q = make_queue()
    frame = bytearray(Codec(ring).dumps(big_bytes()))
    if not valid:
        frame[len(frame) // 2] ^= 1
    fd = memfd_with(bytes(frame), seals=0)
    closing.append(fd)
    writer = None
    if sealing == "future_write":  # a writable mapping made before the seal survives it
        writer = mmap.mmap(fd, len(frame))
    if SEALINGS[sealing]:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALINGS[sealing])
    try:
        if writer is not None:  # the frame can still change under a consumer
            writer[0] ^= 0

        announce(q, fd, len(frame))
        q.put("next")
        with pytest.raises(MalformedFrame, match="not sealed"):
            getattr(q, how)(timeout=WAIT)
    finally:
        if writer is not None:
            writer.close()
    assert q.get(timeout=WAIT) == "next"


@pytest.mark.parametrize("how", ["get", "get_frame"])
@pytest.mark.parametrize("mac", MACS)
def test_a_sealed_memory_file_is_verified(
    make_queue: Callable[..., SignedQueue], ring: Keyring, closing: list[int],
    mac: str, how: str,
) -> None:
    """
    A fully sealed file with a byte flipped before sealing is refused as
    InvalidSignature with the frame; the same file untouched loads; the next
    item arrives after each.
    """
    q = make_queue(mac=mac, allow=numpy_allow())
    frame = Codec(ring, mac=mac, allow=numpy_allow()).dumps({"role": "user", "blob": c_array()})
    for offset in (frame.index(b"user"), len(frame) // 2, len(frame) - 1):
        tampered = bytearray(frame)
        tampered[offset] ^= 1
        fd = memfd_with(bytes(tampered))
        closing.append(fd)
        announce(q, fd, len(frame))
        q.put("next")
        with pytest.raises(InvalidSignature) as info:
            getattr(q, how)(timeout=WAIT)
        assert info.value.frame == bytes(tampered)
        assert q.get(timeout=WAIT) == "next"

    fd = memfd_with(frame)
    closing.append(fd)
    announce(q, fd, len(frame))
    got = getattr(q, how)(timeout=WAIT)
    if how == "get_frame":
        assert got == frame
    else:
        assert got["role"] == "user" and np.array_equal(got["blob"], c_array())
        assert got["blob"].flags.writeable


@pytest.mark.parametrize("delta", [-1, 1, "zero"])
def test_a_record_with_the_wrong_size_is_refused(
    make_queue: Callable[..., SignedQueue], ring: Keyring, closing: list[int], delta: Any
) -> None:
    """A size other than the file's (smaller, larger, zero) is refused; the next item arrives."""
    q = make_queue()
    frame = Codec(ring).dumps(big_bytes())
    fd = memfd_with(frame)
    closing.append(fd)
    size = 0 if delta == "zero" else len(frame) + delta
    record = announce(q, fd, size)
    q.put("next")
    with pytest.raises(MalformedFrame) as info:
        q.get(timeout=WAIT)
    assert info.value.frame == record
    assert q.get(timeout=WAIT) == "next"


@pytest.mark.parametrize("how", ["get", "get_frame"])
def test_a_record_over_max_frame_size_is_refused_unread(
    make_queue: Callable[..., SignedQueue], ring: Keyring, closing: list[int], how: str
) -> None:
    """A record announcing more than max_frame_size: FrameTooLarge with the file's start."""
    q = make_queue(max_frame_size=1 << 20)
    frame = Codec(ring).dumps(big_bytes())
    fd = memfd_with(frame)
    closing.append(fd)
    announce(q, fd, 1 << 40)
    q.put("next")
    with pytest.raises(FrameTooLarge) as info:
        getattr(q, how)(timeout=WAIT)
    assert (info.value.size, info.value.limit) == (1 << 40, 1 << 20)
    assert frame.startswith(info.value.frame)
    assert q.get(timeout=WAIT) == "next"


@pytest.mark.parametrize("how", ["get", "get_frame"])
def test_a_record_naming_no_descriptor_is_refused_without_blocking(
    make_queue: Callable[..., SignedQueue], closing: list[int], how: str
) -> None:
    """
    A record whose descriptor never came (the socket is empty) is refused as
    MalformedFrame at once: the consumer does not wait on the socket (holding
    the read lock) for a descriptor.
    """
    q = make_queue()
    assert q._fds is not None
    spare = memfd_with(b"", seals=0)  # unsticks a blocked get(): its inode is the record's
    closing.append(spare)
    announce(q, None, 4096, inode=os.fstat(spare).st_ino)
    q.put("next")
    fds = q._fds
    stuck, call = call_unless_stuck(
        lambda: getattr(q, how)(timeout=WAIT), lambda: _shm.send(fds[0], spare)
    )
    with pytest.raises(MalformedFrame):
        call.result()
    assert not stuck, (
        f"{how}() blocked in the socket waiting for a descriptor that never came "
        "(socket.recv_fds ignores its flags argument, so MSG_DONTWAIT is not used)"
    )
    assert q.get(timeout=WAIT) == "next"


def test_a_record_naming_no_descriptor_does_not_discard_the_next_items(
    make_queue: Callable[..., SignedQueue], closing: list[int]
) -> None:
    """
    A forged record naming an inode no descriptor has must not consume the
    descriptors of the items queued behind it: the next (large) item arrives.
    """
    q = make_queue()
    assert q._fds is not None
    spare = memfd_with(b"", seals=0)
    closing.append(spare)
    announce(q, None, 4096, inode=os.fstat(spare).st_ino)
    q.put(big_bytes())
    q.put("next")
    # The next item's descriptor is in the socket and its record in the pipe.
    wait_until(lambda: pipe_bytes(q) >= 2 * 24, "the next item was announced")
    fds = q._fds
    _, call = call_unless_stuck(lambda: q.get(timeout=WAIT), lambda: _shm.send(fds[0], spare))
    with pytest.raises(MalformedFrame):
        call.result()
    assert fds[1].poll(0), (
        "refusing the forged record closed the descriptor of the next item, "
        "whose record is still in the pipe: that item is lost"
    )
    assert q.get(timeout=WAIT) == big_bytes()
    assert q.get(timeout=WAIT) == "next"


def test_orphan_descriptors_before_the_right_one_are_skipped_and_closed(
    make_queue: Callable[..., SignedQueue], ring: Keyring, closing: list[int]
) -> None:
    """
    Descriptors sent with no record (a producer killed between its two
    writes) are closed by the consumer that finds them; the record's file loads.
    """
    q = make_queue()
    settled()
    before = open_fds()
    frame = Codec(ring).dumps(big_bytes())
    right = memfd_with(frame)
    orphans = [memfd_with(frame), memfd_with(b"x", seals=0)]
    r, w = os.pipe()
    closing.extend([right, *orphans, r, w])
    assert q._fds is not None
    with q._wlock:
        for fd in [*orphans, r]:
            _shm.send(q._fds[0], fd)
    announce(q, right, len(frame))
    q.put("next")
    assert q.get(timeout=WAIT) == big_bytes()
    assert q.get(timeout=WAIT) == "next"
    for fd in closing:
        os.close(fd)
    closing.clear()
    settled()
    assert new_fds(before) == {}, "orphan descriptors were received and kept open"
    assert not q._fds[1].poll(0)


@pytest.mark.parametrize("how", ["get", "get_frame"])
def test_a_record_on_a_queue_without_shared_memory_is_refused(
    make_queue: Callable[..., SignedQueue], how: str
) -> None:
    """A segment record reaching a shm_threshold=None queue is refused; the next item arrives."""
    q = make_queue(shm_threshold=None)
    record = announce(q, None, 4096, inode=12345)
    q.put("next")
    with pytest.raises(MalformedFrame) as info:
        getattr(q, how)(timeout=WAIT)
    assert info.value.frame == record
    assert q.get(timeout=WAIT) == "next"


@pytest.mark.parametrize("body_size", [0, 8, 15, 17, 24, 5000])
def test_a_segment_record_of_impossible_length_is_refused(
    make_queue: Callable[..., SignedQueue], body_size: int
) -> None:
    """A record flagged as a memory file but of another length is drained and refused."""
    q = make_queue()
    record = RECORD_HEADER.pack(SEGMENT | body_size) + b"a" * body_size
    with q._wlock:
        os.write(q._writer.fileno(), record)
    q.put("next")
    with pytest.raises(RejectedFrame):
        q.get(timeout=WAIT)
    assert q.get(timeout=WAIT) == "next"


def _descriptor(kind: str, frame: bytes, tmp_path: Path, closing: list[int]) -> int:
    """A descriptor that is not a memory file, of *kind*."""
    if kind in ("regular_file", "regular_file_readonly"):
        path = tmp_path / "frame"
        path.write_bytes(frame)
        fd = os.open(path, os.O_RDWR if kind == "regular_file" else os.O_RDONLY)
        closing.append(fd)
        return fd
    if kind == "directory":
        fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
        closing.append(fd)
        return fd
    if kind == "pipe":
        r, w = os.pipe()
        closing.extend([r, w])
        return r
    if kind == "socket":
        a, b = socket.socketpair()
        closing.extend([a.detach(), b.detach()])
        return closing[-2]
    if kind == "dev_zero":
        fd = os.open("/dev/zero", os.O_RDONLY)
        closing.append(fd)
        return fd
    raise AssertionError(kind)


NOT_MEMFDS = ["regular_file", "regular_file_readonly", "directory", "pipe", "socket", "dev_zero"]


@pytest.mark.parametrize("how", ["get", "get_frame"])
@pytest.mark.parametrize("kind", NOT_MEMFDS)
def test_a_descriptor_that_is_not_a_memory_file_is_refused(
    make_queue: Callable[..., SignedQueue], ring: Keyring, tmp_path: Path,
    closing: list[int], kind: str, how: str,
) -> None:
    """A regular file, directory, pipe, socket or device sent as the frame: MalformedFrame."""
    q = make_queue()
    frame = Codec(ring).dumps(big_bytes())
    fd = _descriptor(kind, frame, tmp_path, closing)
    settled()
    before = open_fds()
    announce(q, fd, len(frame))
    q.put("next")
    with pytest.raises(MalformedFrame):
        getattr(q, how)(timeout=WAIT)
    assert q.get(timeout=WAIT) == "next"
    assert new_fds(before) == {}, "the received descriptor was not closed"
    if kind == "regular_file":
        assert (tmp_path / "frame").read_bytes() == frame


@pytest.mark.parametrize("how", ["get", "get_frame"])
@pytest.mark.parametrize("kind", NOT_MEMFDS)
def test_a_descriptor_that_is_not_a_memory_file_announced_oversized_is_refused(
    make_queue: Callable[..., SignedQueue], ring: Keyring, tmp_path: Path,
    closing: list[int], kind: str, how: str,
) -> None:
    """
    The same descriptors under a record over max_frame_size: FrameTooLarge
    (a RejectedFrame, not an OSError from reading the start of something that
    cannot be read at an offset), the descriptor closed, the next item arrives.
    """
    q = make_queue(max_frame_size=1 << 20)
    frame = Codec(ring).dumps(big_bytes())
    fd = _descriptor(kind, frame, tmp_path, closing)
    settled()
    before = open_fds()
    announce(q, fd, 1 << 30)
    q.put("next")
    with pytest.raises(FrameTooLarge):
        getattr(q, how)(timeout=WAIT)
    assert q.get(timeout=WAIT) == "next"
    assert new_fds(before) == {}, "the received descriptor was not closed"


# -- 4. no leaks ------------------------------------------------------------------------------


def test_a_consumer_process_keeps_no_descriptor_or_mapping(ring: Keyring) -> None:
    """
    50 large items (arrays and bytes) through a consumer process: it holds no
    more descriptors after than before, and once the loaded objects are
    dropped no memory file is mapped or open.
    """
    count = 50
    q = SignedQueue(ring, ctx=FORK, shm_threshold=64 * 1024, allow=numpy_allow())
    results = FORK.Queue()
    sent = [
        np.full(32 * 1024, i, dtype=np.float64) if i % 2 else bytes([i]) * (128 * 1024)
        for i in range(count)
    ]
    try:
        consumer = FORK.Process(target=_consume_counting_fds, args=(q, results, count))
        start_all([consumer])
        for item in sent:
            q.put(item)
        seen, leaked, alive, maps, fds = results.get(timeout=WAIT)
        join_all([consumer])
        consumer.close()
    finally:
        q.cancel_join_thread()
        q.close()
        results.close()
        results.join_thread()
    assert seen == [describe(item) for item in sent]
    assert alive == 1  # the last array viewed its (private) mapping of the file
    assert leaked == {}
    assert maps == [] and fds == []


def test_loaded_objects_hold_the_only_mapping(make_queue: Callable[..., SignedQueue]) -> None:
    """In process: an array maps its memory file while it lives, and nothing after."""
    q = make_queue(allow=numpy_allow())
    settled()
    before = open_fds()
    q.put(c_array())
    q.put(big_bytes())
    array = q.get(timeout=WAIT)
    data = q.get(timeout=WAIT)
    assert data == big_bytes()
    settled_maps = memfd_maps()
    assert len(settled_maps) == 1, settled_maps  # the array's; the bytes were copied
    del array
    settled()
    assert memfd_maps() == []
    assert new_fds(before) == {}


@pytest.mark.parametrize("kind", ["foreign_key", "too_large", "forbidden_class", "tampered"])
def test_refused_frames_release_their_memory_files(
    make_queue: Callable[..., SignedQueue], ring: Keyring, kind: str
) -> None:
    """Large frames refused at get() leave no descriptor or mapping; the next item arrives."""
    q = make_queue(max_frame_size=(1 << 20) if kind == "too_large" else 64 << 20,
                   shm_threshold=64 * 1024)
    if kind == "foreign_key":
        frame, refusal = Codec(Keyring.generate()).dumps(big_bytes()), UnknownKey
    elif kind == "too_large":
        frame, refusal = Codec(ring).dumps(big_bytes()), FrameTooLarge
    elif kind == "forbidden_class":
        frame, refusal = Codec(ring).dumps(Unlisted(big_bytes())), ForbiddenClass
    else:
        tampered = bytearray(Codec(ring).dumps(big_bytes()))
        tampered[len(tampered) // 2] ^= 1
        frame, refusal = bytes(tampered), InvalidSignature
    settled()
    before = open_fds()
    for _ in range(5):
        q.put_frame(frame)
        q.put("next")
        with pytest.raises(refusal) as info:
            q.get(timeout=WAIT)
        assert isinstance(info.value, RejectedFrame)
        del info
        assert q.get(timeout=WAIT) == "next"
    settled()
    assert memfd_maps() == []
    assert new_fds(before) == {}


@pytest.mark.parametrize("where", ["creator", "child"])
def test_an_abandoned_queue_leaves_nothing_behind(
    ring: Keyring, where: str
) -> None:
    """
    A queue closed and dropped with large items in flight (put by its creator
    or by a child that exited): the process holds only the queue's own
    descriptors while it lives, and nothing of it afterwards.
    """
    settled()
    before = open_fds()
    q = SignedQueue(ring, ctx=FORK)
    assert q._fds is not None
    own = {q._reader.fileno(), q._writer.fileno(), q._fds[0].fileno(), q._fds[1].fileno()}
    if where == "creator":
        for i in range(3):
            q.put(big_bytes(i))
        q.close()
        q.join_thread()  # the feeder wrote them and closed the pipe's ends
    else:
        producer = FORK.Process(target=_produce, args=(q,))
        start_all([producer])
        join_all([producer])
        producer.close()
        q.close()
    assert q._fds[1].poll(0)  # descriptors in flight
    assert set(new_fds(before)) <= own
    assert memfd_fds() == [] and memfd_maps() == []
    del q
    gc.collect()
    assert new_fds(before) == {}


def test_a_killed_consumer_leaves_nothing_behind(ring: Keyring) -> None:
    """
    A consumer SIGKILLed after reading a record but before taking its
    descriptor: the parent skips the orphan, gets the remaining items, and
    afterwards holds nothing but what it held before.
    """
    settled()
    before = open_fds()
    q = SignedQueue(ring, ctx=FORK)
    reader, writer = FORK.Pipe(duplex=False)
    try:
        consumer = FORK.Process(target=_consume_one_then_hold_a_record, args=(q, writer))
        start_all([consumer])
        for i in range(4):
            q.put(big_bytes(i))
        assert reader.poll(WAIT)
        assert reader.recv() == describe(big_bytes(0))
        assert reader.poll(WAIT)
        assert reader.recv() == "SegmentRef"  # item 1: record read, descriptor not taken
        os.kill(consumer.pid, signal.SIGKILL)  # type: ignore[arg-type]
        consumer.join(WAIT)
        assert consumer.exitcode == -signal.SIGKILL
        consumer.close()
        assert q.get(timeout=WAIT) == big_bytes(2)
        assert q.get(timeout=WAIT) == big_bytes(3)
        assert q._fds is not None and not q._fds[1].poll(0)  # the orphan was taken
    finally:
        q.cancel_join_thread()
        q.close()
        reader.close()
        writer.close()
    settled()
    assert memfd_maps() == []
    del q
    gc.collect()
    assert new_fds(before) == {}


# -- 5. get_frame() and put_frame() -------------------------------------------------------------


@pytest.mark.parametrize("mac", MACS)
def test_get_frame_of_a_memory_file_relays_into_other_queues(
    make_queue: Callable[..., SignedQueue], ring: Keyring, monkeypatch: pytest.MonkeyPatch,
    mac: str,
) -> None:
    """get_frame() returns the verified frame; put_frame() relays it (shm and pipe) and it loads."""
    created = spy_on_create(monkeypatch)
    source = make_queue(mac=mac, allow=numpy_allow())
    sink = make_queue(mac=mac, allow=numpy_allow())
    piped = make_queue(mac=mac, allow=numpy_allow(), shm_threshold=None)
    source.put(fortran_array())
    frame = source.get_frame(timeout=WAIT)
    assert isinstance(frame, bytes)
    assert created == [len(frame)]
    info = Codec(ring, mac=mac).verify(frame)
    assert info.payload_size > BIG
    sink.put_frame(frame)
    got = sink.get(timeout=WAIT)
    assert created == [len(frame)] * 2  # relayed as a memory file
    assert describe(got) == describe(fortran_array())
    piped.put_frame(frame)
    assert describe(piped.get(timeout=WAIT)) == describe(fortran_array())
    assert created == [len(frame)] * 2
    del got
    settled()
    assert memfd_maps() == []


def test_get_frame_from_a_consumer_process_relays_back(ring: Keyring) -> None:
    """A frame taken with get_frame() in a child and relayed back with put_frame() loads."""
    source = SignedQueue(ring, ctx=FORK, allow=numpy_allow())
    sink = SignedQueue(ring, ctx=FORK, allow=numpy_allow())
    try:
        relay = FORK.Process(target=_relay, args=(source, sink))
        start_all([relay])
        source.put(c_array())
        got = sink.get(timeout=WAIT)
        join_all([relay])
        relay.close()
    finally:
        for q in (source, sink):
            q.cancel_join_thread()
            q.close()
    assert describe(got) == describe(c_array())


def test_a_pipe_frame_relayed_into_a_shm_queue_uses_a_memory_file(
    make_queue: Callable[..., SignedQueue], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large frame taken from a pipe-only queue travels on as a memory file."""
    piped = make_queue(shm_threshold=None)
    sink = make_queue()
    piped.put(big_bytes())
    frame = piped.get_frame(timeout=WAIT)
    created = spy_on_create(monkeypatch)
    sink.put_frame(frame)
    assert sink.get(timeout=WAIT) == big_bytes()
    assert created == [len(frame)]
    with pytest.raises(queue.Empty):
        piped.get(timeout=0.05)


# -- 6. falling back to the pipe ----------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [BlockingIOError(errno.EAGAIN, "full"), OSError(errno.ETOOMANYREFS, "too many in flight")],
    ids=["socket_full", "in_flight_limit"],
)
def test_a_descriptor_that_cannot_be_sent_sends_the_frame_through_the_pipe(
    make_queue: Callable[..., SignedQueue], monkeypatch: pytest.MonkeyPatch, error: OSError
) -> None:
    """When send() fails the frame goes through the pipe, arrives, and its file is closed."""
    attempts: list[int] = []

    def fail(conn: Any, fd: int) -> None:
        attempts.append(fd)
        raise error

    monkeypatch.setattr(_shm, "send", fail)
    q = make_queue(allow=numpy_allow())
    assert q._fds is not None
    settled()
    before = open_fds()
    q.put(big_bytes())
    q.put(c_array())
    q.put("next")
    assert q.get(timeout=WAIT) == big_bytes()
    got = q.get(timeout=WAIT)
    assert np.array_equal(got, c_array()) and got.flags.writeable
    assert q.get(timeout=WAIT) == "next"
    assert len(attempts) == 2
    assert not q._fds[1].poll(0)
    settled()
    assert memfd_maps() == []
    assert new_fds(before) == {}


def _socket_capacity() -> int:
    """How many one-descriptor messages a fresh socket pair holds before it is full."""
    a, b = socket.socketpair()
    fd = os.memfd_create("capacity", os.MFD_CLOEXEC)
    count = 0
    try:
        a.setblocking(False)
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))]
        while count < 100_000:
            try:
                a.sendmsg([b"\0"], rights)
            except OSError:
                break
            count += 1
    finally:
        os.close(fd)
        a.close()
        b.close()
    return count


def test_a_full_socket_sends_the_rest_through_the_pipe(ring: Keyring) -> None:
    """
    More memory-file frames than the socket holds, with no consumer yet: the
    producer does not block on the full socket but sends the rest through the
    pipe, flushes and exits; every item then arrives, in order.
    """
    count = _socket_capacity() + 100
    q = SignedQueue(ring, ctx=FORK, shm_threshold=1, allow=numpy_allow())
    got: list[Any] = []
    try:
        producer = FORK.Process(target=_produce_small_arrays, args=(q, count))
        start_all([producer])
        deadline = time.monotonic() + STUCK
        while producer.is_alive() and time.monotonic() < deadline:
            producer.join(0.05)
        stuck = producer.is_alive()
        got = [q.get(timeout=WAIT) for _ in range(count)]  # also unsticks it
        join_all([producer])
        producer.close()
    finally:
        q.cancel_join_thread()
        q.close()
    assert [int(a[0]) for a in got] == list(range(count))
    assert not stuck, (
        "the producer blocked on the full socket instead of sending frames through "
        "the pipe (socket.send_fds ignores its flags argument, so MSG_DONTWAIT is not used)"
    )
