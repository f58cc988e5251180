"""One visible registry of every change vllm-specextend makes to vLLM.

Class patches name their target (module, class, attribute) and their
replacement; applying them is idempotent per process, refuses to patch one
attribute twice, and logs each replacement once, so a vLLM upgrade shows its
breakage here. A patch of a function vLLM calls without a runner at hand
(its samplers' helpers) can wait for a runner of the process to serve
SpecExtend (`on_serving`): until then, and in processes that never serve
it, vLLM runs unchanged, with no flag to ask. Changes to objects vLLM
builds (a layer's attention, its rotary table) go through
`replace_on_instance`, which records them here too: `applied_patches()`
lists both.
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
    qualname: str  # "Class.attribute", or "function" of the module
    # Takes the original attribute (None when adding), returns the replacement.
    make_replacement: Callable[[Any], Any]
    why: str
    adds: bool = False  # a new attribute, which this vLLM must not have yet
    on_serving: bool = False  # applied once a runner of the process serves SpecExtend


# (module, qualname) -> original attribute, for every patch applied here.
_applied: dict[tuple[str, str], Any] = {}
# Patches waiting for a runner of this process to serve SpecExtend.
_on_serving: list[Patch] = []
# (class qualname, attribute) -> (why, instances changed), in this process.
_instance_changes: dict[tuple[str, str], tuple[str, int]] = {}


def _owner(patch: Patch):
    """The object holding the patched attribute, or None if it is missing."""
    try:
        owner = importlib.import_module(patch.module)
    except ImportError:
        return None
    for part in patch.qualname.split(".")[:-1]:
        owner = getattr(owner, part, None)
        if owner is None:
            return None
    return owner


def missing(patches: list[Patch]) -> list[str]:
    """The patch targets this vLLM does not have (or has, for an addition)."""
    return [f"{patch.module}.{patch.qualname}" for patch in patches
            if _owner(patch) is None
            or (patch.qualname.split(".")[-1] in vars(_owner(patch))) == patch.adds]


def apply_patches(patches: list[Patch]) -> None:
    """Apply `patches`, but keep those `on_serving` for `serving_started`."""
    _on_serving.extend(patch for patch in patches
                       if patch.on_serving and patch not in _on_serving)
    _apply([patch for patch in patches if not patch.on_serving])


def serving_started() -> None:
    """A runner of this process serves SpecExtend: apply what waited for it."""
    _apply(_on_serving)


def _apply(patches: list[Patch]) -> None:
    for patch in patches:
        key = (patch.module, patch.qualname)
        if key in _applied:
            continue
        owner, attribute = _owner(patch), patch.qualname.split(".")[-1]
        original = vars(owner).get(attribute) if owner is not None else None
        if owner is None or (original is None) != patch.adds:
            raise RuntimeError(
                f"vllm-specextend cannot patch {patch.module}.{patch.qualname}: "
                f"it {'exists' if patch.adds else 'does not exist'} in this vLLM version"
            )
        if getattr(original, "__specextend_patch__", False):
            raise RuntimeError(f"{patch.module}.{patch.qualname} is patched twice")
        replacement = patch.make_replacement(original)
        replacement.__specextend_patch__ = True
        setattr(owner, attribute, replacement)
        _applied[key] = original
        logger.debug("patched %s.%s: %s", patch.module, patch.qualname, patch.why)


def replace_on_instance(obj: Any, attribute: str, value: Any, why: str,
                        adding: bool = False) -> None:
    """Set an attribute of one object vLLM built (a new one with `adding`),
    and record it."""
    if not adding and not hasattr(obj, attribute):
        raise RuntimeError(f"vllm-specextend cannot replace {type(obj).__qualname__}."
                           f"{attribute}: it does not exist in this vLLM version")
    setattr(obj, attribute, value)
    key = (type(obj).__qualname__, attribute)
    _, count = _instance_changes.get(key, (why, 0))
    if count == 0:
        logger.debug("replacing %s.%s on instances: %s", *key, why)
    _instance_changes[key] = (why, count + 1)


def applied_patches() -> list[str]:
    """Every class patch applied in this process, then every kind of
    instance change with how many objects it touched."""
    return [f"{module}.{qualname}" for module, qualname in _applied] + [
        f"{owner}.{attribute} on {count} instance(s): {why}"
        for (owner, attribute), (why, count) in _instance_changes.items()]

