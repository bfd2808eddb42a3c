"""Helpers for tests that run child processes."""

from __future__ import annotations

import warnings
from typing import Any

#: Seconds any one wait on a child process or queue may take.
WAIT = 60.0


def start_all(processes: list[Any]) -> None:
    """Start child processes."""
    with warnings.catch_warnings():
        # Python 3.12+ warns when forking while threads run (feeder threads);
        # the queues are built for it, as multiprocessing.Queue is.
        warnings.filterwarnings("ignore", ".*fork.*", DeprecationWarning)
        for proc in processes:
            proc.start()


def join_all(processes: list[Any]) -> None:
    """Join child processes; fail unless each exited with status 0."""
    for proc in processes:
        proc.join(WAIT)
    hung = [proc for proc in processes if proc.is_alive()]
    for proc in hung:
        proc.kill()
        proc.join()
    assert not hung, f"{len(hung)} child process(es) did not finish within {WAIT} s"
    assert [0] * len(processes) == [proc.exitcode for proc in processes]
