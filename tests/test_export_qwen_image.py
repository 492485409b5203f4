"""Qwen3-VL-Embedding's image side in ONNX: one fixed-size graph per image bucket.

The tiny Qwen3-VL (real patch 16 x merge 2) is exported with two buckets, 64x64 and 96x64;
every image is resized into the bucket nearest its aspect ratio, by the ONNX preprocessing
and by the torch encoder loaded with the same ``image_buckets``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_images
from PIL import Image

from vkd.cli import cli
from vkd.export import ExportError, OnnxEncoder, export_onnx
from vkd.export.preprocess import BucketImagePreprocessor
from vkd.models import load_encoder
from vkd.models.image_buckets import buckets_for_ratios, nearest_bucket, parse_buckets

BUCKETS = "64x64,96x64"  # as load_options() and manifests record the option


def _images() -> list[Image.Image]:
    """Sizes that land in either bucket, exactly at a bucket's size and far from both."""
    sizes = [(64, 64), (96, 64), (40, 32), (32, 40), (150, 100), (23, 71), (200, 50), (33, 33)]
    return [make_images(1, seed=index, size=size)[0] for index, size in enumerate(sizes)]


@pytest.fixture(scope="module")
def bucketed(tiny_qwen3vl: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = Path(shutil.copytree(tiny_qwen3vl, tmp_path_factory.mktemp("qwen-buckets") / "model",
                                 ignore=shutil.ignore_patterns("onnx")))
    export_onnx(model, image_buckets=BUCKETS)
    return model


def test_export_writes_one_graph_per_bucket_and_records_the_policy(bucketed: Path) -> None:
    onnx_dir = bucketed / "onnx"
    manifest = json.loads((onnx_dir / "export.json").read_text())
    image = manifest["image"]
    assert image["kind"] == "buckets" and "nearest aspect ratio" in image["policy"]
    assert [entry["size"] for entry in image["buckets"]] == BUCKETS.split(",")
    assert [entry["image_tokens"] for entry in image["buckets"]] == [4, 6]  # (64/16)(64/16)/4, (96/16)(64/16)/4
    for entry in image["buckets"]:
        assert (onnx_dir / entry["fp32"]).is_file() and (onnx_dir / entry["int8"]).is_file()
    assert manifest["source"]["options"]["image_buckets"] == BUCKETS
    assert manifest["image_unsupported"] is None
    torch_encoder = load_encoder(bucketed, prefer="torch", device="cpu", image_buckets=BUCKETS)
    assert manifest["source"]["fingerprint"] == torch_encoder.fingerprint
    # the bucket policy changes image vectors, so it is part of the fingerprint
    assert load_encoder(bucketed, prefer="torch", device="cpu").fingerprint != torch_encoder.fingerprint
    for size in BUCKETS.split(","):
        assert manifest["parity"]["image_buckets"][size]["fp32"]["min"] >= 0.9999


def test_the_buckets_share_one_language_model_graph(bucketed: Path) -> None:
    """Each bucket's graph ends at the language model's inputs; one language model graph, its
    sequence axis dynamic, serves every bucket (prompts of 26 and 28 tokens here), so the
    language model's weights are stored once, not once per bucket."""
    import onnx

    onnx_dir = bucketed / "onnx"
    image = json.loads((onnx_dir / "export.json").read_text())["image"]
    language = image["language_model"]
    assert language["fp32"] == "image-language-model.onnx" and language["int8"] == "image-language-model.int8.onnx"
    lengths = [entry["sequence_length"] for entry in image["buckets"]]
    assert len(set(lengths)) == 2  # different lengths through the same graph
    graph = onnx.load(str(onnx_dir / language["fp32"]), load_external_data=False).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims["inputs_embeds"][:2] == ["batch", "sequence"] and dims["cos"][:2] == ["batch", "sequence"]
    assert [i.name for i in graph.input] == language["inputs"]

    def language_model_parts(graph: onnx.GraphProto) -> int:
        # decoder layers' nodes, and their q_norm weights (Qwen3's language model has them, the vision tower not)
        return (sum(node.name.startswith("/layers.") for node in graph.node)
                + sum("q_norm" in tensor.name for tensor in graph.initializer))

    assert language_model_parts(graph) > 0
    for entry in image["buckets"]:
        bucket = onnx.load(str(onnx_dir / entry["fp32"]), load_external_data=False).graph
        assert [o.name for o in bucket.output] == language["inputs"]
        assert language_model_parts(bucket) == 0  # the bucket graph holds the vision side only
    # INT8 is gated on both copies in a row; each copy alone is recorded too
    assert set(image["int8_alone"]) == {*BUCKETS.split(","), "language-model"}
    encoder = OnnxEncoder(onnx_dir)
    assert encoder.shares_language_model and encoder.model_path("image", "language-model").name == language["int8"]


def test_onnx_image_vectors_match_torch_with_the_same_buckets(bucketed: Path) -> None:
    torch_encoder = load_encoder(bucketed, prefer="torch", device="cpu", image_buckets=BUCKETS)
    reference = torch_encoder.encode_images(_images(), batch_size=3)
    for precision, bound in (("fp32", 0.9999), ("int8", 0.999)):
        encoder = OnnxEncoder(bucketed / "onnx", precision=precision, batch_size=3)
        assert encoder.image_buckets == ((64, 64), (96, 64))
        cos = np.sum(encoder.encode_images(_images()) * reference, axis=1)
        assert cos.min() >= bound, (precision, cos)
    # asked for its own options, load_encoder(prefer="onnx") serves images from the export
    onnx_encoder = load_encoder(bucketed, prefer="onnx", image_buckets=BUCKETS)
    assert isinstance(onnx_encoder, OnnxEncoder) and onnx_encoder.has_image_tower


def test_an_image_outside_the_buckets_goes_to_the_nearest_one(bucketed: Path) -> None:
    wide = make_images(1, seed=11, size=(200, 50))[0]  # 4:1; the buckets are 1:1 and 3:2
    preprocessor = OnnxEncoder(bucketed / "onnx").image_preprocessor
    assert isinstance(preprocessor, BucketImagePreprocessor)
    assert preprocessor.bucket_of(wide) == (96, 64)
    assert preprocessor.one(wide).shape == (3, 64, 96)
    encoder = OnnxEncoder(bucketed / "onnx", precision="fp32")
    resized = wide.resize((96, 64), resample=Image.Resampling.BICUBIC)
    vectors = encoder.encode_images([wide, resized])
    np.testing.assert_allclose(vectors[0], vectors[1], atol=1e-6)  # the same pixels reach the graph
    bucketed_torch = load_encoder(bucketed, prefer="torch", device="cpu", image_buckets=BUCKETS)
    assert float(vectors[0] @ bucketed_torch.encode_images([wide])[0]) >= 0.9999
    # Without buckets the torch model resizes it to 192x64 (its own grid): another vector,
    # which is why the policy is an encoder option recorded in the fingerprint.
    natural = load_encoder(bucketed, prefer="torch", device="cpu")
    assert natural.processor.resize(wide).size == (192, 64)
    assert float(vectors[0] @ natural.encode_images([wide])[0]) < 0.9999


def test_onnx_encode_images_needs_no_torch(bucketed: Path, tmp_path: Path) -> None:
    paths = []
    for index, image in enumerate(_images()):
        paths.append(tmp_path / f"{index}.png")
        image.save(paths[-1])
    script = f"""
import json, sys
import numpy as np
from vkd.export import OnnxEncoder
encoder = OnnxEncoder({str(bucketed / "onnx")!r}, precision="fp32", batch_size=3)
vectors = encoder.encode_images({[str(path) for path in paths]!r})
np.save({str(tmp_path / "onnx.npy")!r}, vectors)
print(json.dumps({{"heavy": sorted(m for m in ("torch", "transformers") if m in sys.modules),
                  "shape": list(vectors.shape)}}))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"heavy": [], "shape": [len(paths), 32]}
    reference = load_encoder(bucketed, prefer="torch", device="cpu", image_buckets=BUCKETS).encode_images(paths)
    assert np.sum(np.load(tmp_path / "onnx.npy") * reference, axis=1).min() >= 0.9999


def test_an_index_built_with_torch_and_the_buckets_is_searchable_with_the_export(
    bucketed: Path, tmp_path: Path
) -> None:
    from vkd.indexer import Index
    from vkd.retrieval import Retriever

    corpus = tmp_path / "photos"
    corpus.mkdir()
    for index, image in enumerate(_images()):
        image.save(corpus / f"{index}.png")
    for built_with, searched_with in (("torch", "onnx"), ("onnx", "torch")):
        index = Index.build(corpus, tmp_path / f"index-{built_with}", student=str(bucketed), prefer=built_with,
                            student_options={"image_buckets": BUCKETS}, shard_size=5)
        assert index.student["options"]["image_buckets"] == BUCKETS
        retriever = Retriever(index.path, prefer=searched_with, rerank=False)
        # the recorded options open the export, or the torch model with the same buckets
        assert isinstance(retriever.student, OnnxEncoder) == (searched_with == "onnx")
        hits = retriever.search(corpus / "6.png", k=1)  # the 4:1 image, resized into 96x64 either way
        assert Path(hits[0].path).name == "6.png"


def test_cli_exports_buckets_and_refuses_what_cannot_be(tiny_qwen3vl: Path, tiny_clip: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["export", str(tiny_qwen3vl), "--out", str(tmp_path / "b"), "--int8", "none",
                                      "--image-buckets", "64x64,96x64"])
    assert result.exit_code == 0, result.output
    assert "image 64x64 fp32" in result.output and "image 96x64 fp32" in result.output
    text_only = CliRunner().invoke(cli, ["export", str(tiny_qwen3vl), "--out", str(tmp_path / "t"), "--int8", "none"])
    assert text_only.exit_code == 0 and "--image-buckets default" in text_only.output
    with pytest.raises(ExportError, match="multiples of 32"):
        export_onnx(tiny_qwen3vl, tmp_path / "odd", image_buckets="64x48", int8="none")
    with pytest.raises(ExportError, match="same aspect ratio"):
        export_onnx(tiny_qwen3vl, tmp_path / "same", image_buckets="64x64,96x96", int8="none")
    with pytest.raises(ExportError, match="Qwen3-VL"):
        export_onnx(tiny_clip, tmp_path / "clip", image_buckets="default")
    assert not (tmp_path / "odd").exists() and not (tmp_path / "clip").exists()


def test_bucket_arithmetic() -> None:
    # the documented default set: 1:1, 4:3, 3:4, 16:9, 9:16 at 448 x 448 pixels
    assert buckets_for_ratios() == ((448, 448), (512, 384), (384, 512), (608, 320), (320, 608))
    default = buckets_for_ratios()
    assert nearest_bucket(4000, 3000, default) == (512, 384)
    assert nearest_bucket(6000, 4000, default) == (512, 384)  # 3:2 is nearest 4:3
    assert nearest_bucket(1080, 1920, default) == (320, 608)
    assert nearest_bucket(10, 10, default) == (448, 448)
    assert parse_buckets("512x384, 448x448,512x384") == ((512, 384), (448, 448))
    assert parse_buckets([[64, 64]]) == ((64, 64),) and parse_buckets(None) is None
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        parse_buckets("512by384")


def test_buckets_and_text_with_external_data_match_torch(tiny_qwen3vl: Path, tmp_path: Path) -> None:
    """Every Qwen3-VL graph written as name.onnx + name.onnx.data (as the real 2B/8B graphs
    are, over 2 GiB): ONNX Runtime opens them by path and the vectors still match torch."""
    model = Path(shutil.copytree(tiny_qwen3vl, tmp_path / "model", ignore=shutil.ignore_patterns("onnx")))
    result = export_onnx(model, image_buckets=BUCKETS, max_single_file_bytes=0)
    graphs = [f"{stem}{suffix}" for stem in ("text", "image-64x64", "image-96x64", "image-language-model")
              for suffix in (".onnx", ".int8.onnx")]
    assert sorted(p.name for p in result.out_dir.iterdir()) == sorted(
        ["export.json", "tokenizer.json", *graphs, *(f"{g}.data" for g in graphs)])
    for entry in result.manifest["image"]["buckets"]:
        assert entry["data"] == {"fp32": f"image-{entry['size']}.onnx.data",
                                 "int8": f"image-{entry['size']}.int8.onnx.data"}
    torch_encoder = load_encoder(model, prefer="torch", device="cpu", image_buckets=BUCKETS)
    texts = ["a dog on a beach", "", "two cats"]
    for precision, bound in (("fp32", 0.9999), ("int8", 0.99)):
        encoder = OnnxEncoder(result.out_dir, precision=precision, batch_size=3)
        assert len(encoder.model_files()) == 8  # text, two buckets and their language model, each with its data
        cos = np.sum(encoder.encode_images(_images()) * torch_encoder.encode_images(_images()), axis=1)
        assert cos.min() >= bound, (precision, cos)
        cos = np.sum(encoder.encode_text(texts) * torch_encoder.encode_text(texts), axis=1)
        assert cos.min() >= bound, (precision, cos)


def test_a_format_1_export_with_whole_bucket_graphs_still_runs(bucketed: Path, tmp_path: Path) -> None:
    """Exports written before the language model was shared hold it in every bucket graph
    (format 1, no "language_model"); they are read and run as they are."""
    from vkd.export.onnx_export import _torch_export
    from vkd.export.preprocess import BucketImagePreprocessor
    from vkd.export.qwen_image import QwenBucketImageTower

    old = Path(shutil.copytree(bucketed / "onnx", tmp_path / "onnx"))
    manifest = json.loads((old / "export.json").read_text())
    torch_encoder = load_encoder(bucketed, prefer="torch", device="cpu", image_buckets=BUCKETS)
    image = manifest["image"]
    preprocessor = BucketImagePreprocessor({**image["preprocess"], "buckets": BUCKETS.split(",")})
    for entry in image["buckets"]:
        bucket = (entry["width"], entry["height"])
        pixels = torch.from_numpy(np.stack([preprocessor.one(im, bucket) for im in _images()[:2]]))
        _torch_export(QwenBucketImageTower(torch_encoder, bucket).eval(), (pixels,), old / entry["fp32"],
                      ["pixel_values"], {"pixel_values": {0: "batch"}}, 17)
    del image["language_model"], manifest["files"]  # neither existed in format 1
    manifest["format"] = 1
    (old / "export.json").write_text(json.dumps(manifest))
    encoder = OnnxEncoder(old, precision="fp32")
    assert not encoder.shares_language_model
    cos = np.sum(encoder.encode_images(_images()) * torch_encoder.encode_images(_images()), axis=1)
    assert cos.min() >= 0.9999
