"""In-worker checks of the fused K/V fill against the per-layer fill and the reference.

Sent to the worker with ``collective_rpc``: the engine's real vLLM layers and weights.
Streams are real: the pure-torch reference's residual stream entering the span's first
layer for a real text, rounded to the engine's dtype (what a frozen row carries).
"""

from __future__ import annotations

from typing import Any

import torch

TEXT = (
    "The river rises in the northern hills and runs south through a wide valley, where "
    "farmers have grown wheat and barley since the middle ages. Its lower course was "
    "straightened in 1870 to make room for the railway, and floods became rarer."
)


def _stack(wrapper: Any):
    from vllm_utio.integration.model_stack import DecoderStack

    runner = getattr(wrapper, "worker", wrapper).model_runner
    return runner, DecoderStack.from_causal_lm(runner.model)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b| in units of the dtype's spacing at each head vector's largest |b|
    (a dot product's rounding scales with its terms, not with its possibly tiny result)."""
    eps = torch.finfo(b.dtype).eps
    scale = b.float().abs().amax(-1, keepdim=True) * eps
    return float(((a.float() - b.float()).abs() / scale).max())


def fused_vs_per_layer(wrapper: Any, model_path: str, start: int, stop: int) -> dict[str, Any]:
    """Per layer of ``start..stop-1``: the fused fill's K and V vs the per-layer fill's and
    both vs the fp32 reference (relative Frobenius error), and the largest elementwise
    difference fused vs per-layer in units of bf16 spacing."""
    from transformers import AutoTokenizer

    from vllm_utio.evaluation.reference import ReferenceLlama

    _, stack = _stack(wrapper)
    ref = ReferenceLlama.from_pretrained(model_path)
    ids = AutoTokenizer.from_pretrained(model_path).encode(TEXT)
    positions = torch.arange(len(ids))
    stream32 = ref.forward(torch.tensor(ids)).streams[start]
    dtype = stack.layers[0].input_layernorm.weight.dtype
    stream = stream32.to(dtype)
    fill = stack.span_fill(range(start, stop))
    assert not isinstance(fill, str), fill
    out: dict[str, Any] = {"tokens": len(ids), "layers": list(fill.layers)}
    with torch.no_grad():
        fused = fill.kv(positions, stream)
        for j, layer in enumerate(range(start, stop)):
            per_layer = stack.skipped_kv(layer, positions, stream)
            want = ref.kv_from_stream(layer, stream.float(), positions)
            for name, f, p, w in zip("kv", fused[j], per_layer, want, strict=True):
                out.setdefault(f"{name}_fused_vs_per_layer", []).append(_rel(f, p))
                out.setdefault(f"{name}_fused_vs_ref", []).append(_rel(f, w))
                out.setdefault(f"{name}_per_layer_vs_ref", []).append(_rel(p, w))
                out.setdefault(f"{name}_ulps", []).append(_ulps(f, p))
    return out


def writes_through_backend(wrapper: Any, start: int, stop: int) -> dict[str, Any]:
    """The fused fill writes each layer of the span once, through the backend impl's
    ``do_kv_cache_update`` into that layer's cache at the given slots, and what lands there
    equals the per-layer fill's write up to the same rounding. Scratch caches stand in
    for the real ones (restored after), so no live block is touched."""
    _, stack = _stack(wrapper)
    fill = stack.span_fill(range(start, stop))
    assert not isinstance(fill, str), fill
    attns = [stack.layers[i].self_attn.attn for i in range(start, stop)]
    saved = [a.kv_cache for a in attns]
    calls: list[tuple[str, bool, list[int]]] = []
    impls = {id(a.impl): a.impl for a in attns}
    originals = {key: impl.do_kv_cache_update for key, impl in impls.items()}

    def counting(write):
        def do_kv_cache_update(layer, key, value, kv_cache, slot_mapping, *a, **kw):
            calls.append((layer.layer_name, kv_cache is layer.kv_cache, slot_mapping.tolist()))
            return write(layer, key, value, kv_cache, slot_mapping, *a, **kw)

        return do_kv_cache_update

    torch.manual_seed(0)
    n = 5
    stream = (torch.randn(n, stack.layers[0].input_layernorm.weight.shape[0]) * 2).to(
        saved[0].dtype
    )
    positions = torch.tensor([0, 7, 130, 131, 900])
    slots = torch.tensor([3, 129, 130, 200, 255])  # two blocks of 128
    written: dict[str, list[torch.Tensor]] = {}
    try:
        for key, impl in impls.items():
            impl.do_kv_cache_update = counting(originals[key])
        for path in ("per_layer", "fused"):
            for a in attns:
                a.kv_cache = torch.zeros_like(a.kv_cache[:2])
            with torch.no_grad():
                if path == "fused":
                    fill.write(positions, stream, [slots] * len(attns))
                else:
                    for i in range(start, stop):
                        stack.write_skipped_kv(i, positions, stream, slots)
            written[path] = [a.kv_cache for a in attns]
    finally:
        for a, cache in zip(attns, saved, strict=True):
            a.kv_cache = cache
        for key, impl in impls.items():
            impl.do_kv_cache_update = originals[key]
    fused_calls = calls[len(attns) :]
    return {
        "per_layer_calls": [c[0] for c in calls[: len(attns)]],
        "fused_calls": [c[0] for c in fused_calls],
        "fused_own_cache": all(c[1] for c in fused_calls),
        "fused_slots": [c[2] for c in fused_calls],
        "layer_names": [a.layer_name for a in attns],
        "slots": slots.tolist(),
        "nonzero": [int((w != 0).sum()) for w in written["fused"]],
        "nonzero_per_layer": [int((w != 0).sum()) for w in written["per_layer"]],
        "cache_rel": [
            _rel(f, p) for f, p in zip(written["fused"], written["per_layer"], strict=True)
        ],
    }


def fallback_reason(wrapper: Any, start: int, stop: int) -> dict[str, Any]:
    """A span whose layers do not share a rotary embedding is refused (and the executor
    then fills it per layer); the same span fuses again once they share it."""
    import copy

    from vllm_utio.executor import DepthExecutor

    runner, stack = _stack(wrapper)
    layer = stack.layers[start + 1].self_attn
    shared = layer.rotary_emb
    try:
        layer.rotary_emb = copy.deepcopy(shared)
        refused = stack.span_fill(range(start, stop))
        plans = runner.utio_plans
        executor = DepthExecutor(stack, plans, [None] * plans.num_levels, "nested", 0)
        fills = [f is not None for f in executor.span_fills]
    finally:
        layer.rotary_emb = shared
    again = stack.span_fill(range(start, stop))
    return {
        "refused": refused if isinstance(refused, str) else None,
        "executor_fused_levels": fills,
        "fuses_again": not isinstance(again, str),
    }


def fused_fill_tokens(wrapper: Any) -> int:
    runner = getattr(wrapper, "worker", wrapper).model_runner
    return int(runner._utio_executor.fused_fill_tokens)
