"""Train a small EAGLE-3 head for Qwen2.5-Coder-1.5B-Instruct on these CPUs,
at a 2,048-token window: the kind of draft that cannot read a long input,
for which Cross-model Retrieval is meant.

    python benchmarks/train_eagle3_head.py [--windows 128] [--epochs 3] [--resume]
    python benchmarks/train_eagle3_head.py --pair tiny --windows 4 --epochs 1   # smoke

1. Collect, once (resumable: a file per window): windows of 2,048 target
   tokens, first from the 16K GovReport and PG-19 documents (never
   measured: the benchmarks read the 1K-8K files, other documents; about
   640K tokens), then, for more, from what every Python ships: its
   documentation topics (`pydoc_data`, prose) and its standard library's
   modules (code, tests left out). For each window, the target's hidden
   states at the three layers vLLM feeds an EAGLE-3 head (vLLM's default
   (2, n/2, n-3)) and its top-16 next-token distribution, from
   transformers, kept in bf16. The target runs in bf16 where the CPU has
   AMX, else in fp32, which is faster there (a 2,048-token forward: 27-34 s
   against about 48 s in bf16 on a VM without AMX).
2. Train, resumably (a checkpoint every `--checkpoint-every` steps): one
   Llama decoder layer as vLLM runs it (`models.eagle3`), fed the target's
   embeddings (frozen; vLLM shares them) and `fc` of the three hidden
   states, with training-time test: step s of `--ttt-steps` feeds the
   head's own hidden state back, attending to the earlier steps' keys as
   vLLM's drafting does. The loss is cross-entropy against the target's
   top-16 distribution over a draft vocabulary (the 32,768 tokens most
   frequent in the data and the target's predictions; `d2t` maps them);
   the lm_head is the target's rows of that vocabulary, frozen.
3. Save the head in vLLM's format under ~/.cache/vllm_specextend/models/
   (`SPECEXTEND_CACHE` moves it) with the sha256 of its weights in
   `specextend_head.json`, with the data, steps, wall time and the loss of
   every step; print the folder (pass it as --draft).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from machine import has_amx
from vllm_specextend.models.eagle3 import (
    aux_hidden_state_layers,
    eagle3_head_config,
    save_eagle3_head,
)
from vllm_specextend.models.tiny import default_cache_dir

DATA = Path(__file__).parent / "data"
TRAINING_FILES = ("govreport/govreport_16K.jsonl", "pg19/pg19_16K.jsonl")
TOP_K = 16


def document_texts() -> list[str]:
    """The 16K GovReport and PG-19 documents, the two sources interleaved."""
    by_file = [[json.loads(line)["text"] for line in (DATA / name).read_text().splitlines()]
               for name in TRAINING_FILES]
    return [text for pair in zip(*by_file) for text in pair]


def python_documentation() -> list[str]:
    """Python's documentation topics (prose), in one text."""
    from pydoc_data.topics import topics

    return ["\n\n".join(topics[name] for name in sorted(topics))]


