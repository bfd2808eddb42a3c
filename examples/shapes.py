"""
Classes for ``custom_class.py``.

They live in their own module, not in the script: a process started with the
spawn method imports the script as ``__mp_main__``, so a class defined in the
script would not be found under the name the producer pickled it with.
"""

from __future__ import annotations

import math


class Circle:
    """A circle, admitted by the consumer's allowlist."""

    def __init__(self, radius: float) -> None:
        self.radius = radius

    def area(self) -> float:
        return math.pi * self.radius**2

    def __repr__(self) -> str:
        return f"Circle(radius={self.radius})"


class Square:
    """A square, which the consumer's allowlist does not admit."""

    def __init__(self, side: float) -> None:
        self.side = side

    def area(self) -> float:
        return self.side**2

    def __repr__(self) -> str:
        return f"Square(side={self.side})"
