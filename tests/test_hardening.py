"""
Hardening of the allowlist: names that look alike, what wildcards cover,
attribute walks, copyreg extension codes, and a gadget search over every
global of every preset.

The gadget search calls each preset global (REDUCE) with a battery of
attacker-chosen arguments and requires that the load either succeeds or
raises a RejectedFrame subclass, creates no file, and allocates at most a
constant multiple of the payload size.  PRESETS is read at collection time,
so a new preset is searched without editing this file.
"""

from __future__ import annotations

import _compat_pickle
import copyreg
import datetime
import decimal
import fractions
import importlib
import ipaddress
import os
import pickle
import struct
import sys
import tracemalloc
import uuid
import warnings
from collections import Counter, OrderedDict, defaultdict, deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import allowpkg.mod
import allowpkg.mod_evil
from allowpkg.mod import Outer, Point
from signedqueue import PRESETS, Allowlist, Codec, ForbiddenClass, Keyring, RejectedFrame
from signedqueue._scan import pickle_globals

#: Peak memory a load may trace: this many times the payload, plus a constant.
MEMORY_FACTOR = 64
MEMORY_SLACK = 1 << 20


def global_value(module: str, name: str) -> bytes:
    """A protocol 2 pickle whose value is the global itself (nothing called)."""
    return b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n."


def global_call(module: str, name: str, body: bytes) -> bytes:
    """A protocol 2 pickle calling the global on *body*, an argument tuple's opcodes."""
    return b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n" + body + b"R."


def args_body(*args: Any) -> bytes:
    """The opcodes that push ``args`` as a tuple (memo indices from 0, shared objects shared)."""
    return pickle.dumps(args, protocol=2)[2:-1]


def split(dotted: str) -> tuple[str, str]:
    """(module, name) of a preset's dotted global."""
    module, _, name = dotted.rpartition(".")
    return module, name


@pytest.fixture(scope="module")
def ring() -> Keyring:
    """One keyring for the module (a fixture of the same name overrides conftest's)."""
    return Keyring.generate()


# -- names that look alike ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("allow", "module", "name"),
    [
        ("allowpkg.mod.Point", "allowpkg.mod_evil", "Point"),
        ("allowpkg.mod.Point", "allowpkg.mod_evil", "Evil"),
        ("allowpkg.mod.*", "allowpkg.mod_evil", "Point"),
        ("allowpkg.mod.*", "allowpkg.mod_evil", "Evil"),
        ("allowpkg.mod.*", "allowpkg.mod.sub", "SubThing"),
        ("allowpkg.mod.Point", "allowpkg", "mod.Point"),
        ("allowpkg.mod.Point", "allowpkg.mod.Point", "x"),
        ("allowpkg.mod.Point", "allowpkg.mod", "Pointx"),
        ("allowpkg.mod.Point", "allowpkg.mo", "d.Point"),
        ("allowpkg.mod.Point", "allowpkg.mod", "Point.__init__"),
        ("allowpkg.mod:Outer.Inner", "allowpkg.mod", "Outer"),
        ("allowpkg.mod:Outer.Inner", "allowpkg.mod", "Outer.Inner.__init__"),
        ("allowpkg.mod:Outer.Inner", "allowpkg.mod.Outer", "Inner"),
    ],
)
def test_lookalike_names_are_refused(ring: Keyring, allow: str, module: str, name: str) -> None:
    """An entry admits its exact global only, not a prefix, suffix or re-split of it."""
    codec = Codec(ring, allow=[allow])
    with pytest.raises(ForbiddenClass):
        codec.loads(codec.seal(global_value(module, name)))


@pytest.mark.parametrize(
    ("allow", "module", "name", "expected"),
    [
        ("allowpkg.mod.Point", "allowpkg.mod", "Point", Point),
        ("allowpkg.mod.*", "allowpkg.mod", "Point", Point),
        ("allowpkg.mod.*", "allowpkg.mod", "make_point", allowpkg.mod.make_point),
        ("allowpkg.mod_evil.*", "allowpkg.mod_evil", "Evil", allowpkg.mod_evil.Evil),
        ("allowpkg.mod:Outer.Inner", "allowpkg.mod", "Outer.Inner", Outer.Inner),
        ("allowpkg.mod.sub.*", "allowpkg.mod.sub", "SubThing", allowpkg.mod.sub.SubThing),
    ],
)
def test_the_exact_names_are_admitted(
    ring: Keyring, allow: str, module: str, name: str, expected: Any
) -> None:
    """The other side: the name an entry means loads."""
    codec = Codec(ring, allow=[allow])
    assert codec.loads(codec.seal(global_value(module, name))) is expected


