"""Checks that a calibration artifact is whole and that its manifest tells the truth.

Run in the user's process when ``"artifact"`` is expanded (:func:`vllm_utio.artifact.
load_artifact`), before any engine process starts: a missing, truncated or corrupted
artifact, or a manifest that lies about shapes, fails here with an :class:`ArtifactError`
naming the file and what is wrong, never in a worker and never as a half-loaded engine
that breaks on its first request. Every weights file is read through safetensors (no
pickle), and may only be a plain file name inside the artifact directory: a manifest
cannot point UTIO at any other path.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from vllm_utio.config import UtioConfigError


class ArtifactError(UtioConfigError):
    """The artifact is unreadable or does not belong to the given model."""


# manifest bucket fields: name -> allowed Python types (bool is no int here)
_BUCKET_FIELDS: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "max_score": (int, float),
    "keep_first": (int,),
    "keep_last": (int,),
}


def read_manifest(directory: Path, manifest_name: str) -> dict[str, Any]:
    """The manifest as a dict; a missing directory or file, or text that is not a JSON
    object (a truncated copy), is an :class:`ArtifactError`."""
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: no such directory; not a calibration artifact")
    file = directory / manifest_name
    if not file.is_file():
        raise ArtifactError(f"{directory}: no {manifest_name}; not a calibration artifact")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(
            f"{file}: not valid JSON ({err}); the artifact is truncated or corrupted"
        ) from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{file}: must hold a JSON object, got {type(manifest).__name__}")
    return manifest


def check_manifest(manifest: Mapping[str, Any], file: Path) -> None:
    """Required fields and their types (format/version are checked by the caller)."""
    if not isinstance(manifest.get("model"), dict):
        raise ArtifactError(f"{file}: field 'model' must be an object with the fingerprint")
    buckets = manifest.get("buckets")
    if not isinstance(buckets, list) or not buckets:
        raise ArtifactError(f"{file}: field 'buckets' must be a non-empty list of buckets")
    for i, bucket in enumerate(buckets):
        if not isinstance(bucket, dict):
            raise ArtifactError(f"{file}: buckets[{i}] must be an object")
        for name, types in _BUCKET_FIELDS.items():
            value = bucket.get(name)
            if isinstance(value, bool) or not isinstance(value, types):
                allowed = " or ".join(t.__name__ for t in types)
                raise ArtifactError(f"{file}: buckets[{i}].{name} must be {allowed}, got {value!r}")
        if bucket.get("correction") is not None:
            plain_file_name(bucket["correction"], file, f"buckets[{i}].correction")
    router = manifest.get("router", {})
    if not isinstance(router, dict):
        raise ArtifactError(f"{file}: field 'router' must be an object")
    if router.get("weights") is not None:
        plain_file_name(router["weights"], file, "router.weights")


def plain_file_name(value: Any, file: Path, field: str) -> str:
    """A file name inside the artifact directory: no directories, no absolute paths."""
    if (
        not isinstance(value, str)
        or not value
        or value in (".", "..")
        or Path(value).name != value
        or "\\" in value
    ):
        raise ArtifactError(
            f"{file}: {field} must be a plain file name inside the artifact directory, "
            f"got {value!r}"
        )
    return value


def model_shape(model_path: str | Path) -> tuple[int | None, int | None]:
    """(hidden_size, num_hidden_layers) from the model's config.json (None: not given)."""
    try:
        config = json.loads((Path(model_path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, None  # the fingerprint check has already read it
    hidden, layers = config.get("hidden_size"), config.get("num_hidden_layers")
    return (
        hidden if isinstance(hidden, int) else None,
        layers if isinstance(layers, int) else None,
    )


def check_files(
    directory: Path, manifest: Mapping[str, Any], file: Path, model_path: str | Path
) -> None:
    """Load every file the manifest names and check shapes against the manifest and model."""
    hidden, num_layers = model_shape(model_path)
    declared = manifest["model"]
    for key, actual in (("hidden_size", hidden), ("num_layers", num_layers)):
        said = declared.get(key)
        if said is not None and actual is not None and said != actual:
            raise ArtifactError(
                f"{file}: model.{key} is {said!r}, but the model at {model_path} has {actual}"
            )
    hidden = hidden if hidden is not None else declared.get("hidden_size")
    buckets = manifest["buckets"]
    for i, bucket in enumerate(buckets):
        if num_layers is not None and bucket["keep_first"] + bucket["keep_last"] >= num_layers:
            raise ArtifactError(
                f"{file}: buckets[{i}] keeps {bucket['keep_first']} + {bucket['keep_last']} "
                f"layers; the model has {num_layers}, allowed: fewer in total"
            )
        if bucket.get("correction") is not None:
            _check_correction(directory / bucket["correction"], hidden)
    router = manifest.get("router", {})
    if router.get("weights") is not None:
        _check_router(directory / router["weights"], router, buckets, hidden, num_layers, file)


def _check_correction(path: Path, hidden: int | None) -> None:
    from vllm_utio.corrections import load_correction

    try:
        corr = load_correction(path, hidden or _file_hidden(path), torch.float32)
        out = corr.delta(torch.zeros(1, corr.hidden_size))
    except (OSError, ValueError, RuntimeError) as err:
        raise ArtifactError(_named(path, err)) from None
    _check_finite(path, {"down": corr.down, "up": corr.up, "bias": corr.bias})
    if tuple(out.shape) != (1, corr.hidden_size):  # pragma: no cover (shapes checked above)
        raise ArtifactError(f"{path}: correction maps [1, H] to {list(out.shape)}")


def _file_hidden(path: Path) -> int:
    """The hidden size a correction file itself declares (no model config to check)."""
    from vllm_utio.tagged_files import load_tagged

    meta, tensors = load_tagged(path, "utio-correction", "1", "correction")
    up = tensors.get("up")
    return int(up.shape[0]) if up is not None and up.ndim == 2 else int(meta["hidden_size"])


def _check_router(
    path: Path,
    declared: Mapping[str, Any],
    buckets: list[dict[str, Any]],
    hidden: int | None,
    num_layers: int | None,
    file: Path,
) -> None:
    from vllm_utio.routing.cost_router import CostRouter

    try:
        router = CostRouter.load(path)
    except KeyError as err:
        raise ArtifactError(f"{path}: router file lacks {err}") from None
    except (OSError, ValueError) as err:
        raise ArtifactError(_named(path, err)) from None
    tensors = {"mean": router.mean, "scale": router.scale}
    for j, (w, b) in enumerate(router.weights):
        tensors[f"w{j}"], tensors[f"b{j}"] = w, b
    _check_finite(path, tensors)
    if hidden is not None and router.hidden_size != hidden:
        raise ArtifactError(
            f"{path}: router reads hidden size {router.hidden_size}, the model has {hidden}"
        )
    try:  # the chain of layers must map [1, H] to one cost per bucket
        out = router.scores(torch.zeros(1, router.hidden_size))
    except RuntimeError as err:
        raise ArtifactError(f"{path}: router layer shapes do not chain: {err}") from None
    if tuple(out.shape) != (1, len(buckets)):
        raise ArtifactError(
            f"{path}: router gives {list(out.shape)[1:]} costs per token, "
            f"the manifest has {len(buckets)} buckets"
        )
    want = declared.get("saved_layers")
    if want is not None and list(want) != router.saved_layers:
        raise ArtifactError(
            f"{file}: router.saved_layers is {want}, but {path.name} was calibrated for "
            f"{router.saved_layers}"
        )
    if num_layers is not None:
        skipped = [num_layers - b["keep_first"] - b["keep_last"] for b in buckets]
        if skipped != router.saved_layers:
            raise ArtifactError(
                f"{file}: the buckets skip {skipped} layers, but {path.name} was calibrated "
                f"for buckets skipping {router.saved_layers}"
            )
    layer = declared.get("routing_layer")
    if layer is not None and layer != router.routing_layer:
        raise ArtifactError(
            f"{file}: router.routing_layer is {layer}, but {path.name} reads layer "
            f"{router.routing_layer}"
        )
    if not 0 <= router.routing_layer < min(b["keep_first"] for b in buckets):
        raise ArtifactError(
            f"{path}: router reads layer {router.routing_layer}; every bucket must run it, "
            f"allowed: 0..{min(b['keep_first'] for b in buckets) - 1}"
        )


def _check_finite(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    # safetensors has no checksum: flipped data bytes show up as NaN/Inf at best
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ArtifactError(f"{path}: tensor {name!r} holds NaN or Inf values (corrupted?)")


def _named(path: Path, err: BaseException) -> str:
    text = str(err)
    return text if str(path) in text else f"{path}: {text}"
