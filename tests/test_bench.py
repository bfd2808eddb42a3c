"""``signedqueue bench``: a smoke test of the harness (no timings are asserted)."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import re
from pathlib import Path
from types import ModuleType

import pytest

from signedqueue import Keyring, _bench
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
    assert re.search(r"\[ ?1/\d+\] trial 1/1  small-dict", err)

    doc = json.loads(path.read_text(encoding="utf-8"))
    assert 2 == doc["format"]
    assert {"python", "cpu_count", "platform"} <= set(doc["machine"])
    assert doc["settings"]["quick"] is True
    assert doc["settings"]["trials"] == 1
    assert doc["settings"]["only"] == ["small-dict", "codec-small-dict"]
    assert doc["settings"]["peers"] is True
    assert set(doc["peers"]) == {p.name for p in _bench.PEERS}
    assert set(doc["variants"]) >= {"plain", "signed", "fast"} | set(doc["peers"])
    assert [c["name"] for c in doc["cases"]] == ["small-dict", "codec-small-dict"]
    for case in doc["cases"]:
        expected = {c.name: c.quick_count for c in _bench.CASES}[case["name"]]
        assert case["count"] == expected
        available = [name for name, status in doc["peers"].items()
                     if status["available"] and status["kind"] == case["kind"]]
        assert case["variants"][:2] == ["signed", "plain"]
        assert set(case["variants"]) == {"signed", "plain", *available}
        assert set(case["samples"]) == set(case["median"]) == set(case["variants"])
        for variant in case["variants"]:
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
        assert set(case["ratios"]) == set(case["variants"]) - {"plain"}
        for variant, value in case["ratios"].items():
            assert value == pytest.approx(case["median"][variant] / case["median"]["plain"])
            if variant in doc["peers"]:
                assert variant in out


def test_bench_missing_peers_are_skipped_and_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A peer that cannot be imported is left out with a note, and the JSON says why."""
    real_import = _bench._try_import

    def without_peers(module: str) -> ModuleType:
        if module in ("itsdangerous", "faster_fifo"):
            raise ImportError(f"No module named {module!r}")
        return real_import(module)

    monkeypatch.setattr(_bench, "_try_import", without_peers)
    path = tmp_path / "bench.json"
    assert 0 == main(["bench", "--quick", "--only", "codec-small-dict", "--trials", "1",
                      "--json", str(path)])
    out, err = capsys.readouterr()
    assert "bench: skipping peer itsdangerous: itsdangerous is not installed" in err
    assert "bench: skipping peer faster-fifo" in err
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert doc["peers"]["itsdangerous"]["available"] is False
    assert doc["peers"]["faster-fifo"]["available"] is False
    assert doc["peers"]["fernet"]["available"] is True
    (case,) = doc["cases"]
    assert case["variants"] == ["signed", "plain", "fernet"]
    assert {"name": "codec-small-dict", "variant": "itsdangerous",
            "reason": doc["peers"]["itsdangerous"]["reason"]} in doc["skipped"]
    # faster-fifo only runs in queue cases, none of which was selected.
    assert not [s for s in doc["skipped"] if s.get("variant") == "faster-fifo"]
    assert "fernet" in out and "itsdangerous" not in out


def test_bench_no_peers(tmp_path: Path) -> None:
    """``--no-peers`` runs only signed, plain (and fast) and records no peers."""
    path = tmp_path / "bench.json"
    assert 0 == main(["bench", "--quick", "--only", "codec-small-dict", "--trials", "1",
                      "--no-peers", "--json", str(path)])
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert doc["peers"] == {}
    assert doc["settings"]["peers"] is False
    assert doc["cases"][0]["variants"] == ["signed", "plain"]


