"""Sparse decode attention over vLLM's paged KV cache: Triton kernels and their torch spec.

* :mod:`vllm_utio.kernels.reference`: pure torch, the semantics (throttle and vslash
  position sets, a dense softmax over exactly those positions). Needs no Triton.
* :mod:`vllm_utio.kernels.sparse_decode`: the Triton kernels and their wrappers.

The Triton names are imported lazily, so importing this package (or the reference)
does not import Triton nor build the kernels: Triton decides at kernel definition
time whether to interpret them (``TRITON_INTERPRET=1``), so that choice is made when
:mod:`~vllm_utio.kernels.sparse_decode` is first imported.
See ``kernels/README.md`` at the repository root for what is and is not tested.
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

_TRITON_NAMES = ("extra_positions", "throttle_decode_attention", "vslash_decode_attention")

__all__ = [
    "extra_positions",
    "gather_sequence",
    "positions_mask",
    "sparse_decode_attention_ref",
    "split_vllm_kv_cache",
    "throttle_decode_attention",
    "throttle_mask",
    "throttle_positions",
    "to_nhd",
    "vslash_decode_attention",
    "vslash_mask",
    "vslash_positions",
]


def __getattr__(name: str) -> Any:
    if name in _TRITON_NAMES:
        return getattr(importlib.import_module("vllm_utio.kernels.sparse_decode"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
