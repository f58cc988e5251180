"""The plugin is found by vLLM's entry-point group and loading it twice in
one process changes nothing."""

from importlib.metadata import entry_points


def test_entry_point_registered():
    [plugin] = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "specextend"]
    assert plugin.value == "vllm_specextend.plugin:register"


def test_loading_twice_is_harmless():
    from vllm.engine.arg_utils import EngineArgs
    from vllm.plugins import load_general_plugins

    from vllm_specextend.plugin import register
    from vllm_specextend.vllm_glue.registry import PATCHES
    from vllm_specextend.vllm_glue.patching import applied_patches, apply_patches

    load_general_plugins()
    patched = EngineArgs.create_engine_config
    register()
    apply_patches(PATCHES)
    assert EngineArgs.create_engine_config is patched
    assert getattr(patched, "__specextend_patch__", False)
    # The wrapper wraps vLLM's own function, not an earlier wrapper.
    assert not getattr(patched.__wrapped__, "__specextend_patch__", False)
    # Each once; those waiting for a runner serving SpecExtend may have
    # been applied by an earlier engine of this process.
    applied = applied_patches()
    assert len(applied) == len(set(applied))
    assert {f"{p.module}.{p.qualname}" for p in PATCHES if not p.on_serving} <= set(applied)


ISOLATION = """
import json, sys
import vllm
{setup}
from vllm_specextend.plugin import register
register()
from vllm.engine.arg_utils import EngineArgs
from vllm_specextend.vllm_glue.patching import applied_patches
target, draft = sys.argv[1], sys.argv[2]
stock = EngineArgs(model=target, dtype="float32", max_model_len=512).create_engine_config()
try:
    EngineArgs(model=target, dtype="float32", max_model_len=512, speculative_config={
        "method": "specextend", "model": draft, "num_speculative_tokens": 2,
    }).create_engine_config()
    refusal = None
except Exception as error:
    refusal = f"{type(error).__name__}: {error}"
print("RESULT " + json.dumps({"patches": applied_patches(), "refusal": refusal,
                              "stock_model": stock.model_config.model}))
"""


def isolated(setup: str, tiny_pair):
    import json
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", ISOLATION.replace("{setup}", setup), tiny_pair.target,
                          tiny_pair.draft], capture_output=True, text=True, timeout=300)
    [line] = [l for l in run.stdout.splitlines() if l.startswith("RESULT ")]
    return json.loads(line[len("RESULT "):]), run.stderr


def test_another_vllm_version_is_left_alone(tiny_pair):
    result, log = isolated("vllm.__version__ = '0.99.0'", tiny_pair)
    assert log.count("vllm-specextend changes nothing in this process") == 1
    assert result["patches"] == ["vllm.engine.arg_utils.EngineArgs.create_engine_config"]
    assert result["stock_model"] == tiny_pair.target  # runs without specextend work
    assert "SpecExtendConfigError" in result["refusal"]
    assert ("vLLM 0.99.0 is installed; vllm-specextend supports vLLM 0.32.0 and 0.33.0"
            in result["refusal"])


def test_glue_that_cannot_import_is_refused_not_crashed(tiny_pair):
    """A vLLM whose internals our glue cannot import (here: a function the
    drafting glue imports is gone): loading the plugin must not fail the
    process; stock engines run, specextend is refused naming the import."""
    result, log = isolated("import vllm.forward_context\n"
                           "del vllm.forward_context.set_forward_context", tiny_pair)
    assert log.count("vllm-specextend changes nothing in this process") == 1
    assert result["patches"] == ["vllm.engine.arg_utils.EngineArgs.create_engine_config"]
    assert result["stock_model"] == tiny_pair.target
    assert "glue cannot import on this vLLM 0.32.0" in result["refusal"]
    assert "set_forward_context" in result["refusal"]


def test_a_missing_patch_target_is_named_and_nothing_patched(tiny_pair):
    setup = ("from vllm.v1.worker.gpu_model_runner import GPUModelRunner\n"
             "del GPUModelRunner.take_draft_token_ids")
    result, log = isolated(setup, tiny_pair)
    assert "GPUModelRunner.take_draft_token_ids" in log
    assert len(result["patches"]) == 1
    assert "lacks what vllm-specextend patches" in result["refusal"]
