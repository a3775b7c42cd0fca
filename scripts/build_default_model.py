#!/usr/bin/env python3
"""Build the embedded default model (SmolLM2-135M-Instruct, bf16); see vllm_utio.assets.model.

Usage: python scripts/build_default_model.py [--force]
"""

from __future__ import annotations

import sys
from pathlib import Path

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_utio.assets.model import main

if __name__ == "__main__":
    raise SystemExit(main())
