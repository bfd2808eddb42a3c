"""Keyrings backed by a file or a directory: watching, broken sources, threads, pickling."""

from __future__ import annotations

import base64
import binascii
import fcntl
import json
import logging
import multiprocessing
import os
import re
import stat
import threading
import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing import context
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import pytest

import signedqueue._frame
import signedqueue._keysource
from signedqueue import Codec, Keyring, KeyringError, SignedQueue, UnknownKey
from signedqueue._keys import derive_mac_key
from signedqueue._keysource import locked, write_atomically

#: Interval of the watched rings below: short, so that tests do not wait long.
INTERVAL = 0.05
#: How long to wait for something that should happen within a few intervals.
DEADLINE = 30.0


# -- helpers ---------------------------------------------------------------------


def wait_for(predicate: Callable[[], object], what: str) -> None:
    """Poll *predicate* until it is true; fail (never assert on time) after DEADLINE."""
    deadline = time.monotonic() + DEADLINE
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.005)


def secret_of(ring: Keyring, key_id: str) -> bytes:
    """A key's secret, through the public JSON export."""
    return base64.b64decode(json.loads(ring.to_json())["keys"][key_id]["secret"])


def secret_forms(secret: bytes) -> list[bytes]:
    """Every form in which a secret (or its MAC key) could leak into bytes or text."""
    forms = []
    for raw in (secret, derive_mac_key(secret)):
        forms += [
            raw,
            raw.hex().encode(),
            base64.b64encode(raw),
            base64.urlsafe_b64encode(raw),
            repr(raw)[2:-1].encode(),
        ]
    return forms


def assert_no_secret(data: bytes | str, ring: Keyring) -> None:
    """No form of any secret of *ring* occurs in *data*."""
    blob = data.encode() if isinstance(data, str) else data
    for key_id in ring.key_ids:
        for form in secret_forms(secret_of(ring, key_id)):
            assert form not in blob, key_id


def states_of(ring: Keyring) -> dict[str, str]:
    """Key id to state, through the public keys()."""
    infos = ring.describe()
    return {info.key_id: info.state for info in infos}


def edit(path: Path, change: Callable[[Keyring], Any]) -> Any:
    """Another writer: load the file, change the ring, write it back (as the CLI does)."""
    ring = Keyring.from_file(path)
    result = change(ring)
    ring.to_file(path)
    return result


