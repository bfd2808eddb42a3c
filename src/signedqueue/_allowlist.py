"""
The allowlist policy: which globals a verified pickle may name.

A pickle can name any importable global and call it with arguments of its
choosing.  The policy admits a global only if an ``allow=`` entry names it (or
the built-in safe set does), and refuses some globals even then: those that
run code, touch files or processes, or import modules when called with
attacker-chosen arguments.

Entries:

* ``"pkg.mod.Name"``: exactly that global.
* ``"pkg.mod:Outer.Inner"``: a nested class, named by its qualified name.
* ``"pkg.mod.*"``: every class or function *defined* in ``pkg.mod``; not its
  submodules and not names it merely imported.
* a class or function object: the global it is importable as.

Every decision is made on the (module, name) strings *before* anything is
imported, then checked again on the object that was found.
"""

from __future__ import annotations

import importlib
import logging
import re
import sys
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any, Union

__all__ = [
    "DANGEROUS_MODULES",
    "Allowlist",
    "DANGEROUS_NAMES",
    "DEFAULT_ALLOW",
    "AllowEntry",
    "Policy",
    "Refusal",
]

logger = logging.getLogger("signedqueue")

#: An ``allow=`` entry: a dotted name, a ``"module:Qual.Name"``, a
#: ``"module.*"`` wildcard, or a class or function object.
AllowEntry = Union[str, type, Any]  # noqa: UP007 (runtime alias on 3.10)

#: Globals admitted when ``allow=None``, and always admitted besides the
#: user's entries.  docs/reference/allowlist.md gives the reason for each.
#: Those marked guarded are replaced by a checked constructor at load time
#: (see :mod:`signedqueue._unpickler`).
DEFAULT_ALLOW: frozenset[str] = frozenset(
    {
        # Built-in value types.  Guarded: copying constructors are charged
        # against the payload size, bytes/bytearray refuse an integer size.
        "builtins.bool",
        "builtins.bytearray",
        "builtins.bytes",
        "builtins.complex",
        "builtins.dict",
        "builtins.float",
        "builtins.frozenset",
        "builtins.int",
        "builtins.list",
        "builtins.set",
        "builtins.slice",
        "builtins.str",
        "builtins.tuple",
        "builtins.object",
        "builtins.Ellipsis",
        "builtins.NotImplemented",
        # How protocols 0-2 write bytes (guarded: latin-1 only) and plain
        # class instances (guarded: base must be object).
        "_codecs.encode",
        "copyreg._reconstructor",
        # Standard library value types.
        "collections.Counter",
        "collections.OrderedDict",
        "collections.defaultdict",  # guarded: default_factory must be a value type
        "collections.deque",
        "datetime.date",
        "datetime.datetime",
        "datetime.time",
        "datetime.timedelta",
        "datetime.timezone",
        "decimal.Decimal",
        "fractions.Fraction",  # guarded: bounded exponent in strings
        "ipaddress.IPv4Address",
        "ipaddress.IPv4Interface",
        "ipaddress.IPv4Network",
        "ipaddress.IPv6Address",
        "ipaddress.IPv6Interface",
        "ipaddress.IPv6Network",
        "uuid.SafeUUID",
        "uuid.UUID",
    }
)

#: Modules none of whose globals are admitted, even when allowlisted: they run
#: code, reach the file system, processes or the network, import modules, or
#: deserialize.  A module matches itself and its submodules.
DANGEROUS_MODULES: frozenset[str] = frozenset(
    {
        "_codecs", "_io", "_operator", "_pickle", "_posixsubprocess", "_thread",
        "asyncio", "bdb", "cloudpickle", "code", "codecs", "codeop", "copyreg",
        "ctypes", "dbm", "dill", "ensurepip", "fcntl", "functools", "gc", "glob",
        "http", "importlib", "inspect", "io", "joblib", "logging", "marshal",
        "mmap", "multiprocessing", "nt", "ntpath", "operator", "os", "pdb",
        "pickle", "pickletools", "pip", "pkgutil", "platform", "posix",
        "posixpath", "pty", "pwd", "resource", "runpy", "select", "selectors",
        "shelve", "shutil", "signal", "site", "socket", "socketserver",
        "sqlite3", "subprocess", "sys", "sysconfig", "tempfile", "threading",
        "timeit", "trace", "types", "urllib", "venv", "weakref", "webbrowser",
        "xmlrpc", "zipimport",
    }
)

