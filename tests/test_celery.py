"""
End to end: real Celery workers over real Redis and RabbitMQ brokers.

One worker per (broker, pool) for the whole module, each on its own queue.
Tasks with custom classes round-trip; bad messages published straight to the
broker are refused without running (a canary file proves it) and reported,
while the worker keeps serving.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("celery")

import kombu

import celery_app
import signedqueue
from signedqueue.transports.kombu import CONTENT_TYPE, KombuSerializer

TESTS = Path(__file__).resolve().parent
#: Seconds to wait for a worker to start, a task to finish, a worker to stop.
WAIT = 30.0
TOUCH = "celery_app.touch_canary"


@dataclass
class Worker:
    """A running worker, its queue and what the test needs to reach it."""

    broker: str
    pool: str
    url: str
    queue: str
    app: Any
    serializer: KombuSerializer
    canary: Path
    log: Path
    proc: subprocess.Popen[bytes]
    dlq: str | None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


class Canary:
    """Unpickled, it writes the canary file: proves a body was never loaded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.write_text, (Path(self.path), "unpickled\n"))


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Warm shutdown; the whole process group is killed if it hangs."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    with contextlib.suppress(ProcessLookupError):  # children left by a crash
        os.killpg(proc.pid, signal.SIGKILL)


def _close(app: Any) -> None:
    """Close the client app, with the connection of an rpc:// result consumer."""
    consumer = getattr(app.backend, "result_consumer", None)
    connection = getattr(consumer, "_connection", None)
    if connection is not None:
        connection.close()
    app.close()


def _cleanup(url: str, queue: str, dlq: str | None) -> None:
    with kombu.Connection(url, connect_timeout=5) as conn:
        channel = conn.default_channel
        for name in (queue, dlq):
            if name is None:
                continue
            with contextlib.suppress(Exception):  # already gone
                channel.queue_delete(name)
        # Celery declares one named after the queue, and the remote control
        # exchanges are named after it too (control_exchange).
        pidbox = (f"{queue}.pidbox", f"reply.{queue}.pidbox")
        for exchange in (queue, dlq, *pidbox):
            if exchange is not None:
                with contextlib.suppress(Exception):
                    channel.exchange_delete(exchange)
        if url.startswith("redis"):
            # The routing tables kombu keeps for those exchanges.
            channel.client.delete(
                *(f"_kombu.binding{kind}.{name}" for kind in ("", "_permanent")
                  for name in (queue, *pidbox))
            )


WORKERS = [("redis", "prefork"), ("amqp", "prefork"), ("redis", "solo"), ("amqp", "solo")]


@pytest.fixture(scope="module", params=WORKERS, ids=[f"{b}-{p}" for b, p in WORKERS])
def worker(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Worker]:
    broker, pool = request.param
    url = request.getfixturevalue(f"{broker}_url")
    backend = url if broker == "redis" else "rpc://"
    directory = tmp_path_factory.mktemp(f"celery-{broker}-{pool}")
    ring_path = directory / "ring.json"
    signedqueue.Keyring.generate().to_file(ring_path)
    queue = f"sq-test-celery-{broker}-{pool}-{uuid.uuid4().hex[:10]}"
    dlq = None
    if broker == "amqp":
        # Rejected messages are dead-lettered here, so the test can see them.
        dlq = queue + ".dlx"
        with kombu.Connection(url) as conn:
            exchange = kombu.Exchange(dlq, type="fanout", durable=False)
            kombu.Queue(dlq, exchange, durable=False)(conn.default_channel).declare()
    env = celery_app.environ(url, backend, queue, ring_path, dlx=dlq, pool_restarts=True)
    log = directory / "worker.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "celery", "-A", "celery_app", "worker",
                "-P", pool, "-c", "1", "-Q", queue, "-n", f"{queue}@%h",
                "--without-gossip", "--without-mingle", "--without-heartbeat",
                "--loglevel=INFO",
            ],
            env={**os.environ, **env, "PYTHONPATH": str(TESTS)},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    app = celery_app.make_app(env)
    canary = directory / "canary"
    serializer = KombuSerializer(celery_app.codec(ring_path))
    w = Worker(broker, pool, url, queue, app, serializer, canary, log, proc, dlq)
    try:
        deadline = time.monotonic() + WAIT
        while "ready." not in w.log_text():
            assert proc.poll() is None, f"the worker exited:\n{w.log_text()}"
            assert time.monotonic() < deadline, f"the worker did not start:\n{w.log_text()}"
            time.sleep(0.05)
        yield w
    finally:
        _stop(proc)
        _close(app)
        _cleanup(url, queue, dlq)
    assert proc.returncode == 0, w.log_text()
    # The only log records with tracebacks are those of the task that fails
    # on purpose, the one Celery logs for an unknown task name, and those it
    # logs for refused remote control messages (with the body hidden).
    expected = ("raised unexpected: ValueError('expected", "Received unregistered task",
                "Can't decode message body")
    records = re.split(r"\n(?=\[\d{4}-\d\d-\d\d )", w.log_text())
    unexpected = [r for r in records if "Traceback" in r
                  and not any(e in r.partition("\n")[0] for e in expected)]
    assert not unexpected, "\n".join(unexpected)


