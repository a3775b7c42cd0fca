"""Self-speculation (UTIO drafts, the full model verifies) vs vanilla vLLM and ngram.

    python benchmarks/self_speculation.py [--quick] [--short] [-o results/speculative.json]

Same as ``vllm-utio bench-spec``; see vllm_utio/benchmarking/speculative.py.
"""

import argparse
import sys

from vllm_utio.benchmarking import speculative

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    speculative.add_arguments(parser)
    sys.exit(speculative.run(parser.parse_args()))
