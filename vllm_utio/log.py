"""Loggers under vLLM's ``vllm`` logger, so ``vllm serve`` shows UTIO's lines with its own."""

from __future__ import annotations

import logging


def get_logger(name: str) -> logging.Logger:
    """``vllm.utio.<name>``: handled and formatted by vLLM's logging configuration."""
    return logging.getLogger(f"vllm.utio.{name.removeprefix('vllm_utio.')}")
