"""The quality harness (vllm_utio.evaluation.quality): the forcing processor's bookkeeping,
teacher-forced engine log-probs against the exact reference, no loss at full depth, and
visible damage under a shallow plan.

Engine tests reuse the session engines. They were built without the forcing processor
(adding it to ENGINE_KW would make vLLM import vllm_utio in the no-plugin baseline
process of test_engine_foundation), so it is attached to their running workers; it
leaves requests without its extra_args key untouched, so other tests see no change.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import BUCKETS, NUM_LAYERS, model_path

from vllm_utio.evaluation.quality import (
    FORCE_KEY,
    ReferenceForcing,
    Window,
    bootstrap_ci,
    evaluate,
    greedy_agreement,
    make_windows,
    teacher_forced_logprobs,
)

FULL = (NUM_LAYERS, 0)
PLANS = {None: FULL, **{b["name"]: (b["keep_first"], b["keep_last"]) for b in BUCKETS}}
PROMPT_LEN = 4
TEXT = (
    "Every spring the river rises with meltwater from the mountains, floods the low fields "
    "along its banks and leaves behind a layer of fine silt. Farmers in the valley have "
    "planted rice and beans in that soil for centuries, and the town market still opens "
    "on the day the water starts to fall."
)
DOCS = [
    "The old lighthouse stands on a rock at the mouth of the harbour. Its lamp was lit by "
    "hand until the keepers left in the nineteen sixties, and today a small museum in the "
    "base tells the story of the ships that were lost on the reef nearby.",
    "To bake a simple loaf, mix flour, water, salt and a little yeast, knead the dough until "
    "it is smooth, and let it rise in a warm place for about an hour. Shape it, let it rise "
    "again, and bake it in a hot oven until the crust is brown.",
    "A violin has four strings tuned a fifth apart. The player draws a bow of horsehair "
    "across the strings with one hand and presses them against the fingerboard with the "
    "other, which changes the length of the vibrating string and so the pitch of the note.",
]
EVAL_KW = {
    "window": 64,
    "prompt_len": 1,
    "greedy_prompt_count": 3,
    "greedy_prompt_len": 16,
    "greedy_tokens": 16,
}
# bf16 engine vs fp32 reference. Measured on TEXT: mean |d log p| 0.040-0.045 nats and at
# most 0.16 at any token, at full depth as under plans (bf16 rounding through 30 layers, not
# routing); reading the wrong plan is off by 0.7-1.3 nats on average.
MEAN_TOL = 0.06
MAX_TOL = 0.4
# The engine may flip the argmax only where the reference's top-2 gap is within its error.
# This small model has many near-ties (only ~20 of 54 positions have a gap above this), so
# overall agreement is 0.91-0.98 here; the wrong plan's reference agrees on 0.50-0.67.
CONFIDENT_MARGIN = 2 * MAX_TOL
MIN_AGREEMENT = 0.85


# --------------------------------------------------------------------------- no engine


def _params(forced: list[int] | None):
    from vllm import SamplingParams

    return SamplingParams(extra_args={FORCE_KEY: forced} if forced else None)


def test_forcing_follows_rows_and_output_position() -> None:
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    proc = ReferenceForcing(None, torch.device("cpu"), False)
    out_a: list[int] = []
    out_b: list[int] = [9]  # one token already generated
    added = [
        (0, _params([3, 4]), None, out_a),
        (1, _params(None), None, []),
        (2, _params([5, 6]), None, out_b),
    ]
    proc.update_state(BatchUpdate(3, [], added, []))
    logits = proc.apply(torch.zeros(3, 8))
    assert logits[0].argmax() == 3 and torch.isinf(logits[0]).sum() == 7
    assert torch.equal(logits[1], torch.zeros(8))  # no forcing asked
    assert logits[2].argmax() == 6  # position = length of the output so far
    # a swap (UTIO's reorder) moves the state with the request
    proc.update_state(BatchUpdate(3, [], [], [(0, 2, MoveDirectionality.SWAP)]))
    out_a.append(3)
    logits = proc.apply(torch.zeros(3, 8))
    assert logits[2].argmax() == 4 and logits[0].argmax() == 6
    # done or removed requests are left alone
    out_a.append(4)
    proc.update_state(BatchUpdate(3, [0], [], []))
    assert torch.equal(proc.apply(torch.zeros(3, 8)), torch.zeros(3, 8))


def test_windows_greedy_agreement_and_bootstrap() -> None:
    docs = [list(range(10)), list(range(100, 103)), list(range(200, 205))]
    windows = make_windows(docs, window=4, prompt_len=1, max_windows_per_doc=None, prefix=[7])
    # doc 0 -> [0..3], [4..7]; its 2-token tail and the 3-token doc 1 score < 2 tokens
    assert [(w.doc, w.tokens) for w in windows] == [
        (0, (7, 0, 1, 2, 3)),
        (0, (7, 4, 5, 6, 7)),
        (2, (7, 200, 201, 202, 203)),
    ]
    assert windows[0].continuation == [1, 2, 3] and windows[0].prefix_len == 1
    assert len(make_windows(docs, window=4, max_windows_per_doc=1)) == 2
    assert len(make_windows(docs, window=4, max_windows_per_doc=None, max_tokens=3)) == 2

    g = greedy_agreement([[1, 2, 3, 4], [1, 2, 3, 4]], [[1, 2, 0, 4], [1, 2, 3, 4]])
    assert g["token_agreement"] == 7 / 8 and g["mean_first_divergence"] == (2 + 4) / 2

    sums = np.array([[10.0, 12.0, 5.0, 4.0]] * 3)
    lo, hi = bootstrap_ci(sums, lambda s: s[..., 3] / s[..., 2])
    assert lo == hi == pytest.approx(0.8)  # identical documents: no spread


# --------------------------------------------------------------------------- engines


def _attach_forcing(wrapper) -> int:
    """Runs in the worker: add a ReferenceForcing to the live batch's processors."""
    from vllm_utio.evaluation.quality import ReferenceForcing as Forcing

    runner = getattr(wrapper, "worker", wrapper).model_runner
    procs = runner.input_batch.logitsprocs
    if not any(isinstance(p, Forcing) for p in procs.all):
        procs.non_argmax_invariant.append(Forcing(runner.vllm_config, runner.device, False))
    return sum(isinstance(p, Forcing) for p in procs.all)


