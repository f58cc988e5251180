import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

# This CPU has no Triton backend: the kernel tests run their Triton kernels
# interpreted, in this process only (set before any kernel module is
# imported; engine subprocesses are started without it).
os.environ["TRITON_INTERPRET"] = "1"

import pytest

from vllm_specextend.models.tiny import DRAFT_MAX_POSITIONS, build_tiny_pair

TESTS_DIR = Path(__file__).parent
# Prompt lengths for lossless checks: short ones and ones longer than the
# draft's max_position_embeddings (2,048).
MIXED_PROMPT_LENGTHS = (100, 700, 1500, 2500, 3000)
assert max(MIXED_PROMPT_LENGTHS) > DRAFT_MAX_POSITIONS
ENGINE_TIMEOUT_S = 900


@pytest.fixture(scope="session")
def tiny_pair():
    return build_tiny_pair()


@pytest.fixture(scope="session")
def short_window_self_draft(tiny_pair, tmp_path_factory):
    """A draft with the target's own weights and the draft's 2,048 positions."""
    folder = tmp_path_factory.mktemp("self_draft")
    shutil.copytree(tiny_pair.target, folder, dirs_exist_ok=True)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = DRAFT_MAX_POSITIONS
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.fixture(scope="session")
def mixed_prompts():
    rng = random.Random(0)
    # Byte tokens of the tiny tokenizer are ids 3..258.
    return [[rng.randrange(3, 259) for _ in range(n)] for n in MIXED_PROMPT_LENGTHS]


def without_triton_interpreter(environment) -> dict:
    return {key: value for key, value in environment.items() if key != "TRITON_INTERPRET"}


def run_engine(job: dict, tmp_path: Path, env: dict | None = None) -> tuple[dict, str]:
    """Run tests/engine_job.py on `job` in a fresh process (with `env` added
    to its environment); return its result and its combined log."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    job_path, result_path = tmp_path / "job.json", tmp_path / "result.json"
    job_path.write_text(json.dumps(job))
    env = {**without_triton_interpreter(os.environ), "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
           **(env or {})}
    proc = subprocess.run(
        [sys.executable, str(TESTS_DIR / "engine_job.py"), str(job_path), str(result_path)],
        capture_output=True,
        text=True,
        timeout=ENGINE_TIMEOUT_S,
        env=env,
    )
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise AssertionError(f"engine job failed (exit {proc.returncode}):\n{log[-6000:]}")
    return json.loads(result_path.read_text()), log
