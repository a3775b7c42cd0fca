"""Small safetensors files tagged with a format id and version in their metadata.

UTIO's exit corrections and probe routers are stored this way, so a wrong file is
rejected with a clear message instead of failing on a missing tensor.
"""

from __future__ import annotations

from pathlib import Path

import torch


def save_tagged(
    path: str | Path, tensors: dict[str, torch.Tensor], fmt: str, version: str, **meta: str
) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": fmt, "version": version, **meta})


def load_tagged(
    path: str | Path, fmt: str, version: str, what: str
) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a file that must carry ``fmt``/``version``; ``what`` names it."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"UTIO {what} file not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != fmt or meta.get("version") != version:
            raise ValueError(
                f"{path}: not a UTIO {what} file (metadata format={meta.get('format')!r}, "
                f"version={meta.get('version')!r}; expected {fmt!r} version {version})"
            )
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    return meta, tensors
