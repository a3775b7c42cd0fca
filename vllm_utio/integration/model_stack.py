"""The decoder stack of a vLLM Llama-family model, seen as layers UTIO can run one by one.

vLLM's ``LlamaModel.forward`` is: embed, ``h, res = layer(positions, h, res)`` for each
decoder layer, then ``norm(h, res)``. The true residual stream after a layer is
``h + res`` (the next layer's fused add+RMSNorm adds them). This adapter exposes those
pieces plus the one thing a skipped layer still owes the paged cache: K/V computed from
the frozen stream (input norm -> K/V projection -> RoPE -> the backend's cache write; per
layer here, for a whole span at once in :mod:`.kv_fill`), and reading a layer's cached K
back (for the vslash policy's vertical estimate).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vllm_utio.integration.kv_fill import SpanKVFill, build_span_fill
from vllm_utio.integration.layer_body import CompiledLayerBody


class UnsupportedModelError(RuntimeError):
    """The model's structure is not one UTIO's executor knows how to run."""


@dataclass
class DecoderStack:
    model: nn.Module  # the inner LlamaModel-like module
    layers: list[nn.Module]
    # runs a segment of layers as one compiled graph (None: the layer modules
    # themselves, eagerly); see layer_body
    body: CompiledLayerBody | None = None
    # learned K positions within a cache block, per (cache shape, dtype); see key_offsets
    _key_offsets: dict[tuple, torch.Tensor | None] = field(default_factory=dict, repr=False)

    @classmethod
    def from_causal_lm(cls, causal_lm: nn.Module) -> DecoderStack:
        inner = getattr(causal_lm, "model", None)
        needed = ("layers", "norm", "embed_input_ids")
        if inner is None or not all(hasattr(inner, a) for a in needed):
            raise UnsupportedModelError(
                f"UTIO supports Llama-style decoder models (model.layers, model.norm, "
                f"embed_input_ids); {type(causal_lm).__name__} does not have that structure"
            )
        layers = list(inner.layers)
        if getattr(inner, "start_layer", 0) != 0 or getattr(inner, "end_layer", len(layers)) != len(
            layers
        ):
            raise UnsupportedModelError("UTIO does not support pipeline parallelism")
        for i, layer in enumerate(layers):
            attn = getattr(layer, "self_attn", None)
            if (
                attn is None
                or not all(
                    hasattr(attn, a)
                    for a in ("qkv_proj", "rotary_emb", "attn", "q_size", "kv_size")
                )
                or not hasattr(layer, "input_layernorm")
            ):
                raise UnsupportedModelError(
                    f"decoder layer {i} ({type(layer).__name__}) lacks the Llama attention "
                    "structure (self_attn.qkv_proj/rotary_emb/attn, input_layernorm)"
                )
        return cls(inner, layers)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def layer_name(self, index: int) -> str:
        return self.layers[index].self_attn.attn.layer_name

    def embed(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None):
        return inputs_embeds if inputs_embeds is not None else self.model.embed_input_ids(input_ids)

    def run_layer(self, index: int, positions, hidden, residual):
        return self.run_layers(range(index, index + 1), positions, hidden, residual)

    def run_layers(self, indices: range, positions, hidden, residual):
        """Consecutive layers ``indices`` on the same tokens (one call of the compiled
        body: a graph per segment length)."""
        if self.body is not None:
            return self.body.run_layers(self.layers, indices, positions, hidden, residual)
        for i in indices:
            hidden, residual = self.layers[i](positions, hidden, residual)
        return hidden, residual

    def final_norm(self, hidden, residual) -> torch.Tensor:
        out, _ = self.model.norm(hidden, residual)
        return out

    def skipped_kv(
        self, index: int, positions: torch.Tensor, stream: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``index``'s K (post-RoPE) and V, ``[N, kv_heads, head_size]``, for tokens
        whose residual stream is ``stream``: the per-layer reference of the fused fill."""
        layer = self.layers[index]
        attn_mod = layer.self_attn
        normed = layer.input_layernorm(stream)
        qkv, _ = attn_mod.qkv_proj(normed)
        q, k, v = qkv.split([attn_mod.q_size, attn_mod.kv_size, attn_mod.kv_size], dim=-1)
        _, k = attn_mod.rotary_emb(positions, q, k)
        attn = attn_mod.attn
        shape = (-1, attn.num_kv_heads, attn.head_size)
        return k.reshape(shape), v.reshape(shape)

    def write_kv(
        self, index: int, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        """Write K/V into layer ``index``'s paged cache through the backend's own op."""
        attn = self.layers[index].self_attn.attn
        attn.impl.do_kv_cache_update(attn, key, value, attn.kv_cache, slot_mapping)

    def write_skipped_kv(
        self, index: int, positions: torch.Tensor, stream: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        """Write layer ``index``'s K/V for tokens whose residual stream is ``stream``."""
        self.write_kv(index, *self.skipped_kv(index, positions, stream), slot_mapping)

    def span_fill(self, indices: range) -> SpanKVFill | str:
        """The fused K/V fill of skipped layers ``indices`` (one projection for all), or
        why they cannot share one (the per-layer path then fills them)."""
        return build_span_fill(self.layers, list(indices))

    @contextmanager
    def capture_attention(self, index: int, sink: dict[str, Any]):
        """Record the attention module's value input and output at layer ``index``."""
        attn = self.layers[index].self_attn.attn

        def hook(_module, args, output):
            sink["query"] = args[0]  # post-RoPE, [tokens, num_heads * head_size]
            sink["value"] = args[2]
            sink["output"] = output

        handle = attn.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def num_kv_heads(self) -> int:
        return int(self.layers[0].self_attn.attn.num_kv_heads)

    def attention_scale(self, index: int) -> float:
        return float(self.layers[index].self_attn.attn.impl.scale)

    def read_keys(self, index: int, block_ids: torch.Tensor) -> torch.Tensor | None:
        """Layer ``index``'s cached K of physical blocks ``block_ids`` (any shape ``S``).

        Returns ``[*S, block_size, num_kv_heads, head_size]`` in the cache dtype (a
        permuted view when the backend stores K in another axis order), or None when the
        cache layout could not be learned (see :func:`key_offsets`). Copies only K.
        """
        attn = self.layers[index].self_attn.attn
        cache = attn.kv_cache
        key = (tuple(cache.shape), cache.dtype)
        if key not in self._key_offsets:
            self._key_offsets[key] = key_offsets(attn, cache)
        offsets = self._key_offsets[key]
        if offsets is None:
            return None
        ids = block_ids.to(cache.device, torch.long)
        strides = affine_strides(offsets)
        if strides is None or not cache[0].is_contiguous():
            flat = cache[ids.reshape(-1)].reshape(ids.numel(), -1)
            return flat[:, offsets.reshape(-1).to(cache.device)].reshape(*ids.shape, *offsets.shape)
        start, steps = strides
        view = cache.as_strided(
            (cache.shape[0], *offsets.shape),
            (cache.stride(0), *steps),
            cache.storage_offset() + start,
        )
        # gather in the storage's own axis order (contiguous runs), then view it logically
        order = sorted(range(3), key=lambda axis: -steps[axis])
        native = view.permute(0, *(1 + a for a in order))[ids]
        lead = list(range(ids.dim()))
        return native.permute(*lead, *(ids.dim() + order.index(a) for a in range(3)))


def affine_strides(offsets: torch.Tensor) -> tuple[int, tuple[int, int, int]] | None:
    """(start, strides) if ``offsets[t, h, d] = start + t*s0 + h*s1 + d*s2``, else None."""
    start = int(offsets[0, 0, 0])
    steps = tuple(
        int(offsets[tuple(int(a == axis) for a in range(3))]) - start
        if offsets.shape[axis] > 1
        else 0
        for axis in range(3)
    )
    grids = torch.meshgrid(*(torch.arange(n) for n in offsets.shape), indexing="ij")
    want = start + sum(g * st for g, st in zip(grids, steps, strict=True))
    if min(steps) < 0 or not torch.equal(want, offsets):
        return None
    s0, s1, s2 = steps
    return start, (s0, s1, s2)


def offsets_shape(attn: Any, cache: torch.Tensor) -> tuple[int, int, int]:
    """(block_size, num_kv_heads, head_size) of one block of ``cache`` (K half)."""
    heads, dim = int(attn.num_kv_heads), int(attn.head_size)
    per_block = cache[0].numel()
    if per_block % (2 * heads * dim):
        raise UnsupportedModelError(
            f"KV-cache block of {per_block} elements is not K and V of {heads} heads x {dim}"
        )
    return per_block // (2 * heads * dim), heads, dim


def key_offsets(attn: Any, cache: torch.Tensor) -> torch.Tensor | None:
    """``[block_size, heads, dim]``: where K[t, h, d] sits in a flattened block, or None
    (:func:`cache_offsets` of the keys)."""
    return cache_offsets(attn, cache, value=False)


def cache_offsets(attn: Any, cache: torch.Tensor, value: bool) -> torch.Tensor | None:
    """``[block_size, heads, dim]``: where K[t, h, d] (V with ``value``) sits in a
    flattened block, or None.

    The CPU backend packs blocks per ISA (on this machine's "vec" ISA, K is stored
    ``[head, dim, token]``), so instead of assuming a layout we write known values into a
    scratch block through the backend's own cache-write op and see where they land.
    Values are written as base-64 digits (exact in fp16/bf16) over a few passes; a
    quantized cache (fp8) does not round-trip (or cannot be written so) and gives None.
    """
    block_size, heads, dim = offsets_shape(attn, cache)
    n = block_size * heads * dim
    code = torch.arange(n)
    found = torch.zeros(cache[0].numel(), dtype=torch.long)
    is_ours = torch.ones_like(found, dtype=torch.bool)
    base, scale = 64, 1
    while scale < n:
        digit = (code // scale) % base + 1  # 1..64; 0 marks a slot the write left alone
        scratch = torch.zeros((1, *cache.shape[1:]), dtype=cache.dtype, device=cache.device)
        k = digit.reshape(block_size, heads, dim).to(cache.dtype).to(cache.device)
        written = (torch.zeros_like(k), k) if value else (k, torch.zeros_like(k))
        slots = torch.arange(block_size, device=cache.device)
        try:
            attn.impl.do_kv_cache_update(attn, *written, scratch, slots)
        except (RuntimeError, NotImplementedError, ValueError):
            return None  # e.g. a cache dtype the plain write does not support
        got = scratch.reshape(-1).float().cpu()
        is_ours &= got > 0
        found += (got.round().long() - 1).clamp(min=0) * scale
        scale *= base
    where = torch.nonzero(is_ours).reshape(-1)
    codes = found[where]
    if len(where) != n or not torch.equal(torch.sort(codes).values, code):
        return None
    offsets = torch.empty(n, dtype=torch.long)
    offsets[codes] = where
    return offsets.reshape(block_size, heads, dim)
