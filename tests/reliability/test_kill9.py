"""kill -9 of a real ``vkd index`` process: at random moments, exactly while a temporary file
exists, and during a ``--rebuild``. After every kill the index verifies, opens and searches
(student only and with the teacher), no committed row is lost, and the resumed index equals
an uninterrupted one; a killed ``--rebuild`` leaves the old index, all of its rows, visible
the whole time.

Each indexing run is a real OS process running the real command line (``vkd index ...``).
Importing torch and transformers costs several seconds a process, so the runs are forked
from a launcher that has imported them once (``python -c LAUNCHER``): a run then starts in
about a second, and the kill timer starts only once the run holds the writer lock
``.lock`` (its pid written there), as in tests/test_indexer_crash.py.

Figures (kills run, kills that landed while a temporary file existed) are reported through
the ``reliability_figures`` fixture (see conftest.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

import vkd
from reliability.conftest import plain_folder
from vkd.cli import cli
from vkd.indexer import Index, ManifestError, verify_index
from vkd.indexer.fsutil import TMP_MARKER
from vkd.models import load_encoder
from vkd.retrieval import Retriever

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not Path("/proc/self/stat").exists() or not hasattr(os, "fork"),
                                                   reason="needs fork, SIGSTOP and /proc (Linux)")]

N_IMAGES = 60
SHARD_SIZE = 5  # 12 shards: kills land before, between, during and after shard commits
QUERY = "a photo of colourful noise"

# The launcher: imports what `vkd index` needs once, then forks one child per request; the
# child runs the command line with its output in a log file and exits with its exit status.
LAUNCHER = r"""
import importlib, json, os, sys, traceback
for name in ("vkd.cli", "vkd.indexer.commands", "vkd.indexer.build", "vkd.indexer.index", "vkd.indexer.verify",
             "vkd.models", "vkd.models.registry", "vkd.models.hf_dual", "faiss", "pyarrow", "pyarrow.compute",
             "pyarrow.ipc", "torch", "transformers", "transformers.processing_utils",
             "transformers.image_processing_utils", "transformers.models.clip.modeling_clip"):
    try:
        importlib.import_module(name)
    except Exception:
        traceback.print_exc()
try:
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer  # resolve the lazy names
except Exception:
    traceback.print_exc()
from vkd.cli import cli
print("ready", flush=True)
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)
            try:
                cli.main(args=request["argv"], prog_name="vkd")
                code = 0
            except SystemExit as done:
                code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print("started", pid, flush=True)
    _, status = os.waitpid(pid, 0)
    print("exited", pid, os.waitstatus_to_exitcode(status), flush=True)
