"""Distillation losses: the student's contrastive loss plus the knowledge-distillation (KD) terms.

Per batch of n pairs the student gives similarities ``S_s = text_s · image_sᵀ`` (n × n) and each
teacher ``S_t`` likewise; a model's logits are its similarities times its own logit scale.

* ``ce``             symmetric InfoNCE on the student's logits, the diagonal as labels
* ``kl_divergence``  ``T² · KL(p_teacher ‖ softmax(S_s·scale_s / T))`` over rows and columns
* ``feature_mse``    squared distance between projected student and teacher embeddings
* ``icl``            InfoNCE of student image vs teacher text and student text vs teacher image
* ``similarity_mse`` MSE between the student's and the teacher's cosine-similarity matrices

``total = (1 − w) · ce + w · Σ KD terms``.

Captions of the same image are not negatives of each other: with ``image_ids`` given, every
off-diagonal entry whose row and column show the same image is dropped from each softmax
(student's and teacher's alike), so each row's candidates are the batch's distinct images
(or texts of distinct images) and the KL compares distributions over the same support.

Losses are computed on the whole (globally gathered) batch; ``gather_with_local_grad`` does the
gathering, so the losses themselves do not know about ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from vkd.config import LOSS_TYPES as KD_LOSS_TYPES  # one list: the config accepts what the loss builds


def gather_with_local_grad(x: Tensor) -> Tensor:
    """All-gather ``x`` along dim 0 across ranks; the local slice keeps its autograd graph.

    Other ranks' slices are constants, so each rank back-propagates the global loss into its own
    embeddings only; DDP's gradient averaging then gives 1/world of the global loss's gradient
    (open_clip's convention with ``local_loss=False``). Ranks may hold different row counts (a
    last partial batch): rows are padded to the largest count for the collective and trimmed
    after. A no-op when torch.distributed is not initialised or the world has one rank.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    world, rank = dist.get_world_size(), dist.get_rank()
    count = torch.tensor([x.shape[0]], device=x.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    rows = [int(c.item()) for c in counts]
    padded = x.detach().new_zeros((max(rows), *x.shape[1:]))
    padded[: x.shape[0]] = x.detach()
    slices = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(slices, padded)
    slices = [s[:r] for s, r in zip(slices, rows, strict=True)]
    slices[rank] = x
    return torch.cat(slices)


@dataclass
class TeacherOutput:
    """One teacher's embeddings for the (global) batch; treated as constants."""

    text: Tensor  # [n, d_t], L2-normalised
    image: Tensor  # [n, d_t]
    logit_scale: float | Tensor  # multiplier: CLIP exp(logit_scale); 1/0.05 for models without one
    weight: float = 1.0

    @property
    def dim(self) -> int:
        return int(self.text.shape[-1])


def _teacher_weights(teachers: Sequence[TeacherOutput]) -> list[float]:
    if not teachers:
        raise ValueError("distillation needs at least one TeacherOutput; got none")
    weights = [float(t.weight) for t in teachers]
    if min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"teacher weights must be >= 0 with a positive sum; got {weights}")
    return [w / sum(weights) for w in weights]


def _teacher_embeddings(teacher: TeacherOutput, like: Tensor) -> tuple[Tensor, Tensor]:
    """The teacher's embeddings as constants on the student's device and dtype, normalised again
    because a float16 cache round-trip leaves them slightly off the unit sphere."""
    if teacher.text.shape[0] != like.shape[0] or teacher.image.shape[0] != like.shape[0]:
        raise ValueError(
            f"a teacher gives {teacher.text.shape[0]} texts and {teacher.image.shape[0]} images for a "
            f"batch of {like.shape[0]}: teacher embeddings must cover the same (gathered) batch as the student's")
    text, image = (F.normalize(x.detach().to(like.device, like.dtype), dim=-1) for x in (teacher.text, teacher.image))
    return text, image


def _same_image_mask(image_ids: Tensor | None, n: int, device: torch.device) -> Tensor | None:
    """True where a row and a different column show the same image; None when nothing is masked."""
    if image_ids is None:
        return None
    ids = torch.as_tensor(image_ids, device=device)
    if ids.shape != (n,):
        raise ValueError(f"image_ids has shape {tuple(ids.shape)}; expected ({n},), one id per pair")
    same = ids[:, None] == ids[None, :]
    same.fill_diagonal_(False)
    return same if bool(same.any()) else None


