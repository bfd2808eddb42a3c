"""
The kombu serializer and the Celery publish hook, without a worker.

Kinds and task names bound into tags, refusals with their precise exception,
repeated decodes, and what a Celery app publishes (over kombu's in-memory
transport).
"""

from __future__ import annotations

import collections
import pickle
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("kombu")

import kombu
from kombu import serialization
from kombu.exceptions import DecodeError, EncodeError

import signedqueue
from signedqueue.transports import kombu as sqkombu
from signedqueue.transports.kombu import (
    CONTENT_TYPE,
    KIND_MESSAGE,
    KIND_TASK,
    KombuSerializer,
    frame_context,
    register,
    rejected_cause,
)

EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def body(*args: Any, **kwargs: Any) -> tuple[Any, ...]:
    return (args, kwargs, dict(EMBED))


@pytest.fixture
def serializer(ring: signedqueue.Keyring) -> Iterator[KombuSerializer]:
    """A serializer registered under a name of its own, unregistered after."""
    name = f"sq-test-{uuid.uuid4().hex[:8]}"
    s = register(
        signedqueue.Codec(ring, allow=["collections.OrderedDict"]),
        name=name,
        content_type=f"application/x-{name}",
    )
    yield s
    serialization.registry.unregister(name)


def test_register_adds_a_binary_serializer_under_its_content_type(
    serializer: KombuSerializer,
) -> None:
    content_type, encoding, frame = serialization.dumps({"a": [1, 2]}, serializer.name)
    assert (content_type, encoding) == (serializer.content_type, "binary")
    assert frame.startswith(b"SQ")
    assert serialization.registry.name_to_type[serializer.name] == serializer.content_type
    accept = {serializer.content_type}
    assert serialization.loads(frame, content_type, encoding, accept=accept) == {"a": [1, 2]}


def test_defaults(ring: signedqueue.Keyring) -> None:
    s = KombuSerializer(signedqueue.Codec(ring))
    assert (s.name, s.content_type) == ("signedqueue", CONTENT_TYPE)
    assert repr(s) == (
        "<KombuSerializer name='signedqueue' content_type='application/x-signedqueue'>"
    )


def test_plain_kombu_round_trip(serializer: KombuSerializer) -> None:
    with kombu.Connection("memory://") as conn:
        queue = conn.SimpleQueue(
            f"q-{uuid.uuid4().hex}", serializer=serializer.name, accept=[serializer.name]
        )
        try:
            queue.put(collections.OrderedDict(a=1))
            message = queue.get(timeout=5)
            assert message.content_type == serializer.content_type
            assert message.payload == collections.OrderedDict(a=1)
            message.ack()
        finally:
            queue.close()


def refused(serializer: KombuSerializer, frame: bytes, task: str | None = None) -> Any:
    """The exception kombu's loads raises, with the refusal behind it."""
    token = sqkombu._expected_task.set(task)
    try:
        with pytest.raises(DecodeError) as info:
            serialization.loads(
                frame, serializer.content_type, "binary", accept={serializer.content_type}
            )
    finally:
        sqkombu._expected_task.reset(token)
    cause = rejected_cause(info.value)
    assert cause is not None
    assert str(info.value) == cause.reason  # what Celery logs: no frame bytes
    return cause


def test_unsigned_pickle_is_refused(serializer: KombuSerializer) -> None:
    frame = pickle.dumps(body(1))
    assert type(refused(serializer, frame)) is signedqueue.MalformedFrame
    assert type(refused(serializer, frame, "t.add")) is signedqueue.MalformedFrame


def test_forbidden_class_is_refused(serializer: KombuSerializer) -> None:
    frame = serializer.dumps_task(body(collections.ChainMap()), "t.add")
    exc = refused(serializer, frame, "t.add")
    assert type(exc) is signedqueue.ForbiddenClass
    assert exc.names == ("collections.ChainMap",)


def test_unknown_key_is_refused(serializer: KombuSerializer) -> None:
    other = KombuSerializer(
        signedqueue.Codec(signedqueue.Keyring.generate()), content_type=serializer.content_type
    )
    exc = refused(serializer, other.dumps_task(body(1), "t.add"), "t.add")
    assert type(exc) is signedqueue.UnknownKey
    assert type(refused(serializer, other.dumps_message(1))) is signedqueue.UnknownKey


