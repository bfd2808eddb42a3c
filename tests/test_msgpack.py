"""The msgpack serializer: extension types, registered classes, and bounded unpacking."""

from __future__ import annotations

import collections
import dataclasses
import datetime
import decimal
import fractions
import logging
import subprocess
import sys
import textwrap
import tracemalloc
import typing
import uuid
from collections.abc import Sequence
from typing import Any, Generic, NamedTuple, TypeVar

import attrs
import msgpack
import pytest

from signedqueue import Codec, ForbiddenClass, Keyring, MalformedFrame
from signedqueue._msgpack import EXT, MAX_EXT_DEPTH


@dataclasses.dataclass
class Reading:
    """A registered dataclass."""

    sensor: str
    value: float
    tags: tuple[str, ...] = ()


@dataclasses.dataclass
class Derived:
    """A dataclass with a field that __init__ does not take."""

    base: int
    double: int = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.double = 2 * self.base


class Pair(NamedTuple):
    """A registered NamedTuple."""

    left: int
    right: str


TYPES = [Reading, Derived, Pair]


@pytest.fixture
def mp(ring: Keyring) -> Codec:
    """A msgpack codec with the classes of this module registered."""
    return Codec(ring, serializer="msgpack", msgpack_types=TYPES)


def ext(code: int, inner: Any) -> bytes:
    """A msgpack extension value of *code* whose data is *inner* packed (or raw bytes)."""
    data = inner if isinstance(inner, bytes) else msgpack.packb(inner, use_bin_type=True)
    return msgpack.packb(msgpack.ExtType(code, data))


def same(expected: Any, actual: Any) -> bool:
    """Equal, with the same type at every level of lists, tuples and dicts."""
    if type(expected) is not type(actual):
        return False
    if isinstance(expected, (list, tuple)):
        return len(expected) == len(actual) and all(map(same, expected, actual))
    if isinstance(expected, dict):
        return list(expected) == list(actual) and all(
            same(k1, k2) and same(expected[k1], actual[k2])
            for k1, k2 in zip(expected, actual, strict=True)
        )
    return bool(expected == actual)


# -- round trips -----------------------------------------------------------------------

UTC = datetime.timezone.utc
IST = datetime.timezone(datetime.timedelta(hours=5, minutes=30))
EXT_VALUES = [
    ("tuple", (1, "a", None)),
    ("tuple", ()),
    ("set", {1, 2, 3}),
    ("set", set()),
    ("frozenset", frozenset({"x", b"y"})),
    ("datetime", datetime.datetime(2024, 2, 29, 23, 59, 59, 999_999)),
    ("datetime", datetime.datetime(1, 1, 1, tzinfo=UTC)),
    ("datetime", datetime.datetime(9999, 12, 31, 1, 2, 3, tzinfo=IST)),
    ("date", datetime.date(2000, 1, 1)),
    ("time", datetime.time(12, 30, 15, 123)),
    ("time", datetime.time(0, 0, tzinfo=IST)),
    ("timedelta", datetime.timedelta(days=-1, seconds=5, microseconds=7)),
    ("timedelta", datetime.timedelta(days=999_999_999)),
    ("decimal", decimal.Decimal("3.14")),
    ("decimal", decimal.Decimal("-0.000")),
    ("decimal", decimal.Decimal("-Infinity")),
    ("decimal", decimal.Decimal("1E+1000")),
    ("uuid", uuid.UUID("12345678-1234-5678-1234-567812345678")),
    ("complex", complex(1.5, -2.0)),
    ("complex", complex(0.0, 0.0)),
    ("registered", Reading("t1", 21.5, ("room",))),
    ("registered", Derived(4)),
    ("registered", Pair(1, "one")),
]


