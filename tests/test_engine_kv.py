"""The paged-KV invariant: skipped layers hold frozen-state K/V, never zeros or stale data,
including in recycled blocks and when a later request reuses them via prefix caching."""

from __future__ import annotations

import pytest
from conftest import BUCKETS, model_path
from fill_check import fused_fill_tokens
from kv_check import kv_relative_errors, run_until

pytestmark = pytest.mark.engine

SHALLOW = (BUCKETS[0]["keep_first"], BUCKETS[0]["keep_last"])  # skips layers 12..19
# bf16 engine vs fp32 reference after up to 30 layers: a few percent. Stale or missing
# K/V would be off by ~100%; K/V of the wrong stream (full depth) by much more than this.
TOLERANCE = 0.06


def _params(bucket: str, max_tokens: int):
    from vllm import SamplingParams

    return SamplingParams(
        temperature=0.0, max_tokens=max_tokens, ignore_eos=True, extra_args={"utio_bucket": bucket}
    )


def test_skipped_layers_hold_frozen_state_kv(forced_llm):
    engine = forced_llm.llm_engine
    prompt = "The history of the river valley is long. " * 12
    fused_before = forced_llm.collective_rpc(fused_fill_tokens)[0]
    engine.add_request("kv-a", prompt, _params("shallow", 64))
    cached = run_until(engine, "kv-a", 40)
    # the skipped span's K/V came from the fused fill (one projection for all its layers)
    assert forced_llm.collective_rpc(fused_fill_tokens)[0] - fused_before >= 39
    prompt_len = len(forced_llm.get_tokenizer().encode(prompt))
    ranges = [(prompt_len, cached, *SHALLOW)]
    errors = forced_llm.collective_rpc(
        kv_relative_errors, args=("kv-a", model_path(), ranges, cached)
    )[0]
    # a wrong expectation must fail: the same positions as if they had run full depth
    full_ranges = [(prompt_len, cached, 30, 0)]
    wrong = forced_llm.collective_rpc(
        kv_relative_errors, args=("kv-a", model_path(), full_ranges, cached)
    )[0]
    print("frozen-state reference errors per layer:", errors)
    print("full-depth (wrong) reference errors per layer:", wrong)
    engine.abort_request(["kv-a"])
    while engine.has_unfinished_requests():
        engine.step()
    assert max(errors["all"]) < TOLERANCE, errors["all"]
    assert max(errors["range1"]) < TOLERANCE, errors["range1"]
    skipped = range(SHALLOW[0] + 1, 30 - SHALLOW[1])  # layers whose input differs from full
    assert min(wrong["range1"][layer] for layer in skipped) > 3 * TOLERANCE, wrong["range1"]


def test_prefix_cache_hit_reads_frozen_state_kv(forced_llm):
    """A full-depth request reusing blocks a shallow request filled sees valid K/V."""
    from vllm import SamplingParams

    prompt = "A note on the weather in the mountain villages. " * 30
    tok = forced_llm.get_tokenizer()
    prompt_ids = tok.encode(prompt)
    fused_before = forced_llm.collective_rpc(fused_fill_tokens)[0]
    first = forced_llm.generate(
        [{"prompt_token_ids": prompt_ids}], _params("shallow", 200), use_tqdm=False
    )[0]
    assert forced_llm.collective_rpc(fused_fill_tokens)[0] - fused_before >= 199
    generated = list(first.outputs[0].token_ids)
    continuation = prompt_ids + generated[:180]
    engine = forced_llm.llm_engine
    engine.add_request(
        "kv-b",
        {"prompt_token_ids": continuation},
        SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
    )
    num_cached_prefix = None
    for _ in range(200):
        outs = engine.step()
        hit = [o for o in outs if o.request_id == "kv-b"]
        if hit:
            num_cached_prefix = hit[0].num_cached_tokens
            n_out = len(hit[0].outputs[0].token_ids)
            if n_out >= 4:
                break
    cached = len(continuation) + n_out - 1
    p = len(prompt_ids)
    assert num_cached_prefix is not None and num_cached_prefix > p + 64, (
        f"expected a prefix-cache hit past the prompt ({p}), got {num_cached_prefix}"
    )
    # positions p.. that came from the cache were written by the shallow request
    ranges = [(p, num_cached_prefix, *SHALLOW)]
    errors = forced_llm.collective_rpc(
        kv_relative_errors, args=("kv-b", model_path(), ranges, cached)
    )[0]
    engine.abort_request(["kv-b"])
    while engine.has_unfinished_requests():
        engine.step()
    assert max(errors["all"]) < TOLERANCE, errors["all"]