def test_kinds_are_told_apart(serializer: KombuSerializer) -> None:
    task_frame = serializer.dumps_task(body(1), "t.add")
    message_frame = serializer.dumps_message(body(1))
    # A task frame is no message, and a message frame (a result) no task.
    assert type(refused(serializer, task_frame)) is signedqueue.InvalidSignature
    assert type(refused(serializer, message_frame, "t.add")) is signedqueue.InvalidSignature
    with pytest.raises(signedqueue.InvalidSignature):
        serializer.loads_message(task_frame)
    with pytest.raises(signedqueue.InvalidSignature):
        serializer.loads_task(message_frame, "t.add")


def test_task_name_is_bound(serializer: KombuSerializer) -> None:
    frame = serializer.dumps_task(body(1), "t.add")
    assert serializer.loads_task(frame, "t.add") == body(1)
    exc = refused(serializer, frame, "t.delete_everything")
    assert type(exc) is signedqueue.InvalidSignature
    for other in ("t.ad", "t.addd", "T.add", "t.add\x00"):
        with pytest.raises(signedqueue.InvalidSignature):
            serializer.loads_task(frame, other)


def test_a_task_frame_must_carry_a_task_body(serializer: KombuSerializer) -> None:
    for not_a_body in ["x", (1, 2), ((), [], None), ([], {}, {}, {}), ((), {}, "embed")]:
        frame = serializer.task_codec("t.add").dumps(not_a_body)
        exc = refused(serializer, frame, "t.add")
        assert type(exc) is signedqueue.MalformedFrame
        assert exc.reason == "task frame does not carry an (args, kwargs, embed) tuple"
        assert exc.key_id == serializer.codec.keyring.active_id
    with pytest.raises(TypeError):
        serializer.dumps_task("x", "t.add")


def test_the_content_type_and_codec_context_are_bound(ring: signedqueue.Keyring) -> None:
    a = KombuSerializer(signedqueue.Codec(ring), content_type="application/x-a")
    b = KombuSerializer(signedqueue.Codec(ring), content_type="application/x-b")
    c = KombuSerializer(signedqueue.Codec(ring, context=b"orders"), content_type="application/x-a")
    for reader in (b, c):
        with pytest.raises(signedqueue.InvalidSignature):
            reader.loads_message(a.dumps_message(1))
        with pytest.raises(signedqueue.InvalidSignature):
            reader.loads_task(a.dumps_task(body(1), "t"), "t")


def test_frame_context_is_unambiguous() -> None:
    contexts = {
        frame_context("application/x-a", b"bc", KIND_MESSAGE),
        frame_context("application/x-ab", b"c", KIND_MESSAGE),
        frame_context("application/x-a", b"bc", KIND_TASK, "t"),
        frame_context("application/x-a", b"b", KIND_TASK, "ct"),
        frame_context("application/x-a", b"", KIND_TASK, "bct"),
    }
    assert len(contexts) == 5
    assert frame_context("application/x-a", b"", KIND_TASK, "t") == (
        b"signedqueue.kombu/1"
        + b"\x00\x00\x00\x0fapplication/x-a"
        + b"\x00\x00\x00\x00"
        + b"\x00\x00\x00\x04task"
        + b"\x00\x00\x00\x01t"
    )
    with pytest.raises(ValueError):
        frame_context("application/x-a", b"", KIND_TASK)
    with pytest.raises(ValueError):
        frame_context("application/x-a", b"", KIND_MESSAGE, "t")
    with pytest.raises(ValueError):
        frame_context("application/x-a", b"", b"result")


def test_a_body_decodes_any_number_of_times(serializer: KombuSerializer) -> None:
    frame = serializer.dumps_task(body(1, x=collections.OrderedDict(b=2)), "t.add")
    token = sqkombu._expected_task.set("t.add")
    try:
        for _ in range(3):
            assert serializer.loads(frame) == body(1, x=collections.OrderedDict(b=2))
            assert serializer.loads(memoryview(frame)) == body(1, x={"b": 2})
            assert serializer.loads(frame.decode("latin-1")) == body(1, x={"b": 2})
    finally:
        sqkombu._expected_task.reset(token)


def test_the_encoder_seals_a_task_only_for_the_announced_body(
    serializer: KombuSerializer,
) -> None:
    announced = body(1)
    token = sqkombu._pending_task.set((announced, "t.add"))
    try:
        task_frame = serializer.dumps(announced)
        # An equal body that is not the announced object is a message.
        equal_frame = serializer.dumps(body(1))
    finally:
        sqkombu._pending_task.reset(token)
    assert serializer.loads_task(task_frame, "t.add") == announced
    assert serializer.loads_message(equal_frame) == announced
    with pytest.raises(signedqueue.InvalidSignature):
        serializer.loads_task(equal_frame, "t.add")
    # Nothing announced: a message.
    assert serializer.loads_message(serializer.dumps(announced)) == announced


