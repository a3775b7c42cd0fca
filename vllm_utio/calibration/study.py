"""The calibration study behind docs/calibration.md (slow: a few CPU hours).

``python -m vllm_utio.calibration.study --out DIR`` runs each stage once and keeps its
result in ``DIR/results.json`` (and the full-depth passes in ``DIR/passes.pt``), so an
interrupted study resumes. Stages: span table and truncation, greedy removal order,
exit adapters, correction training (curve on held-out windows), single-bucket router
comparison at equal compute, nested multi-bucket routing (single routing point vs
cascade), operating points for several perplexity budgets.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from vllm_utio.calibration.adapters import fit_adapter_cv
from vllm_utio.calibration.data import Window
from vllm_utio.calibration.evaluate import (
    Bucket,
    EvalSet,
    Quality,
    evaluate_levels,
    fit_to_budget,
    static_labels,
)
from vllm_utio.calibration.forward import FullPass
from vllm_utio.calibration.pipeline import (
    Prepared,
    Settings,
    bucket_name,
    lam_knob,
    prepare,
    probe_data,
    random_levels_like,
    random_mixed_increase,
    train_buckets,
    training_summary,
)
from vllm_utio.calibration.plans import (
    Span,
    best_per_length,
    candidate_spans,
    greedy_removal_order,
    nested_spans,
    span_nll,
    span_table,
    truncation_nll,
)
from vllm_utio.calibration.routers import (
    ProbeRouter,
    band_levels,
    choose_levels,
    fit_linear_probe,
    fit_mlp_probe,
    spearman,
    surrogate_signals,
)
from vllm_utio.corrections import Correction, load_correction, save_correction
from vllm_utio.paths import default_model_dir

SIGNALS = ("surrogate", "entropy", "varentropy", "outlier", "attention_heat")


class Study:
    """Stage results cached in one JSON file; corrections as safetensors beside it."""

    def __init__(self, out: Path, settings: Settings, held_limit: int | None = None) -> None:
        self.out = out
        self.settings = settings
        self.held_limit = held_limit  # use only the first N held-out windows (faster)
        out.mkdir(parents=True, exist_ok=True)
        self.file = out / "results.json"
        self.results: dict[str, Any] = (
            json.loads(self.file.read_text()) if self.file.is_file() else {}
        )
        self.p = self._prepared()

    def _prepared(self) -> Prepared:
        cache = self.out / "passes.pt"
        if not cache.is_file():
            p = prepare(self.settings)
            torch.save(
                {
                    name: [(fp.window, fp.streams, fp.logp) for fp in getattr(p, name).passes]
                    for name in ("fit", "tune", "held")
                }
                | {"counts": p.counts},
                cache,
            )
            return p
        from vllm_utio.calibration import data as cdata
        from vllm_utio.evaluation.reference import ReferenceLlama

        model = ReferenceLlama.from_pretrained(self.settings.model)
        # weights_only: tensors, plain containers and Windows; never unpickle arbitrary
        # objects from a file in a user-chosen directory
        with torch.serialization.safe_globals([cdata.Window]):
            raw = torch.load(cache, weights_only=True)
        if self.held_limit is not None:
            raw["held"] = raw["held"][: self.held_limit]
        sets = {
            name: EvalSet.build(model, [FullPass(w, s, lp) for w, s, lp in raw[name]])
            for name in ("fit", "tune", "held")
        }
        docs = cdata.load_documents(self.settings.data)
        return Prepared(model, docs, sets["fit"], sets["tune"], sets["held"], raw["counts"])

    def stage(self, name: str, fn: Callable[[], Any]) -> Any:
        if name not in self.results:
            start = time.perf_counter()
            print(f"[study] {name} ...", flush=True)
            value = fn()
            self.results[name] = value
            self.results.setdefault("stage_seconds", {})[name] = round(time.perf_counter() - start)
            self.file.write_text(json.dumps(self.results, indent=1))
        return self.results[name]

    # ---------------------------------------------------------------- corrections
    def correction(self, name: str) -> Correction | None:
        path = self.out / f"{name}.safetensors"
        if not path.is_file():
            return None
        return load_correction(path, self.p.model.config.hidden_size, torch.float32)

    def save(self, name: str, corr: Correction) -> None:
        save_correction(self.out / f"{name}.safetensors", corr)


def _pct(x: float) -> float:
    return round(100.0 * x, 2)


def _quality(q: Quality) -> dict[str, float]:
    return {
        "ppl_pct": _pct(q.ppl_increase),
        "ci_pct": [_pct(q.interval[0]), _pct(q.interval[1])],
        "saved_pct": _pct(q.saved),
        "top1_agree_pct": _pct(q.top1_agreement),
    }


# ------------------------------------------------------------------------- stages


def stage_spans(st: Study, windows: int) -> dict[str, Any]:
    p = st.p
    passes = p.fit.passes[:windows]
    full = float(torch.cat([-fp.logp for fp in passes]).mean())
    spans = candidate_spans(p.model.num_layers, [1, 2, 3, 4, 6, 8], 1, 1)
    table = span_table(p.model, passes, spans)
    trunc = truncation_nll(p.model, passes, [20, 24, 26, 28, 29])
    return {
        "tokens": sum(fp.logp.numel() for fp in passes),
        "full_ppl": math.exp(full),
        "table": [[s.start, s.stop, _pct(math.expm1(v - full))] for s, v in table.items()],
        "best": {
            str(k): [s.start, s.stop, _pct(math.expm1(table[s] - full))]
            for k, s in best_per_length(table).items()
        },
        "truncation": {str(a): _pct(math.expm1(v - full)) for a, v in trunc.items()},
        "nested_6_4_2": [[s.start, s.stop] for s in nested_spans(table, [6, 4, 2])],
    }


def stage_greedy(st: Study, windows: int, steps: int) -> list[list[float]]:
    p = st.p
    passes = p.fit.passes[:windows]
    full = float(torch.cat([-fp.logp for fp in passes]).mean())
    order = greedy_removal_order(p.model, passes, steps, 1, 1)
    return [[layer, _pct(math.expm1(nll - full))] for layer, nll in order]


def stage_adapters(st: Study, spans: Sequence[Span], eval_windows: int) -> list[dict[str, Any]]:
    """Identity vs ridge (full rank, rank 64, rank 16) on held-out windows."""
    p = st.p
    held = p.held.passes[:eval_windows]
    fit = p.fit.passes
    cut = max(1, len(fit) // 5)
    full = float(torch.cat([-fp.logp for fp in held]).mean())
    rows = []
    for span in spans:
        row: dict[str, Any] = {"span": str(span)}
        for label, rank in (("identity", 0), ("full_rank", None), ("rank64", 64), ("rank16", 16)):
            corr, mse = (
                (None, 1.0) if rank == 0 else fit_adapter_cv(fit[:-cut], fit[-cut:], span, rank)
            )
            row[label] = {
                "val_rel_mse": round(mse, 3),
                "all_skip_pct": _pct(math.expm1(span_nll(p.model, held, span, corr) - full)),
                "half_skip_pct": _pct(
                    random_mixed_increase(p.model, held, Bucket(span, corr), 0.5, 0)
                ),
            }
        rows.append(row)
    return rows


def stage_training(
    st: Study, spans: Sequence[Span], minutes: float, rank: int | None
) -> list[dict[str, Any]]:
    from vllm_utio.calibration.pipeline import fit_adapters

    s = st.settings
    settings = Settings(
        **{**vars(s), "train_minutes": minutes, "curve_every_s": minutes * 60 / len(spans) / 6}
    )
    inits, _ = fit_adapters(st.p, spans, rank)
    results = train_buckets(st.p, settings, spans, inits)
    for span, r in zip(spans, results, strict=True):
        st.save(bucket_name(span), r.correction)
    return training_summary(results, spans)


def stage_truncation(st: Study, exits: Sequence[int], eval_windows: int) -> list[dict[str, Any]]:
    """Early exit (plan (a, 0)) with and without a full-rank ridge exit adapter, and how
    far the stream still moves in the layers truncation drops."""
    p = st.p
    held = p.held.passes[:eval_windows]
    fit = p.fit.passes
    cut = max(1, len(fit) // 5)
    full = float(torch.cat([-fp.logp for fp in held]).mean())
    num_layers = p.model.num_layers
    rows = []
    for a in exits:
        span = Span(a, num_layers)
        corr, mse = fit_adapter_cv(fit[:-cut], fit[-cut:], span, None)
        x = torch.cat([fp.streams[a] for fp in held])
        y = torch.cat([fp.streams[num_layers] for fp in held])
        rows.append(
            {
                "exit_after": a,
                "plain_pct": _pct(math.expm1(span_nll(p.model, held, span) - full)),
                "adapter_pct": _pct(math.expm1(span_nll(p.model, held, span, corr) - full)),
                "adapter_rel_mse": round(mse, 3),
                # |y - x| / |y|: share of the final stream the dropped layers still write
                "dropped_update_share": round(float((y - x).norm() / y.norm()), 3),
            }
        )
    return rows


def stage_kv_what_if(st: Study, spans: Sequence[Span], windows: int) -> list[dict[str, Any]]:
    """Random mixed skipping under the engine's frozen-state K/V vs a what-if policy in
    which deeper queries ignore skipped positions at the layers they skip."""
    held = st.p.held.passes[:windows]
    rows = []
    for span in spans:
        for label, corr in (("identity", None), ("trained", st.correction(bucket_name(span)))):
            for share in (0.2, 0.5):
                b = Bucket(span, corr)
                rows.append(
                    {
                        "span": str(span),
                        "correction": label,
                        "share": share,
                        "frozen_kv_pct": _pct(random_mixed_increase(st.p.model, held, b, share, 0)),
                        "exclude_kv_pct": _pct(
                            random_mixed_increase(st.p.model, held, b, share, 0, True)
                        ),
                    }
                )
                print(f"[kv] {rows[-1]}", flush=True)
    return rows


def _costs_for_families(
    st: Study, bucket: Bucket, routing_layer: int
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Per-position costs on the held set for every router family (lower = skip first),
    and each cost's Spearman correlation with the held-out per-token NLL increase."""
    p = st.p
    gen = torch.Generator().manual_seed(0)
    held_labels = static_labels(p.model, p.held, bucket)
    sig = surrogate_signals(p.model, p.held.passes, routing_layer)
    costs: dict[str, torch.Tensor] = {"random": torch.rand(p.held.num_positions, generator=gen)}
    costs.update({name: sig[name] for name in SIGNALS})
    keep = p.fit.scored()
    fit_labels = static_labels(p.model, p.fit, bucket)
    x = p.fit.stack(routing_layer + 1)[keep]
    held_x = p.held.stack(routing_layer + 1)
    saved = [bucket.span.length]
    for name, target in (
        ("kl", fit_labels.kl),
        ("dnll", fit_labels.dnll),
        ("top1", fit_labels.flip),
    ):
        y = target[keep, None]
        costs[f"probe_{name}"] = fit_linear_probe(x, y, routing_layer, saved).scores(held_x)[:, 0]
    y = fit_labels.kl[keep, None]
    costs["probe_mlp_kl"] = fit_mlp_probe(x, y, routing_layer, saved).scores(held_x)[:, 0]
    costs["oracle"] = held_labels.dnll
    rho = {k: round(spearman(v, held_labels.dnll), 3) for k, v in costs.items()}
    return costs, rho


