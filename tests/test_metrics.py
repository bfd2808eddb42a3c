"""Counters of frames sealed, opened and refused, and their Prometheus export."""

from __future__ import annotations

import base64
import json
import pickle
import re
import threading
import uuid
from typing import Any

import pytest

from signedqueue import (
    REFUSAL_REASONS,
    Codec,
    CodecCounters,
    ExpiredFrame,
    ForbiddenClass,
    FrameTooLarge,
    InvalidSignature,
    Keyring,
    MalformedFrame,
    MemoryReplayGuard,
    RejectedFrame,
    ReplayedFrame,
    ReplayGuardFull,
    ReplayGuardUnavailable,
    UnknownKey,
    prometheus_text,
)


class Point:
    """Not allowlisted: refused as ForbiddenClass."""

    def __init__(self, x: int) -> None:
        self.x = x


class _Down:
    def check_and_remember(self, key: bytes, expires_at: float, owner: str = "") -> bool:
        raise OSError("down")

    def update(self, key: bytes, owner: str, expires_at: float, *, done: bool) -> None:
        raise OSError("down")


def flip(frame: bytes, index: int) -> bytes:
    out = bytearray(frame)
    out[index] ^= 1
    return bytes(out)


def test_fresh_codec_counts_nothing(ring: Keyring) -> None:
    """Every reason is present, at zero."""
    counters = Codec(ring).counters()
    assert counters == CodecCounters(0, 0, dict.fromkeys(REFUSAL_REASONS, 0))
    assert counters.refused_total == 0
    assert set(counters.refused) == set(REFUSAL_REASONS)


def test_exact_counts_after_known_operations(ring: Keyring) -> None:
    """sealed/opened count dumps, seal, loads, unseal, large and small."""
    codec = Codec(ring)
    frames = [codec.dumps(i) for i in range(5)]
    frames.append(codec.dumps(b"x" * 200_000))  # a large frame
    frames.append(codec.seal(pickle.dumps("sealed")))
    for frame in frames[:4]:
        codec.loads(frame)
    codec.unseal(frames[5])
    codec.verify(frames[6])  # verifies, does not open
    counters = codec.counters()
    assert (counters.sealed, counters.opened, counters.refused_total) == (7, 5, 0)
    assert counters.as_dict()["sealed"] == 7
    assert counters.as_dict()["refused_expired"] == 0


def test_each_refusal_reason_is_counted(ring: Keyring, clock: Any) -> None:
    """One refusal of each kind: each counted once under its reason."""
    codec = Codec(
        ring, max_age=10, clock=clock, max_frame_size=100_000,
        replay_guard=MemoryReplayGuard(3, clock=clock),
    )
    old = codec.dumps("old")
    clock.advance(11)
    good = codec.dumps("ok")
    cases: list[tuple[bytes, type[Exception]]] = [
        (b"\x00" * 200_000, FrameTooLarge),
        (b"SQ" + bytes(100), MalformedFrame),
        (Codec(Keyring.generate()).dumps(1), UnknownKey),
        (flip(good, len(good) - 1), InvalidSignature),
        (codec.seal(pickle.dumps(Point(1))), ForbiddenClass),
        (old, ExpiredFrame),
    ]
    for frame, cls in cases:
        with pytest.raises(cls):
            codec.loads(frame)
    fresh = [codec.dumps(i) for i in range(3)]
    codec.loads(fresh[0])
    with pytest.raises(ReplayedFrame):
        codec.loads(fresh[0])
    codec.loads(fresh[1])
    with pytest.raises(ReplayGuardFull):
        codec.loads(fresh[2])
    down = Codec(ring, max_age=10, replay_guard=_Down())
    with pytest.raises(ReplayGuardUnavailable):
        down.loads(down.dumps(1))
    refused = dict(codec.counters().refused)
    refused["replay_guard_unavailable"] = down.counters().refused["replay_guard_unavailable"]
    assert refused == {
        "too_large": 1, "malformed": 1, "unknown_key": 1, "invalid_signature": 1,
        "expired": 1, "replayed": 1, "replay_guard_full": 1,
        "replay_guard_unavailable": 1, "forbidden_class": 1, "other": 0,
    }
    # The ForbiddenClass frame passed the guard before it was refused (the
    # guard runs before deserializing), so it holds one of the three keys.
    assert codec.counters().opened == 2


