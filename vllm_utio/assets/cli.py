"""``vllm-utio setup-assets``: build the default model and the evaluation text."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")


def run(args: argparse.Namespace) -> int:
    from vllm_utio.assets.data import prepare_data
    from vllm_utio.assets.model import build_default_model

    print(build_default_model(force=args.force))
    prepare_data(force=args.force)
    return 0
