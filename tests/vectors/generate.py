#!/usr/bin/env python3
"""
Reference implementation of signedqueue wire format v1, and the generator of
the test vectors beside it (frames_valid.json, frames_invalid.json, keys.json).

This file is written from the format specification alone and deliberately
does not import signedqueue: the library is checked against these vectors,
never the other way round.  It uses only struct, hmac, hashlib and the HKDF and
AES-GCM of the cryptography package; the key derivation vectors are computed by an HKDF
written here from RFC 5869 (checked against the RFC's own test cases) and
cross-checked with the cryptography package's, and the GMAC tags by a GHASH
written here from NIST SP 800-38D over the cryptography package's raw AES
block (checked against a published GCM test case and the cryptography
package's AES-GCM).  Everything is fixed (secrets, nonces, creation
times, the consumer's clock), so the output is byte-for-byte reproducible.

Usage::

    python tests/vectors/generate.py           # rewrite the JSON files
    python tests/vectors/generate.py --check   # exit 1 if they are stale

The format, in brief::

    magic b"SQ" | version 0x01 | MAC alg (0x01 or 0x02) | serializer id
    | serializer param | key id length L (1..64)
    | key id (L bytes of [A-Za-z0-9._-])
    | created (uint64 BE, ms since the epoch) | nonce (16)
    | payload length N (uint64 BE) | payload (N) | tag (32 or 16)

    alg 0x01 HMAC-SHA256, 32-byte tag:
        K   = HKDF-SHA256(secret, salt=None, info=INFO, length=32)
        tag = HMAC-SHA256(K, every byte before the tag || context)
    alg 0x02 AES-256-GMAC, 16-byte tag:
        K_gmac  = HKDF-SHA256(secret, salt=None, info=GMAC_INFO, length=32)
        K_frame = HMAC-SHA256(K_gmac, nonce)
        tag     = AES-256-GCM(K_frame, IV=nonce[0:12], plaintext=b"",
                              AAD=every byte before the tag || context).tag

    serializer param 0x85 (pickle protocol 5 with out-of-band buffers):
        payload = u32 BE n (1..65536) | n x u64 BE buffer lengths
                  | u64 BE pickle length P | pickle (P)
                  | for each buffer: zero padding up to the next multiple of
                    64 counted from the start of the frame, then the buffer
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import pickle
import re
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

# -- the specification ------------------------------------------------------

MAGIC = b"SQ"
VERSION = 0x01
ALG_HMAC_SHA256 = 0x01
ALG_AES256_GMAC = 0x02
MAC_NAMES = {ALG_HMAC_SHA256: "hmac-sha256", ALG_AES256_GMAC: "aes256-gmac"}
SERIALIZERS = {"pickle": 0x01, "msgpack": 0x02, "cloudpickle": 0x03}
PICKLE_FAMILY = (0x01, 0x03)
INFO = b"signedqueue v1 frame-mac hmac-sha256"
GMAC_INFO = b"signedqueue v1 frame-mac aes256-gmac"
INFOS = {ALG_HMAC_SHA256: INFO, ALG_AES256_GMAC: GMAC_INFO}
NONCE_SIZE = 16
TAG_SIZE = 32  # HMAC-SHA256
TAG_SIZES = {ALG_HMAC_SHA256: 32, ALG_AES256_GMAC: 16}
GMAC_IV_SIZE = 12
OUT_OF_BAND = 0x80
OOB_PARAM = OUT_OF_BAND | 5
BUFFER_ALIGN = 64
MAX_BUFFERS = 65536
MAX_KEY_ID = 64
KEY_ID_RE = re.compile(rb"[A-Za-z0-9._-]+\Z")
DEFAULT_CLOCK_SKEW = 60.0
DEFAULT_MAX_FRAME_SIZE = 128 * 1024 * 1024


def mac_key(secret: bytes, alg: int = ALG_HMAC_SHA256) -> bytes:
    """The sub-key of MAC algorithm *alg*: HKDF-SHA256 over the stored secret."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=INFOS[alg]).derive(secret)


