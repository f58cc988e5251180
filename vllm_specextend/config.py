"""SpecExtend settings: one pydantic model, the paper's defaults, all checks.

This module knows nothing of vLLM. The glue hands it the user's
`speculative_config` dict and, once the engine is configured, the facts the
settings must fit (KV block size, draft positions, speculative tokens).
"""

from __future__ import annotations

from typing import Any, Iterable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

METHOD_NAME = "specextend"
# Where the settings travel to engine-core and worker processes.
ADDITIONAL_CONFIG_KEY = "specextend"
# Ancestor masks are one int64 per node, the root included.
MAX_TREE_NODES = 63
# The draft tree kernel reads a path in one block of 32 keys.
MAX_TREE_DEPTH = 32
# Draft architectures with rotary positions: compact positions need RoPE.
SUPPORTED_DRAFT_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


class SpecExtendConfigError(ValueError):
    """A SpecExtend setting is wrong; the message names the field."""


class SpecExtendConfig(BaseModel):
    """SpecExtend's own settings (arXiv 2505.20776, defaults from section 5)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    chunk_size: int = Field(default=32, gt=0)
    """Tokens per retrieval chunk; a multiple of the KV cache block size."""
    top_k_chunks: int = Field(default=32, gt=0)
    """Chunks the target's attention picks for the draft's working cache."""
    recent_tokens: int = Field(default=256, gt=0)
    """Newest tokens the draft always sees, besides the retrieved chunks."""
    refresh_every: int = Field(default=4, gt=0)
    """Decoding steps between two refreshes of the chunk scores."""
    retrieval_min_len: int | None = Field(default=None, gt=0)
    """Context length from which retrieval starts; default: the working-cache
    budget (below it the draft sees the whole context anyway)."""
    hybrid_tree_attention_min_len: int = Field(default=4096, gt=0)
    """Prefix length from which tree verification uses Hybrid Tree Attention
    (the paper finds it pays above about 4K tokens)."""
    retrieval: bool = True
    """Cross-model Retrieval on/off (off: the draft sees the full context)."""
    selection: Literal["cmr", "recency"] = "cmr"
    """How the working set is chosen: "cmr", the target's final-layer
    attention picks the top-k chunks; "recency", the first chunk and the
    newest chunks, same budget, no target scores (StreamingLLM-style ablation)."""
    hybrid_tree_attention: bool = False
    """Verify chains through the Hybrid Tree Attention backend (vLLM's CPU
    build) as path-shaped trees; for chains vLLM's own kernel is as good.
    Tree mode always verifies with it."""
    tree: bool = False
    """Draft dynamic trees (OPT-Tree style) instead of chains and verify
    them in one target pass; vLLM's num_speculative_tokens becomes the node
    budget `tree_nodes`."""
    tree_nodes: int = Field(default=50, gt=0, le=MAX_TREE_NODES)
    """Nodes per tree, and candidates kept per tree layer."""
    tree_max_depth: int = Field(default=10, gt=0, le=MAX_TREE_DEPTH)
    """Deepest tree layer the draft grows."""
    tree_threshold: float = Field(default=0.7, ge=0)
    """A tree stops growing when a layer adds no more than this to its
    expected accepted length."""

    @classmethod
    def field_names(cls) -> frozenset[str]:
        return frozenset(cls.model_fields)

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> "SpecExtendConfig":
        """Validate a dict of SpecExtend settings; errors name the field."""
        try:
            return cls(**settings)
        except ValidationError as exc:
            raise SpecExtendConfigError(_describe(exc)) from None

    @property
    def verifies_with_hta(self) -> bool:
        return self.hybrid_tree_attention or self.tree

    def tokens_per_step(self, num_speculative_tokens: int) -> int:
        """Most tokens one verification step can accept: the accepted drafts
        (a tree's deepest path) and the bonus token."""
        return (self.tree_max_depth if self.tree else num_speculative_tokens) + 1

    def draft_positions_past_window(self, num_speculative_tokens: int) -> int:
        """Compact positions a draft row needs after its working set: the
        tokens of its first pass (scheduled drafts, bonus token) and, for
        trees, the deepest path grown on top of its root."""
        if self.tree:
            return num_speculative_tokens + 1 + self.tree_max_depth
        return num_speculative_tokens

    def working_cache_budget(self, num_speculative_tokens: int) -> int:
        """Most draft context positions CMR can use: the top-k chunks, the
        recent window, and every token added between two refreshes."""
        tokens_between_refreshes = self.refresh_every * self.tokens_per_step(
            num_speculative_tokens)
        return (
            self.top_k_chunks * self.chunk_size
            + self.recent_tokens
            + tokens_between_refreshes
        )

    def effective_retrieval_min_len(self, num_speculative_tokens: int) -> int:
        if self.retrieval_min_len is not None:
            return self.retrieval_min_len
        return self.working_cache_budget(num_speculative_tokens)

    def check_fits_engine(
        self,
        *,
        block_size: int,
        draft_max_positions: int,
        num_speculative_tokens: int,
        draft_model_type: str,
    ) -> None:
        """Checks that need the configured engine; raise at start-up."""
        if draft_model_type not in SUPPORTED_DRAFT_MODEL_TYPES:
            raise SpecExtendConfigError(
                f"speculative_config.model: draft model type "
                f"'{draft_model_type}' is not supported by SpecExtend; supported "
                f"types (rotary position embeddings): "
                f"{', '.join(sorted(SUPPORTED_DRAFT_MODEL_TYPES))}."
            )
        if self.chunk_size % block_size != 0:
            raise SpecExtendConfigError(
                f"speculative_config.chunk_size={self.chunk_size} must be a "
                f"multiple of the KV cache block size ({block_size}): allowed "
                f"values are {block_size}, {2 * block_size}, "
                f"{3 * block_size}, ... (or set --block-size to a divisor of "
                f"chunk_size)."
            )
        past_window = self.draft_positions_past_window(num_speculative_tokens)
        limit = draft_max_positions - past_window
        budget = self.working_cache_budget(num_speculative_tokens)
        if budget > limit:
            retrieved = self.top_k_chunks * self.chunk_size
            between_refreshes = budget - retrieved - self.recent_tokens
            max_top_k = max((limit - self.recent_tokens - between_refreshes)
                            // self.chunk_size, 0)
            raise SpecExtendConfigError(
                f"speculative_config.top_k_chunks: the working cache "
                f"(top_k_chunks={self.top_k_chunks} x chunk_size={self.chunk_size}"
                f" + recent_tokens={self.recent_tokens} + refresh_every x "
                f"tokens per step={between_refreshes} = {budget} "
                f"tokens) exceeds the draft's max_position_embeddings "
                f"({draft_max_positions}) minus the {past_window} positions its "
                f"drafts need = {limit}. Allowed: top_k_chunks in "
                f"[1, {max_top_k}] with these settings, or lower recent_tokens, "
                f"chunk_size or refresh_every."
            )

    def summary(self, num_speculative_tokens: int) -> str:
        fields = " ".join(f"{k}={v}" for k, v in self.model_dump().items())
        return (
            f"{fields} working_cache_budget="
            f"{self.working_cache_budget(num_speculative_tokens)}"
        )


def split_speculative_config(
    user_config: dict[str, Any], vllm_fields: Iterable[str]
) -> tuple[SpecExtendConfig, dict[str, Any]]:
    """Split a `method: specextend` speculative config into our settings and
    the part vLLM's SpeculativeConfig takes. Keys known to neither fail."""
    normalized = {key.replace("-", "_"): v for key, v in user_config.items()}
    ours = SpecExtendConfig.field_names()
    vllm_known = set(vllm_fields)
    unknown = sorted(set(normalized) - ours - vllm_known)
    if unknown:
        raise SpecExtendConfigError(
            f"speculative_config: unknown key(s) {', '.join(map(repr, unknown))} "
            f"for method '{METHOD_NAME}'. SpecExtend settings: "
            f"{', '.join(sorted(ours))}; other keys must be vLLM "
            f"SpeculativeConfig fields."
        )
    settings = SpecExtendConfig.from_settings(
        {k: v for k, v in normalized.items() if k in ours}
    )
    rest = {k: v for k, v in normalized.items() if k not in ours}
    return settings, rest


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        field = ".".join(str(p) for p in error["loc"]) or "speculative_config"
        if error["type"] == "extra_forbidden":
            known = ", ".join(sorted(SpecExtendConfig.field_names()))
            parts.append(
                f"speculative_config.{field}: unknown SpecExtend setting; known "
                f"settings: {known}"
            )
            continue
        allowed = _allowed_range(field)
        got = error.get("input")
        parts.append(
            f"speculative_config.{field}={got!r}: {error['msg']}"
            + (f" (allowed: {allowed})" if allowed else "")
        )
    return "; ".join(parts)


def _allowed_range(field: str) -> str:
    info = SpecExtendConfig.model_fields.get(field)
    if info is None:
        return ""
    if info.annotation is bool:
        return "true or false"
    for constraint in info.metadata:
        if getattr(constraint, "gt", None) is not None:
            return f"an integer > {constraint.gt}"
    return ""