def _masked(logits: Tensor, mask: Tensor | None) -> Tensor:
    return logits if mask is None else logits.masked_fill(mask, float("-inf"))


def _cross_entropy_rows(logits: Tensor, mask: Tensor | None) -> Tensor:
    """InfoNCE of each row against its diagonal entry."""
    labels = torch.arange(logits.shape[0], device=logits.device)
    return F.cross_entropy(_masked(logits, mask), labels)


def _kl_rows(p: Tensor, log_q: Tensor) -> Tensor:
    """Σ p (log p − log q) per row, batchmean; entries with p = 0 contribute 0 even where
    log q = −inf (masked), which F.kl_div would turn into NaN."""
    return (torch.xlogy(p, p) - p * log_q.masked_fill(p == 0, 0.0)).sum() / p.shape[0]


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE on ``scale · text @ imageᵀ`` with the diagonal as labels."""

    def forward(self, text: Tensor, image: Tensor, logit_scale: Tensor | float,
                image_ids: Tensor | None = None) -> Tensor:
        logits = logit_scale * text @ image.T
        mask = _same_image_mask(image_ids, logits.shape[0], logits.device)  # symmetric: serves logits.T too
        return (_cross_entropy_rows(logits, mask) + _cross_entropy_rows(logits.T, mask)) / 2


def teacher_targets(teachers: Sequence[TeacherOutput], temperature: float, image_ids: Tensor | None = None,
                    *, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """The teachers' soft targets: the weighted mean of each teacher's softmax(S_t·scale_t / T), over
    rows (text→image) and over columns (image→text). Teachers of different dimensions meet only here,
    as n × n probability matrices, never as raw vectors."""
    weights = _teacher_weights(teachers)
    device = torch.device(device) if device is not None else teachers[0].text.device
    # at least float32: a float16 cache would make the softmax of large logits coarse
    dtype = torch.promote_types(teachers[0].text.dtype, torch.float32)
    like = torch.empty(teachers[0].text.shape[0], 0, device=device, dtype=dtype)
    mask = _same_image_mask(image_ids, like.shape[0], device)
    p_text_to_image = p_image_to_text = like.new_zeros(())
    for teacher, weight in zip(teachers, weights, strict=True):
        text, image = _teacher_embeddings(teacher, like)
        scale = torch.as_tensor(teacher.logit_scale, dtype=like.dtype, device=device).detach()
        logits = _masked(scale * text @ image.T / temperature, mask)
        p_text_to_image = p_text_to_image + weight * logits.softmax(dim=1)
        p_image_to_text = p_image_to_text + weight * logits.T.softmax(dim=1)
    return p_text_to_image, p_image_to_text


class KLDivergenceLoss(nn.Module):
    """``T² · KL(p_teacher ‖ q_student)`` for text→image rows and image→text rows, averaged.

    T² keeps the gradient's size independent of T (Hinton et al. 2015); ``temperature`` is a plain
    attribute so schedules can change it between stages.
    """

    def __init__(self, temperature: float) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, student_text: Tensor, student_image: Tensor, student_scale: Tensor | float,
                teachers: Sequence[TeacherOutput], image_ids: Tensor | None = None) -> Tensor:
        t = self.temperature
        p_t2i, p_i2t = teacher_targets(teachers, t, image_ids, device=student_text.device)
        mask = _same_image_mask(image_ids, student_text.shape[0], student_text.device)
        logits = _masked(student_scale * student_text @ student_image.T / t, mask)
        p_t2i, p_i2t = p_t2i.to(logits.dtype), p_i2t.to(logits.dtype)
        kl = (_kl_rows(p_t2i, logits.log_softmax(dim=1)) + _kl_rows(p_i2t, logits.T.log_softmax(dim=1))) / 2
        return t**2 * kl


class TeacherProjections(nn.Module):
    """Maps student embeddings into each teacher's space: a learned bias-free linear map per teacher
    whose dimension differs, the identity otherwise; outputs are L2-normalised. One map serves text
    and image alike, keeping the two modalities aligned in the teacher's space."""

    def __init__(self, student_dim: int, teacher_dims: Sequence[int], *, learned: bool = False) -> None:
        super().__init__()
        self.student_dim, self.teacher_dims = int(student_dim), tuple(int(d) for d in teacher_dims)
        # learned: a map even between equal dimensions (the asymmetric search modes ship it with the
        # model, and two models' spaces of one size are still different spaces); it starts as the
        # identity there, the nearest map before any training
        self.maps = nn.ModuleList(
            nn.Identity() if d == self.student_dim and not learned else nn.Linear(self.student_dim, d, bias=False)
            for d in self.teacher_dims)
        if learned:
            with torch.no_grad():
                for d, layer in zip(self.teacher_dims, self.maps, strict=True):
                    if d == self.student_dim:
                        layer.weight.copy_(torch.eye(d))

    def weight(self, teacher_index: int) -> Tensor:
        """The map into teacher ``teacher_index``'s space as a [d_teacher, d_student] matrix."""
        layer = self.maps[teacher_index]
        if isinstance(layer, nn.Linear):
            return layer.weight
        return torch.eye(self.student_dim)

    def check(self, teachers: Sequence[TeacherOutput]) -> None:
        dims = tuple(t.dim for t in teachers)
        if dims != self.teacher_dims:
            raise ValueError(f"teachers have dimensions {dims} but the projections were built for "
                             f"{self.teacher_dims}: pass teacher_dims in the order the teachers are given")

    def forward(self, student: Tensor, teacher_index: int) -> Tensor:
        return F.normalize(self.maps[teacher_index](student), dim=-1)


