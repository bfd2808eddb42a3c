"""
Serializers: how a payload is made from an object and back.

Each serializer has a wire id (see :mod:`signedqueue._frame`) and a one-byte
parameter (the pickle protocol; 0 for msgpack).  Loading happens only after
the codec has verified the frame's tag.

* ``pickle``: restricted unpickling through the allowlist policy, or plain
  ``pickle.loads`` when the codec was built with
  ``unsafe_trust_signed_frames=True``.
* ``msgpack``: data only; see :mod:`signedqueue._msgpack`.
* ``cloudpickle``: code (lambdas, closures).  Loading it is full trust, so the
  codec demands ``unsafe_trust_signed_frames=True``.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from typing import Any

from . import _frame
from ._allowlist import Policy
from ._msgpack import MsgpackCodec
from ._unpickler import plain_data, restricted_loads

__all__ = ["DEFAULT_PROTOCOL", "Serializer", "make_serializer"]

#: The pickle protocol frames are written with unless ``protocol=`` says
#: otherwise: 5, supported by every Python signedqueue runs on.
DEFAULT_PROTOCOL = 5


class Serializer:
    """Base class.  ``dumps`` returns (payload, param)."""

    id: int
    name: str

    def dumps(self, obj: Any) -> tuple[bytes, int]:
        raise NotImplementedError

    def dumps_oob(self, obj: Any) -> tuple[bytes | list[Buffer], int, list[memoryview]]:
        """
        ``dumps`` with large buffers left out of band where the serializer
        can (pickle protocol 5): (payload, param, buffers).  The buffers are
        views of the object's own memory, not copies.  The payload may come
        as a list of parts to be sent one after the other (a large top-level
        ``bytes`` is then one of them, not copied).
        """
        payload, param = self.dumps(obj)
        return payload, param, []

    def param_for(self, payload: bytes | bytearray | memoryview) -> int:
        """The header parameter for an already serialized payload (``seal``)."""
        return 0

    def loads(
        self, payload: memoryview, param: int, buffers: list[memoryview] | None = None
    ) -> Any:
        raise NotImplementedError


Buffer = bytes | bytearray | memoryview
#: Top-level objects of these types, at least this large, are pickled as
#: parts without copying them.
#: (Not bytearray: the caller could not resize it until the frame is written.)
_BLOBS = (bytes, str)
_BLOB_SIZE = 64 * 1024


class _Parts:
    """A write-only file that keeps what it is given, in order, uncopied."""

    __slots__ = ("parts",)

    def __init__(self) -> None:
        self.parts: list[Buffer] = []

    def write(self, data: Buffer) -> int:
        self.parts.append(data)
        return len(data)


class UnsupportedProtocol(Exception):
    """Internal: the frame's pickle protocol is unsupported or inconsistent."""


class _PickleFamily(Serializer):
    def __init__(self, protocol: int) -> None:
        if not 0 <= protocol <= pickle.HIGHEST_PROTOCOL:
            raise ValueError(
                f"pickle protocol {protocol} is not supported here "
                f"(0 to {pickle.HIGHEST_PROTOCOL})"
            )
        self.protocol = protocol

    def _pickle(self, obj: Any, buffer_callback: Any) -> bytes:
        raise NotImplementedError

    def _pickler(self, file: _Parts, buffer_callback: Any) -> pickle.Pickler:
        return pickle.Pickler(
            file, self.protocol, fix_imports=False, buffer_callback=buffer_callback
        )

    def dumps(self, obj: Any) -> tuple[bytes, int]:
        return self._pickle(obj, None), self.protocol

    def dumps_oob(self, obj: Any) -> tuple[bytes | list[Buffer], int, list[memoryview]]:
        if self.protocol < 5:
            return self._pickle(obj, None), self.protocol, []
        buffers: list[pickle.PickleBuffer] = []
        payload: bytes | list[Buffer]
        if type(obj) in _BLOBS and len(obj) >= _BLOB_SIZE:
            # The pickler hands a large bytes object to its file as it is:
            # collect the writes instead of copying the blob into a pickle.
            parts = _Parts()
            self._pickler(parts, buffers.append).dump(obj)
            payload = parts.parts
        else:
            payload = self._pickle(obj, buffers.append)
        if not buffers:
            return payload, self.protocol, []
        if len(buffers) > _frame.MAX_BUFFERS:
            # More buffers than a frame may lay out: all of them in band.
            return self._pickle(obj, None), self.protocol, []
        return payload, _frame.OUT_OF_BAND | 5, [b.raw() for b in buffers]

    def param_for(self, payload: bytes | bytearray | memoryview) -> int:
        # Protocols 2 and up start with PROTO n; 0 and 1 carry no marker.
        # A raw payload has no out-of-band buffers: a byte with the flag bit
        # set is not written as the flag (such a payload is not a pickle of
        # any protocol, and loading refuses it as UnsupportedProtocol).
        if len(payload) >= 2 and payload[0] == 0x80:
            return int(payload[1]) & ~_frame.OUT_OF_BAND
        return 0

    @staticmethod
    def check_param(param: int, payload: memoryview) -> None:
        param &= ~_frame.OUT_OF_BAND  # the frame parser checked the flag
        if param > pickle.HIGHEST_PROTOCOL:
            raise UnsupportedProtocol(
                f"the frame uses pickle protocol {param}, newer than this Python "
                f"reads (up to {pickle.HIGHEST_PROTOCOL}); upgrade Python on the "
                "consumer or set protocol= lower on the producer"
            )
        marked = len(payload) >= 2 and payload[0] == 0x80
        if (param >= 2) != marked or (marked and payload[1] != param):
            raise UnsupportedProtocol(
                f"the frame header says pickle protocol {param} but the payload "
                "does not start with that protocol's marker"
            )


