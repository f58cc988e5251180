"""SpecExtend settings: one pydantic model, the paper's defaults, all checks.

This module knows nothing of vLLM. The glue hands it the user's
`speculative_config` dict and, once the engine is configured, the facts the
settings must fit (KV block size, draft positions, speculative tokens);
`WorkingCacheGeometry` is what every process derives from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vllm_specextend.limits import MAX_TREE_DEPTH, MAX_TREE_NODES

METHOD_NAME = "specextend"
# Where the settings travel to engine-core and worker processes.
ADDITIONAL_CONFIG_KEY = "specextend"
# Draft architectures with rotary positions: compact positions need RoPE.
SUPPORTED_DRAFT_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
# Working caches kept at most, by default, whatever max_num_seqs allows.
DEFAULT_MAX_WORKING_CACHES = 32


@dataclass(frozen=True)
class WorkingCacheGeometry:
    """Sizes every process derives from the settings and the engine.

    A request past `retrieval_min_len` drafts over its working cache: its
    top-k chunks and its recent window, from a chunk boundary, at compact
    positions 0..n-1, then the tokens it gains until the next refresh and
    the drafts past them; `capacity` bounds all of that. Requests without
    one attend over vLLM's cache with a sliding window of `main_window`, so
    no draft query ever spans `draft_window` positions. Up to
    `whole_context_max_len` the draft window shows a request whole: past
    `retrieval_min_len` and up to there (a working cache smaller than the
    draft window) the speculation policy chooses."""

    draft_window: int
    chunk_size: int
    top_k_chunks: int
    recent_tokens: int
    tokens_between_refreshes: int
    positions_past_window: int
    retrieval_min_len: int
    whole_context_max_len: int
    main_window: int

    @property
    def capacity(self) -> int:
        # The window starts at a chunk boundary: up to chunk_size - 1 more.
        return (self.top_k_chunks * self.chunk_size + self.recent_tokens
                + self.chunk_size - 1 + self.tokens_between_refreshes
                + self.positions_past_window)

    def window_binds(self, max_model_len: int) -> bool:
        """Whether a draft query can span more than `main_window` positions:
        one at the last position a request reaches, drafts included."""
        return max_model_len + self.positions_past_window > self.main_window


class SpecExtendConfigError(ValueError):
    """A SpecExtend setting is wrong; the message names the field."""


# vLLM settings a tree cannot honour: (field, the only value it takes, why).
TREE_CONFLICTS = (
    ("rejection_sample_method", "standard",
     "SpecExtend's tree verification (lossless) replaces vLLM's rejection sampler"),
    ("num_speculative_tokens_per_batch_size", None,
     "every step grows a tree of tree_nodes nodes, whatever the batch size"),
)


class SpecExtendConfig(BaseModel):
    """SpecExtend's own settings (arXiv 2505.20776, defaults from section 5)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    draft_method: Literal["draft_model", "eagle3", "eagle"] | None = None
    """How vLLM drafts: a separate draft model, or an EAGLE-3 (EAGLE-1/2)
    head on the target's hidden states; default: from the draft's config
    (an EAGLE architecture name), else draft_model."""
    chunk_size: int = Field(default=32, gt=0)
    """Tokens per retrieval chunk; a multiple of the KV cache block size."""
    draft_window: int | None = Field(default=None, gt=0)
    """Positions the draft attends over at most; default: its
    max_position_embeddings as its config ships it. Requests that fit it
    draft over their whole context, as stock speculation does."""
    working_cache_window: int | None = Field(default=None, gt=0)
    """Positions a working cache spans (its chunks, recent tokens, the tokens
    until the next refresh, the drafts); default: draft_window. Smaller, a
    request whose context lies between the two drafts over whichever of its
    whole context and a working cache it measures faster (`adaptive`; off:
    always the working cache)."""
    top_k_chunks: int | None = Field(default=None, gt=0)
    """Chunks the target's attention picks for the draft's working cache;
    default: as many as the working cache holds (the paper: 32)."""
    recent_tokens: int = Field(default=256, gt=0)
    """Newest tokens the draft always sees, besides the retrieved chunks."""
    refresh_every: int = Field(default=4, gt=0)
    """Decoding steps between two refreshes of the chunk scores."""
    retrieval_min_len: int | None = Field(default=None, gt=0)
    """Context length from which retrieval starts; default: the longest
    context the draft window shows whole until the next refresh."""
    max_working_caches: int | None = Field(default=None, gt=0)
    """Requests that draft through a working cache at once (each holds
    `capacity` tokens of draft K/V, allocated at start-up); default:
    max_num_seqs, at most 32. Others draft over their recent window."""
    hybrid_tree_attention_min_len: int = Field(default=4096, gt=0)
    """Cached prefix length from which chain drafts are verified with Hybrid
    Tree Attention (`hybrid_tree_attention`; trees always are). The paper
    finds it pays above about 4K tokens."""
    adaptive: bool = True
    """Per-request speculation policy: each request drafts 0 to
    num_speculative_tokens tokens a round, whichever its measured acceptance
    and the engine's measured costs make fastest; requests whose drafts do
    not pay step aside (the draft still reads their tokens) and probe to
    come back. Off: every request drafts num_speculative_tokens, as in
    vLLM. Needs async scheduling off (always so on CPU) and chain drafts."""
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

    def geometry(self, *, draft_max_positions: int,
                 num_speculative_tokens: int) -> WorkingCacheGeometry:
        """The working cache's sizes; errors name the fields to change.
        `draft_max_positions`: the draft's max_position_embeddings as its
        config ships it (vLLM may raise an EAGLE head's in memory)."""
        window = self.draft_window or draft_max_positions
        if window > draft_max_positions:
            raise SpecExtendConfigError(
                f"speculative_config.draft_window={window} exceeds the draft's "
                f"max_position_embeddings ({draft_max_positions}): the draft would "
                f"see positions it was not trained on. Allowed: draft_window in "
                f"[1, {draft_max_positions}].")
        cache_window = self.working_cache_window or window
        if cache_window > window:
            raise SpecExtendConfigError(
                f"speculative_config.working_cache_window={cache_window} exceeds "
                f"draft_window={window}: a working cache is at most what the draft "
                f"window shows. Allowed: working_cache_window in [1, {window}].")
        window_field = ("working_cache_window" if self.working_cache_window is not None
                        else "draft_window")
        between = self.refresh_every * self.tokens_per_step(num_speculative_tokens)
        past = self.draft_positions_past_window(num_speculative_tokens)
        # Window (from a chunk boundary), growth until the next refresh, drafts.
        fixed = self.recent_tokens + self.chunk_size - 1 + between + past
        room = (cache_window - fixed) // self.chunk_size
        top_k = self.top_k_chunks if self.top_k_chunks is not None else room
        if top_k < 1 or top_k > room:
            raise SpecExtendConfigError(
                f"speculative_config.top_k_chunks: the working cache (top_k_chunks="
                f"{top_k} x chunk_size={self.chunk_size} + recent_tokens="
                f"{self.recent_tokens} + chunk_size - 1 + refresh_every x tokens per "
                f"step={between} + {past} positions for the drafts = "
                f"{top_k * self.chunk_size + fixed} tokens) exceeds {window_field}="
                f"{cache_window}. Allowed: top_k_chunks in [1, {max(room, 0)}] with these "
                f"settings, or a larger {window_field} (at most the draft's "
                f"max_position_embeddings), or lower recent_tokens, chunk_size or "
                f"refresh_every.")
        depth = self.tree_max_depth if self.tree else 0
        # The longest context a window shows whole until the next refresh.
        retrieval_min_len = self.retrieval_min_len or max(cache_window - between - past, 1)
        whole_context_max_len = retrieval_min_len
        if self.working_cache_window is not None:
            whole_context_max_len = max(window - between - past, retrieval_min_len)
        return WorkingCacheGeometry(
            draft_window=window, chunk_size=self.chunk_size, top_k_chunks=top_k,
            recent_tokens=self.recent_tokens, tokens_between_refreshes=between,
            positions_past_window=past, retrieval_min_len=retrieval_min_len,
            whole_context_max_len=whole_context_max_len, main_window=window - depth)

    def builds_working_caches(self, geometry: WorkingCacheGeometry, max_model_len: int) -> bool:
        """Whether a request can pass `retrieval_min_len`; if none can, the
        draft reads every request whole, as stock draft_model does."""
        return self.retrieval and max_model_len > geometry.retrieval_min_len

    def check_fits_engine(
        self,
        *,
        block_size: int,
        max_model_len: int,
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
        geometry = self.geometry(draft_max_positions=draft_max_positions,
                                 num_speculative_tokens=num_speculative_tokens)
        # Chunks are laid out as whole KV blocks, only where retrieval runs.
        if self.builds_working_caches(geometry, max_model_len) and self.chunk_size % block_size:
            raise SpecExtendConfigError(
                f"speculative_config.chunk_size={self.chunk_size} must be a "
                f"multiple of the KV cache block size ({block_size}): allowed "
                f"values are {block_size}, {2 * block_size}, "
                f"{3 * block_size}, ... (or set --block-size to a divisor of "
                f"chunk_size)."
            )

    def max_working_caches_for(self, max_num_seqs: int) -> int:
        return self.max_working_caches or min(max_num_seqs, DEFAULT_MAX_WORKING_CACHES)

    def summary(self, geometry: WorkingCacheGeometry) -> str:
        fields = " ".join(f"{k}={v}" for k, v in self.model_dump().items())
        return (f"{fields} (resolved: draft_window={geometry.draft_window} "
                f"top_k_chunks={geometry.top_k_chunks} working_cache_capacity="
                f"{geometry.capacity} retrieval_min_len={geometry.retrieval_min_len} "
                f"whole_context_max_len={geometry.whole_context_max_len})")

    def tree_speculative_config(self, vllm_speculative: dict[str, Any],
                                async_scheduling: bool | None) -> dict[str, Any]:
        """vLLM's speculative config for tree mode. A tree's nodes are vLLM's
        scheduled draft tokens, so the node budget is num_speculative_tokens.
        Verification, acceptance and compaction run between the runner's
        sampling and drafting, which async scheduling overlaps: it must be
        off (the caller turns it off)."""
        given = vllm_speculative.get("num_speculative_tokens")
        if given is not None and given != self.tree_nodes:
            raise SpecExtendConfigError(
                f"speculative_config.num_speculative_tokens={given}: with tree=true the "
                f"draft tokens per step are the tree's nodes; set tree_nodes (now "
                f"{self.tree_nodes}) and leave num_speculative_tokens out, or equal")
        for field, allowed, why in TREE_CONFLICTS:
            if vllm_speculative.get(field, allowed) != allowed:
                raise SpecExtendConfigError(
                    f"speculative_config.{field}={vllm_speculative[field]!r}: with "
                    f"tree=true {why}; leave {field} unset")
        if async_scheduling:
            raise SpecExtendConfigError(
                "async_scheduling=true: speculative_config.tree=true needs the runner "
                "to accept a tree before it drafts the next one; leave async "
                "scheduling unset")
        return {**vllm_speculative, "num_speculative_tokens": self.tree_nodes}

    def servable_policy(self, async_scheduling: bool) -> tuple["SpecExtendConfig", str | None]:
        """The per-request policy cuts each request's drafts before the
        scheduler sees them: with async scheduling the scheduler has placed
        them already, and a tree's nodes are no chain to cut. Asked for
        there, it is an error; by default it turns off. Returns the settings
        and, when it turned off, why."""
        conflict = None
        if async_scheduling:
            conflict = "async scheduling schedules drafts before the policy has cut them"
        elif self.tree:
            conflict = "tree=true drafts trees, whose nodes are not a chain to cut"
        if not self.adaptive or conflict is None:
            return self, None
        if "adaptive" in self.model_fields_set:
            raise SpecExtendConfigError(
                f"speculative_config.adaptive=true: {conflict}; set adaptive to false"
                + (" or turn async scheduling off (--no-async-scheduling)"
                   if not self.tree else ""))
        return self.model_copy(update={"adaptive": False}), conflict

    def describe(self, geometry: WorkingCacheGeometry, max_model_len: int) -> str:
        """What the draft reads and how it drafts, in words (the start-up log)."""
        return f"{self._describe_context(geometry, max_model_len)}; {self._describe_drafting()}"

    def _describe_context(self, geometry: WorkingCacheGeometry, max_model_len: int) -> str:
        if self.builds_working_caches(geometry, max_model_len):
            if geometry.whole_context_max_len > geometry.retrieval_min_len:
                chooser = ("each request drafts over whichever it measures faster"
                           if self.adaptive else "adaptive=false: always the working cache")
                return (f"Cross-model Retrieval on; contexts of "
                        f"{geometry.retrieval_min_len + 1} to {geometry.whole_context_max_len} "
                        f"tokens may draft whole or over a working cache: {chooser}")
            return "Cross-model Retrieval on"
        if self.retrieval:
            return (f"Cross-model Retrieval idle: max_model_len={max_model_len} is within "
                    f"retrieval_min_len={geometry.retrieval_min_len}, so the draft reads "
                    f"every request whole, as stock draft_model does")
        if geometry.window_binds(max_model_len):
            return (f"retrieval=false: the draft attends over at most the newest "
                    f"{geometry.main_window} positions (a sliding window)")
        return "retrieval=false: the draft sees the full context (stock draft_model)"

    def _describe_drafting(self) -> str:
        if self.draft_method != "draft_model":
            return f"chain drafts from an {self.draft_method} head"
        if self.tree:
            return (f"tree mode on: dynamic draft trees of {self.tree_nodes} nodes, depth "
                    f"at most {self.tree_max_depth}, threshold {self.tree_threshold}, "
                    f"verified with Hybrid Tree Attention")
        if self.hybrid_tree_attention:
            return (f"chain drafts; Hybrid Tree Attention verifies prefixes from "
                    f"{self.hybrid_tree_attention_min_len} tokens")
        return "chain drafts; Hybrid Tree Attention off (vLLM's own verification)"


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
    bounds = []
    for constraint in info.metadata:
        for attribute, symbol in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            if getattr(constraint, attribute, None) is not None:
                bounds.append(f"{symbol} {getattr(constraint, attribute)}")
    if not bounds:
        return ""
    kind = "a number" if info.annotation is float else "an integer"
    return f"{kind} " + " and ".join(bounds)
