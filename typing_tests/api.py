"""
The public API as a user writes it.  Checked by mypy (strict); never executed.
"""

from __future__ import annotations

import multiprocessing
import queue
from typing import Any

import signedqueue
from signedqueue import (
    Codec,
    ForbiddenClass,
    Keyring,
    RejectedFrame,
    SignedJoinableQueue,
    SignedQueue,
    wrap,
)

ring: Keyring = Keyring.generate()
ring2 = Keyring({"k1": b"x" * 32, "k2": b"y" * 32}, active="k2")
new_id: str = ring.rotate()
ring.retire(ring.key_ids[0])
active: str = ring.active_id
ring.to_file("ring.json")
loaded: Keyring = Keyring.from_file("ring.json")
from_env: Keyring = Keyring.from_env()

codec = Codec(ring, allow=["myapp.models.Point", int], max_age=60.0, context=b"orders")
frame: bytes = codec.dumps({"a": 1})
obj: Any = codec.loads(frame)
obj = codec.loads(bytearray(frame))
obj = codec.loads(memoryview(frame))
sealed: bytes = codec.seal(b"\x80\x05K\x01.")
payload: bytes = codec.unseal(sealed)
msg = Codec(ring, serializer="msgpack", msgpack_types=[complex])

q = SignedQueue(ring, maxsize=10, ctx=multiprocessing.get_context("spawn"), allow=["x.Y"])
q.put(1)
q.put(1, block=False)
q.put_nowait(2)
q.put_frame(frame)
value: Any = q.get(timeout=1.0)
raw: bytes = q.get_frame()
size: int = q.qsize()
flags: tuple[bool, bool] = (q.empty(), q.full())
q.close()
q.join_thread()
q.cancel_join_thread()

jq = SignedJoinableQueue(ring)
jq.task_done()
jq.join()

wq = wrap(queue.Queue(), ring, serializer="msgpack")
wq.put({"a": 1})
value = wq.get()

try:
    codec.loads(frame)
except ForbiddenClass as exc:
    names: tuple[str, ...] = exc.names
    entries: tuple[str | None, ...] = exc.allow_entries
except RejectedFrame as exc:
    raw_frame: bytes = exc.frame
    reason: str = exc.reason
    kid: str | None = exc.key_id

base: type[Exception] = signedqueue.SignedQueueError

# Key management.
staged: str = ring.add()
ring.promote(staged)
for info in ring.describe():
    kid2: str = info.key_id
    state: str = info.state
    made: float = info.created
watched: Keyring = Keyring.from_file("ring.json", watch=True, watch_interval=0.5)
from_dir: Keyring = Keyring.from_directory("/etc/keys", watch=True)
resealed: bytes = codec.reseal(frame)
header: signedqueue.FrameInfo = codec.verify(frame)
signer: str = header.key_id
keyring_error: type[ValueError] = signedqueue.KeyringError
