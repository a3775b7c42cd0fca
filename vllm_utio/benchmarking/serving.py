"""Serving benchmark: a real ``vllm serve`` on 127.0.0.1, with and without ``--enable-utio``.

A small async client of our own (streaming ``/v1/completions``) sends ShareGPT prompts at
a fixed concurrency and measures, per request: TTFT (time to first token), TPOT (mean
time per output token after the first), inter-token latencies; per run: output tokens/s.
Requests are bounded in count and each has a timeout; the server binds loopback only.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class RequestResult:
    ok: bool
    ttft_s: float = 0.0
    latency_s: float = 0.0
    output_tokens: int = 0
    itl_s: list[float] = field(default_factory=list)
    error: str = ""
    prompt_tokens: int = 0  # as the server counted them (usage), so the report shows length


async def _one_request(
    client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int
) -> RequestResult:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    last = t0
    first: float | None = None
    itl: list[float] = []
    tokens = prompt_tokens = 0
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                return RequestResult(False, error=f"HTTP {resp.status_code}")
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = int(chunk["usage"]["completion_tokens"])
                    prompt_tokens = int(chunk["usage"].get("prompt_tokens", 0))
                if not chunk.get("choices") or not chunk["choices"][0].get("text"):
                    continue
                now = time.perf_counter()
                if first is None:
                    first = now
                else:
                    itl.append(now - last)
                last = now
    except (httpx.HTTPError, json.JSONDecodeError) as err:
        return RequestResult(False, error=f"{type(err).__name__}: {err}")
    if first is None:
        return RequestResult(False, error="no tokens streamed")
    return RequestResult(True, first - t0, last - t0, tokens, itl, prompt_tokens=prompt_tokens)


async def run_load(
    base_url: str,
    model: str,
    prompts: Sequence[str],
    concurrency: int,
    max_tokens: int,
    timeout_s: float = 300.0,
) -> dict[str, Any]:
    """Send every prompt once, ``concurrency`` at a time; returns the run's metrics."""
    sem = asyncio.Semaphore(concurrency)
    url = f"{base_url}/v1/completions"
    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits, trust_env=False) as client:

        async def bounded(prompt: str) -> RequestResult:
            async with sem:
                return await _one_request(client, url, model, prompt, max_tokens)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(bounded(p) for p in prompts))
        wall = time.perf_counter() - t0
    return summarize_requests(results, wall, concurrency)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def summarize_requests(results: list[RequestResult], wall_s: float, concurrency: int) -> dict:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft_s for r in ok]
    tpot = [(r.latency_s - r.ttft_s) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itl = [x for r in ok for x in r.itl_s]
    out_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = [float(r.prompt_tokens) for r in ok if r.prompt_tokens > 0]
    ms = 1e3
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "wall_s": wall_s,
        "output_tok_s": out_tokens / wall_s if wall_s > 0 else None,
        "ttft_ms_p50": _scale(_pct(ttft, 50), ms),
        "ttft_ms_p99": _scale(_pct(ttft, 99), ms),
        "tpot_ms_p50": _scale(_pct(tpot, 50), ms),
        "tpot_ms_p99": _scale(_pct(tpot, 99), ms),
        "itl_ms_p50": _scale(_pct(itl, 50), ms),
        "itl_ms_p99": _scale(_pct(itl, 99), ms),
        "ttft_ms_mean": _scale(statistics.fmean(ttft), ms) if ttft else None,
        "prompt_tokens_p50": _pct(prompt_tokens, 50),
        "prompt_tokens_mean": statistics.fmean(prompt_tokens) if prompt_tokens else None,
    }


def _scale(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor
