"""Calibration (vllm_utio.calibration): artifact format, the restartable forward, and a
small end-to-end calibration of the default model judged on held-out documents.

No vLLM engine is started; everything runs the pure-torch reference forward on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vllm_utio.calibration import data as cdata
from vllm_utio.calibration.artifact import (
    ArtifactError,
    artifact_to_utio_config,
    load_artifact,
    model_fingerprint,
    save_artifact,
)
from vllm_utio.calibration.routers import ProbeRouter, band_levels, choose_levels
from vllm_utio.config import parse_utio_config
from vllm_utio.corrections import Correction
from vllm_utio.paths import default_model_dir

MODEL_DIR = default_model_dir()
HAVE_MODEL = (MODEL_DIR / "model.safetensors").is_file()
needs_model = pytest.mark.skipif(not HAVE_MODEL, reason="default model not built: make setup")


def _fake_model(path: Path, seed: int) -> Path:
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    gen = torch.Generator().manual_seed(seed)
    save_file({"w": torch.randn(4, 8, generator=gen)}, str(path / "model.safetensors"))
    return path


def _router(hidden: int, buckets: int) -> ProbeRouter:
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(buckets, hidden, generator=gen)
    return ProbeRouter(
        "linear",
        torch.zeros(hidden),
        torch.ones(hidden),
        [(w, torch.zeros(buckets))],
        routing_layer=3,
        saved_layers=[4, 2],
        lam=0.25,
    )


def _manifest(fingerprint: str) -> dict:
    return {
        "model": {"fingerprint": fingerprint},
        "budget_ppl": 0.03,
        "buckets": [
            {"name": "deep_skip", "max_score": 0.2, "keep_first": 4, "keep_last": 2},
            {"name": "short_skip", "max_score": 0.4, "keep_first": 5, "keep_last": 3},
        ],
        "router": {"type": "probe-linear", "routing_layer": 3},
    }


def test_artifact_round_trip(tmp_path: Path) -> None:
    model = _fake_model(tmp_path / "model", seed=0)
    gen = torch.Generator().manual_seed(0)
    corr = Correction(
        torch.randn(2, 8, generator=gen), torch.randn(8, 2, generator=gen), torch.randn(8)
    )
    router = _router(8, 2)
    save_artifact(
        tmp_path / "art", _manifest(model_fingerprint(model)), {"deep_skip": corr}, router
    )

    art = load_artifact(tmp_path / "art", model)
    loaded = art.load_corrections(hidden_size=8)
    assert set(loaded) == {"deep_skip"}  # the other bucket has no correction: identity
    for name in ("down", "up", "bias"):
        assert torch.equal(getattr(loaded["deep_skip"], name), getattr(corr, name))
    hidden = torch.randn(5, 8, generator=gen)
    back = art.load_router()
    assert back is not None
    assert torch.equal(back.scores(hidden), router.scores(hidden))
    assert back.saved_layers == [4, 2] and back.lam == 0.25

    cfg = artifact_to_utio_config(art)
    parsed = parse_utio_config(cfg)
    assert [b.name for b in parsed.buckets] == ["deep_skip", "short_skip"]
    corr_path = Path(parsed.buckets[0].correction)
    assert corr_path.is_absolute() and corr_path.is_file()
    assert parsed.buckets[1].correction is None


def test_artifact_refuses_another_model(tmp_path: Path) -> None:
    model = _fake_model(tmp_path / "a", seed=0)
    other = _fake_model(tmp_path / "b", seed=1)  # same config, different weights
    save_artifact(tmp_path / "art", _manifest(model_fingerprint(model)), {}, None)
    with pytest.raises(ArtifactError, match="calibrated for another model"):
        load_artifact(tmp_path / "art", other)
    with pytest.raises(ArtifactError, match="not a calibration artifact"):
        load_artifact(tmp_path, model)


def test_split_is_deterministic_and_disjoint() -> None:
    docs = [cdata.Document(f"title {i}", f"text {i}") for i in range(200)]
    calib, held = cdata.split_documents(docs)
    again = cdata.split_documents(list(reversed(docs)))
    assert {d.title for d in held} == {d.title for d in again[1]}  # order does not matter
    assert not {d.title for d in calib} & {d.title for d in held}
    assert 40 < len(held) < 95
    fit, tune = cdata.split_calibration(calib)
    assert len(fit) + len(tune) == len(calib) and tune and fit


def test_decision_rules() -> None:
    nan = float("nan")
    costs = torch.tensor([[0.1, 0.1], [3.0, 0.3], [9.0, 9.0], [nan, 0.0], [nan, nan]])
    # lam * saved - cost: row 0 prefers the longer skip, row 1 the shorter, row 2 none;
    # a NaN cost rules its bucket out.
    assert choose_levels(costs, [4, 2], lam=0.2).tolist() == [0, 1, -1, 1, -1]
    score = torch.tensor([0.5, float("nan"), 0.1, 0.3, 0.2])
    assert band_levels(score, 0.4, 2).tolist() == [-1, -1, 0, -1, 1]


@pytest.fixture(scope="module")
def reference():
    from vllm_utio.evaluation.reference import ReferenceLlama

    torch.set_num_threads(1)  # fastest when other jobs share the cores
    return ReferenceLlama.from_pretrained(MODEL_DIR)


@needs_model
def test_restarted_forward_matches_reference(reference) -> None:
    from vllm_utio.calibration.forward import full_pass, mixed_plans, routed_pass

    tok = cdata.load_tokenizer(MODEL_DIR)
    window = cdata.make_windows(tok, [cdata.Document("t", "The cat sat on the mat. " * 20)], 48, 1)[
        0
    ]
    gen = torch.Generator().manual_seed(0)
    skip = torch.rand(48, generator=gen) < 0.5
    plans = mixed_plans(skip, (14, 12), reference.num_layers)
    corr = Correction(
        torch.randn(4, 576, generator=gen) * 0.01, torch.randn(576, 4, generator=gen) * 0.01, None
    )
    want = reference.log_probs_of_targets(
        window.ids, [tuple(p) for p in plans.tolist()], {(14, 12): corr}
    )
    got = routed_pass(reference, full_pass(reference, window), plans, {(14, 12): corr}).logp
    assert torch.equal(got, want)


@pytest.fixture(scope="module")
def calibrated(reference):
    from vllm_utio.calibration.pipeline import Prepared, Settings, calibrate, prepare

    settings = Settings(
        model=MODEL_DIR,
        budget=0.05,
        buckets=1,
        lengths=[2],
        min_first=15,
        max_start=17,
        window=96,
        fit_windows=10,
        tune_windows=6,
        held_windows=12,
        search_windows=2,
        rank=32,
        train_steps=2,  # reproducible: bounded by steps, not seconds
        curve_windows=2,
        progress=False,
    )
    p: Prepared = prepare(settings)
    return calibrate(settings, p)


@needs_model
def test_calibrated_plan_keeps_held_out_budget(calibrated) -> None:
    p, cal = calibrated
    # The judged windows come from documents calibration never saw.
    assert all(cdata.is_held_out(fp.window.title) for fp in p.held.passes)
    seen = {fp.window.title for fp in p.fit.passes + p.tune.passes}
    assert seen and not any(cdata.is_held_out(t) for t in seen)
    q = cal.quality["probe"]
    # Within the budget, allowing the reported bootstrap interval ...
    assert q["ci_low"] <= cal.settings.budget, q
    # ... while skipping a real share of layer-tokens.
    assert q["saved"] > 0.0, q


@needs_model
def test_learned_router_beats_random_at_equal_savings(calibrated) -> None:
    from vllm_utio.calibration.evaluate import evaluate_levels
    from vllm_utio.calibration.pipeline import probe_costs, random_levels_like

    p, cal = calibrated
    probe = cal.quality["probe"]
    levels = choose_levels(probe_costs(cal.router, p.held), cal.router.saved_layers, cal.router.lam)
    # Random routing with the same number of positions per bucket, a few draws.
    randoms = [
        evaluate_levels(p.model, p.held, cal.buckets, random_levels_like(levels, seed))
        for seed in range(3)
    ]
    assert all(r.saved == pytest.approx(probe["saved"]) for r in randoms)
    mean_random = sum(r.ppl_increase for r in randoms) / len(randoms)
    assert probe["ppl_increase"] < mean_random, (probe, [r.ppl_increase for r in randoms])


@needs_model
def test_training_is_bounded_by_steps_and_measured(calibrated) -> None:
    _, cal = calibrated
    (result,) = cal.training
    assert result.steps == 2
    # the curve: held-out quality before and after training, both finite
    assert [c.steps for c in result.curve] == [0, 2]
    assert all(v == v for c in result.curve for v in c.metrics.values())