def test_bench_fast_variant_of_byte_cases(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Byte cases get a fast column when the codec has ``mac=``; otherwise a recorded skip."""
    monkeypatch.setattr(_bench, "CASES", tuple(
        dataclasses.replace(c, quick_count=5) if c.name == "codec-bytes-1mib" else c
        for c in _bench.CASES))
    path = tmp_path / "bench.json"
    args = ["bench", "--quick", "--only", "codec-bytes-1mib", "--trials", "1", "--no-peers",
            "--json", str(path)]
    if _bench.fast_mac_supported():
        assert 0 == main(args)
        out = capsys.readouterr().out
        assert "fast/plain" in out
        (case,) = json.loads(path.read_text(encoding="utf-8"))["cases"]
        assert case["variants"] == ["signed", "plain", "fast"]
        (sample,) = case["samples"]["fast"]
        assert sample["received_bytes"] == sample["sent_bytes"] == 5 * _bench.MIB
        assert case["ratios"]["fast"] == pytest.approx(
            case["median"]["fast"] / case["median"]["plain"])

    monkeypatch.setattr(_bench, "fast_mac_supported", lambda: False)
    assert 0 == main(args)
    out, err = capsys.readouterr()
    assert "skipping the fast variant" in err
    assert "fast/plain" not in out
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert doc["cases"][0]["variants"] == ["signed", "plain"]
    assert doc["settings"]["fast_mac"] is None
    assert [s["variant"] for s in doc["skipped"]] == ["fast"]


def test_bench_fast_queue_is_a_signed_queue_with_the_fast_mac(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fast queue variant is SignedQueue(keyring, mac="aes256-gmac") with the same options."""
    made: list[dict[str, object]] = []

    def fake_queue(keyring: Keyring, **options: object) -> str:
        made.append(options)
        return "queue"

    monkeypatch.setattr(_bench, "SignedQueue", fake_queue)
    ctx = multiprocessing.get_context()
    case = {c.name: c for c in _bench.CASES}["numpy-64mib"]
    keyring = Keyring.generate()
    _bench._make_queue("signed", case, keyring, 4, ctx)
    _bench._make_queue("fast", case, keyring, 4, ctx)
    signed, fast = made
    assert fast.pop("mac") == "aes256-gmac"
    assert fast == signed
    assert {"maxsize", "ctx", "allow"} <= set(signed)


def test_bench_faster_fifo_run_is_delivery_checked() -> None:
    """A short faster-fifo run, checked like the others (skipped if it is not installed)."""
    pytest.importorskip("faster_fifo")
    case = {c.name: c for c in _bench.CASES}["bytes-1mib"]
    sample = _bench._run_queue(case, "faster-fifo", 5, Keyring.generate())
    assert sample["sent"] == sample["received"] == 5
    assert sample["sent_bytes"] == sample["received_bytes"] == 5 * _bench.MIB


def _fake_doc() -> dict[str, object]:
    cases = []
    for name, ratios in (("small-dict", {"signed": 0.5, "faster-fifo": 1.8}),
                         ("bytes-64mib", {"signed": 0.8, "fast": 1.0}),
                         ("codec-small-dict", {"signed": 0.3, "itsdangerous": 0.5,
                                               "fernet": 0.2})):
        cases.append({"name": name, "ratios": ratios})
    return {"cases": cases, "machine": _bench.machine_info(), "settings": {"trials": 3}}


def test_bench_png_chart_is_written(tmp_path: Path) -> None:
    """``write_png`` draws a PNG file (skipped if matplotlib is not installed)."""
    pytest.importorskip("matplotlib")
    path = tmp_path / "chart.png"
    _bench.write_png(_fake_doc(), str(path))
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_bench_png_option_writes_a_png(tmp_path: Path) -> None:
    """``--png PATH`` writes the chart after the run."""
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.png"
    assert 0 == main(["bench", "--quick", "--only", "codec-small-dict", "--trials", "1",
                      "--no-peers", "--png", str(path)])
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_bench_png_without_matplotlib_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without matplotlib ``--png`` fails before running anything, naming the extra."""
    real_import = _bench._try_import

    def without_matplotlib(module: str) -> ModuleType:
        if module.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(module)

    def no_run(*args: object, **kwargs: object) -> int:
        raise AssertionError("the benchmark ran")

    monkeypatch.setattr(_bench, "_try_import", without_matplotlib)
    monkeypatch.setattr(_bench, "run", no_run)
    path = tmp_path / "bench.png"
    assert 2 == main(["bench", "--png", str(path)])
    err = capsys.readouterr().err
    assert "matplotlib" in err and "pip install 'signedqueue[bench]'" in err
    assert not path.exists()
    with pytest.raises(_bench.BenchmarkError, match=r"signedqueue\[bench\]"):
        _bench.write_png(_fake_doc(), str(path))


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
    ctx = multiprocessing.get_context()
    queue = ctx.Queue()
    for _ in range(3):
        queue.put(b"xyz")
    recv_end, send_end = ctx.Pipe(duplex=False)
    _bench._consumer(queue, "bytes-1mib", 2, ctx.Event(), send_end)
    kind, _end, received, nbytes, bad, peak = recv_end.recv()
    assert (kind, received, nbytes, bad) == ("consumer", 3, 6, 0)
    assert isinstance(peak, int) and peak >= 0
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


# -- broker cases ------------------------------------------------------------


def test_bench_broker_cases_skip_with_reason_when_redis_is_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No Redis: the broker cases are left out, said on stderr and recorded; the rest runs."""
    from brokers import free_port
    from signedqueue import _bench_brokers

    monkeypatch.setattr(_bench_brokers, "REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    path = tmp_path / "bench.json"
    assert 0 == main(["bench", "--quick", "--trials", "1", "--no-peers", "--json", str(path),
                      "--only", "codec-small-dict", "redis-small-dict", "celery-round-trip"])
    err = capsys.readouterr().err
    assert "bench: skipping redis-small-dict: Redis at redis://127.0.0.1:" in err
    assert "bench: skipping celery-round-trip" in err
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert [c["name"] for c in doc["cases"]] == ["codec-small-dict"]
    assert {s["name"] for s in doc["skipped"]} == {"redis-small-dict", "celery-round-trip"}


def test_bench_no_brokers_leaves_broker_cases_out(tmp_path: Path) -> None:
    """``--no-brokers`` runs none of the redis-* and celery-* cases."""
    path = tmp_path / "bench.json"
    assert 0 == main(["bench", "--quick", "--trials", "1", "--no-peers", "--no-brokers",
                      "--only", "codec-small-dict", "redis-small-dict", "--json", str(path)])
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert [c["name"] for c in doc["cases"]] == ["codec-small-dict"]
    assert doc["settings"]["brokers"] is False


def test_bench_redis_cases_are_delivery_checked(redis_url: str) -> None:
    """Every Redis variant delivers every item it sends, and leaves no keys behind."""
    import redis

    from signedqueue import _bench_brokers

    case = {c.name: c for c in _bench.CASES}["redis-small-dict"]
    ring = Keyring.generate()
    client = redis.Redis.from_url(redis_url)
    before = set(client.scan_iter(match="signedqueue-bench-*")) | set(
        client.scan_iter(match="signedqueue:{signedqueue-bench-*"))
    for variant in ("signed", "plain", "redis-reliable"):
        sample = _bench_brokers.run_case(case, variant, 200, ring, None)
        assert (sample["sent"], sample["received"]) == (200, 200)
        assert sample["rate"] == pytest.approx(200 / sample["seconds"])
    after = set(client.scan_iter(match="signedqueue-bench-*")) | set(
        client.scan_iter(match="signedqueue:{signedqueue-bench-*"))
    client.close()
    assert after <= before


@pytest.mark.slow
def test_bench_celery_case_runs_every_variant(redis_url: str) -> None:
    """A real worker per variant (signed, json, auth): every round trip returns the payload."""
    from signedqueue import _bench_brokers

    case = {c.name: c for c in _bench.CASES}["celery-round-trip"]
    ring = Keyring.generate()
    with _bench_brokers.celery_workers(ring) as workers:
        for variant in ("signed", "plain", "celery-auth"):
            sample = _bench_brokers.run_case(case, variant, 20, ring, workers)
            assert (sample["sent"], sample["received"]) == (20, 20)
        procs = list(workers._procs.values())
    assert all(proc.poll() is not None for proc in procs)
