"""
Allowlist policy: which globals a verified pickle may name.

Uses the package ``tests/allowpkg`` (imported as ``allowpkg``; see its
docstring for why that import works in this process and in spawned children).
Frames are sealed with a valid key throughout, so that the policy, not the
signature, decides.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import pickle
import subprocess
import warnings
from typing import Any

import pytest

import allowpkg.mod
import allowpkg.mod.sub
import allowpkg.mod_evil
import allowpkg.other
from allowpkg.mod import Outer, Point, Stateful, make_point
from signedqueue import (
    Codec,
    ForbiddenClass,
    InvalidSignature,
    Keyring,
    MalformedFrame,
    SignedQueue,
)

WAIT = 60.0


def global_value(module: str, name: str) -> bytes:
    """A protocol 4 pickle whose value is the global itself (GLOBAL, nothing called)."""
    return b"\x80\x04c" + module.encode() + b"\n" + name.encode() + b"\n."


def global_call(module: str, name: str, *args: int) -> bytes:
    """A protocol 4 pickle that calls the global with small integer arguments (REDUCE)."""
    body = b"".join(b"K" + bytes([a]) for a in args)
    return b"\x80\x04c" + module.encode() + b"\n" + name.encode() + b"\n(" + body + b"tR."


def refusal(codec: Codec, payload: bytes) -> ForbiddenClass:
    """Seal *payload* with the codec's key and return the ForbiddenClass its load raises."""
    with pytest.raises(ForbiddenClass) as info:
        codec.loads(codec.seal(payload))
    return info.value


# -- exact entries -------------------------------------------------------------


@pytest.mark.parametrize("entry", ["allowpkg.mod.Point", Point], ids=["string", "class"])
def test_exact_entry_admits_exactly_that_class(ring: Keyring, entry: Any) -> None:
    """An exact entry, as a string or a class object, admits that class and nothing beside it."""
    codec = Codec(ring, allow=[entry])
    assert codec.loads(codec.dumps(Point(1, 2))) == Point(1, 2)
    others = (Stateful(1), Outer.Inner(1), allowpkg.mod.sub.SubThing(), allowpkg.mod_evil.Point())
    for other in others:
        with pytest.raises(ForbiddenClass):
            codec.loads(codec.dumps(other))
    for name in ("make_point", "Outer", "Pointer", "json"):
        assert refusal(codec, global_value("allowpkg.mod", name)).names == (f"allowpkg.mod.{name}",)


@pytest.mark.parametrize(
    "entry", ["allowpkg.mod.make_point", make_point], ids=["string", "function"]
)
def test_exact_entry_admits_a_function(ring: Keyring, entry: Any) -> None:
    """An exact entry for a function, as a string or the function itself, lets a pickle call it."""
    codec = Codec(ring, allow=[entry, Point])
    assert codec.loads(codec.seal(global_call("allowpkg.mod", "make_point", 3, 4))) == Point(3, 4)


def test_without_entries_user_classes_are_refused_and_defaults_load(ring: Keyring) -> None:
    """allow=None refuses a user class and admits the built-in value types."""
    codec = Codec(ring)
    with pytest.raises(ForbiddenClass):
        codec.loads(codec.dumps(Point(1, 2)))
    import collections
    import datetime
    import decimal
    import fractions
    import ipaddress
    import uuid

    value = {
        "when": datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc),
        "amount": decimal.Decimal("9.99"),
        "ratio": fractions.Fraction(2, 3),
        "id": uuid.UUID(int=5),
        "net": ipaddress.ip_network("10.0.0.0/8"),
        "order": collections.OrderedDict(a=1),
        "counts": collections.Counter("aab"),
        "groups": collections.defaultdict(list, {"k": [1]}),
        "ring": collections.deque([1, 2], maxlen=5),
        "misc": (b"b", bytearray(b"a"), frozenset({1}), {2}, complex(1, 2), slice(1, 2)),
    }
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        proto_codec = Codec(ring, protocol=protocol)
        assert proto_codec.loads(proto_codec.dumps(value)) == value


