"""A sibling module: ``allowpkg.mod`` imports its class."""

from __future__ import annotations


class Foreign:
    """A class defined here and imported by ``allowpkg.mod``."""

    def __init__(self, value: object = None) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return type(other) is Foreign and other.value == self.value

    __hash__ = None  # type: ignore[assignment]
