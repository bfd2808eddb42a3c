"""
``python -m signedqueue bench``: throughput of :class:`SignedQueue` beside
``multiprocessing.Queue``, and of the codec beside a hand-rolled
pickle + HMAC, measured side by side in one run, with well-known peers
(itsdangerous, Fernet, faster-fifo) when they are installed.

Method (docs/benchmarks.md has the long form):

* Trials are interleaved: every trial runs every selected case once, and
  within a case every variant once, rotating which goes first, so drift in
  the machine's load affects all variants alike.  Medians are reported, and
  every variant's median is divided by the ``plain`` median of its case.
* Queue cases run the producer and the consumer in two fresh processes.
  The payload is built in the producer before the clock starts; the clock
  runs from the producer's first ``put`` to the consumer's last ``get``
  (``time.perf_counter``, a system-wide monotonic clock on Linux and
  macOS).
* Every queue run is checked: the consumer counts the items and payload
  bytes it received and the run fails (:class:`BenchmarkError`) unless both
  equal what the producer sent.
* Codec cases run in-process, ``timeit``-style: a fixed number of
  round trips (seal + open) per sample.

Nothing here asserts on timings.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import hmac
import importlib
import importlib.metadata
import inspect
import json
import multiprocessing
import os
import pickle
import platform
import secrets
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from queue import Empty
from types import ModuleType
from typing import Any, TextIO

from ._allowlist import Allowlist
from ._codec import Codec
from ._keys import Keyring
from ._queue import SignedQueue
from ._serializers import DEFAULT_PROTOCOL

__all__ = ["CASES", "PEERS", "BenchmarkError", "Peer", "Point", "run"]

MIB = 1024 * 1024
#: Frames buffered per queue are bounded to about this many bytes (every
#: variant gets the same ``maxsize``), so large payloads cannot pile up.
_BUFFER_BUDGET = 256 * MIB
#: Seconds to wait for a benchmark process before giving up.
_TIMEOUT = 600.0
#: The MAC of the ``fast`` variant.
FAST_MAC = "aes256-gmac"
#: What ``--png`` needs, and how to get it.
INSTALL_HINT = "pip install 'signedqueue[bench]'"


class BenchmarkError(RuntimeError):
    """A benchmark run did not deliver what it sent, or a process failed."""


@dataclass(frozen=True)
class Point:
    """The small custom class of the ``objects-100`` case (allowlisted)."""

    x: int
    y: float
    label: str


POINT_ALLOW = ["signedqueue._bench.Point"]


@dataclass(frozen=True)
class Case:
    """One benchmark: a payload and how many times to send it."""

    name: str
    kind: str  # "queue", "codec", or a broker case: "redis" or "celery"
    description: str
    unit: str  # "msgs/s" or "GB/s"
    count: int  # messages per queue trial, or round trips per codec sample
    quick_count: int
    payload: str  # key into _make_payload
    needs_numpy: bool = False
    #: Also run the ``fast`` variant (``mac="aes256-gmac"``).
    fast: bool = False
    options: dict[str, Any] = field(default_factory=dict)


CASES: tuple[Case, ...] = (
    Case("small-dict", "queue", 'the dict {"a": 1, "b": [2, 3]}', "msgs/s",
         60_000, 20_000, "small-dict"),
    Case("objects-100", "queue", "a list of 100 Point objects (allowlisted class)", "msgs/s",
         6_000, 2_000, "objects-100", options={"allow": POINT_ALLOW}),
    Case("bytes-1mib", "queue", "1 MiB bytes object", "GB/s",
         500, 250, "bytes-1mib", fast=True),
    Case("bytes-64mib", "queue", "64 MiB bytes object", "GB/s",
         8, 3, "bytes-64mib", fast=True),
    Case("numpy-64mib", "queue", "64 MiB numpy float64 array "
         '(allow=Allowlist.preset("stdlib", "numpy"))', "GB/s",
         8, 3, "numpy-64mib", needs_numpy=True, fast=True, options={"numpy": True}),
    Case("codec-small-dict", "codec", 'Codec dumps+loads of {"a": 1, "b": [2, 3]} vs '
         "pickle + hmac by hand", "msgs/s", 100_000, 40_000, "small-dict"),
    Case("codec-bytes-1mib", "codec", "Codec dumps+loads of 1 MiB bytes vs "
         "pickle + hmac by hand", "GB/s", 300, 150, "bytes-1mib", fast=True),
    Case("codec-bytes-64mib", "codec", "Codec dumps+loads of 64 MiB bytes vs "
         "pickle + hmac by hand", "GB/s", 6, 3, "bytes-64mib", fast=True),
    Case("redis-small-dict", "redis", 'RedisQueue put, get + ack of {"a": 1, "b": [2, 3]} '
         "vs redis-py LPUSH/BRPOP of pickle", "msgs/s", 20_000, 4_000, "small-dict"),
    Case("redis-bytes-1mib", "redis", "RedisQueue put, get + ack of 1 MiB bytes vs "
         "redis-py LPUSH/BRPOP of pickle", "GB/s", 300, 100, "bytes-1mib"),
    Case("celery-round-trip", "celery", "Celery echo task round trips of "
         '{"a": 1, "b": [2, 3]}, 50 in flight, one solo worker, Redis broker and backend; '
         "plain = Celery's json serializer", "tasks/s", 2_000, 400, "small-dict"),
)

#: Cases that need a broker (see _bench_brokers).
BROKER_KINDS = ("redis", "celery")

CASE_NAMES = tuple(c.name for c in CASES)


@dataclass(frozen=True)
class Peer:
    """Another library measured on the same cases, if it is installed."""

    name: str  # the variant name
    module: str  # what must be importable
    distribution: str  # for the version number
    kind: str  # the cases it runs in: "queue" or "codec"
    description: str


PEERS: tuple[Peer, ...] = (
    Peer("faster-fifo", "faster_fifo", "faster-fifo", "queue",
         "faster_fifo.Queue(max_size_bytes=...), pickle (its default), no signature"),
    Peer("itsdangerous", "itsdangerous", "itsdangerous", "codec",
         "itsdangerous.Signer(key, digest_method=hashlib.sha256): "
         "sign(pickle.dumps(obj)), then unsign + pickle.loads"),
    Peer("fernet", "cryptography.fernet", "cryptography", "codec",
         "cryptography Fernet: encrypt(pickle.dumps(obj)), then decrypt + pickle.loads"),
    Peer("redis-reliable", "redis", "redis", "redis",
         "redis-py LPUSH, then BLMOVE to a processing list and LREM to acknowledge, of "
         "pickle: the commands RedisQueue sends, unsigned"),
    Peer("celery-auth", "celery.security", "celery", "celery",
         "Celery's auth serializer: task messages signed with RSA and a certificate, "
         "json inside (app.setup_security())"),
)

#: Every variant a case can have, in table, chart and JSON order.
VARIANTS: dict[str, str] = {
    "plain": "multiprocessing.Queue (queue cases); pickle + hmac by hand (codec cases); "
    "redis-py LPUSH/BRPOP of pickle (redis cases); Celery's json serializer (celery cases)",
    "signed": "SignedQueue(keyring) / Codec(keyring) / RedisQueue(name, codec) / "
    "signedqueue.transports.celery.setup(app, codec): HMAC-SHA256, the default",
    "fast": f'SignedQueue(keyring, mac="{FAST_MAC}") / Codec(keyring, mac="{FAST_MAC}")',
    **{p.name: p.description for p in PEERS},
}


def _try_import(module: str) -> ModuleType:
    """Import *module* (a seam for tests, which make peers "missing")."""
    return importlib.import_module(module)


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def peer_status(peer: Peer) -> dict[str, Any]:
    """Whether *peer* can run here: ``available``, ``version``, ``reason``."""
    try:
        _try_import(peer.module)
    except ImportError as exc:
        return {"kind": peer.kind, "description": peer.description, "available": False,
                "distribution": peer.distribution, "version": None,
                "reason": f"{peer.module} is not installed ({exc})"}
    return {"kind": peer.kind, "description": peer.description, "available": True,
            "distribution": peer.distribution, "version": _version(peer.distribution),
            "reason": None}


def fast_mac_supported() -> bool:
    """Whether this version of the codec accepts ``mac=`` (a feature check)."""
    return "mac" in inspect.signature(Codec).parameters


def _numpy_available() -> bool:
    try:
        _try_import("numpy")
    except ImportError:
        return False
    return True


def _make_payload(name: str) -> Any:
    if name == "small-dict":
        return {"a": 1, "b": [2, 3]}
    if name == "objects-100":
        return [Point(i, i / 2, f"p{i}") for i in range(100)]
    if name == "bytes-1mib":
        return secrets.token_bytes(MIB)
    if name == "bytes-64mib":
        return secrets.token_bytes(64 * MIB)
    if name == "numpy-64mib":
        numpy = _try_import("numpy")
        return numpy.random.default_rng(0).random(64 * MIB // 8)
    raise ValueError(f"unknown payload {name!r}")


def _size_of(item: Any) -> int:
    """Payload bytes of one item, as the consumer counts them."""
    if isinstance(item, bytes):
        return len(item)
    nbytes = getattr(item, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    return 0


def _item_ok(payload: str, item: Any) -> bool:
    """A cheap check that *item* is the payload (same on every variant)."""
    if payload == "small-dict":
        return bool(item == {"a": 1, "b": [2, 3]})
    if payload == "objects-100":
        return isinstance(item, list) and len(item) == 100 and isinstance(item[-1], Point)
    if payload.startswith("bytes-"):
        return isinstance(item, bytes)
    return type(item).__name__ == "ndarray"


def _payload_size(case: Case) -> int:
    return {"bytes-1mib": MIB, "bytes-64mib": 64 * MIB, "numpy-64mib": 64 * MIB}.get(
        case.payload, 0)


# -- queue cases: processes ------------------------------------------------


def _producer(queue: Any, payload: str, count: int, ready: Any, go: Any,
              report: Connection, put_timeout: float | None = None) -> None:
    try:
        base = _peak_rss()
        obj = _make_payload(payload)
        size = _size_of(obj)
        ready.set()
        go.wait()
        start = time.perf_counter()
        if put_timeout is None:
            for _ in range(count):
                queue.put(obj)
        else:
            for _ in range(count):
                queue.put(obj, timeout=put_timeout)
        queue.close()
        queue.join_thread()
        report.send(("producer", start, count, size * count, _peak_rss() - base))
    except BaseException as exc:
        report.send(("error", f"producer: {type(exc).__name__}: {exc}"))
        raise


def _consumer(queue: Any, payload: str, count: int, ready: Any, report: Connection) -> None:
    try:
        base = _peak_rss()
        ready.set()
        received = 0
        nbytes = 0
        bad = 0
        for _ in range(count):
            item = queue.get(timeout=_TIMEOUT)
            received += 1
            nbytes += _size_of(item)
            if not _item_ok(payload, item):
                bad += 1
            del item
        end = time.perf_counter()
        # Nothing more may arrive: the producer sent exactly *count*.
        extra = 0
        try:
            while True:
                queue.get(timeout=0.05)
                extra += 1
        except Empty:
            pass
        report.send(("consumer", end, received + extra, nbytes, bad, _peak_rss() - base))
    except BaseException as exc:
        report.send(("error", f"consumer: {type(exc).__name__}: {exc}"))
        raise


def check_delivery(sent: int, sent_bytes: int, received: int, received_bytes: int,
                   bad: int) -> None:
    """Raise :class:`BenchmarkError` unless everything sent arrived intact."""
    if received != sent or received_bytes != sent_bytes or bad:
        raise BenchmarkError(
            f"delivery check failed: sent {sent} items / {sent_bytes} bytes, "
            f"received {received} items / {received_bytes} bytes, {bad} wrong"
        )


def _make_queue(variant: str, case: Case, keyring: Keyring, maxsize: int,
                ctx: multiprocessing.context.BaseContext) -> Any:
    if variant == "plain":
        return ctx.Queue(maxsize)
    if variant == "faster-fifo":
        # A circular buffer of bytes rather than a count of items: room for
        # the same number of large payloads as the other variants' maxsize.
        size = _payload_size(case)
        buffer = max(16 * MIB, maxsize * (size + 64 * 1024))
        return _try_import("faster_fifo").Queue(max_size_bytes=buffer)
    options: dict[str, Any] = {}
    if case.options.get("numpy"):
        options["allow"] = Allowlist.preset("stdlib", "numpy")
    elif "allow" in case.options:
        options["allow"] = case.options["allow"]
    if variant == "fast":
        options["mac"] = FAST_MAC
    elif variant != "signed":
        raise ValueError(f"unknown queue variant {variant!r}")
    return SignedQueue(keyring, maxsize=maxsize, ctx=ctx, **options)


def _run_queue(case: Case, variant: str, count: int, keyring: Keyring) -> dict[str, Any]:
    ctx = multiprocessing.get_context()
    size = _payload_size(case)
    maxsize = max(4, _BUFFER_BUDGET // size) if size else 0
    queue = _make_queue(variant, case, keyring, maxsize, ctx)
    # faster_fifo's put gives up after 10 s by default; the others block.
    put_timeout = _TIMEOUT if variant == "faster-fifo" else None
    messages = run_pair(ctx, f"{case.name}/{variant}",
                        _producer, (queue, case.payload, count), (put_timeout,),
                        _consumer, (queue, case.payload, count))
    _, start, sent, sent_bytes, producer_peak = messages["producer"]
    _, end, received, received_bytes, bad, consumer_peak = messages["consumer"]
    check_delivery(sent, sent_bytes, received, received_bytes, bad)
    seconds = end - start
    return {"seconds": seconds, "sent": sent, "received": received,
            "sent_bytes": sent_bytes, "received_bytes": received_bytes,
            "rate": _rate(case, count, sent_bytes, seconds),
            "producer_peak_rss": producer_peak, "consumer_peak_rss": consumer_peak}


def run_pair(ctx: Any, label: str,
             producer_fn: Callable[..., None], producer_args: tuple[Any, ...],
             producer_tail: tuple[Any, ...], consumer_fn: Callable[..., None],
             consumer_args: tuple[Any, ...]) -> dict[str, tuple[Any, ...]]:
    """
    Run a producer and a consumer in two fresh processes and return their
    reports, keyed ``"producer"`` and ``"consumer"``.

    They are called as ``producer_fn(*producer_args, ready, go, report,
    *producer_tail)`` and ``consumer_fn(*consumer_args, ready, report)``; each
    sets *ready* when set up, the producer starts on *go*, and each sends one
    tuple (or ``("error", text)``) on *report*.
    """
    recv_end, send_end = ctx.Pipe(duplex=False)
    p_ready, c_ready, go = ctx.Event(), ctx.Event(), ctx.Event()
    consumer = ctx.Process(target=consumer_fn, daemon=True,
                           args=(*consumer_args, c_ready, send_end))
    producer = ctx.Process(target=producer_fn, daemon=True,
                           args=(*producer_args, p_ready, go, send_end, *producer_tail))
    consumer.start()
    producer.start()
    send_end.close()
    try:
        for event, who in ((c_ready, "consumer"), (p_ready, "producer")):
            if not event.wait(_TIMEOUT):
                raise BenchmarkError(f"{label}: {who} did not start")
        go.set()
        messages: dict[str, tuple[Any, ...]] = {}
        while len(messages) < 2:
            if not recv_end.poll(_TIMEOUT):
                raise BenchmarkError(f"{label}: timed out")
            try:
                msg = recv_end.recv()
            except EOFError:
                raise BenchmarkError(
                    f"{label}: a benchmark process died "
                    f"(exit codes {producer.exitcode}, {consumer.exitcode})") from None
            if msg[0] == "error":
                raise BenchmarkError(f"{label}: {msg[1]}")
            messages[msg[0]] = msg
    finally:
        for proc in (producer, consumer):
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
                proc.join()
        recv_end.close()
    return messages


def _peak_rss() -> int:
    """This process's peak resident set size so far, in bytes (0 where unknown)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


