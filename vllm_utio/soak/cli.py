"""``vllm-utio soak``: serve, load, fault and bad-input checks against a real server.

Each ``--utio-config`` (JSON, a JSON file, or ``off``) is one run on its own server, one
after another; the reports go to ``--out`` as ``<name>.json`` / ``<name>.md`` plus a
side-by-side ``summary.md``. Exit code 0 only if every check of every run passed.

    vllm-utio soak --utio-config off --utio-config '{"artifact": "default"}' -o soak/
    vllm-utio soak --quick --bad-inputs --kill-engine
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from vllm_utio.soak.runner import SoakSettings, preemption_settings, quick_settings, run_soak

# The target: the default artifact plus query-aware sparse attention, with held
# blocks so that per-request state really exists while requests run.
DEFAULT_UTIO = {
    "artifact": "default",
    "attention_all": {
        "policy": "select",
        "budget_tokens": 1024,
        "sink_tokens": 128,
        "recent_tokens": 256,
        "hold_steps": 8,
    },
}
QUICK_UTIO = {
    "artifact": "default",
    "attention_all": {
        "policy": "select",
        "budget_tokens": 256,
        "sink_tokens": 32,
        "recent_tokens": 64,
        "hold_steps": 4,
    },
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--utio-config",
        action="append",
        default=None,
        metavar="JSON_OR_PATH|off",
        help="one run per value, in order ('off': UTIO off); default: the default "
        "artifact + select (budget 1024, sinks 128, recent 256, hold 8)",
    )
    parser.add_argument("--name", action="append", default=None, help="a name per run")
    parser.add_argument("--quick", action="store_true", help="a few dozen short requests")
    parser.add_argument("--preemption", action="store_true", help="small KV cache, long prompts")
    parser.add_argument("--bad-inputs", action="store_true", help="malformed requests after")
    parser.add_argument("--kill-engine", action="store_true", help="kill the engine core last")
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--concurrency", type=int, default=None)
    parser.add_argument("--max-wall-s", type=float, default=None, help="load phase cap")
    parser.add_argument("--warmup-requests", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--block-size", type=int, default=None)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--kv-cache-bytes", type=int, default=None)
    parser.add_argument("--long-fraction", type=float, default=None)
    parser.add_argument("--eager", action="store_true", help="--enforce-eager")
    parser.add_argument("--model", default=None, help="model path (default: embedded)")
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment of the server (e.g. MALLOC_MMAP_THRESHOLD_=131072)",
    )
    parser.add_argument("-o", "--out", type=Path, default=Path("results/soak"))
    parser.add_argument("--log-dir", default=None, help="server logs (default: a temp dir)")
    parser.add_argument("--no-progress", action="store_true")


def parse_config(value: str) -> dict[str, Any] | None:
    if value == "off":
        return None
    path = Path(value)
    text = path.read_text() if not value.lstrip().startswith("{") and path.is_file() else value
    config = json.loads(text)
    if not isinstance(config, dict):
        raise SystemExit(f"--utio-config must be a JSON object or 'off', got {value!r}")
    return config


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SystemExit(f"--server-env takes KEY=VALUE, got {text!r}")
    return key, value


def settings_for(args: argparse.Namespace) -> list[SoakSettings]:
    values = args.utio_config or [json.dumps(QUICK_UTIO if args.quick else DEFAULT_UTIO)]
    names = args.name or []
    if names and len(names) != len(values):
        raise SystemExit("give one --name per --utio-config")
    base = quick_settings() if args.quick else SoakSettings()
    overrides = {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "max_wall_s": args.max_wall_s,
        "warmup_requests": args.warmup_requests,
        "seed": args.seed,
        "block_size": args.block_size,
        "max_model_len": args.max_model_len,
        "kv_cache_bytes": args.kv_cache_bytes,
        "model": args.model,
    }
    given = {k: v for k, v in overrides.items() if v is not None}
    base = replace(base, **given)
    if args.long_fraction is not None:
        base = replace(base, mix=replace(base.mix, long_fraction=args.long_fraction))
    base = replace(
        base,
        eager=base.eager or args.eager,
        bad_inputs=args.bad_inputs,
        kill_engine=args.kill_engine,
        progress=not args.no_progress,
        log_dir=args.log_dir,
        server_env=dict(_key_value(kv) for kv in args.server_env),
    )
    runs = []
    for i, value in enumerate(values):
        utio = parse_config(value)
        default_name = "off" if utio is None else ("utio" if i == 0 else f"utio{i}")
        s = replace(base, name=names[i] if names else default_name, utio=utio)
        if args.preemption:
            s = replace(preemption_settings(s), **given)  # what was given explicitly wins
        runs.append(s)
    return runs


def run(args: argparse.Namespace) -> int:
    from vllm_utio.soak.report import render_summary, write_report

    reports = []
    for settings in settings_for(args):
        report = run_soak(settings)
        _, md_path = write_report(report, args.out)
        reports.append(report)
        print(f"{settings.name}: {'PASS' if report['passed'] else 'FAIL'} -> {md_path}")
    # every run in the folder, this invocation's and earlier ones', side by side
    every = [json.loads(p.read_text()) for p in sorted(args.out.glob("*.json"))]
    every = [r for r in every if isinstance(r, dict) and "checks" in r and "name" in r]
    summary = args.out / "summary.md"
    summary.write_text(render_summary(every))
    print(summary)
    return 0 if all(r["passed"] for r in reports) else 1
