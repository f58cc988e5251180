"""A tiny random-weight Llama target/draft pair that needs no model hub.

The pair is the project's built-in default: tests and the README demo run on
it. The draft copies the target's embeddings, first layers and head, and the
target's extra layers are damped, so the draft agrees with the target most of
the time, as a real small draft does. The draft has fewer positions than the
target so that long prompts cross the draft's window (the case SpecExtend is
for).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

TINY_VOCAB_SIZE = 384  # 256 byte tokens + specials, padded
TARGET_MAX_POSITIONS = 8192
DRAFT_MAX_POSITIONS = 2048
_FORMAT_VERSION = 1  # bump when the recipe changes so caches rebuild
# A plain chat format so the OpenAI chat endpoint works on the tiny pair.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class ModelPair:
    target: str
    draft: str


def default_cache_dir() -> Path:
    env = os.environ.get("SPECEXTEND_CACHE")
    base = Path(env) if env else Path.home() / ".cache" / "vllm_specextend"
    return base / "models"


def _byte_level_tokenizer():
    """A byte-level BPE with no merges: every UTF-8 byte is one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2}
    for symbol in sorted(alphabet):
        vocab[symbol] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=TARGET_MAX_POSITIONS,
        chat_template=CHAT_TEMPLATE,
    )


def _llama_config(num_layers: int, max_positions: int, family: str = "llama"):
    from transformers import LlamaConfig, Qwen2Config

    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config}[family]
    return config_class(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA, as in the real drafts we target
        head_dim=32,  # smallest head size vLLM's CPU attention accepts
        max_position_embeddings=max_positions,
        rope_theta=10000.0,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )


def _is_built(folder: Path) -> bool:
    stamp = folder / "specextend_tiny.json"
    return stamp.exists() and json.loads(stamp.read_text()) == {
        "version": _FORMAT_VERSION
    }


def _save(model, tokenizer, folder: Path) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "specextend_tiny.json").write_text(json.dumps({"version": _FORMAT_VERSION}))
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    tmp.rename(folder)


def build_tiny_pair(
    cache_dir: Path | None = None,
    draft_max_positions: int = DRAFT_MAX_POSITIONS,
    seed: int = 0,
) -> ModelPair:
    """Build (once) and return the folders of the tiny target and draft."""
    import torch
    from transformers import LlamaForCausalLM

    root = (cache_dir or default_cache_dir()) / f"tiny-seed{seed}"
    target_dir = root / "target"
    draft_dir = root / f"draft-pos{draft_max_positions}"
    if _is_built(target_dir) and _is_built(draft_dir):
        return ModelPair(str(target_dir), str(draft_dir))

    root.mkdir(parents=True, exist_ok=True)
    tokenizer = _byte_level_tokenizer()
    torch.manual_seed(seed)
    target = LlamaForCausalLM(_llama_config(4, TARGET_MAX_POSITIONS))
    # Random init gives near-uniform logits; a larger head makes argmax stable.
    with torch.no_grad():
        target.lm_head.weight.mul_(20.0)
        for layer in target.model.layers[2:]:
            layer.self_attn.o_proj.weight.mul_(0.1)
            layer.mlp.down_proj.weight.mul_(0.1)
    draft = LlamaForCausalLM(_llama_config(2, draft_max_positions))
    draft_state = {
        name: tensor
        for name, tensor in target.state_dict().items()
        if not name.startswith("model.layers.") or int(name.split(".")[2]) < 2
    }
    draft.load_state_dict(draft_state)
    _save(target, tokenizer, target_dir)
    _save(draft, tokenizer, draft_dir)
    return ModelPair(str(target_dir), str(draft_dir))


def build_tiny_qwen2_target(cache_dir: Path | None = None, seed: int = 0) -> str:
    """A tiny random Qwen2-shaped target (same sizes and tokenizer as the
    Llama pair's target): the other family vLLM gives EAGLE-3 heads
    auxiliary hidden states for. Built once; returns its folder."""
    return build_tiny_target(4, "qwen2", cache_dir, seed)


def build_tiny_target(num_layers: int, family: str = "llama", cache_dir: Path | None = None,
                      seed: int = 0) -> str:
    """A tiny random target of `num_layers` layers (the pair's sizes and
    tokenizer otherwise). Built once; returns its folder."""
    import torch
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    folder = (cache_dir or default_cache_dir()) / f"tiny-seed{seed}" / (
        f"{family}-target-{num_layers}-layers")
    if _is_built(folder):
        return str(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model_class = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM}[family]
    target = model_class(_llama_config(num_layers, TARGET_MAX_POSITIONS, family=family))
    with torch.no_grad():
        target.lm_head.weight.mul_(20.0)
    _save(target, _byte_level_tokenizer(), folder)
    return str(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    target = Qwen2ForCausalLM(_llama_config(4, TARGET_MAX_POSITIONS, family="qwen2"))
    with torch.no_grad():
        target.lm_head.weight.mul_(20.0)
    _save(target, _byte_level_tokenizer(), folder)
    return str(folder)
