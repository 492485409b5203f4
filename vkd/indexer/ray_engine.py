"""``vkd index --engine ray``: the indexer's stages on Ray Data, on one machine or a cluster.

The same stages as ``build.build_index``, the same plan and the same files:

* the **driver** (this process) takes the writer lock, lists the files once and makes the
  incremental plan (``build.plan_run``: new, changed, retired) exactly as a local run does;
* **decode** runs as stateless Ray Data tasks (``decode.decode_file`` per file, in blocks of
  ``decode_rows`` files), so reading and decoding spread over every CPU of the cluster;
* **encode** runs in a pool of ``num_workers`` stateful actors (``encode.EncodeStage``), each
  loading the models once, on ``gpus_per_worker`` GPUs when given; Ray Data restarts an actor
  that dies and retries its batches (``max_restarts=-1``, ``max_task_retries=-1``);
* **write** runs as Ray Data tasks over the encoded rows, up to ``shard_size`` rows a task:
  ``shards.make_record_batch`` + ``shards.write_shard``, the local writer's own functions,
  so a shard is byte-for-byte the format a local run writes;
* the driver alone **commits**: each finished shard's manifest entry, the rows it retires and
  the files skipped are published by ``manifest.commit_manifest`` (atomic replace), shard by
  shard as they arrive, so a killed run loses at most the shards in flight.

Shard numbers: a write task names its shard ``next_shard + seq`` where ``seq`` is the lowest
plan position among its rows. Row sets of tasks are disjoint, so names are unique without any
coordination between workers; a retried task writes the same rows under the same name (each
file atomically). Before anything runs, the driver commits ``next_shard`` past the whole range
this run may use, so a later run never reuses a name a worker of a killed run may still be
writing. Numbers have gaps; the format (``shard-NNNNN``) and every reader are unaffected.

Every path (images and index) must be the same on every node: a shared file system, or one
machine. Moved or copied files are re-encoded here (the local engine copies their vectors).
"""

from __future__ import annotations

import os
import pickle
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vkd.indexer.build import (
    BuildResult,
    IndexMismatchError,
    _ann_specs,
    _check_compatible,
    _check_out_dir,
    _recorded_options,
    _remove_uncommitted,
    _teacher_ann_of,
    default_out_dir,
    parse_bytes,
    prepare_run,
)
from vkd.indexer.decode import DEFAULT_MAX_PIXELS, Decoded, decode_file, pixel_guard
from vkd.indexer.faiss_index import INDEX_TYPES
from vkd.indexer.fsutil import writer_lock
from vkd.indexer.manifest import (
    MANIFEST_NAME,
    ManifestError,
    commit_manifest,
    model_record,
    new_manifest,
    read_manifest,
    remove_unlisted,
    vector_spaces,
    write_skipped,
)
from vkd.indexer.scan import FileEntry, SkipRecord, file_id
from vkd.indexer.shards import make_record_batch, now_iso, shard_name, write_shard
from vkd.indexer.verify import repair_shards

RAY_MISSING = ('--engine ray needs Ray Data: pip install "vkd[ray]" (or pip install "ray[data]"), '
               "or leave out --engine to index in this process")


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401  (the extra "ray[data]" brings pandas and the Data library)
    except ImportError as error:
        raise ImportError(f"{RAY_MISSING} ({error})") from None
    return ray


# ---------------------------------------------------------------------------------------------
# The stages, as Ray Data runs them. Module-level so that workers import them by name.


def _entries(batch: Mapping[str, Any]) -> list[tuple[int, FileEntry]]:
    # paths travel as bytes: a file name that is not UTF-8 cannot be an Arrow string
    return [(int(seq), FileEntry(os.fsdecode(bytes(path)), os.fsdecode(bytes(abspath)), int(size), int(mtime)))
            for seq, path, abspath, size, mtime in zip(batch["seq"], batch["path"], batch["abspath"],
                                                       batch["size"], batch["mtime"], strict=True)]


