"""The ``inspect`` and ``audit report`` commands."""

from __future__ import annotations

import collections
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from signedqueue import Allowlist, Codec, Keyring, load_config
from signedqueue._cli import main

#: Protocol 0: three globals in a tuple, none of them called.
THREE_REFUSED = b"(cos\nsystem\ncsubprocess\nPopen\nccollections\nChainMap\ntp0\n."
MARKER = "PAYLOAD-MARKER-7f3a"


def run_cli(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """Run ``python -m signedqueue ARGS`` in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "signedqueue", *args],
        input=stdin, capture_output=True, timeout=180, check=False,
    )


@pytest.fixture
def keyfile(tmp_path: Path, ring: Keyring) -> Path:
    """``ring`` written to a keyring file."""
    path = tmp_path / "ring.json"
    ring.to_file(path)
    return path


def write(tmp_path: Path, name: str, frame: bytes) -> str:
    """Write *frame* to a file and return its path."""
    path = tmp_path / name
    path.write_bytes(frame)
    return str(path)


def test_verified_frame_exits_0(
    tmp_path: Path, keyfile: Path, codec: Codec, capsys: pytest.CaptureFixture[str]
) -> None:
    """A frame that verifies and names only admitted globals prints ok and exits 0."""
    frame = codec.dumps(collections.OrderedDict(a=MARKER))
    code = main(["inspect", "--keyring", str(keyfile), write(tmp_path, "f", frame)])
    out = capsys.readouterr().out
    assert 0 == code, out
    assert "header (verified):" in out
    assert "serializer    pickle" in out
    assert f"key id        {codec.keyring.active_id}" in out
    assert "verification: verified" in out
    assert "ok       collections.OrderedDict  allow: collections.OrderedDict" in out
    assert out.rstrip().endswith("result: ok")
    assert MARKER not in out


def test_without_keyring_is_unverified_and_exits_1(
    tmp_path: Path, codec: Codec, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --keyring the header is marked UNVERIFIED and the exit code is 1."""
    frame = codec.dumps([1, 2])
    assert 1 == main(["inspect", write(tmp_path, "f", frame)])
    out = capsys.readouterr().out
    assert "header (UNVERIFIED):" in out
    assert "verification: UNVERIFIED" in out
    assert "result: REFUSED" in out


def test_tampered_frame_exits_1(
    tmp_path: Path, keyfile: Path, codec: Codec, capsys: pytest.CaptureFixture[str]
) -> None:
    """A tampered frame is reported as refused, with the exception class and reason."""
    frame = bytearray(codec.dumps([1, 2]))
    frame[-33] ^= 0x01
    code = main(["inspect", "--keyring", str(keyfile), write(tmp_path, "f", bytes(frame))])
    out = capsys.readouterr().out
    assert 1 == code
    assert "header (UNVERIFIED):" in out
    assert "verification: REFUSED InvalidSignature: tag does not match" in out


def test_wrong_context_is_refused_and_right_context_verifies(
    tmp_path: Path, keyfile: Path, ring: Keyring, capsys: pytest.CaptureFixture[str]
) -> None:
    """--context must match the context the frame was sealed under."""
    path = write(tmp_path, "f", Codec(ring, context=b"orders").dumps(1))
    assert 1 == main(["inspect", "--keyring", str(keyfile), path])
    assert 0 == main(["inspect", "--keyring", str(keyfile), "--context", "orders", path])
    capsys.readouterr()


def test_refused_globals_are_listed_with_allow_entries(
    tmp_path: Path, keyfile: Path, codec: Codec, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each refused global is REFUSED with the allow entry that admits it, if any."""
    path = write(tmp_path, "f", codec.seal(THREE_REFUSED))
    assert 1 == main(["inspect", "--keyring", str(keyfile), path])
    out = capsys.readouterr().out
    assert "verification: verified" in out
    lines = {line.split()[1]: line for line in out.splitlines() if line.startswith("  REFUSED")}
    assert {"os.system", "subprocess.Popen", "collections.ChainMap"} == set(lines)
    assert "allow: collections.ChainMap" in lines["collections.ChainMap"]
    assert "no allow= entry admits it" in lines["os.system"]


def test_allow_option_admits_a_global(
    tmp_path: Path, keyfile: Path, codec: Codec, capsys: pytest.CaptureFixture[str]
) -> None:
    """--allow makes the named global ok; --preset replaces the default presets."""
    path = write(tmp_path, "f", codec.dumps(collections.ChainMap()))
    assert 1 == main(["inspect", "--keyring", str(keyfile), path])
    capsys.readouterr()
    assert 0 == main(
        ["inspect", "--keyring", str(keyfile), "--allow", "collections.ChainMap", path]
    )
    assert "ok       collections.ChainMap" in capsys.readouterr().out


def test_json_output(
    tmp_path: Path, keyfile: Path, codec: Codec, capsys: pytest.CaptureFixture[str]
) -> None:
    """--json prints one object with the header, verification and globals."""
    frame = codec.seal(THREE_REFUSED)
    assert 1 == main(["inspect", "--json", "--keyring", str(keyfile), write(tmp_path, "f", frame)])
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False
    assert "verified" == data["verification"]["status"]
    assert codec.keyring.active_id == data["header"]["key_id"]
    assert "pickle" == data["header"]["serializer"]
    assert 0 == data["header"]["protocol"]
    assert len(THREE_REFUSED) == data["header"]["payload_size"]
    assert data["header"]["created_iso"].endswith("Z")
    assert 32 == len(data["header"]["nonce"])
    assert ["os.system", "subprocess.Popen", "collections.ChainMap"] == [
        g["global"] for g in data["globals"]
    ]
    assert [None, None, "collections.ChainMap"] == [g["allow_entry"] for g in data["globals"]]


def test_stdin_in_a_subprocess(keyfile: Path, codec: Codec) -> None:
    """'-' reads the frame from standard input; nothing secret or from the payload is printed."""
    frame = codec.dumps({"note": MARKER})
    result = run_cli("inspect", "--keyring", str(keyfile), "-", stdin=frame)
    assert 0 == result.returncode, result.stderr
    out = result.stdout + result.stderr
    assert b"verification: verified" in out
    assert MARKER.encode() not in out
    payload = codec.unseal(frame)
    assert payload not in out
    secret_doc = json.loads(keyfile.read_text())
    for key in secret_doc["keys"].values():
        assert key["secret"].encode() not in out


def test_stdin_json_unverified(codec: Codec) -> None:
    """Without a keyring over stdin, --json reports status unverified and exit 1."""
    result = run_cli("inspect", "--json", "-", stdin=codec.dumps(1))
    assert 1 == result.returncode
    data = json.loads(result.stdout)
    assert "unverified" == data["verification"]["status"]


def test_not_a_frame_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Bytes that are not a frame are refused as MalformedFrame."""
    assert 1 == main(["inspect", write(tmp_path, "f", b"hello")])
    out = capsys.readouterr().out
    assert "header: (unreadable)" in out
    assert "REFUSED MalformedFrame" in out


def test_missing_file_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file that cannot be read is an error on standard error, exit 1."""
    assert 1 == main(["inspect", str(tmp_path / "absent")])
    assert "signedqueue inspect:" in capsys.readouterr().err


def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No file, or an allow entry that is refused, is a usage error."""
    with pytest.raises(SystemExit) as exc:
        main(["inspect"])
    assert 2 == exc.value.code
    path = write(tmp_path, "f", b"x")
    assert 2 == main(["inspect", "--allow", "os.system", path])
    assert 2 == main(["inspect", "--preset", "nope", path])
    assert "os.system" in capsys.readouterr().err


AUDIT_CHILD = """
import pathlib, sys
import signedqueue
ring = signedqueue.Keyring.from_file(sys.argv[1])
codec = signedqueue.Codec(ring, unsafe_audit=True, audit_log=sys.argv[2])
for name in sys.argv[3:]:
    codec.loads(pathlib.Path(name).read_bytes())
"""


def test_audit_report_merges_logs_of_two_processes(
    tmp_path: Path, keyfile: Path, ring: Keyring, capsys: pytest.CaptureFixture[str]
) -> None:
    """Logs from two audit-mode processes merge into a table and a TOML that admits it all."""
    import argparse

    producer = Codec(ring)
    frames = {
        "a": producer.dumps([collections.ChainMap, collections.UserDict]),
        "b": producer.dumps([collections.UserDict, argparse.Namespace]),
    }
    paths = {k: write(tmp_path, k, f) for k, f in frames.items()}
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    for log, name in zip(logs, "ab", strict=True):
        result = subprocess.run(
            [sys.executable, "-c", AUDIT_CHILD, str(keyfile), str(log), paths[name]],
            capture_output=True, text=True, timeout=180, check=False,
        )
        assert 0 == result.returncode, result.stderr

    assert 0 == main(["audit", "report", *map(str, logs)])
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:] if "  " in line}
    assert "2" == rows["collections.UserDict"]
    assert "1" == rows["collections.ChainMap"]
    assert "1" == rows["argparse.Namespace"]
    assert (
        "allow=['argparse.Namespace', 'collections.ChainMap', 'collections.UserDict']" in out
    )

    assert 0 == main(["audit", "report", "--toml", *map(str, logs)])
    toml = capsys.readouterr().out
    assert toml.startswith("[tool.signedqueue]")
    project = tmp_path / "pyproject.toml"
    project.write_text(toml)
    config = load_config(project)
    assert ("stdlib",) == config.allow.presets
    strict = Codec(ring, **config.codec_options())
    assert [collections.ChainMap, collections.UserDict] == strict.loads(frames["a"])
    assert [collections.UserDict, argparse.Namespace] == strict.loads(frames["b"])
    assert 1 == main(["inspect", "--keyring", str(keyfile), paths["b"]])
    capsys.readouterr()
    allow = [a for e in config.allow.entries for a in ("--allow", e)]
    assert 0 == main(["inspect", "--keyring", str(keyfile), *allow, paths["b"]])
    capsys.readouterr()


