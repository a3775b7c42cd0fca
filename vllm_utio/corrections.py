"""Exit corrections: a small map applied where a skipped stream rejoins.

File format (safetensors, one file per bucket): tensors ``down`` [r, H] and ``up``
[H, r] (low rank; a full affine map has r = H), optional ``bias`` [H]; metadata
``{"format": "utio-correction", "version": "1", "hidden_size": "H"}``. The corrected
residual stream is ``x + up @ (down @ x) + bias``. No file means identity.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vllm_utio.tagged_files import load_tagged, save_tagged

FORMAT = "utio-correction"
VERSION = "1"


class Correction(torch.nn.Module):
    def __init__(self, down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            raise ValueError(f"correction shapes do not fit: down {down.shape}, up {up.shape}")
        if down.shape[1] != up.shape[0]:
            raise ValueError("correction must map the hidden size onto itself")
        self.register_buffer("down", down)
        self.register_buffer("up", up)
        self.register_buffer("bias", bias if bias is not None else torch.zeros(up.shape[0]))

    @property
    def hidden_size(self) -> int:
        return int(self.up.shape[0])

    def delta(self, stream: torch.Tensor) -> torch.Tensor:
        """What to add to the residual stream ``stream`` [N, H]."""
        x = stream.to(self.down.dtype)
        out = (x @ self.down.T) @ self.up.T + self.bias
        return out.to(stream.dtype)


def save_correction(path: str | Path, corr: Correction) -> None:
    tensors = {"down": corr.down.contiguous(), "up": corr.up.contiguous(), "bias": corr.bias}
    save_tagged(path, tensors, FORMAT, VERSION, hidden_size=str(corr.hidden_size))


def load_correction(
    path: str | Path, hidden_size: int, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> Correction:
    _, tensors = load_tagged(path, FORMAT, VERSION, "correction")
    missing = [k for k in ("down", "up") if k not in tensors]
    if missing:
        raise ValueError(f"{path}: correction file lacks tensor(s) {missing}")
    try:  # the workers load this too: every error names the file
        corr = Correction(tensors["down"], tensors["up"], tensors.get("bias"))
    except (ValueError, RuntimeError) as err:
        raise ValueError(f"{path}: {err}") from None
    if corr.bias.shape != (corr.hidden_size,):
        raise ValueError(
            f"{path}: correction bias has shape {list(corr.bias.shape)}, "
            f"expected [{corr.hidden_size}]"
        )
    if corr.hidden_size != hidden_size:
        raise ValueError(
            f"{path}: correction is for hidden size {corr.hidden_size}, the model has {hidden_size}"
        )
    return corr.to(device=device, dtype=dtype)
