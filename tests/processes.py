"""Helpers for tests that run child processes."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
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


class Background:
    """Runs a call in a daemon thread and reports its result or exception."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self._box: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._run, args=(fn, args), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            self._box["value"] = fn(*args)
        except BaseException as exc:  # reported by result()
            self._box["error"] = exc

    @property
    def running(self) -> bool:
        """True while the call has not returned."""
        return self._thread.is_alive()

    def result(self) -> Any:
        """Wait up to WAIT seconds; return the call's value or raise its error."""
        self._thread.join(WAIT)
        assert not self._thread.is_alive(), f"the call did not return within {WAIT} s"
        if "error" in self._box:
            raise self._box["error"]
        return self._box.get("value")
