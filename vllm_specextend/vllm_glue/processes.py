"""Engine-core and worker processes: pick up the settings sent with the
VllmConfig, log them once, and keep them where later hooks find them."""

from __future__ import annotations

import functools

from vllm_specextend.vllm_glue.engine_config import log_settings
from vllm_specextend.vllm_glue.patching import replace_on_instance
from vllm_specextend.vllm_glue.sampling import ACTIVE


def wrap_init_with_settings(where: str):
    """Wrap an `__init__(self, vllm_config, ...)` to attach our settings.

    The engine core loads plugins inside `EngineCore.__init__`, so the first
    hook there is the scheduler it builds next."""

    def wrap(original):
        @functools.wraps(original)
        def __init__(self, *args, **kwargs):
            vllm_config = kwargs.get("vllm_config") or args[0]
            settings = log_settings(where, vllm_config)
            if where == "worker" and settings is not None and settings.verifies_with_hta:
                # Before the model builds its attention layers.
                from vllm_specextend.vllm_glue.tree_attention_backend import (
                    register_hybrid_tree_backend,
                )

                register_hybrid_tree_backend()
            if where == "worker" and settings is not None:
                ACTIVE["worker"] = True
            original(self, *args, **kwargs)
            self.specextend_config = settings
            if self.specextend_config is not None and hasattr(self, "drafter"):
                # SpecExtend's drafting reads the batch from the runner.
                replace_on_instance(self.drafter, "specextend_runner", self,
                                    "the proposer's way back to its model runner", adding=True)

        return __init__

    return wrap
