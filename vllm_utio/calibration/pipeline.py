"""The calibration recipe, end to end (what ``vllm-utio calibrate`` runs).

1. Split documents (held-out by title hash; calibration further into fit / tune).
2. Full-depth passes of every window (cached residual streams).
3. Span search on a few fit windows; nested plans for B buckets.
4. Per bucket: ridge low-rank exit adapter, then KL self-distillation of that
   correction under random mixed skipping (the training curve is measured on a few
   held-out windows; it is reported, never used to pick anything).
5. Labels (cost of skipping, per token and bucket) on fit windows; a probe router.
6. Thresholds to the budget on the tune windows (probe, and the engine's surrogate
   score as today's deployable fallback).
7. Held-out quality with document-bootstrap intervals, and random routing at the same
   layer-tokens saved for comparison.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vllm_utio.calibration import data as cdata
from vllm_utio.calibration.adapters import fit_adapter_cv
from vllm_utio.calibration.evaluate import (
    Bucket,
    EvalSet,
    Quality,
    evaluate_levels,
    fit_to_budget,
    static_labels,
)
from vllm_utio.calibration.forward import FullPass, full_passes, mixed_plans, routed_pass
from vllm_utio.calibration.plans import (
    Span,
    candidate_spans,
    chain_lengths,
    nested_spans,
    span_table,
)
from vllm_utio.calibration.routers import (
    ProbeRouter,
    choose_levels,
    fit_linear_probe,
    fit_mlp_probe,
    surrogate_signals,
)
from vllm_utio.calibration.train import TrainConfig, TrainResult, train_correction
from vllm_utio.config import SignalWeights
from vllm_utio.corrections import Correction
from vllm_utio.evaluation.reference import ReferenceLlama


@dataclass
class Settings:
    model: Path
    data: str = "wiki"
    budget: float = 0.03  # relative perplexity increase allowed on held-out text
    buckets: int = 3
    longest_span: int = 6
    lengths: list[int] | None = None  # span lengths, longest first (default from buckets)
    min_first: int = 2  # never skip the first / last two layers (measured: essential)
    min_last: int = 2
    max_start: int | None = None  # restrict the span search (tests)
    window: int = 256
    fit_windows: int = 24
    tune_windows: int = 8
    held_windows: int = 24
    search_windows: int = 2
    rank: int | None = None  # exit-correction rank; None = full (measured: clearly better)
    train_minutes: float = 6.0
    train_steps: int | None = None  # per bucket; if set, steps bound training (reproducible)
    curve_windows: int = 4
    curve_every_s: float = 60.0
    router: str = "linear"  # "linear" | "mlp"
    seed: int = 0
    progress: bool = True


@dataclass
class Prepared:
    """Model, document split and full-depth passes."""

    model: ReferenceLlama
    docs: list[cdata.Document]
    fit: EvalSet
    tune: EvalSet
    held: EvalSet
    counts: dict[str, int]


@dataclass
class Calibrated:
    settings: Settings
    spans: list[Span]
    buckets: list[Bucket]
    adapters_mse: list[float]
    training: list[TrainResult]
    router: ProbeRouter
    surrogate_max_scores: list[float]
    quality: dict[str, dict[str, Any]]
    timings: dict[str, float] = field(default_factory=dict)
    span_table: dict[str, float] = field(default_factory=dict)


def _windows(
    tokenizer: Any, docs: Sequence[cdata.Document], window: int, count: int
) -> list[cdata.Window]:
    # Two windows per document at most, interleaved so a prefix covers many documents.
    return cdata.interleave_by_doc(cdata.make_windows(tokenizer, docs, window, 2))[:count]


def prepare(s: Settings) -> Prepared:
    model = ReferenceLlama.from_pretrained(s.model)
    docs = cdata.load_documents(s.data)
    calib, held = cdata.split_documents(docs)
    fit_docs, tune_docs = cdata.split_calibration(calib)
    tok = cdata.load_tokenizer(s.model)
    sets = {}
    for name, ds, n in (
        ("fit", fit_docs, s.fit_windows),
        ("tune", tune_docs, s.tune_windows),
        ("held", held, s.held_windows),
    ):
        windows = _windows(tok, ds, s.window, n)
        if len(windows) < min(n, 2):
            raise ValueError(f"{name}: only {len(windows)} windows of {s.window} tokens")
        passes = full_passes(model, windows, s.progress, desc=f"full depth ({name})")
        sets[name] = EvalSet.build(model, passes)
    counts = {
        "documents": len(docs),
        "calibration_documents": len(calib),
        "held_out_documents": len(held),
        **{f"{k}_windows": len(v.passes) for k, v in sets.items()},
    }
    return Prepared(model, docs, sets["fit"], sets["tune"], sets["held"], counts)


def search_spans(p: Prepared, s: Settings) -> tuple[list[Span], dict[Span, float]]:
    lengths = s.lengths or chain_lengths(s.buckets, s.longest_span)
    spans = candidate_spans(p.model.num_layers, lengths, s.min_first, s.min_last)
    if s.max_start is not None:
        spans = [x for x in spans if x.start <= s.max_start]
    table = span_table(p.model, p.fit.passes[: s.search_windows], spans, s.progress)
    return nested_spans(table, lengths), table


def fit_adapters(
    p: Prepared, spans: Sequence[Span], rank: int
) -> tuple[list[Correction], list[float]]:
    passes = p.fit.passes
    cut = max(1, len(passes) // 5)  # last fifth validates the ridge strength
    fitted = [fit_adapter_cv(passes[:-cut], passes[-cut:], span, rank) for span in spans]
    return [c for c, _ in fitted], [m for _, m in fitted]


def random_mixed_increase(
    model: ReferenceLlama,
    passes: Sequence[FullPass],
    bucket: Bucket,
    share: float,
    seed: int,
    exclude_skipped_kv: bool = False,
) -> float:
    """Perplexity increase when a random ``share`` of positions skip ``bucket``."""
    gen = torch.Generator().manual_seed(seed)
    num_layers = model.num_layers
    plan = bucket.span.plan(num_layers)
    corr = {plan: bucket.correction} if bucket.correction is not None else {}
    total, count = 0.0, 0
    for fp in passes:
        skip = torch.rand(fp.ids.shape[0], generator=gen) < share
        plans = mixed_plans(skip, plan, num_layers)
        out = routed_pass(model, fp, plans, corr, exclude_skipped_kv)
        total += float((fp.logp - out.logp).sum())
        count += fp.logp.numel()
    return math.expm1(total / count)


def curve_evaluator(
    model: ReferenceLlama, passes: Sequence[FullPass], span: Span
) -> Callable[[Correction], dict[str, float]]:
    """Held-out quality of a correction: every token skipping, and half of them."""

    def evaluate(corr: Correction) -> dict[str, float]:
        b = Bucket(span, corr)
        return {
            "all_skip": random_mixed_increase(model, passes, b, 1.01, 0),
            "half_skip": random_mixed_increase(model, passes, b, 0.5, 0),
        }

    return evaluate


def train_buckets(
    p: Prepared, s: Settings, spans: Sequence[Span], inits: Sequence[Correction]
) -> list[TrainResult]:
    results = []
    if s.train_steps is not None:
        seconds = float("inf") if s.train_steps > 0 else 0.0
    else:
        seconds = s.train_minutes * 60.0 / len(spans)
    for i, (span, init) in enumerate(zip(spans, inits, strict=True)):
        if seconds <= 0:
            results.append(TrainResult(init))
            continue
        cfg = TrainConfig(
            seconds=seconds,
            max_steps=s.train_steps,
            eval_every_s=s.curve_every_s,
            seed=s.seed + i,
        )
        curve = p.held.passes[: s.curve_windows]
        evaluate = curve_evaluator(p.model, curve, span) if curve else None
        results.append(
            train_correction(p.model, p.fit.passes, span, init, cfg, evaluate, s.progress)
        )
    return results


def probe_data(
    p: Prepared, data: EvalSet, buckets: Sequence[Bucket], layer: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states at the routing point [N, H], KL cost per bucket [N, B]); rows of
    unscored positions (each window's last) are dropped."""
    y = torch.stack([static_labels(p.model, data, b).kl for b in buckets], 1)
    keep = data.scored()
    return data.stack(layer)[keep], y[keep]