# -- wildcard scope --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("sub", "module"),  # a submodule
        ("json", "module"),  # a module it imported
        ("Foreign", "not defined in allowpkg.mod"),  # a class it imported
        ("run", "refused even when allowlisted"),  # os.system it imported
        ("__builtins__", "refused even when allowlisted"),
        ("__dict__", "refused even when allowlisted"),
        ("__loader__", "refused even when allowlisted"),
        ("__spec__", "refused even when allowlisted"),
        ("__name__", "refused even when allowlisted"),
        ("Point.__init__", "refused even when allowlisted"),
        ("Outer.Inner", "wildcard never admits"),
        ("Outer.method", "wildcard never admits"),
        ("Outer.alias", "wildcard never admits"),
        ("missing", "does not exist"),
    ],
)
def test_wildcard_admits_only_what_the_module_defines(ring: Keyring, name: str, why: str) -> None:
    """`allowpkg.mod.*` refuses submodules, imported names, dunders and attribute walks."""
    codec = Codec(ring, allow=["allowpkg.mod.*"])
    with pytest.raises(ForbiddenClass, match=why):
        codec.loads(codec.seal(global_value("allowpkg.mod", name)))


def test_wildcard_of_a_module_does_not_cover_its_submodules_but_their_own_does(
    ring: Keyring,
) -> None:
    """`allowpkg.mod.*` refuses allowpkg.mod.sub.SubThing, which `allowpkg.mod.sub.*` admits."""
    payload = global_value("allowpkg.mod.sub", "SubThing")
    with pytest.raises(ForbiddenClass):
        Codec(ring, allow=["allowpkg.mod.*"]).loads(Codec(ring).seal(payload))
    assert Codec(ring, allow=["allowpkg.mod.sub.*"]).loads(Codec(ring).seal(payload)) is (
        allowpkg.mod.sub.SubThing
    )


@pytest.mark.parametrize("entry", ["builtins.*", "os.*", "os.path.*", "functools.*", "pickle.*"])
def test_wildcards_over_dangerous_modules_are_refused(ring: Keyring, entry: str) -> None:
    """A wildcard over builtins or a dangerous module is refused when the codec is built."""
    with pytest.raises(ValueError, match="is refused"):
        Codec(ring, allow=[entry])


def test_an_exact_entry_for_a_merely_imported_name_still_checks_the_object(
    ring: Keyring,
) -> None:
    """`allowpkg.mod.run` (os.system under a new name) is refused even as an exact entry."""
    codec = Codec(ring, allow=["allowpkg.mod.run", "allowpkg.mod.Foreign"])
    with pytest.raises(ForbiddenClass, match=r"(os|posix)\.system"):
        codec.loads(codec.seal(global_call("allowpkg.mod", "run", args_body("true"))))
    # An exact entry for a harmless imported class is the user's explicit choice.
    assert codec.loads(codec.seal(global_value("allowpkg.mod", "Foreign"))) is (
        allowpkg.mod.Foreign
    )


@pytest.mark.parametrize(
    ("allow", "name"),
    [
        ("allowpkg.mod:Outer.alias", "Outer.alias"),  # a class, but not a nested one
        ("allowpkg.mod:Outer.method", "Outer.method"),  # a function reached through a class
        ("allowpkg.mod:Point.__init__", "Point.__init__"),
        ("allowpkg.mod:Outer.Inner", "Outer.Inner.__init__"),
        ("allowpkg.mod:Outer.Inner", "Outer.Inner.__class__"),
    ],
)
def test_attribute_walking_qualnames_are_refused(ring: Keyring, allow: str, name: str) -> None:
    """A dotted qualname must be the nested class itself, even if allowlisted exactly."""
    try:
        codec = Codec(ring, allow=[allow])
    except ValueError:
        return  # refused already when the codec is built
    with pytest.raises(ForbiddenClass):
        codec.loads(codec.seal(global_value("allowpkg.mod", name)))