def standard_library_code() -> list[str]:
    """The standard library's modules (not its tests), in one text."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(path for path in root.rglob("*.py")
                   if not {"site-packages", "test", "tests", "idle_test"} & set(
                       path.relative_to(root).parts))
    return ["".join(f"# {path.relative_to(root)}\n{path.read_text(errors='replace')}\n"
                    for path in files)]


# Training text in the order windows are taken from it.
SOURCES = (("govreport+pg19 16K", document_texts),
           ("python documentation topics", python_documentation),
           ("python standard library", standard_library_code))


def windows_of(tokenizer, window_len: int, count: int) -> tuple[list[list[int]], dict]:
    """`count` non-overlapping windows of the training text's tokens, and how
    many each source gave."""
    windows, per_source = [], {}
    for source, texts in SOURCES:
        if len(windows) == count:
            break
        per_source[source] = 0
        for text in texts():
            ids = tokenizer(text)["input_ids"]
            starts = range(0, len(ids) - window_len + 1, window_len)
            taken = [ids[start:start + window_len] for start in starts][: count - len(windows)]
            windows += taken
            per_source[source] += len(taken)
            if len(windows) == count:
                break
    return windows, per_source


@torch.no_grad()
def collect(target_dir: str, folder: Path, window_len: int, count: int,
            dtype: torch.dtype) -> tuple[list[Path], dict]:
    """The target's aux hidden states and top-k distribution per window, from
    a forward in `dtype`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    windows, per_source = windows_of(tokenizer, window_len, count)
    paths = [folder / f"window_{i:04d}.pt" for i in range(len(windows))]
    todo = [(i, w) for i, w in enumerate(windows) if not paths[i].exists()]
    if todo:
        model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=dtype).eval()
        print(f"collecting {len(todo)} windows with the target in {dtype}", flush=True)
        layers = aux_hidden_state_layers(model.config.num_hidden_layers)
        for done, (i, window) in enumerate(todo):
            start = time.perf_counter()
            out = model(torch.tensor([window]), output_hidden_states=True)
            probs = out.logits[0].float().softmax(dim=-1)
            top = probs.topk(TOP_K, dim=-1)
            torch.save({"tokens": torch.tensor(window, dtype=torch.int32),
                        "aux": torch.stack([out.hidden_states[layer][0] for layer in layers],
                                           dim=1).to(torch.bfloat16),
                        "top_ids": top.indices.to(torch.int32),
                        "top_probs": top.values.to(torch.bfloat16)}, paths[i])
            print(f"collected window {i} ({done + 1}/{len(todo)}) in "
                  f"{time.perf_counter() - start:.1f} s", flush=True)
    return paths, per_source


