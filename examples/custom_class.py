"""
A custom class through a SignedJoinableQueue, admitted by an allowlist.

The consumer admits shapes.Circle and nothing else beyond the built-in safe
set, so a shapes.Square is refused with ForbiddenClass, whose message names
the exact allow= entry that would admit it.  Nothing of the refused payload
runs: the unpickler refuses the class before it is imported or called.

The classes live in examples/shapes.py so that the spawned consumer can
import them.

Run from the repository root:  python examples/custom_class.py
"""

from __future__ import annotations

import multiprocessing

from shapes import Circle, Square

import signedqueue


def worker(q: signedqueue.SignedJoinableQueue) -> None:
    for _ in range(2):
        try:
            item = q.get()
        except signedqueue.ForbiddenClass as exc:
            # A refused get() has already marked its item done: no task_done().
            print(
                f"Worker refused: {exc.names[0]} (to admit it: allow={list(exc.allow_entries)})",
                flush=True,
            )
            continue
        print(f"Worker received: {item!r} with area {item.area():.2f}", flush=True)
        q.task_done()


if __name__ == "__main__":
    ctx = multiprocessing.get_context("spawn")
    ring = signedqueue.Keyring.generate()
    # allow= applies where frames are loaded: in every get().  Entries may be
    # strings ("shapes.Circle") or the class objects themselves.
    q = signedqueue.SignedJoinableQueue(ring, ctx=ctx, allow=[Circle])
    p = ctx.Process(target=worker, args=(q,))
    p.start()
    q.put(Circle(1.5))
    q.put(Square(2.0))  # pickled and signed fine; refused where it is loaded
    q.join()
    p.join()
    print(f"Done; worker exit code {p.exitcode}")
