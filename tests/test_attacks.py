"""
A corpus of malicious pickles, assembled by hand from raw opcodes.

Every payload is sealed with a valid key (``Codec.seal``), so the signature
passes and the restricted unpickler is what must refuse it.  Each family is
tried at every pickle protocol 0 to 5, with each opcode that loads a global
(GLOBAL, INST, OBJ, STACK_GLOBAL, REDUCE, NEWOBJ, NEWOBJ_EX, BUILD through an
instance's ``__setstate__``, EXT1/EXT2/EXT4, PERSID/BINPERSID), against
targets that would leave a trace: a canary file created, a victim directory
removed.  Beside each family, the legitimate use of the same opcodes at the
same protocol loads, and positive controls show that the same frames do run
under full trust, so the payloads are live.

The last part covers resource-exhaustion gadgets built from admitted
constructors, and legitimate large data that must still load.
"""

from __future__ import annotations

import collections
import copyreg
import datetime
import decimal
import fractions
import marshal
import os
import pickle
import pickletools
import shlex
import struct
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from signedqueue import Codec, ForbiddenClass, Keyring, MalformedFrame, RejectedFrame

PROTOCOLS = range(pickle.HIGHEST_PROTOCOL + 1)


# -- a pickle assembler ------------------------------------------------------------


class Asm:
    """Assembles a pickle from raw opcodes, encoding values as *protocol* would."""

    def __init__(self, protocol: int) -> None:
        self.protocol = protocol
        self.out = bytearray()
        if protocol >= 2:
            self.out += pickle.PROTO + bytes([protocol])

    def op(self, *codes: bytes) -> Asm:
        """Append raw opcodes and arguments."""
        for code in codes:
            self.out += code
        return self

    def text(self, value: str) -> Asm:
        """A str: UNICODE at protocol 0, BINUNICODE at 1 to 3, SHORT_BINUNICODE from 4."""
        if self.protocol == 0:
            escaped = (
                value.replace("\\", "\\u005c").replace("\0", "\\u0000").replace("\n", "\\u000a")
                .replace("\r", "\\u000d").replace("\x1a", "\\u001a")
            )
            return self.op(pickle.UNICODE, escaped.encode("raw-unicode-escape"), b"\n")
        raw = value.encode("utf-8", "surrogatepass")
        if self.protocol >= 4 and len(raw) < 256:
            return self.op(pickle.SHORT_BINUNICODE, bytes([len(raw)]), raw)
        return self.op(pickle.BINUNICODE, struct.pack("<I", len(raw)), raw)

    def integer(self, value: int) -> Asm:
        """An int: INT or LONG at protocol 0, BININT* at 1, LONG1/LONG4 from 2."""
        if self.protocol == 0:
            if -(2**31) <= value < 2**31:
                return self.op(pickle.INT, str(value).encode(), b"\n")
            return self.op(pickle.LONG, str(value).encode(), b"L\n")
        if 0 <= value < 256:
            return self.op(pickle.BININT1, bytes([value]))
        if 0 <= value < 65536:
            return self.op(pickle.BININT2, struct.pack("<H", value))
        if -(2**31) <= value < 2**31:
            return self.op(pickle.BININT, struct.pack("<i", value))
        if self.protocol == 1:
            return self.op(pickle.LONG, str(value).encode(), b"L\n")
        raw = pickle.encode_long(value)
        if len(raw) < 256:
            return self.op(pickle.LONG1, bytes([len(raw)]), raw)
        return self.op(pickle.LONG4, struct.pack("<i", len(raw)), raw)

    def data(self, value: bytes) -> Asm:
        """bytes: BINBYTES from protocol 3, else _codecs.encode(latin-1 text), as pickle does."""
        if self.protocol >= 3:
            return self.op(pickle.BINBYTES, struct.pack("<I", len(value)), value)
        self.global_("_codecs", "encode").op(pickle.MARK)
        self.text(value.decode("latin-1")).text("latin1")
        return self.op(pickle.TUPLE, pickle.REDUCE)

    def value(self, value: Any) -> Asm:
        """Any of None, bool, int, str, bytes, list, tuple, dict, in this protocol's opcodes."""
        if value is None:
            return self.op(pickle.NONE)
        if isinstance(value, bool):
            if self.protocol >= 2:
                return self.op(pickle.NEWTRUE if value else pickle.NEWFALSE)
            return self.op(pickle.TRUE if value else pickle.FALSE)
        if isinstance(value, int):
            return self.integer(value)
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, bytes):
            return self.data(value)
        if isinstance(value, tuple):
            return self.tuple_(*value)
        if isinstance(value, list):
            if self.protocol == 0:
                self.op(pickle.MARK)
                for item in value:
                    self.value(item)
                return self.op(pickle.LIST)
            self.op(pickle.EMPTY_LIST, pickle.MARK)
            for item in value:
                self.value(item)
            return self.op(pickle.APPENDS)
        if isinstance(value, dict):
            self.op(pickle.MARK) if self.protocol == 0 else self.op(pickle.EMPTY_DICT, pickle.MARK)
            for key, item in value.items():
                self.value(key).value(item)
            return self.op(pickle.DICT if self.protocol == 0 else pickle.SETITEMS)
        raise TypeError(type(value))

    def tuple_(self, *values: Any) -> Asm:
        """A tuple: MARK ... TUPLE (EMPTY_TUPLE from protocol 1)."""
        if not values and self.protocol >= 1:
            return self.op(pickle.EMPTY_TUPLE)
        self.op(pickle.MARK)
        for item in values:
            self.value(item)
        return self.op(pickle.TUPLE)

    def global_(self, module: str, name: str) -> Asm:
        """GLOBAL module name."""
        return self.op(pickle.GLOBAL, module.encode(), b"\n", name.encode(), b"\n")

    def put(self, index: int) -> Asm:
        """Memoize the top of the stack (PUT, BINPUT or LONG_BINPUT)."""
        if self.protocol == 0:
            return self.op(pickle.PUT, str(index).encode(), b"\n")
        if index < 256:
            return self.op(pickle.BINPUT, bytes([index]))
        return self.op(pickle.LONG_BINPUT, struct.pack("<I", index))

    def get(self, index: int) -> Asm:
        """Push a memoized object (GET, BINGET or LONG_BINGET)."""
        if self.protocol == 0:
            return self.op(pickle.GET, str(index).encode(), b"\n")
        if index < 256:
            return self.op(pickle.BINGET, bytes([index]))
        return self.op(pickle.LONG_BINGET, struct.pack("<I", index))

    def bytes_(self) -> bytes:
        """The pickle, ended with STOP."""
        return bytes(self.out + pickle.STOP)


