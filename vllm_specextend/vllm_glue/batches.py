"""vLLM's attention metadata of some rows of a batch, and host arrays staged
to the device, for SpecExtend's own forwards (drafting rounds over working
caches, the draft's catch-up)."""

from __future__ import annotations

import numpy as np
import torch
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.utils import CpuGpuBuffer

from vllm_specextend.retrieval.draft_rows import query_starts
from vllm_specextend.retrieval.working_caches import STAGED_ARRAYS


def sub_batch_metadata(query_lens: np.ndarray, query_start_loc: torch.Tensor,
                       seq_lens: torch.Tensor, block_table: torch.Tensor,
                       slot_mapping: torch.Tensor, max_seq_len: int) -> CommonAttentionMetadata:
    """vLLM's metadata for some rows of a batch, each with its own query."""
    starts = query_starts(query_lens).astype(np.int32)
    return CommonAttentionMetadata(
        query_start_loc=query_start_loc.to(torch.int32),
        query_start_loc_cpu=torch.from_numpy(starts), seq_lens=seq_lens.to(torch.int32),
        num_reqs=len(query_lens), num_actual_tokens=int(starts[-1]),
        max_query_len=int(query_lens.max()), max_seq_len=max_seq_len,
        block_table_tensor=block_table, slot_mapping=slot_mapping, causal=True)


class HostStaging:
    """Host arrays to the device through buffers allocated up front (vLLM's
    CpuGpuBuffer: pinned host memory, asynchronous copies): no host sync."""

    def __init__(self, max_tokens: int, device: torch.device,
                 names: tuple[str, ...] = STAGED_ARRAYS):
        self.buffers = {name: CpuGpuBuffer(max_tokens + 1, dtype=torch.int64, device=device,
                                           with_numpy=True)
                        for name in names}

    def to_device(self, name: str, values: np.ndarray) -> torch.Tensor:
        buffer = self.buffers[name]
        buffer.np[: len(values)] = values
        return buffer.copy_to_gpu(len(values))