def test_exact_entry_does_not_cover_a_longer_module_name(ring: Keyring) -> None:
    """'allowpkg.mod.Point' admits neither allowpkg.mod_evil.Point nor allowpkg.mod.sub.Point."""
    codec = Codec(ring, allow=["allowpkg.mod.Point"])
    assert refusal(codec, global_value("allowpkg.mod_evil", "Point")).allow_entries == (
        "allowpkg.mod_evil.Point",
    )
    assert refusal(codec, global_value("allowpkg.mod.sub", "Point")).names == (
        "allowpkg.mod.sub.Point",
    )


def test_module_entry_admits_no_module_and_nothing_in_it(ring: Keyring) -> None:
    """An entry naming a module admits neither the module nor anything in or beside it."""
    codec = Codec(ring, allow=["allowpkg.mod"])
    exc = refusal(codec, global_value("allowpkg", "mod"))
    assert "module" in exc.reason
    assert exc.allow_entries == (None,)
    refusal(codec, global_value("allowpkg.mod", "Point"))
    refusal(codec, global_value("allowpkg.mod_evil", "Evil"))


# -- nested classes ----------------------------------------------------------------


@pytest.mark.parametrize(
    "entry", ["allowpkg.mod:Outer.Inner", Outer.Inner], ids=["string", "class"]
)
def test_nested_entry_admits_the_nested_class(ring: Keyring, entry: Any) -> None:
    """'pkg.mod:Outer.Inner' (or the class object) admits the nested class at protocols 4 and 5."""
    for protocol in (4, 5):
        codec = Codec(ring, allow=[entry], protocol=protocol)
        assert codec.loads(codec.dumps(Outer.Inner("x"))) == Outer.Inner("x")
        with pytest.raises(ForbiddenClass):
            codec.loads(codec.dumps(Outer()))  # the outer class is not admitted


def test_nested_class_is_refused_without_its_own_entry(ring: Keyring) -> None:
    """Admitting Outer does not admit Outer.Inner; the refusal names the nested entry."""
    codec = Codec(ring, allow=[Outer])
    frame = codec.dumps(Outer.Inner(1))
    with pytest.raises(ForbiddenClass) as info:
        codec.loads(frame)
    assert info.value.allow_entries == ("allowpkg.mod:Outer.Inner",)
    assert Codec(ring, allow=[Outer, "allowpkg.mod:Outer.Inner"]).loads(frame) == Outer.Inner(1)


def test_wildcard_does_not_admit_a_nested_class(ring: Keyring) -> None:
    """A wildcard refuses a dotted name as walking attributes, and names the exact nested entry."""
    codec = Codec(ring, allow=["allowpkg.mod.*"])
    frame = codec.dumps(Outer.Inner(1))
    with pytest.raises(ForbiddenClass) as info:
        codec.loads(frame)
    assert "walks attributes" in info.value.reason
    assert info.value.allow_entries == ("allowpkg.mod:Outer.Inner",)
    both = Codec(ring, allow=["allowpkg.mod.*", "allowpkg.mod:Outer.Inner"])
    assert both.loads(frame) == Outer.Inner(1)


@pytest.mark.parametrize("name", ["Outer.alias", "Outer.method"])
def test_nested_entry_must_resolve_to_that_nested_class(ring: Keyring, name: str) -> None:
    """A nested entry that resolves to something else (an alias, a method) is refused at load."""
    codec = Codec(ring, allow=[f"allowpkg.mod:{name}"])
    exc = refusal(codec, global_value("allowpkg.mod", name))
    assert "walks attributes" in exc.reason
    assert exc.allow_entries == (None,)


