"""The scripts in examples/ run as documented and print what they promise."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_example(name: str) -> subprocess.CompletedProcess[str]:
    """Run ``python examples/NAME.py`` from the repository root."""
    return subprocess.run(
        [sys.executable, str(Path("examples") / f"{name}.py")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_joinable_dict() -> None:
    """A dict crosses a SignedJoinableQueue and join() returns after task_done()."""
    result = run_example("joinable_dict")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert "Worker received: {'a': 1, 'b': [2, 3]}" in lines
    assert lines[-1] == "All items processed; worker exit code 0"


def test_custom_class() -> None:
    """The allowlisted class arrives; the other one is refused with the allow= hint."""
    result = run_example("custom_class")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert "Worker received: Circle(radius=1.5) with area 7.07" in lines
    assert "Worker refused: shapes.Square (to admit it: allow=['shapes.Square'])" in lines
    assert lines[-1] == "Done; worker exit code 0"
    assert "ForbiddenClass" in result.stderr  # the refusal is logged


@pytest.mark.skipif(
    importlib.util.find_spec("cloudpickle") is None, reason="needs signedqueue[cloudpickle]"
)
def test_lambda_cloudpickle() -> None:
    """A lambda crosses only with the explicit full-trust opt-in, which is logged."""
    result = run_example("lambda_cloudpickle")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert "Without unsafe_trust_signed_frames=True: refused (ValueError)" in lines
    assert "Worker received a function: fn(21) = 42" in lines
    assert lines[-1] == "Done; worker exit code 0"
    assert "unsafe_trust_signed_frames=True" in result.stderr
