"""Wire format v1 layout: strict parsing of unverified frames, and peeking at key ids."""

from __future__ import annotations

import struct

import pytest

from signedqueue import Codec, Keyring, MalformedFrame, _frame
from signedqueue._frame import (
    MIN_FRAME_SIZE,
    TAG_SIZE,
    header_prefix,
    header_suffix,
    parse_head,
    parse_unverified,
    peek_key_id,
)
from signedqueue._mac import ALG_AES256_GMAC, ALG_HMAC_SHA256, TAG_SIZES

ALLOWED = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-"
NONCE = bytes(range(16))


def make_frame(
    payload: bytes = b"payload",
    *,
    alg: int = ALG_HMAC_SHA256,
    serializer: int = 1,
    param: int = 5,
    key_id: bytes = b"alpha",
    created_ms: int = 1_700_000_000_000,
    tag: bytes | None = None,
) -> bytes:
    """A frame with the given fields and an arbitrary (unchecked) tag of the alg's size."""
    if tag is None:
        tag = b"\xaa" * TAG_SIZES[alg]
    return (
        header_prefix(alg, serializer, param, key_id)
        + header_suffix(created_ms, NONCE, len(payload))
        + payload
        + tag
    )


@pytest.fixture
def frame() -> bytes:
    """A frame made by a real codec, key id 'alpha'."""
    return Codec(Keyring.generate("alpha")).dumps({"x": 1})


# -- building ------------------------------------------------------------------


def test_header_layout_matches_the_spec() -> None:
    """header_prefix and header_suffix write the documented fields, big-endian."""
    expected = (
        b"SQ\x01\x01\x02\x00\x05alpha"
        + struct.pack(">Q", 1234)
        + NONCE
        + struct.pack(">Q", 7)
    )
    assert expected == header_prefix(1, 2, 0, b"alpha") + header_suffix(1234, NONCE, 7)
    gmac = header_prefix(2, 2, 0, b"alpha") + header_suffix(1234, NONCE, 7)
    assert gmac == expected[:3] + b"\x02" + expected[4:]  # only the algorithm byte differs


def test_tag_sizes() -> None:
    """HMAC-SHA256 (id 1) has a 32-byte tag, AES-256-GMAC (id 2) a 16-byte one."""
    assert {ALG_HMAC_SHA256: 32, ALG_AES256_GMAC: 16} == TAG_SIZES
    assert TAG_SIZE == 32  # the default algorithm's


@pytest.mark.parametrize(("alg", "smallest_size"), [(ALG_HMAC_SHA256, 72), (ALG_AES256_GMAC, 56)])
def test_min_frame_size(alg: int, smallest_size: int) -> None:
    """The smallest frame (1-byte key id, empty payload) is 72 bytes (HMAC) or 56 (GMAC)."""
    smallest = make_frame(b"", alg=alg, key_id=b"k")
    assert smallest_size == len(smallest)
    assert MIN_FRAME_SIZE == 56  # the shortest over every algorithm
    header = parse_unverified(smallest)
    assert (alg, header.payload_start) == (header.alg, header.payload_end)
    with pytest.raises(MalformedFrame, match="too short"):
        parse_unverified(smallest[:-1])


@pytest.mark.parametrize("alg", [ALG_HMAC_SHA256, ALG_AES256_GMAC])
def test_tag_size_follows_the_algorithm_byte(alg: int) -> None:
    """The payload ends one tag length before the end: 32 bytes for HMAC, 16 for GMAC."""
    raw = make_frame(b"hello" * 10, alg=alg)
    header = parse_unverified(raw)
    assert len(raw) - TAG_SIZES[alg] == header.payload_end
    assert raw[header.payload_start : header.payload_end] == b"hello" * 10
    # The other algorithm's byte with this tag: the length field no longer matches.
    other = ALG_AES256_GMAC if alg == ALG_HMAC_SHA256 else ALG_HMAC_SHA256
    swapped = bytearray(raw)
    swapped[3] = other
    with pytest.raises(MalformedFrame, match="payload length field"):
        parse_unverified(swapped)


