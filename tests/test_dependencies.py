"""The transformers range in pyproject.toml admits only releases vkd works with.

Each feature vkd relies on is listed with the release that brought it (read from the
released wheels' sources, and run: the model tests pass on 5.18.0 and fail on 5.17.0 without
torchvision). The lower bound must cover them all, and the installed transformers must
have every one of them.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# feature -> first transformers release that has it
FEATURES = {
    # Qwen3VLModel.base_model_prefix == "model": a Qwen3-VL(-Embedding) checkpoint, saved from
    # the ForConditionalGeneration class, loads into the base model; before, every weight was missing.
    "qwen3vl_base_model_prefix": "5.0.0",
    # Qwen3VLModel.forward(mm_token_type_ids=...), which Qwen3VLEmbeddingProcessor passes.
    "qwen3vl_mm_token_type_ids": "5.3.0",
    # image_processing_pil_* modules (CLIP, SigLIP, SigLIP 2, Qwen2-VL), vkd's torchvision-free processors.
    "pil_image_processors": "5.4.0",
    # `from transformers import AutoImageProcessor` without torchvision installed (before, the
    # lazy import table marked it as needing torchvision and handed out a dummy).
    "auto_image_processor_without_torchvision": "5.18.0",
}


def _version(text: str) -> tuple[int, ...]:
    parts = [int(part) for part in re.findall(r"\d+", text)[:3]]
    return tuple(parts + [0] * (3 - len(parts)))  # "5.18" == "5.18.0"


def _pyproject_bound() -> str:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    bounds = [m.group(1) for r in requirements if (m := re.fullmatch(r"transformers\s*>=\s*([\d.]+)", r.strip()))]
    assert len(bounds) == 1, f"expected one transformers>=X requirement, found {bounds}"
    return bounds[0]


def test_the_lower_bound_covers_every_feature_vkd_needs() -> None:
    bound = _pyproject_bound()
    too_new = {name: since for name, since in FEATURES.items() if _version(since) > _version(bound)}
    assert not too_new, f"transformers>={bound} admits releases without {too_new}"
    pinned = re.search(r"^transformers==([\d.]+)$", (ROOT / "constraints.txt").read_text(), re.MULTILINE)
    assert pinned and _version(pinned.group(1)) >= _version(bound)


def test_the_installed_transformers_is_in_range() -> None:
    import transformers

    assert _version(transformers.__version__) >= _version(_pyproject_bound())


def _transformers_imports() -> list[tuple[str, str, str | None]]:
    """(file, module, name) of every transformers import in vkd, top-level or inside functions."""
    found = []
    for path in sorted((ROOT / "vkd").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "transformers":
                found += [(path.relative_to(ROOT).as_posix(), node.module, alias.name) for alias in node.names]
            elif isinstance(node, ast.Import):
                found += [(path.relative_to(ROOT).as_posix(), alias.name, None)
                          for alias in node.names if alias.name.split(".")[0] == "transformers"]
    return found


def test_every_name_vkd_imports_from_transformers_exists() -> None:
    from transformers.utils import import_utils

    dummy = getattr(import_utils, "DummyObject", None)
    imports = _transformers_imports()
    assert any(name == "AutoImageProcessor" for _, _, name in imports)
    problems = []
    for where, module_name, name in imports:
        # vkd's fallback for transformers 4.x; the bound rules it out, and it may be gone
        if module_name.endswith("image_processing_qwen2_vl") and name == "Qwen2VLImageProcessor":
            continue
        try:
            module = importlib.import_module(module_name)
            value = getattr(module, name) if name else module
        except (ImportError, AttributeError) as error:
            problems.append(f"{where}: from {module_name} import {name}: {error}")
            continue
        if dummy is not None and isinstance(value, dummy):
            problems.append(f"{where}: {module_name}.{name} is a placeholder for a missing backend")
    assert not problems, "\n".join(problems)


def test_qwen3vl_takes_mm_token_type_ids_and_loads_a_generation_checkpoint(tiny_qwen3vl: Path) -> None:
    from transformers import Qwen3VLModel

    assert "mm_token_type_ids" in inspect.signature(Qwen3VLModel.forward).parameters
    # the tiny model is saved from Qwen3VLForConditionalGeneration, as the hub checkpoints are
    model, info = Qwen3VLModel.from_pretrained(tiny_qwen3vl, output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert model.base_model_prefix == "model"


@pytest.mark.parametrize("module", ["clip", "siglip", "siglip2", "qwen2_vl"])
def test_the_pil_image_processors_exist(module: str) -> None:
    importlib.import_module(f"transformers.models.{module}.image_processing_pil_{module}")
