"""`vllm serve` with method specextend in tree mode: starts, answers the
OpenAI completion and chat endpoints on loopback (greedy ids equal
target-only), refuses with HTTP 400 a sampling parameter trees cannot serve,
logs its settings once, and stops. Chain mode through the server is the
soak's (tests/test_soak.py)."""

import json
import sys
from pathlib import Path

import pytest
import requests

from conftest import run_engine

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from openai_server import openai_server  # noqa: E402

MAX_NEW_TOKENS = 16


@pytest.fixture(scope="module")
def server(tiny_pair, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    speculative_config = {
        "method": "specextend",
        "model": tiny_pair.draft,
        "tree": True,
        "tree_nodes": 12,
        "tree_max_depth": 5,
        "top_k_chunks": 24,
    }
    with openai_server(tiny_pair.target,
                       ["--speculative-config", json.dumps(speculative_config),
                        "--dtype", "float32", "--max-model-len", "4096",
                        "--gpu-memory-utilization", "0.1", "--enforce-eager"],
                       log_path) as base:
        yield base, log_path


@pytest.fixture(scope="module")
def server_prompt(mixed_prompts):
    return mixed_prompts[1][:300]


@pytest.fixture(scope="module")
def target_only_ids(tiny_pair, server_prompt, tmp_path_factory):
    job = {"model": tiny_pair.target, "prompts": [server_prompt], "max_tokens": MAX_NEW_TOKENS}
    result, _ = run_engine(job, tmp_path_factory.mktemp("server_target_only"))
    return result["token_ids"][0]


def test_completions_match_target_only(server, tiny_pair, server_prompt, target_only_ids):
    base, _ = server
    response = requests.post(f"{base}/v1/completions", timeout=120, json={
        "model": tiny_pair.target, "prompt": server_prompt, "max_tokens": MAX_NEW_TOKENS,
        "temperature": 0.0, "ignore_eos": True, "return_token_ids": True,
    })
    assert response.status_code == 200, response.text
    [choice] = response.json()["choices"]
    assert choice["token_ids"] == target_only_ids
    assert response.json()["usage"]["completion_tokens"] == MAX_NEW_TOKENS


def test_tree_mode_refuses_penalties_with_http_400(server, tiny_pair, server_prompt):
    base, _ = server
    response = requests.post(f"{base}/v1/completions", timeout=120, json={
        "model": tiny_pair.target, "prompt": server_prompt, "max_tokens": 4,
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
