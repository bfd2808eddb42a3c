"""
The Celery app the end-to-end tests run real workers with.

The worker process (``celery -A celery_app worker``, with ``tests/`` on
``PYTHONPATH``) and the test build the same app from the same settings, which
reach the worker as environment variables (see :func:`environ`):

``SIGNEDQUEUE_TEST_CELERY_BROKER`` / ``_BACKEND``
    Broker and result backend URLs.
``SIGNEDQUEUE_TEST_CELERY_QUEUE``
    The one queue tasks are sent to and the worker consumes (unique per run).
``SIGNEDQUEUE_TEST_CELERY_KEYRING``
    Path of the keyring file (mode 0600) both sides sign and verify with.
``SIGNEDQUEUE_TEST_CELERY_SERIALIZER``
    ``signedqueue`` (default) or ``json``, Celery's own, for comparison runs.
``SIGNEDQUEUE_TEST_CELERY_DLX``
    Optional: a RabbitMQ exchange the queue dead-letters rejected messages to.
``SIGNEDQUEUE_TEST_CELERY_POOL_RESTARTS``
    ``1``: set ``worker_pool_restarts`` (the ``pool_restart`` control command).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from celery import Celery
from kombu import Queue

import signedqueue
from signedqueue.transports.celery import CANVAS, setup

BROKER = "SIGNEDQUEUE_TEST_CELERY_BROKER"
BACKEND = "SIGNEDQUEUE_TEST_CELERY_BACKEND"
QUEUE = "SIGNEDQUEUE_TEST_CELERY_QUEUE"
KEYRING = "SIGNEDQUEUE_TEST_CELERY_KEYRING"
SERIALIZER = "SIGNEDQUEUE_TEST_CELERY_SERIALIZER"
DLX = "SIGNEDQUEUE_TEST_CELERY_DLX"
POOL_RESTARTS = "SIGNEDQUEUE_TEST_CELERY_POOL_RESTARTS"

#: The classes of this module tasks take and return, and canvas signatures.
ALLOW = ["celery_app.Point", "celery_app.Order", *CANVAS]


@dataclasses.dataclass(frozen=True)
class Point:
    """A custom class passed as an argument and returned as a result."""

    x: float
    y: float


class Order:
    """A plain class with state, nested in arguments and results."""

    def __init__(self, sku: str, quantity: int, where: Point) -> None:
        self.sku = sku
        self.quantity = quantity
        self.where = where
        self.shipped = False

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Order) and vars(self) == vars(other)

    __hash__ = None  # type: ignore[assignment]


def environ(
    broker: str,
    backend: str,
    queue: str,
    keyring_path: str | os.PathLike[str],
    serializer: str = "signedqueue",
    dlx: str | None = None,
    pool_restarts: bool = False,
) -> dict[str, str]:
    """The environment variables that describe an app (for the worker)."""
    env = {
        BROKER: broker,
        BACKEND: backend,
        QUEUE: queue,
        KEYRING: os.fspath(keyring_path),
        SERIALIZER: serializer,
    }
    if dlx is not None:
        env[DLX] = dlx
    if pool_restarts:
        env[POOL_RESTARTS] = "1"
    return env


def codec(keyring_path: str | os.PathLike[str]) -> signedqueue.Codec:
    """The codec both sides use."""
    return signedqueue.Codec(signedqueue.Keyring.from_file(keyring_path), allow=ALLOW)


def make_app(env: Mapping[str, str]) -> Celery:
    """The app *env* describes, with this module's tasks registered."""
    app = Celery("celery_app", broker=env[BROKER], backend=env[BACKEND], set_as_current=False)
    queue_arguments = None
    if env.get(DLX):
        queue_arguments = {"x-dead-letter-exchange": env[DLX]}
    app.conf.update(
        task_queues=[Queue(env[QUEUE], routing_key=env[QUEUE], queue_arguments=queue_arguments)],
        task_default_queue=env[QUEUE],
        task_default_routing_key=env[QUEUE],
        result_expires=300,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=True,
        worker_pool_restarts=env.get(POOL_RESTARTS) == "1",
        # Remote control of its own: other workers on the broker, with other
        # keys, never see (and log) this one's control messages.
        control_exchange=env[QUEUE],
    )
    serializer = env.get(SERIALIZER, "signedqueue")
    if serializer == "signedqueue":
        setup(app, codec(env[KEYRING]))
    elif serializer == "json":
        app.conf.update(
            task_serializer="json",
            result_serializer="json",
            accept_content=["json"],
            result_accept_content=["json"],
        )
    else:
        raise ValueError(f"unknown serializer {serializer!r}")

    @app.task(name="celery_app.add", shared=False)
    def add(a: Any, b: Any) -> Any:
        return a + b

    @app.task(name="celery_app.echo", shared=False)
    def echo(value: Any) -> Any:
        return value

    @app.task(name="celery_app.move", shared=False)
    def move(point: Point, dx: float, dy: float = 0.0) -> Point:
        return Point(point.x + dx, point.y + dy)

    @app.task(name="celery_app.ship", shared=False)
    def ship(order: Order, to: Point) -> Order:
        shipped = Order(order.sku, order.quantity, to)
        shipped.shipped = True
        return shipped

    @app.task(name="celery_app.fail", shared=False)
    def fail(message: str) -> None:
        raise ValueError(message)

    @app.task(name="celery_app.touch_canary", shared=False)
    def touch_canary(path: str) -> str:
        # The task every bad message names: it must never run.
        Path(path).write_text("the task ran\n")
        return path

    return app


_app: Celery | None = None


def __getattr__(name: str) -> Any:
    # ``celery -A celery_app`` looks for ``app``: built from the environment.
    global _app
    if name == "app":
        if _app is None:
            _app = make_app(os.environ)
        return _app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
