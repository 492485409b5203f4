"""deploy/accelerate/{ddp,fsdp}.yaml exercised: two CPU processes (gloo) on tiny models.

Under fsdp.yaml each rank holds half of the frozen teacher (FSDP2 ``fully_shard``), cache
misses differ between ranks (so the sharded forwards must be padded to the same count or the
run hangs), and the run trains exactly as one process with the global batch does: the same
losses step by step. ddp.yaml is the same run with the teacher whole on each rank.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from vkd.cli import cli

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vkd.data.synth import generate

    root = tmp_path_factory.mktemp("fsdp-data")
    generate(root, 12, seed=2, size=32, val_frac=0.25, test_frac=0.0)
    return root


def _config(path: Path, data_dir: Path, student: Path, teacher: Path) -> Path:
    # student LoRA, the teacher cached (epoch 2 reads every row from the segments of both ranks)
    config = {"model_name_or_path": str(student), "teacher_model_name_or_path": str(teacher),
              "data_path": str(data_dir / "train.jsonl"), "output_dir": str(path.parent / "out"),
              "batch_size": 4, "epochs": 2, "logging_steps": 1, "eval_strategy": "no", "use_lora": True,
              "lora_dropout": 0.0, "learning_rate": 1e-3,
              "distillation_loss_type": ["kl_divergence", "feature_mse"]}
    path.write_text(yaml.safe_dump(config))
    return path


def _launch(config_file: str, config: Path, out: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "deploy" / "accelerate" / config_file), "--num_processes", "2", "--mixed_precision", "no",
              "--main_process_port", "0"]
    proc = subprocess.run([*launch, "-m", "vkd", "distill", str(config), "--set", f"output_dir={out}"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "report.json").read_text())


def _losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["type"] == "train"]


def test_fsdp_and_ddp_configs_train_as_one_process(tmp_path: Path, data_dir: Path, tiny_clip: Path,
                                                   tiny_clip_teacher: Path) -> None:
    config = _config(tmp_path / "c.yaml", data_dir, tiny_clip, tiny_clip_teacher)
    one = tmp_path / "one"
    result = CliRunner().invoke(cli, ["distill", str(config), "--set", f"output_dir={one}", "batch_size=8"])
    assert result.exit_code == 0, result.output
    reference = _losses(one)

    fsdp = _launch("fsdp.yaml", config, tmp_path / "fsdp")
    (teacher,) = fsdp["teachers"]
    assert teacher["sharded"] is True and fsdp["num_processes"] == 2
    # each rank holds half the teacher (rank 0 takes the odd row of a parameter; scalars stay whole)
    assert teacher["parameters"] / 2 <= teacher["local_parameters"] <= 0.505 * teacher["parameters"]
    assert teacher["cache"]["segments"] >= 2  # each rank wrote its own
    assert fsdp["teacher_cache"]["hits"] > 0  # epoch 2 read the rows both ranks wrote in epoch 1
    assert _losses(tmp_path / "fsdp") == pytest.approx(reference, abs=1e-5)

    ddp = _launch("ddp.yaml", config, tmp_path / "ddp")
    assert ddp["teachers"][0]["sharded"] is False
    assert ddp["teachers"][0]["local_parameters"] == ddp["teachers"][0]["parameters"]
    assert _losses(tmp_path / "ddp") == pytest.approx(reference, abs=1e-5)


def test_fsdp_shards_a_qwen3vl_teacher(tmp_path: Path, data_dir: Path, tiny_qwen3vl: Path) -> None:
    """Qwen3-VL's encoder calls forward() (which calls get_image_features inside): the sharded
    teacher must gather its root weights for the whole forward, and train as one process does."""
    config = _config(tmp_path / "c.yaml", data_dir, tiny_qwen3vl, tiny_qwen3vl)
    one = tmp_path / "one"
    result = CliRunner().invoke(cli, ["distill", str(config), "--set", f"output_dir={one}", "batch_size=8"])
    assert result.exit_code == 0, result.output
    fsdp = _launch("fsdp.yaml", config, tmp_path / "fsdp")
    (teacher,) = fsdp["teachers"]
    assert teacher["sharded"] is True and teacher["local_parameters"] <= 0.505 * teacher["parameters"]
    assert _losses(tmp_path / "fsdp") == pytest.approx(_losses(one), abs=1e-5)
