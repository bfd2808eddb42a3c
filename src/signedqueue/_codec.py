"""
The codec: signs objects into frames and opens frames into objects.

This is the one place that fixes the order of checks on an incoming frame::

    size limit -> strict parse -> key lookup by id -> tag (constant time)
    -> age -> serializer -> replay guard (if any) -> deserialize (restricted)

No byte of a payload reaches a deserializer before its tag has verified.
"""

from __future__ import annotations

import hmac
import logging
import os
import pickle
import struct
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from . import _frame
from ._allowlist import AllowEntry, Allowlist, Policy, Refusal
from ._audit import AuditReport, append_sighting
from ._keys import Keyring
from ._mac import ALG_HMAC_SHA256, MAC_IDS, MAC_NAMES, TAG_SIZES, MacKey, one_shot
from ._metrics import REFUSAL_REASONS, CodecCounters, refusal_reason
from ._msgpack import InvalidFields, UnregisteredClass
from ._scan import ScanError, pickle_globals
from ._sealing import Sealing
from ._serializers import (
    DEFAULT_PROTOCOL,
    Serializer,
    UnsupportedProtocol,
    make_serializer,
)
from ._unpickler import BudgetExceeded, GlobalModified, GuardRefused, plain_data
from .exceptions import (
    ExpiredFrame,
    ForbiddenClass,
    FrameTooLarge,
    InvalidSignature,
    MalformedFrame,
    RejectedFrame,
    ReplayedFrame,
    ReplayGuardUnavailable,
    UnknownKey,
)

if TYPE_CHECKING:  # pragma: no cover
    from ._inspect import Inspection
    from ._replay import ReplayGuard

__all__ = ["DEFAULT_CLOCK_SKEW", "DEFAULT_MAX_FRAME_SIZE", "Codec", "FrameInfo"]

logger = logging.getLogger("signedqueue")

#: Frames larger than this are refused before any byte is hashed: 128 MiB.
DEFAULT_MAX_FRAME_SIZE = 128 * 1024 * 1024
#: Seconds a frame may be dated ahead of the consumer's clock.
DEFAULT_CLOCK_SKEW = 60.0
#: Payloads at least this large are hashed in place instead of copied once
#: more; below it one contiguous copy is cheaper than three hash updates.
_LARGE = 64 * 1024

#: At most this many distinct globals are checked to list every refusal.
_MAX_LISTED = 64

Buffer = bytes | bytearray | memoryview
_MID = _frame._MID
#: By key id length: a header as (lead up to the key id, created, nonce,
#: payload length), in one unpack.
_HEADS = [
    struct.Struct(f">{_frame.LEAD_SIZE + n}sQ16sQ") for n in range(256)
]
#: bytes frames up to this size are sliced rather than viewed in loads().
_SLICED = 4096


class AuditModeWarning(UserWarning):
    """A codec was built in audit mode: refused globals are loaded."""


@dataclass(frozen=True)
class FrameInfo:
    """The header of a verified frame (see :meth:`Codec.verify`)."""

    #: The id of the key that signed it.
    key_id: str
    #: When it was made, in Unix seconds (millisecond resolution).
    created: float
    #: ``"pickle"``, ``"msgpack"`` or ``"cloudpickle"``.
    serializer: str
    #: The serializer parameter: the pickle protocol, 0 for msgpack.
    param: int
    #: The frame's 16-byte nonce (unique per frame; see the wire format).
    nonce: bytes
    #: Payload size in bytes.
    payload_size: int

    @classmethod
    def from_header(cls, header: _frame.Header) -> FrameInfo:
        """What a parsed header says (verified or not: the caller knows)."""
        return cls(
            key_id=header.key_id.decode("ascii"),
            created=header.created_ms / 1000.0,
            serializer=_frame.SERIALIZER_NAMES[header.serializer],
            param=header.param,
            nonce=header.nonce,
            payload_size=header.payload_end - header.payload_start,
        )