def fit_router(p: Prepared, s: Settings, buckets: Sequence[Bucket]) -> ProbeRouter:
    layer = min(b.span.start for b in buckets)
    x, y = probe_data(p, p.fit, buckets, layer)
    saved = [b.span.length for b in buckets]
    if s.router == "mlp":
        return fit_mlp_probe(x, y, layer - 1, saved, seed=s.seed)
    return fit_linear_probe(x, y, layer - 1, saved)


def probe_costs(router: ProbeRouter, data: EvalSet) -> torch.Tensor:
    """[N, B] predicted costs for every position of ``data``."""
    return router.scores(data.stack(router.routing_layer + 1))


def lam_knob(costs: torch.Tensor, saved: Sequence[int]) -> Callable[[float], float]:
    """Map u in [0, 1] to lam: u = the share of positions for which *some* bucket is
    worth skipping (quantile of min_j cost_j / saved_j), so bisection is well scaled."""
    ratio = (costs / torch.tensor(saved, dtype=costs.dtype)).min(1).values
    ratio = ratio[ratio.isfinite()].double()

    def lam(u: float) -> float:
        if u <= 0:
            return -1.0
        return float(torch.quantile(ratio, min(u, 1.0))) + 1e-12

    return lam


def threshold_levels(score: torch.Tensor, max_scores: Sequence[float]) -> torch.Tensor:
    """The engine's rule: the first (shallowest) bucket whose max_score exceeds the
    score; NaN scores and scores above every threshold run full depth."""
    levels = torch.full(score.shape, -1, dtype=torch.long)
    for j in reversed(range(len(max_scores))):
        levels[score < max_scores[j]] = j
    return levels


