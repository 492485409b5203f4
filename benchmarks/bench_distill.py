"""The distill benchmark alone: `vkd bench distill` (same code, same options).

    python benchmarks/bench_distill.py --quick --out results
"""

from __future__ import annotations

import sys

from vkd.bench.commands import bench

if __name__ == "__main__":
    bench.main(["distill", *sys.argv[1:]], prog_name="vkd bench")
