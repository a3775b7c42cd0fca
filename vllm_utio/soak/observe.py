"""What the soak reads from a live server from the outside: the resident memory of its
process tree (API server, engine core, workers) and its Prometheus ``/metrics``.

Nothing here reaches into vLLM: memory comes from the OS (psutil), the rest from the
HTTP endpoints any operator has. UTIO's own numbers (``utio_*``) are on ``/metrics``
only when the server runs with ``VLLM_PLUGINS=utio`` (:mod:`vllm_utio.integration.
metrics`).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

# Metrics the soak reads (summed over their labels); counters end in ``_total``.
PREEMPTIONS = "vllm:num_preemptions_total"
RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE = "vllm:kv_cache_usage_perc"
GENERATION_TOKENS = "vllm:generation_tokens_total"
PROMPT_TOKENS = "vllm:prompt_tokens_total"
STATE_ENTRIES = "utio_request_state_entries"
FETCH_FAILURES = "utio_stats_fetch_failures_total"
UTIO_STEPS = "utio_steps_total"


@dataclass
class MemorySample:
    at_s: float
    total_rss: int
    processes: dict[str, int] = field(default_factory=dict)  # "pid name" -> rss bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "at_s": round(self.at_s, 2),
            "total_rss": self.total_rss,
            "processes": self.processes,
        }


def tree_memory(pid: int, t0: float | None = None) -> MemorySample:
    """Resident memory of ``pid`` and all its descendants (a process that ends while it
    is read counts zero). Shared pages count once per process, as ``ps`` shows them."""
    now = time.monotonic()
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    sizes: dict[str, int] = {}
    for proc in procs:
        try:
            sizes[f"{proc.pid} {proc.name()}"] = int(proc.memory_info().rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return MemorySample(now - (t0 if t0 is not None else now), sum(sizes.values()), sizes)


def parse_metrics(text: str) -> dict[str, float]:
    """Every sample of a Prometheus text page, summed over labels, by sample name;
    per-bucket UTIO samples are also kept as ``name[bucket]``."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + float(sample.value)
            bucket = sample.labels.get("bucket")
            if bucket is not None and sample.name.startswith("utio_"):
                key = f"{sample.name}[{bucket}]"
                out[key] = out.get(key, 0.0) + float(sample.value)
    return out


async def scrape(client: httpx.AsyncClient, base_url: str) -> dict[str, float]:
    resp = await client.get(f"{base_url}/metrics")
    resp.raise_for_status()
    return parse_metrics(resp.text)


async def wait_idle(
    client: httpx.AsyncClient, base_url: str, timeout_s: float = 120.0, poll_s: float = 0.5
) -> dict[str, float]:
    """Poll ``/metrics`` until no request runs or waits; returns the last page (raises
    TimeoutError if the engine never drains: a leaked or stuck request)."""
    deadline = time.monotonic() + timeout_s
    while True:
        metrics = await scrape(client, base_url)
        if metrics.get(RUNNING, 0.0) == 0 and metrics.get(WAITING, 0.0) == 0:
            return metrics
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"engine not idle after {timeout_s:.0f} s: {metrics.get(RUNNING)} running, "
                f"{metrics.get(WAITING)} waiting"
            )
        await asyncio.sleep(poll_s)


async def fresh_scrape(
    client: httpx.AsyncClient, base_url: str, tries: int = 10, pause_s: float = 1.0
) -> dict[str, float]:
    """A page whose UTIO values were fetched by this scrape: with UTIO's exporter, a
    scrape whose ``utio_stats`` RPC times out serves the previous values and counts a
    fetch failure, so retry until a scrape adds none (UTIO off: the first page)."""
    page = await scrape(client, base_url)
    for _ in range(tries):
        if FETCH_FAILURES not in page:
            return page
        await asyncio.sleep(pause_s)
        nxt = await scrape(client, base_url)
        if nxt.get(FETCH_FAILURES, 0.0) == page.get(FETCH_FAILURES, 0.0):
            return nxt
        page = nxt
    raise TimeoutError(f"no scrape of {base_url}/metrics got fresh UTIO values in {tries} tries")


def utio_counters(metrics: dict[str, float]) -> dict[str, float]:
    """The ``utio_*`` samples of a page (empty when UTIO is off or not exported)."""
    return {k: v for k, v in metrics.items() if k.startswith("utio_")}
