"""SpecExtend's proposers: vLLM's draft proposers (a separate draft model,
an EAGLE head) with SpecExtend's drafting round, installed in place of
vLLM's own when a runner starts (`install_proposer`).

`load_model` loads the draft as vLLM does, then allocates, before vLLM
measures memory for its KV cache, everything SpecExtend keeps: the working
caches, the target's final-layer query capture, the tree scratch rows; each
draft layer's attention is wrapped (`draft_attention`). `propose` is one
drafting round, top to bottom: the policy's round length (or no draft at
all), free the caches of requests that left and refresh the due ones
(score, select, lay out), draft (vLLM's chain, or a tree), return.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn
from vllm.distributed import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_reduce,
)
from vllm.v1.spec_decode.draft_model import DraftModelProposer
from vllm.v1.spec_decode.eagle import EagleProposer

from vllm_specextend.attention.rope import backward_table, rotary_table
from vllm_specextend.config import SpecExtendConfig, SpecExtendConfigError
from vllm_specextend.metrics import MetricsFile
from vllm_specextend.policy.step_clock import StepClock
from vllm_specextend.retrieval.cross_model_retrieval import (
    CrossModelRetrieval,
    FinalLayerCapture,
)
from vllm_specextend.retrieval.ownership import NO_CACHE, WorkingCacheOwners
from vllm_specextend.retrieval.working_caches import DraftRound, WorkingCaches
from vllm_specextend.vllm_glue.batches import HostStaging, sub_batch_metadata
from vllm_specextend.vllm_glue.draft_attention import install_draft_attention
from vllm_specextend.vllm_glue.draft_catch_up import DraftCatchUp
from vllm_specextend.vllm_glue.engine_config import check_engine_fit, geometry_of
from vllm_specextend.vllm_glue.kv_cache_reader import reader_for
from vllm_specextend.vllm_glue.logs import info_first, logger
from vllm_specextend.vllm_glue.patching import replace_on_instance
from vllm_specextend.vllm_glue.rotation import move_back_
from vllm_specextend.vllm_glue.speculation_policy import PolicyHooks
from vllm_specextend.vllm_glue.step import StepRecord

MIB = 1 << 20


@dataclasses.dataclass
class WorkingCacheCounters:
    """Totals since start-up, for metrics."""

    refreshes: int = 0  # drafting rounds that refreshed working caches
    working_caches_refreshed: int = 0
    refresh_seconds: float = 0.0
    working_cache_request_rounds: int = 0  # rows over a working cache, summed over rounds


class SpecExtendProposer:
    """SpecExtend's drafting over one of vLLM's proposers (mixed in before
    it: `SpecExtendDraftModelProposer`, `SpecExtendEagleProposer`)."""

    def __init__(self, vllm_config, device: torch.device, runner, settings: SpecExtendConfig):
        super().__init__(vllm_config, device, runner)
        self.runner = runner  # SpecExtend's step reads the batch from it
        self.settings = settings
        self.step = StepRecord()  # what the runner's current step planned

    def load_model(self, target_model: nn.Module) -> None:
        super().load_model(target_model)
        vllm_config, settings = self.vllm_config, self.settings
        # Again with the block size the platform ended with (GPU platforms
        # choose it by attention backend after the front end's check).
        check_engine_fit(settings, vllm_config)
        self.geometry = geometry_of(settings, vllm_config)
        block_size = vllm_config.cache_config.block_size
        max_model_len = vllm_config.model_config.max_model_len
        max_requests = vllm_config.scheduler_config.max_num_seqs
        dtype, device = vllm_config.model_config.dtype, self.device
        forward_context = vllm_config.compilation_config.static_forward_context
        self.draft_layers = {name: forward_context[name]
                             for name in sorted(self._draft_attn_layer_names)}
        cos_sin = _lengthened_rotary(self.model, max_model_len)
        self.rope_backward = backward_table(cos_sin).to(device, dtype)
        self.draft_reader = reader_for(next(iter(self.draft_layers.values())), block_size,
                                       dtype, vllm_config.cache_config.cache_dtype)
        self.caches = self.owners = None
        if settings.builds_working_caches(self.geometry, max_model_len):
            num_caches = settings.max_working_caches_for(max_requests)
            self.caches = WorkingCaches(self.draft_layers, self.geometry, num_caches,
                                        block_size, dtype, device, move_back_)
            self.owners = WorkingCacheOwners(num_caches)
        scratch = _tree_scratch(self.draft_layers, settings, vllm_config, dtype, device)
        window = self.geometry.main_window if self.geometry.window_binds(max_model_len) else None
        install_draft_attention(self.draft_layers, self.rope_backward, self.caches, window,
                                scratch)
        self.retrieval = None
        if self.caches is not None:
            target_layer = _rotary_attention_modules(target_model)[-1].attn
            capture = FinalLayerCapture(target_layer.impl.forward, self.max_num_tokens,
                                        target_layer.num_heads, target_layer.head_size, dtype,
                                        device)
            replace_on_instance(target_layer.impl, "forward", capture.forward,
                                "keep the target's final-layer queries for chunk scores")
            self.retrieval = CrossModelRetrieval(
                settings, self.geometry, capture, target_layer,
                reader_for(target_layer, block_size, dtype, vllm_config.cache_config.cache_dtype),
                block_size, _mean_over_tensor_parallel_ranks)
        self.verification = self.tree_drafter = None
        if settings.verifies_with_hta:  # the trees package is opt-in
            from vllm_specextend.vllm_glue.trees.drafting import TreeDrafter
            from vllm_specextend.vllm_glue.trees.verification import TreeVerification

            target_layers = {name: layer for name, layer in forward_context.items()
                             if name not in self.draft_layers}
            self.verification = TreeVerification(
                settings, self.step, target_layers,
                [] if self.retrieval is None else [self.retrieval.capture.queries])
            if settings.tree:
                self.tree_drafter = TreeDrafter(self, self.step, self.draft_layers,
                                                self.draft_reader, settings,
                                                self.geometry.main_window, block_size)
        self.policy_hooks = self.catch_up = None
        if settings.adaptive:
            self.policy_hooks = PolicyHooks(
                self.speculative_config.num_speculative_tokens, max_requests, device,
                tensor_parallel=vllm_config.parallel_config.tensor_parallel_size > 1)
            self.catch_up = DraftCatchUp(self, max_requests,
                                         self.speculative_config.num_speculative_tokens,
                                         block_size)
        self.counters = WorkingCacheCounters()
        self.clock = StepClock(device)
        self.refresh_times: list[tuple] = []  # (began, ended) not yet read
        self.metrics_file = None
        if get_tensor_model_parallel_rank() == 0:  # every rank counts the same
            self.metrics_file = MetricsFile(vllm_config.model_config.served_model_name)
        self.staging = HostStaging(self.max_num_tokens, device)
        self.rounds = 0
        self._log_allocations(scratch)

    def propose(self, num_speculative_tokens: int, *, target_token_ids: torch.Tensor,
                target_positions: torch.Tensor, next_token_ids: torch.Tensor,
                token_indices_to_sample: torch.Tensor | None, common_attn_metadata,
                num_rejected_tokens_gpu: torch.Tensor | None = None, **vllm_arguments):
        """One drafting round (vLLM's runner passes every argument by name)."""
        metadata = common_attn_metadata
        self.publish_metrics()
        round_length, caught_up = num_speculative_tokens, False
        if self.policy_hooks is not None:
            round_length = self._policy_round_length(metadata, num_speculative_tokens)
            if self._skips_round(metadata, round_length, target_positions,
                                 vllm_arguments.get("target_hidden_states")):
                self.policy_hooks.round_ended(0)
                return self.catch_up.no_drafts(metadata.batch_size())
            caught_up = self._catch_up_draft(metadata)
        # No drafts were verified: the draft samples after each last token.
        query_indices = (metadata.query_start_loc[1:] - 1 if token_indices_to_sample is None
                         else token_indices_to_sample).long()
        self.step.draft_round = self._refresh_and_plan(metadata, query_indices,
                                                       target_positions)
        try:
            if self.tree_drafter is not None:
                return self.tree_drafter.propose(
                    self.runner.input_batch.req_ids[: metadata.num_reqs], self.step.draft_round,
                    target_token_ids, target_positions, next_token_ids, query_indices,
                    metadata, num_rejected_tokens_gpu)
            drafts = super().propose(
                round_length, target_token_ids=target_token_ids,
                target_positions=target_positions, next_token_ids=next_token_ids,
                token_indices_to_sample=token_indices_to_sample,
                common_attn_metadata=metadata, num_rejected_tokens_gpu=num_rejected_tokens_gpu,
                **vllm_arguments)
        finally:
            self.step.draft_round = None
        if self.policy_hooks is not None:
            self.policy_hooks.round_ended(round_length, caught_up)
        return drafts

    def build_per_group_and_layer_attn_metadata(self, common_attn_metadata, draft_index=0):
        """Per-layer metadata of one draft forward: vLLM's own unless a row
        of the round drafts over its working cache, else the split
        `DraftStepPlan`."""
        draft_round = self.step.draft_round
        if draft_round is None or not draft_round.uses_working_caches:
            return super().build_per_group_and_layer_attn_metadata(common_attn_metadata,
                                                                   draft_index)
        [group] = self.draft_attn_groups

        def metadata_of(*sub_batch):
            return group.build_metadata_for_drafting(
                common_attn_metadata=sub_batch_metadata(*sub_batch), draft_index=draft_index)

        positions = self.positions[: common_attn_metadata.num_actual_tokens]
        plan, edits = draft_round.plan_forward(metadata_of, common_attn_metadata, positions,
                                               draft_index)
        edits.apply(positions, common_attn_metadata.slot_mapping)
        return [plan], dict.fromkeys(group.layer_names, plan)

    def _refresh_and_plan(self, metadata, query_indices: torch.Tensor,
                          target_positions: torch.Tensor) -> DraftRound | None:
        """The SpecExtend step of one drafting round (section 3.2): free the
        working caches of requests that left, refresh the due ones, plan
        which rows draft over theirs. None: no request can hold one."""
        round_index = self.rounds
        self.rounds += 1
        if self.caches is None:
            return None
        batch = self.runner.input_batch
        num_reqs = metadata.num_reqs
        req_ids = batch.req_ids[:num_reqs]
        computed = batch.num_computed_tokens_cpu[:num_reqs]
        self.owners.keep_holders(req_ids, computed)
        eligible, choosing = self._choose_contexts(
            req_ids, self._may_hold_working_caches(computed, batch.num_prompt_tokens[:num_reqs]))
        due = self.owners.due_rows(req_ids, eligible, computed, round_index,
                                   self.settings.refresh_every)
        cache_of_row = self.owners.caches_of(req_ids)
        if len(choosing):
            self.policy_hooks.contexts_used([req_ids[row] for row in choosing],
                                            cache_of_row[choosing] != NO_CACHE)
        first_pass_lens = self._scheduled_lens(num_reqs) + self.net_num_new_slots_per_request
        draft_round = DraftRound(self.caches, cache_of_row, first_pass_lens, self.staging)
        if len(due):
            began = self.clock.now()
            self._refresh(metadata, query_indices, target_positions, due, cache_of_row[due])
            draft_round.read_offsets()
            self.refresh_times.append((began, self.clock.now()))
            self.counters.refreshes += 1
            self.counters.working_caches_refreshed += len(due)
        self.counters.working_cache_request_rounds += len(draft_round.compact_rows)
        while self.refresh_times and self.clock.done(self.refresh_times[0][1]):
            self.counters.refresh_seconds += self.clock.seconds(*self.refresh_times.pop(0))
        if draft_round.uses_working_caches:
            info_first("SpecExtend: first working caches filled (%d of %d requests past "
                       "%d tokens)", len(draft_round.compact_rows), num_reqs,
                       self.geometry.retrieval_min_len)
        return draft_round

    def _may_hold_working_caches(self, computed: np.ndarray,
                                 prompt_lens: np.ndarray) -> np.ndarray:
        """Rows past the working cache's threshold and done with the prompt."""
        return (computed > self.geometry.retrieval_min_len) & (computed >= prompt_lens)

    def _rows_with_a_choice(self, computed: np.ndarray, prompt_lens: np.ndarray) -> np.ndarray:
        """Rows that may draft over a working cache and that the draft window
        still shows whole: the policy chooses their context
        (`policy.context_choice`)."""
        if self.caches is None:
            return np.zeros(0, dtype=np.int64)
        return np.flatnonzero(self._may_hold_working_caches(computed, prompt_lens)
                              & (computed <= self.geometry.whole_context_max_len))

    def _choose_contexts(self, req_ids: list[str],
                         eligible: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The rows that may draft over a working cache, and those of them the
        policy chose a context for this round. A request choosing its whole
        context frees its cache (the first pass keeps vLLM's draft cache
        current for every row); taking one again fills it afresh."""
        if self.policy_hooks is None:
            return eligible, np.zeros(0, dtype=np.int64)
        choosing, wants_working_cache = self.policy_hooks.round_contexts
        whole = choosing[~wants_working_cache]
        for row in whole:
            self.owners.release(req_ids[row])
        eligible = eligible.copy()
        eligible[whole] = False
        return eligible, choosing

    def _refresh(self, metadata, query_indices, target_positions, rows: np.ndarray,
                 caches: np.ndarray) -> None:
        """Score, select and lay out the working cache of each of `rows`."""
        rows = self.staging.to_device("due_rows", rows)
        caches = self.staging.to_device("due_caches", caches)
        query_start_loc = metadata.query_start_loc
        cached_lens = (metadata.seq_lens - (query_start_loc[1:] - query_start_loc[:-1]))[rows]
        last_accepted = query_indices[rows]
        block_table = metadata.block_table_tensor[rows]
        layout = self.retrieval.layout(last_accepted, cached_lens,
                                       target_positions[last_accepted].long() + 1,
                                       block_table, metadata.max_seq_len)
        self.caches.fill(self.draft_layers, self.draft_reader, block_table, caches, layout,
                         self.rope_backward)

    def _policy_round_length(self, metadata, num_speculative_tokens: int) -> int:
        """The policy's draft length for this round (at most vLLM's)."""
        batch = self.runner.input_batch
        num_reqs = metadata.num_reqs
        req_ids = batch.req_ids[:num_reqs]
        computed = batch.num_computed_tokens_cpu[:num_reqs]
        prompt_lens = batch.num_prompt_tokens[:num_reqs]
        context = computed + self._scheduled_lens(num_reqs)
        # Done with the prompt after this step: its drafts will be verified.
        decoding = context >= prompt_lens
        return self.policy_hooks.round_length(req_ids, decoding, num_speculative_tokens,
                                              int(context.sum()),
                                              self.catch_up.stale.behind(req_ids, computed),
                                              self._rows_with_a_choice(computed, prompt_lens))

    def _skips_round(self, metadata, round_length: int, target_positions: torch.Tensor,
                     target_hidden_states: torch.Tensor | None) -> bool:
        """Whether this round runs no draft forward (`DraftCatchUp.skips`).
        A skipped round's tokens reach the draft's cache in the next round
        that drafts, before its refresh: the working caches of the batch's
        requests are refilled there from it."""
        batch = self.runner.input_batch
        num_reqs = metadata.num_reqs
        req_ids = batch.req_ids[:num_reqs]
        skips = self.catch_up.skips(
            round_length, req_ids, batch.num_computed_tokens_cpu[:num_reqs],
            self._scheduled_lens(num_reqs), batch.num_prompt_tokens[:num_reqs],
            target_positions, target_hidden_states)
        if skips and self.owners is not None:
            self.owners.refill_next(req_ids)
        return skips

    def _catch_up_draft(self, metadata) -> bool:
        """The draft reads the tokens of the rounds it skipped; whether any."""
        batch = self.runner.input_batch
        num_reqs = metadata.num_reqs
        return self.catch_up.catch_up(metadata, batch.req_ids[:num_reqs],
                                      batch.num_computed_tokens_cpu[:num_reqs],
                                      batch.token_ids_cpu)

    def _scheduled_lens(self, num_reqs: int) -> np.ndarray:
        """Tokens the target ran for each request this step (host copy)."""
        return np.diff(self.runner.query_start_loc.np[: num_reqs + 1])

    def forget(self, req_id: str) -> None:
        """The request finished: free its working cache, tree and policy state."""
        if self.owners is not None:
            self.owners.release(req_id)
        if self.policy_hooks is not None:
            self.policy_hooks.forget(req_id)
            self.catch_up.forget(req_id)
        self.step.proposed_trees.pop(req_id, None)
        # vLLM dropped it already: with the last one gone, the totals are final.
        self.publish_metrics(force=not self.runner.requests)

    def request_state(self) -> dict:
        """How many requests each per-request structure still holds, the
        working caches' counters and the speculation policy's."""
        state = {"working_cache_holders": len(self.owners.holder) if self.owners else 0,
                 "working_caches": self.caches.num_caches if self.caches else 0,
                 "proposed_trees": len(self.step.proposed_trees),
                 **dataclasses.asdict(self.counters)}
        if self.policy_hooks is not None:
            state.update(self.policy_hooks.policy.state() | self.catch_up.state())
        return state

    def publish_metrics(self, force: bool = False) -> None:
        """To vLLM's metrics (`metrics.MetricsFile`): at most once a second,
        or now (the last request finished)."""
        if self.metrics_file is not None and self.metrics_file.due(force):
            self.metrics_file.write(self.request_state(), force)

    def _log_allocations(self, scratch) -> None:
        parts = []
        if self.caches is not None:
            parts.append(f"working caches {self.caches.num_caches} x "
                         f"{self.geometry.capacity} tokens x {len(self.draft_layers)} draft "
                         f"layers = {self.caches.nbytes / MIB:.1f} MiB")
            parts.append(f"target query capture {self.retrieval.capture.nbytes / MIB:.1f} MiB")
        if scratch:
            size = sum(t.numel() * t.element_size() for pair in scratch.values() for t in pair)
            parts.append(f"tree scratch {size / MIB:.1f} MiB")
        if self.catch_up is not None and self.catch_up.hidden is not None:
            parts.append("target hidden states of skipped rounds "
                         f"{self.catch_up.hidden.nbytes / MIB:.1f} MiB")
        logger.info("SpecExtend: allocated at load, before vLLM sizes its KV cache: %s",
                    "; ".join(parts) or "nothing (no request can pass the draft window)")


class SpecExtendDraftModelProposer(SpecExtendProposer, DraftModelProposer):
    """SpecExtend over a separate draft model."""


class SpecExtendEagleProposer(SpecExtendProposer, EagleProposer):
    """SpecExtend over an EAGLE head."""

    def combined_hidden_states(self, target_hidden_states: torch.Tensor) -> torch.Tensor:
        """The target's hidden states as the head's first pass reads them
        (an EAGLE-3 head first combines the target's auxiliary layers)."""
        if self.method == "eagle3":
            return self.model.combine_hidden_states(target_hidden_states)
        return target_hidden_states


def install_proposer(runner, settings: SpecExtendConfig) -> None:
    """Replace the proposer vLLM's runner built with SpecExtend's over the
    same kind (before any model loads)."""
    for stock, ours in ((EagleProposer, SpecExtendEagleProposer),
                        (DraftModelProposer, SpecExtendDraftModelProposer)):
        if isinstance(runner.drafter, stock):
            runner.drafter = ours(runner.vllm_config, runner.device, runner, settings)
            return
    raise SpecExtendConfigError(
        f"speculative_config.draft_method: SpecExtend drafts with a draft model or an EAGLE "
        f"head, not with vLLM's {type(runner.drafter).__name__}")


def proposer_of(runner) -> SpecExtendProposer | None:
    """The runner's SpecExtend proposer, if it serves SpecExtend."""
    drafter = getattr(runner, "drafter", None)
    return drafter if isinstance(drafter, SpecExtendProposer) else None


def _mean_over_tensor_parallel_ranks(scores: torch.Tensor) -> torch.Tensor:
    world_size = get_tensor_model_parallel_world_size()
    return scores if world_size == 1 else tensor_model_parallel_all_reduce(scores) / world_size


def _rotary_attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "rotary_emb") and hasattr(m, "attn")]


