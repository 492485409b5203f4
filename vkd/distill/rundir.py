"""A ``vkd distill`` output directory where a model directory is expected.

Users naturally pass the run folder (``runs/x``) where the merged student (``runs/x/model``)
is meant; ``resolve_model_dir`` turns the one into the other, and every CLI command that
takes a model resolves its argument through it (and says so). Importing this module pulls
in the standard library only, so commands can use it before any heavy import.
"""

from __future__ import annotations

import os
from pathlib import Path

MODEL_SUBDIR = "model"
# Files only a distill run writes at the top of its output_dir (see vkd.distill.trainer).
RUN_MARKERS = ("config.yaml", "report.json", "metrics.jsonl", "checkpoints")


def is_distill_run(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a ``vkd distill`` output_dir (finished or not), not a model directory."""
    path = Path(path).expanduser()
    return (path.is_dir() and not (path / "config.json").exists()
            and any((path / marker).exists() for marker in RUN_MARKERS))


def resolve_model_dir(path: str | os.PathLike[str]) -> str:
    """``path`` itself, or ``path/model`` when ``path`` is a distill run's output_dir.

    Anything else (a model directory, a hub id, a missing path) comes back unchanged, for
    the loader to open or to reject with its own message. A run without ``model/`` yet (still
    running, or stopped before its end) is a ``ValueError`` naming what is missing.
    """
    if not is_distill_run(path):
        return str(path)
    model = Path(path) / MODEL_SUBDIR
    if not (model / "config.json").is_file():
        raise ValueError(f"{path} is a vkd distill run without a model yet: {model} is written when the run "
                         "ends; wait for it, or continue a stopped run with resume_from_checkpoint: latest")
    return str(model)


def resolve_model_option(name: str, use: str) -> str:
    """``resolve_model_dir`` for a CLI option: a run without a model is a one-line error, and
    a resolved run is said on stderr (stdout stays parseable for --json). ``use`` completes
    that note, with ``{model}`` for the model directory: "evaluating {model}"."""
    import click

    try:
        resolved = resolve_model_dir(name)
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    if resolved != str(name):
        click.echo(f"{name} is a vkd distill run; " + use.format(model=resolved), err=True)
    return resolved
