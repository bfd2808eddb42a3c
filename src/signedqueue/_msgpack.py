"""
The msgpack serializer: data only, no code, no shared references.

msgpack's own types (None, bool, int, float, str, bytes, list, dict) plus
extension types for tuple, set, frozenset, datetime, date, time, timedelta,
Decimal, UUID and complex, and user classes only through an explicit
registry (dataclasses, attrs classes and NamedTuples), whose fields are
checked on load: the names exactly, and the types wherever the annotation is
one this module can check without running code (see :func:`_compile`).

Every declared length is bounded by the payload size, so a small payload
cannot make the unpacker allocate a large buffer.  Extension values nest
through recursive (un)packing, so their depth is bounded too.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import functools
import inspect
import types
import typing
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import msgpack

from ._allowlist import MAX_NAME_LENGTH
from ._unpickler import GuardRefused

__all__ = ["EXT", "MAX_EXT_DEPTH", "InvalidFields", "MsgpackCodec", "UnregisteredClass"]

#: Extension type codes (wire format v1, serializer 0x02).
EXT = {
    "tuple": 1,
    "set": 2,
    "frozenset": 3,
    "datetime": 4,
    "date": 5,
    "time": 6,
    "timedelta": 7,
    "decimal": 8,
    "uuid": 9,
    "complex": 10,
    "registered": 11,
}

#: How deeply extension values (tuple, set, registered class, ...) may nest.
#: Each level is one more nested call of msgpack's C unpacker, which takes
#: about 45 KiB of C stack: without a bound, a frame of a few hundred bytes
#: overflows the stack and crashes the process.  16 levels fit in 1 MiB.
MAX_EXT_DEPTH = 16

#: A check of one loaded value against a field's annotation.
_Check = Callable[[Any], bool]


@dataclasses.dataclass(frozen=True)
class _Registered:
    """What the codec knows of one registered class."""

    cls: type
    name: str
    #: (init argument, attribute) per field; the wire carries the argument.
    fields: tuple[tuple[str, str], ...]
    #: The init arguments, for comparing with a loaded map's keys.
    arguments: frozenset[str]
    #: Per init argument with a checkable annotation: (check, its description).
    checks: tuple[tuple[str, _Check, str], ...]


def bounded_unpackb(data: bytes | bytearray | memoryview, ext_hook: Any) -> Any:
    """msgpack.unpackb with every declared length bounded by the data's size."""
    n = len(data)
    return msgpack.unpackb(
        data,
        ext_hook=ext_hook,
        raw=False,
        use_list=True,
        strict_map_key=False,
        timestamp=0,
        max_str_len=n,
        max_bin_len=n,
        max_array_len=n,
        max_map_len=n,
        max_ext_len=n,
    )


