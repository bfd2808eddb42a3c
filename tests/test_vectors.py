"""The library against the wire format v1 test vectors in tests/vectors."""

from __future__ import annotations

import base64
import ctypes
import hashlib
import hmac
import importlib.util
import json
import mmap
import pickle
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import signedqueue
from signedqueue import Codec, Keyring, RejectedFrame, _frame
from signedqueue._keys import MAC_KEY_INFO, MAC_KEY_INFOS, derive_mac_key
from signedqueue._mac import ALG_AES256_GMAC

VECTORS = Path(__file__).parent / "vectors"
F = TypeVar("F", bound=Callable[..., Any])


def _load_reference() -> ModuleType:
    """Import tests/vectors/generate.py, the independent reference implementation."""
    name = "signedqueue_wire_v1_reference"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, VECTORS / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


ref = _load_reference()


def load_vectors(filename: str) -> list[dict[str, Any]]:
    """The vectors of one JSON file."""
    doc = json.loads((VECTORS / filename).read_text(encoding="utf-8"))
    vectors: list[dict[str, Any]] = doc["vectors"]
    return vectors


def json_parametrize(filename: str) -> Callable[[F], F]:
    """Parametrize a test over the vectors of *filename*, one test id per vector."""
    vectors = load_vectors(filename)
    return pytest.mark.parametrize("vector", vectors, ids=[v["id"] for v in vectors])


def codec_for(vector: dict[str, Any]) -> Codec:
    """The consumer a vector describes: its keyring, context, options and clock."""
    ring_doc = vector["keyring"]
    ring = Keyring({k: bytes.fromhex(v) for k, v in ring_doc["keys"].items()}, ring_doc["active"])
    now = vector["now"]
    return Codec(
        ring, context=bytes.fromhex(vector["context"]), clock=lambda: now, **vector["codec"]
    )


def load_mapped(codec: Codec, frame: bytes) -> Any:
    """Codec.loads of *frame* held in a private memory mapping, as SignedQueue passes
    frames that came through shared memory."""
    if not frame:  # nothing to map
        return codec.loads(bytearray())
    mapped = mmap.mmap(-1, len(frame))
    mapped[:] = frame
    return codec.loads(mapped)


# -- the vectors ---------------------------------------------------------------


@json_parametrize("frames_valid.json")
def test_valid_unseal(vector: dict[str, Any]) -> None:
    """A valid frame unseals to its payload, whatever buffer type carries it."""
    codec = codec_for(vector)
    frame = bytes.fromhex(vector["frame"])
    expected = bytes.fromhex(vector["payload"])
    for buf in (frame, bytearray(frame), memoryview(frame)):
        assert expected == codec.unseal(buf)


@json_parametrize("frames_valid.json")
def test_valid_loads(vector: dict[str, Any]) -> None:
    """
    A valid frame loads to the object the vector records (or the payload
    error), from bytes, from a bytearray and from a memory mapping.
    """
    codec = codec_for(vector)
    frame = bytes.fromhex(vector["frame"])
    loaders: list[Callable[[], Any]] = [
        lambda: codec.loads(frame),
        lambda: codec.loads(bytearray(frame)),
        lambda: load_mapped(codec, frame),
    ]
    for load in loaders:
        if "loads_error" in vector:
            with pytest.raises(RejectedFrame) as info:
                load()
            assert vector["loads_error"] == type(info.value).__name__
        elif "object" in vector:
            assert vector["object"] == load()
        else:
            assert vector["object_repr"] == repr(load())


@json_parametrize("frames_valid.json")
def test_valid_out_of_band_layout(vector: dict[str, Any]) -> None:
    """The library finds exactly the vector's buffers, each 64-byte aligned in the frame."""
    frame = bytearray.fromhex(vector["frame"])
    header = _frame.parse_unverified(frame)
    if "buffers" not in vector:
        assert not header.param & _frame.OUT_OF_BAND
        return
    assert header.param == 0x85
    payload = memoryview(frame)[header.payload_start : header.payload_end]
    _, buffers = _frame.split_buffers(payload, header.payload_start)
    assert vector["buffers"] == [bytes(b).hex() for b in buffers]
    for buffer in buffers:
        if len(buffer):
            offset = _address(buffer) - _address(memoryview(frame))
            assert offset % _frame.BUFFER_ALIGN == 0


