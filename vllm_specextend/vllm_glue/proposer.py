"""Draft side of SpecExtend inside vLLM's draft proposers (V1 runner).

After the proposer loads the draft, `SpecExtendDrafting` attaches to it and
allocates, before vLLM measures memory for its KV cache, everything it
keeps: the working caches, the target's final-layer query capture, the tree
scratch rows. Each draft layer's attention is wrapped (`draft_attention`).
Each drafting round (`wrap_proposer_propose`): with the speculation policy
on, pick the round's length, and skip the draft where every request
stepped aside, else first let it read what skipped rounds left out
(`draft_catch_up`); then `before_drafting`, the SpecExtend step: free the
caches of requests that left, refresh when due (score, select, lay out),
and plan which rows draft over their working cache.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging

import numpy as np
import torch
from torch import nn
from vllm.distributed import get_tensor_model_parallel_rank

from vllm_specextend.attention.rope import backward_table, rotary_table
from vllm_specextend.config import SpecExtendConfig, SpecExtendConfigError
from vllm_specextend.metrics import MetricsFile
from vllm_specextend.policy.step_clock import StepClock
from vllm_specextend.vllm_glue.cross_model_retrieval import (
    CrossModelRetrieval,
    FinalLayerCapture,
)
from vllm_specextend.vllm_glue.draft_attention import install_draft_attention
from vllm_specextend.vllm_glue.draft_catch_up import DraftCatchUp
from vllm_specextend.vllm_glue.engine_config import check_engine_fit, geometry_of, settings_of
from vllm_specextend.vllm_glue.kv_cache_reader import reader_for
from vllm_specextend.vllm_glue.patching import replace_on_instance
from vllm_specextend.vllm_glue.speculation_policy import PolicyHooks
from vllm_specextend.vllm_glue.tree_drafting import TreeDrafter
from vllm_specextend.vllm_glue.tree_step import TREE_STATE
from vllm_specextend.vllm_glue.working_cache import DraftRound, HostStaging, WorkingCaches

logger = logging.getLogger("vllm.specextend")
MIB = 1 << 20


@dataclasses.dataclass
class WorkingCacheCounters:
    """Totals since start-up, for metrics."""

    refreshes: int = 0  # drafting rounds that refreshed working caches
    working_caches_refreshed: int = 0
    refresh_seconds: float = 0.0
    working_cache_request_rounds: int = 0  # rows over a working cache, summed over rounds


class SpecExtendDrafting:
    """Everything SpecExtend keeps beside one draft proposer."""

    def __init__(self, proposer, target_model: nn.Module, settings: SpecExtendConfig):
        vllm_config = proposer.vllm_config
        # Again with the block size the platform ended with (GPU platforms
        # choose it by attention backend after the front end's check).
        check_engine_fit(settings, vllm_config)
        self.proposer = proposer
        self.settings = settings
        self.geometry = geometry_of(settings, vllm_config)
        block_size = vllm_config.cache_config.block_size
        max_model_len = vllm_config.model_config.max_model_len
        dtype, device = vllm_config.model_config.dtype, proposer.device
        forward_context = vllm_config.compilation_config.static_forward_context
        self.layers = {name: forward_context[name]
                       for name in sorted(proposer._draft_attn_layer_names)}
        cos_sin = _lengthened_rotary(proposer.model, max_model_len)
        self.backward = backward_table(cos_sin).to(device, dtype)
        self.reader = reader_for(next(iter(self.layers.values())), block_size, dtype,
                                 vllm_config.cache_config.cache_dtype)
        self.caches = None
        if settings.builds_working_caches(self.geometry, max_model_len):
            num_caches = settings.max_working_caches_for(vllm_config.scheduler_config.max_num_seqs)
            self.caches = WorkingCaches(self.layers, self.geometry, num_caches, block_size,
                                        dtype, device)
        scratch = _tree_scratch(self.layers, settings, vllm_config, dtype, device)
        window = self.geometry.main_window if self.geometry.window_binds(max_model_len) else None
        install_draft_attention(self.layers, self.backward, self.caches, window, scratch)
        self.retrieval = None
        if self.caches is not None:
            target_layer = _rotary_attention_modules(target_model)[-1].attn
            capture = FinalLayerCapture(target_layer.impl.forward, proposer.max_num_tokens,
                                        target_layer.num_heads, target_layer.head_size, dtype,
                                        device)
            replace_on_instance(target_layer.impl, "forward", capture.forward,
                                "keep the target's final-layer queries for chunk scores")
            self.retrieval = CrossModelRetrieval(
                settings, self.geometry, capture, target_layer,
                reader_for(target_layer, block_size, dtype, vllm_config.cache_config.cache_dtype),
                block_size)
        self.tree_drafter = None
        if settings.tree:
            self.tree_drafter = TreeDrafter(proposer, self.layers, self.reader, settings,
                                            self.geometry.main_window, block_size)
        self.policy_hooks = self.catch_up = None
        if settings.adaptive:
            max_requests = vllm_config.scheduler_config.max_num_seqs
            self.policy_hooks = PolicyHooks(
                vllm_config.speculative_config.num_speculative_tokens, max_requests, device,
                tensor_parallel=vllm_config.parallel_config.tensor_parallel_size > 1)
            self.catch_up = DraftCatchUp(proposer, max_requests, block_size)
        self.counters = WorkingCacheCounters()
        self.clock = StepClock(device)
        self.refresh_times: list[tuple] = []  # (began, ended) not yet read
        self.metrics_file = None
        if get_tensor_model_parallel_rank() == 0:  # every rank counts the same
            self.metrics_file = MetricsFile(vllm_config.model_config.served_model_name)
        self.staging = HostStaging(proposer.max_num_tokens, device)
        self.runner = proposer.specextend_runner
        self.rounds = 0
        self.round: DraftRound | None = None
        self._logged_first_working_caches = False
        self._log_allocations(scratch)

    def _log_allocations(self, scratch) -> None:
        parts = []
        if self.caches is not None:
            parts.append(f"working caches {self.caches.num_caches} x "
                         f"{self.geometry.capacity} tokens x {len(self.layers)} draft layers = "
                         f"{self.caches.nbytes / MIB:.1f} MiB")
            parts.append(f"target query capture {self.retrieval.capture.nbytes / MIB:.1f} MiB")
        if scratch:
            size = sum(t.numel() * t.element_size() for pair in scratch.values() for t in pair)
            parts.append(f"tree scratch {size / MIB:.1f} MiB")
        logger.info("SpecExtend: allocated at load, before vLLM sizes its KV cache: %s",
                    "; ".join(parts) or "nothing (no request can pass the draft window)")

    def before_drafting(self, metadata, query_indices: torch.Tensor,
                        target_positions: torch.Tensor) -> None:
        """The SpecExtend step of one drafting round (section 3.2)."""
        round_index = self.rounds
        self.rounds += 1
        if self.caches is None:
            return
        batch = self.runner.input_batch
        num_reqs = metadata.num_reqs
        req_ids = batch.req_ids[:num_reqs]
        computed = batch.num_computed_tokens_cpu[:num_reqs]
        self.caches.keep_holders(req_ids, computed)
        # Past the threshold and done with the prompt: a decoding step.
        eligible = (computed > self.geometry.retrieval_min_len) & (
            computed >= batch.num_prompt_tokens[:num_reqs])
        due = self.caches.due_rows(req_ids, eligible, computed, round_index,
                                   self.settings.refresh_every)
        cache_of_row = self.caches.caches_of(req_ids)
        first_pass_lens = (self._scheduled_lens(num_reqs)
                           + self.proposer.net_num_new_slots_per_request)
        self.round = DraftRound(self.caches, cache_of_row, first_pass_lens, self.staging)
        if len(due):
            began = self.clock.now()
            self._refresh(metadata, query_indices, target_positions, due, cache_of_row[due])
            self.round.read_offsets()
            self.refresh_times.append((began, self.clock.now()))
            self.counters.refreshes += 1
            self.counters.working_caches_refreshed += len(due)
        self.counters.working_cache_request_rounds += len(self.round.compact_rows)
        while self.refresh_times and self.clock.done(self.refresh_times[0][1]):
            self.counters.refresh_seconds += self.clock.seconds(*self.refresh_times.pop(0))
        if not self._logged_first_working_caches and self.round.uses_working_caches:
            self._logged_first_working_caches = True
            logger.info("SpecExtend: first working caches filled (%d of %d requests past "
                        "%d tokens)", len(self.round.compact_rows), num_reqs,
                        self.geometry.retrieval_min_len)

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
        self.caches.fill(self.layers, self.reader, block_table, caches, layout, self.backward)

    def end_round(self) -> None:
        self.round = None

    def forget(self, req_id: str) -> None:
        """The request finished: free its working cache, tree and policy state."""
        if self.caches is not None:
            self.caches.release(req_id)
        if self.policy_hooks is not None:
            self.policy_hooks.forget(req_id)
            self.catch_up.stale.forget(req_id)
        TREE_STATE.proposed.pop(req_id, None)
        # vLLM dropped it already: with the last one gone, the totals are final.
        self.publish_metrics(force=not self.runner.requests)

    def request_state(self) -> dict:
        """How many requests each per-request structure still holds, the
        working caches' counters and the speculation policy's."""
        state = {"working_cache_holders": len(self.caches.holder) if self.caches else 0,
                 "working_caches": self.caches.num_caches if self.caches else 0,
                 "proposed_trees": len(TREE_STATE.proposed),
                 **dataclasses.asdict(self.counters)}
        if self.policy_hooks is not None:
            state.update(self.policy_hooks.state() | self.catch_up.state())
        return state

    def publish_metrics(self, force: bool = False) -> None:
        """To vLLM's metrics (`metrics.MetricsFile`): at most once a second,
        or now (the last request finished)."""
        if self.metrics_file is not None:
            self.metrics_file.write(self.request_state(), force)

    def _scheduled_lens(self, num_reqs: int) -> np.ndarray:
        """Tokens the target ran for each request this step (host copy)."""
        return np.diff(self.runner.query_start_loc.np[: num_reqs + 1])

    def skips_round(self, metadata, round_length: int) -> bool:
        """Whether this round runs no draft forward (`DraftCatchUp.skips`)."""
        batch = self.runner.input_batch
        num_reqs = metadata.num_reqs
        req_ids = batch.req_ids[:num_reqs]
        holds_working_cache = self.caches is not None and any(
            req_id in self.caches.holder for req_id in req_ids)
        return self.catch_up.skips(
            round_length, req_ids, batch.num_computed_tokens_cpu[:num_reqs],
            self._scheduled_lens(num_reqs), batch.num_prompt_tokens[:num_reqs],
            holds_working_cache)

    def catch_up_draft(self, metadata) -> bool:
        """The draft reads the tokens of the rounds it skipped; whether any."""
        batch = self.runner.input_batch
        num_reqs = metadata.num_reqs
        return self.catch_up.catch_up(metadata, batch.req_ids[:num_reqs],
                                      batch.num_computed_tokens_cpu[:num_reqs],
                                      batch.token_ids_cpu)

    def round_length(self, metadata, num_speculative_tokens: int) -> int:
        """The policy's draft length for this round (at most vLLM's)."""
        batch = self.runner.input_batch
        num_reqs = metadata.num_reqs
        context = batch.num_computed_tokens_cpu[:num_reqs] + self._scheduled_lens(num_reqs)
        # Done with the prompt after this step: its drafts will be verified.
        decoding = context >= batch.num_prompt_tokens[:num_reqs]
        return self.policy_hooks.round_length(batch.req_ids[:num_reqs], decoding,
                                              num_speculative_tokens, int(context.sum()))

    def plan_forward(self, proposer, cad, draft_index: int):
        """Per-layer metadata of one draft forward: vLLM's own when no row of
        the round holds a working cache, else the split `DraftStepPlan`."""
        [group] = proposer.draft_attn_groups

        def builder_of(sub_cad):
            return group.build_metadata_for_drafting(common_attn_metadata=sub_cad,
                                                     draft_index=draft_index)

        positions = proposer.positions[: cad.num_actual_tokens]
        plan = self.round.plan_forward(builder_of, cad, positions, draft_index)
        return [plan], dict.fromkeys(group.layer_names, plan)


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


def wrap_proposer_load_model(original):
    @functools.wraps(original)
    def load_model(self, target_model, *args, **kwargs):
        original(self, target_model, *args, **kwargs)
        settings = settings_of(self.vllm_config)
        if settings is not None:
            replace_on_instance(self, "specextend",
                                SpecExtendDrafting(self, target_model, settings),
                                "SpecExtend's state beside the proposer", adding=True)

    return load_model


def wrap_input_fits_in_drafter(original):
    """vLLM skips drafting for a whole batch when one request is longer than
    the draft's positions; SpecExtend's draft takes any length."""

    @functools.wraps(original)
    def input_fits_in_drafter(self, common_attn_metadata):
        if getattr(self, "specextend_config", None) is not None:
            return common_attn_metadata is not None
        return original(self, common_attn_metadata)

    return input_fits_in_drafter


def wrap_build_attn_metadata(original):
    """Draft forwards of a round with working caches get SpecExtend's plan."""

    @functools.wraps(original)
    def build_per_group_and_layer_attn_metadata(self, common_attn_metadata, draft_index=0):
        drafting = getattr(self, "specextend", None)
        if drafting is None or drafting.round is None or not drafting.round.uses_working_caches:
            return original(self, common_attn_metadata, draft_index)
        return drafting.plan_forward(self, common_attn_metadata, draft_index)

    return build_per_group_and_layer_attn_metadata


