"""``vkd distill`` from the command line: config errors, overrides, and several processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from vkd.cli import cli
from vkd.data.pairs import read_pairs
from vkd.models import load_encoder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vkd.data.synth import generate

    root = tmp_path_factory.mktemp("cli-data")
    generate(root, 12, seed=2, size=32, val_frac=0.25, test_frac=0.0)
    return root


def write_config(path: Path, data_dir: Path, student: Path, teacher: Path, **values: object) -> Path:
    config = {
        "model_name_or_path": str(student), "teacher_model_name_or_path": str(teacher),
        "data_path": str(data_dir / "train.jsonl"), "output_dir": str(path.parent / "out"),
        "batch_size": 8, "epochs": 1, "logging_steps": 1, "eval_strategy": "no", **values,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_config_errors_exit_non_zero_with_the_key(tmp_path: Path, data_dir: Path, tiny_clip: Path,
                                                   tiny_clip_teacher: Path) -> None:
    config = write_config(tmp_path / "c.yaml", data_dir, tiny_clip, tiny_clip_teacher, temprature=2.0)
    result = CliRunner().invoke(cli, ["distill", str(config)])
    assert result.exit_code == 2
    assert "unknown key temprature" in result.output and "did you mean 'temperature'" in result.output

    good = write_config(tmp_path / "good.yaml", data_dir, tiny_clip, tiny_clip_teacher)
    result = CliRunner().invoke(cli, ["distill", str(good), "--set", "batch_size=0"])
    assert result.exit_code == 2 and "batch_size = '0' is out of range" in result.output

    result = CliRunner().invoke(cli, ["distill", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "cannot read the config file" in result.output


def test_problems_found_when_starting_are_click_errors(tmp_path: Path, data_dir: Path, tiny_clip: Path,
                                                      tiny_clip_teacher: Path) -> None:
    config = write_config(tmp_path / "c.yaml", data_dir, tiny_clip, tiny_clip_teacher, batch_size=500)
    result = CliRunner().invoke(cli, ["distill", str(config)])
    assert result.exit_code == 1
    assert "do not fill one global batch of batch_size 500" in result.output

    result = CliRunner().invoke(cli, ["distill", str(config), "--set", "batch_size=8", "mixed_precision=fp16"])
    assert result.exit_code == 1 and "fp16 is not supported" in result.output


def test_a_run_with_overrides(tmp_path: Path, data_dir: Path, tiny_clip: Path, tiny_clip_teacher: Path) -> None:
    config = write_config(tmp_path / "c.yaml", data_dir, tiny_clip, tiny_clip_teacher)
    out = tmp_path / "elsewhere"
    result = CliRunner().invoke(cli, [
        "distill", str(config), "--set", "max_steps=2", "--set", f"val_data_path={data_dir / 'val.jsonl'}",
        "--config_override", f"output_dir={out}", "temperature=3.5", "eval_strategy=steps", "eval_steps=1"])
    assert result.exit_code == 0, result.output
    assert f"model    {out / 'model'}" in result.output
    assert re.search(r"best     val rsum \d+\.\d\d at epoch 0\.\d+ \(step [12]\) of 2 evaluations", result.output)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["temperature"] == 3.5 and saved["max_steps"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["type"], r["step"]) for r in rows] == [("train", 1), ("eval", 1), ("train", 2), ("eval", 2)]
    assert [r["temperature"] for r in rows if r["type"] == "train"] == [3.5, 3.5]
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 2 and report["student"]["parameters"] > 0 and report["teachers"][0]["parameters"] > 0
    assert [v["step"] for v in report["val"]] == [1, 2] and report["best"]["step"] in (1, 2)
    assert report["final_model"] == "best" and report["wall_time_s"] > 0


def read_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_errors_from_the_run_itself_are_one_line(tmp_path: Path, data_dir: Path, tiny_clip: Path,
                                                 tiny_clip_teacher: Path) -> None:
    config = write_config(tmp_path / "c.yaml", data_dir, tiny_clip, tiny_clip_teacher, max_steps=1)
    assert CliRunner().invoke(cli, ["distill", str(config)]).exit_code == 0
    again = CliRunner().invoke(cli, ["distill", str(config)])
    # a click error (SystemExit 1 with "Error: ..."), not an exception with its traceback
    assert again.exit_code == 1 and isinstance(again.exception, SystemExit), again.exception
    assert again.output.startswith(f"Error: output_dir {tmp_path / 'out'} already holds checkpoints")
    assert "set resume_from_checkpoint: latest" in again.output and "Traceback" not in again.output

    (tmp_path / "a-file").write_text("")
    blocked = CliRunner().invoke(cli, ["distill", str(config), "--set", f"output_dir={tmp_path / 'a-file' / 'out'}"])
    assert blocked.exit_code == 1 and isinstance(blocked.exception, SystemExit), blocked.exception
    assert blocked.output.startswith("Error: ") and "Not a directory" in blocked.output


def test_a_run_shorter_than_an_epoch_evaluates_its_last_weights(tmp_path: Path, data_dir: Path, tiny_clip: Path,
                                                                tiny_clip_teacher: Path) -> None:
    """34 pairs in batches of 8 make 4 steps an epoch; max_steps=2 ends the run before the
    first per-epoch evaluation, so the run evaluates its final weights and says it kept them."""
    config = write_config(tmp_path / "c.yaml", data_dir, tiny_clip, tiny_clip_teacher, max_steps=2,
                          val_data_path=str(data_dir / "val.jsonl"), eval_strategy="epoch")
    result = CliRunner().invoke(cli, ["distill", str(config)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    evals = [r for r in read_rows(out) if r["type"] == "eval"]
    assert [(r["step"], r["end_of_run"], r["best"]) for r in evals] == [(2, True, True)]
    report = json.loads((out / "report.json").read_text())
    assert [v["step"] for v in report["val"]] == [2] and report["best"]["step"] == 2
    assert report["final_model"] == "best" and report["final_model_step"] == 2
    assert "evaluated at the end of the run" in report["final_model_reason"]
    assert f"kept     {report['final_model_reason']}" in result.output

    # without validation data the summary says the last weights were kept, and why
    plain = write_config(tmp_path / "p.yaml", data_dir, tiny_clip, tiny_clip_teacher, max_steps=2,
                         output_dir=str(tmp_path / "plain"))
    result = CliRunner().invoke(cli, ["distill", str(plain)])
    assert result.exit_code == 0, result.output
    assert "kept     the last weights (step 2): no val_data_path" in result.output


def test_best_metric_is_configurable_and_printed_with_two_decimals(tmp_path: Path, data_dir: Path, tiny_clip: Path,
                                                                   tiny_clip_teacher: Path) -> None:
    config = write_config(tmp_path / "c.yaml", data_dir, tiny_clip, tiny_clip_teacher, max_steps=2,
                          val_data_path=str(data_dir / "val.jsonl"), eval_strategy="steps", eval_steps=1,
                          best_metric="i2t_R@5")
    result = CliRunner().invoke(cli, ["distill", str(config)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    best = report["best"]
    assert best["metric"] == "i2t_R@5" and best["value"] == max(v["i2t_R@5"] for v in report["val"])
    assert f"best     val i2t_R@5 {best['value']:.2f} at epoch" in result.output

    bad = CliRunner().invoke(cli, ["distill", str(config), "--set", "best_metric=R@1"])
    assert bad.exit_code == 2 and "best_metric = 'R@1' is not an accepted choice" in bad.output


def test_contrastive_only_runs_log_no_distillation_settings(tmp_path: Path, data_dir: Path, tiny_clip: Path,
                                                           tiny_clip_teacher: Path) -> None:
    config = write_config(tmp_path / "c.yaml", data_dir, tiny_clip, tiny_clip_teacher, max_steps=2,
                          use_distillation=False, temperature=3.5)
    result = CliRunner().invoke(cli, ["distill", str(config)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    rows = read_rows(out)
    assert rows and not any({"temperature", "distillation_weight"} & row.keys() for row in rows)
    report = json.loads((out / "report.json").read_text())
    assert not any({"temperature", "distillation_weight"} & stage.keys() for stage in report["stages"])
    assert report["loss"] == {"use_distillation": False, "terms": ["ce"]}
    assert "temperature" not in result.output and "distillation_weight" not in result.output
    assert "teacher cache" not in result.output
    assert "loss     contrastive (CE) only" in result.output


def test_the_summary_states_what_lora_trains(tmp_path: Path, data_dir: Path, tiny_clip: Path,
                                            tiny_clip_teacher: Path) -> None:
    config = write_config(tmp_path / "c.yaml", data_dir, tiny_clip, tiny_clip_teacher, max_steps=1, lora_r=16)
    result = CliRunner().invoke(cli, ["distill", str(config)])
    assert result.exit_code == 0, result.output
    student = json.loads((tmp_path / "out" / "report.json").read_text())["student"]
    trained, total = student["trained_parameters"], student["parameters"]
    assert student["trained_percent"] == round(100 * trained / total, 2) and student["logit_scale_trained"] is False
    assert (f"trains   {trained:,} of {total:,} student parameters ({100 * trained / total:.2f}%): "
            "LoRA r=16 and the projection heads; logit scale frozen under LoRA") in result.output
    # on a student this narrow, r=16 trains a large share: the summary says so
    assert "use_lora: false" in result.output

    full = CliRunner().invoke(cli, ["distill", str(config), "--set", "use_lora=false",
                                    f"output_dir={tmp_path / 'full'}"])
    assert full.exit_code == 0, full.output
    assert "(100.00%): full fine-tuning, logit scale included" in full.output


def test_help_shows_an_example_and_imports_no_torch() -> None:
    result = CliRunner().invoke(cli, ["distill", "--help"])
    assert result.exit_code == 0 and "vkd distill config.yaml --set epochs=1" in result.output
    code = "import sys, vkd.distill.commands, vkd.distill; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


@pytest.mark.slow
def test_two_processes_gather_negatives_across_ranks(tmp_path: Path, data_dir: Path, tiny_clip: Path,
                                                     tiny_clip_teacher: Path) -> None:
    """Two CPU processes with 8 rows each train on global batches of 16 (every row meets the
    other rank's rows as negatives) and end where one process with batches of 16 ends.

    ``accelerate launch --cpu --num_processes 2`` starts a single process unless MPI is set up
    (accelerate 1.x); ``--multi_gpu`` on a machine without CUDA starts two via torchrun, and
    the trainer forms a gloo group for them.
    """
    # full fine-tuning: the logit scale, like the loss's projection, sees every row on every rank
    common = {"use_lora": False, "learning_rate": 1e-4, "epochs": 2, "distillation_loss_type": ["kl_divergence", "feature_mse"],
              "val_data_path": str(data_dir / "val.jsonl"), "eval_strategy": "epoch"}
    config = write_config(tmp_path / "c.yaml", data_dir, tiny_clip, tiny_clip_teacher, **common)
    out2 = tmp_path / "two"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    proc = subprocess.run([*launch, "-m", "vkd", "distill", str(config), "--set", f"output_dir={out2}"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    rows = [json.loads(line) for line in (out2 / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["type"] == "train"]
    assert train and all((r["local_batch"], r["global_batch"]) == (8, 16) for r in train)
    report = json.loads((out2 / "report.json").read_text())
    assert report["num_processes"] == 2 and report["global_batch_size"] == 16
    assert len(report["val"]) == 2
    # every sample's teacher embedding computed once, by one of the ranks
    assert report["teacher_forward_rows"] == report["teacher_cache"]["misses"]

    out1 = tmp_path / "one"
    result = CliRunner().invoke(cli, ["distill", str(config), "--set", f"output_dir={out1}", "batch_size=16"])
    assert result.exit_code == 0, result.output
    one = [json.loads(line) for line in (out1 / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    assert [r["loss"] for r in train] == pytest.approx([r["loss"] for r in one], abs=1e-5)
    # Compare what the models compute, not every weight: Adam turns the float noise in a
    # gradient that is exactly zero in theory (attention key biases) into lr-sized steps.
    one_model, two_model = load_encoder(out1 / "model", device="cpu"), load_encoder(out2 / "model", device="cpu")
    assert one_model.logit_scale != load_encoder(tiny_clip, device="cpu").logit_scale
    assert two_model.logit_scale == pytest.approx(one_model.logit_scale, abs=1e-4)
    pairs = read_pairs(data_dir / "val.jsonl")
    for encode, items in ((lambda m, x: m.encode_text(x), pairs.texts()),
                          (lambda m, x: m.encode_images(x), pairs.images())):
        np.testing.assert_allclose(encode(two_model, items), encode(one_model, items), atol=1e-4)