def _address(view: memoryview) -> int:
    """The address of the first byte of a (writable, non-empty) view."""
    return ctypes.addressof((ctypes.c_char * len(view)).from_buffer(view))


@json_parametrize("frames_invalid.json")
def test_invalid_loads(vector: dict[str, Any]) -> None:
    """An invalid frame is refused by loads with exactly the recorded exception class."""
    codec = codec_for(vector)
    frame = bytes.fromhex(vector["frame"])
    with pytest.raises(RejectedFrame) as info:
        codec.loads(frame)
    assert vector["error"] == type(info.value).__name__
    assert frame == info.value.frame
    with pytest.raises(RejectedFrame) as info:
        codec.loads(bytearray(frame))
    assert vector["error"] == type(info.value).__name__


@json_parametrize("frames_invalid.json")
def test_invalid_load_mapped(vector: dict[str, Any]) -> None:
    """A frame in a memory mapping is refused exactly like loads refuses it from bytes."""
    codec = codec_for(vector)
    frame = bytes.fromhex(vector["frame"])
    with pytest.raises(RejectedFrame) as info:
        load_mapped(codec, frame)
    assert vector["error"] == type(info.value).__name__
    assert frame == info.value.frame


@json_parametrize("frames_invalid.json")
def test_invalid_unseal(vector: dict[str, Any]) -> None:
    """unseal refuses a frame that fails a frame check, and passes one only its payload fails."""
    codec = codec_for(vector)
    frame = bytes.fromhex(vector["frame"])
    if vector["stage"] == "open":
        with pytest.raises(RejectedFrame) as info:
            codec.unseal(frame)
        assert vector["error"] == type(info.value).__name__
    else:
        assert ref.parse(frame).payload == codec.unseal(frame)


# -- key derivation --------------------------------------------------------------


@json_parametrize("keys.json")
def test_derive_mac_key(vector: dict[str, Any]) -> None:
    """derive_mac_key turns each stored secret into exactly the vector's MAC key."""
    secret = bytes.fromhex(vector["secret"])
    assert base64.b64decode(vector["secret_base64"]) == secret
    assert vector["hkdf"] == {
        "hash": "sha256", "salt": None, "info": MAC_KEY_INFO.decode(), "length": 32
    }
    assert len(bytes.fromhex(vector["mac_key"])) == 32
    assert bytes.fromhex(vector["mac_key"]) == derive_mac_key(secret)
    assert vector["hkdf_gmac"] == {
        "hash": "sha256", "salt": None, "length": 32,
        "info": MAC_KEY_INFOS[ALG_AES256_GMAC].decode(),
    }
    gmac_key = bytes.fromhex(vector["gmac_key"])
    assert gmac_key == derive_mac_key(secret, ALG_AES256_GMAC) != derive_mac_key(secret)
    example = vector["gmac_frame_key"]
    frame_key = hmac.new(gmac_key, bytes.fromhex(example["nonce"]), hashlib.sha256).digest()
    assert example["frame_key"] == frame_key.hex()


@json_parametrize("keys.json")
def test_frames_are_tagged_with_the_vector_mac_key(vector: dict[str, Any]) -> None:
    """A ring holding the secret (as bytes or in a keyring document) tags with that MAC key."""
    secret = bytes.fromhex(vector["secret"])
    mac_key = bytes.fromhex(vector["mac_key"])
    document = json.dumps({
        "format": "signedqueue-keyring",
        "version": 1,
        "keys": {"v": {"secret": vector["secret_base64"], "state": "active", "created": 0}},
    })
    gmac_key = bytes.fromhex(vector["gmac_key"])
    for ring in (Keyring({"v": secret}, "v"), Keyring.from_json(document)):
        frame = Codec(ring, context=b"ctx").dumps([vector["id"]])
        assert hmac.new(mac_key, frame[:-32] + b"ctx", hashlib.sha256).digest() == frame[-32:]
        frame = Codec(ring, context=b"ctx", mac="aes256-gmac").dumps([vector["id"]])
        nonce = ref.parse(frame).nonce
        frame_key = hmac.new(gmac_key, nonce, hashlib.sha256).digest()
        tag = AESGCM(frame_key).encrypt(nonce[:12], b"", frame[:-16] + b"ctx")
        assert tag == frame[-16:]


