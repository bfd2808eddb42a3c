"""``signedqueue keys``: create, stage, promote, retire and list keys from the command line."""

from __future__ import annotations

import base64
import json
import os
import re
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from signedqueue import Codec, Keyring
from signedqueue._cli import main
from signedqueue._keys import derive_mac_key

#: (exit code, standard output, standard error)
Result = tuple[int, str, str]
Cli = Callable[..., Result]

TIMEOUT = 60
#: An age as keys list prints it: whole seconds, or minutes, hours or days to 0.1.
AGE = r"\d+s|\d+\.\d[mhd]"


def run_subprocess(*args: str) -> Result:
    """``python -m signedqueue ARGS`` in a fresh interpreter."""
    proc = subprocess.run(
        [sys.executable, "-m", "signedqueue", *args],
        capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )
    return proc.returncode, proc.stdout, proc.stderr


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> Result:
    """``signedqueue._cli.main(ARGS)`` in this process; usage errors exit through SystemExit."""
    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(params=["main", "subprocess"])
def cli(request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]) -> Cli:
    """Runs ``signedqueue ARGS`` in this process or in a subprocess."""
    if request.param == "main":
        return lambda *args: run_main(capsys, *map(str, args))
    return lambda *args: run_subprocess(*map(str, args))


@pytest.fixture
def in_process(capsys: pytest.CaptureFixture[str]) -> Cli:
    """Runs ``signedqueue ARGS`` through main() in this process."""
    return lambda *args: run_main(capsys, *map(str, args))


def secrets_of(path: Path) -> list[bytes]:
    """Every secret in a keyring file."""
    doc = json.loads(path.read_text())
    return [base64.b64decode(k["secret"]) for k in doc["keys"].values()]


def secret_forms(secret: bytes) -> list[str]:
    """Every way a secret, or the MAC key derived from it, could be printed."""
    forms = []
    for raw in (secret, derive_mac_key(secret)):
        forms += [
            raw.hex(),
            raw.hex().upper(),
            base64.b64encode(raw).decode(),
            base64.b64encode(raw).decode().rstrip("="),
            base64.urlsafe_b64encode(raw).decode().rstrip("="),
            repr(raw)[2:-1],
        ]
    return forms


def assert_no_secret(text: str, secrets: list[bytes]) -> None:
    """No form of any of *secrets* occurs in *text*."""
    for secret in secrets:
        for form in secret_forms(secret):
            assert form not in text


def mode_of(path: Path) -> int:
    """The permission bits of *path*."""
    return stat.S_IMODE(path.stat().st_mode)


def states(path: Path) -> dict[str, str]:
    """Key id to state, as the file says."""
    doc = json.loads(path.read_text())
    return {kid: entry["state"] for kid, entry in doc["keys"].items()}


def assert_one_line_error(result: Result, action: str, message: str) -> None:
    """Exit 1, nothing on stdout, one line on stderr naming the action and the problem."""
    code, out, err = result
    assert (code, out) == (1, ""), err
    assert err.endswith("\n")
    assert err.count("\n") == 1, err
    assert err.startswith(f"signedqueue keys {action}: "), err
    assert message in err


# -- the lifecycle -------------------------------------------------------------------


def test_lifecycle(cli: Cli, tmp_path: Path) -> None:
    """init, add, promote, retire and list, each with its output, exit code and mode 0600."""
    path = tmp_path / "ring.json"
    outputs = []

    def ok(*args: str) -> str:
        code, out, err = cli(*args)
        assert (code, err) == (0, ""), err
        outputs.append(out)
        return out

    assert ok("keys", "init", path, "--id", "k1") == f"created {path} with active key k1\n"
    assert mode_of(path) == 0o600
    assert states(path) == {"k1": "active"}

    out = ok("keys", "add", path)
    staged = out.split()[-1]  # the id is the last word
    assert out == f"staged key {staged}\n"
    assert states(path) == {"k1": "active", staged: "staged"}
    assert mode_of(path) == 0o600

    assert ok("keys", "add", path, "--id", "k3") == "staged key k3\n"
    assert ok("keys", "promote", path, "k3") == "promoted key k3 (key k1 is now previous)\n"
    assert states(path) == {"k1": "previous", staged: "staged", "k3": "active"}
    assert mode_of(path) == 0o600
    assert ok("keys", "promote", path, "k3") == "key k3 is already active\n"

    assert ok("keys", "retire", path, "k1") == "retired key k1\n"
    assert states(path) == {staged: "staged", "k3": "active"}
    assert mode_of(path) == 0o600

    lines = ok("keys", "list", path).splitlines()
    assert lines[0].split() == ["ID", "STATE", "AGE"]
    rows = [line.split() for line in lines[1:]]
    assert [row[:2] for row in rows] == [[staged, "staged"], ["k3", "active"]]
    assert all(re.fullmatch(AGE, row[2]) for row in rows)

    listed = json.loads(ok("keys", "list", path, "--json"))
    assert [(k["id"], k["state"]) for k in listed] == [(staged, "staged"), ("k3", "active")]
    assert set(listed[0]) == {"id", "state", "created", "age_seconds"}

    # The file is a keyring the library loads, and it signs with the promoted key.
    ring = Keyring.from_file(path)
    assert ring.active_id == "k3"
    assert Codec(ring).verify(Codec(ring).dumps(1)).key_id == "k3"
    assert_no_secret("".join(outputs), secrets_of(path))


