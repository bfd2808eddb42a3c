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

import hmac
from typing import Protocol

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = [
    "ALG_AES256_GMAC",
    "ALG_HMAC_SHA256",
    "MAC_IDS",
    "MAC_NAMES",
    "TAG_SIZES",
    "Mac",
    "new_mac",
    "one_shot",
]

ALG_HMAC_SHA256 = 1
ALG_AES256_GMAC = 2

MAC_NAMES = {ALG_HMAC_SHA256: "hmac-sha256", ALG_AES256_GMAC: "aes256-gmac"}
MAC_IDS = {name: alg for alg, name in MAC_NAMES.items()}
TAG_SIZES = {ALG_HMAC_SHA256: 32, ALG_AES256_GMAC: 16}

_IV_SIZE = 12


class Mac(Protocol):
    """An incremental MAC: ``update`` with every signed byte, then ``digest``."""

    def update(self, data: bytes | bytearray | memoryview, /) -> None: ...

    def digest(self) -> bytes: ...


class _Gmac:
    """AES-256-GMAC under a one-frame key (see the module docstring)."""

    __slots__ = ("_encryptor", "update")

    def __init__(self, key: bytes, nonce: bytes) -> None:
        frame_key = hmac.digest(key, nonce, "sha256")
        self._encryptor = Cipher(
            algorithms.AES(frame_key), modes.GCM(nonce[:_IV_SIZE])
        ).encryptor()
        self.update = self._encryptor.authenticate_additional_data

    def digest(self) -> bytes:
        self._encryptor.finalize()
        return self._encryptor.tag


def new_mac(alg: int, key: bytes, nonce: bytes) -> Mac:
    """A fresh incremental MAC of algorithm *alg* for the frame with *nonce*."""
    if alg == ALG_HMAC_SHA256:
        return hmac.new(key, digestmod="sha256")
    if alg == ALG_AES256_GMAC:
        return _Gmac(key, nonce)
    raise ValueError(f"unknown MAC algorithm id {alg}")


def one_shot(alg: int, key: bytes, nonce: bytes, data: bytes | bytearray | memoryview,
             context: bytes) -> bytes:
    """The tag over ``data || context`` in one call (small frames)."""
    if alg == ALG_HMAC_SHA256:
        if context:
            mac = hmac.new(key, data, "sha256")
            mac.update(context)
            return mac.digest()
        return hmac.digest(key, data, "sha256")
    mac2 = new_mac(alg, key, nonce)
    mac2.update(data)
    if context:
        mac2.update(context)
    return mac2.digest()
