"""The report's check lines: pure functions of what the client and the server showed.

Each returns a :class:`Check` whose ``passed`` is True, False, or None where the check
does not apply (e.g. UTIO counters with UTIO off), with a one-line ``detail`` saying
what was measured. Nothing here talks to a server.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from vllm_utio.soak import observe
from vllm_utio.soak.client import HTTP_5XX, Outcome
from vllm_utio.soak.identity import DIFFERS, EXACT, TIE, Verdict, tally
from vllm_utio.soak.workload import RequestSpec

FINISH_REASONS = ("stop", "length")
MAX_PROBLEMS = 12  # listed per check in the report


@dataclass
class Check:
    name: str
    passed: bool | None
    detail: str
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _status(passed: bool | None) -> str:
    return {True: "PASS", False: "FAIL", None: "n/a"}[passed]


def status_word(check: Check) -> str:
    return _status(check.passed)


# ----------------------------------------------------------------------------- answers


def no_5xx(outcomes: Sequence[Outcome]) -> Check:
    bad = [o for o in outcomes if o.error_class == HTTP_5XX or (o.status or 0) >= 500]
    return Check(
        "no 5xx",
        not bad,
        f"{len(bad)} of {len(outcomes)} requests answered 5xx",
        [f"#{o.index}: {o.status} {o.error[:160]}" for o in bad[:MAX_PROBLEMS]],
    )


def answer_problems(spec: RequestSpec, out: Outcome) -> list[str]:
    """Why the answer to a request that was not cut is lost, truncated or inconsistent
    (empty: complete). Token counts come from the returned token ids."""
    if not out.ok:
        return [f"{out.error_class} (status {out.status}): {out.error[:160]}"]
    problems = []
    if sorted(out.choices) != list(range(spec.n)):
        problems.append(f"choices {sorted(out.choices)}, expected {spec.n}")
    total = 0
    for i, choice in sorted(out.choices.items()):
        count = len(choice.token_ids)
        total += count
        where = f"choice {i}"
        if choice.finish_reason not in FINISH_REASONS:
            problems.append(f"{where}: finish_reason {choice.finish_reason!r}")
        elif choice.finish_reason == "length" and count != spec.max_tokens:
            problems.append(f"{where}: 'length' after {count} tokens, max_tokens {spec.max_tokens}")
        elif choice.finish_reason == "stop" and not 1 <= count <= spec.max_tokens:
            problems.append(f"{where}: 'stop' after {count} tokens (max {spec.max_tokens})")
        if isinstance(choice.stop_reason, str) and choice.stop_reason in choice.text:
            problems.append(f"{where}: stop string {choice.stop_reason!r} left in the text")
        if spec.top_logprobs is not None and choice.logprob_positions != count:
            problems.append(
                f"{where}: {choice.logprob_positions} logprob positions, {count} tokens"
            )
    if out.usage_completion_tokens is None:
        problems.append("no usage")
    elif out.usage_completion_tokens != total:
        problems.append(f"usage says {out.usage_completion_tokens} tokens, choices hold {total}")
    return problems


def complete_answers(specs: Mapping[int, RequestSpec], outcomes: Sequence[Outcome]) -> Check:
    """Every request that was not cut ends with a finish reason and the right count."""
    judged = [o for o in outcomes if not o.cut]
    problems = []
    for out in judged:
        for p in answer_problems(specs[out.index], out):
            problems.append(f"#{out.index}: {p}")
    lost = len({p.split(":", 1)[0] for p in problems})
    return Check(
        "every request not cut completes with the right token count",
        not problems,
        f"{len(judged) - lost} of {len(judged)} complete ({len(outcomes) - len(judged)} cut "
        "by the client, not judged)",
        problems[:MAX_PROBLEMS],
    )


def identity(verdicts: Mapping[int, Verdict], tolerance: float) -> Check:
    counts = tally(list(verdicts.values()))
    n = sum(counts.values())
    differs = [f"#{i}: {v.to_dict()}" for i, v in verdicts.items() if v.kind == DIFFERS]
    return Check(
        "greedy full-depth/dense requests equal the same request sent alone",
        (counts[DIFFERS] == 0) if n else None,
        f"{counts[EXACT]} exact, {counts[TIE]} first differ at a near-tie "
        f"(<= {tolerance} log-prob apart), {counts[DIFFERS]} differ of {n} compared",
        differs[:MAX_PROBLEMS],
    )


def engine_answers(before: Outcome, after: Outcome, verdict: Verdict | None, when: str) -> Check:
    ok = after.ok and bool(after.choices) and verdict is not None and verdict.kind != DIFFERS
    tokens = len(after.choices[0].token_ids) if after.choices else 0
    detail = (
        f"status {after.status}, {tokens} tokens, {verdict.kind if verdict else 'not compared'} "
        f"vs the same request before the run"
    )
    if not before.ok:
        return Check(f"the engine answers {when}", False, f"the first probe failed: {before.error}")
    return Check(f"the engine answers {when}", ok, detail, [] if ok else [after.error[:200]])


# ----------------------------------------------------------------------------- server


def memory_growth(warm: int, end: int, limit: float) -> Check:
    growth = (end - warm) / warm if warm else float("inf")
    return Check(
        f"server RSS grows < {limit:.0%} after warm-up",
        growth < limit,
        f"{warm / 2**20:.0f} MiB after warm-up -> {end / 2**20:.0f} MiB at the end ({growth:+.2%})",
    )


def state_entries(after: Mapping[str, float], peak: float | None) -> Check:
    name = "UTIO per-request state back to 0 when idle"
    if observe.STATE_ENTRIES not in after:
        return Check(name, None, "no utio_request_state_entries on /metrics (UTIO off)")
    value = after[observe.STATE_ENTRIES]
    seen = "not sampled" if peak is None else f"peak {peak:g} while requests ran"
    return Check(name, value == 0, f"{value:g} entries after the run ({seen})")


def counters_consistent(before: Mapping[str, float], after: Mapping[str, float]) -> Check:
    name = "UTIO counters consistent (monotone, saved <= full, steps increase)"
    if "utio_steps_total" not in after:
        return Check(name, None, "no utio_* counters on /metrics (UTIO off)")
    problems = []
    counters = {k: v for k, v in after.items() if k.split("[")[0].endswith("_total")}
    for key, value in counters.items():
        if key.startswith("utio_") and value < before.get(key, 0.0):
            problems.append(f"{key} went down: {before[key]:g} -> {value:g}")
    steps = after["utio_steps_total"] - before.get("utio_steps_total", 0.0)
    if steps <= 0:
        problems.append(f"utio_steps_total did not increase ({steps:g})")
    full = after.get("utio_layer_tokens_full_total", 0.0)
    run = after.get("utio_layer_tokens_run_total", 0.0)
    saved = after.get("utio_layer_tokens_saved_total", 0.0)
    if saved > full:
        problems.append(f"saved {saved:g} > full {full:g}")
    if saved != full - run:
        problems.append(f"saved {saved:g} != full {full:g} - run {run:g}")
    read = after.get("utio_kv_tokens_read_total", 0.0)
    dense = after.get("utio_kv_tokens_dense_total", 0.0)
    if read > dense:
        problems.append(f"KV tokens read {read:g} > dense {dense:g}")
    # A scrape whose utio_stats RPC waited past its timeout (a long step) serves the
    # previous values by design; the runner reads the final values fresh.
    stale = after.get(observe.FETCH_FAILURES, 0.0)
    return Check(
        name,
        not problems,
        f"+{steps:g} steps, layer-tokens saved {saved:g} of {full:g}, KV read {read:g} of "
        f"{dense:g}; {stale:g} scrapes served previous values (RPC past its timeout)",
        problems,
    )


def engine_idle(after: Mapping[str, float]) -> Check:
    running = after.get(observe.RUNNING, 0.0)
    waiting = after.get(observe.WAITING, 0.0)
    usage = after.get(observe.KV_USAGE, 0.0)
    return Check(
        "vLLM idle after the run (no running/waiting request, no KV block in use)",
        running == 0 and waiting == 0 and usage == 0,
        f"{running:g} running, {waiting:g} waiting, KV cache usage {usage:.2%}",
    )


def tokens_accounted(
    outcomes: Sequence[Outcome], before: Mapping[str, float], after: Mapping[str, float]
) -> Check:
    """The server generated at least every token the client received."""
    seen = sum(len(c.token_ids) for o in outcomes for c in o.choices.values())
    made = after.get(observe.GENERATION_TOKENS, 0.0) - before.get(observe.GENERATION_TOKENS, 0.0)
    return Check(
        "every token received was generated (vllm:generation_tokens)",
        made >= seen,
        f"server generated {made:g}, client received {seen} (cut streams: the rest)",
    )


def preemptions(before: Mapping[str, float], after: Mapping[str, float], expected: bool) -> Check:
    count = after.get(observe.PREEMPTIONS, 0.0) - before.get(observe.PREEMPTIONS, 0.0)
    if not expected:
        return Check("preemptions (informational)", None, f"{count:g} preemptions")
    return Check("the small KV cache forced preemptions", count > 0, f"{count:g} preemptions")


# ----------------------------------------------------------------------------- summary


def _pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def summarize(
    specs: Mapping[int, RequestSpec], outcomes: Sequence[Outcome], wall_s: float
) -> dict[str, Any]:
    """Counts, errors by class, latency and throughput of one load phase."""
    classes = Counter(o.error_class or "ok" for o in outcomes)
    done = [o for o in outcomes if o.ok and not o.cut]
    latency = [o.latency_s for o in done]
    ttft = [o.ttft_s for o in outcomes if o.ttft_s is not None and o.ok]
    tokens = sum(len(c.token_ids) for o in outcomes for c in o.choices.values())
    tags = Counter(t for o in outcomes for t in specs[o.index].tags)
    return {
        "requests": len(outcomes),
        "completed": len(done),
        "cut": sum(o.cut for o in outcomes),
        "errors_by_class": {k: v for k, v in sorted(classes.items()) if k != "ok"},
        "latency_s_p50": _pct(latency, 50),
        "latency_s_p99": _pct(latency, 99),
        "ttft_s_p50": _pct(ttft, 50),
        "ttft_s_p99": _pct(ttft, 99),
        "output_tokens": tokens,
        "wall_s": wall_s,
        "output_tok_s": tokens / wall_s if wall_s > 0 else None,
        "mix": dict(sorted(tags.items())),
    }
