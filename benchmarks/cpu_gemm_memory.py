"""Resident memory of vLLM's CPU matmul (``onednn_mm``) as the number of rows varies.

The soak (``vllm-utio soak``) found the worker's RSS growing under load with UTIO off as
well as on. This isolates the two causes it measured, without an engine: a few linear
layers of the default model's shape run through vLLM 0.32's own CPU GEMM handler
(``create_onednn_mm`` with the primitive cache size vLLM uses, 32) for ``--shapes``
distinct row counts (a server's step sizes), then again for row counts already seen,
then ``malloc_trim(0)``:

- growth per *new* row count that ``malloc_trim`` does not give back (oneDNN state per
  shape; run with ``MALLOC_MMAP_THRESHOLD_=65536`` to see it alone);
- freed buffers glibc keeps (what ``malloc_trim`` returns).

    OMP_NUM_THREADS=1 python benchmarks/cpu_gemm_memory.py --shapes 300
    MALLOC_MMAP_THRESHOLD_=65536 OMP_NUM_THREADS=1 python benchmarks/cpu_gemm_memory.py

The growth per new shape is oneDNN's own process-wide primitive cache (1024 entries by
default; ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` sets it). Bounding it bounds the growth but
costs time once a server rotates through more row counts than vLLM's per-layer cache of
32 keeps: ``--time-rotation N`` times one GEMM of each of the model's four linear shapes
while the row count cycles through 1..N (run it under each capacity).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import time

import psutil
import torch


def rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


# the default model's linear layers (in, out): qkv, o, gate_up, down
MODEL_SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)]


def time_rotation(ops, rows: int, rounds: int = 3) -> dict:
    """Microseconds per GEMM while the row count cycles through 1..rows."""
    handlers = [
        ops.create_onednn_mm(torch.randn(n, k, dtype=torch.bfloat16).t(), 32)
        for k, n in MODEL_SHAPES
    ]
    inputs = {
        m: [torch.randn(m, k, dtype=torch.bfloat16) for k, _ in MODEL_SHAPES]
        for m in range(1, rows + 1)
    }

    def sweep() -> None:
        for xs in inputs.values():
            for h, x in zip(handlers, xs, strict=True):
                ops.onednn_mm(h, x, None)

    sweep()  # first sight of every shape
    t0 = time.perf_counter()
    for _ in range(rounds):
        sweep()
    per_gemm = (time.perf_counter() - t0) / (rounds * rows * len(MODEL_SHAPES))
    return {
        "row_counts": rows,
        "us_per_gemm": round(per_gemm * 1e6, 1),
        "onednn_primitive_cache_capacity": os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", type=int, default=300, help="distinct row counts")
    parser.add_argument("--handlers", type=int, default=4, help="linear layers")
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--out-features", type=int, default=1536)
    parser.add_argument(
        "--time-rotation",
        type=int,
        default=0,
        metavar="N",
        help="instead: microseconds per GEMM while row counts cycle through 1..N",
    )
    args = parser.parse_args()
    from vllm import _custom_ops as ops  # vLLM's CPU GEMM, as its linear layers use it

    if args.time_rotation:
        print(json.dumps(time_rotation(ops, args.time_rotation)))
        return

    weights = [
        torch.randn(args.out_features, args.hidden, dtype=torch.bfloat16).t()
        for _ in range(args.handlers)
    ]
    handlers = [ops.create_onednn_mm(w, 32) for w in weights]
    start = rss_mib()
    series = []
    for m in range(1, args.shapes + 1):
        x = torch.randn(m, args.hidden, dtype=torch.bfloat16)
        for h in handlers:
            ops.onednn_mm(h, x, None)
        if m % 50 == 0 or m == args.shapes:
            series.append((m, round(rss_mib() - start, 1)))
    before_repeat = rss_mib()
    for m in range(1, args.shapes + 1):  # the same shapes again
        x = torch.randn(m, args.hidden, dtype=torch.bfloat16)
        for h in handlers:
            ops.onednn_mm(h, x, None)
    repeat = rss_mib() - before_repeat
    before_trim = rss_mib()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    trimmed = before_trim - rss_mib()
    kept = rss_mib() - start
    print(
        json.dumps(
            {
                "growth_mib_by_new_shapes": series,
                "growth_mib_repeating_seen_shapes": round(repeat, 1),
                "malloc_trim_returned_mib": round(trimmed, 1),
                "kept_after_trim_mib": round(kept, 1),
                "kept_kib_per_shape_per_layer": round(kept * 1024 / args.shapes / args.handlers, 1),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