def _headers(task: str, task_id: str) -> dict[str, Any]:
    """Protocol 2 headers as Celery's as_task_v2 writes them."""
    return {
        "lang": "py", "task": task, "id": task_id, "shadow": None, "eta": None,
        "expires": None, "group": None, "group_index": None, "retries": 0,
        "timelimit": [None, None], "root_id": task_id, "parent_id": None,
        "argsrepr": "(...)", "kwargsrepr": "{}", "origin": "test", "ignore_result": True,
        "stamped_headers": None, "stamps": {},
    }


def _publish(w: Worker, body: bytes, task: str = TOUCH, **headers: Any) -> str:
    """
    Publish *body* straight to the worker's queue as a task message, with
    *headers* over the usual ones (a value of ``None`` drops a header).
    """
    task_id = str(uuid.uuid4())
    sent = {**_headers(task, task_id), **headers}
    with kombu.Connection(w.url) as conn:
        conn.Producer().publish(
            body,
            exchange="",
            routing_key=w.queue,
            content_type=CONTENT_TYPE,
            content_encoding="binary",
            headers={k: v for k, v in sent.items() if v is not None or k not in headers},
            correlation_id=task_id,
            retry=True,
        )
    return task_id


def _refusal(w: Worker, task_id: str) -> str:
    """The worker's refusal line for *task_id* ("" if there is none)."""
    return next(
        (x for x in w.log_text().splitlines() if task_id in x and "signedqueue: refused" in x), ""
    )


def _task_body(path: Path) -> tuple[Any, ...]:
    return ((str(path),), {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None})


def test_custom_classes_round_trip(worker: Worker) -> None:
    app = worker.app
    point = app.tasks["celery_app.move"].delay(celery_app.Point(1.0, 2.0), 3.0, dy=1.5)
    assert point.get(timeout=WAIT) == celery_app.Point(4.0, 3.5)
    order = celery_app.Order("sku-1", 2, celery_app.Point(0, 0))
    shipped = app.tasks["celery_app.ship"].delay(order, to=celery_app.Point(5, 6)).get(
        timeout=WAIT
    )
    assert isinstance(shipped, celery_app.Order)
    assert (shipped.sku, shipped.quantity, shipped.where, shipped.shipped) == (
        "sku-1", 2, celery_app.Point(5, 6), True,
    )


def test_chains_callbacks_and_failures(worker: Worker) -> None:
    tasks = worker.app.tasks
    chained = (tasks["celery_app.add"].s(1, 2) | tasks["celery_app.add"].s(3)).apply_async()
    assert chained.get(timeout=WAIT) == 6
    linked = tasks["celery_app.move"].apply_async(
        (celery_app.Point(0, 0), 1.0), link=tasks["celery_app.echo"].s()
    )
    assert linked.get(timeout=WAIT) == celery_app.Point(1.0, 0.0)
    with pytest.raises(ValueError, match="expected failure"):
        tasks["celery_app.fail"].delay("expected failure").get(timeout=WAIT)