class MsgpackCodec:
    """msgpack packing and bounded unpacking with signedqueue's extension types."""

    def __init__(self, types: Iterable[type] = ()) -> None:
        self._by_name: dict[str, _Registered] = {}
        self._by_type: dict[type, _Registered] = {}
        #: Every class being registered, by name, for duplicates and annotations.
        self._registering: dict[type, str] = {}
        pending: list[tuple[type, str, tuple[tuple[str, str], ...]]] = []
        for cls in types:
            entry = self._register(cls)
            if entry is not None:
                pending.append(entry)
        # Annotations may name any registered class, so they are compiled
        # once every class is known.
        for cls, name, fields in pending:
            hints = _hints(cls)
            checks: list[tuple[str, _Check, str]] = []
            for argument, attribute in fields:
                if attribute not in hints:
                    continue
                check = self._compile(hints[attribute])
                if check is not None:
                    checks.append((argument, check, _describe(hints[attribute])))
            registered = _Registered(
                cls=cls,
                name=name,
                fields=fields,
                arguments=frozenset(a for a, _ in fields),
                checks=tuple(checks),
            )
            self._by_name[name] = registered
            self._by_type[cls] = registered

    def _register(self, cls: Any) -> tuple[type, str, tuple[tuple[str, str], ...]] | None:
        if not isinstance(cls, type):
            raise TypeError(f"msgpack_types takes classes, not {type(cls).__name__}")
        name = f"{cls.__module__}.{cls.__qualname__}"
        if "<locals>" in cls.__qualname__:
            raise TypeError(
                f"{name} cannot be registered for msgpack: it is defined inside a "
                "function, so its name does not identify it; define it at module level"
            )
        fields = _fields(cls)
        if fields is None:
            raise TypeError(
                f"{name} cannot be registered for msgpack: register dataclasses, "
                "attrs classes or NamedTuples"
            )
        _check_signature(cls, name, fields)
        if cls in self._registering:
            return None  # the same class twice: harmless
        if name in self._registering.values():
            raise TypeError(
                f"two different classes named {name} were registered for msgpack; "
                "the wire names a class by its module and qualified name"
            )
        self._registering[cls] = name
        return cls, name, fields

    def _compile(self, hint: Any) -> _Check | None:
        """A check of a loaded value against *hint*, or None if it is not checked."""
        if hint is None or hint is type(None):
            return _is_none
        if isinstance(hint, typing.NewType):
            return self._compile(hint.__supertype__)
        if hint is Any or hint is object:
            return None
        origin = typing.get_origin(hint)
        args = typing.get_args(hint)
        if origin is typing.Union or origin is types.UnionType:
            members = [self._compile(arg) for arg in args]
            if any(m is None for m in members):
                return None
            checks = typing.cast("list[_Check]", members)
            return lambda v: any(check(v) for check in checks)
        if origin is tuple and not args and hint is not typing.Tuple:  # noqa: UP006
            return functools.partial(_fixed, ())  # tuple[()] on Python 3.11+
        if origin is not None and isinstance(origin, type) and not args:
            return self._compile(origin)
        if origin in (list, set, frozenset):
            item = self._compile(args[0])
            return functools.partial(_items, origin, item)
        if origin is dict:
            key, value = self._compile(args[0]), self._compile(args[1])
            return functools.partial(_mapping, key, value)
        if origin is tuple:
            if len(args) == 2 and args[1] is Ellipsis:
                return functools.partial(_items, tuple, self._compile(args[0]))
            if args == ((),):  # Tuple[()] on Python 3.10
                args = ()
            return functools.partial(_fixed, tuple(self._compile(a) for a in args))
        if origin is not None:
            # A subscripted registered class is checked as the class;
            # other generics (Sequence[int], Literal, Callable...) are not.
            return self._compile(origin) if origin in self._registering else None
        if not isinstance(hint, type):
            return None  # TypeVars, unresolved forward references...
        special = _SPECIAL.get(hint)
        if special is not None:
            return special
        if type(hint) is type or hint in self._registering:
            # A plain class (no metaclass of its own, whose isinstance could
            # run code): the exact types the wire produces must inherit it.
            return functools.partial(_inherits, hint)
        return None  # ABCs, protocols, enums: not checked

    # -- packing -----------------------------------------------------------

    def packb(self, obj: Any, _depth: int = 0) -> bytes:
        if _depth > MAX_EXT_DEPTH:
            raise ValueError(
                "msgpack cannot serialize tuples, sets or registered classes "
                f"nested more than {MAX_EXT_DEPTH} deep"
            )
        return msgpack.packb(  # type: ignore[no-any-return]
            obj,
            default=functools.partial(self._default, _depth),
            use_bin_type=True,
            strict_types=True,
            datetime=False,
        )

    def _pack_inner(self, obj: Any, depth: int) -> bytes:
        return self.packb(obj, depth + 1)

    def _default(self, depth: int, obj: Any) -> msgpack.ExtType:
        kind = type(obj)
        ext = msgpack.ExtType
        if kind is tuple:
            return ext(EXT["tuple"], self._pack_inner(list(obj), depth))
        if kind is set:
            return ext(EXT["set"], self._pack_inner(list(obj), depth))
        if kind is frozenset:
            return ext(EXT["frozenset"], self._pack_inner(list(obj), depth))
        if kind is datetime.datetime:
            return ext(EXT["datetime"], obj.isoformat().encode())
        if kind is datetime.date:
            return ext(EXT["date"], obj.isoformat().encode())
        if kind is datetime.time:
            return ext(EXT["time"], obj.isoformat().encode())
        if kind is datetime.timedelta:
            return ext(
                EXT["timedelta"],
                self._pack_inner([obj.days, obj.seconds, obj.microseconds], depth),
            )
        if kind is decimal.Decimal:
            return ext(EXT["decimal"], str(obj).encode())
        if kind is uuid.UUID:
            return ext(EXT["uuid"], obj.bytes)
        if kind is complex:
            return ext(EXT["complex"], self._pack_inner([obj.real, obj.imag], depth))
        registered = self._by_type.get(kind)
        if registered is not None:
            values = {arg: getattr(obj, attr) for arg, attr in registered.fields}
            return ext(EXT["registered"], self._pack_inner([registered.name, values], depth))
        raise TypeError(
            f"msgpack cannot serialize {kind.__module__}.{kind.__qualname__}; "
            "register dataclasses, attrs classes and NamedTuples with "
            "msgpack_types=[...], or use serializer='pickle'"
        )

    # -- unpacking ---------------------------------------------------------

    def unpackb(self, data: bytes | bytearray | memoryview, _depth: int = 0) -> Any:
        if _depth > MAX_EXT_DEPTH:
            # The codec reports this as "nested too deeply" (MalformedFrame).
            raise RecursionError(f"extension values nested more than {MAX_EXT_DEPTH} deep")
        return bounded_unpackb(data, functools.partial(self._ext_hook, _depth))

    def _ext_hook(self, depth: int, code: int, data: bytes) -> Any:
        if code == EXT["tuple"]:
            return tuple(self._inner(data, list, depth))
        if code == EXT["set"]:
            return set(self._inner(data, list, depth))
        if code == EXT["frozenset"]:
            return frozenset(self._inner(data, list, depth))
        if code == EXT["datetime"]:
            return datetime.datetime.fromisoformat(data.decode())
        if code == EXT["date"]:
            return datetime.date.fromisoformat(data.decode())
        if code == EXT["time"]:
            return datetime.time.fromisoformat(data.decode())
        if code == EXT["timedelta"]:
            days, seconds, micros = self._inner(data, list, depth)
            return datetime.timedelta(days=days, seconds=seconds, microseconds=micros)
        if code == EXT["decimal"]:
            return decimal.Decimal(data.decode())
        if code == EXT["uuid"]:
            return uuid.UUID(bytes=data)
        if code == EXT["complex"]:
            real, imag = self._inner(data, list, depth)
            if type(real) is not float or type(imag) is not float:
                raise ValueError("complex parts must be floats")
            return complex(real, imag)
        if code == EXT["registered"]:
            name, values = self._inner(data, list, depth)
            return self._construct(name, values)
        raise ValueError(f"unknown msgpack extension type {code}")

    def _inner(self, data: bytes, kind: type, depth: int) -> Any:
        value = self.unpackb(data, depth + 1)
        if type(value) is not kind:
            raise ValueError("malformed extension value")
        return value

    def _construct(self, name: object, values: object) -> Any:
        if not isinstance(name, str) or not isinstance(values, dict):
            raise ValueError("malformed registered-class value")
        registered = self._by_name.get(name)
        if registered is None:
            # The name ends up in the refusal and the log: never echo a long one.
            raise UnregisteredClass(name if len(name) <= MAX_NAME_LENGTH else repr(name)[:80])
        # Refusals name the class and its registered fields, never a value
        # or a key the payload chose.
        if not all(type(key) is str for key in values) or set(values) != registered.arguments:
            missing = [arg for arg, _ in registered.fields if arg not in values]
            extra = sum(1 for key in values if key not in registered.arguments)
            what = [f"missing {', '.join(map(repr, missing))}"] if missing else []
            if extra:
                what.append(f"{extra} unknown")
            raise InvalidFields(
                f"the fields of {name} do not match its registration ({'; '.join(what)})"
            )
        for argument, check, expected in registered.checks:
            value = values[argument]
            if not check(value):
                raise InvalidFields(
                    f"field {argument!r} of {name} does not match its annotation "
                    f"{expected} (a {type(value).__qualname__} was sent)"
                )
        try:
            return registered.cls(**values)
        except RecursionError:
            raise
        except Exception as exc:
            # The user's message may quote the values: keep only its type.
            raise InvalidFields(
                f"{name} refused its fields: it raised {type(exc).__name__}"
            ) from None


