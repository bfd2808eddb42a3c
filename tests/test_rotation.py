"""
Zero-downtime key rotation, end to end.

``test_rotation_under_load_refuses_nothing`` is the proof behind
docs/how-to/rotate-keys.md.  Producer and consumer processes stream frames
through a ``SignedQueue`` whose keyring follows a keyring file
(``Keyring.from_file(path, watch=True)``), while the test rotates the key with
the real command line, step by step as the how-to says::

    keys init -> (stream) -> keys add -> wait -> keys promote -> wait for the
    old key's frames to drain -> keys retire -> (stream) -> stop

and then checks that no frame was refused, lost or delivered twice, that each
frame carries the key the procedure says it must, and that a frame signed with
the retired key is refused afterwards, by a consumer that has been running all
along and by the parent.

``test_resealed_backlog_survives_retirement`` checks the how-to's advice for
stored backlogs: reseal them under the new key before retiring the old one.
``test_rollback_before_retiring_refuses_nothing`` checks its rollback: promote
the previous key back.

Nothing here asserts on elapsed time.  Waits are deadlines on conditions
(generous, for a noisy machine), and the only claims about time are about the
creation times frames carry, compared with instants recorded around the
commands.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import queue
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from processes import join_all, start_all
from signedqueue import Codec, Keyring, RejectedFrame, SignedQueue, UnknownKey

#: Seconds between checks of the keyring file by each process.
WATCH = 0.2
#: Deadline of each wait, in seconds.  Reached only when something is wrong.
WAIT = 60.0
#: Seconds a producer pauses between two puts, so that four busy processes
#: leave room on a small machine for the commands the test runs.
PRODUCER_PACE = 0.002
#: Seconds a consumer spends on each item: consumers are slower than
#: producers, so the queue stays full and hundreds of frames are in flight
#: whenever a key changes, as in a backlogged fleet.
CONSUMER_PACE = 0.004
#: The queue's maxsize: how many frames can be in flight.
IN_FLIGHT = 512
PRODUCERS = 2
CONSUMERS = 2
#: Start methods to run the proof under.
START_METHODS = [m for m in ("spawn", "fork") if m in multiprocessing.get_all_start_methods()]


def keys_cli(*args: str) -> str:
    """Run ``python -m signedqueue keys ARGS``; return its output, failing on an error."""
    result = subprocess.run(
        [sys.executable, "-m", "signedqueue", "keys", *args],
        capture_output=True, text=True, timeout=WAIT, check=False,
    )
    assert 0 == result.returncode, f"keys {' '.join(args)}: {result.stderr}"
    return result.stdout


# -- child process bodies (module level, so that spawn can import them) -------


def _produce(q: SignedQueue, results: Any, producer: int, stop: Any) -> None:
    """Put (producer, seq) until told to stop; then report how many."""
    seq = 0
    while not stop.is_set():
        q.put((producer, seq))
        seq += 1
        time.sleep(PRODUCER_PACE)
    q.close()
    q.join_thread()
    results.put(("produced", producer, seq))


def _consume(q: SignedQueue, results: Any, consumer: int) -> None:
    """
    Take frames until a None arrives.  Report each item with the id of the
    key that signed it and its creation time, and each refusal as it happens.
    """
    while True:
        try:
            frame = q.get_frame(timeout=WAIT)
            info = q.codec.verify(frame)
            item = q.codec.loads(frame)
        except RejectedFrame as exc:
            results.put(("refused", consumer, type(exc).__name__, str(exc), exc.key_id))
            continue
        if item is None:
            break
        producer, seq = item
        results.put(("frame", producer, seq, info.key_id, info.created))
        time.sleep(CONSUMER_PACE)
    results.put(("consumer done", consumer))


# -- the parent's view --------------------------------------------------------


class Ledger:
    """Everything the children report, read from the results queue."""

    def __init__(self, results: Any) -> None:
        self._results = results
        #: (producer, seq) -> (key id, creation time) of each delivered frame.
        self.frames: dict[tuple[int, int], tuple[str, float]] = {}
        self.duplicates: list[tuple[int, int]] = []
        #: (consumer, exception class, message, key id) of each refusal.
        self.refusals: list[tuple[int, str, str, str | None]] = []
        #: producer -> how many items it put.
        self.produced: dict[int, int] = {}
        self.consumers_done: set[int] = set()

    def _record(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "frame":
            _, producer, seq, key_id, created = message
            if (producer, seq) in self.frames:
                self.duplicates.append((producer, seq))
            self.frames[producer, seq] = (key_id, created)
        elif kind == "refused":
            self.refusals.append(message[1:])
        elif kind == "produced":
            self.produced[message[1]] = message[2]
        else:
            self.consumers_done.add(message[1])

    def pump(self, seconds: float) -> None:
        """Read reports for *seconds*."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            with contextlib.suppress(queue.Empty):
                self._record(self._results.get(timeout=min(left, 0.05)))

    def wait_until(self, predicate: Callable[[], bool], what: str, *, refusals: int = 0) -> None:
        """
        Read reports until *predicate* holds; fail after WAIT seconds, or as
        soon as more than *refusals* frames have been refused.
        """
        deadline = time.monotonic() + WAIT
        while not predicate():
            assert len(self.refusals) <= refusals, (
                f"frames refused while waiting until {what}: {self.refusals}"
            )
            if time.monotonic() > deadline:
                pytest.fail(f"gave up waiting until {what}")
            self.pump(0.05)

    def settle(self, predicate: Callable[[], bool]) -> None:
        """Read reports until *predicate* holds or WAIT seconds pass; the caller checks."""
        deadline = time.monotonic() + WAIT
        while not predicate() and time.monotonic() < deadline:
            self.pump(0.05)

    def by_producer(self, producer: int) -> dict[int, tuple[str, float]]:
        """seq -> (key id, creation time) of the frames one producer delivered."""
        return {s: v for (p, s), v in self.frames.items() if p == producer}

    def drained(self, new: str) -> bool:
        """
        True once every producer has delivered a frame signed with *new*, and
        every frame it put before that one.

        A producer signs in sequence order and never goes back to an older
        key, so every frame it signed with the old key has then been taken
        from the queue and verified: none is in flight any more.
        """
        for producer in range(PRODUCERS):
            mine = self.by_producer(producer)
            first_new = min((s for s, (k, _) in mine.items() if k == new), default=None)
            if first_new is None or any(s not in mine for s in range(first_new)):
                return False
        return True

    def missing(self) -> list[tuple[int, int]]:
        """The items the producers that finished put but nobody delivered."""
        return sorted(
            (p, s) for p, n in self.produced.items() for s in range(n)
            if (p, s) not in self.frames
        )

    def made_after(self, instant: float) -> bool:
        """True once every producer has delivered a frame created after *instant*."""
        return all(
            any(created > instant for _, created in self.by_producer(p).values())
            for p in range(PRODUCERS)
        )