def surrogate_thresholds(score: torch.Tensor, fraction: float, num_buckets: int) -> list[float]:
    """max_score per bucket so that ``fraction`` of ``score``'s positions skip in equal
    bands (valid for UtioConfig: positive, strictly increasing, <= 1)."""
    finite = score[score.isfinite()].double()
    out, prev = [], 0.0
    for j in range(num_buckets):
        q = fraction * (j + 1) / num_buckets
        value = float(torch.quantile(finite, q)) if q > 0 else 0.0
        value = min(1.0, max(value, prev + 1e-6))
        out.append(value)
        prev = value
    return out


def calibrate(s: Settings, p: Prepared | None = None) -> tuple[Prepared, Calibrated]:
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 2)
        clock = now
        if s.progress:  # the stages without a bar of their own say when they finish
            print(f"[calibrate] {name} done in {timings[name]:.0f} s", flush=True)

    p = p or prepare(s)
    lap("full_passes")
    spans, table = search_spans(p, s)
    lap("span_search")
    inits, mse = fit_adapters(p, spans, s.rank)
    lap("adapters")
    training = train_buckets(p, s, spans, inits)
    buckets = [Bucket(span, t.correction) for span, t in zip(spans, training, strict=True)]
    lap("training")
    router = fit_router(p, s, buckets)
    lap("router_fit")
    saved = router.saved_layers
    tune_costs = probe_costs(router, p.tune)
    to_lam = lam_knob(tune_costs, saved)

    def probe_levels(u: float) -> torch.Tensor:
        return choose_levels(tune_costs, saved, to_lam(u))

    u, _ = fit_to_budget(p.model, p.tune, buckets, probe_levels, s.budget, (0.0, 1.0))
    router.lam = to_lam(u)
    routing_layer = router.routing_layer
    tune_sur = surrogate_signals(p.model, p.tune.passes, routing_layer)["surrogate"]
    frac, _ = fit_to_budget(
        p.model,
        p.tune,
        buckets,
        lambda f: threshold_levels(tune_sur, surrogate_thresholds(tune_sur, f, len(buckets))),
        s.budget,
        (0.0, 1.0),
    )
    max_scores = surrogate_thresholds(tune_sur, frac, len(buckets))
    lap("thresholds")
    quality = held_out_quality(p, buckets, router, max_scores, s.seed)
    lap("held_out_eval")
    cal = Calibrated(
        s,
        spans,
        buckets,
        mse,
        training,
        router,
        max_scores,
        quality,
        timings,
        {str(k): v for k, v in table.items()},
    )
    return p, cal


