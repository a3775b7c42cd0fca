"""The fused entropy/varentropy pass (routing/entropy.py) on the default model's real
logits: its error against a float64 reference, and routing decisions equal to the exact
(log_softmax) form's except for scores within that error of a threshold."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vllm_utio.config import SignalWeights
from vllm_utio.paths import default_model_dir, wiki_text_path
from vllm_utio.routing import entropy, signals
from vllm_utio.routing.bucketing import levels_from_scores

MODEL_DIR = default_model_dir()
needs_data = pytest.mark.skipif(
    not (MODEL_DIR / "model.safetensors").is_file() or not wiki_text_path().is_file(),
    reason="default model or evaluation text not built: make setup",
)
# Error bound of each normalised component (entropy / log V, varentropy / (log V)^2).
# Measured on 384 held-out positions: fused <= 2.2e-6 from float64, the exact log_softmax
# form <= 3.4e-6; rounding the logits to bf16 (what the engine computes) moves entropy by
# up to 7.8e-3. Thresholds are 0.1-0.3 apart (README 0.2; tests 0.12/0.2, 0.3/0.6).
BOUND = 1e-5


def _truth(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logp = torch.log_softmax(logits.double(), -1)
    p = logp.exp()
    h = -(p * logp).sum(-1)
    var = (p * (logp + h[:, None]) ** 2).sum(-1)
    log_v = math.log(logits.shape[-1])
    return h / log_v, var / log_v**2


@pytest.fixture(scope="module")
def real():
    """Logits and final-normed hidden states of 4 held-out wiki windows x 96 tokens."""
    from vllm_utio.calibration import data as cdata
    from vllm_utio.evaluation.reference import ReferenceLlama

    torch.set_num_threads(1)
    ref = ReferenceLlama.from_pretrained(MODEL_DIR)
    tok = cdata.load_tokenizer(MODEL_DIR)
    _, held = cdata.split_documents(cdata.load_documents("wiki"))
    windows = cdata.make_windows(tok, held[:8], 96, 1)[:4]
    assert len(windows) == 4
    outs = [ref.forward(w.ids) for w in windows]
    logits = torch.cat([o.logits for o in outs])
    hidden = [ref._rms_norm(o.streams[-1], ref.final_norm) for o in outs]
    return logits, hidden


@needs_data
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_entropy_error_on_real_logits(real, dtype):
    logits = real[0].to(dtype)
    want_h, want_v = _truth(logits)
    for fn in (signals.entropy_and_varentropy, signals.entropy_and_varentropy_exact):
        h, v = fn(logits)
        assert float((h.double() - want_h).abs().max()) < BOUND, fn.__name__
        assert float((v.double() - want_v).abs().max()) < BOUND, fn.__name__
    assert entropy.compiled_in_use(), "batches took the eager fallback"
    # one row (padded to two: the same compiled graph), no rows, and the eager fallback
    one = signals.entropy_and_varentropy(logits[5:6])
    assert abs(float(one[0][0]) - float(want_h[5])) < BOUND
    assert abs(float(one[1][0]) - float(want_v[5])) < BOUND
    assert signals.entropy_and_varentropy(logits[:0])[0].shape == (0,)
    h, v = entropy.eager_moments(logits)
    log_v = math.log(logits.shape[-1])
    assert float((h.double() / log_v - want_h).abs().max()) < BOUND
    assert float((v.double() / log_v**2 - want_v).abs().max()) < BOUND
    # the values span the range routing cares about (not all near 0)
    assert float(want_h.max()) > 0.4 and float(want_h.min()) < 0.05


WEIGHTS = {
    "default (entropy + outlier; heat absent offline)": SignalWeights(),
    "entropy only": SignalWeights(entropy=1.0, attention_heat=0.0, outlier=0.0),
    "varentropy only": SignalWeights(entropy=0.0, attention_heat=0.0, outlier=0.0, varentropy=1.0),
    "entropy + varentropy": SignalWeights(
        entropy=0.5, attention_heat=0.0, outlier=0.0, varentropy=0.5
    ),
}


@needs_data
@pytest.mark.parametrize("name", list(WEIGHTS))
def test_routing_decisions_match_exact_outside_the_bound(real, name):
    """A score is a weighted mean of components, so its error is at most BOUND; a decision
    may differ only where the exact score lies within BOUND of a threshold."""
    logits, hidden = real
    logits = logits.bfloat16()  # the engine's logits
    outlier = torch.cat([signals.outlierness(h) for h in hidden])  # a window = a batch
    scores = {}
    for path, fn in (
        ("fused", signals.entropy_and_varentropy),
        ("exact", signals.entropy_and_varentropy_exact),
    ):
        ent, var = fn(logits)
        comps = {"entropy": ent, "varentropy": var, "outlier": outlier}
        scores[path] = signals.combine(comps, WEIGHTS[name]).double().numpy()
    assert np.abs(scores["fused"] - scores["exact"]).max() < BOUND
    # the README's, the test engines' and a fine grid of thresholds
    grids = [[0.2], [0.12, 0.2], [0.3, 0.6], list(np.arange(0.01, 0.7, 0.01))]
    for thresholds in grids:
        fused = levels_from_scores(scores["fused"], thresholds)
        exact = levels_from_scores(scores["exact"], thresholds)
        differ = np.flatnonzero(fused != exact)
        gap = np.abs(scores["exact"][:, None] - np.asarray(thresholds)[None, :]).min(1)
        assert (gap[differ] <= BOUND).all(), (thresholds, differ, gap[differ])
    # the decisions are not trivially constant on these logits
    assert len(np.unique(levels_from_scores(scores["exact"], grids[-1]))) > 5


def test_masked_logits_stay_finite():
    """-inf logits (a masked vocabulary) count as zero probability, not NaN."""
    torch.manual_seed(0)
    logits = torch.randn(3, 64)
    masked = logits.clone()
    masked[:, 40:] = -math.inf
    h, v = signals.entropy_and_varentropy(masked)
    want_h, want_v = _truth(logits[:, :40])
    # normalised by log 64 instead of log 40
    scale = math.log(40) / math.log(64)
    torch.testing.assert_close(h.double(), want_h * scale, atol=1e-6, rtol=0)
    torch.testing.assert_close(v.double(), want_v * scale**2, atol=1e-6, rtol=0)


def test_batch_sizes_share_one_compiled_graph():
    """Warmed up once per dtype, the batch sizes and vocabularies (> 4096) an engine sees
    compile nothing more (logits made under inference mode, as vLLM's are)."""
    torch._dynamo.reset()  # forget graphs earlier tests compiled for these shapes
    entropy.warm_up([torch.float32])
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for rows, vocab in ((1, 49152), (2, 32000), (7, 49152), (64, 49152), (3, 151936)):
        with torch.inference_mode():
            logits = torch.randn(rows, vocab)
        signals.entropy_and_varentropy(logits)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_entropy_pass_config_selects_the_exact_form():
    """``entropy_pass: "exact"`` (set in the worker by make_router) routes on the eager
    log_softmax form, bit for bit; "compiled" (the default) on the fused pass; a bad value
    names the field."""
    from vllm_utio.config import UtioConfigError, parse_utio_config
    from vllm_utio.routing.routers import make_router

    buckets = [{"name": "shallow", "max_score": 0.3, "keep_first": 10, "keep_last": 8}]
    logits = torch.randn(5, 49152).bfloat16()
    try:
        make_router(
            parse_utio_config({"enabled": True, "buckets": buckets, "entropy_pass": "exact"})
        )
        assert not entropy.enabled() and not entropy.compiled_in_use()
        for got, want in zip(
            signals.entropy_and_varentropy(logits),
            signals.entropy_and_varentropy_exact(logits),
            strict=True,
        ):
            assert torch.equal(got, want)
    finally:
        make_router(parse_utio_config({"enabled": True, "buckets": buckets}))
    assert entropy.enabled() and entropy.compiled_in_use()
    with pytest.raises(UtioConfigError, match="entropy_pass") as err:
        parse_utio_config({"enabled": True, "entropy_pass": "fast"})
    assert "compiled" in str(err.value) and "exact" in str(err.value)
