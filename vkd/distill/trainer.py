"""The distillation trainer behind ``vkd distill``.

One ``Trainer`` holds the student, the teachers, the loss and the optimiser, and runs the
stages of the schedule one after another on the same weights (without ``stages:``, one stage
from the top-level ``epochs``/``temperature``/``distillation_weight``). Each stage gets its own
learning-rate schedule: linear warm-up over ``warmup_ratio`` of its steps, then cosine decay.

Processes. Under ``accelerate launch`` every process takes its own ``batch_size`` rows of each
global batch (see ``vkd.distill.data``); embeddings are gathered before the loss
(``gather_with_local_grad``: the student's keep their graph on their own rank, teachers' are
constants), so every rank computes the loss of the whole global batch with all its negatives.
Gradients are then all-reduced by hand rather than through DDP, because gradient caching runs
the encoder outside any wrapper's ``forward``.

Output directory::

    output_dir/
      model/            the student, a plain model directory (LoRA merged) that load_encoder
                        and from_pretrained open: the weights of the best evaluation
                        (val ``best_metric``, rsum by default), or the last weights without
                        val_data_path or with eval_strategy: no
      adapter/          (use_lora) the same student as a PEFT adapter over model_name_or_path
      config.yaml       the resolved config
      metrics.jsonl     one JSON row per logging step ("type": "train") and per evaluation ("eval");
                        CE-only runs (use_distillation: false) log no temperature or weight
      report.json       parameter counts (trained share, logit scale trained or frozen), the
                        loss terms, val recall per evaluation, the best evaluation, which
                        weights model/ holds and why, wall time, steps, teacher-cache
                        hits/misses, teacher forward counts
      checkpoints/step-NNNNNN/   every save_steps and at the end (see Trainer.save_checkpoint)
      teacher_cache/    <teacher fingerprint>/ segments (one per rank and flush), unless teacher_cache_dir
                        points elsewhere

``max_steps`` stops the run early without changing the schedule (warm-up and decay stay
planned over the stages' epochs), so a run cut at step k and resumed continues exactly the
run it was cut from.

The best weights. With val_data_path and an eval_strategy, the weights written to model/ are
those of the evaluation with the highest ``best_metric`` (``choose_best``: a tie goes to the
later evaluation). When the schedule did not evaluate the last step (``max_steps`` shorter
than an epoch, or a step count that is not a multiple of ``eval_steps``), the run evaluates
its final weights at the end, so they are among the candidates; that row carries
``"end_of_run": true``. It is made after the final checkpoint is saved and is not part of the
checkpoint, so a resumed run still continues exactly the run it was cut from. The report's
``final_model_reason`` (printed by ``vkd distill``) says which weights were kept and why.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from vkd.config import DistillConfig, Stage, load_config
from vkd.data.pairs import read_pairs
from vkd.distill.data import Collator, epoch_batches, make_loader, steps_per_epoch
from vkd.distill.gradcache import all_reduce_gradients, cached_step
from vkd.distill.lora import apply_lora, merge, save_adapter
from vkd.distill.losses import DistillationLoss, LossOutput, TeacherOutput, gather_with_local_grad
from vkd.distill.teacher import EmaTeacher, Teacher, cache_summary, fsdp_requested, make_teachers
from vkd.models.base import TorchEncoder

CHECKPOINT_RE = re.compile(r"^step-(\d+)$")
# the projection's entry in the best weights (train_modes): not a student parameter name
PROJECTION_KEY = "vkd_projection.weight"
# what report.json shows of each evaluation (the metrics best_metric can choose from)
VAL_KEYS = ("rsum", *(f"{d}_R@{k}" for d in ("t2i", "i2t") for k in (1, 5, 10)))


@dataclass
class DistillResult:
    """Where a run wrote its outputs, and its report."""

    output_dir: Path
    model_dir: Path
    adapter_dir: Path | None
    config_path: Path
    metrics_path: Path
    report_path: Path
    report: dict[str, Any]


def distill(
    config: DistillConfig | str | os.PathLike[str],
    *,
    student: TorchEncoder | None = None,
    teachers: Sequence[TorchEncoder] | None = None,
) -> DistillResult:
    """Train a student as ``config`` says and write ``output_dir`` (see the module docstring).

    ``config`` is a ``DistillConfig`` or the path of a YAML file. ``student``/``teachers``:
    encoders already loaded (the student is trained in place), instead of loading
    ``model_name_or_path`` and ``teacher_model_name_or_path``.
    """
    return Trainer(config, student=student, teachers=teachers).train()


@dataclass
class StagePlan:
    index: int
    epochs: int
    temperature: float
    distillation_weight: float
    learning_rate: float
    first_epoch: int  # global index of its first epoch

    @property
    def end_epoch(self) -> int:
        return self.first_epoch + self.epochs


def choose_best(evaluations: Sequence[Mapping[str, Any]], metric: str) -> Mapping[str, Any] | None:
    """The evaluation with the highest ``metric`` (None when there is none).

    A tie goes to the later evaluation: equal on the chosen metric, the later weights have
    trained on more data, and a run whose final weights tie the best keeps its final weights
    (the ones its adapter and last checkpoint also describe) rather than an older copy.
    """
    best = None
    for row in evaluations:
        if best is None or row[metric] >= best[metric]:
            best = row
    return best


def plan_stages(config: DistillConfig) -> list[StagePlan]:
    stages = config.stages or [Stage(epochs=config.epochs, temperature=config.temperature,
                                     distillation_weight=config.distillation_weight)]
    plans, first = [], 0
    for index, stage in enumerate(stages):
        plans.append(StagePlan(index, stage.epochs, stage.temperature, stage.distillation_weight,
                               stage.learning_rate or config.learning_rate, first))
        first += stage.epochs
    return plans


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate multiplier: linear warm-up to 1, then cosine to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _mixed_precision(config: DistillConfig) -> str:
    if config.mixed_precision == "fp16":
        raise ValueError("mixed_precision: fp16 is not supported by vkd distill (it would need loss scaling, "
                         "which gradient caching bypasses); use bf16 (GPUs since Ampere) or no")
    if config.mixed_precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return config.mixed_precision


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """Distillation of one student from frozen teachers (and/or its own EMA copy)."""

    def __init__(
        self,
        config: DistillConfig | str | os.PathLike[str],
        *,
        student: TorchEncoder | None = None,
        teachers: Sequence[TorchEncoder] | None = None,
    ) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self._started = time.perf_counter()
        self.config = config = config if isinstance(config, DistillConfig) else load_config(config)
        # cpu=True on machines without CUDA: several processes started by torchrun (or
        # `accelerate launch --multi_gpu`) then form a gloo group instead of staying apart.
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=_mixed_precision(config))
        self.device = self.accelerator.device
        self.is_main = self.accelerator.is_main_process
        self.world = self.accelerator.num_processes
        set_seed(config.seed)
        self.out = Path(config.output_dir)
        self.train_pairs = read_pairs(config.data_path)
        self.val_pairs = read_pairs(config.val_data_path) if config.val_data_path else None
        self.steps_per_epoch = steps_per_epoch(len(self.train_pairs), config.batch_size, self.world)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{config.data_path}: {len(self.train_pairs)} pairs do not fill one global batch of "
                f"batch_size {config.batch_size} × {self.world} process(es); lower batch_size or add pairs"
            )
        self.stages = plan_stages(config)
        self.total_steps = self.steps_per_epoch * self.stages[-1].end_epoch
        if config.max_steps:
            self.total_steps = min(self.total_steps, config.max_steps)
        self._check_matryoshka()

        self.student = student or self._load(config.model_name_or_path, dtype=torch.float32)
        self.teachers = self._teachers(teachers) if config.use_distillation else []
        self.peft = None
        if config.use_lora:
            self.peft = apply_lora(self.student, r=config.lora_r, alpha=config.lora_alpha,
                                   dropout=config.lora_dropout, target_modules=config.lora_target_modules,
                                   base_name=config.model_name_or_path)
        else:
            self.student.model.requires_grad_(True)
            # Trained in place from here: its weights stop being its checkpoint's files.
            self.student.invalidate_fingerprint()
        self.student.model.train()
        use_ema = config.use_distillation and config.teacher_mode == "ema"
        teacher_dims = [t.encoder.dim for t in self.teachers] + ([self.student.dim] if use_ema else [])
        self.loss = DistillationLoss(
            kd_types=config.loss_types, distillation_weight=self.stages[0].distillation_weight,
            temperature=self.stages[0].temperature, use_distillation=config.use_distillation,
            student_dim=self.student.dim, teacher_dims=teacher_dims, train_modes=config.train_modes or (),
            mode_weights={"alignment": config.mode_alignment_weight, "contrastive": config.mode_contrastive_weight,
                          "kd": config.mode_kd_weight, "temperature": config.mode_temperature},
        ).to(self.device)
        self._teacher_val: tuple[np.ndarray, np.ndarray] | None = None  # the first teacher's val vectors
        self.cross_space: dict[str, dict[str, float]] = {}  # "start"/"end" -> distances (train_modes)

        self.trainable = [(n, p) for n, p in self.student.model.named_parameters() if p.requires_grad]
        self._broadcast_initial_weights()
        # Copied after the broadcast: a copy taken before holds this rank's own starting weights,
        # and the ranks' EMA teachers (whose targets must agree) would never meet.
        self.ema = EmaTeacher(self.student, momentum=config.teacher_momentum,
                              every=config.update_teacher_every) if use_ema else None
        scale = getattr(self.student.model, "logit_scale", None)
        # The logit scale and the loss's projections act on the whole gathered batch on every
        # rank; every other weight only reaches the loss through this rank's own embeddings.
        self._direct = {id(p) for p in self.loss.parameters()} | ({id(scale)} if scale is not None else set())
        params = [p for _, p in self.trainable] + list(self.loss.parameters())
        # train_modes: the shipped projection in a group of its own, at projection_lr_scale × the
        # learning rate (a fresh linear map may want a faster rate than the LoRA deltas)
        projection = ({id(p) for p in self.loss.projections.parameters()}
                      if config.train_modes and self.loss.projections is not None else set())
        decay = [p for p in params if p.ndim >= 2 and id(p) not in projection]
        no_decay = [p for p in params if p.ndim < 2 and id(p) not in projection]
        groups = [{"params": decay, "weight_decay": config.weight_decay, "lr_scale": 1.0},
                  {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}]
        if projection:
            groups.append({"params": [p for p in params if id(p) in projection], "weight_decay": config.weight_decay,
                           "lr_scale": float(config.projection_lr_scale)})
        self.optimizer = torch.optim.AdamW(groups, lr=self.stages[0].learning_rate)
        for group in self.optimizer.param_groups:
            group["lr"] = self.stages[0].learning_rate * group["lr_scale"]
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self.stage = self.stages[0]

        # progress, restored by load_checkpoint
        self.global_step = 0
        self.epoch = 0  # global epoch in progress (0-based, across stages)
        self.step_in_epoch = 0
        self.evaluations: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.last_global_batch = 0
        self.last_lr = 0.0
        self._scheduler_state: dict[str, Any] | None = None
        self._saved_step = -1
        self._evaluated_step = -1
        self._window: list[LossOutput] = []
        self._writer: Any = None
        self.resumed_from: Path | None = None

    # -- setup ------------------------------------------------------------------------------

    def _encoder_options(self, family: str, teacher: int | None = None) -> dict[str, Any]:
        """``load_encoder`` options of the student (``teacher`` None) or of teacher number
        ``teacher``: each model gets the options given for it, never another model's, so a
        teacher keeps its own text limit and its full-size targets (DESIGN, Distillation)."""
        given = self.config.student_options() if teacher is None else self.config.teacher_options(teacher)
        accepted = ("max_text_length",) if family != "qwen3-vl" else tuple(given)  # CLIP/SigLIP: no instructions
        return {key: value for key, value in given.items() if key in accepted and value is not None}

    def _load(self, name: str, dtype: Any = None, teacher: int | None = None) -> TorchEncoder:
        from vkd.models import detect_family, load_encoder

        options = self._encoder_options(detect_family(name), teacher)
        encoder = load_encoder(name, device=self.device, dtype=dtype, **options)
        if not isinstance(encoder, TorchEncoder):
            raise ValueError(f"{name}: distillation needs a torch model, got {type(encoder).__name__}")
        return encoder

    def _check_matryoshka(self) -> None:
        from vkd.models import detect_family

        config = self.config
        given = [("matryoshka_dim", config.model_name_or_path, config.matryoshka_dim)]
        if config.use_distillation:
            given += [("teacher_matryoshka_dim", name, config.teacher_options(k)["matryoshka_dim"])
                      for k, name in enumerate(config.teachers)]
        for key, name, dim in given:
            if dim is not None and detect_family(name) != "qwen3-vl":
                raise ValueError(f"{key} = {dim} for {name}: only Qwen3-VL models have Matryoshka embeddings; "
                                 f"remove it, or give null for this model")

    def _teachers(self, encoders: Sequence[TorchEncoder] | None) -> list[Teacher]:
        config = self.config
        if encoders is None:
            encoders = [self._load(name, teacher=k) for k, name in enumerate(config.teachers)]
        cache_dir = None
        if config.teacher_cache:
            cache_dir = Path(config.teacher_cache_dir) if config.teacher_cache_dir else self.out / "teacher_cache"
        shard = fsdp_requested()
        if shard and config.train_modes:
            # the cross-space check runs the teacher on the main process alone: a sharded forward needs every rank
            raise ValueError("train_modes with an FSDP launch: the sharded teacher cannot encode the validation "
                             "set on one process; launch with deploy/accelerate/ddp.yaml, or leave out train_modes")
        return make_teachers(encoders, names=config.teachers, weights=config.teacher_weights, cache_dir=cache_dir,
                             shard=shard)

    def _broadcast_initial_weights(self) -> None:
        # Without DDP nothing else makes the ranks start from the same weights; the seed
        # should, but a broadcast is cheap and certain.
        if self.world == 1:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for tensor in [p for _, p in self.trainable] + list(self.loss.parameters()):
                dist.broadcast(tensor.data, src=0)

    # -- one step ---------------------------------------------------------------------------

    def _embed_text(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        with self.accelerator.autocast():
            return self.student.embed_text(inputs)

    def _embed_image(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        with self.accelerator.autocast():
            return self.student.embed_images(inputs)

    def teacher_outputs(self, batch: dict[str, Any]) -> list[TeacherOutput]:
        """Every teacher's embeddings for the global batch (constants)."""
        outputs = [t.output(batch["cache_keys"], inputs, self.device)
                   for t, inputs in zip(self.teachers, batch["teachers"], strict=True)]
        if self.ema is not None:
            with self.accelerator.autocast():
                outputs.append(self.ema.output(batch["text_chunks"], batch["image_chunks"]))
        if self.world > 1:
            outputs = [TeacherOutput(self.accelerator.gather(o.text), self.accelerator.gather(o.image),
                                     o.logit_scale, o.weight) for o in outputs]
        return outputs

    def train_step(self, batch: dict[str, Any]) -> LossOutput:
        """Forward, backward and optimiser step on one batch; returns the (detached) loss."""
        teachers = self.teacher_outputs(batch) if self.config.use_distillation else []
        image_ids = batch["image_index"].to(self.device)
        if self.world > 1:
            image_ids = self.accelerator.gather(image_ids)

        def loss_fn(text: torch.Tensor, image: torch.Tensor) -> LossOutput:
            text, image = gather_with_local_grad(text), gather_with_local_grad(image)
            self.last_global_batch = int(text.shape[0])
            return self.loss(text, image, self.student.logit_scale_tensor(), teachers, image_ids)

        self.optimizer.zero_grad(set_to_none=True)
        if self.config.use_gradient_cache:
            output = cached_step(self._embed_text, self._embed_image, batch["text_chunks"],
                                 batch["image_chunks"], loss_fn)
        else:
            text = torch.cat([self._embed_text(chunk) for chunk in batch["text_chunks"]])
            image = torch.cat([self._embed_image(chunk) for chunk in batch["image_chunks"]])
            output = loss_fn(text, image)
            output.total.backward()
            output = LossOutput(output.total.detach(), output.parts)
        self._reduce_gradients()
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.global_step += 1
        if self.ema is not None and self.global_step % self.ema.every == 0:
            self.ema.update()
        return output

    def _reduce_gradients(self) -> None:
        if self.world == 1:
            return
        params = [p for _, p in self.trainable] + list(self.loss.parameters())
        all_reduce_gradients(params)  # averages over ranks
        # Each rank back-propagated the global loss into its own rows only, so an encoder
        # weight's true gradient is the sum of the ranks' parts; the direct parameters saw
        # every row on every rank, and their average is already the whole gradient.
        for p in params:
            if p.grad is not None and id(p) not in self._direct:
                p.grad.mul_(self.world)

    # -- the loop ---------------------------------------------------------------------------

    def _start_stage(self, stage: StagePlan) -> None:
        self.stage = stage
        self.loss.temperature = stage.temperature
        self.loss.distillation_weight = stage.distillation_weight
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] = stage.learning_rate * group.get("lr_scale", 1.0)
        total = stage.epochs * self.steps_per_epoch
        warmup = int(self.config.warmup_ratio * total)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: warmup_cosine(step, total, warmup))
        saved = self._scheduler_state
        if saved is not None and saved["stage"] == stage.index:
            self.scheduler.load_state_dict(saved["state"])
            for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr(), strict=True):
                group["lr"] = lr
        self._scheduler_state = None

    def train(self) -> DistillResult:
        """Run (or continue) every stage, then write the outputs."""
        self._resume()
        self._open_outputs()
        if self.global_step == 0 and self.config.train_modes:
            # the baseline the report compares against: the projection before any step
            self.cross_space["start"] = self.cross_space_distance()
        progress = tqdm(total=self.total_steps, initial=self.global_step, desc="distill", unit="step",
                        disable=not self.is_main, dynamic_ncols=True)
        stopped = self.global_step >= self.total_steps
        for stage in self.stages:
            if stopped or self.epoch >= stage.end_epoch:
                continue
            self._start_stage(stage)
            while self.epoch < stage.end_epoch and not stopped:
                stopped = self._run_epoch(stage, progress)
        progress.close()
        if self._saved_step != self.global_step:
            self.save_checkpoint()
        if self._last_step_unevaluated():
            # After the checkpoint, so that a resumed run does not carry this extra evaluation
            # (or a best chosen by it) and still continues exactly the run it was cut from.
            self.evaluate(self.stage, end_of_run=True)
        return self._finish(time.perf_counter() - self._started)

    def _last_step_unevaluated(self) -> bool:
        """Whether the final weights would go unevaluated although the run evaluates (the same
        answer on every rank: evaluations restored from a checkpoint are the same everywhere)."""
        if self.val_pairs is None or self.config.eval_strategy == "no":
            return False
        return self._evaluated_step != self.global_step and all(
            row["step"] != self.global_step for row in self.evaluations)

    def _collator(self) -> Collator:
        # Snapshot of each cache for this epoch: rows outside it are prepared for the teacher.
        teachers = [(t.encoder, t.cache.keys() if t.cache is not None else None) for t in self.teachers]
        chunk = self.config.gradient_cache_chunk_size if self.config.use_gradient_cache else None
        return Collator(self.student, teachers, self.train_pairs.text_to_image, chunk)

    def epoch_loader(self, epoch: int, start: int = 0) -> Any:
        batches = epoch_batches(len(self.train_pairs), batch_size=self.config.batch_size, num_processes=self.world,
                                rank=self.accelerator.process_index, seed=self.config.seed, epoch=epoch)
        return make_loader(self.train_pairs, batches[start:], self._collator(),
                           num_workers=self.config.num_workers, seed=self.config.seed + epoch)

    def _run_epoch(self, stage: StagePlan, progress: Any) -> bool:
        """Train until the epoch ends (False) or max_steps is reached (True)."""
        config = self.config
        for batch in self.epoch_loader(self.epoch, self.step_in_epoch):
            output = self.train_step(batch)
            self.step_in_epoch += 1
            progress.update(1)
            self._window.append(output)
            if self.global_step % config.logging_steps == 0:
                self._log_train(stage, progress)
            if config.eval_strategy == "steps" and self.global_step % config.eval_steps == 0:
                self.evaluate(stage)
            if self.step_in_epoch == self.steps_per_epoch:
                self.flush_teacher_caches()
                self.epoch += 1
                self.step_in_epoch = 0
                if config.eval_strategy == "epoch":
                    self.evaluate(stage)
            if config.save_steps and self.global_step % config.save_steps == 0:
                self.save_checkpoint()
            if self.global_step >= self.total_steps:
                return True
        return False

    # -- evaluation and logging ---------------------------------------------------------------

    def evaluate(self, stage: StagePlan, *, end_of_run: bool = False) -> dict[str, Any] | None:
        """Recall on val_data_path (main process; the others wait); keeps the best weights
        (``best_metric``, ties to the later evaluation, see ``choose_best``)."""
        if self.val_pairs is None:
            return None
        self._evaluated_step = self.global_step  # on every rank: train() decides on it collectively
        row = None
        if self.is_main:
            from vkd.evaluate import evaluate_encoder

            self.student.model.eval()
            with self.accelerator.autocast():
                metrics = evaluate_encoder(self.student, self.val_pairs, batch_size=self.config.batch_size)
            self.student.model.train()
            row = {"type": "eval", "step": self.global_step, "epoch": self._epoch_float(), "stage": stage.index,
                   **metrics}
            if end_of_run:
                row["end_of_run"] = True
            metric = self.config.best_metric
            current = self._best_row()
            if choose_best([current, row] if current is not None else [row], metric) is row:
                self.best = {"step": row["step"], "epoch": row["epoch"], "metric": metric, "value": row[metric],
                             **{key: row[key] for key in VAL_KEYS}}
                self.best_state = {**self._trainable_state(), **self._projection_state()}
            row["best"] = self.best is not None and self.best["step"] == self.global_step
            self.evaluations.append(row)
            self._write_row(row)
        self.accelerator.wait_for_everyone()
        return row

    def _best_row(self) -> dict[str, Any] | None:
        """The evaluation row of ``self.best``: it holds every metric, so the comparison also
        works for a best restored from a checkpoint that recorded another metric."""
        if self.best is None:
            return None
        return next((row for row in self.evaluations if row["step"] == self.best["step"]), None)

    def _epoch_float(self) -> float:
        return round(self.global_step / self.steps_per_epoch, 4)

    def _log_train(self, stage: StagePlan, progress: Any) -> None:
        window, self._window = self._window, []
        row: dict[str, Any] = {
            "type": "train", "step": self.global_step, "epoch": self._epoch_float(), "stage": stage.index,
            "lr": self.last_lr,
            "loss": float(torch.stack([o.total for o in window]).float().mean()),
        }
        for name in window[-1].parts:
            row[name] = float(torch.stack([o.parts[name] for o in window]).float().mean())
        if self.config.use_distillation:  # a CE-only run uses neither
            row.update(temperature=self.loss.temperature, distillation_weight=self.loss.distillation_weight)
        row.update(logit_scale=float(self.student.logit_scale_tensor().detach()),
                   local_batch=self.config.batch_size, global_batch=self.last_global_batch)
        if self.teachers:
            row["teacher_cache"] = cache_summary(self.teachers)
        progress.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
        self._write_row(row)

    def _open_outputs(self) -> None:
        if not self.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        self.config.save(self.out / "config.yaml")
        metrics = self.out / "metrics.jsonl"
        kept = []
        if self.resumed_from is not None and metrics.is_file():
            # rows past the checkpoint came from the interrupted run and will be logged again;
            # its end-of-run evaluation is not in the checkpoint, so not part of this run either
            rows = [(line, json.loads(line)) for line in metrics.read_text().splitlines() if line.strip()]
            kept = [line for line, row in rows if row.get("step", 0) <= self.global_step and not row.get("end_of_run")]
        metrics.write_text("".join(line + "\n" for line in kept))
        if "tensorboard" in self.config.report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                tqdm.write("report_to includes tensorboard but the tensorboard package is not installed "
                           "(pip install tensorboard); logging to metrics.jsonl only")
            else:
                self._writer = SummaryWriter(str(self.out / "tensorboard"))

    def _write_row(self, row: dict[str, Any]) -> None:
        if not self.is_main:
            return
        with (self.out / "metrics.jsonl").open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        if self._writer is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key not in ("step", "type"):
                    self._writer.add_scalar(f"{row['type']}/{key}", value, row["step"])

    # -- checkpoints ------------------------------------------------------------------------

    def flush_teacher_caches(self) -> None:
        """Write new teacher-cache rows (collective: every process calls it)."""
        for teacher in self.teachers:
            if teacher.cache is not None:
                teacher.cache.flush()

    def _projection_state(self) -> dict[str, torch.Tensor]:
        """The projection the asymmetric modes ship, kept with the best weights so that model/
        holds a student and a projection of the same step."""
        if not self.config.train_modes or self.loss.projections is None:
            return {}
        return {PROJECTION_KEY: self.loss.projections.weight(0).detach().to("cpu", torch.float32, copy=True)}

    def cross_space_distance(self) -> dict[str, float]:
        """On the validation pairs (main process): mean 2 − 2·cos between the projected student's
        text / image vectors and the first teacher's (``losses.cross_space_distance``)."""
        from vkd.distill.losses import cross_space_distance

        if self.val_pairs is None or not self.is_main or self.loss.projections is None:
            return {}
        texts, images = self.val_pairs.texts(), [str(p) for p in self.val_pairs.images()]
        rows = torch.as_tensor(self.val_pairs.text_to_image)
        if self._teacher_val is None:
            teacher = self.teachers[0].encoder
            self._teacher_val = (teacher.encode_text(texts, batch_size=self.config.batch_size),
                                 teacher.encode_images(images, batch_size=self.config.batch_size))
        self.student.model.eval()
        try:
            with torch.no_grad(), self.accelerator.autocast():
                s_text = torch.as_tensor(self.student.encode_text(texts, batch_size=self.config.batch_size))
                s_image = torch.as_tensor(self.student.encode_images(images, batch_size=self.config.batch_size))
        finally:
            self.student.model.train()
        weight = self.loss.projections.weight(0).detach().float().cpu()
        t_text, t_image = (torch.as_tensor(x) for x in self._teacher_val)
        # every caption against its own image's teacher vector too: the cross-modal side each mode meets
        distances = cross_space_distance(s_text @ weight.T, s_image @ weight.T, t_text, t_image)
        return {key: round(value, 6) for key, value in distances.items()} | {"captions": int(rows.numel())}

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().to("cpu", copy=True).contiguous() for name, p in self.trainable}

    def save_checkpoint(self) -> Path:
        """``checkpoints/step-NNNNNN/``: ``adapter/`` (LoRA, PEFT format), ``trainable.safetensors``
        (every trained student weight: the whole student under full fine-tuning), ``loss``,
        ``ema`` and ``best`` weights, ``optimizer.pt``, ``scheduler.pt``, ``rng-<rank>.pt`` and
        ``trainer_state.json`` (step, epoch and position in it, evaluations, best). Written under
        a temporary name (``step-NNNNNN.tmp``), every file and directory fsynced, then renamed
        and the rename fsynced: a kill or a crash at any point leaves no ``step-NNNNNN`` that is
        not complete on disk (``latest_checkpoint`` also skips one without trainer_state.json)."""
        self.flush_teacher_caches()  # a resumed run then finds this run's teacher rows
        final = self.out / "checkpoints" / f"step-{self.global_step:06d}"
        temporary = final.with_name(final.name + ".tmp")
        if self.is_main:
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        rng_file = temporary / f"rng-{self.accelerator.process_index}.pt"
        torch.save(_rng_state(), rng_file)
        _fsync(rng_file)  # by its writer: on a shared filesystem only the writer's fsync counts
        if self.is_main:
            save_file(self._trainable_state(), temporary / "trainable.safetensors")
            if self.peft is not None:
                save_adapter(self.peft, temporary / "adapter")
            # named_parameters, not state_dict: feature_mse and icl share one projection
            loss_state = {k: v.detach().cpu().contiguous() for k, v in self.loss.named_parameters()}
            if loss_state:
                save_file(loss_state, temporary / "loss.safetensors")
            if self.ema is not None:
                save_file(self.ema.state_dict(), temporary / "ema.safetensors")
            if self.best_state is not None:
                save_file(self.best_state, temporary / "best.safetensors")
            torch.save(self.optimizer.state_dict(), temporary / "optimizer.pt")
            torch.save({"stage": self.stage.index, "state": self.scheduler.state_dict() if self.scheduler else None},
                       temporary / "scheduler.pt")
            state = {
                "global_step": self.global_step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "evaluations": self.evaluations, "best": self.best,
                "ema_updates": self.ema.updates if self.ema else 0,
                "data": {"pairs": len(self.train_pairs), "batch_size": self.config.batch_size,
                         "num_processes": self.world, "seed": self.config.seed},
            }
            (temporary / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
        self.accelerator.wait_for_everyone()
        if self.is_main:
            _fsync_tree(temporary)
            # An older copy of this step (a run resumed from before it) is renamed away, never
            # deleted in place: a kill mid-delete would leave a partial step-NNNNNN behind.
            retired = final.with_name(final.name + ".old")
            shutil.rmtree(retired, ignore_errors=True)
            if final.exists():
                os.replace(final, retired)
            os.replace(temporary, final)
            _fsync(final.parent)  # the rename itself
            shutil.rmtree(retired, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self._saved_step = self.global_step
        return final

    def _resume(self) -> None:
        option = self.config.resume_from_checkpoint
        if option is None or option is False:
            earlier = latest_checkpoint(self.out / "checkpoints")
            if earlier is not None:
                raise ValueError(
                    f"output_dir {self.out} already holds checkpoints of an earlier run ({earlier.name}); "
                    "set resume_from_checkpoint: latest to continue it, or choose another output_dir"
                )
            return
        if option is True or option == "latest":
            path = latest_checkpoint(self.out / "checkpoints")
            if path is None:
                if self.is_main:
                    tqdm.write(f"resume_from_checkpoint: no checkpoint in {self.out / 'checkpoints'} yet; starting fresh")
                return
        else:
            path = Path(option)
        self.load_checkpoint(path)

    def load_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Restore everything ``save_checkpoint`` wrote; training then continues exactly."""
        path = Path(path)
        state_file = path / "trainer_state.json"
        if not state_file.is_file():
            raise ValueError(f"resume_from_checkpoint = {str(path)!r}: not a checkpoint (no trainer_state.json); "
                             f"give a checkpoints/step-NNNNNN directory or 'latest'")
        state = json.loads(state_file.read_text())
        expected = {"pairs": len(self.train_pairs), "batch_size": self.config.batch_size,
                    "num_processes": self.world, "seed": self.config.seed}
        if state["data"] != expected:
            raise ValueError(f"{path}: saved with data order {state['data']} but this run has {expected}; "
                             "resume with the same data_path, batch_size, number of processes and seed")
        trained = load_file(path / "trainable.safetensors")
        missing = [name for name, _ in self.trainable if name not in trained]
        if missing:
            raise ValueError(f"{path}: trainable.safetensors lacks {missing[:3]}; the checkpoint was saved "
                             "with another use_lora / lora_* / lora_target_modules setting")
        with torch.no_grad():
            for name, p in self.trainable:
                p.copy_(trained[name])
            if (path / "loss.safetensors").is_file():
                saved = load_file(path / "loss.safetensors")
                for name, p in self.loss.named_parameters():
                    p.copy_(saved[name])
        if self.ema is not None:
            self.ema.load_state_dict(load_file(path / "ema.safetensors"))
            self.ema.updates = state["ema_updates"]
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
        self._scheduler_state = torch.load(path / "scheduler.pt", weights_only=False)
        rng = path / f"rng-{self.accelerator.process_index}.pt"
        _set_rng_state(torch.load(rng, weights_only=False))
        self.global_step, self.epoch, self.step_in_epoch = state["global_step"], state["epoch"], state["step_in_epoch"]
        self.evaluations, self.best = state["evaluations"], state["best"]
        if (path / "best.safetensors").is_file():
            self.best_state = load_file(path / "best.safetensors")
        self._saved_step = self.global_step
        self.resumed_from = path

    # -- the end ----------------------------------------------------------------------------

    def _counters(self) -> dict[str, Any]:
        """Teacher forward and cache counts summed over processes (collective)."""
        values = [[t.forward_calls, t.forward_rows, t.cache.hits if t.cache else 0, t.cache.misses if t.cache else 0]
                  for t in self.teachers]
        if values and self.world > 1:
            values = self.accelerator.reduce(torch.tensor(values, device=self.device), "sum").tolist()
        teachers = []
        for teacher, (calls, rows, hits, misses) in zip(self.teachers, values, strict=True):
            info = teacher.describe()
            info.update(forward_calls=int(calls), forward_rows=int(rows))
            if teacher.cache is not None:
                info["cache"].update(hits=int(hits), misses=int(misses))
            teachers.append(info)
        return {
            "teachers": teachers,
            "teacher_cache": {"hits": int(sum(v[2] for v in values)), "misses": int(sum(v[3] for v in values))},
            "teacher_forward_calls": int(sum(v[0] for v in values)),
            "teacher_forward_rows": int(sum(v[1] for v in values)),
        }

    def _final_model_reason(self) -> str:
        """Which weights model/ holds, and why, in one sentence (the report and the summary)."""
        last = self.global_step
        if self.val_pairs is None:
            return f"the last weights (step {last}): no val_data_path, so there was nothing to choose between"
        if self.config.eval_strategy == "no":
            return f"the last weights (step {last}): eval_strategy is 'no', so nothing was evaluated"
        best = self._best_row()
        if self.best_state is None or best is None:
            return f"the last weights (step {last}): nothing was evaluated"
        metric, count = self.config.best_metric, len(self.evaluations)
        of = f"the best of {count} evaluation{'s' if count != 1 else ''} on val {metric}"
        if best["step"] == last:
            reason = f"the last weights (step {last}), {of} ({best[metric]:.2f})"
        else:
            final = next((row for row in self.evaluations if row["step"] == last), None)
            scored = f"; the last weights (step {last}) scored {final[metric]:.2f}" if final else ""
            reason = f"the weights of step {best['step']} (epoch {best['epoch']:g}), {of} ({best[metric]:.2f}{scored})"
        if any(row.get("end_of_run") for row in self.evaluations):
            reason += (f"; step {last} was evaluated at the end of the run, which eval_strategy "
                       f"'{self.config.eval_strategy}' had not reached")
        return reason

    def _write_projection(self, model_dir: Path) -> dict[str, Any] | None:
        """With train_modes: the projection (of the weights model/ holds) into the first teacher's
        space, written into model_dir (``vkd.models.projection``); the val distances before and after."""
        if not self.config.train_modes or self.loss.projections is None:
            return None
        from vkd.indexer.manifest import model_record
        from vkd.models.projection import write_projection

        weight = (self.best_state or {}).get(PROJECTION_KEY)
        if weight is not None:
            with torch.no_grad():
                self.loss.projections.weight(0).copy_(weight)
        self.cross_space["end"] = self.cross_space_distance()
        teacher = model_record(self.teachers[0].encoder.describe())
        path = write_projection(model_dir, self.loss.projections.weight(0).detach().float().cpu().numpy(),
                                teacher, self.config.train_modes)
        return _projection_report(self, path)

    def _finish(self, wall_time: float) -> DistillResult:
        counters = self._counters()
        if self.best_state is not None:
            with torch.no_grad():
                for name, p in self.trainable:
                    p.copy_(self.best_state[name])
        model_dir, adapter_dir = self.out / "model", (self.out / "adapter" if self.peft is not None else None)
        report: dict[str, Any] = {}
        if self.is_main:
            trained = sum(p.numel() for _, p in self.trainable)
            # before the merge: afterwards the LoRA names are gone
            scale_trained = any(name.rsplit(".", 1)[-1] == "logit_scale" for name, _ in self.trainable)
            # None: the model has no logit scale of its own (the loss uses a fixed one)
            if not isinstance(getattr(self.student.model, "logit_scale", None), torch.nn.Parameter):
                scale_trained = None
            lora = None
            if self.peft is not None:
                peft_config = self.peft.peft_config["default"]
                lora = {"r": self.config.lora_r, "alpha": self.config.lora_alpha,
                        "target_modules": sorted(peft_config.target_modules),
                        "heads": sorted(peft_config.modules_to_save or [])}
                shutil.rmtree(adapter_dir, ignore_errors=True)
                save_adapter(self.peft, adapter_dir)
                merge(self.student, self.peft)
            shutil.rmtree(model_dir, ignore_errors=True)
            self.student.save(model_dir)
            projection = self._write_projection(model_dir)
            total = self.student.num_parameters()
            distilling = self.config.use_distillation
            # A CE-only run has no temperature or distillation weight: leaving them out keeps
            # the report from suggesting settings that did nothing.
            stages = [{k: v for k, v in vars(s).items()
                       if distilling or k not in ("temperature", "distillation_weight")} for s in self.stages]
            kept_step = self.best["step"] if self.best_state is not None and self.best else self.global_step
            report = {
                "student": {"name": self.config.model_name_or_path, "family": self.student.family,
                            "dim": self.student.dim, "parameters": total, "trained_parameters": trained,
                            "trained_percent": round(100 * trained / total, 2) if total else None,
                            "logit_scale_trained": scale_trained,
                            "lora": lora},
                "loss": {"use_distillation": distilling,
                         "terms": ["ce", *self.config.loss_types] if distilling else ["ce"]},
                **counters,
                "ema_teacher": self.ema.describe() if self.ema else None,
                "steps": self.global_step,
                "epochs": self._epoch_float(),
                "steps_per_epoch": self.steps_per_epoch,
                "stages": stages,
                "num_processes": self.world,
                "global_batch_size": self.config.batch_size * self.world,
                "val": [{k: r[k] for k in ("step", "epoch", "stage", *VAL_KEYS, "end_of_run") if k in r}
                        for r in self.evaluations],
                "best_metric": self.config.best_metric,
                "best": self.best,
                "best_epoch": self.best["epoch"] if self.best else None,
                "final_model": "best" if self.best_state is not None else "last",
                "final_model_step": kept_step,
                "final_model_reason": self._final_model_reason(),
                "wall_time_s": round(wall_time, 3),
                "resumed_from": str(self.resumed_from) if self.resumed_from else None,
                "projection": projection,
                "outputs": {"model": str(model_dir), "adapter": str(adapter_dir) if adapter_dir else None,
                            "metrics": str(self.out / "metrics.jsonl"), "config": str(self.out / "config.yaml")},
            }
            (self.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
            if self._writer is not None:
                self._writer.close()
        self.accelerator.wait_for_everyone()
        return DistillResult(
            output_dir=self.out, model_dir=model_dir, adapter_dir=adapter_dir,
            config_path=self.out / "config.yaml", metrics_path=self.out / "metrics.jsonl",
            report_path=self.out / "report.json", report=report,
        )


def _projection_report(trainer: Trainer, path: Path) -> dict[str, Any]:
    return {"file": str(path), "modes": list(trainer.config.train_modes or ()),
            "teacher": trainer.teachers[0].encoder.describe()["fingerprint"],
            "val_cross_space_distance": trainer.cross_space or None}


def latest_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """The complete ``step-NNNNNN`` checkpoint with the highest step in ``directory`` (None if
    none). Temporary (``.tmp``) and retired (``.old``) directories never match the name, and a
    ``step-NNNNNN`` without trainer_state.json (written last) is skipped as incomplete."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in directory.iterdir()
             if p.is_dir() and (m := CHECKPOINT_RE.match(p.name)) and (p / "trainer_state.json").is_file()]
    return max(found)[1] if found else None


def _fsync(path: Path) -> None:
    """Flush one file, or one directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():
            raise
        # some filesystems cannot fsync a directory (EINVAL); the files are durable regardless
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then each directory after its contents."""
    for parent, _, files in os.walk(root, topdown=False):
        for name in files:
            _fsync(Path(parent) / name)
        _fsync(Path(parent))
