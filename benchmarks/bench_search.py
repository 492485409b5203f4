"""The search benchmark alone: `vkd bench search` (same code, same options).

    python benchmarks/bench_search.py --quick --out results
"""

from __future__ import annotations

import sys

from vkd.bench.commands import bench

if __name__ == "__main__":
    bench.main(["search", *sys.argv[1:]], prog_name="vkd bench")
