"""
Counters of frames sealed, opened and refused, and their export.

Every :class:`~signedqueue.Codec` counts, in plain integers on the codec
object (no lock on the hot path: see docs/how-to/monitor.md for what that
means under threads), the frames it sealed, the frames it opened (``loads``
and ``unseal`` returned them) and the frames it refused, by reason.
:meth:`Codec.counters` returns a :class:`CodecCounters` snapshot;
:func:`prometheus_text` renders snapshots in the Prometheus text exposition
format, with no dependency.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .exceptions import (
    ExpiredFrame,
    ForbiddenClass,
    FrameTooLarge,
    InvalidSignature,
    MalformedFrame,
    RejectedFrame,
    ReplayedFrame,
    ReplayGuardFull,
    ReplayGuardUnavailable,
    UnknownKey,
)

__all__ = ["REFUSAL_REASONS", "CodecCounters", "prometheus_text", "refusal_reason"]

#: Every refusal reason a codec counts, in a fixed order.
REFUSAL_REASONS: tuple[str, ...] = (
    "too_large",
    "malformed",
    "unknown_key",
    "invalid_signature",
    "expired",
    "replayed",
    "replay_guard_full",
    "replay_guard_unavailable",
    "forbidden_class",
    "other",
)

# Most specific first (ReplayGuardFull is a ReplayedFrame).
_BY_CLASS: tuple[tuple[type[BaseException], str], ...] = (
    (FrameTooLarge, "too_large"),
    (MalformedFrame, "malformed"),
    (UnknownKey, "unknown_key"),
    (InvalidSignature, "invalid_signature"),
    (ExpiredFrame, "expired"),
    (ReplayGuardFull, "replay_guard_full"),
    (ReplayedFrame, "replayed"),
    (ReplayGuardUnavailable, "replay_guard_unavailable"),
    (ForbiddenClass, "forbidden_class"),
)


def refusal_reason(exc: RejectedFrame | ReplayGuardUnavailable) -> str:
    """The counter label of a refusal (one of :data:`REFUSAL_REASONS`)."""
    for cls, reason in _BY_CLASS:
        if isinstance(exc, cls):
            return reason
    return "other"


@dataclass(frozen=True)
class CodecCounters:
    """
    What one codec did in this process since it was made (see
    :meth:`Codec.counters`).  Add snapshots of several codecs or processes
    with ``+``.
    """

    #: Frames signed (``dumps``, ``seal``, ``reseal``, and queue puts).
    sealed: int = 0
    #: Frames verified and returned (``loads``, ``unseal``, queue gets).
    opened: int = 0
    #: Frames refused, by reason: every key of :data:`REFUSAL_REASONS`.
    refused: Mapping[str, int] = field(
        default_factory=lambda: dict.fromkeys(REFUSAL_REASONS, 0)
    )

    @property
    def refused_total(self) -> int:
        """Frames refused, whatever the reason."""
        return sum(self.refused.values())

    def __add__(self, other: CodecCounters) -> CodecCounters:
        if not isinstance(other, CodecCounters):
            return NotImplemented
        reasons = {r: self.refused.get(r, 0) + other.refused.get(r, 0) for r in REFUSAL_REASONS}
        return CodecCounters(self.sealed + other.sealed, self.opened + other.opened, reasons)

    def as_dict(self) -> dict[str, int]:
        """Flat ``{"sealed": ..., "opened": ..., "refused_expired": ...}``, for logs."""
        flat = {"sealed": self.sealed, "opened": self.opened}
        flat.update({f"refused_{r}": n for r, n in self.refused.items()})
        return flat


_LABEL_VALUE = re.compile(r'[\\"\n]')


def _label(value: str) -> str:
    return _LABEL_VALUE.sub(lambda m: {"\\": "\\\\", '"': '\\"', "\n": "\\n"}[m.group()], value)


def prometheus_text(
    counters: CodecCounters | Iterable[tuple[Mapping[str, str], CodecCounters]],
    *,
    prefix: str = "signedqueue",
) -> str:
    """
    Render counters in the Prometheus text exposition format (version 0.0.4)::

        signedqueue_frames_sealed_total 12
        signedqueue_frames_opened_total 10
        signedqueue_frames_refused_total{reason="expired"} 1

    Pass one :class:`CodecCounters`, or pairs of ``(labels, counters)`` to
    label each (e.g. ``({"queue": "orders"}, q.codec.counters())``).  Only
    counts and the labels you give appear: never frame bytes or key material.
    """
    if not re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", prefix):
        raise ValueError(f"prefix {prefix!r} is not a valid Prometheus metric name")
    series: list[tuple[Mapping[str, str], CodecCounters]] = (
        [({}, counters)] if isinstance(counters, CodecCounters) else list(counters)
    )
    for labels, _ in series:
        for name in labels:
            if not re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", name) or name == "reason":
                raise ValueError(f"invalid label name {name!r}")

    def labelled(labels: Mapping[str, str], extra: Mapping[str, str] = {}) -> str:
        both = {**labels, **extra}
        if not both:
            return ""
        return "{" + ",".join(f'{k}="{_label(str(v))}"' for k, v in both.items()) + "}"

    lines: list[str] = []
    for metric, help_text in (
        ("sealed", "Frames signed."),
        ("opened", "Frames verified and returned."),
    ):
        name = f"{prefix}_frames_{metric}_total"
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} counter")
        for labels, snapshot in series:
            lines.append(f"{name}{labelled(labels)} {getattr(snapshot, metric)}")
    name = f"{prefix}_frames_refused_total"
    lines.append(f"# HELP {name} Frames refused, by reason.")
    lines.append(f"# TYPE {name} counter")
    for labels, snapshot in series:
        for reason in REFUSAL_REASONS:
            count = snapshot.refused.get(reason, 0)
            lines.append(f"{name}{labelled(labels, {'reason': reason})} {count}")
    return "\n".join(lines) + "\n"