"""




class Launcher:
    """Talks to the launcher process: one run at a time."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.log_dir = log_dir
        self._log = open(log_dir / "launcher.log", "wb")  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen([sys.executable, "-c", LAUNCHER], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self._log, env=env)
        self._buffer = b""
        self.runs = 0
        self._ready = False
        self.current: Run | None = None

    def wait_ready(self) -> None:
        """The imports take seconds: the caller does its own setup meanwhile."""
        if not self._ready:
            assert self._line(timeout=300) == "ready", self.describe()
            self._ready = True

    def describe(self) -> str:
        return f"launcher log:\n{(self.log_dir / 'launcher.log').read_text(errors='replace')[-3000:]}"

    def _line(self, timeout: float | None) -> str | None:
        """The next line from the launcher; None when none came within ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        fd = self.process.stdout.fileno()
        while b"\n" not in self._buffer:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([fd], [], [], wait)
            if not ready:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"the launcher exited ({self.process.poll()}); {self.describe()}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def start(self, argv: list[str]) -> Run:
        self.wait_ready()
        self.runs += 1
        log = self.log_dir / f"run-{self.runs:03d}.log"
        self.process.stdin.write((json.dumps({"argv": argv, "log": str(log)}) + "\n").encode())
        self.process.stdin.flush()
        started = self._line(timeout=60)
        assert started is not None and started.startswith("started "), (started, self.describe())
        self.current = Run(self, int(started.split()[1]), log)
        return self.current

    def close(self) -> None:
        # a test that failed mid-run leaves its run going: end it, then the launcher (which
        # between runs only waits for the next request)
        if self.current is not None and self.current.returncode is None:
            self.current.signal(signal.SIGKILL)
        self.process.kill()
        self.process.wait()
        self.process.stdin.close()
        self.process.stdout.close()
        self._log.close()


@dataclass
class Run:
    launcher: Launcher
    pid: int
    log: Path
    returncode: int | None = None

    def poll(self, timeout: float = 0.0) -> int | None:
        if self.returncode is None:
            line = self.launcher._line(timeout)
            if line is not None:
                word, pid, code = line.split()
                assert word == "exited" and int(pid) == self.pid, line
                self.returncode = int(code)
        return self.returncode

    def wait(self, timeout: float = 120.0) -> int:
        code = self.poll(timeout)
        if code is None:
            self.signal(signal.SIGKILL)
            self.poll(30)
            raise AssertionError(f"run {self.pid} did not finish within {timeout} s:\n{self.output()}")
        return code

    def signal(self, signum: int) -> bool:
        """Send ``signum`` unless the run has exited (an exited run not yet reaped is a zombie)."""
        if self.poll() is not None:
            return False
        try:
            os.kill(self.pid, signum)
        except ProcessLookupError:
            return False
        return True

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    def holds_lock(self, out: Path) -> bool:
        try:
            return (out / ".lock").read_text().strip() == str(self.pid)
        except (FileNotFoundError, NotADirectoryError):
            return False

    def wait_until(self, ready: Callable[[], bool], timeout: float = 120.0, step: float = 0.002) -> bool:
        """Poll ``ready`` while the run lives; True once it holds, False when the run ended first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return True
            if self.poll() is not None:
                return ready()
            time.sleep(step)
        raise AssertionError(f"run {self.pid}: condition not reached within {timeout} s:\n{self.output()}")

    def temporaries(self, out: Path) -> list[str]:
        """This run's temporary files still in ``out`` (a killed run leaves the ones it was writing)."""
        suffix = f"{TMP_MARKER}{self.pid}"
        return sorted(name for name in _listdir(out) if name.endswith(suffix))


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def _tasks_stopped(pid: int) -> bool:
    """Every thread of ``pid`` is stopped (or gone): nothing of it can touch the disk now."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return True
    for task in tasks:
        try:
            stat = Path(f"/proc/{pid}/task/{task}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        state = stat.rsplit(")", 1)[1].split()[0]
        if state not in ("T", "t", "Z", "X"):
            return False
    return True


@dataclass
class World:
    images: Path
    student_dir: Path
    teacher_dir: Path
    launcher: Launcher
    reference: Path
    reference_student: dict[str, np.ndarray]
    reference_teacher: dict[str, np.ndarray]
    full_run_seconds: float  # lock to exit of an uninterrupted run
    student: Any
    teacher: Any
    tmp: Path
    dirs: Iterator[int] = field(default_factory=lambda: iter(range(10**6)))

    def argv(self, out: Path, *extra: str) -> list[str]:
        return ["index", str(self.images), "--model", str(self.student_dir), "--teacher", str(self.teacher_dir),
                "--out", str(out), "--shard-size", str(SHARD_SIZE), "--batch-size", "2", "--workers", "2",
                "--no-progress", "--device", "cpu", *extra]

    def fresh_out(self, label: str) -> Path:
        return self.tmp / f"{label}-{next(self.dirs):03d}"


def _vectors(index: Index) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """id -> student vector, id -> teacher vector (float32) of every live row."""
    student, teacher = {}, {}
    for shard in index.shards:
        live = np.flatnonzero(shard.live_mask())
        if not live.size:
            continue
        records = shard.records(live)
        for record, s_vec, t_vec in zip(records, shard.student_vectors(live), shard.teacher_vectors(live),
                                        strict=True):
            assert record["id"] not in student, f"id {record['id']} is live twice"
            student[record["id"]] = s_vec
            teacher[record["id"]] = t_vec
    return student, teacher


def _close(index: Index) -> None:
    close = getattr(index, "close", None)
    if close is not None:
        close()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tiny_clip: Path, tiny_clip_teacher: Path) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("kill9")
    code_root = str(Path(vkd.__file__).resolve().parents[1])  # the vkd under test, in the runs too
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(p for p in (code_root, os.environ.get("PYTHONPATH")) if p)}
    (tmp / "logs").mkdir()
    launcher = Launcher(env, tmp / "logs")
    try:
        images = plain_folder(tmp / "imgs", N_IMAGES, seed=3)
        student = load_encoder(tiny_clip, device="cpu")
        teacher = load_encoder(tiny_clip_teacher, device="cpu")
        reference = tmp / "reference"
        world = World(images, tiny_clip, tiny_clip_teacher, launcher, reference, {}, {}, 0.0, student, teacher, tmp)
        run = launcher.start(world.argv(reference))
        run.wait_until(lambda: run.holds_lock(reference))
        locked = time.monotonic()
        assert run.wait() == 0, run.output()
        world.full_run_seconds = time.monotonic() - locked
        index = Index.open(reference)
        world.reference_student, world.reference_teacher = _vectors(index)
        assert len(world.reference_student) == N_IMAGES and verify_index(reference) == []
        # the uninterrupted run itself is right: its vectors are the encoders' own
        records = {r["id"]: r["path"] for s in index.shards for r in s.records(np.arange(s.rows))}
        ids = sorted(records)
        np.testing.assert_allclose(np.stack([world.reference_student[i] for i in ids]),
                                   student.encode_images([Path(records[i]) for i in ids]), atol=1e-5)
        _close(index)
        yield world
    finally:
        launcher.close()


@dataclass
class Tally:
    kills: int = 0
    during_temp: int = 0
    no_index_yet: int = 0
    finished_before_kill: int = 0
    completed_indexes: int = 0
    swapped_before_kill: int = 0  # a --rebuild killed after its final commit
    temp_names: list[str] = field(default_factory=list)

    def killed(self, run: Run, out: Path) -> bool:
        """Count a kill once the run is reaped; False when it had exited by itself (0) first."""
        if run.wait() == 0:
            self.finished_before_kill += 1
            return False
        assert run.returncode == -signal.SIGKILL, f"run {run.pid} exited {run.returncode}:\n{run.output()}"
        self.kills += 1
        left = run.temporaries(out)
        if left:
            self.during_temp += 1
            self.temp_names += [name.split(TMP_MARKER)[0] for name in left]
        return True

    def figures(self) -> dict[str, Any]:
        kinds: dict[str, int] = {}
        for name in self.temp_names:
            kind = "manifest" if name.startswith("manifest") else "skipped" if name.startswith("skipped") else \
                name.rsplit(".", 1)[-1]
            kinds[kind] = kinds.get(kind, 0) + 1
        return {"kills": self.kills, "kills_during_temp_file": self.during_temp, "temp_files_left": kinds,
                "kills_before_any_manifest": self.no_index_yet, "runs_finished_before_the_kill":
                self.finished_before_kill, "indexes_completed_after_kills": self.completed_indexes,
                "rebuilds_killed_after_their_swap": self.swapped_before_kill}


def _state(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / "manifest.json").read_text())
    except FileNotFoundError:
        return None


def _live_rows(manifest: dict[str, Any] | None) -> int:
    if manifest is None:
        return 0
    return sum(int(s["rows"]) - len(s["retired"]) for s in manifest["shards"])


def check_after_kill(world: World, out: Path, run: Run, before: dict[str, Any] | None, tally: Tally) -> int:
    """The index a kill left: sound, opens, searches, lost nothing committed. Returns its live rows."""
    manifest = _state(out)
    if manifest is None:
        # killed before the first commit of a new index: there is no index, and there was none
        assert before is None, f"{out}: manifest.json vanished; it listed {_live_rows(before)} rows"
        with pytest.raises(ManifestError, match="manifest.json"):
            Index.open(out)
        tally.no_index_yet += 1
        return 0
    assert verify_index(out) == [], f"after killing run {run.pid}"
    index = Index.open(out)
    student, teacher = _vectors(index)
    assert len(student) == len(index) >= _live_rows(before), "a kill lost committed rows"
    for row_id, vector in student.items():  # every committed row is whole and right
        np.testing.assert_allclose(vector, world.reference_student[row_id], atol=1e-5)
        np.testing.assert_allclose(teacher[row_id], world.reference_teacher[row_id], atol=2e-3)
    retriever = Retriever(out, student=world.student, teacher=world.teacher)
    for rerank in (False, True):
        result = retriever.search(QUERY, k=5, rerank=rerank)
        assert len(result) == min(5, len(index))
        assert all(Path(hit.path).is_file() for hit in result)
        if rerank and len(index):
            assert result.reranked == "teacher"
    committed_here = int(manifest.get("next_shard", 0)) > int((before or {}).get("next_shard", 0))
    if index.shards and len(index) < N_IMAGES:
        # a run was interrupted after it started encoding: the manifest says so ...
        unfinished = manifest.get("unfinished_run")
        assert isinstance(unfinished, dict) and {"started", "pid"} <= set(unfinished), (
            f"{out}/manifest.json lists {len(index)} of {N_IMAGES} rows after a kill but records no "
            f"unfinished_run: {sorted(manifest)}")
        if committed_here:
            assert unfinished["pid"] == run.pid
        # ... and `vkd index verify` tells the user, though verify_index finds nothing damaged
        said = CliRunner().invoke(cli, ["index", "verify", str(out)])
        assert re.search(r"incomplete|unfinished|interrupted", said.output, re.IGNORECASE), said.output
    _close(index)
    return len(index)


def check_equals_reference(world: World, out: Path) -> None:
    """A finished index: the uninterrupted one's rows and vectors, and nothing else on disk."""
    assert verify_index(out) == []
    manifest = _state(out)
    assert manifest is not None and "unfinished_run" not in manifest, "a finished run left unfinished_run"
    index = Index.open(out)
    student, teacher = _vectors(index)
    assert sorted(student) == sorted(world.reference_student)
    for row_id, vector in world.reference_student.items():
        np.testing.assert_allclose(student[row_id], vector, atol=1e-5)
        np.testing.assert_allclose(teacher[row_id], world.reference_teacher[row_id], atol=2e-3)
    from vkd.indexer.manifest import listed_files

    listed = listed_files(manifest)  # arrow, faiss and teacher ANN files
    shard_files = {name for name in _listdir(out) if name.startswith("shard-")}
    assert shard_files == listed, f"leftovers: {sorted(shard_files - listed)}"
    assert not [name for name in _listdir(out) if TMP_MARKER in name]
    _close(index)


