"""Self-speculation vs vanilla vLLM and vLLM's own ngram and suffix speculation, in one run.

    vllm-utio bench-spec [--quick] [-o results/speculative.json]

Every engine (one at a time, or with ``--interleave`` all alive and each cell's repeats
taken in turns; each has its own KV cache) runs the same greedy requests (sampled ones
with ``--temperature``):

- long context: Wikipedia prompts of each ``--context-lens`` length, at each batch size;
- short (``--short``): ShareGPT first turns and 64/512-token Wikipedia prompts.

Per cell: decode tok/s (medians over ``--repeats``; decode time = last token - first
token of the batch, engine timestamps, prompts prefilled by a warm-up run first),
speculation counters from vLLM's own metrics (drafts, draft tokens, accepted tokens), and
greedy identity against vanilla, over every repeat: a reference run of vanilla with its
top-2 raw logits gives, for every output that differs, the first differing position,
vanilla's top-2 gap there and its top logit ("near tie": at most ``NEAR_TIE_NATS`` apart,
or one bf16 step of the top logit where that is wider; bf16 noise can flip such a
choice). Sampled
runs compare no outputs (tests/test_engine_speculate.py tests that speculation keeps the
target distribution) and refuse vLLM's own speculation engines: vLLM 0.32's CPU rejection
sampler samples them under uninitialised temperatures (vllm-project/vllm#55005; UTIO's
worker replaces the broken kernel, vanilla vLLM's does not).
Writes JSON and a markdown table (``.md`` next to it); ``--render FILE`` rewrites an
earlier run's table under the current near-tie rule; ``--combine FILE ...`` puts several
runs in one table and plot (:mod:`vllm_utio.benchmarking.spec_summary`).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from vllm_utio.benchmarking import long_policies as lp
from vllm_utio.benchmarking.long_context import corpus_ids, long_prompts
from vllm_utio.benchmarking.results import cpu_label, machine_info, median_present, version_info

# One bf16 step of a logit in [16, 32): top-2 gaps are differences of bf16 logits, and
# vanilla's own timed runs differ from its reference run at gaps of 0 to 0.125 (and once
# at 0.25) in the 2026-12-04 runs. A larger top logit has a wider step (0.25 in [32, 64));
# where the reference kept its top logit, the line is that step when wider.
NEAR_TIE_NATS = 0.125
BF16_MANTISSA_BITS = 7
SPEC_COUNTERS = {
    "drafts": "vllm:spec_decode_num_drafts",
    "draft_tokens": "vllm:spec_decode_num_draft_tokens",
    "accepted": "vllm:spec_decode_num_accepted_tokens",
}
SHORT_BATCHES = (1, 8)  # the --short workloads' batch sizes, whatever --batch-sizes says
# what turning speculation on is read against: UTIO's decode kernel, no speculation
KERNEL_ALONE = "utio-kernel"
# a depth-skip draft: 20 of 30 layers (the layer-skip study's mildest useful cut)
SKIP_BUCKET = {"name": "draft", "max_score": 0.01, "keep_first": 14, "keep_last": 6}


def engines(tokens: int, block_size: int) -> dict[str, dict[str, Any]]:
    """name -> {'utio': UTIO config or None, 'spec': vLLM speculative_config or None}."""

    def utio(draft: dict[str, Any], kernel: str = "vllm", **extra: Any) -> dict[str, Any]:
        spec = {"tokens": tokens, "draft": draft, **extra}
        top = {"decode_kernel": kernel} if kernel != "vllm" else {}
        return {"enabled": True, "router": "forced", **top, "speculate": spec}

    def skip_draft(kernel: str = "vllm", **extra: Any) -> dict[str, Any]:
        """The depth-skip draft: SKIP_BUCKET's layers, dense attention."""
        draft = {"attention": {"policy": "dense"}, "bucket": "draft"}
        return {**utio(draft, kernel, **extra), "buckets": [SKIP_BUCKET]}

    out: dict[str, dict[str, Any]] = {
        "vanilla": {"utio": None, "spec": None},
        "ngram": {
            "utio": None,
            "spec": {
                "method": "ngram",
                "num_speculative_tokens": tokens,
                "prompt_lookup_max": 4,
                "prompt_lookup_min": 2,
            },
        },
        # vLLM's suffix decoding (`make suffix`), capped at the same draft count as every
        # other engine, from each request's prompt only: its global tree of past outputs
        # would hold the previous repeat's answer to the same prompt (seen: 2-4x vanilla
        # from the second repeat on)
        "suffix": {
            "utio": None,
            "spec": {
                "method": "suffix",
                "num_speculative_tokens": tokens,
                "suffix_decoding_max_cached_requests": 0,
            },
        },
        "spec-throttle": {"utio": utio({"attention": lp.POLICIES["throttle"]}), "spec": None},
        "spec-throttle-fixed": {
            "utio": utio({"attention": lp.POLICIES["throttle"]}, adaptive=False),
            "spec": None,
        },
        # drafts and verification through UTIO's decode kernel (its default verification
        # cost, 0.2 of a plain step per draft token, is what the adaptive rule charges)
        "spec-throttle-utio-kernel": {
            "utio": utio({"attention": lp.POLICIES["throttle"]}, kernel="utio"),
            "spec": None,
        },
        # the same with a draft head over the first 16384 token ids (90-92% of the wiki and
        # ShareGPT text's tokens): a third of the LM head's rows, 14% of the weights
        "spec-throttle-vocab16k-utio-kernel": {
            "utio": utio({"attention": lp.POLICIES["throttle"], "vocab": 16384}, kernel="utio"),
            "spec": None,
        },
        # the cost model told a verification is free (verify_token_cost 0), so it offers
        # drafts wherever a draft reads less than a plain step, also where drafting loses
        # (2k, batch 32): the measured payoff alone declines them, and this engine against
        # the kernel alone shows what declining costs
        "spec-throttle-payoff-decides-utio-kernel": {
            "utio": utio(
                {"attention": lp.POLICIES["throttle"]}, kernel="utio", verify_token_cost=0.0
            ),
            "spec": None,
        },
        "spec-throttle-fixed-utio-kernel": {
            "utio": utio({"attention": lp.POLICIES["throttle"]}, adaptive=False, kernel="utio"),
            "spec": None,
        },
        # UTIO's decode kernel, no speculation: what the kernel alone gives (the drafts'
        # share of a speculative engine's speed is the rest)
        "utio-kernel": {
            "utio": {"enabled": True, "router": "forced", "decode_kernel": "utio"},
            "spec": None,
        },
        "spec-vslash-utio-kernel": {
            "utio": utio({"attention": lp.POLICIES["vslash"]}, kernel="utio"),
            "spec": None,
        },
        "spec-skip": {"utio": skip_draft(), "spec": None},
        "spec-skip-utio-kernel": {"utio": skip_draft(kernel="utio"), "spec": None},
        # the same draft offered at every step (no adaptive rule): what a depth-skip draft
        # gives where the adaptive rule declines it (its acceptance, and what drafting costs)
        "spec-skip-fixed-utio-kernel": {
            "utio": skip_draft(kernel="utio", adaptive=False),
            "spec": None,
        },
    }
    # a second engine of the same config: the spread between two engine instances next to
    # the differences between configs (at batch 1 two such engines read 0-2% apart in
    # paired medians, up to 8% in one repeat)
    out["utio-kernel-twin"] = copy.deepcopy(out["utio-kernel"])
    if block_size <= 64:  # select finds facts only with fine blocks
        out["spec-select1024"] = {
            "utio": utio({"attention": lp.POLICIES["select1024"]}),
            "spec": None,
        }
        out["spec-sparq768-utio-kernel"] = {
            "utio": utio({"attention": lp.POLICIES["sparq768"]}, kernel="utio"),
            "spec": None,
        }
    return out


