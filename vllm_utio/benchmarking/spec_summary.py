"""Many ``bench-spec`` runs in one table and one plot.

    vllm-utio bench-spec --combine RUN.json [RUN.json ...] -o summary.json

Each engine's speed is read against the vanilla engine of its own run (and against UTIO's
kernel alone where that run had it), never across runs: runs on different days or with
different engines alive differ by more than the effects measured. A cell is a workload,
context, batch size, sampling temperature and machine (CPU vendor, family, model: one
cell's speed-up read 2.1x on one generation behind a CPU model name and 3.0x on the
next); where several runs measured the same engine in the same cell, the table lists
every run's ratio and their median.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from vllm_utio.benchmarking.results import cpu_label, median_present
from vllm_utio.benchmarking.speculative import (
    KERNEL_ALONE,
    current_identity,
    describe_difference,
)

KIND = "self-speculation-summary"


Cell = tuple[str, int, int, float, str]
VENDORS = {"AuthenticAMD": "AMD", "GenuineIntel": "Intel"}


def machine_tag(machine: dict[str, Any]) -> str:
    """A run's CPU in a cell's name: ``AMD family 26 model 2`` (its ``cpu_id``)."""
    words = str(machine.get("cpu_id") or machine.get("cpu") or "unknown CPU").split()
    words = [VENDORS.get(w, w) for w in words if w not in ("vendor_id", "cpu")]
    return " ".join(words)


def cell_key(row: dict[str, Any], temperature: float, machine: str) -> Cell:
    return (row["workload"], row["context"] or 0, row["batch"], temperature, machine)


def cell_label(key: Cell, with_machine: bool = True) -> str:
    workload, context, batch, temperature, machine = key
    where = f"{context} tok" if context else "chat"
    sampled = f", T={temperature:g}" if temperature else ""
    on = f" [{machine}]" if with_machine else ""
    return f"{workload} {where}, b{batch}{sampled}{on}"


def _labels(cells: Any) -> dict[Cell, str]:
    """Each cell's name, with its machine only where the runs come from several."""
    several = len({key[4] for key in cells}) > 1
    return {key: cell_label(key, several) for key in cells}


