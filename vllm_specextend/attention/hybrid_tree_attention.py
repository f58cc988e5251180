"""Hybrid Tree Attention (SpecExtend section 3.3) for tree verification.

A request verifies a tree of `n` draft nodes after a cached prefix of
`prefix_len` tokens. Its nodes sit, in topological order, at the slots of
positions prefix_len .. prefix_len + n - 1 of the paged cache (the slots a
chain would use); each node's query is already rotated at its tree position.
Every node attends to the whole prefix (no mask) and to its ancestors and
itself in the tree. HTA splits the two:
- prefix part: FlashDecoding over the paged prefix (split-KV partials, each
  with its log-sum-exp, reduced), output and LSE per query and head;
- tree part: attention among the tree's nodes under the ancestor mask;
- merge by LSE, in fp32: out = (e^lse_p o_p + e^lse_t o_t) / (e^lse_p + e^lse_t).
Caches are viewed as [num_slots, num_kv_heads, head_dim]
(slot = block * block_size + offset). The tree mask is one int64 per node:
bit j set when node j of the same request is an ancestor of it or itself.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from vllm_specextend.attention.tiles import interpreted, tile_dot
from vllm_specextend.limits import MAX_TREE_TOKENS
from vllm_specextend.paged_cache import slots_of



def ancestor_bitmasks(parents: torch.Tensor, tree_start_loc: torch.Tensor) -> torch.Tensor:
    """Bitmasks from parent arrays: `parents` [num_nodes] holds each node's
    parent as an index local to its request (-1 for a root); parents come
    before children. Plan step (host side, once per step)."""
    masks = torch.zeros_like(parents, dtype=torch.int64)
    starts = tree_start_loc.tolist()
    for start, end in zip(starts[:-1], starts[1:]):
        if end - start > MAX_TREE_TOKENS:
            raise ValueError(f"a tree has {end - start} nodes; at most {MAX_TREE_TOKENS}")
        for local in range(end - start):
            parent = int(parents[start + local])
            assert parent < local, "parents must come before their children"
            own = 1 << local if local < 63 else -(1 << 63)  # bit 63 is the sign bit
            masks[start + local] = own | (int(masks[start + parent]) if parent >= 0 else 0)
    return masks


def chain_bitmasks(local: torch.Tensor) -> torch.Tensor:
    """`ancestor_bitmasks` of chains (each node's parent the node before it),
    from each node's index in its chain: bits 0..local."""
    full = (torch.ones_like(local, dtype=torch.int64) << (local.clamp(max=62) + 1)) - 1
    return torch.where(local >= 63, -1, full)


def _is_visible(masks: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """[nodes, nodes] bool: does node q (row) see node k (column)?"""
    return ((masks[:, None] >> local[None, :]) & 1).bool()


def _gather(cache: torch.Tensor, block_table_row: torch.Tensor, positions: torch.Tensor,
            block_size: int) -> torch.Tensor:
    return cache.index_select(0, slots_of(block_table_row, positions, block_size)).float()


def tree_attention_reference(
    query: torch.Tensor,  # [num_nodes, num_heads, head_dim]
    key_cache: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]
    value_cache: torch.Tensor,
    block_table: torch.Tensor,  # [batch, max_blocks]
    prefix_lens: torch.Tensor,  # [batch]
    tree_start_loc: torch.Tensor,  # [batch + 1]
    tree_masks: torch.Tensor,  # [num_nodes] int64 ancestor bitmasks
    block_size: int,
    scale: float | None = None,
) -> torch.Tensor:
    """The full masked attention over prefix + tree, one dense softmax per
    request: what tree verification computes without HTA."""
    num_heads, head_dim = query.shape[1:]
    group = num_heads // key_cache.shape[1]
    scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
    out = torch.empty(query.shape, dtype=torch.float32, device=query.device)
    for row in range(block_table.shape[0]):
        start, end = int(tree_start_loc[row]), int(tree_start_loc[row + 1])
        prefix_len, nodes = int(prefix_lens[row]), end - start
        positions = torch.arange(prefix_len + nodes, device=query.device)
        keys = _gather(key_cache, block_table[row], positions, block_size)
        values = _gather(value_cache, block_table[row], positions, block_size)
        visible = torch.ones(nodes, prefix_len + nodes, dtype=torch.bool, device=query.device)
        local = torch.arange(nodes, device=query.device)
        visible[:, prefix_len:] = _is_visible(tree_masks[start:end], local)
        logits = torch.einsum("qhd,khd->hqk", query[start:end].float(),
                              keys.repeat_interleave(group, dim=1)) * scale
        probs = logits.masked_fill(~visible, float("-inf")).softmax(dim=-1)
        out[start:end] = torch.einsum("hqk,khd->qhd", probs,
                                      values.repeat_interleave(group, dim=1))
    return out.to(query.dtype)


def merge_attention_states(out_a, lse_a, out_b, lse_b):
    """Exact merge of two softmax partials over disjoint key sets, in fp32.
    An empty part has lse = -inf and weight 0."""
    top = torch.maximum(lse_a, lse_b)
    weight_a = torch.exp(lse_a - top)
    weight_b = torch.exp(lse_b - top)
    total = weight_a + weight_b
    merged = (weight_a[..., None] * out_a.float() + weight_b[..., None] * out_b.float()) / total[..., None]
    return merged, top + torch.log(total)


@triton.jit
def _prefix_split_kernel(
    query, key_cache, value_cache, block_table, prefix_lens, tree_start_loc,
    partial_out, partial_lse,
    stride_q_node, stride_q_head, stride_slot, stride_kv_head, stride_table,
    stride_po_node, stride_po_head, stride_po_split,
    block_size, group_size, num_heads, scale, split_len, num_splits, query_tiles,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IN_FLOAT32: tl.constexpr,
):
    """FlashDecoding partial of one tree's prefix: one KV head, one split, a
    tile of BLOCK_M (node, query head) rows of that KV head's group. Every
    key and value tile of the split is read once for all of them."""
    tree = tl.program_id(0)
    kv_head = tl.program_id(1) // query_tiles
    tile = tl.program_id(1) % query_tiles
    split = tl.program_id(2)
    first_node = tl.load(tree_start_loc + tree)
    num_nodes = tl.load(tree_start_loc + tree + 1) - first_node
    if tile * BLOCK_M < num_nodes * group_size:
        prefix_len = tl.load(prefix_lens + tree)
        dims = tl.arange(0, HEAD_DIM)
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        node = first_node + rows // group_size
        head = kv_head * group_size + rows % group_size
        in_tree = rows < num_nodes * group_size
        q = tl.load(query + node[:, None] * stride_q_node + head[:, None] * stride_q_head
                    + dims[None, :], mask=in_tree[:, None], other=0.0)
        split_end = tl.minimum((split + 1) * split_len, prefix_len)
        running_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        running_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
        for start in range(split * split_len, split_end, BLOCK_N):
            positions = start + tl.arange(0, BLOCK_N)
            valid = positions < split_end
            block = tl.load(block_table + tree * stride_table + positions // block_size,
                            mask=valid, other=0).to(tl.int64)
            offsets = (block * block_size + positions % block_size)[:, None] * stride_slot \
                + kv_head * stride_kv_head + dims[None, :]
            keys = tl.load(key_cache + offsets, mask=valid[:, None], other=0.0)
            logits = tl.where(valid[None, :], tile_dot(q, tl.trans(keys), IN_FLOAT32) * scale, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(logits, axis=1))
            correction = tl.exp(running_max - new_max)
            probs = tl.exp(logits - new_max[:, None])
            values = tl.load(value_cache + offsets, mask=valid[:, None], other=0.0)
            acc = acc * correction[:, None] + tile_dot(probs, values, IN_FLOAT32)
            running_sum = running_sum * correction + tl.sum(probs, axis=1)
            running_max = new_max
        # A split past the prefix end is empty: output 0, LSE -inf (weight 0).
        empty = running_sum == 0.0
        safe_sum = tl.where(empty, 1.0, running_sum)
        base = node * stride_po_node + head * stride_po_head + split * stride_po_split
        tl.store(partial_out + base[:, None] + dims[None, :], acc / safe_sum[:, None],
                 mask=in_tree[:, None])
        tl.store(partial_lse + (node * num_heads + head) * num_splits + split,
                 tl.where(empty, float("-inf"), running_max + tl.log(safe_sum)), mask=in_tree)


@triton.jit
def _tree_part_kernel(
    query, key_cache, value_cache, block_table, prefix_lens, tree_start_loc, node_rows,
    tree_masks, out, lse,
    stride_q_node, stride_q_head, stride_slot, stride_kv_head, stride_table,
    stride_o_node, stride_o_head,
    block_size, group_size, scale,
    HEAD_DIM: tl.constexpr, MAX_NODES: tl.constexpr,
):
    """One node, one head: attention over its request's tree nodes under the
    ancestor bitmask."""
    node = tl.program_id(0)
    head = tl.program_id(1)
    row = tl.load(node_rows + node)
    prefix_len = tl.load(prefix_lens + row)
    first_node = tl.load(tree_start_loc + row)
    num_nodes = tl.load(tree_start_loc + row + 1) - first_node
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(query + node * stride_q_node + head * stride_q_head + dims).to(tl.float32)
    local = tl.arange(0, MAX_NODES)
    mask_bits = tl.load(tree_masks + node)
    visible = (local < num_nodes) & (((mask_bits >> local.to(tl.int64)) & 1) == 1)
    positions = prefix_len + local
    block = tl.load(block_table + row * stride_table + positions // block_size,
                    mask=visible, other=0).to(tl.int64)
    offsets = (block * block_size + positions % block_size)[:, None] * stride_slot \
        + (head // group_size) * stride_kv_head + dims[None, :]
    keys = tl.load(key_cache + offsets, mask=visible[:, None], other=0.0).to(tl.float32)
    logits = tl.where(visible, tl.sum(keys * q[None, :], axis=1) * scale, float("-inf"))
    top = tl.max(logits, axis=0)
    probs = tl.exp(logits - top)
    total = tl.sum(probs, axis=0)
    values = tl.load(value_cache + offsets, mask=visible[:, None], other=0.0).to(tl.float32)
    tl.store(out + node * stride_o_node + head * stride_o_head + dims,
             tl.sum(probs[:, None] * values, axis=0) / total)
    tl.store(lse + node * tl.num_programs(1) + head, top + tl.log(total))


def node_rows_of(tree_start_loc: torch.Tensor, num_nodes: int) -> torch.Tensor:
    nodes = torch.arange(num_nodes, device=tree_start_loc.device)
    return torch.searchsorted(tree_start_loc[1:], nodes, right=True).to(torch.int32)


def prefix_split_launch(head_dim: int) -> dict:
    """Tiles and warps of `_prefix_split_kernel`. At head_dim 128, key tiles
    of 64 compile to 250-255 registers a thread (the ceiling is 255); tiles
    of 32 take 166 and ran fastest on an H200 (benchmarks/gpu_kernels.py)."""
    return dict(BLOCK_M=64, BLOCK_N=32 if head_dim >= 128 else 64, num_warps=4)


def prefix_attention(query, key_cache, value_cache, block_table, prefix_lens, tree_start_loc,
                     max_prefix_len: int, block_size: int, scale: float,
                     split_len: int = 512):
    """FlashDecoding over each tree's prefix, all its nodes at once: (out
    fp32, lse) per node and head."""
    num_nodes, num_heads, head_dim = query.shape
    group_size = num_heads // key_cache.shape[1]
    num_splits = max(triton.cdiv(max_prefix_len, split_len), 1)
    launch = prefix_split_launch(head_dim)
    query_tiles = triton.cdiv(MAX_TREE_TOKENS * group_size, launch["BLOCK_M"])
    partial_out = torch.empty((num_nodes, num_heads, num_splits, head_dim),
                              dtype=torch.float32, device=query.device)
    partial_lse = torch.empty((num_nodes, num_heads, num_splits), dtype=torch.float32,
                              device=query.device)
    grid = (len(prefix_lens), key_cache.shape[1] * query_tiles, num_splits)
    _prefix_split_kernel[grid](
        query, key_cache, value_cache, block_table, prefix_lens, tree_start_loc,
        partial_out, partial_lse,
        query.stride(0), query.stride(1), key_cache.stride(0), key_cache.stride(1),
        block_table.stride(0), partial_out.stride(0), partial_out.stride(1),
        partial_out.stride(2), block_size, group_size, num_heads, scale, split_len,
        num_splits, query_tiles, HEAD_DIM=head_dim, IN_FLOAT32=interpreted(), **launch)
    # Reduce the splits (the FlashDecoding second pass) by their LSEs.
    lse = torch.logsumexp(partial_lse, dim=-1)
    weights = torch.exp(partial_lse - lse[..., None]).nan_to_num(0.0)
    return (weights[..., None] * partial_out).sum(dim=2), lse


def tree_part_attention(query, key_cache, value_cache, block_table, prefix_lens,
                        tree_start_loc, node_rows, tree_masks, block_size: int, scale: float):
    num_nodes, num_heads, head_dim = query.shape
    out = torch.empty(query.shape, dtype=torch.float32, device=query.device)
    lse = torch.empty((num_nodes, num_heads), dtype=torch.float32, device=query.device)
    _tree_part_kernel[(num_nodes, num_heads)](
        query, key_cache, value_cache, block_table, prefix_lens, tree_start_loc, node_rows,
        tree_masks, out, lse,
        query.stride(0), query.stride(1), key_cache.stride(0), key_cache.stride(1),
        block_table.stride(0), out.stride(0), out.stride(1),
        block_size, num_heads // key_cache.shape[1], scale,
        HEAD_DIM=head_dim, MAX_NODES=MAX_TREE_TOKENS)
    return out, lse


def hybrid_tree_attention(query, key_cache, value_cache, block_table, prefix_lens,
                          tree_start_loc, tree_masks, block_size: int, max_prefix_len: int,
                          scale: float | None = None):
    """HTA: prefix part + tree part merged by LSE. Same inputs as
    `tree_attention_reference`; `max_prefix_len` bounds prefix_lens."""
    num_nodes, _, head_dim = query.shape
    assert triton.next_power_of_2(head_dim) == head_dim, "HTA needs a power-of-two head_dim"
    assert key_cache.stride(2) == 1 and query.stride(2) == 1
    assert value_cache.stride() == key_cache.stride()
    scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
    node_rows = node_rows_of(tree_start_loc, num_nodes)
    prefix_out, prefix_lse = prefix_attention(
        query, key_cache, value_cache, block_table, prefix_lens, tree_start_loc,
        max_prefix_len, block_size, scale)
    tree_out, tree_lse = tree_part_attention(
        query, key_cache, value_cache, block_table, prefix_lens, tree_start_loc,
        node_rows, tree_masks, block_size, scale)
    merged, _ = merge_attention_states(prefix_out, prefix_lse, tree_out, tree_lse)
    return merged.to(query.dtype)


def hybrid_tree_attention_cpu(query, read_kv, block_table, prefix_lens, tree_start_loc,
                              tree_masks, block_size: int, scale: float | None = None,
                              split_len: int = 4096):
    """HTA in torch ops, for CPUs (Triton does not run there): the prefix part
    in split-KV pieces of `split_len` keys, each with its LSE, merged as they
    come; the tree part under the ancestor mask; then the merge. The GQA
    group shares its keys (one matmul per KV head). Inputs as
    `tree_attention_reference`, but the caches are read through
    `read_kv(slots) -> (keys, values)` [n, num_kv_heads, head_dim] (vLLM's
    packed CPU cache is read in place that way)."""
    num_heads, head_dim = query.shape[1:]
    scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
    out = torch.empty(query.shape, dtype=torch.float32, device=query.device)
    starts, prefix_list = tree_start_loc.tolist(), prefix_lens.tolist()
    for row, prefix_len in enumerate(prefix_list):
        start, end = starts[row], starts[row + 1]
        nodes = end - start
        grouped = None

        def attend(first: int, last: int, visible: torch.Tensor | None):
            nonlocal grouped
            positions = torch.arange(first, last, device=query.device)
            keys, values = read_kv(slots_of(block_table[row], positions, block_size))
            num_kv_heads = keys.shape[1]
            group = num_heads // num_kv_heads
            if grouped is None:  # [kv_heads, group * nodes, head_dim]
                grouped = query[start:end].float().view(nodes, num_kv_heads, group, head_dim)
                grouped = grouped.permute(1, 2, 0, 3).reshape(num_kv_heads, group * nodes,
                                                              head_dim)
            # [kv_heads, n, head_dim], contiguous for the batched matmuls
            keys = keys.float().transpose(0, 1).contiguous()
            values = values.float().transpose(0, 1).contiguous()
            logits = torch.bmm(grouped, keys.transpose(1, 2)).mul_(scale)
            if visible is not None:
                logits.view(num_kv_heads, group, nodes, -1).masked_fill_(~visible, float("-inf"))
            top = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(top).exp_()
            total = probs.sum(dim=-1, keepdim=True)
            return torch.bmm(probs, values).div_(total), (top + total.log()).squeeze(-1)

        local = torch.arange(nodes, device=query.device)
        merged, lse = attend(prefix_len, prefix_len + nodes,
                             _is_visible(tree_masks[start:end], local))
        for first in range(0, prefix_len, split_len):
            part = attend(first, min(first + split_len, prefix_len), None)
            merged, lse = merge_attention_states(*part, merged, lse)
        num_kv_heads = merged.shape[0]
        out[start:end] = merged.view(num_kv_heads, num_heads // num_kv_heads, nodes,
                                     head_dim).permute(2, 0, 1, 3).reshape(nodes, num_heads,
                                                                           head_dim)
    return out.to(query.dtype)
