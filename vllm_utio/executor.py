"""The layer loop over depth sub-batches (one step of one model).

Input: the step's tokens, a depth level per request row, and a way to get attention
metadata for any set of rows. Each layer runs once, on exactly the rows whose plan
includes it, as one sub-batch; rows that skip a layer still get that layer's K/V
written from their frozen residual stream. Rows rejoining the tail after a skipped
span (or reaching the final norm after truncation) pass through their level's exit
correction. Output: final-normed hidden states for every token, in the step's order.

Layers run in segments: consecutive layers on the same rows with no rejoin or routing
decision between them are one call of the decoder stack (with the compiled layer body,
one compiled graph per segment).

K/V fill: a level's whole skipped span is filled at once, where the span starts, by one
fused projection (:mod:`vllm_utio.integration.kv_fill`); a span that cannot be fused (its
layers differ), or whose rows a mid-forward router may still change, is filled layer by
layer from the rows skipping each layer (the reference path).

Two schedules: ``nested`` (shared layers run once over a shrinking prefix) and
``per_bucket`` (the UTIO paper's: each level runs separately from layer 0).
Rows of a sub-batch are a slice when the batch is ordered deepest first ("prefix")
and an index set otherwise ("gather"): the same code handles both.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vllm_utio.corrections import Correction
from vllm_utio.integration.attention import SubBatch, token_selector
from vllm_utio.integration.kv_fill import SpanKVFill
from vllm_utio.integration.model_stack import DecoderStack
from vllm_utio.log import get_logger
from vllm_utio.plans import PlanSet

logger = get_logger(__name__)


@dataclass
class StepResult:
    hidden: torch.Tensor
    kv_fill_layer_tokens: int = 0
    metadata_s: float = 0.0
    # routing-layer attention captures: {"value", "output", "tokens"} per sub-batch run
    heat_inputs: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class StepPlan:
    """What the runner hands the executor for one step."""

    levels: np.ndarray  # level per row, persistent-batch order
    query_start_loc: np.ndarray  # [rows + 1] token offsets per row
    make_sub_batch: Callable[[np.ndarray], SubBatch]
    use_sub_batch: Callable[[SubBatch], AbstractContextManager]
    full: SubBatch  # every row (route_mid may swap in sparse-attention metadata)
    step_slot_mapping: dict[str, torch.Tensor]
    # mid-forward routing: after this layer, route_mid(stream of each row's last token)
    # gives the rows' levels for the rest of the step (gather/scatter execution only)
    route_layer: int | None = None
    route_mid: Callable[[torch.Tensor], np.ndarray] | None = None
    # capture the heat layer's attention (surrogate heat, vslash estimate); uncaptured, the
    # layer's attention runs like the others (a hooked module call costs more)
    capture_heat: bool = True


def _take(t: torch.Tensor, sel: slice | torch.Tensor) -> torch.Tensor:
    return t[sel]


def _put(dst: torch.Tensor, sel: slice | torch.Tensor, src: torch.Tensor) -> None:
    if isinstance(sel, slice):
        dst[sel].copy_(src)
    else:
        dst.index_copy_(0, sel, src)


class DepthExecutor:
    def __init__(
        self,
        stack: DecoderStack,
        plan_set: PlanSet,
        corrections: list[Correction | None],
        schedule: str,
        heat_layer: int,
        fused_fill: bool = True,
    ) -> None:
        self.stack = stack
        self.plan_set = plan_set
        self.corrections = corrections  # per level (index 0 = full depth, always None)
        self.schedule = schedule
        self.heat_layer = heat_layer
        # per level: the fused fill of its skipped span (None: full depth or per-layer fill)
        self.span_fills = _span_fills(stack, plan_set) if fused_fill else [None] * len(corrections)
        self._fused = np.array([f is not None for f in self.span_fills])
        self.fused_fill_tokens = 0  # tokens filled by the fused path (tests read it)
        self._running = [plan_set.levels_running(layer) for layer in range(stack.num_layers)]
        # corrected levels by the layer where they rejoin (num_layers: before the final norm)
        self._rejoins: dict[int, list[int]] = {}
        for level, plan_k in enumerate(plan_set.plans):
            if corrections[level] is not None and not plan_k.is_full:
                self._rejoins.setdefault(plan_k.skip_stop, []).append(level)

    def run(self, input_ids, positions, inputs_embeds, plan: StepPlan) -> StepResult:
        hidden = self.stack.embed(input_ids, inputs_embeds)
        if self.schedule == "per_bucket":
            return self._run_per_bucket(hidden, positions, plan)
        return self._run_nested(hidden, positions, plan)

    # --- nested schedule -------------------------------------------------------
    def _run_nested(self, hidden, positions, plan: StepPlan) -> StepResult:
        result = StepResult(hidden)
        subs: dict[int, SubBatch] = {}
        skips: dict[int, torch.Tensor | slice | None] = {}
        residual: torch.Tensor | None = None
        fused = self._fused_levels(plan)
        layer = 0
        while layer < self.stack.num_layers:
            n = self._running[layer]
            end = self._segment_end(layer, plan.route_layer if plan.route_mid else None)
            if n not in subs:
                t0 = time.perf_counter()
                subs[n], skips[n] = self._sub_batches_for(n, plan)
                result.metadata_s += time.perf_counter() - t0
            sub = subs[n]
            if residual is not None:
                for level in self._rejoins.get(layer, ()):
                    self._correct(level, hidden, residual, plan)
                if skips[n] is not None:
                    # skipping rows' streams are frozen over the segment: fill them first
                    for skipped in range(layer, end):
                        result.kv_fill_layer_tokens += self._fill_nested(
                            skipped, n, hidden, residual, positions, skips[n], plan, fused
                        )
            if sub.num_tokens:
                hidden, residual = self._run_segment(
                    range(layer, end), sub, hidden, residual, positions, plan, result
                )
            if plan.route_mid is not None and end - 1 == plan.route_layer:
                last = torch.as_tensor(plan.query_start_loc[1:] - 1, device=hidden.device)
                plan.levels = plan.route_mid(hidden[last] + residual[last])
                subs.clear()  # sub-batches from here on follow the new levels
                skips.clear()
            layer = end
        for level in self._rejoins.get(self.stack.num_layers, ()):
            self._correct(level, hidden, residual, plan)
        result.hidden = self.stack.final_norm(hidden, residual)
        return result

    def _segment_end(self, start: int, route_layer: int | None) -> int:
        """End of the run of layers from ``start`` on the same rows with nothing between
        them (no rows rejoining, no routing decision after ``route_layer``): one call of
        the layer body."""
        end = start + 1
        while (
            end < self.stack.num_layers
            and self._running[end] == self._running[start]
            and end not in self._rejoins
            and end - 1 != route_layer
        ):
            end += 1
        return end

    def segments(self, route_layer: int | None) -> list[range]:
        """Every segment a step can run (what the compiled body warms up): the nested
        schedule's, with and without a routing decision after ``route_layer``, and the
        per-bucket schedule's single layers."""
        if self.schedule == "per_bucket":
            return [range(0, 1), range(1, 2)]
        out = []
        for route in {None, route_layer}:
            layer = 0
            while layer < self.stack.num_layers:
                end = self._segment_end(layer, route)
                out.append(range(layer, end))
                layer = end
        return out

    def _sub_batches_for(self, n: int, plan: StepPlan):
        """Sub-batch of rows at levels < n, and the token selector of the others."""
        skipped = np.flatnonzero(plan.levels >= n)
        if not len(skipped):  # every row of this step runs the layer
            return plan.full, None
        running = np.flatnonzero(plan.levels < n)
        sub = plan.make_sub_batch(running) if len(running) else _empty_sub(running)
        return sub, _selector(skipped, plan.query_start_loc)

    def _run_segment(self, layers: range, sub: SubBatch, hidden, residual, positions, plan, result):
        capture = plan.capture_heat and self.heat_layer in layers
        sink: dict[str, Any] = {}
        with (
            plan.use_sub_batch(sub),
            self.stack.capture_attention(self.heat_layer, sink) if capture else nullcontext(),
        ):
            if sub is plan.full:
                hidden, residual = self.stack.run_layers(layers, positions, hidden, residual)
            else:
                if residual is None:  # layer 0 always runs every row, so never here
                    raise RuntimeError("UTIO: layer 0 must run every row")
                sel = _device_sel(sub.tokens, hidden.device)
                h_out, r_out = self.stack.run_layers(
                    layers, _take(positions, sel), _take(hidden, sel), _take(residual, sel)
                )
                _put(hidden, sel, h_out)
                _put(residual, sel, r_out)
        if capture:
            sink["tokens"] = sub.tokens
            result.heat_inputs.append(sink)
        return hidden, residual

    def _fused_levels(self, plan: StepPlan) -> np.ndarray:
        """Per level: is its span filled fused this step. A span that starts before a
        mid-forward routing decision is not: its rows may change at the routing layer."""
        if plan.route_mid is None or plan.route_layer is None:
            return self._fused
        starts = np.array([p.skip_start for p in self.plan_set.plans])
        return self._fused & (starts > plan.route_layer)

    def _fill_nested(self, layer, n, hidden, residual, positions, skip_sel, plan, fused) -> int:
        """K/V of layer ``layer`` for the rows skipping it (levels >= n)."""
        if not fused.any():
            return self._fill_skipped(layer, hidden, residual, positions, skip_sel, plan)
        tokens = 0
        for level in range(n, self.plan_set.num_levels):
            fill = self.span_fills[level]
            if fused[level] and fill is not None and fill.layers[0] == layer:
                tokens += self._fill_span(
                    fill, plan.levels == level, hidden, residual, positions, plan
                )
        rest = (plan.levels >= n) & ~fused[plan.levels]
        if rest.any():
            sel = self._rows_tokens(rest, plan)
            tokens += self._fill_skipped(layer, hidden, residual, positions, sel, plan)
        return tokens

    def _fill_span(self, fill: SpanKVFill, rows_mask, hidden, residual, positions, plan) -> int:
        """Every layer of ``fill``'s span for the rows in ``rows_mask``, in one projection."""
        sel = self._rows_tokens(rows_mask, plan)
        if sel is None:
            return 0
        sel = _device_sel(sel, hidden.device)
        stream = _take(hidden, sel) + _take(residual, sel)
        slots = [plan.step_slot_mapping[name][sel] for name in fill.layer_names]
        fill.write(_take(positions, sel), stream, slots)
        self.fused_fill_tokens += int(stream.shape[0])
        return int(stream.shape[0]) * len(fill.layers)

    def _fill_skipped(self, layer, hidden, residual, positions, skip_sel, plan) -> int:
        sel = _device_sel(skip_sel, hidden.device)
        stream = _take(hidden, sel) + _take(residual, sel)
        name = self.stack.layer_name(layer)
        slots = plan.step_slot_mapping[name][sel]
        self.stack.write_skipped_kv(layer, _take(positions, sel), stream, slots)
        return int(stream.shape[0])

    def _rows_tokens(self, levels_mask: np.ndarray, plan: StepPlan):
        rows = np.flatnonzero(levels_mask)
        return _selector(rows, plan.query_start_loc) if len(rows) else None

    def _correct(self, level: int, hidden, residual, plan: StepPlan) -> None:
        corr = self.corrections[level]
        sel = self._rows_tokens(plan.levels == level, plan)
        if sel is None:
            return
        sel = _device_sel(sel, hidden.device)
        stream = _take(hidden, sel) + _take(residual, sel)
        _put(hidden, sel, _take(hidden, sel) + corr.delta(stream))

    # --- per-bucket schedule (the paper's) --------------------------------------
    def _run_per_bucket(self, hidden, positions, plan: StepPlan) -> StepResult:
        result = StepResult(hidden)
        out = torch.empty_like(hidden)
        for level, plan_k in enumerate(self.plan_set.plans):
            rows = np.flatnonzero(plan.levels == level)
            if not len(rows):
                continue
            t0 = time.perf_counter()
            sub = plan.full if len(rows) == len(plan.levels) else plan.make_sub_batch(rows)
            result.metadata_s += time.perf_counter() - t0
            sel = _device_sel(sub.tokens, hidden.device)
            h = _take(hidden, sel).clone()
            pos = _take(positions, sel)
            res: torch.Tensor | None = None
            fill = self.span_fills[level]
            for layer in range(self.stack.num_layers):
                if not plan_k.runs(layer) and fill is not None:
                    if layer == fill.layers[0]:
                        assert res is not None
                        slots = [plan.step_slot_mapping[name][sel] for name in fill.layer_names]
                        fill.write(pos, h + res, slots)
                        self.fused_fill_tokens += int(h.shape[0])
                        result.kv_fill_layer_tokens += int(h.shape[0]) * len(fill.layers)
                    continue
                if not plan_k.runs(layer):
                    assert res is not None
                    stream = h + res
                    slots = plan.step_slot_mapping[self.stack.layer_name(layer)][sel]
                    self.stack.write_skipped_kv(layer, pos, stream, slots)
                    result.kv_fill_layer_tokens += int(stream.shape[0])
                    continue
                if (
                    res is not None
                    and layer == plan_k.skip_stop
                    and self.corrections[level] is not None
                ):
                    h = h + self.corrections[level].delta(h + res)
                sink: dict[str, Any] = {}
                capture = plan.capture_heat and layer == self.heat_layer
                with (
                    plan.use_sub_batch(sub),
                    self.stack.capture_attention(layer, sink) if capture else nullcontext(),
                ):
                    h, res = self.stack.run_layer(layer, pos, h, res)
                if capture:
                    result.heat_inputs.append({**sink, "tokens": sub.tokens})
            if (
                plan_k.skip_stop == plan_k.num_layers
                and self.corrections[level] is not None
                and res is not None
            ):
                h = h + self.corrections[level].delta(h + res)
            _put(out, sel, self.stack.final_norm(h, res))
        result.hidden = out
        return result


