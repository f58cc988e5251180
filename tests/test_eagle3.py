"""EAGLE-3 heads with Cross-model Retrieval (`draft_method: eagle3`), on a
tiny Llama target and a tiny Qwen2-shaped one, with random-weight heads
built here (vLLM's weight names, a 2,048-position window): greedy output
equals the target's alone on a batch whose prompts go past the head's
window, working caches are filled and read by vLLM's kernel, no draft
attention spans the head's window, and bad heads or targets fail at
start-up with the field named."""

import pytest

from conftest import MIXED_PROMPT_LENGTHS, run_engine
from vllm_specextend import SpecExtendConfigError
from vllm_specextend.models.eagle3 import (build_random_eagle3_head,
                                           save_in_speculators_format)
from vllm_specextend.models.tiny import build_tiny_qwen2_target, build_tiny_target

HEAD_WINDOW = 2048
MAX_NEW_TOKENS = 24
SMALL_BUDGET = {"chunk_size": 32, "top_k_chunks": 4, "recent_tokens": 64, "refresh_every": 2}


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def target_and_head(request, tiny_pair, tmp_path_factory):
    target = tiny_pair.target if request.param == "llama" else build_tiny_qwen2_target()
    head = build_random_eagle3_head(target, tmp_path_factory.mktemp(f"{request.param}_head"),
                                    HEAD_WINDOW)
    return request.param, target, head


@pytest.fixture(scope="module")
def runs(target_and_head, mixed_prompts, tmp_path_factory):
    family, target, head = target_and_head
    job = {"model": target, "prompts": mixed_prompts, "max_tokens": MAX_NEW_TOKENS}
    target_only, _ = run_engine(job, tmp_path_factory.mktemp(f"{family}_target_only"))
    job.update(record_attention_spans=True, speculative_config={
        "method": "specextend", "model": head, "draft_method": "eagle3",
        "num_speculative_tokens": 4, **SMALL_BUDGET})
    specextend, log = run_engine(job, tmp_path_factory.mktemp(f"{family}_specextend"))
    return target_only, specextend, log


def test_greedy_ids_equal_target_only(runs):
    target_only, specextend, _ = runs
    for length, expected, got in zip(MIXED_PROMPT_LENGTHS, target_only["token_ids"],
                                     specextend["token_ids"]):
        assert got == expected, f"prompt of {length} tokens diverged"
    assert specextend["spec_decode"]["vllm:spec_decode_num_drafts"] > 0


def test_the_head_drafts_over_working_caches(runs):
    _, specextend, log = runs
    assert "chain drafts from an eagle3 head" in log
    assert "first working caches filled" in log
    assert specextend["attention_spans"]["working_cache_calls"] > 0


def test_no_draft_attention_spans_the_heads_window(runs):
    """vLLM raises the head's positions to the target's length in memory;
    every draft attention call still spans at most the window it ships."""
    spans = runs[1]["attention_spans"]
    assert spans["draft_windows"] == [HEAD_WINDOW]  # rows on vLLM's cache
    assert 0 < spans["longest_working_cache"] <= HEAD_WINDOW
    assert spans["windowless_calls"] > 0  # the target's own attention
    # Chunks are whole blocks (gcd(128, chunk_size 32)), in the worker too.
    assert spans["vllm_cache_block_sizes"] == [32]


def test_detected_from_the_heads_architecture(tiny_pair, llama_head, mixed_prompts, tmp_path):
    job = {"model": tiny_pair.target, "prompts": mixed_prompts[:1], "max_tokens": 4,
           "speculative_config": {"method": "specextend", "model": llama_head,
                                  "num_speculative_tokens": 2}}
    _, log = run_engine(job, tmp_path)
    assert "chain drafts from an eagle3 head" in log


def start(target, head, **settings):
    from vllm import LLM

    return LLM(model=target, max_model_len=4096, dtype="float32", gpu_memory_utilization=0.1,
               enforce_eager=True, speculative_config={
                   "method": "specextend", "model": head, "draft_method": "eagle3",
                   "num_speculative_tokens": 4, **settings})


@pytest.fixture(scope="module")
def llama_head(tiny_pair, tmp_path_factory):
    return build_random_eagle3_head(tiny_pair.target, tmp_path_factory.mktemp("head"),
                                    HEAD_WINDOW)


def test_head_for_another_hidden_size(tiny_pair, llama_head, tmp_path):
    import json
    import shutil

    other = tmp_path / "wide_head"
    shutil.copytree(llama_head, other)
    config = json.loads((other / "config.json").read_text())
    config["target_hidden_size"] = 256
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(SpecExtendConfigError,
                       match=r"speculative_config\.model: .*width 256.*hidden size is 128"):
        start(tiny_pair.target, str(other))


def test_budget_past_the_heads_window(tiny_pair, llama_head):
    with pytest.raises(SpecExtendConfigError,
                       match=r"speculative_config\.top_k_chunks: .*exceeds draft_window=2048"):
        start(tiny_pair.target, llama_head, top_k_chunks=64)


