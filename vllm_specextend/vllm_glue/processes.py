"""Worker processes: pick up the settings sent with the VllmConfig, log them
once, install SpecExtend's proposer in the runner, and hook the runner's
step: for the speculation policy (timing, accepted drafts, picks) and for
HTA verification (the step's rows planned after `_prepare_inputs`, trees
accepted in `_sample`). Each hook asks the runner's proposer; a runner
without one runs vLLM's step untouched."""

from __future__ import annotations

import functools
import sys

from vllm_specextend.process_memory import malloc_totals
from vllm_specextend.vllm_glue.engine_config import log_settings
from vllm_specextend.vllm_glue.patching import replace_on_instance, serving_started
from vllm_specextend.vllm_glue.proposer import install_proposer, proposer_of
from vllm_specextend.vllm_glue.speculation_policy import PolicyHooks


def wrap_runner_init(original):
    """Wrap `GPUModelRunner.__init__` (the CPU runner's too): a runner that
    serves SpecExtend gets its settings, the rest nothing."""

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        vllm_config = kwargs.get("vllm_config") or args[0]
        settings = log_settings("worker", vllm_config)
        if settings is None:
            return original(self, *args, **kwargs)
        serving_started()
        if settings.verifies_with_hta:
            # Before the model builds its attention layers.
            from vllm_specextend.vllm_glue.trees.backend import register_hybrid_tree_backend

            register_hybrid_tree_backend()
        original(self, *args, **kwargs)
        if hasattr(self, "drafter"):  # the last pipeline stage
            install_proposer(self, settings)
            # vLLM skips drafting for a whole batch when one request is
            # longer than the draft's positions; SpecExtend's draft takes any.
            self.effective_drafter_max_model_len = self.max_model_len
        replace_on_instance(self, "_on_request_state_removed",
                            _forgetting_requests(self, self._on_request_state_removed),
                            "drop a finished request's SpecExtend state with vLLM's")

    return __init__


def _forgetting_requests(runner, hook):
    """vLLM's hook for request-scoped side caches, extended to SpecExtend's."""

    def on_request_state_removed(req_id, req_state):
        hook(req_id, req_state)
        proposer = proposer_of(runner)
        if proposer is not None:
            proposer.forget(req_id)

    return on_request_state_removed


def _policy_hooks_of(runner) -> PolicyHooks | None:
    proposer = proposer_of(runner)
    return None if proposer is None else proposer.policy_hooks


def wrap_execute_model(original):
    @functools.wraps(original)
    def execute_model(self, scheduler_output, *args, **kwargs):
        hooks = _policy_hooks_of(self)
        if hooks is not None:
            hooks.step_began(scheduler_output)
        return original(self, scheduler_output, *args, **kwargs)

    return execute_model


def wrap_sample_tokens(original):
    @functools.wraps(original)
    def sample_tokens(self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        hooks = _policy_hooks_of(self)
        if hooks is not None:
            hooks.step_ended(output)
        return output

    return sample_tokens


def _verification_of(runner):
    proposer = proposer_of(runner)
    return None if proposer is None else proposer.verification


def wrap_prepare_inputs(original):
    @functools.wraps(original)
    def _prepare_inputs(self, scheduler_output, *args, **kwargs):
        result = original(self, scheduler_output, *args, **kwargs)
        verification = _verification_of(self)
        if verification is not None:
            _, spec_decode_metadata, _ = result
            verification.plan(self, spec_decode_metadata)
        return result

    return _prepare_inputs


def wrap_sample(original):
    @functools.wraps(original)
    def _sample(self, logits, spec_decode_metadata):
        verification = _verification_of(self)
        if verification is None:
            return original(self, logits, spec_decode_metadata)
        return verification.sample(self, logits, spec_decode_metadata,
                                   functools.partial(original, self))

    return _sample


def wrap_take_draft_token_ids(original):
    @functools.wraps(original)
    def take_draft_token_ids(self):
        hooks = _policy_hooks_of(self)
        taken = original(self)
        return taken if hooks is None else hooks.cut_to_picks(taken)

    return take_draft_token_ids


def add_worker_state(_absent):
    """A worker method for `collective_rpc("specextend_state")` (the dev
    server's /collective_rpc): what the plugin holds per request, beside
    vLLM's own count, and the process's memory; soak checks read it."""

    def specextend_state(self) -> dict:
        import psutil

        runner = getattr(self, "model_runner", None)
        proposer = proposer_of(runner)
        state = {"specextend": proposer is not None,
                 "rss_bytes": psutil.Process().memory_info().rss,
                 "vllm_requests": len(runner.requests) if runner is not None else 0,
                 "python_allocated_blocks": sys.getallocatedblocks(),
                 **malloc_totals()}
        if proposer is not None:
            state.update(proposer.request_state())
        return state

    return specextend_state
