"""Self-speculation (``speculate``): UTIO drafts, vLLM's machinery verifies.

Real engines on the real model: greedy outputs equal vanilla vLLM's under each draft kind
(sparse attention + depth skip, query-aware selection, a draft so poor that nearly every
draft is rejected), batched with requests of other lengths; the K/V of every accepted
position is the full model's; sampling keeps the target distribution; counters and the
per-request state gauge behave.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
from conftest import BUCKETS, KV_BLOCK_BYTES, make_llm, model_path, shutdown
from kv_check import kv_relative_errors, run_until

pytestmark = pytest.mark.engine

THROTTLE = {"policy": "throttle", "sink_tokens": 128, "recent_tokens": 128}
SELECT = {
    "policy": "select",
    "sink_tokens": 0,
    "recent_tokens": 128,
    "budget_tokens": 256,
    "dense_layers": 2,
}
# bf16 engine vs fp32 reference after up to 30 layers: a few percent (test_engine_kv);
# a draft's K/V left at an accepted position would be off by far more in skipped layers
TOLERANCE = 0.06


def _spec(draft: dict, **extra) -> dict:
    return {
        "enabled": True,
        "router": "forced",
        "buckets": BUCKETS,
        "speculate": {"tokens": 4, "draft": draft, **extra},
    }


@pytest.fixture(scope="module")
def spec_llm():
    """Throttled attention and the 'shallow' depth plan in one draft; fixed draft count."""
    llm = make_llm(_spec({"attention": THROTTLE, "bucket": "shallow"}, adaptive=False))
    yield llm
    shutdown(llm)


def _prompts() -> list[str]:
    """Varied prompts: short questions, mid-length and ~600-token texts (over the
    throttle's window), so each batch mixes lengths."""
    base = [
        "The capital of France is",
        "Write a haiku about autumn leaves.",
        "def fibonacci(n):",
        "List three uses of copper:",
        "Once upon a time, in a small village by the sea,",
        "The main causes of the First World War were",
        "Translate to French: The weather is nice today.",
        "Q: What is 17 times 23? A:",
    ]
    story = (
        "The river valley was settled by farmers who built terraces on the slopes and "
        "channels to carry water from the springs. Over the centuries the villages grew "
        "into towns, and the towns traded grain, wool and timber along the river. "
    )
    mid = [f"{story * 3} Chapter {i}: In the year {1500 + 37 * i}," for i in range(6)]
    long = [f"{story * 12} Question {i}: what did the towns trade? Answer:" for i in range(6)]
    return base + mid + long


def _greedy(llm, prompts: list[str], max_tokens: int = 32) -> list[list[int]]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


def _stats(llm) -> dict:
    return llm.collective_rpc("utio_stats", kwargs={"reset": True})[0]


def _settled_stats(llm) -> dict:
    """Stats once the engine core has run the step that tells the runner which requests
    finished (it may answer the RPC just before that step)."""
    import time

    for _ in range(20):  # peek without resetting: a reset here would drop the counters
        peek = llm.collective_rpc("utio_stats", kwargs={"reset": False})[0]
        if peek["request_state_entries"] == 0:
            break
        time.sleep(0.1)
    return _stats(llm)


def _assert_identical(got: list[list[int]], want: list[list[int]]) -> None:
    bad = [i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b]
    assert not bad, f"outputs {bad} differ from vanilla: {[(got[i], want[i]) for i in bad]}"


def test_throttle_and_skip_draft_is_lossless(spec_llm, vanilla_llm):
    prompts = _prompts()
    assert len(prompts) >= 20
    _stats(spec_llm)
    got = _greedy(spec_llm, prompts)
    stats = _stats(spec_llm)
    _assert_identical(got, _greedy(vanilla_llm, prompts))
    print({k: v for k, v in stats.items() if k.startswith("spec_")})
    assert stats["spec_drafted_tokens"] > 0 and stats["spec_verifications"] > 0
    assert 0 < stats["spec_accepted_tokens"] < stats["spec_verified_tokens"]  # some rejected
    assert stats["spec_tokens_per_verification"] > 1.0
    # every step's drafts reached the scheduler on the step's own reply, none by the
    # separate RPC vLLM would otherwise make after each step (draft_handoff.py)
    from vllm_utio.integration.draft_handoff import SelfDraftExecutor

    backend = spec_llm.llm_engine.vllm_config.parallel_config.distributed_executor_backend
    assert backend is SelfDraftExecutor
    assert stats["spec_drafts_fetched"] == 0
    # the long prompts' drafts read fewer positions than dense attention would
    assert stats["spec_draft_kv_tokens_read"] < stats["spec_draft_kv_tokens_dense"]
    # nothing held once every request ended
    assert _settled_stats(spec_llm)["request_state_entries"] == 0
    # target steps never route below full depth, even with buckets configured
    assert stats["rows_per_level"][1:] == [0, 0]


def test_accepted_positions_hold_full_model_kv(spec_llm):
    """After verification every cached position's K/V at every layer is the full model's,
    though the drafts wrote shallow (frozen-state) K/V into the same slots first; an
    aborted request mid-speculation leaves no state behind."""
    from vllm import SamplingParams

    engine = spec_llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=80, ignore_eos=True)
    prompt = _prompts()[-1]
    _stats(spec_llm)
    engine.add_request("spec-kv", prompt, params)
    engine.add_request("spec-abort", _prompts()[9], params)
    cached = run_until(engine, "spec-kv", 40)
    engine.abort_request(["spec-abort"])
    errors = spec_llm.collective_rpc(
        kv_relative_errors, args=("spec-kv", model_path(), [], cached)
    )[0]
    stats = _stats(spec_llm)
    engine.abort_request(["spec-kv"])
    while engine.has_unfinished_requests():
        engine.step()
    # the runner hears of aborted requests with the next step's scheduler output
    _greedy(spec_llm, ["Hello"], 2)
    after = _settled_stats(spec_llm)
    print("full-model reference errors per layer:", errors["all"])
    assert stats["spec_accepted_tokens"] > 0
    assert max(errors["all"]) < TOLERANCE, errors["all"]
    assert after["request_state_entries"] == 0


