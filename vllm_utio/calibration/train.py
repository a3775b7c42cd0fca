"""Teach a bucket's correction to make its span skippable (base weights frozen).

Objective: self-distillation, KL(full model || routed model) of the next-token
distribution, averaged over every position of a window. Each step draws a skip share
``p`` and lets a random ``p`` of the positions skip the bucket's span (LayerSkip-style
stochastic layer dropout, with UTIO's mixed semantics: positions that run the span
attend to the frozen-state K/V the skipping ones leave there, and every position attends
to the corrected skippers' K/V after the rejoin).

Why the step is exact but cheap: the correction acts only at the rejoin layer ``b``, so
nothing before ``b`` depends on it. A step restarts from the cached full-depth stream at
the span start ``a`` (every position runs layers ``< a``), runs the span without
autograd, and back-propagates only through layers ``[b, L)`` and the LM head. The
teacher's distribution is the cached full-depth stream through the head.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from vllm_utio.calibration.forward import (
    FullPass,
    logits_of,
    mixed_plans,
    run_layers,
    runs_mask,
)
from vllm_utio.calibration.plans import Span
from vllm_utio.corrections import Correction
from vllm_utio.evaluation.reference import ReferenceLlama


class TrainableCorrection(torch.nn.Module):
    """The corrections.py map with trainable tensors: delta = up(down(x)) + bias."""

    def __init__(self, init: Correction) -> None:
        super().__init__()
        self.down = torch.nn.Parameter(init.down.detach().float().clone())
        self.up = torch.nn.Parameter(init.up.detach().float().clone())
        self.bias = torch.nn.Parameter(init.bias.detach().float().clone())

    def delta(self, stream: torch.Tensor) -> torch.Tensor:
        return (stream @ self.down.T) @ self.up.T + self.bias

    def to_correction(self) -> Correction:
        return Correction(
            self.down.detach().clone(), self.up.detach().clone(), self.bias.detach().clone()
        )


@dataclass(frozen=True)
class TrainConfig:
    seconds: float  # wall-clock budget for this correction's optimisation steps
    max_steps: int | None = None  # if set, stop after this many steps (reproducible runs)
    lr: float = 5e-4
    skip_share: tuple[float, float] = (0.2, 0.9)  # per-step share drawn uniformly
    eval_every_s: float = 60.0
    seed: int = 0


@dataclass
class CurvePoint:
    train_seconds: float  # wall seconds spent in training steps (evaluation excluded)
    cpu_seconds: float  # process CPU seconds in training steps (2 threads -> up to 2x)
    steps: int
    metrics: dict[str, float]


@dataclass
class TrainResult:
    correction: Correction
    curve: list[CurvePoint] = field(default_factory=list)
    steps: int = 0
    train_seconds: float = 0.0
    cpu_seconds: float = 0.0


def kl_to_teacher(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(softmax(teacher) || softmax(student))."""
    t = torch.log_softmax(teacher_logits, -1)
    s = torch.log_softmax(student_logits, -1)
    return (t.exp() * (t - s)).sum(-1).mean()


def distill_loss(
    model: ReferenceLlama,
    fp: FullPass,
    span: Span,
    skip: torch.Tensor,
    corr: TrainableCorrection,
) -> torch.Tensor:
    """KL loss of one window with positions ``skip`` [T] skipping ``span``."""
    num_layers = model.num_layers
    plans = mixed_plans(skip, span.plan(num_layers), num_layers)
    runs = runs_mask(plans, num_layers)
    with torch.no_grad():
        at_rejoin = run_layers(model, fp.streams[span.start], span.start, span.stop, runs)
        teacher = logits_of(model, fp.streams[num_layers])
    fixes = {span.stop: [(skip, corr)]}
    final = run_layers(model, at_rejoin, span.stop, num_layers, runs, fixes)
    return kl_to_teacher(teacher, logits_of(model, final))


Evaluator = Callable[[Correction], dict[str, float]]


def train_correction(
    model: ReferenceLlama,
    passes: Sequence[FullPass],
    span: Span,
    init: Correction,
    cfg: TrainConfig,
    evaluate: Evaluator | None = None,
    progress: bool = True,
) -> TrainResult:
    """Adam on the correction until ``cfg.seconds`` of step time (or ``cfg.max_steps``
    steps); ``evaluate`` (not timed) is called at the start, every ``cfg.eval_every_s``
    and at the end."""
    gen = torch.Generator().manual_seed(cfg.seed)
    corr = TrainableCorrection(init)
    opt = torch.optim.Adam(corr.parameters(), lr=cfg.lr)
    result = TrainResult(init)
    next_eval = 0.0
    lo, hi = cfg.skip_share
    by_steps = cfg.max_steps is not None
    total = cfg.max_steps if by_steps else math.ceil(cfg.seconds)
    unit = "step" if by_steps else "s"
    with tqdm(total=total, desc=f"train {span}", unit=unit, disable=not progress) as bar:
        while True:
            if evaluate is not None and result.train_seconds >= next_eval:
                point = CurvePoint(
                    result.train_seconds,
                    result.cpu_seconds,
                    result.steps,
                    evaluate(corr.to_correction()),
                )
                result.curve.append(point)
                bar.set_postfix({k: f"{v:.4g}" for k, v in point.metrics.items()})
                next_eval += cfg.eval_every_s
            if result.train_seconds >= cfg.seconds or (
                cfg.max_steps is not None and result.steps >= cfg.max_steps
            ):
                break
            wall, cpu = time.perf_counter(), time.process_time()
            fp = passes[int(torch.randint(len(passes), (1,), generator=gen))]
            share = lo + (hi - lo) * float(torch.rand(1, generator=gen))
            skip = torch.rand(fp.ids.shape[0], generator=gen) < share
            loss = distill_loss(model, fp, span, skip, corr)
            opt.zero_grad()
            loss.backward()
            opt.step()
            dt = time.perf_counter() - wall
            result.train_seconds += dt
            result.cpu_seconds += time.process_time() - cpu
            result.steps += 1
            done = result.steps if by_steps else int(result.train_seconds)  # whole seconds
            bar.update(min(done, bar.total) - bar.n)
    if evaluate is not None and result.curve and result.curve[-1].steps != result.steps:
        result.curve.append(
            CurvePoint(
                result.train_seconds,
                result.cpu_seconds,
                result.steps,
                evaluate(corr.to_correction()),
            )
        )
    result.correction = corr.to_correction()
    return result
