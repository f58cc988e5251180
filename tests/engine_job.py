"""Runs one vLLM engine on a job described in JSON and writes its results.

Tests start it as a subprocess so that every engine gets a fresh process
(vLLM keeps per-process state) and its log lines can be checked.
Usage: python tests/engine_job.py JOB.json RESULT.json

The engine core and a single worker run inside this process: each process
vLLM starts costs about 9 s of imports on these CPUs, most of a tiny
engine's life. Tensor-parallel jobs keep their worker processes; the soak
and the server tests run vLLM's usual process layout end to end.
"""

import json
import os
import sys
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


def main(job_path: str, result_path: str) -> None:
    from vllm import LLM, SamplingParams

    from vllm_specextend.metrics import spec_decode_counters, specextend_metrics

    job = json.loads(open(job_path).read())
    engine_kwargs = job.get("engine_kwargs", {})
    if engine_kwargs.get("tensor_parallel_size", 1) == 1:
        engine_kwargs = {"distributed_executor_backend": "uni", **engine_kwargs}
    llm = LLM(
        model=job["model"],
        speculative_config=job.get("speculative_config"),
        max_model_len=job.get("max_model_len", 4096),
        dtype="float32",
        gpu_memory_utilization=0.1,
        enforce_eager=True,  # compiling costs ~50 s per engine on CPU
        disable_log_stats=False,
        seed=0,
        **engine_kwargs,
    )
    sampling = job.get("sampling")
    if "params" in job:  # one SamplingParams per prompt, as given
        params = [SamplingParams(**kwargs) for kwargs in job["params"]]
    elif sampling is None:
        params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True)
    else:  # one seed per prompt: request i draws with seed i
        params = [SamplingParams(temperature=sampling["temperature"], top_k=sampling["top_k"],
                                 seed=seed, max_tokens=job["max_tokens"], ignore_eos=True)
                  for seed in range(len(job["prompts"]))]
    prompts = [{"prompt_token_ids": ids} for ids in job["prompts"]]
    if job.get("count_host_syncs"):
        llm.collective_rpc(_count_host_syncs)
    if job.get("record_attention_spans"):
        llm.collective_rpc(_record_attention_spans)
    if job.get("record_chunk_choices"):
        llm.collective_rpc(_record_chunk_choices)
    if job.get("record_draft_inputs"):
        llm.collective_rpc(_record_draft_inputs)
    if "slow_target_s" in job:
        llm.collective_rpc(_slow_target, args=(job["slow_target_s"],))
    if "counter_marks" in job:  # one prompt, step by step
        token_ids, result = _counters_along_output(llm, prompts[0], params,
                                                   job["counter_marks"])
        result["token_ids"] = [token_ids]
    else:
        outputs = llm.generate(prompts, params, use_tqdm=False)
        result = {"token_ids": [list(o.outputs[0].token_ids) for o in outputs]}
    result["spec_decode"] = spec_decode_counters(llm)
    if "params" in job:
        result["outputs"] = [_described(output) for output in outputs]
    if "refused_params" in job:
        result["refusals"] = [_refusal(llm, prompts[0], kwargs)
                              for kwargs in job["refused_params"]]
    if job.get("collect_worker_settings"):
        result["worker_settings"] = llm.collective_rpc(_runner_settings)
        result["trees_package_loaded"] = llm.collective_rpc(_trees_package_loaded)
    if job.get("count_host_syncs"):
        [result["host_syncs"]] = llm.collective_rpc(_host_syncs_counted)
    if job.get("record_attention_spans"):
        [result["attention_spans"]] = llm.collective_rpc(_attention_spans_recorded)
    if job.get("record_chunk_choices"):  # one list per tensor-parallel rank
        result["chunk_choices"] = llm.collective_rpc(_chunk_choices_recorded)
    if job.get("record_draft_inputs"):
        [result["draft_inputs"]] = llm.collective_rpc(_draft_inputs_recorded)
    if job.get("request_state"):
        result["request_state"] = _state_once_idle(llm)
        result["specextend_metrics"] = specextend_metrics(llm)
    if job.get("tree_reordered_buffers"):
        [result["tree_reordered_buffers"]] = llm.collective_rpc(_tree_reordered_buffers)
    if "kv_blocks" in job:
        [result["kv_blocks"]] = llm.collective_rpc(_target_kv_blocks, args=(job["kv_blocks"],))
    if "draft_probe" in job:
        [result["draft_probe"]] = llm.collective_rpc(
            _draft_under_fixed_working_set, args=(job["draft_probe"],))
    with open(result_path, "w") as f:
        json.dump(result, f)


