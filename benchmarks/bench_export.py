"""The export benchmark alone: `vkd bench export` (same code, same options).

    python benchmarks/bench_export.py --quick --out results
"""

from __future__ import annotations

import sys

from vkd.bench.commands import bench

if __name__ == "__main__":
    bench.main(["export", *sys.argv[1:]], prog_name="vkd bench")