def decode_task(batch: Mapping[str, Any], *, max_pixels: int) -> dict[str, list[Any]]:
    """Decode stage: one row per file, ``image`` a PIL image, or ``skip`` a pickled SkipRecord."""
    out: dict[str, list[Any]] = {key: [] for key in ("seq", "path", "size", "mtime", "sha256", "width",
                                                     "height", "captured", "has_captured", "image", "skip")}
    with pixel_guard(max_pixels):  # this task's process only: it decodes nothing else meanwhile
        for seq, entry in _entries(batch):
            result = decode_file(entry, max_pixels=max_pixels)
            out["seq"].append(seq)
            out["path"].append(os.fsencode(entry.path))
            out["size"].append(entry.size)
            out["mtime"].append(entry.mtime)
            decoded = isinstance(result, Decoded)
            out["sha256"].append(result.sha256 if decoded else "")
            out["width"].append(result.width if decoded else 0)
            out["height"].append(result.height if decoded else 0)
            # a nullable int64 becomes float64 in a numpy batch, and ns timestamps need 63 bits
            out["captured"].append(result.captured if decoded and result.captured is not None else 0)
            out["has_captured"].append(decoded and result.captured is not None)
            out["image"].append(result.image if decoded else None)
            out["skip"].append(b"" if decoded else pickle.dumps(result))
    return out


class EncodeActor:
    """Encode stage: one ``EncodeStage`` (the models, loaded once) per actor."""

    def __init__(self, *, student: str, teacher: str | None, batch_size: int, device: Any,
                 student_options: dict[str, Any] | None, teacher_options: dict[str, Any] | None,
                 prefer: str | None, torch_threads: int | None) -> None:
        if torch_threads:
            try:  # an actor gets a share of the node's CPUs: torch must not spin on all of them
                import torch

                torch.set_num_threads(torch_threads)
            except ImportError:
                pass
        from vkd.indexer.encode import EncodeStage

        self.stage = EncodeStage(student, teacher, batch_size=batch_size, device=device,
                                 student_options=student_options, teacher_options=teacher_options,
                                 prefer=prefer)
        self.student_dim = int(self.stage.student.dim)
        self.teacher_dim = int(self.stage.teacher.dim) if self.stage.teacher is not None else None

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        n = len(batch["seq"])
        keep = [i for i in range(n) if not len(batch["skip"][i])]
        student = np.zeros((n, self.student_dim), dtype=np.float32)
        teacher = np.zeros((n, self.teacher_dim), dtype=np.float16) if self.teacher_dim else None
        skip = [bytes(value) for value in batch["skip"]]
        if keep:
            encoded = self.stage.encode([batch["image"][i] for i in keep])
            rows = [keep[i] for i in encoded.ok]
            student[rows] = encoded.student
            if teacher is not None:
                teacher[rows] = encoded.teacher
            for position, reason in encoded.failed.items():
                row = keep[position]
                entry_path = os.fsdecode(bytes(batch["path"][row]))
                skip[row] = pickle.dumps(SkipRecord(entry_path, reason, int(batch["size"][row]),
                                                    int(batch["mtime"][row])))
        out = {key: batch[key] for key in ("seq", "path", "size", "mtime", "sha256", "width", "height", "captured",
                                                   "has_captured")}
        out["skip"] = np.array(skip, dtype=object)
        out["student_vec"] = student
        if teacher is not None:
            out["teacher_vec"] = teacher
        return out


