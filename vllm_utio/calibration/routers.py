"""Routers for calibration: signals and learned probes (fitting).

Every router here turns positions into a *cost* per bucket (lower = cheaper to skip);
:func:`choose_levels` then sends a position to the bucket that maximises
``lam * saved_layers - cost`` (full depth: 0), one scalar ``lam`` per operating point.

Signals follow vllm_utio/routing/signals.py and, like the engine, describe a position
from its *previous* step (position t - 1): output entropy and varentropy, outlier-ness
of the final-normed hidden state against the batch (the batch = the same position in
every window of the set, as concurrent decodes), and attention heat at the routing
layer. They are computed from the full-depth pass (the engine sees the previous step as
it was actually routed; here it is its full-depth version). Position 0 has no previous
step: every signal is NaN there and signal routers keep it at full depth.

Learned probes read the residual stream entering the first skipped layer of the
shallowest bucket (the output of the routing layer, the last layer every bucket runs),
so the engine can decide mid-forward. They are :class:`~vllm_utio.routing.cost_router.
CostRouter` objects (``ProbeRouter`` here): the engine runs them and owns their file
format.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from vllm_utio.calibration.forward import FullPass, logits_of
from vllm_utio.config import SignalWeights
from vllm_utio.evaluation.reference import ReferenceLlama
from vllm_utio.routing import signals
from vllm_utio.routing.cost_router import ROUTER_FORMAT, ROUTER_VERSION, CostRouter, choose_levels

# The router the engine runs (and its file format) lives on the engine side.
ProbeRouter = CostRouter
__all__ = ["ROUTER_FORMAT", "ROUTER_VERSION", "ProbeRouter", "choose_levels"]


# --------------------------------------------------------------------------- decisions


def band_levels(score: torch.Tensor, fraction: float, num_buckets: int) -> torch.Tensor:
    """UTIO's single-score rule as a 1-D family: the lowest-scoring ``fraction`` of the
    positions skip, split in equal bands from the shallowest bucket (lowest scores) to
    the deepest. NaN scores stay at full depth. Ties broken by position."""
    n = score.numel()
    order = torch.argsort(torch.nan_to_num(score.double(), nan=math.inf), stable=True)
    count = min(round(fraction * n), int((~score.isnan()).sum()))
    levels = torch.full((n,), -1, dtype=torch.long)
    for j in range(num_buckets):
        lo, hi = count * j // num_buckets, count * (j + 1) // num_buckets
        levels[order[lo:hi]] = j
    return levels


# --------------------------------------------------------------------------- signals


def _previous(values: torch.Tensor) -> torch.Tensor:
    """Shift [T] by one step: out[t] = values[t - 1], out[0] = NaN."""
    out = torch.full_like(values, math.nan)
    out[1:] = values[:-1]
    return out


def attention_output(
    model: ReferenceLlama, stream: torch.Tensor, layer: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention output before o_proj [T, Hq*D], values [T, Hkv*D]) of ``layer`` at
    full depth, for the stream [T, H] entering it."""
    cfg = model.config
    t = stream.shape[0]
    w = model.layers[layer]
    positions = torch.arange(t)
    k, v = model.kv_from_stream(layer, stream, positions)
    cos, sin = model._rope_tables(positions)
    x = model._rms_norm(stream, w.input_norm)
    q = model._rope((x @ w.q_proj.T).view(t, cfg.num_heads, cfg.head_dim), cos, sin)
    future = torch.ones(t, t, dtype=torch.bool).triu(1)
    return model._attention(q, k, v, future), v.reshape(t, -1)


@torch.no_grad()
def surrogate_signals(
    model: ReferenceLlama, passes: Sequence[FullPass], routing_layer: int
) -> dict[str, torch.Tensor]:
    """Each component per position of ``passes`` (concatenated), from the previous step."""
    ent, var, heat, normed = [], [], [], []
    for fp in passes:
        final = fp.streams[model.num_layers]
        e, v = signals.entropy_and_varentropy(logits_of(model, final))
        ent.append(_previous(e))
        var.append(_previous(v))
        o, val = attention_output(model, fp.streams[routing_layer + 1], routing_layer)
        heat.append(_previous(signals.attention_heat(o, val, model.config.num_kv_heads)))
        normed.append(model._rms_norm(final, model.final_norm))
    # Outlier-ness against the batch: row t of every window forms one decode batch.
    stacked = torch.stack(normed)  # [W, T, H]
    out = torch.stack([signals.outlierness(stacked[:, t]) for t in range(stacked.shape[1])], 1)
    outlier = torch.cat([_previous(row) for row in out])
    comps = {
        "entropy": torch.cat(ent),
        "varentropy": torch.cat(var),
        "attention_heat": torch.cat(heat),
        "outlier": outlier,
    }
    comps["surrogate"] = signals.combine(comps, SignalWeights())
    comps["surrogate"][comps["entropy"].isnan()] = math.nan
    return comps


# --------------------------------------------------------------------------- probes


def _standardize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.mean(0), x.std(0).clamp_min(1e-6)


def fit_linear_probe(
    x: torch.Tensor,
    y: torch.Tensor,
    routing_layer: int,
    saved_layers: list[int],
    alpha: float = 10.0,
    target: str = "kl",
) -> ProbeRouter:
    """Ridge regression of costs ``y`` [N, B] on standardized hidden states ``x`` [N, H]."""
    mean, scale = _standardize(x)
    z = ((x - mean) / scale).double()
    ym = y.double().mean(0)
    gram = z.T @ z + alpha * z.shape[0] / 100.0 * torch.eye(z.shape[1], dtype=torch.float64)
    w = torch.linalg.solve(gram, z.T @ (y.double() - ym))  # [H, B]
    b = ym - z.mean(0) @ w
    return ProbeRouter(
        "linear", mean, scale, [(w.T.float(), b.float())], routing_layer, saved_layers, target
    )


def fit_mlp_probe(
    x: torch.Tensor,
    y: torch.Tensor,
    routing_layer: int,
    saved_layers: list[int],
    hidden: int = 64,
    epochs: int = 60,
    weight_decay: float = 1e-2,
    seed: int = 0,
    target: str = "kl",
) -> ProbeRouter:
    """One-hidden-layer GELU MLP on standardized states, MSE to ``y``; the last 20% of
    rows are a validation split that picks the epoch (early stopping)."""
    gen = torch.Generator().manual_seed(seed)
    mean, scale = _standardize(x)
    z = (x - mean) / scale
    cut = int(0.8 * z.shape[0])
    net = torch.nn.Sequential(
        torch.nn.Linear(z.shape[1], hidden), torch.nn.GELU(), torch.nn.Linear(hidden, y.shape[1])
    )
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        net[2].bias.copy_(y[:cut].mean(0))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=weight_decay)
    best = (math.inf, [t.detach().clone() for t in net.state_dict().values()])
    for _ in range(epochs):
        for idx in torch.randperm(cut, generator=gen).split(256):
            loss = torch.nn.functional.mse_loss(net(z[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            val = float(torch.nn.functional.mse_loss(net(z[cut:]), y[cut:]))
        if val < best[0]:
            best = (val, [t.detach().clone() for t in net.state_dict().values()])
    w0, b0, w1, b1 = best[1]
    return ProbeRouter(
        "mlp", mean, scale, [(w0, b0), (w1, b1)], routing_layer, saved_layers, target
    )


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation over rows where both are finite."""
    ok = a.isfinite() & b.isfinite()
    ra = a[ok].double().argsort().argsort().double()
    rb = b[ok].double().argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))
