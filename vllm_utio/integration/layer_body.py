"""Runs of decoder layers as compiled code: one graph per segment length, shared by all
segments of that length.

vLLM on CPU compiles its whole model as one graph (dynamo traced once, inductor): there
are no per-layer compiled pieces to reuse, and UTIO's layer loop runs segments of layers
(consecutive layers on the same rows, see the executor) on sub-batches whose size changes
every step. Eagerly, every norm, RoPE and activation runs as vLLM's unfused native ops
(its custom ops are off when it compiles), and per-call overheads add up layer by layer.

A segment is traced as the Llama layer code (input norm, QKV, RoPE; attention; output
projection, post-attention norm, MLP) for each of its layers, in one graph:

- The layer modules are arguments: dynamo inlines ``nn.Module``s, so parameters are graph
  inputs, not constants, and every segment of the same length shares one graph (per size
  class: dynamo specialises 1 token, and a segment from layer 0 has no residual yet).
- Attention is one opaque op, ``utio::layer_attention(q, k, v, key)``, whose key tensor
  names the layer's vLLM ``Attention`` module in a registry. At run time it does what
  that module's forward does on this path (the K/V cache write and the backend impl's
  forward, with the layer's metadata and slots from the forward context the loop swaps
  per sub-batch) without the module call and vLLM's two op dispatches around it: those
  cost ~20 us per layer here. Wrappers of the impl (``select``, ``decode_kernel``) work
  unchanged; a layer with a forward hook (attention capture, fill timing), or one whose
  forward does more (query quantisation, a shared KV cache, a KV connector), is called
  as a module. vLLM's own attention op names its layer by a string that dynamo bakes
  into the graph (a value guard per layer): it cannot be shared.

Per segment the loop then makes one call, not one per layer: after its first call (at
engine load) a segment's graph runs through dynamo's transformed bytecode, called
directly with no guards, as vLLM calls its own model. Layers whose class changes the
Llama forward, or that differ from each other, run eagerly (``why_not_compiled``).
"""

from __future__ import annotations

import contextlib
import itertools
import time
import types
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _torch_module

from vllm_utio.log import get_logger

logger = get_logger(__name__)

# key -> the vLLM Attention module it names (weak: an engine's model owns its modules)
_ATTENTION: dict[int, weakref.ref] = {}
_NEXT_KEY = itertools.count()
_STUB = {"on": False}  # warm-up and tests: attention returns a copy of the query
_LIBRARY: Any = None  # torch.library.Library holding the op (must stay alive)
_VLLM: dict[str, Callable] = {}  # vLLM functions the op calls (imported with the op)
ATTENTION_CALLS = {"direct": 0, "module": 0}  # how the op ran attention (tests read it)
# segment code objects awaiting their first compile -> dynamo's bytecode for them (by id:
# code objects compare by content, and every segment's is a copy of the same code)
_AWAITED: dict[int, types.CodeType] = {}
_TRANSFORMED: dict[int, types.CodeType] = {}


def _bytecode_hook(old: types.CodeType, new: types.CodeType) -> None:
    """Keep dynamo's transformed bytecode of a segment, to call it without dynamo."""
    if _AWAITED.get(id(old)) is old:
        _TRANSFORMED[id(old)] = new


def _layer_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: torch.Tensor
) -> torch.Tensor:
    """The registered layer's attention, called eagerly from the compiled graph."""
    if _STUB["on"]:
        return query.clone()
    attn = _ATTENTION[int(layer)]()
    if attn is None:
        raise RuntimeError("UTIO: the layer loop called attention of a freed model")
    if not _calls_directly(attn):
        ATTENTION_CALLS["module"] += 1
        return attn(query, key, value)
    ATTENTION_CALLS["direct"] += 1
    ctx = _VLLM["get_forward_context"]()
    metadata = ctx.attn_metadata
    if isinstance(metadata, dict):
        metadata = metadata[attn.layer_name]
    elif isinstance(metadata, list):  # speculative decoding: [0] is the target model's
        metadata = metadata[0][attn.layer_name]
    out = torch.empty_like(query)
    q = query.view(-1, attn.num_heads, attn.head_size)
    k = key.view(-1, attn.num_kv_heads, attn.head_size)
    v = value.view(-1, attn.num_kv_heads, attn.head_size)
    if not attn.attn_backend.forward_includes_kv_cache_update:
        slots = ctx.slot_mapping.get(attn.layer_name)
        if slots is not None:
            attn.impl.do_kv_cache_update(attn, k, v, attn.kv_cache, slots)
    attn.impl.forward(attn, q, k, v, attn.kv_cache, metadata, output=out.view_as(q))
    return out


