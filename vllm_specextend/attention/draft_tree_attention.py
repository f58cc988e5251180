"""The draft's attention while it grows a tree.

One draft forward scores one tree layer: its queries are the newest layer's
nodes. A node at depth d sees its request's context (what the root, the
last accepted token, attended to: its working cache, or its window of
vLLM's cache, ending with the root) and its path (its ancestors at depths
1..d-1 and itself), and nothing of other branches. Queries and keys are
already rotated for their attention positions (the context at 0..m-1 or at
true positions, a node at the root's plus its depth), so each node attends
exactly as the chain of its path tokens would.

Inputs are gathered per forward: the context as [batch, max_context,
num_kv_heads, head_dim] with its lengths, the paths as [nodes, max_depth,
num_kv_heads, head_dim] with theirs.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from vllm_specextend.attention.hybrid_tree_attention import merge_attention_states


def draft_tree_attention_reference(
    query: torch.Tensor,  # [num_queries, num_heads, head_dim]
    context_keys: torch.Tensor,  # [batch, max_context, num_kv_heads, head_dim]
    context_values: torch.Tensor,
    context_lens: torch.Tensor,  # [batch]
    query_start_loc: torch.Tensor,  # [batch + 1]: each request's query nodes
    path_keys: torch.Tensor,  # [num_queries, max_depth, num_kv_heads, head_dim]
    path_values: torch.Tensor,
    path_lens: torch.Tensor,  # [num_queries]: the node's depth
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One softmax per node over its context + path: output and log-sum-exp."""
    num_queries, num_heads, head_dim = query.shape
    group = num_heads // context_keys.shape[2]
    scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
    out = torch.empty(query.shape, dtype=torch.float32, device=query.device)
    lse = torch.empty((num_queries, num_heads), dtype=torch.float32, device=query.device)
    for row in range(context_keys.shape[0]):
        m = int(context_lens[row])
        for node in range(int(query_start_loc[row]), int(query_start_loc[row + 1])):
            depth = int(path_lens[node])
            keys = torch.cat((context_keys[row, :m], path_keys[node, :depth])).float()
            values = torch.cat((context_values[row, :m], path_values[node, :depth])).float()
            logits = torch.einsum("hd,khd->hk", query[node].float(),
                                  keys.repeat_interleave(group, dim=1)) * scale
            lse[node] = logits.logsumexp(dim=-1)
            out[node] = torch.einsum("hk,khd->hd", logits.softmax(dim=-1),
                                     values.repeat_interleave(group, dim=1))
    return out.to(query.dtype), lse


def draft_tree_attention_cpu(
    query, context_keys, context_values, context_lens, query_start_loc, path_keys,
    path_values, path_lens, scale=None,
) -> torch.Tensor:
    """The reference's output for CPUs, where Triton does not run. A
    request's nodes share its context, so the context part is one grouped
    matmul over all of them (no mask: every node comes after it); the short
    paths go apart; the two parts merge by LSE."""
    num_heads, head_dim = query.shape[1:]
    num_kv_heads = context_keys.shape[2]
    group = num_heads // num_kv_heads
    scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
    out = torch.empty(query.shape, dtype=torch.float32, device=query.device)
    starts, lens = query_start_loc.tolist(), context_lens.tolist()
    for row, m in enumerate(lens):
        start, end = starts[row], starts[row + 1]
        if end == start:
            continue
        nodes = end - start
        grouped = query[start:end].float().view(nodes, num_kv_heads, group, head_dim)

        # Context part: [kv_heads, group * nodes, m].
        keys = context_keys[row, :m].float().transpose(0, 1)
        values = context_values[row, :m].float().transpose(0, 1)
        logits = torch.matmul(grouped.permute(1, 2, 0, 3).reshape(num_kv_heads, -1, head_dim),
                              keys.transpose(1, 2)).mul_(scale)
        context_lse = logits.logsumexp(dim=-1)
        context_out = torch.matmul(logits.softmax(dim=-1), values)

        # Path part: [nodes, kv_heads, group, depth].
        depths = path_lens[start:end].long()
        steps = torch.arange(path_keys.shape[1], device=query.device)
        path_logits = torch.einsum("nkgd,njkd->nkgj", grouped,
                                   path_keys[start:end].float()).mul_(scale)
        on_path = (steps[None, :] < depths[:, None])[:, None, None, :]
        path_logits = path_logits.masked_fill(~on_path, float("-inf"))
        path_lse = path_logits.logsumexp(dim=-1)
        path_out = torch.einsum("nkgj,njkd->nkgd", path_logits.softmax(dim=-1),
                                path_values[start:end].float())

        # Back to [nodes, heads, ...] and merge.
        context_out = context_out.view(num_kv_heads, group, nodes, head_dim).permute(2, 0, 1, 3)
        context_lse = context_lse.view(num_kv_heads, group, nodes).permute(2, 0, 1)
        merged, _ = merge_attention_states(context_out, context_lse, path_out, path_lse)
        out[start:end] = merged.reshape(nodes, num_heads, head_dim)
    return out.to(query.dtype)


