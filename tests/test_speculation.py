"""The draft-count rule, the acceptance estimate, and the speculate config's checks."""

from __future__ import annotations

import pytest

from vllm_utio.config import UtioConfigError, parse_utio_config
from vllm_utio.integration.self_draft import draft_read, speculative_config
from vllm_utio.request_controls import RequestControlError, validate_request_controls
from vllm_utio.speculation import (
    PRIOR_ACCEPTANCE,
    Acceptance,
    SpeculationStats,
    best_draft_count,
    draft_cost,
    expected_tokens,
)


def test_expected_tokens_is_the_geometric_sum():
    assert expected_tokens(0.0, 4) == pytest.approx(1.0)
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
    assert expected_tokens(1.0, 3) == pytest.approx(4.0, rel=0.01)  # capped just below 1


def test_long_context_with_good_acceptance_drafts_many():
    # 4k cached positions, a throttled draft reads 672, row cost 450, cheap verification
    k = best_draft_count(0.9, 4096, draft_cost(672, 450, 1.0), 450, 4, 1.05, 0.05)
    assert k >= 3


def test_costly_verification_drafts_none():
    # the CPU's measured verification cost: even 93% acceptance does not pay at 4k
    assert best_draft_count(0.93, 4096, draft_cost(1200, 450, 1.0), 450, 4, 1.05, 0.75) == 0


def test_short_context_or_poor_acceptance_drafts_none():
    # a throttled draft at 600 positions reads everything: it costs a full step
    assert best_draft_count(0.9, 600, draft_cost(600, 450, 1.0), 450, 4, 1.05, 0.05) == 0
    # 4k, but drafts are nearly always rejected
    assert best_draft_count(0.05, 4096, draft_cost(672, 450, 1.0), 450, 4, 1.05, 0.05) == 0


def test_gain_threshold_is_respected():
    args = (0.7, 4096, draft_cost(672, 450, 1.0), 450, 4)
    assert best_draft_count(*args, 1.0, 0.05) > 0
    assert best_draft_count(*args, 10.0, 0.05) == 0


def test_depth_draft_costs_its_share_of_layers_plus_fill():
    assert draft_cost(1000, 400, 1.0) == pytest.approx(1400)
    assert draft_cost(1000, 400, 0.5) == pytest.approx(0.5 * 1400 + 0.5 * 200)


def test_acceptance_estimate_moves_with_verifications():
    acc = Acceptance()
    acc.proposed = 4
    acc.observe(4)  # all accepted: rate rises
    high = acc.rate
    assert high > PRIOR_ACCEPTANCE
    acc.proposed = 4
    acc.observe(0)  # the first draft rejected: rate falls
    assert acc.rate < high
    low = Acceptance(rate=0.1)
    low.proposed = 0
    low.observe(0)  # not drafting: drifts back towards the prior, so it retries
    assert 0.1 < low.rate < PRIOR_ACCEPTANCE


def test_stats_rates():
    s = SpeculationStats(verified_tokens=10, accepted_tokens=7, verifications=4)
    d = s.as_dict()
    assert d["spec_acceptance_rate"] == pytest.approx(0.7)
    assert d["spec_tokens_per_verification"] == pytest.approx(1 + 7 / 4)
    assert SpeculationStats().as_dict()["spec_acceptance_rate"] == 0.0


def test_draft_read_per_policy():
    cfg = parse_utio_config({"speculate": {}})
    throttle = cfg.speculate.draft.attention
    assert throttle.policy == "throttle"
    assert draft_read(throttle, 4096, 32, 30) == 128 + 512 + 32
    assert draft_read(throttle, 300, 32, 30) == 300
    select = parse_utio_config(
        {"attention_all": {"policy": "select", "budget_tokens": 1024, "dense_layers": 3}}
    ).attention_all
    assert draft_read(select, 4096, 32, 30) == (3 * 4096 + 27 * 1024) // 30


def test_speculative_config_uses_vllms_custom_proposer():
    spec = parse_utio_config({"speculate": {"tokens": 3}}).speculate
    got = speculative_config(spec)
    assert got["method"] == "custom_class" and got["num_speculative_tokens"] == 3
    module, name = got["model"].rsplit(".", 1)
    assert hasattr(__import__(module, fromlist=[name]), name)


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"speculate": {"tokens": 0}}, "speculate.tokens"),
        ({"speculate": {"tokens": 17}}, "speculate.tokens"),
        ({"speculate": {"draft": {"bucket": "nope"}}}, "speculate.draft.bucket"),
        ({"speculate": {"depth": 3}}, "speculate"),
        ({"speculate": {}, "attention_all": {"policy": "throttle"}}, "attention_all"),
        ({"speculate": {"draft": {"attention": {"policy": "weird"}}}}, "policy"),
    ],
)
def test_bad_speculate_config_names_the_field(raw, needle):
    with pytest.raises(UtioConfigError) as err:
        parse_utio_config(raw)
    assert needle in str(err.value)