def _span_fills(stack: DecoderStack, plan_set: PlanSet) -> list[SpanKVFill | None]:
    """The fused fill of each level's skipped span (shared by levels with the same span)."""
    by_span: dict[range, SpanKVFill | None] = {}
    fills: list[SpanKVFill | None] = []
    for plan_k in plan_set.plans:
        span = range(plan_k.skip_start, plan_k.skip_stop)
        if not len(span):
            fills.append(None)
            continue
        if span not in by_span:
            fill = stack.span_fill(span)
            if isinstance(fill, str):
                logger.info("UTIO: layers %s get their K/V filled per layer: %s", span, fill)
                fill = None
            by_span[span] = fill
        fills.append(by_span[span])
    return fills


def _selector(rows: np.ndarray, query_start_loc: np.ndarray) -> slice | torch.Tensor:
    sel = token_selector(rows, query_start_loc)
    if isinstance(sel, slice):
        return sel
    # rows at the end of a deepest-first batch are a contiguous tail: keep it a slice
    if len(sel) and sel[-1] - sel[0] + 1 == len(sel):
        return slice(int(sel[0]), int(sel[-1]) + 1)
    return torch.as_tensor(sel, dtype=torch.long)


def _device_sel(sel, device) -> slice | torch.Tensor:
    return sel if isinstance(sel, slice) else sel.to(device)


def _empty_sub(rows: np.ndarray) -> SubBatch:
    return SubBatch(rows, slice(0, 0), 0, {}, {})