# --------------------------------------------------------------------------- measuring


def _counters(llm: Any) -> dict[str, float]:
    got = {k: 0.0 for k in SPEC_COUNTERS}
    names = {v: k for k, v in SPEC_COUNTERS.items()}
    for metric in llm.get_metrics():
        key = names.get(getattr(metric, "name", ""))
        if key is not None:
            got[key] += float(getattr(metric, "value", 0) or 0)
    return got


def run_cell(
    llm: Any,
    prompts: list[Any],
    output_len: int,
    logprobs: bool = False,
    vllm_counters: bool = True,
    temperature: float = 0.0,
) -> dict:
    """One generate() call (greedy unless ``temperature``): decode tok/s, tokens, spec
    counters (and logprobs). ``vllm_counters`` False: no reading of vLLM's metrics (the
    caller counts; zeros)."""
    from vllm import SamplingParams

    params = SamplingParams(
        temperature=temperature,
        max_tokens=output_len,
        ignore_eos=True,
        logprobs=2 if logprobs else None,
    )
    zeros = dict.fromkeys(SPEC_COUNTERS, 0.0)
    before = _counters(llm) if vllm_counters else zeros
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    after = _counters(llm) if vllm_counters else zeros
    n_out = min(len(o.outputs[0].token_ids) for o in outs)
    decode_s = max(o.metrics.last_token_ts for o in outs) - max(
        o.metrics.first_token_ts for o in outs
    )
    sample: dict[str, Any] = {
        "wall_s": wall,
        "decode_tok_s": len(outs) * (n_out - 1) / decode_s if decode_s > 0 else None,
        "tokens": [list(o.outputs[0].token_ids) for o in outs],
        **{k: after[k] - before[k] for k in SPEC_COUNTERS},
    }
    if logprobs:
        sample["top2_gap"] = top2_gaps(outs)
        sample["top1_logit"] = top1s(outs)
    return sample


