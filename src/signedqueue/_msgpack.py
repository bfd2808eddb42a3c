"""
The msgpack serializer: data only, no code, no shared references.

msgpack's own types (None, bool, int, float, str, bytes, list, dict) plus
extension types for tuple, set, frozenset, datetime, date, time, timedelta,
Decimal, UUID and complex, and user classes only through an explicit
registry (dataclasses and NamedTuples), whose fields are checked on load.

Every declared length is bounded by the payload size, so a small payload
cannot make the unpacker allocate a large buffer.  Extension values nest
through recursive (un)packing, so their depth is bounded too.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import functools
import uuid
from collections.abc import Iterable
from typing import Any

import msgpack

from ._allowlist import MAX_NAME_LENGTH

__all__ = ["EXT", "MAX_EXT_DEPTH", "MsgpackCodec", "UnregisteredClass"]

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


class MsgpackCodec:
    """msgpack packing and bounded unpacking with signedqueue's extension types."""

    def __init__(self, types: Iterable[type] = ()) -> None:
        self._by_name: dict[str, type] = {}
        self._fields: dict[type, tuple[str, ...]] = {}
        for cls in types:
            self._register(cls)

    def _register(self, cls: type) -> None:
        if not isinstance(cls, type):
            raise TypeError(f"msgpack_types takes classes, not {type(cls).__name__}")
        if dataclasses.is_dataclass(cls):
            fields = tuple(f.name for f in dataclasses.fields(cls) if f.init)
        elif issubclass(cls, tuple) and hasattr(cls, "_fields"):
            fields = tuple(cls._fields)
        else:
            raise TypeError(
                f"{cls.__qualname__} cannot be registered for msgpack: register "
                "dataclasses or NamedTuples"
            )
        name = f"{cls.__module__}.{cls.__qualname__}"
        self._by_name[name] = cls
        self._fields[cls] = fields

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
        fields = self._fields.get(kind)
        if fields is not None:
            name = f"{kind.__module__}.{kind.__qualname__}"
            values = {f: getattr(obj, f) for f in fields}
            return ext(EXT["registered"], self._pack_inner([name, values], depth))
        raise TypeError(
            f"msgpack cannot serialize {kind.__module__}.{kind.__qualname__}; "
            "register dataclasses and NamedTuples with msgpack_types=[...], or "
            "use serializer='pickle'"
        )

    # -- unpacking ---------------------------------------------------------

    def unpackb(self, data: bytes | bytearray | memoryview, _depth: int = 0) -> Any:
        if _depth > MAX_EXT_DEPTH:
            # The codec reports this as "nested too deeply" (MalformedFrame).
            raise RecursionError(f"extension values nested more than {MAX_EXT_DEPTH} deep")
        n = len(data)
        return msgpack.unpackb(
            data,
            ext_hook=functools.partial(self._ext_hook, _depth),
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
        cls = self._by_name.get(name)
        if cls is None:
            # The name ends up in the refusal and the log: never echo a long one.
            raise UnregisteredClass(name if len(name) <= MAX_NAME_LENGTH else repr(name)[:80])
        fields = self._fields[cls]
        if set(values) != set(fields):
            raise ValueError(f"fields of {name!r} do not match its registration")
        return cls(**values)


class UnregisteredClass(LookupError):
    """Internal: a msgpack frame names a class that is not registered."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name