class FeatureMSELoss(nn.Module):
    """Squared L2 distance between normalise(proj(student)) and the teacher's embedding, averaged over
    rows, text and image; weighted mean over teachers.

    Per row the distance is summed over dimensions (= 2 − 2·cos for unit vectors): the element-wise
    mean would shrink the term by 1/d and drown it next to CE under one shared weight.
    """

    def __init__(self, student_dim: int, teacher_dims: Sequence[int],
                 projections: TeacherProjections | None = None) -> None:
        super().__init__()
        self.projections = projections or TeacherProjections(student_dim, teacher_dims)

    def forward(self, student_text: Tensor, student_image: Tensor, teachers: Sequence[TeacherOutput]) -> Tensor:
        self.projections.check(teachers)
        total = student_text.new_zeros(())
        for k, (teacher, weight) in enumerate(zip(teachers, _teacher_weights(teachers), strict=True)):
            t_text, t_image = _teacher_embeddings(teacher, student_text)
            text_err = (self.projections(student_text, k) - t_text).pow(2).sum(-1).mean()
            image_err = (self.projections(student_image, k) - t_image).pow(2).sum(-1).mean()
            total = total + weight * (text_err + image_err) / 2
        return total


class ICLLoss(nn.Module):
    """Interactive contrastive learning (CLIP-KD, Yang et al. 2024): InfoNCE of student texts against
    teacher images and of student images against teacher texts, at the student's logit scale; the
    student is projected into each teacher's space (``projections`` may be shared with FeatureMSELoss)."""

    def __init__(self, student_dim: int, teacher_dims: Sequence[int],
                 projections: TeacherProjections | None = None) -> None:
        super().__init__()
        self.projections = projections or TeacherProjections(student_dim, teacher_dims)

    def forward(self, student_text: Tensor, student_image: Tensor, student_scale: Tensor | float,
                teachers: Sequence[TeacherOutput], image_ids: Tensor | None = None) -> Tensor:
        self.projections.check(teachers)
        mask = _same_image_mask(image_ids, student_text.shape[0], student_text.device)
        total = student_text.new_zeros(())
        for k, (teacher, weight) in enumerate(zip(teachers, _teacher_weights(teachers), strict=True)):
            t_text, t_image = _teacher_embeddings(teacher, student_text)
            s_text, s_image = self.projections(student_text, k), self.projections(student_image, k)
            text_to_image = _cross_entropy_rows(student_scale * s_text @ t_image.T, mask)
            image_to_text = _cross_entropy_rows(student_scale * s_image @ t_text.T, mask)
            total = total + weight * (text_to_image + image_to_text) / 2
        return total


