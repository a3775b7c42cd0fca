"""How often `focus_mass` fires: layers per decode token that reuse a choice or choose
because the row is focused, for text continuation (bench-long's prompts) and for
retrieval answers (eval-long's cases), one engine, one forced bucket per setting.

    python focus_probe.py CONTEXT CASES FOCUS_MASS...   # e.g. 8064 6 0.25 0.3 0.4 0.5
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

from transformers import AutoTokenizer
from vllm import LLM, SamplingParams

from vllm_utio.assets.data import load_wiki_documents
from vllm_utio.benchmarking import long_policies as lp
from vllm_utio.benchmarking.long_context import corpus_ids, long_prompts
from vllm_utio.evaluation.long_quality import concatenated_ids, held_out_texts
from vllm_utio.evaluation.retrieval import make_cases
from vllm_utio.paths import default_model_dir

BASE = lp.POLICIES["sparq1536s8"]  # select_every_steps 8, budget 1536


def main() -> None:
    ctx, n = int(sys.argv[1]), int(sys.argv[2])
    shares = [float(x) for x in sys.argv[3:]]
    model = str(default_model_dir())
    tok = AutoTokenizer.from_pretrained(model)
    buckets = [lp._full_bucket("s8", 30, 0.1, BASE)]
    for i, share in enumerate(shares):
        policy = {**BASE, "focus_mass": share}
        buckets.append(lp._full_bucket(f"f{share}", 30, 0.2 + 0.1 * i, policy))
    every = {k: v for k, v in BASE.items() if k != "select_every_steps"}
    buckets.append(lp._full_bucket("every", 30, 0.95, every))
    utio = {"enabled": True, "router": "forced", "buckets": buckets}
    llm = LLM(model, **lp.engine_kwargs(ctx + 128, n, 2 * 2**30, False, utio=utio, block_size=32))
    ids = corpus_ids(tok, [d["text"] for d in load_wiki_documents()], n * ctx)
    text = [p["prompt_token_ids"] for p in long_prompts(ids, n, ctx - 64, n, ctx - 64)]
    hay = concatenated_ids(tok, held_out_texts(load_wiki_documents()), ctx * (n + 2))
    cases = make_cases(tok, hay, ctx, n, 0)
    for bucket in buckets:
        extra = {"utio_bucket": bucket["name"]}
        runs = {
            "text": [(p, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True, extra_args=extra)) for p in text],  # noqa: E501
            "cases": [(list(c.tokens), SamplingParams(temperature=0, max_tokens=c.answer_tokens, extra_args=extra)) for c in cases],  # noqa: E501
        }  # fmt: skip
        for label, run in runs.items():
            llm.collective_rpc("utio_stats", kwargs={"reset": True})
            outs = llm.generate(
                [{"prompt_token_ids": p} for p, _ in run], [s for _, s in run], use_tqdm=False
            )
            s = llm.collective_rpc("utio_stats", kwargs={"reset": True})[0]
            rows = max(1, sum(len(o.outputs[0].token_ids) - 1 for o in outs))
            passed = ""
            if label == "cases":
                got = (c.passed(o.outputs[0].text) for c, o in zip(cases, outs, strict=True))
                passed = " passed=" + "".join("1" if g else "0" for g in got)
            print(
                f"{bucket['name']:8s} {label}: reused/token={s['select_rows_reused'] / rows:.1f} "
                f"focused/token={s['select_rows_focused'] / rows:.1f}{passed}",
                flush=True,
            )


if __name__ == "__main__":
    main()
