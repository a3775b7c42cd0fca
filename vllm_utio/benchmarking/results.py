"""The benchmark results file: one JSON document, validated against a JSON schema.

Top level: ``schema`` (format id), ``created`` (UTC ISO time), ``machine`` and
``versions`` (where and with what it ran), ``settings`` (what was asked), ``configs``
(every measured configuration), ``samples`` (raw measurements, one per run),
``summary`` (medians and min-max per config x batch x prompt length), ``quality``
(per config: perplexity delta and agreement vs the full model), ``serving`` (optional:
per server and concurrency, TTFT/TPOT/ITL percentiles and throughput), ``notes``.

Long-context runs (``vllm-utio bench-long``) use the same schema with
``settings.kind = "long-context"`` (``prompt_lens`` are the context lengths; also
``policies``, ``routed``, ``route_max_score``, ``engines``, ``engine_mode``,
``kv_cache_bytes``, ``attention_timing``). Their samples and summary rows add
``attn_ms`` (attention-kernel ms per pure-decode step), ``attention_share`` (attn_ms /
step_ms), ``kv_read_fraction`` (cached positions decode tokens read / what dense attention
reads) and ``sparse_share`` (share of decode tokens under a sparse policy); null where not
measured (vanilla has no UTIO counters). ``long_quality`` (optional, from
``vllm-utio eval-long --attach``): ``settings``, ``notes`` and ``summary`` rows per
context and config (perplexity and its delta vs vanilla with a bootstrap CI over
documents, top-1 and greedy agreement, retrieval passes overall and per kind with Wilson
intervals and the judgement vs UTIO dense; files from before the retrieval kinds have
needle pass rates instead).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
from pathlib import Path
from typing import Any

SCHEMA_ID = "vllm-utio-bench/1"

_NUM = {"type": ["number", "null"]}
SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": [
        "schema",
        "created",
        "machine",
        "versions",
        "settings",
        "configs",
        "samples",
        "summary",
    ],
    "properties": {
        "schema": {"const": SCHEMA_ID},
        "created": {"type": "string"},
        "machine": {"type": "object", "required": ["cpu", "cores", "memory_gib"]},
        "versions": {"type": "object", "required": ["vllm", "torch", "vllm_utio"]},
        "settings": {
            "type": "object",
            "required": ["batch_sizes", "prompt_lens", "output_len", "repeats", "dtype"],
        },
        "configs": {
            "type": "array",
            "items": {"type": "object", "required": ["name", "engine", "description"]},
        },
        "samples": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["config", "batch", "prompt_len", "repeat", "wall_s", "decode_tok_s"],
                "properties": {
                    "decode_tok_s": _NUM,
                    "step_ms": _NUM,
                    "utio": {"type": ["object", "null"]},
                    "attn_ms": _NUM,
                    "attention_share": _NUM,
                    "kv_read_fraction": _NUM,
                    "sparse_share": _NUM,
                },
            },
        },
        "summary": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["config", "batch", "prompt_len", "decode_tok_s", "step_ms"],
                "properties": {
                    "saved_fraction": _NUM,
                    "overhead_share": _NUM,
                    "attn_ms": _NUM,
                    "attention_share": _NUM,
                    "kv_read_fraction": _NUM,
                    "sparse_share": _NUM,
                },
            },
        },
        "quality": {"type": "object"},
        "serving": {
            "type": "object",
            "required": ["servers", "output_len", "runs"],
            "properties": {
                "runs": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": [
                            "server",
                            "concurrency",
                            "requests",
                            "failed",
                            "output_tok_s",
                            "ttft_ms_p50",
                            "ttft_ms_p99",
                            "tpot_ms_p50",
                            "itl_ms_p50",
                            "itl_ms_p99",
                        ],
                        # optional: prompt length as the server counted it (newer runs)
                        "properties": {"prompt_tokens_p50": _NUM, "prompt_tokens_mean": _NUM},
                    },
                }
            },
        },
        "long_quality": {
            "type": "object",
            "required": ["summary"],
            "properties": {
                "summary": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": [
                            "context",
                            "config",
                            "ppl",
                            "ppl_delta",
                            "ppl_delta_ci",
                            "greedy_agreement",
                        ],
                    },
                }
            },
        },
        "notes": {"type": "array", "items": {"type": "string"}},
    },
}


def median_present(values: list[float | None]) -> float | None:
    """The median of the values that were measured (None: not measured), or None."""
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
            if not key.strip():
                break  # the first processor's block is enough
    except OSError:
        pass
    cpu = fields.get("model name", cpu)
    import torch

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu,
        # the generation behind one model name: "AMD EPYC" here was a Zen 5 on 2026-12-04
        # and a Zen 4 (family 25, model 17) on 2026-12-06, where UTIO's AVX-512 kernel
        # gains far less; compare speeds only within one run
        "cpu_id": " ".join(
            f"{k} {fields[k]}" for k in ("vendor_id", "cpu family", "model") if k in fields
        ),
        # AVX2 / AVX512 / ...: decides whether bf16 runs natively, so speeds differ by ISA
        "isa": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "memory_gib": round(mem, 1),
        "platform": platform.platform(),
    }


def cpu_label(machine: dict[str, Any]) -> str:
    """``machine_info``'s CPU as reports print it: name (ISA) [vendor, family, model]."""
    isa = f" ({machine['isa']})" if machine.get("isa") else ""
    cpu_id = f" [{machine['cpu_id']}]" if machine.get("cpu_id") else ""
    return f"{machine.get('cpu')}{isa}{cpu_id}"


