"""
Regression tests for what fuzzing Codec.loads found (see fuzz/README.md).
The inputs themselves are in tests/corpus/ and run by tests/test_corpus.py;
these tests pin down each cause directly.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap

import pytest

from signedqueue import Allowlist, Codec, Keyring, MalformedFrame, RejectedFrame, _unpickler

RING = Keyring({"k": b"fuzz regression key, constant!!!"}, active="k")


# -- 1. LONG_BINPUT / PUT with a huge memo index (C unpickler memory) ----------

#: PROTO 5, BININT1 1, LONG_BINPUT 0x40000000, STOP: the C unpickler of
#: Pythons without gh-115952 fills a 16 GiB memo array for these 9 bytes.
HUGE_LONG_BINPUT = b"\x80\x05K\x01r\x00\x00\x00\x40."
HUGE_PUT = b"K\x01p1073741824\n."
HUGE_PUT_SPELLED = b"K\x01p 1_073_741_824 \n."


@pytest.mark.parametrize("payload", [HUGE_LONG_BINPUT, HUGE_PUT, HUGE_PUT_SPELLED])
def test_memo_index_beyond_the_payload_is_out_of_bounds(payload: bytes) -> None:
    assert _unpickler.within_bounds(payload) is not _unpickler._ARRAY_MEMO


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_real_pickles_keep_their_within_bounds(protocol: int) -> None:
    shared = ["s"] * 3
    objs = [
        [shared, shared, {"k": shared}],
        list(range(70_000)),  # LONG_BINPUT indexes past 65535 (protocols 1-3)
        [str(i) for i in range(70_000)],
        {"error": "price", "parrot": b"r\x00\x00\x01"},
    ]
    for obj in objs:
        payload = pickle.dumps(obj, protocol)
        assert _unpickler.within_bounds(payload)


def test_memo_walk_refuses_what_it_cannot_walk() -> None:
    if not _unpickler._ARRAY_MEMO:
        pytest.skip("this Python's C unpickler keeps sparse memo indices in a dict")
    # A LONG4 of negative length would walk backwards forever.
    assert not _unpickler.within_bounds(b"r\x00\x00\x01\x00\x8b\xfb\xff\xff\xff.")
    assert not _unpickler.within_bounds(b"r\x00\x00\x01\x00\xff.")  # unknown opcode
    assert not _unpickler.within_bounds(b"r\x00\x00\x01\x00")  # no STOP


def test_huge_memo_index_is_refused_without_allocating() -> None:
    # In a child process limited to 1 GiB of address space: before the fix
    # this loaded into a MemoryError (or, unlimited, an OOM kill).
    code = textwrap.dedent(
        f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        from signedqueue import Codec, Keyring, RejectedFrame
        codec = Codec(Keyring({{"k": b"x" * 32}}, active="k"))
        for payload in ({HUGE_LONG_BINPUT!r}, {HUGE_PUT!r}):
            try:
                codec.loads(codec.seal(payload))
            except RejectedFrame as exc:
                print(type(exc).__name__, exc.reason)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    if _unpickler._ARRAY_MEMO:
        assert out.count("MalformedFrame payload tried to build far more data") == 2, out
    assert "MemoryError" not in out


# -- 2. numpy datetime dtype given a version 3 state (segfault) ---------------


def test_datetime_dtype_with_a_version_3_state_is_refused() -> None:
    pytest.importorskip("numpy")
    codec = Codec(RING, allow=Allowlist(presets=("stdlib", "numpy")))
    # numpy.dtype("m8", False, True), then BUILD (3, "<", None, None, None,
    # -1, -1, 0): numpy 2.4 leaves the dtype without datetime metadata and
    # the process crashes.  It must be refused before numpy sees it.
    payload = (
        b"\x80\x04\x8c\x05numpy\x8c\x05dtype\x93\x8c\x02m8\x89\x88\x87R"
        b"(K\x03\x8c\x01<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb."
    )
    with pytest.raises(MalformedFrame, match="version numpy writes"):
        codec.loads(codec.seal(payload))


def test_datetime_dtypes_still_load() -> None:
    numpy = pytest.importorskip("numpy")
    codec = Codec(RING, allow=Allowlist(presets=("stdlib", "numpy")))
    for value in (
        numpy.dtype("m8[us]"),
        numpy.dtype("M8[D]"),
        numpy.arange(3).astype("M8[s]"),
        numpy.dtype([("when", "M8[ms]"), ("n", "i4")]),
    ):
        loaded = codec.loads(codec.dumps(value))
        if isinstance(value, numpy.ndarray):
            assert (loaded == value).all() and loaded.dtype == value.dtype
        else:
            assert loaded == value


# -- 3. GLOBAL names with backslash escapes (a stray DeprecationWarning) -------


def test_global_with_an_invalid_escape_is_refused_quietly(
    recwarn: pytest.WarningsRecorder,
) -> None:
    # Listing every refused global reads the pickle with pickletools, whose
    # GLOBAL reader escape-decodes the name ("\l": DeprecationWarning).  It
    # must stay a refusal whatever the warning filters are.
    codec = Codec(RING)
    payload = b"\x80\x02cbui\\loins\nbytearray\nq\x00)R."
    with pytest.raises(RejectedFrame):
        codec.loads(codec.seal(payload))


# -- 4. BYTEARRAY8 declaring more than the payload (CPython prints SystemError) --


def test_bytearray8_beyond_the_payload_is_refused_before_allocating(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The C unpickler allocates the declared length first; when that fails,
    # CPython 3.11 frees a bytearray whose export count was never set and
    # prints "SystemError: deallocated bytearray object has exported buffers"
    # through sys.excepthook (which an application may have made fatal).
    printed: list[object] = []
    monkeypatch.setattr(sys, "excepthook", lambda *exc: printed.append(exc))
    payload = b"\x96\x96\x7f\xfd\xa1b\ne\n0\x94\x94\x94\x94\x94\x94\x94\x94\x94\x94\x01\x00"
    assert _unpickler.within_bounds(payload) is not _unpickler._ARRAY_MEMO
    assert _unpickler.within_bounds(b"\x80\x05\x96\x03\x00\x00\x00\x00\x00\x00\x00abc.")
    codec = Codec(RING)
    for _ in range(20):  # the stray export count is whatever memory held
        with pytest.raises(MalformedFrame):
            codec.loads(codec.seal(payload))
    assert printed == []


# -- 5. BYTEARRAY8 declaring more than the payload (Python unpickler fills it) --


def test_bytearray8_beyond_the_payload_is_refused_by_the_python_unpickler() -> None:
    # Policies admitting numpy or dateutil load with the Python unpickler,
    # whose BYTEARRAY8 makes bytearray(length) (zero-filled, resident) before
    # reading: these 27 bytes made it fill 1.5 GiB.
    codec = Codec(RING, allow=Allowlist(presets=("stdlib", "dateutil")))
    payload = b"\x88\x96\x0a\x06\x00\x60\x00\x00\x00\x00" + b"\x00\xfa" + b"`" * 11
    if _unpickler._ARRAY_MEMO:
        assert not _unpickler.within_bounds(payload)
        assert not _unpickler.within_bounds(b"\x96\x00\x00\x01\x00\x00\x00\x00\x00.")
    with pytest.raises(MalformedFrame):
        codec.loads(codec.seal(payload))
