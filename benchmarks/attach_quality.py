"""Attach `vllm-utio eval` reports to a benchmark results file (speed next to quality).

    python benchmarks/attach_quality.py RESULTS.json EVAL.json skip6=utio-skip6 routed=utio-x

Each mapping is ``REPORT=CONFIG``: REPORT is the eval report's forced bucket, or
``routed`` for a report without one.
"""

import json
import sys
from pathlib import Path

from vllm_utio.benchmarking.results import attach_quality, load, save

if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    results_path, eval_path = Path(sys.argv[1]), Path(sys.argv[2])
    mapping = dict(arg.split("=", 1) for arg in sys.argv[3:])
    results = load(results_path)
    filled = attach_quality(results, json.loads(eval_path.read_text()), mapping)
    missing = sorted(set(mapping.values()) - set(filled))
    if missing:
        sys.exit(f"no eval report for: {', '.join(missing)}")
    print(save(results, results_path), "quality for:", ", ".join(filled))