def _lengthened_rotary(draft_model: nn.Module, num_positions: int) -> torch.Tensor:
    """The draft's RoPE table (float32) over the target's length. Queries and
    keys keep their true positions; the draft's own table is lengthened
    (recorded) where it is shorter, so a request past the draft's positions
    still rotates (the sliding window keeps what a query spans in range)."""
    modules = _rotary_attention_modules(draft_model)
    if not modules:
        raise SpecExtendConfigError(
            "speculative_config.model: no rotary attention layers found in the draft")
    rotary = modules[0].rotary_emb
    if not getattr(rotary, "is_neox_style", False) or rotary.rotary_dim != modules[0].attn.head_size:
        raise SpecExtendConfigError(
            "speculative_config.model: SpecExtend needs a draft with full-head NeoX-style "
            "rotary embeddings (Llama, Qwen2, Mistral)")
    table = rotary_table(rotary, max(num_positions, rotary.cos_sin_cache.shape[0]))
    for module in {id(m.rotary_emb): m.rotary_emb for m in modules}.values():
        if module.cos_sin_cache.shape[0] < num_positions:
            replace_on_instance(module, "cos_sin_cache",
                                table.to(module.cos_sin_cache.device,
                                         module.cos_sin_cache.dtype),
                                "the draft's RoPE table over the target's length")
    return table


def _tree_scratch(layers, settings: SpecExtendConfig, vllm_config, dtype, device):
    """Per draft layer, keys and values of every tree node a step can grow."""
    if not settings.tree:
        return {}
    rows = (vllm_config.scheduler_config.max_num_seqs * settings.tree_max_depth
            * settings.tree_nodes)
    return {name: tuple(torch.zeros(rows, layer.num_kv_heads, layer.head_size, dtype=dtype,
                                    device=device) for _ in range(2))
            for name, layer in layers.items()}

