"""
The MAC algorithms a frame may name in its header, and nothing else.

* ``hmac-sha256`` (id 1, the default): HMAC-SHA256 under the key's HKDF
  sub-key; 32-byte tag.
* ``aes256-gmac`` (id 2, the fast option for large payloads): GMAC, the
  authentication-only mode of AES-GCM (NIST SP 800-38D), under a key used
  for one frame only: ``K_frame = HMAC-SHA256(K_gmac, nonce)``, IV = the
  first 12 bytes of the nonce; 16-byte tag.  The security argument is in
  docs/explanation/wire-format.md.

Each algorithm's sub-key is derived from the stored secret with its own HKDF
``info`` (:mod:`signedqueue._keys`), so a tag of one can never be replayed as
a tag of the other.
"""

from __future__ import annotations

import hashlib
from typing import Any, Protocol

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = [
    "ALG_AES256_GMAC",
    "ALG_HMAC_SHA256",
    "MAC_IDS",
    "MAC_NAMES",
    "TAG_SIZES",
    "Mac",
    "MacKey",
    "new_mac",
    "one_shot",
]

ALG_HMAC_SHA256 = 1
ALG_AES256_GMAC = 2

MAC_NAMES = {ALG_HMAC_SHA256: "hmac-sha256", ALG_AES256_GMAC: "aes256-gmac"}
MAC_IDS = {name: alg for alg, name in MAC_NAMES.items()}
TAG_SIZES = {ALG_HMAC_SHA256: 32, ALG_AES256_GMAC: 16}

_IV_SIZE = 12
#: hashlib releases the GIL for updates of this many bytes or more.
_GIL_FREE = 2048
#: Up to this size a tag is computed without releasing the GIL.
_HOLD_GIL_BELOW = 64 * 1024
#: From this size (larger than CPU caches) a buffer is hashed through a
#: scratch buffer of _SCRATCH.
_THROUGH_SCRATCH = 16 * 1024 * 1024
_SCRATCH = 256 * 1024


class Mac(Protocol):
    """An incremental MAC: ``update`` with every signed byte, then ``digest``."""

    def update(self, data: bytes | bytearray | memoryview, /) -> None: ...

    def digest(self) -> bytes: ...


class MacKey:
    """
    A 32-byte HMAC-SHA256 key with its two padded blocks hashed once
    (RFC 2104, section 4): each tag then costs only the message's own
    compressions.  The same HMAC-SHA256, computed without re-keying.
    """

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes) -> None:
        if len(key) > 64:  # pragma: no cover - sub-keys are 32 bytes
            key = hashlib.sha256(key).digest()
        block = key.ljust(64, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in block))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in block))

    def __repr__(self) -> str:
        return "<MacKey>"  # never the key

    def hmac(self, data: bytes | bytearray | memoryview, context: bytes = b"") -> bytes:
        """HMAC-SHA256 over ``data || context``."""
        inner = self._inner.copy()
        size = len(data)
        if size < _GIL_FREE:  # the common case first
            inner.update(data)
        elif size < _HOLD_GIL_BELOW:
            # hashlib lets other threads run while it hashes 2 KiB or more;
            # for a small frame the hand-over to the queue's feeder thread
            # and back costs more than the hash: feed it below that size.
            view = memoryview(data)
            for start in range(0, size, _GIL_FREE - 1):
                inner.update(view[start : start + _GIL_FREE - 1])
        elif size >= _THROUGH_SCRATCH:
            # Hashing a large buffer straight from memory runs at about 2/3
            # of the speed of copying it through a small cache-resident
            # buffer and hashing that: same bytes, same tag, less time.
            view = memoryview(data).cast("B")
            scratch = memoryview(bytearray(_SCRATCH))
            for start in range(0, size, _SCRATCH):
                piece = scratch[: min(_SCRATCH, size - start)]
                piece[:] = view[start : start + len(piece)]
                inner.update(piece)
        else:
            inner.update(data)
        if context:
            inner.update(context)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()

    def new(self) -> _Hmac:
        """An incremental HMAC-SHA256."""
        return _Hmac(self._inner.copy(), self._outer)


class _Hmac:
    __slots__ = ("_inner", "_outer", "update")

    def __init__(self, inner: Any, outer: Any) -> None:
        self._inner = inner
        self._outer = outer
        self.update = inner.update

    def digest(self) -> bytes:
        outer = self._outer.copy()
        outer.update(self._inner.digest())
        return outer.digest()  # type: ignore[no-any-return]


class _Gmac:
    """AES-256-GMAC under a one-frame key (see the module docstring)."""

    __slots__ = ("_encryptor", "update")

    def __init__(self, key: MacKey, nonce: bytes) -> None:
        frame_key = key.hmac(nonce)
        self._encryptor = Cipher(
            algorithms.AES(frame_key), modes.GCM(nonce[:_IV_SIZE])
        ).encryptor()
        self.update = self._encryptor.authenticate_additional_data

    def digest(self) -> bytes:
        self._encryptor.finalize()
        return self._encryptor.tag


def new_mac(alg: int, key: MacKey, nonce: bytes) -> Mac:
    """A fresh incremental MAC of algorithm *alg* for the frame with *nonce*."""
    if alg == ALG_HMAC_SHA256:
        return key.new()
    if alg == ALG_AES256_GMAC:
        return _Gmac(key, nonce)
    raise ValueError(f"unknown MAC algorithm id {alg}")


def one_shot(alg: int, key: MacKey, nonce: bytes, data: bytes | bytearray | memoryview,
             context: bytes) -> bytes:
    """The tag over ``data || context`` in one call (small frames)."""
    if alg == ALG_HMAC_SHA256:
        return key.hmac(data, context)
    mac = _Gmac(key, nonce)
    mac.update(data)
    if context:
        mac.update(context)
    return mac.digest()
