"""Runs one vLLM engine on a job described in JSON and writes its results.

Tests start it as a subprocess so that every engine gets a fresh process
(vLLM keeps per-process state) and its log lines can be checked.
Usage: python tests/engine_job.py JOB.json RESULT.json
"""

import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


def spec_decode_counters(llm) -> dict:
    counters = {}
    for metric in llm.get_metrics():
        if metric.name.startswith("vllm:spec_decode"):
            counters[metric.name] = getattr(metric, "value", None) or getattr(
                metric, "values", None
            )
    return counters


def main(job_path: str, result_path: str) -> None:
    from vllm import LLM, SamplingParams

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
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True)
    prompts = [{"prompt_token_ids": ids} for ids in job["prompts"]]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    result = {
        "token_ids": [list(o.outputs[0].token_ids) for o in outputs],
        "spec_decode": spec_decode_counters(llm),
    }
    if job.get("collect_worker_settings"):
        result["worker_settings"] = llm.collective_rpc(_runner_settings)
    with open(result_path, "w") as f:
        json.dump(result, f)


def _runner_settings(worker):
    settings = getattr(worker.model_runner, "specextend_config", None)
    return None if settings is None else settings.model_dump()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
