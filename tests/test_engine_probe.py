"""Learned routers mid-forward (single-score utio-probe files and the calibrated
multi-bucket utio-router), and calibration artifacts loaded by one config key."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import BUCKETS, NUM_LAYERS, make_llm, model_path, shutdown
from prompts import PROMPTS
from test_engine_foundation import MAX_TOKENS, greedy

from vllm_utio.artifact import model_fingerprint, resolve_artifact
from vllm_utio.calibration.artifact import save_artifact
from vllm_utio.config import UtioConfigError, parse_utio_config
from vllm_utio.routing.cost_router import CostRouter
from vllm_utio.routing.probe import CostProbe, Probe, load_checked_probe, load_probe, save_probe

HIDDEN = 576
SAVED = [NUM_LAYERS - b["keep_first"] - b["keep_last"] for b in BUCKETS]  # [8, 4]


def constant_router(costs: list[float], lam: float = 1.0, layer: int = 11) -> CostRouter:
    """A linear CostRouter whose predicted costs ignore the stream."""
    w = torch.zeros(len(costs), HIDDEN)
    weights = [(w, torch.tensor(costs))]
    return CostRouter(
        "linear", torch.zeros(HIDDEN), torch.ones(HIDDEN), weights, layer, SAVED, lam=lam
    )


def write_artifact(directory, router: CostRouter | None, fingerprint: str) -> None:
    manifest = {
        "model": {"fingerprint": fingerprint},
        "budget_ppl": 0.03,
        "buckets": [dict(b) for b in BUCKETS],
        "router": {"type": "probe-linear", "routing_layer": 11},
    }
    save_artifact(directory, manifest, {}, router)


def test_cost_router_levels_in_engine_convention():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, HIDDEN, generator=gen)
    max_scores = [b["max_score"] for b in BUCKETS]
    # gain = lam * saved - cost: shallow 8 - 0 beats mid 4 - 0 -> level 2 (shallowest)
    assert CostProbe(constant_router([0.0, 0.0])).levels(x, max_scores).tolist() == [2] * 4
    # shallow too costly, mid worth it -> level 1
    assert CostProbe(constant_router([9.0, 1.0])).levels(x, max_scores).tolist() == [1] * 4
    # nothing worth it -> full depth
    assert CostProbe(constant_router([9.0, 5.0])).levels(x, max_scores).tolist() == [0] * 4
    # the single-score probe: thresholds decide
    probe = Probe(torch.zeros(HIDDEN), torch.tensor([0.0]), layer=11)  # score 0.5
    assert np.array_equal(probe.levels(x, max_scores), [1] * 4)


def test_load_checked_probe_reads_both_formats(tmp_path):
    cfg_of = {"enabled": True, "router": "probe", "buckets": BUCKETS}
    constant_router([0.0, 0.0]).save(tmp_path / "router.safetensors")
    save_probe(tmp_path / "probe.safetensors", Probe(torch.zeros(HIDDEN), torch.zeros(1), 11))
    cfg = parse_utio_config({**cfg_of, "probe_path": str(tmp_path / "router.safetensors")})
    assert isinstance(load_checked_probe(cfg, HIDDEN, NUM_LAYERS), CostProbe)
    cfg = parse_utio_config({**cfg_of, "probe_path": str(tmp_path / "probe.safetensors")})
    assert isinstance(load_checked_probe(cfg, HIDDEN, NUM_LAYERS), Probe)
    # a router calibrated for other plans is refused, naming the field and both plans
    other = constant_router([0.0, 0.0])
    other.saved_layers = [6, 2]
    other.save(tmp_path / "other.safetensors")
    cfg = parse_utio_config({**cfg_of, "probe_path": str(tmp_path / "other.safetensors")})
    with pytest.raises(UtioConfigError, match=r"'probe_path'.*skipping \[6, 2\].*skip \[8, 4\]"):
        load_checked_probe(cfg, HIDDEN, NUM_LAYERS)


def test_artifact_config_rules(tmp_path):
    with pytest.raises(UtioConfigError, match="'buckets' conflicts with 'artifact'"):
        parse_utio_config({"artifact": "x", "buckets": BUCKETS})
    with pytest.raises(UtioConfigError, match="'probe_path' conflicts with 'artifact'"):
        parse_utio_config({"artifact": "x", "probe_path": "p"})
    # router='probe' without probe_path is fine when the artifact provides it
    parse_utio_config({"artifact": "x", "router": "probe"})
    with pytest.raises(UtioConfigError, match=r"'artifact'.*not a calibration artifact"):
        resolve_artifact({"enabled": True, "artifact": str(tmp_path)}, model_path())


def test_artifact_expands_to_buckets_and_router(tmp_path):
    write_artifact(tmp_path / "art", constant_router([0.0, 0.0]), model_fingerprint(model_path()))
    raw = {"enabled": True, "artifact": str(tmp_path / "art"), "min_batch_size": 2}
    out = resolve_artifact(raw, model_path())
    cfg = parse_utio_config(out)
    assert "artifact" not in out and cfg.min_batch_size == 2  # user fields kept
    assert [b.name for b in cfg.buckets] == ["shallow", "mid"]
    assert cfg.router == "probe" and cfg.probe_path.endswith("router.safetensors")
    # the user may still pick the surrogate fallback (calibrated max_score thresholds)
    cfg = parse_utio_config(resolve_artifact({**raw, "router": "surrogate"}, model_path()))
    assert cfg.router == "surrogate" and cfg.probe_path is None
    json.dumps(out)  # travels to the workers inside additional_config


def test_probe_scores_and_file_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(0)
    probe = Probe(torch.randn(HIDDEN, generator=gen) / HIDDEN**0.5, torch.tensor([0.5]), layer=11)
    save_probe(tmp_path / "p.safetensors", probe)
    loaded = load_probe(tmp_path / "p.safetensors", HIDDEN)
    assert loaded.layer == 11
    x = torch.randn(5, HIDDEN, generator=gen)
    torch.testing.assert_close(loaded.scores(x), probe.scores(x))
    # scale-free: the stream is RMS-normalized first
    torch.testing.assert_close(probe.scores(3.0 * x), probe.scores(x), rtol=1e-4, atol=1e-5)
    assert ((probe.scores(x) > 0) & (probe.scores(x) < 1)).all()
    with pytest.raises(ValueError, match="hidden size 576, model has 64"):
        load_probe(tmp_path / "p.safetensors", 64)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"router": "probe", "buckets": BUCKETS}, "needs probe_path"),
        (
            {"router": "probe", "probe_path": "p", "execution": "prefix", "buckets": BUCKETS},
            "execution must be",
        ),
        (
            {"router": "probe", "probe_path": "p", "schedule": "per_bucket", "buckets": BUCKETS},
            "schedule='nested'",
        ),
        ({"router": "probe", "probe_path": "p"}, "at least one bucket"),
    ],
)
def test_probe_config_rules(raw, message):
    with pytest.raises(UtioConfigError, match=message):
        parse_utio_config(raw)


@pytest.mark.engine
def test_artifact_router_routes_mid_forward_like_forced_pinning(forced_llm, tmp_path):
    # An artifact (one config key) whose calibrated router always prefers "shallow".
    write_artifact(tmp_path / "art", constant_router([0.0, 0.0]), model_fingerprint(model_path()))
    llm = make_llm({"enabled": True, "artifact": str(tmp_path / "art"), "routing_payoff": "always"})
    try:
        probe_tokens = greedy(llm)
        stats = llm.collective_rpc("utio_stats")[0]
    finally:
        shutdown(llm)
    pinned = greedy(forced_llm, extra_args=[{"utio_bucket": "shallow"}] * len(PROMPTS))
    assert probe_tokens == pinned
    skipped = BUCKETS[0]["keep_first"], 30 - BUCKETS[0]["keep_last"]
    assert stats["layer_tokens_saved"] == len(PROMPTS) * (MAX_TOKENS - 1) * (
        skipped[1] - skipped[0]
    )


@pytest.mark.engine
def test_measured_payoff_routes_only_the_steps_it_chose(tmp_path):
    """routing_payoff 'measured' (the default): the first decode step routes, the next
    runs vLLM's model, then the faster path per token wins (the other re-measured now and
    then). Whatever the timings, exactly the routed steps save their layers."""
    write_artifact(tmp_path / "art", constant_router([0.0, 0.0]), model_fingerprint(model_path()))
    llm = make_llm({"enabled": True, "artifact": str(tmp_path / "art")})
    try:
        greedy(llm)
        stats = llm.collective_rpc("utio_stats")[0]
    finally:
        shutdown(llm)
    payoff = stats["routing_payoff"]
    assert payoff["mode"] == "measured"
    # every size class with a routable row was measured on the loop first, then the model
    measured = payoff["size_classes"].values()
    assert measured and all(c["loop_us_per_token"] > 0 for c in measured)
    assert any(c["model_us_per_token"] is not None for c in measured)
    assert payoff["recheck_steps"] >= 1
    assert stats["routing_declined_steps"] >= 1  # routable steps run unrouted, counted
    # the loop ran only for routed steps, and each of them routed its decode rows shallow
    loop_steps = stats["steps"] - stats["vllm_model_steps"]
    assert stats["routed_steps"] == loop_steps >= 1
    assert stats["rows_per_level"][1] == 0
    decode_rows = len(PROMPTS) * (MAX_TOKENS - 1)
    assert 0 < stats["rows_per_level"][2] < decode_rows, "some decode steps ran unrouted"
    skipped = 30 - BUCKETS[0]["keep_last"] - BUCKETS[0]["keep_first"]
    assert stats["layer_tokens_saved"] == stats["rows_per_level"][2] * skipped


@pytest.mark.engine
def test_artifact_for_another_model_fails_before_start(tmp_path):
    write_artifact(tmp_path / "art", None, "0" * 64)
    with pytest.raises(UtioConfigError, match=r"'artifact'.*calibrated for another model"):
        make_llm({"enabled": True, "artifact": str(tmp_path / "art")})


@pytest.mark.engine
def test_probe_layer_must_run_in_every_bucket(tmp_path):
    path = tmp_path / "late.safetensors"
    save_probe(path, Probe(torch.zeros(HIDDEN), torch.tensor([0.0]), layer=15))
    with pytest.raises(UtioConfigError, match="the probe reads layer 15"):
        make_llm({"enabled": True, "router": "probe", "probe_path": str(path), "buckets": BUCKETS})
