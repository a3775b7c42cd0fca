"""Per-block key summaries for query-aware selection, folded in place on the device.

Layout and semantics are :class:`vllm_utio.kv_selection.BlockSummaries`' (the spec): per
KV head and physical block, ``[max | -min]`` of the block's keys along the channels, a
layer's tensor ``[num_kv_heads, num_blocks, 2 * head_dim]``; padding slots (``< 0``) are
not written; a write at a block's first slot starts the block over (a recycled block
forgets its previous owner).

One program per written token, no atomics: the *first* token of each run of consecutive
tokens writing the same block (a "leader") folds the whole run (at most ``block_size``
tokens) into the block's summary, starting from ``-inf`` when the run contains the
block's first slot, and stores it. Correct when the tokens writing one block are
adjacent in the batch, which vLLM's slot mapping guarantees (a request's tokens are
contiguous and in position order; two requests never write one block in a step).

The summary dtype may be the keys' (bf16/fp16: the min and max of stored keys are
exactly representable, so the bound stays a bound) or float32 (the spec's choice); in
the cache dtype they cost half the bytes to read when scoring.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_utio.kernels.common import check_runs_here, is_interpreted


@triton.jit
def _fold_kernel(
    packed_ptr, keys_ptr, slots_ptr, num_tokens,
    stride_ph, stride_pb, stride_kt, stride_kh,
    BLOCK_SIZE: tl.constexpr, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    H_PAD: tl.constexpr, D_PAD: tl.constexpr,
):  # fmt: skip
    tok = tl.program_id(0)
    slot = tl.load(slots_ptr + tok)
    block = tl.where(slot >= 0, slot, 0) // BLOCK_SIZE
    prev = tl.load(slots_ptr + tok - 1, mask=tok > 0, other=-1)
    prev_block = tl.where(prev >= 0, prev, 0) // BLOCK_SIZE
    lead = (slot >= 0) & ((prev < 0) | (prev_block != block))
    offs_h = tl.arange(0, H_PAD)
    offs_d = tl.arange(0, D_PAD)
    hd_mask = (offs_h < HEADS)[:, None] & (offs_d < HEAD_DIM)[None, :]
    kmax = tl.full([H_PAD, D_PAD], float("-inf"), dtype=tl.float32)
    kmin = tl.full([H_PAD, D_PAD], float("inf"), dtype=tl.float32)
    fresh = slot < 0  # False for leaders; set when the run writes the block's first slot
    alive = lead
    # non-leaders loop zero times: their run is folded by its leader
    for i in range(0, tl.where(lead, BLOCK_SIZE, 0)):
        t = tok + i
        s = tl.load(slots_ptr + t, mask=t < num_tokens, other=-1)
        alive = alive & (s >= 0) & (tl.where(s >= 0, s, 0) // BLOCK_SIZE == block)
        fresh = fresh | (alive & (s % BLOCK_SIZE == 0))
        key = tl.load(
            keys_ptr + t.to(tl.int64) * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :],
            mask=tl.where(alive, hd_mask, False),
            other=0.0,
        ).to(tl.float32)
        kmax = tl.where(alive, tl.maximum(kmax, key), kmax)
        kmin = tl.where(alive, tl.minimum(kmin, key), kmin)
    row = packed_ptr + block.to(tl.int64) * stride_pb + offs_h[:, None] * stride_ph
    # (tl.where, not `&`, with scalar conditions: the interpreter mis-types the latter)
    store_mask = tl.where(lead, hd_mask, False)
    load_mask = tl.where(fresh, False, store_mask)
    old_max = tl.load(row + offs_d[None, :], mask=load_mask, other=float("-inf"))
    old_neg_min = tl.load(row + HEAD_DIM + offs_d[None, :], mask=load_mask, other=float("-inf"))
    new_max = tl.maximum(old_max.to(tl.float32), kmax)
    new_neg_min = tl.maximum(old_neg_min.to(tl.float32), -kmin)
    dtype = packed_ptr.dtype.element_ty
    tl.store(row + offs_d[None, :], new_max.to(dtype), mask=store_mask)
    tl.store(row + HEAD_DIM + offs_d[None, :], new_neg_min.to(dtype), mask=store_mask)


INTERPRETED: bool = is_interpreted(_fold_kernel)


def fold_block_summaries(
    packed: torch.Tensor, keys: torch.Tensor, slots: torch.Tensor, block_size: int
) -> None:
    """Fold keys ``[T, num_kv_heads, head_dim]`` written at cache ``slots`` ``[T]`` into one
    layer's summaries ``packed`` ``[num_kv_heads, num_blocks, 2 * head_dim]`` in place.

    No host synchronisation: padding slots are masked in the kernel. The summaries'
    dtype must be the keys' or float32 (both hold the keys' min/max exactly).
    """
    check_runs_here(keys.device, INTERPRETED)
    if keys.dim() != 3 or packed.dim() != 3:
        raise ValueError(
            f"keys must be [T, kv_heads, D] and packed [kv_heads, blocks, 2D], got "
            f"{tuple(keys.shape)} and {tuple(packed.shape)}"
        )
    tokens, heads, dim = keys.shape
    if packed.shape[0] != heads or packed.shape[2] != 2 * dim:
        raise ValueError(f"packed {tuple(packed.shape)} does not fit keys {tuple(keys.shape)}")
    if packed.dtype not in (keys.dtype, torch.float32):
        raise TypeError(f"summaries dtype {packed.dtype} must be float32 or the keys' {keys.dtype}")
    int_slots = slots.dtype in (torch.int32, torch.int64)
    if slots.dim() != 1 or slots.shape[0] != tokens or not int_slots:
        raise ValueError(f"slots must be int32/int64 [T={tokens}], got {tuple(slots.shape)}")
    if keys.stride(-1) != 1 or packed.stride(-1) != 1:
        raise ValueError("keys and packed must have a contiguous last dim")
    for name, t in (("packed", packed), ("slots", slots)):
        if t.device != keys.device:
            raise ValueError(f"{name} is on {t.device}, keys on {keys.device}")
    if tokens == 0:
        return
    _fold_kernel[(tokens,)](
        packed, keys, slots, tokens,
        packed.stride(0), packed.stride(1), keys.stride(0), keys.stride(1),
        BLOCK_SIZE=block_size, HEADS=heads, HEAD_DIM=dim,
        H_PAD=triton.next_power_of_2(heads), D_PAD=triton.next_power_of_2(dim),
    )  # fmt: skip