def write_task(batch: Mapping[str, Any], *, index_dir: str, first_number: int, metadata: dict[str, str],
               share: int | None, index_type: str, teacher_prefix: int | None = None) -> dict[str, list[Any]]:
    """Write stage: the encoded rows as one shard (the local writer's functions), and what the
    driver needs to commit it: the manifest entry, every path this shard settles, the skips."""
    seqs = [int(s) for s in batch["seq"]]
    paths = [os.fsdecode(bytes(p)) for p in batch["path"]]
    skips = [pickle.loads(bytes(s)) for s in batch["skip"] if len(s)]
    ok = [i for i, s in enumerate(batch["skip"]) if not len(s)]
    entry = None
    if ok:
        columns = {"id": [file_id(paths[i]) for i in ok], "path": [paths[i] for i in ok],
                   "size": [int(batch["size"][i]) for i in ok], "mtime": [int(batch["mtime"][i]) for i in ok],
                   "sha256": [str(batch["sha256"][i]) for i in ok], "width": [int(batch["width"][i]) for i in ok],
                   "height": [int(batch["height"][i]) for i in ok],
                   "captured": [int(batch["captured"][i]) if batch["has_captured"][i] else None for i in ok]}
        student = np.asarray(batch["student_vec"], dtype=np.float32)[ok]
        teacher = np.asarray(batch["teacher_vec"], dtype=np.float16)[ok] if "teacher_vec" in batch else None
        record_batch = make_record_batch(columns, student, teacher, metadata)
        # the local writer's rule for the shard's FAISS indexes (and the teacher ANN, when the index has one)
        spec, teacher_spec = _ann_specs(len(ok), student.shape[1], teacher_prefix, share, index_type)
        _limit_faiss_threads()
        entry = write_shard(Path(index_dir), shard_name(first_number + min(seqs)), record_batch, spec,
                            teacher_spec=teacher_spec, teacher_ann_dim=teacher_prefix)
    return {"entry": [pickle.dumps(entry)], "paths": [pickle.dumps(paths)], "skips": [pickle.dumps(skips)]}


def _limit_faiss_threads() -> None:
    # a write task holds one CPU of the cluster's accounting: FAISS must not take them all
    import faiss

    faiss.omp_set_num_threads(1)


def describe_models(student: str, teacher: str | None, *, device: Any, student_options: dict[str, Any] | None,
                    teacher_options: dict[str, Any] | None, prefer: str | None) -> dict[str, Any]:
    """The manifest records of the models and how they run, as an encode actor loads them."""
    from vkd.indexer.encode import EncodeStage, backend_label

    stage = EncodeStage(student, teacher, batch_size=1, device=device, student_options=student_options,
                        teacher_options=teacher_options, prefer=prefer)
    return {"student": model_record(stage.student.describe()),
            "teacher": model_record(stage.teacher.describe()) if stage.teacher is not None else None,
            "student_backend": backend_label(stage.student),
            "teacher_backend": backend_label(stage.teacher) if stage.teacher is not None else None}


# ---------------------------------------------------------------------------------------------
# The driver.


def _model_name(model: Any, role: str) -> str | None:
    if model is None:
        return None
    if not isinstance(model, (str, os.PathLike)):
        raise ValueError(f"--engine ray loads the {role} in each worker: give it as a model directory or hub id, "
                         f"not a loaded Encoder")
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else str(model)