def test_nested_class_entry_admits_exactly_that_class(ring: Keyring) -> None:
    """The other side: `allowpkg.mod:Outer.Inner` loads the nested class and its instances."""
    codec = Codec(ring, allow=["allowpkg.mod:Outer.Inner"])
    assert codec.loads(codec.dumps(Outer.Inner([1, 2]))) == Outer.Inner([1, 2])


# -- copyreg extension codes -------------------------------------------------------------

EXT_CODE = 0x7A11


@pytest.fixture
def extension() -> Iterator[tuple[str, str, int]]:
    """allowpkg.mod.Point registered as an extension code for the test."""
    copyreg.add_extension("allowpkg.mod", "Point", EXT_CODE)
    try:
        yield ("allowpkg.mod", "Point", EXT_CODE)
    finally:
        copyreg.remove_extension("allowpkg.mod", "Point", EXT_CODE)
        copyreg._extension_cache.pop(EXT_CODE, None)  # type: ignore[attr-defined]


def ext_value() -> bytes:
    """A protocol 2 pickle whose value is the global of EXT_CODE (EXT2)."""
    return b"\x80\x02" + pickle.EXT2 + struct.pack("<H", EXT_CODE) + b"."


def test_registered_extension_code_is_decided_by_the_policy(
    ring: Keyring, extension: tuple[str, str, int]
) -> None:
    """An EXT code naming a class outside the allowlist is refused, and admitted when listed."""
    with pytest.raises(ForbiddenClass, match=r"allowpkg\.mod\.Point"):
        Codec(ring).loads(Codec(ring).seal(ext_value()))
    admitting = Codec(ring, allow=["allowpkg.mod.Point"])
    assert admitting.loads(admitting.seal(ext_value())) is Point
    assert admitting.loads(admitting.dumps(Point(1, 2))) == Point(1, 2)


def test_cached_extension_code_is_decided_by_the_policy(
    ring: Keyring, extension: tuple[str, str, int]
) -> None:
    """A code cached by an unrestricted load is still refused by a codec that does not admit it."""
    assert pickle.loads(ext_value()) is Point  # caches the code process-wide
    assert copyreg._extension_cache.get(EXT_CODE) is Point  # type: ignore[attr-defined]
    with pytest.raises(ForbiddenClass, match=r"allowpkg\.mod\.Point"):
        Codec(ring).loads(Codec(ring).seal(ext_value()))
    admitting = Codec(ring, allow=["allowpkg.mod.Point"])
    assert admitting.loads(admitting.seal(ext_value())) is Point
    # Nothing admitted by this codec is left in the cache for another.
    assert EXT_CODE not in copyreg._extension_cache  # type: ignore[attr-defined]


def test_unregistered_extension_code_is_refused(ring: Keyring) -> None:
    """An EXT code nothing registered is a RejectedFrame."""
    codec = Codec(ring)
    with pytest.raises(RejectedFrame):
        codec.loads(codec.seal(ext_value()))


def test_cached_dangerous_extension_is_refused(ring: Keyring, tmp_path: Path) -> None:
    """os.system registered and cached as an extension is still refused, with no side effect."""
    copyreg.add_extension("os", "system", EXT_CODE)
    try:
        assert pickle.loads(ext_value()) is os.system
        canary = tmp_path / "canary"
        payload = (
            b"\x80\x02" + pickle.EXT2 + struct.pack("<H", EXT_CODE)
            + args_body(f"touch {canary}") + b"R."
        )
        codec = Codec(ring, allow=["allowpkg.mod.*"])
        with pytest.raises(ForbiddenClass):
            codec.loads(codec.seal(payload))
        assert not canary.exists()
    finally:
        copyreg.remove_extension("os", "system", EXT_CODE)
        copyreg._extension_cache.pop(EXT_CODE, None)  # type: ignore[attr-defined]


# -- gadget search over every preset -------------------------------------------------------

#: numpy 2 keeps numpy.core as a shim that warns (DeprecationWarning) on every
#: attribute access; pickles naming the numpy 1 paths import it.
NUMPY_SHIM_WARNINGS = pytest.mark.filterwarnings("ignore:numpy.core:DeprecationWarning")


@pytest.fixture
def forget_numpy_shims() -> Iterator[None]:
    """Drop numpy 1 shim modules a test imported, so later tests start without them."""
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name == "numpy.core" or name.startswith("numpy.core."):
            del sys.modules[name]


