"""The synthetic scene generator: determinism, clean splits, held-out pairs, honest captions."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from vkd.data.commands import synth_command
from vkd.data.synth import SPLITS, choose_heldout, choose_target_only, generate

N, SIZE, TEST_FRAC = 60, 32, 0.3


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Seed 0 twice (in different folders) and seed 1, generated once for the module."""
    out = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        out[name] = tmp_path_factory.mktemp(f"synth-{name}")
        generate(out[name], N, seed=seed, size=SIZE, val_frac=0.15, test_frac=TEST_FRAC, overwrite=True)
    return out


def _file_hashes(root: Path) -> dict[str, str]:
    return {path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*")) if path.is_file()}


def _pixel_hashes(root: Path, split: str) -> list[str]:
    return [hashlib.sha256(np.asarray(Image.open(path).convert("RGB")).tobytes()).hexdigest()
            for path in sorted((root / "images" / split).glob("*.png"))]


def _pairs(root: Path, split: str) -> list[dict]:
    with (root / f"{split}.jsonl").open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def _meta(root: Path) -> dict:
    return json.loads((root / "synth.json").read_text(encoding="utf-8"))


def test_same_seed_gives_byte_identical_files(made: dict[str, Path]) -> None:
    first, second = _file_hashes(made["a"]), _file_hashes(made["b"])
    assert len(first) == N + 4  # images + three pair files + synth.json
    assert first == second


def test_different_seeds_give_different_data(made: dict[str, Path]) -> None:
    a, c = set(_pixel_hashes(made["a"], "train")), set(_pixel_hashes(made["c"], "train"))
    assert not a & c
    assert (made["a"] / "train.jsonl").read_bytes() != (made["c"] / "train.jsonl").read_bytes()


def test_pair_files_load_with_plain_json_and_point_at_images(made: dict[str, Path]) -> None:
    root = made["a"]
    meta = _meta(root)
    ids = set()
    for split in SPLITS:
        records = _pairs(root, split)
        assert len(records) == meta["counts"][split] > 0
        for record in records:
            assert set(record) == {"image", "text", "image_id"}
            assert record["image"].startswith(f"images/{split}/")
            with Image.open(root / record["image"]) as image:
                assert image.format == "PNG" and image.size == (SIZE, SIZE) and image.mode == "RGB"
            assert 2 <= len(record["text"]) <= 5
            assert len(set(record["text"])) == len(record["text"])
            assert record["image_id"] == f"{split}-{Path(record['image']).stem}"
            ids.add(record["image_id"])
    assert len(ids) == N == meta["n"] == sum(meta["counts"].values())
    assert set(meta["images"]) == ids


def test_test_images_are_new_renders(made: dict[str, Path]) -> None:
    seen = _pixel_hashes(made["a"], "train") + _pixel_hashes(made["a"], "val")
    test = _pixel_hashes(made["a"], "test")
    assert not set(test) & set(seen)
    assert len(set(seen + test)) == N


def test_heldout_pairs_only_in_test(made: dict[str, Path]) -> None:
    meta = _meta(made["a"])
    heldout = {tuple(pair) for pair in meta["heldout"]}
    # about 12% of the 12 x 9 pairs, and each kept out of few scenes and objects
    assert len(heldout) == 13
    combos: dict[str, set[tuple[str, str]]] = {split: set() for split in SPLITS}
    for record in meta["images"].values():
        combos[record["split"]] |= {(obj["object"], record["scene"]) for obj in record["objects"]}
    assert not combos["train"] & heldout
    assert not combos["val"] & heldout
    assert heldout <= combos["test"]
    assert heldout == set(map(tuple, choose_heldout(0, meta["counts"]["test"])))


def test_small_test_split_still_shows_every_heldout_pair(tmp_path: Path) -> None:
    summary = generate(tmp_path, 10, seed=3, size=SIZE, val_frac=0.0, test_frac=0.2)
    meta = _meta(tmp_path)
    assert summary.images == {"train": 8, "val": 0, "test": 2} and len(summary.heldout) == 2
    shown = {(obj["object"], rec["scene"]) for rec in meta["images"].values() if rec["split"] == "test"
             for obj in rec["objects"]}
    assert set(summary.heldout) <= shown
    assert (tmp_path / "val.jsonl").read_text() == ""


def test_captions_say_what_was_drawn(made: dict[str, Path]) -> None:
    root = made["a"]
    meta = _meta(root)
    vocab = meta["vocab"]
    nouns = {name: set(v["singular"]) | set(v["plural"]) for name, v in vocab["objects"].items()}
    colours, sizes = set(vocab["colours"]), {k: set(v) for k, v in vocab["sizes"].items()}
    night_words = {"night", "nighttime", "dark"}
    checked = 0
    for split in SPLITS:
        for record in _pairs(root, split):
            truth = meta["images"][record["image_id"]]
            drawn = {obj["object"] for obj in truth["objects"]}
            for caption in record["text"]:
                words = set(re.findall(r"[a-z]+", caption))
                for name, synonyms in nouns.items():
                    assert bool(words & synonyms) == (name in drawn), (caption, truth)
                assert words & colours <= {obj["colour"] for obj in truth["objects"]}, (caption, truth)
                for label, synonyms in sizes.items():
                    if words & synonyms:
                        assert label in {obj["size"] for obj in truth["objects"]}, (caption, truth)
                if words & night_words:
                    assert truth["night"], (caption, truth)
                counts = {obj["count"] for obj in truth["objects"]}
                assert ("three" in words) == (3 in counts), (caption, truth)
                if "two" in words or "pair" in words:
                    assert 2 in counts, (caption, truth)
                checked += 1
    assert checked >= 2 * N


def test_colours_are_plausible_for_each_object(made: dict[str, Path]) -> None:
    meta = _meta(made["c"])
    for record in meta["images"].values():
        for obj in record["objects"]:
            assert obj["colour"] in meta["vocab"]["objects"][obj["object"]]["colours"]
            assert 1 <= obj["count"] <= 3
        assert sum(obj["count"] for obj in record["objects"]) <= 3


def test_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="leaves no training image"):
        generate(tmp_path / "x", 10, val_frac=0.5, test_frac=0.5)
    with pytest.raises(ValueError, match="size=8"):
        generate(tmp_path / "x", 10, size=8)
    assert not (tmp_path / "x").exists()


