"""
The fast paths: pickle protocol 5 out-of-band buffers, AES-256-GMAC, and
loading a frame streamed in piece by piece.

Every security property is checked from both sides: the attack is refused,
and the legitimate use next to it works.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import hmac
import json
import mmap
import os
import pickle
import queue
import struct
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from signedqueue import (
    Allowlist,
    Codec,
    ForbiddenClass,
    InvalidSignature,
    Keyring,
    MalformedFrame,
    RejectedFrame,
    SignedQueue,
    _frame,
    _shm,
)

NUMPY = Allowlist(presets=["stdlib", "numpy"])
MACS = ["hmac-sha256", "aes256-gmac"]
BOTH = {"accept_macs": MACS}
OOB = _frame.OUT_OF_BAND | 5


@pytest.fixture
def ring() -> Keyring:
    return Keyring.generate("fast")


def flip(frame: bytes | bytearray, index: int, mask: int = 1) -> bytes:
    """*frame* with the bits *mask* of byte *index* flipped."""
    out = bytearray(frame)
    out[index] ^= mask
    return bytes(out)


def address(buf: Any) -> int:
    """The address of the first byte of a bytearray or an array."""
    return int(np.frombuffer(buf, np.uint8).__array_interface__["data"][0])


def array_offset(arr: np.ndarray, frame: bytearray) -> int:
    """Where *arr*'s data starts, counted from the start of *frame*."""
    return int(arr.__array_interface__["data"][0]) - address(frame)


def layout(frame: bytes | bytearray) -> tuple[_frame.Header, int, list[tuple[int, int]]]:
    """
    The header of an out-of-band frame, where its pickle ends, and each
    buffer's (offset, length), all counted from the start of the frame.
    """
    header = _frame.parse_unverified(frame)
    assert header.param == OOB
    start = header.payload_start
    (count,) = struct.unpack_from(">I", frame, start)
    sizes = struct.unpack_from(f">{count}Q", frame, start + 4)
    (pickle_len,) = struct.unpack_from(">Q", frame, start + 4 + 8 * count)
    pos = start + 4 + 8 * count + 8 + pickle_len
    pickle_end, buffers = pos, []
    for size in sizes:
        pos += -pos % 64
        buffers.append((pos, size))
        pos += size
    assert pos == header.payload_end
    return header, pickle_end, buffers


def secret_of(ring: Keyring, key_id: str) -> bytes:
    return base64.b64decode(json.loads(ring.to_json())["keys"][key_id]["secret"])


def gmac_sub_key(secret: bytes) -> bytes:
    """K_gmac, derived here from the specification, not by the library."""
    info = b"signedqueue v1 frame-mac aes256-gmac"
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


# -- out-of-band round trips ---------------------------------------------------


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("dtype", ["float64", "int8", "complex64", "uint16"])
def test_numpy_round_trip(ring: Keyring, order: str, dtype: str) -> None:
    """C- and F-order arrays travel out of band and load equal, in the same order."""
    codec = Codec(ring, allow=NUMPY)
    arr = np.arange(3 * 5 * 7).reshape(3, 5, 7).astype(dtype, order="F" if order == "F" else "C")
    frame = codec.dumps(arr)
    assert _frame.parse_unverified(frame).param == OOB
    for buf in (frame, bytearray(frame)):
        out = codec.loads(buf)
        assert out.dtype == arr.dtype and out.shape == arr.shape
        np.testing.assert_array_equal(arr, out)
        assert out.flags.f_contiguous if order == "F" else out.flags.c_contiguous


def test_non_contiguous_array_travels_in_band(ring: Keyring) -> None:
    """An array pickle protocol 5 cannot hand out of band is pickled in band (param 5)."""
    codec = Codec(ring, allow=NUMPY)
    arr = np.arange(100.0)[::3]
    frame = codec.dumps(arr)
    assert _frame.parse_unverified(frame).param == 5
    np.testing.assert_array_equal(arr, codec.loads(frame))


def test_numpy_frames_need_the_numpy_preset(ring: Keyring) -> None:
    """Out of band changes nothing about the allowlist: without numpy, arrays are refused."""
    frame = Codec(ring, allow=NUMPY).dumps(np.arange(10))
    with pytest.raises(ForbiddenClass):
        Codec(ring).loads(frame)
    np.testing.assert_array_equal(np.arange(10), Codec(ring, allow=NUMPY).loads(frame))


