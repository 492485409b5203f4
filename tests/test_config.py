"""vkd.config: YAML + key=value overrides into a typed, validated DistillConfig."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from click.testing import CliRunner

from vkd.config import (
    Config,
    ConfigError,
    DistillConfig,
    Stage,
    apply_overrides,
    from_dict,
    load_config,
    load_config_for_cli,
    parse_override_args,
    split_override,
)

REQUIRED = {
    "model_name_or_path": "student",
    "teacher_model_name_or_path": "teacher",
    "data_path": "train.jsonl",
    "output_dir": "out",
}


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def write_config(tmp_path: Path, **values: Any) -> Path:
    return write_yaml(tmp_path, yaml.safe_dump({**REQUIRED, **values}))


def problems(tmp_path: Path, text: str = "", overrides: tuple[str, ...] = (), **values: Any) -> list[str]:
    """The problems reported for a config file (REQUIRED + values, or raw text) and overrides."""
    path = write_yaml(tmp_path, text) if text else write_config(tmp_path, **values)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return info.value.problems


# --- defaults and parsing ----------------------------------------------------------------------------


def test_minimal_file_gets_the_documented_defaults(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path))
    assert (cfg.model_name_or_path, cfg.data_path, cfg.output_dir) == ("student", "train.jsonl", "out")
    assert cfg.teachers == ["teacher"] and cfg.loss_types == ["kl_divergence"]
    assert cfg.use_distillation is True and cfg.use_lora is True and cfg.teacher_cache is True
    assert (cfg.temperature, cfg.distillation_weight, cfg.teacher_momentum) == (2.0, 0.5, 0.999)
    assert (cfg.teacher_mode, cfg.mixed_precision, cfg.eval_strategy) == ("frozen", "auto", "epoch")
    assert cfg.report_to == ["jsonl"] and cfg.stages is None and cfg.save_steps == 0
    assert cfg.lora_target_modules is None and cfg.resume_from_checkpoint is None


def test_yaml_values_are_parsed_to_the_field_types(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, """
model_name_or_path: student
teacher_model_name_or_path: [org/a, org/b]
teacher_weights: [1, 3]
data_path: train.jsonl
output_dir: out
learning_rate: 1e-4          # PyYAML reads this as a string
epochs: "2"
use_lora: no
lora_target_modules: [q_proj, v_proj]
report_to: jsonl,tensorboard
distillation_loss_type: [kl_divergence, feature_mse]
val_data_path: null
resume_from_checkpoint: true
stages:
  - {epochs: 1, temperature: 4, distillation_weight: 0.9}
  - {epochs: 2, temperature: 1.0, distillation_weight: 0.3, learning_rate: 1e-5}
