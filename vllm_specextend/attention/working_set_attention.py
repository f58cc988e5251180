"""The draft's attention over its working set, at compact positions.

As in the SpecExtend reference, the draft's keys are cached *un-rotated* at
their true slots; at read time each row's keys (its working set, in position
order, ending with the row's own query tokens) are rotated at compact
positions 0..n-1 and its queries at the positions of their own keys, so the
draft never sees a position past its working set, whatever the true one.

A "row" is one request, or one piece of a request's prefill (the glue cuts a
long prefill into pieces, each with its own sliding window of keys).
RoPE is the NeoX (rotate-half) form over the whole head, as Llama and Qwen use;
`cos_sin` is vLLM's rotary cache layout: [max_positions, head_dim] with the
cosines in the first half and the sines in the second.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from vllm_specextend.paged_cache import slots_of


def rotate(x: torch.Tensor, positions: torch.Tensor | slice,
           cos_sin: torch.Tensor) -> torch.Tensor:
    """NeoX RoPE of x [..., n, heads, head_dim] at positions [..., n] (a
    slice for a run of consecutive positions: a view, not a gather)."""
    half = x.shape[-1] // 2
    cos, sin = cos_sin[positions].float().split(half, dim=-1)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    x1, x2 = x.float().split(half, dim=-1)
    # Written in place into the two halves: no temporaries, no cat.
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    out1, out2 = out.split(half, dim=-1)
    torch.mul(x1, cos, out=out1).addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=out2).addcmul_(x1, sin)
    return out


def working_set_attention_reference(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim], un-rotated
    key_cache: torch.Tensor,  # [num_slots, num_kv_heads, head_dim], un-rotated
    value_cache: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [rows, max_blocks]
    query_start_loc: torch.Tensor,  # [rows + 1]
    key_positions: torch.Tensor,  # [rows, max_keys] true positions, in order
    num_keys: torch.Tensor,  # [rows]
    cos_sin: torch.Tensor,  # [max_positions, head_dim]
    block_size: int,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns the output [num_tokens, num_heads, head_dim] and the
    log-sum-exp [num_tokens, num_heads] of each query's attention."""
    num_tokens, num_heads, head_dim = query.shape
    group = num_heads // key_cache.shape[1]
    scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=torch.float32,
                      device=query.device)
    lse = torch.empty(num_tokens, num_heads, dtype=torch.float32, device=query.device)
    for row in range(block_tables.shape[0]):
        start, end = int(query_start_loc[row]), int(query_start_loc[row + 1])
        n = int(num_keys[row])
        assert n <= cos_sin.shape[0], "working set exceeds the draft's positions"
        slots = slots_of(block_tables[row], key_positions[row, :n], block_size)
        compact = torch.arange(n, device=query.device)
        keys = rotate(key_cache[slots], compact, cos_sin).repeat_interleave(group, dim=1)
        values = value_cache[slots].float().repeat_interleave(group, dim=1)
        query_compact = compact[n - (end - start):]
        q = rotate(query[start:end], query_compact, cos_sin)
        logits = torch.einsum("qhd,khd->hqk", q, keys) * scale
        causal = compact[None, :] <= query_compact[:, None]
        logits = logits.masked_fill(~causal, float("-inf"))
        lse[start:end] = logits.logsumexp(dim=-1).transpose(0, 1)
        out[start:end] = torch.einsum("hqk,khd->qhd", logits.softmax(dim=-1), values)
    return out.to(query.dtype), lse


# Decode rows (a few query tokens) take grouped matmuls; longer prefill
# pieces take SDPA, whose CPU kernel wins there.
_MATMUL_MAX_QUERY_LEN = 64


