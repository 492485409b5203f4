"""The example configs the README points to stay valid as the config grows."""

from pathlib import Path

import pytest

from vkd.config import load_config

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_config_loads(path: Path) -> None:
    config = load_config(path)
    assert config.use_distillation and config.teachers
    assert Path(config.data_path).name == "train.jsonl"


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 2