_SHARED_ROW = list(range(200))
_SHARED_GRID = [_SHARED_ROW] * 200  # 40,000 elements, a few hundred bytes pickled
_SHARED_TEXT = "x" * 2000


def _battery() -> list[tuple[str, tuple[Any, ...]]]:
    """Attacker-chosen argument tuples, each with a short label."""
    huge = 10**3000
    return [
        ("none", ()),
        ("None", (None,)),
        ("zero", (0,)),
        ("negative", (-1,)),
        ("huge-negative", (-(2**62),)),
        ("huge int", (huge,)),
        ("huge size", (10**12,)),
        ("int64 edge", (2**63,)),
        ("two huge", (huge, huge)),
        ("float", (1e308,)),
        ("nan", (float("nan"),)),
        ("long digits", ("9" * 4000,)),
        ("exponent", ("1e999999999",)),
        ("negative exponent", ("-1E-999999999",)),
        ("digits with exponent", ("1" * 3000 + "e999999",)),
        ("fraction text", ("1/3",)),
        ("fraction exponent", ("1e999999999/1",)),
        ("text and codec", ("x" * 100, "punycode")),
        ("text and idna", ("x" * 100, "idna")),
        ("bytes and codec", (b"x" * 100, "utf-8")),
        ("bytes and rot13", (b"x" * 100, "rot13")),
        ("bytes and size", (b"x", 10**12)),
        ("bytes", (b"\x00" * 64,)),
        ("text", (_SHARED_TEXT,)),
        ("shared list", (_SHARED_GRID,)),
        ("shared list twice", (_SHARED_GRID, _SHARED_GRID)),
        ("list of huge", ([huge] * 50,)),
        ("nested tuples", (((((1,),),),),)),
        ("dict", ({"a": 1, "b": [1, 2]},)),
        ("dict of shared", ({i: _SHARED_ROW for i in range(200)},)),
        ("huge key dict", ({huge: huge},)),
        ("sign digits exponent", ((0, tuple(range(10)) * 300, 999999999),)),
        ("address int", (2**128 - 1,)),
        ("network text", ("::/0",)),
        ("ipv4 network", ("0.0.0.0/0",)),
        ("shape and dtype", ((10**12,), "f8")),
        ("negative shape", ((-1,), "f8")),
        ("type int", (int,)),
        ("type object", (object,)),
        ("type and size", (bytes, 10**12)),
        ("type and shared", (list, _SHARED_GRID)),
        ("type pair", (int, object, None)),
        ("many args", tuple(range(20))),
    ]


def _installed(preset: str) -> bool:
    """True if every top-level package a preset names can be imported."""
    for dotted in PRESETS[preset]:
        top = dotted.split(".", 1)[0]
        try:
            importlib.import_module(top)
        except ImportError:
            return False
    return True


#: Preset globals the search currently finds a gadget in, with the reason
#: (strict xfail: an entry must go once the preset guards the global).  Empty:
#: the last one, numpy.ndarray called as ndarray((10**12,)), is now guarded.
KNOWN_GADGETS: dict[str, str] = {}


def _preset_params(known: dict[str, str] | None = None) -> list[Any]:
    """One parameter per (preset, global), skipped if the preset's library is missing."""
    params = []
    for preset in sorted(PRESETS):
        for dotted in sorted(PRESETS[preset]):
            marks: list[Any] = []
            if not _installed(preset):
                marks.append(pytest.mark.skip(reason=f"preset {preset!r}: library not installed"))
            elif known and dotted in known:
                marks.append(pytest.mark.xfail(reason=known[dotted], strict=True))
            params.append(pytest.param(preset, dotted, marks=marks, id=f"{preset}:{dotted}"))
    return params


def _globals_as_arguments(preset: str) -> list[tuple[str, bytes]]:
    """Argument bodies that pass each other admitted global of the preset as the callable."""
    bodies = []
    for other in sorted(PRESETS[preset] | PRESETS["stdlib"]):
        module, name = split(other)
        ref = b"c" + module.encode() + b"\n" + name.encode() + b"\n"
        bodies.append((f"global {other}", b"(" + ref + b"t"))
        grid = args_body(_SHARED_GRID)[1:-1]  # the list alone, without MARK and TUPLE
        bodies.append((f"global {other} and data", b"(" + ref + grid + b"t"))
        bodies.append((f"global {other} called", b"(" + ref + b")Rt"))
    return bodies


