"""
``signedqueue inspect`` and ``signedqueue audit report``.

``inspect`` reads one frame and prints its header, whether it verified and
every global its payload would import, without deserializing anything.
``audit report`` merges the JSON-lines logs of codecs in audit mode into the
minimal ``allow=`` list.  Neither ever prints payload bytes or secrets.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ._allowlist import Allowlist, Policy
from ._audit import AuditReport
from ._codec import DEFAULT_MAX_FRAME_SIZE, Codec
from ._inspect import Inspection, inspect_with, iso_time
from ._keys import Keyring
from .exceptions import KeyringError

__all__ = ["add_parsers", "run_audit", "run_inspect"]


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    inspect = sub.add_parser(
        "inspect",
        help="show a frame's header, whether it verifies and what it would import",
        description="Read one frame from FILE (or standard input with '-') and print its "
        "header, the verification result and every global its payload would import, "
        "each with ok/REFUSED and the allow= entry that admits it. Nothing is "
        "deserialized; payload bytes and secrets are never printed.",
    )
    inspect.add_argument("file", metavar="FILE", help="the frame file, or - for standard input")
    inspect.add_argument(
        "--keyring", type=Path, metavar="PATH",
        help="keyring file to verify the frame with (without it the frame is UNVERIFIED)",
    )
    inspect.add_argument(
        "--allow", action="append", default=[], metavar="ENTRY",
        help="an allow= entry the consumer uses (repeatable)",
    )
    inspect.add_argument(
        "--preset", action="append", default=None, metavar="NAME",
        help="a preset the consumer uses (repeatable; default: stdlib)",
    )
    inspect.add_argument(
        "--context", default="", metavar="TEXT",
        help="the context the frame was sealed under (UTF-8 text)",
    )
    inspect.add_argument(
        "--allow-insecure-permissions", action="store_true",
        help="accept a keyring file that group or others may access",
    )
    inspect.add_argument("--json", action="store_true", help="print a JSON object")

    audit = sub.add_parser(
        "audit",
        help="merge audit-mode logs into an allowlist",
        description="Work with the logs that codecs in audit mode write (audit_log=PATH).",
    )
    cmds = audit.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    report = cmds.add_parser(
        "report",
        help="merge audit logs and print the globals seen and the minimal allow= list",
    )
    report.add_argument("logs", nargs="+", type=Path, metavar="LOG")
    report.add_argument(
        "--toml", action="store_true", help="print a [tool.signedqueue] TOML snippet"
    )
    report.add_argument(
        "--preset", action="append", default=None, metavar="NAME",
        help="a preset to keep in the snippet (repeatable; default: stdlib)",
    )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the codec's construction warnings (nothing is loaded here)."""
    log = logging.getLogger("signedqueue")
    before = log.disabled
    log.disabled = True
    try:
        yield
    finally:
        log.disabled = before


def _read_frame(name: str) -> bytes:
    # One byte over the limit is enough to refuse the frame as too large.
    if name == "-":
        return sys.stdin.buffer.read(DEFAULT_MAX_FRAME_SIZE + 1)
    with open(name, "rb") as fh:
        return fh.read(DEFAULT_MAX_FRAME_SIZE + 1)


def _inspect(args: argparse.Namespace, frame: bytes, policy: Policy) -> Inspection:
    if args.keyring is None:
        return inspect_with(frame, None, policy, DEFAULT_MAX_FRAME_SIZE)
    ring = Keyring.from_file(
        args.keyring, allow_insecure_permissions=args.allow_insecure_permissions
    )
    # Verify with a codec of the serializer the header names; the globals are
    # flagged against the allowlist given here, whatever that serializer.
    serializer = "pickle"
    if len(frame) > 4 and frame[:2] == b"SQ":
        serializer = {2: "msgpack", 3: "cloudpickle"}.get(frame[4], "pickle")
    options: dict[str, Any] = {"context": args.context.encode()}
    if serializer == "cloudpickle":
        options["unsafe_trust_signed_frames"] = True  # only verified, never loaded
    with _quiet():
        codec = Codec(ring, serializer=serializer, **options)
    return inspect_with(frame, codec, policy, codec.max_frame_size)


def _print_text(found: Inspection) -> None:
    out = sys.stdout
    h = found.header
    mark = "verified" if found.verified else "UNVERIFIED"
    if h is None:
        print("header: (unreadable)", file=out)
    else:
        print(f"header ({mark}):", file=out)
        rows = [
            ("serializer", h.serializer),
            ("protocol", str(h.param)),
            ("key id", h.key_id),
            ("created", iso_time(h.created)),
            ("nonce", h.nonce.hex()),
            ("payload size", f"{h.payload_size} bytes"),
        ]
        for label, value in rows:
            print(f"  {label:<13} {value}", file=out)
    if found.verified:
        print("verification: verified", file=out)
    elif found.error is None:
        print(f"verification: UNVERIFIED ({found.reason})", file=out)
    else:
        print(f"verification: REFUSED {found.error}: {found.reason}", file=out)
    if found.scan_error is not None:
        print(f"globals: could not be listed: {found.scan_error}", file=out)
    elif h is not None:
        kind = "classes" if h.serializer == "msgpack" else "globals"
        print(f"{kind} ({len(found.globals)}):", file=out)
        width = max((len(g.name) for g in found.globals), default=0)
        for g in found.globals:
            status = "REFUSED" if g.refused else "ok"
            if g.allow_entry is not None:
                entry = f"allow: {g.allow_entry}"
            elif h.serializer == "msgpack":
                entry = "register it with msgpack_types=[...]" if g.refused else ""
            else:
                entry = "no allow= entry admits it"
            line = f"  {status:<7}  {g.name:<{width}}  {entry}".rstrip()
            if g.refused and g.reason:
                line += f"  ({g.reason})"
            print(line, file=out)
    print(f"result: {'ok' if found.ok else 'REFUSED'}", file=out)


def run_inspect(args: argparse.Namespace) -> int:
    """Run ``signedqueue inspect``; returns the exit code."""
    try:
        presets = args.preset if args.preset is not None else ["stdlib"]
        policy = Policy(Allowlist(args.allow, presets=presets))
    except (ValueError, TypeError) as exc:
        print(f"signedqueue inspect: {exc}", file=sys.stderr)
        return 2
    try:
        frame = _read_frame(args.file)
        found = _inspect(args, frame, policy)
    except (KeyringError, ValueError, OSError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        where = f" ({exc.filename})" if isinstance(exc, OSError) and exc.filename else ""
        print(f"signedqueue inspect: {detail}{where}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(found.to_dict(), indent=2))
    else:
        _print_text(found)
    return 0 if found.ok else 1


def run_audit(args: argparse.Namespace) -> int:
    """Run ``signedqueue audit report``; returns the exit code."""
    try:
        report = AuditReport.from_logs(args.logs)
        base = Allowlist(presets=args.preset if args.preset is not None else ["stdlib"])
    except (ValueError, OSError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        where = f" ({exc.filename})" if isinstance(exc, OSError) and exc.filename else ""
        print(f"signedqueue audit report: {detail}{where}", file=sys.stderr)
        return 1
    if args.toml:
        print(report.to_toml(base), end="")
        return 0
    print(report)
    entries = report.allow_entries()
    if entries:
        print()
        print(f"allow={entries!r}")
    return 0
