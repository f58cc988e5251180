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
    from vllm_specextend.vllm_glue import PATCHES
    from vllm_specextend.vllm_glue.patching import applied_patches, apply_patches

    load_general_plugins()
    patched = EngineArgs.create_engine_config
    register()
    apply_patches(PATCHES)
    assert EngineArgs.create_engine_config is patched
    assert getattr(patched, "__specextend_patch__", False)
    # The wrapper wraps vLLM's own function, not an earlier wrapper.
    assert not getattr(patched.__wrapped__, "__specextend_patch__", False)
    assert len(applied_patches()) == len(PATCHES)
