"""The surrogate router on real vLLM: signals are computed from real steps, routing
happens, it is deterministic, and per-request signal state is released."""

from __future__ import annotations

import pytest
from conftest import make_llm, shutdown
from prompts import PROMPTS
from test_engine_foundation import greedy

pytestmark = pytest.mark.engine

# thresholds low enough that some decode steps of this model go shallow, not all
SURROGATE = {
    "enabled": True,
    "router": "surrogate",
    "buckets": [
        {"name": "shallow", "max_score": 0.12, "keep_first": 13, "keep_last": 11},
        {"name": "mid", "max_score": 0.2, "keep_first": 15, "keep_last": 12},
    ],
}


@pytest.fixture(scope="module")
def surrogate_llm():
    # Without prefix caching a repeated run schedules exactly the same batches; with it the
    # second run prefills less, batch shapes differ, and bf16 numerics may differ slightly.
    llm = make_llm(SURROGATE, enable_prefix_caching=False)
    yield llm
    shutdown(llm)


def _signal_state(wrapper) -> dict:
    runner = getattr(wrapper, "worker", wrapper).model_runner
    return {"live": len(runner._utio_signals), "requests": len(runner.requests)}


def test_surrogate_routing_is_real_and_deterministic(surrogate_llm):
    first = greedy(surrogate_llm)
    s1 = surrogate_llm.collective_rpc("utio_stats", kwargs={"reset": True})[0]
    second = greedy(surrogate_llm)
    s2 = surrogate_llm.collective_rpc("utio_stats", kwargs={"reset": True})[0]
    print("surrogate routing:", s1["rows_per_level"], f"saved {s1['saved_fraction']:.3f}")
    # The signal and router have no randomness (unit-tested), but two engine runs are not
    # bit-reproducible in bf16 here: a score near a threshold can flip a row's bucket and
    # then its tokens (seen once in three CI runs). So compare the runs in aggregate.
    same = sum(a == b for a, b in zip(first, second, strict=True))
    assert same >= len(first) - 3, f"only {same}/{len(first)} continuations repeated"
    for a, b in zip(s1["rows_per_level"], s2["rows_per_level"], strict=True):
        assert abs(a - b) <= 0.1 * max(a, b) + 5
    assert s1["routed_steps"] > 0
    assert s1["rows_per_level"][1] + s1["rows_per_level"][2] > 0, "nothing routed shallow"
    assert s1["rows_per_level"][0] > 0, "everything routed shallow"
    assert 0 < s1["saved_fraction"] < 0.5
    assert s1["routing_s"] > 0 and s1["forward_s"] > 0


def test_signal_state_released_when_requests_finish(surrogate_llm):
    greedy(surrogate_llm, PROMPTS[:4])
    # finished requests are removed at the start of the next step: run one more
    greedy(surrogate_llm, PROMPTS[:1], max_tokens=2)
    state = surrogate_llm.collective_rpc(_signal_state)[0]
    assert state["requests"] <= 1 and state["live"] <= state["requests"]