# -- codec cases: in-process ----------------------------------------------


def _codec_functions(case: Case, keyring: Keyring,
                     variants: Sequence[str]) -> dict[str, Callable[[], Any]]:
    """One round-trip function per variant, each checked once before timing."""
    obj = _make_payload(case.payload)
    dumps, loads = pickle.dumps, pickle.loads
    fns: dict[str, Callable[[], Any]] = {}
    for variant in variants:
        fns[variant] = _codec_function(variant, obj, keyring, dumps, loads)
    for variant, fn in fns.items():
        if fn() != obj:
            raise BenchmarkError(f"{case.name}/{variant}: round trip changed the payload")
    return fns


def _codec_function(variant: str, obj: Any, keyring: Keyring,
                    dumps: Callable[..., bytes],
                    loads: Callable[[bytes], Any]) -> Callable[[], Any]:
    if variant in ("signed", "fast"):
        codec = Codec(keyring, mac=FAST_MAC) if variant == "fast" else Codec(keyring)

        def signed() -> Any:
            return codec.loads(codec.dumps(obj))

        return signed
    if variant == "plain":
        key = secrets.token_bytes(32)
        digest, compare = hmac.digest, hmac.compare_digest

        def plain() -> Any:
            data = dumps(obj, DEFAULT_PROTOCOL)
            tag = digest(key, data, "sha256")
            if not compare(digest(key, data, "sha256"), tag):  # pragma: no cover
                raise BenchmarkError("tag mismatch")
            return loads(data)

        return plain
    if variant == "itsdangerous":
        signer = _try_import("itsdangerous").Signer(
            secrets.token_bytes(32), digest_method=hashlib.sha256)

        def itsdangerous() -> Any:
            return loads(signer.unsign(signer.sign(dumps(obj, DEFAULT_PROTOCOL))))

        return itsdangerous
    if variant == "fernet":
        fernet_module = _try_import("cryptography.fernet")
        fernet = fernet_module.Fernet(fernet_module.Fernet.generate_key())

        def fernet_round_trip() -> Any:
            return loads(fernet.decrypt(fernet.encrypt(dumps(obj, DEFAULT_PROTOCOL))))

        return fernet_round_trip
    raise ValueError(f"unknown codec variant {variant!r}")


