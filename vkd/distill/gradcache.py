"""Gradient caching (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup"): the exact gradient of a full-batch contrastive loss with only one chunk's
activations in memory at a time.

The loss couples every pair with every other, so it cannot be split into per-chunk losses; but the
encoder's gradient factors through the embeddings, dL/dθ = Σ_chunks dL/de_chunk · de_chunk/dθ, and
the embeddings of a large batch are small. So:

1. embed every chunk without a graph, concatenate, and treat the result as leaf tensors;
   compute the loss on the full batch (every term, KD included, exactly as without caching) and
   back-propagate it to get dL/de — parameters inside the loss (learned projections, a logit scale
   passed in through ``loss_fn``) receive their gradients here;
2. embed each chunk again, now with a graph, and back-propagate dL/de_chunk into the encoder.

Pass 2 must see the same dropout masks (LoRA dropout included) as pass 1, else dL/de would belong
to different embeddings: each chunk's CPU and CUDA RNG states are recorded before its pass-1 forward
and restored before its pass-2 forward. Pass 2 runs inside ``torch.random.fork_rng``, so the
global RNG afterwards is where pass 1 left it, as if each chunk had been embedded once.

DDP: every pass-2 forward + backward but the last runs inside ``no_sync()`` (pass
``no_sync=ddp_model.no_sync``), so gradients are all-reduced once, at the last backward. Pass 1 runs
under ``no_grad`` and its backward stops at the leaf embeddings, so it never reaches DDP's hooks.
DDP reduces a parameter at that last backward only if the last forward uses it, or the module was
built with ``find_unused_parameters=True`` on a torch with pytorch#124193 (2.4+): with both towers
in one DDP module, the last forward (an image chunk) leaves the text tower's parameters unused. The
layout-independent alternative: wrap the whole step in ``no_sync()`` yourself, leave ``no_sync``
unset, and call ``all_reduce_gradients`` afterwards. Either way, gather the embeddings inside
``loss_fn`` with ``vkd.distill.losses.gather_with_local_grad`` so the loss covers the global batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from vkd.distill.losses import LossOutput


@dataclass
class _RngState:
    cpu: Tensor
    cuda: list[Tensor]

    @classmethod
    def capture(cls) -> _RngState:
        # only when CUDA is already in use: capturing would otherwise initialise it for a CPU run
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
        return cls(torch.get_rng_state(), cuda)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda:
            torch.cuda.set_rng_state_all(self.cuda)


def _embed_without_graph(embed: Callable[[dict], Tensor], chunks: Sequence[dict]) -> tuple[list[Tensor], list[_RngState]]:
    embeddings, states = [], []
    for chunk in chunks:
        states.append(_RngState.capture())
        with torch.no_grad():
            embeddings.append(embed(chunk))
    return embeddings, states


def cached_step(
    embed_text: Callable[[dict], Tensor],
    embed_image: Callable[[dict], Tensor],
    text_chunks: Sequence[dict],
    image_chunks: Sequence[dict],
    loss_fn: Callable[[Tensor, Tensor], LossOutput | Tensor],
    *,
    no_sync: Callable[[], AbstractContextManager[object]] | None = None,
) -> LossOutput | Tensor:
    """Accumulate into ``.grad`` the gradient of ``loss_fn(all text embeddings, all image embeddings)``,
    embedding the chunks one at a time; returns the loss output, detached.

    ``embed_*(chunk)`` runs the encoder on one chunk (a dict of model inputs) and returns its
    embeddings; the chunks' rows concatenate, in order, to the full batch. ``no_sync``: a context
    manager factory (``ddp_model.no_sync``) entered around every pass-2 forward+backward but the last.
    The caller zeroes gradients and steps the optimiser.
    """
    if not text_chunks or not image_chunks:
        raise ValueError(f"cached_step needs at least one text and one image chunk; got "
                         f"{len(text_chunks)} text and {len(image_chunks)} image chunks")
    text_embs, text_states = _embed_without_graph(embed_text, text_chunks)
    image_embs, image_states = _embed_without_graph(embed_image, image_chunks)
    text_all = torch.cat(text_embs).requires_grad_()
    image_all = torch.cat(image_embs).requires_grad_()

    output = loss_fn(text_all, image_all)
    total = output.total if isinstance(output, LossOutput) else output
    total.backward()

    jobs = []
    for embed, chunks, embs, states, leaf in ((embed_text, text_chunks, text_embs, text_states, text_all),
                                              (embed_image, image_chunks, image_embs, image_states, image_all)):
        grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)  # a loss blind to one modality
        jobs += zip([embed] * len(chunks), chunks, states, grad.split([e.shape[0] for e in embs]), strict=True)

    cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda_devices):
        for i, (embed, chunk, state, grad) in enumerate(jobs):
            sync = no_sync is None or i == len(jobs) - 1
            with nullcontext() if sync else no_sync():
                state.restore()
                embedding = embed(chunk)
                if embedding.shape != grad.shape:
                    raise RuntimeError(f"chunk {i} embeds to shape {tuple(embedding.shape)} on the second pass but "
                                       f"{tuple(grad.shape)} on the first: embed functions must be deterministic in shape")
                embedding.backward(grad.to(embedding.dtype))

    if isinstance(output, LossOutput):
        return LossOutput(total=output.total.detach(), parts={k: v.detach() for k, v in output.parts.items()})
    return output.detach()


def all_reduce_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Average ``.grad`` of ``parameters`` over all ranks (a missing grad counts as zeros), for steps
    run wholly under ``no_sync``; a no-op outside torch.distributed or with one rank.

    Every rank must pass the same parameters in the same order."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    params = [p for p in parameters if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    # one collective per (device, dtype) group rather than one per tensor
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for p in params:
        groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    world = dist.get_world_size()
    for grads in groups.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world
        for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            g.copy_(part.view_as(g))
