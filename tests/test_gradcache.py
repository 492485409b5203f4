"""Gradient caching gives the same loss and gradients as back-propagating the full batch at once."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vkd.distill.gradcache import all_reduce_gradients, cached_step
from vkd.distill.losses import (
    KD_LOSS_TYPES,
    ContrastiveLoss,
    DistillationLoss,
    LossOutput,
    TeacherOutput,
    gather_with_local_grad,
)

N, STUDENT_DIM = 8, 8


class Tower(nn.Module):
    """A small encoder with dropout, so a wrong RNG replay would change the gradients."""

    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Dropout(dropout), nn.Linear(16, STUDENT_DIM))

    def forward(self, chunk: dict) -> torch.Tensor:
        return F.normalize(self.net(chunk["x"]), dim=-1)


class Setup:
    """Student towers, a learned logit scale, the full distillation loss and two teachers (dims 12, 8)."""

    def __init__(self, dropout: float, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.text, self.image = Tower(dropout), Tower(dropout)
        self.log_scale = nn.Parameter(torch.tensor(2.0))
        self.loss = DistillationLoss(kd_types=KD_LOSS_TYPES, distillation_weight=0.4, temperature=2.0,
                                     use_distillation=True, student_dim=STUDENT_DIM, teacher_dims=(12, 8))
        g = torch.Generator().manual_seed(seed + 1)
        self.text_x, self.image_x = torch.randn(N, 6, generator=g), torch.randn(N, 6, generator=g)
        self.teachers = [
            TeacherOutput(F.normalize(torch.randn(N, d, generator=g), dim=-1),
                          F.normalize(torch.randn(N, d, generator=g), dim=-1), logit_scale=20.0, weight=w)
            for d, w in ((12, 2.0), (8, 1.0))]
        self.image_ids = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5])  # captions sharing an image

    def parameters(self) -> list[nn.Parameter]:
        return [*self.text.parameters(), *self.image.parameters(), self.log_scale, *self.loss.parameters()]

    def chunks(self, x: torch.Tensor, sizes: tuple[int, ...] = (3, 3, 2)) -> list[dict]:
        return [{"x": part} for part in x.split(list(sizes))]

    def loss_fn(self, text: torch.Tensor, image: torch.Tensor) -> LossOutput:
        return self.loss(text, image, self.log_scale.exp(), self.teachers, self.image_ids)

    def grads(self) -> list[torch.Tensor]:
        grads = [p.grad.clone() for p in self.parameters()]
        for p in self.parameters():
            p.grad = None
        return grads


def assert_grads_close(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert e.abs().sum() > 0  # every parameter takes part, so equality is not vacuous
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_cached_step_matches_one_full_batch_backward() -> None:
    s = Setup(dropout=0.0)
    full = s.loss_fn(s.text({"x": s.text_x}), s.image({"x": s.image_x}))
    full.total.backward()
    expected = s.grads()

    cached = cached_step(s.text, s.image, s.chunks(s.text_x), s.chunks(s.image_x, (5, 3)), s.loss_fn)
    assert isinstance(cached, LossOutput) and not cached.total.requires_grad
    torch.testing.assert_close(cached.total, full.total.detach(), rtol=1e-5, atol=1e-5)
    assert set(cached.parts) == {"ce", *KD_LOSS_TYPES}
    for name, value in full.parts.items():
        torch.testing.assert_close(cached.parts[name], value, rtol=1e-5, atol=1e-5)
    assert_grads_close(s.grads(), expected)


def test_cached_step_replays_dropout_exactly() -> None:
    s = Setup(dropout=0.3)
    assert not torch.allclose(s.text({"x": s.text_x}), s.text({"x": s.text_x}))  # dropout is active

    # reference: the same chunks embedded in the same order from the same seed, all in one graph
    torch.manual_seed(123)
    text = torch.cat([s.text(c) for c in s.chunks(s.text_x)])
    image = torch.cat([s.image(c) for c in s.chunks(s.image_x)])
    full = s.loss_fn(text, image)
    full.total.backward()
    expected = s.grads()
    after_reference = torch.rand(3)

    torch.manual_seed(123)
    cached = cached_step(s.text, s.image, s.chunks(s.text_x), s.chunks(s.image_x), s.loss_fn)
    torch.testing.assert_close(cached.total, full.total.detach(), rtol=1e-5, atol=1e-5)
    assert_grads_close(s.grads(), expected)
    # the global RNG continues as if every chunk had been embedded once
    torch.testing.assert_close(torch.rand(3), after_reference)


def test_cached_step_accepts_a_plain_tensor_loss_and_enters_no_sync_for_all_but_the_last_backward() -> None:
    s = Setup(dropout=0.0)
    ce = ContrastiveLoss()

    def loss_fn(text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return ce(text, image, s.log_scale.exp())

    loss_fn(s.text({"x": s.text_x}), s.image({"x": s.image_x})).backward()
    expected = [p.grad.clone() for p in (*s.text.parameters(), *s.image.parameters(), s.log_scale)]
    for p in s.parameters():
        p.grad = None

    entered = []

    @contextmanager
    def no_sync() -> Iterator[None]:
        entered.append(True)
        yield

    value = cached_step(s.text, s.image, s.chunks(s.text_x), s.chunks(s.image_x, (4, 4)), loss_fn, no_sync=no_sync)
    assert isinstance(value, torch.Tensor) and not value.requires_grad
    assert len(entered) == 3 + 2 - 1
    assert_grads_close([p.grad for p in (*s.text.parameters(), *s.image.parameters(), s.log_scale)], expected)


def _ddp_worker(rank: int, world: int, init_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        s = Setup(dropout=0.0)  # same seed: same weights and data on every rank
        s.loss_fn(s.text({"x": s.text_x}), s.image({"x": s.image_x})).total.backward()
        reference = s.grads()  # one process, the whole batch
        n_tower = len([*s.text.parameters(), *s.image.parameters()])
        # each rank's encoder gradient is that of the global loss through its own rows;
        # averaged over ranks that is 1/world of the full gradient, while the loss's own
        # parameters (scale, projections) see the whole gathered batch on every rank
        expected = [g / world if i < n_tower else g for i, g in enumerate(reference)]
        half = N // world
        local = slice(rank * half, (rank + 1) * half)

        def loss_fn(text: torch.Tensor, image: torch.Tensor) -> LossOutput:
            return s.loss_fn(gather_with_local_grad(text), gather_with_local_grad(image))

        # 1) plain modules, the whole step unsynchronised, gradients averaged afterwards
        cached_step(s.text, s.image, s.chunks(s.text_x[local], (3, 1)), s.chunks(s.image_x[local], (2, 2)), loss_fn)
        all_reduce_gradients(s.parameters())
        assert_grads_close(s.grads(), expected)

        # 2) both towers in one DDP module, synchronised at the last backward only. It runs in a
        # function of its own so that DDP's reducer (kept alive by the autograd hooks it puts on
        # the parameters) is unreachable and collected before the process group goes; otherwise
        # a rank can abort at exit ("terminate called without an active exception").
        _ddp_route(s, local, loss_fn, expected[:n_tower])
        s = None  # the towers' parameters carry the reducer's hooks
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _ddp_route(s: Setup, local: slice, loss_fn, expected: list[torch.Tensor]) -> None:
    from torch.nn.parallel import DistributedDataParallel

    towers = nn.ModuleDict({"text": s.text, "image": s.image})

    class Both(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.towers = towers

        def forward(self, kind: str, chunk: dict) -> torch.Tensor:
            return self.towers[kind](chunk)

    ddp = DistributedDataParallel(Both(), find_unused_parameters=True)
    cached_step(lambda c: ddp("text", c), lambda c: ddp("image", c), s.chunks(s.text_x[local], (3, 1)),
                s.chunks(s.image_x[local], (2, 2)), loss_fn, no_sync=ddp.no_sync)
    assert_grads_close([p.grad for p in (*s.text.parameters(), *s.image.parameters())], expected)


@pytest.mark.slow
def test_cached_step_across_two_processes_matches_the_single_process_gradient(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init")), nprocs=2, join=True)
