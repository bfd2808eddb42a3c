"""
Wire format v1: the layout of a frame, and nothing else.

This module knows no keys and verifies nothing.  It builds headers and parses
frames strictly; :mod:`signedqueue._codec` decides what to trust, in order.
The format is specified in docs/explanation/wire-format.md.

::

    offset    size  field
    0         2     magic  b"SQ"
    2         1     version            0x01
    3         1     MAC algorithm      0x01 HMAC-SHA256, 0x02 AES-256-GMAC
    4         1     serializer id      0x01 pickle, 0x02 msgpack, 0x03 cloudpickle
    5         1     serializer param   pickle protocol (0..5), 0x85 for protocol 5
                                       with out-of-band buffers; 0 for msgpack
    6         1     key id length L    1..64
    7         L     key id             ASCII [A-Za-z0-9._-]
    7+L       8     created            uint64 BE, milliseconds since the Unix epoch
    15+L      16    nonce              random
    31+L      8     payload length N   uint64 BE
    39+L      N     payload
    39+L+N    T     tag                MAC(K, frame[0 : 39+L+N] || context);
                                       T = 32 (HMAC-SHA256) or 16 (AES-256-GMAC)

A payload with out-of-band buffers (param 0x85) is laid out as::

    u32 BE  n, the number of buffers (1..65536)
    n x u64 BE  the length of each buffer
    u64 BE  P, the length of the pickle
    P       the pickle (protocol 5; NEXT_BUFFER takes the buffers in order)
    then for each buffer: zero bytes up to the next multiple of 64 counted
    from the start of the frame, then the buffer's bytes
"""

from __future__ import annotations

import itertools
import os
import re
import struct
from typing import NamedTuple

from ._mac import ALG_HMAC_SHA256, TAG_SIZES
from .exceptions import MalformedFrame

MAGIC = b"SQ"
VERSION = 1
NONCE_SIZE = 16
#: The tag size of the default algorithm (HMAC-SHA256).
TAG_SIZE = TAG_SIZES[ALG_HMAC_SHA256]
MIN_TAG_SIZE = min(TAG_SIZES.values())
MAX_KEY_ID_SIZE = 64
#: Flag in the pickle serializer parameter: the payload carries out-of-band
#: buffers (protocol 5 only).
OUT_OF_BAND = 0x80
#: Out-of-band buffers start at multiples of this many bytes from the frame's
#: start, so that arrays loaded over them are aligned.
BUFFER_ALIGN = 64
MAX_BUFFERS = 1 << 16

SERIALIZER_PICKLE = 1
SERIALIZER_MSGPACK = 2
SERIALIZER_CLOUDPICKLE = 3
SERIALIZER_NAMES = {
    SERIALIZER_PICKLE: "pickle",
    SERIALIZER_MSGPACK: "msgpack",
    SERIALIZER_CLOUDPICKLE: "cloudpickle",
}
_PICKLE_FAMILY = (SERIALIZER_PICKLE, SERIALIZER_CLOUDPICKLE)

_LEAD = struct.Struct(">2sBBBBB")  # magic, version, alg, serializer, param, L
_MID = struct.Struct(">Q16sQ")  # created, nonce, payload length
LEAD_SIZE = _LEAD.size  # 7
MID_SIZE = _MID.size  # 32
#: How many leading bytes of a frame refused for its size are kept in
#: ``FrameTooLarge.frame`` (the rest is never copied).
KEPT_OF_OVERSIZED = 4096
#: The smallest possible frame: a 1-byte key id, an empty payload and the
#: shortest tag.
MIN_FRAME_SIZE = LEAD_SIZE + 1 + MID_SIZE + MIN_TAG_SIZE  # 56
#: The longest possible header (everything before the payload).
MAX_HEADER_SIZE = LEAD_SIZE + MAX_KEY_ID_SIZE + MID_SIZE  # 103
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")

_KEY_ID_RE = re.compile(rb"[A-Za-z0-9._-]{1,64}\Z")


class Header(NamedTuple):
    """The parsed, *unverified* fields of a frame."""

    alg: int
    serializer: int
    param: int
    key_id: bytes
    created_ms: int
    nonce: bytes
    payload_start: int
    payload_end: int  # == start of the tag; everything before it is signed


