"""
Inspecting a frame: what it says, whether it verifies, what it would import.

An inspection never deserializes a payload.  For pickle-family payloads it
lists the globals the pickle names (:func:`signedqueue._scan.pickle_globals`,
which walks opcodes and imports nothing) and asks the policy about each with
:meth:`Policy.check`.  ``Policy.check`` decides on the (module, name) strings
first and imports a module only when the policy admits that global, so an
inspection imports nothing that loading under the same policy would not
import too.  For msgpack payloads it lists the registered-class names the
payload carries, read with the same bounds as the msgpack serializer and
without constructing any class.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import _frame
from ._allowlist import _MODULE_RE, MAX_NAME_LENGTH, AllowEntry, Allowlist, Policy, entry_for
from ._msgpack import EXT, MAX_EXT_DEPTH, bounded_unpackb
from ._scan import ScanError, pickle_globals
from .exceptions import FrameTooLarge, MalformedFrame, RejectedFrame

if TYPE_CHECKING:  # pragma: no cover
    from ._codec import Codec, FrameInfo

__all__ = ["GlobalCheck", "Inspection", "inspect_frame"]

Buffer = bytes | bytearray | memoryview

#: At most this many distinct globals (or class names) are listed.
MAX_LISTED = 256

#: Why a frame inspected without a keyring is not verified.
NO_KEYRING = "no keyring: the tag was not checked"


@dataclass(frozen=True)
class GlobalCheck:
    """One global a payload names, and what the policy says about it."""

    #: The global as an ``allow=`` entry would name it (``"pkg.mod.Name"``,
    #: ``"pkg.mod:Outer.Inner"``), or a short quoted form if it is not a
    #: valid name; for msgpack, the registered-class name.
    name: str
    #: True if the policy refuses it (for msgpack: the class is not registered).
    refused: bool
    #: Why it is refused, or None.
    reason: str | None
    #: The exact ``allow=`` entry that admits it, or None if no entry can
    #: (refused even when allowlisted, not a valid name, or a msgpack class,
    #: which ``msgpack_types=`` admits instead).
    allow_entry: str | None


@dataclass(frozen=True)
class Inspection:
    """What :meth:`Codec.inspect` or :func:`inspect_frame` found in a frame."""

    #: The header, or None if the frame could not be parsed.  Its fields
    #: are trustworthy only if ``verified`` is True.
    header: FrameInfo | None
    #: True if the frame verified (size, key, tag, age, serializer).
    verified: bool
    #: The class name of the refusal (``"InvalidSignature"``, ...), or None
    #: if the frame verified or was not checked (no keyring).
    error: str | None
    #: Why the frame was refused or not checked; None if it verified.
    reason: str | None
    #: Every global the payload names (pickle), or registered class
    #: (msgpack), in order.
    globals: tuple[GlobalCheck, ...] = ()
    #: Why the payload could not be scanned, or None.
    scan_error: str | None = None

    @property
    def refused(self) -> tuple[GlobalCheck, ...]:
        """The globals the policy would refuse."""
        return tuple(g for g in self.globals if g.refused)

    @property
    def ok(self) -> bool:
        """True if the frame verified, was scanned and nothing would be refused."""
        return self.verified and self.scan_error is None and not self.refused

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the nonce as hex; no payload bytes)."""
        header = None
        if self.header is not None:
            h = self.header
            header = {
                "serializer": h.serializer,
                "protocol": h.param,
                "key_id": h.key_id,
                "created": h.created,
                "created_iso": iso_time(h.created),
                "nonce": h.nonce.hex(),
                "payload_size": h.payload_size,
            }
        if self.verified:
            status = "verified"
        elif self.error is None:
            status = "unverified"
        else:
            status = "refused"
        return {
            "ok": self.ok,
            "verification": {"status": status, "error": self.error, "reason": self.reason},
            "header": header,
            "globals": [
                {
                    "global": g.name,
                    "refused": g.refused,
                    "reason": g.reason,
                    "allow_entry": g.allow_entry,
                }
                for g in self.globals
            ],
            "scan_error": self.scan_error,
        }


def iso_time(seconds: float) -> str:
    """*seconds* since the epoch as ISO 8601 UTC, or the number if out of range."""
    import datetime

    try:
        moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    except (OverflowError, OSError, ValueError):
        return f"{seconds:.3f}"
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def inspect_frame(
    frame: Buffer,
    allow: Allowlist | Iterable[AllowEntry] | None = None,
    *,
    max_frame_size: int | None = None,
) -> Inspection:
    """
    Inspect *frame* without a keyring: its header (unverified), and every
    global its payload names checked against ``Policy(allow)`` (by default
    the stdlib preset).  The result is never ``verified``.
    """
    from ._codec import DEFAULT_MAX_FRAME_SIZE

    policy = Policy(allow)
    limit = DEFAULT_MAX_FRAME_SIZE if max_frame_size is None else max_frame_size
    return inspect_with(frame, None, policy, limit)


