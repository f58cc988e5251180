"""The one record of what SpecExtend planned for the runner's current step,
owned by the proposer: each part planned once per step and read, not
rebuilt, by every layer and hook that needs it. vLLM hands its attention
layers only its own metadata, so the target's layers (HTA verification)
hold this record from load."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm_specextend.retrieval.working_caches import DraftRound
from vllm_specextend.tree.verification import ProposedTree, ScheduledTrees


@dataclass
class StepRecord:
    # The rows the target verifies with HTA (None: vLLM's kernel alone),
    # planned after `_prepare_inputs`, done with in `_sample`.
    verification: ScheduledTrees | None = None
    # Which rows draft over working caches, their cache ids and index
    # tensors: planned in `propose` (None outside it, or with no caches).
    draft_round: DraftRound | None = None
    # Tree mode: the trees the draft proposed, by request; the next step
    # verifies them.
    proposed_trees: dict[str, ProposedTree] = field(default_factory=dict)
