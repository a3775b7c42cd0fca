"""Is an output's first difference from vanilla a tie at bf16 precision?

    python benchmarks/tie_logits.py CONTEXT BATCH PROMPT:STEP [PROMPT:STEP ...]

``bench-spec`` calls a difference a near tie when vanilla's top-2 logits at the first
differing step are at most 0.125 nats apart (one bf16 step of a logit of 16-32), or one
bf16 step of the top logit where that is wider (0.25 in [32, 64)). Its results files
before 2026-12-07's fourteenth session kept no top logit; for their cases this runs
vanilla vLLM alone on ``bench-spec``'s prompt ``PROMPT`` of the ``CONTEXT``-token,
``BATCH``-row Wikipedia cell (the same token ids), greedy, with
``logprobs_mode: "raw_logits"``, and prints the top-2 raw logits around ``STEP``, their
gap, and the bf16 spacing at the top logit. One row at a time: a batch's GEMM rounding
can move the gap by a bf16 step, so read it as the logits' magnitude, not their exact
value in the batched run.
"""

from __future__ import annotations

import argparse
import sys

from transformers import AutoTokenizer
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt

from vllm_utio.benchmarking import long_policies as lp
from vllm_utio.benchmarking.speculative import bf16_step, workloads
from vllm_utio.paths import default_model_dir


def main(argv: list[str]) -> int:
    if len(argv) < 3 or any(":" not in a for a in argv[2:]):
        print(__doc__)
        return 2
    context, batch = int(argv[0]), int(argv[1])
    pairs = [tuple(int(x) for x in a.split(":")) for a in argv[2:]]
    model = str(default_model_dir())
    # the prompts bench-spec builds for a run of this one cell
    cell = argparse.Namespace(context_lens=[context], batch_sizes=[batch], short=False)
    (only,) = workloads(cell, AutoTokenizer.from_pretrained(model))
    prompts = only["prompts"]
    last = max(step for _, step in pairs)
    kw = lp.engine_kwargs(context + last + 8, 2, 1 << 30, False, block_size=32)
    llm = LLM(model, logprobs_mode="raw_logits", **kw)
    for prompt, step in pairs:
        params = SamplingParams(temperature=0, max_tokens=step + 2, logprobs=2, ignore_eos=True)
        tokens = TokensPrompt(prompt_token_ids=prompts[prompt]["prompt_token_ids"])
        out = llm.generate([tokens], params, use_tqdm=False)[0].outputs[0]
        print(f"prompt {prompt}")
        for i in range(max(0, step - 1), step + 2):
            (t1, a), (t2, b) = sorted(out.logprobs[i].items(), key=lambda kv: -kv[1].logprob)[:2]
            top, second = a.logprob, b.logprob
            print(
                f"  step {i}: token {t1} {top:.4f}, token {t2} {second:.4f}, "
                f"gap {top - second:.4f}, bf16 spacing at the top logit {bf16_step(top):g}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
