"""
Allowlist objects, presets, TOML configuration, audit mode, and refusals that
list every forbidden global of a frame at once.

Frames are sealed with a valid key throughout, so that the policy, not the
signature, decides.  Classes come from the test package ``tests/allowpkg``.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import pytest

import allowpkg.mod
import allowpkg.other
from allowpkg.mod import Outer, Point, make_point
from allowpkg.other import Foreign
from signedqueue import (
    PRESETS,
    Allowlist,
    AuditModeWarning,
    AuditReport,
    Codec,
    Config,
    ConfigError,
    ExpiredFrame,
    ForbiddenClass,
    InvalidSignature,
    Keyring,
    RejectedFrame,
    SignedQueue,
    load_config,
)

WAIT = 60.0


def global_call(module: str, name: str, *args: Any) -> bytes:
    """A protocol 2 pickle calling ``module.name(*args)`` (GLOBAL, args, REDUCE)."""
    body = pickle.dumps(args, protocol=2)[2:-1]  # the args tuple, without PROTO and STOP
    return b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n" + body + b"R."


def audit_codec(ring: Keyring, **options: Any) -> Codec:
    """A codec in audit mode, with its AuditModeWarning checked and consumed."""
    with pytest.warns(AuditModeWarning, match="AUDIT MODE"):
        return Codec(ring, unsafe_audit=True, **options)


# -- Allowlist objects ----------------------------------------------------------------


def test_allowlist_default_is_the_stdlib_preset() -> None:
    """Allowlist() holds the stdlib preset and no entries."""
    allow = Allowlist()
    assert allow.presets == ("stdlib",)
    assert allow.entries == ()
    assert allow.preset_globals() == PRESETS["stdlib"]


def test_allowlist_union_merges_entries_and_presets() -> None:
    """`|` unions presets and entries, sorted and without duplicates."""
    a = Allowlist(["allowpkg.mod.Point", "allowpkg.mod.*"])
    b = Allowlist.preset("numpy") | Allowlist(["allowpkg.mod.Point"], presets=())
    both = a | b
    assert both.presets == ("numpy", "stdlib")
    assert both.entries == ("allowpkg.mod.*", "allowpkg.mod.Point")
    assert a | b == b | a


def test_allowlist_union_with_other_types_is_refused() -> None:
    """`|` with a list raises TypeError rather than guessing."""
    with pytest.raises(TypeError):
        Allowlist() | ["allowpkg.mod.Point"]  # type: ignore[operator]


def test_allowlist_equality_and_hash_ignore_order_and_spelling() -> None:
    """Equal allowlists compare and hash equal; different ones do not."""
    a = Allowlist(["allowpkg.mod.Point", "allowpkg.mod:Outer.Inner"])
    b = Allowlist([Outer.Inner, Point])
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b}) == 1
    assert a != Allowlist(["allowpkg.mod.Point"])
    assert a != Allowlist(["allowpkg.mod.Point", "allowpkg.mod:Outer.Inner"], presets=())
    assert a != ["allowpkg.mod.Point", "allowpkg.mod:Outer.Inner"]


def test_allowlist_preset_holds_only_the_named_presets() -> None:
    """Allowlist.preset('numpy') drops the stdlib preset unless named."""
    assert Allowlist.preset("numpy").presets == ("numpy",)
    assert Allowlist.preset("numpy", "stdlib").presets == ("numpy", "stdlib")
    assert Allowlist.preset().presets == ()


@pytest.mark.parametrize("name", ["nunpy", "STDLIB", "", "stdlib "])
def test_unknown_preset_is_refused_by_name(name: str) -> None:
    """An unknown preset raises ValueError naming it and the known presets."""
    with pytest.raises(ValueError, match="unknown preset") as info:
        Allowlist(presets=[name])
    assert repr(name) in str(info.value)
    for known in PRESETS:
        assert known in str(info.value)


def test_every_preset_is_constructible_and_parses() -> None:
    """Each preset builds an Allowlist and names only valid exact globals."""
    for name, names in PRESETS.items():
        allow = Allowlist.preset(name)
        assert allow.preset_globals() == names
        Allowlist(sorted(names), presets=())  # every name is a valid exact entry
        assert all("*" not in n for n in names)


def test_entries_are_normalized() -> None:
    """Class and function objects become their exact entry text; wildcards keep `.*`."""
    allow = Allowlist([Point, Outer.Inner, make_point, "allowpkg.mod.*", Foreign])
    assert allow.entries == (
        "allowpkg.mod.*",
        "allowpkg.mod.Point",
        "allowpkg.mod.make_point",
        "allowpkg.mod:Outer.Inner",
        "allowpkg.other.Foreign",
    )


@pytest.mark.parametrize(
    "entry",
    ["", "allowpkg", "allowpkg.mod.", ".Point", "allowpkg.mod:", "a b.c", "allowpkg.mod.**"],
)
def test_invalid_entry_text_is_refused(entry: str) -> None:
    """Malformed entry text raises ValueError naming the entry."""
    with pytest.raises(ValueError, match="invalid allow entry"):
        Allowlist([entry])


def test_unnameable_objects_are_refused_as_entries() -> None:
    """Lambdas, local classes and plain values are not entries."""

    class Local:
        pass

    with pytest.raises(ValueError, match="lambda"):
        Allowlist([lambda: None])
    with pytest.raises(ValueError, match="module level"):
        Allowlist([Local])
    with pytest.raises(TypeError, match="strings, classes or functions"):
        Allowlist([42])


def test_allowlist_is_immutable() -> None:
    """Attributes of an Allowlist cannot be reassigned or added."""
    allow = Allowlist(["allowpkg.mod.Point"])
    with pytest.raises(AttributeError):
        allow.extra = 1  # type: ignore[attr-defined]


def test_allowlist_pickles_by_value() -> None:
    """An Allowlist round-trips through plain pickle."""
    allow = Allowlist(["allowpkg.mod.*", Outer.Inner], presets=["numpy", "stdlib"])
    assert pickle.loads(pickle.dumps(allow)) == allow


def test_codec_accepts_a_list_or_an_allowlist_alike(ring: Keyring) -> None:
    """allow=[...] means Allowlist([...]): the same frames load either way."""
    for allow in (["allowpkg.mod.Point"], Allowlist(["allowpkg.mod.Point"])):
        codec = Codec(ring, allow=allow)
        assert codec.loads(codec.dumps([Point(1, 2), {"k": 1.5}])) == [Point(1, 2), {"k": 1.5}]
        with pytest.raises(ForbiddenClass):
            codec.loads(codec.dumps(Foreign(1)))


def test_preset_without_stdlib_refuses_stdlib_types(ring: Keyring) -> None:
    """Allowlist.preset('numpy') without stdlib refuses datetime, which stdlib admits."""
    import datetime

    value = datetime.date(2024, 1, 2)
    narrow = Codec(ring, allow=Allowlist.preset("numpy"))
    wide = Codec(ring, allow=Allowlist.preset("numpy", "stdlib"))
    assert wide.loads(wide.dumps(value)) == value
    with pytest.raises(ForbiddenClass, match=r"datetime\.date"):
        narrow.loads(narrow.dumps(value))


def test_to_toml_round_trips_through_load_config(tmp_path: Path) -> None:
    """to_toml() written to pyproject.toml loads back as an equal Allowlist."""
    allow = Allowlist(
        ["allowpkg.mod.*", Outer.Inner, "allowpkg.other.Foreign"], presets=["numpy", "stdlib"]
    )
    path = tmp_path / "pyproject.toml"
    path.write_text("[project]\nname = 'x'\n\n" + allow.to_toml())
    assert load_config(path).allow == allow
    empty = Allowlist.preset()
    path.write_text(empty.to_toml())
    assert load_config(path).allow == empty


def _allowlist_child(q: SignedQueue, back: SignedQueue, allow: Allowlist) -> None:
    """Child: put back whether its allowlist arrived equal, then echo one item."""
    back.put(q._codec._options["allow"] == allow)
    back.put(q.get(timeout=WAIT))


def test_allowlist_crosses_spawn_with_a_signed_queue(ring: Keyring) -> None:
    """A spawned child rebuilds the queue's Allowlist and admits, and refuses, the same."""
    ctx = multiprocessing.get_context("spawn")
    allow = Allowlist(["allowpkg.mod.Point", Outer.Inner])
    q = SignedQueue(ring, ctx=ctx, allow=allow)
    # Replies come on their own queue: on one queue, the parent's get() could
    # take the item meant for the child (waiting consumers hold no lock).
    back = SignedQueue(ring, ctx=ctx, allow=allow)
    child = ctx.Process(target=_allowlist_child, args=(q, back, allow))
    child.start()
    try:
        assert back.get(timeout=WAIT) is True
        q.put([Point(3, 4), Outer.Inner(5)])
        assert back.get(timeout=WAIT) == [Point(3, 4), Outer.Inner(5)]
        child.join(WAIT)
        assert child.exitcode == 0
    finally:
        if child.is_alive():
            child.kill()
        q.cancel_join_thread()
        q.close()


