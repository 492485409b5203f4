"""``vkd export``: a student's towers as ONNX (fp32 + INT8) with a parity check."""

from __future__ import annotations

from typing import Any

import click

from vkd.export.int8 import DEFAULT_CANDIDATES, INT8_TARGET_COSINE, RECIPES
from vkd.export.onnx_export import DEFAULT_OPSET, INT8_MODES, MAX_OPSET, MIN_OPSET, PARITY_MIN_COSINE


@click.command("export")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Export directory.  [default: MODEL_DIR/onnx, where `load_encoder(..., prefer='onnx')` "
                   "and `vkd search` find it]")
@click.option("--int8", "int8", type=click.Choice(INT8_MODES), default="dynamic", show_default=True,
              help="INT8 copy: dynamic (weights INT8, activations on the fly; fastest on CPU), static (QDQ, "
                   "needs --calibration) or none.")
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False), default=None,
              help="pairs.jsonl whose texts and images calibrate static INT8 (and join the parity samples).")
@click.option("--calibration-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="How many calibration texts and images to use.")
@click.option("--opset", type=click.IntRange(MIN_OPSET, MAX_OPSET), default=DEFAULT_OPSET, show_default=True,
              help="ONNX opset version.")
@click.option("--image-buckets", default=None, metavar="default|none|WxH,...",
              help="Qwen3-VL: export the image side as one graph per fixed image size; every image is resized "
                   "to the size nearest its aspect ratio (the torch model takes the same option, so vectors "
                   "match). 'default': 448x448,512x384,384x512,608x320,320x608.  [default: the buckets the "
                   "model was saved with; none: text tower only]")
@click.option("--int8-recipe", type=click.Choice(sorted(RECIPES)), default=None,
              help=f"Dynamic INT8 recipe for every graph.  [default: per graph, the first of "
                   f"{', '.join(DEFAULT_CANDIDATES)} within cosine {INT8_TARGET_COSINE} of torch]")
@click.option("--int8-variants", is_flag=True,
              help="Write no export: quantise every graph with every INT8 recipe and print each one's speed "
                   "(batch 1 and 32) against ONNX fp32 and torch fp32, its cosine to fp32 and its size.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="--int8-variants: ONNX Runtime and torch threads.  [default: the libraries' own]")
@click.option("--clock", type=click.Choice(["wall", "cpu"]), default="wall", show_default=True,
              help="--int8-variants: wall time, or process CPU time (with --threads 1: steady on a busy machine).")
@click.option("--variants-out", type=click.Path(dir_okay=False), default=None,
              help="--int8-variants: also write the rows as JSON here.")
@click.option("--quick", is_flag=True, help="--int8-variants: batch 8 and a few timed calls (a smoke run).")
def export(model_dir: str, out: str | None, int8: str, calibration: str | None, calibration_size: int,
           opset: int, image_buckets: str | None, int8_recipe: str | None, int8_variants: bool,
           threads: int | None, clock: str, variants_out: str | None, quick: bool) -> None:
    """Export MODEL_DIR's text and image towers to ONNX, fp32 and INT8, each checked
    against the torch model on sample inputs (cosine >= 0.9999 fp32, >= 0.99 INT8; the
    export fails with the numbers otherwise and leaves the output untouched).

    The export directory is self-contained (tokenizer.json, preprocessor_config.json,
    export.json) and runs without torch. It keeps the torch model's fingerprint, so
    indexes built with either backend are searchable with the other. Qwen3-VL-Embedding
    exports its image side with --image-buckets (one graph per fixed image size; the torch
    model gives the same vectors when loaded with the same image_buckets option), else its
    text tower only.

    \b
    Example:
      vkd export out/student                 # -> out/student/onnx/{text,image}{,.int8}.onnx
      vkd export runs/x                      # a vkd distill run: exports runs/x/model
      vkd search "a dog on a beach" --index photos.vkd --prefer onnx
      vkd export qwen-student --image-buckets default
      vkd export out/student --int8-variants --threads 1 --clock cpu
    """
    from vkd.distill.rundir import resolve_model_option
    from vkd.export.onnx_export import ExportError, export_onnx

    model_dir = resolve_model_option(model_dir, "exporting {model}")
    if calibration is None and int8 == "static":
        raise click.UsageError("--int8 static calibrates on real inputs: add --calibration pairs.jsonl "
                               "(or use --int8 dynamic)")
    if int8_variants:
        _print_variants(model_dir, image_buckets, threads, clock, variants_out, quick)
        return
    try:
        result = export_onnx(model_dir, out, int8=int8, calibration=calibration, calibration_size=calibration_size,
                             opset=opset, image_buckets=image_buckets, int8_recipe=int8_recipe)
    except (ExportError, ValueError, OSError) as error:
        raise click.ClickException(str(error)) from error
    manifest = result.manifest
    click.echo(f"wrote {result.out_dir} ({manifest['source']['family']}, dim {manifest['source']['dim']}, "
               f"fingerprint {manifest['source']['fingerprint']}, {manifest['export_seconds']} s)")
    parity = manifest["parity"]
    lines = [("text", manifest["text"], parity["towers"]["text"])]
    image = manifest.get("image")
    if image and image.get("kind") == "buckets":
        lines += [(f"image {entry['size']}", entry, parity["image_buckets"][entry["size"]])
                  for entry in image["buckets"]]
        click.echo(f"  image buckets: {', '.join(entry['size'] for entry in image['buckets'])} ({image['policy']})")
    elif image:
        lines.append(("image", image, parity["towers"]["image"]))
    label_width = max(len(label) for label, _, _ in lines)


    def files(entry: dict[str, Any], precision: str) -> str:
        # a graph over the protobuf limit has its weights in name.onnx.data; the size counts both
        return entry[precision] + (" + .data" if (entry.get("data") or {}).get(precision) else "")

    file_width = max(16, *(len(files(entry, p)) for _, entry, _ in lines for p in ("fp32", "int8") if entry.get(p)))
    for label, entry, by_precision in lines:
        for precision, numbers in by_precision.items():
            size = entry["bytes"][precision] / 1e6
            recipe = f"   recipe {entry['int8_recipe']}" if precision == "int8" and entry.get("int8_recipe") else ""
            click.echo(f"  {label:<{label_width}} {precision:<4} {files(entry, precision):<{file_width}} {size:8.2f} MB   "
                       f"cosine vs torch: min {numbers['min']:.6f} mean {numbers['mean']:.6f} "
                       f"(>= {PARITY_MIN_COSINE[precision]}){recipe}")
    language = (image or {}).get("language_model")
    if language:  # its vectors are the buckets' lines above: each bucket runs through it
        for precision in ("fp32", "int8"):
            if language.get(precision):
                click.echo(f"  {'image':<{label_width}} {precision:<4} {files(language, precision):<{file_width}} "
                           f"{language['bytes'][precision] / 1e6:8.2f} MB   the language model every bucket shares")
    if manifest.get("image_unsupported"):
        click.echo(f"  image tower not exported: {manifest['image_unsupported']}", err=True)


def _print_variants(model_dir: str, image_buckets: str | None, threads: int | None, clock: str,
                    variants_out: str | None, quick: bool) -> None:
    import json

    from vkd.bench.int8 import Int8Settings, int8_variants, markdown
    from vkd.export.onnx_export import ExportError

    settings = Int8Settings.quick() if quick else Int8Settings()
    settings.threads, settings.clock = threads, clock
    try:
        rows = int8_variants(model_dir, image_buckets=image_buckets, settings=settings,
                             progress=lambda message: click.echo(message, err=True))
    except (ExportError, ValueError, OSError) as error:
        raise click.ClickException(str(error)) from error
    click.echo(markdown(rows))
    if variants_out:
        from pathlib import Path

        Path(variants_out).write_text(json.dumps(rows, indent=2) + "\n")
        click.echo(f"wrote {variants_out}", err=True)
