"""UTIO statistics as Prometheus metrics on the OpenAI server's ``/metrics``.

The numbers (:class:`vllm_utio.stats.UtioStats`) are accumulated by the UTIO model
runner in the *worker* process; ``/metrics`` is served by the *API server* process.

Design: a ``vllm.endpoint_plugins`` entry point named ``utio``, paired with the
``vllm.general_plugins`` entry point of the same name, exactly as vLLM's endpoint
plugin contract (``vllm/plugins/endpoint_plugins/interface.py``) prescribes: the
general plugin installs the engine-side method (the worker RPC ``utio_stats``,
:mod:`.worker_rpc`), and this plugin reaches it only through the ``EngineClient`` it
is handed (``collective_rpc``), opening no new path into the engine. It adds no route:

- ``attach_router`` wraps the app in a small ASGI middleware that, on a request for
  ``/metrics``, awaits one ``collective_rpc("utio_stats")`` (bounded by a timeout and
  shared by concurrent scrapes) before vLLM's own handler renders the registry;
- ``init_state`` registers, only if UTIO is enabled for the engine, a collector on
  prometheus_client's default registry (the one vLLM's single-API-server ``/metrics``
  renders) that turns the fetched totals into counters.

So values are read at scrape time: fresh, with no polling and no cost between scrapes.
The RPC is made from the middleware because ``Collector.collect`` is synchronous and,
on vLLM's ``/metrics`` mount, runs on the event loop that the RPC itself needs.

Alternatives rejected: a ``vllm.stat_logger_plugins`` logger needs no opt-in, but it
only receives scheduler/iteration stats and no engine client, and worker stats do not
travel in ``SchedulerStats`` without patching the scheduler or the runner's output.
Prometheus multiprocess files written by the worker are not read by the default
(single API server) ``/metrics``, would need a directory handshake and clean-up
between runs, and would add file writes to every model step.

Enabling: vLLM loads endpoint plugins only when they are named in ``VLLM_PLUGINS``
(its opt-in for anything touching the HTTP surface). Because both entry points are
called ``utio``, ``VLLM_PLUGINS=utio vllm serve MODEL --enable-utio`` loads both.
``VLLM_PLUGINS`` is an allowlist for every plugin group: name any other plugin you
need too. With UTIO off, the plugin registers nothing and ``/metrics`` is unchanged.

Limits: with ``--api-server-count > 1`` vLLM's ``/metrics`` renders only multiprocess
files, so UTIO metrics are absent (a warning says so). Tensor-parallel ranks run the
same depth plan, so the first worker's totals are reported, not a sum over ranks; with
data parallelism ``collective_rpc`` reaches one engine only.
"""

from __future__ import annotations

import asyncio
import logging
import os
import weakref
from collections.abc import Iterable, Mapping, Sequence
from itertools import accumulate
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from vllm_utio.config import utio_config_from_additional

if TYPE_CHECKING:
    from argparse import Namespace

    from fastapi import FastAPI
    from starlette.datastructures import State
    from starlette.types import ASGIApp, Receive, Scope, Send
    from vllm.engine.protocol import EngineClient

logger = logging.getLogger("vllm.utio.metrics")

PLUGIN_NAME = "utio"
RPC_METHOD = "utio_stats"
METRICS_PATH = "/metrics"
# A scrape waits for the engine to finish its current step; never hang /metrics on it.
FETCH_TIMEOUT_S = 5.0

