"""Tree mode, draft side: grow each request's dynamic tree in vLLM's
draft-model proposer (V1 runner).

The first pass is vLLM's own: the verified tokens (the accepted path moved
to the front by the runner) and the bonus token, the root of the next tree,
written at their true slots (and, for rows with one, in their working
cache). Then one draft forward per tree layer: the newest layer's nodes, at
the root's position plus their depth, attend to what the root attended to
(its working cache, or its window of vLLM's cache) and to their path
(`draft_tree_attention`); their keys and values go to scratch rows
allocated with the models, never to vLLM's cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.forward_context import set_forward_context

from vllm_specextend.attention.draft_tree_attention import (
    draft_tree_attention,
    draft_tree_attention_cpu,
)
from vllm_specextend.config import SpecExtendConfig
from vllm_specextend.paged_cache import slots_of
from vllm_specextend.tree.dynamic_tree import DraftTree, DynamicTreeBuilder, grow_tree
from vllm_specextend.tree.verification import ProposedTree
from vllm_specextend.vllm_glue.logs import info_first
from vllm_specextend.vllm_glue.rotation import move_back_
from vllm_specextend.vllm_glue.step import StepRecord


class TreeContext:
    """What each root attended to in the first pass: the last `main_window`
    positions of vLLM's cache up to the root, or the root's working cache up
    to it. Read per draft layer (`read`), once per tree-layer forward."""

    def __init__(self, layers: dict[str, object], reader, round_, block_table: torch.Tensor,
                 root_positions: torch.Tensor, main_window: int, block_size: int):
        self.layers, self.reader = layers, reader
        batch, device = len(root_positions), root_positions.device
        capacity = round_.caches.geometry.capacity if round_ is not None else 0
        self.width = max(main_window, capacity)
        column = torch.arange(self.width, device=device)
        self.lens = torch.clamp(root_positions + 1, max=main_window)
        first = (root_positions + 1 - self.lens)[:, None]
        self.main_slots = slots_of(block_table, (first + column).clamp(min=0), block_size)
        self.row_offsets = torch.zeros(batch, dtype=torch.long, device=device)
        self.groups = [(None, torch.arange(batch, device=device), self.main_slots)]
        if round_ is not None and round_.uses_working_caches:
            rows = round_.compact_rows_device
            self.lens[rows] = root_positions[rows] - round_.compact_offsets + 1
            self.row_offsets[rows] = round_.compact_offsets
            self.groups = [(None, round_.main_rows_device, self.main_slots),
                           (round_.caches, rows, round_.compact_bases[:, None] + column)]

    def read(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `name`'s context keys and values [batch, width, heads, dim]."""
        layer = self.layers[name]
        keys = values = None
        for caches, rows, slots in self.groups:
            cache = layer.kv_cache if caches is None else caches.cache_of(name, layer.kv_cache)
            part_keys, part_values = self.reader.read(cache, slots[rows].flatten()
                                                      if caches is None else slots.flatten())
            if keys is None:
                shape = (len(self.lens), self.width, *part_keys.shape[1:])
                keys, values = part_keys.new_empty(shape), part_values.new_empty(shape)
            keys[rows] = part_keys.view(len(rows), self.width, *part_keys.shape[1:])
            values[rows] = part_values.view(len(rows), self.width, *part_values.shape[1:])
        return keys, values


@dataclass
class DraftTreeLayer:
    """Attention metadata of one tree-layer forward of the draft, read by
    `DraftAttention` in place of vLLM's."""

    num_actual_tokens: int
    node_offsets: torch.Tensor  # [tokens] true minus attention position
    node_rows: torch.Tensor  # [tokens] scratch rows of the nodes' keys/values
    context: TreeContext
    query_start_loc: torch.Tensor  # [batch + 1]
    path_rows: torch.Tensor  # [tokens, depth] scratch rows of depth 1 .. the node
    path_lens: torch.Tensor  # [tokens]

    def attend_draft(self, attention, layer, query, key, value, output):
        """One draft layer (`draft_attention.DraftAttention`): the nodes to
        their attention positions, their keys and values to scratch rows,
        then context + path attention."""
        count = self.num_actual_tokens
        queries, keys = query[:count], key[:count]
        move_back_(self.node_offsets, attention.backward, queries, keys)
        scratch_keys, scratch_values = attention.tree_scratch
        scratch_keys[self.node_rows] = keys
        scratch_values[self.node_rows] = value[:count]
        context_keys, context_values = self.context.read(attention.name)
        arguments = (queries, context_keys, context_values, self.context.lens,
                     self.query_start_loc, scratch_keys[self.path_rows],
                     scratch_values[self.path_rows], self.path_lens, layer.impl.scale)
        if queries.is_cuda:
            out, _ = draft_tree_attention(*arguments)
        else:
            out = draft_tree_attention_cpu(*arguments)
        output[:count] = out.to(output.dtype)
        return output


