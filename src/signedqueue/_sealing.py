"""
Large frames as pieces: signed while they are written, never concatenated.

A :class:`Sealing` is a frame whose header and payload pieces are known but
whose tag is not computed yet.  The writer (a pipe, a shared-memory segment,
or :meth:`Sealing.to_bytes`) hashes each chunk as it writes it, so the tag
covers exactly the bytes that went out, and the pieces, which may be views of
the caller's own buffers (pickle protocol 5 out-of-band data), are read once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from ._mac import Mac, MacKey, new_mac

__all__ = ["CHUNK", "Sealing", "chunks_of"]

#: Bytes hashed and moved at a time: small enough to stay in the CPU cache
#: between the copy and the hash.
CHUNK = 256 * 1024

Buffer = bytes | bytearray | memoryview


def chunks_of(pieces: list[memoryview], chunk: int = CHUNK) -> Iterator[memoryview]:
    """Every piece cut into views of at most *chunk* bytes, in order."""
    for piece in pieces:
        size = len(piece)
        if size <= chunk:
            if size:
                yield piece
            continue
        for start in range(0, size, chunk):
            yield piece[start : start + chunk]


class Sealing:
    """A frame to be written: header and payload pieces, tag still to come."""

    __slots__ = ("_alg", "_context", "_key", "_nonce", "pieces", "size")

    def __init__(
        self, pieces: list[memoryview], alg: int, key: MacKey, nonce: bytes, context: bytes,
        tag_size: int,
    ) -> None:
        #: Everything before the tag, in order (header first).
        self.pieces = pieces
        #: The whole frame's size, tag included.
        self.size = sum(len(p) for p in pieces) + tag_size
        self._alg = alg
        self._key = key
        self._nonce = nonce
        self._context = context

    def mac(self) -> Mac:
        """A fresh MAC for this frame; feed it every byte before the tag."""
        return new_mac(self._alg, self._key, self._nonce)

    def finish(self, mac: Mac) -> bytes:
        """The tag, once *mac* has seen every byte of :attr:`pieces`."""
        if self._context:
            mac.update(self._context)
        return mac.digest()

    def stream(self, write: Callable[[memoryview], Any]) -> None:
        """
        *write* and hash each chunk in order, then write the tag.  Hashing
        a chunk right after it was copied out finds it in the CPU cache.
        """
        mac = self.mac()
        update = mac.update
        for view in chunks_of(self.pieces):
            write(view)
            update(view)
        write(memoryview(self.finish(mac)))

    def to_bytes(self) -> bytes:
        """The frame as one ``bytes`` (one copy of the payload)."""
        mac = self.mac()
        for view in chunks_of(self.pieces):
            mac.update(view)
        self.pieces.append(memoryview(self.finish(mac)))
        try:
            return b"".join(self.pieces)
        finally:
            self.pieces.pop()