def _calls_directly(attn: nn.Module) -> bool:
    """Whether ``attn``'s forward reduces to the cache write + impl call (see the doc)."""
    return not (
        attn._forward_hooks
        or attn._forward_pre_hooks
        or _torch_module._global_forward_hooks
        or _torch_module._global_forward_pre_hooks
        or attn.query_quant is not None
        or attn.kv_sharing_target_layer_name is not None
        or _VLLM["has_kv_transfer_group"]()
    )


def _layer_attention_fake(query, key, value, layer) -> torch.Tensor:
    return torch.empty_like(query)  # Llama: heads x head_size, as the query


def _register_op() -> None:
    """Define ``torch.ops.utio.layer_attention`` once per process."""
    global _LIBRARY
    if _LIBRARY is not None:
        return
    from torch.library import Library
    from vllm.distributed.kv_transfer import has_kv_transfer_group
    from vllm.forward_context import get_forward_context
    from vllm.utils.torch_utils import direct_register_custom_op

    _VLLM.update(
        get_forward_context=get_forward_context, has_kv_transfer_group=has_kv_transfer_group
    )

    _LIBRARY = Library("utio", "FRAGMENT")
    torch._dynamo.convert_frame.register_bytecode_hook(_bytecode_hook)
    direct_register_custom_op(
        "layer_attention",
        _layer_attention,
        mutates_args=[],
        fake_impl=_layer_attention_fake,
        target_lib=_LIBRARY,
    )


@contextlib.contextmanager
def stub_attention() -> Iterator[None]:
    """Attention returns a copy of its query (no forward context needed): for compiling
    at load and for comparing the graphs with the eager layer code."""
    before = _STUB["on"]
    _STUB["on"] = True
    try:
        yield
    finally:
        _STUB["on"] = before


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


def _segment(layers: list[nn.Module], keys: list[torch.Tensor], positions, hidden, residual):
    """The Llama decoder layers ``layers`` in order, attention through the opaque op."""
    for layer, key in zip(layers, keys, strict=True):
        q, k, v, residual = _pre_attention(layer, positions, hidden, residual)
        out = torch.ops.utio.layer_attention(q, k, v, key)
        hidden, residual = _post_attention(layer, out, residual)
    return hidden, residual


def eager_segment(layers: list[nn.Module], positions, hidden, residual):
    """:func:`_segment` run eagerly with the stubbed attention (the tests' reference)."""
    for layer in layers:
        q, _, _, residual = _pre_attention(layer, positions, hidden, residual)
        hidden, residual = _post_attention(layer, q.clone(), residual)
    return hidden, residual


def _fresh_copy(fn: Callable) -> Callable:
    """``fn`` with its own code object: dynamo keeps compiled graphs per code object, and
    with no guards it would reuse the first one for any input, so each segment key gets
    its own."""
    return types.FunctionType(
        fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )


def why_not_compiled(layers: list[nn.Module]) -> str | None:
    """Why these layers cannot run as compiled segments (None: they can)."""
    from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer

    first = layer_signature(layers[0])
    for i, layer in enumerate(layers):
        if type(layer).forward is not LlamaDecoderLayer.forward:
            return f"decoder layer {i} ({type(layer).__name__}) has its own forward"
        if type(layer.self_attn).forward is not LlamaAttention.forward:
            return f"layer {i}'s attention ({type(layer.self_attn).__name__}) has its own forward"
        attn = layer.self_attn.attn
        if attn.head_size_v != attn.head_size:  # the op's output is shaped as the query
            return f"layer {i}'s attention has a value head size unlike its query's"
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
    """Decoder layers run as compiled segments; see the module doc."""

    def __init__(
        self, layers: list[nn.Module], backend: str, inductor_options: dict[str, Any]
    ) -> None:
        _register_op()
        # vLLM's inductor settings (on CPU: no size asserts on the ~7 parameters per
        # layer, dead-code elimination, ...), and no guards at all, as vLLM compiles its
        # own model: checking them cost 100-250 us per call. What guards would tell
        # apart gets its own graph instead (``_graph``'s key); ``why_not_compiled``
        # checked once that all layers have the same structure, which is all the graphs
        # depend on besides that (parameters are inputs), and tests compare layers other
        # than the warmed-up ones.
        self._options = {
            **inductor_options,
            "guard_filter_fn": torch.compiler.skip_all_guards_unsafe,
        }
        self._backend = backend
        # by (length, from layer 0 (no residual yet), one token): dynamo specialises a
        # size of 1, so one token and many need separate graphs
        self._segments: dict[tuple[int, bool, bool], Callable] = {}
        self._direct: dict[tuple[int, bool, bool], Callable] = {}  # compiled ones
        self.bypassing: set[tuple[int, bool, bool]] = set()  # called without dynamo
        self._keys = []
        for layer in layers:
            key = next(_NEXT_KEY)
            _ATTENTION[key] = weakref.ref(layer.self_attn.attn)
            self._keys.append(torch.tensor(key))
        self.calls = 0  # layer runs through the compiled segments (tests read it)
        self._warming = False

    def _graph(self, key: tuple[int, bool, bool]) -> Callable:
        """The segment function for ``key``: compiled by its first call, then dynamo's
        transformed bytecode called directly (with no guards there is nothing for dynamo
        to choose; its cache lookup cost 100-450 us per call), as vLLM calls its model."""
        run = self._direct.get(key)
        if run is not None:
            return run
        fn = self._segments.get(key)
        if fn is None:  # first use: this call compiles it
            fn = self._segments[key] = _fresh_copy(_segment)
            _AWAITED[id(fn.__code__)] = fn.__code__
            return self._compile(fn)
        _AWAITED.pop(id(fn.__code__), None)
        new = _TRANSFORMED.pop(id(fn.__code__), None)
        if new is None:
            logger.warning("UTIO: no transformed bytecode from dynamo; segments go through it")
            run = self._compile(fn)
        else:
            run = types.FunctionType(new, fn.__globals__, fn.__name__)
            self.bypassing.add(key)
        self._direct[key] = run
        return run

    def _compile(self, fn: Callable) -> Callable:
        return torch.compile(
            fn, dynamic=True, fullgraph=True, backend=self._backend, options=self._options
        )

    def run_layers(self, layers: list[nn.Module], indices: range, positions, hidden, residual):
        """Layers ``indices`` (consecutive, ``layers`` the whole stack) on the same tokens,
        as one compiled call."""
        if torch.is_inference_mode_enabled() and not positions.is_inference():
            # a slice of vLLM's persistent positions buffer is a normal tensor, a gathered
            # one an inference tensor: give the graphs (traced with the latter) one kind
            positions = positions.clone()
        key = (len(indices), residual is None, hidden.shape[0] == 1)
        if key not in self._segments and not self._warming:
            logger.warning(
                "UTIO: compiling the layer loop for a segment of %d layers (not warmed up)",
                len(indices),
            )
        run = self._graph(key)
        keys = [self._keys[i] for i in indices]
        self.calls += len(indices)
        return run([layers[i] for i in indices], keys, positions, hidden, residual)

    def warm_up(
        self, layers: list[nn.Module], segments: Iterable[range], dtype: torch.dtype, device: Any
    ) -> float:
        """Compile every graph the ``segments`` a step can run need (1 token and many, as
        dynamo specialises size 1), with the stub attention. Returns the seconds it took."""
        t0 = time.perf_counter()
        hidden_size = layers[0].input_layernorm.weight.shape[0]
        # one segment per (length, starts at layer 0) is enough: graphs are shared
        distinct = {(len(r), r.start == 0): r for r in segments}
        self._warming = True
        with torch.inference_mode(), stub_attention():
            for n in (1, 2):
                positions = torch.arange(n, device=device)
                hidden = torch.zeros(n, hidden_size, dtype=dtype, device=device)
                for indices in distinct.values():
                    residual = None if indices.start == 0 else hidden.clone()
                    self.run_layers(layers, indices, positions, hidden, residual)
        self._warming = False
        self.calls = 0
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
    options = dict(compilation.inductor_compile_config) if backend == "inductor" else {}
    return CompiledLayerBody(layers, backend, options)
