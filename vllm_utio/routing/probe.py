"""A learned probe router that scores tokens mid-forward, on the residual stream.

File format (safetensors): ``weight`` [H] and ``bias`` [1] (float32); metadata
``{"format": "utio-probe", "version": "1", "hidden_size": "H", "layer": "r"}``.
The probe reads the residual stream after layer ``r`` (the input of layer ``r + 1``),
RMS-normalizes it (scale-free) and scores ``sigmoid(weight . x / rms(x) + bias)`` in
[0, 1]; like the surrogate score, a low score sends the token shallower (bucket
``max_score`` thresholds). ``r`` must be a layer every bucket runs, so the decision is
made before any row leaves the batch; rows then move with gather/scatter, because the
batch order was fixed before the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_utio.config import UtioConfig, UtioConfigError
from vllm_utio.tagged_files import load_tagged, save_tagged

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


def load_checked_probe(cfg: UtioConfig, hidden_size: int) -> Probe:
    """The configured probe, checked against the model and the buckets (UtioConfigError)."""
    try:
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
