"""Quality of routed runs: per-token labels, perplexity change with document bootstrap,
layer-tokens saved, and the search for the operating point that meets a budget.

Perplexity change is ``exp(mean NLL_routed - mean NLL_full) - 1`` over the scored
positions of a set of windows; its interval resamples *documents* (windows of one
document move together). "Saved" is skipped layer-tokens / all layer-tokens of the set.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from vllm_utio.calibration.forward import (
    Delta,
    FullPass,
    correction_fixes,
    logits_of,
    routed_pass,
    run_layers,
    runs_mask,
    target_logp,
    uniform_plans,
)
from vllm_utio.calibration.plans import Span
from vllm_utio.evaluation.reference import ReferenceLlama


@dataclass
class Bucket:
    """A skipped span and its correction (None = identity)."""

    span: Span
    correction: Delta | None = None


@dataclass
class EvalSet:
    """Full-depth passes plus what every routed run is compared to."""

    passes: list[FullPass]
    full_top1: list[torch.Tensor]  # [T - 1] per window

    @classmethod
    def build(cls, model: ReferenceLlama, passes: Sequence[FullPass]) -> EvalSet:
        with torch.no_grad():
            top1 = [logits_of(model, p.streams[-1])[:-1].argmax(-1) for p in passes]
        return cls(list(passes), top1)

    @property
    def sizes(self) -> list[int]:
        return [p.ids.shape[0] for p in self.passes]

    @property
    def num_positions(self) -> int:
        return sum(self.sizes)

    def scored(self) -> torch.Tensor:
        """[N] bool: False at each window's last position (it predicts nothing)."""
        return torch.cat([torch.arange(n) < n - 1 for n in self.sizes])

    def stack(self, layer: int) -> torch.Tensor:
        """[N, H]: the full-depth stream entering ``layer`` at every position."""
        return torch.cat([fp.streams[layer] for fp in self.passes])

    def split(self, values: torch.Tensor) -> list[torch.Tensor]:
        """Per-window views of a per-position tensor [N]."""
        return list(values.split(self.sizes))


@dataclass
class Quality:
    ppl_increase: float  # relative, 0.03 = +3%
    interval: tuple[float, float]  # bootstrap 95% over documents
    saved: float  # share of layer-tokens skipped
    top1_agreement: float
    tokens: int

    def row(self) -> dict[str, float]:
        return {
            "ppl_increase": self.ppl_increase,
            "ci_low": self.interval[0],
            "ci_high": self.interval[1],
            "saved": self.saved,
            "top1_agreement": self.top1_agreement,
        }


def bootstrap_increase(
    docs: Sequence[int],
    dnll_sums: Sequence[float],
    counts: Sequence[int],
    samples: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """95% percentile interval of exp(sum dnll / sum count) - 1, resampling documents."""
    per_doc: dict[int, list[float]] = {}
    for d, s, c in zip(docs, dnll_sums, counts, strict=True):
        acc = per_doc.setdefault(d, [0.0, 0.0])
        acc[0] += s
        acc[1] += c
    table = torch.tensor(list(per_doc.values()), dtype=torch.float64)  # [D, 2]
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(table), (samples, len(table)), generator=gen)
    picked = table[idx].sum(1)  # [samples, 2]
    stats = torch.expm1(picked[:, 0] / picked[:, 1])
    lo, hi = torch.quantile(stats, torch.tensor([0.025, 0.975], dtype=torch.float64))
    return float(lo), float(hi)


def plans_for(levels: torch.Tensor, buckets: Sequence[Bucket], num_layers: int) -> torch.Tensor:
    """[T, 2] per-position plans for bucket indices ``levels`` [T] (-1 = full depth)."""
    table = torch.tensor([[num_layers, 0]] + [list(b.span.plan(num_layers)) for b in buckets])
    return table[levels + 1]