def test_bad_arguments(ring: signedqueue.Keyring) -> None:
    codec = signedqueue.Codec(ring)
    with pytest.raises(TypeError):
        KombuSerializer(ring)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        KombuSerializer(codec, name="a/b")
    with pytest.raises(ValueError):
        KombuSerializer(codec, content_type="signedqueue")
    with pytest.raises(ValueError):
        KombuSerializer(codec).task_codec("")


# -- Celery, without a worker ----------------------------------------------


@pytest.fixture
def celery_app(ring: signedqueue.Keyring) -> Iterator[tuple[Any, KombuSerializer, str]]:
    """A Celery app over kombu's in-memory transport, set up with a fresh name."""
    celery = pytest.importorskip("celery")
    from signedqueue.transports.celery import setup

    name = f"sq-celery-{uuid.uuid4().hex[:8]}"
    app = celery.Celery("t", broker="memory://", backend="cache+memory://", set_as_current=False)
    app.conf.task_default_queue = name
    s = setup(app, signedqueue.Codec(ring), name=name, content_type=f"application/x-{name}")

    @app.task(name="t.add", shared=False)
    def add(a: int, b: int) -> int:
        return a + b

    yield app, s, name
    app.close()
    serialization.registry.unregister(name)


def published(app: Any, queue: str) -> Any:
    """The one message waiting on *queue* (raw, not decoded)."""
    with app.connection_for_write() as conn:
        message = conn.default_channel.basic_get(queue, no_ack=True)
    assert message is not None
    return message


def test_setup_sets_the_config(celery_app: tuple[Any, KombuSerializer, str]) -> None:
    from signedqueue.transports.celery import VerifyTaskMessages

    app, s, name = celery_app
    assert app.conf.task_serializer == app.conf.result_serializer == name
    assert app.conf.accept_content == app.conf.result_accept_content == [s.content_type]
    assert VerifyTaskMessages in app.steps["consumer"]


def test_setup_refuses_task_protocol_1(ring: signedqueue.Keyring) -> None:
    celery = pytest.importorskip("celery")
    from signedqueue.transports.celery import setup

    app = celery.Celery("t", broker="memory://", set_as_current=False)
    app.conf.task_protocol = 1
    with pytest.raises(ValueError, match="protocol 2"):
        setup(app, signedqueue.Codec(ring))


def test_celery_publishes_task_frames_bound_to_the_task(
    celery_app: tuple[Any, KombuSerializer, str],
) -> None:
    app, s, name = celery_app
    app.tasks["t.add"].delay(2, 3)
    message = published(app, name)
    assert message.content_type == s.content_type
    assert message.headers["task"] == "t.add"
    args, kwargs, _ = s.loads_task(message.body, "t.add")
    assert (args, kwargs) == ((2, 3), {})
    with pytest.raises(signedqueue.InvalidSignature):
        s.loads_task(message.body, "t.other")
    with pytest.raises(signedqueue.InvalidSignature):
        s.loads_message(message.body)
    # The announcement ends with the publish: what is encoded next is a message.
    assert sqkombu._pending_task.get() is None
    assert s.loads_message(serialization.dumps(body(2, 3), name)[2]) == body(2, 3)


def test_results_are_message_frames(celery_app: tuple[Any, KombuSerializer, str]) -> None:
    app, s, _ = celery_app
    frame = app.backend.encode({"status": "SUCCESS", "result": 5})
    assert s.loads_message(frame) == {"status": "SUCCESS", "result": 5}
    with pytest.raises(signedqueue.InvalidSignature):
        s.loads_task(frame, "t.add")


def test_a_failed_publish_leaves_no_task_kind_behind(
    celery_app: tuple[Any, KombuSerializer, str],
) -> None:
    """If a publish fails after the signal, only that body object is a task."""
    app, s, _ = celery_app
    from signedqueue.transports import celery as sqcelery

    announced = body(1)
    sqcelery._before_task_publish(body=announced, headers={"task": "t.add"})
    try:
        frame = app.backend.encode(body(1))  # e.g. a result encoded next
        assert s.loads_message(frame) == body(1)
    finally:
        sqcelery._after_task_publish()


def test_encode_errors_are_kombus(celery_app: tuple[Any, KombuSerializer, str]) -> None:
    _, _, name = celery_app
    token = sqkombu._pending_task.set((["not", "a", "tuple"], "t.add"))
    try:
        with pytest.raises(EncodeError):
            serialization.dumps(sqkombu._pending_task.get()[0], name)  # type: ignore[index]
    finally:
        sqkombu._pending_task.reset(token)
