"""What a draft's files say, read before vLLM loads it: its config.json
(a speculators-format EAGLE-3 head read as vLLM reads it), which of vLLM's
methods runs it, and whether an EAGLE-3 head names the target layers it
reads."""

from __future__ import annotations

import json
from pathlib import Path

from vllm_specextend.config import SpecExtendConfigError
from vllm_specextend.models.eagle3 import SPECULATORS_EAGLE3_FIELDS

# vLLM architectures of EAGLE heads, and the method that runs each.
EAGLE_ARCHITECTURES = {"Eagle3": "eagle3", "Eagle": "eagle"}


def config_json(model: str | None) -> dict:
    """A model's config.json when it is a local folder, else {}."""
    config_file = Path(model or "") / "config.json"
    return json.loads(config_file.read_text()) if config_file.is_file() else {}


def draft_config_file(model: str | None, field: str = "speculative_config.model") -> dict:
    """The draft's config.json (`config_json`). A head in the speculators
    format reads as vLLM reads it: its layer's config with the EAGLE-3
    fields beside it."""
    config = config_json(model)
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


def check_auxiliary_layers(head: dict, num_layers: int) -> None:
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
