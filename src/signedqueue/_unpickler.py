"""
Restricted unpickling: ``find_class`` admits only what the policy allows.

Some admitted constructors would let a small pickle build a huge object (a
copying constructor called many times on one shared list, ``bytes(10**12)``,
``Fraction("1e999999999")``).  Those are handed to the unpickler as *guards*:
checked wrappers that refuse dangerous argument forms and charge the size of
what they copy against a budget of twice the payload size.  Every two bytes a
guarded constructor materializes are therefore paid for by a byte of payload.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import collections
import contextlib
import copyreg
import decimal
import enum
import fractions
import io
import pickle
import pickletools
import re
import struct
import sys
from collections.abc import Callable
from typing import Any, ClassVar

from ._allowlist import Policy
from ._presets import PRESET_MODULES

__all__ = ["BudgetExceeded", "GlobalModified", "GuardRefused", "restricted_loads"]

#: Bytes of budget every load gets on top of the payload size.
BUDGET_SLACK = 4096
#: The budget is this many times the payload size (plus the slack): protocols
#: 0 to 2 write a bytearray as bytearray(_codecs.encode(text, "latin1")),
#: which materializes each of its bytes twice.
BUDGET_FACTOR = 2
#: Codecs bytes(), bytearray() and str() may encode or decode with: linear
#: time only ("punycode" takes quadratic time, so a 60 kB payload would keep
#: the consumer busy for a minute).  Names as codecs.lookup() gives them.
LINEAR_CODECS = frozenset(
    {
        "ascii", "iso8859-1", "utf-8", "utf-16", "utf-16-le", "utf-16-be",
        "utf-32", "utf-32-le", "utf-32-be",
    }
)
#: Largest integer (in bits) a Fraction guard accepts: about 15,000 digits.
MAX_FRACTION_BITS = 50_000


class BudgetExceeded(Exception):
    """Internal: a payload tried to build more than it carries."""


class GuardRefused(Exception):
    """Internal: a guarded constructor was called with a refused form."""


class _Budget:
    """What one load may still build, and the numpy dtypes it made but not yet set."""

    __slots__ = ("left", "pending")

    def __init__(self, left: int) -> None:
        self.left = left
        #: id() to dtype: made by numpy.dtype(...) in this load, awaiting
        #: their one BUILD.  Until then none may be used (see _uses_pending).
        self.pending: dict[int, Any] = {}

    def charge(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise BudgetExceeded


def _sized(budget: _Budget, value: object, what: str) -> None:
    try:
        n = len(value)  # type: ignore[arg-type]
    except TypeError:
        raise GuardRefused(f"{what} takes only sized arguments") from None
    budget.charge(n)


_BYTES_LIKE = (bytes, bytearray, memoryview)


def _copying(fn: Any, budget: _Budget, args: tuple[Any, ...], kw: dict[str, Any]) -> Any:
    # list, tuple, set, frozenset, dict, deque, OrderedDict, Counter
    if args:
        _sized(budget, args[0], fn.__name__)
    budget.charge(len(kw))
    return fn(*args, **kw)


def _linear_codec(encoding: object, what: str) -> None:
    try:
        name = codecs.lookup(encoding).name  # type: ignore[arg-type]
    except (LookupError, TypeError, ValueError):
        name = None
    if name not in LINEAR_CODECS:
        raise GuardRefused(f"{what} admits only the codecs {', '.join(sorted(LINEAR_CODECS))}")


def _binary(fn: Any, budget: _Budget, args: tuple[Any, ...], kw: dict[str, Any]) -> Any:
    # bytes, bytearray: never an integer size (bytes(10**12)).
    if kw or len(args) > 3:
        raise GuardRefused(f"{fn.__name__} takes positional arguments only")
    if args:
        first = args[0]
        if isinstance(first, str):
            if len(args) < 2:
                raise GuardRefused(f"{fn.__name__}(str) needs an encoding")
            _linear_codec(args[1], fn.__name__)
        elif isinstance(first, (*_BYTES_LIKE, list, tuple)):
            if len(args) > 1:
                raise GuardRefused(f"{fn.__name__}(bytes) takes no encoding")
        else:
            raise GuardRefused(f"{fn.__name__} refuses {type(first).__name__} arguments")
        _sized(budget, first, fn.__name__)
    return fn(*args)


def _text(fn: Any, budget: _Budget, args: tuple[Any, ...], kw: dict[str, Any]) -> Any:
    # str: no repr() of arbitrary (possibly huge, shared) objects.
    if kw or len(args) > 3:
        raise GuardRefused("str takes positional arguments only")
    if args:
        first = args[0]
        if len(args) == 1 and not isinstance(first, str):
            raise GuardRefused("str(x) is admitted only for strings and bytes with an encoding")
        if len(args) > 1 and not isinstance(first, _BYTES_LIKE):
            raise GuardRefused("str(x, encoding) takes bytes")
        if len(args) > 1:
            _linear_codec(args[1], "str")
        _sized(budget, first, "str")
    return fn(*args)


def _integer(fn: Any, budget: _Budget, args: tuple[Any, ...], kw: dict[str, Any]) -> Any:
    # int: from text (bounded by sys.int_info digit limits) or numbers; never
    # through __int__ of a Decimal with a huge exponent.
    if kw or len(args) > 2:
        raise GuardRefused("int takes positional arguments only")
    if args:
        first = args[0]
        if isinstance(first, (str, *_BYTES_LIKE)):
            _sized(budget, first, "int")
        elif type(first) not in (int, bool, float) or len(args) > 1:
            raise GuardRefused(f"int refuses {type(first).__name__} arguments")
    return fn(*args)


def _decimal(fn: Any, budget: _Budget, args: tuple[Any, ...], kw: dict[str, Any]) -> Any:
    if kw or len(args) > 2 or not args:
        raise GuardRefused("Decimal takes a string or a (sign, digits, exponent) tuple")
    value = args[0]
    if isinstance(value, str):
        _sized(budget, value, "Decimal")
    elif isinstance(value, tuple) and len(value) == 3:
        _sized(budget, value[1], "Decimal")
    elif type(value) is not decimal.Decimal:
        raise GuardRefused("Decimal takes a string or a (sign, digits, exponent) tuple")
    return fn(*args)


def _fraction(fn: Any, budget: _Budget, args: tuple[Any, ...], kw: dict[str, Any]) -> Any:
    # Fraction("1e999999999") computes 10**999999999; gcd of huge ints is
    # quadratic.  Admit "n/d" strings and bounded integers only.
    if kw or not 1 <= len(args) <= 2:
        raise GuardRefused("Fraction takes a string or one or two integers")
    for value in args:
        if isinstance(value, str):
            if len(args) != 1 or "e" in value.lower():
                raise GuardRefused("Fraction strings must be 'n' or 'n/d' without exponent")
            _sized(budget, value, "Fraction")
        elif type(value) is int:
            if value.bit_length() > MAX_FRACTION_BITS:
                raise GuardRefused("Fraction integer too large")
        elif type(value) is not fractions.Fraction:
            raise GuardRefused(f"Fraction refuses {type(value).__name__} arguments")
    return fn(*args)


def _latin1_encode(fn: Any, budget: _Budget, args: tuple[Any, ...], kw: dict[str, Any]) -> Any:
    # How protocols 0-2 write bytes: _codecs.encode(text, "latin1").
    if kw or len(args) != 2 or not isinstance(args[0], str):
        raise GuardRefused("_codecs.encode is admitted only as encode(str, 'latin1')")
    if args[1].lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1"):
        raise GuardRefused("_codecs.encode is admitted only with the latin1 codec")
    budget.charge(len(args[0]))
    return fn(*args)


def _reconstructor(fn: Any, budget: _Budget, args: tuple[Any, ...], kw: dict[str, Any]) -> Any:
    # How protocols 0 and 1 rebuild plain class instances.
    if kw or len(args) != 3 or args[1] is not object or not isinstance(args[0], type):
        raise GuardRefused(
            "copyreg._reconstructor is admitted only for plain classes; "
            "pickle subclasses of built-in types with protocol 2 or newer"
        )
    return fn(*args)


#: Types a defaultdict may use as its default_factory.
SAFE_FACTORIES: frozenset[type] = frozenset(
    {
        bool, bytearray, bytes, complex, dict, float, frozenset, int, list, set,
        str, tuple, collections.Counter, collections.OrderedDict, collections.deque,
        decimal.Decimal, fractions.Fraction,
    }
)


def _defaultdict(fn: Any, budget: _Budget, args: tuple[Any, ...], kw: dict[str, Any]) -> Any:
    if kw or len(args) > 2:
        raise GuardRefused("defaultdict takes a factory and an optional mapping")
    args_list = list(args)
    if args_list:
        factory = args_list[0]
        if isinstance(factory, Guard):
            factory = args_list[0] = factory.__wrapped__
        if factory is not None and factory not in SAFE_FACTORIES:
            raise GuardRefused("defaultdict factory must be None or a built-in value type")
        if len(args_list) > 1:
            _sized(budget, args_list[1], "defaultdict")
    return fn(*args_list)


_CHECKS: dict[Any, Callable[[Any, _Budget, tuple[Any, ...], dict[str, Any]], Any]] = {
    list: _copying,
    tuple: _copying,
    set: _copying,
    frozenset: _copying,
    dict: _copying,
    collections.deque: _copying,
    collections.OrderedDict: _copying,
    collections.Counter: _copying,
    collections.defaultdict: _defaultdict,
    bytes: _binary,
    bytearray: _binary,
    str: _text,
    int: _integer,
    decimal.Decimal: _decimal,
    fractions.Fraction: _fraction,
    copyreg._reconstructor: _reconstructor,  # type: ignore[attr-defined]
}
try:
    import _codecs

    _CHECKS[_codecs.encode] = _latin1_encode
except ImportError:  # pragma: no cover
    pass


_PRESET_CHECKS: dict[Any, Callable[[Any, _Budget, tuple[Any, ...], dict[str, Any]], Any]] = {}
#: Globals of preset modules known to have no guard: their module was imported
#: when they were looked up, so preset_guards() had its chance.  Remembering
#: them spares a rescan (and numpy 1 shim warnings) on every load.
_UNGUARDED: set[Any] = set()


def _preset_check(
    obj: Any,
) -> Callable[[Any, _Budget, tuple[Any, ...], dict[str, Any]], Any] | None:
    """The guard of a preset global (numpy, dateutil), looked up once its module is imported."""
    check = _PRESET_CHECKS.get(obj)
    if check is None and obj not in _UNGUARDED:
        from ._presets import PresetRefused, preset_guards

        for target, guard in preset_guards().items():
            if target not in _PRESET_CHECKS:
                def checked(
                    fn: Any, budget: _Budget, args: tuple[Any, ...], kw: dict[str, Any],
                    guard: Any = guard,
                ) -> Any:
                    if budget.pending and _uses_pending(budget, (args, kw)):
                        raise GuardRefused(
                            "a numpy dtype was used before its state was set"
                        )
                    try:
                        result = guard(fn, args, kw)
                    except PresetRefused as exc:
                        raise GuardRefused(str(exc)) from None
                    if getattr(guard, "makes_dtype", False):
                        budget.pending[id(result)] = result
                    return result

                _PRESET_CHECKS[target] = checked
        check = _PRESET_CHECKS.get(obj)
        if check is None:
            _UNGUARDED.add(obj)
    return check


def _uses_pending(budget: _Budget, value: object) -> bool:
    """True if *value* is, or contains, a dtype still awaiting its BUILD."""
    seen: set[int] = set()
    todo: list[object] = [value]
    while todo:
        item = todo.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if id(item) in budget.pending and budget.pending[id(item)] is item:
            return True
        if isinstance(item, (tuple, list)) and type(item) in (tuple, list):
            todo.extend(item)
        elif isinstance(item, dict) and type(item) is dict:
            todo.extend(item.keys())
            todo.extend(item.values())
    return False


class Guard:
    """
    A checked stand-in for an admitted constructor, used only while loading.
    """

    __slots__ = ("__wrapped__", "_budget", "_check")
    __wrapped__: Any
    _budget: _Budget
    _check: Any

    def __init__(self, wrapped: Any, check: Any, budget: _Budget) -> None:
        object.__setattr__(self, "__wrapped__", wrapped)
        object.__setattr__(self, "_check", check)
        object.__setattr__(self, "_budget", budget)

    def __setattr__(self, name: str, value: Any) -> None:
        # A pickle's BUILD opcode must not swap the check or the budget.
        raise AttributeError("guards are immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("guards are immutable")

    def __call__(self, *args: Any, **kw: Any) -> Any:
        return self._check(self.__wrapped__, self._budget, args, kw)

    def __repr__(self) -> str:
        return f"<guarded {self.__wrapped__!r}>"

    # A pickle may carry the type itself as a value ({"factory": int}); it then
    # loads as this guard, which at least compares equal to the type.
    def __eq__(self, other: object) -> bool:
        if isinstance(other, Guard):
            other = other.__wrapped__
        return bool(self.__wrapped__ == other)

    def __hash__(self) -> int:
        return hash(self.__wrapped__)


class GlobalModified(Exception):
    """Internal: a pickle changed a class or function it named (BUILD)."""

    def __init__(self, name: str, member: bool = False) -> None:
        super().__init__(name)
        self.name = name
        self.member = member


def _state(obj: Any) -> tuple[Any, ...] | None:
    """
    What a pickle's BUILD opcode could change on *obj*: a class's attributes,
    bases and metaclass; another object's ``__dict__`` and, for a function,
    its defaults.  ``None`` for objects BUILD cannot change (C types and
    instances without ``__dict__`` refuse attribute assignment).
    """
    if isinstance(obj, type):
        return (type(obj), obj.__bases__, dict(obj.__dict__))
    attrs = getattr(obj, "__dict__", None)
    if isinstance(attrs, dict):
        return (
            dict(attrs),
            getattr(obj, "__defaults__", None),
            getattr(obj, "__kwdefaults__", None),
        )
    return None


def _snapshot(obj: Any) -> list[tuple[Any, tuple[Any, ...]]]:
    """
    The state of an admitted global and of the shared objects calling it can
    return: an enum's members are singletons, so ``SafeUUID(0)`` followed by
    BUILD would change ``SafeUUID.safe`` for the whole process.
    """
    targets = [obj]
    if isinstance(obj, enum.EnumMeta):
        targets.extend(obj.__members__.values())
    snaps = []
    for target in targets:
        state = _state(target)
        if state is not None:
            snaps.append((target, state))
    return snaps


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if type(a) is not dict or type(b) is not dict or a.keys() != b.keys():
        return False
    return all(a[k] is b[k] for k in a)


def _changed(obj: Any, snap: tuple[Any, ...]) -> bool:
    now = _state(obj)
    return now is None or len(now) != len(snap) or not all(map(_same, now, snap))


def _restore(obj: Any, snap: tuple[Any, ...]) -> None:
    """Undo what a refused pickle changed on *obj* (best effort)."""
    if isinstance(obj, type):
        attrs = snap[2]
        for key in set(obj.__dict__) - set(attrs):
            with contextlib.suppress(AttributeError, TypeError):
                delattr(obj, key)
        for key, value in attrs.items():
            if obj.__dict__.get(key, _MISSING) is not value:
                with contextlib.suppress(AttributeError, TypeError):
                    setattr(obj, key, value)
        return
    attrs, defaults, kwdefaults = snap
    obj.__dict__.clear()
    obj.__dict__.update(attrs)
    if hasattr(obj, "__defaults__"):
        with contextlib.suppress(AttributeError, TypeError):
            obj.__defaults__ = defaults
            obj.__kwdefaults__ = kwdefaults


_MISSING = object()


class _Restricted:
    """
    What both restricted unpicklers share: ``find_class`` asks the policy, and
    a pickle that changes a class or function it named is refused.
    """

    _policy: Policy
    _budget_size: int
    _budget: _Budget | None
    # (name, is an enum member of it, object, state before the load)
    _named: list[tuple[str, bool, Any, tuple[Any, ...]]]

    def _setup(self, policy: Policy, budget: int) -> None:
        self._policy = policy
        self._budget_size = budget
        self._budget = _Budget(budget)
        self._named = []

    def _the_budget(self) -> _Budget:
        budget = self._budget
        if budget is None:  # made on first use: most loads call no guard
            budget = self._budget = _Budget(self._budget_size)
        return budget

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 names, as protocols 0-2 write them by default
        # (``__builtin__.set``), mean their Python 3 counterparts.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        obj = self._policy.resolve(module, name)
        try:
            check = _CHECKS.get(obj)
            if check is None and module.startswith(PRESET_MODULES):
                check = _preset_check(obj)
        except TypeError:  # unhashable object
            check = None
        if check is not None:
            return Guard(obj, check, self._the_budget())
        shown = f"{module}.{name}"
        for target, state in _snapshot(obj):
            self._named.append((shown, target is not obj, target, state))
        return obj

    def check_unchanged(self) -> None:
        """Raise GlobalModified (after undoing it) if a named global changed."""
        first: tuple[str, bool] | None = None
        for shown, member, obj, snap in self._named:
            if _changed(obj, snap):
                _restore(obj, snap)
                first = first or (shown, member)
        if first is not None:
            raise GlobalModified(*first)

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not supported")




class RestrictedUnpickler(_Restricted, pickle.Unpickler):
    """
    The C unpickler, restricted: for policies that admit no numpy global.
    Made by :func:`restricted_loads` with the C constructor and its
    attributes set directly (no Python-level ``__init__`` on the hot path).
    """



def _shape_size(shape: object) -> int:
    if type(shape) is not tuple or not all(type(n) is int and n >= 0 for n in shape):
        raise GuardRefused("numpy array state: the shape must be a tuple of non-negative ints")
    size = 1
    for n in shape:
        size *= n
        if size > 2**63:
            raise GuardRefused("numpy array state: the shape is too large")
    return size


def _check_array_state(numpy: Any, state: object) -> None:
    """
    Refuse an ndarray ``__setstate__`` argument whose data does not exactly
    fill its shape.  numpy itself checks bytes data, but fills an object
    array from a shorter list and leaves the rest of its pointers
    uninitialized, which crashes the process when the array is read or freed.
    """
    if type(state) is not tuple or len(state) not in (4, 5):
        raise GuardRefused("numpy array state must be (version, shape, dtype, fortran, data)")
    shape, dtype, _fortran, data = state[-4:]
    if not isinstance(dtype, numpy.dtype):
        raise GuardRefused("numpy array state: the dtype must be a numpy.dtype")
    size = _shape_size(shape)
    if dtype.hasobject:
        if type(data) is not list or len(data) != size:
            raise GuardRefused("numpy object array state: the data must be a list of its items")
    elif not isinstance(data, (bytes, bytearray)) or len(data) != size * dtype.itemsize:
        raise GuardRefused("numpy array state: the data must be bytes of exactly its size")


_DTYPE_ERRORS = (TypeError, ValueError, KeyError, IndexError, OverflowError, MemoryError)


def _expected_dtype(numpy: Any, state: object) -> Any:
    """
    The dtype a ``dtype.__setstate__`` argument describes, built through
    numpy's public constructor (which checks sizes, offsets and object
    fields), or None for a plain dtype.  numpy's ``__setstate__`` itself
    accepts inconsistent states: an object field in a 4-byte item crashes
    the process when an array of it is created.
    """
    # Version 3, or 4 with datetime metadata as a ninth item.
    if type(state) is not tuple or (state[:1], len(state)) not in (((3,), 8), ((4,), 9)):
        raise GuardRefused("numpy dtype state must be numpy's version 3 or 4 state")
    _, _order, sub, names, fields, elsize, _alignment, flags = state[:8]
    if type(elsize) is not int or type(flags) is not int:
        raise GuardRefused("numpy dtype state: the item size and flags must be ints")
    try:
        if names is not None or fields is not None:
            if type(names) is not tuple or type(fields) is not dict:
                raise GuardRefused("numpy dtype state: names must be a tuple, fields a dict")
            if not set(names) <= set(fields):
                raise GuardRefused("numpy dtype state: names and fields do not match")
            specs = [fields[name] for name in names]
            spec = {
                "names": list(names),
                "formats": [f[0] for f in specs],
                "offsets": [f[1] for f in specs],
                "titles": [f[2] if len(f) > 2 else None for f in specs],
                "itemsize": elsize,
            }
            return numpy.dtype(spec, align=bool(flags & 0x80))
        if sub is not None:
            if type(sub) is not tuple or len(sub) != 2:
                raise GuardRefused("numpy dtype state: the subarray must be (dtype, shape)")
            return numpy.dtype(sub)
    except _DTYPE_ERRORS:
        raise GuardRefused("numpy dtype state is inconsistent") from None
    return None


def _build_dtype(unpickler: Any, numpy: Any, inst: Any, state: object) -> None:
    # Only a dtype this load just made with numpy.dtype(text, align, True),
    # once, and before anything used it: a BUILD on a dtype an array already
    # uses would change the layout under the array's data.
    pending = unpickler._the_budget().pending
    if pending.get(id(inst)) is not inst:
        raise GuardRefused("a numpy dtype takes one BUILD, right after it is made")
    del pending[id(inst)]
    if _uses_pending(unpickler._the_budget(), state):
        raise GuardRefused("a numpy dtype was used before its state was set")
    # numpy writes version 4 (with datetime metadata) for datetime dtypes and
    # 3 for the others; a datetime dtype given a version 3 state is left
    # without metadata and crashes the process (numpy 2.4).
    if type(state) is tuple and state[:1] != inst.__reduce__()[2][:1]:
        raise GuardRefused("numpy dtype state is not of the version numpy writes for it")
    expected = _expected_dtype(numpy, state)
    before = (inst.itemsize, inst.flags, inst.hasobject, inst.alignment)
    if (
        expected is None
        and isinstance(state, tuple)
        and (state[5] not in (-1, before[0]) or state[7] != before[1])
    ):
        raise GuardRefused("numpy dtype state does not match its dtype")
    pickle._Unpickler.load_build(unpickler)  # type: ignore[attr-defined]
    if expected is None:
        ok = (inst.itemsize, inst.flags, inst.hasobject, inst.alignment) == before
    else:
        ok = (
            inst == expected
            and inst.itemsize == expected.itemsize
            and inst.flags == expected.flags
            and inst.alignment == expected.alignment
        )
    if not ok:
        raise GuardRefused("numpy dtype state is inconsistent")


class CheckedBuildUnpickler(_Restricted, pickle._Unpickler):
    """
    The Python unpickler, restricted, whose ``BUILD`` checks the state given
    to a numpy array or scalar first.  Used when the policy admits a numpy
    global: the C unpickler's ``BUILD`` cannot be intercepted.
    """

    dispatch: ClassVar[dict[int, Callable[[Any], None]]] = dict(
        pickle._Unpickler.dispatch
    )

    def __init__(
        self, file: io.BytesIO | _ViewReader, policy: Policy, budget: int,
        buffers: list[memoryview] | None = None,
    ) -> None:
        pickle._Unpickler.__init__(
            self, file, fix_imports=False, buffers=buffers
        )
        self._setup(policy, budget)

    def load_build(self) -> None:
        stack: list[Any] = self.stack  # type: ignore[attr-defined]
        numpy = sys.modules.get("numpy")
        if numpy is not None and len(stack) >= 2:
            inst = stack[-2]
            if isinstance(inst, numpy.ndarray):
                _check_array_state(numpy, stack[-1])
                if _uses_pending(self._the_budget(), stack[-1]):
                    raise GuardRefused("a numpy dtype was used before its state was set")
            elif isinstance(inst, numpy.generic):
                raise GuardRefused("numpy scalars take no BUILD state")
            elif isinstance(inst, numpy.dtype):
                _build_dtype(self, numpy, inst, stack[-1])
                return
        pickle._Unpickler.load_build(self)  # type: ignore[attr-defined]

    dispatch[pickle.BUILD[0]] = load_build

    # NEWOBJ and NEWOBJ_EX would build a guarded class without its guard
    # seeing the arguments: refused, as the C unpickler refuses a non-type
    # there (Python 3.10's C unpickler checks this differently).
    def load_newobj(self) -> None:
        if isinstance(self.stack[-2], Guard):  # type: ignore[attr-defined]
            raise GuardRefused("a guarded class is admitted only through its constructor")
        pickle._Unpickler.load_newobj(self)  # type: ignore[attr-defined]

    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def load_newobj_ex(self) -> None:
        if isinstance(self.stack[-3], Guard):  # type: ignore[attr-defined]
            raise GuardRefused("a guarded class is admitted only through its constructor")
        pickle._Unpickler.load_newobj_ex(self)  # type: ignore[attr-defined]

    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    def frame_left(self) -> bool:
        """True if bytes of the last protocol 4+ frame were left after STOP."""
        frame = getattr(getattr(self, "_unframer", None), "current_frame", None)
        return frame is not None and frame.read(1) != b""


def _admits_numpy(policy: Policy) -> bool:
    """
    True if *policy* could hand a pickle a global of a preset library (numpy,
    dateutil): those loads use the Python unpickler, whose BUILD and NEWOBJ
    can be checked.
    """
    return policy.audit or any(
        module.split(".", 1)[0] in PRESET_MODULES for module in policy.modules()
    )


def _extension_codes(payload: bytes | bytearray | memoryview, policy: Policy) -> list[int]:
    """
    The C unpickler answers EXT1/EXT2/EXT4 from ``copyreg._extension_cache``
    without calling ``find_class``, so an object cached by any earlier load
    in the process (unrestricted, or under another policy) would bypass this
    one.  Only when extension codes are registered at all: check each code
    the payload uses against *policy*, and drop it from the cache so that
    ``find_class`` is asked.  Returns the codes used.
    """
    if not (copyreg._extension_cache or copyreg._inverted_registry):  # type: ignore[attr-defined]
        return []
    codes = [
        arg for op, arg, _ in pickletools.genops(io.BytesIO(payload))
        if op.name in ("EXT1", "EXT2", "EXT4") and isinstance(arg, int)
    ]
    for code in codes:
        pair = copyreg._inverted_registry.get(code)  # type: ignore[attr-defined]
        if pair is not None:
            policy.resolve(*pair)  # raises Refusal
        copyreg._extension_cache.pop(code, None)  # type: ignore[attr-defined]
    return codes


#: Every opcode that can bring a global, an extension object or a persistent
#: object onto the stack: GLOBAL, INST, OBJ, PERSID, BINPERSID, EXT1, EXT2,
#: EXT4, STACK_GLOBAL.  REDUCE, BUILD, NEWOBJ and NEWOBJ_EX need a callable
#: or class from one of these: the other opcodes make only str, bytes,
#: bytearray, int, float, bool, None, list, tuple, dict, set and frozenset.
_GLOBAL_OPCODES = re.compile(rb"[cioPQ\x82\x83\x84\x93]")
_STOP = ord(".")
_FRAMED = struct.Struct("<2sBQ")  # PROTO n, FRAME, frame length


#: The C unpickler of Python versions before gh-115952 trusts sizes a pickle
#: declares.  Its memo is an array that PUT and LONG_BINPUT grow to twice the
#: index they name, filled at once: one 5-byte LONG_BINPUT naming index 2**30
#: makes it fill 16 GiB.  BYTEARRAY8 allocates the length it declares before
#: reading: the Python unpickler (numpy and dateutil policies) fills it with
#: zeros, and when the C unpickler's allocation fails CPython frees a
#: half-made bytearray whose export count was never set (it prints a
#: SystemError through sys.excepthook).  A pickler numbers memo entries from 0, one per opcode at
#: most, and its data is in the payload, so real indices and lengths are
#: below the payload's size.  This matches every LONG_BINPUT naming index
#: 65536 or more, every PUT whose line may hold five digits or more (int()
#: also takes blanks, "+" and "_") and every BYTEARRAY8 of 64 KiB or more, and
#: bytes of data that look like one; only payloads it matches have their
#: opcodes walked (within_bounds).  Three patterns, not one alternation: a
#: pattern that starts with one literal byte is searched for at C speed.
_LARGE_PUT = re.compile(rb"r[\s\S]{2}(?!\x00\x00)[\s\S]{2}")
_LARGE_PUT_LINE = re.compile(rb"p[0-9_+\s]{5}")
_LARGE_BYTEARRAY = re.compile(rb"\x96[\s\S]{2}(?!\x00{6})[\s\S]{6}")
#: Payloads this large are walked without the search first: the search reads
#: every byte, the walk skips the data of each opcode at once.
_WALK_AT_ONCE = 64 * 1024


def _array_memo() -> bool:
    """
    True if this Python's C unpickler grows an array to the index a PUT
    names (fixed by gh-115952, which keeps sparse indices in a dict and reads
    large data in chunks).  The probe names index 2**62: an array that large
    is refused before any allocation (MemoryError); a fixed unpickler loads it.
    """
    try:
        pickle.loads(b"K\x01p4611686018427387904\n.")
    except Exception:
        return True
    return False


_ARRAY_MEMO = _array_memo()

# The opcode walk: per opcode byte, the bytes it takes with its argument
# (> 0), or one of these kinds (<= 0).
_LEN1, _LEN4, _LEN4S, _LEN8, _LINE, _LINES2, _PUT_LINE, _LONG_PUT, _END, _UNKNOWN = range(
    0, -10, -1
)
_WALK = [_UNKNOWN] * 256
for _op in pickletools.opcodes:
    _n = -1 if _op.arg is None else _op.arg.n
    _WALK[ord(_op.code)] = (
        1 if _op.arg is None
        else 1 + _n if _n >= 0
        else {
            pickletools.UP_TO_NEWLINE: _LINE,
            pickletools.TAKEN_FROM_ARGUMENT1: _LEN1,
            pickletools.TAKEN_FROM_ARGUMENT4: _LEN4S,
            pickletools.TAKEN_FROM_ARGUMENT4U: _LEN4,
            pickletools.TAKEN_FROM_ARGUMENT8U: _LEN8,
        }[_n]
    )
_WALK[ord(pickle.GLOBAL)] = _WALK[ord(pickle.INST)] = _LINES2
_WALK[ord(pickle.PUT)] = _PUT_LINE
_WALK[ord(pickle.LONG_BINPUT)] = _LONG_PUT
_WALK[ord(pickle.STOP)] = _END
_WALK[ord(pickle.FRAME)] = 9  # the frame's opcodes follow its 8-byte length


def within_bounds(payload: bytes | bytearray | memoryview) -> bool:
    """
    False if a PUT or LONG_BINPUT of *payload* names a memo index beyond its
    size, or an opcode declares data beyond it (see ``_LARGE_PUT``), or if
    its opcodes cannot be walked to its STOP (the unpickler refuses those too).
    """
    if not _ARRAY_MEMO:
        return True
    if (
        len(payload) < _WALK_AT_ONCE
        and _LARGE_PUT.search(payload) is None
        and _LARGE_PUT_LINE.search(payload) is None
        and _LARGE_BYTEARRAY.search(payload) is None
    ):
        return True
    data = payload if isinstance(payload, bytes) else bytes(payload)
    size = len(data)
    walk = _WALK
    pos = 0
    try:
        while True:
            n = walk[data[pos]]
            if n > 0:
                pos += n
                continue
            if n == _LEN1:
                pos += 2 + data[pos + 1]
            elif n == _LONG_PUT:
                if int.from_bytes(data[pos + 1 : pos + 5], "little") >= size:
                    return False
                pos += 5
            elif n == _END:
                return True
            elif n == _LINE:
                pos = data.index(b"\n", pos) + 1
            elif n == _PUT_LINE:
                end = data.index(b"\n", pos)
                if not 0 <= int(data[pos + 1 : end]) < size:
                    return False
                pos = end + 1
            elif n == _LINES2:
                pos = data.index(b"\n", data.index(b"\n", pos) + 1) + 1
            elif n == _UNKNOWN:
                return False
            else:  # a length of 1, 4 or 8 bytes, then that many bytes
                width = 8 if n == _LEN8 else 4
                length = int.from_bytes(
                    data[pos + 1 : pos + 1 + width], "little", signed=n == _LEN4S
                )
                if length < 0 or length > size:
                    return False
                pos += 1 + width + length
    except (IndexError, ValueError):  # truncated, or a PUT line that is not a number
        return False


def plain_data(payload: bytes | bytearray | memoryview, protocol: int | None = None) -> bool:
    """
    True if *payload* is one protocol 4+ frame, ending at its STOP, in which
    no byte has the value of a global-loading opcode: then no opcode of it
    loads a global, and plain ``pickle.loads`` can build nothing but builtin
    data, exactly as the restricted unpickler would.  Bytes of that value in
    the data (an ``"i"`` in a string) only send the payload the slow way.
    With *protocol*, the pickle must also be of that protocol.
    """
    size = len(payload)
    if size < _FRAMED.size + 1 or payload[-1] != _STOP:
        return False
    proto, op, length = _FRAMED.unpack_from(payload)
    return (
        proto[0] == 0x80
        and (protocol is None or proto[1] == protocol)
        and op == 0x95
        and length == size - _FRAMED.size
        and _GLOBAL_OPCODES.search(payload) is None
        and within_bounds(payload)
    )


class _ViewReader:
    """
    A read-only file over a buffer, for large payloads: ``io.BytesIO`` would
    first copy the whole payload, and the unpickler then reads each large
    bytes object straight into its result with ``readinto``.
    """

    __slots__ = ("_pos", "_text", "_view")

    def __init__(self, payload: bytes | bytearray | memoryview) -> None:
        self._view = memoryview(payload).cast("B")
        self._pos = 0
        self._text: bytes | None = None

    def read(self, n: int = -1) -> bytes:
        start = self._pos
        end = len(self._view) if n < 0 else min(start + n, len(self._view))
        self._pos = end
        return bytes(self._view[start:end])

    def readinto(self, buffer: Any) -> int:
        target = memoryview(buffer).cast("B")
        start = self._pos
        n = min(len(target), len(self._view) - start)
        target[:n] = self._view[start : start + n]
        self._pos = start + n
        return n

    def readline(self) -> bytes:
        # Text opcodes (protocols 0 and 1) only: search a bytes copy, made once.
        if self._text is None:
            self._text = bytes(self._view)
        start = self._pos
        end = self._text.find(b"\n", start)
        end = len(self._text) if end < 0 else end + 1
        self._pos = end
        return self._text[start:end]

    def tell(self) -> int:
        return self._pos


#: Payloads at least this large are read in place, not copied into a BytesIO.
_IN_PLACE = 64 * 1024


def restricted_loads(
    payload: bytes | bytearray | memoryview,
    policy: Policy,
    buffers: list[memoryview] | None = None,
) -> Any:
    """
    Load a pickle, admitting only what *policy* allows.

    Raises :class:`~signedqueue._allowlist.Refusal`, :class:`BudgetExceeded`,
    :class:`GuardRefused` or whatever the pickle machinery raises; the codec
    turns each into a :class:`~signedqueue.RejectedFrame`.
    """
    size = len(payload)
    if not within_bounds(payload):
        raise BudgetExceeded
    file: io.BytesIO | _ViewReader = (
        io.BytesIO(payload) if size < _IN_PLACE else _ViewReader(payload)
    )
    codes = (
        _extension_codes(payload, policy)
        if copyreg._extension_cache or copyreg._inverted_registry  # type: ignore[attr-defined]
        else ()
    )
    kind = policy.__dict__.get("_unpickler_kind")
    if kind is None:  # a policy never changes what it admits: decide once
        kind = CheckedBuildUnpickler if _admits_numpy(policy) else RestrictedUnpickler
        policy.__dict__["_unpickler_kind"] = kind
    budget = size + sum(len(b) for b in buffers) if buffers else size
    unpickler: RestrictedUnpickler | CheckedBuildUnpickler
    if kind is RestrictedUnpickler:
        unpickler = RestrictedUnpickler(file, fix_imports=False, buffers=buffers)
        unpickler._policy = policy
        unpickler._budget_size = BUDGET_FACTOR * budget + BUDGET_SLACK
        unpickler._budget = None
        unpickler._named = []
    else:
        unpickler = CheckedBuildUnpickler(
            file, policy, BUDGET_FACTOR * budget + BUDGET_SLACK, buffers
        )
    try:
        obj = unpickler.load()
    finally:
        for code in codes:  # leave no guard or admitted object in the shared cache
            copyreg._extension_cache.pop(code, None)  # type: ignore[attr-defined]
        if unpickler._named:
            unpickler.check_unchanged()
    # One pickle per payload: a trailing byte is refused, as in the frame.
    # (The C unpickler reads from a BytesIO exactly as far as STOP.)
    # The Python unpickler reads a whole protocol 4+ frame at once: bytes
    # after STOP inside the frame are trailing data too.
    if file.tell() != size or (
        isinstance(unpickler, CheckedBuildUnpickler) and unpickler.frame_left()
    ):
        raise pickle.UnpicklingError("trailing data after the pickle")
    return obj
