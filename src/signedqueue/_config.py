"""
Policy configuration from TOML: a standalone file, or the
``[tool.signedqueue]`` table of a project's ``pyproject.toml``.

::

    [tool.signedqueue]
    presets = ["stdlib", "numpy"]
    allow = ["myapp.models.*", "myapp.events:Envelope.Header"]
    max_age = 300
    max_frame_size = 67108864

Unknown keys are refused by name, so a typo cannot silently loosen or drop a
setting.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._allowlist import Allowlist
from .exceptions import SignedQueueError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = ["Config", "ConfigError", "load_config"]

_KEYS = ("allow", "presets", "max_age", "max_frame_size")


class ConfigError(SignedQueueError, ValueError):
    """A signedqueue configuration file is missing its table or is invalid."""


@dataclass(frozen=True)
class Config:
    """Codec settings read from TOML."""

    allow: Allowlist
    max_age: float | None = None
    max_frame_size: int | None = None

    def codec_options(self) -> dict[str, Any]:
        """Keyword arguments for :class:`Codec` (only the settings given)."""
        options: dict[str, Any] = {"allow": self.allow}
        if self.max_age is not None:
            options["max_age"] = self.max_age
        if self.max_frame_size is not None:
            options["max_frame_size"] = self.max_frame_size
        return options


def load_config(path: str | os.PathLike[str] = "pyproject.toml") -> Config:
    """
    Read codec settings from *path*: the ``[tool.signedqueue]`` table of a
    ``pyproject.toml``, or the top level of any other TOML file.
    """
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            doc = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML ({exc})") from None
    where = f"{p}"
    if p.name == "pyproject.toml":
        table = doc.get("tool", {}).get("signedqueue")
        where = f"[tool.signedqueue] in {p}"
        if table is None:
            raise ConfigError(f"{p} has no [tool.signedqueue] table")
    else:
        table = doc
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    unknown = sorted(set(table) - set(_KEYS))
    if unknown:
        raise ConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
            f"in {where}; known keys: {', '.join(_KEYS)}"
        )

    def strings(key: str, default: list[str]) -> list[str]:
        value = table.get(key, default)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key!r} in {where} must be a list of strings")
        return value

    try:
        allow = Allowlist(strings("allow", []), presets=strings("presets", ["stdlib"]))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    max_age = table.get("max_age")
    if max_age is not None and (
        type(max_age) not in (int, float) or max_age <= 0
    ):
        raise ConfigError(f"'max_age' in {where} must be a positive number of seconds")
    max_frame_size = table.get("max_frame_size")
    if max_frame_size is not None and (type(max_frame_size) is not int or max_frame_size < 72):
        raise ConfigError(f"'max_frame_size' in {where} must be an integer of at least 72")
    return Config(
        allow=allow,
        max_age=None if max_age is None else float(max_age),
        max_frame_size=max_frame_size,
    )
