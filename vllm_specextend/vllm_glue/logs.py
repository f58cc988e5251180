"""The plugin's logger, under vLLM's (same handler and format), and a
log-once for "the first time X happened" lines: vLLM's `info_once` keys on
the arguments too, and ours carry counts that differ each time."""

from __future__ import annotations

import logging

logger = logging.getLogger("vllm.specextend")
_logged_first: set[str] = set()


def info_first(msg: str, *args) -> None:
    """Log `msg` the first time this process reaches it, whatever `args`."""
    if msg not in _logged_first:
        _logged_first.add(msg)
        logger.info(msg, *args, stacklevel=2)
