"""Soak reports: one JSON and one markdown file per run, and a side-by-side table.

The JSON holds everything measured (settings, every request's outcome, memory and
metrics samples, verdicts, bad inputs, the fault); the markdown shows the check lines,
the soak table and the bad-input list.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MIB = 2**20


def write_report(report: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """``<name>.json`` and ``<name>.md`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / str(report["name"])
    json_path = stem.with_suffix(".json")
    json_path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    md_path = stem.with_suffix(".md")
    md_path.write_text(render_run(report))
    return json_path, md_path


def _mib(value: Any) -> str:
    return "-" if value is None else f"{value / MIB:.0f} MiB"


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value * 1e3:.0f} ms"


def _pct(part: float | None, whole: float | None) -> str:
    if part is None or not whole:
        return "-"
    return f"{(part - whole) / whole:+.1%}"


def table_row(report: dict[str, Any]) -> dict[str, str]:
    """The soak-table cells of one run."""
    load = report.get("load", {})
    mem = report.get("memory", {})
    warm = mem.get("after_warmup", {}).get("total_rss")
    end = mem.get("end", {}).get("total_rss")
    state = report.get("state_entries", {})
    errors = load.get("errors_by_class") or {}
    after = state.get("after")
    fault = report.get("fault")
    settings = report.get("settings", {})
    env = settings.get("server_env") or {}
    return {
        "run": str(report["name"]),
        "UTIO": "off" if report.get("utio") is None else "on",
        "KV cache, concurrency": (
            f"{_mib(settings.get('kv_cache_bytes'))}, {settings.get('concurrency', '-')}"
        ),
        "server env": ", ".join(f"{k}={v}" for k, v in env.items()) or "-",
        "requests": f"{load.get('requests', 0)} ({load.get('completed', 0)} completed)",
        "cut": str(load.get("cut", 0)),
        "errors by class": ", ".join(f"{k} {v}" for k, v in errors.items()) or "none",
        "RSS start / after warm-up / end": (
            f"{_mib(mem.get('start', {}).get('total_rss'))} / {_mib(warm)} / {_mib(end)}"
        ),
        "RSS growth": _pct(end, warm),
        "RSS growth, last quarter of the load": _last_quarter(mem),
        "live UTIO entries (peak / after)": (
            "n/a (UTIO off)"
            if after is None
            else f"{state.get('peak_during_load') or 0:g} / {after:g}"
        ),
        "latency p50 / p99": f"{_ms(load.get('latency_s_p50'))} / {_ms(load.get('latency_s_p99'))}",
        "TTFT p50 / p99": f"{_ms(load.get('ttft_s_p50'))} / {_ms(load.get('ttft_s_p99'))}",
        "output tok/s": f"{load.get('output_tok_s') or 0:.1f}",
        "preemptions": _preemptions(report),
        "identity (exact / tie / differs)": _identity(report),
        "checks": _check_summary(report),
        **(
            {"engine-core kill": "bounded" if fault.get("bounded") else "NOT bounded"}
            if fault
            else {}
        ),
    }


def _last_quarter(mem: dict[str, Any]) -> str:
    """Growth from 3/4 of the load to its end: a leak per request keeps its pace, the
    warm-up of a cache per shape slows down."""
    rss = [x["rss"] for x in mem.get("samples", []) if x.get("rss")]
    if len(rss) < 4:
        return "-"
    return _pct(rss[-1], rss[(3 * (len(rss) - 1)) // 4])


def _preemptions(report: dict[str, Any]) -> str:
    m = report.get("metrics", {})
    key = "vllm:num_preemptions_total"
    before = m.get("after_warmup", {}).get(key)
    after = m.get("end", {}).get(key)
    return "-" if before is None or after is None else f"{after - before:g}"


def _identity(report: dict[str, Any]) -> str:
    counts = {"exact": 0, "tie": 0, "differs": 0}
    for v in report.get("identity", {}).get("verdicts", {}).values():
        counts[v["kind"]] += 1
    return f"{counts['exact']} / {counts['tie']} / {counts['differs']}"


def _check_summary(report: dict[str, Any]) -> str:
    found = report.get("checks", [])
    failed = [c["name"] for c in found if c["passed"] is False]
    passed = sum(c["passed"] is True for c in found)
    return f"{passed} pass, {len(failed)} fail" + (f" ({'; '.join(failed)})" if failed else "")


def render_table(reports: Sequence[dict[str, Any]]) -> str:
    """Runs side by side: one column per run, one row per measure."""
    rows = [table_row(r) for r in reports]
    keys = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| | " + " | ".join(row["run"] for row in rows) + " |"]
    lines.append("|---" * (len(rows) + 1) + "|")
    for key in keys[1:]:
        lines.append(f"| {key} | " + " | ".join(row.get(key, "-") for row in rows) + " |")
    return "\n".join(lines) + "\n"


def render_bad_inputs(report: dict[str, Any]) -> str:
    data = report.get("bad_inputs")
    if not data:
        return ""

    def yes(value: bool | None) -> str:
        return {True: "yes", False: "**no**", None: "n/a"}[value]

    lines = [
        "| # | malformed request | owner | status | names field | names rule | message |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(data["results"], 1):
        status = f"{r['status']}" + (" (in stream)" if r["in_stream"] else "")
        lines.append(
            f"| {i} | {r['name']} | {r['owner']} | {status} | {yes(r['names_field'])} "
            f"| {yes(r['names_allowed'])} | {_cell(r['message'])} |"
        )
    lines += [
        "",
        "Accepted by vLLM 0.32 although they look malformed (sent, not judged):",
        "",
        "| request | status | answer |",
        "|---|---|---|",
    ]
    for r in data["lenient"]:
        lines.append(f"| {r['name']} | {r['status']} | {_cell(r['message'] or '(answered)')} |")
    return "\n".join(lines) + "\n"


def _cell(text: str, limit: int = 220) -> str:
    text = " ".join(str(text).split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return text.replace("|", "\\|")


def render_run(report: dict[str, Any]) -> str:
    s = report["settings"]
    utio = "UTIO off" if report.get("utio") is None else f"`{json.dumps(report['utio'])}`"
    lines = [
        f"# Soak: {report['name']}",
        "",
        f"- server: `vllm serve` with {utio}; {s['dtype']}, block size {s['block_size']}, "
        f"max model len {s['max_model_len']}, KV cache {s['kv_cache_bytes'] / MIB:.0f} MiB, "
        f"max {s['max_num_seqs']} seqs{', eager' if s['eager'] else ''}; "
        f"VLLM_MAX_N_SEQUENCES={s['max_n']}"
        + "".join(f", {k}={v}" for k, v in (s.get("server_env") or {}).items()),
        f"- load: {s['requests']} requests at concurrency {s['concurrency']} (cap "
        f"{s['max_wall_s']:.0f} s), after {s['warmup_requests']} warm-up requests; seed "
        f"{s['seed']}",
        f"- started {report.get('started')}, wall {report.get('wall_s', 0):.0f} s, server up in "
        f"{(report.get('server', {}).get('startup_s') or 0):.0f} s; load average "
        f"{_load(report, 'loadavg_start')} -> {_load(report, 'loadavg_end')} on "
        f"{report['machine']['cpus']} CPUs",
        f"- result: **{'PASS' if report.get('passed') else 'FAIL'}**",
        "",
        "## Checks",
        "",
        "| check | result | detail |",
        "|---|---|---|",
    ]
    for c in report.get("checks", []):
        word = {True: "PASS", False: "**FAIL**", None: "n/a"}[c["passed"]]
        lines.append(f"| {c['name']} | {word} | {_cell(c['detail'], 400)} |")
        for p in c.get("problems", [])[:6]:
            lines.append(f"| | | - {_cell(p, 300)} |")
    lines += ["", "## Soak table", "", render_table([report]), "## Mix", ""]
    mix = report.get("load", {}).get("mix", {})
    lines.append(", ".join(f"{k} {v}" for k, v in mix.items()) + "\n")
    if report.get("fault"):
        lines += [
            "## Engine-core kill",
            "",
            "```",
            json.dumps(report["fault"], indent=1),
            "```",
            "",
        ]
    bad = render_bad_inputs(report)
    if bad:
        lines += ["## Bad inputs", "", bad]
    return "\n".join(lines)


def _load(report: dict[str, Any], key: str) -> str:
    values = report.get("machine", {}).get(key)
    return "-" if not values else f"{values[0]:.1f}"


def render_summary(reports: Sequence[dict[str, Any]], title: str = "Soak runs") -> str:
    lines = [f"# {title}", "", render_table(reports)]
    for r in reports:
        lines.append(
            f"- `{r['name']}`: {'PASS' if r.get('passed') else 'FAIL'}; details in "
            f"[{r['name']}.md]({r['name']}.md) and `{r['name']}.json`"
        )
    return "\n".join(lines) + "\n"