def test_poor_draft_rejected_stays_lossless(vanilla_llm):
    """A one-layer draft: nearly every draft is rejected, the output is still vanilla's
    and the K/V of every position is the full model's."""
    buckets = [{"name": "one", "max_score": 0.5, "keep_first": 1, "keep_last": 0}]
    cfg = {
        "enabled": True,
        "router": "forced",
        "buckets": buckets,
        "speculate": {"tokens": 3, "adaptive": False, "draft": {"attention": {}, "bucket": "one"}},
    }
    llm = make_llm(cfg)
    try:
        prompts = _prompts()[::2]
        got = _greedy(llm, prompts, 24)
        stats = _stats(llm)
        _assert_identical(got, _greedy(vanilla_llm, prompts, 24))
        assert stats["spec_verified_tokens"] > 0
        assert stats["spec_acceptance_rate"] < 0.3, stats["spec_acceptance_rate"]
        from vllm import SamplingParams

        engine = llm.llm_engine
        engine.add_request("poor-kv", prompts[-1], SamplingParams(temperature=0.0, max_tokens=40))
        cached = run_until(engine, "poor-kv", 20)
        errors = llm.collective_rpc(kv_relative_errors, args=("poor-kv", model_path(), [], cached))
        engine.abort_request(["poor-kv"])
        while engine.has_unfinished_requests():
            engine.step()
        assert max(errors[0]["all"]) < TOLERANCE, errors[0]["all"]
    finally:
        shutdown(llm)


def test_full_model_draft_is_accepted_in_a_batch():
    """A draft that is the full model itself, through vLLM's compiled model (no layer
    loop), batched: every row's drafts are the target's tokens, so (nearly) all are
    accepted. Draft ids of the wrong dtype once gave every row after the first token 0
    (acceptance 0.18 at batch 8)."""
    llm = make_llm(_spec({"attention": {"policy": "dense"}}, adaptive=False), enforce_eager=False)
    try:
        _greedy(llm, _prompts(), 16)
        stats = _stats(llm)
        assert stats["spec_verifications"] >= 20
        assert stats["spec_acceptance_rate"] > 0.9, stats["spec_acceptance_rate"]
    finally:
        shutdown(llm)