# vLLM's spec-decode counters, as UTIO's drafter counts them (its verifications are
# vLLM's drafts: requests x steps whose drafts were verified)
UTIO_SPEC_COUNTERS = {
    "drafts": "spec_verifications",
    "draft_tokens": "spec_verified_tokens",
    "accepted": "spec_accepted_tokens",
}


def _utio_spec(llm: Any, utio: dict[str, Any] | None) -> dict[str, Any] | None:
    """UTIO's drafter counters since the last call (UTIO speculation engines only): draft
    seconds and the spec counters. Read per engine (``utio_stats``), unlike vLLM's metrics:
    a new engine unregisters the Prometheus metrics of engines made before it."""
    if not utio or "speculate" not in utio:
        return None
    stats = llm.collective_rpc("utio_stats", kwargs={"reset": True})[0]
    got = {k: float(stats[v]) for k, v in UTIO_SPEC_COUNTERS.items()}
    # the measured payoff's verdicts so far (cumulative since the engine started)
    return {**got, "draft_s": float(stats["spec_draft_s"]), "payoff": stats.get("spec_payoff")}


def top2_gaps(outs: list[Any]) -> list[list[float]]:
    """Per output and step, the gap between the top-2 logprobs (outputs with logprobs=2)."""
    return [[_gap(step) for step in (o.outputs[0].logprobs or [])] for o in outs]


def _gap(step: dict[int, Any]) -> float:
    values = sorted((lp_.logprob for lp_ in step.values()), reverse=True)
    return values[0] - values[1] if len(values) > 1 else float("inf")


def top1s(outs: list[Any]) -> list[list[float]]:
    """Per output and step, the top value (vanilla's reference engine returns raw logits)."""
    return [
        [max(lp_.logprob for lp_ in step.values()) for step in (o.outputs[0].logprobs or [])]
        for o in outs
    ]


def bf16_step(value: float) -> float:
    """The gap between ``value`` and the next bf16 number away from zero."""
    if value == 0 or not math.isfinite(value):
        return 0.0
    return 2.0 ** (math.floor(math.log2(abs(value))) - BF16_MANTISSA_BITS)


def identity(tokens: list[list[int]], reference: dict[str, Any]) -> dict[str, Any]:
    """How many outputs equal vanilla's; where not, the first differing step and whether
    vanilla's top-2 choice there was a near tie."""
    same, ties, other = 0, [], []
    for i, (got, ref) in enumerate(zip(tokens, reference["tokens"], strict=True)):
        if got == ref:
            same += 1
            continue
        at = next((j for j, (a, b) in enumerate(zip(got, ref, strict=False)) if a != b), None)
        at = min(len(got), len(ref)) if at is None else at
        gaps = reference["top2_gap"][i]
        tops = reference.get("top1_logit", [[]] * len(tokens))[i]  # older runs: none
        entry = {
            "prompt": i,
            "step": at,
            "top2_gap": gaps[at] if at < len(gaps) else None,
            "top1_logit": tops[at] if at < len(tops) else None,
        }
        (ties if _is_tie(entry) else other).append(entry)
    return {"identical": same, "outputs": len(tokens), "near_ties": ties, "mismatches": other}


def tie_line(top1_logit: float | None) -> float:
    """The widest top-2 gap called a near tie: one bf16 step of the top logit, at least
    ``NEAR_TIE_NATS`` (the line where the top logit is not known)."""
    return max(NEAR_TIE_NATS, bf16_step(top1_logit or 0.0))


def _is_tie(entry: dict[str, Any]) -> bool:
    gap = entry["top2_gap"]
    return gap is not None and gap <= tie_line(entry.get("top1_logit")) + 1e-6


def reclassify(ident: dict[str, Any]) -> dict[str, Any]:
    """An identity record split again into near ties and mismatches by the current rule."""
    differing = [*ident["near_ties"], *ident["mismatches"]]
    differing.sort(key=lambda e: (e.get("repeat", 0), e["prompt"]))
    return {
        **ident,
        "near_ties": [e for e in differing if _is_tie(e)],
        "mismatches": [e for e in differing if not _is_tie(e)],
    }