def test_bytearray_and_picklebuffer(ring: Keyring) -> None:
    """
    bytearray round-trips (pickle keeps it in band); a PickleBuffer goes out
    of band and loads as a view of the same bytes (writable over a writable
    buffer, read-only over bytes).
    """
    codec = Codec(ring)
    frame = codec.dumps(bytearray(b"in band"))
    assert _frame.parse_unverified(frame).param == 5
    assert codec.loads(frame) == bytearray(b"in band")
    assert type(codec.loads(frame)) is bytearray

    frame = codec.dumps([pickle.PickleBuffer(bytearray(b"mutable")), pickle.PickleBuffer(b"ro")])
    assert _frame.parse_unverified(frame).param == OOB
    assert [size for _, size in layout(frame)[2]] == [7, 2]
    for buf in (frame, bytearray(frame)):
        mutable, readonly = codec.loads(buf)
        assert (bytes(mutable), bytes(readonly)) == (b"mutable", b"ro")
        assert (mutable.readonly, readonly.readonly) == (False, True)


def test_several_buffers_mixed_with_in_band_data(ring: Keyring) -> None:
    """Several buffers (one empty) interleaved with in-band values keep their order."""
    codec = Codec(ring, allow=NUMPY)
    obj = {
        "a": np.arange(10, dtype="int16"),
        "text": "in band",
        "raw": pickle.PickleBuffer(b"raw bytes"),
        "nested": [1, (np.ones((2, 3), order="F"), None), {"b": np.zeros(0)}],
        "tail": pickle.PickleBuffer(bytearray()),
    }
    frame = codec.dumps(obj)
    sizes = [size for _, size in layout(frame)[2]]
    assert sizes == [20, 9, 48, 0, 0]
    for buf in (frame, bytearray(frame)):
        out = codec.loads(buf)
        np.testing.assert_array_equal(obj["a"], out["a"])
        assert out["text"] == "in band" and bytes(out["raw"]) == b"raw bytes"
        assert out["nested"][0] == 1 and out["nested"][1][1] is None
        np.testing.assert_array_equal(np.ones((2, 3)), out["nested"][1][0])
        assert out["nested"][2]["b"].shape == (0,)
        assert bytes(out["tail"]) == b""


def test_zero_length_buffer_alone(ring: Keyring) -> None:
    """A frame whose only buffer is empty is well formed and loads."""
    codec = Codec(ring, allow=NUMPY)
    for obj in (pickle.PickleBuffer(b""), np.zeros(0, dtype="float32")):
        frame = codec.dumps(obj)
        _, _, buffers = layout(frame)
        assert [size for _, size in buffers] == [0]
        out = codec.loads(frame)
        assert len(out) == 0


def test_arrays_from_bytes_are_writable_copies(ring: Keyring) -> None:
    """From a read-only frame (bytes), loaded arrays are writable and own their memory."""
    codec = Codec(ring, allow=NUMPY)
    arr = np.arange(1000.0)
    frame = codec.dumps(arr)
    out = codec.loads(frame)
    assert out.flags.writeable
    assert not np.shares_memory(out, np.frombuffer(frame, np.uint8))
    out[0] = -1.0
    assert codec.loads(frame)[0] == 0.0  # the frame is untouched


def test_arrays_from_bytearray_view_the_frame(ring: Keyring) -> None:
    """From a bytearray frame, loaded arrays are zero-copy views of the frame."""
    codec = Codec(ring, allow=NUMPY)
    arr = np.arange(1000.0)
    frame = bytearray(codec.dumps(arr))
    out = codec.loads(frame)
    assert np.shares_memory(out, np.frombuffer(frame, np.uint8))
    assert out.flags.writeable
    offset = array_offset(out, frame)
    assert frame[offset : offset + 8] == struct.pack("<d", 0.0)
    frame[offset + 7] = 0x3F  # the view sees a change of the frame's bytes
    assert out[0] != 0.0


@pytest.mark.parametrize("mac", MACS)
@pytest.mark.parametrize("key_id", ["k", "abc", "key-id-of-17-char", "K" * 63, "K" * 64])
def test_buffers_are_64_byte_aligned_from_the_frame_start(
    mac: str, key_id: str
) -> None:
    """Every buffer starts at a multiple of 64 from the frame's start, whatever the header."""
    codec = Codec(Keyring.generate(key_id), allow=NUMPY, mac=mac)
    arrays = [np.arange(n, dtype="uint8") for n in (1, 63, 64, 65, 200)]
    frame = bytearray(codec.dumps(arrays))
    _, _, buffers = layout(frame)
    assert [offset % 64 for offset, _ in buffers] == [0] * len(arrays)
    loaded = codec.loads(frame)
    for arr, out, (offset, _) in zip(arrays, loaded, buffers, strict=True):
        np.testing.assert_array_equal(arr, out)
        assert array_offset(out, frame) == offset


