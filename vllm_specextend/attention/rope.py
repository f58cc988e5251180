"""Moving rotary-embedded vectors to other positions.

RoPE composes: a key rotated for position p becomes the key rotated for
position q with one more rotation, by q - p. That is how the working cache
lays selected keys out at compact positions (from their true positions in
vLLM's cache), and how the draft's queries of a request with a working
cache reach their compact positions.

NeoX (rotate-half) form over the whole head, as Llama and Qwen use;
`cos_sin` is vLLM's rotary cache layout, [positions, head_dim] with the
cosines in the first half and the sines in the second, in float32.
"""

from __future__ import annotations

import torch


def rotary_table(rotary_embedding, num_positions: int) -> torch.Tensor:
    """A float32 `cos_sin` table of `num_positions` rows for a vLLM rotary
    embedding (its own frequencies and scaling), whatever its own length."""
    saved = rotary_embedding.max_position_embeddings
    try:
        rotary_embedding.max_position_embeddings = num_positions
        return rotary_embedding._compute_cos_sin_cache().float()
    finally:
        rotary_embedding.max_position_embeddings = saved


def backward_table(cos_sin: torch.Tensor) -> torch.Tensor:
    """The table whose row d rotates *backwards* by d positions (sines
    negated): applying RoPE at "position" d with it moves a vector from
    position p to p - d, so one ordinary fused RoPE kernel does the move."""
    cos, sin = cos_sin.chunk(2, dim=-1)
    return torch.cat((cos, -sin), dim=-1)


def rotate_by(x: torch.Tensor, delta: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """x [..., n, heads, head_dim] rotated by `delta` [..., n] positions
    (negative: backwards), in float32, returned in x's dtype."""
    half = x.shape[-1] // 2
    cos, sin = cos_sin[delta.abs()].split(half, dim=-1)
    cos = cos.unsqueeze(-2)
    sin = (sin * delta.sign().unsqueeze(-1)).unsqueeze(-2)
    x1, x2 = x.float().split(half, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
