"""Skipping the draft in rounds where every request stepped aside, and
catching it up before it drafts again (see `policy.stale_drafts`).

A skipped round returns no drafts without running the draft: vLLM's
runner takes an empty draft tensor (its own dynamic speculation returns
one). Before the next round that runs the draft, one forward over the
missed tokens of every behind request (their ids are on the host, in the
runner's batch) writes the draft's cache at their true slots: a prefill
chunk through vLLM's own metadata and kernel.
"""

from __future__ import annotations

import numpy as np
import torch
from vllm.config import CUDAGraphMode
from vllm.forward_context import set_forward_context

from vllm_specextend.policy.stale_drafts import StaleDrafts
from vllm_specextend.retrieval.draft_rows import concatenated_ranges, query_starts
from vllm_specextend.vllm_glue.batches import HostStaging, sub_batch_metadata

# A request stepped aside probes every 16 rounds at most: one catch-up reads
# about that many tokens. Past this many a round runs the draft anyway.
MAX_MISSING_TOKENS = 32
CATCH_UP_ARRAYS = ("token_ids", "positions", "token_rows", "rows", "query_start_loc",
                   "seq_lens")


class DraftCatchUp:
    def __init__(self, proposer, max_requests: int, block_size: int):
        self.proposer = proposer
        self.block_size = block_size
        self.stale = StaleDrafts(MAX_MISSING_TOKENS)
        self.staging = HostStaging(max_requests * MAX_MISSING_TOKENS, proposer.device,
                                   CATCH_UP_ARRAYS)

    def skips(self, round_length: int, req_ids: list[str], computed: np.ndarray,
              scheduled: np.ndarray, prompt_lens: np.ndarray) -> bool:
        """Skip the draft this round: nothing is drafted, every request is
        past its prompt (no prefill chunk for the draft to read), the draft
        needs no target hidden states (EAGLE reads them for every token) and
        no request falls too far behind. (Working caches miss the skipped
        tokens too: the caller has them refilled after the catch-up.)"""
        if (round_length > 0 or self.proposer.pass_hidden_states_to_model
                or (computed < prompt_lens).any()
                or not self.stale.can_skip(req_ids, computed, scheduled)):
            return False
        self.stale.skip(req_ids, computed)
        return True

    def no_drafts(self, batch_size: int) -> torch.Tensor:
        """What vLLM's proposer returns for a round of length 0."""
        self.proposer.num_speculative_tokens = 0
        self.proposer._last_draft_probs = None
        return torch.empty(batch_size, 0, dtype=torch.int64, device=self.proposer.device)

    def catch_up(self, metadata, req_ids: list[str], computed: np.ndarray,
                 token_ids: np.ndarray) -> bool:
        """One draft forward over the tokens each behind request missed;
        whether there were any."""
        rows, firsts = self.stale.take(req_ids, computed)
        if not len(rows):
            return False
        ends = computed[rows]
        counts = ends - firsts
        positions, token_rows = concatenated_ranges(firsts, counts)
        to_device = self.staging.to_device
        positions_device = to_device("positions", positions)
        block_table = metadata.block_table_tensor[to_device("rows", rows)]
        token_rows_device = to_device("token_rows", token_rows)
        slots = (block_table[token_rows_device, positions_device // self.block_size]
                 * self.block_size + positions_device % self.block_size)
        cad = sub_batch_metadata(counts, to_device("query_start_loc",
                                                   query_starts(counts)),
                                 to_device("seq_lens", ends), block_table, slots,
                                 int(ends.max()))
        proposer = self.proposer
        _, per_layer = proposer.build_per_group_and_layer_attn_metadata(cad)
        num_tokens = len(positions)
        with set_forward_context(per_layer, proposer.vllm_config, num_tokens=num_tokens,
                                 cudagraph_runtime_mode=CUDAGraphMode.NONE,
                                 slot_mapping=dict.fromkeys(proposer._draft_attn_layer_names,
                                                            slots)):
            proposer.model(input_ids=to_device("token_ids", token_ids[rows[token_rows],
                                                                       positions]),
                           positions=positions_device, inputs_embeds=None)
        return True

    def state(self) -> dict:
        return {"policy_rounds_skipped": self.stale.rounds_skipped,
                "policy_tokens_caught_up": self.stale.tokens_caught_up,
                "policy_catch_ups": self.stale.catch_ups,
                "policy_requests_behind": self.stale.held_requests()}
