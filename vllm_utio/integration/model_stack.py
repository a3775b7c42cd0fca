"""The decoder stack of a vLLM Llama-family model, seen as layers UTIO can run one by one.

vLLM's ``LlamaModel.forward`` is: embed, ``h, res = layer(positions, h, res)`` for each
decoder layer, then ``norm(h, res)``. The true residual stream after a layer is
``h + res`` (the next layer's fused add+RMSNorm adds them). This adapter exposes those
pieces plus the one thing a skipped layer still owes the paged cache: K/V computed from
the frozen stream (input norm -> K/V projection -> RoPE -> the backend's cache write).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class UnsupportedModelError(RuntimeError):
    """The model's structure is not one UTIO's executor knows how to run."""


@dataclass
class DecoderStack:
    model: nn.Module  # the inner LlamaModel-like module
    layers: list[nn.Module]

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
        return self.layers[index](positions, hidden, residual)

    def final_norm(self, hidden, residual) -> torch.Tensor:
        out, _ = self.model.norm(hidden, residual)
        return out

    def write_skipped_kv(
        self, index: int, positions: torch.Tensor, stream: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        """Write layer ``index``'s K/V for tokens whose residual stream is ``stream``."""
        layer = self.layers[index]
        attn_mod = layer.self_attn
        normed = layer.input_layernorm(stream)
        qkv, _ = attn_mod.qkv_proj(normed)
        q, k, v = qkv.split([attn_mod.q_size, attn_mod.kv_size, attn_mod.kv_size], dim=-1)
        _, k = attn_mod.rotary_emb(positions, q, k)
        attn = attn_mod.attn
        attn.impl.do_kv_cache_update(
            attn,
            k.reshape(-1, attn.num_kv_heads, attn.head_size),
            v.reshape(-1, attn.num_kv_heads, attn.head_size),
            attn.kv_cache,
            slot_mapping,
        )

    @contextmanager
    def capture_attention(self, index: int, sink: dict[str, Any]):
        """Record the attention module's value input and output at layer ``index``."""
        attn = self.layers[index].self_attn.attn

        def hook(_module, args, output):
            sink["value"] = args[2]
            sink["output"] = output

        handle = attn.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def num_kv_heads(self) -> int:
        return int(self.layers[0].self_attn.attn.num_kv_heads)
