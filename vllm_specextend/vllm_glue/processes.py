"""Worker processes: pick up the settings sent with the VllmConfig, log them
once, and keep them where later hooks find them."""

from __future__ import annotations

import functools

from vllm_specextend.vllm_glue.engine_config import log_settings
from vllm_specextend.vllm_glue.patching import replace_on_instance
from vllm_specextend.vllm_glue.sampling import ACTIVE


def wrap_runner_init(original):
    """Wrap `GPUModelRunner.__init__` (the CPU runner's too): a runner that
    serves SpecExtend gets its settings, the rest nothing."""

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        vllm_config = kwargs.get("vllm_config") or args[0]
        settings = log_settings("worker", vllm_config)
        if settings is None:
            return original(self, *args, **kwargs)
        ACTIVE["worker"] = True
        if settings.verifies_with_hta:
            # Before the model builds its attention layers.
            from vllm_specextend.vllm_glue.tree_attention_backend import (
                register_hybrid_tree_backend,
            )

            register_hybrid_tree_backend()
        original(self, *args, **kwargs)
        replace_on_instance(self, "specextend_config", settings,
                            "the SpecExtend settings of this runner", adding=True)
        if hasattr(self, "drafter"):
            # SpecExtend's drafting reads the batch from the runner.
            replace_on_instance(self.drafter, "specextend_runner", self,
                                "the proposer's way back to its model runner", adding=True)

    return __init__