def _run_codec(case: Case, fn: Callable[[], Any], count: int) -> dict[str, Any]:
    expected = _make_payload(case.payload) if case.payload == "small-dict" else None
    size = _payload_size(case)
    done = 0
    start = time.perf_counter()
    for _ in range(count):
        fn()
        done += 1
    seconds = time.perf_counter() - start
    last = fn()
    if done != count or (expected is not None and last != expected) or (
            size and _size_of(last) != size):
        raise BenchmarkError(f"{case.name}: round trip check failed")
    return {"seconds": seconds, "sent": count, "received": done,
            "sent_bytes": size * count, "received_bytes": size * done,
            "rate": _rate(case, count, size * count, seconds)}


def _rate(case: Case, count: int, nbytes: int, seconds: float) -> float:
    if seconds <= 0:
        raise BenchmarkError(f"{case.name}: non-positive elapsed time {seconds}")
    if case.unit == "GB/s":
        return nbytes / seconds / 1e9
    return count / seconds


# -- the run -----------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """Where the numbers were measured."""
    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "start_method": multiprocessing.get_start_method(),
    }


def _fmt(value: float, unit: str) -> str:
    if unit == "GB/s":
        return f"{value:.3f} GB/s"
    return f"{value:,.0f} {unit}"


def _plan(selected: Sequence[Case], peers: dict[str, dict[str, Any]], fast: bool,
          err: TextIO, skipped: list[dict[str, str]]) -> dict[str, list[str]]:
    """The variants of every selected case; what cannot run is noted and recorded."""
    if not fast and any(c.fast for c in selected):
        reason = (f'this version of Codec has no mac= option (needed for mac="{FAST_MAC}")')
        print(f"bench: skipping the fast variant: {reason}", file=err)
        skipped.extend({"name": c.name, "variant": "fast", "reason": reason}
                       for c in selected if c.fast)
    for peer in PEERS:
        status = peers.get(peer.name)
        if status is None or status["available"]:
            continue
        print(f"bench: skipping peer {peer.name}: {status['reason']}", file=err)
        skipped.extend({"name": c.name, "variant": peer.name, "reason": status["reason"]}
                       for c in selected if c.kind == peer.kind)
    plan: dict[str, list[str]] = {}
    for case in selected:
        variants = ["signed", "plain"]
        if case.fast and fast:
            variants.append("fast")
        variants.extend(p.name for p in PEERS if p.kind == case.kind
                        and peers.get(p.name, {}).get("available"))
        plan[case.name] = variants
    return plan


