"""Tile products shared by the Triton kernels."""

from __future__ import annotations

import os

import triton
import triton.language as tl


def interpreted() -> bool:
    """Under TRITON_INTERPRET=1 (CPU tests) tiles multiply in numpy, which
    has no bfloat16: there, half-precision tiles multiply in float32."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def tile_dot(a, b, IN_FLOAT32: tl.constexpr):
    """a @ b with float32 accumulation, in b's dtype on tensor cores;
    float32 tiles (and every tile when IN_FLOAT32) multiply exactly."""
    if IN_FLOAT32 or b.dtype == tl.float32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a.to(b.dtype), b)