class _Nonces:
    """
    Frame nonces: 8 random bytes drawn once per process (again in a forked
    child) followed by an 8-byte counter.  Unique within a process by the
    counter and across processes by the random half; made without a system
    call, so sealing a small frame never releases the GIL to a feeder thread.
    """

    def __init__(self) -> None:
        self._reseed()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._reseed)

    def _reseed(self) -> None:
        self._prefix = os.urandom(NONCE_SIZE // 2)
        self._counter = itertools.count()

    def __call__(self) -> bytes:
        return self._prefix + next(self._counter).to_bytes(NONCE_SIZE // 2, "big")


#: ``new_nonce()`` returns a fresh 16-byte frame nonce.
new_nonce = _Nonces()


def header_prefix(alg: int, serializer: int, param: int, key_id: bytes) -> bytes:
    """
    The constant first part of a header, up to and including the key id.
    """
    return _LEAD.pack(MAGIC, VERSION, alg, serializer, param, len(key_id)) + key_id


def header_suffix(created_ms: int, nonce: bytes, payload_len: int) -> bytes:
    """The per-frame part of a header: creation time, nonce, payload length."""
    return _MID.pack(created_ms, nonce, payload_len)


def parse_unverified(frame: bytes | bytearray | memoryview) -> Header:
    """
    Parse *frame* strictly, without verifying anything.

    Raises :class:`MalformedFrame` unless the frame is exactly one well-formed
    v1 frame: known magic, version, algorithm and serializer, a valid key id,
    and a payload length that accounts for every byte up to the tag.
    The caller must check the size limit first and the tag afterwards.
    """
    return parse_head(frame, len(frame))


def parse_head(frame: bytes | bytearray | memoryview, size: int) -> Header:
    """
    :func:`parse_unverified` of a frame of *size* bytes of which only the
    start is at hand (at least ``min(size, MAX_HEADER_SIZE)`` bytes).
    """
    if size < MIN_FRAME_SIZE:
        raise MalformedFrame(f"frame too short ({size} bytes; at least {MIN_FRAME_SIZE})")
    magic, version, alg, serializer, param, kid_len = _LEAD.unpack_from(frame, 0)
    if magic != MAGIC:
        raise MalformedFrame("not a signedqueue frame (bad magic)")
    if version != VERSION:
        raise MalformedFrame(
            f"unsupported frame version {version} (this signedqueue reads {VERSION})"
        )
    tag_size = TAG_SIZES.get(alg)
    if tag_size is None:
        raise MalformedFrame(f"unknown MAC algorithm id {alg}")
    if serializer not in SERIALIZER_NAMES:
        raise MalformedFrame(f"unknown serializer id {serializer}")
    if serializer not in _PICKLE_FAMILY:
        if param != 0:
            raise MalformedFrame(f"serializer parameter must be 0 for msgpack, not {param}")
    elif param & OUT_OF_BAND and param != OUT_OF_BAND | 5:
        raise MalformedFrame(
            f"serializer parameter {param:#04x}: out-of-band buffers need pickle protocol 5"
        )
    if not 1 <= kid_len <= MAX_KEY_ID_SIZE:
        raise MalformedFrame(f"key id length {kid_len} outside 1..{MAX_KEY_ID_SIZE}")
    mid = LEAD_SIZE + kid_len
    if size < mid + MID_SIZE + tag_size:
        raise MalformedFrame("frame too short for its header")
    key_id = bytes(frame[LEAD_SIZE:mid])
    if not _KEY_ID_RE.match(key_id):
        raise MalformedFrame("key id has characters outside [A-Za-z0-9._-]")
    created_ms, nonce, payload_len = _MID.unpack_from(frame, mid)
    start = mid + MID_SIZE
    if payload_len != size - start - tag_size:
        raise MalformedFrame(
            f"payload length field says {payload_len} bytes but the frame holds "
            f"{size - start - tag_size}"
        )
    return Header(alg, serializer, param, key_id, created_ms, nonce, start, size - tag_size)


def buffer_layout(
    payload_start: int, pickle_size: int, sizes: list[int]
) -> tuple[bytes, list[int], int]:
    """
    For an out-of-band payload starting at *payload_start* in its frame: the
    table that opens it, the zero padding before each buffer, and the
    payload's total size.
    """
    table = b"".join(
        (_U32.pack(len(sizes)), *(_U64.pack(n) for n in sizes), _U64.pack(pickle_size))
    )
    offset = payload_start + len(table) + pickle_size
    pads = []
    for n in sizes:
        pad = -offset % BUFFER_ALIGN
        pads.append(pad)
        offset += pad + n
    return table, pads, offset - payload_start


def split_buffers(payload: memoryview, base: int) -> tuple[memoryview, list[memoryview]]:
    """
    The pickle and the buffers of an out-of-band *payload* that starts *base*
    bytes into its frame (views, no copy).  Raises :class:`MalformedFrame`
    unless the table, the zero padding and the sizes account for every byte.
    """
    frame, start, end = payload, 0, len(payload)
    if end - start < _U32.size + _U64.size:
        raise MalformedFrame("out-of-band payload too short for its buffer table")
    (count,) = _U32.unpack_from(frame, start)
    if not 1 <= count <= MAX_BUFFERS:
        raise MalformedFrame(f"out-of-band buffer count {count} outside 1..{MAX_BUFFERS}")
    pos = start + _U32.size
    if end - pos < (count + 1) * _U64.size:
        raise MalformedFrame("out-of-band payload too short for its buffer table")
    sizes = struct.unpack_from(f">{count}Q", frame, pos)
    pos += count * _U64.size
    (pickle_size,) = _U64.unpack_from(frame, pos)
    pos += _U64.size
    if pickle_size > end - pos:
        raise MalformedFrame("out-of-band payload: the pickle runs past the payload")
    pickled = frame[pos : pos + pickle_size]
    pos += pickle_size
    buffers = []
    for n in sizes:
        pad = -(base + pos) % BUFFER_ALIGN
        if pos + pad + n > end:
            raise MalformedFrame("out-of-band payload: a buffer runs past the payload")
        if any(frame[pos : pos + pad]):
            raise MalformedFrame("out-of-band payload: nonzero padding")
        pos += pad
        buffers.append(frame[pos : pos + n])
        pos += n
    if pos != end:
        raise MalformedFrame(f"out-of-band payload: {end - pos} bytes after the last buffer")
    return pickled, buffers


def peek_key_id(frame: bytes | bytearray | memoryview) -> str | None:
    """
    The key id a frame names, if it can be read; for logging only.
    """
    try:
        if len(frame) >= LEAD_SIZE and bytes(frame[:2]) == MAGIC:
            kid_len = frame[6]
            kid = bytes(frame[LEAD_SIZE : LEAD_SIZE + kid_len])
            # A key id cut short by truncation is not the id: it may even be
            # another key's (b"k1" of b"k12").
            if len(kid) == kid_len and _KEY_ID_RE.match(kid):
                return kid.decode("ascii")
    except (IndexError, TypeError):  # pragma: no cover - defensive
        pass
    return None
