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