@pytest.mark.parametrize(
    "name", ["Point.__init__.__globals__", "Point.__init__", "__builtins__", "Outer.__dict__"]
)
def test_dunder_walks_are_refused_even_under_a_wildcard(ring: Keyring, name: str) -> None:
    """A name with a dunder part is refused even under a wildcard, and no entry can admit it."""
    exc = refusal(Codec(ring, allow=["allowpkg.mod.*"]), global_value("allowpkg.mod", name))
    assert exc.allow_entries == (None,)
    with pytest.raises(ValueError, match="refused"):
        Codec(ring, allow=[f"allowpkg.mod:{name}"])


@pytest.mark.parametrize("protocol", [0, 1, 2, 3])
def test_nested_class_at_old_protocols_goes_through_getattr(ring: Keyring, protocol: int) -> None:
    """Protocols 0 to 3 name a nested class through builtins.getattr, which no entry admits."""
    codec = Codec(ring, allow=["allowpkg.mod:Outer.Inner", Outer], protocol=protocol)
    with pytest.raises(ForbiddenClass) as info:
        codec.loads(codec.dumps(Outer.Inner(1)))
    assert info.value.names == ("builtins.getattr",)
    assert info.value.allow_entries == (None,)


# -- wildcards ---------------------------------------------------------------------


def test_wildcard_admits_classes_and_functions_defined_in_the_module(ring: Keyring) -> None:
    """'allowpkg.mod.*' admits the classes and functions allowpkg.mod defines."""
    codec = Codec(ring, allow=["allowpkg.mod.*"])
    value = [Point(1, 2), Stateful("s"), Outer()]
    loaded = codec.loads(codec.dumps(value))
    assert loaded[:2] == value[:2]
    assert loaded[1].restored
    assert type(loaded[2]) is Outer
    assert codec.loads(codec.seal(global_call("allowpkg.mod", "make_point", 5, 6))) == Point(5, 6)


def test_wildcard_does_not_admit_a_submodule(ring: Keyring) -> None:
    """'allowpkg.mod.*' refuses a class of the submodule, the submodule, and a walk into it."""
    codec = Codec(ring, allow=["allowpkg.mod.*"])
    frame = codec.dumps(allowpkg.mod.sub.SubThing(1))
    with pytest.raises(ForbiddenClass) as info:
        codec.loads(frame)
    assert info.value.allow_entries == ("allowpkg.mod.sub.SubThing",)
    assert type(Codec(ring, allow=["allowpkg.mod.sub.SubThing"]).loads(frame)) is (
        allowpkg.mod.sub.SubThing
    )
    assert "module" in refusal(codec, global_value("allowpkg.mod", "sub")).reason
    assert "walks attributes" in refusal(codec, global_value("allowpkg.mod", "sub.SubThing")).reason


def test_package_wildcard_does_not_admit_its_modules(ring: Keyring) -> None:
    """'allowpkg.*' admits nothing from allowpkg.mod, nor the module itself."""
    codec = Codec(ring, allow=["allowpkg.*"])
    with pytest.raises(ForbiddenClass):
        codec.loads(codec.dumps(Point(1, 2)))
    refusal(codec, global_value("allowpkg", "mod"))


def test_wildcard_does_not_admit_an_imported_module(ring: Keyring) -> None:
    """'allowpkg.mod.*' refuses allowpkg.mod.json, a module allowpkg.mod imports."""
    exc = refusal(Codec(ring, allow=["allowpkg.mod.*"]), global_value("allowpkg.mod", "json"))
    assert "module" in exc.reason
    assert exc.allow_entries == (None,)