def run(out: TextIO, err: TextIO, *, quick: bool = False, trials: int | None = None,
        only: Sequence[str] = (), json_path: str | None = None,
        png_path: str | None = None, peers: bool = True, brokers: bool = True) -> int:
    """Run the selected cases, print the table to *out*; return the exit code."""
    trials = trials if trials is not None else (3 if quick else 5)
    selected = [c for c in CASES if not only or c.name in only]
    if not brokers:
        selected = [c for c in selected if c.kind not in BROKER_KINDS]
    skipped: list[dict[str, str]] = []
    for case in [c for c in selected if c.kind in BROKER_KINDS]:
        from . import _bench_brokers

        reason = _bench_brokers.broker_reason(case)
        if reason is not None:
            skipped.append({"name": case.name, "reason": reason})
            print(f"bench: skipping {case.name}: {reason}", file=err)
            selected.remove(case)
    if not _numpy_available():
        for c in [c for c in selected if c.needs_numpy]:
            skipped.append({"name": c.name, "reason": "numpy is not installed"})
            print(f"bench: skipping {c.name}: numpy is not installed", file=err)
        selected = [c for c in selected if not c.needs_numpy]
    peer_info = {p.name: peer_status(p) for p in PEERS} if peers else {}
    plan = _plan(selected, peer_info, fast_mac_supported(), err, skipped)
    keyring = Keyring.generate()
    samples: dict[str, dict[str, list[dict[str, Any]]]] = {
        c.name: {v: [] for v in plan[c.name]} for c in selected}
    codec_fns = {c.name: _codec_functions(c, keyring, plan[c.name])
                 for c in selected if c.kind == "codec"}
    total_runs = trials * sum(len(v) for v in plan.values())
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        workers = None
        if any(c.kind == "celery" for c in selected):
            from . import _bench_brokers

            workers = stack.enter_context(_bench_brokers.celery_workers(keyring))
        _trials(err, selected, plan, samples, codec_fns, keyring, trials, quick, workers,
                total_runs)
    total = time.perf_counter() - started
    return _report(out, err, selected, plan, samples, trials, quick, total, peer_info,
                   skipped, only, peers, json_path, png_path, brokers)


def _trials(err: TextIO, selected: Sequence[Case], plan: dict[str, list[str]],
            samples: dict[str, dict[str, list[dict[str, Any]]]],
            codec_fns: dict[str, dict[str, Callable[[], Any]]], keyring: Keyring,
            trials: int, quick: bool, workers: Any, total_runs: int) -> None:
    width = len(str(total_runs))
    done = 0
    for trial in range(trials):
        for index, case in enumerate(selected):
            count = case.quick_count if quick else case.count
            # Rotate which variant goes first, per trial and per case.
            variants = plan[case.name]
            shift = (trial + index) % len(variants)
            for variant in variants[shift:] + variants[:shift]:
                done += 1
                print(f"bench: [{done:>{width}}/{total_runs}] trial {trial + 1}/{trials}  "
                      f"{case.name:<17} {variant:<13} x{count} ...",
                      end="", file=err, flush=True)
                if case.kind == "queue":
                    sample = _run_queue(case, variant, count, keyring)
                elif case.kind == "codec":
                    sample = _run_codec(case, codec_fns[case.name][variant], count)
                else:
                    from . import _bench_brokers

                    sample = _bench_brokers.run_case(case, variant, count, keyring, workers)
                samples[case.name][variant].append(sample)
                print(f" {sample['seconds']:.2f}s  {_fmt(sample['rate'], case.unit)}",
                      file=err, flush=True)