class TreeDrafter:
    def __init__(self, proposer, step: StepRecord, layers: dict[str, object], reader,
                 settings: SpecExtendConfig, main_window: int, block_size: int):
        self.proposer = proposer
        self.step = step
        self.layers = layers
        self.reader = reader
        self.nodes = settings.tree_nodes
        self.max_depth = settings.tree_max_depth
        self.threshold = settings.tree_threshold
        self.main_window = main_window
        self.block_size = block_size

    def propose(self, req_ids: list[str], round_, target_token_ids, target_positions,
                next_token_ids, token_indices_to_sample, common_attn_metadata,
                num_rejected_tokens_gpu) -> list[list[int]]:
        root_hidden, root_indices, cad = self._first_pass(
            target_token_ids, target_positions, next_token_ids, token_indices_to_sample,
            common_attn_metadata, num_rejected_tokens_gpu)
        root_positions = self.proposer.positions[root_indices].long()
        context = TreeContext(self.layers, self.reader, round_, cad.block_table_tensor,
                              root_positions, self.main_window, self.block_size)
        tree = self._grow(root_hidden, root_positions, context)
        num_nodes = tree.num_nodes.tolist()
        self.step.proposed_trees = {
            req_id: ProposedTree(tree.depths[row, :count], tree.parents[row, :count])
            for row, (req_id, count) in enumerate(zip(req_ids, num_nodes))
        }
        info_first("SpecExtend: drafted the first trees (%s nodes)", num_nodes)
        return [tokens[:count] for tokens, count in zip(tree.tokens.tolist(), num_nodes)]

    def _first_pass(self, target_token_ids, target_positions, next_token_ids,
                    token_indices_to_sample, cad, num_rejected_tokens_gpu):
        proposer = self.proposer
        num_tokens, root_indices, cad = proposer.set_inputs_first_pass(
            target_token_ids=target_token_ids, next_token_ids=next_token_ids,
            target_positions=target_positions, target_hidden_states=None,
            token_indices_to_sample=token_indices_to_sample, cad=cad,
            num_rejected_tokens_gpu=num_rejected_tokens_gpu)
        _, per_layer = proposer.build_per_group_and_layer_attn_metadata(cad)
        model_kwargs, _ = proposer.build_model_inputs_first_pass(num_tokens, num_tokens, None)
        with set_forward_context(per_layer, proposer.vllm_config, num_tokens=num_tokens,
                                 slot_mapping=proposer._get_slot_mapping(num_tokens,
                                                                         cad.slot_mapping)):
            hidden = proposer.model(**model_kwargs)
        return hidden[root_indices], root_indices, cad

    def _draft_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proposer.model.compute_logits(hidden).float().softmax(dim=-1)

    def _grow(self, root_hidden, root_positions, context: TreeContext) -> DraftTree:
        batch, nodes, device = root_hidden.shape[0], self.nodes, root_hidden.device
        # vLLM's rotary kernel reads positions as a dense array.
        node_offsets = context.row_offsets[:, None].expand(-1, nodes).contiguous().flatten()
        query_start_loc = torch.arange(batch + 1, device=device, dtype=torch.int32) * nodes
        layer_names = list(self.layers)

        def draft_layer(depth, tokens, node_rows, paths):
            layer = DraftTreeLayer(
                num_actual_tokens=batch * nodes, node_offsets=node_offsets,
                node_rows=node_rows.flatten(), context=context,
                query_start_loc=query_start_loc, path_rows=paths.flatten(0, 1),
                path_lens=torch.full((batch * nodes,), depth, device=device))
            positions = (root_positions + depth)[:, None].expand(-1, nodes).contiguous().flatten()
            with set_forward_context(dict.fromkeys(layer_names, layer),
                                     self.proposer.vllm_config, num_tokens=batch * nodes,
                                     slot_mapping={}):
                hidden = self.proposer.model(input_ids=tokens.flatten().int(),
                                             inputs_embeds=None, positions=positions)
            return self._draft_probs(hidden).view(batch, nodes, -1)

        builder = DynamicTreeBuilder(batch, nodes, self.max_depth, self.threshold, device)
        return grow_tree(builder, self._draft_probs(root_hidden), draft_layer)
