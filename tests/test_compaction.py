"""After tree acceptance, the accepted path's K/V end up where a chain of
the same tokens would have been written; other slots are untouched."""

import torch

from kernel_inputs import random_block_table
from vllm_specextend.tree.compaction import apply_moves, compaction_moves


def test_accepted_path_lands_at_chain_slots():
    block_size = 4
    prefix_lens = torch.tensor([5, 0, 9])
    nodes = 7
    table, num_blocks = random_block_table([p + nodes for p in prefix_lens.tolist()],
                                           block_size, seed=3)
    # Accepted local nodes: a deep path, nothing, the first nodes in order.
    accepted = torch.tensor([[1, 3, 6], [-1, -1, -1], [0, 1, -1]])
    num_accepted = torch.tensor([3, 0, 2])
    cache = torch.randn(num_blocks * block_size, 2, 3)
    before = cache.clone()

    def slot(row, position):
        return int(table[row, position // block_size]) * block_size + position % block_size

    source, destination = compaction_moves(accepted, num_accepted, prefix_lens, table, block_size)
    apply_moves(cache, source, destination)
    moved = set()
    for row in range(3):
        for step in range(int(num_accepted[row])):
            target = slot(row, int(prefix_lens[row]) + step)
            node_slot = slot(row, int(prefix_lens[row]) + int(accepted[row, step]))
            assert torch.equal(cache[target], before[node_slot])
            moved.add(target)
    assert len(source) == 3  # row 0 moves 1->0, 3->1, 6->2; row 2 is in place
    untouched = [s for s in range(cache.shape[0]) if s not in moved]
    assert torch.equal(cache[untouched], before[untouched])
