"""
Large frames through shared-memory segments (``shm_threshold``).

A frame of at least ``shm_threshold`` bytes is written into a file
``/dev/shm/signedqueue-<token>-<pid>-<n>`` and only a small segment record
goes through the queue's pipe.  These tests check both sides of each claim:

* legitimate frames round-trip through segments (bytes, C and Fortran numpy
  arrays, both MACs, producer and consumer in child processes) and smaller
  frames still go through the pipe;
* a segment altered, truncated or replaced after it was sent is refused as a
  :class:`RejectedFrame` carrying the frame, the segment is gone afterwards
  and the next item still arrives;
* segment records written straight into the pipe (another queue's segment,
  path traversal, missing files, wrong sizes, files that are not regular) are
  refused, no file outside ``/dev/shm`` is touched and the queue keeps working;
* no segment outlives its queue: abandoned items, a consumer killed with a
  record in flight and refused frames leave nothing in ``/dev/shm``;
* ``get_frame()`` returns a segment's verified frame, which ``put_frame()``
  relays into another queue.

Every wait has a timeout; no test asserts on elapsed time.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import queue
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from processes import Background, join_all, start_all
from signedqueue import (
    Allowlist,
    Codec,
    ExpiredFrame,
    ForbiddenClass,
    FrameTooLarge,
    InvalidSignature,
    Keyring,
    MalformedFrame,
    RejectedFrame,
    SignedJoinableQueue,
    SignedQueue,
    UnknownKey,
    _shm,
)
from signedqueue._pipe import RECORD_HEADER, SEGMENT, write_record, write_segment_ref

np = pytest.importorskip("numpy")

pytestmark = pytest.mark.skipif(
    not _shm.available(), reason="shared-memory segments need Linux with a writable /dev/shm"
)

#: Seconds any get(), join() or child process may take (the machine is noisy).
WAIT = 60.0
#: Timeout of calls that are expected to time out; its value never matters.
SHORT = 0.05
SHM_DIR = Path(_shm.SHM_DIR)
#: Size of the large items: over the default threshold of 1 MiB.
BIG = 2 << 20
#: Tag size of each MAC algorithm.
TAG_SIZES = {"hmac-sha256": 32, "aes256-gmac": 16}
MACS = list(TAG_SIZES)


def numpy_allow() -> Allowlist:
    """The allowlist numpy arrays need."""
    return Allowlist(presets=["stdlib", "numpy"])


class Unlisted:
    """A class in no allowlist: frames carrying it are refused by default."""

    def __init__(self, value: object = None) -> None:
        self.value = value


# -- helpers -----------------------------------------------------------------


def segments(token: str) -> list[str]:
    """Names of the segments of the queue *token* now in /dev/shm."""
    prefix = f"{_shm.PREFIX}{token}-"
    return sorted(name for name in os.listdir(SHM_DIR) if name.startswith(prefix))


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    """Poll *predicate* until it holds; fail after WAIT seconds."""
    deadline = time.monotonic() + WAIT
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting until {what}")
        time.sleep(0.01)


def sent_segment(q: SignedQueue) -> Path:
    """
    Wait until the feeder has written the queue's only segment and announced it
    in the pipe (the record is written after the segment is complete).
    """
    wait_until(lambda: bool(segments(q._token)) and q._poll(), "a segment was announced")
    names = segments(q._token)
    assert len(names) == 1, names
    return SHM_DIR / names[0]


def big_bytes(seed: int = 0) -> bytes:
    """BIG deterministic bytes."""
    return bytes((i + seed) % 256 for i in range(256)) * (BIG // 256)


def c_array() -> Any:
    """A 2 MiB C-ordered float64 array."""
    return np.arange(BIG // 8, dtype=np.float64).reshape(512, -1)


def fortran_array() -> Any:
    """A 2 MiB Fortran-ordered int32 array."""
    return np.asfortranarray(np.arange(BIG // 4, dtype=np.int32).reshape(1024, -1))


def items() -> list[Any]:
    """What the round-trip producers put: segment frames and one pipe frame."""
    return [big_bytes(), c_array(), fortran_array(), "small", big_bytes(7)]


def describe(item: Any) -> tuple[Any, ...]:
    """A small, comparable summary of an item (sent back from consumers)."""
    if isinstance(item, np.ndarray):
        return (
            "ndarray", item.dtype.str, item.shape, bool(item.flags.c_contiguous),
            bool(item.flags.f_contiguous), bool(item.flags.writeable),
            hashlib.sha256(item.tobytes(order="A")).hexdigest(),
        )
    if isinstance(item, bytes):
        return ("bytes", len(item), hashlib.sha256(item).hexdigest())
    return ("other", item)


def layout(frame: bytes, mac: str) -> dict[str, int]:
    """Offsets of a frame's regions (header fields, payload, tag)."""
    kid_len = frame[6]
    header = 7 + kid_len + 32
    tag = TAG_SIZES[mac]
    return {
        "magic": 0,
        "mac_alg": 3,
        "key_id": 7,
        "created": 7 + kid_len + 2,
        "nonce": 7 + kid_len + 8 + 5,
        "payload_length": 7 + kid_len + 24 + 7,
        "buffer_table": header + 4 + 6,  # the array buffer's length
        "pickle": frame.index(b"role"),
        "oob_buffer": len(frame) - tag - 4096,
        "tag": len(frame) - 1,
    }