def hkdf_sha256(ikm: bytes, salt: bytes | None, info: bytes, length: int) -> bytes:
    """HKDF-SHA256 (RFC 5869) from hmac alone: extract, then expand."""
    if not 0 < length <= 255 * 32:
        raise ValueError("HKDF-SHA256 output length must be 1..8160 bytes")
    prk = hmac.new(bytes(32) if salt is None else salt, ikm, hashlib.sha256).digest()
    okm, block = b"", b""
    for counter in range(1, -(-length // 32) + 1):
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
    return okm[:length]


#: RFC 5869 appendix A, test cases 1 to 3 (SHA-256): (IKM, salt, info, L, OKM).
RFC5869_CASES = [
    (
        "0b" * 22,
        "000102030405060708090a0b0c",
        "f0f1f2f3f4f5f6f7f8f9",
        42,
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"
        "34007208d5b887185865",
    ),
    (
        bytes(range(0x50)).hex(),
        bytes(range(0x60, 0xB0)).hex(),
        bytes(range(0xB0, 0x100)).hex(),
        82,
        "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c"
        "59045a99cac7827271cb41c65e590e09da3275600c2f09b8367793a9aca3db71"
        "cc30c58179ec3e87c14c01d5c1f3434f1d87",
    ),
    (
        "0b" * 22,
        "",
        "",
        42,
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d"
        "9d201395faa4b61a96c8",
    ),
]


def check_hkdf() -> None:
    """The RFC 5869 HKDF above reproduces the RFC's test cases, and agrees with mac_key."""
    for ikm, salt, info, length, okm in RFC5869_CASES:
        got = hkdf_sha256(bytes.fromhex(ikm), bytes.fromhex(salt), bytes.fromhex(info), length)
        if got.hex() != okm:
            raise AssertionError(f"hkdf_sha256 fails RFC 5869 case with OKM {okm[:16]}...")
    for secret in (bytes(16), bytes(range(32)), b"\xff" * 64):
        for alg, alg_info in INFOS.items():
            if hkdf_sha256(secret, None, alg_info, 32) != mac_key(secret, alg):
                raise AssertionError("hkdf_sha256 and the cryptography HKDF disagree")


def _aes_block(key: bytes, block: bytes) -> bytes:
    """One raw AES block encryption (ECB of a single block)."""
    encryptor = Cipher(algorithms.AES(key), modes.ECB()).encryptor()  # noqa: S305
    return encryptor.update(block) + encryptor.finalize()


def _gf128_mul(x: int, y: int) -> int:
    """Multiplication in GF(2^128) as GCM defines it (bit-reflected, NIST SP 800-38D 6.3)."""
    r = 0xE1 << 120
    z, v = 0, y
    for i in range(127, -1, -1):
        if (x >> i) & 1:
            z ^= v
        v = (v >> 1) ^ r if v & 1 else v >> 1
    return z


def gmac_sp800_38d(key: bytes, iv: bytes, aad: bytes) -> bytes:
    """GMAC (GCM with an empty plaintext) from SP 800-38D, over a raw AES block."""
    if len(iv) != GMAC_IV_SIZE:
        raise ValueError("this GMAC takes 12-byte IVs only")
    h = int.from_bytes(_aes_block(key, bytes(16)), "big")
    padded = aad + bytes(-len(aad) % 16) + struct.pack(">QQ", 8 * len(aad), 0)
    y = 0
    for i in range(0, len(padded), 16):
        y = _gf128_mul(y ^ int.from_bytes(padded[i : i + 16], "big"), h)
    j0 = iv + b"\x00\x00\x00\x01"
    return (int.from_bytes(_aes_block(key, j0), "big") ^ y).to_bytes(16, "big")


#: The GCM specification's test case 13 (AES-256, zero key and IV, no data).
GCM_CASE_13 = (bytes(32), bytes(12), b"", "530f8afbc74536b9a963b4f1c4cb738b")


def gmac(key: bytes, iv: bytes, aad: bytes) -> bytes:
    """The 16-byte AES-GCM tag of an empty plaintext with *aad* (the cryptography package)."""
    return AESGCM(key).encrypt(iv, b"", aad)


def check_gmac() -> None:
    """The SP 800-38D GMAC above reproduces GCM test case 13 and agrees with AES-GCM."""
    key, iv, aad, tag = GCM_CASE_13
    if gmac_sp800_38d(key, iv, aad).hex() != tag or gmac(key, iv, aad).hex() != tag:
        raise AssertionError("GMAC fails GCM test case 13")
    for n in (0, 1, 15, 16, 17, 100):
        key = hashlib.sha256(b"gmac check key %d" % n).digest()
        iv = hashlib.sha256(b"gmac check iv %d" % n).digest()[:GMAC_IV_SIZE]
        aad = bytes(range(256))[:n] * 3
        if gmac_sp800_38d(key, iv, aad) != gmac(key, iv, aad):
            raise AssertionError("the SP 800-38D GMAC and the cryptography AES-GCM disagree")


def gmac_frame_key(secret: bytes, nonce: bytes) -> bytes:
    """The one-frame AES-256 key of a GMAC frame: HMAC-SHA256(K_gmac, nonce)."""
    return hmac.new(mac_key(secret, ALG_AES256_GMAC), nonce, hashlib.sha256).digest()


def _nonce_of(signed: bytes) -> bytes:
    kid_len = signed[6]
    return signed[7 + kid_len + 8 : 7 + kid_len + 8 + NONCE_SIZE]


def compute_tag(
    secret: bytes, signed: bytes, context: bytes, *, alg: int | None = None
) -> bytes:
    """
    The tag of the signed bytes (then the context) under the algorithm their
    header names (or *alg*): HMAC-SHA256 under the HKDF key, or AES-256-GMAC
    under the frame key of their nonce.
    """
    alg = signed[3] if alg is None else alg
    if alg == ALG_HMAC_SHA256:
        return hmac.new(mac_key(secret), signed + context, hashlib.sha256).digest()
    if alg == ALG_AES256_GMAC:
        nonce = _nonce_of(signed)
        return gmac(gmac_frame_key(secret, nonce), nonce[:GMAC_IV_SIZE], signed + context)
    raise ValueError(f"no MAC algorithm {alg}")


class Refused(Exception):
    """The reference refuses a frame; ``.error`` names the library's exception."""

    def __init__(self, error: str, why: str) -> None:
        super().__init__(f"{error}: {why}")
        self.error = error


@dataclass(frozen=True)
class Parsed:
    """The fields of a strictly parsed, not yet verified frame."""

    alg: int
    serializer: int
    param: int
    key_id: str
    created_ms: int
    nonce: bytes
    payload: bytes
    signed: bytes  # every byte before the tag
    tag: bytes


def parse(frame: bytes) -> Parsed:
    """Parse exactly one v1 frame, or raise Refused("MalformedFrame", ...)."""

    def bad(why: str) -> Refused:
        return Refused("MalformedFrame", why)

    if len(frame) < 7:
        raise bad("shorter than the fixed lead")
    if frame[0:2] != MAGIC:
        raise bad("magic")
    version, alg, serializer, param, kid_len = frame[2], frame[3], frame[4], frame[5], frame[6]
    if version != VERSION:
        raise bad("version")
    if alg not in TAG_SIZES:
        raise bad("MAC algorithm")
    tag_size = TAG_SIZES[alg]
    if serializer not in SERIALIZERS.values():
        raise bad("serializer id")
    if serializer not in PICKLE_FAMILY and param != 0:
        raise bad("serializer param must be 0 for msgpack")
    if serializer in PICKLE_FAMILY and param & OUT_OF_BAND and param != OOB_PARAM:
        raise bad("the out-of-band flag is only valid with pickle protocol 5")
    if not 1 <= kid_len <= MAX_KEY_ID:
        raise bad("key id length")
    pos = 7
    key_id = frame[pos : pos + kid_len]
    pos += kid_len
    if len(frame) < pos + 8 + NONCE_SIZE + 8 + tag_size:
        raise bad("shorter than its header and tag")
    if not KEY_ID_RE.match(key_id):
        raise bad("key id characters")
    (created_ms,) = struct.unpack(">Q", frame[pos : pos + 8])
    pos += 8
    nonce = frame[pos : pos + NONCE_SIZE]
    pos += NONCE_SIZE
    (length,) = struct.unpack(">Q", frame[pos : pos + 8])
    pos += 8
    if pos + length + tag_size != len(frame):
        raise bad("payload length does not account for every byte up to the tag")
    end = pos + length
    return Parsed(
        alg=alg,
        serializer=serializer,
        param=param,
        key_id=key_id.decode("ascii"),
        created_ms=created_ms,
        nonce=nonce,
        payload=frame[pos:end],
        signed=frame[:end],
        tag=frame[end:],
    )


def open_frame(
    frame: bytes,
    *,
    keys: dict[str, bytes],
    context: bytes,
    serializer: str,
    max_age: float | None,
    max_frame_size: int,
    now: float,
    accept_macs: tuple[str, ...] = ("hmac-sha256",),
    clock_skew: float = DEFAULT_CLOCK_SKEW,
) -> Parsed:
    """
    Every check before deserialization, in the order the specification fixes:
    size, parse, MAC algorithm accepted, key lookup, tag, age (future, then
    max_age), serializer.
    """
    if len(frame) > max_frame_size:
        raise Refused("FrameTooLarge", "over max_frame_size")
    parsed = parse(frame)
    if MAC_NAMES[parsed.alg] not in accept_macs:
        raise Refused("InvalidSignature", "MAC algorithm not accepted")
    secret = keys.get(parsed.key_id)
    if secret is None:
        raise Refused("UnknownKey", parsed.key_id)
    if not hmac.compare_digest(compute_tag(secret, parsed.signed, context), parsed.tag):
        raise Refused("InvalidSignature", "tag")
    age_ms = now * 1000.0 - parsed.created_ms
    if age_ms < -clock_skew * 1000.0:
        raise Refused("ExpiredFrame", "dated beyond the clock skew")
    if max_age is not None and age_ms > max_age * 1000.0:
        raise Refused("ExpiredFrame", "older than max_age")
    if parsed.serializer != SERIALIZERS[serializer]:
        raise Refused("MalformedFrame", "made by another serializer")
    return parsed


def split_oob(payload: bytes, payload_start: int) -> tuple[bytes, list[bytes]]:
    """
    The pickle and buffers of an out-of-band payload that starts
    *payload_start* bytes into its frame, or Refused("MalformedFrame", ...).
    """

    def bad(why: str) -> Refused:
        return Refused("MalformedFrame", why)

    if len(payload) < 4:
        raise bad("no buffer count")
    (count,) = struct.unpack(">I", payload[:4])
    if not 1 <= count <= MAX_BUFFERS:
        raise bad("buffer count outside 1..65536")
    pos = 4
    if len(payload) < pos + 8 * count + 8:
        raise bad("buffer table longer than the payload")
    sizes = struct.unpack(f">{count}Q", payload[pos : pos + 8 * count])
    pos += 8 * count
    (pickle_len,) = struct.unpack(">Q", payload[pos : pos + 8])
    pos += 8
    if pos + pickle_len > len(payload):
        raise bad("pickle longer than the payload")
    pickled = payload[pos : pos + pickle_len]
    pos += pickle_len
    buffers = []
    for size in sizes:
        pad = (BUFFER_ALIGN - (payload_start + pos) % BUFFER_ALIGN) % BUFFER_ALIGN
        if pos + pad + size > len(payload):
            raise bad("buffer runs past the payload")
        if payload[pos : pos + pad] != bytes(pad):
            raise bad("nonzero padding")
        pos += pad
        buffers.append(payload[pos : pos + size])
        pos += size
    if pos != len(payload):
        raise bad("bytes after the last buffer")
    return pickled, buffers


def oob_payload(
    pickled: bytes,
    buffers: tuple[bytes, ...],
    payload_start: int,
    *,
    count: int | None = None,
    sizes: tuple[int, ...] | None = None,
    pickle_len: int | None = None,
    pad_byte: int = 0,
    skip_padding: bool = False,
    extra: bytes = b"",
) -> bytes:
    """An out-of-band payload, with knobs to get each field wrong on purpose."""
    n = len(buffers) if count is None else count
    declared = tuple(len(b) for b in buffers) if sizes is None else sizes
    out = struct.pack(">I", n) + b"".join(struct.pack(">Q", k) for k in declared)
    out += struct.pack(">Q", len(pickled) if pickle_len is None else pickle_len) + pickled
    for i, buffer in enumerate(buffers):
        pad = 0 if skip_padding else -(payload_start + len(out)) % BUFFER_ALIGN
        fill = pad_byte if i == 0 else 0
        out += bytes([fill]) * pad + buffer
    return out + extra


# -- building frames, correct and otherwise ----------------------------------


def _secret(name: str) -> bytes:
    return hashlib.sha256(b"signedqueue test vector secret " + name.encode()).digest()


ALPHA = _secret("alpha")
BETA = _secret("beta")
GAMMA = _secret("gamma")
LONG_ID = "Key.id_with-64-characters.ABCDEFGHIJKLMNOPQRSTUVWXYZ_0123456789."
assert len(LONG_ID) == MAX_KEY_ID
RING = {"alpha": ALPHA, "beta": BETA}
#: The consumer's clock in every vector, in Unix seconds (exact in binary).
NOW = 1_700_000_000.25
NOW_MS = 1_700_000_000_250


@dataclass(frozen=True)
class Spec:
    """Every field of a frame, with knobs to get each one wrong on purpose."""

    payload: bytes
    serializer: int = SERIALIZERS["pickle"]
    param: int | None = None  # None: what a producer would write
    key_id: bytes = b"alpha"
    secret: bytes = ALPHA
    created_ms: int = NOW_MS
    nonce: bytes | None = None  # None: derived from the vector's id
    context: bytes = b""
    magic: bytes = MAGIC
    version: int = VERSION
    alg: int = ALG_HMAC_SHA256
    key_id_len: int | None = None  # None: len(key_id)
    length: int | None = None  # None: len(payload)
    signed_extra: bytes = b""  # bytes after the payload, covered by the tag
    raw_secret_mac: bool = False  # MAC with the stored secret, not the HKDF key
    #: Out-of-band buffers: *payload* is then the pickle, and the payload on
    #: the wire is the buffer table, the pickle and the padded buffers.
    buffers: tuple[bytes, ...] | None = None
    #: Keyword arguments of oob_payload that get the layout wrong on purpose.
    oob_knobs: tuple[tuple[str, Any], ...] = ()
    #: A deliberately wrong MAC: "gmac-hmac-subkey", "gmac-no-frame-key",
    #: "gmac-iv-tail", "hmac-gmac-subkey" (see _wrong_tag).
    wrong_mac: str = ""

    def payload_start(self) -> int:
        return 7 + len(self.key_id) + 8 + NONCE_SIZE + 8

    def wire_payload(self) -> bytes:
        """The payload as the frame carries it (what Codec.unseal returns)."""
        if self.buffers is None:
            return self.payload
        return oob_payload(
            self.payload, self.buffers, self.payload_start(), **dict(self.oob_knobs)
        )

    def build(self) -> bytes:
        param = self.param
        if param is None:
            is_pickle = self.serializer in PICKLE_FAMILY
            if self.buffers is not None:
                param = OOB_PARAM
            elif is_pickle and self.payload[:1] == b"\x80" and len(self.payload) >= 2:
                param = self.payload[1] & ~OUT_OF_BAND  # a raw payload has no buffers
            else:
                param = 0
        kid_len = len(self.key_id) if self.key_id_len is None else self.key_id_len
        payload = self.wire_payload()
        length = len(payload) if self.length is None else self.length
        signed = (
            self.magic
            + bytes([self.version, self.alg, self.serializer, param, kid_len])
            + self.key_id
            + struct.pack(">Q", self.created_ms)
            + (bytes(NONCE_SIZE) if self.nonce is None else self.nonce)
            + struct.pack(">Q", length)
            + payload
            + self.signed_extra
        )
        if self.raw_secret_mac:
            tag = hmac.new(self.secret, signed + self.context, hashlib.sha256).digest()
        elif self.wrong_mac:
            tag = _wrong_tag(self.wrong_mac, self.secret, signed + self.context, self.nonce)
        else:  # an unknown algorithm id is tagged as HMAC-SHA256
            alg = self.alg if self.alg in TAG_SIZES else ALG_HMAC_SHA256
            tag = compute_tag(self.secret, signed, self.context, alg=alg)
        return signed + tag


def _wrong_tag(kind: str, secret: bytes, data: bytes, nonce: bytes | None) -> bytes:
    """A tag made with one step of the specification done wrong."""
    nonce = bytes(NONCE_SIZE) if nonce is None else nonce
    iv = nonce[:GMAC_IV_SIZE]
    if kind == "gmac-hmac-subkey":  # the frame key from the HMAC sub-key
        frame_key = hmac.new(mac_key(secret), nonce, hashlib.sha256).digest()
        return gmac(frame_key, iv, data)
    if kind == "gmac-no-frame-key":  # the GMAC sub-key used for every frame
        return gmac(mac_key(secret, ALG_AES256_GMAC), iv, data)
    if kind == "gmac-iv-tail":  # the last 12 nonce bytes as the IV
        return gmac(gmac_frame_key(secret, nonce), nonce[-GMAC_IV_SIZE:], data)
    if kind == "hmac-gmac-subkey":  # HMAC-SHA256 under the GMAC sub-key
        return hmac.new(mac_key(secret, ALG_AES256_GMAC), data, hashlib.sha256).digest()
    raise ValueError(kind)


# Payloads.  Pickles come from the standard library's pickle (their bytes are
# stable across Python 3.10 to 3.13); msgpack is written out by hand.
P5_DICT_OBJ = {"id": 7, "tags": ["a", "b"], "ok": True, "none": None}
P5_DICT = pickle.dumps(P5_DICT_OBJ, protocol=5)
P0_LIST = pickle.dumps([1, "two", 3.5], protocol=0)
P1_LIST = pickle.dumps([1], protocol=1)
P2_TUPLE = pickle.dumps((1, 2), protocol=2)
P4_BYTES = pickle.dumps(b"\x00\x01", protocol=4)
P5_LIST = pickle.dumps([1, 2, 3], protocol=5)
# {"a": [1, 2, 3], "b": None}
MP_MAP = bytes.fromhex("82a16193010203a162c0")
# ext 1 (tuple) holding the msgpack array [1, 2]
MP_TUPLE = bytes.fromhex("c70301920102")
# Refused globals, built by hand and never loaded here.  Protocol 0:
# GLOBAL os.system, MARK, STRING, TUPLE, REDUCE, STOP.
PICKLE_OS_SYSTEM = b"cos\nsystem\n(S'echo signedqueue'\ntR."
# Protocol 4: SHORT_BINUNICODE x2, STACK_GLOBAL builtins.eval, REDUCE.
PICKLE_EVAL = b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93\x8c\x011\x85R."
# A harmless global that is simply not on the allowlist.
PICKLE_CHAINMAP = b"\x80\x04\x8c\x0bcollections\x8c\x08ChainMap\x93)R."
# PROTO 6 (newer than any supported protocol), BININT1 1, STOP.
PICKLE_PROTO_6 = b"\x80\x06K\x01."
# The worked example of docs/explanation/wire-format.md.
DEMO_SECRET = bytes(range(32))
DEMO_PAYLOAD = pickle.dumps({"a": 1}, protocol=5)
DEMO = Spec(
    DEMO_PAYLOAD,
    key_id=b"demo",
    secret=DEMO_SECRET,
    created_ms=1_800_000_000_000,
    nonce=bytes(range(16)),
)


class _OutOfBand:
    """Pickles as builtins.bytearray over one out-of-band buffer."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce__(self) -> tuple[Any, ...]:
        return (bytearray, (pickle.PickleBuffer(self.data),))


def oob_pickle(items: list[Any]) -> tuple[bytes, tuple[bytes, ...], str]:
    """
    A protocol 5 pickle of *items* (bytes become out-of-band buffers loaded
    as bytearrays), its buffers, and the repr of what it loads to.
    """
    buffers: list[bytes] = []

    def collect(buffer: pickle.PickleBuffer) -> bool:
        buffers.append(bytes(buffer.raw()))
        return False  # out of band

    obj = [_OutOfBand(x) if isinstance(x, bytes) else x for x in items]
    pickled = pickle.dumps(obj, protocol=5, buffer_callback=collect)
    loaded = [bytearray(x) if isinstance(x, bytes) else x for x in items]
    return pickled, tuple(buffers), repr(loaded)


OOB_ONE = oob_pickle([b"out-of-band bytes"])
OOB_SEVERAL = oob_pickle([b"first buffer", "in band", b"", 7, b"\x00\xff" * 40])
OOB_TWO = oob_pickle([b"one", b"two"])
# The worked example of out-of-band buffers.
DEMO_OOB = oob_pickle([b"\x01\x02\x03\x04"])
# ext 11 (registered class) naming a class nobody registered: ["x.Y", {}]
MP_UNREGISTERED = bytes.fromhex("c7060b92a3782e5980")


def _ring(keys: dict[str, bytes] | None = None, active: str = "alpha") -> dict[str, Any]:
    keys = RING if keys is None else keys
    assert active in keys
    return {"active": active, "keys": {k: v.hex() for k, v in keys.items()}}


def _codec(
    serializer: str = "pickle",
    max_age: float | None = None,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    mac: str | None = None,
    accept_macs: list[str] | None = None,
) -> dict[str, Any]:
    codec: dict[str, Any] = {
        "serializer": serializer,
        "max_age": max_age,
        "max_frame_size": max_frame_size,
    }
    if serializer == "cloudpickle":
        codec["unsafe_trust_signed_frames"] = True
    if mac is not None:
        codec["mac"] = mac
    if accept_macs is not None:
        codec["accept_macs"] = accept_macs
    return codec


GMAC = "aes256-gmac"
BOTH = ["hmac-sha256", "aes256-gmac"]


def _vector(
    vid: str,
    desc: str,
    spec: Spec,
    *,
    mutate: Callable[[bytes], bytes] | None = None,
    keys: dict[str, bytes] | None = None,
    active: str = "alpha",
    context: bytes | None = None,
    codec: dict[str, Any] | None = None,
    now: float = NOW,
) -> dict[str, Any]:
    """One vector: *spec* built with a nonce of its own, then *mutate*d."""
    if spec.nonce is None:
        spec = replace(spec, nonce=hashlib.sha256(b"nonce " + vid.encode()).digest()[:16])
    frame = spec.build()
    return {
        "id": vid,
        "desc": desc,
        "keyring": _ring(keys, active),
        "context": (spec.context if context is None else context).hex(),
        "codec": codec or _codec(),
        "now": now,
        "frame": (frame if mutate is None else mutate(frame)).hex(),
    }


def _flip(index: int, mask: int) -> Callable[[bytes], bytes]:
    """A mutation that flips the bits *mask* of the byte at *index*."""

    def mutate(frame: bytes) -> bytes:
        out = bytearray(frame)
        out[index] ^= mask
        return bytes(out)

    return mutate


def _relabel(alg: int, kid_len: int = 5) -> Callable[[bytes], bytes]:
    """A mutation that names MAC *alg* and moves the payload/tag boundary to match."""

    def mutate(frame: bytes) -> bytes:
        out = bytearray(frame)
        at = 7 + kid_len + 8 + NONCE_SIZE
        (length,) = struct.unpack(">Q", out[at : at + 8])
        length += TAG_SIZES[out[3]] - TAG_SIZES[alg]
        out[3] = alg
        out[at : at + 8] = struct.pack(">Q", length)
        return bytes(out)

    return mutate


def _reference_open(vector: dict[str, Any]) -> Parsed:
    codec = vector["codec"]
    accept = codec.get("accept_macs") or [codec.get("mac", "hmac-sha256")]
    return open_frame(
        bytes.fromhex(vector["frame"]),
        keys={k: bytes.fromhex(v) for k, v in vector["keyring"]["keys"].items()},
        context=bytes.fromhex(vector["context"]),
        serializer=codec["serializer"],
        max_age=codec["max_age"],
        max_frame_size=codec["max_frame_size"],
        now=vector["now"],
        accept_macs=tuple(accept),
    )


def valid_vectors() -> list[dict[str, Any]]:
    """Frames the library must accept, with the payload (and object) they carry."""
    out: list[dict[str, Any]] = []

    def add(vid: str, desc: str, spec: Spec, *, result: dict[str, Any], **kw: Any) -> None:
        vector = _vector(vid, desc, spec, **kw)
        vector["payload"] = spec.wire_payload().hex()
        vector.update(result)
        assert len(result) == 1 and set(result) <= {"object", "object_repr", "loads_error"}
        parsed = _reference_open(vector)  # the reference must accept it
        assert parsed.payload == spec.wire_payload()
        if spec.buffers is not None:
            start = len(parsed.signed) - len(parsed.payload)
            pickled, buffers = split_oob(parsed.payload, start)
            assert (pickled, tuple(buffers)) == (spec.payload, spec.buffers)
            # bytearrays over harmless buffers: safe to load here
            assert result["object_repr"] == repr(pickle.loads(pickled, buffers=buffers))
            vector["buffers"] = [b.hex() for b in buffers]
        out.append(vector)

    def oob(vid: str, desc: str, pickled: tuple[bytes, tuple[bytes, ...], str],
            **kw: Any) -> None:
        payload, buffers, loaded = pickled
        spec = Spec(payload, buffers=buffers, **kw.pop("spec", {}))
        add(vid, desc, spec, result={"object_repr": loaded}, **kw)

    add("pickle-p5-dict", "pickle protocol 5, a small dict",
        Spec(P5_DICT), result={"object": P5_DICT_OBJ})
    add("pickle-p0-list", "pickle protocol 0 (no PROTO opcode, so param 0)",
        Spec(P0_LIST), result={"object": [1, "two", 3.5]})
    add("pickle-p1-list", "pickle protocol 1 (no PROTO opcode, so param 0)",
        Spec(P1_LIST), result={"object": [1]})
    add("pickle-p2-tuple", "pickle protocol 2, a tuple",
        Spec(P2_TUPLE), result={"object_repr": "(1, 2)"})
    add("pickle-p4-bytes", "pickle protocol 4, bytes",
        Spec(P4_BYTES), result={"object_repr": repr(b"\x00\x01")})
    add("msgpack-map", "msgpack, a map of an array and nil",
        Spec(MP_MAP, serializer=SERIALIZERS["msgpack"]),
        codec=_codec("msgpack"), result={"object": {"a": [1, 2, 3], "b": None}})
    add("msgpack-tuple-ext", "msgpack, extension type 1 (tuple)",
        Spec(MP_TUPLE, serializer=SERIALIZERS["msgpack"]),
        codec=_codec("msgpack"), result={"object_repr": "(1, 2)"})
    add("cloudpickle-list", "cloudpickle serializer (id 3), protocol 5",
        Spec(P5_LIST, serializer=SERIALIZERS["cloudpickle"]),
        codec=_codec("cloudpickle"), result={"object": [1, 2, 3]})
    add("context", "a non-empty context is bound into the tag",
        Spec(P5_LIST, context=b"orders-queue"), result={"object": [1, 2, 3]})
    add("empty-payload", "an empty payload is a well-formed frame (but not a pickle)",
        Spec(b""), result={"loads_error": "MalformedFrame"})
    add("max-length-key-id", "a key id of 64 characters, every allowed kind",
        Spec(P5_LIST, key_id=LONG_ID.encode(), secret=GAMMA),
        keys={LONG_ID: GAMMA}, active=LONG_ID, result={"object": [1, 2, 3]})
    add("non-active-key", "signed with a key that verifies but is not the active one",
        Spec(P5_LIST, key_id=b"beta", secret=BETA), result={"object": [1, 2, 3]})
    add("future-within-skew", "dated 59 s ahead of the consumer's clock",
        Spec(P5_LIST, created_ms=NOW_MS + 59_000), result={"object": [1, 2, 3]})
    add("future-exactly-skew", "dated exactly 60 s ahead: at the skew limit, accepted",
        Spec(P5_LIST, created_ms=NOW_MS + 60_000), result={"object": [1, 2, 3]})
    add("age-exactly-max-age", "exactly max_age old: at the limit, accepted",
        Spec(P5_LIST, created_ms=NOW_MS - 30_000),
        codec=_codec(max_age=30), result={"object": [1, 2, 3]})
    add("no-max-age", "without max_age a frame dated at the epoch is accepted",
        Spec(P5_LIST, created_ms=0), result={"object": [1, 2, 3]})
    add("worked-example", "the worked example of the wire format document",
        DEMO, keys={"demo": DEMO_SECRET}, active="demo", now=1_800_000_000.0,
        result={"object": {"a": 1}})
    add("worked-example-context", "the worked example sealed under context 'orders'",
        replace(DEMO, context=b"orders"), keys={"demo": DEMO_SECRET}, active="demo",
        now=1_800_000_000.0, result={"object": {"a": 1}})
    add("param-1-protocol-0", "param 1 for a protocol 0 pickle: neither carries a marker",
        Spec(P0_LIST, param=1), result={"object": [1, "two", 3.5]})
    size = len(Spec(P5_LIST).build())
    add("size-exactly-limit", "a frame exactly max_frame_size bytes long",
        Spec(P5_LIST), codec=_codec(max_frame_size=size), result={"object": [1, 2, 3]})

    # AES-256-GMAC (MAC algorithm 2).
    add("gmac-p5-list", "signed with AES-256-GMAC, read by a codec with mac='aes256-gmac'",
        Spec(P5_LIST, alg=ALG_AES256_GMAC), codec=_codec(mac=GMAC),
        result={"object": [1, 2, 3]})
    add("gmac-context", "AES-256-GMAC with a context bound into the tag (as AAD)",
        Spec(P5_LIST, alg=ALG_AES256_GMAC, context=b"orders-queue"), codec=_codec(mac=GMAC),
        result={"object": [1, 2, 3]})
    add("gmac-accepted-by-hmac-codec", "a GMAC frame to an HMAC codec that accepts both",
        Spec(P5_DICT, alg=ALG_AES256_GMAC), codec=_codec(accept_macs=BOTH),
        result={"object": P5_DICT_OBJ})
    add("hmac-accepted-by-gmac-codec", "an HMAC frame to a GMAC codec that accepts both",
        Spec(P5_DICT), codec=_codec(mac=GMAC, accept_macs=BOTH),
        result={"object": P5_DICT_OBJ})
    add("gmac-msgpack", "AES-256-GMAC over a msgpack payload",
        Spec(MP_MAP, alg=ALG_AES256_GMAC, serializer=SERIALIZERS["msgpack"]),
        codec=_codec("msgpack", mac=GMAC), result={"object": {"a": [1, 2, 3], "b": None}})
    add("gmac-max-length-key-id", "AES-256-GMAC with a key id of 64 characters",
        Spec(P5_LIST, alg=ALG_AES256_GMAC, key_id=LONG_ID.encode(), secret=GAMMA),
        keys={LONG_ID: GAMMA}, active=LONG_ID, codec=_codec(mac=GMAC),
        result={"object": [1, 2, 3]})
    add("gmac-empty-payload", "the shortest GMAC frame body: an empty payload (not a pickle)",
        Spec(b"", alg=ALG_AES256_GMAC), codec=_codec(mac=GMAC),
        result={"loads_error": "MalformedFrame"})
    add("worked-example-gmac", "the worked example signed with AES-256-GMAC",
        replace(DEMO, alg=ALG_AES256_GMAC), keys={"demo": DEMO_SECRET}, active="demo",
        now=1_800_000_000.0, codec=_codec(mac=GMAC), result={"object": {"a": 1}})

    # Pickle protocol 5 with out-of-band buffers (serializer param 0x85).
    oob("oob-one-buffer", "one out-of-band buffer after zero padding to a 64-byte boundary",
        OOB_ONE)
    oob("oob-several-buffers",
        "four buffers (one empty) mixed with in-band values, each padded to 64 bytes",
        OOB_SEVERAL)
    oob("oob-gmac", "out-of-band buffers under AES-256-GMAC",
        OOB_SEVERAL, spec={"alg": ALG_AES256_GMAC}, codec=_codec(mac=GMAC))
    oob("oob-gmac-context", "one out-of-band buffer, AES-256-GMAC and a context",
        OOB_ONE, spec={"alg": ALG_AES256_GMAC, "context": b"orders-queue"},
        codec=_codec(mac=GMAC))
    oob("oob-long-key-id", "a 64-character key id moves the payload: the padding follows",
        OOB_TWO, spec={"key_id": LONG_ID.encode(), "secret": GAMMA},
        keys={LONG_ID: GAMMA}, active=LONG_ID)
    # A key id length for which the first buffer needs no padding at all.
    table = 4 + 8 * len(OOB_ONE[1]) + 8
    kid_len = next(
        n for n in range(1, MAX_KEY_ID + 1) if (39 + n + table + len(OOB_ONE[0])) % 64 == 0
    )
    oob("oob-no-padding-needed", "the pickle ends on a 64-byte boundary: zero bytes of padding",
        OOB_ONE, spec={"key_id": b"k" * kid_len, "secret": GAMMA},
        keys={"k" * kid_len: GAMMA}, active="k" * kid_len)
    oob("oob-cloudpickle", "out-of-band buffers with the cloudpickle serializer (id 3)",
        OOB_TWO, spec={"serializer": SERIALIZERS["cloudpickle"]}, codec=_codec("cloudpickle"))
    oob("worked-example-oob", "the out-of-band worked example of the wire format document",
        DEMO_OOB, spec={"key_id": b"demo", "secret": DEMO_SECRET,
                        "created_ms": 1_800_000_000_000, "nonce": bytes(range(16))},
        keys={"demo": DEMO_SECRET}, active="demo", now=1_800_000_000.0)
    return out


def invalid_vectors() -> list[dict[str, Any]]:
    """Frames the library must refuse, with the exception class it must raise."""
    out: list[dict[str, Any]] = []
    msgpack_id = SERIALIZERS["msgpack"]

    def add(
        vid: str, desc: str, spec: Spec, error: str, *, stage: str = "open",
        layout: bool = False, **kw: Any
    ) -> None:
        vector = _vector(vid, desc, spec, **kw)
        vector["error"] = error
        vector["stage"] = stage
        if stage == "open":
            try:
                _reference_open(vector)
            except Refused as exc:
                assert exc.error == error, (vid, exc)
            else:  # pragma: no cover - a mistake in this file
                raise AssertionError(f"the reference accepts {vid}")
        else:  # refused only by the deserializer: every frame check passes
            parsed = _reference_open(vector)
            if layout:  # ... and the out-of-band layout is what is wrong
                try:
                    split_oob(parsed.payload, len(parsed.signed) - len(parsed.payload))
                except Refused as exc:
                    assert exc.error == error, (vid, exc)
                else:  # pragma: no cover - a mistake in this file
                    raise AssertionError(f"the reference splits {vid}")
        out.append(vector)

    good = Spec(P5_LIST)
    frame_len = len(good.build())
    created_at = 7 + len(good.key_id)  # offset of the creation time

    # Layout (strict parse) -> MalformedFrame; every tag here is valid.
    add("bad-magic", "magic b'SR' instead of b'SQ'", replace(good, magic=b"SR"), "MalformedFrame")
    add("version-2", "unknown version 2", replace(good, version=2), "MalformedFrame")
    add("version-0", "unknown version 0", replace(good, version=0), "MalformedFrame")
    add("alg-3", "unknown MAC algorithm id 3", replace(good, alg=3), "MalformedFrame")
    add("alg-255", "unknown MAC algorithm id 255", replace(good, alg=255), "MalformedFrame")
    add("alg-0", "unknown MAC algorithm id 0", replace(good, alg=0), "MalformedFrame")
    add("serializer-4", "unknown serializer id 4", replace(good, serializer=4), "MalformedFrame")
    add("serializer-0", "unknown serializer id 0", replace(good, serializer=0), "MalformedFrame")
    add("msgpack-param-1", "msgpack frame with serializer param 1 (must be 0)",
        Spec(MP_MAP, serializer=msgpack_id, param=1), "MalformedFrame",
        codec=_codec("msgpack"))
    add("key-id-length-0", "key id length 0 (and no key id bytes)",
        replace(good, key_id=b""), "MalformedFrame")
    add("key-id-length-65", "key id of 65 characters",
        replace(good, key_id=b"a" * 65), "MalformedFrame",
        keys={"a" * 64: ALPHA}, active="a" * 64)
    add("key-id-slash", "key id with a '/'", replace(good, key_id=b"al/ha"), "MalformedFrame")
    add("key-id-space", "key id with a space", replace(good, key_id=b"al ha"), "MalformedFrame")
    add("key-id-non-ascii", "key id with byte 0xff",
        replace(good, key_id=b"alph\xff"), "MalformedFrame")
    add("key-id-length-too-long", "key id length 6 over the 5-byte id 'alpha' (shifts fields)",
        replace(good, key_id_len=6), "MalformedFrame")
    add("empty", "zero bytes", good, "MalformedFrame", mutate=lambda f: b"")
    add("truncated-by-one", "a valid frame without its last byte",
        good, "MalformedFrame", mutate=lambda f: f[:-1])
    add("truncated-header", "only the first 40 bytes of a valid frame",
        good, "MalformedFrame", mutate=lambda f: f[:40])
    add("truncated-no-tag", "a valid frame without its tag",
        good, "MalformedFrame", mutate=lambda f: f[:-TAG_SIZE])
    add("trailing-byte", "a valid frame followed by one more byte",
        good, "MalformedFrame", mutate=lambda f: f + b"\x00")
    add("trailing-byte-signed", "a byte between payload and tag, covered by a valid tag",
        replace(good, signed_extra=b"\x00"), "MalformedFrame")
    add("length-plus-one", "payload length field one more than the payload",
        replace(good, length=len(P5_LIST) + 1), "MalformedFrame")
    add("length-minus-one", "payload length field one less than the payload",
        replace(good, length=len(P5_LIST) - 1), "MalformedFrame")
    add("length-max", "payload length field 2**64 - 1",
        replace(good, length=2**64 - 1), "MalformedFrame")
    add("context-boundary-shift",
        "the first context byte moved into the frame: same tag, refused by its length",
        Spec(P5_LIST, context=b"Zq"), "MalformedFrame", context=b"q",
        mutate=lambda f: f[:-TAG_SIZE] + b"Z" + f[-TAG_SIZE:])

    # Keys -> UnknownKey.
    add("unknown-key", "signed with key id 'gamma', which the ring does not hold",
        replace(good, key_id=b"gamma", secret=GAMMA), "UnknownKey")
    add("key-id-case", "key id 'ALPHA': ids are case-sensitive",
        replace(good, key_id=b"ALPHA"), "UnknownKey")

    # Tag -> InvalidSignature.
    add("tag-last-bit", "lowest bit of the last tag byte flipped",
        good, "InvalidSignature", mutate=_flip(-1, 0x01))
    add("tag-first-bit", "highest bit of the first tag byte flipped",
        good, "InvalidSignature", mutate=_flip(-TAG_SIZE, 0x80))
    add("payload-bit", "one payload bit flipped",
        good, "InvalidSignature", mutate=_flip(-TAG_SIZE - 2, 0x01))
    add("created-bit", "lowest bit of the creation time flipped",
        good, "InvalidSignature", mutate=_flip(created_at + 7, 0x01))
    add("nonce-bit", "one nonce bit flipped",
        good, "InvalidSignature", mutate=_flip(created_at + 8, 0x01))
    add("param-changed", "serializer param changed from 5 to 4 after signing",
        good, "InvalidSignature", mutate=_flip(5, 0x01))
    add("other-secret", "names key 'alpha' but was signed with the secret of 'beta'",
        replace(good, secret=BETA), "InvalidSignature")
    add("raw-secret-mac", "tag made with the stored secret instead of the HKDF-derived key",
        replace(good, raw_secret_mac=True), "InvalidSignature")
    add("wrong-context", "sealed under context 'orders', opened under 'payments'",
        Spec(P5_LIST, context=b"orders"), "InvalidSignature", context=b"payments")
    add("context-missing", "sealed under context 'orders', opened without a context",
        Spec(P5_LIST, context=b"orders"), "InvalidSignature", context=b"")
    add("context-unexpected", "sealed without a context, opened under 'orders'",
        good, "InvalidSignature", context=b"orders")

    # Age -> ExpiredFrame.
    add("expired", "30.001 s old with max_age=30",
        replace(good, created_ms=NOW_MS - 30_001), "ExpiredFrame", codec=_codec(max_age=30))
    add("expired-epoch", "dated at the epoch with max_age=3600",
        replace(good, created_ms=0), "ExpiredFrame", codec=_codec(max_age=3600))
    add("future-beyond-skew", "dated 60.001 s ahead of the consumer's clock",
        replace(good, created_ms=NOW_MS + 60_001), "ExpiredFrame")
    add("future-far", "dated 2**64 - 1 ms after the epoch",
        replace(good, created_ms=2**64 - 1), "ExpiredFrame")

    # Size -> FrameTooLarge.
    add("over-max-frame-size", "one byte over max_frame_size",
        good, "FrameTooLarge", codec=_codec(max_frame_size=frame_len - 1))

    # Serializer -> MalformedFrame.
    add("msgpack-frame-pickle-codec", "a msgpack frame given to a pickle codec",
        Spec(MP_MAP, serializer=msgpack_id), "MalformedFrame")
    add("pickle-frame-msgpack-codec", "a pickle frame given to a msgpack codec",
        good, "MalformedFrame", codec=_codec("msgpack"))
    add("cloudpickle-frame-pickle-codec", "a cloudpickle frame given to a restricted pickle codec",
        replace(good, serializer=SERIALIZERS["cloudpickle"]), "MalformedFrame")

    # Order of the checks: the earlier check decides.
    add("order-size-before-parse", "over max_frame_size and bad magic: size is checked first",
        replace(good, magic=b"XX"), "FrameTooLarge", codec=_codec(max_frame_size=frame_len - 1))
    add("order-parse-before-key", "unknown key and a trailing byte: parsing comes first",
        replace(good, key_id=b"gamma", secret=GAMMA), "MalformedFrame",
        mutate=lambda f: f + b"\x00")
    add("order-key-before-tag", "unknown key id and a zeroed tag: the key lookup comes first",
        replace(good, key_id=b"gamma", secret=GAMMA), "UnknownKey",
        mutate=lambda f: f[:-TAG_SIZE] + bytes(TAG_SIZE))
    add("order-tag-before-age", "expired and a flipped tag bit: the tag is checked first",
        replace(good, created_ms=0), "InvalidSignature", codec=_codec(max_age=30),
        mutate=_flip(-1, 0x01))
    add("order-age-before-serializer", "expired msgpack frame to a pickle codec: age first",
        Spec(MP_MAP, serializer=msgpack_id, created_ms=0), "ExpiredFrame",
        codec=_codec(max_age=30))
    add("order-serializer-before-load", "a msgpack codec never unpickles a forbidden pickle",
        Spec(PICKLE_OS_SYSTEM), "MalformedFrame", codec=_codec("msgpack"))

    # Deserialization of a validly signed, current frame.
    add("forbidden-os-system", "a signed pickle calling os.system (protocol 0 REDUCE)",
        Spec(PICKLE_OS_SYSTEM), "ForbiddenClass", stage="deserialize")
    add("forbidden-builtins-eval", "a signed pickle calling builtins.eval (STACK_GLOBAL)",
        Spec(PICKLE_EVAL), "ForbiddenClass", stage="deserialize")
    add("not-allowlisted", "a signed pickle naming collections.ChainMap (not allowlisted)",
        Spec(PICKLE_CHAINMAP), "ForbiddenClass", stage="deserialize")
    add("pickle-protocol-6", "serializer param 6: newer than any supported pickle protocol",
        Spec(PICKLE_PROTO_6), "MalformedFrame", stage="deserialize")
    add("param-marker-mismatch", "param 5, but the payload starts with PROTO 4",
        Spec(pickle.dumps([1, 2, 3], protocol=4), param=5), "MalformedFrame",
        stage="deserialize")
    add("param-2-no-marker", "param 2 for a protocol 0 pickle (no PROTO opcode)",
        Spec(P0_LIST, param=2), "MalformedFrame", stage="deserialize")
    add("param-0-with-marker", "param 0 for a pickle that starts with PROTO 5",
        Spec(P5_LIST, param=0), "MalformedFrame", stage="deserialize")
    add("pickle-trailing-data", "a pickle followed by one byte after STOP",
        Spec(P5_LIST + b"\x00"), "MalformedFrame", stage="deserialize")
    add("pickle-empty", "an empty pickle payload", Spec(b""), "MalformedFrame",
        stage="deserialize")
    add("msgpack-trailing-data", "a msgpack value followed by one more byte",
        Spec(MP_MAP + b"\xc0", serializer=msgpack_id), "MalformedFrame",
        stage="deserialize", codec=_codec("msgpack"))
    add("msgpack-huge-array", "5 bytes of msgpack declaring an array of 2**32 - 1 items",
        Spec(bytes.fromhex("ddffffffff"), serializer=msgpack_id), "MalformedFrame",
        stage="deserialize", codec=_codec("msgpack"))
    add("msgpack-unregistered-class", "msgpack extension 11 naming an unregistered class",
        Spec(MP_UNREGISTERED, serializer=msgpack_id), "ForbiddenClass",
        stage="deserialize", codec=_codec("msgpack"))

    # AES-256-GMAC (MAC algorithm 2).
    gmac_good = Spec(P5_LIST, alg=ALG_AES256_GMAC)
    gmac_codec = _codec(mac=GMAC)
    gmac_tag = TAG_SIZES[ALG_AES256_GMAC]
    add("gmac-tag-last-bit", "GMAC: lowest bit of the last tag byte flipped",
        gmac_good, "InvalidSignature", codec=gmac_codec, mutate=_flip(-1, 0x01))
    add("gmac-tag-first-bit", "GMAC: highest bit of the first tag byte flipped",
        gmac_good, "InvalidSignature", codec=gmac_codec, mutate=_flip(-gmac_tag, 0x80))
    add("gmac-payload-bit", "GMAC: one payload bit flipped",
        gmac_good, "InvalidSignature", codec=gmac_codec, mutate=_flip(-gmac_tag - 2, 0x01))
    add("gmac-nonce-bit", "GMAC: one bit of the nonce (and so of the frame key) flipped",
        gmac_good, "InvalidSignature", codec=gmac_codec, mutate=_flip(created_at + 8, 0x01))
    add("gmac-nonce-last-bit", "GMAC: a bit of the nonce past the IV (only in the frame key)",
        gmac_good, "InvalidSignature", codec=gmac_codec,
        mutate=_flip(created_at + 8 + NONCE_SIZE - 1, 0x01))
    add("gmac-truncated-by-one", "a GMAC frame without its last byte",
        gmac_good, "MalformedFrame", codec=gmac_codec, mutate=lambda f: f[:-1])
    add("gmac-tag-32-bytes", "a GMAC frame followed by 16 more bytes: a 32-byte tag",
        gmac_good, "MalformedFrame", codec=_codec(accept_macs=BOTH),
        mutate=lambda f: f + bytes(16))
    add("gmac-length-for-32-byte-tag",
        "a GMAC frame whose length field leaves 32 bytes for the tag",
        replace(gmac_good, length=len(P5_LIST) - 16), "MalformedFrame", codec=gmac_codec)
    add("alg-hmac-to-gmac", "an HMAC frame with the algorithm byte set to 2, tag kept",
        good, "MalformedFrame", codec=_codec(accept_macs=BOTH), mutate=_flip(3, 0x03))
    add("alg-gmac-to-hmac", "a GMAC frame with the algorithm byte set to 1, tag kept",
        gmac_good, "MalformedFrame", codec=_codec(accept_macs=BOTH), mutate=_flip(3, 0x03))
    add("alg-hmac-relabelled-gmac",
        "an HMAC frame relabelled GMAC, length field moved so that it parses",
        good, "InvalidSignature", codec=_codec(accept_macs=BOTH),
        mutate=_relabel(ALG_AES256_GMAC))
    add("alg-gmac-relabelled-hmac",
        "a GMAC frame relabelled HMAC, length field moved so that it parses",
        gmac_good, "InvalidSignature", codec=_codec(accept_macs=BOTH),
        mutate=_relabel(ALG_HMAC_SHA256))
    add("gmac-not-accepted", "a valid GMAC frame to a codec that accepts only HMAC-SHA256",
        gmac_good, "InvalidSignature")
    add("hmac-not-accepted", "a valid HMAC frame to a codec with mac='aes256-gmac' only",
        good, "InvalidSignature", codec=gmac_codec)
    add("order-accept-before-key", "GMAC, unknown key, HMAC-only codec: the algorithm is first",
        replace(gmac_good, key_id=b"gamma", secret=GAMMA), "InvalidSignature")
    add("gmac-unknown-key", "GMAC signed with key id 'gamma', which the ring does not hold",
        replace(gmac_good, key_id=b"gamma", secret=GAMMA), "UnknownKey", codec=gmac_codec)
    add("gmac-other-secret", "GMAC naming key 'alpha' signed with the secret of 'beta'",
        replace(gmac_good, secret=BETA), "InvalidSignature", codec=gmac_codec)
    add("gmac-hmac-subkey", "GMAC frame key derived from the HMAC sub-key (wrong HKDF info)",
        replace(gmac_good, wrong_mac="gmac-hmac-subkey"), "InvalidSignature", codec=gmac_codec)
    add("gmac-no-frame-key", "GMAC under the GMAC sub-key itself, not the per-frame key",
        replace(gmac_good, wrong_mac="gmac-no-frame-key"), "InvalidSignature", codec=gmac_codec)
    add("gmac-iv-tail", "GMAC with the last 12 nonce bytes as the IV instead of the first",
        replace(gmac_good, wrong_mac="gmac-iv-tail"), "InvalidSignature", codec=gmac_codec)
    add("hmac-gmac-subkey", "HMAC-SHA256 tag made with the GMAC sub-key (wrong HKDF info)",
        replace(good, wrong_mac="hmac-gmac-subkey"), "InvalidSignature",
        codec=_codec(accept_macs=BOTH))
    add("gmac-wrong-context", "GMAC sealed under context 'orders', opened under 'payments'",
        replace(gmac_good, context=b"orders"), "InvalidSignature", context=b"payments",
        codec=gmac_codec)
    add("gmac-expired", "a valid GMAC frame 30.001 s old with max_age=30",
        replace(gmac_good, created_ms=NOW_MS - 30_001), "ExpiredFrame",
        codec=_codec(max_age=30, mac=GMAC))

    # Out-of-band buffers (serializer param 0x85).
    oob_pickle_, oob_buffers, _ = OOB_TWO
    oob_good = Spec(oob_pickle_, buffers=oob_buffers)

    def knobs(**kw: Any) -> Spec:
        return replace(oob_good, oob_knobs=tuple(kw.items()))

    first_pad_at = oob_good.payload_start() + 4 + 8 * 2 + 8 + len(oob_pickle_)
    assert first_pad_at % BUFFER_ALIGN, "the first buffer of oob_good must need padding"
    add("oob-flag-protocol-4", "serializer param 0x84: the out-of-band flag with protocol 4",
        replace(oob_good, param=0x84), "MalformedFrame")
    add("oob-flag-protocol-0", "serializer param 0x80: the out-of-band flag with protocol 0",
        replace(oob_good, param=0x80), "MalformedFrame")
    add("oob-flag-protocol-6", "serializer param 0x86: the out-of-band flag with protocol 6",
        replace(oob_good, param=0x86), "MalformedFrame")
    add("oob-flag-msgpack", "serializer param 0x85 on a msgpack frame",
        replace(oob_good, serializer=msgpack_id), "MalformedFrame", codec=_codec("msgpack"))
    add("oob-buffer-bit", "one bit of an out-of-band buffer flipped after signing",
        oob_good, "InvalidSignature", mutate=_flip(-TAG_SIZE - 1, 0x01))
    add("oob-padding-bit", "one padding byte set after signing",
        oob_good, "InvalidSignature", mutate=_flip(first_pad_at, 0x01))
    add("oob-gmac-buffer-bit", "GMAC: one bit of an out-of-band buffer flipped after signing",
        replace(oob_good, alg=ALG_AES256_GMAC), "InvalidSignature", codec=gmac_codec,
        mutate=_flip(-gmac_tag - 1, 0x01))
    add("oob-nonzero-padding", "padding before the first buffer is 0x01, signed",
        knobs(pad_byte=1), "MalformedFrame", stage="deserialize", layout=True)
    add("oob-gmac-nonzero-padding", "GMAC: padding before the first buffer is 0xff, signed",
        replace(knobs(pad_byte=0xFF), alg=ALG_AES256_GMAC), "MalformedFrame",
        stage="deserialize", layout=True, codec=gmac_codec)
    add("oob-count-0", "buffer count 0 (the flag promises at least one buffer)",
        replace(oob_good, buffers=()), "MalformedFrame", stage="deserialize", layout=True)
    add("oob-count-65537", "buffer count 65537, over the limit of 65536",
        knobs(count=65537), "MalformedFrame", stage="deserialize", layout=True)
    add("oob-table-truncated", "buffer count 1000 with a table of 2 entries",
        knobs(count=1000), "MalformedFrame", stage="deserialize", layout=True)
    add("oob-buffer-past-payload", "the last buffer declared one byte longer than it is",
        knobs(sizes=(3, 4)), "MalformedFrame", stage="deserialize", layout=True)
    add("oob-buffer-huge", "a buffer declared 2**64 - 1 bytes long",
        knobs(sizes=(3, 2**64 - 1)), "MalformedFrame", stage="deserialize", layout=True)
    add("oob-trailing-bytes", "one byte after the last buffer",
        knobs(extra=b"\x00"), "MalformedFrame", stage="deserialize", layout=True)
    add("oob-pickle-length-too-long", "pickle length field 1000, past the end of the payload",
        knobs(pickle_len=1000), "MalformedFrame", stage="deserialize", layout=True)
    add("oob-pickle-length-too-short", "pickle length field one short (the STOP is padding)",
        knobs(pickle_len=len(oob_pickle_) - 1), "MalformedFrame", stage="deserialize",
        layout=True)
    add("oob-unaligned", "buffers written right after the pickle, without padding",
        knobs(skip_padding=True), "MalformedFrame", stage="deserialize", layout=True)
    add("oob-payload-too-short", "param 0x85 and a 3-byte payload",
        Spec(b"\x00\x00\x01", param=OOB_PARAM), "MalformedFrame", stage="deserialize",
        layout=True)
    add("oob-flag-in-band-pickle", "param 0x85 on an ordinary protocol 5 pickle",
        Spec(P5_LIST, param=OOB_PARAM), "MalformedFrame", stage="deserialize", layout=True)
    add("oob-layout-param-5", "an out-of-band layout under param 5 (the flag missing)",
        replace(oob_good, param=5), "MalformedFrame", stage="deserialize")
    add("oob-too-few-buffers", "a pickle taking two buffers, a table giving one",
        Spec(oob_pickle_, buffers=oob_buffers[:1]), "MalformedFrame", stage="deserialize")
    return out


# -- key derivation ------------------------------------------------------------


def key_vectors() -> list[dict[str, Any]]:
    """Stored secrets of several sizes and the frame MAC keys derived from each."""
    check_hkdf()
    check_gmac()
    secrets = [
        ("secret-16", "a 16-byte secret, the shortest a keyring accepts",
         hashlib.sha256(b"signedqueue key vector 16").digest()[:16]),
        ("secret-32", "a 32-byte secret, the size Keyring.generate() makes",
         hashlib.sha256(b"signedqueue key vector 32").digest()),
        ("secret-64", "a 64-byte secret, as long as a SHA-256 block",
         hashlib.sha512(b"signedqueue key vector 64").digest()),
        ("secret-worked-example", "the secret of the worked example, bytes 0 to 31",
         DEMO_SECRET),
    ]
    out = []
    for vid, desc, secret in secrets:
        derived = hkdf_sha256(secret, None, INFO, 32)
        gmac_derived = hkdf_sha256(secret, None, GMAC_INFO, 32)
        if derived != mac_key(secret) or derived == secret[:32]:
            raise AssertionError(f"{vid}: the two HKDF implementations disagree")
        if gmac_derived != mac_key(secret, ALG_AES256_GMAC) or gmac_derived == derived:
            raise AssertionError(f"{vid}: the two HKDF implementations disagree (GMAC)")
        nonce = hashlib.sha256(b"frame key nonce " + vid.encode()).digest()[:NONCE_SIZE]
        frame_key = hmac.new(gmac_derived, nonce, hashlib.sha256).digest()
        if frame_key != gmac_frame_key(secret, nonce):
            raise AssertionError(f"{vid}: the GMAC frame key disagrees")
        out.append({
            "id": vid,
            "desc": desc,
            "secret": secret.hex(),
            "secret_base64": base64.b64encode(secret).decode("ascii"),
            "hkdf": {"hash": "sha256", "salt": None, "info": INFO.decode("ascii"), "length": 32},
            "mac_key": derived.hex(),
            "hkdf_gmac": {
                "hash": "sha256", "salt": None, "info": GMAC_INFO.decode("ascii"), "length": 32
            },
            "gmac_key": gmac_derived.hex(),
            "gmac_frame_key": {"nonce": nonce.hex(), "frame_key": frame_key.hex()},
        })
    return out


# -- output ------------------------------------------------------------------

HEADER = {
    "format": "signedqueue wire format v1 test vectors",
    "generator": "tests/vectors/generate.py (independent reference implementation)",
}


def documents() -> dict[str, str]:
    """The JSON files, by name, exactly as written to disk."""

    def dump(kind: str, vectors: list[dict[str, Any]]) -> str:
        ids = [v["id"] for v in vectors]
        assert len(ids) == len(set(ids)), "duplicate vector ids"
        assert all(v["desc"] for v in vectors)
        doc = dict(HEADER, kind=kind, vectors=vectors)
        return json.dumps(doc, indent=1) + "\n"

    return {
        "frames_valid.json": dump("valid", valid_vectors()),
        "frames_invalid.json": dump("invalid", invalid_vectors()),
        "keys.json": dump("key-derivation", key_vectors()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare, write nothing")
    args = parser.parse_args(argv)
    here = Path(__file__).resolve().parent
    stale = []
    for name, text in documents().items():
        path = here / name
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            path.write_text(text, encoding="utf-8")
    for name in stale:
        print(f"{name} is stale: run python tests/vectors/generate.py", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