class StatCounter:
    """Counts os.stat calls on one path (the watch's only cost on the hot path)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
        self.path = os.fspath(path)
        self.count = 0
        self._counting = True
        self._stat = os.stat
        monkeypatch.setattr(signedqueue._keysource.os, "stat", self)

    def __call__(self, path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if (self._counting and isinstance(path, (str, os.PathLike))
                and os.fspath(path) == self.path):
            self.count += 1
        return self._stat(path, *args, **kwargs)

    @contextmanager
    def ignored(self) -> Iterator[None]:
        """Do not count the stats of a block (the test's own loading of the file)."""
        self._counting = False
        try:
            yield
        finally:
            self._counting = True


class FakeMonotonic:
    """Stands in for time.monotonic in the key source: moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fake_monotonic(monkeypatch: pytest.MonkeyPatch) -> FakeMonotonic:
    """The key source's clock, frozen until advanced by hand."""
    clock = FakeMonotonic()
    monkeypatch.setattr(signedqueue._keysource, "time", types.SimpleNamespace(monotonic=clock))
    return clock


@pytest.fixture
def ring_file(tmp_path: Path) -> Path:
    """A keyring file holding one active key, 'k1'."""
    path = tmp_path / "ring.json"
    Keyring.generate("k1").to_file(path)
    return path


def error_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The errors the library logged."""
    return [r for r in caplog.records if r.name == "signedqueue" and r.levelno >= logging.ERROR]


# -- watching a file ---------------------------------------------------------------


def test_watch_picks_up_add_promote_retire(ring_file: Path) -> None:
    """A watched ring follows another writer's add, promote and retire of keys."""
    ring = Keyring.from_file(ring_file, watch=True, watch_interval=INTERVAL)
    codec = Codec(ring)
    old_frame = codec.dumps("by k1")

    edit(ring_file, lambda r: r.add("k2"))
    wait_for(lambda: "k2" in ring, "the staged key")
    assert ring.state("k2") == "staged"
    assert signedqueue._frame.peek_key_id(codec.dumps(0)) == "k1"

    edit(ring_file, lambda r: r.promote("k2"))
    wait_for(lambda: ring.active_id == "k2", "the promotion")
    assert states_of(ring) == {"k1": "previous", "k2": "active"}
    new_frame = codec.dumps("by k2")
    assert signedqueue._frame.peek_key_id(new_frame) == "k2"
    assert codec.loads(old_frame) == "by k1"

    edit(ring_file, lambda r: r.retire("k1"))
    wait_for(lambda: "k1" not in ring, "the retirement")
    assert ring.key_ids == ("k2",)
    with pytest.raises(UnknownKey):
        codec.loads(old_frame)
    assert codec.loads(new_frame) == "by k2"
    # What the ring holds is what the file holds.
    assert Keyring.from_file(ring_file).to_json() == ring.to_json()


def test_unwatched_file_ring_does_not_follow(ring_file: Path) -> None:
    """Without watch=True, a ring keeps the keys it loaded and never looks at the file."""
    ring = Keyring.from_file(ring_file, watch_interval=1e-9)
    new_id = edit(ring_file, lambda r: r.rotate())
    for _ in range(100):
        assert ring.active_id == "k1"
    assert new_id not in ring


def test_at_most_one_stat_per_interval(
    ring_file: Path, monkeypatch: pytest.MonkeyPatch, fake_monotonic: FakeMonotonic
) -> None:
    """Signing and verifying cost at most one stat of the file per interval, however many."""
    ring = Keyring.from_file(ring_file, watch=True, watch_interval=1.0)
    codec = Codec(ring)
    stats = StatCounter(monkeypatch, ring_file)

    def work() -> None:
        for i in range(300):
            assert codec.loads(codec.dumps(i)) == i
            assert ring.active_id == "k1"

    work()
    assert stats.count == 0  # still inside the first interval
    fake_monotonic.now += 1.0
    work()
    assert stats.count == 1
    fake_monotonic.now += 0.5
    work()
    assert stats.count == 1
    fake_monotonic.now += 0.5
    work()
    assert stats.count == 2


def test_changes_are_seen_at_the_next_check(
    ring_file: Path, fake_monotonic: FakeMonotonic
) -> None:
    """A change to the file is picked up at the first check after the interval, not before."""
    ring = Keyring.from_file(ring_file, watch=True, watch_interval=1.0)
    new_id = edit(ring_file, lambda r: r.rotate())
    fake_monotonic.now += 0.5
    assert ring.active_id == "k1"
    fake_monotonic.now += 0.5
    assert ring.active_id == new_id
    assert ring.state("k1") == "previous"


def test_unknown_key_id_triggers_an_early_check(ring_file: Path) -> None:
    """A frame from a key staged moments ago verifies at once, long before the interval."""
    consumer = Keyring.from_file(ring_file, watch=True, watch_interval=3600)
    codec = Codec(consumer)
    edit(ring_file, lambda r: r.add("k2"))
    # A producer elsewhere that already promoted the new key.
    producer = Keyring.from_file(ring_file)
    producer.promote("k2")
    frame = Codec(producer).dumps("from k2")
    assert codec.loads(frame) == "from k2"
    assert consumer.state("k2") == "staged"
    assert consumer.active_id == "k1"


def test_early_checks_are_rate_limited(
    ring_file: Path, monkeypatch: pytest.MonkeyPatch, fake_monotonic: FakeMonotonic
) -> None:
    """Frames naming unknown key ids cause at most one early check per 50 ms."""
    consumer = Codec(Keyring.from_file(ring_file, watch=True, watch_interval=3600))
    stranger = Codec(Keyring.generate("stranger")).dumps(1)
    stats = StatCounter(monkeypatch, ring_file)
    for _ in range(200):
        with pytest.raises(UnknownKey):
            consumer.loads(stranger)
    assert stats.count == 1
    # Within the same 50 ms, a key staged just now is not looked for again...
    with stats.ignored():
        edit(ring_file, lambda r: r.add("k2"))
        producer = Keyring.from_file(ring_file)
        producer.promote("k2")
        frame = Codec(producer).dumps("from k2")
    with pytest.raises(UnknownKey):
        consumer.loads(frame)
    assert stats.count == 1
    # ...but 50 ms later it is.
    fake_monotonic.now += 0.0625
    assert consumer.loads(frame) == "from k2"
    assert stats.count == 2


def test_watch_interval_must_be_positive(ring_file: Path, tmp_path: Path) -> None:
    """A watched ring needs a positive interval."""
    for interval in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="watch_interval must be a positive"):
            Keyring.from_file(ring_file, watch=True, watch_interval=interval)
        with pytest.raises(ValueError, match="watch_interval must be a positive"):
            Keyring.from_directory(tmp_path, watch=True, watch_interval=interval)


