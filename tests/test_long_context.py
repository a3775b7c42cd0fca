"""Long-context tools (``bench-long``, ``eval-long``): inputs, policy list, report, and one
``--quick`` run of each on real engines.

The quick runs share three engines (vanilla, the forced engine with one full-depth bucket
per policy, the routed-throttle engine), built once here with the settings both tools
need (forcing processor, attention timer): the tools accept ready engines.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import pytest
from conftest import NUM_LAYERS, model_path, shutdown

from vllm_utio.benchmarking import long_context, report, results
from vllm_utio.benchmarking import long_policies as lp
from vllm_utio.config import parse_utio_config
from vllm_utio.evaluation import long_cli
from vllm_utio.evaluation.long_quality import long_windows
from vllm_utio.evaluation.retrieval import KINDS, wilson_interval
from vllm_utio.integration import attention_timer

# --------------------------------------------------------------------------- no engine


def test_prompts_reuse_prefixes_across_batches_and_lengths():
    ids = list(range(10_000))
    big = long_context.long_prompts(ids, 4, 1000, max_batch=4, max_length=1000)
    small = long_context.long_prompts(ids, 2, 500, max_batch=4, max_length=1000)
    assert all(len(p["prompt_token_ids"]) == 1000 for p in big)
    assert len({p["prompt_token_ids"][0] for p in big}) == 4  # distinct requests
    for s, b in zip(small, big, strict=False):  # prompt i: same start, any batch or length
        assert s["prompt_token_ids"] == b["prompt_token_ids"][:500]


def test_long_windows_force_the_tail():
    ids = list(range(1000))
    windows = long_windows(ids, 300, 40, count=5, prefix=[7])
    assert len(windows) == 3  # 999 // 299 documents fit
    w = windows[1]
    assert len(w.tokens) == 300 and w.tokens[0] == 7 and w.prompt_len == 260
    assert w.tokens[1:3] == (299, 300)  # consecutive, non-overlapping
    assert len(w.continuation) == 40


def test_policy_list_is_data_and_guarded():
    ok, notes = lp.available({**lp.POLICIES, "future": {"policy": "not-yet-a-policy"}})
    assert "future" not in ok and any("'future' skipped" in n for n in notes)
    assert "throttle" in ok
    policies = lp.parse_policy_args(
        ["throttle", 'wide={"policy": "throttle", "recent_tokens": 2048}']
    )
    assert policies["wide"]["recent_tokens"] == 2048
    engines = lp.engine_configs(policies, ["throttle"], NUM_LAYERS, 0.12)
    assert engines["vanilla"] is None and set(engines) == {"vanilla", "utio", "routed-throttle"}
    for cfg in filter(None, engines.values()):
        parsed = parse_utio_config(cfg)
        parsed.check_against_model(NUM_LAYERS, block_size=128)
        # attention only: every bucket keeps every layer
        assert all(b.keep_first == NUM_LAYERS and not b.skipped(NUM_LAYERS) for b in parsed.buckets)
    # every built-in policy is valid at the tools' block sizes (sinks in whole blocks)
    for block_size in (32, lp.DEFAULT_BLOCK_SIZE):
        for cfg in filter(None, lp.engine_configs(lp.POLICIES, [], NUM_LAYERS, 0.12).values()):
            parse_utio_config(cfg).check_against_model(NUM_LAYERS, block_size=block_size)
    names = [c.name for c in lp.cases(policies, ["throttle"], 0.12)]
    assert names == ["vanilla", "utio-dense", "throttle-all", "wide-all", "throttle-routed"]


def test_routed_low_high_is_an_importance_scaled_budget():
    """``--routed LOW+HIGH``: one surrogate engine whose low-score tokens get LOW and
    every other token HIGH (no dense level reached); unknown or 3-part names are skipped."""
    policies = lp.parse_policy_args(["sparq512", "sparq1024"])
    routed, notes = lp.routable(
        ["sparq512+sparq1024", "sparq512+nope", "a+b+c", "sparq512"], policies
    )
    assert routed == ["sparq512+sparq1024", "sparq512"] and len(notes) == 2
    engines = lp.engine_configs(policies, routed, NUM_LAYERS, 0.12)
    cfg = parse_utio_config(engines["routed-sparq512+sparq1024"])
    cfg.check_against_model(NUM_LAYERS, block_size=32)
    low, high = cfg.buckets
    assert (low.max_score, low.attention.budget_tokens) == (0.12, 512)
    assert (high.max_score, high.attention.budget_tokens) == (1.0, 1024)
    assert len(parse_utio_config(engines["routed-sparq512"]).buckets) == 1
    case = lp.cases(policies, routed, 0.12)[-2]
    assert case.name == "sparq512+sparq1024-routed" and "the others select" in case.description


def test_small_pages_cases_rerun_the_forced_engine_on_4k_pages():
    """``--small-pages``: one more engine, the forced one with ``kv_huge_pages`` off, and
    UTIO dense and every policy again on it (routed cases are not repeated)."""
    policies = lp.parse_policy_args(["throttle"])
    engines = lp.engine_configs(policies, ["throttle"], NUM_LAYERS, 0.12, small_pages=True)
    small = parse_utio_config(engines[lp.SMALL_PAGES])
    assert not small.kv_huge_pages and parse_utio_config(engines["utio"]).kv_huge_pages
    assert {**engines[lp.SMALL_PAGES], "kv_huge_pages": True} == {
        **engines["utio"],
        "kv_huge_pages": True,
    }
    cases = lp.cases(policies, ["throttle"], 0.12, small_pages=True)
    extra = [(c.name, c.engine, c.pin) for c in cases if c.engine == lp.SMALL_PAGES]
    assert extra == [
        ("utio-dense-small-pages", lp.SMALL_PAGES, None),
        ("throttle-all-small-pages", lp.SMALL_PAGES, "throttle"),
    ]


def test_engine_dtype_follows_the_cpu():
    import torch

    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert lp.resolve_dtype("auto") == ("bfloat16" if native else "float32")
    assert lp.resolve_dtype("float32") == "float32"
    assert lp.run_dtype("auto", None) == lp.resolve_dtype("auto")  # no engines yet
    model = model_path()
    assert lp.kv_bytes_per_token(model, "float32") == 2 * lp.kv_bytes_per_token(model)
    assert lp.engine_kwargs(1024, 4, 1 << 28, True, dtype="float32")["dtype"] == "float32"
    args = _args(long_context, ["--dtype", "float32", "--batch-sizes", "2"])
    fp32 = long_context.plan(args, model)["kv_bytes"]
    args = _args(long_context, ["--dtype", "bfloat16", "--batch-sizes", "2"])
    assert fp32 == pytest.approx(2 * long_context.plan(args, model)["kv_bytes"], rel=1e-6)


def _quality_row(config: str, by_kind: dict[str, tuple[int, int]], vs: str) -> dict:
    kinds = {
        k: {"passed": p, "total": n, "rate": p / n, "ci": list(wilson_interval(p, n))}
        for k, (p, n) in by_kind.items()
    }
    passed, total = sum(p for p, _ in by_kind.values()), sum(n for _, n in by_kind.values())
    return {
        "context": 2048,
        "config": config,
        "ppl": 20.0,
        "ppl_delta": 0.01,
        "ppl_delta_ci": [0.0, 0.02],
        "top1_agreement": 0.99,
        "greedy_agreement": 0.9,
        "sparse_share": 1.0,
        "kv_read_fraction": 0.3,
        "retrieval_passed": passed,
        "retrieval_total": total,
        "retrieval_pass_rate": passed / total,
        "retrieval_ci": list(wilson_interval(passed, total)),
        "retrieval_by_kind": kinds,
        "retrieval_vs_dense": vs,
    }


def test_retrieval_rows_in_the_table_and_the_report():
    from vllm_utio.benchmarking import report_long

    rows = [
        _quality_row("utio-dense", {k: (10, 12) for k in KINDS}, "within"),
        _quality_row("throttle-all", {"single": (11, 12), "multikey": (2, 12)}, "below"),
    ]
    table = long_cli.format_table(rows).splitlines()
    assert "retrieval" in table[0] and all(k in table[0] for k in KINDS)
    assert table[1].split()[-6:] == ["40/48", "10/12", "10/12", "10/12", "10/12", "within"]
    assert table[2].split()[-6:] == ["13/24", "11/12", "2/12", "–", "–", "below"]
    lines = report_long.quality_sections({"long_quality": {"summary": rows, "notes": []}})
    text = "\n".join(lines)
    assert "| 2048 | utio-dense | 20.000 |" in text and "| 40/48 (70% .. 91%) |" in text
    assert (
        "| context | config | single | multikey | multivalue | copy | overall | vs dense |" in text
    )
    assert "| 2048 | throttle-all | 11/12 (65% .. 99%) | 2/12 (5% .. 45%) | – | – |" in text
    # results from before the retrieval kinds (needle keys) still render
    old = {k: v for k, v in rows[0].items() if not k.startswith("retrieval")}
    old |= {"needle_passed": 6, "needle_total": 6, "needle_ci": [1.0, 1.0]}
    text = "\n".join(report_long.quality_sections({"long_quality": {"summary": [old]}}))
    assert "| 6/6 (100% .. 100%) |" in text and "Retrieval by kind" not in text


def test_attention_ms_per_decode_step():
    before = {"decode_s": 1.0, "decode_calls": 60, "layers": 30}
    after = {"decode_s": 1.5, "decode_calls": 60 + 30 * 10, "layers": 30}
    assert attention_timer.decode_attention_ms(before, after) == pytest.approx(50.0)
    assert attention_timer.decode_attention_ms(after, after) is None


# --------------------------------------------------------------------------- engines


@pytest.fixture(scope="module")
def quick_engines():
    """The three engines of both quick runs, shared."""
    from vllm import LLM

    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")  # the forcing processor needs V1
    configs = lp.quick_engine_configs(NUM_LAYERS)
    llms = {}
    try:
        for key, utio in configs.items():
            kw = lp.engine_kwargs(1024, 4, 256 << 20, True, forcing=True, timing=True, utio=utio)
            llms[key] = LLM(model_path(), **kw)
        yield llms
    finally:
        for llm in llms.values():
            shutdown(llm)


def _args(module, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def bench_quick(quick_engines, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-long") / "long.json"
    args = _args(long_context, ["--quick", "--eager", "-o", str(out)])
    assert lp.quick_engine_configs(NUM_LAYERS) == long_context.plan(args, model_path())["engines"]
    assert long_context.run(args, llms=quick_engines) == 0
    return out


@pytest.mark.engine
def test_quick_bench_long(bench_quick, tmp_path):
    data = results.load(bench_quick)
    rows = {r["config"]: r for r in data["summary"]}
    policies = data["settings"]["policies"]
    assert set(rows) == {"vanilla", "utio-dense", "throttle-routed"} | {
        f"{p}-all" for p in policies
    }
    assert all(r["decode_tok_s"] > 0 and r["step_ms"] > 0 for r in rows.values())
    assert data["settings"]["dtype"] == "bfloat16"  # what the shared engines run in
    for r in rows.values():  # the attention kernel is timed in every engine, compiled or not
        assert 0.0 < r["attention_share"] < 1.0
    assert rows["utio-dense"]["kv_read_fraction"] == 1.0 and rows["utio-dense"]["sparse_share"] == 0
    # every decode token throttled: 1 sink block + the last block(s) of a 5-block context
    assert rows["throttle-all"]["sparse_share"] == 1.0
    assert rows["throttle-all"]["kv_read_fraction"] < 0.6
    assert rows["vanilla"]["kv_read_fraction"] is None
    text = report.render(data, tmp_path).read_text()
    assert "## Long-context decode" in text and "| 640 | 2 | throttle-all |" in text
    assert (tmp_path / "long_context.png").stat().st_size > 5000


@pytest.mark.engine
def test_quick_eval_long_attaches_to_bench(quick_engines, bench_quick, tmp_path):
    out = tmp_path / "long_quality.json"
    args = _args(long_cli, ["--quick", "--json", str(out), "--attach", str(bench_quick)])
    assert long_cli.run(args, llms=quick_engines) == 0
    import json

    data = json.loads(out.read_text())
    assert data["settings"]["dtype"] == "bfloat16"
    rows = {r["config"]: r for r in data["summary"]}
    # the same engine unpinned is dense full depth: identical to vanilla
    assert rows["utio-dense"]["ppl_delta"] == pytest.approx(0.0, abs=1e-9)
    assert rows["utio-dense"]["greedy_agreement"] == 1.0
    assert rows["throttle-all"]["sparse_share"] == 1.0
    assert rows["throttle-all"]["kv_read_fraction"] < 0.7
    assert rows["throttle-all"]["scored_tokens"] == 2 * 31  # 2 documents x (32 forced - 1)
    assert 0.0 <= rows["throttle-routed"]["sparse_share"] <= 1.0
    for r in rows.values():  # 4 retrieval cases, one of each kind
        assert r["retrieval_total"] == 4 and list(r["retrieval_by_kind"]) == list(KINDS)
        assert all(t["total"] == 1 for t in r["retrieval_by_kind"].values())
        assert 0.0 <= r["retrieval_ci"][0] <= r["retrieval_pass_rate"] <= r["retrieval_ci"][1]
        assert r["retrieval_vs_dense"] in ("within", "below")
    cases = data["details"]["640"]["cases"]
    # UTIO dense answers exactly like vanilla, and is its own reference
    assert cases["utio-dense"]["retrieval"] == cases["vanilla"]["retrieval"]
    assert rows["utio-dense"]["retrieval_vs_dense"] == "within"
    assert {c["kind"] for c in cases["vanilla"]["retrieval"]} == set(KINDS)
    prompts = data["details"]["640"]["retrieval"]
    assert all(p["length"] + p["answer_tokens"] == 640 for p in prompts)
    for r in rows.values():
        assert np.isfinite(r["ppl"]) and r["documents"] == 2
    merged = results.load(bench_quick)
    assert [r["config"] for r in merged["long_quality"]["summary"]] == list(rows)
    text = report.render(merged, tmp_path / "report").read_text()
    assert "## Long-context quality" in text and "| 640 | throttle-all |" in text
    assert "### Retrieval by kind" in text and "| context | config | single |" in text
