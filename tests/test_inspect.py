"""Codec.inspect and inspect_frame: header, verification and globals, never loading."""

from __future__ import annotations

import collections
import dataclasses
import os
import pickle
import sys
from pathlib import Path
from typing import Any

import pytest

from signedqueue import Codec, ForbiddenClass, Inspection, Keyring, inspect_frame
from signedqueue._inspect import NO_KEYRING, msgpack_class_names


class Mkdir:
    """Pickles as a call to os.mkdir(path): a payload that leaves a trace if run."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.path,))


@dataclasses.dataclass
class Point:
    """A class registered for msgpack."""

    x: int
    y: int


#: Protocol 4: STACK_GLOBAL twice, the second module string read back from the memo.
STACK_GLOBAL_VIA_MEMO = (
    b"\x80\x04"
    b"\x8c\x02os\x94"  # "os", memo 0
    b"\x8c\x06system\x94"  # "system", memo 1
    b"\x93\x94"  # STACK_GLOBAL os.system, memo 2
    b"h\x00"  # BINGET 0: "os"
    b"\x8c\x05popen\x94"
    b"\x93\x94"  # STACK_GLOBAL os.popen
    b"\x86."  # TUPLE2, STOP
)

#: Protocol 0: three globals in a tuple, none of them called.
THREE_REFUSED = (
    b"(cos\nsystem\ncsubprocess\nPopen\nccollections\nChainMap\ntp0\n."
)


def names(found: Inspection) -> list[str]:
    """The global names an inspection lists."""
    return [g.name for g in found.globals]


def test_valid_frame_verifies_and_lists_its_globals(codec: Codec) -> None:
    """A frame of this codec verifies and its admitted globals are listed as ok."""
    frame = codec.dumps({"when": collections.OrderedDict(a=1)})
    found = codec.inspect(frame)
    assert found.verified
    assert found.error is None and found.reason is None
    assert found.ok
    assert found.header is not None
    assert found.header.key_id == codec.keyring.active_id
    assert found.header.serializer == "pickle"
    assert found.header.param == 5
    assert found.header.payload_size == len(frame) - 39 - len(codec.keyring.active_id) - 32
    assert ["collections.OrderedDict"] == names(found)
    assert not found.globals[0].refused
    assert "collections.OrderedDict" == found.globals[0].allow_entry


def test_tampered_frame_is_reported_not_raised(codec: Codec) -> None:
    """A frame with a flipped payload bit is reported as InvalidSignature."""
    frame = bytearray(codec.dumps([1, 2, 3]))
    frame[-33] ^= 0x01
    found = codec.inspect(bytes(frame))
    assert not found.verified
    assert "InvalidSignature" == found.error
    assert found.reason is not None and "tag does not match" in found.reason
    assert not found.ok


def test_unknown_key_is_reported(codec: Codec) -> None:
    """A frame signed by a key this ring lacks is UnknownKey; its globals are still listed."""
    other = Codec(Keyring.generate())
    found = codec.inspect(other.dumps(collections.deque([1])))
    assert "UnknownKey" == found.error
    assert found.header is not None
    assert found.header.key_id == other.keyring.active_id
    assert ["collections.deque"] == names(found)


def test_malformed_frame_has_no_header(codec: Codec) -> None:
    """Bytes that are not a frame are reported as MalformedFrame with no header."""
    found = codec.inspect(b"not a frame at all")
    assert found.header is None
    assert "MalformedFrame" == found.error
    assert () == found.globals


def test_oversized_frame_is_neither_verified_nor_scanned(ring: Keyring) -> None:
    """A frame over max_frame_size is refused as too large and not scanned."""
    codec = Codec(ring, max_frame_size=200)
    small = Codec(ring).dumps(b"x" * 500)
    found = codec.inspect(small)
    assert "FrameTooLarge" == found.error
    assert found.scan_error is not None
    assert () == found.globals


def test_forbidden_payload_never_runs(codec: Codec, tmp_path: Path) -> None:
    """A validly signed os.mkdir payload is flagged REFUSED and never executed."""
    canary = tmp_path / "canary"
    frame = codec.seal(pickle.dumps(Mkdir(canary)))
    found = codec.inspect(frame)
    assert found.verified
    assert not found.ok
    [check] = found.refused
    assert check.name.endswith(".mkdir")
    assert check.allow_entry is None
    assert check.reason is not None and "refused even when allowlisted" in check.reason
    assert not canary.exists()
    with pytest.raises(ForbiddenClass):
        codec.loads(frame)
    assert not canary.exists()


def test_every_forbidden_global_is_listed(codec: Codec) -> None:
    """A frame naming several refused globals lists each with what would admit it."""
    found = codec.inspect(codec.seal(THREE_REFUSED))
    assert found.verified
    assert ["os.system", "subprocess.Popen", "collections.ChainMap"] == names(found)
    assert all(g.refused for g in found.globals)
    by_name = {g.name: g for g in found.globals}
    assert by_name["os.system"].allow_entry is None
    assert by_name["subprocess.Popen"].allow_entry is None
    assert "collections.ChainMap" == by_name["collections.ChainMap"].allow_entry
    assert by_name["collections.ChainMap"].reason == "is not in the allowlist"


def test_allow_entry_admits_the_flagged_global(ring: Keyring) -> None:
    """The allow= entry an inspection suggests makes that global ok."""
    frame = Codec(ring).seal(THREE_REFUSED)
    found = Codec(ring, allow=["collections.ChainMap"]).inspect(frame)
    by_name = {g.name: g for g in found.globals}
    assert not by_name["collections.ChainMap"].refused
    assert by_name["os.system"].refused


def test_stack_global_through_the_memo(codec: Codec) -> None:
    """STACK_GLOBAL whose module string comes back from the memo is still named."""
    found = codec.inspect(codec.seal(STACK_GLOBAL_VIA_MEMO))
    assert ["os.system", "os.popen"] == names(found)
    assert all(g.refused for g in found.globals)


def test_inspect_imports_no_refused_module(codec: Codec) -> None:
    """A refused global's module is not imported by inspecting."""
    module = "tests_inspect_never_imported"
    payload = f"c{module}\nThing\n.".encode()
    found = codec.inspect(codec.seal(payload))
    assert [f"{module}.Thing"] == names(found)
    assert found.globals[0].refused
    assert module not in sys.modules


