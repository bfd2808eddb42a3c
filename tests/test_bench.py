"""``signedqueue bench``: a smoke test of the harness (no timings are asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from signedqueue import _bench
from signedqueue._cli import main


def test_bench_quick_run_writes_checked_samples(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One quick trial of a queue case and a codec case: every sample delivered all it sent."""
    path = tmp_path / "bench.json"
    code = main(["bench", "--quick", "--only", "small-dict", "codec-small-dict",
                 "--trials", "1", "--json", str(path)])
    assert 0 == code
    out, err = capsys.readouterr()
    assert "small-dict" in out and "signed/plain" in out
    assert "trial 1/1" in err

    doc = json.loads(path.read_text(encoding="utf-8"))
    assert {"python", "cpu_count", "platform"} <= set(doc["machine"])
    assert doc["settings"] == {"quick": True, "trials": 1,
                               "only": ["small-dict", "codec-small-dict"]}
    assert [c["name"] for c in doc["cases"]] == ["small-dict", "codec-small-dict"]
    for case in doc["cases"]:
        expected = {c.name: c.quick_count for c in _bench.CASES}[case["name"]]
        assert case["count"] == expected
        for variant in ("signed", "plain"):
            (sample,) = case["samples"][variant]
            assert sample["sent"] == expected
            assert sample["received"] == expected
            assert sample["received_bytes"] == sample["sent_bytes"]
            assert sample["seconds"] > 0
            assert sample["rate"] == pytest.approx(expected / sample["seconds"])
            assert case["median"][variant] == sample["rate"]
        ratio = case["ratio"]
        assert isinstance(ratio, float) and ratio > 0
        assert ratio == pytest.approx(case["median"]["signed"] / case["median"]["plain"])


def test_bench_delivery_check_refuses_short_counts() -> None:
    """A run that lost an item, lost bytes or got a wrong item is an error, not a number."""
    _bench.check_delivery(10, 100, 10, 100, 0)
    with pytest.raises(_bench.BenchmarkError, match="delivery check failed"):
        _bench.check_delivery(10, 100, 9, 100, 0)
    with pytest.raises(_bench.BenchmarkError):
        _bench.check_delivery(10, 100, 10, 90, 0)
    with pytest.raises(_bench.BenchmarkError):
        _bench.check_delivery(10, 100, 10, 100, 1)


def test_bench_consumer_counts_what_arrives() -> None:
    """The consumer process reports exactly what it received (here: one item too many)."""
    import multiprocessing

    ctx = multiprocessing.get_context()
    queue = ctx.Queue()
    for _ in range(3):
        queue.put(b"xyz")
    recv_end, send_end = ctx.Pipe(duplex=False)
    _bench._consumer(queue, "bytes-1mib", 2, ctx.Event(), send_end)
    kind, _end, received, nbytes, bad = recv_end.recv()
    assert (kind, received, nbytes, bad) == ("consumer", 3, 6, 0)
    queue.close()
    queue.join_thread()
    with pytest.raises(_bench.BenchmarkError):
        _bench.check_delivery(2, 6, received, nbytes, bad)


@pytest.mark.parametrize("args", [["--only", "no-such-case"], ["--trials", "0"]])
def test_bench_usage_errors(args: list[str]) -> None:
    """Unknown case names and a zero trial count are usage errors (exit code 2)."""
    with pytest.raises(SystemExit) as info:
        main(["bench", *args])
    assert 2 == info.value.code


def test_bench_failed_delivery_exits_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run whose delivery check fails is reported on stderr with exit code 1."""

    def failing(*args: object, **kwargs: object) -> int:
        raise _bench.BenchmarkError("delivery check failed: sent 2 items, received 1")

    monkeypatch.setattr(_bench, "run", failing)
    assert 1 == main(["bench", "--quick", "--only", "small-dict"])
    assert "signedqueue bench: delivery check failed" in capsys.readouterr().err