def test_key_vectors_cover_every_size() -> None:
    """keys.json holds secrets of 16, 32 and 64 bytes."""
    sizes = {len(bytes.fromhex(v["secret"])) for v in load_vectors("keys.json")}
    assert sizes == {16, 32, 64}


@pytest.mark.parametrize("case", ref.RFC5869_CASES, ids=["A.1", "A.2", "A.3"])
def test_reference_hkdf_follows_rfc5869(case: tuple[str, str, str, int, str]) -> None:
    """The reference's own HKDF reproduces RFC 5869's SHA-256 test cases."""
    ikm, salt, info, length, okm = case
    got = ref.hkdf_sha256(bytes.fromhex(ikm), bytes.fromhex(salt), bytes.fromhex(info), length)
    assert okm == got.hex()


# -- the vector files themselves -------------------------------------------------


def test_vector_files_are_the_reference_output() -> None:
    """The JSON files are exactly what generate.py writes: nobody edited them by hand."""
    for name, text in ref.documents().items():
        assert text == (VECTORS / name).read_text(encoding="utf-8"), name


@pytest.mark.parametrize("filename", ["frames_valid.json", "frames_invalid.json", "keys.json"])
def test_vector_fields(filename: str) -> None:
    """Every vector is described, and every error it names is a RejectedFrame class."""
    vectors = load_vectors(filename)
    assert vectors
    for vector in vectors:
        assert vector["desc"], vector["id"]
        for field in ("error", "loads_error"):
            if field in vector:
                cls = getattr(signedqueue, vector[field])
                assert issubclass(cls, RejectedFrame), vector["id"]


# -- frames the library makes, re-parsed by the reference ----------------------


def _secret(ring: Keyring, key_id: str) -> bytes:
    """A key's secret, read through the public export."""
    doc = json.loads(ring.to_json())
    return base64.b64decode(doc["keys"][key_id]["secret"])


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("context", [b"", b"orders-queue"])
def test_pickle_dumps_layout(protocol: int, context: bytes) -> None:
    """Codec.dumps writes exactly the layout and tag the reference specifies."""
    ring = Keyring.generate("producer-1")
    now = 1_750_000_000.123
    codec = Codec(ring, protocol=protocol, context=context, clock=lambda: now)
    obj = {"n": 1, "xs": [1.5, "two", b"3"]}
    frame = codec.dumps(obj)

    parsed = ref.parse(frame)
    assert ref.SERIALIZERS["pickle"] == parsed.serializer
    assert protocol == parsed.param
    assert parsed.key_id == "producer-1"
    assert int(now * 1000) == parsed.created_ms
    assert len(parsed.nonce) == ref.NONCE_SIZE
    assert pickle.dumps(obj, protocol=protocol, fix_imports=False) == parsed.payload
    assert ref.compute_tag(_secret(ring, "producer-1"), parsed.signed, context) == parsed.tag
    assert obj == codec.loads(frame)


