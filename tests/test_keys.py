"""Keyring: construction, key states and lifecycle, files, environment, secrecy, key derivation."""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import multiprocessing
import os
import pickle
import re
import stat
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

import signedqueue._frame
import signedqueue._keys
import signedqueue._keysource
from signedqueue import (
    Codec,
    InvalidSignature,
    KeyInfo,
    Keyring,
    KeyringError,
    RejectedFrame,
    SignedQueueError,
    UnknownKey,
)
from signedqueue._keys import MAC_KEY_INFO, derive_mac_key

SECRET_A = hashlib.sha256(b"signedqueue test secret a").digest()
SECRET_B = hashlib.sha256(b"signedqueue test secret b").digest()


def secret_of(ring: Keyring, key_id: str) -> bytes:
    """A key's secret, through the public JSON export."""
    return base64.b64decode(json.loads(ring.to_json())["keys"][key_id]["secret"])


def secret_forms(secret: bytes) -> list[str]:
    """Every way a secret might show up in text."""
    return [secret.hex(), base64.b64encode(secret).decode(), repr(secret)[2:-1]]


def entry(secret: bytes, state: str = "active", created: float = 1.0) -> dict[str, Any]:
    """One key entry of a keyring document."""
    return {"secret": base64.b64encode(secret).decode(), "state": state, "created": created}


def doc(**overrides: Any) -> str:
    """A valid keyring document with some fields replaced (None: removed)."""
    base: dict[str, Any] = {
        "format": "signedqueue-keyring",
        "version": 1,
        "keys": {"a": entry(SECRET_A)},
    }
    base.update(overrides)
    return json.dumps({k: v for k, v in base.items() if v is not None})


# -- generate and the constructor ---------------------------------------------


def test_generate() -> None:
    """generate() makes a ring of one active, random 32-byte key."""
    ring = Keyring.generate()
    assert len(ring) == 1
    assert (ring.active_id,) == ring.key_ids
    assert ring.active_id in ring
    assert re.fullmatch(r"k[0-9a-f]{12}", ring.active_id)
    assert len(secret_of(ring, ring.active_id)) == 32


def test_generate_is_random() -> None:
    """Two generated rings with the same id have different secrets: neither verifies the other."""
    first, second = Keyring.generate("same"), Keyring.generate("same")
    assert secret_of(first, "same") != secret_of(second, "same")
    frame = Codec(first).dumps(1)
    assert Codec(first).loads(frame) == 1
    with pytest.raises(InvalidSignature):
        Codec(second).loads(frame)


def test_generate_with_key_id() -> None:
    """generate() takes an explicit key id."""
    assert Keyring.generate("node-1.a_B").active_id == "node-1.a_B"


@pytest.mark.parametrize("key_id", ["", "a b", "a/b", "x" * 65, "é", "a\n", 7])
def test_invalid_key_ids(key_id: Any) -> None:
    """Key ids outside 1..64 characters of [A-Za-z0-9._-] are refused everywhere."""
    with pytest.raises(ValueError, match="invalid key id"):
        Keyring.generate(key_id)
    with pytest.raises(ValueError, match="invalid key id"):
        Keyring({key_id: SECRET_A}, key_id)


def test_constructor() -> None:
    """The constructor takes ids to secrets, the active id and optional creation times."""
    ring = Keyring({"a": SECRET_A, "b": bytearray(SECRET_B)}, "b", created={"a": 5.0, "b": 6.0})
    assert ring.active_id == "b"
    assert ring.key_ids == ("a", "b")
    assert ring.created("a") == 5.0
    assert "a" in ring
    assert "c" not in ring
    assert len(ring) == 2


def test_constructor_minimum_secret_size() -> None:
    """Secrets of 16 bytes are accepted; 15 are refused, without echoing the secret."""
    Keyring({"a": SECRET_A[:16]}, "a")
    short = SECRET_A[:15]
    with pytest.raises(ValueError, match="15 bytes; use at least 16") as info:
        Keyring({"a": short}, "a")
    for form in secret_forms(short):
        assert form not in str(info.value)


def test_constructor_secret_type() -> None:
    """A secret that is not bytes (e.g. a str) is refused."""
    with pytest.raises(TypeError, match="must be bytes"):
        Keyring({"a": "0123456789abcdef0123"}, "a")  # type: ignore[dict-item]