# -- extension codes -------------------------------------------------------------

#: One code per extension opcode: EXT1 takes 1 byte, EXT2 2 bytes, EXT4 4 bytes.
EXT_CODES = {"EXT1": 0xF1, "EXT2": 0xF1F1, "EXT4": 0x0BADCAFE}


def ext_opcode(kind: str) -> bytes:
    """The EXT1/EXT2/EXT4 opcode with its code."""
    code = EXT_CODES[kind]
    if kind == "EXT1":
        return pickle.EXT1 + bytes([code])
    if kind == "EXT2":
        return pickle.EXT2 + struct.pack("<H", code)
    return pickle.EXT4 + struct.pack("<i", code)


class Extensions:
    """Registers copyreg extension codes for a test and removes them afterwards."""

    def __init__(self) -> None:
        self._added: list[tuple[str, str, int]] = []

    def add(self, module: str, name: str, code: int) -> None:
        copyreg.add_extension(module, name, code)
        self._added.append((module, name, code))

    def remove_all(self) -> None:
        for module, name, code in self._added:
            copyreg.remove_extension(module, name, code)
        self._added.clear()


@pytest.fixture
def extensions() -> Iterator[Extensions]:
    """copyreg extension registrations, undone after the test."""
    registry = Extensions()
    yield registry
    registry.remove_all()


# -- traces an attack would leave --------------------------------------------------


@dataclass
class Traces:
    """A canary that must stay absent and a victim that must stay present."""

    canary: Path
    victim: Path
    script: Path

    def untouched(self) -> bool:
        """True if no attack left a trace."""
        return not self.canary.exists() and (self.victim / "keep").exists()