def collect(runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run, cell and engine: its ratios within its run (vanilla's own row
    keeps its timed runs' identity with its reference run: the noise floor)."""
    rows = []
    for label, results in runs.items():
        temperature = results["settings"].get("temperature", 0.0)
        machine = machine_tag(results.get("machine", {}))
        summary = results["summary"]
        by_cell: dict[Cell, dict[str, dict[str, Any]]] = {}
        for r in summary:
            by_cell.setdefault(cell_key(r, temperature, machine), {})[r["engine"]] = r
        for key, engines in by_cell.items():
            kernel = engines.get(KERNEL_ALONE)
            for name, r in engines.items():
                if r["speedup"] is None:
                    continue
                vs_kernel = (
                    r["decode_tok_s"] / kernel["decode_tok_s"]
                    if kernel and name not in ("vanilla", KERNEL_ALONE) and kernel["decode_tok_s"]
                    else None
                )
                rows.append(
                    {
                        "run": label,
                        "cell": key,
                        "engine": name,
                        "vanilla_tok_s": engines["vanilla"]["decode_tok_s"]
                        if "vanilla" in engines
                        else None,
                        "speedup": r["speedup"],
                        "vs_kernel": vs_kernel,
                        "acceptance": r["acceptance"],
                        "drafts_per_output": r["draft_tokens_per_output"],
                        "identity": r["identity"],
                    }
                )
    return rows


def _ratios(values: list[float | None]) -> str:
    got = [v for v in values if v is not None]
    if not got:
        return "-"
    listed = " / ".join(f"{v:.2f}" for v in got)
    return listed if len(got) == 1 else f"**{statistics.median(got):.2f}** ({listed})"


def _identity(group: list[dict[str, Any]]) -> str:
    idents = [g["identity"] for g in group if g["identity"]]
    if not idents:
        return "-"
    same = sum(i["identical"] for i in idents)
    total = sum(i["outputs"] for i in idents)
    ties = sum(len(i["near_ties"]) for i in idents)
    other = sum(len(i["mismatches"]) for i in idents)
    return f"{same}/{total} · {ties} · {other}"


def _engines(rows: list[dict[str, Any]]) -> list[str]:
    """The engines compared with vanilla, in the order the runs list them."""
    return [e for e in dict.fromkeys(r["engine"] for r in rows) if e != "vanilla"]


def grouped(rows: list[dict[str, Any]]) -> dict[Cell, dict[str, list[dict[str, Any]]]]:
    """cell -> engine -> its rows (one per run); cells by workload, sampling, context,
    batch, machine."""
    out: dict[Cell, dict[str, list[dict[str, Any]]]] = {}
    for r in sorted(rows, key=lambda r: tuple(r["cell"][i] for i in (0, 3, 1, 2, 4))):
        out.setdefault(r["cell"], {}).setdefault(r["engine"], []).append(r)
    return out


def markdown(runs: dict[str, dict[str, Any]], rows: list[dict[str, Any]], plot: str) -> str:
    cells = grouped(rows)
    label = _labels(cells)
    engines = _engines(rows)
    lines = [
        "# Self-speculation: every run in one table",
        "",
        "Each ratio is against the vanilla engine of the same run (and the kernel alone of",
        "the same run); cells measured by several runs show the median in bold and every",
        "run's ratio. Identity: outputs identical to vanilla's · near ties · other",
        "mismatches, summed over runs and their repeats (greedy runs only; every other",
        "mismatch is listed at the end). Where the runs come from several machines, each",
        "machine's runs make their own cells (named by CPU vendor, family and model).",
        "",
        f"![speed-up over vanilla per cell and engine]({plot})",
        "",
        "Runs:",
        "",
        *[f"- `{label}`: {_run_line(res)}" for label, res in runs.items()],
        "",
        "## Speed-up over vanilla (median over runs)",
        "",
        "| cell | vanilla tok/s | " + " | ".join(engines) + " |",
        "|---|---|" + "---|" * len(engines),
    ]
    for key, by_engine in cells.items():
        base = median_present([g["vanilla_tok_s"] for g in by_engine.get("vanilla", [])])
        medians = [median_present([g["speedup"] for g in by_engine.get(e, [])]) for e in engines]
        lines.append(
            f"| {label[key]} | {'-' if base is None else f'{base:.1f}'} | "
            + " | ".join("-" if m is None else f"{m:.2f}x" for m in medians)
            + " |"
        )
    lines += [
        "",
        "## Per cell and engine",
        "",
        "| cell | engine | runs | vs vanilla | vs kernel alone | acceptance "
        "| drafts / output token | identity |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, by_engine in cells.items():
        for name, group in by_engine.items():
            acceptance = median_present([g["acceptance"] for g in group])
            drafts = median_present([g["drafts_per_output"] for g in group])
            lines.append(
                f"| {label[key]} | {name} | {len(group)} | "
                f"{_ratios([g['speedup'] for g in group])} | "
                f"{_ratios([g['vs_kernel'] for g in group])} | "
                f"{'-' if acceptance is None else f'{acceptance:.2f}'} | "
                f"{'-' if drafts is None else f'{drafts:.2f}'} | {_identity(group)} |"
            )
    others = [
        f"- {label[key]}, {name}, `{g['run']}`: {describe_difference(e, False)}"
        for key, by_engine in cells.items()
        for name, group in by_engine.items()
        for g in group
        for e in (g["identity"] or {}).get("mismatches", [])
    ]
    if others:
        lines += ["", "## Other mismatches (not near ties)", "", *others]
    return "\n".join(lines) + "\n"


def _run_line(results: dict[str, Any]) -> str:
    s = results["settings"]
    engines = ", ".join(n for n in s["engines"] if n != "vanilla")
    mode = "interleaved" if s.get("interleaved") else "one after another"
    complete = "" if results.get("complete", True) else ", stopped part way"
    # runs of one summary may come from different machines: each names its CPU
    return (
        f"{results['created'][:10]}, {cpu_label(results['machine'])}, {s['repeats']} repeats "
        f"{mode}, block {s['block_size']}, {s['dtype']}{complete}; engines: {engines}"
    )


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Bars: each engine's median speed-up over vanilla per cell; dots: each run's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = grouped(rows)
    engines = _engines(rows)
    width = 0.8 / max(1, len(engines))
    fig, ax = plt.subplots(figsize=(max(8.0, 1.1 * len(cells) + 3), 4.8))
    for e, name in enumerate(engines):
        for c, by_engine in enumerate(cells.values()):
            values = [g["speedup"] for g in by_engine.get(name, []) if g["speedup"]]
            if not values:
                continue
            x = c - 0.4 + width * (e + 0.5)
            ax.bar(x, statistics.median(values), width, color=f"C{e}", label=name)
            ax.scatter([x] * len(values), values, s=9, color="black", zorder=3)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(cells)), list(_labels(cells).values()), rotation=30, ha="right")
    ax.set_ylabel("decode tok/s vs vanilla (same run)")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def combine(paths: list[Path], out: Path) -> int:
    """Write ``out`` (rows, JSON), its ``.md`` table and its ``.png`` plot."""
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SystemExit(f"--combine: no such results file: {', '.join(missing)}")
    runs: dict[str, dict[str, Any]] = {}
    for p in paths:
        label = _label(p)
        label = label if label not in runs else f"{label} ({len(runs) + 1})"
        runs[label] = json.loads(p.read_text())
    wrong = [label for label, r in runs.items() if r.get("kind") != "self-speculation"]
    if wrong:
        raise SystemExit(f"--combine: not bench-spec results: {', '.join(wrong)}")
    # identity under the current near-tie rule, over every repeat (older files' tables
    # counted the first repeat only)
    runs = {label: current_identity(r) for label, r in runs.items()}
    if out.is_file() and json.loads(out.read_text()).get("kind") != KIND:
        raise SystemExit(
            f"--combine: -o {out} holds other results (a run's results file?); "
            "name a new file or an earlier summary"
        )
    rows = collect(runs)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = plot(rows, out.with_suffix(".png"))
    serial = [{**r, "cell": list(r["cell"])} for r in rows]
    out.write_text(json.dumps({"kind": KIND, "rows": serial}, indent=1))
    out.with_suffix(".md").write_text(markdown(runs, rows, png.name))
    print(out.with_suffix(".md").read_text())
    return 0


def _label(path: Path) -> str:
    """A run's name: its folder and the one above (``2026-12-07/spec-8k-b32``)."""
    parts = path.resolve().parent.parts
    return "/".join(parts[-2:])