class UnregisteredClass(LookupError):
    """Internal: a msgpack frame names a class that is not registered."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class InvalidFields(GuardRefused):
    """
    Internal: a registered-class value's fields were refused.

    A GuardRefused, which the codec reports as MalformedFrame with this
    message: the payload called a constructor (the registered class) in a
    refused form.
    """


# -- registration ------------------------------------------------------------


def _fields(cls: type) -> tuple[tuple[str, str], ...] | None:
    """(init argument, attribute) per field of a registrable *cls*, else None."""
    if dataclasses.is_dataclass(cls):
        return tuple((f.name, f.name) for f in dataclasses.fields(cls) if f.init)
    names = getattr(cls, "_fields", None)
    if issubclass(cls, tuple) and isinstance(names, tuple):
        return tuple((f, f) for f in names)
    try:
        import attrs
    except ImportError:  # pragma: no cover - attrs is optional
        return None
    if attrs.has(cls):
        return tuple(
            (getattr(a, "alias", None) or a.name.lstrip("_"), a.name)
            for a in attrs.fields(cls)
            if a.init
        )
    return None


def _check_signature(cls: type, name: str, fields: tuple[tuple[str, str], ...]) -> None:
    """Refuse a class that cannot be called with exactly its fields as keywords."""
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):  # pragma: no cover - no signature to compare
        return
    arguments = {arg for arg, _ in fields}
    parameters = signature.parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    for arg in arguments:
        p = parameters.get(arg)
        if (p is None and not takes_any) or (
            p is not None and p.kind in (p.POSITIONAL_ONLY, p.VAR_POSITIONAL)
        ):
            raise TypeError(
                f"{name} cannot be registered for msgpack: its constructor does not "
                f"take its field {arg!r} as a keyword"
            )
    for p in parameters.values():
        required = p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        if required and p.name not in arguments:
            raise TypeError(
                f"{name} cannot be registered for msgpack: its constructor requires "
                f"{p.name!r}, which is not a field (an InitVar?)"
            )


def _hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of *cls*; those that do not resolve are left out."""
    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: S110 - fall back to resolving one annotation at a time
        pass
    hints: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        for field, annotation in inspect.get_annotations(klass).items():
            hints.pop(field, None)
            shim = type("_", (), {"__annotations__": {field: annotation}})
            shim.__module__ = klass.__module__
            try:
                hints.update(typing.get_type_hints(shim, localns=dict(vars(klass))))
            except Exception:  # noqa: S112 - an unresolvable annotation is not checked
                continue
    return hints