@pytest.fixture
def traces(tmp_path: Path) -> Traces:
    """A fresh canary path, a victim directory and a script that creates the canary."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("keep")
    canary = tmp_path / "canary"
    script = tmp_path / "script.py"
    script.write_text(f"open({str(canary)!r}, 'w').close()\n")
    return Traces(canary=canary, victim=victim, script=script)


def touch(traces: Traces) -> str:
    """A shell command that creates the canary."""
    return f"touch {shlex.quote(str(traces.canary))}"


def create_canary(traces: Traces) -> str:
    """Python source that creates the canary."""
    return f"open({str(traces.canary)!r}, 'w').close()"


def inner_pickle(traces: Traces) -> bytes:
    """A plain pickle calling os.system(touch canary), for pickle.loads targets."""
    return Asm(2).global_("os", "system").tuple_(touch(traces)).op(pickle.REDUCE).bytes_()


@dataclass(frozen=True)
class Target:
    """A global a pickle must not reach, and arguments that would leave a trace."""

    module: str
    name: str
    args: Callable[[Traces], tuple[Any, ...]] = lambda t: ()
    #: Calling it with ``args`` leaves a trace and returns no open resource,
    #: so a positive control can run it.
    live: bool = False

    def __str__(self) -> str:
        return f"{self.module}.{self.name}"


TARGETS = [
    Target("os", "system", lambda t: (touch(t),), live=True),
    Target("posix", "system", lambda t: (touch(t),), live=True),
    Target("os", "popen", lambda t: (touch(t),)),
    Target("os", "remove", lambda t: (str(t.victim / "keep"),), live=True),
    Target("os", "mkdir", lambda t: (str(t.canary),), live=True),
    Target("subprocess", "Popen", lambda t: (["touch", str(t.canary)],)),
    Target("subprocess", "check_output", lambda t: (["touch", str(t.canary)],), live=True),
    Target("subprocess", "getoutput", lambda t: (touch(t),), live=True),
    Target("builtins", "eval", lambda t: (create_canary(t),), live=True),
    Target("builtins", "exec", lambda t: (create_canary(t),), live=True),
    Target("builtins", "compile", lambda t: (create_canary(t), "<payload>", "exec")),
    Target("builtins", "open", lambda t: (str(t.canary), "w")),
    Target("io", "open", lambda t: (str(t.canary), "w")),
    Target("_io", "open", lambda t: (str(t.canary), "w")),
    Target("codecs", "open", lambda t: (str(t.canary), "w")),
    Target("builtins", "getattr", lambda t: ("text", "upper")),
    Target("builtins", "setattr", lambda t: ("text", "upper", 1)),
    Target("builtins", "type", lambda t: ("Made", (), {})),
    Target("builtins", "vars"),
    Target("builtins", "globals"),
    Target("builtins", "__import__", lambda t: ("os",)),
    Target("builtins", "__build_class__"),
    Target("importlib", "import_module", lambda t: ("os",)),
    Target("runpy", "run_path", lambda t: (str(t.script),), live=True),
    Target("functools", "partial", lambda t: ("x",)),
    Target("functools", "reduce", lambda t: ("x", [1, 2])),
    Target("operator", "attrgetter", lambda t: ("system",)),
    Target("operator", "methodcaller", lambda t: ("system", touch(t))),
    Target("_operator", "methodcaller", lambda t: ("system", touch(t))),
    Target("pickle", "loads", lambda t: (inner_pickle(t),), live=True),
    Target("_pickle", "loads", lambda t: (inner_pickle(t),), live=True),
    Target("marshal", "loads", lambda t: (marshal.dumps(1),)),
    Target("types", "CodeType"),
    Target("types", "FunctionType"),
    Target("sys", "modules"),
    Target("sys", "exit", lambda t: (3,)),
    Target("ctypes", "CDLL", lambda t: ("libc.so.6",)),
    Target("shutil", "rmtree", lambda t: (str(t.victim),), live=True),
    Target("codecs", "decode", lambda t: (b"x", "zlib")),
    Target("_codecs", "decode", lambda t: (b"x", "zlib")),
    Target("copyreg", "__newobj__", lambda t: ("x",)),
    Target("gc", "get_objects"),
    Target("timeit", "main", lambda t: (["-n", "1", create_canary(t)],)),
    # Python 2 names, which the unpickler maps to their Python 3 modules.
    Target("__builtin__", "eval", lambda t: (create_canary(t),)),
    Target("commands", "getoutput", lambda t: (touch(t),)),
    Target("cPickle", "loads", lambda t: (inner_pickle(t),)),
    # Walking attributes from admitted or harmless names.
    Target("datetime", "datetime.__init__.__globals__"),
    Target("collections", "OrderedDict.fromkeys", lambda t: ([1, 2],)),
    Target("collections", "_sys.modules"),
    Target("uuid", "os.system", lambda t: (touch(t),)),
    Target("ipaddress", "functools.partial", lambda t: ("x",)),
    Target("uuid", "UUID.__init__.__globals__"),
    Target("fractions", "Fraction.__new__"),
    Target("decimal", "Decimal.__reduce__"),
    Target("builtins", "object.__subclasses__"),
    Target("builtins", "__dict__"),
    Target("builtins", "__loader__"),
    Target("uuid", "SafeUUID.__class__"),
    Target("builtins", "int.__class__.__call__"),
    # Not a valid global name at all.
    Target("os system", "x"),
    Target("os", "system\x00"),
]


# -- the global-loading opcodes, each with its attack and its legitimate use ---------


def form_reduce(asm: Asm, module: str, name: str, args: tuple[Any, ...]) -> Asm:
    """GLOBAL, then REDUCE: calls module.name(*args)."""
    return asm.global_(module, name).tuple_(*args).op(pickle.REDUCE)


def form_inst(asm: Asm, module: str, name: str, args: tuple[Any, ...]) -> Asm:
    """MARK args INST: calls module.name(*args)."""
    asm.op(pickle.MARK)
    for arg in args:
        asm.value(arg)
    return asm.op(pickle.INST, module.encode(), b"\n", name.encode(), b"\n")


def form_obj(asm: Asm, module: str, name: str, args: tuple[Any, ...]) -> Asm:
    """MARK GLOBAL args OBJ: calls module.name(*args)."""
    asm.op(pickle.MARK).global_(module, name)
    for arg in args:
        asm.value(arg)
    return asm.op(pickle.OBJ)


def form_stack_global(asm: Asm, module: str, name: str, args: tuple[Any, ...]) -> Asm:
    """STACK_GLOBAL from two strings, then REDUCE."""
    return asm.text(module).text(name).op(pickle.STACK_GLOBAL).tuple_(*args).op(pickle.REDUCE)


def form_newobj(asm: Asm, module: str, name: str, args: tuple[Any, ...]) -> Asm:
    """GLOBAL args NEWOBJ: cls.__new__(cls, *args)."""
    return asm.global_(module, name).tuple_(*args).op(pickle.NEWOBJ)


def form_newobj_ex(asm: Asm, module: str, name: str, args: tuple[Any, ...]) -> Asm:
    """GLOBAL args kwargs NEWOBJ_EX: cls.__new__(cls, *args, **kwargs)."""
    kwargs = args[-1] if args and isinstance(args[-1], dict) else {}
    positional = args[:-1] if kwargs else args
    return asm.global_(module, name).tuple_(*positional).value(kwargs).op(pickle.NEWOBJ_EX)


def form_build_setstate(asm: Asm, module: str, name: str, args: tuple[Any, ...]) -> Asm:
    """
    An admitted instance (a Counter, which has a __dict__) gets the global as
    its ``__setstate__`` by a first BUILD; a second BUILD then calls it with
    the state, which is the first argument.
    """
    asm.global_("collections", "Counter").tuple_().op(pickle.REDUCE)
    asm.op(pickle.MARK).text("__setstate__").global_(module, name).op(pickle.DICT, pickle.BUILD)
    return asm.value(args[0] if args else None).op(pickle.BUILD)


def form_ext(kind: str) -> Callable[[Asm, str, str, tuple[Any, ...]], Asm]:
    """EXT1/EXT2/EXT4 for a registered (module, name), then REDUCE."""

    def form(asm: Asm, module: str, name: str, args: tuple[Any, ...]) -> Asm:
        return asm.op(ext_opcode(kind)).tuple_(*args).op(pickle.REDUCE)

    form.__doc__ = f"{kind} of the registered code, then REDUCE."
    return form


FORMS: dict[str, Callable[[Asm, str, str, tuple[Any, ...]], Asm]] = {
    "GLOBAL+REDUCE": form_reduce,
    "INST": form_inst,
    "OBJ": form_obj,
    "STACK_GLOBAL+REDUCE": form_stack_global,
    "NEWOBJ": form_newobj,
    "NEWOBJ_EX": form_newobj_ex,
    "BUILD+__setstate__": form_build_setstate,
    "EXT1": form_ext("EXT1"),
    "EXT2": form_ext("EXT2"),
    "EXT4": form_ext("EXT4"),
}
#: Forms that call the global with the arguments (the rest only look it up,
#: or instantiate it with __new__).
CALLING_FORMS = [f for f in FORMS if not f.startswith("NEWOBJ")]


def build(form: str, protocol: int, module: str, name: str, args: tuple[Any, ...]) -> bytes:
    """The pickle of *form* at *protocol* applied to module.name and args."""
    return FORMS[form](Asm(protocol), module, name, args).bytes_()


@pytest.fixture(scope="module")
def attack_ring() -> Keyring:
    """One keyring for the whole corpus."""
    return Keyring.generate()


@pytest.fixture(scope="module")
def restricted(attack_ring: Keyring) -> Codec:
    """The default codec: restricted pickle, no allow= entries."""
    return Codec(attack_ring)


@pytest.fixture(scope="module")
def trusting(attack_ring: Keyring) -> Codec:
    """A codec that loads signed pickles without an allowlist (positive controls)."""
    return Codec(attack_ring, unsafe_trust_signed_frames=True)


def register_for(form: str, module: str, name: str, extensions: Extensions) -> None:
    """For the EXT forms, register (module, name) under that form's code."""
    if form.startswith("EXT"):
        extensions.add(module, name, EXT_CODES[form])


