"""``vllm-utio eval-long``: quality of sparse attention policies at long context.

Per context length and case (the cases of ``bench-long``: UTIO dense, each policy on
every decode token, policies under importance routing), against vLLM with UTIO off:

- teacher-forced perplexity of the last ``T`` tokens of long held-out documents (every
  scored token from a decode step over the whole document), top-1 agreement, bootstrap
  95% intervals over documents (:func:`vllm_utio.evaluation.quality.compare`);
- greedy agreement: ``G`` greedy tokens from each document's prompt, vs vanilla's;
- retrieval: facts hidden at depths spread over long prompts, asked for at the end, four
  kinds (single, multikey, multivalue, copy; :mod:`vllm_utio.evaluation.retrieval`); pass
  counts per kind and overall with Wilson intervals, each policy judged against UTIO
  dense (``retrieval_vs_dense``).

A separate command from ``vllm-utio eval`` (one UTIO config vs the full model on short
windows): this one compares several attention policies at several context lengths and
adds the retrieval cases. Engines run one at a time (vanilla, the forced engine with one
pinned full-depth bucket per policy, one surrogate engine per routed policy; see
:mod:`vllm_utio.benchmarking.long_policies`). Cases on one engine share prompt K/V
through the prefix cache (a salt per prompt): exact, because prompts are prefilled dense
at full depth under every policy and no prompt contains another request's generated
tokens (the salt also keeps different context lengths apart).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_utio.benchmarking import long_policies as lp
from vllm_utio.evaluation.retrieval import RetrievalCase

SCHEMA_ID = "vllm-utio-eval-long/2"  # 2: retrieval cases of four kinds (was: needles)
DENSE = "utio-dense"  # the retrieval reference


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model directory (default: built-in)")
    parser.add_argument(
        "--context-lens",
        type=int,
        nargs="+",
        default=[4096, 8192],
        help="tokens per document and per retrieval case (at most the model's positions)",
    )
    parser.add_argument(
        "--forced-tokens", type=int, default=256, help="teacher-forced tail of each document"
    )
    parser.add_argument("--docs", type=int, default=16, help="documents per context length")
    parser.add_argument("--greedy-tokens", type=int, default=64)
    parser.add_argument(
        "--needles",
        type=int,
        default=48,
        help="retrieval cases per context (kinds in rotation, depths spread over 0-100%%)",
    )
    lp.add_policy_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=8, help="requests per engine call")
    parser.add_argument("--kv-cache-gib", type=float, default=None)
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="retrieval cases and bootstrap")
    lp.add_block_size_argument(parser)
    lp.add_dtype_argument(parser)
    parser.add_argument(
        "--quick", action="store_true", help="one 640-token context, 2 documents, 4 retrieval cases"
    )
    parser.add_argument("--json", type=Path, default=Path("results/long_quality.json"))
    parser.add_argument(
        "--attach",
        type=Path,
        default=None,
        help="also store the summary in this bench-long results file (for vllm-utio report)",
    )


def apply_quick(args: argparse.Namespace) -> None:
    args.context_lens, args.forced_tokens, args.docs = [640], 32, 2
    args.greedy_tokens, args.needles = 16, 4


# --------------------------------------------------------------------------- inputs


@dataclass
class Inputs:
    windows: list[Any]  # quality.Window per document
    retrieval: list[RetrievalCase]

    def prompts(self) -> list[list[int]]:
        return [list(w.tokens[: w.prompt_len]) for w in self.windows]


def build_inputs(tokenizer: Any, args: argparse.Namespace) -> dict[int, Inputs]:
    from vllm_utio.assets.data import load_wiki_documents
    from vllm_utio.evaluation.long_quality import concatenated_ids, held_out_texts, long_windows
    from vllm_utio.evaluation.quality import bos_prefix
    from vllm_utio.evaluation.retrieval import make_cases

    texts = held_out_texts(load_wiki_documents())
    longest = max(args.context_lens)
    ids = concatenated_ids(tokenizer, texts, longest * max(args.docs, args.needles) + longest)
    prefix = bos_prefix(tokenizer)
    out = {}
    for ctx in args.context_lens:
        windows = long_windows(ids, ctx, args.forced_tokens, args.docs, prefix)
        if len(windows) < 2:
            raise SystemExit(f"held-out text ({len(ids)} tokens) gives < 2 documents of {ctx}")
        # each case's prompt leaves room for its answer inside the context
        out[ctx] = Inputs(windows, make_cases(tokenizer, ids, ctx, args.needles, args.seed))
    return out


# --------------------------------------------------------------------------- engine runs


@dataclass
class CaseRun:
    """What one case measured at one context length."""

    forced: list[Any] = field(default_factory=list)  # quality.ForcedResult per document
    greedy: list[list[int]] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)  # UTIO counters, forced phase
    seconds: dict[str, float] = field(default_factory=dict)


STAT_KEYS = ("steps", "routed_steps", "kv_tokens_read", "kv_tokens_dense")


def _stats(llm: Any) -> dict[str, Any] | None:
    from vllm_utio.evaluation.quality import utio_stats

    return utio_stats(llm)


def _add_delta(acc: dict[str, Any], before: dict | None, after: dict | None) -> None:
    if before is None or after is None:
        return
    for k in STAT_KEYS:
        acc[k] = acc.get(k, 0) + after.get(k, 0) - before.get(k, 0)
    levels = zip(after["tokens_per_level"], before["tokens_per_level"], strict=True)
    per_level = [a - b for a, b in levels]
    old = acc.get("tokens_per_level") or [0] * len(per_level)
    acc["tokens_per_level"] = [a + b for a, b in zip(old, per_level, strict=True)]
    acc["level_names"] = list(after["level_names"])


def _timed(run: CaseRun, phase: str, t0: float) -> None:
    run.seconds[phase] = run.seconds.get(phase, 0.0) + time.perf_counter() - t0


def run_cases(
    llm: Any,
    cases: Sequence[lp.Case],
    ctx: int,
    inputs: Inputs,
    args: argparse.Namespace,
    tokenizer: Any,
    progress: Callable[[int], None],
) -> dict[str, CaseRun]:
    """Every case of one engine at one context length, interleaved per batch of documents
    so each batch's prompts are prefilled once and reused from the prefix cache."""
    from vllm_utio.evaluation.quality import greedy_continuations, teacher_forced_logprobs

    runs = {c.name: CaseRun() for c in cases}
    extra = {c.name: {"utio_bucket": c.pin} if c.pin else None for c in cases}
    salts = [f"doc:{ctx}:{w.doc}" for w in inputs.windows]
    prompts = inputs.prompts()
    n, size = len(inputs.windows), args.batch_size
    for start in range(0, n, size):
        rows = slice(start, min(n, start + size))
        for c in cases:
            run, t0, s0 = runs[c.name], time.perf_counter(), _stats(llm)
            run.forced += teacher_forced_logprobs(
                llm, inputs.windows[rows], extra[c.name], size, salts=salts[rows]
            )
            _add_delta(run.stats, s0, _stats(llm))
            _timed(run, "teacher_forced", t0)
            progress(len(inputs.windows[rows]))
        for c in cases:
            run, t0 = runs[c.name], time.perf_counter()
            run.greedy += greedy_continuations(
                llm, prompts[rows], args.greedy_tokens, extra[c.name], size, salts[rows]
            )
            _timed(run, "greedy", t0)
            progress(len(prompts[rows]))
    # retrieval: per batch of cases sharing an answer length, every policy in turn, so a
    # batch's prompts are prefilled once and served from the prefix cache afterwards (the
    # cache holds about one batch of the longest context, not all of a context's cases)
    budgets: dict[int, list[int]] = {}  # answer tokens -> cases
    for i, rc in enumerate(inputs.retrieval):
        budgets.setdefault(rc.answer_tokens, []).append(i)
    answers = {c.name: [""] * len(inputs.retrieval) for c in cases}
    for budget, idx in budgets.items():
        for start in range(0, len(idx), size):
            chunk = idx[start : start + size]
            for c in cases:
                t0 = time.perf_counter()
                outs = greedy_continuations(
                    llm,
                    [list(inputs.retrieval[i].tokens) for i in chunk],
                    budget,
                    extra[c.name],
                    size,
                    [f"retrieval:{ctx}:{i}" for i in chunk],
                )
                for i, o in zip(chunk, outs, strict=True):
                    answers[c.name][i] = tokenizer.decode(o, skip_special_tokens=True)
                _timed(runs[c.name], "retrieval", t0)
                progress(len(chunk))
    for c in cases:
        runs[c.name].answers = answers[c.name]
    return runs


