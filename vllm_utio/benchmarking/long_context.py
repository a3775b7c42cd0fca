"""``vllm-utio bench-long``: decode speed of sparse attention policies at long context.

Cases (see :mod:`vllm_utio.benchmarking.long_policies`): vanilla vLLM, UTIO dense, each
policy applied to every decode token, and policies applied by importance routing. Prompts
of each context length are cut from the prepared Wikipedia text, one distinct window per
request; greedy, ``ignore_eos``, a fixed number of new tokens; cases interleaved per
repeat; medians. Decode tok/s and per-step latency come from the engine's per-request
timestamps (:func:`vllm_utio.benchmarking.offline.measure_once`).

Attention share: a worker extension times the attention kernel of every layer in pure
decode steps (:mod:`vllm_utio.integration.attention_timer`); share = attention ms per
decode step / measured step ms, in the same runs.

Prefix caching is on: request ``i`` gets the same prompt in every case and repeat (and
batch 8 uses the first 8 of batch 32's prompts), so each engine prefills a context's
prompts once, in its warm-up. That is exact here: prompt K/V come from dense full-depth
prefill under every policy, and no prompt contains another request's generated tokens.

Memory: each engine holds a KV cache for the largest batch x (context + new tokens)
(6.9 GB at 32 x 8.2k for the default model). ``--engines together`` keeps every engine
alive and interleaves all cases; ``sequential`` runs one engine at a time (cases on one
engine stay interleaved: UTIO dense and every "-all" policy share the forced engine);
``auto`` picks together when all KV caches plus 2 GiB per engine fit in available memory.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vllm_utio.benchmarking import long_policies as lp
from vllm_utio.benchmarking.offline import measure_once, summarize
from vllm_utio.benchmarking.results import median_present, new_results, save
from vllm_utio.integration import attention_timer

KIND = "long-context"
ENGINE_OVERHEAD_BYTES = 2 << 30  # per engine process besides its KV cache (weights, torch)
ENGINE_MODES = {
    "together": "all alive, every case interleaved",
    "sequential": "one at a time; the cases of one engine interleaved",
}


# --------------------------------------------------------------------------- prompts


def corpus_ids(tokenizer: Any, texts: Sequence[str], needed: int) -> list[int]:
    """Token ids of ``texts`` joined, tokenizing documents only until ``needed`` are there."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text + "\n\n", add_special_tokens=False))
        if len(ids) >= needed:
            break
    return ids


