"""The command line: ``python -m signedqueue``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from signedqueue._cli import main


def run_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run ``python -m signedqueue ARGS`` in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "signedqueue", *args],
        capture_output=True, text=True, timeout=timeout, check=False,
    )


def test_demo_delivers_everything_and_refuses_the_attacks() -> None:
    """The demo exchanges every order across processes and refuses all three attacks."""
    result = run_cli("demo", "--count", "300")
    assert 0 == result.returncode, result.stdout + result.stderr
    out = result.stdout
    assert "delivered 600 of 600 orders" in out
    assert "InvalidSignature" in out
    assert "UnknownKey" in out
    assert "ForbiddenClass" in out
    assert "never ran" in out
    assert out.rstrip().endswith("result: ok")


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_demo_under_other_start_methods(start_method: str) -> None:
    """The demo also works when children are spawned rather than forked."""
    code = (
        "import multiprocessing, sys\n"
        f"multiprocessing.set_start_method({start_method!r})\n"
        "from signedqueue._cli import main\n"
        "sys.exit(main(['demo', '--count', '200']))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=180, check=False)
    assert 0 == result.returncode, result.stdout + result.stderr
    assert f"start method {start_method!r}" in result.stdout


def test_version() -> None:
    """--version prints the installed version."""
    from importlib.metadata import version

    result = run_cli("--version")
    assert 0 == result.returncode
    assert f"signedqueue {version('signedqueue')}" == result.stdout.strip()


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    """Bad arguments exit with status 2 and say what is wrong."""
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--count", "0"])
    assert 2 == exc.value.code
    assert "--count must be at least 1" in capsys.readouterr().err


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    """Without a command the help is printed and the exit code is 2."""
    assert 2 == main([])
    assert "demo" in capsys.readouterr().out


def test_closed_stdout_is_not_a_traceback(tmp_path: Path) -> None:
    """Output into a pipe whose reader has gone (``| head``) ends quietly with status 1."""
    import os

    ring_path = os.path.join(str(tmp_path), "ring.json")
    assert 0 == main(["keys", "init", ring_path])
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "signedqueue", "keys", "list", ring_path],
            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60, check=False,
        )
    finally:
        os.close(write_end)
    assert "Traceback" not in result.stderr
    assert 1 == result.returncode