def finish(world: World, out: Path, *extra: str) -> None:
    run = world.launcher.start(world.argv(out, *extra))
    assert run.wait() == 0, run.output()
    check_equals_reference(world, out)


# -- (a) random moments ----------------------------------------------------------------------------

def random_kills(world: World, n_kills: int, seed: int) -> Tally:
    """``n_kills`` kills at seeded random moments; an index that gets finished is checked and
    started over, so every kill lands on a run with work left."""
    moments = random.Random(seed)
    tally = Tally()
    out = world.fresh_out("random")
    runs_before = world.launcher.runs  # the launcher is shared by the module's tests
    while tally.kills < n_kills:
        assert world.launcher.runs - runs_before < 20 * n_kills + 50, "too many runs finished before their kill"
        before = _state(out)
        run = world.launcher.start(world.argv(out))
        run.wait_until(lambda r=run, o=out: r.holds_lock(o))
        # somewhere in what is left of the work: the uninterrupted run's time, scaled
        left = (N_IMAGES - _live_rows(before)) / N_IMAGES
        time.sleep(moments.uniform(0.0, max(0.05, 1.1 * world.full_run_seconds * left)))
        run.signal(signal.SIGKILL)
        if not tally.killed(run, out):
            check_equals_reference(world, out)
            tally.completed_indexes += 1
            out = world.fresh_out("random")
            continue
        check_after_kill(world, out, run, before, tally)
    finish(world, out)
    return tally