class SimilarityMSELoss(nn.Module):
    """Element-wise MSE between the student's and each teacher's n × n cosine-similarity matrix
    (dimension-free, so no projection); weighted mean over teachers."""

    def forward(self, student_text: Tensor, student_image: Tensor, teachers: Sequence[TeacherOutput]) -> Tensor:
        similarity = student_text @ student_image.T
        total = similarity.new_zeros(())
        for teacher, weight in zip(teachers, _teacher_weights(teachers), strict=True):
            t_text, t_image = _teacher_embeddings(teacher, student_text)
            total = total + weight * (similarity - t_text @ t_image.T).pow(2).mean()
        return total


class AsymmetricModeLoss(nn.Module):
    """What the asymmetric search modes rely on, for the first teacher (the one whose space the
    saved projection maps into); each mode replaces one side of the teacher's search:

    * ``student-query`` (student text queries against teacher image vectors): the projected student
      text is pulled onto the teacher's text (2 − 2·cos: ``alignment``), ranked against the teacher's
      images (InfoNCE text → image: ``contrastive``, the caption's own image first), and its ranking
      of the batch's teacher images matched to the teacher's own text's (``kd``: T²·KL, the
      agreement with teacher-only search that overlap@k measures);
    * ``student-index`` (teacher text queries against projected student image vectors): the
      projected student image onto the teacher's image, the teacher's text ranked against the
      projected student images, and that ranking matched to the teacher's own.

    The cross-modal logits are the teacher's logit scale · cos / ``temperature``. The default
    weights (0.5, 0.5, 0) are the mean of alignment and InfoNCE. Shares the projection with
    ``feature_mse`` / ``icl`` when those are on."""

    def __init__(self, modes: Sequence[str], projections: TeacherProjections, *, alignment: float = 0.5,
                 contrastive: float = 0.5, kd: float = 0.0, temperature: float = 1.0) -> None:
        super().__init__()
        self.modes = tuple(modes)
        self.projections = projections
        self.alignment, self.contrastive, self.kd, self.temperature = alignment, contrastive, kd, temperature

    def _term(self, aligned: Tensor, target: Tensor, logits: Tensor, reference: Tensor,
              mask: Tensor | None) -> Tensor:
        """One mode's loss: ``aligned`` vs ``target`` rows; ``logits`` the mode's text → image
        logits, ``reference`` the teacher's own (both already / temperature)."""
        total = aligned.new_zeros(())
        if self.alignment:
            total = total + self.alignment * (aligned - target).pow(2).sum(-1).mean()
        if self.contrastive:
            total = total + self.contrastive * _cross_entropy_rows(logits, mask)
        if self.kd:
            p = _masked(reference, mask).softmax(dim=1)
            total = total + self.kd * self.temperature**2 * _kl_rows(p, _masked(logits, mask).log_softmax(dim=1))
        return total

    def forward(self, student_text: Tensor, student_image: Tensor, teachers: Sequence[TeacherOutput],
                image_ids: Tensor | None = None) -> dict[str, Tensor]:
        teacher = teachers[0]
        t_text, t_image = _teacher_embeddings(teacher, student_text)
        scale = torch.as_tensor(teacher.logit_scale, dtype=t_text.dtype, device=t_text.device).detach()
        scale = scale / self.temperature
        mask = _same_image_mask(image_ids, student_text.shape[0], student_text.device)
        reference = scale * t_text @ t_image.T  # the teacher-only search of the batch, text → image
        parts = {}
        if "student-query" in self.modes:
            s_text = self.projections(student_text, 0)
            parts["student-query"] = self._term(s_text, t_text, scale * s_text @ t_image.T, reference, mask)
        if "student-index" in self.modes:
            s_image = self.projections(student_image, 0)
            parts["student-index"] = self._term(s_image, t_image, scale * t_text @ s_image.T, reference, mask)
        return parts


def cross_space_distance(student_text: Tensor, student_image: Tensor, teacher_text: Tensor,
                         teacher_image: Tensor) -> dict[str, float]:
    """Mean squared distance (2 − 2·cos) between projected student vectors and the teacher's, per
    side: "text" is what student-query replaces, "image" what student-index replaces."""
    def distance(a: Tensor, b: Tensor) -> float:
        a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
        return float((a - b).pow(2).sum(-1).mean())

    return {"text": distance(student_text, teacher_text), "image": distance(student_image, teacher_image)}


@dataclass
class LossOutput:
    total: Tensor  # what to back-propagate
    parts: dict[str, Tensor]  # "ce" and one entry per KD type, detached for logging


_SCALED_KD = ("kl_divergence", "icl")  # KD terms that take the student's logit scale and image_ids


