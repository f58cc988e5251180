"""Sizes the kernels are built for (no dependencies: the kernels import
with torch and Triton alone, as on a GPU machine without vLLM)."""

# Ancestor masks are one int64 per node, the root included.
MAX_TREE_TOKENS = 64
MAX_TREE_NODES = MAX_TREE_TOKENS - 1
# The draft tree kernel reads a path in one block of 32 keys.
MAX_TREE_DEPTH = 32
