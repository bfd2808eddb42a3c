"""
A lambda through a SignedJoinableQueue with signed cloudpickle frames.

Plain pickle cannot carry a lambda; cloudpickle can, by value.  The classic
version puts cloudpickle.dumps() output on a plain multiprocessing.Queue,
whose get() unpickles whatever arrives in its pipe, and then leaves the
consumer to load the bytes it got: two loads of data that anyone who can
write to the queue could have replaced.  Here every frame is signed, and
verified before any byte of it is loaded.

Loading a cloudpickle frame runs whatever code it carries, and no allowlist
can restrict that, so signedqueue accepts serializer="cloudpickle" only
together with unsafe_trust_signed_frames=True.  What that means: the tag still
proves that a frame was made by a holder of a key in the ring and was not
altered on the way, but every holder of a key can now run any code in the
consumer.  Use it only when every producer is as trusted as the consumer.

Needs cloudpickle:  pip install 'signedqueue[cloudpickle]'
Run from the repository root:  python examples/lambda_cloudpickle.py
"""

from __future__ import annotations

import multiprocessing
import sys

import signedqueue


def worker(q: signedqueue.SignedJoinableQueue) -> None:
    fn = q.get()  # the tag is verified first; then the code is trusted
    print(f"Worker received a function: fn(21) = {fn(21)}", flush=True)
    q.task_done()


if __name__ == "__main__":
    try:
        import cloudpickle  # noqa: F401
    except ImportError:
        sys.exit("this example needs cloudpickle: pip install 'signedqueue[cloudpickle]'")

    ring = signedqueue.Keyring.generate()
    # Without the explicit opt-in, cloudpickle is refused outright.
    try:
        signedqueue.Codec(ring, serializer="cloudpickle")
    except ValueError:
        print("Without unsafe_trust_signed_frames=True: refused (ValueError)")

    ctx = multiprocessing.get_context("spawn")
    # Logs a warning (logger "signedqueue") in every process that builds this
    # queue's codec: the trust it grants should never be silent.
    q = signedqueue.SignedJoinableQueue(
        ring, ctx=ctx, serializer="cloudpickle", unsafe_trust_signed_frames=True
    )
    p = ctx.Process(target=worker, args=(q,))
    p.start()
    q.put(lambda x: x * 2)
    q.join()
    p.join()
    print(f"Done; worker exit code {p.exitcode}")