class DistillationLoss(nn.Module):
    """``(1 − w) · CE + w · Σ KD terms``; owns the learned projections, so optimise its parameters too.

    With ``use_distillation`` off the total is CE alone and teachers are not needed (may be ``[]``).
    ``temperature`` and ``distillation_weight`` may be changed between stages.
    """

    def __init__(self, *, kd_types: Sequence[str], distillation_weight: float, temperature: float,
                 use_distillation: bool, student_dim: int, teacher_dims: Sequence[int],
                 train_modes: Sequence[str] = (), mode_weights: dict[str, float] | None = None) -> None:
        super().__init__()
        kd_types = tuple(kd_types)
        unknown = [t for t in kd_types if t not in KD_LOSS_TYPES]
        if unknown:
            raise ValueError(f"unknown kd_types {unknown}: accepted are {', '.join(KD_LOSS_TYPES)}")
        if len(set(kd_types)) != len(kd_types):
            raise ValueError(f"kd_types lists a type more than once: {list(kd_types)}")
        if use_distillation and not kd_types:
            raise ValueError(f"use_distillation is on but kd_types is empty: give one or more of "
                             f"{', '.join(KD_LOSS_TYPES)}, or turn use_distillation off")
        self.use_distillation = bool(use_distillation)
        self.contrastive = ContrastiveLoss()
        self.kd = nn.ModuleDict()
        if self.use_distillation:
            # feature_mse and icl share one projection per teacher: both ask it to map the student's
            # space onto that teacher's, so one map gets twice the signal.
            train_modes = tuple(train_modes)
            shared = (TeacherProjections(student_dim, teacher_dims, learned=bool(train_modes))
                      if {"feature_mse", "icl"} & set(kd_types) or train_modes else None)
            build = {"kl_divergence": lambda: KLDivergenceLoss(temperature),
                     "feature_mse": lambda: FeatureMSELoss(student_dim, teacher_dims, shared),
                     "icl": lambda: ICLLoss(student_dim, teacher_dims, shared),
                     "similarity_mse": SimilarityMSELoss}
            for name in kd_types:
                self.kd[name] = build[name]()
            # the asymmetric search modes' terms: KD terms too (under w), logged one per mode
            # mode_weights: AsymmetricModeLoss's alignment / contrastive / kd / temperature
            self.modes = AsymmetricModeLoss(train_modes, shared, **(mode_weights or {})) if train_modes else None
            self.projections = shared
        else:
            self.modes, self.projections = None, None
        self.distillation_weight = distillation_weight
        self.temperature = temperature

    @property
    def kd_types(self) -> tuple[str, ...]:
        return tuple(self.kd.keys())

    @property
    def temperature(self) -> float:
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        if not value > 0:
            raise ValueError(f"temperature must be > 0; got {value}")
        self._temperature = float(value)
        if "kl_divergence" in self.kd:
            self.kd["kl_divergence"].temperature = self._temperature

    @property
    def distillation_weight(self) -> float:
        return self._distillation_weight

    @distillation_weight.setter
    def distillation_weight(self, value: float) -> None:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"distillation_weight must lie in [0, 1]; got {value}")
        self._distillation_weight = float(value)

    def forward(self, student_text: Tensor, student_image: Tensor, student_scale: Tensor | float,
                teachers: Sequence[TeacherOutput], image_ids: Tensor | None = None) -> LossOutput:
        # float32 whatever the autocast dtype: softmax over a large batch loses too much in bf16
        student_text, student_image = student_text.float(), student_image.float()
        ce = self.contrastive(student_text, student_image, student_scale, image_ids)
        parts = {"ce": ce.detach()}
        if not self.use_distillation:
            return LossOutput(total=ce, parts=parts)
        kd = ce.new_zeros(())
        for name, term in self.kd.items():
            if name in _SCALED_KD:
                value = term(student_text, student_image, student_scale, teachers, image_ids)
            else:
                value = term(student_text, student_image, teachers)
            parts[name] = value.detach()
            kd = kd + value
        if self.modes is not None:
            for mode, value in self.modes(student_text, student_image, teachers, image_ids).items():
                parts[mode] = value.detach()
                kd = kd + value
        w = self._distillation_weight
        return LossOutput(total=(1 - w) * ce + w * kd, parts=parts)