@pytest.mark.parametrize("target", TARGETS, ids=str)
@pytest.mark.parametrize("form", list(FORMS))
def test_attack_is_refused(
    form: str,
    target: Target,
    restricted: Codec,
    traces: Traces,
    extensions: Extensions,
) -> None:
    """A signed pickle reaching a dangerous global is refused as ForbiddenClass and runs nothing."""
    register_for(form, target.module, target.name, extensions)
    for protocol in PROTOCOLS:
        payload = build(form, protocol, target.module, target.name, target.args(traces))
        with pytest.raises(ForbiddenClass) as info:
            restricted.loads(restricted.seal(payload))
        assert info.value.names, (protocol, info.value)
        assert traces.untouched(), f"{form} at protocol {protocol} left a trace"


LEGIT: dict[str, tuple[str, str, tuple[Any, ...], Any]] = {
    "GLOBAL+REDUCE": ("decimal", "Decimal", ("1.5",), decimal.Decimal("1.5")),
    "INST": ("decimal", "Decimal", ("1.5",), decimal.Decimal("1.5")),
    "OBJ": ("fractions", "Fraction", (2, 6), fractions.Fraction(1, 3)),
    "STACK_GLOBAL+REDUCE": ("datetime", "date", (2024, 2, 29), datetime.date(2024, 2, 29)),
    "NEWOBJ": ("datetime", "date", (2024, 2, 29), datetime.date(2024, 2, 29)),
    "NEWOBJ_EX": (
        "datetime", "timedelta", ({"days": 1, "seconds": 2},), datetime.timedelta(1, 2)
    ),
    "EXT1": ("decimal", "Decimal", ("1.5",), decimal.Decimal("1.5")),
    "EXT2": ("datetime", "date", (2024, 2, 29), datetime.date(2024, 2, 29)),
    "EXT4": ("collections", "OrderedDict", ([("a", 1)],), collections.OrderedDict(a=1)),
}


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("form", list(LEGIT))
def test_same_opcodes_load_an_admitted_class(
    form: str, protocol: int, restricted: Codec, extensions: Extensions
) -> None:
    """The same opcode at the same protocol loads an admitted class."""
    module, name, args, expected = LEGIT[form]
    register_for(form, module, name, extensions)
    payload = build(form, protocol, module, name, args)
    loaded = restricted.loads(restricted.seal(payload))
    assert loaded == expected
    assert type(loaded) is type(expected)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_build_calls_the_setstate_of_an_admitted_class(protocol: int, restricted: Codec) -> None:
    """BUILD with an admitted class's own __setstate__ (uuid.UUID) loads, as pickle writes it."""
    asm = Asm(protocol)
    if protocol < 2:  # copyreg._reconstructor(UUID, object, None), as protocols 0 and 1 write
        asm.global_("copyreg", "_reconstructor").op(pickle.MARK).global_("uuid", "UUID")
        asm.global_("builtins", "object").op(pickle.NONE, pickle.TUPLE, pickle.REDUCE)
    else:  # UUID.__new__(UUID), as protocols 2 and up write
        asm.global_("uuid", "UUID").tuple_().op(pickle.NEWOBJ)
    payload = asm.value({"int": 5}).op(pickle.BUILD).bytes_()
    assert restricted.loads(restricted.seal(payload)) == uuid.UUID(int=5)


