"""What one worker's runner knows of its trees, shared with the target's
attention layers (vLLM builds those and hands them only its own metadata;
a worker process runs one model runner)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vllm_specextend.tree.dynamic_tree import DraftTree


@dataclass
class ScheduledTrees:
    """This step's tree rows: planned once by the runner, read by every
    target layer."""

    rows: torch.Tensor  # [num_trees] request rows of the batch
    tokens: torch.Tensor  # the rows' scheduled token indices (root, then nodes)
    prefix_lens: torch.Tensor  # [num_trees] cached tokens before each root
    tree_start_loc: torch.Tensor  # [num_trees + 1]
    ancestor_masks: torch.Tensor  # [len(tokens)] int64 bitmask per node
    draft_tree: DraftTree | None = None  # [num_reqs, widest] the scheduled trees


@dataclass
class ProposedTree:
    """A request's drafted tree, nodes in the order they are scheduled."""

    depths: torch.Tensor  # [nodes] 1 for the root's children
    parents: torch.Tensor  # [nodes] local index, -1: the root


@dataclass
class TreeState:
    proposed: dict[str, ProposedTree] = field(default_factory=dict)
    scheduled: ScheduledTrees | None = None
    logged_first_compaction: bool = False


TREE_STATE = TreeState()
