"""Cost of a skipped layer's K/V fill vs a running layer, timed inside the engine's worker.

A vLLM worker extension (``LLM(..., worker_extension_cls=EXTENSION)``) for
``benchmarks/kv_fill_cost.py``. ``utio_fill_arm(layer)`` hooks decoder layer ``layer``
(the first layer after a bucket's skipped span) so that the next step records its
inputs and forward context; for a step whose rows all run that bucket, its input stream
``hidden + residual`` is the frozen stream the span's fill used. ``utio_fill_time`` then
replays, on those inputs and that context: the running layer itself, the span's per-layer
fill (the reference path) and its fused fill, each repeated and given as a median.

Replays write the captured tokens' K/V again at their own slots: the running layer and the
per-layer fill write the values the step wrote, the fused fill the same values up to bf16
rounding. Run it on throwaway requests only.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

EXTENSION = f"{__name__}.KVFillTimerExtension"


class KVFillTimerExtension:
    """Mixed into the worker class by vLLM (``worker_extension_cls``)."""

    def utio_fill_arm(self, layer: int) -> None:
        """Record the inputs and forward context of decoder layer ``layer``'s next call."""
        from vllm.forward_context import get_forward_context

        stack = _stack(self)
        module = stack.layers[layer]

        def hook(_module: Any, args: tuple) -> None:
            positions, hidden, residual = args[:3]
            self._utio_fill_capture = {
                "positions": positions.clone(),
                "hidden": hidden.clone(),
                "residual": residual.clone(),
                "context": get_forward_context(),
            }
            handle.remove()

        self._utio_fill_capture = None
        handle = module.register_forward_pre_hook(hook)

    def utio_fill_time(
        self, run_layer: int, span: tuple[int, int], repeats: int, rounds: int
    ) -> dict[str, Any]:
        """Median milliseconds per call: the running layer, one skipped layer's per-layer
        fill, one skipped layer's share of the fused span fill (and its parts)."""
        from vllm import ir
        from vllm.forward_context import override_forward_context

        cap = self._utio_fill_capture
        if cap is None:
            raise RuntimeError("utio_fill_arm's layer did not run since it was armed")
        stack = _stack(self)
        layers = range(*span)
        fill = stack.span_fill(layers)
        if isinstance(fill, str):
            raise RuntimeError(f"span {span} cannot be fused: {fill}")
        ctx = cap["context"]
        pos, hidden, residual = cap["positions"], cap["hidden"], cap["residual"]
        stream = hidden + residual
        slots = [ctx.slot_mapping[name] for name in fill.layer_names]
        kv_size = fill.num_kv_heads * fill.head_size
        normed = ir.ops.rms_norm(stream, None, fill.eps)
        out = fill.linear(normed)
        kvs = fill.kv(pos, stream)

        def run() -> None:
            stack.run_layer(run_layer, pos, hidden.clone(), residual.clone())

        def per_layer() -> None:
            for i, s in zip(layers, slots, strict=True):
                stack.write_skipped_kv(i, pos, stream, s)

        def fused() -> None:
            fill.write(pos, stream, slots)

        parts: dict[str, Callable[[], Any]] = {
            "norm": lambda: ir.ops.rms_norm(stream, None, fill.eps),
            "gemm": lambda: fill.linear(normed),
            "rope": lambda: fill.rotary(pos, out[:, : len(layers) * kv_size].clone(), None),
            "writes": lambda: [
                a.impl.do_kv_cache_update(a, k, v, a.kv_cache, s)
                for a, (k, v), s in zip(fill.attns, kvs, slots, strict=True)
            ],
        }
        samples: dict[str, list[float]] = {}
        with torch.no_grad(), override_forward_context(ctx):
            for _ in range(rounds):  # interleaved, so drift hits every variant alike
                for name, fn in (("run", run), ("per_layer", per_layer), ("fused", fused)):
                    samples.setdefault(name, []).append(_median_ms(fn, repeats))
                for name, fn in parts.items():
                    samples.setdefault(name, []).append(_median_ms(fn, repeats))
        med = {k: statistics.median(v) for k, v in samples.items()}
        s = len(layers)
        return {
            "tokens": int(pos.shape[0]),
            "span_layers": s,
            "threads": torch.get_num_threads(),
            "running_layer_ms": med["run"],
            "per_layer_fill_ms": med["per_layer"] / s,
            "fused_fill_ms": med["fused"] / s,
            # the fused fill's parts, each for the whole span
            "fused_parts_ms": {k: med[k] for k in parts},
            "rounds_ms": samples,
        }


def _stack(worker: Any):
    runner = getattr(worker, "model_runner", None) or worker.worker.model_runner
    return runner._utio_executor.stack


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)
