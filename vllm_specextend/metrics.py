"""Speculative-decoding numbers from a vLLM `LLM`'s own metrics."""

from __future__ import annotations

SPEC_DECODE_COUNTERS = (
    "vllm:spec_decode_num_drafts",
    "vllm:spec_decode_num_draft_tokens",
    "vllm:spec_decode_num_accepted_tokens",
)


def spec_decode_counters(llm) -> dict[str, float]:
    """Cumulative draft and acceptance counters (0 when nothing drafted)."""
    values = {m.name: getattr(m, "value", None) for m in llm.get_metrics()}
    return {name: values.get(name) or 0 for name in SPEC_DECODE_COUNTERS}


def accepted_by_position(llm) -> list[int]:
    """Accepted drafts counted by draft position (vLLM's per-position counter)."""
    for metric in llm.get_metrics():
        if metric.name == "vllm:spec_decode_num_accepted_tokens_per_pos":
            return list(metric.values)
    return []


def mean_accepted_length(counters: dict[str, float]) -> float | None:
    """Tokens produced per target step: 1 + accepted drafts per step."""
    drafts = counters["vllm:spec_decode_num_drafts"]
    return 1 + counters["vllm:spec_decode_num_accepted_tokens"] / drafts if drafts else None


def acceptance_rate(counters: dict[str, float]) -> float | None:
    drafted = counters["vllm:spec_decode_num_draft_tokens"]
    return counters["vllm:spec_decode_num_accepted_tokens"] / drafted if drafted else None