def test_unreadable_pickle_reports_a_scan_error(codec: Codec) -> None:
    """A verified payload that is not a pickle is reported, not raised."""
    found = codec.inspect(codec.seal(b"\x80\x05\xff\xff"))
    assert found.verified
    assert found.scan_error is not None
    assert not found.ok


def test_msgpack_frame_lists_registered_classes(ring: Keyring) -> None:
    """A msgpack frame lists its registered-class names, ok only where registered."""
    producer = Codec(ring, serializer="msgpack", msgpack_types=[Point])
    frame = producer.dumps({"p": Point(1, 2), "t": (Point(3, 4),)})
    name = f"{Point.__module__}.{Point.__qualname__}"
    found = producer.inspect(frame)
    assert found.verified and found.ok
    assert [name] == names(found)
    bare = Codec(ring, serializer="msgpack").inspect(frame)
    assert bare.verified and not bare.ok
    assert bare.globals[0].refused
    assert bare.globals[0].allow_entry is None


def test_msgpack_scan_constructs_nothing() -> None:
    """Reading class names from msgpack never builds the class."""
    producer = Codec(Keyring.generate(), serializer="msgpack", msgpack_types=[Point])
    payload = producer.unseal(producer.dumps([Point(1, 2)]))
    assert [f"{Point.__module__}.{Point.__qualname__}"] == msgpack_class_names(payload)


def test_no_keyring_is_unverified(codec: Codec) -> None:
    """inspect_frame reads the header but never calls the frame verified."""
    frame = codec.dumps(collections.Counter("ab"))
    found = inspect_frame(frame)
    assert not found.verified
    assert found.error is None
    assert NO_KEYRING == found.reason
    assert not found.ok
    assert found.header is not None
    assert found.header.key_id == codec.keyring.active_id
    assert ["collections.Counter"] == names(found)
    assert "unverified" == found.to_dict()["verification"]["status"]


def test_no_keyring_flags_against_the_default_policy(codec: Codec) -> None:
    """Without allow= the stdlib preset decides; allow= entries admit more."""
    frame = codec.seal(THREE_REFUSED)
    assert 3 == len(inspect_frame(frame).refused)
    assert 2 == len(inspect_frame(frame, ["collections.ChainMap"]).refused)


def test_to_dict_has_no_payload_bytes(codec: Codec) -> None:
    """The JSON form gives the header and globals, never the payload."""
    frame = codec.dumps("PAYLOAD-MARKER-TEXT")
    data = codec.inspect(frame).to_dict()
    assert "PAYLOAD-MARKER-TEXT" not in repr(data)
    assert data["ok"] is True
    assert data["header"]["nonce"] == frame[39 + len(codec.keyring.active_id) - 24 :][:16].hex()


def test_trusting_codec_refuses_no_global(ring: Keyring) -> None:
    """Under unsafe_trust_signed_frames nothing is flagged, since nothing is restricted."""
    codec = Codec(ring, unsafe_trust_signed_frames=True)
    found = codec.inspect(codec.seal(THREE_REFUSED))
    assert found.ok
    assert 3 == len(found.globals)
