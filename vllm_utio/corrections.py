"""Exit corrections: a small map applied where a skipped stream rejoins.

File format (safetensors, one file per bucket): tensors ``down`` [r, H] and ``up``
[H, r] (low rank; a full affine map has r = H), optional ``bias`` [H]; metadata
``{"format": "utio-correction", "version": "1", "hidden_size": "H"}``. The corrected
residual stream is ``x + up @ (down @ x) + bias``. No file means identity.
"""

from __future__ import annotations

from pathlib import Path

import torch

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
    from safetensors.torch import save_file

    tensors = {"down": corr.down.contiguous(), "up": corr.up.contiguous(), "bias": corr.bias}
    meta = {"format": FORMAT, "version": VERSION, "hidden_size": str(corr.hidden_size)}
    save_file(tensors, str(path), metadata=meta)


def load_correction(
    path: str | Path, hidden_size: int, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> Correction:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"UTIO exit-correction file not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise ValueError(
                f"{path}: not a UTIO correction file (metadata format={meta.get('format')!r}, "
                f"version={meta.get('version')!r}; expected {FORMAT!r} version {VERSION})"
            )
        names = set(f.keys())
        tensors = {k: f.get_tensor(k) for k in names}
    corr = Correction(tensors["down"], tensors["up"], tensors.get("bias"))
    if corr.hidden_size != hidden_size:
        raise ValueError(
            f"{path}: correction is for hidden size {corr.hidden_size}, the model has {hidden_size}"
        )
    return corr.to(device=device, dtype=dtype)