def test_wildcard_does_not_admit_an_imported_class(ring: Keyring) -> None:
    """'allowpkg.mod.*' refuses a class it imports; the hint admits exactly that frame."""
    codec = Codec(ring, allow=["allowpkg.mod.*"])
    payload = global_value("allowpkg.mod", "Foreign")
    exc = refusal(codec, payload)
    assert "not defined in allowpkg.mod" in exc.reason
    assert "it is allowpkg.other.Foreign" in exc.reason
    assert exc.allow_entries == ("allowpkg.mod.Foreign",)
    assert "allow=['allowpkg.mod.Foreign']" in str(exc)
    exact = Codec(ring, allow=["allowpkg.mod.*", "allowpkg.mod.Foreign"])
    assert exact.loads(exact.seal(payload)) is allowpkg.other.Foreign
    # What a producer sends names the defining module, which its entry admits.
    frame = codec.dumps(allowpkg.other.Foreign(1))
    both = Codec(ring, allow=["allowpkg.mod.*", "allowpkg.other.Foreign"])
    assert both.loads(frame) == allowpkg.other.Foreign(1)


def test_dangerous_alias_in_a_wildcard_module_is_refused(ring: Keyring) -> None:
    """allowpkg.mod.run (os.system renamed) is refused at load, by wildcard or exact entry."""
    assert allowpkg.mod.run is os.system
    for allow in (["allowpkg.mod.*"], ["allowpkg.mod.run"]):
        codec = Codec(ring, allow=allow)  # the entry's text looks harmless
        for payload in (global_value("allowpkg.mod", "run"), global_call("allowpkg.mod", "run")):
            exc = refusal(codec, payload)
            assert "refused even when allowlisted" in exc.reason
            assert exc.allow_entries == (None,)


def test_wildcard_does_not_cover_a_module_with_a_longer_name(ring: Keyring) -> None:
    """'allowpkg.mod.*' refuses allowpkg.mod_evil.Evil and allowpkg.mod_evil.Point."""
    codec = Codec(ring, allow=["allowpkg.mod.*"])
    for cls in (allowpkg.mod_evil.Evil, allowpkg.mod_evil.Point):
        with pytest.raises(ForbiddenClass) as info:
            codec.loads(codec.dumps(cls()))
        assert info.value.names == (f"allowpkg.mod_evil.{cls.__name__}",)


# -- names refused even when allowlisted ---------------------------------------


@pytest.mark.parametrize(
    "entry",
    [
        "os.system",
        "os.path.join",
        "posix.system",
        "builtins.eval",
        "builtins.exec",
        "builtins.getattr",
        "builtins.open",
        "builtins.__import__",
        "functools.partial",
        "operator.attrgetter",
        "subprocess.Popen",
        "pickle.loads",
        "importlib.import_module",
        "allowpkg.mod:Point.__reduce__",
    ],
)
def test_dangerous_exact_entry_raises_at_construction(ring: Keyring, entry: str) -> None:
    """A dangerous exact entry raises ValueError at construction, naming the unsafe option."""
    with pytest.raises(ValueError) as info:
        Codec(ring, allow=[entry])
    message = str(info.value)
    assert repr(entry) in message
    assert f"unsafe_allow_dangerous=[{entry!r}]" in message


@pytest.mark.parametrize(
    "entry", ["os.*", "builtins.*", "subprocess.*", "os.path.*", "importlib.*", "functools.*"]
)
def test_dangerous_wildcard_raises_at_construction(ring: Keyring, entry: str) -> None:
    """A wildcard over builtins or a dangerous module raises ValueError when the codec is built."""
    with pytest.raises(ValueError, match=repr(entry).replace(".", r"\.").replace("*", r"\*")):
        Codec(ring, allow=[entry])
    with pytest.raises(ValueError):
        SignedQueue(ring, allow=[entry])


@pytest.mark.parametrize(
    "entry", [os.system, functools.partial, subprocess.Popen, eval, getattr, pickle.loads]
)
def test_dangerous_object_entry_raises_at_construction(ring: Keyring, entry: Any) -> None:
    """A dangerous class or function given as an object raises ValueError at construction."""
    with pytest.raises(ValueError, match="unsafe_allow_dangerous"):
        Codec(ring, allow=[entry])


