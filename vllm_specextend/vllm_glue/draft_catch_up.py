"""Skipping the draft in rounds where every request stepped aside, and
catching it up before it drafts again (see `policy.stale_drafts`).

A skipped round returns no drafts without running the draft: vLLM's
runner takes an empty draft tensor (its own dynamic speculation returns
one). Before the next round that runs the draft, one forward over the
missed tokens of every behind request (their ids are on the host, in the
runner's batch) writes the draft's cache at their true slots: a prefill
chunk through vLLM's own metadata and kernel. An EAGLE head reads the
target's hidden states beside the tokens: a skipped round keeps those of
its step's tokens (`policy.skipped_hidden_states`) for the catch-up.
"""

from __future__ import annotations

import numpy as np
import torch
from vllm.config import CUDAGraphMode
from vllm.forward_context import set_forward_context

from vllm_specextend.policy.skipped_hidden_states import SkippedHiddenStates
from vllm_specextend.policy.stale_drafts import StaleDrafts
from vllm_specextend.retrieval.draft_rows import concatenated_ranges, query_starts
from vllm_specextend.vllm_glue.batches import HostStaging, sub_batch_metadata

# A request stepped aside probes every 16 rounds at most: one catch-up reads
# about that many tokens. Past this many a round runs the draft anyway.
MAX_MISSING_TOKENS = 32
CATCH_UP_ARRAYS = ("token_ids", "positions", "token_rows", "rows", "query_start_loc",
                   "seq_lens", "hidden_rows")


class DraftCatchUp:
    def __init__(self, proposer, max_requests: int, max_drafts: int, block_size: int):
        self.proposer = proposer
        self.block_size = block_size
        self.hidden = None
        if proposer.pass_hidden_states_to_model:  # EAGLE: a token and the target's state
            self.hidden = SkippedHiddenStates(max_requests, MAX_MISSING_TOKENS + max_drafts + 1,
                                              proposer.hidden_size, proposer.dtype,
                                              proposer.device)
        self.input_shift = int(self.hidden is not None)  # EAGLE reads the token at p + 1
        self.stale = StaleDrafts(MAX_MISSING_TOKENS, cached_past_computed=1 - self.input_shift)
        self.staging = HostStaging(max_requests * MAX_MISSING_TOKENS, proposer.device,
                                   CATCH_UP_ARRAYS)
        self.step_staging = HostStaging(proposer.max_num_tokens, proposer.device,
                                        ("token_slots",))

    def skips(self, round_length: int, req_ids: list[str], computed: np.ndarray,
              scheduled: np.ndarray, prompt_lens: np.ndarray, target_positions: torch.Tensor,
              target_hidden_states: torch.Tensor | None) -> bool:
        """Skip the draft this round: nothing is drafted, every request is
        past its prompt (no prefill chunk for the draft to read) and no
        request falls too far behind. An EAGLE head's skipped tokens keep
        their hidden states. (Working caches miss the skipped tokens too:
        the caller has them refilled after the catch-up.)"""
        if (round_length > 0 or (computed < prompt_lens).any()
                or not self.stale.can_skip(req_ids, computed, scheduled)):
            return False
        self.stale.skip(req_ids, computed)
        if self.hidden is not None:
            self._keep_hidden_states(req_ids, scheduled, target_positions,
                                     target_hidden_states)
        return True

    def _keep_hidden_states(self, req_ids: list[str], scheduled: np.ndarray,
                            target_positions: torch.Tensor,
                            target_hidden_states: torch.Tensor) -> None:
        """The step's hidden states, as the head's first pass reads them,
        by request and position (rejected drafts' too: the tokens that
        replace them write their positions again)."""
        num_tokens = int(scheduled.sum())
        token_slots = self.step_staging.to_device(
            "token_slots", np.repeat(self.hidden.slots_of(req_ids), scheduled))
        rows = self.hidden.rows_of(token_slots, target_positions[:num_tokens].long())
        self.hidden.keep(rows, self.proposer.combined_hidden_states(
            target_hidden_states[:num_tokens]))

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
            self._free_hidden_states()
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
        inputs = {"input_ids": to_device("token_ids", token_ids[rows[token_rows],
                                                                positions + self.input_shift]),
                  "positions": positions_device, "inputs_embeds": None}
        if self.hidden is not None:
            rings = self.hidden.slots_of([req_ids[row] for row in rows])
            inputs["hidden_states"] = self.hidden.read(to_device(
                "hidden_rows", self.hidden.rows_of(rings[token_rows], positions)))
            self._free_hidden_states()
        proposer = self.proposer
        _, per_layer = proposer.build_per_group_and_layer_attn_metadata(cad)
        with set_forward_context(per_layer, proposer.vllm_config, num_tokens=len(positions),
                                 cudagraph_runtime_mode=CUDAGraphMode.NONE,
                                 slot_mapping=dict.fromkeys(proposer._draft_attn_layer_names,
                                                            slots)):
            proposer.model(**inputs)
        return True

    def _free_hidden_states(self) -> None:
        """Rings of requests no longer behind go back (read already)."""
        if self.hidden is not None:
            self.hidden.keep_only(self.stale.missing_from)

    def forget(self, req_id: str) -> None:
        self.stale.forget(req_id)
        self._free_hidden_states()

    def state(self) -> dict:
        return {"policy_rounds_skipped": self.stale.rounds_skipped,
                "policy_tokens_caught_up": self.stale.tokens_caught_up,
                "policy_catch_ups": self.stale.catch_ups,
                "policy_requests_behind": self.stale.held_requests(),
                "policy_hidden_state_rings": (0 if self.hidden is None
                                              else self.hidden.held_requests())}