def segment_record(size: int, name: bytes) -> bytes:
    """The bytes of a segment record as they go through the pipe."""
    body = RECORD_HEADER.pack(size) + name
    return RECORD_HEADER.pack(SEGMENT | len(body)) + body


@pytest.fixture
def make_queue(ring: Keyring) -> Iterator[Callable[..., SignedQueue]]:
    """Makes queues over ``ring``; closes them and removes their segments after the test."""
    made: list[SignedQueue] = []

    def make(cls: type[SignedQueue] = SignedQueue, keyring: Keyring | None = None,
             **options: Any) -> SignedQueue:
        q = cls(ring if keyring is None else keyring, **options)
        made.append(q)
        return q

    yield make
    for q in made:
        q.cancel_join_thread()
        q.close()
        _shm.sweep(q._token)


@pytest.fixture
def shm_paths() -> Iterator[list[Path]]:
    """Paths in /dev/shm a test makes by hand; removed after the test."""
    paths: list[Path] = []
    yield paths
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        elif os.path.lexists(path):
            path.unlink()


# -- child process bodies (module level, so that spawn can import them) -------


def _produce(q: Any) -> None:
    """Put items(), then flush."""
    for item in items():
        q.put(item)
    q.close()
    q.join_thread()


def _consume(q: Any, results: Any, count: int) -> None:
    """Get *count* items and report what each was."""
    results.put([describe(q.get(timeout=WAIT)) for _ in range(count)])


# -- 1. round trips ------------------------------------------------------------


@pytest.mark.parametrize("mac", MACS)
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_round_trip_between_processes(ring: Keyring, method: str, mac: str) -> None:
    """Bytes and C/Fortran arrays cross between processes through segments; none remain."""
    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {method} start method here")
    ctx = multiprocessing.get_context(method)
    q = SignedQueue(ring, ctx=ctx, mac=mac, allow=numpy_allow())
    results = ctx.Queue()
    try:
        producer = ctx.Process(target=_produce, args=(q,))
        start_all([producer])
        join_all([producer])  # flushed with no consumer: only records in the pipe
        names = segments(q._token)
        assert [re.sub(r"-[0-9]+-[0-9a-f]{8}\Z", "", n) for n in names] == [
            f"signedqueue-{q._token}-{producer.pid}"
        ] * 4
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
    assert received[1][3:6] == (True, False, True)  # C order, writable
    assert received[2][3:6] == (False, True, True)  # Fortran order, writable
    assert segments(q._token) == []


@pytest.mark.parametrize("mac", MACS)
@pytest.mark.parametrize("cls", [SignedQueue, SignedJoinableQueue], ids=lambda c: c.__name__)
def test_round_trip_in_process(
    make_queue: Callable[..., SignedQueue], mac: str, cls: type[SignedQueue]
) -> None:
    """A segment is a 0600 file of the queue's token while queued and is gone once taken."""
    q = make_queue(cls, mac=mac, allow=numpy_allow())
    assert re.fullmatch(r"[0-9a-f]{16}", q._token)
    for item in items():
        q.put(item)
    wait_until(lambda: len(segments(q._token)) == 4, "four segments were made")
    for name in segments(q._token):
        assert re.fullmatch(rf"signedqueue-{q._token}-{os.getpid()}-[0-9]+-[0-9a-f]{{8}}", name)
        st = os.lstat(SHM_DIR / name)
        assert st.st_mode & 0o777 == 0o600 and st.st_uid == os.geteuid()
    got = [q.get(timeout=WAIT) for _ in items()]
    assert [describe(x) for x in got] == [describe(x) for x in items()]
    got[1][0, 0] = -1.0  # arrays are writable, and private
    assert got[1][0, 0] == -1.0
    assert segments(q._token) == []
    if cls is SignedJoinableQueue:
        for _ in got:
            q.task_done()  # type: ignore[attr-defined]
        q.join()  # type: ignore[attr-defined]