# -- configuration ----------------------------------------------------------------------


def test_pyproject_table_is_read(tmp_path: Path) -> None:
    """[tool.signedqueue] in pyproject.toml gives presets, allow, max_age, max_frame_size."""
    path = tmp_path / "pyproject.toml"
    path.write_text(
        "[project]\nname = 'x'\n\n[tool.other]\nallow = 1\n\n[tool.signedqueue]\n"
        'presets = ["stdlib", "numpy"]\nallow = ["allowpkg.mod.*"]\n'
        "max_age = 30\nmax_frame_size = 4096\n"
    )
    config = load_config(path)
    assert config == Config(
        allow=Allowlist(["allowpkg.mod.*"], presets=["numpy", "stdlib"]),
        max_age=30.0,
        max_frame_size=4096,
    )
    assert config.codec_options() == {
        "allow": config.allow, "max_age": 30.0, "max_frame_size": 4096,
    }


def test_pyproject_in_the_current_directory_is_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """load_config() with no argument reads ./pyproject.toml."""
    (tmp_path / "pyproject.toml").write_text('[tool.signedqueue]\nallow = ["allowpkg.mod.Point"]\n')
    monkeypatch.chdir(tmp_path)
    assert load_config().allow == Allowlist(["allowpkg.mod.Point"])


