"""Sparse decode attention over vLLM's paged KV cache: Triton kernels and their torch spec.

Imports nothing from vLLM (the GPU benchmark runs with torch and triton alone).

* :mod:`~vllm_utio.kernels.reference`: pure torch, the semantics: token-granular
  throttle/vslash position sets, block-granular selections (ranges, vslash blocks, the
  per-KV-head query-aware choice), a dense softmax over exactly the selected positions.
* :mod:`~vllm_utio.kernels.selection`: the kernels' selection input (implicit ranges or
  fixed-size block lists + counts).
* Triton: :mod:`~vllm_utio.kernels.decode_attention` (split-KV attention over selected
  blocks + the combine), :mod:`~vllm_utio.kernels.block_lists` (vslash lists),
  :mod:`~vllm_utio.kernels.block_summaries` (the in-place min/max fold),
  :mod:`~vllm_utio.kernels.block_select` (Quest bounds + top-k),
  :mod:`~vllm_utio.kernels.decoder` (a policy all in, buffers preallocated), and
  :mod:`~vllm_utio.kernels.sparse_decode` (the earlier token-granular kernel).
* :mod:`~vllm_utio.kernels.paged_cases`: random paged caches for tests and benchmarks.

Triton modules are imported lazily, so importing this package (or the reference) does
not import Triton nor build the kernels: Triton decides at kernel definition time
whether to interpret them (``TRITON_INTERPRET=1``), so that choice is made when a
Triton module is first imported. ``kernels/README.md`` at the repository root says what
is and is not tested.
"""

from __future__ import annotations

import importlib
from typing import Any

from vllm_utio.kernels.reference import (
    gather_sequence,
    positions_mask,
    sparse_decode_attention_ref,
    split_vllm_kv_cache,
    throttle_mask,
    throttle_positions,
    to_nhd,
    vslash_mask,
    vslash_positions,
)
from vllm_utio.kernels.selection import DENSE, BlockLists, BlockRanges

_TRITON_NAMES = {
    "extra_positions": "sparse_decode",
    "throttle_decode_attention": "sparse_decode",
    "vslash_decode_attention": "sparse_decode",
    "paged_decode_attention": "decode_attention",
    "KernelConfig": "decode_attention",
    "SplitWorkspace": "decode_attention",
    "choose_num_splits": "decode_attention",
    "vslash_block_lists": "block_lists",
    "fold_block_summaries": "block_summaries",
    "block_scores": "block_select",
    "topk_block_lists": "block_select",
    "SparseDecoder": "decoder",
    "DecodeShape": "decoder",
    "Dense": "decoder",
    "Throttle": "decoder",
    "Vslash": "decoder",
    "QueryAware": "decoder",
}

__all__ = [
    *_TRITON_NAMES,
    "BlockLists",
    "BlockRanges",
    "DENSE",
    "gather_sequence",
    "positions_mask",
    "sparse_decode_attention_ref",
    "split_vllm_kv_cache",
    "throttle_mask",
    "throttle_positions",
    "to_nhd",
    "vslash_mask",
    "vslash_positions",
]


def __getattr__(name: str) -> Any:
    if name in _TRITON_NAMES:
        module = importlib.import_module(f"vllm_utio.kernels.{_TRITON_NAMES[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