def test_preemption_mid_speculation_is_lossless(vanilla_llm):
    """A KV cache too small for the batch: the scheduler preempts requests that hold
    drafts (their blocks, draft K/V included, are freed) and recomputes them later.
    Outputs stay vanilla's, speculation goes on after the recompute, and no per-request
    state is left behind."""
    # ~10 blocks of 128 tokens for 6 requests of ~3 blocks each
    cfg = _spec({"attention": THROTTLE, "bucket": "shallow"}, adaptive=False)
    llm = make_llm(
        cfg, kv_cache_memory_bytes=10 * KV_BLOCK_BYTES, max_model_len=512, disable_log_stats=False
    )
    try:
        prompts = [
            " ".join([f"Item {i}: a short note about the weather in spring."] * 20)
            for i in range(6)
        ]
        _stats(llm)
        got = _greedy(llm, prompts, 150)
        stats = _settled_stats(llm)
        metrics = {m.name: m for m in llm.get_metrics()}
    finally:
        shutdown(llm)
    assert metrics["vllm:num_preemptions"].value > 0, "the test did not provoke preemption"
    assert stats["spec_verifications"] > 0 and stats["spec_accepted_tokens"] > 0
    assert stats["request_state_entries"] == 0
    _assert_identical(got, _greedy(vanilla_llm, prompts, 150))


def test_select_draft_adaptive_is_lossless(vanilla_llm):
    """Query-aware selection as the draft with a pruned draft head (the first 8192 token
    ids), adaptive draft counts; and the opt-out."""
    from vllm import SamplingParams

    cfg = {
        "enabled": True,
        "speculate": {
            "tokens": 4,
            "row_cost_tokens": 0,
            "verify_token_cost": 0.0,  # (the CPU's measured 0.75 would draft nothing)
            "payoff": "always",  # the cost model alone (timings would decide otherwise)
            "draft": {"attention": SELECT, "vocab": 8192},
        },
    }
    llm = make_llm(cfg)
    try:
        prompts = _prompts()
        got = _greedy(llm, prompts)
        stats = _stats(llm)
        _assert_identical(got, _greedy(vanilla_llm, prompts))
        assert stats["spec_verified_tokens"] > 0
        assert stats["spec_draft_kv_tokens_read"] < stats["spec_draft_kv_tokens_dense"]
        # a request that opts out gets no drafts, and the same tokens
        params = SamplingParams(
            temperature=0.0, max_tokens=24, ignore_eos=True, extra_args={"utio_speculate": "off"}
        )
        out = llm.generate(prompts[:4], params, use_tqdm=False)
        opted = _stats(llm)
        assert opted["spec_drafted_tokens"] == 0 and opted["spec_skipped_rows"] > 0
        # no step of that batch carried a draft: each was sampled without the rejection pass
        assert opted["spec_plain_sampled_steps"] >= 24
        assert stats["spec_plain_sampled_steps"] < 32  # drafted steps were verified instead
        assert [list(o.outputs[0].token_ids) for o in out] == [g[:24] for g in got[:4]]
    finally:
        shutdown(llm)


def test_sampling_keeps_target_distribution(spec_llm, vanilla_llm):
    """Sampled requests: the second token (the first one verified against drafts) follows
    the full model's distribution: among samples whose first token is the most frequent
    one, each likely second token's frequency under speculation and under vanilla vLLM
    differ by less than 4.5 standard deviations of a two-sample binomial test; and the
    drafts are accepted as often as a sampled target allows."""
    from vllm import SamplingParams

    prompt = "Question: What is the capital of France?\nAnswer:"
    n = 800
    # unseeded: vLLM 0.32 on CPU fails on a seeded request whose prefill is chunked
    # (gpu_model_runner rewinds the generator with set_offset, which CPU generators lack)
    params = SamplingParams(temperature=1.0, max_tokens=2, ignore_eos=True)

    def pairs(llm) -> list[tuple[int, ...]]:
        outs = llm.generate([prompt] * n, params, use_tqdm=False)
        return [tuple(o.outputs[0].token_ids[:2]) for o in outs]

    _stats(spec_llm)
    spec, ref = pairs(spec_llm), pairs(vanilla_llm)
    stats = _stats(spec_llm)
    top, _ = Counter(p[0] for p in ref).most_common(1)[0]
    a = Counter(p[1] for p in spec if p[0] == top)
    b = Counter(p[1] for p in ref if p[0] == top)
    na, nb = sum(a.values()), sum(b.values())
    assert na > 100 and nb > 100, (na, nb)
    for token, _ in b.most_common(4):
        pa, pb = a[token] / na, b[token] / nb
        pooled = (a[token] + b[token]) / (na + nb)
        sd = math.sqrt(pooled * (1 - pooled) * (1 / na + 1 / nb)) or 1e-9
        assert abs(pa - pb) <= 4.5 * sd + 0.01, (token, pa, pb, sd)
    # drafts are accepted about half the time (0.45-0.47); with vLLM 0.32's CPU
    # expand_kernel left in place (vllm-project/vllm#55005) the temperature was garbage,
    # nearly none were (0.00-0.01) and this test failed only when the garbage was bad
    assert stats["spec_verified_tokens"] > 0
    assert stats["spec_acceptance_rate"] > 0.2, stats["spec_acceptance_rate"]


