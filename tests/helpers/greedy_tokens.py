"""Greedy token ids for prompts, in a fresh process (so plugin loading can be controlled).

Usage: python greedy_tokens.py PROMPTS_JSON OUT_JSON MAX_TOKENS ENGINE_KW_JSON
Run with VLLM_PLUGINS set to a name that is not "utio" to get vLLM without the plugin.
"""

import json
import sys


def main() -> None:
    from vllm import LLM, SamplingParams

    with open(sys.argv[1]) as f:
        prompts = json.load(f)
    max_tokens = int(sys.argv[3])
    kw = json.loads(sys.argv[4])
    model = kw.pop("model")
    llm = LLM(model, **kw)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    loaded = sys.modules.get("vllm_utio") is not None
    with open(sys.argv[2], "w") as f:
        json.dump({"tokens": [list(o.outputs[0].token_ids) for o in outs], "plugin": loaded}, f)


if __name__ == "__main__":
    main()
