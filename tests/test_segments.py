"""The executor's segments: consecutive layers on the same rows with nothing between
them, the unit the compiled layer body runs and warms up at engine load."""

from __future__ import annotations

from vllm_utio.config import UtioConfig
from vllm_utio.executor import DepthExecutor
from vllm_utio.integration.model_stack import DecoderStack
from vllm_utio.plans import PlanSet

# the calibrated default artifact's buckets: skip 13-18, 15-18, 17-18 (shallowest first)
BUCKETS = [
    {"name": "skip6", "max_score": 0.1, "keep_first": 13, "keep_last": 11},
    {"name": "skip4", "max_score": 0.2, "keep_first": 15, "keep_last": 11},
    {"name": "skip2", "max_score": 0.3, "keep_first": 17, "keep_last": 11},
]


def _executor(schedule: str = "nested") -> DepthExecutor:
    cfg = UtioConfig(enabled=True, router="forced", buckets=BUCKETS)
    plans = PlanSet.from_config(cfg, 30)
    stack = DecoderStack(model=None, layers=[None] * 30)  # only the layer count is read
    corrections = [None] * plans.num_levels
    return DepthExecutor(stack, plans, corrections, schedule, heat_layer=0, fused_fill=False)


def _bounds(segments: list[range]) -> list[tuple[int, int]]:
    return [(r.start, r.stop) for r in segments]


def test_segments_split_where_the_running_rows_change():
    out = _executor().segments(route_layer=None)
    assert _bounds(out) == [(0, 13), (13, 15), (15, 17), (17, 19), (19, 30)]


def test_a_routing_decision_ends_a_segment():
    out = _bounds(_executor().segments(route_layer=5))
    # a step with a mid-forward router splits after layer 5; one without does not
    assert (0, 6) in out and (6, 13) in out and (0, 13) in out
    assert {i for start, stop in out for i in range(start, stop)} == set(range(30))


def test_per_bucket_schedule_runs_single_layers():
    assert {len(r) for r in _executor("per_bucket").segments(route_layer=None)} == {1}
