"""Where the benchmarks get their models and data: the one function to switch.

``resolve_source`` returns a :class:`BenchSource` — teacher, students, INT8 export, the
held-out pair file, the training pair file, an image folder to index and an index of real
images — from, in order of precedence:

1. paths given on the command line (``--data`` plus ``--teacher`` and ``--student``; any
   pair file works, e.g. Flickr30k's test split);
2. the demo's output directory (``vkd demo``; ``vkd.paths.default_demo_dir()`` unless
   ``--demo-dir`` says otherwise);
3. with ``--quick`` only: the demo run in quick mode into ``OUT/.work/demo-quick`` (and
   reused from there), so a smoke run needs nothing prepared.

Without any of them a full run stops and says to run ``vkd demo`` first (or pass ``--quick``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

QUICK_DEMO = "quick demo built by vkd bench"


class SourceError(ValueError):
    """The models or data a benchmark needs are not there; the message says how to get them."""


@dataclass
class BenchSource:
    origin: str  # "given", "demo" or QUICK_DEMO
    root: Path | None
    teacher: str
    student: str  # the distilled student: what search, export and index use
    test_pairs: Path
    student_raw: str | None = None
    student_ce: str | None = None
    int8_dir: Path | None = None  # ONNX export of ``student`` with INT8 towers
    train_pairs: Path | None = None
    val_pairs: Path | None = None  # the split settings are chosen on (never the test split)
    images_dir: Path | None = None  # a folder for the index benchmark
    index_dir: Path | None = None  # an index of real images with student + teacher vectors
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {key: (str(value) if isinstance(value, Path) else value) for key, value in asdict(self).items()}

    def require(self, what: str, value: Any, hint: str) -> Any:
        if value is None:
            raise SourceError(f"this benchmark needs {what}, and the {self.origin} source has none: {hint}")
        return value


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def _int8_dir(student: str) -> Path | None:
    onnx = Path(student) / "onnx"
    if not (onnx / "export.json").is_file():
        return None
    import json

    manifest = json.loads((onnx / "export.json").read_text())
    towers = [manifest.get(tower) for tower in ("text", "image") if manifest.get(tower)]
    return onnx if towers and all(tower.get("int8") for tower in towers) else None


def test_split_folder(pairs: Path, folder: Path) -> Path:
    """A folder of links to the unique images of ``pairs`` (the index benchmark's input when
    the images live among many others, as Flickr30k's do)."""
    from vkd.data.pairs import read_pairs

    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(read_pairs(pairs).images()):
        link = folder / f"{index:06d}{image.suffix.lower()}"
        if not link.exists():
            try:
                link.symlink_to(image.resolve())
            except OSError:  # no symlinks here (some file systems): copy instead
                import shutil

                shutil.copyfile(image, link)
    return folder


def given_source(
    *,
    data: Path,
    teacher: str,
    student: str,
    student_raw: str | None = None,
    student_ce: str | None = None,
    int8: Path | None = None,
    train_data: Path | None = None,
    images: Path | None = None,
    index: Path | None = None,
    workdir: Path,
) -> BenchSource:
    """Models and data named on the command line."""
    if not Path(data).is_file():
        raise SourceError(f"--data {data}: no such pair file; give a .jsonl of image-text pairs "
                          "(e.g. test.jsonl from `vkd data flickr30k`)")
    for option, path in (("--teacher", teacher), ("--student", student), ("--student-raw", student_raw),
                         ("--student-ce", student_ce)):
        if path is not None and Path(path).exists() and not _is_model_dir(Path(path)):
            raise SourceError(f"{option} {path}: not a model directory (no config.json)")
    int8_dir = Path(int8) if int8 is not None else _int8_dir(student)
    notes = []
    if images is None:
        images = test_split_folder(Path(data), workdir / "test-images")
        notes.append(f"index benchmark input: links to the {data} images in {images}")
    return BenchSource("given", None, teacher, student, Path(data), student_raw=student_raw, student_ce=student_ce,
                       int8_dir=int8_dir, train_pairs=Path(train_data) if train_data else None,
                       images_dir=Path(images), index_dir=Path(index) if index else None, notes=notes)


def demo_layout(demo_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Where ``vkd demo`` puts each part (the layout documented in ``vkd.demo``).

    ``results.json``, written last, names the teacher, student and index it used; the
    documented locations stand in for any it does not name.
    """
    root = Path(demo_dir)
    layout = {
        "results": root / "results.json",
        "data": root / "data",
        "train": root / "data" / "train.jsonl",
        "test": root / "data" / "test.jsonl",
        "val": root / "data" / "val.jsonl",
        "images": root / "data" / "images",
        "test_images": root / "data" / "images" / "test",
        "teacher": root / "teacher" / "model",
        "student_raw": root / "student-raw" / "model",
        "student_ce": root / "student-ce" / "model",
        "student": root / "student-kd" / "model",
        "index": root / "index",
    }
    if layout["results"].is_file():
        import json

        try:
            paths = json.loads(layout["results"].read_text()).get("paths", {})
        except ValueError:
            paths = {}
        for key in ("teacher", "student", "index"):
            if paths.get(key):
                layout[key] = Path(paths[key])
    layout["int8"] = layout["student"] / "onnx"
    return layout


def demo_complete(demo_dir: str | os.PathLike[str]) -> bool:
    """Whether a demo run finished in ``demo_dir`` (it writes ``results.json`` last)."""
    layout = demo_layout(demo_dir)
    return all(layout[key].exists() for key in ("results", "teacher", "student", "test"))


def demo_source(demo_dir: Path, *, quick: bool, origin: str = "demo") -> BenchSource:
    """The models and data ``vkd demo`` left in ``demo_dir``.

    The index benchmark indexes the test images in quick mode and every demo image
    (train, val and test) otherwise.
    """
    layout = demo_layout(demo_dir)
    missing = [key for key in ("teacher", "student", "test") if not layout[key].exists()]
    if missing:
        raise SourceError(f"{demo_dir}: the demo output is incomplete (no {', '.join(missing)}); "
                          "run `vkd demo` again")

    def optional(key: str) -> Path | None:
        return layout[key] if layout[key].exists() else None

    raw, ce = optional("student_raw"), optional("student_ce")
    images = optional("test_images") if quick else optional("images")
    return BenchSource(
        origin, Path(demo_dir), str(layout["teacher"]), str(layout["student"]), layout["test"],
        student_raw=str(raw) if raw else None, student_ce=str(ce) if ce else None,
        int8_dir=_int8_dir(str(layout["student"])), train_pairs=optional("train"), val_pairs=optional("val"),
        images_dir=images, index_dir=optional("index"),
    )


def build_quick_demo(out_dir: Path, progress: Callable[[str], None]) -> Path:
    """Run the demo in quick mode into ``out_dir`` (reused when a finished run is there)."""
    if demo_complete(out_dir):
        progress(f"reusing the quick demo in {out_dir}")
        return out_dir
    progress(f"no demo found: running the demo in quick mode into {out_dir}")
    from vkd.demo import run_demo

    run_demo(out_dir, quick=True)
    return out_dir


def resolve_source(
    *,
    quick: bool,
    out_dir: Path,
    demo_dir: Path | None = None,
    data: Path | None = None,
    teacher: str | None = None,
    student: str | None = None,
    student_raw: str | None = None,
    student_ce: str | None = None,
    int8: Path | None = None,
    train_data: Path | None = None,
    images: Path | None = None,
    index: Path | None = None,
    progress: Callable[[str], None] = lambda message: None,
) -> BenchSource:
    """Pick the source (see the module docstring); raise ``SourceError`` saying what to do."""
    workdir = Path(out_dir) / ".work"
    named = {"--data": data, "--teacher": teacher, "--student": student}
    if any(value is not None for value in named.values()):
        missing = [option for option, value in named.items() if value is None]
        if missing:
            raise SourceError(f"benchmarking your own models needs --data, --teacher and --student together; "
                              f"missing {', '.join(missing)}")
        source = given_source(data=Path(data), teacher=str(teacher), student=str(student),
                              student_raw=student_raw, student_ce=student_ce, int8=int8, train_data=train_data,
                              images=images, index=index, workdir=workdir)
    else:
        from vkd.paths import default_demo_dir

        demo = Path(demo_dir) if demo_dir is not None else default_demo_dir()
        if demo_complete(demo):
            source = demo_source(demo, quick=quick)
        elif demo_dir is not None:
            raise SourceError(f"--demo-dir {demo_dir}: no finished demo there (no results.json); run "
                              f"`vkd demo --out {demo_dir}` first, or leave --demo-dir out")
        elif quick:
            source = demo_source(build_quick_demo(workdir / "demo-quick", progress), quick=True,
                                 origin=QUICK_DEMO)
        else:
            raise SourceError(
                f"no demo output in {demo}: run `vkd demo` first (a few minutes on a CPU), pass --demo-dir "
                "if it is elsewhere, use --quick to build a small demo for this run, or name your own "
                "models and data with --data, --teacher and --student"
            )
    overrides = {"student_raw": student_raw, "student_ce": student_ce, "int8_dir": int8,
                 "train_pairs": train_data, "images_dir": images, "index_dir": index}
    for key, value in overrides.items():
        if value is not None:
            setattr(source, key, Path(value) if key.endswith(("_dir", "_pairs")) else str(value))
    return source


def scratch_dir(out_dir: str | os.PathLike[str], name: str) -> Path:
    path = Path(out_dir) / ".work" / name
    path.mkdir(parents=True, exist_ok=True)
    return path