def pooled_identity(group: list[dict[str, Any]]) -> dict[str, Any] | None:
    """One engine's identity in one cell over all its repeats: outputs summed, each
    differing output tagged with its repeat (None for a sampled run)."""
    idents = [(s["repeat"], s["identity"]) for s in group if s.get("identity")]
    if not idents:
        return None

    def tagged(key: str) -> list[dict[str, Any]]:
        return [{**e, "repeat": r} for r, i in idents for e in i[key]]

    return {
        "identical": sum(i["identical"] for _, i in idents),
        "outputs": sum(i["outputs"] for _, i in idents),
        "near_ties": tagged("near_ties"),
        "mismatches": tagged("mismatches"),
    }


def current_identity(results: dict[str, Any]) -> dict[str, Any]:
    """A results file's identity under the current rule, the table's counted over every
    repeat from the samples (files before the fourteenth session's fix counted each
    engine's first repeat only)."""
    for s in results["samples"]:
        if s.get("identity"):
            s["identity"] = reclassify(s["identity"])
    keys = [(c["workload"], c["context"], c["batch"]) for c in results["cells"]]
    for row in results["summary"]:
        c = keys.index((row["workload"], row["context"], row["batch"]))
        group = [s for s in results["samples"] if s["cell"] == c and s["engine"] == row["engine"]]
        row["identity"] = pooled_identity(group)
    return results


def tie_note() -> str:
    return (
        f"near tie: vanilla's top-2 logits at most {NEAR_TIE_NATS} nats apart at the first "
        "differing step (one bf16 step of a logit of 16-32; vanilla differs from its own "
        "reference run at such gaps), or one bf16 step of its top logit where that is "
        "wider (0.25 for logits of 32-64; runs before the fourteenth session, 2026-12-07, "
        "kept no top logit); "
        "identity counted over every repeat"
    )


def kernel_note() -> str:
    return (
        f"vs {KERNEL_ALONE}, per repeat: each repeat's decode tok/s over that repeat's "
        f"{KERNEL_ALONE} (UTIO's decode kernel, no speculation), what turning speculation "
        "on costs or gains; utio-kernel-twin beside it shows the spread between two "
        "engines of one config"
    )


def render(path: Path) -> int:
    """Rewrite an earlier run's JSON and markdown under the current near-tie rule, its
    table's identity counted over every repeat, each row with its ratios to the kernel
    alone per repeat."""
    results = current_identity(json.loads(path.read_text()))
    samples = results["samples"]
    keys = row_keys(samples, len(results["cells"]))  # runs saved before the column
    for row, (cell, name) in zip(results["summary"], keys, strict=True):
        row["vs_kernel"] = per_repeat_ratios(samples, cell, name, KERNEL_ALONE)
    notes = [tie_note() if n.startswith("near tie:") else n for n in results["notes"]]
    measured = any(row["vs_kernel"] for row in results["summary"])
    if measured and kernel_note() not in notes:
        notes.insert(len(notes) - 1, kernel_note())  # before the counters' note, as in a run
    results["notes"] = notes
    path.write_text(json.dumps(results, indent=1))
    path.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))
    return 0


def workloads(args: argparse.Namespace, tokenizer: Any) -> list[dict[str, Any]]:
    """Every (workload, context, batch) cell with its prompts."""
    from vllm_utio.assets.data import load_sharegpt_prompts, load_wiki_documents

    cells: list[dict[str, Any]] = []
    texts = [d["text"] for d in load_wiki_documents()]
    longest = max([*args.context_lens, 512])
    # the short cells' batches too: a corpus cut for fewer prompts leaves the rest empty
    widest = max([*args.batch_sizes, *(SHORT_BATCHES if args.short else ())])
    ids = corpus_ids(tokenizer, texts, widest * longest)
    for ctx in args.context_lens:
        for batch in args.batch_sizes:
            prompts = long_prompts(ids, batch, ctx, widest, longest)
            cells.append(
                {"workload": "wikipedia", "context": ctx, "batch": batch, "prompts": prompts}
            )
    if args.short:
        for batch in SHORT_BATCHES:
            for length in (64, 512):
                if length in args.context_lens and batch in args.batch_sizes:
                    continue  # that cell is above already
                prompts = long_prompts(ids, batch, length, widest, longest)
                cells.append(
                    {"workload": "wikipedia", "context": length, "batch": batch, "prompts": prompts}
                )
            chats = load_sharegpt_prompts(batch)
            cells.append(
                {"workload": "sharegpt", "context": None, "batch": batch, "prompts": chats}
            )
    return cells


def row_keys(samples: list[dict[str, Any]], cells: int) -> list[tuple[int, str]]:
    """(cell, engine) of each table row, in the table's order: cell by cell, each cell's
    engines in the order engines first ran, only those that ran in it."""
    ran = {(s["cell"], s["engine"]) for s in samples}
    engines = dict.fromkeys(s["engine"] for s in samples)
    return [(c, name) for c in range(cells) for name in engines if (c, name) in ran]


