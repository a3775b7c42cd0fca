"""Reading a calibration artifact and turning it into the engine's UTIO config.

An artifact is one directory written by ``vllm-utio calibrate``::

    artifact.json          manifest: format/version, model fingerprint, data, budget,
                           buckets (UTIO bucket dicts, correction file names relative to
                           the directory), router settings, measured quality, timings
    <bucket>.safetensors   exit correction per bucket (vllm_utio/corrections.py format)
    router.safetensors     the calibrated router (routing/cost_router.py format)

Users load it with one config key, ``{"enabled": true, "artifact": DIR}`` (``"default"``
= the embedded model's artifact built at set-up). :func:`resolve_artifact` expands it
in the user's process (engine_args.py), after checking that the artifact was made for
the model being served; the workers receive the expanded config.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_utio.artifact_check import ArtifactError, check_files, check_manifest, read_manifest
from vllm_utio.config import UtioConfigError, parse_utio_config
from vllm_utio.paths import default_artifact_dir

ARTIFACT_FORMAT = "utio-calibration"
ARTIFACT_VERSION = 1
MANIFEST = "artifact.json"
ROUTER_FILE = "router.safetensors"
# Config fields the user may set next to an artifact, overriding its values (the
# fields it provides outright, buckets and probe_path, are refused by UtioConfig).
OVERRIDABLE = ("router", "signal", "routing_layer")


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

    def router_path(self) -> Path | None:
        weights = self.manifest.get("router", {}).get("weights")
        return None if weights is None else self.directory / weights

    def load_corrections(self, hidden_size: int) -> dict[str, Any]:
        """Bucket name -> its Correction (buckets without one are left out)."""
        import torch

        from vllm_utio.corrections import load_correction

        out = {}
        for b in self.buckets:
            path = self.correction_path(b)
            if path is not None:
                out[b["name"]] = load_correction(path, hidden_size, torch.float32)
        return out

    def load_router(self) -> Any:
        """The CostRouter, or None if the artifact has no router weights."""
        from vllm_utio.routing.cost_router import CostRouter

        path = self.router_path()
        return None if path is None else CostRouter.load(path)


def artifact_dir(value: str) -> Path:
    if value == "default":
        return default_artifact_dir()
    return Path(value).expanduser()


def load_artifact(directory: str | Path, model_path: str | Path) -> Artifact:
    """Read an artifact, check it was made for the model at ``model_path``, and check
    that every file it names loads and fits the manifest and the model
    (:mod:`vllm_utio.artifact_check`)."""
    directory = Path(directory)
    file = directory / MANIFEST
    manifest = read_manifest(directory, MANIFEST)
    if manifest.get("format") != ARTIFACT_FORMAT or manifest.get("version") != ARTIFACT_VERSION:
        raise ArtifactError(
            f"{file}: format {manifest.get('format')!r} version {manifest.get('version')!r}; "
            f"expected {ARTIFACT_FORMAT!r} version {ARTIFACT_VERSION}"
        )
    check_manifest(manifest, file)
    want = manifest["model"].get("fingerprint")
    have = model_fingerprint(model_path)
    if want != have:
        raise ArtifactError(
            f"{directory} was calibrated for another model: its fingerprint is "
            f"{str(want)[:16]}..., the model at {model_path} has {have[:16]}... "
            "(config.json or weights differ); re-run `vllm-utio calibrate` for this model"
        )
    check_files(directory, manifest, file, model_path)
    return Artifact(directory, manifest)


def artifact_to_utio_config(artifact: Artifact, router: str | None = None) -> dict[str, Any]:
    """A valid UTIO config dict from the artifact: its buckets (absolute correction
    paths) and its router: the calibrated probe if it has one, else the surrogate score
    with the calibrated ``max_score`` thresholds; ``router`` overrides the choice."""
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
    settings = artifact.manifest.get("router", {})
    weights = artifact.router_path()
    chosen = router or ("probe" if weights is not None else "surrogate")
    config: dict[str, Any] = {"enabled": True, "buckets": buckets, "router": chosen}
    if chosen == "probe":
        if weights is None:
            raise ArtifactError(f"{artifact.directory}: router='probe' but no router weights")
        config["probe_path"] = str(weights.resolve())
    if settings.get("signal") is not None:
        config["signal"] = dict(settings["signal"])
    if settings.get("routing_layer") is not None:
        config["routing_layer"] = int(settings["routing_layer"])
    try:  # fail here, not in the engine
        parse_utio_config(config)
    except UtioConfigError as err:
        raise ArtifactError(
            f"{artifact.directory / MANIFEST}: its settings are no valid UTIO config: {err}"
        ) from None
    return config


def resolve_artifact(raw: dict[str, Any], model_path: str | Path) -> dict[str, Any]:
    """The user's UTIO config dict with ``artifact`` expanded (for the workers).

    Fields the artifact provides (buckets, probe_path) must not be set alongside it;
    router, signal and routing_layer given by the user win over the artifact's.
    """
    parse_utio_config(raw)  # the config's own rules, incl. fields that conflict with it
    value = raw["artifact"]
    directory = artifact_dir(value)
    try:
        artifact = load_artifact(directory, model_path)
        expanded = artifact_to_utio_config(artifact, raw.get("router"))
    except ArtifactError as err:
        hint = " (the default artifact is built by `make setup`)" if value == "default" else ""
        raise ArtifactError(f"UTIO config field 'artifact': {err}{hint}") from None
    out = {k: v for k, v in raw.items() if k != "artifact"}
    for name, val in expanded.items():
        if name not in OVERRIDABLE or name not in raw:
            out[name] = val
    return out
