"""A hand-built one-layer Llama whose next token depends on a span planted
far back in the context: the case where Cross-model Retrieval must find
the right chunk.

The vocabulary has SPECIAL tokens s_0..s_{n-1} with partner(s_i) =
s_{i+1 mod n}, and filler tokens. Attention is content-only: queries and
keys live in the head dimensions RoPE barely turns (with a base of 1e10
their angles stay under 0.01 radian over 8K positions), the query of s_i
matches the key of its partner, filler keys are zero. The value carries
the attended token's embedding into the residual stream, and the head
(the embeddings) then predicts that token. So after a prompt that ends
with s_0, the model continues s_1, s_2, ... only while its context holds
the planted run s_0 s_1 ... s_{n-1}: a draft reading a working set without
the planted chunk cannot continue it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB, HIDDEN, HEAD_DIM, SPECIAL = 384, 128, 64, 24
FILLER = range(SPECIAL + 3, 259)  # ids 0..2 are <s>, </s>, <unk>; 3..258 bytes
MATCH, COPY = 200.0, 6.0


def special_token(i: int) -> int:
    return 3 + i % SPECIAL


def build(folder: Path, tokenizer_dir: str, max_positions: int) -> str:
    """Save the model (with `max_positions`) and the tiny pair's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         head_dim=HEAD_DIM, max_position_embeddings=max_positions,
                         rope_theta=1e10, tie_word_embeddings=False, bos_token_id=0,
                         eos_token_id=1, torch_dtype="float32")
    model = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(0)
    # Orthonormal embeddings: specials span their own subspace, filler the rest.
    basis, _ = torch.linalg.qr(torch.randn(HIDDEN, HIDDEN, generator=generator))
    embeddings = torch.zeros(VOCAB, HIDDEN)
    specials = [special_token(i) for i in range(SPECIAL)]
    embeddings[specials] = basis[:, :SPECIAL].T
    filler = torch.randn(len(FILLER), HIDDEN - SPECIAL, generator=generator)
    embeddings[list(FILLER)] = (filler / filler.norm(dim=1, keepdim=True)) @ basis[:, SPECIAL:].T
    # Head 0 matches partners in the lowest-frequency RoPE pairs (NeoX halves:
    # dims HEAD_DIM/2 - SPECIAL/2.. of each half); head 1 stays silent.
    half = HEAD_DIM // 2
    slow = list(range(half - SPECIAL // 2, half)) + list(range(HEAD_DIM - SPECIAL // 2, HEAD_DIM))
    special_basis = basis[:, :SPECIAL]  # hidden -> special coordinates
    partner = torch.roll(torch.eye(SPECIAL), 1, dims=0)  # coordinate i -> i + 1
    attention = model.model.layers[0].self_attn
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(embeddings)
        model.lm_head.weight.copy_(embeddings)
        for weight in (attention.q_proj.weight, attention.k_proj.weight,
                       attention.v_proj.weight, attention.o_proj.weight):
            weight.zero_()
        # RMSNorm scales a unit embedding by sqrt(HIDDEN): undo it.
        scale = HIDDEN ** -0.5
        attention.q_proj.weight[slow] = (MATCH ** 0.5) * scale * (partner @ special_basis.T)
        attention.k_proj.weight[slow] = (MATCH ** 0.5) * scale * special_basis.T
        attention.v_proj.weight[:SPECIAL] = scale * special_basis.T
        attention.o_proj.weight[:, :SPECIAL] = COPY * special_basis
        model.model.layers[0].mlp.down_proj.weight.zero_()
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    config_file = folder / "config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()), indent=1))
    return str(folder)


def prompt(length: int, plant_at: int, seed: int = 0) -> list[int]:
    """Filler with the run s_0..s_{n-1} planted at `plant_at`, ending with s_0."""
    generator = torch.Generator().manual_seed(seed)
    tokens = [FILLER[int(i)] for i in torch.randint(len(FILLER), (length - 1,),
                                                      generator=generator)]
    tokens[plant_at: plant_at + SPECIAL] = [special_token(i) for i in range(SPECIAL)]
    return tokens + [special_token(0)]