def draft_vocabulary(paths: list[Path], size: int, vocab_size: int) -> torch.Tensor:
    """Ascending target ids of the most frequent tokens and predictions."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for path in paths:
        window = torch.load(path)
        counts += torch.bincount(window["tokens"].long(), minlength=vocab_size)
        counts += torch.bincount(window["top_ids"][:, 0].long(), minlength=vocab_size)
    return counts.topk(min(size, vocab_size)).indices.sort().values


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(
            x.dtype) * self.weight


class EagleHead(nn.Module):
    """vLLM's `Eagle3LlamaForCausalLM` with one layer, for training; the
    parameter names are the shipped ones (`midlayer.*`, `fc`, `norm`)."""

    def __init__(self, config: dict, rope_theta: float):
        super().__init__()
        hidden, heads = config["hidden_size"], config["num_attention_heads"]
        kv_heads, head_dim = config["num_key_value_heads"], config["head_dim"]
        inner, eps = config["intermediate_size"], config["rms_norm_eps"]
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.fc = nn.Linear(3 * config["target_hidden_size"], hidden, bias=False)
        self.midlayer = nn.Module()
        layer = self.midlayer
        layer.input_layernorm, layer.hidden_norm = RMSNorm(hidden, eps), RMSNorm(hidden, eps)
        layer.post_attention_layernorm = RMSNorm(hidden, eps)
        layer.self_attn = nn.Module()
        for name, rows in (("q_proj", heads), ("k_proj", kv_heads), ("v_proj", kv_heads)):
            setattr(layer.self_attn, name, nn.Linear(2 * hidden, rows * head_dim, bias=False))
        layer.self_attn.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)
        layer.mlp = nn.Module()
        layer.mlp.gate_proj = nn.Linear(hidden, inner, bias=False)
        layer.mlp.up_proj = nn.Linear(hidden, inner, bias=False)
        layer.mlp.down_proj = nn.Linear(inner, hidden, bias=False)
        self.norm = RMSNorm(hidden, eps)
        inv_freq = 1.0 / rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def rope(self, x, positions):
        angles = positions[:, None].float() * self.inv_freq[None, :]
        cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    def step(self, embeds, hidden, positions, earlier_keys, earlier_values, step: int):
        """One drafting step over a window: queries at every position see the
        first step's keys up to `step - 1` positions back and each later
        step's key on their own diagonal (what drafting step `step` sees).
        Returns (normed, prenorm, keys, values)."""
        layer, length = self.midlayer, embeds.shape[0]
        residual = hidden
        x = torch.cat((layer.input_layernorm(embeds), layer.hidden_norm(hidden)), dim=-1)
        attn = layer.self_attn
        q = self.rope(attn.q_proj(x).view(length, self.heads, self.head_dim), positions)
        k = self.rope(attn.k_proj(x).view(length, self.kv_heads, self.head_dim), positions)
        v = attn.v_proj(x).view(length, self.kv_heads, self.head_dim)
        keys = torch.cat(earlier_keys + [k]) if earlier_keys else k
        values = torch.cat(earlier_values + [v]) if earlier_values else v
        query_index = torch.arange(length)[:, None]
        key_index = torch.arange(length)[None, :]
        visible = [key_index <= query_index - (step - 1)]
        visible += [key_index == query_index - (step - 1) + j for j in range(1, step)]
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None],
            attn_mask=torch.cat(visible, dim=1), enable_gqa=True)[0].transpose(0, 1)
        residual = attn.o_proj(out.reshape(length, -1)) + residual
        mlp = layer.mlp
        h = layer.post_attention_layernorm(residual)
        h = mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
        prenorm = h + residual
        return self.norm(prenorm), prenorm, keys.split(length), values.split(length)


def window_loss(head: EagleHead, window: dict, embed: torch.Tensor, lm_head: torch.Tensor,
                draft_index: torch.Tensor, ttt_steps: int) -> torch.Tensor:
    """Mean over steps of the cross-entropy against the target's top-k
    distribution of the token after next, restricted to the draft vocabulary."""
    tokens = window["tokens"].long()
    length = len(tokens) - 1  # query q reads token q + 1 and predicts q + 2
    positions = torch.arange(length)
    embeds = embed[tokens[1:]]
    top_ids = window["top_ids"][1:].long()
    targets = window["top_probs"][1:].float() * (draft_index[top_ids] >= 0)
    targets = targets / targets.sum(-1, keepdim=True).clamp(min=1e-9)
    columns = draft_index[top_ids].clamp(min=0)
    hidden = head.fc(window["aux"][:length].flatten(1).to(embeds.dtype))
    keys, values, total = [], [], 0.0
    for step in range(1, ttt_steps + 1):
        normed, prenorm, keys, values = head.step(embeds, hidden, positions, list(keys),
                                                  list(values), step)
        log_probs = F.log_softmax((normed @ lm_head.T).float(), dim=-1)
        usable = positions >= step - 1  # the step's hidden state exists
        loss = -(targets * log_probs.gather(1, columns)).sum(-1)
        total = total + (loss * usable).sum() / usable.sum()
        # The next step reads, at q, this step's hidden state from q - 1.
        hidden = torch.cat((prenorm[:1] * 0, prenorm[:-1]))
    return total / ttt_steps


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pair", choices=["tiny", "qwen-coder"], default="qwen-coder")
    parser.add_argument("--windows", type=int, default=128)
    parser.add_argument("--window-len", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--ttt-steps", type=int, default=3)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--draft-vocab", type=int, default=32768)
    parser.add_argument("--intermediate-size", type=int, default=4096)
    parser.add_argument("--checkpoint-every", type=int, default=20)
    parser.add_argument("--max-minutes", type=float, default=100.0,
                        help="stop training (and save) after this long")
    parser.add_argument("--collect-dtype", choices=["auto", "bfloat16", "float32"],
                        default="auto", help="the target's dtype while collecting (auto: "
                        "bfloat16 where the CPU has AMX, else float32)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--out", help="head folder (default: under the model cache)")
    args = parser.parse_args()
    torch.manual_seed(0)

    if args.pair == "tiny":
        from vllm_specextend.models.tiny import build_tiny_pair

        target_dir = build_tiny_pair().target
    else:
        from vllm_specextend.models.qwen_coder import prepare_pair

        target_dir = prepare_pair().target
    name = f"eagle3-{Path(target_dir).parent.name}-{args.window_len}"
    folder = Path(args.out) if args.out else default_cache_dir() / name
    # Without AMX, fp32 runs faster than bf16 on these machines.
    auto_dtype = torch.bfloat16 if has_amx() else torch.float32
    collect_dtype = (auto_dtype if args.collect_dtype == "auto"
                     else getattr(torch, args.collect_dtype))
    paths, per_source = collect(target_dir, folder / "collected", args.window_len,
                                args.windows, collect_dtype)

    from safetensors import safe_open

    target_config = json.loads((Path(target_dir) / "config.json").read_text())
    with safe_open(next(Path(target_dir).glob("*.safetensors")), "pt") as weights:
        embed = weights.get_tensor("model.embed_tokens.weight").to(torch.bfloat16)
        lm_head_all = (weights.get_tensor("lm_head.weight") if "lm_head.weight" in
                       weights.keys() else embed).to(torch.bfloat16)
    vocab = draft_vocabulary(paths, args.draft_vocab, target_config["vocab_size"])
    draft_index = torch.full((target_config["vocab_size"],), -1, dtype=torch.long)
    draft_index[vocab] = torch.arange(len(vocab))
    lm_head = lm_head_all[vocab]
    config = eagle3_head_config(target_config, args.window_len, draft_vocab_size=len(vocab),
                                intermediate_size=args.intermediate_size)
    head = EagleHead(config, target_config.get("rope_theta", 10000.0))
    optimizer = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=0.0)
    total_steps = args.epochs * len(paths)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(
            s / total_steps, 1.0))))
    checkpoint = folder / "checkpoint.pt"
    step, losses, minutes_before = 0, [], 0.0
    if args.resume and checkpoint.exists():
        state = torch.load(checkpoint)
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        step, losses = state["step"], state["losses"]
        minutes_before = state["training_minutes"]
        print(f"resumed at step {step}", flush=True)
    order = torch.randperm(total_steps, generator=torch.Generator().manual_seed(1)) % len(paths)
    began = time.perf_counter()

    def training_minutes() -> float:
        return minutes_before + (time.perf_counter() - began) / 60

    while step < total_steps and time.perf_counter() - began < 60 * args.max_minutes:
        window = torch.load(paths[int(order[step])])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = window_loss(head, window, embed, lm_head, draft_index, args.ttt_steps)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        step += 1
        losses.append(loss.item())
        print(f"step {step}/{total_steps} loss {loss.item():.3f} "
              f"({time.perf_counter() - began:.0f} s)", flush=True)
        if step % args.checkpoint_every == 0 or step == total_steps:
            torch.save({"head": head.state_dict(), "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict(), "step": step, "losses": losses,
                        "training_minutes": training_minutes()}, checkpoint)

    tensors = {key: value.detach().float() for key, value in head.state_dict().items()}
    tensors["lm_head.weight"] = lm_head.float()
    if len(vocab) < target_config["vocab_size"]:  # vLLM maps draft ids back with d2t
        tensors["d2t"] = vocab - torch.arange(len(vocab))
    head_dir = folder / "head"
    save_eagle3_head(head_dir, config, tensors)
    stamp = {"target": target_dir, "training_files": list(TRAINING_FILES),
             "windows_per_source": per_source, "python": platform.python_version(),
             "windows": len(paths), "window_len": args.window_len,
             "tokens": len(paths) * args.window_len, "steps": step,
             "total_steps": total_steps, "ttt_steps": args.ttt_steps,
             "training_minutes": training_minutes(), "losses": losses,
             "sha256": sha256_of(head_dir / "model.safetensors")}
    (head_dir / "specextend_head.json").write_text(json.dumps(stamp, indent=1))
    print(f"head: {head_dir}\n{json.dumps(stamp)}")


if __name__ == "__main__":
    main()
