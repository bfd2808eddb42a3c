"""
signedqueue: signed, allowlisted frames for moving Python objects between
processes and machines.

Every frame carries an HMAC-SHA256 tag, keyed by a key id from a
:class:`Keyring`, which is verified before a single byte reaches a
deserializer; verified pickles are then loaded by a restricted unpickler that
admits only allowlisted globals.
"""

from __future__ import annotations

from ._allowlist import Allowlist
from ._audit import AuditReport
from ._codec import (
    DEFAULT_CLOCK_SKEW,
    DEFAULT_MAX_FRAME_SIZE,
    AuditModeWarning,
    Codec,
    FrameInfo,
)
from ._config import Config, ConfigError, load_config
from ._inspect import Inspection, inspect_frame
from ._keys import KeyInfo, Keyring
from ._metrics import REFUSAL_REASONS, CodecCounters, prometheus_text
from ._presets import PRESETS
from ._queue import SignedJoinableQueue, SignedQueue
from ._replay import FileReplayGuard, MemoryReplayGuard, RedisReplayGuard, ReplayGuard
from ._wrap import UnprotectedTransportWarning, WrappedQueue, wrap
from .exceptions import (
    BrokerUnavailable,
    ExpiredFrame,
    ForbiddenClass,
    FrameTooLarge,
    InvalidSignature,
    KeyringError,
    MalformedFrame,
    RejectedFrame,
    ReplayedFrame,
    ReplayGuardFull,
    ReplayGuardUnavailable,
    SignedQueueError,
    TransportError,
    UnknownKey,
)

__all__ = [
    "DEFAULT_CLOCK_SKEW",
    "DEFAULT_MAX_FRAME_SIZE",
    "PRESETS",
    "REFUSAL_REASONS",
    "Allowlist",
    "AuditModeWarning",
    "AuditReport",
    "BrokerUnavailable",
    "Codec",
    "CodecCounters",
    "Config",
    "ConfigError",
    "ExpiredFrame",
    "FileReplayGuard",
    "ForbiddenClass",
    "FrameInfo",
    "FrameTooLarge",
    "Inspection",
    "InvalidSignature",
    "KeyInfo",
    "Keyring",
    "KeyringError",
    "MalformedFrame",
    "MemoryReplayGuard",
    "RedisReplayGuard",
    "RejectedFrame",
    "ReplayGuard",
    "ReplayGuardFull",
    "ReplayGuardUnavailable",
    "ReplayedFrame",
    "SignedJoinableQueue",
    "SignedQueue",
    "SignedQueueError",
    "TransportError",
    "UnknownKey",
    "UnprotectedTransportWarning",
    "WrappedQueue",
    "inspect_frame",
    "load_config",
    "prometheus_text",
    "wrap",
]


def __getattr__(name: str) -> object:
    if name == "__version__":
        from importlib.metadata import version

        return version("signedqueue")
    raise AttributeError(f"module 'signedqueue' has no attribute {name!r}")