def summarize(samples: list[dict[str, Any]], cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for c, name in row_keys(samples, len(cells)):
        cell = cells[c]
        base = median_present(
            [s["decode_tok_s"] for s in samples if s["cell"] == c and s["engine"] == "vanilla"]
        )
        group = [s for s in samples if s["cell"] == c and s["engine"] == name]
        tok_s = median_present([s["decode_tok_s"] for s in group])
        drafts = sum(s["drafts"] for s in group)
        draft_tokens = sum(s["draft_tokens"] for s in group)
        accepted = sum(s["accepted"] for s in group)
        drafting = [s.get("draft_s") for s in group]
        draft_share = (
            # of the generate call's wall time: drafting also runs in the step that
            # yields a request's first token, before decode time starts
            sum(drafting) / sum(s["wall_s"] for s in group)
            if all(d is not None for d in drafting)
            else None
        )
        rows.append(
            {
                "engine": name,
                "workload": cell["workload"],
                "context": cell["context"],
                "batch": cell["batch"],
                "decode_tok_s": tok_s,
                "tok_s_min": min(s["decode_tok_s"] or 0 for s in group),
                "tok_s_max": max(s["decode_tok_s"] or 0 for s in group),
                "speedup": tok_s / base if tok_s and base else None,
                "vs_kernel": per_repeat_ratios(samples, c, name, KERNEL_ALONE),
                "acceptance": accepted / draft_tokens if draft_tokens else None,
                "tokens_per_verification": 1 + accepted / drafts if drafts else None,
                "draft_tokens_per_output": draft_tokens
                / max(1, sum(len(t) for s in group for t in s["tokens"])),
                "draft_share": draft_share,
                "identity": pooled_identity(group),
            }
        )
    return rows


def per_repeat_ratios(
    samples: list[dict[str, Any]], cell: int, engine: str, base: str
) -> list[float] | None:
    """``engine``'s decode tok/s over ``base``'s in each repeat of ``cell``, repeat by
    repeat (with --interleave, the same turn: machine drift cancels, the spread between
    two engines does not); None for ``base`` itself or where it did not run."""
    if engine == base:
        return None
    ref = {
        s["repeat"]: s["decode_tok_s"]
        for s in samples
        if s["cell"] == cell and s["engine"] == base and s["decode_tok_s"]
    }
    got = sorted(
        (s["repeat"], s["decode_tok_s"] / ref[s["repeat"]])
        for s in samples
        if s["cell"] == cell and s["engine"] == engine and s["decode_tok_s"] and s["repeat"] in ref
    )
    return [ratio for _, ratio in got] or None


def markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    temperature = s.get("temperature", 0.0)
    sampling = f"temperature {temperature}" if temperature else "greedy"
    lines = [
        f"# Self-speculation, {results['created'][:10]}",
        "",
        f"Model {Path(s['model']).name}, {s['dtype']}, KV blocks of {s['block_size']}, "
        f"{s['output_len']} new tokens ({sampling}, ignore_eos), up to {s['tokens']} draft "
        "tokens, "
        f"{s['repeats']} repeats (median, min-max).",
        *(
            ["", f"Machine: {cpu_label(m)}, {m.get('cores')} cores."]
            if (m := results.get("machine"))
            else []
        ),
        "",
        "| workload | context | batch | engine | decode tok/s (min-max) | vs vanilla "
        f"| vs {KERNEL_ALONE}, per repeat | acceptance "
        "| tokens / verification | drafts / output token | drafting, share of wall time "
        "| identical to vanilla (all repeats) | near ties | other mismatches |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(v: float | None, fmt: str = "{:.2f}") -> str:
        return "-" if v is None else fmt.format(v)

    for r in results["summary"]:
        lines.append(
            f"| {r['workload']} | {r['context'] or '-'} | {r['batch']} | {r['engine']} | "
            f"{f(r['decode_tok_s'], '{:.1f}')} ({r['tok_s_min']:.1f}-{r['tok_s_max']:.1f}) | "
            f"{f(r['speedup'])}x | {_ratios(r.get('vs_kernel'))} | {f(r['acceptance'])} | "
            f"{f(r['tokens_per_verification'])} | "
            f"{f(r['draft_tokens_per_output'])} | {f(r.get('draft_share'), '{:.0%}')} | "
            f"{_identity_cells(r['identity'])} |"
        )
    lines += ["", *[f"- {n}" for n in results["notes"]], ""]
    differing = [line for r in results["summary"] if (line := _differing(r))]
    if differing:
        lines += ["Outputs that differ from vanilla's reference run:", "", *differing, ""]
    return "\n".join(lines)


def _ratios(ratios: list[float] | None) -> str:
    return "-" if not ratios else ", ".join(f"{x:.2f}" for x in ratios)


def _differing(row: dict[str, Any]) -> str | None:
    """One row's differing outputs: where each first differs, vanilla's gap and top logit
    there (None where every output is identical)."""
    ident = row["identity"]
    if not ident or not (ident["near_ties"] or ident["mismatches"]):
        return None
    cases = [(e, False) for e in ident["near_ties"]] + [(e, True) for e in ident["mismatches"]]
    cases.sort(key=lambda c: (c[0].get("repeat", 0), c[0]["prompt"]))
    where = f"{row['workload']} {row['context'] or 'chat'}, b{row['batch']}, {row['engine']}"
    return f"- {where}: " + "; ".join(describe_difference(e, other) for e, other in cases)


def describe_difference(entry: dict[str, Any], other: bool) -> str:
    """``prompt 9 (repeat 1) step 45: gap 0.19, top logit 13.6 (bf16 step 0.0625)``."""
    gap, top = entry["top2_gap"], entry.get("top1_logit")
    text = f"prompt {entry['prompt']} (repeat {entry.get('repeat', 0)}) step {entry['step']}: "
    text += "past the reference" if gap is None else f"gap {gap:.4g}"
    if top is not None:
        text += f", top logit {top:.4g} (bf16 step {bf16_step(top):g})"
    return text + (" **not a near tie**" if other else "")


def _identity_cells(ident: dict[str, Any] | None) -> str:
    """The identical / near ties / other mismatches cells ('-' for a sampled run)."""
    if ident is None:
        return "- | - | -"
    return (
        f"{ident['identical']}/{ident['outputs']} | {len(ident['near_ties'])} | "
        f"{len(ident['mismatches'])}"
    )


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model path (default: the embedded model)")
    parser.add_argument("--context-lens", type=int, nargs="+", default=[4096])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=4, help="most draft tokens per step")
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="sample at this temperature (default 0: greedy, outputs compared with vanilla's)",
    )
    parser.add_argument(
        "--engines",
        nargs="+",
        default=None,
        help="engines to run (default: all; vanilla always runs first, as the reference)",
    )
    parser.add_argument("--short", action="store_true", help="add the short-prompt workloads")
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="keep every engine alive and interleave each cell's repeats across engines "
        "(machine drift then hits all engines alike; needs memory for all their KV caches)",
    )
    parser.add_argument("--quick", action="store_true", help="one 700-token context, batch 2")
    parser.add_argument("-o", "--out", type=Path, default=Path("results/speculative.json"))
    parser.add_argument(
        "--render",
        type=Path,
        default=None,
        metavar="JSON",
        help="run nothing: rewrite this earlier results file's table (and its .md) under "
        "the current near-tie rule",
    )
    parser.add_argument(
        "--combine",
        type=Path,
        nargs="+",
        default=None,
        metavar="JSON",
        help="run nothing: one table (-o's .md) and plot (.png) over these results files, "
        "each engine read against the vanilla engine of its own run",
    )
    lp.add_block_size_argument(parser)
    lp.add_dtype_argument(parser)


