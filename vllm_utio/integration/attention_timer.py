"""Time spent in the attention kernel, measured inside the engine's worker.

A vLLM worker extension (``LLM(..., worker_extension_cls=EXTENSION)``) adds one RPC,
``utio_attention_timer``. Its first call wraps every attention layer's backend
implementation (``layer.impl.forward``: on CPU, ``cpu_attention_with_kv_cache``, the call
that reads the paged KV cache) with a wall-clock timer; each call returns running totals.

This works for vanilla (compiled) and UTIO (eager) engines alike: on CPU the attention is
an opaque custom op, so even a ``torch.compile``d model calls ``impl.forward`` through
Python at run time, and the CPU kernels are synchronous, so wall time is kernel time.
Only calls whose batch is pure decode (``max_query_len == 1``) count as decode attention;
prefill chunks and mixed steps are kept apart (the one-token "prefill" after a prefix
cache hit reads the prompt's K/V like a decode and counts as one). Steps are counted as
calls / layers, exact when every layer runs once per step, as in every configuration of
``bench-long``. The K/V write of the new token is a separate op and is not included.
Cost: two ``perf_counter`` calls per layer and step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

EXTENSION = f"{__name__}.AttentionTimerExtension"
RPC = "utio_attention_timer"


class AttentionTimerExtension:
    """Mixed into the worker class by vLLM (``worker_extension_cls``)."""

    def utio_attention_timer(self) -> dict[str, float]:
        totals: dict[str, float] | None = getattr(self, "_utio_attn_totals", None)
        if totals is None:
            totals = {"decode_s": 0.0, "decode_calls": 0, "other_s": 0.0, "other_calls": 0}
            layers = _attention_layers(self)
            for layer in layers:
                layer.impl.forward = _timed(layer.impl.forward, totals)
            totals["layers"] = len(layers)
            self._utio_attn_totals = totals
        return dict(totals)


def _attention_layers(worker: Any) -> list[Any]:
    # vLLM registers every attention layer by name in the static forward context
    ctx = worker.vllm_config.compilation_config.static_forward_context
    return [m for m in ctx.values() if hasattr(getattr(m, "impl", None), "forward")]


def _timed(forward: Callable[..., Any], totals: dict[str, float]) -> Callable[..., Any]:
    def timed(layer: Any, query: Any, key: Any, value: Any, kv_cache: Any, meta: Any, *a, **kw):
        t0 = time.perf_counter()
        out = forward(layer, query, key, value, kv_cache, meta, *a, **kw)
        dt = time.perf_counter() - t0
        kind = "decode" if meta is not None and getattr(meta, "max_query_len", 0) == 1 else "other"
        totals[f"{kind}_s"] += dt
        totals[f"{kind}_calls"] += 1
        return out

    return timed


def read(llm: Any) -> dict[str, float]:
    """The worker's totals (installs the timers on first use)."""
    return llm.collective_rpc(RPC)[0]


def decode_attention_ms(before: dict[str, float], after: dict[str, float]) -> float | None:
    """Mean attention-kernel milliseconds per pure-decode step between two reads."""
    calls = after["decode_calls"] - before["decode_calls"]
    layers = after.get("layers") or 0
    if calls <= 0 or not layers:
        return None
    return 1e3 * (after["decode_s"] - before["decode_s"]) / (calls / layers)