def test_max_frame_size_counts_the_buffers(ring: Keyring) -> None:
    """Out-of-band bytes count toward max_frame_size, on dumps and on loads."""
    arr = np.zeros(10_000, dtype="uint8")
    frame = Codec(ring, allow=NUMPY).dumps(arr)
    assert len(frame) > 10_000
    small = Codec(ring, allow=NUMPY, max_frame_size=10_000)
    with pytest.raises(ValueError, match="over max_frame_size=10000"):
        small.dumps(arr)
    with pytest.raises(RejectedFrame):
        small.loads(frame)
    exact = Codec(ring, allow=NUMPY, max_frame_size=len(frame))
    np.testing.assert_array_equal(arr, exact.loads(frame))


# -- tampering with out-of-band frames -------------------------------------------


@pytest.mark.parametrize("mac", MACS)
def test_tampering_with_any_buffer_or_padding_byte_is_refused(ring: Keyring, mac: str) -> None:
    """Every byte after the pickle (padding and buffers) is signed: any change is refused."""
    codec = Codec(ring, allow=NUMPY, mac=mac)
    frame = codec.dumps([np.arange(10, dtype="int8"), "x", np.arange(7.0)])
    header, pickle_end, buffers = layout(frame)
    assert buffers[0][0] > pickle_end  # there is padding to tamper with
    for index in range(pickle_end, header.payload_end):
        for mask in (0x01, 0x80):
            with pytest.raises(InvalidSignature):
                codec.loads(flip(frame, index, mask))
    out = codec.loads(frame)  # the untampered frame loads
    np.testing.assert_array_equal(np.arange(7.0), out[2])


@pytest.mark.parametrize("mac", MACS)
def test_signed_nonzero_padding_is_malformed(ring: Keyring, mac: str) -> None:
    """
    Even under a valid tag, padding must be zero: the same payload with a
    padding byte set is refused, and with zero padding it loads.
    """
    codec = Codec(ring, mac=mac)
    frame = codec.dumps([pickle.PickleBuffer(b"buffer")])
    header, pickle_end, buffers = layout(frame)
    assert buffers[0][0] > pickle_end  # the buffer follows some padding
    payload = bytearray(frame[header.payload_start : header.payload_end])
    assert bytes(codec._seal(bytes(payload), OOB)) != frame  # a fresh nonce
    assert [bytes(b) for b in codec.loads(codec._seal(bytes(payload), OOB))] == [b"buffer"]
    payload[pickle_end - header.payload_start] = 1
    with pytest.raises(MalformedFrame, match="nonzero padding"):
        codec.loads(codec._seal(bytes(payload), OOB))


def test_seal_never_writes_the_out_of_band_flag(ring: Keyring) -> None:
    """
    seal() of a raw payload whose second byte has bit 0x80 does not claim
    buffers: the frame parses, unseals to the payload and is refused only
    as a bad pickle.
    """
    codec = Codec(ring)
    for payload in (b"\x80\x85K\x01.", b"\x80\xffK\x01.", b"\x80\x80"):
        frame = codec.seal(payload)
        assert not _frame.parse_unverified(frame).param & _frame.OUT_OF_BAND
        assert codec.unseal(frame) == payload
        with pytest.raises(MalformedFrame):
            codec.loads(frame)
    assert codec.loads(codec.seal(pickle.dumps([1], protocol=5))) == [1]


# -- AES-256-GMAC ----------------------------------------------------------------


@pytest.mark.parametrize("context", [b"", b"orders"])
@pytest.mark.parametrize("size", [0, 100, 70_000, 600_000])
def test_gmac_round_trip(ring: Keyring, context: bytes, size: int) -> None:
    """GMAC frames (16-byte tag) round-trip, small and large, with and without a context."""
    codec = Codec(ring, mac="aes256-gmac", context=context)
    obj = "v" * size
    frame = codec.dumps(obj)
    header = _frame.parse_unverified(frame)
    assert (frame[3], header.alg, len(frame) - header.payload_end) == (2, 2, 16)
    assert codec.loads(frame) == obj
    assert codec.loads(bytearray(frame)) == obj