@pytest.mark.parametrize("mac", ["hmac-sha256", "aes256-gmac"])
@pytest.mark.parametrize("size", [0, 1000, 64 * 1024 - 1, 64 * 1024, 200_000])
def test_seal_layout_across_mac_paths(size: int, mac: str) -> None:
    """Small and large payloads (hashed in one piece or incrementally) carry the same tag."""
    ring = Keyring.generate()
    codec = Codec(ring, serializer="msgpack", context=b"ctx", mac=mac)
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    frame = codec.seal(payload)

    parsed = ref.parse(frame)
    assert ref.MAC_NAMES[parsed.alg] == mac
    assert ref.SERIALIZERS["msgpack"] == parsed.serializer
    assert parsed.param == 0
    assert payload == parsed.payload
    assert ref.compute_tag(_secret(ring, ring.active_id), parsed.signed, b"ctx") == parsed.tag


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        (pickle.dumps([1], protocol=5), 5),
        (pickle.dumps([1], protocol=2), 2),
        (pickle.dumps([1], protocol=1), 0),
        (pickle.dumps([1], protocol=0), 0),
        (b"\x80", 0),
        (b"", 0),
        (b"\x80\x85K\x01.", 5),
        (b"\x80\xffK\x01.", 0x7F),
    ],
    ids=["p5", "p2", "p1", "p0", "lone-0x80", "empty", "flag-0x85", "flag-0xff"],
)
def test_seal_param_for_raw_pickles(payload: bytes, param: int) -> None:
    """
    seal writes param = payload[1] without the out-of-band bit 0x80 for a
    payload starting 0x80, else 0: a raw payload never claims buffers, so its
    frame always parses and unseals, and the reference builds the same param.
    """
    codec = Codec(Keyring.generate())
    frame = codec.seal(payload)
    assert param == ref.parse(frame).param
    assert param == ref.parse(ref.Spec(payload, nonce=bytes(16)).build()).param
    assert payload == codec.unseal(frame)


@pytest.mark.parametrize("mac", ["hmac-sha256", "aes256-gmac"])
@pytest.mark.parametrize("key_id", ["k", "producer-1", "K" * 64])
def test_out_of_band_dumps_layout(mac: str, key_id: str) -> None:
    """Codec.dumps lays out out-of-band buffers exactly as the reference splits them."""
    ring = Keyring.generate(key_id)
    codec = Codec(ring, context=b"ctx", mac=mac)
    data: list[bytes | bytearray] = [bytearray(b"first"), bytes(range(256)) * 3, b""]
    frame = codec.dumps([pickle.PickleBuffer(d) for d in data] + ["in band"])

    parsed = ref.parse(frame)
    assert ref.OOB_PARAM == parsed.param
    assert ref.MAC_NAMES[parsed.alg] == mac
    pickled, buffers = ref.split_oob(parsed.payload, len(parsed.signed) - len(parsed.payload))
    assert [bytes(d) for d in data] == buffers
    assert pickled[:2] == b"\x80\x05"
    assert ref.compute_tag(_secret(ring, key_id), parsed.signed, b"ctx") == parsed.tag
    loaded = codec.loads(frame)
    assert [bytes(d) for d in data] + ["in band"] == [
        x if isinstance(x, str) else bytes(x) for x in loaded
    ]


def test_nonces_differ_between_frames() -> None:
    """Two frames of the same object carry different nonces, hence different tags."""
    codec = Codec(Keyring.generate())
    first, second = (ref.parse(codec.dumps("same")) for _ in range(2))
    assert first.payload == second.payload
    assert first.nonce != second.nonce
    assert first.tag != second.tag


def test_rotated_key_id_on_the_wire() -> None:
    """After rotate(), frames name the new key id and the reference verifies them."""
    ring = Keyring.generate("first")
    codec = Codec(ring)
    new_id = ring.rotate()
    parsed = ref.parse(codec.dumps(1))
    assert new_id == parsed.key_id
    assert ref.compute_tag(_secret(ring, new_id), parsed.signed, b"") == parsed.tag
    assert ref.compute_tag(_secret(ring, "first"), parsed.signed, b"") != parsed.tag


@pytest.mark.parametrize("vid", ["worked-example", "worked-example-gmac", "worked-example-oob"])
def test_worked_examples_in_the_wire_format_document(vid: str) -> None:
    """The hex dumps of docs/explanation/wire-format.md are the worked-example vectors."""
    doc = (Path(__file__).parents[1] / "docs" / "explanation" / "wire-format.md").read_text(
        encoding="utf-8"
    )
    (vector,) = [v for v in load_vectors("frames_valid.json") if v["id"] == vid]
    frame = bytes.fromhex(vector["frame"])
    dump = "\n".join(
        f"{i:04x}  " + " ".join(f"{b:02x}" for b in frame[i : i + 16])
        for i in range(0, len(frame), 16)
    )
    assert dump + "\n```" in doc
