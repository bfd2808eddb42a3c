"""A submodule of ``allowpkg.mod``: ``allowpkg.mod.*`` does not cover it."""

from __future__ import annotations


class SubThing:
    """A class defined in the submodule."""

    def __init__(self, value: object = None) -> None:
        self.value = value