def _numpy_bodies() -> list[tuple[str, bytes]]:
    """numpy argument shapes: dtypes, the ndarray type and huge shapes, if numpy is installed."""
    try:
        import numpy
    except ImportError:
        return []
    dtype = numpy.dtype("f8")
    objects = numpy.dtype(object)
    shapes = [
        ("ndarray shape 0", (numpy.ndarray, (0,), b"b")),
        ("ndarray huge shape", (numpy.ndarray, (10**12,), b"b")),
        ("ndarray negative shape", (numpy.ndarray, (-1,), b"b")),
        ("frombuffer", (b"\x00" * 16, dtype, (2,), "C")),
        ("frombuffer huge shape", (b"\x00" * 16, dtype, (10**12,), "C")),
        ("frombuffer object dtype", (b"\x00" * 16, objects, (2,), "C")),
        ("frombuffer shared list", (_SHARED_GRID, dtype, (2,), "C")),
        ("scalar", (dtype, b"\x00" * 8)),
        ("scalar short data", (dtype, b"\x00")),
        ("scalar object", (objects, _SHARED_GRID)),
        ("scalar object int", (objects, 10**3000)),
        ("dtype text", ("f8", False, True)),
        ("dtype huge", ("V1000000000000", False, True)),
        ("dtype shape", (("f8", (10**6, 10**6)), False, True)),
        ("dtype object", ("O", False, True)),
    ]
    return [(label, args_body(*args)) for label, args in shapes]


def _bodies(preset: str) -> list[tuple[str, bytes]]:
    """Every argument body the search tries for a global of *preset*."""
    bodies = [(label, args_body(*args)) for label, args in _battery()]
    bodies += _globals_as_arguments(preset)
    bodies += _numpy_bodies()
    return bodies


class Canary:
    """A directory that must stay as it is."""

    def __init__(self, path: Path) -> None:
        self.path = path
        (path / "keep").write_text("keep")
        self.before = self.listing()

    def listing(self) -> list[str]:
        return sorted(os.listdir(self.path))


@pytest.fixture
def canary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Canary:
    """The test's working directory, recorded before the search."""
    monkeypatch.chdir(tmp_path)
    return Canary(tmp_path)


@NUMPY_SHIM_WARNINGS
@pytest.mark.usefixtures("forget_numpy_shims")
@pytest.mark.parametrize(("preset", "dotted"), _preset_params(KNOWN_GADGETS))
def test_gadget_search_over_preset_globals(
    ring: Keyring, canary: Canary, preset: str, dotted: str
) -> None:
    """A preset global called with hostile arguments loads or is rejected, within bounds."""
    codec = Codec(ring, allow=Allowlist(presets=sorted({"stdlib", preset})))
    module, name = split(dotted)
    failures = []
    tracemalloc.start()
    try:
        for label, body in _bodies(preset):
            payload = global_call(module, name, body)
            frame = codec.seal(payload)
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            try:
                codec.loads(frame)
            except RejectedFrame:
                pass
            except Exception as exc:  # the search reports any other type
                failures.append(f"{label}: {type(exc).__name__}: {exc}"[:300])
            peak = tracemalloc.get_traced_memory()[1] - base
            limit = MEMORY_FACTOR * len(payload) + MEMORY_SLACK
            if peak > limit:
                failures.append(f"{label}: traced {peak} bytes for a {len(payload)}-byte payload")
    finally:
        tracemalloc.stop()
    assert not failures, f"{dotted}:\n" + "\n".join(failures)
    assert canary.listing() == canary.before


def test_gadget_search_covers_every_preset() -> None:
    """The search parameters include every global of every preset."""
    ids = {(p.values[0], p.values[1]) for p in _preset_params()}
    assert ids == {(preset, dotted) for preset, names in PRESETS.items() for dotted in names}


def test_gadget_search_detects_an_amplifying_load(ring: Keyring) -> None:
    """The memory measure sees a large allocation: an unrestricted load of a shared grid copy."""
    payload = pickle.dumps([_SHARED_GRID] * 50, protocol=2)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        copies = [list(row) for row in pickle.loads(payload)]
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert len(copies) == 50
    assert peak > MEMORY_FACTOR * len(payload) or peak > 10 * len(payload)


