"""The measurement harness itself: results schema, report rendering, and a --quick run
on real engines (so the harness cannot rot)."""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import jsonschema
import pytest

from vllm_utio.benchmarking import report, results, suite

SAMPLE = Path(__file__).parent / "data" / "bench_quick_sample.json"


def test_schema_round_trip(tmp_path):
    data = results.load(SAMPLE)
    out = results.save(data, tmp_path / "r.json")
    assert results.load(out) == data
    broken = copy.deepcopy(data)
    del broken["summary"][0]["step_ms"]
    with pytest.raises(jsonschema.ValidationError):
        results.save(broken, tmp_path / "bad.json")
    wrong_id = {**data, "schema": "something-else/9"}
    with pytest.raises(jsonschema.ValidationError):
        results.validate(wrong_id)


def test_report_renders_tables_and_plots(tmp_path):
    data = results.load(SAMPLE)
    data["quality"] = {"utio-skip6": {"ppl_delta": 0.31, "greedy_agreement": 0.42}}
    path = report.render(data, tmp_path)
    text = path.read_text()
    assert "| utio-skip6 | 4 | 16 |" in text
    assert "+31.0%" in text and "42.0%" in text  # quality next to speed
    assert (tmp_path / "throughput.png").stat().st_size > 5000
    assert (tmp_path / "pareto.png").stat().st_size > 5000
    # speedups are computed against vanilla at the same shape
    ups = report.speedups(data)
    assert ups[("vanilla", 4, 16)] == pytest.approx(1.0)


def test_summary_statistics():
    from vllm_utio.benchmarking.offline import summarize

    base = {"batch": 8, "prompt_len": 64, "wall_s": 1.0, "e2e_tok_s": 10.0, "utio": None}
    samples = [
        {**base, "config": "a", "repeat": r, "decode_tok_s": v, "step_ms": 1000 / v}
        for r, v in enumerate([100.0, 300.0, 200.0])
    ]
    (row,) = summarize(samples)
    assert row["decode_tok_s"] == 200.0
    assert (row["decode_tok_s_min"], row["decode_tok_s_max"]) == (100.0, 300.0)
    assert row["n"] == 3 and row["saved_fraction"] is None


def test_engines_prefill_in_chunks():
    """A step holds at most PREFILL_CHUNK_TOKENS (a 128 x 512-token prefill in one step
    peaked at 4.4 GB per engine), never less than one request of max_len, nor 2048."""
    big = suite.engine_kwargs(max_batch=128, max_len=576, eager=False)
    assert big["max_num_batched_tokens"] == suite.PREFILL_CHUNK_TOKENS
    small = suite.engine_kwargs(max_batch=1, max_len=80, eager=False)
    assert small["max_num_batched_tokens"] == 2048  # small engines keep a 2048 floor
    long = suite.engine_kwargs(max_batch=1, max_len=9000, eager=False)
    assert long["max_num_batched_tokens"] == 9000


def test_every_bench_config_names_a_valid_engine():
    """Each configuration's engine exists and UTIO accepts its config; the kernel variants
    differ from their twins by the decode kernel alone."""
    from vllm_utio.config import parse_utio_config

    specs = suite.engines(quick=False, artifact="default")
    for cfg in suite.configs(quick=False) + suite.artifact_configs():
        spec = specs[cfg.engine]
        if spec.utio is not None:
            parse_utio_config(spec.utio)  # raises on a config UTIO rejects
    pairs = [("utio-forced", "utio-forced-kernel"), ("utio-calibrated", "utio-calibrated-kernel")]
    for plain, kernel in pairs:
        assert specs[kernel].utio == {**specs[plain].utio, "decode_kernel": "utio"}


@pytest.mark.engine
def test_quick_benchmark_runs_end_to_end(tmp_path):
    parser = argparse.ArgumentParser()
    suite.add_arguments(parser)
    args = parser.parse_args(["--quick", "--eager", "-o", str(tmp_path / "quick.json")])
    assert suite.run(args) == 0
    data = results.load(tmp_path / "quick.json")
    names = {r["config"] for r in data["summary"]}
    assert names == {"vanilla", "utio-full", "utio-skip6"}
    by_name = {(r["config"], r["batch"]): r for r in data["summary"]}
    assert by_name[("utio-full", 4)]["saved_fraction"] == 0.0
    # skip6 pins every decode token to a plan that skips 6 of 30 layers
    assert 0.05 < by_name[("utio-skip6", 4)]["saved_fraction"] <= 0.2
    assert all(r["decode_tok_s"] > 0 for r in data["summary"])
    report.render(data, tmp_path / "report")
    assert json.loads((tmp_path / "quick.json").read_text())["settings"]["quick"] is True


