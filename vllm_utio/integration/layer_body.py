"""A decoder layer's body as compiled code, one graph shared by every layer of the loop.

vLLM on CPU compiles its whole model as one graph (dynamo traced once, inductor): there
are no per-layer compiled pieces to reuse, and UTIO's layer loop runs each layer on a
sub-batch whose size changes every step. Eagerly, every norm, RoPE and activation then
runs as vLLM's unfused native ops (its custom ops are off when it compiles), which is
most of the loop's overhead at small batches. Here a Llama decoder layer is split at its
attention call:

- ``pre``: input norm (fused residual add), QKV projection, RoPE;
- attention: vLLM's ``Attention`` module, called eagerly, so it reads the forward context
  the loop swaps per sub-batch, and wrappers of its impl (``select``, ``decode_kernel``)
  and forward hooks (attention capture) work as in vLLM's model;
- ``post``: output projection, post-attention norm, MLP.

``between`` is one layer's ``post`` and the next layer's ``pre`` in one graph, so a run
of layers on the same rows (the executor's segment) costs one compiled call per layer.
The pieces are ``torch.compile``d with dynamic token counts. The layer module is an
argument: dynamo inlines ``nn.Module``s, so parameters are graph inputs, not constants,
and all layers share one graph per piece (per size class). Layers whose class changes
the Llama forward, or that differ from each other, run eagerly (``why_not_compiled``).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from vllm_utio.log import get_logger

logger = get_logger(__name__)


def _pre_attention(layer: nn.Module, positions, hidden, residual):
    if residual is None:  # layer 0: the embedding is the residual stream
        residual = hidden
        hidden = layer.input_layernorm(hidden)
    else:
        hidden, residual = layer.input_layernorm(hidden, residual)
    attn = layer.self_attn
    qkv, _ = attn.qkv_proj(hidden)
    q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    q, k = attn.rotary_emb(positions, q, k)
    return q, k, v, residual


def _post_attention(layer: nn.Module, attn_out, residual):
    out, _ = layer.self_attn.o_proj(attn_out)
    hidden, residual = layer.post_attention_layernorm(out, residual)
    return layer.mlp(hidden), residual


def _between_attentions(layer: nn.Module, after: nn.Module, positions, attn_out, residual):
    """``layer``'s post and the next layer's pre in one graph (one call, not two)."""
    hidden, residual = _post_attention(layer, attn_out, residual)
    return _pre_attention(after, positions, hidden, residual)


def why_not_compiled(layers: list[nn.Module]) -> str | None:
    """Why these layers cannot run as ``pre`` + attention + ``post`` (None: they can)."""
    from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer

    first = layer_signature(layers[0])
    for i, layer in enumerate(layers):
        if type(layer).forward is not LlamaDecoderLayer.forward:
            return f"decoder layer {i} ({type(layer).__name__}) has its own forward"
        if type(layer.self_attn).forward is not LlamaAttention.forward:
            return f"layer {i}'s attention ({type(layer.self_attn).__name__}) has its own forward"
        if layer_signature(layer) != first:
            return f"layer {i} differs from layer 0 in its modules' types, sizes or settings"
    return None


def layer_signature(layer: nn.Module) -> list[tuple]:
    """What a compiled graph of ``layer`` bakes in: each submodule's type, its parameters'
    and buffers' shapes and dtypes, and its plain settings (sizes, epsilons, flags).
    Names and the attention module (called outside the graphs) are left out."""
    from vllm.model_executor.layers.attention import Attention

    out = []
    for name, module in layer.named_modules():
        if isinstance(module, Attention):
            continue
        tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        shapes = [(n, tuple(t.shape), t.dtype) for n, t in tensors]
        plain = sorted(
            (k, v)
            for k, v in vars(module).items()
            if isinstance(v, int | float | bool | tuple) and not k.startswith("_")
        )
        out.append((name, type(module), shapes, plain))
    return out


class CompiledLayerBody:
    """Decoder layers with their attention-free parts compiled; see the module doc."""

    def __init__(self, backend: str) -> None:
        # No guards on the layer modules: dynamo would check every parameter and setting
        # of a layer at each call (~12 us of ~50 here); ``why_not_compiled`` checked once
        # that all layers have the same structure, which is all the graphs depend on
        # (parameters are inputs), and tests compare layers other than the warmed-up ones.
        options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}

        def compiled(fn):
            return torch.compile(fn, dynamic=True, backend=backend, options=options)

        self._pre = compiled(_pre_attention)
        self._post = compiled(_post_attention)
        self._between = compiled(_between_attentions)
        self.calls = 0  # layer runs through the compiled pieces (tests read it)

    def run_layers(self, layers: list[nn.Module], positions, hidden, residual):
        """Consecutive ``layers`` on the same tokens: pre, then per layer attention and
        the compiled piece up to the next attention (``post`` after the last)."""
        if torch.is_inference_mode_enabled() and not positions.is_inference():
            # a slice of vLLM's persistent positions buffer is a normal tensor, a gathered
            # one an inference tensor: dynamo guards on that, so give it one kind
            positions = positions.clone()
        q, k, v, residual = self._pre(layers[0], positions, hidden, residual)
        for i, layer in enumerate(layers):
            out = layer.self_attn.attn(q, k, v)
            if i + 1 < len(layers):
                q, k, v, residual = self._between(layer, layers[i + 1], positions, out, residual)
        self.calls += len(layers)
        return self._post(layers[-1], out, residual)

    def warm_up(self, layers: list[nn.Module], dtype: torch.dtype, device: Any) -> float:
        """Compile every graph a step can need (layer 0 without a residual, later layers
        with one; 1 token and many, as dynamo specialises size 1), without attention.
        Returns the seconds it took."""
        t0 = time.perf_counter()
        hidden_size = layers[0].input_layernorm.weight.shape[0]
        attn = layers[0].self_attn
        width = attn.attn.num_heads * attn.attn.head_size
        with torch.inference_mode():
            for n in (1, 2):
                positions = torch.arange(n, device=device)
                hidden = torch.zeros(n, hidden_size, dtype=dtype, device=device)
                for layer, residual in ((layers[0], None), (layers[-1], hidden.clone())):
                    self._pre(layer, positions, hidden, residual)
                out = torch.zeros(n, width, dtype=dtype, device=device)
                self._post(layers[-1], out, hidden.clone())
                self._between(layers[0], layers[-1], positions, out, hidden.clone())
        return time.perf_counter() - t0


def make_layer_body(
    layers: list[nn.Module], mode: str, vllm_config: Any
) -> CompiledLayerBody | None:
    """The loop's compiled body for ``layer_loop`` ``mode``, or None (eager layers).

    'auto' compiles where vLLM compiles its own model (not with ``enforce_eager``), with
    vLLM's compile backend; 'compiled' always compiles (inductor unless vLLM set one)."""
    from vllm.config import CompilationMode

    if mode == "eager":
        return None
    compilation = vllm_config.compilation_config
    vllm_compiles = compilation.mode != CompilationMode.NONE
    if mode == "auto" and not vllm_compiles:
        return None
    why = why_not_compiled(layers)
    if why is not None:
        logger.warning("UTIO: the layer loop runs eagerly: %s", why)
        return None
    backend = compilation.backend if vllm_compiles and compilation.backend else "inductor"
    return CompiledLayerBody(backend)
