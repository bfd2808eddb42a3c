"""
Allowlist presets: named sets of globals, each admitted for a reason given in
docs/reference/allowlist.md, and the guards that make some of them safe.

* ``stdlib``: built-in and standard library value types (the default).
* ``numpy``: arrays, dtypes and scalars, through exactly the reconstruction
  globals numpy's own pickles name (numpy 1 and 2 module paths), nothing
  broader.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._allowlist import DEFAULT_ALLOW

__all__ = ["PRESETS", "preset_guards"]

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

#: Preset name to the exact globals it admits.
PRESETS: dict[str, frozenset[str]] = {
    "stdlib": DEFAULT_ALLOW,
    "numpy": _NUMPY,
}


class PresetRefused(Exception):
    """Internal: a preset's guard refused an argument form."""


def _numpy_reconstruct(fn: Any, args: tuple[Any, ...], kw: dict[str, Any]) -> Any:
    # numpy writes _reconstruct(ndarray, (0,), b"b") and then sets the state;
    # any other subtype or shape is not numpy's own pickle.
    import numpy

    if kw or len(args) != 3 or args[0] is not numpy.ndarray or tuple(args[1]) != (0,):
        raise PresetRefused("numpy _reconstruct is admitted only as numpy itself calls it")
    return fn(*args)


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


_NUMPY_GUARDS: dict[str, Callable[[Any, tuple[Any, ...], dict[str, Any]], Any]] = {
    "_reconstruct": _numpy_reconstruct,
    "_frombuffer": _numpy_frombuffer,
    "scalar": _numpy_scalar,
}


def preset_guards() -> dict[Any, Callable[[Any, tuple[Any, ...], dict[str, Any]], Any]]:
    """
    Guards for preset globals whose modules are already imported, keyed by
    the object itself (importing numpy just to guard it would be wasteful:
    a pickle that names numpy imports it through the policy first).
    """
    import sys

    guards: dict[Any, Callable[[Any, tuple[Any, ...], dict[str, Any]], Any]] = {}
    for modname in (
        "numpy._core.multiarray", "numpy._core.numeric",
        "numpy.core.multiarray", "numpy.core.numeric",
    ):
        module = sys.modules.get(modname)
        if module is None:
            continue
        for name, guard in _NUMPY_GUARDS.items():
            obj = getattr(module, name, None)
            if obj is not None:
                guards[obj] = guard
    return guards
