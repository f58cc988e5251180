"""scripts/compare_vllm_sources.py against the installed vLLM: itself
compares clean; a changed patch-target signature, a changed signature of
a method SpecExtend's proposer overrides, a vanished imported name and a
vanished attribute are reported."""

import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
import compare_vllm_sources  # noqa: E402

INSTALLED = Path(importlib.util.find_spec("vllm").origin).parents[1]
RUNNER = "vllm/v1/worker/gpu_model_runner.py"
UTILS = "vllm/v1/utils.py"
PROPOSER = "vllm/v1/spec_decode/llm_base_proposer.py"


def test_the_installed_vllm_against_itself_and_an_edited_copy(capsys):
    installed = compare_vllm_sources.Sources(INSTALLED)
    assert compare_vllm_sources.compare(installed, installed, show_changed=False) == []

    edited = compare_vllm_sources.Sources(INSTALLED)
    edits = {
        RUNNER: edited.read(RUNNER).replace("def take_draft_token_ids(self)",
                                            "def take_draft_token_ids(self, scheduler_output)"),
        UTILS: edited.read(UTILS).replace("class CpuGpuBuffer", "class PinnedBuffer"),
        # A method SpecExtend's proposer overrides, and an attribute it reads.
        PROPOSER: edited.read(PROPOSER).replace(
            "common_attn_metadata: CommonAttentionMetadata, draft_index: int = 0",
            "common_attn_metadata: CommonAttentionMetadata, draft_index: int = 0, group=None",
        ).replace("net_num_new_slots_per_request", "new_slots_per_request"),
    }
    assert all(edits[name] != edited.read(name) for name in edits)
    original_read = edited.read
    edited.read = lambda name: edits.get(name) or original_read(name)
    problems = compare_vllm_sources.compare(installed, edited, show_changed=False)
    assert problems == [
        "vllm.v1.worker.gpu_model_runner:GPUModelRunner.take_draft_token_ids",
        "vllm.v1.spec_decode.llm_base_proposer:"
        "SpecDecodeBaseProposer.build_per_group_and_layer_attn_metadata",
        "vllm.v1.utils.CpuGpuBuffer", "proposer.net_num_new_slots_per_request"]
    assert "SIGNATURE" in capsys.readouterr().out