@pytest.mark.parametrize(("keys", "active"), [({"a": SECRET_A}, "b"), ({}, "a")])
def test_constructor_active_must_be_in_ring(keys: dict[str, bytes], active: str) -> None:
    """The active id must name a key of the ring; the error lists the known ids."""
    with pytest.raises(ValueError, match=r"active key .* is not in the ring; known ids"):
        Keyring(keys, active)


def test_constructor_copies_its_inputs() -> None:
    """Changing the dict or bytearray given to the constructor does not change the ring."""
    keys: dict[str, bytes] = {"a": bytearray(SECRET_A)}  # type: ignore[dict-item]
    ring = Keyring(keys, "a")
    keys["a"][:] = bytes(32)  # type: ignore[index]
    keys["b"] = SECRET_B
    assert ring.key_ids == ("a",)
    frame = Codec(ring).dumps("x")
    assert Codec(Keyring({"a": SECRET_A}, "a")).loads(frame) == "x"


# -- key states and the lifecycle ------------------------------------------------


def states_of(ring: Keyring) -> dict[str, str]:
    """Key id to state, through the public keys()."""
    infos = ring.describe()
    return {info.key_id: info.state for info in infos}


def test_constructor_states() -> None:
    """Keys other than the active one are staged unless states= says previous."""
    ring = Keyring({"a": SECRET_A, "b": SECRET_B, "c": SECRET_A[::-1]}, "b",
                   states={"a": "previous"})
    assert states_of(ring) == {"a": "previous", "b": "active", "c": "staged"}
    assert ring.state("b") == "active"
    ring = Keyring({"a": SECRET_A, "b": SECRET_B}, "a", states={"a": "active", "b": "staged"})
    assert states_of(ring) == {"a": "active", "b": "staged"}


def test_constructor_two_active_keys() -> None:
    """A second key marked active in states= is refused with KeyringError (a ValueError)."""
    with pytest.raises(KeyringError, match=r"two active keys \('a' and 'b'\)") as info:
        Keyring({"a": SECRET_A, "b": SECRET_B}, "a", states={"b": "active"})
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("states", "message"),
    [
        ({"a": "staged"}, "key 'a' is the active key; its state must be 'active'"),
        ({"a": "previous"}, "key 'a' is the active key; its state must be 'active'"),
        ({"b": "retired"}, "key 'b' has state 'retired'; use one of"),
        ({"b": None}, "key 'b' has state None; use one of"),
    ],
)
def test_constructor_invalid_states(states: dict[str, Any], message: str) -> None:
    """A state that contradicts the active id, or is not a known state, is refused."""
    with pytest.raises(ValueError, match=re.escape(message)):
        Keyring({"a": SECRET_A, "b": SECRET_B}, "a", states=states)


def test_add_stages_a_key() -> None:
    """add() stages a fresh random key: it verifies at once but does not sign."""
    ring = Keyring.generate("old")
    codec = Codec(ring)
    new_id = ring.add()
    assert re.fullmatch(r"k[0-9a-f]{12}", new_id)
    assert ring.key_ids == ("old", new_id)
    assert ring.active_id == "old"
    assert states_of(ring) == {"old": "active", new_id: "staged"}
    assert len(secret_of(ring, new_id)) == 32
    assert secret_of(ring, new_id) != secret_of(ring, "old")
    assert signedqueue._frame.peek_key_id(codec.dumps(1)) == "old"
    # A producer that already promoted the key elsewhere is verified here.
    elsewhere = Keyring.from_json(ring.to_json())
    elsewhere.promote(new_id)
    assert codec.loads(Codec(elsewhere).dumps("from new key")) == "from new key"


def test_add_with_key_id() -> None:
    """add() takes an explicit id; an id the ring holds or an invalid one is refused."""
    ring = Keyring.generate("a")
    assert ring.add("b") == "b"
    assert ring.state("b") == "staged"
    before = ring.to_json()
    with pytest.raises(KeyringError, match="already holds a key 'b'"):
        ring.add("b")
    with pytest.raises(KeyringError, match="already holds a key 'a'"):
        ring.add("a")
    with pytest.raises(ValueError, match="invalid key id"):
        ring.add("no spaces")
    assert before == ring.to_json()


