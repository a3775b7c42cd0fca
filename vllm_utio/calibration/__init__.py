"""Calibration: quality-budgeted layer plans, exit corrections and learned routers.

Everything runs the pure-torch reference forward (vllm_utio/evaluation/reference.py)
on CPU; no vLLM engine is started. Entry points: ``vllm-utio calibrate`` (cli.py),
:func:`~.pipeline.calibrate`, and the artifact functions below. The study behind
docs/calibration.md is ``python -m vllm_utio.calibration.study``.
"""

from vllm_utio.calibration.artifact import (
    Artifact,
    ArtifactError,
    artifact_to_utio_config,
    load_artifact,
    model_fingerprint,
    save_artifact,
)
from vllm_utio.calibration.routers import ProbeRouter

__all__ = [
    "Artifact",
    "ArtifactError",
    "ProbeRouter",
    "artifact_to_utio_config",
    "load_artifact",
    "model_fingerprint",
    "save_artifact",
]