def working_set_attention_cpu(
    query, key_cache, value_cache, block_tables, query_start_loc, key_positions,
    num_keys, cos_sin, block_size, scale=None,
) -> torch.Tensor:
    """The reference's output (no log-sum-exp) for CPUs, where Triton does
    not run: the GQA group shares its keys instead of repeating them, and a
    row's causal mask is applied only when it has more than one query."""
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[1]
    group = num_heads // num_kv_heads
    scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=torch.float32,
                      device=query.device)
    starts, counts = query_start_loc.tolist(), num_keys.tolist()
    for row, n in enumerate(counts):
        start, end = starts[row], starts[row + 1]
        query_len = end - start
        if query_len == 0:
            continue
        slots = slots_of(block_tables[row], key_positions[row, :n], block_size)
        # index_select and slices: several times faster than indexing on CPU
        keys = rotate(key_cache.index_select(0, slots), slice(0, n), cos_sin).transpose(0, 1)
        values = value_cache.index_select(0, slots).float().transpose(0, 1)
        q = rotate(query[start:end], slice(n - query_len, n), cos_sin)
        # A single query (most decode rows) sees every key: no mask to build.
        if query_len > 1:
            compact = torch.arange(n, device=query.device)
            causal = compact[None, :] <= compact[n - query_len:, None]
        if query_len <= _MATMUL_MAX_QUERY_LEN:
            # [kv_heads, group * query_len, head_dim]: one matmul per KV head.
            grouped = q.view(query_len, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
            logits = torch.matmul(grouped.reshape(num_kv_heads, -1, head_dim),
                                  keys.transpose(1, 2)) * scale
            if query_len > 1:
                logits = logits.view(num_kv_heads, group, query_len, n).masked_fill(
                    ~causal, float("-inf")).view(num_kv_heads, -1, n)
            attended = torch.matmul(logits.softmax(dim=-1), values)
            out[start:end] = attended.view(num_kv_heads, group, query_len, head_dim).permute(
                2, 0, 1, 3).reshape(query_len, num_heads, head_dim)
        else:
            attended = F.scaled_dot_product_attention(
                q.transpose(0, 1), keys.repeat_interleave(group, dim=0),
                values.repeat_interleave(group, dim=0), attn_mask=causal, scale=scale)
            out[start:end] = attended.transpose(0, 1)
    return out.to(query.dtype)


@triton.jit
def _rotated_halves(x1, x2, cos, sin):
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def load_rotated_query(query_row, cos_sin_row, HALF: tl.constexpr):
    """A query's halves, rotated at the position whose cos/sin row is given."""
    half = tl.arange(0, HALF)
    q1 = tl.load(query_row + half).to(tl.float32)
    q2 = tl.load(query_row + HALF + half).to(tl.float32)
    return _rotated_halves(q1, q2, tl.load(cos_sin_row + half),
                           tl.load(cos_sin_row + HALF + half))


@triton.jit
def empty_softmax_state(HALF: tl.constexpr):
    """Running max, running sum and the two output halves of an online softmax."""
    zeros = tl.zeros((HALF,), dtype=tl.float32)
    return float("-inf"), 0.0, zeros, zeros


@triton.jit
def attend_rotated_block(q1, q2, key_cache, value_cache, slots, compact, valid, kv_head,
                         cos_sin, stride_slot, stride_kv_head, stride_cos, scale,
                         running_max, running_sum, acc1, acc2, HALF: tl.constexpr):
    """One online-softmax step of one query (halves q1, q2, rotated) over a
    block of un-rotated keys at `slots`, rotated at their `compact` positions."""
    half = tl.arange(0, HALF)
    k_base = key_cache + slots[:, None] * stride_slot + kv_head * stride_kv_head
    k1 = tl.load(k_base + half[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    k2 = tl.load(k_base + HALF + half[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    cos = tl.load(cos_sin + compact[:, None] * stride_cos + half[None, :],
                  mask=valid[:, None], other=1.0)
    sin = tl.load(cos_sin + compact[:, None] * stride_cos + HALF + half[None, :],
                  mask=valid[:, None], other=0.0)
    k1, k2 = _rotated_halves(k1, k2, cos, sin)
    logits = (tl.sum(k1 * q1[None, :], axis=1) + tl.sum(k2 * q2[None, :], axis=1)) * scale
    logits = tl.where(valid, logits, float("-inf"))
    new_max = tl.maximum(running_max, tl.max(logits, axis=0))
    correction = tl.exp(running_max - new_max)
    probs = tl.exp(logits - new_max)
    v_base = value_cache + slots[:, None] * stride_slot + kv_head * stride_kv_head
    v1 = tl.load(v_base + half[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    v2 = tl.load(v_base + HALF + half[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    acc1 = acc1 * correction + tl.sum(probs[:, None] * v1, axis=0)
    acc2 = acc2 * correction + tl.sum(probs[:, None] * v2, axis=0)
    running_sum = running_sum * correction + tl.sum(probs, axis=0)
    return new_max, running_sum, acc1, acc2


@triton.jit
def store_attention_row(out_row, lse_at, acc1, acc2, running_max, running_sum,
                        HALF: tl.constexpr):
    half = tl.arange(0, HALF)
    tl.store(out_row + half, (acc1 / running_sum).to(out_row.dtype.element_ty))
    tl.store(out_row + HALF + half, (acc2 / running_sum).to(out_row.dtype.element_ty))
    tl.store(lse_at, running_max + tl.log(running_sum))


@triton.jit
def _working_set_attention_kernel(
    query, key_cache, value_cache, block_tables, query_start_loc, token_rows,
    key_positions, num_keys, cos_sin, out, lse,
    stride_q_token, stride_q_head, stride_slot, stride_kv_head, stride_table,
    stride_keys, stride_cos, stride_o_token, stride_o_head,
    block_size, num_heads, group_size, scale,
    HALF: tl.constexpr, BLOCK_N: tl.constexpr,
):
    token = tl.program_id(0)
    head = tl.program_id(1)
    row = tl.load(token_rows + token)
    query_len = tl.load(query_start_loc + row + 1) - tl.load(query_start_loc + row)
    n = tl.load(num_keys + row)
    # The query sits at its own key's compact position; it sees keys <= it.
    query_pos = n - query_len + (token - tl.load(query_start_loc + row))
    q1, q2 = load_rotated_query(query + token * stride_q_token + head * stride_q_head,
                                cos_sin + query_pos * stride_cos, HALF)
    kv_head = head // group_size
    running_max, running_sum, acc1, acc2 = empty_softmax_state(HALF)
    for start in range(0, query_pos + 1, BLOCK_N):
        compact = start + tl.arange(0, BLOCK_N)
        valid = compact <= query_pos
        positions = tl.load(key_positions + row * stride_keys + compact, mask=valid, other=0)
        block = tl.load(block_tables + row * stride_table + positions // block_size,
                        mask=valid, other=0).to(tl.int64)
        slots = block * block_size + positions % block_size
        running_max, running_sum, acc1, acc2 = attend_rotated_block(
            q1, q2, key_cache, value_cache, slots, compact, valid, kv_head, cos_sin,
            stride_slot, stride_kv_head, stride_cos, scale,
            running_max, running_sum, acc1, acc2, HALF)
    store_attention_row(out + token * stride_o_token + head * stride_o_head,
                        lse + token * num_heads + head, acc1, acc2, running_max,
                        running_sum, HALF)


def token_rows_of(query_start_loc: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Row index of every query token (plan step: once per forward)."""
    tokens = torch.arange(num_tokens, device=query_start_loc.device)
    return (torch.searchsorted(query_start_loc[1:], tokens, right=True)).to(torch.int32)


def working_set_attention(
    query, key_cache, value_cache, block_tables, query_start_loc, key_positions,
    num_keys, cos_sin, block_size, scale=None, token_rows=None,
):
    """Triton version of `working_set_attention_reference` (same arguments;
    `token_rows` from `token_rows_of` may be passed in when reused)."""
    num_tokens, num_heads, head_dim = query.shape
    assert head_dim % 2 == 0 and triton.next_power_of_2(head_dim) == head_dim, (
        "the working-set kernel needs a power-of-two head_dim")
    assert key_cache.stride(2) == 1 and query.stride(2) == 1 and cos_sin.stride(1) == 1
    assert value_cache.stride() == key_cache.stride()
    scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
    if token_rows is None:
        token_rows = token_rows_of(query_start_loc, num_tokens)
    out = torch.empty_like(query)
    lse = torch.empty(num_tokens, num_heads, dtype=torch.float32, device=query.device)
    _working_set_attention_kernel[(num_tokens, num_heads)](
        query, key_cache, value_cache, block_tables, query_start_loc, token_rows,
        key_positions, num_keys, cos_sin, out, lse,
        query.stride(0), query.stride(1), key_cache.stride(0), key_cache.stride(1),
        block_tables.stride(0), key_positions.stride(0), cos_sin.stride(0),
        out.stride(0), out.stride(1), block_size, num_heads,
        num_heads // key_cache.shape[1], scale, HALF=head_dim // 2, BLOCK_N=32,
    )
    return out, lse
