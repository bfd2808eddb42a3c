"""
Every input in tests/corpus/ (fuzz findings and edge cases) through the fuzz
harness (fuzz/harness.py), in both of its modes: ``loads`` must return or
raise a RejectedFrame, within a time bound and without a large allocation.

An input's first byte selects the codec and the mode (see fuzz/harness.py);
each input is also run with the mode bit flipped, so a raw frame is tried
resealed and a resealed payload raw.  To add a finding, copy the file
libFuzzer wrote (crash-*, oom-*, timeout-*) to tests/corpus/ under a name
that says what it is (see fuzz/README.md).
"""

from __future__ import annotations

import gc
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
sys.path.insert(0, str(HERE.parent / "fuzz"))

import harness  # noqa: E402

#: Seconds one input may take (generous: CI machines are shared).
TIME_BOUND = 5.0
#: Bytes one input may allocate at its peak beyond its own size times this.
MEMORY_SLACK = 32 * 1024 * 1024
MEMORY_FACTOR = 64

INPUTS = sorted(p for p in CORPUS.iterdir() if p.is_file() and not p.name.startswith("."))


@pytest.fixture(autouse=True)
def _quiet_refusals(caplog: pytest.LogCaptureFixture) -> None:
    """Refusals are logged at WARNING; the corpus is mostly refusals."""
    caplog.set_level("CRITICAL", logger="signedqueue")


def test_the_corpus_is_not_empty() -> None:
    assert len(INPUTS) >= 10


@pytest.mark.parametrize("resealed", [False, True], ids=["as-is", "mode-flipped"])
@pytest.mark.parametrize("path", INPUTS, ids=[p.name for p in INPUTS])
def test_corpus_input(path: Path, resealed: bool) -> None:
    data = path.read_bytes()
    if resealed and data:
        data = bytes([data[0] ^ 1]) + data[1:]
    gc.collect()
    tracemalloc.start()
    start = time.perf_counter()
    try:
        result = harness.check(data, collect=True)
    finally:
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    del result
    assert elapsed < TIME_BOUND, f"{path.name} took {elapsed:.1f} s"
    assert peak < MEMORY_SLACK + MEMORY_FACTOR * len(data), (
        f"{path.name} allocated {peak} bytes at its peak"
    )
