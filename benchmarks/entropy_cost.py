"""Cost of the surrogate score's entropy/varentropy over the 49k vocabulary, per step.

    python benchmarks/entropy_cost.py [--batches 1 8 32 64 128] [--rounds 7] [-o DIR]

The default model's real logits (the pure-torch reference on a held-out wiki window,
rows tiled to each batch size, bf16 as the engine computes them), on one thread (what the
engine's worker uses on a 2-core machine). Candidates, interleaved, medians over rounds:

- ``exact``: the log_softmax form (``signals.entropy_and_varentropy_exact``, the old path);
- ``fused``: the default (``signals.entropy_and_varentropy``): one compiled pass;
- ``eager``: the same moments, eager, in 8-row chunks (the fallback without a compiler);
- ``topk64``: logsumexp + the top 64 probabilities, with the tail's entropy bounded by
  [T * -log p_64, T * log((V - 64) / T)] for tail mass T (no varentropy). Its half-width
  on these logits is printed: why it was not chosen.

Also prints the first call of ``fused`` (compiling, or loading inductor's cache).

``--engine``: the same two paths inside a real engine with the surrogate router (eager,
bf16; the test suite's surrogate buckets), switched in the worker between runs (exact and
fused interleaved): UTIO's routing time per step (signals + router + reorder) next to the
wall time per step of ``LLM.generate`` (prefill included) for 32 new tokens per request.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from vllm_utio.routing import entropy, signals

K = 64


def real_logits(rows: int) -> torch.Tensor:
    from vllm_utio.calibration import data as cdata
    from vllm_utio.evaluation.reference import ReferenceLlama
    from vllm_utio.paths import default_model_dir

    model = default_model_dir()
    ref = ReferenceLlama.from_pretrained(model)
    _, held = cdata.split_documents(cdata.load_documents("wiki"))
    window = cdata.make_windows(cdata.load_tokenizer(model), held[:2], rows, 1)[0]
    return ref.forward(window.ids, keep_kv=False).logits


def topk_entropy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(entropy estimate, half-width of its interval), both in nats."""
    x = logits.float()
    lse = torch.logsumexp(x, -1, keepdim=True)
    lp = x.topk(K, -1).values - lse
    p = lp.exp()
    tail = (1.0 - p.sum(-1)).clamp_min(1e-12)
    low = tail * -lp[:, -1]
    high = tail * torch.log((x.shape[-1] - K) / tail)
    return -(p * lp).sum(-1) + (low + high) / 2, (high - low) / 2


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


SURROGATE = {
    "enabled": True,
    "router": "surrogate",
    "buckets": [
        {"name": "shallow", "max_score": 0.12, "keep_first": 13, "keep_last": 11},
        {"name": "mid", "max_score": 0.2, "keep_first": 15, "keep_last": 12},
    ],
}


def _use(worker, path: str) -> bool:
    """In the worker: route with the exact or the fused entropy (the runner calls
    ``signals.entropy_and_varentropy`` through the module)."""
    from vllm_utio.routing import signals

    fused = getattr(signals, "_bench_fused", signals.entropy_and_varentropy)
    signals._bench_fused = fused
    exact = signals.entropy_and_varentropy_exact
    signals.entropy_and_varentropy = fused if path == "fused" else exact
    return entropy.compiled_in_use()