@pytest.mark.parametrize("alg", [ALG_HMAC_SHA256, ALG_AES256_GMAC])
def test_parse_head_needs_only_the_header(alg: int) -> None:
    """parse_head parses from the header bytes and the total size alone."""
    raw = make_frame(b"x" * 500, alg=alg, key_id=b"k" * 64)
    head = raw[: _frame.MAX_HEADER_SIZE]
    assert parse_unverified(raw) == parse_head(head, len(raw))
    with pytest.raises(MalformedFrame, match="payload length field"):
        parse_head(head, len(raw) + 1)


# -- parsing -------------------------------------------------------------------


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_parse_fields(kind: type) -> None:
    """parse_unverified returns every header field and the payload bounds, for any buffer."""
    raw = make_frame(b"hello", serializer=2, param=0, key_id=b"node-1", created_ms=42)
    header = parse_unverified(kind(raw))
    assert header.alg == ALG_HMAC_SHA256
    assert header.serializer == 2
    assert header.param == 0
    assert header.key_id == b"node-1"
    assert header.created_ms == 42
    assert header.nonce == NONCE
    assert raw[header.payload_start : header.payload_end] == b"hello"
    assert len(raw) - TAG_SIZE == header.payload_end


def test_parse_does_not_verify(frame: bytes) -> None:
    """parse_unverified accepts a garbage tag: verifying is the codec's job."""
    forged = frame[:-TAG_SIZE] + bytes(TAG_SIZE)
    assert parse_unverified(frame) == parse_unverified(forged)


@pytest.mark.parametrize(
    ("offset", "value", "message"),
    [
        (0, ord("X"), "bad magic"),
        (1, ord("R"), "bad magic"),
        (2, 0, "unsupported frame version 0"),
        (2, 2, "unsupported frame version 2"),
        (3, 0, "unknown MAC algorithm id 0"),
        (3, 3, "unknown MAC algorithm id 3"),
        (3, 255, "unknown MAC algorithm id 255"),
        (4, 0, "unknown serializer id 0"),
        (4, 4, "unknown serializer id 4"),
        (4, 255, "unknown serializer id 255"),
    ],
)
def test_parse_refuses_bad_lead_bytes(frame: bytes, offset: int, value: int, message: str) -> None:
    """Each fixed lead field is checked: magic, version, algorithm, serializer."""
    parse_unverified(frame)  # the unmodified frame parses
    bad = bytearray(frame)
    bad[offset] = value
    with pytest.raises(MalformedFrame, match=message):
        parse_unverified(bad)


@pytest.mark.parametrize("param", [0, 1, 5, 6, 0x7F, 0x85, 0x80, 0x84, 0x86, 255])
def test_parse_param_by_serializer(param: int) -> None:
    """
    The pickle family takes any protocol number below 0x80, and the out-of-band
    flag 0x80 only with protocol 5 (0x85); msgpack frames must carry param 0.
    """
    for serializer in (_frame.SERIALIZER_PICKLE, _frame.SERIALIZER_CLOUDPICKLE):
        raw = make_frame(serializer=serializer, param=param)
        if param < 0x80 or param == 0x85:
            assert param == parse_unverified(raw).param
        else:
            with pytest.raises(MalformedFrame, match="out-of-band buffers need pickle protocol 5"):
                parse_unverified(raw)
    msgpack_frame = make_frame(serializer=_frame.SERIALIZER_MSGPACK, param=param)
    if param == 0:
        assert parse_unverified(msgpack_frame).param == 0
    else:
        with pytest.raises(MalformedFrame, match="must be 0 for msgpack"):
            parse_unverified(msgpack_frame)


@pytest.mark.parametrize("length", [1, 2, 63, 64])
def test_key_id_lengths_accepted(length: int) -> None:
    """Key ids of 1 to 64 characters parse."""
    key_id = (ALLOWED * 2)[:length]
    assert key_id == parse_unverified(make_frame(key_id=key_id)).key_id


@pytest.mark.parametrize("declared", [0, 65, 255])
def test_key_id_length_out_of_range(frame: bytes, declared: int) -> None:
    """A key id length byte of 0 or over 64 is refused, whatever follows it."""
    bad = bytearray(frame)
    bad[6] = declared
    with pytest.raises(MalformedFrame, match="key id length"):
        parse_unverified(bad)