# -- legitimate use of every preset global -------------------------------------------------


def _samples() -> dict[str, list[tuple[Any, int | bytes]]]:
    """For each preset global, values (and a protocol) whose pickles name it."""
    samples: dict[str, list[tuple[Any, int | bytes]]] = {
        "builtins.bool": [(bool, 4)],
        "builtins.bytearray": [(bytearray(b"ab"), 2), (bytearray(b"ab"), 4)],
        "builtins.bytes": [(b"", 2), (bytes, 4)],
        "builtins.complex": [(1 + 2j, 4)],
        "builtins.dict": [(dict, 4)],
        "builtins.float": [(float, 4)],
        "builtins.frozenset": [(frozenset({1, 2}), 2), (frozenset({1}), 3)],
        "builtins.int": [(int, 4)],
        "builtins.list": [(list, 4)],
        "builtins.set": [(set, 4), ({1, 2}, 2)],
        "builtins.slice": [(slice(1, 9, 2), 4)],
        "builtins.str": [(str, 4)],
        "builtins.tuple": [(tuple, 4)],
        "builtins.object": [(object, 4)],
        "builtins.Ellipsis": [(Ellipsis, 4)],
        "builtins.NotImplemented": [(NotImplemented, 4)],
        "_codecs.encode": [(b"ab\xff", 2)],
        "copyreg._reconstructor": [(Point(1, 2), 0), (Point(3, 4), 1)],
        "collections.Counter": [(Counter("abca"), 4)],
        "collections.OrderedDict": [(OrderedDict(a=1), 4)],
        "collections.defaultdict": [(defaultdict(list, {"a": [1]}), 4)],
        "collections.deque": [(deque([1, 2], maxlen=5), 4)],
        "datetime.date": [(datetime.date(2024, 2, 29), 4)],
        "datetime.datetime": [(datetime.datetime(2024, 2, 29, 1, 2, 3), 4)],
        "datetime.time": [(datetime.time(1, 2, 3), 4)],
        "datetime.timedelta": [(datetime.timedelta(days=1, seconds=2), 4)],
        "datetime.timezone": [(datetime.timezone(datetime.timedelta(hours=2)), 4)],
        "decimal.Decimal": [(decimal.Decimal("1.25"), 4)],
        "fractions.Fraction": [(fractions.Fraction(1, 3), 4)],
        "ipaddress.IPv4Address": [(ipaddress.IPv4Address("10.0.0.1"), 4)],
        "ipaddress.IPv4Interface": [(ipaddress.IPv4Interface("10.0.0.1/8"), 4)],
        "ipaddress.IPv4Network": [(ipaddress.IPv4Network("10.0.0.0/8"), 4)],
        "ipaddress.IPv6Address": [(ipaddress.IPv6Address("::1"), 4)],
        "ipaddress.IPv6Interface": [(ipaddress.IPv6Interface("::1/64"), 4)],
        "ipaddress.IPv6Network": [(ipaddress.IPv6Network("::/64"), 4)],
        "uuid.SafeUUID": [(uuid.SafeUUID.safe, 4)],
        "uuid.UUID": [(uuid.UUID(int=7), 4)],
    }
    try:
        from dateutil import relativedelta, tz
    except ImportError:
        pass
    else:
        samples.update(
            {
                "dateutil.relativedelta.relativedelta": [
                    (relativedelta.relativedelta(months=1, days=-2), 4)
                ],
                "dateutil._common.weekday": [
                    (relativedelta.relativedelta(weekday=relativedelta.FR(2)), 4)
                ],
                "dateutil.tz.tz.tzutc": [
                    (tz.tzutc(), 4), (datetime.datetime(2024, 1, 1, tzinfo=tz.UTC), 2)
                ],
                "dateutil.tz.tz.tzoffset": [(tz.tzoffset("X", 3600), 4)],
            }
        )
    try:
        import numpy
    except ImportError:
        return samples
    array = numpy.arange(6, dtype="f8").reshape(2, 3)
    samples.update(
        {
            "numpy.ndarray": [(array, 2)],
            "numpy.dtype": [(numpy.dtype("f8"), 4), (array, 5)],
            "numpy._core.multiarray._reconstruct": [(array, 2), (array, 4)],
            "numpy._core.multiarray.scalar": [(numpy.float64(1.5), 4), (numpy.int8(3), 2)],
            "numpy._core.numeric._frombuffer": [(array, 5)],
        }
    )
    # numpy 1 producers name numpy.core; numpy 2 names numpy._core.
    samples["numpy.core.multiarray._reconstruct"] = [(array, -2)]
    samples["numpy.core.multiarray.scalar"] = [(numpy.float64(1.5), -2)]
    samples["numpy.core.numeric._frombuffer"] = [
        (
            array,
            global_call(
                "numpy.core.numeric", "_frombuffer",
                args_body(array.tobytes(), array.dtype, array.shape, "C"),
            ),
        )
    ]
    return samples


