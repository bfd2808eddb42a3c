"""
Wire format v1: the layout of a frame, and nothing else.

This module knows no keys and verifies nothing.  It builds headers and parses
frames strictly; :mod:`signedqueue._codec` decides what to trust, in order.
The format is specified in docs/explanation/wire-format.md.

::

    offset    size  field
    0         2     magic  b"SQ"
    2         1     version            0x01
    3         1     MAC algorithm      0x01 = HMAC-SHA256
    4         1     serializer id      0x01 pickle, 0x02 msgpack, 0x03 cloudpickle
    5         1     serializer param   pickle protocol (0..5); 0 for msgpack
    6         1     key id length L    1..64
    7         L     key id             ASCII [A-Za-z0-9._-]
    7+L       8     created            uint64 BE, milliseconds since the Unix epoch
    15+L      16    nonce              random
    31+L      8     payload length N   uint64 BE
    39+L      N     payload
    39+L+N    32    tag                HMAC-SHA256(K, frame[0 : 39+L+N] || context)
"""

from __future__ import annotations

import re
import struct
from typing import NamedTuple

from .exceptions import MalformedFrame

MAGIC = b"SQ"
VERSION = 1
ALG_HMAC_SHA256 = 1
NONCE_SIZE = 16
TAG_SIZE = 32
MAX_KEY_ID_SIZE = 64

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
#: The smallest possible frame: a 1-byte key id and an empty payload.
MIN_FRAME_SIZE = LEAD_SIZE + 1 + MID_SIZE + TAG_SIZE  # 72

_KEY_ID_RE = re.compile(rb"[A-Za-z0-9._-]{1,64}\Z")


class Header(NamedTuple):
    """The parsed, *unverified* fields of a frame."""

    serializer: int
    param: int
    key_id: bytes
    created_ms: int
    nonce: bytes
    payload_start: int
    payload_end: int  # == start of the tag; everything before it is signed


def header_prefix(serializer: int, param: int, key_id: bytes) -> bytes:
    """
    The constant first part of a header, up to and including the key id.
    """
    return _LEAD.pack(MAGIC, VERSION, ALG_HMAC_SHA256, serializer, param, len(key_id)) + key_id


def header_suffix(created_ms: int, nonce: bytes, payload_len: int) -> bytes:
    """The per-frame part of a header: creation time, nonce, payload length."""
    return _MID.pack(created_ms, nonce, payload_len)


def parse_unverified(frame: bytes | bytearray | memoryview) -> Header:
    """
    Parse *frame* strictly, without verifying anything.

    Raises :class:`MalformedFrame` unless the frame is exactly one well-formed
    v1 frame: known magic, version, algorithm and serializer, a valid key id,
    and a payload length that accounts for every byte up to the 32-byte tag.
    The caller must check the size limit first and the tag afterwards.
    """
    size = len(frame)
    if size < MIN_FRAME_SIZE:
        raise MalformedFrame(f"frame too short ({size} bytes; at least {MIN_FRAME_SIZE})")
    magic, version, alg, serializer, param, kid_len = _LEAD.unpack_from(frame, 0)
    if magic != MAGIC:
        raise MalformedFrame("not a signedqueue frame (bad magic)")
    if version != VERSION:
        raise MalformedFrame(
            f"unsupported frame version {version} (this signedqueue reads {VERSION})"
        )
    if alg != ALG_HMAC_SHA256:
        raise MalformedFrame(f"unknown MAC algorithm id {alg}")
    if serializer not in SERIALIZER_NAMES:
        raise MalformedFrame(f"unknown serializer id {serializer}")
    if serializer not in _PICKLE_FAMILY and param != 0:
        raise MalformedFrame(f"serializer parameter must be 0 for msgpack, not {param}")
    if not 1 <= kid_len <= MAX_KEY_ID_SIZE:
        raise MalformedFrame(f"key id length {kid_len} outside 1..{MAX_KEY_ID_SIZE}")
    mid = LEAD_SIZE + kid_len
    if size < mid + MID_SIZE + TAG_SIZE:
        raise MalformedFrame("frame too short for its header")
    key_id = bytes(frame[LEAD_SIZE:mid])
    if not _KEY_ID_RE.match(key_id):
        raise MalformedFrame("key id has characters outside [A-Za-z0-9._-]")
    created_ms, nonce, payload_len = _MID.unpack_from(frame, mid)
    start = mid + MID_SIZE
    if payload_len != size - start - TAG_SIZE:
        raise MalformedFrame(
            f"payload length field says {payload_len} bytes but the frame holds "
            f"{size - start - TAG_SIZE}"
        )
    return Header(serializer, param, key_id, created_ms, nonce, start, size - TAG_SIZE)


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