def test_key_id_every_allowed_character() -> None:
    """Every character of [A-Za-z0-9._-] is allowed in a key id."""
    for start in range(0, len(ALLOWED), 64):
        key_id = ALLOWED[start : start + 64]
        assert key_id == parse_unverified(make_frame(key_id=key_id)).key_id


def test_key_id_every_other_byte_refused() -> None:
    """Every byte outside [A-Za-z0-9._-] is refused in a key id, at any position."""
    for byte in set(range(256)) - set(ALLOWED):
        for key_id in (bytes([byte]), b"ab" + bytes([byte]), bytes([byte]) + b"ab"):
            with pytest.raises(MalformedFrame, match="characters"):
                parse_unverified(make_frame(key_id=key_id))


def test_every_truncation_refused(frame: bytes) -> None:
    """A frame cut short anywhere is refused."""
    for size in range(len(frame)):
        with pytest.raises(MalformedFrame):
            parse_unverified(frame[:size])


@pytest.mark.parametrize("extra", [b"\x00", b"\xff" * 3, bytes(TAG_SIZE)])
def test_trailing_bytes_refused(frame: bytes, extra: bytes) -> None:
    """Bytes after the tag are refused: the payload length must account for them."""
    with pytest.raises(MalformedFrame, match="payload length field"):
        parse_unverified(frame + extra)


@pytest.mark.parametrize("declared", [0, 6, 8, 2**32, 2**64 - 1])
def test_length_field_must_match(declared: int) -> None:
    """A payload length field that does not match the bytes present is refused."""
    raw = make_frame(b"payload")  # 7 bytes
    at = len(header_prefix(1, 1, 5, b"alpha")) + 8 + 16
    bad = raw[:at] + struct.pack(">Q", declared) + raw[at + 8 :]
    with pytest.raises(MalformedFrame, match="payload length field"):
        parse_unverified(bad)
    assert struct.unpack(">Q", raw[at : at + 8])[0] == 7  # the offset is the length field


@pytest.mark.parametrize("alg", [ALG_HMAC_SHA256, ALG_AES256_GMAC])
def test_header_longer_than_frame(alg: int) -> None:
    """A key id length that runs past the end of a short frame is refused."""
    raw = make_frame(b"", alg=alg, key_id=b"k")  # the smallest frame of its algorithm
    bad = bytearray(raw)
    bad[6] = 64
    with pytest.raises(MalformedFrame, match="too short for its header"):
        parse_unverified(bad)


# -- peek_key_id -----------------------------------------------------------------


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_peek_key_id(frame: bytes, kind: type) -> None:
    """peek_key_id reads the id of a frame, from any buffer type."""
    assert peek_key_id(kind(frame)) == "alpha"


def test_peek_key_id_needs_no_valid_tag_or_length(frame: bytes) -> None:
    """peek_key_id reads the id even from a frame that fails later checks (for logs)."""
    assert peek_key_id(frame[:-TAG_SIZE] + bytes(TAG_SIZE)) == "alpha"
    assert peek_key_id(frame + b"trailing") == "alpha"
    assert peek_key_id(frame[: 7 + 5]) == "alpha"


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"SQ",
        b"SQ\x01\x01\x01\x05",
        b"XQ\x01\x01\x01\x05\x05alpha" + bytes(60),
        b"SQ\x01\x01\x01\x05\x00" + bytes(60),
        b"SQ\x01\x01\x01\x05\x05al/ha" + bytes(60),
        b"SQ\x01\x01\x01\x05\x41" + b"a" * 65 + bytes(60),
    ],
    ids=["empty", "magic-only", "no-length", "bad-magic", "length-0", "bad-char", "length-65"],
)
def test_peek_key_id_unreadable(raw: bytes) -> None:
    """peek_key_id returns None when no valid key id can be read."""
    assert peek_key_id(raw) is None


def test_peek_key_id_truncated_inside_the_id() -> None:
    """A frame cut inside its key id yields None, never a prefix that may be another id."""
    raw = make_frame(key_id=b"k12")
    assert peek_key_id(raw[: 7 + 3]) == "k12"
    for size in range(7, 7 + 3):
        assert peek_key_id(raw[:size]) is None
