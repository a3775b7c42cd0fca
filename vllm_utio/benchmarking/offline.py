"""Offline throughput of UTIO configurations vs vanilla vLLM, measured in one process.

Every configuration's engine is started once; measurements then interleave the
configurations (A B C A B C ...) for each batch size and prompt length, several repeats,
so slow drifts of the machine hit every configuration alike.

Decode speed comes from the engine's own per-request timestamps (first and last token,
engine-core clock): all requests of a batch are prefilled in one step, so
``decode_s = max(last_token_ts) - max(first_token_ts)`` covers exactly the decode steps
that produce tokens 2..n. UTIO's own time split (routing, metadata, forward) comes from
the worker's counters (``collective_rpc("utio_stats")``) before and after each run.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

UTIO_COUNTERS = (
    "steps",
    "routing_s",
    "metadata_s",
    "forward_s",
    "layer_tokens_run",
    "layer_tokens_full",
    "kv_fill_layer_tokens",
    "kv_tokens_read",  # cached positions decode tokens attended to (sparse attention)
    "kv_tokens_dense",  # ... and what dense attention would have read
    "select_s",  # policy 'select': bounds, top-k, per-layer metadata
    "summary_s",  # policy 'select': folding written keys into block summaries
    "select_rows_reused",  # 'select_every_steps': row-layers that reused a choice
    "select_rows_focused",  # ... that chose off their turn ('focus_mass')
)


@dataclass(frozen=True)
class BenchConfig:
    """One measured configuration: an engine (by key) plus, optionally, a pinned bucket."""

    name: str
    engine: str  # key into the engine specs
    pin: str | None = None  # forced router: every request pinned to this bucket
    description: str = ""


@dataclass
class EngineSpec:
    utio: dict[str, Any] | None  # None = plugin off (vanilla vLLM)
    overrides: dict[str, Any] = field(default_factory=dict)


def wiki_seed_text(documents: int = 8) -> str:
    """The text the offline benchmarks cut their prompts from: the first Wikipedia
    documents of the bundled excerpt, joined."""
    from vllm_utio.assets.data import load_wiki_documents

    return " ".join(d["text"] for d in load_wiki_documents()[:documents])


def make_prompts(tokenizer: Any, batch: int, prompt_len: int, seed_text: str) -> list[dict]:
    """``batch`` distinct prompts of exactly ``prompt_len`` tokens, cut from real text."""
    ids = tokenizer.encode(seed_text)
    if len(ids) < prompt_len + batch:
        ids = ids * ((prompt_len + batch) // max(1, len(ids)) + 1)
    stride = max(1, (len(ids) - prompt_len) // max(1, batch))
    return [{"prompt_token_ids": ids[i * stride : i * stride + prompt_len]} for i in range(batch)]


def _utio_counters(llm: Any) -> dict[str, Any]:
    stats = llm.collective_rpc("utio_stats")[0]
    out: dict[str, Any] = {k: float(stats[k]) for k in UTIO_COUNTERS}
    out["rows_per_level"] = list(stats["rows_per_level"])
    return out


def measure_once(
    llm: Any, prompts: list[dict], output_len: int, pin: str | None, utio: bool
) -> dict:
    """One generate() call; returns the sample (times, tok/s, UTIO counter deltas)."""
    from vllm import SamplingParams

    params = SamplingParams(
        temperature=0.0,
        max_tokens=output_len,
        ignore_eos=True,
        extra_args={"utio_bucket": pin} if pin else None,
    )
    before = _utio_counters(llm) if utio else None
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    after = _utio_counters(llm) if utio else None
    firsts = [o.metrics.first_token_ts for o in outs]
    lasts = [o.metrics.last_token_ts for o in outs]
    n_out = min(len(o.outputs[0].token_ids) for o in outs)
    decode_s = max(lasts) - max(firsts)
    decode_tokens = len(outs) * (n_out - 1)
    sample = {
        "wall_s": wall,
        "decode_s": decode_s,
        "decode_steps": n_out - 1,
        "decode_tok_s": decode_tokens / decode_s if decode_s > 0 else None,
        "step_ms": 1e3 * decode_s / (n_out - 1) if n_out > 1 else None,
        "e2e_tok_s": len(outs) * n_out / wall,
        "utio": None,
    }
    if before is not None and after is not None:
        delta = {k: after[k] - before[k] for k in UTIO_COUNTERS}
        delta["rows_per_level"] = [
            a - b for a, b in zip(after["rows_per_level"], before["rows_per_level"], strict=True)
        ]
        full = delta["layer_tokens_full"]
        delta["saved_fraction"] = 1.0 - delta["layer_tokens_run"] / full if full else 0.0
        sample["utio"] = delta
    return sample


def run_offline(
    engines: dict[str, EngineSpec],
    configs: Sequence[BenchConfig],
    make_llm: Callable[[EngineSpec], Any],
    batch_sizes: Sequence[int],
    prompt_lens: Sequence[int],
    output_len: int,
    repeats: int,
    seed_text: str,
) -> list[dict]:
    """Start every engine, then measure all configs interleaved; returns raw samples."""
    llms: dict[str, Any] = {}
    try:
        for key, spec in tqdm(engines.items(), desc="starting engines", unit="engine"):
            llms[key] = make_llm(spec)
        tokenizer = next(iter(llms.values())).get_tokenizer()
        cells = [(b, p, r) for b in batch_sizes for p in prompt_lens for r in range(repeats)]
        samples: list[dict] = []
        with tqdm(total=len(cells) * len(configs), desc="measuring", unit="run") as bar:
            for batch, prompt_len, repeat in cells:
                prompts = make_prompts(tokenizer, batch, prompt_len, seed_text)
                if repeat == 0:  # warm each engine at this shape (compile, caches)
                    for cfg in configs:
                        utio = engines[cfg.engine].utio is not None
                        measure_once(llms[cfg.engine], prompts, 4, cfg.pin, utio)
                for cfg in configs:
                    utio = engines[cfg.engine].utio is not None
                    sample = measure_once(llms[cfg.engine], prompts, output_len, cfg.pin, utio)
                    sample.update(
                        config=cfg.name, batch=batch, prompt_len=prompt_len, repeat=repeat
                    )
                    samples.append(sample)
                    bar.set_postfix_str(f"{cfg.name} b={batch} {sample['decode_tok_s']:.0f} tok/s")
                    bar.update()
        return samples
    finally:
        for llm in llms.values():
            _shutdown(llm)


def _shutdown(llm: Any) -> None:
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    gc.collect()


def summarize(samples: list[dict]) -> list[dict]:
    """Median and min-max per (config, batch, prompt_len)."""
    groups: dict[tuple, list[dict]] = {}
    for s in samples:
        groups.setdefault((s["config"], s["batch"], s["prompt_len"]), []).append(s)
    rows = []
    for (config, batch, prompt_len), group in groups.items():
        tok_s = [s["decode_tok_s"] for s in group if s["decode_tok_s"]]
        step = [s["step_ms"] for s in group if s["step_ms"]]
        row = {
            "config": config,
            "batch": batch,
            "prompt_len": prompt_len,
            "n": len(group),
            "decode_tok_s": statistics.median(tok_s),
            "decode_tok_s_min": min(tok_s),
            "decode_tok_s_max": max(tok_s),
            "step_ms": statistics.median(step),
            "e2e_tok_s": statistics.median(s["e2e_tok_s"] for s in group),
            "saved_fraction": None,
            "overhead_share": None,
        }
        utio = [s["utio"] for s in group if s["utio"]]
        if utio:
            row["saved_fraction"] = statistics.median(u["saved_fraction"] for u in utio)
            busy = [u["routing_s"] + u["metadata_s"] + u["forward_s"] for u in utio]
            over = [u["routing_s"] + u["metadata_s"] for u in utio]
            row["overhead_share"] = statistics.median(
                o / b for o, b in zip(over, busy, strict=True) if b
            )
        rows.append(row)
    return rows
