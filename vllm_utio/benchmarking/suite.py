"""The standard offline benchmark: which engines, which configurations, which sizes.

Engines (each started once):
- ``vanilla``: vLLM with UTIO off (the plugin only adds CLI flags then).
- ``utio-forced``: UTIO on, forced router, nested static plans skipping 2/4/6/10 middle
  layers; a configuration pins every request to one plan (or none: full depth).
- ``utio-surrogate``: UTIO on, the surrogate importance router over two plans.
- ``utio-per-bucket``: the same, with the paper's per-bucket-from-layer-0 schedule.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from vllm_utio.benchmarking.offline import (
    BenchConfig,
    EngineSpec,
    run_offline,
    summarize,
    wiki_seed_text,
)
from vllm_utio.benchmarking.results import new_results, save

# nested static plans, shallowest first (keep_first, keep_last of 30 layers)
STATIC_BUCKETS = [
    {"name": "skip10", "max_score": 0.1, "keep_first": 11, "keep_last": 9},
    {"name": "skip6", "max_score": 0.2, "keep_first": 13, "keep_last": 11},
    {"name": "skip4", "max_score": 0.3, "keep_first": 13, "keep_last": 13},
    {"name": "skip2", "max_score": 0.4, "keep_first": 14, "keep_last": 14},
]
SURROGATE_BUCKETS = [
    {"name": "skip10", "max_score": 0.12, "keep_first": 11, "keep_last": 9},
    {"name": "skip6", "max_score": 0.2, "keep_first": 13, "keep_last": 11},
]


UTIO_KERNEL = {"decode_kernel": "utio"}


def engines(quick: bool, artifact: str | None = None) -> dict[str, EngineSpec]:
    specs = {
        "vanilla": EngineSpec(None),
        "utio-forced": EngineSpec({"enabled": True, "router": "forced", "buckets": STATIC_BUCKETS}),
    }
    if not quick:
        surrogate = {"enabled": True, "router": "surrogate", "buckets": SURROGATE_BUCKETS}
        specs["utio-surrogate"] = EngineSpec(surrogate)
        specs["utio-per-bucket"] = EngineSpec({**surrogate, "schedule": "per_bucket"})
        # the same plans with the layer loop's layers run eagerly (before the compiled body)
        specs["utio-forced-eager-loop"] = EngineSpec(
            {**specs["utio-forced"].utio, "layer_loop": "eager"}
        )
        # the same with UTIO's decode kernel for every decode step (greedy output
        # vanilla's except at near ties)
        specs["utio-forced-kernel"] = EngineSpec({**specs["utio-forced"].utio, **UTIO_KERNEL})
    if artifact is not None:
        calibrated = {"enabled": True, "artifact": artifact}
        specs["utio-calibrated"] = EngineSpec(calibrated)
        specs["utio-calibrated-surrogate"] = EngineSpec({**calibrated, "router": "surrogate"})
        specs["utio-calibrated-kernel"] = EngineSpec({**calibrated, **UTIO_KERNEL})
    return specs


def artifact_configs() -> list[BenchConfig]:
    return [
        BenchConfig(
            "calibrated-probe",
            "utio-calibrated",
            None,
            "calibration artifact: its plans and exit corrections, learned probe router",
        ),
        BenchConfig(
            "calibrated-surrogate",
            "utio-calibrated-surrogate",
            None,
            "calibration artifact: its plans and corrections, surrogate score thresholds",
        ),
        BenchConfig(
            "calibrated-probe-kernel",
            "utio-calibrated-kernel",
            None,
            "as calibrated-probe, every decode step's attention in UTIO's decode kernel",
        ),
    ]


def configs(quick: bool) -> list[BenchConfig]:
    out = [
        BenchConfig("vanilla", "vanilla", None, "vLLM, UTIO off (plugin installed)"),
        BenchConfig(
            "utio-full", "utio-forced", None, "UTIO on, every token full depth (pure overhead)"
        ),
        BenchConfig("utio-skip6", "utio-forced", "skip6", "every decode token skips layers 13-18"),
    ]
    if quick:
        return out
    return [
        *out,
        BenchConfig(
            "utio-full-kernel",
            "utio-forced-kernel",
            None,
            "as utio-full, every decode step's attention in UTIO's decode kernel",
        ),
        BenchConfig(
            "utio-skip10", "utio-forced", "skip10", "every decode token skips layers 11-20"
        ),
        BenchConfig(
            "static-skip2",
            "utio-forced",
            "skip2",
            "static baseline: every decode token skips layers 14-15 (2 of 30, 6.7%)",
        ),
        BenchConfig(
            "utio-skip6-eager-loop",
            "utio-forced-eager-loop",
            "skip6",
            "as utio-skip6, the layer loop's layers run eagerly (layer_loop 'eager')",
        ),
        BenchConfig(
            "utio-surrogate",
            "utio-surrogate",
            None,
            "surrogate importance routing: score < 0.12 skips 11-20, < 0.2 skips 13-18",
        ),
        BenchConfig(
            "utio-per-bucket",
            "utio-per-bucket",
            None,
            "as utio-surrogate, each bucket run separately from layer 0 (paper's schedule)",
        ),
    ]


def config_record(cfg: BenchConfig, spec: EngineSpec, num_layers: int) -> dict[str, Any]:
    """A config as stored in results, with its levels (deepest first, full depth first)."""
    levels = None
    if spec.utio is not None:
        buckets = spec.utio.get("buckets", [])
        if spec.utio.get("artifact"):
            from vllm_utio.artifact import MANIFEST, artifact_dir

            manifest = artifact_dir(spec.utio["artifact"]) / MANIFEST
            buckets = json.loads(manifest.read_text())["buckets"]
        buckets = list(reversed(buckets))
        levels = [{"name": "full", "keep_first": num_layers, "keep_last": 0}] + [
            {k: b[k] for k in ("name", "keep_first", "keep_last")} for b in buckets
        ]
    return {**cfg.__dict__, "levels": levels, "num_layers": num_layers}


PREFILL_CHUNK_TOKENS = 8192  # at most this many tokens in one step


def engine_kwargs(max_batch: int, max_len: int, eager: bool) -> dict[str, Any]:
    """vLLM engine arguments every benchmark engine shares."""
    return {
        "dtype": "bfloat16",
        "max_model_len": max_len,
        "max_num_seqs": max(max_batch, 8),
        # chunked prefill: 128 x 512 prompt tokens in one step peaked at 4.4 GB resident
        # per engine, and with 3-5 engines alive that cell never finished on a 24 GiB
        # machine; in 8k-token steps three engines stayed at ~13 GB
        "max_num_batched_tokens": max(
            min(max_batch * max_len, PREFILL_CHUNK_TOKENS), max_len, 2048
        ),
        "kv_cache_memory_bytes": _kv_bytes(max_batch, max_len),
        "enforce_eager": eager,
        "disable_log_stats": False,
        "seed": 0,
    }


def engine_factory(model: str, max_batch: int, max_len: int, eager: bool):
    def make(spec: EngineSpec) -> Any:
        from vllm import LLM

        kw = {**engine_kwargs(max_batch, max_len, eager), **spec.overrides}
        if spec.utio is not None:
            kw["additional_config"] = {"utio": spec.utio}
        return LLM(model, **kw)

    return make


def _kv_bytes(max_batch: int, max_len: int) -> int:
    per_token = 30 * 2 * 3 * 64 * 2  # layers x (K,V) x kv heads x head dim x bf16
    return max(256 << 20, int(1.2 * max_batch * max_len * per_token))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model path (default: the embedded model)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--prompt-lens", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eager", action="store_true", help="enforce_eager on every engine")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, two engines (smoke test)")
    parser.add_argument(
        "--artifact",
        default=None,
        help="also run a calibration artifact (directory or 'default'): its probe router "
        "and its surrogate fallback",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        default=None,
        help="run only these configurations (names as in the report; vanilla is always run)",
    )
    parser.add_argument("-o", "--out", type=Path, default=Path("results/offline.json"))


def run(args: argparse.Namespace) -> int:
    from vllm_utio.paths import default_model_dir

    if args.quick:
        args.batch_sizes, args.prompt_lens, args.output_len, args.repeats = [1, 4], [16], 8, 1
    model = args.model or str(default_model_dir())
    max_len = max(args.prompt_lens) + args.output_len + 16
    settings = {
        "model": model,
        "batch_sizes": args.batch_sizes,
        "prompt_lens": args.prompt_lens,
        "output_len": args.output_len,
        "repeats": args.repeats,
        "dtype": "bfloat16",
        "enforce_eager": args.eager,
        "quick": args.quick,
        "artifact": args.artifact,
    }
    cfgs = configs(args.quick) + (artifact_configs() if args.artifact else [])
    if args.only:
        unknown = sorted(set(args.only) - {c.name for c in cfgs})
        if unknown:
            raise SystemExit(
                f"--only: unknown configuration(s) {', '.join(unknown)}; allowed: "
                + ", ".join(c.name for c in cfgs)
            )
        cfgs = [c for c in cfgs if c.name == "vanilla" or c.name in args.only]
    specs = engines(args.quick, args.artifact)
    specs = {k: v for k, v in specs.items() if any(c.engine == k for c in cfgs)}
    num_layers = json.loads((Path(model) / "config.json").read_text())["num_hidden_layers"]
    results = new_results(settings, [config_record(c, specs[c.engine], num_layers) for c in cfgs])
    samples = run_offline(
        specs,
        cfgs,
        engine_factory(model, max(args.batch_sizes), max_len, args.eager),
        args.batch_sizes,
        args.prompt_lens,
        args.output_len,
        args.repeats,
        wiki_seed_text(),
    )
    results["samples"] = samples
    results["summary"] = summarize(samples)
    print(save(results, args.out))
    return 0
