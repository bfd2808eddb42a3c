"""Properties over generated values and bytes: round trips, and refusals that are only refusals."""

from __future__ import annotations

import collections
import contextlib
import datetime
import decimal
import fractions
import logging
import pickle
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from signedqueue import (
    Codec,
    InvalidSignature,
    Keyring,
    MalformedFrame,
    RejectedFrame,
    UnknownKey,
)
from signedqueue._msgpack import MAX_EXT_DEPTH

RING = Keyring.generate("prop-key")
PICKLE = {p: Codec(RING, protocol=p) for p in range(pickle.HIGHEST_PROTOCOL + 1)}
MSGPACK = Codec(RING, serializer="msgpack")
CONTEXT = Codec(RING, context=b"prop-context")
CODECS = {"pickle": PICKLE[pickle.DEFAULT_PROTOCOL], "msgpack": MSGPACK}

SETTINGS = settings(
    deadline=None,  # never fail on time
    max_examples=40,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.fixture(autouse=True)
def _quiet_refusals() -> Iterator[None]:
    """Refusals are logged as warnings; thousands of them here would only be noise."""
    logger = logging.getLogger("signedqueue")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


# -- strategies -------------------------------------------------------------------------

UTC = datetime.timezone.utc
IST = datetime.timezone(datetime.timedelta(hours=5, minutes=30))
TZ = st.sampled_from([None, UTC, IST])
INT64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)


def _no_fold(value: Any) -> Any:
    # Pickle protocols 0-3 and msgpack do not carry fold; it is not what is tested.
    return value.replace(fold=0)


def leaves(*, msgpack: bool) -> st.SearchStrategy[Any]:
    """Hashable scalar values of the allowed types (NaN excluded, for equality)."""
    common = [
        st.none(),
        st.booleans(),
        INT64 if msgpack else st.integers(),
        st.floats(allow_nan=False),
        st.text(max_size=20),
        st.binary(max_size=20),
        st.datetimes(timezones=TZ).map(_no_fold),
        st.dates(),
        st.times(timezones=TZ).map(_no_fold),
        st.timedeltas(),
        st.decimals(allow_nan=False),
        st.uuids(),
        st.complex_numbers(allow_nan=False),
    ]
    if not msgpack:
        common.append(st.fractions(max_denominator=10**12))
    return st.one_of(common)


def hashables(*, msgpack: bool) -> st.SearchStrategy[Any]:
    """Hashable values: scalars, and tuples and frozensets of them."""
    return st.recursive(
        leaves(msgpack=msgpack),
        lambda inner: st.one_of(
            st.lists(inner, max_size=3).map(tuple), st.frozensets(inner, max_size=3)
        ),
        max_leaves=6,
    )


def values(*, msgpack: bool) -> st.SearchStrategy[Any]:
    """Nested values of every type the serializer carries."""
    keys = hashables(msgpack=msgpack)

    def containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        options = [
            st.lists(inner, max_size=4),
            st.lists(inner, max_size=4).map(tuple),
            st.dictionaries(keys, inner, max_size=4),
            st.sets(keys, max_size=4),
            st.frozensets(keys, max_size=4),
        ]
        if not msgpack:
            options += [
                st.dictionaries(keys, inner, max_size=4).map(collections.OrderedDict),
                st.lists(inner, max_size=4).map(collections.deque),
                st.dictionaries(keys, st.integers(), max_size=4).map(collections.Counter),
            ]
        return st.one_of(options)

    return st.recursive(keys, containers, max_leaves=15)


def canon(value: Any) -> Any:
    """A comparable form of *value* that keeps every type and order that must survive."""
    kind = type(value).__name__
    if isinstance(value, float):
        return kind, value.hex()
    if isinstance(value, complex):
        return kind, value.real.hex(), value.imag.hex()
    if isinstance(value, (datetime.datetime, datetime.time)):
        return kind, value.isoformat(), repr(value.tzinfo)
    if isinstance(value, (decimal.Decimal, fractions.Fraction, uuid.UUID, datetime.date)):
        return kind, str(value)
    if isinstance(value, (list, tuple)):
        return kind, tuple(canon(v) for v in value)
    if isinstance(value, collections.deque):
        return kind, tuple(canon(v) for v in value), value.maxlen
    if isinstance(value, dict):
        return kind, tuple((canon(k), canon(v)) for k, v in value.items())
    if isinstance(value, (set, frozenset)):
        return kind, tuple(sorted(repr(canon(v)) for v in value))
    return kind, value


def ext_depth(value: Any) -> int:
    """How deeply msgpack extension values (tuples, sets, ...) nest in *value*."""
    if isinstance(value, dict):
        return max((max(ext_depth(k), ext_depth(v)) for k, v in value.items()), default=0)
    if isinstance(value, list):
        return max(map(ext_depth, value), default=0)
    if isinstance(value, (tuple, set, frozenset)):
        return 1 + max(map(ext_depth, value), default=0)
    if isinstance(value, (complex, datetime.timedelta)):
        return 1
    return 0


# -- round trips ------------------------------------------------------------------------------


def test_canon_tells_types_apart() -> None:
    """The comparison used below distinguishes what == alone would not."""
    assert canon([1, (2,)]) == canon([1, (2,)])
    assert canon([1]) != canon((1,))
    pairs = [
        (1, True),
        (1, 1.0),
        (0.0, -0.0),
        ({1: 2}, {1: 2.0}),
        (decimal.Decimal("1.0"), decimal.Decimal("1.00")),
        ({"a": 1, "b": 2}, {"b": 2, "a": 1}),
        ({1: 1}, collections.Counter({1: 1})),
    ]
    for left, right in pairs:
        assert left == right
        assert canon(left) != canon(right)