def test_standalone_toml_uses_its_top_level(tmp_path: Path) -> None:
    """Any file not named pyproject.toml is read from its top level."""
    path = tmp_path / "signedqueue.toml"
    path.write_text('allow = ["allowpkg.mod.Point"]\n')
    config = load_config(path)
    assert config.allow == Allowlist(["allowpkg.mod.Point"])
    assert config.codec_options() == {"allow": config.allow}
    path.write_text("")
    assert load_config(path).allow == Allowlist()
    path.write_text('[tool.signedqueue]\nallow = ["allowpkg.mod.Point"]\n')
    with pytest.raises(ConfigError, match="'tool'"):
        load_config(path)


@pytest.mark.parametrize("key", ["alow", "allow_dangerous", "unsafe_audit", "Presets"])
def test_unknown_keys_are_refused_by_name(tmp_path: Path, key: str) -> None:
    """A typo or an unsupported key is named in the ConfigError, with the known keys."""
    path = tmp_path / "pyproject.toml"
    path.write_text(f'[tool.signedqueue]\nallow = []\n{key} = ["x.y"]\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert repr(key) in message
    assert "allow, presets, max_age, max_frame_size" in message


def test_several_unknown_keys_are_all_named(tmp_path: Path) -> None:
    """Every unknown key appears in one error."""
    path = tmp_path / "conf.toml"
    path.write_text("alow = []\nmax_ag = 1\n")
    with pytest.raises(ConfigError, match="unknown keys 'alow', 'max_ag'"):
        load_config(path)


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ('allow = "allowpkg.mod.*"', "allow"),
        ("allow = [1]", "allow"),
        ('presets = "numpy"', "presets"),
        ("presets = [true]", "presets"),
        ('max_age = "30"', "max_age"),
        ("max_age = 0", "max_age"),
        ("max_age = -1.5", "max_age"),
        ("max_age = true", "max_age"),
        ("max_frame_size = 4096.0", "max_frame_size"),
        ("max_frame_size = 10", "max_frame_size"),
        ("max_frame_size = false", "max_frame_size"),
    ],
)
def test_wrong_types_are_refused(tmp_path: Path, body: str, key: str) -> None:
    """A value of the wrong type or range raises ConfigError naming its key."""
    path = tmp_path / "conf.toml"
    path.write_text(body + "\n")
    with pytest.raises(ConfigError, match=repr(key)):
        load_config(path)


