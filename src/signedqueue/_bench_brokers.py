"""
The broker cases of ``python -m signedqueue bench``.

``redis-*``
    :class:`~signedqueue.transports.redis.RedisQueue` (put, then get + ack)
    beside plain redis-py: ``LPUSH`` of ``pickle.dumps(obj)`` and ``BRPOP`` +
    ``pickle.loads``.  Producer and consumer run in two fresh processes, as in
    the queue cases.  The signed queue does more than the baseline on purpose:
    it moves every frame to a processing list and removes it on ack, which is
    what makes it at-least-once; plain ``BRPOP`` loses a message whose
    consumer dies.
``celery-round-trip``
    Celery task round trips (``delay()`` then ``get()``, a batch in flight)
    through one real worker process per variant, over Redis as broker and
    result backend: signedqueue's serializer, Celery's ``json`` serializer and
    Celery's ``auth`` serializer (certificates, json inside).

Every case is skipped, with the reason, when its broker does not answer or
its client library is missing.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from ._bench import (
    _TIMEOUT,
    BenchmarkError,
    Case,
    _item_ok,
    _make_payload,
    _rate,
    _size_of,
    check_delivery,
    run_pair,
)
from ._codec import Codec
from ._keys import Keyring

REDIS_URL = os.environ.get("SIGNEDQUEUE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


def broker_reason(case: Case) -> str | None:
    """None when *case* can run here, else why not."""
    try:
        import redis
    except ImportError:
        return "redis-py is not installed: pip install 'signedqueue[redis]'"
    if case.kind == "celery":
        try:
            import celery  # noqa: F401
        except ImportError:
            return "Celery is not installed: pip install 'signedqueue[celery]'"
    try:
        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=2)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:  # any reason the broker cannot be used
        return f"Redis at {REDIS_URL} does not answer: {type(exc).__name__}: {exc}"
    return None


def _codec(case: Case, keyring: Keyring) -> Codec:
    return Codec(keyring, allow=case.options.get("allow"))


# -- redis -------------------------------------------------------------------


def _redis_producer(variant: str, name: str, codec: Codec, payload: str, count: int,
                    ready: Any, go: Any, report: Connection) -> None:
    try:
        import redis

        obj = _make_payload(payload)
        size = _size_of(obj)
        if variant == "signed":
            from .transports.redis import RedisQueue

            queue = RedisQueue(name, codec, url=REDIS_URL)
            ready.set()
            go.wait()
            start = time.perf_counter()
            for _ in range(count):
                queue.put(obj)
            queue.close()
        else:
            client = redis.Redis.from_url(REDIS_URL)
            dumps = pickle.dumps
            ready.set()
            go.wait()
            start = time.perf_counter()
            for _ in range(count):
                client.lpush(name, dumps(obj, 5))
            client.close()
        report.send(("producer", start, count, size * count))
    except BaseException as exc:
        report.send(("error", f"producer: {type(exc).__name__}: {exc}"))
        raise


def _redis_consumer(variant: str, name: str, codec: Codec, payload: str, count: int,
                    ready: Any, report: Connection) -> None:
    try:
        import redis

        received = nbytes = bad = 0
        if variant == "signed":
            from .transports.redis import RedisQueue

            queue = RedisQueue(name, codec, url=REDIS_URL)
            ready.set()
            for _ in range(count):
                delivery = queue.get(timeout=_TIMEOUT)
                item = delivery.value
                queue.ack(delivery)
                received += 1
                nbytes += _size_of(item)
                bad += not _item_ok(payload, item)
            end = time.perf_counter()
            queue.close()
        elif variant == "plain":
            client = redis.Redis.from_url(REDIS_URL)
            loads = pickle.loads
            ready.set()
            for _ in range(count):
                reply = client.brpop([name], timeout=int(_TIMEOUT))
                if reply is None:
                    raise BenchmarkError("BRPOP timed out")
                item = loads(reply[1])  # type: ignore[arg-type]
                received += 1
                nbytes += _size_of(item)
                bad += not _item_ok(payload, item)
            end = time.perf_counter()
            client.close()
        else:  # redis-reliable: RedisQueue's commands, without signing
            client = redis.Redis.from_url(REDIS_URL)
            loads = pickle.loads
            processing = f"{name}:processing"
            ready.set()
            for _ in range(count):
                data = client.blmove(name, processing, int(_TIMEOUT), "RIGHT", "LEFT")
                if data is None:
                    raise BenchmarkError("BLMOVE timed out")
                item = loads(data)  # type: ignore[arg-type]
                client.lrem(processing, 1, data)  # type: ignore[arg-type]
                received += 1
                nbytes += _size_of(item)
                bad += not _item_ok(payload, item)
            end = time.perf_counter()
            client.close()
        report.send(("consumer", end, received, nbytes, bad))
    except BaseException as exc:
        report.send(("error", f"consumer: {type(exc).__name__}: {exc}"))
        raise


def _run_redis(case: Case, variant: str, count: int, keyring: Keyring) -> dict[str, Any]:
    import multiprocessing

    import redis

    ctx = multiprocessing.get_context()
    name = f"signedqueue-bench-{uuid.uuid4().hex}"
    codec = _codec(case, keyring)
    try:
        messages = run_pair(ctx, f"{case.name}/{variant}",
                            _redis_producer, (variant, name, codec, case.payload, count), (),
                            _redis_consumer, (variant, name, codec, case.payload, count))
    finally:
        client = redis.Redis.from_url(REDIS_URL)
        keys = [name, f"{name}:processing",
                *client.scan_iter(match=f"signedqueue:{{{name}}}:*")]
        client.delete(*keys)
        client.close()
    _, start, sent, sent_bytes = messages["producer"]
    _, end, received, received_bytes, bad = messages["consumer"]
    check_delivery(sent, sent_bytes, received, received_bytes, bad)
    seconds = end - start
    return {"seconds": seconds, "sent": sent, "received": received,
            "sent_bytes": sent_bytes, "received_bytes": received_bytes,
            "rate": _rate(case, count, sent_bytes, seconds)}


# -- celery ------------------------------------------------------------------


class CeleryWorkers:
    """One real worker process per variant, started on first use, kept for the run."""

    def __init__(self, keyring: Keyring) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="signedqueue-bench-")
        self.root = Path(self._dir.name)
        self.keyring_path = self.root / "keyring.json"
        keyring.to_file(self.keyring_path)
        self.prefix = f"signedqueue-bench-{uuid.uuid4().hex[:12]}"
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    def environ(self, variant: str) -> dict[str, str]:
        """The variables that select *variant*'s app; its worker is started if need be."""
        from . import _bench_celery

        env = _bench_celery.environ(variant, REDIS_URL, self.prefix, str(self.root),
                                    str(self.keyring_path))
        if variant not in self._procs:
            log = open(self.root / f"worker-{variant}.log", "wb")  # noqa: SIM115
            self._procs[variant] = subprocess.Popen(  # noqa: S603 - our own argv
                [sys.executable, "-m", "celery", "-A", "signedqueue._bench_celery",
                 "worker", "--pool", "solo", "--loglevel", "WARNING",
                 "--without-gossip", "--without-mingle", "--without-heartbeat",
                 "--queues", _bench_celery.queue_name(self.prefix, variant)],
                env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
            log.close()
        return env

    def check(self, variant: str) -> None:
        """A :class:`BenchmarkError` with the worker's log if its worker died."""
        proc = self._procs.get(variant)
        if proc is not None and proc.poll() is not None:
            log = (self.root / f"worker-{variant}.log").read_text(errors="replace")
            raise BenchmarkError(f"the celery worker for {variant} exited with "
                                 f"{proc.returncode}:\n{log[-2000:]}")

    def close(self) -> None:
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self._procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._dir.cleanup()


@contextlib.contextmanager
def celery_workers(keyring: Keyring) -> Iterator[CeleryWorkers]:
    """Workers for the celery cases of one run, stopped at its end."""
    workers = CeleryWorkers(keyring)
    try:
        yield workers
    finally:
        workers.close()


def _celery_client(env: dict[str, str], payload: str, count: int,
                   report: Connection) -> None:
    # A process of its own: Celery's auth setup changes kombu's registry for
    # the whole process.
    try:
        from . import _bench_celery

        app = _bench_celery.make_app(env)
        obj = _make_payload(payload)
        # The first round trip waits for the worker to come up.
        deadline = time.monotonic() + 120
        while True:
            try:
                app.send_task(_bench_celery.TASK, args=(obj,)).get(timeout=2)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
        batch = 50
        received = bad = 0
        start = time.perf_counter()
        for first in range(0, count, batch):
            results = [app.send_task(_bench_celery.TASK, args=(obj,))
                       for _ in range(min(batch, count - first))]
            for result in results:
                item = result.get(timeout=_TIMEOUT)
                received += 1
                bad += not _item_ok(payload, item)
        seconds = time.perf_counter() - start
        report.send(("client", seconds, received, bad))
    except BaseException as exc:
        report.send(("error", f"client: {type(exc).__name__}: {exc}"))
        raise


def _run_celery(case: Case, variant: str, count: int, workers: CeleryWorkers) -> dict[str, Any]:
    import multiprocessing

    ctx = multiprocessing.get_context()
    env = workers.environ(variant)
    recv_end, send_end = ctx.Pipe(duplex=False)
    client = ctx.Process(target=_celery_client, daemon=True,
                         args=(env, case.payload, count, send_end))
    client.start()
    send_end.close()
    try:
        deadline = time.monotonic() + _TIMEOUT
        while not recv_end.poll(1.0):
            workers.check(variant)
            if time.monotonic() > deadline:
                raise BenchmarkError(f"{case.name}/{variant}: timed out")
        try:
            msg = recv_end.recv()
        except EOFError:
            raise BenchmarkError(f"{case.name}/{variant}: the client died "
                                 f"(exit code {client.exitcode})") from None
        if msg[0] == "error":
            workers.check(variant)
            raise BenchmarkError(f"{case.name}/{variant}: {msg[1]}")
    finally:
        client.join(5)
        if client.is_alive():
            client.terminate()
            client.join()
        recv_end.close()
    _, seconds, received, bad = msg
    check_delivery(count, 0, received, 0, bad)
    return {"seconds": seconds, "sent": count, "received": received,
            "sent_bytes": 0, "received_bytes": 0, "rate": _rate(case, count, 0, seconds)}


def run_case(case: Case, variant: str, count: int, keyring: Keyring,
             workers: CeleryWorkers | None) -> dict[str, Any]:
    """One sample of a broker case."""
    if case.kind == "redis":
        return _run_redis(case, variant, count, keyring)
    if workers is None:  # pragma: no cover - run() always passes them
        raise BenchmarkError("celery cases need workers")
    return _run_celery(case, variant, count, workers)
