"""What one step hands on: the trees the draft proposed, and the rows the
target verifies with Hybrid Tree Attention, planned once per step by the
runner and read by every target layer (vLLM hands those layers only its
own metadata, so they hold the `TreeStep` they were given at load)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vllm_specextend.tree.dynamic_tree import DraftTree


@dataclass
class ScheduledTrees:
    """This step's rows verified with HTA (trees, or chains as path-shaped
    trees): planned once by the runner, read by every target layer."""

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
class TreeStep:
    """Owned by the runner's proposer: the drafted trees by request (tree
    mode), and this step's verification rows (None: vLLM's kernel alone)."""

    proposed: dict[str, ProposedTree] = field(default_factory=dict)
    scheduled: ScheduledTrees | None = None
