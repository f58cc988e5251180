"""Chunk scores for Cross-model Retrieval (SpecExtend section 3.2).

The target's final-layer query of each request's last accepted token attends
over the whole context; the softmax is averaged over heads, and each chunk of
`chunk_size` tokens scores the mean of its tokens' probabilities.

The Triton kernel reads keys through each request's block table from a key
cache viewed as `[num_blocks, block_size, num_kv_heads, head_dim]` with any
strides: vLLM's paged layout on GPU, in place. Where the cache is packed
(vLLM's CPU build) the keys are gathered first and scored by
`chunk_scores_dense`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from vllm_specextend.attention.tiles import interpreted, tile_dot


def chunk_scores_reference(
    query: torch.Tensor,  # [batch, num_heads, head_dim], post-RoPE
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table: torch.Tensor,  # [batch, max_blocks]
    context_lens: torch.Tensor,  # [batch]
    block_size: int,
    chunk_size: int,
    scale: float | None = None,
) -> torch.Tensor:
    """[batch, max_chunks] float32; chunks past a request's context: -inf."""
    batch, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[2]
    scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
    max_len = int(context_lens.max())
    max_chunks = triton.cdiv(max_len, chunk_size)
    scores = torch.full((batch, max_chunks), float("-inf"), dtype=torch.float32,
                        device=query.device)
    for row in range(batch):
        length = int(context_lens[row])
        positions = torch.arange(length, device=query.device)
        blocks = block_table[row, positions // block_size].long()
        keys = key_cache[blocks, positions % block_size]
        keys = keys.float().repeat_interleave(num_heads // num_kv_heads, dim=1)
        logits = torch.einsum("hd,thd->ht", query[row].float(), keys) * scale
        probs = logits.softmax(dim=-1).mean(dim=0)  # [length]
        num_chunks = triton.cdiv(length, chunk_size)
        padded = torch.zeros(num_chunks * chunk_size, device=query.device)
        padded[:length] = probs
        chunk_lens = torch.full((num_chunks,), chunk_size, device=query.device)
        chunk_lens[-1] = length - (num_chunks - 1) * chunk_size
        scores[row, :num_chunks] = padded.view(num_chunks, chunk_size).sum(-1) / chunk_lens
    return scores


def chunk_scores_dense(
    query: torch.Tensor,  # [batch, num_heads, head_dim], post-RoPE
    keys: torch.Tensor,  # [batch, max_len, num_kv_heads, head_dim] in position order
    context_lens: torch.Tensor,  # [batch], at most max_len
    chunk_size: int,
    scale: float | None = None,
) -> torch.Tensor:
    """`chunk_scores_reference` over keys already gathered, for the whole
    batch at once (no per-row loop, no host sync): [batch, cdiv(max_len,
    chunk_size)] float32, -inf past each context."""
    batch, num_heads, head_dim = query.shape
    max_len, num_kv_heads = keys.shape[1], keys.shape[2]
    scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
    grouped = query.float().view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    logits = torch.einsum("bkgd,btkd->bkgt", grouped, keys.float()) * scale
    position = torch.arange(max_len, device=query.device)
    inside = position[None, :] < context_lens.long()[:, None]
    logits = logits.masked_fill(~inside[:, None, None, :], float("-inf"))
    probs = logits.softmax(dim=-1).mean(dim=(1, 2))  # [batch, max_len]
    num_chunks = triton.cdiv(max_len, chunk_size)
    padded = torch.nn.functional.pad(probs, (0, num_chunks * chunk_size - max_len))
    totals = padded.view(batch, num_chunks, chunk_size).sum(dim=-1)
    starts = torch.arange(num_chunks, device=query.device) * chunk_size
    chunk_lens = (context_lens.long()[:, None] - starts[None, :]).clamp(0, chunk_size)
    return torch.where(chunk_lens > 0, totals / chunk_lens.clamp(min=1), float("-inf"))


@triton.jit
def _load_key_tile(key_cache, block_table, row, positions, limit, kv_head, dims,
                   head_dim, stride_block, stride_token, stride_head, stride_table,
                   block_size):
    """Keys at `positions` (those below `limit`) through the block table, in
    the cache's dtype: [positions, HEAD_TILE]."""
    valid = positions < limit
    block = tl.load(block_table + row * stride_table + positions // block_size,
                    mask=valid, other=0).to(tl.int64)
    token = block * stride_block + (positions % block_size) * stride_token
    keys = tl.load(key_cache + token[:, None] + kv_head * stride_head + dims[None, :],
                   mask=valid[:, None] & (dims[None, :] < head_dim), other=0.0)
    return keys, valid


@triton.jit
def _group_queries(query, row, kv_head, group_size, dims, head_dim, stride_q_row,
                   stride_q_head, GROUP_TILE: tl.constexpr):
    """The queries of one KV head's group of query heads: [GROUP_TILE, HEAD_TILE]
    (rows past the group are zero), and their head indices."""
    member = tl.arange(0, GROUP_TILE)
    heads = kv_head * group_size + member
    in_group = member < group_size
    q = tl.load(query + row * stride_q_row + heads[:, None] * stride_q_head + dims[None, :],
                mask=in_group[:, None] & (dims[None, :] < head_dim), other=0.0)
    return q, heads, in_group


@triton.jit
def _softmax_lse_kernel(query, key_cache, block_table, context_lens, partial_max,
                        partial_sum, stride_q_row, stride_q_head, stride_block, stride_token,
                        stride_head, stride_table, block_size, group_size, num_heads, scale,
                        head_dim, split_len, HEAD_TILE: tl.constexpr,
                        GROUP_TILE: tl.constexpr, BLOCK_N: tl.constexpr,
                        IN_FLOAT32: tl.constexpr):
    """Pass 1, split over the context (FlashDecoding): for one request, one
    KV head's group of query heads and one split, the running max and sum
    of exp of the scaled logits; every key tile is read once for the group."""
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(context_lens + row)
    dims = tl.arange(0, HEAD_TILE)
    q, heads, in_group = _group_queries(query, row, kv_head, group_size, dims, head_dim,
                                        stride_q_row, stride_q_head, GROUP_TILE)
    running_max = tl.full((GROUP_TILE,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((GROUP_TILE,), dtype=tl.float32)
    split_end = tl.minimum(length, (split + 1) * split_len)
    for start in range(split * split_len, split_end, BLOCK_N):
        positions = start + tl.arange(0, BLOCK_N)
        keys, valid = _load_key_tile(key_cache, block_table, row, positions, split_end,
                                     kv_head, dims, head_dim, stride_block, stride_token,
                                     stride_head, stride_table, block_size)
        logits = tl.where(valid[None, :], tile_dot(q, tl.trans(keys), IN_FLOAT32) * scale, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(
            tl.exp(logits - new_max[:, None]), axis=1)
        running_max = new_max
    at = (row * num_heads + heads) * tl.num_programs(2) + split
    tl.store(partial_max + at, running_max, mask=in_group)
    tl.store(partial_sum + at, running_sum, mask=in_group)


@triton.jit
def _chunk_scores_kernel(query, key_cache, block_table, context_lens, lse, scores,
                         stride_q_row, stride_q_head, stride_block, stride_token, stride_head,
                         stride_table, stride_scores, block_size, num_heads, num_kv_heads,
                         group_size, scale, head_dim, chunk_size, HEAD_TILE: tl.constexpr,
                         GROUP_TILE: tl.constexpr, CHUNK_TILE: tl.constexpr,
                         IN_FLOAT32: tl.constexpr):
    """Pass 2: head-averaged probabilities, mean over each chunk's tokens; a
    chunk's keys are read once per KV head, for its whole group."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    length = tl.load(context_lens + row)
    start = chunk * chunk_size
    if start < length:
        dims = tl.arange(0, HEAD_TILE)
        positions = start + tl.arange(0, CHUNK_TILE)
        limit = tl.minimum(length, start + chunk_size)
        total = tl.zeros((CHUNK_TILE,), dtype=tl.float32)
        for kv_head in range(0, num_kv_heads):
            keys, valid = _load_key_tile(key_cache, block_table, row, positions, limit,
                                         kv_head, dims, head_dim, stride_block, stride_token,
                                         stride_head, stride_table, block_size)
            q, heads, in_group = _group_queries(query, row, kv_head, group_size, dims,
                                                head_dim, stride_q_row, stride_q_head,
                                                GROUP_TILE)
            head_lse = tl.load(lse + row * num_heads + heads, mask=in_group, other=0.0)
            probs = tl.exp(tile_dot(q, tl.trans(keys), IN_FLOAT32) * scale - head_lse[:, None])
            total += tl.sum(tl.where(in_group[:, None] & valid[None, :], probs, 0.0), axis=0)
        chunk_len = limit - start
        tl.store(scores + row * stride_scores + chunk,
                 tl.sum(total, axis=0) / (num_heads * chunk_len))


def chunk_pass_launch(chunk_size: int, head_tile: int) -> dict:
    """Tile and warps of `_chunk_scores_kernel`, which holds a whole chunk's
    keys: past 128 x 128 elements (chunks of 256 at head_dim 128 compile to
    232 registers a thread with 4 warps) it takes 8."""
    chunk_tile = max(16, triton.next_power_of_2(chunk_size))
    return dict(CHUNK_TILE=chunk_tile, num_warps=8 if chunk_tile * head_tile > 128 * 128 else 4)


def chunk_scores(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    block_table: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    chunk_size: int,
    max_len: int,
    scale: float | None = None,
    split_len: int = 2048,
) -> torch.Tensor:
    """Triton version of `chunk_scores_reference`. `max_len` bounds the
    context lengths (passed in so the call needs no host sync); the LSE
    pass splits the context into `split_len` pieces, one program each."""
    batch, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[2]
    group_size = num_heads // num_kv_heads
    assert key_cache.stride(3) == 1 and query.stride(2) == 1
    scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
    max_chunks = triton.cdiv(max_len, chunk_size)
    num_splits = triton.cdiv(max_len, split_len)
    partial_max = torch.empty((batch, num_heads, num_splits), dtype=torch.float32,
                              device=query.device)
    partial_sum = torch.empty_like(partial_max)
    scores = torch.full((batch, max_chunks), float("-inf"), dtype=torch.float32,
                        device=query.device)
    common = (query.stride(0), query.stride(1), key_cache.stride(0), key_cache.stride(1),
              key_cache.stride(2), block_table.stride(0))
    # tl.dot takes tiles of at least 16 in every dimension.
    tiles = dict(HEAD_TILE=max(16, triton.next_power_of_2(head_dim)),
                 GROUP_TILE=max(16, triton.next_power_of_2(group_size)),
                 IN_FLOAT32=interpreted())
    _softmax_lse_kernel[(batch, num_kv_heads, num_splits)](
        query, key_cache, block_table, context_lens, partial_max, partial_sum, *common,
        block_size, group_size, num_heads, scale, head_dim, split_len, BLOCK_N=64, **tiles)
    # Reduce the splits (the FlashDecoding second pass); an empty split adds 0.
    lse = torch.logsumexp(partial_max + partial_sum.log(), dim=-1)
    _chunk_scores_kernel[(batch, max_chunks)](
        query, key_cache, block_table, context_lens, lse, scores, *common,
        scores.stride(0), block_size, num_heads, num_kv_heads, group_size, scale,
        head_dim, chunk_size, **chunk_pass_launch(chunk_size, tiles["HEAD_TILE"]), **tiles)
    return scores