# -- broken sources ----------------------------------------------------------------


def write_in_place(path: Path, data: bytes) -> None:
    """Overwrite *path* in place, as a careless (non-atomic) writer would."""
    with open(path, "r+b") as fh:
        fh.truncate(0)
        fh.write(data)


def _not_json(path: Path) -> None:
    write_atomically(path, b"{not json")


def _half_written(path: Path) -> None:
    text = path.read_bytes()
    ring = Keyring.from_json(text)
    ring.add("k9")
    new = ring.to_json().encode()
    write_in_place(path, new[: len(new) // 2])


def _insecure(path: Path) -> None:
    path.chmod(0o644)


def _two_active(path: Path) -> None:
    doc = json.loads(path.read_text())
    doc["keys"]["k9"] = dict(doc["keys"]["k1"], secret=base64.b64encode(bytes(32)).decode())
    write_atomically(path, json.dumps(doc).encode())


def _deleted(path: Path) -> None:
    path.unlink()


def _directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


BREAKAGES = {
    "not-json": _not_json,
    "half-written": _half_written,
    "insecure-permissions": _insecure,
    "two-active-keys": _two_active,
    "deleted": _deleted,
    "directory": _directory,
}


@pytest.mark.parametrize("kind", list(BREAKAGES))
def test_broken_file_keeps_the_old_keys(
    ring_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    kind: str,
) -> None:
    """A broken file never replaces the loaded keys; one error is logged; a fix is picked up."""
    ring = Keyring.from_file(ring_file, watch=True, watch_interval=INTERVAL)
    codec = Codec(ring)
    frame = codec.dumps("before")
    good = ring.to_json()
    stats = StatCounter(monkeypatch, ring_file)
    caplog.set_level(logging.INFO, logger="signedqueue")

    BREAKAGES[kind](ring_file)
    wait_for(lambda: codec.dumps(1) and error_records(caplog), "the error to be logged")
    seen = stats.count
    wait_for(lambda: codec.dumps(1) and stats.count >= seen + 3, "three more checks")
    [record] = error_records(caplog)  # logged once, not at every check
    message = record.getMessage()
    assert str(ring_file) in message
    assert "keeping the 1 keys loaded before" in message
    assert_no_secret(message, ring)
    assert ring.to_json() == good
    assert codec.loads(frame) == "before"
    assert signedqueue._frame.peek_key_id(codec.dumps(0)) == "k1"

    # A good file (written atomically, mode 0600) is picked up again.
    if ring_file.is_dir():
        ring_file.rmdir()
    fixed = Keyring.from_json(good)
    new_id = fixed.rotate()
    fixed.to_file(ring_file)
    wait_for(lambda: ring.active_id == new_id, "the good file")
    assert codec.loads(frame) == "before"
    assert len(error_records(caplog)) == 1
    assert any("reloaded the keyring" in r.getMessage() for r in caplog.records)


def test_each_new_breakage_is_logged(ring_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Every change that leaves the file broken is logged once, after a good reload as well."""
    ring = Keyring.from_file(ring_file, watch=True, watch_interval=INTERVAL)
    good = ring.to_json()

    def errors_reach(n: int) -> Callable[[], bool]:
        return lambda: ring.active_id and len(error_records(caplog)) >= n

    write_atomically(ring_file, b"{broken")
    wait_for(errors_reach(1), "the first error")
    write_atomically(ring_file, b"{broken, differently}")
    wait_for(errors_reach(2), "the second error")
    ring_file.unlink()
    wait_for(errors_reach(3), "the error for the missing file")
    fixed = Keyring.from_json(good)
    new_id = fixed.rotate()
    fixed.to_file(ring_file)
    wait_for(lambda: ring.active_id == new_id, "the good file")
    ring_file.unlink()  # broken again, the same way as before the good file
    wait_for(errors_reach(4), "the error for the file missing again")
    assert ring.active_id == new_id


@contextmanager
def lock_hook(ring: Keyring, hook: Callable[[], None]) -> Iterator[None]:
    """Run *hook* once, right after the ring's source first releases its lock."""
    source = ring._source
    assert source is not None
    real = source._lock

    class HookedLock:
        fired = False

        def acquire(self, blocking: bool = True) -> bool:
            return real.acquire(blocking)

        def release(self) -> None:
            real.release()
            if not HookedLock.fired:
                HookedLock.fired = True
                hook()

    source._lock = HookedLock()  # type: ignore[assignment]
    try:
        yield
    finally:
        source._lock = real


def test_a_late_reload_never_overwrites_a_newer_one(ring_file: Path) -> None:
    """If another thread reloads a newer file meanwhile, a slower reload does not undo it."""
    ring = Keyring.from_file(ring_file, watch=True, watch_interval=3600)
    source = ring._source
    assert source is not None
    edit(ring_file, lambda r: r.rotate())  # what the slow reload reads

    def other_thread() -> None:
        # Right after the slow reload let go of the source: the file changes
        # again and another thread, seeing an unknown key id, looks at once.
        newest = edit(ring_file, lambda r: r.rotate())
        source.refresh(ring, urgent=True)
        assert ring.active_id == newest

    with lock_hook(ring, other_thread):
        source.refresh(ring)
    assert ring.to_json() == Keyring.from_file(ring_file).to_json()


@pytest.mark.parametrize("read", ["keys", "repr"])
def test_keys_and_repr_read_one_snapshot(
    ring_file: Path, monkeypatch: pytest.MonkeyPatch, read: str
) -> None:
    """keys() and repr() describe one state of the ring, even if it reloads meanwhile."""
    ring = Keyring.from_file(ring_file, watch=True, watch_interval=3600)
    source = ring._source
    assert source is not None
    real_refresh = source.refresh
    calls = 0

    def refresh(target: Keyring, *, urgent: bool = False) -> None:
        # Every look at the ring is due; the second one finds a new key.
        nonlocal calls
        calls += 1
        if calls == 2:
            edit(ring_file, lambda r: r.add("k2"))
            source._next = 0.0
        real_refresh(target, urgent=urgent)

    monkeypatch.setattr(source, "due", lambda: True)
    monkeypatch.setattr(source, "refresh", refresh)
    reader = {"keys": lambda: list(states_of(ring)), "repr": lambda: repr(ring)}[read]
    first = reader()
    assert "k1" in first
    wait_for(lambda: "k2" in reader(), "the new key")


# -- threads -------------------------------------------------------------------------


def test_threads_sign_and_verify_while_the_file_rotates(ring_file: Path) -> None:
    """Threads signing and verifying through one watched ring never fail while keys rotate."""
    ring = Keyring.from_file(ring_file, watch=True, watch_interval=0.01)
    codec = Codec(ring)
    stop = threading.Event()
    errors: list[BaseException] = []
    frames: list[bytes] = []
    used: set[str] = set()
    guard = threading.Lock()

    def worker(tid: int) -> None:
        n = 0
        try:
            while not stop.is_set():
                frame = codec.dumps((tid, n))
                assert codec.loads(frame) == (tid, n)
                key_id = codec.verify(frame).key_id
                with guard:
                    if key_id not in used or n % 50 == 0:
                        frames.append(frame)
                    used.add(key_id)
                n += 1
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        rotated = []
        for _ in range(12):
            new_id = edit(ring_file, lambda r: r.rotate())
            rotated.append(new_id)
            wait_for(lambda new_id=new_id: new_id in used or errors, f"frames by {new_id}")
            assert not errors
    finally:
        stop.set()
        for t in threads:
            t.join(DEADLINE)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert {"k1", *rotated} <= used
    final = Codec(Keyring.from_file(ring_file))
    for frame in frames:
        final.verify(frame)


# -- directories ---------------------------------------------------------------------


SECRETS = {f"k{i}": bytes([i]) * 16 + os.urandom(16) for i in range(1, 4)}


def write_key_dir(
    path: Path, keys: dict[str, bytes], active: str | None, *, mode: int = 0o600
) -> Path:
    """A key directory: one base64 secret per file (newline-terminated), and 'active'."""
    path.mkdir(exist_ok=True)
    for kid, secret in keys.items():
        (path / kid).write_bytes(base64.b64encode(secret) + b"\n")
        (path / kid).chmod(mode)
    if active is not None:
        (path / "active").write_text(active + "\n")
        (path / "active").chmod(mode)
    return path


def test_directory_layout(tmp_path: Path) -> None:
    """A key directory loads: 'active' names the signing key, the others are staged."""
    key_dir = write_key_dir(tmp_path / "keys", {"k1": SECRETS["k1"], "k2": SECRETS["k2"]}, "k2")
    ring = Keyring.from_directory(key_dir)
    assert ring.active_id == "k2"
    assert states_of(ring) == {"k1": "staged", "k2": "active"}
    assert ring.created("k1") == (key_dir / "k1").stat().st_mtime
    # The secrets are the decoded file contents: a ring built from them agrees.
    independent = Keyring({"k2": SECRETS["k2"]}, "k2")
    assert Codec(independent).loads(Codec(ring).dumps("x")) == "x"
    assert Codec(ring).loads(Codec(Keyring({"k1": SECRETS["k1"]}, "k1")).dumps("y")) == "y"


def test_directory_ignores_dot_files(tmp_path: Path) -> None:
    """Names starting with a dot (editor files, orchestrator internals) are ignored."""
    key_dir = write_key_dir(tmp_path / "keys", {"k1": SECRETS["k1"]}, "k1")
    (key_dir / ".k2.swp").write_bytes(b"\x00 not base64 \xff")
    (key_dir / ".hidden").write_text("garbage")
    (key_dir / ".hidden").chmod(0o666)
    (key_dir / "..data").mkdir()
    ring = Keyring.from_directory(key_dir)
    assert ring.key_ids == ("k1",)


def _no_active(d: Path) -> None:
    (d / "active").unlink()


def _active_without_file(d: Path) -> None:
    (d / "active").write_text("k3\n")


def _bad_base64(d: Path) -> None:
    (d / "k1").write_text(base64.b64encode(SECRETS["k1"]).decode()[:-2] + "!!\n")


def _invalid_name(d: Path) -> None:
    (d / "key@1").write_text(base64.b64encode(SECRETS["k3"]).decode())
    (d / "key@1").chmod(0o600)


def _short_secret(d: Path) -> None:
    (d / "k1").write_text(base64.b64encode(SECRETS["k1"][:15]).decode())


def _empty_active(d: Path) -> None:
    (d / "active").write_text("\n")


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (_no_active, "has no file 'active' naming the active key id"),
        (_active_without_file, r"active key id 'k3' \(from 'active'\) has no key file; "
                               r"found \['k1', 'k2'\]"),
        (_empty_active, r"active key id '' \(from 'active'\) has no key file"),
        (_bad_base64, "k1' is not valid base64"),
        (_invalid_name, "file 'key@1' in the key directory: invalid key id"),
        (_short_secret, "is 15 bytes; use at least 16"),
    ],
)
def test_directory_errors(
    tmp_path: Path, breakage: Callable[[Path], None], message: str
) -> None:
    """An invalid key directory is refused with KeyringError and a message quoting no secret."""
    key_dir = write_key_dir(tmp_path / "keys", {"k1": SECRETS["k1"], "k2": SECRETS["k2"]}, "k1")
    breakage(key_dir)
    with pytest.raises(KeyringError, match=message) as info:
        Keyring.from_directory(key_dir)
    text = str(info.value)
    assert "\n" not in text
    for secret in SECRETS.values():
        for form in secret_forms(secret) + secret_forms(secret[:15]):
            assert form.decode("latin-1") not in text


def test_directory_missing(tmp_path: Path) -> None:
    """A key directory that does not exist raises FileNotFoundError."""
    with pytest.raises(FileNotFoundError):
        Keyring.from_directory(tmp_path / "nope")


@pytest.mark.parametrize("name", ["k1", "active"])
@pytest.mark.parametrize("mode", [0o660, 0o604, 0o644])
def test_directory_permissions(tmp_path: Path, name: str, mode: int) -> None:
    """Every file of a key directory, 'active' too, must be private unless explicitly allowed."""
    key_dir = write_key_dir(tmp_path / "keys", {"k1": SECRETS["k1"]}, "k1")
    (key_dir / name).chmod(mode)
    with pytest.raises(KeyringError, match=f"{name}' is accessible to group or others "
                                           rf"\(mode {mode:04o}\); run 'chmod 600"):
        Keyring.from_directory(key_dir)
    ring = Keyring.from_directory(key_dir, allow_insecure_permissions=True)
    assert ring.active_id == "k1"


@pytest.mark.parametrize("mode", [0o440, 0o640])
def test_directory_accepts_read_by_its_own_group(tmp_path: Path, mode: int) -> None:
    """Group-read by one of this process's groups is accepted (Kubernetes fsGroup mounts)."""
    key_dir = write_key_dir(tmp_path / "keys", {"k1": SECRETS["k1"]}, "k1")
    for name in ("k1", "active"):
        (key_dir / name).chmod(mode)
    assert Keyring.from_directory(key_dir).active_id == "k1"


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's group to a foreign one needs root")
def test_directory_refuses_read_by_a_foreign_group(tmp_path: Path) -> None:
    """Group-read is refused when the file's group is not one of this process's groups."""
    key_dir = write_key_dir(tmp_path / "keys", {"k1": SECRETS["k1"]}, "k1")
    foreign = max([os.getegid(), *os.getgroups()]) + 4242
    os.chown(key_dir / "k1", -1, foreign)
    (key_dir / "k1").chmod(0o440)
    with pytest.raises(KeyringError, match="accessible to group or others"):
        Keyring.from_directory(key_dir)


def test_directory_watch_follows_changes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A watched directory follows new key files and a new 'active'; a broken state is skipped."""
    key_dir = write_key_dir(tmp_path / "keys", {"k1": SECRETS["k1"]}, "k1")
    ring = Keyring.from_directory(key_dir, watch=True, watch_interval=INTERVAL)
    codec = Codec(ring)
    old_frame = codec.dumps(1)
    write_key_dir(key_dir, {"k2": SECRETS["k2"]}, None)
    wait_for(lambda: "k2" in ring, "the new key file")
    assert ring.active_id == "k1"
    (key_dir / "active").write_text("k3")  # no such key yet: keep the old keys
    wait_for(lambda: ring.active_id and error_records(caplog), "the error")
    assert ring.active_id == "k1"
    (key_dir / "active").write_text("k2")
    wait_for(lambda: ring.active_id == "k2", "the new active key")
    (key_dir / "k1").unlink()
    wait_for(lambda: "k1" not in ring, "the removed key")
    with pytest.raises(UnknownKey):
        codec.loads(old_frame)
    assert len(error_records(caplog)) == 1


def kubernetes_publish(key_dir: Path, version: str, keys: dict[str, bytes], active: str) -> None:
    """
    Publish a new version of a secret volume as the kubelet does: a fresh hidden
    directory, a ``..data`` symlink swapped to it atomically, and top-level
    symlinks ``name -> ..data/name`` (new ones created, stale ones removed last).
    """
    version_dir = key_dir / version
    version_dir.mkdir()
    for kid, secret in keys.items():
        (version_dir / kid).write_text(base64.b64encode(secret).decode())
    (version_dir / "active").write_text(active)
    for f in version_dir.iterdir():
        f.chmod(0o400)  # defaultMode: 0400
    old = os.readlink(key_dir / "..data") if (key_dir / "..data").is_symlink() else None
    os.symlink(version, key_dir / "..data_tmp")
    os.replace(key_dir / "..data_tmp", key_dir / "..data")
    wanted = [*keys, "active"]
    for name in wanted:
        if not (key_dir / name).is_symlink():
            os.symlink(f"..data/{name}", key_dir / name)
    for link in key_dir.iterdir():
        if not link.name.startswith(".") and link.name not in wanted:
            link.unlink()
    if old is not None:
        for f in (key_dir / old).iterdir():
            f.unlink()
        (key_dir / old).rmdir()


def test_directory_kubernetes_symlink_swap(tmp_path: Path) -> None:
    """A watched directory mounted as Kubernetes does (a ..data symlink swap) is followed."""
    key_dir = tmp_path / "secret-volume"
    key_dir.mkdir()
    kubernetes_publish(key_dir, "..2024_01_01_00_00_00.1", {"k1": SECRETS["k1"]}, "k1")
    assert (key_dir / "k1").is_symlink()
    ring = Keyring.from_directory(key_dir, watch=True, watch_interval=INTERVAL)
    codec = Codec(ring)
    assert ring.key_ids == ("k1",)
    old_frame = codec.dumps("old")

    kubernetes_publish(key_dir, "..2024_01_02_00_00_00.2",
                       {"k1": SECRETS["k1"], "k2": SECRETS["k2"]}, "k1")
    wait_for(lambda: "k2" in ring, "the staged key")
    kubernetes_publish(key_dir, "..2024_01_03_00_00_00.3",
                       {"k1": SECRETS["k1"], "k2": SECRETS["k2"]}, "k2")
    wait_for(lambda: ring.active_id == "k2", "the promotion")
    assert codec.loads(old_frame) == "old"
    kubernetes_publish(key_dir, "..2024_01_04_00_00_00.4", {"k2": SECRETS["k2"]}, "k2")
    wait_for(lambda: "k1" not in ring, "the retirement")
    with pytest.raises(UnknownKey):
        codec.loads(old_frame)
    assert Codec(Keyring({"k2": SECRETS["k2"]}, "k2")).loads(codec.dumps("new")) == "new"


# -- changing a file-backed ring in memory -----------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        lambda r: r.add(),
        lambda r: r.add("k3"),
        lambda r: r.promote("k2"),
        lambda r: r.rotate(),
        lambda r: r.retire("k2"),
    ],
    ids=["add", "add-id", "promote", "rotate", "retire"],
)
@pytest.mark.parametrize("kind", ["file", "directory"])
def test_watched_ring_refuses_mutation(
    tmp_path: Path, change: Callable[[Keyring], Any], kind: str
) -> None:
    """A watched ring refuses in-memory changes (its source decides) and stays as it was."""
    keys = {"k1": SECRETS["k1"], "k2": SECRETS["k2"]}
    if kind == "file":
        path = tmp_path / "ring.json"
        Keyring(keys, "k1").to_file(path)
        ring = Keyring.from_file(path, watch=True, watch_interval=3600)
    else:
        path = write_key_dir(tmp_path / "keys", keys, "k1")
        ring = Keyring.from_directory(path, watch=True, watch_interval=3600)
    before = ring.to_json()
    message = re.escape(f"this ring follows '{path}'; change that instead")
    with pytest.raises(KeyringError, match=message):
        change(ring)
    assert before == ring.to_json()


def pickled(obj: object) -> bytes:
    """*obj* pickled as it is when a child process is spawned."""
    context.set_spawning_popen(object())
    try:
        return bytes(ForkingPickler.dumps(obj))
    finally:
        context.set_spawning_popen(None)


def make_source(tmp_path: Path, kind: str, *, watch: bool) -> tuple[Keyring, Path]:
    """A ring loaded from a keyring file or a key directory, with two keys."""
    if kind == "file":
        path = tmp_path / "ring.json"
        Keyring({"k1": SECRETS["k1"], "k2": SECRETS["k2"]}, "k2").to_file(path)
        return Keyring.from_file(path, watch=watch, watch_interval=0.25), path
    path = write_key_dir(tmp_path / "keys", {"k1": SECRETS["k1"], "k2": SECRETS["k2"]}, "k2")
    return Keyring.from_directory(path, watch=watch, watch_interval=0.25), path


@pytest.mark.parametrize("watch", [False, True])
@pytest.mark.parametrize("kind", ["file", "directory"])
def test_pickled_source_ring_holds_no_secret(tmp_path: Path, kind: str, watch: bool) -> None:
    """A ring with a source pickles (for spawn) as its path, never as its secrets."""
    ring, path = make_source(tmp_path, kind, watch=watch)
    for data in (pickled(ring), pickled(Codec(ring))):
        assert_no_secret(data, ring)
        assert os.fspath(path).encode() in data
    copy = ForkingPickler.loads(pickled(ring))
    assert copy.to_json() == ring.to_json()
    assert Codec(copy).loads(Codec(ring).dumps("x")) == "x"
    # The copy re-opened the source, watch and interval included.
    assert copy._source is not None
    assert (copy._source.path, copy._source.watch, copy._source.interval) == (path, watch, 0.25)


def test_pickled_source_ring_reopens_the_file(ring_file: Path) -> None:
    """A file-backed ring unpickled later holds what the file holds then."""
    data = pickled(Keyring.from_file(ring_file))
    new_id = edit(ring_file, lambda r: r.rotate())
    assert ForkingPickler.loads(data).active_id == new_id


def test_pickled_insecure_override_is_kept(ring_file: Path) -> None:
    """A ring loaded with allow_insecure_permissions re-opens its file the same way."""
    ring_file.chmod(0o640)
    data = pickled(Keyring.from_file(ring_file, allow_insecure_permissions=True))
    assert ForkingPickler.loads(data).active_id == "k1"


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_mutated_unwatched_ring_is_pickled_with_its_keys(tmp_path: Path, kind: str) -> None:
    """An unwatched ring changed in memory no longer follows its source: it pickles its keys."""
    ring, path = make_source(tmp_path, kind, watch=False)
    new_id = ring.rotate()
    ring.retire("k1")
    data = pickled(ring)
    assert os.fspath(path).encode() not in data
    assert secret_of(ring, new_id) in data
    # The source changes afterwards: the copy keeps the ring's own keys.
    if kind == "file":
        Keyring.generate("other").to_file(path)
    else:
        (path / "active").write_text("k1")
    copy = ForkingPickler.loads(data)
    assert copy.to_json() == ring.to_json()
    assert copy.describe() == ring.describe()
    assert states_of(copy) == {"k2": "previous", new_id: "active"}
    assert Codec(copy).loads(Codec(ring).dumps("x")) == "x"
    # And the ring itself can be changed further.
    ring.add("k9")
    assert "k9" in ring


def _spawned_echo(inbox: SignedQueue, outbox: SignedQueue) -> None:
    """In a spawned child: report the ring, wait for the file's rotation, report again."""
    ring = inbox.codec.keyring
    try:
        ring.add()
        refuses_changes = False
    except KeyringError:  # a watched, file-backed ring
        refuses_changes = True
    outbox.put({"ready": ring.active_id, "refuses_changes": refuses_changes})
    message = inbox.get(timeout=DEADLINE)
    deadline = time.monotonic() + DEADLINE
    while ring.active_id != message["expect_active"] and time.monotonic() < deadline:
        time.sleep(0.01)
    outbox.put({"echo": message["payload"], "active": ring.active_id, "keys": ring.key_ids})


def test_spawned_child_reopens_the_file(ring_file: Path) -> None:
    """A SignedQueue on a watched file ring works in a spawned child, which follows the file."""
    ctx = multiprocessing.get_context("spawn")
    ring = Keyring.from_file(ring_file, watch=True, watch_interval=INTERVAL)
    inbox, outbox = SignedQueue(ring, ctx=ctx), SignedQueue(ring, ctx=ctx)
    proc = ctx.Process(target=_spawned_echo, args=(inbox, outbox))
    proc.start()
    try:
        assert outbox.get(timeout=DEADLINE) == {"ready": "k1", "refuses_changes": True}
        new_id = edit(ring_file, lambda r: r.rotate())  # after the child opened the file
        wait_for(lambda: ring.active_id == new_id, "the parent to see the rotation")
        inbox.put({"payload": [1, "two"], "expect_active": new_id})
        reply = outbox.get(timeout=DEADLINE)  # signed by the child's new key
    finally:
        proc.join(DEADLINE)
        if proc.is_alive():  # pragma: no cover - only on failure
            proc.kill()
    assert proc.exitcode == 0
    assert reply == {"echo": [1, "two"], "active": new_id, "keys": ("k1", new_id)}
    for q in (inbox, outbox):
        q.close()
        q.join_thread()


# -- writing and locking -----------------------------------------------------------


def _fail(*args: Any, **kwargs: Any) -> Any:
    raise OSError("injected failure")


class _FailingFile:
    """A file object whose write fails."""

    def __init__(self, fh: Any) -> None:
        self._fh = fh

    def __enter__(self) -> _FailingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._fh.close()

    def write(self, data: bytes) -> int:
        self._fh.write(data[:3])
        raise OSError("injected failure")


@pytest.mark.parametrize("step", ["fchmod", "write", "fsync", "replace"])
def test_write_atomically_leaves_nothing_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """A failed write leaves the old file as it was and no temporary file behind."""
    path = tmp_path / "ring.json"
    write_atomically(path, b"old content")
    real_fdopen = os.fdopen
    with monkeypatch.context() as patch:
        if step == "write":
            patch.setattr(signedqueue._keysource.os, "fdopen",
                          lambda *a, **k: _FailingFile(real_fdopen(*a, **k)))
        else:
            patch.setattr(signedqueue._keysource.os, step, _fail)
        with pytest.raises(OSError, match="injected failure"):
            write_atomically(path, b"new content")
    assert [p.name for p in tmp_path.iterdir()] == ["ring.json"]
    assert path.read_bytes() == b"old content"


def test_write_atomically_new_file_mode(tmp_path: Path) -> None:
    """write_atomically replaces the file (new inode) with mode 0600, whatever the umask."""
    path = tmp_path / "ring.json"
    path.write_bytes(b"old")
    path.chmod(0o666)
    inode = path.stat().st_ino
    old_umask = os.umask(0)
    try:
        write_atomically(path, b"new")
    finally:
        os.umask(old_umask)
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.stat().st_ino != inode
    assert [p.name for p in tmp_path.iterdir()] == ["ring.json"]


def test_write_atomically_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bare file name is written in the current directory."""
    monkeypatch.chdir(tmp_path)
    write_atomically("ring.json", b"data")
    assert (tmp_path / "ring.json").read_bytes() == b"data"


def test_locked_holds_the_directory_lock(tmp_path: Path) -> None:
    """locked() holds an exclusive lock on the file's directory until the block ends."""
    path = tmp_path / "ring.json"

    def try_lock() -> bool:
        fd = os.open(tmp_path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        finally:
            os.close(fd)

    with locked(path):
        assert not try_lock()
    assert try_lock()
    with pytest.raises(RuntimeError), locked(path):
        raise RuntimeError
    assert try_lock()


def test_file_that_is_not_a_keyring(ring_file: Path) -> None:
    """Loading a file that is not a keyring raises KeyringError, without its content."""
    text = base64.b64encode(os.urandom(32)).decode()
    write_atomically(ring_file, text.encode())
    with pytest.raises(KeyringError, match="not valid JSON") as info:
        Keyring.from_file(ring_file, watch=True)
    assert text not in str(info.value)
    assert binascii.hexlify(base64.b64decode(text)).decode() not in str(info.value)
