"""Layer plans: which contiguous middle span a bucket skips.

Every candidate is scored by the calibration loss (mean NLL) when *every* token skips
it. Then every position has the same frozen stream, so the span's K/V never matter and
the run restarts from the cached full-depth stream at the span start. Nested plans
for B buckets come from a small dynamic programme over the scored spans.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from vllm_utio.calibration.forward import (
    Delta,
    FullPass,
    logits_of,
    run_layers,
    target_logp,
)
from vllm_utio.evaluation.reference import ReferenceLlama


@dataclass(frozen=True)
class Span:
    """Skip layers ``[start, stop)``; as a plan: keep_first=start, keep_last=L-stop."""

    start: int
    stop: int

    @property
    def length(self) -> int:
        return self.stop - self.start

    def plan(self, num_layers: int) -> tuple[int, int]:
        return (self.start, num_layers - self.stop)

    def contains(self, other: Span) -> bool:
        return self.start <= other.start and other.stop <= self.stop

    def __str__(self) -> str:
        return f"[{self.start},{self.stop})"


@torch.no_grad()
def skip_set_nll(
    model: ReferenceLlama,
    passes: Sequence[FullPass],
    skipped: Iterable[int],
    correction: Delta | None = None,
) -> float:
    """Mean NLL when every token skips the layers in ``skipped`` (any set, not only
    spans); ``correction`` applies after the last skipped layer."""
    skipped = sorted(set(skipped))
    num_layers = model.num_layers
    if not skipped:
        return float(torch.cat([-p.logp for p in passes]).mean())
    first, last = skipped[0], skipped[-1]
    total, count = 0.0, 0
    for fp in passes:
        t = fp.ids.shape[0]
        runs = torch.ones(t, num_layers, dtype=torch.bool)
        runs[:, skipped] = False
        fixes = {last + 1: [(torch.ones(t, dtype=torch.bool), correction)]} if correction else {}
        stream = run_layers(model, fp.streams[first], first, num_layers, runs, fixes)
        logp = target_logp(logits_of(model, stream), fp.ids)
        total += float(-logp.sum())
        count += logp.numel()
    return total / count


def span_nll(
    model: ReferenceLlama,
    passes: Sequence[FullPass],
    span: Span,
    correction: Delta | None = None,
) -> float:
    return skip_set_nll(model, passes, range(span.start, span.stop), correction)


def candidate_spans(
    num_layers: int, lengths: Iterable[int], min_first: int, min_last: int
) -> list[Span]:
    """Every span of the given lengths that keeps ``min_first`` head and ``min_last``
    tail layers (``min_last=0`` admits truncation)."""
    out = []
    for k in sorted(set(lengths)):
        for start in range(min_first, num_layers - min_last - k + 1):
            out.append(Span(start, start + k))
    return out


def span_table(
    model: ReferenceLlama,
    passes: Sequence[FullPass],
    spans: Sequence[Span],
    progress: bool = True,
) -> dict[Span, float]:
    """Calibration NLL of each span skipped by every token."""
    table = {}
    for span in tqdm(spans, desc="span search", unit="span", disable=not progress):
        table[span] = span_nll(model, passes, span)
    return table


def best_per_length(table: dict[Span, float]) -> dict[int, Span]:
    best: dict[int, Span] = {}
    for span, nll in table.items():
        cur = best.get(span.length)
        if cur is None or nll < table[cur]:
            best[span.length] = span
    return dict(sorted(best.items()))


def nested_spans(table: dict[Span, float], lengths: Sequence[int]) -> list[Span]:
    """Nested spans, longest first (shallowest bucket first), one per length, minimizing
    the summed calibration NLL. Exhaustive over the table (it is small)."""
    lengths = sorted(set(lengths), reverse=True)
    options = [[s for s in table if s.length == k] for k in lengths]
    if any(not o for o in options):
        raise ValueError(f"span table lacks some lengths of {lengths}")
    best: tuple[float, list[Span]] | None = None
    # DP would be asymptotically better; the product here is at most a few 10^4.
    for chain in _nested_chains(options):
        cost = sum(table[s] for s in chain)
        if best is None or cost < best[0]:
            best = (cost, list(chain))
    if best is None:
        raise ValueError("no nested chain of spans exists for these lengths")
    return best[1]


def _nested_chains(options: list[list[Span]]) -> Iterable[tuple[Span, ...]]:
    def extend(prefix: tuple[Span, ...], depth: int) -> Iterable[tuple[Span, ...]]:
        if depth == len(options):
            yield prefix
            return
        for s in options[depth]:
            if not prefix or prefix[-1].contains(s):
                yield from extend((*prefix, s), depth + 1)

    return extend((), 0)


def greedy_removal_order(
    model: ReferenceLlama,
    passes: Sequence[FullPass],
    steps: int,
    min_first: int,
    min_last: int,
    progress: bool = True,
) -> list[tuple[int, float]]:
    """Remove, one at a time, the layer whose removal (with those already removed) hurts
    calibration NLL least; returns [(layer, NLL after removing it)]. Sets need not be
    contiguous, so this shows where unconstrained removal would go."""
    num_layers = model.num_layers
    removed: list[int] = []
    order = []
    candidates = list(range(min_first, num_layers - min_last))
    total = steps * len(candidates)
    with tqdm(total=total, desc="greedy removal", unit="eval", disable=not progress) as bar:
        for _ in range(steps):
            scores = {}
            for layer in candidates:
                if layer not in removed:
                    scores[layer] = skip_set_nll(model, passes, [*removed, layer])
                bar.update()
            layer = min(scores, key=scores.__getitem__)
            removed.append(layer)
            order.append((layer, scores[layer]))
    return order


def truncation_nll(
    model: ReferenceLlama, passes: Sequence[FullPass], exits: Iterable[int]
) -> dict[int, float]:
    """Calibration NLL when every token exits after ``a`` layers (plan (a, 0))."""
    return {
        a: span_nll(model, passes, Span(a, model.num_layers))
        for a in exits
        if 0 < a < model.num_layers
    }


def chain_lengths(num_buckets: int, longest: int) -> list[int]:
    """Default span lengths for B nested buckets, longest first: evenly spread up to
    ``longest`` (e.g. B=3, 6 -> [6, 4, 2])."""
    if num_buckets < 1 or longest < num_buckets:
        raise ValueError(f"need 1 <= buckets ({num_buckets}) <= longest span ({longest})")
    return sorted(
        {max(1, round(longest * (i + 1) / num_buckets)) for i in range(num_buckets)},
        reverse=True,
    )


__all__ = [
    "Span",
    "best_per_length",
    "candidate_spans",
    "chain_lengths",
    "greedy_removal_order",
    "nested_spans",
    "skip_set_nll",
    "span_nll",
    "span_table",
    "truncation_nll",
]