class _Bench:
    """The runs of one bench-spec invocation: warm-ups, timed repeats, the samples."""

    def __init__(
        self,
        table: dict[str, dict[str, Any]],
        cells: list[dict],
        output_len: int,
        temperature: float = 0.0,
    ):
        self.table = table
        self.cells = cells
        self.output_len = output_len
        self.temperature = temperature
        self.references: dict[int, dict[str, Any]] = {}
        self.samples: list[dict[str, Any]] = []
        self.on_sample: Any = None  # called after each measured sample (saves the results)

    def warm(self, llm: Any, name: str, c: int) -> None:
        """Vanilla, greedy: the untimed reference run (top-2 raw logits); otherwise a short
        run that prefills the cell's prompts into the prefix cache."""
        prompts = self.cells[c]["prompts"]
        if name == "vanilla" and not self.temperature:
            self.references[c] = run_cell(llm, prompts, self.output_len, True)
        else:
            run_cell(llm, prompts, 4)

    def measure(self, llm: Any, name: str, c: int, repeat: int) -> dict[str, Any]:
        utio = self.table[name]["utio"]
        counted = _utio_spec(llm, utio) is not None  # UTIO's drafter counts (and resets)
        s = run_cell(
            llm,
            self.cells[c]["prompts"],
            self.output_len,
            vllm_counters=not counted,
            temperature=self.temperature,
        )
        s.update(_utio_spec(llm, utio) or {"draft_s": None, "payoff": None})
        s.update(engine=name, cell=c, repeat=repeat)
        ref = self.references.get(c)
        s["identity"] = identity(s["tokens"], ref) if ref else None
        self.samples.append(s)
        if self.on_sample is not None:
            self.on_sample()
        return s