def test_trees_need_a_draft_model(tiny_pair, llama_head):
    with pytest.raises(SpecExtendConfigError,
                       match=r"speculative_config\.tree=true: .*draft_method=eagle3"):
        start(tiny_pair.target, llama_head, tree=True, tree_nodes=4,
              num_speculative_tokens=None)


def test_target_without_auxiliary_hidden_states(tiny_pair, llama_head, tmp_path):
    """A GPT-2 target: vLLM gives EAGLE-3 heads nothing to read from it."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=384, n_positions=4096, n_embd=128, n_layer=2,
                               n_head=4)).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_pair.target).save_pretrained(tmp_path)
    with pytest.raises(SpecExtendConfigError,
                       match=r"draft_method=eagle3: the target's architecture "
                             r"GPT2LMHeadModel gives no auxiliary hidden states"):
        start(str(tmp_path), llama_head)


def without_eagle_config(head: str, folder) -> str:
    """The head as a config.json without `eagle_config` ships it (vLLM then
    picks the target layers it reads)."""
    import json
    import shutil

    shutil.copytree(head, folder)
    config = json.loads((folder / "config.json").read_text())
    del config["eagle_config"]
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def test_head_without_eagle_config_serves(mixed_prompts, tmp_path):
    """On an 8-layer target vLLM's default layers (2, 4, 5) serve the head:
    greedy output equal to the target's alone, drafts proposed."""
    target = build_tiny_target(8)
    head = without_eagle_config(build_random_eagle3_head(target, tmp_path / "head",
                                                         HEAD_WINDOW), tmp_path / "bare")
    serves_as_the_target_alone(
        {"model": target, "prompts": mixed_prompts[:2], "max_tokens": 8},
        {"speculative_config": {"method": "specextend", "model": head,
                                "num_speculative_tokens": 3}}, tmp_path)


def serves_as_the_target_alone(job: dict, specextend: dict, tmp_path) -> str:
    """`job` target-only and with `specextend` (job fields) over it: greedy
    ids equal, drafts proposed by the head; the second engine's log."""
    target_only, _ = run_engine(job, tmp_path / "target_only")
    result, log = run_engine({**job, **specextend}, tmp_path / "specextend")
    assert result["token_ids"] == target_only["token_ids"]
    assert result["spec_decode"]["vllm:spec_decode_num_drafts"] > 0
    assert "chain drafts from an eagle3 head" in log
    return log


def test_head_without_eagle_config_on_a_shallow_target_is_refused(tiny_pair, llama_head,
                                                                 tmp_path):
    """vLLM's default for the 4-layer target, (2, 2, 1), is two layers: stock
    eagle3 fails at the first decoding step; SpecExtend refuses at start-up."""
    head = without_eagle_config(llama_head, tmp_path / "bare")
    with pytest.raises(SpecExtendConfigError,
                       match=r"speculative_config\.model: .*eagle_aux_hidden_state_layer_ids"
                             r".*4-layer target, \(2, 2, 1\), is 2 distinct layers"):
        start(tiny_pair.target, head)


@pytest.fixture(scope="module")
def speculators_head(tiny_pair, llama_head, tmp_path_factory):
    return save_in_speculators_format(llama_head, tmp_path_factory.mktemp("speculators"),
                                      verifier=tiny_pair.target)


@pytest.mark.parametrize("served", [False, True], ids=["as_draft", "as_model"])
def test_speculators_head_serves(tiny_pair, speculators_head, mixed_prompts, served,
                                 tmp_path):
    """A head in the speculators format, named as the draft or served as the
    model (vLLM then serves its verifier): greedy output equal to the
    target's alone, working caches filled at the window in its layer config."""
    job = {"model": tiny_pair.target, "max_tokens": 8,
           "prompts": [mixed_prompts[0], mixed_prompts[3]]}  # 100 and 2,500 tokens
    head_served = {"model": speculators_head, "speculative_config": {"method": "specextend"}}
    head_as_draft = {"speculative_config": {"method": "specextend", "model": speculators_head,
                                            "num_speculative_tokens": 3}}
    log = serves_as_the_target_alone(job, head_served if served else head_as_draft, tmp_path)
    assert f"resolved: draft_window={HEAD_WINDOW}" in log
    assert "first working caches filled" in log


def test_speculators_checkpoint_of_another_kind_is_refused(tiny_pair, speculators_head,
                                                           tmp_path):
    import json
    import shutil

    other = tmp_path / "dflash"
    shutil.copytree(speculators_head, other)
    config = json.loads((other / "config.json").read_text())
    config["speculators_model_type"] = "dflash"
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(SpecExtendConfigError,
                       match=r"speculative_config\.model: .* speculators-format 'dflash'"):
        start(tiny_pair.target, str(other))


def test_served_speculators_head_with_another_draft_method(speculators_head):
    from vllm import LLM

    with pytest.raises(SpecExtendConfigError,
                       match=r"speculative_config\.draft_method=draft_model: .*"
                             r"speculators-format eagle3 head"):
        LLM(model=speculators_head, max_model_len=4096, gpu_memory_utilization=0.1,
            speculative_config={"method": "specextend", "draft_method": "draft_model"})
