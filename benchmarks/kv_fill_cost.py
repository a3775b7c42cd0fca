"""What a skipped layer's K/V fill costs next to a running layer, before and after fusing.

    python benchmarks/kv_fill_cost.py [--batches 1 32 128] [--rounds 5] [-o DIR]

One real engine (default model, bf16, eager: the layer loop is eager anyway) with UTIO's
forced router and two buckets, skipping 6 layers (13..18) and 10 layers (10..19). For each
batch size and bucket, that many requests pinned to the bucket decode until every row is
past its prompt; one decode step then records the inputs of the first layer after the
span (``vllm_utio.integration.fill_timer``), and the worker replays on them: that running
layer, the span's per-layer fill (before: input norm + QKV projection + RoPE + cache write,
per layer) and its fused fill (after: one normalisation, one GEMM over the span's folded
K/V weights, one RoPE, per-layer cache writes). Medians over interleaved rounds; the
worker's own thread count (one on a 2-core machine). Prints a markdown table; ``-o``
writes it and the raw JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from vllm_utio.integration.fill_timer import EXTENSION
from vllm_utio.paths import default_model_dir

NUM_LAYERS = 30
BUCKETS = [  # shallowest first; nested: 10..19 contains 13..18
    {"name": "skip10", "max_score": 0.2, "keep_first": 10, "keep_last": 10},
    {"name": "skip6", "max_score": 0.4, "keep_first": 13, "keep_last": 11},
]
PROMPT = "The history of the river valley is long, and every village along it has a story. "


def make_engine(max_batch: int):
    from vllm import LLM

    return LLM(
        str(default_model_dir()),
        dtype="bfloat16",
        enforce_eager=True,
        max_model_len=512,
        kv_cache_memory_bytes=512 << 20,
        max_num_seqs=max_batch,
        max_num_batched_tokens=max(2048, 8 * max_batch),
        seed=0,
        worker_extension_cls=EXTENSION,
        additional_config={"utio": {"enabled": True, "router": "forced", "buckets": BUCKETS}},
    )


def measure(llm, batch: int, bucket: dict, repeats: int, rounds: int) -> dict:
    from vllm import SamplingParams

    engine = llm.llm_engine
    params = SamplingParams(
        temperature=0.0, max_tokens=64, ignore_eos=True, extra_args={"utio_bucket": bucket["name"]}
    )
    ids = [f"fill-{bucket['name']}-{batch}-{i}" for i in range(batch)]
    for i, req in enumerate(ids):
        engine.add_request(req, f"{i}: {PROMPT * 3}", params)
    seen: dict[str, int] = {}
    for _ in range(200):  # until every request has decoded at least once
        for out in engine.step():
            seen[out.request_id] = len(out.outputs[0].token_ids)
        if len(seen) == batch and min(seen.values()) >= 2:
            break
    else:
        raise RuntimeError("requests did not all reach decode")
    rejoin = NUM_LAYERS - bucket["keep_last"]
    llm.collective_rpc("utio_fill_arm", args=(rejoin,))
    engine.step()  # one decode step of `batch` rows, all in this bucket
    span = (bucket["keep_first"], rejoin)
    got = llm.collective_rpc("utio_fill_time", args=(rejoin, span, repeats, rounds))[0]
    engine.abort_request(ids)
    while engine.has_unfinished_requests():
        engine.step()
    if got["tokens"] != batch:
        raise RuntimeError(f"captured step had {got['tokens']} tokens, expected {batch}")
    return {"batch": batch, "bucket": bucket["name"], **got}


def table(rows: list[dict]) -> str:
    head = (
        "| batch | skipped span | running layer (ms) | per-layer fill (ms/layer, % of running) "
        "| fused fill (ms/layer, % of running) | speed-up |\n|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        run, old, new = r["running_layer_ms"], r["per_layer_fill_ms"], r["fused_fill_ms"]
        lines.append(
            f"| {r['batch']} | {r['span_layers']} layers | {run:.3f} | {old:.3f} "
            f"({100 * old / run:.0f}%) | {new:.3f} ({100 * new / run:.0f}%) | {old / new:.1f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    ap.add_argument("--repeats", type=int, default=30, help="calls per timing (median)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median)")
    ap.add_argument("-o", "--out", type=Path, default=None)
    args = ap.parse_args()
    llm = make_engine(max(args.batches))
    rows = [
        measure(llm, batch, bucket, args.repeats, args.rounds)
        for batch in args.batches
        for bucket in reversed(BUCKETS)
    ]
    text = table(rows)
    parts = {
        f"b{r['batch']} {r['bucket']}": {k: round(v, 4) for k, v in r["fused_parts_ms"].items()}
        for r in rows
    }
    print(text)
    print("fused fill parts, ms per span:", json.dumps(parts))
    print("worker threads:", statistics.mode(r["threads"] for r in rows))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "kv_fill_cost.json").write_text(json.dumps(rows, indent=1))
        (args.out / "kv_fill_cost.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
