"""
``signedqueue keys``: manage a keyring file from scripts.

Every command that changes the file holds an exclusive lock for its
read-modify-write and replaces the file atomically (mode 0600), so running
processes that watch it see the old keys or the new ones, never a mix.
Output goes to standard output; errors to standard error with exit code 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ._keys import Keyring
from ._keysource import locked
from .exceptions import KeyringError

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = sub.add_parser(
        "keys",
        help="create and rotate keyring files",
        description="Create a keyring file and stage, promote, retire and list its keys. "
        "Secrets are never printed.",
    )
    cmds = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    insecure = argparse.ArgumentParser(add_help=False)
    insecure.add_argument(
        "--allow-insecure-permissions", action="store_true",
        help="accept a keyring file that group or others may access",
    )

    init = cmds.add_parser("init", help="create a new keyring file with one active key")
    init.add_argument("path", type=Path, metavar="PATH")
    init.add_argument("--id", dest="key_id", help="the key id (default: random)")

    add = cmds.add_parser(
        "add", parents=[insecure],
        help="stage a new key (verifies everywhere, signs once promoted); prints its id last",
    )
    add.add_argument("path", type=Path, metavar="PATH")
    add.add_argument("--id", dest="key_id", help="the key id (default: random)")

    promote = cmds.add_parser(
        "promote", parents=[insecure],
        help="make a key the signing key; the old one becomes 'previous'",
    )
    promote.add_argument("path", type=Path, metavar="PATH")
    promote.add_argument("key_id", metavar="ID")

    retire = cmds.add_parser(
        "retire", parents=[insecure],
        help="remove a key; its frames are refused from then on",
    )
    retire.add_argument("path", type=Path, metavar="PATH")
    retire.add_argument("key_id", metavar="ID")

    lst = cmds.add_parser(
        "list", parents=[insecure], help="show key ids, states and ages (never secrets)"
    )
    lst.add_argument("path", type=Path, metavar="PATH")
    lst.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _age(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _edit(args: argparse.Namespace, change: Callable[[Keyring], str]) -> str:
    """Load, change and write the ring under the lock; return the message."""
    with locked(args.path):
        ring = Keyring.from_file(
            args.path, allow_insecure_permissions=args.allow_insecure_permissions
        )
        message = change(ring)
        ring.to_file(args.path)
    return message


def run(args: argparse.Namespace) -> int:
    """Run one ``keys`` action; returns the exit code."""
    try:
        if args.keys_command == "init":
            with locked(args.path):
                if os.path.lexists(args.path):
                    raise KeyringError(
                        f"{str(args.path)!r} already exists; refusing to overwrite a keyring"
                    )
                ring = Keyring.generate(args.key_id)
                ring.to_file(args.path)
            print(f"created {args.path} with active key {ring.active_id}")
        elif args.keys_command == "add":
            def stage(ring: Keyring) -> str:
                return f"staged key {ring.add(args.key_id)}"

            print(_edit(args, stage))
        elif args.keys_command == "promote":
            def promote(ring: Keyring) -> str:
                before = ring.active_id
                ring.promote(args.key_id)
                if before == args.key_id:
                    return f"key {args.key_id} is already active"
                return f"promoted key {args.key_id} (key {before} is now previous)"

            print(_edit(args, promote))
        elif args.keys_command == "retire":
            def retire(ring: Keyring) -> str:
                ring.retire(args.key_id)
                return f"retired key {args.key_id}"

            print(_edit(args, retire))
        else:
            ring = Keyring.from_file(
                args.path, allow_insecure_permissions=args.allow_insecure_permissions
            )
            now = time.time()
            infos = ring.describe()
            if args.json:
                print(json.dumps([
                    {"id": k.key_id, "state": k.state, "created": k.created,
                     "age_seconds": round(now - k.created, 3)}
                    for k in infos
                ], indent=2))
            else:
                width = max(len("ID"), *(len(k.key_id) for k in infos))
                print(f"{'ID':<{width}}  {'STATE':<8}  AGE")
                for k in infos:
                    print(f"{k.key_id:<{width}}  {k.state:<8}  {_age(now - k.created)}")
        return 0
    except KeyError as exc:
        print(f"signedqueue keys {args.keys_command}: {exc.args[0]}", file=sys.stderr)
    except (KeyringError, ValueError, OSError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        where = f" ({exc.filename})" if isinstance(exc, OSError) and exc.filename else ""
        print(f"signedqueue keys {args.keys_command}: {detail}{where}", file=sys.stderr)
    return 1
