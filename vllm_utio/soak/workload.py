"""The soak's request mix.

Prompts: ShareGPT first human turns, and long prompts cut from held-out Wikipedia (the
calibration split's held-out side, never fitted on) at random offsets, so long prompts
rarely share a cached prefix. Each request draws, independently and from one seeded
generator: chat or completions, streamed or not, ``n`` = 1 or 2, temperature 0 or 0.8,
stop strings, logprobs, a client-side cut of the stream, and per-request UTIO controls
(``vllm_xargs``). A share of requests are *references*: greedy, ``n`` = 1, never cut,
pinned to full depth and dense attention, with top-2 logprobs, so their tokens can be
compared with the same request sent alone (:mod:`.identity`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from vllm_utio.request_controls import (
    ATTENTION_KEY,
    ATTENTION_VALUES,
    BUCKET_KEY,
    FULL_DEPTH,
    SPECULATE_KEY,
    SPECULATE_VALUES,
)

CHAT = "chat"
COMPLETION = "completion"
PATHS = {CHAT: "/v1/chat/completions", COMPLETION: "/v1/completions"}
# What a reference request pins: the model itself, every layer, the whole cache.
REFERENCE_XARGS = {BUCKET_KEY: FULL_DEPTH, ATTENTION_KEY: "dense"}
# Under load a reference asks for the top 5 log-probs per token; alone, for the top 20
# (vLLM's maximum), so the token chosen under load is almost always among them.
REFERENCE_TOP_LOGPROBS = 5
ALONE_TOP_LOGPROBS = 20
STOP_SETS = (["\n\n"], ["."], ["\n", " and"])
LONG_INSTRUCTION = "Summarize the following text in a few sentences.\n\n"


@dataclass(frozen=True)
class MixSettings:
    """Shares of each request property (each drawn independently)."""

    long_fraction: float = 0.2
    long_tokens: tuple[int, int] = (2000, 4000)
    stream_fraction: float = 0.5
    chat_fraction: float = 0.5
    n2_fraction: float = 0.15
    sampled_fraction: float = 0.3  # temperature 0.8; the rest greedy
    stop_fraction: float = 0.2
    logprobs_fraction: float = 0.2
    cut_fraction: float = 0.15  # of streamed requests
    controls_fraction: float = 0.25
    reference_fraction: float = 0.1
    max_tokens: tuple[int, ...] = (16, 32, 64, 128)
    reference_max_tokens: int = 32
    sharegpt_max_chars: int = 2000


@dataclass
class RequestSpec:
    """One request of the mix, with everything needed to send and to judge it."""

    index: int
    kind: str  # CHAT | COMPLETION
    prompt: str
    long: bool
    stream: bool
    n: int
    temperature: float
    max_tokens: int
    stop: list[str] | None = None
    top_logprobs: int | None = None  # logprobs per token (None: not asked)
    xargs: dict[str, str] | None = None
    cut_after: int | None = None  # streamed: close after this many token chunks
    reference: bool = False
    tags: list[str] = field(default_factory=list)

    @property
    def path(self) -> str:
        return PATHS[self.kind]

    def body(self, model: str, cache_salt: str | None = None) -> dict[str, Any]:
        """The JSON body: token ids always returned, logprob tokens as ``token_id:N``."""
        body: dict[str, Any] = {
            "model": model,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "n": self.n,
            "stream": self.stream,
            "return_token_ids": True,
            "return_tokens_as_token_ids": True,
        }
        if self.kind == CHAT:
            body["messages"] = [{"role": "user", "content": self.prompt}]
        else:
            body["prompt"] = self.prompt
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        if self.stop:
            body["stop"] = list(self.stop)
        if self.top_logprobs is not None:
            if self.kind == CHAT:
                body["logprobs"] = True
                body["top_logprobs"] = self.top_logprobs
            else:
                body["logprobs"] = self.top_logprobs
        if self.xargs:
            body["vllm_xargs"] = dict(self.xargs)
        if cache_salt is not None:
            body["cache_salt"] = cache_salt
        return body

    def alone(self) -> RequestSpec:
        """The same request for the alone pass: not streamed, never cut, top 20 logprobs."""
        return replace(self, stream=False, cut_after=None, top_logprobs=ALONE_TOP_LOGPROBS)

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out["prompt"] = self.prompt[:80]
        out["prompt_chars"] = len(self.prompt)
        return out


@dataclass
class PromptSources:
    short: list[str]
    long: list[str]


def load_prompt_sources(
    model_dir: str | Path, settings: MixSettings, n_short: int, n_long: int, seed: int
) -> PromptSources:
    """ShareGPT first turns and ``n_long`` long held-out Wikipedia prompts."""
    from vllm_utio.assets.data import load_sharegpt_prompts, load_wiki_documents
    from vllm_utio.calibration.data import load_tokenizer
    from vllm_utio.evaluation.long_quality import held_out_texts

    short = load_sharegpt_prompts(n=max(1, n_short), max_chars=settings.sharegpt_max_chars)
    longs: list[str] = []
    if n_long > 0:
        tokenizer = load_tokenizer(model_dir)
        ids: list[int] = []
        for text in held_out_texts(load_wiki_documents()):
            ids.extend(tokenizer.encode(text + "\n\n", add_special_tokens=False).ids)
        longs = long_prompts(ids, tokenizer.decode, settings.long_tokens, n_long, seed)
    return PromptSources(short, longs)


def long_prompts(
    ids: Sequence[int], decode: Any, lengths: tuple[int, int], count: int, seed: int
) -> list[str]:
    """``count`` spans of ``ids`` of a random length in ``lengths``, at random offsets."""
    lo, hi = lengths
    if len(ids) < hi:
        raise ValueError(f"held-out text has {len(ids)} tokens; long prompts need {hi}")
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        length = rng.randint(lo, hi)
        start = rng.randrange(0, len(ids) - length + 1)
        out.append(decode(list(ids[start : start + length])))
    return out


def build_mix(
    count: int,
    settings: MixSettings,
    sources: PromptSources,
    bucket_names: Sequence[str],
    seed: int,
    start_index: int = 0,
) -> list[RequestSpec]:
    """``count`` requests drawn with ``seed``; ``bucket_names`` are the engine's depth
    buckets a ``utio_bucket`` control may name (``"full"`` is always allowed)."""
    rng = random.Random(seed)
    specs = []
    short_i = long_i = 0
    for i in range(count):
        long = bool(sources.long) and rng.random() < settings.long_fraction
        if long:
            text = sources.long[long_i % len(sources.long)]
            long_i += 1
        else:
            text = sources.short[short_i % len(sources.short)]
            short_i += 1
        kind = CHAT if rng.random() < settings.chat_fraction else COMPLETION
        prompt = LONG_INSTRUCTION + text if long and kind == CHAT else text
        stream = rng.random() < settings.stream_fraction
        if rng.random() < settings.reference_fraction:
            specs.append(_reference(start_index + i, kind, prompt, long, stream, settings))
            continue
        n = 2 if rng.random() < settings.n2_fraction else 1
        sampled = rng.random() < settings.sampled_fraction
        spec = RequestSpec(
            index=start_index + i,
            kind=kind,
            prompt=prompt,
            long=long,
            stream=stream,
            n=n,
            # vLLM refuses n > 1 with greedy sampling (the copies would be identical)
            temperature=0.8 if sampled or n > 1 else 0.0,
            max_tokens=rng.choice(settings.max_tokens),
        )
        if rng.random() < settings.stop_fraction:
            spec.stop = list(rng.choice(STOP_SETS))
        if rng.random() < settings.logprobs_fraction:
            spec.top_logprobs = rng.choice((1, 5))
        if rng.random() < settings.controls_fraction:
            spec.xargs = _controls(rng, bucket_names)
        if stream and spec.max_tokens > 1 and rng.random() < settings.cut_fraction:
            spec.cut_after = rng.randint(1, spec.max_tokens - 1)
        spec.tags = _tags(spec)
        specs.append(spec)
    return specs


def _reference(
    index: int, kind: str, prompt: str, long: bool, stream: bool, settings: MixSettings
) -> RequestSpec:
    spec = RequestSpec(
        index=index,
        kind=kind,
        prompt=prompt,
        long=long,
        stream=stream,
        n=1,
        temperature=0.0,
        max_tokens=settings.reference_max_tokens,
        top_logprobs=REFERENCE_TOP_LOGPROBS,
        xargs=dict(REFERENCE_XARGS),
        reference=True,
    )
    spec.tags = _tags(spec)
    return spec


def _controls(rng: random.Random, bucket_names: Sequence[str]) -> dict[str, str]:
    """One to three UTIO controls with allowed values."""
    choices = {
        BUCKET_KEY: [FULL_DEPTH, *bucket_names],
        ATTENTION_KEY: list(ATTENTION_VALUES),
        SPECULATE_KEY: list(SPECULATE_VALUES),
    }
    keys = rng.sample(sorted(choices), rng.randint(1, len(choices)))
    return {k: rng.choice(choices[k]) for k in sorted(keys)}


def _tags(spec: RequestSpec) -> list[str]:
    tags = [spec.kind, "stream" if spec.stream else "whole", "long" if spec.long else "short"]
    tags += [f"n={spec.n}", "greedy" if spec.temperature == 0 else "sampled"]
    if spec.stop:
        tags.append("stop")
    if spec.top_logprobs is not None:
        tags.append("logprobs")
    if spec.xargs:
        tags.append("controls")
    if spec.cut_after is not None:
        tags.append("cut")
    if spec.reference:
        tags.append("reference")
    return tags


def tiny_request(index: int) -> RequestSpec:
    """A one-token request shorter than a KV block (no prefix-cache hit, no UTIO state):
    after a run, it makes the engine step once, which tells the worker about requests
    that finished on the previous step."""
    return RequestSpec(index, COMPLETION, "Hello", False, False, 1, 0.0, 1, tags=["tiny"])


def probe_request(index: int) -> RequestSpec:
    """A short greedy request sent before and after the run (and after bad input): the
    engine still answers, with the same tokens."""
    spec = RequestSpec(
        index,
        COMPLETION,
        "The capital of France is",
        False,
        False,
        1,
        0.0,
        16,
        top_logprobs=REFERENCE_TOP_LOGPROBS,
        xargs=dict(REFERENCE_XARGS),
        reference=True,
    )
    spec.tags = ["probe"]
    return spec