@triton.jit
def _attend_block(q, keys_at, values_at, valid, scale, running_max, running_sum, acc):
    """One online-softmax step of one query over a block of keys."""
    keys = tl.load(keys_at, mask=valid[:, None], other=0.0).to(tl.float32)
    logits = tl.where(valid, tl.sum(keys * q[None, :], axis=1) * scale, float("-inf"))
    new_max = tl.maximum(running_max, tl.max(logits, axis=0))
    correction = tl.exp(running_max - new_max)
    probs = tl.exp(logits - new_max)
    values = tl.load(values_at, mask=valid[:, None], other=0.0).to(tl.float32)
    acc = acc * correction + tl.sum(probs[:, None] * values, axis=0)
    return new_max, running_sum * correction + tl.sum(probs, axis=0), acc


@triton.jit
def _draft_tree_attention_kernel(
    query, context_keys, context_values, context_lens, token_rows, path_keys, path_values,
    path_lens, out, lse,
    stride_q_token, stride_q_head, stride_c_row, stride_c_key, stride_c_head,
    stride_p_node, stride_p_step, stride_p_head, stride_o_token, stride_o_head,
    num_heads, group_size, scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One node, one head: online softmax over the context, then the path."""
    node = tl.program_id(0)
    head = tl.program_id(1)
    row = tl.load(token_rows + node)
    m = tl.load(context_lens + row)
    depth = tl.load(path_lens + node)
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(query + node * stride_q_token + head * stride_q_head + dims).to(tl.float32)
    kv_head = head // group_size
    running_max = float("-inf")
    running_sum = 0.0
    acc = tl.zeros((HEAD_DIM,), dtype=tl.float32)
    context = row * stride_c_row + kv_head * stride_c_head + dims[None, :]
    for start in range(0, m, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        at = context + keys[:, None] * stride_c_key
        running_max, running_sum, acc = _attend_block(
            q, context_keys + at, context_values + at, keys < m, scale,
            running_max, running_sum, acc)
    steps = tl.arange(0, BLOCK_N)
    at = node * stride_p_node + steps[:, None] * stride_p_step + kv_head * stride_p_head \
        + dims[None, :]
    running_max, running_sum, acc = _attend_block(
        q, path_keys + at, path_values + at, steps < depth, scale, running_max, running_sum,
        acc)
    tl.store(out + node * stride_o_token + head * stride_o_head + dims,
             (acc / running_sum).to(out.dtype.element_ty))
    tl.store(lse + node * num_heads + head, running_max + tl.log(running_sum))


def draft_tree_attention(
    query, context_keys, context_values, context_lens, query_start_loc, path_keys,
    path_values, path_lens, scale=None,
):
    """Triton version of `draft_tree_attention_reference` (same arguments)."""
    num_queries, num_heads, head_dim = query.shape
    assert triton.next_power_of_2(head_dim) == head_dim, (
        "the draft tree kernel needs a power-of-two head_dim")
    assert query.stride(2) == 1 and context_keys.stride(3) == 1 and path_keys.stride(3) == 1
    assert (context_values.stride() == context_keys.stride()
            and path_values.stride() == path_keys.stride())
    block_n = 32
    assert path_keys.shape[1] <= block_n, f"paths of depth {path_keys.shape[1]}: at most {block_n}"
    scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
    out = torch.empty_like(query)
    lse = torch.empty((num_queries, num_heads), dtype=torch.float32, device=query.device)
    token_rows = torch.searchsorted(query_start_loc[1:], torch.arange(
        num_queries, device=query.device), right=True).to(torch.int32)
    _draft_tree_attention_kernel[(num_queries, num_heads)](
        query, context_keys, context_values, context_lens, token_rows, path_keys, path_values,
        path_lens, out, lse,
        query.stride(0), query.stride(1), context_keys.stride(0), context_keys.stride(1),
        context_keys.stride(2), path_keys.stride(0), path_keys.stride(1), path_keys.stride(2),
        out.stride(0), out.stride(1), num_heads, num_heads // context_keys.shape[2], scale,
        HEAD_DIM=head_dim, BLOCK_N=block_n,
    )
    return out, lse
