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
  by the ``task`` header), again whenever ``update_strategies`` replaces them
  (``pool_restart``).  The wrapper verifies the raw body as a task frame for
  the task the message names.  The step also wraps the task message handler,
  which refuses a message of ours without a ``task`` header: Celery would
  decode that one itself, as protocol 1, and take the task from the body.  A
  refused message is logged (reason and key id, never the body) and rejected
  without requeue before Celery sees it.  An accepted one is handed on
  already decoded, so the pool never decodes it again.

See ``docs/how-to/celery.md``.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps, signals
from kombu.utils.imports import symbol_by_name

from .._codec import Codec
from ..exceptions import MalformedFrame, RejectedFrame
from .kombu import (
    CONTENT_TYPE,
    NAME,
    KombuSerializer,
    _pending_task,
    _registered_serializer,
    register,
    rejected_cause,
)

__all__ = ["CANVAS", "VerifyTaskMessages", "control_content_type", "setup"]

#: Allowlist entries task bodies need to carry canvas signatures (chains,
#: ``link=`` callbacks and errbacks, chords): Celery pickles each signature
#: as a call of ``celery.canvas.signature`` on a plain dict, which builds a
#: signature object and calls no task.  ``Codec(ring, allow=[*CANVAS, ...])``.
CANVAS = ("celery.canvas.signature",)

logger = logging.getLogger("signedqueue.celery")

_DISPATCH_UID = "signedqueue.transports.celery"
#: Registered content types, for the worker-side hook.
_content_types: set[str] = set()
#: Their remote control content types, whose bodies are not logged either.
_control_types: set[str] = set()


