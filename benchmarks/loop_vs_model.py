"""Decode tok/s of the layer loop against vLLM's own model, in one engine and process.

    python benchmarks/loop_vs_model.py [auto|eager] [batch sizes, e.g. 1,32]

One forced engine (the offline benchmark's static plans). Requests pinned to skip6 or
skip2 run UTIO's layer loop; unpinned ones run at full depth through vLLM's compiled
model. Prints decode tok/s per batch size and plan (64 new tokens, 2 repeats).
"""

from __future__ import annotations

import os
import sys
import time

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

from vllm import LLM, SamplingParams

from vllm_utio.benchmarking.suite import STATIC_BUCKETS
from vllm_utio.paths import default_model_dir

NEW_TOKENS = 64


def main() -> None:
    loop = sys.argv[1] if len(sys.argv) > 1 else "auto"
    batches = [int(x) for x in (sys.argv[2] if len(sys.argv) > 2 else "1,32").split(",")]
    utio = {"enabled": True, "router": "forced", "buckets": STATIC_BUCKETS, "layer_loop": loop}
    llm = LLM(
        str(default_model_dir()),
        dtype="bfloat16",
        max_model_len=1024,
        kv_cache_memory_bytes=1 << 30,
        max_num_seqs=max(batches),
        seed=0,
        additional_config={"utio": utio},
    )
    prompts = [f"The history of city number {i} began when" for i in range(max(batches))]

    def run(batch: int, pin: str | None, tokens: int) -> float:
        extra = {"utio_bucket": pin} if pin else None
        params = SamplingParams(
            temperature=0.0, max_tokens=tokens, ignore_eos=True, extra_args=extra
        )
        t0 = time.perf_counter()
        llm.generate(prompts[:batch], [params] * batch, use_tqdm=False)
        return batch * tokens / (time.perf_counter() - t0)

    for batch in batches:
        run(batch, "skip6", 4)  # warm-up of both paths
        run(batch, None, 4)
        samples: dict[str | None, list[float]] = {}
        for _ in range(2):
            for pin in (None, "skip6", "skip2"):
                samples.setdefault(pin, []).append(run(batch, pin, NEW_TOKENS))
        for pin, tok_s in samples.items():
            print(
                f"{loop} batch {batch} {pin or 'full depth'}: {[round(x, 1) for x in tok_s]} tok/s"
            )


if __name__ == "__main__":
    main()
