#!/usr/bin/env python3
"""Prepare the evaluation text (Wikipedia excerpt, ShareGPT prompts); see vllm_utio.assets.data.

Usage: python scripts/prepare_data.py [--force]
"""

from __future__ import annotations

import sys
from pathlib import Path

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_utio.assets.data import main

if __name__ == "__main__":
    raise SystemExit(main())