def build_index_ray(
    images_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    student: str | os.PathLike[str],
    teacher: str | os.PathLike[str] | None = None,
    batch_size: int = 32,
    shard_size: int = 50_000,
    index_type: str = "auto",
    memory_budget: int | str | None = None,
    rebuild: bool = False,
    show_progress: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    device: Any = None,
    follow_links: bool = False,
    student_options: dict[str, Any] | None = None,
    teacher_options: dict[str, Any] | None = None,
    prefer: str | None = None,
    ray_address: str | None = None,
    num_workers: int | None = None,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: float = 1.0,
    decode_rows: int | None = None,
    num_cpus: int | None = None,
    on_commit: Callable[[dict[str, Any]], None] | None = None,
    teacher_ann: bool | None = None,
    teacher_ann_dim: int | None = None,
) -> BuildResult:
    """``build.build_index`` on Ray Data: same arguments, same plan, same files on disk.

    ``ray_address``: a running cluster (``ray://host:10001``, ``auto``); None takes
    ``RAY_ADDRESS`` when set, else starts Ray on this machine (``num_cpus`` of its CPUs, default
    all); a Ray this process already started (``ray.init``) is used as it is. ``num_workers`` encode actors (default: one per GPU with ``gpus_per_worker``, else
    one per ``cpus_per_worker`` CPUs less one CPU for decoding), each with ``gpus_per_worker``
    GPUs and ``cpus_per_worker`` CPUs. ``decode_rows`` files per decode task (default
    ``batch_size``). ``on_commit(manifest)`` is called after each commit (progress, tests).
    """
    ray = _import_ray()
    root = Path(images_dir).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{images_dir}: not a directory of images")
    index_dir = default_out_dir(root) if out_dir is None else Path(out_dir).expanduser().resolve()
    if index_dir == root:
        raise ValueError(f"--out {index_dir} is the images folder itself; choose another directory")
    for name, value in (("batch_size", batch_size), ("shard_size", shard_size), ("max_pixels", max_pixels)):
        if int(value) < 1:
            raise ValueError(f"{name}={value}: must be at least 1")
    if index_type not in INDEX_TYPES:
        raise ValueError(f"index_type={index_type!r}: choose one of {', '.join(INDEX_TYPES)}")
    if gpus_per_worker < 0 or cpus_per_worker < 0:
        raise ValueError(f"--gpus-per-worker {gpus_per_worker} / cpus per worker {cpus_per_worker}: must be >= 0")
    budget = parse_bytes(memory_budget)
    if budget is not None and budget <= 0:
        raise ValueError(f"memory_budget={memory_budget!r}: must be positive")
    student_name, teacher_name = _model_name(student, "student"), _model_name(teacher, "teacher")
    if not rebuild:
        student_options = _recorded_options(index_dir, "student", student_name, student_options)
        teacher_options = _recorded_options(index_dir, "teacher", teacher_name, teacher_options)

    started_ray = False
    if not ray.is_initialized():
        from ray.runtime_env import RuntimeEnv

        # workers started on this machine inherit the environment; HF_HUB_OFFLINE and friends must
        # reach workers of a remote cluster too
        env = {key: os.environ[key] for key in ("HF_HUB_OFFLINE", "HF_HOME", "VKD_HOME", "OMP_WAIT_POLICY",
                                                 "TOKENIZERS_PARALLELISM") if key in os.environ}
        # no address: RAY_ADDRESS if set, else a new Ray on this machine ("local"); ray.init(None) would
        # silently join whatever Ray instance last ran here
        address = ray_address or os.environ.get("RAY_ADDRESS") or "local"
        options: dict[str, Any] = {"address": address, "ignore_reinit_error": True, "log_to_driver": False,
                                   "runtime_env": RuntimeEnv(env_vars=env)}
        if address == "local":
            options.update(num_cpus=num_cpus, include_dashboard=False)
        ray.init(**options)
        started_ray = True
    try:
        return _run(ray, root, index_dir, student_name, teacher_name, batch_size=batch_size, shard_size=shard_size,
                    index_type=index_type, budget=budget, rebuild=rebuild, show_progress=show_progress,
                    max_pixels=max_pixels, device=device, follow_links=follow_links,
                    student_options=student_options, teacher_options=teacher_options, prefer=prefer,
                    num_workers=num_workers, gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker,
                    decode_rows=decode_rows or batch_size, on_commit=on_commit, teacher_ann=teacher_ann,
                    teacher_ann_dim=teacher_ann_dim)
    finally:
        if started_ray:
            ray.shutdown()


