#!/usr/bin/env python
"""
Coverage-guided fuzz target for ``signedqueue.Codec.loads`` (atheris).

    python fuzz/fuzz_codec.py --make-seeds fuzz/seeds     # write the seed corpus
    python fuzz/fuzz_codec.py -max_total_time=60 -rss_limit_mb=2048 -timeout=10 \
        fuzz/corpus fuzz/seeds

See fuzz/README.md, and fuzz/harness.py for the input format.  Any exception
out of ``loads`` other than a RejectedFrame, any warning, a hang (-timeout)
or a memory blow-up (-rss_limit_mb) is a finding: libFuzzer writes the input
to crash-*/timeout-*/oom-* and exits non-zero.
"""

from __future__ import annotations

import logging
import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

with atheris.instrument_imports(include=["signedqueue", "msgpack", "harness"]):
    import harness

# Refusals are logged at WARNING; a fuzzer makes millions of them.
logging.getLogger("signedqueue").setLevel(logging.CRITICAL + 1)


#: SIGNEDQUEUE_FUZZ_GC=1: collect garbage after every input (slower), so that
#: errors CPython prints while freeing an input's leftovers are findings too.
COLLECT = os.environ.get("SIGNEDQUEUE_FUZZ_GC") == "1"


def test_one_input(data: bytes) -> None:
    harness.check(data, collect=COLLECT)


def make_seeds(directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    for name, data in harness.seeds().items():
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)
    print(f"wrote {len(harness.seeds())} seeds to {directory}")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--make-seeds":
        make_seeds(sys.argv[2])
        return
    # Seeds are generated on the fly when fuzz/seeds does not exist yet.
    here = os.path.dirname(os.path.abspath(__file__))
    seeds_dir = os.path.join(here, "seeds")
    if not os.path.isdir(seeds_dir):
        make_seeds(seeds_dir)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