def test_kill9_at_random_moments_then_resume(world: World, reliability_figures: Callable[..., None]) -> None:
    tally = random_kills(world, n_kills=6, seed=20240607)
    reliability_figures(**tally.figures())
    assert tally.kills == 6


@pytest.mark.long
def test_kill9_at_random_moments_long(world: World, reliability_figures: Callable[..., None]) -> None:
    tally = random_kills(world, n_kills=40, seed=1357)
    reliability_figures(**tally.figures())
    assert tally.kills == 40


# -- (b) exactly while a temporary file exists ------------------------------------------------------

SHARD_TMP = r"shard-\d+\.(arrow|faiss)"
MANIFEST_TMP = r"manifest\.json"
SKIPPED_TMP = r"skipped\.jsonl"


def kill_at_temporary(run: Run, out: Path, target: str, skip: int = 0) -> tuple[bool, int]:
    """Watch ``out`` in a tight loop; when a temporary of ``target`` (a regex for the final name)
    appears for the ``skip + 1``-th time, stop the run, and kill it if the temporary still
    exists once every thread has stopped; else let it go on and wait for the next one.

    Returns (killed while the temporary existed, appearances seen).
    """
    pattern = re.compile(rf"^{target}{re.escape(TMP_MARKER)}{run.pid}$")
    present: set[str] = set()
    appearances = 0
    while run.poll() is None:
        names = {name for name in _listdir(out) if pattern.match(name)}
        new = names - present
        present = names
        if not new:
            continue
        appearances += 1
        if appearances <= skip:
            continue
        if not run.signal(signal.SIGSTOP):
            break
        deadline = time.monotonic() + 10
        while not _tasks_stopped(run.pid):
            assert time.monotonic() < deadline, f"run {run.pid} did not stop"
        if any((out / name).exists() for name in new):
            run.signal(signal.SIGKILL)
            return True, appearances
        run.signal(signal.SIGCONT)  # renamed before the stop took: wait for the next one
    return False, appearances


