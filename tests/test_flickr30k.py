from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from vkd.data.flickr30k import KarpathyFormatError, MissingImagesError, convert_karpathy, flickr30k_command
from vkd.data.pairs import read_pairs

# (filename, Karpathy split, imgid)
ENTRIES = [
    ("100.jpg", "train", 0),
    ("101.jpg", "train", 1),
    ("102.jpg", "restval", 2),
    ("103.jpg", "val", 3),
    ("104.jpg", "test", 4),
    ("105.jpg", "test", 5),
]


def _captions(filename: str) -> list[dict[str, object]]:
    stem = filename.split(".")[0]
    # Karpathy's raw captions carry stray whitespace; 'tokens' is ignored
    return [{"raw": f" caption {i} of image {stem} ", "tokens": ["caption"]} for i in range(5)]


@pytest.fixture
def flickr(tmp_path: Path) -> tuple[Path, Path]:
    images = tmp_path / "flickr30k-images"
    images.mkdir()
    for index, (filename, _, _) in enumerate(ENTRIES):
        Image.new("RGB", (6, 4), (index * 40, 0, 0)).save(images / filename)
    document = {
        "dataset": "flickr30k",
        "images": [
            {"filename": f, "split": s, "imgid": i, "sentids": [], "sentences": _captions(f)} for f, s, i in ENTRIES
        ],
    }
    karpathy = tmp_path / "dataset_flickr30k.json"
    karpathy.write_text(json.dumps(document), encoding="utf-8")
    return karpathy, images


def test_convert_writes_three_splits_with_relative_paths(flickr: tuple[Path, Path], tmp_path: Path) -> None:
    karpathy, images = flickr
    out = tmp_path / "data" / "flickr30k"
    summary = convert_karpathy(karpathy, images, out)

    assert summary.images == {"train": 3, "val": 1, "test": 2}
    assert summary.captions == {"train": 15, "val": 5, "test": 10}
    first = json.loads((out / "train.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert first == {
        "image": "../../flickr30k-images/100.jpg",
        "text": [f"caption {i} of image 100" for i in range(5)],
        "image_id": "0",
    }

    train = read_pairs(out / "train.jsonl")
    assert [image.name for image in train.images()] == ["100.jpg", "101.jpg", "102.jpg"]  # restval -> train
    assert train.image_ids() == ["0", "1", "2"]
    test = read_pairs(out / "test.jsonl")
    assert len(test) == 10
    assert test.captions_by_image == {"4": [0, 1, 2, 3, 4], "5": [5, 6, 7, 8, 9]}
    assert [image.resolve() for image in test.images()] == [(images / f).resolve() for f in ("104.jpg", "105.jpg")]
    # a 6-image subset is not the standard 29000/1014/1000 split
    assert any("differ from the standard Flickr30k Karpathy split" in note for note in summary.warnings())


def test_command_prints_counts_and_warning(flickr: tuple[Path, Path], tmp_path: Path) -> None:
    karpathy, images = flickr
    out = tmp_path / "out"
    result = CliRunner().invoke(
        flickr30k_command, ["--karpathy", str(karpathy), "--images", str(images), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith(str(out / "train.jsonl")) and "3 images" in lines[0] and "15 captions" in lines[0]
    assert "1 images" in lines[1] and "5 captions" in lines[1]
    assert "2 images" in lines[2] and "10 captions" in lines[2]
    assert "warning: image counts (train 3, val 1, test 2) differ" in result.stderr


def test_missing_images_fail_or_are_skipped(flickr: tuple[Path, Path], tmp_path: Path) -> None:
    karpathy, images = flickr
    (images / "101.jpg").unlink()
    (images / "104.jpg").unlink()
    out = tmp_path / "out"

    with pytest.raises(MissingImagesError) as raised:
        convert_karpathy(karpathy, images, out)
    assert "101.jpg" in str(raised.value) and "104.jpg" in str(raised.value)
    assert "--skip-missing" in str(raised.value)
    assert not out.exists()  # nothing is written when the check fails

    args = ["--karpathy", str(karpathy), "--images", str(images), "--out", str(out)]
    failed = CliRunner().invoke(flickr30k_command, args)
    assert failed.exit_code == 1
    assert "2 image(s) listed in the Karpathy JSON are not under" in failed.output

    skipped = CliRunner().invoke(flickr30k_command, [*args, "--skip-missing"])
    assert skipped.exit_code == 0, skipped.output
    assert f"missing, skipped: {images / '101.jpg'}" in skipped.stderr
    assert "skipped 2 image(s)" in skipped.stderr
    assert [p.name for p in read_pairs(out / "train.jsonl").images()] == ["100.jpg", "102.jpg"]
    assert [p.name for p in read_pairs(out / "test.jsonl").images()] == ["105.jpg"]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda doc: doc["images"][2].update(split="holdout"), "images[2] (102.jpg): 'split' is 'holdout'"),
        (lambda doc: doc["images"][1].pop("filename"), "images[1]: 'filename' must be a non-empty string"),
        (lambda doc: doc["images"][3].update(sentences=[{"raw": "  "}]), "images[3] (103.jpg): no non-empty caption"),
        (lambda doc: doc["images"][4].update(sentences=[{"tokens": []}]), "sentences[0] has no 'raw'"),
        (lambda doc: doc["images"][5].update(imgid=0), "image id 0 is also used by 100.jpg"),
        (lambda doc: doc.pop("images"), "expected an object with an 'images' list"),
    ],
)
def test_bad_karpathy_json_names_the_entry(flickr: tuple[Path, Path], tmp_path: Path, mutate, expected: str) -> None:
    karpathy, images = flickr
    document = json.loads(karpathy.read_text(encoding="utf-8"))
    mutate(document)
    karpathy.write_text(json.dumps(document), encoding="utf-8")
    with pytest.raises(KarpathyFormatError) as raised:
        convert_karpathy(karpathy, images, tmp_path / "out")
    assert str(karpathy) in str(raised.value)
    assert expected in str(raised.value)


def test_command_reports_unreadable_json(tmp_path: Path) -> None:
    karpathy = tmp_path / "dataset_flickr30k.json"
    karpathy.write_text("{not json", encoding="utf-8")
    result = CliRunner().invoke(
        flickr30k_command, ["--karpathy", str(karpathy), "--images", str(tmp_path), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 1
    assert f"Error: {karpathy}: not valid JSON" in result.output