def _counters_along_output(llm, prompt, params, marks: list[int]) -> tuple[list, dict]:
    """Run one request engine step by step; vLLM's spec-decode counters
    each time its output first reaches one of `marks` tokens."""
    from vllm_specextend.metrics import accepted_by_position, spec_decode_counters

    engine = llm.llm_engine
    engine.add_request("traced", prompt, params)
    token_ids, snapshots = [], []
    while engine.has_unfinished_requests():
        for output in engine.step():
            token_ids = list(output.outputs[0].token_ids)
        while len(snapshots) < len(marks) and len(token_ids) >= marks[len(snapshots)]:
            snapshots.append({"output_tokens": len(token_ids), **spec_decode_counters(llm),
                              "accepted_by_position": accepted_by_position(llm)})
    return token_ids, {"counters_along_output": snapshots}


def _state_once_idle(llm, attempts: int = 10) -> dict:
    """The worker's `specextend_state` once vLLM's runner has let go of the
    finished requests: the engine core (in this process) tells it in one
    more, empty, step."""
    for _ in range(attempts):
        [state] = llm.collective_rpc("specextend_state")
        if state.get("vllm_requests") == 0:
            break
        llm.llm_engine.step()
    return state


# Tensor methods that wait for the device (on a GPU) when called.
SYNCING_METHODS = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__",
                   "__float__", "__index__")


def _count_host_syncs(worker):
    """Patch, in this worker, every torch call that makes the host wait for
    the device, so that each call made directly from vllm_specextend's code
    is counted with its file, line and function; code in functions named
    `*_cpu` (what only vLLM's CPU build runs) is left out, as are calls from
    vLLM or torch themselves. Boolean-mask indexing and `repeat_interleave`
    without `output_size` count too."""
    import collections
    import sys
    from pathlib import Path

    import torch

    import vllm_specextend

    package = str(Path(vllm_specextend.__file__).parent)
    counts = worker.specextend_host_syncs = collections.Counter()

    def record(what):
        frame = sys._getframe(2)  # the caller of the patched method
        if not frame.f_code.co_filename.startswith(package):
            return
        site = f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} {frame.f_code.co_name}"
        while frame is not None:
            if frame.f_code.co_filename.startswith(package) and \
                    frame.f_code.co_name.endswith("_cpu"):
                return
            frame = frame.f_back
        counts[f"{what} at {site}"] += 1

    def counting(name, original, when=lambda *args, **kwargs: True):
        def method(*args, **kwargs):
            if when(*args, **kwargs):
                record(name)
            return original(*args, **kwargs)
        return method

    def boolean_index(self, index, *rest):
        indices = index if isinstance(index, tuple) else (index,)
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)

    def no_output_size(*args, **kwargs):
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None

    for name in SYNCING_METHODS:
        setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    for name in ("__getitem__", "__setitem__"):
        setattr(torch.Tensor, name, counting("boolean-mask indexing",
                                             getattr(torch.Tensor, name), boolean_index))
    torch.Tensor.repeat_interleave = counting("repeat_interleave", torch.Tensor.repeat_interleave,
                                              no_output_size)
    torch.repeat_interleave = counting("repeat_interleave", torch.repeat_interleave,
                                       no_output_size)
    torch.nonzero = counting("nonzero", torch.nonzero)


def _host_syncs_counted(worker):
    from vllm_specextend.vllm_glue.proposer import proposer_of

    proposer = proposer_of(worker.model_runner)
    return {"by_site": dict(worker.specextend_host_syncs),
            "drafting_rounds": proposer.rounds if proposer is not None else 0}


def _record_attention_spans(worker):
    """Record, for every call of vLLM's CPU attention kernel in this worker,
    its sliding window, its longest sequence, whether it read a SpecExtend
    working cache, and its cache's block size."""
    from vllm import _custom_ops as ops

    caches = worker.model_runner.drafter.caches
    storages = set() if caches is None else {
        t.untyped_storage().data_ptr() for t in caches.storage.values()}
    kernel = ops.cpu_attention_with_kv_cache
    calls = worker.specextend_attention_calls = []

    def recording_kernel(*args, **kwargs):
        key_cache = kwargs["key_cache"]  # [blocks, kv heads, block size, head size]
        calls.append((kwargs["sliding_window"], int(kwargs["seq_lens"].max()),
                      key_cache.untyped_storage().data_ptr() in storages, key_cache.shape[2]))
        return kernel(*args, **kwargs)

    ops.cpu_attention_with_kv_cache = recording_kernel


def _record_chunk_choices(worker):
    """Record the chunks each refresh keeps, per row, in this worker."""
    from vllm_specextend.retrieval import cross_model_retrieval

    select = cross_model_retrieval.select_chunks
    choices = worker.specextend_chunk_choices = []

    def recording_select(scores, *args):
        kept, num_kept = select(scores, *args)
        choices.append([row[:count].tolist() for row, count in zip(kept, num_kept.tolist())])
        return kept, num_kept

    cross_model_retrieval.select_chunks = recording_select