def _describe(hint: Any) -> str:
    if hint is type(None):
        return "None"
    if isinstance(hint, type):
        return hint.__qualname__
    return repr(hint).replace("typing.", "")


# -- checks --------------------------------------------------------------------
# Loaded values have exact types (the wire carries no subclass of a built-in),
# so inheritance is read from the type's __mro__: no isinstance, whose
# metaclass hooks could run code.


def _inherits(cls: type, value: Any) -> bool:
    return cls in type(value).__mro__


def _is_none(value: Any) -> bool:
    return value is None


def _is_int(value: Any) -> bool:
    return type(value) is not bool and int in type(value).__mro__


def _is_float(value: Any) -> bool:
    return _is_int(value) or float in type(value).__mro__


def _is_complex(value: Any) -> bool:
    return _is_float(value) or complex in type(value).__mro__


def _is_bytes(value: Any) -> bool:
    # A bytearray travels as msgpack bin and loads as bytes.
    return bytes in type(value).__mro__ or bytearray in type(value).__mro__


_SPECIAL: dict[type, _Check] = {
    int: _is_int,  # bool is refused for an int field
    float: _is_float,  # an int is accepted for a float field (not a bool)
    complex: _is_complex,
    bytearray: _is_bytes,
}


def _items(kind: type, item: _Check | None, value: Any) -> bool:
    if kind not in type(value).__mro__:
        return False
    return item is None or all(item(x) for x in value)


def _mapping(key: _Check | None, item: _Check | None, value: Any) -> bool:
    if dict not in type(value).__mro__:
        return False
    return (key is None or all(key(k) for k in value)) and (
        item is None or all(item(v) for v in value.values())
    )


def _fixed(items: tuple[_Check | None, ...], value: Any) -> bool:
    if tuple not in type(value).__mro__ or len(value) != len(items):
        return False
    return all(check is None or check(x) for check, x in zip(items, value, strict=True))
