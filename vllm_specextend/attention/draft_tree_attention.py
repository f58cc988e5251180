"""The draft's attention while it grows a tree, inside its working set.

One draft forward scores one tree layer: its queries are the newest layer's
nodes. A node at depth d sees its request's context (the working set in
position order, ending with the root: the last accepted token) and its path
(its ancestors at depths 1..d-1 and itself), and nothing of other branches.
At compact positions the context fills 0..m-1 and the path m..m+d-1, so each
node attends exactly as the chain of its path tokens would, and never past
m + max_depth - 1 positions.

Keys and values are the draft's un-rotated mirrors, addressed by slot
(`[num_slots, num_kv_heads, head_dim]`): the plan step turns the context's
positions and the nodes' scratch slots into slots once per forward, and
every layer reuses them. RoPE is NeoX over the whole head, as in
`working_set_attention`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from vllm_specextend.attention.hybrid_tree_attention import merge_attention_states
from vllm_specextend.attention.working_set_attention import (
    attend_rotated_block,
    empty_softmax_state,
    load_rotated_query,
    rotate,
    store_attention_row,
    token_rows_of,
)


def draft_tree_attention_reference(
    query: torch.Tensor,  # [num_queries, num_heads, head_dim] un-rotated
    key_mirror: torch.Tensor,  # [num_slots, num_kv_heads, head_dim] un-rotated
    value_mirror: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]
    context_slots: torch.Tensor,  # [batch, max_context] in position order
    context_lens: torch.Tensor,  # [batch]
    query_start_loc: torch.Tensor,  # [batch + 1]: each request's query nodes
    path_slots: torch.Tensor,  # [num_queries, max_depth]: depth 1 .. the node
    path_lens: torch.Tensor,  # [num_queries]: the node's depth
    cos_sin: torch.Tensor,  # [max_positions, head_dim]
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One softmax per node over its context + path: output and log-sum-exp."""
    num_queries, num_heads, head_dim = query.shape
    group = num_heads // key_mirror.shape[1]
    scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
    out = torch.empty(query.shape, dtype=torch.float32, device=query.device)
    lse = torch.empty((num_queries, num_heads), dtype=torch.float32, device=query.device)
    for row in range(context_slots.shape[0]):
        m = int(context_lens[row])
        for node in range(int(query_start_loc[row]), int(query_start_loc[row + 1])):
            depth = int(path_lens[node])
            slots = torch.cat((context_slots[row, :m], path_slots[node, :depth]))
            compact = torch.arange(m + depth, device=query.device)
            keys = rotate(key_mirror[slots], compact, cos_sin).repeat_interleave(group, dim=1)
            values = value_mirror[slots].float().repeat_interleave(group, dim=1)
            q = rotate(query[node : node + 1], compact[-1:], cos_sin)
            logits = torch.einsum("qhd,khd->hqk", q, keys)[:, 0] * scale
            lse[node] = logits.logsumexp(dim=-1)
            out[node] = torch.einsum("hk,khd->hd", logits.softmax(dim=-1), values)
    return out.to(query.dtype), lse


def draft_tree_attention_cpu(
    query, key_mirror, value_mirror, context_slots, context_lens, query_start_loc,
    path_slots, path_lens, cos_sin, scale=None,
) -> torch.Tensor:
    """The reference's output for CPUs, where Triton does not run. A
    request's nodes share its context, so the context part is one grouped
    matmul over all of them (no mask: every node comes after it); the short
    paths go apart; the two parts merge by LSE."""
    num_heads, head_dim = query.shape[1:]
    num_kv_heads = key_mirror.shape[1]
    group = num_heads // num_kv_heads
    scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
    out = torch.empty(query.shape, dtype=torch.float32, device=query.device)
    starts, lens = query_start_loc.tolist(), context_lens.tolist()
    for row, m in enumerate(lens):
        start, end = starts[row], starts[row + 1]
        if end == start:
            continue
        nodes = end - start
        depths = path_lens[start:end].long()
        q = rotate(query[start:end], m - 1 + depths, cos_sin)
        grouped = q.view(nodes, num_kv_heads, group, head_dim)

        # Context part: [kv_heads, group * nodes, m].
        slots = context_slots[row, :m]
        keys = rotate(key_mirror.index_select(0, slots), slice(0, m), cos_sin).transpose(0, 1)
        values = value_mirror.index_select(0, slots).float().transpose(0, 1)
        logits = torch.matmul(grouped.permute(1, 2, 0, 3).reshape(num_kv_heads, -1, head_dim),
                              keys.transpose(1, 2)).mul_(scale)
        context_lse = logits.logsumexp(dim=-1)
        context_out = torch.matmul(logits.softmax(dim=-1), values)

        # Path part: [nodes, kv_heads, group, depth].
        max_depth = int(depths.max())
        slots = path_slots[start:end, :max_depth]
        steps = torch.arange(max_depth, device=query.device)
        path_keys = rotate(key_mirror[slots], m + steps.expand(nodes, -1), cos_sin)
        path_values = value_mirror[slots].float()
        path_logits = torch.einsum("nkgd,njkd->nkgj", grouped, path_keys).mul_(scale)
        on_path = (steps[None, :] < depths[:, None])[:, None, None, :]
        path_logits = path_logits.masked_fill(~on_path, float("-inf"))
        path_lse = path_logits.logsumexp(dim=-1)
        path_out = torch.einsum("nkgj,njkd->nkgd", path_logits.softmax(dim=-1), path_values)

        # Back to [nodes, heads, ...] and merge.
        context_out = context_out.view(num_kv_heads, group, nodes, head_dim).permute(2, 0, 1, 3)
        context_lse = context_lse.view(num_kv_heads, group, nodes).permute(2, 0, 1)
        merged, _ = merge_attention_states(context_out, context_lse, path_out, path_lse)
        out[start:end] = merged.reshape(nodes, num_heads, head_dim)
    return out.to(query.dtype)


