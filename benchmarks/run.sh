#!/bin/sh
# Run the full benchmark and write the files docs/benchmarks.md shows:
#   benchmarks/results/<machine>.json   every sample, medians, ratios, machine
#   benchmarks/results/<machine>.txt    the table as printed
#   docs/benchmarks.png                 the chart
# then print the Markdown tables for docs/benchmarks.md.
#
# Usage: benchmarks/run.sh [extra bench options, e.g. --trials 9 or --quick]
# Environment: PYTHON (default: python), MACHINE (default: <os>-<arch>-<N>cpu).
set -eu
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
MACHINE="${MACHINE:-$("$PYTHON" -c 'import os, platform; print(f"{platform.system().lower()}-{platform.machine()}-{os.cpu_count()}cpu")')}"
mkdir -p benchmarks/results
"$PYTHON" -m signedqueue bench \
    --json "benchmarks/results/$MACHINE.json" \
    --png docs/benchmarks.png \
    "$@" | tee "benchmarks/results/$MACHINE.txt"
"$PYTHON" benchmarks/report.py "benchmarks/results/$MACHINE.json"
