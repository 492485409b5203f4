"""``vkd distill``: teach a student from a teacher and write a merged model directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
    Writes OUTPUT_DIR/model (the merged student, for vkd index/export/eval, which also take
    OUTPUT_DIR itself), OUTPUT_DIR/adapter (LoRA runs), metrics.jsonl, report.json and
    checkpoints. With val_data_path, model/ holds the weights of the best evaluation by
    best_metric (rsum = R@1+R@5+R@10 both directions by default; a tie goes to the later
    evaluation), and the final weights are evaluated too. The summary says which weights were
    kept and why, and what was trained. Runs in one process, or in several under
    `accelerate launch -m vkd distill`.
    """
    from vkd.config import load_config_for_cli

    config = load_config_for_cli(config_path, overrides)

    from vkd.distill.trainer import Trainer

    # Expected failures (bad values found while starting or running: ValueError, ConfigError,
    # PairFileError; files and disks: OSError) carry a message that says what to change, so
    # the user sees that one line; anything else is a bug and keeps its traceback.
    try:
        trainer = Trainer(config)
        result = trainer.train()
    except (ValueError, OSError) as error:
        if not str(error):
            raise
        raise click.ClickException(str(error)) from None
    if not trainer.is_main:
        return
    for line in summary(result.report, result.model_dir, result.adapter_dir, result.report_path):
        click.echo(line)


# LoRA training more than this share of a student's weights saves little over full fine-tuning.
LARGE_LORA_SHARE = 20.0


def summary(report: dict[str, Any], model_dir: Path, adapter_dir: Path | None, report_path: Path) -> list[str]:
    """The lines ``vkd distill`` prints at the end of a run, from its report."""
    lines = [f"model    {model_dir}"]
    if adapter_dir is not None:
        lines.append(f"adapter  {adapter_dir}")
    lines.append(f"report   {report_path}")
    lines.extend(_trained_lines(report["student"]))
    lines.append(f"loss     {_loss_text(report)}")
    best = report.get("best")
    if best:
        count = len(report["val"])
        lines.append(f"best     val {best['metric']} {best['value']:.2f} at epoch {best['epoch']:g} "
                     f"(step {best['step']}) of {count} evaluation{'s' if count != 1 else ''}")
    lines.append(f"kept     {report['final_model_reason']}")
    steps = f"steps    {report['steps']} in {report['wall_time_s']:.1f} s"
    if report["teachers"]:  # a CE-only or EMA-only run has no teacher cache to speak of
        cache = report["teacher_cache"]
        steps += f"; teacher cache {cache['hits']} hits / {cache['misses']} misses"
    lines.append(steps)
    return lines


def _trained_lines(student: dict[str, Any]) -> list[str]:
    trained, total, percent = student["trained_parameters"], student["parameters"], student["trained_percent"]
    scale = student["logit_scale_trained"]
    lora = student["lora"]
    if lora:
        what = f"LoRA r={lora['r']}" + (" and the projection heads" if lora["heads"] else "")
        # The scale is a bare parameter a peft adapter cannot carry (see vkd.distill.lora).
        what += "; logit scale frozen under LoRA" if scale is False else ""
    else:
        what = "full fine-tuning" + (", logit scale included" if scale else "")
    lines = [f"trains   {trained:,} of {total:,} student parameters ({percent:.2f}%): {what}"]
    if lora and percent is not None and percent >= LARGE_LORA_SHARE:
        lines.append(f"note     LoRA r={lora['r']} trains {percent:.0f}% of this student's parameters: on a model "
                     "this narrow, full fine-tuning (use_lora: false) costs little more and trains the logit "
                     "scale too; or lower lora_r")
    return lines


def _loss_text(report: dict[str, Any]) -> str:
    if not report["loss"]["use_distillation"]:
        return "contrastive (CE) only (use_distillation: false)"
    kd = " + ".join(report["loss"]["terms"][1:])
    stages = report["stages"]
    temperature = " → ".join(f"{s['temperature']:g}" for s in stages)
    weight = " → ".join(f"{s['distillation_weight']:g}" for s in stages)
    return f"(1 - w)·CE + w·({kd}); temperature {temperature}, distillation_weight w {weight}"
