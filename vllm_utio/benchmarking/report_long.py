"""Report sections of long-context results (``bench-long``, ``eval-long --attach``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

KIND = "long-context"
DENSE = "utio-dense"  # same engine as the '-all' policies: their speedup reference
VANILLA = "vanilla"


def is_long(results: dict[str, Any]) -> bool:
    return results.get("settings", {}).get("kind") == KIND


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "–" if value is None else format(value, spec)


def _pct(value: float | None, spec: str = ".0f") -> str:
    return "–" if value is None else format(100 * value, spec) + "%"


def _ratio(row: dict, base: dict | None) -> str:
    if not base or not base.get("decode_tok_s") or not row.get("decode_tok_s"):
        return "–"
    return f"{row['decode_tok_s'] / base['decode_tok_s']:.2f}x"


def _ceiling(share: float | None) -> str:
    # the speedup if attention cost nothing: what any sparse policy can at most reach
    return "–" if share is None or share >= 1.0 else f"{1.0 / (1.0 - share):.2f}x"


def speed_table(results: dict[str, Any]) -> list[str]:
    """Decode speed, step latency and attention share per context, batch and config;
    ceiling = 1 / (1 - attention share), the speedup if attention took no time."""
    idx = {(r["config"], r["batch"], r["prompt_len"]): r for r in results["summary"]}
    lines = [
        "| context | batch | config | decode tok/s (min–max) | step ms | vs utio-dense | "
        "vs vanilla | attention ms/step (share) | ceiling | KV read | sparse tokens | "
        "selection ms/step (share) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {c["name"]: i for i, c in enumerate(results["configs"])}
    rows = sorted(
        results["summary"],
        key=lambda r: (r["prompt_len"], r["batch"], order.get(r["config"], 99)),
    )
    for r in rows:
        shape = (r["batch"], r["prompt_len"])
        lines.append(
            f"| {r['prompt_len']} | {r['batch']} | {r['config']} | {_fmt(r['decode_tok_s'])} "
            f"({_fmt(r['decode_tok_s_min'], '.0f')}–{_fmt(r['decode_tok_s_max'], '.0f')}) | "
            f"{_fmt(r['step_ms'])} | {_ratio(r, idx.get((DENSE, *shape)))} | "
            f"{_ratio(r, idx.get((VANILLA, *shape)))} | {_fmt(r.get('attn_ms'))} "
            f"({_pct(r.get('attention_share'))}) | {_ceiling(r.get('attention_share'))} | "
            f"{_pct(r.get('kv_read_fraction'))} | "
            f"{_pct(r.get('sparse_share'))} | {_selection(r)} |"
        )
    return lines


def _selection(row: dict) -> str:
    """Policy 'select''s own time per decode step (bounds, top-k, metadata, summaries)."""
    ms = row.get("select_ms")
    if not ms:  # no select rows (or a results file from before the policy existed)
        return "–"
    return f"{_fmt(ms)} ({_pct(row.get('select_share'))})"


def plot_speed(results: dict[str, Any], path: Path) -> Path:
    """Decode tok/s vs context length, one line per config, one panel per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in results["summary"]})
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.2), squeeze=False)
    for ax, batch in zip(axes[0], batches, strict=True):
        rows = [r for r in results["summary"] if r["batch"] == batch]
        for config in dict.fromkeys(r["config"] for r in rows):
            pts = sorted((r["prompt_len"], r) for r in rows if r["config"] == config)
            ys = [r["decode_tok_s"] for _, r in pts]
            lo = [r["decode_tok_s"] - r["decode_tok_s_min"] for _, r in pts]
            hi = [r["decode_tok_s_max"] - r["decode_tok_s"] for _, r in pts]
            xs = [x for x, _ in pts]
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=config)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (prompt tokens)")
        ax.set_ylabel("decode tokens/s (median, min–max)")
        ax.set_title(f"batch {batch}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _passed(passed: int, total: int, ci: list[float | None]) -> str:
    return f"{passed}/{total} ({_pct(ci[0])} .. {_pct(ci[1])})"


def _retrieval(row: dict[str, Any]) -> str:
    if "retrieval_passed" in row:
        return _passed(row["retrieval_passed"], row["retrieval_total"], row["retrieval_ci"])
    # results of eval-long before the retrieval cases: one kind of needle
    return _passed(row["needle_passed"], row["needle_total"], row["needle_ci"])


def quality_table(long_quality: dict[str, Any]) -> list[str]:
    lines = [
        "| context | config | ppl | ppl Δ (95% CI) | top-1 agree | greedy agree | "
        "retrieval passed (95% CI) | sparse tokens | KV read |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in long_quality["summary"]:
        lo, hi = r["ppl_delta_ci"]
        lines.append(
            f"| {r['context']} | {r['config']} | {_fmt(r['ppl'], '.3f')} | "
            f"{_pct(r['ppl_delta'], '+.1f')} ({_pct(lo, '+.1f')} .. {_pct(hi, '+.1f')}) | "
            f"{_pct(r['top1_agreement'], '.1f')} | {_pct(r['greedy_agreement'], '.1f')} | "
            f"{_retrieval(r)} | "
            f"{_pct(r.get('sparse_share'))} | {_pct(r.get('kv_read_fraction'))} |"
        )
    return lines


def retrieval_table(long_quality: dict[str, Any]) -> list[str]:
    """Retrieval passes per kind (95% Wilson CI) and the judgement vs UTIO dense; empty
    for results without retrieval kinds."""
    rows = [r for r in long_quality["summary"] if r.get("retrieval_by_kind")]
    if not rows:
        return []
    kinds = list(dict.fromkeys(k for r in rows for k in r["retrieval_by_kind"]))
    lines = [
        "| context | config | " + " | ".join(kinds) + " | overall | vs dense |",
        "|---|---|" + "---|" * (len(kinds) + 2),
    ]
    for r in rows:
        cells = [r["retrieval_by_kind"].get(k) for k in kinds]
        per_kind = [_passed(c["passed"], c["total"], c["ci"]) if c else "–" for c in cells]
        lines.append(
            f"| {r['context']} | {r['config']} | {' | '.join(per_kind)} | {_retrieval(r)} | "
            f"{r.get('retrieval_vs_dense') or '–'} |"
        )
    return lines


def sections(results: dict[str, Any], out_dir: Path) -> list[str]:
    """Markdown of the long-context speed results (and attached quality, if any)."""
    lines: list[str] = []
    if results["summary"]:
        plot = plot_speed(results, out_dir / "long_context.png")
        lines += ["## Long-context decode", "", *speed_table(results), ""]
        lines += [f"![tok/s vs context]({plot.name})", ""]
    lines += quality_sections(results)
    return lines


def quality_sections(results: dict[str, Any]) -> list[str]:
    lq = results.get("long_quality")
    if not lq:
        return []
    lines = ["## Long-context quality (vs vLLM, UTIO off)", "", *quality_table(lq), ""]
    retrieval = retrieval_table(lq)
    if retrieval:
        lines += ["### Retrieval by kind (vs UTIO dense)", "", *retrieval, ""]
    return lines + [f"- {n}" for n in lq.get("notes", [])] + [""]