@pytest.mark.parametrize(("name", "value"), EXT_VALUES, ids=lambda v: str(v)[:40])
def test_extension_types_round_trip(mp: Codec, name: str, value: Any) -> None:
    """Every extension type round-trips to an equal value of the same type, with its code."""
    frame = mp.dumps(value)
    loaded = mp.loads(frame)
    assert type(value) is type(loaded)
    assert value == loaded
    if isinstance(value, (datetime.datetime, datetime.time)):
        assert value.utcoffset() == loaded.utcoffset()
    codes: list[int] = []
    msgpack.unpackb(mp.unseal(frame), ext_hook=lambda code, data: codes.append(code))
    assert [EXT[name]] == codes  # the wire format's extension code


def test_native_types_round_trip(mp: Codec) -> None:
    """msgpack's own types keep their exact types (bool is not int, bytes is not str)."""
    value = {
        "none": None,
        "bools": [True, False],
        "ints": [0, -1, -(2**63), 2**64 - 1],
        "float": -1.25,
        "str": "ünïcode",
        "bytes": b"\x00\xff",
        3: "int key",
        b"k": "bytes key",
    }
    assert same(value, mp.loads(mp.dumps(value)))


def test_ints_beyond_64_bits_refused_on_dump(mp: Codec) -> None:
    """Integers msgpack cannot carry fail on dumps, not silently."""
    with pytest.raises((OverflowError, TypeError)):
        mp.dumps(2**64)
    with pytest.raises((OverflowError, TypeError)):
        mp.dumps([-(2**63) - 1])


def test_tuples_stay_tuples(mp: Codec) -> None:
    """Tuples stay tuples and lists stay lists, nested anywhere, including dict keys."""
    value = {(1, 2): [(3,), ((4,), [5])], "l": [[], ()], "t": ([],)}
    loaded = mp.loads(mp.dumps(value))
    assert same(value, loaded)
    assert not same(value, {(1, 2): [[3], ((4,), [5])], "l": [[], ()], "t": ([],)})


@pytest.mark.parametrize(
    "value",
    [collections.OrderedDict(a=1), collections.deque([1]), fractions.Fraction(1, 3),
     collections.Counter("ab"), object(), Keyring],
    ids=["OrderedDict", "deque", "Fraction", "Counter", "object", "class"],
)
def test_unsupported_types_refused_on_dump(mp: Codec, value: Any) -> None:
    """Types outside the documented set (subclasses included) are a TypeError on dumps."""
    with pytest.raises(TypeError, match="msgpack cannot serialize"):
        mp.dumps(value)
    with pytest.raises(TypeError, match="msgpack cannot serialize"):
        mp.dumps([1, {"nested": value}])


# -- registered classes -----------------------------------------------------------------


def test_registered_classes(mp: Codec) -> None:
    """Registered dataclasses and NamedTuples round-trip, nested in other values."""
    value = [Reading("a", 1.0), {"p": Pair(2, "b")}, (Derived(3),)]
    loaded = mp.loads(mp.dumps(value))
    assert value == loaded
    assert Pair is type(loaded[1]["p"])
    assert loaded[2][0].double == 6


def test_unregistered_class(ring: Keyring, mp: Codec) -> None:
    """An unregistered class is a TypeError on dumps and ForbiddenClass on loads."""
    plain = Codec(ring, serializer="msgpack")
    with pytest.raises(TypeError, match="register dataclasses, attrs classes and NamedTuples"):
        plain.dumps(Reading("a", 1.0))
    frame = mp.dumps(Reading("a", 1.0))
    with pytest.raises(ForbiddenClass, match="not registered") as info:
        plain.loads(frame)
    assert (f"{__name__}.Reading",) == info.value.names
    assert info.value.allow_entries == (None,)
    assert Reading("a", 1.0) == mp.loads(frame)


def test_unregistered_name_is_bounded_in_refusals(
    mp: Codec, caplog: pytest.LogCaptureFixture
) -> None:
    """A huge class name chosen by a payload is refused without being echoed in full."""
    huge = "pkg.Huge" + "x" * 100_000
    with caplog.at_level(logging.WARNING, logger="signedqueue"), pytest.raises(
        ForbiddenClass
    ) as info:
        mp.loads(mp.seal(ext(EXT["registered"], [huge, {}])))
    for text in [str(info.value), repr(info.value), *info.value.names, caplog.text]:
        assert len(text) < 1000
    with pytest.raises(ForbiddenClass) as info:
        mp.loads(mp.seal(ext(EXT["registered"], ["pkg.Short", {}])))
    assert ("pkg.Short",) == info.value.names