def test_audit_report_toml_keeps_presets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--preset names the presets the snippet keeps."""
    log = tmp_path / "a.log"
    log.write_text('{"global": "collections.ChainMap", "pid": 1, "time": 0}\n')
    assert 0 == main(["audit", "report", "--toml", "--preset", "stdlib", "--preset", "numpy",
                      str(log)])
    config_path = tmp_path / "sq.toml"
    config_path.write_text(capsys.readouterr().out.replace("[tool.signedqueue]\n", ""))
    assert Allowlist(["collections.ChainMap"], presets=["numpy", "stdlib"]) == load_config(
        config_path
    ).allow


def test_audit_report_of_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An empty log reports that nothing outside the allowlist was loaded."""
    log = tmp_path / "empty.log"
    log.write_text("")
    assert 0 == main(["audit", "report", str(log)])
    assert "nothing outside the allowlist" in capsys.readouterr().out


def test_audit_report_invalid_or_missing_log_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A log that is not JSON lines, or is missing, exits 1 with the reason."""
    bad = tmp_path / "bad.log"
    bad.write_text("not json\n")
    assert 1 == main(["audit", "report", str(bad)])
    assert "not an audit record" in capsys.readouterr().err
    assert 1 == main(["audit", "report", str(tmp_path / "absent.log")])
    assert "signedqueue audit report:" in capsys.readouterr().err


def test_audit_without_action_is_usage_error() -> None:
    """'audit' needs an action."""
    with pytest.raises(SystemExit) as exc:
        main(["audit"])
    assert 2 == exc.value.code


def test_pickle_protocols_all_inspect(
    tmp_path: Path, keyfile: Path, ring: Keyring, capsys: pytest.CaptureFixture[str]
) -> None:
    """Frames of every pickle protocol verify and list their globals."""
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        frame = Codec(ring, protocol=protocol).dumps(collections.deque([1]))
        assert 0 == main(["inspect", "--keyring", str(keyfile), write(tmp_path, "f", frame)])
        assert "collections.deque" in capsys.readouterr().out


def test_cloudpickle_frame_is_verified_and_flagged(
    tmp_path: Path, keyfile: Path, ring: Keyring, capsys: pytest.CaptureFixture[str]
) -> None:
    """A cloudpickle frame verifies; its globals are still flagged against the allowlist."""
    pytest.importorskip("cloudpickle")
    producer = Codec(ring, serializer="cloudpickle", unsafe_trust_signed_frames=True)
    path = write(tmp_path, "f", producer.dumps(collections.ChainMap()))
    assert 1 == main(["inspect", "--keyring", str(keyfile), path])
    out = capsys.readouterr()
    assert "verification: verified" in out.out
    assert "REFUSED  collections.ChainMap" in out.out
    assert "unsafe_trust_signed_frames" not in out.err
