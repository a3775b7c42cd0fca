"""The pure-torch reference forward (vllm_utio.evaluation.reference) on the default model.

Full depth is checked against transformers; uniform plans against transformers with the
skipped layers removed; mixed plans (frozen-state KV fill) and exit corrections through
their structural consequences. No vLLM engine is started.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pytest
import torch

from vllm_utio.corrections import Correction
from vllm_utio.evaluation.reference import ReferenceLlama, ReferenceOutput
from vllm_utio.paths import default_model_dir

MODEL_DIR = default_model_dir()
if not (MODEL_DIR / "model.safetensors").is_file():
    pytest.skip(
        f"default model not built at {MODEL_DIR}: run `make setup`", allow_module_level=True
    )

NUM_LAYERS = 30
SHALLOW = (12, 10)  # skips layers [12, 20)
TRUNCATED = (6, 0)  # runs layers [0, 6) only
TEXT = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, "
    "France. It is named after the engineer Gustave Eiffel, whose company designed and "
    "built the tower."
)


@pytest.fixture(scope="module")
def ref() -> ReferenceLlama:
    return ReferenceLlama.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    ids = torch.tensor(tok.encode(TEXT).ids, dtype=torch.long)
    assert 30 <= len(ids) <= 50
    return ids


@pytest.fixture(scope="module")
def full(ref: ReferenceLlama, ids: torch.Tensor) -> ReferenceOutput:
    return ref.forward(ids)


@pytest.fixture(scope="module")
def hf_model():
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        MODEL_DIR, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


@contextmanager
def hf_layers(model, keep: Sequence[int]) -> Iterator[None]:
    """Temporarily remove every decoder layer not in ``keep`` from a transformers Llama."""
    layers, count = model.model.layers, model.config.num_hidden_layers
    model.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
    model.config.num_hidden_layers = len(keep)
    try:
        yield
    finally:
        model.model.layers, model.config.num_hidden_layers = layers, count


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids[None], use_cache=False).logits[0].float()


def assert_logits_match(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    # Both are fp32 with the same operations; only reduction order may differ, which
    # moves logits by ~1e-6 relative. 1e-4 of the logit scale (~3e-3 here) still
    # catches small slips: e.g. rms_norm_eps 1e-6 instead of 1e-5 moves them by 2e-2.
    tol = 1e-4 * theirs.abs().max().item()
    diff = (ours - theirs).abs().max().item()
    assert diff <= tol, f"max |logit diff| {diff:.3g} > {tol:.3g}"
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def correction(seed: int, scale: float, rank: int = 4, hidden: int = 576) -> Correction:
    gen = torch.Generator().manual_seed(seed)
    down = torch.randn(rank, hidden, generator=gen) * scale / hidden**0.5
    up = torch.randn(hidden, rank, generator=gen) * scale
    return Correction(down, up, None)


# ----------------------------------------------------------------------------- vs transformers


def test_full_depth_matches_transformers(ref, ids, full, hf_model) -> None:
    assert full.logits.shape == (len(ids), ref.config.vocab_size)
    assert full.logits.dtype == torch.float32
    assert_logits_match(full.logits, hf_logits(hf_model, ids))


@pytest.mark.parametrize("plan", [SHALLOW, TRUNCATED], ids=["skip-12-20", "truncate-6"])
def test_uniform_plan_matches_transformers_without_those_layers(ref, ids, hf_model, plan) -> None:
    # When every position skips the same span nobody attends to the frozen-state K/V,
    # so the plan is exactly the model with those layers deleted.
    keep_first, keep_last = plan
    keep = [i for i in range(NUM_LAYERS) if i < keep_first or i >= NUM_LAYERS - keep_last]
    ours = ref.forward(ids, [plan] * len(ids), keep_kv=False).logits
    with hf_layers(hf_model, keep):
        assert_logits_match(ours, hf_logits(hf_model, ids))


# ----------------------------------------------------------------------------- skipping


def test_skipped_positions_write_kv_from_frozen_stream(ref, ids, full) -> None:
    t, n_skip = len(ids), 10
    plans = [(NUM_LAYERS, 0)] * (t - n_skip) + [SHALLOW] * n_skip
    out = ref.forward(ids, plans)
    head, tail = slice(0, t - n_skip), slice(t - n_skip, t)
    assert out.keys is not None and out.values is not None and out.streams is not None
    assert full.keys is not None and full.values is not None and full.streams is not None
    assert out.keys.shape == (NUM_LAYERS, t, 3, 64)
    assert out.streams.shape == (NUM_LAYERS + 1, t, 576)

    # Earlier positions never see the later ones: bit-identical to full depth.
    assert torch.equal(out.logits[head], full.logits[head])
    assert torch.equal(out.keys[:, head], full.keys[:, head])
    assert torch.equal(out.values[:, head], full.values[:, head])
    # Everyone ran layers 0..11, so the stream entering layer 12 is unchanged.
    assert torch.equal(out.streams[: 12 + 1], full.streams[: 12 + 1])

    frozen = full.streams[12]
    for layer in range(12, 20):
        assert torch.equal(out.streams[layer, tail], frozen[tail]), f"layer {layer} moved"
        k, v = ref.kv_from_stream(layer, frozen)
        torch.testing.assert_close(out.keys[layer, tail], k[tail])
        torch.testing.assert_close(out.values[layer, tail], v[tail])
        if layer > 12:  # at full depth the stream has moved on by then
            assert (out.keys[layer, tail] - full.keys[layer, tail]).abs().max() > 1e-2
            assert (out.values[layer, tail] - full.values[layer, tail]).abs().max() > 1e-2
    assert (out.logits[tail] - full.logits[tail]).abs().amax(-1).min() > 1e-2


def test_truncation_damage_is_visible(ref, ids, full) -> None:
    full_nll = -torch.log_softmax(full.logits[:-1], -1).gather(1, ids[1:, None]).mean().item()
    assert full_nll == pytest.approx(-ref.log_probs_of_targets(ids).mean().item(), abs=1e-6)
    trunc_nll = -ref.log_probs_of_targets(ids, [TRUNCATED] * len(ids)).mean().item()
    assert full_nll < 4.0, f"full-depth NLL {full_nll:.2f} nats: not a sane LM?"
    assert trunc_nll > full_nll + 3.0, f"truncated NLL {trunc_nll:.2f} vs full {full_nll:.2f}"


# ----------------------------------------------------------------------------- corrections


@pytest.fixture(scope="module")
def mixed(ref: ReferenceLlama, ids: torch.Tensor):
    """Full depth, then SHALLOW at positions 15..24, TRUNCATED at 30..34, full after."""
    plans = [(NUM_LAYERS, 0)] * len(ids)
    plans[15:25] = [SHALLOW] * 10
    plans[30:35] = [TRUNCATED] * 5
    return plans, ref.forward(ids, plans)


def test_zero_correction_changes_nothing(ref, ids, mixed) -> None:
    plans, base = mixed
    zero = Correction(torch.zeros(4, 576), torch.zeros(576, 4), None)
    out = ref.forward(ids, plans, {SHALLOW: zero, TRUNCATED: zero})
    assert torch.equal(out.logits, base.logits)
    assert torch.equal(out.streams, base.streams)


def test_rejoin_correction_applies_at_rejoin_to_its_plan_only(ref, ids, mixed) -> None:
    plans, base = mixed
    corr = correction(seed=0, scale=0.5)
    out = ref.forward(ids, plans, {SHALLOW: corr})
    mine = torch.tensor([p == SHALLOW for p in plans])
    rejoin = NUM_LAYERS - SHALLOW[1]
    # Nothing changes before the rejoin layer, nor for other positions entering it.
    assert torch.equal(out.streams[:rejoin], base.streams[:rejoin])
    assert torch.equal(out.streams[rejoin, ~mine], base.streams[rejoin, ~mine])
    expected = base.streams[rejoin, mine] + corr.delta(base.streams[rejoin, mine])
    assert torch.equal(out.streams[rejoin, mine], expected)
    assert torch.equal(out.logits[:15], base.logits[:15])
    assert (out.logits[mine] - base.logits[mine]).abs().amax(-1).min() > 1e-3
    # Later positions may change too: they attend to the corrected rows' K/V from the
    # rejoin layer on. That is intended, so it is not asserted either way.


def test_truncation_correction_applies_before_final_norm_only(ref, ids, mixed) -> None:
    plans, base = mixed
    corr = correction(seed=1, scale=0.5)
    out = ref.forward(ids, plans, {TRUNCATED: corr})
    mine = torch.tensor([p == TRUNCATED for p in plans])
    # Applied after the last layer, it cannot reach any K/V: other positions are exact.
    assert torch.equal(out.streams[:NUM_LAYERS], base.streams[:NUM_LAYERS])
    assert torch.equal(out.logits[~mine], base.logits[~mine])
    last = base.streams[NUM_LAYERS, mine]
    assert torch.equal(out.streams[NUM_LAYERS, mine], last + corr.delta(last))
    assert (out.logits[mine] - base.logits[mine]).abs().amax(-1).min() > 1e-3


def test_plan_validation(ref, ids) -> None:
    with pytest.raises(ValueError, match="plans for"):
        ref.forward(ids, [SHALLOW] * (len(ids) - 1))
    with pytest.raises(ValueError, match=">= 0"):
        ref.forward(ids, [(-1, 0)] * len(ids))