@pytest.mark.parametrize("target", [t for t in TARGETS if t.live], ids=str)
@pytest.mark.parametrize("form", CALLING_FORMS)
def test_attack_runs_under_full_trust(
    form: str,
    target: Target,
    trusting: Codec,
    traces: Traces,
    extensions: Extensions,
) -> None:
    """Positive control: the same signed pickle runs its payload when loaded with full trust."""
    register_for(form, target.module, target.name, extensions)
    for protocol in PROTOCOLS:
        payload = build(form, protocol, target.module, target.name, target.args(traces))
        trusting.loads(trusting.seal(payload))
        assert not traces.untouched(), f"{form} at protocol {protocol} left no trace"
        if traces.canary.is_dir():
            traces.canary.rmdir()
        else:
            traces.canary.unlink(missing_ok=True)
        traces.victim.mkdir(exist_ok=True)
        (traces.victim / "keep").write_text("keep")


@pytest.mark.parametrize("form", list(FORMS))
def test_corpus_is_well_formed(form: str, traces: Traces, extensions: Extensions) -> None:
    """Every payload of the corpus is a well-formed pickle (pickletools reads it to STOP)."""
    for target in TARGETS:
        for protocol in PROTOCOLS:
            payload = build(form, protocol, target.module, target.name, target.args(traces))
            ops = list(pickletools.genops(payload))
            assert ops[-1][0].name == "STOP"
            assert ops[-1][2] == len(payload) - 1


# -- BUILD on the globals themselves ----------------------------------------------------

@dataclass(frozen=True)
class Global:
    """A value that a pickle names as a global (GLOBAL module name)."""

    module: str
    name: str


#: (module, name, allow entries, attribute, value): BUILD on the global itself
#: would set that attribute on the class or function, for the whole process.
BUILD_ON_GLOBALS = [
    ("ipaddress", "IPv4Address", [], "__str__", Global("builtins", "bool")),
    ("ipaddress", "IPv6Network", [], "__init__", Global("builtins", "object")),
    ("uuid", "UUID", [], "__eq__", Global("builtins", "object")),
    ("uuid", "SafeUUID", [], "extra", 1),
    ("allowpkg.mod", "Point", ["allowpkg.mod.Point"], "__eq__", None),
    ("allowpkg.mod", "Point", ["allowpkg.mod.Point"], "is_admin", True),
    ("allowpkg.mod", "make_point", ["allowpkg.mod.*"], "__defaults__", (7, 8)),
    ("allowpkg.mod", "make_point", ["allowpkg.mod.*"], "__kwdefaults__", {"x": 1}),
]


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize(
    ("module", "name", "allow", "attribute", "value"),
    BUILD_ON_GLOBALS,
    ids=[f"{m}.{n}.{a}" for m, n, _, a, _ in BUILD_ON_GLOBALS],
)
def test_build_on_a_named_global_is_refused_and_undone(
    module: str,
    name: str,
    allow: list[str],
    attribute: str,
    value: Any,
    protocol: int,
    attack_ring: Keyring,
) -> None:
    """BUILD setting an attribute of an admitted class or function itself is refused and undone."""
    import importlib

    target = getattr(importlib.import_module(module), name)
    before = dict(vars(target))
    defaults = getattr(target, "__defaults__", None), getattr(target, "__kwdefaults__", None)
    codec = Codec(attack_ring, allow=allow)
    asm = Asm(protocol).global_(module, name).op(pickle.MARK, pickle.NONE, pickle.MARK)
    asm.text(attribute)
    if isinstance(value, Global):
        asm.global_(value.module, value.name)
    else:
        asm.value(value)
    payload = asm.op(pickle.DICT, pickle.TUPLE, pickle.BUILD).bytes_()
    with pytest.raises(RejectedFrame) as info:
        codec.loads(codec.seal(payload))
    if hasattr(target, "__setstate__"):  # BUILD calls it unbound, which fails
        assert type(info.value) is MalformedFrame
    else:
        assert type(info.value) is ForbiddenClass
        assert info.value.allow_entries == (None,)
    assert dict(vars(target)) == before
    after = getattr(target, "__defaults__", None), getattr(target, "__kwdefaults__", None)
    assert after == defaults


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_build_on_an_instance_of_an_admitted_class_loads(
    protocol: int, attack_ring: Keyring
) -> None:
    """BUILD on an instance (not on the class) sets its attributes, as pickle writes them."""
    from allowpkg.mod import Point

    codec = Codec(attack_ring, allow=[Point])
    asm = Asm(protocol).global_("copyreg", "_reconstructor").op(pickle.MARK)
    asm.global_("allowpkg.mod", "Point").global_("builtins", "object").op(pickle.NONE)
    asm.op(pickle.TUPLE, pickle.REDUCE).value({"x": 1, "y": 2}).op(pickle.BUILD)
    assert codec.loads(codec.seal(asm.bytes_())) == Point(1, 2)
    assert "x" not in vars(Point)