@pytest.mark.parametrize(
    "inner",
    [
        [f"{__name__}.Pair", {"left": 1}],
        [f"{__name__}.Pair", {"left": 1, "right": "r", "extra": 0}],
        [f"{__name__}.Pair", {"left": 1, "wrong": "r"}],
        [f"{__name__}.Derived", {"base": 1, "double": 2}],
        [f"{__name__}.Pair", [1, "r"]],
        [7, {"left": 1, "right": "r"}],
        [f"{__name__}.Pair"],
        {"name": f"{__name__}.Pair"},
    ],
    ids=["missing", "extra", "renamed", "non-init-field", "values-list", "name-int",
         "no-values", "not-a-list"],
)
def test_registered_fields_validated(mp: Codec, inner: Any) -> None:
    """A registered-class value whose fields do not match the registration is refused."""
    with pytest.raises(MalformedFrame):
        mp.loads(mp.seal(ext(EXT["registered"], inner)))
    good = ext(EXT["registered"], [f"{__name__}.Pair", {"left": 1, "right": "r"}])
    assert Pair(1, "r") == mp.loads(mp.seal(good))


@pytest.mark.parametrize("bad", [int, dict, "pkg.Class", object()], ids=str)
def test_registration_takes_dataclasses_and_namedtuples(ring: Keyring, bad: Any) -> None:
    """Only dataclasses, attrs classes and NamedTuples can be registered."""
    with pytest.raises(TypeError, match=r"register|takes classes"):
        Codec(ring, serializer="msgpack", msgpack_types=[bad])


# -- registered classes: kinds, fields and validation ---------------------------------------

CALLS: list[str] = []


@dataclasses.dataclass(frozen=True)
class Point:
    """A frozen dataclass."""

    x: float
    y: float


@dataclasses.dataclass
class Shape:
    """A dataclass holding other registered classes."""

    name: str
    points: list[Point]
    origin: Point | None = None


@attrs.define
class Account:
    """An attrs class with a private attribute, an explicit alias and a validator."""

    _owner: str
    balance: int = attrs.field(validator=attrs.validators.ge(0))
    note: str = attrs.field(default="", alias="memo")


@attrs.frozen
class Stamp:
    """A frozen attrs class."""

    label: str
    at: datetime.datetime


class Span(NamedTuple):
    """A NamedTuple with a default."""

    start: int
    end: int = 0


@dataclasses.dataclass
class Typed:
    """A dataclass with a field of every checked kind, and a few unchecked ones."""

    i: int
    f: float
    c: complex
    s: str
    b: bytes
    ba: bytearray
    flag: bool
    nothing: None
    when: datetime.datetime
    day: datetime.date
    at: datetime.time
    span: datetime.timedelta
    amount: decimal.Decimal
    ident: uuid.UUID
    point: Point
    ints: list[int]
    counts: dict[str, int]
    pair: tuple[int, str]
    many: tuple[int, ...]
    empty: tuple[()]
    names: set[str]
    frozen: frozenset[int]
    bare: list  # type: ignore[type-arg]
    old: typing.List[int]  # noqa: UP006
    either: int | str
    opt: typing.Optional[int]  # noqa: UP045
    anything: Any
    seq: Sequence[int]


T = TypeVar("T")


@dataclasses.dataclass
class Box(Generic[T]):
    """A generic dataclass: a TypeVar field is not checked."""

    item: T


@dataclasses.dataclass
class Partial:
    """A dataclass with an annotation that does not resolve."""

    known: int
    unknown: Undefined  # type: ignore[name-defined]  # noqa: F821


