"""Ad hoc (tenth session): a speculating engine's batch-1 step against the kernel alone's.

Both engines alive in one process, one prompt of PROBE_LEN tokens (prefix-cached after
an untimed run), 64 new tokens, PROBE_REPS rounds in turns. The speculating engine runs
once drafting and once with the request opted out (``utio_speculate: off``: plain steps
only). ``step_probe.ProbeExtension`` times the worker's calls; wall time less the
worker's time per step is what the engine core and the RPCs between them add.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from transformers import AutoTokenizer
from vllm import LLM, SamplingParams

from vllm_utio.assets.data import load_wiki_documents
from vllm_utio.benchmarking import long_policies as lp
from vllm_utio.benchmarking.long_context import corpus_ids
from vllm_utio.benchmarking.speculative import engines
from vllm_utio.paths import default_model_dir


def _outside_worker_ms(probe: dict, wall: float, steps: int) -> float:
    busy = sum(probe.get(f"w.{n}", 0.0) for n in ("execute_model", "sample_tokens"))
    busy += probe.get("w.take_draft_token_ids", 0.0)
    return (wall - busy) / steps * 1e3


def main() -> None:
    model = str(default_model_dir())
    tok = AutoTokenizer.from_pretrained(model)
    n = int(os.environ.get("PROBE_LEN", "4096"))
    ids = corpus_ids(tok, [d["text"] for d in load_wiki_documents()], n)
    prompt = {"prompt_token_ids": ids[:n]}
    table = engines(4, 32)
    names = sys.argv[1:] or ["utio-kernel", "spec-throttle-utio-kernel"]
    llms = {}
    for name in names:
        kw = lp.engine_kwargs(
            4200, 2, 1 << 30, False, utio=table[name]["utio"], block_size=32, dtype="bfloat16"
        )
        kw["worker_extension_cls"] = "step_probe.ProbeExtension"
        llms[name] = LLM(model, **kw)
    res: dict[str, list] = {}
    for rep in range(int(os.environ.get("PROBE_REPS", "3"))):
        for name, llm in llms.items():
            for off in (False, True) if "spec" in name else (False,):
                extra = {"utio_speculate": "off"} if off else None
                sp = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True, extra_args=extra)
                llm.generate([prompt], sp, use_tqdm=False)  # prefix warm
                llm.collective_rpc("probe", kwargs={"reset": True})
                t0 = time.perf_counter()
                llm.generate([prompt], sp, use_tqdm=False)
                wall = time.perf_counter() - t0
                p = llm.collective_rpc("probe", kwargs={"reset": True})[0]
                key = f"{name}{'-off' if off else ''}"
                res.setdefault(key, []).append({"wall": wall, "probe": p})
                steps = p.get("w.execute_model#", 1)
                outside = _outside_worker_ms(p, wall, steps)
                print(
                    key, rep, f"wall {wall:.3f} s, {steps} steps, outside worker {outside:.2f} ms"
                )
    with open(os.environ.get("PROBE_OUT", "probe.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
