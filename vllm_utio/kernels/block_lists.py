"""Block lists of the vslash policy (throttle + slash blocks + vertical blocks), on device.

One program per (sequence, list head) writes, without sorting and without a host sync,
the row's logical blocks as :mod:`vllm_utio.attention_policy.vslash_blocks` keeps them:

1. the sink blocks and the blocks holding the recent window (every block where they
   overlap), as two ranges;
2. each slash offset ``o``'s block ``(seq_len - 1 - o) // block_size``, unless a range or
   an earlier offset has it (duplicates found by an all-pairs compare of the few offsets);
3. the first ``vertical_blocks`` entries of the caller's ranking that are in range and not
   kept yet (an all-pairs compare against earlier entries and the slash blocks, then a
   prefix sum picks the first ``k`` eligible).

Each group is packed behind the previous one with a prefix sum, so the list is a set in
no particular order (the attention kernel does not care), of at most
:func:`vslash_width` entries: the buffer size is a host integer, fixed per policy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_utio.kernels.common import check_runs_here, is_interpreted, recent_blocks_max
from vllm_utio.kernels.selection import BlockLists

_CHUNK = 64  # range entries written per store


def vslash_width(
    block_size: int, sink_blocks: int, recent_tokens: int, num_offsets: int, vertical_blocks: int
) -> int:
    """The most blocks a vslash list holds: every group full, no overlap."""
    recent = recent_blocks_max(block_size, recent_tokens)
    return sink_blocks + recent + num_offsets + vertical_blocks


@triton.jit
def _vslash_lists_kernel(
    seq_lens_ptr, offsets_ptr, ranked_ptr, blocks_ptr, counts_ptr,
    sink_blocks, recent_tokens, num_offsets, num_ranked, vertical_blocks,
    stride_rs, stride_rh, stride_bs, stride_bh, stride_cs, stride_ch,
    BLOCK_SIZE: tl.constexpr, O_PAD: tl.constexpr, R_PAD: tl.constexpr,
    CHUNK: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + seq)
    total = (seq_len + BLOCK_SIZE - 1) // BLOCK_SIZE
    last_len = seq_len - BLOCK_SIZE * (total - 1)
    recent = 1 + (tl.maximum(recent_tokens - last_len, 0) + BLOCK_SIZE - 1) // BLOCK_SIZE
    dense = sink_blocks + recent >= total
    sinks = tl.where(dense, total, tl.minimum(sink_blocks, total))
    recent = tl.where(dense, 0, recent)
    win_start = total - recent
    out_row = blocks_ptr + seq * stride_bs + head * stride_bh

    # 1. ranges
    offs = tl.arange(0, CHUNK)
    for start in range(0, sinks, CHUNK):
        idx = start + offs
        tl.store(out_row + idx, idx, mask=idx < sinks)
    for start in range(0, recent, CHUNK):
        idx = start + offs
        tl.store(out_row + sinks + idx, win_start + idx, mask=idx < recent)
    filled = sinks + recent

    # 2. slash blocks: in range, outside the ranges, first of their block among the offsets
    o_idx = tl.arange(0, O_PAD)
    off = tl.load(offsets_ptr + o_idx, mask=o_idx < num_offsets, other=-1)
    o_ok = (off >= 0) & (off < seq_len)
    s_blk = tl.where(o_ok, seq_len - 1 - off, 0) // BLOCK_SIZE  # numerator >= 0
    s_new = o_ok & (s_blk >= sinks) & (s_blk < win_start)
    s_earlier = (o_idx[None, :] < o_idx[:, None]) & s_new[None, :]
    s_dup = tl.max((s_earlier & (s_blk[None, :] == s_blk[:, None])).to(tl.int32), axis=1) > 0
    s_take = s_new & ~s_dup
    s_rank = tl.cumsum(s_take.to(tl.int32), axis=0)
    tl.store(out_row + filled + s_rank - 1, s_blk, mask=s_take)
    filled += tl.sum(s_take.to(tl.int32), axis=0)

    # 3. verticals: ranked entries in range, not kept, not repeated, the first k of them
    r_idx = tl.arange(0, R_PAD)
    r_row = ranked_ptr + seq * stride_rs + head * stride_rh
    v_blk = tl.load(r_row + r_idx, mask=r_idx < num_ranked, other=-1)
    v_new = (v_blk >= sinks) & (v_blk < win_start)  # in range (sinks >= 0), not a range
    in_slash = tl.max((s_take[None, :] & (s_blk[None, :] == v_blk[:, None])).to(tl.int32), axis=1)
    v_earlier = r_idx[None, :] < r_idx[:, None]
    v_dup = tl.max((v_earlier & (v_blk[None, :] == v_blk[:, None])).to(tl.int32), axis=1)
    v_ok = v_new & (in_slash == 0) & (v_dup == 0)
    v_rank = tl.cumsum(v_ok.to(tl.int32), axis=0)
    v_take = v_ok & (v_rank <= vertical_blocks)
    tl.store(out_row + filled + v_rank - 1, v_blk, mask=v_take)
    filled += tl.sum(v_take.to(tl.int32), axis=0)
    tl.store(counts_ptr + seq * stride_cs + head * stride_ch, filled)


INTERPRETED: bool = is_interpreted(_vslash_lists_kernel)


def vslash_block_lists(
    seq_lens: torch.Tensor,
    block_size: int,
    sink_blocks: int,
    recent_tokens: int,
    slash_offsets: torch.Tensor,
    ranked: torch.Tensor | None = None,
    vertical_blocks: int = 0,
    *,
    out: BlockLists | None = None,
) -> BlockLists:
    """Vslash (throttle when there are no offsets and no verticals) block lists.

    ``slash_offsets``: int32 ``[O]`` on the device (offsets ``>= 0``; others ignored).
    ``ranked``: int32 ``[num_seqs, R]`` (one list for all KV heads) or ``[num_seqs,
    num_kv_heads, R]``, each row's logical blocks most attended first (out-of-range
    entries, e.g. ``-1`` padding, are skipped). ``out``: buffers of at least
    :func:`vslash_width` entries and ``num_seqs`` rows (heads: 1, or ``ranked``'s).
    """
    device = seq_lens.device
    num_seqs = seq_lens.shape[0]
    check_runs_here(device, INTERPRETED)
    if seq_lens.dtype != torch.int32 or slash_offsets.dtype != torch.int32:
        raise TypeError("seq_lens and slash_offsets must be int32")
    if ranked is None:
        ranked = torch.full((num_seqs, 1, 1), -1, dtype=torch.int32, device=device)
    if ranked.dim() == 2:
        ranked = ranked[:, None, :]
    if ranked.dtype != torch.int32 or ranked.shape[0] != num_seqs or ranked.stride(-1) != 1:
        raise ValueError(f"ranked must be int32 [num_seqs, (heads,) R], got {tuple(ranked.shape)}")
    heads = ranked.shape[1]
    need = vslash_width(
        block_size, sink_blocks, recent_tokens, slash_offsets.numel(), vertical_blocks
    )
    if out is None:
        out = BlockLists.allocate(num_seqs, heads, need, device)
    if out.width < need or out.blocks.shape[0] < num_seqs or out.heads != heads:
        raise ValueError(
            f"block lists {tuple(out.blocks.shape)} cannot hold {num_seqs} rows x {heads} "
            f"heads x {need} blocks"
        )
    if num_seqs == 0:
        return out
    _vslash_lists_kernel[(num_seqs, heads)](
        seq_lens, slash_offsets, ranked, out.blocks, out.counts,
        sink_blocks, recent_tokens, slash_offsets.numel(), ranked.shape[2], vertical_blocks,
        ranked.stride(0), ranked.stride(1), out.blocks.stride(0), out.blocks.stride(1),
        out.counts.stride(0), out.counts.stride(1),
        BLOCK_SIZE=block_size,
        O_PAD=triton.next_power_of_2(max(slash_offsets.numel(), 1)),
        R_PAD=triton.next_power_of_2(ranked.shape[2]),
        CHUNK=_CHUNK,
    )  # fmt: skip
    return out.rows(num_seqs)
