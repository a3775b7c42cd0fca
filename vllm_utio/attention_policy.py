"""Which KV blocks a decode token reads under a sparse attention policy (pure logic).

``throttle`` keeps the attention sinks (the first ``sink_tokens`` positions) and the
most recent ``recent_tokens`` positions. Over vLLM's paged cache this is done by handing
the attention backend a block table restricted to those blocks and the matching
sequence length: keys are stored after RoPE, so attending to a subset of blocks is
exact attention over exactly the kept positions. It is block-granular: the sink span
is a whole number of blocks (validated) and the recent window is widened to the blocks
that contain the last ``recent_tokens`` positions (at most ``block_size - 1`` more).
Nothing is evicted: the token's own K/V is still written to its real slot, and a later
dense step sees the whole history.
"""

from __future__ import annotations

import numpy as np


def throttled_blocks(
    seq_len: int, block_size: int, sink_tokens: int, recent_tokens: int
) -> tuple[list[int], int] | None:
    """(indices into the request's block list, new seq_len), or None if nothing is cut."""
    total = -(-seq_len // block_size)
    sink = min(sink_tokens // block_size, total)
    last_len = seq_len - block_size * (total - 1)  # tokens in the (partial) last block
    # blocks holding the last `recent_tokens` positions, counted back from the last block
    recent = 1 + max(0, -(-(recent_tokens - last_len) // block_size))
    if sink + recent >= total:
        return None
    kept = list(range(sink)) + list(range(total - recent, total))
    return kept, block_size * (len(kept) - 1) + last_len


def restrict_block_table(
    block_table: np.ndarray,
    seq_lens: np.ndarray,
    rows: np.ndarray,
    block_size: int,
    sink_tokens: int,
    recent_tokens: int,
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Restricted copies of ``block_table``/``seq_lens`` for ``rows``.

    Returns (block_table, seq_lens, kv tokens read, kv tokens a dense step would read),
    the counts over ``rows`` only.
    """
    table, lens = block_table.copy(), seq_lens.copy()
    read = dense = 0
    for r in rows.tolist():
        dense += int(seq_lens[r])
        cut = throttled_blocks(int(seq_lens[r]), block_size, sink_tokens, recent_tokens)
        if cut is None:
            read += int(seq_lens[r])
            continue
        kept, new_len = cut
        table[r, : len(kept)] = block_table[r, kept]
        lens[r] = new_len
        read += new_len
    return table, lens, read, dense