def test_promote() -> None:
    """promote() makes a staged key active; the key that was active becomes previous."""
    ring = Keyring.generate("a")
    codec = Codec(ring)
    old_frame = codec.dumps("old")
    ring.add("b")
    ring.promote("b")
    assert ring.active_id == "b"
    assert states_of(ring) == {"a": "previous", "b": "active"}
    new_frame = codec.dumps("new")
    assert signedqueue._frame.peek_key_id(new_frame) == "b"
    assert codec.loads(old_frame) == "old"
    assert codec.loads(new_frame) == "new"
    ring.add("c")
    ring.promote("c")
    assert states_of(ring) == {"a": "previous", "b": "previous", "c": "active"}


def test_promote_a_previous_key_back() -> None:
    """A previous key can be promoted again (rolling back); the other becomes previous."""
    ring = Keyring.generate("a")
    ring.add("b")
    ring.promote("b")
    ring.promote("a")
    assert states_of(ring) == {"a": "active", "b": "previous"}


def test_promote_the_active_key_changes_nothing() -> None:
    """Promoting the key that is already active leaves every state as it was."""
    ring = Keyring({"a": SECRET_A, "b": SECRET_B}, "a", states={"b": "previous"})
    before = ring.to_json()
    ring.promote("a")
    assert before == ring.to_json()


def test_promote_unknown_key() -> None:
    """Promoting an id the ring does not hold is a KeyError listing the known ids."""
    ring = Keyring({"a": SECRET_A, "b": SECRET_B}, "a")
    before = ring.to_json()
    with pytest.raises(KeyError, match=r"no key 'zz' in the ring; known ids: \['a', 'b'\]"):
        ring.promote("zz")
    assert before == ring.to_json()


def test_rotate() -> None:
    """rotate() adds a fresh active key; the old one becomes previous and keeps verifying."""
    ring = Keyring.generate("old")
    codec = Codec(ring)
    old_frame = codec.dumps("before")
    new_id = ring.rotate()
    assert new_id == ring.active_id
    assert new_id != "old"
    assert ("old", new_id) == ring.key_ids
    assert states_of(ring) == {"old": "previous", new_id: "active"}
    assert secret_of(ring, new_id) != secret_of(ring, "old")
    assert codec.loads(old_frame) == "before"
    assert signedqueue._frame.peek_key_id(codec.dumps(0)) == new_id
    assert codec.loads(codec.dumps("after")) == "after"


def test_rotate_keeps_staged_keys_staged() -> None:
    """rotate() leaves staged keys staged and demotes only the active key."""
    ring = Keyring.generate("a")
    ring.add("s")
    new_id = ring.rotate()
    assert states_of(ring) == {"a": "previous", "s": "staged", new_id: "active"}


@pytest.mark.parametrize("state", ["previous", "staged"])
def test_retire(state: str) -> None:
    """retire() removes a previous or staged key: its frames become UnknownKey."""
    ring = Keyring({"keep": SECRET_A, "old": SECRET_B}, "keep", states={"old": state})
    codec = Codec(ring)
    old_frame = Codec(Keyring({"old": SECRET_B}, "old")).dumps("before")
    assert codec.loads(old_frame) == "before"
    ring.retire("old")
    assert ("keep",) == ring.key_ids
    assert "old" not in ring
    assert states_of(ring) == {"keep": "active"}
    with pytest.raises(UnknownKey):
        codec.loads(old_frame)
    assert codec.loads(codec.dumps("after")) == "after"


def test_rotate_then_retire() -> None:
    """The in-process cycle: rotate(), then retire() the previous key."""
    ring = Keyring.generate("old")
    codec = Codec(ring)
    old_frame = codec.dumps("before")
    new_id = ring.rotate()
    ring.retire("old")
    assert (new_id,) == ring.key_ids
    with pytest.raises(UnknownKey):
        codec.loads(old_frame)
    assert codec.loads(codec.dumps("after")) == "after"


def test_retire_refuses_the_active_key() -> None:
    """The active key cannot be retired (KeyringError, a ValueError); the ring still signs."""
    ring = Keyring.generate("only")
    ring.add("staged")
    before = ring.to_json()
    with pytest.raises(KeyringError, match="'only' is the active signing key; promote another"
                       ) as info:
        ring.retire("only")
    assert isinstance(info.value, ValueError)
    assert before == ring.to_json()
    codec = Codec(ring)
    assert codec.loads(codec.dumps(1)) == 1


