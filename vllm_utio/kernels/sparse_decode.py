"""Triton kernels: token-granular sparse decode attention over vLLM's paged KV cache.

Semantics, shapes and layouts are those of :mod:`vllm_utio.kernels.reference` (the
spec): one decode query per sequence, GQA, a paged K/V cache read through a block
table, and two selection policies, ``throttle`` (sinks + recent window) and
``vslash`` (throttle + caller-chosen vertical positions + slash diagonals).

Layout. The kernels read ``[num_blocks, block_size, num_kv_heads, head_dim]``
("NHD") with arbitrary strides except a contiguous ``head_dim``; ``layout="HND"``
(``[num_blocks, num_kv_heads, block_size, head_dim]``) is accepted as a transposed
view. vLLM 0.32's FlashAttention K/V views (:func:`split_vllm_kv_cache`) are NHD,
non-contiguous, and are passed as they are.

Kernel. One program per (sequence, KV head) handles that head's ``G`` query heads
together (a ``[G, head_dim]`` query tile, padded to 16 rows for ``tl.dot``). It runs
an online softmax (fp32 running max, sum and accumulator; ``exp2`` with the scale
folded into ``log2(e)``) over tiles of ``block_n`` positions, gathering each
position's K/V through the block table, so tiles need not align with cache blocks:

1. the sinks ``[0, min(S, seq_len))`` and the window ``[max(seq_len - W, S),
   seq_len)`` as two dense position ranges (nothing else for ``throttle``);
2. for ``vslash``, a per-row list of the remaining positions (verticals and slash
   positions not covered by the ranges), sorted and deduplicated by
   :func:`extra_positions` (torch ops, on the inputs' device) before the launch.

Probabilities are rounded to the value dtype before the ``P @ V`` dot (the usual
FlashAttention choice); the output is written in the query dtype.

Tested (tests/test_kernels.py), on CPU under ``TRITON_INTERPRET=1`` only: agreement
with the reference for fp32, fp16 and bf16 inputs, GQA and MHA, random block tables,
partial last blocks, both policies, sparse and dense settings, vLLM's packed layout.

Not tested, because this project has no GPU: anything compiled. That includes
performance and the tiling choices (``block_n``, ``num_warps``, padding ``G`` to 16,
no split-KV / flash-decoding, so long sequences with few heads occupy few SMs),
``tl.dot`` numerics on tensor cores (the interpreter multiplies with numpy; fp32
inputs request ``input_precision="ieee"`` so that a GPU does not silently use TF32),
compile-time specialisation, and the native bf16 dot (see the interpreter note).

Interpreter note (Triton 3.9): the interpreter's ``tl.dot`` multiplies bf16 operands
as their raw uint16 storage, giving garbage. When the kernel runs interpreted and
inputs are bf16, the wrapper sets ``DOT_FP32``: operands are upcast to fp32 before the
dots (P still rounded to bf16 first), which is numerically the native path up to
summation order. So the bf16 tests check that variant, not bf16 ``tl.dot`` itself;
fp16 and fp32 run the same code a GPU would compile.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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
from vllm_utio.kernels.reference import KVLayout, check_policy, check_slash_offsets, to_nhd

_SENTINEL = torch.iinfo(torch.int32).max  # sorts after every real position


@triton.jit
def _load_kv_tile(
    head_ptr,
    table_row_ptr,
    pos,
    valid,
    offs_d,
    d_mask,
    stride_table,
    stride_block,
    stride_slot,
    BLOCK_SIZE: tl.constexpr,
):
    # Token-granular gather: each position looks up its own block, so a tile may
    # start anywhere (windows) or be scattered (verticals).
    block = tl.load(table_row_ptr + (pos // BLOCK_SIZE) * stride_table, mask=valid, other=0)
    row = block.to(tl.int64) * stride_block + (pos % BLOCK_SIZE).to(tl.int64) * stride_slot
    ptrs = head_ptr + row[:, None] + offs_d[None, :]
    return tl.load(ptrs, mask=valid[:, None] & d_mask[None, :], other=0.0)


@triton.jit
def _attend_tile(acc, m_i, l_i, q, k, v, valid, qk_scale, DOT_FP32: tl.constexpr):
    """One online-softmax step over a tile of K/V (rows where `valid` is False skipped)."""
    if DOT_FP32:
        k = k.to(tl.float32)
    # "ieee": fp32 operands would otherwise be TF32 on GPUs; no effect on 16-bit ones.
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # While nothing valid was seen the max is -inf; subtracting 0 keeps exp2 finite.
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(s - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    p_v = p.to(v.dtype)
    if DOT_FP32:
        p_v = p_v.to(tl.float32)
        v = v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p_v, v, input_precision="ieee")
    return acc, m_new, l_i


@triton.jit
def _attend_positions(
    acc,
    m_i,
    l_i,
    q,
    pos,
    valid,
    k_head,
    v_head,
    table_row,
    offs_d,
    d_mask,
    qk_scale,
    stride_tb,
    stride_kb,
    stride_kt,
    stride_vb,
    stride_vt,
    BLOCK_SIZE: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    k = _load_kv_tile(
        k_head, table_row, pos, valid, offs_d, d_mask, stride_tb, stride_kb, stride_kt, BLOCK_SIZE
    )
    v = _load_kv_tile(
        v_head, table_row, pos, valid, offs_d, d_mask, stride_tb, stride_vb, stride_vt, BLOCK_SIZE
    )
    return _attend_tile(acc, m_i, l_i, q, k, v, valid, qk_scale, DOT_FP32)


@triton.jit
def _sparse_decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    table_ptr,
    seq_lens_ptr,
    extra_ptr,
    count_ptr,
    qk_scale,
    num_sinks,
    window,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_os,
    stride_oh,
    stride_ts,
    stride_tb,
    stride_es,
    stride_eh,
    stride_cs,
    stride_ch,
    BLOCK_SIZE: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    G_PAD: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_EXTRA: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1).to(tl.int64)
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    qo_mask = g_mask[:, None] & d_mask[None, :]
    heads = kv_head * GROUP + offs_g  # the query heads sharing this KV head

    q = tl.load(
        q_ptr + seq * stride_qs + heads[:, None] * stride_qh + offs_d[None, :],
        mask=qo_mask,
        other=0.0,
    )
    if DOT_FP32:
        q = q.to(tl.float32)
    seq_len = tl.load(seq_lens_ptr + seq)
    table_row = table_ptr + seq * stride_ts
    k_head = k_ptr + kv_head * stride_kh
    v_head = v_ptr + kv_head * stride_vh

    acc = tl.zeros([G_PAD, D_PAD], dtype=tl.float32)
    m_i = tl.full([G_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([G_PAD], dtype=tl.float32)

    # Sinks and window as disjoint ranges: the window starts at or after the sinks.
    sink_end = tl.minimum(seq_len, num_sinks)
    win_start = tl.maximum(seq_len - window, sink_end)
    for start in range(0, sink_end, BLOCK_N):
        pos = start + offs_n
        acc, m_i, l_i = _attend_positions(
            acc, m_i, l_i, q, pos, pos < sink_end, k_head, v_head, table_row, offs_d, d_mask,
            qk_scale, stride_tb, stride_kb, stride_kt, stride_vb, stride_vt, BLOCK_SIZE, DOT_FP32,
        )  # fmt: skip
    for start in range(win_start, seq_len, BLOCK_N):
        pos = start + offs_n
        acc, m_i, l_i = _attend_positions(
            acc, m_i, l_i, q, pos, pos < seq_len, k_head, v_head, table_row, offs_d, d_mask,
            qk_scale, stride_tb, stride_kb, stride_kt, stride_vb, stride_vt, BLOCK_SIZE, DOT_FP32,
        )  # fmt: skip
    if HAS_EXTRA:
        # Sorted, deduplicated, outside both ranges; the first `count` are real.
        count = tl.load(count_ptr + seq * stride_cs + kv_head * stride_ch)
        extra_row = extra_ptr + seq * stride_es + kv_head * stride_eh
        for start in range(0, count, BLOCK_N):
            idx = start + offs_n
            valid = idx < count
            pos = tl.load(extra_row + idx, mask=valid, other=0)
            acc, m_i, l_i = _attend_positions(
                acc, m_i, l_i, q, pos, valid, k_head, v_head, table_row, offs_d, d_mask,
                qk_scale, stride_tb, stride_kb, stride_kt, stride_vb, stride_vt, BLOCK_SIZE,
                DOT_FP32,
            )  # fmt: skip

    # An empty selection (seq_len == 0) leaves l == 0: write zeros, not NaN.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(
        out_ptr + seq * stride_os + heads[:, None] * stride_oh + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=qo_mask,
    )


INTERPRETED: bool = is_interpreted(_sparse_decode_kernel)
"""Whether the kernels were built for Triton's interpreter (TRITON_INTERPRET=1 at import)."""


