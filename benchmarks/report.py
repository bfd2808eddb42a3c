"""
Turn a ``signedqueue bench --json`` file into the Markdown tables of
docs/benchmarks.md, and optionally redraw the chart, without rerunning.

    python benchmarks/report.py benchmarks/results/<machine>.json [--png docs/benchmarks.png]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from signedqueue import _bench


def _fmt(value: float, unit: str) -> str:
    return f"{value:.3f}" if unit == "GB/s" else f"{value:,.0f}"


def _peer(name: str, status: dict[str, Any]) -> str:
    dist, version = status.get("distribution", name), status.get("version") or "?"
    return f"{name} {version}" if dist == name else f"{name} ({dist} {version})"


def markdown(doc: dict[str, Any]) -> str:
    """The "Results" section tables for *doc*."""
    m = doc["machine"]
    s = doc["settings"]
    lines = [
        f"{doc['date']}, {m['cpu_count']} CPUs, {m['machine']}, {m['platform']}, "
        f"{m['implementation']} {m['python']}, start method `{m['start_method']}`, "
        f"{s['trials']} trial{'s' if s['trials'] != 1 else ''}"
        f"{' (--quick)' if s['quick'] else ''}, "
        f"total {doc['seconds']:.0f} s.",
        "",
        "| case | unit | plain | signed | fast | signed/plain | fast/plain |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for c in doc["cases"]:
        med, unit = c["median"], c["unit"]
        fast = _fmt(med["fast"], unit) if "fast" in med else "-"
        fast_ratio = f"{c['ratios']['fast']:.2f}" if "fast" in med else "-"
        lines.append(f"| `{c['name']}` | {unit} | {_fmt(med['plain'], unit)} | "
                     f"{_fmt(med['signed'], unit)} | {fast} | {c['ratio']:.2f} | "
                     f"{fast_ratio} |")
    peer_rows = [
        f"| `{c['name']}` | {_peer(peer, doc['peers'][peer])} | {c['unit']} | "
        f"{_fmt(c['median'][peer], c['unit'])} | {c['ratios'][peer]:.2f} |"
        for c in doc["cases"] for peer in doc["peers"] if peer in c["median"]
    ]
    if peer_rows:
        lines += ["", "| case | peer | unit | median | peer/plain |",
                  "|---|---|---|---:|---:|", *peer_rows]
    skipped = [f"{s['name']}{'/' + s['variant'] if 'variant' in s else ''}: {s['reason']}"
               for s in doc["skipped"]]
    if skipped:
        lines += ["", "Skipped: " + "; ".join(skipped) + "."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("json", help="a file written by signedqueue bench --json")
    parser.add_argument("--png", metavar="PATH", help="also redraw the chart to PATH")
    args = parser.parse_args(argv)
    with open(args.json, encoding="utf-8") as f:
        doc = json.load(f)
    if doc.get("format") != 2:
        parser.error(f"{args.json}: not a format-2 signedqueue bench file")
    print(markdown(doc))
    if args.png:
        _bench.write_png(doc, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
