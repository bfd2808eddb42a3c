"""
A dict through a SignedJoinableQueue, with task_done() and join().

This is the classic example of passing a dict through multiprocessing.Queue,
done safely.  The classic version calls task_done() and join() on a plain
multiprocessing.Queue, which has neither (that is an AttributeError); they
belong to JoinableQueue, so the signed equivalent is SignedJoinableQueue.

Run from the repository root:  python examples/joinable_dict.py
"""

from __future__ import annotations

import multiprocessing

import signedqueue


def worker(q: signedqueue.SignedJoinableQueue) -> None:
    item = q.get()  # verified, then loaded by the restricted unpickler
    print(f"Worker received: {item}", flush=True)
    q.task_done()


if __name__ == "__main__":
    ctx = multiprocessing.get_context("spawn")
    # One fresh key.  Passing the queue to the child as a Process argument
    # passes the keyring with it, so producer and consumer share the key.
    ring = signedqueue.Keyring.generate()
    q = signedqueue.SignedJoinableQueue(ring, ctx=ctx)
    p = ctx.Process(target=worker, args=(q,))
    p.start()
    q.put({"a": 1, "b": [2, 3]})  # a dict of built-in types needs no allow= entry
    q.join()  # returns once the worker has called task_done()
    p.join()
    print(f"All items processed; worker exit code {p.exitcode}")