def temp_file_kills(world: World, probes: list[tuple[str, int, int]], seed: int) -> tuple[Tally, int]:
    """Each probe: (temporary's regex, shards that must be committed first, appearances to let pass)."""
    tally = Tally()
    missed = 0
    out = world.fresh_out("temp")
    for target, after_shards, skip in probes:
        before = _state(out)
        if _live_rows(before) == N_IMAGES:  # finished by the probes so far: start over
            if "unfinished_run" in before:  # killed in its final commit: every row, not yet finished
                finish(world, out)
            else:
                check_equals_reference(world, out)
            tally.completed_indexes += 1
            out = world.fresh_out("temp")
            before = None
        shards_before = len(before["shards"]) if before else 0
        run = world.launcher.start(world.argv(out))
        if after_shards:  # else watch from the start: a new index's first commit follows the lock at once
            run.wait_until(lambda n=shards_before + after_shards, o=out: len((_state(o) or {"shards": []})["shards"]) >= n,
                           step=0.0005)
        landed, _ = kill_at_temporary(run, out, target, skip)
        if not landed:
            missed += 1
            assert run.wait() == 0, run.output()
            continue
        assert tally.killed(run, out)
        assert run.temporaries(out), "killed while stopped with a temporary file, yet none is left"
        check_after_kill(world, out, run, before, tally)
    finish(world, out)
    return tally, missed


def test_kill9_while_a_temporary_file_exists(world: World, reliability_figures: Callable[..., None]) -> None:
    probes = [
        (MANIFEST_TMP, 0, 0),  # the very first manifest commit of a new index
        (SHARD_TMP, 0, 0),  # the resumed run's first shard file
        (MANIFEST_TMP, 1, 0),  # a manifest commit while an older manifest lists shards
    ]
    tally, missed = temp_file_kills(world, probes, seed=11)
    reliability_figures(**tally.figures(), temp_probes=len(probes), temp_probes_missed=missed)
    assert tally.kills == len(probes) == tally.during_temp


@pytest.mark.long
def test_kill9_while_a_temporary_file_exists_long(world: World, reliability_figures: Callable[..., None]) -> None:
    choose = random.Random(97)
    probes = [(choose.choice([SHARD_TMP, SHARD_TMP, MANIFEST_TMP, SKIPPED_TMP]), choose.randint(0, 2),
               choose.randint(0, 3)) for _ in range(24)]
    tally, missed = temp_file_kills(world, probes, seed=97)
    reliability_figures(**tally.figures(), temp_probes=len(probes), temp_probes_missed=missed)
    assert tally.kills + missed == len(probes) and tally.during_temp == tally.kills


# -- (c) during a --rebuild ---------------------------------------------------------------------------

def _old_rows_visible(world: World, out: Path, seen: list[int]) -> None:
    """Open the index as a reader would and note how many rows it shows."""
    index = Index.open(out)
    try:
        seen.append(len(index))
        if len(index) == N_IMAGES:  # the old rows (a rebuilt row has the same id and vector)
            student, _ = _vectors(index)
            assert sorted(student) == sorted(world.reference_student)
    finally:
        _close(index)


def _shard_files(out: Path) -> dict[str, int]:
    found = {}
    for name in _listdir(out):
        if name.startswith("shard-"):
            with contextlib.suppress(FileNotFoundError):
                found[name] = os.stat(out / name).st_ino
    return found


