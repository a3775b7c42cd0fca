"""Build the default model's calibration artifact (``"artifact": "default"``).

Set-up runs ``python -m vllm_utio.assets.artifact``: ``vllm-utio calibrate`` with a
fixed, reproducible recipe (training bounded by steps, not seconds) into the cache
directory. It is skipped when an artifact built by the same recipe for the same model
weights is already there. The recipe trades some quality for set-up time; the full
study behind it is docs/calibration.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

from vllm_utio.artifact import MANIFEST, model_fingerprint
from vllm_utio.paths import default_artifact_dir, default_model_dir

# vllm-utio calibrate arguments (budget in percent of held-out perplexity).
RECIPE = [
    "--budget-ppl", "3",
    "--buckets", "3",
    "--longest-span", "6",
    "--train-steps", "60",
    "--curve-windows", "0",
    "--fit-windows", "24",
    "--tune-windows", "8",
    "--held-windows", "24",
    "--seed", "0",
]  # fmt: skip


def recipe_id() -> str:
    return hashlib.sha256(json.dumps(RECIPE).encode()).hexdigest()[:16]


def is_current(directory: Path, model: Path) -> bool:
    file = directory / MANIFEST
    if not file.is_file():
        return False
    manifest = json.loads(file.read_text())
    return manifest.get("recipe_id") == recipe_id() and manifest.get("model", {}).get(
        "fingerprint"
    ) == model_fingerprint(model)


def build_default_artifact(force: bool = False, threads: int | None = None) -> Path:
    from vllm_utio.calibration.cli import add_arguments, run

    model, target = default_model_dir(), default_artifact_dir()
    if not force and is_current(target, model):
        print(f"[artifact] up to date: {target}")
        return target
    print(f"[artifact] calibrating the default model (recipe {recipe_id()}) -> {target}")
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    extra = ["--threads", str(threads)] if threads else []
    args = parser.parse_args([*RECIPE, *extra, "--model", str(model), "-o", str(staging)])
    start = time.perf_counter()
    run(args)
    manifest_file = staging / MANIFEST
    manifest = json.loads(manifest_file.read_text())
    manifest["recipe_id"] = recipe_id()
    manifest["recipe"] = RECIPE
    manifest_file.write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)  # only a complete artifact ever sits at the target
    print(f"[artifact] built in {time.perf_counter() - start:.0f} s: {target}")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if current")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args(argv)
    build_default_artifact(args.force, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
