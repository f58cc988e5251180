"""Sampling with SpecExtend through vLLM's own sampler.

Chains go through vLLM's rejection sampler, on the CPU build too: its CPU
fallback for `expand_batch_to_tokens` casts float parameters (temperature,
top-p) to int64 and writes into that copy, so the expansion is replaced
there (CPU tensors, in processes serving SpecExtend: `Patch.on_serving`)
by a plain repeat. Its CPU top-k fallback also fails on a step with no
drafts at all (`k.max()` of an empty tensor: every request prefilling, or
past the draft's reach), so such a step skips the constraints, which have
no draft rows to act on.

Trees draw the target's token at every tree row with vLLM's `Sampler`,
given its sampling metadata with one row per tree row (the request's
parameters and its own generator repeated): temperature, top-k, top-p,
seeds, allowed_token_ids and logprobs behave as without speculation.
Penalties, bad words and min_tokens depend on the tokens before a row,
which differ from branch to branch: a tree-mode engine refuses them at
request validation (HTTP 400 through the server), naming the parameter.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from vllm_specextend.tree.verification import tree_mode_refusal
from vllm_specextend.vllm_glue.engine_config import settings_of


def node_sampling_metadata(metadata, rows_per_request: torch.Tensor):
    """`metadata` with request r's parameters on each of its
    rows_per_request[r] consecutive rows."""
    from vllm.v1.sample.logits_processor import LogitsProcessors

    total = int(rows_per_request.sum())
    request_of_row = torch.arange(len(rows_per_request)).repeat_interleave(
        rows_per_request, output_size=total)
    starts = (rows_per_request.cumsum(0) - rows_per_request).tolist()

    def per_row(values):
        return None if values is None else values[request_of_row.to(values.device)]

    return dataclasses.replace(
        metadata,
        temperature=per_row(metadata.temperature), top_p=per_row(metadata.top_p),
        top_k=per_row(metadata.top_k),
        generators={starts[request] + offset: generator
                    for request, generator in metadata.generators.items()
                    for offset in range(int(rows_per_request[request]))},
        allowed_token_ids_mask=per_row(metadata.allowed_token_ids_mask),
        # Read only for penalties, which a tree-mode engine refuses.
        output_token_ids=[],
        prompt_token_ids=per_row(metadata.prompt_token_ids),
        frequency_penalties=per_row(metadata.frequency_penalties),
        presence_penalties=per_row(metadata.presence_penalties),
        repetition_penalties=per_row(metadata.repetition_penalties),
        bad_words_token_ids={}, logitsprocs=LogitsProcessors(), logprob_token_ids=None,
        spec_token_ids=None, thinking_budget_state_holder=None)


def wrap_apply_sampling_constraints(original):
    @functools.wraps(original)
    def apply_sampling_constraints(logits, cu_num_draft_tokens, sampling_metadata):
        if logits.is_cpu and logits.shape[0] == 0:
            return logits
        return original(logits, cu_num_draft_tokens, sampling_metadata)

    return apply_sampling_constraints


def wrap_validate_params(original):
    @functools.wraps(original)
    def _validate_params(self, params, *args, **kwargs):
        result = original(self, params, *args, **kwargs)
        settings = settings_of(self.vllm_config)
        if settings is None or not settings.tree or not hasattr(params, "bad_words"):
            return result
        refused = tree_mode_refusal(params)
        if refused is not None:
            from vllm.exceptions import VLLMValidationError

            name, value = refused
            raise VLLMValidationError(
                f"{name}={value!r} is not supported with speculative_config.tree=true: "
                f"it depends on the tokens before each draft, which differ between a "
                f"tree's branches; use chain drafts (tree=false) for it", parameter=name,
                value=value)
        return result

    return _validate_params


def wrap_expand_batch_to_tokens(original):
    @functools.wraps(original)
    def expand_batch_to_tokens(x, cu_num_tokens, num_tokens, replace_from=0, replace_to=0):
        if not x.is_cpu:
            return original(x, cu_num_tokens, num_tokens, replace_from, replace_to)
        counts = torch.diff(cu_num_tokens, prepend=cu_num_tokens.new_zeros(1))
        expanded = x.repeat_interleave(counts, output_size=num_tokens)
        return torch.where(expanded == replace_from, replace_to, expanded).to(x.dtype)

    return expand_batch_to_tokens