# -- the proof ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("start_method", START_METHODS)
def test_rotation_under_load_refuses_nothing(tmp_path: Path, start_method: str) -> None:
    """
    Stage, promote and retire a key with the CLI while two producers and two
    consumers stream frames: nothing is refused, lost or duplicated; frames
    carry the old key until the promotion and the new one from two watch
    intervals after it; the retired key's frames are refused afterwards.
    """
    ctx = multiprocessing.get_context(start_method)
    path = tmp_path / "ring.json"
    old = keys_cli("init", str(path)).split()[-1]

    ring = Keyring.from_file(path, watch=True, watch_interval=WATCH)
    # A frame signed with the old key while it was the active one, kept to be
    # replayed once the key is retired.
    retired_frame = Codec(Keyring.from_file(path)).dumps(("old frame", 0))

    q = SignedQueue(ring, maxsize=IN_FLIGHT, ctx=ctx)
    results = ctx.Queue()
    stop = ctx.Event()
    producers = [
        ctx.Process(target=_produce, args=(q, results, p, stop), daemon=True)
        for p in range(PRODUCERS)
    ]
    consumers = [
        ctx.Process(target=_consume, args=(q, results, c), daemon=True)
        for c in range(CONSUMERS)
    ]
    ledger = Ledger(results)
    try:
        start_all(consumers + producers)
        ledger.wait_until(
            lambda: all(ledger.by_producer(p) for p in range(PRODUCERS)), "frames flow"
        )

        # 1. Stage the new key, and give every process time to load it.
        new = keys_cli("add", str(path)).split()[-1]
        staged = time.time()
        ledger.pump(3 * WATCH)

        # 2. Promote it.
        promote_started = time.time()
        keys_cli("promote", str(path), new)
        promoted = time.time()

        # 3. Wait until no frame signed with the old key is left in flight.
        ledger.wait_until(lambda: ledger.drained(new), "the old key's frames drained")

        # 4. Retire the old key, and keep streaming past a few watch intervals.
        keys_cli("retire", str(path), old)
        retired = time.time()
        ledger.wait_until(
            lambda: ledger.made_after(retired + 2 * WATCH), "frames flow after retiring"
        )

        # Stop the producers and collect every frame they put.
        stop.set()
        ledger.wait_until(lambda: len(ledger.produced) == PRODUCERS, "producers finish")
        ledger.settle(lambda: not ledger.missing())
        join_all(producers)
        assert [] == ledger.refusals

        # A consumer that has run all along refuses the retired key's frame.
        q.put_frame(retired_frame)
        ledger.wait_until(
            lambda: bool(ledger.refusals), "a consumer refuses the retired frame", refusals=1
        )
        for _ in consumers:
            q.put(None)
        ledger.wait_until(
            lambda: len(ledger.consumers_done) == CONSUMERS, "consumers finish", refusals=1
        )
        join_all(consumers)
    finally:
        stop.set()
        for proc in producers + consumers:
            if proc.is_alive():
                proc.kill()
                proc.join()

    # Nothing was refused during the rotation; the one refusal is the replay.
    assert 1 == len(ledger.refusals), ledger.refusals
    _, exc_name, message, key_id = ledger.refusals[0]
    assert ("UnknownKey", old) == (exc_name, key_id)
    assert old in message
    assert new in message

    # Every item put arrived exactly once, and nothing else did.
    assert [] == ledger.duplicates
    assert [] == ledger.missing()
    expected = {(p, s) for p, n in ledger.produced.items() for s in range(n)}
    assert expected == set(ledger.frames)

    # Each frame carries the key the procedure says it must.
    keys = {key for key, _ in ledger.frames.values()}
    assert {old, new} == keys
    for (p, s), (key, created) in ledger.frames.items():
        if created < promote_started - 0.001:  # created is truncated to the ms
            assert old == key, f"frame {(p, s)} made before the promotion is signed {key}"
        if created > promoted + 2 * WATCH:
            assert new == key, f"frame {(p, s)} made after the promotion is signed {key}"
    # The windows checked above are not empty: frames were made while the new
    # key was staged (and loaded everywhere), and they carry the old key.
    assert any(staged + WATCH < c < promote_started - 0.001 for _, c in ledger.frames.values())
    assert any(c > retired + 2 * WATCH for _, c in ledger.frames.values())

    # The parent refuses it too, naming the retired id and the ids it holds.
    q.put_frame(retired_frame)
    with pytest.raises(UnknownKey) as refused:
        q.get(timeout=WAIT)
    assert old == refused.value.key_id
    assert old in str(refused.value)
    assert new in str(refused.value)

    listed = json.loads(keys_cli("list", str(path), "--json"))
    assert [(new, "active")] == [(k["id"], k["state"]) for k in listed]