def throttle_decode_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_sinks: int,
    window: int,
    *,
    layout: KVLayout = "NHD",
    out: torch.Tensor | None = None,
    block_n: int = 32,
    num_warps: int = 4,
    check_values: bool = True,
) -> torch.Tensor:
    """Decode attention over the first ``num_sinks`` and the last ``window`` positions.

    Shapes as in :mod:`vllm_utio.kernels.reference`; returns (or fills ``out``)
    ``[num_seqs, num_q_heads, head_dim]`` in ``q.dtype``. ``check_values`` also checks
    ``seq_lens`` and the used block-table entries, which synchronises with the device:
    turn it off on hot paths and under CUDA graphs.
    """
    check_policy(num_sinks, window)
    return _launch(
        q, key_cache, value_cache, block_table, seq_lens, scale, num_sinks, window,
        None, layout, out, block_n, num_warps, check_values,
    )  # fmt: skip


def vslash_decode_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_sinks: int,
    window: int,
    verticals: torch.Tensor,
    slash_offsets: Sequence[int],
    *,
    layout: KVLayout = "NHD",
    out: torch.Tensor | None = None,
    block_n: int = 32,
    num_warps: int = 4,
    check_values: bool = True,
) -> torch.Tensor:
    """Throttle's positions plus vertical positions plus slash diagonals.

    ``verticals``: integer ``[num_seqs, K]`` (all KV heads) or ``[num_seqs,
    num_kv_heads, K]``; entries outside ``[0, seq_len)`` are ignored (pad with -1).
    ``slash_offsets``: offsets ``o >= 0`` back from the current token (position
    ``seq_len - 1 - o``), shared by all sequences. Other arguments as in
    :func:`throttle_decode_attention`.
    """
    check_policy(num_sinks, window)
    _check_verticals(verticals, q, key_cache, layout)
    extra = extra_positions(seq_lens, num_sinks, window, verticals, slash_offsets)
    return _launch(
        q, key_cache, value_cache, block_table, seq_lens, scale, num_sinks, window,
        extra, layout, out, block_n, num_warps, check_values,
    )  # fmt: skip