def test_retire_unknown_key() -> None:
    """Retiring an id the ring does not hold is a KeyError that lists the known ids."""
    ring = Keyring.generate("a")
    with pytest.raises(KeyError, match=r"no key 'zz' in the ring; known ids: \['a'\]"):
        ring.retire("zz")


def test_keys_and_state() -> None:
    """keys() gives id, state and creation time oldest first; state() one key's state."""
    ring = Keyring(
        {"c": SECRET_A, "a": SECRET_B, "b": SECRET_A[::-1]}, "a",
        created={"c": 3.0, "a": 1.0, "b": 2.0}, states={"c": "previous"},
    )
    assert ring.describe() == (
        KeyInfo("a", "active", 1.0), KeyInfo("b", "staged", 2.0), KeyInfo("c", "previous", 3.0)
    )
    assert [ring.state(k) for k in ("a", "b", "c")] == ["active", "staged", "previous"]
    with pytest.raises(KeyError, match=r"no key 'd' in the ring; known ids: \['a', 'b', 'c'\]"):
        ring.state("d")
    info = ring.describe()[0]
    with pytest.raises(AttributeError):
        info.state = "previous"  # type: ignore[misc]
    for text in (repr(ring.describe()), str(ring.describe())):
        for secret in (SECRET_A, SECRET_B, SECRET_A[::-1]):
            for form in secret_forms(secret):
                assert form not in text


def test_created_times_of_new_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """add() and rotate() stamp the new key with the current time; others keep theirs."""
    monkeypatch.setattr(signedqueue._keys, "time", types.SimpleNamespace(time=lambda: 500.0))
    ring = Keyring({"a": SECRET_A}, "a", created={"a": 7.0})
    ring.add("b")
    rotated = ring.rotate()
    assert [ring.created(k) for k in ("a", "b", rotated)] == [7.0, 500.0, 500.0]


def test_key_ids_oldest_first() -> None:
    """key_ids lists keys oldest first, across rotations and retirements."""
    ring = Keyring.generate("k0")
    k1 = ring.rotate()
    k2 = ring.rotate()
    assert ("k0", k1, k2) == ring.key_ids
    ring.retire(k1)
    assert ("k0", k2) == ring.key_ids


def test_key_ids_oldest_first_with_a_coarse_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys created within one clock tick stay in the order they were added."""
    monkeypatch.setattr(signedqueue._keys, "time", types.SimpleNamespace(time=lambda: 1000.0))
    for _ in range(20):  # the random ids would sort either way by chance
        ring = Keyring.generate("k0")
        added = ["k0", ring.rotate(), ring.rotate(), ring.rotate()]
        assert tuple(added) == ring.key_ids


def test_key_ids_from_creation_times() -> None:
    """key_ids follows the recorded creation times, not the order of the mapping."""
    ring = Keyring({"b": SECRET_B, "a": SECRET_A}, "a", created={"b": 2.0, "a": 1.0})
    assert ring.key_ids == ("a", "b")


# -- files ---------------------------------------------------------------------


def test_file_round_trip(tmp_path: Path) -> None:
    """to_file then from_file gives back the same ring, states included; frames cross."""
    ring = Keyring({"a": SECRET_A, "b": SECRET_B, "c": SECRET_A[::-1]}, "b",
                   created={"a": 10.0, "b": 20.5, "c": 30.0}, states={"a": "previous"})
    path = tmp_path / "ring.json"
    ring.to_file(path)
    loaded = Keyring.from_file(str(path))
    assert ring.active_id == loaded.active_id
    assert ring.key_ids == loaded.key_ids
    assert [ring.created(k) for k in ring.key_ids] == [loaded.created(k) for k in loaded.key_ids]
    assert ring.describe() == loaded.describe()
    assert ring.to_json() == loaded.to_json()
    assert Codec(loaded).loads(Codec(ring).dumps("x")) == "x"
    assert Codec(ring).loads(Codec(loaded).dumps("y")) == "y"


@contextmanager
def umask(mask: int) -> Iterator[None]:
    """Set the process umask for a block."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def test_to_file_mode_0600(tmp_path: Path) -> None:
    """to_file writes mode 0600 whatever the umask, even over a world-readable file."""
    path = tmp_path / "ring.json"
    path.write_text("old")
    path.chmod(0o644)
    with umask(0):
        Keyring.generate().to_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    Keyring.from_file(path)  # accepted without allow_insecure_permissions


