"""The process's heap as glibc sees it, beside RSS: the soak checks tell
memory the plugin holds from memory the allocator keeps."""

from __future__ import annotations

import ctypes


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def malloc_totals() -> dict:
    """glibc's heap, all arenas: bytes in use (tensors, Python objects, ...)
    and bytes freed but kept by the allocator, which RSS counts alike; {}
    where glibc's mallinfo2 is missing."""
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return {}
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return {"malloc_in_use_bytes": info.uordblks + info.hblkhd,
            "malloc_free_held_bytes": info.fordblks}
