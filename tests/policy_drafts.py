"""Drafts for the speculation policy's engine tests, built from the tiny pair.

- A draft that accepts nothing: a random one-layer Llama (another seed).
- A draft that fails on a known stretch of one request's output: a copy of
  the tiny target with the head rows of a token set S rotated among
  themselves, so that wherever the target's next token is in S the draft
  proposes another one, and elsewhere the target's own (S's logits are
  only permuted, all below the target's pick). S is the tokens of the
  output's first phase, chosen so that none of them occurs after it: the
  text turns wholly predictable when the phase ends.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import torch

# A prompt whose greedy continuation on the tiny target runs through two
# phases with no token in common (found by a search over seeds).
PHASED_PROMPT_SEED = 3
PHASED_MAX_TOKENS = 320


def phased_prompt() -> list[int]:
    rng = random.Random(PHASED_PROMPT_SEED)
    return [rng.randrange(3, 259) for _ in range(100)]  # byte tokens: ids 3..258


def first_phase_length(output: list[int], shortest: int = 40) -> int:
    """The longest prefix (at least `shortest`, leaving as many) sharing no
    token with the rest of `output`; 0 if there is none."""
    for end in range(len(output) - shortest, shortest - 1, -1):
        if not set(output[:end]) & set(output[end:]):
            return end
    return 0


def _copy_of(draft_dir: str, folder: Path) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(draft_dir, folder)
    return folder


def failing_on(model_dir: str, tokens: set[int], folder: Path) -> str:
    """The model with its head rows of `tokens` rotated (at least two)."""
    from safetensors.torch import load_file, save_file

    assert len(tokens) >= 2
    folder = _copy_of(model_dir, folder)
    weights_file = folder / "model.safetensors"
    weights = load_file(weights_file)
    order = sorted(tokens)
    head = weights["lm_head.weight"]
    head[order] = head[order[1:] + order[:1]].clone()
    save_file(weights, weights_file, metadata={"format": "pt"})
    return str(folder)


def accepting_nothing(draft_dir: str, folder: Path) -> str:
    """A random one-layer Llama with the tiny draft's shape and tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(draft_dir)
    config.num_hidden_layers = 1
    torch.manual_seed(1234)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # a stable argmax, unrelated to the target's
    folder = _copy_of(draft_dir, folder)
    (folder / "model.safetensors").unlink()
    model.save_pretrained(folder, safe_serialization=True)
    return str(folder)
