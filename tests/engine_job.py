"""Runs one vLLM engine on a job described in JSON and writes its results.

Tests start it as a subprocess so that every engine gets a fresh process
(vLLM keeps per-process state) and its log lines can be checked.
Usage: python tests/engine_job.py JOB.json RESULT.json
"""

import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


def main(job_path: str, result_path: str) -> None:
    from vllm import LLM, SamplingParams

    from vllm_specextend.metrics import spec_decode_counters

    job = json.loads(open(job_path).read())
    llm = LLM(
        model=job["model"],
        speculative_config=job.get("speculative_config"),
        max_model_len=job.get("max_model_len", 4096),
        dtype="float32",
        gpu_memory_utilization=0.1,
        enforce_eager=True,  # compiling costs ~50 s per engine on CPU
        disable_log_stats=False,
        seed=0,
        **job.get("engine_kwargs", {}),
    )
    sampling = job.get("sampling")
    if sampling is None:
        params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True)
    else:  # one seed per prompt: request i draws with seed i
        params = [SamplingParams(temperature=sampling["temperature"], top_k=sampling["top_k"],
                                 seed=seed, max_tokens=job["max_tokens"], ignore_eos=True)
                  for seed in range(len(job["prompts"]))]
    prompts = [{"prompt_token_ids": ids} for ids in job["prompts"]]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    result = {
        "token_ids": [list(o.outputs[0].token_ids) for o in outputs],
        "spec_decode": spec_decode_counters(llm),
    }
    if job.get("collect_worker_settings"):
        result["worker_settings"] = llm.collective_rpc(_runner_settings)
    if "kv_blocks" in job:
        [result["kv_blocks"]] = llm.collective_rpc(_target_kv_blocks, args=(job["kv_blocks"],))
    if "draft_probe" in job:
        [result["draft_probe_logits"]] = llm.collective_rpc(
            _draft_logits_under_fixed_working_set, args=(job["draft_probe"],))
    with open(result_path, "w") as f:
        json.dump(result, f)


def _runner_settings(worker):
    settings = getattr(worker.model_runner, "specextend_config", None)
    return None if settings is None else settings.model_dump()


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


def _draft_logits_under_fixed_working_set(worker, probe):
    """Inside the worker, after generation: run vLLM's draft model (with the
    plugin's attention) over `token_ids[:-1]` as a prefill, then decode the
    last token with a fixed working set; return that token's draft logits."""
    from types import SimpleNamespace

    import torch
    from vllm.forward_context import set_forward_context

    from vllm_specextend.retrieval.working_set import WorkingSets

    drafter = worker.model_runner.drafter
    token_ids = torch.tensor(probe["token_ids"])
    context_len = len(token_ids) - 1
    block_size = worker.vllm_config.cache_config.block_size
    block_table = torch.arange(-(-len(token_ids) // block_size), dtype=torch.int32)[None]

    @torch.inference_mode()  # the engine's buffers are inference tensors
    def draft_forward(start, end):
        count = end - start
        metadata = SimpleNamespace(
            num_actual_tokens=count, slot_mapping=torch.arange(start, end),
            query_start_loc=torch.tensor([0, count], dtype=torch.int32),
            seq_lens=torch.tensor([end], dtype=torch.int32), block_table=block_table,
            max_seq_len=end)
        with set_forward_context(metadata, drafter.vllm_config, num_tokens=count, slot_mapping={}):
            hidden = drafter.model(input_ids=token_ids[start:end],
                                   positions=torch.arange(start, end))
        return drafter.model.compute_logits(hidden[-1:])

    draft_forward(0, context_len)  # writes the context's draft K/V at true slots
    planner = drafter.specextend_planner
    planner.working_sets = WorkingSets(
        torch.tensor(probe["kept_chunks"])[None], torch.tensor([probe["window_start"]]),
        probe["chunk_size"])
    try:
        return draft_forward(context_len, context_len + 1)[0].tolist()
    finally:
        planner.working_sets = None


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