#: Single globals refused even when allowlisted.
DANGEROUS_NAMES: frozenset[str] = frozenset(
    f"builtins.{n}"
    for n in (
        # Run code, reach the interpreter or files, or walk attributes.
        "__build_class__", "__import__", "__loader__", "breakpoint", "classmethod",
        "compile", "delattr", "dir", "eval", "exec", "exit", "getattr", "globals",
        "hasattr", "help", "input", "locals", "memoryview", "open", "print",
        "property", "quit", "setattr", "staticmethod", "super", "type", "vars",
        # Call other callables repeatedly, or make lazy or huge results that a
        # copying constructor would then materialize.
        "aiter", "anext", "enumerate", "filter", "iter", "map", "max", "min",
        "next", "pow", "range", "reversed", "sorted", "sum", "zip",
    )
)

#: Longest "module.qualname" a pickle may name (keeps refusals short).
MAX_NAME_LENGTH = 200

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_MODULE_RE = re.compile(rf"{_IDENT}(?:\.{_IDENT})*\Z")
_QUALNAME_RE = _MODULE_RE


class Refusal(Exception):
    """Internal: a global the policy refuses, with what would admit it."""

    def __init__(self, name: str, why: str, entry: str | None) -> None:
        super().__init__(why)
        self.name = name
        self.why = why
        self.entry = entry


def entry_for(module: str, qualname: str) -> str:
    """The ``allow=`` entry text that names exactly this global."""
    return f"{module}:{qualname}" if "." in qualname else f"{module}.{qualname}"


def _module_matches(module: str, names: frozenset[str]) -> bool:
    parts = module.split(".")
    return any(".".join(parts[: i + 1]) in names for i in range(len(parts)))


def is_dangerous(module: str, qualname: str) -> bool:
    """
    True if ``module.qualname`` is refused even when allowlisted.
    """
    if f"{module}.{qualname}" in DEFAULT_ALLOW:
        return False  # admitted through a guard (see _unpickler)
    if _module_matches(module, DANGEROUS_MODULES):
        return True
    head = qualname.split(".", 1)[0]
    if f"{module}.{head}" in DANGEROUS_NAMES:
        return True
    return any(p.startswith("__") and p.endswith("__") for p in qualname.split("."))


def _parse_entry(entry: AllowEntry) -> tuple[str, str]:
    """(module, qualname) of an entry; qualname ``"*"`` for a wildcard."""
    if isinstance(entry, str):
        if ":" in entry:
            module, _, qualname = entry.partition(":")
        elif entry.endswith(".*"):
            module, qualname = entry[:-2], "*"
        else:
            module, _, qualname = entry.rpartition(".")
        if not _MODULE_RE.match(module) or not (
            qualname == "*" or _QUALNAME_RE.match(qualname)
        ):
            raise ValueError(
                f"invalid allow entry {entry!r}: use 'pkg.mod.Name', "
                "'pkg.mod:Outer.Inner', 'pkg.mod.*' or a class object"
            )
        return module, qualname
    obj_module = getattr(entry, "__module__", None)
    obj_qualname = getattr(entry, "__qualname__", None)
    if not isinstance(obj_module, str) or not isinstance(obj_qualname, str):
        raise TypeError(
            f"allow entries are strings, classes or functions, not {type(entry).__name__}"
        )
    module, qualname = obj_module, obj_qualname
    if "<lambda>" in qualname:
        raise ValueError("a lambda cannot be named by pickle; use a def at module level")
    if "<locals>" in qualname:
        raise ValueError(
            f"{qualname!r} is defined inside a function; pickle cannot name it. "
            "Define it at module level."
        )
    return module, qualname