def _default_workers(ray: Any, gpus_per_worker: float, cpus_per_worker: float) -> int:
    resources = ray.cluster_resources()
    if gpus_per_worker > 0:
        return max(1, int(resources.get("GPU", 0) // gpus_per_worker))
    cpus = resources.get("CPU", 1) - 1  # one CPU left for the decode and write tasks
    return max(1, int(cpus // cpus_per_worker)) if cpus_per_worker > 0 else 1


def _run(ray: Any, root: Path, index_dir: Path, student: str, teacher: str | None, *, batch_size: int,
         shard_size: int, index_type: str, budget: int | None, rebuild: bool, show_progress: bool, max_pixels: int,
         device: Any, follow_links: bool, student_options: dict[str, Any] | None,
         teacher_options: dict[str, Any] | None, prefer: str | None, num_workers: int | None, gpus_per_worker: float,
         cpus_per_worker: float, decode_rows: int, on_commit: Callable[[dict[str, Any]], None] | None,
         teacher_ann: bool | None = None, teacher_ann_dim: int | None = None) -> BuildResult:
    import pyarrow as pa
    from ray.data import ActorPoolStrategy, DataContext

    options = {"device": device, "student_options": student_options, "teacher_options": teacher_options,
               "prefer": prefer}
    # the driver learns the models' fingerprints where the actors run (GPU, imports) and never loads
    # an 8B teacher itself; one extra model load per run
    described = ray.get(ray.remote(describe_models).options(num_gpus=gpus_per_worker or None)
                        .remote(student, teacher, **options))
    student_info, teacher_info = described["student"], described["teacher"]
    started = time.perf_counter()
    build_params = {"index_type": index_type, "memory_budget": budget, "shard_size": shard_size,
                    "max_pixels": max_pixels, "follow_links": bool(follow_links)}
    index_dir.mkdir(parents=True, exist_ok=True)
    result = BuildResult(index_dir, student_backend=described["student_backend"],
                         teacher_backend=described["teacher_backend"])
    workers = num_workers or _default_workers(ray, gpus_per_worker, cpus_per_worker)

    # From here to the first commit: build.build_index's own steps, through its own functions.
    with writer_lock(index_dir):
        committed = None
        if (index_dir / MANIFEST_NAME).exists():
            try:
                committed = read_manifest(index_dir)
            except ManifestError as error:
                if not rebuild:
                    raise ManifestError(f"{error}; pass --rebuild to start this index over") from None
        else:
            _check_out_dir(index_dir)
        result.removed_leftovers = remove_unlisted(index_dir, committed)
        if committed is not None and not rebuild:
            _check_compatible(index_dir, committed, root, student_info, teacher_info)
            if vector_spaces(committed).get("projected_vec") is not None:
                raise IndexMismatchError(
                    f"{index_dir}: this index holds projected student vectors (--projected); --engine ray does "
                    "not write them yet: add to it without --engine ray, or pass --rebuild")
        # as a local run: a new index with a teacher gets the teacher ANN, an existing one keeps its choice
        teacher_prefix = _teacher_ann_of(index_dir, committed, teacher_info, teacher_ann, teacher_ann_dim, rebuild)
        if (committed is not None and not rebuild and teacher_prefix is not None
                and not (vector_spaces(committed).get("teacher_vec") or {}).get("ann")):
            # a local run rewrites the committed shards to add it (build._upgrade_shards); the Ray
            # engine does not, and new shards alone would leave the old ones out of the teacher ANN
            raise IndexMismatchError(
                f"{index_dir}: adding a teacher ANN index to an existing index rewrites its shards: run it once "
                "without --engine ray, or pass --rebuild")
        if committed is not None and not rebuild:
            manifest = committed
            repaired = repair_shards(index_dir, manifest)
            result.repaired = repaired.rebuilt_faiss + repaired.dropped_shards
            if repaired:
                commit_manifest(index_dir, manifest)
        else:
            manifest = new_manifest(root, student_info, teacher_info, build_params)
            if teacher_prefix is not None:
                manifest["vectors"]["teacher_vec"]["ann"] = {"dim": int(teacher_prefix)}
            if committed is not None:
                manifest["next_shard"] = int(committed.get("next_shard", 0))
        manifest["build"] = build_params
        publish_each_shard = not (rebuild and committed is not None)

        run_start = prepare_run(index_dir, root, manifest, result, rebuild=rebuild, follow_links=follow_links,
                                max_pixels=max_pixels, budget=budget, shard_size=shard_size,
                                student_dim=int(student_info["dim"]), teacher_prefix=teacher_prefix,
                                index_type=index_type)
        plan, skips, share = run_start.plan, run_start.skips, run_start.share
        pending_retire: dict[str, list[str]] = {k: list(v) for k, v in plan.deleted.items()}

        first_number = int(manifest["next_shard"])
        unfinished = None
        if plan.todo or committed is None:
            unfinished = {"started": now_iso(), "pid": os.getpid(), "to_encode": len(plan.todo),
                          "rebuild": bool(rebuild), "engine": "ray"}
            marked = committed if not publish_each_shard else manifest
            marked["unfinished_run"] = unfinished
            # reserve every shard number this run may use before any worker writes one
            marked["next_shard"] = manifest["next_shard"] = first_number + len(plan.todo)
            if committed is None:
                write_skipped(index_dir, [])
            commit_manifest(index_dir, marked)

        def commit(retire: dict[str, list[str]], publish: bool = publish_each_shard) -> None:
            for shard in manifest["shards"]:
                if shard["name"] in retire:
                    shard["retired"] = sorted(set(shard["retired"]) | set(retire[shard["name"]]))
                    result.retired += len(retire[shard["name"]])
            if publish:
                manifest["skipped"] = write_skipped(index_dir, skips)
                commit_manifest(index_dir, manifest)
                if on_commit is not None:
                    on_commit(manifest)

        finished = False
        try:
            if plan.todo:
                context = DataContext.get_current()
                context.enable_progress_bars = show_progress
                table = pa.table({
                    "seq": pa.array(range(len(plan.todo)), type=pa.int64()),
                    "path": pa.array([os.fsencode(e.path) for e in plan.todo], type=pa.binary()),
                    "abspath": pa.array([os.fsencode(e.abspath) for e in plan.todo], type=pa.binary()),
                    "size": pa.array([e.size for e in plan.todo], type=pa.int64()),
                    "mtime": pa.array([e.mtime for e in plan.todo], type=pa.int64()),
                })
                # one block per decode task: blocks, not rows, are what Ray Data spreads over workers
                blocks = [table.slice(start, decode_rows) for start in range(0, table.num_rows, decode_rows)]
                metadata = {"vkd.student_fingerprint": student_info["fingerprint"],
                            "vkd.teacher_fingerprint": teacher_info["fingerprint"] if teacher_info else ""}
                torch_threads = max(1, int(cpus_per_worker)) if not gpus_per_worker else None
                dataset = (
                    ray.data.from_arrow(blocks)
                    .map_batches(decode_task, fn_kwargs={"max_pixels": max_pixels}, batch_size=None,
                                 batch_format="numpy", num_cpus=1)
                    .map_batches(EncodeActor, fn_constructor_kwargs={
                        "student": student, "teacher": teacher, "batch_size": batch_size,
                        "torch_threads": torch_threads, **options},
                        batch_size=batch_size, batch_format="numpy", compute=ActorPoolStrategy(size=workers),
                        num_gpus=gpus_per_worker or None, num_cpus=cpus_per_worker)
                    .map_batches(write_task, fn_kwargs={
                        "index_dir": str(index_dir), "first_number": first_number, "metadata": metadata,
                        "share": share, "index_type": index_type, "teacher_prefix": teacher_prefix},
                        batch_size=shard_size, batch_format="numpy", num_cpus=1)
                )
                for out in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                    for entry_pickle, paths_pickle, skips_pickle in zip(out["entry"], out["paths"], out["skips"],
                                                                        strict=True):
                        entry = pickle.loads(bytes(entry_pickle))
                        new_skips = pickle.loads(bytes(skips_pickle))
                        skips.extend(new_skips)
                        result.new_skips += len(new_skips)
                        if entry is not None:
                            manifest["shards"].append(entry)
                            result.shards_written += 1
                            result.added += int(entry["rows"])
                        for path in pickle.loads(bytes(paths_pickle)):
                            old = plan.old_rows.get(path)
                            if old is not None:
                                pending_retire.setdefault(old.shard, []).append(old.id)
                    # one commit for every shard that arrived together: the periodic commit
                    commit(pending_retire)
                    pending_retire = {}
            skips_changed = sorted(r.path for r in skips) != sorted(r.path for r in run_start.previous_skips)
            left_by_earlier_run = committed is not None and "unfinished_run" in committed
            if unfinished is not None or left_by_earlier_run or pending_retire or skips_changed:
                manifest.pop("unfinished_run", None)
                commit(pending_retire, publish=True)
            finished = True
        finally:
            if not finished:
                _remove_uncommitted(index_dir)
        if not publish_each_shard:
            remove_unlisted(index_dir, manifest)
        result.new_skips = len(skips) - len(plan.kept_skips) - len(run_start.scan_skips)
        result.skipped = len(skips)
    result.seconds = time.perf_counter() - started
    return result
