"""Default locations, each overridable by an environment variable.

``vkd demo`` writes under ``$VKD_HOME/demo``; ``vkd search`` and ``vkd serve`` without
``--index`` open ``$VKD_INDEX``, which defaults to the demo's index.
"""

from __future__ import annotations

import os
from pathlib import Path


def vkd_home() -> Path:
    return Path(os.environ.get("VKD_HOME", Path.home() / ".cache" / "vkd")).expanduser()


def default_demo_dir() -> Path:
    return vkd_home() / "demo"


def default_index_dir() -> Path:
    env = os.environ.get("VKD_INDEX")
    return Path(env).expanduser() if env else default_demo_dir() / "index"
