"""
The keyring: named secrets, one of which signs; all of which verify.

A frame names the id of the key that signed it, so verifying costs one lookup
and one MAC, however many keys the ring holds.  The stored secret is never
used directly: the MAC key is derived from it with HKDF-SHA256 (see
docs/explanation/wire-format.md, "Key derivation").
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import re
import secrets
import stat
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .exceptions import KeyringError

__all__ = ["DEFAULT_ENV_VAR", "KEY_SIZE", "MIN_KEY_SIZE", "Keyring"]

#: Size in bytes of the secrets that :meth:`Keyring.generate` makes.
KEY_SIZE = 32
#: Shortest secret a keyring accepts.
MIN_KEY_SIZE = 16
#: Environment variable read by :meth:`Keyring.from_env` by default.
DEFAULT_ENV_VAR = "SIGNEDQUEUE_KEYRING"

#: HKDF ``info`` for the HMAC-SHA256 frame key (wire format v1).
MAC_KEY_INFO = b"signedqueue v1 frame-mac hmac-sha256"

_KEY_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")
_FILE_FORMAT = "signedqueue-keyring"
_FILE_VERSION = 1


def derive_mac_key(secret: bytes) -> bytes:
    """
    Derive the 32-byte HMAC-SHA256 key of wire format v1 from a stored secret.
    """
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=MAC_KEY_INFO
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
class _State:
    """An immutable snapshot: readers take it with one attribute read."""

    active: str
    secrets: dict[str, bytes]
    created: dict[str, float]
    # MAC keys by the key id's ASCII bytes, as they appear on the wire.
    mac_keys: dict[bytes, bytes]
    active_id_bytes: bytes
    active_mac_key: bytes


class Keyring:
    """
    A set of named secrets: every key verifies, the *active* one also signs.

    Args:
        keys: Key id to secret (at least 16 bytes; :meth:`generate` makes 32).
        active: The id of the key that signs new frames.
        created: Optional key id to creation time (Unix seconds).

    The ring is thread-safe.  Its ``repr`` shows key ids only.  It can be
    pickled only while a child process is being spawned (as queues are), so a
    keyring cannot end up in a queue or a log by accident.
    """

    __slots__ = ("__weakref__", "_lock", "_state")

    def __init__(
        self,
        keys: Mapping[str, bytes],
        active: str,
        *,
        created: Mapping[str, float] | None = None,
    ) -> None:
        self._lock = threading.Lock()
        now = time.time()
        stamps = {kid: float((created or {}).get(kid, now)) for kid in keys}
        self._state = self._build(active, dict(keys), stamps)

    @staticmethod
    def _build(
        active: str, keys: dict[str, bytes], created: dict[str, float]
    ) -> _State:
        mac_keys: dict[bytes, bytes] = {}
        for kid, secret in keys.items():
            check_key_id(kid)
            if not isinstance(secret, (bytes, bytearray)):
                raise TypeError(f"the secret of key {kid!r} must be bytes")
            if len(secret) < MIN_KEY_SIZE:
                raise ValueError(
                    f"the secret of key {kid!r} is {len(secret)} bytes; use at "
                    f"least {MIN_KEY_SIZE} (Keyring.generate() makes {KEY_SIZE})"
                )
            mac_keys[kid.encode("ascii")] = derive_mac_key(bytes(secret))
        if active not in keys:
            raise ValueError(
                f"active key {active!r} is not in the ring; known ids: "
                f"{sorted(keys)}"
            )
        active_bytes = active.encode("ascii")
        return _State(
            active=active,
            secrets={k: bytes(v) for k, v in keys.items()},
            created=created,
            mac_keys=mac_keys,
            active_id_bytes=active_bytes,
            active_mac_key=mac_keys[active_bytes],
        )

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
        Load a ring from the JSON keyring document (see the reference).
        """
        try:
            doc = json.loads(text)
        except ValueError:
            raise KeyringError("keyring document is not valid JSON") from None
        return cls._from_doc(doc)

    @classmethod
    def _from_doc(cls, doc: Any) -> Keyring:
        def bad(what: str) -> KeyringError:
            return KeyringError(f"invalid keyring document: {what}")

        if not isinstance(doc, dict):
            raise bad("the top level must be an object")
        if doc.get("format") != _FILE_FORMAT or type(doc.get("version")) is not int or (
            doc["version"] != _FILE_VERSION
        ):
            raise bad(
                f'expected "format": "{_FILE_FORMAT}" and "version": '
                f"{_FILE_VERSION}"
            )
        unknown = set(doc) - {"format", "version", "active", "keys"}
        if unknown:
            raise bad(f"unknown fields {sorted(unknown)}")
        keys_doc = doc.get("keys")
        if not isinstance(keys_doc, dict) or not keys_doc:
            raise bad('"keys" must be a non-empty object')
        keys: dict[str, bytes] = {}
        created: dict[str, float] = {}
        for kid, entry in keys_doc.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("secret"), str):
                raise bad(f'key {kid!r} needs a "secret" string (base64)')
            extra = set(entry) - {"secret", "created"}
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
        active = doc.get("active")
        if not isinstance(active, str):
            raise bad('"active" must be a key id')
        try:
            return cls(keys, active, created=created)
        except (TypeError, ValueError) as exc:
            raise bad(str(exc)) from None

    @classmethod
    def from_file(
        cls, path: str | os.PathLike[str], *, allow_insecure_permissions: bool = False
    ) -> Keyring:
        """
        Load a ring from a JSON keyring file.

        A file with any permission bit for group or others is refused unless
        *allow_insecure_permissions* is true: its secrets may already be known.
        """
        p = Path(path)
        with open(p, "rb") as fh:
            mode = os.fstat(fh.fileno()).st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO) and not allow_insecure_permissions:
                raise KeyringError(
                    f"keyring file {str(p)!r} is accessible to group or others "
                    f"(mode {stat.S_IMODE(mode):04o}); run 'chmod 600 {p}' or pass "
                    "allow_insecure_permissions=True"
                )
            data = fh.read()
        return cls.from_json(data)

    @classmethod
    def from_env(cls, name: str = DEFAULT_ENV_VAR) -> Keyring:
        """
        Load a ring from the JSON keyring document in environment variable
        *name*.
        """
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
            "active": st.active,
            "keys": {
                kid: {
                    "secret": base64.b64encode(secret).decode("ascii"),
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
        flushed to disk and then renamed over *path*.
        """
        p = Path(path)
        data = self.to_json().encode("ascii")
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent or ".")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, p)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    # -- rotation ----------------------------------------------------------

    def rotate(self) -> str:
        """
        Add a fresh key and make it the signing key; return its id.

        Every key already in the ring keeps verifying until retired.
        """
        with self._lock:
            st = self._state
            kid = new_key_id()
            while kid in st.secrets:  # pragma: no cover - 48 random bits
                kid = new_key_id()
            keys = dict(st.secrets, **{kid: secrets.token_bytes(KEY_SIZE)})
            created = dict(st.created, **{kid: time.time()})
            self._state = self._build(kid, keys, created)
            return kid

    def retire(self, key_id: str) -> None:
        """
        Remove a key: frames signed with it are refused with ``UnknownKey``.

        The active key cannot be retired; rotate first.
        """
        with self._lock:
            st = self._state
            if key_id not in st.secrets:
                raise KeyError(f"no key {key_id!r} in the ring; known ids: {sorted(st.secrets)}")
            if key_id == st.active:
                raise ValueError(
                    f"key {key_id!r} is the active signing key; call rotate() "
                    "first, then retire it"
                )
            keys = {k: v for k, v in st.secrets.items() if k != key_id}
            created = {k: v for k, v in st.created.items() if k != key_id}
            self._state = self._build(st.active, keys, created)

    # -- inspection --------------------------------------------------------

    @property
    def active_id(self) -> str:
        """The id of the key that signs new frames."""
        return self._state.active

    @property
    def key_ids(self) -> tuple[str, ...]:
        """Every key id in the ring, oldest first."""
        st = self._state
        # A stable sort on the time alone: keys made within one tick of a
        # coarse clock keep the order they were added in (rotate() appends).
        return tuple(sorted(st.secrets, key=st.created.__getitem__))

    def created(self, key_id: str) -> float:
        """The creation time of a key, in Unix seconds."""
        return self._state.created[key_id]

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._state.secrets

    def __len__(self) -> int:
        return len(self._state.secrets)

    def __repr__(self) -> str:
        return f"<Keyring active={self.active_id!r} key_ids={list(self.key_ids)!r}>"

    # -- used by the codec (hot path) --------------------------------------

    def _signing(self) -> tuple[bytes, bytes]:
        """The active key id (ASCII bytes) and its MAC key."""
        st = self._state
        return st.active_id_bytes, st.active_mac_key

    def _mac_key(self, key_id: bytes) -> bytes | None:
        """The MAC key for a key id as it appears on the wire, or ``None``."""
        return self._state.mac_keys.get(key_id)

    # -- pickling: only to spawn a child process ---------------------------

    def __reduce__(self) -> tuple[Any, ...]:
        from multiprocessing import context

        if context.get_spawning_popen() is None:
            raise TypeError(
                "a Keyring holds secrets and is pickled only to start a child "
                "process (pass it, or a queue, as a Process argument); load it "
                "from a file or the environment elsewhere"
            )
        st = self._state
        return (_rebuild_keyring, (st.secrets, st.active, st.created))


def _rebuild_keyring(
    keys: dict[str, bytes], active: str, created: dict[str, float]
) -> Keyring:
    return Keyring(keys, active, created=created)

