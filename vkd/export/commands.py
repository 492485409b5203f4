"""``vkd export``: a student's towers as ONNX (fp32 + INT8) with a parity check."""

from __future__ import annotations

import click

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
def export(model_dir: str, out: str | None, int8: str, calibration: str | None, calibration_size: int,
           opset: int) -> None:
    """Export MODEL_DIR's text and image towers to ONNX, fp32 and INT8, each checked
    against the torch model on sample inputs (cosine >= 0.9999 fp32, >= 0.99 INT8; the
    export fails with the numbers otherwise and leaves the output untouched).

    The export directory is self-contained (tokenizer.json, preprocessor_config.json,
    export.json) and runs without torch. It keeps the torch model's fingerprint, so
    indexes built with either backend are searchable with the other. Qwen3-VL-Embedding
    exports its text tower only.

    \b
    Example:
      vkd export out/student                 # -> out/student/onnx/{text,image}{,.int8}.onnx
      vkd export runs/x                      # a vkd distill run: exports runs/x/model
      vkd search "a dog on a beach" --index photos.vkd --prefer onnx
    """
    from vkd.distill.rundir import resolve_model_dir
    from vkd.export.onnx_export import ExportError, export_onnx

    try:
        resolved = resolve_model_dir(model_dir)
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    if resolved != model_dir:
        click.echo(f"{model_dir} is a vkd distill run; exporting {resolved}", err=True)
        model_dir = resolved
    if calibration is None and int8 == "static":
        raise click.UsageError("--int8 static calibrates on real inputs: add --calibration pairs.jsonl "
                               "(or use --int8 dynamic)")
    try:
        result = export_onnx(model_dir, out, int8=int8, calibration=calibration,
                             calibration_size=calibration_size, opset=opset)
    except (ExportError, ValueError, OSError) as error:
        raise click.ClickException(str(error)) from error
    manifest = result.manifest
    click.echo(f"wrote {result.out_dir} ({manifest['source']['family']}, dim {manifest['source']['dim']}, "
               f"fingerprint {manifest['source']['fingerprint']}, {manifest['export_seconds']} s)")
    for tower, by_precision in manifest["parity"]["towers"].items():
        for precision, numbers in by_precision.items():
            size = manifest[tower]["bytes"][precision] / 1e6
            click.echo(f"  {tower:<5} {precision:<4} {manifest[tower][precision]:<16} {size:8.2f} MB   "
                       f"cosine vs torch: min {numbers['min']:.6f} mean {numbers['mean']:.6f} "
                       f"(>= {PARITY_MIN_COSINE[precision]})")
    if manifest.get("image_unsupported"):
        click.echo(f"  image tower not exported: {manifest['image_unsupported']}", err=True)
