"""Speculative-decoding numbers: read from a vLLM `LLM`'s own metrics, and
the speculation policy's, published among them."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

logger = logging.getLogger("vllm.specextend")

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


def specextend_metrics(llm) -> dict[str, float]:
    """SpecExtend's own metrics in `llm.get_metrics()`, by name (and labels
    other than model_name)."""
    values = {}
    for metric in llm.get_metrics():
        if metric.name.startswith("vllm:specextend_"):
            labels = ",".join(f"{key}={value}" for key, value in sorted(metric.labels.items())
                              if key != "model_name")
            values[metric.name + (f"{{{labels}}}" if labels else "")] = metric.value
    return values


def mean_accepted_length(counters: dict[str, float]) -> float | None:
    """Tokens produced per target step: 1 + accepted drafts per step."""
    drafts = counters["vllm:spec_decode_num_drafts"]
    return 1 + counters["vllm:spec_decode_num_accepted_tokens"] / drafts if drafts else None


def acceptance_rate(counters: dict[str, float]) -> float | None:
    drafted = counters["vllm:spec_decode_num_draft_tokens"]
    return counters["vllm:spec_decode_num_accepted_tokens"] / drafted if drafted else None


# SpecExtend's numbers in vLLM's Prometheus metrics. They are counted in
# the worker; vLLM's /metrics (and `LLM.get_metrics()`) is read in the
# front-end process. The worker writes its totals to a small file, at most
# once a second and when its last request finishes, in a folder its front
# end made when it configured the engine (named in the environment the
# engine's processes inherit); a collector registered in the front end's
# Prometheus registry reads that folder's files when scraped.
METRICS_DIR_ENV = "VLLM_SPECEXTEND_METRICS_DIR"
WRITE_EVERY_S = 1.0
# (worker state key, metric name without the "vllm:specextend_" prefix, kind,
# help). A key the worker lacks (the policy off) is not shown.
METRICS = (
    ("refreshes", "refreshes", "counter",
     "Drafting rounds that refreshed working caches (score, select, lay out)"),
    ("working_caches_refreshed", "working_caches_refreshed", "counter",
     "Working caches refilled, summed over refreshes"),
    ("refresh_seconds", "refresh_seconds", "counter",
     "Time spent refreshing working caches (device time on GPU)"),
    ("working_cache_request_rounds", "working_cache_request_rounds", "counter",
     "Requests that drafted over a working cache, summed over drafting rounds"),
    ("working_cache_holders", "working_caches_in_use", "gauge",
     "Requests holding a working cache"),
    ("working_caches", "working_caches", "gauge",
     "Working caches allocated at load"),
    ("policy_rounds", "policy_rounds", "counter",
     "Drafting rounds the speculation policy decided"),
    ("policy_requests_drafting", "policy_request_rounds_drafting", "counter",
     "Decoding requests that drafted, summed over rounds"),
    ("policy_requests_stepped_aside", "policy_request_rounds_stepped_aside", "counter",
     "Decoding requests that stepped aside (drafted nothing), summed over rounds"),
    ("policy_drafts_picked", "policy_draft_tokens_picked", "counter",
     "Draft tokens the policy picked, summed over requests and rounds (mean picked "
     "length: this over the two request_rounds counters)"),
    ("policy_probes", "policy_probes", "counter",
     "One-token drafts of requests stepped aside, to see if drafting pays again"),
    ("policy_cost_rechecks", "policy_cost_rechecks", "counter",
     "Rounds run to measure again the cost of a round length unmeasured too long: a "
     "request drafted one token past its pick, or a batch that drafts stood aside"),
    ("policy_rounds_skipped", "policy_rounds_skipped", "counter",
     "Rounds in which every request stepped aside: no draft forward ran"),
    ("policy_tokens_caught_up", "policy_tokens_caught_up", "counter",
     "Tokens the draft read late, for the rounds it skipped"),
    ("policy_catch_ups", "policy_catch_ups", "counter",
     "Rounds that first ran a draft forward over the tokens of rounds skipped"),
    ("policy_context_rounds_whole_context", "policy_context_rounds_whole_context", "counter",
     "Requests with a choice of context that drafted over their whole context, summed "
     "over the rounds measured (not warm-up rounds, nor steps with a prefill)"),
    ("policy_context_rounds_working_cache", "policy_context_rounds_working_cache", "counter",
     "Requests with a choice of context that drafted over a working cache, summed over "
     "the rounds measured (not warm-up rounds, nor steps with a prefill)"),
    ("policy_context_trials", "policy_context_trials", "counter",
     "Comparisons of a request's two contexts decided (tokens per second of each)"),
    ("policy_context_kept_working_cache", "policy_context_kept_working_cache", "counter",
     "Comparisons the working cache won"),
    ("policy_latest_drafting", "requests_drafting", "gauge",
     "Decoding requests drafting in the latest round"),
    ("policy_latest_stepped_aside", "requests_stepped_aside", "gauge",
     "Decoding requests stepped aside in the latest round"),
)
PICKS_KEY = "policy_picks_by_length"

# This front end's folder (removed with it) and the collector reading it.
_metrics_dir: tempfile.TemporaryDirectory | None = None
_collector: "MetricsCollector | None" = None


def metrics_dir() -> Path | None:
    """The folder a worker writes to: its front end's."""
    folder = os.environ.get(METRICS_DIR_ENV)
    return Path(folder) if folder else None


