"""Tree mode, draft side: grow each request's dynamic tree in vLLM's
draft-model proposer (V1 runner).

The first pass is vLLM's own: the verified tokens (the accepted path moved
to the front by the runner) and the bonus token, the root of the next tree,
written at their true slots. Then one draft forward per tree layer: the
newest layer's nodes attend to their request's context (the root's row of
the first pass: working set or window, ending with the root) and to their
path, at compact positions (`draft_tree_attention`); their keys and values
go to scratch rows of each layer's mirror, never to vLLM's cache.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from vllm.forward_context import set_forward_context

from vllm_specextend.config import SpecExtendConfig
from vllm_specextend.paged_cache import slots_of
from vllm_specextend.retrieval.draft_rows import DraftRows
from vllm_specextend.tree.dynamic_tree import DraftTree, DynamicTreeBuilder, child_paths
from vllm_specextend.vllm_glue.kv_mirror import KVMirror
from vllm_specextend.vllm_glue.tree_step import TREE_STATE, ProposedTree

logger = logging.getLogger("vllm.specextend")


@dataclass
class DraftTreeLayer:
    """Attention metadata of one tree-layer forward of the draft, read by
    `CompactDraftAttention` in place of vLLM's."""

    num_actual_tokens: int
    node_slots: torch.Tensor  # [tokens] scratch rows for the nodes' keys/values
    context_slots: torch.Tensor  # [batch, max_context] the root's context, in order
    context_lens: torch.Tensor  # [batch]
    query_start_loc: torch.Tensor  # [batch + 1]
    path_slots: torch.Tensor  # [tokens, depth] depth 1 .. the node
    path_lens: torch.Tensor  # [tokens]


def root_context(rows: DraftRows, root_indices: torch.Tensor,
                 block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys each root token attends to in the first pass, as slots in
    position order ending with the root, and their count [batch]."""
    row_ends = rows.query_start_loc[1:].long()
    root_rows = torch.searchsorted(row_ends, root_indices.long(), right=True)
    # Keys after the root in its row belong to later queries of the row.
    later = row_ends[root_rows] - 1 - root_indices.long()
    context_lens = rows.num_keys[root_rows].long() - later
    slots = slots_of(rows.block_tables[root_rows], rows.key_positions[root_rows], block_size)
    return slots, context_lens


class TreeDrafter:
    def __init__(self, proposer, planner, mirrors: list[KVMirror], settings: SpecExtendConfig,
                 block_size: int):
        self.proposer = proposer
        self.planner = planner
        self.mirrors = mirrors
        self.nodes = settings.tree_nodes
        self.max_depth = settings.tree_max_depth
        self.threshold = settings.tree_threshold
        self.block_size = block_size
        self.trees_drafted = 0

    def propose(self, req_ids: list[str], target_token_ids, target_positions, next_token_ids,
                token_indices_to_sample, common_attn_metadata,
                num_rejected_tokens_gpu) -> list[list[int]]:
        root_hidden, rows, root_indices, layer_names = self._first_pass(
            target_token_ids, target_positions, next_token_ids, token_indices_to_sample,
            common_attn_metadata, num_rejected_tokens_gpu)
        tree = self._grow(root_hidden, rows, root_indices, layer_names)
        num_nodes = tree.num_nodes.tolist()
        TREE_STATE.proposed = {
            req_id: ProposedTree(tree.depths[row, :count], tree.parents[row, :count])
            for row, (req_id, count) in enumerate(zip(req_ids, num_nodes))
        }
        if self.trees_drafted == 0:
            logger.info("SpecExtend: drafted the first trees (%s nodes)", num_nodes)
        self.trees_drafted += len(req_ids)
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
        rows = self.planner.rows_for(next(iter(per_layer.values())))
        return hidden[root_indices], rows, root_indices, list(per_layer)

    def _draft_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proposer.model.compute_logits(hidden).float().softmax(dim=-1)

    def _grow(self, root_hidden, rows: DraftRows, root_indices, layer_names) -> DraftTree:
        batch, nodes, device = root_hidden.shape[0], self.nodes, root_hidden.device
        context_slots, context_lens = root_context(rows, root_indices, self.block_size)
        scratch = [mirror.reserve_scratch(batch * self.max_depth * nodes)
                   for mirror in self.mirrors]
        # Every draft layer has vLLM's cache shape, so one scratch base.
        assert len(set(scratch)) == 1
        # Scratch row of (request, depth, node): one block of `nodes` per layer.
        request_base = scratch[0] + torch.arange(batch, device=device)[:, None] * (
            self.max_depth * nodes)
        builder = DynamicTreeBuilder(batch, nodes, self.max_depth, self.threshold, device)
        tokens = builder.add_layer(self._draft_probs(root_hidden)[:, None, :])
        paths = torch.empty(batch, 1, 0, dtype=torch.long, device=device)
        query_start_loc = torch.arange(batch + 1, device=device, dtype=torch.int32) * nodes
        while not builder.done():
            depth = builder.depth
            node_slots = request_base + (depth - 1) * nodes + torch.arange(nodes, device=device)
            paths = child_paths(paths, builder.frontier_parents, node_slots)
            layer = DraftTreeLayer(
                num_actual_tokens=batch * nodes, node_slots=node_slots.flatten(),
                context_slots=context_slots, context_lens=context_lens,
                query_start_loc=query_start_loc, path_slots=paths.flatten(0, 1),
                path_lens=torch.full((batch * nodes,), depth, device=device))
            with set_forward_context(dict.fromkeys(layer_names, layer),
                                     self.proposer.vllm_config, num_tokens=batch * nodes,
                                     slot_mapping={}):
                # Draft RoPE happens inside attention: positions are unused.
                hidden = self.proposer.model(
                    input_ids=tokens.flatten().int(), inputs_embeds=None,
                    positions=torch.zeros(batch * nodes, dtype=torch.long, device=device))
            tokens = builder.add_layer(self._draft_probs(hidden).view(batch, nodes, -1))
        return builder.finish()
