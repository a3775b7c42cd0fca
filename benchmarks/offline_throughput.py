"""Offline decode throughput: UTIO configurations vs vanilla vLLM, interleaved, one run.

    python benchmarks/offline_throughput.py [--quick] [-o results/offline.json]
    vllm-utio report results/offline.json -o docs/results/<date>

Same as ``vllm-utio bench``; see vllm_utio/benchmarking/suite.py for the configurations.
"""

import argparse
import sys

from vllm_utio.benchmarking import suite

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    suite.add_arguments(parser)
    sys.exit(suite.run(parser.parse_args()))