def test_add_id_is_the_last_word(in_process: Cli, tmp_path: Path) -> None:
    """A script can take the new id as the last word of the output of keys add."""
    path = tmp_path / "ring.json"
    in_process("keys", "init", path)
    ids = {in_process("keys", "add", path)[1].split()[-1] for _ in range(3)}
    assert len(ids) == 3
    assert ids < set(states(path))
    assert {states(path)[kid] for kid in ids} == {"staged"}


def test_a_watching_ring_follows_the_cli(in_process: Cli, tmp_path: Path) -> None:
    """A process watching the file picks up what keys add and keys promote wrote."""
    path = tmp_path / "ring.json"
    in_process("keys", "init", path, "--id", "k1")
    ring = Keyring.from_file(path, watch=True, watch_interval=0.01)
    in_process("keys", "add", path, "--id", "k2")
    in_process("keys", "promote", path, "k2")
    deadline = time.monotonic() + TIMEOUT
    while ring.active_id != "k2":
        assert time.monotonic() < deadline, "the ring never saw the promotion"
        time.sleep(0.005)
    assert ring.state("k1") == "previous"


# -- init --------------------------------------------------------------------------


@contextmanager
def umask(mask: int) -> Iterator[None]:
    """Set the process umask for a block."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def test_init_mode_0600_whatever_the_umask(in_process: Cli, tmp_path: Path) -> None:
    """keys init writes mode 0600 even under umask 0."""
    path = tmp_path / "ring.json"
    with umask(0):
        assert in_process("keys", "init", path)[0] == 0
    assert mode_of(path) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["ring.json"]


@pytest.mark.parametrize("existing", ["keyring", "other-file", "empty", "dangling-symlink"])
def test_init_refuses_to_overwrite(cli: Cli, tmp_path: Path, existing: str) -> None:
    """keys init never replaces an existing path, not even a dangling symlink."""
    path = tmp_path / "ring.json"
    if existing == "keyring":
        Keyring.generate("k1").to_file(path)
    elif existing == "other-file":
        path.write_text("precious")
    elif existing == "empty":
        path.write_text("")
    else:
        path.symlink_to(tmp_path / "nowhere")
    before = os.readlink(path) if path.is_symlink() else path.read_bytes()
    assert_one_line_error(
        cli("keys", "init", path), "init", f"'{path}' already exists; refusing to overwrite"
    )
    assert before == (os.readlink(path) if path.is_symlink() else path.read_bytes())
    assert not (tmp_path / "nowhere").exists()


# -- refusals ------------------------------------------------------------------------


def _ring_file(tmp_path: Path) -> Path:
    path = tmp_path / "ring.json"
    Keyring({"k1": os.urandom(32), "k2": os.urandom(32)}, "k1").to_file(path)
    return path


def _broken_file(tmp_path: Path) -> Path:
    path = tmp_path / "ring.json"
    path.write_text("{not json")
    path.chmod(0o600)
    return path


def _insecure_file(tmp_path: Path) -> Path:
    path = _ring_file(tmp_path)
    path.chmod(0o644)
    return path


REFUSALS = [
    # (make the file, argv after PATH, action, message)
    (_ring_file, ["promote", "zz"], "no key 'zz' in the ring; known ids: ['k1', 'k2']"),
    (_ring_file, ["retire", "zz"], "no key 'zz' in the ring; known ids: ['k1', 'k2']"),
    (_ring_file, ["retire", "k1"], "key 'k1' is the active signing key; promote another"),
    (_ring_file, ["add", "--id", "k2"], "the ring already holds a key 'k2'"),
    (_ring_file, ["add", "--id", "bad id"], "invalid key id 'bad id'"),
    (_broken_file, ["list"], "keyring document is not valid JSON"),
    (_broken_file, ["add"], "keyring document is not valid JSON"),
    (_broken_file, ["promote", "k1"], "keyring document is not valid JSON"),
    (_broken_file, ["retire", "k1"], "keyring document is not valid JSON"),
    (_insecure_file, ["list"], "is accessible to group or others (mode 0644)"),
    (_insecure_file, ["add"], "is accessible to group or others (mode 0644)"),
    (_insecure_file, ["promote", "k2"], "is accessible to group or others (mode 0644)"),
    (_insecure_file, ["retire", "k2"], "is accessible to group or others (mode 0644)"),
]


@pytest.mark.parametrize(
    ("make", "argv", "message"), REFUSALS, ids=[f"{m.__name__[1:]}-{a[0]}" for m, a, _ in REFUSALS]
)
def test_refusals(
    in_process: Cli, tmp_path: Path, make: Callable[[Path], Path], argv: list[str], message: str
) -> None:
    """A refused action exits 1 with one line naming it, and leaves the file as it was."""
    path = make(tmp_path)
    before = path.read_bytes(), mode_of(path)
    action, *rest = argv
    result = in_process("keys", action, path, *rest)
    assert_one_line_error(result, action, message)
    assert before == (path.read_bytes(), mode_of(path))
    assert [p.name for p in tmp_path.iterdir()] == ["ring.json"]
    if make is not _broken_file:
        assert_no_secret(result[2], secrets_of(path))


@pytest.mark.parametrize(
    "argv",
    [["add"], ["promote", "k1"], ["retire", "k1"], ["list"], ["list", "--json"]],
    ids=lambda argv: "-".join(argv),
)
def test_missing_file(cli: Cli, tmp_path: Path, argv: list[str]) -> None:
    """Every action on a missing file exits 1, naming the action and the file."""
    path = tmp_path / "nope.json"
    action, *rest = argv
    assert_one_line_error(
        cli("keys", action, path, *rest), action, f"No such file or directory ({path})"
    )
    assert not path.exists()


def test_refusals_in_a_subprocess(tmp_path: Path) -> None:
    """From the shell too, refusals exit 1 with one line on stderr."""
    path = _ring_file(tmp_path)
    assert_one_line_error(run_subprocess("keys", "retire", str(path), "k1"), "retire",
                          "is the active signing key")
    assert_one_line_error(run_subprocess("keys", "promote", str(path), "zz"), "promote",
                          "known ids: ['k1', 'k2']")
    path.chmod(0o604)
    assert_one_line_error(run_subprocess("keys", "add", str(path)), "add",
                          "is accessible to group or others (mode 0604)")


@pytest.mark.parametrize("action", ["init", "add"])
def test_invalid_id_creates_nothing(in_process: Cli, tmp_path: Path, action: str) -> None:
    """An invalid --id is refused before anything is written."""
    path = tmp_path / "ring.json"
    if action == "add":
        in_process("keys", "init", path, "--id", "k1")
    before = path.read_bytes() if path.exists() else None
    assert_one_line_error(in_process("keys", action, path, "--id", "no/slashes"), action,
                          "invalid key id 'no/slashes'")
    assert before == (path.read_bytes() if path.exists() else None)


def test_init_in_a_missing_directory(in_process: Cli, tmp_path: Path) -> None:
    """keys init in a directory that does not exist exits 1 and creates nothing."""
    path = tmp_path / "missing" / "ring.json"
    assert_one_line_error(in_process("keys", "init", path), "init", "No such file or directory")
    assert not (tmp_path / "missing").exists()


def test_path_is_a_directory(in_process: Cli, tmp_path: Path) -> None:
    """A directory given as the keyring file is refused with exit 1."""
    assert_one_line_error(in_process("keys", "list", tmp_path), "list", "Is a directory")
    assert_one_line_error(in_process("keys", "add", tmp_path), "add", "Is a directory")


# -- permissions ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv", [["add"], ["promote", "k2"], ["retire", "k2"]], ids=lambda a: a[0]
)
def test_allow_insecure_permissions_then_0600(cli: Cli, tmp_path: Path, argv: list[str]) -> None:
    """With --allow-insecure-permissions an edit goes ahead, and leaves the file 0600."""
    path = _insecure_file(tmp_path)
    action, *rest = argv
    code, out, err = cli("keys", action, path, *rest, "--allow-insecure-permissions")
    assert (code, err) == (0, "")
    assert out
    assert mode_of(path) == 0o600


def test_list_allow_insecure_permissions(cli: Cli, tmp_path: Path) -> None:
    """keys list --allow-insecure-permissions reads a readable file and does not change it."""
    path = _insecure_file(tmp_path)
    code, out, err = cli("keys", "list", path, "--allow-insecure-permissions")
    assert (code, err) == (0, "")
    assert ["k1", "k2"] == [line.split()[0] for line in out.splitlines()[1:]]
    assert mode_of(path) == 0o644


# -- usage errors --------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["keys"],
        ["keys", "frobnicate", "ring.json"],
        ["keys", "init"],
        ["keys", "add"],
        ["keys", "promote", "ring.json"],
        ["keys", "retire", "ring.json"],
        ["keys", "list", "ring.json", "--bogus"],
        ["keys", "init", "ring.json", "--allow-insecure-permissions"],
        ["keys", "promote", "ring.json", "k1", "k2"],
    ],
    ids=lambda argv: "-".join(argv[1:]) or "no-action",
)
def test_usage_errors_exit_2(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str]
) -> None:
    """Missing or unknown arguments exit 2 with a usage message, touching no file."""
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(*argv)
    assert code == 2
    assert out == ""
    assert err.startswith("usage: signedqueue")
    assert "error: " in err
    assert list(tmp_path.iterdir()) == []


def test_help(cli: Cli) -> None:
    """keys --help lists every action and exits 0."""
    code, out, _ = cli("keys", "--help")
    assert code == 0
    for action in ("init", "add", "promote", "retire", "list"):
        assert action in out


# -- listing never shows secrets -------------------------------------------------------


def test_list_never_prints_secrets(cli: Cli, tmp_path: Path) -> None:
    """keys list, as a table or as JSON, shows ids, states and ages, never a secret."""
    path = tmp_path / "ring.json"
    now = time.time()
    Keyring(
        {"old": os.urandom(32), "cur": os.urandom(16), "new": os.urandom(64)}, "cur",
        created={"old": now - 3 * 86400, "cur": now - 7200, "new": now - 90},
        states={"old": "previous"},
    ).to_file(path)
    code, table, err = cli("keys", "list", path)
    assert (code, err) == (0, "")
    rows = [line.split() for line in table.splitlines()]
    assert rows[0] == ["ID", "STATE", "AGE"]
    assert [row[:2] for row in rows[1:]] == [["old", "previous"], ["cur", "active"],
                                            ["new", "staged"]]
    # Ages only grow while the test runs: check lower bounds and units.
    for row, (least, unit) in zip(rows[1:], [(3.0, "d"), (2.0, "h"), (1.5, "m")], strict=True):
        assert re.fullmatch(AGE, row[2])
        assert row[2][-1] == unit
        assert float(row[2][:-1]) >= least
    code, text, err = cli("keys", "list", path, "--json")
    assert (code, err) == (0, "")
    listed = json.loads(text)
    assert [(k["id"], k["state"]) for k in listed] == [
        ("old", "previous"), ("cur", "active"), ("new", "staged")
    ]
    for info, age in zip(listed, [3 * 86400, 7200, 90], strict=True):
        assert info["created"] == now - age
        assert info["age_seconds"] >= age
    assert_no_secret(table + text, secrets_of(path))
    assert "secret" not in table + text


# -- concurrent edits -------------------------------------------------------------------

#: A `keys add` that waits, already imported, for the word to go.
ADD_ON_SIGNAL = """
import sys
from signedqueue._cli import main
print("ready", flush=True)
sys.stdin.readline()
sys.exit(main(["keys", "add", sys.argv[1]]))
"""


def test_concurrent_adds_lose_no_key(tmp_path: Path) -> None:
    """Eight processes running keys add at the same instant: all eight keys are kept."""
    path = tmp_path / "ring.json"
    Keyring.generate("k0").to_file(path)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", ADD_ON_SIGNAL, str(path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for _ in range(8)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "ready\n"
        for proc in procs:  # all start their read-modify-write together
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = [proc.communicate(timeout=TIMEOUT) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:  # pragma: no cover - only on failure
                proc.kill()
                proc.wait()
    assert [proc.returncode for proc in procs] == [0] * 8, [err for _, err in results]
    added = {out.split()[-1] for out, _ in results}
    assert len(added) == 8
    final = states(path)
    assert len(final) == 9
    assert set(final) == {"k0", *added}
    assert mode_of(path) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["ring.json"]