def stage_routers(
    st: Study, span: Span, fractions: Sequence[float], with_correction: bool
) -> dict[str, Any]:
    p = st.p
    corr = st.correction(bucket_name(span)) if with_correction else None
    bucket = Bucket(span, corr)
    costs, rho = _costs_for_families(st, bucket, span.start - 1)
    rows = []
    for family, cost in costs.items():
        for f in fractions:
            q = evaluate_levels(p.model, p.held, [bucket], band_levels(cost, f, 1))
            rows.append({"family": family, "fraction": f, **_quality(q)})
            print(f"[routers] {span} {family} f={f}: {rows[-1]}", flush=True)
    return {"span": str(span), "correction": corr is not None, "spearman": rho, "rows": rows}


def _multi_costs(st: Study, buckets: Sequence[Bucket]) -> dict[str, torch.Tensor]:
    """[N, B] held-set costs per family for nested buckets."""
    p = st.p
    first = min(b.span.start for b in buckets)
    saved = [b.span.length for b in buckets]
    x, y = probe_data(p, p.fit, buckets, first)
    out = {
        "probe_single_point": fit_linear_probe(x, y, first - 1, saved).scores(p.held.stack(first))
    }
    # Cascade: bucket j's probe reads the stream entering its own first skipped layer.
    keep = p.fit.scored()
    cascade = []
    for j, b in enumerate(buckets):
        xj = p.fit.stack(b.span.start)[keep]
        probe = fit_linear_probe(xj, y[:, j : j + 1], b.span.start - 1, [saved[j]])
        cascade.append(probe.scores(p.held.stack(b.span.start))[:, 0])
    out["probe_cascade"] = torch.stack(cascade, 1)
    labels = [static_labels(p.model, p.held, b).dnll for b in buckets]
    out["oracle"] = torch.stack(labels, 1)
    return out


