"""Quality of a UTIO configuration against the full model, measured through the real engine.

Teacher-forced decoding: each document is cut into windows; a window's first tokens are
the prompt and the rest of the window is forced, token by token, as the continuation.
Every continuation token after the first comes out of a decode step, so it is routed by
UTIO exactly as in serving, and the K/V that skipped layers write is what decode writes.
The first continuation token comes out of the prefill step (full depth unless
``route_prefill``), so it is not scored.

Forcing is a V1 logits processor (:class:`ReferenceForcing`) that masks every token but
the reference one. The model's own distribution is read through ``logprobs`` with
``logprobs_mode="raw_logprobs"``: vLLM's sampler takes those log-probs from the logits
before any logits processor runs, so they are the model's, not the forced ones.

The full model is measured the same way with UTIO off. Reported: perplexity of both,
their ratio, top-1 agreement (the routed model's raw argmax equals the full model's at
the same position), greedy-continuation agreement, document-level bootstrap intervals
and UTIO's own count of skipped layer-tokens.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from vllm_utio.config import utio_config_from_additional
from vllm_utio.request_controls import FORCE_TOKENS_KEY

FORCE_KEY = FORCE_TOKENS_KEY  # request validation lets this ``utio_*`` key through
FORCING_PROCESSOR = f"{__name__}:ReferenceForcing"
# Engine settings for teacher forcing. vLLM instantiates logits processors when it builds
# the engine (there is no public way to add one later), hence ``logits_processors``.
ENGINE_DEFAULTS: dict[str, Any] = {
    "dtype": "bfloat16",
    "enforce_eager": True,
    "kv_cache_memory_bytes": 1 << 30,
    "logprobs_mode": "raw_logprobs",
    "logits_processors": [FORCING_PROCESSOR],
    "seed": 0,
}

Progress = Callable[[int], None]


# --------------------------------------------------------------------------- forcing


class ReferenceForcing(LogitsProcessor):
    """Forces a request's n-th output token to ``extra_args[FORCE_KEY][n]``.

    Requests without the key are untouched. The position is the length of the request's
    running output list (vLLM hands processors a reference to it), so it stays right
    across chunked prefill and batch reordering (UTIO's swaps are reported as moves).
    """

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        forced = (sampling_params.extra_args or {}).get(FORCE_KEY)
        if forced is None:
            return
        if not isinstance(forced, list) or not all(isinstance(t, int) and t >= 0 for t in forced):
            raise ValueError(f"extra_args[{FORCE_KEY!r}] must be a list of token ids")

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        # batch row -> (forced ids, the request's live output-token list)
        self._rows: dict[int, tuple[list[int], list[int]]] = {}

    def is_argmax_invariant(self) -> bool:
        return False  # it decides the argmax; must also run for greedy requests

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self._rows, batch_update, self._new_row)

    @staticmethod
    def _new_row(
        params: Any, _prompt: list[int] | None, output: list[int]
    ) -> tuple[list[int], list[int]] | None:
        forced = (params.extra_args or {}).get(FORCE_KEY) if params is not None else None
        return (forced, output) if forced else None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        rows, tokens = [], []
        for row, (forced, output) in self._rows.items():
            if len(output) < len(forced):
                rows.append(row)
                tokens.append(forced[len(output)])
        if rows:
            r = torch.tensor(rows, device=logits.device)
            logits[r] = float("-inf")
            logits[r, torch.tensor(tokens, device=logits.device)] = 0.0
        return logits


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Window:
    """One teacher-forced sequence: ``tokens[:prompt_len]`` prompt, the rest forced."""

    doc: int  # index of its document (the bootstrap unit)
    tokens: tuple[int, ...]
    prompt_len: int  # includes the prefix
    prefix_len: int = 0  # a BOS the model expects, not document text

    @property
    def continuation(self) -> list[int]:
        return list(self.tokens[self.prompt_len :])


def bos_prefix(tokenizer: Any) -> list[int]:
    """``[bos]`` if the tokenizer adds one by itself (the model expects it), else ``[]``."""
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = tokenizer.encode("a")
    return [bos] if bos is not None and ids and ids[0] == bos else []


def make_windows(
    documents: Iterable[Sequence[int]],
    window: int = 256,
    prompt_len: int = 1,
    max_tokens: int | None = None,
    max_windows_per_doc: int | None = 1,
    prefix: Sequence[int] = (),
) -> list[Window]:
    """Consecutive windows of ``window`` text tokens, ``prefix`` (a BOS) prepended to each.

    A window scores ``len - prompt_len - 1`` tokens; tails with fewer than two scored
    tokens are dropped. ``documents`` is consumed lazily and only until ``max_tokens``
    scored tokens are collected.
    """
    if window < prompt_len + 3:
        raise ValueError(f"window ({window}) must exceed prompt_len ({prompt_len}) + 2")
    prefix = tuple(prefix)
    out: list[Window] = []
    scored = 0
    for doc, ids in enumerate(documents):
        for n, start in enumerate(range(0, len(ids), window)):
            chunk = tuple(ids[start : start + window])
            if (max_windows_per_doc and n >= max_windows_per_doc) or len(chunk) < prompt_len + 3:
                break
            out.append(Window(doc, prefix + chunk, len(prefix) + prompt_len, len(prefix)))
            scored += len(chunk) - prompt_len - 1
            if max_tokens is not None and scored >= max_tokens:
                return out
    return out


def prepare_windows(
    tokenizer: Any,
    texts: Iterable[str],
    window: int = 256,
    prompt_len: int = 1,
    max_tokens: int | None = None,
    max_windows_per_doc: int | None = 1,
) -> list[Window]:
    """Tokenize ``texts`` (lazily, so a token budget does not tokenize a whole corpus)
    and cut them into windows (see :func:`make_windows`)."""
    needed = window * max_windows_per_doc if max_windows_per_doc else None
    docs = (_encode_head(tokenizer, t, needed) for t in texts)
    return make_windows(
        docs, window, prompt_len, max_tokens, max_windows_per_doc, bos_prefix(tokenizer)
    )


def _encode_head(tokenizer: Any, text: str, needed: int | None) -> list[int]:
    """The first ``needed`` tokens of ``text`` (all if None), tokenizing only a head of it:
    whole Wikipedia articles are slow to tokenize and far longer than a window."""
    if needed is None:
        return list(tokenizer.encode(text, add_special_tokens=False))
    cut = 8 * needed
    while True:
        ids = tokenizer.encode(text[:cut], add_special_tokens=False)
        # The cut splits at most its last word; a margin keeps that word out of the result.
        if cut >= len(text) or len(ids) > needed + 32:
            return list(ids[:needed])
        cut *= 2


def _prompt(token_ids: Sequence[int], salt: str | None = None) -> dict[str, Any]:
    # A fresh cache salt per request: no request may reuse K/V another one wrote (a
    # routed decode writes frozen-state K/V that a later prefill must not pick up).
    # A caller-given salt shares the prompt's K/V between requests that pass the same one.
    return {"prompt_token_ids": list(token_ids), "cache_salt": salt or uuid.uuid4().hex}


# --------------------------------------------------------------------------- engine runs


@dataclass
class ForcedResult:
    """Per continuation token of one window (index 0 came from the prefill step)."""

    logprobs: np.ndarray  # raw log p(reference token), float64
    top1: np.ndarray  # the model's own raw argmax token, int64


def _check_engine(llm: Any) -> None:
    config = llm.llm_engine.vllm_config
    mode = config.model_config.logprobs_mode
    if mode != "raw_logprobs":
        raise ValueError(
            f"engine has logprobs_mode={mode!r}; teacher forcing needs 'raw_logprobs' "
            "(processed log-probs would be those of the forced distribution)"
        )
    if config.use_v2_model_runner:
        raise ValueError(
            "ReferenceForcing is a V1-runner logits processor (as UTIO needs the V1 runner): "
            "set VLLM_USE_V2_MODEL_RUNNER=0 before building the engine"
        )


def _preemption_free_batch(llm: Any, batch_size: int, max_len: int) -> int:
    """Cap a batch so all its requests fit the KV cache at their final length.

    A preempted request is recomputed by a prefill, which runs full depth: its earlier
    decode positions would then hold full-depth K/V, not what routed decode wrote.
    """
    cache = llm.llm_engine.vllm_config.cache_config
    capacity = (cache.num_gpu_blocks or 0) * cache.block_size
    per_request = math.ceil(max_len / cache.block_size) * cache.block_size
    if not capacity:
        return batch_size
    if capacity < per_request:
        raise ValueError(f"KV cache holds {capacity} tokens, one request needs {per_request}")
    return min(batch_size, capacity // per_request)


def _chunks(n: int, size: int) -> Iterable[range]:
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


def _parse_forced(output: Any, forced: list[int]) -> ForcedResult:
    got = list(output.token_ids)
    if got != forced:
        raise RuntimeError(
            f"forced continuation was not followed ({len(got)} tokens, expected "
            f"{len(forced)}): is the engine built with logits_processors="
            f"[{FORCING_PROCESSOR!r}]?"
        )
    lps = np.empty(len(forced))
    top1 = np.empty(len(forced), dtype=np.int64)
    for i, (ref, entry) in enumerate(zip(forced, output.logprobs, strict=True)):
        lps[i] = entry[ref].logprob
        # logprobs=1: the dict holds the sampled (= reference) token and the top-1; a
        # second key is the top-1 even when it ties with the reference.
        others = [t for t in entry if t != ref]
        top1[i] = others[0] if others else ref
    return ForcedResult(lps, top1)


def teacher_forced_logprobs(
    llm: Any,
    windows: Sequence[Window],
    extra_args: Mapping[str, Any] | None = None,
    batch_size: int = 64,
    progress: Progress | None = None,
    salts: Sequence[str] | None = None,
) -> list[ForcedResult]:
    """Force each window's continuation through ``llm`` and read the raw log-probs.

    ``extra_args`` go to every request (e.g. ``{"utio_bucket": "shallow"}``). ``salts``
    (one per window) let requests with the same salt share cached prompt K/V; only safe
    when the prompt's K/V do not depend on the request (prefill not routed).
    """
    from vllm import SamplingParams

    _check_engine(llm)
    longest = max((len(w.tokens) for w in windows), default=0)
    batch_size = _preemption_free_batch(llm, batch_size, longest)
    results: list[ForcedResult] = []
    for rows in _chunks(len(windows), batch_size):
        prompts, params = [], []
        for i in rows:
            w = windows[i]
            forced = w.continuation
            prompts.append(_prompt(w.tokens[: w.prompt_len], salts[i] if salts else None))
            params.append(
                SamplingParams(
                    temperature=0.0,
                    max_tokens=len(forced),
                    ignore_eos=True,
                    logprobs=1,
                    detokenize=False,
                    extra_args={**(extra_args or {}), FORCE_KEY: forced},
                )
            )
        outs = llm.generate(prompts, params, use_tqdm=False)
        for w, out in zip((windows[i] for i in rows), outs, strict=True):
            results.append(_parse_forced(out.outputs[0], w.continuation))
            if progress is not None:
                progress(len(w.tokens) - w.prompt_len)
    return results


def greedy_continuations(
    llm: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 64,
    extra_args: Mapping[str, Any] | None = None,
    batch_size: int = 64,
    salts: Sequence[str] | None = None,
) -> list[list[int]]:
    """Greedy continuations (``salts``: see :func:`teacher_forced_logprobs`)."""
    from vllm import SamplingParams

    params = SamplingParams(
        temperature=0.0,
        max_tokens=max_new_tokens,
        ignore_eos=True,
        detokenize=False,
        extra_args=dict(extra_args) if extra_args else None,
    )
    longest = max((len(p) for p in prompts), default=0) + max_new_tokens
    batch_size = _preemption_free_batch(llm, batch_size, longest)
    out: list[list[int]] = []
    for rows in _chunks(len(prompts), batch_size):
        batch = [_prompt(prompts[i], salts[i] if salts else None) for i in rows]
        outs = llm.generate(batch, params, use_tqdm=False)
        out.extend(list(o.outputs[0].token_ids) for o in outs)
    return out


def utio_stats(llm: Any) -> dict[str, Any] | None:
    """UTIO's worker totals, or None for an engine with UTIO off (no such RPC there)."""
    additional = llm.llm_engine.vllm_config.additional_config
    if not utio_config_from_additional(additional).enabled:
        return None
    return llm.collective_rpc("utio_stats")[0]


def stats_delta(before: Mapping[str, Any] | None, after: Mapping[str, Any] | None) -> dict:
    """Layer-token totals between two ``utio_stats`` snapshots (empty without UTIO)."""
    if before is None or after is None:
        return {}
    keys = ("steps", "routed_steps", "layer_tokens_run", "layer_tokens_full")
    d = {k: after[k] - before[k] for k in keys}
    d["tokens_per_level"] = dict(
        zip(
            after["level_names"],
            np.subtract(after["tokens_per_level"], before["tokens_per_level"]).tolist(),
            strict=True,
        )
    )
    full = d["layer_tokens_full"]
    d["saved_fraction"] = 1.0 - d["layer_tokens_run"] / full if full else 0.0
    return d


@dataclass
class EngineRun:
    """Everything measured on one engine."""

    forced: list[ForcedResult]
    greedy: list[list[int]]
    stats_forced: dict[str, Any] = field(default_factory=dict)
    stats_greedy: dict[str, Any] = field(default_factory=dict)
    seconds_forced: float = 0.0
    seconds_greedy: float = 0.0


def greedy_prompts(windows: Sequence[Window], n: int, length: int = 32) -> list[list[int]]:
    """The first ``length`` tokens (after any BOS) of the first ``n`` long-enough windows."""
    out: list[list[int]] = []
    for w in windows:
        if len(out) == n:
            break
        if len(w.tokens) - w.prefix_len >= length:
            out.append(list(w.tokens[: w.prefix_len + length]))
    return out


def run_engine(
    llm: Any,
    windows: Sequence[Window],
    prompts: Sequence[Sequence[int]] = (),
    greedy_tokens: int = 64,
    extra_args: Mapping[str, Any] | None = None,
    batch_size: int = 64,
    progress: Progress | None = None,
) -> EngineRun:
    """Teacher-forced log-probs of ``windows`` and greedy continuations of ``prompts``."""
    s0, t0 = utio_stats(llm), time.perf_counter()
    forced = teacher_forced_logprobs(llm, windows, extra_args, batch_size, progress)
    s1, t1 = utio_stats(llm), time.perf_counter()
    greedy = greedy_continuations(llm, prompts, greedy_tokens, extra_args, batch_size)
    s2, t2 = utio_stats(llm), time.perf_counter()
    return EngineRun(forced, greedy, stats_delta(s0, s1), stats_delta(s1, s2), t1 - t0, t2 - t1)


# --------------------------------------------------------------------------- statistics


def greedy_agreement(full: Sequence[Sequence[int]], routed: Sequence[Sequence[int]]) -> dict:
    """Share of identical tokens at equal positions, and where sequences first differ
    (the length when they never do), averaged over prompts."""
    same = total = 0
    first: list[int] = []
    for a, b in zip(full, routed, strict=True):
        n = min(len(a), len(b))
        eq = np.asarray(a[:n]) == np.asarray(b[:n])
        same += int(eq.sum())
        total += n
        first.append(int(np.argmin(eq)) if not eq.all() else n)
    return {
        "prompts": len(first),
        "tokens_per_prompt": max((len(a) for a in full), default=0),
        "token_agreement": same / total if total else float("nan"),
        "mean_first_divergence": float(np.mean(first)) if first else float("nan"),
        "identical_continuations": sum(f == len(a) for f, a in zip(first, full, strict=True)),
    }


def per_document_sums(
    windows: Sequence[Window], full: Sequence[ForcedResult], routed: Sequence[ForcedResult]
) -> np.ndarray:
    """[documents, 4]: summed NLL full, summed NLL routed, scored tokens, top-1 agreements.

    Only decode-produced tokens are scored (index 0 of a window came from prefill).
    """
    docs = sorted({w.doc for w in windows})
    row = {d: i for i, d in enumerate(docs)}
    sums = np.zeros((len(docs), 4))
    for w, f, r in zip(windows, full, routed, strict=True):
        i = row[w.doc]
        sums[i, 0] -= f.logprobs[1:].sum()
        sums[i, 1] -= r.logprobs[1:].sum()
        sums[i, 2] += len(f.logprobs) - 1
        sums[i, 3] += int((f.top1[1:] == r.top1[1:]).sum())
    return sums


def _ppl_delta(sums: np.ndarray) -> np.ndarray:
    # ppl_routed / ppl_full - 1 = exp((NLL_routed - NLL_full) / tokens) - 1
    return np.expm1((sums[..., 1] - sums[..., 0]) / sums[..., 2])


def _agreement(sums: np.ndarray) -> np.ndarray:
    return sums[..., 3] / sums[..., 2]


def bootstrap_ci(
    sums: np.ndarray,
    stat: Callable[[np.ndarray], np.ndarray],
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile interval of ``stat`` over documents resampled with replacement.

    The seed only makes the interval reproducible; the measurement has no randomness.
    """
    if len(sums) < 2:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(sums), size=(resamples, len(sums)))
    values = stat(sums[picks].sum(axis=1))
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return (float(lo), float(hi))


# --------------------------------------------------------------------------- report


@dataclass
class QualityReport:
    """A UTIO engine against the full model on the same teacher-forced windows."""

    documents: int
    windows: int
    scored_tokens: int  # decode-produced tokens only
    window: int  # longest window, tokens (with any BOS)
    prompt_len: int  # prompt tokens per window (with any BOS)
    ppl_full: float
    ppl_utio: float
    ppl_delta: float  # ppl_utio / ppl_full - 1
    ppl_delta_ci: tuple[float, float]
    top1_agreement: float
    top1_agreement_ci: tuple[float, float]
    mean_abs_logprob_diff: float
    greedy: dict[str, Any]
    routing: dict[str, Any]
    seconds: dict[str, float]
    bootstrap: dict[str, Any]
    extra_args: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ppl_delta_ci"] = list(self.ppl_delta_ci)
        d["top1_agreement_ci"] = list(self.top1_agreement_ci)
        return d


def compare(
    windows: Sequence[Window],
    full: EngineRun,
    utio: EngineRun,
    resamples: int = 1000,
    seed: int = 0,
    extra_args: Mapping[str, Any] | None = None,
) -> QualityReport:
    sums = per_document_sums(windows, full.forced, utio.forced)
    total = sums.sum(axis=0)
    pairs = zip(full.forced, utio.forced, strict=True)
    diffs = np.concatenate([np.abs(u.logprobs[1:] - f.logprobs[1:]) for f, u in pairs] or [[]])
    n = int(total[2])
    return QualityReport(
        documents=len(sums),
        windows=len(windows),
        scored_tokens=n,
        window=max((len(w.tokens) for w in windows), default=0),
        prompt_len=min((w.prompt_len for w in windows), default=0),
        ppl_full=math.exp(total[0] / n) if n else float("nan"),
        ppl_utio=math.exp(total[1] / n) if n else float("nan"),
        ppl_delta=float(_ppl_delta(total)) if n else float("nan"),
        ppl_delta_ci=bootstrap_ci(sums, _ppl_delta, resamples, seed),
        top1_agreement=float(_agreement(total)) if n else float("nan"),
        top1_agreement_ci=bootstrap_ci(sums, _agreement, resamples, seed),
        mean_abs_logprob_diff=float(diffs.mean()) if len(diffs) else float("nan"),
        greedy=greedy_agreement(full.greedy, utio.greedy),
        routing={"teacher_forced": utio.stats_forced, "greedy": utio.stats_greedy},
        seconds={
            "full_teacher_forced": full.seconds_forced,
            "full_greedy": full.seconds_greedy,
            "utio_teacher_forced": utio.seconds_forced,
            "utio_greedy": utio.seconds_greedy,
        },
        bootstrap={"unit": "document", "resamples": resamples, "seed": seed, "level": 0.95},
        extra_args=dict(extra_args or {}),
    )


def evaluate(
    llm_full: Any,
    llm_utio: Any,
    texts: Sequence[str],
    window: int = 256,
    prompt_len: int = 1,
    max_tokens: int | None = None,
    max_windows_per_doc: int | None = 1,
    greedy_prompt_count: int = 16,
    greedy_prompt_len: int = 32,
    greedy_tokens: int = 64,
    utio_extra_args: Mapping[str, Any] | None = None,
    resamples: int = 1000,
    seed: int = 0,
) -> QualityReport:
    """Measure ``llm_utio`` against ``llm_full`` (UTIO off) on ``texts``;
    ``utio_extra_args`` go to every UTIO request (e.g. a forced bucket).

    Both engines need ``logits_processors=[FORCING_PROCESSOR]`` and raw log-probs
    (see :data:`ENGINE_DEFAULTS`) and the same tokenizer.
    """
    windows = prepare_windows(
        llm_full.get_tokenizer(), texts, window, prompt_len, max_tokens, max_windows_per_doc
    )
    prompts = greedy_prompts(windows, greedy_prompt_count, greedy_prompt_len)
    full = run_engine(llm_full, windows, prompts, greedy_tokens)
    utio = run_engine(llm_utio, windows, prompts, greedy_tokens, utio_extra_args)
    return compare(windows, full, utio, resamples, seed, utio_extra_args)
