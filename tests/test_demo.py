"""`vkd demo --quick` end to end: every step runs, the table and report are written, and the
index it leaves behind is what `vkd search` opens by default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from vkd.cli import cli
from vkd.demo import FULL, QUICK, Row, format_table, split_training_pairs, verdict


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
    for name in ("teacher", "student-raw", "student-ce", "student-kd"):
        assert (out / name / "model" / "config.json").is_file()
        assert (out / name / "report.json").is_file()

    # `vkd search` with no --index searches the demo's index.
    search = CliRunner().invoke(cli, ["search", "a dog on a beach", "--json", "-k", "3"])
    assert search.exit_code == 0, search.output
    hits = json.loads(search.output)
    hits = hits["hits"] if isinstance(hits, dict) else hits[0]["hits"]
    assert len(hits) == 3
    assert all(Path(hit["path"]).is_relative_to(out / "data" / "images" / "test") for hit in hits)


def test_training_split_is_by_line_and_disjoint(tmp_path: Path) -> None:
    lines = [json.dumps({"image": f"images/train/{i:05d}.png", "text": [f"caption {i}"]}) for i in range(20)]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    pretrain, finetune = split_training_pairs(tmp_path, 0.4, seed=0)
    first, rest = pretrain.read_text().splitlines(), finetune.read_text().splitlines()
    assert len(first) == 8 and len(rest) == 12
    assert sorted(first + rest) == sorted(lines) and not set(first) & set(rest)


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
    assert QUICK.n_images < FULL.n_images and QUICK.teacher_epochs <= FULL.teacher_epochs