def test_bad_messages_are_refused_and_the_worker_keeps_serving(worker: Worker) -> None:
    s = worker.serializer
    canary = worker.canary
    other = signedqueue.Codec(signedqueue.Keyring.generate(), allow=celery_app.ALLOW)
    bad = {
        # An unsigned pickle under our content type; loading it writes the canary.
        "MalformedFrame": [pickle.dumps(((Canary(str(canary)),), {}, {}))],
        # Validly signed for the task, naming a class the allowlist refuses.
        "ForbiddenClass": [s.dumps_task(((Canary(str(canary)),), {}, {}), TOUCH)],
        # Signed with a key this keyring does not hold.
        "UnknownKey": [KombuSerializer(other).dumps_task(_task_body(canary), TOUCH)],
        "InvalidSignature": [
            # Signed for another task, re-targeted at this one.
            s.dumps_task(_task_body(canary), "celery_app.echo"),
            # A valid result (message) frame presented as a task.
            s.dumps_message(_task_body(canary)),
        ],
    }
    # A valid task frame whose body is not an (args, kwargs, embed) tuple:
    # Celery itself would crash the worker on it.
    not_a_body = s.task_codec(TOUCH).dumps(str(canary))
    bad["MalformedFrame"].append(not_a_body)
    ids = {name: [_publish(worker, body) for body in bodies] for name, bodies in bad.items()}

    # The worker still serves, and handled everything published before.
    assert worker.app.tasks["celery_app.add"].delay(2, 3).get(timeout=WAIT) == 5
    assert not canary.exists()
    log = worker.log_text()
    for name, task_ids in ids.items():
        for task_id in task_ids:
            line = next((x for x in log.splitlines() if task_id in x), "")
            assert "signedqueue: refused task message for celery_app.touch_canary" in line, log
            assert f": {name}: " in line, line
            assert "key id " in line
    assert "task did not run" in log
    # No body, and no part of one, reaches the log.
    assert str(canary) not in log
    assert f"Task {TOUCH}[" not in log
    _assert_not_redelivered(worker, [i for task_ids in ids.values() for i in task_ids])


def _assert_not_redelivered(w: Worker, task_ids: list[str]) -> None:
    """Refused messages left the queue for good (dead-lettered on RabbitMQ)."""
    with kombu.Connection(w.url) as conn:
        channel = conn.default_channel
        if w.broker == "redis":
            client = channel.client
            assert client.llen(w.queue) == 0
            unacked = b"".join(client.hvals(channel.unacked_key))
            assert not any(task_id.encode() in unacked for task_id in task_ids)
        else:
            _, waiting, _ = channel.queue_declare(w.queue, passive=True)
            assert waiting == 0
            assert w.dlq is not None
            dead = kombu.Queue(w.dlq, kombu.Exchange(w.dlq, type="fanout", durable=False),
                               durable=False)(channel)
            seen: set[str] = set()
            deadline = time.monotonic() + 5
            while not seen >= set(task_ids) and time.monotonic() < deadline:
                message = dead.get(no_ack=True)
                if message is None:
                    time.sleep(0.05)
                    continue
                seen.add(message.headers["id"])
            assert seen >= set(task_ids)


def test_a_stored_result_cannot_be_replayed_as_a_task(worker: Worker) -> None:
    """A result frame, which a worker seals from what a task returns."""
    body = _task_body(worker.canary)
    result = worker.app.tasks["celery_app.echo"].delay(body)
    assert result.get(timeout=WAIT) == body
    if worker.broker == "redis":
        # The frame the worker stored in the result backend, as it is.
        with kombu.Connection(worker.url) as conn:
            frame = conn.default_channel.client.get(f"celery-task-meta-{result.id}")
        assert frame is not None and frame.startswith(b"SQ")
    else:
        frame = worker.serializer.dumps_message(body)  # rpc:// results: the same kind
    task_id = _publish(worker, frame)
    assert worker.app.tasks["celery_app.add"].delay(1, 1).get(timeout=WAIT) == 2
    assert not worker.canary.exists()
    assert f"id '{task_id}'" in worker.log_text()
    assert ": InvalidSignature: " in worker.log_text()
    _assert_not_redelivered(worker, [task_id])


