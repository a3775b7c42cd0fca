"""Exit adapters: ridge least squares from the frozen stream to the true one.

For a span ``[a, b)``, a skipped token's stream leaves the span unchanged (``x``, the
stream entering layer ``a``) while the full model's would be ``y``, the stream entering
layer ``b``. The adapter fits ``y - x ~= x W + c`` on calibration tokens (ridge, inputs
centred) and is stored in the corrections.py format (``delta = up(down(x)) + bias``).
Low rank ``r`` is reduced-rank regression: the fitted deltas are projected onto their
top-``r`` right singular vectors, the best rank-``r`` map for the same least squares.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vllm_utio.calibration.forward import FullPass
from vllm_utio.calibration.plans import Span
from vllm_utio.corrections import Correction


def span_pairs(passes: Sequence[FullPass], span: Span) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) rows over every position of ``passes``: [N, H] each."""
    x = torch.cat([p.streams[span.start] for p in passes])
    y = torch.cat([p.streams[span.stop] for p in passes])
    return x.double(), y.double()


def _ridge(x: torch.Tensor, d: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """W [H, H], c [H] minimizing |x W + c - d|^2 + lam |W|^2, lam = alpha * mean var(x)."""
    mx, md = x.mean(0), d.mean(0)
    xc = x - mx
    gram = xc.T @ xc
    lam = alpha * float(gram.diagonal().mean())
    w = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), xc.T @ (d - md))
    return w, md - mx @ w


def _low_rank(x: torch.Tensor, w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(down [r, H], up [H, r]) with x @ down.T @ up.T the rank-r projection of x @ w."""
    xc = x - x.mean(0)
    _, _, vh = torch.linalg.svd(xc @ w, full_matrices=False)
    v = vh[:rank].T  # [H, r]
    return (w @ v).T.contiguous(), v.contiguous()


def fit_adapter(
    x: torch.Tensor, y: torch.Tensor, rank: int | None = None, alpha: float = 1e-3
) -> Correction:
    """Ridge adapter x -> y as a Correction (fp32); ``rank`` None = full rank."""
    d = y - x
    w, c = _ridge(x, d, alpha)
    hidden = x.shape[1]
    if rank is None or rank >= hidden:
        down, up = w.T.contiguous(), torch.eye(hidden, dtype=w.dtype)
    else:
        down, up = _low_rank(x, w, rank)
        c = d.mean(0) - x.mean(0) @ down.T @ up.T
    return Correction(down.float(), up.float(), c.float())


def adapter_mse(corr: Correction, x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean squared error of the corrected stream against the true one, relative to
    the uncorrected error (1.0 = no better than identity)."""
    xf = x.float()
    fixed = xf + corr.delta(xf)
    return float(((fixed - y.float()) ** 2).sum() / ((xf - y.float()) ** 2).sum())


def fit_adapter_cv(
    train: Sequence[FullPass],
    val: Sequence[FullPass],
    span: Span,
    rank: int | None = None,
    alphas: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1),
) -> tuple[Correction, float]:
    """Fit on ``train`` for each ridge strength, keep the best on ``val`` (relative MSE),
    then refit on both. Returns (adapter, its validation relative MSE)."""
    x, y = span_pairs(train, span)
    xv, yv = span_pairs(val, span)
    scored = [(adapter_mse(fit_adapter(x, y, rank, a), xv, yv), a) for a in alphas]
    best_mse, best_alpha = min(scored)
    xa, ya = torch.cat([x, xv]), torch.cat([y, yv])
    return fit_adapter(xa, ya, rank, best_alpha), best_mse
