"""
Load: 8 producers and 8 consumers exchange 1,000,000 frames of mixed sizes
through one ``SignedQueue``.

Every frame is numbered (producer, sequence) and checked on arrival; each
consumer counts what it got per producer and sequence number, and the test
adds the counts up: every frame arrives exactly once, intact.  The resident
memory of every process is sampled throughout and must stay under a generous
bound (the queue is bounded by ``maxsize``), and afterwards no child process,
thread, file descriptor or memory file is left behind.

Mixed sizes: mostly small dicts (batched through the pipe), one in
``MEDIUM_EVERY`` a 4-64 KiB bytes object (a record of its own), and one in
``LARGE_EVERY`` a 1-2 MiB numpy array or bytes object (a sealed memory file
passed beside the pipe).

The figures (runtime, rate, peak memory) are printed; run with ``-s`` to see
them.  Set ``SIGNEDQUEUE_LOAD_FRAMES`` to change the number of frames.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from processes import join_all, start_all
from signedqueue import Allowlist, Keyring, SignedQueue

np = pytest.importorskip("numpy")

PRODUCERS = 8
CONSUMERS = 8
FRAMES = int(os.environ.get("SIGNEDQUEUE_LOAD_FRAMES", "1000000"))
PER_PRODUCER = -(-FRAMES // PRODUCERS)
MEDIUM_EVERY = 200
LARGE_EVERY = 25_000
#: Items in flight at most: what keeps memory bounded.
MAXSIZE = 10_000
#: Peak resident memory any one process may reach (generous: the machine is
#: shared and the figure includes the interpreter and numpy).
RSS_LIMIT = 400 << 20
#: Seconds the whole exchange may take before the test declares a hang.
HANG = 600.0


def _item(producer: int, seq: int) -> Any:
    if seq % LARGE_EVERY == LARGE_EVERY - 1:
        size = (1 << 20) + (seq * 7919) % (1 << 20)
        if seq % 2:
            return np.full(size // 8, producer * 1_000_000 + seq, dtype=np.int64)
        return bytes([producer, seq % 256]) * (size // 2)
    if seq % MEDIUM_EVERY == MEDIUM_EVERY - 1:
        size = 4096 + (seq * 7919) % (60 * 1024)
        return bytes([producer, seq % 256]) * (size // 2)
    return {"p": producer, "s": seq, "tag": "x" * (seq % 32)}


def _identify(item: Any) -> tuple[int, int, bool]:
    """(producer, sequence, intact) of an arrived item."""
    if isinstance(item, dict):
        p, s = item["p"], item["s"]
        return p, s, item["tag"] == "x" * (s % 32)
    if isinstance(item, tuple):
        (p, s), body = item
        if isinstance(body, bytes):
            return p, s, body[:2] == bytes([p, s % 256]) and body == _item(p, s)
        value = p * 1_000_000 + s
        return p, s, bool(body[0] == value and body[-1] == value) and body.size == _item(
            p, s
        ).size
    raise AssertionError(f"unexpected item {type(item)}")


def _produce(q: SignedQueue, producer: int) -> None:
    for seq in range(PER_PRODUCER):
        if producer * PER_PRODUCER + seq >= FRAMES:
            break
        item = _item(producer, seq)
        q.put(item if isinstance(item, dict) else ((producer, seq), item))
    q.close()
    q.join_thread()


def _consume(q: SignedQueue, out: str) -> None:
    counts = np.zeros((PRODUCERS, PER_PRODUCER), dtype=np.uint8)
    bad = 0
    while True:
        item = q.get()
        if item is None:
            break
        p, s, intact = _identify(item)
        if counts[p, s] < 255:
            counts[p, s] += 1
        bad += not intact
    np.save(out, counts)
    Path(out + ".bad").write_text(str(bad))


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # exited meanwhile
        pass
    return 0


class _Sampler:
    """Samples the resident memory of this process and its children."""

    def __init__(self, pids: list[int], interval: float = 0.5) -> None:
        self.pids = [os.getpid(), *pids]
        self.peak = dict.fromkeys(self.pids, 0)
        self.peak_total = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            total = 0
            for pid in self.pids:
                rss = _rss(pid)
                self.peak[pid] = max(self.peak[pid], rss)
                total += rss
            self.peak_total = max(self.peak_total, total)
            self.samples += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _target(fd: str) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:  # the descriptor listdir() itself used
        return None


def _memory_files() -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/memfd:"):
            found.append(target)
    with open("/proc/self/maps") as maps:
        found += [line for line in maps if "memfd:" in line]
    return found


@pytest.mark.slow
@pytest.mark.timeout(HANG + 120)
def test_million_frames_eight_by_eight(tmp_path: Path) -> None:
    gc.collect()
    fds_before = set(os.listdir("/proc/self/fd"))
    threads_before = set(threading.enumerate())
    shm_before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    assert not multiprocessing.active_children()

    ctx = multiprocessing.get_context("fork")
    q = SignedQueue(
        Keyring.generate(), ctx=ctx, maxsize=MAXSIZE, allow=Allowlist(presets=["stdlib", "numpy"])
    )
    outs = [str(tmp_path / f"consumer{i}.npy") for i in range(CONSUMERS)]
    consumers = [ctx.Process(target=_consume, args=(q, out)) for out in outs]
    producers = [ctx.Process(target=_produce, args=(q, i)) for i in range(PRODUCERS)]
    started = time.monotonic()
    start_all(consumers + producers)
    sampler = _Sampler([proc.pid for proc in consumers + producers])  # type: ignore[misc]
    try:
        deadline = started + HANG
        while any(p.is_alive() for p in producers) and time.monotonic() < deadline:
            # Fail fast, with the exit codes, if any process dies early.
            died = [p.exitcode for p in consumers + producers if p.exitcode not in (None, 0)]
            assert not died, f"child processes died: exit codes {died}"
            assert all(c.is_alive() for c in consumers), "a consumer exited early"
            time.sleep(0.2)
        assert not any(p.is_alive() for p in producers), "producers did not finish"
        for _ in consumers:
            q.put(None)
        for proc in consumers:
            proc.join(max(deadline - time.monotonic(), 0.0))
        elapsed = time.monotonic() - started
        join_all(producers + consumers)
    finally:
        sampler.stop()
        for proc in producers + consumers:
            if proc.is_alive():
                proc.kill()
                proc.join()

    counts = sum(np.load(out).astype(np.int64) for out in outs)
    bad = sum(int(Path(out + ".bad").read_text()) for out in outs)
    expected = np.zeros((PRODUCERS, PER_PRODUCER), dtype=np.int64)
    expected.flat[:FRAMES] = 1  # producer p sent sequences 0 .. PER_PRODUCER - 1
    assert bad == 0, f"{bad} item(s) arrived damaged"
    assert int((counts > 1).sum()) == 0, "frames arrived more than once"
    assert int((counts < expected).sum()) == 0, "frames were lost"
    assert int(counts.sum()) == FRAMES

    peak = max(sampler.peak.values())
    mib = 1 << 20
    print(
        f"\nload: {FRAMES} frames, {PRODUCERS}x{CONSUMERS} processes, {elapsed:.1f} s "
        f"({FRAMES / elapsed:,.0f} frames/s); peak RSS: parent "
        f"{sampler.peak[os.getpid()] / mib:.0f} MiB, any process {peak / mib:.0f} MiB, "
        f"all together {sampler.peak_total / mib:.0f} MiB ({sampler.samples} samples)"
    )
    assert sampler.samples > 0
    assert peak < RSS_LIMIT, f"a process reached {peak / mib:.0f} MiB resident"

    q.close()
    q.join_thread()
    del q
    for proc in producers + consumers:
        proc.close()  # its sentinel descriptor, as the process object would at exit
    gc.collect()
    assert not multiprocessing.active_children()
    assert set(threading.enumerate()) <= threads_before
    leaked = {
        fd: _target(fd) for fd in set(os.listdir("/proc/self/fd")) - fds_before
    }
    assert not {fd: t for fd, t in leaked.items() if t is not None}
    assert not _memory_files()
    if os.path.isdir("/dev/shm"):
        assert set(os.listdir("/dev/shm")) <= shm_before