@dataclasses.dataclass
class Watched:
    """A dataclass whose __post_init__ records that it ran, and refuses negative counts."""

    count: int

    def __post_init__(self) -> None:
        CALLS.append("Watched")
        if self.count < 0:
            raise ValueError(f"SECRET negative count {self.count}")


@dataclasses.dataclass
class Outer:
    """A dataclass holding a Watched."""

    inner: Watched
    label: str


KINDS = [Point, Shape, Account, Stamp, Span, Typed, Box, Partial, Watched, Outer]


@pytest.fixture
def kinds(ring: Keyring) -> Codec:
    """A msgpack codec with every kind of registered class."""
    return Codec(ring, serializer="msgpack", msgpack_types=KINDS)


def typed() -> Typed:
    """A Typed whose every field matches its annotation."""
    return Typed(
        i=1, f=1.5, c=complex(1.0, 2.0), s="s", b=b"b", ba=bytearray(b"ba"), flag=True,
        nothing=None, when=datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
        day=datetime.date(2024, 1, 2), at=datetime.time(3, 4), span=datetime.timedelta(1),
        amount=decimal.Decimal("1.50"), ident=uuid.UUID(int=7), point=Point(1.0, 2.0),
        ints=[1, 2], counts={"a": 1}, pair=(1, "one"), many=(1, 2, 3), empty=(), names={"n"},
        frozen=frozenset({1}), bare=[1, "x"], old=[3], either="e", opt=None,
        anything={"any": [b"thing"]}, seq=[1],
    )


def registered(name: str, fields: dict[str, Any]) -> bytes:
    """A registered-class extension value naming *name* (of this module) with *fields*."""
    return ext(EXT["registered"], [f"{__name__}.{name}", fields])


@pytest.mark.parametrize(
    "value",
    [
        Point(1.0, -2.5),
        Shape("tri", [Point(0.0, 0.0), Point(1.0, 1.0)], Point(0.5, 0.5)),
        Shape("empty", []),
        Account("ann", 10, memo="m"),
        Stamp("t", datetime.datetime(2024, 5, 6, tzinfo=UTC)),
        Span(3),
        Span(3, 9),
        Box(Span(1, 2)),
        Box("anything"),
        Partial(1, "unchecked"),
        Outer(Watched(2), "o"),
    ],
    ids=lambda v: type(v).__name__,
)
def test_registered_kinds_round_trip(kinds: Codec, value: Any) -> None:
    """Dataclasses (frozen too), attrs classes and NamedTuples round-trip, nested too."""
    loaded = kinds.loads(kinds.dumps(value))
    assert type(value) is type(loaded)
    assert value == loaded


def test_every_checked_kind_round_trips(kinds: Codec) -> None:
    """A value matching every checked annotation loads; a bytearray field loads as bytes."""
    loaded = kinds.loads(kinds.dumps(typed()))
    assert dataclasses.replace(typed(), ba=b"ba") == loaded
    assert bytes is type(loaded.ba)


@pytest.mark.parametrize(
    ("field", "value"),
    [("f", 3), ("c", 2), ("c", 2.5), ("day", datetime.datetime(2024, 1, 2)), ("opt", 4),
     ("either", 5), ("many", ()), ("old", []), ("seq", [1, "x"]), ("anything", None),
     ("point", Point(0, 0))],
    ids=["int-for-float", "int-for-complex", "float-for-complex", "datetime-for-date",
         "optional-set", "union-other-member", "empty-variadic", "typing-list",
         "abc-generic-unchecked", "any", "point-of-ints"],
)
def test_annotations_accept(kinds: Codec, field: str, value: Any) -> None:
    """Values a field's annotation admits load, including the documented widenings."""
    value_in = dataclasses.replace(typed(), **{field: value})
    assert getattr(kinds.loads(kinds.dumps(value_in)), field) == value


