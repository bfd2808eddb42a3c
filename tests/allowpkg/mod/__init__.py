"""
Names an ``allowpkg.mod.*`` entry admits (those defined here) and names it
must not admit (a module, a submodule, and names imported from elsewhere).
"""

from __future__ import annotations

import json  # a module it merely imports
from os import system as run  # a dangerous function under an innocent name

from allowpkg.other import Foreign  # a harmless class defined elsewhere

from . import sub  # its submodule

__all__ = [
    "Foreign",
    "Outer",
    "Point",
    "Stateful",
    "json",
    "make_point",
    "run",
    "sub",
]


class Point:
    """A plain class with a ``__dict__``."""

    def __init__(self, x: int = 0, y: int = 0) -> None:
        self.x = x
        self.y = y

    def __eq__(self, other: object) -> bool:
        return type(other) is Point and (other.x, other.y) == (self.x, self.y)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Point({self.x}, {self.y})"


class Outer:
    """Holds a nested class, an alias of another class and a method."""

    class Inner:
        """A nested class: its allow entry is ``allowpkg.mod:Outer.Inner``."""

        def __init__(self, value: object = None) -> None:
            self.value = value

        def __eq__(self, other: object) -> bool:
            return type(other) is Outer.Inner and other.value == self.value

        __hash__ = None  # type: ignore[assignment]

    #: ``allowpkg.mod:Outer.alias`` names Point, not a nested class.
    alias = Point

    def method(self) -> str:
        """A function reached by walking attributes."""
        return "method"


class Stateful:
    """A class with ``__setstate__``, loaded through the BUILD opcode."""

    def __init__(self, value: object = None) -> None:
        self.value = value

    def __getstate__(self) -> dict[str, object]:
        return {"value": self.value}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.value = state["value"]
        self.restored = True

    def __eq__(self, other: object) -> bool:
        return type(other) is Stateful and other.value == self.value

    __hash__ = None  # type: ignore[assignment]


def make_point(x: int, y: int) -> Point:
    """A function defined here: ``allowpkg.mod.*`` admits calling it."""
    return Point(x, y)
