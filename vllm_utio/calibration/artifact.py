"""Writing a calibration artifact (reading it is engine-side: vllm_utio/artifact.py,
which documents the layout)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vllm_utio.artifact import (
    ARTIFACT_FORMAT,
    ARTIFACT_VERSION,
    MANIFEST,
    ROUTER_FILE,
    Artifact,
    ArtifactError,
    artifact_to_utio_config,
    load_artifact,
    model_fingerprint,
)
from vllm_utio.corrections import Correction, save_correction
from vllm_utio.routing.cost_router import CostRouter

__all__ = [
    "Artifact",
    "ArtifactError",
    "artifact_to_utio_config",
    "load_artifact",
    "model_fingerprint",
    "save_artifact",
]


def save_artifact(
    directory: str | Path,
    manifest: dict[str, Any],
    corrections: dict[str, Correction],
    router: CostRouter | None = None,
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
    written = [MANIFEST, *(b["correction"] for b in buckets if "correction" in b)]
    if router is not None:
        written.append(ROUTER_FILE)
    for name in written:
        (directory / name).chmod(0o644)  # safetensors writes 0600; artifacts are shared
    return Artifact(directory, manifest)