@pytest.mark.parametrize(
    ("field", "value"),
    [("i", True), ("i", "SECRET"), ("i", 1.0), ("f", False), ("f", "SECRET"),
     ("c", "SECRET"), ("s", b"SECRET"), ("b", "SECRET"), ("ba", "SECRET"), ("flag", 1),
     ("nothing", 0), ("when", datetime.date(2024, 1, 2)), ("day", "SECRET"), ("at", 1),
     ("span", 1), ("amount", 1.5), ("ident", "SECRET"), ("point", Span(1, 2)),
     ("point", {"x": 1.0, "y": 2.0}), ("ints", [1, "SECRET"]), ("ints", (1, 2)),
     ("counts", {"a": "SECRET"}), ("counts", {1: 1}), ("pair", (1, 2)), ("pair", (1,)),
     ("pair", [1, "SECRET"]), ("many", (1, "SECRET")), ("empty", (1,)), ("names", {1}),
     ("names", frozenset({"SECRET"})), ("frozen", {1}), ("bare", (1,)),
     ("old", ["SECRET"]), ("either", 1.5), ("opt", "SECRET")],
    ids=lambda v: str(v)[:20],
)
def test_annotations_refuse(kinds: Codec, field: str, value: Any) -> None:
    """A field whose value does not match its annotation is MalformedFrame naming it, not it."""
    frame = kinds.dumps(dataclasses.replace(typed(), **{field: value}))
    expected = rf"field '{field}' of {__name__}\.Typed does not match its annotation"
    with pytest.raises(MalformedFrame, match=expected) as info:
        kinds.loads(frame)
    assert "SECRET" not in str(info.value)


def test_nested_registered_field_types(kinds: Codec) -> None:
    """Fields holding registered classes check the class, inside containers too."""
    with pytest.raises(MalformedFrame, match="field 'points' of"):
        kinds.loads(kinds.dumps(Shape("s", [Point(0.0, 0.0), Span(1, 2)])))  # type: ignore[list-item]
    with pytest.raises(MalformedFrame, match="field 'origin' of"):
        kinds.loads(kinds.dumps(Shape("s", [], Span(1, 2))))  # type: ignore[arg-type]


def test_unresolvable_annotation_not_checked(kinds: Codec) -> None:
    """An annotation that does not resolve is not checked; the class's others still are."""
    assert Partial(1, b"x") == kinds.loads(kinds.dumps(Partial(1, b"x")))
    with pytest.raises(MalformedFrame, match="field 'known' of"):
        kinds.loads(kinds.dumps(Partial("x", 1)))  # type: ignore[arg-type]


def test_attrs_wire_carries_init_arguments(kinds: Codec) -> None:
    """An attrs class travels as its init arguments: private names without "_", aliases."""
    frame = kinds.dumps(Account("ann", 5, memo="m"))
    inner: list[Any] = []
    msgpack.unpackb(
        kinds.unseal(frame), ext_hook=lambda code, data: inner.append(msgpack.unpackb(data))
    )
    assert [[f"{__name__}.Account", {"owner": "ann", "balance": 5, "memo": "m"}]] == inner
    with pytest.raises(MalformedFrame, match="missing 'owner'"):
        kinds.loads(kinds.seal(registered("Account", {"_owner": "a", "balance": 1, "memo": ""})))


def test_namedtuple_defaults_are_sent(kinds: Codec) -> None:
    """Fields with defaults are always sent; a frame missing one is refused."""
    assert Span(4, 0) == kinds.loads(kinds.dumps(Span(4)))
    with pytest.raises(MalformedFrame, match=r"fields of .*Span do not match.*missing 'end'"):
        kinds.loads(kinds.seal(registered("Span", {"start": 4})))


def test_unknown_field_names_not_echoed(kinds: Codec) -> None:
    """An unknown field is counted in the refusal, its payload-chosen name is not quoted."""
    fields = {"x": 1.0, "y": 2.0, "SECRET": 0}
    with pytest.raises(MalformedFrame, match="1 unknown") as info:
        kinds.loads(kinds.seal(registered("Point", fields)))
    assert "SECRET" not in str(info.value)