def test_build_on_an_enum_member_is_refused(restricted: Codec) -> None:
    """BUILD on a member an admitted enum returns (a shared singleton) is refused and undone."""
    member = uuid.SafeUUID.safe
    before = dict(vars(member))
    asm = Asm(2).global_("uuid", "SafeUUID").tuple_(0).op(pickle.REDUCE)
    asm.value({"_value_": 99, "_name_": "unsafe"}).op(pickle.BUILD)
    try:
        refused(restricted, asm.bytes_())
        assert dict(vars(member)) == before
    finally:
        vars(member).clear()
        vars(member).update(before)  # never leave the singleton changed for other tests


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_build_on_a_guard_is_refused(protocol: int, restricted: Codec) -> None:
    """BUILD that tries to swap a guard's check or budget fails, and the guard still checks."""
    for attribute in ("_check", "_budget", "__wrapped__"):
        asm = Asm(protocol).global_("builtins", "bytes").op(pickle.MARK, pickle.NONE, pickle.MARK)
        asm.text(attribute).global_("builtins", "list").op(pickle.DICT, pickle.TUPLE, pickle.BUILD)
        exc = refused(restricted, asm.bytes_())
        assert type(exc) is MalformedFrame
    huge = form_reduce(Asm(protocol), "builtins", "bytes", (10**12,)).bytes_()
    assert "constructor" in refused(restricted, huge).reason


# -- persistent ids ----------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_persistent_ids_are_refused(protocol: int, restricted: Codec) -> None:
    """PERSID and BINPERSID are refused as MalformedFrame; the same protocol's data loads."""
    persid = Asm(protocol).op(pickle.PERSID, b"os system\n").bytes_()
    binpersid = Asm(protocol).tuple_("os", "system").op(pickle.BINPERSID).bytes_()
    for payload in (persid, binpersid):
        with pytest.raises(MalformedFrame):
            restricted.loads(restricted.seal(payload))
    legit = Asm(protocol).value([1, "two", (3,), {"four": b"4"}]).bytes_()
    assert restricted.loads(restricted.seal(legit)) == [1, "two", (3,), {"four": b"4"}]


# -- the extension cache -----------------------------------------------------------


def test_extension_cached_by_a_plain_load_is_checked(
    restricted: Codec, traces: Traces, extensions: Extensions
) -> None:
    """An EXT code that an unrestricted load elsewhere already resolved is still refused."""
    code = EXT_CODES["EXT2"]
    extensions.add("os", "system", code)
    only_ext = Asm(2).op(ext_opcode("EXT2")).bytes_()
    assert pickle.loads(only_ext) is os.system  # fills copyreg's extension cache
    payload = build("EXT2", 2, "os", "system", (touch(traces),))
    with pytest.raises(ForbiddenClass):
        restricted.loads(restricted.seal(payload))
    assert traces.untouched()


def test_extension_admitted_by_one_codec_is_not_admitted_by_another(
    attack_ring: Keyring, extensions: Extensions
) -> None:
    """An EXT code resolved by a codec that admits its class is refused by one that does not."""
    extensions.add("collections", "ChainMap", EXT_CODES["EXT1"])
    wide = Codec(attack_ring, allow=["collections.ChainMap"])
    narrow = Codec(attack_ring)
    payload = build("EXT1", 2, "collections", "ChainMap", ())
    assert type(wide.loads(wide.seal(payload))) is collections.ChainMap
    with pytest.raises(ForbiddenClass):
        narrow.loads(narrow.seal(payload))
    assert type(wide.loads(wide.seal(payload))) is collections.ChainMap


def test_restricted_load_leaves_no_guard_in_the_extension_cache(
    restricted: Codec, extensions: Extensions
) -> None:
    """After a restricted load through EXT, a plain load of that code gets the real class."""
    extensions.add("builtins", "list", EXT_CODES["EXT1"])
    payload = build("EXT1", 2, "builtins", "list", ("ab",))
    assert restricted.loads(restricted.seal(payload)) == ["a", "b"]
    assert pickle.loads(Asm(2).op(ext_opcode("EXT1")).bytes_()) is list


# -- resource exhaustion through admitted constructors ----------------------------------


def refused(codec: Codec, payload: bytes) -> RejectedFrame:
    """Seal and load *payload*; return the RejectedFrame it raises."""
    with pytest.raises(RejectedFrame) as info:
        codec.loads(codec.seal(payload))
    return info.value


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("name", ["bytes", "bytearray"])
def test_bytes_of_a_huge_size_is_refused(name: str, protocol: int, restricted: Codec) -> None:
    """bytes(10**12) and bytearray(10**12) are refused before anything is allocated."""
    for size in (10**12, 2**40, 10**6):
        payload = form_reduce(Asm(protocol), "builtins", name, (size,)).bytes_()
        exc = refused(restricted, payload)
        assert type(exc) is MalformedFrame
        assert "constructor" in exc.reason  # the guard refused it, not a MemoryError


