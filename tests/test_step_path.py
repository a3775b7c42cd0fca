"""Which path a step takes (pure logic): vLLM's own model unless the layer loop is needed."""

from __future__ import annotations

import numpy as np

from vllm_utio.config import UtioConfig
from vllm_utio.step_path import (
    BELOW_FULL_DEPTH,
    HEAT_SIGNAL,
    MID_FORWARD_ROUTING,
    QUERY_READ,
    StepFacts,
    layer_loop_reason,
)

SHALLOW = {"name": "shallow", "max_score": 0.3, "keep_first": 12, "keep_last": 10}


def _facts(shallow=(False, False), query_read=False, routable=(True, True)) -> StepFacts:
    return StepFacts(np.array(shallow), query_read, np.array(routable))


def test_a_shallow_row_or_a_read_query_needs_the_loop():
    cfg = UtioConfig.model_validate({"enabled": True, "router": "forced", "buckets": [SHALLOW]})
    assert layer_loop_reason(cfg, _facts()) is None
    assert layer_loop_reason(cfg, _facts(shallow=(False, True))) == BELOW_FULL_DEPTH
    assert layer_loop_reason(cfg, _facts(query_read=True)) == QUERY_READ


def test_sparse_rows_alone_stay_on_vllms_model():
    # a full-depth bucket with a sparse policy: its rows are not shallow, and 'select'
    # chooses inside the attention call, so nothing needs the loop
    bucket = {
        "name": "sparse",
        "max_score": 0.5,
        "keep_first": 30,
        "attention": {"policy": "select", "budget_tokens": 512},
    }
    cfg = UtioConfig.model_validate({"enabled": True, "router": "forced", "buckets": [bucket]})
    assert layer_loop_reason(cfg, _facts(shallow=(False, False))) is None


def test_routers_that_read_mid_forward_signals_need_the_loop():
    probe = UtioConfig.model_construct(buckets=[SHALLOW], router="probe")
    assert layer_loop_reason(probe, _facts()) == MID_FORWARD_ROUTING
    assert layer_loop_reason(probe, _facts(routable=(False, False))) is None
    for weight, reason in ((0.5, HEAT_SIGNAL), (0.0, None)):
        signal = {"entropy": 1.0, "attention_heat": weight}
        cfg = UtioConfig.model_validate({"enabled": True, "buckets": [SHALLOW], "signal": signal})
        assert layer_loop_reason(cfg, _facts()) == reason, weight