@pytest.mark.parametrize(
    ("value", "field"), [(Account("a", 0), "balance"), (Watched(0), "count")], ids=type
)
def test_user_validation_runs_on_load(kinds: Codec, value: Any, field: str) -> None:
    """attrs validators and __post_init__ run on load; their refusal keeps only its type."""
    object.__setattr__(value, field, -1)  # past the producer's own validation
    name = type(value).__name__
    with pytest.raises(MalformedFrame, match=f"{name} refused its fields: it raised ") as info:
        kinds.loads(kinds.dumps(value))
    assert "SECRET" not in str(info.value)
    assert "-1" not in str(info.value)


@pytest.mark.parametrize(
    "payload",
    [
        registered("Watched", {"count": "1"}),
        registered("Watched", {"count": 1, "extra": 2}),
        registered("Watched", {}),
        registered("Outer", {"inner": {"count": 1}, "label": "l"}),
    ],
    ids=["wrong-type", "extra-field", "missing-field", "nested-not-registered-value"],
)
def test_refused_fields_run_no_user_code(kinds: Codec, payload: bytes) -> None:
    """Field names and types are checked before the class is called."""
    CALLS.clear()
    with pytest.raises(MalformedFrame):
        kinds.loads(kinds.seal(payload))
    assert [] == CALLS


def test_unregistered_nested_class(ring: Keyring, kinds: Codec) -> None:
    """A nested class the consumer did not register is ForbiddenClass."""
    frame = kinds.dumps(Shape("s", [Point(1.0, 2.0)]))
    only_shape = Codec(ring, serializer="msgpack", msgpack_types=[Shape])
    with pytest.raises(ForbiddenClass) as info:
        only_shape.loads(frame)
    assert (f"{__name__}.Point",) == info.value.names


def local_dataclass() -> type:
    """A dataclass defined inside a function."""

    @dataclasses.dataclass
    class Local:
        """Defined in a function."""

        a: int

    return Local


@dataclasses.dataclass
class WithInitVar:
    """A dataclass whose constructor requires an InitVar, which is not a field."""

    a: int
    secret: dataclasses.InitVar[str]


def same_name_as_point() -> type:
    """A different class named like Point."""
    impostor = dataclasses.make_dataclass("Point", [("x", float), ("y", float)])
    impostor.__module__ = __name__
    return impostor


@pytest.mark.parametrize(
    ("types", "match"),
    [
        ([local_dataclass()], "defined inside a function"),
        ([WithInitVar], "requires 'secret'"),
        ([Point, same_name_as_point()], "two different classes named"),
        ([Keyring], "register dataclasses, attrs classes or NamedTuples"),
    ],
    ids=["local", "initvar", "duplicate-name", "plain-class"],
)
def test_registration_errors(ring: Keyring, types: list[type], match: str) -> None:
    """Classes the registry cannot name or rebuild are a TypeError when the codec is built."""
    with pytest.raises(TypeError, match=match):
        Codec(ring, serializer="msgpack", msgpack_types=types)


def test_registering_a_class_twice(ring: Keyring) -> None:
    """The same class listed twice is registered once."""
    codec = Codec(ring, serializer="msgpack", msgpack_types=[Point, Point])
    assert Point(1.0, 2.0) == codec.loads(codec.dumps(Point(1.0, 2.0)))


# -- malformed payloads -------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        ext(EXT["tuple"], {"not": "a list"}),
        ext(EXT["set"], 5),
        ext(EXT["uuid"], b"\x00" * 15),
        ext(EXT["datetime"], b"yesterday"),
        ext(EXT["date"], b"\xff\xfe"),
        ext(EXT["decimal"], b"pi"),
        ext(EXT["complex"], ["x", "y"]),
        ext(EXT["complex"], [1.0]),
        ext(EXT["timedelta"], [1, 2]),
        ext(EXT["timedelta"], [10**18, 0, 0]),
        ext(EXT["set"], [[1]]),
        ext(12, b""),
        ext(99, b"x"),
        msgpack.packb({(1,): 2}, use_bin_type=True)[:-1],
        b"\xc1",
        b"",
    ],
    ids=["tuple-of-map", "set-of-int", "uuid-15", "datetime-text", "date-bytes", "decimal-text",
         "complex-str", "complex-1", "timedelta-2", "timedelta-huge", "unhashable-set",
         "ext-12", "ext-99", "truncated", "never-used-byte", "empty"],
)
def test_malformed_payloads(mp: Codec, payload: bytes) -> None:
    """A validly signed payload that is not a well-formed value is MalformedFrame."""
    frame = mp.seal(payload)
    assert payload == mp.unseal(frame)
    with pytest.raises(MalformedFrame):
        mp.loads(frame)