# (metric name without "_total", UtioStats.as_dict() key, help text)
_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("utio_steps", "steps", "Model steps run with UTIO on (either path)."),
    (
        "utio_routed_steps",
        "routed_steps",
        "UTIO steps in which at least one request ran below full depth.",
    ),
    (
        "utio_vllm_model_steps",
        "vllm_model_steps",
        "Steps run by vLLM's own (compiled) model: nothing to skip, restrict or observe.",
    ),
    (
        "utio_routing_declined_steps",
        "routing_declined_steps",
        "Steps with a routable row that vLLM's model ran unrouted: routed steps of that "
        "size had run slower per token, or the model was re-measured (router 'probe', "
        "routing_payoff 'measured').",
    ),
    (
        "utio_layer_tokens_run",
        "layer_tokens_run",
        "Decoder-layer x token products actually computed.",
    ),
    (
        "utio_layer_tokens_full",
        "layer_tokens_full",
        "Decoder-layer x token products full depth would have computed.",
    ),
    (
        "utio_layer_tokens_saved",
        "layer_tokens_saved",
        "Decoder-layer x token products skipped (full minus run).",
    ),
    (
        "utio_kv_fill_layer_tokens",
        "kv_fill_layer_tokens",
        "Layer x token K/V entries written for skipped layers.",
    ),
    (
        "utio_routing_seconds",
        "routing_s",
        "Time in UTIO routing: signals, router, bucketing, batch reorder.",
    ),
    (
        "utio_metadata_seconds",
        "metadata_s",
        "Time building attention metadata for UTIO sub-batches.",
    ),
    (
        "utio_forward_seconds",
        "forward_s",
        "Time in the forward (UTIO layer loop or vLLM's model), excluding sub-batch "
        "metadata builds.",
    ),
    (
        "utio_kv_tokens_read",
        "kv_tokens_read",
        "Cached positions decode tokens attended to (per layer on average).",
    ),
    (
        "utio_kv_tokens_dense",
        "kv_tokens_dense",
        "Cached positions dense attention would have read for the same decode tokens.",
    ),
    (
        "utio_select_seconds",
        "select_s",
        "Time choosing KV blocks for policy 'select': bounds, top-k, per-layer metadata.",
    ),
    (
        "utio_select_choices",
        "select_choices",
        "Layers that chose KV blocks afresh for policy 'select' (per sub-batch and step).",
    ),
    (
        "utio_select_rows_reused",
        "select_rows_reused",
        "Rows whose layer read its last choice again for policy 'select' "
        "(select_every_steps), per choosing layer and step.",
    ),
    (
        "utio_select_rows_focused",
        "select_rows_focused",
        "Rows that chose KV blocks off their select_every_steps turn because a recent "
        "choice found a far block holding a head's attention (focus_mass).",
    ),
    (
        "utio_select_kernel_calls",
        "select_kernel_calls",
        "Attention calls of sub-batches of 'select' rows run by UTIO's own decode kernel.",
    ),
    (
        "utio_decode_kernel_calls",
        "decode_kernel_calls",
        "Attention calls run by UTIO's decode kernel under decode_kernel 'utio'.",
    ),
    (
        "utio_summary_seconds",
        "summary_s",
        "Time folding written keys into the block key summaries (policy 'select').",
    ),
)
# counters of self-speculation, served only by engines with 'speculate'
_SPEC_COUNTERS: tuple[tuple[str, str, str], ...] = (
    (
        "utio_spec_drafted_tokens",
        "spec_drafted_tokens",
        "Draft tokens UTIO self-speculation proposed ('speculate').",
    ),
    (
        "utio_spec_verified_tokens",
        "spec_verified_tokens",
        "Draft tokens vLLM's scheduler sent to verification.",
    ),
    (
        "utio_spec_accepted_tokens",
        "spec_accepted_tokens",
        "Draft tokens the verification kept (the full model's own choice).",
    ),
    (
        "utio_spec_verifications",
        "spec_verifications",
        "Request steps that verified at least one draft token.",
    ),
    (
        "utio_spec_declined_steps",
        "spec_declined_steps",
        "Steps the cost model would have drafted in but did not: steps that drafted had "
        "yielded tokens slower than steps that did not, or the latter were re-measured "
        "(speculate.payoff 'measured').",
    ),
    (
        "utio_spec_draft_seconds",
        "spec_draft_s",
        "Time in the draft forwards (all draft positions).",
    ),
)
# (metric name, stats key, help text): values that go up and down
_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("utio_summary_bytes", "summary_bytes", "Memory of the block key summaries ('select')."),
    ("utio_kv_huge_page_bytes", "kv_huge_page_bytes", "KV cache bytes on 2 MiB pages (CPU)."),
    (
        "utio_request_state_entries",
        "request_state_entries",
        "Requests for which UTIO keeps per-request state (signals, rankings, held blocks).",
    ),
)
# (metric name without "_total", per-level list key, help text); labelled by bucket name.
_PER_LEVEL: tuple[tuple[str, str, str], ...] = (
    ("utio_bucket_tokens", "tokens_per_level", "Tokens run at each depth level."),
    ("utio_bucket_rows", "rows_per_level", "Request rows run at each depth level, per step."),
)
# Optional stats keys for the bucket-size histogram: ascending upper bounds, and per
# level one non-cumulative count per bound plus a last overflow count.
HIST_BOUNDS_KEY = "bucket_size_bounds"
HIST_COUNTS_KEY = "bucket_size_counts"
# One UTIO collector per registry and process, even if the app (and plugin) is rebuilt.
_ACTIVE: weakref.WeakKeyDictionary[CollectorRegistry, UtioCollector] = weakref.WeakKeyDictionary()