def _report(out: TextIO, err: TextIO, selected: Sequence[Case], plan: dict[str, list[str]],
            samples: dict[str, dict[str, list[dict[str, Any]]]], trials: int, quick: bool,
            total: float, peer_info: dict[str, dict[str, Any]],
            skipped: list[dict[str, str]], only: Sequence[str], peers: bool,
            json_path: str | None, png_path: str | None, brokers: bool) -> int:
    results = []
    for case in selected:
        med = {v: statistics.median(s["rate"] for s in samples[case.name][v])
               for v in plan[case.name]}
        ratios = {v: med[v] / med["plain"] for v in plan[case.name] if v != "plain"}
        memory = {
            v: {side: statistics.median(s[f"{side}_peak_rss"] for s in samples[case.name][v])
                / _payload_size(case)
                for side in ("producer", "consumer")}
            for v in plan[case.name]
            if case.kind == "queue" and _payload_size(case) >= 64 * MIB
            and all("producer_peak_rss" in s for s in samples[case.name][v])
        }
        results.append({
            "name": case.name, "kind": case.kind, "description": case.description,
            "unit": case.unit, "count": case.quick_count if quick else case.count,
            "payload_bytes": _payload_size(case),
            "variants": plan[case.name],
            "samples": samples[case.name], "median": med,
            "ratio": ratios["signed"], "ratios": ratios,
            # Peak resident memory above each process's start, in payloads.
            "peak_memory": memory,
        })
    _print_table(out, results, trials, quick, total)
    doc = {
        "format": 2,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "signedqueue": _version("signedqueue"),
        "settings": {"quick": quick, "trials": trials, "only": list(only), "peers": peers,
                     "brokers": brokers,
                     "fast_mac": FAST_MAC if fast_mac_supported() else None},
        "seconds": total,
        "variants": VARIANTS,
        "peers": peer_info,
        "cases": results,
        "skipped": skipped,
    }
    if json_path is not None:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
    if png_path is not None:
        write_png(doc, png_path)
        print(f"bench: chart written to {png_path}", file=err)
    return 0