class Policy:
    """
    A compiled allowlist.  Immutable after construction; lookups are cached.

    Args:
        allow: Entries admitted besides :data:`DEFAULT_ALLOW`.
        unsafe_allow_dangerous: Exact ``"module.name"`` entries admitted even
            though they are in the dangerous set.  Anyone holding a key can
            then run code through them.
    """

    def __init__(
        self,
        allow: Allowlist | Iterable[AllowEntry] | None = None,
        *,
        unsafe_allow_dangerous: Iterable[str] = (),
        audit: bool = False,
        audit_sink: Callable[[str], None] | None = None,
    ) -> None:
        allowlist = allow if isinstance(allow, Allowlist) else Allowlist(allow or ())
        self.allowlist = allowlist
        exact: set[tuple[str, str]] = set()
        wildcards: set[str] = set()
        unsafe = {_parse_entry(e) for e in unsafe_allow_dangerous}
        for module, qualname in unsafe:
            if qualname == "*":
                raise ValueError("unsafe_allow_dangerous takes exact names, not wildcards")
            exact.add((module, qualname))
        if unsafe:
            logger.warning(
                "signedqueue: unsafe_allow_dangerous admits %s; every key holder "
                "can run code in this process",
                sorted(entry_for(m, q) for m, q in unsafe),
            )
        for preset in allowlist.preset_globals():
            exact.add(_parse_entry(preset))
        for entry in allowlist.entries:
            module, qualname = _parse_entry(entry)
            if qualname == "*":
                if module == "builtins" or _module_matches(module, DANGEROUS_MODULES):
                    raise ValueError(
                        f"allow entry '{module}.*' is refused: module {module!r} "
                        "can run code or reach files, processes or the network"
                    )
                wildcards.add(module)
            elif is_dangerous(module, qualname) and (module, qualname) not in unsafe:
                raise ValueError(
                    f"allow entry {entry_for(module, qualname)!r} is refused: calling "
                    "it with attacker-chosen arguments can run code, touch files or "
                    "exhaust memory. If every key holder may run code in this "
                    f"process, pass unsafe_allow_dangerous=[{entry_for(module, qualname)!r}]"
                )
            else:
                exact.add((module, qualname))
        self._exact = frozenset(exact)
        self._wildcards = frozenset(wildcards)
        self._modules = frozenset(m for m, _ in exact) | self._wildcards
        self._unsafe = frozenset(unsafe)
        self._cache: dict[tuple[str, str], Any] = {}
        #: Audit mode: globals outside the allowlist (never dangerous ones) are
        #: admitted and counted here, by the allow= entry that would admit them.
        self.audit = audit
        self.audit_sink = audit_sink
        self.audited: dict[str, int] = {}
        self._audited_keys: dict[tuple[str, str], str] = {}

    def __repr__(self) -> str:
        mode = " AUDIT" if self.audit else ""
        return f"<Policy{mode} {self.allowlist!r}>"

    def modules(self) -> frozenset[str]:
        """Every module an exact or wildcard entry of this policy names."""
        return self._modules

    def check(self, module: str, name: str) -> Refusal | None:
        """The refusal ``resolve`` would raise (ignoring audit mode), or None."""
        try:
            self._resolve(module, name, audit=False)
        except Refusal as refusal:
            return refusal
        return None

    def resolve(self, module: str, name: str) -> Any:
        """
        The object a pickle's ``find_class(module, name)`` may receive.

        Raises :class:`Refusal` if the policy refuses it.
        """
        key = (module, name)
        try:
            obj = self._cache[key]
        except KeyError:
            obj = self._resolve(module, name, audit=self.audit)
            self._cache[key] = obj
        if self._audited_keys:
            entry = self._audited_keys.get(key)
            if entry is not None:
                count = self.audited.get(entry, 0)
                self.audited[entry] = count + 1
                if not count:
                    logger.warning(
                        "signedqueue: AUDIT MODE loaded %s, which the allowlist "
                        "refuses; to admit it, add allow=[%r]", entry, entry,
                    )
                    if self.audit_sink is not None:
                        self.audit_sink(entry)
        return obj

    def _resolve(self, module: str, name: str, *, audit: bool) -> Any:
        if (
            len(module) + len(name) > MAX_NAME_LENGTH
            or not _MODULE_RE.match(module)
            or not _QUALNAME_RE.match(name)
        ):
            # Never echo arbitrary payload text: show a bounded repr.
            raise Refusal(repr(f"{module} {name}")[:80], "is not a valid global name", None)
        shown = entry_for(module, name)
        key = (module, name)
        exact = key in self._exact
        unsafe = key in self._unsafe
        if not unsafe and is_dangerous(module, name):
            raise Refusal(
                shown,
                "is refused even when allowlisted: calling it with attacker-chosen "
                "arguments can run code, touch files or exhaust memory",
                None,
            )
        if not exact and audit and module not in self._wildcards:
            # Audit mode: admitted as if by the exact entry, and counted.
            exact = True
            self._audited_keys[key] = shown
        if not exact:
            if module not in self._wildcards:
                raise Refusal(shown, "is not in the allowlist", shown)
            if "." in name:
                raise Refusal(
                    shown,
                    "walks attributes, which a wildcard never admits; name the "
                    "nested class exactly",
                    shown,
                )
        elif (
            "." in name
            and not unsafe
            and key not in self._exact
            and key not in self._audited_keys
        ):
            raise Refusal(shown, "walks attributes", shown)  # pragma: no cover
        obj = self._import(module, name, shown)
        if unsafe:
            return obj
        if isinstance(obj, ModuleType):
            raise Refusal(shown, "is a module, and modules are never admitted", None)
        # Check what was actually found, so that an alias (``run = os.system``)
        # or a dangerous type's instance is refused whatever it is called.
        real_module = getattr(obj, "__module__", None)
        real_name = getattr(obj, "__qualname__", None)
        if (
            isinstance(real_module, str)
            and isinstance(real_name, str)
            and is_dangerous(real_module, real_name)
        ):
            raise Refusal(
                shown,
                f"is {real_module}.{real_name}, which is refused even when allowlisted",
                None,
            )
        kind = type(obj)
        if not isinstance(obj, type) and is_dangerous(kind.__module__, kind.__qualname__):
            raise Refusal(
                shown,
                f"is an instance of {kind.__module__}.{kind.__qualname__}, which is "
                "refused even when allowlisted",
                None,
            )
        if not exact and real_module != module:
            raise Refusal(
                shown,
                f"is not defined in {module} (wildcards admit only what a module "
                "defines, not what it imports)"
                + (
                    f"; it is {entry_for(real_module, real_name)}, which producers "
                    "normally name"
                    if isinstance(real_module, str) and isinstance(real_name, str)
                    else ""
                ),
                shown,
            )
        if "." in name and (
            not isinstance(obj, type) or real_module != module or real_name != name
        ):
            raise Refusal(
                shown, "walks attributes to something that is not that nested class", None
            )
        return obj

    @staticmethod
    def _import(module: str, name: str, shown: str) -> Any:
        try:
            mod = sys.modules.get(module) or importlib.import_module(module)
        except Exception:
            raise Refusal(
                shown, f"names module {module!r}, which cannot be imported", None
            ) from None
        obj: Any = mod
        for part in name.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                raise Refusal(shown, "does not exist", None) from None
        return obj


