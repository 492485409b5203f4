"""Distillation: losses, gradient caching, teachers (cache, EMA), LoRA and the trainer.

``vkd.distill.distill(config) -> DistillResult`` is the library entry point; ``vkd distill``
the command. Names load on first use, so importing this package (as ``vkd --help`` does)
does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vkd._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "distill": "vkd.distill.trainer",
    "DistillResult": "vkd.distill.trainer",
    "Trainer": "vkd.distill.trainer",
    "latest_checkpoint": "vkd.distill.trainer",
    "DistillationLoss": "vkd.distill.losses",
    "TeacherOutput": "vkd.distill.losses",
    "TeacherCache": "vkd.distill.teacher",
    "EmaTeacher": "vkd.distill.teacher",
}

__all__ = [
    "DistillResult",
    "DistillationLoss",
    "EmaTeacher",
    "TeacherCache",
    "TeacherOutput",
    "Trainer",
    "distill",
    "latest_checkpoint",
]

if TYPE_CHECKING:  # pragma: no cover
    from vkd.distill.losses import DistillationLoss, TeacherOutput
    from vkd.distill.teacher import EmaTeacher, TeacherCache
    from vkd.distill.trainer import DistillResult, Trainer, distill, latest_checkpoint


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
