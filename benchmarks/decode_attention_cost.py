"""Decode attention per layer on one thread: vLLM 0.32's CPU kernel vs UTIO's own op.

    python benchmarks/decode_attention_cost.py [--rows 32] [--contexts 768 4096 8064]
        [--tokens 1 2 5] [--layers 12] [--huge-pages] [-o DIR]

Paged bf16 caches in the CPU backend's 'vec' layout written through vLLM's own write op,
the default model's shape (3 KV heads, 9 query heads, head size 64, 32-token blocks),
scattered block tables, one cache per layer so that each call reads from DRAM as in a
decode step. ``--tokens``: query tokens per row (1: decode; more: a verification pass of
speculative decoding). ``--huge-pages``: the caches moved onto 2 MiB pages first, as UTIO's
engine does with vLLM's (``kv_huge_pages``). Medians over rounds; prints a markdown table,
``-o`` writes it and the raw JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

KV_HEADS, HEADS, DIM, BLOCK = 3, 9, 64, 32


def setup(rows: int, context: int, layers: int):
    from vllm import _custom_ops as ops

    nb = -(-context // BLOCK)
    blocks = rows * nb + 4
    shape = (blocks, KV_HEADS, BLOCK, 2 * DIM)
    caches = [torch.zeros(shape, dtype=torch.bfloat16) for _ in range(layers)]
    for cache in caches:  # fill through vLLM's own write (its 'vec' layout)
        kc, vc = cache.view(blocks, KV_HEADS, 2 * BLOCK, DIM).chunk(2, dim=2)
        slots = torch.arange(blocks * BLOCK)
        k = torch.randn(len(slots), KV_HEADS, DIM).to(torch.bfloat16)
        ops.cpu_attn_reshape_and_cache(k, k, kc, vc, slots, "vec")
    table = torch.randperm(blocks)[: rows * nb].reshape(rows, nb).to(torch.int32)
    return ops, caches, table


def time_ms(call, caches, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for cache in caches:
            call(cache)
        times.append((time.perf_counter() - t0) / len(caches) * 1e3)
    return statistics.median(times)


def measure(
    rows: int, context: int, tokens: int, layers: int, rounds: int, huge_pages: bool = False
) -> dict:
    from vllm_utio.cpu_ops import load

    op = load()
    ops, caches, table = setup(rows, context, layers)
    if huge_pages:
        from vllm_utio.integration.huge_pages import back_with_huge_pages

        back_with_huge_pages(caches)
    lens = torch.full((rows,), context, dtype=torch.int32)
    starts = torch.arange(rows + 1, dtype=torch.int32) * tokens
    q = torch.randn(rows * tokens, HEADS, DIM).to(torch.bfloat16)
    out = torch.empty_like(q)
    meta = ops.cpu_attn_get_scheduler_metadata(
        rows, HEADS, KV_HEADS, DIM, lens, q.dtype, starts, True, -1, "vec", False
    )
    layout = [caches[0].stride(0), 0, 2 * BLOCK * DIM, BLOCK, BLOCK * DIM, 2 * BLOCK * DIM, DIM]

    def vllm_call(cache):
        kc, vc = cache.view(cache.shape[0], KV_HEADS, 2 * BLOCK, DIM).chunk(2, dim=2)
        ops.cpu_attention_with_kv_cache(
            q, kc, vc, out, starts, lens, DIM**-0.5, True, None, -1, table, 0.0, meta, None
        )

    def utio_call(cache, dot: bool = True):
        op.decode_attention(
            q, out, cache, layout, table, lens, starts, KV_HEADS, BLOCK, DIM**-0.5, bf16_dot=dot
        )

    vllm_ms = time_ms(vllm_call, caches, rounds)
    utio_ms = time_ms(utio_call, caches, rounds)
    float_ms = time_ms(lambda cache: utio_call(cache, dot=False), caches, rounds)
    gbytes = rows * context * KV_HEADS * DIM * 2 * 2 / 1e9  # K and V, bf16
    return {
        "rows": rows,
        "context": context,
        "tokens": tokens,
        "vllm_ms": vllm_ms,
        "utio_ms": utio_ms,
        "utio_float_ms": float_ms,
        "dot": bool(op.decode_attention_has_dot()),
        "huge_pages": huge_pages,
        "speedup": vllm_ms / utio_ms,
        "utio_gb_s": gbytes / (utio_ms / 1e3),
        "vllm_gb_s": gbytes / (vllm_ms / 1e3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--contexts", type=int, nargs="+", default=[768, 4096, 8064])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 5])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--huge-pages", action="store_true", help="caches on 2 MiB pages")
    parser.add_argument("-o", "--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = [
        measure(args.rows, c, t, args.layers, args.rounds, args.huge_pages)
        for c in args.contexts
        for t in args.tokens
    ]
    lines = [
        f"Decode attention per layer, {args.rows} rows, one thread, bf16, 9/3 heads x 64, "
        f"{BLOCK}-token blocks, scattered tables, caches on "
        f"{'2 MiB' if args.huge_pages else '4 KiB'} pages (median of {args.rounds} rounds)",
        "",
        f"UTIO's bf16 dot products: {'on' if results[0]['dot'] else 'not in this build'}; "
        "UTIO float ms: the same op with every product in float (`bf16_dot=False`)",
        "",
        "| context | query tokens/row | vLLM ms | UTIO ms | UTIO float ms | UTIO speed-up "
        "| vLLM GB/s | UTIO GB/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['context']} | {r['tokens']} | {r['vllm_ms']:.2f} | {r['utio_ms']:.2f} | "
            f"{r['utio_float_ms']:.2f} | {r['speedup']:.2f}x | {r['vllm_gb_s']:.1f} | "
            f"{r['utio_gb_s']:.1f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "decode_attention_cost.md").write_text(table + "\n")
        (args.out / "decode_attention_cost.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