def test_frames_below_the_threshold_go_through_the_pipe(
    make_queue: Callable[..., SignedQueue], ring: Keyring
) -> None:
    """A frame of exactly shm_threshold bytes uses a segment; one byte more, the pipe."""
    item = big_bytes()[: 300 * 1024]
    size = len(Codec(ring).dumps(item))
    at = make_queue(shm_threshold=size)
    at.put(item)
    sent_segment(at)
    assert at.get(timeout=WAIT) == item
    assert segments(at._token) == []

    above = make_queue(shm_threshold=size + 1)
    above.put(item)
    wait_until(above._poll, "the record is in the pipe")
    assert segments(above._token) == []  # announced in the pipe, no segment
    assert above.get(timeout=WAIT) == item


def test_shm_threshold_none_sends_everything_through_the_pipe(
    make_queue: Callable[..., SignedQueue],
) -> None:
    """With shm_threshold=None a 2 MiB frame goes through the pipe while the consumer waits."""
    q = make_queue(shm_threshold=None)
    q.put(big_bytes())
    wait_until(q._poll, "the frame is being written into the pipe")
    assert segments(q._token) == []
    assert q.get(timeout=WAIT) == big_bytes()
    assert segments(q._token) == []


@pytest.mark.parametrize("threshold", [0, -1])
def test_shm_threshold_must_be_positive(ring: Keyring, threshold: int) -> None:
    """A threshold below one byte is refused."""
    with pytest.raises(ValueError, match="shm_threshold"):
        SignedQueue(ring, shm_threshold=threshold)


# -- 2. tampering with a segment after it was sent -----------------------------

#: Where a byte is flipped, and what get() raises for it.
TAMPERED = {
    "magic": MalformedFrame,
    "mac_alg": MalformedFrame,
    "key_id": (MalformedFrame, UnknownKey),
    "created": InvalidSignature,
    "nonce": InvalidSignature,
    "payload_length": MalformedFrame,
    "buffer_table": InvalidSignature,
    "pickle": InvalidSignature,
    "oob_buffer": InvalidSignature,
    "tag": InvalidSignature,
}


@pytest.mark.parametrize("how", ["get", "get_frame"])
@pytest.mark.parametrize("mac", MACS)
@pytest.mark.parametrize("region", list(TAMPERED))
def test_a_flipped_byte_in_a_segment_is_refused(
    make_queue: Callable[..., SignedQueue], region: str, mac: str, how: str
) -> None:
    """One flipped byte anywhere in a sent segment is refused with the frame; next arrives."""
    q = make_queue(mac=mac, allow=numpy_allow())
    array = c_array()
    q.put({"role": "user", "blob": array})
    q.put("next")
    path = sent_segment(q)
    frame = bytearray(path.read_bytes())
    offset = layout(bytes(frame), mac)[region]
    frame[offset] ^= 0x01
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, frame[offset : offset + 1], offset)
    finally:
        os.close(fd)
    with pytest.raises(TAMPERED[region]) as info:
        getattr(q, how)(timeout=WAIT)
    assert isinstance(info.value, RejectedFrame)
    assert info.value.frame == bytes(frame)
    assert segments(q._token) == []
    assert q.get(timeout=WAIT) == "next"


def test_an_untouched_segment_loads(make_queue: Callable[..., SignedQueue]) -> None:
    """The control for the tampering tests: the same item, untouched, loads."""
    q = make_queue(allow=numpy_allow())
    q.put({"role": "user", "blob": c_array()})
    sent_segment(q)
    got = q.get(timeout=WAIT)
    assert got["role"] == "user" and np.array_equal(got["blob"], c_array())


REPLACED = [
    "truncated",
    "extended",
    "emptied",
    "other_file_same_size",
    "other_file_other_size",
    "symlink",
    "directory",
]


@pytest.mark.parametrize("how", ["get", "get_frame"])
@pytest.mark.parametrize("kind", REPLACED)
def test_a_truncated_or_replaced_segment_is_refused(
    make_queue: Callable[..., SignedQueue], tmp_path: Path, kind: str, how: str
) -> None:
    """A segment truncated or replaced after it was sent: refused, name gone, next arrives."""
    q = make_queue()
    q.put(big_bytes())
    q.put("next")
    path = sent_segment(q)
    original = path.read_bytes()
    outside = tmp_path / "target"
    outside.write_bytes(original)
    if kind == "truncated":
        os.truncate(path, len(original) - 1)
    elif kind == "extended":
        with open(path, "ab") as f:
            f.write(b"\0")
    elif kind == "emptied":
        os.truncate(path, 0)
    else:
        path.unlink()
        if kind == "symlink":
            path.symlink_to(outside)
        elif kind == "directory":
            path.mkdir(mode=0o700)
        else:
            size = len(original) if kind == "other_file_same_size" else len(original) // 2
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, b"\0" + os.urandom(size - 1))
            os.close(fd)
    try:
        with pytest.raises(MalformedFrame):
            getattr(q, how)(timeout=WAIT)
        assert not os.path.lexists(path), f"the refused segment ({kind}) was left in /dev/shm"
        assert outside.read_bytes() == original
        assert q.get(timeout=WAIT) == "next"
    finally:
        if path.is_dir() and not path.is_symlink():
            path.rmdir()