@triton.jit
def _draft_tree_attention_kernel(
    query, key_mirror, value_mirror, context_slots, context_lens, token_rows,
    path_slots, path_lens, cos_sin, out, lse,
    stride_q_token, stride_q_head, stride_slot, stride_kv_head, stride_context,
    stride_path, stride_cos, stride_o_token, stride_o_head,
    num_heads, group_size, scale,
    HALF: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One node, one head: online softmax over the context, then the path."""
    node = tl.program_id(0)
    head = tl.program_id(1)
    row = tl.load(token_rows + node)
    m = tl.load(context_lens + row).to(tl.int32)
    depth = tl.load(path_lens + node).to(tl.int32)
    query_pos = m - 1 + depth
    q1, q2 = load_rotated_query(query + node * stride_q_token + head * stride_q_head,
                                cos_sin + query_pos * stride_cos, HALF)
    kv_head = head // group_size
    running_max, running_sum, acc1, acc2 = empty_softmax_state(HALF)
    # The context in blocks of BLOCK_N, then the path as one last block.
    num_context_blocks = tl.cdiv(m, BLOCK_N)
    for block in range(0, num_context_blocks + 1):
        if block < num_context_blocks:
            compact = block * BLOCK_N + tl.arange(0, BLOCK_N)
            valid = compact < m
            slots = tl.load(context_slots + row * stride_context + compact,
                            mask=valid, other=0).to(tl.int64)
        else:
            step = tl.arange(0, BLOCK_N)
            valid = step < depth
            compact = m + step
            slots = tl.load(path_slots + node * stride_path + step, mask=valid,
                            other=0).to(tl.int64)
        running_max, running_sum, acc1, acc2 = attend_rotated_block(
            q1, q2, key_mirror, value_mirror, slots, compact, valid, kv_head, cos_sin,
            stride_slot, stride_kv_head, stride_cos, scale,
            running_max, running_sum, acc1, acc2, HALF)
    store_attention_row(out + node * stride_o_token + head * stride_o_head,
                        lse + node * num_heads + head, acc1, acc2, running_max,
                        running_sum, HALF)


def draft_tree_attention(
    query, key_mirror, value_mirror, context_slots, context_lens, query_start_loc,
    path_slots, path_lens, cos_sin, scale=None,
):
    """Triton version of `draft_tree_attention_reference` (same arguments)."""
    num_queries, num_heads, head_dim = query.shape
    assert head_dim % 2 == 0 and triton.next_power_of_2(head_dim) == head_dim, (
        "the draft tree kernel needs a power-of-two head_dim")
    assert key_mirror.stride(2) == 1 and query.stride(2) == 1 and cos_sin.stride(1) == 1
    assert value_mirror.stride() == key_mirror.stride()
    max_depth = path_slots.shape[1]
    block_n = 32
    assert max_depth <= block_n, f"paths of depth {max_depth}: at most {block_n}"
    scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
    out = torch.empty_like(query)
    lse = torch.empty((num_queries, num_heads), dtype=torch.float32, device=query.device)
    _draft_tree_attention_kernel[(num_queries, num_heads)](
        query, key_mirror, value_mirror, context_slots, context_lens,
        token_rows_of(query_start_loc, num_queries), path_slots, path_lens, cos_sin, out, lse,
        query.stride(0), query.stride(1), key_mirror.stride(0), key_mirror.stride(1),
        context_slots.stride(0), path_slots.stride(0), cos_sin.stride(0),
        out.stride(0), out.stride(1), num_heads, num_heads // key_mirror.shape[1], scale,
        HALF=head_dim // 2, BLOCK_N=block_n,
    )
    return out, lse