def _dumps(value: Any, protocol: int | bytes) -> bytes:
    """A pickle of *value*: a given payload, or protocol -2 for numpy 1 module paths."""
    if isinstance(protocol, bytes):
        return protocol
    if protocol >= 0:
        return pickle.dumps(value, protocol=protocol)
    # Protocol 2 names globals as text lines, so the module can be renamed in place.
    return pickle.dumps(value, protocol=-protocol).replace(b"numpy._core.", b"numpy.core.")


def _modern(module: str, name: str) -> tuple[str, str]:
    """The Python 3 name of a global a protocol 0-2 pickle may write under its Python 2 name."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]  # type: ignore[no-any-return]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def _equal(a: Any, b: Any) -> bool:
    """Equality, also for numpy arrays (a type loads as its guard, which compares equal)."""
    try:
        import numpy
    except ImportError:
        return bool(a == b)
    if isinstance(a, numpy.ndarray):
        return isinstance(b, numpy.ndarray) and a.dtype == b.dtype and bool((a == b).all())
    return bool(a == b)


@NUMPY_SHIM_WARNINGS
@pytest.mark.usefixtures("forget_numpy_shims")
@pytest.mark.parametrize(("preset", "dotted"), _preset_params())
def test_every_preset_global_round_trips(ring: Keyring, preset: str, dotted: str) -> None:
    """Each preset global's legitimate pickles name it and load equal under the preset."""
    samples = _samples()
    assert dotted in samples, f"add a legitimate sample for {dotted} to _samples()"
    if dotted.startswith("dateutil.tz."):
        from test_presets import skip_unless_zones_pickle_by_constructor

        skip_unless_zones_pickle_by_constructor()
    # allowpkg.mod.Point: a plain class, as protocols 0 and 1 rebuild it.
    codec = Codec(ring, allow=Allowlist([Point], presets=sorted({"stdlib", preset})))
    module, name = split(dotted)
    for value, protocol in samples[dotted]:
        payload = _dumps(value, protocol)
        named = [_modern(*g) for g in pickle_globals(payload)]
        assert (module, name) in named, (dotted, named)
        assert _equal(codec.loads(codec.seal(payload)), value)
    if preset != "stdlib":
        # The other side: without the preset, the same pickles are refused.
        with pytest.raises(ForbiddenClass):
            Codec(ring).loads(codec.seal(_dumps(*samples[dotted][0])))


@pytest.mark.usefixtures("forget_numpy_shims")
def test_numpy_1_paths_do_not_make_later_numpy_loads_warn(ring: Keyring) -> None:
    """After one numpy 1 path pickle, numpy 2 pickles load without a DeprecationWarning."""
    numpy = pytest.importorskip("numpy")
    if not numpy.__version__.startswith("2"):
        pytest.skip("numpy 2 only")
    codec = Codec(ring, allow=Allowlist(presets=["stdlib", "numpy"]))
    array = numpy.arange(3)
    old = global_call(
        "numpy.core.numeric", "_frombuffer",
        args_body(array.tobytes(), array.dtype, array.shape, "C"),
    )
    with warnings.catch_warnings():  # numpy's own shim warning, as plain pickle gives
        warnings.simplefilter("ignore", DeprecationWarning)
        assert (codec.loads(codec.seal(old)) == numpy.arange(3)).all()
    # Warnings are errors in this suite: a spurious one refuses the frame.
    assert (codec.loads(codec.dumps(numpy.float32(2.5))) == numpy.float32(2.5)).all()
