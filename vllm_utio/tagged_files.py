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
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (no __iter__)
    except Exception as err:  # SafetensorError is no OSError/ValueError and names no file
        raise ValueError(
            f"{path}: not a readable UTIO {what} file (safetensors: {err}); truncated or corrupted?"
        ) from None
    if meta.get("format") != fmt or meta.get("version") != version:
        raise ValueError(
            f"{path}: not a UTIO {what} file (metadata format={meta.get('format')!r}, "
            f"version={meta.get('version')!r}; expected {fmt!r} version {version})"
        )
    return meta, tensors


def read_format(path: str | Path, what: str) -> str | None:
    """The ``format`` tag of a safetensors file (None: untagged or not a file); a file
    safetensors cannot read raises a ValueError naming it."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        return None  # the loaders raise the not-found error
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format")
    except Exception as err:  # see load_tagged
        raise ValueError(
            f"{path}: not a readable UTIO {what} file (safetensors: {err}); truncated or corrupted?"
        ) from None
