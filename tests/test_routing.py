"""Pure routing logic: signals, routers, bucketing, plans, permutations (no engine)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vllm_utio.config import SignalWeights, parse_utio_config
from vllm_utio.plans import LayerPlan, PlanSet
from vllm_utio.routing import signals
from vllm_utio.routing.bucketing import (
    deepest_first_order,
    finalize_levels,
    levels_from_scores,
    swaps_for_permutation,
)
from vllm_utio.routing.routers import ForcedRouter, RoutingBatch, SurrogateRouter

BUCKETS = [
    {"name": "shallow", "max_score": 0.3, "keep_first": 10, "keep_last": 8},
    {"name": "mid", "max_score": 0.6, "keep_first": 12, "keep_last": 10},
]


def cfg(**kw):
    return parse_utio_config({"enabled": True, "buckets": BUCKETS, **kw})


# --- signals ---------------------------------------------------------------------------
def test_entropy_extremes_and_formula():
    v = 50
    uniform = torch.zeros(1, v)
    peaked = torch.full((1, v), -1e4)
    peaked[0, 3] = 0.0
    ent, var = signals.entropy_and_varentropy(torch.cat([uniform, peaked]))
    assert ent[0] == pytest.approx(1.0, abs=1e-6)  # H = log V
    assert ent[1] == pytest.approx(0.0, abs=1e-6)
    assert var[0] == pytest.approx(0.0, abs=1e-6)  # every -log p equal
    # two-point distribution p = (0.5, 0.5 spread over nothing else)
    two = torch.full((1, v), -1e4)
    two[0, :2] = 0.0
    ent2, _ = signals.entropy_and_varentropy(two)
    assert ent2[0] == pytest.approx(math.log(2) / math.log(v), rel=1e-5)


def test_varentropy_matches_definition():
    torch.manual_seed(0)
    logits = torch.randn(3, 40)
    _, var = signals.entropy_and_varentropy(logits)
    logp = torch.log_softmax(logits, -1)
    p = logp.exp()
    h = -(p * logp).sum(-1, keepdim=True)
    expected = (p * (-logp - h) ** 2).sum(-1) / math.log(40) ** 2
    torch.testing.assert_close(var, expected.clamp(0, 1))


def test_outlier_and_heat():
    h = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    out = signals.outlierness(h)  # mean = (1/3, 0): rows 0,1 aligned, row 2 opposite
    assert out[0] == pytest.approx(0.0, abs=1e-6) and out[2] == pytest.approx(1.0, abs=1e-6)
    assert signals.outlierness(torch.randn(1, 8))[0] == pytest.approx(0.0, abs=1e-6)
    # attention output equal to own value -> 0; opposite -> 1 (2 kv heads, 2 q heads each)
    v = torch.randn(2, 2 * 4)
    o_same = v.view(2, 2, 1, 4).expand(2, 2, 2, 4).reshape(2, 16)
    assert signals.attention_heat(o_same, v, 2).max() == pytest.approx(0.0, abs=1e-6)
    assert signals.attention_heat(-o_same, v, 2).min() == pytest.approx(1.0, abs=1e-6)


def test_combine_weights_and_missing_components():
    w = SignalWeights(entropy=1.0, attention_heat=0.0, outlier=3.0, varentropy=0.0)
    comps = {"entropy": torch.tensor([1.0, 0.0]), "outlier": torch.tensor([0.0, 1.0])}
    torch.testing.assert_close(signals.combine(comps, w), torch.tensor([0.25, 0.75]))
    only = signals.combine({"entropy": torch.tensor([0.4])}, w)  # outlier missing
    assert only[0] == pytest.approx(0.4)
    # per-row missing values (NaN) drop out of that row's mean only
    mixed = signals.combine(
        {
            "entropy": torch.tensor([1.0, float("nan"), float("nan")]),
            "outlier": torch.tensor([0.0, 0.2, float("nan")]),
        },
        w,
    )
    assert mixed[0] == pytest.approx(0.25) and mixed[1] == pytest.approx(0.2)
    assert torch.isnan(mixed[2])
    with pytest.raises(ValueError):
        signals.combine({"varentropy": torch.tensor([0.1])}, w)


# --- routers and bucketing -------------------------------------------------------------
def test_levels_from_scores_thresholds():
    scores = np.array([0.0, 0.29, 0.3, 0.59, 0.6, 1.0])
    assert levels_from_scores(scores, [0.3, 0.6]).tolist() == [2, 2, 1, 1, 0, 0]


def test_surrogate_router_unknown_score_is_full_depth():
    batch = RoutingBatch(["a", "b", "c"], np.array([0.1, np.nan, 0.5]))
    assert SurrogateRouter(cfg()).route(batch).tolist() == [2, 0, 1]


def test_forced_router_reads_extra_args():
    batch = RoutingBatch(
        ["a", "b", "c", "d"],
        np.full(4, np.nan),
        [{"utio_bucket": "shallow"}, None, {"utio_bucket": "mid"}, {"utio_bucket": "nope"}],
    )
    assert ForcedRouter(cfg()).route(batch).tolist() == [2, 0, 1, 0]


def test_finalize_prefill_floor_merge_and_fallbacks():
    c = cfg(min_bucket_size=2)
    plans = PlanSet.from_config(c, 30)
    desired = np.array([2, 2, 1, 2, 0])
    routable = np.array([True, True, True, False, True])  # row 3 is prefill
    tokens = np.array([1, 1, 1, 7, 1])
    # row 3 -> full; level 1 has one row (< 2) -> merges into level 0
    assert finalize_levels(desired, routable, tokens, plans, c).tolist() == [2, 2, 0, 0, 0]
    small = cfg(min_batch_size=6)
    assert not finalize_levels(desired, routable, tokens, plans, small).any()
    # saving: two 1-token rows skip 12 layers of 30 over 11 tokens -> 7.3% < 10%
    greedy = cfg(min_bucket_size=2, min_saved_fraction=0.1)
    assert not finalize_levels(desired, routable, tokens, plans, greedy).any()
    lenient = cfg(min_bucket_size=2, min_saved_fraction=0.05)
    assert finalize_levels(desired, routable, tokens, plans, lenient).any()


def test_min_bucket_merge_cascades_to_deeper_levels():
    c = cfg(min_bucket_size=3)
    plans = PlanSet.from_config(c, 30)
    desired = np.array([2, 2, 1, 0])
    out = finalize_levels(desired, np.ones(4, bool), np.ones(4, int), plans, c)
    # level 2 (2 rows) merges into level 1 -> 3 rows there, which is enough
    assert out.tolist() == [1, 1, 1, 0]


# --- plans ---------------------------------------------------------------------------
def test_plan_set_prefix_property_and_counts():
    plans = PlanSet.from_config(cfg(), 30)
    assert [p.name for p in plans.plans] == ["full", "mid", "shallow"]
    assert [p.num_run for p in plans.plans] == [30, 22, 18]
    for layer in range(30):
        n = plans.levels_running(layer)
        assert all(p.runs(layer) for p in plans.plans[:n])
        assert not any(p.runs(layer) for p in plans.plans[n:])
    assert plans.levels_running(11) == 2 and plans.levels_running(20) == 2
    assert plans.levels_running(15) == 1 and plans.levels_running(29) == 3
    assert plans.layer_tokens([4, 2, 1]) == (4 * 30 + 2 * 22 + 18, 7 * 30)


def test_truncation_plan_and_nesting_violation():
    trunc = LayerPlan("exit6", 30, 6, 0)
    assert [layer for layer in range(30) if trunc.runs(layer)] == list(range(6))
    assert trunc.num_run == 6 and not trunc.is_full
    bad = PlanSet(
        (LayerPlan("full", 30, 30, 0), LayerPlan("x", 30, 6, 0), LayerPlan("y", 30, 8, 2))
    )
    with pytest.raises(ValueError, match="not nested"):
        bad.check_nested()


# --- permutations ----------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_swaps_realize_deepest_first_order(seed):
    rng = np.random.default_rng(seed)
    levels = rng.integers(0, 3, size=rng.integers(1, 40))
    order = deepest_first_order(levels)
    rows = list(range(len(levels)))
    for a, b in swaps_for_permutation(order):
        rows[a], rows[b] = rows[b], rows[a]
    assert rows == order.tolist()
    assert np.all(np.diff(levels[order]) >= 0)
    # stable: equal levels keep their relative order
    for k in range(3):
        kept = [r for r in rows if levels[r] == k]
        assert kept == sorted(kept)


def test_signals_and_routing_are_deterministic():
    torch.manual_seed(1)
    logits, hidden = torch.randn(6, 300), torch.randn(6, 32)
    w = SignalWeights(entropy=0.4, attention_heat=0.0, outlier=0.3, varentropy=0.3)

    def route() -> list[int]:
        ent, var = signals.entropy_and_varentropy(logits)
        comps = {"entropy": ent, "varentropy": var, "outlier": signals.outlierness(hidden)}
        scores = signals.combine(comps, w).numpy()
        return SurrogateRouter(cfg()).route(RoutingBatch(list("abcdef"), scores)).tolist()

    assert route() == route()


def _drive_payoff(payoff, loop_s: float, model_s: float, steps: int, size: int = 32):
    """Run ``steps`` decided steps with fixed per-path times; returns each decision."""
    routed = []
    for _ in range(steps):
        route = payoff.route(size)
        payoff.observe_step(size, route, (loop_s if route else model_s) * size)
        routed.append(route)
    return routed


def test_payoff_measures_both_paths_then_keeps_the_faster():
    from vllm_utio.routing.payoff import FIRST_RECHECK, RoutingPayoff

    slow_loop = RoutingPayoff("measured")
    routed = _drive_payoff(slow_loop, loop_s=1.1e-3, model_s=1.0e-3, steps=64)
    assert routed[:2] == [True, False]  # each path measured once
    # then the model, with the loop re-measured after 8 steps, then 16, 32 (backing off)
    rechecks = [i for i, r in enumerate(routed) if r][1:]
    assert rechecks == [1 + FIRST_RECHECK, 1 + 3 * FIRST_RECHECK, 1 + 7 * FIRST_RECHECK]
    assert slow_loop.declined_steps == 64 - 1 - 1 - len(rechecks)
    cls = slow_loop.as_dict()["size_classes"]["32"]
    assert cls["loop_us_per_token"] == pytest.approx(1100) and cls["recheck_every"] == 64

    fast_loop = RoutingPayoff("measured")
    routed = _drive_payoff(fast_loop, loop_s=0.9e-3, model_s=1.0e-3, steps=64)
    assert routed[1] is False and sum(not r for r in routed) == 1 + 3  # model re-measured
    assert fast_loop.declined_steps == 0


def test_payoff_follows_a_change_and_keeps_sizes_apart():
    from vllm_utio.routing.payoff import FIRST_RECHECK, RoutingPayoff, size_class

    payoff = RoutingPayoff("measured")
    _drive_payoff(payoff, loop_s=1.5e-3, model_s=1.0e-3, steps=40)
    # the loop gets cheaper (e.g. the probe starts routing many rows): the next re-check
    # sees it, its running time falls below the model's within a few re-checks, and the
    # back-off resets once the verdict flips
    routed = _drive_payoff(payoff, loop_s=0.5e-3, model_s=1.0e-3, steps=200)
    assert all(routed[-FIRST_RECHECK:]), "the loop wins once re-measured"
    # another size class is measured from scratch
    assert payoff.route(128) is True and size_class(128) != size_class(32)
    always = RoutingPayoff("always")
    assert all(_drive_payoff(always, loop_s=9.0, model_s=1.0, steps=10))
    assert always.as_dict()["size_classes"] == {}