def test_refusals_of_verify_count_too(ring: Keyring) -> None:
    """verify() and reseal() refusals pass through the same counter."""
    codec = Codec(ring)
    frame = flip(codec.dumps(1), 30)
    for method in (codec.verify, codec.reseal):
        with pytest.raises(RejectedFrame):
            method(frame)
    assert codec.counters().refused["invalid_signature"] == 2


def test_counters_add(ring: Keyring) -> None:
    """Snapshots of several codecs add up."""
    a, b = Codec(ring), Codec(ring)
    a.loads(a.dumps(1))
    b.dumps(2)
    total = a.counters() + b.counters()
    assert (total.sealed, total.opened) == (2, 1)


def test_counts_under_threads_are_close(ring: Keyring) -> None:
    """Without a lock, threads may lose an increment, never invent one."""
    codec = Codec(ring)

    def work() -> None:
        for i in range(2000):
            codec.loads(codec.dumps(i))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counters = codec.counters()
    assert 7_900 <= counters.sealed <= 8_000
    assert 7_900 <= counters.opened <= 8_000


_LINE = re.compile(
    r'^(?:# (?:HELP|TYPE) [a-z_]+ .+|'
    r'[a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*"'
    r'(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*")*\})? [0-9]+)$'
)


def test_prometheus_text_parses_and_holds_no_secrets(ring: Keyring) -> None:
    """Every line is a comment or a sample; no frame bytes or key material."""
    codec = Codec(ring, max_age=60, replay_guard=MemoryReplayGuard())
    marker = "sq-metrics-marker-" + uuid.uuid4().hex
    frame = codec.dumps(marker)
    codec.loads(frame)
    with pytest.raises(ReplayedFrame):
        codec.loads(frame)
    with pytest.raises(InvalidSignature):
        codec.loads(flip(frame, len(frame) - 1))
    text = prometheus_text(codec.counters())
    assert text.endswith("\n")
    for line in text.splitlines():
        assert _LINE.match(line), line
    assert "signedqueue_frames_sealed_total 1\n" in text
    assert "signedqueue_frames_opened_total 1\n" in text
    assert 'signedqueue_frames_refused_total{reason="replayed"} 1\n' in text
    assert 'signedqueue_frames_refused_total{reason="invalid_signature"} 1\n' in text
    assert marker not in text
    for key_id in ring.key_ids:
        secret = base64.b64decode(json.loads(ring.to_json())["keys"][key_id]["secret"])
        for form in (secret.hex(), base64.b64encode(secret).decode(), key_id):
            assert form not in text


def test_prometheus_labels(ring: Keyring) -> None:
    """Labelled series for several queues; label values are escaped."""
    a, b = Codec(ring), Codec(ring)
    a.dumps(1)
    text = prometheus_text(
        [({"queue": "orders"}, a.counters()), ({"queue": 'we"ird\\'}, b.counters())],
        prefix="app_sq",
    )
    assert 'app_sq_frames_sealed_total{queue="orders"} 1' in text
    assert 'app_sq_frames_sealed_total{queue="we\\"ird\\\\"} 0' in text
    assert 'app_sq_frames_refused_total{queue="orders",reason="expired"} 0' in text
    for line in text.splitlines():
        assert _LINE.match(line), line
    with pytest.raises(ValueError):
        prometheus_text(a.counters(), prefix="bad-name")
    with pytest.raises(ValueError):
        prometheus_text([({"reason": "x"}, a.counters())])


def test_redis_queue_counts_through_its_codec(redis_url: str) -> None:
    """A RedisQueue's counters are those of its (bound) codec."""
    from signedqueue.transports.redis import RedisQueue
    from test_redis import delete_queue

    name = f"test-{uuid.uuid4().hex}"
    ring = Keyring.generate()
    try:
        with RedisQueue(name, Codec(ring), url=redis_url) as q:
            q.put(1)
            q.put(2)
            q.get(timeout=2).ack()
            q.put_frame(flip(Codec(ring).dumps(3), 30))
            q.get(timeout=2).ack()
            with pytest.raises(RejectedFrame):
                q.get(timeout=2)
            counters = q.codec.counters()
            assert (counters.sealed, counters.opened) == (2, 2)
            assert counters.refused_total == 1
    finally:
        delete_queue(redis_url, name)