def utio_metric_families(
    stats: Mapping[str, Any] | None,
    labels: Mapping[str, str] | None = None,
    fetch_failures: int = 0,
) -> list[Metric]:
    """Prometheus metric families for one ``utio_stats`` dict (None: not fetched yet)."""
    labels = dict(labels or {})
    names, values = list(labels), list(labels.values())
    failures = CounterMetricFamily(
        "utio_stats_fetch_failures",
        "Scrapes whose utio_stats RPC to the engine failed or timed out "
        "(the previous values were served).",
        labels=names,
    )
    failures.add_metric(values, fetch_failures)
    if stats is None:
        return [failures]
    families: list[Metric] = []
    for name, key, doc in _COUNTERS:
        family = CounterMetricFamily(name, doc, labels=names)
        family.add_metric(values, float(stats.get(key, 0)))
        families.append(family)
    for name, key, doc in _SPEC_COUNTERS:
        if key in stats:
            family = CounterMetricFamily(name, doc, labels=names)
            family.add_metric(values, float(stats[key]))
            families.append(family)
    for name, key, doc in _GAUGES:
        if key in stats:
            gauge = GaugeMetricFamily(name, doc, labels=names)
            gauge.add_metric(values, float(stats[key]))
            families.append(gauge)
    level_names = [str(n) for n in stats.get("level_names", [])]
    for name, key, doc in _PER_LEVEL:
        family = CounterMetricFamily(name, doc, labels=[*names, "bucket"])
        for level, count in zip(level_names, stats.get(key, []), strict=False):
            family.add_metric([*values, level], float(count))
        families.append(family)
    hist = _bucket_size_histogram(stats, names, values, level_names)
    if hist is not None:
        families.append(hist)
    families.append(failures)
    return families


def _bucket_size_histogram(
    stats: Mapping[str, Any], names: list[str], values: list[str], level_names: list[str]
) -> HistogramMetricFamily | None:
    bounds = stats.get(HIST_BOUNDS_KEY)
    counts = stats.get(HIST_COUNTS_KEY)
    if not bounds or not counts:
        return None
    family = HistogramMetricFamily(
        "utio_bucket_size",
        "Rows per depth level per UTIO step (steps where the level was empty not counted).",
        labels=[*names, "bucket"],
    )
    rows = stats.get("rows_per_level", [])
    for k, (level, per_bound) in enumerate(zip(level_names, counts, strict=False)):
        cumulative = list(accumulate(per_bound))
        buckets = [(floatToGoString(b), float(c)) for b, c in zip(bounds, cumulative, strict=False)]
        buckets.append(("+Inf", float(cumulative[-1] if cumulative else 0)))
        total_rows = float(rows[k]) if k < len(rows) else 0.0
        family.add_metric([*values, level], buckets, sum_value=total_rows)
    return family


def first_worker_stats(results: Sequence[Any]) -> Mapping[str, Any] | None:
    """The report of the first worker (TP ranks share one plan, so no sum over ranks)."""
    return next((r for r in results if isinstance(r, Mapping)), None)


