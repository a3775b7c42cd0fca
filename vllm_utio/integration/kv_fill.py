"""Fused K/V fill of a span of skipped layers: one projection for every layer of the span.

A row that skips layers ``a..b-1`` has one frozen residual stream ``x`` for all of them,
so their K/V differ only in weights: ``kv_l = W_l (w_l * rms(x)) = (W_l diag(w_l)) rms(x)``
with ``W_l`` the layer's K/V projection and ``w_l`` its input-norm weight. Folding each
``w_l`` into ``W_l`` once at load leaves, per fill: one RMS normalisation without weight,
one GEMM over the span's concatenated folded weights, one RoPE over every layer's K heads
and, per layer, the backend impl's ``do_kv_cache_update`` (kept per layer so wrappers of
it, e.g. ``select``'s block summaries, see every write).

The per-layer path (:meth:`DecoderStack.skipped_kv`) stays the reference and the fallback
for spans whose layers differ in anything the fold relies on (:func:`build_span_fill`
says why). Rounding differs from it only where the weight is applied: per layer the
normalised stream times ``w_l`` is rounded to the model dtype before the GEMM, here
``W_l * w_l`` is rounded once at load (tests/test_kv_fill.py bounds the difference).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class SpanKVFill:
    """K/V of ``layers`` (consecutive skipped layers) from one frozen stream."""

    layers: tuple[int, ...]
    attns: list[Any]  # each layer's vLLM Attention module (cache, impl, layer_name)
    weight: torch.Tensor  # [2 * S * kv_size, hidden]: K of every layer, then V of every layer
    eps: float
    num_kv_heads: int
    head_size: int
    rotary: nn.Module  # the rotary embedding every layer of the span shares
    linear: Callable[[torch.Tensor], torch.Tensor]  # x @ weight.T on the platform's GEMM

    @property
    def layer_names(self) -> list[str]:
        return [attn.layer_name for attn in self.attns]

    def kv(self, positions: torch.Tensor, stream: torch.Tensor):
        """[(K post-RoPE, V)] per layer of the span, each ``[N, kv_heads, head_size]``."""
        from vllm import ir

        n, s = stream.shape[0], len(self.layers)
        kv_size = self.num_kv_heads * self.head_size
        # the same weightless normalisation the layer's RMSNorm applies before its weight
        normed = ir.ops.rms_norm(stream, None, self.eps)
        out = self.linear(normed)
        # RoPE treats the span's K as S * kv_heads heads (in place on the strided view)
        keys, _ = self.rotary(positions, out[:, : s * kv_size], None)
        shape = (n, self.num_kv_heads, self.head_size)
        return [
            (
                keys[:, j * kv_size : (j + 1) * kv_size].view(shape),
                out[:, (s + j) * kv_size : (s + j + 1) * kv_size].view(shape),
            )
            for j in range(s)
        ]

    def write(
        self, positions: torch.Tensor, stream: torch.Tensor, slot_mappings: Sequence[torch.Tensor]
    ) -> None:
        """Write every layer's K/V of the span for tokens whose frozen stream is ``stream``."""
        for attn, (k, v), slots in zip(
            self.attns, self.kv(positions, stream), slot_mappings, strict=True
        ):
            attn.impl.do_kv_cache_update(attn, k, v, attn.kv_cache, slots)


def build_span_fill(layers: Sequence[nn.Module], indices: Sequence[int]) -> SpanKVFill | str:
    """The fused fill of decoder layers ``indices``, or why the span cannot be fused."""
    if not indices:
        return "empty span"
    span = [layers[i] for i in indices]
    first = span[0]
    why = _why_not_fusable(span)
    if why:
        return why
    attn0 = first.self_attn
    hidden = first.input_layernorm.weight.shape[0]
    param = first.input_layernorm.weight
    with torch.no_grad():
        eye = torch.eye(hidden, dtype=param.dtype, device=param.device)
        k_parts, v_parts = [], []
        for layer in span:
            a = layer.self_attn
            # The CPU GEMM dispatch drops the weight tensor after packing it, so the weight
            # is read back through the layer's own GEMM: identity rows give W^T exactly.
            w_t = a.qkv_proj.quant_method.apply(a.qkv_proj, eye, None).float()
            scale = layer.input_layernorm.weight.float()[:, None]
            folded = (w_t[:, a.q_size :] * scale).t()  # [2 * kv_size, hidden]: K rows, V rows
            k_parts.append(folded[: a.kv_size])
            v_parts.append(folded[a.kv_size :])
        weight = torch.cat(k_parts + v_parts).to(param.dtype).contiguous()
    return SpanKVFill(
        layers=tuple(indices),
        attns=[layer.self_attn.attn for layer in span],
        weight=weight,
        eps=float(first.input_layernorm.variance_epsilon),
        num_kv_heads=int(attn0.attn.num_kv_heads),
        head_size=int(attn0.attn.head_size),
        rotary=attn0.rotary_emb,
        linear=_platform_linear(weight),
    )


def _why_not_fusable(span: Sequence[nn.Module]) -> str | None:
    from vllm.model_executor.layers.layernorm import RMSNorm
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    first = span[0]
    for layer in span:
        attn, norm = layer.self_attn, layer.input_layernorm
        if type(norm) is not RMSNorm or not norm.has_weight:
            return f"input norm {type(norm).__name__} is not a weighted plain RMSNorm"
        if getattr(norm, "variance_size_override", None) is not None:
            return "input norm normalises over part of the hidden size"
        if norm.variance_epsilon != first.input_layernorm.variance_epsilon:
            return "layers differ in the input norm's epsilon"
        if not isinstance(attn.qkv_proj.quant_method, UnquantizedLinearMethod):
            return f"qkv projection is {type(attn.qkv_proj.quant_method).__name__}"
        if attn.qkv_proj.bias is not None:
            return "qkv projection has a bias"
        if hasattr(attn, "k_norm") or hasattr(attn, "q_norm"):
            return "attention normalises K after the projection"
        if attn.rotary_emb is not first.self_attn.rotary_emb:
            return "layers use different rotary embeddings"
        same = ("q_size", "kv_size")
        if any(getattr(attn, a) != getattr(first.self_attn, a) for a in same):
            return "layers differ in attention sizes"
        inner = ("num_kv_heads", "head_size")
        if any(getattr(attn.attn, a) != getattr(first.self_attn.attn, a) for a in inner):
            return "layers differ in KV heads"
    return None


def _platform_linear(weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x @ weight.T`` through the GEMM vLLM picks for this platform and shape (on CPU,
    its packed oneDNN/SGL kernels; elsewhere torch's)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return lambda x: torch.nn.functional.linear(x, weight)
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    holder = nn.Module()
    holder.weight = nn.Parameter(weight, requires_grad=False)
    dispatch_cpu_unquantized_gemm(holder, remove_weight=False)
    return lambda x: holder.cpu_linear(x, holder.weight, None)