@pytest.mark.parametrize(
    ("entry", "error"),
    [
        ("not a name", ValueError),
        ("pkg.", ValueError),
        ("pkg.mod:", ValueError),
        ("", ValueError),
        (42, TypeError),
        (lambda: None, ValueError),
    ],
    ids=["space", "trailing-dot", "empty-qualname", "empty", "int", "lambda"],
)
def test_malformed_entry_raises_at_construction(ring: Keyring, entry: Any, error: type) -> None:
    """A malformed entry raises ValueError, a non-entry object TypeError, at construction."""
    with pytest.raises(error):
        Codec(ring, allow=[entry])


# -- unsafe options ------------------------------------------------------------------


def test_unsafe_allow_dangerous_admits_exactly_the_named_global(
    ring: Keyring, caplog: pytest.LogCaptureFixture
) -> None:
    """unsafe_allow_dangerous=['functools.partial'] admits partial and no other dangerous name."""
    with caplog.at_level(logging.WARNING, logger="signedqueue"):
        codec = Codec(ring, unsafe_allow_dangerous=["functools.partial"])
    assert "functools.partial" in caplog.text
    loaded = codec.loads(codec.dumps(functools.partial(int, "7")))
    assert type(loaded) is functools.partial
    assert loaded() == 7
    for module, name in [
        ("functools", "reduce"),
        ("functools", "partialmethod"),
        ("operator", "attrgetter"),
        ("os", "system"),
        ("builtins", "eval"),
    ]:
        assert refusal(codec, global_value(module, name)).allow_entries == (None,)


def test_unsafe_allow_dangerous_names_one_spelling(ring: Keyring) -> None:
    """unsafe_allow_dangerous=['os.system'] admits os.system by that name, not as posix.system."""
    codec = Codec(ring, unsafe_allow_dangerous=["os.system"])
    assert codec.loads(codec.seal(global_value("os", "system"))) is os.system
    refusal(codec, global_value("posix", "system"))
    refusal(codec, global_value("os", "popen"))


def test_unsafe_allow_dangerous_takes_no_wildcard(ring: Keyring) -> None:
    """unsafe_allow_dangerous=['os.*'] raises ValueError."""
    with pytest.raises(ValueError, match="wildcard"):
        Codec(ring, unsafe_allow_dangerous=["os.*"])


def test_dangerous_entry_is_accepted_beside_its_unsafe_twin(ring: Keyring) -> None:
    """allow= may repeat a name that unsafe_allow_dangerous forces; it is admitted."""
    codec = Codec(
        ring, allow=["functools.partial"], unsafe_allow_dangerous=["functools.partial"]
    )
    assert codec.loads(codec.seal(global_value("functools", "partial"))) is functools.partial


def test_trust_signed_frames_loads_anything_signed(
    ring: Keyring, caplog: pytest.LogCaptureFixture
) -> None:
    """unsafe_trust_signed_frames=True loads unlisted globals and calls; tags still count."""
    call_getpid = b"\x80\x04cos\ngetpid\n)R."
    restricted = Codec(ring)
    assert refusal(restricted, call_getpid).names == ("os.getpid",)
    with caplog.at_level(logging.WARNING, logger="signedqueue"):
        trusting = Codec(ring, unsafe_trust_signed_frames=True)
    assert "unsafe_trust_signed_frames" in caplog.text
    assert trusting.loads(trusting.seal(call_getpid)) == os.getpid()
    assert trusting.loads(trusting.dumps(Point(1, 2))) == Point(1, 2)
    tampered = bytearray(trusting.dumps(Point(1, 2)))
    tampered[-1] ^= 1
    with pytest.raises(InvalidSignature):
        trusting.loads(bytes(tampered))


@pytest.mark.parametrize(
    "options",
    [{"allow": ["allowpkg.mod.Point"]}, {"unsafe_allow_dangerous": ["functools.partial"]}],
    ids=["allow", "unsafe_allow_dangerous"],
)
def test_trust_signed_frames_refuses_an_allowlist(ring: Keyring, options: dict[str, Any]) -> None:
    """unsafe_trust_signed_frames=True with allow= or unsafe_allow_dangerous= raises ValueError."""
    with pytest.raises(ValueError, match="unsafe_trust_signed_frames"):
        Codec(ring, unsafe_trust_signed_frames=True, **options)


