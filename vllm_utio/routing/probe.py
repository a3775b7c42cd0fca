"""A learned probe router that scores tokens mid-forward, on the residual stream.

File format (safetensors): ``weight`` [H] and ``bias`` [1] (float32); metadata
``{"format": "utio-probe", "version": "1", "hidden_size": "H", "layer": "r"}``.
The probe reads the residual stream after layer ``r`` (the input of layer ``r + 1``),
RMS-normalizes it (scale-free) and scores ``sigmoid(weight . x / rms(x) + bias)`` in
[0, 1]; like the surrogate score, a low score sends the token shallower (bucket
``max_score`` thresholds). ``r`` must be a layer every bucket runs, so the decision is
made before any row leaves the batch; rows then move with gather/scatter, because the
batch order was fixed before the step.

The engine also runs the calibrated multi-bucket router (routing/cost_router.py,
``utio-router`` files from ``vllm-utio calibrate``) at the same point;
:func:`load_checked_probe` accepts either file and returns a :class:`MidForwardRouter`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from vllm_utio.config import UtioConfig, UtioConfigError
from vllm_utio.routing.bucketing import levels_from_scores
from vllm_utio.routing.cost_router import ROUTER_FORMAT, CostRouter
from vllm_utio.tagged_files import load_tagged, read_format, save_tagged

FORMAT = "utio-probe"
VERSION = "1"


@dataclass
class Probe:
    weight: torch.Tensor  # [H]
    bias: torch.Tensor  # [1]
    layer: int

    def scores(self, stream: torch.Tensor) -> torch.Tensor:
        """Score per row of ``stream`` [N, H] (float32, in [0, 1])."""
        x = stream.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return torch.sigmoid(x @ self.weight.float() + self.bias.float())

    def levels(self, stream: torch.Tensor, max_scores: list[float]) -> np.ndarray:
        """Engine level per row (0 = full depth) by the buckets' ``max_score``."""
        return levels_from_scores(self.scores(stream).cpu().numpy(), max_scores)


class MidForwardRouter(Protocol):
    """What the executor calls after ``layer``: a level per row (0 = full depth)."""

    layer: int

    def levels(self, stream: torch.Tensor, max_scores: list[float]) -> np.ndarray: ...


@dataclass
class CostProbe:
    """A calibrated CostRouter in the engine's level convention (thresholds unused: its
    own ``lam`` decides)."""

    router: CostRouter

    @property
    def layer(self) -> int:
        return self.router.routing_layer

    def levels(self, stream: torch.Tensor, max_scores: list[float]) -> np.ndarray:
        index = self.router.route(stream).cpu().numpy()  # shallowest first, -1 = full
        return np.where(index < 0, 0, len(max_scores) - index).astype(np.int64)


def save_probe(path: str | Path, probe: Probe) -> None:
    tensors = {"weight": probe.weight.float().contiguous(), "bias": probe.bias.float().reshape(1)}
    meta = {"hidden_size": str(probe.weight.numel()), "layer": str(probe.layer)}
    save_tagged(path, tensors, FORMAT, VERSION, **meta)


def load_probe(path: str | Path, hidden_size: int) -> Probe:
    meta, tensors = load_tagged(path, FORMAT, VERSION, "probe")
    weight, bias = tensors["weight"], tensors["bias"]
    if weight.numel() != hidden_size:
        raise ValueError(
            f"{path}: probe is for hidden size {weight.numel()}, model has {hidden_size}"
        )
    return Probe(weight.reshape(-1), bias.reshape(1), int(meta["layer"]))


def _file_format(path: str | Path) -> str | None:
    return read_format(path, "probe")  # a corrupt file: ValueError naming it


def _load_cost_probe(path: str | Path, cfg: UtioConfig, hidden_size: int, num_layers: int):
    router = CostRouter.load(path)
    if router.hidden_size != hidden_size:
        raise ValueError(
            f"{path}: router is for hidden size {router.hidden_size}, model has {hidden_size}"
        )
    want = [len(b.skipped(num_layers)) for b in cfg.buckets]
    if router.saved_layers != want:
        raise ValueError(
            f"{path}: router was calibrated for buckets skipping {router.saved_layers} "
            f"layers (shallowest first), but the configured buckets skip {want}"
        )
    return CostProbe(router)


def load_checked_probe(cfg: UtioConfig, hidden_size: int, num_layers: int) -> MidForwardRouter:
    """The configured probe (utio-probe or utio-router file), checked against the model
    and the buckets (UtioConfigError)."""
    try:
        if _file_format(cfg.probe_path) == ROUTER_FORMAT:
            probe: MidForwardRouter = _load_cost_probe(cfg.probe_path, cfg, hidden_size, num_layers)
        else:
            probe = load_probe(cfg.probe_path, hidden_size)
    except (OSError, ValueError) as err:
        raise UtioConfigError(f"UTIO config field 'probe_path': {err}") from None
    last_shared = min(b.keep_first for b in cfg.buckets) - 1
    if not 0 <= probe.layer <= last_shared:
        raise UtioConfigError(
            f"UTIO config field 'probe_path': the probe reads layer {probe.layer}, but every "
            f"bucket must run it; allowed: 0..{last_shared} (the shallowest keep_first - 1)"
        )
    return probe