def _table(out: TextIO, rows: list[tuple[str, ...]], left: int = 1) -> None:
    """Print *rows* (the first is the header): the first *left* columns left-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        cells = [f"{cell:<{w}}" if i < left else f"{cell:>{w}}"
                 for i, (cell, w) in enumerate(zip(row, widths, strict=True))]
        print("  ".join(cells).rstrip(), file=out)
        if n == 0:
            print("  ".join("-" * w for w in widths), file=out)


def _print_table(out: TextIO, results: list[dict[str, Any]], trials: int, quick: bool,
                 total: float) -> None:
    info = machine_info()
    print(f"signedqueue bench: {trials} interleaved trial(s), medians"
          f"{' (quick)' if quick else ''}; Python {info['python']}, "
          f"{info['cpu_count']} CPUs, {info['platform']}, start method "
          f"{info['start_method']}", file=out)
    has_fast = any("fast" in r["median"] for r in results)
    header = ("case", "plain", "signed", *(("fast",) if has_fast else ()), "signed/plain",
              *(("fast/plain",) if has_fast else ()))
    rows: list[tuple[str, ...]] = [header]
    for r in results:
        med, unit = r["median"], r["unit"]
        fast = ((_fmt(med["fast"], unit) if "fast" in med else "-",) if has_fast else ())
        fast_ratio = ((f"{r['ratios']['fast']:.2f}" if "fast" in med else "-",)
                      if has_fast else ())
        rows.append((r["name"], _fmt(med["plain"], unit), _fmt(med["signed"], unit), *fast,
                     f"{r['ratio']:.2f}", *fast_ratio))
    _table(out, rows)
    peer_rows: list[tuple[str, ...]] = [("case", "peer", "median", "peer/plain")]
    for r in results:
        for peer in PEERS:
            if peer.name in r["median"]:
                peer_rows.append((r["name"], peer.name, _fmt(r["median"][peer.name], r["unit"]),
                                  f"{r['ratios'][peer.name]:.2f}"))
    if len(peer_rows) > 1:
        print(file=out)
        _table(out, peer_rows, left=2)
    mem_rows: list[tuple[str, ...]] = [("case", "variant", "producer", "consumer")]
    for r in results:
        for variant, sides in r.get("peak_memory", {}).items():
            mem_rows.append((r["name"], variant, f"{sides['producer']:.2f}x",
                             f"{sides['consumer']:.2f}x"))
    if len(mem_rows) > 1:
        print(file=out)
        print("peak resident memory above the process's start, in payloads (median):",
              file=out)
        _table(out, mem_rows, left=2)
    print(file=out)
    print("plain = multiprocessing.Queue (queue cases), pickle + hmac by hand (codec-*), "
          "redis-py LPUSH/BRPOP of pickle (redis-*), Celery's json serializer (celery-*); "
          f'fast = mac="{FAST_MAC}"; ratios are medians divided by the plain median; '
          f"total {total:.1f}s", file=out)


# -- the chart ---------------------------------------------------------------

_CHART_LABELS = {"signed": "signed (hmac-sha256)", "fast": f"fast ({FAST_MAC})"}


def _import_matplotlib() -> ModuleType:
    """``matplotlib.figure``, or a :class:`BenchmarkError` saying how to install it."""
    try:
        return _try_import("matplotlib.figure")
    except ImportError:
        raise BenchmarkError(f"--png needs matplotlib, which is not installed: "
                             f"{INSTALL_HINT}") from None


def write_png(doc: dict[str, Any], path: str) -> None:
    """A bar chart of every variant's median relative to plain, per case."""
    figure_module = _import_matplotlib()
    cases = doc["cases"]
    variants = [v for v in VARIANTS if v != "plain"
                and any(v in c["ratios"] for c in cases)]
    fig = figure_module.Figure(figsize=(max(8.0, 1.3 * len(cases) + 3), 5.5),
                               layout="constrained")
    ax = fig.subplots()
    colors = {v: f"C{i}" for i, v in enumerate(variants)}
    width = 0.8 / max(1, max((len(c["ratios"]) for c in cases), default=1))
    slots = [[v for v in variants if v in c["ratios"]] for c in cases]
    for variant in variants:
        xs: list[float] = []
        values: list[float] = []
        for x, (case, present) in enumerate(zip(cases, slots, strict=True)):
            if variant in present:
                xs.append(x + (present.index(variant) - (len(present) - 1) / 2) * width)
                values.append(case["ratios"][variant])
        bars = ax.bar(xs, values, width, color=colors[variant],
                      label=_CHART_LABELS.get(variant, variant))
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=7, padding=1)
    ax.axhline(1.0, color="black", linewidth=1, linestyle="--", label="plain = 1.0")
    ax.set_xticks(range(len(cases)), [c["name"] for c in cases], rotation=20, ha="right")
    ax.set_ylabel("throughput / plain (median)")
    info = doc["machine"]
    trials = doc["settings"]["trials"]
    ax.set_title(f"signedqueue bench: median throughput relative to plain "
                 f"({trials} trial{'s' if trials != 1 else ''})\n"
                 f"Python {info['python']}, {info['cpu_count']} CPUs, {info['machine']}, "
                 f"{info['platform']}, start method {info['start_method']}", fontsize=9)
    if variants:
        ax.legend(fontsize=8)
    fig.savefig(path, format="png", dpi=120)


