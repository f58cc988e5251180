"""The registry of every change vllm-specextend makes to vLLM's classes and
modules: `PATCHES`, applied by the plugin's entry point. Importing it
imports every glue module, and with them the vLLM internals they use; the
entry point does so only after checking vLLM's version, and refuses
cleanly if the import fails."""


from vllm_specextend.vllm_glue.engine_config import (
    wrap_create_engine_config,
    wrap_v2_runner_unsupported,
)
from vllm_specextend.vllm_glue.patching import Patch
from vllm_specextend.vllm_glue.processes import (
    add_worker_state,
    wrap_execute_model,
    wrap_prepare_inputs,
    wrap_runner_init,
    wrap_sample,
    wrap_sample_tokens,
    wrap_take_draft_token_ids,
)
from vllm_specextend.vllm_glue.sampling import (
    wrap_apply_sampling_constraints,
    wrap_expand_batch_to_tokens,
    wrap_validate_params,
)

PATCHES = [
    Patch(
        "vllm.engine.arg_utils",
        "EngineArgs.create_engine_config",
        wrap_create_engine_config,
        "accept method 'specextend', validate its settings, run as draft_model",
    ),
    Patch(
        "vllm.config.vllm",
        "VllmConfig._get_v2_model_runner_unsupported_features",
        wrap_v2_runner_unsupported,
        "SpecExtend's runner hooks live in the V1 model runner",
    ),
    Patch(
        "vllm.v1.worker.gpu_model_runner",
        "GPUModelRunner.__init__",
        wrap_runner_init,
        "give each model runner (CPU runner included) its SpecExtend settings and "
        "SpecExtend's proposer",
    ),
    Patch(
        "vllm.v1.worker.gpu_model_runner",
        "GPUModelRunner.execute_model",
        wrap_execute_model,
        "speculation policy: time the step, note the drafts it verifies",
    ),
    Patch(
        "vllm.v1.worker.gpu_model_runner",
        "GPUModelRunner.sample_tokens",
        wrap_sample_tokens,
        "speculation policy: learn what the step accepted and what it cost",
    ),
    Patch(
        "vllm.v1.worker.gpu_model_runner",
        "GPUModelRunner.take_draft_token_ids",
        wrap_take_draft_token_ids,
        "speculation policy: hand the scheduler each request's drafts cut to its pick",
    ),
    Patch(
        "vllm.v1.worker.gpu_model_runner",
        "GPUModelRunner._prepare_inputs",
        wrap_prepare_inputs,
        "HTA verification: the step's rows (trees at tree positions, or chains) planned "
        "once for every target layer",
    ),
    Patch(
        "vllm.v1.worker.gpu_model_runner",
        "GPUModelRunner._sample",
        wrap_sample,
        "tree mode: draw the target's token at every tree row with vLLM's sampler, "
        "accept a path of each tree and compact its K/V",
    ),
    Patch(
        "vllm.v1.sample.rejection_sampler",
        "expand_batch_to_tokens",
        wrap_expand_batch_to_tokens,
        "CPU build: vLLM's fallback loses float sampling parameters; chains that "
        "sample go through vLLM's rejection sampler",
        on_serving=True,
    ),
    Patch(
        "vllm.v1.sample.rejection_sampler",
        "apply_sampling_constraints",
        wrap_apply_sampling_constraints,
        "CPU build: a sampling step with no drafts at all skips vLLM's top-k "
        "fallback, which fails on zero rows",
        on_serving=True,
    ),
    Patch(
        "vllm.v1.engine.input_processor",
        "InputProcessor._validate_params",
        wrap_validate_params,
        "tree mode: refuse, naming it, a sampling parameter a tree cannot serve",
    ),
    Patch(
        "vllm.v1.worker.worker_base",
        "WorkerBase.specextend_state",
        add_worker_state,
        "report the plugin's per-request state and the worker's memory (soak checks)",
        adds=True,
    ),
]