class Codec:
    """
    Signs objects into frames (``dumps``) and verifies and loads them
    (``loads``).

    Args:
        keyring: Keys to sign with (the active one) and to verify with (all).
        serializer: ``"pickle"`` (default; restricted by the allowlist),
            ``"msgpack"`` (data only) or ``"cloudpickle"`` (code; needs
            *unsafe_trust_signed_frames*).  A codec reads only frames made by
            its own serializer.
        allow: Globals a pickle may name besides the built-in safe set:
            ``"pkg.mod.Name"``, ``"pkg.mod:Outer.Inner"``, ``"pkg.mod.*"`` or
            class objects.
        max_age: Seconds after which a frame is refused as expired; ``None``
            for no limit.
        context: Bytes bound into every tag but never sent, e.g. a queue
            name.  A frame sealed under one context is refused under another.
        max_frame_size: Frames larger than this are refused unhashed.
        protocol: Pickle protocol for ``dumps`` (0 to 5; default 5).
        msgpack_types: Dataclasses, attrs classes and NamedTuples the msgpack serializer may
            carry.
        clock_skew: Seconds a frame may be dated in the future (default 60).
        unsafe_trust_signed_frames: Load pickles with plain ``pickle.loads``:
            every holder of a key in the ring can run code in this process.
        unsafe_allow_dangerous: Exact names admitted even though calling them
            can run code (``"functools.partial"``, ...).  Same warning.
        clock: Returns the current time in Unix seconds (for tests).
        mac: The MAC algorithm new frames are signed with:
            ``"hmac-sha256"`` (default) or ``"aes256-gmac"`` (several times
            faster for large payloads; see the wire format).
        accept_macs: The MAC algorithms a frame may be signed with to be
            accepted (default: only *mac*).  List both while a fleet moves
            from one to the other.
        replay_guard: Refuse a frame already accepted within the replay
            window (``max_age + clock_skew`` after it was made) with
            :class:`ReplayedFrame`: a :class:`MemoryReplayGuard` (this
            process), :class:`FileReplayGuard` (this machine) or
            ``RedisReplayGuard`` (shared through Redis).  Needs *max_age*.
            Checked by ``loads`` only, after the tag and age, before
            deserializing (``unseal``, ``verify``, ``reseal`` and ``inspect``
            do not consume a frame: they serve to relay or examine it).
            Shared with child processes only if it pickles as a handle
            (``FileReplayGuard``; a ``MemoryReplayGuard`` arrives empty).

    .. danger::
        ``unsafe_trust_signed_frames`` and ``unsafe_allow_dangerous`` turn
        every key holder into someone who can run code in your process.  Use
        them only when every producer is as trusted as the consumer.
    """

    def __init__(
        self,
        keyring: Keyring,
        *,
        serializer: str = "pickle",
        allow: Allowlist | Iterable[AllowEntry] | None = None,
        max_age: float | None = None,
        context: bytes = b"",
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        protocol: int = DEFAULT_PROTOCOL,
        msgpack_types: Iterable[type] = (),
        clock_skew: float = DEFAULT_CLOCK_SKEW,
        unsafe_trust_signed_frames: bool = False,
        unsafe_allow_dangerous: Iterable[str] = (),
        unsafe_audit: bool = False,
        audit_log: str | os.PathLike[str] | None = None,
        clock: Callable[[], float] = time.time,
        mac: str = "hmac-sha256",
        accept_macs: Iterable[str] | None = None,
        replay_guard: ReplayGuard | None = None,
    ) -> None:
        if not isinstance(keyring, Keyring):
            raise TypeError(f"keyring must be a Keyring, not {type(keyring).__name__}")
        if not isinstance(context, (bytes, bytearray)):
            raise TypeError("context must be bytes, e.g. b'orders-queue'")
        if max_age is not None and max_age <= 0:
            raise ValueError("max_age must be positive seconds or None")
        if clock_skew < 0:
            raise ValueError("clock_skew must be >= 0")
        if replay_guard is not None:
            if not callable(getattr(replay_guard, "check_and_remember", None)):
                raise TypeError(
                    "replay_guard must be a replay guard (MemoryReplayGuard, "
                    f"FileReplayGuard, RedisReplayGuard), not {type(replay_guard).__name__}"
                )
            if max_age is None:
                raise ValueError(
                    "replay_guard= needs max_age=: a frame is remembered until it "
                    "expires, so without max_age it would be remembered forever"
                )
        accept_macs = [mac] if accept_macs is None else list(accept_macs)
        for name in (mac, *accept_macs):
            if name not in MAC_IDS:
                raise ValueError(
                    f"unknown MAC algorithm {name!r}; use one of {', '.join(MAC_IDS)}"
                )
        if max_frame_size < _frame.MIN_FRAME_SIZE:
            raise ValueError(f"max_frame_size must be at least {_frame.MIN_FRAME_SIZE}")
        if allow is not None and not isinstance(allow, Allowlist):
            allow = Allowlist(allow)
        unsafe_allow_dangerous = list(unsafe_allow_dangerous)
        msgpack_types = list(msgpack_types)
        if serializer == "cloudpickle" and not unsafe_trust_signed_frames:
            raise ValueError(
                "serializer='cloudpickle' loads code, which no allowlist can "
                "restrict; pass unsafe_trust_signed_frames=True to accept that "
                "every holder of a key in this ring can run code in this process"
            )
        if unsafe_trust_signed_frames:
            if serializer == "msgpack":
                raise ValueError(
                    "unsafe_trust_signed_frames has no meaning for msgpack, which "
                    "carries data only; drop it"
                )
            if allow is not None or unsafe_allow_dangerous:
                raise ValueError(
                    "unsafe_trust_signed_frames=True disables the allowlist; "
                    "drop allow= and unsafe_allow_dangerous="
                )
            logger.warning(
                "signedqueue: unsafe_trust_signed_frames=True: signed %s frames "
                "are loaded without an allowlist; every key holder can run code "
                "in this process",
                serializer,
            )
            policy = None
        else:
            if audit_log is not None and not unsafe_audit:
                raise ValueError("audit_log= needs unsafe_audit=True")
            if unsafe_audit:
                message = (
                    "signedqueue: AUDIT MODE (unsafe_audit=True): globals outside the "
                    "allowlist are LOADED and only logged; every key holder can "
                    "construct any non-dangerous class in this process. Use it to "
                    "learn an allowlist, then turn it off."
                )
                logger.warning(message)
                warnings.warn(message, AuditModeWarning, stacklevel=2)
            sink = None
            if audit_log is not None:
                log_path = os.fspath(audit_log)

                def sink(entry: str) -> None:
                    append_sighting(log_path, entry)

            policy = Policy(
                allow, unsafe_allow_dangerous=unsafe_allow_dangerous,
                audit=unsafe_audit, audit_sink=sink,
            )
        self._keyring = keyring
        self._serializer: Serializer = make_serializer(
            serializer, protocol=protocol, policy=policy, msgpack_types=msgpack_types
        )
        self._context = bytes(context)
        self._max_age_ms = None if max_age is None else max_age * 1000.0
        self._skew_ms = clock_skew * 1000.0
        self._max_frame_size = max_frame_size
        self._clock = clock
        self._prefixes: dict[tuple[bytes, int], bytes] = {}
        self._alg = MAC_IDS[mac]
        self._tag_size = TAG_SIZES[self._alg]
        self._accept = frozenset(MAC_IDS[name] for name in accept_macs)
        # GMAC's security rests on nonces never repeating under one key: 16
        # random bytes.  HMAC needs them only unique enough to tell frames
        # apart: a per-process random half and a counter, made without a
        # system call (see _frame.new_nonce).
        self._new_nonce: Callable[[], bytes] = (
            _frame.new_nonce if self._alg == ALG_HMAC_SHA256 else _random_nonce
        )
        # Header leads (magic .. key id) that passed every check, and the
        # largest frame the fast path of loads() takes.
        self._leads: dict[bytes, tuple[int, bytes, int, int, int]] = {}
        self._small_max = min(max_frame_size, _LARGE)
        # The serializer parameter of in-band protocol 5 pickles that the
        # restricted unpickler would load: pure data among them loads with
        # pickle.loads (see _unpickler.plain_data).
        self._plain_param = 5 if serializer == "pickle" and policy is not None else -1
        # Replay protection: frames are remembered for this long after they
        # were made (see _check_replay).  A RedisQueue consumer's private copy
        # claims frames for itself (owner) for a lease (see _claiming).
        self._guard = replay_guard
        # One second more than the last instant a frame is still accepted
        # (age == max_age is accepted), so that a guard whose entry lapses
        # at that boundary, or rounds its expiry down, never reopens it.
        self._window_ms = (self._max_age_ms or 0.0) + self._skew_ms + 1000.0
        self._replay_owner = ""
        self._replay_until: Callable[[], float] = _never
        self._last_replay: tuple[bytes, float] | None = None
        # Counters: plain ints (see counters()).
        self._sealed = 0
        self._opened = 0
        self._refusals = dict.fromkeys(REFUSAL_REASONS, 0)
        # Everything needed to rebuild this codec in a child process.
        self._options: dict[str, Any] = dict(
            serializer=serializer,
            allow=allow,
            max_age=max_age,
            context=self._context,
            max_frame_size=max_frame_size,
            protocol=protocol,
            msgpack_types=msgpack_types,
            clock_skew=clock_skew,
            unsafe_trust_signed_frames=unsafe_trust_signed_frames,
            unsafe_allow_dangerous=unsafe_allow_dangerous,
            unsafe_audit=unsafe_audit,
            audit_log=audit_log,
            clock=clock,
            mac=mac,
            accept_macs=accept_macs,
            replay_guard=replay_guard,
        )

    # -- attributes --------------------------------------------------------

    @property
    def keyring(self) -> Keyring:
        """The keyring this codec signs and verifies with."""
        return self._keyring

    @property
    def serializer(self) -> str:
        """The serializer's name."""
        return self._serializer.name

    @property
    def max_frame_size(self) -> int:
        """Frames larger than this are refused before hashing."""
        return self._max_frame_size

    @property
    def context(self) -> bytes:
        """The bytes bound into every tag (see *context*)."""
        return self._context

    @property
    def replay_guard(self) -> ReplayGuard | None:
        """The replay guard, or ``None`` (see *replay_guard*)."""
        return self._guard

    def counters(self) -> CodecCounters:
        """
        What this codec did in this process since it was made: frames sealed,
        opened (returned by ``loads``/``unseal``) and refused by reason
        (every method that verifies counts its refusals).

        Plain integer increments, without a lock: exact in one thread; under
        several threads an increment may rarely be lost (never invented).
        Codecs made by :meth:`with_context` (e.g. inside a queue) count on
        their own: read ``queue.codec.counters()``.
        """
        return CodecCounters(self._sealed, self._opened, dict(self._refusals))

    def with_context(self, context: bytes) -> Codec:
        """
        A codec like this one (same keyring, serializer, allowlist and
        options) that binds *context* into every tag instead.

        Transports use it to bind where a frame is going into what is signed:
        a frame sealed for one queue, task or purpose is then refused as
        :class:`InvalidSignature` by every other.
        """
        if not isinstance(context, (bytes, bytearray)):
            raise TypeError("context must be bytes, e.g. b'orders-queue'")
        options = {**self._options, "context": bytes(context)}
        if options["unsafe_audit"]:
            # The warning was given when this codec was made; say it once.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", AuditModeWarning)
                return Codec(self._keyring, **options)
        return Codec(self._keyring, **options)

    def __repr__(self) -> str:
        return (
            f"<Codec serializer={self.serializer!r} active_key="
            f"{self._keyring.active_id!r} max_frame_size={self._max_frame_size}>"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # The keyring refuses to be pickled except while spawning a process.
        return (_rebuild_codec, (self._keyring, self._options))

    @classmethod
    def from_config(
        cls, keyring: Keyring, path: str | os.PathLike[str] = "pyproject.toml", **options: Any
    ) -> Codec:
        """
        A codec with the settings of a TOML file (``[tool.signedqueue]`` in a
        ``pyproject.toml``); keyword arguments override them.
        """
        from ._config import load_config

        return cls(keyring, **{**load_config(path).codec_options(), **options})

    def audit_report(self) -> AuditReport:
        """
        What this codec loaded in audit mode that its allowlist refuses (this
        process only; merge a fleet's ``audit_log`` files with
        :meth:`AuditReport.from_logs`).
        """
        policy = getattr(self._serializer, "policy", None)
        if policy is None or not policy.audit:
            raise ValueError("audit_report() needs a codec built with unsafe_audit=True")
        return AuditReport(dict(policy.audited))

    # -- producing ---------------------------------------------------------

    def dumps(self, obj: Any) -> bytes:
        """
        Serialize *obj* and return it as a signed frame.

        Serialization errors (an unpicklable object, a type msgpack cannot
        carry) propagate unchanged.
        """
        payload, param, buffers = self._serializer.dumps_oob(obj)
        if not buffers and not isinstance(payload, list):
            return self._seal(payload, param)
        return self._sealing(payload, param, buffers).to_bytes()

    def _prepare(self, obj: Any) -> bytes | Sealing:
        """
        Serialize *obj* (errors raise here) and return a small frame whole,
        or a large one as a :class:`Sealing` whose tag its writer computes.
        """
        payload, param, buffers = self._serializer.dumps_oob(obj)
        if not buffers and not isinstance(payload, list) and len(payload) < _LARGE:
            return self._seal(payload, param)
        return self._sealing(payload, param, buffers)

    def _prefix(self, key_id: bytes, param: int) -> bytes:
        prefix = self._prefixes.get((key_id, param))
        if prefix is None:
            if len(self._prefixes) > 64:  # keys rotated many times
                self._prefixes.clear()
            prefix = _frame.header_prefix(self._alg, self._serializer.id, param, key_id)
            self._prefixes[(key_id, param)] = prefix
        return prefix

    def _too_large(self, size: int) -> ValueError:
        return ValueError(
            f"the frame would be {size} bytes, over max_frame_size="
            f"{self._max_frame_size}; raise max_frame_size on producers and "
            "consumers alike"
        )

    def _sealing(
        self,
        payload: Buffer | list[Buffer],
        param: int,
        buffers: list[memoryview],
        created_ms: int | None = None,
        nonce: bytes | None = None,
    ) -> Sealing:
        key_id, key = self._keyring._signing(self._alg)
        prefix = self._prefix(key_id, param)
        nonce = self._new_nonce() if nonce is None else nonce
        created = int(self._clock() * 1000) if created_ms is None else created_ms
        parts = payload if isinstance(payload, list) else [payload]
        pickle_size = sum(len(p) for p in parts)
        pieces: list[Buffer]
        if buffers:
            table, pads, size = _frame.buffer_layout(
                len(prefix) + _frame.MID_SIZE, pickle_size, [len(b) for b in buffers]
            )
            pieces = [b"", table, *parts]
            for pad, buffer in zip(pads, buffers, strict=True):
                if pad:
                    pieces.append(bytes(pad))
                pieces.append(buffer)
        else:
            size = pickle_size
            pieces = [b"", *parts]
        pieces[0] = prefix + _frame.header_suffix(created, nonce, size)
        total = len(pieces[0]) + size + self._tag_size
        if total > self._max_frame_size:
            raise self._too_large(total)
        views = [memoryview(p).cast("B") for p in pieces]
        self._sealed += 1
        return Sealing(views, self._alg, key, nonce, self._context, self._tag_size)

    def seal(self, payload: Buffer) -> bytes:
        """
        Sign already serialized bytes as a frame of this codec's serializer.

        The consumer deserializes the payload as that serializer's output,
        so it must be one (e.g. a pickle for ``serializer="pickle"``).
        """
        return self._seal(payload, self._serializer.param_for(payload))

    def _seal(
        self,
        payload: Buffer,
        param: int,
        created_ms: int | None = None,
        nonce: bytes | None = None,
    ) -> bytes:
        size = len(payload)
        if size >= _LARGE:
            return self._sealing(payload, param, [], created_ms, nonce).to_bytes()
        alg = self._alg
        key_id, key = self._keyring._signing(alg)
        prefix = self._prefixes.get((key_id, param)) or self._prefix(key_id, param)
        if nonce is None:
            nonce = self._new_nonce()
        header = prefix + _MID.pack(
            int(self._clock() * 1000) if created_ms is None else created_ms, nonce, size
        )
        if size + len(header) + self._tag_size > self._max_frame_size:
            raise self._too_large(size + len(header) + self._tag_size)
        body = header + payload
        self._sealed += 1
        if alg == ALG_HMAC_SHA256:  # one_shot's first case, without its call
            return body + key.hmac(body, self._context)
        return body + one_shot(alg, key, nonce, body, self._context)

    def reseal(self, frame: Buffer) -> bytes:
        """
        Verify *frame* and sign it again under the active key, keeping its
        creation time, nonce and payload (which is not deserialized).

        For backlogs stored in brokers or on disk before a key is retired.
        Raises what :meth:`loads` raises for a frame that does not verify
        (including :class:`ExpiredFrame` past ``max_age``).
        """
        try:
            header, payload = self._open(frame)
            if header.param & _frame.OUT_OF_BAND:
                # The payload (buffer table, pickle, buffers) is kept as it
                # is; only the header before it may change length (the key
                # id), so the buffers are laid out again for their alignment.
                pickled, buffers = _frame.split_buffers(payload, header.payload_start)
        except RejectedFrame as exc:
            raise self._refused(exc, frame) from None
        if header.param & _frame.OUT_OF_BAND:
            return self._sealing(
                pickled, header.param, buffers, header.created_ms, header.nonce
            ).to_bytes()
        return self._seal(payload, header.param, header.created_ms, header.nonce)

    def verify(self, frame: Buffer) -> FrameInfo:
        """
        Verify *frame* as :meth:`loads` does, without deserializing it, and
        return what its header says.
        """
        try:
            header, _ = self._open(frame)
        except RejectedFrame as exc:
            raise self._refused(exc, frame) from None
        return FrameInfo.from_header(header)

    def inspect(self, frame: Buffer) -> Inspection:
        """
        Report what *frame* says and would import, without deserializing it.

        Never raises for a refused frame: the :class:`Inspection` says whether
        it verified and, if not, why.  For pickle frames every global the
        payload names is checked against this codec's policy, which imports a
        module only if the policy admits that global (as loading would).
        """
        from ._inspect import inspect_with

        policy: Policy | None = getattr(self._serializer, "policy", None)
        if self._serializer.name == "msgpack":
            policy = Policy()  # a pickle frame is refused; flag it as by default
        registered = getattr(getattr(self._serializer, "_codec", None), "_by_name", {})
        return inspect_with(
            frame, self, policy, self._max_frame_size, frozenset(registered)
        )

    # -- consuming ---------------------------------------------------------

    def loads(self, frame: Buffer) -> Any:
        """
        Verify *frame* and return the object it carries.

        Raises a :class:`RejectedFrame` subclass if the frame is refused, at
        whichever check refused it first; nothing of the payload is
        deserialized before its tag has verified.
        """
        try:
            view: Any
            if type(frame) is bytes and len(frame) <= _SLICED:
                view = frame  # small: slicing bytes is cheaper than views
                size = len(frame)
            else:
                view = memoryview(frame)
                if view.itemsize != 1 or view.ndim != 1:
                    view = view.cast("B")  # e.g. a memoryview of an array of ints
                size = view.nbytes
            if _frame.MIN_FRAME_SIZE <= size <= self._small_max and (
                size >= (head := _HEADS[view[6]]).size + _frame.MIN_TAG_SIZE
            ):
                # The same checks in the same order, for a header whose
                # constant part (up to the key id) an earlier frame passed.
                lead, created_ms, nonce, length = head.unpack_from(view)
                known = self._leads.get(lead)
                if known is not None:
                    alg, key_id, mid, tag_size, param = known
                    end = size - tag_size
                    start = mid + _frame.MID_SIZE
                    key = self._keyring._mac_key(key_id, alg)
                    if length == end - start and key is not None:
                        expected = one_shot(alg, key, nonce, view[:end], self._context)
                        if not hmac.compare_digest(expected, view[end:]):
                            raise self._bad_tag()
                        age_ms = self._clock() * 1000.0 - created_ms
                        if age_ms >= -self._skew_ms and (
                            self._max_age_ms is None or age_ms <= self._max_age_ms
                        ):
                            payload = view[start:end]
                            if self._guard is not None:
                                self._check_replay(key_id, nonce, created_ms)
                            if param == self._plain_param and plain_data(payload, param):
                                try:
                                    value = pickle.loads(payload)
                                except Exception:  # reported as _deserialize does
                                    value = self._deserialize(param, payload, start)
                            else:
                                value = self._deserialize(param, payload, start)
                            self._opened += 1
                            return value
            header, payload = self._open(memoryview(frame))
            if self._guard is not None:
                self._check_replay(header.key_id, header.nonce, header.created_ms)
            value = self._deserialize(header.param, payload, header.payload_start)
            self._opened += 1
            return value
        except RejectedFrame as exc:
            raise self._refused(exc, frame) from None
        except ReplayGuardUnavailable as exc:
            self._guard_failed(exc)
            raise

    def unseal(self, frame: Buffer) -> bytes:
        """
        Verify *frame* and return its payload without deserializing it.
        """
        try:
            _, payload = self._open(frame)
            self._opened += 1
            return bytes(payload)
        except RejectedFrame as exc:
            raise self._refused(exc, frame) from None

    def _check_replay(self, key_id: bytes, nonce: bytes, created_ms: int) -> None:
        """
        Refuse a frame whose (key id, nonce) the guard already remembers, and
        have it remembered until ``created + max_age + clock_skew``.

        Forgetting it then is safe: from that instant every consumer whose
        clock is at most ``clock_skew`` behind the guard's refuses the frame
        as expired (its age is over max_age) before asking the guard.
        """
        guard = cast("ReplayGuard", self._guard)
        key = bytes((len(key_id),)) + key_id + nonce
        expires_at = (created_ms + self._window_ms) / 1000.0
        owner = self._replay_owner
        until = expires_at
        if owner:  # a RedisQueue consumer: held for a lease, renewed while held
            until = min(expires_at, self._replay_until())
        try:
            fresh = guard.check_and_remember(key, until, owner)
        except (RejectedFrame, ReplayGuardUnavailable):
            raise
        except Exception as exc:  # an unknown guard's error: fail closed
            raise ReplayGuardUnavailable(
                f"replay guard {type(guard).__name__} failed ({type(exc).__name__}); "
                "the frame was not accepted"
            ) from exc
        if not fresh:
            raise ReplayedFrame(
                "frame was already accepted within the replay window (same key id "
                "and nonce)" + (", or another consumer is processing it" if owner else "")
                + ": refused as a replay"
            )
        self._last_replay = (key, expires_at)

    def _guard_failed(self, exc: ReplayGuardUnavailable) -> None:
        self._refusals["replay_guard_unavailable"] += 1
        logger.warning("signedqueue: frame not accepted: %s", exc)

    def _claiming(self, owner: str, until: Callable[[], float]) -> Codec:
        """A private copy whose replay checks hold frames for *owner* until
        ``until()`` (a lease its holder renews) instead of the whole window,
        so that a frame redelivered after its holder died is accepted."""
        codec = self.with_context(self._context)
        codec._replay_owner = owner
        codec._replay_until = until
        return codec

    def _open(self, frame: Buffer) -> tuple[_frame.Header, memoryview]:
        view = memoryview(frame)
        if view.itemsize != 1 or view.ndim != 1:
            view = view.cast("B")  # e.g. a memoryview of an array of ints
        header, key = self._check_head(view, view.nbytes)
        self._check_tag(header, key, view)
        self._check_after_tag(header)
        if header.serializer == self._serializer.id:
            # Remember the constant part of this header for the fast path.
            lead = bytes(view[: _frame.LEAD_SIZE + len(header.key_id)])
            if lead not in self._leads:
                if len(self._leads) >= 64:
                    self._leads.clear()
                self._leads[lead] = (
                    header.alg, header.key_id, len(lead), TAG_SIZES[header.alg], header.param
                )
        return header, view[header.payload_start : header.payload_end]

    def _check_head(self, view: memoryview, size: int) -> tuple[_frame.Header, MacKey]:
        """Size limit, strict parse, MAC algorithm and key: the checks before the tag."""
        if size > self._max_frame_size:
            raise FrameTooLarge(
                f"frame of {size} bytes is over max_frame_size={self._max_frame_size}",
                size=size,
                limit=self._max_frame_size,
            )
        header = _frame.parse_head(view, size)
        if header.alg not in self._accept:
            accepted = sorted(MAC_NAMES[a] for a in self._accept)
            raise InvalidSignature(
                f"frame is signed with {MAC_NAMES[header.alg]!r}, which this codec "
                f"does not accept (it accepts {accepted!r}); to accept it, add "
                f"accept_macs={sorted({*accepted, MAC_NAMES[header.alg]})!r}"
            )
        key = self._keyring._mac_key(header.key_id, header.alg)
        if key is None:
            key_id = header.key_id.decode("ascii")
            raise UnknownKey(
                f"frame was signed with key id {key_id!r}, which this keyring does "
                f"not hold (it holds {list(self._keyring.key_ids)!r})",
                key_id=key_id,
            )
        return header, key

    def _check_tag(self, header: _frame.Header, key: MacKey, view: memoryview) -> None:
        end = header.payload_end
        expected = one_shot(header.alg, key, header.nonce, view[:end], self._context)
        if not hmac.compare_digest(expected, view[end:]):
            raise self._bad_tag()

    @staticmethod
    def _bad_tag() -> InvalidSignature:
        return InvalidSignature(
            "tag does not match: the frame was altered, or sealed under another "
            "key with this id or another context"
        )

    def _check_after_tag(self, header: _frame.Header) -> None:
        """Age and serializer: the checks between the tag and loading."""
        age_ms = self._clock() * 1000.0 - header.created_ms
        if age_ms < -self._skew_ms:
            raise ExpiredFrame(
                f"frame is dated {-age_ms / 1000:.3f} s in the future, beyond the "
                f"allowed clock skew of {self._skew_ms / 1000:g} s",
                age=age_ms / 1000,
            )
        if self._max_age_ms is not None and age_ms > self._max_age_ms:
            raise ExpiredFrame(
                f"frame is {age_ms / 1000:.3f} s old, over max_age="
                f"{self._max_age_ms / 1000:g} s",
                age=age_ms / 1000,
            )
        if header.serializer != self._serializer.id:
            raise MalformedFrame(
                f"frame was made by serializer "
                f"{_frame.SERIALIZER_NAMES[header.serializer]!r} but this codec "
                f"reads {self._serializer.name!r}"
            )

    def _deserialize(self, param: int, payload: memoryview, payload_start: int) -> Any:
        buffers = None
        if param & _frame.OUT_OF_BAND:
            payload, buffers = _frame.split_buffers(memoryview(payload), payload_start)
            if payload.readonly:
                # Arrays over a read-only frame (bytes) would be read-only,
                # unlike arrays loaded from an ordinary pickle: copy them.
                buffers = [memoryview(bytearray(b)) for b in buffers]
        try:
            return self._serializer.loads(payload, param, buffers)
        except Refusal as exc:
            refusals = self._all_refusals(payload, exc)
            entries = [r.entry for r in refusals if r.entry]
            hint = f"; to admit them, add allow={entries!r}" if entries else ""
            if len(refusals) == 1:
                hint = f"; to admit it, add allow=[{exc.entry!r}]" if exc.entry else ""
                message = f"refused global {exc.name!r}: it {exc.why}{hint}"
            else:
                message = (
                    f"refused {len(refusals)} globals: "
                    + "; ".join(f"{r.name!r} {r.why}" for r in refusals)
                    + hint
                )
            from ._presets import PRESETS

            wanted = {r.name for r in refusals}
            covering = sorted(p for p, names in PRESETS.items() if wanted & names)
            if entries and covering and covering != ["stdlib"]:
                message += (
                    f" (or use the {', '.join(map(repr, covering))} preset: "
                    f"allow=Allowlist(presets={sorted({'stdlib', *covering})!r}))"
                )
            raise ForbiddenClass(
                message,
                names=[r.name for r in refusals],
                allow_entries=[r.entry for r in refusals],
            ) from None
        except GlobalModified as exc:
            raise ForbiddenClass(
                "refused pickle: it tried to change the attributes of "
                + (f"a member of {exc.name!r}" if exc.member else repr(exc.name))
                + " (shared by the whole process, not a new instance); the change was "
                "undone",
                names=[exc.name],
                allow_entries=[None],
            ) from None
        except InvalidFields as exc:
            raise MalformedFrame(str(exc)) from None
        except UnregisteredClass as exc:
            raise ForbiddenClass(
                f"refused class {exc.name!r}: it is not registered; pass it in "
                "msgpack_types=[...]",
                names=[exc.name],
                allow_entries=[None],
            ) from None
        except UnsupportedProtocol as exc:
            raise MalformedFrame(str(exc)) from None
        except BudgetExceeded:
            raise MalformedFrame(
                "payload tried to build far more data than it carries (copy "
                "amplification); refused"
            ) from None
        except GuardRefused as exc:
            raise MalformedFrame(f"payload called a constructor in a refused form: {exc}") from None
        except RecursionError:
            raise MalformedFrame("payload is nested too deeply to load") from None
        except Exception as exc:
            # The message of the original error may quote payload bytes, so
            # only its type is kept.
            raise MalformedFrame(
                f"{self._serializer.name} payload could not be loaded "
                f"({type(exc).__name__})"
            ) from None

    def _all_refusals(self, payload: memoryview, first: Refusal) -> list[Refusal]:
        """Every global of the payload the policy refuses, the first one first."""
        policy = getattr(self._serializer, "policy", None)
        refusals = [first]
        if policy is None:
            return refusals
        try:
            names = pickle_globals(payload)
        except ScanError:
            return refusals
        for module, name in names[:_MAX_LISTED]:
            refusal = policy.check(module, name)
            if refusal is not None and refusal.name not in {r.name for r in refusals}:
                refusals.append(refusal)
        return refusals

    def _refused(self, exc: RejectedFrame, frame: Buffer) -> RejectedFrame:
        view = memoryview(frame).cast("B")
        # A frame refused for its size is not copied whole: keep its start.
        if isinstance(exc, FrameTooLarge):
            view = view[: _frame.KEPT_OF_OVERSIZED]
        exc.frame = raw = bytes(view)
        self._refusals[refusal_reason(exc)] += 1
        if exc.key_id is None:
            exc.key_id = _frame.peek_key_id(raw)
        logger.warning(
            "signedqueue: refused frame (%s): %s [key id %s, %d bytes]",
            type(exc).__name__,
            exc.reason,
            exc.key_id,
            exc.size if isinstance(exc, FrameTooLarge) else len(raw),
        )
        return exc


def _never() -> float:
    return float("inf")


def _random_nonce() -> bytes:
    return os.urandom(_frame.NONCE_SIZE)


def _rebuild_codec(keyring: Keyring, options: dict[str, Any]) -> Codec:
    return Codec(keyring, **options)
