"""What select's ``sparq`` scoring costs per layer: UTIO's C++ op on one thread.

    python benchmarks/sparq_op_cost.py [--rows 32] [--contexts 4096 8064] [--huge-pages] [-o DIR]

Paged bf16 caches in the CPU backend's layout (per block and KV head: K as ``[channel,
token]``, then V), the default model's shape (3 KV heads, 9 query heads, head size 64,
32-token blocks), one cache per layer of 28 selecting layers, so each call reads from
DRAM as in a decode step (one cache re-read would sit in the L3 and look faster). Tables
either in allocation order (a fresh engine: a row's blocks follow each other) or scattered
(a long-running server). Also the torch spec (``kv_selection.sparq_block_mass``) on the
same data, the cost without the op. ``--huge-pages``: the caches moved onto 2 MiB pages
first, as UTIO's engine does with vLLM's (``kv_huge_pages``). Medians over rounds; prints a
markdown table, ``-o`` writes it and the raw JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from vllm_utio.kv_selection import sparq_block_mass

KV_HEADS, HEADS, HEAD_SIZE, BLOCK = 3, 9, 64, 32
LAYERS = 28  # the default model's layers past select's dense layers


def caches(rows: int, context: int, layers: int) -> list[torch.Tensor]:
    """One bf16 cache per layer, ``[blocks, KV heads, block, 2 * head size]``."""
    blocks = rows * (-(-context // BLOCK)) + 16
    shape = (blocks, KV_HEADS, BLOCK, 2 * HEAD_SIZE)
    return [torch.randn(shape).to(torch.bfloat16) for _ in range(layers)]


def per_layer_ms(op, caches_: list[torch.Tensor], table, lens, channels: int, rounds: int):
    strides = (0, 1, 2 * BLOCK * HEAD_SIZE, BLOCK)  # start, token, head, channel (K half)
    query = torch.randn(len(lens), HEADS, HEAD_SIZE)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for cache in caches_:
            op.sparq_block_mass(
                query, cache, cache.stride(0), *strides, table, lens, KV_HEADS, BLOCK,
                channels, HEAD_SIZE**-0.5,
            )  # fmt: skip
        times.append((time.perf_counter() - t0) / len(caches_) * 1e3)
    return statistics.median(times)


def spec_ms(cache: torch.Tensor, table, lens, channels: int) -> float:
    """The torch spec, keys gathered into logical order first (as it needs them)."""
    rows, width = table.shape
    t0 = time.perf_counter()
    # per block and KV head: K as [channel, token], then V
    split = cache.reshape(-1, KV_HEADS, 2, HEAD_SIZE, BLOCK)
    keys = split[table.reshape(-1), :, 0]  # [R*NB, G, D, BS]
    keys = keys.reshape(rows, width, KV_HEADS, HEAD_SIZE, BLOCK).permute(0, 1, 4, 2, 3)
    keys = keys.reshape(rows, width * BLOCK, KV_HEADS, HEAD_SIZE)
    query = torch.randn(rows, HEADS, HEAD_SIZE)
    sparq_block_mass(query, keys, lens, BLOCK, channels, HEAD_SIZE**-0.5)
    return (time.perf_counter() - t0) * 1e3


def main() -> None:
    from vllm_utio.cpu_ops import load
    from vllm_utio.integration.huge_pages import back_with_huge_pages

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 8064])
    ap.add_argument("--channels", type=int, nargs="+", default=[16])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--huge-pages", action="store_true", help="caches on 2 MiB pages")
    ap.add_argument("-o", "--output", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)  # vLLM's CPU worker runs one thread on a 2-core machine
    op = load()
    results = []
    for context in args.contexts:
        layers = caches(args.rows, context, LAYERS)
        if args.huge_pages:
            back_with_huge_pages(layers)
        nb = -(-context // BLOCK)
        lens = torch.full((args.rows,), context, dtype=torch.long)
        in_order = torch.arange(args.rows * nb).reshape(args.rows, nb)
        scattered = torch.randperm(layers[0].shape[0])[: args.rows * nb].reshape(args.rows, nb)
        for channels in args.channels:
            row = {"context": context, "rows": args.rows, "channels": channels}
            row["huge_pages"] = args.huge_pages
            row["in_order_ms"] = per_layer_ms(op, layers, in_order, lens, channels, args.rounds)
            row["scattered_ms"] = per_layer_ms(op, layers, scattered, lens, channels, args.rounds)
            row["spec_ms"] = spec_ms(layers[0], scattered, lens, channels)
            results.append(row)
        del layers
    pages = "2 MiB" if args.huge_pages else "4 KiB"
    lines = [
        f"Caches on {pages} pages.",
        "",
        "| context | rows | channels | op, blocks in order (ms/layer) "
        "| op, scattered (ms/layer) | per step (x28 layers, scattered) | torch spec (ms/layer) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['context']} | {r['rows']} | {r['channels']} | {r['in_order_ms']:.2f} "
            f"| {r['scattered_ms']:.2f} | {LAYERS * r['scattered_ms']:.0f} ms "
            f"| {r['spec_ms']:.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.output:
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / "sparq_op_cost.md").write_text(table + "\n")
        (args.output / "sparq_op_cost.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
