"""
``python -m signedqueue demo``: producers and consumers in separate processes
exchange objects through signed queues, while an attacker's frames are
refused.
"""

from __future__ import annotations

import datetime
import decimal
import logging
import multiprocessing
import os
import pickle
import tempfile
import time
from dataclasses import dataclass
from typing import Any, TextIO

from ._codec import Codec
from ._keys import Keyring
from ._queue import SignedJoinableQueue, SignedQueue
from .exceptions import RejectedFrame

#: The one user class the consumers admit.
ALLOW = ["signedqueue._demo.Order"]


@dataclass(frozen=True)
class Order:
    """A domain object, admitted by ``allow=["signedqueue._demo.Order"]``."""

    order_id: int
    producer: int
    amount: decimal.Decimal
    placed: datetime.datetime


class Exploit:
    """What an attacker would send: unpickling it would create a file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.path,))


def _produce(jobs: SignedJoinableQueue, producer: int, count: int) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    for i in range(count):
        jobs.put(Order(producer * 1_000_000 + i, producer, decimal.Decimal(i) / 4, now))
    jobs.close()
    jobs.join_thread()


def _consume(jobs: SignedJoinableQueue, results: SignedQueue) -> None:
    # Refusals are reported below; keep the logger's copy of them quiet.
    logging.getLogger("signedqueue").setLevel(logging.ERROR)
    handled = 0
    total = decimal.Decimal(0)
    while True:
        try:
            item = jobs.get()
        except RejectedFrame as exc:
            results.put(("refused", type(exc).__name__, exc.reason, len(exc.frame)))
            continue
        if item is None:
            jobs.task_done()
            break
        handled += 1
        total += item.amount
        jobs.task_done()
    results.put(("done", os.getpid(), handled, total))
    results.close()
    results.join_thread()


def run(out: TextIO, *, producers: int = 2, consumers: int = 2, count: int = 2000) -> int:
    """Run the demo, print a report to *out*; return 0 if every check held."""
    ring = Keyring.generate()
    ctx = multiprocessing.get_context()
    jobs = SignedJoinableQueue(ring, ctx=ctx, allow=ALLOW, maxsize=1000)
    results = SignedQueue(ring, ctx=ctx)
    canary = os.path.join(tempfile.mkdtemp(prefix="signedqueue-demo-"), "pwned")

    print(f"signedqueue demo: {producers} producers, {consumers} consumers, "
          f"start method {ctx.get_start_method()!r}, key {ring.active_id}", file=out)
    started = time.perf_counter()
    workers = [ctx.Process(target=_consume, args=(jobs, results)) for _ in range(consumers)]
    workers += [ctx.Process(target=_produce, args=(jobs, p, count)) for p in range(producers)]
    for w in workers:
        w.start()

    # The attacker writes into the same queue.
    codec = Codec(ring)
    tampered = bytearray(codec.dumps(Order(-1, -1, decimal.Decimal(1), datetime.datetime.now())))
    tampered[-40] ^= 0x01  # one bit of the payload
    jobs.put_frame(tampered)
    jobs.put_frame(codec.seal(pickle.dumps(Exploit(canary))))  # validly signed, forbidden
    jobs.put_frame(Codec(Keyring.generate()).dumps("hello"))  # someone else's key

    for w in workers[consumers:]:
        w.join()
    jobs.join()  # every order handled (refused frames count as done)
    for _ in range(consumers):
        jobs.put(None)
    reports = [results.get(timeout=60) for _ in range(consumers + 3)]
    for w in workers[:consumers]:
        w.join()
    elapsed = time.perf_counter() - started

    done = [r for r in reports if r[0] == "done"]
    refused = [r for r in reports if r[0] == "refused"]
    handled = sum(r[2] for r in done)
    print(f"  delivered {handled} of {producers * count} orders in {elapsed:.2f} s, "
          "each verified before loading", file=out)
    for _, pid, n, total in done:
        print(f"    consumer pid {pid}: {n} orders, total amount {total}", file=out)
    print(f"  refused {len(refused)} attacker frames (each also logged to the "
          "'signedqueue' logger):", file=out)
    for _, kind, reason, size in refused:
        print(f"    {kind} ({size} bytes): {reason}", file=out)
    ran = os.path.exists(canary)
    print("  the forbidden payload " + ("RAN CODE" if ran else "never ran (no file created)"),
          file=out)
    ok = handled == producers * count and len(refused) == 3 and not ran
    print("result: " + ("ok" if ok else "FAILED"), file=out)
    return 0 if ok else 1