@pytest.fixture(scope="module")
def engines(vanilla_llm, forced_llm):
    for llm in (vanilla_llm, forced_llm):
        assert llm.collective_rpc(_attach_forcing) == [1]
    return vanilla_llm, forced_llm


@pytest.fixture(scope="module")
def ref():
    from vllm_utio.evaluation.reference import ReferenceLlama

    return ReferenceLlama.from_pretrained(model_path())


def _reference(
    ref, ids: torch.Tensor, plan: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per continuation token: reference log p, argmax and top-2 gap (nats) where it is
    predicted; prompt positions run full depth, decode positions ``plan``."""
    plans = [FULL] * PROMPT_LEN + [plan] * (len(ids) - PROMPT_LEN)
    target = ref.log_probs_of_targets(ids, plans)[PROMPT_LEN - 1 :]
    logits = ref.forward(ids, plans, keep_kv=False).logits[PROMPT_LEN - 1 : -1]
    top2 = torch.log_softmax(logits, dim=-1).topk(2, dim=-1)
    gap = top2.values[:, 0] - top2.values[:, 1]
    return target.numpy(), top2.indices[:, 0].numpy(), gap.numpy()


@pytest.mark.engine
@pytest.mark.parametrize("bucket", [None, "shallow", "mid"], ids=["full", "shallow", "mid"])
def test_teacher_forced_logprobs_match_reference(engines, ref, bucket) -> None:
    _, llm = engines
    ids = llm.get_tokenizer().encode(TEXT, add_special_tokens=False)
    assert 50 <= len(ids) <= 70
    extra = {"utio_bucket": bucket} if bucket else None
    got = teacher_forced_logprobs(llm, [Window(0, tuple(ids), PROMPT_LEN)], extra)[0]
    ids_t = torch.tensor(ids)
    want, top1, gap = _reference(ref, ids_t, PLANS[bucket])
    diff = np.abs(got.logprobs - want)
    agree = got.top1 == top1
    confident = gap > CONFIDENT_MARGIN
    print(
        f"{bucket or 'full'}: {len(diff)} tokens, mean |d| {diff.mean():.4f}, max "
        f"{diff.max():.4f}, top-1 agreement {agree.mean():.3f} "
        f"({agree[confident].mean():.3f} of {confident.sum()} confident)"
    )
    assert diff.mean() < MEAN_TOL and diff.max() < MAX_TOL
    assert agree[confident].all() and agree.mean() >= MIN_AGREEMENT
    if bucket is not None:
        # the comparison can tell plans apart: full depth is the wrong reference here
        wrong, wrong_top1, _ = _reference(ref, ids_t, FULL)
        wrong_diff = np.abs(got.logprobs - wrong).mean()
        wrong_agree = (got.top1 == wrong_top1).mean()
        print(f"  vs full-depth reference: mean |d| {wrong_diff:.3f}, top-1 {wrong_agree:.3f}")
        assert wrong_diff > 5 * MEAN_TOL and wrong_agree < MIN_AGREEMENT


@pytest.mark.engine
def test_full_depth_plan_reports_no_loss(engines) -> None:
    vanilla, forced = engines
    # forced router, no bucket asked: every step runs full depth through UTIO's executor
    report = evaluate(vanilla, forced, DOCS, **EVAL_KW)
    print(report.to_dict())
    assert report.documents == 3 and report.scored_tokens > 100
    assert report.top1_agreement == 1.0 and report.top1_agreement_ci == (1.0, 1.0)
    assert report.ppl_utio == pytest.approx(report.ppl_full, rel=1e-6)
    assert report.mean_abs_logprob_diff < 1e-6
    assert report.greedy["token_agreement"] == 1.0
    assert report.routing["teacher_forced"]["saved_fraction"] == 0.0


@pytest.mark.engine
def test_shallow_plan_damage_is_visible(engines) -> None:
    vanilla, forced = engines
    report = evaluate(vanilla, forced, DOCS, utio_extra_args={"utio_bucket": "shallow"}, **EVAL_KW)
    print(report.to_dict())
    assert report.ppl_utio / report.ppl_full > 1.5
    assert report.ppl_delta_ci[0] > 0.2 and report.top1_agreement < 0.9
    # every scored token came out of a decode step that ran the shallow plan; only the
    # prompts' prefill ran full depth
    stats = report.routing["teacher_forced"]
    assert stats["tokens_per_level"]["shallow"] == report.scored_tokens
    assert stats["tokens_per_level"]["full"] == report.windows * report.prompt_len
    assert stats["saved_fraction"] > 0.2