def extra_positions(
    seq_lens: torch.Tensor,
    num_sinks: int,
    window: int,
    verticals: torch.Tensor,
    slash_offsets: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vslash positions the two ranges miss: sorted, deduplicated, packed to the front.

    Returns ``(positions [num_seqs, H, K + len(slash_offsets)], counts [num_seqs, H])``,
    int32, where ``H`` is 1 for per-sequence verticals and ``num_kv_heads`` otherwise;
    the first ``counts[b, h]`` entries of a row are real, the rest a sentinel.
    """
    check_slash_offsets(slash_offsets)
    lens = seq_lens.to(torch.long)[:, None, None]
    vert = verticals.to(torch.long)
    if vert.dim() == 2:
        vert = vert[:, None, :]
    offsets = torch.tensor(list(slash_offsets), dtype=torch.long, device=seq_lens.device)
    slash = (lens - 1 - offsets).expand(-1, vert.shape[1], -1)
    pos = torch.cat([vert, slash], dim=-1)
    # pos >= S implies pos >= 0, pos < seq_len - W implies pos < seq_len (W >= 1).
    keep = (pos >= num_sinks) & (pos < lens - window)
    pos = torch.where(keep, pos, _SENTINEL).sort(dim=-1).values
    dup = torch.zeros_like(keep)
    dup[..., 1:] = pos[..., 1:] == pos[..., :-1]
    # A second sort packs the survivors to the front so the kernel loops `count` only.
    pos = torch.where(dup, _SENTINEL, pos).sort(dim=-1).values
    counts = (pos != _SENTINEL).sum(dim=-1)
    return pos.to(torch.int32).contiguous(), counts.to(torch.int32).contiguous()


def _launch(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_sinks: int,
    window: int,
    extra: tuple[torch.Tensor, torch.Tensor] | None,
    layout: KVLayout,
    out: torch.Tensor | None,
    block_n: int,
    num_warps: int,
    check_values: bool,
) -> torch.Tensor:
    k, v = to_nhd(key_cache, layout), to_nhd(value_cache, layout)
    check_attention_inputs(q, k, v, block_table, seq_lens, scale, block_n, INTERPRETED)
    out = output_like(q, out)
    if check_values:
        check_cache_values(k, block_table, seq_lens)
    num_seqs, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k.shape
    group = num_q_heads // num_kv_heads
    if num_seqs == 0:
        return out
    # Only the extra-position phase needs these; empty lists take the throttle path.
    has_extra = extra is not None and extra[0].shape[-1] > 0
    if has_extra:
        # Per-sequence verticals: stride 0 over heads, every KV head reads row 0.
        extra_pos = extra[0].expand(num_seqs, num_kv_heads, -1)
        counts = extra[1].expand(num_seqs, num_kv_heads)
    else:  # never read (HAS_EXTRA is off); any int32 tensors will do
        extra_pos, counts = seq_lens[:, None, None], seq_lens[:, None]
    _sparse_decode_kernel[(num_seqs, num_kv_heads)](
        q, k, v, out, block_table, seq_lens, extra_pos, counts,
        float(scale) * math.log2(math.e), num_sinks, window,
        q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1),
        block_table.stride(0), block_table.stride(1),
        extra_pos.stride(0), extra_pos.stride(1),
        counts.stride(0), counts.stride(1),
        BLOCK_SIZE=block_size,
        GROUP=group,
        HEAD_DIM=head_dim,
        G_PAD=max(MIN_DOT, triton.next_power_of_2(group)),
        D_PAD=max(MIN_DOT, triton.next_power_of_2(head_dim)),
        BLOCK_N=block_n,
        HAS_EXTRA=has_extra,
        DOT_FP32=INTERPRETED and q.dtype == torch.bfloat16,
        num_warps=num_warps,
    )  # fmt: skip
    return out


def _check_verticals(
    verticals: torch.Tensor, q: torch.Tensor, key_cache: torch.Tensor, layout: KVLayout
) -> None:
    num_kv_heads = to_nhd(key_cache, layout).shape[2]
    ok_shape = verticals.dim() == 2 or (verticals.dim() == 3 and verticals.shape[1] == num_kv_heads)
    if not ok_shape or verticals.shape[0] != q.shape[0]:
        raise ValueError(
            f"verticals must be [num_seqs={q.shape[0]}, K] or [num_seqs, num_kv_heads="
            f"{num_kv_heads}, K], got {tuple(verticals.shape)}"
        )
    if (
        verticals.dtype.is_floating_point
        or verticals.dtype.is_complex
        or verticals.dtype == torch.bool
    ):
        raise TypeError(f"verticals must be an integer tensor, got {verticals.dtype}")
    if verticals.device != q.device:
        raise ValueError(f"verticals is on {verticals.device}, q on {q.device}")
