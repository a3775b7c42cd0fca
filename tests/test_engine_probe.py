"""The learned-probe router: scores tokens mid-forward and moves rows by gather/scatter."""

from __future__ import annotations

import pytest
import torch
from conftest import BUCKETS, make_llm, shutdown
from prompts import PROMPTS
from test_engine_foundation import MAX_TOKENS, greedy

from vllm_utio.config import UtioConfigError, parse_utio_config
from vllm_utio.routing.probe import Probe, load_probe, save_probe

HIDDEN = 576


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
def test_probe_routes_mid_forward_like_forced_pinning(forced_llm, tmp_path):
    # weight 0, bias -10: every decode token scores ~4.5e-5 < 0.3 -> the shallow bucket
    path = tmp_path / "always-shallow.safetensors"
    save_probe(path, Probe(torch.zeros(HIDDEN), torch.tensor([-10.0]), layer=11))
    llm = make_llm(
        {"enabled": True, "router": "probe", "probe_path": str(path), "buckets": BUCKETS}
    )
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
def test_probe_layer_must_run_in_every_bucket(tmp_path):
    path = tmp_path / "late.safetensors"
    save_probe(path, Probe(torch.zeros(HIDDEN), torch.tensor([0.0]), layer=15))
    with pytest.raises(UtioConfigError, match="the probe reads layer 15"):
        make_llm({"enabled": True, "router": "probe", "probe_path": str(path), "buckets": BUCKETS})