def wrap_proposer_propose(original):
    """Run SpecExtend's step before each drafting round; in tree mode, draft
    trees instead of chains."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def propose(self, *args, **kwargs):
        drafting = getattr(self, "specextend", None)
        if drafting is None:
            return original(self, *args, **kwargs)
        drafting.publish_metrics()
        bound = signature.bind(self, *args, **kwargs).arguments
        metadata = bound["common_attn_metadata"]
        hooks = drafting.policy_hooks
        if hooks is not None:
            round_length = drafting.round_length(metadata, bound["num_speculative_tokens"])
            if drafting.skips_round(metadata, round_length):
                hooks.round_ended(0)
                return drafting.catch_up.no_drafts(metadata.batch_size())
            caught_up = drafting.catch_up_draft(metadata)
            bound["num_speculative_tokens"] = round_length
            args, kwargs = (), {name: value for name, value in bound.items() if name != "self"}
        query_indices = bound.get("token_indices_to_sample")
        if query_indices is None:  # no drafts were verified: the last token
            query_indices = metadata.query_start_loc[1:] - 1
        drafting.before_drafting(metadata, query_indices.long(), bound["target_positions"])
        try:
            if drafting.tree_drafter is None:
                drafts = original(self, *args, **kwargs)
                if hooks is not None:
                    hooks.round_ended(round_length, caught_up)
                return drafts
            return drafting.tree_drafter.propose(
                drafting.runner.input_batch.req_ids[: metadata.num_reqs], drafting.round,
                bound["target_token_ids"], bound["target_positions"], bound["next_token_ids"],
                query_indices, metadata, bound.get("num_rejected_tokens_gpu"))
        finally:
            drafting.end_round()

    return propose
