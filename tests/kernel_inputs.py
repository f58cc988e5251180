"""Random paged-KV inputs shared by the kernel tests."""

import torch


def random_block_table(context_lens, block_size, num_spare_blocks=3, seed=0):
    """A shuffled block table: requests own scattered, disjoint blocks."""
    generator = torch.Generator().manual_seed(seed)
    blocks_per_row = [-(-int(n) // block_size) for n in context_lens]
    max_blocks = max(blocks_per_row)
    num_blocks = sum(blocks_per_row) + num_spare_blocks
    order = torch.randperm(num_blocks, generator=generator)
    table = torch.zeros((len(context_lens), max_blocks), dtype=torch.int32)
    used = 0
    for row, count in enumerate(blocks_per_row):
        table[row, :count] = order[used : used + count]
        used += count
    return table, num_blocks