def test_unknown_tasks_are_rejected_without_logging_the_body(worker: Worker) -> None:
    """Celery's own handler for unknown task names is shown no body."""
    marker = f"marker-{uuid.uuid4().hex}"
    frame = worker.serializer.dumps_task(_task_body(worker.canary / marker), "celery_app.nope")
    # A client writes a repr of the arguments into these headers, as Celery does.
    task_id = _publish(
        worker,
        frame,
        task="celery_app.nope",
        argsrepr=f"('{marker}-args',)",
        kwargsrepr=f"{{'x': '{marker}-kwargs'}}",
    )
    assert worker.app.tasks["celery_app.add"].delay(1, 2).get(timeout=WAIT) == 3
    log = worker.log_text()
    assert "Received unregistered task of type 'celery_app.nope'" in log
    assert f"<signed body of {len(frame)} bytes, not shown>" in log
    assert "'argsrepr': '<not shown>', 'kwargsrepr': '<not shown>'" in log
    assert task_id in log  # the other headers are still shown
    assert marker not in log
    _assert_not_redelivered(worker, [task_id])


def test_a_message_frame_without_a_task_header_is_refused(worker: Worker) -> None:
    """
    Without a ``task`` header Celery would decode the body itself (protocol
    1) and take the task name and arguments from it.  Only a message frame
    opens there, and a worker signs message frames with keys a broker writer
    chooses (``result_extended`` results carry unsigned stamps): such a frame
    must not run as a task.
    """
    canary = str(worker.canary)
    bodies = {
        # A protocol 1 task body, validly signed as a message frame.
        "no task header": {
            "task": TOUCH, "id": str(uuid.uuid4()), "args": [canary], "kwargs": {},
            "retries": 0, "eta": None, "expires": None, "utc": True,
        },
    }
    ids = []
    for headers in ({"task": None}, {"task": 42}, {"task": [TOUCH]}, {"task": ""}):
        for body in bodies.values():
            frame = worker.serializer.dumps_message({**body, "id": str(uuid.uuid4())})
            ids.append(_publish(worker, frame, **headers))
    # The same, as a (args, kwargs, embed) tuple.
    ids.append(_publish(worker, worker.serializer.dumps_message(_task_body(worker.canary)),
                        task=None))
    assert worker.app.tasks["celery_app.add"].delay(2, 2).get(timeout=WAIT) == 4
    assert not worker.canary.exists()
    for task_id in ids:
        line = _refusal(worker, task_id)
        assert "refused task message without a task header" in line, worker.log_text()
        assert ": MalformedFrame: " in line
    assert f"Task {TOUCH}[" not in worker.log_text()
    _assert_not_redelivered(worker, ids)


def test_an_empty_body_is_refused(worker: Worker) -> None:
    """kombu does not call the decoder for an empty body; Celery crashed on it."""
    task_id = _publish(worker, b"")
    assert worker.app.tasks["celery_app.add"].delay(3, 3).get(timeout=WAIT) == 6
    line = _refusal(worker, task_id)
    assert f"refused task message for {TOUCH}" in line, worker.log_text()
    assert ": MalformedFrame: the message body is empty" in line
    assert worker.proc.poll() is None
    assert "Unrecoverable error" not in worker.log_text()
    _assert_not_redelivered(worker, [task_id])


def test_verification_survives_pool_restart(worker: Worker) -> None:
    """
    ``pool_restart`` (``worker_pool_restarts=True``) makes the consumer build
    every strategy afresh, without running the bootstep again.
    """
    node = f"{worker.queue}@{socket.gethostname()}"
    replies = worker.app.control.pool_restart(destination=[node], reply=True, limit=1, timeout=WAIT)
    assert replies and "ok" in replies[0][node], replies
    # Valid tasks still run: the pool is not handed a body it cannot open.
    assert worker.app.tasks["celery_app.add"].delay(4, 5).get(timeout=WAIT) == 9
    # And bad ones are still refused.
    s = worker.serializer
    bad = {
        "InvalidSignature": _publish(worker, s.dumps_message(_task_body(worker.canary))),
        "MalformedFrame": _publish(worker, pickle.dumps(((Canary(str(worker.canary)),), {}, {}))),
    }
    assert worker.app.tasks["celery_app.add"].delay(5, 5).get(timeout=WAIT) == 10
    assert not worker.canary.exists()
    for name, task_id in bad.items():
        line = _refusal(worker, task_id)
        assert f"refused task message for {TOUCH}" in line, worker.log_text()
        assert f": {name}: " in line
    _assert_not_redelivered(worker, list(bad.values()))


