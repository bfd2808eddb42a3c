"""
``python -m signedqueue bench``: throughput of :class:`SignedQueue` beside
``multiprocessing.Queue``, and of the codec beside a hand-rolled
pickle + HMAC, measured side by side in one run.

Method (docs/benchmarks.md has the long form):

* Trials are interleaved: every trial runs every selected case once, and
  within a case both variants once, alternating which goes first, so drift
  in the machine's load affects both sides alike.  Medians are reported.
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
import datetime
import hmac
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
from typing import Any, TextIO

from ._allowlist import Allowlist
from ._codec import Codec
from ._keys import Keyring
from ._queue import SignedQueue
from ._serializers import DEFAULT_PROTOCOL

__all__ = ["CASES", "BenchmarkError", "Point", "run"]

MIB = 1024 * 1024
#: Frames buffered per queue are bounded to about this many bytes (both
#: variants get the same ``maxsize``), so large payloads cannot pile up.
_BUFFER_BUDGET = 256 * MIB
#: Seconds to wait for a benchmark process before giving up.
_TIMEOUT = 600.0


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
    kind: str  # "queue" or "codec"
    description: str
    unit: str  # "msgs/s" or "GB/s"
    count: int  # messages per queue trial, or round trips per codec sample
    quick_count: int
    payload: str  # key into _PAYLOADS
    needs_numpy: bool = False
    options: dict[str, Any] = field(default_factory=dict)


CASES: tuple[Case, ...] = (
    Case("small-dict", "queue", 'the dict {"a": 1, "b": [2, 3]}', "msgs/s",
         60_000, 20_000, "small-dict"),
    Case("objects-100", "queue", "a list of 100 Point objects (allowlisted class)", "msgs/s",
         6_000, 2_000, "objects-100", options={"allow": POINT_ALLOW}),
    Case("bytes-1mib", "queue", "1 MiB bytes object", "GB/s",
         500, 250, "bytes-1mib"),
    Case("bytes-64mib", "queue", "64 MiB bytes object", "GB/s",
         8, 3, "bytes-64mib"),
    Case("numpy-64mib", "queue", "64 MiB numpy float64 array "
         '(allow=Allowlist.preset("stdlib", "numpy"))', "GB/s",
         8, 3, "numpy-64mib", needs_numpy=True, options={"numpy": True}),
    Case("codec-small-dict", "codec", 'Codec dumps+loads of {"a": 1, "b": [2, 3]} vs '
         "pickle + hmac by hand", "msgs/s", 100_000, 40_000, "small-dict"),
    Case("codec-bytes-1mib", "codec", "Codec dumps+loads of 1 MiB bytes vs "
         "pickle + hmac by hand", "GB/s", 300, 150, "bytes-1mib"),
)

CASE_NAMES = tuple(c.name for c in CASES)


def _numpy_available() -> bool:
    try:
        import numpy  # noqa: F401
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
        import numpy

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
    """A cheap check that *item* is the payload (same on both variants)."""
    if payload == "small-dict":
        return bool(item == {"a": 1, "b": [2, 3]})
    if payload == "objects-100":
        return isinstance(item, list) and len(item) == 100 and isinstance(item[-1], Point)
    if payload.startswith("bytes-"):
        return isinstance(item, bytes)
    return type(item).__name__ == "ndarray"


# -- queue cases: processes ------------------------------------------------


def _producer(queue: Any, payload: str, count: int, ready: Any, go: Any,
              report: Connection) -> None:
    try:
        obj = _make_payload(payload)
        size = _size_of(obj)
        ready.set()
        go.wait()
        start = time.perf_counter()
        for _ in range(count):
            queue.put(obj)
        queue.close()
        queue.join_thread()
        report.send(("producer", start, count, size * count))
    except BaseException as exc:
        report.send(("error", f"producer: {type(exc).__name__}: {exc}"))
        raise


def _consumer(queue: Any, payload: str, count: int, ready: Any, report: Connection) -> None:
    try:
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
        report.send(("consumer", end, received + extra, nbytes, bad))
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
    options: dict[str, Any] = {}
    if case.options.get("numpy"):
        options["allow"] = Allowlist.preset("stdlib", "numpy")
    elif "allow" in case.options:
        options["allow"] = case.options["allow"]
    return SignedQueue(keyring, maxsize=maxsize, ctx=ctx, **options)


def _payload_size(case: Case) -> int:
    return {"bytes-1mib": MIB, "bytes-64mib": 64 * MIB, "numpy-64mib": 64 * MIB}.get(
        case.payload, 0)


def _run_queue(case: Case, variant: str, count: int, keyring: Keyring) -> dict[str, Any]:
    ctx = multiprocessing.get_context()
    size = _payload_size(case)
    maxsize = max(4, _BUFFER_BUDGET // size) if size else 0
    queue = _make_queue(variant, case, keyring, maxsize, ctx)
    recv_end, send_end = ctx.Pipe(duplex=False)
    p_ready, c_ready, go = ctx.Event(), ctx.Event(), ctx.Event()
    consumer = ctx.Process(target=_consumer, args=(queue, case.payload, count, c_ready,
                                                   send_end), daemon=True)
    producer = ctx.Process(target=_producer, args=(queue, case.payload, count, p_ready, go,
                                                   send_end), daemon=True)
    consumer.start()
    producer.start()
    send_end.close()
    try:
        for event, who in ((c_ready, "consumer"), (p_ready, "producer")):
            if not event.wait(_TIMEOUT):
                raise BenchmarkError(f"{case.name}/{variant}: {who} did not start")
        go.set()
        messages: dict[str, tuple[Any, ...]] = {}
        while len(messages) < 2:
            if not recv_end.poll(_TIMEOUT):
                raise BenchmarkError(f"{case.name}/{variant}: timed out")
            try:
                msg = recv_end.recv()
            except EOFError:
                raise BenchmarkError(
                    f"{case.name}/{variant}: a benchmark process died "
                    f"(exit codes {producer.exitcode}, {consumer.exitcode})") from None
            if msg[0] == "error":
                raise BenchmarkError(f"{case.name}/{variant}: {msg[1]}")
            messages[msg[0]] = msg
    finally:
        for proc in (producer, consumer):
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
                proc.join()
        recv_end.close()
    _, start, sent, sent_bytes = messages["producer"]
    _, end, received, received_bytes, bad = messages["consumer"]
    check_delivery(sent, sent_bytes, received, received_bytes, bad)
    seconds = end - start
    return {"seconds": seconds, "sent": sent, "received": received,
            "sent_bytes": sent_bytes, "received_bytes": received_bytes,
            "rate": _rate(case, count, sent_bytes, seconds)}


# -- codec cases: in-process ----------------------------------------------


def _codec_functions(case: Case, keyring: Keyring) -> dict[str, Callable[[], Any]]:
    obj = _make_payload(case.payload)
    codec = Codec(keyring)
    key = secrets.token_bytes(32)
    dumps, loads, digest, compare = pickle.dumps, pickle.loads, hmac.digest, hmac.compare_digest

    def signed() -> Any:
        return codec.loads(codec.dumps(obj))

    def plain() -> Any:
        data = dumps(obj, DEFAULT_PROTOCOL)
        tag = digest(key, data, "sha256")
        if not compare(digest(key, data, "sha256"), tag):  # pragma: no cover
            raise BenchmarkError("tag mismatch")
        return loads(data)

    if signed() != obj or plain() != obj:
        raise BenchmarkError(f"{case.name}: round trip changed the payload")
    return {"signed": signed, "plain": plain}


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
    return f"{value:,.0f} msgs/s"


def run(out: TextIO, err: TextIO, *, quick: bool = False, trials: int | None = None,
        only: Sequence[str] = (), json_path: str | None = None) -> int:
    """Run the selected cases, print the table to *out*; return the exit code."""
    trials = trials if trials is not None else (3 if quick else 5)
    selected = [c for c in CASES if not only or c.name in only]
    skipped: list[dict[str, str]] = []
    if not _numpy_available():
        for c in [c for c in selected if c.needs_numpy]:
            skipped.append({"name": c.name, "reason": "numpy is not installed"})
            print(f"bench: skipping {c.name}: numpy is not installed", file=err)
        selected = [c for c in selected if not c.needs_numpy]
    keyring = Keyring.generate()
    samples: dict[str, dict[str, list[dict[str, Any]]]] = {
        c.name: {"signed": [], "plain": []} for c in selected}
    codec_fns = {c.name: _codec_functions(c, keyring) for c in selected if c.kind == "codec"}
    started = time.perf_counter()
    for trial in range(trials):
        for index, case in enumerate(selected):
            count = case.quick_count if quick else case.count
            # Alternate which variant goes first, per trial and per case.
            order = ("signed", "plain") if (trial + index) % 2 == 0 else ("plain", "signed")
            for variant in order:
                print(f"bench: trial {trial + 1}/{trials}  {case.name:<17} {variant:<6} "
                      f"x{count} ...", end="", file=err, flush=True)
                if case.kind == "queue":
                    sample = _run_queue(case, variant, count, keyring)
                else:
                    sample = _run_codec(case, codec_fns[case.name][variant], count)
                samples[case.name][variant].append(sample)
                print(f" {sample['seconds']:.2f}s  {_fmt(sample['rate'], case.unit)}",
                      file=err, flush=True)
    total = time.perf_counter() - started
    results = []
    for case in selected:
        med = {v: statistics.median(s["rate"] for s in samples[case.name][v])
               for v in ("signed", "plain")}
        results.append({
            "name": case.name, "kind": case.kind, "description": case.description,
            "unit": case.unit, "count": case.quick_count if quick else case.count,
            "payload_bytes": _payload_size(case),
            "samples": samples[case.name], "median": med,
            "ratio": med["signed"] / med["plain"],
        })
    _print_table(out, results, trials, quick, total)
    if json_path is not None:
        doc = {
            "format": 1,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(),
            "settings": {"quick": quick, "trials": trials, "only": list(only)},
            "seconds": total,
            "cases": results,
            "skipped": skipped,
        }
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
    return 0


def _print_table(out: TextIO, results: list[dict[str, Any]], trials: int, quick: bool,
                 total: float) -> None:
    info = machine_info()
    print(f"signedqueue bench: {trials} interleaved trial(s), medians"
          f"{' (quick)' if quick else ''}; Python {info['python']}, "
          f"{info['cpu_count']} CPUs, {info['platform']}, start method "
          f"{info['start_method']}", file=out)
    rows = [("case", "signed", "plain", "signed/plain")]
    for r in results:
        rows.append((r["name"], _fmt(r["median"]["signed"], r["unit"]),
                     _fmt(r["median"]["plain"], r["unit"]), f"{r['ratio']:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for n, row in enumerate(rows):
        print(f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:>{widths[2]}}  "
              f"{row[3]:>{widths[3]}}", file=out)
        if n == 0:
            print("  ".join("-" * w for w in widths), file=out)
    print(f"plain = multiprocessing.Queue (queue cases), pickle + hmac by hand (codec-*); "
          f"total {total:.1f}s", file=out)


def add_parser(sub: Any) -> None:
    """Register the ``bench`` subcommand."""
    bench = sub.add_parser(
        "bench",
        help="measure SignedQueue and the codec beside multiprocessing.Queue and plain pickle",
        description="Interleaved trials, producer and consumer in separate processes; "
        "prints medians and signed/plain ratios.",
    )
    bench.add_argument("--quick", action="store_true",
                       help="smaller message counts and 3 trials (about a minute)")
    bench.add_argument("--trials", type=int, default=None,
                       help="trials per case (default 5, or 3 with --quick)")
    bench.add_argument("--json", metavar="PATH", default=None,
                       help="also write raw samples, medians, ratios and machine info")
    bench.add_argument("--only", metavar="NAME", nargs="+", action="extend", default=[],
                       help=f"run only these cases: {', '.join(CASE_NAMES)}")


def run_cli(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``signedqueue bench``."""
    if args.trials is not None and args.trials < 1:
        parser.error("--trials must be at least 1")
    unknown = [n for n in args.only if n not in CASE_NAMES]
    if unknown:
        parser.error(f"unknown case {', '.join(unknown)} (choose from {', '.join(CASE_NAMES)})")
    try:
        return run(sys.stdout, sys.stderr, quick=args.quick, trials=args.trials,
                   only=args.only, json_path=args.json)
    except BenchmarkError as exc:
        print(f"\nsignedqueue bench: {exc}", file=sys.stderr)
        return 1
