"""
Allowlist presets: named sets of globals, each admitted for a reason given in
docs/reference/presets.md, and the guards that make some of them safe.

* ``stdlib``: built-in and standard library value types (the default).
* ``numpy``: arrays, dtypes and scalars, through exactly the reconstruction
  globals numpy's own pickles name (numpy 1 and 2 module paths), nothing
  broader.
* ``dateutil``: ``relativedelta``, its weekdays, and the fixed-offset time
  zones ``tzutc`` and ``tzoffset`` (guarded: always a new instance, never the
  process-wide cached one).

pandas has no preset: its pickles name constructors that take classes and
keyword arguments from the pickle, and its block manager trusts the block
placements it is given (see docs/reference/presets.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._allowlist import DEFAULT_ALLOW

__all__ = ["PRESETS", "PRESET_MODULES", "preset_guards"]

_NUMPY = frozenset(
    {
        "numpy.ndarray",
        "numpy.dtype",
        # numpy 2 ...
        "numpy._core.multiarray._reconstruct",
        "numpy._core.multiarray.scalar",
        "numpy._core.numeric._frombuffer",
        # ... and the paths numpy 1 producers write.
        "numpy.core.multiarray._reconstruct",
        "numpy.core.multiarray.scalar",
        "numpy.core.numeric._frombuffer",
    }
)

_DATEUTIL = frozenset(
    {
        "dateutil.relativedelta.relativedelta",
        "dateutil._common.weekday",
        # Guarded: a new instance each time, not dateutil's shared cache.
        "dateutil.tz.tz.tzutc",
        "dateutil.tz.tz.tzoffset",
    }
)

#: Preset name to the exact globals it admits.
PRESETS: dict[str, frozenset[str]] = {
    "stdlib": DEFAULT_ALLOW,
    "numpy": _NUMPY,
    "dateutil": _DATEUTIL,
}

#: Module name prefixes whose globals may have a preset guard.
PRESET_MODULES: tuple[str, ...] = ("numpy", "dateutil")


class PresetRefused(Exception):
    """Internal: a preset's guard refused an argument form."""


def _numpy_dtype(fn: Any, args: tuple[Any, ...], kw: dict[str, Any]) -> Any:
    # numpy writes dtype(text, False, True) and then sets the state.  copy=True
    # makes a new dtype, so the BUILD that follows cannot change one shared by
    # the process (numpy.dtype("f8") without it is numpy's own float64).  The
    # unpickler lets that BUILD happen once, before the dtype is used.
    if kw or len(args) != 3 or type(args[0]) is not str or type(args[1]) is not bool:
        raise PresetRefused("numpy.dtype is admitted only as dtype(text, align, True)")
    if args[2] is not True:
        raise PresetRefused("numpy.dtype is admitted only as dtype(text, align, True)")
    return fn(*args)


_numpy_dtype.makes_dtype = True  # type: ignore[attr-defined]


def _numpy_ndarray(fn: Any, args: tuple[Any, ...], kw: dict[str, Any]) -> Any:
    # numpy's pickles name ndarray only as _reconstruct's subtype argument.
    # Called (REDUCE), ndarray(shape) would allocate uninitialized memory of
    # any size from a few bytes of payload; as a guard it cannot be used with
    # NEWOBJ either.
    raise PresetRefused("numpy.ndarray is admitted only as the subtype argument of _reconstruct")


def _numpy_reconstruct(fn: Any, args: tuple[Any, ...], kw: dict[str, Any]) -> Any:
    # numpy writes _reconstruct(ndarray, (0,), b"b") and then sets the state;
    # any other subtype or shape is not numpy's own pickle.  The subtype
    # arrives as the ndarray guard.
    import numpy

    if kw or len(args) != 3:
        raise PresetRefused("numpy _reconstruct is admitted only as numpy itself calls it")
    subtype = getattr(args[0], "__wrapped__", args[0])
    if subtype is not numpy.ndarray or type(args[1]) is not tuple or args[1] != (0,):
        raise PresetRefused("numpy _reconstruct is admitted only as numpy itself calls it")
    return fn(numpy.ndarray, *args[1:])