def stage_multi(
    st: Study, spans: Sequence[Span], quantiles: Sequence[float]
) -> list[dict[str, Any]]:
    p = st.p
    buckets = [Bucket(s, st.correction(bucket_name(s))) for s in spans]
    saved = [s.length for s in spans]
    costs = _multi_costs(st, buckets)
    sur = surrogate_signals(p.model, p.held.passes, spans[0].start - 1)["surrogate"]
    rows = []
    for u in quantiles:
        probe_levels = None
        for family, cost in costs.items():
            levels = choose_levels(cost, saved, lam_knob(cost, saved)(u))
            if family == "probe_single_point":
                probe_levels = levels
            q = evaluate_levels(p.model, p.held, buckets, levels)
            rows.append({"family": family, "u": u, **_quality(q)})
        assert probe_levels is not None
        q = evaluate_levels(p.model, p.held, buckets, random_levels_like(probe_levels, 0))
        rows.append({"family": "random_same_counts", "u": u, **_quality(q)})
        frac = float((probe_levels >= 0).double().mean())
        q = evaluate_levels(p.model, p.held, buckets, band_levels(sur, frac, len(buckets)))
        rows.append({"family": "surrogate_bands", "u": u, **_quality(q)})
        print(f"[multi] u={u}: {rows[-5:]}", flush=True)
    return rows


