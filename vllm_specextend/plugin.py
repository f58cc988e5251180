"""vLLM general-plugin entry point, run once in every vLLM process."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("vllm.specextend")  # under vLLM's logger: same handler and format
_registered = False


def register() -> None:
    """Apply our patches to vLLM. Calling it again in a process is harmless."""
    global _registered
    if _registered:
        return
    from vllm_specextend.vllm_glue import PATCHES
    from vllm_specextend.vllm_glue.patching import applied_patches, apply_patches

    apply_patches(PATCHES)
    _registered = True
    logger.info(
        "vllm-specextend plugin loaded in pid %d (%d patches)",
        os.getpid(),
        len(applied_patches()),
    )