def _numpy_frombuffer(fn: Any, args: tuple[Any, ...], kw: dict[str, Any]) -> Any:
    # frombuffer views the payload's own bytes (no copy); numpy refuses object
    # dtypes there, so no pointer can be forged.
    import numpy

    if kw or len(args) != 4 or not isinstance(args[1], numpy.dtype) or args[1].hasobject:
        raise PresetRefused("numpy _frombuffer takes (buffer, dtype, shape, order)")
    if not isinstance(args[0], (bytes, bytearray, memoryview)):
        raise PresetRefused("numpy _frombuffer takes a bytes buffer")
    return fn(*args)


def _numpy_scalar(fn: Any, args: tuple[Any, ...], kw: dict[str, Any]) -> Any:
    import numpy

    if kw or not 1 <= len(args) <= 2 or not isinstance(args[0], numpy.dtype):
        raise PresetRefused("numpy scalar takes (dtype, data)")
    if len(args) == 2 and not args[0].hasobject and not isinstance(args[1], bytes):
        raise PresetRefused("numpy scalar data must be bytes")
    return fn(*args)


PresetGuard = Callable[[Any, tuple[Any, ...], dict[str, Any]], Any]

_NUMPY_GUARDS: dict[str, PresetGuard] = {
    "_reconstruct": _numpy_reconstruct,
    "_frombuffer": _numpy_frombuffer,
    "scalar": _numpy_scalar,
}


def _dateutil_tzutc(fn: Any, args: tuple[Any, ...], kw: dict[str, Any]) -> Any:
    # tzutc() returns one instance shared by the whole process, which a BUILD
    # opcode after the call could then change; build a private one instead.
    if args or kw:
        raise PresetRefused("dateutil tzutc takes no arguments")
    return fn.__new__(fn)


def _dateutil_tzoffset(fn: Any, args: tuple[Any, ...], kw: dict[str, Any]) -> Any:
    # tzoffset(name, offset) returns a cached, shared instance; instance()
    # builds a private one.  dateutil pickles (name or None, timedelta).
    import datetime

    if kw or len(args) != 2:
        raise PresetRefused("dateutil tzoffset takes (name, offset)")
    name, offset = args
    if name is not None and type(name) is not str:
        raise PresetRefused("dateutil tzoffset name must be a string or None")
    if type(offset) is not datetime.timedelta:
        raise PresetRefused("dateutil tzoffset offset must be a datetime.timedelta")
    return fn.instance(name, offset)


#: Module name to the guards of its globals, by global name.
_GUARDS: dict[str, dict[str, PresetGuard]] = {
    "numpy._core.multiarray": _NUMPY_GUARDS,
    "numpy._core.numeric": _NUMPY_GUARDS,
    "numpy.core.multiarray": _NUMPY_GUARDS,
    "numpy.core.numeric": _NUMPY_GUARDS,
    "numpy": {"ndarray": _numpy_ndarray, "dtype": _numpy_dtype},
    "dateutil.tz.tz": {"tzutc": _dateutil_tzutc, "tzoffset": _dateutil_tzoffset},
}


def preset_guards() -> dict[Any, PresetGuard]:
    """
    Guards for preset globals whose modules are already imported, keyed by
    the object itself (importing numpy just to guard it would be wasteful:
    a pickle that names numpy imports it through the policy first).
    """
    import sys

    guards: dict[Any, PresetGuard] = {}
    for modname, table in _GUARDS.items():
        module = sys.modules.get(modname)
        if module is None:
            continue
        for name, guard in table.items():
            obj = getattr(module, name, None)
            if obj is not None:
                guards[obj] = guard
    return guards
