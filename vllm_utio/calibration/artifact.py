"""The calibration artifact: one directory the engine (and people) can read.

Layout::

    artifact.json          manifest (below)
    <bucket>.safetensors   one exit correction per bucket (vllm_utio/corrections.py format)
    router.safetensors     learned probe router (format in calibration/routers.py)

``artifact.json`` holds ``format``/``version``, the model fingerprint, the data used,
the budget, the plans as UTIO bucket dicts (``correction`` relative to the directory),
the router (type, weights file, settings), measured quality with intervals and timings.
:func:`load_artifact` refuses an artifact made for another model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_utio.calibration.routers import ProbeRouter
from vllm_utio.config import parse_utio_config
from vllm_utio.corrections import Correction, load_correction, save_correction

ARTIFACT_FORMAT = "utio-calibration"
ARTIFACT_VERSION = 1
MANIFEST = "artifact.json"
ROUTER_FILE = "router.safetensors"


class ArtifactError(ValueError):
    """The artifact is unreadable or does not belong to the given model."""


def model_fingerprint(model_path: str | Path) -> str:
    """sha256 over config.json and every weights file's bytes (about a second for the
    default model): any change to the architecture or the weights changes it."""
    path = Path(model_path)
    config = path / "config.json"
    weights = sorted(path.glob("*.safetensors"))
    if not config.is_file() or not weights:
        raise ArtifactError(f"{path}: no config.json and *.safetensors to fingerprint")
    h = hashlib.sha256()
    for file in (config, *weights):
        h.update(file.name.encode() + b"\0")
        with file.open("rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


@dataclass
class Artifact:
    directory: Path
    manifest: dict[str, Any]

    @property
    def buckets(self) -> list[dict[str, Any]]:
        return list(self.manifest["buckets"])

    def correction_path(self, bucket: dict[str, Any]) -> Path | None:
        name = bucket.get("correction")
        return None if name is None else self.directory / name

    def load_corrections(self, hidden_size: int) -> dict[str, Correction]:
        """Bucket name -> its correction (buckets without one are left out)."""
        import torch

        out = {}
        for b in self.buckets:
            path = self.correction_path(b)
            if path is not None:
                out[b["name"]] = load_correction(path, hidden_size, torch.float32)
        return out

    def load_router(self) -> ProbeRouter | None:
        weights = self.manifest.get("router", {}).get("weights")
        return None if weights is None else ProbeRouter.load(self.directory / weights)


def save_artifact(
    directory: str | Path,
    manifest: dict[str, Any],
    corrections: dict[str, Correction],
    router: ProbeRouter | None = None,
) -> Artifact:
    """Write the files and the manifest; each bucket with an entry in ``corrections``
    (by name) gets ``<name>.safetensors``; ``router`` goes to router.safetensors."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    manifest = {"format": ARTIFACT_FORMAT, "version": ARTIFACT_VERSION, **manifest}
    buckets = []
    for bucket in manifest["buckets"]:
        bucket = dict(bucket)
        corr = corrections.get(bucket["name"])
        if corr is not None:
            bucket["correction"] = f"{bucket['name']}.safetensors"
            save_correction(directory / bucket["correction"], corr)
        buckets.append(bucket)
    manifest["buckets"] = buckets
    if router is not None:
        router.save(directory / ROUTER_FILE)
        manifest["router"] = {**manifest.get("router", {}), "weights": ROUTER_FILE}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return Artifact(directory, manifest)


def load_artifact(directory: str | Path, model_path: str | Path) -> Artifact:
    """Read an artifact and check it was made for the model at ``model_path``."""
    directory = Path(directory)
    file = directory / MANIFEST
    if not file.is_file():
        raise ArtifactError(f"{directory}: no {MANIFEST}; not a calibration artifact")
    manifest = json.loads(file.read_text())
    if manifest.get("format") != ARTIFACT_FORMAT or manifest.get("version") != ARTIFACT_VERSION:
        raise ArtifactError(
            f"{file}: format {manifest.get('format')!r} version {manifest.get('version')!r}; "
            f"expected {ARTIFACT_FORMAT!r} version {ARTIFACT_VERSION}"
        )
    want = manifest.get("model", {}).get("fingerprint")
    have = model_fingerprint(model_path)
    if want != have:
        raise ArtifactError(
            f"{directory} was calibrated for another model: its fingerprint is "
            f"{str(want)[:16]}..., the model at {model_path} has {have[:16]}... "
            "(config.json or weights differ); re-run `vllm-utio calibrate` for this model"
        )
    return Artifact(directory, manifest)


def artifact_to_utio_config(artifact: Artifact) -> dict[str, Any]:
    """A valid UTIO config dict: the artifact's buckets with absolute correction paths
    and the router settings the engine supports today (the surrogate score, with
    ``max_score`` thresholds calibrated to the budget). The learned probe router needs
    mid-forward routing in the executor; its weights stay in the artifact."""
    buckets = []
    for b in artifact.buckets:
        path = artifact.correction_path(b)
        buckets.append(
            {
                "name": b["name"],
                "max_score": b["max_score"],
                "keep_first": b["keep_first"],
                "keep_last": b["keep_last"],
                "correction": None if path is None else str(path.resolve()),
            }
        )
    router = artifact.manifest.get("router", {})
    config: dict[str, Any] = {"enabled": True, "buckets": buckets, "router": "surrogate"}
    if router.get("signal") is not None:
        config["signal"] = dict(router["signal"])
    if router.get("routing_layer") is not None:
        config["routing_layer"] = int(router["routing_layer"])
    parse_utio_config(config)  # fail here, not in the engine
    return config