def _progress(bar: Any, name: str, cell: dict[str, Any], s: dict[str, Any]) -> None:
    bar.set_postfix_str(
        f"{name} ctx={cell['context']} b={cell['batch']} {s['decode_tok_s'] or 0:.1f} tok/s"
    )
    bar.update()


def _run_one_by_one(bench: _Bench, names: list[str], make: Any, repeats: int, bar: Any) -> None:
    """One engine at a time (vanilla first), each through every cell."""
    for name in names:
        bar.set_postfix_str(f"starting {name}")
        llm = make(name)
        try:
            for c, cell in enumerate(bench.cells):
                bar.set_postfix_str(f"{name} warm-up ctx={cell['context']} b={cell['batch']}")
                bench.warm(llm, name, c)
                for repeat in range(repeats):
                    _progress(bar, name, cell, bench.measure(llm, name, c, repeat))
        finally:
            lp.shutdown(llm)


def _has_suffix_tree() -> bool:
    """Whether vLLM's suffix speculation can run (arctic-inference's suffix tree)."""
    from importlib.util import find_spec

    return find_spec("arctic_inference") is not None


def rotated(names: list[str], repeat: int) -> list[str]:
    """The engines' order in one repeat. Each repeat starts one engine further on, so over
    as many repeats as engines each engine runs once in every place; the next round runs
    the reversed turns, so each engine also runs right after every other one (in a fixed
    order a non-drafting speculative engine, always run right after the same engine
    without speculation, read 8% slower than it at batch 1)."""
    if not names:
        return []
    k = repeat % len(names)
    order = names[k:] + names[:k]
    return order[::-1] if (repeat // len(names)) % 2 else order


def _run_interleaved(bench: _Bench, names: list[str], make: Any, repeats: int, bar: Any) -> None:
    """Every engine alive; per cell, each repeat runs every engine once, in the turn
    :func:`rotated` gives it. An engine with vLLM's own speculation is made last: its
    counters are vLLM's Prometheus metrics, which the next engine made would unregister."""
    own_spec = [n for n in names if bench.table[n]["spec"] is not None]
    if len(own_spec) > 1:
        raise SystemExit(
            f"--interleave: at most one engine with vLLM's own speculation, got {own_spec} "
            "(each new engine unregisters the metrics its counters come from)"
        )
    llms: dict[str, Any] = {}
    try:
        for name in [n for n in names if n not in own_spec] + own_spec:
            bar.set_postfix_str(f"starting {name}")
            llms[name] = make(name)
        for c, cell in enumerate(bench.cells):
            for name in names:
                bar.set_postfix_str(f"{name} warm-up ctx={cell['context']} b={cell['batch']}")
                bench.warm(llms[name], name, c)
            for repeat in range(repeats):
                for name in rotated(names, repeat):
                    _progress(bar, name, cell, bench.measure(llms[name], name, c, repeat))
    finally:
        for llm in llms.values():
            lp.shutdown(llm)


def run(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer
    from vllm import LLM

    from vllm_utio.paths import default_model_dir

    if args.render is not None:
        return render(args.render)
    if args.combine:
        from vllm_utio.benchmarking.spec_summary import combine

        return combine(args.combine, args.out)
    if args.quick:
        args.context_lens, args.batch_sizes, args.output_len, args.repeats = [700], [2], 16, 1
    model = str(args.model or default_model_dir())
    dtype = lp.resolve_dtype(args.dtype)
    table = engines(args.tokens, args.block_size)
    # by default every engine, suffix only where its suffix tree is installed (sampled:
    # no engine of vLLM's own speculation)
    chosen = args.engines or [
        e
        for e in table
        if (e != "suffix" or _has_suffix_tree())
        and not (args.temperature and table[e]["spec"] is not None)
    ]
    names = ["vanilla", *[e for e in chosen if e != "vanilla"]]
    unknown = [e for e in names if e not in table]
    if unknown:
        raise SystemExit(f"unknown engines {unknown}; allowed: {list(table)}")
    if args.temperature < 0:
        raise SystemExit(f"--temperature must be >= 0, got {args.temperature}")
    own = [e for e in names if table[e]["spec"] is not None]
    if args.temperature and own:
        raise SystemExit(
            f"--temperature {args.temperature}: engines {own} use vLLM's own speculation, "
            "whose CPU rejection sampler samples under uninitialised temperatures in vLLM "
            "0.32 (vllm-project/vllm#55005); sampled runs take vanilla and UTIO engines only"
        )
    if "suffix" in names and not _has_suffix_tree():
        raise SystemExit(
            "engine 'suffix' needs arctic-inference's suffix tree, not installed: run "
            "`make suffix` (scripts/build_suffix_decoding.sh)"
        )
    tokenizer = AutoTokenizer.from_pretrained(model)
    cells = workloads(args, tokenizer)
    longest = max(c["context"] or 2048 for c in cells) + args.output_len + args.tokens + 8
    max_positions = lp.model_shape(model)["max_positions"]
    if max_positions and longest > max_positions:
        raise SystemExit(
            f"--context-lens {max(args.context_lens)} + --output-len {args.output_len} + "
            f"--tokens {args.tokens} drafts (+8) = {longest} exceeds the model's "
            f"{max_positions} positions; the longest context that fits is "
            f"{max_positions - (longest - max(args.context_lens))}"
        )
    per_token = lp.kv_bytes_per_token(model, dtype)
    kv = max(256 << 20, int(1.2 * max(args.batch_sizes) * longest * per_token))

    def make(name: str) -> Any:
        kw = lp.engine_kwargs(
            longest,
            max(args.batch_sizes),
            kv,
            False,
            utio=table[name]["utio"],
            block_size=args.block_size,
            dtype=dtype,
        )
        if table[name]["spec"] is not None:
            kw["speculative_config"] = table[name]["spec"]
        if name == "vanilla":
            # the reference run's top-2 as raw logits: the same gap as log-probs, and the
            # top logit's size, whose bf16 step is the near-tie line (no effect on timed
            # runs, which ask for no logprobs)
            kw["logprobs_mode"] = "raw_logits"
        return LLM(model, **kw)

    bench = _Bench(table, cells, args.output_len, args.temperature)
    settings = {
        "model": model,
        "dtype": dtype,
        "block_size": args.block_size,
        "output_len": args.output_len,
        "repeats": args.repeats,
        "tokens": args.tokens,
        "temperature": args.temperature,
        "engines": {n: table[n] for n in names},
        "kv_cache_bytes": kv,
        "interleaved": args.interleave,
    }
    total = len(names) * len(cells) * args.repeats
    facts = {"machine": machine_info(), "versions": version_info()}  # read once per run
    # saved after every sample: a long run stopped part way keeps what it measured
    bench.on_sample = lambda: _save(
        args.out, _results(settings, facts, cells, bench.samples, total)
    )
    with tqdm(total=total, desc="bench-spec", unit="run") as bar:
        if args.interleave:
            _run_interleaved(bench, names, make, args.repeats, bar)
        else:
            _run_one_by_one(bench, names, make, args.repeats, bar)
    results = _results(settings, facts, cells, bench.samples, total)
    _save(args.out, results)
    print(args.out)
    print(markdown(results))
    return 0


def _save(out: Path, results: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    out.with_suffix(".md").write_text(markdown(results))


def _results(
    settings: dict[str, Any],
    facts: dict[str, Any],
    cells: list[dict],
    samples: list[dict[str, Any]],
    total: int,
) -> dict[str, Any]:
    """The results file's content for the samples measured so far (of ``total``);
    ``facts``: the run's machine and versions."""
    interleaved, temperature = settings["interleaved"], settings["temperature"]
    return {
        "kind": "self-speculation",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **facts,
        "settings": settings,
        "complete": len(samples) == total,
        "cells": [{k: v for k, v in c.items() if k != "prompts"} for c in cells],
        "samples": [{k: v for k, v in s.items() if k != "tokens"} for s in samples],
        "summary": summarize(samples, cells),
        "notes": [
            (
                "engines alive together, each cell's repeats interleaved across engines"
                if interleaved
                else "engines run one after another"
            )
            + ", each with its own KV cache (prefix caching on); vanilla first"
            + (
                f"; sampled at temperature {temperature}: outputs are not compared "
                "(tests/test_engine_speculate.py tests that speculation keeps the target "
                "distribution)"
                if temperature
                else ": its untimed reference run (top-2 raw logits) defines identity"
            ),
            *([] if temperature else [tie_note()]),
            *(
                []
                if len(samples) == total
                else [f"stopped part way: {len(samples)} of {total} runs measured"]
            ),
            *([kernel_note()] if KERNEL_ALONE in settings.get("engines", {}) else []),
            "acceptance = accepted / draft tokens, tokens / verification = 1 + accepted / "
            "drafts (vLLM's spec-decode counters); drafts / output token: draft tokens "
            "proposed per generated token (the adaptive rule drafts less where it does not pay)",
        ],
    }
