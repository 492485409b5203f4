from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import vkd.evaluate as evaluate
from vkd.data.pairs import read_pairs, write_pairs
from vkd.evaluate import eval_command, evaluate_encoder, format_table, recall_at_k
from vkd.models.base import Encoder, load_rgb


def from_similarities(similarities: list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings whose text-image dot products are exactly ``similarities`` [texts, images]."""
    scores = np.asarray(similarities, dtype=np.float32)
    return scores, np.eye(scores.shape[1], dtype=np.float32)


def test_recall_on_a_hand_made_matrix_with_several_captions_per_image() -> None:
    # two captions per image; rows are captions, columns images
    texts, images = from_similarities([
        [0.9, 0.1, 0.2],  # caption of image 0, its image first        -> rank 0
        [0.3, 0.5, 0.1],  # caption of image 0, image 1 ahead          -> rank 1
        [0.2, 0.8, 0.4],  # caption of image 1                          -> rank 0
        [0.6, 0.4, 0.7],  # caption of image 1, images 2 and 0 ahead    -> rank 2
        [0.1, 0.2, 0.3],  # caption of image 2                          -> rank 0
        [0.5, 0.4, 0.3],  # caption of image 2, images 0 and 1 ahead    -> rank 2
    ])
    text_to_image = np.array([0, 0, 1, 1, 2, 2])
    metrics = recall_at_k(texts, images, text_to_image, ks=(1, 2, 3))

    # text -> image ranks [0, 1, 0, 2, 0, 2]
    assert metrics["t2i_R@1"] == pytest.approx(100 * 3 / 6)
    assert metrics["t2i_R@2"] == pytest.approx(100 * 4 / 6)
    assert metrics["t2i_R@3"] == pytest.approx(100.0)
    assert metrics["t2i_medr"] == 1.5
    # image -> text, hit when ANY own caption is in the top K:
    #   image 0: caption 0 (0.9) beats every other caption         -> rank 0 (caption 1 is poor, no matter)
    #   image 1: caption 2 (0.8) beats every other caption         -> rank 0
    #   image 2: best own 0.3; captions 2 (0.4) and 3 (0.7) beat it -> rank 2
    assert metrics["i2t_R@1"] == pytest.approx(100 * 2 / 3)
    assert metrics["i2t_R@2"] == pytest.approx(100 * 2 / 3)
    assert metrics["i2t_R@3"] == pytest.approx(100.0)
    assert metrics["i2t_medr"] == 1.0
    assert metrics["rsum"] == pytest.approx(50 + 200 / 3 + 100 + 200 / 3 + 200 / 3 + 100)
    assert list(metrics) == [
        "t2i_R@1", "t2i_R@2", "t2i_R@3", "t2i_medr", "i2t_R@1", "i2t_R@2", "i2t_R@3", "i2t_medr", "rsum",
    ]


def test_ties_count_against_the_query() -> None:
    texts, images = from_similarities([
        [0.5, 0.5, 0.1],  # tie between its image 0 and image 1        -> rank 1
        [0.2, 0.7, 0.1],  # caption of image 1, clear winner           -> rank 0
        [0.7, 0.3, 0.3],  # caption of image 1; image 0 ahead, image 2 tied -> rank 2
        [0.1, 0.6, 0.6],  # caption of image 2 tied with image 1       -> rank 1
    ])
    metrics = recall_at_k(texts, images, np.array([0, 1, 1, 2]), ks=(1, 2, 3))
    assert metrics["t2i_R@1"] == pytest.approx(25.0)
    assert metrics["t2i_R@2"] == pytest.approx(75.0)
    assert metrics["t2i_R@3"] == pytest.approx(100.0)
    # image 0: own 0.5; caption 2 (0.7) ahead                          -> rank 1
    # image 1: own best 0.7 (caption 1); caption 3's 0.6 below it      -> rank 0, own captions never count
    # image 2: own 0.6; captions 0 (0.1), 1 (0.1), 2 (0.3) below it   -> rank 0
    assert metrics["i2t_R@1"] == pytest.approx(100 * 2 / 3)

    # an i2t tie with another image's caption also counts against the image
    texts, images = from_similarities([[0.4, 0.0], [0.4, 0.9]])
    metrics = recall_at_k(texts, images, np.array([0, 1]), ks=(1, 2))
    assert metrics["i2t_R@1"] == pytest.approx(50.0)  # image 0: caption 1 ties its own 0.4
    assert metrics["t2i_R@1"] == pytest.approx(100.0)


def test_a_collapsed_model_scores_zero_not_one_hundred() -> None:
    texts = np.ones((8, 4), dtype=np.float32) / 2
    images = np.ones((4, 4), dtype=np.float32) / 2
    metrics = recall_at_k(texts, images, np.repeat(np.arange(4), 2), ks=(1, 3, 4))
    assert metrics["t2i_R@1"] == metrics["t2i_R@3"] == 0.0
    assert metrics["i2t_R@1"] == metrics["i2t_R@3"] == 0.0
    assert metrics["t2i_R@4"] == 100.0  # K at least the gallery size: everything is a hit
    assert metrics["i2t_R@4"] == 0.0  # 6 other captions tie ahead of the best own one


def test_images_without_captions_are_only_distractors() -> None:
    texts, images = from_similarities([
        [0.5, 0.1, 0.9],  # caption of image 0; caption-less image 2 wins -> rank 1
        [0.1, 0.8, 0.2],  # caption of image 1                              -> rank 0
    ])
    metrics = recall_at_k(texts, images, np.array([0, 1]), ks=(1,))
    assert metrics["t2i_R@1"] == pytest.approx(50.0)
    assert metrics["i2t_R@1"] == pytest.approx(100.0)  # two image queries, not three


def _reference(texts: np.ndarray, images: np.ndarray, text_to_image: np.ndarray, ks: Sequence[int]) -> dict:
    """Recall@K by sorting full rows (fine for tie-free random data)."""
    scores = texts @ images.T
    t2i = np.array([np.where(np.argsort(-row) == text_to_image[i])[0][0] for i, row in enumerate(scores)])
    i2t = []
    for image in np.unique(text_to_image):
        order = np.argsort(-scores[:, image])
        i2t.append(np.where(np.isin(order, np.where(text_to_image == image)[0]))[0].min())
    i2t = np.array(i2t)
    out = {}
    for name, ranks in (("t2i", t2i), ("i2t", i2t)):
        for k in ks:
            out[f"{name}_R@{k}"] = 100 * np.mean(ranks < k)
        out[f"{name}_medr"] = np.median(ranks + 1)
    return out


@pytest.mark.parametrize("block_elements", [1, 7, 64, 1 << 24])
def test_blocked_ranks_match_a_full_sort(monkeypatch: pytest.MonkeyPatch, block_elements: int) -> None:
    rng = np.random.default_rng(0)
    images = rng.normal(size=(40, 16)).astype(np.float32)
    text_to_image = np.concatenate([np.repeat(np.arange(30), 5), rng.integers(0, 40, 7)])
    texts = images[text_to_image] + 1.2 * rng.normal(size=(len(text_to_image), 16)).astype(np.float32)
    monkeypatch.setattr(evaluate, "_BLOCK_ELEMENTS", block_elements)

    metrics = recall_at_k(texts, images, text_to_image, ks=(1, 5, 10))
    expected = _reference(texts, images, text_to_image, (1, 5, 10))
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value), key
    assert 0 < metrics["t2i_R@1"] < 100  # the data is neither trivial nor hopeless


@pytest.mark.parametrize(
    ("texts", "images", "text_to_image", "message"),
    [
        (np.zeros((2, 3)), np.zeros((2, 4)), [0, 1], "differ in dimension: 3 vs 4"),
        (np.zeros((2, 3)), np.zeros((2, 3)), [0, 2], "holds 2, outside the 2 images"),
        (np.zeros((2, 3)), np.zeros((2, 3)), [0], "one image index per text (2)"),
        (np.zeros((2, 3)), np.zeros((2, 3)), [0.0, 1.0], "integer array"),
        (np.full((2, 3), np.nan), np.zeros((2, 3)), [0, 1], "text_emb holds NaN"),
        (np.zeros((0, 3)), np.zeros((2, 3)), np.zeros(0, dtype=int), "at least one text"),
    ],
)
def test_bad_inputs_are_explained(texts, images, text_to_image, message: str) -> None:
    with pytest.raises(ValueError) as raised:
        recall_at_k(texts, images, np.asarray(text_to_image))
    assert message in str(raised.value)


class ColourEncoder(Encoder):
    """A real (if simple) encoder: images by their mean colour, texts by the colour words in them."""

    name = "colour"
    family = "test"
    dim = 3
    WORDS = {"red": 0, "green": 1, "blue": 2}

    def __init__(self) -> None:
        self.images_seen: list[str] = []

    @property
    def fingerprint(self) -> str:
        return "colour-v1"

    def _encode_text_batch(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), 3), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in text.lower().split():
                if word in self.WORDS:
                    out[row, self.WORDS[word]] += 1
        return out

    def _encode_image_batch(self, images: Sequence[Any]) -> np.ndarray:
        self.images_seen.extend(str(image) for image in images)
        return np.stack([np.asarray(load_rgb(image), dtype=np.float32).mean(axis=(0, 1)) for image in images])


@pytest.fixture
def colour_pairs(tmp_path: Path) -> Path:
    colours = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
    for name, rgb in colours.items():
        Image.new("RGB", (5, 5), rgb).save(tmp_path / f"{name}.png")
    path = tmp_path / "test.jsonl"
    write_pairs(path, [
        {"image": "red.png", "text": ["a red square", "something red"]},
        {"image": "green.png", "text": ["a green square", "green"]},
        {"image": "blue.png", "text": ["a blue square", "a red thing"]},  # a wrong caption
    ])
    return path


def test_evaluate_encoder_encodes_each_image_once(colour_pairs: Path) -> None:
    encoder = ColourEncoder()
    metrics = evaluate_encoder(encoder, colour_pairs, batch_size=2)

    assert sorted(Path(seen).name for seen in encoder.images_seen) == ["blue.png", "green.png", "red.png"]
    assert (metrics["n_images"], metrics["n_texts"]) == (3, 6)
    # t2i: "a red thing" (blue image) scores 0 on blue and green, 1 on red -> rank 2; the rest rank 0
    assert metrics["t2i_R@1"] == pytest.approx(100 * 5 / 6)
    assert metrics["t2i_R@5"] == pytest.approx(100.0)
    # i2t: the red image ties its own captions with "a red thing" -> rank 1; green and blue rank 0
    assert metrics["i2t_R@1"] == pytest.approx(100 * 2 / 3)
    assert metrics["i2t_R@5"] == pytest.approx(100.0)

    # the same numbers from a PairSet, and printed as a table
    again = evaluate_encoder(ColourEncoder(), read_pairs(colour_pairs))
    assert again == metrics
    table = format_table(metrics)
    assert "text→image" in table and "83.3" in table and "66.7" in table


def test_eval_command_rejects_a_bad_pair_file(tmp_path: Path) -> None:
    path = tmp_path / "test.jsonl"
    path.write_text('{"image": "x.png", "text": "a dog"}\n{"image": "y.png"}\n', encoding="utf-8")
    result = CliRunner().invoke(eval_command, ["--model", str(tmp_path / "no-model"), "--data", str(path)])
    assert result.exit_code == 1
    assert f"Error: {path}:1: image 'x.png' not found" in result.output


@pytest.mark.slow
def test_eval_command_on_a_tiny_clip(tiny_clip: Path, colour_pairs: Path) -> None:
    from vkd.models import load_encoder

    result = CliRunner().invoke(
        eval_command, ["--model", str(tiny_clip), "--data", str(colour_pairs), "--json", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    direct = evaluate_encoder(load_encoder(tiny_clip, device="cpu"), colour_pairs)
    assert {key: printed[key] for key in direct} == direct
    assert printed["model"] == str(tiny_clip) and printed["n_texts"] == 6

    table = CliRunner().invoke(eval_command, ["--model", str(tiny_clip), "--data", str(colour_pairs)])
    assert table.exit_code == 0, table.output
    assert "image→text" in table.stdout and "3 images, 6 captions" in table.stdout


def make_run(root: Path, model: Path | None) -> Path:
    """A folder laid out like a `vkd distill` output_dir (model/ only once the run has ended)."""
    import shutil

    root.mkdir(parents=True)
    (root / "config.yaml").write_text("output_dir: x\n")
    (root / "metrics.jsonl").write_text("")
    if model is not None:
        shutil.copytree(model, root / "model")
    return root


def test_resolve_model_dir_finds_the_model_of_a_distill_run(tmp_path: Path, tiny_clip: Path) -> None:
    from vkd.distill.rundir import resolve_model_dir

    run = make_run(tmp_path / "runs" / "x", tiny_clip)
    assert resolve_model_dir(run) == str(run / "model")
    assert resolve_model_dir(str(run)) == str(run / "model")
    # a model directory, a hub id and a missing path are left to the loader
    assert resolve_model_dir(tiny_clip) == str(tiny_clip)
    assert resolve_model_dir("openai/clip-vit-base-patch32") == "openai/clip-vit-base-patch32"
    assert resolve_model_dir(tmp_path / "nothing") == str(tmp_path / "nothing")
    unfinished = make_run(tmp_path / "runs" / "y", None)
    with pytest.raises(ValueError, match=r"runs/y is a vkd distill run without a model yet: .*runs/y/model"):
        resolve_model_dir(unfinished)


def test_eval_command_points_at_the_model_of_a_distill_run(tiny_clip: Path, colour_pairs: Path,
                                                           tmp_path: Path) -> None:
    run = make_run(tmp_path / "runs" / "x", tiny_clip)
    result = CliRunner().invoke(eval_command, ["--model", str(run), "--data", str(colour_pairs), "--json",
                                               "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert f"{run} is a vkd distill run; evaluating {run / 'model'}" in result.stderr
    assert json.loads(result.stdout)["model"] == str(run / "model")

    unfinished = make_run(tmp_path / "runs" / "y", None)
    result = CliRunner().invoke(eval_command, ["--model", str(unfinished), "--data", str(colour_pairs)])
    assert result.exit_code == 1 and "is a vkd distill run without a model yet" in result.output


def test_index_and_export_resolve_a_distill_run_too(tiny_clip: Path, tmp_path: Path) -> None:
    from vkd.cli import cli

    unfinished = make_run(tmp_path / "runs" / "y", None)
    for args in (["export", str(unfinished)], ["index", str(tmp_path), "--model", str(unfinished)]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1 and "is a vkd distill run without a model yet" in result.output, result.output

    run = make_run(tmp_path / "runs" / "x", tiny_clip)
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(images / "red.png")
    result = CliRunner().invoke(cli, ["index", str(images), "--model", str(run), "--out", str(tmp_path / "idx"),
                                      "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert f"{run} is a vkd distill run; using {run / 'model'} as the student" in result.stderr
    assert f"student {run / 'model'}" in result.stdout


def test_eval_command_encodes_captions_as_queries_and_images_as_documents(
    tiny_qwen3vl: Path, tiny_clip: Path, colour_pairs: Path
) -> None:
    """--query-instruction / --document-instruction reach the model: captions are encoded with
    the query instruction and images with the document one (what the JSON reports)."""
    from vkd.models import load_encoder

    instructions = ["--query-instruction", "Find the photo", "--document-instruction", "Represent the photo"]
    common = ["--data", str(colour_pairs), "--json", "--device", "cpu", *instructions]
    result = CliRunner().invoke(eval_command, ["--model", str(tiny_qwen3vl), *common])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["model_options"]["query_instruction"] == "Find the photo."
    assert printed["model_options"]["document_instruction"] == "Represent the photo."
    encoder = load_encoder(tiny_qwen3vl, device="cpu", query_instruction="Find the photo",
                           document_instruction="Represent the photo")
    direct = evaluate_encoder(encoder, colour_pairs)
    assert {key: printed[key] for key in direct} == direct
    # CLIP takes no instruction: accepted, ignored, and not reported as an option of the model
    clip = CliRunner().invoke(eval_command, ["--model", str(tiny_clip), *common])
    assert clip.exit_code == 0, clip.output
    assert "query_instruction" not in json.loads(clip.stdout)["model_options"]
