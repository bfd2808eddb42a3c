"""
Audit mode: learn which globals flow before locking an allowlist down.

In audit mode (``Codec(..., unsafe_audit=True)``) frames must still verify
and dangerous globals are still refused, but globals outside the allowlist
are loaded, logged once and counted.  A report turns what was seen into the
minimal ``allow=`` list and a ``[tool.signedqueue]`` TOML snippet.  With
``audit_log=PATH`` every process appends one JSON line per global the first
time it sees it, so a fleet's sightings can be merged with
``signedqueue audit report PATH...``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ._allowlist import Allowlist

__all__ = ["AuditReport", "append_sighting"]


@dataclass(frozen=True)
class AuditReport:
    """Globals loaded in audit mode that the allowlist would refuse."""

    #: allow= entry -> how many times it was loaded (per process or merged).
    counts: Mapping[str, int] = field(default_factory=dict)

    def allow_entries(self) -> list[str]:
        """The minimal list of exact ``allow=`` entries that admits all of it."""
        return sorted(self.counts)

    def allowlist(self, base: Allowlist | None = None) -> Allowlist:
        """*base* (default: the stdlib preset) plus every entry seen."""
        base = base if base is not None else Allowlist()
        return base | Allowlist(self.allow_entries(), presets=())

    def to_toml(self, base: Allowlist | None = None) -> str:
        """The resulting allowlist as a ``[tool.signedqueue]`` TOML snippet."""
        return self.allowlist(base).to_toml()

    @classmethod
    def from_logs(cls, paths: Iterable[str | os.PathLike[str]]) -> AuditReport:
        """Merge the JSON-lines audit logs written with ``audit_log=``."""
        counts: dict[str, int] = {}
        for path in paths:
            for number, line in enumerate(Path(path).read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    entry = record["global"]
                except (ValueError, KeyError, TypeError):
                    raise ValueError(f"{path}:{number}: not an audit record") from None
                if not isinstance(entry, str):
                    raise ValueError(f"{path}:{number}: not an audit record")
                counts[entry] = counts.get(entry, 0) + 1
        return cls(counts)

    def __str__(self) -> str:
        if not self.counts:
            return "audit: nothing outside the allowlist was loaded"
        width = max(len(e) for e in self.counts)
        lines = [f"{'GLOBAL':<{width}}  SEEN"]
        lines += [f"{e:<{width}}  {self.counts[e]}" for e in self.allow_entries()]
        return "\n".join(lines)


def append_sighting(path: str | os.PathLike[str], entry: str) -> None:
    """Append one audit record; a single short write, safe from many processes."""
    record = json.dumps({"global": entry, "pid": os.getpid(), "time": time.time()}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, record.encode())
    finally:
        os.close(fd)