@pytest.mark.server
def test_quick_serving_benchmark(tmp_path):
    from vllm_utio.benchmarking import serving_suite

    parser = argparse.ArgumentParser()
    serving_suite.add_arguments(parser)
    out = tmp_path / "serving.json"
    args = parser.parse_args(["--quick", "--eager", "-o", str(out)])
    assert serving_suite.run(args) == 0
    data = results.load(out)
    runs = data["serving"]["runs"]
    assert {(r["server"], r["concurrency"]) for r in runs} == {
        (s, c) for s in ("vanilla", "utio-surrogate") for c in (1, 4)
    }
    for r in runs:
        assert r["failed"] == 0, r["errors"]
        assert r["output_tok_s"] > 0 and r["ttft_ms_p50"] > 0 and r["itl_ms_p50"] > 0
        assert r["prompt_tokens_p50"] > 0  # the server's usage count reached the results
    text = report.render(data, tmp_path / "report").read_text()
    assert "## Serving" in text and (tmp_path / "report" / "latency.png").is_file()


def test_percentiles_and_request_summary():
    from vllm_utio.benchmarking.serving import RequestResult, summarize_requests

    reqs = [
        RequestResult(True, 0.1 * (i + 1), 1.0 + 0.1 * i, 10, [0.1] * 9, prompt_tokens=20 + i)
        for i in range(10)
    ]
    reqs.append(RequestResult(False, error="HTTP 500", prompt_tokens=999))
    row = summarize_requests(reqs, wall_s=2.0, concurrency=4)
    assert row["prompt_tokens_p50"] == 24 and row["prompt_tokens_mean"] == pytest.approx(24.5)
    assert row["failed"] == 1 and row["errors"] == ["HTTP 500"]
    assert row["output_tok_s"] == pytest.approx(50.0)
    assert row["ttft_ms_p50"] == pytest.approx(500.0)  # rank round(0.5 * 9) = 4 of 100..1000 ms
    assert row["itl_ms_p99"] == pytest.approx(100.0)


def test_attach_quality_maps_reports_to_configs():
    data = results.load(SAMPLE)

    def report(bucket, delta):
        return {
            "ppl_full": 10.0,
            "ppl_utio": 10.0 * (1 + delta),
            "ppl_delta": delta,
            "ppl_delta_ci": [delta - 0.1, delta + 0.1],
            "top1_agreement": 0.5,
            "greedy": {"token_agreement": 0.25},
            "scored_tokens": 100,
            "documents": 3,
            "routing": {"teacher_forced": {"saved_fraction": 0.2}},
            "extra_args": {"utio_bucket": bucket} if bucket else None,
        }

    out = {"reports": [report("skip6", 0.5), report(None, 0.1), report("other", 9.0)]}
    filled = results.attach_quality(data, out, {"skip6": "utio-skip6", "routed": "utio-full"})
    assert filled == ["utio-skip6", "utio-full"]
    assert data["quality"]["utio-skip6"]["ppl_delta"] == 0.5
    assert data["quality"]["utio-full"]["greedy_agreement"] == 0.25
    assert "other" not in data["quality"]
    results.validate(data)


def test_time_model_recovers_known_costs_and_predicts_speedups():
    """Step times made from known per-layer, per-row, per-token and fill costs: the fit
    recovers the identifiable ones and every step time, and the speed-up table compares
    each plan with full depth."""
    import numpy as np

    from vllm_utio.benchmarking.time_model import FEATURES, features, fit

    levels = [
        {"name": "full", "keep_first": 30, "keep_last": 0},
        {"name": "skip6", "keep_first": 13, "keep_last": 11},
        {"name": "skip2", "keep_first": 14, "keep_last": 14},
    ]
    true = np.array([3.0, 0.05, 0.3, 0.02, 0.01, 0.1, 0.004])
    configs = [
        {"name": name, "levels": levels, "num_layers": 30} for name in ("utio-full", "a", "b")
    ]
    mix = {"utio-full": [1.0, 0.0, 0.0], "a": [0.0, 1.0, 0.0], "b": [0.5, 0.0, 0.5]}
    samples = []
    for batch in (1, 8, 32, 128):
        for prompt in (64, 512):
            for name, share in mix.items():
                rows = [batch * f for f in share]
                x = features(rows, levels, 30, prompt + 32)
                steps = 64
                per_level = [r * steps for r in rows]
                per_level[0] += batch  # the prefill step counts every row at full depth
                utio = {"rows_per_level": per_level}
                samples.append(
                    {
                        "config": name,
                        "batch": batch,
                        "prompt_len": prompt,
                        "decode_steps": steps,
                        "utio": utio,
                        "step_ms": float(x @ true),
                    }
                )
    model = fit({"configs": configs, "samples": samples, "settings": {"output_len": 64}})
    got = dict(zip(FEATURES, true, strict=True))
    # per_row, layer_row and fill_row are collinear (each row runs or skips every layer),
    # so only the others are identifiable; predictions are exact either way
    for name in ("fixed", "layer", "layer_row_token", "fill"):
        assert model["coefficients_ms"][name] == pytest.approx(got[name], abs=1e-6)
    assert model["r2"] > 0.999999
    for row in model["table"]:
        assert row["predicted_step_ms"] == pytest.approx(row["measured_step_ms"], rel=1e-9)
    lines = report.speedup_section(model["table"])
    a_b1 = next(line for line in lines if line.startswith("| a | 1 | 64 |"))
    assert a_b1.endswith("| 100% |")  # measured equals predicted on exact data
