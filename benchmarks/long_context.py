"""Long-context decode speed of sparse attention policies, then their quality.

    python benchmarks/long_context.py [--quick] [-o results/long_context.json]
    vllm-utio eval-long --attach results/long_context.json
    vllm-utio report results/long_context.json -o docs/results/<date>-long

Same as ``vllm-utio bench-long``; see vllm_utio/benchmarking/long_context.py.
"""

import argparse
import sys

from vllm_utio.benchmarking import long_context

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    long_context.add_arguments(parser)
    sys.exit(long_context.run(parser.parse_args()))