def stage_budgets(
    st: Study, spans: Sequence[Span], budgets: Sequence[float]
) -> list[dict[str, Any]]:
    """Thresholds chosen on the tune documents, judged on the held-out ones."""
    p = st.p
    buckets = [Bucket(s, st.correction(bucket_name(s))) for s in spans]
    saved = [s.length for s in spans]
    first = min(s.start for s in spans)
    x, y = probe_data(p, p.fit, buckets, first)
    router: ProbeRouter = fit_linear_probe(x, y, first - 1, saved)
    tune_costs = router.scores(p.tune.stack(first))
    held_costs = router.scores(p.held.stack(first))
    to_lam = lam_knob(tune_costs, saved)
    rows = []
    for budget in budgets:
        u, tune_q = fit_to_budget(
            p.model,
            p.tune,
            buckets,
            lambda u: choose_levels(tune_costs, saved, to_lam(u)),
            budget,
            (0.0, 1.0),
        )
        levels = choose_levels(held_costs, saved, to_lam(u))
        held_q = evaluate_levels(p.model, p.held, buckets, levels)
        rand_q = evaluate_levels(p.model, p.held, buckets, random_levels_like(levels, 0))
        rows.append(
            {
                "budget_pct": _pct(budget),
                "lam": to_lam(u),
                "tune": _quality(tune_q) if tune_q else None,
                "held_out": _quality(held_q),
                "random_same_counts": _quality(rand_q),
                "bucket_shares_pct": [
                    _pct(float((levels == j).double().mean())) for j in range(len(spans))
                ],
            }
        )
        print(f"[budgets] {rows[-1]}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-minutes", type=float, default=48.0)
    parser.add_argument("--stages", default="all", help="comma list, or 'all'")
    parser.add_argument("--report", action="store_true", help="print tables of DIR and exit")
    parser.add_argument(
        "--held-limit", type=int, default=None, help="held-out windows for the routing stages"
    )
    parser.add_argument("--fractions", default="0.05,0.1,0.2,0.4", help="routers: skip shares")
    parser.add_argument("--quantiles", default="0.05,0.1,0.2,0.35", help="multi: operating points")
    parser.add_argument("--budgets", default="0.02,0.03,0.05,0.1", help="budgets: ppl budgets")
    args = parser.parse_args(argv)
    if args.report:
        print(render(json.loads((args.out / "results.json").read_text())))
        return 0
    torch.set_num_threads(args.threads)
    settings = Settings(
        model=args.model or default_model_dir(),
        fit_windows=48,
        tune_windows=16,
        held_windows=48,
        curve_windows=6,
    )
    st = Study(args.out, settings, args.held_limit)

    def floats(text: str) -> tuple[float, ...]:
        return tuple(float(x) for x in text.split(","))

    want = set(args.stages.split(",")) if args.stages != "all" else None

    def run(name: str, fn: Callable[[], Any]) -> Any:
        if want is None or name in want or name in st.results:
            return st.stage(name, fn)
        return None

    nested = [Span(13, 19), Span(15, 19), Span(17, 19)]
    run("spans", lambda: stage_spans(st, 4))
    run("greedy", lambda: stage_greedy(st, 2, 6))
    run("adapters", lambda: stage_adapters(st, [Span(17, 19), Span(15, 19), Span(13, 19)], 8))
    run("training", lambda: stage_training(st, nested, args.train_minutes, None))
    run("truncation", lambda: stage_truncation(st, [24, 26, 28], 8))
    run("kv_what_if", lambda: stage_kv_what_if(st, [Span(15, 19)], 12))
    if args.held_limit is not None:
        st.results["routing_held_windows"] = args.held_limit
    fractions = floats(args.fractions)
    run("routers_4", lambda: stage_routers(st, Span(15, 19), fractions, True))
    run("multi", lambda: stage_multi(st, nested, floats(args.quantiles)))
    run("budgets", lambda: stage_budgets(st, nested, floats(args.budgets)))
    _ = Window  # the pickled passes hold Window objects
    return 0