# -- the command line --------------------------------------------------------


def add_parser(sub: Any) -> None:
    """Register the ``bench`` subcommand."""
    bench = sub.add_parser(
        "bench",
        help="measure SignedQueue and the codec beside multiprocessing.Queue and plain pickle",
        description="Interleaved trials, producer and consumer in separate processes; "
        "prints medians and their ratios to the plain baseline, with itsdangerous, "
        "Fernet and faster-fifo as peers when installed.",
    )
    bench.add_argument("--quick", action="store_true",
                       help="smaller message counts and 3 trials")
    bench.add_argument("--trials", type=int, default=None,
                       help="trials per case (default 5, or 3 with --quick)")
    bench.add_argument("--json", metavar="PATH", default=None,
                       help="also write raw samples, medians, ratios, peers and machine info")
    bench.add_argument("--png", metavar="PATH", default=None,
                       help=f"also draw a bar chart of the ratios (needs matplotlib: "
                       f"{INSTALL_HINT})")
    bench.add_argument("--only", metavar="NAME", nargs="+", action="extend", default=[],
                       help=f"run only these cases: {', '.join(CASE_NAMES)}")
    bench.add_argument("--no-peers", dest="peers", action="store_false",
                       help="skip the peers (itsdangerous, Fernet, faster-fifo, Celery auth)")
    bench.add_argument("--no-brokers", dest="brokers", action="store_false",
                       help="skip the cases that need Redis (redis-*, celery-*)")


def run_cli(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``signedqueue bench``."""
    if args.trials is not None and args.trials < 1:
        parser.error("--trials must be at least 1")
    unknown = [n for n in args.only if n not in CASE_NAMES]
    if unknown:
        parser.error(f"unknown case {', '.join(unknown)} (choose from {', '.join(CASE_NAMES)})")
    if args.png is not None:
        # Before the run, not after minutes of it.
        try:
            _import_matplotlib()
        except BenchmarkError as exc:
            print(f"signedqueue bench: {exc}", file=sys.stderr)
            return 2
    try:
        return run(sys.stdout, sys.stderr, quick=args.quick, trials=args.trials,
                   only=args.only, json_path=args.json, png_path=args.png,
                   peers=args.peers, brokers=args.brokers)
    except BenchmarkError as exc:
        print(f"\nsignedqueue bench: {exc}", file=sys.stderr)
        return 1
