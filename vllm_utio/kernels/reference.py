"""Pure-torch reference for token-granular sparse decode attention over a paged KV cache.

This is the specification the Triton kernels in :mod:`vllm_utio.kernels.sparse_decode`
are tested against. It is slow (a Python loop over sequences) and exact: fp32
scores, a dense softmax over exactly the selected positions, fp32 accumulation,
output cast to the query dtype.

Shapes (one decode query token per sequence):

* ``q``: ``[num_seqs, num_q_heads, head_dim]``; query head ``h`` reads KV head
  ``h // G`` with ``G = num_q_heads // num_kv_heads`` (vLLM's / HF's GQA grouping).
* ``key_cache`` / ``value_cache``: layout ``"NHD"`` (default) is
  ``[num_blocks, block_size, num_kv_heads, head_dim]``, the logical shape of the
  K and V views vLLM's GPU FlashAttention backend passes to its kernels; layout
  ``"HND"`` is ``[num_blocks, num_kv_heads, block_size, head_dim]``. Strides are
  free (vLLM 0.32's views are not contiguous, see :func:`split_vllm_kv_cache`).
* ``block_table[b, j]``: physical block holding positions ``[j * block_size,
  (j + 1) * block_size)`` of sequence ``b``; entries past the sequence's last
  block are never read.
* ``seq_lens[b]``: tokens in sequence ``b`` including the decode token, which sits
  at position ``seq_lens[b] - 1`` and whose K/V are already in the cache.

Policies (``S`` sinks, ``W`` recent window, ``W >= 1`` so a token sees itself):

* throttle: positions ``[0, S)`` and ``[seq_len - W, seq_len)``; dense when
  ``S + W >= seq_len``.
* vslash: throttle's positions, plus caller-chosen "vertical" positions, plus a
  "slash" position ``seq_len - 1 - o`` per configured offset ``o >= 0``. Positions
  outside ``[0, seq_len)`` are ignored (so ``-1`` pads a ragged vertical list);
  duplicates count once. Verticals are per sequence (``[num_seqs, K]``) or per
  sequence and KV head (``[num_seqs, num_kv_heads, K]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

KVLayout = Literal["NHD", "HND"]
LAYOUTS: tuple[str, ...] = ("NHD", "HND")


def to_nhd(cache: torch.Tensor, layout: KVLayout) -> torch.Tensor:
    """A ``[num_blocks, block_size, num_kv_heads, head_dim]`` view of a cache in ``layout``."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if cache.dim() != 4:
        raise ValueError(f"a KV cache must be 4-D, got shape {tuple(cache.shape)}")
    return cache if layout == "NHD" else cache.transpose(1, 2)


