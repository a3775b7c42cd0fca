"""``vllm-utio``: the project's own command line (evaluation, benchmarks, reports).

Each subcommand lives in its own module and is imported only when used, so
``vllm-utio --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module with add_arguments(parser) and run(args) -> int, help)
SUBCOMMANDS = {
    "eval": ("vllm_utio.evaluation.quality_cli", "quality of a UTIO config vs the full model"),
    "eval-long": (
        "vllm_utio.evaluation.long_cli",
        "long-context quality of sparse attention policies: perplexity, agreement, retrieval",
    ),
    "bench": ("vllm_utio.benchmarking.suite", "offline throughput: UTIO configs vs vanilla vLLM"),
    "bench-long": (
        "vllm_utio.benchmarking.long_context",
        "long-context decode speed of sparse attention policies (dense vs throttle, ...)",
    ),
    "bench-spec": (
        "vllm_utio.benchmarking.speculative",
        "self-speculation (UTIO drafts, full model verifies) vs vanilla and ngram",
    ),
    "bench-serve": (
        "vllm_utio.benchmarking.serving_suite",
        "serving: vllm serve with and without --enable-utio, ShareGPT prompts",
    ),
    "report": ("vllm_utio.benchmarking.report", "markdown report and plots from a results file"),
    "setup-assets": ("vllm_utio.assets.cli", "build the default model and evaluation text"),
    "calibrate": ("vllm_utio.calibration.cli", "fit layer plans, exit corrections and a router"),
    "soak": (
        "vllm_utio.soak.cli",
        "vllm serve under load, faults and bad input: nothing lost, leaked or 5xx",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-utio", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(_module=module)
        _load(module).add_arguments(p)
    return parser


def _load(module: str):
    return importlib.import_module(module)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(_load(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
