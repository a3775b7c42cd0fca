"""Random paged KV caches in vLLM 0.32's FlashAttention layout, for tests and benchmarks.

A layer's cache is one tensor ``[num_blocks, num_kv_heads, block_size, 2 * head_dim]``
(K then V in the last dim); the kernels read its strided NHD views
(:func:`~vllm_utio.kernels.reference.split_vllm_kv_cache`), as vLLM's backend does.
Blocks are scattered (a random permutation), the block table has spare columns that
point at a block no sequence owns, and slots no sequence owns can be filled with loud
garbage so that a kernel reading one shows up in a comparison.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_utio.kernels.reference import split_vllm_kv_cache


@dataclass
class PagedCase:
    """One decode query per sequence over a paged cache."""

    q: torch.Tensor  # [num_seqs, num_q_heads, head_dim]
    kv_cache: torch.Tensor  # [num_blocks, num_kv_heads, block_size, 2 * head_dim]
    key_cache: torch.Tensor  # NHD view [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor
    block_table: torch.Tensor  # int32 [num_seqs, table_width]
    seq_lens: torch.Tensor  # int32 [num_seqs]
    lens: list[int]

    @property
    def block_size(self) -> int:
        return self.kv_cache.shape[2]

    @property
    def num_kv_heads(self) -> int:
        return self.kv_cache.shape[1]


def make_paged_case(
    lens: list[int],
    *,
    num_q_heads: int = 8,
    num_kv_heads: int = 2,
    head_dim: int = 64,
    block_size: int = 16,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    spare_columns: int = 1,
    garbage: float = 0.0,
) -> PagedCase:
    """Sequences of ``lens`` tokens in scattered blocks; ``garbage > 0`` fills every slot
    no sequence owns with ``garbage * randn`` (tests), 0 leaves plain ``randn``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    counts = [-(-n // block_size) for n in lens]
    num_blocks = sum(counts) + 1  # the last block: what spare table columns point at
    shape = (num_blocks, num_kv_heads, block_size, 2 * head_dim)
    kv_cache = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    physical = torch.randperm(num_blocks, generator=gen, device=device).to(torch.int32)
    width = max(counts, default=0) + spare_columns
    table = torch.full((len(lens), max(width, 1)), 0, dtype=torch.int32, device=device)
    table[:] = physical[-1]
    start = 0
    owned = torch.zeros((num_blocks, block_size), dtype=torch.bool, device=device)
    for row, (n, c) in enumerate(zip(lens, counts, strict=True)):
        mine = physical[start : start + c]
        table[row, :c] = mine
        start += c
        if c:
            owned[mine[:-1].long()] = True
            owned[mine[-1].long(), : n - block_size * (c - 1)] = True
    if garbage > 0:
        noise = garbage * torch.randn(shape, generator=gen, device=device, dtype=dtype)
        free = ~owned[:, None, :, None]  # broadcast over heads and channels
        kv_cache = torch.where(free, noise, kv_cache)
    q = torch.randn((len(lens), num_q_heads, head_dim), generator=gen, device=device)
    key_cache, value_cache = split_vllm_kv_cache(kv_cache, head_dim)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    return PagedCase(q.to(dtype), kv_cache, key_cache, value_cache, table, seq_lens, list(lens))
