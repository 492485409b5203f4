"""Shared pieces of the reliability suite (see docs/reliability.md).

Long variants (many kills, long fuzz runs) are marked ``long`` and run only with
``VKD_RELIABILITY_LONG=1``; the default run keeps every probe, with fewer repetitions.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

LONG = os.environ.get("VKD_RELIABILITY_LONG") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if LONG:
        return
    skip = pytest.mark.skip(reason="long reliability variant: set VKD_RELIABILITY_LONG=1 to run it")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)


def noise_image(rng: np.random.Generator, width: int = 40, height: int = 32) -> Image.Image:
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def plain_folder(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` small random PNGs named img000.png, img001.png, ..."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        noise_image(rng).save(root / f"img{i:03d}.png")
    return root


# -- figures the crash, concurrency and fuzz tests measure (kills landed, examples tried) ---------
#
# A test calls the ``reliability_figures`` fixture with keyword figures. Each call is printed,
# attached to the test's report (``record_property``: junit XML), appended as one JSON line to
# ``<pytest basetemp>/reliability-figures.jsonl`` (and to ``$VKD_RELIABILITY_REPORT`` when set),
# and listed in a "reliability figures" section at the end of the run, with or without ``-s``.

_RELIABILITY_FIGURES: list[dict] = []


@pytest.fixture
def reliability_figures(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                        record_property: object) -> object:
    import json

    def report(**figures: object) -> None:
        line = {"test": request.node.nodeid, **figures}
        text = json.dumps(line, sort_keys=True, default=str)
        print(f"[reliability] {text}")
        for key, value in figures.items():
            record_property(key, value)
        targets = [tmp_path_factory.getbasetemp() / "reliability-figures.jsonl"]
        if os.environ.get("VKD_RELIABILITY_REPORT"):
            targets.append(Path(os.environ["VKD_RELIABILITY_REPORT"]))
        for target in targets:
            with open(target, "a", encoding="utf-8") as handle:
                handle.write(text + "\n")
        _RELIABILITY_FIGURES.append(line)

    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int,
                            config: pytest.Config) -> None:
    import json

    if not _RELIABILITY_FIGURES:
        return
    terminalreporter.section("reliability figures")
    for line in _RELIABILITY_FIGURES:
        terminalreporter.write_line(json.dumps(line, sort_keys=True, default=str))