def test_bad_entries_and_presets_are_config_errors(tmp_path: Path) -> None:
    """Invalid entries, unknown presets and dangerous entries surface as ConfigError."""
    path = tmp_path / "conf.toml"
    path.write_text('allow = ["not valid"]\n')
    with pytest.raises(ConfigError, match="invalid allow entry"):
        load_config(path)
    path.write_text('presets = ["nunpy"]\n')
    with pytest.raises(ConfigError, match="unknown preset 'nunpy'"):
        load_config(path)


def test_dangerous_entry_from_config_is_refused_by_the_codec(
    tmp_path: Path, ring: Keyring
) -> None:
    """A configured os.system entry is refused when the codec is built."""
    path = tmp_path / "conf.toml"
    path.write_text('allow = ["os.system"]\n')
    with pytest.raises(ValueError, match=r"'os\.system' is refused"):
        Codec.from_config(ring, path)


def test_missing_table_is_refused(tmp_path: Path) -> None:
    """A pyproject.toml without [tool.signedqueue] raises ConfigError."""
    path = tmp_path / "pyproject.toml"
    path.write_text("[project]\nname = 'x'\n[tool.other]\nallow = []\n")
    with pytest.raises(ConfigError, match=r"no \[tool.signedqueue\] table"):
        load_config(path)


def test_table_of_the_wrong_type_is_refused(tmp_path: Path) -> None:
    """tool.signedqueue that is not a table raises ConfigError."""
    path = tmp_path / "pyproject.toml"
    path.write_text('[tool]\nsignedqueue = "yes"\n')
    with pytest.raises(ConfigError, match="must be a table"):
        load_config(path)


def test_invalid_toml_is_refused(tmp_path: Path) -> None:
    """A file that is not TOML raises ConfigError (also a ValueError)."""
    path = tmp_path / "pyproject.toml"
    path.write_text("[tool.signedqueue\nallow = [\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)
    with pytest.raises(ValueError):
        load_config(path)


def test_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    """A missing file is an OSError, not an empty configuration."""
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "pyproject.toml")


def test_from_config_applies_the_settings(tmp_path: Path, ring: Keyring, clock: Any) -> None:
    """Codec.from_config applies allow, max_age and max_frame_size from the file."""
    path = tmp_path / "pyproject.toml"
    path.write_text(
        '[tool.signedqueue]\nallow = ["allowpkg.mod.Point"]\nmax_age = 10\nmax_frame_size = 512\n'
    )
    codec = Codec.from_config(ring, path, clock=clock)
    assert codec.max_frame_size == 512
    frame = codec.dumps(Point(1, 2))
    assert codec.loads(frame) == Point(1, 2)
    with pytest.raises(ForbiddenClass):
        codec.loads(codec.dumps(Foreign(1)))
    with pytest.raises(ValueError, match="over max_frame_size=512"):
        codec.dumps(b"x" * 1000)
    clock.advance(11)
    with pytest.raises(ExpiredFrame):
        codec.loads(frame)