# -- backlogs and rollback ----------------------------------------------------


def wait_for(predicate: Callable[[], bool], what: str) -> None:
    """Poll *predicate* until it holds; fail after WAIT seconds."""
    deadline = time.monotonic() + WAIT
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting until {what}")
        time.sleep(0.01)


def test_resealed_backlog_survives_retirement(tmp_path: Path) -> None:
    """
    Frames stored under the old key and resealed after the promotion load
    after the old key is retired, with their creation time, nonce and payload
    kept; the same frames not resealed are refused with UnknownKey.
    """
    path = tmp_path / "ring.json"
    old = keys_cli("init", str(path)).split()[-1]
    ring = Keyring.from_file(path, watch=True, watch_interval=WATCH)
    codec = Codec(ring)
    items = [{"order": n, "sku": f"sku-{n}"} for n in range(20)]
    backlog = [codec.dumps(item) for item in items]

    new = keys_cli("add", str(path)).split()[-1]
    keys_cli("promote", str(path), new)
    wait_for(lambda: ring.active_id == new, "the ring follows the promotion")

    resealed = [codec.reseal(frame) for frame in backlog]
    for before, after in zip(backlog, resealed, strict=True):
        was, now = codec.verify(before), codec.verify(after)
        assert (old, new) == (was.key_id, now.key_id)
        assert (was.created, was.nonce, was.payload_size) == (
            now.created, now.nonce, now.payload_size
        )
        assert codec.unseal(before) == codec.unseal(after)

    keys_cli("retire", str(path), old)
    wait_for(lambda: old not in ring, "the ring follows the retirement")

    assert items == [codec.loads(frame) for frame in resealed]
    for frame in backlog:
        with pytest.raises(UnknownKey) as refused:
            codec.loads(frame)
        assert old == refused.value.key_id
    # Too late to reseal now: the old key is gone.
    with pytest.raises(UnknownKey):
        codec.reseal(backlog[0])


def test_rollback_before_retiring_refuses_nothing(tmp_path: Path) -> None:
    """
    Promoting the previous key back, before it is retired, makes it sign
    again while the frames the new key signed still load.
    """
    path = tmp_path / "ring.json"
    old = keys_cli("init", str(path)).split()[-1]
    ring = Keyring.from_file(path, watch=True, watch_interval=WATCH)
    codec = Codec(ring)
    before = codec.dumps("before")

    new = keys_cli("add", str(path)).split()[-1]
    keys_cli("promote", str(path), new)
    wait_for(lambda: ring.active_id == new, "the ring follows the promotion")
    during = codec.dumps("during")
    assert new == codec.verify(during).key_id

    out = keys_cli("promote", str(path), old)
    assert f"promoted key {old} (key {new} is now previous)" == out.strip()
    wait_for(lambda: ring.active_id == old, "the ring follows the rollback")
    after = codec.dumps("after")

    assert old == codec.verify(after).key_id
    assert "previous" == ring.state(new)
    assert ["before", "during", "after"] == [codec.loads(f) for f in (before, during, after)]
