"""Checks and helpers shared by the Triton kernels' wrappers (no kernels here, and no
Triton import: the package and its reference import this without deciding, by importing
Triton, whether kernels defined later are interpreted).

Every check in :func:`check_attention_inputs` reads only shapes, dtypes, devices and
strides, so it never synchronises with the device; :func:`check_cache_values` reads
values and does (wrappers call it only when asked to, never on hot paths).
"""

from __future__ import annotations

import math

import torch

DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)
MIN_DOT = 16  # tl.dot needs every dimension >= 16


def is_interpreted(kernel: object) -> bool:
    """Whether ``kernel`` was built for Triton's interpreter (TRITON_INTERPRET=1 when its
    module was imported): Triton decides at definition time, not per launch."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - interpreter module moved
        return False
    return isinstance(kernel, InterpretedFunction)


def check_runs_here(device: torch.device, interpreted: bool) -> None:
    """CPU tensors need interpreted kernels, CUDA tensors compiled ones."""
    if device.type == "cpu" and not interpreted:
        raise RuntimeError(
            "CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before "
            "vllm_utio.kernels' Triton modules are first imported"
        )


def output_like(q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``out`` checked against ``q`` (shape, dtype, device, unit last stride), or a new one."""
    if out is None:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(
            f"out must match q ({tuple(q.shape)}, {q.dtype}, {q.device}), got "
            f"({tuple(out.shape)}, {out.dtype}, {out.device})"
        )
    if out.stride(-1) != 1:
        raise ValueError(f"out must have a contiguous last dim, got strides {out.stride()}")
    return out


def check_attention_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    block_n: int,
    interpreted: bool,
) -> None:
    """Shapes, dtypes, devices and strides of a decode-attention call (NHD caches)."""
    if q.dim() != 3:
        raise ValueError(f"q must be [num_seqs, num_q_heads, head_dim], got {tuple(q.shape)}")
    if q.dtype not in DTYPES:
        raise TypeError(f"q dtype must be one of {DTYPES}, got {q.dtype}")
    num_seqs, num_q_heads, head_dim = q.shape
    for name, cache in (("key_cache", k), ("value_cache", v)):
        if cache.dtype != q.dtype:
            raise TypeError(f"{name} dtype {cache.dtype} != q dtype {q.dtype} (no KV quantization)")
        if cache.shape != k.shape:
            raise ValueError(f"key_cache {tuple(k.shape)} and value_cache {tuple(v.shape)} differ")
        if cache.shape[3] != head_dim:
            raise ValueError(f"{name} head_dim {cache.shape[3]} != q head_dim {head_dim}")
    num_kv_heads = k.shape[2]
    if num_kv_heads == 0 or num_q_heads % num_kv_heads:
        raise ValueError(
            f"num_q_heads {num_q_heads} is not a multiple of num_kv_heads {num_kv_heads}"
        )
    for name, t in (("q", q), ("key_cache", k), ("value_cache", v)):
        # Contiguous head_dim: the kernels address it with unit stride (vector loads).
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous head_dim, got strides {t.stride()}")
    if block_table.dim() != 2 or block_table.shape[0] != num_seqs:
        raise ValueError(
            f"block_table must be [num_seqs={num_seqs}, max_blocks], got {tuple(block_table.shape)}"
        )
    if seq_lens.dim() != 1 or seq_lens.shape[0] != num_seqs:
        raise ValueError(f"seq_lens must be [num_seqs={num_seqs}], got {tuple(seq_lens.shape)}")
    for name, t in (("block_table", block_table), ("seq_lens", seq_lens)):
        if t.dtype != torch.int32:
            raise TypeError(f"{name} must be int32 (as vLLM keeps it), got {t.dtype}")
    for name, t in (
        ("key_cache", k),
        ("value_cache", v),
        ("block_table", block_table),
        ("seq_lens", seq_lens),
    ):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    check_runs_here(q.device, interpreted)
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    if block_n < MIN_DOT or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= {MIN_DOT}, got {block_n}")


def check_cache_values(k: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor) -> None:
    """Sequence lengths and the block-table entries they use (synchronises)."""
    num_blocks, block_size = k.shape[0], k.shape[1]
    capacity = block_table.shape[1] * block_size
    if seq_lens.numel() and (int(seq_lens.min()) < 0 or int(seq_lens.max()) > capacity):
        raise ValueError(
            f"seq_lens must lie in [0, {capacity}] (block_table capacity), got {seq_lens.tolist()}"
        )
    used_blocks = (seq_lens.long() + block_size - 1) // block_size
    cols = torch.arange(block_table.shape[1], device=block_table.device)
    used = block_table[cols[None, :] < used_blocks[:, None]]
    if used.numel() and (int(used.min()) < 0 or int(used.max()) >= num_blocks):
        lo, hi = int(used.min()), int(used.max())
        raise ValueError(
            f"block_table entries in use must lie in [0, {num_blocks}), got {lo}..{hi}"
        )


def recent_blocks_max(block_size: int, recent_tokens: int) -> int:
    """The most blocks the last ``recent_tokens`` positions can span (last block >= 1 token),
    as :func:`vllm_utio.attention_policy` widens the window to whole blocks."""
    return 1 + -(-max(recent_tokens - 1, 0) // block_size)
