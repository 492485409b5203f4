"""benchmarks/gpu/check.py, the GPU check, run on the CPU (--device cpu --quick) so that the
script a GPU machine runs cannot rot unnoticed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_check_passes_on_the_cpu(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OUT": str(tmp_path / "from-env")}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu" / "check.py"), "--device", "cpu",
                           "--quick"], capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    out = tmp_path / "from-env"  # $OUT is where the results go without --out
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert results["ok"] and results["environment"]["device"] == "cpu"
    checks = {record["name"]: record for record in results["checks"]}
    assert list(checks) == ["model", "fingerprint", "distill", "index", "export", "search"]
    assert all(record["ok"] for record in checks.values()), checks
    assert checks["fingerprint"]["fingerprint_device_bf16"] == checks["fingerprint"]["fingerprint_cpu_fp32"]
    assert checks["distill"]["teacher_cache"]["hits"] > 0 and checks["search"]["student_backend"] == "OnnxEncoder"
    assert "# vkd GPU check: PASSED" in (out / "summary.md").read_text()


def test_the_gpu_check_refuses_cuda_where_there_is_none(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu" / "check.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert proc.returncode == 2 and "CUDA is not available here" in proc.stderr and "--device cpu" in proc.stderr