def rebuild_kills(world: World, n_kills: int, seed: int) -> tuple[Tally, list[int]]:
    """Kill ``--rebuild`` runs of a finished index; a reader opens the index all along."""
    moments = random.Random(seed)
    tally = Tally()
    seen: list[int] = []
    out = world.fresh_out("rebuild")
    shutil.copytree(world.reference, out)
    old = _state(out)
    old_names = {shard["name"] for shard in old["shards"]}
    runs_before = world.launcher.runs  # the launcher is shared by the module's tests
    while tally.kills < n_kills:
        assert world.launcher.runs - runs_before < 10 * n_kills + 50, "too many --rebuild runs finished before their kill"
        at_start = _shard_files(out)  # the old shards, and leftovers of a killed rebuild
        run = world.launcher.start(world.argv(out, "--rebuild"))
        run.wait_until(lambda r=run: r.holds_lock(out))

        # a random moment of its work: once it has written this many files of new shards (of 24)
        target = moments.randint(1, 2 * N_IMAGES // SHARD_SIZE - 1)

        def rebuilding(files: dict[str, int] = at_start, names: set[str] = old_names, want: int = target) -> bool:
            # files of its own: neither an old shard's nor a leftover (a reused leftover name has a new inode)
            written = [name for name, inode in _shard_files(out).items()
                       if TMP_MARKER not in name and name.split(".")[0] not in names and files.get(name) != inode]
            return len(written) >= want

        # the reader runs beside the watch, so polling stays a cheap directory listing: on a busy
        # 2-core machine, opening the index in the watch loop let most rebuilds finish unkilled
        stop_reading = threading.Event()

        def read_until_stopped(stop: threading.Event = stop_reading) -> None:
            while not stop.is_set():
                _old_rows_visible(world, out, seen)

        reader = threading.Thread(target=read_until_stopped, daemon=True)
        reader.start()
        try:
            if run.wait_until(rebuilding, step=0.0):
                time.sleep(moments.uniform(0.0, 0.01))
            run.signal(signal.SIGKILL)
        finally:
            stop_reading.set()
            reader.join()
        if not tally.killed(run, out):
            # the rebuild finished: readers saw the old rows until the swap (checked below)
            check_equals_reference(world, out)
            old = _state(out)
            old_names = {shard["name"] for shard in old["shards"]}
            continue
        # right after the kill: the old index, every row of it
        _old_rows_visible(world, out, seen)
        assert seen and set(seen) == {N_IMAGES}, f"readers saw {sorted(set(seen))} rows during --rebuild"
        now = _state(out)
        if now["shards"] != old["shards"]:
            # the kill landed after the swap: the rebuilt index, entire (the next run removes leftovers)
            assert not old_names & {shard["name"] for shard in now["shards"]}, "a killed --rebuild mixed shards"
            tally.swapped_before_kill += 1
            old, old_names = now, {shard["name"] for shard in now["shards"]}
        check_after_kill(world, out, run, old, tally)
    # a plain run after a killed --rebuild: whatever it does, the result is the same index
    finish(world, out)
    # an uninterrupted --rebuild: new shard names, and the old rows visible until the swap
    old_names = {shard["name"] for shard in _state(out)["shards"]}
    run = world.launcher.start(world.argv(out, "--rebuild"))
    while run.poll() is None:
        _old_rows_visible(world, out, seen)
    assert run.returncode == 0, run.output()
    assert set(seen) == {N_IMAGES}, f"readers saw {sorted(set(seen))} rows during --rebuild"
    check_equals_reference(world, out)
    assert not old_names & {shard["name"] for shard in _state(out)["shards"]}, "--rebuild reused shard names"
    return tally, seen


def test_kill9_during_rebuild_keeps_the_old_index(world: World, reliability_figures: Callable[..., None]) -> None:
    tally, seen = rebuild_kills(world, n_kills=2, seed=5)
    reliability_figures(**tally.figures(), reader_opens_during_rebuild=len(seen))
    assert tally.kills == 2


@pytest.mark.long
def test_kill9_during_rebuild_long(world: World, reliability_figures: Callable[..., None]) -> None:
    tally, seen = rebuild_kills(world, n_kills=12, seed=55)
    reliability_figures(**tally.figures(), reader_opens_during_rebuild=len(seen))
    assert tally.kills == 12