def test_the_strategy_verifies_only_what_it_decodes_itself() -> None:
    """
    Behind the handler's check, the strategy wrapper refuses a body Celery
    decoded (protocol 1), and empty or non-frame bodies, without calling the
    strategy; it hands a verified body on decoded.
    """
    from celery import Celery
    from kombu.message import Message

    from signedqueue.transports import celery as sqcelery

    content_type = "application/x-signedqueue-unit"
    serializer = sqcelery.setup(
        Celery("unit", set_as_current=False),
        signedqueue.Codec(signedqueue.Keyring.generate(), allow=celery_app.ALLOW),
        name="signedqueue-unit",
        content_type=content_type,
    )

    class Consumer:
        connection_errors = ()

    handled: list[Any] = []
    rejected: list[bool] = []
    strategy = sqcelery._verifying(TOUCH, lambda *a, **k: handled.append(a[0].body), Consumer())

    def deliver(body: Any, decoded: Any = None) -> None:
        message = Message(
            body=body, content_type=content_type, content_encoding="binary",
            headers={"id": "unit"}, delivery_info={"routing_key": "unit"},
        )
        strategy(message, decoded, None, lambda _l, _e, requeue: rejected.append(requeue), [])

    proto1 = {"task": TOUCH, "id": "unit", "args": ["x"], "kwargs": {}}
    deliver(serializer.dumps_message(proto1), decoded=proto1)
    deliver(b"")
    deliver("")
    deliver(None)
    deliver(serializer.dumps_message(_task_body(Path("x"))))
    assert handled == []
    assert rejected == [False] * 5
    deliver(serializer.dumps_task(_task_body(Path("x")), TOUCH))
    assert handled == [_task_body(Path("x"))]


def _control_message(w: Worker, body: bytes, content_type: str) -> None:
    """Publish *body* to the worker's remote control exchange (a broadcast)."""
    with kombu.Connection(w.url) as conn:
        exchange = kombu.Exchange(f"{w.queue}.pidbox", type="fanout", durable=False)
        conn.Producer().publish(
            body, exchange=exchange, routing_key="", content_type=content_type,
            content_encoding="binary", headers={"clock": 1}, retry=True,
        )


def test_remote_control_is_signed_and_results_cannot_pass_for_commands(worker: Worker) -> None:
    """
    Control commands work, signed under their own content type; a signed
    result or message frame saying ``shutdown`` is refused by the worker,
    under either content type, and the worker keeps serving.
    """
    from signedqueue.transports.celery import control_content_type

    node = f"{worker.queue}@{socket.gethostname()}"
    assert worker.app.control.ping(destination=[node], timeout=WAIT) == [{node: {"ok": "pong"}}]
    shutdown = {"method": "shutdown", "arguments": {}, "destination": None,
                "pattern": None, "matcher": None}
    frame = worker.serializer.dumps_message(shutdown)
    _control_message(worker, frame, CONTENT_TYPE)
    _control_message(worker, frame, control_content_type(CONTENT_TYPE))
    # The worker answers a ping sent after them (one control queue, in order).
    assert worker.app.control.ping(destination=[node], timeout=WAIT) == [{node: {"ok": "pong"}}]
    assert worker.app.tasks["celery_app.add"].delay(6, 7).get(timeout=WAIT) == 13
    assert worker.proc.poll() is None


def test_setup_gives_remote_control_its_own_serializer(tmp_path: Path) -> None:
    """Before and after app.control exists, its mailbox signs under the control type only."""
    from celery import Celery

    from signedqueue.transports.celery import control_content_type, setup

    codec = signedqueue.Codec(signedqueue.Keyring.generate())
    late = Celery("late", broker="memory://", set_as_current=False)
    setup(late, codec)
    early = Celery("early", broker="memory://", set_as_current=False)
    assert early.control.mailbox.serializer == early.conf.task_serializer
    setup(early, codec)
    for app in (late, early):
        mailbox = app.control.mailbox
        assert mailbox.serializer == "signedqueue-control"
        assert mailbox.accept == [control_content_type(CONTENT_TYPE)]
        assert app.conf.accept_content == [CONTENT_TYPE]
        app.close()
