"""The calibrated multi-bucket router: predicted cost of each bucket per token.

``vllm-utio calibrate`` fits it (calibration/routers.py); the engine runs it mid-forward
like the single-score probe (routing/probe.py). It reads the residual stream entering
the first skipped layer of the shallowest bucket (the output of ``routing_layer``),
standardizes it (``(x - mean) / scale``), and a linear map or a one-hidden-layer GELU
MLP gives one predicted cost per bucket (shallowest first). A token goes to the bucket
that maximises ``lam * saved_layers - cost`` if that gain is positive, else full depth;
``lam`` (compute per unit of predicted quality loss) is set by calibration to meet the
perplexity budget.

File (safetensors): ``mean`` [H], ``scale`` [H], ``w0``, ``b0`` (, ``w1``, ``b1``);
metadata ``format="utio-router"``, ``version="1"``, ``kind``, ``routing_layer``,
``target``, ``saved_layers`` (JSON list), ``lam``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_utio.tagged_files import load_tagged, save_tagged

ROUTER_FORMAT = "utio-router"
ROUTER_VERSION = "1"


def choose_levels(costs: torch.Tensor, saved: Sequence[int], lam: float) -> torch.Tensor:
    """[N] bucket index per row (shallowest first; -1 = full depth) from ``costs`` [N, B]
    (bucket order = ``saved``); a NaN cost rules its bucket out."""
    gain = lam * torch.tensor(saved, dtype=torch.float64)[None, :] - costs.double()
    gain = torch.nan_to_num(gain, nan=-math.inf)
    best = gain.argmax(1)
    return torch.where(gain.gather(1, best[:, None]).squeeze(1) > 0, best, -1)


@dataclass
class CostRouter:
    """Predicted cost per bucket from the hidden state at the routing layer."""

    kind: str  # "linear" | "mlp"
    mean: torch.Tensor  # [H]
    scale: torch.Tensor  # [H]
    weights: list[tuple[torch.Tensor, torch.Tensor]]  # (W [out, in], b [out]) per layer
    routing_layer: int
    saved_layers: list[int]  # layers each bucket skips, shallowest bucket first
    target: str = "kl"
    lam: float = 0.0

    @property
    def hidden_size(self) -> int:
        return int(self.mean.numel())

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, B] predicted cost of each bucket for hidden states [N, H]."""
        x = (hidden.float() - self.mean.float()) / self.scale.float()
        for i, (w, b) in enumerate(self.weights):
            x = x @ w.float().T + b.float()
            if i + 1 < len(self.weights):
                x = torch.nn.functional.gelu(x)
        return x

    def route(self, hidden: torch.Tensor, lam: float | None = None) -> torch.Tensor:
        """[N] bucket index (shallowest first; -1 = full depth) at ``lam`` (default: the
        calibrated one)."""
        lam = self.lam if lam is None else lam
        return choose_levels(self.scores(hidden), self.saved_layers, lam)

    def save(self, path: str | Path) -> None:
        tensors = {"mean": self.mean.contiguous(), "scale": self.scale.contiguous()}
        for i, (w, b) in enumerate(self.weights):
            tensors[f"w{i}"] = w.contiguous()
            tensors[f"b{i}"] = b.contiguous()
        save_tagged(
            path,
            tensors,
            ROUTER_FORMAT,
            ROUTER_VERSION,
            kind=self.kind,
            routing_layer=str(self.routing_layer),
            saved_layers=json.dumps(self.saved_layers),
            target=self.target,
            lam=repr(float(self.lam)),
        )

    @classmethod
    def load(cls, path: str | Path) -> CostRouter:
        meta, tensors = load_tagged(path, ROUTER_FORMAT, ROUTER_VERSION, "router")
        n = sum(1 for k in tensors if k.startswith("w"))
        return cls(
            kind=meta["kind"],
            mean=tensors["mean"],
            scale=tensors["scale"],
            weights=[(tensors[f"w{i}"], tensors[f"b{i}"]) for i in range(n)],
            routing_layer=int(meta["routing_layer"]),
            saved_layers=[int(s) for s in json.loads(meta["saved_layers"])],
            target=meta.get("target", "kl"),
            lam=float(meta.get("lam", "0")),
        )