def _slow_target(worker, seconds):
    """Each forward of the target (not the draft) takes `seconds` longer: a
    target step costs several draft forwards, as in real pairs, where the
    tiny target as its own draft costs what the target does."""
    model = worker.model_runner.model
    forward = model.forward

    def slow_forward(*args, **kwargs):
        time.sleep(seconds)
        return forward(*args, **kwargs)

    model.forward = slow_forward


def _record_draft_inputs(worker):
    """Record, per position (one request), the last input the draft's cache
    got there: token id, hidden state (an EAGLE head's) and the forward that
    wrote it: a round's first pass, a catch-up, or a drafting forward."""
    drafter = worker.model_runner.drafter
    last = worker.specextend_draft_inputs = {}
    writer = ["draft"]

    def recording_forward(forward):
        def method(**inputs):
            for position, token_id, hidden in zip(inputs["positions"].tolist(),
                                                  inputs["input_ids"].tolist(),
                                                  inputs["hidden_states"].tolist()):
                last[position] = (token_id, writer[0], hidden)
            if writer[0] == "first_pass":  # the round's later forwards draft
                writer[0] = "draft"
            return forward(**inputs)
        return method

    def as_writer(name, call):
        def method(*args, **kwargs):
            writer[0] = name
            try:
                return call(*args, **kwargs)
            finally:
                writer[0] = "first_pass" if name == "catch_up" else "draft"
        return method

    drafter.model.forward = recording_forward(drafter.model.forward)
    drafter.propose = as_writer("first_pass", drafter.propose)
    if drafter.catch_up is not None:  # the speculation policy's
        drafter.catch_up.catch_up = as_writer("catch_up", drafter.catch_up.catch_up)


def _draft_inputs_recorded(worker):
    return sorted([position, *entry] for position, entry in
                  worker.specextend_draft_inputs.items())


def _chunk_choices_recorded(worker):
    return worker.specextend_chunk_choices


def _attention_spans_recorded(worker):
    calls = worker.specextend_attention_calls
    working = [seq_len for _, seq_len, on_working, _ in calls if on_working]
    return {"draft_windows": sorted({window for window, _, _, _ in calls if window > 0}),
            "working_cache_calls": len(working), "longest_working_cache": max(working, default=0),
            "windowless_calls": sum(window <= 0 for window, _, _, _ in calls),
            "vllm_cache_block_sizes": sorted({block for _, _, on_working, block in calls
                                              if not on_working})}


def _logprobs(entries):
    """[{token id: logprob}] per position (None entries kept)."""
    return None if entries is None else [
        None if entry is None else {str(t): lp.logprob for t, lp in entry.items()}
        for entry in entries]


def _described(output) -> dict:
    return {"completions": [{"token_ids": list(c.token_ids), "text": c.text,
                             "finish_reason": c.finish_reason,
                             "logprobs": _logprobs(c.logprobs)} for c in output.outputs],
            "prompt_logprobs": _logprobs(output.prompt_logprobs)}


def _refusal(llm, prompt, kwargs) -> str | None:
    """The error a request with these parameters meets, if any."""
    from vllm import SamplingParams

    try:
        llm.generate([prompt], SamplingParams(**kwargs), use_tqdm=False)
    except Exception as error:  # noqa: BLE001 (the message is what is checked)
        return f"{type(error).__name__}: {error}"
    return None


def _tree_reordered_buffers(worker):
    """Which of the runner's per-token buffers tree compaction reorders
    (None: no tree verification in this engine)."""
    runner = worker.model_runner
    if runner.drafter.verification is None:
        return None
    named = {"input_ids": runner.input_ids.gpu, "positions": runner.positions}
    retrieval = runner.drafter.retrieval
    if retrieval is not None:
        named["captured target queries"] = retrieval.capture.queries
    reordered = runner.drafter.verification.reordered_buffers(runner)
    return sorted(name for name, buffer in named.items()
                  if any(buffer is other for other in reordered))


def _trees_package_loaded(worker) -> bool:
    import sys

    return "vllm_specextend.vllm_glue.trees" in sys.modules


def _runner_settings(worker):
    from vllm_specextend.vllm_glue.proposer import proposer_of

    proposer = proposer_of(worker.model_runner)
    return None if proposer is None else proposer.settings.model_dump()