# ------------------------------------------------------------------------- report


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _ci(q: dict[str, Any]) -> str:
    lo, hi = q["ci_pct"]
    return f"{q['ppl_pct']:+.1f}% [{lo:+.1f}, {hi:+.1f}]"


def render(results: dict[str, Any]) -> str:
    """Markdown tables of every finished stage (for docs/calibration.md)."""
    out = []
    if "spans" in results:
        s = results["spans"]
        out.append(f"Span search ({s['tokens']} fit tokens, full ppl {s['full_ppl']:.2f}):")
        rows = [[k, f"[{a},{b})", f"{v:+.1f}%"] for k, (a, b, v) in s["best"].items()]
        out.append(_table(["k", "best span", "ppl change"], rows))
        out.append(_table(["exit after layer", "ppl change"], list(s["truncation"].items())))
    if "greedy" in results:
        out.append(
            _table(
                ["step", "layer removed", "ppl change"],
                [[i + 1, *r] for i, r in enumerate(results["greedy"])],
            )
        )
    if "adapters" in results:
        rows = []
        for r in results["adapters"]:
            for k in ("identity", "rank16", "rank64", "full_rank"):
                v = r[k]
                rows.append(
                    [
                        r["span"],
                        k,
                        v["val_rel_mse"],
                        f"{v['all_skip_pct']:+.1f}%",
                        f"{v['half_skip_pct']:+.1f}%",
                    ]
                )
        out.append(_table(["span", "adapter", "rel. MSE", "all skip", "half skip"], rows))
    if "training" in results:
        rows = []
        for b in results["training"]:
            for c in b["curve"]:
                rows.append(
                    [
                        b["bucket"],
                        c["train_seconds"],
                        c["steps"],
                        f"{100 * c['all_skip']:+.1f}%",
                        f"{100 * c['half_skip']:+.1f}%",
                    ]
                )
        out.append(_table(["bucket", "train s", "steps", "all skip", "half skip"], rows))
    if "truncation" in results:
        rows = [
            [
                r["exit_after"],
                f"{r['plain_pct']:+.0f}%",
                f"{r['adapter_pct']:+.0f}%",
                r["adapter_rel_mse"],
                r["dropped_update_share"],
            ]
            for r in results["truncation"]
        ]
        out.append(_table(["exit after", "plain", "ridge adapter", "rel. MSE", "|y-x|/|y|"], rows))
    if "kv_what_if" in results:
        rows = [
            [
                r["span"],
                r["correction"],
                r["share"],
                f"{r['frozen_kv_pct']:+.1f}%",
                f"{r['exclude_kv_pct']:+.1f}%",
            ]
            for r in results["kv_what_if"]
        ]
        out.append(
            _table(["span", "correction", "skip share", "frozen K/V", "exclude skipped K/V"], rows)
        )
    for key in [k for k in results if k.startswith("routers")]:
        r = results[key]
        out.append(
            f"Routers on {r['span']} (correction: {r['correction']}); "
            "Spearman with the per-token NLL increase:"
        )
        out.append(_table(["family", "spearman"], list(r["spearman"].items())))
        fractions = sorted({row["fraction"] for row in r["rows"]})
        by = {(row["family"], row["fraction"]): row for row in r["rows"]}
        families = list(dict.fromkeys(row["family"] for row in r["rows"]))
        header = ["family"] + [f"{by[(families[0], f)]['saved_pct']:.2f}% saved" for f in fractions]
        out.append(
            _table(header, [[fam] + [_ci(by[(fam, f)]) for f in fractions] for fam in families])
        )
    if "multi" in results:
        rows = [
            [r["family"], r["u"], f"{r['saved_pct']:.2f}%", _ci(r), f"{r['top1_agree_pct']:.1f}%"]
            for r in results["multi"]
        ]
        out.append(_table(["family", "u", "saved", "ppl change [95% CI]", "top-1 agree"], rows))
    if "budgets" in results:
        rows = [
            [
                f"{r['budget_pct']}%",
                f"{r['held_out']['saved_pct']:.2f}%",
                _ci(r["held_out"]),
                _ci(r["random_same_counts"]),
                r["bucket_shares_pct"],
            ]
            for r in results["budgets"]
        ]
        out.append(
            _table(
                ["budget", "saved", "probe (held-out)", "random, same counts", "bucket shares %"],
                rows,
            )
        )
    return "\n\n".join(out) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
