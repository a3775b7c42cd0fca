"""UTIO Prometheus metrics without a server: formatting, scrape-time refresh, UTIO off."""

from __future__ import annotations

import asyncio
from argparse import Namespace
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, generate_latest, make_asgi_app
from prometheus_client.parser import text_string_to_metric_families
from starlette.datastructures import State
from starlette.routing import Mount

from vllm_utio.integration import metrics
from vllm_utio.stats import UtioStats


def _stats() -> dict[str, Any]:
    stats = UtioStats.for_levels(["full", "shallow"])
    stats.record_step([1, 3], [10, 3], (10 * 30 + 3 * 24, 13 * 30), 3 * 6)
    stats.record_step([2, 0], [2, 0], (2 * 30, 2 * 30), 0)
    stats.routing_s, stats.metadata_s, stats.forward_s = 0.25, 0.125, 1.5
    return stats.as_dict()


def _render(stats: dict[str, Any] | None, failures: int = 0) -> str:
    source = metrics.UtioStatsSource()
    source.stats, source.fetch_failures = stats, failures
    registry = CollectorRegistry()
    registry.register(metrics.UtioCollector(source, {"model_name": "m"}))
    return generate_latest(registry).decode()


def _samples(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            extra = {k: v for k, v in s.labels.items() if k != "model_name"}
            key = s.name + "".join(f"[{k}={v}]" for k, v in sorted(extra.items()))
            out[key] = s.value
    return out


def test_every_counter_reads_a_real_stats_key() -> None:
    keys = set(UtioStats.for_levels(["full"]).as_dict())
    for _, key, _ in metrics._COUNTERS + metrics._PER_LEVEL:
        assert key in keys, key
    from vllm_utio.speculation import SpeculationStats

    spec = set(SpeculationStats().as_dict())
    for _, key, _ in metrics._SPEC_COUNTERS:
        assert key in spec, key


def test_formatting_from_stats_dict() -> None:
    text = _render(_stats(), failures=2)
    assert "# TYPE utio_layer_tokens_saved_total counter" in text
    assert 'utio_bucket_tokens_total{bucket="shallow",model_name="m"} 3.0' in text
    samples = _samples(text)
    # the real stats carry the bucket-size histogram: full saw sizes 1 and 2, shallow 3
    assert samples["utio_bucket_size_bucket[bucket=full][le=1.0]"] == 1
    assert samples["utio_bucket_size_bucket[bucket=full][le=2.0]"] == 2
    assert samples["utio_bucket_size_bucket[bucket=shallow][le=2.0]"] == 0
    assert samples["utio_bucket_size_bucket[bucket=shallow][le=4.0]"] == 1
    assert samples["utio_bucket_size_sum[bucket=shallow]"] == 3
    assert {k: v for k, v in samples.items() if not k.startswith("utio_bucket_size")} == {
        "utio_steps_total": 2,
        "utio_routed_steps_total": 1,
        "utio_vllm_model_steps_total": 0,
        "utio_routing_declined_steps_total": 0,
        "utio_layer_tokens_run_total": 432,
        "utio_layer_tokens_full_total": 450,
        "utio_layer_tokens_saved_total": 18,
        "utio_kv_fill_layer_tokens_total": 18,
        "utio_routing_seconds_total": 0.25,
        "utio_metadata_seconds_total": 0.125,
        "utio_forward_seconds_total": 1.5,
        "utio_kv_tokens_read_total": 0,
        "utio_kv_tokens_dense_total": 0,
        "utio_select_seconds_total": 0,
        "utio_select_choices_total": 0,
        "utio_select_rows_reused_total": 0,
        "utio_select_rows_focused_total": 0,
        "utio_select_kernel_calls_total": 0,
        "utio_decode_kernel_calls_total": 0,
        "utio_summary_seconds_total": 0,
        "utio_bucket_tokens_total[bucket=full]": 12,
        "utio_bucket_tokens_total[bucket=shallow]": 3,
        "utio_bucket_rows_total[bucket=full]": 3,
        "utio_bucket_rows_total[bucket=shallow]": 3,
        "utio_stats_fetch_failures_total": 2,
    }


def test_summary_memory_is_a_gauge() -> None:
    text = _render({**_stats(), "summary_bytes": 4096, "request_state_entries": 3})
    assert "# TYPE utio_summary_bytes gauge" in text
    assert _samples(text)["utio_summary_bytes"] == 4096
    assert "# TYPE utio_request_state_entries gauge" in text
    assert _samples(text)["utio_request_state_entries"] == 3


def test_not_fetched_yet_shows_only_failures() -> None:
    assert _samples(_render(None, failures=1)) == {"utio_stats_fetch_failures_total": 1}


def test_bucket_size_histogram_when_stats_carry_it() -> None:
    stats = _stats()
    # Bounds 1, 2, 4 (+Inf); "full" saw sizes 1 and 2, "shallow" saw 3.
    stats[metrics.HIST_BOUNDS_KEY] = [1, 2, 4]
    stats[metrics.HIST_COUNTS_KEY] = [[1, 1, 0, 0], [0, 0, 1, 0]]
    got = _samples(_render(stats))
    assert got["utio_bucket_size_bucket[bucket=full][le=1.0]"] == 1
    assert got["utio_bucket_size_bucket[bucket=full][le=2.0]"] == 2
    assert got["utio_bucket_size_bucket[bucket=full][le=+Inf]"] == 2
    assert got["utio_bucket_size_count[bucket=full]"] == 2
    assert got["utio_bucket_size_sum[bucket=full]"] == 3
    assert got["utio_bucket_size_bucket[bucket=shallow][le=2.0]"] == 0
    assert got["utio_bucket_size_bucket[bucket=shallow][le=4.0]"] == 1
    without = {
        k: v
        for k, v in _stats().items()
        if k not in (metrics.HIST_BOUNDS_KEY, metrics.HIST_COUNTS_KEY)
    }
    assert "utio_bucket_size_count" not in _render(without)


def test_first_worker_reported() -> None:
    assert metrics.first_worker_stats([{"steps": 1}, {"steps": 1}]) == {"steps": 1}
    assert metrics.first_worker_stats([None]) is None


class FakeEngine:
    """The slice of EngineClient the plugin uses; returns scripted worker reports."""

    def __init__(self, utio: dict[str, Any] | None, reports: list[Any]) -> None:
        additional = {"utio": utio} if utio is not None else None
        self.vllm_config = SimpleNamespace(
            additional_config=additional, model_config=SimpleNamespace(served_model_name="m")
        )
        self.reports = reports
        self.calls: list[str] = []

    async def collective_rpc(self, method: str, timeout: float | None = None, **_: Any):
        self.calls.append(method)
        report = self.reports.pop(0)
        if isinstance(report, BaseException):
            raise report
        if report == "hang":
            await asyncio.sleep(60)
        return [report]


def _server(engine: FakeEngine, timeout_s: float = 5.0):
    """A FastAPI app serving /metrics like vLLM's single API server, with the plugin."""
    registry = CollectorRegistry()
    app = FastAPI()
    app.routes.append(Mount("/metrics", make_asgi_app(registry=registry)))
    plugin = metrics.UtioMetricsPlugin(registry=registry)
    plugin.source.timeout_s = timeout_s
    plugin.attach_router(app)
    asyncio.run(plugin.init_state(engine, State(), Namespace()))  # type: ignore[arg-type]
    return TestClient(app), plugin


def _scrape(client: TestClient) -> dict[str, float]:
    resp = client.get("/metrics/")
    assert resp.status_code == 200
    return {k: v for k, v in _samples(resp.text).items() if k.startswith("utio_")}


def test_scrape_fetches_fresh_worker_stats() -> None:
    first = _stats()
    second = dict(first, steps=5)
    engine = FakeEngine({"enabled": True}, [first, second, RuntimeError("engine dead")])
    client, plugin = _server(engine)
    try:
        assert _scrape(client)["utio_steps_total"] == 2
        assert _scrape(client)["utio_steps_total"] == 5  # one RPC per scrape
        failed = _scrape(client)  # the RPC fails: previous values, failure counted
        assert failed["utio_steps_total"] == 5
        assert failed["utio_stats_fetch_failures_total"] == 1
        assert engine.calls == ["utio_stats"] * 3
        assert client.get("/health").status_code == 404  # other paths: no RPC
        assert len(engine.calls) == 3
    finally:
        plugin.unregister()


def test_scrape_never_hangs_on_the_engine() -> None:
    engine = FakeEngine({"enabled": True}, ["hang"])
    client, plugin = _server(engine, timeout_s=0.2)
    try:
        got = _scrape(client)
        assert got == {"utio_stats_fetch_failures_total": 1}
    finally:
        plugin.unregister()


@pytest.mark.parametrize("utio", [None, {"enabled": False, "buckets": []}])
def test_utio_off_exports_nothing(utio: dict[str, Any] | None) -> None:
    engine = FakeEngine(utio, [])
    client, plugin = _server(engine)
    assert plugin.collector is None
    assert _scrape(client) == {}
    assert engine.calls == []


def test_render_server_without_engine_is_a_no_op() -> None:
    plugin = metrics.UtioMetricsPlugin(registry=CollectorRegistry())
    asyncio.run(plugin.init_state(None, State(), Namespace()))
    assert plugin.collector is None and not plugin.source.enabled
