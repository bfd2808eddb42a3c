"""
The fuzz harness for ``Codec.loads``, shared by the atheris target
(fuzz/fuzz_codec.py) and the regression corpus test (tests/test_corpus.py).

An input is one selector byte followed by data:

* bit 0 of the selector is the mode: 0 *raw* (the data is a whole frame,
  fed to ``loads`` as it is), 1 *resealed* (the data is a second byte
  choosing the serializer parameter, then a payload, which is sealed with the
  fuzz key so that it gets past the tag and reaches the deserializer);
* the other bits choose the codec (``TARGETS``, modulo its length).

``check(data)`` returns what ``loads`` returned, or the :class:`RejectedFrame`
it raised; anything else (another exception type, a warning) propagates as a
:class:`Finding`.  Hangs and memory are bounded by the caller: atheris's
``-timeout`` and ``-rss_limit_mb``, or the corpus test's clock and tracemalloc.

Codecs whose loading is unrestricted (cloudpickle, which needs
``unsafe_trust_signed_frames``) are fuzzed in raw mode only: a resealed
payload would be a validly signed frame, which such a codec is *documented*
to run as code.  Their resealed inputs are fed to the raw path instead.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import fractions
import gc
import pickle
import resource
import sys
import uuid
import warnings
from collections import OrderedDict, defaultdict, deque
from typing import Any, NamedTuple

from signedqueue import Allowlist, Codec, Keyring, RejectedFrame

#: Frames are dated by this fixed clock, so that seeds never expire.
FIXED_NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z
SECRET = b"signedqueue fuzzing key: public, constant, never for real use"
KEY_ID = "fuzz"

#: Selector parameter byte (resealed mode, pickle family) -> header param.
#: 0..5: that protocol; 6: protocol 5 with out-of-band buffers (0x85);
#: anything else: what ``Codec.seal`` would choose for the payload.
OUT_OF_BAND_PARAM = 0x85


class Finding(AssertionError):
    """``loads`` did something other than return or raise RejectedFrame."""


@dataclasses.dataclass
class Point:
    x: int
    y: int


@dataclasses.dataclass(frozen=True)
class Labelled:
    label: str
    weight: float
    tags: list[str]


class Pair(NamedTuple):
    left: int
    right: str


def _clock() -> float:
    return FIXED_NOW


def _keyring() -> Keyring:
    return Keyring({KEY_ID: SECRET, "other.key-2": SECRET[::-1]}, active=KEY_ID,
                   created={KEY_ID: FIXED_NOW - 86400, "other.key-2": FIXED_NOW - 86400})


class Target(NamedTuple):
    name: str
    codec: Codec
    #: True: signed frames may run code, so only raw mode is meaningful.
    unrestricted: bool
    family: str  # "pickle" or "msgpack"


def _targets() -> list[Target]:
    ring = _keyring()
    common: dict[str, Any] = dict(clock=_clock)
    targets = [
        Target("pickle", Codec(ring, **common), False, "pickle"),
        Target(
            "pickle-presets",
            Codec(
                ring,
                allow=Allowlist(
                    [Point, Labelled, Pair], presets=("stdlib", "numpy", "dateutil")
                ),
                max_age=3600,
                context=b"fuzz-context",
                **common,
            ),
            False,
            "pickle",
        ),
        Target(
            "pickle-p2-gmac",
            Codec(ring, protocol=2, mac="aes256-gmac",
                  accept_macs=["hmac-sha256", "aes256-gmac"], **common),
            False,
            "pickle",
        ),
        Target(
            "msgpack",
            Codec(ring, serializer="msgpack", msgpack_types=[Point, Labelled, Pair], **common),
            False,
            "msgpack",
        ),
        Target(
            "cloudpickle",
            Codec(ring, serializer="cloudpickle", unsafe_trust_signed_frames=True, **common),
            True,
            "pickle",
        ),
    ]
    return targets


TARGETS = _targets()


def selector(target: str, resealed: bool) -> int:
    """The selector byte for *target* in the given mode."""
    index = [t.name for t in TARGETS].index(target)
    return index << 1 | int(resealed)


def frame_for(data: bytes) -> tuple[Target, bytes]:
    """The codec an input chooses and the frame it feeds to ``loads``."""
    if not data:
        return TARGETS[0], b""
    target = TARGETS[(data[0] >> 1) % len(TARGETS)]
    body = data[1:]
    if not data[0] & 1 or target.unrestricted:
        return target, body
    choice, payload = (body[0], body[1:]) if body else (255, b"")
    codec = target.codec
    if target.family == "msgpack":
        param = 0
    elif choice <= 5:
        param = choice
    elif choice == 6:
        param = OUT_OF_BAND_PARAM
    else:
        param = codec._serializer.param_for(payload)
    # Codec._seal: the private half of Codec.seal that takes the parameter.
    return target, codec._seal(payload, param)


#: Errors CPython prints instead of raising (from a deallocator, through
#: sys.excepthook or sys.unraisablehook) while an input is checked.
_printed: list[str] = []


def _excepthook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
    _printed.append(f"{kind.__name__}: {value}")


def _unraisablehook(unraisable: Any) -> None:
    _printed.append(f"{type(unraisable.exc_value).__name__}: {unraisable.exc_value}")


def _peak_rss_mb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


#: check() raises a Finding when one input raises the process's peak
#: resident memory by more than this many MiB (libFuzzer's -rss_limit_mb
#: notices only the total, a second later, and blames a later input).
RSS_GROWTH_MB = 256


def check(data: bytes, collect: bool = False) -> Any:
    """
    Feed one input to ``loads``; raise :class:`Finding` unless it behaves.
    Returns what ``loads`` returned, or the type of the RejectedFrame it
    raised (not the exception: its traceback would tie the frame's buffers
    into a reference cycle).  With *collect*, a garbage collection runs
    before the hooks are removed, so errors printed while the input's
    leftovers are freed count too.
    """
    target, frame = frame_for(data)
    _printed.clear()
    peak_before = _peak_rss_mb()
    hooks = sys.excepthook, sys.unraisablehook
    sys.excepthook, sys.unraisablehook = _excepthook, _unraisablehook
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("error")
            try:
                result: Any = target.codec.loads(frame)
            except RejectedFrame as exc:
                result = type(exc)
            except BaseException as exc:
                if isinstance(exc, KeyboardInterrupt):
                    raise
                raise Finding(
                    f"{target.name}: loads raised {type(exc).__name__}: {exc!r}"[:500]
                ) from exc
            if collect:
                result = None if not isinstance(result, type) else result
                gc.collect()
    finally:
        sys.excepthook, sys.unraisablehook = hooks
    if caught:
        first = caught[0]
        raise Finding(
            f"{target.name}: loads warned {first.category.__name__}: {first.message}"[:500]
        )
    if _printed:
        raise Finding(f"{target.name}: CPython printed {_printed[0]}"[:500])
    grown = _peak_rss_mb() - peak_before
    if grown > RSS_GROWTH_MB:
        raise Finding(f"{target.name}: peak memory grew by {grown} MiB on one input")
    return result


# -- seeds ---------------------------------------------------------------------


def _objects() -> list[Any]:
    import collections

    return [
        None, True, 0, -1, 2**70, 3.5, float("nan"), "text", "ünï", b"bytes",
        bytearray(b"ba"), [1, [2, [3]]], (1, "a", None), {"k": [1, 2]}, {1, 2}, frozenset({3}),
        {(1, 2): "tuple key"}, complex(1, 2), range(3), slice(1, 5, 2),
        datetime.datetime(2025, 1, 2, 3, 4, 5, 6),
        datetime.datetime(2025, 1, 2, tzinfo=datetime.timezone.utc),
        datetime.date(2025, 1, 2), datetime.time(1, 2, 3), datetime.timedelta(days=1, seconds=2),
        decimal.Decimal("1.25"), fractions.Fraction(3, 7), uuid.UUID(int=12345),
        OrderedDict(a=1), defaultdict(list, a=[1]), deque([1, 2]), collections.Counter("aab"),
        Point(1, 2), Labelled("l", 1.5, ["t"]), Pair(1, "r"), "x" * 5000, b"\x00" * 70000,
    ]


def _msgpack_objects() -> list[Any]:
    return [
        None, True, 0, -1, 2**63, 3.5, "text", b"bytes", [1, [2, [3]]], {"k": [1, 2]},
        (1, "a"), {1, 2}, frozenset({3}), complex(1.0, 2.0),
        datetime.datetime(2025, 1, 2, 3, 4, 5, 6), datetime.date(2025, 1, 2),
        datetime.time(1, 2, 3), datetime.timedelta(days=1, seconds=2),
        decimal.Decimal("1.25"), uuid.UUID(int=12345), Point(1, 2),
        Labelled("l", 1.5, ["t"]), Pair(1, "r"), [(1, {2}), {"a": (frozenset(),)}],
    ]


def _numpy_objects() -> list[Any]:
    try:
        import numpy
    except ImportError:
        return []
    return [
        numpy.arange(10), numpy.zeros((3, 4), dtype=numpy.float32),
        numpy.array(["a", "bc"]), numpy.float64(2.5), numpy.int8(3),
        numpy.array([(1, 2.0)], dtype=[("a", "i4"), ("b", "f8")]),
        numpy.arange(100000, dtype=numpy.uint8),
        pickle.PickleBuffer(bytearray(b"oob" * 40)),
    ]


def seeds() -> dict[str, bytes]:
    """Name -> input: valid frames (raw) and their payloads (resealed)."""
    out: dict[str, bytes] = {}
    for target in TARGETS:
        codec = target.codec
        objs = _msgpack_objects() if target.family == "msgpack" else _objects()
        if target.name == "pickle-presets":
            objs = objs + _numpy_objects()
        if target.name == "pickle":
            objs = [*objs, pickle.PickleBuffer(bytearray(b"oob" * 40))]
        for i, obj in enumerate(objs):
            try:
                frame = codec.dumps(obj)
            except Exception:  # noqa: S112 - a type this serializer cannot carry
                continue
            if len(frame) > 8192:
                continue  # keep seeds small; the large-path frames live in tests
            param = frame[5]
            payload = codec.unseal(frame)
            choice = 6 if param == OUT_OF_BAND_PARAM else (param if param <= 5 else 255)
            out[f"{target.name}-raw-{i:02d}"] = bytes([selector(target.name, False)]) + frame
            if target.unrestricted:
                continue  # resealed inputs are fed to its raw path anyway
            out[f"{target.name}-sealed-{i:02d}"] = (
                bytes([selector(target.name, True), choice]) + payload
            )
    return out