class Allowlist:
    """
    What a restricted unpickler admits: presets plus your own entries.

    Args:
        entries: ``"pkg.mod.Name"``, ``"pkg.mod:Outer.Inner"``, ``"pkg.mod.*"``
            or class and function objects.
        presets: Named sets of globals (see :data:`signedqueue.PRESETS`):
            ``"stdlib"`` (the default safe set), ``"numpy"`` and ``"dateutil"``.

    Allowlists are immutable and compose with ``|``::

        Allowlist.preset("numpy") | Allowlist(["myapp.models.*"])

    ``allow=[...]`` on a codec means ``Allowlist([...])``: your entries plus
    the ``stdlib`` preset.
    """

    __slots__ = ("entries", "presets")

    def __init__(
        self, entries: Iterable[AllowEntry] = (), *, presets: Iterable[str] = ("stdlib",)
    ) -> None:
        from ._presets import PRESETS

        names = set()
        for name in presets:
            if name not in PRESETS:
                raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
            names.add(name)
        texts = set()
        for entry in entries:
            module, qualname = _parse_entry(entry)
            texts.add(f"{module}.*" if qualname == "*" else entry_for(module, qualname))
        #: The preset names, sorted.
        self.presets: tuple[str, ...] = tuple(sorted(names))
        #: The user entries as text, sorted.
        self.entries: tuple[str, ...] = tuple(sorted(texts))

    @classmethod
    def preset(cls, *names: str) -> Allowlist:
        """Only the named presets (add ``"stdlib"`` to keep the default set)."""
        return cls((), presets=names)

    def __or__(self, other: Allowlist) -> Allowlist:
        if not isinstance(other, Allowlist):
            return NotImplemented
        return Allowlist(self.entries + other.entries, presets=self.presets + other.presets)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Allowlist):
            return NotImplemented
        return (self.presets, self.entries) == (other.presets, other.entries)

    def __hash__(self) -> int:
        return hash((self.presets, self.entries))

    def __repr__(self) -> str:
        return f"Allowlist({list(self.entries)!r}, presets={list(self.presets)!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_make_allowlist, (self.entries, self.presets))

    def preset_globals(self) -> frozenset[str]:
        """Every global the presets admit."""
        from ._presets import PRESETS

        out: set[str] = set()
        for name in self.presets:
            out |= PRESETS[name]
        return frozenset(out)

    def to_toml(self) -> str:
        """The allowlist as a ``[tool.signedqueue]`` TOML snippet."""
        lines = ["[tool.signedqueue]"]
        lines.append("presets = [" + ", ".join(f'"{p}"' for p in self.presets) + "]")
        lines.append("allow = [")
        lines.extend(f'    "{e}",' for e in self.entries)
        lines.append("]")
        return "\n".join(lines) + "\n"


def _make_allowlist(entries: tuple[str, ...], presets: tuple[str, ...]) -> Allowlist:
    return Allowlist(entries, presets=presets)
