"""What the calibrated artifact's layer loop costs over vLLM's model, in one engine.

    python benchmarks/loop_overhead.py [batch sizes, e.g. 32,128] [prompt tokens] [--profile]

One engine with the default artifact (probe router), in-process. The same requests run
four ways, interleaved, 3 repeats of 64 new tokens:
- `model`: every step runs vLLM's compiled model (the loop is never chosen);
- `loop-full`: every step runs UTIO's layer loop, the probe's decision replaced by full
  depth for every row;
- `probe-always`: every step routes (``routing_payoff`` 'always');
- `probe-payoff`: as shipped (``routing_payoff`` 'measured': a step routes only while
  routing has measured faster per token than vLLM's model at its size).

`loop-full` / `model` is the loop's own cost at full depth; `probe-always` / `loop-full`
what routing a few rows costs beyond what it saves. `--profile` adds a `torch.profiler`
table of 16 steps of `model` and `loop-full`. A diagnostic: it swaps the runner's path
choice, probe decision and payoff rule from outside, which no user setting does.
"""

from __future__ import annotations

import os
import sys

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

import numpy as np
from vllm import LLM

import vllm_utio.integration.runner as runner_module
from vllm_utio.benchmarking.offline import make_prompts, measure_once, wiki_seed_text
from vllm_utio.paths import default_model_dir
from vllm_utio.routing.payoff import RoutingPayoff

MODES = ("model", "loop-full", "probe-always", "probe-payoff")


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--profile"]
    batches = [int(x) for x in (args[0] if args else "32,128").split(",")]
    prompt_len = int(args[1]) if len(args) > 1 else 64
    llm = LLM(
        str(default_model_dir()),
        dtype="bfloat16",
        max_model_len=prompt_len + 80,
        max_num_seqs=max(batches),
        max_num_batched_tokens=8192,
        kv_cache_memory_bytes=1 << 30,
        disable_log_stats=False,  # request metrics (first/last token times)
        seed=0,
        additional_config={"utio": {"enabled": True, "artifact": "default"}},
    )
    runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
    path_choice, route_mid = runner_module.layer_loop_reason, runner._utio_route_mid
    always, measured = RoutingPayoff("always"), runner._utio_payoff

    def use(mode: str) -> None:
        runner_module.layer_loop_reason = (
            (lambda cfg, facts: None) if mode == "model" else path_choice
        )
        runner._utio_route_mid = (
            (lambda stream: np.zeros(runner.input_batch.num_reqs, dtype=np.int64))
            if mode == "loop-full"
            else route_mid
        )
        runner._utio_payoff = measured if mode == "probe-payoff" else always

    def decode_tok_s(prompts: list[dict], tokens: int) -> float:
        return measure_once(llm, prompts, tokens, pin=None, utio=False)["decode_tok_s"]

    text = wiki_seed_text()
    for batch in batches:
        prompts = make_prompts(llm.get_tokenizer(), batch, prompt_len, text)
        for mode in MODES:  # warm-up of each path at this shape
            use(mode)
            decode_tok_s(prompts, 4)
        samples: dict[str, list[float]] = {m: [] for m in MODES}
        for _ in range(3):
            for mode in MODES:
                use(mode)
                samples[mode].append(decode_tok_s(prompts, 64))
        base = float(np.median(samples["model"]))
        for mode, values in samples.items():
            median = float(np.median(values))
            print(
                f"batch {batch}, {prompt_len}-token prompts, {mode}: {median:.1f} tok/s "
                f"({median / base:.3f} of model) {[round(v, 1) for v in values]}",
                flush=True,
            )
        print(f"payoff after batch {batch}: {measured.as_dict()}", flush=True)
        if "--profile" in sys.argv:
            from torch.profiler import ProfilerActivity, profile

            for mode in ("model", "loop-full"):
                use(mode)
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    decode_tok_s(prompts, 16)
                print(f"== {mode}, batch {batch}")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    use("probe-payoff")


if __name__ == "__main__":
    main()