def test_to_file_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """to_file replaces the file by rename; a failed write leaves the old file and no debris."""
    path = tmp_path / "ring.json"
    first = Keyring.generate("first")
    first.to_file(path)
    inode = path.stat().st_ino
    second = Keyring.generate("second")
    second.to_file(path)
    assert inode != path.stat().st_ino  # a new file was renamed over the old one
    assert Keyring.from_file(path).key_ids == ("second",)

    def failing_fsync(fd: int) -> None:
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(signedqueue._keysource.os, "fsync", failing_fsync)
        with pytest.raises(OSError, match="disk full"):
            Keyring.generate("third").to_file(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ring.json"]
    assert Keyring.from_file(path).key_ids == ("second",)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o610, 0o601])
def test_from_file_refuses_group_or_other_access(tmp_path: Path, mode: int) -> None:
    """A keyring file that group or others can access is refused unless explicitly allowed."""
    path = tmp_path / "ring.json"
    ring = Keyring.generate("a")
    ring.to_file(path)
    path.chmod(mode)
    with pytest.raises(KeyringError, match=f"mode {mode:04o}.*chmod 600") as info:
        Keyring.from_file(path)
    for form in secret_forms(secret_of(ring, "a")):
        assert form not in str(info.value)
    loaded = Keyring.from_file(path, allow_insecure_permissions=True)
    assert ring.to_json() == loaded.to_json()


def test_from_file_missing(tmp_path: Path) -> None:
    """A missing keyring file raises FileNotFoundError."""
    with pytest.raises(FileNotFoundError):
        Keyring.from_file(tmp_path / "nope.json")


# -- the environment -----------------------------------------------------------


def test_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """from_env reads the keyring document from SIGNEDQUEUE_KEYRING."""
    ring = Keyring.generate()
    monkeypatch.setenv("SIGNEDQUEUE_KEYRING", ring.to_json())
    loaded = Keyring.from_env()
    assert ring.to_json() == loaded.to_json()
    assert Codec(loaded).loads(Codec(ring).dumps(1)) == 1


def test_from_env_custom_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """from_env takes the variable's name."""
    ring = Keyring.generate()
    monkeypatch.setenv("APP_QUEUE_KEYS", ring.to_json())
    assert ring.key_ids == Keyring.from_env("APP_QUEUE_KEYS").key_ids
    with pytest.raises(KeyringError):
        Keyring.from_env()  # the default variable is not set


