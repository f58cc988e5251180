"""`vllm serve` with method specextend in tree mode: starts, answers the
OpenAI completion and chat endpoints on loopback (greedy ids equal
target-only), refuses with HTTP 400 a sampling parameter trees cannot serve,
logs its settings once, and stops. With an EAGLE-3 head (`draft_method:
eagle3`), a prompt past the head's window completes equal to target-only
through working caches. Chain mode with a draft model through the server is
the soak's (tests/test_soak.py)."""

import json
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

from conftest import run_engine
from vllm_specextend.models.eagle3 import build_random_eagle3_head

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from openai_server import counters, openai_server  # noqa: E402

MAX_NEW_TOKENS = 16
HEAD_WINDOW = 2048


@contextmanager
def specextend_server(target: str, speculative_config: dict, log_path: Path):
    with openai_server(target,
                       ["--speculative-config", json.dumps(speculative_config),
                        "--dtype", "float32", "--max-model-len", "4096",
                        "--gpu-memory-utilization", "0.1", "--enforce-eager"],
                       log_path) as base:
        yield base, log_path


@pytest.fixture(scope="module")
def server(tiny_pair, tmp_path_factory):
    speculative_config = {
        "method": "specextend",
        "model": tiny_pair.draft,
        "tree": True,
        "tree_nodes": 12,
        "tree_max_depth": 5,
        "top_k_chunks": 24,
    }
    with specextend_server(tiny_pair.target, speculative_config,
                           tmp_path_factory.mktemp("server") / "server.log") as started:
        yield started


@pytest.fixture(scope="module")
def eagle3_server(tiny_pair, tmp_path_factory):
    head = build_random_eagle3_head(tiny_pair.target, tmp_path_factory.mktemp("head"),
                                    HEAD_WINDOW)
    speculative_config = {
        "method": "specextend", "model": head, "draft_method": "eagle3",
        "num_speculative_tokens": 3,
        "chunk_size": 32, "top_k_chunks": 4, "recent_tokens": 64, "refresh_every": 2,
    }
    with specextend_server(tiny_pair.target, speculative_config,
                           tmp_path_factory.mktemp("eagle3_server") / "server.log") as started:
        yield started


@pytest.fixture(scope="module")
def server_prompts(mixed_prompts):
    """A short prompt for the tree server; one past the head's window."""
    long_prompt = mixed_prompts[3]
    assert len(long_prompt) > HEAD_WINDOW
    return {"tree": mixed_prompts[1][:300], "eagle3": long_prompt}


@pytest.fixture(scope="module")
def target_only_ids(tiny_pair, server_prompts, tmp_path_factory):
    names = list(server_prompts)
    job = {"model": tiny_pair.target, "prompts": [server_prompts[n] for n in names],
           "max_tokens": MAX_NEW_TOKENS}
    result, _ = run_engine(job, tmp_path_factory.mktemp("server_target_only"))
    return dict(zip(names, result["token_ids"]))


def greedy_completion_ids(base: str, model: str, prompt: list[int]) -> list[int]:
    response = requests.post(f"{base}/v1/completions", timeout=300, json={
        "model": model, "prompt": prompt, "max_tokens": MAX_NEW_TOKENS,
        "temperature": 0.0, "ignore_eos": True, "return_token_ids": True,
    })
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == MAX_NEW_TOKENS
    [choice] = response.json()["choices"]
    return choice["token_ids"]


def test_completions_match_target_only(server, tiny_pair, server_prompts, target_only_ids):
    base, _ = server
    assert (greedy_completion_ids(base, tiny_pair.target, server_prompts["tree"])
            == target_only_ids["tree"])


def test_tree_mode_refuses_penalties_with_http_400(server, tiny_pair, server_prompts):
    base, _ = server
    response = requests.post(f"{base}/v1/completions", timeout=120, json={
        "model": tiny_pair.target, "prompt": server_prompts["tree"], "max_tokens": 4,
        "repetition_penalty": 1.2,
    })
    assert response.status_code == 400, response.text
    assert "repetition_penalty" in response.json()["error"]["message"]


def test_chat_completions(server, tiny_pair):
    base, _ = server
    response = requests.post(f"{base}/v1/chat/completions", timeout=120, json={
        "model": tiny_pair.target,
        "messages": [{"role": "user", "content": "Summarize the report in one line."}],
        "max_tokens": MAX_NEW_TOKENS, "temperature": 0.0, "ignore_eos": True,
    })
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert isinstance(body["choices"][0]["message"]["content"], str)
    assert body["usage"]["completion_tokens"] == MAX_NEW_TOKENS


def test_settings_logged_once_at_startup(server):
    _, log_path = server
    lines = log_path.read_text().splitlines()
    front = [l for l in lines if "SpecExtend settings (front end)" in l]
    assert len(front) == 1 and "top_k_chunks=24" in front[0]


def test_eagle3_head_past_its_window_matches_target_only(eagle3_server, tiny_pair,
                                                         server_prompts, target_only_ids):
    base, log_path = eagle3_server
    assert (greedy_completion_ids(base, tiny_pair.target, server_prompts["eagle3"])
            == target_only_ids["eagle3"])
    log = log_path.read_text()
    assert "chain drafts from an eagle3 head" in log
    assert "first working caches filled" in log
    assert counters(base)["vllm:spec_decode_num_drafts_total"] > 0
