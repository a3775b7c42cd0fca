"""Render a results file as a markdown report with matplotlib plots.

``vllm-utio report RESULTS.json -o DIR`` writes ``DIR/report.md`` and PNG plots:
decode throughput vs batch size per configuration, and speedup vs perplexity increase
(the Pareto view: a configuration is only worth its speed if its quality cost is small).
Long-context results (``bench-long``) get their own sections (:mod:`.report_long`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from vllm_utio.benchmarking import report_long
from vllm_utio.benchmarking.results import cpu_label, load

BASELINE = "vanilla"


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "–" if value is None else format(value, spec)


def _summary_index(results: dict[str, Any]) -> dict[tuple[str, int, int], dict]:
    return {(r["config"], r["batch"], r["prompt_len"]): r for r in results["summary"]}


def speedups(results: dict[str, Any]) -> dict[tuple[str, int, int], float]:
    """Median decode tok/s of each row relative to vanilla at the same shape."""
    idx = _summary_index(results)
    out = {}
    for (config, batch, plen), row in idx.items():
        base = idx.get((BASELINE, batch, plen))
        if base and base["decode_tok_s"]:
            out[(config, batch, plen)] = row["decode_tok_s"] / base["decode_tok_s"]
    return out


def headline_table(results: dict[str, Any]) -> list[str]:
    """Decode tok/s (min-max), speedup, saved layer-tokens and quality, per config and shape."""
    quality = results.get("quality", {})
    ups = speedups(results)
    lines = [
        "| config | batch | prompt | decode tok/s (min–max) | step ms | vs vanilla | "
        "layer-tokens saved | UTIO overhead | ppl Δ | greedy agree |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(results["summary"], key=lambda r: (r["prompt_len"], r["batch"])):
        q = quality.get(row["config"], {})
        key = (row["config"], row["batch"], row["prompt_len"])
        saved = row.get("saved_fraction")
        overhead = row.get("overhead_share")
        ppl = q.get("ppl_delta")
        agree = q.get("greedy_agreement")
        lines.append(
            f"| {row['config']} | {row['batch']} | {row['prompt_len']} | "
            f"{_fmt(row['decode_tok_s'])} ({_fmt(row['decode_tok_s_min'], '.0f')}–"
            f"{_fmt(row['decode_tok_s_max'], '.0f')}) | {_fmt(row['step_ms'])} | "
            f"{_fmt(ups.get(key), '.2f')}x | {_fmt(None if saved is None else 100 * saved)}% | "
            f"{_fmt(None if overhead is None else 100 * overhead)}% | "
            f"{_fmt(None if ppl is None else 100 * ppl, '+.1f')}% | "
            f"{_fmt(None if agree is None else 100 * agree)}% |"
        )
    return lines


def plot_throughput(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prompt_lens = sorted({r["prompt_len"] for r in results["summary"]})
    fig, axes = plt.subplots(
        1, len(prompt_lens), figsize=(6 * len(prompt_lens), 4.2), squeeze=False
    )
    for ax, plen in zip(axes[0], prompt_lens, strict=True):
        rows = [r for r in results["summary"] if r["prompt_len"] == plen]
        for config in dict.fromkeys(r["config"] for r in rows):
            pts = sorted((r["batch"], r) for r in rows if r["config"] == config)
            xs = [b for b, _ in pts]
            ys = [r["decode_tok_s"] for _, r in pts]
            lo = [r["decode_tok_s"] - r["decode_tok_s_min"] for _, r in pts]
            hi = [r["decode_tok_s_max"] - r["decode_tok_s"] for _, r in pts]
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=config)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size (requests)")
        ax.set_ylabel("decode tokens/s (median, min–max)")
        ax.set_title(f"prompt {plen} tokens")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_pareto(results: dict[str, Any], path: Path, batch: int | None = None) -> Path | None:
    """Speedup vs perplexity increase, one point per config with quality numbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quality = results.get("quality", {})
    ups = speedups(results)
    if not quality or not ups:
        return None
    batch = batch or max(b for (_, b, _) in ups)
    plen = min(p for (_, _, p) in ups)
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for config, q in quality.items():
        up = ups.get((config, batch, plen))
        if up is None or q.get("ppl_delta") is None:
            continue
        pinned = any(c["name"] == config and c.get("pin") for c in results["configs"])
        marker = "s" if pinned else "o"
        ax.scatter(100 * q["ppl_delta"], up, marker=marker, s=50)
        ax.annotate(
            config,
            (100 * q["ppl_delta"], up),
            fontsize=8,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("perplexity increase vs full model (%)")
    ax.set_ylabel(f"decode speedup vs vanilla (batch {batch}, prompt {plen})")
    ax.set_title("speed vs quality (squares: static, every token pinned to one plan)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def serving_table(serving: dict[str, Any]) -> list[str]:
    # Prompt length decides how much of a step attention is; older results lack it.
    lines = [
        "| server | concurrency | requests (failed) | prompt tokens p50 (mean) | output tok/s | "
        "TTFT p50/p99 ms | TPOT p50/p99 ms | ITL p50/p99 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in serving["runs"]:
        p50, mean = r.get("prompt_tokens_p50"), r.get("prompt_tokens_mean")
        prompt = f"{_fmt(p50, '.0f')} ({_fmt(mean, '.0f')})"
        lines.append(
            f"| {r['server']} | {r['concurrency']} | {r['requests']} ({r['failed']}) | {prompt} | "
            f"{_fmt(r['output_tok_s'])} | {_fmt(r['ttft_ms_p50'], '.0f')}/"
            f"{_fmt(r['ttft_ms_p99'], '.0f')} | {_fmt(r['tpot_ms_p50'], '.1f')}/"
            f"{_fmt(r.get('tpot_ms_p99'), '.1f')} | {_fmt(r['itl_ms_p50'], '.1f')}/"
            f"{_fmt(r['itl_ms_p99'], '.1f')} |"
        )
    return lines


def plot_latency(serving: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for server in dict.fromkeys(r["server"] for r in serving["runs"]):
        rows = sorted(
            (r for r in serving["runs"] if r["server"] == server), key=lambda r: r["concurrency"]
        )
        xs = [r["concurrency"] for r in rows]
        for ax, key in zip(axes, ("ttft_ms", "itl_ms"), strict=True):
            ax.plot(xs, [r[f"{key}_p50"] for r in rows], marker="o", label=f"{server} p50")
            ax.plot(xs, [r[f"{key}_p99"] for r in rows], marker="x", ls="--", label=f"{server} p99")
    for ax, title in zip(
        axes, ("time to first token (ms)", "inter-token latency (ms)"), strict=True
    ):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def time_model_section(results: dict[str, Any]) -> list[str]:
    from vllm_utio.benchmarking.time_model import fit

    model = fit(results)
    if model is None:
        return []
    c = model["coefficients_ms"]
    lines = [
        "## Where the time goes (fitted time model)",
        "",
        "step ms = fixed + per_row·B + Σ_layers run (layer + layer_row·rows + "
        "layer_row_token·rows·context/1000) + Σ_layers skipped (fill + fill_row·rows), "
        "context = prompt + half the output, least squares over all UTIO samples "
        f"(R² = {_fmt(model['r2'], '.3f')}):",
        "",
        "| " + " | ".join(c) + " |",
        "|" + "---|" * len(c),
        "| " + " | ".join(f"{v:.3f}" for v in c.values()) + " |",
        "",
        "| config | batch | prompt | predicted step ms | measured step ms | measured/predicted |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(model["table"], key=lambda r: (r["prompt_len"], r["batch"], r["config"])):
        ratio = r["measured_step_ms"] / r["predicted_step_ms"] if r["predicted_step_ms"] else None
        lines.append(
            f"| {r['config']} | {r['batch']} | {r['prompt_len']} | "
            f"{r['predicted_step_ms']:.1f} | {r['measured_step_ms']:.1f} | {_fmt(ratio, '.2f')} |"
        )
    return [*lines, "", *speedup_section(model["table"])]


def speedup_section(table: list[dict[str, Any]], full: str = "utio-full") -> list[str]:
    """Each config's speed-up over full depth (same engine kind, vLLM's model): what the
    fitted model predicts from the layer-tokens it saves, and what was measured."""
    by_key = {(r["config"], r["batch"], r["prompt_len"]): r for r in table}
    rows = []
    for r in sorted(table, key=lambda r: (r["prompt_len"], r["batch"], r["config"])):
        ref = by_key.get((full, r["batch"], r["prompt_len"]))
        if r["config"] == full or ref is None or not r["predicted_step_ms"]:
            continue
        predicted = ref["predicted_step_ms"] / r["predicted_step_ms"]
        measured = ref["measured_step_ms"] / r["measured_step_ms"]
        rows.append(
            f"| {r['config']} | {r['batch']} | {r['prompt_len']} | {predicted:.2f}x | "
            f"{measured:.2f}x | {measured / predicted:.0%} |"
        )
    if not rows:
        return []
    return [
        f"Speed-up over `{full}` (decode step ms): predicted by the fitted model from the "
        "layer-tokens each config saves (and the K/V fills it adds), and measured:",
        "",
        "| config | batch | prompt | predicted | measured | measured / predicted |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def render(results: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    m, v, s = results["machine"], results["versions"], results["settings"]
    blocks = f", {s['block_size']}-token KV blocks" if s.get("block_size") else ""
    lines = [
        f"# UTIO benchmark, {results['created'][:10]}",
        "",
        f"Machine: {cpu_label(m)}, {m['cores']} cores, {m['memory_gib']} GiB. "
        f"vLLM {v['vllm']}, torch {v['torch']}, vllm-utio {v['vllm_utio']}.",
        f"Settings: batch sizes {s['batch_sizes']}, prompt lengths {s['prompt_lens']}, "
        f"{s['output_len']} output tokens, greedy, ignore_eos, {s['dtype']}{blocks}, "
        f"{s['repeats']} interleaved repeats (median, min–max).",
        "",
        "## Configurations",
        "",
        *[f"- **{c['name']}**: {c['description']}" for c in results["configs"]],
        "",
    ]
    if report_long.is_long(results):
        lines += report_long.sections(results, out_dir)
    elif results["summary"]:
        lines += ["## Decode throughput", "", *headline_table(results), ""]
        lines += [f"![throughput]({plot_throughput(results, out_dir / 'throughput.png').name})", ""]
        lines += time_model_section(results)
        lines += report_long.quality_sections(results)
    serving = results.get("serving")
    if serving:
        lines += ["## Serving (vllm serve, ShareGPT prompts)", "", *serving_table(serving), ""]
        lines += [f"![latency]({plot_latency(serving, out_dir / 'latency.png').name})", ""]
    pareto = plot_pareto(results, out_dir / "pareto.png")
    if pareto is not None:
        lines += ["## Speed vs quality", "", f"![pareto]({pareto.name})", ""]
    if results.get("notes"):
        lines += ["## Notes", "", *[f"- {n}" for n in results["notes"]], ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines))
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", type=Path, help="results JSON from a benchmark run")
    parser.add_argument(
        "-o", "--out", type=Path, default=None, help="output dir (default: next to results)"
    )


def run(args: argparse.Namespace) -> int:
    results = load(args.results)
    out = render(results, args.out or args.results.parent)
    print(out)
    return 0
