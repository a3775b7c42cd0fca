"""Adaptive depth on real vLLM: forced routing, stats, gather/scatter, per-bucket schedule,
chunked prefill mixed with decodes, preemption and aborted requests."""

from __future__ import annotations

import pytest
from conftest import BUCKETS, KV_BLOCK_BYTES, NUM_LAYERS, make_llm, shutdown
from prompts import PROMPTS
from test_engine_foundation import MAX_TOKENS, greedy

pytestmark = pytest.mark.engine

# shallow skips layers [12, 20), mid skips [14, 18)
SKIPPED = {"shallow": 8, "mid": 4, "full": 0}
CYCLE = ["shallow", "full", "mid"]
FORCED = [{"utio_bucket": CYCLE[i % 3]} for i in range(len(PROMPTS))]


def bucket_of(i: int) -> str:
    return CYCLE[i % 3]


@pytest.fixture(scope="module")
def forced_tokens(forced_llm):
    before = forced_llm.collective_rpc("utio_stats")[0]
    tokens = greedy(forced_llm, extra_args=FORCED)
    after = forced_llm.collective_rpc("utio_stats")[0]
    return tokens, before, after


def test_forced_routing_keeps_deep_rows_and_changes_shallow_rows(vanilla_llm, forced_tokens):
    tokens, _, _ = forced_tokens
    reference = greedy(vanilla_llm)
    assert all(len(t) == MAX_TOKENS for t in tokens)
    for i, (got, ref) in enumerate(zip(tokens, reference, strict=True)):
        if bucket_of(i) == "full":
            assert got == ref, f"full-depth row {i} changed under routing"
    changed = [
        i for i in range(len(tokens)) if bucket_of(i) != "full" and tokens[i] != reference[i]
    ]
    assert len(changed) >= 4, "skipping 4-8 middle layers should change some continuations"
    vocab = 49152
    assert all(0 <= t < vocab for row in tokens for t in row)


def test_stats_match_the_plan(forced_tokens):
    _, before, after = forced_tokens
    decode_steps = MAX_TOKENS - 1  # the first token comes from the (full-depth) prefill
    expected_saved = sum(SKIPPED[bucket_of(i)] * decode_steps for i in range(len(PROMPTS)))
    saved = after["layer_tokens_saved"] - before["layer_tokens_saved"]
    assert saved == expected_saved
    # frozen-state KV policy: every skipped layer-token still writes its K/V
    assert after["kv_fill_layer_tokens"] - before["kv_fill_layer_tokens"] == expected_saved
    rows = [a - b for a, b in zip(after["rows_per_level"], before["rows_per_level"], strict=True)]
    n_mid = sum(bucket_of(i) == "mid" for i in range(len(PROMPTS)))
    n_shallow = sum(bucket_of(i) == "shallow" for i in range(len(PROMPTS)))
    assert after["level_names"] == ["full", "mid", "shallow"]
    assert rows[1:] == [n_mid * decode_steps, n_shallow * decode_steps]
    assert (after["layer_tokens_full"] - before["layer_tokens_full"]) % NUM_LAYERS == 0


@pytest.mark.parametrize(
    "variant",
    [{"execution": "gather"}, {"schedule": "per_bucket"}],
    ids=["gather-scatter", "per-bucket-schedule"],
)
def test_alternative_paths_match_prefix_path(variant, forced_tokens):
    llm = make_llm({"enabled": True, "router": "forced", "buckets": BUCKETS, **variant})
    try:
        tokens = greedy(llm, extra_args=FORCED)
        stats = llm.collective_rpc("utio_stats")[0]
    finally:
        shutdown(llm)
    assert tokens == forced_tokens[0]
    decode_steps = MAX_TOKENS - 1
    expected = sum(SKIPPED[bucket_of(i)] * decode_steps for i in range(len(PROMPTS)))
    assert stats["layer_tokens_saved"] == expected


def test_aborted_requests_and_continuing_batch(forced_llm):
    from vllm import SamplingParams

    engine = forced_llm.llm_engine
    ids = [f"abort-test-{i}" for i in range(4)]
    for i, rid in enumerate(ids):
        params = SamplingParams(
            temperature=0.0,
            max_tokens=20,
            ignore_eos=True,
            extra_args={"utio_bucket": CYCLE[i % 3]},
        )
        engine.add_request(rid, PROMPTS[i], params)
    finished: dict[str, list[int]] = {}
    steps = 0
    while engine.has_unfinished_requests() and steps < 200:
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = list(out.outputs[0].token_ids)
        steps += 1
        if steps == 6:
            engine.abort_request([ids[0], ids[2]])  # a shallow and a mid request
    assert not engine.has_unfinished_requests()
    assert set(finished) >= {ids[1], ids[3]}
    assert len(finished[ids[1]]) == 20 and len(finished[ids[3]]) == 20
    # the engine still serves normally afterwards
    assert all(len(t) == MAX_TOKENS for t in greedy(forced_llm, PROMPTS[:3], FORCED[:3]))


def test_preemption_with_tiny_kv_cache():
    # ~10 KV blocks of 128 tokens for 6 requests of ~3 blocks each: the scheduler must
    # preempt and recompute; routed requests must still finish correctly.
    llm = make_llm(
        {"enabled": True, "router": "forced", "buckets": BUCKETS},
        kv_cache_memory_bytes=10 * KV_BLOCK_BYTES,
        max_model_len=512,
        disable_log_stats=False,
    )
    try:
        prompts = [" ".join([f"Item {i}: a short note about the weather."] * 20) for i in range(6)]
        extra = [{"utio_bucket": CYCLE[i % 3]} for i in range(6)]
        tokens = greedy(llm, prompts, extra, max_tokens=150)
        stats = llm.collective_rpc("utio_stats")[0]
        metrics = {m.name: m for m in llm.get_metrics()}
    finally:
        shutdown(llm)
    assert all(len(t) == 150 for t in tokens)
    preemptions = metrics["vllm:num_preemptions"].value
    assert preemptions > 0, "the test did not provoke preemption"
    assert stats["layer_tokens_saved"] > 0
    assert stats["kv_fill_layer_tokens"] == stats["layer_tokens_saved"]
