"""Codec: signing and loading with every serializer, and the order and cost of its checks."""

from __future__ import annotations

import base64
import contextlib
import datetime
import decimal
import hmac
import json
import logging
import pickle
import struct
import tracemalloc
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

import signedqueue
import signedqueue._codec
import signedqueue._frame
import signedqueue._keys
import signedqueue._mac
from signedqueue import (
    DEFAULT_CLOCK_SKEW,
    DEFAULT_MAX_FRAME_SIZE,
    Codec,
    ExpiredFrame,
    ForbiddenClass,
    FrameTooLarge,
    InvalidSignature,
    Keyring,
    MalformedFrame,
    RejectedFrame,
    UnknownKey,
)
from signedqueue._keys import derive_mac_key

MARKER = "sq-payload-marker-5d1c9e"
#: A validly signed pickle of this calls os.system(MARKER) if loaded unrestricted.
FORBIDDEN_PICKLE = b"cos\nsystem\n(S'" + MARKER.encode() + b"'\ntR."
LARGE = 64 * 1024  # payloads from this size are hashed incrementally


@dataclass
class Point:
    """A user class that the default allowlist does not admit."""

    x: int
    y: int


def secret_of(ring: Keyring, key_id: str) -> bytes:
    """A key's secret, through the public JSON export."""
    return base64.b64decode(json.loads(ring.to_json())["keys"][key_id]["secret"])


def secret_forms(ring: Keyring) -> list[str]:
    """Every way any secret or MAC key of *ring* might show up in text."""
    forms = []
    for key_id in ring.key_ids:
        for raw in (secret_of(ring, key_id), derive_mac_key(secret_of(ring, key_id))):
            forms += [raw.hex(), base64.b64encode(raw).decode(), repr(raw)[2:-1]]
    return forms


def flip(frame: bytes, index: int) -> bytes:
    """*frame* with the lowest bit of byte *index* flipped."""
    out = bytearray(frame)
    out[index] ^= 1
    return bytes(out)


SAMPLE = {
    "int": -(2**70),
    "float": 1.5,
    "str": "héllo",
    "bytes": b"\x00\xff",
    "list": [1, [2, 3]],
    "tuple": (1, "a"),
    "set": {1, 2},
    "frozenset": frozenset({"x"}),
    "none": None,
    "bool": True,
    "complex": 1 - 2j,
    "datetime": datetime.datetime(2024, 2, 29, 12, 0, tzinfo=datetime.timezone.utc),
    "decimal": decimal.Decimal("3.14"),
    "uuid": uuid.UUID(int=7),
}


# -- serializers -----------------------------------------------------------------


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickle_every_protocol(ring: Keyring, protocol: int) -> None:
    """The restricted pickle codec round-trips at every protocol and writes it as the param."""
    codec = Codec(ring, protocol=protocol)
    frame = codec.dumps(SAMPLE)
    assert protocol == frame[5]
    assert codec.loads(frame) == SAMPLE


def test_msgpack(ring: Keyring) -> None:
    """The msgpack codec round-trips data (ints limited to 64 bits)."""
    codec = Codec(ring, serializer="msgpack")
    obj = dict(SAMPLE, int=-(2**63))
    frame = codec.dumps(obj)
    assert frame[5] == 0
    assert obj == codec.loads(frame)


def test_cloudpickle_needs_unsafe_trust(ring: Keyring, caplog: pytest.LogCaptureFixture) -> None:
    """cloudpickle is refused unless unsafe_trust_signed_frames=True; then code round-trips."""
    with pytest.raises(ValueError, match="unsafe_trust_signed_frames=True"):
        Codec(ring, serializer="cloudpickle")
    with caplog.at_level(logging.WARNING, logger="signedqueue"):
        codec = Codec(ring, serializer="cloudpickle", unsafe_trust_signed_frames=True)
    assert any("unsafe_trust_signed_frames=True" in r.getMessage() for r in caplog.records)
    offset = 10
    frame = codec.dumps(lambda x: x + offset)
    assert frame[4] == 3
    assert codec.loads(frame)(5) == 15


def test_pickle_codec_refuses_cloudpickle_frames(ring: Keyring) -> None:
    """A restricted pickle codec never loads a cloudpickle frame, even of plain data."""
    cloud = Codec(ring, serializer="cloudpickle", unsafe_trust_signed_frames=True)
    frame = cloud.dumps([1, 2])
    with pytest.raises(MalformedFrame, match="serializer 'cloudpickle'"):
        Codec(ring).loads(frame)
    assert cloud.loads(frame) == [1, 2]


def test_serializers_refuse_each_other(ring: Keyring) -> None:
    """A frame is only read by a codec of the serializer that made it."""
    pickled, packed = Codec(ring), Codec(ring, serializer="msgpack")
    with pytest.raises(MalformedFrame):
        pickled.loads(packed.dumps([1]))
    with pytest.raises(MalformedFrame):
        packed.loads(pickled.dumps([1]))
    assert pickled.loads(pickled.dumps([1])) == [1]
    assert packed.loads(packed.dumps([1])) == [1]


