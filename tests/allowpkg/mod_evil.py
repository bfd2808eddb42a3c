"""A module whose name merely starts with ``allowpkg.mod``."""

from __future__ import annotations


class Point:
    """Same name as ``allowpkg.mod.Point``, different module."""

    def __init__(self, x: int = 0, y: int = 0) -> None:
        self.x = x
        self.y = y


class Evil:
    """A class no entry for ``allowpkg.mod`` may admit."""