def setup(
    app: Any, codec: Codec, *, name: str = NAME, content_type: str = CONTENT_TYPE
) -> KombuSerializer:
    """
    Make *app* sign its task and result messages with *codec*.

    Registers the serializer (see :func:`signedqueue.transports.kombu.register`),
    sets ``task_serializer`` and ``result_serializer`` to it and
    ``accept_content`` and ``result_accept_content`` to its content type only,
    connects the publish hook and adds the worker bootstep.  Remote control
    messages (``app.control``) get a second serializer, ``<name>-control``
    with content type ``<content_type>-control``, so that no other frame can
    pass for a control command.  Call it where the
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
    _sign_remote_control(app, codec, name, content_type)
    return serializer


def control_content_type(content_type: str) -> str:
    """The content type of remote control messages next to *content_type*."""
    return content_type + "-control"


def _sign_remote_control(app: Any, codec: Codec, name: str, content_type: str) -> None:
    """
    Give remote control messages (``app.control``: broadcasts, ping, revoke,
    shutdown, and the replies) a serializer and content type of their own.

    Celery sends them with ``task_serializer`` and accepts ``accept_content``.
    With one content type, a worker would take a signed *result* as a control
    command: results are dicts, kombu's pidbox calls ``dispatch(**body)``, and
    with ``result_extended`` a result carries keys copied from unsigned
    headers.  Under their own content type, bound into the tag, a result
    frame is refused by the control consumer and a control frame by
    everything else.
    """
    control_name, control_type = f"{name}-control", control_content_type(content_type)
    register(codec, name=control_name, content_type=control_type)
    _control_types.add(control_type)

    def switch(mailbox: Any) -> None:
        mailbox.serializer = control_name
        mailbox.accept = [control_type]

    if "control" in vars(app):  # app.control was made already
        switch(app.control.mailbox)
        return
    base = symbol_by_name(app.control_cls)  # type: ignore[no-untyped-call]

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        base.__init__(self, *args, **kwargs)
        switch(self.mailbox)

    app.control_cls = type("SignedControl", (base,), {"__init__": __init__})


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

    def __init__(self, c: Any, **kwargs: Any) -> None:
        # Before any step starts: the remote control step hands
        # c.on_decode_error to its own consumer when it starts.
        _hide_bodies(c)
        super().__init__(c, **kwargs)

    def start(self, c: Any) -> None:
        """
        Wrap, on consumer *c* (again after a restart): every task strategy;
        ``update_strategies``, so that strategies it makes afresh (on
        ``pool_restart``) are wrapped too; the task message handler, which
        refuses our messages that would not reach a strategy as protocol 2
        task messages; and Celery's handlers for messages it cannot use, which
        log the body and headers.
        """
        _wrap_strategies(c)
        if not getattr(c.update_strategies, "_signedqueue_verifies", False):
            c.update_strategies = _rewrapping(c.update_strategies, c)
        if not getattr(c.create_task_handler, "_signedqueue_verifies", False):
            c.create_task_handler = _guarding(c.create_task_handler, c)
        _hide_bodies(c)


def _hide_bodies(consumer: Any) -> None:
    """Wrap the handlers of *consumer* that would log bodies and arguments."""
    for attribute in _BODY_LOGGERS:
        handler = getattr(consumer, attribute)
        if not getattr(handler, "_signedqueue_verifies", False):
            setattr(consumer, attribute, _hiding_body(handler))


#: Consumer methods that log (part of) the body or the headers of a message
#: they discard: unknown task names, messages without a task header, invalid
#: messages and bodies that do not decode.
_BODY_LOGGERS = ("on_unknown_task", "on_unknown_message", "on_invalid_task", "on_decode_error")
#: Headers a client fills with a repr of the task's arguments (unsigned).
_ARGUMENT_HEADERS = ("argsrepr", "kwargsrepr")
_NOT_SHOWN = "<not shown>"


def _wrap_strategies(consumer: Any) -> None:
    """Wrap every strategy of *consumer* not wrapped yet."""
    for task_name, handler in list(consumer.strategies.items()):
        if not getattr(handler, "_signedqueue_verifies", False):
            consumer.strategies[task_name] = _verifying(task_name, handler, consumer)


def _rewrapping(update_strategies: Any, consumer: Any) -> Any:
    """*update_strategies*, then wrap the strategies it put in place."""

    def update_then_wrap(*args: Any, **kwargs: Any) -> Any:
        try:
            return update_strategies(*args, **kwargs)
        finally:
            _wrap_strategies(consumer)

    update_then_wrap._signedqueue_verifies = True  # type: ignore[attr-defined]
    return update_then_wrap


def _guarding(create_task_handler: Any, consumer: Any) -> Any:
    """
    *create_task_handler*, whose handler first refuses a message of ours
    without a ``task`` header naming the task as a str.

    Celery decodes such a message itself (protocol 1: the task name and
    arguments would come from the body), before any strategy could verify it
    as a task frame; only message frames would decode there.  The handler
    also makes sure the strategy the header names is wrapped, whatever
    replaced it.
    """

    def create(*args: Any, **kwargs: Any) -> Any:
        on_task_received = create_task_handler(*args, **kwargs)

        def guard(message: Any) -> Any:
            if message.content_type in _content_types:
                headers = message.headers
                task_name = headers.get("task") if isinstance(headers, dict) else None
                if not isinstance(task_name, str) or not task_name:
                    refused = MalformedFrame("the message has no task header naming a task")
                    _refuse(consumer, message, message.reject_log_error, None, refused)
                    return None
                strategies = consumer.strategies
                handler = strategies.get(task_name)
                if handler is not None and not getattr(handler, "_signedqueue_verifies", False):
                    strategies[task_name] = _verifying(task_name, handler, consumer)
            return on_task_received(message)

        guard._signedqueue_verifies = True  # type: ignore[attr-defined]
        return guard

    create._signedqueue_verifies = True  # type: ignore[attr-defined]
    return create


def _hiding_body(handler: Any) -> Any:
    """
    *handler*, shown a placeholder instead of the body of our messages, and
    their headers without the ``argsrepr`` and ``kwargsrepr`` of the task's
    arguments.
    """

    def hide_body(*args: Any) -> Any:
        message = next((a for a in args if hasattr(a, "delivery_info")), None)
        if message is not None and (
            message.content_type in _content_types or message.content_type in _control_types
        ):
            size = len(message.body) if isinstance(message.body, (bytes, str)) else 0
            message.body = f"<signed body of {size} bytes, not shown>".encode()
            if isinstance(message.headers, dict):
                message.headers = {
                    key: _NOT_SHOWN if key in _ARGUMENT_HEADERS else value
                    for key, value in message.headers.items()
                }
            # on_unknown_message, on_unknown_task and on_invalid_task take
            # the decoded body first, if there is one.
            if args and args[0] is not message:
                args = (None, *args[1:])
        return handler(*args)

    hide_body._signedqueue_verifies = True  # type: ignore[attr-defined]
    return hide_body


def _open_task(message: Any, task_name: str) -> Any:
    """
    The body of *message*, verified as a task frame for *task_name* and
    loaded; raises a ``RejectedFrame``.  The raw body is verified here, not
    through ``message.decode()``: kombu hands an empty body back without
    calling the decoder.
    """
    serializer = _registered_serializer(message.content_type)
    if serializer is None:
        raise MalformedFrame("no signedqueue serializer is registered for the content type")
    raw = message.body
    if isinstance(raw, str):
        # As KombuSerializer.loads: a transport that decoded binary as text.
        try:
            raw = raw.encode("latin-1")
        except UnicodeEncodeError:
            raise MalformedFrame("the message body is not a frame") from None
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise MalformedFrame("the message body is not a frame")
    if not raw:
        raise MalformedFrame("the message body is empty")
    return serializer.loads_task(raw, task_name)


def _verifying(task_name: str, handler: Any, consumer: Any) -> Any:
    """A strategy that verifies the body, then calls *handler*."""

    def verify_then_handle(
        message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **kwargs: Any
    ) -> Any:
        if message.content_type in _content_types:
            try:
                if body is not None:
                    # Decoded by Celery (protocol 1, no task header): only a
                    # message frame decodes there, never a task frame.
                    raise MalformedFrame("not a protocol 2 task message (no task header)")
                payload = _open_task(message, task_name)
            except Exception as exc:
                refused = rejected_cause(exc)
                if refused is None:
                    # Refuse rather than let it reach Celery, which would stop
                    # the worker and have the message redelivered.
                    refused = MalformedFrame(
                        f"the body could not be verified ({type(exc).__name__})"
                    )
                _refuse(consumer, message, reject, task_name, refused)
                return None
            # Hand the body on decoded, as Celery does for protocol 1
            # messages: the Request takes it from the decode cache and the
            # pool receives the tuple (no content type: trace_task does not
            # decode it again, which it could not, without the task name).
            message.body = payload
            message._decoded_cache = payload
            message.content_type = None
            message.content_encoding = None
        return handler(message, body, ack, reject, callbacks, **kwargs)

    verify_then_handle._signedqueue_verifies = True  # type: ignore[attr-defined]
    return verify_then_handle


def _refuse(
    consumer: Any, message: Any, reject: Any, task_name: str | None, refused: RejectedFrame
) -> None:
    headers = message.headers if isinstance(message.headers, dict) else {}
    delivery = message.delivery_info if isinstance(message.delivery_info, dict) else {}
    logger.error(
        "signedqueue: refused %s (id %s, routing key %s): "
        "%s: %s [key id %s]; rejected without requeue, the task did not run",
        "task message without a task header"
        if task_name is None
        else f"task message for {task_name}",
        _printable(headers.get("id")),
        _printable(delivery.get("routing_key")),
        type(refused).__name__,
        refused.reason,
        refused.key_id,
    )
    reject(logger, consumer.connection_errors, False)
    signals.task_rejected.send(sender=consumer, message=message, exc=refused)
