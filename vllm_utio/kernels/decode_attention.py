"""Split-KV (flash-decoding) decode attention over selected blocks of vLLM's paged cache.

One program per (sequence, KV head, split) handles that KV head's ``G`` query heads
together over its share of the row's selected blocks (:mod:`~vllm_utio.kernels.selection`:
implicit ranges or an explicit list), with an online softmax in fp32 (``exp2``, scale
folded into ``log2(e)``). A row's ``count`` selected blocks are cut into ``num_splits``
contiguous runs of ``ceil(count / num_splits)`` list entries; each program walks its run
in tiles of ``block_n`` positions (a tile may span several cache blocks or part of one:
every position gathers its own block through the list and the block table).

With one split the program normalises and writes the output. Otherwise it writes its
partial output (normalised) and log-sum-exp to a workspace, and a second small kernel
combines the splits of each (sequence, query head). Everything is sized from host
integers (shapes, the split count), so a call is CUDA-graph safe given a workspace, an
output and selection buffers that stay put.

Query-group tiles (``KernelConfig.use_dot``): with ``tl.dot`` the ``G`` query rows are
padded to 16 (the tensor-core minimum; 4x the arithmetic for Llama's G = 4, which decode
can afford since it is bound by reading K/V); without it, scores and ``P @ V`` are
elementwise products reduced with ``tl.sum`` over ``[G, block_n, head_dim]`` tiles, no
padding, more registers. Which is faster is measured by the GPU benchmark.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from vllm_utio.kernels.common import (
    MIN_DOT,
    check_attention_inputs,
    check_cache_values,
    is_interpreted,
    output_like,
)
from vllm_utio.kernels.reference import KVLayout, to_nhd
from vllm_utio.kernels.selection import DENSE, BlockLists, BlockRanges

CPU_NUM_SMS = 2  # the interpreter runs programs one by one: few splits keep tests fast


@dataclass(frozen=True)
class KernelConfig:
    """Tiling of the attention kernel (compile-time constants, except the split count)."""

    block_n: int = 64  # positions per tile
    num_warps: int = 4
    num_stages: int = 2
    use_dot: bool = True  # tl.dot on 16-row padded query tiles, else elementwise + tl.sum


@dataclass
class SplitWorkspace:
    """Partial outputs of the splits, preallocated for CUDA graphs (fp32)."""

    out: torch.Tensor  # [max_seqs, num_q_heads, max_splits, head_dim]
    lse: torch.Tensor  # [max_seqs, num_q_heads, max_splits], log2 domain

    @classmethod
    def allocate(
        cls,
        max_seqs: int,
        num_q_heads: int,
        head_dim: int,
        max_splits: int,
        device: torch.device | str,
    ) -> SplitWorkspace:
        shape = (max_seqs, num_q_heads, max_splits)
        return cls(
            torch.empty((*shape, head_dim), dtype=torch.float32, device=device),
            torch.empty(shape, dtype=torch.float32, device=device),
        )

    @property
    def max_splits(self) -> int:
        return self.lse.shape[2]


def device_num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (a host query, no sync); CPU: a small
    default so that interpreted runs stay short."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return CPU_NUM_SMS


def choose_num_splits(
    num_seqs: int,
    num_kv_heads: int,
    max_positions: int,
    num_sms: int,
    *,
    programs_per_sm: int = 4,
    min_positions: int = 128,
    max_splits: int = 64,
) -> int:
    """Splits per (sequence, KV head) so that small batches still fill the GPU.

    Enough programs for ``programs_per_sm`` resident per SM (each streams K/V; several per
    SM hide memory latency), but no split shorter than ``min_positions`` (two 64-position
    tiles) of the longest possible selection (``max_positions``: a host bound, e.g. list
    width x block size), since each split costs a partial write and a share of the
    combine. Short selections at small batch (throttle at batch 1) are latency-bound:
    more, shorter splits shorten each program's chain of dependent loads.
    """
    base = max(1, num_seqs * num_kv_heads)
    wanted = -(-programs_per_sm * num_sms // base)
    by_work = max(1, max_positions // min_positions)
    return max(1, min(wanted, by_work, max_splits))


@triton.jit
def _online_step(
    acc, m_i, l_i, q, k, v, valid, qk_scale, USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr
):
    """One online-softmax step over a tile of K/V (invalid positions skipped)."""
    if USE_DOT:
        if DOT_FP32:
            k = k.to(tl.float32)
        # "ieee": fp32 operands would otherwise be TF32 on GPUs; no effect on 16-bit ones
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
    s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # while nothing valid was seen the max is -inf; subtracting 0 keeps exp2 finite
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(s - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if USE_DOT:
        p_v = p.to(v.dtype)  # FlashAttention's rounding of P before P @ V
        if DOT_FP32:
            p_v = p_v.to(tl.float32)
            v = v.to(tl.float32)
        pv = tl.dot(p_v, v, input_precision="ieee")
    else:
        pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
    return acc * alpha[:, None] + pv, m_new, l_i


@triton.jit
def _split_kv_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, part_o_ptr, part_lse_ptr,
    table_ptr, seq_lens_ptr, blocks_ptr, counts_ptr,
    qk_scale, sink_blocks, recent_tokens, num_splits,
    stride_qs, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_os, stride_oh, stride_ps, stride_ph, stride_pp, stride_ls, stride_lh, stride_lp,
    stride_ts, stride_tb, stride_bs, stride_bh, stride_cs, stride_ch,
    BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    G_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    LISTED: tl.constexpr, DIRECT: tl.constexpr, USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    d_mask = offs_d < HEAD_DIM
    qo_mask = (offs_g < GROUP)[:, None] & d_mask[None, :]
    heads = kv_head * GROUP + offs_g  # the query heads sharing this KV head

    q = tl.load(
        q_ptr + seq * stride_qs + heads[:, None] * stride_qh + offs_d[None, :],
        mask=qo_mask,
        other=0.0,
    )
    if DOT_FP32 or not USE_DOT:
        q = q.to(tl.float32)
    seq_len = tl.load(seq_lens_ptr + seq)
    num_blocks = (seq_len + BLOCK_SIZE - 1) // BLOCK_SIZE
    if LISTED:
        count = tl.load(counts_ptr + seq * stride_cs + kv_head * stride_ch)
        list_row = blocks_ptr + seq * stride_bs + kv_head * stride_bh
        sinks = 0
        shift = 0
    else:
        # the window widened to whole blocks, as vllm_utio.attention_policy does
        last_len = seq_len - BLOCK_SIZE * (num_blocks - 1)
        over = tl.maximum(recent_tokens - last_len, 0)  # >= 0: integer division is floor
        recent = 1 + (over + BLOCK_SIZE - 1) // BLOCK_SIZE
        dense = sink_blocks + recent >= num_blocks
        count = tl.where(dense, num_blocks, sink_blocks + recent)
        sinks = tl.where(dense, num_blocks, sink_blocks)
        shift = num_blocks - count  # list entry e >= sinks reads block e + shift
        list_row = blocks_ptr
    per_split = (count + num_splits - 1) // num_splits
    first = split * per_split
    unit_end = tl.minimum(first + per_split, count) * BLOCK_SIZE
    table_row = table_ptr + seq * stride_ts
    k_head = k_ptr + kv_head * stride_kh
    v_head = v_ptr + kv_head * stride_vh

    acc = tl.zeros([G_PAD, D_PAD], dtype=tl.float32)
    m_i = tl.full([G_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([G_PAD], dtype=tl.float32)
    # units: list entry * BLOCK_SIZE + slot; a tile need not align with cache blocks
    for start in range(first * BLOCK_SIZE, unit_end, BLOCK_N):
        unit = start + offs_n
        in_run = unit < unit_end
        entry = unit // BLOCK_SIZE
        slot = unit % BLOCK_SIZE
        if LISTED:
            block = tl.load(list_row + entry, mask=in_run, other=0)
        else:
            block = tl.where(entry < sinks, entry, entry + shift)
        pos = block * BLOCK_SIZE + slot
        valid = in_run & (block >= 0) & (pos < seq_len)
        phys = tl.load(table_row + block.to(tl.int64) * stride_tb, mask=valid, other=0)
        phys = phys.to(tl.int64)
        slot64 = slot.to(tl.int64)
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(
            k_head + (phys * stride_kb + slot64 * stride_kt)[:, None] + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        v = tl.load(
            v_head + (phys * stride_vb + slot64 * stride_vt)[:, None] + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        acc, m_i, l_i = _online_step(acc, m_i, l_i, q, k, v, valid, qk_scale, USE_DOT, DOT_FP32)

    # nothing selected leaves l == 0: zeros (and lse -inf), not NaN
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    res = acc / l_safe[:, None]
    if DIRECT:
        o_ptrs = out_ptr + seq * stride_os + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, res.to(out_ptr.dtype.element_ty), mask=qo_mask)
    else:
        p_row = part_o_ptr + seq * stride_ps + heads * stride_ph + split * stride_pp
        tl.store(p_row[:, None] + offs_d[None, :], res, mask=qo_mask)
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
        l_ptrs = part_lse_ptr + seq * stride_ls + heads * stride_lh + split * stride_lp
        tl.store(l_ptrs, lse, mask=offs_g < GROUP)


@triton.jit
def _combine_kernel(
    part_o_ptr, part_lse_ptr, out_ptr, num_splits,
    stride_ps, stride_ph, stride_pp, stride_ls, stride_lh, stride_lp, stride_os, stride_oh,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, S_PAD: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    offs_s = tl.arange(0, S_PAD)
    offs_d = tl.arange(0, D_PAD)
    s_mask = offs_s < num_splits
    d_mask = offs_d < HEAD_DIM
    lse = tl.load(
        part_lse_ptr + seq * stride_ls + head * stride_lh + offs_s * stride_lp,
        mask=s_mask,
        other=float("-inf"),
    )
    m = tl.max(lse, axis=0)
    weight = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))  # empty splits weigh 0
    o = tl.load(
        part_o_ptr + seq * stride_ps + head * stride_ph
        + offs_s[:, None] * stride_pp + offs_d[None, :],
        mask=s_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # fmt: skip
    total = tl.sum(weight, axis=0)
    res = tl.sum(weight[:, None] * o, axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(
        out_ptr + seq * stride_os + head * stride_oh + offs_d,
        res.to(out_ptr.dtype.element_ty),
        mask=d_mask,
    )


INTERPRETED: bool = is_interpreted(_split_kv_kernel)
"""Whether the kernels were built for Triton's interpreter (TRITON_INTERPRET=1 at import)."""