def _target_kv_blocks(worker, blocks):
    """Each target layer's vLLM KV cache (packed, as the CPU backend keeps
    it) at the given blocks, flattened."""
    import torch

    model = worker.model_runner.model
    caches = [m.attn.kv_cache for m in model.modules()
              if hasattr(m, "attn") and hasattr(m, "rotary_emb")]
    num_blocks = worker.vllm_config.cache_config.num_gpu_blocks
    block_dim = list(caches[0].shape).index(num_blocks)
    return [cache.index_select(block_dim, torch.tensor(blocks)).flatten().tolist()
            for cache in caches]


def _draft_under_fixed_working_set(worker, probe):
    """Inside the worker, after generation: write the draft's K/V of
    `token_ids[:-1]` into vLLM's cache with vLLM's own prefill, fill working
    cache 0 with the given kept chunks and recent window, then decode the
    last token through it. Returns that token's draft logits, the working
    cache's keys at its compact positions (layer 0), and how many times
    vLLM's attention kernel read a working cache."""
    import numpy as np
    import torch
    from vllm import _custom_ops as ops
    from vllm.forward_context import set_forward_context
    from vllm.v1.attention.backend import CommonAttentionMetadata

    from vllm_specextend.retrieval.working_cache import window_starts, working_cache_layout
    from vllm_specextend.retrieval.working_caches import DraftRound

    drafter = worker.model_runner.drafter
    token_ids = torch.tensor(probe["token_ids"])
    context_len = len(token_ids) - 1
    block_size = worker.vllm_config.cache_config.block_size
    num_blocks = -(-len(token_ids) // block_size)
    block_table = torch.arange(1, num_blocks + 1, dtype=torch.int32)[None]
    storages = {t.untyped_storage().data_ptr() for t in drafter.caches.storage.values()}
    kernel, reads = ops.cpu_attention_with_kv_cache, []

    def counting_kernel(*args, **kwargs):
        reads.append(kwargs["key_cache"].untyped_storage().data_ptr() in storages)
        return kernel(*args, **kwargs)

    def metadata(start, end):
        count = end - start
        positions = torch.arange(start, end)
        slots = block_table[0, positions // block_size].long() * block_size + positions % block_size
        return CommonAttentionMetadata(
            query_start_loc=torch.tensor([0, count], dtype=torch.int32),
            query_start_loc_cpu=torch.tensor([0, count], dtype=torch.int32),
            seq_lens=torch.tensor([end], dtype=torch.int32), num_reqs=1,
            num_actual_tokens=count, max_query_len=count, max_seq_len=end,
            block_table_tensor=block_table, slot_mapping=slots, causal=True)

    def draft_forward(start, end, draft_index):
        """One draft forward as the proposer runs it (true positions and
        slots; the plan comes from SpecExtend's metadata builder)."""
        cad = metadata(start, end)
        drafter.positions[: end - start] = torch.arange(start, end)
        _, per_layer = drafter.build_per_group_and_layer_attn_metadata(cad, draft_index)
        with set_forward_context(per_layer, drafter.vllm_config, num_tokens=end - start,
                                 slot_mapping=dict.fromkeys(per_layer, cad.slot_mapping)):
            hidden = drafter.model(input_ids=token_ids[start:end],
                                   positions=drafter.positions[: end - start])
        return drafter.model.compute_logits(hidden[-1:])

    with torch.inference_mode():  # the engine's buffers are inference tensors
        draft_forward(0, context_len, draft_index=0)  # no round: vLLM's own prefill
        caches = drafter.caches
        geometry = caches.geometry
        kept = torch.tensor([probe["kept_chunks"]])
        context = torch.tensor([context_len])
        window_start = window_starts(context, geometry.chunk_size, geometry.recent_tokens)
        layout = working_cache_layout(kept, torch.tensor([kept.shape[1]]), window_start,
                                      context, geometry.chunk_size, geometry.capacity)
        drafter.step.draft_round = DraftRound(caches, np.array([0]), np.array([1]), drafter.staging)
        caches.fill(drafter.draft_layers, drafter.draft_reader, block_table,
                    drafter.step.draft_round.cache_ids, layout, drafter.rope_backward)
        drafter.step.draft_round.read_offsets()
        ops.cpu_attention_with_kv_cache = counting_kernel
        try:
            logits = draft_forward(context_len, context_len + 1, draft_index=1)
        finally:
            ops.cpu_attention_with_kv_cache = kernel
            drafter.step.draft_round = None
        name, layer = next(iter(drafter.draft_layers.items()))
        length = int(layout.lengths[0])
        keys, _ = drafter.draft_reader.read(caches.cache_of(name, layer.kv_cache),
                                       torch.arange(length))
    return {"logits": logits[0].tolist(), "compact_keys": keys.tolist(),
            "working_cache_reads": sum(reads), "kernel_calls": len(reads)}


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