@pytest.mark.parametrize("context", [b"", b"orders"])
def test_gmac_tamper_refused(ring: Keyring, context: bytes) -> None:
    """Any flipped bit of a GMAC frame, or another context, is refused; the frame loads."""
    codec = Codec(ring, mac="aes256-gmac", context=context)
    frame = codec.dumps({"k": list(range(20))})
    for index in range(len(frame)):
        with pytest.raises(RejectedFrame):
            codec.loads(flip(frame, index))
    for index in (-1, -16, -17, len(frame) // 2):
        with pytest.raises(InvalidSignature):
            codec.loads(flip(frame, index))
    with pytest.raises(InvalidSignature):
        Codec(ring, mac="aes256-gmac", context=context + b"x").loads(frame)
    assert codec.loads(frame) == {"k": list(range(20))}


def test_gmac_tag_is_aes_gcm_under_a_per_frame_key(ring: Keyring) -> None:
    """
    The tag is AES-256-GCM (empty plaintext, the signed bytes and the context
    as AAD, IV = nonce[:12]) under HMAC-SHA256(K_gmac, nonce): one key per
    nonce, computed here without the library.
    """
    codec = Codec(ring, mac="aes256-gmac", context=b"ctx")
    k_gmac = gmac_sub_key(secret_of(ring, "fast"))
    frame_keys = []
    for frame in (codec.dumps("same"), codec.dumps("same")):
        nonce = _frame.parse_unverified(frame).nonce
        frame_key = hmac.new(k_gmac, nonce, hashlib.sha256).digest()
        frame_keys.append(frame_key)
        aad = frame[:-16] + b"ctx"
        assert AESGCM(frame_key).encrypt(nonce[:12], b"", aad) == frame[-16:]
        # Neither the sub-key itself nor the HMAC sub-key makes this tag.
        assert AESGCM(k_gmac).encrypt(nonce[:12], b"", aad) != frame[-16:]
    assert frame_keys[0] != frame_keys[1]


def test_gmac_refused_by_default_accepted_with_accept_macs(ring: Keyring) -> None:
    """A default codec refuses GMAC frames, naming accept_macs; listing both admits them."""
    gmac_frame = Codec(ring, mac="aes256-gmac").dumps([1, 2])
    hmac_frame = Codec(ring).dumps([1, 2])
    with pytest.raises(InvalidSignature, match=r"accept_macs=\['aes256-gmac', 'hmac-sha256'\]"):
        Codec(ring).loads(gmac_frame)
    with pytest.raises(InvalidSignature, match="does not accept"):
        Codec(ring, mac="aes256-gmac").loads(hmac_frame)

    both = Codec(ring, accept_macs=MACS)
    assert both.loads(gmac_frame) == both.loads(hmac_frame) == [1, 2]
    assert both.dumps(0)[3] == 1  # still signs with its own mac
    gmac_both = Codec(ring, mac="aes256-gmac", accept_macs=MACS)
    assert gmac_both.loads(hmac_frame) == [1, 2]
    assert gmac_both.dumps(0)[3] == 2
    # accept_macs alone decides: a GMAC signer may refuse its own algorithm.
    with pytest.raises(InvalidSignature):
        Codec(ring, mac="aes256-gmac", accept_macs=["hmac-sha256"]).loads(gmac_frame)


@pytest.mark.parametrize("mac", MACS)
def test_algorithm_byte_swapped_is_refused(ring: Keyring, mac: str) -> None:
    """
    Swapping the algorithm byte (1 <-> 2) is refused, whether the tag is kept
    (the length no longer matches) or the length is moved to make it parse.
    """
    codec = Codec(ring, mac=mac, accept_macs=MACS)
    frame = codec.dumps(["payload of some length"])
    swapped = flip(frame, 3, 0x03)
    assert swapped[3] == (2 if mac == "hmac-sha256" else 1)
    with pytest.raises(MalformedFrame):
        codec.loads(swapped)
    # Move the payload/tag boundary so the relabelled frame parses.
    header = _frame.parse_unverified(frame)
    at = header.payload_start - 8
    length = header.payload_end - header.payload_start + (16 if mac == "hmac-sha256" else -16)
    relabelled = bytearray(swapped)
    relabelled[at : at + 8] = struct.pack(">Q", length)
    assert _frame.parse_unverified(relabelled).alg == swapped[3]
    with pytest.raises(InvalidSignature, match="tag does not match"):
        codec.loads(relabelled)
    assert codec.loads(frame) == ["payload of some length"]


def test_gmac_and_hmac_keys_are_separate(ring: Keyring) -> None:
    """Each algorithm has its own HKDF sub-key: an HMAC tag under the GMAC sub-key fails."""
    codec = Codec(ring, accept_macs=MACS)
    frame = codec.dumps("x")
    k_gmac = gmac_sub_key(secret_of(ring, "fast"))
    forged = frame[:-32] + hmac.new(k_gmac, frame[:-32], hashlib.sha256).digest()
    with pytest.raises(InvalidSignature):
        codec.loads(forged)
    assert codec.loads(frame) == "x"


# -- reseal ------------------------------------------------------------------------


@pytest.mark.parametrize("mac", MACS)
@pytest.mark.parametrize(("old_id", "new_id"), [("a", "much-longer-key-id-0123456789"),
                                                ("much-longer-key-id-0123456789", "b"),
                                                ("abc", "abcd")])
def test_reseal_out_of_band_to_another_key_id_length(mac: str, old_id: str, new_id: str) -> None:
    """Resealing under a key id of another length lays the buffers out again, aligned."""
    ring = Keyring.generate(old_id)
    codec = Codec(ring, allow=NUMPY, mac=mac)
    arrays = [np.arange(n, dtype="float32") for n in (3, 50, 17)]
    frame = codec.dumps(arrays)
    ring.add(new_id)
    ring.promote(new_id)
    resealed = codec.reseal(frame)

    before, after = _frame.parse_unverified(frame), _frame.parse_unverified(resealed)
    assert (before.key_id, after.key_id) == (old_id.encode(), new_id.encode())
    assert (after.param, after.nonce, after.created_ms) == (OOB, before.nonce, before.created_ms)
    _, _, buffers = layout(resealed)
    assert all(offset % 64 == 0 for offset, _ in buffers)
    as_bytearray = bytearray(resealed)
    for arr, out, (offset, _) in zip(arrays, codec.loads(as_bytearray), buffers, strict=True):
        np.testing.assert_array_equal(arr, out)
        assert array_offset(out, as_bytearray) == offset
    ring.retire(old_id)
    for arr, out in zip(arrays, codec.loads(resealed), strict=True):
        np.testing.assert_array_equal(arr, out)
    with pytest.raises(RejectedFrame):
        codec.loads(frame)  # the old key is gone


def test_reseal_refuses_tampered_out_of_band_frames(ring: Keyring) -> None:
    """reseal verifies first: a frame with a changed buffer byte is never re-signed."""
    codec = Codec(ring)
    frame = codec.dumps(pickle.PickleBuffer(b"0123456789"))
    with pytest.raises(InvalidSignature):
        codec.reseal(flip(frame, -33))
    assert bytes(codec.loads(codec.reseal(frame))) == b"0123456789"


# -- frames in memory mappings (as shared memory delivers them) ------------------


def mapped(codec: Codec, frame: bytes) -> tuple[Callable[[], Any], list[int]]:
    """A loader of *frame* from a private memory mapping, and its size."""
    def load() -> Any:
        view = mmap.mmap(-1, len(frame))
        view[:] = frame
        return codec.loads(view)

    return load, [len(frame)]


def _frames(ring: Keyring) -> list[tuple[Codec, bytes]]:
    out = []
    for mac in MACS:
        for context in (b"", b"ctx"):
            codec = Codec(ring, allow=NUMPY, mac=mac, context=context)
            for obj in ("tiny", "v" * 100_000, np.arange(200_000.0),
                        [np.ones((30, 40), order="F"), "x", pickle.PickleBuffer(b"b" * 999)]):
                out.append((codec, codec.dumps(obj)))
    return out


def test_loads_from_a_mapping_equals_loads(ring: Keyring) -> None:
    """A frame in a mapping loads as from bytes, for small, large and out-of-band frames."""
    for codec, frame in _frames(ring):
        load, filled = mapped(codec, frame)
        got, expected = load(), codec.loads(frame)
        assert filled[0] == len(frame)
        if isinstance(expected, str):
            assert got == expected
        elif isinstance(expected, np.ndarray):
            np.testing.assert_array_equal(expected, got)
            assert got.flags.writeable
        else:
            np.testing.assert_array_equal(expected[0], got[0])
            assert bytes(expected[2]) == bytes(got[2])


def test_loads_from_a_mapping_refuses_tampered_frames(ring: Keyring) -> None:
    """
    A tampered frame in a mapping is refused like loads refuses it, with the
    whole frame in the exception.
    """
    for codec, frame in _frames(ring):
        tag = len(frame) - _frame.parse_unverified(frame).payload_end
        for index in (0, 3, 10, len(frame) // 2, len(frame) - tag - 1, len(frame) - 1):
            bad = flip(frame, index)
            with pytest.raises(RejectedFrame) as by_loads:
                codec.loads(bad)
            load, filled = mapped(codec, bad)
            with pytest.raises(RejectedFrame) as by_mapping:
                load()
            assert type(by_mapping.value) is type(by_loads.value)
            assert by_mapping.value.frame == bad
            assert filled[0] == len(bad)


# -- cloudpickle -------------------------------------------------------------------


def test_cloudpickle_out_of_band(ring: Keyring) -> None:
    """cloudpickle frames carry buffers out of band too; a pickle codec still refuses them."""
    codec = Codec(ring, serializer="cloudpickle", unsafe_trust_signed_frames=True)
    scale = 3
    arr = np.arange(12.0).reshape(3, 4)
    frame = codec.dumps({"f": lambda x: x * scale, "a": arr, "b": pickle.PickleBuffer(b"cp")})
    header, _, buffers = layout(frame)
    assert (header.serializer, header.param) == (_frame.SERIALIZER_CLOUDPICKLE, OOB)
    assert [size for _, size in buffers] == [96, 2]
    for buf in (frame, bytearray(frame)):
        out = codec.loads(buf)
        assert out["f"](2) == 6
        np.testing.assert_array_equal(arr, out["a"])
        assert bytes(out["b"]) == b"cp"
    zero_copy = bytearray(frame)
    assert np.shares_memory(codec.loads(zero_copy)["a"], np.frombuffer(zero_copy, np.uint8))
    with pytest.raises(MalformedFrame, match="cloudpickle"):
        Codec(ring, allow=NUMPY).loads(frame)


def test_reseal_refuses_a_signed_malformed_layout_like_loads(ring: Keyring) -> None:
    """
    A validly signed frame whose out-of-band layout is malformed is refused by
    reseal as by loads, with the frame in the exception; a well-formed one
    is resealed.
    """
    codec = Codec(ring)
    bad = codec._seal(struct.pack(">IQ", 0, 0), OOB)  # buffer count 0
    good = codec.dumps(pickle.PickleBuffer(b"ok"))
    ring.rotate()
    for method in (codec.loads, codec.reseal):
        with pytest.raises(MalformedFrame, match="buffer count 0") as info:
            method(bad)
        assert info.value.frame == bad
    assert bytes(codec.loads(codec.reseal(good))) == b"ok"


# -- plain data: pickle.loads only where no opcode can load a global ---------


def test_plain_data_covers_every_global_loading_opcode() -> None:
    """The byte set is exactly the opcodes that bring a global, extension or persistent object."""
    import pickletools

    from signedqueue._unpickler import _GLOBAL_OPCODES

    loaders = {"GLOBAL", "INST", "OBJ", "PERSID", "BINPERSID", "EXT1", "EXT2", "EXT4",
               "STACK_GLOBAL"}
    codes = {op.code.encode("latin-1") for op in pickletools.opcodes if op.name in loaders}
    assert len(codes) == len(loaders)
    for value in range(256):
        byte = bytes([value])
        assert (_GLOBAL_OPCODES.search(byte) is not None) == (byte in codes), byte


@pytest.mark.parametrize("obj", [
    {"a": 1, "b": [2, 3]}, [1.5, None, True, b"xy", bytearray(b"z")], (1, 2), {1, 2},
    frozenset({3}), "", {"deep": [[[{}]]]},
])
def test_plain_data_loads_like_the_restricted_unpickler(ring: Keyring, obj: Any) -> None:
    """Builtin data takes the shortcut (when no byte looks like a global opcode) and loads equal."""
    from signedqueue._unpickler import plain_data, restricted_loads

    payload = pickle.dumps(obj, 5)
    expected = restricted_loads(payload, Codec(ring)._serializer.policy)  # type: ignore[attr-defined]
    assert expected == obj
    assert Codec(ring).loads(Codec(ring).dumps(obj)) == obj
    if plain_data(payload):
        assert pickle.loads(payload) == expected


@pytest.mark.parametrize("opcode_payload", [
    pickle.dumps(Keyring, 5),  # STACK_GLOBAL
    pickle.dumps(Keyring, 0),  # GLOBAL, protocol 0
    b"\x80\x05\x95\x0d\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x8c\x06system\x93.",
])
def test_plain_data_refuses_payloads_that_load_globals(opcode_payload: bytes) -> None:
    """A payload naming a global never takes the shortcut; the allowlist still decides."""
    from signedqueue._unpickler import plain_data

    assert not plain_data(opcode_payload)


def test_plain_data_needs_one_frame_ending_at_stop() -> None:
    """Trailing bytes, a second frame or an unframed pickle go the restricted way."""
    from signedqueue._unpickler import plain_data

    good = pickle.dumps({"a": 1}, 5)
    assert plain_data(good)
    assert not plain_data(good + b".")
    assert not plain_data(good[:-1])
    assert not plain_data(pickle.dumps({"a": 1}, 2))
    assert not plain_data(pickle.dumps({"k": "piece"}, 5))  # an "i" in the data


def test_plain_data_checks_the_protocol_when_asked() -> None:
    """A protocol 4 pickle is not taken for protocol 5 (the header's parameter)."""
    from signedqueue._unpickler import plain_data

    p4 = pickle.dumps([1, 2, 3], protocol=4)
    assert plain_data(p4) and plain_data(p4, 4)
    assert not plain_data(p4, 5)


@pytest.mark.parametrize("make", [bytes, bytearray, memoryview], ids=lambda t: t.__name__)
def test_small_frames_load_alike_on_the_first_and_later_loads(ring: Keyring, make: Any) -> None:
    """
    The first frame of a header goes the full way and later ones the cached
    way: both give the same objects, out-of-band buffers included, and both
    refuse a tampered frame.
    """
    codec = Codec(ring, allow=NUMPY)
    for obj in ({"a": 1}, pickle.PickleBuffer(b"ab"), np.arange(3.0), "i" * 10):
        frames = [codec.dumps(obj) for _ in range(3)]
        got = [codec.loads(make(f)) for f in frames]
        for item in got:
            if isinstance(obj, pickle.PickleBuffer):
                assert bytes(item) == b"ab"
            elif isinstance(obj, np.ndarray):
                np.testing.assert_array_equal(item, obj)
            else:
                assert item == obj
        with pytest.raises(InvalidSignature):
            codec.loads(make(flip(frames[2], len(frames[2]) - 40)))


def test_nonces_are_unique_in_a_process_and_across_a_fork(ring: Keyring) -> None:
    """Every frame gets its own nonce; a forked child draws a new random half."""
    codec = Codec(ring)
    nonces = [codec.verify(codec.dumps(i)).nonce for i in range(2000)]
    nonces += [codec.verify(codec.dumps(b"x" * (1 << 17))).nonce for _ in range(3)]
    assert len(set(nonces)) == len(nonces)
    assert len({n[:8] for n in nonces}) == 1  # one process, one random half
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.write(write, codec.verify(codec.dumps(0)).nonce)
        finally:
            os._exit(0)
    os.close(write)
    child = os.read(read, 16)
    os.close(read)
    os.waitpid(pid, 0)
    assert len(child) == 16 and child[:8] != nonces[0][:8] and child not in nonces


@pytest.mark.parametrize("key_id", ["k", "k" * 13, "k" * 64])
def test_truncated_frames_after_a_cached_header_are_refused(key_id: str) -> None:
    """
    Once a header's lead is cached, every truncation and extension of a frame
    with that lead is still refused as a RejectedFrame, never another error.
    """
    ring = Keyring({key_id: b"s" * 32}, key_id)
    codec = Codec(ring)
    frame = codec.dumps({"a": 1})
    assert codec.loads(frame) == {"a": 1}  # caches the lead
    for cut in range(len(frame)):
        for make in (bytes, bytearray):
            with pytest.raises(RejectedFrame):
                codec.loads(make(frame[:cut]))
    with pytest.raises(RejectedFrame):
        codec.loads(frame + b"\0")
    assert codec.loads(frame) == {"a": 1}


@pytest.mark.parametrize("payload", [b"", b"\x80", b"\x80\x05", b".", b"\x80\x05\x95" + bytes(8)])
def test_tiny_signed_payloads_are_refused_on_the_cached_path(ring: Keyring, payload: bytes) -> None:
    """Validly signed payloads too short to be a pickle are refused, first load or later."""
    codec = Codec(ring)
    assert codec.loads(codec.dumps(1)) == 1  # caches the header lead for param 5
    for _ in range(2):
        with pytest.raises(MalformedFrame):
            codec.loads(codec._seal(payload, 5))


def test_many_out_of_band_buffers_make_frames_the_consumer_can_load(ring: Keyring) -> None:
    """
    dumps() lays out any number of out-of-band buffers, but split_buffers()
    refuses more than MAX_BUFFERS (65536): a producer's put() succeeds and
    every consumer refuses the frame (MalformedFrame).  A list of 70,000
    small numpy arrays does the same.
    """
    codec = Codec(ring)
    obj = [pickle.PickleBuffer(bytearray([i % 256])) for i in range(70_000)]
    frame = codec.dumps(obj)
    loaded = codec.loads(frame)
    assert len(loaded) == 70_000


def test_put_of_a_large_bytearray_does_not_lock_it_against_resizing(ring: Keyring) -> None:
    """
    A top-level bytearray >= 64 KiB is kept (via _Parts and a memoryview in
    the Sealing) until the feeder writes it; meanwhile the caller's own
    bytearray cannot be resized.  multiprocessing.Queue has no such effect.
    """
    q = SignedQueue(ring, shm_threshold=None)
    data = bytearray(200_000)
    q._wlock.acquire()  # the feeder is busy (another producer holds the pipe)
    try:
        q.put(data)
        time.sleep(0.2)
        data.append(1)  # BufferError: Existing exports of data
    finally:
        q._wlock.release()
        q.get(timeout=10)
        q.close()
        q.join_thread()


@pytest.mark.skipif(not _shm.available(), reason="needs memfd_create")
def test_a_frame_that_cannot_get_a_memory_file_goes_through_the_pipe(
    ring: Keyring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    When sendmsg fails the feeder falls back to the pipe, but when
    memfd_create/ftruncate/pwrite fail (EMFILE, ENOSPC or ENOMEM on a full
    tmpfs / memory cgroup) the frame is dropped and logged, though the pipe
    could carry it.
    """

    def no_memfd(*args: object, **kw: object) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(os, "memfd_create", no_memfd)
    q = SignedQueue(ring)
    try:
        q.put(b"x" * (2 << 20))
        try:
            got = q.get(timeout=5)
        except queue.Empty:
            pytest.fail("the frame was dropped instead of sent through the pipe")
        assert len(got) == 2 << 20
    finally:
        q.close()
        q.join_thread()


def test_gmac_nonces_are_fully_random(ring: Keyring) -> None:
    """GMAC frames take 16 random bytes each (its security rests on them never repeating)."""
    codec = Codec(ring, mac="aes256-gmac")
    nonces = [codec.verify(codec.dumps(i)).nonce for i in range(50)]
    assert len({n[:8] for n in nonces}) == 50 and len({n[8:] for n in nonces}) == 50


@pytest.mark.parametrize("protocol", [0, 1])
def test_large_text_protocol_payloads_load(ring: Keyring, protocol: int) -> None:
    """Payloads of 64 KiB and more are read in place, text opcodes (readline) included."""
    codec = Codec(ring, protocol=protocol)
    obj = {"s": "x" * 200_000, "n": list(range(2000))}
    assert codec.loads(codec.dumps(obj)) == obj


@pytest.mark.parametrize("size", [0, 2047, 2048, 65535, 65536, (1 << 20) - 1, 1 << 20,
                                  (1 << 20) + 7, 3 * (1 << 20) + 1])
@pytest.mark.parametrize("context", [b"", b"ctx"])
def test_mac_key_hmac_is_hmac_sha256_at_every_size(size: int, context: bytes) -> None:
    """MacKey.hmac (pads hashed once, small inputs in pieces, large ones through a
    scratch buffer) equals hmac.digest over data || context, from bytes and views."""
    from signedqueue._mac import MacKey

    key = os.urandom(32)
    data = os.urandom(size)
    expected = hmac.digest(key, data + context, "sha256")
    mac_key = MacKey(key)
    assert mac_key.hmac(data, context) == expected
    assert mac_key.hmac(memoryview(data), context) == expected
    assert mac_key.hmac(bytearray(data), context) == expected
    incremental = mac_key.new()
    incremental.update(data)
    incremental.update(context)
    assert incremental.digest() == expected


def test_the_inlined_dumps_follows_the_active_key() -> None:
    """After a promotion the next frame names and is signed by the new active key."""
    ring = Keyring({"old": b"o" * 32, "new": b"n" * 32}, "old")
    codec = Codec(ring)
    first = codec.dumps({"a": 1})
    ring.promote("new")
    second = codec.dumps({"a": 1})
    assert codec.verify(first).key_id == "old"
    assert codec.verify(second).key_id == "new"
    only_new = Codec(Keyring({"new": b"n" * 32}, "new"))
    assert only_new.loads(second) == {"a": 1}
    with pytest.raises(RejectedFrame):
        only_new.loads(first)
