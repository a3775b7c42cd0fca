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
from vllm_utio.evaluation.long_quality import (
    fact_sentence,
    long_windows,
    make_needles,
    needle_answer,
    pass_rate,
)
from vllm_utio.integration import attention_timer

# --------------------------------------------------------------------------- no engine


class _Chars:
    """A tokenizer stand-in: one token per character, a two-part chat template."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True) -> str:
        return f"<user>{messages[0]['content']}</user><bot>"


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


def test_needles_have_exact_length_and_hold_the_fact():
    tok = _Chars()
    hay = tok.encode("lorem ipsum dolor sit amet " * 400)
    needles = make_needles(tok, hay, 2000, count=3, depth=0.25, seed=1)
    assert len({n.code for n in needles}) == 3 and len({n.subject for n in needles}) == 3
    for n in needles:
        text = tok.decode(n.tokens)
        assert len(n.tokens) == 2000
        assert text.startswith("<user>") and text.endswith(f"The secret code of the {n.subject} is")
        assert fact_sentence(n.subject, n.code) in text
        assert text.index(n.code) == pytest.approx(n.position + 1 + len(n.fact) - 5, abs=1)
        assert 0.2 < n.position / 2000 < 0.3
    assert needle_answer(" 8655.\n") == "8655" and needle_answer(" I don't know") is None
    r = pass_rate([True, True, False, True])
    assert r["passed"] == 3 and r["pass_rate"] == 0.75 and 0.0 <= r["ci"][0] <= r["ci"][1] <= 1.0


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
    names = [c.name for c in lp.cases(policies, ["throttle"], 0.12)]
    assert names == ["vanilla", "utio-dense", "throttle-all", "wide-all", "throttle-routed"]


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
    rows = {r["config"]: r for r in data["summary"]}
    # the same engine unpinned is dense full depth: identical to vanilla
    assert rows["utio-dense"]["ppl_delta"] == pytest.approx(0.0, abs=1e-9)
    assert rows["utio-dense"]["greedy_agreement"] == 1.0
    assert rows["throttle-all"]["sparse_share"] == 1.0
    assert rows["throttle-all"]["kv_read_fraction"] < 0.7
    assert rows["throttle-all"]["scored_tokens"] == 2 * 31  # 2 documents x (32 forced - 1)
    assert 0.0 <= rows["throttle-routed"]["sparse_share"] <= 1.0
    assert all(r["needle_total"] == 2 for r in rows.values())
    assert rows["vanilla"]["needle_passed"] == 2  # the fact sits in the sinks at 640 tokens
    for r in rows.values():
        assert np.isfinite(r["ppl"]) and r["documents"] == 2
    merged = results.load(bench_quick)
    assert [r["config"] for r in merged["long_quality"]["summary"]] == list(rows)
    text = report.render(merged, tmp_path / "report").read_text()
    assert "## Long-context quality" in text and "| 640 | throttle-all |" in text