@pytest.mark.parametrize("value", [None, ""])
def test_from_env_unset(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    """An unset or empty variable is a clear error naming the variable."""
    if value is not None:
        monkeypatch.setenv("SIGNEDQUEUE_KEYRING", value)
    with pytest.raises(KeyringError, match="SIGNEDQUEUE_KEYRING is not set or empty"):
        Keyring.from_env()


# -- documents -------------------------------------------------------------------

B64_SHORT = base64.b64encode(b"short").decode()
B64_A = base64.b64encode(SECRET_A).decode()


def key_a(**entry: Any) -> str:
    """A keyring document whose only key, 'a', has the given entry."""
    return doc(keys={"a": entry})


NEEDS_STRING = "key 'a' needs a \"secret\" string"
CREATED = "\"created\" of key 'a'"
STATE = re.escape("\"state\" of key 'a' must be one of ['staged', 'active', 'previous']")
NOT_BASE64 = "b64!"  # not the base64 alphabet


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("{not json", "not valid JSON", id="not-json"),
        pytest.param(b"\xff\xfe\x00", "not valid JSON", id="not-utf8"),
        pytest.param("[]", "the top level must be an object", id="not-object"),
        pytest.param(doc(format="other"), '"format": "signedqueue-keyring"', id="format"),
        pytest.param(doc(format=None), '"format": "signedqueue-keyring"', id="no-format"),
        pytest.param(doc(version=2), '"version": 1', id="version"),
        pytest.param(doc(version=True), '"version": 1', id="version-bool"),
        pytest.param(doc(extra=1), r"unknown fields \['extra'\]", id="unknown-field"),
        pytest.param(doc(active="a"), r"unknown fields \['active'\]", id="old-format-active"),
        pytest.param(doc(keys=None), '"keys" must be a non-empty object', id="no-keys"),
        pytest.param(doc(keys={}), '"keys" must be a non-empty object', id="empty-keys"),
        pytest.param(doc(keys=[]), '"keys" must be a non-empty object', id="keys-list"),
        pytest.param(doc(keys={"a": B64_A}), NEEDS_STRING, id="entry-not-object"),
        pytest.param(key_a(state="active"), NEEDS_STRING, id="no-secret"),
        pytest.param(key_a(secret=5, state="active"), NEEDS_STRING, id="secret-not-string"),
        pytest.param(key_a(secret=NOT_BASE64, state="active"), "of key 'a' is not valid base64",
                     id="base64"),
        pytest.param(key_a(secret=B64_A[:-1], state="active"), "of key 'a' is not valid base64",
                     id="base64-padding"),
        pytest.param(key_a(secret=B64_A, state="active", created="now"), CREATED, id="created"),
        pytest.param(key_a(secret=B64_A, state="active", created=True), CREATED,
                     id="created-bool"),
        pytest.param(key_a(secret=B64_A), STATE, id="no-state"),
        pytest.param(key_a(secret=B64_A, state="retired"), STATE, id="unknown-state"),
        pytest.param(key_a(secret=B64_A, state="ACTIVE"), STATE, id="state-case"),
        pytest.param(key_a(secret=B64_A, state=["active"]), STATE, id="state-list"),
        pytest.param(
            key_a(secret=B64_A, state="active", note=1), r"unknown fields \['note'\] in key 'a'",
            id="key-field",
        ),
        pytest.param(key_a(secret=B64_SHORT, state="active"), "is 5 bytes; use at least 16",
                     id="short-secret"),
        pytest.param(doc(keys={"a b": entry(SECRET_A)}), "invalid key id", id="bad-key-id"),
        pytest.param(
            doc(keys={"a": entry(SECRET_A, "staged")}), "exactly one active key, not 0",
            id="no-active-key",
        ),
        pytest.param(
            doc(keys={"a": entry(SECRET_A, "previous"), "b": entry(SECRET_B, "staged")}),
            "exactly one active key, not 0", id="only-previous-and-staged",
        ),
        pytest.param(
            doc(keys={"a": entry(SECRET_A), "b": entry(SECRET_B)}),
            r"exactly one active key, not 2 \(\['a', 'b'\]\)", id="two-active-keys",
        ),
    ],
)
def test_invalid_documents(text: str, message: str) -> None:
    """Invalid keyring documents are refused with a clear message that quotes no secret."""
    with pytest.raises(KeyringError, match=message) as info:
        Keyring.from_json(text)
    assert isinstance(info.value, SignedQueueError)
    assert isinstance(info.value, ValueError)
    assert not isinstance(info.value, RejectedFrame)
    assert str(info.value).startswith(("invalid keyring document: ", "keyring document is"))
    assert "\n" not in str(info.value)
    for secret in (SECRET_A, SECRET_B):
        for form in secret_forms(secret):
            assert form not in str(info.value)


def test_valid_document() -> None:
    """The reference document loads, with creation time defaulting to 0."""
    ring = Keyring.from_json(doc(keys={"a": {"secret": B64_A, "state": "active"}}))
    assert ring.created("a") == 0.0
    assert ring.state("a") == "active"
    assert secret_of(ring, "a") == SECRET_A
    assert ring.to_json() == Keyring.from_json(ring.to_json().encode()).to_json()


def test_document_with_every_state() -> None:
    """A document may hold staged and previous keys besides the one active key."""
    text = doc(keys={
        "p": entry(SECRET_A, "previous", 1.0),
        "a": entry(SECRET_B, "active", 2),
        "s": entry(SECRET_A[::-1], "staged", 3.5),
    })
    ring = Keyring.from_json(text)
    assert ring.describe() == (
        KeyInfo("p", "previous", 1.0), KeyInfo("a", "active", 2.0), KeyInfo("s", "staged", 3.5)
    )
    assert ring.active_id == "a"
    assert secret_of(ring, "s") == SECRET_A[::-1]