def test_cloudpickle_requires_trust(ring: Keyring) -> None:
    """serializer='cloudpickle' needs unsafe_trust_signed_frames=True, and then carries code."""
    pytest.importorskip("cloudpickle")
    with pytest.raises(ValueError, match="unsafe_trust_signed_frames"):
        Codec(ring, serializer="cloudpickle")
    codec = Codec(ring, serializer="cloudpickle", unsafe_trust_signed_frames=True)
    offset = 10
    assert codec.loads(codec.dumps(lambda x: x + offset))(5) == 15
    with pytest.raises(MalformedFrame):
        Codec(ring).loads(codec.dumps(lambda: None))  # a pickle codec reads no cloudpickle frame


# -- ForbiddenClass names the entry that admits the class -------------------------------


@pytest.mark.parametrize(
    ("value", "entry"),
    [
        (Point(1, 2), "allowpkg.mod.Point"),
        (Stateful("s"), "allowpkg.mod.Stateful"),
        (Outer.Inner(3), "allowpkg.mod:Outer.Inner"),
        (allowpkg.mod.sub.SubThing(4), "allowpkg.mod.sub.SubThing"),
        (allowpkg.mod_evil.Evil(), "allowpkg.mod_evil.Evil"),
        (allowpkg.other.Foreign(5), "allowpkg.other.Foreign"),
    ],
    ids=["class", "setstate", "nested", "submodule", "prefix-module", "imported-elsewhere"],
)
def test_refusal_names_the_entry_that_admits_the_class(
    ring: Keyring, value: Any, entry: str
) -> None:
    """ForbiddenClass names the exact allow= entry; adding it makes the same frame load."""
    frame = Codec(ring).dumps(value)
    with pytest.raises(ForbiddenClass) as info:
        Codec(ring).loads(frame)
    assert info.value.allow_entries == (entry,)
    assert info.value.names == (entry,)
    assert f"allow=[{entry!r}]" in str(info.value)
    loaded = Codec(ring, allow=[entry]).loads(frame)
    assert type(loaded) is type(value)
    assert {key: vars(loaded)[key] for key in vars(value)} == vars(value)


def test_refusal_of_a_dangerous_name_suggests_no_entry(ring: Keyring) -> None:
    """A global refused even when allowlisted gets allow_entries (None,) and no hint."""
    exc = refusal(Codec(ring), global_call("os", "system"))
    assert exc.names == ("os.system",)
    assert exc.allow_entries == (None,)
    assert "to admit it" not in str(exc)


# -- the test package in child processes --------------------------------------------------


def _echo(q: SignedQueue) -> None:
    """Child: get one item and put it back."""
    q.put(q.get(timeout=WAIT))


def test_allowlisted_classes_load_in_child_processes(
    mp_context: multiprocessing.context.BaseContext, ring: Keyring
) -> None:
    """A child process, under each start method, imports allowpkg and loads its classes."""
    q = SignedQueue(ring, ctx=mp_context, allow=["allowpkg.mod.*", "allowpkg.mod:Outer.Inner"])
    child = mp_context.Process(target=_echo, args=(q,))
    with warnings.catch_warnings():
        # Python 3.12+ warns about forking while other tests' threads run.
        warnings.filterwarnings("ignore", ".*fork.*", DeprecationWarning)
        child.start()
    try:
        q.put([Point(1, 2), Outer.Inner("n")])
        child.join(WAIT)
        assert child.exitcode == 0
        assert q.get(timeout=WAIT) == [Point(1, 2), Outer.Inner("n")]
    finally:
        if child.is_alive():
            child.kill()
        q.cancel_join_thread()
        q.close()
