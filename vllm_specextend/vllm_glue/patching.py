"""One visible registry of every change vllm-specextend makes to vLLM.

Each patch names its target (module, class, attribute) and its replacement.
Applying is idempotent per process, refuses to patch one attribute twice, and
logs each replacement once, so a vLLM upgrade shows its breakage here.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any, Callable

logger = logging.getLogger("vllm.specextend")  # under vLLM's logger: same handler and format


@dataclass(frozen=True)
class Patch:
    module: str
    qualname: str  # "Class.attribute"
    # Takes the original attribute, returns the replacement.
    make_replacement: Callable[[Any], Any]
    why: str


# (module, qualname) -> original attribute, for every patch applied here.
_applied: dict[tuple[str, str], Any] = {}


def apply_patches(patches: list[Patch]) -> None:
    for patch in patches:
        key = (patch.module, patch.qualname)
        if key in _applied:
            continue
        owner_name, attribute = patch.qualname.rsplit(".", 1)
        owner = importlib.import_module(patch.module)
        for part in owner_name.split("."):
            owner = getattr(owner, part)
        original = owner.__dict__.get(attribute)
        if original is None:
            raise RuntimeError(
                f"vllm-specextend cannot patch {patch.module}.{patch.qualname}: "
                f"it does not exist in this vLLM version"
            )
        if getattr(original, "__specextend_patch__", False):
            raise RuntimeError(f"{patch.module}.{patch.qualname} is patched twice")
        replacement = patch.make_replacement(original)
        replacement.__specextend_patch__ = True
        setattr(owner, attribute, replacement)
        _applied[key] = original
        logger.debug("patched %s.%s: %s", patch.module, patch.qualname, patch.why)


def applied_patches() -> list[str]:
    return [f"{module}.{qualname}" for module, qualname in _applied]


def original_of(module: str, qualname: str) -> Any:
    return _applied[(module, qualname)]
