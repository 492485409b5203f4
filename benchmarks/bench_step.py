"""The step benchmark alone: `vkd bench step` (same code, same options).

    python benchmarks/bench_step.py --quick --out results
"""

from __future__ import annotations

import sys

from vkd.bench.commands import bench

if __name__ == "__main__":
    bench.main(["step", *sys.argv[1:]], prog_name="vkd bench")