class MetricsFile:
    """The worker's side: its totals, written atomically."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        folder = metrics_dir()
        self.path = folder / f"engine-{os.getpid()}.json" if folder else None
        self.last_write = -float("inf")
        self.failed = self.path is None  # no front end of ours to read it

    def due(self, force: bool = False) -> bool:
        """Whether `write` would write now: a front end of ours reads the
        file, and a second has passed (or `force`). The worker builds its
        state only then, not every drafting round."""
        return not self.failed and (
            force or time.monotonic() - self.last_write >= WRITE_EVERY_S)

    def write(self, state: dict, force: bool = False) -> None:
        if not self.due(force):
            return
        self.last_write = time.monotonic()
        values = {key: state[key] for key, *_ in METRICS if key in state}
        if PICKS_KEY in state:
            values[PICKS_KEY] = state[PICKS_KEY]
        try:
            partial = self.path.with_suffix(".partial")
            partial.write_text(json.dumps({"model_name": self.model_name, "values": values}))
            os.replace(partial, self.path)
        except OSError as error:  # the front end is gone: nothing reads them
            self.failed = True
            logger.warning("SpecExtend: metrics not written (%s)", error)


class MetricsCollector:
    """The front end's side: one Prometheus family per metric, summed over
    the engines' files of each served model."""

    def __init__(self, folder: Path):
        self.folder = folder

    def _engines(self) -> list[dict]:
        engines = []
        for path in sorted(self.folder.glob("engine-*.json")):
            try:
                engines.append(json.loads(path.read_text()))
            except (OSError, ValueError):  # replaced while read: next scrape
                continue
        return engines

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        engines = self._engines()  # none: no SpecExtend engine, nothing shown
        models = sorted({engine["model_name"] for engine in engines})

        def values_of(key, model):
            return [e["values"][key] for e in engines
                    if e["model_name"] == model and key in e["values"]]

        for key, name, kind, help_text in METRICS:
            family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(
                f"vllm:specextend_{name}", help_text, labels=["model_name"])
            for model in models:
                if values := values_of(key, model):
                    family.add_metric([model], sum(values))
            if family.samples:
                yield family
        picks = CounterMetricFamily(
            "vllm:specextend_policy_picks", "Requests' picked draft lengths, by length",
            labels=["model_name", "length"])
        for model in models:
            for length, counts in enumerate(zip(*values_of(PICKS_KEY, model))):
                picks.add_metric([model, str(length)], sum(counts))
        if picks.samples:
            yield picks


def register_metrics() -> None:
    """In a front end configuring a SpecExtend engine: a fresh folder for its
    engine's files, named in the environment before vLLM starts the engine's
    processes, and its collector in this process's Prometheus registry in
    place of an earlier one (vLLM's /metrics and `LLM.get_metrics()` read
    it; with several API servers vLLM reads its multiprocess files instead,
    and these are not shown). A fresh folder, so that no engine of another
    front end (a parent process's, say) is counted."""
    from prometheus_client import REGISTRY

    global _metrics_dir, _collector
    _metrics_dir = tempfile.TemporaryDirectory(prefix="vllm-specextend-metrics-")
    os.environ[METRICS_DIR_ENV] = _metrics_dir.name
    if _collector is not None:
        REGISTRY.unregister(_collector)
    _collector = MetricsCollector(Path(_metrics_dir.name))
    REGISTRY.register(_collector)