def version_info() -> dict[str, str]:
    import torch
    import vllm

    import vllm_utio

    return {
        "vllm": str(vllm.__version__),
        "torch": str(torch.__version__),
        "vllm_utio": vllm_utio.__version__,
        "python": platform.python_version(),
    }


def new_results(settings: dict[str, Any], configs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "schema": SCHEMA_ID,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "versions": version_info(),
        "settings": settings,
        "configs": configs,
        "samples": [],
        "summary": [],
        "quality": {},
        "notes": [],
    }


def validate(results: dict[str, Any]) -> None:
    """Raise jsonschema.ValidationError if ``results`` does not follow the schema."""
    import jsonschema

    jsonschema.validate(results, SCHEMA)


def save(results: dict[str, Any], path: str | Path) -> Path:
    validate(results)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(path)
    return path


def load(path: str | Path) -> dict[str, Any]:
    results = json.loads(Path(path).read_text())
    validate(results)
    return results


def quality_entry(report: dict[str, Any]) -> dict[str, Any]:
    """The quality fields a results file keeps per config, from a `vllm-utio eval` report."""
    forced = report["routing"]["teacher_forced"]
    return {
        "ppl_full": report["ppl_full"],
        "ppl_utio": report["ppl_utio"],
        "ppl_delta": report["ppl_delta"],
        "ppl_delta_ci": report["ppl_delta_ci"],
        "top1_agreement": report["top1_agreement"],
        "greedy_agreement": report["greedy"]["token_agreement"],
        "scored_tokens": report["scored_tokens"],
        "documents": report["documents"],
        "saved_fraction_teacher_forced": forced["saved_fraction"],
    }


def attach_quality(
    results: dict[str, Any], eval_output: dict[str, Any], mapping: dict[str, str]
) -> list[str]:
    """Copy eval reports into ``results["quality"]``; ``mapping``: report key -> config.

    A report's key is its forced bucket (``extra_args.utio_bucket``) or ``"routed"``.
    Returns the configs filled.
    """
    filled = []
    for report in eval_output["reports"]:
        key = (report.get("extra_args") or {}).get("utio_bucket", "routed")
        if key in mapping:
            results.setdefault("quality", {})[mapping[key]] = quality_entry(report)
            filled.append(mapping[key])
    return filled
