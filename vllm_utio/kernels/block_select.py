"""Query-aware block selection on the device: Quest bounds, then top-k per list head.

Two kernels, no host synchronisation, fixed-size outputs:

1. **Scores** (grid: sequence x KV head x chunk of ``CHUNK`` logical blocks): for each
   block of the row, the bound ``sum_c max(q_c * min_c, q_c * max_c)`` from the packed
   ``[max | -min]`` summaries (:mod:`~vllm_utio.kernels.block_summaries`), the maximum
   over the KV head's query heads; fp32 ``[num_seqs, num_kv_heads, W]``, ``-inf`` past
   the row's blocks. Parallel over blocks, so reading the summaries (1/16 of the K+V
   bytes at 16-token pages in the cache dtype) runs at memory speed at any batch size.
2. **Selection** (grid: sequence x list head): one program holds its row of scores in
   registers (``W`` rounded up to a power of two), keeps the sink blocks and the recent
   window (``vllm_utio.kv_selection.always_kept``), and takes the ``k = budget - kept``
   highest bounds among the others by an exact radix select: 32 passes over the
   order-preserving integer image of the fp32 scores fix the k-th largest value bit by
   bit (each pass one comparison and one sum), ties at it go to the lower block index.
   A prefix sum packs the kept blocks, ascending, into the list. Per KV head (each KV head
   its own list) or shared (the maximum over KV heads: the spec's one block set per row,
   :func:`vllm_utio.kv_selection.select_blocks` without ``top_p``/held blocks).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_utio.kernels.common import check_runs_here, is_interpreted, recent_blocks_max
from vllm_utio.kernels.selection import BlockLists

SCORE_CHUNK = 32  # logical blocks per scoring program ([32, head_dim] fp32 tiles x 2)


def budget_blocks(budget_tokens: int, block_size: int) -> int:
    """Blocks a budget buys: whole blocks, at least one (``vllm_utio.kv_selection``)."""
    return max(1, -(-budget_tokens // block_size))


def select_width(
    block_size: int, sink_blocks: int, recent_tokens: int, budget_tokens: int, table_width: int
) -> int:
    """The most blocks a query-aware list holds (never more than the row has)."""
    most = max(
        budget_blocks(budget_tokens, block_size),
        sink_blocks + recent_blocks_max(block_size, recent_tokens),
    )
    return min(most, table_width)


@triton.jit
def _score_kernel(
    q_ptr, packed_ptr, table_ptr, seq_lens_ptr, scores_ptr, width,
    stride_qs, stride_qh, stride_ph, stride_pb, stride_ts, stride_tb, stride_ss, stride_sh,
    BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1).to(tl.int64)
    idx = tl.program_id(2) * CHUNK + tl.arange(0, CHUNK)
    offs_d = tl.arange(0, D_PAD)
    d_mask = offs_d < HEAD_DIM
    seq_len = tl.load(seq_lens_ptr + seq)
    valid = idx < (seq_len + BLOCK_SIZE - 1) // BLOCK_SIZE
    phys = tl.load(table_ptr + seq * stride_ts + idx * stride_tb, mask=valid, other=0)
    rows = packed_ptr + kv_head * stride_ph + phys.to(tl.int64) * stride_pb
    mask = valid[:, None] & d_mask[None, :]
    kmax = tl.load(rows[:, None] + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    neg_min = tl.load(rows[:, None] + HEAD_DIM + offs_d[None, :], mask=mask, other=0.0)
    neg_min = neg_min.to(tl.float32)
    best = tl.full([CHUNK], float("-inf"), dtype=tl.float32)
    for g in tl.static_range(GROUP):
        q_row = q_ptr + seq * stride_qs + (kv_head * GROUP + g) * stride_qh
        q = tl.load(q_row + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        # max(q*min, q*max) = relu(q) * max + relu(-q) * (-min), channel by channel
        pos, neg = tl.maximum(q, 0.0), tl.maximum(-q, 0.0)
        bound = tl.sum(kmax * pos[None, :] + neg_min * neg[None, :], axis=1)
        best = tl.maximum(best, bound)
    tl.store(
        scores_ptr + seq * stride_ss + kv_head * stride_sh + idx,
        tl.where(valid, best, float("-inf")),
        mask=idx < width,
    )


@triton.jit
def _select_kernel(
    scores_ptr, seq_lens_ptr, blocks_ptr, counts_ptr,
    width, sink_blocks, recent_tokens, budget,
    stride_ss, stride_sh, stride_bs, stride_bh, stride_cs, stride_ch,
    BLOCK_SIZE: tl.constexpr, NB_PAD: tl.constexpr, SHARED: tl.constexpr,
    KV_HEADS: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    idx = tl.arange(0, NB_PAD)
    seq_len = tl.load(seq_lens_ptr + seq)
    total = (seq_len + BLOCK_SIZE - 1) // BLOCK_SIZE
    valid = (idx < total) & (idx < width)
    row = scores_ptr + seq * stride_ss
    if SHARED:  # one list for the row: the highest bound over its KV heads
        score = tl.full([NB_PAD], float("-inf"), dtype=tl.float32)
        for h in tl.static_range(KV_HEADS):
            s = tl.load(row + h * stride_sh + idx, mask=valid, other=float("-inf"))
            score = tl.maximum(score, s)
    else:
        score = tl.load(row + head * stride_sh + idx, mask=valid, other=float("-inf"))

    # always kept: sinks and the blocks holding the recent window
    last_len = seq_len - BLOCK_SIZE * (total - 1)
    recent = 1 + (tl.maximum(recent_tokens - last_len, 0) + BLOCK_SIZE - 1) // BLOCK_SIZE
    base = valid & ((idx < sink_blocks) | (idx >= total - recent))
    k = tl.maximum(budget - tl.sum(base.to(tl.int32), axis=0), 0)
    cand = valid & ~base & (score > -1e38)

    # radix select: the k-th largest order-preserving key, bit by bit from the top
    bits = score.to(tl.uint32, bitcast=True)
    key = tl.where((bits >> 31) == 1, ~bits, bits | 0x80000000)
    key = tl.where(cand, key, 0)  # candidates' keys are >= 1 (finite scores)
    thr = tl.zeros([], dtype=tl.uint32)
    one = tl.full([], 1, dtype=tl.uint32)
    for bit in tl.static_range(31, -1, -1):
        trial = thr | (one << bit)
        thr = tl.where(tl.sum((key >= trial).to(tl.int32), axis=0) >= k, trial, thr)
    above = key > thr  # fewer than k; k == 0 gives thr = all ones: none
    tie = cand & (key == thr)
    need = k - tl.sum(above.to(tl.int32), axis=0)
    take = above | (tie & (tl.cumsum(tie.to(tl.int32), axis=0) <= need))

    keep = base | take
    rank = tl.cumsum(keep.to(tl.int32), axis=0) - 1
    tl.store(blocks_ptr + seq * stride_bs + head * stride_bh + rank, idx, mask=keep)
    tl.store(counts_ptr + seq * stride_cs + head * stride_ch, tl.sum(keep.to(tl.int32), axis=0))


INTERPRETED: bool = is_interpreted(_select_kernel)


def block_scores(
    q: torch.Tensor,
    packed: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """fp32 ``[num_seqs, num_kv_heads, W]`` bounds of each row's logical blocks (``W`` =
    the block table's width; ``-inf`` past the row's blocks), from ``q [num_seqs,
    num_q_heads, D]`` and one layer's ``packed [num_kv_heads, num_blocks, 2 * D]``."""
    check_runs_here(q.device, INTERPRETED)
    num_seqs, num_q_heads, dim = q.shape
    kv_heads, _, packed_dim = packed.shape
    width = block_table.shape[1]
    if packed_dim != 2 * dim or num_q_heads % kv_heads:
        raise ValueError(f"packed {tuple(packed.shape)} does not fit q {tuple(q.shape)}")
    if q.stride(-1) != 1 or packed.stride(-1) != 1:
        raise ValueError("q and packed must have a contiguous last dim")
    if out is None:
        out = torch.empty((num_seqs, kv_heads, width), dtype=torch.float32, device=q.device)
    if out.shape[0] < num_seqs or out.shape[1] != kv_heads or out.shape[2] < width:
        raise ValueError(f"scores {tuple(out.shape)} cannot hold {(num_seqs, kv_heads, width)}")
    if num_seqs == 0:
        return out
    _score_kernel[(num_seqs, kv_heads, triton.cdiv(width, SCORE_CHUNK))](
        q, packed, block_table, seq_lens, out, width,
        q.stride(0), q.stride(1), packed.stride(0), packed.stride(1),
        block_table.stride(0), block_table.stride(1), out.stride(0), out.stride(1),
        BLOCK_SIZE=block_size, GROUP=num_q_heads // kv_heads, HEAD_DIM=dim,
        D_PAD=triton.next_power_of_2(dim), CHUNK=SCORE_CHUNK,
    )  # fmt: skip
    return out