def random_levels_like(levels: torch.Tensor, seed: int) -> torch.Tensor:
    """The same number of positions per bucket as ``levels``, at random positions."""
    gen = torch.Generator().manual_seed(seed)
    return levels[torch.randperm(levels.numel(), generator=gen)]


def held_out_quality(
    p: Prepared,
    buckets: Sequence[Bucket],
    router: ProbeRouter,
    max_scores: Sequence[float],
    seed: int,
) -> dict[str, dict[str, Any]]:
    held_costs = probe_costs(router, p.held)
    probe = choose_levels(held_costs, router.saved_layers, router.lam)
    sur = surrogate_signals(p.model, p.held.passes, router.routing_layer)["surrogate"]
    results: dict[str, Quality] = {
        "probe": evaluate_levels(p.model, p.held, buckets, probe),
        "random_same_saved": evaluate_levels(
            p.model, p.held, buckets, random_levels_like(probe, seed)
        ),
        "surrogate": evaluate_levels(p.model, p.held, buckets, threshold_levels(sur, max_scores)),
    }
    shares = {"probe": probe, "surrogate": threshold_levels(sur, max_scores)}
    out: dict[str, dict[str, Any]] = {k: q.row() | {"tokens": q.tokens} for k, q in results.items()}
    for name, levels in shares.items():
        # share of positions per bucket, shallowest first
        out[name]["bucket_shares"] = [
            float((levels == j).double().mean()) for j in range(len(buckets))
        ]
    return out


def bucket_name(span: Span) -> str:
    return f"skip_{span.start}_{span.stop}"


def training_summary(results: Sequence[TrainResult], spans: Sequence[Span]) -> list[dict[str, Any]]:
    return [
        {
            "bucket": bucket_name(span),
            "steps": r.steps,
            "train_seconds": round(r.train_seconds, 1),
            "cpu_seconds": round(r.cpu_seconds, 1),
            "curve": [
                {"train_seconds": round(c.train_seconds, 1), "steps": c.steps, **c.metrics}
                for c in r.curve
            ],
        }
        for r, span in zip(results, spans, strict=True)
    ]


def manifest_for(p: Prepared, cal: Calibrated, fingerprint: str) -> dict[str, Any]:
    """artifact.json content (save_artifact adds format, version and file names)."""
    s = cal.settings
    num_layers = p.model.num_layers
    buckets = []
    for span, max_score in zip(cal.spans, cal.surrogate_max_scores, strict=True):
        keep_first, keep_last = span.plan(num_layers)
        buckets.append(
            {
                "name": bucket_name(span),
                "max_score": max_score,
                "keep_first": keep_first,
                "keep_last": keep_last,
            }
        )
    return {
        "model": {
            "fingerprint": fingerprint,
            "path": str(s.model),
            "num_layers": num_layers,
            "hidden_size": p.model.config.hidden_size,
        },
        "data": {
            "source": s.data,
            "fingerprint": cdata.data_fingerprint(p.docs),
            "split": "held out: sha256(title) % 3 == 0; of the rest, tune: "
            "(sha256(title) // 3) % 4 == 0, fit: the others",
            "window_tokens": s.window,
            **p.counts,
        },
        "budget_ppl": s.budget,
        "buckets": buckets,
        "router": {
            "type": f"probe-{cal.router.kind}",
            "target": cal.router.target,
            "routing_layer": cal.router.routing_layer,
            "lam": cal.router.lam,
            "saved_layers": cal.router.saved_layers,
            "fallback": "router='surrogate': the surrogate score with the buckets' "
            "calibrated max_score thresholds",
            "signal": SignalWeights().model_dump(),
        },
        "quality": {"held_out": cal.quality},
        "adapters": {
            "rank": s.rank,
            "relative_mse": dict(
                zip([bucket_name(x) for x in cal.spans], cal.adapters_mse, strict=True)
            ),
        },
        "training": training_summary(cal.training, cal.spans),
        "timings_s": cal.timings,
        "settings": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(s).items()
            if k not in ("progress",)
        },
    }