def evaluate_levels(
    model: ReferenceLlama,
    data: EvalSet,
    buckets: Sequence[Bucket],
    levels: torch.Tensor,
    progress: bool = False,
) -> Quality:
    """Routed quality of ``data`` with position i sent to bucket ``levels[i]``."""
    num_layers = model.num_layers
    corrections = {
        b.span.plan(num_layers): b.correction for b in buckets if b.correction is not None
    }
    sums, counts, docs = [], [], []
    agree = 0
    skipped_layers = torch.tensor([0] + [b.span.length for b in buckets])
    saved = float(skipped_layers[levels + 1].sum()) / (data.num_positions * num_layers)
    parts = data.split(levels)
    for fp, top1, lv in tqdm(
        list(zip(data.passes, data.full_top1, parts, strict=True)),
        desc="routed",
        unit="win",
        disable=not progress,
        leave=False,
    ):
        if bool((lv < 0).all()):
            routed_logp, routed_top1 = fp.logp, top1
        else:
            out = routed_pass(model, fp, plans_for(lv, buckets, num_layers), corrections)
            routed_logp, routed_top1 = out.logp, out.top1
        sums.append(float((fp.logp - routed_logp).sum()))
        counts.append(fp.logp.numel())
        docs.append(fp.window.doc)
        agree += int((routed_top1 == top1).sum())
    total = sum(counts)
    increase = math.expm1(sum(sums) / total)
    return Quality(increase, bootstrap_increase(docs, sums, counts), saved, agree / total, total)


@dataclass
class Labels:
    """Per position [N] (NaN at each window's last, unscored, position): what skipping
    a bucket costs when every token skips it."""

    dnll: torch.Tensor  # NLL increase of the actual next token
    kl: torch.Tensor  # KL(full || skipped) of the next-token distribution
    flip: torch.Tensor  # 1.0 where the top-1 token changes


@torch.no_grad()
def static_labels(model: ReferenceLlama, data: EvalSet, bucket: Bucket) -> Labels:
    num_layers = model.num_layers
    plan = bucket.span.plan(num_layers)
    corrections = {plan: bucket.correction} if bucket.correction is not None else {}
    dnll, kl, flip = [], [], []
    for fp, top1 in zip(data.passes, data.full_top1, strict=True):
        t = fp.ids.shape[0]
        plans = uniform_plans(plan, t)
        stream = run_layers(
            model,
            fp.streams[bucket.span.start],
            bucket.span.start,
            num_layers,
            runs_mask(plans, num_layers),
            correction_fixes(plans, corrections, num_layers),
        )
        logits = logits_of(model, stream)
        full = torch.log_softmax(logits_of(model, fp.streams[num_layers]), -1)
        skip = torch.log_softmax(logits, -1)
        pad = torch.tensor([math.nan])
        dnll.append(torch.cat([fp.logp - target_logp(logits, fp.ids), pad]))
        kl.append(torch.cat([(full.exp() * (full - skip)).sum(-1)[:-1], pad]))
        flip.append(torch.cat([(skip[:-1].argmax(-1) != top1).float(), pad]))
    return Labels(torch.cat(dnll), torch.cat(kl), torch.cat(flip))


Knob = Callable[[float], torch.Tensor]  # operating-point knob -> levels [N]


def fit_to_budget(
    model: ReferenceLlama,
    data: EvalSet,
    buckets: Sequence[Bucket],
    levels_at: Knob,
    budget: float,
    knob_range: tuple[float, float],
    iterations: int = 6,
) -> tuple[float, Quality | None]:
    """Bisect the knob (monotone: larger = more skipping) for the largest value whose
    perplexity increase on ``data`` stays within ``budget``; (knob, its quality), or
    (lower end, None) if even that breaks the budget."""
    lo, hi = knob_range
    best: tuple[float, Quality | None] = (lo, None)
    q_hi = evaluate_levels(model, data, buckets, levels_at(hi))
    if q_hi.ppl_increase <= budget:
        return hi, q_hi
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        q = evaluate_levels(model, data, buckets, levels_at(mid))
        if q.ppl_increase <= budget:
            lo, best = mid, (mid, q)
        else:
            hi = mid
    return best


def budget_table(results: Mapping[float, Quality]) -> list[dict[str, float]]:
    return [{"budget": b, **q.row()} for b, q in sorted(results.items())]
