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

``vslash`` keeps throttle's blocks plus, per configured slash offset ``o``, the block
holding position ``seq_len - 1 - o``, plus ``vertical_blocks`` further blocks taken in
order from a ranking of the request's blocks by estimated attention mass (the first
ranked blocks not kept already, so the extras never duplicate sinks, window or slash).
The ranking comes from :func:`block_attention_mass` on an earlier step's query.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

# (indices into the request's block list, ascending, ending with its last block; new seq_len)
Selection = tuple[list[int], int]


def throttled_blocks(
    seq_len: int, block_size: int, sink_tokens: int, recent_tokens: int
) -> Selection | None:
    """(indices into the request's block list, new seq_len), or None if nothing is cut."""
    return vslash_blocks(seq_len, block_size, sink_tokens, recent_tokens)


def vslash_blocks(
    seq_len: int,
    block_size: int,
    sink_tokens: int,
    recent_tokens: int,
    slash_offsets: Sequence[int] = (),
    ranked: Sequence[int] = (),
    vertical_blocks: int = 0,
) -> Selection | None:
    """Blocks kept by vslash (throttle when no slash/verticals), or None if nothing is cut.

    ``ranked``: the request's logical block indices, most attended first (entries out of
    range are ignored, so a ranking from an earlier, shorter step is fine).
    """
    total = -(-seq_len // block_size)
    kept = set(_throttle_set(seq_len, block_size, sink_tokens, recent_tokens))
    kept.update((seq_len - 1 - o) // block_size for o in slash_offsets if o < seq_len)
    extra = 0
    for b in ranked:
        if extra >= vertical_blocks or len(kept) >= total:
            break
        if 0 <= b < total and b not in kept:
            kept.add(int(b))
            extra += 1
    if len(kept) >= total:
        return None
    last_len = seq_len - block_size * (total - 1)  # tokens in the (partial) last block
    return sorted(kept), block_size * (len(kept) - 1) + last_len


def _throttle_set(seq_len: int, block_size: int, sink_tokens: int, recent_tokens: int) -> list[int]:
    """Sink blocks and the blocks holding the last ``recent_tokens`` positions."""
    total = -(-seq_len // block_size)
    sink = min(sink_tokens // block_size, total)
    last_len = seq_len - block_size * (total - 1)
    # blocks holding the last `recent_tokens` positions, counted back from the last block
    recent = 1 + max(0, -(-(recent_tokens - last_len) // block_size))
    if sink + recent >= total:
        return list(range(total))
    return [*range(sink), *range(total - recent, total)]


def apply_selections(
    block_table: np.ndarray, seq_lens: np.ndarray, selections: Mapping[int, Selection | None]
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Restricted copies of ``block_table``/``seq_lens``: row ``r`` keeps ``selections[r]``.

    Returns (block_table, seq_lens, kv tokens read, kv tokens a dense step would read),
    the counts over the selected rows only (a None selection reads everything).
    """
    table, lens = block_table.copy(), seq_lens.copy()
    read = dense = 0
    for r, cut in selections.items():
        dense += int(seq_lens[r])
        if cut is None:
            read += int(seq_lens[r])
            continue
        kept, new_len = cut
        table[r, : len(kept)] = block_table[r, kept]
        lens[r] = new_len
        read += new_len
    return table, lens, read, dense


def restrict_block_table(
    block_table: np.ndarray,
    seq_lens: np.ndarray,
    rows: np.ndarray,
    block_size: int,
    sink_tokens: int,
    recent_tokens: int,
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """:func:`apply_selections` with throttle's blocks for ``rows``."""
    cuts = {
        r: throttled_blocks(int(seq_lens[r]), block_size, sink_tokens, recent_tokens)
        for r in rows.tolist()
    }
    return apply_selections(block_table, seq_lens, cuts)


def block_attention_mass(
    query: torch.Tensor, keys: torch.Tensor, seq_lens: torch.Tensor, scale: float
) -> torch.Tensor:
    """Per logical block, the largest share of softmax attention any query head gives it.

    ``query`` ``[R, num_q_heads, D]`` (post-RoPE, one decode token per row); ``keys``
    ``[R, num_blocks, block_size, num_kv_heads, D]``, each row's blocks in logical order
    (padding past ``seq_lens[r]`` is masked). Returns fp32 ``[R, num_blocks]``, zero on
    padding. Max over heads, not mean: the block table is shared by all heads, so a block
    that one head retrieves sharply must not be averaged away by the others.
    """
    rows, num_blocks, block_size, kv_heads, dim = keys.shape
    # q @ K per (row, block, KV head) in the cache dtype: no fp32 copy of K (the big operand)
    q = query.to(keys.dtype).reshape(rows, 1, kv_heads, -1, dim)  # head h reads KV head h // G
    logits = torch.matmul(q, keys.permute(0, 1, 3, 4, 2)).float() * scale  # [R, NB, H, G, bs]
    logits = logits.permute(0, 2, 3, 1, 4).reshape(rows, kv_heads, -1, num_blocks * block_size)
    pad = torch.arange(num_blocks * block_size) >= seq_lens.reshape(-1, 1).cpu()
    logits.masked_fill_(pad.to(logits.device)[:, None, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    per_block = probs.reshape(rows, kv_heads, -1, num_blocks, block_size).sum(-1)
    return per_block.amax(dim=(1, 2))


def rank_blocks(mass: torch.Tensor, seq_lens: Sequence[int], block_size: int) -> list[np.ndarray]:
    """Each row's logical block indices, most attended first (ties: lower index first)."""
    order = torch.argsort(mass.cpu(), dim=1, descending=True, stable=True).numpy()
    ranked = []
    for r, n in enumerate(seq_lens):
        row = order[r]
        ranked.append(row[row < -(-int(n) // block_size)].astype(np.int32))
    return ranked
