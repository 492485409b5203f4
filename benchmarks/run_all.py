"""Run every benchmark and publish the results as benchmarks/RESULTS.md (+ figures/).

    python benchmarks/run_all.py              # the full run (needs `vkd demo` first)
    python benchmarks/run_all.py --quick      # the smoke run; publishes nothing

Options after the script name go to `vkd bench all` (see `vkd bench all --help`); the
results land in --out (default results/, not committed). A full run that succeeds is
copied to benchmarks/RESULTS.md with its plots in benchmarks/figures/.
"""

from __future__ import annotations

import sys
from pathlib import Path

from vkd.bench.commands import DEFAULT_OUT, bench
from vkd.bench.summary import publish

HERE = Path(__file__).resolve().parent


def out_dir(argv: list[str]) -> Path:
    """The --out that `vkd bench all` wrote to, given as `--out DIR` or `--out=DIR`."""
    out = DEFAULT_OUT
    for position, arg in enumerate(argv):
        if arg == "--out" and position + 1 < len(argv):
            out = Path(argv[position + 1])
        elif arg.startswith("--out="):
            out = Path(arg.removeprefix("--out="))
    return out


def main(argv: list[str]) -> int:
    try:
        bench.main(["all", *argv], prog_name="vkd bench", standalone_mode=False)
    except SystemExit as exit_:  # click's --help exits through here
        return int(exit_.code or 0)
    except Exception as error:  # click.ClickException and friends: show them as the CLI would
        show = getattr(error, "show", None)
        if show is None:
            raise
        show()
        return int(getattr(error, "exit_code", 1))
    if "--quick" in argv:
        print("quick run: benchmarks/RESULTS.md left as it is (it records full runs only)")
        return 0
    print(f"published {publish(out_dir(argv), HERE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
