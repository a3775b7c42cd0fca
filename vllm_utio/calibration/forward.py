"""Pieces of the reference forward, restartable at any layer and differentiable.

:class:`~vllm_utio.evaluation.reference.ReferenceLlama` defines the semantics (per-
position plans, frozen-state K/V fill, corrections where a span rejoins). Calibration
runs the same thing many times over the same windows, so it caches one full-depth pass
per window (the residual stream entering every layer) and restarts from the first layer
any position skips: before that layer every position's stream equals the full model's.
:func:`run_layers` repeats the reference's per-layer steps in the same order (so results
match ``ReferenceLlama.forward``; a test checks it) and keeps autograd on, which the
correction training needs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from vllm_utio.calibration.data import Window
from vllm_utio.evaluation.reference import ReferenceLlama

Plan = tuple[int, int]  # (keep_first, keep_last)


class Delta(Protocol):
    def delta(self, stream: torch.Tensor) -> torch.Tensor: ...


# layer index (num_layers = before the final norm) -> [(rows [T] bool, correction)]
Fixes = Mapping[int, Sequence[tuple[torch.Tensor, Delta]]]


@dataclass
class FullPass:
    """One window at full depth: ``streams`` [L + 1, T, H] enter each layer (the last
    enters the final norm); ``logp`` [T - 1] is log p(next token)."""

    window: Window
    streams: torch.Tensor
    logp: torch.Tensor

    @property
    def ids(self) -> torch.Tensor:
        return self.window.ids


def full_pass(model: ReferenceLlama, window: Window) -> FullPass:
    out = model.forward(window.ids, keep_kv=True)
    assert out.streams is not None
    logp = torch.log_softmax(out.logits[:-1], -1).gather(1, window.ids[1:, None]).squeeze(1)
    return FullPass(window, out.streams, logp)


class _Tables:
    """RoPE and causal-mask tables per sequence length (windows share one length)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def get(self, model: ReferenceLlama, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        key = (id(model), t)
        if key not in self._cache:
            cos, sin = model._rope_tables(torch.arange(t))
            future = torch.ones(t, t, dtype=torch.bool).triu(1)
            self._cache[key] = (cos, sin, future)
        return self._cache[key]


_TABLES = _Tables()


def runs_mask(plans: torch.Tensor, num_layers: int) -> torch.Tensor:
    """[T, L] bool: position t runs layer l under ``plans`` [T, 2] (keep_first, keep_last)."""
    layer = torch.arange(num_layers)[None, :]
    return (layer < plans[:, :1]) | (layer >= num_layers - plans[:, 1:])


def uniform_plans(plan: Plan, t: int) -> torch.Tensor:
    return torch.tensor([plan], dtype=torch.long).expand(t, 2)


def mixed_plans(skip: torch.Tensor, plan: Plan, num_layers: int) -> torch.Tensor:
    """Positions where ``skip`` [T] is True take ``plan``; the rest run full depth."""
    full = torch.tensor([num_layers, 0])
    return torch.where(skip[:, None], torch.tensor(plan), full)


def _apply(stream: torch.Tensor, fixes: Sequence[tuple[torch.Tensor, Delta]]) -> torch.Tensor:
    for rows, corr in fixes:
        if bool(rows.any()):
            idx = rows.nonzero().squeeze(1)
            stream = stream.index_add(0, idx, corr.delta(stream[idx]))
    return stream


def run_layers(
    model: ReferenceLlama,
    stream: torch.Tensor,
    start: int,
    stop: int,
    runs: torch.Tensor,
    fixes: Fixes | None = None,
    exclude_skipped_kv: bool = False,
) -> torch.Tensor:
    """The stream entering layer ``stop`` given ``stream`` [T, H] entering ``start``.

    ``runs`` [T, L] says which positions run which layer; ``fixes[i]`` are applied on
    entering layer ``i`` for ``start <= i < stop``, and ``fixes[L]`` when ``stop == L``.
    ``exclude_skipped_kv`` is a what-if, not UTIO's engine semantics: at each layer,
    queries ignore the keys of positions that skip it (instead of frozen-state K/V).
    """
    fixes = fixes or {}
    cos, sin, causal = _TABLES.get(model, stream.shape[0])
    own = torch.eye(stream.shape[0], dtype=torch.bool)
    for index in range(start, stop):
        stream = _apply(stream, fixes.get(index, ()))
        running = runs[:, index]
        if not bool(running.any()):
            continue  # nobody reads this layer's K/V
        layer = model.layers[index]
        kv = model._kv(layer, stream, cos, sin)  # every position writes K/V, frozen or not
        future = causal
        if exclude_skipped_kv:
            future = causal | ((~running)[None, :] & ~own)
        updated = model._layer_update(layer, stream, kv, (cos, sin), future)
        stream = torch.where(running[:, None], updated, stream)
    if stop == model.num_layers:
        stream = _apply(stream, fixes.get(stop, ()))
    return stream


def logits_of(model: ReferenceLlama, final_stream: torch.Tensor) -> torch.Tensor:
    """[T, V] fp32 logits from the stream entering the final norm."""
    return (model._rms_norm(final_stream, model.final_norm) @ model.lm_head.T).float()


def target_logp(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[T - 1]: log p(ids[t + 1]) under ``logits[t]``."""
    return torch.log_softmax(logits[:-1], -1).gather(1, ids[1:, None]).squeeze(1)


def correction_fixes(
    plans: torch.Tensor, corrections: Mapping[Plan, Delta], num_layers: int
) -> dict[int, list[tuple[torch.Tensor, Delta]]]:
    """Where each plan's correction applies (its rejoin layer), for its positions."""
    fixes: dict[int, list[tuple[torch.Tensor, Delta]]] = {}
    for (keep_first, keep_last), corr in corrections.items():
        if keep_first + keep_last >= num_layers:
            continue
        rows = (plans[:, 0] == keep_first) & (plans[:, 1] == keep_last)
        fixes.setdefault(num_layers - keep_last, []).append((rows, corr))
    return fixes


@dataclass
class Routed:
    """One window under per-position plans: ``logp`` [T - 1] of the targets and the
    argmax ``top1`` [T - 1] of each scored position."""

    logp: torch.Tensor
    top1: torch.Tensor


@torch.no_grad()
def routed_pass(
    model: ReferenceLlama,
    fp: FullPass,
    plans: torch.Tensor,
    corrections: Mapping[Plan, Delta] | None = None,
    exclude_skipped_kv: bool = False,
) -> Routed:
    """``fp``'s window under ``plans`` [T, 2], restarted at the first skipped layer."""
    num_layers = model.num_layers
    runs = runs_mask(plans, num_layers)
    skipped_any = (~runs).any(0).nonzero()
    start = int(skipped_any[0]) if len(skipped_any) else num_layers
    fixes = correction_fixes(plans, corrections or {}, num_layers)
    first_fix = min(fixes, default=num_layers)
    start = min(start, first_fix)
    stream = run_layers(
        model, fp.streams[start], start, num_layers, runs, fixes, exclude_skipped_kv
    )
    logits = logits_of(model, stream)
    return Routed(target_logp(logits, fp.ids), logits[:-1].argmax(-1))


def full_passes(
    model: ReferenceLlama, windows: Sequence[Window], progress: bool = True, desc: str = "full"
) -> list[FullPass]:
    from tqdm import tqdm

    return [full_pass(model, w) for w in tqdm(windows, desc=desc, unit="win", disable=not progress)]
