from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vkd.data.pairs import PairFileError, PairSet, read_pairs, sample_id_for, write_pairs


def _image(path: Path, colour: tuple[int, int, int] = (200, 10, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), colour).save(path)
    return path


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    """images/ beside pairs/, so pair files reach their images through '..'."""
    for name in ("a.png", "b.png", "c.png"):
        _image(tmp_path / "images" / name)
    return tmp_path


def test_read_pairs_expands_captions_and_groups_by_image(layout: Path) -> None:
    path = _write_lines(layout / "pairs" / "train.jsonl", [
        json.dumps({"image": "../images/a.png", "text": ["a red square", "  red  "], "image_id": 7}),
        "",  # blank lines are skipped
        json.dumps({"image": "../images/b.png", "text": "another red square"}),
        json.dumps({"image": "../images/c.png", "text": ["one", "two", "three"], "image_id": "c"}),
    ])
    pairs = read_pairs(path)

    assert len(pairs) == 6
    assert pairs.texts() == ["a red square", "red", "another red square", "one", "two", "three"]
    assert pairs.images() == [layout / "pairs" / "../images" / name for name in ("a.png", "b.png", "c.png")]
    assert all(image.is_file() for image in pairs.images())
    # image_id: integers become strings, the default is the path as written
    assert pairs.image_ids() == ["7", "../images/b.png", "c"]
    assert pairs.captions_by_image == {"7": [0, 1], "../images/b.png": [2], "c": [3, 4, 5]}
    np.testing.assert_array_equal(pairs.text_to_image, [0, 0, 1, 2, 2, 2])
    assert pairs[3].image_id == "c" and pairs[3].text == "one"
    assert pairs.source == path


def test_sample_ids_survive_reordering_and_stay_unique(layout: Path) -> None:
    lines = [
        json.dumps({"image": "images/a.png", "text": ["a dog", "a dog"]}),
        json.dumps({"image": "images/b.png", "text": "a cat"}),
    ]
    forward = read_pairs(_write_lines(layout / "forward.jsonl", lines))
    backward = read_pairs(_write_lines(layout / "backward.jsonl", lines[::-1]))

    ids = forward.sample_ids()
    assert len(set(ids)) == 3  # the duplicate caption gets its own id
    assert ids[0] == sample_id_for("images/a.png", "a dog")
    assert ids[1] == sample_id_for("images/a.png", "a dog", 1) != ids[0]
    by_text_forward = {(p.image.name, p.text, p.sample_id) for p in forward}
    by_text_backward = {(p.image.name, p.text, p.sample_id) for p in backward}
    assert by_text_forward == by_text_backward


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"image": "images/a.png", "text": "ok"', "not valid JSON"),
        ('["images/a.png", "a dog"]', "expected a JSON object"),
        ('{"text": "a dog"}', "missing key 'image'"),
        ('{"image": "images/a.png"}', "missing key 'text'"),
        ('{"image": "images/missing.png", "text": "a dog"}', "image 'images/missing.png' not found"),
        ('{"image": "images/a.png", "text": "   "}', "'text' is empty"),
        ('{"image": "images/a.png", "text": ["a dog", ""]}', "'text'[1] is empty"),
        ('{"image": "images/a.png", "text": []}', "non-empty list of strings"),
        ('{"image": "images/a.png", "text": 42}', "got int 42"),
        ('{"image": "images/a.png", "text": ["a dog", 3]}', "'text'[1] must be a string"),
        ('{"image": 5, "text": "a dog"}', "'image' must be a non-empty path string"),
        ('{"image": "images/a.png", "text": "a dog", "image_id": [1]}', "'image_id' must be"),
        ('{"image": "images/a.png", "text": "a dog", "caption": "x"}', "unknown key(s) ['caption']"),
    ],
)
def test_bad_lines_name_file_and_line(layout: Path, line: str, expected: str) -> None:
    good = json.dumps({"image": "images/b.png", "text": "fine"})
    path = _write_lines(layout / "bad.jsonl", [good, "", line])
    with pytest.raises(PairFileError) as raised:
        read_pairs(path)
    message = str(raised.value)
    assert message.startswith(f"{path}:3: ")
    assert expected in message


def test_one_image_id_for_two_images_is_an_error(layout: Path) -> None:
    path = _write_lines(layout / "clash.jsonl", [
        json.dumps({"image": "images/a.png", "text": "x", "image_id": "same"}),
        json.dumps({"image": "images/b.png", "text": "y", "image_id": "same"}),
    ])
    with pytest.raises(PairFileError, match="image_id 'same' names two images"):
        read_pairs(path)


def test_missing_file_and_unchecked_images(tmp_path: Path) -> None:
    with pytest.raises(PairFileError, match="pair file not found"):
        read_pairs(tmp_path / "nope.jsonl")
    path = _write_lines(tmp_path / "later.jsonl", [json.dumps({"image": "later.png", "text": "soon"})])
    assert read_pairs(path, check_images=False).images() == [tmp_path / "later.png"]


def test_write_pairs_round_trip_with_relative_paths(layout: Path) -> None:
    out = layout / "out" / "nested" / "pairs.jsonl"
    count = write_pairs(out, [
        {"image": (layout / "images" / "a.png").resolve(), "text": ["a", "b"], "image_id": 1},
        {"image": str((layout / "images" / "b.png").resolve()), "text": "c"},
    ])
    assert count == 2
    written = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [record["image"] for record in written] == ["../../images/a.png", "../../images/b.png"]

    pairs = read_pairs(out)
    assert pairs.texts() == ["a", "b", "c"]
    assert [image.resolve() for image in pairs.images()] == [
        (layout / "images" / name).resolve() for name in ("a.png", "b.png")
    ]
    assert isinstance(pairs, PairSet) and pairs.image_ids()[0] == "1"


def test_write_pairs_rejects_bad_records_and_keeps_the_old_file(tmp_path: Path) -> None:
    out = tmp_path / "pairs.jsonl"
    write_pairs(out, [{"image": "a.png", "text": "kept"}])
    before = out.read_text(encoding="utf-8")
    with pytest.raises(PairFileError, match=r"record 1: 'text' is empty"):
        write_pairs(out, [{"image": "b.png", "text": "fine"}, {"image": "c.png", "text": ""}])
    assert out.read_text(encoding="utf-8") == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["pairs.jsonl"]