def test_speculate_control_values():
    cfg = parse_utio_config({"speculate": {}})
    validate_request_controls({"utio_speculate": "off"}, cfg)
    validate_request_controls({"utio_speculate": "default"}, cfg)
    with pytest.raises(RequestControlError, match="allowed values"):
        validate_request_controls({"utio_speculate": "maybe"}, cfg)
    with pytest.raises(RequestControlError, match="must be a string"):
        validate_request_controls({"utio_speculate": False}, cfg)


def test_identity_counts_one_bf16_step_as_a_near_tie():
    from vllm_utio.benchmarking.speculative import identity, reclassify

    ref = {"tokens": [[1, 2, 3], [1, 2, 3], [1, 2, 3]], "top2_gap": [[0.0, 0.125, 0.0]] * 2}
    ref["top2_gap"].append([0.0, 0.25, 0.0])
    got = identity([[1, 2, 3], [1, 9, 3], [1, 9, 3]], ref)
    assert got["identical"] == 1
    assert [e["prompt"] for e in got["near_ties"]] == [1]  # 0.125: one bf16 step
    assert [e["prompt"] for e in got["mismatches"]] == [2]  # 0.25: two steps
    # an earlier run split at 0.1 is re-split under the current rule
    old = {**got, "near_ties": [], "mismatches": got["near_ties"] + got["mismatches"]}
    assert reclassify(old) == got


@pytest.mark.parametrize("block_size", [32, 128])
def test_bench_spec_engines_are_valid_configs(block_size):
    from vllm_utio.benchmarking.speculative import engines

    table = engines(4, block_size)
    assert table["vanilla"] == {"utio": None, "spec": None}
    # vLLM's own methods run without UTIO, capped at the same draft count
    for name in ("ngram", "suffix"):
        assert table[name]["utio"] is None
        assert table[name]["spec"]["method"] == name
        assert table[name]["spec"]["num_speculative_tokens"] == 4
    # suffix from each prompt alone: no tree of earlier repeats' answers to the same prompt
    assert table["suffix"]["spec"]["suffix_decoding_max_cached_requests"] == 0
    drafts = {}
    for name, engine in table.items():
        if engine["utio"] is not None:
            cfg = parse_utio_config(engine["utio"])  # raises on a config UTIO rejects
            if cfg.speculate is not None:
                drafts[name] = (cfg.speculate.draft.attention.policy, cfg.decode_kernel)
    assert drafts["spec-vslash-utio-kernel"] == ("vslash", "utio")
    assert drafts["spec-skip-utio-kernel"] == ("dense", "utio")
    # select finds facts only with fine blocks: no select drafts at 128-token blocks
    assert ("spec-sparq768-utio-kernel" in drafts) == (block_size <= 64)


def _bench_spec_args(*argv: str):
    import argparse

    from vllm_utio.benchmarking.speculative import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_bench_spec_sampled_refuses_vllms_own_speculation():
    """vLLM 0.32's CPU rejection sampler samples its own speculation engines under
    uninitialised temperatures (vllm-project/vllm#55005): a sampled run refuses them,
    naming the issue, before any engine starts; a negative temperature is refused too."""
    from vllm_utio.benchmarking.speculative import run

    args = _bench_spec_args("--temperature", "0.8", "--engines", "ngram", "spec-throttle")
    with pytest.raises(SystemExit, match=r"\['ngram'\].*55005"):
        run(args)
    with pytest.raises(SystemExit, match="--temperature must be >= 0"):
        run(_bench_spec_args("--temperature", "-1", "--engines", "spec-throttle"))


def test_bench_spec_sampled_table_compares_no_outputs():
    from vllm_utio.benchmarking.speculative import markdown

    row = {
        "engine": "spec-throttle",
        "workload": "wikipedia",
        "context": 4096,
        "batch": 8,
        "decode_tok_s": 50.0,
        "tok_s_min": 49.0,
        "tok_s_max": 51.0,
        "speedup": 1.1,
        "acceptance": 0.6,
        "tokens_per_verification": 2.5,
        "draft_tokens_per_output": 0.8,
        "draft_share": 0.2,
        "identity": None,
    }
    settings = {"model": "m", "dtype": "bfloat16", "block_size": 32, "output_len": 64}
    settings |= {"repeats": 2, "tokens": 4, "temperature": 0.8}
    text = markdown({"created": "2026-12-06", "settings": settings, "summary": [row], "notes": []})
    assert "(temperature 0.8, ignore_eos)" in text
    (line,) = [x for x in text.splitlines() if x.startswith("| wikipedia")]
    assert line.endswith("| 20% | - | - | - |")
