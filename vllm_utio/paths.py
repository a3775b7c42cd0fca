"""Where set-up puts the embedded default model and the prepared evaluation text.

Everything lives outside the repository, under one cache directory that the
``VLLM_UTIO_CACHE`` environment variable can move.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    return Path(os.environ.get("VLLM_UTIO_CACHE", Path.home() / ".cache" / "vllm-utio"))


def default_model_dir() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL_NAME


def data_dir() -> Path:
    return cache_dir() / "data"


def wiki_text_path() -> Path:
    """Cleaned plain text of gensim's Wikipedia excerpt, one article per paragraph block."""
    return data_dir() / "wiki.txt"


def sharegpt_path() -> Path:
    """Complete ShareGPT records recovered from the truncated JSON, one per line."""
    return data_dir() / "sharegpt.jsonl"


def default_artifact_dir() -> Path:
    """The default model's calibration artifact, built by set-up (``"artifact": "default"``)."""
    return cache_dir() / "artifacts" / DEFAULT_MODEL_NAME