@pytest.mark.parametrize("protocol", sorted(PICKLE))
@SETTINGS
@given(value=values(msgpack=False))
def test_pickle_round_trip(protocol: int, value: Any) -> None:
    """Every value of the allowed types round-trips through the restricted pickle codec."""
    codec = PICKLE[protocol]
    assert canon(value) == canon(codec.loads(codec.dumps(value)))


@settings(SETTINGS, max_examples=150)
@given(value=values(msgpack=True))
def test_msgpack_round_trip(value: Any) -> None:
    """Every value msgpack can represent round-trips through the msgpack codec."""
    assume(ext_depth(value) <= MAX_EXT_DEPTH)
    assert canon(value) == canon(MSGPACK.loads(MSGPACK.dumps(value)))


# -- tampering --------------------------------------------------------------------------------

SMALL_VALUES = st.one_of(INT64, st.text(max_size=30), st.lists(INT64, max_size=5))


@settings(SETTINGS, max_examples=150)
@given(
    name=st.sampled_from(sorted(CODECS)),
    value=SMALL_VALUES,
    bit=st.integers(min_value=0),
)
def test_any_bit_flip_refused(name: str, value: Any, bit: int) -> None:
    """Flipping any single bit of a valid frame gets it refused by a frame check."""
    codec = CODECS[name]
    frame = codec.dumps(value)
    assert canon(value) == canon(codec.loads(frame))
    bit %= len(frame) * 8
    flipped = bytearray(frame)
    flipped[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises((MalformedFrame, UnknownKey, InvalidSignature)):
        codec.loads(bytes(flipped))


@SETTINGS
@given(value=SMALL_VALUES, cut=st.integers(min_value=1))
def test_any_truncation_refused(value: Any, cut: int) -> None:
    """A valid frame with any number of bytes cut from its end is malformed."""
    frame = CONTEXT.dumps(value)
    cut = 1 + (cut - 1) % len(frame)
    with pytest.raises(MalformedFrame):
        CONTEXT.loads(frame[:-cut])
    assert canon(value) == canon(CONTEXT.loads(frame))


@SETTINGS
@given(value=SMALL_VALUES, extra=st.binary(min_size=1, max_size=64))
def test_any_extension_refused(value: Any, extra: bytes) -> None:
    """A valid frame with any bytes appended is malformed."""
    frame = CONTEXT.dumps(value)
    with pytest.raises(MalformedFrame):
        CONTEXT.loads(frame + extra)
    assert canon(value) == canon(CONTEXT.loads(frame))


# -- arbitrary bytes --------------------------------------------------------------------------

#: Bytes that get past the first checks: the right magic, version and key id.
HEADERS = st.sampled_from(
    [
        b"",
        b"SQ",
        b"SQ\x01\x01\x01\x05",
        b"SQ\x01\x01\x02\x00\x08prop-key",
        b"SQ\x01\x01\x01\x05\x08prop-key",
    ]
)


@settings(SETTINGS, max_examples=300)
@given(name=st.sampled_from(sorted(CODECS)), head=HEADERS, tail=st.binary(max_size=200))
def test_arbitrary_bytes_only_refused(name: str, head: bytes, tail: bytes) -> None:
    """Arbitrary bytes given to loads raise a RejectedFrame subclass and nothing else."""
    with pytest.raises(RejectedFrame):
        CODECS[name].loads(head + tail)


def _mutated(payload: bytes, data: st.DataObject) -> bytes:
    """*payload* with a few random edits: flips, deletions, insertions, truncation."""
    out = bytearray(payload)
    for _ in range(data.draw(st.integers(1, 4))):
        action = data.draw(st.sampled_from(["flip", "delete", "insert", "truncate"]))
        at = data.draw(st.integers(0, max(len(out) - 1, 0)))
        if action == "flip" and out:
            out[at] ^= data.draw(st.integers(1, 255))
        elif action == "delete" and out:
            del out[at]
        elif action == "insert":
            out[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        else:
            del out[at:]
    return bytes(out)


@settings(SETTINGS, max_examples=300)
@given(
    name=st.sampled_from(sorted(CODECS)),
    protocol=st.sampled_from(sorted(PICKLE)),
    value=values(msgpack=True),
    data=st.data(),
)
def test_signed_garbage_only_refused(
    name: str, protocol: int, value: Any, data: st.DataObject
) -> None:
    """Garbage in a validly signed frame reaches the deserializer and is only ever refused."""
    assume(ext_depth(value) <= MAX_EXT_DEPTH)
    codec = CODECS[name]
    if name == "pickle":
        payload = pickle.dumps(value, protocol=protocol)
    else:
        payload = MSGPACK.unseal(MSGPACK.dumps(value))
    garbage = data.draw(st.one_of(st.just(_mutated(payload, data)), st.binary(max_size=200)))
    frame = codec.seal(garbage)
    assert garbage == codec.unseal(frame)
    with contextlib.suppress(RejectedFrame):  # anything else fails the test
        codec.loads(frame)
    if name == "pickle":
        # The header claims protocol 5 whatever the payload; loaded twice, so
        # that the second load takes the cached-header path.
        claimed = codec._seal(garbage, 5)
        for _ in range(2):
            with contextlib.suppress(RejectedFrame):
                codec.loads(claimed)