""")
    cfg = load_config(path)
    assert cfg.learning_rate == 1e-4 and isinstance(cfg.learning_rate, float)
    assert cfg.epochs == 2 and cfg.use_lora is False
    assert cfg.teachers == ["org/a", "org/b"] and cfg.teacher_weights == [1.0, 3.0]
    assert cfg.lora_target_modules == ["q_proj", "v_proj"]
    assert cfg.report_to == ["jsonl", "tensorboard"]
    assert cfg.loss_types == ["kl_divergence", "feature_mse"]
    assert cfg.val_data_path is None and cfg.resume_from_checkpoint is True
    assert cfg.stages == [
        Stage(epochs=1, temperature=4.0, distillation_weight=0.9),
        Stage(epochs=2, temperature=1.0, distillation_weight=0.3, learning_rate=1e-5),
    ]


@pytest.mark.parametrize(("override", "key", "expected"), [
    ("epochs=4", "epochs", 4),
    ("max_steps=1e3", "max_steps", 1000),
    ("learning_rate=3e-5", "learning_rate", 3e-5),
    ("temperature=1", "temperature", 1.0),
    ("use_lora=false", "use_lora", False),
    ("use_lora=YES", "use_lora", True),
    ("use_lora=no", "use_lora", False),
    ("use_lora=1", "use_lora", True),
    ("use_lora=0", "use_lora", False),
    ("val_data_path=val.jsonl", "val_data_path", "val.jsonl"),
    ("val_data_path=null", "val_data_path", None),
    ("max_text_length=none", "max_text_length", None),
    ("max_text_length=", "max_text_length", None),
    ("output_dir=123", "output_dir", "123"),
    ("output_dir=yes", "output_dir", "yes"),
    ("lora_target_modules=q_proj,v_proj", "lora_target_modules", ["q_proj", "v_proj"]),
    ("lora_target_modules=[q_proj, v_proj]", "lora_target_modules", ["q_proj", "v_proj"]),
    ("lora_target_modules=['q_proj', \"v_proj\"]", "lora_target_modules", ["q_proj", "v_proj"]),
    ("report_to=[]", "report_to", []),
    ("teacher_model_name_or_path=org/big", "teacher_model_name_or_path", "org/big"),
    ("teacher_model_name_or_path=[org/big]", "teacher_model_name_or_path", ["org/big"]),
    ("distillation_loss_type=kl_divergence,icl", "distillation_loss_type", ["kl_divergence", "icl"]),
    ("resume_from_checkpoint=latest", "resume_from_checkpoint", "latest"),
    ("resume_from_checkpoint=true", "resume_from_checkpoint", True),
    ("resume_from_checkpoint=out/checkpoint-100", "resume_from_checkpoint", "out/checkpoint-100"),
    ("stages=[{epochs: 1, temperature: 4, distillation_weight: 0.9}]", "stages",
     [Stage(epochs=1, temperature=4.0, distillation_weight=0.9)]),
])
def test_override_strings_are_parsed_to_the_field_type(tmp_path: Path, override: str, key: str, expected: Any) -> None:
    value = getattr(load_config(write_config(tmp_path), [override]), key)
    assert value == expected
    assert type(value) is type(expected)


# --- overrides -----------------------------------------------------------------------------------------


def test_overrides_beat_yaml_which_beats_defaults(tmp_path: Path) -> None:
    path = write_config(tmp_path, epochs=5, temperature=3.0)
    cfg = load_config(path, ["epochs=7", "--config_override", "seed=1", "epochs=8"])
    assert cfg.epochs == 8  # the last override wins
    assert cfg.temperature == 3.0  # from the file
    assert cfg.seed == 1
    assert cfg.batch_size == DistillConfig.__dataclass_fields__["batch_size"].default


def test_parse_override_args_accepts_set_config_override_and_bare_items() -> None:
    args = ["--set", "a=1", "--config_override", "b=2", "c=3", "d=4", "--set=e=5", "--config_override=f=6", "g=7"]
    assert parse_override_args(args) == ["a=1", "b=2", "c=3", "d=4", "e=5", "f=6", "g=7"]
    assert split_override(" val_data_path = a=b.jsonl ") == ("val_data_path", "a=b.jsonl")


@pytest.mark.parametrize(("args", "fragment"), [
    (["epochs3"], "'epochs3': expected key=value"),
    (["=3"], "'=3': expected key=value"),
    (["--set"], "--set needs a key=value"),
    (["a=1", "--config_override"], "--config_override needs a key=value"),
    (["--epochs", "3"], "unexpected argument '--epochs'"),
])
def test_malformed_overrides_are_errors(tmp_path: Path, args: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path), args)
    assert fragment in str(info.value)


def test_apply_overrides_returns_a_validated_copy(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path))
    changed = apply_overrides(cfg, ["epochs=1", "report_to=jsonl,tensorboard"])
    assert (changed.epochs, changed.report_to) == (1, ["jsonl", "tensorboard"])
    assert cfg.epochs == 3 and cfg.report_to == ["jsonl"]
    with pytest.raises(ConfigError, match=r"^--set: epochs = '0' is out of range \(accepted: an integer >= 1\)"):
        apply_overrides(cfg, ["epochs=0"])


# --- errors --------------------------------------------------------------------------------------------


def test_unknown_key_names_file_value_and_closest_key(tmp_path: Path) -> None:
    [message] = problems(tmp_path, temperture=3.0)
    assert message == (f"{tmp_path / 'config.yaml'}: unknown key temperture = 3.0 (did you mean 'temperature'?)")


def test_unknown_key_without_close_match_lists_the_known_keys(tmp_path: Path) -> None:
    [message] = problems(tmp_path, zzz=1)
    assert "unknown key zzz = 1 (known keys: batch_size, best_metric, data_path," in message


def test_unknown_override_key_names_set(tmp_path: Path) -> None:
    assert problems(tmp_path, overrides=("--set", "learning-rate=1e-3")) == [
        "--set: unknown key learning-rate = '1e-3' (did you mean 'learning_rate'?)"]


@pytest.mark.parametrize(("key", "value", "accepted"), [
    ("epochs", "three", "an integer >= 1"),
    ("epochs", 2.5, "an integer >= 1"),
    ("batch_size", True, "an integer >= 1"),
    ("temperature", "hot", "a number > 0"),
    ("temperature", float("nan"), "a number > 0"),
    ("use_lora", "maybe", "true or false (also yes/no, on/off, 1/0)"),
    ("model_name_or_path", 123, "a string"),
    ("lora_target_modules", {"q": 1}, "a list (YAML list, 'a,b' or '[a, b]'), each item a string, or null"),
])
def test_wrong_type_names_key_value_and_what_is_accepted(tmp_path: Path, key: str, value: Any, accepted: str) -> None:
    [message] = problems(tmp_path, **{key: value})
    assert message.startswith(f"{tmp_path / 'config.yaml'}: {key} = ")
    assert f"has the wrong type (accepted: {accepted})" in message


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("temperature", 0, "temperature = 0 is out of range (accepted: a number > 0)"),
    ("distillation_weight", 1.5, "distillation_weight = 1.5 is out of range (accepted: a number >= 0 and <= 1)"),
    ("epochs", 0, "epochs = 0 is out of range (accepted: an integer >= 1)"),
    ("teacher_momentum", -0.1, "teacher_momentum = -0.1 is out of range"),
    ("lora_dropout", 1.0, "lora_dropout = 1.0 is out of range (accepted: a number >= 0 and < 1)"),
    ("teacher_weights", [-1], "teacher_weights = [-1] has item -1.0, which is out of range"),
])
def test_out_of_range_values_are_errors(tmp_path: Path, key: str, value: Any, expected: str) -> None:
    [message] = problems(tmp_path, **{key: value})
    assert expected in message


def test_bad_choice_lists_the_choices_and_suggests_one(tmp_path: Path) -> None:
    [message] = problems(tmp_path, eval_strategy="step")
    assert message.endswith("eval_strategy = 'step' is not an accepted choice "
                            "(accepted: one of 'epoch', 'steps', 'no'; did you mean 'steps'?)")
    [message] = problems(tmp_path, distillation_loss_type=["kl_divergence", "feature_mes"])
    assert "has item 'feature_mes', which is not an accepted choice" in message
    assert "'similarity_mse'" in message and "did you mean 'feature_mse'?" in message
    [message] = problems(tmp_path, mixed_precision="fp32")
    assert "one of 'no', 'bf16', 'fp16', 'auto'" in message


def test_missing_required_keys_are_all_named(tmp_path: Path) -> None:
    found = problems(tmp_path, "epochs: 2\n")
    named = sorted(m.split("missing required key ")[1].split(" ")[0] for m in found)
    assert named == ["data_path", "model_name_or_path", "output_dir", "teacher_model_name_or_path"]
    assert all(m.startswith(f"{tmp_path / 'config.yaml'}: ") for m in found)
    assert any("--set data_path=VALUE" in m for m in found)


def test_teacher_is_required_only_with_distillation(tmp_path: Path) -> None:
    values = {k: v for k, v in REQUIRED.items() if k != "teacher_model_name_or_path"}
    path = write_yaml(tmp_path, yaml.safe_dump({**values, "use_distillation": False}))
    assert load_config(path).teachers == []
    for overrides in (["use_distillation=true"], ["use_distillation=yes", "teacher_model_name_or_path=null"]):
        with pytest.raises(ConfigError, match=r"missing required key teacher_model_name_or_path "
                           r"\(the teacher model\(s\); needed because use_distillation is true\)"):
            load_config(path, overrides)
    with pytest.raises(ConfigError, match="teacher_model_name_or_path is empty"):
        load_config(path, ["use_distillation=true", "teacher_model_name_or_path=[]"])


@pytest.mark.parametrize(("stage", "expected"), [
    ({"epoch": 1, "temperature": 2, "distillation_weight": 0.5},
     "unknown key stages[0].epoch = 1 (did you mean 'epochs'?)"),
    ({"epochs": 1, "temperature": "hot", "distillation_weight": 0.5},
     "stages[0].temperature = 'hot' has the wrong type (accepted: a number > 0)"),
    ({"epochs": 1, "temperature": 2, "distillation_weight": 0.5, "learning_rate": -1},
     "stages[0].learning_rate = -1 is out of range (accepted: a number > 0, or null)"),
    ({"epochs": 1, "temperature": 2}, "missing required key stages[0].distillation_weight (weight w of the KD terms)"),
    (3, "stages = [3] has the wrong type (accepted: a list of entries, each a mapping with keys epochs, "
        "temperature, distillation_weight, learning_rate, or null)"),
])
def test_bad_stage_entries_are_errors(tmp_path: Path, stage: Any, expected: str) -> None:
    found = problems(tmp_path, stages=[stage])
    assert f"{tmp_path / 'config.yaml'}: {expected}" in found
    if isinstance(stage, dict) and "epoch" in stage:  # the misspelt key also leaves 'epochs' missing
        assert found[1].endswith("missing required key stages[0].epochs (epochs in this stage)")


def test_cross_field_rules(tmp_path: Path) -> None:
    [message] = problems(tmp_path, teacher_weights=[1.0, 2.0])
    assert "teacher_weights = [1.0, 2.0] has 2 entries for 1 teacher(s)" in message
    [message] = problems(tmp_path, teacher_weights=[0])
    assert "at least one must be > 0" in message
    # The EMA teacher is an extra, uncached teacher; the frozen teachers keep their cache.
    config = load_config(write_config(tmp_path, teacher_mode="ema", teacher_cache=True))
    assert (config.teacher_mode, config.teacher_cache) == ("ema", True)


def test_several_problems_are_reported_together(tmp_path: Path) -> None:
    path = write_config(tmp_path, epochs=0, temperture=1)
    with pytest.raises(ConfigError) as info:
        load_config(path, ["batch_size=big"])
    assert len(info.value.problems) == 3
    text = str(info.value)
    assert text.startswith("3 problems in the configuration:")
    assert "--set: batch_size = 'big'" in text and f"{path}: epochs = 0" in text


@pytest.mark.parametrize(("text", "fragment"), [
    ("epochs: [1\n", "not valid YAML"),
    ("- epochs: 1\n", "the top level must be a mapping of key: value, not list"),
    ("epochs: 1\nepochs: 2\n", "found duplicate key 'epochs'"),
])
def test_bad_files_are_errors_naming_the_file(tmp_path: Path, text: str, fragment: str) -> None:
    path = write_yaml(tmp_path, text)
    with pytest.raises(ConfigError, match=fragment) as info:
        load_config(path)
    assert str(info.value).startswith(str(path))


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read the config file \(No such file"):
        load_config(tmp_path / "nope.yaml")


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


# --- saving -------------------------------------------------------------------------------------------


def test_save_then_load_round_trips_exactly(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path), [
        "teacher_model_name_or_path=org/a,org/b", "teacher_weights=1,2", "learning_rate=1e-5",
        "use_lora=no", "val_data_path=yes", "resume_from_checkpoint=latest", "report_to=jsonl,tensorboard",
        "stages=[{epochs: 1, temperature: 4, distillation_weight: 0.9, learning_rate: 2e-5}]",
        "distillation_loss_type=kl_divergence,similarity_mse", "max_steps=7", "lora_target_modules=q,v",
    ])
    saved = cfg.save(tmp_path / "run" / "config.yaml")
    assert load_config(saved) == cfg
    assert yaml.safe_load(saved.read_text()) == cfg.to_dict()
    assert cfg.to_dict()["stages"] == [{"epochs": 1, "temperature": 4.0, "distillation_weight": 0.9,
                                        "learning_rate": 2e-5}]
    assert list(cfg.to_dict())[0] == "model_name_or_path"  # field order, not alphabetical
    assert sorted(p.name for p in saved.parent.iterdir()) == ["config.yaml"]  # no temp file left


def test_defaults_round_trip(tmp_path: Path) -> None:
    cfg = DistillConfig(**REQUIRED)
    assert load_config(cfg.save(tmp_path / "c.yaml")) == cfg


def test_configs_built_in_python_can_be_validated() -> None:
    assert DistillConfig(**REQUIRED, epochs=2).validated() == DistillConfig(**REQUIRED, epochs=2)
    with pytest.raises(ConfigError, match=r"^config: temperature = -1.0 is out of range"):
        DistillConfig(**REQUIRED, temperature=-1.0).validated()


# --- the machinery is reusable --------------------------------------------------------------------------


@dataclass(kw_only=True)
class IndexSettings(Config):
    root: str = field(metadata={"help": "the image folder"})
    shard_rows: int = field(default=1000, metadata={"min": 1})
    index_type: str = field(default="auto", metadata={"choices": ["auto", "flat", "hnsw"]})
    extensions: list[str] = field(default_factory=lambda: [".jpg"])


@dataclass
class Misdeclared(Config):
    size: int = field(default=1, metadata={"minimum": 0})


def test_a_second_config_class_reuses_the_machinery(tmp_path: Path) -> None:
    settings = from_dict(IndexSettings, {"root": "imgs", "shard_rows": "50", "extensions": ".png,.jpg"})
    assert settings == IndexSettings(root="imgs", shard_rows=50, extensions=[".png", ".jpg"])
    with pytest.raises(ConfigError) as info:
        IndexSettings.from_dict({"index_typ": "flat"}, source="index.yaml")
    assert info.value.problems == [
        "index.yaml: unknown key index_typ = 'flat' (did you mean 'index_type'?)",
        "index.yaml: missing required key root (the image folder); set it in the config file or pass --set root=VALUE",
    ]
    path = write_yaml(tmp_path, "root: imgs\nindex_type: hnsw\n")
    assert load_config(path, ["shard_rows=9"], cls=IndexSettings).index_type == "hnsw"


def test_unknown_field_metadata_is_a_programming_error() -> None:
    with pytest.raises(TypeError, match="unknown metadata \\['minimum'\\]"):
        from_dict(Misdeclared, {"size": 2})


# --- CLI -----------------------------------------------------------------------------------------------


def test_cli_helper_turns_config_errors_into_usage_errors(tmp_path: Path) -> None:
    @click.command()
    @click.argument("config", type=click.Path())
    @click.option("--set", "overrides", multiple=True)
    def train(config: str, overrides: tuple[str, ...]) -> None:
        click.echo(load_config_for_cli(config, overrides).epochs)

    path = write_config(tmp_path)
    ok = CliRunner().invoke(train, [str(path), "--set", "epochs=4"])
    assert (ok.exit_code, ok.output.strip()) == (0, "4")
    bad = CliRunner().invoke(train, [str(path), "--set", "epohcs=4"])
    assert bad.exit_code == 2
    assert "Usage:" in bad.output and "unknown key epohcs = '4' (did you mean 'epochs'?)" in bad.output


# --- per-model options ------------------------------------------------------------------------------


def test_per_model_options_belong_to_their_model(tmp_path: Path) -> None:
    """The student's keys are the student's; teacher_* take one value for all teachers or one
    per teacher (null = that teacher's own), and teacher instructions default to the student's."""
    path = write_config(tmp_path, teacher_model_name_or_path=["big", "other"], max_text_length=77,
                        matryoshka_dim=256, teacher_max_text_length=[512, None], teacher_matryoshka_dim=1024,
                        query_instruction="Find the photo", teacher_document_instruction="Represent the photo")
    cfg = load_config(path)
    assert cfg.student_options() == {"max_text_length": 77, "matryoshka_dim": 256,
                                     "query_instruction": "Find the photo", "document_instruction": None}
    assert cfg.teacher_options(0) == {"max_text_length": 512, "matryoshka_dim": 1024,
                                      "query_instruction": "Find the photo", "document_instruction": "Represent the photo"}
    assert cfg.teacher_options(1)["max_text_length"] is None and cfg.teacher_options(1)["matryoshka_dim"] == 1024
    overridden = load_config(path, ["teacher_max_text_length=64,null", "teacher_matryoshka_dim=null"])
    assert overridden.teacher_max_text_length == [64, None] and overridden.teacher_matryoshka_dim is None
    assert load_config(path, ["teacher_max_text_length=32"]).teacher_options(1)["max_text_length"] == 32


def test_per_teacher_lists_must_match_the_teachers(tmp_path: Path) -> None:
    [message] = problems(tmp_path, teacher_max_text_length=[64, 32])
    assert "teacher_max_text_length = [64, 32] has 2 entries for 1 teacher(s)" in message
    [message] = problems(tmp_path, teacher_matryoshka_dim=[0])
    assert "teacher_matryoshka_dim = [0] has item 0, which is out of range" in message
    [message] = problems(tmp_path, teacher_instruction="x")
    assert "unknown key teacher_instruction = 'x'" in message