class UtioStatsSource:
    """The latest worker totals, refreshed through ``EngineClient.collective_rpc``."""

    def __init__(self, timeout_s: float = FETCH_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self.engine_client: EngineClient | None = None
        self.stats: Mapping[str, Any] | None = None
        self.fetch_failures = 0
        self._inflight: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self.engine_client is not None

    async def refresh(self) -> None:
        """Fetch new totals; concurrent scrapes share one RPC, none waits past the timeout."""
        if self.engine_client is None:
            return
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.ensure_future(self._fetch(self.engine_client))
        # shield: a scraper that disconnects must not cancel the RPC others wait on.
        await asyncio.shield(self._inflight)

    async def _fetch(self, engine_client: EngineClient) -> None:
        try:
            results = await asyncio.wait_for(
                engine_client.collective_rpc(RPC_METHOD), timeout=self.timeout_s
            )
            stats = first_worker_stats(results or [])
            if stats is None:
                raise RuntimeError(f"{RPC_METHOD} returned no worker report: {results!r}")
        except Exception as err:  # /metrics must keep answering whatever the engine does
            self.fetch_failures += 1
            log = logger.warning if self.fetch_failures == 1 else logger.debug
            log("UTIO metrics: %s RPC failed (%r); serving previous values", RPC_METHOD, err)
            return
        self.stats = stats


class UtioCollector(Collector):
    """Renders the source's latest totals; never calls the engine itself."""

    def __init__(self, source: UtioStatsSource, labels: Mapping[str, str]) -> None:
        self.source = source
        self.labels = dict(labels)

    def collect(self) -> Iterable[Metric]:
        return utio_metric_families(self.source.stats, self.labels, self.source.fetch_failures)

    def describe(self) -> Iterable[Metric]:
        return []  # names depend on nothing; avoids a collect() at registration


class RefreshOnScrape:
    """ASGI middleware: refresh the UTIO totals before ``/metrics`` is rendered."""

    def __init__(self, app: ASGIApp, source: UtioStatsSource) -> None:
        self.app = app
        self.source = source

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.source.enabled and _is_metrics_path(scope):
            await self.source.refresh()
        await self.app(scope, receive, send)


def _is_metrics_path(scope: Scope) -> bool:
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return path == METRICS_PATH or path.startswith(METRICS_PATH + "/")


class UtioMetricsPlugin:
    """``vllm.endpoint_plugins`` entry point: UTIO counters on the existing ``/metrics``."""

    name = PLUGIN_NAME
    required_tasks = ("generate",)  # UTIO runs in generating engines; never on render

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        self.source = UtioStatsSource()
        self.collector: UtioCollector | None = None

    def attach_router(self, app: FastAPI) -> None:
        # Installed unconditionally (whether UTIO is on is known only in init_state);
        # it does nothing until a collector is registered.
        app.add_middleware(RefreshOnScrape, source=self.source)

    async def init_state(
        self, engine_client: EngineClient | None, state: State, args: Namespace
    ) -> None:
        if engine_client is None:
            return
        vllm_config = engine_client.vllm_config
        if not utio_config_from_additional(vllm_config.additional_config).enabled:
            logger.debug("UTIO metrics: UTIO is off for this engine; nothing registered")
            return
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            logger.warning(
                "UTIO metrics are not exported: with several API servers vLLM's /metrics "
                "renders only prometheus multiprocess files (use the utio_stats RPC instead)"
            )
            return
        labels = {"model_name": str(vllm_config.model_config.served_model_name)}
        previous = _ACTIVE.pop(self.registry, None)
        if previous is not None:
            previous.source.engine_client = None
            self.registry.unregister(previous)
        self.collector = _ACTIVE[self.registry] = UtioCollector(self.source, labels)
        self.registry.register(self.collector)
        self.source.engine_client = engine_client
        logger.info("UTIO metrics: exporting utio_* counters on %s", METRICS_PATH)

    def unregister(self) -> None:
        """Remove this plugin's collector (tests; a rebuilt app in the same process)."""
        self.source.engine_client = None
        if self.collector is not None:
            if _ACTIVE.get(self.registry) is self.collector:
                del _ACTIVE[self.registry]
            self.registry.unregister(self.collector)
            self.collector = None
