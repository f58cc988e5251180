"""Cross-model Retrieval's target side without an engine: the captured
final-layer query of the last accepted token scores the chunks of the
target's paged cache, read through a reader, and the top chunks and the
recent window make the working-cache layout."""

from types import SimpleNamespace

import torch

from kernel_inputs import random_block_table
from vllm_specextend.config import SpecExtendConfig
from vllm_specextend.retrieval.cross_model_retrieval import (
    CrossModelRetrieval,
    FinalLayerCapture,
)

BLOCK_SIZE, HEADS, DIM, CONTEXT = 16, 2, 8, 512


class DenseKeyReader:
    """Keys of a [slots, heads, dim] cache (the packed CPU reader's role)."""

    def read_keys(self, cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        return cache[slots]


def retrieval_over_planted_chunks(selection: str, planted: list[int]):
    settings = SpecExtendConfig(chunk_size=16, recent_tokens=32, refresh_every=1,
                                top_k_chunks=len(planted), selection=selection)
    geometry = settings.geometry(draft_max_positions=256, num_speculative_tokens=2)
    torch.manual_seed(0)
    query = torch.randn(HEADS, DIM)
    block_table, num_blocks = random_block_table([CONTEXT], BLOCK_SIZE)
    keys = torch.randn(CONTEXT, HEADS, DIM) * 0.1
    for chunk in planted:  # these chunks answer the query
        keys[chunk * 16: (chunk + 1) * 16] = query * 3
    cache = torch.zeros(num_blocks * BLOCK_SIZE, HEADS, DIM)
    positions = torch.arange(CONTEXT)
    cache[block_table[0, positions // BLOCK_SIZE].long() * BLOCK_SIZE
          + positions % BLOCK_SIZE] = keys
    capture = FinalLayerCapture(None, 8, HEADS, DIM, torch.float32, torch.device("cpu"))
    capture.queries[3] = query  # the last accepted token's, at token index 3
    agreed = []

    def agree_on_scores(scores):
        agreed.append(scores.shape)
        return scores

    layer = SimpleNamespace(kv_cache=cache, impl=SimpleNamespace(scale=DIM ** -0.5))
    retrieval = CrossModelRetrieval(settings, geometry, capture, layer, DenseKeyReader(),
                                    BLOCK_SIZE, agree_on_scores)
    layout = retrieval.layout(torch.tensor([3]), torch.tensor([CONTEXT]),
                              torch.tensor([CONTEXT]), block_table, CONTEXT)
    return layout, geometry, agreed


def test_the_target_query_keeps_the_chunks_that_answer_it():
    layout, geometry, agreed = retrieval_over_planted_chunks("cmr", [5, 20])
    kept = layout.source_positions[0, :32].tolist()
    assert kept == list(range(80, 96)) + list(range(320, 336))
    # Then the recent window, from a chunk boundary, through the last token.
    window = layout.source_positions[0, 32: int(layout.lengths[0])].tolist()
    assert window == list(range(CONTEXT - 32, CONTEXT))
    assert layout.offsets.tolist() == [CONTEXT - 32 - 32]
    assert agreed == [(1, CONTEXT // 16)]  # every rank's scores, before selection
    assert geometry.capacity >= int(layout.lengths[0])


def test_recency_keeps_the_sink_and_the_newest_chunks_whatever_the_query():
    layout, _, agreed = retrieval_over_planted_chunks("recency", [5, 20])
    kept = layout.source_positions[0, :32].tolist()
    window_start = CONTEXT - 32
    assert kept == list(range(16)) + list(range(window_start - 16, window_start))
    assert agreed == []  # nothing scored
