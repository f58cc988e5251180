"""The draft's attention inside vLLM: vLLM's own kernel, over vLLM's cache or
over working caches.

A draft layer keeps vLLM's rotary embedding (true positions, its table
lengthened to the target's length when the draft's is shorter) and vLLM's
cache write (keys rotated for their true positions, at their true slots),
and attends with vLLM's own backend, given a sliding window of
`main_window` so that no query spans more positions than the draft was
trained on (none where max_model_len keeps every query within it). Its
`impl.forward` is wrapped for the forwards SpecExtend plans:
- `DraftStepPlan` (rows with working caches in the batch): the rows' keys
  and queries are at their compact positions (in a first pass they move
  back there with vLLM's fused RoPE kernel; draft steps run at them), the
  keys are written to the working cache, and vLLM's kernel runs over it;
  the other rows run vLLM's kernel over vLLM's cache;
- a tree layer (tree mode, `trees.drafting.DraftTreeLayer`), which carries
  its own `attend_draft`: the nodes' keys and values go to scratch rows and the
  nodes attend to their context and their path.
Any other forward is vLLM's own, untouched.
"""

from __future__ import annotations

import torch

from vllm_specextend.vllm_glue.patching import replace_on_instance
from vllm_specextend.vllm_glue.rotation import move_back_
from vllm_specextend.retrieval.working_caches import DraftStepPlan, WorkingCaches


class DraftAttention:
    """Wraps one draft layer's `impl.forward`."""

    def __init__(self, name: str, original_forward, backward: torch.Tensor,
                 caches: WorkingCaches | None, tree_scratch=None):
        self.name = name
        self.original_forward = original_forward
        self.backward = backward  # `rope.backward_table`, in the draft's dtype
        self.caches = caches
        self.tree_scratch = tree_scratch

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args,
                **kwargs):
        if isinstance(attn_metadata, DraftStepPlan):
            return self._split(layer, query, key, value, kv_cache, attn_metadata, output)
        if hasattr(attn_metadata, "attend_draft"):  # a tree layer (tree mode only)
            return attn_metadata.attend_draft(self, layer, query, key, value, output)
        return self.original_forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                     *args, **kwargs)

    def _split(self, layer, query, key, value, kv_cache, plan: DraftStepPlan, output):
        """Rows with working caches attend over them; the others over vLLM's
        cache (vLLM has written every key at its true slot already)."""
        working_cache = self.caches.cache_of(self.name, kv_cache)
        if plan.main is None:  # every row: no gather, no scatter
            count = plan.num_actual_tokens
            compact = query[:count], key[:count], value[:count], output[:count]
        else:
            tokens = plan.compact_tokens
            compact = (query[tokens], key[tokens], value[tokens],
                       output.new_empty((len(tokens), *output.shape[1:])))
        queries, keys, values, out = compact
        if plan.compact_offsets is not None:  # the first pass: from true positions
            move_back_(plan.compact_offsets, self.backward, queries, keys)
        layer.impl.do_kv_cache_update(layer, keys, values, working_cache, plan.compact_slots)
        self.original_forward(layer, queries, keys, values, working_cache, plan.compact, out)
        if plan.main is not None:
            output[plan.compact_tokens] = out
            tokens = plan.main_tokens
            output[tokens] = self.original_forward(
                layer, query[tokens], key[tokens], value[tokens], kv_cache, plan.main,
                output.new_empty((len(tokens), *output.shape[1:])))
        return output


def install_draft_attention(layers: dict[str, object], backward: torch.Tensor,
                            caches: WorkingCaches | None, main_window: int | None,
                            tree_scratch: dict | None = None) -> None:
    """Wrap every draft layer's attention (recorded in the patch registry) and
    bound what it spans by the sliding window, unless no query can pass it
    (`main_window` None): then vLLM's kernel runs as for stock draft_model."""
    for name, layer in layers.items():
        if main_window is not None:
            set_sliding_window(layer.impl, main_window)
        attention = DraftAttention(name, layer.impl.forward, backward, caches,
                                   (tree_scratch or {}).get(name))
        replace_on_instance(layer.impl, "forward", attention.forward,
                            "draft attention over vLLM's cache or a working cache")


def set_sliding_window(impl, window: int) -> None:
    """vLLM's CPU backend takes the window as a size; FlashAttention-style
    backends as (left, right) token counts. Set before the draft's metadata
    builder is made, which reads it."""
    current = impl.sliding_window
    replacement = (window - 1, 0) if isinstance(current, tuple) else window
    replace_on_instance(impl, "sliding_window", replacement,
                        "no draft query spans more than the draft window")
