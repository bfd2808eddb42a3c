"""
The ``signedqueue`` command (also ``python -m signedqueue``).

Exit codes: 0 success, 1 a check failed, 2 usage error.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from . import _bench, _cli_inspect, _cli_keys


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="signedqueue",
        description="Signed, allowlisted frames for moving Python objects between processes.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="run a multi-process demo: objects exchanged, attacker frames refused",
        description="Producers and consumers in separate processes exchange objects "
        "through signed queues while tampered, forbidden and foreign frames are refused.",
    )
    demo.add_argument("--producers", type=int, default=2, help="producer processes (default 2)")
    demo.add_argument("--consumers", type=int, default=2, help="consumer processes (default 2)")
    demo.add_argument("--count", type=int, default=2000, help="orders per producer (default 2000)")
    _cli_keys.add_parser(sub)
    _cli_inspect.add_parsers(sub)
    _bench.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader went away (``signedqueue ... | head``): stop quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def _main(argv: Sequence[str] | None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from importlib.metadata import version

        print(f"signedqueue {version('signedqueue')}")
        return 0
    if args.command == "demo":
        for name in ("producers", "consumers", "count"):
            if getattr(args, name) < 1:
                parser.error(f"--{name} must be at least 1")
        from ._demo import run

        return run(sys.stdout, producers=args.producers, consumers=args.consumers,
                   count=args.count)
    if args.command == "keys":
        return _cli_keys.run(args)
    if args.command == "inspect":
        return _cli_inspect.run_inspect(args)
    if args.command == "audit":
        return _cli_inspect.run_audit(args)
    if args.command == "bench":
        return _bench.run_cli(args, parser)
    parser.print_help()
    return 2
