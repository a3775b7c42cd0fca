"""``vllm-utio calibrate``: quality-budgeted layer plans, exit corrections and a router.

Runs the recipe of :mod:`vllm_utio.calibration.pipeline` on the model's own forward
(pure torch, CPU) and writes an artifact directory (see :mod:`.artifact`). The defaults
calibrate the default model in roughly 15-20 minutes on two free cores.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from vllm_utio.paths import default_model_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", type=Path, default=None, help="model directory (default: the embedded model)"
    )
    parser.add_argument(
        "--data", default="wiki", help="'wiki' (prepared excerpt) or a .jsonl / text file"
    )
    parser.add_argument(
        "--budget-ppl",
        type=float,
        default=3.0,
        help="allowed held-out perplexity increase, percent",
    )
    parser.add_argument("--buckets", type=int, default=3, help="number of nested shallow buckets")
    parser.add_argument(
        "--longest-span", type=int, default=6, help="layers the shallowest bucket skips"
    )
    parser.add_argument(
        "--train-minutes",
        type=float,
        default=6.0,
        help="wall minutes of correction training (all buckets)",
    )
    parser.add_argument(
        "--train-steps",
        type=int,
        default=None,
        help="optimisation steps per bucket instead of --train-minutes (reproducible)",
    )
    parser.add_argument(
        "--curve-windows",
        type=int,
        default=4,
        help="held-out windows for the training curve (0 = no curve, faster)",
    )
    parser.add_argument(
        "--router", choices=("linear", "mlp"), default="linear", help="learned probe kind"
    )
    parser.add_argument(
        "--rank", type=int, default=0, help="rank of each exit correction (0 = full)"
    )
    parser.add_argument("--fit-windows", type=int, default=24, help="256-token windows to fit on")
    parser.add_argument(
        "--tune-windows", type=int, default=8, help="windows to choose thresholds on"
    )
    parser.add_argument(
        "--held-windows", type=int, default=24, help="held-out windows to report on"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (1 is fastest on a busy machine)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "-o", "--output", type=Path, required=True, help="artifact directory to write"
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from vllm_utio.calibration.artifact import model_fingerprint, save_artifact
    from vllm_utio.calibration.pipeline import Settings, bucket_name, calibrate, manifest_for

    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model or default_model_dir()
    settings = Settings(
        model=Path(model),
        data=args.data,
        budget=args.budget_ppl / 100.0,
        buckets=args.buckets,
        longest_span=args.longest_span,
        train_minutes=args.train_minutes,
        train_steps=args.train_steps,
        curve_windows=args.curve_windows,
        router=args.router,
        rank=args.rank or None,
        fit_windows=args.fit_windows,
        tune_windows=args.tune_windows,
        held_windows=args.held_windows,
        seed=args.seed,
        progress=not args.quiet,
    )
    start = time.perf_counter()
    prepared, cal = calibrate(settings)
    manifest = manifest_for(prepared, cal, model_fingerprint(settings.model))
    manifest["timings_s"]["total"] = round(time.perf_counter() - start, 1)
    corrections = {
        bucket_name(b.span): b.correction for b in cal.buckets if b.correction is not None
    }
    save_artifact(args.output, manifest, corrections, cal.router)
    print(
        json.dumps(
            {"artifact": str(args.output), "buckets": manifest["buckets"], "held_out": cal.quality},
            indent=2,
        )
    )
    return 0