# --------------------------------------------------------------------------- scores


def summarize_context(
    ctx: int,
    inputs: Inputs,
    cases: Sequence[lp.Case],
    runs: dict[str, CaseRun],
    args: argparse.Namespace,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(summary rows, full reports) of one context length, every case against vanilla;
    retrieval judged against UTIO dense (vanilla if absent)."""
    from vllm_utio.evaluation import retrieval as rt
    from vllm_utio.evaluation.quality import EngineRun, compare

    ref = runs["vanilla"]
    ref_run = EngineRun(ref.forced, ref.greedy)
    decode_tokens = sum(len(w.continuation) - 1 for w in inputs.windows)
    found = {c.name: rt.scores(inputs.retrieval, runs[c.name].answers) for c in cases}
    ref_name = DENSE if DENSE in found else "vanilla"
    rows, details = [], {}
    for c in cases:
        run, got = runs[c.name], found[c.name]
        row: dict[str, Any] = {
            "context": ctx,
            "config": c.name,
            "retrieval_passed": got["overall"]["passed"],
            "retrieval_total": got["overall"]["total"],
            "retrieval_pass_rate": got["overall"]["rate"],
            "retrieval_ci": got["overall"]["ci"],
            "retrieval_by_kind": got["by_kind"],
            "retrieval_vs_dense": rt.judge(found[ref_name], got),
            "sparse_share": None,
            "kv_read_fraction": None,
        }
        st = run.stats
        if st.get("tokens_per_level") and decode_tokens:
            row["sparse_share"] = min(1.0, sum(st["tokens_per_level"][1:]) / decode_tokens)
        if st.get("kv_tokens_dense"):
            row["kv_read_fraction"] = st["kv_tokens_read"] / st["kv_tokens_dense"]
        report = compare(
            inputs.windows,
            ref_run,
            EngineRun(run.forced, run.greedy, stats_forced=st),
            args.bootstrap,
            args.seed,
            {"utio_bucket": c.pin} if c.pin else None,
        )
        row.update(
            ppl_ref=report.ppl_full,
            ppl=report.ppl_utio,
            ppl_delta=report.ppl_delta,
            ppl_delta_ci=list(report.ppl_delta_ci),
            top1_agreement=report.top1_agreement,
            top1_agreement_ci=list(report.top1_agreement_ci),
            greedy_agreement=report.greedy["token_agreement"],
            greedy_first_divergence=report.greedy["mean_first_divergence"],
            documents=report.documents,
            scored_tokens=report.scored_tokens,
        )
        rows.append(row)
        details[c.name] = {
            "report": report.to_dict(),
            "retrieval": [
                {"kind": rc.kind, "depth": rc.depth, "expected": list(rc.expected)}
                | {"answer": a, "passed": p}
                for rc, a, p in zip(inputs.retrieval, run.answers, got["passed"], strict=True)
            ],
            "seconds": run.seconds,
        }
    prompts = [
        {
            "kind": rc.kind,
            "facts": list(rc.facts),
            "depths": list(rc.depths),
            "positions": list(rc.positions),
            "question": rc.question,
            "expected": list(rc.expected),
            "length": len(rc.tokens),
            "answer_tokens": rc.answer_tokens,
        }
        for rc in inputs.retrieval
    ]
    return rows, {"cases": details, "retrieval": prompts}


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    def pct(x: float | None, spec: str = "+.1f") -> str:
        return "–" if x is None else format(100 * x, spec) + "%"

    from vllm_utio.evaluation.retrieval import KINDS

    def count(t: dict[str, Any] | None) -> str:
        return "–" if t is None else f"{t['passed']}/{t['total']}"

    head = (
        f"{'context':>7} {'config':<18} {'ppl':>8} {'ppl Δ (95% CI)':>26} {'top-1':>7} "
        f"{'greedy':>7} {'sparse':>7} {'KV read':>8} {'retrieval':>9} "
        + " ".join(f"{k:>10}" for k in KINDS)
        + "  vs dense"
    )
    lines = [head]
    for r in rows:
        lo, hi = r["ppl_delta_ci"]
        overall = {"passed": r["retrieval_passed"], "total": r["retrieval_total"]}
        kinds = " ".join(f"{count(r['retrieval_by_kind'].get(k)):>10}" for k in KINDS)
        lines.append(
            f"{r['context']:>7} {r['config']:<18} {r['ppl']:>8.3f} "
            f"{pct(r['ppl_delta']):>8} ({pct(lo)} .. {pct(hi)}) "
            f"{pct(r['top1_agreement'], '.1f'):>7} {pct(r['greedy_agreement'], '.1f'):>7} "
            f"{pct(r['sparse_share'], '.0f'):>7} {pct(r['kv_read_fraction'], '.0f'):>8} "
            f"{count(overall):>9} {kinds}  {r['retrieval_vs_dense']}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- entry


def notes(args: argparse.Namespace, skipped: list[str]) -> list[str]:
    return [
        *skipped,
        f"documents: held-out Wikipedia articles (calibration split) concatenated and cut "
        f"into consecutive {args.context_lens}-token documents, up to {args.docs} per "
        f"length; the last {args.forced_tokens} tokens of each teacher-forced (scored from "
        "the second, every one a decode step); bootstrap 95% CI over documents",
        f"greedy agreement: {args.greedy_tokens} greedy tokens from each document's prompt, "
        "share of positions equal to vanilla's",
        f"retrieval: {args.needles} cases per length, kinds in rotation (single: one fact, "
        "a 4-6 digit number, full name or word; multikey: 3-4 facts with similar keys, the "
        "first number answered must be the asked key's; multivalue: one key with 3 numbers, "
        "all must appear; copy: a 10-12 digit number or a code like KX-4471-QZ-9082, copied "
        "exactly); facts between sentences at depths spread evenly over 0-100% of held-out "
        "text (each kind over all depths; each case its own stretch, the stretches' starts "
        "spread over the text, overlapping where it is shorter than cases x context); "
        "question at the end in the chat template, the answer's opening words given; greedy "
        "answer of the expected answer's tokens + 4 per value, in 4s, at least 8 (prompt + "
        "answer = the context); 95% Wilson score intervals; vs dense: 'within' if no kind's "
        "pass rate falls below UTIO dense's interval for it and the overall rate is at least "
        "dense's minus 3 points, else 'below'",
        "reference: vLLM with UTIO off; '-all' cases pin every request to a full-depth "
        "bucket with the policy (= attention_all); '-routed' cases use the surrogate score; "
        "sparse = share of scored decode tokens under the sparse policy; KV read = cached "
        "positions read / dense (UTIO counters, teacher-forced phase)",
    ]


def run(args: argparse.Namespace, llms: dict[str, Any] | None = None) -> int:
    """Run the evaluation; ``llms`` (engine key -> LLM) supplies ready engines (tests)."""
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from vllm_utio.benchmarking.results import machine_info, version_info
    from vllm_utio.paths import default_model_dir

    if args.quick:
        apply_quick(args)
    args.dtype = lp.run_dtype(args.dtype, llms)
    # vanilla on vLLM's V1 runner, like UTIO: the forcing processor needs it
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    model = str(args.model or default_model_dir())
    shape = lp.model_shape(model)
    if shape["max_positions"] and max(args.context_lens) > shape["max_positions"]:
        raise SystemExit(f"--context-lens: the model has {shape['max_positions']} positions")
    policies, skipped = lp.available(lp.parse_policy_args(args.policy))
    if args.quick:
        policies = lp.with_recent(policies, lp.QUICK_RECENT_TOKENS)
    routed = lp.routable(args.routed, policies)[0]
    engines = lp.engine_configs(policies, routed, shape["num_layers"], args.route_max_score)
    cases = lp.cases(policies, routed, args.route_max_score)
    tokenizer = AutoTokenizer.from_pretrained(model)
    inputs = build_inputs(tokenizer, args)
    max_len = max(args.context_lens)
    kv = (
        int(args.kv_cache_gib * (1 << 30))
        if args.kv_cache_gib
        else max(
            256 << 20,
            int(1.15 * args.batch_size * max_len * lp.kv_bytes_per_token(model, args.dtype)),
        )
    )
    per_ctx = {
        ctx: 2 * len(inp.windows) + len(inp.retrieval) for ctx, inp in inputs.items()
    }  # requests per case
    runs: dict[int, dict[str, CaseRun]] = {ctx: {} for ctx in inputs}
    with tqdm(total=len(cases) * sum(per_ctx.values()), desc="eval-long", unit="req") as bar:
        for key in engines:
            mine = [c for c in cases if c.engine == key]
            bar.set_postfix_str(f"starting {key}")
            if llms is not None:
                llm = llms[key]
            else:
                from vllm import LLM

                kw = lp.engine_kwargs(
                    max_len,
                    args.batch_size,
                    kv,
                    True,
                    forcing=True,
                    utio=engines[key],
                    block_size=args.block_size,
                    dtype=args.dtype,
                )
                llm = LLM(model, **kw)
            try:
                for ctx, inp in inputs.items():
                    bar.set_postfix_str(f"{key} ctx={ctx}")
                    runs[ctx].update(run_cases(llm, mine, ctx, inp, args, tokenizer, bar.update))
            finally:
                if llms is None:
                    lp.shutdown(llm)
    summary, details = [], {}
    for ctx, inp in inputs.items():
        rows, detail = summarize_context(ctx, inp, cases, runs[ctx], args)
        summary += rows
        details[str(ctx)] = detail
    print(format_table(summary))
    settings = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k[0] != "_"
    }
    out = {
        "schema": SCHEMA_ID,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "versions": version_info(),
        "model": model,
        "settings": {**settings, "policies": policies, "routed": routed, "engines": engines},
        "configs": [c.__dict__ for c in cases],
        "summary": summary,
        "details": details,
        "notes": notes(args, skipped),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(f"report: {args.json}")
    if args.attach is not None:
        attach(args.attach, out)
        print(f"attached to: {args.attach}")
    return 0


def attach(results_path: Path, out: dict[str, Any]) -> None:
    """Store an eval-long summary in a bench results file as ``long_quality``."""
    from vllm_utio.benchmarking.results import load, save

    results = load(results_path)
    results["long_quality"] = {
        "created": out["created"],
        "settings": {
            k: out["settings"][k] for k in ("context_lens", "forced_tokens", "docs", "needles")
        },
        "summary": out["summary"],
        "notes": out["notes"],
    }
    save(results, results_path)