def long_prompts(
    ids: Sequence[int], batch: int, length: int, max_batch: int, max_length: int
) -> list[dict]:
    """``batch`` prompts of ``length`` tokens; prompt ``i`` starts at ``i * stride`` whatever
    the batch or length, so smaller batches and shorter contexts reuse cached prefixes."""
    if len(ids) < max_length:
        raise ValueError(f"text has {len(ids)} tokens, a prompt needs {max_length}")
    if batch > max_batch:  # prompts past max_batch would start past the text's end
        raise ValueError(f"{batch} prompts asked of a text cut for at most {max_batch}")
    stride = max(1, (len(ids) - max_length) // max(1, max_batch - 1))
    return [{"prompt_token_ids": list(ids[i * stride : i * stride + length])} for i in range(batch)]


# --------------------------------------------------------------------------- measuring


def measure(
    llm: Any, prompts: list[dict], output_len: int, pin: str | None, utio: bool, timing: bool
) -> dict[str, Any]:
    """One run (see :func:`measure_once`) plus attention time and sparse-attention counters."""
    before = attention_timer.read(llm) if timing else None
    sample = measure_once(llm, prompts, output_len, pin, utio)
    attn_ms = None
    if before is not None:
        attn_ms = attention_timer.decode_attention_ms(before, attention_timer.read(llm))
    step = sample["step_ms"]
    sample["attn_ms"] = attn_ms
    sample["attention_share"] = attn_ms / step if attn_ms is not None and step else None
    sample["kv_read_fraction"] = sample["sparse_share"] = None
    sample["select_ms"] = sample["select_share"] = None
    u = sample["utio"]
    if u is not None:
        if u["kv_tokens_dense"]:
            sample["kv_read_fraction"] = u["kv_tokens_read"] / u["kv_tokens_dense"]
        if sample["decode_steps"]:  # selection's own time per decode step, and its share
            sample["select_ms"] = 1e3 * (u["select_s"] + u["summary_s"]) / sample["decode_steps"]
            sample["select_share"] = sample["select_ms"] / step if step else None
        decode_rows = len(prompts) * sample["decode_steps"]
        reused, focused = u["select_rows_reused"], u["select_rows_focused"]
        if decode_rows and (reused or focused):
            # select_every_steps: layers per decode token that reused a choice, and that
            # chose off their turn because the row was focused (focus_mass)
            sample["reused_per_token"] = reused / decode_rows
            sample["focused_per_token"] = focused / decode_rows
        if decode_rows:
            # every row at level >= 1 was a decode row under the bucket's sparse policy
            sample["sparse_share"] = min(1.0, sum(u["rows_per_level"][1:]) / decode_rows)
    return sample


def _groups(engines: Sequence[str], mode: str) -> list[list[str]]:
    return [list(engines)] if mode == "together" else [[e] for e in engines]


def run_long(
    engines: dict[str, dict[str, Any] | None],
    cases: Sequence[lp.Case],
    make_llm: Callable[[str], Any],
    ids: Sequence[int],
    contexts: Sequence[int],
    batches: Sequence[int],
    output_len: int,
    repeats: int,
    timing: bool,
    mode: str,
    release: Callable[[Any], None] = lp.shutdown,
) -> list[dict[str, Any]]:
    """Measure every case at every (context, batch), ``repeats`` times; raw samples.

    ``make_llm(engine_key)`` builds (or hands out) an engine; ``release`` is called on it
    when its group is done.
    """
    order = sorted(batches, reverse=True)  # the largest batch prefills every prompt first
    max_batch = max(batches)
    samples: list[dict[str, Any]] = []
    total = len(contexts) * len(batches) * repeats * len(cases)
    with tqdm(total=total, desc="bench-long", unit="run") as bar:
        for group in _groups([e for e in engines if any(c.engine == e for c in cases)], mode):
            group_cases = [c for c in cases if c.engine in group]
            llms: dict[str, Any] = {}
            try:
                for key in group:
                    bar.set_postfix_str(f"starting {key}")
                    llms[key] = make_llm(key)
                for ctx in contexts:
                    for batch in order:
                        prompts = long_prompts(ids, batch, ctx, max_batch, max(contexts))
                        for case in group_cases:  # warm-up: prefill (cached), compile
                            bar.set_postfix_str(f"warm-up {case.name} ctx={ctx} b={batch}")
                            utio = engines[case.engine] is not None
                            measure_once(llms[case.engine], prompts, 4, case.pin, utio)
                        for repeat in range(repeats):
                            for case in group_cases:
                                utio = engines[case.engine] is not None
                                s = measure(
                                    llms[case.engine], prompts, output_len, case.pin, utio, timing
                                )
                                s.update(config=case.name, batch=batch, prompt_len=ctx)
                                s["repeat"] = repeat
                                samples.append(s)
                                bar.set_postfix_str(
                                    f"{case.name} ctx={ctx} b={batch} "
                                    f"{s['decode_tok_s'] or 0:.0f} tok/s"
                                )
                                bar.update()
            finally:
                for llm in llms.values():
                    release(llm)
    return samples


def summarize_long(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """:func:`summarize` rows plus medians of the long-context fields."""
    rows = summarize(samples)
    for row in rows:
        group = [
            s
            for s in samples
            if (s["config"], s["batch"], s["prompt_len"])
            == (row["config"], row["batch"], row["prompt_len"])
        ]
        keys = ("attn_ms", "attention_share", "kv_read_fraction", "sparse_share", "select_ms")
        for key in (*keys, "select_share", "reused_per_token", "focused_per_token"):
            row[key] = median_present([s.get(key) for s in group])
    return rows


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model path (default: the embedded model)")
    parser.add_argument(
        "--context-lens",
        type=int,
        nargs="+",
        default=[1024, 4096, 8064],
        help="prompt tokens; prompt + output must fit the model's positions (8192 for the "
        "default model, hence 8064 for '8k' with 128 new tokens)",
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    lp.add_policy_arguments(parser)
    parser.add_argument(
        "--engines",
        choices=("auto", "together", "sequential"),
        default="auto",
        help="keep all engines alive (interleave every case) or run one engine at a time",
    )
    parser.add_argument(
        "--kv-cache-gib", type=float, default=None, help="per engine (default: fits the sizes)"
    )
    parser.add_argument("--eager", action="store_true", help="enforce_eager on every engine")
    parser.add_argument(
        "--small-pages",
        action="store_true",
        help="also run UTIO dense and every policy with the KV cache on 4 KiB pages "
        "(kv_huge_pages off; one more engine), to see what huge pages alone change",
    )
    parser.add_argument(
        "--no-attention-timing", action="store_true", help="do not time the attention kernel"
    )
    parser.add_argument(
        "--quick", action="store_true", help="one ~600-token context, batch 2, 8 new tokens"
    )
    parser.add_argument("-o", "--out", type=Path, default=Path("results/long_context.json"))
    lp.add_block_size_argument(parser)
    lp.add_dtype_argument(parser)


def apply_quick(args: argparse.Namespace) -> None:
    args.context_lens, args.batch_sizes, args.output_len, args.repeats = [640], [2], 8, 1


def plan(args: argparse.Namespace, model: str) -> dict[str, Any]:
    """Everything a run needs that does not need an engine: policies, engines, cases, sizes."""
    shape = lp.model_shape(model)
    longest = max(args.context_lens) + args.output_len
    if shape["max_positions"] and longest > shape["max_positions"]:
        raise SystemExit(
            f"context {max(args.context_lens)} + {args.output_len} new tokens = {longest} "
            f"exceeds the model's {shape['max_positions']} positions"
        )
    policies, notes = lp.available(lp.parse_policy_args(args.policy))
    if args.quick:
        policies = lp.with_recent(policies, lp.QUICK_RECENT_TOKENS)
    routed, skipped = lp.routable(args.routed, policies)
    notes += skipped
    small = args.small_pages
    engines = lp.engine_configs(
        policies, routed, shape["num_layers"], args.route_max_score, small_pages=small
    )
    per_token = lp.kv_bytes_per_token(model, lp.resolve_dtype(args.dtype))
    kv = (
        int(args.kv_cache_gib * (1 << 30))
        if args.kv_cache_gib
        else max(256 << 20, int(1.15 * max(args.batch_sizes) * longest * per_token))
    )
    mode = args.engines
    if mode == "auto":
        avail = lp.mem_available_bytes() or 0
        mode = "together" if len(engines) * (kv + ENGINE_OVERHEAD_BYTES) < avail else "sequential"
    return {
        "policies": policies,
        "routed": routed,
        "engines": engines,
        "cases": lp.cases(policies, routed, args.route_max_score, small_pages=small),
        "kv_bytes": kv,
        "max_len": longest,
        "mode": mode,
        "notes": notes,
    }


def method_notes(p: dict[str, Any], timing: bool) -> list[str]:
    notes = [
        "decode tok/s = batch x (new tokens - 1) / decode time, decode time = last token - "
        "first token of the batch (engine timestamps; every prompt is prefilled before it "
        "starts); step ms = decode time / decode steps; medians over repeats (min-max)",
        "'-all' cases pin every request to a full-depth bucket carrying the policy on one "
        "forced-router engine (same code path as attention_all); utio-dense is the same "
        "engine unpinned, so it is the reference for the policies' speedup",
        "UTIO engines put the KV cache on 2 MiB huge pages (kv_huge_pages, default on); "
        "'-small-pages' cases: the forced engine with it off (4 KiB pages, as vanilla)",
        "'-routed' cases: surrogate router, one full-depth bucket with the policy; "
        "sparse share = decode tokens the router sent to it",
        "kv read = cached positions decode tokens attended to / what dense attention reads "
        "(UTIO's counters; block-granular)",
        f"engines: {p['mode']} ({ENGINE_MODES[p['mode']]}), "
        f"KV cache {p['kv_bytes'] / 2**30:.2f} GiB each, prefix caching on (each context's "
        "prompts prefilled once per engine in the warm-up runs)",
    ]
    if timing:
        notes.append(
            "attention share = attention-kernel ms per pure-decode step (every layer's "
            "impl.forward, i.e. cpu_attention_with_kv_cache, timed in the worker; K/V "
            "writes excluded) / measured step ms, from the same runs; ceiling = 1 / (1 - "
            "share), the speedup if attention were free; vslash's vertical-block estimate "
            "(one layer's cached K scored per step) runs outside the kernel, so it counts "
            "as non-attention time; select's choosing runs inside impl.forward (before the "
            "kernel), so for select policies it is included: the kernel alone is attention "
            "minus selection ms"
        )
    return notes


def run(args: argparse.Namespace, llms: dict[str, Any] | None = None) -> int:
    """Run the benchmark; ``llms`` (engine key -> LLM) supplies ready engines (tests)."""
    from transformers import AutoTokenizer

    from vllm_utio.assets.data import load_wiki_documents
    from vllm_utio.paths import default_model_dir

    if args.quick:
        apply_quick(args)
    model = str(args.model or default_model_dir())
    dtype = args.dtype = lp.run_dtype(args.dtype, llms)
    p = plan(args, model)
    timing = not args.no_attention_timing
    if llms is not None:
        p["mode"] = "together"
    settings = {
        "kind": KIND,
        "model": model,
        "batch_sizes": args.batch_sizes,
        "prompt_lens": args.context_lens,
        "output_len": args.output_len,
        "repeats": args.repeats,
        "dtype": dtype,
        "enforce_eager": args.eager,
        "quick": args.quick,
        "policies": p["policies"],
        "routed": p["routed"],
        "route_max_score": args.route_max_score,
        "engines": {k: v for k, v in p["engines"].items()},
        "engine_mode": p["mode"],
        "kv_cache_bytes": p["kv_bytes"],
        "attention_timing": timing,
        "block_size": args.block_size,
    }
    configs = [{**c.__dict__, "levels": None} for c in p["cases"]]
    results = new_results(settings, configs)
    results["notes"] = p["notes"] + method_notes(p, timing)
    tokenizer = AutoTokenizer.from_pretrained(model)
    texts = [d["text"] for d in load_wiki_documents()]
    ids = corpus_ids(tokenizer, texts, max(args.batch_sizes) * max(args.context_lens))

    def make_llm(key: str) -> Any:
        if llms is not None:
            return llms[key]
        from vllm import LLM

        kw = lp.engine_kwargs(
            p["max_len"],
            max(args.batch_sizes),
            p["kv_bytes"],
            args.eager,
            timing=timing,
            utio=p["engines"][key],
            block_size=args.block_size,
            dtype=dtype,
        )
        return LLM(model, **kw)

    samples = run_long(
        p["engines"],
        p["cases"],
        make_llm,
        ids,
        args.context_lens,
        args.batch_sizes,
        args.output_len,
        args.repeats,
        timing,
        p["mode"],
        release=(lambda _llm: None) if llms is not None else lp.shutdown,
    )
    results["samples"] = samples
    results["summary"] = summarize_long(samples)
    print(save(results, args.out))
    return 0