class PickleSerializer(_PickleFamily):
    id = _frame.SERIALIZER_PICKLE
    name = "pickle"

    def __init__(self, protocol: int, policy: Policy | None) -> None:
        super().__init__(protocol)
        self.policy = policy  # None: full trust (unsafe_trust_signed_frames)

    def _pickle(self, obj: Any, buffer_callback: Any) -> bytes:
        return pickle.dumps(
            obj, self.protocol, fix_imports=False, buffer_callback=buffer_callback
        )

    def loads(
        self, payload: memoryview, param: int, buffers: list[memoryview] | None = None
    ) -> Any:
        self.check_param(param, payload)
        if self.policy is None:
            return pickle.loads(payload, buffers=buffers)
        if buffers is None and plain_data(payload):
            return pickle.loads(payload)
        return restricted_loads(payload, self.policy, buffers)


class CloudpickleSerializer(_PickleFamily):
    id = _frame.SERIALIZER_CLOUDPICKLE
    name = "cloudpickle"

    def __init__(self, protocol: int) -> None:
        super().__init__(protocol)
        try:
            import cloudpickle
        except ImportError:
            raise ImportError(
                "serializer='cloudpickle' needs the cloudpickle package: "
                "pip install 'signedqueue[cloudpickle]'"
            ) from None
        self._dumps = cloudpickle.dumps

    def _pickle(self, obj: Any, buffer_callback: Any) -> bytes:
        return self._dumps(  # type: ignore[no-any-return]
            obj, protocol=self.protocol, buffer_callback=buffer_callback
        )

    def loads(
        self, payload: memoryview, param: int, buffers: list[memoryview] | None = None
    ) -> Any:
        self.check_param(param, payload)
        return pickle.loads(payload, buffers=buffers)


class MsgpackSerializer(Serializer):
    id = _frame.SERIALIZER_MSGPACK
    name = "msgpack"

    def __init__(self, types: Iterable[type]) -> None:
        self._codec = MsgpackCodec(types)

    def dumps(self, obj: Any) -> tuple[bytes, int]:
        return self._codec.packb(obj), 0

    def loads(
        self, payload: memoryview, param: int, buffers: list[memoryview] | None = None
    ) -> Any:
        return self._codec.unpackb(payload)


SERIALIZERS = ("pickle", "msgpack", "cloudpickle")


def make_serializer(
    name: str,
    *,
    protocol: int,
    policy: Policy | None,
    msgpack_types: Iterable[type],
) -> Serializer:
    if name == "pickle":
        return PickleSerializer(protocol, policy)
    if name == "msgpack":
        return MsgpackSerializer(msgpack_types)
    if name == "cloudpickle":
        return CloudpickleSerializer(protocol)
    raise ValueError(f"unknown serializer {name!r}; use one of {', '.join(SERIALIZERS)}")
