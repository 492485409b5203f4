"""``vkd distill``: teach a student from a teacher and write a merged model directory."""

from __future__ import annotations

from pathlib import Path

import click

EXAMPLE = """\b
Examples:
  vkd distill config.yaml
  vkd distill config.yaml --set epochs=1 --set batch_size=64
  vkd distill config.yaml --config_override use_lora=false learning_rate=1e-5
  accelerate launch --num_processes 4 -m vkd distill config.yaml

\b
A minimal config.yaml:
  model_name_or_path: openai/clip-vit-base-patch32
  teacher_model_name_or_path: Qwen/Qwen3-VL-Embedding-2B
  data_path: data/flickr30k/train.jsonl
  val_data_path: data/flickr30k/val.jsonl
  output_dir: out/student
"""


@click.command("distill", epilog=EXAMPLE, context_settings={"ignore_unknown_options": True})
@click.argument("config_path", metavar="CONFIG.yaml", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("overrides", nargs=-1, type=click.UNPROCESSED, metavar="[--set KEY=VALUE ...]")
def distill(config_path: Path, overrides: tuple[str, ...]) -> None:
    """Distill a teacher into a student as CONFIG.yaml says.

    Overrides (--set key=value, --config_override key=value ...) apply on top of the file.
    Writes OUTPUT_DIR/model (the merged student, for vkd index/export/eval), OUTPUT_DIR/adapter
    (LoRA runs), metrics.jsonl, report.json and checkpoints. Runs in one process, or in
    several under `accelerate launch -m vkd distill`.
    """
    from vkd.config import load_config_for_cli

    config = load_config_for_cli(config_path, overrides)

    from vkd.distill.trainer import Trainer

    try:
        trainer = Trainer(config)
    except (ValueError, OSError) as error:
        raise click.ClickException(str(error)) from None
    result = trainer.train()
    if not trainer.is_main:
        return
    report = result.report
    click.echo(f"model    {result.model_dir}")
    if result.adapter_dir is not None:
        click.echo(f"adapter  {result.adapter_dir}")
    click.echo(f"report   {result.report_path}")
    best = report.get("best")
    if best:
        click.echo(f"best     val t2i R@1 {best['t2i_R@1']:.1f} at epoch {best['epoch']:g} (step {best['step']})")
    cache = report["teacher_cache"]
    click.echo(f"steps    {report['steps']} in {report['wall_time_s']:.1f} s; teacher cache "
               f"{cache['hits']} hits / {cache['misses']} misses")
