"""
The keyring: named secrets, one of which signs; all of which verify.

A frame names the id of the key that signed it, so verifying costs one lookup
and one MAC, however many keys the ring holds.  The stored secret is never
used directly: the MAC key is derived from it with HKDF-SHA256 (see
docs/explanation/wire-format.md, "Key derivation").

Each key has a state:

* ``staged``: verifies, never signs (added ahead of a promotion);
* ``active``: the one key that signs (and verifies);
* ``previous``: was active, verifies, never signs (the one to retire next).

Retiring a key removes it.  Rings loaded from a file or a directory can
watch it and pick up changes (see :mod:`signedqueue._keysource`).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ._mac import ALG_AES256_GMAC, ALG_HMAC_SHA256, MacKey
from .exceptions import KeyringError

if TYPE_CHECKING:  # pragma: no cover
    import os

    from ._keysource import Source

__all__ = [
    "ACTIVE",
    "DEFAULT_ENV_VAR",
    "KEY_SIZE",
    "MIN_KEY_SIZE",
    "PREVIOUS",
    "STAGED",
    "KeyInfo",
    "Keyring",
]

#: Size in bytes of the secrets that :meth:`Keyring.generate` makes.
KEY_SIZE = 32
#: Shortest secret a keyring accepts.
MIN_KEY_SIZE = 16
#: Environment variable read by :meth:`Keyring.from_env` by default.
DEFAULT_ENV_VAR = "SIGNEDQUEUE_KEYRING"

STAGED = "staged"
ACTIVE = "active"
PREVIOUS = "previous"
STATES = (STAGED, ACTIVE, PREVIOUS)

#: HKDF ``info`` for the HMAC-SHA256 frame key (wire format v1).  Every other
#: use of a secret must derive its own key with its own ``info``.
MAC_KEY_INFO = b"signedqueue v1 frame-mac hmac-sha256"
#: HKDF ``info`` of each MAC algorithm's sub-key, by algorithm id.
MAC_KEY_INFOS = {
    ALG_HMAC_SHA256: MAC_KEY_INFO,
    ALG_AES256_GMAC: b"signedqueue v1 frame-mac aes256-gmac",
}

_KEY_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")
_FILE_FORMAT = "signedqueue-keyring"
_FILE_VERSION = 1


def derive_mac_key(secret: bytes, alg: int = ALG_HMAC_SHA256) -> bytes:
    """
    Derive the 32-byte sub-key of MAC algorithm *alg* (default HMAC-SHA256)
    of wire format v1 from a stored secret.
    """
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=MAC_KEY_INFOS[alg]
    ).derive(secret)


def check_key_id(key_id: str) -> str:
    """
    Return *key_id* if it is a valid key id, else raise ``ValueError``.

    A key id is 1 to 64 characters from ``A-Z a-z 0-9 . _ -``.
    """
    if not isinstance(key_id, str) or not _KEY_ID_RE.match(key_id):
        raise ValueError(
            f"invalid key id {key_id!r}: use 1 to 64 characters from "
            "A-Z, a-z, 0-9, '.', '_' and '-'"
        )
    return key_id


def new_key_id() -> str:
    """
    A fresh random key id, e.g. ``"k3f9a1c2e7b40"``.
    """
    return "k" + secrets.token_hex(6)


@dataclass(frozen=True)
class KeyInfo:
    """What may be shown about a key: never its secret."""

    key_id: str
    state: str
    created: float


@dataclass(frozen=True)
class _State:
    """An immutable snapshot: readers take it with one attribute read."""

    active: str
    secrets: dict[str, bytes]
    created: dict[str, float]
    states: dict[str, str]
    # By MAC algorithm id: MAC keys by the key id's ASCII bytes, as they
    # appear on the wire.
    mac_keys: dict[int, dict[bytes, MacKey]]
    active_id_bytes: bytes


def _oldest_first(st: _State) -> tuple[str, ...]:
    """The key ids of one snapshot, oldest first."""
    # A stable sort on the time alone: keys made within one tick of a coarse
    # clock keep the order they were added in.
    return tuple(sorted(st.secrets, key=st.created.__getitem__))


def build_state(
    keys: Mapping[str, bytes], states: Mapping[str, str], created: Mapping[str, float]
) -> _State:
    """Validate a whole ring and derive its MAC keys."""
    mac_keys: dict[int, dict[bytes, MacKey]] = {alg: {} for alg in MAC_KEY_INFOS}
    for kid, secret in keys.items():
        check_key_id(kid)
        if not isinstance(secret, (bytes, bytearray)):
            raise TypeError(f"the secret of key {kid!r} must be bytes")
        if len(secret) < MIN_KEY_SIZE:
            raise ValueError(
                f"the secret of key {kid!r} is {len(secret)} bytes; use at "
                f"least {MIN_KEY_SIZE} (Keyring.generate() makes {KEY_SIZE})"
            )
        state = states.get(kid)
        if state not in STATES:
            raise ValueError(f"key {kid!r} has state {state!r}; use one of {list(STATES)}")
        for alg, by_id in mac_keys.items():
            by_id[kid.encode("ascii")] = MacKey(derive_mac_key(bytes(secret), alg))
    actives = sorted(k for k in keys if states[k] == ACTIVE)
    if len(actives) != 1:
        raise KeyringError(
            f"a keyring needs exactly one active key, not {len(actives)}"
            + (f" ({actives})" if actives else "")
            + "; promote one key with 'signedqueue keys promote'"
        )
    active = actives[0]
    active_bytes = active.encode("ascii")
    return _State(
        active=active,
        secrets={k: bytes(v) for k, v in keys.items()},
        created={k: float(created[k]) for k in keys},
        states={k: states[k] for k in keys},
        mac_keys=mac_keys,
        active_id_bytes=active_bytes,
    )


class Keyring:
    """
    A set of named secrets: every key verifies, the *active* one also signs.

    Args:
        keys: Key id to secret (at least 16 bytes; :meth:`generate` makes 32).
        active: The id of the key that signs new frames.  The others are
            staged unless *states* says otherwise.
        created: Optional key id to creation time (Unix seconds).
        states: Optional key id to state (``"staged"`` or ``"previous"``
            for the keys that are not *active*).

    The ring is thread-safe.  Its ``repr`` shows key ids only.  It can be
    pickled only while a child process is being spawned (as queues are), so a
    keyring cannot end up in a queue or a log by accident; a ring loaded from
    a file or directory is re-opened from there in the child instead.
    """

    __slots__ = ("__weakref__", "_lock", "_source", "_state")

    def __init__(
        self,
        keys: Mapping[str, bytes],
        active: str,
        *,
        created: Mapping[str, float] | None = None,
        states: Mapping[str, str] | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._source: Source | None = None
        if active not in keys:
            raise ValueError(
                f"active key {active!r} is not in the ring; known ids: {sorted(keys)}"
            )
        now = time.time()
        stamps = {kid: float((created or {}).get(kid, now)) for kid in keys}
        given = dict(states or {})
        if given.get(active, ACTIVE) != ACTIVE:
            raise ValueError(f"key {active!r} is the active key; its state must be 'active'")
        for kid, state in given.items():
            if kid != active and state == ACTIVE:
                raise KeyringError(
                    f"two active keys ({active!r} and {kid!r}); a ring has exactly one"
                )
        full = {kid: ACTIVE if kid == active else given.get(kid, STAGED) for kid in keys}
        self._state = build_state(keys, full, stamps)

    @classmethod
    def _from_state(cls, state: _State, source: Source | None = None) -> Keyring:
        ring = cls.__new__(cls)
        ring._lock = threading.Lock()
        ring._state = state
        ring._source = source
        return ring

    # -- construction ------------------------------------------------------

    @classmethod
    def generate(cls, key_id: str | None = None) -> Keyring:
        """
        A new ring holding one fresh random 32-byte key, which is active.
        """
        kid = check_key_id(key_id) if key_id is not None else new_key_id()
        return cls({kid: secrets.token_bytes(KEY_SIZE)}, kid)

    @classmethod
    def from_json(cls, text: str | bytes) -> Keyring:
        """
        Load a ring from a JSON keyring document (see the reference).
        """
        return cls._from_state(parse_document(text))

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike[str],
        *,
        watch: bool = False,
        watch_interval: float = 1.0,
        allow_insecure_permissions: bool = False,
    ) -> Keyring:
        """
        Load a ring from a JSON keyring file.

        A file with any permission bit for group or others is refused unless
        *allow_insecure_permissions* is true: its secrets may already be known.

        With *watch*, the ring re-reads the file when it changes, checking at
        most once per *watch_interval* seconds (one ``stat`` on the signing
        and verifying path, no more), so running processes pick up staged,
        promoted and retired keys.  A file that cannot be read or parsed never
        replaces the keys already loaded; the error is logged.
        """
        from ._keysource import FileSource

        source = FileSource(
            path, watch=watch, interval=watch_interval,
            allow_insecure_permissions=allow_insecure_permissions,
        )
        return cls._from_state(source.load_first(), source)

    @classmethod
    def from_directory(
        cls,
        path: str | os.PathLike[str],
        *,
        watch: bool = False,
        watch_interval: float = 1.0,
        allow_insecure_permissions: bool = False,
    ) -> Keyring:
        """
        Load a ring from a directory holding one file per key, as container
        orchestrators mount secrets.

        Each file is named by its key id and holds the secret in base64; the
        file named ``active`` holds the id of the active key (the others are
        staged).  Names starting with ``.`` are ignored.  Permissions and
        *watch* work as in :meth:`from_file`.
        """
        from ._keysource import DirectorySource

        source = DirectorySource(
            path, watch=watch, interval=watch_interval,
            allow_insecure_permissions=allow_insecure_permissions,
        )
        return cls._from_state(source.load_first(), source)

    @classmethod
    def from_env(cls, name: str = DEFAULT_ENV_VAR) -> Keyring:
        """
        Load a ring from the JSON keyring document in environment variable
        *name*.
        """
        import os

        text = os.environ.get(name)
        if not text:
            raise KeyringError(
                f"environment variable {name} is not set or empty; set it to a "
                "keyring document, e.g. the content of a file written by "
                "Keyring.to_file()"
            )
        return cls.from_json(text)

    # -- export ------------------------------------------------------------

    def to_json(self) -> str:
        """
        The ring as a JSON keyring document.  It contains the secrets.
        """
        st = self._state
        doc = {
            "format": _FILE_FORMAT,
            "version": _FILE_VERSION,
            "keys": {
                kid: {
                    "secret": base64.b64encode(secret).decode("ascii"),
                    "state": st.states[kid],
                    "created": st.created[kid],
                }
                for kid, secret in st.secrets.items()
            },
        }
        return json.dumps(doc, indent=2) + "\n"

    def to_file(self, path: str | os.PathLike[str]) -> None:
        """
        Write the ring to *path* atomically, with mode 0600.

        The document goes to a temporary file in the same directory, which is
        flushed to disk and then renamed over *path*; a reader sees the old
        file or the new one, never a mix.
        """
        from ._keysource import write_atomically

        write_atomically(path, self.to_json().encode("ascii"))

    # -- lifecycle ---------------------------------------------------------

    def _change(
        self,
        keys: dict[str, bytes],
        states: dict[str, str],
        created: dict[str, float],
    ) -> None:
        source = self._source
        if source is not None and source.watch:
            raise KeyringError(
                f"this ring follows {str(source.path)!r}; change that instead "
                "(signedqueue keys add/promote/retire), and the ring reloads it"
            )
        self._state = build_state(keys, states, created)
        # Changed in memory: no longer what the file says, so a child process
        # must receive these keys rather than re-open the file.
        self._source = None

    def add(self, key_id: str | None = None) -> str:
        """
        Stage a fresh random key: it verifies at once, and signs only once
        promoted.  Returns its id.
        """
        with self._lock:
            st = self._state
            if key_id is None:
                kid = new_key_id()
                while kid in st.secrets:  # pragma: no cover - 48 random bits
                    kid = new_key_id()
            else:
                kid = check_key_id(key_id)
                if kid in st.secrets:
                    raise KeyringError(f"the ring already holds a key {kid!r}")
            self._change(
                dict(st.secrets, **{kid: secrets.token_bytes(KEY_SIZE)}),
                dict(st.states, **{kid: STAGED}),
                dict(st.created, **{kid: time.time()}),
            )
            return kid

    def promote(self, key_id: str) -> None:
        """
        Make a key the signing key.  The key that was active becomes
        ``previous``: it still verifies until retired.
        """
        with self._lock:
            st = self._state
            self._known(st, key_id)
            if key_id == st.active:
                return
            states = dict(st.states)
            states[st.active] = PREVIOUS
            states[key_id] = ACTIVE
            self._change(dict(st.secrets), states, dict(st.created))

    def rotate(self) -> str:
        """
        Stage a fresh key and promote it at once; return its id.

        In one process this is all there is to it.  Across a fleet, stage
        with :meth:`add` everywhere first and promote later (see the how-to on
        rotating keys), or consumers that have not seen the new key yet will
        refuse its frames.
        """
        with self._lock:
            st = self._state
            kid = new_key_id()
            while kid in st.secrets:  # pragma: no cover - 48 random bits
                kid = new_key_id()
            states = dict(st.states, **{kid: ACTIVE})
            states[st.active] = PREVIOUS
            self._change(
                dict(st.secrets, **{kid: secrets.token_bytes(KEY_SIZE)}),
                states,
                dict(st.created, **{kid: time.time()}),
            )
            return kid

    def retire(self, key_id: str) -> None:
        """
        Remove a key: frames signed with it are refused with ``UnknownKey``.

        The active key cannot be retired; promote another key first.
        """
        with self._lock:
            st = self._state
            self._known(st, key_id)
            if key_id == st.active:
                raise KeyringError(
                    f"key {key_id!r} is the active signing key; promote another key "
                    "first, then retire it"
                )
            keep = [k for k in st.secrets if k != key_id]
            self._change(
                {k: st.secrets[k] for k in keep},
                {k: st.states[k] for k in keep},
                {k: st.created[k] for k in keep},
            )

    @staticmethod
    def _known(st: _State, key_id: str) -> None:
        if key_id not in st.secrets:
            raise KeyError(f"no key {key_id!r} in the ring; known ids: {sorted(st.secrets)}")

    # -- inspection --------------------------------------------------------

    @property
    def active_id(self) -> str:
        """The id of the key that signs new frames."""
        return self._current().active

    @property
    def key_ids(self) -> tuple[str, ...]:
        """Every key id in the ring, oldest first."""
        return _oldest_first(self._current())

    def describe(self) -> tuple[KeyInfo, ...]:
        """Id, state and creation time of every key, oldest first."""
        st = self._current()  # one snapshot: a reload may swap in another
        return tuple(KeyInfo(k, st.states[k], st.created[k]) for k in _oldest_first(st))

    def state(self, key_id: str) -> str:
        """The state of a key: ``"staged"``, ``"active"`` or ``"previous"``."""
        st = self._current()
        self._known(st, key_id)
        return st.states[key_id]

    def created(self, key_id: str) -> float:
        """The creation time of a key, in Unix seconds."""
        return self._current().created[key_id]

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._current().secrets

    def __len__(self) -> int:
        return len(self._current().secrets)

    def __repr__(self) -> str:
        st = self._current()
        keys = ", ".join(f"{k}:{st.states[k]}" for k in _oldest_first(st))
        return f"<Keyring active={st.active!r} keys=[{keys}]>"

    # -- used by the codec (hot path) --------------------------------------

    def _current(self) -> _State:
        source = self._source
        if source is not None and source.watch and source.due():
            source.refresh(self)
        return self._state

    def _signing(self, alg: int = ALG_HMAC_SHA256) -> tuple[bytes, MacKey]:
        """The active key id (ASCII bytes) and its MAC key for *alg*."""
        st = self._current()
        return st.active_id_bytes, st.mac_keys[alg][st.active_id_bytes]

    def _mac_key(self, key_id: bytes, alg: int = ALG_HMAC_SHA256) -> MacKey | None:
        """The MAC key for a key id as it appears on the wire, or ``None``."""
        key = self._current().mac_keys[alg].get(key_id)
        if key is None and self._source is not None and self._source.watch:
            # A key staged moments ago: look again now (rate-limited).
            self._source.refresh(self, urgent=True)
            key = self._state.mac_keys[alg].get(key_id)
        return key

    # -- pickling: only to spawn a child process ---------------------------

    def __reduce__(self) -> tuple[Any, ...]:
        from multiprocessing import context

        if context.get_spawning_popen() is None:
            raise TypeError(
                "a Keyring holds secrets and is pickled only to start a child "
                "process (pass it, or a queue, as a Process argument); load it "
                "from a file or the environment elsewhere"
            )
        if self._source is not None:
            # The child re-opens the file or directory: no secret in the pipe.
            return self._source.recipe()
        st = self._state
        return (_rebuild_keyring, (st.secrets, st.active, st.created, st.states))


def _rebuild_keyring(
    keys: dict[str, bytes], active: str, created: dict[str, float], states: dict[str, str]
) -> Keyring:
    return Keyring(keys, active, created=created, states=states)


def parse_document(text: str | bytes) -> _State:
    """Parse and validate a JSON keyring document."""
    try:
        doc = json.loads(text)
    except ValueError:
        raise KeyringError("keyring document is not valid JSON") from None

    def bad(what: str) -> KeyringError:
        return KeyringError(f"invalid keyring document: {what}")

    if not isinstance(doc, dict):
        raise bad("the top level must be an object")
    if doc.get("format") != _FILE_FORMAT or type(doc.get("version")) is not int or (
        doc["version"] != _FILE_VERSION
    ):
        raise bad(f'expected "format": "{_FILE_FORMAT}" and "version": {_FILE_VERSION}')
    unknown = set(doc) - {"format", "version", "keys"}
    if unknown:
        raise bad(f"unknown fields {sorted(unknown)}")
    keys_doc = doc.get("keys")
    if not isinstance(keys_doc, dict) or not keys_doc:
        raise bad('"keys" must be a non-empty object')
    keys: dict[str, bytes] = {}
    created: dict[str, float] = {}
    states: dict[str, str] = {}
    for kid, entry in keys_doc.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("secret"), str):
            raise bad(f'key {kid!r} needs a "secret" string (base64)')
        extra = set(entry) - {"secret", "state", "created"}
        if extra:
            raise bad(f"unknown fields {sorted(extra)} in key {kid!r}")
        try:
            keys[kid] = base64.b64decode(entry["secret"], validate=True)
        except (binascii.Error, ValueError):
            raise bad(f"the secret of key {kid!r} is not valid base64") from None
        stamp = entry.get("created", 0)
        if type(stamp) not in (int, float):
            raise bad(f'"created" of key {kid!r} must be a number')
        created[kid] = float(stamp)
        state = entry.get("state")
        if state not in STATES:
            raise bad(f'"state" of key {kid!r} must be one of {list(STATES)}')
        states[kid] = state
    try:
        return build_state(keys, states, created)
    except KeyringError as exc:
        raise bad(str(exc)) from None
    except (TypeError, ValueError) as exc:
        raise bad(str(exc)) from None
