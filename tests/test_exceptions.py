"""The exception tree, its attributes, and what str() and repr() may show."""

from __future__ import annotations

import copy
import pickle
from typing import Any

import pytest

import signedqueue
import signedqueue.exceptions
from signedqueue import (
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
    UnknownKey,
)

FRAME = b"SQ\x01\x01\x01\x05\x05alpha" + b"sq-exception-marker-41b7" + bytes(40)
MARKER = "sq-exception-marker-41b7"

#: Each refusal class with the keyword arguments it needs.
REFUSALS: list[tuple[type[RejectedFrame], dict[str, Any]]] = [
    (RejectedFrame, {}),
    (FrameTooLarge, {"size": 2000, "limit": 1000}),
    (MalformedFrame, {}),
    (UnknownKey, {}),
    (InvalidSignature, {}),
    (ExpiredFrame, {"age": -61.5}),
    (ReplayedFrame, {}),
    (ReplayGuardFull, {}),
    (ForbiddenClass, {"names": ["os.system"], "allow_entries": [None]}),
]
IDS = [cls.__name__ for cls, _ in REFUSALS]


def test_tree() -> None:
    """Every refusal is a RejectedFrame, which is a SignedQueueError, which is an Exception."""
    assert issubclass(SignedQueueError, Exception)
    assert issubclass(RejectedFrame, SignedQueueError)
    assert issubclass(KeyringError, SignedQueueError)
    assert not issubclass(KeyringError, RejectedFrame)
    assert not issubclass(SignedQueueError, RejectedFrame)
    for cls, _ in REFUSALS[1:]:
        parent = ReplayedFrame if cls is ReplayGuardFull else RejectedFrame
        assert parent in cls.__bases__, cls
    leaves = [cls for cls, _ in REFUSALS[1:] if cls is not ReplayedFrame]
    for cls in leaves:
        assert [cls] == [other for other in leaves if issubclass(cls, other)], cls


def test_exported() -> None:
    """Every exception class is exported from signedqueue and signedqueue.exceptions."""
    names = {
        "SignedQueueError", "KeyringError", "TransportError", "BrokerUnavailable",
        "ReplayGuardUnavailable",
    } | set(IDS)
    assert names == set(signedqueue.exceptions.__all__)
    for name in names:
        assert getattr(signedqueue.exceptions, name) is getattr(signedqueue, name)
        assert name in signedqueue.__all__


def test_transport_errors_are_connection_errors() -> None:
    """Broker failures are ConnectionErrors too, and never RejectedFrames."""
    from signedqueue.exceptions import BrokerUnavailable, TransportError

    assert issubclass(BrokerUnavailable, TransportError)
    assert issubclass(TransportError, ConnectionError)
    assert issubclass(TransportError, signedqueue.SignedQueueError)
    assert not issubclass(TransportError, RejectedFrame)


def test_replay_guard_unavailable_is_not_a_refusal() -> None:
    """A failed guard store is a ConnectionError, not a verdict on the frame."""
    assert issubclass(ReplayGuardUnavailable, ConnectionError)
    assert issubclass(ReplayGuardUnavailable, SignedQueueError)
    assert not issubclass(ReplayGuardUnavailable, RejectedFrame)
    assert issubclass(ReplayGuardFull, ReplayedFrame)


@pytest.mark.parametrize(("cls", "kwargs"), REFUSALS, ids=IDS)
@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_attributes(cls: type[RejectedFrame], kwargs: dict[str, Any], kind: type) -> None:
    """reason, frame (always bytes) and key_id are set, plus each subclass's own details."""
    exc = cls("a short reason", kind(FRAME), key_id="alpha", **kwargs)
    assert exc.reason == "a short reason"
    assert isinstance(exc.frame, bytes)
    assert exc.frame == FRAME
    assert exc.key_id == "alpha"
    assert exc.args == ("a short reason",)
    for name, value in kwargs.items():
        expected = tuple(value) if isinstance(value, list) else value
        assert expected == getattr(exc, name)


@pytest.mark.parametrize(("cls", "kwargs"), REFUSALS, ids=IDS)
def test_defaults(cls: type[RejectedFrame], kwargs: dict[str, Any]) -> None:
    """Without a frame or key id, .frame is empty bytes and .key_id is None."""
    exc = cls("reason", **kwargs)
    assert exc.frame == b""
    assert exc.key_id is None


def test_subclass_details_are_required_keywords() -> None:
    """FrameTooLarge needs size and limit, ExpiredFrame needs age, as keywords."""
    with pytest.raises(TypeError):
        FrameTooLarge("too large", b"")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        FrameTooLarge("too large", b"", 1, 2)  # type: ignore[misc]
    with pytest.raises(TypeError):
        ExpiredFrame("expired")  # type: ignore[call-arg]
    too_large = FrameTooLarge("r", size=2, limit=1)
    assert (too_large.size, too_large.limit) == (2, 1)
    assert ForbiddenClass("r").names == ()


@pytest.mark.parametrize(("cls", "kwargs"), REFUSALS, ids=IDS)
def test_str_and_repr_never_show_the_frame(
    cls: type[RejectedFrame], kwargs: dict[str, Any]
) -> None:
    """str() is the reason and repr() the class and reason: the frame bytes never appear."""
    exc = cls("tag does not match", FRAME, key_id="alpha", **kwargs)
    assert str(exc) == "tag does not match"
    assert f"{cls.__name__}('tag does not match')" == repr(exc)
    for text in (str(exc), repr(exc), repr(exc.args), str(exc.args)):
        assert MARKER not in text
        assert FRAME.hex() not in text
    assert MARKER.encode() in exc.frame


@pytest.mark.parametrize(("cls", "kwargs"), REFUSALS, ids=IDS)
def test_pickle_and_copy_round_trip(cls: type[RejectedFrame], kwargs: dict[str, Any]) -> None:
    """Pickling or copying keeps the class, reason, frame, key id and details."""
    exc = cls("reason", FRAME, key_id="alpha", **kwargs)
    exc.extra_note = "kept"  # type: ignore[attr-defined]
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        for clone in (pickle.loads(pickle.dumps(exc, protocol)), copy.copy(exc)):
            assert cls is type(clone)
            assert (clone.reason, clone.frame, clone.key_id) == ("reason", FRAME, "alpha")
            assert clone.args == ("reason",)
            assert repr(exc) == repr(clone)
            assert clone.extra_note == "kept"
            for name in kwargs:
                assert getattr(exc, name) == getattr(clone, name)


def test_catch_all_refusals() -> None:
    """``except RejectedFrame`` catches every refusal, and SignedQueueError catches that."""
    for cls, kwargs in REFUSALS:
        with pytest.raises(RejectedFrame):
            raise cls("r", **kwargs)
        with pytest.raises(SignedQueueError):
            raise cls("r", **kwargs)