def test_from_config_keywords_override_the_file(
    tmp_path: Path, ring: Keyring, clock: Any
) -> None:
    """Keyword arguments to from_config win over the file's settings."""
    path = tmp_path / "pyproject.toml"
    path.write_text(
        '[tool.signedqueue]\nallow = ["allowpkg.mod.Point"]\nmax_age = 10\nmax_frame_size = 512\n'
    )
    codec = Codec.from_config(
        ring, path, clock=clock, max_age=None, max_frame_size=1 << 20,
        allow=Allowlist(["allowpkg.other.Foreign"]),
    )
    assert codec.max_frame_size == 1 << 20
    frame = codec.dumps([Foreign(b"x" * 1000)])
    clock.advance(3600)
    assert codec.loads(frame) == [Foreign(b"x" * 1000)]
    with pytest.raises(ForbiddenClass):
        codec.loads(codec.dumps(Point(1, 2)))


def test_from_config_without_limits_keeps_the_defaults(tmp_path: Path, ring: Keyring) -> None:
    """Settings the file leaves out keep the Codec defaults."""
    path = tmp_path / "pyproject.toml"
    path.write_text("[tool.signedqueue]\n")
    assert Codec.from_config(ring, path).max_frame_size == Codec(ring).max_frame_size


# -- audit mode ---------------------------------------------------------------------------


def test_audit_mode_is_off_by_default(ring: Keyring) -> None:
    """A default codec refuses what audit mode would load, and has no audit report."""
    codec = Codec(ring)
    with pytest.raises(ForbiddenClass):
        codec.loads(codec.dumps(Point(1, 2)))
    with pytest.raises(ValueError, match="unsafe_audit=True"):
        codec.audit_report()


def test_audit_mode_warns_and_logs_at_construction(
    ring: Keyring, caplog: pytest.LogCaptureFixture
) -> None:
    """unsafe_audit=True issues an AuditModeWarning and logs a warning."""
    with (
        caplog.at_level(logging.WARNING, logger="signedqueue"),
        pytest.warns(AuditModeWarning, match="globals outside the allowlist are LOADED"),
    ):
        Codec(ring, unsafe_audit=True)
    assert any(
        r.levelno == logging.WARNING and "AUDIT MODE" in r.getMessage() for r in caplog.records
    )


def test_audit_log_needs_audit_mode(ring: Keyring, tmp_path: Path) -> None:
    """audit_log= without unsafe_audit=True is refused."""
    with pytest.raises(ValueError, match="needs unsafe_audit=True"):
        Codec(ring, audit_log=tmp_path / "audit.jsonl")


def test_audit_mode_still_verifies_frames(ring: Keyring) -> None:
    """A tampered frame is refused in audit mode, and nothing is recorded."""
    codec = audit_codec(ring)
    frame = bytearray(codec.dumps(Point(1, 2)))
    frame[-40] ^= 1
    with pytest.raises(InvalidSignature):
        codec.loads(bytes(frame))
    other = Codec(Keyring.generate())
    with pytest.raises(RejectedFrame):
        codec.loads(other.dumps(Point(1, 2)))
    assert codec.audit_report().counts == {}


def test_audit_mode_loads_logs_once_and_counts(
    ring: Keyring, caplog: pytest.LogCaptureFixture
) -> None:
    """A global outside the allowlist loads, is logged once, and is counted per use."""
    codec = audit_codec(ring, allow=["allowpkg.mod.Point"])
    with caplog.at_level(logging.WARNING, logger="signedqueue"):
        for i in range(3):
            assert codec.loads(codec.dumps([Point(i, i), Foreign(i)])) == [Point(i, i), Foreign(i)]
        assert codec.loads(codec.dumps(Outer.Inner(1))) == Outer.Inner(1)
    report = codec.audit_report()
    assert report.counts == {"allowpkg.other.Foreign": 3, "allowpkg.mod:Outer.Inner": 1}
    assert report.allow_entries() == ["allowpkg.mod:Outer.Inner", "allowpkg.other.Foreign"]
    logged = [r.getMessage() for r in caplog.records if "AUDIT MODE loaded" in r.getMessage()]
    assert len(logged) == 2
    assert any("allow=['allowpkg.other.Foreign']" in m for m in logged)
    assert "allowpkg.mod.Point" not in str(report)