#: Constructors that copy their argument, and how a pickle calls them on a shared dict.
COPYING = [
    ("builtins", "set", ()),
    ("builtins", "frozenset", ()),
    ("builtins", "tuple", ()),
    ("builtins", "list", ()),
    ("builtins", "dict", ()),
    ("collections", "deque", ()),
    ("collections", "OrderedDict", ()),
    ("collections", "Counter", ()),
    ("collections", "defaultdict", (None,)),
]


def amplifier(
    protocol: int, module: str, name: str, lead: tuple[Any, ...], size: int, calls: int
) -> bytes:
    """A dict of *size* items, memoized once, copied *calls* times by module.name."""
    asm = Asm(protocol).global_(module, name).put(0).op(pickle.POP)
    asm.value({i: i for i in range(size)}).put(1).op(pickle.POP)
    for _ in range(calls):
        asm.get(0).op(pickle.MARK)
        for value in lead:
            asm.value(value)
        asm.get(1).op(pickle.TUPLE, pickle.REDUCE, pickle.POP)
    return asm.op(pickle.NONE).bytes_()


@pytest.mark.parametrize("protocol", [0, 2, 5])
@pytest.mark.parametrize(("module", "name", "lead"), COPYING, ids=lambda v: str(v))
def test_copy_amplification_is_refused(
    module: str, name: str, lead: tuple[Any, ...], protocol: int, restricted: Codec
) -> None:
    """Copying one shared dict thousands of times is refused once the copies outgrow the payload."""
    payload = amplifier(protocol, module, name, lead, size=5000, calls=5000)
    exc = refused(restricted, payload)
    assert type(exc) is MalformedFrame
    assert "amplification" in exc.reason
    modest = amplifier(protocol, module, name, lead, size=5000, calls=3)
    assert restricted.loads(restricted.seal(modest)) is None  # a few copies are paid for


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_str_of_a_shared_structure_is_refused(protocol: int, restricted: Codec) -> None:
    """str() of a list holding one shared list a thousand times is refused, not rendered."""
    asm = Asm(protocol).value(list(range(1000))).put(0).op(pickle.POP)
    asm.global_("builtins", "str").op(pickle.MARK, pickle.MARK)
    for _ in range(1000):
        asm.get(0)
    payload = asm.op(pickle.LIST, pickle.TUPLE, pickle.REDUCE).bytes_()
    exc = refused(restricted, payload)
    assert type(exc) is MalformedFrame
    assert "str" in exc.reason
    legit = form_reduce(Asm(protocol), "builtins", "str", ("text",)).bytes_()
    assert restricted.loads(restricted.seal(legit)) == "text"


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_int_of_a_huge_decimal_is_refused(protocol: int, restricted: Codec) -> None:
    """int(Decimal('1e999999999')) is refused; int('123') and Decimal('1e999999999') load."""
    asm = Asm(protocol).global_("builtins", "int").op(pickle.MARK)
    form_reduce(asm, "decimal", "Decimal", ("1e999999999",))
    exc = refused(restricted, asm.op(pickle.TUPLE, pickle.REDUCE).bytes_())
    assert type(exc) is MalformedFrame
    assert "int" in exc.reason
    for name, arg, expected in [
        ("int", "123", 123),
        ("int", 7, 7),
        ("float", "2.5", 2.5),
    ]:
        legit = form_reduce(Asm(protocol), "builtins", name, (arg,)).bytes_()
        assert restricted.loads(restricted.seal(legit)) == expected
    huge = form_reduce(Asm(protocol), "decimal", "Decimal", ("1e999999999",)).bytes_()
    assert restricted.loads(restricted.seal(huge)) == decimal.Decimal("1e999999999")


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_fraction_bombs_are_refused(protocol: int, restricted: Codec) -> None:
    """Fraction('1e999999999') and Fraction of huge ints are refused; small ones load."""
    bombs: list[tuple[Any, ...]] = [("1e999999999",), ("1E999999999",), ("1/3", "2")]
    if protocol >= 2:  # protocols 0 and 1 write integers as decimal text
        bombs += [(2**60_000 + 1, 3), (1, 3**40_000)]
    for args in bombs:
        payload = form_reduce(Asm(protocol), "fractions", "Fraction", args).bytes_()
        exc = refused(restricted, payload)
        assert type(exc) is MalformedFrame, args
        assert "Fraction" in exc.reason
    for args, expected in [
        (("1/3",), fractions.Fraction(1, 3)),
        ((3, 9), fractions.Fraction(1, 3)),
    ]:
        legit = form_reduce(Asm(protocol), "fractions", "Fraction", args).bytes_()
        assert restricted.loads(restricted.seal(legit)) == expected


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_defaultdict_factory_must_be_a_value_type(protocol: int, restricted: Codec) -> None:
    """defaultdict with a factory that is not a value type is refused; defaultdict(list) loads."""
    for module, name in [("uuid", "UUID"), ("builtins", "object"), ("collections", "defaultdict")]:
        asm = Asm(protocol).global_("collections", "defaultdict").op(pickle.MARK)
        asm.global_(module, name).op(pickle.TUPLE, pickle.REDUCE)
        exc = refused(restricted, asm.bytes_())
        assert type(exc) is MalformedFrame
        assert "factory" in exc.reason
    asm = Asm(protocol).global_("collections", "defaultdict").op(pickle.MARK)
    asm.global_("builtins", "list").op(pickle.TUPLE, pickle.REDUCE)
    loaded = restricted.loads(restricted.seal(asm.bytes_()))
    assert type(loaded) is collections.defaultdict
    assert loaded.default_factory is list


