"""Qwen3-VL-Embedding's image path as one fixed-size graph per image bucket.

The torch path gives every image its own patch grid, so the vision tower's position
embeddings and rotary angles, the number of image tokens in the prompt and the language
model's multimodal rotary positions all vary per image: no single graph holds them. With a
bucket policy (``vkd.models.image_buckets``) an image is resized to one of a few fixed sizes,
and for one size all of those are constants. ``QwenBucketImageTower`` computes them once,
with the model's own functions, from a prompt the encoder itself prepares for an image of
that size, and runs the whole image path batched:

    pixels [B, 3, H, W] -> patch embedding -> vision blocks (+ deepstack mergers) -> merger
    -> [prompt prefix | image tokens | prompt suffix] -> language model (deepstack added at
    the image tokens of its first layers) -> final norm of the last token -> L2-normalised

Every prompt of a bucket has the same tokens (an image-only input with the document
instruction), so there is no padding: the last real token is the last position and the
attention mask is the causal one.

The export splits that path where the bucket stops mattering: ``QwenBucketVision`` (one graph
per bucket) ends with the language model's inputs — the prompt's embeddings with the image
tokens in place, the rotary (cos, sin) of its multimodal positions and the DeepStack features
padded to the prompt's length — and ``QwenLanguageModel`` (one graph for every bucket, its
sequence axis dynamic, the causal mask built from it) takes them to the embedding. The
language model, most of the weights (~1.4 B of the 2B's parameters), is then stored once
instead of once per bucket. Differences from the torch code that do not change the
numbers beyond float rounding: the patch embedding's Conv3d over two identical frames is a
Conv2d with the two temporal kernel slices summed (what the processor's frame duplication
amounts to), and the vision attention runs per image as a batch rather than over a packed
sequence split by ``cu_seqlens``. The export's parity check compares the result with the
torch encoder under the same bucket policy.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from vkd.models.image_buckets import Bucket


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class QwenBucketImageTower(torch.nn.Module):
    """``forward(pixel_values [B, 3, H, W]) -> [B, dim]`` for images of one bucket size."""

    def __init__(self, encoder: Any, bucket: Bucket) -> None:
        super().__init__()
        from PIL import Image

        model = encoder.model
        self.visual = model.visual  # registered so their weights become initializers
        self.language_model = model.language_model
        self.width, self.height = bucket
        visual, vision_config = model.visual, model.config.vision_config
        self.patch = int(vision_config.patch_size)
        self.merge = int(vision_config.spatial_merge_size)
        self.grid_h, self.grid_w = self.height // self.patch, self.width // self.patch
        self.patches = self.grid_h * self.grid_w
        self.tokens = self.patches // self.merge**2
        self.vision_heads = int(visual.blocks[0].attn.num_heads)
        self.vision_dim = int(vision_config.hidden_size)
        self.text_dim = int(model.config.get_text_config().hidden_size)
        self.dim = int(encoder.dim)
        self.deepstack = [int(index) for index in visual.deepstack_visual_indexes]

        # The prompt exactly as the encoder builds it for an image of this size.
        inputs = encoder.preprocess([Image.new("RGB", bucket, (127, 127, 127))])
        grid = inputs["image_grid_thw"]
        if grid.tolist() != [[1, self.grid_h, self.grid_w]]:
            raise ValueError(f"bucket {self.width}x{self.height}: the encoder resized it to grid {grid.tolist()}, not "
                             f"[[1, {self.grid_h}, {self.grid_w}]]; is the encoder loaded with this bucket?")
        input_ids = inputs["input_ids"]
        image_positions = (input_ids[0] == encoder.processor.image_token_id).nonzero().flatten().tolist()
        start = image_positions[0]
        if image_positions != list(range(start, start + self.tokens)):
            raise ValueError(f"bucket {self.width}x{self.height}: image tokens are not one run of {self.tokens}")
        self.prefix_len, self.length = start, int(input_ids.shape[1])
        self.suffix_len = self.length - start - self.tokens

        with torch.no_grad():
            weight = visual.patch_embed.proj.weight  # [D, C, T, P, P]
            self.register_buffer("patch_weight", weight.sum(dim=2).detach().clone())
            self.register_buffer("patch_bias", visual.patch_embed.proj.bias.detach().clone())
            pos, cos_v, sin_v = self._vision_positions(visual, grid)
            self.register_buffer("pos_embeds", pos)
            self.register_buffer("vision_cos", cos_v)
            self.register_buffer("vision_sin", sin_v)

            embeds = model.get_input_embeddings()(input_ids)
            self.register_buffer("prefix", embeds[:, : self.prefix_len].detach().clone())
            self.register_buffer("suffix", embeds[:, self.prefix_len + self.tokens :].detach().clone())
            position_ids, _ = model.get_rope_index(
                input_ids, mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=grid,
                attention_mask=inputs["attention_mask"],
            )
            cos_t, sin_t = model.language_model.rotary_emb(embeds, position_ids)
            self.register_buffer("text_cos", cos_t.detach().clone())
            self.register_buffer("text_sin", sin_t.detach().clone())

    @staticmethod
    def _vision_positions(visual: Any, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The vision tower's interpolated position embeddings and rotary (cos, sin) for ``grid``,
        computed as its own forward computes them."""
        from transformers.vision_utils import (
            get_vision_interpolation_indices_and_weights,
            get_vision_position_ids,
        )

        indices, weights = get_vision_interpolation_indices_and_weights(
            grid, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
            align_corners=visual.interpolation_align_corners, spatial_merge_size=visual.config.spatial_merge_size,
        )
        pos = (visual.pos_embed(indices) * weights[:, :, None]).sum(1)
        position_ids = get_vision_position_ids(grid, visual.spatial_merge_size)
        cos, sin = visual.rotary_pos_emb(pos, position_ids)
        return pos.detach().clone(), cos.detach().float().clone(), sin.detach().float().clone()

    def _vision_block(self, block: Any, x: torch.Tensor) -> torch.Tensor:
        attn = block.attn
        head_dim = self.vision_dim // self.vision_heads
        qkv = attn.qkv(block.norm1(x)).reshape(-1, self.patches, 3, self.vision_heads, head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, N, head_dim]
        query = query * self.vision_cos + _rotate_half(query) * self.vision_sin
        key = key * self.vision_cos + _rotate_half(key) * self.vision_sin
        out = F.scaled_dot_product_attention(query, key, value, scale=attn.scaling)
        x = x + attn.proj(out.transpose(1, 2).reshape(-1, self.patches, self.vision_dim))
        return x + block.mlp(block.norm2(x))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.language(*self.vision(pixel_values))

    def vision(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(inputs_embeds [B, L, D], cos [B, L, d], sin [B, L, d]) and, when the model has
        DeepStack taps, their features [k, B, L, D], zero outside the image tokens."""
        m = self.merge
        x = F.conv2d(pixel_values, self.patch_weight, self.patch_bias, stride=self.patch)  # [B, D, gh, gw]
        # the processor's patch order: 2x2 merge blocks row by row, raster order inside a block
        x = x.reshape(-1, self.vision_dim, self.grid_h // m, m, self.grid_w // m, m)
        x = x.permute(0, 2, 4, 3, 5, 1).reshape(-1, self.patches, self.vision_dim) + self.pos_embeds
        deepstack = []
        for index, block in enumerate(self.visual.blocks):
            x = self._vision_block(block, x)
            if index in self.deepstack:
                merger = self.visual.deepstack_merger_list[self.deepstack.index(index)]
                deepstack.append(merger(x).reshape(-1, self.tokens, self.text_dim))
        image = self.visual.merger(x).reshape(-1, self.tokens, self.text_dim)
        batch = image.shape[0]
        hidden = torch.cat([self.prefix.expand(batch, -1, -1), image, self.suffix.expand(batch, -1, -1)], dim=1)
        # per image, not [1, L, d]: an output computed from the input, never a bare constant
        outputs = (hidden, self.text_cos.expand(batch, -1, -1), self.text_sin.expand(batch, -1, -1))
        if deepstack:
            # adding zeros outside the image tokens is exact, and keeps the language model
            # graph free of the bucket's token positions
            outputs += (torch.stack([F.pad(features, (0, 0, self.prefix_len, self.suffix_len))
                                     for features in deepstack]),)
        return outputs

    def language(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 deepstack: torch.Tensor | None = None) -> torch.Tensor:
        """The embedding [B, dim] from ``vision``'s outputs, for any sequence length."""
        # causal, no padding (every prompt of a bucket has the same length), sized from the input
        length = hidden.shape[1]
        blocked = torch.full((length, length), torch.finfo(hidden.dtype).min, dtype=hidden.dtype)
        causal_mask = torch.triu(blocked, diagonal=1)[None, None]
        for index, layer in enumerate(self.language_model.layers):
            hidden = layer(hidden, attention_mask=causal_mask, position_embeddings=(cos, sin))
            if deepstack is not None and index < deepstack.shape[0]:
                hidden = hidden + deepstack[index]
        last = self.language_model.norm(hidden[:, -1])
        return F.normalize(last[:, : self.dim].float(), dim=-1)

    @property
    def vision_outputs(self) -> list[str]:
        """Names of ``vision``'s outputs, which are the language model graph's inputs."""
        return ["inputs_embeds", "cos", "sin"] + (["deepstack"] if self.deepstack else [])


class QwenBucketVision(torch.nn.Module):
    """``forward(pixel_values) -> language model inputs`` for one bucket (``QwenBucketImageTower.vision``)."""

    def __init__(self, tower: QwenBucketImageTower) -> None:
        super().__init__()
        self.tower = tower

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.tower.vision(pixel_values)


class QwenLanguageModel(torch.nn.Module):
    """``forward(*language model inputs) -> [B, dim]``, shared by every bucket (``QwenBucketImageTower.language``)."""

    def __init__(self, tower: QwenBucketImageTower) -> None:
        super().__init__()
        self.language_model = tower.language_model  # its weights only, not the vision tower's
        self._language = tower.language

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self._language(*inputs)
