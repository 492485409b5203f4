"""`vkd demo --quick` end to end: every step runs, the table and report are written, and the
index it leaves behind is what `vkd search` opens by default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from vkd.cli import cli
from vkd.demo import (
    FULL,
    QUICK,
    TINY_GRID,
    Row,
    difference_statement,
    format_table,
    run_sweep,
    run_trainings,
    seeds_markdown,
    verdict,
)


@pytest.mark.slow
def test_quick_demo_runs_end_to_end_and_search_uses_its_index(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("VKD_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("VKD_INDEX", raising=False)
    result = CliRunner().invoke(cli, ["demo", "--quick"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "home" / "demo"

    table = (out / "results.md").read_text()
    for model in ("Teacher", "Student (raw)", "Student (CE only)", "Student (distilled)",
                  "Student (distilled, ONNX INT8)", "Two-stage (student top-1000 → teacher)"):
        assert f"| {model} |" in table
    results = json.loads((out / "results.json").read_text())
    assert [row["model"] for row in results["table"]][0] == "Teacher"
    for row in results["table"]:
        assert 0.0 <= row["t2i_r1"] <= row["t2i_r5"] <= 100.0
    assert results["verdict"].startswith("Distillation")
    assert results["export_parity"]["towers"]["text"]["int8"]["min"] >= 0.99
    assert results["metrics"]["teacher_general"]["t2i_R@1"] >= 0.0
    assert results["target_only_combinations"]
    for name in ("teacher-general", "teacher", "student-raw", "student-ce", "student-kd"):
        assert (out / name / "model" / "config.json").is_file()
        assert (out / name / "report.json").is_file()

    # `vkd search` with no --index searches the demo's index.
    search = CliRunner().invoke(cli, ["search", "a dog on a beach", "--json", "-k", "3"])
    assert search.exit_code == 0, search.output
    hits = json.loads(search.output)
    hits = hits["hits"] if isinstance(hits, dict) else hits[0]["hits"]
    assert len(hits) == 3
    assert all(Path(hit["path"]).is_relative_to(out / "data" / "images" / "test") for hit in hits)


def test_table_reports_retention_and_an_honest_verdict() -> None:
    rows = {
        "teacher": Row("Teacher", 40.0, 80.0, 90.0, 1000, 2.0, "t"),
        "ce": Row("Student (CE only)", 30.0, 60.0, 70.0, 100, 1.0, "c"),
        "kd": Row("Student (distilled)", 28.0, 61.0, 71.0, 100, 1.0, "k"),
    }
    table = format_table(list(rows.values()), rows["teacher"].t2i_r1)
    assert "| Student (distilled) | 28.0 | 61.0 | 100 | 1.00 | 70% |" in table
    assert "did NOT beat" in verdict(rows)
    rows["kd"] = Row("Student (distilled)", 31.0, 61.0, 71.0, 100, 1.0, "k")
    assert verdict(rows).startswith("Distillation beat")


def test_quick_plan_is_smaller_than_full() -> None:
    assert QUICK.n_general < FULL.n_general and QUICK.n_target < FULL.n_target
    assert QUICK.general_epochs <= FULL.general_epochs


def test_full_plan_uses_the_settings_the_committed_sweep_chose() -> None:
    """No KD setting in the demo that `vkd demo --sweep` did not choose on val."""
    sweep = Path(__file__).resolve().parents[1] / "benchmarks" / "demo_sweep.json"
    if not sweep.is_file():
        pytest.skip("benchmarks/demo_sweep.json not generated in this checkout")
    chosen = json.loads(sweep.read_text())["chosen"]
    assert chosen == {"distillation_weight": FULL.distillation_weight, "temperature": FULL.temperature,
                      "loss": list(FULL.loss), "finetune_epochs": FULL.finetune_epochs}


def test_difference_statement_says_when_a_gap_is_within_the_spread() -> None:
    assert "same sign on every seed" in difference_statement([1.0, 1.5, 2.0], "KD − CE")
    assert "within the spread" in difference_statement([1.0, -0.5, 2.0], "KD − CE")
    table = {"model": "Teacher", "params": 10, **{k: {"mean": 50.0, "sd": 1.0, "min": 49.0, "max": 51.0, "n": 3}
                                                    for k in ("t2i_r1", "t2i_r5", "retention")}}
    text = seeds_markdown({"seeds": [0, 1, 2], "command": "vkd demo --seeds 0,1,2", "seconds": 1.0,
                           "machine": {"cpus": 2, "load_average_1min_at_end": 1.0}, "table": {"teacher": table},
                           "kd_minus_ce_per_seed": [0.5, -0.2, 0.1],
                           "raw_minus_teacher": {"mean": -3.0, "sd": 1.0, "min": -4.0, "max": -2.0, "n": 3}})
    assert "| Teacher | 50.0 ± 1.0 | 50.0 ± 1.0 | 10 | 50 ± 1% |" in text and "within the spread" in text


@pytest.mark.slow
def test_sweep_runs_on_a_tiny_budget(tmp_path: Path) -> None:
    # two workers: the sweep's first batch (both KD settings and the CE baseline) trains side by side
    result = run_sweep(tmp_path / "work", quick=True, grid=TINY_GRID, results_dir=tmp_path / "bench", workers=2)
    assert [run["kd"] for run in result["runs"]] == [True, True, False]  # two KD settings, the CE baseline
    assert {run["runs_in_batch"] for run in result["runs"]} == {3}
    for run in result["runs"]:  # each side-by-side training wrote its own log, progress bar included
        assert "distill" in (tmp_path / "work" / "logs" / f"{run['label']}.log").read_text()
    assert result["chosen"]["distillation_weight"] in TINY_GRID["distillation_weight"]
    assert (tmp_path / "bench" / "demo_sweep.json").is_file()
    text = (tmp_path / "bench" / "demo_sweep.md").read_text()
    assert "vkd demo --sweep --quick" in text and "| CE only |" in text


@pytest.mark.slow
def test_a_failing_side_by_side_training_names_itself_and_its_log(tmp_path: Path) -> None:
    from vkd.data.synth import generate

    generate(tmp_path / "data", 8, seed=0, size=32, val_frac=0.0, test_frac=0.0)
    pairs = tmp_path / "data" / "train.jsonl"
    run = {"plan": QUICK, "model": str(tmp_path / "no-such-model"), "data": pairs, "val": pairs, "epochs": 1,
           "lr": 1e-3, "use_lora": False, "seed": 0}
    with pytest.raises(RuntimeError, match=r"demo training '(first|second)' failed: .*its log: .*\.log"):
        run_trainings({"first": [{**run, "out_dir": tmp_path / "first"}],
                       "second": [{**run, "out_dir": tmp_path / "second"}]}, 2, tmp_path / "logs")
