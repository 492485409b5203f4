"""The index benchmark alone: `vkd bench index` (same code, same options).

    python benchmarks/bench_index.py --quick --out results
"""

from __future__ import annotations

import sys

from vkd.bench.commands import bench

if __name__ == "__main__":
    bench.main(["index", *sys.argv[1:]], prog_name="vkd bench")