def _decode_kernel_in_worker(wrapper) -> bool:
    return getattr(wrapper, "worker", wrapper).model_runner._utio_decode_kernel


def test_utio_decode_kernel_is_vanilla_up_to_near_ties(vanilla_llm):
    """decode_kernel 'utio': drafts, verifications and plain decode steps run UTIO's
    decode kernel; greedy outputs equal vanilla's except where vanilla's own top two were
    within two bf16 steps of each other (the kernels round differently), and the kernel
    really ran."""
    from vllm import SamplingParams

    cfg = {
        "enabled": True,
        "decode_kernel": "utio",
        "speculate": {
            "tokens": 4,
            "adaptive": False,  # every step verifies 4 drafts: 5 query tokens per row
            "draft": {"attention": SELECT},
        },
    }
    plain = SamplingParams(
        temperature=0.0, max_tokens=32, ignore_eos=True, extra_args={"utio_speculate": "off"}
    )
    llm = make_llm(cfg)
    try:
        prompts = _prompts()
        _stats(llm)
        got = _greedy(llm, prompts)
        stats = _stats(llm)
        # the same prompts without speculation: plain decode steps through the kernel
        unspec = [
            list(o.outputs[0].token_ids) for o in llm.generate(prompts, plain, use_tqdm=False)
        ]
        plain_stats = _stats(llm)
        active = llm.collective_rpc(_decode_kernel_in_worker)[0]
    finally:
        shutdown(llm)
    if not active:  # AMX machines pack bf16 blocks for vLLM's AMX kernel instead
        assert stats["decode_kernel_calls"] == 0
        pytest.skip("UTIO's decode kernel does not run here (no AVX-512 or no 'vec' layout)")
    from vllm_utio.benchmarking.speculative import identity, top2_gaps

    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, logprobs=2)
    outs = vanilla_llm.generate(prompts, params, use_tqdm=False)
    ref = {"tokens": [list(o.outputs[0].token_ids) for o in outs], "top2_gap": top2_gaps(outs)}
    assert stats["decode_kernel_calls"] > 0 and stats["spec_verifications"] > 0, stats
    assert 0 < stats["spec_accepted_tokens"] < stats["spec_verified_tokens"]
    assert plain_stats["spec_drafted_tokens"] == 0 < plain_stats["decode_kernel_calls"]
    for name, outputs in (("speculative", got), ("plain", unspec)):
        same = identity(outputs, ref)
        differ = [
            (d["prompt"], d["step"], d["top2_gap"]) for d in same["near_ties"] + same["mismatches"]
        ]
        print(f"{name}: differ from vanilla (prompt, step, vanilla's top-2 gap):", differ)
        # seen: 3 (speculative) and 7 (plain) of 20, at gaps of 0 to 0.1875, i.e. within
        # two steps of bf16 logits (0.125 each for logits of 16-32): ties that the
        # kernels' different float rounding flips. A wrong kernel diverges at wide gaps.
        assert len(differ) <= len(prompts) // 2, (name, differ)
        assert all(gap is not None and gap <= 0.25 for _, _, gap in differ), (name, differ)