@pytest.mark.parametrize(
    ("module", "name", "args"),
    [
        ("os", "system", ("touch {canary}",)),
        ("posix", "system", ("touch {canary}",)),
        ("subprocess", "check_call", (["touch", "{canary}"],)),
        ("builtins", "exec", ("open({canary!r}, 'w').close()",)),
        ("builtins", "eval", ("open({canary!r}, 'w').close()",)),
        ("builtins", "open", ("{canary}", "w")),
        ("allowpkg.mod", "run", ("touch {canary}",)),  # os.system under another name
    ],
)
def test_audit_mode_still_refuses_dangerous_globals(
    ring: Keyring, tmp_path: Path, module: str, name: str, args: tuple[str, ...]
) -> None:
    """Dangerous globals are refused in audit mode, leave no canary and are not recorded."""
    canary = str(tmp_path / "canary")
    args = tuple(
        [a.format(canary=canary) for a in arg] if isinstance(arg, list)
        else arg.format(canary=canary)
        for arg in args
    )
    codec = audit_codec(ring, audit_log=tmp_path / "audit.jsonl")
    with pytest.raises(ForbiddenClass) as info:
        codec.loads(codec.seal(global_call(module, name, *args)))
    assert info.value.allow_entries == (None,)
    assert not os.path.exists(canary)
    assert codec.audit_report().counts == {}
    assert not (tmp_path / "audit.jsonl").exists()


def test_audit_mode_does_not_widen_wildcards(ring: Keyring) -> None:
    """Under allowpkg.mod.* audit mode still refuses names the module only imported."""
    codec = audit_codec(ring, allow=["allowpkg.mod.*"])
    with pytest.raises(ForbiddenClass, match=r"not defined in allowpkg\.mod"):
        codec.loads(codec.seal(global_call("allowpkg.mod", "Foreign", 1)))
    with pytest.raises(ForbiddenClass, match="module"):
        codec.loads(codec.seal(global_call("allowpkg.mod", "json")))


def test_audit_mode_still_refuses_modules_and_attribute_walks(ring: Keyring) -> None:
    """Audit mode refuses modules and qualnames that walk to a method."""
    codec = audit_codec(ring)
    with pytest.raises(ForbiddenClass, match="module"):
        codec.loads(codec.seal(global_call("allowpkg.mod", "sub")))
    with pytest.raises(ForbiddenClass, match="walks attributes"):
        codec.loads(codec.seal(global_call("allowpkg.mod", "Outer.method", 1)))
    assert codec.audit_report().counts == {}


def test_audit_report_to_toml_and_allowlist(ring: Keyring, tmp_path: Path) -> None:
    """audit_report() gives the minimal entries, an Allowlist and a TOML snippet that loads."""
    codec = audit_codec(ring, allow=Allowlist(["allowpkg.mod.Point"]))
    codec.loads(codec.dumps([Point(1, 2), Foreign(1), Outer.Inner(2)]))
    report = codec.audit_report()
    base = Allowlist(["allowpkg.mod.Point"])
    learned = report.allowlist(base)
    assert learned == Allowlist(
        ["allowpkg.mod.Point", "allowpkg.mod:Outer.Inner", "allowpkg.other.Foreign"]
    )
    path = tmp_path / "pyproject.toml"
    path.write_text(report.to_toml(base))
    assert load_config(path).allow == learned
    assert report.allowlist() == Allowlist(["allowpkg.mod:Outer.Inner", "allowpkg.other.Foreign"])


def test_empty_audit_report_says_so(ring: Keyring) -> None:
    """A report with nothing seen says nothing was loaded outside the allowlist."""
    codec = audit_codec(ring)
    codec.loads(codec.dumps({"a": [1, 2.5]}))
    assert codec.audit_report() == AuditReport({})
    assert "nothing outside the allowlist" in str(codec.audit_report())


