"""The chunker packs exactly chunk_size tokens, spans and resumes prompts, pads only the last chunk."""

from dataclasses import dataclass

import pytest

from tetriinfer.sched.chunker import next_chunk


@dataclass
class Pending:
    request_id: int
    prompt_len: int
    num_prefilled: int = 0


def drain(queue, chunk_size, pad=True):
    chunks = []
    while any(r.num_prefilled < r.prompt_len for r in queue):
        chunk = next_chunk(queue, chunk_size, pad)
        for piece in chunk.pieces:
            req = next(r for r in queue if r.request_id == piece.request_id)
            assert piece.start == req.num_prefilled  # resumes exactly where it stopped
            req.num_prefilled = piece.end
        chunks.append(chunk)
    return chunks


def test_every_chunk_is_exactly_chunk_size_and_only_the_last_is_padded():
    queue = [Pending(0, 700), Pending(1, 100), Pending(2, 300), Pending(3, 5)]
    chunks = drain(queue, 512)
    assert all(c.size == 512 for c in chunks)
    assert [c.padding for c in chunks] == [0, 0, 512 * 3 - 1105]
    assert sum(c.num_tokens for c in chunks) == 1105


def test_a_long_prompt_spans_chunks_and_resumes():
    queue = [Pending(0, 1300), Pending(1, 10)]
    chunks = drain(queue, 512)
    assert [(p.request_id, p.start, p.length) for c in chunks for p in c.pieces] == [
        (0, 0, 512), (0, 512, 512), (0, 1024, 276), (1, 0, 10),
    ]


def test_a_chunk_packs_several_prompts_in_queue_order():
    chunk = next_chunk([Pending(5, 100), Pending(3, 200), Pending(9, 400)], 512)
    assert [(p.request_id, p.length) for p in chunk.pieces] == [(5, 100), (3, 200), (9, 212)]


def test_unpadded_chunk_is_as_large_as_its_tokens():
    chunk = next_chunk([Pending(0, 30)], 512, pad=False)
    assert (chunk.size, chunk.padding) == (30, 0)


def test_empty_queue_gives_an_empty_unpadded_chunk_and_bad_size_raises():
    assert next_chunk([], 512).size == 0
    with pytest.raises(ValueError):
        next_chunk([], 0)