def test_cli_writes_refuses_to_clobber_and_previews(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "data"
    args = ["--out", str(out), "--n", "12", "--seed", "2", "--size", str(SIZE)]
    result = runner.invoke(synth_command, [*args, "--preview", str(tmp_path / "grid.png")])
    assert result.exit_code == 0, result.output
    assert "train: 10 images" in result.output and "held out of train and val" in result.output
    assert Image.open(tmp_path / "grid.png").size[0] == 4 * (SIZE * 4 + 8)
    before = _file_hashes(out)

    again = runner.invoke(synth_command, [*args, "--seed", "5"])
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert _file_hashes(out) == before

    bad = runner.invoke(synth_command, ["--out", str(tmp_path / "other"), "--test-frac", "1.5"])
    assert bad.exit_code == 2 and "--test-frac" in bad.output

    replaced = runner.invoke(synth_command, [*args, "--seed", "5", "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert _file_hashes(out) != before and _meta(out)["seed"] == 5
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.fixture(scope="module")
def domains(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A general pre-training set and a target domain made with one seed, as the demo makes them."""
    out = {}
    for domain, test_frac in (("general", 0.0), ("target", 0.2)):
        out[domain] = tmp_path_factory.mktemp(f"synth-{domain}")
        generate(out[domain], 80, seed=4, size=SIZE, val_frac=0.1, test_frac=test_frac, domain=domain,
                 overwrite=True)
    return out


def _words(root: Path) -> set[str]:
    return {word for split in SPLITS for record in _pairs(root, split) for caption in record["text"]
            for word in re.findall(r"[a-z]+", caption)}


def test_general_and_target_domains_differ_in_pairs_and_wording(domains: dict[str, Path]) -> None:
    general, target = _meta(domains["general"]), _meta(domains["target"])
    target_only = {tuple(pair) for pair in general["target_only"]}
    # both sets agree on the target-only pairs: a function of the seed
    assert target_only == {tuple(pair) for pair in target["target_only"]} == set(choose_target_only(4))
    assert len(target_only) == 27
    # no scene and no object is target-only as a whole: general data still teaches every word
    assert {o for o, _ in target_only} != set(general["vocab"]["objects"])

    def combos(meta: dict, split: str | None = None) -> set[tuple[str, str]]:
        return {(obj["object"], rec["scene"]) for rec in meta["images"].values()
                if split is None or rec["split"] == split for obj in rec["objects"]}

    assert not combos(general) & target_only
    assert combos(target, "train") & target_only  # fine-tuning sees target-only pairs
    assert not combos(target, "train") & {tuple(p) for p in target["heldout"]}  # test still holds some out

    # layout wording belongs to the target domain; general captions mostly use the common names
    general_words, target_words = _words(domains["general"]), _words(domains["target"])
    assert not general_words & {"left", "right", "there", "next", "middle"}
    assert target_words & {"left", "right", "there", "next", "middle"}

    def share(root: Path, words: set[str]) -> float:
        captions = [c for split in SPLITS for r in _pairs(root, split) for c in r["text"]]
        return sum(bool(set(re.findall(r"[a-z]+", c)) & words) for c in captions) / len(captions)

    rare = {"puppy", "kitty", "doggy", "bunny", "cottage", "automobile", "sailboat", "parasol", "seaside", "woods"}
    assert share(domains["general"], rare) < share(domains["target"], rare)
    assert general["domain"] == "general" and target["domain"] == "target"


def test_domain_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="domain='web'"):
        generate(tmp_path / "x", 10, domain="web")


def test_cli_makes_a_general_set(tmp_path: Path) -> None:
    result = CliRunner().invoke(synth_command, ["--out", str(tmp_path / "g"), "--n", "12", "--size", str(SIZE),
                                                "--test-frac", "0", "--domain", "general"])
    assert result.exit_code == 0, result.output
    assert _meta(tmp_path / "g")["domain"] == "general"
