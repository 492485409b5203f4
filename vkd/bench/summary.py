"""``OUT/RESULTS.md``: every benchmark's Markdown of one run, in order, under the command.

``benchmarks/run_all.py`` copies it (and the plots it shows) into ``benchmarks/`` as the
committed record of the latest full run.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from vkd.indexer.fsutil import atomic_write_bytes

SUMMARY_NAME = "RESULTS.md"
_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")


def write_summary(out_dir: str | os.PathLike[str], names: Sequence[str], *, command: str,
                  failures: Mapping[str, str] | None = None, source: str | None = None) -> Path:
    """Concatenate ``<name>.md`` of ``names`` into ``OUT/RESULTS.md``; list ``failures``;
    ``source`` says where the models and data came from."""
    out = Path(out_dir)
    parts = [
        "# vkd benchmark results",
        "",
        f"Made by `{command}`. Every figure below was measured in that run; each section's JSON "
        "(`<name>.json` beside this file) holds the raw numbers and the machine.",
        "",
    ]
    if source:
        parts += [f"Models and data: {source}.", ""]
    for name in names:
        path = out / f"{name}.md"
        if path.is_file():
            parts += [path.read_text(encoding="utf-8").strip(), ""]
    for name, error in (failures or {}).items():
        parts += [f"## {name}", "", f"FAILED: {error}", ""]
    target = out / SUMMARY_NAME
    atomic_write_bytes(target, "\n".join(parts).encode())
    return target


def publish(out_dir: str | os.PathLike[str], target_dir: str | os.PathLike[str], figures: str = "figures") -> Path:
    """Copy ``OUT/RESULTS.md`` to ``target_dir/RESULTS.md`` and the images it shows to
    ``target_dir/<figures>/``, with the links rewritten to the copies."""
    out, target = Path(out_dir), Path(target_dir)
    source = out / SUMMARY_NAME
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no summary to publish; run `vkd bench all` first")
    text = source.read_text(encoding="utf-8")
    (target / figures).mkdir(parents=True, exist_ok=True)

    def relink(match: re.Match[str]) -> str:
        image = out / match.group(2)
        if not image.is_file():
            return match.group(0)
        shutil.copyfile(image, target / figures / image.name)
        return f"![{match.group(1)}]({figures}/{image.name})"

    published = target / SUMMARY_NAME
    published.write_text(_IMAGE.sub(relink, text), encoding="utf-8")
    return published