def split_vllm_kv_cache(kv_cache: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V ``"NHD"`` views of one layer's vLLM 0.32 FlashAttention cache tensor.

    vLLM 0.32 allocates ``[num_blocks, num_kv_heads, block_size, 2 * head_dim]`` (K
    then V in the last dim) and its FlashAttention backend attends over
    ``kv_cache.transpose(1, 2).split(head_dim, -1)``; these are those views.
    """
    if kv_cache.dim() != 4 or kv_cache.shape[-1] != 2 * head_dim:
        raise ValueError(
            "expected [num_blocks, num_kv_heads, block_size, 2 * head_dim] with "
            f"head_dim={head_dim}, got shape {tuple(kv_cache.shape)}"
        )
    key_cache, value_cache = kv_cache.transpose(1, 2).split(head_dim, dim=-1)
    return key_cache, value_cache


def throttle_positions(seq_len: int, num_sinks: int, window: int) -> torch.Tensor:
    """Sorted positions the throttle policy attends: ``[0, S)`` and ``[seq_len - W, seq_len)``."""
    check_policy(num_sinks, window)
    pos = torch.arange(seq_len)
    return pos[(pos < num_sinks) | (pos >= seq_len - window)]


def vslash_positions(
    seq_len: int,
    num_sinks: int,
    window: int,
    verticals: Sequence[int] | torch.Tensor,
    slash_offsets: Sequence[int],
) -> torch.Tensor:
    """Sorted, duplicate-free positions of the vslash policy for one sequence (and KV head)."""
    check_slash_offsets(slash_offsets)
    vert = torch.as_tensor(verticals, dtype=torch.long).reshape(-1)
    slash = seq_len - 1 - torch.as_tensor(list(slash_offsets), dtype=torch.long)
    every = torch.cat([throttle_positions(seq_len, num_sinks, window), vert, slash])
    # torch.unique sorts; out-of-range entries are padding or fell off the start.
    every = torch.unique(every)
    return every[(every >= 0) & (every < seq_len)]


def positions_mask(position_sets: Sequence[torch.Tensor], length: int) -> torch.Tensor:
    """Boolean ``[len(position_sets), length]`` mask with True at each set's positions."""
    mask = torch.zeros(len(position_sets), length, dtype=torch.bool)
    for row, positions in enumerate(position_sets):
        mask[row, positions.long()] = True
    return mask


def throttle_mask(seq_lens: torch.Tensor, num_sinks: int, window: int) -> torch.Tensor:
    """``[num_seqs, max(seq_lens)]`` selection mask of the throttle policy (CPU)."""
    lens = [int(n) for n in seq_lens.tolist()]
    sets = [throttle_positions(n, num_sinks, window) for n in lens]
    return positions_mask(sets, max(lens, default=0))


def vslash_mask(
    seq_lens: torch.Tensor,
    num_sinks: int,
    window: int,
    verticals: torch.Tensor,
    slash_offsets: Sequence[int],
) -> torch.Tensor:
    """Selection mask of the vslash policy (CPU).

    ``verticals`` ``[num_seqs, K]`` gives ``[num_seqs, max(seq_lens)]``;
    ``[num_seqs, num_kv_heads, K]`` gives ``[num_seqs, num_kv_heads, max(seq_lens)]``.
    """
    if verticals.dim() not in (2, 3) or verticals.shape[0] != seq_lens.shape[0]:
        raise ValueError(
            "verticals must be [num_seqs, K] or [num_seqs, num_kv_heads, K], "
            f"got {tuple(verticals.shape)} for {seq_lens.shape[0]} sequences"
        )
    lens = [int(n) for n in seq_lens.tolist()]
    length = max(lens, default=0)
    per_head = verticals.cpu().reshape(len(lens), -1, verticals.shape[-1])
    heads = [
        positions_mask(
            [
                vslash_positions(n, num_sinks, window, per_head[b, h], slash_offsets)
                for b, n in enumerate(lens)
            ],
            length,
        )
        for h in range(per_head.shape[1])
    ]
    mask = torch.stack(heads, dim=1)
    return mask if verticals.dim() == 3 else mask[:, 0]


def gather_sequence(cache_nhd: torch.Tensor, block_row: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Positions ``[0, seq_len)`` of one sequence from an NHD cache: ``[seq_len, kv_heads, D]``."""
    block_size = cache_nhd.shape[1]
    pos = torch.arange(seq_len, device=cache_nhd.device)
    blocks = block_row.to(cache_nhd.device).long()[pos // block_size]
    return cache_nhd[blocks, pos % block_size]


def sparse_decode_attention_ref(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    mask: torch.Tensor,
    layout: KVLayout = "NHD",
) -> torch.Tensor:
    """Decode attention of each sequence's query over exactly its selected positions.

    ``mask`` is boolean ``[num_seqs, L]`` (one selection for all KV heads) or
    ``[num_seqs, num_kv_heads, L]`` with ``L >= max(seq_lens)``; entries at or past a
    sequence's length are ignored. A sequence with nothing selected (``seq_len == 0``)
    gets a zero output. Returns ``[num_seqs, num_q_heads, head_dim]`` in ``q.dtype``.
    """
    k_nhd, v_nhd = to_nhd(key_cache, layout), to_nhd(value_cache, layout)
    num_seqs, num_q_heads, head_dim = q.shape
    num_kv_heads = k_nhd.shape[2]
    group = num_q_heads // num_kv_heads
    lens = [int(n) for n in seq_lens.tolist()]
    if mask.dim() not in (2, 3) or mask.shape[0] != num_seqs:
        raise ValueError(f"mask must be [num_seqs, L] or [num_seqs, kv_heads, L], got {mask.shape}")
    if mask.dim() == 3 and mask.shape[1] != num_kv_heads:
        raise ValueError(f"mask has {mask.shape[1]} heads, the cache {num_kv_heads} KV heads")
    if mask.shape[-1] < max(lens, default=0):
        raise ValueError(f"mask length {mask.shape[-1]} < longest sequence {max(lens)}")
    per_head = mask.to(torch.bool).reshape(num_seqs, -1, mask.shape[-1]).cpu()
    out = torch.zeros_like(q)
    for b, n in enumerate(lens):
        sel = per_head[b, :, :n].expand(num_kv_heads, n).to(q.device)
        if n == 0 or not bool(sel.any()):
            continue
        k = gather_sequence(k_nhd, block_table[b], n).float()  # [n, kv_heads, D]
        v = gather_sequence(v_nhd, block_table[b], n).float()
        qg = q[b].float().reshape(num_kv_heads, group, head_dim)
        scores = torch.einsum("hgd,nhd->hgn", qg, k) * scale
        scores = scores.masked_fill(~sel[:, None, :], float("-inf"))
        # A head with an empty selection would be NaN; it attends nothing, so zero.
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        o = torch.einsum("hgn,nhd->hgd", probs, v)
        out[b] = o.reshape(num_q_heads, head_dim).to(q.dtype)
    return out


def check_policy(num_sinks: int, window: int) -> None:
    """``num_sinks >= 0`` and ``window >= 1``, both ints."""
    for name, value in (("num_sinks", num_sinks), ("window", window)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if num_sinks < 0:
        raise ValueError(f"num_sinks must be >= 0, got {num_sinks}")
    if window < 1:
        raise ValueError(f"window must be >= 1 (the token attends to itself), got {window}")


def check_slash_offsets(slash_offsets: Sequence[int]) -> None:
    """A sequence of ints ``>= 0`` (offset 0 is the current token)."""
    if isinstance(slash_offsets, torch.Tensor) or not all(
        isinstance(o, int) and not isinstance(o, bool) for o in slash_offsets
    ):
        raise TypeError(f"slash_offsets must be a sequence of ints, got {slash_offsets!r}")
    bad = [o for o in slash_offsets if o < 0]
    if bad:
        raise ValueError(f"slash offsets must be >= 0 (0 is the current token), got {bad}")


# ------------------------------------------------------------- block-granular selections
# The split-KV kernel reads whole logical blocks (vllm_utio.kernels.selection). These are
# the selections' definitions, one (sequence, KV head) at a time, in plain Python/torch.


def range_blocks(
    seq_len: int, block_size: int, sink_blocks: int, recent_tokens: int | None
) -> list[int]:
    """Sorted logical blocks of ``BlockRanges``: the first ``sink_blocks`` and those holding
    the last ``recent_tokens`` positions (``None``: all), all of them where they overlap."""
    total = -(-seq_len // block_size)
    if recent_tokens is None:
        return list(range(total))
    last_len = seq_len - block_size * (total - 1)
    recent = 1 + max(0, -(-(recent_tokens - last_len) // block_size))
    if sink_blocks + recent >= total:
        return list(range(total))
    return [*range(sink_blocks), *range(total - recent, total)]


def vslash_block_set(
    seq_len: int,
    block_size: int,
    sink_blocks: int,
    recent_tokens: int,
    slash_offsets: Sequence[int],
    ranked: Sequence[int],
    vertical_blocks: int,
) -> list[int]:
    """Sorted logical blocks of block-granular vslash: :func:`range_blocks`, the block of
    each position ``seq_len - 1 - o``, then the first ``vertical_blocks`` entries of
    ``ranked`` in range and not kept yet (``vllm_utio.attention_policy.vslash_blocks``)."""
    total = -(-seq_len // block_size)
    kept = set(range_blocks(seq_len, block_size, sink_blocks, recent_tokens))
    kept.update((seq_len - 1 - o) // block_size for o in slash_offsets if 0 <= o < seq_len)
    taken = 0
    for b in ranked:
        if taken >= vertical_blocks:
            break
        if 0 <= b < total and b not in kept:
            kept.add(int(b))
            taken += 1
    return sorted(kept)


def blocks_mask(
    block_sets: Sequence[Sequence[Sequence[int]]], seq_lens: Sequence[int], block_size: int
) -> torch.Tensor:
    """``[num_seqs, H, max(seq_lens)]`` positions of ``block_sets[b][h]`` below each length
    (the mask :func:`sparse_decode_attention_ref` takes)."""
    length = max(seq_lens, default=0)
    heads = len(block_sets[0]) if block_sets else 1
    mask = torch.zeros(len(block_sets), heads, length, dtype=torch.bool)
    for b, (per_head, n) in enumerate(zip(block_sets, seq_lens, strict=True)):
        for h, blocks in enumerate(per_head):
            for j in blocks:
                mask[b, h, j * block_size : min((j + 1) * block_size, n)] = True
    return mask


def gather_summaries(
    packed: torch.Tensor, block_table: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kmin, kmax)`` fp32 ``[num_seqs, width, num_kv_heads, D]`` of each row's first
    ``width`` logical blocks, from one layer's packed ``[max | -min]`` summaries
    ``[num_kv_heads, num_blocks, 2 * D]`` (``vllm_utio.kv_selection.BlockSummaries``)."""
    dim = packed.shape[-1] // 2
    ids = block_table[:, :width].long()
    rows = packed.float()[:, ids]  # [H, S, width, 2D]
    kmax, neg_min = rows[..., :dim], rows[..., dim:]
    return (-neg_min).permute(1, 2, 0, 3), kmax.permute(1, 2, 0, 3)


def kv_head_bounds(query: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """``[num_seqs, num_kv_heads, NB]`` Quest bound ``sum_c max(q_c * min_c, q_c * max_c)``,
    the maximum over each KV head's query heads (query ``[num_seqs, num_q_heads, D]``,
    summaries ``[num_seqs, NB, num_kv_heads, D]``)."""
    rows, heads, dim = query.shape
    kv_heads = kmin.shape[2]
    q = query.double().reshape(rows, 1, kv_heads, heads // kv_heads, dim)
    lo, hi = kmin.double().unsqueeze(3), kmax.double().unsqueeze(3)
    bound = torch.maximum(q * lo, q * hi).sum(-1).amax(3)  # [R, NB, kv_heads]
    return bound.permute(0, 2, 1).float()


def select_per_kv_head(
    bounds: torch.Tensor,
    seq_lens: Sequence[int],
    block_size: int,
    sink_blocks: int,
    recent_tokens: int,
    budget_tokens: int,
) -> list[list[list[int]]]:
    """Sorted kept blocks per (sequence, head) of ``bounds [num_seqs, H, NB]``: sinks and
    recent window always, then the highest bounds (ties: lower block first) until
    ``ceil(budget_tokens / block_size)`` blocks are kept (``vllm_utio.kv_selection``'s
    rule, one head at a time; bounds at or below -1e38 are never taken)."""
    budget = max(1, -(-budget_tokens // block_size))
    out = []
    for b, n in enumerate(seq_lens):
        total = -(-n // block_size)
        base = set(range_blocks(n, block_size, min(sink_blocks, total), recent_tokens))
        extra = max(budget - len(base), 0)
        per_head = []
        for h in range(bounds.shape[1]):
            row = bounds[b, h, :total].tolist()
            order = sorted(
                (j for j in range(total) if j not in base and row[j] > -1e38),
                key=lambda j, row=row: (-row[j], j),
            )
            per_head.append(sorted(base | set(order[:extra])))
        out.append(per_head)
    return out