def topk_block_lists(
    scores: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    sink_blocks: int,
    recent_tokens: int,
    budget_tokens: int,
    *,
    per_kv_head: bool = True,
    width: int | None = None,
    out: BlockLists | None = None,
) -> BlockLists:
    """Sinks + recent window + the highest-scoring blocks up to the budget, per KV head
    (``per_kv_head``) or one list per row (maximum over KV heads). ``scores``: from
    :func:`block_scores`; ``width``: its valid block columns (default: all of them)."""
    check_runs_here(scores.device, INTERPRETED)
    num_seqs = seq_lens.shape[0]
    kv_heads = scores.shape[1]
    width = scores.shape[2] if width is None else width
    heads = kv_heads if per_kv_head else 1
    need = select_width(block_size, sink_blocks, recent_tokens, budget_tokens, width)
    if out is None:
        out = BlockLists.allocate(num_seqs, heads, need, scores.device)
    if out.width < need or out.blocks.shape[0] < num_seqs or out.heads != heads:
        raise ValueError(
            f"block lists {tuple(out.blocks.shape)} cannot hold {num_seqs} rows x {heads} "
            f"heads x {need} blocks"
        )
    if num_seqs == 0:
        return out
    nb_pad = triton.next_power_of_2(width)
    _select_kernel[(num_seqs, heads)](
        scores, seq_lens, out.blocks, out.counts,
        width, sink_blocks, recent_tokens, budget_blocks(budget_tokens, block_size),
        scores.stride(0), scores.stride(1), out.blocks.stride(0), out.blocks.stride(1),
        out.counts.stride(0), out.counts.stride(1),
        BLOCK_SIZE=block_size, NB_PAD=nb_pad, SHARED=not per_kv_head, KV_HEADS=kv_heads,
        num_warps=4 if nb_pad <= 1024 else 8,  # more threads: shorter per-pass reductions
    )  # fmt: skip
    return out.rows(num_seqs)