# -- tampering while or after the frame is verified ------------------------------


def test_the_loaded_array_is_not_changed_by_writes_to_the_segment(
    make_queue: Callable[..., SignedQueue],
) -> None:
    """
    An array get() returned is private: writing into the (unlinked) segment
    through a descriptor opened before get() does not change it.
    """
    q = make_queue(allow=numpy_allow())
    q.put(c_array())
    path = sent_segment(q)
    fd = os.open(path, os.O_RDWR)  # anyone who may open the segment
    try:
        got = q.get(timeout=WAIT)
        assert not path.exists()
        assert np.array_equal(got, c_array())
        end = os.fstat(fd).st_size - TAG_SIZES["hmac-sha256"]
        os.pwrite(fd, b"\xff" * 4096, end - 4096)  # the array's last 4 KiB
    finally:
        os.close(fd)
    assert np.array_equal(got, c_array()), (
        "the array returned by get() still views the shared segment: a write into "
        "the segment after verification changed it"
    )


def test_what_is_loaded_is_what_was_verified(
    make_queue: Callable[..., SignedQueue], monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A write into the segment between the tag check and unpickling (a concurrent
    writer holding the segment open) must not reach the loaded object.
    """
    q = make_queue(allow=numpy_allow())
    q.put({"role": "user", "blob": c_array()})
    path = sent_segment(q)
    offset = path.read_bytes().index(b"user")
    fd = os.open(path, os.O_RDWR)
    codec = q.codec
    verified_then_loaded = codec._deserialize

    def write_then_load(*args: Any) -> Any:
        os.pwrite(fd, b"root", offset)  # after the tag was checked
        return verified_then_loaded(*args)

    monkeypatch.setattr(codec, "_deserialize", write_then_load)
    try:
        got = q.get(timeout=WAIT)
    finally:
        os.close(fd)
    assert got["role"] == "user", (
        f"get() returned role={got['role']!r}, bytes written into the segment after "
        "its tag was verified"
    )


# -- 3. bogus segment records written into the pipe -------------------------------


@pytest.fixture
def canary(tmp_path: Path) -> Path:
    """A file outside /dev/shm that no record may touch."""
    path = tmp_path / "canary"
    path.write_bytes(b"untouched")
    return path


@pytest.mark.parametrize(
    "kind",
    [
        "relative_traversal_to_etc_passwd",
        "relative_traversal_to_tmp",
        "absolute_path",
        "nonexistent",
        "trailing_newline",
        "uppercase_token",
        "non_ascii",
        "empty_name",
    ],
)
def test_a_record_naming_no_segment_of_this_queue_is_refused(
    make_queue: Callable[..., SignedQueue], canary: Path, shm_paths: list[Path], kind: str
) -> None:
    """Records naming files outside /dev/shm or no segment: refused, nothing touched."""
    q = make_queue()
    token = q._token
    valid = f"signedqueue-{token}-1-1-0000abcd"
    # A file the record must not reach, named like one of the queue's segments.
    decoy = canary.with_name(valid)
    decoy.write_bytes(b"untouched")
    size = len(b"untouched")
    protected = {path: path.read_bytes() for path in (canary, decoy, Path("/etc/passwd"))}
    name: bytes
    if kind == "relative_traversal_to_etc_passwd":
        name = b"../../etc/passwd"
        size = os.stat("/etc/passwd").st_size
    elif kind == "relative_traversal_to_tmp":
        name = os.path.relpath(decoy, SHM_DIR).encode()
    elif kind == "absolute_path":
        name = str(decoy).encode()
    elif kind == "nonexistent":
        name = valid.encode()
    elif kind in ("trailing_newline", "uppercase_token"):
        real = SHM_DIR / valid
        shm_paths.append(real)
        real.write_bytes(b"untouched")
        real.chmod(0o600)
        name = valid.encode() + b"\n" if kind == "trailing_newline" else valid.upper().encode()
    elif kind == "non_ascii":
        name = valid.encode()[:-1] + "\u00e9".encode()
    else:
        name = b""
    record = segment_record(size, name)
    os.write(q._writer.fileno(), record)
    q.put("next")
    with pytest.raises(RejectedFrame) as info:
        q.get(timeout=WAIT)
    if name:
        assert isinstance(info.value, MalformedFrame)
        assert info.value.frame == record
    assert {path: path.read_bytes() for path in protected} == protected
    for path in shm_paths:  # a real segment name, but not the one the record gave
        assert path.read_bytes() == b"untouched"
    assert q.get(timeout=WAIT) == "next"


def test_a_record_naming_another_queues_segment_is_refused(
    make_queue: Callable[..., SignedQueue],
) -> None:
    """Another queue's segment named in this queue's pipe is refused and left to its queue."""
    q = make_queue()
    other = make_queue()
    other.put(big_bytes())
    path = sent_segment(other)
    record = segment_record(path.stat().st_size, path.name.encode())
    os.write(q._writer.fileno(), record)
    q.put("next")
    with pytest.raises(MalformedFrame) as info:
        q.get(timeout=WAIT)
    assert info.value.frame == record
    assert path.exists()
    assert other.get(timeout=WAIT) == big_bytes()
    assert q.get(timeout=WAIT) == "next"
    assert segments(other._token) == segments(q._token) == []


@pytest.mark.parametrize("delta", [-1, 1, 1 << 40])
def test_a_record_with_the_wrong_size_is_refused_and_the_file_removed(
    make_queue: Callable[..., SignedQueue], ring: Keyring, shm_paths: list[Path], delta: int
) -> None:
    """A size other than the segment's (smaller, larger, far over the limit): refused, removed."""
    q = make_queue()
    frame = Codec(ring).dumps(big_bytes())
    path = SHM_DIR / f"signedqueue-{q._token}-1-1-0000abcd"
    shm_paths.append(path)
    path.write_bytes(frame)
    path.chmod(0o600)
    record = segment_record(len(frame) + delta, path.name.encode())
    os.write(q._writer.fileno(), record)
    q.put("next")
    with pytest.raises(MalformedFrame) as info:
        q.get(timeout=WAIT)
    assert info.value.frame == record
    assert not path.exists()
    assert q.get(timeout=WAIT) == "next"


@pytest.mark.parametrize("how", ["get", "get_frame"])
def test_a_hand_written_record_of_a_valid_segment_loads(
    make_queue: Callable[..., SignedQueue], ring: Keyring, shm_paths: list[Path], how: str
) -> None:
    """The control: a record with the right name and size of a validly signed frame loads."""
    q = make_queue()
    frame = Codec(ring).dumps(big_bytes())
    path = SHM_DIR / f"signedqueue-{q._token}-1-1-0000abcd"
    shm_paths.append(path)
    path.write_bytes(frame)
    path.chmod(0o600)
    write_segment_ref(q._writer.fileno(), len(frame), path.name)
    got = getattr(q, how)(timeout=WAIT)
    assert got == (big_bytes() if how == "get" else frame)
    assert not path.exists()


@pytest.mark.parametrize("how", ["get", "get_frame"])
@pytest.mark.parametrize("size", [0, 1, 55])
def test_a_record_of_a_tiny_segment_is_refused(
    make_queue: Callable[..., SignedQueue], shm_paths: list[Path], size: int, how: str
) -> None:
    """A segment too small to be a frame (even an empty one) is refused, not a crash."""
    q = make_queue()
    path = SHM_DIR / f"signedqueue-{q._token}-1-1-0000abcd"
    shm_paths.append(path)
    path.write_bytes(b"\0" * size)
    path.chmod(0o600)
    write_segment_ref(q._writer.fileno(), size, path.name)
    q.put("next")
    with pytest.raises(MalformedFrame):
        getattr(q, how)(timeout=WAIT)
    assert not path.exists()
    assert q.get(timeout=WAIT) == "next"


def test_a_record_naming_a_directory_is_refused(
    make_queue: Callable[..., SignedQueue], shm_paths: list[Path]
) -> None:
    """A directory with a segment's name is refused as MalformedFrame (not an OSError)."""
    q = make_queue()
    path = SHM_DIR / f"signedqueue-{q._token}-1-1-0000abcd"
    shm_paths.append(path)
    path.mkdir(mode=0o700)
    write_segment_ref(q._writer.fileno(), 4096, path.name)
    q.put("next")
    with pytest.raises(MalformedFrame):
        q.get(timeout=WAIT)
    assert q.get(timeout=WAIT) == "next"


def test_a_record_naming_a_fifo_is_refused_without_blocking(
    make_queue: Callable[..., SignedQueue], shm_paths: list[Path]
) -> None:
    """
    A FIFO with a segment's name is refused; get() does not open it and wait
    for a writer (which would hang it past its timeout).
    """
    q = make_queue()
    path = SHM_DIR / f"signedqueue-{q._token}-1-1-0000abcd"
    shm_paths.append(path)
    os.mkfifo(path, 0o600)
    write_segment_ref(q._writer.fileno(), 4096, path.name)
    q.put("next")
    getter = Background(q.get, True, WAIT)
    deadline = time.monotonic() + WAIT
    while getter.running and time.monotonic() < deadline:
        time.sleep(0.01)
    blocked = getter.running
    if blocked:  # unblock the open() so the test can end, then fail
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    with pytest.raises(MalformedFrame):
        getter.result()
    assert not blocked, "get() opened the FIFO and waited for a writer"
    assert q.get(timeout=WAIT) == "next"


@pytest.mark.parametrize("body_size", [0, 8, 264, 5000])
def test_a_segment_record_of_impossible_length_is_refused(
    make_queue: Callable[..., SignedQueue], body_size: int
) -> None:
    """A record flagged as a segment reference but of no possible length is drained and refused."""
    q = make_queue()
    record = RECORD_HEADER.pack(SEGMENT | body_size) + b"a" * body_size
    os.write(q._writer.fileno(), record)
    q.put("next")
    with pytest.raises(RejectedFrame):
        q.get(timeout=WAIT)
    assert q.get(timeout=WAIT) == "next"


# -- 4. no leaks -----------------------------------------------------------------------

_ABANDON = """
import multiprocessing, os, sys, time
from signedqueue import Keyring, SignedQueue

def produce(q):
    for i in range(3):
        q.put(bytes([i]) * (2 << 20))
    q.close()
    q.join_thread()

def count(q):
    prefix = "signedqueue-" + q._token + "-"
    return len([n for n in os.listdir("/dev/shm") if n.startswith(prefix)])

if __name__ == "__main__":
    where = sys.argv[1]
    ctx = multiprocessing.get_context("fork" if where == "fork" else "spawn")
    q = SignedQueue(Keyring.generate(), ctx=ctx)
    print(q._token, flush=True)
    if where == "creator":
        for i in range(3):
            q.put(bytes([i]) * (2 << 20))
    else:
        child = ctx.Process(target=produce, args=(q,))
        child.start()
        child.join(60)
    deadline = time.monotonic() + 60
    while count(q) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    print(count(q), flush=True)
    if len(sys.argv) > 2:
        # Not a segment, though named like one (anyone may create it in /dev/shm).
        os.mkdir(os.path.join("/dev/shm", "signedqueue-" + q._token + "-0-0-0000abcd"))
"""

_KILLED = """
import multiprocessing, os, signal, sys, time
from signedqueue import Keyring, SignedQueue, _pipe

def consume(q, ready):
    ready.put(len(q.get(timeout=60)))
    # The next segment's record is read but its segment never opened.
    record = _pipe.read_record(q._reader.fileno(), q.codec.max_frame_size)
    ready.put(type(record).__name__)
    time.sleep(600)

def count(q):
    prefix = "signedqueue-" + q._token + "-"
    return len([n for n in os.listdir("/dev/shm") if n.startswith(prefix)])

if __name__ == "__main__":
    ctx = multiprocessing.get_context(sys.argv[1])
    q = SignedQueue(Keyring.generate(), ctx=ctx)
    print(q._token, flush=True)
    ready = ctx.Queue()
    consumer = ctx.Process(target=consume, args=(q, ready))
    consumer.start()
    for i in range(4):
        q.put(bytes([i]) * (2 << 20))
    print(ready.get(timeout=60), ready.get(timeout=60), flush=True)
    deadline = time.monotonic() + 60
    while count(q) != 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(consumer.pid, signal.SIGKILL)
    consumer.join(60)
    print(count(q), consumer.exitcode, flush=True)
"""


def _run_script(tmp_path: Path, source: str, *args: str) -> list[str]:
    """Run *source* as a script; its output split on whitespace, then its stderr."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(source))
    done = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True, text=True, timeout=WAIT, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    return [*done.stdout.split(), done.stderr]


@pytest.mark.parametrize("where", ["creator", "fork", "spawn"])
def test_abandoned_items_leave_no_segment_after_the_creator_exits(
    tmp_path: Path, where: str
) -> None:
    """A queue abandoned with three big items (put by its creator or a child): none remain."""
    token, before, stderr = _run_script(tmp_path, _ABANDON, where)
    assert before == "3"  # they were there while the creator ran
    assert segments(token) == []
    assert "Traceback" not in stderr, stderr


def test_a_directory_named_like_a_segment_does_not_stop_the_sweep(tmp_path: Path) -> None:
    """A directory with a segment's name does not keep the real segments from being removed."""
    token, before, stderr = _run_script(tmp_path, _ABANDON, "creator", "with-directory")
    directory = SHM_DIR / f"signedqueue-{token}-0-0-0000abcd"
    try:
        assert before == "3"
        left = [name for name in segments(token) if name != directory.name]
        assert left == [], f"{len(left)} segment(s) left: the sweep stopped at the directory"
        assert "Traceback" not in stderr, stderr
    finally:
        if directory.is_dir():
            directory.rmdir()
        _shm.sweep(token)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_killed_consumer_leaves_no_segment_after_the_creator_exits(
    tmp_path: Path, method: str
) -> None:
    """A consumer killed with one record in flight and two queued: none remain after the creator."""
    token, first, in_flight, left, exitcode, stderr = _run_script(tmp_path, _KILLED, method)
    assert (first, in_flight) == (str(2 << 20), "SegmentRef")
    assert left == "3"  # one read but never opened, two never read
    assert exitcode == str(-9)
    assert segments(token) == []
    assert "Traceback" not in stderr, stderr


def _refused_frame(kind: str, ring: Keyring) -> tuple[bytes, Any]:
    """A large frame a queue over *ring* refuses, and how."""
    item = big_bytes()
    if kind == "foreign_key":
        return Codec(Keyring.generate()).dumps(item), UnknownKey
    if kind == "same_id_other_secret":
        return Codec(Keyring.generate(ring.active_id)).dumps(item), InvalidSignature
    if kind == "other_mac":
        return Codec(ring, mac="aes256-gmac").dumps(item), InvalidSignature
    if kind == "other_serializer":
        return Codec(ring, serializer="msgpack").dumps(item), MalformedFrame
    if kind == "other_context":
        return Codec(ring, context=b"another queue").dumps(item), InvalidSignature
    if kind == "forbidden_class":
        return Codec(ring).dumps(Unlisted(item)), ForbiddenClass
    raise AssertionError(kind)


@pytest.mark.parametrize("how", ["get", "get_frame"])
@pytest.mark.parametrize(
    "kind",
    ["foreign_key", "same_id_other_secret", "other_mac", "other_serializer",
     "other_context", "forbidden_class"],
)
def test_a_refused_segment_frame_leaves_no_segment(
    make_queue: Callable[..., SignedQueue], ring: Keyring, kind: str, how: str
) -> None:
    """A large frame refused at get() (key, MAC, codec, class) leaves no segment; next arrives."""
    q = make_queue()
    frame, refusal = _refused_frame(kind, ring)
    q.put_frame(frame)
    q.put("next")
    sent_segment(q)
    if how == "get_frame" and refusal is ForbiddenClass:
        assert q.get_frame(timeout=WAIT) == frame  # verified; never loaded
    else:
        with pytest.raises(refusal) as info:
            getattr(q, how)(timeout=WAIT)
        assert info.value.frame == frame
    assert segments(q._token) == []
    assert q.get(timeout=WAIT) == "next"


@pytest.mark.parametrize("how", ["get", "get_frame"])
def test_a_segment_over_max_frame_size_is_refused_unread_and_removed(
    make_queue: Callable[..., SignedQueue], ring: Keyring, how: str
) -> None:
    """A segment frame over the consumer's max_frame_size: FrameTooLarge, removed; next arrives."""
    q = make_queue(max_frame_size=64 * 1024, shm_threshold=4096)
    frame = Codec(ring).dumps(big_bytes())
    q.put_frame(frame)
    q.put("next")
    sent_segment(q)
    with pytest.raises(FrameTooLarge) as info:
        getattr(q, how)(timeout=WAIT)
    assert (info.value.size, info.value.limit) == (len(frame), 64 * 1024)
    assert info.value.frame == frame[:4096]
    assert segments(q._token) == []
    assert q.get(timeout=WAIT) == "next"


def test_a_huge_sparse_segment_is_refused_unread_and_removed(
    make_queue: Callable[..., SignedQueue], shm_paths: list[Path]
) -> None:
    """A record naming a (sparse) 1 GiB segment: FrameTooLarge, the segment removed."""
    q = make_queue()
    path = SHM_DIR / f"signedqueue-{q._token}-1-1-0000abcd"
    shm_paths.append(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(fd, 1 << 30)
    os.close(fd)
    write_segment_ref(q._writer.fileno(), 1 << 30, path.name)
    q.put("next")
    with pytest.raises(FrameTooLarge) as info:
        q.get(timeout=WAIT)
    assert info.value.size == 1 << 30
    assert info.value.frame == b"\0" * 4096
    assert not path.exists()
    assert q.get(timeout=WAIT) == "next"


def test_an_expired_segment_frame_leaves_no_segment(
    make_queue: Callable[..., SignedQueue], clock: Any
) -> None:
    """A large frame past max_age is refused as ExpiredFrame and its segment removed."""
    q = make_queue(max_age=10, clock=clock)
    q.put(big_bytes())
    sent_segment(q)
    clock.advance(11)
    q.put("next")
    with pytest.raises(ExpiredFrame):
        q.get(timeout=WAIT)
    assert segments(q._token) == []
    assert q.get(timeout=WAIT) == "next"


def test_a_squatted_segment_name_does_not_lose_the_item(
    make_queue: Callable[..., SignedQueue], shm_paths: list[Path]
) -> None:
    """
    Files already at the next segment names (anyone may create files in
    /dev/shm, and the names are predictable from a listing) do not make the
    producer drop its item.
    """
    q = make_queue()
    match = re.fullmatch(r"count\((\d+)\)", repr(_shm._counter))
    assert match is not None
    upcoming = int(match.group(1))
    for n in range(upcoming, upcoming + 4):
        path = SHM_DIR / f"signedqueue-{q._token}-{os.getpid()}-{n}"
        shm_paths.append(path)
        path.write_bytes(b"squatter")
    q.put(big_bytes())
    q.put("next")
    got = q.get(timeout=WAIT)
    assert got == big_bytes(), f"the large item was lost; get() returned {got!r:.80}"
    assert q.get(timeout=WAIT) == "next"


# -- 5. get_frame() and put_frame() ------------------------------------------------------


@pytest.mark.parametrize("mac", MACS)
def test_get_frame_of_a_segment_relays_into_another_queue(
    make_queue: Callable[..., SignedQueue], ring: Keyring, mac: str
) -> None:
    """get_frame() returns a segment's verified frame; put_frame() relays it and it loads there."""
    source = make_queue(mac=mac, allow=numpy_allow())
    sink = make_queue(mac=mac, allow=numpy_allow())
    piped = make_queue(mac=mac, allow=numpy_allow(), shm_threshold=None)
    source.put(fortran_array())
    sent_segment(source)
    frame = source.get_frame(timeout=WAIT)
    assert isinstance(frame, bytes)
    assert segments(source._token) == []
    info = Codec(ring, mac=mac).verify(frame)
    assert info.payload_size > BIG
    sink.put_frame(frame)
    assert sent_segment(sink).read_bytes() == frame  # relayed as it is
    got = sink.get(timeout=WAIT)
    assert describe(got) == describe(fortran_array())
    assert segments(sink._token) == []
    piped.put_frame(frame)  # and through a pipe
    assert describe(piped.get(timeout=WAIT)) == describe(fortran_array())


def test_get_frame_from_a_consumer_process_relays_back(ring: Keyring) -> None:
    """A frame taken with get_frame() in a child and relayed back with put_frame() loads."""
    ctx = multiprocessing.get_context("fork")
    source = SignedQueue(ring, ctx=ctx, allow=numpy_allow())
    sink = SignedQueue(ring, ctx=ctx, allow=numpy_allow())
    try:
        relay = ctx.Process(target=_relay, args=(source, sink))
        start_all([relay])
        source.put(c_array())
        got = sink.get(timeout=WAIT)
        join_all([relay])
    finally:
        for q in (source, sink):
            q.cancel_join_thread()
            q.close()
    assert describe(got) == describe(c_array())
    assert segments(source._token) == segments(sink._token) == []


def _relay(source: Any, sink: Any) -> None:
    """Relay one frame from *source* into *sink* unopened, then flush."""
    sink.put_frame(source.get_frame(timeout=WAIT))
    sink.close()
    sink.join_thread()


def test_put_frame_of_a_pipe_frame_over_the_threshold_uses_a_segment(
    make_queue: Callable[..., SignedQueue],
) -> None:
    """A frame taken from a pipe-only queue and relayed into a segment queue goes through shm."""
    piped = make_queue(shm_threshold=None)
    sink = make_queue()
    piped.put(big_bytes())
    frame = piped.get_frame(timeout=WAIT)
    sink.put_frame(frame)
    assert sent_segment(sink).read_bytes() == frame
    with pytest.raises(queue.Empty):
        piped.get(timeout=SHORT)
    assert sink.get(timeout=WAIT) == big_bytes()


def test_write_record_of_a_frame_still_works_next_to_segments(
    make_queue: Callable[..., SignedQueue], ring: Keyring
) -> None:
    """A big frame written whole into the pipe (an old producer) loads next to segment records."""
    q = make_queue()
    frame = Codec(ring).dumps(big_bytes(3))
    q.put(big_bytes())
    sent_segment(q)
    writer = Background(write_record, q._writer.fileno(), frame)
    assert q.get(timeout=WAIT) == big_bytes()
    assert q.get(timeout=WAIT) == big_bytes(3)
    writer.result()
    assert segments(q._token) == []