@pytest.mark.xfail(
    strict=True,
    reason="known gap: a BUILD after the constructor sets default_factory unchecked",
)
def test_defaultdict_factory_cannot_be_set_by_build(restricted: Codec) -> None:
    """A BUILD that sets default_factory of a loaded defaultdict to a non-value type is refused."""
    asm = Asm(2).global_("collections", "defaultdict").tuple_().op(pickle.REDUCE)
    asm.op(pickle.MARK, pickle.NONE, pickle.MARK).text("default_factory").global_("uuid", "UUID")
    payload = asm.op(pickle.DICT, pickle.TUPLE, pickle.BUILD).bytes_()
    refused(restricted, payload)


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_codecs_encode_is_admitted_for_latin1_only(protocol: int, restricted: Codec) -> None:
    """_codecs.encode with another codec or a non-str argument is refused; latin-1 loads."""
    for args in [("text", "utf-8"), ("text", "rot13"), ("text", "punycode"), (b"x", "hex"), ("x",)]:
        exc = refused(restricted, form_reduce(Asm(protocol), "_codecs", "encode", args).bytes_())
        assert type(exc) is MalformedFrame, args
    for spelling in ("latin1", "latin-1", "iso-8859-1"):
        legit = form_reduce(Asm(protocol), "_codecs", "encode", ("caf\u00e9", spelling)).bytes_()
        assert restricted.loads(restricted.seal(legit)) == b"caf\xe9"


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_reconstructor_is_admitted_for_plain_classes_only(protocol: int, restricted: Codec) -> None:
    """copyreg._reconstructor with a base other than object is refused; with object it loads."""
    for cls, base, state in [
        (("collections", "OrderedDict"), ("builtins", "dict"), {"a": 1}),
        (("collections", "Counter"), ("builtins", "list"), [1]),
        (("uuid", "UUID"), ("builtins", "int"), 5),
    ]:
        asm = Asm(protocol).global_("copyreg", "_reconstructor").op(pickle.MARK)
        asm.global_(*cls).global_(*base).value(state).op(pickle.TUPLE, pickle.REDUCE)
        exc = refused(restricted, asm.bytes_())
        assert type(exc) is MalformedFrame
        assert "_reconstructor" in exc.reason
    asm = Asm(protocol).global_("copyreg", "_reconstructor").op(pickle.MARK)
    asm.global_("uuid", "UUID").global_("builtins", "object").op(pickle.NONE)
    asm.op(pickle.TUPLE, pickle.REDUCE).value({"int": 9}).op(pickle.BUILD)
    assert restricted.loads(restricted.seal(asm.bytes_())) == uuid.UUID(int=9)


@pytest.mark.parametrize("protocol", [0, 2, 5])
@pytest.mark.parametrize(
    ("name", "arg", "encoding"),
    [
        ("bytes", "\u4e00" * 1000, "punycode"),
        ("bytearray", "\u4e00" * 1000, "punycode"),
        ("str", b"a" * 2000 + b"-" + b"b" * 2000, "punycode"),
        ("str", b"xn--" + b"a" * 2000, "idna"),
    ],
    ids=["bytes-punycode", "bytearray-punycode", "str-punycode", "str-idna"],
)
def test_codecs_with_superlinear_cost_are_refused(
    name: str, arg: Any, encoding: str, protocol: int, restricted: Codec
) -> None:
    """bytes(), bytearray() and str() refuse codecs whose cost grows faster than the input."""
    payload = form_reduce(Asm(protocol), "builtins", name, (arg, encoding)).bytes_()
    exc = refused(restricted, payload)
    assert type(exc) is MalformedFrame


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_linear_codecs_still_load(protocol: int, restricted: Codec) -> None:
    """bytes(), bytearray() and str() with latin-1, utf-8 or ascii load."""
    for name, args, expected in [
        ("bytes", ("caf\u00e9", "latin-1"), b"caf\xe9"),
        ("bytes", ("caf\u00e9", "utf-8"), b"caf\xc3\xa9"),
        ("bytearray", ("caf\u00e9", "latin-1"), bytearray(b"caf\xe9")),
        ("str", (b"caf\xc3\xa9", "utf-8"), "caf\u00e9"),
        ("str", (b"plain", "ascii"), "plain"),
        ("str", (b"caf\xe9", "iso-8859-1"), "caf\u00e9"),
    ]:
        legit = form_reduce(Asm(protocol), "builtins", name, args).bytes_()
        assert restricted.loads(restricted.seal(legit)) == expected


# -- legitimate large data ------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_large_legitimate_data_loads(protocol: int, attack_ring: Keyring) -> None:
    """Large ordinary data (1 MiB of bytes, sets of 100k ints, ...) loads at every protocol."""
    codec = Codec(attack_ring, protocol=protocol)
    blob = os.urandom(1 << 20)
    shared = list(range(1000))
    values = [
        blob,
        bytearray(blob),
        set(range(100_000)),
        frozenset(range(100_000)),
        list(range(100_000)),
        {i: str(i) for i in range(100_000)},
        collections.deque(range(100_000)),
        [shared] * 1000,  # shared references are not copied, so not charged
        "\u00e9" * (1 << 20),
    ]
    for value in values:
        loaded = codec.loads(codec.dumps(value))
        assert loaded == value
        assert type(loaded) is type(value)