def test_user_class_needs_allow(ring: Keyring) -> None:
    """A user class is refused by default, admitted by allow=, and by unsafe trust."""
    frame = Codec(ring).dumps(Point(1, 2))
    with pytest.raises(ForbiddenClass) as info:
        Codec(ring).loads(frame)
    assert (f"{__name__}.Point",) == info.value.names
    assert Point(1, 2) == Codec(ring, allow=[Point]).loads(frame)
    assert Point(1, 2) == Codec(ring, unsafe_trust_signed_frames=True).loads(frame)


def test_forbidden_global_never_runs(ring: Keyring, monkeypatch: pytest.MonkeyPatch) -> None:
    """A validly signed pickle calling os.system is refused without calling it."""
    calls: list[object] = []
    monkeypatch.setattr("os.system", lambda *a: calls.append(a))
    codec = Codec(ring)
    with pytest.raises(ForbiddenClass) as info:
        codec.loads(codec.seal(FORBIDDEN_PICKLE))
    assert info.value.names == ("os.system",)
    assert calls == []
    assert codec.loads(codec.seal(pickle.dumps([1], protocol=0))) == [1]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"serializer": "json"}, ValueError, "unknown serializer 'json'"),
        ({"protocol": pickle.HIGHEST_PROTOCOL + 1}, ValueError, "pickle protocol"),
        ({"protocol": -1}, ValueError, "pickle protocol"),
        ({"max_age": 0}, ValueError, "max_age must be positive"),
        ({"max_age": -1.0}, ValueError, "max_age must be positive"),
        ({"clock_skew": -0.5}, ValueError, "clock_skew must be >= 0"),
        ({"max_frame_size": 55}, ValueError, "max_frame_size must be at least 56"),
        ({"mac": "hmac-md5"}, ValueError, "unknown MAC algorithm 'hmac-md5'"),
        ({"accept_macs": ["hmac-sha256", "gmac"]}, ValueError, "unknown MAC algorithm 'gmac'"),
        ({"context": "orders"}, TypeError, "context must be bytes"),
        ({"unsafe_trust_signed_frames": True, "allow": ["a.B"]}, ValueError, "drop allow="),
    ],
)
def test_constructor_validation(
    ring: Keyring, kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    """Bad codec options are refused at construction with a clear message."""
    with pytest.raises(error, match=message):
        Codec(ring, **kwargs)


def test_constructor_needs_a_keyring() -> None:
    """A codec takes a Keyring, not raw key material."""
    with pytest.raises(TypeError, match="keyring must be a Keyring, not bytes"):
        Codec(b"0123456789abcdef0123456789abcdef")  # type: ignore[arg-type]


def test_attributes_and_repr(ring: Keyring) -> None:
    """A codec exposes its ring, serializer and limit, and its repr shows no secret."""
    codec = Codec(ring, serializer="msgpack", max_frame_size=1000)
    assert ring is codec.keyring
    assert codec.serializer == "msgpack"
    assert codec.max_frame_size == 1000
    assert DEFAULT_MAX_FRAME_SIZE == Codec(ring).max_frame_size == 128 * 1024 * 1024
    assert ring.active_id in repr(codec)
    for form in secret_forms(ring):
        assert form not in repr(codec)


def test_dumps_errors_propagate(ring: Keyring) -> None:
    """Objects a serializer cannot carry raise its own error on dumps, not a RejectedFrame."""
    with pytest.raises((pickle.PicklingError, AttributeError)):
        Codec(ring).dumps(lambda: None)
    with pytest.raises(TypeError, match="msgpack cannot serialize"):
        Codec(ring, serializer="msgpack").dumps(Point(1, 2))


def test_dumps_over_max_frame_size(ring: Keyring) -> None:
    """dumps refuses to make a frame its own limit would refuse; at the limit it works."""
    payload = pickle.dumps(b"x" * 500)
    exact = len(Codec(ring).seal(payload))
    at_limit = Codec(ring, max_frame_size=exact)
    assert at_limit.loads(at_limit.dumps(b"x" * 500)) == b"x" * 500
    below = Codec(ring, max_frame_size=exact - 1)
    with pytest.raises(ValueError, match=f"over max_frame_size={exact - 1}"):
        below.dumps(b"x" * 500)
    with pytest.raises(ValueError, match=f"over max_frame_size={exact - 1}"):
        below.seal(payload)


# -- seal, unseal and buffer types --------------------------------------------------


def test_seal_unseal(ring: Keyring) -> None:
    """seal signs raw payload bytes; unseal returns them without deserializing."""
    codec = Codec(ring)
    payload = pickle.dumps({"a": 1}, protocol=4)
    frame = codec.seal(payload)
    assert frame[5] == 4
    assert payload == codec.unseal(frame)
    assert codec.loads(frame) == {"a": 1}


def test_unseal_does_not_deserialize(ring: Keyring) -> None:
    """unseal accepts any signed payload; only loads refuses one that is not a pickle."""
    codec = Codec(ring)
    frame = codec.seal(b"not a pickle")
    assert codec.unseal(frame) == b"not a pickle"
    with pytest.raises(MalformedFrame):
        codec.loads(frame)


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
@pytest.mark.parametrize("size", [10, LARGE + 10])
def test_buffer_types(ring: Keyring, kind: Callable[[bytes], Any], size: int) -> None:
    """bytes, bytearray and memoryview work as payloads and as frames, small and large."""
    codec = Codec(ring)
    payload = pickle.dumps(b"z" * size, protocol=5)
    frame = codec.seal(kind(payload))
    assert isinstance(frame, bytes)
    assert frame[5] == 5
    unsealed = codec.unseal(kind(frame))
    assert isinstance(unsealed, bytes)
    assert payload == unsealed
    assert b"z" * size == codec.loads(kind(frame))


def test_bytearray_is_released(ring: Keyring) -> None:
    """After loads or unseal the caller may resize its receive buffer (no export lingers)."""
    codec = Codec(ring)
    buf = bytearray(codec.dumps([1, 2]))
    assert codec.loads(buf) == [1, 2]
    assert pickle.loads(codec.unseal(buf)) == [1, 2]
    buf.clear()
    buf += codec.dumps("next")
    assert codec.loads(buf) == "next"


# -- context -----------------------------------------------------------------------


@pytest.mark.parametrize("size", [10, LARGE + 10])
def test_context_binding(ring: Keyring, size: int) -> None:
    """A frame opens only under the context it was sealed with."""
    orders = Codec(ring, context=b"orders")
    frame = orders.dumps("o" * size)
    assert "o" * size == orders.loads(frame)
    assert "o" * size == Codec(ring, context=bytearray(b"orders")).loads(frame)
    for other in (b"", b"order", b"orders2", b"Orders", b"payments"):
        with pytest.raises(InvalidSignature):
            Codec(ring, context=other).loads(frame)
    with pytest.raises(InvalidSignature):
        orders.loads(Codec(ring).dumps("no context"))


@pytest.mark.parametrize("size", [10, LARGE + 10])
def test_context_boundary_cannot_shift(ring: Keyring, size: int) -> None:
    """Moving the first context byte into the frame keeps the MAC input but is refused."""
    frame = Codec(ring, context=b"Zq").seal(b"p" * size)
    shifted = frame[:-32] + b"Z" + frame[-32:]  # same bytes under the MAC, context b"q"
    with pytest.raises(MalformedFrame, match="payload length field"):
        Codec(ring, context=b"q").loads(shifted)
    assert b"p" * size == Codec(ring, context=b"Zq").unseal(frame)


# -- time ---------------------------------------------------------------------------


def test_max_age(ring: Keyring, clock: Any) -> None:
    """A frame is accepted up to max_age seconds old, and refused after."""
    codec = Codec(ring, max_age=30, clock=clock)
    frame = codec.dumps("fresh")
    clock.advance(30)
    assert codec.loads(frame) == "fresh"
    clock.advance(0.001)
    with pytest.raises(ExpiredFrame, match="over max_age=30 s") as info:
        codec.loads(frame)
    assert pytest.approx(info.value.age) == 30.001


def test_no_max_age(ring: Keyring, clock: Any) -> None:
    """Without max_age, a frame of any age is accepted."""
    codec = Codec(ring, clock=clock)
    frame = codec.dumps("old")
    clock.advance(10 * 365 * 86400)
    assert codec.loads(frame) == "old"


@pytest.mark.parametrize("max_age", [None, 30])
def test_clock_skew(ring: Keyring, clock: Any, max_age: float | None) -> None:
    """A frame dated up to clock_skew ahead is accepted; further ahead it is refused."""
    assert DEFAULT_CLOCK_SKEW == 60.0
    consumer = Codec(ring, max_age=max_age, clock=clock)
    at_limit = Codec(ring, clock=lambda: clock.now + 60).dumps("ahead")
    beyond = Codec(ring, clock=lambda: clock.now + 60.001).dumps("too far")
    assert consumer.loads(at_limit) == "ahead"
    with pytest.raises(ExpiredFrame, match="in the future") as info:
        consumer.loads(beyond)
    assert pytest.approx(info.value.age) == -60.001


def test_custom_clock_skew(ring: Keyring, clock: Any) -> None:
    """clock_skew sets how far ahead a frame may be dated; 0 allows none."""
    ahead = Codec(ring, clock=lambda: clock.now + 5).dumps(1)
    assert Codec(ring, clock=clock, clock_skew=5).loads(ahead) == 1
    with pytest.raises(ExpiredFrame):
        Codec(ring, clock=clock, clock_skew=4.999).loads(ahead)
    with pytest.raises(ExpiredFrame):
        Codec(ring, clock=clock, clock_skew=0).loads(
            Codec(ring, clock=lambda: clock.now + 0.001).dumps(1)
        )
    assert Codec(ring, clock=clock, clock_skew=0).loads(Codec(ring, clock=clock).dumps(1)) == 1


def test_created_time_on_the_wire(ring: Keyring, clock: Any) -> None:
    """The frame's creation time is the producer's clock in whole milliseconds."""
    clock.now = 1_800_000_000.9876
    frame = Codec(ring, clock=clock).dumps(0)
    header = signedqueue._frame.parse_unverified(frame)
    assert header.created_ms == 1_800_000_000_987


# -- keys -------------------------------------------------------------------------


def test_frame_from_another_ring(ring: Keyring) -> None:
    """A frame from another ring is UnknownKey, naming its id and the known ids, no secrets."""
    other = Keyring.generate("other-producer")
    frame = Codec(other).dumps("x")
    with pytest.raises(UnknownKey) as info:
        Codec(ring).loads(frame)
    exc = info.value
    assert exc.key_id == "other-producer"
    assert "'other-producer'" in str(exc)
    assert repr([ring.active_id]) in str(exc)
    for text in (str(exc), repr(exc)):
        for form in secret_forms(ring) + secret_forms(other):
            assert form not in text
    assert Codec(other).loads(frame) == "x"


def test_same_id_other_secret(ring: Keyring) -> None:
    """A frame signed under the same id with another secret fails its signature."""
    impostor = Keyring.generate(ring.active_id)
    with pytest.raises(InvalidSignature):
        Codec(ring).loads(Codec(impostor).dumps("x"))


def test_rotation_is_live(ring: Keyring) -> None:
    """A codec signs with the new key after rotate() and verifies old frames until retire()."""
    codec = Codec(ring)
    old_id = ring.active_id
    old_frame = codec.dumps("old")
    new_id = ring.rotate()
    new_frame = codec.dumps("new")
    assert new_id == signedqueue._frame.peek_key_id(new_frame)
    assert codec.loads(old_frame) == "old"
    ring.retire(old_id)
    with pytest.raises(UnknownKey) as info:
        codec.loads(old_frame)
    assert old_id == info.value.key_id
    assert codec.loads(new_frame) == "new"


# -- order and cost of the checks ----------------------------------------------------


class _Tripwire:
    """Stands in for a module the codec must not touch; any use fails the test."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __getattr__(self, name: str) -> Any:
        def fail(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError(f"{self.what}.{name} was called")

        return fail


def test_size_checked_before_hashing_or_parsing(
    ring: Keyring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An oversized frame is refused before any byte is parsed or hashed."""
    codec = Codec(ring, max_frame_size=200)
    small, big = codec.dumps("ok"), Codec(ring).dumps("x" * 500)
    # Every MAC computation goes through one_shot or a MacKey (and hmac for
    # the compare).
    monkeypatch.setattr(signedqueue._codec, "one_shot", _Tripwire("mac").one_shot)
    for name in ("hmac", "new"):
        monkeypatch.setattr(signedqueue._mac.MacKey, name, getattr(_Tripwire("MacKey"), name))
    monkeypatch.setattr(signedqueue._mac, "hashlib", _Tripwire("hashlib"))
    monkeypatch.setattr(signedqueue._codec, "hmac", _Tripwire("hmac"))
    with pytest.raises(FrameTooLarge) as info:
        codec.loads(big)
    assert (len(big), 200) == (info.value.size, info.value.limit)
    with pytest.raises(AssertionError, match=r"mac\.one_shot was called"):
        codec.loads(small)  # a frame within the limit is hashed

    for name in ("parse_unverified", "parse_head"):
        monkeypatch.setattr(signedqueue._frame, name, getattr(_Tripwire("_frame"), name))
    with pytest.raises(FrameTooLarge):
        codec.loads(big)
    with pytest.raises(FrameTooLarge):
        codec.loads(b"\x00" * 201)  # garbage, but too large is all that is said
    with pytest.raises(AssertionError, match=r"_frame\.parse_head was called"):
        codec.loads(small)  # a frame within the limit is parsed


class _CountingHmac:
    """The hmac module, counting every HMAC computation and tag comparison."""

    def __init__(self) -> None:
        self.macs = 0
        self.compares = 0

    def compare_digest(self, a: Any, b: Any) -> bool:
        self.compares += 1
        return hmac.compare_digest(a, b)

    def digest(self, *args: Any, **kwargs: Any) -> bytes:
        self.macs += 1
        return hmac.digest(*args, **kwargs)

    def new(self, *args: Any, **kwargs: Any) -> hmac.HMAC:
        self.macs += 1
        return hmac.new(*args, **kwargs)


class _CountingMacs:
    """signedqueue._mac's entry points, counting every frame MAC started."""

    def __init__(self) -> None:
        self.frame_macs = 0

    def one_shot(self, *args: Any) -> bytes:
        self.frame_macs += 1
        return signedqueue._mac.one_shot(*args)

    def new_mac(self, *args: Any) -> Any:
        self.frame_macs += 1
        return signedqueue._mac.new_mac(*args)


@pytest.mark.parametrize("mac", ["hmac-sha256", "aes256-gmac"])
@pytest.mark.parametrize("context", [b"", b"ctx"])
@pytest.mark.parametrize("size", [10, LARGE + 10])
def test_one_mac_per_frame_whatever_the_ring_size(
    monkeypatch: pytest.MonkeyPatch, context: bytes, size: int, mac: str
) -> None:
    """
    Loading computes exactly one frame MAC and derives no key, even with 1000
    keys in the ring: one HMAC-SHA256 (the tag itself, or the GMAC frame key).
    """
    secrets_ = {f"key-{i:04d}": i.to_bytes(2, "big") * 16 for i in range(1000)}
    big_ring = Keyring(secrets_, "key-0000")
    producers = {
        kid: Codec(Keyring({kid: secrets_[kid]}, kid), context=context, mac=mac)
        for kid in ("key-0000", "key-0500", "key-0999")
    }
    frames = {kid: codec.dumps("v" * size) for kid, codec in producers.items()}
    unknown = Codec(Keyring.generate("key-1000"), context=context, mac=mac).dumps("v")
    consumer = Codec(big_ring, context=context, mac=mac)

    counter = _CountingHmac()  # compares in the codec, HMACs by the ring's MacKeys
    macs = _CountingMacs()
    monkeypatch.setattr(signedqueue._codec, "hmac", counter)
    class CountingInner:
        """A MacKey's inner hash state: every HMAC starts with one copy() of it."""

        def __init__(self, state: Any) -> None:
            self.state = state

        def copy(self) -> Any:
            counter.macs += 1
            return self.state.copy()

    for by_id in big_ring._state.mac_keys.values():
        for mac_key in by_id.values():
            mac_key._inner = CountingInner(mac_key._inner)  # type: ignore[assignment]
    monkeypatch.setattr(signedqueue._codec, "one_shot", macs.one_shot)
    monkeypatch.setattr(signedqueue._keys, "derive_mac_key", _Tripwire("keys").derive_mac_key)

    def counts() -> tuple[int, int, int]:
        # A small HMAC-SHA256 frame is tagged with the ring's MacKey directly;
        # every other frame MAC goes through one_shot.
        assert macs.frame_macs <= counter.macs
        return min(1, counter.macs + macs.frame_macs), counter.macs, counter.compares

    def reset() -> None:
        macs.frame_macs = counter.macs = counter.compares = 0

    for kid, frame in frames.items():
        reset()
        assert "v" * size == consumer.loads(frame)
        assert counts() == (1, 1, 1), kid  # constant-time compare
    reset()
    with pytest.raises(InvalidSignature):
        consumer.loads(flip(frames["key-0999"], -1))
    assert counts() == (1, 1, 1)
    reset()
    with pytest.raises(UnknownKey):
        consumer.loads(unknown)
    assert counts() == (0, 0, 0)  # unknown ids are not hashed


# -- refusals: logging, attributes, pickling ---------------------------------------


def _refusals(ring: Keyring, clock: Any) -> dict[str, tuple[Codec, bytes]]:
    """One (consumer, frame) pair per kind of refusal, each frame carrying MARKER."""
    codec = Codec(ring, clock=clock, max_age=60, max_frame_size=4096)
    good = codec.dumps({"secret-ish": MARKER})
    return {
        "FrameTooLarge": (codec, Codec(ring).dumps(MARKER * 200)),
        "MalformedFrame": (codec, good + MARKER.encode()),
        "UnknownKey": (codec, Codec(Keyring.generate("stranger")).dumps(MARKER)),
        "InvalidSignature": (codec, flip(good, 60)),
        "ExpiredFrame": (codec, Codec(ring, clock=lambda: clock.now - 61).dumps(MARKER)),
        "ForbiddenClass": (codec, codec.seal(FORBIDDEN_PICKLE)),
    }


@pytest.mark.parametrize(
    "kind",
    ["FrameTooLarge", "MalformedFrame", "UnknownKey", "InvalidSignature", "ExpiredFrame",
     "ForbiddenClass"],
)
def test_refusal_is_logged_safely(
    ring: Keyring, clock: Any, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    """Each refusal logs one warning with class, reason, key id and size: no secret, no payload."""
    codec, frame = _refusals(ring, clock)[kind]
    assert MARKER.encode() in frame  # so its absence below means something
    with caplog.at_level(logging.WARNING, logger="signedqueue"), pytest.raises(
        RejectedFrame
    ) as info:
        codec.loads(frame)
    exc = info.value
    assert kind == type(exc).__name__
    records = [r for r in caplog.records if r.name == "signedqueue"]
    assert len(records) == 1
    record = records[0]
    message = record.getMessage()
    assert record.levelno == logging.WARNING
    assert kind in message
    assert exc.reason in message
    assert f"[key id {exc.key_id}, {len(frame)} bytes]" in message
    assert record.exc_info is None
    texts = [message, repr(record.__dict__), str(exc), repr(exc), repr(exc.args)]
    for text in texts:
        assert MARKER not in text
        for form in secret_forms(ring):
            assert form not in text


def test_accepted_frames_log_nothing(
    ring: Keyring, codec: Codec, caplog: pytest.LogCaptureFixture
) -> None:
    """A frame that loads produces no log record."""
    with caplog.at_level(logging.DEBUG, logger="signedqueue"):
        assert codec.loads(codec.dumps(MARKER)) == MARKER
    assert [r for r in caplog.records if r.name == "signedqueue"] == []


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_refusal_keeps_the_raw_frame(ring: Keyring, kind: Callable[[bytes], Any]) -> None:
    """RejectedFrame.frame holds the frame's raw bytes, whatever buffer was given."""
    codec = Codec(ring)
    tampered = flip(codec.dumps(MARKER), -1)
    for method in (codec.loads, codec.unseal):
        with pytest.raises(InvalidSignature) as info:
            method(kind(tampered))
        assert isinstance(info.value.frame, bytes)
        assert tampered == info.value.frame
        assert ring.active_id == info.value.key_id


def test_refusals_pickle_round_trip(ring: Keyring, clock: Any) -> None:
    """Refusals survive pickling (e.g. from a pool worker) with frame, reason and details."""
    for kind, (codec, frame) in _refusals(ring, clock).items():
        with pytest.raises(RejectedFrame) as info:
            codec.loads(frame)
        exc = info.value
        copy = pickle.loads(pickle.dumps(exc))
        assert kind == type(copy).__name__
        assert (exc.frame, exc.reason, exc.key_id) == (copy.frame, copy.reason, copy.key_id)
        # A frame refused for its size keeps only its first 4096 bytes.
        assert (frame[:4096] if kind == "FrameTooLarge" else frame) == copy.frame
        assert str(exc) == str(copy)
        assert repr(exc) == repr(copy)
        for attr in ("size", "limit", "age", "names", "allow_entries"):
            assert getattr(exc, attr, None) == getattr(copy, attr, None)



# -- reseal and verify ----------------------------------------------------------------


def reference_tag(ring: Keyring, key_id: str, frame: bytes, context: bytes = b"") -> bytes:
    """The tag a frame must carry, computed here from the key's secret."""
    mac_key = derive_mac_key(secret_of(ring, key_id))
    return hmac.new(mac_key, frame[:-32] + context, "sha256").digest()


def test_reseal_under_the_new_key(ring: Keyring, clock: Any) -> None:
    """reseal signs under the active key, keeping created time, nonce and payload."""
    codec = Codec(ring, clock=clock, context=b"q")
    frame = codec.dumps(SAMPLE)
    old_id = ring.active_id
    new_id = ring.rotate()
    clock.advance(3600)  # resealed an hour later: the created time is still the old one
    resealed = codec.reseal(frame)

    before, after = codec.verify(frame), codec.verify(resealed)
    assert (before.key_id, after.key_id) == (old_id, new_id)
    assert after.created == before.created == int((clock.now - 3600) * 1000) / 1000
    assert after.nonce == before.nonce
    assert (after.serializer, after.param, after.payload_size) == (
        before.serializer, before.param, before.payload_size)
    assert codec.unseal(resealed) == codec.unseal(frame)
    assert resealed[-32:] == reference_tag(ring, new_id, resealed, b"q")
    assert resealed[-32:] != reference_tag(ring, old_id, resealed, b"q")
    with pytest.raises(InvalidSignature):
        Codec(ring).loads(resealed)  # still bound to its context

    # While both keys are in the ring, both frames verify; then only the new one.
    assert codec.loads(frame) == SAMPLE
    assert codec.loads(resealed) == SAMPLE
    ring.retire(old_id)
    with pytest.raises(UnknownKey):
        codec.loads(frame)
    assert codec.loads(resealed) == SAMPLE


def test_reseal_under_the_same_key_changes_nothing(ring: Keyring) -> None:
    """Resealing a frame already signed by the active key gives back the same bytes."""
    codec = Codec(ring)
    frame = codec.dumps([1, 2, 3])
    assert codec.reseal(frame) == frame


@pytest.mark.parametrize(
    ("serializer", "param"),
    [*(("pickle", p) for p in range(pickle.HIGHEST_PROTOCOL + 1)), ("msgpack", 0),
     ("cloudpickle", 5)],
)
def test_reseal_keeps_serializer_and_protocol(ring: Keyring, serializer: str, param: int) -> None:
    """A resealed frame keeps the serializer id and its parameter (the pickle protocol)."""
    options: dict[str, Any] = {"serializer": serializer}
    if serializer == "pickle":
        options["protocol"] = param
    if serializer == "cloudpickle":
        options["unsafe_trust_signed_frames"] = True
    codec = Codec(ring, **options)
    frame = codec.dumps({"n": [1, 2]})
    ring.rotate()
    resealed = codec.reseal(frame)
    old = signedqueue._frame.parse_unverified(frame)
    new = signedqueue._frame.parse_unverified(resealed)
    assert (new.serializer, new.param) == (old.serializer, old.param)
    assert new.param == param
    assert codec.verify(resealed).serializer == serializer
    assert codec.loads(resealed) == {"n": [1, 2]}


@pytest.mark.parametrize("payload", [b"\x80\x02K\x01.", b"N.", b""], ids=["p2", "p0", "empty"])
def test_reseal_keeps_the_param_of_sealed_payloads(ring: Keyring, payload: bytes) -> None:
    """A raw sealed payload keeps the param it was sealed with, and its bytes."""
    codec = Codec(ring)
    frame = codec.seal(payload)
    ring.rotate()
    resealed = codec.reseal(frame)
    assert codec.verify(resealed).param == codec.verify(frame).param
    assert codec.unseal(resealed) == payload


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
@pytest.mark.parametrize("size", [10, LARGE + 10])
def test_reseal_buffer_types(ring: Keyring, kind: Callable[[bytes], Any], size: int) -> None:
    """reseal takes any buffer, small or hashed incrementally, and returns bytes."""
    codec = Codec(ring, serializer="msgpack", context=b"c")
    frame = codec.seal(b"p" * size)
    new_id = ring.rotate()
    resealed = codec.reseal(kind(frame))
    assert type(resealed) is bytes
    assert resealed[-32:] == reference_tag(ring, new_id, resealed, b"c")
    assert codec.unseal(resealed) == b"p" * size


def test_reseal_never_deserializes(ring: Keyring, monkeypatch: pytest.MonkeyPatch) -> None:
    """A frame naming a forbidden global reseals (nothing is loaded) and loads still refuse it."""
    codec = Codec(ring)
    frame = codec.seal(FORBIDDEN_PICKLE)
    ring.rotate()
    calls: list[object] = []
    monkeypatch.setattr("os.system", lambda *a: calls.append(a))
    with monkeypatch.context() as patch:
        patch.setattr(codec._serializer, "loads", _Tripwire("serializer").loads)
        resealed = codec.reseal(frame)
        assert codec.verify(resealed).payload_size == len(FORBIDDEN_PICKLE)
    assert codec.unseal(resealed) == FORBIDDEN_PICKLE
    with pytest.raises(ForbiddenClass) as info:
        codec.loads(resealed)
    assert info.value.names == ("os.system",)
    assert calls == []


def test_reseal_does_not_extend_a_frames_life(ring: Keyring, clock: Any) -> None:
    """A resealed frame keeps its creation time, so max_age counts from the original."""
    codec = Codec(ring, clock=clock, max_age=60)
    frame = codec.dumps("x")
    clock.advance(50)
    ring.rotate()
    resealed = codec.reseal(frame)
    assert codec.loads(resealed) == "x"
    clock.advance(10.001)
    with pytest.raises(ExpiredFrame):
        codec.loads(resealed)


def test_reseal_over_max_frame_size(clock: Any) -> None:
    """Resealing under a longer key id that would exceed max_frame_size raises ValueError."""
    ring = Keyring.generate("k")
    codec = Codec(ring, serializer="msgpack", max_frame_size=200, clock=clock)
    frame = codec.seal(b"x" * (200 - 72))
    assert len(frame) == 200
    ring.add("k" * 64)
    ring.promote("k" * 64)
    with pytest.raises(ValueError, match="over max_frame_size=200"):
        codec.reseal(frame)


REFUSAL_KINDS = ["FrameTooLarge", "MalformedFrame", "UnknownKey", "InvalidSignature",
                 "ExpiredFrame"]


def _refused_by(method: Callable[[bytes], Any], frame: bytes) -> RejectedFrame:
    """The refusal *method* raises for *frame*."""
    with pytest.raises(RejectedFrame) as info:
        method(frame)
    return info.value


@pytest.mark.parametrize("method", ["reseal", "verify"])
@pytest.mark.parametrize("kind", [*REFUSAL_KINDS, "OtherSerializer"])
def test_reseal_and_verify_refuse_as_loads(
    ring: Keyring, clock: Any, caplog: pytest.LogCaptureFixture, method: str, kind: str
) -> None:
    """reseal and verify refuse exactly what loads refuses, with the same exception and log."""
    if kind == "OtherSerializer":
        codec = Codec(ring, clock=clock)
        frame = Codec(ring, serializer="msgpack", clock=clock).dumps(MARKER)
    else:
        codec, frame = _refusals(ring, clock)[kind]
    expected = _refused_by(codec.loads, frame)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="signedqueue"):
        got = _refused_by(getattr(codec, method), frame)
    assert type(got) is type(expected)
    assert (str(got), got.reason, got.frame, got.key_id) == (
        str(expected), expected.reason, expected.frame, expected.key_id)
    assert len([r for r in caplog.records if r.name == "signedqueue"]) == 1


def test_verify_frame_info(ring: Keyring, clock: Any) -> None:
    """verify returns the header of a verified frame: key, time, serializer, param, nonce, size."""
    clock.now = 1_800_000_000.9876
    codec = Codec(ring, clock=clock, protocol=3)
    frame = codec.dumps(SAMPLE)
    info = codec.verify(frame)
    header = signedqueue._frame.parse_unverified(frame)
    assert info == signedqueue.FrameInfo(
        key_id=ring.active_id,
        created=1_800_000_000.987,
        serializer="pickle",
        param=3,
        nonce=header.nonce,
        payload_size=len(codec.unseal(frame)),
    )
    assert len(info.nonce) == 16
    assert info.nonce == frame[7 + len(ring.active_id) + 8 : 7 + len(ring.active_id) + 24]
    with pytest.raises(AttributeError):
        info.key_id = "other"  # type: ignore[misc]
    assert "FrameInfo" in signedqueue.__all__


@pytest.mark.parametrize("size", [0, 10, LARGE + 10])
def test_verify_msgpack_and_sizes(ring: Keyring, size: int) -> None:
    """verify reports msgpack frames with param 0 and the exact payload size."""
    codec = Codec(ring, serializer="msgpack")
    info = codec.verify(codec.seal(b"m" * size))
    assert (info.serializer, info.param, info.payload_size) == ("msgpack", 0, size)


def test_verify_never_deserializes(ring: Keyring, monkeypatch: pytest.MonkeyPatch) -> None:
    """verify accepts a validly signed frame naming a forbidden global: it loads nothing."""
    codec = Codec(ring)
    frame = codec.seal(FORBIDDEN_PICKLE)
    monkeypatch.setattr(codec._serializer, "loads", _Tripwire("serializer").loads)
    info = codec.verify(frame)
    assert (info.serializer, info.param, info.payload_size) == (
        "pickle", 0, len(FORBIDDEN_PICKLE))


def test_verify_after_rotation(ring: Keyring) -> None:
    """verify names the key that signed each frame, across a rotation."""
    codec = Codec(ring)
    old_id = ring.active_id
    old = codec.dumps(1)
    new_id = ring.rotate()
    assert [codec.verify(f).key_id for f in (old, codec.dumps(2))] == [old_id, new_id]


# -- resource bounds of the restricted unpickler -------------------------------------

#: PROTO 4, NONE, LONG_BINPUT 1_000_000, STOP: 9 bytes naming a far memo slot.
FAR_MEMO_PICKLE = b"\x80\x04N" + b"r" + struct.pack("<I", 1_000_000) + b"."


def _traced_peak(load: Callable[[], Any]) -> int:
    """Peak bytes traced by tracemalloc while *load* runs (its errors are ignored)."""
    tracemalloc.start()
    try:
        with contextlib.suppress(RejectedFrame, pickle.UnpicklingError):
            load()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


#: Whether this CPython's C unpickler sizes its memo by the largest index seen
#: (python/cpython#115952, fixed upstream by a sparse memo).
CPYTHON_MEMO_GROWS = _traced_peak(lambda: pickle.loads(FAR_MEMO_PICKLE)) > 8 * 1024 * 1024


def test_far_memo_index_does_not_allocate(ring: Keyring) -> None:
    """
    A tiny signed pickle naming a far memo slot is refused or loaded without
    allocating (on a CPython whose C unpickler sizes its memo by the largest
    index, CPYTHON_MEMO_GROWS, signedqueue bounds memo indices itself).
    """
    codec = Codec(ring)
    assert codec.loads(codec.seal(pickle.dumps(None, protocol=4))) is None
    frame = codec.seal(FAR_MEMO_PICKLE)
    assert _traced_peak(lambda: codec.loads(frame)) < 1024 * 1024


def test_with_context_rebinds_and_keeps_options(ring: signedqueue.Keyring) -> None:
    """with_context() changes only the bound context: frames cross only within one."""
    base = signedqueue.Codec(ring, allow=["collections.OrderedDict"], context=b"a")
    other = base.with_context(b"b")
    assert (base.context, other.context) == (b"a", b"b")
    import collections

    value = collections.OrderedDict(x=1)
    assert other.loads(other.dumps(value)) == value
    assert base.loads(base.dumps(value)) == value
    with pytest.raises(signedqueue.InvalidSignature):
        base.loads(other.dumps(value))
    with pytest.raises(signedqueue.InvalidSignature):
        other.loads(base.dumps(value))
    with pytest.raises(TypeError, match="context must be bytes"):
        base.with_context("b")  # type: ignore[arg-type]