def paged_decode_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    selection: BlockRanges | BlockLists = DENSE,
    *,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    num_sms: int | None = None,
    config: KernelConfig | None = None,
    workspace: SplitWorkspace | None = None,
    layout: KVLayout = "NHD",
    check_values: bool = False,
) -> torch.Tensor:
    """Decode attention of each sequence's query over its selected blocks.

    Shapes as in :mod:`vllm_utio.kernels.reference` (``q [num_seqs, num_q_heads,
    head_dim]``, NHD caches with free strides but a contiguous ``head_dim``, int32
    ``block_table`` and ``seq_lens``). ``num_splits``: splits per (sequence, KV head);
    default :func:`choose_num_splits` from the batch, the selection's width and
    ``num_sms`` (default: the device's). ``config``: tiling (default
    :class:`KernelConfig`). ``workspace`` (needed for CUDA graphs when splitting) must
    hold ``num_seqs`` rows and ``num_splits`` splits. ``check_values`` reads
    ``seq_lens`` and the block table on the host (a sync: never on hot paths).
    Returns (or fills) ``out`` in ``q.dtype``.
    """
    config = config or KernelConfig()
    k, v = to_nhd(key_cache, layout), to_nhd(value_cache, layout)
    check_attention_inputs(q, k, v, block_table, seq_lens, scale, config.block_n, INTERPRETED)
    out = output_like(q, out)
    if check_values:
        check_cache_values(k, block_table, seq_lens)
    num_seqs, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k.shape
    if num_seqs == 0:
        return out
    listed = isinstance(selection, BlockLists)
    if listed:
        blocks, counts = _check_lists(selection, num_seqs, num_kv_heads, q.device)
        max_blocks = selection.width
        sink_blocks, recent = 0, 0
    else:
        blocks, counts = seq_lens[:, None, None], seq_lens[:, None]  # never read
        max_blocks = selection.max_blocks(block_size, block_table.shape[1])
        sink_blocks, recent = selection.sink_blocks, selection.recent
    if num_splits is None:
        sms = num_sms if num_sms is not None else device_num_sms(q.device)
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_blocks * block_size, sms)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    direct = num_splits == 1
    part_o, part_lse = _partials(workspace, num_seqs, num_q_heads, head_dim, num_splits, q)
    group = num_q_heads // num_kv_heads
    use_dot = config.use_dot
    g_pad = triton.next_power_of_2(group)
    _split_kv_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k, v, out, part_o, part_lse, block_table, seq_lens, blocks, counts,
        float(scale) * math.log2(math.e), sink_blocks, recent, num_splits,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1),
        part_o.stride(0), part_o.stride(1), part_o.stride(2),
        part_lse.stride(0), part_lse.stride(1), part_lse.stride(2),
        block_table.stride(0), block_table.stride(1),
        blocks.stride(0), blocks.stride(1), counts.stride(0), counts.stride(1),
        BLOCK_SIZE=block_size, GROUP=group, HEAD_DIM=head_dim,
        G_PAD=max(MIN_DOT, g_pad) if use_dot else g_pad,
        D_PAD=max(MIN_DOT, triton.next_power_of_2(head_dim)),
        BLOCK_N=config.block_n, LISTED=listed, DIRECT=direct, USE_DOT=use_dot,
        DOT_FP32=use_dot and INTERPRETED and q.dtype == torch.bfloat16,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    if not direct:
        _combine_kernel[(num_seqs, num_q_heads)](
            part_o, part_lse, out, num_splits,
            part_o.stride(0), part_o.stride(1), part_o.stride(2),
            part_lse.stride(0), part_lse.stride(1), part_lse.stride(2),
            out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, D_PAD=triton.next_power_of_2(head_dim),
            S_PAD=triton.next_power_of_2(num_splits),
        )  # fmt: skip
    return out