def _audit_child(ring: Keyring, log: str, frames: list[bytes]) -> None:
    """Child: load frames in audit mode, appending sightings to the shared log."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AuditModeWarning)
        codec = Codec(ring, unsafe_audit=True, audit_log=log)
    for frame in frames:
        codec.loads(frame)


def test_audit_logs_from_two_processes_merge_into_an_allowlist(
    ring: Keyring, tmp_path: Path
) -> None:
    """Two children log to one file; the merged report admits their frames, and no more."""
    producer = Codec(ring, allow=["allowpkg.mod.*", "allowpkg.other.*", "allowpkg.mod:Outer.Inner"])
    seen_a = [producer.dumps(Point(1, 2)), producer.dumps([Point(3, 4), Foreign(1)])]
    seen_b = [producer.dumps(Outer.Inner(Foreign(2))), producer.dumps(Point(5, 6))]
    log = str(tmp_path / "audit.jsonl")
    other_log = str(tmp_path / "audit-2.jsonl")
    ctx = multiprocessing.get_context("spawn")
    children = [
        ctx.Process(target=_audit_child, args=(ring, log, seen_a)),
        ctx.Process(target=_audit_child, args=(ring, log, seen_b)),
        ctx.Process(target=_audit_child, args=(ring, other_log, seen_b[:1])),
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(WAIT)
        assert child.exitcode == 0
    report = AuditReport.from_logs([log, other_log])
    # One line per global per process, however often it was loaded there.
    assert report.counts == {
        "allowpkg.mod.Point": 2,
        "allowpkg.other.Foreign": 3,
        "allowpkg.mod:Outer.Inner": 2,
    }
    learned = Codec(ring, allow=report.allowlist())
    for frame in seen_a + seen_b:
        learned.loads(frame)
    unseen = producer.seal(global_call("allowpkg.mod", "make_point", 1, 2))
    with pytest.raises(ForbiddenClass, match="make_point"):
        learned.loads(unseen)


def test_audit_log_lines_that_are_not_records_are_refused(tmp_path: Path) -> None:
    """from_logs names the file and line of a malformed record; blank lines are skipped."""
    path = tmp_path / "audit.jsonl"
    path.write_text('{"global": "allowpkg.mod.Point"}\n\n{"other": 1}\n')
    with pytest.raises(ValueError, match=r"audit.jsonl:3: not an audit record"):
        AuditReport.from_logs([path])
    path.write_text('{"global": 5}\n')
    with pytest.raises(ValueError, match="not an audit record"):
        AuditReport.from_logs([path])
    path.write_text('{"global": "allowpkg.mod.Point"}\n\n')
    assert AuditReport.from_logs([path]).counts == {"allowpkg.mod.Point": 1}


def test_audit_mode_crosses_spawn_with_a_signed_queue(ring: Keyring, tmp_path: Path) -> None:
    """A spawned child of an audit-mode queue loads in audit mode and logs to audit_log."""
    ctx = multiprocessing.get_context("spawn")
    log = tmp_path / "audit.jsonl"
    with pytest.warns(AuditModeWarning):
        q = SignedQueue(ring, ctx=ctx, unsafe_audit=True, audit_log=str(log))
    child = ctx.Process(target=_echo_quietly, args=(q,))
    child.start()
    try:
        q.put(Point(7, 8))
        child.join(WAIT)
        assert child.exitcode == 0
        assert q.get(timeout=WAIT) == Point(7, 8)
    finally:
        if child.is_alive():
            child.kill()
        q.cancel_join_thread()
        q.close()
    assert AuditReport.from_logs([log]).counts == {"allowpkg.mod.Point": 2}


def _echo_quietly(q: SignedQueue) -> None:
    """Child: get one item and put it back."""
    q.put(q.get(timeout=WAIT))


# -- every refusal of a frame in one error -------------------------------------------------


def test_all_forbidden_globals_are_listed_in_one_error(ring: Keyring) -> None:
    """One ForbiddenClass names every refused global, with aligned allow entries."""
    producer = Codec(ring, allow=["allowpkg.mod.*", "allowpkg.other.*", "allowpkg.mod:Outer.Inner"])
    consumer = Codec(ring)
    frame = producer.dumps([Point(1, 2), Foreign(3), Outer.Inner(4), Point(5, 6)])
    with pytest.raises(ForbiddenClass) as info:
        consumer.loads(frame)
    exc = info.value
    assert set(exc.names) == {
        "allowpkg.mod.Point", "allowpkg.other.Foreign", "allowpkg.mod:Outer.Inner",
    }
    assert len(exc.names) == 3
    assert exc.allow_entries == exc.names
    assert "refused 3 globals" in str(exc)
    assert f"to admit them, add allow={list(exc.allow_entries)!r}" in str(exc)
    fixed = Codec(ring, allow=list(exc.allow_entries))
    assert fixed.loads(frame) == [Point(1, 2), Foreign(3), Outer.Inner(4), Point(5, 6)]
    one_short = Codec(ring, allow=list(exc.allow_entries)[:-1])
    with pytest.raises(ForbiddenClass) as again:
        one_short.loads(frame)
    assert again.value.names == exc.names[-1:]


def test_listed_refusals_mix_fixable_and_dangerous(ring: Keyring) -> None:
    """A dangerous global is listed with entry None and is not offered as an entry."""
    payload = (
        b"\x80\x02]q\x00(c" + b"allowpkg.other\nForeign\n" + b")R"
        + b"cos\nsystem\n" + b"X\x04\x00\x00\x00true\x85Re."
    )
    codec = Codec(ring)
    with pytest.raises(ForbiddenClass) as info:
        codec.loads(codec.seal(payload))
    exc = info.value
    assert exc.names == ("allowpkg.other.Foreign", "os.system")
    assert exc.allow_entries == ("allowpkg.other.Foreign", None)
    assert "add allow=['allowpkg.other.Foreign']" in str(exc)
    assert "os.system" in str(exc) and "'os.system'" not in str(exc).split("add allow=")[1]


def test_single_refusal_keeps_the_exact_entry_hint(ring: Keyring) -> None:
    """A frame with one refused global names the exact entry that admits it."""
    codec = Codec(ring, allow=["allowpkg.mod.Point"])
    with pytest.raises(ForbiddenClass) as info:
        codec.loads(codec.seal(global_call("allowpkg.mod", "Outer.Inner", 1)))
    assert "to admit it, add allow=['allowpkg.mod:Outer.Inner']" in str(info.value)
    assert info.value.names == ("allowpkg.mod:Outer.Inner",)


def test_refusal_suggests_the_preset_that_covers_it(ring: Keyring) -> None:
    """A refused numpy global's message names the numpy preset as an alternative."""
    numpy = pytest.importorskip("numpy")
    producer = Codec(ring, allow=Allowlist(presets=["stdlib", "numpy"]))
    frame = producer.dumps(numpy.arange(4))
    with pytest.raises(ForbiddenClass) as info:
        Codec(ring).loads(frame)
    message = str(info.value)
    assert "use the 'numpy' preset" in message
    assert "allow=Allowlist(presets=['numpy', 'stdlib'])" in message
    assert all(e is not None for e in info.value.allow_entries)
    for allow in (Allowlist(presets=["stdlib", "numpy"]), list(info.value.allow_entries)):
        assert (Codec(ring, allow=allow).loads(frame) == numpy.arange(4)).all()


def test_no_preset_hint_for_globals_no_preset_covers(ring: Keyring) -> None:
    """A refusal of the application's own class mentions no preset."""
    codec = Codec(ring)
    with pytest.raises(ForbiddenClass) as info:
        codec.loads(Codec(ring, allow=["allowpkg.mod.Point"]).dumps(Point(1, 2)))
    assert "preset" not in str(info.value)


def test_preset_hint_when_stdlib_is_left_out(ring: Keyring) -> None:
    """A codec without the stdlib preset refusing datetime is pointed to the stdlib preset."""
    import datetime

    codec = Codec(ring, allow=Allowlist.preset())
    with pytest.raises(ForbiddenClass) as info:
        codec.loads(codec.dumps(datetime.date(2024, 1, 1)))
    assert info.value.names == ("datetime.date",)
    assert "add allow=['datetime.date']" in str(info.value)


def test_allowpkg_names_are_the_real_modules() -> None:
    """The test package is importable under the names the pickles use."""
    assert Point.__module__ == allowpkg.mod.__name__ == "allowpkg.mod"
    assert Foreign.__module__ == allowpkg.other.__name__