@pytest.mark.parametrize(
    "payload",
    ["ddffffffff", "dfffffffff", "dbffffffff", "c6ffffffff", "c9ffffffff01", "dcffff",
     "91" * 8 + "ddffffffff"],
    ids=["array32", "map32", "str32", "bin32", "ext32", "array16", "nested-array32"],
)
def test_declared_lengths_bounded(mp: Codec, payload: str) -> None:
    """A tiny payload declaring a huge container is refused without allocating for it."""
    frame = mp.seal(bytes.fromhex(payload))
    tracemalloc.start()
    try:
        with pytest.raises(MalformedFrame):
            mp.loads(frame)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024


def test_large_values_within_their_payload(mp: Codec) -> None:
    """Bounds follow the payload: large containers and strings that are really there load."""
    value = {"ints": list(range(100_000)), "text": "t" * 1_000_000, "blob": b"b" * 1_000_000}
    assert value == mp.loads(mp.dumps(value))


# -- nesting ---------------------------------------------------------------------------------


def nested_tuples(depth: int) -> Any:
    """*depth* tuples, each holding the next; the innermost holds an empty list."""
    value: Any = []
    for _ in range(depth):
        value = (value,)
    return value


def nested_ext(depth: int) -> bytes:
    """The msgpack of nested_tuples(depth), written directly."""
    payload = b"\x90"
    for _ in range(depth):
        payload = ext(EXT["tuple"], b"\x91" + payload)
    return payload


def test_extension_nesting_limit(mp: Codec) -> None:
    """Tuples nest up to MAX_EXT_DEPTH deep; one more is refused on dumps and on loads."""
    assert nested_ext(3) == mp.unseal(mp.dumps(nested_tuples(3)))
    deepest = nested_tuples(MAX_EXT_DEPTH)
    assert deepest == mp.loads(mp.dumps(deepest))
    with pytest.raises(ValueError, match="nested more than"):
        mp.dumps(nested_tuples(MAX_EXT_DEPTH + 1))
    with pytest.raises(MalformedFrame, match="nested too deeply"):
        mp.loads(mp.seal(nested_ext(MAX_EXT_DEPTH + 1)))


def test_deep_extension_nesting_does_not_crash() -> None:
    """A few hundred bytes of nested extensions are refused, not a C stack overflow."""
    script = textwrap.dedent(
        """
        import msgpack, signedqueue
        payload = b"\\x90"
        for _ in range(2000):
            payload = msgpack.packb(msgpack.ExtType(1, b"\\x91" + payload))
        codec = signedqueue.Codec(signedqueue.Keyring.generate(), serializer="msgpack")
        try:
            codec.loads(codec.seal(payload))
        except signedqueue.MalformedFrame as exc:
            print(type(exc).__name__, exc)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "MalformedFrame payload is nested too deeply to load" in result.stdout


def test_deep_array_nesting(mp: Codec) -> None:
    """Plain arrays nested beyond msgpack's stack are MalformedFrame; moderate nesting loads."""
    assert nested_lists(100) == mp.loads(mp.dumps(nested_lists(100)))
    with pytest.raises(MalformedFrame):
        mp.loads(mp.seal(b"\x91" * 5000 + b"\xc0"))


def nested_lists(depth: int) -> Any:
    """*depth* lists, each holding the next."""
    value: Any = None
    for _ in range(depth):
        value = [value]
    return value