def inspect_with(
    frame: Buffer,
    codec: Codec | None,
    policy: Policy | None,
    max_frame_size: int,
    registered: frozenset[str] = frozenset(),
) -> Inspection:
    """
    Inspect *frame*, verifying it with *codec* (None: not verified) and
    flagging its globals with *policy* (None: nothing is refused, as under
    ``unsafe_trust_signed_frames``).  *registered*: the msgpack class names
    admitted.
    """
    from ._codec import FrameInfo

    view = memoryview(frame)
    if view.itemsize != 1 or view.ndim != 1:
        view = view.cast("B")
    try:
        header = _frame.parse_unverified(view)
    except MalformedFrame as exc:
        header = None
        parse_error: RejectedFrame | None = exc
    else:
        parse_error = None
    if view.nbytes > max_frame_size:
        # Not hashed and not scanned, as a codec would refuse it unhashed.
        return Inspection(
            header=None if header is None else FrameInfo.from_header(header),
            verified=False,
            error="FrameTooLarge",
            reason=str(
                FrameTooLarge(
                    f"frame of {view.nbytes} bytes is over max_frame_size={max_frame_size}",
                    size=view.nbytes,
                    limit=max_frame_size,
                )
            ),
            scan_error="not scanned: the frame is over max_frame_size",
        )
    if header is None:
        assert parse_error is not None  # noqa: S101 (type narrowing)
        return Inspection(None, False, type(parse_error).__name__, parse_error.reason)
    info = FrameInfo.from_header(header)
    verified = False
    error: str | None = None
    reason: str | None = NO_KEYRING
    if codec is not None:
        try:
            codec._open(view)
        except RejectedFrame as exc:
            error, reason = type(exc).__name__, exc.reason
        else:
            verified, reason = True, None
    payload = view[header.payload_start : header.payload_end]
    checks: list[GlobalCheck] = []
    scan_error: str | None = None
    try:
        if header.serializer == _frame.SERIALIZER_MSGPACK:
            for name in msgpack_class_names(payload):
                known = name in registered
                checks.append(
                    GlobalCheck(
                        name,
                        not known,
                        None if known else "is not registered (msgpack_types=[...])",
                        None,
                    )
                )
        else:
            for module, qualname in pickle_globals(payload)[:MAX_LISTED]:
                checks.append(_check(policy, module, qualname))
    except ScanError as exc:
        scan_error = str(exc)
    return Inspection(info, verified, error, reason, tuple(checks), scan_error)


def _check(policy: Policy | None, module: str, qualname: str) -> GlobalCheck:
    valid = bool(_MODULE_RE.match(module) and _MODULE_RE.match(qualname))
    shown = entry_for(module, qualname) if valid else repr(f"{module} {qualname}")[:80]
    if policy is None:
        return GlobalCheck(shown, False, None, shown if valid else None)
    refusal = policy.check(module, qualname)
    if refusal is None:
        return GlobalCheck(shown, False, None, shown)
    return GlobalCheck(refusal.name, True, refusal.why, refusal.entry)


def msgpack_class_names(payload: Buffer) -> list[str]:
    """
    The registered-class names a msgpack payload carries, in order, without
    duplicates; no class is constructed.  Raises :class:`ScanError` if the
    payload is not readable msgpack.
    """
    found: dict[str, None] = {}
    try:
        _walk_msgpack(bytes(payload), 0, found)
    except ScanError:
        raise
    except Exception as exc:  # msgpack raises ValueError and friends
        raise ScanError(f"not readable msgpack ({type(exc).__name__})") from None
    return list(found)[:MAX_LISTED]


def _walk_msgpack(data: bytes, depth: int, found: dict[str, None]) -> Any:
    if depth > MAX_EXT_DEPTH:
        raise ScanError(f"extension values nested more than {MAX_EXT_DEPTH} deep")
    return bounded_unpackb(data, functools.partial(_ext_hook, depth, found))


def _ext_hook(depth: int, found: dict[str, None], code: int, data: bytes) -> None:
    if code == EXT["registered"]:
        value = _walk_msgpack(data, depth + 1, found)
        if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
            name = value[0]
            found[name if len(name) <= MAX_NAME_LENGTH else repr(name)[:80]] = None
    elif code in (EXT["tuple"], EXT["set"], EXT["frozenset"]):
        _walk_msgpack(data, depth + 1, found)
    return None
