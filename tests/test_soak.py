"""A short soak through the OpenAI server in chain mode (benchmarks/soak.py
with 128 requests, 16 at a time): every check of the full soak must hold,
and the load must have exercised what it is meant to (preemption, prefix
hits, client hang-ups, prompts past the draft's positions, speculation).
Preemption comes from running requests outgrowing the cache, so it depends
on timing: 64 requests preempted the SpecExtend server 0-2 times, and 0
fails the load check; 128 give it twice the chances."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import soak  # noqa: E402

REQUESTS = 128


@pytest.fixture(scope="module")
def report(tiny_pair, tmp_path_factory):
    output = tmp_path_factory.mktemp("soak") / "soak.json"
    exit_code = soak.main(["--requests", str(REQUESTS), "--concurrency", "16",
                           "--output", str(output), "--log-dir", str(output.parent)])
    return exit_code, json.loads(output.read_text())


def test_every_soak_check_holds(report):
    exit_code, result = report
    failed = [name for name, passed in result["checks"].items() if not passed]
    assert not failed and exit_code == 0, (failed, result["failed"], result["greedy_mismatches"])


def test_the_load_was_the_intended_one(report):
    _, result = report
    assert result["completed"] + result["aborted_by_client"] == result["requests"] == REQUESTS
    assert result["aborted_by_client"] > 0
    assert result["greedy_compared"] > 20
    assert result["sampled_completed"] > 10
    assert result["long_prompts_past_draft_positions"] > 5
    assert result["preemptions"] > 0 and result["prefix_cache_hits_tokens"] > 0
    after = result["plugin_state_after"]
    assert after["specextend"] and after["vllm_requests"] == 0
    assert after["working_cache_holders"] == 0 and after["proposed_trees"] == 0
