"""EAGLE-3 heads in the format vLLM loads (`LlamaForCausalLMEagle3`).

A head is one Llama decoder layer whose q/k/v take the token's embedding
and a hidden state side by side (2 x hidden inputs), `fc` folding three of
the target's hidden states (3 x hidden -> hidden), a final `norm` and an
`lm_head` over a draft vocabulary (`d2t` maps draft ids to target ids when
it is smaller than the target's). Embeddings are the target's (vLLM shares
them when the head ships none). Weight names are vLLM's: `midlayer.*`,
`fc.weight`, `norm.weight`, `lm_head.weight`, `d2t`.

`eagle3_head_config` and `save_eagle3_head` serve the tests (random heads
for tiny targets) and `benchmarks/train_eagle3_head.py` (a trained one).
"""

from __future__ import annotations

import json
from pathlib import Path

EAGLE3_ARCHITECTURE = "LlamaForCausalLMEagle3"


def eagle3_head_config(target_config: dict, max_position_embeddings: int,
                       draft_vocab_size: int | None = None,
                       intermediate_size: int | None = None) -> dict:
    """A head's config.json for a target's config.json: the target's
    attention shape and hidden size; `max_position_embeddings` is the window
    the head is trained for."""
    hidden = target_config["hidden_size"]
    heads = target_config["num_attention_heads"]
    return {
        "eagle_config": {"eagle_aux_hidden_state_layer_ids":
                         aux_hidden_state_layers(target_config["num_hidden_layers"])},
        "architectures": [EAGLE3_ARCHITECTURE],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate_size or target_config["intermediate_size"],
        "num_hidden_layers": 1,
        "num_attention_heads": heads,
        "num_key_value_heads": target_config.get("num_key_value_heads", heads),
        "head_dim": target_config.get("head_dim") or hidden // heads,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": target_config.get("rms_norm_eps", 1e-6),
        "rope_theta": target_config.get("rope_theta", 10000.0),
        "tie_word_embeddings": False,
        "vocab_size": target_config["vocab_size"],
        "draft_vocab_size": draft_vocab_size or target_config["vocab_size"],
        "target_hidden_size": hidden,
        "torch_dtype": "float32",
    }


def aux_hidden_state_layers(num_layers: int) -> list[int]:
    """The target layers whose outputs `fc` folds: vLLM's default (2, n/2,
    n - 3) where those are three distinct layers, else spread over a
    shallow target."""
    default = [2, num_layers // 2, num_layers - 3]
    if len(set(default)) == 3 and min(default) >= 0:
        return default
    return [0, num_layers // 2, num_layers - 1]


def eagle3_weight_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor a head ships (but `d2t`), by vLLM's names."""
    hidden, head_dim = config["hidden_size"], config["head_dim"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    inner = config["intermediate_size"]
    return {
        "midlayer.input_layernorm.weight": (hidden,),
        "midlayer.hidden_norm.weight": (hidden,),
        "midlayer.post_attention_layernorm.weight": (hidden,),
        "midlayer.self_attn.q_proj.weight": (heads * head_dim, 2 * hidden),
        "midlayer.self_attn.k_proj.weight": (kv_heads * head_dim, 2 * hidden),
        "midlayer.self_attn.v_proj.weight": (kv_heads * head_dim, 2 * hidden),
        "midlayer.self_attn.o_proj.weight": (hidden, heads * head_dim),
        "midlayer.mlp.gate_proj.weight": (inner, hidden),
        "midlayer.mlp.up_proj.weight": (inner, hidden),
        "midlayer.mlp.down_proj.weight": (hidden, inner),
        "fc.weight": (hidden, 3 * config["target_hidden_size"]),
        "norm.weight": (hidden,),
        "lm_head.weight": (config["draft_vocab_size"], hidden),
    }


def save_eagle3_head(folder: Path, config: dict, tensors: dict) -> None:
    """Write a head vLLM loads: config.json and model.safetensors (with
    `d2t`, draft id -> target id offsets, when the draft vocabulary is
    smaller than the target's)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()},
              str(folder / "model.safetensors"))


def build_random_eagle3_head(target_dir: str, folder: Path, max_position_embeddings: int,
                             seed: int = 0) -> str:
    """A random-weight head for a (tiny) target, saved in `folder`: norms at
    one, projections at a small scale, the target's lm_head."""
    import torch
    from safetensors.torch import load_file

    target_config = json.loads((Path(target_dir) / "config.json").read_text())
    config = eagle3_head_config(target_config, max_position_embeddings)
    generator = torch.Generator().manual_seed(seed)
    tensors = {name: (torch.ones(shape) if len(shape) == 1 else
                      torch.randn(shape, generator=generator) * 0.02)
               for name, shape in eagle3_weight_shapes(config).items()}
    target = load_file(str(next(Path(target_dir).glob("*.safetensors"))))
    tensors["lm_head.weight"] = target["lm_head.weight"].float()
    save_eagle3_head(folder, config, tensors)
    return str(folder)


# The EAGLE-3 fields a speculators-format checkpoint keeps beside its
# `transformer_layer_config` (vLLM's speculators reader copies them in).
SPECULATORS_EAGLE3_FIELDS = ("draft_vocab_size", "target_hidden_size",
                             "eagle_aux_hidden_state_layer_ids")


def save_in_speculators_format(head: str, folder: Path, verifier: str,
                               speculative_tokens: int = 3) -> str:
    """The same head as the `speculators` library saves it (and vLLM reads):
    the layer's config under `transformer_layer_config`, the EAGLE-3 fields
    and the verifier (target) beside it, weights named `layers.0.*`."""
    from safetensors.torch import load_file

    config = json.loads((Path(head) / "config.json").read_text())
    layer = {key: value for key, value in config.items()
             if key not in ("eagle_config", "architectures", *SPECULATORS_EAGLE3_FIELDS)}
    speculators = {
        "architectures": ["Eagle3Speculator"],
        "speculators_model_type": "eagle3",
        "speculators_config": {
            "algorithm": "eagle3",
            "default_proposal_method": "greedy",
            "proposal_methods": [{"proposal_type": "greedy",
                                  "speculative_tokens": speculative_tokens}],
            "verifier": {"name_or_path": verifier,
                         "architectures": ["LlamaForCausalLM"]},
        },
        "transformer_layer_config": layer,
        "norm_before_residual": False,
        "eagle_aux_hidden_state_layer_ids":
            config["eagle_config"]["eagle_aux_hidden_state_layer_ids"],
        **{key: config[key] for key in ("draft_vocab_size", "target_hidden_size")},
    }
    tensors = {name.replace("midlayer.", "layers.0."): tensor for name, tensor in
               load_file(str(Path(head) / "model.safetensors")).items()}
    save_eagle3_head(folder, speculators, tensors)
    return str(folder)
