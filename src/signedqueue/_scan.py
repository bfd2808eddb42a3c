"""
Reading a pickle without loading it: which globals would it import?

The scan walks the opcodes with :mod:`pickletools` and never imports or calls
anything.  ``STACK_GLOBAL`` takes its module and name from strings pushed
before it (possibly through the memo); the scan follows those the way the
unpickler would, for string values only.  It is used to report every refused
global of a frame in one error and by ``signedqueue inspect``; enforcement
stays in the restricted unpickler's ``find_class``.
"""

from __future__ import annotations

import copyreg
import pickletools
from typing import Any

__all__ = ["ScanError", "pickle_globals"]

_STRINGS = frozenset(
    {
        "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE",
        "SHORT_BINUNICODE", "BINUNICODE8",
    }
)
_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_GETS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_EXTS = frozenset({"EXT1", "EXT2", "EXT4"})
# Opcodes that push nothing (or only a mark, which STACK_GLOBAL never reads).
_NO_PUSH = frozenset({"PROTO", "FRAME", "STOP", "MEMOIZE", *_PUTS})


class ScanError(Exception):
    """The payload is not a readable pickle."""


def pickle_globals(payload: bytes | bytearray | memoryview) -> list[tuple[str, str]]:
    """
    Every (module, name) the pickle would ask ``find_class`` for, in order,
    without duplicates.  An EXT code names its registered global when one is
    registered in this process, else ``("<extension>", "<code>")``.
    """
    found: dict[tuple[str, str], None] = {}
    stack: list[Any] = []  # only strings matter; everything else is None
    memo: dict[int, Any] = {}
    try:
        for op, raw_arg, _pos in pickletools.genops(bytes(payload)):
            name = op.name
            arg: Any = raw_arg
            if name in ("GLOBAL", "INST"):
                module, _, qualname = str(arg).partition(" ")
                found[(module, qualname)] = None
                stack.append(None)
            elif name == "STACK_GLOBAL":
                top = stack.pop() if stack else None
                below = stack.pop() if stack else None
                if isinstance(below, str) and isinstance(top, str):
                    found[(below, top)] = None
                else:
                    found[("<unknown>", "<computed>")] = None
                stack.append(None)
            elif name in _STRINGS:
                stack.append(arg if isinstance(arg, str) else None)
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1] if stack else None
            elif name in _PUTS:
                memo[int(arg)] = stack[-1] if stack else None
            elif name in _GETS:
                stack.append(memo.get(int(arg)))
            elif name in _EXTS:
                registry: dict[int, tuple[str, str]] = copyreg._inverted_registry  # type: ignore[attr-defined]
                pair = registry.get(arg)
                found[(pair[0], pair[1]) if pair else ("<extension>", str(arg))] = None
                stack.append(None)
            elif name == "POP" and stack:
                stack.pop()
            elif name not in _NO_PUSH:
                stack.append(None)
    except Exception as exc:  # pickletools raises ValueError and friends
        raise ScanError(f"not a readable pickle ({type(exc).__name__})") from None
    return list(found)