def engine_share(batches: list[int], rounds: int) -> list[dict]:
    from vllm import LLM, SamplingParams

    from vllm_utio.paths import default_model_dir

    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # _use is sent by value
    llm = LLM(
        str(default_model_dir()),
        dtype="bfloat16",
        enforce_eager=True,
        max_model_len=512,
        kv_cache_memory_bytes=512 << 20,
        max_num_seqs=max(batches),
        max_num_batched_tokens=max(2048, 8 * max(batches)),
        seed=0,
        additional_config={"utio": SURROGATE},
    )
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    rows = []
    for batch in batches:
        prompts = [f"{i}: The history of the river valley is long." for i in range(batch)]
        samples: dict[str, dict[str, list[float]]] = {}
        for _ in range(rounds):
            for path in ("exact", "fused"):
                llm.collective_rpc(_use, args=(path,))
                llm.collective_rpc("utio_stats", kwargs={"reset": True})
                t0 = time.perf_counter()
                llm.generate(prompts, params, use_tqdm=False)
                wall = time.perf_counter() - t0
                st = llm.collective_rpc("utio_stats", kwargs={"reset": True})[0]
                got = samples.setdefault(path, {"routing_ms": [], "step_ms": []})
                got["routing_ms"].append(1e3 * st["routing_s"] / st["steps"])
                got["step_ms"].append(1e3 * wall / st["steps"])
        rows.append(
            {
                "batch": batch,
                **{
                    f"{path}_{k}": statistics.median(v)
                    for path, d in samples.items()
                    for k, v in d.items()
                },
            }
        )
    return rows


def engine_table(rows: list[dict]) -> str:
    lines = [
        "| batch | routing ms/step, exact (share) | fused (share) | step ms exact / fused |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['exact_routing_ms']:.2f} "
            f"({100 * r['exact_routing_ms'] / r['exact_step_ms']:.0f}%) "
            f"| {r['fused_routing_ms']:.2f} "
            f"({100 * r['fused_routing_ms'] / r['fused_step_ms']:.0f}%) "
            f"| {r['exact_step_ms']:.1f} / {r['fused_step_ms']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64, 128])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--engine", action="store_true", help="measure inside a real engine")
    ap.add_argument("-o", "--out", type=Path, default=None)
    args = ap.parse_args()
    if args.engine:
        rows = engine_share(args.batches, args.rounds)
        print(engine_table(rows))
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "entropy_engine.json").write_text(json.dumps(rows, indent=1))
        return
    torch.set_num_threads(args.threads)
    base = real_logits(128).bfloat16()
    t0 = time.perf_counter()
    signals.entropy_and_varentropy(base[:2])
    first_call_s = time.perf_counter() - t0
    _, half = topk_entropy(base)
    log_v = math.log(base.shape[-1])
    candidates = {
        "exact": signals.entropy_and_varentropy_exact,
        "fused": signals.entropy_and_varentropy,
        "eager": entropy.eager_moments,
        "topk64": topk_entropy,
    }
    rows = []
    for batch in args.batches:
        logits = base[torch.arange(batch) % base.shape[0]].contiguous()
        samples: dict[str, list[float]] = {name: [] for name in candidates}
        repeats = max(3, 64 // batch)
        for _ in range(args.rounds):
            for name, fn in candidates.items():
                fn(logits)  # warm (allocator, caches)
                samples[name].append(median_ms(lambda fn=fn, x=logits: fn(x), repeats))
        rows.append({"batch": batch, **{k: statistics.median(v) for k, v in samples.items()}})
    head = "| batch | exact (ms) | fused (ms) | eager moments (ms) | top-64 bound (ms) | speed-up |"
    lines = [head, "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['exact']:.3f} | {r['fused']:.3f} | {r['eager']:.3f} "
            f"| {r['topk64']:.3f} | {r['exact'] / r['fused']:.1f}x |"
        )
    text = "\n".join(lines)
    print(text)
    print(f"threads {args.threads}; compiled pass in use: {entropy.compiled_in_use()}; ")
    print(f"fused first call (compile or inductor cache load): {first_call_s:.1f} s")
    print(
        f"top-64 entropy half-width on these logits (normalised): max "
        f"{float(half.max()) / log_v:.3f}, median {float(half.median()) / log_v:.3f}"
    )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "entropy_cost.json").write_text(
            json.dumps({"rows": rows, "first_call_s": first_call_s}, indent=1)
        )
        (args.out / "entropy_cost.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