def _check_lists(
    lists: BlockLists, num_seqs: int, num_kv_heads: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The lists as ``[num_seqs, num_kv_heads, W]`` (a shared list: stride 0 over heads)."""
    if lists.blocks.shape[0] != num_seqs or lists.heads not in (1, num_kv_heads):
        raise ValueError(
            f"block lists must be [num_seqs={num_seqs}, 1 or num_kv_heads={num_kv_heads}, W], "
            f"got {tuple(lists.blocks.shape)}"
        )
    if lists.blocks.device != device:
        raise ValueError(f"block lists are on {lists.blocks.device}, q on {device}")
    blocks = lists.blocks.expand(num_seqs, num_kv_heads, lists.width)
    return blocks, lists.counts.expand(num_seqs, num_kv_heads)


def _partials(
    workspace: SplitWorkspace | None,
    num_seqs: int,
    num_q_heads: int,
    head_dim: int,
    num_splits: int,
    q: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    if workspace is None:
        if num_splits == 1:  # one split writes no partials: placeholders, never read
            return q.new_empty((1, 1, 1, 1), dtype=torch.float32), q.new_empty(
                (1, 1, 1), dtype=torch.float32
            )
        ws = SplitWorkspace.allocate(num_seqs, num_q_heads, head_dim, num_splits, q.device)
        return ws.out, ws.lse
    o, lse = workspace.out, workspace.lse
    if (
        o.shape[0] < num_seqs
        or o.shape[1] != num_q_heads
        or o.shape[3] != head_dim
        or workspace.max_splits < num_splits
    ):
        raise ValueError(
            f"workspace {tuple(o.shape)} cannot hold {num_seqs} sequences x {num_q_heads} "
            f"heads x {num_splits} splits x head_dim {head_dim}"
        )
    if o.device != q.device or o.dtype != torch.float32 or lse.dtype != torch.float32:
        raise ValueError("workspace must be float32 on q's device")
    return o, lse