def test_to_json_format() -> None:
    """to_json writes the documented format: no top-level active, state and created per key."""
    ring = Keyring({"a": SECRET_A, "b": SECRET_B}, "b", created={"a": 1.0, "b": 2.5},
                   states={"a": "previous"})
    assert json.loads(ring.to_json()) == {
        "format": "signedqueue-keyring",
        "version": 1,
        "keys": {
            "a": {"secret": B64_A, "state": "previous", "created": 1.0},
            "b": {"secret": base64.b64encode(SECRET_B).decode(), "state": "active",
                  "created": 2.5},
        },
    }


# -- secrecy -----------------------------------------------------------------------


def test_repr_shows_ids_and_states_never_secrets() -> None:
    """repr() and str() of a ring name its key ids and states, never secrets or MAC keys."""
    ring = Keyring({"a": SECRET_A, "b": SECRET_B, "c": SECRET_A[::-1]}, "b",
                   created={"a": 1.0, "b": 2.0, "c": 3.0}, states={"a": "previous"})
    for text in (repr(ring), str(ring)):
        assert text == "<Keyring active='b' keys=[a:previous, b:active, c:staged]>"
        for secret in (SECRET_A, SECRET_B, SECRET_A[::-1], derive_mac_key(SECRET_A),
                       derive_mac_key(SECRET_B)):
            for form in secret_forms(secret):
                assert form not in text


def test_pickling_refused() -> None:
    """A ring cannot be pickled or copied outside the spawning of a process."""
    ring = Keyring.generate()
    for attempt in (pickle.dumps, copy.copy, copy.deepcopy):
        with pytest.raises(TypeError, match="pickled only to start a child process"):
            attempt(ring)
    with pytest.raises(TypeError, match="pickled only to start a child process"):
        pickle.dumps(Codec(ring))  # nor inside a codec


def test_pickling_while_spawning() -> None:
    """While a process is being spawned the ring pickles, and the copy verifies frames."""
    from multiprocessing import context

    ring = Keyring({"a": SECRET_A, "b": SECRET_B, "c": SECRET_A[::-1]}, "b",
                   created={"a": 1.0, "b": 2.0, "c": 3.0}, states={"a": "previous"})
    context.set_spawning_popen(object())
    try:
        data = pickle.dumps(ring)
    finally:
        context.set_spawning_popen(None)
    copied = pickle.loads(data)
    assert ring.to_json() == copied.to_json()
    assert ring.describe() == copied.describe()
    assert Codec(copied).loads(Codec(ring).dumps("x")) == "x"


def _child_loads(ring: Keyring, frame: bytes) -> None:
    """In a spawned child: exit 0 only if the inherited ring verifies the frame."""
    raise SystemExit(0 if Codec(ring).loads(frame) == {"from": "parent"} else 1)


def test_ring_reaches_a_spawned_child() -> None:
    """A ring passed as a Process argument reaches a spawned child and verifies there."""
    ring = Keyring.generate()
    frame = Codec(ring).dumps({"from": "parent"})
    proc = multiprocessing.get_context("spawn").Process(target=_child_loads, args=(ring, frame))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0


# -- key derivation ------------------------------------------------------------------


def test_mac_key_is_hkdf_of_the_secret() -> None:
    """The MAC key is HKDF-SHA256(secret, salt=None, info=v1 label, 32 bytes)."""
    assert MAC_KEY_INFO == b"signedqueue v1 frame-mac hmac-sha256"
    expected = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=MAC_KEY_INFO
    ).derive(SECRET_A)
    zero_salt = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=bytes(32), info=MAC_KEY_INFO
    ).derive(SECRET_A)
    assert expected == zero_salt  # RFC 5869: no salt means HashLen zero bytes
    assert expected == derive_mac_key(SECRET_A)
    assert expected != SECRET_A
    assert derive_mac_key(SECRET_A) != derive_mac_key(SECRET_B)


def test_frame_tag_uses_the_derived_key() -> None:
    """A frame's tag is HMAC-SHA256 under the derived key, never under the raw secret."""
    ring = Keyring({"a": SECRET_A}, "a")
    frame = Codec(ring, context=b"ctx").dumps([1, 2])
    body, tag = frame[:-32], frame[-32:]
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=MAC_KEY_INFO)
    expected = hmac.new(derived.derive(SECRET_A), body + b"ctx", hashlib.sha256).digest()
    assert expected == tag
    assert hmac.new(SECRET_A, body + b"ctx", hashlib.sha256).digest() != tag
