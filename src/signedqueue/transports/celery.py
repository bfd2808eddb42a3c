"""
Celery integration: signed task and result messages, with the task name bound
into every task frame.

``setup(app, codec)`` registers the kombu serializer of
:mod:`signedqueue.transports.kombu`, points the app's serializer settings at
it and connects two hooks, because a kombu serializer sees only the body,
never the headers that name the task:

- publishing: a ``before_task_publish`` receiver announces the body object of
  the message about to be published, with the task name from its headers.
  kombu encodes that body in the same thread right after the signal, and the
  encoder seals exactly that object as a task frame for that name
  (``after_task_publish`` withdraws it);
- consuming: a consumer bootstep that runs after Celery's ``Tasks`` step wraps
  every task's strategy (the handler Celery calls for each task message, keyed
  by the ``task`` header).  The wrapper decodes the body while the expected
  task name is set, so the tag is checked against the task the message names.
  A refused message is logged (reason and key id, never the body) and
  rejected without requeue before Celery sees it.  An accepted one is handed
  on already decoded, so the pool never decodes it again.

See ``docs/how-to/celery.md``.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps, signals

from .._codec import Codec
from ..exceptions import RejectedFrame
from .kombu import (
    CONTENT_TYPE,
    NAME,
    KombuSerializer,
    _expected_task,
    _pending_task,
    register,
    rejected_cause,
)

__all__ = ["CANVAS", "VerifyTaskMessages", "setup"]

#: Allowlist entries task bodies need to carry canvas signatures (chains,
#: ``link=`` callbacks and errbacks, chords): Celery pickles each signature
#: as a call of ``celery.canvas.signature`` on a plain dict, which builds a
#: signature object and calls no task.  ``Codec(ring, allow=[*CANVAS, ...])``.
CANVAS = ("celery.canvas.signature",)

logger = logging.getLogger("signedqueue.celery")

_DISPATCH_UID = "signedqueue.transports.celery"
#: Registered content types, for the worker-side hook.
_content_types: set[str] = set()


def setup(
    app: Any, codec: Codec, *, name: str = NAME, content_type: str = CONTENT_TYPE
) -> KombuSerializer:
    """
    Make *app* sign its task and result messages with *codec*.

    Registers the serializer (see :func:`signedqueue.transports.kombu.register`),
    sets ``task_serializer`` and ``result_serializer`` to it and
    ``accept_content`` and ``result_accept_content`` to its content type only,
    connects the publish hook and adds the worker bootstep.  Call it where the
    app is defined, before the worker starts and before anything is sent.

    Raises:
        ValueError: The app uses task protocol 1, whose headers do not name
            the task.
    """
    if int(app.conf.task_protocol) != 2:
        raise ValueError("signedqueue needs Celery task protocol 2 (task_protocol=2)")
    serializer = register(codec, name=name, content_type=content_type)
    _content_types.add(content_type)
    app.conf.update(
        task_serializer=name,
        result_serializer=name,
        accept_content=[content_type],
        result_accept_content=[content_type],
    )
    signals.before_task_publish.connect(
        _before_task_publish, weak=False, dispatch_uid=_DISPATCH_UID + ".before"
    )
    signals.after_task_publish.connect(
        _after_task_publish, weak=False, dispatch_uid=_DISPATCH_UID + ".after"
    )
    steps = app.steps["consumer"]
    if VerifyTaskMessages not in steps:
        steps.add(VerifyTaskMessages)
    return serializer


def _before_task_publish(
    sender: Any = None, body: Any = None, headers: Any = None, **_: Any
) -> None:
    name = headers.get("task") if isinstance(headers, dict) else None
    if isinstance(name, str) and name:
        _pending_task.set((body, name))
    else:
        _pending_task.set(None)


def _after_task_publish(**_: Any) -> None:
    _pending_task.set(None)


def _printable(value: object, limit: int = 64) -> str:
    text = value if isinstance(value, str) else repr(value)
    return repr(text[:limit])


class VerifyTaskMessages(bootsteps.StartStopStep):  # type: ignore[misc]
    """
    Consumer bootstep: verifies each task message against the task it names
    before Celery builds a request from it.
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c: Any) -> None:
        """
        Wrap every task strategy of consumer *c* (again after a restart), and
        Celery's handlers for messages it cannot use, which log the body.
        """
        for task_name, handler in list(c.strategies.items()):
            if not getattr(handler, "_signedqueue_verifies", False):
                c.strategies[task_name] = _verifying(task_name, handler, c)
        for attribute in _BODY_LOGGERS:
            handler = getattr(c, attribute)
            if not getattr(handler, "_signedqueue_verifies", False):
                setattr(c, attribute, _hiding_body(handler))


#: Consumer methods that log (part of) the body of a message they discard:
#: unknown task names, messages without a task header, invalid messages and
#: bodies that do not decode.
_BODY_LOGGERS = ("on_unknown_task", "on_unknown_message", "on_invalid_task", "on_decode_error")


def _hiding_body(handler: Any) -> Any:
    """*handler*, shown a placeholder instead of the body of our messages."""

    def hide_body(*args: Any) -> Any:
        message = next((a for a in args if hasattr(a, "delivery_info")), None)
        if message is not None and message.content_type in _content_types:
            message.body = f"<signed body of {len(message.body)} bytes, not shown>".encode()
            # on_unknown_message, on_unknown_task and on_invalid_task take
            # the decoded body first, if there is one.
            if args and args[0] is not message:
                args = (None, *args[1:])
        return handler(*args)

    hide_body._signedqueue_verifies = True  # type: ignore[attr-defined]
    return hide_body


def _verifying(task_name: str, handler: Any, consumer: Any) -> Any:
    """A strategy that verifies the body, then calls *handler*."""

    def verify_then_handle(
        message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **kwargs: Any
    ) -> Any:
        if body is None and message.content_type in _content_types:
            token = _expected_task.set(task_name)
            try:
                payload = message.decode()
            except Exception as exc:
                refused = rejected_cause(exc)
                if refused is None:
                    raise
                _refuse(consumer, message, reject, task_name, refused)
                return None
            finally:
                _expected_task.reset(token)
            # Hand the body on decoded, as Celery does for protocol 1
            # messages: the Request takes it from the decode cache and the
            # pool receives the tuple (no content type: trace_task does not
            # decode it again, which it could not, without the task name).
            message.body = payload
            message.content_type = None
            message.content_encoding = None
        return handler(message, body, ack, reject, callbacks, **kwargs)

    verify_then_handle._signedqueue_verifies = True  # type: ignore[attr-defined]
    return verify_then_handle


def _refuse(
    consumer: Any, message: Any, reject: Any, task_name: str, refused: RejectedFrame
) -> None:
    headers = message.headers if isinstance(message.headers, dict) else {}
    delivery = message.delivery_info if isinstance(message.delivery_info, dict) else {}
    logger.error(
        "signedqueue: refused task message for %s (id %s, routing key %s): "
        "%s: %s [key id %s]; rejected without requeue, the task did not run",
        task_name,
        _printable(headers.get("id")),
        _printable(delivery.get("routing_key")),
        type(refused).__name__,
        refused.reason,
        refused.key_id,
    )
    reject(logger, consumer.connection_errors, False)
    signals.task_rejected.send(sender=consumer, message=message, exc=refused)
