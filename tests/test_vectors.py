"""The library against the wire format v1 test vectors in tests/vectors."""

from __future__ import annotations

import base64
import hashlib
import hmac
import importlib.util
import json
import pickle
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import pytest

import signedqueue
from signedqueue import Codec, Keyring, RejectedFrame
from signedqueue._keys import MAC_KEY_INFO, derive_mac_key

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
    """A valid frame loads to the object the vector records (or the payload error)."""
    codec = codec_for(vector)
    frame = bytes.fromhex(vector["frame"])
    if "loads_error" in vector:
        with pytest.raises(RejectedFrame) as info:
            codec.loads(frame)
        assert vector["loads_error"] == type(info.value).__name__
    elif "object" in vector:
        assert vector["object"] == codec.loads(frame)
    else:
        assert vector["object_repr"] == repr(codec.loads(frame))


@json_parametrize("frames_invalid.json")
def test_invalid_loads(vector: dict[str, Any]) -> None:
    """An invalid frame is refused by loads with exactly the recorded exception class."""
    codec = codec_for(vector)
    frame = bytes.fromhex(vector["frame"])
    with pytest.raises(RejectedFrame) as info:
        codec.loads(frame)
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
    for ring in (Keyring({"v": secret}, "v"), Keyring.from_json(document)):
        frame = Codec(ring, context=b"ctx").dumps([vector["id"]])
        assert hmac.new(mac_key, frame[:-32] + b"ctx", hashlib.sha256).digest() == frame[-32:]


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


@pytest.mark.parametrize("size", [0, 1000, 64 * 1024 - 1, 64 * 1024, 200_000])
def test_seal_layout_across_mac_paths(size: int) -> None:
    """Small and large payloads (hashed in one piece or incrementally) carry the same tag."""
    ring = Keyring.generate()
    codec = Codec(ring, serializer="msgpack", context=b"ctx")
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    frame = codec.seal(payload)

    parsed = ref.parse(frame)
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
    ],
    ids=["p5", "p2", "p1", "p0", "lone-0x80", "empty"],
)
def test_seal_param_for_raw_pickles(payload: bytes, param: int) -> None:
    """seal writes param = payload[1] for a payload starting 0x80, else 0."""
    codec = Codec(Keyring.generate())
    assert param == ref.parse(codec.seal(payload)).param


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
