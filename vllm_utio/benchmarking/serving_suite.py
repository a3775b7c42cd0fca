"""``vllm-utio bench-serve``: vanilla ``vllm serve`` vs ``--enable-utio``, ShareGPT prompts.

For each server configuration (one server at a time, 127.0.0.1 only) and each
concurrency level, the same prompts are sent; results go into the ``serving`` section
of a results file (a new file, or merged into an offline results file).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vllm_utio.benchmarking.results import load, new_results, save
from vllm_utio.benchmarking.serving import run_load
from vllm_utio.benchmarking.suite import SURROGATE_BUCKETS

SERVED_NAME = "utio-bench"
SERVERS: dict[str, dict[str, Any] | None] = {
    "vanilla": None,
    "utio-surrogate": {"router": "surrogate", "buckets": SURROGATE_BUCKETS},
}


def server_args(utio: dict[str, Any] | None, max_len: int, eager: bool) -> list[str]:
    args = [
        "--served-model-name",
        SERVED_NAME,
        "--dtype",
        "bfloat16",
        "--max-model-len",
        str(max_len),
        "--kv-cache-memory-bytes",
        str(2 << 30),
        "--max-num-seqs",
        "64",
    ]
    if eager:
        args.append("--enforce-eager")
    if utio is not None:
        args += ["--enable-utio", "--utio-config", json.dumps(utio)]
    return args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model path (default: the embedded model)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests-per-level", type=int, default=64, help="at most this many")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--max-prompt-chars", type=int, default=2000)
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--quick", action="store_true", help="2 concurrency levels, few requests")
    parser.add_argument("-o", "--out", type=Path, default=Path("results/serving.json"))
    parser.add_argument("--merge-into", type=Path, default=None, help="add to this results file")
    parser.add_argument(
        "--artifact",
        default=None,
        help="also serve a calibration artifact (directory or 'default') as 'utio-calibrated'",
    )


def run(args: argparse.Namespace) -> int:
    from vllm_utio.assets.data import load_sharegpt_prompts
    from vllm_utio.paths import default_model_dir
    from vllm_utio.serving import ServerProcess

    if args.quick:
        args.concurrency, args.requests_per_level, args.output_len = [1, 4], 4, 16
    model = args.model or str(default_model_dir())
    prompts = load_sharegpt_prompts(
        n=max(args.requests_per_level, max(args.concurrency)), max_chars=args.max_prompt_chars
    )
    runs: list[dict[str, Any]] = []
    env = {**os.environ, "VLLM_PLUGINS": "utio"}
    servers = dict(SERVERS)
    if args.artifact:
        servers["utio-calibrated"] = {"artifact": args.artifact}
    total = len(servers) * len(args.concurrency)
    with tqdm(total=total, desc="serving benchmark", unit="level") as bar:
        for name, utio in servers.items():
            extra = server_args(utio, 2048, args.eager)
            with ServerProcess(model, extra, env=env) as server:
                for conc in args.concurrency:
                    n = min(len(prompts), max(conc * 2, args.requests_per_level))
                    # warm-up at this concurrency (not measured)
                    asyncio.run(run_load(server.base_url, SERVED_NAME, prompts[:conc], conc, 8))
                    row = asyncio.run(
                        run_load(server.base_url, SERVED_NAME, prompts[:n], conc, args.output_len)
                    )
                    row["server"] = name
                    runs.append(row)
                    bar.set_postfix_str(f"{name} c={conc} {row['output_tok_s']:.0f} tok/s")
                    bar.update()
    results = _target(args)
    results["serving"] = {
        "servers": servers,
        "output_len": args.output_len,
        "dataset": "sharegpt (first human turns, deduplicated)",
        "runs": runs,
    }
    print(save(results, args.merge_into or args.out))
    return 0


def _target(args: argparse.Namespace) -> dict[str, Any]:
    if args.merge_into is not None and args.merge_into.is_file():
        return load(args.merge_into)
    settings = {
        "batch_sizes": [],
        "prompt_lens": [],
        "output_len": args.output_len,
        "repeats": 1,
        "dtype": "bfloat16",
    }
    return new_results(settings, [])
